import Foundation

/// diffusers' `DDIMScheduler` with eta 0 (deterministic): x0 and epsilon from the model output, then
/// x_prev = sqrt(alpha_prev) x0 + sqrt(1 - alpha_prev) epsilon. Spacing "leading" unless the config
/// names another; the previous timestep is always t - trainSteps / steps, as in diffusers.
public struct DDIMScheduler: Scheduler {
    public let schedule: NoiseSchedule
    public let predictionType: PredictionType
    public let timesteps: [Double]
    public let order = 1
    public var startIndex = 0

    private let stride: Int
    private let finalAlphaCumprod: Float
    private let clipRange: Float?

    public init(stepCount: Int, config: SchedulerConfig = .stableDiffusion) {
        schedule = config.noiseSchedule
        predictionType = config.predictionType
        stride = schedule.trainStepCount / stepCount
        finalAlphaCumprod = (config.setAlphaToOne ?? true) ? 1 : schedule.alphasCumprod[0]
        clipRange = (config.clipSample ?? true) ? Float(config.clipSampleRange) : nil
        timesteps = config.spacing(default: .leading).integerTimesteps(
            stepCount: stepCount, trainStepCount: schedule.trainStepCount, stepsOffset: config.stepsOffset,
            dropLast: false).map(Double.init)
    }

    public mutating func step(output: Tensor, timestep: Double, sample: Tensor, noise: Tensor?) -> Tensor {
        let t = Int(timestep), previous = t - stride
        let alpha = schedule.alphasCumprod[t]
        let alphaPrev = previous >= 0 ? schedule.alphasCumprod[previous] : finalAlphaCumprod
        let beta = 1 - alpha
        let rootAlpha = alpha.squareRoot(), rootBeta = beta.squareRoot()
        var x0: Tensor
        let epsilon: Tensor
        switch predictionType {
        case .epsilon:
            x0 = sample.zip(output) { ($0 - rootBeta * $1) / rootAlpha }
            epsilon = output
        case .vPrediction:
            x0 = sample.zip(output) { rootAlpha * $0 - rootBeta * $1 }
            epsilon = output.zip(sample) { rootAlpha * $0 + rootBeta * $1 }
        }
        if let range = clipRange {
            // epsilon stays the unclipped one, as diffusers' default use_clipped_model_output=False.
            x0 = x0.map { min(max($0, -range), range) }
        }
        let direction = (1 - alphaPrev).squareRoot()
        let rootAlphaPrev = alphaPrev.squareRoot()
        return x0.zip(epsilon) { rootAlphaPrev * $0 + direction * $1 }
    }

    public func noiseCoefficients(timestep: Double) -> (signal: Float, noise: Float) {
        let alpha = schedule.alphasCumprod[Int(timestep)]
        return (alpha.squareRoot(), (1 - alpha).squareRoot())
    }
}
