import DiffuseCore
import DiffuseGraph
import DiffuseModels
import DiffuseSchedulers

/// diffusers' `StableDiffusionLatentUpscalePipeline` (stabilityai/sd-x2-latent-upscaler): a
/// K-UNet doubles latents, a picture's or another pipeline's (`output_type="latent"`). The
/// denoiser is preconditioned as in Karras et al. (2022), table 1: it sees the latents scaled by
/// 1/√(σ²+1) beside the picture's latents upsampled 2x (nearest), the time log(σ)/4, and a
/// condition of the noise level (64 ones, 64 zeros: level 0, as diffusers fixes it) and the
/// prompt's pooled embedding; its output (the last channel, a variance, dropped) becomes the
/// denoised sample `x/(σ²+1) + F·σ/√(σ²+1)`, which the Euler scheduler (`prediction_type`
/// "sample") steps with.
extension StableDiffusionPipeline {
    enum LatentUpscaleName {
        static let imageCondition = "image_cond"
        static let skip = "c_skip"
        static let out = "c_out"
    }

    /// The noise-level half of the timestep condition: diffusers concatenates 64 ones and 64 zeros.
    static let latentUpscaleNoiseLevelWidth = 128

    /// What diffusers' latent upscale pipeline takes: a picture or latents, a prompt and negative
    /// prompt, steps, guidance, a generator and initial latents. Anything else is refused by name.
    func validateLatentUpscale(_ r: GenerationRequest) throws {
        let c = components
        let model = "\(c.name) is a latent x2 upscaler (its UNet takes the latents and the picture's, upsampled)"
        guard r.initImage != nil || r.imageLatents != nil else {
            throw PipelineError("\(model): give the picture to upscale, or the latents of one (another model's, before decoding)")
        }
        if r.initImage != nil && r.imageLatents != nil {
            throw PipelineError("\(model): give the picture or its latents, not both")
        }
        let refused: [(Bool, String)] = [
            (r.strength != nil, "strength (generation starts from noise, beside the picture)"), (r.maskImage != nil, "mask"),
            (r.width != nil || r.height != nil, "size (the output is twice the picture's, rounded down to a multiple of the VAE's factor)"),
            (r.imageGuidanceScale != nil, "image guidance scale"), (r.noiseLevel != nil, "noise level (diffusers fixes it at 0)"),
            (r.depthMap != nil, "depth map"), (r.clipSkip != nil, "clip skip"), (r.customSchedule != nil, "custom timesteps or sigmas"),
            (r.denoisingStart != nil || r.denoisingEnd != nil, "denoising start or end"), (r.guidanceRescale != 0, "guidance rescale"),
            (r.eta != 0, "eta"), (r.prompt2 != nil || r.negativePrompt2 != nil, "second prompt"),
            (!c.controlNets.isEmpty || !r.controlNets.isEmpty, "ControlNet"), (!c.t2iAdapters.isEmpty || !r.t2iAdapters.isEmpty, "T2I-Adapter"),
            (!c.ipAdapters.isEmpty || !r.ipAdapters.isEmpty, "IP-Adapter"), (r.pag?.isEnabled == true, "perturbed-attention guidance"),
            (r.freeU != nil, "FreeU"), (r.paddingMaskCrop != nil, "padding mask crop"),
            (r.promptWeighting, "prompt weighting (its prompt's pooled state is part of the condition)"),
        ]
        if let what = refused.first(where: \.0)?.1 {
            throw PipelineError("\(model): diffusers' StableDiffusionLatentUpscalePipeline takes no \(what)")
        }
        if let name = r.scheduler, SchedulerName(rawValue: name) != .euler {
            // The pipeline indexes the scheduler's sigmas by step and scales the model input itself.
            throw PipelineError("\(model): its pipeline steps with the Euler scheduler's sigmas; --scheduler \(name) cannot take them (use euler, or none)")
        }
    }

