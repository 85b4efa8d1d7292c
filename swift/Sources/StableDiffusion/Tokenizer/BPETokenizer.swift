import Foundation

/// CLIP's byte-level BPE tokenizer, matching Hugging Face's `CLIPTokenizer` (tokenizers backend)
/// on `vocab.json` + `merges.txt`: NFC, whitespace runs to one space, lower-casing, CLIP's split
/// pattern, byte-to-unicode mapping, `</w>` word ends, start/end tokens, end-token padding.
public struct BPETokenizer: Sendable {
    public static let startText = "<|startoftext|>"
    public static let endText = "<|endoftext|>"

    let vocab: [String: Int]
    let ranks: [MergePair: Int]
    public let startId: Int
    public let endId: Int
    /// SD 1.x pads with the end token (SDXL's second tokenizer with "!": `padding(with:)`).
    public private(set) var padId: Int
    /// Tokens beyond the BPE vocabulary (textual-inversion embeddings), normalized, longest first:
    /// matched as Hugging Face's `normalized` added tokens are, anywhere in the normalized text.
    let addedTokens: [(scalars: [Unicode.Scalar], id: Int)]

    public init(vocab: [String: Int], merges: [(String, String)], addedTokens: [String: Int] = [:]) throws {
        guard let start = vocab[Self.startText], let end = vocab[Self.endText] else {
            throw TokenizerError.missingSpecialTokens
        }
        self.vocab = vocab
        var ranks = [MergePair: Int](minimumCapacity: merges.count)
        for (rank, pair) in merges.enumerated() where ranks[MergePair(pair.0, pair.1)] == nil {
            ranks[MergePair(pair.0, pair.1)] = rank
        }
        self.ranks = ranks
        startId = start
        endId = end
        padId = end
        self.addedTokens = addedTokens.map { (CLIPPreTokenizer.normalize($0.key), $0.value) }
            .filter { !$0.0.isEmpty }
            .sorted { $0.0.count != $1.0.count ? $0.0.count > $1.0.count : $0.1 < $1.1 }
    }

    /// `addedTokensURL`: an `added_tokens.json` (token -> id), read when the file exists.
    public init(vocabURL: URL, mergesURL: URL, addedTokensURL: URL? = nil) throws {
        var added: [String: Int] = [:]
        if let url = addedTokensURL, FileManager.default.fileExists(atPath: url.path) {
            added = try Self.readVocab(url)
        }
        try self.init(vocab: try Self.readVocab(vocabURL), merges: try Self.readMerges(mergesURL), addedTokens: added)
    }

    /// The same tokenizer padding with `token` (SDXL's second tokenizer shares the first's vocab.json and
    /// merges.txt but pads with "!", as the bundle's tokenizer_2_pad_token says).
    public func padding(with token: String) throws -> BPETokenizer {
        guard let id = vocab[token] else { throw TokenizerError.missingPadToken(token) }
        var copy = self
        copy.padId = id
        return copy
    }

    /// Ids for `text`: start token, up to `length - 2` text tokens, end token, end-token padding.
    public func encode(_ text: String, length: Int = 77) -> [Int] {
        let body = tokenize(text).prefix(max(length - 2, 0))
        let ids = [startId] + body + [endId]
        return ids + Array(repeating: padId, count: max(length - ids.count, 0))
    }

    /// Text token ids without start/end tokens or padding. Literal special-token strings in the
    /// text become their ids, as Hugging Face's added-token matching does before normalising.
    public func tokenize(_ text: String) -> [Int] {
        var ids: [Int] = []
        var rest = Substring(text)
        while let (range, id) = firstSpecial(in: rest) {
            ids += tokenizeOrdinary(String(rest[..<range.lowerBound]))
            ids.append(id)
            rest = rest[range.upperBound...]
        }
        return ids + tokenizeOrdinary(String(rest))
    }

