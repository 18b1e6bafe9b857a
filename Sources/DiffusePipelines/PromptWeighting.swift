import DiffuseCore
import DiffuseModels
import DiffuseGraph
import DiffuseTokenizer

/// AUTOMATIC1111's prompt syntax and long prompts: `(words)` weighs them 1.1, `[words]` 1/1.1,
/// `(words:1.3)` 1.3 (nesting multiplies), `\(` and the like are literal. Each weighted piece is
/// tokenized on its own and a prompt longer than the encoder's 75 tokens runs as windows of 75,
/// each with its own BOS and EOS, whose states are concatenated (so the UNet attends over 77·k
/// tokens). Two encodings, each the one diffusers users have for their models:
/// - SD 1.x/2.x: the community pipeline `lpw_stable_diffusion` (`get_weighted_text_embeddings`),
///   up to `max_embeddings_multiples` windows: each token's state times its weight, the whole
///   rescaled to the mean it had before, which keeps the image's overall strength.
/// - SDXL: sd_embed's `get_weighted_text_embeddings_sdxl`, which diffusers' prompt weighting guide
///   uses: both encoders' penultimate states side by side, each weighted token's state times its
///   weight (in float16, as sd_embed makes the weights), no rescaling, no window limit, the pooled
///   state the second encoder's of the last window. The refiner (the second encoder alone) is
///   `get_weighted_text_embeddings_sdxl_refiner`, which moves a weighted token's state away from
///   its window's last one instead.
public enum PromptWeighting {
    /// `parse_prompt_attention`: the text in pieces with their weights, neighbours of equal
    /// weight merged, at least one piece. sd_embed's (`splitsBreak`) also splits plain text at
    /// the word BREAK (with the spaces around it), which it keeps as the piece "BREAK" of weight
    /// −1: not AUTOMATIC1111's window break, but the word "break" with its state negated.
    public static func parse(_ text: String, splitsBreak: Bool = false) throws -> [(text: String, weight: Double)] {
        var pieces: [(text: String, weight: Double)] = []
        var round: [Int] = [], square: [Int] = []
        func multiply(from start: Int, by factor: Double) {
            for p in start..<pieces.count { pieces[p].weight *= factor }
        }
        let s = Array(text.unicodeScalars)
        var i = 0
        while i < s.count {
            let c = s[i]
            if c == "\\" {
                // `\(`, `\)`, `\[`, `\]`, `\\` are the character; a lone backslash is nothing.
                if i + 1 < s.count, "()[]\\".unicodeScalars.contains(s[i + 1]) {
                    pieces.append((String(s[i + 1]), 1))
                    i += 2
                } else {
                    pieces.append(("", 1))
                    i += 1
                }
            } else if c == "(" {
                round.append(pieces.count); i += 1
            } else if c == "[" {
                square.append(pieces.count); i += 1
            } else if c == ":" {
                // `:1.3)` closes a round bracket with that weight; otherwise ':' is text.
                if let (number, end) = weightSuffix(s, from: i + 1) {
                    let literal = String(String.UnicodeScalarView(s[i..<end]))
                    if let open = round.popLast() {
                        guard let weight = Double(number) else {
                            throw PipelineError("prompt weighting: the weight '\(number)' in \"\(text)\" is not a number")
                        }
                        multiply(from: open, by: weight)
                    } else {
                        pieces.append((literal, 1))
                    }
                    i = end
                } else {
                    pieces.append((":", 1)); i += 1
                }
            } else if c == ")" {
                if let open = round.popLast() { multiply(from: open, by: 1.1) } else { pieces.append((")", 1)) }
                i += 1
            } else if c == "]" {
                if let open = square.popLast() { multiply(from: open, by: 1 / 1.1) } else { pieces.append(("]", 1)) }
                i += 1
            } else {
                var j = i
                while j < s.count, !"\\()[]:".unicodeScalars.contains(s[j]) { j += 1 }
                let parts = splitsBreak ? splitAtBreak(Array(s[i..<j])) : [Array(s[i..<j])]
                for (p, part) in parts.enumerated() {
                    if p > 0 { pieces.append(("BREAK", -1)) }
                    pieces.append((String(String.UnicodeScalarView(part)), 1))
                }
                i = j
            }
        }
        for open in round { multiply(from: open, by: 1.1) }
        for open in square { multiply(from: open, by: 1 / 1.1) }
        if pieces.isEmpty { pieces = [("", 1)] }
        var merged: [(text: String, weight: Double)] = []
        for piece in pieces {
            if let last = merged.last, last.weight == piece.weight {
                merged[merged.count - 1].text += piece.text
            } else {
                merged.append(piece)
            }
        }
        return merged
    }

