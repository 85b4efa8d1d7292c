import Foundation

public struct GenerationConfig: Sendable {
    public var prompt: String
    public var negativePrompt = ""
    /// Image i of a run uses seed + i, so any single image can be regenerated on its own.
    public var seed: UInt32 = 0
    public var imageCount = 1
    public var stepCount = 50
    public var guidanceScale: Float = 7.5
    public var scheduler: SchedulerKind = .pndm
    /// The model's scheduler settings (the bundle's scheduler_config.json, else SD 1.x's).
    public var schedulerConfig = SchedulerConfig.stableDiffusion
    /// Overrides of the model's settings (the CLI's flags); nil keeps the config's.
    public var predictionType: PredictionType?
    public var timestepSpacing: TimestepSpacing?
    public var useKarrasSigmas: Bool?
    public var rng: RandomSourceKind = .numpy
    /// (1, 4, height / 8, width / 8).
    public var latentShape = [1, 4, 64, 64]
    /// img2img: (1, 3, H, W) in [-1, 1], and how much of the schedule to run on it (0...1).
    public var startImage: Tensor?
    public var strength = 0.75
    /// Inpainting (a UNet taking 9 channels; with ControlNets the ControlNet inpaint route, a 4-channel UNet whose
    /// latents keep the image outside the mask): (1, 1, H, W) in [0, 1] at the start image's size, white (>= 0.5)
    /// repainted. Strength 1 starts from noise alone, as diffusers' StableDiffusionInpaintPipeline.
    public var mask: Tensor?
    /// ControlNets: one condition image (1, 3, H, W) in [0, 1] per model of PipelineModels.controlNets, in order,
    /// and their scales: one for all or one each (diffusers' controlnet_conditioning_scale).
    public var controlInputs: [Tensor] = []
    public var controlScales: [Float] = [1]
    public var disableSafety = false
    /// SDXL's micro-conditioning in pixels: original (height, width), crop top-left (y, x), target (height,
    /// width); nil sizes mean the image's size, as in diffusers.
    public var originalSize: [Double]?
    public var cropsCoordsTopLeft: [Double] = [0, 0]
    public var targetSize: [Double]?
    /// The SDXL refiner's time ids: the aesthetic score of the prompt and of the negative prompt.
    public var aestheticScore = 6.0
    public var negativeAestheticScore = 2.5
    /// SDXL: the base denoises the schedule down to this fraction, the refiner the rest (diffusers'
    /// denoising_end / denoising_start); nil: the base alone.
    public var refinerStart: Double?

    public init(prompt: String) {
        self.prompt = prompt
    }
}

extension GenerationConfig {
    /// The model's scheduler config with this request's overrides applied.
    public var effectiveSchedulerConfig: SchedulerConfig {
        var result = schedulerConfig
        if let predictionType { result.predictionType = predictionType }
        if let timestepSpacing { result.timestepSpacing = timestepSpacing }
        if let useKarrasSigmas { result.useKarrasSigmas = useKarrasSigmas }
        return result
    }
}

public struct GeneratedImage {
    public var latents: Tensor
    /// Decoded (1, 3, H, W) in [-1, 1]; all -1 (black) when the safety checker flagged it.
    public var image: Tensor
    public var isUnsafe: Bool
    public var timesteps: [Double]
}

public enum PipelineError: Error, CustomStringConvertible {
    case missingImageEncoder
    case badStrength(Double)
    case strengthTooSmall(Double, steps: Int)
    case cancelled
    case badEncoderOutput([Int])
    case badRefinerStart(Double)
    case missingRefiner
    case badTimeIds(String)
    case maskWithoutImage
    case controlCounts(nets: Int, images: Int, scales: Int)
    case missingControlledUnet
    case maskWithRefiner

