import Foundation

/// What the loop needs from the model besides its Core ML files, from the bundle's
/// pipeline_config.json (written by the converter's bundle step): the VAE's latent scaling factor,
/// the text encoder's sequence length, the size the models were made for and, for packages of several
/// shapes (--latent-sizes, --max-prompt-chunks), their latent sizes and prompt windows. Bundles without
/// the file, or keys it leaves out, get SD 1.x's values; without listed sizes the UNet's declared input
/// decides the latent shape the loop runs at.
public struct PipelineSettings: Equatable, Sendable {
    public static let fileName = "pipeline_config.json"

    public var latentScale = StableDiffusionPipeline.defaultLatentScale
    public var sequenceLength = 77
    /// (height, width) of the latents and of the images; nil when the bundle does not say.
    public var latentSize: [Int]?
    public var imageSize: [Int]?
    /// Latent (height, width) sizes the models take, the default first: `latent_sizes`, else `latent_size`
    /// alone, else none (python_coreml_sd.bundle.resources.shapes_of reads them the same way).
    public var latentSizes: [[Int]] = []
    /// The UNet takes text contexts of 1...maxPromptChunks windows (77 tokens each) side by side.
    public var maxPromptChunks = 1
    /// SDXL bundles say `"family": "sdxl"` (python_coreml_sd.components.SDXL); others are SD 1.x / 2.x.
    public var family = ModelFamily.sd
    /// SDXL: no negative prompt -> zero negative conditioning (diffusers' force_zeros_for_empty_prompt).
    public var forceZerosForEmptyPrompt = false
    /// SDXL: the second tokenizer's pad token (SDXL's pads with "!"); nil: it pads as the first.
    public var tokenizer2PadToken: String?
    /// What each of the base UNet's and the refiner's time ids is (the bundle's `time_ids`, `refiner_time_ids`).
    public var timeIds = TimeId.base
    public var refinerTimeIds = TimeId.refiner

    public var promptChunkCounts: [Int] { Array(1...maxPromptChunks) }

    public init() {}

    public init(json data: Data) throws {
        guard let object = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
            throw UsageError("\(Self.fileName) is not a JSON object")
        }
        self.init()
        if let scale = object["vae_scaling_factor"] as? NSNumber { latentScale = scale.floatValue }
        if let length = object["text_sequence_length"] as? NSNumber { sequenceLength = length.intValue }
        latentSize = (object["latent_size"] as? [NSNumber])?.map(\.intValue)
        imageSize = (object["image_size"] as? [NSNumber])?.map(\.intValue)
        let sizes = (object["latent_sizes"] as? [[NSNumber]])?.map { $0.map(\.intValue) }
        latentSizes = sizes ?? latentSize.map { [$0] } ?? []
        if let chunks = object["max_prompt_chunks"] as? NSNumber { maxPromptChunks = chunks.intValue }
        try readXL(object)
        let pairs = [latentSize, imageSize].compactMap { $0 } + latentSizes
        guard latentScale.isFinite, latentScale > 0, (2...1024).contains(sequenceLength), (1...1000).contains(maxPromptChunks),
              object["latent_sizes"] == nil || sizes?.isEmpty == false,
              pairs.allSatisfy({ $0.count == 2 && $0.allSatisfy { $0 > 0 } }) else {
            throw UsageError("\(Self.fileName) has an unusable value: \(object)")
        }
    }

    /// SDXL's keys (python_coreml_sd.bundle.resources.xl_settings); time ids of names this package does not know
    /// are refused rather than fed in the wrong order.
    private mutating func readXL(_ object: [String: Any]) throws {
        if let name = object["family"] {
            guard let text = name as? String, let parsed = ModelFamily(rawValue: text) else {
                throw UsageError("\(Self.fileName): unknown family \(name) (this package runs sd and sdxl)")
            }
            family = parsed
        }
        forceZerosForEmptyPrompt = (object["force_zeros_for_empty_prompt"] as? Bool) ?? false
        tokenizer2PadToken = object["tokenizer_2_pad_token"] as? String
        for (key, path) in [("time_ids", \PipelineSettings.timeIds), ("refiner_time_ids", \PipelineSettings.refinerTimeIds)] {
            guard let value = object[key] else { continue }
            guard let names = value as? [String], !names.isEmpty,
                  case let ids = names.compactMap(TimeId.init(rawValue:)), ids.count == names.count else {
                throw UsageError("\(Self.fileName): \(key) \(value) names time ids this package does not know "
                                 + "(it knows \(TimeId.allCases.map(\.rawValue).joined(separator: ", ")))")
            }
            self[keyPath: path] = ids
        }
    }

    public static func load(folder: URL) throws -> PipelineSettings {
        let url = folder.appendingPathComponent(fileName)
        guard FileManager.default.fileExists(atPath: url.path) else { return PipelineSettings() }
        return try PipelineSettings(json: Data(contentsOf: url))
    }
}

extension PipelineSettings {
    /// The Python pipeline's warning when a prompt has more windows than the UNet takes (it keeps the first
    /// ones); nil when every prompt fits.
    public func truncationWarning(prompts: [String], tokenizer: BPETokenizer) -> String? {
        let truncated = prompts.contains {
            tokenizer.windows($0, length: sequenceLength, maxCount: maxPromptChunks).truncated
        }
        return truncated ? PromptWindows.truncationWarning(windows: maxPromptChunks, length: sequenceLength) : nil
    }

    /// The latent (height, width) for `--height`/`--width` in pixels (nil: the default size's), one of
    /// `sizes` (latent sizes, default first); any other size is one error line listing those there are.
    public static func latentSize(height: Int?, width: Int?, sizes: [[Int]]) throws -> [Int] {
        guard let first = sizes.first else { throw UsageError("the models list no latent size") }
        let wanted = [height ?? 8 * first[0], width ?? 8 * first[1]]
        if let size = sizes.first(where: { $0.map { 8 * $0 } == wanted }) { return size }
        let listed = sizes.map { "\(8 * $0[0])x\(8 * $0[1])" }.joined(separator: ", ")
        throw UsageError("--height \(wanted[0]) --width \(wanted[1]): the models take \(listed) pixels (height x width); "
                         + "pass one of them, or reconvert with --latent-sizes")
    }
}

extension PipelineSettings {
    /// A ControlNet condition image must have the aspect ratio of the images generated (within 0.01, as the Python
    /// pipeline's control_condition; it is then resized): one line naming the fix otherwise.
    public static func checkConditionAspect(path: String, width: Int, height: Int, imageWidth: Int, imageHeight: Int) throws {
        guard width > 0, height > 0,
              abs(Double(width) / Double(height) - Double(imageWidth) / Double(imageHeight)) <= 0.01 else {
            throw UsageError("--controlnet-inputs \(path) is \(width)x\(height), not the \(imageWidth)x\(imageHeight) aspect "
                             + "ratio of the images this UNet makes; crop it to that ratio (it is then resized)")
        }
    }
}
