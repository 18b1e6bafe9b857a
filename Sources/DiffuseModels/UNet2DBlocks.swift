import DiffuseGraph

/// What the resnets of a UNet block share (diffusers passes these to every block).
struct ResnetSettings {
    var tembChannels: Int?
    var groups: Int
    var eps: Double
    var act: UnaryOp
    var outputScaleFactor: Double = 1
}

/// What the transformers of a cross-attention block share.
struct CrossAttentionSettings {
    var numAttentionHeads: Int
    var transformerLayers: Int
    var crossAttentionDim: Int
    var useLinearProjection: Bool
    var upcastAttention: Bool
    /// diffusers' `only_cross_attention`: the first attention attends to the prompt too.
    var onlyCrossAttention = false
}

/// diffusers' `DownBlock2D`: resnets, then an optional strided-conv downsampler. Returns the
/// hidden state and every intermediate output the up path takes as skips.
struct DownBlock2D {
    let p: Params
    let resnets: [ResnetBlock2D]
    let downsampler: Downsample2D?

    init(_ p: Params, numLayers: Int, inChannels: Int, outChannels: Int, resnet: ResnetSettings, addDownsample: Bool,
         downsamplePadding: Int) {
        self.p = p
        resnets = (0..<numLayers).map {
            ResnetBlock2D(p["resnets"][$0], inChannels: $0 == 0 ? inChannels : outChannels, outChannels: outChannels,
                          tembChannels: resnet.tembChannels, groups: resnet.groups, eps: resnet.eps, act: resnet.act,
                          outputScaleFactor: resnet.outputScaleFactor)
        }
        downsampler = addDownsample
            ? Downsample2D(p["downsamplers"][0], channels: outChannels, padding: downsamplePadding) : nil
    }

    func callAsFunction(_ x: Value, temb: Value?) -> (Value, [Value]) {
        var h = x
        var outputs: [Value] = []
        for r in resnets { h = r(h, temb: temb); outputs.append(h) }
        if let downsampler { h = downsampler(h); outputs.append(h) }
        return (h, outputs)
    }
}

/// diffusers' `CrossAttnDownBlock2D`: (resnet, Transformer2DModel) pairs, then a downsampler.
struct CrossAttnDownBlock2D {
    let p: Params
    let resnets: [ResnetBlock2D]
    let attentions: [Transformer2DModel]
    let downsampler: Downsample2D?

    init(_ p: Params, numLayers: Int, inChannels: Int, outChannels: Int, resnet: ResnetSettings,
         attention: CrossAttentionSettings, addDownsample: Bool, downsamplePadding: Int) {
        self.p = p
        var resnets: [ResnetBlock2D] = []
        var attentions: [Transformer2DModel] = []
        for i in 0..<numLayers {
            resnets.append(ResnetBlock2D(p["resnets"][i], inChannels: i == 0 ? inChannels : outChannels,
                                         outChannels: outChannels, tembChannels: resnet.tembChannels, groups: resnet.groups,
                                         eps: resnet.eps, act: resnet.act, outputScaleFactor: resnet.outputScaleFactor))
            attentions.append(Transformer2DModel(
                p["attentions"][i], numAttentionHeads: attention.numAttentionHeads,
                attentionHeadDim: outChannels / attention.numAttentionHeads, inChannels: outChannels,
                numLayers: attention.transformerLayers, crossAttentionDim: attention.crossAttentionDim,
                normNumGroups: resnet.groups, useLinearProjection: attention.useLinearProjection,
                upcastAttention: attention.upcastAttention, onlyCrossAttention: attention.onlyCrossAttention))
        }
        self.resnets = resnets
        self.attentions = attentions
        downsampler = addDownsample
            ? Downsample2D(p["downsamplers"][0], channels: outChannels, padding: downsamplePadding) : nil
    }

    /// `additionalResidual` (a T2I-Adapter's feature) joins the last pair's output, before it
    /// becomes a skip connection.
    func callAsFunction(_ x: Value, temb: Value?, context: CrossAttentionContext, additionalResidual: Value? = nil) -> (Value, [Value]) {
        var h = x
        var outputs: [Value] = []
        for (i, (r, a)) in zip(resnets, attentions).enumerated() {
            h = a(r(h, temb: temb), context: context)
            if i == resnets.count - 1, let additionalResidual { h = h + additionalResidual }
            outputs.append(h)
        }
        if let downsampler { h = downsampler(h); outputs.append(h) }
        return (h, outputs)
    }
}

/// Input channels of resnet `i` of an up block: the previous block's output (or this block's
/// width) plus the skip it concatenates.
private func upResnetChannels(_ i: Int, numLayers: Int, inChannels: Int, outChannels: Int, prevOutputChannel: Int) -> Int {
    let skip = i == numLayers - 1 ? inChannels : outChannels
    let input = i == 0 ? prevOutputChannel : outChannels
    return input + skip
}

/// FreeU in an up block: the settings and the block's index (diffusers' `resolution_idx`).
typealias UpBlockFreeU = (settings: FreeU, resolutionIndex: Int)

