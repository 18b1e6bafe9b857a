import DiffuseCore
import DiffuseGraph

/// transformers' `DPTForDepthEstimation`: the depth estimator of diffusers' depth-to-image
/// pipeline (`depth_estimator/` of stabilityai/stable-diffusion-2-depth, Intel/dpt-hybrid-midas).
///
/// A ViT reads the picture, either from patches (DPT) or from the feature map of a BiT ResNet
/// (DPT-Hybrid, whose first two stages also feed the neck directly). The neck "reassembles"
/// chosen token layers into feature maps of several resolutions, fuses them from coarse to fine
/// with residual conv units and 2x bilinear upsampling, and the head turns the finest into one
/// non-negative relative inverse depth per pixel (larger is nearer).
///
/// Graph input `pixel_values` [B,3,H,W] as `DPTImageProcessor` makes them; output
/// `predicted_depth` [B,H,W]. BiT's convolutions standardize their weights
/// (`WeightStandardizedConv2d`); that is done once, on the weights as they load
/// (`standardizingWeights`), not in the graph.
public struct DPTForDepthEstimation: ModelComponent, Sendable {
    public static let className = "DPTForDepthEstimation"
    public static let pixelValues = "pixel_values"
    public static let predictedDepth = "predicted_depth"
    /// Where BiT's parameters live; every 4-D one is a standardized convolution weight.
    static let backbonePrefix = "dpt.embeddings.backbone."
    /// `WeightStandardizedConv2d`'s epsilon as BiT builds every one of its convolutions.
    static let standardizationEps = 1e-8

    public let config: DPTConfig
    public let parameters: [ParameterDeclaration]

    public init(config: DPTConfig) throws {
        try config.validate()
        self.config = config
        let side = config.imageSize
        parameters = try probeParameters { b in
            let x = b.input(Self.pixelValues, shape: [1, config.numChannels, side, side])
            b.output(Self.predictedDepth, Self.forward(Params(b), config, x))
        }
    }

    public init(configPath: String) throws {
        try self.init(config: loadConfiguration(DPTConfig.self, from: configPath))
    }

    /// Tensors a transformers checkpoint holds that do not affect `predicted_depth`: the final
    /// layer norm (the neck reads the layers' own outputs), the first fusion layer's residual
    /// unit (it has no residual to read), BatchNorm's step counter and BiT's classifier parts.
    public func isIgnoredBuffer(_ name: String) -> Bool {
        name.hasPrefix("dpt.layernorm.") || name.hasPrefix("neck.fusion_stage.layers.0.residual_layer1.")
            || name.hasSuffix(".num_batches_tracked") || name.hasPrefix("dpt.pooler.")
    }

    /// The picture size the model takes: DPT-Hybrid only its `image_size` (transformers refuses
    /// others); DPT any size whose patch grid is square, multiples of the patch size.
    public func checkInputSize(height: Int, width: Int) throws {
        let c = config
        if c.isHybrid {
            guard height == c.imageSize && width == c.imageSize else {
                throw ConfigError(model: Self.className, key: "image_size", value: "\(c.imageSize)",
                                  reason: "DPT-Hybrid takes \(c.imageSize)x\(c.imageSize) pictures; this one is \(width)x\(height)")
            }
        } else {
            guard height == width, height >= c.patchSize else {
                throw ConfigError(model: Self.className, key: "patch_size", value: "\(c.patchSize)",
                                  reason: "DPT reads a square grid of patches; a \(width)x\(height) picture does not make one")
            }
        }
    }

    public func graph(batch: Int, height: Int, width: Int) throws -> Graph {
        try checkInputSize(height: height, width: width)
        return try buildGraph { b in
            let x = b.input(Self.pixelValues, shape: [batch, config.numChannels, height, width])
            b.output(Self.predictedDepth, Self.forward(Params(b), config, x))
        }
    }

    /// `source` with BiT's convolution weights standardized as `WeightStandardizedConv2d`
    /// does at every call: per output channel, `(w − mean) / sqrt(var + 1e-8)` (biased variance).
    public func standardizingWeights(_ source: TensorSource) -> TensorSource {
        let names = Set(parameters.filter { $0.name.hasPrefix(Self.backbonePrefix) && $0.shape.count == 4 }.map(\.name))
        return StandardizedConvolutionWeights(base: source, names: names, eps: Self.standardizationEps)
    }

    // MARK: forward

