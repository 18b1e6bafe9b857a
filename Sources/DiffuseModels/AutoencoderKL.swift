import DiffuseCore
import DiffuseGraph

/// diffusers' `AutoencoderKL`, the Stable Diffusion VAE.
///
/// Decoder graph: input `latents` [B,latent_channels,h,w], already divided by `scaling_factor`
/// (and shifted by `shift_factor`) by the pipeline; output `sample` [B,out_channels,8h,8w] in
/// about [-1, 1]. Encoder graph: input `sample` in [-1, 1]; outputs `mean` and `logvar` of the
/// latent distribution (unscaled; logvar clamped to [-30, 20] as diffusers does).
public struct AutoencoderKL: ImageAutoencoder, Sendable {
    public static let className = "AutoencoderKL"

    public enum Name {
        public static let latents = "latents"
        public static let sample = "sample"
        public static let mean = "mean"
        public static let logvar = "logvar"
    }

    public let config: Configuration
    public let parameters: [ParameterDeclaration]

    public init(config: Configuration) throws {
        try config.validate()
        self.config = config
        parameters = try probeParameters { b in
            let p = Params(b)
            let size = 1 << (config.blockOutChannels.count - 1)
            let image = b.input(Name.sample, shape: [1, config.inChannels, size, size])
            let (mean, logvar) = Self.encode(p, config, image)
            b.output(Name.mean, mean)
            b.output(Name.logvar, logvar)
            b.output(Name.sample, Self.decode(p, config, b.input(Name.latents, shape: [1, config.latentChannels, 1, 1])))
        }
    }

    public init(configPath: String) throws {
        try self.init(config: loadConfiguration(Configuration.self, from: configPath))
    }

    /// Latents are this many times smaller than images on each side.
    public var spatialScaleFactor: Int { 1 << (config.blockOutChannels.count - 1) }
    public var latentChannels: Int { config.latentChannels }
    /// The pipeline multiplies encoded latents by this and divides by it before decoding.
    public var scalingFactor: Double { config.scalingFactor }
    /// Subtracted after scaling when encoding (added back before decoding); 0 when null.
    public var shiftFactor: Double { config.shiftFactor ?? 0 }
    /// diffusers runs this VAE in float32 even in a fp16 pipeline (the SDXL VAE overflows).
    public var forceUpcast: Bool { config.forceUpcast }
    /// `latents_mean` and `latents_std` when the config has both (Playground v2.5's VAE).
    public var latentStatistics: (mean: [Double], std: [Double])? {
        guard let mean = config.latentsMean, let std = config.latentsStd else { return nil }
        return (mean, std)
    }

    /// Decoder graph for latents of `height` x `width`.
    public func decoderGraph(batch: Int, height: Int, width: Int) throws -> Graph {
        try buildGraph { b in
            let z = b.input(Name.latents, shape: [batch, config.latentChannels, height, width])
            b.output(Name.sample, Self.decode(Params(b), config, z))
        }
    }

    /// Encoder graph for images of `height` x `width`.
    public func encoderGraph(batch: Int, height: Int, width: Int) throws -> Graph {
        try buildGraph { b in
            let x = b.input(Name.sample, shape: [batch, config.inChannels, height, width])
            let (mean, logvar) = Self.encode(Params(b), config, x)
            b.output(Name.mean, mean)
            b.output(Name.logvar, logvar)
        }
    }

    /// `decoder(post_quant_conv(z))`, for composing into a larger graph.
    public func decode(_ p: Params, _ z: Value) -> Value { Self.decode(p, config, z) }

    /// The latent distribution's (mean, logvar), for composing into a larger graph.
    public func encode(_ p: Params, _ x: Value) -> (mean: Value, logvar: Value) { Self.encode(p, config, x) }

    static func decode(_ p: Params, _ c: Configuration, _ z: Value) -> Value {
        var h = z
        if c.usePostQuantConv {
            let conv = Conv2d(p["post_quant_conv"], c.latentChannels, c.latentChannels, kernel: 1)
            h = p["post_quant_conv"].scope { conv(h) }
        }
        return Decoder(p["decoder"], c)(h)
    }

    static func encode(_ p: Params, _ c: Configuration, _ x: Value) -> (mean: Value, logvar: Value) {
        var moments = Encoder(p["encoder"], c)(x)
        if c.useQuantConv {
            let conv = Conv2d(p["quant_conv"], 2 * c.latentChannels, 2 * c.latentChannels, kernel: 1)
            moments = p["quant_conv"].scope { conv(moments) }
        }
        // DiagonalGaussianDistribution: chunk on channels, clamp logvar.
        let parts = moments.chunk(2, axis: 1)
        return (parts[0], parts[1].clamp(min: -30, max: 20))
    }

