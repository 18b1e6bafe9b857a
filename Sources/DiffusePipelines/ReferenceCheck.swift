import DiffuseCore
import DiffuseGraph
import DiffuseModels
import DiffuseSchedulers

/// Runs a reference fixture set (the layout of `shared/reference`: `models/<variant>` and
/// `golden/<variant>/*.safetensors`) through the library on any backend and precision, and
/// reports each output's error against the golden. It is how parity is shown where the test
/// runner cannot go: on a GPU machine, in fp16/bf16 against goldens that diffusers computed on
/// the same GPU in the same precision.
public enum ReferenceCheck {
    /// What each kind of output must meet: errors are max |out − golden| / max(1, max |golden|).
    public struct Tolerances: Sendable {
        /// UNet noise predictions.
        public var unet: Float
        /// Text encoder and VAE outputs.
        public var models: Float
        /// End-to-end final latents; nil reports them without judging (16-bit runs are judged
        /// by their images: guidance multiplies every difference in the latents by its scale).
        public var e2eLatents: Float?
        /// End-to-end images: mean |difference| in 8-bit levels.
        public var meanLevels: Float

        public init(unet: Float, models: Float, e2eLatents: Float?, meanLevels: Float) {
            self.unet = unet
            self.models = models
            self.e2eLatents = e2eLatents
            self.meanLevels = meanLevels
        }

        /// The defaults for a backend and precision: the fixtures' bounds in float32 (1e-4 on
        /// the CPU, 1e-3 with GPU kernels' other reduction orders, and TF32); 2e-2 for UNet outputs
        /// in fp16/bf16 against diffusers in the same precision; bf16's other outputs twice
        /// that (it rounds to 8 bits of mantissa where fp16 keeps 11).
        public static func defaults(backend: String, precision: Precision) -> Tolerances {
            switch precision {
            case .float32: return backend == "cpu" ? Tolerances(unet: 1e-4, models: 1e-4, e2eLatents: 1e-3, meanLevels: 0.5)
                : Tolerances(unet: 1e-3, models: 1e-3, e2eLatents: 1e-3, meanLevels: 0.5)
            case .tf32: return Tolerances(unet: 1e-3, models: 1e-3, e2eLatents: 1e-3, meanLevels: 0.5)
            case .float16: return Tolerances(unet: 2e-2, models: 2e-2, e2eLatents: nil, meanLevels: 3)
            case .bfloat16: return Tolerances(unet: 2e-2, models: 4e-2, e2eLatents: nil, meanLevels: 4)
            }
        }
    }

    public struct Result: CustomStringConvertible {
        public var name: String
        public var maxError: Float
        /// max(1, max |golden|): errors are judged relative to it.
        public var scale: Float
        /// nil: reported, not judged.
        public var tolerance: Float?
        public var passed: Bool { tolerance.map { maxError.isFinite && maxError <= $0 * scale } ?? true }

        public var description: String {
            let rel = maxError / scale
            guard let tolerance else { return "info  \(name.padding(58))  rel err \(format(rel))" }
            return "\(passed ? "pass" : "FAIL")  \(name.padding(58))  rel err \(format(rel)) / tol \(format(tolerance))"
        }
    }

    static func format(_ x: Float) -> String {
        guard x.isFinite, x != 0 else { return x == 0 ? "0" : "\(x)" }
        var e = 0
        var m = x
        while m >= 10 { m /= 10; e += 1 }
        while m < 1 { m *= 10; e -= 1 }
        m = (m * 100).rounded() / 100
        if m >= 10 { m /= 10; e += 1 }
        return "\(m)e\(e)"
    }

    static func compare(_ name: String, _ got: Tensor, _ want: Tensor, tolerance: Float?) -> Result {
        let g = got.toFloatArray(), w = want.toFloatArray()
        guard g.count == w.count else { return Result(name: name + " (shape \(got.shape) vs \(want.shape))", maxError: .infinity, scale: 1, tolerance: tolerance) }
        var err: Float = 0, scale: Float = 1
        for i in w.indices {
            let d = abs(g[i] - w[i])
            err = d.isNaN ? .infinity : max(err, d)
            scale = max(scale, abs(w[i]))
        }
        return Result(name: name, maxError: err, scale: scale, tolerance: tolerance)
    }

    /// Checks every variant under `reference/golden` whose name contains `filter`.
    public static func run(reference: String, backend: Backend, options: PipelineOptions, tolerances: Tolerances,
                           filter: String? = nil, log: (String) -> Void) throws -> [Result] {
        let tolerance = tolerances.models
        var results: [Result] = []
        func record(_ r: Result) { results.append(r); log(r.description) }
        let golden = Files.join(reference, "golden")
        for variant in try Files.list(golden) where Files.isDirectory(Files.join(golden, variant)) {
            if let filter, !variant.contains(filter) { continue }
            let modelFolder = Files.join(reference, "models", variant)
            guard Files.exists(Files.join(modelFolder, "model_index.json")) else { continue }
            let components = try StableDiffusionComponents.load(folder: modelFolder)
            let pipeline = StableDiffusionPipeline(components: components, backend: backend, options: options)
            let compile = pipeline.compileOptions
            func file(_ name: String) -> SafeTensorsFile? { try? SafeTensorsFile(path: Files.join(golden, variant, name)) }

            try checkModels(components, pipeline: pipeline, golden: Files.join(golden, variant), label: variant,
                            backend: backend, tolerances: tolerances, record: record)

            // VAEs: decode and encode.
            var vaes: [(String, AutoencoderComponent)] = [("vae", components.vae)]
            let tinyFolder = Files.join(modelFolder, "vae_tiny")
            if Files.isDirectory(tinyFolder) { vaes.append(("vae_tiny", try StableDiffusionComponents.loadAutoencoder(tinyFolder))) }
            for (name, vae) in vaes {
                guard let g = file("\(name).safetensors") else { continue }
                var o = compile
                if options.precision == .float16 && vae.model.forceUpcast { o.precision = .float32 }

                let latents = try g.tensor("latents")
                let z = latents.copy()
                if !vae.isTiny {
                    let s = Float(vae.model.scalingFactor)
                    for i in 0..<z.count { z.floats[i] /= s }
                }
                let dec = try backend.compile(try vae.model.decoderGraph(batch: z.shape[0], height: z.shape[2], width: z.shape[3]),
                                              weights: vae.weights, options: o)
                let decoded = try dec.run([AutoencoderKL.Name.latents: try backend.upload(z)])[AutoencoderKL.Name.sample]!.toHost()
                record(compare("\(variant) \(name) decoded", decoded, try g.tensor("decoded"), tolerance: tolerance))
                let image = try g.tensor("image")
                let enc = try backend.compile(try vae.model.encoderGraph(batch: image.shape[0], height: image.shape[2], width: image.shape[3]),
                                              weights: vae.weights, options: o)
                let out = try enc.run([AutoencoderKL.Name.sample: try backend.upload(image)])
                if vae.isTiny {
                    record(compare("\(variant) \(name) encoded", try out[AutoencoderTiny.Name.latents]!.toHost(), try g.tensor("encoded"), tolerance: tolerance))
                } else {
                    record(compare("\(variant) \(name) encode mean", try out[AutoencoderKL.Name.mean]!.toHost(), try g.tensor("encode_mean"), tolerance: tolerance))
                    record(compare("\(variant) \(name) encode logvar", try out[AutoencoderKL.Name.logvar]!.toHost(), try g.tensor("encode_logvar"), tolerance: tolerance))
                }
            }

            // End to end: the stored initial latents through the whole pipeline.
            let prompts = try? Files.readJSON(Files.join(golden, variant, "prompts.json"))
            for name in try Files.list(Files.join(golden, variant)) where name.hasPrefix("e2e_") && name.hasSuffix(".safetensors") {
                guard let g = file(name), let prompt = prompts?["e2e_prompt"]?.string else { continue }
                let image = try g.tensor("image_uint8")
                var r = GenerationRequest(prompt: prompt)
                r.negativePrompt = prompts?["e2e_negative_prompt"]?.string
                r.steps = e2eSteps(reference)
                r.guidanceScale = e2eGuidance(reference)
                r.height = image.shape[1]
                r.width = image.shape[2]
                r.latents = try g.tensor("init_latents")
                r.scheduler = String(name.dropFirst(4).dropLast(12))
                try compareGeneration("\(variant) \(name)", try pipeline.generate(r), g, tolerances: tolerances).forEach(record)
            }

            results += try checkLoRAs(reference: reference, variant: variant, backend: backend, options: options,
                                      tolerances: tolerances, log: log)
            results += try checkTextualInversion(reference: reference, variant: variant, backend: backend, options: options,
                                                 tolerances: tolerances, log: log)
            results += try checkImageToImage(reference: reference, variant: variant, backend: backend, options: options,
                                             tolerances: tolerances, log: log)
            results += try checkControlNet(reference: reference, variant: variant, backend: backend, options: options,
                                           tolerances: tolerances, log: log)
            results += try checkIPAdapter(reference: reference, variant: variant, backend: backend, options: options,
                                          tolerances: tolerances, log: log)
            results += try checkT2IAdapter(reference: reference, variant: variant, backend: backend, options: options,
                                           tolerances: tolerances, log: log)
            results += try checkEDM(reference: reference, variant: variant, backend: backend, options: options,
                                    tolerances: tolerances, log: log)
            results += try checkSDXLConditioning(reference: reference, variant: variant, backend: backend, options: options,
                                                 tolerances: tolerances, log: log)
            results += try checkCustomSchedule(reference: reference, variant: variant, backend: backend, options: options,
                                               tolerances: tolerances, log: log)
            results += try checkFreeU(reference: reference, variant: variant, backend: backend, options: options,
                                      tolerances: tolerances, log: log)
            results += try checkPromptWeighting(reference: reference, variant: variant, backend: backend, options: options,
                                                tolerances: tolerances, log: log)
            results += try checkPAG(reference: reference, variant: variant, backend: backend, options: options,
                                    tolerances: tolerances, log: log)
            results += try checkSafetyChecker(reference: reference, variant: variant, backend: backend, options: options,
                                              tolerances: tolerances, log: log)
            results += try checkInstructPix2Pix(reference: reference, variant: variant, backend: backend, options: options,
                                                tolerances: tolerances, log: log)
            results += try checkUpscale(reference: reference, variant: variant, backend: backend, options: options,
                                        tolerances: tolerances, log: log)
            results += try checkLatentUpscale(reference: reference, variant: variant, backend: backend, options: options,
                                              tolerances: tolerances, log: log)
            results += try checkDepthToImage(reference: reference, variant: variant, backend: backend, options: options,
                                             tolerances: tolerances, log: log)
            results += try checkDepthEstimator(reference: reference, variant: variant, backend: backend, options: options,
                                               tolerances: tolerances, log: log)
            results += try checkImageVariation(reference: reference, variant: variant, backend: backend, options: options,
                                               tolerances: tolerances, log: log)
            results += try checkStableUnCLIP(reference: reference, variant: variant, backend: backend, options: options,
                                             tolerances: tolerances, log: log)
            results += try checkControlNetUnion(reference: reference, variant: variant, backend: backend, options: options,
                                                tolerances: tolerances, log: log)
        }
        return results
    }