    static func forward(_ root: Params, _ c: DPTConfig, _ pixels: Value) -> Value {
        let p = root["dpt"]
        let embeddings = p["embeddings"]
        let batch = pixels.shape[0], d = c.hiddenSize
        // Embeddings: tokens of patches or of BiT's last feature map, a class token, positions.
        var features: [Value] = []
        let patches: Value
        if c.isHybrid {
            let bit = BiTBackbone(config: c.backboneConfig)
            let maps = bit.forward(embeddings["backbone"]["bit"], pixels)
            features = Array(maps.prefix(2))
            let last = maps[2]
            let projection = Conv2d(embeddings["projection"], c.backboneFeatmapShape[1], d, kernel: 1)
            patches = embeddings["projection"].scope { projection(last) }
        } else {
            let projection = Conv2d(embeddings["patch_embeddings"]["projection"], c.numChannels, d, kernel: c.patchSize,
                                    stride: c.patchSize)
            patches = embeddings["patch_embeddings"].scope { projection(pixels) }
        }
        let (gh, gw) = (patches.shape[2], patches.shape[3])
        let grid = c.imageSize / c.patchSize
        let cls = embeddings.weight("cls_token", [1, 1, d])
        let positions = embeddings.weight("position_embeddings", [1, grid * grid + 1, d])
        var h = embeddings.scope { () -> Value in
            let tokens = patches.reshape([batch, d, gh * gw]).transpose(1, 2)
            // transformers' _resize_pos_embed: the position grid resized bilinearly to the patch
            // grid (the same size for DPT-Hybrid, where nothing changes).
            let grid2d = positions.slice(axis: 1, start: 1, length: grid * grid).reshape([1, grid, grid, d]).permute([0, 3, 1, 2])
            let resized = grid2d.resizeBilinear(height: gh, width: gw, alignCorners: false).permute([0, 2, 3, 1])
                .reshape([1, gh * gw, d])
            let table = Value.concat([positions.slice(axis: 1, start: 0, length: 1), resized], axis: 1)
            return Value.concat(Array(repeating: cls, count: batch) + [tokens], axis: 1) + table
        }

        // The encoder; the neck reads the outputs of layers backbone_out_indices.
        let wanted = c.isHybrid ? Array(c.backboneOutIndices.dropFirst(2)) : c.backboneOutIndices
        var layerOutputs: [Int: Value] = [:]
        for l in 0...(wanted.max() ?? 0) {
            h = ViTLayer(p["encoder"]["layer"][l], c)(h)
            layerOutputs[l] = h
        }
        let tokenLayers = wanted.map { layerOutputs[$0]! }
        let hidden = features + tokenLayers
        return head(root["head"], c, neck(root["neck"], c, hidden, grid: (gh, gw)))
    }

    /// transformers' `DPTViTLayer`: pre-norm attention and MLP, each with a residual.
    struct ViTLayer {
        let p: Params
        let c: DPTConfig
        init(_ p: Params, _ c: DPTConfig) { self.p = p; self.c = c }

        func callAsFunction(_ x: Value) -> Value {
            let d = c.hiddenSize, eps = Float(c.layerNormEps)
            let act = TransformersActivation.unary(c.hiddenAct)!
            let attention = p["attention"]
            let q = Linear(attention["attention"]["query"], d, d, bias: c.qkvBias)
            let k = Linear(attention["attention"]["key"], d, d, bias: c.qkvBias)
            let v = Linear(attention["attention"]["value"], d, d, bias: c.qkvBias)
            let out = Linear(attention["output"]["dense"], d, d)
            let before = LayerNorm(p["layernorm_before"], d, eps: eps), after = LayerNorm(p["layernorm_after"], d, eps: eps)
            let up = Linear(p["intermediate"]["dense"], d, c.intermediateSize), down = Linear(p["output"]["dense"], c.intermediateSize, d)
            let h = p["attention"].scope { () -> Value in
                let n = before(x)
                return out(q(n).attention(k(n), v(n), heads: c.numAttentionHeads)) + x
            }
            return p.scope { down(up(after(h)).unary(act)) + h }
        }
    }

