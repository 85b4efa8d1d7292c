/// The Mersenne Twister both NumPy's legacy `RandomState` and PyTorch's CPU generator are built on,
/// with the reference `init_genrand` seeding they both use.
public struct MT19937: Sendable {
    private static let size = 624
    private static let shift = 397
    private var state: [UInt32]
    private var index: Int

    public init(seed: UInt32) {
        state = [UInt32](repeating: 0, count: Self.size)
        state[0] = seed
        for i in 1..<Self.size {
            state[i] = 1_812_433_253 &* (state[i - 1] ^ (state[i - 1] >> 30)) &+ UInt32(i)
        }
        index = Self.size
    }

    public mutating func next() -> UInt32 {
        if index >= Self.size { twist() }
        var y = state[index]
        index += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C_5680
        y ^= (y << 15) & 0xEFC6_0000
        y ^= y >> 18
        return y
    }

    private mutating func twist() {
        for i in 0..<Self.size {
            let y = (state[i] & 0x8000_0000) | (state[(i + 1) % Self.size] & 0x7FFF_FFFF)
            var value = state[(i + Self.shift) % Self.size] ^ (y >> 1)
            if y & 1 != 0 { value ^= 0x9908_B0DF }
            state[i] = value
        }
        index = 0
    }
}