    /// Python's `re.split(r"\s*\bBREAK\b\s*", text)`: the text between the matches, an empty
    /// piece where a match starts or ends it.
    static func splitAtBreak(_ s: [Unicode.Scalar]) -> [[Unicode.Scalar]] {
        // Python's `\w` and `\s` on str: letters, digits, numerics and '_'; str.isspace().
        func isWord(_ c: Unicode.Scalar) -> Bool {
            if c == "_" || c.properties.numericType != nil { return true }
            switch c.properties.generalCategory {
            case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: return true
            default: return false
            }
        }
        func isSpace(_ c: Unicode.Scalar) -> Bool { c.properties.isWhitespace || (0x1C...0x1F).contains(c.value) }
        let keyword = Array("BREAK".unicodeScalars)
        var parts: [[Unicode.Scalar]] = [], start = 0, k = 0
        while k + keyword.count <= s.count {
            if Array(s[k..<(k + keyword.count)]) == keyword, k == 0 || !isWord(s[k - 1]),
               k + keyword.count == s.count || !isWord(s[k + keyword.count]) {
                var from = k, to = k + keyword.count
                while from > start, isSpace(s[from - 1]) { from -= 1 }
                while to < s.count, isSpace(s[to]) { to += 1 }
                parts.append(Array(s[start..<from]))
                start = to
                k = to
            } else {
                k += 1
            }
        }
        return parts + [Array(s[start...])]
    }

    /// After a ':', `[+-]?[.\d]+` then ')': the number (decimal digits of any script, as
    /// Python's `\d` and `float` read them) and the index after the ')'.
    private static func weightSuffix(_ s: [Unicode.Scalar], from start: Int) -> (String, Int)? {
        var j = start, number = ""
        if j < s.count, s[j] == "+" || s[j] == "-" { number.unicodeScalars.append(s[j]); j += 1 }
        let digitsStart = j
        while j < s.count {
            if s[j] == "." {
                number += "."
            } else if s[j].properties.numericType == .decimal, let v = s[j].properties.numericValue {
                number += String(Int(v))
            } else {
                break
            }
            j += 1
        }
        guard j > digitsStart, j < s.count, s[j] == ")" else { return nil }
        return (number, j + 1)
    }

    /// `get_prompts_with_weights` for one prompt: each piece tokenized on its own (no BOS/EOS),
    /// the tokens and their weights, cut at `maxTokens`.
    static func tokens(_ prompt: String, tokenizer: CLIPTokenizer, maxTokens: Int = .max,
                       splitsBreak: Bool = false) throws -> (ids: [Int], weights: [Double], truncated: Bool) {
        var ids: [Int] = [], weights: [Double] = []
        for (text, weight) in try parse(prompt, splitsBreak: splitsBreak) {
            let piece = tokenizer.encode(text)
            ids += piece
            weights += Array(repeating: weight, count: piece.count)
            if ids.count > maxTokens { break }
        }
        let truncated = ids.count > maxTokens
        return (Array(ids.prefix(maxTokens)), Array(weights.prefix(maxTokens)), truncated)
    }

    /// The windows a set of prompts takes: enough for the longest, at most `maxChunks`.
    static func chunkCount(_ lengths: [Int], window: Int, maxChunks: Int) -> Int {
        max(1, min(maxChunks, ((lengths.max() ?? 0) - 1) / window + 1))
    }

    /// `pad_tokens_and_weights` (with BOS/EOS kept in every window): `[bos] + ids + pads + [eos]`
    /// over `window·chunks + 2` positions, and per window `[1] + its weights + [1]`, padded with 1.
    static func padded(_ ids: [Int], _ weights: [Double], chunks: Int, window: Int,
                       bos: Int, eos: Int, pad: Int) -> (ids: [Int], weights: [Double]) {
        let length = window * chunks + 2
        let paddedIds = [bos] + ids + Array(repeating: pad, count: length - 2 - ids.count) + [eos]
        let chunkLength = window + 2
        var w: [Double] = []
        for j in 0..<chunks {
            w.append(1)
            if j * window < weights.count { w += weights[(j * window)..<min(weights.count, (j + 1) * window)] }
            w.append(1)
        }
        w += Array(repeating: 1, count: max(0, chunkLength * chunks - w.count))
        return (paddedIds, Array(w.prefix(chunkLength * chunks)))
    }

