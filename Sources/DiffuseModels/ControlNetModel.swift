#if canImport(Glibc)
import Glibc
#endif
import DiffuseCore
import DiffuseGraph

/// diffusers' `ControlNetModel`: a copy of a UNet's encoder half (time embedding, conv_in, down
/// and mid blocks) that also sees a conditioning image (an edge map, a pose, a depth map) through
/// a small convolutional embedding, and hands the UNet one residual per skip connection and one
/// for the mid block, each through a 1×1 "zero" convolution. SD 1.x/2.x and SDXL (text_time).
public struct ControlNetModel: ModelComponent, Sendable {
    public static let className = "ControlNetModel"

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
        try self.init(config: Configuration(unet: unet, conditioningChannels: conditioningChannels,
                                            conditioningEmbeddingOutChannels: widths, channelOrder: order,
                                            globalPoolConditions: json["global_pool_conditions"]?.bool ?? false))
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
            let out = Self.forward(Params(b), config, inputs, condition: cond, scale: nil)
            for (i, r) in out.down.enumerated() { b.output("down_\(i)", r) }
            b.output("mid", out.mid)
        }
    }

    /// Graph input names of the conditioning image and the residuals' scale.
    public enum Name {
        public static let controlnetCond = "controlnet_cond"
        public static let conditioningScale = "conditioning_scale"
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
        let c = config.unet, channels = c.blockOutChannels
        var inputs = inputs
        if c.timeCondProjDim == nil { inputs.timestepCond = nil }  // its time embedding has no cond_proj
        let emb = UNet2DConditionModel.embedding(p, c, inputs)
        let convIn = Conv2d(p["conv_in"], c.inChannels, channels[0], kernel: c.convInKernel, padding: (c.convInKernel - 1) / 2)
        var sample = p["conv_in"].scope { convIn(inputs.sample) }

        // The conditioning embedding: conv_in, then (same width, then stride 2 to the next) per
        // step, SiLU after each, and conv_out to the UNet's first width.
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
        sample = sample + e["conv_out"].scope { embOut(cond) }

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
}
