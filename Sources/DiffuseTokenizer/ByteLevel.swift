/// GPT-2's reversible map between bytes and printable characters (`bytes_to_unicode`).
///
/// Byte-level BPE works on these characters rather than on raw bytes, so that vocab.json and
/// merges.txt hold no whitespace or control characters: the printable Latin-1 bytes stand for
/// themselves, every other byte for a character from U+0100 on, in byte order.
enum ByteLevel {
    /// The bytes in the order the CLIP vocabulary lists their symbols: `bytes_to_unicode()`'s
    /// insertion order, printable bytes first, then the remapped ones.
    static let vocabularyOrder: [UInt8] = {
        let printable = Array(UInt8(ascii: "!")...UInt8(ascii: "~")) + Array(0xA1...0xAC) + Array(0xAE...0xFF)
        let printableSet = Set(printable)
        return printable + (0...255).filter { !printableSet.contains($0) }
    }()

    /// The character standing for each byte.
    static let scalarForByte: [Unicode.Scalar] = {
        var table = [Unicode.Scalar](repeating: "\0", count: 256)
        var next: UInt32 = 256
        for (position, byte) in vocabularyOrder.enumerated() {
            if position < 188 {  // the printable bytes stand for themselves
                table[Int(byte)] = Unicode.Scalar(byte)
            } else {
                table[Int(byte)] = Unicode.Scalar(next)!
                next += 1
            }
        }
        return table
    }()

    /// The byte a character stands for (indexed by scalar value), or -1.
    static let byteForScalar: [Int16] = {
        var table = [Int16](repeating: -1, count: 324)
        for byte in 0..<256 { table[Int(scalarForByte[byte].value)] = Int16(byte) }
        return table
    }()

    /// The symbol of one byte as the vocabulary spells it.
    static func symbol(_ byte: UInt8) -> String { String(Character(scalarForByte[Int(byte)])) }

    /// Back from a vocabulary token to bytes, as the tokenizers library's ByteLevel decoder does:
    /// a token with a character outside the map is taken as it is (its own UTF-8).
    static func decode(_ token: String, into bytes: inout [UInt8]) {
        let start = bytes.count
        for u in token.unicodeScalars {
            let b = u.value < 324 ? byteForScalar[Int(u.value)] : -1
            if b < 0 {
                bytes.removeSubrange(start...)
                bytes.append(contentsOf: token.utf8)
                return
            }
            bytes.append(UInt8(b))
        }
    }
}
