import Foundation

public enum BetaSchedule: String, CaseIterable, Sendable {
    case linear
    case scaledLinear = "scaled_linear"
    case squaredCosine = "squaredcos_cap_v2"
}

/// How inference timesteps are picked from the training steps (diffusers' `timestep_spacing`,
/// table 2 of arXiv:2305.08891).
public enum TimestepSpacing: String, CaseIterable, Sendable {
    /// Evenly from 0 to the last training step, both ends included.
    case linspace
    /// Multiples of the step ratio from 0, plus `steps_offset`.
    case leading
    /// Multiples of the step ratio down from the last training step.
    case trailing
}

/// A model's scheduler settings, as diffusers keeps them in `scheduler/scheduler_config.json`; the
/// converter copies that file into the bundle's Resources. Any scheduler kind can run on it, as
/// `SomeScheduler.from_config(pipeline.scheduler.config)` does in diffusers.
public struct SchedulerConfig: Equatable, Sendable {
    /// The file name in a Resources folder.
    public static let fileName = "scheduler_config.json"

    /// SD 1.x's configuration: what bundles without a scheduler_config.json get.
    public static let stableDiffusion = SchedulerConfig()

    public var trainStepCount = 1000
    public var betaStart = 0.00085
    public var betaEnd = 0.012
    public var betaSchedule = BetaSchedule.scaledLinear
    public var predictionType = PredictionType.epsilon
    /// nil: each scheduler's diffusers default ("leading" for PNDM and DDIM, "linspace" for the others).
    public var timestepSpacing: TimestepSpacing?
    public var stepsOffset = 1
    /// PNDM and DDIM: whether the step past the end has alpha_cumprod 1 (else the first training
    /// step's); nil: the class default (PNDM false, DDIM true), as `from_config` gives it.
    public var setAlphaToOne: Bool? = false
    /// DDIM: clamp the predicted x0 to [-clipSampleRange, clipSampleRange]; nil: DDIM's default, true.
    public var clipSample: Bool? = false
    public var clipSampleRange = 1.0
    /// DPM-Solver++, Euler and LMS: sigmas spaced as in Karras et al. (rho 7) instead of by timestep
    /// (Euler ancestral, DDIM, PNDM and LCM have no such option in diffusers and ignore it).
    public var useKarrasSigmas = false
    /// LCM: the step count of the distillation schedule its timesteps are picked from.
    public var originalInferenceSteps = 50
    /// LCM: the timestep scale of its boundary-condition scalings.
    public var timestepScaling = 10.0

    public init() {}

    public var noiseSchedule: NoiseSchedule {
        if self == .stableDiffusion { return .stableDiffusion }
        return NoiseSchedule(trainStepCount: trainStepCount, betaStart: betaStart, betaEnd: betaEnd, betaSchedule: betaSchedule)
    }

    func spacing(default fallback: TimestepSpacing) -> TimestepSpacing { timestepSpacing ?? fallback }

    public struct Unsupported: Error, CustomStringConvertible {
        public let description: String
    }

