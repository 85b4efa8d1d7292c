import Foundation
import XCTest
@testable import StableDiffusion

final class CommandLineTests: XCTestCase {
    func testParsesEveryFlag() throws {
        let options = try CommandLineOptions.parse([
            "--resource-path", "/r", "--prompt", "a cat", "--negative-prompt=blurry", "--image-count", "2",
            "--step-count", "25", "--seed", "4294967295", "--guidance-scale", "5.5", "--scheduler", "dpmpp",
            "--rng", "torch", "--compute-units", "cpuAndNeuralEngine", "--output-path", "out", "--image", "in.png",
            "--strength", "0.7", "--disable-safety", "--reduce-memory", "--prediction-type", "v_prediction",
        ])
        XCTAssertEqual(options.resourcePath, "/r")
        XCTAssertEqual(options.negativePrompt, "blurry")
        XCTAssertEqual(options.imageCount, 2)
        XCTAssertEqual(options.stepCount, 25)
        XCTAssertEqual(options.seed, .max)
        XCTAssertEqual(options.guidanceScale, 5.5)
        XCTAssertEqual(options.scheduler, .dpmpp)
        XCTAssertEqual(options.rng, .torch)
        XCTAssertEqual(options.computeUnits, .cpuAndNeuralEngine)
        XCTAssertEqual(options.imagePath, "in.png")
        XCTAssertEqual(options.strength, 0.7)
        XCTAssertTrue(options.disableSafety && options.reduceMemory)
        XCTAssertEqual(options.predictionType, .vPrediction)
    }

    func testSDXLFlagsReachTheRequest() throws {
        let options = try CommandLineOptions.parse([
            "--resource-path", "r", "--prompt", "p", "--original-size", "512", "768", "--crops-coords-top-left", "0", "32",
            "--target-size", "1024", "1024", "--refiner-start", "0.8", "--aesthetic-score", "7", "--negative-aesthetic-score", "2",
        ])
        let config = options.generationConfig()
        XCTAssertEqual(config.originalSize, [512, 768])
        XCTAssertEqual(config.cropsCoordsTopLeft, [0, 32])
        XCTAssertEqual(config.targetSize, [1024, 1024])
        XCTAssertEqual(config.refinerStart, 0.8)
        XCTAssertEqual([config.aestheticScore, config.negativeAestheticScore], [7, 2])
        XCTAssertEqual(options.xlFlags, ["--original-size", "--crops-coords-top-left", "--target-size", "--refiner-start",
                                         "--aesthetic-score"])
        let plain = try CommandLineOptions.parse(["--resource-path", "r", "--prompt", "p"])
        XCTAssertEqual(plain.xlFlags, [])
        XCTAssertNil(plain.generationConfig().refinerStart)  // the Python pipeline's defaults
        XCTAssertEqual([plain.aestheticScore, plain.negativeAestheticScore], [6, 2.5])
        for start in ["0", "1", "-0.1", "nan", "x"] {
            XCTAssertThrowsError(try CommandLineOptions.parse(["--resource-path", "r", "--prompt", "p", "--refiner-start", start]))
        }
        XCTAssertThrowsError(try CommandLineOptions.parse(["--resource-path", "r", "--prompt", "p", "--target-size", "5"]))
    }

    func testDefaultsMatchThePythonPipeline() throws {
        let options = try CommandLineOptions.parse(["--resource-path", "r", "--prompt", "p"])
        XCTAssertEqual(options.rng, .numpy)
        XCTAssertEqual(options.scheduler, .pndm)
        XCTAssertEqual(options.generationConfig().guidanceScale, 7.5)
    }

