import Foundation

/// The files of a Resources folder produced by the converter, checked before anything loads.
public struct ResourceFolder {
    public let url: URL
    public let chunkedUnet: Bool
    public let hasEncoder: Bool
    public let hasSafetyChecker: Bool

    public init(path: String, needsEncoder: Bool = false) throws {
        let url = URL(fileURLWithPath: path, isDirectory: true)
        self.url = url
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: url.path, isDirectory: &isDirectory), isDirectory.boolValue else {
            throw UsageError("resource folder \(path) does not exist")
        }
        let exists = { (name: String) in FileManager.default.fileExists(atPath: url.appendingPathComponent(name).path) }
        chunkedUnet = !exists("Unet.mlmodelc") && exists("UnetChunk1.mlmodelc") && exists("UnetChunk2.mlmodelc")
        hasEncoder = exists("VAEEncoder.mlmodelc")
        hasSafetyChecker = exists("SafetyChecker.mlmodelc")
        var missing = ["TextEncoder.mlmodelc", "VAEDecoder.mlmodelc", "vocab.json", "merges.txt"].filter { !exists($0) }
        if !chunkedUnet && !exists("Unet.mlmodelc") { missing.append("Unet.mlmodelc (or UnetChunk1.mlmodelc + UnetChunk2.mlmodelc)") }
        if needsEncoder && !hasEncoder { missing.append("VAEEncoder.mlmodelc (needed by --image)") }
        guard missing.isEmpty else {
            throw UsageError("resource folder \(path) lacks \(missing.joined(separator: ", "))")
        }
    }

    public func file(_ name: String) -> URL { url.appendingPathComponent(name) }

    public func tokenizer() throws -> BPETokenizer {
        try BPETokenizer(vocabURL: file("vocab.json"), mergesURL: file("merges.txt"))
    }
}