    /// The latent upscale pipeline's `__call__`, from `validate` on.
    func generateLatentUpscale(_ r: GenerationRequest, generator given: RandomSource?,
                               report: (GenerationProgress) throws -> Void) throws -> GenerationResult {
        let c = components
        var timings: [(String, Double)] = []
        let n = r.count
        let cfg = r.guidanceScale > 1
        let scheduler = try makeScheduler(r)
        guard let euler = scheduler as? EulerDiscreteScheduler else {
            throw PipelineError("\(c.name): the latent upscale pipeline steps with EulerDiscreteScheduler's sigmas; the model's scheduler is \(scheduler.className)")
        }
        let generator = given ?? makeGenerator(r)

        // The prompt: the last layer's hidden states (before the final layer norm) and the pooled
        // output; with guidance scale 0, diffusers replaces the prompt by "".
        var t0 = now()
        try report(GenerationProgress(phase: .encodingPrompt, step: 0, totalSteps: r.steps, timestep: 0, elapsed: 0, latents: nil))
        guard let te = c.textEncoder else { throw PipelineError("\(c.name) has no text encoder") }
        let prompt = r.guidanceScale == 0 ? "" : r.prompt
        let texts = cfg ? [r.negativePrompt ?? "", prompt] : [prompt]
        let encoded = try runTextEncoder(te, "text_encoder", texts, outputs: [.hiddenState(-1), .pooledOutput])
        func rows(_ t: Tensor) -> Tensor {
            concatenate((0..<texts.count).flatMap { i in Array(repeating: t.slice(i..<(i + 1)), count: n) }, axis: 0)
        }
        let hidden = rows(encoded[.hiddenState(-1)]!), pooled = rows(encoded[.pooledOutput]!)
        release("text_encoder", c.textEncoders.map(\.component.weights))
        timings.append(("encode prompt", now() - t0))

        // The picture's latents: given, or the picture encoded (a sample of the VAE's
        // distribution, drawn for all rows at once as for a list of the picture, times the scaling factor).
        let factor = c.vae.model.spatialScaleFactor, channels = c.vae.model.latentChannels
        let pictureLatents: Tensor
        if let given = r.imageLatents {
            guard given.rank == 4, given.shape[0] == n, given.shape[1] == channels else {
                throw PipelineError("image latents have shape \(given.shape); \(c.name) upscales [\(n), \(channels), h, w] (one row per image asked for)")
            }
            pictureLatents = given.converted(to: .float32)
        } else {
            t0 = now()
            let picture = r.initImage!
            let (width, height) = (picture.width / factor * factor, picture.height / factor * factor)
            guard width > 0 && height > 0 else {
                throw PipelineError("the picture is \(picture.width)x\(picture.height): smaller than the VAE's factor \(factor)")
            }
            let pixels = try VaeImageProcessor.preprocess([picture], height: height, width: width, vaeScaleFactor: factor, resample: .bicubic)
            pictureLatents = try encodePixels(pixels, .sample(generator), rows: n)
            release("vae.encoder", [])
            timings.append(("encode image", now() - t0))
        }
        let (h, w) = (2 * pictureLatents.shape[2], 2 * pictureLatents.shape[3])
        // The UNet halves its latents exactly (levels − 1 times) down to at least 2x2, which its
        // reflecting resampling needs; diffusers fails on other sizes when the skips do not fit.
        let halvings = c.unet.config.blockOutChannels.count - 1
        let multiple = max(1, (1 << halvings) / 2), smallest = 1 << halvings
        guard pictureLatents.shape[2] % multiple == 0, pictureLatents.shape[3] % multiple == 0,
              pictureLatents.shape[2] >= smallest, pictureLatents.shape[3] >= smallest else {
            throw PipelineError("\(c.name)'s UNet halves twice-the-picture's latents \(halvings) times: the picture's latents must be "
                                + "multiples of \(multiple) and at least \(smallest) on each side (a picture of multiples of \(multiple * factor) "
                                + "pixels, at least \(smallest * factor)); they are \(pictureLatents.shape[3])x\(pictureLatents.shape[2])")
        }

        // diffusers' `noise_level_embed` (level 0: 64 ones, 64 zeros) beside the pooled prompt.
        let half = Self.latentUpscaleNoiseLevelWidth / 2, rowCount = pooled.shape[0]
        let condition = concatenate([Tensor(shape: [rowCount, half], floats: Array(repeating: 1, count: rowCount * half)),
                                     Tensor(zeros: [rowCount, half]), pooled], axis: 1)

        try euler.setTimesteps(r.steps)
        let latentShape = [n, channels, h, w]
        let algebra = BackendAlgebra(backend)
        var latents = try initialNoise(r, latentShape, scheduler: euler, generator: generator, algebra: algebra)

        t0 = now()
        let denoiser = try latentUpscaleDenoiser(count: n, latentHeight: h, latentWidth: w, guidance: cfg ? r.guidanceScale : nil,
                                                 sequenceLength: hidden.shape[1], contextDim: hidden.shape[2], conditionDim: condition.shape[1])
        // diffusers' `image_cond`: the picture's latents, nearest 2x, times (0² + 1)^-½ = 1.
        let fixed: [String: DeviceTensor] = [
            UNet2DConditionModel.Name.encoderHiddenStates: try backend.upload(hidden),
            UNet2DConditionModel.Name.timestepCond: try backend.upload(condition),
            LatentUpscaleName.imageCondition: try backend.upload(pictureLatents),
        ]
        let total = euler.timesteps.count
        for i in 0..<total {
            // In float32, as diffusers computes from `scheduler.sigmas[i]`.
            let sigma = Float(euler.sigmas[i])
            let variance = sigma * sigma + 1
            var feeds = fixed
            feeds[DenoiserName.latents] = latents
            feeds[DenoiserName.inputScale] = try backend.upload(Tensor(shape: [1], floats: [1 / variance.squareRoot()]))
            feeds[LatentUpscaleName.skip] = try backend.upload(Tensor(shape: [1], floats: [1 / variance]))
            feeds[LatentUpscaleName.out] = try backend.upload(Tensor(shape: [1], floats: [sigma / variance.squareRoot()]))
            let time = Float(Libm.log(Double(sigma))) * 0.25
            feeds[UNet2DConditionModel.Name.timestep] = try backend.upload(Tensor(shape: [rowCount], floats: Array(repeating: time, count: rowCount)))
            let denoised = try denoiser.run(feeds)[DenoiserName.noisePred]!
            latents = try euler.step(modelOutput: denoised, stepIndex: i, sample: latents, algebra: algebra,
                                     noise: { try self.backend.upload(try generator.randn(latentShape)) }).prevSample
            try report(GenerationProgress(phase: .denoising, step: i + 1, totalSteps: total, timestep: euler.timesteps[i],
                                          elapsed: now() - t0, latents: latents))
        }
        return try finishGeneration(latents, r, timings: timings, denoisingSince: t0, steps: total, report: report) { try self.decode($0) }
    }

