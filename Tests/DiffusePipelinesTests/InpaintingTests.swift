import DiffuseCore
import DiffuseCPU
import DiffuseGraph
import DiffuseModels
import DiffuseSchedulers
@testable import DiffusePipelines
import Testing

/// Image to image and inpainting: diffusers' own outputs where the fixture set has the goldens
/// (`golden/<variant>/image/`, made by scripts/fixtures/make_image_reference.py), and for every
/// fixture model what holds by construction: a blending UNet under a black mask gives back the
/// image's latents, and an inpainting UNet that ignores its mask inputs is the plain pipeline.
@Suite struct InpaintingTests {
    static let models = (try? ReferenceModel.all()) ?? []

    @Test func diffusersGoldens() throws {
        try expectOptionalGoldens(ReferenceCheck.checkImageToImage, models: Self.models, label: "image to image and inpainting",
                                  script: "make_image_reference.py")
    }

    /// A smooth colour image whose size is not the model's, so it is resized.
    static let picture: Image = {
        let (w, h) = (72, 56)
        var pixels: [UInt8] = []
        for y in 0..<h {
            for x in 0..<w { pixels += [UInt8(x * 255 / w), UInt8(y * 255 / h), UInt8((x + y) * 255 / (w + h))] }
        }
        return Image(width: w, height: h, channels: 3, pixels: pixels)
    }()

    /// A mask of one gray level everywhere (0: keep all, 255: repaint all), or a box to repaint.
    static func mask(_ level: UInt8? = nil) -> Image {
        let (w, h) = (72, 56)
        var pixels = [UInt8](repeating: level ?? 0, count: w * h)
        if level == nil { for y in 16..<40 { for x in 20..<52 { pixels[y * w + x] = 255 } } }
        return Image(width: w, height: h, channels: 1, pixels: pixels)
    }

    static func request(_ c: StableDiffusionComponents, prompt: String = "a lighthouse at dusk", seed: UInt64 = 3) -> GenerationRequest {
        var r = GenerationRequest(prompt: prompt)
        r.steps = 3
        r.seed = seed
        (r.width, r.height) = c.defaultImageSize
        return r
    }

    /// The model with an inpainting UNet made from its own: conv_in widened with zero weights for
    /// the mask and the masked image's latents, so it computes what the plain UNet does.
    static func ignoringMaskInputs(_ base: StableDiffusionComponents) throws -> StableDiffusionComponents {
        try widenedConvIn(base, inChannels: 2 * base.vae.model.latentChannels + 1, extraWeight: 0)
    }

    /// Under a black mask a blending UNet's result is the image's latents, whatever the sampler,
    /// strength or prompt: the last blend puts them back un-noised. They are the first draw.
    @Test(arguments: models) func blackMaskKeepsTheImage(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        let pipeline = try cpuPipeline(base)
        var r = Self.request(base)
        r.initImage = Self.picture
        r.maskImage = Self.mask(0)
        r.count = 2
        r.scheduler = "euler-a"
        r.strength = 0.7
        let kept = try pipeline.generateLatents(r)
        let (width, height) = base.defaultImageSize
        let image = try pipeline.encodeImage(Self.picture, width: width, height: height, generator: TorchCPUGenerator(seed: r.seed))
        #expect(kept.toFloatArray() == (image.toFloatArray() + image.toFloatArray()))

        var other = Self.request(base, prompt: "a red boat")
        other.initImage = Self.picture
        other.maskImage = Self.mask(0)
        other.scheduler = "ddim"
        #expect(try pipeline.generateLatents(other).toFloatArray() == image.toFloatArray())
        // A repainted box changes the latents (the blend is not a no-op).
        other.maskImage = Self.mask()
        #expect(try pipeline.generateLatents(other).toFloatArray() != image.toFloatArray())
    }

    /// An inpainting UNet whose mask inputs have zero weights is the plain UNet: at strength 1
    /// inpainting is text to image, below it image to image, as long as the masked image's
    /// latent sample comes after the draws they share (diffusers' order).
    @Test(arguments: models) func inpaintingUNetIgnoringItsMaskIsThePlainPipeline(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        let inpainting = try Self.ignoringMaskInputs(base)
        #expect(inpainting.hasInpaintingUNet && !base.hasInpaintingUNet)
        for (strength, scheduler) in [(1.0, "ddim"), (0.6, "euler")] {
            var plain = Self.request(base)
            plain.scheduler = scheduler
            if strength < 1 {
                plain.initImage = Self.picture
                plain.strength = strength
            }
            var inpaint = Self.request(base)
            inpaint.scheduler = scheduler
            inpaint.initImage = Self.picture
            inpaint.maskImage = Self.mask()
            inpaint.strength = strength
            let want = try cpuPipeline(base).generateLatents(plain)
            let got = try cpuPipeline(inpainting).generateLatents(inpaint)
            // Extra zero products leave the sums as they are; only the convolution's blocking may differ.
            #expect(relativeError(got, want) < 1e-5, "strength \(strength) \(scheduler): \(relativeError(got, want))")
        }
    }

