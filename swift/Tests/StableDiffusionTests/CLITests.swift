import Foundation
import XCTest
@testable import StableDiffusion

/// Runs the built StableDiffusionCLI binary the way users do.
final class CLITests: XCTestCase {
    struct Run { let status: Int32; let stdout: String; let stderr: String }

    static func binary() throws -> URL {
        let candidates = [URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent(),
                          Bundle.main.bundleURL.deletingLastPathComponent(),
                          Bundle(for: CLITests.self).bundleURL.deletingLastPathComponent()]
        for folder in candidates {
            for url in [folder.appendingPathComponent("StableDiffusionCLI"),
                        folder.deletingLastPathComponent().appendingPathComponent("StableDiffusionCLI")]
            where FileManager.default.isExecutableFile(atPath: url.path) {
                return url
            }
        }
        throw XCTSkip("StableDiffusionCLI binary not found next to the test bundle (\(candidates.map(\.path)))")
    }

    func run(_ arguments: [String]) throws -> Run {
        let process = Process()
        process.executableURL = try Self.binary()
        process.arguments = arguments
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        try process.run()
        let stdout = out.fileHandleForReading.readDataToEndOfFile()
        let stderr = err.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return Run(status: process.terminationStatus, stdout: String(decoding: stdout, as: UTF8.self),
                   stderr: String(decoding: stderr, as: UTF8.self))
    }

    func testHelp() throws {
        let result = try run(["--help"])
        XCTAssertEqual(result.status, 0)
        XCTAssertTrue(result.stdout.contains("--resource-path"))
        XCTAssertTrue(result.stdout.contains("--reduce-memory"))
        for text in ["euler_a", "--timestep-spacing", "trailing", "--karras-sigmas", "SDXL's 0.9999", "ControlNet inpaint route",
                     "aspect ratio", "of its pixel size"] {
            XCTAssertTrue(result.stdout.contains(text), text)
        }
    }

    func testBadFlagIsOneLineAndExitTwo() throws {
        let result = try run(["--resource-path", "/tmp", "--prompt", "p", "--bogus"])
        XCTAssertEqual(result.status, 2)
        XCTAssertEqual(result.stderr, "StableDiffusionCLI: error: unknown option '--bogus' (see --help)\n")
    }

    func testMissingResourceFolder() throws {
        let result = try run(["--resource-path", "/nonexistent/sd", "--prompt", "p"])
        XCTAssertEqual(result.status, 2)
        XCTAssertEqual(result.stderr, "StableDiffusionCLI: error: resource folder /nonexistent/sd does not exist\n")
    }

    /// A Resources folder of placeholder models and the project's tokenizer; the caller removes it.
    func placeholderFolder() throws -> URL {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("sd-cli-\(UUID())")
        for name in ["TextEncoder.mlmodelc", "VAEDecoder.mlmodelc", "Unet.mlmodelc"] {
            try FileManager.default.createDirectory(at: folder.appendingPathComponent(name), withIntermediateDirectories: true)
        }
        for name in ["vocab.json", "merges.txt"] {
            try FileManager.default.copyItem(at: Golden.repositoryRoot.appendingPathComponent("models/tokenizer/\(name)"),
                                             to: folder.appendingPathComponent(name))
        }
        return folder
    }

