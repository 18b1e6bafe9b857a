import DiffuseCore
import DiffuseGraph

/// An IP-Adapter's image projection, read from the adapter file's `image_proj.*` tensors as
/// diffusers' `_convert_ip_adapter_image_proj_to_diffusers` recognises them:
///
/// - IP-Adapter (`image_proj.proj.weight`): diffusers' `ImageProjection`. The image encoder's
///   `image_embeds` [B, D] become 4 tokens: `proj`, reshape, LayerNorm `norm`.
/// - IP-Adapter Full (`image_proj.proj.3.weight`, full-face): diffusers'
///   `IPAdapterFullImageProjection`, every token of the penultimate hidden states through a GELU
///   MLP (`proj.0`, `proj.2`) and a LayerNorm (`proj.3`).
/// - IP-Adapter Plus (`image_proj.latents`): diffusers' `IPAdapterPlusImageProjection`, a
///   perceiver resampler over the encoder's penultimate hidden states [B, N, D]: learned
///   `latents` queries, `proj_in`, 4 blocks (LayerNorms `norm1`/`norm2` of the features and of
///   the queries, attention of the queries to both, heads of 64 channels, then a LayerNorm +
///   GELU MLP), `proj_out`, `norm_out`.
///
/// Weights keep the original file's names (`image_proj.…`); the fused `to_kv` is one matrix
/// product whose output is split, where diffusers splits the weight.
/// Graph input: `image_embeds`; output: `image_tokens` [B, tokens, cross_attention_dim].
public struct IPAdapterImageProjection: ModelComponent, Sendable {
    public static let className = "IP-Adapter image projection"
    public static let input = "image_embeds"
    public static let output = "image_tokens"

    public enum Kind: Sendable, Equatable {
        /// `ImageProjection`: `tokens` tokens from the pooled image embedding.
        case imageProjection(imageEmbedDim: Int, tokens: Int)
        /// `IPAdapterPlusImageProjection`: `queries` tokens resampled from the hidden states.
        case plus(embedDims: Int, hiddenDims: Int, queries: Int, heads: Int, depth: Int)
        /// `IPAdapterFullImageProjection` (full-face): every hidden state becomes a token.
        case full(embedDims: Int)
    }

    public let kind: Kind
    public let crossAttentionDim: Int
    public let parameters: [ParameterDeclaration]

    /// Recognises the projection from the adapter file's tensors (`origin` names the file in errors).
    public init(weights: TensorSource) throws {
        func shape(_ name: String) throws -> [Int] {
            guard let info = weights.info(name) else { throw WeightError.missing(tensor: name, origin: weights.origin) }
            return info.shape
        }
        let origin = weights.origin
        if weights.info("image_proj.proj.weight") != nil {
            // diffusers 0.42 always makes 4 tokens here (the published adapters' clip_extra_context_tokens).
            let w = try shape("image_proj.proj.weight")
            guard w.count == 2, w[0] % 4 == 0 else {
                throw IPAdapterError("\(origin): image_proj.proj.weight has shape \(w), not [4 × cross_attention_dim, image_embed_dim]")
            }
            kind = .imageProjection(imageEmbedDim: w[1], tokens: 4)
            crossAttentionDim = w[0] / 4
        } else if weights.info("image_proj.latents") != nil {
            let latents = try shape("image_proj.latents"), proj = try shape("image_proj.proj_in.weight")
            let out = try shape("image_proj.proj_out.weight"), q = try shape("image_proj.layers.0.0.to_q.weight")
            guard latents.count == 3, latents[0] == 1, proj.count == 2, out.count == 2, q.count == 2, q[0] % 64 == 0, q[0] > 0 else {
                throw IPAdapterError("\(origin): the IP-Adapter Plus resampler's shapes do not fit (latents \(latents), proj_in \(proj), proj_out \(out), to_q \(q))")
            }
            // diffusers builds the resampler with 4 blocks and 64-channel heads whatever the file holds.
            kind = .plus(embedDims: proj[1], hiddenDims: latents[2], queries: latents[1], heads: q[0] / 64, depth: 4)
            crossAttentionDim = out[0]
        } else if weights.info("image_proj.proj.3.weight") != nil {
            let first = try shape("image_proj.proj.0.weight"), norm = try shape("image_proj.proj.3.weight")
            guard first.count == 2, norm.count == 1 else {
                throw IPAdapterError("\(origin): the IP-Adapter Full projection's shapes do not fit (proj.0 \(first), proj.3 \(norm))")
            }
            kind = .full(embedDims: first[0])
            crossAttentionDim = norm[0]
        } else if weights.info("image_proj.perceiver_resampler.proj_in.weight") != nil || weights.info("image_proj.norm.weight") != nil {
            throw IPAdapterError("\(origin) is an IP-Adapter FaceID file (it needs InsightFace embeddings), which is not supported")
        } else {
            throw IPAdapterError("\(origin) has no IP-Adapter image projection (no image_proj.proj.weight or image_proj.latents)")
        }
        let kind = self.kind, crossAttentionDim = self.crossAttentionDim
        parameters = try probeParameters { Self.emit($0, kind, crossAttentionDim: crossAttentionDim, batch: 1, sequence: 1) }
    }

