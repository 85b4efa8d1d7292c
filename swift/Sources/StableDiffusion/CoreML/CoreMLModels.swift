// On Linux only the CoreMLTypeCheck target compiles this file, against the Core ML stand-in
// (Package.swift); the library there must not, even though the stand-in module is importable.
#if canImport(CoreML) && (!os(Linux) || COREML_STAND_IN)
import CoreML
import Foundation

/// `input_ids` float32 (1, 77) -> `last_hidden_state` (1, 77, C).
public struct CoreMLTextEncoder: TextEncoding {
    public let model: ManagedModel

    public init(model: ManagedModel) { self.model = model }

    public func encode(tokenIds: [Int]) throws -> Tensor {
        let ids = Tensor(shape: [1, tokenIds.count], scalars: tokenIds.map { Float($0) })
        return try model.predict(["input_ids": ids], outputs: ["last_hidden_state"])["last_hidden_state"]!
    }
}

/// SDXL's encoders: `input_ids` float32 (1, 77) -> `hidden_embeds` (1, 77, C), the penultimate layer's states, and
/// `pooled_outputs` (1, P).
public struct CoreMLXLTextEncoder: XLTextEncoding {
    public let model: ManagedModel

    public init(model: ManagedModel) { self.model = model }

    public func encodeXL(tokenIds: [Int]) throws -> (hidden: Tensor, pooled: Tensor) {
        let ids = Tensor(shape: [1, tokenIds.count], scalars: tokenIds.map { Float($0) })
        let outputs = try model.predict(["input_ids": ids], outputs: ["hidden_embeds", "pooled_outputs"])
        return (outputs["hidden_embeds"]!, outputs["pooled_outputs"]!)
    }
}

/// `sample`, `timestep`, `encoder_hidden_states` (B, C, 1, 77 x windows) -> `noise_pred`, as one model or as
/// UnetChunk1 + UnetChunk2 where the second chunk takes the first chunk's outputs by name. SDXL's UNets (base and
/// refiner) also take `time_ids` and `text_embeds`.
public struct CoreMLUnet: NoisePredicting, ConditionedNoisePredicting, ControlledNoisePredicting,
                          ConditionedControlledNoisePredicting {
    public let chunks: [ManagedModel]

    public init(chunks: [ManagedModel]) {
        precondition(!chunks.isEmpty, "a UNet needs at least one model")
        self.chunks = chunks
    }

    public func sampleShape() throws -> [Int] { try chunks[0].inputShape("sample") }

    /// Every chunk's input names.
    public func inputNames() throws -> Set<String> {
        try chunks.reduce(into: Set<String>()) { names, chunk in
            names.formUnion(try chunk.perform { $0.modelDescription.inputDescriptionsByName.keys })
        }
    }

    public func predictNoise(latents: Tensor, timestep: Double, hiddenStates: Tensor) throws -> Tensor {
        try predictNoise(latents: latents, timestep: timestep, hiddenStates: hiddenStates, added: [:])
    }

    public func predictNoise(latents: Tensor, timestep: Double, hiddenStates: Tensor, added: AddedConditions) throws -> Tensor {
        try predictNoise(latents: latents, timestep: timestep, hiddenStates: hiddenStates,
                         added: ["time_ids": added.timeIds, "text_embeds": added.textEmbeds])
    }

    /// The controlled UNet (ControlledUnet): the summed residuals as its additional_residual_<i> inputs.
    public func predictNoise(latents: Tensor, timestep: Double, hiddenStates: Tensor, residuals: [Tensor]) throws -> Tensor {
        let named = residuals.enumerated().map { (CoreMLControlNet.residualName($0.offset), $0.element) }
        return try predictNoise(latents: latents, timestep: timestep, hiddenStates: hiddenStates,
                                added: Dictionary(uniqueKeysWithValues: named))
    }

    /// The controlled SDXL UNet: the added conditions and the summed residuals.
    public func predictNoise(latents: Tensor, timestep: Double, hiddenStates: Tensor, added: AddedConditions,
                             residuals: [Tensor]) throws -> Tensor {
        var inputs = ["time_ids": added.timeIds, "text_embeds": added.textEmbeds]
        for (index, residual) in residuals.enumerated() { inputs[CoreMLControlNet.residualName(index)] = residual }
        return try predictNoise(latents: latents, timestep: timestep, hiddenStates: hiddenStates, added: inputs)
    }

    /// `added`: inputs beyond SD's, by name, one row per batch item.
    private func predictNoise(latents: Tensor, timestep: Double, hiddenStates: Tensor, added: [String: Tensor]) throws -> Tensor {
        let modelBatch = try sampleShape()[0]
        let batch = latents.shape[0]
        if batch == modelBatch {
            return try run(latents, timestep: timestep, hidden: Self.unetLayout(hiddenStates), added: added)
        }
        // A batch-1 model runs guidance item by item; a batch-2 model without guidance runs the
        // single item twice and keeps one answer.
        let repeated = { (tensor: Tensor, b: Int) in Tensor.concatenateBatch(Array(repeating: tensor.batchItem(b), count: modelBatch)) }
        let outputs = try (0..<batch).map { b -> Tensor in
            try run(repeated(latents, b), timestep: timestep, hidden: Self.unetLayout(repeated(hiddenStates, b)),
                    added: added.mapValues { repeated($0, b) }).batchItem(0)
        }
        return Tensor.concatenateBatch(outputs)
    }

    private func run(_ sample: Tensor, timestep: Double, hidden: Tensor, added: [String: Tensor]) throws -> Tensor {
        let batch = sample.shape[0]
        var features: [String: Tensor] = [
            "sample": sample,
            "timestep": Tensor(shape: [batch], scalars: Array(repeating: Float(timestep), count: batch)),
            "encoder_hidden_states": hidden,
        ]
        features.merge(added) { _, new in new }
        for (index, chunk) in chunks.enumerated() {
            let outputs = index == chunks.count - 1 ? ["noise_pred"] : try chunkOutputNames(chunk)
            let inputNames = try chunk.perform { Set($0.modelDescription.inputDescriptionsByName.keys) }
            let inputs = features.filter { inputNames.contains($0.key) }
            features.merge(try chunk.predict(inputs, outputs: outputs)) { _, new in new }
        }
        guard let prediction = features["noise_pred"] else {
            throw CoreMLModelError.missingFeature(chunks[chunks.count - 1].url.lastPathComponent, "noise_pred")
        }
        return prediction
    }

    private func chunkOutputNames(_ chunk: ManagedModel) throws -> [String] {
        try chunk.perform { Array($0.modelDescription.outputDescriptionsByName.keys) }
    }

    /// (B, S, C) text embeddings -> the (B, C, 1, S) layout the Neural Engine UNet takes; S is 77 per prompt window.
    static func unetLayout(_ hidden: Tensor) -> Tensor { hidden.unetTextLayout() }
}

