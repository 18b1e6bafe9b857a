import DiffuseCore
import DiffuseGraph
import DiffuseModels
import DiffuseSchedulers
import DiffuseTokenizer

/// A text encoder with its tokenizer and weights.
public struct TextEncoderComponent {
    public var tokenizer: CLIPTokenizer
    public var encoder: any CLIPTextEncoder
    public var weights: ModelWeights

    public init(tokenizer: CLIPTokenizer, encoder: any CLIPTextEncoder, weights: ModelWeights) {
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.weights = weights
    }
}

/// A VAE (full or tiny) with its weights.
public struct AutoencoderComponent {
    public var model: any ImageAutoencoder
    public var weights: ModelWeights

    public init(model: any ImageAutoencoder, weights: ModelWeights) {
        self.model = model
        self.weights = weights
    }

    /// Whether this is the tiny autoencoder (its encoder returns latents directly).
    public var isTiny: Bool { model is AutoencoderTiny }
}

/// Everything a Stable Diffusion pipeline runs: SD 1.x/2.x (one text encoder), SDXL (two), or
/// the SDXL refiner (the second alone).
public struct StableDiffusionComponents {
    /// A short name for messages and PNG metadata (the folder name or repo id).
    public var name: String
    /// The CLIP ViT-L text encoder; nil for the SDXL refiner, which has only the second, and for
    /// an image variation model, which has none.
    public var textEncoder: TextEncoderComponent?
    /// SDXL's CLIPTextModelWithProjection.
    public var textEncoder2: TextEncoderComponent?
    public var unet: UNet2DConditionModel
    public var unetWeights: ModelWeights
    /// The UNet's config.json as read (for ControlNets in the original single-file layout,
    /// whose config is the UNet's).
    public var unetConfigFile: ConfigFile?
    public var vae: AutoencoderComponent
    public var schedulerConfig: SchedulerConfig
    /// SDXL's pipeline option: with no negative prompt, the negative embeddings are zeros.
    public var forceZerosForEmptyPrompt: Bool
    /// The x4 upscaler's (diffusers' `StableDiffusionUpscalePipeline`) `low_res_scheduler`,
    /// which noises the low-resolution picture to the requested noise level, and the highest
    /// noise level it takes (`max_noise_level`); nil for other models.
    public var lowResSchedulerConfig: SchedulerConfig?
    public var maxNoiseLevel = 350
    /// diffusers' `is_cosxl_edit`: the InstructPix2Pix pipeline scales the picture's latents by
    /// the VAE's scaling factor (CosXL Edit was trained so). Loading sets it for a model of CosXL
    /// Edit's shape (`hasCosXLEditShape`).
    public var isCosXLEdit = false
    /// ControlNets for the UNet (diffusers' `StableDiffusion(XL)ControlNetPipeline`; several:
    /// `MultiControlNetModel`); requests then give one `ControlNetGuidance` each.
    public var controlNets: [ControlNetComponent] = []
    /// T2I-Adapters (diffusers' `StableDiffusion(XL)AdapterPipeline`; several: `MultiAdapter`);
    /// requests then give one `T2IAdapterGuidance` each. Check them with `checkT2IAdapters`.
    public var t2iAdapters: [T2IAdapterComponent] = []
    /// IP-Adapters (diffusers' `load_ip_adapter`), set with `loadIPAdapters`; requests then give
    /// one `IPAdapterGuidance` each.
    public private(set) var ipAdapters: [IPAdapterComponent] = []
    /// Their attention weights under the UNet's module paths, one source per adapter.
    public private(set) var ipAdapterAttentionWeights: [TensorSource] = []
    /// The image encoder the IP-Adapters read (diffusers' `image_encoder` and `feature_extractor`).
    public private(set) var imageEncoder: ImageEncoderComponent?
    /// An image variation model's image encoder (lambdalabs/sd-image-variations-diffusers,
    /// diffusers' `StableDiffusionImageVariationPipeline`): its `image_embeds` of the picture, one
    /// token, stand where a prompt's embeddings would.
    public var imageVariationEncoder: ImageEncoderComponent?
    /// A depth-to-image model's DPT depth estimator (its `depth_estimator/` and
    /// `feature_extractor/`): what estimates the depth when a request gives no depth map.
    public var depthEstimator: DepthEstimatorComponent?
    /// The folder's safety checker (SD 1.x's `safety_checker/`), run on every decoded image as
    /// diffusers runs it; set to nil for diffusers' `safety_checker=None`.
    public var safetyChecker: SafetyCheckerComponent?
    /// Stable unCLIP's image encoder, normaliser and noising scheduler (see `StableUnCLIPParts`).
    public var unCLIP: StableUnCLIPParts?
    /// SDXL image-to-image's `requires_aesthetics_score` (the refiner's): the UNet's time ids end
    /// in an aesthetic score instead of the target size.
    public var requiresAestheticsScore: Bool

    public init(name: String, textEncoder: TextEncoderComponent?, textEncoder2: TextEncoderComponent?,
                unet: UNet2DConditionModel, unetWeights: ModelWeights, vae: AutoencoderComponent,
                schedulerConfig: SchedulerConfig, forceZerosForEmptyPrompt: Bool, requiresAestheticsScore: Bool = false) {
        self.name = name
        self.textEncoder = textEncoder
        self.textEncoder2 = textEncoder2
        self.unet = unet
        self.unetWeights = unetWeights
        self.vae = vae
        self.schedulerConfig = schedulerConfig
        self.forceZerosForEmptyPrompt = forceZerosForEmptyPrompt
        self.requiresAestheticsScore = requiresAestheticsScore
    }

