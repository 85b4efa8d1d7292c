import Foundation

/// The CLI's options, parsed without outside packages. Lives in the library so tests can call it.
public struct CommandLineOptions: Equatable {
    public var resourcePath = ""
    public var prompt = ""
    public var negativePrompt = ""
    public var imageCount = 1
    public var stepCount = 50
    public var seed: UInt32 = 93
    public var guidanceScale: Float = 7.5
    public var scheduler: SchedulerKind = .pndm
    /// nil: the bundle's scheduler_config.json decides (SD 1.x's settings without one).
    public var predictionType: PredictionType?
    public var timestepSpacing: TimestepSpacing?
    public var karrasSigmas = false
    public var rng: RandomSourceKind = .numpy
    public var computeUnits: ComputeUnitChoice = .all
    public var outputPath = "."
    public var imagePath: String?
    /// nil: 0.75, or 1 with --mask (diffusers' inpainting default); `resolvedStrength`.
    public var strength: Double?
    /// Inpainting: white is repainted (an inpainting UNet's bundle; needs --image).
    public var maskPath: String?
    /// ControlNets by name (the bundle's controlnet/<name>.mlmodelc), one condition image each, and their scales
    /// (one for all or one each).
    public var controlNets: [String] = []
    public var controlNetInputs: [String] = []
    public var controlNetScales: [Float] = [1]
    /// Image size in pixels, one of the sizes the bundle's models take; nil: the default size's.
    public var height: Int?
    public var width: Int?
    public var disableSafety = false
    public var reduceMemory = false
    /// SDXL bundles: micro-conditioning in pixels (nil sizes: the image's), the refiner's aesthetic scores and
    /// the hand-off to the refiner (nil: the base alone).
    public var originalSize: [Double]?
    public var cropsCoordsTopLeft: [Double] = [0, 0]
    public var targetSize: [Double]?
    public var aestheticScore = 6.0
    public var negativeAestheticScore = 2.5
    public var refinerStart: Double?
    public var help = false

    public init() {}

