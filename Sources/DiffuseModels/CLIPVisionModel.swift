import DiffuseCore
import DiffuseGraph

/// What a CLIP vision-encoder graph returns.
public enum CLIPVisionOutput: Hashable, Sendable {
    /// `image_embeds`: `visual_projection(post_layernorm(class token of the last layer))`, what
    /// an IP-Adapter's `ImageProjection` reads.
    case imageEmbeds
    /// `hidden_states[i]` as transformers numbers them: 0 is the embeddings after `pre_layrnorm`,
    /// `i` the output of layer `i`; negative counts from the end. IP-Adapter Plus reads `-2`.
    case hiddenState(Int)

    /// The graph output's name.
    public var name: String {
        switch self {
        case .imageEmbeds: return "image_embeds"
        case .hiddenState(let i): return "hidden_states[\(i)]"
        }
    }

    public static let penultimateHiddenState = CLIPVisionOutput.hiddenState(-2)
}

/// transformers' `CLIPVisionModelWithProjection`: the image encoder IP-Adapters are trained
/// with (OpenCLIP ViT-H/14 and ViT-bigG/14 for h94/IP-Adapter). A ViT: patches by a strided
/// convolution, a class token, learned positions, `pre_layrnorm` (transformers' spelling),
/// pre-norm encoder layers with full (not causal) attention, `post_layernorm` of the class
/// token and `visual_projection` (no bias).
///
/// Graph input: `pixel_values` [B,3,image_size,image_size], as `CLIPImageProcessor` makes them.
public struct CLIPVisionModelWithProjection: ModelComponent, Sendable {
    public static let className = "CLIPVisionModelWithProjection"
    public static let pixelValues = "pixel_values"
    public let config: CLIPVisionConfig
    public let parameters: [ParameterDeclaration]
    /// Where the ViT's weights sit: `vision_model` here; `vision_model.vision_model` in diffusers'
    /// safety checker, which wraps a whole `CLIPVisionModel`.
    public let encoderScope: [String]

    public init(config: CLIPVisionConfig, encoderScope: [String] = ["vision_model"]) throws {
        try config.validate()
        self.config = config
        self.encoderScope = encoderScope
        parameters = try probeParameters { Self.emit($0, config, encoderScope, batch: 1, outputs: [.imageEmbeds]) }
    }

    /// Reads `config.json`: a vision config, or a whole `CLIPModel` config (its `vision_config`).
    public init(configPath: String, encoderScope: [String] = ["vision_model"]) throws {
        try self.init(config: CLIPVisionConfig.load(configPath), encoderScope: encoderScope)
    }

    /// transformers registers `position_ids` as a buffer; older checkpoints still carry it.
    public func isIgnoredBuffer(_ name: String) -> Bool { name.hasSuffix("embeddings.position_ids") }

    /// Patches per side: transformers' convolution drops a partial last patch.
    public var patchesPerSide: Int { config.imageSize / config.patchSize }

    public func graph(batch: Int, outputs: [CLIPVisionOutput]) throws -> Graph {
        let n = config.numHiddenLayers + 1
        for case .hiddenState(let i) in outputs where i < -n || i >= n {
            throw GraphError(scope: "", message: "hidden_states[\(i)] does not exist: the image encoder has \(n) hidden states (embeddings and \(n - 1) layers)")
        }
        return try buildGraph { Self.emit($0, config, encoderScope, batch: batch, outputs: outputs) }
    }

    /// The `pixel_values` input, the forward pass and `outputs`, into `b`.
    static func emit(_ b: GraphBuilder, _ c: CLIPVisionConfig, _ scope: [String], batch: Int, outputs: [CLIPVisionOutput]) {
        let x = b.input(pixelValues, shape: [batch, c.numChannels, c.imageSize, c.imageSize])
        for (o, v) in forward(Params(b), c, scope, pixelValues: x, outputs: outputs) { b.output(o.name, v) }
    }

