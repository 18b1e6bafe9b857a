import DiffuseCore
import DiffuseGraph

/// diffusers' `AutoencoderTiny` (TAESD), in either weight layout:
/// - `.diffusers`: one file with `encoder.layers.N...` and `decoder.layers.N...`;
/// - `.original`: taesd.py's two files (`taesd_encoder`, `taesd_decoder`), keys `N...` with the
///   decoder's indices one higher (its first layer is the parameter-free Clamp).
///
/// With `use_midblock_gn` (TAEF2, the FLUX.2 tiny autoencoder) the blocks of the encoder's last
/// stage and of the decoder's first stage add `x + pool(x)` before their convolutions, with
/// `pool` = 1x1 conv (no bias), GroupNorm, ReLU, 1x1 conv (no bias).
///
/// The graphs follow diffusers' semantics whatever the layout: the encoder graph takes
/// `sample` in [-1, 1] and returns raw `latents`; the decoder graph takes raw `latents` and
/// returns `sample` in about [-1, 1] (taesd.py's [0, 1] convention is mapped in the graph).
public struct AutoencoderTiny: ImageAutoencoder, Sendable {
    public static let className = "AutoencoderTiny"

    public enum Name {
        public static let latents = "latents"
        public static let sample = "sample"
    }

    /// How the weights are named.
    public enum Layout: String, Codable, Sendable {
        /// diffusers: `encoder.layers.N`, `decoder.layers.N`.
        case diffusers
        /// madebyollin/taesd: separate encoder and decoder files, Sequential indices.
        case original = "taesd-original-keys"
    }

    public let config: Configuration
    public let layout: Layout
    /// The encoder's weights (one file with the original layout).
    public let encoder: EncoderTiny
    /// The decoder's weights (one file with the original layout).
    public let decoder: DecoderTiny

    /// `layout` overrides the config's `layout` key (diffusers when absent).
    public init(config: Configuration, layout: Layout? = nil) throws {
        try config.validate()
        self.config = config
        self.layout = layout ?? config.layout ?? .diffusers
        encoder = try EncoderTiny(config: config, layout: self.layout)
        decoder = try DecoderTiny(config: config, layout: self.layout)
    }

    public init(configPath: String, layout: Layout? = nil) throws {
        try self.init(config: loadConfiguration(Configuration.self, from: configPath), layout: layout)
    }

    /// Both parts' parameters. With the original layout the two lists share names (each part
    /// has its own file): check `encoder` and `decoder` against their files separately.
    public var parameters: [ParameterDeclaration] { encoder.parameters + decoder.parameters }

    public var spatialScaleFactor: Int { 1 << (config.decoderBlockOutChannels.count - 1) }
    public var latentChannels: Int { config.latentChannels }
    public var scalingFactor: Double { config.scalingFactor }
    public var shiftFactor: Double { config.shiftFactor }
    public var forceUpcast: Bool { config.forceUpcast }

    public func decoderGraph(batch: Int, height: Int, width: Int) throws -> Graph {
        try decoder.graph(batch: batch, height: height, width: width)
    }

    public func encoderGraph(batch: Int, height: Int, width: Int) throws -> Graph {
        try encoder.graph(batch: batch, height: height, width: width)
    }
}

/// diffusers' `AutoencoderTinyBlock` (taesd.py's `Block`): `relu(conv(x) + skip(x))` with
/// `conv` = conv3x3, act, conv3x3, act, conv3x3; plus the optional mid-block pool branch.
struct AutoencoderTinyBlock {
    let p: Params
    let conv: [Conv2d]
    let skip: Conv2d?
    let act: UnaryOp
    let pool: (Conv2d, GroupNorm, Conv2d)?

    init(_ p: Params, inChannels: Int, outChannels: Int, act: UnaryOp, pool: AutoencoderTiny.MidblockGN?) {
        self.p = p
        conv = [0, 2, 4].map { Conv2d(p["conv"][$0], $0 == 0 ? inChannels : outChannels, outChannels, kernel: 3, padding: 1) }
        skip = inChannels != outChannels ? Conv2d(p["skip"], inChannels, outChannels, kernel: 1, bias: false) : nil
        self.act = act
        self.pool = pool.map { g in
            let hidden = g.hiddenChannels ?? inChannels * 4
            return (Conv2d(p["pool"][0], inChannels, hidden, kernel: 1, bias: false),
                    GroupNorm(p["pool"][1], groups: g.numGroups, channels: hidden, eps: Float(g.eps)),
                    Conv2d(p["pool"][3], hidden, inChannels, kernel: 1, bias: false))
        }
    }