/// The hidden state and a skip side by side on channels, with FreeU first where it is on.
private func joinSkip(_ h: Value, _ skip: Value, _ freeU: UpBlockFreeU?) -> Value {
    guard let freeU else { return Value.concat([h, skip], axis: 1) }
    let (hidden, filtered) = freeU.settings(resolutionIndex: freeU.resolutionIndex, hidden: h, skip: skip)
    return Value.concat([hidden, filtered], axis: 1)
}

/// diffusers' `UpBlock2D`: resnets over the hidden state concatenated with a skip, popped from
/// the end of `skips`, then an optional upsampler.
struct UpBlock2D {
    let p: Params
    let resnets: [ResnetBlock2D]
    let upsampler: Upsample2D?

    init(_ p: Params, numLayers: Int, inChannels: Int, outChannels: Int, prevOutputChannel: Int, resnet: ResnetSettings,
         addUpsample: Bool) {
        self.p = p
        resnets = (0..<numLayers).map {
            ResnetBlock2D(p["resnets"][$0],
                          inChannels: upResnetChannels($0, numLayers: numLayers, inChannels: inChannels,
                                                       outChannels: outChannels, prevOutputChannel: prevOutputChannel),
                          outChannels: outChannels, tembChannels: resnet.tembChannels, groups: resnet.groups,
                          eps: resnet.eps, act: resnet.act, outputScaleFactor: resnet.outputScaleFactor)
        }
        upsampler = addUpsample ? Upsample2D(p["upsamplers"][0], channels: outChannels) : nil
    }

    func callAsFunction(_ x: Value, skips: inout [Value], temb: Value?, upsampleSize: (Int, Int)?,
                        freeU: UpBlockFreeU? = nil) -> Value {
        var h = x
        for r in resnets {
            h = r(joinSkip(h, skips.removeLast(), freeU), temb: temb)
        }
        if let upsampler { h = upsampler(h, outputSize: upsampleSize) }
        return h
    }
}

/// diffusers' `CrossAttnUpBlock2D`: (resnet on hidden ⧺ skip, Transformer2DModel) pairs, then
/// an optional upsampler.
struct CrossAttnUpBlock2D {
    let p: Params
    let resnets: [ResnetBlock2D]
    let attentions: [Transformer2DModel]
    let upsampler: Upsample2D?

    init(_ p: Params, numLayers: Int, inChannels: Int, outChannels: Int, prevOutputChannel: Int, resnet: ResnetSettings,
         attention: CrossAttentionSettings, addUpsample: Bool) {
        self.p = p
        var resnets: [ResnetBlock2D] = []
        var attentions: [Transformer2DModel] = []
        for i in 0..<numLayers {
            resnets.append(ResnetBlock2D(
                p["resnets"][i],
                inChannels: upResnetChannels(i, numLayers: numLayers, inChannels: inChannels, outChannels: outChannels,
                                             prevOutputChannel: prevOutputChannel),
                outChannels: outChannels, tembChannels: resnet.tembChannels, groups: resnet.groups, eps: resnet.eps,
                act: resnet.act, outputScaleFactor: resnet.outputScaleFactor))
            attentions.append(Transformer2DModel(
                p["attentions"][i], numAttentionHeads: attention.numAttentionHeads,
                attentionHeadDim: outChannels / attention.numAttentionHeads, inChannels: outChannels,
                numLayers: attention.transformerLayers, crossAttentionDim: attention.crossAttentionDim,
                normNumGroups: resnet.groups, useLinearProjection: attention.useLinearProjection,
                upcastAttention: attention.upcastAttention, onlyCrossAttention: attention.onlyCrossAttention))
        }
        self.resnets = resnets
        self.attentions = attentions
        upsampler = addUpsample ? Upsample2D(p["upsamplers"][0], channels: outChannels) : nil
    }

    func callAsFunction(_ x: Value, skips: inout [Value], temb: Value?, context: CrossAttentionContext,
                        upsampleSize: (Int, Int)?, freeU: UpBlockFreeU? = nil) -> Value {
        var h = x
        for (r, a) in zip(resnets, attentions) {
            h = r(joinSkip(h, skips.removeLast(), freeU), temb: temb)
            h = a(h, context: context)
        }
        if let upsampler { h = upsampler(h, outputSize: upsampleSize) }
        return h
    }
}

/// diffusers' `UNetMidBlock2DCrossAttn`: resnet, then (Transformer2DModel, resnet) pairs.
struct UNetMidBlock2DCrossAttn {
    let p: Params
    let resnets: [ResnetBlock2D]
    let attentions: [Transformer2DModel]

