import Foundation
import XCTest
@testable import StableDiffusion
import StableDiffusionTestSupport

/// The scheduler settings come from the bundle's scheduler_config.json (written by the converter's
/// bundle step from the model's scheduler folder); bundles without one keep SD 1.x's.
final class SchedulerConfigTests: XCTestCase {
    private func folder(config: [String: Any]?) throws -> ResourceFolder {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("sd-config-\(UUID())")
        addTeardownBlock { try? FileManager.default.removeItem(at: url) }
        for name in ["TextEncoder.mlpackage", "VAEDecoder.mlpackage", "Unet.mlpackage"] {
            try FileManager.default.createDirectory(at: url.appendingPathComponent(name), withIntermediateDirectories: true)
        }
        for name in ["vocab.json", "merges.txt"] {
            try FileManager.default.copyItem(at: Golden.repositoryRoot.appendingPathComponent("models/tokenizer/\(name)"),
                                             to: url.appendingPathComponent(name))
        }
        if let config {
            try JSONSerialization.data(withJSONObject: config).write(to: url.appendingPathComponent(SchedulerConfig.fileName))
        }
        return try ResourceFolder(path: url.path)
    }

    /// SD 1.5's scheduler/scheduler_config.json as diffusers 0.42 saves it.
    static let sd15: [String: Any] = [
        "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": false, "skip_prk_steps": true,
        "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": NSNull(), "clip_sample": false,
    ]

    func testOldBundlesKeepTheSD1Defaults() throws {
        XCTAssertEqual(try folder(config: nil).schedulerConfig(), .stableDiffusion)
        XCTAssertEqual(SchedulerKind.pndm.make(stepCount: 50, config: try folder(config: nil).schedulerConfig()).timesteps,
                       PNDMScheduler(stepCount: 50).timesteps)
    }

    func testSD15ConfigGivesTodaysSchedules() throws {
        var config = try folder(config: Self.sd15).schedulerConfig()
        XCTAssertEqual(config.timestepSpacing, .leading)
        XCTAssertEqual(config.noiseSchedule.alphasCumprod, NoiseSchedule.stableDiffusion.alphasCumprod)
        XCTAssertEqual(PNDMScheduler(stepCount: 20, config: config).timesteps, PNDMScheduler(stepCount: 20).timesteps)
        config.timestepSpacing = nil  // DPM-Solver's own default then, as the existing golden cases use
        XCTAssertEqual(DPMSolverMultistepScheduler(stepCount: 20, config: config).sigmas,
                       DPMSolverMultistepScheduler(stepCount: 20).sigmas)
    }

    func testChangingTheBundleConfigChangesTheSchedule() throws {
        let base = try folder(config: Self.sd15).schedulerConfig()
        var changed = Self.sd15
        changed["timestep_spacing"] = "trailing"
        changed["prediction_type"] = "v_prediction"
        changed["beta_end"] = 0.02
        changed["steps_offset"] = 0
        let config = try folder(config: changed).schedulerConfig()
        XCTAssertEqual(config.predictionType, .vPrediction)
        XCTAssertEqual(config.betaEnd, 0.02)
        for kind in SchedulerKind.allCases where kind != .lcm {  // LCM ignores the spacing (below)
            let before = kind.make(stepCount: 10, config: base), after = kind.make(stepCount: 10, config: config)
            XCTAssertNotEqual(before.timesteps, after.timesteps, "\(kind)")
            XCTAssertEqual(after.timesteps.first, 999, "\(kind): trailing starts at the last training step")
        }
        XCTAssertNotEqual(config.noiseSchedule.alphasCumprod, base.noiseSchedule.alphasCumprod)
        changed["original_inference_steps"] = 20
        let lcm = try folder(config: changed).schedulerConfig()
        XCTAssertEqual(SchedulerKind.lcm.make(stepCount: 4, config: base).timesteps, [999, 759, 499, 259])
        XCTAssertEqual(SchedulerKind.lcm.make(stepCount: 4, config: lcm).timesteps, [999, 749, 499, 249])
        // The pipeline takes it through GenerationConfig: same prompt and seed, another result.
        let pipeline = StableDiffusionPipeline(tokenizer: Golden.tokenizer, models: ClosedForm.models())
        var request = GenerationConfig(prompt: "a cat")
        request.stepCount = 4
        request.latentShape = [1, 4, 4, 4]
        request.disableSafety = true
        request.schedulerConfig = base
        let first = try pipeline.generate(request)[0]
        request.schedulerConfig = config
        let second = try pipeline.generate(request)[0]
        XCTAssertEqual(first.timesteps, [751, 501, 501, 251, 1])
        XCTAssertEqual(second.timesteps, [999, 749, 749, 499, 249])
        XCTAssertNotEqual(first.latents, second.latents)
    }

