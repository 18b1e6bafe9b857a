import DiffuseCore
import DiffuseCPU
import DiffuseGraph
import DiffuseModels
import DiffuseSchedulers
@testable import DiffusePipelines
import Testing

/// The x4 upscaler: diffusers' outputs where the fixture set has the goldens
/// (`golden/<variant>/upscale/`, made by scripts/fixtures/make_upscale_reference.py), and for
/// every SD 1.x/2.x fixture model what holds by construction: an upscaler whose picture channels
/// and class embedding have zero weights is the text-to-image pipeline at the picture's size (the
/// picture's noise is drawn first and then not seen), the noise level and the picture matter once
/// they have weights, and what diffusers' pipeline takes no argument for is refused by name.
@Suite struct UpscalerTests {
    /// The fixture models an upscaler can be made from: one text encoder, no guidance embedding.
    static let models = ((try? ReferenceModel.all()) ?? []).filter { model in
        (try? StableDiffusionComponents.load(model.folder)).map { !$0.isXL && $0.unet.config.timeCondProjDim == nil } ?? false
    }

    @Test func diffusersGoldens() throws {
        try expectOptionalGoldens(ReferenceCheck.checkUpscale, models: Self.models, label: "x4 upscaler",
                                  script: "make_upscale_reference.py")
    }

    /// The real upscaler's low-resolution scheduler.
    static let lowResScheduler = #"{"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "scaled_linear"}"#

    /// `base` made an upscaler: conv_in widened for the picture (its weights times
    /// `pictureWeight`), a noise-level class embedding of 1000 rows (a smooth pattern times
    /// `classWeight`), and the low-resolution scheduler.
    static func upscaler(_ base: StableDiffusionComponents, pictureWeight: Float, classWeight: Float) throws -> StableDiffusionComponents {
        var c = try widenedConvIn(base, inChannels: base.vae.model.latentChannels + 3, extraWeight: pictureWeight)
        var config = c.unet.config
        config.numClassEmbeds = 1000
        c.unet = try UNet2DConditionModel(config: config)
        let dim = config.timeEmbedDim
        let table = Tensor(zeros: [1000, dim])
        for i in 0..<table.count { table.floats[i] = classWeight * (Float((i * 37) % 101) / 101 - 0.5) }
        let source = c.unetWeights.source
        c.unetWeights = ModelWeights(InMemoryTensors(try source.tensorNames.map { ($0, try source.tensor($0)) } + [("class_embedding.weight", table)]))
        c.lowResSchedulerConfig = try SchedulerConfig(json: try JSON.parse(Self.lowResScheduler))
        return c
    }

    /// A small picture whose sides are no multiples of 8.
    static let picture: Image = {
        let (w, h) = (19, 13)
        var pixels: [UInt8] = []
        for y in 0..<h { for x in 0..<w { pixels += [UInt8(x * 13), UInt8(y * 19), UInt8((x * y * 7) % 256)] } }
        return Image(width: w, height: h, channels: 3, pixels: pixels)
    }()

    @Test(arguments: models) func blindToThePictureIsTextToImage(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        let up = try cpuPipeline(try Self.upscaler(base, pictureWeight: 0, classWeight: 0))
        let f = base.vae.model.spatialScaleFactor
        let (w, h) = (Self.picture.width / f * f, Self.picture.height / f * f)
        let latents = TorchCPUGenerator(seed: 9).randn([2, base.vae.model.latentChannels, h, w])
        for guidance in [6.0, 1.0] {
            var r = GenerationRequest(prompt: "a sharp photo")
            (r.steps, r.count, r.scheduler, r.guidanceScale, r.latents, r.decode) = (3, 2, "ddim", guidance, latents, false)
            r.negativePrompt = "blurry"
            var text = r
            (text.width, text.height) = (w * f, h * f)
            r.initImage = Self.picture
            r.noiseLevel = 70
            let expected = try cpuPipeline(base).generate(text).latents.toFloatArray()
            let got = try up.generate(r).latents.toFloatArray()
            let scale = expected.map(abs).max() ?? 1
            #expect(zip(got, expected).map { abs($0 - $1) }.max() ?? 0 <= 1e-5 * scale, "guidance \(guidance)")
        }
    }