    public var description: String {
        switch self {
        case .missingImageEncoder: return "img2img needs an image encoder (VAEEncoder.mlmodelc)"
        case .badStrength(let value): return "strength must be in 0...1, got \(value)"
        case .strengthTooSmall(let value, let steps):
            return "strength \(value) is too small for \(steps) steps: no denoising step would run"
        case .cancelled: return "generation cancelled"
        case .badEncoderOutput(let shape):
            return "the VAE encoder returned shape \(shape); expected its `latent` moments (1, 2 x latent channels, h, w)"
        case .badRefinerStart(let value):
            return "--refiner-start must be in (0, 1) (the fraction of the steps the base runs), got \(value)"
        case .missingRefiner: return "--refiner-start needs the refiner's UNet (UnetRefiner.mlmodelc)"
        case .badTimeIds(let detail): return detail
        case .maskWithoutImage: return "--mask needs --image IMAGE: the picture whose white-masked part is repainted"
        case .controlCounts(let nets, let images, let scales):
            return "\(nets) ControlNets, \(images) --controlnet-inputs images and \(scales) scales: pass one image per"
                + " ControlNet, in the same order, and one scale for all or one each"
        case .maskWithRefiner: return "--mask with --refiner-start is not supported yet: inpaint with the base alone"
        case .missingControlledUnet:
            return "ControlNets need the UNet converted with --unet-support-controlnet (ControlledUnet.mlmodelc)"
        }
    }
}

/// The Stable Diffusion loop over any model backend.
public struct StableDiffusionPipeline {
    /// SD 1.x and 2.x VAEs' `scaling_factor`; other families set theirs in the initializer.
    public static let defaultLatentScale: Float = 0.18215

    public let tokenizer: BPETokenizer
    public let models: PipelineModels
    public let sequenceLength: Int
    public let latentScale: Float
    /// How many text-encoder windows the UNet takes side by side, ascending (the bundle's
    /// PipelineSettings.promptChunkCounts; one window for UNets of one context).
    public let promptChunkCounts: [Int]

    public init(tokenizer: BPETokenizer, models: PipelineModels, sequenceLength: Int = 77,
                latentScale: Float = defaultLatentScale, promptChunkCounts: [Int] = [1]) {
        precondition(!promptChunkCounts.isEmpty && promptChunkCounts.allSatisfy { $0 > 0 }, "prompt window counts must be positive")
        self.latentScale = latentScale
        self.tokenizer = tokenizer
        self.models = models
        self.sequenceLength = sequenceLength
        self.promptChunkCounts = promptChunkCounts.sorted()
    }

    /// `progress(step, stepCount)` runs after each step; returning false cancels.
    public func generate(_ config: GenerationConfig, progress: (Int, Int) -> Bool = { _, _ in true }) throws -> [GeneratedImage] {
        try checkControl(config)
        if config.mask != nil && config.startImage == nil { throw PipelineError.maskWithoutImage }
        let hidden = try textEmbeddings(config)
        return try (0..<config.imageCount).map { index in
            try generateOne(config, seed: config.seed &+ UInt32(index), hidden: hidden, progress: progress)
        }
    }

    /// [negative/unconditional, conditional] embeddings (2, windows x sequenceLength, C), as the Python
    /// pipeline's encode_prompts: both prompts in the fewest windows the UNet takes that hold the longer.
    func textEmbeddings(_ config: GenerationConfig) throws -> Tensor {
        let texts = [config.negativePrompt, config.prompt]
        var windows = texts.map { promptWindows($0) }
        let longest = windows.map(\.count).max()!
        let count = promptChunkCounts.first { $0 >= longest } ?? longest  // truncation keeps longest <= the last
        // Only a prompt of other length is windowed again, padded to `count` windows.
        for i in windows.indices where windows[i].count != count {
            windows[i] = promptWindows(texts[i], minCount: count)
        }
        return Tensor.concatenateBatch(try windows.map(embeddings))
    }

    /// A prompt's weighted windows, at most as many as the UNet takes (the rest dropped; see
    /// PipelineSettings.truncationWarning for the warning).
    public func promptWindows(_ text: String, minCount: Int = 1) -> PromptWindows {
        tokenizer.windows(text, length: sequenceLength, minCount: minCount, maxCount: promptChunkCounts.last!)
    }

