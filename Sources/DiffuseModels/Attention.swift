import DiffuseGraph

/// diffusers' `Attention` with the default processor: `to_q`, `to_k`, `to_v`, `to_out.0`, and
/// optionally a GroupNorm on the input and a residual connection (the VAE's mid-block
/// attention). A 4-D input [B,C,H,W] is attended as H*W tokens of C channels, as
/// `AttnProcessor` does, and comes back in its original layout.
struct Attention {
    let p: Params
    let heads: Int
    let scale: Float
    let upcastAttention: Bool
    let groupNorm: GroupNorm?
    let toQ: Linear
    let toK: Linear
    let toV: Linear
    let toOut: Linear
    let residualConnection: Bool
    let rescaleOutputFactor: Float
    /// diffusers' `cross_attention_norm="layer_norm"`: the attended-to hidden states are
    /// layer-normalised first (`norm_cross`; the K-UNet's cross-attentions).
    let normCross: LayerNorm?

    init(_ p: Params, queryDim: Int, crossAttentionDim: Int? = nil, heads: Int, dimHead: Int, bias: Bool = false,
         outBias: Bool = true, upcastAttention: Bool = false, normNumGroups: Int? = nil, eps: Double = 1e-5,
         residualConnection: Bool = false, rescaleOutputFactor: Double = 1, crossAttentionNorm: Bool = false) {
        self.p = p
        let inner = heads * dimHead
        self.heads = heads
        scale = 1 / Float(dimHead).squareRoot()
        self.upcastAttention = upcastAttention
        groupNorm = normNumGroups.map { GroupNorm(p["group_norm"], groups: $0, channels: queryDim, eps: Float(eps)) }
        toQ = Linear(p["to_q"], queryDim, inner, bias: bias)
        toK = Linear(p["to_k"], crossAttentionDim ?? queryDim, inner, bias: bias)
        toV = Linear(p["to_v"], crossAttentionDim ?? queryDim, inner, bias: bias)
        toOut = Linear(p["to_out"][0], inner, queryDim, bias: outBias)
        self.residualConnection = residualConnection
        self.rescaleOutputFactor = Float(rescaleOutputFactor)
        normCross = crossAttentionNorm ? LayerNorm(p["norm_cross"], crossAttentionDim ?? queryDim) : nil
    }

    /// Self-attention when `encoderHiddenStates` is nil, cross-attention otherwise.
    func callAsFunction(_ hiddenStates: Value, encoderHiddenStates: Value? = nil) -> Value {
        callAsFunction(hiddenStates, encoderHiddenStates: encoderHiddenStates, ipAdapters: [], identityRows: 0)
    }

    /// Self-attention, perturbed (identity attention on the batch's last rows) where
    /// perturbed-attention guidance names this layer.
    func callAsFunction(_ hiddenStates: Value, perturbed: PerturbedAttention?) -> Value {
        let rows = perturbed.map { $0.applies(to: p.prefix) ? $0.perturbedRows : 0 } ?? 0
        return callAsFunction(hiddenStates, encoderHiddenStates: nil, ipAdapters: [], identityRows: rows)
    }

    /// Cross-attention to the prompt and, as diffusers' `IPAdapterAttnProcessor2_0`, to each
    /// IP-Adapter's image tokens through the adapter's own `to_k_ip`/`to_v_ip` (declared under
    /// `processor.to_k_ip.<n>`, diffusers' names once the adapter is loaded): the scaled
    /// attentions add up before `to_out`. An adapter whose scale here is 0 is skipped.
    func callAsFunction(_ hiddenStates: Value, context: CrossAttentionContext) -> Value {
        callAsFunction(hiddenStates, encoderHiddenStates: context.encoderHiddenStates, ipAdapters: context.ipAdapters,
                       identityRows: 0)
    }

