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

    /// Textual-inversion tokens (added tokens): the ids Hugging Face's tokenizer gives after diffusers'
    /// load_textual_inversion (scripts/make_added_token_vectors.py), from added_tokens.json's mapping.
    func testAddedTokensMatchHuggingFace() throws {
        let url = Golden.testsFolder.appendingPathComponent("Resources/added_tokens_golden.json")
        let golden = try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as! [String: Any]
        let added = (golden["added_tokens"] as! [String: NSNumber]).mapValues(\.intValue)
        let folder = Golden.repositoryRoot.appendingPathComponent("models/tokenizer")
        let tokenizer = try BPETokenizer(vocab: try BPETokenizer.readVocab(folder.appendingPathComponent("vocab.json")),
                                         merges: try BPETokenizer.readMerges(folder.appendingPathComponent("merges.txt")),
                                         addedTokens: added)
        let length = golden["max_length"] as! Int
        let cases = golden["cases"] as! [[String: Any]]
        XCTAssertGreaterThan(cases.count, 10)
        for entry in cases {
            let prompt = entry["prompt"] as! String
            let unpadded = ints(entry["ids"])
            let expected = unpadded + Array(repeating: 49407, count: length - unpadded.count)
            XCTAssertEqual(tokenizer.encode(prompt, length: length), expected, prompt.debugDescription)
        }
    }

    func testAddedTokensFileIsRead() throws {
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("added-\(UUID().uuidString).json")
        defer { try? FileManager.default.removeItem(at: file) }
        try Data("{\"<cat-toy>\": 49408}".utf8).write(to: file)
        let folder = Golden.repositoryRoot.appendingPathComponent("models/tokenizer")
        let tokenizer = try BPETokenizer(vocabURL: folder.appendingPathComponent("vocab.json"),
                                         mergesURL: folder.appendingPathComponent("merges.txt"), addedTokensURL: file)
        XCTAssertEqual(tokenizer.encode("a <cat-toy>", length: 5), [49406, 320, 49408, 49407, 49407])
        let missing = try BPETokenizer(vocabURL: folder.appendingPathComponent("vocab.json"),
                                       mergesURL: folder.appendingPathComponent("merges.txt"),
                                       addedTokensURL: folder.appendingPathComponent("added_tokens.json"))
        XCTAssertEqual(missing.encode("a <cat-toy>", length: 6), [49406, 320, 283, 2368, 268, 49407])
    }
}