    /// The Python pipeline's warning when the request's prompt or negative prompt has more windows than the
    /// UNet takes (generate keeps the first ones); nil when both fit. For apps to show; the CLI prints it.
    public func truncationWarning(_ config: GenerationConfig) -> String? {
        guard [config.prompt, config.negativePrompt].contains(where: { promptWindows($0).truncated }) else { return nil }
        return PromptWindows.truncationWarning(windows: promptChunkCounts.last!, length: sequenceLength)
    }

    /// (1, windows x sequenceLength, C): each window encoded on its own and weighted (A1111's emphasis is
    /// per window), then the windows side by side along the sequence.
    func embeddings(_ windows: PromptWindows) throws -> Tensor {
        let parts = try zip(windows.ids, windows.weights).map { ids, weights in
            PromptWeighting.apply(weights, to: try models.textEncoder.encode(tokenIds: ids))
        }
        return Tensor.concatenateSequence(parts)
    }

    private func generateOne(_ config: GenerationConfig, seed: UInt32, hidden: Tensor,
                             progress: (Int, Int) -> Bool) throws -> GeneratedImage {
        var scheduler = config.scheduler.make(stepCount: config.stepCount, config: config.effectiveSchedulerConfig)
        var random = config.rng.makeSource(seed: seed)
        var timesteps = scheduler.timesteps
        var start: StartDraws
        // diffusers' inpainting at strength 1 starts from noise alone (the image enters through the mask inputs)
        if let image = config.startImage, config.mask == nil || config.strength != 1 {
            let first = try Self.img2imgStart(stepCount: config.stepCount, strength: config.strength, order: scheduler.order)
            scheduler.startIndex = first
            timesteps = Array(timesteps[first...])
            if timesteps.isEmpty { throw PipelineError.strengthTooSmall(config.strength, steps: config.stepCount) }
            start = try Self.startDraws(image, encoder: models.encoder, latentScale: latentScale, timestep: timesteps.first ?? 0,
                                        scheduler: scheduler, random: &random, shape: config.latentShape)
        } else {
            start = Self.noiseStart(scheduler: scheduler, random: &random, shape: config.latentShape)
        }
        var latents = start.latents
        // With ControlNets a mask is the ControlNet inpaint route (a 4-channel UNet, blended after each step); else
        // the UNet is an inpainting UNet taking the mask inputs.
        let blend = config.mask != nil && !models.controlNets.isEmpty
            ? try MaskBlend(mask: config.mask!, image: config.startImage!, start: start, encoder: models.encoder,
                            latentScale: latentScale, random: &random)
            : nil
        let condition = blend != nil ? nil : try config.mask.map {
            try inpaintCondition(mask: $0, image: config.startImage!, shape: config.latentShape, random: &random)
        }
        latents = try Self.denoise(latents, scheduler: &scheduler, timesteps: timesteps, random: &random, blend: blend,
                                   progress: { progress($0, timesteps.count) }) { input, t in
            // An inpainting UNet's sample: the scaled latents, then the mask and the masked image's latents.
            let sample = condition.map { Self.concatenateChannels([input, $0]) } ?? input
            return try guidedOutput(sample, timestep: t, hidden: hidden, config: config)
        }
        return try finish(latents, config: config, timesteps: timesteps)
    }

    /// The steps of one denoising stage over `timesteps`: the guided model output of each scaled input, stepped
    /// by `scheduler`. `progress(steps done)` returning false cancels.
    static func denoise(_ start: Tensor, scheduler: inout any Scheduler, timesteps: [Double], random: inout any RandomSource,
                        blend: MaskBlend? = nil, progress: (Int) -> Bool,
                        guided: (Tensor, Double) throws -> Tensor) throws -> Tensor {
        var latents = start
        for (index, t) in timesteps.enumerated() {
            let output = try guided(scheduler.scaleModelInput(latents, timestep: t), t)
            // Ancestral samplers draw their step noise after the model, from the same source.
            let noise = scheduler.needsNoise ? random.normalTensor(shape: latents.shape) : nil
            latents = scheduler.step(output: output, timestep: t, sample: latents, noise: noise)
            if let blend { latents = blend(latents, scheduler: scheduler, timesteps: timesteps, index: index) }
            if !progress(index + 1) { throw PipelineError.cancelled }
        }
        return latents
    }

