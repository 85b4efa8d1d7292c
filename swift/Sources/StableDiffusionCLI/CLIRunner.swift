import Foundation
import StableDiffusion
// Linux builds see the test-only Core ML stand-in; there only CoreMLTypeCheck compiles the Core ML path.
#if canImport(CoreML) && (!os(Linux) || COREML_STAND_IN)
import CoreML
#endif

enum CLIRunner {
    struct Unavailable: Error, CustomStringConvertible {
        let description: String
    }

    #if canImport(CoreML) && (!os(Linux) || COREML_STAND_IN)
    static func run(_ options: CommandLineOptions, resources: ResourceFolder, tokenizer: BPETokenizer) throws {
        let pipeline = try CoreMLPipeline(resources: resources, tokenizer: tokenizer,
                                          computeUnits: options.computeUnits.coreML, reduceMemory: options.reduceMemory,
                                          controlNets: options.controlNets)
        if !options.controlNets.isEmpty {
            let nets = try zip(options.controlNets, pipeline.controlNetModels).map { (name: $0, inputs: try $1.inputNames()) }
            try ResourceFolder.checkControlInputs(unetInputs: try pipeline.unet.inputNames(), controlNetInputs: nets,
                                                  family: pipeline.settings.family)
        }
        let schedulerConfig = try resources.schedulerConfig()
        var config = options.generationConfig(schedulerConfig: schedulerConfig, family: pipeline.settings.family)
        config.latentShape = try pipeline.latentShape(height: options.height, width: options.width)
        try options.checkImageSides(size: ImageFile.size(path:))
        try options.checkMaskSize(size: ImageFile.size(path:))
        if let path = options.imagePath { config.startImage = try ImageFile.read(path: path, shape: config.latentShape) }
        try checkInpainting(options, sampleChannels: try pipeline.unet.sampleShape()[1], latentChannels: config.latentShape[1])
        if let path = options.maskPath { config.mask = try ImageFile.readMask(path: path, shape: config.latentShape) }
        config.controlInputs = try options.controlNetInputs.map { try ImageFile.readCondition(path: $0, shape: config.latentShape) }
        if let mask = config.mask, let path = options.imagePath, options.controlNets.count == 1, config.controlInputs.isEmpty {
            // an inpaint ControlNet: the image in [0, 1] with the masked pixels at -1 is its condition
            config.controlInputs = [StableDiffusionPipeline.inpaintControlCondition(
                image: try ImageFile.readUnit(path: path, shape: config.latentShape), mask: mask)]
        }
        let images = try pipeline.generate(config) { step, total in
            print("step \(step)/\(total)")
            return true
        }
        try save(images, options: options, schedulerConfig: schedulerConfig, family: pipeline.settings.family)
    }

    /// A mask needs an inpainting UNet (2C + 1 sample channels) or ControlNets (the ControlNet inpaint route), and an
    /// inpainting UNet a mask.
    static func checkInpainting(_ options: CommandLineOptions, sampleChannels: Int, latentChannels: Int) throws {
        let inpainting = sampleChannels == 2 * latentChannels + 1
        if options.maskPath != nil && !inpainting && options.controlNets.isEmpty {
            throw UsageError("--mask needs an inpainting UNet (its sample takes \(2 * latentChannels + 1) channels: latents, mask, "
                             + "masked-image latents) and this bundle's takes \(sampleChannels); convert an inpainting model, "
                             + "or take the ControlNet inpaint route: --controlnet with an inpaint ControlNet")
        }
        if inpainting && !options.controlNets.isEmpty {
            throw UsageError("--mask with --controlnet is not supported yet for an inpainting UNet: inpaint without the ControlNet")
        }
        if inpainting && options.maskPath == nil {
            throw UsageError("this bundle's UNet is an inpainting UNet (its sample takes the mask and the masked image too): "
                             + "pass --image IMAGE and --mask MASK")
        }
    }

    static func save(_ images: [GeneratedImage], options: CommandLineOptions, schedulerConfig: SchedulerConfig,
                     family: ModelFamily) throws {
        let folder = URL(fileURLWithPath: options.outputPath, isDirectory: true)
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        for (index, image) in images.enumerated() {
            let seed = options.seed &+ UInt32(index)
            if image.isUnsafe {
                print("the safety checker flagged seed \(seed); the image was replaced by a black one")
            }
            let url = folder.appendingPathComponent(OutputNaming.fileName(prompt: options.prompt, seed: seed))
            let text = [(key: "parameters", value: OutputNaming.parameters(options, seed: seed, schedulerConfig: schedulerConfig,
                                                                                family: family))]
            try PNGWriter.write(RGBImage(decoderOutput: image.image), to: url, text: text)
            print("wrote \(url.path)")
        }
    }
    #else
    static func run(_ options: CommandLineOptions, resources: ResourceFolder, tokenizer: BPETokenizer) throws {
        throw Unavailable(description: "arguments and \(resources.url.path) are valid, but generating images needs Core ML, "
            + "which exists only on macOS 13+ / iOS 16+ (this build has no CoreML module)")
    }
    #endif
}