    /// A golden case's request: diffusers' `__call__` arguments by their cases.json names
    /// ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2", "steps", "guidance",
    /// "seed", "count", "scheduler", "strength", "width", "height", "padding_mask_crop", "eta",
    /// "aesthetic_score", "negative_aesthetic_score", "timesteps" or "sigmas" (a custom
    /// schedule), "freeu" ([s1, s2, b1, b2]), "guidance_rescale", "pag_scale",
    /// "pag_adaptive_scale", "pag_applied_layers", "image_guidance_scale", "noise_level", "clip_skip", "denoising_end", and
    /// SDXL's sizes and crops as [height,
    /// width] and [top, left]: "original_size", "crops_coords_top_left", "target_size" and their
    /// "negative_" forms); absent keys keep the defaults.
    static func request(_ spec: JSON) -> GenerationRequest {
        var r = GenerationRequest(prompt: spec["prompt"]?.string ?? "")
        r.negativePrompt = spec["negative_prompt"]?.string
        (r.prompt2, r.negativePrompt2) = (spec["prompt_2"]?.string, spec["negative_prompt_2"]?.string)
        func pair(_ key: String) -> (Int, Int)? {
            guard let v = spec[key]?.array?.compactMap(\.int), v.count == 2 else { return nil }
            return (v[0], v[1])
        }
        r.originalSize = pair("original_size")
        r.targetSize = pair("target_size")
        r.negativeOriginalSize = pair("negative_original_size")
        r.negativeTargetSize = pair("negative_target_size")
        r.cropsCoordsTopLeft = pair("crops_coords_top_left") ?? r.cropsCoordsTopLeft
        r.negativeCropsCoordsTopLeft = pair("negative_crops_coords_top_left") ?? r.negativeCropsCoordsTopLeft
        r.aestheticScore = spec["aesthetic_score"]?.double ?? r.aestheticScore
        r.negativeAestheticScore = spec["negative_aesthetic_score"]?.double ?? r.negativeAestheticScore
        if let t = spec["timesteps"]?.array { r.customSchedule = .timesteps(t.compactMap(\.double)) }
        if let s = spec["sigmas"]?.array { r.customSchedule = .sigmas(s.compactMap(\.double)) }
        if let f = spec["freeu"]?.array?.compactMap(\.double), f.count == 4 { r.freeU = FreeU(s1: f[0], s2: f[1], b1: f[2], b2: f[3]) }
        if let scale = spec["pag_scale"]?.double {
            var pag = PerturbedAttentionGuidance(scale: scale, adaptiveScale: spec["pag_adaptive_scale"]?.double ?? 0)
            if let layers = spec["pag_applied_layers"]?.array { pag.appliedLayers = layers.compactMap(\.string) }
            r.pag = pag
        }
        r.guidanceRescale = spec["guidance_rescale"]?.double ?? r.guidanceRescale
        r.imageGuidanceScale = spec["image_guidance_scale"]?.double
        r.noiseLevel = spec["noise_level"]?.int
        r.clipSkip = spec["clip_skip"]?.int
        r.denoisingEnd = spec["denoising_end"]?.double
        r.steps = spec["steps"]?.int ?? r.steps
        r.guidanceScale = spec["guidance"]?.double ?? r.guidanceScale
        r.seed = UInt64(spec["seed"]?.int ?? 0)
        r.count = spec["count"]?.int ?? 1
        r.scheduler = spec["scheduler"]?.string
        r.strength = spec["strength"]?.double
        r.width = spec["width"]?.int
        r.height = spec["height"]?.int
        r.paddingMaskCrop = spec["padding_mask_crop"]?.int
        r.eta = spec["eta"]?.double ?? r.eta
        return r
    }

    /// A generation against a golden's `latents_out` and `image_uint8`.
    static func compareGeneration(_ label: String, _ result: GenerationResult, _ golden: SafeTensorsFile,
                                  tolerances: Tolerances) throws -> [Result] {
        [compare("\(label) latents_out", result.latents, try golden.tensor("latents_out"), tolerance: tolerances.e2eLatents),
         compareImages(label, result.images, try golden.tensor("image_uint8"), tolerances: tolerances)]
    }

    /// Images against a golden `image_uint8` [N, H, W, 3]: the mean |difference| in 8-bit levels.
    static func compareImages(_ label: String, _ images: [Image], _ golden: Tensor, tolerances: Tolerances) -> Result {
        guard !images.isEmpty, [images.count, images[0].height, images[0].width, images[0].channels] == golden.shape else {
            return Result(name: "\(label) image (shape differs from \(golden.shape))", maxError: .infinity, scale: 1, tolerance: tolerances.meanLevels)
        }
        let got = VaeImageProcessor.uint8Tensor(images).toFloatArray(), want = golden.toFloatArray()
        let mean = zip(got, want).reduce(Float(0)) { $0 + abs($1.0 - $1.1) } / Float(max(want.count, 1))
        return Result(name: "\(label) image (mean |Δ| in levels: \((mean * 100).rounded() / 100))",
                      maxError: mean, scale: 1, tolerance: tolerances.meanLevels)
    }