    func testSchedulerAndSpacingFlags() throws {
        let base = ["--resource-path", "r", "--prompt", "p"]
        for kind in SchedulerKind.allCases {
            XCTAssertEqual(try CommandLineOptions.parse(base + ["--scheduler", kind.rawValue]).scheduler, kind)
        }
        let options = try CommandLineOptions.parse(base + ["--scheduler", "dpmpp", "--karras-sigmas",
                                                           "--timestep-spacing", "trailing"])
        XCTAssertEqual(options.timestepSpacing, .trailing)
        XCTAssertTrue(options.karrasSigmas)
        let config = options.generationConfig(schedulerConfig: .stableDiffusion).effectiveSchedulerConfig
        XCTAssertEqual(config.timestepSpacing, .trailing)
        XCTAssertTrue(config.useKarrasSigmas)
        // Without flags the bundle's settings stand.
        var v = SchedulerConfig.stableDiffusion
        v.predictionType = .vPrediction
        v.timestepSpacing = .leading
        let plain = try CommandLineOptions.parse(base).generationConfig(schedulerConfig: v).effectiveSchedulerConfig
        XCTAssertEqual(plain, v)
        XCTAssertThrowsError(try CommandLineOptions.parse(base + ["--karras-sigmas"]))  // pndm
        XCTAssertThrowsError(try CommandLineOptions.parse(base + ["--timestep-spacing", "karras"]))
        XCTAssertTrue(OutputNaming.parameters(options, seed: 1).contains(#""timestep_spacing":"trailing""#))
    }

    func testHelpExplainsEverySchedulerAndSpacing() {
        for name in SchedulerKind.allCases.map(\.rawValue) + TimestepSpacing.allCases.map(\.rawValue) {
            XCTAssertTrue(CommandLineOptions.usage.contains("  \(name) "), name)
        }
        XCTAssertTrue(CommandLineOptions.usage.contains("--karras-sigmas"))
    }

    func testHelpNeedsNothingElse() throws {
        XCTAssertTrue(try CommandLineOptions.parse(["--help"]).help)
    }

    func testControlNetAndMaskFlags() throws {
        let options = try CommandLineOptions.parse([
            "--resource-path", "r", "--prompt", "p", "--controlnet", "Canny", "Depth", "--controlnet-inputs", "e.png", "d.png",
            "--controlnet-scale", "0.5", "-1", "--image", "in.png", "--mask", "m.png", "--seed", "3",
        ])
        XCTAssertEqual(options.controlNets, ["Canny", "Depth"])
        XCTAssertEqual(options.controlNetInputs, ["e.png", "d.png"])
        XCTAssertEqual(options.maskPath, "m.png")
        XCTAssertEqual(options.seed, 3)
        let config = options.generationConfig()
        XCTAssertEqual(config.controlScales, [0.5, -1])
        XCTAssertEqual(config.strength, 1)  // inpainting's default
        XCTAssertEqual(options.generationConfig(family: .sdxl).strength, StableDiffusionXLPipeline.defaultInpaintStrength)
        XCTAssertTrue(OutputNaming.parameters(options, seed: 1, family: .sdxl).contains(#""strength":0.9999"#))
        XCTAssertEqual(try CommandLineOptions.parse(["--resource-path", "r", "--prompt", "p", "--image", "i.png"])
            .generationConfig().strength, 0.75)
        // The ControlNet inpaint route: one inpaint ControlNet needs no condition image with --mask; two do.
        let route = ["--resource-path", "r", "--prompt", "p", "--image", "i.png", "--mask", "m.png", "--controlnet", "Inpaint"]
        XCTAssertEqual(try CommandLineOptions.parse(route).controlNetInputs, [])
        XCTAssertThrowsError(try CommandLineOptions.parse(route + ["Canny"])) {
            XCTAssertEqual("\($0)",
                           "--controlnet needs --controlnet-inputs IMAGE, one per ControlNet (--controlnet Inpaint Canny)")
        }
        XCTAssertThrowsError(try CommandLineOptions.parse(Array(route.dropFirst(4).prefix(2)) + ["--resource-path", "r", "--prompt", "p",
                                                                                              "--controlnet", "Inpaint"])) {
            XCTAssertEqual("\($0)", "--controlnet needs --controlnet-inputs IMAGE, one per ControlNet (--controlnet Inpaint)")
        }
    }

    func testBadControlNetAndMaskInput() {
        let base = ["--resource-path", "r", "--prompt", "p"]
        let cases: [([String], String)] = [
            (["--mask", "m.png"], "--mask needs --image IMAGE: the picture whose white-masked part is repainted"),
            (["--controlnet", "A", "B", "--controlnet-inputs", "a.png"],
             "--controlnet-inputs: 1 image for 2 ControlNets (--controlnet A B); pass one condition image per ControlNet, "
             + "in the same order"),
            (["--controlnet", "A", "--controlnet-inputs", "a.png", "b.png"],
             "--controlnet-inputs: 2 images for 1 ControlNet (--controlnet A); pass one condition image per ControlNet, "
             + "in the same order"),
            (["--controlnet", "A"], "--controlnet needs --controlnet-inputs IMAGE, one per ControlNet (--controlnet A)"),
            (["--image", "i.png", "--strength", "0"], "--strength must be in (0, 1], got 0"),
            (["--controlnet", "A", "--controlnet-inputs", "a.png", "--controlnet-scale", "nan"],
             "--controlnet-scale must be a number in -100.0 ... 100.0, got 'nan'"),
            (["--controlnet-inputs", "a.png"], "--controlnet-inputs needs --controlnet NAME, one per image"),
            (["--controlnet", "--prompt", "q"], "--controlnet needs at least one value"),
            (["--controlnet", "A", "B", "--controlnet-inputs", "a.png", "b.png", "--controlnet-scale", "1", "2", "3"],
             "--controlnet-scale: 3 scales for 2 ControlNets (--controlnet A B); pass one for all or one each"),
            (["--controlnet", "A", "--controlnet-inputs", "a.png", "--controlnet-scale", "x"],
             "--controlnet-scale must be a number in -100.0 ... 100.0, got 'x'"),
        ]
        for (arguments, message) in cases {
            XCTAssertThrowsError(try CommandLineOptions.parse(base + arguments)) { XCTAssertEqual("\($0)", message) }
        }
    }

    /// A mask of another pixel size than the image is refused, as the Python pipeline refuses it (not resized to fit).
    func testMaskMustHaveTheImageSize() throws {
        XCTAssertNoThrow(try CommandLineOptions.checkMaskSize(mask: (64, 32), maskPath: "m", image: (64, 32), imagePath: "i"))
        XCTAssertThrowsError(try CommandLineOptions.checkMaskSize(mask: (64, 64), maskPath: "m.png", image: (64, 32),
                                                                  imagePath: "i.png")) {
            XCTAssertEqual("\($0)", "--mask m.png is 64x64 but --image i.png is 64x32; the mask must cover the image pixel "
                           + "for pixel (white: repaint)")
        }
        let options = try CommandLineOptions.parse(["--resource-path", "r", "--prompt", "p", "--image", "i", "--mask", "m"])
        XCTAssertThrowsError(try options.checkMaskSize { $0 == "m" ? (8, 8) : (16, 8) })
        XCTAssertNoThrow(try options.checkMaskSize { $0 == "m" ? nil : (16, 8) })  // not a PNG: left to the reading
        XCTAssertNoThrow(try options.checkMaskSize())  // no such files
    }

    /// Images up to 8192 pixels a side are read, as the Python pipeline's load_image.
    func testImagesUpTo8192PixelsASide() throws {
        let options = try CommandLineOptions.parse(["--resource-path", "r", "--prompt", "p", "--image", "i", "--mask", "m",
                                                    "--controlnet", "A", "--controlnet-inputs", "c"])
        XCTAssertEqual(options.inputFiles.map(\.flag), ["--image", "--mask", "--controlnet-inputs"])
        XCTAssertNoThrow(try options.checkImageSides { _ in (8192, 8192) })
        XCTAssertThrowsError(try options.checkImageSides { $0 == "c" ? (100, 8193) : (8192, 10) }) {
            XCTAssertEqual("\($0)",
                           "--controlnet-inputs c is 100x8193; images up to 8192 pixels a side are read (resize it first)")
        }
    }

    /// img2img must leave a step to run, as the Python pipeline's initial_latents demands; checked before models load.
    func testStrengthMustLeaveAStep() throws {
        let base = ["--resource-path", "r", "--prompt", "p", "--image", "i.png"]
        let check = { (arguments: [String], family: ModelFamily) in
            try CommandLineOptions.parse(base + arguments).checkStrength(schedulerConfig: .stableDiffusion, family: family)
        }
        XCTAssertThrowsError(try check(["--strength", "0.05", "--step-count", "10", "--scheduler", "euler"], .sd)) {
            XCTAssertEqual("\($0)", "--strength 0.05 is too small for 10 steps: no denoising step would run (with --mask, "
                           + "SDXL's default is 0.9999, as diffusers'); pass more --step-count or a larger --strength")
        }
        XCTAssertNoThrow(try check(["--strength", "0.1", "--step-count", "10", "--scheduler", "euler"], .sd))
        XCTAssertNoThrow(try check(["--mask", "m.png", "--step-count", "1", "--scheduler", "euler"], .sd))  // 1: from noise
        XCTAssertThrowsError(try check(["--mask", "m.png", "--step-count", "1", "--scheduler", "euler"], .sdxl))  // 0.9999
        XCTAssertNoThrow(try CommandLineOptions.parse(Array(base.prefix(4)) + ["--strength", "0.01"])
            .checkStrength(schedulerConfig: .stableDiffusion, family: .sd))  // text to image: no strength used
    }

    func testBadInputIsOneClearLine() {
        let cases: [([String], String)] = [
            (["--prompt", "p"], "--resource-path is required"),
            (["--resource-path", "r"], "--prompt is required"),
            (["--resource-path", "r", "--prompt", "p", "--steps", "3"], "unknown option '--steps' (see --help)"),
            (["--resource-path", "r", "--prompt"], "--prompt needs a value"),
            (["--resource-path", "r", "--prompt", "p", "--bogus"], "unknown option '--bogus' (see --help)"),
            (["--resource-path", "r", "--prompt", "p", "--seed", "-1"], "--seed must be a number in 0 ... 4294967295, got '-1'"),
            (["--resource-path", "r", "--prompt", "p", "--strength", "2"], "--strength must be a number in 0.0 ... 1.0, got '2'"),
            (["--resource-path", "r", "--prompt", "p", "--rng", "philox"], "--rng must be one of numpy, torch, nvidia, got 'philox'"),
            (["--resource-path", "r", "--prompt", "p", "extra"], "unexpected argument 'extra'"),
            (["--resource-path", "r", "--prompt", "p", "--disable-safety=yes"], "--disable-safety takes no value"),
        ]
        for (arguments, message) in cases {
            XCTAssertThrowsError(try CommandLineOptions.parse(arguments)) { error in
                XCTAssertEqual((error as? UsageError)?.description, message)
                XCTAssertFalse(message.contains("\n"))
            }
        }
    }

    func testResourceFolderValidation() throws {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("sd-resources-\(UUID())")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: folder) }
        XCTAssertThrowsError(try ResourceFolder(path: folder.path)) { error in
            XCTAssertTrue("\(error)".contains("TextEncoder.mlmodelc, VAEDecoder.mlmodelc, vocab.json, merges.txt, Unet.mlmodelc"), "\(error)")
        }
        for name in ["TextEncoder.mlmodelc", "VAEDecoder.mlmodelc", "UnetChunk1.mlmodelc", "UnetChunk2.mlmodelc"] {
            try FileManager.default.createDirectory(at: folder.appendingPathComponent(name), withIntermediateDirectories: true)
        }
        for name in ["vocab.json", "merges.txt"] {
            try FileManager.default.copyItem(at: Golden.repositoryRoot.appendingPathComponent("models/tokenizer/\(name)"),
                                             to: folder.appendingPathComponent(name))
        }
        let resources = try ResourceFolder(path: folder.path)
        XCTAssertTrue(resources.chunkedUnet)
        XCTAssertFalse(resources.hasSafetyChecker)
        XCTAssertEqual(try resources.tokenizer().encode("a").prefix(3), [49406, 320, 49407])
        XCTAssertThrowsError(try ResourceFolder(path: folder.path, needsEncoder: true))
        try FileManager.default.createDirectory(at: folder.appendingPathComponent("VAEEncoder.mlpackage"),
                                                withIntermediateDirectories: true)
        try FileManager.default.createDirectory(at: folder.appendingPathComponent("TextEncoder.mlpackage"),
                                                withIntermediateDirectories: true)
        let withPackages = try ResourceFolder(path: folder.path, needsEncoder: true)
        XCTAssertEqual(withPackages.model("VAEEncoder")?.lastPathComponent, "VAEEncoder.mlpackage")
        XCTAssertEqual(withPackages.model("TextEncoder")?.lastPathComponent, "TextEncoder.mlmodelc")
        XCTAssertNil(withPackages.model("SafetyChecker"))
    }
}
