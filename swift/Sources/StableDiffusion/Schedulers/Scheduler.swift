import Foundation

public enum PredictionType: String, CaseIterable, Sendable {
    case epsilon
    case vPrediction = "v_prediction"
}

public enum SchedulerKind: String, CaseIterable, Sendable {
    case pndm
    /// DPM-Solver++ multistep, second order.
    case dpmpp

    public func make(stepCount: Int, predictionType: PredictionType = .epsilon) -> any Scheduler {
        switch self {
        case .pndm: return PNDMScheduler(stepCount: stepCount, predictionType: predictionType)
        case .dpmpp: return DPMSolverMultistepScheduler(stepCount: stepCount, predictionType: predictionType)
        }
    }
}

/// A sampler as the loop drives it: the timesteps to run, one step per model output, and the noise
/// schedule for img2img starts. Steps are taken in order; `startIndex` skips the first ones.
public protocol Scheduler {
    var timesteps: [Int] { get }
    /// How many timesteps one inference step spans (diffusers' `order`).
    var order: Int { get }
    /// Index into `timesteps` of the next step; set it before the first step to start later.
    var startIndex: Int { get set }
    mutating func step(output: Tensor, timestep: Int, sample: Tensor) -> Tensor
    /// `sample` noised to `timestep`, as the scheduler's diffusers `add_noise` does.
    func addNoise(original: Tensor, noise: Tensor, timestep: Int) -> Tensor
    /// (sqrt(alpha_cumprod), sqrt(1 - alpha_cumprod)) at `timestep`: what the VAE encoder model
    /// takes to noise its own latents.
    func noiseCoefficients(timestep: Int) -> (signal: Float, noise: Float)
}

/// SD 1.x's training schedule: "scaled_linear" betas from 0.00085 to 0.012 over 1000 steps.
public struct NoiseSchedule: Sendable {
    public static let stableDiffusion = NoiseSchedule()

    public let trainStepCount: Int
    public let alphasCumprod: [Float]

    public init(trainStepCount: Int = 1000, betaStart: Double = 0.00085, betaEnd: Double = 0.012) {
        self.trainStepCount = trainStepCount
        let roots = Self.linspace(Float(betaStart.squareRoot()), Float(betaEnd.squareRoot()), count: trainStepCount)
        var product = 1.0
        alphasCumprod = roots.map { root in
            product *= Double(1 - root * root)
            return Float(product)
        }
    }

    /// torch.linspace for float32: each point is one fused multiply-add from the nearer end, and
    /// torch's cumprod accumulates in double, which is what the initializer does.
    static func linspace(_ start: Float, _ end: Float, count: Int) -> [Float] {
        guard count > 1 else { return [start] }
        let step = (end - start) / Float(count - 1)
        return (0..<count).map { i in
            i < count / 2 ? start.addingProduct(step, Float(i)) : end.addingProduct(-step, Float(count - 1 - i))
        }
    }
}

extension Tensor {
    /// a * self + b * other, rounding like torch's `a * x + b * y` on float32 tensors.
    func scaledSum(_ a: Float, _ other: Tensor, _ b: Float) -> Tensor {
        zip(other) { a * $0 + b * $1 }
    }
}