    /// diffusers' VAE `Encoder`: conv_in, DownEncoderBlock2Ds, UNetMidBlock2D, norm, SiLU,
    /// conv_out to 2 x latent_channels (mean and logvar).
    struct Encoder {
        let p: Params
        let c: Configuration

        init(_ p: Params, _ c: Configuration) { self.p = p; self.c = c }

        func callAsFunction(_ x: Value) -> Value {
            let act = DiffusersActivation.unary(c.actFn)!
            let channels = c.blockOutChannels
            let resnet = ResnetSettings(tembChannels: nil, groups: c.normNumGroups, eps: 1e-6, act: act)
            let convIn = Conv2d(p["conv_in"], c.inChannels, channels[0], kernel: 3, padding: 1)
            var h = p["conv_in"].scope { convIn(x) }
            var outputChannel = channels[0]
            for i in channels.indices {
                let inputChannel = outputChannel
                outputChannel = channels[i]
                let block = DownEncoderBlock2D(p["down_blocks"][i], numLayers: c.layersPerBlock, inChannels: inputChannel,
                                               outChannels: outputChannel, resnet: resnet,
                                               addDownsample: i != channels.count - 1, downsamplePadding: 0)
                h = block(h)
            }
            let mid = UNetMidBlock2D(p["mid_block"], inChannels: channels.last!, resnet: resnet,
                                     attentionHeadDim: channels.last!, addAttention: c.midBlockAddAttention)
            h = mid(h, temb: nil)
            let normOut = GroupNorm(p["conv_norm_out"], groups: c.normNumGroups, channels: channels.last!, eps: 1e-6)
            let convOut = Conv2d(p["conv_out"], channels.last!, 2 * c.latentChannels, kernel: 3, padding: 1)
            h = p["conv_norm_out"].scope { normOut(h).unary(act) }
            return p["conv_out"].scope { convOut(h) }
        }
    }

    /// diffusers' VAE `Decoder`: conv_in, UNetMidBlock2D, UpDecoderBlock2Ds (layers_per_block + 1
    /// resnets each), norm, SiLU, conv_out.
    struct Decoder {
        let p: Params
        let c: Configuration

        init(_ p: Params, _ c: Configuration) { self.p = p; self.c = c }

        func callAsFunction(_ z: Value) -> Value {
            let act = DiffusersActivation.unary(c.actFn)!
            let channels = c.blockOutChannels
            let resnet = ResnetSettings(tembChannels: nil, groups: c.normNumGroups, eps: 1e-6, act: act)
            let convIn = Conv2d(p["conv_in"], c.latentChannels, channels.last!, kernel: 3, padding: 1)
            var h = p["conv_in"].scope { convIn(z) }
            let mid = UNetMidBlock2D(p["mid_block"], inChannels: channels.last!, resnet: resnet,
                                     attentionHeadDim: channels.last!, addAttention: c.midBlockAddAttention)
            h = mid(h, temb: nil)
            let reversed = Array(channels.reversed())
            var outputChannel = reversed[0]
            for i in reversed.indices {
                let prevOutputChannel = outputChannel
                outputChannel = reversed[i]
                let block = UpDecoderBlock2D(p["up_blocks"][i], numLayers: c.layersPerBlock + 1, inChannels: prevOutputChannel,
                                             outChannels: outputChannel, resnet: resnet, addUpsample: i != reversed.count - 1)
                h = block(h)
            }
            let normOut = GroupNorm(p["conv_norm_out"], groups: c.normNumGroups, channels: channels[0], eps: 1e-6)
            let convOut = Conv2d(p["conv_out"], channels[0], c.outChannels, kernel: 3, padding: 1)
            h = p["conv_norm_out"].scope { normOut(h).unary(act) }
            return p["conv_out"].scope { convOut(h) }
        }
    }
}

extension AutoencoderKL {
    /// `vae/config.json`. Keys are diffusers' names; a missing key takes diffusers' default.
    public struct Configuration: Codable, Sendable {
        public var inChannels: Int
        public var outChannels: Int
        public var downBlockTypes: [String]
        public var upBlockTypes: [String]
        public var blockOutChannels: [Int]
        public var layersPerBlock: Int
        public var actFn: String
        public var latentChannels: Int
        public var normNumGroups: Int
        public var sampleSize: IntOrList?
        public var scalingFactor: Double
        public var shiftFactor: Double?
        public var latentsMean: [Double]?
        public var latentsStd: [Double]?
        public var forceUpcast: Bool
        public var useQuantConv: Bool
        public var usePostQuantConv: Bool
        public var midBlockAddAttention: Bool

