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
}
