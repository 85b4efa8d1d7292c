import Foundation
import XCTest
@testable import StableDiffusion

final class PNGTests: XCTestCase {
    func testCRC32KnownValues() {
        XCTAssertEqual(CRC32.checksum(Array("123456789".utf8)), 0xCBF4_3926)
        XCTAssertEqual(CRC32.checksum(Array("IEND".utf8)), 0xAE42_6082)
    }

    func testAdler32KnownValue() {
        XCTAssertEqual(Adler32.checksum(Array("Wikipedia".utf8)), 0x11E6_0398)
    }

    func testStructureAndRoundTrip() throws {
        // Wider than one stored block (65535 bytes) so the multi-block path is exercised.
        let image = Self.gradient(width: 200, height: 120)
        let png = PNGWriter.encode(image)
        XCTAssertEqual(Array(png.prefix(8)), PNGWriter.signature)
        let chunks = try Self.chunks(png)
        XCTAssertEqual(chunks.map(\.type), ["IHDR", "IDAT", "IEND"])
        XCTAssertEqual(chunks[0].data, [0, 0, 0, 200, 0, 0, 0, 120, 8, 2, 0, 0, 0])
        let raw = try Self.inflateStored(chunks[1].data)
        XCTAssertEqual(raw, PNGWriter.scanlines(image))
        XCTAssertEqual(Self.unfilter(raw, width: 200, height: 120), image.bytes)
    }

    /// The committed file is what tests/test_golden_vectors.py decodes with Pillow, so a real PNG
    /// decoder checks this writer too.
    func testMatchesCommittedFixture() throws {
        let url = Golden.testsFolder.appendingPathComponent("Resources/gradient_33x17.png")
        let encoded = PNGWriter.encode(Self.gradient(width: 33, height: 17))
        guard FileManager.default.fileExists(atPath: url.path) else {
            try Data(encoded).write(to: url)
            return XCTFail("wrote the missing fixture \(url.path); commit it")
        }
        XCTAssertEqual(Array(try Data(contentsOf: url)), encoded)
    }

    func testWritesFile() throws {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("sd-png-test-\(UUID()).png")
        defer { try? FileManager.default.removeItem(at: url) }
        try PNGWriter.write(Self.gradient(width: 3, height: 2), to: url)
        let data = try Data(contentsOf: url)
        XCTAssertEqual(Array(data.prefix(8)), PNGWriter.signature)
        XCTAssertEqual(Array(data.suffix(8)), [0x49, 0x45, 0x4E, 0x44, 0xAE, 0x42, 0x60, 0x82])
    }

    func testTextChunksLatin1AndUnicode() throws {
        let png = PNGWriter.encode(Self.gradient(width: 2, height: 2),
                                   text: [(key: "parameters", value: "{\"seed\":1}"), (key: "prompt", value: "猫 café")])
        let chunks = try Self.chunks(png)
        XCTAssertEqual(chunks.map(\.type), ["IHDR", "tEXt", "iTXt", "IDAT", "IEND"])
        XCTAssertEqual(chunks[1].data, Array("parameters".utf8) + [0] + Array("{\"seed\":1}".utf8))
        XCTAssertEqual(chunks[2].data, Array("prompt".utf8) + [0, 0, 0, 0, 0] + Array("猫 café".utf8))
    }

    func testOutputNamesFollowThePythonCLI() {
        XCTAssertEqual(OutputNaming.fileName(prompt: "A Photo of an Astronaut, riding!", seed: 93),
                       "a_photo_of_an_astronaut_riding.seed93.png")
        XCTAssertEqual(OutputNaming.fileName(prompt: "日本", seed: 1), "image.seed1.png")
        XCTAssertEqual(OutputNaming.fileName(prompt: String(repeating: "ab ", count: 50), seed: 2).count,
                       80 + ".seed2.png".count)
    }

    func testDecoderOutputToBytes() {
        let image = Tensor(shape: [1, 3, 1, 2], scalars: [-1, 1, 0, 2, -3, 0.5])
        XCTAssertEqual(RGBImage(decoderOutput: image).bytes, [0, 128, 0, 255, 255, 191])
    }

    static func gradient(width: Int, height: Int) -> RGBImage {
        var bytes: [UInt8] = []
        for y in 0..<height {
            for x in 0..<width { bytes += [UInt8(x % 256), UInt8(y % 256), UInt8((x * y) % 256)] }
        }
        return RGBImage(width: width, height: height, bytes: bytes)
    }

    struct Chunk { let type: String; let data: [UInt8] }

    /// Parses chunks and checks each CRC, as a PNG decoder would.
    static func chunks(_ png: [UInt8]) throws -> [Chunk] {
        var chunks: [Chunk] = []
        var offset = 8
        while offset < png.count {
            let length = Int(bigEndian(png, offset))
            let typeAndData = Array(png[(offset + 4)..<(offset + 8 + length)])
            XCTAssertEqual(CRC32.checksum(typeAndData), bigEndian(png, offset + 8 + length))
            chunks.append(Chunk(type: String(decoding: typeAndData.prefix(4), as: UTF8.self), data: Array(typeAndData.dropFirst(4))))
            offset += 12 + length
        }
        return chunks
    }

    static func bigEndian(_ bytes: [UInt8], _ offset: Int) -> UInt32 {
        bytes[offset..<(offset + 4)].reduce(0) { $0 << 8 | UInt32($1) }
    }

    /// Reads a zlib stream of stored blocks back, checking lengths and the Adler-32 trailer.
    static func inflateStored(_ stream: [UInt8]) throws -> [UInt8] {
        XCTAssertEqual((Int(stream[0]) << 8 | Int(stream[1])) % 31, 0)
        var out: [UInt8] = []
        var offset = 2
        var final = false
        while !final {
            final = stream[offset] & 1 == 1
            XCTAssertEqual(stream[offset] >> 1, 0, "only stored blocks expected")
            let length = Int(stream[offset + 1]) | Int(stream[offset + 2]) << 8
            let complement = Int(stream[offset + 3]) | Int(stream[offset + 4]) << 8
            XCTAssertEqual(length ^ 0xFFFF, complement)
            out += stream[(offset + 5)..<(offset + 5 + length)]
            offset += 5 + length
        }
        XCTAssertEqual(bigEndian(stream, offset), Adler32.checksum(out))
        XCTAssertEqual(offset + 4, stream.count)
        return out
    }

    static func unfilter(_ raw: [UInt8], width: Int, height: Int) -> [UInt8] {
        (0..<height).flatMap { row -> [UInt8] in
            let start = row * (width * 3 + 1)
            XCTAssertEqual(raw[start], 0)
            return Array(raw[(start + 1)...(start + width * 3)])
        }
    }

    func testHeaderSize() {
        let png = PNGWriter.encode(RGBImage(width: 5, height: 3, bytes: Array(repeating: 0, count: 45)))
        XCTAssertEqual(PNGHeader.size(png).map { [$0.width, $0.height] }, [5, 3])
        XCTAssertNil(PNGHeader.size(Array("GIF89a and more bytes here".utf8)))
        XCTAssertNoThrow(try PipelineSettings.checkConditionAspect(path: "a.png", width: 1025, height: 1024, imageWidth: 512,
                                                                   imageHeight: 512))
        XCTAssertThrowsError(try PipelineSettings.checkConditionAspect(path: "a.png", width: 1040, height: 1024, imageWidth: 512,
                                                                       imageHeight: 512))
    }
}