    /// transformers' `DPTNeck`: reassemble, a 3x3 convolution each to fusion_hidden_size, then
    /// fusion from the coarsest map to the finest; returns the fused maps, coarsest first.
    static func neck(_ p: Params, _ c: DPTConfig, _ hidden: [Value], grid: (Int, Int)) -> [Value] {
        let act = TransformersActivation.unary(c.hiddenAct)!
        let d = c.hiddenSize, ignored = Set(c.isHybrid ? c.neckIgnoreStages : [])  // transformers keeps them for the hybrid alone
        let reassemble = p["reassemble_stage"]
        var maps: [Value] = []
        for (i, x) in hidden.enumerated() {
            guard !ignored.contains(i) else { maps.append(x); continue }
            let layer = reassemble["layers"][i]
            var h = layer.scope { () -> Value in
                let batch = x.shape[0], tokens = x.shape[1] - 1
                let cls = x.slice(axis: 1, start: 0, length: 1)
                var t = x.slice(axis: 1, start: 1, length: tokens)
                switch c.readoutType {
                case "project":
                    let project = Linear(reassemble["readout_projects"][i][0], 2 * d, d)
                    let readout = Value.concat(Array(repeating: cls, count: tokens), axis: 1)
                    t = project(Value.concat([t, readout], axis: 2)).unary(act)
                case "add":
                    t = t + cls
                default:
                    break
                }
                return t.transpose(1, 2).reshape([batch, d, grid.0, grid.1])
            }
            let channels = c.neckHiddenSizes[i], factor = c.reassembleFactors[i]
            let projection = Conv2d(layer["projection"], d, channels, kernel: 1)
            h = layer["projection"].scope { projection(h) }
            if factor > 1 {
                h = layer["resize"].scope { convTranspose(layer["resize"], h, channels: channels, factor: Int(factor)) }
            } else if factor < 1 {
                let resize = Conv2d(layer["resize"], channels, channels, kernel: 3, stride: Int(1 / factor), padding: 1)
                h = layer["resize"].scope { resize(h) }
            }
            maps.append(h)
        }
        let fused = maps.enumerated().map { i, x -> Value in
            let conv = Conv2d(p["convs"][i], c.neckHiddenSizes[i], c.fusionHiddenSize, kernel: 3, padding: 1, bias: false)
            return p["convs"][i].scope { conv(x) }
        }
        // DPTFeatureFusionStage: the coarsest map alone, then each finer one as a residual.
        var out: [Value] = []
        var state: Value? = nil
        for (j, x) in fused.reversed().enumerated() {
            let layer = p["fusion_stage"]["layers"][j]
            var h = x
            if let previous = state {
                let residual = x.shape == previous.shape ? x
                    : x.resizeBilinear(height: previous.shape[2], width: previous.shape[3], alignCorners: false)
                h = layer.scope { previous + preActivationResidual(layer["residual_layer1"], c, residual) }
            }
            h = preActivationResidual(layer["residual_layer2"], c, h)
            let projection = Conv2d(layer["projection"], c.fusionHiddenSize, c.fusionHiddenSize, kernel: 1)
            h = layer.scope { projection(h.resizeBilinear(height: 2 * h.shape[2], width: 2 * h.shape[3], alignCorners: true)) }
            out.append(h)
            state = h
        }
        return out
    }

    /// transformers' `DPTPreActResidualLayer`: ReLU, 3x3 conv (BatchNorm), ReLU, 3x3 conv
    /// (BatchNorm), plus the input.
    static func preActivationResidual(_ p: Params, _ c: DPTConfig, _ x: Value) -> Value {
        let f = c.fusionHiddenSize
        let batchNorm = c.useBatchNormInFusionResidual
        let bias = c.useBiasInFusionResidual ?? !batchNorm
        let conv1 = Conv2d(p["convolution1"], f, f, kernel: 3, padding: 1, bias: bias)
        let conv2 = Conv2d(p["convolution2"], f, f, kernel: 3, padding: 1, bias: bias)
        return p.scope {
            var h = conv1(x.relu())
            if batchNorm { h = batchNorm2d(p["batch_norm1"], h) }
            h = conv2(h.relu())
            if batchNorm { h = batchNorm2d(p["batch_norm2"], h) }
            return h + x
        }
    }

    /// torch.nn.BatchNorm2d in eval mode, from its running statistics (eps 1e-5).
    static func batchNorm2d(_ p: Params, _ x: Value) -> Value {
        let c = x.shape[1]
        let scale = p.weight("weight", [c]) * p.weight("running_var", [c]).affine(scale: 1, shift: 1e-5).unary(.rsqrt)
        let shift = p.weight("bias", [c]) - p.weight("running_mean", [c]) * scale
        return x * scale.reshape([1, c, 1, 1]) + shift.reshape([1, c, 1, 1])
    }

    /// torch.nn.ConvTranspose2d(C, C, kernel_size=f, stride=f): windows do not overlap, so it
    /// is a matrix product per pixel (weight [C_in, C_out·f·f]) and a pixel shuffle.
    static func convTranspose(_ p: Params, _ x: Value, channels: Int, factor f: Int) -> Value {
        let (n, cIn, h, w) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3])
        let weight = p.weight("weight", [cIn, channels, f, f]).reshape([1, cIn, channels * f * f])
        let bias = p.weight("bias", [channels])
        let pixels = x.reshape([n, cIn, h * w]).transpose(1, 2).reshape([1, n * h * w, cIn])
        let y = pixels.matmul(weight).reshape([n, h, w, channels, f, f]).permute([0, 3, 1, 4, 2, 5])
            .reshape([n, channels, h * f, w * f])
        return y + bias.reshape([1, channels, 1, 1])
    }

    /// transformers' `DPTDepthEstimationHead` on the finest fused map.
    static func head(_ p: Params, _ c: DPTConfig, _ fused: [Value]) -> Value {
        let index = c.headInIndex < 0 ? fused.count + c.headInIndex : c.headInIndex
        var h = fused[index]
        let f = c.fusionHiddenSize
        if c.addProjection {
            let projection = Conv2d(p["projection"], 256, 256, kernel: 3, padding: 1)
            h = p["projection"].scope { projection(h).relu() }
        }
        let head = p["head"]
        let conv0 = Conv2d(head[0], f, f / 2, kernel: 3, padding: 1)
        let conv2 = Conv2d(head[2], f / 2, 32, kernel: 3, padding: 1)
        let conv4 = Conv2d(head[4], 32, 1, kernel: 1)
        return head.scope {
            let up = conv0(h)
            let y = conv4(conv2(up.resizeBilinear(height: 2 * up.shape[2], width: 2 * up.shape[3], alignCorners: true)).relu()).relu()
            return y.reshape([y.shape[0], y.shape[2], y.shape[3]])
        }
    }
}

