#if canImport(Glibc)
import Glibc
#endif
import DiffuseCore
import DiffuseGraph

/// diffusers' `ControlNetModel`: a copy of a UNet's encoder half (time embedding, conv_in, down
/// and mid blocks) that also sees a conditioning image (an edge map, a pose, a depth map) through
/// a small convolutional embedding, and hands the UNet one residual per skip connection and one
/// for the mid block, each through a 1×1 "zero" convolution. SD 1.x/2.x and SDXL (text_time).
///
/// diffusers' `ControlNetUnionModel` (xinsir/controlnet-union-sdxl-1.0 and its ProMax) is the
/// same encoder taking several conditioning images at once, each with its control type: see
/// `union(...)`.
public struct ControlNetModel: ModelComponent, Sendable {
    public static let className = "ControlNetModel"
    public static let unionClassName = "ControlNetUnionModel"

    /// `ControlNetUnionModel`'s own config keys.
    public struct UnionSettings: Sendable, Equatable {
        /// `num_control_type`: how many control types the task embedding has (openpose, depth, …).
        public var numControlType: Int
        /// `num_trans_channel`, `num_trans_head`, `num_trans_layer`: the transformer mixing the
        /// images' and the latents' pooled features.
        public var numTransChannel: Int
        public var numTransHead: Int
        public var numTransLayer: Int
        /// `num_proj_channel`: the width of each image's offset (`spatial_ch_projs`).
        public var numProjChannel: Int
    }

    /// `controlnet/config.json`: the UNet keys it shares (read as the UNet reads them) and its own.
    public struct Configuration: Sendable {
        /// The encoder's configuration in the UNet's terms.
        public var unet: UNet2DConditionModel.Configuration
        /// Channels of the conditioning image (3: RGB).
        public var conditioningChannels: Int
        /// The conditioning embedding's convolution widths (its first is conv_in's).
        public var conditioningEmbeddingOutChannels: [Int]
        /// "rgb" or "bgr" (the conditioning image's channels are flipped for "bgr").
        public var channelOrder: String
        /// Shuffle ControlNets average each residual over space.
        public var globalPoolConditions: Bool
        /// A union ControlNet's settings; nil for a plain one.
        public var union: UnionSettings? = nil
    }

    public let config: Configuration
    public let parameters: [ParameterDeclaration]

    /// Reads a ControlNet's config.json text; `origin` names it in errors.
    public init(configJSON bytes: [UInt8], origin: String) throws {
        let json: JSON
        do { json = try JSON.parse(bytes) } catch { throw ConfigFileError(path: origin, message: "invalid JSON: \(error)") }
        guard var members = json.members else { throw ConfigFileError(path: origin, message: "is not a JSON object") }
        // The encoder's config is the UNet's without its decoder: give the UNet reader up blocks
        // mirroring the down blocks so its checks hold; they are never built.
        let down = json["down_block_types"]?.array?.compactMap(\.string)
            ?? ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
        let up = down.reversed().map { UNet2DConditionModel.Configuration.blockName($0) == "CrossAttnDownBlock2D" ? "CrossAttnUpBlock2D" : "UpBlock2D" }
        members = members.filter { !["up_block_types", "_class_name"].contains($0.0) }
        members.append(("up_block_types", JSON.array(up.map { JSON.string($0) })))
        if json["down_block_types"] == nil { members.append(("down_block_types", JSON.array(down.map { JSON.string($0) }))) }
        if json["sample_size"] == nil { members.append(("sample_size", .number(64))) }
        let unet = try decodeConfiguration(UNet2DConditionModel.Configuration.self,
                                           from: Array(JSON.object(members).serialized().utf8), origin: origin)
        func fail(_ key: String, _ why: String) -> ConfigFileError { ConfigFileError(path: origin, message: "\(key): \(why)") }
        let conditioningChannels = json["conditioning_channels"]?.int ?? 3
        let widths = json["conditioning_embedding_out_channels"].map { $0.array?.compactMap(\.int) ?? [] } ?? [16, 32, 96, 256]
        guard conditioningChannels > 0 else { throw fail("conditioning_channels", "must be positive") }
        guard !widths.isEmpty, widths.allSatisfy({ $0 > 0 }) else {
            throw fail("conditioning_embedding_out_channels", "must be a list of positive widths")
        }
        let order = json["controlnet_conditioning_channel_order"]?.string ?? "rgb"
        guard ["rgb", "bgr"].contains(order) else { throw fail("controlnet_conditioning_channel_order", "\(order) is neither rgb nor bgr") }
        for key in ["class_embed_type", "num_class_embeds", "encoder_hid_dim", "encoder_hid_dim_type"] {
            if let v = json[key], !v.isNull { throw fail(key, "\(v) is not supported") }
        }
        var union: UnionSettings?
        if json["_class_name"]?.string == Self.unionClassName {
            func int(_ key: String, _ fallback: Int) throws -> Int {
                guard let v = json[key] else { return fallback }
                guard let n = v.int, n > 0 else { throw fail(key, "\(v) is not a positive whole number") }
                return n
            }
            let u = UnionSettings(numControlType: try int("num_control_type", 6), numTransChannel: try int("num_trans_channel", 320),
                                  numTransHead: try int("num_trans_head", 8), numTransLayer: try int("num_trans_layer", 1),
                                  numProjChannel: try int("num_proj_channel", 320))
            let width = unet.blockOutChannels[0]
            // The pooled features are conv_in's width, and so is each image's offset.
            guard u.numTransChannel == width else { throw fail("num_trans_channel", "\(u.numTransChannel) is not conv_in's width \(width)") }
            guard u.numProjChannel == width else { throw fail("num_proj_channel", "\(u.numProjChannel) is not conv_in's width \(width)") }
            guard width % u.numTransHead == 0 else { throw fail("num_trans_head", "\(u.numTransHead) does not divide \(width)") }
            guard unet.additionTimeEmbedDim != nil else {
                throw fail("addition_time_embed_dim", "a union ControlNet embeds its control types with it (SDXL's)")
            }
            union = u
        }
        try self.init(config: Configuration(unet: unet, conditioningChannels: conditioningChannels,
                                            conditioningEmbeddingOutChannels: widths, channelOrder: order,
                                            globalPoolConditions: json["global_pool_conditions"]?.bool ?? false, union: union))
    }