        enum CodingKeys: String, CodingKey {
            case inChannels = "in_channels", outChannels = "out_channels", downBlockTypes = "down_block_types"
            case upBlockTypes = "up_block_types", blockOutChannels = "block_out_channels"
            case layersPerBlock = "layers_per_block", actFn = "act_fn", latentChannels = "latent_channels"
            case normNumGroups = "norm_num_groups", sampleSize = "sample_size", scalingFactor = "scaling_factor"
            case shiftFactor = "shift_factor", latentsMean = "latents_mean", latentsStd = "latents_std"
            case forceUpcast = "force_upcast", useQuantConv = "use_quant_conv", usePostQuantConv = "use_post_quant_conv"
            case midBlockAddAttention = "mid_block_add_attention"
        }

        /// diffusers' defaults.
        public init() {
            inChannels = 3
            outChannels = 3
            downBlockTypes = ["DownEncoderBlock2D"]
            upBlockTypes = ["UpDecoderBlock2D"]
            blockOutChannels = [64]
            layersPerBlock = 1
            actFn = "silu"
            latentChannels = 4
            normNumGroups = 32
            sampleSize = .int(32)
            scalingFactor = 0.18215
            shiftFactor = nil
            latentsMean = nil
            latentsStd = nil
            forceUpcast = true
            useQuantConv = true
            usePostQuantConv = true
            midBlockAddAttention = true
        }

        public init(from decoder: Swift.Decoder) throws {
            self.init()
            let c = try decoder.container(keyedBy: CodingKeys.self)
            inChannels = try c.value(.inChannels, or: inChannels)
            outChannels = try c.value(.outChannels, or: outChannels)
            downBlockTypes = try c.value(.downBlockTypes, or: downBlockTypes)
            upBlockTypes = try c.value(.upBlockTypes, or: upBlockTypes)
            blockOutChannels = try c.value(.blockOutChannels, or: blockOutChannels)
            layersPerBlock = try c.value(.layersPerBlock, or: layersPerBlock)
            actFn = try c.value(.actFn, or: actFn)
            latentChannels = try c.value(.latentChannels, or: latentChannels)
            normNumGroups = try c.value(.normNumGroups, or: normNumGroups)
            sampleSize = try c.decodeIfPresent(IntOrList.self, forKey: .sampleSize) ?? sampleSize
            scalingFactor = try c.value(.scalingFactor, or: scalingFactor)
            shiftFactor = try c.decodeIfPresent(Double.self, forKey: .shiftFactor)
            latentsMean = try c.decodeIfPresent([Double].self, forKey: .latentsMean)
            latentsStd = try c.decodeIfPresent([Double].self, forKey: .latentsStd)
            forceUpcast = try c.value(.forceUpcast, or: forceUpcast)
            useQuantConv = try c.value(.useQuantConv, or: useQuantConv)
            usePostQuantConv = try c.value(.usePostQuantConv, or: usePostQuantConv)
            midBlockAddAttention = try c.value(.midBlockAddAttention, or: midBlockAddAttention)
        }

        public func validate() throws {
            func reject(_ key: String, _ value: String, _ reason: String) -> ConfigError {
                ConfigError(model: AutoencoderKL.className, key: key, value: value, reason: reason)
            }
            guard !blockOutChannels.isEmpty else { throw reject("block_out_channels", "[]", "needs at least one block") }
            for (i, t) in downBlockTypes.enumerated() where t != "DownEncoderBlock2D" {
                throw reject("down_block_types[\(i)]", json(t), "only DownEncoderBlock2D is implemented")
            }
            for (i, t) in upBlockTypes.enumerated() where t != "UpDecoderBlock2D" {
                throw reject("up_block_types[\(i)]", json(t), "only UpDecoderBlock2D is implemented")
            }
            if downBlockTypes.count != blockOutChannels.count {
                throw reject("down_block_types", "\(downBlockTypes.count) blocks", "must match block_out_channels (\(blockOutChannels.count))")
            }
            if upBlockTypes.count != blockOutChannels.count {
                throw reject("up_block_types", "\(upBlockTypes.count) blocks", "must match block_out_channels (\(blockOutChannels.count))")
            }
            if DiffusersActivation.unary(actFn) == nil {
                throw reject("act_fn", json(actFn), "supported activations are silu, swish, gelu and relu")
            }
            if layersPerBlock < 1 { throw reject("layers_per_block", "\(layersPerBlock)", "must be at least 1") }
            if normNumGroups <= 0 { throw reject("norm_num_groups", "\(normNumGroups)", "must be positive") }
            for (i, ch) in blockOutChannels.enumerated() where ch <= 0 || ch % normNumGroups != 0 {
                throw reject("block_out_channels[\(i)]", "\(ch)", "must be a positive multiple of norm_num_groups (\(normNumGroups))")
            }
            if latentChannels <= 0 { throw reject("latent_channels", "\(latentChannels)", "must be positive") }
            if scalingFactor == 0 || !scalingFactor.isFinite {
                throw reject("scaling_factor", "\(scalingFactor)", "latents are divided by it")
            }
        }
    }
}