/// transformers' BiT (`BitModel` with `layer_type="bottleneck"`, ResNet v1.5 blocks), as
/// DPT-Hybrid uses it: the feature maps of its `out_features` stages.
struct BiTBackbone {
    let config: BiTConfig

    /// `(before, after)` padding of one side for transformers' `get_padding_value`: "SAME" is
    /// static for stride 1 and an odd span, else TF-style dynamic (`DynamicPad2d`, known here
    /// from the input size); no setting is PyTorch's default; "VALID" none.
    func padding(_ size: Int, kernel k: Int, stride s: Int, dilation d: Int = 1) -> (Int, Int) {
        switch config.globalPadding?.uppercased() {
        case "SAME":
            if s == 1 && (d * (k - 1)) % 2 == 0 { let p = d * (k - 1) / 2; return (p, p) }
            return Self.dynamicPadding(size, kernel: k, stride: s, dilation: d)
        case "VALID":
            return (0, 0)
        default:
            let p = ((s - 1) + d * (k - 1)) / 2
            return (p, p)
        }
    }

    /// A `WeightStandardizedConv2d` (its weight standardized on load) with BiT's padding.
    func conv(_ p: Params, _ x: Value, _ out: Int, kernel: Int, stride: Int = 1, dilation: Int = 1) -> Value {
        let (top, bottom) = padding(x.shape[2], kernel: kernel, stride: stride, dilation: dilation)
        let (left, right) = padding(x.shape[3], kernel: kernel, stride: stride, dilation: dilation)
        let attributes = Conv2dAttributes(stride: (stride, stride), padding: (top, bottom, left, right), dilation: (dilation, dilation))
        let conv = Conv2d(p, x.shape[1], out, kernel: kernel, attributes: attributes, bias: false)
        return p.scope { conv(x) }
    }

    /// BiT's `hidden_act` (ReLU).
    var activation: UnaryOp { TransformersActivation.unary(config.hiddenAct)! }

    /// `BitGroupNormActivation` (the activation unless `activation` is false).
    func norm(_ p: Params, _ x: Value, activation: Bool = true) -> Value {
        let n = GroupNorm(p, groups: config.numGroups, channels: x.shape[1], eps: 1e-5)
        return p.scope { activation ? n(x).unary(self.activation) : n(x) }
    }

    /// The stem's output and each stage's, up to the last stage named in `out_features`; returns
    /// those named, in order.
    func forward(_ p: Params, _ pixels: Value) -> [Value] {
        let c = config
        let stem = p["embedder"]
        var h = conv(stem["convolution"], pixels, c.embeddingSize, kernel: 7, stride: 2)
        if c.globalPadding?.uppercased() != "SAME" { h = stem.scope { h.zeroPad2d(top: 1, bottom: 1, left: 1, right: 1) } }
        h = norm(stem["norm"], h)
        h = stem.scope { () -> Value in
            var x = h
            if c.embeddingDynamicPadding {
                let (top, bottom) = BiTBackbone.dynamicPadding(x.shape[2], kernel: 3, stride: 2)
                let (left, right) = BiTBackbone.dynamicPadding(x.shape[3], kernel: 3, stride: 2)
                x = x.zeroPad2d(top: top, bottom: bottom, left: left, right: right)
            }
            return x.maxPool2d(kernel: (3, 3), stride: (2, 2))
        }
        var states = [h]
        let last = c.outStages.max() ?? 0
        var currentStride = 4, dilation = 1
        for (s, (depth, size)) in zip(c.depths, c.hiddenSizes).enumerated() where s < last {
            let out = BiTConfig.makeDivisible(Double(size * c.widthFactor))
            var stride = s == 0 ? 1 : 2
            if currentStride >= c.outputStride { dilation *= stride; stride = 1 }
            currentStride *= stride
            var firstDilation = dilation == 1 || dilation == 2 ? 1 : 2
            for l in 0..<depth {
                h = bottleneck(p["encoder"]["stages"][s]["layers"][l], h, out: out, stride: l == 0 ? stride : 1,
                               dilation: firstDilation, first: l == 0)
                firstDilation = dilation
            }
            states.append(h)
        }
        return c.outStages.map { states[$0] }
    }

