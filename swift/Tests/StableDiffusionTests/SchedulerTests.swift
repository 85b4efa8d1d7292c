import XCTest
@testable import StableDiffusion

final class SchedulerTests: XCTestCase {
    static let tolerance: Float = 1e-6

    func testAlphasCumprodMatchesTorch() {
        let expected = floats(Golden.section("schedulers")["alphas_cumprod"])
        XCTAssertEqual(NoiseSchedule.stableDiffusion.alphasCumprod, expected)
    }

    func testEveryGoldenCase() {
        let cases = Golden.section("schedulers")["cases"] as! [[String: Any]]
        XCTAssertEqual(cases.count, 20)
        for entry in cases { check(entry) }
    }

    private func check(_ entry: [String: Any]) {
        let kind = SchedulerKind(rawValue: entry["scheduler"] as! String)!
        let prediction = PredictionType(rawValue: entry["prediction_type"] as! String)!
        let steps = entry["steps"] as! Int
        let label = "\(kind) \(prediction) \(steps) steps"
        var scheduler = kind.make(stepCount: steps, predictionType: prediction)
        XCTAssertEqual(scheduler.timesteps, ints(entry["timesteps"]).map(Double.init), label)
        if let sigmas = entry["sigmas"], let dpm = scheduler as? DPMSolverMultistepScheduler {
            let expected = floats(sigmas)
            // torch's vectorised float sqrt is not always correctly rounded (1 ulp off for 190 of the
            // 1000 training sigmas), so sigmas agree to float tolerance rather than bit for bit.
            let differing = Swift.zip(dpm.sigmas, expected).enumerated().filter {
                abs($0.element.0 - $0.element.1) > Self.tolerance * abs($0.element.1)
            }
            XCTAssertEqual(dpm.sigmas.count, expected.count, label)
            XCTAssertTrue(differing.isEmpty, "\(label): sigmas differ at \(differing.prefix(3))")
        }
        let outputs = (entry["model_outputs"] as! [Any]).map(floats)
        let samples = (entry["samples"] as! [Any]).map(floats)
        let shape = [1, 4, 2, 4]
        for (k, t) in scheduler.timesteps.enumerated() {
            let next = scheduler.step(output: Tensor(shape: shape, scalars: outputs[k]), timestep: t,
                                      sample: Tensor(shape: shape, scalars: samples[k]))
            let error = relativeError(next.scalars, samples[k + 1])
            XCTAssertLessThanOrEqual(error, Self.tolerance, "\(label), step \(k) (t=\(t))")
        }
    }

    func testPNDMTimestepsForFiftySteps() {
        let timesteps = PNDMScheduler(stepCount: 50).timesteps.map { Int($0) }
        XCTAssertEqual(Array(timesteps.prefix(4)), [981, 961, 961, 941])
        XCTAssertEqual(timesteps.last, 1)
        XCTAssertEqual(timesteps.count, 51)
    }

    func testImg2ImgStartFollowsDiffusers() throws {
        XCTAssertEqual(try StableDiffusionPipeline.img2imgStart(stepCount: 10, strength: 0.7, order: 1), 3)
        XCTAssertEqual(try StableDiffusionPipeline.img2imgStart(stepCount: 50, strength: 1, order: 1), 0)
        XCTAssertThrowsError(try StableDiffusionPipeline.img2imgStart(stepCount: 50, strength: 1.5, order: 1))
    }
}
