import Foundation
import XCTest
@testable import StableDiffusion

/// Every scheduler kind against diffusers, step for step, on schedulers.json from
/// scripts/make_scheduler_vectors.py: each case's diffusers scheduler_config.json builds the Swift
/// scheduler, which then runs every step from the recorded sample (teacher forcing).
///
/// Tolerance: a step's largest difference from diffusers, over the step's largest |value|, is at most
/// `stepULPs` float32 ulps. One step is about ten float32 roundings of operands no larger than that
/// value (diffusers rounds the same operations in the same order; Swift mirrors the order), each off
/// by at most half an ulp, and the training sigmas themselves may be 1 ulp apart (torch's vectorised
/// sqrt is not always correctly rounded), so a few ulps; measured: see `testWorstErrorsStayWithinTolerance`.
final class SamplerTests: XCTestCase {
    static let stepULPs: Float = 8
    static var tolerance: Float { stepULPs * Float.ulpOfOne }

    static let root: [String: Any] = {
        let url = Golden.testsFolder.appendingPathComponent("Resources/schedulers.json")
        return try! JSONSerialization.jsonObject(with: Data(contentsOf: url)) as! [String: Any]
    }()

    static var cases: [[String: Any]] { root["cases"] as! [[String: Any]] }

    static func kind(_ entry: [String: Any]) -> SchedulerKind {
        let name = entry["kind"] as! String
        return name == "dpmpp_karras" ? .dpmpp : SchedulerKind(rawValue: name)!
    }

    static func config(_ entry: [String: Any]) throws -> SchedulerConfig {
        try SchedulerConfig(json: JSONSerialization.data(withJSONObject: entry["config"]!))
    }

    static func label(_ entry: [String: Any]) -> String {
        let config = entry["config"] as! [String: Any]
        let settings = ["prediction_type", "timestep_spacing", "beta_schedule", "use_karras_sigmas"]
            .compactMap { key in config[key].map { "\(key)=\($0)" } }.joined(separator: " ")
        return "\(entry["kind"]!) \(entry["steps"]!) steps \(settings)"
    }

    /// Worst per-step error (in float32 ulps of the step's largest value) of each quantity in a case.
    struct Worst { var sigma: Float = 0, input: Float = 0, step: Float = 0 }

    static func check(_ entry: [String: Any]) throws -> Worst {
        let label = label(entry)
        let steps = entry["steps"] as! Int
        var scheduler = kind(entry).make(stepCount: steps, config: try config(entry))
        let config = entry["config"] as! [String: Any]
        if (config["use_karras_sigmas"] as? Bool) == true, ["euler", "lms"].contains(entry["kind"] as! String) {
            // Fractional timesteps from log-sigma interpolation: NumPy's float32 log is its own SIMD code,
            // 1 ulp off libm's at times, which moves t by a few float32 ulps of t (seen: 8, bound 16). The UNet
            // cannot tell; the sigmas the steps use are checked as tightly as the others' below.
            let expected = floats(entry["timesteps"])
            XCTAssertEqual(scheduler.timesteps.count, expected.count, label)
            for (mine, theirs) in Swift.zip(scheduler.timesteps, expected) {
                let ulps = abs(Float(mine) - theirs) / max(theirs, 1).ulp
                XCTAssertLessThanOrEqual(ulps, 16, label)
            }
        } else {
            XCTAssertEqual(scheduler.timesteps.map(Float.init), floats(entry["timesteps"]), label)
        }
        var worst = Worst()
        let ulps = { (a: [Float], b: [Float]) in relativeError(a, b) / Float.ulpOfOne }
        if let sigmas = entry["sigmas"] {
            let mine: [Float]
            switch scheduler {
            case let euler as EulerScheduler: mine = euler.sigmas
            case let lms as LMSScheduler: mine = lms.sigmas
            case let dpm as DPMSolverMultistepScheduler: mine = dpm.sigmas
            default: mine = floats(sigmas)  // PNDM and DDIM keep sigmas only for diffusers' add_noise
            }
            XCTAssertEqual(mine.count, floats(sigmas).count, label)
            if mine.count == floats(sigmas).count {
                // Elementwise relative: small sigmas matter as much as large ones.
                worst.sigma = Swift.zip(mine, floats(sigmas)).map { abs($0 - $1) / max(abs($1), .leastNormalMagnitude) }
                    .max().map { $0 / Float.ulpOfOne } ?? 0
            }
        }
        worst.sigma = max(worst.sigma, ulps([scheduler.initNoiseSigma], [Float((entry["init_noise_sigma"] as! NSNumber).doubleValue)]))
        let shape = ints(root["shape"])
        let samples = (entry["samples"] as! [Any]).map(floats)
        let inputs = (entry["model_inputs"] as! [Any]).map(floats)
        let outputs = (entry["model_outputs"] as! [Any]).map(floats)
        let noises = (entry["noises"] as? [Any])?.map(floats)
        for (k, t) in scheduler.timesteps.enumerated() {
            let sample = Tensor(shape: shape, scalars: samples[k])
            worst.input = max(worst.input, ulps(scheduler.scaleModelInput(sample, timestep: t).scalars, inputs[k]))
            // Noise exactly where diffusers draws it: every Euler ancestral step, LCM's but the last.
            let kind = entry["kind"] as! String
            XCTAssertEqual(scheduler.needsNoise, kind == "euler_a" || (kind == "lcm" && k < steps - 1), "\(label) step \(k)")
            let noise = scheduler.needsNoise ? noises.map { Tensor(shape: shape, scalars: $0[k]) } : nil
            let next = scheduler.step(output: Tensor(shape: shape, scalars: outputs[k]), timestep: t, sample: sample, noise: noise)
            let error = ulps(next.scalars, samples[k + 1])
            XCTAssertLessThanOrEqual(error, stepULPs, "\(label), step \(k) (t=\(t))")
            worst.step = max(worst.step, error)
        }
        XCTAssertLessThanOrEqual(worst.sigma, stepULPs, "\(label): sigmas")
        XCTAssertLessThanOrEqual(worst.input, stepULPs, "\(label): scaled model inputs")
        return worst
    }

    func testEveryKindSpacingAndPredictionMatchesDiffusers() throws {
        let cases = Self.cases
        XCTAssertGreaterThanOrEqual(cases.count, 70)
        var covered = Set<String>()
        for entry in cases {
            _ = try Self.check(entry)
            let config = entry["config"] as! [String: Any]
            covered.insert("\(entry["kind"]!) \(config["timestep_spacing"]!) \(config["prediction_type"]!)")
        }
        // Every kind with every spacing and both prediction types, 50 steps for epsilon.
        XCTAssertEqual(covered.count, 8 * 3 * 2)
        XCTAssertTrue(cases.contains { $0["kind"] as? String == "euler_a" && $0["steps"] as? Int == 50 })
    }

    func testWorstErrorsStayWithinTolerance() throws {
        var worst = Worst()
        var byKind: [String: Float] = [:]
        for entry in Self.cases {
            let w = try Self.check(entry)
            worst.sigma = max(worst.sigma, w.sigma)
            worst.input = max(worst.input, w.input)
            worst.step = max(worst.step, w.step)
            byKind[entry["kind"] as! String] = max(byKind[entry["kind"] as! String] ?? 0, w.step)
        }
        print("SamplerTests worst ulps: sigmas \(worst.sigma), inputs \(worst.input), steps \(worst.step); by kind \(byKind.sorted { $0.key < $1.key })")
    }
}
