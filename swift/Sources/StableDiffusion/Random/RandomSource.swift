import Foundation

/// A source of standard normal samples in the order a Python reference fills a C-contiguous tensor.
public protocol RandomSource {
    /// `count` samples, exactly as the reference returns them for a tensor with that many elements.
    mutating func normalArray(count: Int) -> [Float]
}

public enum RandomSourceKind: String, CaseIterable, Sendable {
    /// `np.random.RandomState(seed).randn(*shape).astype(np.float32)`: the Python pipeline's source.
    case numpy
    /// `torch.randn(shape, generator=torch.Generator().manual_seed(seed))` on the CPU.
    case torch
    /// `torch.randn(..., generator=torch.Generator("cuda").manual_seed(seed), device="cuda")`: cuRAND
    /// Philox, what most published diffusers seeds were drawn with (values within a few float32 ulps).
    case nvidia

    public func makeSource(seed: UInt32) -> any RandomSource {
        switch self {
        case .numpy: return NumPyRandomSource(seed: seed)
        case .torch: return TorchRandomSource(seed: UInt64(seed))
        case .nvidia: return NvidiaRandomSource(seed: UInt64(seed))
        }
    }
}

extension RandomSource {
    public mutating func normalTensor(shape: [Int]) -> Tensor {
        Tensor(shape: shape, scalars: normalArray(count: shape.reduce(1, *)))
    }
}

/// NumPy's legacy `RandomState`: 53-bit doubles and the polar (Marsaglia) Gaussian, one cached.
public struct NumPyRandomSource: RandomSource {
    private var generator: MT19937
    private var cachedGaussian: Double?

    public init(seed: UInt32) {
        generator = MT19937(seed: seed)
    }

    public mutating func nextDouble() -> Double {
        let high = Double(generator.next() >> 5)
        let low = Double(generator.next() >> 6)
        return (high * 67_108_864.0 + low) / 9_007_199_254_740_992.0
    }

    public mutating func nextGaussian() -> Double {
        if let cached = cachedGaussian {
            cachedGaussian = nil
            return cached
        }
        var x1 = 0.0, x2 = 0.0, r2 = 0.0
        repeat {
            x1 = 2.0 * nextDouble() - 1.0
            x2 = 2.0 * nextDouble() - 1.0
            r2 = x1 * x1 + x2 * x2
        } while r2 >= 1.0 || r2 == 0.0
        let f = (-2.0 * log(r2) / r2).squareRoot()
        cachedGaussian = f * x1
        return f * x2
    }

    public mutating func normalArray(count: Int) -> [Float] {
        (0..<count).map { _ in Float(nextGaussian()) }
    }
}