    /// The image-to-image and inpainting goldens of a variant (`golden/<variant>/image/`: the
    /// starting image and mask, `cases.json`, an inpainting model, and what diffusers' pipelines
    /// made of each case from one seed: final latents, images, and the preprocessed mask).
    public static func checkImageToImage(reference: String, variant: String, backend: Backend, options: PipelineOptions,
                                         tolerances: Tolerances, log: (String) -> Void) throws -> [Result] {
        let folder = Files.join(reference, "golden", variant, "image")
        guard Files.exists(Files.join(folder, "cases.json")) else { return [] }
        let image = try Image.load(Files.join(folder, "init.png"))
        var masks: [String: Image] = [:]
        func mask(_ file: String) throws -> Image {
            if let m = masks[file] { return m }
            let m = try Image.load(Files.join(folder, file))
            masks[file] = m
            return m
        }
        var pipelines: [String: StableDiffusionPipeline] = [:]
        func pipeline(_ model: String) throws -> StableDiffusionPipeline {
            if let p = pipelines[model] { return p }
            let path = model == "base" ? Files.join(reference, "models", variant) : Files.join(folder, "\(model)_model")
            let p = StableDiffusionPipeline(components: try StableDiffusionComponents.load(path), backend: backend, options: options)
            pipelines[model] = p
            return p
        }
        return try goldenCases(folder, log: log) { spec, name, request, g in
            var results: [Result] = []
            func record(_ r: Result) { results.append(r) }
            let label = "\(variant) image/\(name)"
            let inpaint = spec["pipeline"]?.string == "inpaint"
            var r = request
            r.initImage = image
            let maskImage = try mask(spec["mask"]?.string ?? "mask.png")
            if inpaint { r.maskImage = maskImage }
            let p = try pipeline(spec["model"]?.string ?? "base")
            if spec["pipeline"]?.string == "ensemble", let split = spec["denoising_split"]?.double {
                // The base from text, stopped at the split; the model from its latents.
                var first = r
                (first.initImage, first.denoisingEnd, first.decode) = (nil, split, false)
                let baseLatents = try pipeline("base").generate(first).latents
                record(compare("\(label) base_latents", baseLatents, try g.tensor("base_latents"), tolerance: tolerances.e2eLatents))
                (r.initImage, r.imageLatents, r.denoisingStart, r.width, r.height) = (nil, baseLatents, split, nil, nil)
            }
            let result = try p.generate(r)
            try compareGeneration(label, result, g, tolerances: tolerances).forEach(record)
            var region: CropRegion?
            if let pad = r.paddingMaskCrop, g.info("crop_region") != nil {
                let want = try g.tensor("crop_region").toFloatArray().map { Int($0) }
                let (w, h) = (result.latents.shape[3] * p.components.vae.model.spatialScaleFactor,
                              result.latents.shape[2] * p.components.vae.model.spatialScaleFactor)
                region = VaeImageProcessor.cropRegion(mask: maskImage, width: w, height: h, padding: pad)
                let got = region.map { [$0.left, $0.top, $0.right, $0.bottom] } ?? []
                record(Result(name: "\(label) crop_region \(got) (diffusers: \(want))", maxError: got == want ? 0 : 1, scale: 1, tolerance: 0))
            }
            if inpaint, g.info("mask_condition") != nil {
                let want = try g.tensor("mask_condition")
                let (h, w) = (want.shape[2], want.shape[3])
                let fitted = region.map { VaeImageProcessor.resizedAndFilled(maskImage.cropped($0), width: w, height: h) } ?? maskImage
                let got = try VaeImageProcessor.preprocessMask([fitted], height: h, width: w,
                                                               vaeScaleFactor: p.components.vae.model.spatialScaleFactor)
                record(compare("\(label) mask_condition", got, want, tolerance: 0))
            }
            return results
        }
    }

    /// The ControlNet goldens of a variant (`golden/<variant>/controlnet/`: the ControlNet, the
    /// conditioning image, `cases.json`, and what diffusers' ControlNet pipelines made of each
    /// case from one seed).
    public static func checkControlNet(reference: String, variant: String, backend: Backend, options: PipelineOptions,
                                       tolerances: Tolerances, log: (String) -> Void) throws -> [Result] {
        try checkControlNetCases("controlnet", reference: reference, variant: variant, backend: backend, options: options,
                                 tolerances: tolerances, log: log)
            + checkControlNetFiles(reference: reference, variant: variant, log: log)
    }

    /// The ControlNet of `golden/<variant>/controlnet/` in one file (made by
    /// scripts/fixtures/make_controlnet_file_reference.py): in lllyasviel's original layout and
    /// as a bare diffusers state dict, read with the model's UNet config, each must be the
    /// folder's ControlNet: the same parameters, every weight equal.
    public static func checkControlNetFiles(reference: String, variant: String, log: (String) -> Void) throws -> [Result] {
        let folder = Files.join(reference, "golden", variant, "controlnet")
        let files = ["controlnet_original.safetensors", "controlnet_diffusers.safetensors"].filter { Files.exists(Files.join(folder, $0)) }
        guard !files.isEmpty else { return [] }
        let unetConfig = try ModelSource.open(Files.join(reference, "models", variant)).component("unet").requireConfig()
        let want = try ControlNetComponent.load(Files.join(folder, "controlnet"))
        var results: [Result] = []
        for file in files {
            let got = try ControlNetComponent.loadFile(Files.join(folder, file), unetConfig: unetConfig)
            let name = "\(variant) controlnet/\(file)"
            guard got.model.parameters.map(\.name) == want.model.parameters.map(\.name),
                  got.model.parameters.map(\.shape) == want.model.parameters.map(\.shape) else {
                results.append(Result(name: name + " (parameters differ from the folder's)", maxError: .infinity, scale: 1, tolerance: 0))
                log(results.last!.description)
                continue
            }
            var worst: Float = 0
            for (p, _) in want.model.parameters {
                let a = try got.weights.source.tensor(p).toFloatArray(), b = try want.weights.source.tensor(p).toFloatArray()
                worst = max(worst, zip(a, b).map { abs($0 - $1) }.max() ?? 0)
            }
            results.append(Result(name: name + " weights", maxError: worst, scale: 1, tolerance: 0))
            log(results.last!.description)
        }
        return results
    }

    /// The union ControlNet goldens of a variant (`golden/<variant>/controlnet_union/`, made by
    /// scripts/fixtures/make_controlnet_union_reference.py): diffusers' SDXL union pipelines with
    /// one or several control images, each with its "control_modes" entry.
    public static func checkControlNetUnion(reference: String, variant: String, backend: Backend, options: PipelineOptions,
                                            tolerances: Tolerances, log: (String) -> Void) throws -> [Result] {
        try checkControlNetCases("controlnet_union", reference: reference, variant: variant, backend: backend, options: options,
                                 tolerances: tolerances, log: log)
    }

    static func checkControlNetCases(_ kind: String, reference: String, variant: String, backend: Backend, options: PipelineOptions,
                                     tolerances: Tolerances, log: (String) -> Void) throws -> [Result] {
        let folder = Files.join(reference, "golden", variant, kind)
        guard Files.exists(Files.join(folder, "cases.json")) else { return [] }
        let base = try StableDiffusionComponents.load(Files.join(reference, "models", variant))
        var pipelines: [String: StableDiffusionPipeline] = [:]
        func pipeline(_ names: [String], model: String?) throws -> StableDiffusionPipeline {
            let key = names.joined(separator: "+") + "|" + (model ?? "base")
            if let p = pipelines[key] { return p }
            // "inpaint": the inpainting model beside the image goldens.
            var components = model == "inpaint"
                ? try StableDiffusionComponents.load(Files.join(reference, "golden", variant, "image", "inpaint_model")) : base
            components.controlNets = try names.map { try ControlNetComponent.load(Files.join(folder, $0)) }
            let p = StableDiffusionPipeline(components: components, backend: backend, options: options)
            pipelines[key] = p
            return p
        }
        return try goldenCases(folder, log: log) { spec, name, request, g in
            var r = request
            if let start = spec["image"]?.string { r.initImage = try Image.load(Files.join(folder, start)) }
            if spec["pipeline"]?.string == "inpaint" { r.maskImage = try Image.load(Files.join(folder, "mask.png")) }
            r.controlNetGuessMode = spec["guess_mode"]?.bool ?? false
            // One ControlNet (controlnet/, control.png) unless the case lists several; a number
            // for the scale or a window bound applies to each.
            let names = spec["controlnets"]?.array?.compactMap(\.string) ?? ["controlnet"]
            let images = spec["control_images"]?.array?.compactMap(\.string) ?? ["control.png"]
            func value(_ key: String, _ k: Int, _ fallback: Double) -> Double {
                if let list = spec[key]?.array { return k < list.count ? list[k].double ?? fallback : fallback }
                return spec[key]?.double ?? fallback
            }
            let modes = spec["control_modes"]?.array?.compactMap(\.int)
            r.controlNets = try images.enumerated().map { k, file in
                ControlNetGuidance(image: try Image.load(Files.join(folder, file)), conditioningScale: value("scale", k, 1),
                                   guidanceStart: value("guidance_start", k, 0), guidanceEnd: value("guidance_end", k, 1),
                                   controlMode: modes.flatMap { k < $0.count ? $0[k] : nil })
            }
            let pipeline = try pipeline(names, model: spec["model"]?.string)
            return try compareGeneration("\(variant) \(kind)/\(name)", try pipeline.generate(r), g, tolerances: tolerances)
        }
    }

