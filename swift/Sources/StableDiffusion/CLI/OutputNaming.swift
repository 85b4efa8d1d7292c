import Foundation

/// PNG names and embedded parameters in the Python CLI's style, so outputs of both sort together.
public enum OutputNaming {
    /// `<prompt slug>.seed<seed>.png`: lower case, runs of anything but a-z 0-9 as one "_", 80 characters.
    public static func fileName(prompt: String, seed: UInt32) -> String {
        var slug = ""
        for scalar in prompt.lowercased().unicodeScalars {
            let keep = ("a"..."z").contains(scalar) || ("0"..."9").contains(scalar)
            if keep {
                slug.unicodeScalars.append(scalar)
            } else if !slug.hasSuffix("_") {
                slug += "_"
            }
        }
        let trimmed = String(slug.drop { $0 == "_" }.reversed().drop { $0 == "_" }.reversed()).prefix(80)
        return "\(trimmed.isEmpty ? "image" : String(trimmed)).seed\(seed).png"
    }

    /// The generation parameters as sorted-key JSON; the scheduler settings are the ones the run
    /// used (the flags over the bundle's `schedulerConfig`).
    public static func parameters(_ options: CommandLineOptions, seed: UInt32,
                                  schedulerConfig: SchedulerConfig = .stableDiffusion, family: ModelFamily = .sd) -> String {
        let effective = options.generationConfig(schedulerConfig: schedulerConfig).effectiveSchedulerConfig
        var values: [String: Any] = [
            "prompt": options.prompt, "negative_prompt": options.negativePrompt, "seed": Int(seed),
            "num_inference_steps": options.stepCount, "guidance_scale": Double(options.guidanceScale),
            "scheduler": options.scheduler.rawValue, "rng": options.rng.rawValue,
            "prediction_type": effective.predictionType.rawValue,
        ]
        if options.imagePath != nil { values["strength"] = options.resolvedStrength(family: family) }
        if let start = options.refinerStart { values["refiner_start"] = start }
        if let spacing = effective.timestepSpacing { values["timestep_spacing"] = spacing.rawValue }
        if effective.useKarrasSigmas { values["use_karras_sigmas"] = true }
        let data = (try? JSONSerialization.data(withJSONObject: values, options: [.sortedKeys])) ?? Data()
        return String(decoding: data, as: UTF8.self)
    }
}
