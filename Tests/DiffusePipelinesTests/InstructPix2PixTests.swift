import DiffuseCore
import DiffuseCPU
import DiffuseModels
import DiffuseSchedulers
@testable import DiffusePipelines
import Testing

/// InstructPix2Pix: diffusers' outputs where the fixture set has the goldens
/// (`golden/<variant>/instruct_pix2pix/`, made by
/// scripts/fixtures/make_instruct_pix2pix_reference.py), and for every fixture model what holds
/// by construction: a UNet whose picture inputs have zero weights is the plain text-to-image
/// pipeline (the image-guided pass is then the unconditional one), the picture matters once they
/// have weights, and what diffusers' InstructPix2Pix pipelines take no argument for is refused by
/// name.
@Suite struct InstructPix2PixTests {
    /// The fixture models an InstructPix2Pix UNet can be made from (not a guidance-distilled one,
    /// whose embedding these pipelines never pass).
    static let models = ((try? ReferenceModel.all()) ?? []).filter { model in
        (try? StableDiffusionComponents.load(model.folder))?.unet.config.timeCondProjDim == nil
    }

    @Test func diffusersGoldens() throws {
        try expectOptionalGoldens(ReferenceCheck.checkInstructPix2Pix, models: Self.models, label: "InstructPix2Pix",
                                  script: "make_instruct_pix2pix_reference.py")
    }

    /// A picture whose size is no multiple of 8, so that SD rounds it down.
    static let picture = rampPicture(width: 70, height: 45)

    /// The size the output takes: SD's the picture's rounded down, SDXL's the model's.
    static func outputSize(_ c: StableDiffusionComponents) -> (width: Int, height: Int) {
        let f = c.vae.model.spatialScaleFactor
        return c.isXL ? c.defaultImageSize : (picture.width / f * f, picture.height / f * f)
    }

    /// A picture-less pass equals the picture pass when the picture has no weight, so image
    /// guidance adds nothing and the three passes are classifier-free guidance; without guidance
    /// the one pass is the prompt's.
    @Test(arguments: models) func ignoringThePictureIsThePlainPipeline(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        let edit = try widenedConvIn(base, inChannels: 2 * base.vae.model.latentChannels, extraWeight: 0)
        #expect(edit.isInstructPix2Pix && !base.isInstructPix2Pix)
        let (plain, editing) = (try cpuPipeline(base), try cpuPipeline(edit))
        for (guidance, imageGuidance, scheduler) in [(5.0, 1.5, "euler-a"), (6.0, 0.5, "ddim"), (1.0, 2.0, "dpm++2m")] {
            var r = GenerationRequest(prompt: "make it snow")
            (r.steps, r.seed, r.count, r.decode, r.scheduler, r.guidanceScale) = (3, 5, 2, false, scheduler, guidance)
            r.negativePrompt = "blurry"
            var text = r
            (text.width, text.height) = Self.outputSize(base)
            // Image guidance below 1 switches all guidance off, as diffusers' does.
            if imageGuidance < 1 { text.guidanceScale = 1 }
            r.initImage = Self.picture
            r.imageGuidanceScale = imageGuidance
            let expected = try plain.generate(text).latents.toFloatArray()
            let got = try editing.generate(r).latents.toFloatArray()
            let scale = expected.map(abs).max() ?? 1
            #expect(zip(got, expected).map { abs($0 - $1) }.max() ?? 0 <= 1e-5 * scale, "guidance \(guidance), image \(imageGuidance)")
        }
    }

    /// CosXL Edit (`is_cosxl_edit`) scales the picture's latents by the VAE's scaling factor,
    /// which is the same as scaling the UNet's picture weights by it; a model with an EDM
    /// v-prediction scheduler has the shape that sets it.
    @Test(arguments: models) func cosXLEditScalesThePicture(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        guard base.isXL else { return }
        let s = Float(base.vae.model.scalingFactor)
        var cosxl = try widenedConvIn(base, inChannels: 2 * base.vae.model.latentChannels, extraWeight: 0.5)
        var scaled = try widenedConvIn(base, inChannels: 2 * base.vae.model.latentChannels, extraWeight: 0.5 * s)
        let edm = try SchedulerConfig(["_class_name": .string("EDMEulerScheduler"), "prediction_type": .string("v_prediction"),
                                       "sigma_data": .number(1), "sigma_max": .number(120), "sigma_schedule": .string("exponential")])
        (cosxl.schedulerConfig, scaled.schedulerConfig) = (edm, edm)
        #expect(cosxl.hasCosXLEditShape && !base.hasCosXLEditShape)
        cosxl.isCosXLEdit = true
        var r = GenerationRequest(prompt: "make it snow")
        (r.steps, r.seed, r.decode, r.initImage, r.imageGuidanceScale) = (3, 7, false, Self.picture, 1.8)
        let expected = try cpuPipeline(scaled).generate(r).latents.toFloatArray()
        let got = try cpuPipeline(cosxl).generate(r).latents.toFloatArray()
        let scale = expected.map(abs).max() ?? 1
        #expect(zip(got, expected).map { abs($0 - $1) }.max() ?? 0 <= 1e-5 * scale)
        cosxl.isCosXLEdit = false
        #expect(try cpuPipeline(cosxl).generate(r).latents.toFloatArray() != got)
    }

