/// What the generation loop needs from a model backend. Core ML implements these on Apple
/// platforms; the closed-form models implement them everywhere for tests.

public protocol TextEncoding {
    /// Hidden states (1, sequence, hidden) for one padded sequence of token ids.
    func encode(tokenIds: [Int]) throws -> Tensor
}

public protocol NoisePredicting {
    /// The model output (noise or v) for a batch of latents at one timestep; `hiddenStates` holds
    /// one text embedding per batch item, in the same order. Timesteps may be fractional (Euler's
    /// "linspace" spacing); the UNet takes them as float32.
    func predictNoise(latents: Tensor, timestep: Double, hiddenStates: Tensor) throws -> Tensor
}

public protocol LatentDecoding {
    /// Image (1, 3, H, W) in [-1, 1] from latents already divided by the latent scale.
    func decode(_ latents: Tensor) throws -> Tensor
}

public protocol ImageEncoding {
    /// The VAE posterior's moments for an image (1, 3, H, W) in [-1, 1]: (1, 2C, h, w), the mean and
    /// the log-variance concatenated on channels (Apple's `x` -> `latent` interface). The pipeline
    /// samples, scales and noises the latents itself.
    func encode(image: Tensor) throws -> Tensor
}

public protocol SafetyChecking {
    /// Whether the decoded image (1, 3, H, W) in [-1, 1] must not be shown.
    func isUnsafe(image: Tensor) throws -> Bool
}

/// A ControlNet (Apple's ControlNet_<name>: the UNet's inputs plus `controlnet_cond`, the condition image
/// (B, 3, H, W) in [0, 1]): its residuals additional_residual_0, 1, ... in that order, unscaled.
public protocol ControlNetting {
    func residuals(latents: Tensor, timestep: Double, hiddenStates: Tensor, condition: Tensor) throws -> [Tensor]
}

/// The UNet converted with --unet-support-controlnet (Apple's ControlledUnet): NoisePredicting's inputs plus
/// the ControlNets' summed residuals, by the same names and order as a ControlNet's outputs.
public protocol ControlledNoisePredicting {
    func predictNoise(latents: Tensor, timestep: Double, hiddenStates: Tensor, residuals: [Tensor]) throws -> Tensor
}

/// The models of one pipeline. The encoder and safety checker are optional, as in the bundles; ControlNets
/// need the controlled UNet.
public struct PipelineModels {
    public var textEncoder: any TextEncoding
    public var unet: any NoisePredicting
    public var decoder: any LatentDecoding
    public var encoder: (any ImageEncoding)?
    public var safetyChecker: (any SafetyChecking)?
    public var controlNets: [any ControlNetting]
    public var controlledUnet: (any ControlledNoisePredicting)?

    public init(textEncoder: any TextEncoding, unet: any NoisePredicting, decoder: any LatentDecoding,
                encoder: (any ImageEncoding)? = nil, safetyChecker: (any SafetyChecking)? = nil,
                controlNets: [any ControlNetting] = [], controlledUnet: (any ControlledNoisePredicting)? = nil) {
        self.textEncoder = textEncoder
        self.unet = unet
        self.decoder = decoder
        self.encoder = encoder
        self.safetyChecker = safetyChecker
        self.controlNets = controlNets
        self.controlledUnet = controlledUnet
    }
}

/// SDXL's text encoders (both): the penultimate layer's hidden states (1, sequence, hidden) and the pooled,
/// projected embedding (1, pooled) for one padded sequence of token ids. The pipeline uses the second
/// encoder's pooled embedding; the first's is ignored, as in diffusers.
public protocol XLTextEncoding {
    func encodeXL(tokenIds: [Int]) throws -> (hidden: Tensor, pooled: Tensor)
}

/// SDXL's conditions beyond the text, one row per batch item in the hidden states' order: the time ids
/// (B, 6 for the base: original size, crop top-left, target size; B, 5 for the refiner: the aesthetic score
/// instead of the target size) and the second encoder's pooled text embeddings (B, pooled).
public struct AddedConditions: Equatable, Sendable {
    public var timeIds: Tensor
    public var textEmbeds: Tensor

    public init(timeIds: Tensor, textEmbeds: Tensor) {
        self.timeIds = timeIds
        self.textEmbeds = textEmbeds
    }

    /// Batch item `index` of both, keeping a batch of 1.
    public func batchItem(_ index: Int) -> AddedConditions {
        AddedConditions(timeIds: timeIds.batchItem(index), textEmbeds: textEmbeds.batchItem(index))
    }
}

/// An SDXL UNet (base or refiner): NoisePredicting's inputs plus the added conditions.
public protocol ConditionedNoisePredicting {
    func predictNoise(latents: Tensor, timestep: Double, hiddenStates: Tensor, added: AddedConditions) throws -> Tensor
}

/// An SDXL ControlNet (ControlNet_<name> of an SDXL model, python_coreml_sd's CONTROLNET_XL): ControlNetting's
/// inputs plus the UNet's added conditions (`time_ids`, `text_embeds`); its residuals additional_residual_0, 1, ...
public protocol ConditionedControlNetting {
    func residuals(latents: Tensor, timestep: Double, hiddenStates: Tensor, added: AddedConditions,
                   condition: Tensor) throws -> [Tensor]
}

/// The SDXL UNet converted with --unet-support-controlnet: ConditionedNoisePredicting's inputs plus the ControlNets'
/// summed residuals, by the ControlNets' output names and order.
public protocol ConditionedControlledNoisePredicting {
    func predictNoise(latents: Tensor, timestep: Double, hiddenStates: Tensor, added: AddedConditions,
                      residuals: [Tensor]) throws -> Tensor
}

/// The models of an SDXL pipeline: two text encoders, the base UNet, optionally the refiner UNet
/// (`--refiner-start`), the VAE decoder, optionally the VAE encoder (image-to-image, inpainting), and ControlNets
/// with the controlled base UNet they need. SDXL has no safety checker.
public struct XLPipelineModels {
    public var textEncoder: any XLTextEncoding
    public var textEncoder2: any XLTextEncoding
    public var unet: any ConditionedNoisePredicting
    public var refiner: (any ConditionedNoisePredicting)?
    public var decoder: any LatentDecoding
    public var encoder: (any ImageEncoding)?
    public var controlNets: [any ConditionedControlNetting]
    public var controlledUnet: (any ConditionedControlledNoisePredicting)?

    public init(textEncoder: any XLTextEncoding, textEncoder2: any XLTextEncoding, unet: any ConditionedNoisePredicting,
                refiner: (any ConditionedNoisePredicting)? = nil, decoder: any LatentDecoding,
                encoder: (any ImageEncoding)? = nil, controlNets: [any ConditionedControlNetting] = [],
                controlledUnet: (any ConditionedControlledNoisePredicting)? = nil) {
        self.textEncoder = textEncoder
        self.textEncoder2 = textEncoder2
        self.unet = unet
        self.refiner = refiner
        self.decoder = decoder
        self.encoder = encoder
        self.controlNets = controlNets
        self.controlledUnet = controlledUnet
    }
}
