import DiffuseCore
import DiffuseGraph
import DiffuseModels
import DiffuseSchedulers
import DiffuseTokenizer

/// How a pipeline runs on its backend.
public struct PipelineOptions: Sendable {
    /// Precision of the text encoders and the UNet (and of the VAE unless it must be upcast).
    public var precision: Precision = .float32
    public var attention: AttentionImplementation = .fused
    /// Backend switches passed to every compile (e.g. "baseline", "cuda-graphs").
    public var flags: Set<String> = []
    /// Storage type of weights when it differs from the precision (16-bit weights, widened on
    /// the fly: half the weight memory).
    public var weightStorage: DType?
    /// Decode one image of a batch at a time (diffusers' `enable_vae_slicing`).
    public var vaeSlicing = false
    /// Decode large images in overlapping tiles of this many pixels (diffusers'
    /// `enable_vae_tiling`; its default tile is the VAE's `sample_size`), bounding memory by
    /// the tile size. nil: one pass.
    public var vaeTile: Int?
    /// diffusers' `fuse_qkv_projections`: one matrix product for q, k and v.
    public var fuseQKV = false
    /// Dynamic int8 (or fp8 on GPUs that have it) for the large linears, as diffusers' recipe.
    public var quantization: Quantization = .none
    /// Dynamic int8 for the UNet's convolutions as well (CPU only; `GraphPasses.quantizeConvolutions`):
    /// faster than int8 linears alone, with more error, so a separate switch.
    public var quantizeConvolutions = false
    /// Keep only the component in use prepared (diffusers' `enable_model_cpu_offload` idea on
    /// one device): the text encoders are released after encoding, the VAE encoder after image
    /// encoding, the UNet after denoising, the VAE after decoding. Peak memory becomes the
    /// largest component's; a later generation prepares the components again.
    public var releaseComponentsAfterUse = false
    /// diffusers' `enable_sequential_cpu_offload` (backend flag "sequential-offload"): on CUDA
    /// weights stay in page-locked host memory and stream in layer by layer; on the CPU the
    /// prepared weights live in a file and each step maps in only its own from the page cache
    /// (`SpillFile`). The compiled graphs are released after use as well, so the device holds
    /// one component's activations and a few layers' weights. Slower: every step streams every
    /// weight.
    public var sequentialOffload: Bool {
        get { flags.contains("sequential-offload") }
        set {
            if newValue { flags.insert("sequential-offload"); releaseComponentsAfterUse = true } else { flags.remove("sequential-offload") }
        }
    }

    public init(precision: Precision = .float32, attention: AttentionImplementation = .fused, flags: Set<String> = [],
                vaeSlicing: Bool = false, vaeTile: Int? = nil) {
        self.precision = precision
        self.attention = attention
        self.flags = flags
        self.vaeSlicing = vaeSlicing
        self.vaeTile = vaeTile
    }
}

/// diffusers' `StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline`,
/// `StableDiffusionInpaintPipeline` and their XL counterparts in one: text to image, image to
/// image when the request has an initial image, inpainting when it also has a mask. Each stage
/// follows diffusers' order of operations (and of random draws), so the same weights and seed
/// give the same image.
///
/// The denoising loop keeps everything on the backend: the UNet, the classifier-free guidance
/// combination and its rescale are one compiled graph, and the scheduler update is one
/// `linearCombination` with host-computed coefficients, so a GPU never waits for the host
/// inside the loop (stochastic samplers upload their noise, drawn on the host for seed parity).
public final class StableDiffusionPipeline {
    public let components: StableDiffusionComponents
    public let backend: Backend
    public var options: PipelineOptions
    private var executables: [String: Executable] = [:]
    /// The denoiser graph's weights: the UNet's (with IP-Adapters' attention weights under its
    /// module paths), and ControlNets' beside them under `controlnet.<k>.`.
    lazy var denoiserWeights: ModelWeights = {
        let c = components
        if c.controlNets.isEmpty && c.ipAdapters.isEmpty { return c.unetWeights }
        return ModelWeights(PrefixedTensorSources([("", c.unetWeights.source)] + c.ipAdapterAttentionWeights.map { ("", $0) }
                                                  + c.controlNets.enumerated().map { ("controlnet.\($0).", $1.weights.source) }))
    }()

    public init(components: StableDiffusionComponents, backend: Backend, options: PipelineOptions = PipelineOptions()) {
        self.components = components
        self.backend = backend
        self.options = options
    }

    var compileOptions: CompileOptions {
        CompileOptions(precision: options.precision, weightStorage: options.weightStorage, attention: options.attention,
                       flags: options.flags)
    }

    /// The text encoders' options: under TF32 they stay in exact float32. They are under 1% of
    /// a generation's work, and TF32's 10-bit products would put ~1e-3 error into every prompt
    /// embedding, which guidance then amplifies in the latents.
    var textEncoderCompileOptions: CompileOptions {
        var o = compileOptions
        if o.precision == .tf32 { o.precision = .float32 }
        return o
    }

    /// The VAE's options: float32 when diffusers would upcast it (`force_upcast` in fp16).
    var vaeCompileOptions: CompileOptions {
        var o = compileOptions
        if options.precision == .float16 && components.vae.model.forceUpcast { o.precision = .float32 }
        return o
    }

    /// A compiled graph, built once per key (component and shape), after the graph passes the
    /// options ask for.
    func executable(_ key: String, weights: ModelWeights?, options: CompileOptions, _ build: () throws -> Graph) throws -> Executable {
        let fullKey = "\(key)|\(options.precision)|\(options.attention)|\(options.flags.sorted())|\(options.weightStorage.map { "\($0)" } ?? "-")|\(self.options.fuseQKV)|\(self.options.quantization)|\(self.options.quantizeConvolutions)"
        if let e = executables[fullKey] { return e }
        var graph = try build()
        if self.options.fuseQKV { graph = GraphPasses.fuseQKVProjections(graph) }
        if self.options.quantization != .none { graph = GraphPasses.quantizeLinears(graph, as: self.options.quantization) }
        if self.options.quantizeConvolutions && (weights === components.unetWeights || weights === denoiserWeights) {
            graph = GraphPasses.quantizeConvolutions(graph)
        }
        let e = try backend.compile(graph, weights: weights, options: options)
        executables[fullKey] = e
        return e
    }

    /// Drops compiled graphs (their arenas), e.g. before switching to another size.
    public func releaseCompiledGraphs() { executables.removeAll() }

    /// Drops the compiled graphs whose key starts with `prefix` and the prepared (converted,
    /// reordered) forms of `weights`, when components are released after use.
    func release(_ prefix: String, _ weights: [ModelWeights?]) {
        guard options.releaseComponentsAfterUse else { return }
        executables = executables.filter { !$0.key.hasPrefix(prefix) }
        // Streamed weights stay prepared (host memory on CUDA, the spill file on the CPU):
        // dropping them would only redo the conversion.
        if !options.sequentialOffload { for w in weights { w?.clearPrepared() } }
        returnFreedMemory()
    }

    // MARK: - Generation

    /// The request's torch generator: a CUDA one draws on this pipeline's GPU when it has one.
    public func makeGenerator(_ r: GenerationRequest) -> RandomSource {
        switch r.generator {
        case .cpu:
            return TorchCPUGenerator(seed: r.seed)
        case .cuda:
            if let gpu = backend as? TorchCUDANormalDevice { return TorchCUDAGenerator(seed: r.seed, device: gpu) }
            Log.info("torch.Generator(\"cuda\") emulated on the host for an H100's 132 SMs (within 1.5e-6 of the GPU's values, not bit-exact)")
            return TorchCUDAGenerator(seed: r.seed)
        }
    }

