import DiffuseCore
import DiffuseGraph

// The blocks of diffusers' "K-UNet": Katherine Crowson's k-diffusion upscaler UNet, which is
// stabilityai/sd-x2-latent-upscaler's denoiser (`KDownBlock2D`, `KCrossAttnDownBlock2D`,
// `KUpBlock2D`, `KCrossAttnUpBlock2D` in diffusers' unet_2d_blocks.py). Its resnets and attentions
// take the time embedding through adaptive group norms instead of an added projection, and it
// resamples with a fixed binomial filter instead of convolutions.

/// diffusers' `AdaGroupNorm` (no activation): `group_norm(x) · (1 + scale) + shift`, where
/// `[scale, shift] = linear(emb)`.
struct AdaGroupNorm {
    let p: Params
    let linear: Linear
    let channels: Int
    let groups: Int
    let eps: Float

    init(_ p: Params, embeddingDim: Int, outDim: Int, groups: Int, eps: Double = 1e-5) {
        self.p = p
        linear = Linear(p["linear"], embeddingDim, 2 * outDim)
        channels = outDim
        self.groups = groups
        self.eps = Float(eps)
    }

    func callAsFunction(_ x: Value, emb: Value) -> Value {
        p.scope {
            let b = x.builder
            let normed = x.groupNorm(groups: groups, eps: eps,
                                     weight: b.constant(Tensor(shape: [channels], floats: Array(repeating: 1, count: channels))),
                                     bias: b.constant(Tensor(zeros: [channels])))
            let e = linear(emb)
            let rows = e.shape[0]
            let scale = e.slice(axis: 1, start: 0, length: channels).affine(scale: 1, shift: 1).reshape([rows, channels, 1, 1])
            let shift = e.slice(axis: 1, start: channels, length: channels).reshape([rows, channels, 1, 1])
            return normed * scale + shift
        }
    }
}

/// diffusers' `ResnetBlockCondNorm2D` with `time_embedding_norm="ada_group"`:
/// `shortcut(x) + conv2(act(norm2(conv1(act(norm1(x, temb))), temb)))`. `conv2OutChannels` is
/// diffusers' `conv_2d_out_channels` (the K up blocks' last resnet narrows there); the shortcut,
/// a 1x1 conv without bias, exists where the output width differs from the input's.
struct ResnetBlockCondNorm2D {
    let p: Params
    let norm1: AdaGroupNorm
    let conv1: Conv2d
    let norm2: AdaGroupNorm
    let conv2: Conv2d
    let convShortcut: Conv2d?
    let act: UnaryOp

    init(_ p: Params, inChannels: Int, outChannels: Int, conv2OutChannels: Int? = nil, tembChannels: Int,
         groups: Int, groupsOut: Int, eps: Double, act: UnaryOp) {
        self.p = p
        let final = conv2OutChannels ?? outChannels
        norm1 = AdaGroupNorm(p["norm1"], embeddingDim: tembChannels, outDim: inChannels, groups: groups, eps: eps)
        conv1 = Conv2d(p["conv1"], inChannels, outChannels, kernel: 3, padding: 1)
        norm2 = AdaGroupNorm(p["norm2"], embeddingDim: tembChannels, outDim: outChannels, groups: groupsOut, eps: eps)
        conv2 = Conv2d(p["conv2"], outChannels, final, kernel: 3, padding: 1)
        convShortcut = inChannels != final ? Conv2d(p["conv_shortcut"], inChannels, final, kernel: 1, bias: false) : nil
        self.act = act
    }

    func callAsFunction(_ input: Value, temb: Value) -> Value {
        p.scope {
            let h = conv1(norm1(input, emb: temb).unary(act))
            let out = conv2(norm2(h, emb: temb).unary(act))
            return (convShortcut.map { $0(input) } ?? input) + out
        }
    }
}

extension Value {
    /// torch's `F.pad(x, …, mode="reflect")` by one on both sides of `axis`.
    fileprivate func reflectPad1(axis: Int) -> Value {
        let n = shape[axis]
        return Value.concat([slice(axis: axis, start: 1, length: 1), self, slice(axis: axis, start: n - 2, length: 1)], axis: axis)
    }

    /// Splits an even-length `axis` into its even and odd positions.
    fileprivate func evenAndOdd(axis: Int) -> (Value, Value) {
        var split = shape
        split[axis] /= 2
        split.insert(2, at: axis + 1)
        let pairs = reshape(split)
        split.remove(at: axis + 1)
        return (pairs.slice(axis: axis + 1, start: 0, length: 1).reshape(split),
                pairs.slice(axis: axis + 1, start: 1, length: 1).reshape(split))
    }

