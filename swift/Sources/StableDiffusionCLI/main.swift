import Foundation
import StableDiffusion

/// One line on stderr and a non-zero exit, so scripts can tell what went wrong.
func fail(_ message: String, code: Int32) -> Never {
    FileHandle.standardError.write(Data("StableDiffusionCLI: error: \(message)\n".utf8))
    exit(code)
}

/// SDXL's flags need an SDXL bundle (and --refiner-start its refiner, which inpainting does not take).
func checkFamily(_ options: CommandLineOptions, settings: PipelineSettings, resources: ResourceFolder) throws {
    guard settings.family == .sdxl else {
        if let flag = options.xlFlags.first {
            throw UsageError("\(flag) is for SDXL bundles (pipeline_config.json's family \"sdxl\"); \(resources.url.path) is not one")
        }
        return
    }
    if options.refinerStart != nil && resources.refinerNames == nil {
        throw UsageError("--refiner-start needs the refiner's UNet: \(resources.url.path) has no UnetRefiner.mlmodelc; convert "
                         + "with --refiner-version MODEL and bundle again")
    }
    if options.maskPath != nil && options.refinerStart != nil {
        throw UsageError(PipelineError.maskWithRefiner.description)
    }
}

let options: CommandLineOptions
do {
    options = try CommandLineOptions.parse(Array(CommandLine.arguments.dropFirst()))
} catch {
    fail("\(error)", code: 2)
}
if options.help {
    print(CommandLineOptions.usage)
    exit(0)
}

do {
    let resources = try ResourceFolder(path: options.resourcePath, needsEncoder: options.imagePath != nil,
                                       controlNets: options.controlNets)
    let tokenizer = try resources.tokenizer()
    // A bad scheduler_config.json or pipeline_config.json fails here, on any platform.
    let schedulerConfig = try resources.schedulerConfig()
    let settings = try resources.pipelineSettings()
    try checkFamily(options, settings: settings, resources: resources)
    try options.checkStrength(schedulerConfig: schedulerConfig, family: settings.family)
    for (flag, path) in options.inputFiles where !FileManager.default.fileExists(atPath: path) {
        throw UsageError("\(flag) \(path) does not exist")
    }
    // PNGs here; any format under Core ML
    try options.checkImageSides()
    try options.checkMaskSize()
    // A size the bundle does not list fails here, on any platform; without a list the UNet's shape decides (Core ML).
    if !settings.latentSizes.isEmpty {
        let size = try PipelineSettings.latentSize(height: options.height, width: options.width, sizes: settings.latentSizes)
        // Condition images of another aspect ratio are refused, not stretched (PNGs here; any format under Core ML).
        for path in options.controlNetInputs {
            guard let png = PNGHeader.size(path: path) else { continue }
            try PipelineSettings.checkConditionAspect(path: path, width: png.width, height: png.height, imageWidth: 8 * size[1],
                                                      imageHeight: 8 * size[0])
        }
    }
    if let warning = settings.truncationWarning(prompts: [options.prompt, options.negativePrompt], tokenizer: tokenizer) {
        FileHandle.standardError.write(Data("StableDiffusionCLI: warning: \(warning)\n".utf8))
    }
    try CLIRunner.run(options, resources: resources, tokenizer: tokenizer)
} catch let error as UsageError {
    fail(error.description, code: 2)
} catch let error as CLIRunner.Unavailable {
    fail(error.description, code: 3)
} catch {
    fail("\(error)", code: 1)
}
