/// The text side of transformers' CLIPTokenizer, step by step as the tokenizers library runs it:
/// added tokens are split out first, the rest is normalized, pre-tokenized into words, and each
/// word goes through byte-level BPE.

/// Character classes of the Oniguruma regexes that the tokenizers library runs.
enum CharacterClass {
    /// The Unicode version of the Oniguruma tables in tokenizers 0.23. The standard library may
    /// know a newer one; characters assigned since are unassigned (neither letter nor number) to
    /// the regexes, and must be to us.
    static let regexUnicodeVersion: Unicode.Version = (16, 0)

    @inline(__always)
    private static func category(_ u: Unicode.Scalar) -> Unicode.GeneralCategory {
        guard let age = u.properties.age, age <= regexUnicodeVersion else { return .unassigned }
        return u.properties.generalCategory
    }

    /// Oniguruma's Unicode `\s`: U+0009–U+000D, U+0085 and the separators (Zs, Zl, Zp).
    /// Unlike Python's, U+001C–U+001F are not whitespace here.
    @inline(__always)
    static func isWhitespace(_ u: Unicode.Scalar) -> Bool {
        let v = u.value
        if v < 0x80 { return v == 0x20 || (v >= 0x09 && v <= 0x0D) }
        if v == 0x85 { return true }
        switch category(u) {
        case .spaceSeparator, .lineSeparator, .paragraphSeparator: return true
        default: return false
        }
    }

    /// `\p{L}`
    @inline(__always)
    static func isLetter(_ u: Unicode.Scalar) -> Bool {
        let v = u.value
        if v < 0x80 { return (v | 0x20) >= 0x61 && (v | 0x20) <= 0x7A }
        switch category(u) {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: return true
        default: return false
        }
    }

    /// `\p{N}`
    @inline(__always)
    static func isNumber(_ u: Unicode.Scalar) -> Bool {
        let v = u.value
        if v < 0x80 { return v >= 0x30 && v <= 0x39 }
        switch category(u) {
        case .decimalNumber, .letterNumber, .otherNumber: return true
        default: return false
        }
    }

    /// Python's `str.isspace`, which `str.strip()` uses (bidi classes WS, B, S and Zs).
    static func isPythonWhitespace(_ u: Unicode.Scalar) -> Bool {
        switch u.value {
        case 0x09...0x0D, 0x1C...0x20, 0x85, 0xA0, 0x1680, 0x2000...0x200A, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000:
            return true
        default:
            return false
        }
    }
}

/// transformers' CLIP normalizer: `Sequence([NFC(), Replace(Regex(r"\s+"), " "), Lowercase()])`.
enum CLIPNormalizer {
    static func normalize(_ text: ArraySlice<Unicode.Scalar>) -> [Unicode.Scalar] {
        var out: [Unicode.Scalar] = []
        out.reserveCapacity(text.count)
        if text.allSatisfy(\.isASCII) {  // ASCII text is already NFC
            collapseWhitespaceAndLowercase(text, into: &out)
        } else {
            var string = ""
            string.unicodeScalars.append(contentsOf: text)
            // The standard library's own NFC (the one String comparison uses): no ICU, no Foundation.
            let nfc = String(decoding: string._nfcCodeUnits, as: UTF8.self)
            collapseWhitespaceAndLowercase(nfc.unicodeScalars, into: &out)
        }
        return out
    }

    /// Runs of whitespace become one space; each character is lower-cased on its own, as Rust's
    /// `char::to_lowercase` does (full mappings such as İ → i̇, but no final-sigma rule).
    private static func collapseWhitespaceAndLowercase<S: Sequence<Unicode.Scalar>>(
        _ scalars: S, into out: inout [Unicode.Scalar]
    ) {
        var inWhitespace = false
        for u in scalars {
            if CharacterClass.isWhitespace(u) {
                if !inWhitespace { out.append(" ") }
                inWhitespace = true
                continue
            }
            inWhitespace = false
            if u.isASCII {
                let v = u.value
                out.append(v >= 0x41 && v <= 0x5A ? Unicode.Scalar(UInt8(v + 0x20)) : u)
            } else {
                out.append(contentsOf: u.properties.lowercaseMapping.unicodeScalars)
            }
        }
    }
}