    private func firstSpecial(in text: Substring) -> (Range<Substring.Index>, Int)? {
        let hits = [(Self.startText, startId), (Self.endText, endId)].compactMap { special, id in
            text.range(of: special).map { ($0, id) }
        }
        return hits.min { $0.0.lowerBound < $1.0.lowerBound }
    }

    private func tokenizeOrdinary(_ text: String) -> [Int] {
        let scalars = CLIPPreTokenizer.normalize(text)
        guard !addedTokens.isEmpty else { return encodeWords(scalars[...]) }
        var ids: [Int] = []
        var start = 0
        var i = 0
        while i < scalars.count {  // leftmost, then longest, added token
            if let hit = addedTokens.first(where: { i + $0.scalars.count <= scalars.count
                                                    && scalars[i..<(i + $0.scalars.count)].elementsEqual($0.scalars) }) {
                ids += encodeWords(scalars[start..<i])
                ids.append(hit.id)
                i += hit.scalars.count
                start = i
            } else {
                i += 1
            }
        }
        return ids + encodeWords(scalars[start...])
    }

    private func encodeWords(_ scalars: ArraySlice<Unicode.Scalar>) -> [Int] {
        CLIPPreTokenizer.split(Array(scalars)).flatMap { piece in bpe(ByteEncoder.encode(piece)).map { vocab[$0] ?? endId } }
    }

    /// Merges the lowest-ranked adjacent pair everywhere it occurs until no ranked pair is left.
    func bpe(_ word: [String]) -> [String] {
        guard var symbols = Optional(word), !symbols.isEmpty else { return [] }
        symbols[symbols.count - 1] += "</w>"
        while symbols.count > 1, let best = lowestRankedPair(symbols) {
            symbols = merging(best, in: symbols)
        }
        return symbols
    }

    private func lowestRankedPair(_ symbols: [String]) -> MergePair? {
        var best: (pair: MergePair, rank: Int)?
        for i in 0..<(symbols.count - 1) {
            let pair = MergePair(symbols[i], symbols[i + 1])
            if let rank = ranks[pair], rank < best?.rank ?? Int.max { best = (pair, rank) }
        }
        return best?.pair
    }

    private func merging(_ pair: MergePair, in symbols: [String]) -> [String] {
        var merged: [String] = []
        var i = 0
        while i < symbols.count {
            if i + 1 < symbols.count, symbols[i] == pair.first, symbols[i + 1] == pair.second {
                merged.append(pair.first + pair.second)
                i += 2
            } else {
                merged.append(symbols[i])
                i += 1
            }
        }
        return merged
    }

    static func readVocab(_ url: URL) throws -> [String: Int] {
        let data = try Data(contentsOf: url)
        guard let vocab = try JSONSerialization.jsonObject(with: data) as? [String: Int] else {
            throw TokenizerError.badVocab(url.path)
        }
        return vocab
    }

    static func readMerges(_ url: URL) throws -> [(String, String)] {
        let text = try String(contentsOf: url, encoding: .utf8)
        return try text.split(separator: "\n", omittingEmptySubsequences: true).compactMap { line in
            if line.hasPrefix("#version") { return nil }
            let parts = line.split(separator: " ")
            guard parts.count == 2 else { throw TokenizerError.badMerges(url.path) }
            return (String(parts[0]), String(parts[1]))
        }
    }
}

struct MergePair: Hashable, Sendable {
    let first: String
    let second: String
    init(_ first: String, _ second: String) {
        self.first = first
        self.second = second
    }
}

public enum TokenizerError: Error, CustomStringConvertible {
    case missingSpecialTokens
    case badVocab(String)
    case badMerges(String)
    case missingPadToken(String)

    public var description: String {
        switch self {
        case .missingSpecialTokens: return "vocab.json lacks <|startoftext|> or <|endoftext|>"
        case .badVocab(let path): return "\(path) is not a JSON object of token -> id"
        case .badMerges(let path): return "\(path) has a line that is not two space-separated symbols"
        case .missingPadToken(let token): return "vocab.json lacks the pad token \(token.debugDescription)"
        }
    }
}