    /// What the projection reads from the image encoder: the pooled `image_embeds`, or the
    /// penultimate hidden states (diffusers' `output_hidden_states` for every other projection).
    public var imageEncoderOutput: CLIPVisionOutput {
        if case .imageProjection = kind { return .imageEmbeds }
        return .penultimateHiddenState
    }

    /// Tokens per image; nil when it is the image encoder's sequence length (Full).
    public var tokens: Int? {
        switch kind {
        case .imageProjection(_, let t): return t
        case .plus(_, _, let q, _, _): return q
        case .full: return nil
        }
    }

    /// The width of what the projection reads: `image_embeds`' or the hidden states'.
    public var imageEmbedDim: Int {
        switch kind {
        case .imageProjection(let d, _), .plus(let d, _, _, _, _), .full(let d): return d
        }
    }

    /// The graph for `batch` images; `sequence` is the hidden states' length (Plus only).
    public func graph(batch: Int, sequence: Int = 1) throws -> Graph {
        try buildGraph { Self.emit($0, kind, crossAttentionDim: crossAttentionDim, batch: batch, sequence: sequence) }
    }

    /// The input, the forward pass and the output, into `b`.
    static func emit(_ b: GraphBuilder, _ kind: Kind, crossAttentionDim: Int, batch: Int, sequence: Int) {
        let x: Value
        switch kind {
        case .imageProjection(let d, _): x = b.input(input, shape: [batch, d])
        case .plus(let d, _, _, _, _), .full(let d): x = b.input(input, shape: [batch, sequence, d])
        }
        b.output(output, forward(Params(b)["image_proj"], kind, crossAttentionDim: crossAttentionDim, x))
    }

    static func forward(_ p: Params, _ kind: Kind, crossAttentionDim c: Int, _ x: Value) -> Value {
        let batch = x.shape[0]
        switch kind {
        case .imageProjection(let d, let tokens):
            let proj = Linear(p["proj"], d, tokens * c)
            let norm = LayerNorm(p["norm"], c)
            return p.scope { norm(proj(x).reshape([batch, tokens, c])) }
        case .full(let d):
            let proj0 = Linear(p["proj"][0], d, d), proj2 = Linear(p["proj"][2], d, c), norm = LayerNorm(p["proj"][3], c)
            return p.scope { norm(proj2(proj0(x).gelu())) }
        case .plus(let d, let hidden, let queries, let heads, let depth):
            let inner = heads * 64
            let latentsWeight = p.weight("latents", [1, queries, hidden])
            let projIn = Linear(p["proj_in"], d, hidden)
            let features = p["proj_in"].scope { projIn(x) }
            var latents = Value.concat(Array(repeating: latentsWeight, count: batch), axis: 0)
            for i in 0..<depth {
                let a = p["layers"][i][0], ff = p["layers"][i][1]
                let norm1 = LayerNorm(a["norm1"], hidden), norm2 = LayerNorm(a["norm2"], hidden)
                let toQ = Linear(a["to_q"], hidden, inner, bias: false)
                let toKV = Linear(a["to_kv"], hidden, 2 * inner, bias: false)
                let toOut = Linear(a["to_out"], inner, hidden, bias: false)
                let ffNorm = LayerNorm(ff[0], hidden)
                let ffIn = Linear(ff[1], hidden, 4 * hidden, bias: false), ffOut = Linear(ff[3], 4 * hidden, hidden, bias: false)
                latents = p["layers"][i].scope {
                    let residual = latents
                    let q = norm2(latents)
                    // The queries attend to the image features and to themselves.
                    let context = Value.concat([norm1(features), q], axis: 1)
                    let kv = toKV(context)
                    let k = kv.slice(axis: 2, start: 0, length: inner), v = kv.slice(axis: 2, start: inner, length: inner)
                    let attended = toOut(toQ(q).attention(k, v, heads: heads)) + residual
                    return ffOut(ffIn(ffNorm(attended)).gelu()) + attended
                }
            }
            let projOut = Linear(p["proj_out"], hidden, c), normOut = LayerNorm(p["norm_out"], c)
            return p.scope { normOut(projOut(latents)) }
        }
    }
}