    /// The T2I-Adapter goldens of a variant (`golden/<variant>/t2i_adapter/`: adapters, their
    /// pictures, `cases.json`; what diffusers' preprocessing and each adapter made of its picture,
    /// and what its adapter pipelines made of each case from one seed).
    public static func checkT2IAdapter(reference: String, variant: String, backend: Backend, options: PipelineOptions,
                                       tolerances: Tolerances, log: (String) -> Void) throws -> [Result] {
        let folder = Files.join(reference, "golden", variant, "t2i_adapter")
        guard Files.exists(Files.join(folder, "cases.json")) else { return [] }
        var results: [Result] = []
        func record(_ r: Result) { results.append(r); log(r.description) }
        let spec = try Files.readJSON(Files.join(folder, "cases.json"))
        var adapters: [String: T2IAdapterComponent] = [:]
        func adapter(_ name: String) throws -> T2IAdapterComponent {
            if let a = adapters[name] { return a }
            let a = try T2IAdapterComponent.load(Files.join(folder, name))
            adapters[name] = a
            return a
        }
        // Each adapter alone: diffusers' preprocessing of its picture, then its features.
        let features = try SafeTensorsFile(path: Files.join(folder, "features.safetensors"))
        let compile = modelCompileOptions(options)
        for (name, picture) in spec["features"]?.members ?? [] {
            guard let picture = picture.string else { continue }
            let a = try adapter(name)
            let want = try features.tensor("\(name).input")
            let (h, w) = (want.shape[2], want.shape[3])
            let input = try a.input(try Image.load(Files.join(folder, picture)), width: w, height: h)
            record(compare("\(variant) t2i_adapter/\(name) input", input, want, tolerance: 0))
            let exe = try backend.compile(try a.model.graph(batch: 1, height: h, width: w), weights: a.weights, options: compile)
            let out = try exe.run([T2IAdapter.Name.image: try backend.upload(want)])
            for i in 0..<out.count {
                record(compare("\(variant) t2i_adapter/\(name) feature_\(i)", try out[T2IAdapter.Name.feature(i)]!.toHost(),
                               try features.tensor("\(name).feature_\(i)"), tolerance: tolerances.models))
            }
        }
        let base = try StableDiffusionComponents.load(Files.join(reference, "models", variant))
        return try results + goldenCases(folder, cases: spec, log: log) { spec, name, request, g in
            var r = request
            let names = spec["adapters"]?.array?.compactMap(\.string) ?? []
            let images = spec["images"]?.array?.compactMap(\.string) ?? []
            let scales = spec["scale"]?.array?.compactMap(\.double) ?? [spec["scale"]?.double ?? 1]
            r.t2iAdapters = try zip(images, scales).map { T2IAdapterGuidance(image: try Image.load(Files.join(folder, $0)), conditioningScale: $1) }
            r.adapterConditioningFactor = spec["conditioning_factor"]?.double ?? 1
            var components = base
            components.t2iAdapters = try names.map { try adapter($0) }
            let pipeline = StableDiffusionPipeline(components: components, backend: backend, options: options)
            return try compareGeneration("\(variant) t2i_adapter/\(name)", try pipeline.generate(r), g, tolerances: tolerances)
        }
    }

    /// The options a golden check compiles a model beside the UNet with (an adapter, an image
    /// encoder, a depth estimator): the run's, but exact float32 under TF32, as the pipeline
    /// runs its text encoders.
    static func modelCompileOptions(_ options: PipelineOptions) -> CompileOptions {
        var o = CompileOptions(precision: options.precision, attention: options.attention, flags: options.flags)
        if o.precision == .tf32 { o.precision = .float32 }
        return o
    }

    /// Runs each case of a golden folder's `cases.json` (`cases`, where the caller has read it
    /// already): `run` gets the spec, its name, its request (`request(_:)`) and its golden file,
    /// and returns the case's results, which are logged.
    static func goldenCases(_ folder: String, cases: JSON? = nil, log: (String) -> Void,
                            _ run: (_ spec: JSON, _ name: String, _ request: GenerationRequest, _ golden: SafeTensorsFile) throws -> [Result]) throws -> [Result] {
        var results: [Result] = []
        for spec in try (cases ?? Files.readJSON(Files.join(folder, "cases.json")))["cases"]?.array ?? [] {
            let name = spec["name"]?.string ?? "?"
            let golden = try SafeTensorsFile(path: Files.join(folder, "\(name).safetensors"))
            for item in try run(spec, name, request(spec), golden) {
                results.append(item)
                log(item.description)
            }
        }
        return results
    }

    /// The EDM goldens of a variant (`golden/<variant>/edm/`: the model in Playground v2.5's
    /// layout, a scheduler config per case, and what diffusers' pipelines made of each case).
    public static func checkEDM(reference: String, variant: String, backend: Backend, options: PipelineOptions,
                                tolerances: Tolerances, log: (String) -> Void) throws -> [Result] {
        let folder = Files.join(reference, "golden", variant, "edm")
        guard Files.exists(Files.join(folder, "cases.json")) else { return [] }
        let base = try StableDiffusionComponents.load(Files.join(folder, "model"))
        return try goldenCases(folder, log: log) { spec, name, request, golden in
            var r = request
            r.scheduler = nil
            if let kind = spec["pipeline"]?.string {
                r.initImage = try Image.load(Files.join(folder, "init.png"))
                if kind == "inpaint" { r.maskImage = try Image.load(Files.join(folder, "mask.png")) }
            }
            var components = base
            components.schedulerConfig = try SchedulerConfig.load(Files.join(folder, "\(name).scheduler_config.json"))
            let pipeline = StableDiffusionPipeline(components: components, backend: backend, options: options)
            return try compareGeneration("\(variant) edm/\(name)", try pipeline.generate(r), golden, tolerances: tolerances)
        }
    }

    /// The SDXL conditioning goldens of a variant (`golden/<variant>/sdxl_conditioning/`, made by
    /// scripts/fixtures/make_sdxl_conditioning_reference.py): second prompts and size and crop
    /// micro-conditioning, from text, a picture or a picture and a mask, on the base, a refiner
    /// made from it, and with a ControlNet.
    public static func checkSDXLConditioning(reference: String, variant: String, backend: Backend, options: PipelineOptions,
                                             tolerances: Tolerances, log: (String) -> Void) throws -> [Result] {
        let folder = Files.join(reference, "golden", variant, "sdxl_conditioning")
        guard Files.exists(Files.join(folder, "cases.json")) else { return [] }
        let base = try StableDiffusionComponents.load(Files.join(reference, "models", variant))
        var refiner: StableDiffusionComponents?, controlNet: ControlNetComponent?
        let (picture, mask, control) = try (Image.load(Files.join(folder, "init.png")), Image.load(Files.join(folder, "mask.png")),
                                            Image.load(Files.join(folder, "control.png")))
        return try goldenCases(folder, log: log) { spec, name, request, golden in
            var r = request
            var components = base
            if spec["model"]?.string == "refiner" {
                refiner = try refiner ?? StableDiffusionComponents.load(Files.join(folder, "refiner_model"))
                components = refiner!
            }
            let kind = spec["pipeline"]?.string ?? "text"
            if kind != "text" { r.initImage = picture }
            if kind == "inpaint" { r.maskImage = mask }
            if spec["controlnet"]?.bool == true {
                controlNet = try controlNet ?? ControlNetComponent.load(Files.join(folder, "controlnet"))
                components.controlNets = [controlNet!]
                r.controlNets = [ControlNetGuidance(image: control)]
            }
            let pipeline = StableDiffusionPipeline(components: components, backend: backend, options: options)
            return try compareGeneration("\(variant) sdxl_conditioning/\(name)", try pipeline.generate(r), golden, tolerances: tolerances)
        }
    }

