/// A dense float32 tensor in C order: the currency between the loop, schedulers and models.
public struct Tensor: Equatable, Sendable {
    public var shape: [Int]
    public var scalars: [Float]

    public init(shape: [Int], scalars: [Float]) {
        precondition(shape.reduce(1, *) == scalars.count, "shape \(shape) does not hold \(scalars.count) scalars")
        self.shape = shape
        self.scalars = scalars
    }

    public init(zeros shape: [Int]) {
        self.init(shape: shape, scalars: [Float](repeating: 0, count: shape.reduce(1, *)))
    }

    public var count: Int { scalars.count }

    /// Element-wise combination of two tensors of one shape.
    public func zip(_ other: Tensor, _ combine: (Float, Float) -> Float) -> Tensor {
        precondition(shape == other.shape, "shapes \(shape) and \(other.shape) differ")
        return Tensor(shape: shape, scalars: Swift.zip(scalars, other.scalars).map(combine))
    }

    public func map(_ transform: (Float) -> Float) -> Tensor {
        Tensor(shape: shape, scalars: scalars.map(transform))
    }

    /// Item `index` of the leading (batch) dimension, keeping a batch of 1.
    public func batchItem(_ index: Int) -> Tensor {
        let size = count / shape[0]
        return Tensor(shape: [1] + shape.dropFirst(), scalars: Array(scalars[(index * size)..<((index + 1) * size)]))
    }

    /// Stacks tensors of shape [1, ...] along the batch dimension.
    public static func concatenateBatch(_ items: [Tensor]) -> Tensor {
        let rest = Array(items[0].shape.dropFirst())
        return Tensor(shape: [items.count] + rest, scalars: items.flatMap(\.scalars))
    }

    /// Joins (1, S_i, C) text embeddings along the sequence into (1, sum S_i, C): the prompt windows side by
    /// side, as the Python pipeline concatenates them (axis 1) before the UNet layout.
    public static func concatenateSequence(_ items: [Tensor]) -> Tensor {
        let channels = items[0].shape[2]
        precondition(items.allSatisfy { $0.shape.count == 3 && $0.shape[0] == 1 && $0.shape[2] == channels },
                     "sequence concatenation takes (1, S, \(channels)) tensors")
        return Tensor(shape: [1, items.map { $0.shape[1] }.reduce(0, +), channels], scalars: items.flatMap(\.scalars))
    }

    /// Joins (1, S, C_i) text embeddings on channels into (1, S, sum C_i): SDXL's two encoders' states side by
    /// side, as the Python pipeline concatenates them (last axis).
    public static func concatenateChannels(_ items: [Tensor]) -> Tensor {
        let length = items[0].shape[1]
        precondition(items.allSatisfy { $0.shape.count == 3 && $0.shape[0] == 1 && $0.shape[1] == length },
                     "channel concatenation takes (1, \(length), C) tensors")
        var scalars: [Float] = []
        scalars.reserveCapacity(items.map(\.count).reduce(0, +))
        for s in 0..<length {
            for item in items {
                let channels = item.shape[2]
                scalars += item.scalars[(s * channels)..<((s + 1) * channels)]
            }
        }
        return Tensor(shape: [1, length, items.map { $0.shape[2] }.reduce(0, +)], scalars: scalars)
    }

    /// (B, S, C) text embeddings -> (B, C, 1, S), the layout the converted UNet takes (Python's
    /// components.text_to_unet_layout).
    public func unetTextLayout() -> Tensor {
        let (batch, length, channels) = (shape[0], shape[1], shape[2])
        var out = [Float](repeating: 0, count: count)
        for b in 0..<batch {
            for s in 0..<length {
                for c in 0..<channels {
                    out[(b * channels + c) * length + s] = scalars[(b * length + s) * channels + c]
                }
            }
        }
        return Tensor(shape: [batch, channels, 1, length], scalars: out)
    }
}