/// Apple's ControlNet_<name>: `sample`, `timestep`, `encoder_hidden_states` (B, C, 1, S), `controlnet_cond`
/// (B, 3, H, W) -> additional_residual_0, 1, ...; an SDXL one takes `time_ids` and `text_embeds` too. A batch-1
/// model runs the guidance batch item by item.
public struct CoreMLControlNet: ControlNetting, ConditionedControlNetting {
    public let model: ManagedModel

    public init(model: ManagedModel) { self.model = model }

    public func inputNames() throws -> Set<String> {
        try model.perform { Set($0.modelDescription.inputDescriptionsByName.keys) }
    }

    static func residualName(_ index: Int) -> String { "additional_residual_\(index)" }

    public func residuals(latents: Tensor, timestep: Double, hiddenStates: Tensor, condition: Tensor) throws -> [Tensor] {
        try residuals(latents: latents, timestep: timestep, hiddenStates: hiddenStates, condition: condition, added: [:])
    }

    public func residuals(latents: Tensor, timestep: Double, hiddenStates: Tensor, added: AddedConditions,
                          condition: Tensor) throws -> [Tensor] {
        try residuals(latents: latents, timestep: timestep, hiddenStates: hiddenStates, condition: condition,
                      added: ["time_ids": added.timeIds, "text_embeds": added.textEmbeds])
    }

    /// `added`: inputs beyond SD's, by name, one row per batch item.
    private func residuals(latents: Tensor, timestep: Double, hiddenStates: Tensor, condition: Tensor,
                           added: [String: Tensor]) throws -> [Tensor] {
        let count = try model.perform { $0.modelDescription.outputDescriptionsByName.keys.filter { $0.hasPrefix("additional_residual_") }.count }
        let names = (0..<count).map(Self.residualName)
        let run = { (items: [Int]) throws -> [String: Tensor] in
            let pick = { (tensor: Tensor) in Tensor.concatenateBatch(items.map { tensor.batchItem($0) }) }
            let timesteps = Tensor(shape: [items.count], scalars: Array(repeating: Float(timestep), count: items.count))
            var inputs = ["sample": pick(latents), "timestep": timesteps, "controlnet_cond": pick(condition),
                          "encoder_hidden_states": pick(hiddenStates).unetTextLayout()]
            for (name, value) in added { inputs[name] = pick(value) }
            return try model.predict(inputs, outputs: names)
        }
        let batch = latents.shape[0]
        let outputs = try model.inputShape("sample")[0] == batch ? [try run(Array(0..<batch))] : (0..<batch).map { try run([$0]) }
        return names.map { name in Tensor.concatenateBatch(outputs.flatMap { out in (0..<out[name]!.shape[0]).map { out[name]!.batchItem($0) } }) }
    }
}

