import DiffuseCore

/// What the Stable Diffusion pipelines take from the tokenizer for one prompt.
public struct TokenizerOutput: Sendable, Equatable {
    /// BOS, the prompt's tokens (truncated to fit), EOS, then the pad token: `modelMaxLength` ids.
    public var inputIds: [Int]
    /// 1 for BOS, the tokens and EOS; 0 for the padding.
    public var attentionMask: [Int]
    /// BOS, every token of the prompt, EOS: neither truncated nor padded (diffusers' `untruncated_ids`).
    public var untruncatedIds: [Int]
    /// The decoded text that truncation removed; nil when the prompt fits.
    public var truncatedText: String?
}

/// A tokenizer error that is not about one file (those are `FileError`s, which name the file).
public struct TokenizerError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// A token that is split out of the text as a whole before BPE runs.
public struct AddedToken: Sendable, Equatable {
    public var content: String
    public var id: Int
    /// Special tokens (BOS, EOS, UNK, PAD) rather than ordinary added words.
    public var special: Bool
    /// Matched in the normalized (lower-cased) text rather than in the text as given.
    public var normalized: Bool
}

/// CLIP's byte-level BPE tokenizer, bit-exact with transformers 5's `CLIPTokenizer` (the one the
/// tokenizers library runs) as the Stable Diffusion pipelines call it:
/// `tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)`.
///
/// The steps: added tokens split out; NFC, whitespace collapse, lower-casing; CLIP's split
/// pattern; byte-level symbols; BPE with a `</w>` suffix on each word's last symbol; BOS/EOS;
/// truncation and padding to `modelMaxLength`.
public struct CLIPTokenizer: Sendable {
    /// Sequence length the pipelines pad and truncate to (`model_max_length`, 77 for CLIP).
    public let modelMaxLength: Int
    public let bosToken: String
    public let eosToken: String
    public let padToken: String
    public let unkToken: String
    public let bosTokenId: Int
    public let eosTokenId: Int
    public let padTokenId: Int
    /// The BPE vocabulary (vocab.json): token → id, without the added tokens.
    public let vocab: [String: Int]
    /// Tokens split out of the text before BPE, in the order they were added.
    public private(set) var addedTokens: [AddedToken]
    /// Textual-inversion tokens of several vectors: the id written in a prompt, and the ids of all
    /// its vectors (see `addingEmbeddingTokens`).
    public private(set) var expansions: [Int: [Int]] = [:]

    private var tokensById: [String?]
    private let bpe: BytePairEncoding
    private var rawMatcher = AddedTokenMatcher([])
    private var normalizedMatcher = AddedTokenMatcher([])

    /// The number of ids, added tokens included.
    public var vocabSize: Int { tokensById.count }

    /// The id of a token (vocabulary or added), as `convert_tokens_to_ids` gives it.
    public func tokenToId(_ token: String) -> Int? {
        addedTokens.first(where: { $0.content == token })?.id ?? vocab[token]
    }

    /// The token of an id, as `convert_ids_to_tokens` gives it.
    public func idToToken(_ id: Int) -> String? {
        id >= 0 && id < tokensById.count ? tokensById[id] : nil
    }

    /// The prompt's token ids, without BOS, EOS, truncation or padding.
    public func encode(_ text: String) -> [Int] {
        let scalars = Array(text.unicodeScalars)
        var ids: [Int] = []
        for piece in rawMatcher.split(scalars, scalars.indices) {
            switch piece {
            case .token(let id):
                ids += expansions[id] ?? [id]
            case .text(let range):
                let normalized = CLIPNormalizer.normalize(scalars[range])
                for inner in normalizedMatcher.split(normalized, normalized.indices) {
                    switch inner {
                    case .token(let id):
                        ids += expansions[id] ?? [id]
                    case .text(let range):
                        CLIPPreTokenizer.forEachWord(in: normalized, range) { bpe.encode(word: $0, into: &ids) }
                    }
                }
            }
        }
        return ids
    }