    /// The custom-schedule goldens of a variant (`golden/<variant>/custom_schedule/`, made by
    /// scripts/fixtures/make_custom_schedule_reference.py): the schedule each scheduler makes of
    /// the timesteps or sigmas given, and what the pipeline makes with it.
    public static func checkCustomSchedule(reference: String, variant: String, backend: Backend, options: PipelineOptions,
                                           tolerances: Tolerances, log: (String) -> Void) throws -> [Result] {
        let folder = Files.join(reference, "golden", variant, "custom_schedule")
        guard Files.exists(Files.join(folder, "cases.json")) else { return [] }
        let components = try StableDiffusionComponents.load(Files.join(reference, "models", variant))
        let pipeline = StableDiffusionPipeline(components: components, backend: backend, options: options)
        let picture = try Image.load(Files.join(folder, "init.png"))
        return try goldenCases(folder, log: log) { spec, name, request, golden in
            var r = request
            let label = "\(variant) custom_schedule/\(name)"
            if spec["pipeline"]?.string == "img2img" { r.initImage = picture }
            let scheduler = try Schedulers.make(named: r.scheduler ?? "", config: components.schedulerConfig)
            try scheduler.setTimesteps(r.customSchedule!)
            func values(_ v: [Double]) -> Tensor { Tensor(shape: [v.count], floats: v.map { Float($0) }) }
            var results = [compare("\(label) timesteps", values(scheduler.timesteps), try golden.tensor("timesteps"), tolerance: 1e-6)]
            if golden.info("sigmas") != nil {
                results.append(compare("\(label) sigmas", values(scheduler.sigmas), try golden.tensor("sigmas"), tolerance: 1e-6))
            }
            return results + (try compareGeneration(label, try pipeline.generate(r), golden, tolerances: tolerances))
        }
    }

    /// The FreeU goldens of a variant (`golden/<variant>/freeu/`, made by
    /// scripts/fixtures/make_freeu_reference.py): diffusers' pipelines after `enable_freeu`.
    public static func checkFreeU(reference: String, variant: String, backend: Backend, options: PipelineOptions,
                                  tolerances: Tolerances, log: (String) -> Void) throws -> [Result] {
        let folder = Files.join(reference, "golden", variant, "freeu")
        guard Files.exists(Files.join(folder, "cases.json")) else { return [] }
        let pipeline = StableDiffusionPipeline(components: try StableDiffusionComponents.load(Files.join(reference, "models", variant)),
                                               backend: backend, options: options)
        let picture = try Image.load(Files.join(folder, "init.png"))
        return try goldenCases(folder, log: log) { spec, name, request, golden in
            var r = request
            if spec["pipeline"]?.string == "img2img" { r.initImage = picture }
            return try compareGeneration("\(variant) freeu/\(name)", try pipeline.generate(r), golden, tolerances: tolerances)
        }
    }

    /// The prompt weighting goldens of a variant (`golden/<variant>/prompt_weighting/`, made by
    /// scripts/fixtures/make_prompt_weighting_reference.py): the weighted states of each prompt
    /// (lpw_stable_diffusion's for SD 1.x/2.x, sd_embed's for SDXL, with the pooled states), and
    /// diffusers' pipeline run on them; a case naming a "model" (the SDXL refiner) loads that
    /// folder beside the cases, and one with "embeddings_only" has no generation to compare.
    public static func checkPromptWeighting(reference: String, variant: String, backend: Backend, options: PipelineOptions,
                                            tolerances: Tolerances, log: (String) -> Void) throws -> [Result] {
        let folder = Files.join(reference, "golden", variant, "prompt_weighting")
        guard Files.exists(Files.join(folder, "cases.json")) else { return [] }
        var pipelines: [String: StableDiffusionPipeline] = [:]
        func pipeline(_ model: String?) throws -> StableDiffusionPipeline {
            let path = model.map { Files.join(folder, $0) } ?? Files.join(reference, "models", variant)
            if let p = pipelines[path] { return p }
            let p = StableDiffusionPipeline(components: try StableDiffusionComponents.load(path), backend: backend, options: options)
            pipelines[path] = p
            return p
        }
        return try goldenCases(folder, log: log) { spec, name, request, golden in
            var r = request
            r.promptWeighting = true
            r.maxPromptChunks = spec["max_prompt_chunks"]?.int
            let label = "\(variant) prompt_weighting/\(name)"
            let pipeline = try pipeline(spec["model"]?.string)
            let guidance = pipeline.doesClassifierFreeGuidance(r)
            let embeddings = try pipeline.encodeWeightedPrompt(r, count: 1, guidance: guidance)
            /// The positive row (the last) or the negative one of `states` against the golden `key`, where it has one.
            func check(_ states: Tensor?, _ key: String, negative: Bool) throws -> [Result] {
                guard let states, golden.info(key) != nil else { return [] }
                let row = states.slice(negative ? 0..<1 : (states.shape[0] - 1)..<states.shape[0])
                var tolerance = tolerances.models
                if !pipeline.components.isXL && key.hasSuffix("prompt_embeds") {
                    // lpw rescales by (mean before) / (mean after weighting): where that mean nearly
                    // cancels (random encoders' states), float32 differences in the states grow by
                    // κ = mean|e| / |mean e|, one float32 ulp per element at least.
                    let e = row.converted(to: .float32).toFloatArray().map(Double.init)
                    let kappa = e.reduce(0) { $0 + abs($1) } / max(abs(e.reduce(0, +)), .leastNonzeroMagnitude)
                    tolerance += Float(kappa) * Float.ulpOfOne
                }
                return [compare("\(label) \(key)", row, try golden.tensor(key), tolerance: tolerance)]
            }
            var results = try check(embeddings.hidden, "prompt_embeds", negative: false)
                + check(embeddings.pooled, "pooled_prompt_embeds", negative: false)
            if guidance {
                results += try check(embeddings.hidden, "negative_prompt_embeds", negative: true)
                    + check(embeddings.pooled, "negative_pooled_prompt_embeds", negative: true)
            }
            if spec["embeddings_only"]?.bool == true { return results }
            return results + (try compareGeneration(label, try pipeline.generate(r), golden, tolerances: tolerances))
        }
    }

    /// The safety checker goldens of a variant (`golden/<variant>/safety_checker/`, made by
    /// scripts/fixtures/make_safety_checker_reference.py): a model whose checker flags one of two
    /// images, run with the checker (the flags, the flagged image black), without it (the images
    /// as made, and what the checker's encoder makes of them), and inpainting a crop ("pipeline":
    /// "inpaint" on init.png and mask.png, the checker seeing the crop before it is pasted).
    public static func checkSafetyChecker(reference: String, variant: String, backend: Backend, options: PipelineOptions,
                                          tolerances: Tolerances, log: (String) -> Void) throws -> [Result] {
        let folder = Files.join(reference, "golden", variant, "safety_checker")
        guard Files.exists(Files.join(folder, "cases.json")) else { return [] }
        let components = try StableDiffusionComponents.load(Files.join(folder, "model"))
        guard components.safetyChecker != nil else { throw PipelineError("\(folder)/model: its safety_checker/ was not loaded") }
        return try goldenCases(folder, log: log) { spec, name, request, golden in
            var model = components, r = request
            if spec["safety_checker"]?.bool == false { model.safetyChecker = nil }
            if spec["pipeline"]?.string == "inpaint" {
                (r.initImage, r.maskImage) = (try Image.load(Files.join(folder, "init.png")), try Image.load(Files.join(folder, "mask.png")))
            }
            let pipeline = StableDiffusionPipeline(components: model, backend: backend, options: options)
            let label = "\(variant) safety_checker/\(name)"
            let result = try pipeline.generate(r)
            let want = spec["nsfw_content_detected"]?.array?.map { $0.bool ?? false } ?? []
            let got = result.nsfwContentDetected
            // A flag of one side that the other lacks (no checker: none) counts as a mismatch.
            let mismatches = zip(want, got ?? []).filter { $0 != $1 }.count + abs(want.count - (got?.count ?? 0))
            var results = [Result(name: "\(label) nsfw_content_detected \(got.map { "\($0)" } ?? "none")", maxError: Float(mismatches),
                                  scale: 1, tolerance: 0)]
            if golden.info("image_embeds") != nil, let checker = components.safetyChecker {
                let checking = StableDiffusionPipeline(components: components, backend: backend, options: options)
                results.append(compare("\(label) image_embeds", try checking.safetyCheckerEmbeds(result.images, checker),
                                       try golden.tensor("image_embeds"), tolerance: tolerances.models))
            }
            return results + (try compareGeneration(label, result, golden, tolerances: tolerances))
        }
    }

    /// The InstructPix2Pix goldens of a variant (`golden/<variant>/instruct_pix2pix/`, made by
    /// scripts/fixtures/make_instruct_pix2pix_reference.py): a model with an InstructPix2Pix UNet
    /// editing one picture, guided by the prompt and the image or not.
    public static func checkInstructPix2Pix(reference: String, variant: String, backend: Backend, options: PipelineOptions,
                                           tolerances: Tolerances, log: (String) -> Void) throws -> [Result] {
        try checkModelOnPicture(Files.join(reference, "golden", variant), "instruct_pix2pix", picture: "init.png", variant: variant,
                                backend: backend, options: options, tolerances: tolerances, log: log)
    }

