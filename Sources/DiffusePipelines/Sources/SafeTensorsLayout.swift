import DiffuseCore

/// The generations of Stable Diffusion checkpoints, told apart by their text encoders.
public enum StableDiffusionFamily: String, Sendable, CaseIterable, CustomStringConvertible {
    /// LDM layout, OpenAI CLIP ViT-L (`cond_stage_model.transformer.*`).
    case sd1
    /// LDM layout, OpenCLIP ViT-H (`cond_stage_model.model.*`).
    case sd2
    /// SGM layout, CLIP ViT-L and OpenCLIP ViT-bigG (`conditioner.embedders.{0,1}.*`).
    case sdxl
    /// The SDXL refiner: SGM layout, OpenCLIP ViT-bigG alone (`conditioner.embedders.0.model.*`).
    case sdxlRefiner

    /// SDXL's pipelines (the base's and the refiner's).
    public var isXL: Bool { self == .sdxl || self == .sdxlRefiner }

    public var description: String {
        switch self {
        case .sd1: return "Stable Diffusion 1.x (LDM layout)"
        case .sd2: return "Stable Diffusion 2.x (LDM layout, OpenCLIP-H text encoder)"
        case .sdxl: return "Stable Diffusion XL (SGM layout)"
        case .sdxlRefiner: return "Stable Diffusion XL refiner (SGM layout, OpenCLIP-bigG alone)"
        }
    }

    /// Where an original checkpoint keeps each component.
    public var prefixes: [(component: String, prefix: String)] {
        switch self {
        case .sd1: return [("unet", "model.diffusion_model."), ("vae", "first_stage_model."), ("text_encoder", "cond_stage_model.transformer.")]
        case .sd2: return [("unet", "model.diffusion_model."), ("vae", "first_stage_model."), ("text_encoder", "cond_stage_model.model.")]
        case .sdxl:
            return [("unet", "model.diffusion_model."), ("vae", "first_stage_model."),
                    ("text_encoder", "conditioner.embedders.0.transformer."), ("text_encoder_2", "conditioner.embedders.1.model.")]
        case .sdxlRefiner:
            return [("unet", "model.diffusion_model."), ("vae", "first_stage_model."), ("text_encoder_2", "conditioner.embedders.0.model.")]
        }
    }

    /// The built-in architectures of this family.
    public var architectures: [EmbeddedArchitecture] {
        switch self {
        case .sd1: return [.sd15, .bksdmSmall, .bksdmTiny]
        case .sd2: return [.sd21, .sd21Base]
        case .sdxl: return [.sdxlBase, .sdxlTurbo]
        case .sdxlRefiner: return []  // its configs come from a config folder
        }
    }
}

/// The key layouts of the tiny autoencoder's weights.
public enum TinyVAEKeys: String, Sendable {
    /// diffusers' `AutoencoderTiny`: `encoder.layers.N…`, `decoder.layers.N…`.
    case diffusers = "diffusers (encoder.layers.*, decoder.layers.*)"
    /// taesd.py's `TAESD` module: `encoder.N…`, `decoder.N…` (the decoder one index higher).
    case taesdModule = "taesd.py module (encoder.N.*, decoder.N.*)"
    /// taesd.py's encoder file alone (`taesd_encoder`): `N…`.
    case taesdEncoder = "taesd.py encoder only (N.*)"
    /// taesd.py's decoder file alone (`taesd_decoder`): `N…`.
    case taesdDecoder = "taesd.py decoder only (N.*)"
}

/// What a `.safetensors` file holds, told from its tensor names (and a few shapes).
public enum SafeTensorsLayout: Equatable, Sendable, CustomStringConvertible {
    /// A whole Stable Diffusion checkpoint in its original layout.
    case stableDiffusion(StableDiffusionFamily)
    /// An `AutoencoderKL` in the LDM layout, its keys under `prefix` (`""` for a VAE file).
    case ldmVAE(prefix: String)
    /// An `AutoencoderKL` with diffusers' names.
    case diffusersVAE
    case tinyVAE(TinyVAEKeys)
    /// A diffusers `UNet2DConditionModel` file alone.
    case diffusersUNet
    /// A transformers CLIP text model file alone.
    case clipTextModel
    case unknown

    public var description: String {
        switch self {
        case .stableDiffusion(let f): return "single-file checkpoint, \(f)"
        case .ldmVAE(let prefix): return "AutoencoderKL, LDM layout" + (prefix.isEmpty ? "" : " (\(prefix)*)")
        case .diffusersVAE: return "AutoencoderKL, diffusers layout"
        case .tinyVAE(let keys): return "AutoencoderTiny, \(keys.rawValue)"
        case .diffusersUNet: return "UNet2DConditionModel, diffusers layout"
        case .clipTextModel: return "CLIP text model, transformers layout"
        case .unknown: return "unknown layout"
        }
    }

    public static func detect(_ source: TensorSource) -> SafeTensorsLayout {
        let names = source.tensorNames
        func has(_ prefix: String) -> Bool { names.contains { $0.hasPrefix(prefix) } }

        if has("model.diffusion_model.") {
            if has("conditioner.embedders.1.model.") || has("conditioner.embedders.0.transformer.") { return .stableDiffusion(.sdxl) }
            if has("conditioner.embedders.0.model.") { return .stableDiffusion(.sdxlRefiner) }
            if has("cond_stage_model.model.") { return .stableDiffusion(.sd2) }
            if has("cond_stage_model.transformer.") { return .stableDiffusion(.sd1) }
            // No text encoder: the UNet's conditioning width and SDXL's size embedding tell.
            if has("model.diffusion_model.label_emb.") { return .stableDiffusion(.sdxl) }
            let context = names.first { $0.hasPrefix("model.diffusion_model.") && $0.hasSuffix("attn2.to_k.weight") }
                .flatMap { source.info($0)?.shape.last }
            return .stableDiffusion(context == 1024 ? .sd2 : .sd1)
        }
        for prefix in ["", "first_stage_model.", "vae."] where has(prefix + "encoder.down.") || has(prefix + "decoder.up.") {
            return .ldmVAE(prefix: prefix)
        }
        if has("encoder.down_blocks.") || has("decoder.up_blocks.") { return .diffusersVAE }
        if has("encoder.layers.") || has("decoder.layers.") { return .tinyVAE(.diffusers) }
        // taesd.py: Sequential indices. The encoder starts with conv(3, 64) at 0; the decoder's
        // index 0 is the parameter-free clamp, so its first conv is 1 and takes the latents.
        if source.info("encoder.0.weight") != nil || source.info("decoder.1.weight") != nil { return .tinyVAE(.taesdModule) }
        if !names.isEmpty, names.allSatisfy({ $0.first?.isNumber == true }) {
            if let first = source.info("0.weight"), first.shape.count == 4, first.shape[1] == 3 { return .tinyVAE(.taesdEncoder) }
            if source.info("0.weight") == nil, source.info("1.weight")?.shape.count == 4 { return .tinyVAE(.taesdDecoder) }
        }
        if has("down_blocks.") && source.info("conv_in.weight") != nil { return .diffusersUNet }
        if has("text_model.embeddings.") || source.info("embeddings.token_embedding.weight") != nil { return .clipTextModel }
        return .unknown
    }
}
