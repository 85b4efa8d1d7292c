import Foundation

public enum PredictionType: String, CaseIterable, Sendable {
    case epsilon
    case vPrediction = "v_prediction"
}

public enum SchedulerKind: String, CaseIterable, Sendable {
    case pndm
    /// DPM-Solver++ multistep, second order (add Karras sigmas with `SchedulerConfig.useKarrasSigmas`).
    case dpmpp
    /// Euler's method on the sigma ODE (diffusers' `EulerDiscreteScheduler`).
    case euler
    /// Euler with fresh noise each step (diffusers' `EulerAncestralDiscreteScheduler`).
    case eulerAncestral = "euler_a"
    /// DDIM with eta 0: deterministic.
    case ddim
    /// Linear multistep, order 4, on the sigma ODE (diffusers' `LMSDiscreteScheduler`).
    case lms
    /// Latent consistency (diffusers' `LCMScheduler`): for LCM-distilled UNets, 2 to 8 steps.
    case lcm

    /// The scheduler for `stepCount` steps on the model's configuration.
    public func make(stepCount: Int, config: SchedulerConfig) -> any Scheduler {
        switch self {
        case .pndm: return PNDMScheduler(stepCount: stepCount, config: config)
        case .dpmpp: return DPMSolverMultistepScheduler(stepCount: stepCount, config: config)
        case .euler: return EulerScheduler(stepCount: stepCount, config: config, ancestral: false)
        case .eulerAncestral: return EulerScheduler(stepCount: stepCount, config: config, ancestral: true)
        case .ddim: return DDIMScheduler(stepCount: stepCount, config: config)
        case .lcm: return LCMScheduler(stepCount: stepCount, config: config)
        case .lms: return LMSScheduler(stepCount: stepCount, config: config)
        }
    }

    /// SD 1.x's configuration with another prediction type.
    public func make(stepCount: Int, predictionType: PredictionType = .epsilon) -> any Scheduler {
        var config = SchedulerConfig.stableDiffusion
        config.predictionType = predictionType
        return make(stepCount: stepCount, config: config)
    }
}

/// A sampler as the loop drives it: the timesteps to run, one step per model output, and the noise
/// schedule for img2img starts. Steps are taken in order; `startIndex` skips the first ones.
///
/// Timesteps are `Double`: sigma-based schedulers (Euler) with "linspace" spacing run at fractional
/// timesteps, as float32 values that the UNet receives unchanged; the others' are whole numbers.
public protocol Scheduler {
    var timesteps: [Double] { get }
    /// How many timesteps one inference step spans (diffusers' `order`).
    var order: Int { get }
    /// Index into `timesteps` of the next step; set it before the first step to start later.
    var startIndex: Int { get set }
    /// What text-to-image multiplies the first noise by (diffusers' `init_noise_sigma`).
    var initNoiseSigma: Float { get }
    /// Whether the next `step` needs `noise` (a standard normal tensor of the sample's shape).
    var needsNoise: Bool { get }
    /// The UNet's input for the next step (diffusers' `scale_model_input`).
    func scaleModelInput(_ sample: Tensor, timestep: Double) -> Tensor
    mutating func step(output: Tensor, timestep: Double, sample: Tensor, noise: Tensor?) -> Tensor
    /// `sample` noised to `timestep`, as the scheduler's diffusers `add_noise` does.
    func addNoise(original: Tensor, noise: Tensor, timestep: Double) -> Tensor
    /// The (signal, noise) factors of `add_noise` at `timestep`: (sqrt(alpha_cumprod),
    /// sqrt(1 - alpha_cumprod)) for the variance-preserving schedulers, (1, sigma) for Euler. The
    /// VAE encoder model takes them to noise its own latents.
    func noiseCoefficients(timestep: Double) -> (signal: Float, noise: Float)
}

extension Scheduler {
    public var initNoiseSigma: Float { 1 }
    public var needsNoise: Bool { false }
    public func scaleModelInput(_ sample: Tensor, timestep: Double) -> Tensor { sample }

    public mutating func step(output: Tensor, timestep: Double, sample: Tensor) -> Tensor {
        step(output: output, timestep: timestep, sample: sample, noise: nil)
    }

    public func addNoise(original: Tensor, noise: Tensor, timestep: Double) -> Tensor {
        let (signal, noiseScale) = noiseCoefficients(timestep: timestep)
        return original.scaledSum(signal, noise, noiseScale)
    }
}

/// The training schedule: betas over `trainStepCount` steps and their cumulative alpha products.
public struct NoiseSchedule: Sendable {
    /// SD 1.x's: "scaled_linear" betas from 0.00085 to 0.012 over 1000 steps.
    public static let stableDiffusion = NoiseSchedule()

    public let trainStepCount: Int
    public let alphasCumprod: [Float]

    public init(trainStepCount: Int = 1000, betaStart: Double = 0.00085, betaEnd: Double = 0.012,
                betaSchedule: BetaSchedule = .scaledLinear) {
        self.trainStepCount = trainStepCount
        let betas: [Float]
        switch betaSchedule {
        case .scaledLinear:
            betas = Self.linspace(Float(betaStart.squareRoot()), Float(betaEnd.squareRoot()), count: trainStepCount)
                .map { $0 * $0 }
        case .linear:
            betas = Self.linspace(Float(betaStart), Float(betaEnd), count: trainStepCount)
        case .squaredCosine:
            betas = Self.cosineBetas(count: trainStepCount)
        }
        var product = 1.0
        alphasCumprod = betas.map { beta in
            product *= Double(1 - beta)
            return Float(product)
        }
    }

    /// sqrt((1 - alpha_cumprod) / alpha_cumprod) per training step, in float32 as torch computes it.
    public var sigmas: [Float] { alphasCumprod.map { ((1 - $0) / $0).squareRoot() } }

    /// torch.linspace for float32: each point is one fused multiply-add from the nearer end, and
    /// torch's cumprod accumulates in double, which is what the initializer does.
    static func linspace(_ start: Float, _ end: Float, count: Int) -> [Float] {
        guard count > 1 else { return [start] }
        let step = (end - start) / Float(count - 1)
        return (0..<count).map { i in
            i < count / 2 ? start.addingProduct(step, Float(i)) : end.addingProduct(-step, Float(count - 1 - i))
        }
    }

    /// diffusers' `betas_for_alpha_bar` with the cosine alpha bar ("squaredcos_cap_v2"), in double.
    static func cosineBetas(count: Int) -> [Float] {
        func alphaBar(_ t: Double) -> Double {
            let c = cos((t + 0.008) / 1.008 * Double.pi / 2)
            return c * c
        }
        return (0..<count).map { i in
            let t1 = Double(i) / Double(count), t2 = Double(i + 1) / Double(count)
            return Float(min(1 - alphaBar(t2) / alphaBar(t1), 0.999))
        }
    }
}

extension Tensor {
    /// a * self + b * other, rounding like torch's `a * x + b * y` on float32 tensors.
    func scaledSum(_ a: Float, _ other: Tensor, _ b: Float) -> Tensor {
        zip(other) { a * $0 + b * $1 }
    }
}