    /// Classifier-free guidance on a batch-2 model output [unconditional, conditional]: uncond + g (cond - uncond).
    /// uncond + g * (cond - uncond); g <= 1 is no guidance, the conditional prediction alone (diffusers'
    /// do_classifier_free_guidance, SDXL-Turbo's 0), as the Python pipeline.
    static func guide(_ output: Tensor, scale g: Float) -> Tensor {
        if g <= 1 { return output.batchItem(1) }
        return output.batchItem(0).zip(output.batchItem(1)) { uncond, cond in uncond + g * (cond - uncond) }
    }

    /// Index of the first timestep img2img runs, as diffusers picks it.
    public static func img2imgStart(stepCount: Int, strength: Double, order: Int) throws -> Int {
        guard (0...1).contains(strength) else { throw PipelineError.badStrength(strength) }
        let initSteps = min(Int(Double(stepCount) * strength), stepCount)
        return max(stepCount - initSteps, 0) * order
    }

    private func startLatents(_ image: Tensor, timestep: Double, scheduler: any Scheduler,
                              random: inout any RandomSource, shape: [Int]) throws -> Tensor {
        try Self.startLatents(image, encoder: models.encoder, latentScale: latentScale, timestep: timestep,
                              scheduler: scheduler, random: &random, shape: shape)
    }

    /// img2img's first latents (SD's and SDXL's): the image's VAE posterior sampled, scaled, and noised to `timestep`.
    static func startLatents(_ image: Tensor, encoder: (any ImageEncoding)?, latentScale: Float, timestep: Double,
                             scheduler: any Scheduler, random: inout any RandomSource, shape: [Int]) throws -> Tensor {
        try startDraws(image, encoder: encoder, latentScale: latentScale, timestep: timestep, scheduler: scheduler,
                       random: &random, shape: shape).latents
    }

    /// The first latents and what made them: the noise drawn and, for img2img, the image's scaled latents (what the
    /// ControlNet inpaint route's MaskBlend noises again).
    struct StartDraws {
        var latents: Tensor
        var noise: Tensor
        var imageLatents: Tensor?
    }

    /// From noise alone: the draw, scaled by the scheduler's init_noise_sigma.
    static func noiseStart(scheduler: any Scheduler, random: inout any RandomSource, shape: [Int]) -> StartDraws {
        let noise = random.normalTensor(shape: shape)
        let sigma = scheduler.initNoiseSigma
        return StartDraws(latents: noise.map { $0 * sigma }, noise: noise, imageLatents: nil)
    }

    /// startLatents with its draws.
    static func startDraws(_ image: Tensor, encoder: (any ImageEncoding)?, latentScale: Float, timestep: Double,
                           scheduler: any Scheduler, random: inout any RandomSource, shape: [Int]) throws -> StartDraws {
        guard let encoder else { throw PipelineError.missingImageEncoder }
        // The Python pipeline's draw order, so img2img noise matches it for a seed.
        let diagonalNoise = random.normalTensor(shape: shape)
        let noise = random.normalTensor(shape: shape)
        let (signal, noiseScale) = scheduler.noiseCoefficients(timestep: timestep)
        let moments = try encoder.encode(image: image)
        let latents = try Self.samplePosterior(moments: moments, noise: diagonalNoise).map { latentScale * $0 }
        return StartDraws(latents: latents.zip(noise) { signal * $0 + noiseScale * $1 }, noise: noise, imageLatents: latents)
    }

    /// (1, 3, H, W): an inpaint ControlNet's condition from the image in [0, 1] and the grey mask (1, 1, H, W), as
    /// diffusers' make_inpaint_condition and the Python pipeline's inpaint_control_condition: masked pixels (grey
    /// above 0.5) set to -1.
    public static func inpaintControlCondition(image: Tensor, mask: Tensor) -> Tensor {
        let plane = mask.count
        return Tensor(shape: image.shape, scalars: image.scalars.enumerated().map { i, x in
            mask.scalars[i % plane] > 0.5 ? -1 : x
        })
    }