    /// `generator`: continue this one instead of seeding one from the request (diffusers scripts
    /// that pass one generator to two pipelines, as its latent upscaler's example does).
    public func generate(_ request: GenerationRequest, generator given: RandomSource? = nil,
                         progress: ((GenerationProgress) -> Bool)? = nil) throws -> GenerationResult {
        var r = request
        var timings: [(String, Double)] = []
        func report(_ p: GenerationProgress) throws {
            if let progress, !progress(p) { throw GenerationCancelled() }
        }
        try validate(r)
        if components.isLatentUpscaler { return try generateLatentUpscale(r, generator: given, report: report) }
        let c = components
        let factor = c.vae.model.spatialScaleFactor
        let (width, height) = try imageSize(r)
        let (h, w) = (height / factor, width / factor)
        let n = r.count
        let latentShape = [n, c.vae.model.latentChannels, h, w]
        let cfg = doesClassifierFreeGuidance(r)
        let pag = r.pag.flatMap { $0.isEnabled ? $0 : nil }
        let imageGuidance = c.isInstructPix2Pix && cfg ? r.imageGuidanceScale ?? GenerationRequest.defaultImageGuidanceScale : nil
        // Every per-row input beyond encodePrompt's [negative, prompt] rows: InstructPix2Pix's
        // passes are [negative without the picture, negative with it, prompt with it], so the
        // negative rows come twice; PAG's perturbed pass takes the prompt's rows once more at the
        // end (diffusers' `_prepare_perturbed_attention_guidance`).
        func withExtraPasses(_ t: Tensor) -> Tensor {
            var t = t
            if imageGuidance != nil { t = concatenate([t.slice(0..<n).copy(), t], axis: 0) }
            if pag != nil { t = concatenate([t, t.slice((t.shape[0] - n)..<t.shape[0]).copy()], axis: 0) }
            return t
        }
        let maskRegion = try self.maskRegion(r, width: width, height: height)
        let estimateDepth = c.isDepthToImage && r.depthMap == nil
        let depthStart = now()
        let depthMask = try (estimateDepth ? estimatedDepth(r.initImage!) : r.depthMap)
            .map { try DepthToImage.depthMask($0, latentHeight: h, latentWidth: w, count: n) }
        if estimateDepth {
            release("depth_estimator", [c.depthEstimator?.weights])
            timings.append(("estimate depth", now() - depthStart))
        }

        var t0 = now()
        try report(GenerationProgress(phase: .encodingPrompt, step: 0, totalSteps: r.customSchedule?.stepCount ?? r.steps,
                                      timestep: 0, elapsed: 0, latents: nil))
        var embeddings = try c.isImageVariation ? imageVariationEmbeddings(r.initImage!, count: n, guidance: cfg)
            : r.promptWeighting ? encodeWeightedPrompt(r, count: n, guidance: cfg)
            : encodePrompt(r.prompt, negative: r.negativePrompt, prompt2: r.prompt2, negative2: r.negativePrompt2,
                           count: n, guidance: cfg, clipSkip: r.clipSkip)
        embeddings = PromptEmbeddings(hidden: withExtraPasses(embeddings.hidden), pooled: embeddings.pooled.map(withExtraPasses))
        release("text_encoder", c.textEncoders.map(\.component.weights))
        timings.append(("encode prompt", now() - t0))
        if !r.ipAdapters.isEmpty { t0 = now() }
        let ipTokens = try ipAdapterTokens(r, count: n, guidance: cfg).map(withExtraPasses)
        if !r.ipAdapters.isEmpty { timings.append(("encode IP-Adapter images", now() - t0)) }
        t0 = now()
        let adapterStates = try t2iAdapterStates(r, width: width, height: height, rows: cfg ? 2 * n : n)
        if !r.t2iAdapters.isEmpty { timings.append(("T2I-Adapter", now() - t0)) }

        let scheduler = try makeScheduler(r)
        if let custom = r.customSchedule {
            // diffusers' `retrieve_timesteps`: the step count becomes the schedule's length
            // (Heun's and DPM2's interleaved one included), which strength then cuts.
            try scheduler.setTimesteps(custom)
            r.steps = scheduler.timesteps.count
        } else {
            try scheduler.setTimesteps(r.steps)
        }
        // diffusers' `prepare_extra_step_kwargs`: eta goes to the schedulers whose step takes it.
        if let ddim = scheduler as? DDIMScheduler { ddim.eta = r.eta }
        if let tcd = scheduler as? TCDScheduler { tcd.eta = r.eta }
        let algebra = BackendAlgebra(backend)
        let generator = given ?? makeGenerator(r)
        // Stable unCLIP noises the picture's embedding with the generator's first draw.
        let unCLIPLabels = try c.isStableUnCLIP
            ? unCLIPClassLabels(r.initImage!, count: n, guidance: cfg, level: r.noiseLevel ?? 0, generator: generator) : nil

        // Initial latents: noise (text to image), the encoded image with noise added (image to
        // image), or either with the mask's inputs (inpainting).
        var begin = 0
        var latents: DeviceTensor
        var inpainting: Inpainting?
        var pictureLatents: Tensor?
        if c.isInstructPix2Pix, let picture = r.initImage {
            // diffusers' InstructPix2Pix `prepare_image_latents`: the picture's latent mode, not
            // scaled (but for CosXL Edit), beside the noise at every step (which starts as in text to image).
            t0 = now()
            let pixels = try VaeImageProcessor.preprocess([picture], height: height, width: width, vaeScaleFactor: factor)
            pictureLatents = repeatRows(try c.isCosXLEdit ? encodePixels(pixels, .mode) : encodeLatents(pixels, .mode), n)
            release("vae.encoder", [])
            timings.append(("encode image", now() - t0))
        }
        var lowResImage: Tensor?
        if c.isUpscaler, let picture = r.initImage, let config = c.lowResSchedulerConfig {
            // diffusers' upscale pipeline: the picture in [-1, 1] at the latents' size (bicubic to
            // a multiple of the VAE's factor), noised to the noise level by the low-resolution
            // scheduler (`add_noise`), with the first draw; the latents come after, as from text.
            let pixels = try VaeImageProcessor.preprocess([picture], height: h, width: w, vaeScaleFactor: factor, resample: .bicubic)
            let noise = try generator.randn(pixels.shape)
            let cumulative = Float(try Schedulers.make(config: config).alphasCumprod[r.noiseLevel ?? GenerationRequest.defaultNoiseLevel])
            let (a, b) = (cumulative.squareRoot(), (1 - cumulative).squareRoot())
            let noised = Tensor(zeros: pixels.shape)
            for i in 0..<noised.count { noised.floats[i] = a * pixels.floats[i] + b * noise.floats[i] }
            lowResImage = repeatRows(noised, n)
        }
        if (r.initImage != nil || r.imageLatents != nil) && !c.isInstructPix2Pix && !c.isUpscaler && !c.takesPictureAsEmbedding {
            t0 = now()
            let strength = self.strength(r)
            if let start = r.denoisingStart {
                begin = try Self.beginIndex(denoisingStart: start, scheduler: scheduler)
            } else {
                // diffusers' `get_timesteps`: strength s skips the first (1 − s) of the schedule.
                let initTimestep = min(Int(Double(r.steps) * strength), r.steps)
                let tStart = max(r.steps - initTimestep, 0)
                begin = tStart * scheduler.order
                guard begin < scheduler.timesteps.count else {
                    throw PipelineError("strength \(strength) with \(r.steps) steps leaves no denoising step; raise --strength or --steps")
                }
            }
            scheduler.setBeginIndex(begin)
            if var mask = r.maskImage, let image = r.initImage {
                var image = image
                if let region = maskRegion {
                    // `preprocess(crops_coords=..., resize_mode="fill")` of the image and the mask.
                    image = VaeImageProcessor.resizedAndFilled(image.cropped(region), width: width, height: height)
                    mask = VaeImageProcessor.resizedAndFilled(mask.cropped(region), width: width, height: height)
                }
                let prepared = try prepareInpainting(r, image: image, mask: mask, strength: strength, width: width, height: height,
                                                     latentShape: latentShape, scheduler: scheduler, begin: begin,
                                                     generator: generator, algebra: algebra)
                latents = prepared.latents
                inpainting = prepared.inpainting
            } else {
                let encoded = try r.imageLatents.map { try imageLatentRows($0, latentShape) }
                    ?? repeatRows(try encodeImage(r.initImage!, width: width, height: height, generator: generator,
                                                  statistics: try latentStatistics(r, encoding: true)), n)
                if r.denoisingStart != nil {
                    latents = try backend.upload(encoded)   // diffusers' add_noise=False
                } else {
                    let noise = try generator.randn(latentShape)
                    latents = try scheduler.addNoise(original: try backend.upload(encoded), noise: try backend.upload(noise),
                                                     stepIndex: begin, algebra: algebra)
                }
            }
            release("vae.encoder", [])
            timings.append(("encode image", now() - t0))
        } else {
            latents = try initialNoise(r, latentShape, scheduler: scheduler, generator: generator, algebra: algebra)
        }

        // Every draw diffusers makes before its first step is made; a scheduler with noise of its
        // own (DPM++ SDE's Brownian path) takes its seed from the generator here, as diffusers'
        // does from torch's default generator at the first step.
        try scheduler.prepareNoise(generator: generator)

        // The denoising loop.
        t0 = now()
        let denoiser = try denoiserExecutable(count: n, latentHeight: h, latentWidth: w, guidance: cfg ? r.guidanceScale : nil,
                                              imageGuidance: imageGuidance, rescale: cfg ? r.guidanceRescale : 0, embeddings: embeddings,
                                              controlGuessMode: r.controlNetGuessMode || c.controlNets.first?.model.config.globalPoolConditions == true,
                                              controlModes: r.controlNets.compactMap(\.controlMode),
                                              ipAdapters: zip(ipTokens, r.ipAdapters).map { ($0.shape[1], $1.scale, $1.masks?.count) },
                                              adapterStates: adapterStates.map { Array($0.shape.dropFirst()) }, freeU: r.freeU,
                                              perturbed: pag.map { PerturbedAttention(appliedLayers: $0.appliedLayers, perturbedRows: n) })
        let rows = embeddings.hidden.shape[0]
        var fixed: [String: DeviceTensor] = [UNet2DConditionModel.Name.encoderHiddenStates: try backend.upload(embeddings.hidden)]
        if c.unet.usesTextTimeConditioning {
            fixed[UNet2DConditionModel.Name.textEmbeds] = try backend.upload(embeddings.pooled!)
            fixed[UNet2DConditionModel.Name.timeIds] = try backend.upload(
                withExtraPasses(timeIds(r, width: width, height: height, count: n, guidance: cfg)))
        }
        if let dim = c.unet.config.timeCondProjDim {
            fixed[UNet2DConditionModel.Name.timestepCond] = try backend.upload(
                guidanceScaleEmbedding(r.guidanceScale - 1, dim: dim, rows: rows))
        }
        // An adapter at scale 0 in every layer is skipped, as in diffusers: its tokens are no input.
        let denoiserInputs = Set(denoiser.graph.inputs.map(\.name))
        for (k, tokens) in ipTokens.enumerated() where denoiserInputs.contains(DenoiserName.ipHiddenStates(k)) {
            fixed[DenoiserName.ipHiddenStates(k)] = try backend.upload(tokens)
        }
        for (k, guidance) in r.ipAdapters.enumerated() {
            guard let masks = guidance.masks else { continue }
            let planes = try VaeImageProcessor.preprocessMask(masks, height: height, width: width, vaeScaleFactor: factor)
            for i in masks.indices {
                let plane = Array(UnsafeBufferPointer(start: planes.floats + i * height * width, count: height * width))
                for name in denoiserInputs {
                    guard let queries = DenoiserName.ipMaskQueries(name, adapter: k, image: i) else { continue }
                    fixed[name] = try backend.upload(IPAdapterMaskDownsample.weights(plane, height: height, width: width, queries: queries))
                }
            }
        }
        for (k, net) in c.controlNets.enumerated() {
            guard let union = net.model.config.union,
                  let input = denoiser.graph.inputs.first(where: { $0.name == DenoiserName.controlType(k) }) else { continue }
            let rowsSeen = denoiser.graph[input.value].shape[0]
            // diffusers' `control_type`: 1 at each of its images' modes, the same for every row;
            // one union ControlNet takes every image, several (MultiControlNetUnionModel) one each.
            var row = [Float](repeating: 0, count: union.numControlType)
            for g in c.controlNets.count == 1 ? r.controlNets : [r.controlNets[k]] { if let mode = g.controlMode { row[mode] = 1 } }
            fixed[DenoiserName.controlType(k)] = try backend.upload(Tensor(shape: [rowsSeen, union.numControlType],
                                                                           floats: Array(repeatElement(row, count: rowsSeen).joined())))
        }
        for (k, guidance) in r.controlNets.enumerated() {
            // diffusers' `prepare_image`: resized to the output size (cut and filled as the
            // image when inpainting only the masked area), [0, 1], one row per image.
            var controlImage = guidance.image
            if let region = maskRegion {
                controlImage = VaeImageProcessor.resizedAndFilled(controlImage.cropped(region), width: width, height: height)
            }
            let pixels = try VaeImageProcessor.preprocess([controlImage], height: height, width: width, vaeScaleFactor: factor,
                                                          doNormalize: false)
            fixed[DenoiserName.controlImage(k)] = try backend.upload(repeatRows(pixels, n))
        }
        if let pictureLatents { fixed[DenoiserName.imageLatents] = try backend.upload(pictureLatents) }
        if let depthMask { fixed[DenoiserName.depthMask] = try backend.upload(depthMask) }
        if let unCLIPLabels { fixed[UNet2DConditionModel.Name.classLabels] = try backend.upload(unCLIPLabels) }
        if let lowResImage {
            fixed[DenoiserName.lowResImage] = try backend.upload(lowResImage)
            let level = Int32(r.noiseLevel ?? GenerationRequest.defaultNoiseLevel)
            fixed[UNet2DConditionModel.Name.classLabels] = try backend.upload(Tensor(shape: [rows], dtype: .int32,
                                                                                      values: Array(repeating: level, count: rows)))
        }
        var blend: ((DeviceTensor, Int?) throws -> DeviceTensor)?
        if let inpainting {
            if let masked = inpainting.maskedImageLatents {
                fixed[DenoiserName.mask] = try backend.upload(inpainting.mask)
                fixed[DenoiserName.maskedImageLatents] = try backend.upload(masked)
            }
            if let kept = inpainting.kept {
                blend = try blendStep(kept, mask: inpainting.mask, latentShape: latentShape, scheduler: scheduler)
            }
        }
        let end = try r.denoisingEnd.map { try Self.endIndex(denoisingEnd: $0, scheduler: scheduler, begin: begin) }
            ?? scheduler.timesteps.count
        let total = end - begin
        // The adapters' features for the first evaluations, then zeros (adding them changes nothing).
        let adapted = t2iAdaptedEvaluations(r, total: total)
        let adapterFeeds = try adapterStates.map { try backend.upload($0) }
        let adapterZeros = adapted < total ? try adapterStates.map { try backend.upload(Tensor(zeros: $0.shape)) } : []
        for i in begin..<end {
            let t = scheduler.timesteps[i]
            var feeds = fixed
            feeds[DenoiserName.latents] = latents
            feeds[DenoiserName.inputScale] = try backend.upload(Tensor(shape: [1], floats: [Float(try scheduler.modelInputScale(stepIndex: i))]))
            feeds[UNet2DConditionModel.Name.timestep] = try backend.upload(Tensor(shape: [rows], floats: Array(repeating: Float(t), count: rows)))
            for (k, guidance) in r.controlNets.enumerated() {
                let scale = guidance.conditioningScale * guidance.keep(step: i - begin, of: total)
                feeds[DenoiserName.controlScale(k)] = try backend.upload(Tensor(shape: [1], floats: [Float(scale)]))
            }
            if let pag { feeds[DenoiserName.pagScale] = try backend.upload(Tensor(shape: [1], floats: [pag.scale(atTimestep: t)])) }
            // A feature the UNet leaves unused (no mid block, or a mid block of another shape) is no input.
            for (k, state) in (i - begin < adapted ? adapterFeeds : adapterZeros).enumerated()
            where denoiserInputs.contains(DenoiserName.adapterState(k)) {
                feeds[DenoiserName.adapterState(k)] = state
            }
            let noisePred = try denoiser.run(feeds)[DenoiserName.noisePred]!
            latents = try scheduler.step(modelOutput: noisePred, stepIndex: i, sample: latents, algebra: algebra,
                                         noise: { try self.backend.upload(try generator.randn(latentShape)) }).prevSample
            if let blend { latents = try blend(latents, i + 1 < end ? i + 1 : nil) }
            try report(GenerationProgress(phase: .denoising, step: i - begin + 1, totalSteps: total, timestep: t, elapsed: now() - t0,
                                          latents: latents))
        }
        let statistics = try latentStatistics(r, encoding: false)
        // Inpainting only the masked area pastes the result into the picture after the safety checker, as diffusers does.
        let overlay: ([Image]) -> [Image] = { images in
            guard let region = maskRegion, let image = r.initImage, let mask = r.maskImage else { return images }
            return images.map { VaeImageProcessor.applyOverlay(mask: mask, initImage: image, image: $0, region: region) }
        }
        return try finishGeneration(latents, r, timings: timings, denoisingSince: t0, steps: total, report: report, overlay: overlay) {
            try self.decode($0, statistics: statistics)
        }
    }

