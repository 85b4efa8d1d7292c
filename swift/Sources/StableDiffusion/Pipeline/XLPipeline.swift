import Foundation

/// The model families a bundle's pipeline_config.json names (python_coreml_sd.components.SD, SDXL).
public enum ModelFamily: String, CaseIterable, Sendable {
    case sd, sdxl
}

/// What each of SDXL's time ids is, by the bundle's names (python_coreml_sd.components.TIME_IDS).
public enum TimeId: String, CaseIterable, Sendable {
    case originalHeight = "original_height", originalWidth = "original_width"
    case cropTop = "crop_top", cropLeft = "crop_left"
    case targetHeight = "target_height", targetWidth = "target_width"
    case aestheticScore = "aesthetic_score"

    /// The base UNet's six and the refiner's five, in diffusers' order (_get_add_time_ids).
    public static let base: [TimeId] = [.originalHeight, .originalWidth, .cropTop, .cropLeft, .targetHeight, .targetWidth]
    public static let refiner: [TimeId] = [.originalHeight, .originalWidth, .cropTop, .cropLeft, .aestheticScore]
}

/// One prompt's SDXL text conditioning, as python_coreml_sd's encode_xl gives it.
public struct XLEncoding: Equatable, Sendable {
    /// (1, S, C1 + C2): both encoders' weighted states side by side on channels, the windows along the sequence.
    public var hidden: Tensor
    /// (1, S, C2): the second encoder's alone, the refiner's context.
    public var hidden2: Tensor
    /// (1, P): the second encoder's pooled embedding of the first window, unweighted (as A1111 and compel).
    public var pooled: Tensor

    /// The same shapes, all zeros (force_zeros_for_empty_prompt's negative conditioning).
    var zeros: XLEncoding {
        XLEncoding(hidden: Tensor(zeros: hidden.shape), hidden2: Tensor(zeros: hidden2.shape), pooled: Tensor(zeros: pooled.shape))
    }
}

/// What one UNet stage takes besides the latents: [unconditional, conditional] text states (2, S, C) and the
/// added conditions.
public struct XLConditioning: Equatable, Sendable {
    public var hidden: Tensor
    public var added: AddedConditions
}

/// The SDXL loop (diffusers' StableDiffusionXLPipeline as python_coreml_sd runs it): two text encoders, pooled
/// embeddings, micro-conditioning time ids, force_zeros_for_empty_prompt, classifier-free guidance, the
/// refiner hand-off at `refinerStart`, image-to-image from `startImage` (diffusers'
/// StableDiffusionXLImg2ImgPipeline at `strength`, with the VAE encoder), inpainting with `mask` and a 9-channel
/// base UNet (StableDiffusionXLInpaintPipeline) and ControlNets with the controlled base UNet.
public struct StableDiffusionXLPipeline {
    /// SDXL's VAE `scaling_factor`.
    public static let defaultLatentScale: Float = 0.13025
    /// The strength of inpainting when none is given: diffusers' StableDiffusionXLInpaintPipeline's (and the Python
    /// pipeline's) 0.9999, so it starts from the image noised, one step fewer, rather than from noise alone.
    public static let defaultInpaintStrength = 0.9999

    public let tokenizer: BPETokenizer
    /// The second encoder's: the same vocabulary, its own pad token (SDXL's "!").
    public let tokenizer2: BPETokenizer
    public let models: XLPipelineModels
    public let sequenceLength: Int
    public let latentScale: Float
    public let promptChunkCounts: [Int]
    public let forceZerosForEmptyPrompt: Bool
    public let timeIds: [TimeId]
    public let refinerTimeIds: [TimeId]

    public init(tokenizer: BPETokenizer, tokenizer2: BPETokenizer, models: XLPipelineModels, sequenceLength: Int = 77,
                latentScale: Float = defaultLatentScale, promptChunkCounts: [Int] = [1], forceZerosForEmptyPrompt: Bool = true,
                timeIds: [TimeId] = TimeId.base, refinerTimeIds: [TimeId] = TimeId.refiner) {
        precondition(!promptChunkCounts.isEmpty && promptChunkCounts.allSatisfy { $0 > 0 }, "prompt window counts must be positive")
        self.tokenizer = tokenizer
        self.tokenizer2 = tokenizer2
        self.models = models
        self.sequenceLength = sequenceLength
        self.latentScale = latentScale
        self.promptChunkCounts = promptChunkCounts.sorted()
        self.forceZerosForEmptyPrompt = forceZerosForEmptyPrompt
        self.timeIds = timeIds
        self.refinerTimeIds = refinerTimeIds
    }