/// An IP-Adapter file or setting that cannot be used, and why.
public struct IPAdapterError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// How strongly each of a UNet's cross-attention layers uses one IP-Adapter's tokens: one
/// number for all (diffusers' `set_ip_adapter_scale(0.6)`), or one per attention module, as
/// diffusers expands InstantStyle's per-block form (`{"up": {"block_0": [0.0, 1.0, 0.0]}}`).
public enum IPAdapterScale: Sendable, Equatable, CustomStringConvertible {
    case uniform(Float)
    /// Scale by attention-module path prefix (`down_blocks.2.attentions.1`,
    /// `mid_block.attentions.0`); layers under no listed module get 0.
    case perModule([String: Float])
    /// One scale per masked picture, in every layer (diffusers' `set_ip_adapter_scale([[0.7,
    /// 0.4]])` with `ip_adapter_masks`): picture i's masked attention output is scaled by entry i.
    case perImage([Float])

    public var description: String {
        switch self {
        case .uniform(let s): return "\(s)"
        case .perModule(let m): return "{" + m.sorted { $0.key < $1.key }.map { "\($0.key): \($0.value)" }.joined(separator: ", ") + "}"
        case .perImage(let list): return "\(list)"
        }
    }

    /// Every number it holds (for checks that they are finite).
    public var values: [Float] {
        switch self {
        case .uniform(let s): return [s]
        case .perModule(let m): return Array(m.values)
        case .perImage(let list): return list
        }
    }

    /// The scale of the cross-attention layer at `path` (e.g.
    /// `up_blocks.0.attentions.1.transformer_blocks.0.attn2`) for picture `image` of a masked
    /// adapter (the pictures share one scale unless it is `perImage`).
    public func scale(forLayer path: String, image: Int = 0) -> Float {
        switch self {
        case .uniform(let s): return s
        case .perModule(let modules):
            return modules.first { path == $0.key || path.hasPrefix($0.key + ".") }?.value ?? 0
        case .perImage(let list): return image < list.count ? list[image] : 0
        }
    }