    /// One evaluation of the preconditioned K-UNet as a graph: rows [negative, prompt] under
    /// guidance, combined as diffusers does after the preconditioning.
    func latentUpscaleDenoiser(count n: Int, latentHeight h: Int, latentWidth w: Int, guidance: Double?,
                               sequenceLength: Int, contextDim: Int, conditionDim: Int) throws -> Executable {
        let c = components
        let key = "latent upscaler|\(n)|\(h)x\(w)|\(guidance.map { "\($0)" } ?? "none")|\(sequenceLength)x\(contextDim)"
        return try executable(key, weights: denoiserWeights, options: compileOptions) {
            let b = GraphBuilder()
            let copies = guidance == nil ? 1 : 2, rows = copies * n
            let channels = c.vae.model.latentChannels
            let latents = b.input(DenoiserName.latents, shape: [n, channels, h, w])
            let x = copies == 1 ? latents : Value.concat([latents, latents], axis: 0)
            let picture = b.input(LatentUpscaleName.imageCondition, shape: [n, channels, h / 2, w / 2]).upsampleNearest2x()
            let sample = Value.concat([x * b.input(DenoiserName.inputScale, shape: [1]),
                                       copies == 1 ? picture : Value.concat([picture, picture], axis: 0)], axis: 1)
            let inputs = UNet2DConditionModel.Inputs(
                sample: sample,
                timestep: b.input(UNet2DConditionModel.Name.timestep, shape: [rows]),
                encoderHiddenStates: b.input(UNet2DConditionModel.Name.encoderHiddenStates, shape: [rows, sequenceLength, contextDim]),
                timestepCond: b.input(UNet2DConditionModel.Name.timestepCond, shape: [rows, conditionDim]))
            // The last output channel is a variance the pipeline drops.
            let f = c.unet(Params(b), inputs).slice(axis: 1, start: 0, length: channels)
            var denoised = x * b.input(LatentUpscaleName.skip, shape: [1]) + f * b.input(LatentUpscaleName.out, shape: [1])
            if let g = guidance {
                let uncond = denoised.slice(axis: 0, start: 0, length: n), text = denoised.slice(axis: 0, start: n, length: n)
                denoised = (text - uncond).affine(scale: Float(g)) + uncond
            }
            b.output(DenoiserName.noisePred, denoised)
            return try b.finish()
        }
    }
}
