import Foundation

/// diffusers' `EulerDiscreteScheduler` (`ancestral: false`) and `EulerAncestralDiscreteScheduler`
/// (`ancestral: true`): Euler steps on the ODE in sigma = sqrt((1 - alpha_cumprod) / alpha_cumprod),
/// the sample kept at scale sigma (so the UNet's input is divided by sqrt(sigma^2 + 1)). The ancestral
/// variant steps down to sigma_down and adds sigma_up of fresh noise; Euler runs with s_churn 0.
///
/// Timesteps follow the config's spacing ("linspace" by default, which gives fractional float32
/// timesteps); sigmas are the training sigmas interpolated at them, then 0.
public struct EulerScheduler: Scheduler {
    public let predictionType: PredictionType
    public let isAncestral: Bool
    public let timesteps: [Double]
    /// sigma per timestep, then 0 for the end.
    public let sigmas: [Float]
    public let initNoiseSigma: Float
    public let order = 1
    public var startIndex = 0 {
        didSet { stepIndex = startIndex }
    }

    private var stepIndex = 0

    public init(stepCount: Int, config: SchedulerConfig = .stableDiffusion, ancestral: Bool = false) {
        predictionType = config.predictionType
        isAncestral = ancestral
        var settings = config
        if ancestral { settings.useKarrasSigmas = false }  // diffusers' Euler ancestral has no Karras option
        (timesteps, sigmas, initNoiseSigma) = SigmaSchedule.interpolated(stepCount: stepCount, config: settings)
    }

    public var needsNoise: Bool { isAncestral }

    public func scaleModelInput(_ sample: Tensor, timestep: Double) -> Tensor {
        SigmaSchedule.scaledInput(sample, sigma: sigmas[stepIndex])
    }

    public mutating func step(output: Tensor, timestep: Double, sample: Tensor, noise: Tensor?) -> Tensor {
        let sigma = sigmas[stepIndex], next = sigmas[stepIndex + 1]
        let x0 = SigmaSchedule.dataPrediction(output, sample: sample, sigma: sigma, type: predictionType)
        let derivative = sample.zip(x0) { ($0 - $1) / sigma }
        stepIndex += 1
        guard isAncestral else {
            let dt = next - sigma
            return sample.zip(derivative) { $0 + $1 * dt }
        }
        let from2 = sigma * sigma, to2 = next * next
        let up = (to2 * (from2 - to2) / from2).squareRoot()
        let down = (to2 - up * up).squareRoot()
        let dt = down - sigma
        let moved = sample.zip(derivative) { $0 + $1 * dt }
        guard let noise else { preconditionFailure("Euler ancestral steps need noise") }
        return moved.zip(noise) { $0 + $1 * up }
    }

    public func noiseCoefficients(timestep: Double) -> (signal: Float, noise: Float) {
        let index = timesteps.firstIndex(of: timestep) ?? startIndex
        return (1, sigmas[index])
    }
}

/// Timestep and sigma helpers shared by the sigma-based schedulers.
enum SigmaSchedule {
    /// Euler's and LMS's schedule: timesteps by the config's spacing ("linspace" by default), the
    /// training sigmas interpolated at them (respaced as Karras et al.'s with `useKarrasSigmas`)
    /// then 0, and init_noise_sigma (sigma_max, or
    /// sqrt(sigma_max^2 + 1) for "leading", as diffusers has it).
    static func interpolated(stepCount: Int, config: SchedulerConfig) -> (timesteps: [Double], sigmas: [Float], initNoiseSigma: Float) {
        let schedule = config.noiseSchedule
        let spacing = config.spacing(default: .linspace)
        let steps = floatTimesteps(spacing, stepCount: stepCount, trainStepCount: schedule.trainStepCount,
                                   stepsOffset: config.stepsOffset)
        let trainSigmas = schedule.sigmas
        var timesteps = steps.map(Double.init)
        var interpolated = steps.map { NumPy.interp(Double($0), trainSigmas) }
        if config.useKarrasSigmas {
            // Karras spacing between the interpolated ends; timesteps follow the sigmas (fractional).
            interpolated = karras(sigmaMin: interpolated.last!, sigmaMax: interpolated[0], count: stepCount)
            let logSigmas = trainSigmas.map { log($0) }
            timesteps = interpolated.map { timestep(sigma: $0, logSigmas: logSigmas) }.map { Double(Float($0)) }
        }
        let sigmas = interpolated.map { Float($0) } + [0]
        let largest = sigmas.max() ?? 0
        return (timesteps, sigmas, spacing == .leading ? (largest * largest + 1).squareRoot() : largest)
    }

    /// x0 from a model output at noise level sigma (sample kept at scale sigma).
    static func dataPrediction(_ output: Tensor, sample: Tensor, sigma: Float, type: PredictionType) -> Tensor {
        switch type {
        case .epsilon: return sample.zip(output) { $0 - sigma * $1 }
        case .vPrediction:
            let outputCoefficient = -sigma / (sigma * sigma + 1).squareRoot()
            let sampleDivisor = sigma * sigma + 1
            return output.zip(sample) { $0 * outputCoefficient + $1 / sampleDivisor }
        }
    }

    /// The UNet input at noise level sigma: sample / sqrt(sigma^2 + 1).
    static func scaledInput(_ sample: Tensor, sigma: Float) -> Tensor {
        let scale = (sigma * sigma + 1).squareRoot()
        return sample.map { $0 / scale }
    }
    /// Euler's timesteps, largest first, in float32 as diffusers builds them.
    static func floatTimesteps(_ spacing: TimestepSpacing, stepCount n: Int, trainStepCount: Int,
                               stepsOffset: Int) -> [Float] {
        switch spacing {
        case .linspace:
            return NumPy.linspace(0, Double(trainStepCount - 1), count: n).reversed().map { Float($0) }
        case .leading:
            let ratio = trainStepCount / n
            return (0..<n).reversed().map { Float($0 * ratio) + Float(stepsOffset) }
        case .trailing:
            let ratio = Double(trainStepCount) / Double(n)
            return NumPy.arange(Double(trainStepCount), 0, -ratio).map { Float(NumPy.round($0)) - 1 }
        }
    }

    /// Karras et al.'s sigmas (rho 7) from sigmaMax down to sigmaMin, in double.
    static func karras(sigmaMin: Double, sigmaMax: Double, count: Int) -> [Double] {
        let rho = 7.0
        let minInverse = pow(sigmaMin, 1 / rho), maxInverse = pow(sigmaMax, 1 / rho)
        return NumPy.linspace(0, 1, count: count).map { pow(maxInverse + $0 * (minInverse - maxInverse), rho) }
    }

    /// The fractional training timestep whose sigma is `sigma`, interpolating log sigma linearly
    /// (diffusers' `_sigma_to_t`); `logSigmas` are the float32 logs of the training sigmas.
    static func timestep(sigma: Double, logSigmas: [Float]) -> Double {
        let logSigma = log(max(sigma, 1e-10))
        let lastLow = logSigmas.count - 2
        let low = min(max((logSigmas.lastIndex { logSigma - Double($0) >= 0 }) ?? 0, 0), lastLow)
        let lowLog = Double(logSigmas[low]), highLog = Double(logSigmas[low + 1])
        let w = min(max((lowLog - logSigma) / (lowLog - highLog), 0), 1)
        return (1 - w) * Double(low) + w * Double(low + 1)
    }
}