    /// The end of a denoising loop: the latents to the host, the denoiser released, then, unless
    /// only latents were asked for, `decode`d, the VAE released, the images checked by the
    /// model's safety checker, if it has one, and then `overlay`ed.
    func finishGeneration(_ latents: DeviceTensor, _ r: GenerationRequest, timings: [(String, Double)], denoisingSince t0: Double,
                          steps total: Int, report: (GenerationProgress) throws -> Void, overlay: ([Image]) -> [Image] = { $0 },
                          decode: (Tensor) throws -> [Image]) throws -> GenerationResult {
        var timings = timings
        let finalLatents = try latents.toHost()
        release("denoiser", [components.unetWeights, denoiserWeights])
        timings.append(("denoise", now() - t0))
        guard r.decode else { return GenerationResult(images: [], latents: finalLatents, timings: timings, denoisingSteps: total) }
        let start = now()
        try report(GenerationProgress(phase: .decoding, step: total, totalSteps: total, timestep: 0, elapsed: 0, latents: nil))
        var images = try decode(finalLatents)
        release("vae", [components.vae.weights])
        timings.append(("decode", now() - start))
        var flags: [Bool]?
        if components.safetyChecker != nil {
            let checkStart = now()
            (images, flags) = try runSafetyChecker(images)
            timings.append(("safety checker", now() - checkStart))
        }
        images = overlay(images)
        return GenerationResult(images: images, latents: finalLatents, timings: timings, denoisingSteps: total, nsfwContentDetected: flags)
    }

    /// The request's scheduler (or the model's own) from the model's config, with the request's
    /// `schedulerOverrides` on top of everything (diffusers' `Cls.from_config(config, **overrides)`).
    /// An override the class does not read with that config is an error naming the keys it reads.
    func makeScheduler(_ r: GenerationRequest) throws -> Scheduler {
        let base = components.schedulerConfig
        let scheduler: Scheduler, config: SchedulerConfig
        if let name = try r.scheduler.map(SchedulerName.init(parsing:)) {
            config = base.overriding(name.overrides).overriding(r.schedulerOverrides)
            scheduler = try Schedulers.make(className: name.className, config: config)
        } else {
            config = base.overriding(r.schedulerOverrides)
            scheduler = try Schedulers.make(config: config)
        }
        let read = config.readKeys.all
        if let unread = r.schedulerOverrides.keys.sorted().first(where: { !read.contains($0) }) {
            throw PipelineError("scheduler config \(unread): \(scheduler.className) does not read it with this configuration "
                                + "(it reads \(read.sorted().joined(separator: ", ")))")
        }
        return scheduler
    }

    /// The starting latents from noise: the request's own latents, or a draw of `shape`, times the
    /// scheduler's `init_noise_sigma` (diffusers' `prepare_latents`).
    func initialNoise(_ r: GenerationRequest, _ shape: [Int], scheduler: Scheduler, generator: RandomSource,
                      algebra: LatentAlgebra) throws -> DeviceTensor {
        let initial: Tensor
        if let given = r.latents {
            guard given.shape == shape else { throw PipelineError("latents have shape \(given.shape); this request needs \(shape)") }
            initial = given.converted(to: .float32)
        } else {
            initial = try generator.randn(shape)
        }
        return try algebra.combine([(scheduler.initNoiseSigma, try backend.upload(initial))])
    }

    /// Only the final latents, without decoding (diffusers' `output_type="latent"`).
    public func generateLatents(_ r: GenerationRequest, generator: RandomSource? = nil,
                                progress: ((GenerationProgress) -> Bool)? = nil) throws -> Tensor {
        var request = r
        request.decode = false
        return try generate(request, generator: generator, progress: progress).latents
    }

    func validate(_ r: GenerationRequest) throws {
        guard r.steps >= 1 || r.customSchedule != nil else { throw PipelineError("steps must be at least 1 (got \(r.steps))") }
        guard r.count >= 1 else { throw PipelineError("count must be at least 1 (got \(r.count))") }
        guard r.guidanceScale.isFinite else { throw PipelineError("guidance scale must be a number") }
        guard r.eta >= 0 && r.eta <= 1 else { throw PipelineError("eta must be in [0, 1] (got \(r.eta))") }
        guard r.guidanceRescale >= 0 && r.guidanceRescale <= 1 else {
            throw PipelineError("guidance rescale must be in [0, 1] (got \(r.guidanceRescale))")
        }
        if components.isLatentUpscaler {
            return try validateLatentUpscale(r)
        } else if components.takesPictureAsEmbedding {
            try validatePictureAsEmbedding(r)
        } else if components.isInstructPix2Pix || components.isUpscaler || components.isDepthToImage {
            try validatePictureConditioned(r)
        } else if r.depthMap != nil {
            throw PipelineError("a depth map is for depth-to-image models; \(components.name)'s UNet takes no depth beside its latents")
        } else if r.imageGuidanceScale != nil {
            throw PipelineError("image guidance scale is for InstructPix2Pix models; \(components.name)'s UNet takes no picture beside its latents")
        }
        if r.noiseLevel != nil && !components.isUpscaler && !components.isStableUnCLIP {
            throw PipelineError("noise level is for the x4 upscaler and Stable unCLIP; \(components.name) is neither")
        }
        if r.initImage != nil || r.imageLatents != nil {
            let strength = self.strength(r)
            guard strength > 0 && strength <= 1 else { throw PipelineError("strength must be in (0, 1] (got \(strength))") }
        }
        if r.maskImage != nil && r.initImage == nil {
            throw PipelineError("a mask needs the image it masks: give the starting image too")
        }
        for (name, f) in [("denoising start", r.denoisingStart), ("denoising end", r.denoisingEnd)] {
            if let f, !(f > 0 && f < 1) { throw PipelineError("\(name) must be a fraction in (0, 1) (got \(f))") }
        }
        if let start = r.denoisingStart, let end = r.denoisingEnd, start >= end {
            throw PipelineError("denoising start \(start) must come before denoising end \(end)")
        }
        if r.denoisingStart != nil && r.initImage == nil && r.imageLatents == nil {
            throw PipelineError("denoising start continues an image: give the image or the latents to continue from")
        }
        if r.denoisingStart != nil && r.maskImage != nil {
            throw PipelineError("denoising start is for image to image here; inpainting starts from strength")
        }
        if r.imageLatents != nil {
            guard r.initImage == nil else { throw PipelineError("give a starting image or image latents, not both") }
            guard r.maskImage == nil else { throw PipelineError("inpainting needs the image itself, not its latents") }
        }
        if let union = components.controlNets.first(where: { $0.model.config.union != nil }) {
            try validateUnionControlNet(union, r)
        } else if let mode = r.controlNets.first(where: { $0.controlMode != nil })?.controlMode {
            throw PipelineError("control mode \(mode) is for a union ControlNet (ControlNetUnionModel); "
                                + (components.controlNets.isEmpty ? "there is no ControlNet" : "this one is a plain ControlNetModel"))
        } else if r.controlNets.count != components.controlNets.count {
            throw PipelineError(components.controlNets.isEmpty ? "control images need a ControlNet"
                                : "\(components.controlNets.count) ControlNet\(components.controlNets.count == 1 ? "" : "s") need one control image each (got \(r.controlNets.count))")
        }
        if !components.controlNets.isEmpty {
            for c in components.controlNets { try components.checkControlNet(c) }
            guard r.imageLatents == nil && r.denoisingStart == nil else {
                throw PipelineError("a ControlNet starts from text, a picture or a picture and a mask here, not from latents")
            }
            for guidance in r.controlNets {
                if r.paddingMaskCrop != nil, let image = r.initImage, guidance.image.width != image.width || guidance.image.height != image.height {
                    throw PipelineError("a control image is \(guidance.image.width)x\(guidance.image.height) but the image is \(image.width)x\(image.height): "
                                        + "inpainting only the masked area crops both at the same place, so they must be the same size")
                }
                guard guidance.guidanceStart >= 0 && guidance.guidanceStart < guidance.guidanceEnd && guidance.guidanceEnd <= 1 else {
                    throw PipelineError("control guidance start and end must satisfy 0 ≤ start < end ≤ 1 (got \(guidance.guidanceStart), \(guidance.guidanceEnd))")
                }
                guard guidance.conditioningScale.isFinite else { throw PipelineError("ControlNet conditioning scale must be a number") }
            }
        }
        if r.t2iAdapters.count != components.t2iAdapters.count {
            throw PipelineError(components.t2iAdapters.isEmpty ? "T2I-Adapter images need a T2I-Adapter"
                                : components.t2iAdapters.count == 1 ? "the T2I-Adapter needs one image (got \(r.t2iAdapters.count))"
                                : "\(components.t2iAdapters.count) T2I-Adapters need one image each (got \(r.t2iAdapters.count))")
        }
        if !components.t2iAdapters.isEmpty {
            try components.checkT2IAdapters(components.t2iAdapters)
            guard r.initImage == nil && r.imageLatents == nil else {
                throw PipelineError("a T2I-Adapter works from text, as diffusers' adapter pipelines do: give no starting image or latents")
            }
            guard components.controlNets.isEmpty else {
                throw PipelineError("a T2I-Adapter and a ControlNet together have no diffusers pipeline: use one or the other")
            }
            guard r.t2iAdapters.allSatisfy({ $0.conditioningScale.isFinite }) else {
                throw PipelineError("T2I-Adapter conditioning scale must be a number")
            }
            guard r.adapterConditioningFactor >= 0 && r.adapterConditioningFactor <= 1 else {
                throw PipelineError("adapter conditioning factor must be in [0, 1] (got \(r.adapterConditioningFactor))")
            }
        }
        if r.ipAdapters.count != components.ipAdapters.count {
            throw PipelineError(components.ipAdapters.isEmpty ? "IP-Adapter images need an IP-Adapter"
                                : "\(components.ipAdapters.count) IP-Adapter\(components.ipAdapters.count == 1 ? "" : "s") need images of their own (got images for \(r.ipAdapters.count))")
        }
        for (k, g) in r.ipAdapters.enumerated() {
            guard !g.images.isEmpty else { throw PipelineError("IP-Adapter \(k + 1) has no image") }
            if let masks = g.masks, masks.count != g.images.count {
                throw PipelineError("IP-Adapter \(k + 1) has \(g.images.count) picture\(g.images.count == 1 ? "" : "s") but \(masks.count) "
                                    + "mask\(masks.count == 1 ? "" : "s"): give one mask per picture")
            }
            guard g.scale.values.allSatisfy(\.isFinite) else { throw PipelineError("IP-Adapter \(k + 1)'s scale must be a number") }
            if case .perImage(let list) = g.scale {
                // diffusers multiplies each masked picture's output by its own scale; without
                // masks a list of scales fails there.
                guard g.masks != nil, list.count == g.images.count else {
                    throw PipelineError("IP-Adapter \(k + 1) has one scale per picture (\(list.count)); that takes one mask per picture "
                                        + "and as many scales as pictures (\(g.images.count))")
                }
            }
        }
        if components.hasInpaintingUNet && r.maskImage == nil {
            throw PipelineError("\(components.name) is an inpainting model (its UNet takes \(components.unet.config.inChannels) "
                                + "input channels): give an image and a mask of what to repaint")
        }
        if let skip = r.clipSkip, skip < 0 { throw PipelineError("clip skip must be 0 or more (got \(skip))") }
        if r.promptWeighting { try validatePromptWeighting(r) }
        try validateMicroConditioning(r)
        if let pag = r.pag { try validatePerturbedAttentionGuidance(pag, r) }
        if let pad = r.paddingMaskCrop {
            guard let image = r.initImage, let mask = r.maskImage else {
                throw PipelineError("padding mask crop (inpainting only the masked area) needs an image and a mask")
            }
            guard pad >= 0 else { throw PipelineError("padding mask crop must be 0 or more pixels (got \(pad))") }
            guard mask.width == image.width && mask.height == image.height else {
                throw PipelineError("the mask is \(mask.width)x\(mask.height) but the image is \(image.width)x\(image.height): "
                                    + "inpainting only the masked area pastes the result back into the image, so they must be the same size")
            }
        }
    }