    func callAsFunction(_ input: Value) -> Value {
        p.scope {
            var x = input
            if let (down, norm, up) = pool { x = x + up(norm(down(x)).relu()) }
            let h = conv[2](conv[1](conv[0](x).unary(act)).unary(act))
            return (h + (skip.map { $0(x) } ?? x)).relu()
        }
    }
}

/// Names a tiny autoencoder's Sequential layer `index` in the chosen layout.
private func layerParams(_ b: GraphBuilder, layout: AutoencoderTiny.Layout, part: String, index: Int) -> Params {
    switch layout {
    case .diffusers: return Params(b)[part]["layers"][index]
    // taesd.py's decoder starts with the parameter-free Clamp that diffusers leaves out.
    case .original: return Params(b)[part == "decoder" ? index + 1 : index]
    }
}

/// diffusers' `EncoderTiny`: conv, blocks, then per stage a stride-2 conv (no bias) and blocks,
/// then a conv to the latent channels. Input in [-1, 1] is mapped to taesd's [0, 1] first.
public struct EncoderTiny: ModelComponent, Sendable {
    public static let className = "EncoderTiny"
    let config: AutoencoderTiny.Configuration
    let layout: AutoencoderTiny.Layout
    public let parameters: [ParameterDeclaration]

    init(config: AutoencoderTiny.Configuration, layout: AutoencoderTiny.Layout) throws {
        self.config = config
        self.layout = layout
        parameters = try probeParameters { b in
            let size = 1 << (config.encoderBlockOutChannels.count - 1)
            b.output("latents", Self.forward(b, config, layout, b.input("sample", shape: [1, config.inChannels, size, size])))
        }
    }

    public func graph(batch: Int, height: Int, width: Int) throws -> Graph {
        try buildGraph { b in
            let x = b.input(AutoencoderTiny.Name.sample, shape: [batch, config.inChannels, height, width])
            b.output(AutoencoderTiny.Name.latents, Self.forward(b, config, layout, x))
        }
    }

    /// Emits the encoder on `x` (in [-1, 1]) with weights named by the layout.
    public func callAsFunction(_ b: GraphBuilder, _ x: Value) -> Value { Self.forward(b, config, layout, x) }

    static func forward(_ b: GraphBuilder, _ c: AutoencoderTiny.Configuration, _ layout: AutoencoderTiny.Layout,
                        _ x: Value) -> Value {
        let act = DiffusersActivation.unary(c.actFn)!
        let channels = c.encoderBlockOutChannels
        var index = 0
        func next() -> Params { defer { index += 1 }; return layerParams(b, layout: layout, part: "encoder", index: index) }
        var h = x.affine(scale: 0.5, shift: 0.5)  // x.add(1).div(2)
        for (i, numBlocks) in c.numEncoderBlocks.enumerated() {
            let ch = channels[i]
            let lp = next()
            let conv = i == 0
                ? Conv2d(lp, c.inChannels, ch, kernel: 3, padding: 1)
                : Conv2d(lp, ch, ch, kernel: 3, attributes: Conv2dAttributes(stride: (2, 2), padding: (1, 1, 1, 1)), bias: false)
            h = lp.scope { conv(h) }
            let pool = c.useMidblockGN && i == channels.count - 1 ? c.midblockGN : nil
            for _ in 0..<numBlocks {
                h = AutoencoderTinyBlock(next(), inChannels: ch, outChannels: ch, act: act, pool: pool)(h)
            }
        }
        let lp = next()
        let convOut = Conv2d(lp, channels.last!, c.latentChannels, kernel: 3, padding: 1)
        return lp.scope { convOut(h) }
    }
}

/// diffusers' `DecoderTiny`: tanh clamp, conv, act, then per stage blocks, a nearest 2x
/// upsample and a conv (no bias), the last stage ending in a conv to the image channels. Output
/// mapped from taesd's [0, 1] to [-1, 1].
public struct DecoderTiny: ModelComponent, Sendable {
    public static let className = "DecoderTiny"
    let config: AutoencoderTiny.Configuration
    let layout: AutoencoderTiny.Layout
    public let parameters: [ParameterDeclaration]

    init(config: AutoencoderTiny.Configuration, layout: AutoencoderTiny.Layout) throws {
        self.config = config
        self.layout = layout
        parameters = try probeParameters { b in
            b.output("sample", Self.forward(b, config, layout, b.input("latents", shape: [1, config.latentChannels, 1, 1])))
        }
    }

    public func graph(batch: Int, height: Int, width: Int) throws -> Graph {
        try buildGraph { b in
            let z = b.input(AutoencoderTiny.Name.latents, shape: [batch, config.latentChannels, height, width])
            b.output(AutoencoderTiny.Name.sample, Self.forward(b, config, layout, z))
        }
    }

    /// Emits the decoder on raw latents `z` with weights named by the layout.
    public func callAsFunction(_ b: GraphBuilder, _ z: Value) -> Value { Self.forward(b, config, layout, z) }