/// transformers' CLIP pre-tokenizer. `Split(pattern, behavior="removed", invert=True)` keeps the
/// matches of `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
/// (tried in that order at each position) and drops the whitespace between them. Then
/// `ByteLevel(add_prefix_space=False)` splits every piece again with GPT-2's pattern, which leaves
/// each piece whole except the two tag literals: `<|endoftext|>` becomes `<|`, `endoftext`, `|>`.
enum CLIPPreTokenizer {
    private static let tags: [[Unicode.Scalar]] = ["<|startoftext|>", "<|endoftext|>"].map { Array($0.unicodeScalars) }
    private static let contractions: [[Unicode.Scalar]] = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"].map {
        Array($0.unicodeScalars)
    }

    /// Calls `body` with the UTF-8 bytes of each word of `text[range]`, in order.
    static func forEachWord(in text: [Unicode.Scalar], _ range: Range<Int>, _ body: ([UInt8]) -> Void) {
        func emit(_ start: Int, _ end: Int) { body(utf8(text[start..<end])) }
        func literal(_ candidates: [[Unicode.Scalar]], at i: Int) -> Int? {
            for c in candidates where i + c.count <= range.upperBound && text[i..<(i + c.count)].elementsEqual(c) {
                return c.count
            }
            return nil
        }
        var i = range.lowerBound
        while i < range.upperBound {
            let u = text[i]
            if CharacterClass.isWhitespace(u) {
                i += 1
            } else if u == "<", let n = literal(tags, at: i) {
                emit(i, i + 2)
                emit(i + 2, i + n - 2)
                emit(i + n - 2, i + n)
                i += n
            } else if u == "'", let n = literal(contractions, at: i) {
                emit(i, i + n)
                i += n
            } else if CharacterClass.isLetter(u) {
                var j = i + 1
                while j < range.upperBound && CharacterClass.isLetter(text[j]) { j += 1 }
                emit(i, j)
                i = j
            } else if CharacterClass.isNumber(u) {
                emit(i, i + 1)  // digits one by one
                i += 1
            } else {
                var j = i + 1
                while j < range.upperBound {
                    let v = text[j]
                    if CharacterClass.isWhitespace(v) || CharacterClass.isLetter(v) || CharacterClass.isNumber(v) { break }
                    j += 1
                }
                emit(i, j)
                i = j
            }
        }
    }

    private static func utf8(_ scalars: ArraySlice<Unicode.Scalar>) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(scalars.count)
        for u in scalars {
            if u.isASCII { bytes.append(UInt8(u.value)) } else { UTF8.encode(u) { bytes.append($0) } }
        }
        return bytes
    }
}

/// Splits out added tokens (the special tokens, and `!` where it is the pad token) as the
/// tokenizers library's AddedVocabulary does: the leftmost match wins, the longest among those
/// starting there. Tokens marked `normalized` are matched after normalization, the others before.
struct AddedTokenMatcher: Sendable {
    enum Piece: Equatable {
        case text(Range<Int>)
        case token(Int)
    }

    private struct Pattern: Sendable {
        let scalars: [Unicode.Scalar]
        let id: Int
    }

    private let patterns: [Pattern]  // longest first
    var isEmpty: Bool { patterns.isEmpty }

    init(_ tokens: [(content: [Unicode.Scalar], id: Int)]) {
        patterns = tokens.filter { !$0.content.isEmpty }.map { Pattern(scalars: $0.content, id: $0.id) }
            .sorted { $0.scalars.count > $1.scalars.count }
    }

    func split(_ text: [Unicode.Scalar], _ range: Range<Int>) -> [Piece] {
        if patterns.isEmpty { return range.isEmpty ? [] : [.text(range)] }
        var pieces: [Piece] = []
        var textStart = range.lowerBound
        var i = range.lowerBound
        scan: while i < range.upperBound {
            for p in patterns where p.scalars[0] == text[i] && i + p.scalars.count <= range.upperBound
                && text[i..<(i + p.scalars.count)].elementsEqual(p.scalars) {
                if textStart < i { pieces.append(.text(textStart..<i)) }
                pieces.append(.token(p.id))
                i += p.scalars.count
                textStart = i
                continue scan
            }
            i += 1
        }
        if textStart < range.upperBound { pieces.append(.text(textStart..<range.upperBound)) }
        return pieces
    }
}