    public static let usage = """
    USAGE: StableDiffusionCLI --resource-path <dir> --prompt <text> [options]

    Generates images with a Resources folder from python_coreml_sd's converter (needs Core ML:
    macOS 13+ / iOS 16+). Elsewhere it checks the arguments and the folder, then stops.

    OPTIONS:
      --resource-path <dir>     TextEncoder.mlmodelc, Unet.mlmodelc (or UnetChunk1/2.mlmodelc),
                                VAEDecoder.mlmodelc, optional VAEEncoder.mlmodelc and
                                SafetyChecker.mlmodelc, vocab.json, merges.txt
      --prompt <text>           what to draw
      --negative-prompt <text>  what to steer away from (default: empty)
      --image-count <n>         images to generate; image i uses seed + i (default: 1)
      --step-count <n>          inference steps (default: 50)
      --seed <n>                0 ... 4294967295 (default: 93)
      --guidance-scale <x>      classifier-free guidance (default: 7.5)
      --scheduler <name>        the sampler (default: pndm), each as diffusers runs it:
                                  pndm     PNDM's pseudo linear multistep (SD 1.x's default)
                                  dpmpp    DPM-Solver++ 2M; good in 20-25 steps
                                  euler    Euler on the sigma ODE
                                  euler_a  Euler ancestral: fresh noise from --rng every step,
                                           so results vary more with the step count
                                  ddim     DDIM, eta 0 (deterministic)
                                  lms      linear multistep (order 4) on the sigma ODE
                                  lcm      latent consistency, for LCM-distilled UNets (2-8
                                           steps, guidance about 1-2); ignores the spacing
      --timestep-spacing <name> which training timesteps the steps visit (default: the model's
                                scheduler_config.json, else each sampler's diffusers default):
                                  linspace  evenly from the last to the first, both included
                                  leading   multiples of (training steps / steps) from 0, plus
                                            the config's steps_offset
                                  trailing  the same multiples down from the last training
                                            step; pick it for few steps and zero-SNR models
      --karras-sigmas           dpmpp, euler, lms: sigmas spaced as in Karras et al. (rho 7;
                                dpmpp with it is "DPM++ 2M Karras")
      --prediction-type <name>  epsilon | v_prediction: what the UNet predicts (default: the
                                model's scheduler_config.json, else epsilon; SD 2.x 768 is v)
      --rng <name>              the initial and step noise (default: numpy):
                                  numpy   NumPy's RandomState (the Python pipeline's source)
                                  torch   torch.randn on the CPU
                                  nvidia  torch.randn on a CUDA GPU (cuRAND Philox), as most
                                          diffusers seeds were made; within a few ulps
      --compute-units <name>    all | cpuOnly | cpuAndGPU | cpuAndNeuralEngine (default: all)
      --output-path <dir>       where PNGs go (default: .)
      --image <png>             start image for img2img (needs VAEEncoder.mlmodelc)
      --strength <x>            img2img: share of the schedule to run, (0, 1] (default: 0.75;
                                with --mask 1, SDXL's 0.9999)
      --mask <png>              inpainting (a bundle of an inpainting UNet, SD's or SDXL's): white
                                is repainted, black kept; needs --image, of its pixel size (not
                                resized to fit). With --controlnet and
                                a 4-channel controlled UNet: the ControlNet inpaint route (the
                                image kept outside the mask after every step)
      --controlnet <name>...    ControlNets of the bundle's controlnet/ folder (needs
                                ControlledUnet.mlmodelc), run together, residuals summed
      --controlnet-inputs <png>...
                                one condition image per --controlnet, in the same order, of the
                                images' aspect ratio (resized); with --mask and one inpaint
                                ControlNet leave it out: the masked --image is its condition
      --controlnet-scale <x>... each ControlNet's residual scale: one for all or one each (default: 1)
      --height <n>, --width <n> image size in pixels: one of the sizes the models were converted
                                for (--latent-sizes; pipeline_config.json lists them); default:
                                the first of them
      --original-size <h> <w>   SDXL: the size the time ids say the image had (default: its size)
      --crops-coords-top-left <y> <x>
                                SDXL: the crop the time ids say it was cut at (default: 0 0)
      --target-size <h> <w>     SDXL: the size the time ids ask for (default: the image's)
      --refiner-start <x>       SDXL: the base runs the schedule down to this fraction, then
                                UnetRefiner.mlmodelc the rest, 0 < x < 1 (default: base only)
      --aesthetic-score <x>, --negative-aesthetic-score <x>
                                the refiner's time ids for the prompt and the negative prompt
                                (default: 6 and 2.5)
      --disable-safety          skip the safety checker
      --reduce-memory           load each model only while it runs
      --help                    show this text
    """

    public static func parse(_ arguments: [String]) throws -> CommandLineOptions {
        var options = CommandLineOptions()
        var queue = ArraySlice(arguments)
        while let argument = queue.popFirst() {
            guard argument.hasPrefix("--") else { throw UsageError("unexpected argument '\(argument)'") }
            let (name, inlineValue) = split(argument)
            if Self.listOptions.contains(name) {  // values up to the next option, as Apple's CLI takes them
                var values = inlineValue.map { [$0] } ?? []
                while let next = queue.first, !next.hasPrefix("--") { values.append(queue.removeFirst()) }
                try options.applyList(name, values)
                continue
            }
            try options.apply(name, value: { try inlineValue ?? nextValue(name, &queue) }, hasInline: inlineValue != nil)
        }
        if !options.help { try options.validate() }
        return options
    }

    private static func split(_ argument: String) -> (String, String?) {
        guard let equals = argument.firstIndex(of: "=") else { return (argument, nil) }
        return (String(argument[..<equals]), String(argument[argument.index(after: equals)...]))
    }

    private static func nextValue(_ name: String, _ queue: inout ArraySlice<String>) throws -> String {
        guard let value = queue.popFirst() else { throw UsageError("\(name) needs a value") }
        return value
    }

    private static let listOptions: Set<String> = ["--controlnet", "--controlnet-inputs", "--controlnet-scale"]

    private mutating func applyList(_ name: String, _ values: [String]) throws {
        if values.isEmpty { throw UsageError("\(name) needs at least one value") }
        switch name {
        case "--controlnet": controlNets = values
        case "--controlnet-inputs": controlNetInputs = values
        default: controlNetScales = try values.map { try Self.number(name, $0, in: -100...100) }
        }
    }