    /// With weights on the picture's channels, another picture or image guidance gives another edit.
    @Test(arguments: models) func thePictureAndItsGuidanceMatter(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        let pipeline = try cpuPipeline(try widenedConvIn(base, inChannels: 2 * base.vae.model.latentChannels, extraWeight: 0.5))
        var r = GenerationRequest(prompt: "make it snow")
        (r.steps, r.seed, r.decode, r.initImage) = (2, 7, false, Self.picture)
        let first = try pipeline.generate(r).latents
        #expect(first.shape[2] * base.vae.model.spatialScaleFactor == Self.outputSize(base).height)
        #expect(first.shape[3] * base.vae.model.spatialScaleFactor == Self.outputSize(base).width)
        r.imageGuidanceScale = 2.5
        #expect(try pipeline.generate(r).latents.toFloatArray() != first.toFloatArray())
        r.imageGuidanceScale = nil
        r.initImage = Image(width: Self.picture.width, height: Self.picture.height, channels: 3,
                            pixels: Self.picture.pixels.map { 255 - $0 })
        #expect(try pipeline.generate(r).latents.toFloatArray() != first.toFloatArray())
    }

    @Test(arguments: models) func whatThePipelinesTakeNotIsRefusedByName(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        let pipeline = try cpuPipeline(try widenedConvIn(base, inChannels: 2 * base.vae.model.latentChannels, extraWeight: 0.5))
        func message(_ change: (inout GenerationRequest) -> Void, on p: StableDiffusionPipeline? = nil) -> String {
            var r = GenerationRequest(prompt: "make it snow")
            (r.steps, r.decode, r.initImage) = (1, false, Self.picture)
            change(&r)
            do { _ = try (p ?? pipeline).generate(r); return "" } catch { return "\(error)" }
        }
        #expect(message { $0.initImage = nil }.contains("is an InstructPix2Pix model (its UNet takes"))
        #expect(message { $0.initImage = nil }.contains("give the picture to edit"))
        #expect(message { $0.maskImage = Self.picture }.contains("InstructPix2PixPipeline takes no mask"))
        #expect(message { $0.strength = 0.5 }.contains("takes no strength"))
        #expect(message { $0.pag = PerturbedAttentionGuidance(scale: 2) }.contains("takes no perturbed-attention guidance"))
        #expect(message { $0.clipSkip = 1 }.contains("takes no clip skip"))
        #expect(message { $0.imageGuidanceScale = .nan }.contains("image guidance scale must be a number"))
        if base.isXL {
            #expect(message { $0.negativeOriginalSize = (64, 64) }.contains("takes no negative size or crop conditioning"))
        } else {
            #expect(message { $0.width = 64 }.contains("StableDiffusionInstructPix2PixPipeline takes no size"))
            #expect(message { $0.guidanceRescale = 0.5 }.contains("takes no guidance rescale"))
        }
        // A model that takes no picture refuses image guidance.
        #expect(message({ $0.imageGuidanceScale = 1.2 }, on: try cpuPipeline(base)).contains("image guidance scale is for InstructPix2Pix models"))
    }

    /// `folder` (a diffusers model) with an InstructPix2Pix UNet made as `widenedConvIn` makes it,
    /// written to `out` (for the command line, which loads models from disk).
    static func writeModel(from folder: String, to out: String, extraWeight: Float) throws {
        try copyTree(folder, to: out)
        let base = try StableDiffusionComponents.load(folder)
        let edit = try widenedConvIn(base, inChannels: 2 * base.vae.model.latentChannels, extraWeight: extraWeight)
        let unet = Files.join(out, "unet")
        var config = try Files.readText(Files.join(unet, "config.json"))
        let inChannels = "\"in_channels\": \(base.unet.config.inChannels)"
        #expect(config.contains(inChannels))
        config = config.replacing(inChannels, with: "\"in_channels\": \(edit.unet.config.inChannels)")
        try Files.write(Array(config.utf8), to: Files.join(unet, "config.json"))
        let source = edit.unetWeights.source
        try SafeTensors.write(try source.tensorNames.map { ($0, try source.tensor($0)) },
                              to: Files.join(unet, "diffusion_pytorch_model.safetensors"))
    }
}
