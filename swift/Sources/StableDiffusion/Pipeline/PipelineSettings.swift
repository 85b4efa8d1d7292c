import Foundation

/// What the loop needs from the model besides its Core ML files, from the bundle's
/// pipeline_config.json (written by the converter's bundle step): the VAE's latent scaling factor,
/// the text encoder's sequence length and the size the models were made for. Bundles without the
/// file, or keys it leaves out, get SD 1.x's values; the UNet's declared input still decides the
/// latent shape the loop runs at.
public struct PipelineSettings: Equatable, Sendable {
    public static let fileName = "pipeline_config.json"

    public var latentScale = StableDiffusionPipeline.defaultLatentScale
    public var sequenceLength = 77
    /// (height, width) of the latents and of the images; nil when the bundle does not say.
    public var latentSize: [Int]?
    public var imageSize: [Int]?

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
        guard latentScale.isFinite, latentScale > 0, (2...1024).contains(sequenceLength),
              [latentSize, imageSize].allSatisfy({ $0 == nil || ($0!.count == 2 && $0!.allSatisfy { $0 > 0 }) }) else {
            throw UsageError("\(Self.fileName) has an unusable value: \(object)")
        }
    }

    public static func load(folder: URL) throws -> PipelineSettings {
        let url = folder.appendingPathComponent(fileName)
        guard FileManager.default.fileExists(atPath: url.path) else { return PipelineSettings() }
        return try PipelineSettings(json: Data(contentsOf: url))
    }
}