    /// diffusers' InstructPix2Pix, x4 upscale and depth-to-image pipelines take a picture and a
    /// prompt, and little else: what they have no argument for is refused by name.
    func validatePictureConditioned(_ r: GenerationRequest) throws {
        let c = components
        let depth = c.isDepthToImage
        let model = c.isUpscaler
            ? "\(c.name) is an x4 upscaler (its UNet takes the latents and a low-resolution picture)"
            : depth ? "\(c.name) is a depth-to-image model (its UNet takes the latents and the picture's depth)"
            : "\(c.name) is an InstructPix2Pix model (its UNet takes \(c.unet.config.inChannels) input channels: the latents and the picture's)"
        guard r.initImage != nil || r.imageLatents != nil else {
            throw PipelineError("\(model): give the picture to "
                                + (c.isUpscaler ? "upscale" : depth ? "change, and its depth map" : "edit, and say in the prompt what to change"))
        }
        if depth && r.depthMap == nil && (c.depthEstimator == nil || r.initImage == nil) {
            throw PipelineError("\(model): give the picture's depth map too (larger is nearer, as DPT or MiDaS estimate it)"
                                + (c.depthEstimator == nil ? "; the model has no depth_estimator to estimate it"
                                                           : "; its depth_estimator reads the picture, not image latents"))
        }
        if r.depthMap != nil && !depth {
            throw PipelineError("\(model), not a depth-to-image model: it takes no depth map")
        }
        if let scale = r.imageGuidanceScale, !scale.isFinite { throw PipelineError("image guidance scale must be a number") }
        if let level = r.noiseLevel, !(0...c.maxNoiseLevel).contains(level) {
            throw PipelineError("noise level must be in [0, \(c.maxNoiseLevel)] (the model's max_noise_level; got \(level))")
        }
        guard c.unet.config.timeCondProjDim == nil else {
            throw PipelineError("\(model) with a guidance embedding (time_cond_proj_dim), which diffusers' pipelines for it never pass")
        }
        let factor = c.vae.model.spatialScaleFactor
        var refused: [(Bool, String)] = [(!c.isInstructPix2Pix && r.imageGuidanceScale != nil, "image guidance scale"),
            (r.imageLatents != nil, "image latents (give the picture itself)"), (r.maskImage != nil, "mask"),
            (r.strength != nil && !depth, "strength (generation starts from noise, beside the picture)"),
            (r.denoisingStart != nil, "denoising start"), (r.customSchedule != nil, "custom timesteps or sigmas"),
            (r.clipSkip != nil && !c.isUpscaler && !depth, "clip skip"), (!c.controlNets.isEmpty || !r.controlNets.isEmpty, "ControlNet"),
            (!c.t2iAdapters.isEmpty, "T2I-Adapter"),
            ((c.isUpscaler || depth || c.isXL) && (!c.ipAdapters.isEmpty || !r.ipAdapters.isEmpty), "IP-Adapter"),
            (r.pag?.isEnabled == true, "perturbed-attention guidance"), (r.paddingMaskCrop != nil, "padding mask crop"),
        ]
        if c.isXL && depth {
            throw PipelineError("\(model) with SDXL's text encoders, which diffusers has no depth-to-image pipeline for")
        }
        if c.isXL {
            refused += [(r.negativeOriginalSize != nil || r.negativeTargetSize != nil || r.negativeCropsCoordsTopLeft != (0, 0),
                         "negative size or crop conditioning"),
                        (c.requiresAestheticsScore, "aesthetic score (this UNet's time ids end in one)")]
        } else {
            refused += [(r.width != nil || r.height != nil, c.isUpscaler
                            ? "size (the output is \(factor) times the picture's, rounded down to a multiple of \(factor))"
                            : "size (the output takes the picture's, rounded down to a multiple of \(factor))"),
                        (r.guidanceRescale != 0, "guidance rescale"), (r.denoisingEnd != nil, "denoising end")]
        }
        if let what = refused.first(where: \.0)?.1 {
            let pipeline = c.isUpscaler ? "StableDiffusionUpscalePipeline" : depth ? "StableDiffusionDepth2ImgPipeline"
                : c.isXL ? "StableDiffusionXLInstructPix2PixPipeline" : "StableDiffusionInstructPix2PixPipeline"
            throw PipelineError("\(model): diffusers' \(pipeline) takes no \(what)")
        }
    }

    /// diffusers' `StableDiffusionImageVariationPipeline` and `StableUnCLIPImg2ImgPipeline` take
    /// a picture (as its CLIP embedding), a size, the steps, guidance, eta and latents, unCLIP also
    /// a prompt and a noise level: what else a request has is refused by name.
    func validatePictureAsEmbedding(_ r: GenerationRequest) throws {
        let c = components, unCLIP = c.unCLIP
        let model = unCLIP == nil
            ? "\(c.name) is an image variation model (its UNet reads the picture's CLIP image embedding, not a prompt)"
            : "\(c.name) is a Stable unCLIP model (its UNet reads the picture's noised CLIP image embedding beside the prompt)"
        guard r.initImage != nil else { throw PipelineError("\(model): give the picture to make variations of") }
        if let unCLIP, let level = r.noiseLevel, !(0...unCLIP.maxNoiseLevel).contains(level) {
            throw PipelineError("noise level must be in [0, \(unCLIP.maxNoiseLevel)] (the image noising scheduler's steps; got \(level))")
        }
        var refused: [(Bool, String)] = unCLIP == nil
            ? [(!r.prompt.isEmpty || r.negativePrompt.map { !$0.isEmpty } == true, "prompt (the picture is the prompt: give an empty one)"),
               (r.noiseLevel != nil, "noise level"), (r.clipSkip != nil, "clip skip"), (r.promptWeighting, "prompt weighting")]
            : [(r.clipSkip != nil, "clip skip (it never passes it to its prompt encoding)")]
        refused += [
            (r.strength != nil, "strength (generation starts from noise)"), (r.maskImage != nil, "mask"),
            (r.imageLatents != nil, "image latents"), (r.depthMap != nil, "depth map"),
            (r.imageGuidanceScale != nil, "image guidance scale"), (r.guidanceRescale != 0, "guidance rescale"),
            (r.customSchedule != nil, "custom timesteps or sigmas"),
            (r.denoisingStart != nil || r.denoisingEnd != nil, "denoising start or end"),
            (!c.controlNets.isEmpty || !r.controlNets.isEmpty, "ControlNet"), (!c.t2iAdapters.isEmpty, "T2I-Adapter"),
            (!c.ipAdapters.isEmpty || !r.ipAdapters.isEmpty, "IP-Adapter"),
            (r.pag?.isEnabled == true, "perturbed-attention guidance"), (r.paddingMaskCrop != nil, "padding mask crop"),
        ]
        if let what = refused.first(where: \.0)?.1 {
            let pipeline = unCLIP == nil ? "StableDiffusionImageVariationPipeline" : "StableUnCLIPImg2ImgPipeline"
            throw PipelineError("\(model): diffusers' \(pipeline) takes no \(what)")
        }
        guard c.unet.config.timeCondProjDim == nil && !c.isXL && c.unet.config.inChannels == c.vae.model.latentChannels else {
            throw PipelineError("\(model), but not an SD 1.x/2.x UNet taking the latents alone without a guidance embedding")
        }
    }

