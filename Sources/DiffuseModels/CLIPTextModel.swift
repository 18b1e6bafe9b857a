import DiffuseCore
import DiffuseGraph

/// What a CLIP text-encoder graph returns; the caller picks any set of them.
public enum CLIPTextOutput: Hashable, Sendable {
    /// `last_hidden_state`: the final layer's output after `final_layer_norm`.
    case lastHiddenState
    /// `hidden_states[i]` as transformers numbers them: 0 is the embeddings, `i` the output of
    /// layer `i`; negative counts from the end (`-2` is the input of the last layer, SDXL's choice).
    case hiddenState(Int)
    /// `final_layer_norm(hidden_states[i])`: diffusers' `clip_skip` (`clip_skip = k` is `-(k + 1)`).
    case normalizedHiddenState(Int)
    /// `pooler_output`: `last_hidden_state` at each sequence's first EOS token.
    case pooledOutput
    /// `text_embeds`: `text_projection(pooler_output)` (projection models only).
    case textEmbeds

    /// The graph output's name.
    public var name: String {
        switch self {
        case .lastHiddenState: return "last_hidden_state"
        case .hiddenState(let i): return "hidden_states[\(i)]"
        case .normalizedHiddenState(let i): return "final_layer_norm(hidden_states[\(i)])"
        case .pooledOutput: return "pooler_output"
        case .textEmbeds: return "text_embeds"
        }
    }

    /// SDXL's and clip-skip's `hidden_states[-2]`.
    public static let penultimateHiddenState = CLIPTextOutput.hiddenState(-2)
}

/// transformers' `CLIPTextModel`, the SD 1.x/2.x text encoder and SDXL's first one. Weights
/// use the checkpoints' `text_model.` prefix.
///
/// Graph inputs: `input_ids` [B,S] (int32), and for pooled outputs `eos_indices` [B] (int32):
/// flat row indices `b * S + position of the first EOS` into the [B*S, hidden] hidden states,
/// made by `eosIndices(inputIds:)`.
public struct CLIPTextModel: CLIPTextEncoder, Sendable {
    public static let className = "CLIPTextModel"
    public let config: CLIPTextConfig
    public let parameters: [ParameterDeclaration]
    public var hasTextProjection: Bool { false }

    public init(config: CLIPTextConfig) throws {
        try config.validate(model: Self.className)
        self.config = config
        parameters = try probeCLIPParameters(config, projection: false)
    }

    public init(configPath: String) throws {
        try self.init(config: loadConfiguration(CLIPTextConfig.self, from: configPath))
    }
}

/// transformers' `CLIPTextModelWithProjection` (SDXL's second text encoder): the same
/// transformer plus `text_projection` (no bias) of the pooled output to `projection_dim`.
public struct CLIPTextModelWithProjection: CLIPTextEncoder, Sendable {
    public static let className = "CLIPTextModelWithProjection"
    public let config: CLIPTextConfig
    public let parameters: [ParameterDeclaration]
    public var hasTextProjection: Bool { true }

    public init(config: CLIPTextConfig) throws {
        try config.validate(model: Self.className)
        self.config = config
        parameters = try probeCLIPParameters(config, projection: true)
    }

    public init(configPath: String) throws {
        try self.init(config: loadConfiguration(CLIPTextConfig.self, from: configPath))
    }
}

private func probeCLIPParameters(_ config: CLIPTextConfig, projection: Bool) throws -> [ParameterDeclaration] {
    try probeParameters { b in
        let ids = b.input(CLIPTextModel.Name.inputIds, shape: [1, 1], dtype: .int32)
        let eos = b.input(CLIPTextModel.Name.eosIndices, shape: [1], dtype: .int32)
        let outs: [CLIPTextOutput] = [.lastHiddenState, .pooledOutput] + (projection ? [.textEmbeds] : [])
        for (o, v) in CLIPTextTransformer.forward(Params(b), config, projection: projection, inputIds: ids,
                                                  eosIndices: eos, outputs: outs) {
            b.output(o.name, v)
        }
    }
}

extension CLIPTextModel {
    public enum Name {
        public static let inputIds = "input_ids"
        public static let eosIndices = "eos_indices"
    }
}

/// The API both CLIP text models share.
public protocol CLIPTextEncoder: ModelComponent {
    var config: CLIPTextConfig { get }
    var hasTextProjection: Bool { get }
}

extension CLIPTextEncoder {
    /// transformers registers `position_ids` as a buffer; older checkpoints still carry it.
    public func isIgnoredBuffer(_ name: String) -> Bool { name.hasSuffix("embeddings.position_ids") }

    public var hiddenSize: Int { config.hiddenSize }