    /// Tokenizes one prompt as the pipelines do: BOS and EOS around it, truncated to and padded
    /// to `modelMaxLength`. Like diffusers, it warns about (and reports) the text that truncation
    /// removed.
    public func callAsFunction(_ text: String) -> TokenizerOutput {
        let tokens = encode(text)
        let untruncated = [bosTokenId] + tokens + [eosTokenId]
        let kept = min(tokens.count, modelMaxLength - 2)
        var inputIds = [bosTokenId] + tokens[..<kept] + [eosTokenId]
        var attentionMask = [Int](repeating: 1, count: inputIds.count)
        inputIds += [Int](repeating: padTokenId, count: modelMaxLength - inputIds.count)
        attentionMask += [Int](repeating: 0, count: modelMaxLength - attentionMask.count)
        var truncatedText: String? = nil
        if untruncated.count > modelMaxLength {
            // diffusers decodes untruncated_ids[model_max_length - 1 : -1]: what lies between the
            // last kept token and EOS.
            let removed = decode(Array(untruncated[(modelMaxLength - 1)..<(untruncated.count - 1)]))
            truncatedText = removed
            Log.warning(
                "The following part of your input was truncated because CLIP can only handle sequences up to "
                    + "\(modelMaxLength) tokens: \(removed)")
        }
        return TokenizerOutput(inputIds: inputIds, attentionMask: attentionMask, untruncatedIds: untruncated,
                               truncatedText: truncatedText)
    }

    /// Text back from ids, as transformers decodes them: byte-level symbols back to bytes (invalid
    /// UTF-8 becomes U+FFFD), each `</w>` to a space, then the ends stripped of whitespace.
    /// Special tokens are kept, as in diffusers' truncation warning.
    public func decode(_ ids: [Int]) -> String {
        var bytes: [UInt8] = []
        for id in ids {
            if let token = idToToken(id) { ByteLevel.decode(token, into: &bytes) }
        }
        // "</w>" is ASCII, so replacing it before UTF-8 decoding is the same as after.
        let suffix = Array("</w>".utf8)
        var spaced: [UInt8] = []
        spaced.reserveCapacity(bytes.count)
        var i = 0
        while i < bytes.count {
            if bytes[i] == suffix[0] && bytes[i...].starts(with: suffix) {
                spaced.append(0x20)
                i += suffix.count
            } else {
                spaced.append(bytes[i])
                i += 1
            }
        }
        let scalars = Array(String(decoding: spaced, as: UTF8.self).unicodeScalars)
        guard let first = scalars.firstIndex(where: { !CharacterClass.isPythonWhitespace($0) }),
              let last = scalars.lastIndex(where: { !CharacterClass.isPythonWhitespace($0) })
        else { return "" }
        var text = ""
        text.unicodeScalars.append(contentsOf: scalars[first...last])
        return text
    }

    // MARK: - Construction

    /// One line of merges.txt: two symbols, merged in rank order.
    struct Merge {
        var left: String
        var right: String
        var line: Int
    }

    /// A special or added token as the configuration files describe it.
    struct TokenSpec: Equatable {
        var content: String
        var special: Bool
        var normalized: Bool
    }

    /// Builds the tokenizer from a vocabulary, its merges and the tokens to add (in the order
    /// transformers adds them), failing with the file named when a merge or a byte symbol is
    /// missing from the vocabulary.
    init(vocab: [String: Int], vocabFile: String, merges: [Merge], mergesFile: String,
         bos: TokenSpec, eos: TokenSpec, unk: TokenSpec, pad: TokenSpec, added: [TokenSpec],
         modelMaxLength: Int) throws {
        self.vocab = vocab
        self.modelMaxLength = modelMaxLength
        bosToken = bos.content
        eosToken = eos.content
        unkToken = unk.content
        padToken = pad.content

        // Byte symbols that the vocabulary lacks fall back to the unknown token, as in tokenizers.
        let unkId = vocab[unk.content]
        func symbolId(_ symbol: String) throws -> Int {
            guard let id = vocab[symbol] ?? unkId else {
                throw FileError(vocabFile, "has no byte-level symbol \(JSON.quote(symbol)) and no unknown token "
                                    + "\(JSON.quote(unk.content)) to stand for it")
            }
            return id
        }
        let byteIds = try (0...255).map { try symbolId(ByteLevel.symbol(UInt8($0))) }
        let wordEndIds = try (0...255).map { try symbolId(ByteLevel.symbol(UInt8($0)) + "</w>") }

        var mergeTable: [UInt64: UInt64] = [:]
        mergeTable.reserveCapacity(merges.count)
        for (rank, merge) in merges.enumerated() {
            func id(_ token: String) throws -> Int {
                guard let id = vocab[token] else {
                    throw FileError(mergesFile, "line \(merge.line): \(JSON.quote(token)) is not in the vocabulary (\(vocabFile))")
                }
                return id
            }
            let left = try id(merge.left), right = try id(merge.right)
            let merged = try id(merge.left + merge.right)
            // A merge listed twice keeps its later rank, as in the tokenizers library.
            mergeTable[BytePairEncoding.pairKey(left, right)] = UInt64(rank) << 32 | UInt64(merged)
        }
        bpe = BytePairEncoding(byteIds: byteIds, wordEndIds: wordEndIds, merges: mergeTable)

        // Added tokens keep their vocabulary id; new ones are numbered after the vocabulary.
        var nextId = max(vocab.count, (vocab.values.max() ?? -1) + 1)
        var addedTokens: [AddedToken] = []
        for spec in added + [bos, eos, unk, pad] where !addedTokens.contains(where: { $0.content == spec.content }) {
            let id: Int
            if let known = vocab[spec.content] {
                id = known
            } else {
                id = nextId
                nextId += 1
            }
            addedTokens.append(AddedToken(content: spec.content, id: id, special: spec.special, normalized: spec.normalized))
        }
        self.addedTokens = addedTokens
        // (the four named tokens were added just above)
        func resolve(_ spec: TokenSpec) -> Int { addedTokens.first(where: { $0.content == spec.content })!.id }
        bosTokenId = resolve(bos)
        eosTokenId = resolve(eos)
        padTokenId = resolve(pad)

        tokensById = [String?](repeating: nil, count: nextId)
        for (token, id) in vocab { tokensById[id] = token }
        indexAddedTokens()
    }