    /// Loads IP-Adapters with the image encoder they were trained with; fails, naming the file,
    /// when an adapter does not fit this UNet or the encoder's outputs.
    public mutating func loadIPAdapters(_ adapters: [IPAdapterComponent], imageEncoder: ImageEncoderComponent?) throws {
        if !adapters.isEmpty {
            guard let imageEncoder else { throw PipelineError("IP-Adapters need their image encoder (a CLIPVisionModelWithProjection folder)") }
            let vision = imageEncoder.model.config
            for a in adapters {
                let (want, have, what) = a.projection.imageEncoderOutput == .imageEmbeds
                    ? (a.projection.imageEmbedDim, vision.projectionDim, "image_embeds (projection_dim)")
                    : (a.projection.imageEmbedDim, vision.hiddenSize, "hidden states (hidden_size)")
                guard want == have else {
                    throw PipelineError("IP-Adapter \(a.name) reads \(want)-channel image features; the image encoder \(imageEncoder.name) gives \(what) of \(have): they were not made together")
                }
            }
        }
        ipAdapterAttentionWeights = try adapters.enumerated().map { try $1.attentionWeights(for: unet, index: $0) }
        ipAdapters = adapters
        self.imageEncoder = adapters.isEmpty ? nil : imageEncoder
    }

    /// The text encoders present, with their diffusers component names.
    public var textEncoders: [(name: String, component: TextEncoderComponent)] {
        [("text_encoder", textEncoder), ("text_encoder_2", textEncoder2)].compactMap { name, c in c.map { (name, $0) } }
    }

    /// SDXL: the OpenCLIP bigG encoder (beside ViT-L, or alone in the refiner) and text_time
    /// conditioning.
    public var isXL: Bool { textEncoder2 != nil }

    /// SDXL's micro-conditioning values per UNet row: 6, or 5 with an aesthetic score.
    public var timeIdCount: Int { requiresAestheticsScore ? 5 : 6 }

    /// An inpainting UNet (sd-v1-5-inpainting and its kin) takes the latents, the mask and the
    /// masked image's latents side by side: 4 + 1 + 4 input channels.
    public var hasInpaintingUNet: Bool { unet.config.inChannels == 2 * vae.model.latentChannels + 1 }

    /// An InstructPix2Pix UNet (timbrooks/instruct-pix2pix, diffusers' InstructPix2Pix
    /// pipelines) takes the latents and the picture-to-edit's latents side by side: 4 + 4. (An
    /// upscaler of 3 latent channels takes 3 + 3, and is no InstructPix2Pix model.)
    public var isInstructPix2Pix: Bool { !isUpscaler && !isLatentUpscaler && unet.config.inChannels == 2 * vae.model.latentChannels }

    /// CosXL Edit's shape: an SDXL InstructPix2Pix model whose scheduler is EDM Euler with
    /// v-prediction. diffusers leaves `is_cosxl_edit` to the caller; no other model has this
    /// shape, so loading sets `isCosXLEdit` from it.
    public var hasCosXLEditShape: Bool {
        isInstructPix2Pix && isXL && schedulerConfig.className == "EDMEulerScheduler"
            && schedulerConfig["prediction_type"]?.string == "v_prediction"
    }

    /// The latent x2 upscaler (stabilityai/sd-x2-latent-upscaler, diffusers'
    /// `StableDiffusionLatentUpscalePipeline`): a K-UNet taking the latents and the picture's.
    public var isLatentUpscaler: Bool { unet.config.isKUNet }

    /// A depth-to-image UNet (stabilityai/stable-diffusion-2-depth) takes the latents and the
    /// picture's depth side by side: 4 + 1.
    public var isDepthToImage: Bool { !isUpscaler && unet.config.inChannels == vae.model.latentChannels + 1 }

    /// An image variation model: it makes variations of a picture, with no text encoder.
    public var isImageVariation: Bool { imageVariationEncoder != nil }

    /// The x4 upscaler (stabilityai/stable-diffusion-x4-upscaler): its UNet takes the latents and
    /// the noised low-resolution picture (3 channels) side by side, and the noise level as a class.
    public var isUpscaler: Bool { lowResSchedulerConfig != nil }

    /// The default image size: the UNet's sample size times the VAE's scale factor. A list
    /// sample size is [height, width], as diffusers' pipelines read it.
    public var defaultImageSize: (width: Int, height: Int) {
        let h: Int, w: Int
        switch unet.config.sampleSize {
        case .int(let v)?: (h, w) = (v, v)
        case .list(let l)? where l.count == 2: (h, w) = (l[0], l[1])
        case .list(let l)?: (h, w) = (l.first ?? 64, l.first ?? 64)
        case nil: (h, w) = (64, 64)
        }
        let scale = vae.model.spatialScaleFactor
        return (w * scale, h * scale)
    }
}

extension FreeU {
    /// The values diffusers' FreeU docs give the model's family.
    public static func recommended(for components: StableDiffusionComponents) -> FreeU {
        if components.isXL { return .stableDiffusionXL }
        // SD 2.x conditions on OpenCLIP ViT-H's 1024-wide states, SD 1.x on CLIP ViT-L's 768.
        return components.unet.config.crossAttentionDims.first == 1024 ? .stableDiffusion2 : .stableDiffusion1
    }
}