    /// The encoder graph for `batch` sequences of `sequenceLength` tokens, returning `outputs`
    /// under their `name`s. Only the layers the outputs need are in the graph.
    public func graph(batch: Int, sequenceLength: Int = 77, outputs: [CLIPTextOutput]) throws -> Graph {
        for o in outputs {
            if o == .textEmbeds && !hasTextProjection {
                throw GraphError(scope: "", message: "\(Self.className) has no text_projection: ask for pooler_output instead of text_embeds")
            }
            switch o {
            case .hiddenState(let i), .normalizedHiddenState(let i):
                let n = config.numHiddenLayers + 1
                guard i >= -n && i < n else {
                    throw GraphError(scope: "", message: "hidden_states[\(i)] does not exist: the model has \(n) hidden states (embeddings and \(n - 1) layers)")
                }
            default: break
            }
        }
        guard sequenceLength <= config.maxPositionEmbeddings else {
            throw GraphError(scope: "", message: "sequence of \(sequenceLength) tokens is longer than max_position_embeddings (\(config.maxPositionEmbeddings))")
        }
        let needsEOS = outputs.contains(.pooledOutput) || outputs.contains(.textEmbeds)
        return try buildGraph { b in
            let ids = b.input(CLIPTextModel.Name.inputIds, shape: [batch, sequenceLength], dtype: .int32)
            let eos = needsEOS ? b.input(CLIPTextModel.Name.eosIndices, shape: [batch], dtype: .int32) : nil
            for (o, v) in CLIPTextTransformer.forward(Params(b), config, projection: hasTextProjection, inputIds: ids,
                                                      eosIndices: eos, outputs: outputs) {
                b.output(o.name, v)
            }
        }
    }

    /// `eos_indices` for `graph`: per sequence, `b * S + ` the position transformers pools at.
    /// With `eos_token_id == 2` (checkpoints from before the EOS fix) that is the position of the
    /// largest id (the legacy argmax), otherwise the first position holding `eos_token_id`
    /// (0 when there is none, as `argmax` of all-false gives).
    public func eosIndices(inputIds: [[Int]]) -> Tensor {
        CLIPTextTransformer.eosIndices(inputIds: inputIds, eosTokenId: config.eosTokenId)
    }

    /// The token ids as the `input_ids` tensor (int32 [B,S]).
    public func inputIdsTensor(_ inputIds: [[Int]]) -> Tensor {
        let s = inputIds.first?.count ?? 0
        return Tensor(shape: [inputIds.count, s], dtype: .int32, values: inputIds.flatMap { $0.map { Int32(clamping: $0) } })
    }
}

/// transformers' `CLIPTextTransformer` (`text_model.*`): embeddings, pre-norm encoder layers
/// with causal self-attention, `final_layer_norm`.
enum CLIPTextTransformer {
    static func eosIndices(inputIds: [[Int]], eosTokenId: Int) -> Tensor {
        var rows: [Int32] = []
        for (b, ids) in inputIds.enumerated() {
            let pos: Int
            if eosTokenId == 2 {
                // argmax returns the first maximum.
                var best = 0
                for (i, t) in ids.enumerated() where t > ids[best] { best = i }
                pos = best
            } else {
                pos = ids.firstIndex(of: eosTokenId) ?? 0
            }
            rows.append(Int32(b * ids.count + pos))
        }
        return Tensor(shape: [inputIds.count], dtype: .int32, values: rows)
    }