    /// diffusers' `StableDiffusionXLControlNetUnion(Img2Img|Inpaint)Pipeline`: one union
    /// ControlNet with one or more images, each with a control mode below `num_control_type`;
    /// or several (`MultiControlNetUnionModel`), each with one image and its mode.
    func validateUnionControlNet(_ union: ControlNetComponent, _ r: GenerationRequest) throws {
        let c = components
        if c.controlNets.count > 1 {
            guard c.controlNets.allSatisfy({ $0.model.config.union != nil }) else {
                throw PipelineError("\(union.name) is a union ControlNet; diffusers' union pipelines take union ControlNets only "
                                    + "(MultiControlNetUnionModel), not plain ones beside it")
            }
            guard r.controlNets.count == c.controlNets.count else {
                throw PipelineError("several union ControlNets take one control image each, as diffusers' MultiControlNetUnionModel "
                                    + "(\(c.controlNets.count) ControlNets, \(r.controlNets.count) images)")
            }
        }
        guard c.isXL else { throw PipelineError("a union ControlNet runs in diffusers' SDXL union pipelines; \(c.name) is not SDXL") }
        guard !r.controlNets.isEmpty else { throw PipelineError("the union ControlNet \(union.name) needs at least one control image") }
        for (k, g) in r.controlNets.enumerated() {
            let net = c.controlNets.count > 1 ? c.controlNets[k] : union
            let types = net.model.config.union!.numControlType
            guard let mode = g.controlMode else {
                throw PipelineError("control image \(k + 1) needs a control mode for the union ControlNet \(net.name) "
                                    + "(0 to \(types - 1): the kind of image it is)")
            }
            guard (0..<types).contains(mode) else {
                throw PipelineError("control mode \(mode) of image \(k + 1) is not below the union ControlNet's num_control_type \(types)")
            }
        }
        if r.controlNetGuessMode && doesClassifierFreeGuidance(r) {
            throw PipelineError("a union ControlNet in guess mode under classifier-free guidance fails in diffusers (its control "
                                + "types do not fit the prompt's rows alone): turn one off")
        }
        if r.pag?.isEnabled == true {
            throw PipelineError("perturbed-attention guidance with a union ControlNet has no diffusers pipeline: use one or the other")
        }
    }

    func validatePerturbedAttentionGuidance(_ pag: PerturbedAttentionGuidance, _ r: GenerationRequest) throws {
        guard pag.scale.isFinite && pag.scale >= 0 else { throw PipelineError("PAG scale must be 0 or more (got \(pag.scale))") }
        guard pag.adaptiveScale.isFinite && pag.adaptiveScale >= 0 else {
            throw PipelineError("PAG adaptive scale must be 0 or more (got \(pag.adaptiveScale))")
        }
        guard pag.isEnabled else { return }
        let layers = components.unet.selfAttentionLayers
        let problems = PerturbedAttention.problems(pag.appliedLayers, selfAttentionPaths: layers)
        guard problems.isEmpty else {
            let names = layers.isEmpty ? "it has none" : "they are named like \(layers.first!) and \(layers.last!)"
            throw PipelineError("PAG layers: \(problems.joined(separator: "; ")) of \(components.name)'s UNet (\(names))")
        }
        guard components.t2iAdapters.isEmpty else {
            throw PipelineError("perturbed-attention guidance with a T2I-Adapter has no diffusers pipeline: use one or the other")
        }
        if doesClassifierFreeGuidance(guidanceScale: r.guidanceScale)
            && (r.controlNetGuessMode || components.controlNets.first?.model.config.globalPoolConditions == true) {
            throw PipelineError("ControlNet guess mode under classifier-free guidance cannot take perturbed-attention guidance "
                                + "(diffusers' PAG ControlNet pipelines fail on it): turn one off")
        }
    }

    /// The box of the image that inpainting only the masked area generates (diffusers'
    /// `get_crop_region`), nil without `paddingMaskCrop`.
    func maskRegion(_ r: GenerationRequest, width: Int, height: Int) throws -> CropRegion? {
        guard let pad = r.paddingMaskCrop, let mask = r.maskImage else { return nil }
        guard let region = VaeImageProcessor.cropRegion(mask: mask, width: width, height: height, padding: pad) else {
            throw PipelineError("the mask is all black: with padding mask crop there is nothing to repaint")
        }
        return region
    }

    /// `int(round(T − f·T))`: the timestep where a fraction f of the training schedule is done.
    static func cutoffTimestep(_ fraction: Double, _ scheduler: Scheduler) throws -> Double {
        guard !scheduler.alphasCumprod.isEmpty else {
            throw PipelineError("denoising start and end are fractions of a discrete training schedule, which \(scheduler.className) has not")
        }
        let trained = Double(scheduler.alphasCumprod.count)
        return (trained - fraction * trained).rounded(.toNearestOrEven)
    }

    /// diffusers' `get_timesteps(denoising_start=f)`: the steps below the cutoff (one more for a
    /// second-order scheduler, so a step is never split), counted from the end.
    static func beginIndex(denoisingStart f: Double, scheduler: Scheduler) throws -> Int {
        let cutoff = try cutoffTimestep(f, scheduler)
        var count = scheduler.timesteps.filter { $0 < cutoff }.count
        if scheduler.order == 2 && count % 2 == 0 { count += 1 }
        guard count > 0 && count <= scheduler.timesteps.count else {
            throw PipelineError("denoising start \(f) leaves no denoising step of \(scheduler.timesteps.count); lower it or raise --steps")
        }
        return scheduler.timesteps.count - count
    }

    /// diffusers' `denoising_end=f`: the loop keeps the steps at or above the cutoff; returns the
    /// index after the last.
    static func endIndex(denoisingEnd f: Double, scheduler: Scheduler, begin: Int) throws -> Int {
        let cutoff = try cutoffTimestep(f, scheduler)
        let count = scheduler.timesteps[begin...].filter { $0 >= cutoff }.count
        guard count > 0 else {
            throw PipelineError("denoising end \(f) leaves no denoising step; raise it or --steps")
        }
        return begin + count
    }

    /// Given image latents as rows of this batch: as they are, or one row repeated.
    func imageLatentRows(_ given: Tensor, _ latentShape: [Int]) throws -> Tensor {
        guard given.rank == 4, Array(given.shape.dropFirst()) == Array(latentShape.dropFirst()),
              given.shape[0] == latentShape[0] || given.shape[0] == 1 else {
            throw PipelineError("image latents have shape \(given.shape); this request needs \(latentShape) (or one row of it)")
        }
        return repeatRows(given.converted(to: .float32), latentShape[0] / given.shape[0])
    }

    /// The request's strength, else diffusers' default for its pipeline: 0.8 for image to image
    /// (0.3 for SDXL's, which is mostly the refiner's job, but 0.8 with a ControlNet), 1 for
    /// inpainting, 0.9999 for SDXL inpainting (whose pipeline never starts from pure noise
    /// unless asked to).
    public func strength(_ r: GenerationRequest) -> Double {
        r.strength ?? (r.maskImage == nil ? (components.isXL && components.controlNets.isEmpty ? 0.3 : 0.8)
                                          : components.isXL ? 0.9999 : 1)
    }

    /// The image size: the request's, else for image to image the initial image's (rounded down
    /// to a multiple of 8, as diffusers does), else the model's default (inpainting too, as in
    /// diffusers). Sizes must be multiples of 8.
    func imageSize(_ r: GenerationRequest) throws -> (Int, Int) {
        let factor = components.vae.model.spatialScaleFactor
        if components.isUpscaler, let image = r.initImage {
            // The latents take the picture's size (rounded down to a multiple of the factor); the
            // VAE then makes it `factor` times larger.
            let (w, h) = (image.width / factor * factor, image.height / factor * factor)
            guard w > 0 && h > 0 else { throw PipelineError("the picture (\(image.width)x\(image.height)) is smaller than \(factor) pixels on a side") }
            return (w * factor, h * factor)
        }
        var width = r.width, height = r.height
        if let given = r.imageLatents, given.rank == 4 {
            let (h, w) = (given.shape[2] * factor, given.shape[3] * factor)
            guard (width ?? w) == w && (height ?? h) == h else {
                throw PipelineError("image latents make \(w)x\(h) images; the request asks for \(width ?? w)x\(height ?? h)")
            }
            (width, height) = (w, h)
        }
        // diffusers' ControlNet inpainting pipelines (unlike the plain ones) default to the image's size.
        // SDXL's InstructPix2Pix takes the model's size and resizes the picture to it.
        // Image variation and Stable unCLIP take the model's size too: the picture is an embedding.
        if let image = r.initImage ?? r.controlNets.first?.image, r.maskImage == nil || !components.controlNets.isEmpty,
           !(components.isInstructPix2Pix && components.isXL) && !components.takesPictureAsEmbedding {
            let d = VaeImageProcessor.defaultHeightWidth(image, height: height, width: width, vaeScaleFactor: factor)
            width = width ?? d.width
            height = height ?? d.height
        }
        // diffusers' adapter pipelines: the first image's size, rounded down to the unshuffle factor.
        let adapterFactor = components.t2iAdapters.first?.model.downscaleFactor ?? 1
        if let image = r.t2iAdapters.first?.image {
            width = width ?? image.width / adapterFactor * adapterFactor
            height = height ?? image.height / adapterFactor * adapterFactor
        }
        let w = width ?? components.defaultImageSize.width, h = height ?? components.defaultImageSize.height
        guard w > 0 && h > 0 && w % factor == 0 && h % factor == 0 else {
            throw PipelineError("image size \(w)x\(h) is not a multiple of \(factor) on both sides")
        }
        guard w % adapterFactor == 0 && h % adapterFactor == 0 else {
            throw PipelineError("image size \(w)x\(h) is not a multiple of the T2I-Adapter's downscale factor \(adapterFactor) on both sides")
        }
        return (w, h)
    }

    // MARK: - Prompt encoding

    /// Prompt embeddings as the UNet takes them: rows [negative × count, positive × count] with
    /// guidance, else [positive × count]; SDXL also pools (text_embeds of its second encoder).
    public struct PromptEmbeddings {
        public var hidden: Tensor
        public var pooled: Tensor?
    }

    /// diffusers' `do_classifier_free_guidance`: only above 1, and never for a guidance-distilled
    /// (LCM) UNet, which takes the scale as an input instead.
    public func doesClassifierFreeGuidance(guidanceScale: Double) -> Bool {
        guidanceScale > 1 && components.unet.config.timeCondProjDim == nil
    }

    /// The request's guidance: InstructPix2Pix's also needs an image guidance of at least 1.
    public func doesClassifierFreeGuidance(_ r: GenerationRequest) -> Bool {
        guard components.isInstructPix2Pix else { return doesClassifierFreeGuidance(guidanceScale: r.guidanceScale) }
        return r.guidanceScale > 1 && (r.imageGuidanceScale ?? GenerationRequest.defaultImageGuidanceScale) >= 1
    }