    public func generate(_ config: GenerationConfig, progress: (Int, Int) -> Bool = { _, _ in true }) throws -> [GeneratedImage] {
        try check(config)
        let encodings = try encodePair(config)
        let base = try baseConditioning(config, encodings: encodings)
        let refiner = config.refinerStart == nil ? nil : try refinerConditioning(config, encodings: encodings)
        return try (0..<config.imageCount).map { index in
            try generateOne(config, seed: config.seed &+ UInt32(index), base: base, refiner: refiner, progress: progress)
        }
    }

    private func check(_ config: GenerationConfig) throws {
        if config.mask != nil {
            guard config.startImage != nil else { throw PipelineError.maskWithoutImage }
            if config.refinerStart != nil { throw PipelineError.maskWithRefiner }
        }
        try StableDiffusionPipeline.checkControl(config, nets: models.controlNets.count,
                                                 hasControlledUnet: models.controlledUnet != nil)
        if let start = config.refinerStart {
            guard start > 0, start < 1 else { throw PipelineError.badRefinerStart(start) }
            guard models.refiner != nil else { throw PipelineError.missingRefiner }
        }
    }

    /// Each text's windows for both tokenizers ([text][encoder]), padded to one count: the fewest the UNet takes
    /// that hold the longest, so the prompt and its negative pair up (python_coreml_sd's xl_windows).
    public func windows(_ texts: [String]) -> [[PromptWindows]] {
        let tokenizers = [tokenizer, tokenizer2]
        let most = promptChunkCounts.last!
        var all = texts.map { text in tokenizers.map { $0.windows(text, length: sequenceLength, maxCount: most) } }
        let longest = all.joined().map(\.count).max()!
        let count = promptChunkCounts.first { $0 >= longest } ?? longest
        for i in all.indices {
            for j in tokenizers.indices where all[i][j].count != count {
                all[i][j] = tokenizers[j].windows(texts[i], length: sequenceLength, minCount: count, maxCount: most)
            }
        }
        return all
    }

    /// One text's conditioning from its windows for the two encoders: each window encoded and weighted, the
    /// windows along the sequence, the encoders side by side on channels; the second's first pooled embedding.
    public func encode(windows: [PromptWindows]) throws -> XLEncoding {
        let encoders = [models.textEncoder, models.textEncoder2]
        var states: [Tensor] = []
        var pooled: Tensor?
        for (encoder, textWindows) in zip(encoders, windows) {
            let outputs = try textWindows.ids.map { try encoder.encodeXL(tokenIds: $0) }
            states.append(Tensor.concatenateSequence(zip(outputs, textWindows.weights).map { output, weights in
                PromptWeighting.apply(weights, to: output.hidden)
            }))
            pooled = outputs[0].pooled
        }
        return XLEncoding(hidden: Tensor.concatenateChannels(states), hidden2: states[1], pooled: pooled!)
    }

    /// (conditional, unconditional) encodings of the prompt and the negative prompt, with as many windows each.
    public func encodePair(_ config: GenerationConfig) throws -> (cond: XLEncoding, uncond: XLEncoding) {
        let windows = windows([config.prompt, config.negativePrompt])
        return (try encode(windows: windows[0]), try encode(windows: windows[1]))
    }

    /// The base UNet's: both encoders' states, the pooled embeds and the size time ids; with
    /// force_zeros_for_empty_prompt and no negative prompt the unconditional half is zeros.
    public func baseConditioning(_ config: GenerationConfig, encodings: (cond: XLEncoding, uncond: XLEncoding)) throws -> XLConditioning {
        let cond = encodings.cond
        let uncond = forceZerosForEmptyPrompt && config.negativePrompt.isEmpty ? cond.zeros : encodings.uncond
        return XLConditioning(hidden: Tensor.concatenateBatch([uncond.hidden, cond.hidden]),
                              added: try added(config, layout: timeIds, pooled: [uncond.pooled, cond.pooled]))
    }

