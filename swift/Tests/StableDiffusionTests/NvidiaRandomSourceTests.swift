import Foundation
import XCTest
@testable import StableDiffusion

/// NvidiaRandomSource against torch.randn on an NVIDIA H200 (torch 2.11, CUDA 13), from
/// Resources/nvidia_random.json (written on a lent H200 by the code of
/// scripts/make_nvidia_random_vectors.py; no GPU, no regeneration). Seeds up to 2^40 + 7, 1 to 65536
/// elements, and draws that continue one generator.
///
/// Tolerance: cuRAND's Box-Muller runs on the GPU's approximate logf and sincosf, whose results
/// differ from Foundation's (nearly correctly rounded) ones by a few float32 ulps; the radius
/// sqrt(-2 log u) is at most about 6.7, so a value may be off by up to about 2^-21 * 6.7 = 3.2e-6.
/// The bound is 32 ulps of max(1, |x|) (3.8e-6 for |x| <= 1); measured: see the printed worst.
final class NvidiaRandomSourceTests: XCTestCase {
    static let ulps: Float = 32

    static let root: [String: Any] = {
        let url = Golden.testsFolder.appendingPathComponent("Resources/nvidia_random.json")
        return try! JSONSerialization.jsonObject(with: Data(contentsOf: url)) as! [String: Any]
    }()

    private func error(_ actual: Float, _ expected: Float) -> Float {
        abs(actual - expected) / max(1, abs(expected)) / Float.ulpOfOne
    }

    func testMatchesTorchRandnOnTheGPU() {
        let cases = Self.root["cases"] as! [[String: Any]]
        XCTAssertGreaterThanOrEqual(cases.count, 60)
        var worst: Float = 0, exact = 0, total = 0
        for entry in cases {
            let seed = (entry["seed"] as! NSNumber).uint64Value, count = entry["count"] as! Int
            var source = NvidiaRandomSource(seed: seed)
            let values = source.normalArray(count: count)
            let indices = entry["indices"].map(ints) ?? Array(0..<count)
            let expected = floats(entry["values"] ?? entry["sampled"])
            for (index, value) in Swift.zip(indices, expected) {
                let e = error(values[index], value)
                worst = max(worst, e)
                exact += e == 0 ? 1 : 0
                total += 1
                XCTAssertLessThanOrEqual(e, Self.ulps, "seed \(seed) count \(count) index \(index)")
            }
        }
        print("NvidiaRandomSource: worst \(worst) ulps of max(1, |x|) over \(total) values, \(exact) bit-identical")
    }

    func testSuccessiveDrawsContinueTheGeneratorsStream() {
        for entry in Self.root["streams"] as! [[String: Any]] {
            var source = NvidiaRandomSource(seed: (entry["seed"] as! NSNumber).uint64Value)
            for (count, expected) in Swift.zip(ints(entry["counts"]), (entry["values"] as! [Any]).map(floats)) {
                let values = source.normalArray(count: count)
                for (a, b) in Swift.zip(values, expected) { XCTAssertLessThanOrEqual(error(a, b), Self.ulps) }
            }
        }
    }

    func testPhiloxKnownAnswer() {
        // Random123's known-answer test for philox4x32-10: counter 0, key 0.
        XCTAssertEqual(NvidiaRandomSource.philox(counter: (0, 0), seed: 0), [0x6627_E8D5, 0xE169_C58D, 0xBC57_AC4C, 0x9B00_DBD8])
    }

    func testDrawsPastOnePassFollowTheH200sLayout() {
        // 300000 to 2500001 elements: past 132 SMs x 2048 threads, then past four values a thread
        // (several passes), and a draw after such a big one (offset moved by 8).
        for entry in Self.root["large"] as! [[String: Any]] {
            var source = NvidiaRandomSource(seed: (entry["seed"] as! NSNumber).uint64Value, multiprocessorCount: 132)
            let values = source.normalArray(count: entry["count"] as! Int)
            for (index, expected) in Swift.zip(ints(entry["indices"]), floats(entry["sampled"])) {
                XCTAssertLessThanOrEqual(error(values[index], expected), Self.ulps, "count \(entry["count"]!) index \(index)")
            }
        }
        let after = Self.root["after_large"] as! [String: Any]
        var source = NvidiaRandomSource(seed: 3)
        _ = source.normalArray(count: after["first"] as! Int)
        XCTAssertEqual(source.offset, 8)
        for (a, b) in Swift.zip(source.normalArray(count: after["count"] as! Int), floats(after["values"])) {
            XCTAssertLessThanOrEqual(error(a, b), Self.ulps)
        }
    }

    func testLargeDrawsUseTheMultiprocessorLayout() {
        // Past SMs x 8 x 256 elements each thread makes several passes: every element is still written.
        var source = NvidiaRandomSource(seed: 3, multiprocessorCount: 1)
        let values = source.normalArray(count: 3 * 2048 * 4 + 5)
        XCTAssertFalse(values.contains(0))
        XCTAssertEqual(source.offset, 16)
    }
}