    static func forward(_ root: Params, _ c: CLIPVisionConfig, _ scope: [String], pixelValues: Value,
                        outputs: [CLIPVisionOutput]) -> [(CLIPVisionOutput, Value)] {
        let p = scope.reduce(root) { $0[$1] }
        let d = c.hiddenSize, batch = pixelValues.shape[0]
        let grid = c.imageSize / c.patchSize, positions = grid * grid + 1
        let numLayers = c.numHiddenLayers
        func resolve(_ i: Int) -> Int { i < 0 ? numLayers + 1 + i : i }
        let deepest = outputs.map { o -> Int in
            if case .hiddenState(let i) = o { return resolve(i) }
            return numLayers
        }.max() ?? 0

        // Embeddings: [class token ⧺ patches] + positions.
        let e = p["embeddings"]
        let patchEmbedding = Conv2d(e["patch_embedding"], c.numChannels, d, kernel: c.patchSize, stride: c.patchSize, bias: false)
        let classEmbedding = e.weight("class_embedding", [d])
        let positionEmbedding = Embedding(e["position_embedding"], count: positions, dim: d)
        var h = e.scope {
            let patches = patchEmbedding(pixelValues).reshape([batch, d, grid * grid]).transpose(1, 2)
            let cls = classEmbedding.reshape([1, 1, d])
            let tokens = Value.concat(Array(repeating: cls, count: batch), axis: 0)
            return Value.concat([tokens, patches], axis: 1) + positionEmbedding.weight
        }
        let eps = Float(c.layerNormEps)
        let preLayerNorm = LayerNorm(p["pre_layrnorm"], d, eps: eps)
        h = p["pre_layrnorm"].scope { preLayerNorm(h) }
        let act = TransformersActivation.unary(c.hiddenAct)!
        var hiddenStates = [h]
        for l in 0..<numLayers {
            let layer = CLIPEncoderLayer(p["encoder"]["layers"][l], width: d, intermediateSize: c.intermediateSize,
                                         heads: c.numAttentionHeads, eps: eps, act: act, causal: false)
            if l < deepest { h = layer(h); hiddenStates.append(h) }
        }
        let postLayerNorm = LayerNorm(p["post_layernorm"], d, eps: eps)
        let visualProjection = Linear(root["visual_projection"], d, c.projectionDim, bias: false)
        return outputs.map { o in
            switch o {
            case .hiddenState(let i): return (o, hiddenStates[resolve(i)])
            case .imageEmbeds:
                let pooled = p["post_layernorm"].scope {
                    postLayerNorm(hiddenStates[numLayers].slice(axis: 1, start: 0, length: 1).reshape([batch, d]))
                }
                return (o, root["visual_projection"].scope { visualProjection(pooled) })
            }
        }
    }
}

/// transformers' `CLIPVisionConfig` (`image_encoder/config.json`); a missing key takes
/// transformers' default.
public struct CLIPVisionConfig: Codable, Sendable {
    public var hiddenSize: Int
    public var intermediateSize: Int
    public var projectionDim: Int
    public var numHiddenLayers: Int
    public var numAttentionHeads: Int
    public var numChannels: Int
    public var imageSize: Int
    public var patchSize: Int
    public var hiddenAct: String
    public var layerNormEps: Double

    enum CodingKeys: String, CodingKey {
        case hiddenSize = "hidden_size", intermediateSize = "intermediate_size", projectionDim = "projection_dim"
        case numHiddenLayers = "num_hidden_layers", numAttentionHeads = "num_attention_heads"
        case numChannels = "num_channels", imageSize = "image_size", patchSize = "patch_size"
        case hiddenAct = "hidden_act", layerNormEps = "layer_norm_eps"
    }

    /// transformers' defaults (ViT-B/32).
    public init() {
        hiddenSize = 768
        intermediateSize = 3072
        projectionDim = 512
        numHiddenLayers = 12
        numAttentionHeads = 12
        numChannels = 3
        imageSize = 224
        patchSize = 32
        hiddenAct = "quick_gelu"
        layerNormEps = 1e-5
    }

    public init(from decoder: Swift.Decoder) throws {
        self.init()
        let c = try decoder.container(keyedBy: CodingKeys.self)
        hiddenSize = try c.value(.hiddenSize, or: hiddenSize)
        intermediateSize = try c.value(.intermediateSize, or: intermediateSize)
        projectionDim = try c.value(.projectionDim, or: projectionDim)
        numHiddenLayers = try c.value(.numHiddenLayers, or: numHiddenLayers)
        numAttentionHeads = try c.value(.numAttentionHeads, or: numAttentionHeads)
        numChannels = try c.value(.numChannels, or: numChannels)
        imageSize = try c.value(.imageSize, or: imageSize)
        patchSize = try c.value(.patchSize, or: patchSize)
        hiddenAct = try c.value(.hiddenAct, or: hiddenAct)
        layerNormEps = try c.value(.layerNormEps, or: layerNormEps)
    }

    /// A vision config file, or a `CLIPModel` config whose `vision_config` it is (with the
    /// model's `projection_dim` when the vision part does not repeat it).
    public static func load(_ path: String) throws -> CLIPVisionConfig {
        let json = try Files.readJSON(path)
        guard let vision = json["vision_config"], case .object = vision else {
            return try loadConfiguration(CLIPVisionConfig.self, from: path)
        }
        var config = try decodeConfiguration(CLIPVisionConfig.self, from: Array(vision.serialized().utf8), origin: path + " (vision_config)")
        if vision["projection_dim"] == nil, let p = json["projection_dim"]?.int { config.projectionDim = p }
        return config
    }

    func validate() throws {
        let model = CLIPVisionModelWithProjection.className
        let sizes: [(String, Int)] = [
            ("hidden_size", hiddenSize), ("intermediate_size", intermediateSize), ("projection_dim", projectionDim),
            ("num_hidden_layers", numHiddenLayers), ("num_attention_heads", numAttentionHeads),
            ("num_channels", numChannels), ("image_size", imageSize), ("patch_size", patchSize)]
        try validateCLIPTransformer(model: model, hiddenAct: hiddenAct, hiddenSize: hiddenSize, heads: numAttentionHeads, sizes: sizes)
        if patchSize > imageSize {
            throw ConfigError(model: model, key: "patch_size", value: "\(patchSize)",
                              reason: "is larger than image_size (\(imageSize)): the image has no patch")
        }
    }
}