    /// A draw from the VAE posterior, as diffusers' DiagonalGaussianDistribution.sample and the Python
    /// pipeline's `sample_posterior`: mean + std * noise, std = exp(0.5 * clamp(logvar, -30, 20)), std in
    /// Double rounded once to Float, the rest in Float.
    public static func samplePosterior(moments: Tensor, noise: Tensor) throws -> Tensor {
        let half = moments.count / 2
        guard moments.shape.count == 4, moments.shape[1] % 2 == 0,
              [moments.shape[0], moments.shape[1] / 2] + moments.shape[2...] == noise.shape else {
            throw PipelineError.badEncoderOutput(moments.shape)
        }
        let scalars = (0..<half).map { i -> Float in
            let logvar = min(max(moments.scalars[half + i], -30), 20)
            let std = Float(exp(0.5 * Double(logvar)))
            return moments.scalars[i] + std * noise.scalars[i]
        }
        return Tensor(shape: noise.shape, scalars: scalars)
    }

    /// Classifier-free guidance (`guide`) from one batch-2 UNet call; with ControlNets, the controlled UNet's
    /// after each ControlNet on the same batch.
    func guidedOutput(_ latents: Tensor, timestep: Double, hidden: Tensor, config: GenerationConfig) throws -> Tensor {
        let batch = Tensor.concatenateBatch([latents, latents])
        guard let controlled = models.controlledUnet, !models.controlNets.isEmpty else {
            return Self.guide(try models.unet.predictNoise(latents: batch, timestep: timestep, hiddenStates: hidden),
                              scale: config.guidanceScale)
        }
        let each = try zip(models.controlNets, config.controlInputs).map { net, image in
            try net.residuals(latents: batch, timestep: timestep, hiddenStates: hidden,
                              condition: Tensor.concatenateBatch([image, image]))
        }
        let residuals = Self.combineResiduals(each, scales: config.controlScales)
        return Self.guide(try controlled.predictNoise(latents: batch, timestep: timestep, hiddenStates: hidden,
                                                      residuals: residuals), scale: config.guidanceScale)
    }

    private func checkControl(_ config: GenerationConfig) throws {
        try Self.checkControl(config, nets: models.controlNets.count, hasControlledUnet: models.controlledUnet != nil)
    }

    /// One condition image per ControlNet, one scale for all or one each, and the controlled UNet (SD's and SDXL's).
    static func checkControl(_ config: GenerationConfig, nets: Int, hasControlledUnet: Bool) throws {
        let (images, scales) = (config.controlInputs.count, config.controlScales.count)
        guard nets == images, scales == 1 || scales == nets else {
            throw PipelineError.controlCounts(nets: nets, images: images, scales: scales)
        }
        if nets > 0 && !hasControlledUnet { throw PipelineError.missingControlledUnet }
    }

    /// The ControlNets' residuals, each scaled by its ControlNet's scale (one scale: all), summed name by name in
    /// ControlNet order (diffusers' MultiControlNetModel; the Python pipeline's run_unet: value * scale + sum).
    public static func combineResiduals(_ each: [[Tensor]], scales: [Float]) -> [Tensor] {
        var sum: [Tensor] = []
        for (k, residuals) in each.enumerated() {
            let scale = scales.count == 1 ? scales[0] : scales[k]
            sum = k == 0 ? residuals.map { $0.map { $0 * scale } } : zip(residuals, sum).map { $0.zip($1) { $0 * scale + $1 } }
        }
        return sum
    }

    /// (1, 1 + C, h, w): the binarised mask at latent size and the masked image's latents, as diffusers'
    /// StableDiffusionInpaintPipeline and the Python pipeline's inpaint_condition: pixels with mask >= 0.5 blanked,
    /// the rest encoded, its posterior sampled with the next draw and scaled.
    func inpaintCondition(mask: Tensor, image: Tensor, shape: [Int], random: inout any RandomSource) throws -> Tensor {
        try Self.inpaintCondition(mask: mask, image: image, shape: shape, encoder: models.encoder, latentScale: latentScale,
                                  random: &random)
    }

