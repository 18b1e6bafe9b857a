import DiffuseCore
import DiffuseGraph

/// diffusers' `T2IAdapter`: a small convolutional network that turns a conditioning image (a
/// sketch, edges, depth, a pose) into one feature map per UNet level. The UNet adds them inside
/// its down blocks (`down_intrablock_additional_residuals`). Unlike a ControlNet it runs once per
/// generation, not once per step.
///
/// The image is pixel-unshuffled by `downscale_factor` (diffusers' `PixelUnshuffle`); then a body
/// of blocks runs, each adding one feature:
/// - `full_adapter` (SD 1.x/2.x): `conv_in`, then a block at the unshuffled size and one per
///   further width, each halving the size first (average pooling, ceil mode). The features are
///   at latent size, then /2, /4, …
/// - `full_adapter_xl` (SDXL, unshuffled by 16): one halving only, before the third block.
/// - `light_adapter`: no `conv_in`; each block squeezes to a quarter width, runs its resnets and
///   widens again. It has one more halving block than widths.
public struct T2IAdapter: ModelComponent, Sendable {
    public static let className = "T2IAdapter"

    /// Graph names: the image [B, in_channels, H, W] in [0, 1], and feature i.
    public enum Name {
        public static let image = "image"
        public static func feature(_ i: Int) -> String { "feature_\(i)" }
    }

    public enum AdapterType: String, Codable, Sendable, CaseIterable {
        case fullAdapter = "full_adapter"
        case fullAdapterXL = "full_adapter_xl"
        case lightAdapter = "light_adapter"
    }

    /// `config.json` of a T2IAdapter folder; missing keys take diffusers' defaults.
    public struct Configuration: Codable, Sendable, Equatable {
        public var inChannels = 3
        public var channels = [320, 640, 1280, 1280]
        public var numResBlocks = 2
        public var downscaleFactor = 8
        public var adapterType = AdapterType.fullAdapter

        enum CodingKeys: String, CodingKey {
            case inChannels = "in_channels", channels, numResBlocks = "num_res_blocks"
            case downscaleFactor = "downscale_factor", adapterType = "adapter_type"
        }

        public init() {}

