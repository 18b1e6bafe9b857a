import DiffuseCore

/// The key tables of the original Stable Diffusion checkpoints (CompVis' LDM layout for SD 1.x
/// and 2.x, Stability's SGM layout for SDXL), per component, built from the diffusers config of
/// that component. They follow diffusers' `single_file_utils.py` (`convert_ldm_unet_checkpoint`,
/// `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`),
/// written as tables so that one table reads a checkpoint and also says how to write one.
public enum LDMKeyTables {
    // MARK: Leaves

    /// LDM `ResBlock` → diffusers `ResnetBlock2D`.
    public static let unetResnet = LeafTable([
        LeafRule("in_layers.0.", "norm1."),
        LeafRule("in_layers.2.", "conv1."),
        LeafRule("emb_layers.1.", "time_emb_proj."),
        LeafRule("out_layers.0.", "norm2."),
        LeafRule("out_layers.3.", "conv2."),
        LeafRule("skip_connection.", "conv_shortcut."),
    ], passThrough: false)

    /// The VAE's `ResnetBlock`: the same names but for the shortcut.
    public static let vaeResnet = LeafTable([LeafRule("nin_shortcut.", "conv_shortcut.")], passThrough: true)

    /// The VAE's `AttnBlock` (1x1 convolutions) → diffusers `Attention` (linear layers).
    public static let vaeAttention = LeafTable([
        LeafRule("norm.", "group_norm."),
        LeafRule("q.weight", "to_q.weight", .convToLinear), LeafRule("q.bias", "to_q.bias"),
        LeafRule("k.weight", "to_k.weight", .convToLinear), LeafRule("k.bias", "to_k.bias"),
        LeafRule("v.weight", "to_v.weight", .convToLinear), LeafRule("v.bias", "to_v.bias"),
        LeafRule("proj_out.weight", "to_out.0.weight", .convToLinear), LeafRule("proj_out.bias", "to_out.0.bias"),
    ], passThrough: false)

    /// An OpenCLIP `ResidualAttentionBlock` → transformers `CLIPEncoderLayer`; the fused
    /// `in_proj` holds q, k and v one after the other.
    public static let openCLIPLayer = LeafTable([
        LeafRule("ln_1.", "layer_norm1."),
        LeafRule("ln_2.", "layer_norm2."),
        LeafRule("mlp.c_fc.", "mlp.fc1."),
        LeafRule("mlp.c_proj.", "mlp.fc2."),
        LeafRule("attn.out_proj.", "self_attn.out_proj."),
        LeafRule("attn.in_proj_weight", "self_attn.q_proj.weight", .chunk(0, of: 3)),
        LeafRule("attn.in_proj_weight", "self_attn.k_proj.weight", .chunk(1, of: 3)),
        LeafRule("attn.in_proj_weight", "self_attn.v_proj.weight", .chunk(2, of: 3)),
        LeafRule("attn.in_proj_bias", "self_attn.q_proj.bias", .chunk(0, of: 3)),
        LeafRule("attn.in_proj_bias", "self_attn.k_proj.bias", .chunk(1, of: 3)),
        LeafRule("attn.in_proj_bias", "self_attn.v_proj.bias", .chunk(2, of: 3)),
    ], passThrough: false)

    // MARK: UNet

    /// `UNet2DConditionModel` from `model.diffusion_model.*`: `input_blocks` are numbered through
    /// the down blocks (each resnet with its attention, then the downsampler), `output_blocks`
    /// through the up blocks (resnet, attention, and the upsampler in the last layer).
    public static func unet(config: ConfigFile, sourcePrefix: String = "model.diffusion_model.") throws -> KeyMapping {
        let c = try ConfigReader(config)
        guard let down = try c.strings("down_block_types"), let up = try c.strings("up_block_types") else {
            throw ModelSourceError.invalidConfig(file: config.origin, detail: "needs down_block_types and up_block_types")
        }
        let n = down.count
        guard up.count == n, n > 0 else {
            throw ModelSourceError.invalidConfig(file: config.origin, detail: "has \(n) down and \(up.count) up block types")
        }
        let layers = try c.perBlock("layers_per_block", count: n, default: 2)
        let hasAttention = { (type: String) in type.contains("CrossAttn") }
        var rules = try encoderRules(c, config: config, down: down).rules + [
            KeyRule("out.0.", "conv_norm_out."),
            KeyRule("out.2.", "conv_out."),
        ]

        // Up block i mirrors down block n-1-i and has one more layer.
        var k = 0
        for i in 0..<n {
            let count = layers[n - 1 - i] + 1
            for j in 0..<count {
                rules.append(KeyRule("output_blocks.\(k).0.", "up_blocks.\(i).resnets.\(j).", unetResnet))
                if hasAttention(up[i]) { rules.append(KeyRule("output_blocks.\(k).1.", "up_blocks.\(i).attentions.\(j).")) }
                if j == count - 1 && i < n - 1 {
                    let slot = hasAttention(up[i]) ? 2 : 1
                    rules.append(KeyRule("output_blocks.\(k).\(slot).conv.", "up_blocks.\(i).upsamplers.0.conv."))
                }
                k += 1
            }
        }
        return KeyMapping(component: "unet", sourcePrefix: sourcePrefix, rules: rules)
    }

