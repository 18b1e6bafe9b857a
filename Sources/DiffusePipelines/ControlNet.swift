import DiffuseCore
import DiffuseGraph
import DiffuseModels

/// A ControlNet with its weights, and the UNet's weights beside its own as the denoiser graph
/// binds them (the ControlNet's under `controlnet.`).
public struct ControlNetComponent {
    public var name: String
    public var model: ControlNetModel
    public var weights: ModelWeights

    /// Opens a ControlNet folder (config.json with `ControlNetModel` or `ControlNetUnionModel`,
    /// and its weights), or a Hugging Face cache repo id, as `from_pretrained` does.
    public static func load(_ location: String, options: ModelSourceOptions = .init()) throws -> ControlNetComponent {
        let (folder, config, weights) = try ModelLocation.diffusersModel(location, options: options, component: "controlnet",
                                                                        className: ControlNetModel.className,
                                                                        alsoAccepting: [ControlNetModel.unionClassName], what: "a ControlNet")
        let model = try ControlNetModel(configJSON: config.bytes, origin: config.origin)
        let tensors = model.config.union == nil ? weights : try Self.splittingFusedAttention(weights)
        try model.checkWeights(tensors)
        return ControlNetComponent(name: folder, model: model, weights: ModelWeights(tensors))
    }

    /// A union ControlNet's weights with each `nn.MultiheadAttention`'s fused `in_proj_weight`
    /// and `in_proj_bias` read as the q, k and v projections the graph declares (views of
    /// their rows, nothing copied).
    static func splittingFusedAttention(_ weights: TensorSource) throws -> TensorSource {
        var entries: [(name: String, entry: MappedTensorSource.Entry)] = []
        for name in weights.tensorNames {
            guard name.hasSuffix(".attn.in_proj_weight") || name.hasSuffix(".attn.in_proj_bias"), let info = weights.info(name) else {
                entries.append((name, .init(source: name)))
                continue
            }
            let prefix = String(name.dropLast(name.hasSuffix("weight") ? "in_proj_weight".count : "in_proj_bias".count))
            let kind = name.hasSuffix("weight") ? "weight" : "bias"
            let width = info.shape[0] / 3
            for (i, projection) in ["q_proj", "k_proj", "v_proj"].enumerated() {
                entries.append(("\(prefix)\(projection).\(kind)", .init(source: name, transform: .rows(i * width..<(i + 1) * width))))
            }
        }
        return try MappedTensorSource(base: weights, entries: entries, origin: weights.origin)
    }
}

extension StableDiffusionComponents {
    /// Fails unless the ControlNet was made for this UNet: the same encoder shape (one residual
    /// per skip connection, of the skip's width), text width and added conditioning.
    public func checkControlNet(_ controlNet: ControlNetComponent) throws {
        let cn = controlNet.model.config.unet, u = unet.config
        var problems: [String] = []
        if cn.blockOutChannels != u.blockOutChannels { problems.append("block_out_channels \(cn.blockOutChannels) vs the UNet's \(u.blockOutChannels)") }
        if cn.layersPerDownBlock != u.layersPerDownBlock {
            problems.append("layers_per_block \(cn.layersPerBlock) vs the UNet's \(u.layersPerBlock)")
        }
        if cn.crossAttentionDims[0] != u.crossAttentionDims[0] {
            problems.append("cross_attention_dim \(cn.crossAttentionDims[0]) vs the UNet's \(u.crossAttentionDims[0])")
        }
        if cn.additionEmbedType != u.additionEmbedType {
            problems.append("addition_embed_type \(cn.additionEmbedType ?? "none") vs the UNet's \(u.additionEmbedType ?? "none")")
        }
        if cn.inChannels != vae.model.latentChannels {
            problems.append("in_channels \(cn.inChannels) vs the model's \(vae.model.latentChannels) latent channels")
        }
        if (cn.midBlockType == nil) != (u.midBlockType == nil) { problems.append("one has a mid block, the other not") }
        let reduction = 1 << (controlNet.model.config.conditioningEmbeddingOutChannels.count - 1)
        if reduction != vae.model.spatialScaleFactor {
            problems.append("its conditioning embedding shrinks images \(reduction)x, the VAE \(vae.model.spatialScaleFactor)x")
        }
        guard problems.isEmpty else {
            throw PipelineError("\(controlNet.name) is not a ControlNet for \(name): \(problems.joined(separator: "; "))")
        }
    }
}
