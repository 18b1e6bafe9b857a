import DiffuseCore
import DiffuseGraph
import DiffuseModels
import DiffuseSchedulers
import DiffuseTokenizer

extension StableDiffusionComponents {
    /// Opens a model the user points at — a diffusers folder, a Hugging Face cache repo id, or a
    /// single `.safetensors` checkpoint — and builds each network from its config with its weights
    /// checked (missing or misshapen tensors are errors; unused ones a warning).
    /// `loras` are fused into the UNet's and text encoders' weights as they load; `embeddings`
    /// (textual inversion) add tokens to the tokenizers and rows to the text encoders.
    public static func load(_ location: String, options: ModelSourceOptions = .init(), vae: String? = nil,
                            loras: [LoRA] = [], embeddings: [TextualInversion] = []) throws -> StableDiffusionComponents {
        var source = try ModelSource.open(location, options: options)
        if let vae { source = source.replacing(try VAESource.open(vae, modelVAEConfig: source["vae"]?.config, options: options)) }
        return try StableDiffusionComponents(source: source, loras: loras, embeddings: embeddings)
    }

    /// A diffusers pipeline folder (kept for callers that know they have one).
    public static func load(folder: String) throws -> StableDiffusionComponents {
        try load(folder)
    }

    /// The real architecture `architecture` (its embedded configs and CLIP vocabulary) with
    /// seeded random weights: what the benchmarks run when no weights are given.
    public static func randomWeights(_ architecture: EmbeddedArchitecture, seed: UInt64 = 0,
                                     loras: [LoRA] = [], embeddings: [TextualInversion] = []) throws -> StableDiffusionComponents {
        try StableDiffusionComponents(source: try ModelSource.builtIn(architecture), randomWeightsSeed: seed, loras: loras,
                                      embeddings: embeddings)
    }

    /// A VAE on its own (a folder, file or repo id), as `--vae` takes it.
    public static func loadAutoencoder(_ location: String) throws -> AutoencoderComponent {
        try autoencoder(try VAESource.open(location), randomWeightsSeed: nil)
    }