    /// `DynamicPad2d`: TF-style "same" padding of one side, the odd pixel after.
    static func dynamicPadding(_ size: Int, kernel k: Int, stride s: Int, dilation d: Int = 1) -> (Int, Int) {
        let total = Swift.max((size + s - 1) / s * s - s + (k - 1) * d + 1 - size, 0)
        return (total / 2, total - total / 2)
    }

    /// `BitBottleneckLayer`: 1x1, 3x3 (strided), 1x1 with GroupNorms, the input (downsampled in a
    /// stage's first layer) added before the last ReLU.
    func bottleneck(_ p: Params, _ x: Value, out: Int, stride: Int, dilation: Int, first: Bool) -> Value {
        let mid = BiTConfig.makeDivisible(Double(out) * 0.25)
        var shortcut = x
        if first {
            let down = p["downsample"]
            shortcut = norm(down["norm"], conv(down["conv"], x, out, kernel: 1, stride: stride), activation: false)
        }
        var h = norm(p["norm1"], conv(p["conv1"], x, mid, kernel: 1))
        h = norm(p["norm2"], conv(p["conv2"], h, mid, kernel: 3, stride: stride, dilation: dilation))
        h = norm(p["norm3"], conv(p["conv3"], h, out, kernel: 1), activation: false)
        return p.scope { (h + shortcut).unary(activation) }
    }
}

/// A weight source whose named convolution weights come out standardized per output channel
/// (BiT's `WeightStandardizedConv2d`: torch's training-mode `batch_norm` of the weight as
/// [1, O, I·kh·kw], statistics in double as torch's CPU kernel keeps them).
final class StandardizedConvolutionWeights: TensorSource {
    let base: TensorSource
    let names: Set<String>
    let eps: Double

    init(base: TensorSource, names: Set<String>, eps: Double) {
        self.base = base
        self.names = names
        self.eps = eps
    }

    var origin: String { base.origin }
    var tensorNames: [String] { base.tensorNames }
    func info(_ name: String) -> (dtype: DType, shape: [Int])? {
        guard let i = base.info(name) else { return nil }
        return names.contains(name) ? (.float32, i.shape) : i
    }
    func evict(_ name: String) { base.evict(name) }

    func tensor(_ name: String) throws -> Tensor {
        let t = try base.tensor(name)
        guard names.contains(name) else { return t }
        let w = t.converted(to: .float32)
        let rows = w.shape[0], n = w.count / rows
        let out = Tensor(zeros: w.shape)
        for r in 0..<rows {
            let src = w.floats + r * n, dst = out.floats + r * n
            var mean = 0.0
            for i in 0..<n { mean += Double(src[i]) }
            mean /= Double(n)
            var variance = 0.0
            for i in 0..<n { let e = Double(src[i]) - mean; variance += e * e }
            variance /= Double(n)
            let inverse = 1 / (variance + eps).squareRoot()
            for i in 0..<n { dst[i] = Float((Double(src[i]) - mean) * inverse) }
        }
        return out
    }
}

/// transformers' `DPTConfig` (`depth_estimator/config.json`); a missing key takes transformers'
/// default (DPT-Large's, and for a hybrid without a `backbone_config`, DPT-Hybrid's BiT).
public struct DPTConfig: Codable, Sendable {
    public var hiddenSize = 768
    public var numHiddenLayers = 12
    public var numAttentionHeads = 12
    public var intermediateSize = 3072
    public var hiddenAct = "gelu"
    public var layerNormEps = 1e-12
    public var imageSize = 384
    public var patchSize = 16
    public var numChannels = 3
    public var isHybrid = false
    public var qkvBias = true
    public var backboneOutIndices = [2, 5, 8, 11]
    public var readoutType = "project"
    public var reassembleFactors: [Double] = [4, 2, 1, 0.5]
    public var neckHiddenSizes = [96, 192, 384, 768]
    public var fusionHiddenSize = 256
    public var headInIndex = -1
    public var useBatchNormInFusionResidual = false
    public var useBiasInFusionResidual: Bool? = nil
    public var addProjection = false
    public var backboneFeatmapShape = [1, 1024, 24, 24]
    public var neckIgnoreStages = [0, 1]
    public var backboneConfig = BiTConfig.dptHybrid
    /// A backbone by name (DINOv2, Swin, ... through `load_backbone`): not supported here.
    public var backbone: String? = nil
    /// Older configs' spelling of `is_hybrid` ("hybrid").
    public var embeddingType: String? = nil

