import DiffuseCore
import DiffuseModels
import DiffuseGraph
import DiffuseTokenizer

/// AUTOMATIC1111's prompt syntax and long prompts, as diffusers' community pipeline
/// `lpw_stable_diffusion` ("long prompt weighting") computes them in
/// `get_weighted_text_embeddings`: `(words)` weighs them 1.1, `[words]` 1/1.1, `(words:1.3)` 1.3
/// (nesting multiplies), `\(` and the like are literal. Each weighted piece is tokenized on its
/// own; a prompt longer than the encoder's 75 tokens runs as up to `maxChunks` windows of 75,
/// each with its own BOS and EOS, whose states are concatenated (so the UNet attends over 77·k
/// tokens). Each token's state is multiplied by its weight and the whole rescaled to the mean it
/// had before, which keeps the image's overall strength.
public enum PromptWeighting {
    /// `parse_prompt_attention`: the text in pieces with their weights, neighbours of equal
    /// weight merged, at least one piece.
    public static func parse(_ text: String) throws -> [(text: String, weight: Double)] {
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
                pieces.append((String(String.UnicodeScalarView(s[i..<j])), 1))
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
    static func tokens(_ prompt: String, tokenizer: CLIPTokenizer, maxTokens: Int) throws -> (ids: [Int], weights: [Double], truncated: Bool) {
        var ids: [Int] = [], weights: [Double] = []
        for (text, weight) in try parse(prompt) {
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
    /// in float32 as torch does: the means over sequence and width).
    static func applyWeights(_ states: Tensor, _ weights: [Double]) -> Tensor {
        let (sequence, width) = (states.shape[1], states.shape[2])
        precondition(states.shape[0] == 1 && weights.count == sequence)
        let out = states.copy()
        let x = out.floats
        func mean() -> Float {
            var sum = 0.0
            for e in 0..<(sequence * width) { sum += Double(x[e]) }
            return Float(sum / Double(sequence * width))
        }
        let before = mean()
        for t in 0..<sequence {
            let w = Float(weights[t])
            for d in 0..<width { x[t * width + d] *= w }
        }
        let ratio = before / mean()
        for e in 0..<(sequence * width) { x[e] *= ratio }
        return out
    }
}

extension StableDiffusionPipeline {
    /// What `lpw_stable_diffusion` covers: SD 1.x/2.x's one text encoder, up to `maxPromptChunks`.
    func validatePromptWeighting(_ r: GenerationRequest) throws {
        if components.isXL {
            throw PipelineError("prompt weighting follows diffusers' lpw_stable_diffusion, which is for SD 1.x/2.x's one text encoder; "
                                + "\(components.name) is an SDXL model (lpw_stable_diffusion_xl is not implemented)")
        }
        guard r.maxPromptChunks >= 1 else {
            throw PipelineError("max prompt chunks must be at least 1 window of 75 tokens (got \(r.maxPromptChunks))")
        }
    }

    /// The request's prompt and negative prompt, weighted (see `encodeWeightedPromptSD`).
    func encodeWeightedPrompt(_ r: GenerationRequest, count: Int, guidance: Bool) throws -> PromptEmbeddings {
        try validatePromptWeighting(r)
        try refuseSecondPrompt(r.prompt2, r.negativePrompt2)
        return try encodeWeightedPromptSD(r.prompt, negative: r.negativePrompt, count: count, guidance: guidance,
                                          clipSkip: r.clipSkip, maxChunks: r.maxPromptChunks)
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