    public init(config: Configuration) throws {
        try config.unet.validate()
        self.config = config
        parameters = try probeParameters { b in
            let c = config.unet
            let size = 1 << max(0, c.downBlockTypes.count - 1)
            // The embedding halves the image once per width after the first, down to latent size.
            let condSize = size << (config.conditioningEmbeddingOutChannels.count - 1)
            let cond = b.input(Name.controlnetCond, shape: [1, config.conditioningChannels, condSize, condSize])
            let inputs = UNet2DConditionModel.Inputs(
                sample: b.input(UNet2DConditionModel.Name.sample, shape: [1, c.inChannels, size, size]),
                timestep: b.input(UNet2DConditionModel.Name.timestep, shape: [1]),
                encoderHiddenStates: b.input(UNet2DConditionModel.Name.encoderHiddenStates, shape: [1, 1, c.crossAttentionDims[0]]),
                textEmbeds: c.additionEmbedType == "text_time" ? b.input(UNet2DConditionModel.Name.textEmbeds, shape: [1, c.textEmbedsDim(timeIds: 6)]) : nil,
                timeIds: c.additionEmbedType == "text_time" ? b.input(UNet2DConditionModel.Name.timeIds, shape: [1, 6]) : nil,
                timestepCond: c.timeCondProjDim.map { b.input(UNet2DConditionModel.Name.timestepCond, shape: [1, $0]) })
            let out = config.union.map { u in
                Self.union(Params(b), config, inputs, conditions: [cond], modes: [0], scales: [nil],
                           controlType: b.input(Name.controlType, shape: [1, u.numControlType]))
            } ?? Self.forward(Params(b), config, inputs, condition: cond, scale: nil)
            for (i, r) in out.down.enumerated() { b.output("down_\(i)", r) }
            b.output("mid", out.mid)
        }
    }

    /// Graph input names of the conditioning image and the residuals' scale.
    public enum Name {
        public static let controlnetCond = "controlnet_cond"
        public static let conditioningScale = "conditioning_scale"
        /// A union ControlNet's control types [B, num_control_type]: 1 for each type given.
        public static let controlType = "control_type"
    }

    /// Emits the forward pass under `p`: the residuals for the UNet, each times `scale` (a [1]
    /// value; nil is 1). `condition` is the preprocessed image [B, C, H, W] in [0, 1], H and W
    /// eight times the latents'.
    /// With `guessMode` (diffusers' `guess_mode`), the residuals are also weighted from 0.1 at
    /// the first skip up to 1 at the mid block, on a log scale.
    public func callAsFunction(_ p: Params, _ inputs: UNet2DConditionModel.Inputs, condition: Value,
                               scale: Value?, guessMode: Bool = false) -> (down: [Value], mid: Value) {
        Self.forward(p, config, inputs, condition: condition, scale: scale, guessMode: guessMode)
    }