    func testRequestOverridesWinOverTheConfig() throws {
        var request = GenerationConfig(prompt: "p")
        request.schedulerConfig = try folder(config: Self.sd15).schedulerConfig()
        request.predictionType = .vPrediction
        request.timestepSpacing = .linspace
        request.useKarrasSigmas = true
        let effective = request.effectiveSchedulerConfig
        XCTAssertEqual(effective.predictionType, .vPrediction)
        XCTAssertEqual(effective.timestepSpacing, .linspace)
        XCTAssertTrue(effective.useKarrasSigmas)
        XCTAssertEqual(effective.betaStart, 0.00085)
    }

    func testMissingKeysTakeDiffusersClassDefaults() throws {
        let config = try SchedulerConfig(json: Data("{}".utf8))
        XCTAssertEqual(config.betaSchedule, .linear)
        XCTAssertEqual(config.betaStart, 0.0001)
        XCTAssertEqual(config.stepsOffset, 0)
        XCTAssertNil(config.timestepSpacing)
        XCTAssertNil(config.clipSample)  // DDIM clips then, as DDIMScheduler.from_config does
    }

    func testUnsupportedConfigsAreRefused() throws {
        for bad in [#"{"beta_schedule": "sigmoid"}"#, #"{"trained_betas": [0.1, 0.2]}"#,
                    #"{"timestep_spacing": "karras"}"#, #"{"prediction_type": "sample"}"#, "[1]"] {
            XCTAssertThrowsError(try SchedulerConfig(json: Data(bad.utf8)), bad)
        }
        var broken = Self.sd15
        broken["beta_schedule"] = "sigmoid"
        XCTAssertThrowsError(try folder(config: broken).schedulerConfig())
    }
}

/// pipeline_config.json: the latent scale and sequence length the loop uses.
final class PipelineSettingsTests: XCTestCase {
    func testDefaultsAreSD1s() throws {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("sd-settings-\(UUID())")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: folder) }
        XCTAssertEqual(try PipelineSettings.load(folder: folder), PipelineSettings())
        XCTAssertEqual(PipelineSettings().latentScale, 0.18215)
        XCTAssertEqual(PipelineSettings().sequenceLength, 77)
        // What the converter writes for an SDXL-like VAE and a 96x160 conversion.
        let text = #"{"image_size": [768, 1280], "latent_size": [96, 160], "text_sequence_length": 77, "vae_scaling_factor": 0.13025}"#
        try Data(text.utf8).write(to: folder.appendingPathComponent(PipelineSettings.fileName))
        let settings = try PipelineSettings.load(folder: folder)
        XCTAssertEqual(settings.latentScale, 0.13025)
        XCTAssertEqual(settings.latentSize, [96, 160])
        XCTAssertEqual(settings.imageSize, [768, 1280])
    }

    func testTheLoopUsesTheBundlesLatentScale() throws {
        var settings = PipelineSettings()
        settings.latentScale = 0.5
        let decoder = RecordingDecoder()
        let models = PipelineModels(textEncoder: ClosedForm.TextEncoder(), unet: ClosedForm.Denoiser(), decoder: decoder)
        let pipeline = StableDiffusionPipeline(tokenizer: Golden.tokenizer, models: models,
                                               sequenceLength: settings.sequenceLength, latentScale: settings.latentScale)
        var config = GenerationConfig(prompt: "a cat")
        config.stepCount = 2
        config.latentShape = [1, 4, 2, 2]
        let result = try pipeline.generate(config)[0]
        XCTAssertEqual(decoder.received, result.latents.map { $0 / 0.5 })
    }

    func testUnusableValuesAreRefused() {
        for bad in [#"{"vae_scaling_factor": 0}"#, #"{"text_sequence_length": 1}"#, #"{"latent_size": [64]}"#, "[]"] {
            XCTAssertThrowsError(try PipelineSettings(json: Data(bad.utf8)), bad)
        }
    }
}
