import DiffuseCore

extension CLIPTokenizer {
    /// CLIP's context length, the default when a configuration does not give `model_max_length`.
    public static let defaultModelMaxLength = 77

    /// Loads a tokenizer folder as the Stable Diffusion repositories ship it: `vocab.json` and
    /// `merges.txt`, with `tokenizer_config.json` and `special_tokens_map.json` for the special
    /// tokens and `model_max_length` (both optional, read as transformers reads them). A folder
    /// with only `tokenizer.json` (what transformers 5 saves) is read from that: its BPE
    /// vocabulary and merges, and its added tokens.
    public init(folder: String) throws {
        guard Files.isDirectory(folder) else { throw FileError(folder, "no such tokenizer folder") }
        var vocabFile = Files.join(folder, "vocab.json")
        var mergesFile = Files.join(folder, "merges.txt")
        let vocab: [String: Int], merges: [Merge], config: SpecialTokensConfig
        let fast = Files.join(folder, "tokenizer.json")
        if !Files.exists(vocabFile) && !Files.exists(mergesFile) && Files.exists(fast) {
            let file = try TokenizerJSON(path: fast)
            (vocab, merges, vocabFile, mergesFile) = (file.vocab, file.merges, fast, fast)
            config = try SpecialTokensConfig(folder: folder, fileAddedTokens: file.addedTokens)
        } else {
            vocab = try Self.readVocab(vocabFile)
            merges = try Self.parseMerges(try Files.read(mergesFile), file: mergesFile)
            config = try SpecialTokensConfig(folder: folder)
        }
        try self.init(vocab: vocab, vocabFile: vocabFile, merges: merges, mergesFile: mergesFile,
                      bos: config.bos, eos: config.eos, unk: config.unk, pad: config.pad, added: config.added,
                      modelMaxLength: config.modelMaxLength)
    }

    /// Builds the tokenizer from CLIP's original `bpe_simple_vocab_16e6.txt.gz` exactly as CLIP and
    /// open_clip build their vocabulary: the 256 byte symbols, the same with `</w>`, the first
    /// 48,894 merges, then `<|startoftext|>` and `<|endoftext|>` (49,408 tokens).
    /// `padToken` is `!` for the SD 2 / SDXL second tokenizer.
    public init(bpeFile: String, padToken: String = "<|endoftext|>", modelMaxLength: Int = defaultModelMaxLength) throws {
        try self.init(bpeGzip: try Files.read(bpeFile), origin: bpeFile, padToken: padToken, modelMaxLength: modelMaxLength)
    }

    /// The same from the gzip bytes in memory (a copy embedded in the binary); `origin` names
    /// them in errors.
    public init(bpeGzip: [UInt8], origin: String, padToken: String = "<|endoftext|>",
                modelMaxLength: Int = defaultModelMaxLength) throws {
        guard modelMaxLength >= 2 else {
            throw TokenizerError("modelMaxLength \(modelMaxLength) leaves no room for BOS and EOS")
        }
        func special(_ content: String) -> TokenSpec { TokenSpec(content: content, special: true, normalized: false) }
        try self.init(bpeGzip: bpeGzip, origin: origin, bos: special("<|startoftext|>"), eos: special("<|endoftext|>"),
                      unk: special("<|endoftext|>"), pad: special(padToken), added: [], modelMaxLength: modelMaxLength)
    }

    /// CLIP's original vocabulary (gzip bytes in memory) with the special tokens and length limit
    /// of a tokenizer folder's `tokenizer_config.json` and `special_tokens_map.json`, given as
    /// their bytes (embedded copies of a model's tokenizer folder, for checkpoints that carry no
    /// tokenizer). They are resolved exactly as `init(folder:)` resolves the files.
    public init(bpeGzip: [UInt8], origin: String, tokenizerConfig: (bytes: [UInt8], origin: String)?,
                specialTokensMap: (bytes: [UInt8], origin: String)?) throws {
        func parse(_ file: (bytes: [UInt8], origin: String)?) throws -> (JSON, String)? {
            guard let file else { return nil }
            do { return (try JSON.parse(file.bytes), file.origin) } catch let e as JSON.ParseError {
                throw FileError(file.origin, "invalid JSON: \(e)")
            }
        }
        let config = try SpecialTokensConfig(tokenizerConfig: parse(tokenizerConfig), specialTokensMap: parse(specialTokensMap))
        try self.init(bpeGzip: bpeGzip, origin: origin, bos: config.bos, eos: config.eos, unk: config.unk,
                      pad: config.pad, added: config.added, modelMaxLength: config.modelMaxLength)
    }

