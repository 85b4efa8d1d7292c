import Foundation

/// The text side of CLIP tokenization, scalar by scalar, because the reference regexes work on
/// Unicode scalars rather than Swift's grapheme clusters.
enum CLIPPreTokenizer {
    /// NFC, every whitespace run to a single space, then lower case.
    static func normalize(_ text: String) -> [Unicode.Scalar] {
        var collapsed = String.UnicodeScalarView()
        var inSpace = false
        for scalar in text.precomposedStringWithCanonicalMapping.unicodeScalars {
            if isSpace(scalar) {
                if !inSpace { collapsed.append(" ") }
                inSpace = true
            } else {
                collapsed.append(scalar)
                inSpace = false
            }
        }
        return Array(lowercase(String(collapsed)).unicodeScalars)
    }

    /// Per-scalar full lower-case mapping without context, as the tokenizers `Lowercase` normaliser
    /// does (so a word-final capital sigma becomes σ, not ς).
    static func lowercase(_ text: String) -> String {
        var out = String.UnicodeScalarView()
        for scalar in text.unicodeScalars { out.append(contentsOf: scalar.properties.lowercaseMapping.unicodeScalars) }
        return String(out)
    }

    /// CLIP's pattern: `'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`, whitespace dropped.
    static func split(_ scalars: [Unicode.Scalar]) -> [[Unicode.Scalar]] {
        var pieces: [[Unicode.Scalar]] = []
        var i = 0
        while i < scalars.count {
            let end = matchEnd(scalars, from: i)
            if end > i { pieces.append(Array(scalars[i..<end])) }
            i = max(end, i + 1)
        }
        return pieces
    }

    private static func matchEnd(_ s: [Unicode.Scalar], from i: Int) -> Int {
        if isSpace(s[i]) { return i }
        if let end = contractionEnd(s, from: i) { return end }
        if isLetter(s[i]) { return runEnd(s, from: i, while: isLetter) }
        if isNumber(s[i]) { return i + 1 }
        return runEnd(s, from: i) { !isSpace($0) && !isLetter($0) && !isNumber($0) }
    }

    private static let contractions: [[Unicode.Scalar]] = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"].map {
        Array($0.unicodeScalars)
    }

    private static func contractionEnd(_ s: [Unicode.Scalar], from i: Int) -> Int? {
        for c in contractions where i + c.count <= s.count && Array(s[i..<(i + c.count)]) == c {
            return i + c.count
        }
        return nil
    }

    private static func runEnd(_ s: [Unicode.Scalar], from i: Int, while test: (Unicode.Scalar) -> Bool) -> Int {
        var end = i
        while end < s.count && test(s[end]) { end += 1 }
        return end
    }

    static func isSpace(_ scalar: Unicode.Scalar) -> Bool { scalar.properties.isWhitespace }

    static func isLetter(_ scalar: Unicode.Scalar) -> Bool {
        switch scalar.properties.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: return true
        default: return false
        }
    }

    static func isNumber(_ scalar: Unicode.Scalar) -> Bool {
        switch scalar.properties.generalCategory {
        case .decimalNumber, .letterNumber, .otherNumber: return true
        default: return false
        }
    }
}

/// GPT-2/CLIP's reversible map from bytes to printable characters, so BPE symbols are strings.
enum ByteEncoder {
    static let table: [String] = {
        let printable = Array(33...126) + Array(161...172) + Array(174...255)
        var codes = [Int](repeating: 0, count: 256)
        for byte in printable { codes[byte] = byte }
        var extra = 0
        for byte in 0..<256 where !printable.contains(byte) {
            codes[byte] = 256 + extra
            extra += 1
        }
        return codes.map { String(Unicode.Scalar(UInt32($0))!) }
    }()

    static func encode(_ piece: [Unicode.Scalar]) -> [String] {
        var view = String.UnicodeScalarView()
        view.append(contentsOf: piece)
        return String(view).utf8.map { table[Int($0)] }
    }
}