    init(_ p: Params, inChannels: Int, resnet: ResnetSettings, attention: CrossAttentionSettings, numLayers: Int = 1) {
        self.p = p
        func makeResnet(_ i: Int) -> ResnetBlock2D {
            ResnetBlock2D(p["resnets"][i], inChannels: inChannels, outChannels: inChannels, tembChannels: resnet.tembChannels,
                          groups: resnet.groups, eps: resnet.eps, act: resnet.act, outputScaleFactor: resnet.outputScaleFactor)
        }
        var resnets = [makeResnet(0)]
        var attentions: [Transformer2DModel] = []
        for i in 0..<numLayers {
            attentions.append(Transformer2DModel(
                p["attentions"][i], numAttentionHeads: attention.numAttentionHeads,
                attentionHeadDim: inChannels / attention.numAttentionHeads, inChannels: inChannels,
                numLayers: attention.transformerLayers, crossAttentionDim: attention.crossAttentionDim,
                normNumGroups: resnet.groups, useLinearProjection: attention.useLinearProjection,
                upcastAttention: attention.upcastAttention, onlyCrossAttention: attention.onlyCrossAttention))
            resnets.append(makeResnet(i + 1))
        }
        self.resnets = resnets
        self.attentions = attentions
    }

    func callAsFunction(_ x: Value, temb: Value?, context: CrossAttentionContext) -> Value {
        var h = resnets[0](x, temb: temb)
        for (a, r) in zip(attentions, resnets.dropFirst()) {
            h = r(a(h, context: context), temb: temb)
        }
        return h
    }
}

/// diffusers' `UNetMidBlock2D` as the VAE uses it: resnet, then (single-head spatial
/// self-attention, resnet) pairs; no time embedding.
struct UNetMidBlock2D {
    let p: Params
    let resnets: [ResnetBlock2D]
    let attentions: [Attention?]

    init(_ p: Params, inChannels: Int, resnet: ResnetSettings, attentionHeadDim: Int, addAttention: Bool,
         numLayers: Int = 1) {
        self.p = p
        func makeResnet(_ i: Int) -> ResnetBlock2D {
            ResnetBlock2D(p["resnets"][i], inChannels: inChannels, outChannels: inChannels, tembChannels: resnet.tembChannels,
                          groups: resnet.groups, eps: resnet.eps, act: resnet.act, outputScaleFactor: resnet.outputScaleFactor)
        }
        var resnets = [makeResnet(0)]
        var attentions: [Attention?] = []
        for i in 0..<numLayers {
            attentions.append(addAttention
                ? Attention(p["attentions"][i], queryDim: inChannels, heads: inChannels / attentionHeadDim,
                            dimHead: attentionHeadDim, bias: true, normNumGroups: resnet.groups, eps: resnet.eps,
                            residualConnection: true, rescaleOutputFactor: resnet.outputScaleFactor)
                : nil)
            resnets.append(makeResnet(i + 1))
        }
        self.resnets = resnets
        self.attentions = attentions
    }

    func callAsFunction(_ x: Value, temb: Value?) -> Value {
        var h = resnets[0](x, temb: temb)
        for (a, r) in zip(attentions, resnets.dropFirst()) {
            if let a { h = a(h) }
            h = r(h, temb: temb)
        }
        return h
    }
}

/// diffusers' `DownEncoderBlock2D`: resnets without time embedding, then a downsampler.
struct DownEncoderBlock2D {
    let p: Params
    let resnets: [ResnetBlock2D]
    let downsampler: Downsample2D?

    init(_ p: Params, numLayers: Int, inChannels: Int, outChannels: Int, resnet: ResnetSettings, addDownsample: Bool,
         downsamplePadding: Int) {
        self.p = p
        resnets = (0..<numLayers).map {
            ResnetBlock2D(p["resnets"][$0], inChannels: $0 == 0 ? inChannels : outChannels, outChannels: outChannels,
                          tembChannels: nil, groups: resnet.groups, eps: resnet.eps, act: resnet.act,
                          outputScaleFactor: resnet.outputScaleFactor)
        }
        downsampler = addDownsample
            ? Downsample2D(p["downsamplers"][0], channels: outChannels, padding: downsamplePadding) : nil
    }

    func callAsFunction(_ x: Value) -> Value {
        var h = x
        for r in resnets { h = r(h, temb: nil) }
        if let downsampler { h = downsampler(h) }
        return h
    }
}

/// diffusers' `UpDecoderBlock2D`: resnets without time embedding, then an upsampler.
struct UpDecoderBlock2D {
    let p: Params
    let resnets: [ResnetBlock2D]
    let upsampler: Upsample2D?

    init(_ p: Params, numLayers: Int, inChannels: Int, outChannels: Int, resnet: ResnetSettings, addUpsample: Bool) {
        self.p = p
        resnets = (0..<numLayers).map {
            ResnetBlock2D(p["resnets"][$0], inChannels: $0 == 0 ? inChannels : outChannels, outChannels: outChannels,
                          tembChannels: nil, groups: resnet.groups, eps: resnet.eps, act: resnet.act,
                          outputScaleFactor: resnet.outputScaleFactor)
        }
        upsampler = addUpsample ? Upsample2D(p["upsamplers"][0], channels: outChannels) : nil
    }

    func callAsFunction(_ x: Value) -> Value {
        var h = x
        for r in resnets { h = r(h, temb: nil) }
        if let upsampler { h = upsampler(h) }
        return h
    }
}