    /// The window `j` of padded ids: 77 ids from `j·75`, the first made BOS and the last EOS.
    static func window(_ padded: [Int], _ j: Int, window: Int) -> [Int] {
        var ids = Array(padded[(j * window)..<(j * window + window + 2)])
        ids[0] = padded[0]
        ids[ids.count - 1] = padded[padded.count - 1]
        return ids
    }

    /// Each token's state times its weight, then the whole rescaled to its mean before (per row,
    /// in float32 as torch does: the means over sequence and width, summed in torch's order).
    static func applyWeights(_ states: Tensor, _ weights: [Double]) -> Tensor {
        let (sequence, width) = (states.shape[1], states.shape[2])
        precondition(states.shape[0] == 1 && weights.count == sequence)
        let out = states.copy()
        let x = out.floats
        func mean() -> Float { TorchSum.sum(UnsafeBufferPointer(start: x, count: sequence * width)) / Float(sequence * width) }
        let before = mean()
        for t in 0..<sequence {
            let w = Float(weights[t])
            for d in 0..<width { x[t * width + d] *= w }
        }
        let ratio = before / mean()
        for e in 0..<(sequence * width) { x[e] *= ratio }
        return out
    }

    /// sd_embed's windows (`group_tokens_and_weights` with `pad_last_block=True`) of tokens and
    /// their weights, first padded with `pad` (weight 1) to `length` and cut there:
    /// `[bos] + 75 tokens + [eos]`, the last filled with EOS to the same 77, weight 1 at BOS, EOS
    /// and fill; each weight as float16 (`halfWeights`, as most of sd_embed's functions make
    /// them) or float32.
    static func sdEmbedWindows(ids: [Int], weights: [Double], length: Int, pad: Int, tokenizer: CLIPTokenizer,
                               halfWeights: Bool) -> [(ids: [Int], weights: [Float])] {
        let window = tokenizer.modelMaxLength - 2
        let missing = max(0, length - ids.count)
        let ids = Array((ids + Array(repeating: pad, count: missing)).prefix(length))
        let weights = Array((weights + Array(repeating: 1, count: missing)).prefix(length))
        return stride(from: 0, to: length, by: window).map { start in
            let end = min(length, start + window), fill = window - (end - start)
            return (ids: [tokenizer.bosTokenId] + ids[start..<end] + Array(repeating: tokenizer.eosTokenId, count: fill + 1),
                    weights: [1] + weights[start..<end].map { halfWeights ? Float(Float16($0)) : Float($0) } + Array(repeating: 1, count: fill + 1))
        }
    }

    /// sd_embed's weighting of one window's states [1, 77, D], in float32 as torch computes it: a
    /// weighted token's state times its weight, or (`towardsLast`, its refiner function's) the
    /// window's last state plus the difference from it times the weight.
    static func applyWindowWeights(_ states: Tensor, _ weights: [Float], towardsLast: Bool) -> Tensor {
        let (sequence, width) = (states.shape[1], states.shape[2])
        precondition(states.shape[0] == 1 && weights.count == sequence)
        let out = states.copy()
        let x = out.floats
        let last = (sequence - 1) * width
        for t in 0..<sequence where weights[t] != 1 {
            let w = weights[t]
            for d in 0..<width {
                let i = t * width + d
                x[i] = towardsLast ? x[last + d] + (x[i] - x[last + d]) * w : x[i] * w
            }
        }
        return out
    }
}

extension StableDiffusionPipeline {
    /// lpw_stable_diffusion's default window limit (`max_embeddings_multiples`); sd_embed has none.
    static let lpwMaxPromptChunks = 3

    /// What both weighted encodings refuse: a window limit under 1.
    func validatePromptWeighting(_ r: GenerationRequest) throws {
        if let n = r.maxPromptChunks, n < 1 {
            throw PipelineError("max prompt chunks must be at least 1 window of 75 tokens (got \(n))")
        }
    }

    /// The request's prompt and negative prompt, weighted (`encodeWeightedPromptSD`, or
    /// `encodeWeightedPromptXL` for SDXL).
    func encodeWeightedPrompt(_ r: GenerationRequest, count: Int, guidance: Bool) throws -> PromptEmbeddings {
        try validatePromptWeighting(r)
        if components.isXL {
            return try encodeWeightedPromptXL(r, count: count, guidance: guidance)
        }
        try refuseSecondPrompt(r.prompt2, r.negativePrompt2)
        return try encodeWeightedPromptSD(r.prompt, negative: r.negativePrompt, count: count, guidance: guidance,
                                          clipSkip: r.clipSkip, maxChunks: r.maxPromptChunks ?? Self.lpwMaxPromptChunks)
    }

