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
    /// and its weights), or a Hugging Face cache repo id, as `from_pretrained` does; or a single
    /// file (`loadFile`), which takes its config from the model's UNet (`unetConfig`).
    public static func load(_ location: String, unetConfig: ConfigFile? = nil, options: ModelSourceOptions = .init()) throws -> ControlNetComponent {
        if Files.exists(location) && !Files.isDirectory(location) {
            guard let unetConfig else {
                throw PipelineError("\(location): a ControlNet file has no config; it is read with the model's UNet config, which is not known here")
            }
            return try loadFile(location, unetConfig: unetConfig)
        }
        let (folder, config, weights) = try ModelLocation.diffusersModel(location, options: options, component: "controlnet",
                                                                        className: ControlNetModel.className,
                                                                        alsoAccepting: [ControlNetModel.unionClassName], what: "a ControlNet")
        let model = try ControlNetModel(configJSON: config.bytes, origin: config.origin)
        let tensors = model.config.union == nil ? weights : try Self.splittingFusedAttention(weights)
        try model.checkWeights(tensors)
        return ControlNetComponent(name: folder, model: model, weights: ModelWeights(tensors))
    }

    /// A ControlNet in one file, for the UNet whose config is `unetConfig`, as diffusers'
    /// `ControlNetModel.from_single_file` reads it with the base model's config: lllyasviel's
    /// files (`control_v11p_sd15_canny.pth`, `.safetensors`, `.ckpt`: the original `cldm` layout
    /// under `control_model.`, or bare as in thibaud/controlnet-sd21), or a diffusers state dict
    /// saved alone (`diffusers_xl_canny_full.safetensors`). The file's shapes give the input and
    /// conditioning channels and the conditioning embedding's widths.
    public static func loadFile(_ path: String, unetConfig: ConfigFile) throws -> ControlNetComponent {
        let file = try TensorFiles.open(path)
        let diffusers = file.info("controlnet_cond_embedding.conv_in.weight") != nil
        let prefix = diffusers || file.info("control_model.input_hint_block.0.weight") == nil ? "" : "control_model."
        func shape(_ key: String) -> [Int]? { file.info(prefix + key).map(\.shape) }
        let (hintKey, convInKey) = diffusers ? ("controlnet_cond_embedding.conv_in.weight", "conv_in.weight")
                                             : ("input_hint_block.0.weight", "input_blocks.0.0.weight")
        guard let hint = shape(hintKey), hint.count == 4, let convIn = shape(convInKey), convIn.count == 4 else {
            throw ModelSourceError.checkpointLayout(file: path, detail: "has neither input_hint_block.0.weight (the original layout, under "
                                                    + "control_model. or bare) nor controlnet_cond_embedding.conv_in.weight (diffusers'): not a ControlNet")
        }
        // The conditioning embedding: conv_in to widths[0], then per width a convolution keeping
        // it and a strided one to the next, conv_out to the UNet's width. The original keeps it
        // as one Sequential whose odd indices are SiLUs.
        let blockPrefix = prefix + (diffusers ? "controlnet_cond_embedding.blocks." : "input_hint_block.")
        let indices = file.indices(under: blockPrefix)
        let blocks = diffusers ? indices : Array(indices.dropFirst().dropLast())
        guard blocks.count % 2 == 0, diffusers || indices.count >= 2 else {
            throw ModelSourceError.checkpointLayout(file: path, detail: "the conditioning embedding's convolutions \(indices) are not conv_in, pairs of blocks and conv_out")
        }
        var widths = [hint[0]]
        for (i, index) in blocks.enumerated() where i % 2 == 1 {
            if let w = file.info(blockPrefix + "\(index).weight")?.shape { widths.append(w[0]) }
        }
        guard var members = try JSON.parse(unetConfig.bytes).members else {
            throw ModelSourceError.invalidConfig(file: unetConfig.origin, detail: "is not a JSON object")
        }
        let own: [(String, JSON)] = [("_class_name", .string(ControlNetModel.className)), ("in_channels", .number(Double(convIn[1]))),
                                     ("conditioning_channels", .number(Double(hint[1]))),
                                     ("conditioning_embedding_out_channels", .array(widths.map { .number(Double($0)) }))]
        members = members.filter { key, _ in !own.contains { $0.0 == key } && !["up_block_types", "out_channels"].contains(key) } + own
        let config = ConfigFile(bytes: Array(JSON.object(members).serialized().utf8), origin: "\(unetConfig.origin) (read as the ControlNet's)")
        let model = try ControlNetModel(configJSON: config.bytes, origin: config.origin)
        let weights: TensorSource = diffusers ? file
            : try LDMKeyTables.controlNet(config: config, hintIndices: indices, sourcePrefix: prefix).view(of: file, origin: path, configOrigin: config.origin)
        try model.checkWeights(weights)
        return ControlNetComponent(name: path, model: model, weights: ModelWeights(weights))
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