    enum CodingKeys: String, CodingKey {
        case hiddenSize = "hidden_size", numHiddenLayers = "num_hidden_layers", numAttentionHeads = "num_attention_heads"
        case intermediateSize = "intermediate_size", hiddenAct = "hidden_act", layerNormEps = "layer_norm_eps"
        case imageSize = "image_size", patchSize = "patch_size", numChannels = "num_channels", isHybrid = "is_hybrid"
        case qkvBias = "qkv_bias", backboneOutIndices = "backbone_out_indices", readoutType = "readout_type"
        case reassembleFactors = "reassemble_factors", neckHiddenSizes = "neck_hidden_sizes"
        case fusionHiddenSize = "fusion_hidden_size", headInIndex = "head_in_index"
        case useBatchNormInFusionResidual = "use_batch_norm_in_fusion_residual"
        case useBiasInFusionResidual = "use_bias_in_fusion_residual", addProjection = "add_projection"
        case backboneFeatmapShape = "backbone_featmap_shape", neckIgnoreStages = "neck_ignore_stages"
        case backboneConfig = "backbone_config", backbone, embeddingType = "embedding_type"
    }

    public init() {}

    /// Intel/dpt-hybrid-midas, stable-diffusion-2-depth's `depth_estimator`, as transformers'
    /// conversion script (`convert_dpt_hybrid_to_pytorch.py`) configures it: ViT-B/16 on BiT's
    /// 1/16 map, neck [256, 512, 768, 768] at factors [1, 1, 1, 1/2], no BatchNorm.
    public static var dptHybridMidas: DPTConfig {
        var c = DPTConfig()
        c.isHybrid = true
        c.reassembleFactors = [1, 1, 1, 0.5]
        c.neckHiddenSizes = [256, 512, 768, 768]
        return c
    }

    public init(from decoder: Swift.Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        hiddenSize = try c.value(.hiddenSize, or: hiddenSize)
        numHiddenLayers = try c.value(.numHiddenLayers, or: numHiddenLayers)
        numAttentionHeads = try c.value(.numAttentionHeads, or: numAttentionHeads)
        intermediateSize = try c.value(.intermediateSize, or: intermediateSize)
        hiddenAct = try c.value(.hiddenAct, or: hiddenAct)
        layerNormEps = try c.value(.layerNormEps, or: layerNormEps)
        imageSize = try c.value(.imageSize, or: imageSize)
        patchSize = try c.value(.patchSize, or: patchSize)
        numChannels = try c.value(.numChannels, or: numChannels)
        // Older configs (transformers' conversion script) say embedding_type "hybrid".
        embeddingType = try c.decodeIfPresent(String.self, forKey: .embeddingType)
        isHybrid = try c.value(.isHybrid, or: false) || embeddingType == "hybrid"
        qkvBias = try c.value(.qkvBias, or: qkvBias)
        backboneOutIndices = try c.value(.backboneOutIndices, or: backboneOutIndices)
        readoutType = try c.value(.readoutType, or: readoutType)
        reassembleFactors = try c.value(.reassembleFactors, or: reassembleFactors)
        neckHiddenSizes = try c.value(.neckHiddenSizes, or: neckHiddenSizes)
        fusionHiddenSize = try c.value(.fusionHiddenSize, or: fusionHiddenSize)
        headInIndex = try c.value(.headInIndex, or: headInIndex)
        useBatchNormInFusionResidual = try c.value(.useBatchNormInFusionResidual, or: useBatchNormInFusionResidual)
        useBiasInFusionResidual = try c.decodeIfPresent(Bool.self, forKey: .useBiasInFusionResidual)
        addProjection = try c.value(.addProjection, or: addProjection)
        backboneFeatmapShape = try c.value(.backboneFeatmapShape, or: backboneFeatmapShape)
        neckIgnoreStages = try c.value(.neckIgnoreStages, or: neckIgnoreStages)
        backboneConfig = try c.value(.backboneConfig, or: backboneConfig)
        backbone = try c.decodeIfPresent(String.self, forKey: .backbone)
    }