    /// sd_embed's SDXL encodings, their four outputs handed to diffusers' SDXL pipeline:
    /// - `get_weighted_text_embeddings_sdxl(pipe, prompt, neg_prompt, clip_skip=)`: one prompt for
    ///   both encoders, each weighted token's state times its float16 weight;
    /// - `get_weighted_text_embeddings_sdxl_2p` when a second prompt is given (`prompt_2 or
    ///   prompt` for the second encoder, the same for the negatives): every text padded to the
    ///   longest, each encoder's states weighted by its own text's float32 weights, a weighted
    ///   state moved away from its window's last one;
    /// - `get_weighted_text_embeddings_sdxl_refiner` for a model with the second encoder alone:
    ///   the prompt, float16 weights, moved away from the window's last state.
    /// Each encoder gives hidden_states[-(clip_skip + 2)] per window, side by side, the windows
    /// joined; the pooled state is the second encoder's text_embeds of the last window. sd_embed
    /// encodes an empty text as the word "empty"; with no negative prompt at all and
    /// `force_zeros_for_empty_prompt`, the negative is zeros, as the pipeline makes it when given
    /// no negative embeddings (diffusers' guide passes none). The windows are sd_embed's token
    /// ids but each tokenizer's own BOS, EOS and length (sd_embed writes CLIP's 49406, 49407 and
    /// 75, the same for every SDXL model).
    func encodeWeightedPromptXL(_ r: GenerationRequest, count: Int, guidance: Bool) throws -> PromptEmbeddings {
        let encoders = [components.textEncoder.map { ($0, "text_encoder") }, components.textEncoder2.map { ($0, "text_encoder_2") }]
            .compactMap { $0 }
        guard let padId = encoders.first?.0.tokenizer.eosTokenId else { throw PipelineError("\(components.name) has no text encoder") }
        let twoPrompts = encoders.count == 2 && (r.prompt2 != nil || r.negativePrompt2 != nil)
        // Python's `prompt_2 or prompt`, then sd_embed's stand-in for an empty text.
        let first = [r.prompt, r.negativePrompt ?? ""]
        let texts = encoders.indices.map { e in
            (e == 1 && twoPrompts ? [Self.given(r.prompt2, else: first[0]), Self.given(r.negativePrompt2, else: first[1])] : first)
                .map { $0.isEmpty ? "empty" : $0 }
        }
        if try texts.joined().contains(where: { try PromptWeighting.parse($0, splitsBreak: true).contains { $0.text == "BREAK" } }) {
            Log.warning("prompt weighting on SDXL follows sd_embed, which reads BREAK as the word \"break\" weighted -1, not as AUTOMATIC1111's window break")
        }
        let encodeNegative = guidance && !(r.negativePrompt == nil && r.negativePrompt2 == nil && components.forceZerosForEmptyPrompt)
        let layer: CLIPTextOutput = .hiddenState(-((r.clipSkip ?? 0) + 2))
        let tokenized = try encoders.indices.map { e in
            try texts[e].map { try PromptWeighting.tokens($0, tokenizer: encoders[e].0.tokenizer, splitsBreak: true) }
        }
        // Prompt and negative are padded to one length per encoder; the two-prompt function pads all four to one.
        var lengths = tokenized.map { $0.map(\.ids.count).max()! }
        if twoPrompts { lengths = lengths.map { _ in lengths.max()! } }
        guard lengths[0] > 0 else {
            throw PipelineError("prompt weighting: neither the prompt \"\(r.prompt)\" nor the negative prompt has a token to encode")
        }
        let window = encoders[0].0.tokenizer.modelMaxLength - 2
        if let n = r.maxPromptChunks, lengths.max()! > n * window {
            Log.warning("the prompt or negative prompt is longer than \(n) windows of \(window) tokens and was truncated; raise --max-prompt-chunks")
            lengths = lengths.map { min($0, n * window) }
        }
        let refiner = components.textEncoder == nil
        var states: [Tensor] = [], pooledRows: Tensor?
        var windows: [[[(ids: [Int], weights: [Float])]]] = []  // per encoder, per text
        for (e, (te, key)) in encoders.enumerated() {
            let made = tokenized[e].map {
                PromptWeighting.sdEmbedWindows(ids: $0.ids, weights: $0.weights, length: lengths[e], pad: padId,
                                               tokenizer: te.tokenizer, halfWeights: !twoPrompts)
            }
            if e > 0, made.map(\.count) != windows[0].map(\.count) {
                throw PipelineError("prompt weighting: \(components.name)'s two tokenizers split the prompt into different numbers of tokens")
            }
            windows.append(made)
            let rows = made[0].map(\.ids) + (encodeNegative ? made[1].map(\.ids) : [])
            let pooled = key == "text_encoder_2"
            let out = try runTextEncoder(te, key, ids: rows, outputs: pooled ? [layer, .textEmbeds] : [layer])
            states.append(out[layer]!)
            if pooled { pooledRows = out[.textEmbeds] }
        }
        /// Text `t`'s windows, from row `first` of the encoders' outputs: each encoder's weighted
        /// (by its own weights with two prompts, else the first encoder's), side by side, joined.
        func embeddings(_ t: Int, first: Int) -> (hidden: Tensor, pooled: Tensor) {
            let joined = windows[0][t].indices.map { i in
                concatenate(states.indices.map { e in
                    PromptWeighting.applyWindowWeights(states[e].slice((first + i)..<(first + i + 1)),
                                                       windows[twoPrompts ? e : 0][t][i].weights, towardsLast: twoPrompts || refiner)
                }, axis: 2)
            }
            let last = first + windows[0][t].count - 1
            return (concatenate(joined, axis: 1), pooledRows!.slice(last..<(last + 1)))
        }
        let positive = embeddings(0, first: 0)
        var hidden = Array(repeating: positive.hidden, count: count), pooled = Array(repeating: positive.pooled, count: count)
        if guidance {
            let negative = encodeNegative ? embeddings(1, first: windows[0][0].count)
                : (hidden: Tensor(zeros: positive.hidden.shape), pooled: Tensor(zeros: positive.pooled.shape))
            hidden = Array(repeating: negative.hidden, count: count) + hidden
            pooled = Array(repeating: negative.pooled, count: count) + pooled
        }
        return PromptEmbeddings(hidden: concatenate(hidden, axis: 0), pooled: concatenate(pooled, axis: 0))
    }