    func testValidFolderWithoutCoreMLSaysSo() throws {
        #if canImport(CoreML) && !os(Linux)
        throw XCTSkip("Core ML is present: the CLI would try to load the placeholder models")
        #else
        let folder = try placeholderFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let result = try run(["--resource-path", folder.path, "--prompt", "a cat", "--scheduler", "dpmpp"])
        XCTAssertEqual(result.status, 3)
        XCTAssertTrue(result.stderr.contains("needs Core ML"), result.stderr)
        XCTAssertEqual(result.stderr.filter { $0 == "\n" }.count, 1)
        let euler = try run(["--resource-path", folder.path, "--prompt", "a cat", "--scheduler", "euler_a",
                             "--timestep-spacing", "trailing"])
        XCTAssertEqual(euler.status, 3, euler.stderr)
        try Data(#"{"beta_schedule": "sigmoid"}"#.utf8).write(to: folder.appendingPathComponent("scheduler_config.json"))
        let badConfig = try run(["--resource-path", folder.path, "--prompt", "a cat"])
        XCTAssertEqual(badConfig.status, 1)
        XCTAssertTrue(badConfig.stderr.contains("scheduler_config.json: unsupported beta_schedule"), badConfig.stderr)
        try FileManager.default.removeItem(at: folder.appendingPathComponent("scheduler_config.json"))
        let withImage = try run(["--resource-path", folder.path, "--prompt", "a cat", "--image", "in.png"])
        XCTAssertEqual(withImage.status, 2)
        XCTAssertTrue(withImage.stderr.contains("VAEEncoder.mlmodelc"), withImage.stderr)
        #endif
    }

    /// ControlNets need the controlled UNet and controlnet/<name> (Apple's layout); their images must exist.
    func testControlNetBundleChecks() throws {
        #if canImport(CoreML) && !os(Linux)
        throw XCTSkip("Core ML is present: the CLI would try to load the placeholder models")
        #else
        let folder = try placeholderFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let image = folder.appendingPathComponent("vocab.json").path  // any existing file passes the existence check
        let arguments = ["--resource-path", folder.path, "--prompt", "a cat", "--controlnet", "Canny", "--controlnet-inputs", image]
        let noUnet = try run(arguments)
        XCTAssertEqual(noUnet.status, 2)
        XCTAssertTrue(noUnet.stderr.contains("lacks ControlledUnet.mlmodelc (the UNet converted with --unet-support-controlnet, "
                                             + "needed by --controlnet), controlnet/Canny.mlmodelc"), noUnet.stderr)
        for name in ["ControlledUnet.mlmodelc", "controlnet/Canny.mlpackage"] {
            try FileManager.default.createDirectory(at: folder.appendingPathComponent(name), withIntermediateDirectories: true)
        }
        XCTAssertEqual(try run(arguments).status, 3)  // valid: only Core ML is missing
        // the ControlNet inpaint route: --mask with one inpaint ControlNet and no condition image
        try FileManager.default.createDirectory(at: folder.appendingPathComponent("VAEEncoder.mlmodelc"),
                                                withIntermediateDirectories: true)
        let route = try run(Array(arguments.prefix(6)) + ["--image", image, "--mask", image])
        XCTAssertEqual(route.status, 3, route.stderr)
        try FileManager.default.removeItem(at: folder.appendingPathComponent("Unet.mlmodelc"))  // a controlled UNet alone
        XCTAssertEqual(try run(arguments).status, 3)
        let plain = try run(Array(arguments.prefix(4)))
        XCTAssertEqual(plain.status, 2)
        XCTAssertTrue(plain.stderr.hasSuffix("holds only the controlled UNet (ControlledUnet.mlmodelc): pass --controlnet NAME "
                                             + "--controlnet-inputs IMAGE\n"), plain.stderr)
        // A condition image of another aspect ratio is refused in one line (the Python pipeline's rule), not stretched.
        try Data(#"{"latent_size": [64, 64], "latent_sizes": [[64, 64], [64, 96]]}"#.utf8)
            .write(to: folder.appendingPathComponent("pipeline_config.json"))
        let wide = Golden.testsFolder.appendingPathComponent("Resources/gradient_33x17.png").path
        let square = folder.appendingPathComponent("square.png")
        try PNGWriter.write(RGBImage(width: 16, height: 16, bytes: Array(repeating: 128, count: 768)), to: square)
        let refused = try run(Array(arguments.dropLast()) + [wide])
        XCTAssertEqual(refused.status, 2)
        XCTAssertEqual(refused.stderr, "StableDiffusionCLI: error: --controlnet-inputs \(wide) is 33x17, not the 512x512 aspect "
                       + "ratio of the images this UNet makes; crop it to that ratio (it is then resized)\n")
        XCTAssertEqual(try run(Array(arguments.dropLast()) + [square.path]).status, 3)
        XCTAssertEqual(try run(Array(arguments.dropLast()) + [wide, "--width", "768"]).status, 2)
        XCTAssertEqual(try run(Array(arguments.dropLast()) + [square.path, "--width", "768"]).status, 2)  // 512x768
        let missing = try run(Array(arguments.dropLast()) + ["/nonexistent/edges.png"])
        XCTAssertEqual(missing.stderr, "StableDiffusionCLI: error: --controlnet-inputs /nonexistent/edges.png does not exist\n")
        #endif
    }

    /// The Python pipeline's refusals of img2img and inpainting input, before any model loads: a mask of another pixel
    /// size than the image (from the PNG headers), a strength that leaves no step.
    func testMaskSizeAndStrengthChecks() throws {
        #if canImport(CoreML) && !os(Linux)
        throw XCTSkip("Core ML is present: the CLI would try to load the placeholder models")
        #else
        let folder = try placeholderFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        try FileManager.default.createDirectory(at: folder.appendingPathComponent("VAEEncoder.mlmodelc"),
                                                withIntermediateDirectories: true)
        let png = { (name: String, width: Int, height: Int) -> String in
            let url = folder.appendingPathComponent(name)
            try PNGWriter.write(RGBImage(width: width, height: height, bytes: Array(repeating: 255, count: 3 * width * height)),
                                to: url)
            return url.path
        }
        let (image, mask, wide) = (try png("image.png", 16, 16), try png("mask.png", 16, 16), try png("wide.png", 32, 16))
        let base = ["--resource-path", folder.path, "--prompt", "a cat", "--image", image]
        XCTAssertEqual(try run(base + ["--mask", mask]).status, 3)  // valid: on to Core ML
        let refused = try run(base + ["--mask", wide])
        XCTAssertEqual(refused.status, 2)
        XCTAssertEqual(refused.stderr, "StableDiffusionCLI: error: --mask \(wide) is 32x16 but --image \(image) is 16x16; "
                       + "the mask must cover the image pixel for pixel (white: repaint)\n")
        let huge = try png("huge.png", 8193, 1)
        XCTAssertEqual(try run(base + ["--mask", huge]).stderr, "StableDiffusionCLI: error: --mask \(huge) is 8193x1; images up "
                       + "to 8192 pixels a side are read (resize it first)\n")
        let other = folder.appendingPathComponent("vocab.json").path  // not a PNG: left to Core ML's reading
        XCTAssertEqual(try run(base + ["--mask", other]).status, 3)
        // Euler's 10 timesteps leave none at 0.05 (PNDM's 11 leave one, in Python too)
        let small = try run(base + ["--strength", "0.05", "--step-count", "10", "--scheduler", "euler"])
        XCTAssertEqual(small.status, 2)
        XCTAssertTrue(small.stderr.hasPrefix("StableDiffusionCLI: error: --strength 0.05 is too small for 10 steps"),
                      small.stderr)
        XCTAssertEqual(small.stderr.filter { $0 == "\n" }.count, 1, small.stderr)
        XCTAssertEqual(try run(base + ["--strength", "0"]).stderr,
                       "StableDiffusionCLI: error: --strength must be in (0, 1], got 0\n")
        XCTAssertEqual(try run(base + ["--strength", "0.05", "--step-count", "20", "--scheduler", "euler"]).status, 3)
        XCTAssertEqual(try run(base + ["--strength", "0.05", "--step-count", "10"]).status, 3)
        #endif
    }

    func testSDXLBundlesAndFlags() throws {
        #if canImport(CoreML) && !os(Linux)
        throw XCTSkip("Core ML is present: the CLI would try to load the placeholder models")
        #else
        let folder = try placeholderFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let base = ["--resource-path", folder.path, "--prompt", "a cat"]
        let sdOnly = try run(base + ["--refiner-start", "0.8"])
        XCTAssertEqual(sdOnly.status, 2)
        XCTAssertTrue(sdOnly.stderr.contains("--refiner-start is for SDXL bundles"), sdOnly.stderr)
        let config = SDXLTests.golden["pipeline_config"] as! String
        try Data(config.utf8).write(to: folder.appendingPathComponent("pipeline_config.json"))
        let noEncoder2 = try run(base)
        XCTAssertEqual(noEncoder2.status, 2)
        XCTAssertTrue(noEncoder2.stderr.contains("TextEncoder2.mlmodelc"), noEncoder2.stderr)
        try FileManager.default.createDirectory(at: folder.appendingPathComponent("TextEncoder2.mlpackage"),
                                                withIntermediateDirectories: true)
        let xl = ["--original-size", "64", "96", "--crops-coords-top-left", "8", "16", "--target-size", "128", "128"]
        XCTAssertEqual(try run(base + xl).status, 3)  // valid: on to Core ML
        let noRefiner = try run(base + ["--refiner-start", "0.8"])
        XCTAssertEqual(noRefiner.status, 2)
        XCTAssertTrue(noRefiner.stderr.contains("has no UnetRefiner.mlmodelc"), noRefiner.stderr)
        try FileManager.default.createDirectory(at: folder.appendingPathComponent("UnetRefiner.mlmodelc"),
                                                withIntermediateDirectories: true)
        XCTAssertEqual(try run(base + ["--refiner-start", "0.8", "--aesthetic-score", "7"]).status, 3)
        // SDXL image-to-image, inpainting (not with the refiner) and ControlNets go on to Core ML
        let image = folder.appendingPathComponent("vocab.json").path  // any existing file passes the existence check
        let inpaint = base + ["--image", image, "--mask", image]
        XCTAssertTrue(try run(inpaint).stderr.contains("lacks VAEEncoder.mlmodelc"))
        try FileManager.default.createDirectory(at: folder.appendingPathComponent("VAEEncoder.mlmodelc"),
                                                withIntermediateDirectories: true)
        XCTAssertEqual(try run(base + ["--image", image]).status, 3)
        XCTAssertEqual(try run(inpaint).status, 3)
        let refined = try run(inpaint + ["--refiner-start", "0.8"])
        XCTAssertEqual(refined.stderr, "StableDiffusionCLI: error: \(PipelineError.maskWithRefiner)\n")
        XCTAssertEqual(refined.status, 2)
        for name in ["ControlledUnet.mlmodelc", "controlnet/Canny.mlpackage"] {
            try FileManager.default.createDirectory(at: folder.appendingPathComponent(name), withIntermediateDirectories: true)
        }
        XCTAssertEqual(try run(base + ["--controlnet", "Canny", "--controlnet-inputs", image]).status, 3)
        for bad in [["--refiner-start", "1"], ["--original-size", "64"], ["--original-size=64", "64"]] {
            let result = try run(base + bad)
            XCTAssertEqual(result.status, 2, "\(bad)")
            XCTAssertEqual(result.stderr.filter { $0 == "\n" }.count, 1, result.stderr)
        }
        #endif
    }

    func testSizesAndLongPromptsOfTheBundle() throws {
        #if canImport(CoreML) && !os(Linux)
        throw XCTSkip("Core ML is present: the CLI would try to load the placeholder models")
        #else
        let folder = try placeholderFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let config = #"{"latent_size": [64, 64], "latent_sizes": [[64, 64], [96, 64]], "max_prompt_chunks": 2}"#
        try Data(config.utf8).write(to: folder.appendingPathComponent("pipeline_config.json"))
        let base = ["--resource-path", folder.path, "--prompt", "a cat"]
        let wrong = try run(base + ["--height", "512", "--width", "768"])
        XCTAssertEqual(wrong.status, 2)
        XCTAssertEqual(wrong.stderr, "StableDiffusionCLI: error: --height 512 --width 768: the models take 512x512, "
                       + "768x512 pixels (height x width); pass one of them, or reconvert with --latent-sizes\n")
        XCTAssertEqual(try run(base + ["--height", "768"]).status, 3)  // a listed size: on to the models
        // 150 tokens fill two windows of 75; one more does not fit.
        let twoWindows = Array(repeating: "cat", count: 150).joined(separator: " ")
        let fits = try run(["--resource-path", folder.path, "--prompt", twoWindows])
        XCTAssertEqual(fits.status, 3)
        XCTAssertFalse(fits.stderr.contains("warning"), fits.stderr)
        let long = try run(["--resource-path", folder.path, "--prompt", "a", "--negative-prompt", twoWindows + " dog"])
        XCTAssertEqual(long.status, 3)
        XCTAssertTrue(long.stderr.hasPrefix("StableDiffusionCLI: warning: prompt is longer than 154 tokens and was truncated\n"),
                      long.stderr)
        #endif
    }
}
