import Foundation

/// CRC-32 (ISO 3309, the one PNG and zlib use), table driven.
public enum CRC32 {
    static let table: [UInt32] = (0..<256).map { n in
        var c = UInt32(n)
        for _ in 0..<8 { c = c & 1 != 0 ? 0xEDB8_8320 ^ (c >> 1) : c >> 1 }
        return c
    }

    public static func checksum<S: Sequence>(_ bytes: S, initial: UInt32 = 0) -> UInt32 where S.Element == UInt8 {
        var crc = ~initial
        for byte in bytes { crc = table[Int((crc ^ UInt32(byte)) & 0xFF)] ^ (crc >> 8) }
        return ~crc
    }
}

enum Adler32 {
    static func checksum(_ bytes: [UInt8]) -> UInt32 {
        var a: UInt32 = 1, b: UInt32 = 0
        // 5552 is the longest run before the sums can overflow 32 bits (zlib's NMAX).
        var index = 0
        while index < bytes.count {
            let end = min(index + 5552, bytes.count)
            for byte in bytes[index..<end] {
                a += UInt32(byte)
                b += a
            }
            a %= 65521
            b %= 65521
            index = end
        }
        return (b << 16) | a
    }
}

/// A zlib stream of stored (uncompressed) deflate blocks: no compressor needed, any decoder reads it.
enum ZlibStored {
    static let maxBlock = 65535

    static func wrap(_ data: [UInt8]) -> [UInt8] {
        var out: [UInt8] = [0x78, 0x01]  // deflate, 32K window, no preset dictionary, check bits valid
        var offset = 0
        repeat {
            let length = min(maxBlock, data.count - offset)
            let isFinal = offset + length == data.count
            out.append(isFinal ? 1 : 0)
            out += littleEndian16(UInt16(length)) + littleEndian16(~UInt16(length))
            out += data[offset..<(offset + length)]
            offset += length
        } while offset < data.count
        return out + bigEndian32(Adler32.checksum(data))
    }
}

func littleEndian16(_ value: UInt16) -> [UInt8] { [UInt8(value & 0xFF), UInt8(value >> 8)] }

func bigEndian32(_ value: UInt32) -> [UInt8] { (0..<4).map { UInt8((value >> (24 - 8 * $0)) & 0xFF) } }

/// Writes 8-bit RGB PNGs with only the standard library and Foundation, so it works on Linux too.
public enum PNGWriter {
    public static let signature: [UInt8] = [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]

    /// `text` becomes tEXt chunks (iTXt where a value is not Latin-1), as Pillow writes them, so the
    /// generation parameters travel with the image like the Python CLI's PNGs.
    public static func encode(_ image: RGBImage, text: [(key: String, value: String)] = []) -> [UInt8] {
        var header = bigEndian32(UInt32(image.width)) + bigEndian32(UInt32(image.height))
        header += [8, 2, 0, 0, 0]  // 8 bits, truecolour, deflate, adaptive filtering, no interlace
        let textChunks = text.flatMap { textChunk(key: $0.key, value: $0.value) }
        return signature + chunk("IHDR", header) + textChunks + chunk("IDAT", ZlibStored.wrap(scanlines(image)))
            + chunk("IEND", [])
    }

    public static func write(_ image: RGBImage, to url: URL, text: [(key: String, value: String)] = []) throws {
        try Data(encode(image, text: text)).write(to: url)
    }

    static func textChunk(key: String, value: String) -> [UInt8] {
        let keyword = latin1(key) ?? Array(key.utf8.filter { $0 < 0x80 })
        if let bytes = latin1(value) { return chunk("tEXt", keyword + [0] + bytes) }
        // keyword, NUL, no compression (0, 0), empty language tag and translated keyword, UTF-8 text
        return chunk("iTXt", keyword + [0, 0, 0, 0, 0] + Array(value.utf8))
    }

    static func latin1(_ text: String) -> [UInt8]? {
        let scalars = text.unicodeScalars
        guard scalars.allSatisfy({ $0.value < 256 }) else { return nil }
        return scalars.map { UInt8($0.value) }
    }

    /// Each row prefixed by filter type 0 (none).
    static func scanlines(_ image: RGBImage) -> [UInt8] {
        let stride = image.width * 3
        var out: [UInt8] = []
        out.reserveCapacity((stride + 1) * image.height)
        for row in 0..<image.height {
            out.append(0)
            out += image.bytes[(row * stride)..<((row + 1) * stride)]
        }
        return out
    }

    static func chunk(_ type: String, _ data: [UInt8]) -> [UInt8] {
        let typeBytes = Array(type.utf8)
        return bigEndian32(UInt32(data.count)) + typeBytes + data + bigEndian32(CRC32.checksum(typeBytes + data))
    }
}

/// Reading a PNG's size from its header, without decoding it (the CLI checks condition images before Core ML).
public enum PNGHeader {
    static let signature: [UInt8] = [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]

    /// (width, height) of PNG bytes: the IHDR chunk right after the signature; nil for anything else.
    public static func size(_ bytes: [UInt8]) -> (width: Int, height: Int)? {
        guard bytes.count >= 24, Array(bytes[0..<8]) == signature, Array(bytes[12..<16]) == Array("IHDR".utf8) else { return nil }
        let number = { (at: Int) in bytes[at..<(at + 4)].reduce(0) { $0 << 8 | Int($1) } }
        return (number(16), number(20))
    }

    /// The size of the PNG file at `path`; nil when it is not one (or unreadable).
    public static func size(path: String) -> (width: Int, height: Int)? {
        guard let handle = FileHandle(forReadingAtPath: path) else { return nil }
        defer { try? handle.close() }
        return size([UInt8](handle.readData(ofLength: 24)))
    }
}
