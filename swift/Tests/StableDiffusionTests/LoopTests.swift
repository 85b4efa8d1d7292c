import XCTest
@testable import StableDiffusion
import StableDiffusionTestSupport

/// The full loop with the closed-form models against python_coreml_sd/testing/closed_form.py.
final class LoopTests: XCTestCase {
    /// Up to 20 float32 steps on each side; they agree to about 5e-7 of the largest latent.
    static let tolerance: Float = 1e-6

    func testEveryGoldenLoopCase() throws {
        let cases = Golden.section("loop")["cases"] as! [[String: Any]]
        XCTAssertGreaterThanOrEqual(cases.count, 8)
        for entry in cases { try check(entry) }
    }

    private func check(_ entry: [String: Any]) throws {
        let config = Self.config(entry)
        let label = "\(config.prompt.debugDescription) \(config.scheduler) \(config.rng) seed \(config.seed)"
        let pipeline = StableDiffusionPipeline(tokenizer: Golden.tokenizer, models: ClosedForm.models())
        let result = try XCTUnwrap(pipeline.generate(config).first)
        XCTAssertEqual(result.timesteps.map(Float.init), floats(entry["timesteps"]), label)
        let error = relativeError(result.latents.scalars, floats(entry["latents"]))
        XCTAssertLessThanOrEqual(error, Self.tolerance, label)
        XCTAssertEqual(result.isUnsafe, entry["unsafe"] as! Bool, label)
        let rgb = RGBImage(decoderOutput: result.image)
        XCTAssertEqual(rgb.bytes.prefix(48).map(Int.init), ints(entry["rgb_head"]), label)
        XCTAssertEqual(Int(CRC32.checksum(rgb.bytes)), entry["rgb_crc32"] as! Int, label)
    }

    static func config(_ entry: [String: Any]) -> GenerationConfig {
        var config = GenerationConfig(prompt: entry["prompt"] as! String)
        config.negativePrompt = entry["negative_prompt"] as! String
        config.seed = UInt32(entry["seed"] as! Int)
        config.stepCount = entry["steps"] as! Int
        config.guidanceScale = Float((entry["guidance_scale"] as! NSNumber).doubleValue)
        config.scheduler = SchedulerKind(rawValue: entry["scheduler"] as! String)!
        config.predictionType = PredictionType(rawValue: entry["prediction_type"] as! String)!
        config.rng = RandomSourceKind(rawValue: entry["rng"] as! String)!
        let size = entry["latent_size"] as! Int
        config.latentShape = [1, 4, size, size]
        config.disableSafety = entry["disable_safety"] as! Bool
        if let strength = entry["strength"] as? NSNumber {
            config.strength = strength.doubleValue
            config.startImage = ClosedForm.testImage(height: 8 * size, width: 8 * size)
        }
        return config
    }
}