    func validate() throws {
        let model = DPTForDepthEstimation.className
        func reject(_ key: String, _ value: String, _ reason: String) -> ConfigError {
            ConfigError(model: model, key: key, value: value, reason: reason)
        }
        try validateCLIPTransformer(model: model, hiddenAct: hiddenAct, hiddenSize: hiddenSize, heads: numAttentionHeads,
                                    sizes: [("intermediate_size", intermediateSize), ("num_hidden_layers", numHiddenLayers),
                                            ("image_size", imageSize), ("patch_size", patchSize), ("num_channels", numChannels),
                                            ("fusion_hidden_size", fusionHiddenSize)])
        if let backbone { throw reject("backbone", json(backbone), "DPT with a named backbone is not supported; DPT and DPT-Hybrid (BiT) are") }
        if patchSize > imageSize { throw reject("patch_size", "\(patchSize)", "is larger than image_size (\(imageSize))") }
        let stages = neckHiddenSizes.count
        if stages == 0 || reassembleFactors.count != stages {
            throw reject("reassemble_factors", "\(reassembleFactors)", "needs one factor per neck_hidden_sizes entry (\(stages))")
        }
        if backboneOutIndices.count != stages {
            throw reject("backbone_out_indices", "\(backboneOutIndices)", "needs one layer per neck_hidden_sizes entry (\(stages))")
        }
        let tokenIndices = isHybrid ? Array(backboneOutIndices.dropFirst(2)) : backboneOutIndices
        for i in tokenIndices where i < 0 || i >= numHiddenLayers {
            throw reject("backbone_out_indices", "\(backboneOutIndices)", "layer \(i) does not exist (num_hidden_layers \(numHiddenLayers))")
        }
        if !["project", "add", "ignore"].contains(readoutType) {
            throw reject("readout_type", json(readoutType), "must be project, add or ignore")
        }
        if neckHiddenSizes.contains(where: { $0 <= 0 }) { throw reject("neck_hidden_sizes", "\(neckHiddenSizes)", "must be positive") }
        for f in reassembleFactors where !(f >= 1 && f == f.rounded() || f > 0 && f < 1 && (1 / f) == (1 / f).rounded()) {
            throw reject("reassemble_factors", "\(reassembleFactors)", "each must be a whole number or one over a whole number")
        }
        if !(-stages..<stages).contains(headInIndex) {
            throw reject("head_in_index", "\(headInIndex)", "there are \(stages) fused maps")
        }
        if fusionHiddenSize % 2 != 0 { throw reject("fusion_hidden_size", "\(fusionHiddenSize)", "must be even (the head halves it)") }
        if addProjection && fusionHiddenSize != 256 {
            throw reject("add_projection", "true", "transformers' head projection takes 256 channels; fusion_hidden_size is \(fusionHiddenSize)")
        }
        if isHybrid {
            if readoutType != "project" { throw reject("readout_type", json(readoutType), "DPT-Hybrid needs project") }
            if stages != 4 { throw reject("neck_hidden_sizes", "\(neckHiddenSizes)", "DPT-Hybrid reassembles 4 maps") }
            try backboneConfig.validate()
            let channels = backboneConfig.outChannels
            if channels.count != 3 {
                throw reject("backbone_config.out_features", "\(backboneConfig.outStages)", "DPT-Hybrid takes 3 backbone feature maps")
            }
            if backboneFeatmapShape.count != 4 || backboneFeatmapShape[1] != channels[2] {
                throw reject("backbone_featmap_shape", "\(backboneFeatmapShape)", "the backbone's last feature map has \(channels[2]) channels")
            }
            for i in 0..<2 where neckHiddenSizes[i] != channels[i] {
                throw reject("neck_hidden_sizes", "\(neckHiddenSizes)", "entry \(i) must be the backbone's \(channels[i]) channels")
            }
            if Set(neckIgnoreStages) != [0, 1] {
                throw reject("neck_ignore_stages", "\(neckIgnoreStages)", "DPT-Hybrid passes its first two (backbone) maps through: [0, 1]")
            }
        }
    }
}

/// transformers' `BitConfig` as DPT-Hybrid's `backbone_config`.
public struct BiTConfig: Codable, Sendable {
    public var numChannels = 3
    public var embeddingSize = 64
    public var hiddenSizes = [256, 512, 1024, 2048]
    public var depths = [3, 4, 6, 3]
    public var layerType = "preactivation"
    public var hiddenAct = "relu"
    public var globalPadding: String? = nil
    public var numGroups = 32
    public var embeddingDynamicPadding = false
    public var outputStride = 32
    public var widthFactor = 1
    /// Indices into ["stem", "stage1", ...] of the feature maps returned.
    public var outStages: [Int] = []
    public var modelType = "bit"

    enum CodingKeys: String, CodingKey {
        case numChannels = "num_channels", embeddingSize = "embedding_size", hiddenSizes = "hidden_sizes", depths
        case layerType = "layer_type", hiddenAct = "hidden_act", globalPadding = "global_padding", numGroups = "num_groups"
        case embeddingDynamicPadding = "embedding_dynamic_padding", outputStride = "output_stride", widthFactor = "width_factor"
        case outFeatures = "out_features", outIndices = "out_indices", modelType = "model_type"
    }

    /// What DPTConfig builds for a hybrid without a backbone_config.
    public static var dptHybrid: BiTConfig {
        var c = BiTConfig()
        c.globalPadding = "SAME"
        c.layerType = "bottleneck"
        c.depths = [3, 4, 9]
        c.outStages = [1, 2, 3]
        c.embeddingDynamicPadding = true
        return c
    }

