import DiffuseCore
import DiffuseCPU
import DiffuseGraph
import DiffuseModels
import DiffuseSchedulers
@testable import DiffusePipelines
import Testing

/// The latent x2 upscaler (diffusers' `StableDiffusionLatentUpscalePipeline`): diffusers' outputs
/// where the fixture set has the goldens (`golden/<variant>/latent_upscale/`, made by
/// scripts/fixtures/make_latent_upscale_reference.py; the K-UNet itself is checked against
/// diffusers in KUNetTests), and for every SD 1.x/2.x fixture model what holds by construction: a
/// K-UNet that outputs zeros leaves the Euler steps a closed form of the preconditioning, the
/// prompt means nothing at guidance scale 0, and what the pipeline takes no argument for is
/// refused by name.
@Suite struct LatentUpscalerTests {
    /// The fixture models an upscaler can be made from: one text encoder.
    static let models = ((try? ReferenceModel.all()) ?? []).filter { model in
        (try? StableDiffusionComponents.load(model.folder)).map { !$0.isXL } ?? false
    }

    @Test func diffusersGoldens() throws {
        try expectOptionalGoldens(ReferenceCheck.checkLatentUpscale, models: Self.models, label: "latent x2 upscaler",
                                  script: "make_latent_upscale_reference.py")
    }

    /// `base` with a three-block K-UNet made for its text encoder and VAE (seeded weights, the
    /// output convolution's times `outputWeight`) and the Euler scheduler predicting samples.
    static func upscaler(_ base: StableDiffusionComponents, outputWeight: Float) throws -> StableDiffusionComponents {
        var c = base
        let latent = base.vae.model.latentChannels, hidden = base.textEncoder!.encoder.hiddenSize
        var config = UNet2DConditionModel.Configuration()
        (config.inChannels, config.outChannels, config.actFn, config.normNumGroups) = (2 * latent, latent + 1, "gelu", nil)
        (config.blockOutChannels, config.layersPerBlock, config.attentionHeadDim) = ([32, 64, 64], .int(1), .int(16))
        config.downBlockTypes = ["KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"]
        config.upBlockTypes = ["KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"]
        (config.midBlockType, config.crossAttentionDim, config.timeCondProjDim) = (nil, .int(hidden), 128 + hidden)
        (config.timeEmbeddingType, config.timestepPostAct) = ("fourier", "gelu")
        c.unet = try UNet2DConditionModel(config: config)
        let random = c.unet.randomWeights(seed: 5)
        c.unetWeights = ModelWeights(InMemoryTensors(try random.tensorNames.map { name in
            let t = try random.tensor(name)
            if name.hasPrefix("conv_out.") { for i in 0..<t.count { t.floats[i] *= outputWeight } }
            return (name, t)
        }))
        var scheduler: [String: JSON] = ["_class_name": .string("EulerDiscreteScheduler"), "prediction_type": .string("sample")]
        for key in ["beta_start", "beta_end", "beta_schedule", "num_train_timesteps"] {
            if let v = base.schedulerConfig[key] { scheduler[key] = v }
        }
        c.schedulerConfig = try SchedulerConfig(scheduler)
        return c
    }

    /// `folder` made a latent upscaler on disk, as `upscaler` makes it in memory (for the command
    /// line): the pipeline class, the K-UNet's config and weights, the Euler scheduler.
    static func writeModel(from folder: String, to out: String) throws {
        try copyTree(folder, to: out)
        let base = try StableDiffusionComponents.load(folder)
        let up = try upscaler(base, outputWeight: 1)
        let index = try Files.readJSON(Files.join(out, "model_index.json"))
        let members = (index.members ?? []).filter { !["_class_name", "scheduler"].contains($0.0) }
        let updated = JSON.object([("_class_name", .string("StableDiffusionLatentUpscalePipeline")),
                                   ("scheduler", .array([.string("diffusers"), .string("EulerDiscreteScheduler")]))] + members)
        try Files.write(Array(updated.serialized(pretty: true).utf8), to: Files.join(out, "model_index.json"))
        let c = up.unet.config
        let config: JSON = .object([
            ("_class_name", .string("UNet2DConditionModel")), ("act_fn", .string("gelu")), ("attention_head_dim", .number(16)),
            ("block_out_channels", .array(c.blockOutChannels.map { .number(Double($0)) })), ("layers_per_block", .number(1)),
            ("cross_attention_dim", .number(Double(c.crossAttentionDims[0]))), ("in_channels", .number(Double(c.inChannels))),
            ("out_channels", .number(Double(c.outChannels))), ("mid_block_type", .null), ("norm_num_groups", .null),
            ("down_block_types", .array(c.downBlockTypes.map { .string($0) })), ("up_block_types", .array(c.upBlockTypes.map { .string($0) })),
            ("time_cond_proj_dim", .number(Double(c.timeCondProjDim!))), ("time_embedding_type", .string("fourier")),
            ("timestep_post_act", .string("gelu")), ("resnet_time_scale_shift", .string("scale_shift")),
        ])
        try Files.write(Array(config.serialized(pretty: true).utf8), to: Files.join(out, "unet", "config.json"))
        let source = up.unetWeights.source
        try SafeTensors.write(try source.tensorNames.map { ($0, try source.tensor($0)) },
                              to: Files.join(out, "unet", "diffusion_pytorch_model.safetensors"))
        var scheduler: [(String, JSON)] = [("_class_name", .string("EulerDiscreteScheduler")), ("prediction_type", .string("sample"))]
        for key in ["beta_start", "beta_end", "beta_schedule", "num_train_timesteps"] {
            if let v = base.schedulerConfig[key] { scheduler.append((key, v)) }
        }
        try Files.write(Array(JSON.object(scheduler).serialized(pretty: true).utf8), to: Files.join(out, "scheduler", "scheduler_config.json"))
    }