    /// Rebuilds the added-token matchers and spellings: a normalized token is matched, and
    /// decoded, in its normalized spelling.
    private mutating func indexAddedTokens() {
        let spellings = addedTokens.map { token -> [Unicode.Scalar] in
            let content = Array(token.content.unicodeScalars)
            return token.normalized ? CLIPNormalizer.normalize(content[...]) : content
        }
        func matcher(normalized: Bool) -> AddedTokenMatcher {
            AddedTokenMatcher(addedTokens.indices.filter { addedTokens[$0].normalized == normalized }
                .map { (spellings[$0], addedTokens[$0].id) })
        }
        rawMatcher = matcher(normalized: false)
        normalizedMatcher = matcher(normalized: true)
        for (token, spelling) in zip(addedTokens, spellings) {
            var text = ""
            text.unicodeScalars.append(contentsOf: spelling)
            tokensById[token.id] = text
        }
    }

    // MARK: - Textual inversion

    /// The tokenizer with a textual-inversion embedding's tokens added, as diffusers'
    /// `load_textual_inversion` adds them: `token` for the first vector, `token_1` … `token_{n-1}`
    /// for the others, ordinary (normalized, non-special) added tokens numbered after the last id.
    /// `token` in a prompt then stands for all n ids in order, which is what diffusers'
    /// `maybe_convert_prompt` does by rewriting the prompt text (`token` → `token token_1 …`).
    ///
    /// Unlike diffusers 0.42 with transformers 5, this also expands a token written with capitals:
    /// there `maybe_convert_prompt` looks for the lower-cased spelling the tokenizer returns among
    /// the tokens as given, finds nothing, and silently keeps only the first vector.
    /// Fails, as diffusers does, when a token to add is already in the vocabulary; also when it
    /// would be matched as an added token already is (the same text in other case).
    public func addingEmbeddingTokens(_ token: String, vectors: Int) throws -> (tokenizer: CLIPTokenizer, ids: [Int]) {
        guard !token.isEmpty, vectors >= 1 else {
            throw TokenizerError("a textual-inversion token needs a name and at least one vector (got \(JSON.quote(token)), \(vectors))")
        }
        var copy = self
        let names = [token] + (1..<vectors).map { "\(token)_\($0)" }
        let normalizedSpellings = Set(addedTokens.filter(\.normalized).map { CLIPNormalizer.normalize(Array($0.content.unicodeScalars)[...]) })
        var ids: [Int] = []
        for name in names {
            if tokenToId(name) != nil {
                throw TokenizerError("token \(JSON.quote(name)) is already in the tokenizer's vocabulary: give the embedding another token")
            }
            if normalizedSpellings.contains(CLIPNormalizer.normalize(Array(name.unicodeScalars)[...])) {
                throw TokenizerError("token \(JSON.quote(name)) is matched as an added token already is (prompts are lower-cased): give the embedding another token")
            }
            let id = copy.tokensById.count
            copy.tokensById.append(nil)
            copy.addedTokens.append(AddedToken(content: name, id: id, special: false, normalized: true))
            ids.append(id)
        }
        if vectors > 1 { copy.expansions[ids[0]] = ids }
        copy.indexAddedTokens()
        return (copy, ids)
    }
}