    /// The cases of `golden/<variant>/<kind>/`: its own model (`model/`, or the folder a case's
    /// "model" names) run on its one picture; a case naming "adapters" loads those IP-Adapters of
    /// `golden/<variant>/ip_adapter/`.
    static func checkModelOnPicture(_ golden: String, _ kind: String, picture: String, variant: String, backend: Backend,
                                    options: PipelineOptions, tolerances: Tolerances, log: (String) -> Void) throws -> [Result] {
        let folder = Files.join(golden, kind), adapters = Files.join(golden, "ip_adapter")
        guard Files.exists(Files.join(folder, "cases.json")) else { return [] }
        let base = try StableDiffusionComponents.load(Files.join(folder, "model"))
        var pipelines: [String: StableDiffusionPipeline] = [:]
        func pipeline(_ files: [String], model: String?) throws -> StableDiffusionPipeline {
            let key = files.joined(separator: "+") + "|" + (model ?? "model")
            if let p = pipelines[key] { return p }
            var components = try model.map { try StableDiffusionComponents.load(Files.join(folder, $0)) } ?? base
            if !files.isEmpty {
                try components.loadIPAdapters(try files.map { try IPAdapterComponent.load(Files.join(adapters, $0)) },
                                              imageEncoder: try ImageEncoderComponent.load(Files.join(adapters, "image_encoder")))
            }
            let p = StableDiffusionPipeline(components: components, backend: backend, options: options)
            pipelines[key] = p
            return p
        }
        let image = try Image.load(Files.join(folder, picture))
        return try goldenCases(folder, log: log) { spec, name, request, golden in
            var r = request
            r.initImage = image
            r.depthMap = try spec["depth_map"]?.string.map { try DepthToImage.loadDepthMap(Files.join(folder, $0)) }
            r.ipAdapters = try ipAdapterGuidance(spec, folder: adapters, unet: base.unet.config)
            let p = try pipeline(spec["adapters"]?.array?.compactMap(\.string) ?? [], model: spec["model"]?.string)
            return try compareGeneration("\(variant) \(kind)/\(name)", try p.generate(r), golden, tolerances: tolerances)
        }
    }

    /// The x4 upscaler goldens of a variant (`golden/<variant>/upscale/`, made by
    /// scripts/fixtures/make_upscale_reference.py): an upscaler made from the variant's parts
    /// enlarging one small picture at several noise levels.
    public static func checkUpscale(reference: String, variant: String, backend: Backend, options: PipelineOptions,
                                    tolerances: Tolerances, log: (String) -> Void) throws -> [Result] {
        try checkModelOnPicture(Files.join(reference, "golden", variant), "upscale", picture: "low.png", variant: variant,
                                backend: backend, options: options, tolerances: tolerances, log: log)
    }

    /// The latent x2 upscaler goldens of a variant (`golden/<variant>/latent_upscale/`, made by
    /// scripts/fixtures/make_latent_upscale_reference.py): an upscaler made from the variant's
    /// parts doubling one small picture, or the latents a case holds ("image_latents": true).
    public static func checkLatentUpscale(reference: String, variant: String, backend: Backend, options: PipelineOptions,
                                          tolerances: Tolerances, log: (String) -> Void) throws -> [Result] {
        let folder = Files.join(reference, "golden", variant, "latent_upscale")
        guard Files.exists(Files.join(folder, "cases.json")) else { return [] }
        let pipeline = StableDiffusionPipeline(components: try StableDiffusionComponents.load(Files.join(folder, "model")),
                                               backend: backend, options: options)
        let picture = try Image.load(Files.join(folder, "low.png"))
        var base: StableDiffusionPipeline?
        return try goldenCases(folder, log: log) { spec, name, request, golden in
            var r = request
            if let baseSteps = spec["base_steps"]?.int {
                // diffusers' example: the variant's own latents, then the upscaler, one generator.
                let first = try base ?? StableDiffusionPipeline(
                    components: try StableDiffusionComponents.load(Files.join(reference, "models", variant)), backend: backend, options: options)
                base = first
                var low = r
                (low.steps, low.guidanceScale) = (baseSteps, spec["base_guidance"]?.double ?? low.guidanceScale)
                (r.width, r.height) = (nil, nil)
                let generator = first.makeGenerator(low)
                r.imageLatents = try first.generateLatents(low, generator: generator)
                return try compareGeneration("\(variant) latent_upscale/\(name)", try pipeline.generate(r, generator: generator), golden,
                                             tolerances: tolerances)
            }
            if spec["image_latents"]?.bool == true {
                r.imageLatents = try golden.tensor("image_latents")
            } else {
                r.initImage = picture
            }
            return try compareGeneration("\(variant) latent_upscale/\(name)", try pipeline.generate(r), golden, tolerances: tolerances)
        }
    }

    /// The depth-to-image goldens of a variant (`golden/<variant>/depth/`, made by
    /// scripts/fixtures/make_depth_reference.py): a depth model made from the variant's parts
    /// changing one picture, each case with the depth map its "depth_map" names.
    public static func checkDepthToImage(reference: String, variant: String, backend: Backend, options: PipelineOptions,
                                         tolerances: Tolerances, log: (String) -> Void) throws -> [Result] {
        try checkModelOnPicture(Files.join(reference, "golden", variant), "depth", picture: "init.png", variant: variant,
                                backend: backend, options: options, tolerances: tolerances, log: log)
    }

    /// The DPT depth-estimator goldens of a variant (`golden/<variant>/dpt/`, made by
    /// scripts/fixtures/make_dpt_reference.py): for each case, what transformers'
    /// DPTImageProcessor made of a picture (judged to 1e-5: it is the same resize and arithmetic)
    /// and what its DPTForDepthEstimation made of those pixels.
    public static func checkDepthEstimator(reference: String, variant: String, backend: Backend, options: PipelineOptions,
                                           tolerances: Tolerances, log: (String) -> Void) throws -> [Result] {
        let folder = Files.join(reference, "golden", variant, "dpt")
        guard Files.exists(Files.join(folder, "cases.json")) else { return [] }
        var estimators: [String: DepthEstimatorComponent] = [:]
        var executables: [String: Executable] = [:]
        let compile = modelCompileOptions(options)
        return try goldenCases(folder, log: log) { spec, name, _, golden in
            let model = spec["model"]?.string ?? "hybrid"
            let estimator = try estimators[model] ?? DepthEstimatorComponent.load(
                Files.join(folder, model), featureExtractor: Files.join(folder, model, "preprocessor_config.json"))
            estimators[model] = estimator
            var processor = estimator.processor
            if let size = spec["size"]?.array?.compactMap(\.int), size.count == 2 { (processor.height, processor.width) = (size[0], size[1]) }
            let picture = try Image.load(Files.join(folder, spec["picture"]?.string ?? ""))
            let want = try golden.tensor("pixel_values")
            let pixels = processor.pixelValues(picture)
            let key = "\(model)|\(want.shape)"
            let exe = try executables[key] ?? backend.compile(try estimator.model.graph(batch: 1, height: want.shape[2], width: want.shape[3]),
                                                              weights: estimator.weights, options: compile)
            executables[key] = exe
            let depth = try exe.run([DPTForDepthEstimation.pixelValues: try backend.upload(want)])[DPTForDepthEstimation.predictedDepth]!
            return [compare("\(variant) dpt/\(name) pixel_values", pixels, want, tolerance: 1e-5),
                    compare("\(variant) dpt/\(name) predicted_depth", try depth.toHost(), try golden.tensor("predicted_depth"),
                            tolerance: tolerances.models)]
        }
    }

    /// The image variation goldens of a variant (`golden/<variant>/image_variation/`, made by
    /// scripts/fixtures/make_image_variation_reference.py): an image variation model made from the
    /// variant's parts, varying one picture.
    public static func checkImageVariation(reference: String, variant: String, backend: Backend, options: PipelineOptions,
                                           tolerances: Tolerances, log: (String) -> Void) throws -> [Result] {
        try checkModelOnPicture(Files.join(reference, "golden", variant), "image_variation", picture: "picture.png", variant: variant,
                                backend: backend, options: options, tolerances: tolerances, log: log)
    }

    /// The Stable unCLIP goldens of a variant (`golden/<variant>/unclip/`, made by
    /// scripts/fixtures/make_unclip_reference.py): a Stable unCLIP model made from the variant's
    /// parts varying one picture as prompts say, at several noise levels.
    public static func checkStableUnCLIP(reference: String, variant: String, backend: Backend, options: PipelineOptions,
                                         tolerances: Tolerances, log: (String) -> Void) throws -> [Result] {
        try checkModelOnPicture(Files.join(reference, "golden", variant), "unclip", picture: "picture.png", variant: variant,
                                backend: backend, options: options, tolerances: tolerances, log: log)
    }

