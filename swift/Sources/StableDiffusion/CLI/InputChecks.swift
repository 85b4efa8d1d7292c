import Foundation

/// The CLI's checks of its input files and of --strength against the bundle, made before any model loads and
/// worded as the Python pipeline's (GenerationRequest.validate, initial_latents), with the Swift flags.
extension CommandLineOptions {
    public typealias PixelSize = (width: Int, height: Int)

    /// --mask must have --image's pixel size (not resized to fit, as the Python pipeline refuses it): one line otherwise.
    public static func checkMaskSize(mask: PixelSize, maskPath: String, image: PixelSize, imagePath: String) throws {
        guard mask != image else { return }
        throw UsageError("--mask \(maskPath) is \(mask.width)x\(mask.height) but --image \(imagePath) is "
                         + "\(image.width)x\(image.height); the mask must cover the image pixel for pixel (white: repaint)")
    }

    /// The mask check on the files' sizes by `size` (default: the PNG header's, on any platform); a file it cannot
    /// size is left to the reading (Core ML's ImageFile.size sizes any format).
    public func checkMaskSize(size: (String) -> PixelSize? = PNGHeader.size(path:)) throws {
        guard let maskPath, let imagePath, let mask = size(maskPath), let image = size(imagePath) else { return }
        try Self.checkMaskSize(mask: mask, maskPath: maskPath, image: image, imagePath: imagePath)
    }

    /// The image files given, by flag: --image, --mask, each --controlnet-inputs.
    public var inputFiles: [(flag: String, path: String)] {
        [("--image", imagePath), ("--mask", maskPath)].compactMap { flag, path in path.map { (flag, $0) } }
            + controlNetInputs.map { ("--controlnet-inputs", $0) }
    }

    /// The largest side of an image read, as the Python pipeline's load_image (MAX_IMAGE_SIDE).
    public static let maxImageSide = 8192

    /// Each input image must be at most `maxImageSide` pixels a side (sized by `size`, as checkMaskSize): one line
    /// naming the fix otherwise.
    public func checkImageSides(size: (String) -> PixelSize? = PNGHeader.size(path:)) throws {
        for (flag, path) in inputFiles {
            guard let image = size(path), max(image.width, image.height) > Self.maxImageSide else { continue }
            throw UsageError("\(flag) \(path) is \(image.width)x\(image.height); images up to \(Self.maxImageSide) pixels "
                             + "a side are read (resize it first)")
        }
    }

    /// img2img must leave a denoising step to run (the pipelines' strengthTooSmall, checked here before the models load):
    /// the scheduler of `schedulerConfig` (the bundle's) decides, and `family` the default strength with --mask.
    public func checkStrength(schedulerConfig: SchedulerConfig, family: ModelFamily) throws {
        let config = generationConfig(schedulerConfig: schedulerConfig, family: family)
        guard imagePath != nil, maskPath == nil || config.strength != 1 else { return }  // from noise alone
        let scheduler = scheduler.make(stepCount: stepCount, config: config.effectiveSchedulerConfig)
        let first = try StableDiffusionPipeline.img2imgStart(stepCount: stepCount, strength: config.strength,
                                                             order: scheduler.order)
        guard first >= scheduler.timesteps.count else { return }
        throw UsageError("--strength \(config.strength) is too small for \(stepCount) steps: no denoising step would run "
                         + "(with --mask, SDXL's default is 0.9999, as diffusers'); pass more --step-count or a larger "
                         + "--strength")
    }
}