    /// diffusers' `KDownsample2D` along one axis: reflect padding by one, then the filter
    /// [1, 3, 3, 1]/8 at stride 2. The 2-D filter is the outer product of this one with itself, so
    /// filtering each axis in turn is the depthwise convolution diffusers runs (as a full
    /// convolution whose off-diagonal channels are zeros), at a fraction of the work.
    fileprivate func kDownsample(axis: Int) -> Value {
        let m = shape[axis] / 2
        let (even, odd) = reflectPad1(axis: axis).evenAndOdd(axis: axis)
        func at(_ v: Value, _ start: Int) -> Value { v.slice(axis: axis, start: start, length: m) }
        return (at(even, 0) + at(odd, 1)).affine(scale: 0.125) + (at(odd, 0) + at(even, 1)).affine(scale: 0.375)
    }

    /// diffusers' `KUpsample2D` along one axis: reflect padding by one, then the transposed
    /// convolution with [1, 3, 3, 1]/4 at stride 2 — output 2i is (x[i-1] + 3·x[i])/4 and 2i+1 is
    /// (3·x[i] + x[i+1])/4, the neighbours reflected at the edges.
    fileprivate func kUpsample(axis: Int) -> Value {
        let n = shape[axis]
        let padded = reflectPad1(axis: axis)
        func at(_ start: Int) -> Value { padded.slice(axis: axis, start: start, length: n) }
        let centre = at(1).affine(scale: 0.75)
        var paired = shape
        paired.insert(1, at: axis + 1)
        let even = (at(0).affine(scale: 0.25) + centre).reshape(paired)
        let odd = (centre + at(2).affine(scale: 0.25)).reshape(paired)
        var out = shape
        out[axis] *= 2
        return Value.concat([even, odd], axis: axis + 1).reshape(out)
    }
}

/// diffusers' `KDownsample2D`: [N,C,H,W] → [N,C,H/2,W/2] (H and W even).
func kDownsample2D(_ x: Value) -> Value {
    guard x.rank == 4, x.shape[2] % 2 == 0, x.shape[3] % 2 == 0, x.shape[2] >= 2, x.shape[3] >= 2 else {
        x.builder.fail("K-downsampling \(x.shape): the K-UNet halves even sides only")
        return x
    }
    return x.kDownsample(axis: 3).kDownsample(axis: 2)
}

/// diffusers' `KUpsample2D`: [N,C,H,W] → [N,C,2H,2W].
func kUpsample2D(_ x: Value) -> Value {
    guard x.rank == 4, x.shape[2] >= 2, x.shape[3] >= 2 else {
        x.builder.fail("K-upsampling \(x.shape): reflect padding needs sides of at least 2")
        return x
    }
    return x.kUpsample(axis: 3).kUpsample(axis: 2)
}

/// diffusers' `KAttentionBlock`: an optional self-attention and a cross-attention, each after an
/// adaptive group norm of the time embedding and added back; the cross-attention layer-normalises
/// the prompt's hidden states first (`cross_attention_norm="layer_norm"`). No feed-forward.
struct KAttentionBlock {
    let p: Params
    let norm1: AdaGroupNorm?
    let attn1: Attention?
    let norm2: AdaGroupNorm
    let attn2: Attention

    init(_ p: Params, dim: Int, heads: Int, headDim: Int, crossAttentionDim: Int, tembChannels: Int,
         addSelfAttention: Bool, groupSize: Int = 32) {
        self.p = p
        let groups = max(1, dim / groupSize)
        if addSelfAttention {
            norm1 = AdaGroupNorm(p["norm1"], embeddingDim: tembChannels, outDim: dim, groups: groups)
            attn1 = Attention(p["attn1"], queryDim: dim, heads: heads, dimHead: headDim, bias: true)
        } else {
            (norm1, attn1) = (nil, nil)
        }
        norm2 = AdaGroupNorm(p["norm2"], embeddingDim: tembChannels, outDim: dim, groups: groups)
        attn2 = Attention(p["attn2"], queryDim: dim, crossAttentionDim: crossAttentionDim, heads: heads, dimHead: headDim,
                          bias: true, crossAttentionNorm: true)
    }

    func callAsFunction(_ x: Value, encoderHiddenStates: Value, emb: Value) -> Value {
        p.scope {
            var h = x
            if let norm1, let attn1 { h = attn1(norm1(h, emb: emb)) + h }
            return attn2(norm2(h, emb: emb), encoderHiddenStates: encoderHiddenStates) + h
        }
    }
}

/// What every K block shares.
struct KBlockSettings {
    var tembChannels: Int
    var eps: Double
    var act: UnaryOp
    var crossAttentionDim: Int
    /// The K blocks' group size: each norm has channels / 32 groups.
    var groupSize = 32

    func resnet(_ p: Params, _ inChannels: Int, _ outChannels: Int, conv2OutChannels: Int? = nil) -> ResnetBlockCondNorm2D {
        ResnetBlockCondNorm2D(p, inChannels: inChannels, outChannels: outChannels, conv2OutChannels: conv2OutChannels,
                              tembChannels: tembChannels, groups: inChannels / groupSize, groupsOut: outChannels / groupSize,
                              eps: eps, act: act)
    }
}