    /// Reads a diffusers scheduler_config.json. Keys it leaves out take diffusers' class defaults
    /// (beta 0.0001...0.02 "linear", epsilon, steps_offset 0), as `from_config` would.
    public init(json data: Data) throws {
        guard let object = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw Unsupported(description: "\(Self.fileName) is not a JSON object")
        }
        self.init()
        func number(_ key: String) -> Double? { (object[key] as? NSNumber)?.doubleValue }
        func text<T: RawRepresentable>(_ key: String, _ type: T.Type) throws -> T? where T.RawValue == String {
            guard let value = object[key], !(value is NSNull) else { return nil }
            guard let name = value as? String, let parsed = T(rawValue: name) else {
                throw Unsupported(description: "\(Self.fileName): unsupported \(key) \(value)")
            }
            return parsed
        }
        if let betas = object["trained_betas"], !(betas is NSNull) {
            throw Unsupported(description: "\(Self.fileName): trained_betas are not supported")
        }
        trainStepCount = number("num_train_timesteps").map { Int($0) } ?? 1000
        betaStart = number("beta_start") ?? 0.0001
        betaEnd = number("beta_end") ?? 0.02
        betaSchedule = try text("beta_schedule", BetaSchedule.self) ?? .linear
        predictionType = try text("prediction_type", PredictionType.self) ?? .epsilon
        timestepSpacing = try text("timestep_spacing", TimestepSpacing.self)
        stepsOffset = number("steps_offset").map { Int($0) } ?? 0
        setAlphaToOne = object["set_alpha_to_one"] as? Bool
        clipSample = object["clip_sample"] as? Bool
        clipSampleRange = number("clip_sample_range") ?? 1
        useKarrasSigmas = (object["use_karras_sigmas"] as? Bool) ?? false
        originalInferenceSteps = number("original_inference_steps").map { Int($0) } ?? 50
        timestepScaling = number("timestep_scaling") ?? 10
        if originalInferenceSteps < 1 { throw Unsupported(description: "\(Self.fileName): original_inference_steps \(originalInferenceSteps)") }
        if trainStepCount < 2 { throw Unsupported(description: "\(Self.fileName): num_train_timesteps \(trainStepCount)") }
    }

    /// The folder's scheduler_config.json, or SD 1.x's configuration when it has none (older bundles).
    public static func load(folder: URL) throws -> SchedulerConfig {
        let url = folder.appendingPathComponent(fileName)
        guard FileManager.default.fileExists(atPath: url.path) else { return .stableDiffusion }
        return try SchedulerConfig(json: Data(contentsOf: url))
    }
}

/// NumPy's array constructors as diffusers' `set_timesteps` calls them, in double.
enum NumPy {
    /// np.linspace(start, stop, count): i * step + start, the last point exactly `stop`.
    static func linspace(_ start: Double, _ stop: Double, count: Int) -> [Double] {
        guard count > 1 else { return count == 1 ? [start] : [] }
        let step = (stop - start) / Double(count - 1)
        return (0..<count).map { $0 == count - 1 ? stop : Double($0) * step + start }
    }

    /// np.arange(start, stop, step) for a negative float step: ceil((stop - start) / step) points,
    /// start + i * delta where delta is (start + step) - start, as NumPy fills it.
    static func arange(_ start: Double, _ stop: Double, _ step: Double) -> [Double] {
        let count = max(Int(((stop - start) / step).rounded(.up)), 0)
        let delta = (start + step) - start
        return (0..<count).map { start + Double($0) * delta }
    }

    /// np.interp(x, arange(values.count), values) in double.
    static func interp(_ x: Double, _ values: [Float]) -> Double {
        if x <= 0 { return Double(values[0]) }
        let last = values.count - 1
        if x >= Double(last) { return Double(values[last]) }
        let j = Int(x.rounded(.down))
        let slope = Double(values[j + 1]) - Double(values[j])
        return slope * (x - Double(j)) + Double(values[j])
    }

    /// np.round: half to even.
    static func round(_ x: Double) -> Double { x.rounded(.toNearestOrEven) }
}

extension TimestepSpacing {
    /// Whole-number timesteps, largest first, as DDIM and DPM-Solver build them; DPM-Solver asks for
    /// `stepCount + 1` points and drops the last (`dropLast`) for linspace and leading.
    func integerTimesteps(stepCount n: Int, trainStepCount: Int, stepsOffset: Int, dropLast: Bool) -> [Int] {
        let points = dropLast ? n + 1 : n
        switch self {
        case .linspace:
            let values = NumPy.linspace(0, Double(trainStepCount - 1), count: points).map { Int(NumPy.round($0)) }
            return Array(values.reversed().prefix(n))
        case .leading:
            let ratio = trainStepCount / points
            return Array((0..<points).reversed().prefix(n)).map { $0 * ratio + stepsOffset }
        case .trailing:
            let ratio = Double(trainStepCount) / Double(n)
            return NumPy.arange(Double(trainStepCount), 0, -ratio).map { Int(NumPy.round($0)) - 1 }
        }
    }
}