    /// `prompt2` and `negative2` are SDXL's `prompt_2` and `negative_prompt_2`; other models
    /// have no second encoder to read them and refuse them.
    public func encodePrompt(_ prompt: String, negative: String?, prompt2: String? = nil, negative2: String? = nil,
                             count: Int, guidance: Bool, clipSkip: Int?) throws -> PromptEmbeddings {
        if components.isXL {
            return try encodePromptXL(prompt, negative: negative, prompt2: prompt2, negative2: negative2, count: count,
                                      guidance: guidance, clipSkip: clipSkip)
        }
        try refuseSecondPrompt(prompt2, negative2)
        return try encodePromptSD(prompt, negative: negative, count: count, guidance: guidance, clipSkip: clipSkip)
    }

    /// Python's `a or b` for diffusers' second prompts: nil and "" both fall back to `b`.
    static func given(_ a: String?, else b: String) -> String { a.flatMap { $0.isEmpty ? nil : $0 } ?? b }

    /// A second prompt is for SDXL's second text encoder; a model with one refuses it.
    func refuseSecondPrompt(_ prompt2: String?, _ negative2: String?) throws {
        guard prompt2 == nil && negative2 == nil else {
            throw PipelineError("a second prompt (prompt_2, negative_prompt_2) is for SDXL's second text encoder; \(components.name) has one text encoder")
        }
    }

    /// diffusers' image variation `_encode_image`: the CLIP image processor, the image encoder's
    /// `image_embeds` as one token per image made, after as many zero rows under guidance.
    func imageVariationEmbeddings(_ image: Image, count n: Int, guidance: Bool) throws -> PromptEmbeddings {
        let embeds = try modelImageEmbeds(components.imageVariationEncoder!, of: image)
        let hidden = rowsPerImage(embeds.reshaped([1, 1, embeds.shape[1]]), count: n, guidance: guidance)
        return PromptEmbeddings(hidden: hidden, pooled: nil)
    }

    /// The model's own CLIP image encoder (image variation's, Stable unCLIP's) on one picture:
    /// its `image_embeds` [1, D]; the compiled encoder is released after use.
    func modelImageEmbeds(_ encoder: ImageEncoderComponent, of image: Image) throws -> Tensor {
        let exe = try executable("model_image_encoder", weights: encoder.weights, options: textEncoderCompileOptions) {
            try encoder.model.graph(batch: 1, outputs: [.imageEmbeds])
        }
        let pixels = try backend.upload(encoder.processor.pixelValues(image))
        let embeds = try exe.run([CLIPVisionModelWithProjection.pixelValues: pixels])[CLIPVisionOutput.imageEmbeds.name]!
            .toHost().converted(to: .float32).copy()
        release("model_image_encoder", [encoder.weights])
        return embeds
    }

    /// One row per image made, after as many zero rows under guidance (the unconditional pass of
    /// the pipelines that condition on a picture's embedding).
    func rowsPerImage(_ row: Tensor, count n: Int, guidance: Bool) -> Tensor {
        let rows = repeatRows(row, n)
        return guidance ? concatenate([Tensor(zeros: rows.shape), rows], axis: 0) : rows
    }

    /// Runs one text encoder on `texts`, returning each requested output per text.
    func runTextEncoder(_ te: TextEncoderComponent, _ key: String, _ texts: [String], outputs: [CLIPTextOutput]) throws -> [CLIPTextOutput: Tensor] {
        try runTextEncoder(te, key, ids: texts.map { te.tokenizer($0).inputIds }, outputs: outputs)
    }

    /// Runs one text encoder on rows of token ids of one length.
    func runTextEncoder(_ te: TextEncoderComponent, _ key: String, ids: [[Int]], outputs: [CLIPTextOutput]) throws -> [CLIPTextOutput: Tensor] {
        let seq = ids[0].count
        let exe = try executable("\(key)|\(ids.count)|\(outputs.map(\.name))", weights: te.weights, options: textEncoderCompileOptions) {
            try te.encoder.graph(batch: ids.count, sequenceLength: seq, outputs: outputs)
        }
        var feeds: [String: DeviceTensor] = [CLIPTextModel.Name.inputIds: try backend.upload(te.encoder.inputIdsTensor(ids))]
        if outputs.contains(.pooledOutput) || outputs.contains(.textEmbeds) {
            feeds[CLIPTextModel.Name.eosIndices] = try backend.upload(te.encoder.eosIndices(inputIds: ids))
        }
        let out = try exe.run(feeds)
        var result: [CLIPTextOutput: Tensor] = [:]
        for o in outputs { result[o] = try out[o.name]!.toHost().converted(to: .float32) }
        return result
    }

    /// diffusers' `StableDiffusionPipeline.encode_prompt`: the prompt through `clip_skip`
    /// (hidden_states[-(k+1)] then the final layer norm), the negative prompt ("" when none)
    /// always from the last hidden state.
    func encodePromptSD(_ prompt: String, negative: String?, count: Int, guidance: Bool, clipSkip: Int?) throws -> PromptEmbeddings {
        guard let te = components.textEncoder else { throw PipelineError("\(components.name) has no text encoder") }
        let positiveOutput: CLIPTextOutput = clipSkip.map { .normalizedHiddenState(-($0 + 1)) } ?? .lastHiddenState
        var outputs: [CLIPTextOutput] = [positiveOutput]
        if guidance && positiveOutput != .lastHiddenState { outputs.append(.lastHiddenState) }
        let texts = guidance ? [negative ?? "", prompt] : [prompt]
        let out = try runTextEncoder(te, "text_encoder", texts, outputs: outputs)
        let positive = out[positiveOutput]!.slice((texts.count - 1)..<texts.count)
        var rows = Array(repeating: positive, count: count)
        if guidance {
            let negativeRow = out[.lastHiddenState]!.slice(0..<1)
            rows = Array(repeating: negativeRow, count: count) + rows
        }
        return PromptEmbeddings(hidden: concatenate(rows, axis: 0), pooled: nil)
    }

    /// diffusers' `StableDiffusionXLPipeline.encode_prompt`: both encoders' hidden_states[-2]
    /// (or [-(clip_skip + 2)] for the prompt) side by side (the second's alone for the refiner),
    /// the second encoder's text_embeds pooled; with no negative prompt and
    /// `force_zeros_for_empty_prompt`, zeros (whatever `negative2` says, as in diffusers).
    /// The second encoder reads `prompt2`/`negative2` where given and not empty; diffusers
    /// pairs the prompts with the encoders present in order, so a refiner's one encoder reads
    /// the first prompt.
    func encodePromptXL(_ prompt: String, negative: String?, prompt2: String?, negative2: String?,
                        count: Int, guidance: Bool, clipSkip: Int?) throws -> PromptEmbeddings {
        let te1 = components.textEncoder, te2 = components.textEncoder2!
        let positiveLayer: CLIPTextOutput = .hiddenState(-((clipSkip ?? 0) + 2))
        let zeroNegative = negative == nil && components.forceZerosForEmptyPrompt
        let encodeNegative = guidance && !zeroNegative
        let texts = encodeNegative ? [negative ?? "", prompt] : [prompt]
        let texts2 = te1 == nil ? texts
            : encodeNegative ? [Self.given(negative2, else: negative ?? ""), Self.given(prompt2, else: prompt)]
            : [Self.given(prompt2, else: prompt)]
        var outs1: [CLIPTextOutput] = [positiveLayer], outs2: [CLIPTextOutput] = [positiveLayer, .textEmbeds]
        if encodeNegative && positiveLayer != .penultimateHiddenState {
            outs1.append(.penultimateHiddenState)
            outs2.append(.penultimateHiddenState)
        }
        let o1 = try te1.map { try runTextEncoder($0, "text_encoder", texts, outputs: outs1) }
        let o2 = try runTextEncoder(te2, "text_encoder_2", texts2, outputs: outs2)
        let last = texts.count - 1
        /// A layer's rows `range` from each encoder present, side by side.
        func sideBySide(_ layer: CLIPTextOutput, _ range: Range<Int>) -> Tensor {
            concatenate([o1?[layer]!.slice(range), o2[layer]!.slice(range)].compactMap { $0 }, axis: 2)
        }
        let positive = sideBySide(positiveLayer, last..<(last + 1))
        let positivePooled = o2[.textEmbeds]!.slice(last..<(last + 1))
        var hidden = Array(repeating: positive, count: count)
        var pooled = Array(repeating: positivePooled, count: count)
        if guidance {
            let negativeHidden: Tensor, negativePooled: Tensor
            if zeroNegative {
                negativeHidden = Tensor(zeros: positive.shape)
                negativePooled = Tensor(zeros: positivePooled.shape)
            } else {
                negativeHidden = sideBySide(.penultimateHiddenState, 0..<1)
                negativePooled = o2[.textEmbeds]!.slice(0..<1)
            }
            hidden = Array(repeating: negativeHidden, count: count) + hidden
            pooled = Array(repeating: negativePooled, count: count) + pooled
        }
        return PromptEmbeddings(hidden: concatenate(hidden, axis: 0), pooled: concatenate(pooled, axis: 0))
    }

    /// SDXL's size and crop conditioning: only for UNets that take time ids, sizes positive and
    /// crops not negative.
    func validateMicroConditioning(_ r: GenerationRequest) throws {
        let sizes = [("original size", r.originalSize), ("target size", r.targetSize),
                     ("negative original size", r.negativeOriginalSize), ("negative target size", r.negativeTargetSize)]
        let crops = [("crop top-left", r.cropsCoordsTopLeft), ("negative crop top-left", r.negativeCropsCoordsTopLeft)]
        let given = sizes.filter { $0.1 != nil }.map(\.0) + crops.filter { $0.1 != (0, 0) }.map(\.0)
        if !components.unet.usesTextTimeConditioning, let first = given.first {
            throw PipelineError("\(first) is SDXL's micro-conditioning; \(components.name)'s UNet takes no time ids")
        }
        for (name, size) in sizes {
            if let size, size.height < 1 || size.width < 1 {
                throw PipelineError("\(name) must be positive (got \(size.width)x\(size.height))")
            }
        }
        for (name, crop) in crops where crop.top < 0 || crop.left < 0 {
            throw PipelineError("\(name) must be 0 or more (got top \(crop.top), left \(crop.left))")
        }
    }

