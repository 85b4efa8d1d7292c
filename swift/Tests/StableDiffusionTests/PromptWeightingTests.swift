import XCTest
@testable import StableDiffusion

/// The Swift prompt weighting against the Python side's (scripts/make_prompt_vectors.py).
final class PromptWeightingTests: XCTestCase {
    static let golden: [String: Any] = {
        let url = Golden.testsFolder.appendingPathComponent("Resources/prompt_weights_golden.json")
        return try! JSONSerialization.jsonObject(with: try! Data(contentsOf: url)) as! [String: Any]
    }()

    var cases: [[String: Any]] { Self.golden["cases"] as! [[String: Any]] }

    func testFragmentsAndWeightsMatchPython() {
        XCTAssertGreaterThan(cases.count, 20)
        for entry in cases {
            let prompt = entry["prompt"] as! String
            let expected = (entry["fragments"] as! [[String]]).map { ($0[0], Double($0[1])!) }
            let parsed = PromptWeighting.parse(prompt)
            XCTAssertEqual(parsed.map(\.text), expected.map(\.0), prompt)
            XCTAssertEqual(parsed.map(\.weight), expected.map(\.1), prompt)  // the same products, bit for bit
        }
    }

    func testWindowsMatchPython() {
        let window = Self.golden["window"] as! Int
        for entry in cases {
            let prompt = entry["prompt"] as! String
            let windows = Golden.tokenizer.windows(prompt, length: window)
            XCTAssertEqual(windows.ids, (entry["ids"] as! [Any]).map { ints($0) }, prompt)
            XCTAssertEqual(windows.weights, (entry["weights"] as! [Any]).map { floats($0) }, prompt)
        }
        XCTAssertGreaterThan(cases.map { ($0["ids"] as! [Any]).count }.max()!, 2)  // long prompts are in the file
    }

    func testWeightsScaleTokensAndKeepTheMean() {
        let hidden = Tensor(shape: [1, 3, 2], scalars: [1, 2, 3, 4, 5, 6])
        XCTAssertEqual(PromptWeighting.apply([1, 1, 1], to: hidden), hidden)
        let out = PromptWeighting.apply([1, 2, 1], to: hidden)
        let factor = Float(21) / Float(1 + 2 + 6 + 8 + 5 + 6)
        XCTAssertEqual(out.scalars, [1, 2, 6, 8, 5, 6].map { $0 * factor })
        XCTAssertEqual(out.scalars.reduce(0, +), 21, accuracy: 1e-4)
    }
}
