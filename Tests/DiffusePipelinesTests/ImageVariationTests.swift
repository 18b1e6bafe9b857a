import DiffuseCore
import DiffuseCPU
import DiffuseGraph
import DiffuseModels
@testable import DiffusePipelines
import Foundation
import Testing

/// Image variations: diffusers' outputs where the fixture set has the goldens
/// (`golden/<variant>/image_variation/`, made by scripts/fixtures/make_image_variation_reference.py),
/// and for every SD 1.x/2.x fixture model what holds by construction: with a zero image
/// projection the picture and the guidance change nothing (both passes see a zero token), with
/// weights they do, and what diffusers' pipeline takes no argument for is refused by name.
@Suite struct ImageVariationTests {
    /// The fixture models an image variation model can be made from.
    static let models = DepthToImageTests.models

    @Test func diffusersGoldens() throws {
        try expectOptionalGoldens(ReferenceCheck.checkImageVariation, models: Self.models, label: "image variation",
                                  script: "make_image_variation_reference.py")
    }

    /// A small CLIP image encoder whose image_embeds fit the UNet's cross-attention, with seeded
    /// weights (its projection zero when `zeroProjection`).
    static func encoder(for unet: UNet2DConditionModel, zeroProjection: Bool = false) throws -> ImageEncoderComponent {
        try encoder(projectionDim: unet.config.crossAttentionDims[0], zeroProjection: zeroProjection)
    }

    static func encoder(projectionDim: Int, zeroProjection: Bool = false) throws -> ImageEncoderComponent {
        var config = CLIPVisionConfig()
        (config.hiddenSize, config.intermediateSize, config.numHiddenLayers, config.numAttentionHeads) = (32, 37, 2, 4)
        (config.imageSize, config.patchSize, config.projectionDim) = (32, 8, projectionDim)
        let model = try CLIPVisionModelWithProjection(config: config)
        let random = model.randomWeights(seed: 11)
        let tensors = try random.tensorNames.map { name -> (String, Tensor) in
            let t = try random.tensor(name)
            return (name, zeroProjection && name == "visual_projection.weight" ? Tensor(zeros: t.shape) : t)
        }
        return ImageEncoderComponent(name: "test image encoder", model: model, weights: ModelWeights(InMemoryTensors(tensors)),
                                     processor: CLIPImageProcessor(imageSize: config.imageSize))
    }

    static func variationModel(_ base: StableDiffusionComponents, zeroProjection: Bool = false) throws -> StableDiffusionComponents {
        var c = base
        c.textEncoder = nil
        c.imageVariationEncoder = try encoder(for: base.unet, zeroProjection: zeroProjection)
        return c
    }

    static let picture = DepthToImageTests.picture
    static let otherPicture = Image(width: picture.width, height: picture.height, channels: 3, pixels: picture.pixels.map { 255 - $0 })

    static func request(_ picture: Image, guidance: Double, scheduler: String = "euler-a") -> GenerationRequest {
        var r = GenerationRequest(prompt: "")
        (r.steps, r.seed, r.count, r.decode, r.scheduler, r.guidanceScale, r.initImage) = (3, 4, 2, false, scheduler, guidance, picture)
        return r
    }

    @Test(arguments: models) func aZeroEmbeddingIgnoresThePicture(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        let blind = try cpuPipeline(try Self.variationModel(base, zeroProjection: true))
        #expect(blind.components.isImageVariation && !base.isImageVariation)
        let first = try blind.generate(Self.request(Self.picture, guidance: 7.5)).latents.toFloatArray()
        let scale = first.map(abs).max() ?? 1
        for other in [Self.request(Self.otherPicture, guidance: 7.5), Self.request(Self.picture, guidance: 1)] {
            let got = try blind.generate(other).latents.toFloatArray()
            #expect(zip(got, first).map { abs($0 - $1) }.max() ?? 0 <= 1e-5 * scale)
        }
        // The model's size, not the picture's.
        let latents = try blind.generate(Self.request(Self.picture, guidance: 1)).latents
        let f = base.vae.model.spatialScaleFactor
        #expect(latents.shape[2] * f == base.defaultImageSize.height && latents.shape[3] * f == base.defaultImageSize.width)
    }