    /// diffusers' per-block form (`_maybe_expand_lora_scales` with `default_scale=0.0`): `"down"`
    /// and `"up"` map `"block_<i>"` to a number or one number per attention of the block, or are
    /// one number for every block; `"mid"` is a number. Unnamed blocks get 0. Errors name the key.
    public static func blocks(_ spec: JSON, unet c: UNet2DConditionModel.Configuration) throws -> IPAdapterScale {
        guard let members = spec.members else { throw IPAdapterError("an IP-Adapter block scale must be a JSON object, not \(spec.serialized())") }
        var modules: [String: Float] = [:]
        let layers = c.layersPerDownBlock
        let sides: [(key: String, path: String, blocks: [Int], attentions: (Int) -> Int)] = [
            ("down", "down_blocks", c.downBlockTypes.indices.filter { UNet2DConditionModel.Configuration.blockName(c.downBlockTypes[$0]).hasPrefix("CrossAttn") },
             { layers[$0] }),
            ("up", "up_blocks", c.upBlockTypes.indices.filter { UNet2DConditionModel.Configuration.blockName(c.upBlockTypes[$0]).hasPrefix("CrossAttn") },
             { layers[layers.count - 1 - $0] + 1 })]
        for (key, _) in members where !["down", "up", "mid"].contains(key) {
            throw IPAdapterError("IP-Adapter block scale: unknown key \"\(key)\" (use \"down\", \"mid\" and \"up\")")
        }
        func number(_ v: JSON, _ at: String) throws -> Float {
            guard let d = v.double else { throw IPAdapterError("IP-Adapter block scale \(at): \(v.serialized()) is not a number") }
            return Float(d)
        }
        for side in sides {
            guard let value = spec[side.key] else { continue }
            let perBlock: [String: JSON]
            if let m = value.members {
                perBlock = Dictionary(m, uniquingKeysWith: { $1 })
                let known = Set(side.blocks.map { "block_\($0)" })
                for name in perBlock.keys where !known.contains(name) {
                    throw IPAdapterError("IP-Adapter block scale \(side.key).\(name): the UNet has no such \(side.key) block with attention (it has \(known.sorted().joined(separator: ", ")))")
                }
            } else {
                perBlock = Dictionary(uniqueKeysWithValues: side.blocks.map { ("block_\($0)", value) })
            }
            for i in side.blocks {
                guard let v = perBlock["block_\(i)"] else { continue }
                let n = side.attentions(i)
                let values: [Float]
                if let list = v.array {
                    let numbers = try list.map { try number($0, "\(side.key).block_\(i)") }
                    guard numbers.count == 1 || numbers.count == n else {
                        throw IPAdapterError("IP-Adapter block scale \(side.key).block_\(i): \(numbers.count) values for its \(n) attentions")
                    }
                    values = numbers.count == 1 ? Array(repeating: numbers[0], count: n) : numbers
                } else {
                    values = Array(repeating: try number(v, "\(side.key).block_\(i)"), count: n)
                }
                for (j, s) in values.enumerated() { modules["\(side.path).\(i).attentions.\(j)"] = s }
            }
        }
        if let mid = spec["mid"] {
            guard c.midBlockType != nil else { throw IPAdapterError("IP-Adapter block scale mid: the UNet has no mid block") }
            if let list = mid.array {
                guard list.count == 1 else { throw IPAdapterError("IP-Adapter block scale mid: expected 1 value, got \(list.count)") }
                modules["mid_block.attentions.0"] = try number(list[0], "mid")
            } else {
                modules["mid_block.attentions.0"] = try number(mid, "mid")
            }
        }
        return .perModule(modules)
    }
}

extension UNet2DConditionModel {
    /// The cross-attention layers (`…transformer_blocks.<k>.attn2`) in the order of diffusers'
    /// `unet.attn_processors`: down blocks, up blocks, then the mid block. An original IP-Adapter
    /// file numbers its `ip_adapter.<id>` weights over all attention processors in this order,
    /// self-attention included, so layer `i` here is `ip_adapter.<2i + 1>`.
    public var crossAttentionLayers: [(path: String, channels: Int)] {
        let c = config, channels = c.blockOutChannels, layers = c.layersPerDownBlock
        let depth = c.transformerLayersPerDownBlock
        var result: [(String, Int)] = []
        func add(_ block: String, attentions: Int, transformers: Int, channels: Int) {
            for j in 0..<attentions {
                for k in 0..<transformers { result.append(("\(block).attentions.\(j).transformer_blocks.\(k).attn2", channels)) }
            }
        }
        for (i, crossAttention) in c.downBlocksHaveCrossAttention.enumerated() where crossAttention {
            add("down_blocks.\(i)", attentions: layers[i], transformers: depth[i], channels: channels[i])
        }
        let n = channels.count
        for (i, t) in c.upBlockTypes.enumerated() where Configuration.blockName(t) == "CrossAttnUpBlock2D" {
            add("up_blocks.\(i)", attentions: layers[n - 1 - i] + 1, transformers: depth[n - 1 - i], channels: channels[n - 1 - i])
        }
        if c.midBlockType != nil {
            add("mid_block", attentions: 1, transformers: depth[n - 1], channels: channels[n - 1])
        }
        return result
    }
}
