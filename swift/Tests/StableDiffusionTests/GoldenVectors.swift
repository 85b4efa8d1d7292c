import Foundation
import XCTest
@testable import StableDiffusion

/// The JSON written by scripts/make_golden_vectors.py from the Python side, read by file path.
enum Golden {
    static let testsFolder = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    static let repositoryRoot = testsFolder.deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static let root: [String: Any] = {
        let url = testsFolder.appendingPathComponent("Resources/golden.json")
        let data = try! Data(contentsOf: url)
        return try! JSONSerialization.jsonObject(with: data) as! [String: Any]
    }()

    static func section(_ name: String) -> [String: Any] { root[name] as! [String: Any] }

    static let tokenizer: BPETokenizer = {
        let folder = repositoryRoot.appendingPathComponent("models/tokenizer")
        return try! BPETokenizer(vocabURL: folder.appendingPathComponent("vocab.json"),
                                 mergesURL: folder.appendingPathComponent("merges.txt"))
    }()
}

func floats(_ value: Any?) -> [Float] { (value as! [NSNumber]).map { Float($0.doubleValue) } }

func ints(_ value: Any?) -> [Int] { (value as! [NSNumber]).map(\.intValue) }

/// Largest |a - b| over the largest |b|: one relative error for a whole tensor, so elements near
/// zero do not dominate.
func relativeError(_ actual: [Float], _ expected: [Float]) -> Float {
    precondition(actual.count == expected.count, "\(actual.count) vs \(expected.count) values")
    let scale = max(expected.map(abs).max() ?? 0, Float.leastNormalMagnitude)
    return Swift.zip(actual, expected).map { abs($0 - $1) }.max().map { $0 / scale } ?? 0
}

func littleEndianBytes(_ values: [Float]) -> [UInt8] {
    values.flatMap { value -> [UInt8] in
        let bits = value.bitPattern
        return (0..<4).map { UInt8((bits >> (8 * $0)) & 0xFF) }
    }
}
