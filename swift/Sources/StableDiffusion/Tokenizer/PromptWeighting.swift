import Foundation

/// Prompt weighting as A1111's web UI reads it, the same rules as python_coreml_sd/generation/prompts.py
/// (golden vectors check both): `(words)` 1.1x, `[words]` 1/1.1x, `(words:1.3)` 1.3x, nesting multiplies,
/// `\(` `\)` `\[` `\]` `\\` are literal, a bracket left open weighs the rest of the prompt.
public enum PromptWeighting {
    public static let roundFactor = 1.1
    public static let squareFactor = 1 / 1.1

    /// (fragment, weight) in prompt order; neighbours of equal weight merged; never empty.
    public static func parse(_ text: String) -> [(text: String, weight: Double)] {
        var pieces: [(text: String, weight: Double)] = []
        var opened: [(bracket: Unicode.Scalar, start: Int)] = []
        let scalars = Array(text.unicodeScalars)
        var i = 0
        func scale(from start: Int, by factor: Double) {
            for k in start..<pieces.count { pieces[k].weight *= factor }
        }
        while i < scalars.count {
            let c = scalars[i]
            if c == "\\", i + 1 < scalars.count, "()[]\\".unicodeScalars.contains(scalars[i + 1]) {
                pieces.append((String(scalars[i + 1]), 1)); i += 2
            } else if c == "(" || c == "[" {
                opened.append((c, pieces.count)); i += 1
            } else if c == ":", let (number, end) = weightClose(scalars, from: i) {
                if opened.last?.bracket == "(" {
                    scale(from: opened.removeLast().start, by: number)
                } else {
                    pieces.append((string(scalars[i..<end]), 1))
                }
                i = end
            } else if c == ")" || c == "]" {
                if let top = opened.last, top.bracket == (c == ")" ? "(" : "[") {
                    scale(from: opened.removeLast().start, by: c == ")" ? roundFactor : squareFactor)
                } else {
                    pieces.append((String(c), 1))
                }
                i += 1
            } else if c == ":" || c == "\\" {
                pieces.append((String(c), 1)); i += 1
            } else {
                var end = i
                while end < scalars.count, !"\\()[]:".unicodeScalars.contains(scalars[end]) { end += 1 }
                pieces.append((string(scalars[i..<end]), 1)); i = end
            }
        }
        for (bracket, start) in opened.reversed() {  // unclosed brackets weigh the rest of the prompt
            scale(from: start, by: bracket == "(" ? roundFactor : squareFactor)
        }
        var merged: [(text: String, weight: Double)] = []
        for piece in pieces {
            if let last = merged.last, last.weight == piece.weight {
                merged[merged.count - 1].text += piece.text
            } else if !piece.text.isEmpty {
                merged.append(piece)
            }
        }
        return merged.isEmpty ? [("", 1)] : merged
    }

    /// `:` spaces, a number (sign, digits, one dot), spaces, `)`: the weight and where the match ends.
    static func weightClose(_ s: [Unicode.Scalar], from colon: Int) -> (Double, Int)? {
        var i = colon + 1
        func skipSpaces() { while i < s.count, " \t\n\r\u{0B}\u{0C}".unicodeScalars.contains(s[i]) { i += 1 } }
        func digits() -> String {
            let start = i
            while i < s.count, ("0"..."9").contains(s[i]) { i += 1 }
            return string(s[start..<i])
        }
        skipSpaces()
        var sign = ""
        if i < s.count, s[i] == "+" || s[i] == "-" { sign = String(s[i]); i += 1 }
        let whole = digits()
        var fraction = ""
        if i < s.count, s[i] == "." { i += 1; fraction = digits() }
        guard !whole.isEmpty || !fraction.isEmpty,
              let number = Double(sign + (whole.isEmpty ? "0" : whole) + "." + (fraction.isEmpty ? "0" : fraction))
        else { return nil }
        skipSpaces()
        guard i < s.count, s[i] == ")" else { return nil }
        return (number, i + 1)
    }

    private static func string(_ scalars: ArraySlice<Unicode.Scalar>) -> String {
        var view = String.UnicodeScalarView()
        view.append(contentsOf: scalars)
        return String(view)
    }

    /// One window's (1, S, C) embeddings with each token scaled by its weight, rescaled to the unweighted
    /// mean (A1111's default emphasis); unchanged when every weight is 1.
    public static func apply(_ weights: [Float], to hidden: Tensor) -> Tensor {
        guard weights.contains(where: { $0 != 1 }) else { return hidden }
        let width = hidden.count / weights.count
        var scaled = hidden.scalars
        for (token, weight) in weights.enumerated() {
            for k in (token * width)..<((token + 1) * width) { scaled[k] *= weight }
        }
        let mean = { (values: [Float]) in values.reduce(0, +) / Float(values.count) }
        let factor = mean(hidden.scalars) / mean(scaled)
        return Tensor(shape: hidden.shape, scalars: scaled.map { $0 * factor })
    }
}

/// A weighted prompt's token ids in text-encoder windows: start token, 75 text tokens, end token, padding.
public struct PromptWindows: Equatable, Sendable {
    public var ids: [[Int]]
    public var weights: [[Float]]
    /// Whether windows past the limit were dropped (the Python pipeline's truncation).
    public var truncated = false

    public var count: Int { ids.count }

    /// The Python pipeline's warning text for a prompt cut to `windows` windows of `length` tokens.
    public static func truncationWarning(windows: Int, length: Int) -> String {
        "prompt is longer than \(length * windows) tokens and was truncated"
    }
}

extension BPETokenizer {
    /// Windows of `length` ids (at least `minCount`, at most `maxCount`) of a weighted prompt, fragment by
    /// fragment; windows past `maxCount` are dropped, as python_coreml_sd's pipeline truncates.
    public func windows(_ text: String, length: Int = 77, minCount: Int = 1, maxCount: Int = .max) -> PromptWindows {
        var ids: [Int] = []
        var weights: [Float] = []
        for (fragment, weight) in PromptWeighting.parse(text) {
            let tokens = tokenize(fragment)
            ids += tokens
            weights += Array(repeating: Float(weight), count: tokens.count)
        }
        let body = max(length - 2, 1)
        let needed = max(minCount, (ids.count + body - 1) / body, 1)
        var result = PromptWindows(ids: [], weights: [], truncated: needed > maxCount)
        for k in 0..<min(needed, maxCount) {
            let slice = Array(ids.dropFirst(k * body).prefix(body))
            let sliceWeights = Array(weights.dropFirst(k * body).prefix(body))
            let fill = body - slice.count
            result.ids.append([startId] + slice + [endId] + Array(repeating: padId, count: fill))
            result.weights.append([1] + sliceWeights + [1] + Array(repeating: 1, count: fill))
        }
        return result
    }
}
