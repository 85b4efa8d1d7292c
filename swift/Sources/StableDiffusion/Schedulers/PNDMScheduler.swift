import Foundation

/// diffusers' `PNDMScheduler` with `skip_prk_steps=True` (pseudo linear multistep only): the SD 1.x
/// default sampler ("leading" spacing, `steps_offset=1`, `set_alpha_to_one=False` in its config).
public struct PNDMScheduler: Scheduler {
    public let schedule: NoiseSchedule
    public let predictionType: PredictionType
    public let stepCount: Int
    public let timesteps: [Double]
    public let order = 1
    public var startIndex = 0

    private var history: [Tensor] = []  // diffusers' `ets`: past model outputs, newest last
    private var counter = 0
    private var firstSample: Tensor?  // diffusers' `cur_sample`

    private let finalAlphaCumprod: Float

    public init(stepCount: Int, config: SchedulerConfig = .stableDiffusion) {
        schedule = config.noiseSchedule
        predictionType = config.predictionType
        self.stepCount = stepCount
        finalAlphaCumprod = (config.setAlphaToOne ?? false) ? 1 : schedule.alphasCumprod[0]
        let ascending = Array(config.spacing(default: .leading).integerTimesteps(
            stepCount: stepCount, trainStepCount: schedule.trainStepCount, stepsOffset: config.stepsOffset,
            dropLast: false).reversed())
        // The second-to-last timestep repeats: PLMS's warm-up evaluates it twice.
        let plms = Array(ascending.dropLast()) + Array(ascending.suffix(2).prefix(ascending.count > 1 ? 1 : 0)) + [ascending.last!]
        timesteps = plms.reversed().map(Double.init)
    }

    public init(stepCount: Int, predictionType: PredictionType) {
        var config = SchedulerConfig.stableDiffusion
        config.predictionType = predictionType
        self.init(stepCount: stepCount, config: config)
    }

    private var stride: Int { schedule.trainStepCount / stepCount }

    public mutating func step(output: Tensor, timestep: Double, sample: Tensor, noise: Tensor?) -> Tensor {
        var current = Int(timestep)
        var previous = current - stride
        if counter != 1 {
            history = Array(history.suffix(3)) + [output]
        } else {
            previous = current
            current += stride
        }
        let (combined, base) = combinedOutput(output, sample: sample)
        counter += 1
        return previousSample(base, from: current, to: previous, output: combined)
    }

    /// The linear multistep combination of past outputs, and the sample to step from.
    private mutating func combinedOutput(_ output: Tensor, sample: Tensor) -> (Tensor, Tensor) {
        let e = history
        switch (e.count, counter) {
        case (1, 0):
            firstSample = sample
            return (output, sample)
        case (1, 1):
            defer { firstSample = nil }
            return (output.zip(e[0]) { ($0 + $1) / 2 }, firstSample ?? sample)
        case (2, _):
            return (e[1].zip(e[0]) { (3 * $0 - $1) / 2 }, sample)
        case (3, _):
            let partial = e[2].zip(e[1]) { 23 * $0 - 16 * $1 }
            return (partial.zip(e[0]) { ($0 + 5 * $1) / 12 }, sample)
        default:
            let partial = e[3].zip(e[2]) { 55 * $0 - 59 * $1 }.zip(e[1]) { $0 + 37 * $1 }
            return (partial.zip(e[0]) { Float(1.0 / 24.0) * ($0 - 9 * $1) }, sample)
        }
    }

    private func alphaProduct(_ timestep: Int) -> Float {
        timestep >= 0 ? schedule.alphasCumprod[timestep] : finalAlphaCumprod
    }

    private func previousSample(_ sample: Tensor, from t: Int, to previous: Int, output: Tensor) -> Tensor {
        let alpha = alphaProduct(t), alphaPrev = alphaProduct(previous)
        let beta = 1 - alpha, betaPrev = 1 - alphaPrev
        let epsilon = predictionType == .vPrediction ? output.scaledSum(alpha.squareRoot(), sample, beta.squareRoot()) : output
        let sampleCoefficient = (alphaPrev / alpha).squareRoot()
        let denominator = alpha * betaPrev.squareRoot() + (alpha * beta * alphaPrev).squareRoot()
        let difference = alphaPrev - alpha
        return sample.zip(epsilon) { sampleCoefficient * $0 - difference * $1 / denominator }
    }

    public func noiseCoefficients(timestep: Double) -> (signal: Float, noise: Float) {
        let alpha = schedule.alphasCumprod[Int(timestep)]
        return (alpha.squareRoot(), (1 - alpha).squareRoot())
    }
}