    /// With the UNet's output zero the denoised sample is x/(σ²+1), and an Euler step multiplies
    /// the latents by 1 + (σ' − σ)·σ/(σ²+1): the result is the initial noise (the generator's
    /// draw after the picture's VAE sample, or its first with latents given) times the product.
    @Test(arguments: models) func aSilentUNetLeavesTheClosedForm(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        let up = try cpuPipeline(try Self.upscaler(base, outputWeight: 0))
        let f = base.vae.model.spatialScaleFactor, latent = base.vae.model.latentChannels
        let picture = rampPicture(width: 4 * f + 3, height: 6 * f + 1)
        for (guidance, count, usePicture) in [(7.0, 2, true), (1.0, 1, false), (0.0, 2, false)] {
            var r = GenerationRequest(prompt: "a sharp photo")
            (r.steps, r.seed, r.count, r.guidanceScale, r.decode) = (3, 11, count, guidance, false)
            let (h, w) = (6, 4)
            let generator = TorchCPUGenerator(seed: 11)
            if usePicture {
                r.initImage = picture
                _ = generator.randn([count, latent, h, w])   // the VAE's sample
            } else {
                r.imageLatents = TorchCPUGenerator(seed: 3).randn([count, latent, h, w])
            }
            let noise = generator.randn([count, latent, 2 * h, 2 * w]).toFloatArray()
            let scheduler = try Schedulers.make(config: up.components.schedulerConfig)
            try scheduler.setTimesteps(3)
            let sigmas = (scheduler as! EulerDiscreteScheduler).sigmas.map { Float($0) }
            var factor = Float(scheduler.initNoiseSigma)
            for i in 0..<3 { factor *= 1 + (sigmas[i + 1] - sigmas[i]) * (sigmas[i] / (sigmas[i] * sigmas[i] + 1)) }
            let got = try up.generate(r).latents
            #expect(got.shape == [count, latent, 2 * h, 2 * w])
            let expected = noise.map { $0 * factor }
            let scale = expected.map(abs).max() ?? 1
            let error = zip(got.toFloatArray(), expected).map { abs($0 - $1) }.max() ?? 0
            #expect(error <= 1e-5 * scale, "guidance \(guidance), count \(count), picture \(usePicture): \(error)")
        }
    }

    /// diffusers replaces the prompt by "" at guidance scale 0; the picture still matters.
    @Test(arguments: models) func guidanceZeroIgnoresThePrompt(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        let up = try cpuPipeline(try Self.upscaler(base, outputWeight: 1))
        let f = base.vae.model.spatialScaleFactor
        var r = GenerationRequest(prompt: "a sharp photo")
        (r.steps, r.seed, r.guidanceScale, r.decode, r.initImage) = (2, 4, 0, false, rampPicture(width: 4 * f, height: 4 * f))
        let first = try up.generate(r).latents.toFloatArray()
        r.prompt = "an entirely different prompt"
        #expect(try up.generate(r).latents.toFloatArray() == first)
        r.guidanceScale = 0.5
        #expect(try up.generate(r).latents.toFloatArray() != first)
        r.guidanceScale = 0
        r.initImage = { let p = rampPicture(width: 4 * f, height: 4 * f); return Image(width: p.width, height: p.height, channels: 3, pixels: p.pixels.map { 255 - $0 }) }()
        #expect(try up.generate(r).latents.toFloatArray() != first)
    }

    @Test(arguments: models) func whatThePipelineTakesNotIsRefusedByName(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        let up = try cpuPipeline(try Self.upscaler(base, outputWeight: 1))
        let f = base.vae.model.spatialScaleFactor, latent = base.vae.model.latentChannels
        func message(_ change: (inout GenerationRequest) -> Void) -> String {
            var r = GenerationRequest(prompt: "a sharp photo")
            (r.steps, r.decode, r.initImage) = (1, false, rampPicture(width: 4 * f, height: 4 * f))
            change(&r)
            do { _ = try up.generate(r); return "" } catch { return "\(error)" }
        }
        #expect(message { _ in } == "")
        #expect(message { $0.initImage = nil }.contains("is a latent x2 upscaler"))
        #expect(message { $0.imageLatents = Tensor(zeros: [1, latent, 4, 4]) }.contains("not both"))
        #expect(message { $0.strength = 0.5 }.contains("StableDiffusionLatentUpscalePipeline takes no strength"))
        #expect(message { $0.width = 64 }.contains("takes no size"))
        #expect(message { $0.noiseLevel = 20 }.contains("takes no noise level"))
        #expect(message { $0.scheduler = "ddim" }.contains("--scheduler ddim"))
        #expect(message { $0.scheduler = "euler" } == "")
        #expect(message { ($0.initImage, $0.imageLatents) = (nil, Tensor(zeros: [2, latent, 4, 4])) }.contains("one row per image"))
        // Latents the K-UNet cannot halve down to 2x2 (3 blocks: multiples of 2, at least 4).
        #expect(message { ($0.initImage, $0.imageLatents) = (nil, Tensor(zeros: [1, latent, 5, 4])) }.contains("multiples of 2"))
        #expect(message { ($0.initImage, $0.imageLatents) = (nil, Tensor(zeros: [1, latent, 2, 4])) }.contains("at least 4"))
    }
}
