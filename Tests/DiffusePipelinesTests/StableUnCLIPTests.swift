import DiffuseCore
import DiffuseCPU
import DiffuseGraph
import DiffuseModels
@testable import DiffusePipelines
import DiffuseSchedulers
import Foundation
import Testing

/// Stable unCLIP: diffusers' outputs where the fixture set has the goldens
/// (`golden/<variant>/unclip/`, made by scripts/fixtures/make_unclip_reference.py), and for every
/// SD 1.x/2.x fixture model what holds by construction: with a class embedding of zero output the
/// model is the text-to-image one (given the same latents), with weights the picture and the noise
/// level matter, the noised embedding's noise-level half is torch's sinusoidal embedding, and what
/// diffusers' pipeline takes no argument for is refused by name.
@Suite struct StableUnCLIPTests {
    static let models = DepthToImageTests.models

    @Test func diffusersGoldens() throws {
        try expectOptionalGoldens(ReferenceCheck.checkStableUnCLIP, models: Self.models, label: "Stable unCLIP",
                                  script: "make_unclip_reference.py")
    }

    /// The real model's image noising scheduler.
    static let noisingScheduler = #"{"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "clip_sample": true}"#

    /// `base` made a Stable unCLIP model: a UNet projecting class labels of twice the image
    /// encoder's width (its class embedding's output layer times `classWeight`), the encoder,
    /// a normaliser and the noising scheduler.
    static func unCLIPModel(_ base: StableDiffusionComponents, classWeight: Float) throws -> StableDiffusionComponents {
        var c = base
        let encoder = try ImageVariationTests.encoder(for: base.unet)
        let width = encoder.model.config.projectionDim
        var config = base.unet.config
        (config.classEmbedType, config.projectionClassEmbeddingsInputDim) = ("projection", 2 * width)
        c.unet = try UNet2DConditionModel(config: config)
        let dim = config.timeEmbedDim
        func pattern(_ shape: [Int], _ scale: Float, _ k: Int) -> Tensor {
            let n = shape.reduce(1, *)
            return Tensor(shape: shape, floats: (0..<n).map { scale * (Float(($0 * 37 + k * 11) % 101) / 101 - 0.5) })
        }
        let classEmbedding = [("class_embedding.linear_1.weight", pattern([dim, 2 * width], 0.4, 1)),
                              ("class_embedding.linear_1.bias", pattern([dim], 0.2, 2)),
                              ("class_embedding.linear_2.weight", pattern([dim, dim], classWeight, 3)),
                              ("class_embedding.linear_2.bias", pattern([dim], classWeight, 4))]
        let source = base.unetWeights.source
        c.unetWeights = ModelWeights(InMemoryTensors(try source.tensorNames.map { ($0, try source.tensor($0)) } + classEmbedding))
        let schedule = try Schedulers.make(config: try SchedulerConfig(json: try JSON.parse(noisingScheduler))).alphasCumprod
        c.unCLIP = StableUnCLIPParts(imageEncoder: encoder, mean: (0..<width).map { Float($0 % 5) * 0.01 },
                                     std: (0..<width).map { 1 + Float($0 % 3) * 0.1 }, alphasCumprod: schedule)
        return c
    }

    static func request(_ c: StableDiffusionComponents) throws -> GenerationRequest {
        var r = GenerationRequest(prompt: "a watercolor")
        (r.steps, r.seed, r.count, r.decode, r.scheduler, r.negativePrompt) = (3, 6, 2, false, "ddim", "blurry")
        let f = c.vae.model.spatialScaleFactor
        let (w, h) = c.defaultImageSize
        r.latents = TorchCPUGenerator(seed: 99).randn([2, c.vae.model.latentChannels, h / f, w / f])
        return r
    }

