import Synchronization

/// The BPE model of the tokenizers library as CLIP configures it: byte-level symbols, the `</w>`
/// end-of-word suffix on a word's last symbol, no continuing-subword prefix, no dropout.
final class BytePairEncoding: Sendable {
    /// Id of each byte's symbol, and of the same symbol ending a word (`</w>`).
    private let byteIds: [Int]
    private let wordEndIds: [Int]
    /// (left id << 32 | right id) → (rank << 32 | merged id): comparing two packed values
    /// compares their ranks.
    private let merges: [UInt64: UInt64]
    /// Words seen before, as the reference implementations cache them: prompts repeat words.
    private let cache = Mutex<[[UInt8]: [Int]]>([:])
    private static let cacheCapacity = 10_000

    init(byteIds: [Int], wordEndIds: [Int], merges: [UInt64: UInt64]) {
        precondition(byteIds.count == 256 && wordEndIds.count == 256)
        self.byteIds = byteIds
        self.wordEndIds = wordEndIds
        self.merges = merges
    }

    static func pairKey(_ left: Int, _ right: Int) -> UInt64 { UInt64(left) << 32 | UInt64(right) }

    /// Appends the token ids of one pre-tokenized word (its UTF-8 bytes).
    func encode(word: [UInt8], into ids: inout [Int]) {
        if let hit = cache.withLock({ $0[word] }) {
            ids.append(contentsOf: hit)
            return
        }
        let tokens = merge(word)
        cache.withLock { if $0.count < Self.cacheCapacity { $0[word] = tokens } }
        ids.append(contentsOf: tokens)
    }

    /// Applies the merges lowest rank first, and the leftmost pair among equals: the order in
    /// which the tokenizers library's priority queue takes them, and what CLIP's loop gives.
    private func merge(_ word: [UInt8]) -> [Int] {
        guard let last = word.last else { return [] }
        var symbols = word.dropLast().map { byteIds[Int($0)] }
        symbols.append(wordEndIds[Int(last)])
        // pairs[i] is the packed merge of symbols[i] and symbols[i + 1], or .max for none.
        var pairs = (0..<(symbols.count - 1)).map { merges[Self.pairKey(symbols[$0], symbols[$0 + 1])] ?? .max }
        while true {
            var best = -1
            var bestMerge = UInt64.max
            for i in pairs.indices where pairs[i] < bestMerge {
                best = i
                bestMerge = pairs[i]
            }
            if best < 0 { break }
            symbols[best] = Int(bestMerge & 0xFFFF_FFFF)
            symbols.remove(at: best + 1)
            pairs.remove(at: best)
            if best > 0 { pairs[best - 1] = merges[Self.pairKey(symbols[best - 1], symbols[best])] ?? .max }
            if best < pairs.count { pairs[best] = merges[Self.pairKey(symbols[best], symbols[best + 1])] ?? .max }
        }
        return symbols
    }
}
