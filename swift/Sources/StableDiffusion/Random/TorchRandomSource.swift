import Foundation

/// PyTorch's CPU `torch.randn` for float32 with a freshly seeded generator.
///
/// Fewer than 16 elements: one double Box-Muller sample per element (the sine half cached for the
/// next one). 16 or more: torch first fills the tensor with 24-bit float uniforms, then turns each
/// block of 16 into normals in float (8 pairs), redrawing the last 16 when the size is not a
/// multiple of 16. Which log/sin/cos that block step uses depends on the build torch runs:
/// `.avx2` is the SIMD kernel of the x86-64 wheels (Linux, Windows, Intel Macs; also on AVX-512
/// CPUs, verified here), `.scalar` the libm one of Arm builds (Apple silicon) and of
/// `ATEN_CPU_CAPABILITY=default`.
public struct TorchRandomSource: RandomSource {
    public enum Kernel: Sendable { case scalar, avx2 }

    private var generator: MT19937
    private var cachedNormal: Double?
    public let kernel: Kernel

    /// torch keeps only the low 32 bits of the seed for its Mersenne Twister.
    public init(seed: UInt64, kernel: Kernel = .avx2) {
        generator = MT19937(seed: UInt32(truncatingIfNeeded: seed))
        self.kernel = kernel
    }

    public mutating func normalArray(count: Int) -> [Float] {
        count >= 16 ? blockNormals(count: count) : (0..<count).map { _ in Float(nextDoubleNormal()) }
    }

    private mutating func uniformFloat() -> Float {
        Float(generator.next() & 0xFF_FFFF) * (1.0 / 16_777_216.0)
    }

    private mutating func uniformDouble() -> Double {
        let high = UInt64(generator.next())
        let low = UInt64(generator.next())
        return Double(((high << 32) | low) & ((1 << 53) - 1)) * (1.0 / 9_007_199_254_740_992.0)
    }

    private mutating func nextDoubleNormal() -> Double {
        if let cached = cachedNormal {
            cachedNormal = nil
            return cached
        }
        let u1 = uniformDouble()
        let u2 = uniformDouble()
        let radius = (-2.0 * log1p(-u2)).squareRoot()
        let theta = 2.0 * Double.pi * u1
        cachedNormal = radius * sin(theta)
        return radius * cos(theta)
    }

    private mutating func blockNormals(count: Int) -> [Float] {
        var data = (0..<count).map { _ in uniformFloat() }
        var start = 0
        while start + 16 <= count {
            transformBlock(&data, at: start)
            start += 16
        }
        if count % 16 != 0 {
            for i in (count - 16)..<count { data[i] = uniformFloat() }
            transformBlock(&data, at: count - 16)
        }
        return data
    }

    private func transformBlock(_ data: inout [Float], at base: Int) {
        for j in 0..<8 {
            let (a, b) = boxMuller(1 - data[base + j], data[base + j + 8])
            data[base + j] = a
            data[base + j + 8] = b
        }
    }

    private func boxMuller(_ u1: Float, _ u2: Float) -> (Float, Float) {
        switch kernel {
        case .scalar:
            let radius = (-2 * log(u1)).squareRoot()
            let theta = Float(2.0 * Double.pi * Double(u2))
            return (radius * cos(theta), radius * sin(theta))
        case .avx2:
            let radius = (-2 * AVXMath.log(u1)).squareRoot()
            let (sine, cosine) = AVXMath.sincos(Float(2.0 * Double.pi) * u2)
            return (radius * cosine, radius * sine)
        }
    }
}