    private init(bpeGzip compressed: [UInt8], origin bpeFile: String, bos: TokenSpec, eos: TokenSpec, unk: TokenSpec,
                 pad: TokenSpec, added: [TokenSpec], modelMaxLength: Int) throws {
        let text: [UInt8]
        do { text = try Zlib.inflate(compressed) } catch { throw FileError(bpeFile, "cannot decompress: \(error)") }
        // The first line is a header; CLIP keeps the next 49152 - 256 - 2 lines as merges.
        let mergeCount = 49152 - 256 - 2
        let lines = Self.lines(text, limit: mergeCount + 1)
        guard lines.count > mergeCount else {
            throw FileError(bpeFile, "has \(max(lines.count - 1, 0)) merge lines; CLIP's vocabulary needs \(mergeCount)")
        }
        let merges = try lines.dropFirst().map { try Self.parseMerge($0.text, line: $0.number, file: bpeFile) }
        var tokens = ByteLevel.vocabularyOrder.map(ByteLevel.symbol)
        tokens += tokens.map { $0 + "</w>" }
        tokens += merges.map { $0.left + $0.right }
        tokens += ["<|startoftext|>", "<|endoftext|>"]
        var vocab: [String: Int] = [:]
        vocab.reserveCapacity(tokens.count)
        for (id, token) in tokens.enumerated() { vocab[token] = id }

        try self.init(vocab: vocab, vocabFile: bpeFile, merges: merges, mergesFile: bpeFile,
                      bos: bos, eos: eos, unk: unk, pad: pad, added: added, modelMaxLength: modelMaxLength)
    }

    /// vocab.json: an object of token → id.
    static func readVocab(_ path: String) throws -> [String: Int] {
        guard let members = try Files.readJSON(path).members else {
            throw FileError(path, "is not a JSON object of token → id")
        }
        var vocab: [String: Int] = [:]
        vocab.reserveCapacity(members.count)
        for (token, value) in members {
            // The id bound keeps the id → token table of a sane size.
            guard let id = value.int, id >= 0, id < 1 << 24 else {
                throw FileError(path, "token \(JSON.quote(token)) has id \(value), not an integer in 0..<\(1 << 24)")
            }
            vocab[token] = id  // a repeated key keeps its last id, as Python's json does
        }
        guard !vocab.isEmpty else { throw FileError(path, "the vocabulary is empty") }
        return vocab
    }

    /// merges.txt as the tokenizers library reads it: `#version` lines skipped, every other line
    /// exactly two symbols separated by one space; the rank is the order.
    static func parseMerges(_ bytes: [UInt8], file: String) throws -> [Merge] {
        let version = Array("#version".utf8)
        return try lines(bytes).filter { !$0.text.starts(with: version) }.map {
            try parseMerge($0.text, line: $0.number, file: file)
        }
    }

    static func parseMerge(_ text: ArraySlice<UInt8>, line: Int, file: String) throws -> Merge {
        let space = UInt8(ascii: " ")
        if let split = text.firstIndex(of: space), split > text.startIndex, split + 1 < text.endIndex,
           !text[(split + 1)...].contains(space),
           let left = String(validating: text[..<split], as: UTF8.self),
           let right = String(validating: text[(split + 1)...], as: UTF8.self) {
            return Merge(left: left, right: right, line: line)
        }
        throw FileError(file, "line \(line): expected two UTF-8 symbols separated by one space, found "
                            + JSON.quote(String(decoding: text, as: UTF8.self)))
    }

    /// Lines of text split on "\n", a "\r" before it dropped, numbered from 1; no empty line after
    /// a final newline; at most `limit` lines.
    static func lines(_ bytes: [UInt8], limit: Int = .max) -> [(number: Int, text: ArraySlice<UInt8>)] {
        var result: [(number: Int, text: ArraySlice<UInt8>)] = []
        var start = 0
        while start < bytes.count && result.count < limit {
            let end = bytes[start...].firstIndex(of: UInt8(ascii: "\n")) ?? bytes.count
            var line = bytes[start..<end]
            if line.last == UInt8(ascii: "\r") { line = line.dropLast() }
            result.append((result.count + 1, line))
            start = end + 1
        }
        return result
    }
}

/// The special tokens and length limit from tokenizer_config.json and special_tokens_map.json,
/// resolved the way transformers 5 resolves them:
/// - CLIPTokenizer's defaults: BOS `<|startoftext|>`, EOS, UNK and PAD `<|endoftext|>`;
/// - tokenizer_config.json's `*_token` keys override them;
/// - with `added_tokens_decoder` in tokenizer_config.json, its entries are added first (by id) and
///   lend their flags to the named tokens; without it, special_tokens_map.json overrides the config;
/// - a token given as a plain string is special and not normalized.
struct SpecialTokensConfig {
    typealias TokenSpec = CLIPTokenizer.TokenSpec