    /// The rules a UNet and a ControlNet share: the time and added embeddings, `input_blocks`
    /// (conv_in, then each down block's resnets, attentions and downsampler) and `middle_block`.
    /// Also returns how many `input_blocks` there are (a ControlNet has a zero convolution each).
    static func encoderRules(_ c: ConfigReader, config: ConfigFile, down: [String]) throws -> (rules: [KeyRule], inputBlocks: Int) {
        let n = down.count
        let layers = try c.perBlock("layers_per_block", count: n, default: 2)
        var rules = [
            KeyRule("time_embed.0.", "time_embedding.linear_1."),
            KeyRule("time_embed.2.", "time_embedding.linear_2."),
            KeyRule("input_blocks.0.0.", "conv_in."),
        ]
        // SDXL's size/crop conditioning (and the class embedding of upscalers) is `label_emb`.
        let embedding: String?
        if try c.string("addition_embed_type") == "text_time" {
            embedding = "add_embedding"
        } else if let type = try c.string("class_embed_type"), ["timestep", "projection"].contains(type) {
            embedding = "class_embedding"
        } else {
            embedding = nil
        }
        if let embedding {
            rules += [KeyRule("label_emb.0.0.", "\(embedding).linear_1."), KeyRule("label_emb.0.2.", "\(embedding).linear_2.")]
        }

        var k = 1
        for i in 0..<n {
            for j in 0..<layers[i] {
                rules.append(KeyRule("input_blocks.\(k).0.", "down_blocks.\(i).resnets.\(j).", unetResnet))
                if down[i].contains("CrossAttn") { rules.append(KeyRule("input_blocks.\(k).1.", "down_blocks.\(i).attentions.\(j).")) }
                k += 1
            }
            if i < n - 1 {
                rules.append(KeyRule("input_blocks.\(k).0.op.", "down_blocks.\(i).downsamplers.0.conv."))
                k += 1
            }
        }

        switch try c.nullableString("mid_block_type", missing: "UNetMidBlock2DCrossAttn") {
        case nil:
            break  // BK-SDM: no mid block
        case "UNetMidBlock2DCrossAttn":
            rules += [
                KeyRule("middle_block.0.", "mid_block.resnets.0.", unetResnet),
                KeyRule("middle_block.1.", "mid_block.attentions.0."),
                KeyRule("middle_block.2.", "mid_block.resnets.1.", unetResnet),
            ]
        case let other?:
            throw ModelSourceError.unsupported(location: config.origin, detail: "mid_block_type \(other) has no LDM key table here")
        }
        return (rules, k)
    }

    // MARK: ControlNet

    /// `ControlNetModel` from lllyasviel's ControlNet files (`control_model.*`, or bare keys as
    /// in thibaud/controlnet-sd21): the UNet's encoder keys, `input_hint_block` (conv_in, then
    /// every other index a block, the last conv_out: the odd indices are its SiLUs),
    /// `zero_convs.i.0` and `middle_block_out.0`. `hintIndices` are the hint block's conv
    /// indices in the file, in order. The config is the ControlNet's (the UNet's keys).
    public static func controlNet(config: ConfigFile, hintIndices: [Int], sourcePrefix: String = "control_model.") throws -> KeyMapping {
        let c = try ConfigReader(config)
        guard let down = try c.strings("down_block_types"), !down.isEmpty else {
            throw ModelSourceError.invalidConfig(file: config.origin, detail: "needs down_block_types")
        }
        guard hintIndices.count >= 2 else {
            throw ModelSourceError.invalidConfig(file: config.origin, detail: "a ControlNet's input_hint_block has a conv_in and a conv_out")
        }
        var (rules, inputBlocks) = try encoderRules(c, config: config, down: down)
        rules.append(KeyRule("input_hint_block.\(hintIndices.first!).", "controlnet_cond_embedding.conv_in."))
        rules.append(KeyRule("input_hint_block.\(hintIndices.last!).", "controlnet_cond_embedding.conv_out."))
        for (i, index) in hintIndices.dropFirst().dropLast().enumerated() {
            rules.append(KeyRule("input_hint_block.\(index).", "controlnet_cond_embedding.blocks.\(i)."))
        }
        for i in 0..<inputBlocks { rules.append(KeyRule("zero_convs.\(i).0.", "controlnet_down_blocks.\(i).")) }
        if try c.nullableString("mid_block_type", missing: "UNetMidBlock2DCrossAttn") != nil {
            rules.append(KeyRule("middle_block_out.0.", "controlnet_mid_block."))
        }
        return KeyMapping(component: "controlnet", sourcePrefix: sourcePrefix, rules: rules)
    }

