import Foundation

/// The files of a Resources folder produced by the converter, checked before anything loads. Each
/// model may be compiled (`.mlmodelc`, `--bundle-resources-for-swift-cli`) or a package
/// (`.mlpackage`, `--bundle-packages`, the only kind Linux converters can make), which Core ML
/// compiles on first load.
public struct ResourceFolder {
    public static let modelExtensions = ["mlmodelc", "mlpackage"]

    public let url: URL
    public let chunkedUnet: Bool
    public let hasEncoder: Bool
    public let hasSafetyChecker: Bool
    /// SDXL's refiner: ["UnetRefiner"], its two chunks, or nil when the folder has none.
    public let refinerNames: [String]?
    /// The UNet taking ControlNet residuals (Apple's ControlledUnet, or its two chunks); nil when absent.
    public let controlledUnetNames: [String]?
    /// Where ControlNets live, as in Apple's bundles: controlnet/<name>.mlmodelc.
    public static let controlNetFolder = "controlnet"

    /// `controlNets`: the names --controlnet asks for; each must be in controlnet/, with the controlled UNet.
    public init(path: String, needsEncoder: Bool = false, controlNets: [String] = []) throws {
        let url = URL(fileURLWithPath: path, isDirectory: true)
        self.url = url
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: url.path, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw UsageError("resource folder \(path) does not exist")
        }
        let has = { (name: String) in Self.modelURL(in: url, name) != nil }
        chunkedUnet = !has("Unet") && has("UnetChunk1") && has("UnetChunk2")
        hasEncoder = has("VAEEncoder")
        hasSafetyChecker = has("SafetyChecker")
        refinerNames = has("UnetRefinerChunk1") && has("UnetRefinerChunk2") ? ["UnetRefinerChunk1", "UnetRefinerChunk2"]
            : has("UnetRefiner") ? ["UnetRefiner"] : nil
        controlledUnetNames = has("ControlledUnetChunk1") && has("ControlledUnetChunk2")
            ? ["ControlledUnetChunk1", "ControlledUnetChunk2"] : has("ControlledUnet") ? ["ControlledUnet"] : nil
        // An SDXL bundle (pipeline_config.json's family) needs the second text encoder too.
        let xl = try PipelineSettings.load(folder: url).family == .sdxl
        var missing = ["TextEncoder", "VAEDecoder"].filter { !has($0) }.map { "\($0).mlmodelc" }
        if xl && !has("TextEncoder2") { missing.append("TextEncoder2.mlmodelc (an SDXL bundle's second text encoder)") }
        missing += ["vocab.json", "merges.txt"].filter { !FileManager.default.fileExists(atPath: url.appendingPathComponent($0).path) }
        let hasUnet = chunkedUnet || has("Unet")
        if !hasUnet && controlledUnetNames == nil {
            missing.append("Unet.mlmodelc (or UnetChunk1.mlmodelc + UnetChunk2.mlmodelc)")
        }
        if needsEncoder && !hasEncoder { missing.append("VAEEncoder.mlmodelc (needed by --image)") }
        if !controlNets.isEmpty && controlledUnetNames == nil {
            missing.append("ControlledUnet.mlmodelc (the UNet converted with --unet-support-controlnet, needed by --controlnet)")
        }
        missing += controlNets.filter { !has(Self.controlNetPath($0)) }.map { "\(Self.controlNetPath($0)).mlmodelc" }
        guard missing.isEmpty else {
            throw UsageError("resource folder \(path) lacks \(missing.joined(separator: ", ")) (.mlpackage also works)")
        }
        if !hasUnet && controlNets.isEmpty {  // --unet-support-controlnet converts the UNet instead of the plain one
            throw UsageError("resource folder \(path) holds only the controlled UNet (ControlledUnet.mlmodelc): pass "
                             + "--controlnet NAME --controlnet-inputs IMAGE")
        }
    }

    /// The model base name of ControlNet `name` inside the folder.
    public static func controlNetPath(_ name: String) -> String { "\(controlNetFolder)/\(name)" }

    /// `name.mlmodelc` if present, else `name.mlpackage`.
    static func modelURL(in folder: URL, _ name: String) -> URL? {
        modelExtensions.lazy.map { folder.appendingPathComponent("\(name).\($0)") }
            .first { FileManager.default.fileExists(atPath: $0.path) }
    }

    /// The model file for a component base name such as "TextEncoder"; nil when absent.
    public func model(_ name: String) -> URL? { Self.modelURL(in: url, name) }

    public func file(_ name: String) -> URL { url.appendingPathComponent(name) }

    /// The model's scheduler settings from scheduler_config.json; SD 1.x's when the folder has none
    /// (bundles from before the converter wrote it).
    public func schedulerConfig() throws -> SchedulerConfig {
        try SchedulerConfig.load(folder: url)
    }

    /// Latent scale, sequence length and model size from pipeline_config.json; SD 1.x's without it.
    public func pipelineSettings() throws -> PipelineSettings {
        try PipelineSettings.load(folder: url)
    }

    /// SDXL's second tokenizer: `first` (this folder's tokenizer) padding with the bundle's tokenizer_2_pad_token.
    public func tokenizer2(settings: PipelineSettings, first: BPETokenizer) throws -> BPETokenizer {
        guard let token = settings.tokenizer2PadToken else { return first }
        return try first.padding(with: token)
    }

    public func tokenizer() throws -> BPETokenizer {
        // added_tokens.json: tokens of textual-inversion embeddings, when the bundle has them.
        try BPETokenizer(vocabURL: file("vocab.json"), mergesURL: file("merges.txt"),
                         addedTokensURL: url.appendingPathComponent("added_tokens.json"))
    }
}

extension ResourceFolder {
    /// What the loaded models' inputs must show before ControlNets run (names from their model descriptions): the
    /// UNet takes the residuals (additional_residual_0, ...), and each ControlNet is of the bundle's family (an SDXL
    /// one takes `time_ids` and `text_embeds`, an SD one does not). One line naming the fix otherwise.
    public static func checkControlInputs(unetInputs: Set<String>, controlNetInputs: [(name: String, inputs: Set<String>)],
                                          family: ModelFamily) throws {
        guard !controlNetInputs.isEmpty else { return }
        if !unetInputs.contains("additional_residual_0") {
            throw UsageError("a ControlNet was given but this bundle's UNet takes no ControlNet residuals (additional_residual_0, "
                             + "...); convert it with --convert-unet --unet-support-controlnet")
        }
        for (name, inputs) in controlNetInputs where inputs.contains("time_ids") != (family == .sdxl) {
            let (its, bundle) = inputs.contains("time_ids") ? ("SDXL's", "an SD bundle") : ("SD's", "an SDXL bundle")
            throw UsageError("--controlnet \(name) is \(its) (it \(family == .sdxl ? "lacks" : "takes") time_ids) and this is "
                             + "\(bundle); convert a ControlNet of the bundle's model")
        }
    }
}