    @Test(arguments: models) func theNoiseLevelAndThePictureMatter(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        let up = try cpuPipeline(try Self.upscaler(base, pictureWeight: 0.5, classWeight: 0.5))
        var r = GenerationRequest(prompt: "a sharp photo")
        (r.steps, r.seed, r.initImage) = (2, 4, Self.picture)
        let first = try up.generate(r)
        let f = base.vae.model.spatialScaleFactor
        // The output is the picture rounded down to the factor, times the factor.
        #expect(first.images.first?.width == Self.picture.width / f * f * f)
        #expect(first.images.first?.height == Self.picture.height / f * f * f)
        r.noiseLevel = 200
        #expect(try up.generate(r).latents.toFloatArray() != first.latents.toFloatArray())
        r.noiseLevel = nil
        r.initImage = Image(width: Self.picture.width, height: Self.picture.height, channels: 3, pixels: Self.picture.pixels.map { 255 - $0 })
        #expect(try up.generate(r).latents.toFloatArray() != first.latents.toFloatArray())
    }

    @Test(arguments: models) func whatThePipelineTakesNotIsRefusedByName(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        let up = try cpuPipeline(try Self.upscaler(base, pictureWeight: 0.5, classWeight: 0.5))
        func message(_ change: (inout GenerationRequest) -> Void, on p: StableDiffusionPipeline? = nil) -> String {
            var r = GenerationRequest(prompt: "a sharp photo")
            (r.steps, r.decode, r.initImage) = (1, false, Self.picture)
            change(&r)
            do { _ = try (p ?? up).generate(r); return "" } catch { return "\(error)" }
        }
        #expect(message { $0.initImage = nil }.contains("is an x4 upscaler"))
        #expect(message { $0.noiseLevel = 351 }.contains("noise level must be in [0, 350]"))
        #expect(message { $0.noiseLevel = -1 }.contains("noise level must be in [0, 350]"))
        #expect(message { $0.strength = 0.5 }.contains("StableDiffusionUpscalePipeline takes no strength"))
        #expect(message { $0.width = 64 }.contains("takes no size"))
        #expect(message { $0.maskImage = Self.picture }.contains("takes no mask"))
        #expect(message { $0.imageGuidanceScale = 2 }.contains("takes no image guidance scale"))
        #expect(message({ $0.noiseLevel = 20 }, on: try cpuPipeline(base)).contains("noise level is for the x4 upscaler"))
    }

    /// An upscale model folder whose UNet does not take the picture is refused when it loads.
    @Test func aFolderWithAPlainUNetIsRefused() throws {
        guard let model = Self.models.first else { return }
        let dir = try TemporaryDirectory()
        let out = dir.join("upscaler")
        try copyTree(model.folder, to: out)
        try Self.makeUpscalerIndex(out)
        #expect { _ = try StableDiffusionComponents.load(out) } throws: { error in
            "\(error)".contains("an upscaler's UNet takes") && "\(error)".contains("input channels")
        }
    }

    /// Names the folder's pipeline the upscaler and gives it the low-resolution scheduler.
    static func makeUpscalerIndex(_ folder: String) throws {
        let index = try Files.readJSON(Files.join(folder, "model_index.json"))
        let members = (index.members ?? []).filter { $0.0 != "_class_name" }
        let updated = JSON.object([("_class_name", .string("StableDiffusionUpscalePipeline"))] + members
                                  + [("low_res_scheduler", .array([.string("diffusers"), .string("DDPMScheduler")])), ("max_noise_level", .number(350))])
        try Files.write(Array(updated.serialized(pretty: true).utf8), to: Files.join(folder, "model_index.json"))
        try Files.createDirectory(Files.join(folder, "low_res_scheduler"))
        try Files.write(Array(Self.lowResScheduler.utf8), to: Files.join(folder, "low_res_scheduler", "scheduler_config.json"))
    }

    /// `folder` made an upscaler on disk, as `upscaler` makes it in memory (for the command line).
    static func writeModel(from folder: String, to out: String) throws {
        try copyTree(folder, to: out)
        try makeUpscalerIndex(out)
        let base = try StableDiffusionComponents.load(folder)
        let up = try upscaler(base, pictureWeight: 0.5, classWeight: 0.5)
        let unet = Files.join(out, "unet")
        let config = try Files.readJSON(Files.join(unet, "config.json"))
        let changed = JSON.object((config.members ?? []).filter { !["in_channels", "num_class_embeds"].contains($0.0) }
                                  + [("in_channels", .number(Double(up.unet.config.inChannels))), ("num_class_embeds", .number(1000))])
        try Files.write(Array(changed.serialized(pretty: true).utf8), to: Files.join(unet, "config.json"))
        let source = up.unetWeights.source
        try SafeTensors.write(try source.tensorNames.map { ($0, try source.tensor($0)) },
                              to: Files.join(unet, "diffusion_pytorch_model.safetensors"))
    }
}