    static func forward(_ root: Params, _ c: CLIPTextConfig, projection: Bool, inputIds: Value, eosIndices: Value?,
                        outputs: [CLIPTextOutput]) -> [(CLIPTextOutput, Value)] {
        let p = root["text_model"]
        let act = TransformersActivation.unary(c.hiddenAct)!
        let (batch, seq) = (inputIds.shape[0], inputIds.shape[1])
        let d = c.hiddenSize
        let numLayers = c.numHiddenLayers

        // Which hidden states the outputs need; layers past the deepest are never emitted.
        func resolve(_ i: Int) -> Int { i < 0 ? numLayers + 1 + i : i }
        var deepest = 0
        for o in outputs {
            switch o {
            case .hiddenState(let i), .normalizedHiddenState(let i): deepest = max(deepest, resolve(i))
            case .lastHiddenState, .pooledOutput, .textEmbeds: deepest = numLayers
            }
        }

        // Embeddings: token rows plus the first S position rows.
        let tokenEmbedding = Embedding(p["embeddings"]["token_embedding"], count: c.vocabSize, dim: d)
        let positionEmbedding = Embedding(p["embeddings"]["position_embedding"], count: c.maxPositionEmbeddings, dim: d)
        var h = p["embeddings"].scope {
            tokenEmbedding(inputIds) + positionEmbedding.weight.slice(axis: 0, start: 0, length: seq)
        }
        var hiddenStates = [h]
        for l in 0..<numLayers {
            let layer = CLIPEncoderLayer(p["encoder"]["layers"][l], width: d, intermediateSize: c.intermediateSize,
                                         heads: c.numAttentionHeads, eps: Float(c.layerNormEps), act: act, causal: true)
            if l < deepest { h = layer(h); hiddenStates.append(h) }
        }
        let finalLayerNorm = LayerNorm(p["final_layer_norm"], d, eps: Float(c.layerNormEps))
        let textProjection = projection ? Linear(root["text_projection"], d, c.projectionDim, bias: false) : nil

        var results: [(CLIPTextOutput, Value)] = []
        var last: Value?
        func lastHiddenState() -> Value {
            if let last { return last }
            let v = p["final_layer_norm"].scope { finalLayerNorm(hiddenStates[numLayers]) }
            last = v
            return v
        }
        func pooled() -> Value {
            guard let eosIndices else {
                root.builder.fail("pooled CLIP outputs need the eos_indices input")
                return lastHiddenState()
            }
            return eosIndices.embedding(lastHiddenState().reshape([batch * seq, d]))
        }
        for o in outputs {
            switch o {
            case .lastHiddenState: results.append((o, lastHiddenState()))
            case .hiddenState(let i): results.append((o, hiddenStates[resolve(i)]))
            case .normalizedHiddenState(let i):
                results.append((o, p["final_layer_norm"].scope { finalLayerNorm(hiddenStates[resolve(i)]) }))
            case .pooledOutput: results.append((o, pooled()))
            case .textEmbeds:
                let pooledOutput = pooled()
                results.append((o, root["text_projection"].scope { textProjection!(pooledOutput) }))
            }
        }
        return results
    }
}

/// transformers' `CLIPEncoderLayer`: `x + self_attn(layer_norm1(x))`, then `x + mlp(layer_norm2(x))`.
/// The text transformer's attention is causal (token i attends to tokens 0...i), the vision
/// transformer's is not.
struct CLIPEncoderLayer {
    let p: Params
    let layerNorm1: LayerNorm
    let qProj: Linear
    let kProj: Linear
    let vProj: Linear
    let outProj: Linear
    let layerNorm2: LayerNorm
    let fc1: Linear
    let fc2: Linear
    let heads: Int
    let act: UnaryOp
    let causal: Bool

    init(_ p: Params, width d: Int, intermediateSize: Int, heads: Int, eps: Float, act: UnaryOp, causal: Bool) {
        self.p = p
        layerNorm1 = LayerNorm(p["layer_norm1"], d, eps: eps)
        let attn = p["self_attn"]
        qProj = Linear(attn["q_proj"], d, d)
        kProj = Linear(attn["k_proj"], d, d)
        vProj = Linear(attn["v_proj"], d, d)
        outProj = Linear(attn["out_proj"], d, d)
        layerNorm2 = LayerNorm(p["layer_norm2"], d, eps: eps)
        fc1 = Linear(p["mlp"]["fc1"], d, intermediateSize)
        fc2 = Linear(p["mlp"]["fc2"], intermediateSize, d)
        self.heads = heads
        self.act = act
        self.causal = causal
    }

    func callAsFunction(_ x: Value) -> Value {
        p.scope {
            let n = layerNorm1(x)
            let a = outProj(qProj(n).attention(kProj(n), vProj(n), heads: heads, causal: causal))
            let h = x + a
            return h + fc2(fc1(layerNorm2(h)).unary(act))
        }
    }
}

/// transformers' `CLIPTextConfig` (`text_encoder/config.json`); a missing key takes
/// transformers' default.
public struct CLIPTextConfig: Codable, Sendable {
    public var vocabSize: Int
    public var hiddenSize: Int
    public var intermediateSize: Int
    public var projectionDim: Int
    public var numHiddenLayers: Int
    public var numAttentionHeads: Int
    public var maxPositionEmbeddings: Int
    public var hiddenAct: String
    public var layerNormEps: Double
    public var padTokenId: Int?
    public var bosTokenId: Int
    public var eosTokenId: Int
    /// `CLIPTextModel` or `CLIPTextModelWithProjection`, when the file says.
    public var architectures: [String]?

    enum CodingKeys: String, CodingKey {
        case vocabSize = "vocab_size", hiddenSize = "hidden_size", intermediateSize = "intermediate_size"
        case projectionDim = "projection_dim", numHiddenLayers = "num_hidden_layers"
        case numAttentionHeads = "num_attention_heads", maxPositionEmbeddings = "max_position_embeddings"
        case hiddenAct = "hidden_act", layerNormEps = "layer_norm_eps", padTokenId = "pad_token_id"
        case bosTokenId = "bos_token_id", eosTokenId = "eos_token_id", architectures
    }