        public init(from decoder: Swift.Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            inChannels = try c.value(.inChannels, or: inChannels)
            channels = try c.value(.channels, or: channels)
            numResBlocks = try c.value(.numResBlocks, or: numResBlocks)
            downscaleFactor = try c.value(.downscaleFactor, or: downscaleFactor)
            guard let type = try c.decodeIfPresent(String.self, forKey: .adapterType) else { return }
            guard let known = AdapterType(rawValue: type) else {
                throw ConfigError(model: T2IAdapter.className, key: "adapter_type", value: JSON.quote(type),
                                  reason: "diffusers knows \(AdapterType.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            adapterType = known
        }

        func validate() throws {
            func fail(_ key: String, _ value: String, _ why: String) -> ConfigError {
                ConfigError(model: T2IAdapter.className, key: key, value: value, reason: why)
            }
            guard inChannels > 0 else { throw fail("in_channels", "\(inChannels)", "must be positive") }
            guard !channels.isEmpty, channels.allSatisfy({ $0 > 0 }) else {
                throw fail("channels", "\(channels)", "must be a list of positive widths")
            }
            guard numResBlocks >= 0 else { throw fail("num_res_blocks", "\(numResBlocks)", "must be 0 or more") }
            guard downscaleFactor > 0 else { throw fail("downscale_factor", "\(downscaleFactor)", "must be positive") }
            if adapterType == .lightAdapter, let narrow = channels.first(where: { $0 < 4 }) {
                throw fail("channels", "\(channels)", "a light adapter's blocks work at a quarter of each width, and \(narrow) has none")
            }
            if adapterType == .fullAdapterXL {
                // Its blocks after the third keep their width but are built from it, not from the previous one.
                for i in 3..<max(3, channels.count) where channels[i] != channels[i - 1] {
                    throw fail("channels", "\(channels)", "full_adapter_xl's block \(i) takes width \(channels[i]) but gets \(channels[i - 1])")
                }
            }
        }
    }

    /// One block of the body: widths, whether it halves the size first, and (light) its inner width.
    struct Block {
        var inChannels: Int, outChannels: Int, down: Bool
    }

    public let config: Configuration
    public let parameters: [ParameterDeclaration]

    public init(config: Configuration) throws {
        try config.validate()
        self.config = config
        let factor = Self.totalDownscaleFactor(config)
        parameters = try probeParameters { b in
            _ = Self.emit(b, config, batch: 1, height: factor, width: factor)
        }
    }

    /// Reads a T2IAdapter's config.json text; `origin` names it in errors.
    public init(configJSON bytes: [UInt8], origin: String) throws {
        let config = try decodeConfiguration(Configuration.self, from: bytes, origin: origin)
        do { try self.init(config: config) } catch let e as ConfigError { throw ConfigFileError(path: origin, message: e.description) }
    }

    /// diffusers' `downscale_factor`: the pixel unshuffle's. Image sides must be multiples of it.
    public var downscaleFactor: Int { config.downscaleFactor }

    /// diffusers' `total_downscale_factor`: the unshuffle times each halving of the body.
    public var totalDownscaleFactor: Int { Self.totalDownscaleFactor(config) }

    static func totalDownscaleFactor(_ config: Configuration) -> Int { config.downscaleFactor << blocks(config).filter(\.down).count }

    /// The features' shapes [channels, height, width] for an image of `height` × `width` (sides
    /// multiples of `downscaleFactor`): ceil-mode pooling rounds odd sizes up, as the UNet's
    /// stride-2 convolutions do.
    public func featureShapes(height: Int, width: Int) -> [[Int]] {
        var (h, w) = (height / config.downscaleFactor, width / config.downscaleFactor)
        return Self.blocks(config).map { block in
            if block.down { (h, w) = ((h + 1) / 2, (w + 1) / 2) }
            return [block.outChannels, h, w]
        }
    }

    /// The graph for `batch` images of `height` × `width`: input `image`, outputs `feature_<i>`.
    public func graph(batch: Int, height: Int, width: Int) throws -> Graph {
        guard height > 0, width > 0, height % downscaleFactor == 0, width % downscaleFactor == 0 else {
            throw ConfigError(model: Self.className, key: "downscale_factor", value: "\(downscaleFactor)",
                              reason: "an image of \(width)x\(height) does not split into \(downscaleFactor)-pixel cells")
        }
        return try buildGraph { _ = Self.emit($0, config, batch: batch, height: height, width: width) }
    }

    static func emit(_ b: GraphBuilder, _ config: Configuration, batch: Int, height: Int, width: Int) -> [Value] {
        let image = b.input(Name.image, shape: [batch, config.inChannels, height, width])
        let features = forward(Params(b)["adapter"], config, image)
        for (i, f) in features.enumerated() { b.output(Name.feature(i), f) }
        return features
    }

    /// The body's blocks as diffusers' `FullAdapter`, `FullAdapterXL` and `LightAdapter` build them.
    static func blocks(_ config: Configuration) -> [Block] {
        let c = config.channels
        switch config.adapterType {
        case .fullAdapter:
            return [Block(inChannels: c[0], outChannels: c[0], down: false)]
                + (1..<c.count).map { Block(inChannels: c[$0 - 1], outChannels: c[$0], down: true) }
        case .fullAdapterXL:
            return c.indices.map { i in
                switch i {
                case 1: return Block(inChannels: c[0], outChannels: c[1], down: false)
                case 2: return Block(inChannels: c[1], outChannels: c[2], down: true)
                default: return Block(inChannels: c[i], outChannels: c[i], down: false)
                }
            }
        case .lightAdapter:
            let unshuffled = config.inChannels * config.downscaleFactor * config.downscaleFactor
            return [Block(inChannels: unshuffled, outChannels: c[0], down: false)]
                + (0..<(c.count - 1)).map { Block(inChannels: c[$0], outChannels: c[$0 + 1], down: true) }
                + [Block(inChannels: c.last!, outChannels: c.last!, down: true)]
        }
    }

    /// The forward pass under `p` (`adapter.` in diffusers' state dict): one feature per block.
    public static func forward(_ p: Params, _ config: Configuration, _ image: Value) -> [Value] {
        let r = config.downscaleFactor
        var x = image.pixelUnshuffle(r)
        let light = config.adapterType == .lightAdapter
        if !light {
            let convIn = Conv2d(p["conv_in"], config.inChannels * r * r, config.channels[0], kernel: 3, padding: 1)
            x = p["conv_in"].scope { convIn(x) }
        }
        var features: [Value] = []
        for (i, block) in blocks(config).enumerated() {
            let q = p["body"][i]
            if block.down { x = q.scope { x.avgPool2x2Ceil() } }
            // `AdapterResnetBlock`: 3×3, ReLU, 1×1, plus the input; the light one's second is 3×3 too.
            func resnets(_ x: Value, width: Int) -> Value {
                var h = x
                for j in 0..<config.numResBlocks {
                    let rp = q["resnets"][j]
                    let block1 = Conv2d(rp["block1"], width, width, kernel: 3, padding: 1)
                    let block2 = light ? Conv2d(rp["block2"], width, width, kernel: 3, padding: 1) : Conv2d(rp["block2"], width, width, kernel: 1)
                    let input = h
                    h = rp.scope { block2(block1(input).relu()) + input }
                }
                return h
            }
            if light {
                let inner = block.outChannels / 4
                let inConv = Conv2d(q["in_conv"], block.inChannels, inner, kernel: 1)
                let outConv = Conv2d(q["out_conv"], inner, block.outChannels, kernel: 1)
                let squeezed = q["in_conv"].scope { inConv(x) }
                x = q["out_conv"].scope { outConv(resnets(squeezed, width: inner)) }
            } else {
                if block.inChannels != block.outChannels {
                    let inConv = Conv2d(q["in_conv"], block.inChannels, block.outChannels, kernel: 1)
                    x = q["in_conv"].scope { inConv(x) }
                }
                x = resnets(x, width: block.outChannels)
            }
            features.append(x)
        }
        return features
    }
}