    /// The components a model source describes. With `randomWeightsSeed`, sources without
    /// weights (built-in architectures) get seeded random weights instead; `loras` are fused in
    /// and `embeddings` added.
    public init(source: ModelSource, randomWeightsSeed: UInt64? = nil, loras: [LoRA] = [],
                embeddings: [TextualInversion] = []) throws {
        let supported = ["StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusionImg2ImgPipeline",
                         "StableDiffusionXLImg2ImgPipeline", "StableDiffusionInpaintPipeline", "StableDiffusionXLInpaintPipeline",
                         "StableDiffusionInstructPix2PixPipeline", "StableDiffusionXLInstructPix2PixPipeline",
                         "StableDiffusionUpscalePipeline", "StableDiffusionDepth2ImgPipeline", "StableDiffusionImageVariationPipeline",
                         "StableUnCLIPImg2ImgPipeline", "StableDiffusionLatentUpscalePipeline"]
        guard supported.contains(source.pipelineClass) else {
            throw PipelineError("\(source.origin): pipeline class \(source.pipelineClass) is not supported (Stable Diffusion 1.x/2.x and SDXL are)")
        }
        for note in source.notes { Log.info(note) }
        func weights(_ c: ComponentSource, _ model: some ModelComponent,
                     originalNames: ((String) -> String?)? = nil) throws -> ModelWeights {
            var tensors: TensorSource
            if let w = c.weights {
                tensors = (model as? any CLIPTextEncoder)?.canonicalWeights(w) ?? w
                try model.checkWeights(tensors)
            } else if let seed = randomWeightsSeed {
                tensors = model.randomWeights(seed: seed &+ stableHash(c.name))
            } else {
                tensors = try c.requireWeights()
            }
            tensors = try LoRA.adapt(tensors, component: c.name, parameters: model.parameters,
                                     originalNames: originalNames, loras: loras)
            return ModelWeights(tensors)
        }
        let isXL = source["text_encoder_2"] != nil
        // The SDXL refiner has only the second text encoder (its model_index names no first); an
        // image variation model has none.
        let imageVariation = source.pipelineClass == "StableDiffusionImageVariationPipeline"
        let hasFirstEncoder = source["text_encoder"] != nil || !(isXL || imageVariation)
        let encoderNames = (hasFirstEncoder ? ["text_encoder"] : []) + (isXL ? ["text_encoder_2"] : [])
        let encoderConfigs = try encoderNames.map { name in
            let config = try source.component(name).requireConfig()
            return try decodeConfiguration(CLIPTextConfig.self, from: config.bytes, origin: config.origin)
        }
        let widths = Dictionary(uniqueKeysWithValues: zip(encoderNames, encoderConfigs.map(\.hiddenSize)))
        try TextualInversion.check(embeddings, widths: widths, model: source.origin)
        func textEncoder(_ name: String, _ tokenizer: String) throws -> TextEncoderComponent? {
            guard let index = encoderNames.firstIndex(of: name) else { return nil }
            let c = try source.component(name)
            let encoder: any CLIPTextEncoder = c.className == "CLIPTextModelWithProjection"
                ? try CLIPTextModelWithProjection(config: encoderConfigs[index]) : try CLIPTextModel(config: encoderConfigs[index])
            let component = TextEncoderComponent(tokenizer: try source.component(tokenizer).makeTokenizer(), encoder: encoder,
                                                 weights: try weights(c, encoder))
            return try TextualInversion.extend(component, name: name, embeddings: embeddings, widths: widths)
        }
        let unetSource = try source.component("unet")
        let unetConfig = try unetSource.requireConfig()
        let unet = try UNet2DConditionModel(config: try decodeConfiguration(UNet2DConditionModel.Configuration.self,
                                                                            from: unetConfig.bytes, origin: unetConfig.origin))
        let schedulerSource = try source.component("scheduler")
        let schedulerConfig = try schedulerSource.requireConfig()
        try LoRA.checkComponents(loras, present: Set(["unet"] + encoderNames), model: source.origin)
        // sd-scripts names an SDXL UNet's modules as the original (SGM) checkpoints do.
        let originalUNetNames = loras.isEmpty ? nil : try LDMKeyTables.unet(config: unetConfig, sourcePrefix: "")
        // diffusers builds the class model_index.json names, whatever the config's `_class_name` says.
        var schedulerJSON = try schedulerConfig.json()
        if !schedulerSource.className.isEmpty, let members = schedulerJSON.members, schedulerJSON["_class_name"]?.string != schedulerSource.className {
            schedulerJSON = .object([("_class_name", .string(schedulerSource.className))] + members.filter { $0.0 != "_class_name" })
        }
        let config = try SchedulerConfig(json: schedulerJSON, origin: schedulerConfig.origin)
        self.init(
            name: source.origin,
            textEncoder: try textEncoder("text_encoder", "tokenizer"),
            textEncoder2: try textEncoder("text_encoder_2", "tokenizer_2"),
            unet: unet, unetWeights: try weights(unetSource, unet, originalNames: originalUNetNames.map { m in { m.source(forTarget: $0)?.name } }),
            vae: try Self.autoencoder(try source.component("vae"), randomWeightsSeed: randomWeightsSeed),
            // The class diffusers' from_pretrained builds is the model_index's; only the text,
            // image-to-image and inpainting pipelines of SD 1.x/2.x fix old scheduler configs.
            schedulerConfig: isXL || !["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                                       "StableDiffusionInpaintPipeline"].contains(source.pipelineClass)
                ? config : config.fixedByStableDiffusionPipeline(inpainting: source.pipelineClass == "StableDiffusionInpaintPipeline"),
            forceZerosForEmptyPrompt: source.pipelineSetting("force_zeros_for_empty_prompt")?.bool ?? isXL,
            requiresAestheticsScore: isXL && source.pipelineSetting("requires_aesthetics_score")?.bool == true)
        if isXL, let pooled = textEncoder2?.encoder.config.projectionDim, let timeDim = unet.config.additionTimeEmbedDim,
           let taken = unet.config.projectionClassEmbeddingsInputDim {
            // diffusers' `_get_add_time_ids` check: the pooled text embedding and 6 time ids (5
            // with an aesthetic score), each embedded in addition_time_embed_dim.
            let ids = requiresAestheticsScore ? 5 : 6
            guard pooled + ids * timeDim == taken else {
                throw PipelineError("\(unetConfig.origin): the UNet takes \(taken) added-embedding inputs, but \(pooled) pooled text "
                                    + "features and \(ids) time ids of \(timeDim) make \(pooled + ids * timeDim); the model's "
                                    + "requires_aesthetics_score (\(requiresAestheticsScore)) may be wrong for this UNet")
            }
        }
        unetConfigFile = unetConfig
        if hasCosXLEditShape {
            isCosXLEdit = true
            Log.info("\(source.origin): an SDXL InstructPix2Pix model with EDM v-prediction is CosXL Edit: the picture's latents are "
                     + "scaled by the VAE's scaling factor (diffusers' is_cosxl_edit)")
        }
        if unet.config.isKUNet || source.pipelineClass == "StableDiffusionLatentUpscalePipeline" {
            try checkLatentUpscaler(source)
            return
        }
        try loadSafetyChecker(source)
        if source.pipelineClass == "StableDiffusionUpscalePipeline" {
            try loadUpscaler(source)
            return
        }
        if imageVariation { try loadImageVariationEncoder(source) }
        if source.pipelineClass == "StableUnCLIPImg2ImgPipeline" { try loadStableUnCLIP(source) }
        let latent = vae.model.latentChannels, taken = unet.config.inChannels
        if isDepthToImage { try loadDepthEstimator(source) }
        guard [latent, 2 * latent + 1, 2 * latent, latent + 1].contains(taken) else {
            throw PipelineError("\(unetConfig.origin): the UNet takes \(taken) input channels; with \(latent) latent channels "
                                + "only \(latent) (text or image to image), \(2 * latent + 1) (inpainting), \(2 * latent) "
                                + "(InstructPix2Pix) or \(latent + 1) (depth to image) can run here")
        }
    }

    /// The latent x2 upscaler's UNet: a K-UNet taking the latents and the picture's (twice the
    /// latent channels), giving them and a variance (one more), with a timestep condition of
    /// the noise level's 128 values and the pooled prompt.
    func checkLatentUpscaler(_ source: ModelSource) throws {
        let origin = unetConfigFile?.origin ?? source.origin
        guard unet.config.isKUNet else {
            throw PipelineError("\(origin): StableDiffusionLatentUpscalePipeline needs a K-UNet (KDownBlock2D, KCrossAttnDownBlock2D, "
                                + "KUpBlock2D, KCrossAttnUpBlock2D blocks); this UNet has \(unet.config.downBlockTypes)")
        }
        guard source.pipelineClass == "StableDiffusionLatentUpscalePipeline" else {
            throw PipelineError("\(origin): a K-UNet (the latent x2 upscaler's) runs in StableDiffusionLatentUpscalePipeline, not \(source.pipelineClass)")
        }
        guard let te = textEncoder, textEncoder2 == nil else {
            throw PipelineError("\(source.origin): the latent upscale pipeline takes one CLIP text encoder")
        }
        let latent = vae.model.latentChannels, c = unet.config
        let condition = StableDiffusionPipeline.latentUpscaleNoiseLevelWidth + te.encoder.hiddenSize
        guard c.inChannels == 2 * latent, c.outChannels == latent + 1, c.timeCondProjDim == condition else {
            throw PipelineError("\(origin): the latent upscaler's UNet takes \(2 * latent) input channels (the latents and the picture's), "
                                + "gives \(latent + 1) (the latents and a variance) and a timestep condition of \(condition) "
                                + "(128 for the noise level and the text encoder's \(te.encoder.hiddenSize) pooled); this one takes "
                                + "\(c.inChannels), gives \(c.outChannels), conditions on \(c.timeCondProjDim.map(String.init) ?? "none")")
        }
    }

    /// The x4 upscaler's parts beyond a text-to-image model's: the low-resolution scheduler, the
    /// noise-level class embedding, a UNet taking 3 picture channels beside the latents, and the
    /// VAE scaling factor 0.08333, which diffusers' pipeline sets whatever the VAE's config says.
    mutating func loadUpscaler(_ source: ModelSource) throws {
        let low = try source.component("low_res_scheduler").requireConfig()
        lowResSchedulerConfig = try SchedulerConfig(json: try low.json(), origin: low.origin)
        if let level = source.pipelineSetting("max_noise_level") {
            guard let v = level.int, v >= 0 else { throw PipelineError("\(source.origin): max_noise_level \(level.serialized()) is not a whole number") }
            maxNoiseLevel = v
        }
        let latent = vae.model.latentChannels, taken = unet.config.inChannels
        guard unet.config.numClassEmbeds != nil, taken == latent + 3 else {
            throw PipelineError("\(source.origin): an upscaler's UNet takes \(latent + 3) input channels (the latents and the picture) "
                                + "and the noise level as a class (num_class_embeds); this one takes \(taken) channels"
                                + (unet.config.numClassEmbeds == nil ? " and no class" : ""))
        }
        guard let kl = vae.model as? AutoencoderKL else { throw PipelineError("\(source.origin): an upscaler needs its AutoencoderKL") }
        if kl.scalingFactor != 0.08333 {
            Log.info("\(source.origin): the VAE's scaling_factor \(kl.scalingFactor) taken as 0.08333, as diffusers' upscale pipeline does")
            var config = kl.config
            config.scalingFactor = 0.08333
            vae.model = try AutoencoderKL(config: config)
        }
    }

    /// A depth-to-image folder's `depth_estimator/` with its `feature_extractor/` preprocessing,
    /// when it has one (a single-file checkpoint, or a folder saved without, needs depth maps).
    mutating func loadDepthEstimator(_ source: ModelSource) throws {
        guard let folder = source.path, Files.isDirectory(folder),
              Files.exists(Files.join(folder, "depth_estimator", "config.json")) else { return }
        depthEstimator = try DepthEstimatorComponent.load(Files.join(folder, "depth_estimator"),
                                                          featureExtractor: Self.featureExtractorConfig(in: folder))
    }

    /// The safety checker a diffusers folder lists (`safety_checker/`, with `feature_extractor/`),
    /// which diffusers loads and runs unless told `safety_checker=None`. A folder that lists one
    /// but lacks its files loads without it, saying so.
    mutating func loadSafetyChecker(_ source: ModelSource) throws {
        guard source.skipped.contains(where: { $0.name == "safety_checker" }), let folder = source.path, Files.isDirectory(folder) else { return }
        let checker = Files.join(folder, "safety_checker")
        guard Files.exists(Files.join(checker, "config.json")) else {
            Log.warning("\(source.origin): model_index.json lists a safety_checker but \(checker) has no config.json; images are not checked")
            return
        }
        safetyChecker = try SafetyCheckerComponent.load(checker, featureExtractor: Self.featureExtractorConfig(in: folder))
    }

    /// An image variation model's `image_encoder/` with its `feature_extractor/` preprocessing:
    /// its `image_embeds` must have the width the UNet's cross-attention takes.
    mutating func loadImageVariationEncoder(_ source: ModelSource) throws {
        let encoder = try Self.pictureEncoder(source, model: "an image variation model")
        let (width, taken) = (encoder.model.config.projectionDim, unet.config.crossAttentionDims[0])
        guard width == taken else {
            throw PipelineError("\(source.origin): the image encoder's image_embeds have \(width) channels (projection_dim); "
                                + "the UNet's cross-attention takes \(taken)")
        }
        imageVariationEncoder = encoder
    }

    /// A model folder's own `image_encoder/` with its `feature_extractor/` preprocessing (image
    /// variation's and Stable unCLIP's; those folders are only read as diffusers folders).
    static func pictureEncoder(_ source: ModelSource, model: String) throws -> ImageEncoderComponent {
        guard let folder = source.path, Files.isDirectory(folder) else {
            throw PipelineError("\(source.origin): \(model) is read from its diffusers folder (image_encoder/, feature_extractor/, ...)")
        }
        return try ImageEncoderComponent.load(Files.join(folder, "image_encoder"), featureExtractor: featureExtractorConfig(in: folder))
    }

    /// A pipeline folder's `feature_extractor/preprocessor_config.json`, when it has one.
    static func featureExtractorConfig(in folder: String) -> String? {
        let path = Files.join(folder, "feature_extractor", "preprocessor_config.json")
        return Files.exists(path) ? path : nil
    }

    /// An AutoencoderKL or AutoencoderTiny component.
    static func autoencoder(_ c: ComponentSource, randomWeightsSeed: UInt64?) throws -> AutoencoderComponent {
        let config = try c.requireConfig()
        let model: any ImageAutoencoder
        if c.className == "AutoencoderTiny" {
            model = try AutoencoderTiny(config: try decodeConfiguration(AutoencoderTiny.Configuration.self, from: config.bytes, origin: config.origin))
        } else {
            model = try AutoencoderKL(config: try decodeConfiguration(AutoencoderKL.Configuration.self, from: config.bytes, origin: config.origin))
        }
        if let w = c.weights {
            // A tiny autoencoder may come as its decoder alone (taesd.py's decoder file): enough
            // to decode; encoding (image to image) then fails naming the missing tensors.
            if let tiny = model as? AutoencoderTiny, let first = tiny.encoder.parameters.first, w.info(first.name) == nil {
                try tiny.decoder.checkWeights(w)
            } else {
                try model.checkWeights(w)
            }
            return AutoencoderComponent(model: model, weights: ModelWeights(w))
        }
        guard let seed = randomWeightsSeed else { return AutoencoderComponent(model: model, weights: ModelWeights(try c.requireWeights())) }
        return AutoencoderComponent(model: model, weights: ModelWeights(model.randomWeights(seed: seed &+ stableHash(c.name))))
    }
}

/// FNV-1a of a name: a per-component seed offset that is the same in every process (Swift's
/// `hashValue` is randomized per run).
func stableHash(_ s: String) -> UInt64 {
    var h: UInt64 = 0xCBF2_9CE4_8422_2325
    for b in s.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01B3 }
    return h
}
