import XCTest
@testable import StableDiffusion
import StableDiffusionTestSupport

/// Prompts of several windows and packages of several sizes (issue 18), against the Python pipeline
/// (scripts/make_prompt_vectors.py: `long_prompt` and `pipeline_configs` of prompt_weights_golden.json).
final class LongPromptTests: XCTestCase {
    var long: [String: Any] { PromptWeightingTests.golden["long_prompt"] as! [String: Any] }
    var runs: [[String: Any]] { long["runs"] as! [[String: Any]] }

    private func pipeline(maxChunks: Int, unet: NoisePredicting = ClosedForm.Denoiser()) -> StableDiffusionPipeline {
        let models = PipelineModels(textEncoder: ClosedForm.TextEncoder(), unet: unet, decoder: ClosedForm.Decoder())
        return StableDiffusionPipeline(tokenizer: Golden.tokenizer, models: models, promptChunkCounts: Array(1...maxChunks))
    }

    private func config() -> GenerationConfig {
        var config = GenerationConfig(prompt: long["prompt"] as! String)
        config.negativePrompt = long["negative_prompt"] as! String
        return config
    }

    func testWindowsOfALongPromptMatchPython() {
        XCTAssertEqual(runs.count, 2)
        for run in runs {
            let maxChunks = run["max_prompt_chunks"] as! Int
            let pipe = pipeline(maxChunks: maxChunks)
            let windows = pipe.promptWindows(config().prompt)
            XCTAssertEqual(windows.ids, (run["ids"] as! [Any]).map { ints($0) }, "max \(maxChunks)")
            XCTAssertEqual(windows.weights, (run["weights"] as! [Any]).map { floats($0) }, "max \(maxChunks)")
            XCTAssertEqual(windows.truncated, !(run["warnings"] as! [String]).isEmpty)
            let negative = pipe.promptWindows(config().negativePrompt, minCount: windows.count)
            XCTAssertEqual(negative.ids, (run["negative_ids"] as! [Any]).map { ints($0) })  // padded to as many windows
        }
    }

    func testConcatenatedWeightedEmbeddingsMatchPython() throws {
        for run in runs {
            let hidden = try pipeline(maxChunks: run["max_prompt_chunks"] as! Int).textEmbeddings(config())
            let layout = hidden.unetTextLayout()  // Python's golden is in the UNet's (B, C, 1, S)
            XCTAssertEqual(layout.shape, ints(run["embeddings_shape"]))
            XCTAssertLessThan(relativeError(layout.scalars, floats(run["embeddings"])), 1e-5)
        }
    }

    func testTruncationWarnsAsPython() {
        for run in runs {
            var settings = PipelineSettings()
            settings.maxPromptChunks = run["max_prompt_chunks"] as! Int
            let warning = settings.truncationWarning(prompts: [config().prompt, config().negativePrompt],
                                                     tokenizer: Golden.tokenizer)
            XCTAssertEqual(warning.map { [$0] } ?? [], run["warnings"] as! [String])
            XCTAssertEqual(pipeline(maxChunks: settings.maxPromptChunks).truncationWarning(config()), warning)
        }
    }

    func testTheUnetGetsTheFewestWindowsItTakes() throws {
        let unet = RecordingUnet()
        var config = config()
        config.stepCount = 1
        config.latentShape = [1, 4, 2, 2]
        _ = try pipeline(maxChunks: 4, unet: unet).generate(config)
        XCTAssertEqual(unet.calls.first?.hidden.shape, [2, 3 * 77, ClosedForm.hiddenSize])
        // A UNet of 1 or 4 windows: a 3-window prompt and its negative both take 4.
        let models = PipelineModels(textEncoder: ClosedForm.TextEncoder(), unet: unet, decoder: ClosedForm.Decoder())
        let sparse = StableDiffusionPipeline(tokenizer: Golden.tokenizer, models: models, promptChunkCounts: [4, 1])
        XCTAssertEqual(try sparse.textEmbeddings(config).shape, [2, 4 * 77, ClosedForm.hiddenSize])
        config.prompt = "a cat"
        XCTAssertEqual(try sparse.textEmbeddings(config).shape, [2, 77, ClosedForm.hiddenSize])
    }

    func testPaddedWindowsEncodeLikeTheirOwn() throws {
        // The negative prompt's extra windows are empty ones (start, end, padding), encoded on their own.
        let pipe = pipeline(maxChunks: 3)
        let hidden = try pipe.textEmbeddings(config())
        let empty = try ClosedForm.TextEncoder().encode(tokenIds: Golden.tokenizer.windows("").ids[0])
        let negative = hidden.batchItem(0).scalars
        let width = 77 * ClosedForm.hiddenSize
        XCTAssertEqual(Array(negative[(2 * width)...]), empty.scalars)
    }
}

/// pipeline_config.json's sizes and prompt windows, read as python_coreml_sd.bundle.resources.shapes_of reads them.
final class PackageShapesTests: XCTestCase {
    func testSizesAndWindowCountsMatchPython() throws {
        let configs = PromptWeightingTests.golden["pipeline_configs"] as! [[String: Any]]
        XCTAssertGreaterThan(configs.count, 3)
        for entry in configs {
            let json = entry["json"] as! String
            let settings = try PipelineSettings(json: Data(json.utf8))
            XCTAssertEqual(settings.latentSizes, (entry["latent_sizes"] as! [Any]).map { ints($0) }, json)
            XCTAssertEqual(settings.promptChunkCounts, ints(entry["prompt_chunk_counts"]), json)
        }
    }

    func testUnusableShapesAreRefused() {
        for bad in [#"{"latent_sizes": []}"#, #"{"latent_sizes": [[64]]}"#, #"{"latent_sizes": [[64, 0]]}"#,
                    #"{"latent_sizes": "64x64"}"#, #"{"max_prompt_chunks": 0}"#] {
            XCTAssertThrowsError(try PipelineSettings(json: Data(bad.utf8)), bad)
        }
    }

    func testHeightAndWidthPickAListedSize() throws {
        let sizes = [[64, 64], [96, 64], [64, 96]]
        XCTAssertEqual(try PipelineSettings.latentSize(height: nil, width: nil, sizes: sizes), [64, 64])
        XCTAssertEqual(try PipelineSettings.latentSize(height: 768, width: 512, sizes: sizes), [96, 64])
        XCTAssertEqual(try PipelineSettings.latentSize(height: nil, width: 768, sizes: sizes), [64, 96])  // height: default's
        XCTAssertThrowsError(try PipelineSettings.latentSize(height: 768, width: 768, sizes: sizes)) { error in
            XCTAssertEqual("\(error)", "--height 768 --width 768: the models take 512x512, 768x512, 512x768 pixels "
                           + "(height x width); pass one of them, or reconvert with --latent-sizes")
        }
    }

    func testTheCommandLineTakesHeightAndWidth() throws {
        let options = try CommandLineOptions.parse(["--resource-path", "r", "--prompt", "p", "--height", "768", "--width=512"])
        XCTAssertEqual(options.height, 768)
        XCTAssertEqual(options.width, 512)
        XCTAssertNil(try CommandLineOptions.parse(["--resource-path", "r", "--prompt", "p"]).height)
        XCTAssertThrowsError(try CommandLineOptions.parse(["--resource-path", "r", "--prompt", "p", "--height", "0"]))
        XCTAssertTrue(CommandLineOptions.usage.contains("--height <n>, --width <n>"))
    }
}
