// A stand-in for Apple's Core ML, for Linux only and for type-checking only (Package.swift declares
// it under `#if os(Linux)`): it declares exactly the Core ML members that
// Sources/StableDiffusion/CoreML/*.swift use, with the names, labels, argument and result types,
// optionality and throwing of Apple's documentation, so that `swift build` on Linux compiles those
// wrappers (target CoreMLTypeCheck) and fails on a misspelled or mistyped call. Nothing here runs:
// every body traps. Each declaration names the documentation page it copies, under
// https://developer.apple.com/documentation/coreml/ . When the wrappers use a new Core ML member,
// add it here from its page, and nothing else.
import Foundation

/// .../mlcomputeunits — `enum MLComputeUnits : Int, @unchecked Sendable`
public enum MLComputeUnits: Int, @unchecked Sendable {
    /// .../mlcomputeunits/cpuonly
    case cpuOnly = 0
    /// .../mlcomputeunits/cpuandgpu
    case cpuAndGPU = 1
    /// .../mlcomputeunits/all
    case all = 2
    /// .../mlcomputeunits/cpuandneuralengine
    case cpuAndNeuralEngine = 3
}

/// .../mlmodelconfiguration — `class MLModelConfiguration : NSObject`
open class MLModelConfiguration: NSObject {
    /// .../mlmodelconfiguration/computeunits — `var computeUnits: MLComputeUnits { get set }`
    open var computeUnits: MLComputeUnits = .all
    public override init() { super.init() }
}

/// .../mlmodel — `class MLModel : NSObject`
open class MLModel: NSObject {
    /// .../mlmodel/init(contentsof:configuration:) — `convenience init(contentsOf url: URL, configuration: MLModelConfiguration) throws`
    public convenience init(contentsOf url: URL, configuration: MLModelConfiguration) throws { fatalError("stand-in") }

    /// .../mlmodel/compilemodel(at:)-6442s — `class func compileModel(at modelURL: URL) throws -> URL`
    open class func compileModel(at modelURL: URL) throws -> URL { fatalError("stand-in") }

    /// .../mlmodel/modeldescription — `var modelDescription: MLModelDescription { get }`
    open var modelDescription: MLModelDescription { fatalError("stand-in") }

    /// .../mlmodel/prediction(from:) — `func prediction(from input: any MLFeatureProvider) throws -> any MLFeatureProvider`
    open func prediction(from input: any MLFeatureProvider) throws -> any MLFeatureProvider { fatalError("stand-in") }
}

/// .../mlmodeldescription — `class MLModelDescription : NSObject`
open class MLModelDescription: NSObject {
    /// .../mlmodeldescription/inputdescriptionsbyname — `var inputDescriptionsByName: [String : MLFeatureDescription] { get }`
    open var inputDescriptionsByName: [String: MLFeatureDescription] { fatalError("stand-in") }
    /// .../mlmodeldescription/outputdescriptionsbyname — `var outputDescriptionsByName: [String : MLFeatureDescription] { get }`
    open var outputDescriptionsByName: [String: MLFeatureDescription] { fatalError("stand-in") }
}

/// .../mlfeaturedescription — `class MLFeatureDescription : NSObject`
open class MLFeatureDescription: NSObject {
    /// .../mlfeaturedescription/multiarrayconstraint — `var multiArrayConstraint: MLMultiArrayConstraint? { get }`
    open var multiArrayConstraint: MLMultiArrayConstraint? { fatalError("stand-in") }
}

/// .../mlmultiarrayconstraint — `class MLMultiArrayConstraint : NSObject`
open class MLMultiArrayConstraint: NSObject {
    /// .../mlmultiarrayconstraint/shape — `var shape: [NSNumber] { get }`
    open var shape: [NSNumber] { fatalError("stand-in") }
}

/// .../mlfeatureprovider — `protocol MLFeatureProvider`
public protocol MLFeatureProvider {
    /// .../mlfeatureprovider/featurenames — `var featureNames: Set<String> { get }`
    var featureNames: Set<String> { get }
    /// .../mlfeatureprovider/featurevalue(for:) — `func featureValue(for featureName: String) -> MLFeatureValue?`
    func featureValue(for featureName: String) -> MLFeatureValue?
}

/// .../mldictionaryfeatureprovider — `class MLDictionaryFeatureProvider : NSObject`
open class MLDictionaryFeatureProvider: NSObject, MLFeatureProvider {
    /// .../mldictionaryfeatureprovider/init(dictionary:) — `init(dictionary: [String : Any]) throws`
    public init(dictionary: [String: Any]) throws { fatalError("stand-in") }
    open var featureNames: Set<String> { fatalError("stand-in") }
    open func featureValue(for featureName: String) -> MLFeatureValue? { fatalError("stand-in") }
}

/// .../mlfeaturevalue — `class MLFeatureValue : NSObject`
open class MLFeatureValue: NSObject {
    /// .../mlfeaturevalue/multiarrayvalue — `var multiArrayValue: MLMultiArray? { get }`
    open var multiArrayValue: MLMultiArray? { fatalError("stand-in") }
}

/// .../mlmultiarray — `class MLMultiArray : NSObject`
open class MLMultiArray: NSObject {
    /// .../mlmultiarray/init(_:)-5vr6x — `convenience init<Scalar>(_ shapedArray: MLShapedArray<Scalar>) where Scalar : MLShapedArrayScalar`
    public convenience init<Scalar>(_ shapedArray: MLShapedArray<Scalar>) where Scalar: MLShapedArrayScalar {
        fatalError("stand-in")
    }
}

/// .../mlshapedarrayscalar — `protocol MLShapedArrayScalar`; Float is one (.../mlshapedarrayscalar#conforming-types).
public protocol MLShapedArrayScalar {}
extension Float: MLShapedArrayScalar {}

/// .../mlshapedarray — `struct MLShapedArray<Scalar> where Scalar : MLShapedArrayScalar`
public struct MLShapedArray<Scalar> where Scalar: MLShapedArrayScalar {
    /// .../mlshapedarray/init(scalars:shape:) — `init<S>(scalars: S, shape: [Int]) where S : Sequence, Scalar == S.Element`
    public init<S>(scalars: S, shape: [Int]) where S: Sequence, Scalar == S.Element { fatalError("stand-in") }
    /// .../mlshapedarray/shape — `var shape: [Int] { get }`
    public var shape: [Int] { fatalError("stand-in") }
    /// .../mlshapedarray/scalars — `var scalars: [Scalar] { get set }`
    public var scalars: [Scalar] {
        get { fatalError("stand-in") }
        set { fatalError("stand-in") }
    }
}

extension MLShapedArray where Scalar == Float {
    /// .../mlshapedarray/init(converting:)-3u8rg — `init(converting multiArray: MLMultiArray)` (Scalar == Float)
    public init(converting multiArray: MLMultiArray) { fatalError("stand-in") }
}
