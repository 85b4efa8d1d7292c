// On Linux only the CoreMLTypeCheck target compiles this file, against the Core ML stand-in
// (Package.swift); the library there must not, even though the stand-in module is importable.
#if canImport(CoreML) && (!os(Linux) || COREML_STAND_IN)
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

    /// Other models of the group are unloaded under this model's lock; the pipeline drives models
    /// from one thread, so the locks only guard against concurrent use of one model.
    private func loadedModel() throws -> MLModel {
        lock.lock()
        defer { lock.unlock() }
        if let model { return model }
        group?.willLoad(stage: stage)
        let loaded = try MLModel(contentsOf: try compiledURL(), configuration: configuration)
        model = loaded
        return loaded
    }

    private var compiled: URL?

    /// Packages are compiled once per run into a temporary folder; compiled models load as they are.
    private func compiledURL() throws -> URL {
        guard url.pathExtension == "mlpackage" else { return url }
        if let compiled { return compiled }
        let result = try MLModel.compileModel(at: url)
        compiled = result
        return result
    }

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
