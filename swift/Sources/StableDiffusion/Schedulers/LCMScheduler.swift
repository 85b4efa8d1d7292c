import Foundation

/// diffusers' `LCMScheduler` (latent consistency models): each step maps the sample to the
/// boundary-conditioned denoised estimate c_out x0 + c_skip x, then noises it afresh to the next
/// timestep (no noise after the last). Timesteps are an even pick from the distillation schedule of
/// `originalInferenceSteps` steps (k - 1, 2k - 1, ... with k = trainSteps / originalInferenceSteps),
/// whatever the spacing setting says. Meant for LCM-distilled UNets or LoRAs, in 2 to 8 steps.
public struct LCMScheduler: Scheduler {
    public let schedule: NoiseSchedule
    public let predictionType: PredictionType
    public let timesteps: [Double]
    public let order = 1
    public var startIndex = 0 {
        didSet { stepIndex = startIndex }
    }

    private var stepIndex = 0
    private let finalAlphaCumprod: Float
    private let timestepScaling: Float
    private let clipRange: Float?

    public init(stepCount: Int, config: SchedulerConfig = .stableDiffusion) {
        schedule = config.noiseSchedule
        predictionType = config.predictionType
        finalAlphaCumprod = (config.setAlphaToOne ?? true) ? 1 : schedule.alphasCumprod[0]
        timestepScaling = Float(config.timestepScaling)
        clipRange = (config.clipSample ?? false) ? Float(config.clipSampleRange) : nil
        let original = min(config.originalInferenceSteps, schedule.trainStepCount)
        let k = schedule.trainStepCount / original
        let distilled = (1...original).reversed().map { $0 * k - 1 }
        let n = min(stepCount, original)  // diffusers refuses more steps than the distillation had
        timesteps = NumPy.linspace(0, Double(distilled.count), count: n + 1).prefix(n)
            .map { Double(distilled[Int($0.rounded(.down))]) }
    }

    /// The next step adds noise unless it is the last.
    public var needsNoise: Bool { stepIndex < timesteps.count - 1 }

    public mutating func step(output: Tensor, timestep: Double, sample: Tensor, noise: Tensor?) -> Tensor {
        let t = Int(timestep)
        let isLast = stepIndex >= timesteps.count - 1
        let previous = isLast ? t : Int(timesteps[stepIndex + 1])
        stepIndex += 1
        let alpha = schedule.alphasCumprod[t]
        let alphaPrev = previous >= 0 ? schedule.alphasCumprod[previous] : finalAlphaCumprod
        let rootAlpha = alpha.squareRoot(), rootBeta = (1 - alpha).squareRoot()
        // Boundary-condition scalings with sigma_data 0.5, in float32 as torch computes them.
        let scaled = Float(t) * timestepScaling
        let cSkip = 0.25 / (scaled * scaled + 0.25)
        let cOut = scaled / (scaled * scaled + 0.25).squareRoot()
        var x0: Tensor
        switch predictionType {
        case .epsilon: x0 = sample.zip(output) { ($0 - rootBeta * $1) / rootAlpha }
        case .vPrediction: x0 = sample.zip(output) { rootAlpha * $0 - rootBeta * $1 }
        }
        if let range = clipRange { x0 = x0.map { min(max($0, -range), range) } }
        let denoised = x0.zip(sample) { cOut * $0 + cSkip * $1 }
        if isLast { return denoised }
        guard let noise else { preconditionFailure("LCM steps before the last need noise") }
        let rootAlphaPrev = alphaPrev.squareRoot(), rootBetaPrev = (1 - alphaPrev).squareRoot()
        return denoised.zip(noise) { rootAlphaPrev * $0 + rootBetaPrev * $1 }
    }

    public func noiseCoefficients(timestep: Double) -> (signal: Float, noise: Float) {
        let alpha = schedule.alphasCumprod[Int(timestep)]
        return (alpha.squareRoot(), (1 - alpha).squareRoot())
    }
}