    /// Requests that cannot mean anything are refused, naming what is missing.
    @Test func refusals() throws {
        let model = try #require(Self.models.first)
        let base = try StableDiffusionComponents.load(model.folder)
        var r = Self.request(base)
        r.maskImage = Self.mask()
        #expect(message { try cpuPipeline(base).generateLatents(r) }?.contains("a mask needs the image") == true)
        let inpainting = try Self.ignoringMaskInputs(base)
        let text = message { try cpuPipeline(inpainting).generateLatents(Self.request(base)) } ?? ""
        #expect(text.contains("inpainting model") && text.contains("mask"), "\(text)")
        r.initImage = Self.picture
        r.strength = 1.5
        #expect(message { try cpuPipeline(base).generateLatents(r) }?.contains("strength must be in (0, 1]") == true)
        r.strength = nil
        var crop = r
        crop.paddingMaskCrop = -1
        #expect(message { try cpuPipeline(base).generateLatents(crop) }?.contains("0 or more") == true)
        crop.paddingMaskCrop = 8
        crop.maskImage = Self.mask(0)
        #expect(message { try cpuPipeline(base).generateLatents(crop) }?.contains("all black") == true)
        crop.maskImage = Self.mask().resized(width: 36, height: 28)
        #expect(message { try cpuPipeline(base).generateLatents(crop) }?.contains("36x28 but the image is 72x56") == true)
        crop.maskImage = nil
        #expect(message { try cpuPipeline(base).generateLatents(crop) }?.contains("needs an image and a mask") == true)
    }

    /// Inpainting only the masked area: where the mask is black the output is the starting image
    /// exactly, at its size; a crop that takes the whole image at the output's size is plain
    /// inpainting (the same latents).
    @Test(arguments: models) func maskCrop(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        let pipeline = try cpuPipeline(base)
        var r = Self.request(base)
        r.initImage = Self.picture
        r.maskImage = Self.mask()
        r.paddingMaskCrop = 4
        r.count = 2
        r.scheduler = "euler-a"
        let result = try pipeline.generate(r)
        let mask = Self.mask()
        for image in result.images {
            #expect(image.width == Self.picture.width && image.height == Self.picture.height)
            let kept = (0..<(mask.width * mask.height)).filter { mask.pixels[$0] == 0 }
            #expect(kept.allSatisfy { i in (0..<3).allSatisfy { image.pixels[3 * i + $0] == Self.picture.pixels[3 * i + $0] } })
        }
        // The repainted box differs from the picture (the generation went somewhere).
        #expect(result.images[0] != Self.picture)
        let (width, height) = base.defaultImageSize
        let factor = base.vae.model.spatialScaleFactor
        #expect(result.latents.shape == [2, base.vae.model.latentChannels, height / factor, width / factor])

        // A picture of the output's size, a padding reaching every edge: the crop is the whole
        // picture and the fill an identity.
        let (w, h) = base.defaultImageSize
        let full = Self.picture.resized(width: w, height: h)
        var plain = Self.request(base)
        plain.initImage = full
        plain.maskImage = Self.mask().resized(width: w, height: h)
        var cropped = plain
        cropped.paddingMaskCrop = max(w, h)
        #expect(try pipeline.generateLatents(cropped).toFloatArray() == (try pipeline.generateLatents(plain)).toFloatArray())
    }

    /// Default strengths and sizes follow diffusers' pipelines.
    @Test func defaults() throws {
        let model = try #require(Self.models.first)
        let base = try StableDiffusionComponents.load(model.folder)
        let pipeline = try cpuPipeline(base)
        var r = GenerationRequest(prompt: "x")
        r.initImage = Self.picture
        #expect(pipeline.strength(r) == (base.isXL ? 0.3 : 0.8))
        let imageSize = try pipeline.imageSize(r)
        #expect(imageSize.0 == 72 && imageSize.1 == 56)
        r.maskImage = Self.mask()
        #expect(pipeline.strength(r) == (base.isXL ? 0.9999 : 1))
        let inpaintSize = try pipeline.imageSize(r), modelSize = base.defaultImageSize
        #expect(inpaintSize.0 == modelSize.width && inpaintSize.1 == modelSize.height)
    }

    /// `interpolate(mask, size)` in nearest mode takes ⌊i · in/out⌋.
    @Test func nearestResize() {
        let t = Tensor(shape: [1, 1, 3, 5], floats: (0..<15).map(Float.init))
        let down = StableDiffusionPipeline.nearestResized(t, height: 2, width: 2)
        #expect(down.toFloatArray() == [0, 2, 5, 7])  // rows ⌊0⌋, ⌊1.5⌋; columns ⌊0⌋, ⌊2.5⌋
        let same = StableDiffusionPipeline.nearestResized(t, height: 3, width: 5)
        #expect(same.toFloatArray() == t.toFloatArray())
    }
}
