import Foundation

/// `torch.randn(shape, generator=torch.Generator("cuda").manual_seed(seed), device="cuda")` in float32:
/// cuRAND's Philox4x32-10 with PyTorch's CUDA layout and cuRAND's Box-Muller.
///
/// PyTorch launches min(ceil(n / 256), SMs x 8) blocks of 256 threads; thread `i` seeds Philox with
/// key = seed and subsequence i (counter (offset/4, 0, i)), and its j-th `curand_normal4` fills
/// elements i + stride * (4j + k), k = 0..<4 (stride = the thread count). Each draw advances the
/// generator's offset by 4 per pass, so successive draws continue one stream as torch's do. For up
/// to SMs x 8 x 256 elements (270,336 on the H100/H200's 132 SMs) the layout does not depend on the
/// GPU; beyond that it does, hence `multiprocessorCount`.
///
/// The Philox integers match exactly; the Box-Muller floats are the GPU's approximate log and
/// sin/cos, so values agree with the GPU's to a few units in the last place of max(1, |x|)
/// (RandomSourceTests states the bound).
public struct NvidiaRandomSource: RandomSource {
    public let seed: UInt64
    public let multiprocessorCount: Int
    /// Philox offset in 32-bit outputs (torch's `philox_offset_per_thread`).
    public private(set) var offset: UInt64 = 0

    public init(seed: UInt64, multiprocessorCount: Int = 132) {
        self.seed = seed
        self.multiprocessorCount = multiprocessorCount
    }

    static let blockSize = 256
    static let blocksPerMultiprocessor = 2048 / blockSize

    public mutating func normalArray(count: Int) -> [Float] {
        guard count > 0 else { return [] }
        let blocks = min((count + Self.blockSize - 1) / Self.blockSize, multiprocessorCount * Self.blocksPerMultiprocessor)
        let stride = blocks * Self.blockSize
        let passes = (count - 1) / (stride * 4) + 1
        var result = [Float](repeating: 0, count: count)
        for thread in 0..<stride {
            for pass in 0..<passes {
                let first = thread + stride * 4 * pass
                if first >= count { break }
                let values = Self.normal4(Self.philox(counter: (offset / 4 + UInt64(pass), UInt64(thread)), seed: seed))
                for k in 0..<4 {
                    let index = first + stride * k
                    if index < count { result[index] = values[k] }
                }
            }
        }
        offset += UInt64(passes * 4)
        return result
    }

    /// Philox4x32-10 of counter (low 64 bits, high 64 bits) under key = seed.
    static func philox(counter: (UInt64, UInt64), seed: UInt64) -> [UInt32] {
        var c = [UInt32(truncatingIfNeeded: counter.0), UInt32(truncatingIfNeeded: counter.0 >> 32),
                 UInt32(truncatingIfNeeded: counter.1), UInt32(truncatingIfNeeded: counter.1 >> 32)]
        var key = (UInt32(truncatingIfNeeded: seed), UInt32(truncatingIfNeeded: seed >> 32))
        for round in 0..<10 {
            if round > 0 {
                key.0 &+= 0x9E37_79B9
                key.1 &+= 0xBB67_AE85
            }
            let p0 = UInt64(0xD251_1F53) * UInt64(c[0]), p1 = UInt64(0xCD9E_8D57) * UInt64(c[2])
            c = [UInt32(truncatingIfNeeded: p1 >> 32) ^ c[1] ^ key.0, UInt32(truncatingIfNeeded: p1),
                 UInt32(truncatingIfNeeded: p0 >> 32) ^ c[3] ^ key.1, UInt32(truncatingIfNeeded: p0)]
        }
        return c
    }

    /// cuRAND's `curand_normal4`: Box-Muller on (x, y) and on (z, w), sin first.
    static func normal4(_ bits: [UInt32]) -> [Float] {
        let scale: Float = 2.3283064e-10  // CURAND_2POW32_INV
        let angleScale: Float = scale * 6.2831855  // CURAND_2POW32_INV_2PI
        func pair(_ a: UInt32, _ b: UInt32) -> (Float, Float) {
            // nvcc contracts x * c + c / 2 to one fused multiply-add.
            let u = (scale / 2).addingProduct(Float(a), scale)
            let v = (angleScale / 2).addingProduct(Float(b), angleScale)
            let radius = (-2 * log(u)).squareRoot()
            return (radius * sin(v), radius * cos(v))
        }
        let (x, y) = pair(bits[0], bits[1]), (z, w) = pair(bits[2], bits[3])
        return [x, y, z, w]
    }
}
