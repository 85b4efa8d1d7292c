import Foundation
import XCTest
@testable import StableDiffusion
import StableDiffusionTestSupport

/// The SDXL pipeline with the closed-form SDXL models against the Python pipeline on the same models
/// (scripts/make_sdxl_vectors.py writes Resources/sdxl_golden.json): both encoders' states, the pooled embeds,
/// the time ids, force_zeros_for_empty_prompt, guidance, long prompts, the refiner hand-off and image-to-image.
final class SDXLTests: XCTestCase {
    static let golden: [String: Any] = {
        let data = try! Data(contentsOf: Golden.testsFolder.appendingPathComponent("Resources/sdxl_golden.json"))
        return try! JSONSerialization.jsonObject(with: data) as! [String: Any]
    }()
    static var cases: [[String: Any]] { golden["cases"] as! [[String: Any]] }
    static let schedulerConfig: SchedulerConfig = {
        try! SchedulerConfig(json: try! JSONSerialization.data(withJSONObject: golden["scheduler_config"]!))
    }()
    /// Up to 10 float32 steps on each side (LoopTests' bound).
    static let tolerance: Float = 1e-6
    /// Weighted prompts rescale to the unweighted mean in float32 on each side (LongPromptTests' bound).
    static let weightedTolerance: Float = 1e-5

    /// pipeline_config.json of a tiny-xl bundle (python_coreml_sd.bundle.pipeline_settings).
    static let settings: PipelineSettings = try! PipelineSettings(json: Data((golden["pipeline_config"] as! String).utf8))

    static func tokenizer2() throws -> BPETokenizer {
        try Golden.tokenizer.padding(with: settings.tokenizer2PadToken!)
    }

    static func pipeline(_ entry: [String: Any], refiner: Bool = true, encoder: Bool = true) throws -> StableDiffusionXLPipeline {
        StableDiffusionXLPipeline(tokenizer: Golden.tokenizer, tokenizer2: try tokenizer2(),
                                  models: ClosedFormXL.models(refiner: refiner, encoder: encoder),
                                  latentScale: Float((entry["vae_scaling_factor"] as! NSNumber).doubleValue),
                                  promptChunkCounts: Array(1...(entry["max_prompt_chunks"] as! Int)),
                                  forceZerosForEmptyPrompt: entry["force_zeros_for_empty_prompt"] as! Bool)
    }

    static func config(_ entry: [String: Any]) -> GenerationConfig {
        var config = GenerationConfig(prompt: entry["prompt"] as! String)
        config.negativePrompt = entry["negative_prompt"] as! String
        config.seed = UInt32(entry["seed"] as! Int)
        config.stepCount = entry["steps"] as! Int
        config.guidanceScale = Float((entry["guidance_scale"] as! NSNumber).doubleValue)
        config.scheduler = SchedulerKind(rawValue: entry["scheduler"] as! String)!
        config.schedulerConfig = schedulerConfig
        let size = entry["latent_size"] as! Int
        config.latentShape = [1, 4, size, size]
        let pair = { (key: String) in (entry[key] as? [NSNumber])?.map(\.doubleValue) }
        config.originalSize = pair("original_size")
        config.cropsCoordsTopLeft = pair("crops_coords_top_left")!
        config.targetSize = pair("target_size")
        config.aestheticScore = (entry["aesthetic_score"] as! NSNumber).doubleValue
        config.negativeAestheticScore = (entry["negative_aesthetic_score"] as! NSNumber).doubleValue
        config.refinerStart = (entry["refiner_start"] as? NSNumber)?.doubleValue
        if let strength = entry["strength"] as? NSNumber {  // img2img from the closed-form test image
            config.strength = strength.doubleValue
            config.startImage = ClosedForm.testImage(height: 8 * size, width: 8 * size)
        }
        return config
    }

    func testClosedFormModelsAreThePythonOnes() {
        let widths = Self.golden["widths"] as! [String: Int]
        XCTAssertEqual([widths["text_encoder"], widths["text_encoder_2"]], ClosedFormXL.widths)
        XCTAssertEqual(Self.golden["pooled"] as? Int, ClosedFormXL.pooledSize)
        let gains = Self.golden["gains"] as! [String: Double]
        XCTAssertEqual([gains["unet"], gains["refiner"]], [ClosedFormXL.baseGain, ClosedFormXL.refinerGain])
        let timeIds = Self.golden["time_ids"] as! [String: [String]]
        XCTAssertEqual(timeIds["unet"], TimeId.base.map(\.rawValue))
        XCTAssertEqual(timeIds["refiner"], TimeId.refiner.map(\.rawValue))
    }