    var bos = TokenSpec(content: "<|startoftext|>", special: true, normalized: false)
    var eos = TokenSpec(content: "<|endoftext|>", special: true, normalized: false)
    var unk = TokenSpec(content: "<|endoftext|>", special: true, normalized: false)
    var pad = TokenSpec(content: "<|endoftext|>", special: true, normalized: false)
    /// Tokens to add, in transformers' order: added_tokens_decoder by id, then the named special
    /// tokens (bos, eos, unk, sep, pad, cls, mask), then the extra special tokens.
    var added: [TokenSpec] = []
    var modelMaxLength = CLIPTokenizer.defaultModelMaxLength

    private static let namedKeys = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"]
    private static let extraKeys = ["additional_special_tokens", "extra_special_tokens"]

    /// `fileAddedTokens`: tokenizer.json's added tokens, which stand in for an absent
    /// `added_tokens_decoder`.
    init(folder: String, fileAddedTokens: [(id: Int, token: TokenSpec)] = []) throws {
        let configFile = Files.join(folder, "tokenizer_config.json")
        let mapFile = Files.join(folder, "special_tokens_map.json")
        try self.init(tokenizerConfig: Files.exists(configFile) ? (try Files.readJSON(configFile), configFile) : nil,
                      specialTokensMap: Files.exists(mapFile) ? (try Files.readJSON(mapFile), mapFile) : nil,
                      fileAddedTokens: fileAddedTokens)
    }

    /// The two files' parsed contents and names (either may be absent).
    init(tokenizerConfig: (JSON, String)?, specialTokensMap: (JSON, String)?,
         fileAddedTokens: [(id: Int, token: TokenSpec)] = []) throws {
        var named: [String: TokenSpec] = [:]
        var extras: [TokenSpec] = []
        var decoderTokens: [TokenSpec] = []

        if let (config, configFile) = tokenizerConfig {
            guard config.members != nil else { throw FileError(configFile, "is not a JSON object") }
            for key in Self.namedKeys {
                if let value = config[key], !value.isNull { named[key] = try Self.token(value, key: key, file: configFile) }
            }
            extras = try Self.tokenList(config, file: configFile)
            if let decoder = config["added_tokens_decoder"], !decoder.isNull {
                guard let entries = decoder.members else { throw FileError(configFile, "added_tokens_decoder is not an object") }
                var byId: [(Int, TokenSpec)] = []
                for (key, value) in entries {
                    guard let id = Int(key) else { throw FileError(configFile, "added_tokens_decoder key \(JSON.quote(key)) is not an id") }
                    byId.append((id, try Self.token(value, key: "added_tokens_decoder[\(key)]", file: configFile, special: false)))
                }
                decoderTokens = byId.sorted { $0.0 < $1.0 }.map(\.1)
                // The named tokens take their flags from the decoder entry of the same content.
                for (key, spec) in named {
                    if let entry = decoderTokens.first(where: { $0.content == spec.content }) { named[key] = entry }
                }
            }
            if let value = config["model_max_length"], !value.isNull {
                guard let n = value.int, n >= 2, n <= 1 << 20 else {
                    throw FileError(configFile, "model_max_length \(value) is not a length between 2 and \(1 << 20)")
                }
                modelMaxLength = n
            }
        }
        if decoderTokens.isEmpty && !fileAddedTokens.isEmpty {
            decoderTokens = fileAddedTokens.sorted { $0.id < $1.id }.map(\.token)
            for (key, spec) in named {
                if let entry = decoderTokens.first(where: { $0.content == spec.content }) { named[key] = entry }
            }
        }
        // transformers reads special_tokens_map.json only when there is no added_tokens_decoder.
        if decoderTokens.isEmpty, let (map, mapFile) = specialTokensMap {
            guard map.members != nil else { throw FileError(mapFile, "is not a JSON object") }
            for key in Self.namedKeys {
                if let value = map[key], !value.isNull { named[key] = try Self.token(value, key: key, file: mapFile) }
            }
            for token in try Self.tokenList(map, file: mapFile) where !extras.contains(token) { extras.append(token) }
        }

        bos = named["bos_token"] ?? bos
        eos = named["eos_token"] ?? eos
        unk = named["unk_token"] ?? unk
        pad = named["pad_token"] ?? pad
        named["bos_token"] = bos
        named["eos_token"] = eos
        named["unk_token"] = unk
        named["pad_token"] = pad
        added = decoderTokens + Self.namedKeys.compactMap { named[$0] } + extras
    }