    /// SDXL's `add_time_ids`: original size, crop top-left, then the target size, or with
    /// `requires_aesthetics_score` (the refiner) the aesthetic score. One row per UNet row; the
    /// negative rows (the first `count` under guidance) as each of diffusers' pipelines makes
    /// them (`GenerationRequest.negativeOriginalSize`).
    func timeIds(_ r: GenerationRequest, width: Int, height: Int, count: Int, guidance: Bool) -> Tensor {
        typealias Size = (height: Int, width: Int)
        let original = r.originalSize ?? (height, width), target = r.targetSize ?? (height, width)
        let aesthetic = components.requiresAestheticsScore
        func row(_ original: Size, _ crop: (top: Int, left: Int), _ target: Size, score: Double) -> [Float] {
            let tail = aesthetic ? [score] : [Double(target.height), Double(target.width)]
            return ([Double(original.height), Double(original.width), Double(crop.top), Double(crop.left)] + tail).map { Float($0) }
        }
        let positive = row(original, r.cropsCoordsTopLeft, target, score: r.aestheticScore)
        let negative: [Float]
        if !r.controlNets.isEmpty && r.maskImage != nil {
            // StableDiffusionXLControlNetInpaintPipeline: the positive sizes and crop.
            negative = row(original, r.cropsCoordsTopLeft, target, score: r.negativeAestheticScore)
        } else if r.initImage != nil || r.imageLatents != nil || aesthetic {
            // The image-to-image and inpainting pipelines' `_get_add_time_ids`.
            let (o, t) = (r.negativeOriginalSize ?? original, r.negativeTargetSize ?? target)
            negative = row(o, aesthetic ? r.negativeCropsCoordsTopLeft : r.cropsCoordsTopLeft, t, score: r.negativeAestheticScore)
        } else if let o = r.negativeOriginalSize, let t = r.negativeTargetSize {
            negative = row(o, r.negativeCropsCoordsTopLeft, t, score: r.negativeAestheticScore)
        } else {
            negative = positive
        }
        let rows = (guidance ? Array(repeating: negative, count: count) : []) + Array(repeating: positive, count: count)
        return Tensor(shape: [rows.count, components.timeIdCount], floats: Array(rows.joined()))
    }

    /// diffusers' `get_guidance_scale_embedding(w, embedding_dim)` for guidance-distilled UNets
    /// (`time_cond_proj_dim`), computed in float32 as torch does.
    func guidanceScaleEmbedding(_ w: Double, dim: Int, rows: Int) -> Tensor {
        let scaled = Float(w) * 1000
        let half = dim / 2
        let logScale = Float(Libm.log(10000)) / Float(half - 1)
        var row = [Float](repeating: 0, count: dim)
        for i in 0..<half {
            let freq = Float(Libm.exp(Double(Float(i) * -logScale)))
            let arg = scaled * freq
            row[i] = Float(Libm.sin(Double(arg)))
            row[half + i] = Float(Libm.cos(Double(arg)))
        }
        return Tensor(shape: [rows, dim], floats: Array((0..<rows).map { _ in row }.joined()))
    }

    // MARK: - Denoiser

    enum DenoiserName {
        static let latents = "latents"
        static let inputScale = "input_scale"
        static let noisePred = "noise_pred"
        /// An inpainting UNet's extra inputs, [count, 1, h, w] and [count, C, h, w].
        static let mask = "mask"
        static let maskedImageLatents = "masked_image_latents"
        /// A ControlNet's conditioning image [count, C, H, W] in [0, 1], and the scale of its
        /// residuals at this step [1] (0 outside the control guidance window).
        static func controlImage(_ k: Int) -> String { "control_image_\(k)" }
        static func controlScale(_ k: Int) -> String { "control_scale_\(k)" }
        /// Union ControlNet k's `control_type` [rows, num_control_type]: 1 at its images' modes.
        static func controlType(_ k: Int) -> String { k == 0 ? ControlNetModel.Name.controlType : "\(ControlNetModel.Name.controlType)_\(k)" }
        /// An IP-Adapter's image tokens [rows, tokens, cross_attention_dim].
        static func ipHiddenStates(_ k: Int) -> String { "ip_hidden_states_\(k)" }
        /// IP-Adapter k's mask of picture i at an attention layer of `queries` queries [1, queries, 1].
        static func ipMask(adapter k: Int, image i: Int, queries: Int) -> String { "ip_mask_\(k)_\(i)_\(queries)" }
        /// The query count of an `ipMask(adapter: k, image: i, ...)` input name; nil for other names.
        static func ipMaskQueries(_ name: String, adapter k: Int, image i: Int) -> Int? {
            let prefix = "ip_mask_\(k)_\(i)_"
            return name.hasPrefix(prefix) ? Int(name.dropFirst(prefix.count)) : nil
        }
        /// The T2I-Adapters' summed feature k [rows, C, h, w] (zeros past the conditioning factor).
        static func adapterState(_ k: Int) -> String { "adapter_state_\(k)" }
        /// Perturbed-attention guidance's scale at this step [1].
        static let pagScale = "pag_scale"
        /// The picture an InstructPix2Pix UNet edits, as latents [count, C, h, w].
        static let imageLatents = "image_latents"
        /// The x4 upscaler's noised low-resolution picture [count, 3, h, w] (at the latents' size).
        static let lowResImage = "low_res_image"
        /// A depth-to-image UNet's depth map [count, 1, h, w], in [-1, 1].
        static let depthMask = "depth_mask"
    }

    /// One denoising evaluation as a graph: scale the latents for the scheduler (an inpainting
    /// UNet takes the mask and the masked image's latents beside them, a depth-to-image UNet the
    /// depth map), duplicate them for the
    /// unconditional pass (and PAG's perturbed one), run the UNet, combine with the guidance
    /// scales, and (diffusers' `rescale_noise_cfg`) rescale toward the conditional prediction's
    /// standard deviation. The rows are [unconditional, prompt, perturbed prompt], each n long,
    /// the first only under classifier-free guidance and the last only with PAG. An
    /// InstructPix2Pix UNet takes the picture's latents beside the latents; under guidance its
    /// rows are [negative without the picture, negative with it, prompt with it], combined with
    /// the prompt's and the image's guidance scales.
    func denoiserExecutable(count n: Int, latentHeight h: Int, latentWidth w: Int, guidance: Double?, imageGuidance: Double? = nil,
                            rescale: Double,
                            embeddings: PromptEmbeddings, controlGuessMode: Bool = false, controlModes: [Int] = [],
                            ipAdapters: [(tokens: Int, scale: IPAdapterScale, maskedImages: Int?)] = [], adapterStates: [[Int]] = [],
                            freeU: FreeU? = nil, perturbed: PerturbedAttention? = nil) throws -> Executable {
        let c = components
        let (sequenceLength, contextDim) = (embeddings.hidden.shape[1], embeddings.hidden.shape[2])
        let pooledDim = embeddings.pooled?.shape[1] ?? 0
        let controlNets = c.controlNets.map(\.model)
        let key = "denoiser|\(n)|\(h)x\(w)|\(guidance.map { "\($0)" } ?? "none")|image \(imageGuidance.map { "\($0)" } ?? "none")"
            + "|\(rescale)|\(sequenceLength)x\(contextDim)"
            + "|controlnets \(controlNets.count)\(controlGuessMode ? " guess" : "") modes \(controlModes)"
            + "|ip-adapters \(ipAdapters.map { "\($0.tokens) \($0.scale) masks \($0.maskedImages.map(String.init) ?? "none")" })|t2i-adapter \(adapterStates)|freeu \(freeU.map { "\($0)" } ?? "off")"
            + "|pag \(perturbed.map { "\($0)" } ?? "off")"
        return try executable(key, weights: denoiserWeights, options: compileOptions) {
            let b = GraphBuilder()
            let copies = (guidance == nil ? 1 : imageGuidance == nil ? 2 : 3) + (perturbed == nil ? 0 : 1)
            let rows = copies * n
            let channels = c.vae.model.latentChannels
            let latents = b.input(DenoiserName.latents, shape: [n, channels, h, w])
            let scale = b.input(DenoiserName.inputScale, shape: [1])
            // The scaled latents, once per pass: what a ControlNet sees; an inpainting UNet also
            // takes the mask and the masked image's latents beside them.
            func rowsForGuidance(_ v: Value) -> Value { copies == 1 ? v : Value.concat(Array(repeating: v, count: copies), axis: 0) }
            let scaled = rowsForGuidance(latents * scale)
            var x = scaled
            if c.hasInpaintingUNet {
                x = Value.concat([scaled, rowsForGuidance(b.input(DenoiserName.mask, shape: [n, 1, h, w])),
                                  rowsForGuidance(b.input(DenoiserName.maskedImageLatents, shape: [n, channels, h, w]))], axis: 1)
            }
            if c.isUpscaler {
                x = Value.concat([scaled, rowsForGuidance(b.input(DenoiserName.lowResImage, shape: [n, 3, h, w]))], axis: 1)
            }
            if c.isDepthToImage {
                x = Value.concat([scaled, rowsForGuidance(b.input(DenoiserName.depthMask, shape: [n, 1, h, w]))], axis: 1)
            }
            if c.isInstructPix2Pix {
                // Under guidance the first pass sees no picture (diffusers' zeros).
                let picture = b.input(DenoiserName.imageLatents, shape: [n, channels, h, w])
                x = Value.concat([scaled, guidance == nil ? picture : Value.concat([picture.affine(scale: 0), picture, picture], axis: 0)],
                                 axis: 1)
            }
            let config = c.unet.config
            let inputs = UNet2DConditionModel.Inputs(
                sample: x,
                timestep: b.input(UNet2DConditionModel.Name.timestep, shape: [rows]),
                encoderHiddenStates: b.input(UNet2DConditionModel.Name.encoderHiddenStates,
                                             shape: [rows, sequenceLength, contextDim]),
                textEmbeds: c.unet.usesTextTimeConditioning
                    ? b.input(UNet2DConditionModel.Name.textEmbeds, shape: [rows, pooledDim])
                    : nil,
                timeIds: c.unet.usesTextTimeConditioning ? b.input(UNet2DConditionModel.Name.timeIds, shape: [rows, c.timeIdCount]) : nil,
                timestepCond: config.timeCondProjDim.map { b.input(UNet2DConditionModel.Name.timestepCond, shape: [rows, $0]) })
            var unetInputs = inputs
            unetInputs.classLabels = config.classLabelsInput(b, batch: rows)
            unetInputs.freeU = freeU
            unetInputs.perturbedAttention = perturbed   // the UNet's layers only, never a ControlNet's
            for (k, controlNet) in controlNets.enumerated() {
                // diffusers' ControlNet pipelines: the same latents, prompt and added conditioning,
                // the control image duplicated like the latents; its residuals times the step's
                // scale, several ControlNets' summed (MultiControlNetModel).
                // In guess mode (under guidance) the ControlNet sees only the prompt's rows, and
                // the unconditional rows get zero residuals.
                let factor = c.vae.model.spatialScaleFactor
                let guess = controlGuessMode && guidance != nil
                // One union ControlNet takes every control image (one per mode); several union
                // ControlNets (MultiControlNetUnionModel) or a plain one take their own.
                let mine = controlNet.config.union == nil || controlNets.count > 1 ? [k] : Array(controlModes.indices)
                let images = mine.map { j in
                    let image = b.input(DenoiserName.controlImage(j), shape: [n, controlNet.config.conditioningChannels, h * factor, w * factor])
                    return guess ? image : rowsForGuidance(image)
                }
                var controlInputs = inputs
                controlInputs.sample = scaled
                if guess {
                    func promptRows(_ v: Value) -> Value { v.slice(axis: 0, start: n, length: n) }
                    controlInputs.sample = promptRows(scaled)
                    controlInputs.timestep = promptRows(inputs.timestep)
                    controlInputs.encoderHiddenStates = promptRows(inputs.encoderHiddenStates)
                    controlInputs.textEmbeds = inputs.textEmbeds.map(promptRows)
                    controlInputs.timeIds = inputs.timeIds.map(promptRows)
                    controlInputs.timestepCond = inputs.timestepCond.map(promptRows)
                }
                var residuals: (down: [Value], mid: Value)
                if let union = controlNet.config.union {
                    let scales = mine.map { Optional(b.input(DenoiserName.controlScale($0), shape: [1])) }
                    let types = b.input(DenoiserName.controlType(k), shape: [controlInputs.sample.shape[0], union.numControlType])
                    residuals = controlNet.union(Params(b)["controlnet"][k], controlInputs, conditions: images, modes: mine.map { controlModes[$0] },
                                                 scales: scales, controlType: types, guessMode: controlGuessMode)
                } else {
                    residuals = controlNet(Params(b)["controlnet"][k], controlInputs, condition: images[0],
                                           scale: b.input(DenoiserName.controlScale(k), shape: [1]), guessMode: controlGuessMode)
                }
                if guess {
                    func withZeroRows(_ v: Value) -> Value { Value.concat([v.affine(scale: 0), v], axis: 0) }
                    residuals = (residuals.down.map(withZeroRows), withZeroRows(residuals.mid))
                }
                unetInputs.downBlockAdditionalResiduals = unetInputs.downBlockAdditionalResiduals.map { zip($0, residuals.down).map { $0 + $1 } }
                    ?? residuals.down
                unetInputs.midBlockAdditionalResidual = unetInputs.midBlockAdditionalResidual.map { $0 + residuals.mid } ?? residuals.mid
            }
            unetInputs.downIntrablockAdditionalResiduals = adapterStates.enumerated().map { k, shape in
                b.input(DenoiserName.adapterState(k), shape: [rows] + shape)
            }
            let maskInputs = GraphInputs(b)
            unetInputs.ipAdapters = ipAdapters.enumerated().map { k, a in
                IPAdapterTokens(tokens: b.input(DenoiserName.ipHiddenStates(k), shape: [rows, a.tokens, contextDim]), scale: a.scale,
                                masks: a.maskedImages.map { images in
                                    IPAdapterMasks(images: images) { i, queries in
                                        maskInputs[DenoiserName.ipMask(adapter: k, image: i, queries: queries), [1, queries, 1]]
                                    }
                                })
            }
            let predicted = c.unet(Params(b), unetInputs)
            var noise = predicted
            if guidance != nil || perturbed != nil {
                func pass(_ k: Int) -> Value { predicted.slice(axis: 0, start: k * n, length: n) }
                let text = pass(guidance == nil ? 0 : imageGuidance == nil ? 1 : 2)
                if let g = guidance, let ig = imageGuidance {
                    // InstructPix2Pix: toward the prompt from the picture, and toward the picture from neither.
                    let (uncond, image) = (pass(0), pass(1))
                    noise = uncond + (text - image).affine(scale: Float(g)) + (image - uncond).affine(scale: Float(ig))
                } else if let g = guidance {
                    let uncond = pass(0)
                    noise = (text - uncond).affine(scale: Float(g)) + uncond
                } else {
                    noise = text
                }
                if perturbed != nil {
                    noise = noise + (text - pass(copies - 1)) * b.input(DenoiserName.pagScale, shape: [1])
                }
                if rescale > 0 {
                    let ratio = Self.std(text) / Self.std(noise)
                    noise = (noise * ratio).affine(scale: Float(rescale)) + noise.affine(scale: Float(1 - rescale))
                }
            }
            b.output(DenoiserName.noisePred, noise)
            return try b.finish()
        }
    }