    /// The refiner's: the second encoder's states alone, the pooled embeds and the aesthetic-score time ids; the
    /// negative prompt always encoded (the refiner's force_zeros_for_empty_prompt is false).
    public func refinerConditioning(_ config: GenerationConfig, encodings: (cond: XLEncoding, uncond: XLEncoding)) throws -> XLConditioning {
        let (cond, uncond) = encodings
        return XLConditioning(hidden: Tensor.concatenateBatch([uncond.hidden2, cond.hidden2]),
                              added: try added(config, layout: refinerTimeIds, pooled: [uncond.pooled, cond.pooled]))
    }

    private func added(_ config: GenerationConfig, layout: [TimeId], pooled: [Tensor]) throws -> AddedConditions {
        let rows = try [config.negativeAestheticScore, config.aestheticScore].map { score in
            try Self.timeIdRow(layout, config: config, imageSize: imageSize(config), aestheticScore: score)
        }
        return AddedConditions(timeIds: Tensor(shape: [2, layout.count], scalars: rows.flatMap { $0 }),
                               textEmbeds: Tensor.concatenateBatch(pooled))
    }

    private func imageSize(_ config: GenerationConfig) -> [Double] {
        config.latentShape.suffix(2).map { Double(8 * $0) }
    }

    /// One row of time ids in `layout`'s order; sizes left nil are the image's (diffusers' defaults).
    public static func timeIdRow(_ layout: [TimeId], config: GenerationConfig, imageSize: [Double],
                                 aestheticScore: Double) throws -> [Float] {
        let original = config.originalSize ?? imageSize, target = config.targetSize ?? imageSize
        let crop = config.cropsCoordsTopLeft
        for (name, pair) in [("original size", original), ("crop top-left", crop), ("target size", target)]
        where pair.count != 2 || !pair.allSatisfy({ $0.isFinite && $0 >= 0 }) {
            throw PipelineError.badTimeIds("the \(name) takes two numbers of at least 0, got \(pair)")
        }
        return layout.map { id -> Float in
            switch id {
            case .originalHeight: return Float(original[0])
            case .originalWidth: return Float(original[1])
            case .cropTop: return Float(crop[0])
            case .cropLeft: return Float(crop[1])
            case .targetHeight: return Float(target[0])
            case .targetWidth: return Float(target[1])
            case .aestheticScore: return Float(aestheticScore)
            }
        }
    }

