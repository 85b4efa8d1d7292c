import Foundation

/// diffusers' `DPMSolverMultistepScheduler` defaults: DPM-Solver++, second order, midpoint, final
/// sigma zero (so the last step is first order), "linspace" spacing unless the config names another,
/// and optionally Karras sigmas (the "DPM++ 2M Karras" sampler).
public struct DPMSolverMultistepScheduler: Scheduler {
    public let schedule: NoiseSchedule
    public let predictionType: PredictionType
    public let timesteps: [Double]
    /// sigma per timestep, then 0 for the end.
    public let sigmas: [Float]
    public let order = 1
    public var startIndex = 0 {
        didSet { stepIndex = startIndex }
    }

    private var stepIndex = 0
    private var previousOutput: Tensor?
    private var lowerOrderCount = 0

    public init(stepCount: Int, config: SchedulerConfig = .stableDiffusion) {
        schedule = config.noiseSchedule
        predictionType = config.predictionType
        let trainSigmas = schedule.sigmas
        if config.useKarrasSigmas {
            let karras = SigmaSchedule.karras(sigmaMin: Double(trainSigmas[0]), sigmaMax: Double(trainSigmas.last!),
                                              count: stepCount)
            let logSigmas = trainSigmas.map { log($0) }
            timesteps = karras.map { NumPy.round(SigmaSchedule.timestep(sigma: $0, logSigmas: logSigmas)) }
            sigmas = karras.map { Float($0) } + [0]
        } else {
            let steps = config.spacing(default: .linspace).integerTimesteps(
                stepCount: stepCount, trainStepCount: schedule.trainStepCount, stepsOffset: config.stepsOffset, dropLast: true)
            timesteps = steps.map(Double.init)
            sigmas = steps.map { trainSigmas[$0] } + [0]
        }
    }

    public init(stepCount: Int, predictionType: PredictionType) {
        var config = SchedulerConfig.stableDiffusion
        config.predictionType = predictionType
        self.init(stepCount: stepCount, config: config)
    }

    /// (alpha_t, sigma_t) of the variance-preserving process at step `index`.
    func alphaSigma(_ index: Int) -> (alpha: Float, sigma: Float) {
        let sigma = sigmas[index]
        let alpha = 1 / (sigma * sigma + 1).squareRoot()
        return (alpha, sigma * alpha)
    }

    func lambda(_ index: Int) -> Float {
        let (alpha, sigma) = alphaSigma(index)
        return log(alpha) - log(sigma)
    }

    /// The data prediction x0 that DPM-Solver++ integrates.
    private func dataPrediction(_ output: Tensor, sample: Tensor) -> Tensor {
        let (alpha, sigma) = alphaSigma(stepIndex)
        switch predictionType {
        case .epsilon: return sample.zip(output) { ($0 - sigma * $1) / alpha }
        case .vPrediction: return sample.zip(output) { alpha * $0 - sigma * $1 }
        }
    }

    public mutating func step(output: Tensor, timestep: Double, sample: Tensor, noise: Tensor?) -> Tensor {
        let x0 = dataPrediction(output, sample: sample)
        let isLast = stepIndex == timesteps.count - 1
        let result: Tensor
        if let previous = previousOutput, lowerOrderCount >= 1, !isLast {
            result = secondOrderUpdate(x0, previous: previous, sample: sample)
        } else {
            result = firstOrderUpdate(x0, sample: sample)
        }
        previousOutput = x0
        lowerOrderCount = min(lowerOrderCount + 1, 2)
        stepIndex += 1
        return result
    }

    private func firstOrderUpdate(_ x0: Tensor, sample: Tensor) -> Tensor {
        let (alphaT, sigmaT) = alphaSigma(stepIndex + 1)
        let sigmaS = alphaSigma(stepIndex).sigma
        let h = lambda(stepIndex + 1) - lambda(stepIndex)
        let sampleCoefficient = sigmaT / sigmaS
        let outputCoefficient = alphaT * (exp(-h) - 1)
        return sample.zip(x0) { sampleCoefficient * $0 - outputCoefficient * $1 }
    }

    private func secondOrderUpdate(_ x0: Tensor, previous: Tensor, sample: Tensor) -> Tensor {
        let (alphaT, sigmaT) = alphaSigma(stepIndex + 1)
        let sigmaS0 = alphaSigma(stepIndex).sigma
        let lambdaT = lambda(stepIndex + 1), lambdaS0 = lambda(stepIndex), lambdaS1 = lambda(stepIndex - 1)
        let h = lambdaT - lambdaS0
        let r0 = (lambdaS0 - lambdaS1) / h
        let inverseR0 = 1 / r0
        let d1 = x0.zip(previous) { inverseR0 * ($0 - $1) }
        let sampleCoefficient = sigmaT / sigmaS0
        let outputCoefficient = alphaT * (exp(-h) - 1)
        let halfCoefficient = 0.5 * outputCoefficient
        let firstTwo = sample.zip(x0) { sampleCoefficient * $0 - outputCoefficient * $1 }
        return firstTwo.zip(d1) { $0 - halfCoefficient * $1 }
    }

    public func noiseCoefficients(timestep: Double) -> (signal: Float, noise: Float) {
        let index = timesteps.firstIndex(of: timestep) ?? startIndex
        let (alpha, sigma) = alphaSigma(index)
        return (alpha, sigma)
    }
}
