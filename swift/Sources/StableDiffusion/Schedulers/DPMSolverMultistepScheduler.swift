import Foundation

/// diffusers' `DPMSolverMultistepScheduler` defaults on the SD 1.x schedule: DPM-Solver++, second
/// order, midpoint, "linspace" spacing, final sigma zero (so the last step is first order).
public struct DPMSolverMultistepScheduler: Scheduler {
    public let schedule: NoiseSchedule
    public let predictionType: PredictionType
    public let timesteps: [Int]
    /// sigma per timestep, then 0 for the end.
    public let sigmas: [Float]
    public let order = 1
    public var startIndex = 0 {
        didSet { stepIndex = startIndex }
    }

    private var stepIndex = 0
    private var previousOutput: Tensor?
    private var lowerOrderCount = 0

    public init(stepCount: Int, predictionType: PredictionType = .epsilon, schedule: NoiseSchedule = .stableDiffusion) {
        self.schedule = schedule
        self.predictionType = predictionType
        let last = Double(schedule.trainStepCount - 1)
        let spacing = last / Double(stepCount)
        timesteps = (0..<stepCount).map { Int((Double(stepCount - $0) * spacing).rounded(.toNearestOrEven)) }
        let allSigmas = schedule.alphasCumprod.map { ((1 - $0) / $0).squareRoot() }
        sigmas = timesteps.map { allSigmas[$0] } + [0]
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

    public mutating func step(output: Tensor, timestep: Int, sample: Tensor) -> Tensor {
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

    public func addNoise(original: Tensor, noise: Tensor, timestep: Int) -> Tensor {
        let (signal, noiseScale) = noiseCoefficients(timestep: timestep)
        return original.scaledSum(signal, noise, noiseScale)
    }

    public func noiseCoefficients(timestep: Int) -> (signal: Float, noise: Float) {
        let index = timesteps.firstIndex(of: timestep) ?? startIndex
        let (alpha, sigma) = alphaSigma(index)
        return (alpha, sigma)
    }
}
