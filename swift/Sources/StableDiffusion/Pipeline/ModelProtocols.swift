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

/// The models of one pipeline. The encoder and safety checker are optional, as in the bundles.
public struct PipelineModels {
    public var textEncoder: any TextEncoding
    public var unet: any NoisePredicting
    public var decoder: any LatentDecoding
    public var encoder: (any ImageEncoding)?
    public var safetyChecker: (any SafetyChecking)?

    public init(textEncoder: any TextEncoding, unet: any NoisePredicting, decoder: any LatentDecoding,
                encoder: (any ImageEncoding)? = nil, safetyChecker: (any SafetyChecking)? = nil) {
        self.textEncoder = textEncoder
        self.unet = unet
        self.decoder = decoder
        self.encoder = encoder
        self.safetyChecker = safetyChecker
    }
}