    /// A token given as a string, or as an object (an AddedToken) with `content` and flags.
    static func token(_ value: JSON, key: String, file: String, special defaultSpecial: Bool = true) throws -> TokenSpec {
        if let content = value.string { return TokenSpec(content: content, special: true, normalized: false) }
        guard value.members != nil, let content = value["content"]?.string else {
            throw FileError(file, "\(key) is neither a string nor an object with a \"content\" string")
        }
        for flag in ["lstrip", "rstrip", "single_word"] where value[flag]?.bool == true {
            throw FileError(file, "\(key) (\(JSON.quote(content))) sets \(flag), which CLIP tokenizers do not use and this one does not support")
        }
        let special = value["special"]?.bool ?? defaultSpecial
        // AddedToken's default: special tokens are matched in the text as given.
        let normalized = value["normalized"]?.bool ?? !special
        return TokenSpec(content: content, special: special, normalized: normalized)
    }

    /// `additional_special_tokens` / `extra_special_tokens`, when given as a list.
    private static func tokenList(_ object: JSON, file: String) throws -> [TokenSpec] {
        var tokens: [TokenSpec] = []
        for key in extraKeys {
            guard let list = object[key]?.array else { continue }
            for (i, item) in list.enumerated() { tokens.append(try token(item, key: "\(key)[\(i)]", file: file)) }
        }
        return tokens
    }
}

extension CLIPTokenizer {
    /// CLIP's byte symbols (with and without `</w>`) and no merges: every character is its own
    /// token, 514 in all with `<|startoftext|>` and `<|endoftext|>`. For the built-in
    /// demonstration model, which has no trained vocabulary.
    public static func byteLevel(modelMaxLength: Int = defaultModelMaxLength) throws -> CLIPTokenizer {
        var tokens = ByteLevel.vocabularyOrder.map(ByteLevel.symbol)
        tokens += tokens.map { $0 + "</w>" }
        tokens += ["<|startoftext|>", "<|endoftext|>"]
        var vocab: [String: Int] = [:]
        for (id, token) in tokens.enumerated() { vocab[token] = id }
        func special(_ content: String) -> TokenSpec { TokenSpec(content: content, special: true, normalized: false) }
        return try CLIPTokenizer(vocab: vocab, vocabFile: "byte-level vocabulary", merges: [], mergesFile: "no merges",
                                 bos: special("<|startoftext|>"), eos: special("<|endoftext|>"), unk: special("<|endoftext|>"),
                                 pad: special("<|endoftext|>"), added: [], modelMaxLength: modelMaxLength)
    }
}

/// A tokenizers-library `tokenizer.json` holding a CLIP BPE model: its vocabulary, merges (as
/// "a b" strings or, from tokenizers 0.20 on, as pairs) and added tokens.
struct TokenizerJSON {
    var vocab: [String: Int]
    var merges: [CLIPTokenizer.Merge]
    var addedTokens: [(id: Int, token: CLIPTokenizer.TokenSpec)]

    init(path: String) throws {
        let json = try Files.readJSON(path)
        guard let model = json["model"], model.members != nil else { throw FileError(path, "has no \"model\" object") }
        guard model["type"]?.string == "BPE", model["end_of_word_suffix"]?.string == "</w>" else {
            throw FileError(path, "model is \(model["type"]?.string ?? "untyped") without CLIP's \"</w>\" word suffix; "
                                  + "only CLIP's BPE tokenizer is supported")
        }
        guard let members = model["vocab"]?.members, !members.isEmpty else { throw FileError(path, "model.vocab is not a token → id object") }
        vocab = [:]
        vocab.reserveCapacity(members.count)
        for (token, value) in members {
            guard let id = value.int, id >= 0, id < 1 << 24 else {
                throw FileError(path, "model.vocab: token \(JSON.quote(token)) has id \(value), not an integer in 0..<\(1 << 24)")
            }
            vocab[token] = id
        }
        guard let list = model["merges"]?.array else { throw FileError(path, "model.merges is not a list") }
        merges = try list.enumerated().map { i, item in
            if let pair = item.array, pair.count == 2, let left = pair[0].string, let right = pair[1].string {
                return CLIPTokenizer.Merge(left: left, right: right, line: i + 1)
            }
            if let text = item.string { return try CLIPTokenizer.parseMerge(Array(text.utf8)[...], line: i + 1, file: path + " model.merges") }
            throw FileError(path, "model.merges[\(i)] is neither a pair of strings nor \"a b\"")
        }
        addedTokens = try (json["added_tokens"]?.array ?? []).enumerated().map { i, item in
            guard let id = item["id"]?.int else { throw FileError(path, "added_tokens[\(i)] has no integer id") }
            return (id, try SpecialTokensConfig.token(item, key: "added_tokens[\(i)]", file: path, special: false))
        }
    }
}