/// `z` (latents / 0.18215) -> `image` (1, 3, H, W) in [-1, 1].
public struct CoreMLDecoder: LatentDecoding {
    public let model: ManagedModel

    public init(model: ManagedModel) { self.model = model }

    public func decode(_ latents: Tensor) throws -> Tensor {
        try model.predict(["z": latents], outputs: ["image"])["image"]!
    }
}

/// `x` (1, 3, H, W) in [-1, 1] -> `latent` (1, 2C, h, w), the posterior's mean and log-variance
/// (Apple's interface); the pipeline samples, scales and noises.
public struct CoreMLEncoder: ImageEncoding {
    public let model: ManagedModel

    public init(model: ManagedModel) { self.model = model }

    public func encode(image: Tensor) throws -> Tensor {
        try model.predict(["x": image], outputs: ["latent"])["latent"]!
    }
}

/// `clip_input`, `images`, `adjustment` -> `has_nsfw_concepts`.
public struct CoreMLSafetyChecker: SafetyChecking {
    public let model: ManagedModel
    /// CLIP's image normalisation.
    static let mean: [Float] = [0.48145466, 0.4578275, 0.40821073]
    static let std: [Float] = [0.26862954, 0.26130258, 0.27577711]

    public init(model: ManagedModel) { self.model = model }

    public func isUnsafe(image: Tensor) throws -> Bool {
        let clipShape = try model.inputShape("clip_input")
        let imagesShape = try model.inputShape("images")
        let unit = image.map { min(max($0 / 2 + 0.5, 0), 1) }
        let inputs = [
            "clip_input": Self.clipInput(unit, size: clipShape[2]),
            "images": Self.channelsLast(unit).reshaped(imagesShape),
            "adjustment": Tensor(shape: try model.inputShape("adjustment"), scalars: [0]),
        ]
        let flags = try model.predict(inputs, outputs: ["has_nsfw_concepts"])["has_nsfw_concepts"]!
        return flags.scalars.contains { $0 > 0.5 }
    }

    /// Bilinear resize of a (1, 3, H, W) image in [0, 1] to size x size, then CLIP normalisation.
    static func clipInput(_ image: Tensor, size: Int) -> Tensor {
        let height = image.shape[2], width = image.shape[3]
        var scalars = [Float](repeating: 0, count: 3 * size * size)
        for c in 0..<3 {
            for y in 0..<size {
                for x in 0..<size {
                    let value = bilinear(image, channel: c, y: (Float(y) + 0.5) * Float(height) / Float(size) - 0.5,
                                         x: (Float(x) + 0.5) * Float(width) / Float(size) - 0.5)
                    scalars[(c * size + y) * size + x] = (value - mean[c]) / std[c]
                }
            }
        }
        return Tensor(shape: [1, 3, size, size], scalars: scalars)
    }

    static func bilinear(_ image: Tensor, channel: Int, y: Float, x: Float) -> Float {
        let height = image.shape[2], width = image.shape[3]
        let y0 = min(max(Int(y.rounded(.down)), 0), height - 1), x0 = min(max(Int(x.rounded(.down)), 0), width - 1)
        let y1 = min(y0 + 1, height - 1), x1 = min(x0 + 1, width - 1)
        let fy = min(max(y - Float(y0), 0), 1), fx = min(max(x - Float(x0), 0), 1)
        let at = { (yy: Int, xx: Int) in image.scalars[(channel * height + yy) * width + xx] }
        let top = at(y0, x0) * (1 - fx) + at(y0, x1) * fx
        let bottom = at(y1, x0) * (1 - fx) + at(y1, x1) * fx
        return top * (1 - fy) + bottom * fy
    }

    /// (1, 3, H, W) -> (1, H, W, 3).
    static func channelsLast(_ image: Tensor) -> Tensor {
        let plane = image.shape[2] * image.shape[3]
        var scalars = [Float](repeating: 0, count: image.count)
        for c in 0..<3 {
            for p in 0..<plane { scalars[p * 3 + c] = image.scalars[c * plane + p] }
        }
        return Tensor(shape: [1, image.shape[2], image.shape[3], 3], scalars: scalars)
    }
}

/// The pipeline over a Resources folder: the models it finds, the chosen compute units, and
/// --reduce-memory's load-per-use.
public struct CoreMLPipeline {
    /// SD 1.x / 2.x bundles'; nil for SDXL's (`xlPipeline`).
    public let pipeline: StableDiffusionPipeline?
    /// SDXL bundles' (pipeline_config.json's family "sdxl"): TextEncoder2 and, when present, UnetRefiner.
    public let xlPipeline: StableDiffusionXLPipeline?
    public let unet: CoreMLUnet
    /// The --controlnet models, in order (both families' pipelines run these).
    public let controlNetModels: [CoreMLControlNet]
    /// The bundle's pipeline_config.json: latent scale, sequence length, sizes and prompt windows.
    public let settings: PipelineSettings