    @Test(arguments: models) func aSilentClassEmbeddingIsTextToImage(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        let silent = try Self.unCLIPModel(base, classWeight: 0)
        #expect(silent.isStableUnCLIP && !base.isStableUnCLIP)
        let r = try Self.request(base)
        let expected = try cpuPipeline(base).generate(r).latents.toFloatArray()
        var v = r
        (v.initImage, v.noiseLevel) = (ImageVariationTests.picture, 300)
        let got = try cpuPipeline(silent).generate(v).latents.toFloatArray()
        let scale = expected.map(abs).max() ?? 1
        #expect(zip(got, expected).map { abs($0 - $1) }.max() ?? 0 <= 1e-5 * scale)
    }

    @Test(arguments: models) func thePictureAndNoiseLevelMatter(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        let pipeline = try cpuPipeline(try Self.unCLIPModel(base, classWeight: 0.5))
        var r = try Self.request(base)
        r.initImage = ImageVariationTests.picture
        let first = try pipeline.generate(r).latents.toFloatArray()
        r.noiseLevel = 400
        #expect(try pipeline.generate(r).latents.toFloatArray() != first)
        r.noiseLevel = nil
        r.initImage = ImageVariationTests.otherPicture
        #expect(try pipeline.generate(r).latents.toFloatArray() != first)
    }

