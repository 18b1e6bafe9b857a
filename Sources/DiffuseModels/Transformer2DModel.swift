import DiffuseGraph

/// diffusers' `GEGLU`: `proj` to twice the width, then `hidden * gelu(gate)`.
struct GEGLU {
    let p: Params
    let proj: Linear

    init(_ p: Params, dimIn: Int, dimOut: Int) {
        self.p = p
        proj = Linear(p["proj"], dimIn, dimOut * 2)
    }

    func callAsFunction(_ x: Value) -> Value { p.scope { proj(x).geglu() } }
}

/// diffusers' `FeedForward` with `activation_fn="geglu"`: `net.0` (GEGLU), `net.1` (dropout),
/// `net.2` (the output projection).
struct FeedForward {
    let p: Params
    let geglu: GEGLU
    let out: Linear

    init(_ p: Params, dim: Int, mult: Int = 4) {
        self.p = p
        let inner = dim * mult
        geglu = GEGLU(p["net"][0], dimIn: dim, dimOut: inner)
        out = Linear(p["net"][2], inner, dim)
    }

    func callAsFunction(_ x: Value) -> Value { p.scope { out(geglu(x)) } }
}

/// diffusers' `BasicTransformerBlock` (layer_norm, self-attention, cross-attention, GEGLU MLP).
/// With `only_cross_attention` (the x4 upscaler's UNet) the first attention attends to the
/// prompt as well, with the plain processor (IP-Adapters and PAG act on other layers).
struct BasicTransformerBlock {
    let p: Params
    let norm1: LayerNorm
    let attn1: Attention
    let norm2: LayerNorm
    let attn2: Attention
    let norm3: LayerNorm
    let ff: FeedForward
    let onlyCrossAttention: Bool

    init(_ p: Params, dim: Int, heads: Int, dimHead: Int, crossAttentionDim: Int, upcastAttention: Bool,
         onlyCrossAttention: Bool = false) {
        self.p = p
        self.onlyCrossAttention = onlyCrossAttention
        norm1 = LayerNorm(p["norm1"], dim)
        attn1 = Attention(p["attn1"], queryDim: dim, crossAttentionDim: onlyCrossAttention ? crossAttentionDim : nil, heads: heads,
                          dimHead: dimHead, upcastAttention: upcastAttention)
        norm2 = LayerNorm(p["norm2"], dim)
        attn2 = Attention(p["attn2"], queryDim: dim, crossAttentionDim: crossAttentionDim, heads: heads, dimHead: dimHead,
                          upcastAttention: upcastAttention)
        norm3 = LayerNorm(p["norm3"], dim)
        ff = FeedForward(p["ff"], dim: dim)
    }

    func callAsFunction(_ x: Value, context: CrossAttentionContext) -> Value {
        p.scope {
            var h = onlyCrossAttention ? attn1(norm1(x), encoderHiddenStates: context.encoderHiddenStates) + x
                : attn1(norm1(x), perturbed: context.perturbedAttention) + x
            h = attn2(norm2(h), context: context) + h
            return ff(norm3(h)) + h
        }
    }
}

/// diffusers' `Transformer2DModel` on continuous input: GroupNorm, `proj_in` (1x1 conv, or a
/// linear layer after flattening with `use_linear_projection`), `transformer_blocks`,
/// `proj_out`, plus the residual.
struct Transformer2DModel {
    let p: Params
    let norm: GroupNorm
    let useLinearProjection: Bool
    let projInConv: Conv2d?
    let projInLinear: Linear?
    let blocks: [BasicTransformerBlock]
    let projOutConv: Conv2d?
    let projOutLinear: Linear?

    init(_ p: Params, numAttentionHeads: Int, attentionHeadDim: Int, inChannels: Int, numLayers: Int,
         crossAttentionDim: Int, normNumGroups: Int, useLinearProjection: Bool, upcastAttention: Bool,
         onlyCrossAttention: Bool = false) {
        self.p = p
        let inner = numAttentionHeads * attentionHeadDim
        norm = GroupNorm(p["norm"], groups: normNumGroups, channels: inChannels, eps: 1e-6)
        self.useLinearProjection = useLinearProjection
        if useLinearProjection {
            projInLinear = Linear(p["proj_in"], inChannels, inner)
            projInConv = nil
        } else {
            projInConv = Conv2d(p["proj_in"], inChannels, inner, kernel: 1)
            projInLinear = nil
        }
        blocks = (0..<numLayers).map {
            BasicTransformerBlock(p["transformer_blocks"][$0], dim: inner, heads: numAttentionHeads, dimHead: attentionHeadDim,
                                  crossAttentionDim: crossAttentionDim, upcastAttention: upcastAttention,
                                  onlyCrossAttention: onlyCrossAttention)
        }
        if useLinearProjection {
            projOutLinear = Linear(p["proj_out"], inner, inChannels)
            projOutConv = nil
        } else {
            projOutConv = Conv2d(p["proj_out"], inner, inChannels, kernel: 1)
            projOutLinear = nil
        }
    }

    func callAsFunction(_ x: Value, context: CrossAttentionContext) -> Value {
        p.scope {
            let (b, h, w) = (x.shape[0], x.shape[2], x.shape[3])
            let residual = x
            var t = norm(x)
            // [B,C,H,W] -> [B,HW,C] tokens; the projection runs before or after, as diffusers does.
            func tokens(_ v: Value) -> Value { v.permute([0, 2, 3, 1]).reshape([b, h * w, v.shape[1]]) }
            func image(_ v: Value) -> Value { v.reshape([b, h, w, v.shape[2]]).permute([0, 3, 1, 2]) }
            if let projInConv { t = tokens(projInConv(t)) } else if let projInLinear { t = projInLinear(tokens(t)) }
            for block in blocks { t = block(t, context: context) }
            if let projOutConv { t = projOutConv(image(t)) } else if let projOutLinear { t = image(projOutLinear(t)) }
            return t + residual
        }
    }
}