    static func forward(_ b: GraphBuilder, _ c: AutoencoderTiny.Configuration, _ layout: AutoencoderTiny.Layout,
                        _ z: Value) -> Value {
        let act = DiffusersActivation.unary(c.actFn)!
        let channels = c.decoderBlockOutChannels
        var index = 0
        func next() -> Params { defer { index += 1 }; return layerParams(b, layout: layout, part: "decoder", index: index) }
        // taesd's Clamp, `tanh(x / 3) * 3` (a constant in diffusers too, not latent_magnitude).
        var h = (z / 3).tanh() * 3
        let lp = next()
        let convIn = Conv2d(lp, c.latentChannels, channels[0], kernel: 3, padding: 1)
        h = lp.scope { convIn(h) }.unary(act)
        index += 1  // the activation is a layer of the Sequential
        for (i, numBlocks) in c.numDecoderBlocks.enumerated() {
            let isFinal = i == channels.count - 1
            let ch = channels[i]
            let pool = c.useMidblockGN && i == 0 ? c.midblockGN : nil
            for _ in 0..<numBlocks {
                h = AutoencoderTinyBlock(next(), inChannels: ch, outChannels: ch, act: act, pool: pool)(h)
            }
            if !isFinal {
                h = h.upsampleNearest2x()
                index += 1  // nn.Upsample
            }
            let cp = next()
            let conv = Conv2d(cp, ch, isFinal ? c.outChannels : ch, kernel: 3, padding: 1, bias: isFinal)
            h = cp.scope { conv(h) }
        }
        return h.affine(scale: 2, shift: -1)  // x.mul(2).sub(1)
    }
}

extension AutoencoderTiny {
    /// taesd.py's mid-block GroupNorm pool branch (TAEF2).
    public struct MidblockGN: Codable, Sendable, Equatable {
        /// Width of the branch; taesd.py uses 4 x the block's channels.
        public var hiddenChannels: Int?
        public var numGroups: Int
        public var eps: Double

        enum CodingKeys: String, CodingKey {
            case hiddenChannels = "hidden_channels", numGroups = "num_groups", eps
        }

        public init(hiddenChannels: Int? = nil, numGroups: Int = 4, eps: Double = 1e-5) {
            self.hiddenChannels = hiddenChannels
            self.numGroups = numGroups
            self.eps = eps
        }

        public init(from decoder: Swift.Decoder) throws {
            self.init()
            let c = try decoder.container(keyedBy: CodingKeys.self)
            hiddenChannels = try c.decodeIfPresent(Int.self, forKey: .hiddenChannels)
            numGroups = try c.value(.numGroups, or: numGroups)
            eps = try c.value(.eps, or: eps)
        }
    }

    /// `vae_tiny/config.json` (diffusers' AutoencoderTiny keys) plus `use_midblock_gn`,
    /// `midblock_gn` and `layout` for taesd.py's checkpoints.
    public struct Configuration: Codable, Sendable {
        public var inChannels: Int
        public var outChannels: Int
        public var encoderBlockOutChannels: [Int]
        public var decoderBlockOutChannels: [Int]
        public var actFn: String
        public var upsampleFn: String
        public var latentChannels: Int
        public var upsamplingScalingFactor: Int
        public var numEncoderBlocks: [Int]
        public var numDecoderBlocks: [Int]
        public var latentMagnitude: Double
        public var latentShift: Double
        public var forceUpcast: Bool
        public var scalingFactor: Double
        public var shiftFactor: Double
        public var useMidblockGN: Bool
        public var midblockGN: MidblockGN
        public var layout: Layout?

        enum CodingKeys: String, CodingKey {
            case inChannels = "in_channels", outChannels = "out_channels"
            case encoderBlockOutChannels = "encoder_block_out_channels", decoderBlockOutChannels = "decoder_block_out_channels"
            case actFn = "act_fn", upsampleFn = "upsample_fn", latentChannels = "latent_channels"
            case upsamplingScalingFactor = "upsampling_scaling_factor", numEncoderBlocks = "num_encoder_blocks"
            case numDecoderBlocks = "num_decoder_blocks", latentMagnitude = "latent_magnitude", latentShift = "latent_shift"
            case forceUpcast = "force_upcast", scalingFactor = "scaling_factor", shiftFactor = "shift_factor"
            case useMidblockGN = "use_midblock_gn", midblockGN = "midblock_gn", layout
        }