    /// transformers' defaults.
    public init() {
        vocabSize = 49408
        hiddenSize = 512
        intermediateSize = 2048
        projectionDim = 512
        numHiddenLayers = 12
        numAttentionHeads = 8
        maxPositionEmbeddings = 77
        hiddenAct = "quick_gelu"
        layerNormEps = 1e-5
        padTokenId = 1
        bosTokenId = 49406
        eosTokenId = 49407
        architectures = nil
    }

    public init(from decoder: Swift.Decoder) throws {
        self.init()
        let c = try decoder.container(keyedBy: CodingKeys.self)
        vocabSize = try c.value(.vocabSize, or: vocabSize)
        hiddenSize = try c.value(.hiddenSize, or: hiddenSize)
        intermediateSize = try c.value(.intermediateSize, or: intermediateSize)
        projectionDim = try c.value(.projectionDim, or: projectionDim)
        numHiddenLayers = try c.value(.numHiddenLayers, or: numHiddenLayers)
        numAttentionHeads = try c.value(.numAttentionHeads, or: numAttentionHeads)
        maxPositionEmbeddings = try c.value(.maxPositionEmbeddings, or: maxPositionEmbeddings)
        hiddenAct = try c.value(.hiddenAct, or: hiddenAct)
        layerNormEps = try c.value(.layerNormEps, or: layerNormEps)
        padTokenId = try c.nullable(.padTokenId, missing: padTokenId)
        bosTokenId = try c.value(.bosTokenId, or: bosTokenId)
        eosTokenId = try c.value(.eosTokenId, or: eosTokenId)
        architectures = try c.decodeIfPresent([String].self, forKey: .architectures)
    }

    func validate(model: String) throws {
        let sizes: [(String, Int)] = [
            ("vocab_size", vocabSize), ("hidden_size", hiddenSize), ("intermediate_size", intermediateSize),
            ("projection_dim", projectionDim), ("num_hidden_layers", numHiddenLayers),
            ("num_attention_heads", numAttentionHeads), ("max_position_embeddings", maxPositionEmbeddings)]
        try validateCLIPTransformer(model: model, hiddenAct: hiddenAct, hiddenSize: hiddenSize, heads: numAttentionHeads, sizes: sizes)
    }
}

/// What the text and vision CLIP configs both need: a known activation, positive sizes, and
/// heads that divide the width. Errors name `model` and the key.
func validateCLIPTransformer(model: String, hiddenAct: String, hiddenSize: Int, heads: Int, sizes: [(String, Int)]) throws {
    func reject(_ key: String, _ value: String, _ reason: String) -> ConfigError {
        ConfigError(model: model, key: key, value: value, reason: reason)
    }
    if TransformersActivation.unary(hiddenAct) == nil {
        throw reject("hidden_act", json(hiddenAct), "supported activations are quick_gelu, gelu, gelu_new, gelu_pytorch_tanh, relu and silu")
    }
    for (key, v) in sizes where v <= 0 { throw reject(key, "\(v)", "must be positive") }
    if hiddenSize % heads != 0 {
        throw reject("num_attention_heads", "\(heads)", "must divide hidden_size (\(hiddenSize))")
    }
}

extension CLIPTextEncoder {
    /// The weights under the names this model declares. transformers 5 saves CLIP text models
    /// without the `text_model.` prefix the published checkpoints use; such a file is read
    /// through a renaming view, any other is returned as it is.
    public func canonicalWeights(_ source: TensorSource) -> TensorSource {
        let probe = "embeddings.token_embedding.weight"
        guard source.info("text_model." + probe) == nil, source.info(probe) != nil else { return source }
        return RenamedTensorSource(source, prefix: "text_model.", keeping: ["text_projection."])
    }
}

/// A view of a tensor source whose names gain `prefix`, except names starting with one of
/// `keeping`.
final class RenamedTensorSource: TensorSource {
    let base: TensorSource
    let prefix: String
    let keeping: [String]
    let tensorNames: [String]
    var origin: String { base.origin }

    init(_ base: TensorSource, prefix: String, keeping: [String]) {
        self.base = base
        self.prefix = prefix
        self.keeping = keeping
        tensorNames = base.tensorNames.map { name in keeping.contains { name.hasPrefix($0) } ? name : prefix + name }
    }

    /// The base source's name for one of ours.
    private func original(_ name: String) -> String? {
        if keeping.contains(where: { name.hasPrefix($0) }) { return name }
        return name.hasPrefix(prefix) ? String(name.dropFirst(prefix.count)) : nil
    }

    func info(_ name: String) -> (dtype: DType, shape: [Int])? { original(name).flatMap { base.info($0) } }

    func tensor(_ name: String) throws -> Tensor {
        guard let n = original(name) else { throw SafeTensorsError.missingTensor(file: origin, tensor: name) }
        return try base.tensor(n)
    }
}