    func testPipelineConfigOfAnSDXLBundle() throws {
        let settings = Self.settings
        XCTAssertEqual(settings.family, .sdxl)
        XCTAssertTrue(settings.forceZerosForEmptyPrompt)
        XCTAssertEqual(settings.tokenizer2PadToken, "!")
        XCTAssertEqual(settings.timeIds, TimeId.base)
        XCTAssertEqual(settings.refinerTimeIds, TimeId.refiner)
        XCTAssertEqual(settings.latentScale, StableDiffusionXLPipeline.defaultLatentScale)
        XCTAssertEqual(try PipelineSettings(json: Data("{}".utf8)).family, .sd)  // older and SD bundles
        for bad in [#"{"family": "flux"}"#, #"{"time_ids": ["original_height", "seconds"]}"#, #"{"refiner_time_ids": []}"#] {
            XCTAssertThrowsError(try PipelineSettings(json: Data(bad.utf8)), bad) { error in
                XCTAssertTrue(error is UsageError, bad)
            }
        }
    }

    func testResourceFolderFindsTheSDXLModels() throws {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("sdxl-resources-\(UUID())")
        defer { try? FileManager.default.removeItem(at: folder) }
        for name in ["TextEncoder", "TextEncoder2", "UnetChunk1", "UnetChunk2", "UnetRefinerChunk1", "UnetRefinerChunk2",
                     "VAEDecoder"] {
            try FileManager.default.createDirectory(at: folder.appendingPathComponent("\(name).mlpackage"),
                                                    withIntermediateDirectories: true)
        }
        for name in ["vocab.json", "merges.txt"] {
            try FileManager.default.copyItem(at: Golden.repositoryRoot.appendingPathComponent("models/tokenizer/\(name)"),
                                             to: folder.appendingPathComponent(name))
        }
        try Data((Self.golden["pipeline_config"] as! String).utf8).write(to: folder.appendingPathComponent("pipeline_config.json"))
        let resources = try ResourceFolder(path: folder.path)
        XCTAssertTrue(resources.chunkedUnet)
        XCTAssertEqual(resources.refinerNames, ["UnetRefinerChunk1", "UnetRefinerChunk2"])
        let first = try resources.tokenizer()
        let second = try resources.tokenizer2(settings: try resources.pipelineSettings(), first: first)
        XCTAssertEqual([first.padId, second.padId], [49407, 0])
        try FileManager.default.createDirectory(at: folder.appendingPathComponent("UnetRefiner.mlpackage"),
                                                withIntermediateDirectories: true)
        try FileManager.default.removeItem(at: folder.appendingPathComponent("UnetRefinerChunk2.mlpackage"))
        XCTAssertEqual(try ResourceFolder(path: folder.path).refinerNames, ["UnetRefiner"])
        try FileManager.default.removeItem(at: folder.appendingPathComponent("TextEncoder2.mlpackage"))
        XCTAssertThrowsError(try ResourceFolder(path: folder.path)) { error in
            XCTAssertTrue("\(error)".contains("TextEncoder2.mlmodelc"), "\(error)")
        }
    }

    func testTimeIdsFollowTheBundlesLayout() throws {
        var config = GenerationConfig(prompt: "p")
        config.originalSize = [64, 96]
        config.cropsCoordsTopLeft = [8, 16]
        let size: [Double] = [128, 256]
        XCTAssertEqual(try StableDiffusionXLPipeline.timeIdRow(TimeId.base, config: config, imageSize: size, aestheticScore: 6),
                       [64, 96, 8, 16, 128, 256])  // the target defaults to the image size
        XCTAssertEqual(try StableDiffusionXLPipeline.timeIdRow(TimeId.refiner, config: config, imageSize: size, aestheticScore: 2.5),
                       [64, 96, 8, 16, 2.5])
        XCTAssertEqual(try StableDiffusionXLPipeline.timeIdRow([.targetWidth, .cropTop], config: config, imageSize: size,
                                                               aestheticScore: 6), [256, 8])
    }

    func testConditioningMatchesPython() throws {
        XCTAssertGreaterThanOrEqual(Self.cases.count, 8)
        for entry in Self.cases {
            let pipe = try Self.pipeline(entry)
            let config = Self.config(entry)
            let label = "\(config.prompt.prefix(40).debugDescription) seed \(config.seed)"
            let encodings = try pipe.encodePair(config)
            let base = try pipe.baseConditioning(config, encodings: encodings)
            check(base, entry, prefix: "", label: label)
            if config.refinerStart != nil {
                check(try pipe.refinerConditioning(config, encodings: encodings), entry, prefix: "refiner_", label: label)
            }
        }
    }

    private func check(_ conditioning: XLConditioning, _ entry: [String: Any], prefix: String, label: String) {
        let layout = conditioning.hidden.unetTextLayout()  // Python's golden is in the UNet's (B, C, 1, S)
        XCTAssertEqual(layout.shape, ints(entry["\(prefix)embeddings_shape"]), label)
        XCTAssertLessThanOrEqual(relativeError(layout.scalars, floats(entry["\(prefix)embeddings"])), Self.weightedTolerance, label)
        XCTAssertEqual(conditioning.added.timeIds.scalars, floats(entry["\(prefix)time_ids"]), label)
        XCTAssertLessThanOrEqual(relativeError(conditioning.added.textEmbeds.scalars, floats(entry["\(prefix)text_embeds"])),
                                 Self.tolerance, label)
    }