    static func forward(_ p: Params, _ config: Configuration, _ inputs: UNet2DConditionModel.Inputs, condition: Value,
                        scale: Value?, guessMode: Bool = false) -> (down: [Value], mid: Value) {
        let c = config.unet
        var inputs = inputs
        if c.timeCondProjDim == nil { inputs.timestepCond = nil }  // its time embedding has no cond_proj
        let emb = UNet2DConditionModel.embedding(p, c, inputs)
        let sample = convIn(p, c, inputs.sample) + conditioningEmbedding(p, config, condition)
        return residuals(p, config, sample, emb: emb, inputs: inputs, scale: scale, guessMode: guessMode)
    }

    static func convIn(_ p: Params, _ c: UNet2DConditionModel.Configuration, _ x: Value) -> Value {
        let conv = Conv2d(p["conv_in"], c.inChannels, c.blockOutChannels[0], kernel: c.convInKernel, padding: (c.convInKernel - 1) / 2)
        return p["conv_in"].scope { conv(x) }
    }

    /// The conditioning embedding: conv_in, then (same width, then stride 2 to the next) per
    /// step, SiLU after each, and conv_out to the UNet's first width.
    static func conditioningEmbedding(_ p: Params, _ config: Configuration, _ condition: Value) -> Value {
        let channels = config.unet.blockOutChannels
        var cond = condition
        if config.channelOrder == "bgr" {
            let planes = (0..<config.conditioningChannels).reversed().map { cond.slice(axis: 1, start: $0, length: 1) }
            cond = Value.concat(planes, axis: 1)
        }
        let e = p["controlnet_cond_embedding"], widths = config.conditioningEmbeddingOutChannels
        let embIn = Conv2d(e["conv_in"], config.conditioningChannels, widths[0], kernel: 3, padding: 1)
        cond = e["conv_in"].scope { embIn(cond) }.unary(.silu)
        for i in 0..<(widths.count - 1) {
            let same = Conv2d(e["blocks"][2 * i], widths[i], widths[i], kernel: 3, padding: 1)
            cond = e["blocks"][2 * i].scope { same(cond) }.unary(.silu)
            let down = Conv2d(e["blocks"][2 * i + 1], widths[i], widths[i + 1], kernel: 3, stride: 2, padding: 1)
            cond = e["blocks"][2 * i + 1].scope { down(cond) }.unary(.silu)
        }
        let embOut = Conv2d(e["conv_out"], widths.last!, channels[0], kernel: 3, padding: 1)
        return e["conv_out"].scope { embOut(cond) }
    }

    /// The encoder from conv_in's output (with the conditioning added) to the residuals, each
    /// through its zero convolution and times `scale`.
    static func residuals(_ p: Params, _ config: Configuration, _ sample: Value, emb: Value, inputs: UNet2DConditionModel.Inputs,
                          scale: Value?, guessMode: Bool) -> (down: [Value], mid: Value) {
        let c = config.unet
        let (mid, skips) = UNet2DConditionModel.downAndMid(
            p, c, sample, emb: emb, context: CrossAttentionContext(encoderHiddenStates: inputs.encoderHiddenStates))
        // `torch.logspace(-1, 0, n + 1)` in float32: 10^(-1 + i/n) for the n skips and the mid block.
        let weights: [Float]? = guessMode && !config.globalPoolConditions
            ? (0...skips.count).map { i in Float(pow(10.0, -1 + Double(i) / Double(skips.count))) } : nil
        func zeroConv(_ q: Params, _ x: Value, _ i: Int) -> Value {
            let width = x.shape[1]
            let conv = Conv2d(q, width, width, kernel: 1)
            var r = q.scope { conv(x) }
            if let weights { r = r.affine(scale: weights[i]) }
            if let scale { r = r * scale }
            if config.globalPoolConditions { r = r.reduce(.mean, axes: [2, 3]) }
            return r
        }
        let down = skips.enumerated().map { i, x in zeroConv(p["controlnet_down_blocks"][i], x, i) }
        return (down, zeroConv(p["controlnet_mid_block"], mid, skips.count))
    }