    /// `noise_image_embeddings` at level 0 of a zero-mean, unit-std normaliser: the embedding
    /// times √ᾱ₀ plus the noise times √(1 − ᾱ₀), then cos 0 = 1 and sin 0 = 0; at level t the
    /// first sinusoid is cos t and sin t (frequency 1).
    @Test func noisedEmbedding() throws {
        let schedule = try Schedulers.make(config: try SchedulerConfig(json: try JSON.parse(Self.noisingScheduler))).alphasCumprod
        let parts = StableUnCLIPParts(imageEncoder: try ImageVariationTests.encoder(projectionDim: 4),
                                      mean: [0, 0, 0, 0], std: [1, 1, 1, 1], alphasCumprod: schedule)
        let (e, z) = ([Float](arrayLiteral: 1, -2, 3, 0.5), [Float](arrayLiteral: 0.1, 0.2, -0.3, 0.4))
        let a = Float(schedule[0]).squareRoot(), b = (1 - Float(schedule[0])).squareRoot()
        let zero = parts.noised(e, level: 0, noise: z)
        #expect(zero.count == 8 && Array(zero[4...]) == [1, 1, 0, 0])
        for i in 0..<4 { #expect(abs(zero[i] - (a * e[i] + b * z[i])) < 1e-6) }
        let t = parts.noised(e, level: 7, noise: z)
        #expect(abs(t[4] - cosf(7)) < 1e-6 && abs(t[6] - sinf(7)) < 1e-6)
        #expect(parts.maxNoiseLevel == 999)
    }

    @Test(arguments: models) func whatThePipelineTakesNotIsRefusedByName(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        let pipeline = try cpuPipeline(try Self.unCLIPModel(base, classWeight: 0.5))
        func message(_ change: (inout GenerationRequest) -> Void) -> String {
            var r = GenerationRequest(prompt: "a watercolor")
            (r.steps, r.decode, r.initImage) = (1, false, ImageVariationTests.picture)
            change(&r)
            do { _ = try pipeline.generate(r); return "" } catch { return "\(error)" }
        }
        #expect(message { $0.initImage = nil }.contains("is a Stable unCLIP model"))
        #expect(message { $0.initImage = nil }.contains("give the picture to make variations of"))
        #expect(message { $0.noiseLevel = 1000 }.contains("noise level must be in [0, 999]"))
        #expect(message { $0.strength = 0.5 }.contains("StableUnCLIPImg2ImgPipeline takes no strength"))
        #expect(message { $0.maskImage = ImageVariationTests.picture }.contains("takes no mask"))
        #expect(message { $0.clipSkip = 1 }.contains("takes no clip skip"))
        #expect(message { $0.guidanceRescale = 0.3 }.contains("takes no guidance rescale"))
        #expect(message { $0.pag = PerturbedAttentionGuidance(scale: 2) }.contains("takes no perturbed-attention guidance"))
        let f = base.vae.model.spatialScaleFactor
        #expect(message { $0.width = 4 * f; $0.height = 2 * f; $0.eta = 0.5; $0.noiseLevel = 999 } == "")
        // A model without the parts refuses a noise level.
        let plain = try cpuPipeline(base)
        var r = GenerationRequest(prompt: "a boat")
        (r.steps, r.decode, r.noiseLevel) = (1, false, 3)
        #expect(throws: PipelineError.self) { try plain.generate(r) }
    }

    /// `folder` (a diffusers SD model) made a Stable unCLIP model on disk as `unCLIPModel` makes one.
    static func writeModel(from folder: String, to out: String) throws {
        try copyTree(folder, to: out)
        let base = try StableDiffusionComponents.load(folder)
        let c = try unCLIPModel(base, classWeight: 0.5)
        let parts = try #require(c.unCLIP)
        let index = try Files.readJSON(Files.join(folder, "model_index.json"))
        let kept = (index.members ?? []).filter { !["_class_name", "image_encoder", "feature_extractor"].contains($0.0) }
        func entry(_ library: String, _ cls: String) -> JSON { .array([.string(library), .string(cls)]) }
        let rewritten = JSON.object([("_class_name", .string("StableUnCLIPImg2ImgPipeline"))] + kept
            + [("image_encoder", entry("transformers", "CLIPVisionModelWithProjection")),
               ("feature_extractor", entry("transformers", "CLIPImageProcessor")),
               ("image_normalizer", entry("stable_diffusion", "StableUnCLIPImageNormalizer")),
               ("image_noising_scheduler", entry("diffusers", "DDPMScheduler"))])
        try Files.write(Array(rewritten.serialized(pretty: true).utf8), to: Files.join(out, "model_index.json"), overwrite: true)
        func make(_ name: String) throws -> String {
            let dir = Files.join(out, name)
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            return dir
        }
        let unet = Files.join(out, "unet")
        let config = try Files.readJSON(Files.join(unet, "config.json"))
        let members = (config.members ?? []).filter { !["class_embed_type", "projection_class_embeddings_input_dim"].contains($0.0) }
        let width = 2 * parts.imageEncoder.model.config.projectionDim
        try Files.write(Array(JSON.object(members + [("class_embed_type", .string("projection")),
                                                     ("projection_class_embeddings_input_dim", .number(Double(width)))])
                                  .serialized(pretty: true).utf8), to: Files.join(unet, "config.json"), overwrite: true)
        let source = c.unetWeights.source
        try SafeTensors.write(try source.tensorNames.map { ($0, try source.tensor($0)) },
                              to: Files.join(unet, "diffusion_pytorch_model.safetensors"), overwrite: true)
        let encoder = try make("image_encoder")
        try Files.write(Array(try JSONEncoder().encode(parts.imageEncoder.model.config)), to: Files.join(encoder, "config.json"))
        let weights = parts.imageEncoder.weights.source
        try SafeTensors.write(try weights.tensorNames.map { ($0, try weights.tensor($0)) }, to: Files.join(encoder, "model.safetensors"))
        let size = parts.imageEncoder.model.config.imageSize
        try Files.write(Array(#"{"size": \#(size), "crop_size": \#(size)}"#.utf8),
                        to: Files.join(try make("feature_extractor"), "preprocessor_config.json"))
        let normalizer = try make("image_normalizer")
        try Files.write(Array(#"{"_class_name": "StableUnCLIPImageNormalizer", "embedding_dim": \#(parts.mean.count)}"#.utf8),
                        to: Files.join(normalizer, "config.json"))
        try SafeTensors.write([("mean", Tensor(shape: [1, parts.mean.count], floats: parts.mean)),
                               ("std", Tensor(shape: [1, parts.std.count], floats: parts.std))],
                              to: Files.join(normalizer, "diffusion_pytorch_model.safetensors"))
        try Files.write(Array(noisingScheduler.utf8), to: Files.join(try make("image_noising_scheduler"), "scheduler_config.json"))
    }
}
