import DiffuseCore
import DiffuseModels
import DiffusePipelines
import DiffuseSchedulers
import DiffuseTokenizer
import Testing

/// The family whose original layout a reference model is written in: SDXL by its pipeline,
/// SD 2 by its OpenCLIP text encoder (gelu, where OpenAI's CLIP uses quick_gelu).
func family(of source: ModelSource) throws -> StableDiffusionFamily {
    if source.pipelineClass.contains("XL") { return .sdxl }
    let config = try source.component("text_encoder").requireConfig().json()
    return config["hidden_act"]?.string == "gelu" ? .sd2 : .sd1
}

@Suite("Sources: single-file checkpoints")
struct SingleFileTests {
    /// Tensors a real checkpoint carries beside the components, which the loader must skip:
    /// the training schedule, EMA copies, CLIP's position ids, OpenCLIP's logit scale and, for
    /// SD 2, the 24th OpenCLIP layer that diffusers' 23-layer config leaves out.
    func realCheckpointExtras(_ tensors: [(String, Tensor)], family: StableDiffusionFamily) -> [(String, Tensor)] {
        var extras: [(String, Tensor)] = [
            ("alphas_cumprod", Tensor(shape: [4], floats: [0.9, 0.8, 0.7, 0.6])),
            ("model_ema.decay", Tensor(shape: [], floats: [0.9999])),
        ]
        switch family {
        case .sd1:
            extras.append(("cond_stage_model.transformer.text_model.embeddings.position_ids",
                           Tensor(shape: [1, 77], dtype: .int64, values: (0..<77).map { Int64($0) })))
        case .sd2:
            extras.append(("cond_stage_model.model.logit_scale", Tensor(shape: [], floats: [4.6])))
            // One more layer than the config's, copied from layer 0.
            let layer0 = tensors.filter { $0.0.hasPrefix("cond_stage_model.model.transformer.resblocks.0.") }
            let next = tensors.filter { $0.0.hasPrefix("cond_stage_model.model.transformer.resblocks.") }
                .compactMap { Int($0.0.split(separator: ".")[4]) }.max()! + 1
            extras += layer0.map { ($0.0.replacingOccurrences(of: "resblocks.0.", with: "resblocks.\(next)."), $0.1) }
            let width = tensors.first { $0.0 == "cond_stage_model.model.ln_final.weight" }!.1.shape[0]
            extras.append(("cond_stage_model.model.text_projection", Tensor(zeros: [width, width])))
        case .sdxl:
            extras.append(("conditioner.embedders.1.model.logit_scale", Tensor(shape: [], floats: [4.6])))
        case .sdxlRefiner:
            extras.append(("conditioner.embedders.0.model.logit_scale", Tensor(shape: [], floats: [4.6])))
        }
        return extras
    }