        /// diffusers' defaults (TAESD for SD 1.x/2.x/SDXL).
        public init() {
            inChannels = 3
            outChannels = 3
            encoderBlockOutChannels = [64, 64, 64, 64]
            decoderBlockOutChannels = [64, 64, 64, 64]
            actFn = "relu"
            upsampleFn = "nearest"
            latentChannels = 4
            upsamplingScalingFactor = 2
            numEncoderBlocks = [1, 3, 3, 3]
            numDecoderBlocks = [3, 3, 3, 1]
            latentMagnitude = 3
            latentShift = 0.5
            forceUpcast = false
            scalingFactor = 1
            shiftFactor = 0
            useMidblockGN = false
            midblockGN = MidblockGN()
            layout = nil
        }

        public init(from decoder: Swift.Decoder) throws {
            self.init()
            let c = try decoder.container(keyedBy: CodingKeys.self)
            inChannels = try c.value(.inChannels, or: inChannels)
            outChannels = try c.value(.outChannels, or: outChannels)
            encoderBlockOutChannels = try c.value(.encoderBlockOutChannels, or: encoderBlockOutChannels)
            decoderBlockOutChannels = try c.value(.decoderBlockOutChannels, or: decoderBlockOutChannels)
            actFn = try c.value(.actFn, or: actFn)
            upsampleFn = try c.value(.upsampleFn, or: upsampleFn)
            latentChannels = try c.value(.latentChannels, or: latentChannels)
            upsamplingScalingFactor = try c.value(.upsamplingScalingFactor, or: upsamplingScalingFactor)
            numEncoderBlocks = try c.value(.numEncoderBlocks, or: numEncoderBlocks)
            numDecoderBlocks = try c.value(.numDecoderBlocks, or: numDecoderBlocks)
            latentMagnitude = try c.value(.latentMagnitude, or: latentMagnitude)
            latentShift = try c.value(.latentShift, or: latentShift)
            forceUpcast = try c.value(.forceUpcast, or: forceUpcast)
            scalingFactor = try c.value(.scalingFactor, or: scalingFactor)
            shiftFactor = try c.value(.shiftFactor, or: shiftFactor)
            useMidblockGN = try c.value(.useMidblockGN, or: useMidblockGN)
            midblockGN = try c.value(.midblockGN, or: midblockGN)
            if let name = try c.decodeIfPresent(String.self, forKey: .layout) {
                guard let l = Layout(rawValue: name) else {
                    throw ConfigError(model: AutoencoderTiny.className, key: "layout", value: json(name),
                                      reason: "known layouts are \"diffusers\" and \"taesd-original-keys\"")
                }
                layout = l
            }
        }

        public func validate() throws {
            func reject(_ key: String, _ value: String, _ reason: String) -> ConfigError {
                ConfigError(model: AutoencoderTiny.className, key: key, value: value, reason: reason)
            }
            if DiffusersActivation.unary(actFn) == nil {
                throw reject("act_fn", json(actFn), "supported activations are relu, silu, swish and gelu")
            }
            if upsampleFn != "nearest" { throw reject("upsample_fn", json(upsampleFn), "only \"nearest\" is implemented") }
            if upsamplingScalingFactor != 2 {
                throw reject("upsampling_scaling_factor", "\(upsamplingScalingFactor)", "only 2 is implemented")
            }
            if encoderBlockOutChannels.isEmpty || numEncoderBlocks.count != encoderBlockOutChannels.count {
                throw reject("num_encoder_blocks", "\(numEncoderBlocks)", "needs one entry per encoder_block_out_channels entry")
            }
            if decoderBlockOutChannels.isEmpty || numDecoderBlocks.count != decoderBlockOutChannels.count {
                throw reject("num_decoder_blocks", "\(numDecoderBlocks)", "needs one entry per decoder_block_out_channels entry")
            }
            // diffusers builds each stage's first conv as (channels[i] -> channels[i]), which only
            // chains when all stages have the same width.
            if Set(encoderBlockOutChannels).count != 1 {
                throw reject("encoder_block_out_channels", "\(encoderBlockOutChannels)", "stages of different widths do not chain")
            }
            if Set(decoderBlockOutChannels).count != 1 {
                throw reject("decoder_block_out_channels", "\(decoderBlockOutChannels)", "stages of different widths do not chain")
            }
            if latentMagnitude <= 0 { throw reject("latent_magnitude", "\(latentMagnitude)", "must be positive") }
            if scalingFactor == 0 || !scalingFactor.isFinite {
                throw reject("scaling_factor", "\(scalingFactor)", "latents are divided by it")
            }
            if useMidblockGN {
                let hidden = midblockGN.hiddenChannels ?? encoderBlockOutChannels[0] * 4
                if midblockGN.numGroups <= 0 || hidden % midblockGN.numGroups != 0 {
                    throw reject("midblock_gn.num_groups", "\(midblockGN.numGroups)",
                                 "must divide the branch's \(hidden) channels")
                }
            }
        }
    }
}