    private mutating func apply(_ name: String, value: () throws -> String, hasInline: Bool) throws {
        if let flag = Self.flags[name] {
            if hasInline { throw UsageError("\(name) takes no value") }
            self[keyPath: flag] = true
            return
        }
        guard Self.valueOptions.contains(name) else { throw UsageError("unknown option '\(name)' (see --help)") }
        let text = try value()
        switch name {
        case "--resource-path": resourcePath = text
        case "--prompt": prompt = text
        case "--negative-prompt": negativePrompt = text
        case "--output-path": outputPath = text
        case "--image": imagePath = text
        case "--mask": maskPath = text
        case "--image-count": imageCount = try Self.number(name, text, in: 1...1000)
        case "--step-count": stepCount = try Self.number(name, text, in: 1...1000)
        case "--seed": seed = try Self.number(name, text, in: 0...UInt32.max)
        case "--guidance-scale": guidanceScale = try Self.number(name, text, in: 0...100)
        case "--strength": strength = try Self.number(name, text, in: 0...1)
        case "--height": height = try Self.number(name, text, in: 8...16384)
        case "--width": width = try Self.number(name, text, in: 8...16384)
        case "--scheduler": scheduler = try Self.choice(name, text)
        case "--prediction-type": predictionType = try Self.choice(name, text) as PredictionType
        case "--timestep-spacing": timestepSpacing = try Self.choice(name, text) as TimestepSpacing
        case "--rng": rng = try Self.choice(name, text)
        case "--compute-units": computeUnits = try Self.choice(name, text)
        case "--original-size", "--crops-coords-top-left", "--target-size":
            // Two values, as the Python CLI takes them (nargs=2)
            if hasInline { throw UsageError("\(name) takes two values: \(name) A B") }
            let pair = try [text, try value()].map { try Self.number(name, $0, in: 0...1e6) as Double }
            switch name {
            case "--original-size": originalSize = pair
            case "--target-size": targetSize = pair
            default: cropsCoordsTopLeft = pair
            }
        case "--aesthetic-score": aestheticScore = try Self.number(name, text, in: 0...100)
        case "--negative-aesthetic-score": negativeAestheticScore = try Self.number(name, text, in: 0...100)
        case "--refiner-start":
            guard let start = Double(text), start > 0, start < 1 else {
                throw UsageError("--refiner-start must be in (0, 1) (the fraction of the steps the base runs), got '\(text)'")
            }
            refinerStart = start
        default: throw UsageError("unknown option '\(name)' (see --help)")
        }
    }

    private static let valueOptions: Set<String> = [
        "--resource-path", "--prompt", "--negative-prompt", "--output-path", "--image", "--mask", "--image-count", "--step-count",
        "--seed", "--guidance-scale", "--strength", "--height", "--width", "--scheduler", "--prediction-type",
        "--timestep-spacing", "--rng", "--compute-units", "--original-size", "--crops-coords-top-left", "--target-size",
        "--aesthetic-score", "--negative-aesthetic-score", "--refiner-start",
    ]

    /// The options only SDXL bundles take, by flag, where they differ from their defaults.
    public var xlFlags: [String] {
        var flags: [String] = []
        if originalSize != nil { flags.append("--original-size") }
        if cropsCoordsTopLeft != [0, 0] { flags.append("--crops-coords-top-left") }
        if targetSize != nil { flags.append("--target-size") }
        if refinerStart != nil { flags.append("--refiner-start") }
        if aestheticScore != 6 || negativeAestheticScore != 2.5 { flags.append("--aesthetic-score") }
        return flags
    }

    private static let flags: [String: WritableKeyPath<CommandLineOptions, Bool>] = [
        "--disable-safety": \.disableSafety, "--reduce-memory": \.reduceMemory, "--karras-sigmas": \.karrasSigmas, "--help": \.help, "-h": \.help,
    ]

    private static func number<T: LosslessStringConvertible & Comparable>(_ name: String, _ text: String,
                                                                         in range: ClosedRange<T>) throws -> T {
        guard let value = T(text), range.contains(value) else {
            throw UsageError("\(name) must be a number in \(range.lowerBound) ... \(range.upperBound), got '\(text)'")
        }
        return value
    }