    /// A checkpoint in the original layout, written here from each reference model with the key
    /// tables run backwards, reads back through the tables as tensors identical to the folder's.
    @Test(arguments: try ReferenceModel.withOriginalLayout())
    func originalLayoutRoundTrip(model: ReferenceModel) throws {
        let folder = try ModelSource.open(model.folder)
        let family = try family(of: folder)
        var tensors = try originalLayoutTensors(folder, family: family)
        tensors += realCheckpointExtras(tensors, family: family)
        let dir = try TemporaryDirectory()
        // As a .safetensors file, and as a Lightning .ckpt (weights under "state_dict").
        for ext in ["safetensors", "ckpt"] {
        let path = dir.join("\(model.variant).\(ext)")
        if ext == "ckpt" { try writeTorchCheckpoint(tensors, wrappedIn: "state_dict", to: path) } else { try SafeTensors.write(tensors, to: path) }

        let single = try ModelSource.open(path, options: .init(config: model.folder))
        guard case let .singleFile(layout, configs) = single.kind else { Issue.record("\(single.kind)"); return }
        #expect(layout == .stableDiffusion(family))
        #expect(configs == model.folder)
        #expect(single.pipelineClass == folder.pipelineClass)
        #expect(Set(single.components.map(\.name)) == Set(folder.components.filter { $0.name != "vae_tiny" }.map(\.name)))

        var compared = 0
        for (component, _) in family.prefixes {
            let want = try #require(folder.component(component).weights)
            let got = try #require(single.component(component).weights)
            // CLIP's position_ids buffer passes through (the text model skips it, as transformers does).
            #expect(Set(got.tensorNames).subtracting(["text_model.embeddings.position_ids"]) == Set(want.tensorNames), "\(component)")
            for name in want.tensorNames {
                #expect(identical(try got.tensor(name), try want.tensor(name)), "\(component): \(name)")
                compared += 1
            }
            #expect(try single.component(component).config == folder.component(component).config)
        }
        #expect(compared > 0)
        for name in ["scheduler", "tokenizer"] { #expect(try single.component(name).config == folder.component(name).config) }
        let tokenizer = try single.component("tokenizer").makeTokenizer()
        #expect(tokenizer("a photo of a cat") == (try folder.component("tokenizer").makeTokenizer())("a photo of a cat"))
        }
    }

    /// The tiny models' UNets match no built-in architecture: without a config folder the
    /// checkpoint is refused with a message that says what to do.
    @Test func tinyCheckpointNeedsItsConfigs() throws {
        let model = try #require(try ReferenceModel.withOriginalLayout().first)
        let folder = try ModelSource.open(model.folder)
        let dir = try TemporaryDirectory()
        let path = dir.join("tiny.safetensors")
        try SafeTensors.write(try originalLayoutTensors(folder, family: try family(of: folder)), to: path)
        let text = try #require(message { try ModelSource.open(path) })
        #expect(text.contains(path) && text.contains("input blocks") && text.contains("config folder"), "\(text)")
    }

    /// A checkpoint that lacks a module, or holds one its config does not know, is refused
    /// naming the tensor.
    @Test func checkpointThatDoesNotMatchItsConfig() throws {
        let model = try #require(try ReferenceModel.withOriginalLayout().first)
        let folder = try ModelSource.open(model.folder)
        let family = try family(of: folder)
        let tensors = try originalLayoutTensors(folder, family: family)
        let dir = try TemporaryDirectory()

        let missing = tensors.filter { !$0.0.hasPrefix("model.diffusion_model.out.2.") }
        try SafeTensors.write(missing, to: dir.join("missing.safetensors"))
        let text = try #require(message { try ModelSource.open(dir.join("missing.safetensors"), options: .init(config: model.folder)) })
        #expect(text.contains("model.diffusion_model.out.2.") && text.contains("conv_out."), "\(text)")

        let extra = tensors + [("model.diffusion_model.input_blocks.99.0.in_layers.0.weight", Tensor(shape: [2], floats: [1, 2]))]
        try SafeTensors.write(extra, to: dir.join("extra.safetensors"))
        let text2 = try #require(message { try ModelSource.open(dir.join("extra.safetensors"), options: .init(config: model.folder)) })
        #expect(text2.contains("input_blocks.99.0.in_layers.0.weight") && text2.contains("no place"), "\(text2)")
    }

    /// The real architectures: from each built-in config the models declare their parameters;
    /// a checkpoint with those names and shapes in the original layout (shapes only, no data)
    /// is detected as the right architecture, and each component's view has exactly the
    /// parameters the model declares.
    @Test(arguments: EmbeddedArchitecture.all.filter { $0.modelIndex != nil })
    func realArchitectureLayouts(architecture: EmbeddedArchitecture) throws {
        let builtIn = try ModelSource.builtIn(architecture)
        let family = try #require(StableDiffusionFamily.allCases.first { $0.architectures.contains(architecture) })
        var entries: [(String, DType, [Int])] = []
        var models: [String: any ModelComponent] = [:]
        for (component, prefix) in family.prefixes {
            let c = try builtIn.component(component)
            let config = try c.requireConfig()
            let model = try Self.model(c.className, config: config)
            models[component] = model
            let mapping = try SingleFileCheckpoint.keyMapping(component: component, className: c.className, config: config, family: family)
            var seen = Set<String>()
            for (name, shape) in model.parameters {
                let (source, transform) = try #require(mapping.source(forTarget: name), "\(architecture): no checkpoint name for \(component).\(name)")
                guard seen.insert(source).inserted else { continue }
                let stored: [Int]
                switch transform {
                case .identity: stored = shape
                case .convToLinear: stored = shape + [1, 1]
                case .transpose: stored = [shape[1], shape[0]]
                case .chunk(_, let n): stored = [shape[0] * n] + shape.dropFirst()
                }
                entries.append((prefix + source, .float16, stored))
            }
        }
        let file = ShapeOnlySource(entries, origin: "\(architecture.name) (shapes only)")
        #expect(SafeTensorsLayout.detect(file) == .stableDiffusion(family))

        // The keys pick the architecture, except what the weights cannot tell: Turbo, and SD 2's
        // prediction type (diffusers' default is 2.1, v-prediction).
        var options = ModelSourceOptions()
        if architecture == .sdxlTurbo { options.architecture = .sdxlTurbo }
        if architecture == .sd21Base { options.predictionType = "epsilon" }
        let single = try SingleFileCheckpoint.open(file: file, origin: file.origin, options: options)
        #expect(single.kind == .singleFile(layout: .stableDiffusion(family), configs: "embedded \(architecture.name)"))
        for (component, _) in family.prefixes {
            let c = try single.component(component)
            #expect(c.config == builtIn[component]?.config)
            let weights = try #require(c.weights)
            let unused = try models[component]!.checkWeights(weights)
            #expect(unused.isEmpty, "\(architecture) \(component): unused \(unused.prefix(5))")
            #expect(weights.tensorNames.count == models[component]!.parameters.count)
        }
        let scheduler = try single.component("scheduler").requireConfig().json()
        #expect(scheduler == (try builtIn.component("scheduler").requireConfig().json()))
    }

    static func model(_ className: String, config: ConfigFile) throws -> any ModelComponent {
        switch className {
        case "UNet2DConditionModel":
            return try UNet2DConditionModel(config: decodeConfiguration(UNet2DConditionModel.Configuration.self, from: config.bytes, origin: config.origin))
        case "AutoencoderKL":
            return try AutoencoderKL(config: decodeConfiguration(AutoencoderKL.Configuration.self, from: config.bytes, origin: config.origin))
        case "CLIPTextModel":
            return try CLIPTextModel(config: decodeConfiguration(CLIPTextConfig.self, from: config.bytes, origin: config.origin))
        case "CLIPTextModelWithProjection":
            return try CLIPTextModelWithProjection(config: decodeConfiguration(CLIPTextConfig.self, from: config.bytes, origin: config.origin))
        default:
            throw ModelSourceError.unsupported(location: config.origin, detail: className)
        }
    }

    /// SD 2 single files follow diffusers: 2.1's configs (v-prediction, 768 px) unless the
    /// prediction type says epsilon; an option overrides the scheduler's prediction type, and
    /// SDXL fine-tunes with a `v_pred` marker get v-prediction.
    /// A checkpoint of a built-in architecture as shapes alone (fp16, the original layout);
    /// `inputChannels` widens the UNet's first convolution (9: an inpainting checkpoint).
    static func shapes(_ architecture: EmbeddedArchitecture, extra: [(String, DType, [Int])] = [],
                       inputChannels: Int? = nil) throws -> ShapeOnlySource {
        let builtIn = try ModelSource.builtIn(architecture)
        let family = StableDiffusionFamily.allCases.first { $0.architectures.contains(architecture) }!
        var entries: [(String, DType, [Int])] = extra
        for (component, prefix) in family.prefixes {
            let c = try builtIn.component(component)
            let model = try Self.model(c.className, config: try c.requireConfig())
            let mapping = try SingleFileCheckpoint.keyMapping(component: component, className: c.className, config: try c.requireConfig(), family: family)
            var seen = Set<String>()
            for (name, declared) in model.parameters {
                let (source, transform) = mapping.source(forTarget: name)!
                guard seen.insert(source).inserted else { continue }
                var shape = declared
                if let inputChannels, component == "unet", name == "conv_in.weight" { shape[1] = inputChannels }
                switch transform {
                case .identity: entries.append((prefix + source, .float16, shape))
                case .convToLinear: entries.append((prefix + source, .float16, shape + [1, 1]))
                case .transpose: entries.append((prefix + source, .float16, [shape[1], shape[0]]))
                case .chunk(_, let n): entries.append((prefix + source, .float16, [shape[0] * n] + shape.dropFirst()))
                }
            }
        }
        return ShapeOnlySource(entries, origin: architecture.name)
    }

    @Test func predictionType() throws {
        let shapes = { (a: EmbeddedArchitecture, extra: [(String, DType, [Int])]) in try Self.shapes(a, extra: extra) }
        func prediction(_ source: ModelSource) throws -> String? {
            try source.component("scheduler").requireConfig().json()["prediction_type"]?.string
        }
        let sd2 = try shapes(.sd21, [])
        let v = try SingleFileCheckpoint.open(file: sd2, origin: "sd2")
        #expect(v.kind == .singleFile(layout: .stableDiffusion(.sd2), configs: "embedded sd21"))
        #expect(try prediction(v) == "v_prediction")
        #expect(v.notes.contains { $0.contains("epsilon") })
        let eps = try SingleFileCheckpoint.open(file: sd2, origin: "sd2", options: .init(predictionType: "epsilon"))
        #expect(eps.kind == .singleFile(layout: .stableDiffusion(.sd2), configs: "embedded sd21-base"))
        #expect(try prediction(eps) == "epsilon")

        let sd1 = try SingleFileCheckpoint.open(file: try shapes(.sd15, []), origin: "sd1", options: .init(predictionType: "v_prediction"))
        #expect(try prediction(sd1) == "v_prediction")
        #expect(try sd1.component("scheduler").requireConfig().origin.contains("prediction_type v_prediction"))

        let xl = try SingleFileCheckpoint.open(file: try shapes(.sdxlBase, [("v_pred", .float32, [])]), origin: "xl")
        #expect(try prediction(xl) == "v_prediction")
        #expect(message { try SingleFileCheckpoint.open(file: try shapes(.sd15, []), origin: "sd1", options: .init(predictionType: "x0")) }?
            .contains("'x0'") == true)
        // An architecture of another family is refused, naming both.
        let text = try #require(message { try SingleFileCheckpoint.open(file: try shapes(.sd15, []), origin: "sd1", options: .init(architecture: .sdxlBase)) })
        #expect(text.contains("sd1 is a Stable Diffusion 1.x") && text.contains("Stable Diffusion XL 1.0 base"), "\(text)")
    }