    @Test(arguments: models) func thePictureAndGuidanceMatter(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        let pipeline = try cpuPipeline(try Self.variationModel(base))
        let first = try pipeline.generate(Self.request(Self.picture, guidance: 7.5)).latents.toFloatArray()
        #expect(try pipeline.generate(Self.request(Self.otherPicture, guidance: 7.5)).latents.toFloatArray() != first)
        #expect(try pipeline.generate(Self.request(Self.picture, guidance: 3)).latents.toFloatArray() != first)
    }

    @Test(arguments: models) func whatThePipelineTakesNotIsRefusedByName(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        let pipeline = try cpuPipeline(try Self.variationModel(base))
        func message(_ change: (inout GenerationRequest) -> Void) -> String {
            var r = Self.request(Self.picture, guidance: 2)
            r.steps = 1
            change(&r)
            do { _ = try pipeline.generate(r); return "" } catch { return "\(error)" }
        }
        #expect(message { $0.initImage = nil }.contains("is an image variation model"))
        #expect(message { $0.initImage = nil }.contains("give the picture to make variations of"))
        #expect(message { $0.prompt = "a cat" }.contains("StableDiffusionImageVariationPipeline takes no prompt"))
        #expect(message { $0.negativePrompt = "blurry" }.contains("takes no prompt"))
        #expect(message { $0.strength = 0.5 }.contains("takes no strength"))
        #expect(message { $0.maskImage = Self.picture }.contains("takes no mask"))
        #expect(message { $0.clipSkip = 1 }.contains("takes no clip skip"))
        #expect(message { $0.pag = PerturbedAttentionGuidance(scale: 2) }.contains("takes no perturbed-attention guidance"))
        #expect(message { $0.depthMap = DepthToImageTests.depthMap() }.contains("takes no depth map"))
        // Size, eta and latents are the pipeline's.
        let f = base.vae.model.spatialScaleFactor
        #expect(message { $0.width = 4 * f; $0.height = 2 * f; $0.eta = 0.5 } == "")
    }

    /// `folder` (a diffusers SD model) made an image variation model on disk: no text encoder or
    /// tokenizer, an image encoder and feature extractor, model_index.json naming the pipeline.
    static func writeModel(from folder: String, to out: String) throws {
        try copyTree(folder, to: out)
        for name in ["text_encoder", "tokenizer"] { try FileManager.default.removeItem(atPath: Files.join(out, name)) }
        let index = try Files.readJSON(Files.join(folder, "model_index.json"))
        let kept = (index.members ?? []).filter { !["_class_name", "text_encoder", "tokenizer", "image_encoder", "feature_extractor"].contains($0.0) }
        let rewritten = JSON.object([("_class_name", .string("StableDiffusionImageVariationPipeline"))] + kept
            + [("image_encoder", .array([.string("transformers"), .string("CLIPVisionModelWithProjection")])),
               ("feature_extractor", .array([.string("transformers"), .string("CLIPImageProcessor")]))])
        try Files.write(Array(rewritten.serialized(pretty: true).utf8), to: Files.join(out, "model_index.json"), overwrite: true)
        let encoder = try Self.encoder(for: try StableDiffusionComponents.load(folder).unet)
        let dir = Files.join(out, "image_encoder")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        try Files.write(Array(try JSONEncoder().encode(encoder.model.config)), to: Files.join(dir, "config.json"))
        let source = encoder.weights.source
        try SafeTensors.write(try source.tensorNames.map { ($0, try source.tensor($0)) }, to: Files.join(dir, "model.safetensors"))
        let extractor = Files.join(out, "feature_extractor")
        try FileManager.default.createDirectory(atPath: extractor, withIntermediateDirectories: true)
        let size = encoder.model.config.imageSize
        try Files.write(Array(#"{"size": \#(size), "crop_size": \#(size), "resample": 3}"#.utf8),
                        to: Files.join(extractor, "preprocessor_config.json"))
    }
}