    private static func choice<T: RawRepresentable & CaseIterable>(_ name: String, _ text: String) throws -> T
    where T.RawValue == String {
        guard let value = T(rawValue: text) else {
            let names = T.allCases.map(\.rawValue).joined(separator: ", ")
            throw UsageError("\(name) must be one of \(names), got '\(text)'")
        }
        return value
    }

    private func validate() throws {
        if resourcePath.isEmpty { throw UsageError("--resource-path is required") }
        if prompt.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty { throw UsageError("--prompt is required") }
        if karrasSigmas && ![.dpmpp, .euler, .lms].contains(scheduler) {
            throw UsageError("--karras-sigmas needs --scheduler dpmpp, euler or lms")
        }
        if maskPath != nil && imagePath == nil {
            throw UsageError("--mask needs --image IMAGE: the picture whose white-masked part is repainted")
        }
        if imagePath != nil, let strength, strength == 0 { throw UsageError("--strength must be in (0, 1], got 0") }
        try validateControl()
    }

    private func validateControl() throws {
        let (nets, images, scales) = (controlNets.count, controlNetInputs.count, controlNetScales.count)
        let listed = "(--controlnet \(controlNets.joined(separator: " ")))"
        if nets == 0 && images > 0 { throw UsageError("--controlnet-inputs needs --controlnet NAME, one per image") }
        // With --mask one ControlNet may go without its image: an inpaint ControlNet, steered by the masked image.
        if images == 0 && nets > 0 && !(maskPath != nil && nets == 1) {
            throw UsageError("--controlnet needs --controlnet-inputs IMAGE, one per ControlNet \(listed)")
        }
        if nets != images && images > 0 {
            throw UsageError("--controlnet-inputs: \(Self.count(images, "image")) for \(Self.count(nets, "ControlNet")) "
                             + "\(listed); pass one condition image per ControlNet, in the same order")
        }
        if scales != 1 && scales != nets {
            throw UsageError("--controlnet-scale: \(scales) scales for \(nets) ControlNets \(listed); pass one for all or one each")
        }
    }

    /// "1 image", "2 images".
    private static func count(_ number: Int, _ noun: String) -> String { "\(number) \(noun)\(number == 1 ? "" : "s")" }

    public var resolvedStrength: Double { resolvedStrength(family: .sd) }

    /// --strength, else 0.75, or with --mask the family's inpainting default (SD's 1, SDXL's 0.9999, as diffusers').
    public func resolvedStrength(family: ModelFamily) -> Double {
        strength ?? (maskPath == nil ? 0.75 : family == .sdxl ? StableDiffusionXLPipeline.defaultInpaintStrength : 1)
    }

    /// The request for a model whose scheduler settings are `schedulerConfig` (the bundle's) of `family`.
    public func generationConfig(schedulerConfig: SchedulerConfig = .stableDiffusion, family: ModelFamily = .sd) -> GenerationConfig {
        var config = GenerationConfig(prompt: prompt)
        config.schedulerConfig = schedulerConfig
        config.timestepSpacing = timestepSpacing
        config.useKarrasSigmas = karrasSigmas ? true : nil
        config.negativePrompt = negativePrompt
        config.seed = seed
        config.imageCount = imageCount
        config.stepCount = stepCount
        config.guidanceScale = guidanceScale
        config.scheduler = scheduler
        config.predictionType = predictionType
        config.rng = rng
        config.strength = resolvedStrength(family: family)
        config.controlScales = controlNetScales
        config.disableSafety = disableSafety
        config.originalSize = originalSize
        config.cropsCoordsTopLeft = cropsCoordsTopLeft
        config.targetSize = targetSize
        config.aestheticScore = aestheticScore
        config.negativeAestheticScore = negativeAestheticScore
        config.refinerStart = refinerStart
        return config
    }
}

/// Core ML compute units by the names Apple's CLI uses.
public enum ComputeUnitChoice: String, CaseIterable, Sendable {
    case all, cpuOnly, cpuAndGPU, cpuAndNeuralEngine
}

public struct UsageError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}