    /// A union ControlNet's forward pass (diffusers' `ControlNetUnionModel.forward`): the control
    /// types (`controlType`, [B, num_control_type] of 0 and 1) embedded and added to the time
    /// embedding; each conditioning image embedded, its spatial mean plus its type's task
    /// embedding a token, the latents' mean after conv_in one more; the tokens through the
    /// transformer; each image's embedding plus its token's projection added to the latents.
    /// With one image its `scale` weighs the residuals, as a plain ControlNet's; with several,
    /// each weighs its image's token and embedding instead.
    public func union(_ p: Params, _ inputs: UNet2DConditionModel.Inputs, conditions: [Value], modes: [Int], scales: [Value?],
                      controlType: Value, guessMode: Bool = false) -> (down: [Value], mid: Value) {
        Self.union(p, config, inputs, conditions: conditions, modes: modes, scales: scales, controlType: controlType, guessMode: guessMode)
    }

    static func union(_ p: Params, _ config: Configuration, _ inputs: UNet2DConditionModel.Inputs, conditions: [Value], modes: [Int],
                      scales: [Value?], controlType: Value, guessMode: Bool = false) -> (down: [Value], mid: Value) {
        let c = config.unet, u = config.union!, width = c.blockOutChannels[0]
        var inputs = inputs
        if c.timeCondProjDim == nil { inputs.timestepCond = nil }
        let batch = inputs.sample.shape[0]
        var emb = UNet2DConditionModel.embedding(p, c, inputs)
        let typeProj = Timesteps(numChannels: c.additionTimeEmbedDim!, flipSinToCos: c.flipSinToCos, downscaleFreqShift: c.freqShift)
        let typeEmbedding = TimestepEmbedding(p["control_add_embedding"], inChannels: c.additionTimeEmbedDim! * u.numControlType,
                                              timeEmbedDim: c.timeEmbedDim)
        emb = emb + typeEmbedding(typeProj(controlType.reshape([-1])).reshape([batch, -1]))

        var sample = convIn(p, c, inputs.sample)
        let several = conditions.count > 1
        let task = p.weight("task_embedding", [u.numControlType, width])
        func pooled(_ x: Value) -> Value { x.reduce(.mean, axes: [2, 3]).reshape([batch, 1, width]) }
        var tokens: [Value] = [], embedded: [Value] = []
        for (k, condition) in conditions.enumerated() {
            var e = conditioningEmbedding(p, config, condition)
            var token = pooled(e) + task.slice(axis: 0, start: modes[k], length: 1).reshape([1, 1, width])
            if several, let s = scales[k] { (e, token) = (e * s, token * s) }
            tokens.append(token)
            embedded.append(e)
        }
        tokens.append(pooled(sample))
        var x = Value.concat(tokens, axis: 1)
        for i in 0..<u.numTransLayer { x = residualAttentionBlock(p["transformer_layes"][i], x, heads: u.numTransHead) }
        let project = Linear(p["spatial_ch_projs"], width, u.numProjChannel)
        for (k, e) in embedded.enumerated() {
            var alpha = p["spatial_ch_projs"].scope { project(x.slice(axis: 1, start: k, length: 1).reshape([batch, width])) }
                .reshape([batch, width, 1, 1])
            if several, let s = scales[k] { alpha = alpha * s }
            sample = sample + (e + alpha)
        }
        return residuals(p, config, sample, emb: emb, inputs: inputs, scale: several ? nil : scales[0], guessMode: guessMode)
    }

    /// The union transformer's block: OpenAI CLIP's residual attention block over torch's
    /// `nn.MultiheadAttention`, which (without batch_first) reads [B, L, C] as a sequence of B:
    /// each token attends across the batch's rows, as diffusers' model does.
    static func residualAttentionBlock(_ p: Params, _ x: Value, heads: Int) -> Value {
        let width = x.shape[2]
        let ln1 = LayerNorm(p["ln_1"], width), ln2 = LayerNorm(p["ln_2"], width)
        let a = p["attn"]
        let (q, k, v) = (Linear(a["q_proj"], width, width), Linear(a["k_proj"], width, width), Linear(a["v_proj"], width, width))
        let out = Linear(a["out_proj"], width, width)
        let h = ln1(x).permute([1, 0, 2])
        let attended = a.scope { out(q(h).attention(k(h), v(h), heads: heads)) }.permute([1, 0, 2])
        var y = x + attended
        let fc = Linear(p["mlp"]["c_fc"], width, 4 * width), proj = Linear(p["mlp"]["c_proj"], 4 * width, width)
        y = y + p["mlp"].scope { proj(fc(ln2(y)).quickGelu()) }
        return y
    }
}