    /// transformers' BitConfig defaults (BiT-ResNet50, pre-activation layers).
    public init() {}

    public init(from decoder: Swift.Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        numChannels = try c.value(.numChannels, or: numChannels)
        embeddingSize = try c.value(.embeddingSize, or: embeddingSize)
        hiddenSizes = try c.value(.hiddenSizes, or: hiddenSizes)
        depths = try c.value(.depths, or: depths)
        layerType = try c.value(.layerType, or: layerType)
        hiddenAct = try c.value(.hiddenAct, or: hiddenAct)
        globalPadding = try c.decodeIfPresent(String.self, forKey: .globalPadding)
        numGroups = try c.value(.numGroups, or: numGroups)
        embeddingDynamicPadding = try c.value(.embeddingDynamicPadding, or: embeddingDynamicPadding)
        outputStride = try c.value(.outputStride, or: outputStride)
        widthFactor = try c.value(.widthFactor, or: widthFactor)
        modelType = try c.value(.modelType, or: modelType)
        let names = ["stem"] + depths.indices.map { "stage\($0 + 1)" }
        if let features = try c.decodeIfPresent([String].self, forKey: .outFeatures) {
            outStages = try features.map { f in
                guard let i = names.firstIndex(of: f) else {
                    throw ConfigError(model: "BitConfig", key: "out_features", value: "\(features)", reason: "\(f) is none of \(names)")
                }
                return i
            }
        } else if let indices = try c.decodeIfPresent([Int].self, forKey: .outIndices) {
            outStages = indices.map { $0 < 0 ? names.count + $0 : $0 }
        } else {
            outStages = [names.count - 1]  // transformers' default: the last stage
        }
    }

    public func encode(to encoder: Swift.Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(numChannels, forKey: .numChannels)
        try c.encode(embeddingSize, forKey: .embeddingSize)
        try c.encode(hiddenSizes, forKey: .hiddenSizes)
        try c.encode(depths, forKey: .depths)
        try c.encode(layerType, forKey: .layerType)
        try c.encode(hiddenAct, forKey: .hiddenAct)
        try c.encodeIfPresent(globalPadding, forKey: .globalPadding)
        try c.encode(numGroups, forKey: .numGroups)
        try c.encode(embeddingDynamicPadding, forKey: .embeddingDynamicPadding)
        try c.encode(outputStride, forKey: .outputStride)
        try c.encode(widthFactor, forKey: .widthFactor)
        try c.encode(outStages, forKey: .outIndices)
        try c.encode(modelType, forKey: .modelType)
    }

    /// transformers' `make_div` (BiT's channel rounding to multiples of 8).
    static func makeDivisible(_ value: Double, divisor: Int = 8) -> Int {
        var v = Swift.max(divisor, Int(value + Double(divisor) / 2) / divisor * divisor)
        if Double(v) < 0.9 * value { v += divisor }
        return v
    }

    /// The channels of each returned feature map.
    var outChannels: [Int] {
        outStages.map { $0 == 0 ? embeddingSize : BiTConfig.makeDivisible(Double(hiddenSizes[$0 - 1] * widthFactor)) }
    }

    func validate() throws {
        func reject(_ key: String, _ value: String, _ reason: String) -> ConfigError {
            ConfigError(model: "BitConfig (backbone_config)", key: key, value: value, reason: reason)
        }
        if modelType != "bit" { throw reject("model_type", json(modelType), "DPT-Hybrid's backbone here is BiT") }
        if layerType != "bottleneck" {
            throw reject("layer_type", json(layerType), "DPT-Hybrid's BiT is made of bottleneck layers (ViT-Hybrid's); preactivation is not supported")
        }
        if TransformersActivation.unary(hiddenAct) == nil { throw reject("hidden_act", json(hiddenAct), "is not a supported activation") }
        if let p = globalPadding, !["SAME", "VALID"].contains(p.uppercased()) {
            throw reject("global_padding", json(p), "must be SAME, VALID or null")
        }
        // transformers zips the two: extra hidden sizes (DPT-Hybrid keeps BiT-50's four for three stages) go unused.
        if depths.count > hiddenSizes.count || depths.isEmpty {
            throw reject("depths", "\(depths)", "needs a hidden_sizes entry per stage (there are \(hiddenSizes.count))")
        }
        if (depths + hiddenSizes + [embeddingSize, numGroups, widthFactor, outputStride, numChannels]).contains(where: { $0 <= 0 }) {
            throw reject("hidden_sizes", "\(hiddenSizes)", "sizes, depths, groups and strides must be positive")
        }
        if outStages.contains(where: { $0 < 0 || $0 > depths.count }) {
            throw reject("out_features", "\(outStages)", "names a stage the backbone does not have")
        }
        if outStages != outStages.sorted() { throw reject("out_features", "\(outStages)", "must be in stage order") }
    }
}
