import DiffuseCore
import DiffuseGraph
import DiffuseModels
import DiffuseSchedulers
#if canImport(Glibc)
import Glibc
#endif

/// Stable unCLIP's parts beyond a text-to-image model's (stabilityai/stable-diffusion-2-1-unclip,
/// diffusers' `StableUnCLIPImg2ImgPipeline`): the CLIP image encoder, the statistics its embeddings
/// are normalised with before noising (`StableUnCLIPImageNormalizer`), and the scheduler that
/// noises them (`image_noising_scheduler`). The UNet takes the noised embedding and its noise
/// level's sinusoidal embedding, side by side, as projected class labels.
public struct StableUnCLIPParts {
    public var imageEncoder: ImageEncoderComponent
    /// `image_normalizer`'s mean and std, one per embedding channel.
    public var mean: [Float]
    public var std: [Float]
    /// The noising scheduler's ᾱ per training step.
    public var alphasCumprod: [Double]

    /// The highest noise level the noising scheduler has (its training steps − 1).
    public var maxNoiseLevel: Int { alphasCumprod.count - 1 }

    /// diffusers' `noise_image_embeddings`: the embedding normalised, noised to `level` by the
    /// noising scheduler (`add_noise`, float32) with `noise`, un-normalised, then the level's
    /// sinusoidal embedding (`get_timestep_embedding`, cos first) of the same width beside it.
    func noised(_ embeds: [Float], level: Int, noise: [Float]) -> [Float] {
        let cumulative = Float(alphasCumprod[level])
        let (a, b) = (cumulative.squareRoot(), (1 - cumulative).squareRoot())
        var out = (0..<embeds.count).map { i -> Float in
            let scaled = (embeds[i] - mean[i]) * 1.0 / std[i]
            return (a * scaled + b * noise[i]) * std[i] + mean[i]
        }
        let half = embeds.count / 2
        let logPeriod = Float(-log(10000.0))
        var sines = [Float](repeating: 0, count: half), cosines = sines
        for k in 0..<half {
            let arg = Float(level) * expf(logPeriod * Float(k) / Float(half))
            (sines[k], cosines[k]) = (sinf(arg), cosf(arg))
        }
        out += cosines + sines
        if embeds.count % 2 == 1 { out.append(0) }
        return out
    }
}

extension StableDiffusionComponents {
    /// Stable unCLIP: a text-to-image model whose UNet also takes a picture's noised CLIP image
    /// embedding.
    public var isStableUnCLIP: Bool { unCLIP != nil }

    /// Models whose picture conditions the UNet as an embedding, not as a starting image: the
    /// output takes the model's size.
    var takesPictureAsEmbedding: Bool { isImageVariation || isStableUnCLIP }

    /// `image_encoder/`, `feature_extractor/`, `image_normalizer/` and `image_noising_scheduler/`
    /// of a Stable unCLIP folder; the UNet's projected class labels must be twice the encoder's
    /// `image_embeds` wide.
    mutating func loadStableUnCLIP(_ source: ModelSource) throws {
        let encoder = try Self.pictureEncoder(source, model: "a Stable unCLIP model")
        let width = encoder.model.config.projectionDim
        guard let taken = unet.config.projectedClassLabelsDim, taken == 2 * width else {
            throw PipelineError("\(source.origin): the UNet must project class labels (class_embed_type \"projection\") of twice the "
                                + "image encoder's \(width) channels (the noised embedding and its noise level's); it takes "
                                + (unet.config.projectedClassLabelsDim.map { "\($0)" } ?? "none"))
        }
        let normalizer = try source.component("image_normalizer")
        let weights = try normalizer.requireWeights()
        func row(_ name: String) throws -> [Float] {
            let t = try weights.tensor(name).converted(to: .float32)
            guard t.count == width else {
                throw PipelineError("\(normalizer.location): \(name) has shape \(t.shape); the image encoder's embeddings have \(width) channels")
            }
            return t.toFloatArray()
        }
        let noising = try source.component("image_noising_scheduler").requireConfig()
        let schedule = try Schedulers.make(config: try SchedulerConfig(json: try noising.json(), origin: noising.origin)).alphasCumprod
        guard !schedule.isEmpty else { throw PipelineError("\(noising.origin): the image noising scheduler has no discrete training schedule") }
        unCLIP = StableUnCLIPParts(imageEncoder: encoder, mean: try row("mean"), std: try row("std"), alphasCumprod: schedule)
    }
}

extension StableDiffusionPipeline {
    /// diffusers' Stable unCLIP `_encode_image`: the picture's `image_embeds` (one draw of noise
    /// for it from the generator, before the latents'), noised to `level`, one row per image, after
    /// as many zero rows under guidance: the UNet's class labels [rows, 2 × width].
    func unCLIPClassLabels(_ image: Image, count n: Int, guidance: Bool, level: Int, generator: RandomSource) throws -> Tensor {
        let parts = components.unCLIP!
        let embeds = try modelImageEmbeds(parts.imageEncoder, of: image).toFloatArray()
        let noise = try generator.randn([1, embeds.count]).toFloatArray()
        let row = parts.noised(embeds, level: level, noise: noise)
        return rowsPerImage(Tensor(shape: [1, row.count], floats: row), count: n, guidance: guidance)
    }
}
