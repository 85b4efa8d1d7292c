import Foundation
import StableDiffusion
#if canImport(CoreML)
import CoreML
#endif

enum CLIRunner {
    struct Unavailable: Error, CustomStringConvertible {
        let description: String
    }

    #if canImport(CoreML)
    static func run(_ options: CommandLineOptions, resources: ResourceFolder, tokenizer: BPETokenizer) throws {
        let pipeline = try CoreMLPipeline(resources: resources, tokenizer: tokenizer,
                                          computeUnits: options.computeUnits.coreML, reduceMemory: options.reduceMemory)
        var config = options.generationConfig()
        config.latentShape = try pipeline.latentShape()
        if let path = options.imagePath { config.startImage = try ImageFile.read(path: path, shape: config.latentShape) }
        let images = try pipeline.pipeline.generate(config) { step, total in
            print("step \(step)/\(total)")
            return true
        }
        try save(images, options: options)
    }

    static func save(_ images: [GeneratedImage], options: CommandLineOptions) throws {
        let folder = URL(fileURLWithPath: options.outputPath, isDirectory: true)
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        for (index, image) in images.enumerated() {
            let seed = options.seed &+ UInt32(index)
            if image.isUnsafe {
                print("the safety checker flagged seed \(seed); the image was replaced by a black one")
            }
            let url = folder.appendingPathComponent(fileName(options.prompt, seed: seed))
            try PNGWriter.write(RGBImage(decoderOutput: image.image), to: url)
            print("wrote \(url.path)")
        }
    }

    static func fileName(_ prompt: String, seed: UInt32) -> String {
        let safe = prompt.prefix(60).map { $0.isLetter || $0.isNumber ? String($0) : "_" }.joined()
        return "\(safe).\(seed).png"
    }
    #else
    static func run(_ options: CommandLineOptions, resources: ResourceFolder, tokenizer: BPETokenizer) throws {
        throw Unavailable(description: "arguments and \(resources.url.path) are valid, but generating images needs Core ML, "
            + "which exists only on macOS 13+ / iOS 16+ (this build has no CoreML module)")
    }
    #endif
}