    /// Playground v2.5 (SDXL with `edm_mean`/`edm_std` beside the weights) gets what diffusers'
    /// `from_single_file` gives it: the VAE's latents statistics and scaling factor 0.5, and
    /// EDMDPMSolverMultistepScheduler. Half the statistics, or a zero deviation, is refused.
    @Test func playgroundCheckpoints() throws {
        let (mean, std): ([Float], [Float]) = ([0.5, -0.25, 0.125, -0.5], [1.25, 0.75, 1.5, 1])
        func checkpoint(_ stats: [(String, Tensor)]) throws -> TensorSource {
            PrefixedTensorSources([("", InMemoryTensors(stats)), ("", try Self.shapes(.sdxlBase))])
        }
        let file = try checkpoint([("edm_mean", Tensor(shape: [1, 4, 1, 1], floats: mean)), ("edm_std", Tensor(shape: [1, 4, 1, 1], floats: std))])
        let source = try SingleFileCheckpoint.open(file: file, origin: "playground")
        let vae = try source.component("vae").requireConfig().json()
        #expect(vae["latents_mean"]?.array?.compactMap(\.double).map(Float.init) == mean)
        #expect(vae["latents_std"]?.array?.compactMap(\.double).map(Float.init) == std)
        #expect(vae["scaling_factor"]?.double == 0.5)
        let scheduler = try source.component("scheduler")
        #expect(scheduler.className == "EDMDPMSolverMultistepScheduler")
        let config = try SchedulerConfig(json: try scheduler.requireConfig().json(), origin: "scheduler")
        #expect(try Schedulers.make(config: config).className == "EDMDPMSolverMultistepScheduler")
        #expect(source.notes.contains { $0.contains("Playground v2.5") })
        // Plain SDXL keeps its own.
        #expect(try SingleFileCheckpoint.open(file: try Self.shapes(.sdxlBase), origin: "xl").component("vae").requireConfig().json()["latents_mean"] == nil)
        let half = message { try SingleFileCheckpoint.open(file: try checkpoint([("edm_mean", Tensor(shape: [4], floats: mean))]), origin: "p") }
        #expect(half?.contains("edm_mean without edm_std") == true, "\(half ?? "")")
        let flat = message {
            try SingleFileCheckpoint.open(file: try checkpoint([("edm_mean", Tensor(shape: [4], floats: mean)), ("edm_std", Tensor(shape: [4], floats: [1, 0, 1, 1]))]),
                                          origin: "p")
        }
        #expect(flat?.contains("positive deviation") == true, "\(flat ?? "")")
    }