    /// `lpw_stable_diffusion`'s `_encode_prompt` (its `get_weighted_text_embeddings` with
    /// `max_embeddings_multiples = maxChunks`): the prompt's and, under guidance, the negative
    /// prompt's ("" when none) weighted states, both through `clip_skip` as it does, with as
    /// many windows as the longer needs.
    func encodeWeightedPromptSD(_ prompt: String, negative: String?, count: Int, guidance: Bool, clipSkip: Int?,
                                maxChunks: Int) throws -> PromptEmbeddings {
        guard let te = components.textEncoder else { throw PipelineError("\(components.name) has no text encoder") }
        let tokenizer = te.tokenizer
        let window = tokenizer.modelMaxLength - 2
        let texts = guidance ? [prompt, negative ?? ""] : [prompt]
        let tokenized = try texts.map { try PromptWeighting.tokens($0, tokenizer: tokenizer, maxTokens: window * maxChunks) }
        for (text, t) in zip(texts, tokenized) where t.truncated {
            Log.warning("the prompt \"\(text.prefix(60))…\" is longer than \(maxChunks) windows of \(window) tokens and was truncated; raise --max-prompt-chunks")
        }
        let chunks = PromptWeighting.chunkCount(tokenized.map(\.ids.count), window: window, maxChunks: maxChunks)
        let output: CLIPTextOutput = clipSkip.map { .normalizedHiddenState(-($0 + 1)) } ?? .lastHiddenState
        var rows: [Tensor] = []
        for t in tokenized {
            let (ids, weights) = PromptWeighting.padded(t.ids, t.weights, chunks: chunks, window: window, bos: tokenizer.bosTokenId,
                                                        eos: tokenizer.eosTokenId, pad: tokenizer.padTokenId)
            let windows = (0..<chunks).map { PromptWeighting.window(ids, $0, window: window) }
            let states = try runTextEncoder(te, "text_encoder", ids: chunks == 1 ? [ids] : windows, outputs: [output])[output]!
            // The windows side by side: [chunks, 77, D] -> [1, 77·chunks, D].
            let joined = concatenate((0..<chunks).map { states.slice($0..<($0 + 1)) }, axis: 1)
            rows.append(PromptWeighting.applyWeights(joined, weights))
        }
        var hidden = Array(repeating: rows[0], count: count)
        if guidance { hidden = Array(repeating: rows[1], count: count) + hidden }
        return PromptEmbeddings(hidden: concatenate(hidden, axis: 0), pooled: nil)
    }
}
