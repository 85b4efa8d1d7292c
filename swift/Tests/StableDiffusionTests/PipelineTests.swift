import XCTest
@testable import StableDiffusion
import StableDiffusionTestSupport

/// Records what the loop hands the UNet and decoder, answering in closed form.
final class RecordingUnet: NoisePredicting {
    var calls: [(batch: Int, timestep: Double, hidden: Tensor)] = []

    func predictNoise(latents: Tensor, timestep: Double, hiddenStates: Tensor) throws -> Tensor {
        calls.append((latents.shape[0], timestep, hiddenStates))
        // Batch item b answers b + 1 everywhere, so guidance is visible in the result.
        let items = (0..<latents.shape[0]).map { b in latents.batchItem(b).map { _ in Float(b + 1) } }
        return Tensor.concatenateBatch(items)
    }
}

final class RecordingDecoder: LatentDecoding {
    var received: Tensor?

    func decode(_ latents: Tensor) throws -> Tensor {
        received = latents
        return try ClosedForm.Decoder().decode(latents)
    }
}

final class PipelineTests: XCTestCase {
    private func pipeline(unet: NoisePredicting = ClosedForm.Denoiser(), decoder: LatentDecoding = ClosedForm.Decoder(),
                          encoder: ImageEncoding? = nil, safety: SafetyChecking? = nil) -> StableDiffusionPipeline {
        let models = PipelineModels(textEncoder: ClosedForm.TextEncoder(), unet: unet, decoder: decoder,
                                    encoder: encoder, safetyChecker: safety)
        return StableDiffusionPipeline(tokenizer: Golden.tokenizer, models: models)
    }

    private func smallConfig(_ prompt: String = "a cat") -> GenerationConfig {
        var config = GenerationConfig(prompt: prompt)
        config.stepCount = 3
        config.latentShape = [1, 4, 2, 2]
        return config
    }

    func testGuidanceBatchIsNegativeThenConditional() throws {
        let unet = RecordingUnet()
        var config = smallConfig()
        config.negativePrompt = "blurry"
        config.guidanceScale = 3
        let encoder = ClosedForm.TextEncoder()
        _ = try pipeline(unet: unet).generate(config)
        let expected = Tensor.concatenateBatch([
            try encoder.encode(tokenIds: Golden.tokenizer.encode("blurry")),
            try encoder.encode(tokenIds: Golden.tokenizer.encode("a cat")),
        ])
        XCTAssertEqual(unet.calls.count, 4)  // PNDM runs its second-to-last timestep twice
        XCTAssertTrue(unet.calls.allSatisfy { $0.batch == 2 && $0.hidden == expected })
    }

    func testGuidanceFormula() throws {
        var config = smallConfig()
        config.guidanceScale = 3
        let output = try pipeline(unet: RecordingUnet()).guidedOutput(
            Tensor(zeros: [1, 4, 2, 2]), timestep: 1, hidden: Tensor(zeros: [2, 77, 8]), config: config)
        XCTAssertEqual(Set(output.scalars), [1 + 3 * (2 - 1)])  // uncond + g (cond - uncond)
    }

    func testScaleAtMostOneIsTheConditionalPredictionAlone() throws {
        var config = smallConfig()
        for scale: Float in [0, 0.5, 1] {  // diffusers' do_classifier_free_guidance is false; SDXL-Turbo runs at 0
            config.guidanceScale = scale
            let output = try pipeline(unet: RecordingUnet()).guidedOutput(
                Tensor(zeros: [1, 4, 2, 2]), timestep: 1, hidden: Tensor(zeros: [2, 77, 8]), config: config)
            XCTAssertEqual(Set(output.scalars), [2], "scale \(scale)")  // cond, not uncond + g (cond - uncond)
        }
    }

    func testImg2ImgNeedsAtLeastOneStep() {
        var config = smallConfig()
        config.startImage = ClosedForm.testImage(height: 16, width: 16)
        config.scheduler = .dpmpp  // PNDM would still run its extra final timestep
        config.strength = 0.2  // int(3 * 0.2) == 0 steps
        XCTAssertThrowsError(try pipeline(encoder: ClosedForm.Encoder()).generate(config)) { error in
            XCTAssertEqual(error as? PipelineError, .strengthTooSmall(0.2, steps: 3))
        }
    }

    func testDecoderGetsLatentsDividedByScale() throws {
        let decoder = RecordingDecoder()
        let result = try XCTUnwrap(pipeline(decoder: decoder).generate(smallConfig()).first)
        let expected = result.latents.map { $0 / 0.18215 }
        XCTAssertEqual(decoder.received, expected)
    }

    func testUnsafeImagesAreBlackedOutUnlessDisabled() throws {
        let flagEverything = ClosedForm.SafetyChecker(threshold: -2)
        var config = smallConfig()
        let flagged = try XCTUnwrap(pipeline(safety: flagEverything).generate(config).first)
        XCTAssertTrue(flagged.isUnsafe)
        XCTAssertEqual(Set(flagged.image.scalars), [-1])
        config.disableSafety = true
        let shown = try XCTUnwrap(pipeline(safety: flagEverything).generate(config).first)
        XCTAssertFalse(shown.isUnsafe)
        XCTAssertNotEqual(Set(shown.image.scalars), [-1])
    }

    func testImg2ImgNeedsAnEncoder() {
        var config = smallConfig()
        config.startImage = ClosedForm.testImage(height: 16, width: 16)
        XCTAssertThrowsError(try pipeline().generate(config)) { error in
            XCTAssertEqual(error as? PipelineError, .missingImageEncoder)
        }
    }

    func testImageCountUsesConsecutiveSeeds() throws {
        var config = smallConfig()
        config.imageCount = 2
        config.seed = 10
        let both = try pipeline().generate(config)
        config.imageCount = 1
        config.seed = 11
        let second = try pipeline().generate(config)
        XCTAssertEqual(both.count, 2)
        XCTAssertEqual(both[1].latents, second[0].latents)
        XCTAssertNotEqual(both[0].latents, both[1].latents)
    }

    func testCancelStopsTheLoop() {
        XCTAssertThrowsError(try pipeline().generate(smallConfig()) { step, _ in step < 2 }) { error in
            XCTAssertEqual(error as? PipelineError, .cancelled)
        }
    }
}

extension PipelineError: Equatable {
    public static func == (a: PipelineError, b: PipelineError) -> Bool { a.description == b.description }
}

final class FakeResident: ResidentModel {
    var unloads = 0
    func unload() { unloads += 1 }
}

final class ResidencyGroupTests: XCTestCase {
    func testLoadingAStageUnloadsOtherStagesOnly() {
        let group = ResidencyGroup()
        let text = FakeResident(), chunk1 = FakeResident(), chunk2 = FakeResident()
        group.register(text, stage: "text")
        group.register(chunk1, stage: "unet")
        group.register(chunk2, stage: "unet")
        group.willLoad(stage: "unet")
        XCTAssertEqual([text.unloads, chunk1.unloads, chunk2.unloads], [1, 0, 0])
        group.willLoad(stage: "text")
        XCTAssertEqual([text.unloads, chunk1.unloads, chunk2.unloads], [1, 1, 1])
    }
}