    private func generateOne(_ config: GenerationConfig, seed: UInt32, base: XLConditioning, refiner: XLConditioning?,
                             progress: (Int, Int) -> Bool) throws -> GeneratedImage {
        let schedulerConfig = config.effectiveSchedulerConfig
        var scheduler = config.scheduler.make(stepCount: config.stepCount, config: schedulerConfig)
        var random = config.rng.makeSource(seed: seed)
        var start: StableDiffusionPipeline.StartDraws
        var first = 0  // img2img's first timestep (the strength's)
        // Inpainting at strength 1 starts from noise alone (the image enters through the mask inputs), as SD's.
        if let image = config.startImage, config.mask == nil || config.strength != 1 {
            first = try StableDiffusionPipeline.img2imgStart(stepCount: config.stepCount, strength: config.strength,
                                                             order: scheduler.order)
            scheduler.startIndex = first
            guard first < scheduler.timesteps.count else {
                throw PipelineError.strengthTooSmall(config.strength, steps: config.stepCount)
            }
            start = try StableDiffusionPipeline.startDraws(image, encoder: models.encoder, latentScale: latentScale,
                                                           timestep: scheduler.timesteps[first], scheduler: scheduler,
                                                           random: &random, shape: config.latentShape)
        } else {
            start = StableDiffusionPipeline.noiseStart(scheduler: scheduler, random: &random, shape: config.latentShape)
        }
        var latents = start.latents
        let timesteps = Array(scheduler.timesteps[first...])
        // With ControlNets a mask is the ControlNet inpaint route (a 4-channel UNet, blended after each step), as SD's.
        let blend = config.mask != nil && !models.controlNets.isEmpty
            ? try MaskBlend(mask: config.mask!, image: config.startImage!, start: start, encoder: models.encoder,
                            latentScale: latentScale, random: &random)
            : nil
        // Else a 9-channel base UNet's mask and masked-image latents (the draw after the start's), after the latents.
        let condition = blend != nil ? nil : try config.mask.map { mask in
            try StableDiffusionPipeline.inpaintCondition(mask: mask, image: config.startImage!, shape: config.latentShape,
                                                         encoder: models.encoder, latentScale: latentScale, random: &random)
        }
        // The ControlNets steer the base alone (the refiner takes no residuals).
        var stages = [(unet: models.unet, scheduler: scheduler, timesteps: timesteps, conditioning: base, base: true)]
        if let start = config.refinerStart, let refiner, let refinerUnet = models.refiner {
            let split = Self.refinerSplit(start, kind: config.scheduler, stepCount: config.stepCount, config: schedulerConfig)
            // The base keeps those of its timesteps at or above the cutoff: the schedule's first baseCount, less
            // the ones img2img skipped.
            stages[0].timesteps = Array(timesteps.prefix(max(split.baseCount - first, 0)))
            stages.append((refinerUnet, split.refiner, Array(split.refiner.timesteps[split.refiner.startIndex...]), refiner, false))
        }
        let total = stages.map(\.timesteps.count).reduce(0, +)
        var done = 0
        for stage in stages {
            var stageScheduler = stage.scheduler
            let (unet, conditioning, before, isBase) = (stage.unet, stage.conditioning, done, stage.base)
            latents = try StableDiffusionPipeline.denoise(latents, scheduler: &stageScheduler, timesteps: stage.timesteps,
                                                          random: &random, blend: blend,
                                                          progress: { progress(before + $0, total) }) { input, t in
                let sample = isBase ? condition.map { StableDiffusionPipeline.concatenateChannels([input, $0]) } ?? input : input
                let batch = Tensor.concatenateBatch([sample, sample])
                let output = isBase && !models.controlNets.isEmpty
                    ? try controlledOutput(batch, timestep: t, conditioning: conditioning, config: config)
                    : try unet.predictNoise(latents: batch, timestep: t, hiddenStates: conditioning.hidden,
                                            added: conditioning.added)
                return StableDiffusionPipeline.guide(output, scale: config.guidanceScale)
            }
            done += stage.timesteps.count
        }
        let image = try models.decoder.decode(latents.map { $0 / latentScale })
        return GeneratedImage(latents: latents, image: image, isUnsafe: false, timesteps: stages.flatMap(\.timesteps))
    }

    /// The controlled base UNet's batch-2 output after each ControlNet on the same batch, its condition image
    /// repeated for both halves, with the UNet's added conditions; the residuals scaled and summed as SD's.
    func controlledOutput(_ batch: Tensor, timestep: Double, conditioning: XLConditioning,
                          config: GenerationConfig) throws -> Tensor {
        guard let controlled = models.controlledUnet else { throw PipelineError.missingControlledUnet }
        let each = try zip(models.controlNets, config.controlInputs).map { net, image in
            try net.residuals(latents: batch, timestep: timestep, hiddenStates: conditioning.hidden,
                              added: conditioning.added, condition: Tensor.concatenateBatch([image, image]))
        }
        return try controlled.predictNoise(latents: batch, timestep: timestep, hiddenStates: conditioning.hidden,
                                           added: conditioning.added,
                                           residuals: StableDiffusionPipeline.combineResiduals(each, scales: config.controlScales))
    }

    /// The hand-off at `start` as diffusers' denoising_end / denoising_start: the base runs the timesteps at or
    /// above the cutoff (the first `baseCount`), the refiner, a fresh scheduler begun where the base stopped, those
    /// below it (one more for second-order schedulers, so it ends on a whole step).
    public static func refinerSplit(_ start: Double, kind: SchedulerKind, stepCount: Int,
                                    config: SchedulerConfig) -> (baseCount: Int, refiner: any Scheduler) {
        let train = Double(config.trainStepCount)
        let cutoff = (train - start * train).rounded(.toNearestOrEven)  // Python's round()
        var refiner = kind.make(stepCount: stepCount, config: config)
        let baseCount = refiner.timesteps.filter { $0 >= cutoff }.count
        var steps = refiner.timesteps.filter { $0 < cutoff }.count
        if refiner.order == 2 && steps % 2 == 0 { steps += 1 }
        refiner.startIndex = refiner.timesteps.count - steps
        return (baseCount, refiner)
    }
}