    // MARK: VAE

    /// `AutoencoderKL` from `first_stage_model.*` (or a bare VAE file): `encoder.down.i.block.j`,
    /// `mid.block_1/attn_1/block_2`, and `decoder.up.i` numbered from the lowest resolution up,
    /// which is the reverse of diffusers' `up_blocks`.
    public static func vae(config: ConfigFile, sourcePrefix: String = "first_stage_model.") throws -> KeyMapping {
        let c = try ConfigReader(config)
        let n = try c.ints("block_out_channels")?.count ?? 1
        let layers = try c.int("layers_per_block", default: 1)
        let midAttention = try c.bool("mid_block_add_attention", default: true)

        var rules: [KeyRule] = []
        if try c.bool("use_quant_conv", default: true) { rules.append(KeyRule("quant_conv.", "quant_conv.")) }
        if try c.bool("use_post_quant_conv", default: true) { rules.append(KeyRule("post_quant_conv.", "post_quant_conv.")) }
        for part in ["encoder", "decoder"] {
            rules += [
                KeyRule("\(part).conv_in.", "\(part).conv_in."),
                KeyRule("\(part).norm_out.", "\(part).conv_norm_out."),
                KeyRule("\(part).conv_out.", "\(part).conv_out."),
                KeyRule("\(part).mid.block_1.", "\(part).mid_block.resnets.0.", vaeResnet),
                KeyRule("\(part).mid.block_2.", "\(part).mid_block.resnets.1.", vaeResnet),
            ]
            if midAttention { rules.append(KeyRule("\(part).mid.attn_1.", "\(part).mid_block.attentions.0.", vaeAttention)) }
        }
        for i in 0..<n {
            for j in 0..<layers {
                rules.append(KeyRule("encoder.down.\(i).block.\(j).", "encoder.down_blocks.\(i).resnets.\(j).", vaeResnet))
            }
            if i < n - 1 { rules.append(KeyRule("encoder.down.\(i).downsample.conv.", "encoder.down_blocks.\(i).downsamplers.0.conv.")) }
        }
        for i in 0..<n {
            let ldm = n - 1 - i
            for j in 0...layers {
                rules.append(KeyRule("decoder.up.\(ldm).block.\(j).", "decoder.up_blocks.\(i).resnets.\(j).", vaeResnet))
            }
            if i < n - 1 { rules.append(KeyRule("decoder.up.\(ldm).upsample.conv.", "decoder.up_blocks.\(i).upsamplers.0.conv.")) }
        }
        return KeyMapping(component: "vae", sourcePrefix: sourcePrefix, rules: rules)
    }

    // MARK: Text encoders

    /// OpenAI CLIP as transformers saves it (`cond_stage_model.transformer.*` in SD 1.x,
    /// `conditioner.embedders.0.transformer.*` in SDXL): the names are transformers' already.
    public static func clip(component: String = "text_encoder", sourcePrefix: String) -> KeyMapping {
        KeyMapping(component: component, sourcePrefix: sourcePrefix, rules: [KeyRule("text_model.", "text_model.")])
    }

    /// OpenCLIP's text tower (`cond_stage_model.model.*` in SD 2.x, `conditioner.embedders.1.model.*`
    /// in SDXL) → `CLIPTextModel` / `CLIPTextModelWithProjection` with the config's number of
    /// layers (SD 2's config stops one short of the checkpoint; the last layer goes unused).
    public static func openCLIP(config: ConfigFile, withProjection: Bool, component: String = "text_encoder",
                                sourcePrefix: String) throws -> KeyMapping {
        let layers = try ConfigReader(config).int("num_hidden_layers", default: 12)
        var rules = [
            KeyRule(exact: "token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
            KeyRule(exact: "positional_embedding", "text_model.embeddings.position_embedding.weight"),
            KeyRule("ln_final.", "text_model.final_layer_norm."),
        ]
        // OpenCLIP computes `x @ text_projection`; a linear layer's weight is its transpose.
        if withProjection { rules.append(KeyRule(exact: "text_projection", "text_projection.weight", .transpose)) }
        for l in 0..<layers {
            rules.append(KeyRule("transformer.resblocks.\(l).", "text_model.encoder.layers.\(l).", openCLIPLayer))
        }
        var ignored: [IgnoredKey] = [.exact("logit_scale"), .exact("attn_mask"), .layers(prefix: "transformer.resblocks.", from: layers)]
        if !withProjection { ignored.append(.exact("text_projection")) }
        return KeyMapping(component: component, sourcePrefix: sourcePrefix, rules: rules, ignored: ignored)
    }
}
