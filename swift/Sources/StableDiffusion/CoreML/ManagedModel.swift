#if canImport(CoreML)
import CoreML
import Foundation

extension ComputeUnitChoice {
    public var coreML: MLComputeUnits {
        switch self {
        case .all: return .all
        case .cpuOnly: return .cpuOnly
        case .cpuAndGPU: return .cpuAndGPU
        case .cpuAndNeuralEngine: return .cpuAndNeuralEngine
        }
    }
}

/// One compiled model, loaded on first use and kept, unless a residency group unloads it.
public final class ManagedModel: ResidentModel, @unchecked Sendable {
    public let url: URL
    let configuration: MLModelConfiguration
    let stage: String
    weak var group: ResidencyGroup?
    private var model: MLModel?
    private let lock = NSLock()

    public init(url: URL, computeUnits: MLComputeUnits, stage: String = "", group: ResidencyGroup? = nil) {
        self.url = url
        let configuration = MLModelConfiguration()
        configuration.computeUnits = computeUnits
        self.configuration = configuration
        self.stage = stage
        self.group = group
        group?.register(self, stage: stage)
    }

    public func perform<R>(_ body: (MLModel) throws -> R) throws -> R {
        let loaded = try loadedModel()
        return try body(loaded)
    }

    private func loadedModel() throws -> MLModel {
        lock.lock()
        let current = model
        lock.unlock()
        if let current { return current }
        group?.willLoad(stage: stage)
        let loaded = try MLModel(contentsOf: url, configuration: configuration)
        lock.lock()
        model = loaded
        lock.unlock()
        return loaded
    }

    /// Loads now, so the first generation does not pay for compilation on the device.
    public func load() throws { try perform { _ in } }

    public func unload() {
        lock.lock()
        model = nil
        lock.unlock()
    }

    public func inputShape(_ name: String) throws -> [Int] {
        try perform { model in
            guard let constraint = model.modelDescription.inputDescriptionsByName[name]?.multiArrayConstraint else {
                throw CoreMLModelError.missingFeature(url.lastPathComponent, name)
            }
            return constraint.shape.map(\.intValue)
        }
    }

    /// Runs the model on named tensors and returns the named outputs as tensors.
    public func predict(_ inputs: [String: Tensor], outputs: [String]) throws -> [String: Tensor] {
        let features = try MLDictionaryFeatureProvider(dictionary: inputs.mapValues { $0.multiArray() })
        let result = try perform { try $0.prediction(from: features) }
        var tensors: [String: Tensor] = [:]
        for name in outputs {
            guard let array = result.featureValue(for: name)?.multiArrayValue else {
                throw CoreMLModelError.missingFeature(url.lastPathComponent, name)
            }
            tensors[name] = Tensor(array)
        }
        return tensors
    }
}

public enum CoreMLModelError: Error, CustomStringConvertible {
    case missingFeature(String, String)
    case badShape(String, [Int])

    public var description: String {
        switch self {
        case .missingFeature(let model, let name): return "\(model) has no feature named \(name)"
        case .badShape(let what, let shape): return "\(what) has unexpected shape \(shape)"
        }
    }
}

extension Tensor {
    /// Converts whatever the model returned (float16 or float32, any strides) to dense float32.
    init(_ array: MLMultiArray) {
        let shaped = MLShapedArray<Float>(converting: array)
        self.init(shape: shaped.shape, scalars: shaped.scalars)
    }

    func multiArray() -> MLMultiArray {
        MLMultiArray(MLShapedArray<Float>(scalars: scalars, shape: shape))
    }

    /// The same scalars under another shape with as many elements (a model's declared layout).
    func reshaped(_ newShape: [Int]) -> Tensor {
        Tensor(shape: newShape, scalars: scalars)
    }
}
#endif
