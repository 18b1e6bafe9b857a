import DiffuseCore
import DiffuseGraph
import DiffuseModels
import DiffuseSchedulers

/// Inpainting, as diffusers' `StableDiffusionInpaintPipeline` and
/// `StableDiffusionXLInpaintPipeline` do it. An inpainting UNet (9 input channels) sees the
/// mask and the masked image's latents beside the latents at every step. Any other UNet
/// repaints by blending: after each step the kept region is put back from the image's
/// latents, noised to the next timestep with the initial noise.
extension StableDiffusionPipeline {
    /// What a mask adds to a generation.
    struct Inpainting {
        /// The mask at latent size, one row per image [count, 1, h, w] (1: repaint).
        var mask: Tensor
        /// An inpainting UNet's input: the latents of the image with the masked region gray
        /// [count, C, h, w].
        var maskedImageLatents: Tensor?
        /// A blending UNet's: the image's latents and the initial noise [count, C, h, w].
        var kept: (imageLatents: DeviceTensor, noise: DeviceTensor)?
    }

    /// diffusers' `prepare_latents` (with an image) and `prepare_mask_latents`, with their
    /// random draws in the same order: the image's latent sample (when a blending UNet needs the
    /// image's latents, or when strength < 1 starts from them), the noise, then the masked
    /// image's latent sample.
    func prepareInpainting(_ r: GenerationRequest, image: Image, mask maskImage: Image, strength: Double, width: Int, height: Int,
                           latentShape: [Int], scheduler: Scheduler, begin: Int, generator: RandomSource,
                           algebra: LatentAlgebra) throws -> (latents: DeviceTensor, inpainting: Inpainting) {
        let c = components, factor = c.vae.model.spatialScaleFactor
        let n = latentShape[0]
        let pixels = try VaeImageProcessor.preprocess([image], height: height, width: width, vaeScaleFactor: factor)
        let maskPixels = try VaeImageProcessor.preprocessMask([maskImage], height: height, width: width, vaeScaleFactor: factor)
        let blends = !c.hasInpaintingUNet
        let isStrengthMax = strength == 1

        var imageLatents: DeviceTensor?
        if blends || (r.latents == nil && !isStrengthMax) {
            imageLatents = try backend.upload(repeatRows(try encodePixels(pixels, .sample(generator)), n))
        }
        let noise: DeviceTensor, latents: DeviceTensor
        if let given = r.latents {
            // diffusers takes given latents as the noise, whatever the strength.
            guard given.shape == latentShape else {
                throw PipelineError("latents have shape \(given.shape); this request needs \(latentShape)")
            }
            noise = try backend.upload(given.converted(to: .float32))
            latents = try algebra.combine([(scheduler.initNoiseSigma, noise)])
        } else {
            noise = try backend.upload(try generator.randn(latentShape))
            latents = isStrengthMax
                ? try algebra.combine([(scheduler.initNoiseSigma, noise)])
                : try scheduler.addNoise(original: imageLatents!, noise: noise, stepIndex: begin, algebra: algebra)
        }

        var maskedImageLatents: Tensor?
        if blends {
            // Only an inpainting UNet reads the masked image's latents. diffusers encodes them
            // anyway; drawing what their sample would draw keeps the generator in step for
            // the ancestral samplers' noise, without a VAE pass.
            if !c.vae.isTiny { _ = try generator.randn([1, latentShape[1], latentShape[2], latentShape[3]]) }
        } else {
            // `init_image * (mask < 0.5)`: the repainted region becomes 0, mid-gray.
            let masked = pixels.copy()
            let plane = height * width
            for i in 0..<masked.count where maskPixels.floats[i % plane] >= 0.5 { masked.floats[i] = 0 }
            maskedImageLatents = repeatRows(try encodePixels(masked, .sample(generator)), n)
        }
        let mask = repeatRows(Self.nearestResized(maskPixels, height: latentShape[2], width: latentShape[3]), n)
        return (latents, Inpainting(mask: mask, maskedImageLatents: maskedImageLatents,
                                    kept: blends ? (imageLatents!, noise) : nil))
    }

    /// A blending UNet's step end: `(1 − mask)·kept + mask·latents`, where `kept` is the
    /// image's latents noised to the next timestep (`nextStep`; nil after the last step: as
    /// they are). The scheduler's `add_noise` and one small graph, so the loop stays on the
    /// device.
    func blendStep(_ kept: (imageLatents: DeviceTensor, noise: DeviceTensor), mask latentMask: Tensor, latentShape: [Int],
                   scheduler: Scheduler) throws -> (DeviceTensor, Int?) throws -> DeviceTensor {
        // The mask broadcast to the latents' channels on the host, so the graph is elementwise.
        let channels = latentShape[1], plane = latentShape[2] * latentShape[3]
        let mask = Tensor(zeros: latentShape), inverse = Tensor(zeros: latentShape)
        for i in 0..<mask.count {
            let m = latentMask.floats[(i / (channels * plane)) * plane + i % plane]
            mask.floats[i] = m
            inverse.floats[i] = 1 - m
        }
        let exe = try executable("denoiser.blend|\(latentShape)", weights: nil, options: CompileOptions(precision: .float32)) {
            let b = GraphBuilder()
            let latents = b.input("latents", shape: latentShape), kept = b.input("kept", shape: latentShape)
            b.output("blended", kept * b.input("inverse_mask", shape: latentShape) + latents * b.input("mask", shape: latentShape))
            return try b.finish()
        }
        let maskFeed = try backend.upload(mask), inverseFeed = try backend.upload(inverse)
        let algebra = BackendAlgebra(backend)
        return { latents, nextStep in
            let noised = try nextStep.map { try scheduler.addNoise(original: kept.imageLatents, noise: kept.noise, stepIndex: $0, algebra: algebra) }
                ?? kept.imageLatents
            return try exe.run(["latents": latents, "kept": noised, "mask": maskFeed, "inverse_mask": inverseFeed])["blended"]!
        }
    }

    /// Rows repeated `count` times along the batch axis (`tensor.repeat(count, 1, 1, 1)`).
    func repeatRows(_ t: Tensor, _ count: Int) -> Tensor {
        count == 1 ? t : concatenate(Array(repeating: t, count: count), axis: 0)
    }

    /// `torch.nn.functional.interpolate(mask, size=(height, width))` (mode "nearest"): the
    /// source index is ⌊i · in/out⌋ in float32, as ATen computes it.
    static func nearestResized(_ t: Tensor, height: Int, width: Int) -> Tensor {
        let (n, c, inH, inW) = (t.shape[0], t.shape[1], t.shape[2], t.shape[3])
        func source(_ i: Int, _ input: Int, _ output: Int) -> Int {
            input == output ? i : min(Int((Float(i) * (Float(input) / Float(output))).rounded(.down)), input - 1)
        }
        let out = Tensor(zeros: [n, c, height, width])
        for p in 0..<(n * c) {
            for y in 0..<height {
                let sy = source(y, inH, height)
                for x in 0..<width {
                    out.floats[(p * height + y) * width + x] = t.floats[(p * inH + sy) * inW + source(x, inW, width)]
                }
            }
        }
        return out
    }
}