    /// inpaintCondition for any latent scale and encoder (SD's and SDXL's).
    static func inpaintCondition(mask: Tensor, image: Tensor, shape: [Int], encoder: (any ImageEncoding)?,
                                 latentScale: Float, random: inout any RandomSource) throws -> Tensor {
        guard let encoder else { throw PipelineError.missingImageEncoder }
        let binary = mask.map { $0 >= 0.5 ? 1 : 0 }
        let plane = binary.count
        let masked = Tensor(shape: image.shape, scalars: image.scalars.enumerated().map { i, x in
            x * (binary.scalars[i % plane] < 0.5 ? 1 : 0)
        })
        let noise = random.normalTensor(shape: shape)
        let latents = try samplePosterior(moments: try encoder.encode(image: masked), noise: noise).map { latentScale * $0 }
        return concatenateChannels([nearest(binary, height: shape[2], width: shape[3]), latents])
    }

    /// A (1, 1, H, W) mask at (height, width) by nearest neighbour, as torch's interpolate (source floor(i H / h)).
    static func nearest(_ mask: Tensor, height: Int, width: Int) -> Tensor {
        let (sourceH, sourceW) = (mask.shape[2], mask.shape[3])
        let scalars = (0..<(height * width)).map { i -> Float in
            mask.scalars[(i / width) * sourceH / height * sourceW + (i % width) * sourceW / width]
        }
        return Tensor(shape: [1, 1, height, width], scalars: scalars)
    }

    /// Batch-1 NCHW tensors joined on channels (C order: one after the other).
    static func concatenateChannels(_ items: [Tensor]) -> Tensor {
        Tensor(shape: [1, items.map { $0.shape[1] }.reduce(0, +)] + items[0].shape[2...], scalars: items.flatMap(\.scalars))
    }

    private func finish(_ latents: Tensor, config: GenerationConfig, timesteps: [Double]) throws -> GeneratedImage {
        let image = try models.decoder.decode(latents.map { $0 / latentScale })
        var unsafe = false
        if !config.disableSafety, let checker = models.safetyChecker {
            unsafe = try checker.isUnsafe(image: image)
        }
        let shown = unsafe ? image.map { _ in -1 } : image
        return GeneratedImage(latents: latents, image: shown, isUnsafe: unsafe, timesteps: timesteps)
    }
}

/// Inpainting with a 4-channel UNet (the ControlNet inpaint route, diffusers' StableDiffusionControlNetInpaintPipeline
/// and the Python pipeline's MaskBlend): after each step the latents outside the mask are the image's, noised to the
/// next step's timestep with the start's noise (after the last step: as they are).
struct MaskBlend {
    /// (1, 1, h, w): the binarised mask at latent size, 1 repainted.
    let mask: Tensor
    /// (1, C, h, w): the image's scaled latents (img2img's; at strength 1 the image encoded with the next draw).
    let imageLatents: Tensor
    let noise: Tensor

    init(mask grey: Tensor, image: Tensor, start: StableDiffusionPipeline.StartDraws, encoder: (any ImageEncoding)?,
         latentScale: Float, random: inout any RandomSource) throws {
        guard let encoder else { throw PipelineError.missingImageEncoder }
        let shape = start.noise.shape
        if let latents = start.imageLatents {
            imageLatents = latents
        } else {
            let moments = try encoder.encode(image: image)
            let noise = random.normalTensor(shape: shape)
            imageLatents = try StableDiffusionPipeline.samplePosterior(moments: moments, noise: noise).map { latentScale * $0 }
        }
        mask = StableDiffusionPipeline.nearest(grey.map { $0 >= 0.5 ? 1 : 0 }, height: shape[2], width: shape[3])
        noise = start.noise
    }

    func callAsFunction(_ latents: Tensor, scheduler: any Scheduler, timesteps: [Double], index: Int) -> Tensor {
        let kept = index < timesteps.count - 1
            ? scheduler.addNoise(original: imageLatents, noise: noise, timestep: timesteps[index + 1]) : imageLatents
        let plane = mask.count
        return Tensor(shape: latents.shape, scalars: latents.scalars.enumerated().map { i, x in
            let m = mask.scalars[i % plane]
            return (1 - m) * kept.scalars[i] + m * x
        })
    }
}