    /// Only kept so the group outlives the models that point to it weakly.
    public let residency: ResidencyGroup?

    /// `controlNets`: names of the bundle's controlnet/ models to run with its ControlledUnet.
    public init(resources: ResourceFolder, tokenizer: BPETokenizer, computeUnits: MLComputeUnits, reduceMemory: Bool,
                controlNets: [String] = []) throws {
        let settings = try resources.pipelineSettings()
        self.settings = settings
        let group = reduceMemory ? ResidencyGroup() : nil
        residency = group
        let model = { (name: String, stage: String) in
            ManagedModel(url: resources.model(name) ?? resources.file("\(name).mlmodelc"), computeUnits: computeUnits,
                         stage: stage, group: group)
        }
        let plainNames = resources.chunkedUnet ? ["UnetChunk1", "UnetChunk2"] : ["Unet"]
        let unetNames = controlNets.isEmpty ? plainNames : resources.controlledUnetNames ?? plainNames
        unet = CoreMLUnet(chunks: unetNames.map { model($0, "unet") })
        let nets = controlNets.map { CoreMLControlNet(model: model(ResourceFolder.controlNetPath($0), "controlnet")) }
        controlNetModels = nets
        if settings.family == .sdxl {
            let models = XLPipelineModels(
                textEncoder: CoreMLXLTextEncoder(model: model("TextEncoder", "text")),
                textEncoder2: CoreMLXLTextEncoder(model: model("TextEncoder2", "text")),
                unet: unet,
                refiner: resources.refinerNames.map { names in CoreMLUnet(chunks: names.map { model($0, "refiner") }) },
                decoder: CoreMLDecoder(model: model("VAEDecoder", "decoder")),
                encoder: resources.hasEncoder ? CoreMLEncoder(model: model("VAEEncoder", "encoder")) : nil,
                controlNets: nets,
                controlledUnet: controlNets.isEmpty ? nil : unet)
            xlPipeline = StableDiffusionXLPipeline(
                tokenizer: tokenizer, tokenizer2: try resources.tokenizer2(settings: settings, first: tokenizer), models: models,
                sequenceLength: settings.sequenceLength, latentScale: settings.latentScale,
                promptChunkCounts: settings.promptChunkCounts, forceZerosForEmptyPrompt: settings.forceZerosForEmptyPrompt,
                timeIds: settings.timeIds, refinerTimeIds: settings.refinerTimeIds)
            pipeline = nil
            return
        }
        xlPipeline = nil
        let models = PipelineModels(
            textEncoder: CoreMLTextEncoder(model: model("TextEncoder", "text")),
            unet: unet,
            decoder: CoreMLDecoder(model: model("VAEDecoder", "decoder")),
            encoder: resources.hasEncoder ? CoreMLEncoder(model: model("VAEEncoder", "encoder")) : nil,
            safetyChecker: resources.hasSafetyChecker ? CoreMLSafetyChecker(model: model("SafetyChecker", "safety")) : nil,
            controlNets: nets,
            controlledUnet: controlNets.isEmpty ? nil : unet)
        pipeline = StableDiffusionPipeline(tokenizer: tokenizer, models: models, sequenceLength: settings.sequenceLength,
                                           latentScale: settings.latentScale, promptChunkCounts: settings.promptChunkCounts)
    }

    /// Generates with whichever pipeline the bundle holds.
    public func generate(_ config: GenerationConfig, progress: (Int, Int) -> Bool = { _, _ in true }) throws -> [GeneratedImage] {
        if let xlPipeline { return try xlPipeline.generate(config, progress: progress) }
        return try pipeline!.generate(config, progress: progress)
    }

    /// (1, 4, h, w) for `height` x `width` pixels (nil: the default size's), one of the bundle's latent
    /// sizes; a bundle that lists none has the one size the UNet declares for its `sample` input.
    public func latentShape(height: Int? = nil, width: Int? = nil) throws -> [Int] {
        let shape = try unet.sampleShape()
        guard shape.count == 4 else { throw CoreMLModelError.badShape("UNet sample", shape) }
        let sizes = settings.latentSizes.isEmpty ? [Array(shape[2...])] : settings.latentSizes
        // An inpainting UNet's sample carries 2C + 1 channels (latents, mask, masked-image latents).
        let channels = shape[1] % 2 == 1 ? (shape[1] - 1) / 2 : shape[1]
        return [1, channels] + (try PipelineSettings.latentSize(height: height, width: width, sizes: sizes))
    }
}
#endif