    /// `identityRows`: the batch's last rows attend through the identity map, so their output is
    /// `to_out(to_v(x))` (diffusers' PAG processors); the projections still run on the whole
    /// batch, which keeps one matmul per projection (and fused QKV) for all rows.
    private func callAsFunction(_ hiddenStates: Value, encoderHiddenStates: Value?, ipAdapters: [IPAdapterTokens],
                                identityRows: Int) -> Value {
        p.scope {
            let residual = hiddenStates
            var x = hiddenStates
            // GroupNorm normalizes over channels whatever the layout, so it runs before the
            // [B,C,H,W] -> [B,HW,C] transpose (diffusers transposes back and forth around it).
            if let groupNorm { x = groupNorm(x) }
            let spatial = x.rank == 4 ? (x.shape[2], x.shape[3]) : nil
            if spatial != nil {
                x = x.reshape([x.shape[0], x.shape[1], -1]).transpose(1, 2)
            }
            let context = encoderHiddenStates.map { e in normCross.map { $0(e) } ?? e } ?? x
            let q = toQ(x), k = toK(context), v = toV(context)
            var attended: Value
            if identityRows > 0 {
                let kept = q.shape[0] - identityRows
                func head(_ t: Value) -> Value { t.slice(axis: 0, start: 0, length: kept) }
                attended = Value.concat([head(q).attention(head(k), head(v), heads: heads, scale: scale, upcast: upcastAttention),
                                         v.slice(axis: 0, start: kept, length: identityRows)], axis: 0)
            } else {
                attended = q.attention(k, v, heads: heads, scale: scale, upcast: upcastAttention)
            }
            for (n, adapter) in ipAdapters.enumerated() {
                let scales = (0..<(adapter.masks?.images ?? 1)).map { adapter.scale.scale(forLayer: p.prefix, image: $0) }
                guard scales.contains(where: { $0 != 0 }) else { continue }
                let s = scales[0]
                let crossDim = adapter.tokens.shape[2], inner = q.shape[2]
                let toKIp = Linear(p["processor"]["to_k_ip"][n], crossDim, inner, bias: false)
                let toVIp = Linear(p["processor"]["to_v_ip"][n], crossDim, inner, bias: false)
                if let masks = adapter.masks {
                    // diffusers' masked IP-Adapter: each picture's tokens attended to apart, the
                    // result weighted by that picture's mask at this layer's queries and scale.
                    let t = adapter.tokens.shape[1] / masks.images
                    for (i, s) in scales.enumerated() where s != 0 {
                        let tokens = adapter.tokens.slice(axis: 1, start: i * t, length: t)
                        let image = q.attention(toKIp(tokens), toVIp(tokens), heads: heads, scale: scale, upcast: upcastAttention)
                            * masks.mask(i, q.shape[1])
                        attended = attended + (s == 1 ? image : image * s)
                    }
                    continue
                }
                let image = q.attention(toKIp(adapter.tokens), toVIp(adapter.tokens), heads: heads, scale: scale, upcast: upcastAttention)
                attended = attended + (s == 1 ? image : image * s)
            }
            var out = toOut(attended)
            if let (h, w) = spatial {
                out = out.transpose(1, 2).reshape([out.shape[0], out.shape[2], h, w])
            }
            if residualConnection { out = out + residual }
            return rescaleOutputFactor == 1 ? out : out / rescaleOutputFactor
        }
    }
}

/// What a UNet's attention layers attend to: the prompt's hidden states and, with IP-Adapters
/// loaded, each adapter's image tokens (diffusers hands the processors the tuple
/// `(encoder_hidden_states, [ip_hidden_states])`); and which self-attention layers PAG perturbs.
public struct CrossAttentionContext {
    public var encoderHiddenStates: Value
    public var ipAdapters: [IPAdapterTokens]
    /// The self-attention layers perturbed for PAG, and on which rows; nil: none.
    public var perturbedAttention: PerturbedAttention?

    public init(encoderHiddenStates: Value, ipAdapters: [IPAdapterTokens] = [], perturbedAttention: PerturbedAttention? = nil) {
        self.encoderHiddenStates = encoderHiddenStates
        self.ipAdapters = ipAdapters
        self.perturbedAttention = perturbedAttention
    }
}

/// One IP-Adapter's image tokens [B, T, cross_attention_dim] (its image projection's output)
/// and how strongly each cross-attention layer uses them.
public struct IPAdapterTokens {
    public var tokens: Value
    public var scale: IPAdapterScale
    /// Per-picture masks (diffusers' `ip_adapter_masks`); nil: the pictures' tokens are attended
    /// to together, everywhere.
    public var masks: IPAdapterMasks?

    public init(tokens: Value, scale: IPAdapterScale, masks: IPAdapterMasks? = nil) {
        self.tokens = tokens
        self.scale = scale
        self.masks = masks
    }
}

/// An IP-Adapter's masks: `images` pictures whose tokens lie side by side in `tokens`, and for
/// picture i the weight of each of an attention layer's `queries` queries, [1, queries, 1].
public struct IPAdapterMasks {
    public var images: Int
    public var mask: (_ image: Int, _ queries: Int) -> Value

    public init(images: Int, mask: @escaping (_ image: Int, _ queries: Int) -> Value) {
        self.images = images
        self.mask = mask
    }
}
