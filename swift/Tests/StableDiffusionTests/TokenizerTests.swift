import XCTest
@testable import StableDiffusion

final class TokenizerTests: XCTestCase {
    func testMatchesHuggingFaceOnEveryGoldenPrompt() {
        let section = Golden.section("tokenizer")
        let cases = section["cases"] as! [[String: Any]]
        let length = section["max_length"] as! Int
        XCTAssertGreaterThan(cases.count, 200)
        var mismatches: [String] = []
        for entry in cases {
            let prompt = Self.prompt(entry)
            let unpadded = ints(entry["ids"])
            let expected = unpadded + Array(repeating: 49407, count: length - unpadded.count)
            let actual = Golden.tokenizer.encode(prompt, length: length)
            if actual != expected { mismatches.append("\(prompt.debugDescription): \(actual.prefix(12)) vs \(expected.prefix(12))") }
        }
        XCTAssertEqual(mismatches.count, 0, mismatches.prefix(5).joined(separator: "\n"))
    }

    /// The prompt from its code points where the file has them (JSON parsing may drop a BOM).
    static func prompt(_ entry: [String: Any]) -> String {
        guard let codepoints = entry["codepoints"] else { return entry["prompt"] as! String }
        var view = String.UnicodeScalarView()
        view.append(contentsOf: ints(codepoints).map { Unicode.Scalar(UInt32($0))! })
        return String(view)
    }

    func testShapeOfEncoding() {
        let ids = Golden.tokenizer.encode("a photo of an astronaut riding a horse on mars")
        XCTAssertEqual(ids.count, 77)
        XCTAssertEqual(ids.first, 49406)
        XCTAssertEqual(Array(ids[1..<11]), [320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496])
        XCTAssertEqual(ids[11], 49407)
        XCTAssertEqual(Set(ids[11...]), [49407])
    }

    func testTruncationKeepsEndToken() {
        let ids = Golden.tokenizer.encode(String(repeating: "cat ", count: 200))
        XCTAssertEqual(ids.count, 77)
        XCTAssertEqual(ids.last, 49407)
        XCTAssertEqual(Set(ids[1..<76]), [2368])
    }

    func testEmptyPromptIsStartThenEnds() {
        XCTAssertEqual(Golden.tokenizer.encode("", length: 5), [49406, 49407, 49407, 49407, 49407])
    }
}