    /// The perturbed-attention guidance goldens of a variant (`golden/<variant>/pag/`, made by
    /// scripts/fixtures/make_pag_reference.py): diffusers' PAG pipelines from text, a picture, a
    /// picture and a mask (with the model's UNet or the inpainting model of the image goldens),
    /// and a ControlNet.
    public static func checkPAG(reference: String, variant: String, backend: Backend, options: PipelineOptions,
                                tolerances: Tolerances, log: (String) -> Void) throws -> [Result] {
        let folder = Files.join(reference, "golden", variant, "pag")
        guard Files.exists(Files.join(folder, "cases.json")) else { return [] }
        let base = try StableDiffusionComponents.load(Files.join(reference, "models", variant))
        var pipelines: [String: StableDiffusionPipeline] = [:]
        func pipeline(_ kind: String) throws -> StableDiffusionPipeline {
            if let p = pipelines[kind] { return p }
            var components = base
            if kind == "inpaint_model" {
                components = try StableDiffusionComponents.load(Files.join(reference, "golden", variant, "image", "inpaint_model"))
            } else if kind == "controlnet" {
                components.controlNets = [try ControlNetComponent.load(Files.join(folder, "controlnet"))]
            }
            let p = StableDiffusionPipeline(components: components, backend: backend, options: options)
            pipelines[kind] = p
            return p
        }
        return try goldenCases(folder, log: log) { spec, name, request, golden in
            var r = request
            let kind = spec["pipeline"]?.string ?? "text"
            if kind == "img2img" || kind == "inpaint" { r.initImage = try Image.load(Files.join(folder, "init.png")) }
            if kind == "inpaint" { r.maskImage = try Image.load(Files.join(folder, "mask.png")) }
            if kind == "controlnet" { r.controlNets = [ControlNetGuidance(image: try Image.load(Files.join(folder, "control.png")))] }
            let p = try pipeline(spec["model"]?.string == "inpaint" ? "inpaint_model" : kind == "controlnet" ? kind : "base")
            return try compareGeneration("\(variant) pag/\(name)", try p.generate(r), golden, tolerances: tolerances)
        }
    }

    /// The IP-Adapter goldens of a variant (`golden/<variant>/ip_adapter/`: an image encoder,
    /// adapter files in h94/IP-Adapter's layout, pictures, `cases.json`; what diffusers' CLIP
    /// image processor and image encoder made of each picture, what each adapter's projection
    /// made of those, and what its pipelines made of each case from one seed).
    public static func checkIPAdapter(reference: String, variant: String, backend: Backend, options: PipelineOptions,
                                      tolerances: Tolerances, log: (String) -> Void) throws -> [Result] {
        let folder = Files.join(reference, "golden", variant, "ip_adapter")
        guard Files.exists(Files.join(folder, "cases.json")) else { return [] }
        var results: [Result] = []
        func record(_ r: Result) { results.append(r); log(r.description) }
        let encoder = try ImageEncoderComponent.load(Files.join(folder, "image_encoder"))
        let compile = modelCompileOptions(options)
        func run(_ graph: Graph, _ weights: ModelWeights, _ input: String, _ x: Tensor, _ output: String) throws -> Tensor {
            try backend.compile(graph, weights: weights, options: compile).run([input: try backend.upload(x)])[output]!.toHost()
        }

        // The image processor and the encoder, picture by picture; each adapter's projection.
        let outputs: [CLIPVisionOutput] = [.imageEmbeds, .penultimateHiddenState]
        if Files.exists(Files.join(folder, "encoder.safetensors")) {
            let g = try SafeTensorsFile(path: Files.join(folder, "encoder.safetensors"))
            for stem in g.tensorNames.filter({ $0.hasSuffix(".pixel_values") }).map({ String($0.dropLast(13)) }).sorted() {
                let pixels = encoder.processor.pixelValues(try Image.load(Files.join(folder, "\(stem).png")))
                record(compare("\(variant) ip_adapter/\(stem) pixel_values", pixels, try g.tensor("\(stem).pixel_values"), tolerance: 1e-5))
                let exe = try backend.compile(try encoder.model.graph(batch: 1, outputs: outputs), weights: encoder.weights, options: compile)
                let out = try exe.run([CLIPVisionModelWithProjection.pixelValues: try backend.upload(try g.tensor("\(stem).pixel_values"))])
                record(compare("\(variant) ip_adapter/\(stem) image_embeds", try out[CLIPVisionOutput.imageEmbeds.name]!.toHost(),
                               try g.tensor("\(stem).image_embeds"), tolerance: tolerances.models))
                record(compare("\(variant) ip_adapter/\(stem) penultimate hidden state",
                               try out[CLIPVisionOutput.penultimateHiddenState.name]!.toHost(), try g.tensor("\(stem).penultimate"),
                               tolerance: tolerances.models))
            }
            if Files.exists(Files.join(folder, "projection.safetensors")) {
                let p = try SafeTensorsFile(path: Files.join(folder, "projection.safetensors"))
                for name in p.tensorNames where name.hasSuffix(".tokens") {
                    let adapter = try IPAdapterComponent.load(Files.join(folder, String(name.dropLast(7)) + ".safetensors"))
                    let x = try g.tensor(adapter.projection.imageEncoderOutput == .imageEmbeds ? "ip.image_embeds" : "ip.penultimate")
                    let tokens = try run(try adapter.projection.graph(batch: 1, sequence: x.rank == 3 ? x.shape[1] : 1), adapter.weights,
                                         IPAdapterImageProjection.input, x, IPAdapterImageProjection.output)
                    record(compare("\(variant) ip_adapter/\(name)", tokens, try p.tensor(name), tolerance: tolerances.models))
                }
            }
        }

        // Generations.
        let base = try StableDiffusionComponents.load(Files.join(reference, "models", variant))
        var pipelines: [String: StableDiffusionPipeline] = [:]
        return try results + goldenCases(folder, log: log) { spec, name, request, golden in
            let files = spec["adapters"]?.array?.compactMap(\.string) ?? []
            let key = files.joined(separator: "+")
            let pipeline: StableDiffusionPipeline
            if let p = pipelines[key] {
                pipeline = p
            } else {
                var components = base
                try components.loadIPAdapters(try files.map { try IPAdapterComponent.load(Files.join(folder, $0)) }, imageEncoder: encoder)
                pipeline = StableDiffusionPipeline(components: components, backend: backend, options: options)
                pipelines[key] = pipeline
            }
            var r = request
            if spec["pipeline"]?.string == "img2img", let start = spec["image"]?.string { r.initImage = try Image.load(Files.join(folder, start)) }
            r.ipAdapters = try ipAdapterGuidance(spec, folder: folder, unet: base.unet.config)
            return try compareGeneration("\(variant) ip_adapter/\(name)", try pipeline.generate(r), golden, tolerances: tolerances)
        }
    }

    /// A case's IP-Adapter pictures and scales: "images", one entry per adapter (a picture, or a
    /// list of pictures, in `folder`), and "scale" (a number, one per adapter — itself a list for
    /// one scale per masked picture — or InstantStyle's per-block object).
    static func ipAdapterGuidance(_ spec: JSON, folder: String, unet: UNet2DConditionModel.Configuration) throws -> [IPAdapterGuidance] {
        let images = (spec["images"]?.array ?? []).map { $0.string.map { [$0] } ?? $0.array?.compactMap(\.string) ?? [] }
        return try images.enumerated().map { k, files in
            let scale = spec["scale"]?.array.map { k < $0.count ? $0[k] : .number(1) } ?? spec["scale"] ?? .number(1)
            let value: IPAdapterScale = scale.members != nil ? try IPAdapterScale.blocks(scale, unet: unet)
                : scale.array.map { .perImage($0.compactMap(\.double).map(Float.init)) } ?? .uniform(Float(scale.double ?? 1))
            let masks = spec["masks"]?.array.flatMap { k < $0.count ? $0[k].array?.compactMap(\.string) : nil }
            return IPAdapterGuidance(images: try files.map { try Image.load(Files.join(folder, $0)) }, scale: value,
                                     masks: try masks.map { try $0.map { try Image.load(Files.join(folder, $0)) } })
        }
    }