/// diffusers' `KDownBlock2D` (no attention) and `KCrossAttnDownBlock2D`: resnets, each followed
/// by a `KAttentionBlock` in the cross-attention kind, then an optional K-downsampler. Its skips
/// are the pairs' outputs, or none at all (nil) in a cross-attention block without a downsampler
/// (the deepest, whose up block starts from its output alone).
struct KDownBlock2D {
    let p: Params
    let resnets: [ResnetBlockCondNorm2D]
    let attentions: [KAttentionBlock]?
    let addDownsample: Bool

    init(_ p: Params, numLayers: Int, inChannels: Int, outChannels: Int, settings s: KBlockSettings, crossAttention: Bool,
         attentionHeadDim: Int, addDownsample: Bool) {
        self.p = p
        resnets = (0..<numLayers).map { s.resnet(p["resnets"][$0], $0 == 0 ? inChannels : outChannels, outChannels) }
        attentions = crossAttention ? (0..<numLayers).map {
            KAttentionBlock(p["attentions"][$0], dim: outChannels, heads: outChannels / attentionHeadDim, headDim: attentionHeadDim,
                            crossAttentionDim: s.crossAttentionDim, tembChannels: s.tembChannels,
                            addSelfAttention: !addDownsample, groupSize: s.groupSize)
        } : nil
        self.addDownsample = addDownsample
    }

    func callAsFunction(_ x: Value, temb: Value, encoderHiddenStates: Value) -> (Value, [Value?]) {
        var h = x
        var outputs: [Value?] = []
        for (i, resnet) in resnets.enumerated() {
            h = resnet(h, temb: temb)
            if let attentions { h = attentions[i](h, encoderHiddenStates: encoderHiddenStates, emb: temb) }
            outputs.append(attentions != nil && !addDownsample ? nil : h)
        }
        if addDownsample { h = p["downsamplers"][0].scope { kDownsample2D(h) } }
        return (h, outputs)
    }
}

/// diffusers' `KUpBlock2D` (no attention) and `KCrossAttnUpBlock2D`: the hidden state joined with
/// the last of its skips (when there is one), resnets (one fewer than `numLayers`, as diffusers
/// builds them), each followed by a `KAttentionBlock` in the cross-attention kind, then an
/// optional K-upsampler. The block narrows to `inChannels` in its last resnet.
struct KUpBlock2D {
    let p: Params
    let resnets: [ResnetBlockCondNorm2D]
    let attentions: [KAttentionBlock]?
    let addUpsample: Bool

    init(_ p: Params, numLayers: Int, inChannels: Int, outChannels: Int, settings s: KBlockSettings, crossAttention: Bool,
         attentionHeadDim: Int, addUpsample: Bool) {
        self.p = p
        let layers = numLayers - 1
        let kOut = inChannels
        var resnets: [ResnetBlockCondNorm2D] = []
        var attentions: [KAttentionBlock] = []
        if crossAttention {
            // diffusers' KCrossAttnUpBlock2D: the deepest block (in == out == temb) starts from
            // the down path's output alone and attends to itself too; a block that changes width
            // narrows in its last resnet's second conv.
            let isFirst = inChannels == outChannels && outChannels == s.tembChannels
            let isMiddle = inChannels != outChannels
            let kIn = isFirst ? outChannels : 2 * outChannels
            for i in 0..<layers {
                let last = i == layers - 1
                resnets.append(s.resnet(p["resnets"][i], i == 0 ? kIn : outChannels, outChannels,
                                        conv2OutChannels: isMiddle && last ? kOut : nil))
                let dim = last ? kOut : outChannels
                attentions.append(KAttentionBlock(p["attentions"][i], dim: dim, heads: dim / attentionHeadDim,
                                                  headDim: attentionHeadDim, crossAttentionDim: s.crossAttentionDim,
                                                  tembChannels: s.tembChannels, addSelfAttention: isFirst, groupSize: s.groupSize))
            }
        } else {
            for i in 0..<layers {
                let last = i == layers - 1
                resnets.append(s.resnet(p["resnets"][i], i == 0 ? 2 * outChannels : outChannels, last ? kOut : outChannels))
            }
        }
        self.resnets = resnets
        self.attentions = crossAttention ? attentions : nil
        self.addUpsample = addUpsample
    }

    /// Takes this block's skips (as many as it has resnets) off the end of `skips`.
    func callAsFunction(_ x: Value, skips: inout [Value?], temb: Value, encoderHiddenStates: Value) -> Value {
        let mine = skips.suffix(resnets.count)
        skips.removeLast(min(resnets.count, skips.count))
        var h = x
        if let skip = mine.last ?? nil { h = Value.concat([h, skip], axis: 1) }
        for (i, resnet) in resnets.enumerated() {
            h = resnet(h, temb: temb)
            if let attentions { h = attentions[i](h, encoderHiddenStates: encoderHiddenStates, emb: temb) }
        }
        if addUpsample { h = p["upsamplers"][0].scope { kUpsample2D(h) } }
        return h
    }
}