    func testGenerationsMatchPython() throws {
        for entry in Self.cases {
            let config = Self.config(entry)
            let label = "\(config.prompt.prefix(40).debugDescription) seed \(config.seed)"
            var steps = 0
            let result = try XCTUnwrap(try Self.pipeline(entry).generate(config) { step, total in
                steps = total
                return step <= total
            }.first)
            XCTAssertEqual(steps, result.timesteps.count, label)
            XCTAssertLessThanOrEqual(relativeError(result.latents.scalars, floats(entry["latents"])), Self.tolerance, label)
            let rgb = RGBImage(decoderOutput: result.image)
            XCTAssertEqual(rgb.bytes.prefix(48).map(Int.init), ints(entry["rgb_head"]), label)
            XCTAssertEqual(Int(CRC32.checksum(rgb.bytes)), entry["rgb_crc32"] as! Int, label)
        }
    }

    func testRefinerRunsTheLastStepsOnly() throws {
        let entry = try XCTUnwrap(Self.cases.first { $0["refiner_start"] is NSNumber })
        let config = Self.config(entry)
        let split = StableDiffusionXLPipeline.refinerSplit(config.refinerStart!, kind: config.scheduler,
                                                           stepCount: config.stepCount, config: Self.schedulerConfig)
        let all = config.scheduler.make(stepCount: config.stepCount, config: Self.schedulerConfig).timesteps
        XCTAssertEqual(split.baseCount + all.count - split.refiner.startIndex, all.count)  // each step once
        XCTAssertTrue(all.prefix(split.baseCount).allSatisfy { $0 >= 1000 * (1 - config.refinerStart!) })
        let result = try XCTUnwrap(try Self.pipeline(entry).generate(config).first)
        XCTAssertEqual(result.timesteps, all)
        var baseOnly = config
        baseOnly.refinerStart = nil
        let base = try XCTUnwrap(try Self.pipeline(entry).generate(baseOnly).first)
        XCTAssertGreaterThan(relativeError(base.latents.scalars, result.latents.scalars), 1e-3)  // the refiner ran
    }

    func testForceZerosOnlyForAnEmptyNegativePrompt() throws {
        let entry = Self.cases[0]
        var config = Self.config(entry)
        let pipe = try Self.pipeline(entry)
        config.negativePrompt = ""
        let zeroed = try pipe.baseConditioning(config, encodings: try pipe.encodePair(config))
        XCTAssertEqual(Set(zeroed.hidden.batchItem(0).scalars), [0])
        XCTAssertEqual(Set(zeroed.added.textEmbeds.batchItem(0).scalars), [0])
        config.negativePrompt = "blurry"
        let encoded = try pipe.baseConditioning(config, encodings: try pipe.encodePair(config))
        XCTAssertNotEqual(Set(encoded.hidden.batchItem(0).scalars), [0])
    }

    func testSecondTokenizerPadsWithItsOwnToken() throws {
        let first = Golden.tokenizer.encode("a cat"), second = try Self.tokenizer2().encode("a cat")
        XCTAssertEqual(Array(first.prefix(4)), Array(second.prefix(4)))
        XCTAssertEqual([first.last, second.last], [49407, 0])
        XCTAssertThrowsError(try Golden.tokenizer.padding(with: "no such token"))
    }

    func testBadRequestsAreRefused() throws {
        let entry = Self.cases[0]
        var config = Self.config(entry)
        for start in [0.0, 1.0, -0.5, .nan] {
            config.refinerStart = start
            XCTAssertThrowsError(try Self.pipeline(entry).generate(config)) { error in
                XCTAssertEqual(error as? PipelineError, .badRefinerStart(start))
            }
        }
        config.refinerStart = 0.5
        XCTAssertThrowsError(try Self.pipeline(entry, refiner: false).generate(config)) { error in
            XCTAssertEqual(error as? PipelineError, .missingRefiner)
        }
        config.refinerStart = nil
        config.startImage = ClosedForm.testImage(height: 64, width: 64)
        XCTAssertThrowsError(try Self.pipeline(entry, encoder: false).generate(config)) { error in
            XCTAssertEqual(error as? PipelineError, .missingImageEncoder)
        }
        config.strength = 0.05
        XCTAssertThrowsError(try Self.pipeline(entry).generate(config)) { error in
            XCTAssertEqual(error as? PipelineError, .strengthTooSmall(0.05, steps: config.stepCount))
        }
        config.startImage = nil
        config.originalSize = [64]
        XCTAssertThrowsError(try Self.pipeline(entry).generate(config))
    }
}