    /// torch.std over all but the batch axis (unbiased), keeping dims.
    static func std(_ x: Value) -> Value {
        let axes = Array(1..<x.rank)
        let n = axes.reduce(1) { $0 * x.shape[$1] }
        let centered = x - x.reduce(.mean, axes: axes)
        return (centered * centered).reduce(.sum, axes: axes).affine(scale: 1 / Float(n - 1)).unary(.sqrt)
    }

    // MARK: - VAE

    /// The VAE's `latents_mean` and `latents_std` where diffusers' pipeline for this request
    /// applies them: only the SDXL pipelines do, when decoding in text to image, image to image,
    /// inpainting and the ControlNet text and image-to-image ones, when encoding in image to
    /// image. nil when the VAE has none.
    func latentStatistics(_ r: GenerationRequest, encoding: Bool) throws -> (mean: [Float], std: [Float])? {
        guard components.isXL, let (mean, std) = components.vae.model.latentStatistics else { return nil }
        if encoding ? (r.maskImage != nil) : (!components.t2iAdapters.isEmpty || (!components.controlNets.isEmpty && r.maskImage != nil)) {
            return nil
        }
        let channels = components.vae.model.latentChannels
        guard mean.count == channels && std.count == channels else {
            throw PipelineError("the VAE's latents_mean (\(mean.count) values) and latents_std (\(std.count)) must have one value per latent channel (\(channels))")
        }
        return (mean.map { Float($0) }, std.map { Float($0) })
    }

    /// Latents to images: `vae.decode(latents / scaling_factor)` (with latent statistics,
    /// `latents · std / scaling_factor + mean`) then diffusers' postprocess. With VAE slicing,
    /// one image at a time.
    public func decode(_ latents: Tensor, statistics: (mean: [Float], std: [Float])? = nil) throws -> [Image] {
        let vae = components.vae
        let s = Float(vae.model.scalingFactor)
        let scaled = Tensor(zeros: latents.shape)
        let src = latents.converted(to: .float32)
        let plane = latents.shape.dropFirst(2).reduce(1, *), channels = latents.shape[1]
        for i in 0..<scaled.count {
            if let (mean, std) = statistics {
                let c = (i / plane) % channels
                scaled.floats[i] = src.floats[i] * std[c] / s + mean[c]
            } else {
                scaled.floats[i] = src.floats[i] / s
            }
        }
        let n = latents.shape[0]
        let perRun = options.vaeSlicing || options.vaeTile != nil ? 1 : n
        var images: [Image] = []
        for start in stride(from: 0, to: n, by: perRun) {
            let rows = min(perRun, n - start)
            let z = scaled.slice(start..<(start + rows)).copy()
            let factor = vae.model.spatialScaleFactor
            let sample: Tensor
            if let tile = options.vaeTile, z.shape[2] * factor > tile || z.shape[3] * factor > tile {
                guard tile % factor == 0, tile >= 2 * factor else {
                    throw PipelineError("VAE tile size \(tile) must be a multiple of \(factor), at least \(2 * factor)")
                }
                sample = try TiledDecoder(tileSize: tile, factor: factor).decode(z) { try self.decodeOnce($0) }
            } else {
                sample = try decodeOnce(z)
            }
            images += try VaeImageProcessor.postprocess(sample)
        }
        return images
    }

    /// `vae.decode` of already scaled latents in one pass.
    func decodeOnce(_ z: Tensor) throws -> Tensor {
        let vae = components.vae
        let (rows, h, w) = (z.shape[0], z.shape[2], z.shape[3])
        let exe = try executable("vae.decoder|\(rows)|\(h)x\(w)", weights: vae.weights, options: vaeCompileOptions) {
            try vae.model.decoderGraph(batch: rows, height: h, width: w)
        }
        let out = try exe.run([AutoencoderKL.Name.latents: try backend.upload(z)])
        return try out[AutoencoderKL.Name.sample]!.toHost().converted(to: .float32)
    }

    /// An image to scaled latents [1, C, h, w]: diffusers' preprocess, then `encodePixels`.
    func encodeImage(_ image: Image, width: Int, height: Int, generator: RandomSource,
                     statistics: (mean: [Float], std: [Float])? = nil) throws -> Tensor {
        let pixels = try VaeImageProcessor.preprocess([image], height: height, width: width,
                                                      vaeScaleFactor: components.vae.model.spatialScaleFactor)
        return try encodePixels(pixels, .sample(generator), statistics: statistics)
    }

    /// Preprocessed pixels [1, 3, H, W] to scaled latents [rows, C, h, w]: `encodeLatents` (a
    /// sample of the latent distribution, or its mode), times `scaling_factor` (diffusers'
    /// `_encode_vae_image`); with latent statistics `(latents − mean) · scaling_factor / std`.
    func encodePixels(_ pixels: Tensor, _ draw: LatentDraw, rows: Int = 1,
                      statistics: (mean: [Float], std: [Float])? = nil) throws -> Tensor {
        let vae = components.vae
        let latents = try encodeLatents(pixels, draw, rows: rows)
        let s = Float(vae.model.scalingFactor)
        let plane = latents.shape.dropFirst(2).reduce(1, *), channels = latents.shape[1]
        for i in 0..<latents.count {
            if let (mean, std) = statistics {
                let c = (i / plane) % channels
                latents.floats[i] = (latents.floats[i] - mean[c]) * s / std[c]
            } else {
                latents.floats[i] *= s
            }
        }
        return latents
    }

    /// How a latent is taken from the VAE's distribution (diffusers' `retrieve_latents`
    /// `sample_mode`): drawn from a generator, or its mode ("argmax", the mean).
    enum LatentDraw {
        case sample(RandomSource)
        case mode
    }

    /// Preprocessed pixels [1, 3, H, W] through `vae.encode` to latents [1, C, h, w] as the VAE
    /// gives them (unscaled); the tiny VAE's are the same either way.
    /// With `rows`, the picture stands for that many: the sample is drawn for all of them at once
    /// (diffusers encoding a list of the picture).
    func encodeLatents(_ pixels: Tensor, _ draw: LatentDraw, rows: Int = 1) throws -> Tensor {
        let vae = components.vae
        let (height, width) = (pixels.shape[2], pixels.shape[3])
        let exe = try executable("vae.encoder|1|\(height)x\(width)", weights: vae.weights, options: vaeCompileOptions) {
            try vae.model.encoderGraph(batch: 1, height: height, width: width)
        }
        let out = try exe.run([AutoencoderKL.Name.sample: try backend.upload(pixels)])
        if vae.isTiny { return repeatRows(try out[AutoencoderTiny.Name.latents]!.toHost().converted(to: .float32).copy(), rows) }
        let mean = try out[AutoencoderKL.Name.mean]!.toHost().converted(to: .float32)
        guard case .sample(let generator) = draw else { return repeatRows(mean.copy(), rows) }
        let logvar = try out[AutoencoderKL.Name.logvar]!.toHost().converted(to: .float32)
        let noise = try generator.randn([rows] + mean.shape.dropFirst())
        let std = (0..<logvar.count).map { Float(Libm.exp(Double(0.5 * logvar.floats[$0]))) }
        let latents = Tensor(zeros: noise.shape)
        for i in 0..<latents.count {
            let k = i % mean.count
            latents.floats[i] = mean.floats[k] + std[k] * noise.floats[i]
        }
        return latents
    }
}