    /// CosXL (SDXL with `edm_vpred.sigma_min`/`sigma_max`, as ComfyUI saves EDM v-prediction
    /// models) gets the EDMEulerScheduler diffusers' docs set for it, with the file's range; the
    /// `v_pred` marker beside them changes nothing. A range without its top is refused.
    @Test func cosXLCheckpoints() throws {
        func checkpoint(_ extra: [(String, Tensor)]) throws -> TensorSource {
            PrefixedTensorSources([("", InMemoryTensors(extra)), ("", try Self.shapes(.sdxlBase))])
        }
        let range = [("edm_vpred.sigma_min", Tensor(shape: [], floats: [0.002])), ("edm_vpred.sigma_max", Tensor(shape: [], floats: [120])),
                     ("v_pred", Tensor(shape: [], floats: [0]))]
        let source = try SingleFileCheckpoint.open(file: try checkpoint(range), origin: "cosxl")
        let scheduler = try source.component("scheduler")
        #expect(scheduler.className == "EDMEulerScheduler")
        let config = try SchedulerConfig(json: try scheduler.requireConfig().json(), origin: "scheduler")
        #expect(config["prediction_type"]?.string == "v_prediction" && config["sigma_data"]?.double == 1
                && config["sigma_schedule"]?.string == "exponential")
        #expect(abs((config["sigma_max"]?.double ?? 0) - 120) < 1e-9 && abs((config["sigma_min"]?.double ?? 0) - 0.002) < 1e-6)
        let edm = try Schedulers.make(config: config)
        #expect(edm.className == "EDMEulerScheduler" && abs(edm.initNoiseSigma - (120 * 120 + 1).squareRoot()) < 1e-9)
        #expect(source.notes.contains { $0.contains("CosXL") })
        let half = message { try SingleFileCheckpoint.open(file: try checkpoint([range[0]]), origin: "c") }
        #expect(half?.contains("edm_vpred.sigma_min without edm_vpred.sigma_max") == true, "\(half ?? "")")
    }

    /// Inpainting checkpoints (a 9-channel conv_in) get the built-in configs with in_channels 9,
    /// SD 2's the 512-px epsilon ones (stable-diffusion-2-inpainting), as diffusers' single-file
    /// loading configures them; InstructPix2Pix's (8) in_channels 8; depth to image's (5) SD 2's
    /// 512-px epsilon configs with in_channels 5; other counts are refused.
    @Test func inpaintingCheckpoints() throws {
        func unetInChannels(_ source: ModelSource) throws -> Int? {
            try source.component("unet").requireConfig().json()["in_channels"]?.int
        }
        for architecture in [EmbeddedArchitecture.sd15, .sdxlBase] {
            let file = try Self.shapes(architecture, inputChannels: 9)
            let source = try SingleFileCheckpoint.open(file: file, origin: "inpainting")
            #expect(try unetInChannels(source) == 9)
            #expect(source.notes.contains { $0.contains("inpainting") })
            let unet = try source.component("unet")
            let model = try Self.model(unet.className, config: try unet.requireConfig())
            #expect(try model.checkWeights(try #require(unet.weights)).isEmpty)
        }
        let sd2 = try SingleFileCheckpoint.open(file: try Self.shapes(.sd21, inputChannels: 9), origin: "sd2 inpainting")
        #expect(sd2.kind == .singleFile(layout: .stableDiffusion(.sd2), configs: "embedded sd21-base"))
        #expect(try sd2.component("scheduler").requireConfig().json()["prediction_type"]?.string == "epsilon")
        #expect(try unetInChannels(sd2) == 9)
        let pix2pix = try SingleFileCheckpoint.open(file: try Self.shapes(.sd15, inputChannels: 8), origin: "ip2p")
        #expect(try unetInChannels(pix2pix) == 8)
        #expect(pix2pix.notes.contains { $0.contains("InstructPix2Pix") })
        let depth = try SingleFileCheckpoint.open(file: try Self.shapes(.sd21, inputChannels: 5), origin: "depth")
        #expect(depth.kind == .singleFile(layout: .stableDiffusion(.sd2), configs: "embedded sd21-base"))
        #expect(try unetInChannels(depth) == 5)
        #expect(depth.notes.contains { $0.contains("depth-to-image") })
        let odd = message { try SingleFileCheckpoint.open(file: try Self.shapes(.sd15, inputChannels: 6), origin: "odd") } ?? ""
        #expect(odd.contains("6 input channels"), "\(odd)")
    }

    /// SD 2's and SDXL's OpenCLIP q/k/v come out of one fused tensor as views of its rows, and
    /// the projection transposed; the VAE's 1x1-conv attention weights come out as matrices.
    @Test func transformsOfTheOriginalLayout() throws {
        let models = try ReferenceModel.withOriginalLayout()
        let model = try #require(models.first { (try? ModelSource.open($0.folder).pipelineClass.contains("XL")) == true })
        let folder = try ModelSource.open(model.folder)
        let dir = try TemporaryDirectory()
        let path = dir.join("xl.safetensors")
        try SafeTensors.write(try originalLayoutTensors(folder, family: .sdxl), to: path)
        let single = try ModelSource.open(path, options: .init(config: model.folder))
        let te2 = try #require(single.component("text_encoder_2").weights as? MappedTensorSource)
        let q = try #require(te2.entries["text_model.encoder.layers.0.self_attn.q_proj.weight"])
        let v = try #require(te2.entries["text_model.encoder.layers.0.self_attn.v_proj.weight"])
        #expect(q.source == "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" && v.source == q.source)
        let width = try #require(te2.info("text_model.final_layer_norm.weight")?.shape[0])
        #expect(q.transform == .rows(0..<width) && v.transform == .rows(2 * width..<3 * width))
        #expect(te2.entries["text_projection.weight"]?.transform == .transpose)
        let vae = try #require(single.component("vae").weights as? MappedTensorSource)
        let vaeConfig = try Files.readJSON(Files.join(model.folder, "vae", "config.json"))
        if vaeConfig["mid_block_add_attention"]?.bool ?? true {
            let toQ = try #require(vae.entries["decoder.mid_block.attentions.0.to_q.weight"])
            #expect(toQ.source == "first_stage_model.decoder.mid.attn_1.q.weight")
            guard case .reshape(let shape) = toQ.transform else { Issue.record("\(toQ.transform)"); return }
            #expect(shape.count == 2)
        } else {
            #expect(!vae.entries.keys.contains { $0.contains("attentions") })
        }
        // Views share the file's memory: the q rows start where the fused tensor starts.
        let fused = try te2.base.tensor("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight")
        #expect(try te2.tensor("text_model.encoder.layers.0.self_attn.q_proj.weight").raw == fused.raw)
        #expect(try te2.tensor("text_model.encoder.layers.0.self_attn.k_proj.weight").raw == fused.raw + width * width * fused.dtype.size)
    }

    /// What each kind of file is taken for, and the refusals that name it.
    @Test func layoutsAndRefusals() throws {
        let dir = try TemporaryDirectory()
        let model = try #require(try ReferenceModel.all().first)
        let folder = try ModelSource.open(model.folder)
        let unet = try #require(folder.component("unet").weights)

        let unetFile = dir.join("unet.safetensors")
        try SafeTensors.write(try unet.tensorNames.map { ($0, try unet.tensor($0)) }, to: unetFile)
        #expect(SafeTensorsLayout.detect(try SafeTensorsFile(path: unetFile)) == .diffusersUNet)
        #expect(message { try ModelSource.open(unetFile) }?.contains("pipeline folder") == true)

        let refiner = dir.join("refiner.safetensors")
        try SafeTensors.write([("model.diffusion_model.out.2.bias", Tensor(shape: [1], floats: [0])),
                               ("conditioner.embedders.0.model.text_projection", Tensor(shape: [1, 1], floats: [0]))], to: refiner)
        #expect(message { try ModelSource.open(refiner) }?.contains("refiner") == true)

        let other = dir.join("other.safetensors")
        try SafeTensors.write([("lora_unet_down.weight", Tensor(shape: [1], floats: [0]))], to: other)
        #expect(message { try ModelSource.open(other) }?.contains("not a Stable Diffusion checkpoint") == true)

        // A .ckpt from before torch 1.6 (a bare pickle stream) is refused by name.
        let pickle = dir.join("model.ckpt")
        try Files.write([0x80, 0x02], to: pickle)
        #expect(message { try ModelSource.open(pickle) }?.contains("before torch 1.6") == true)

        let truncated = dir.join("truncated.safetensors")
        try Files.write(Array(try Files.read(unetFile).prefix(100)), to: truncated)
        #expect(message { try ModelSource.open(truncated) }?.contains(truncated) == true)
        #expect(message { try ModelDescription.describe(truncated) }?.contains(truncated) == true)
    }

    @Test func inspectSingleFile() throws {
        let model = try #require(try ReferenceModel.withOriginalLayout().first)
        let folder = try ModelSource.open(model.folder)
        let family = try family(of: folder)
        let dir = try TemporaryDirectory()
        let path = dir.join("model.safetensors")
        let tensors = try originalLayoutTensors(folder, family: family)
        try SafeTensors.write(tensors, to: path)

        // Without its configs the file still lists its tensors and layout, and says why it does not open.
        let alone = try ModelDescription.describe(path)
        #expect(alone.layout == .stableDiffusion(family))
        #expect(alone.tensors.map(\.name) == tensors.map(\.0))
        #expect(alone.tensors.map(\.shape) == tensors.map(\.1.shape))
        #expect(alone.components.isEmpty && alone.notes.contains { $0.contains("cannot be opened") })

        let described = try ModelDescription.describe(path, options: .init(config: model.folder))
        for (component, _) in family.prefixes {
            let c = try #require(described.components.first { $0.name == component })
            let weights = try #require(folder.component(component).weights)
            #expect(c.parameterCount == weights.tensorNames.reduce(0) { $0 + weights.info($1)!.shape.reduce(1, *) })
        }
        #expect(described.description.contains(tensors[0].0))
    }
}

extension String {
    func replacingOccurrences(of target: String, with replacement: String) -> String {
        var out = "", rest = self[...]
        while let r = rest.firstRange(of: target) {
            out += rest[..<r.lowerBound] + replacement
            rest = rest[r.upperBound...]
        }
        return out + rest
    }
}
