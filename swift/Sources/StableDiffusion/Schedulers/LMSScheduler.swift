import Foundation

/// diffusers' `LMSDiscreteScheduler`: linear multistep (order 4) on the sigma ODE. The derivative
/// (x - x0) / sigma of the last up-to-four steps is combined with weights that integrate each one's
/// Lagrange basis polynomial over [sigma_i, sigma_i+1]; timesteps, sigmas and input scaling as Euler's.
public struct LMSScheduler: Scheduler {
    public static let maximumOrder = 4

    public let predictionType: PredictionType
    public let timesteps: [Double]
    /// sigma per timestep, then 0 for the end.
    public let sigmas: [Float]
    public let initNoiseSigma: Float
    public let order = 1
    public var startIndex = 0 {
        didSet { stepIndex = startIndex }
    }

    private var stepIndex = 0
    private var derivatives: [Tensor] = []  // newest last

    public init(stepCount: Int, config: SchedulerConfig = .stableDiffusion) {
        predictionType = config.predictionType
        (timesteps, sigmas, initNoiseSigma) = SigmaSchedule.interpolated(stepCount: stepCount, config: config)
    }

    public func scaleModelInput(_ sample: Tensor, timestep: Double) -> Tensor {
        SigmaSchedule.scaledInput(sample, sigma: sigmas[stepIndex])
    }

    /// The weight of the derivative from `lag` steps back in a step of `order` from step `t`: the
    /// integral over [sigma_t, sigma_t+1] of the Lagrange basis polynomial that is 1 at sigma_(t-lag)
    /// and 0 at the other nodes. The polynomial has degree order - 1 <= 3, so three Gauss-Legendre
    /// points integrate it exactly (diffusers integrates numerically with scipy's quad).
    func coefficient(order: Int, step t: Int, lag: Int) -> Double {
        let node = { (k: Int) in Double(self.sigmas[t - k]) }
        func basis(_ tau: Double) -> Double {
            var product = 1.0
            for k in 0..<order where k != lag {
                product *= (tau - node(k)) / (node(lag) - node(k))
            }
            return product
        }
        let a = Double(sigmas[t]), b = Double(sigmas[t + 1])
        let half = (b - a) / 2, middle = (a + b) / 2
        let x = (3.0 / 5.0).squareRoot()
        return half * (5 / 9 * basis(middle - half * x) + 8 / 9 * basis(middle) + 5 / 9 * basis(middle + half * x))
    }

    public mutating func step(output: Tensor, timestep: Double, sample: Tensor, noise: Tensor?) -> Tensor {
        let sigma = sigmas[stepIndex]
        let x0 = SigmaSchedule.dataPrediction(output, sample: sample, sigma: sigma, type: predictionType)
        derivatives = Array((derivatives + [sample.zip(x0) { ($0 - $1) / sigma }]).suffix(Self.maximumOrder))
        let order = min(stepIndex + 1, Self.maximumOrder)
        // diffusers: sample + sum(coeff * derivative), newest derivative first, in float32.
        var total: Tensor?
        for lag in 0..<order {
            let weight = Float(coefficient(order: order, step: stepIndex, lag: lag))
            let term = derivatives[derivatives.count - 1 - lag].map { weight * $0 }
            total = total.map { $0.zip(term, +) } ?? term
        }
        stepIndex += 1
        return sample.zip(total!, +)
    }

    public func noiseCoefficients(timestep: Double) -> (signal: Float, noise: Float) {
        let index = timesteps.firstIndex(of: timestep) ?? startIndex
        return (1, sigmas[index])
    }
}