    /// The textual-inversion golden of a variant (`golden/<variant>/textual_inversion/`: the
    /// embedding files, `case.json` with their tokens and a prompt, and the token ids and prompt
    /// embeddings diffusers made with them loaded).
    public static func checkTextualInversion(reference: String, variant: String, backend: Backend, options: PipelineOptions,
                                             tolerances: Tolerances, log: (String) -> Void) throws -> [Result] {
        let folder = Files.join(reference, "golden", variant, "textual_inversion")
        guard Files.exists(Files.join(folder, "case.json")) else { return [] }
        let spec = try Files.readJSON(Files.join(folder, "case.json"))
        let embeddings = try (spec["embeddings"]?.array ?? []).map { e in
            try TextualInversion(path: Files.join(folder, e["file"]?.string ?? ""), token: e["token"]?.string)
        }
        let prompt = spec["prompt"]?.string ?? "", negative = spec["negative_prompt"]?.string
        let components = try StableDiffusionComponents.load(Files.join(reference, "models", variant), embeddings: embeddings)
        let g = try SafeTensorsFile(path: Files.join(folder, "prompt_embeds.safetensors"))
        var results: [Result] = []
        func record(_ r: Result) { results.append(r); log(r.description) }
        let label = "\(variant) textual_inversion"
        for (suffix, te) in [("", components.textEncoder), ("_2", components.textEncoder2)] {
            guard let te else { continue }
            for (key, text) in [("input_ids", prompt), ("negative_input_ids", negative ?? "")] where g.info(key + suffix) != nil {
                let ids = te.tokenizer(text).inputIds
                let want = try g.tensor(key + suffix).toFloatArray().map { Int($0) }
                let wrong = zip(ids, want).filter { $0 != $1 }.count + abs(ids.count - want.count)
                record(Result(name: "\(label) \(key + suffix) (\(wrong) ids differ)", maxError: Float(wrong), scale: 1, tolerance: 0))
            }
        }
        let pipeline = StableDiffusionPipeline(components: components, backend: backend, options: options)
        let out = try pipeline.encodePrompt(prompt, negative: negative, count: 1, guidance: true, clipSkip: nil)
        record(compare("\(label) negative_prompt_embeds", out.hidden.slice(0..<1), try g.tensor("negative_prompt_embeds"), tolerance: tolerances.models))
        record(compare("\(label) prompt_embeds", out.hidden.slice(1..<2), try g.tensor("prompt_embeds"), tolerance: tolerances.models))
        if let pooled = out.pooled, g.info("pooled_prompt_embeds") != nil {
            record(compare("\(label) negative_pooled_prompt_embeds", pooled.slice(0..<1), try g.tensor("negative_pooled_prompt_embeds"), tolerance: tolerances.models))
            record(compare("\(label) pooled_prompt_embeds", pooled.slice(1..<2), try g.tensor("pooled_prompt_embeds"), tolerance: tolerances.models))
        }
        return results
    }

    /// The LoRA goldens of a variant (`golden/<variant>/lora/<name>/`: `adapter.safetensors`,
    /// `lora.json` with its scale, and the text encoders' and UNet's outputs with it fused in).
    public static func checkLoRAs(reference: String, variant: String, backend: Backend, options: PipelineOptions,
                                  tolerances: Tolerances, log: (String) -> Void) throws -> [Result] {
        var results: [Result] = []
        let loraFolder = Files.join(reference, "golden", variant, "lora")
        for name in (try? Files.list(loraFolder)) ?? [] where Files.exists(Files.join(loraFolder, name, "lora.json")) {
            let folder = Files.join(loraFolder, name)
            let scale = try Files.readJSON(Files.join(folder, "lora.json"))["scale"]?.double ?? 1
            let lora = LoRA(file: try LoRAFile(path: Files.join(folder, "adapter.safetensors")), scale: Float(scale))
            let adapted = try StableDiffusionComponents.load(Files.join(reference, "models", variant), loras: [lora])
            try checkModels(adapted, pipeline: StableDiffusionPipeline(components: adapted, backend: backend, options: options),
                            golden: folder, label: "\(variant) lora/\(name)", backend: backend, tolerances: tolerances) {
                results.append($0)
                log($0.description)
            }
        }
        return results
    }

    /// The text encoders' and the UNet's goldens in `golden` (`text_encoder*.safetensors`,
    /// `unet.safetensors`).
    static func checkModels(_ components: StableDiffusionComponents, pipeline: StableDiffusionPipeline, golden: String,
                            label variant: String, backend: Backend, tolerances: Tolerances, record: (Result) -> Void) throws {
        let tolerance = tolerances.models
        let compile = pipeline.compileOptions
        func file(_ name: String) -> SafeTensorsFile? { try? SafeTensorsFile(path: Files.join(golden, name)) }

        // Text encoders.
        for (name, te) in [("text_encoder", components.textEncoder), ("text_encoder_2", components.textEncoder2)] {
            guard let te, let g = file("\(name).safetensors") else { continue }
            let ids = try g.tensor("input_ids")
            let rows = (0..<ids.shape[0]).map { r in (0..<ids.shape[1]).map { Int(ids.element(r * ids.shape[1] + $0)) } }
            var outputs: [(String, CLIPTextOutput)] = [("last_hidden_state", .lastHiddenState),
                                                       ("hidden_states_penultimate", .penultimateHiddenState),
                                                       ("clip_skip_1", .normalizedHiddenState(-2))]
            outputs.append(te.encoder.hasTextProjection ? ("text_embeds", .textEmbeds) : ("pooler_output", .pooledOutput))
            let exe = try backend.compile(try te.encoder.graph(batch: rows.count, sequenceLength: rows[0].count, outputs: outputs.map(\.1)),
                                          weights: te.weights, options: pipeline.textEncoderCompileOptions)
            let out = try exe.run([CLIPTextModel.Name.inputIds: try backend.upload(te.encoder.inputIdsTensor(rows)),
                                   CLIPTextModel.Name.eosIndices: try backend.upload(te.encoder.eosIndices(inputIds: rows))])
            for (key, o) in outputs {
                record(compare("\(variant) \(name) \(key)", try out[o.name]!.toHost(), try g.tensor(key), tolerance: tolerance))
            }
        }

        // UNet, every timestep case.
        if let g = file("unet.safetensors") {
            let sample = try g.tensor("sample"), context = try g.tensor("encoder_hidden_states")
            let exe = try backend.compile(try components.unet.graph(batch: sample.shape[0], height: sample.shape[2],
                                                                    width: sample.shape[3], sequenceLength: context.shape[1]),
                                          weights: components.unetWeights, options: compile)
            for key in g.names where key.hasPrefix("noise_pred_") {
                let c = String(key.dropFirst("noise_pred_".count))
                let t = try g.tensor("timestep_\(c)").toFloatArray()
                var feeds: [String: DeviceTensor] = [
                    UNet2DConditionModel.Name.sample: try backend.upload(sample),
                    UNet2DConditionModel.Name.encoderHiddenStates: try backend.upload(context),
                    UNet2DConditionModel.Name.timestep: try backend.upload(Tensor(shape: [sample.shape[0]],
                        floats: t.count == 1 ? Array(repeating: t[0], count: sample.shape[0]) : t)),
                ]
                if let cond = components.unet.absentTimestepCond(batch: sample.shape[0]) {
                    feeds[UNet2DConditionModel.Name.timestepCond] = try backend.upload(cond)
                }
                if components.unet.usesTextTimeConditioning {
                    feeds[UNet2DConditionModel.Name.textEmbeds] = try backend.upload(try g.tensor("text_embeds"))
                    feeds[UNet2DConditionModel.Name.timeIds] = try backend.upload(try g.tensor("time_ids"))
                }
                let out = try exe.run(feeds)[UNet2DConditionModel.Name.noisePred]!.toHost()
                record(compare("\(variant) unet \(key)", out, try g.tensor(key), tolerance: tolerances.unet))
            }
        }
    }

    /// The e2e arguments the reference README states ("4 steps, guidance 7.5"); defaults if absent.
    static func e2eSteps(_ reference: String) -> Int { readmeNumber(reference, after: "steps", before: true) .map { Int($0) } ?? 4 }
    static func e2eGuidance(_ reference: String) -> Double { readmeNumber(reference, after: "guidance", before: false) ?? 7.5 }

    static func readmeNumber(_ reference: String, after word: String, before: Bool) -> Double? {
        guard let text = try? Files.readText(Files.join(reference, "README.md")) else { return nil }
        let line = text.split(separator: "\n").first { $0.contains("e2e_") && $0.contains("guidance") } ?? ""
        let words = line.split(whereSeparator: { $0 == " " || $0 == "," })
        guard let i = words.firstIndex(where: { $0 == word }) else { return nil }
        let j = before ? i - 1 : i + 1
        return j >= 0 && j < words.count ? Double(words[j]) : nil
    }
}

extension String {
    func padding(_ n: Int) -> String { count >= n ? self : self + String(repeating: " ", count: n - count) }
}
