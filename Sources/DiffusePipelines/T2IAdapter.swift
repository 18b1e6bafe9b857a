import DiffuseCore
import DiffuseGraph
import DiffuseModels

/// A T2I-Adapter with its weights (diffusers' `T2IAdapter.from_pretrained`).
public struct T2IAdapterComponent {
    public var name: String
    public var model: T2IAdapter
    public var weights: ModelWeights

    /// Opens a T2IAdapter folder (config.json and its weights) or a Hugging Face cache repo id,
    /// e.g. TencentARC/t2iadapter_canny_sd15v2 or TencentARC/t2i-adapter-sketch-sdxl-1.0.
    /// A single file (`unetLevels`: the model's UNet's down blocks, one feature each) is read by
    /// `loadOriginal`.
    public static func load(_ location: String, unetLevels: Int? = nil, options: ModelSourceOptions = .init()) throws -> T2IAdapterComponent {
        if Files.exists(location) && !Files.isDirectory(location) {
            guard let unetLevels else { throw PipelineError("\(location): a T2I-Adapter file is read for a model's UNet, which is not known here") }
            return try loadOriginal(location, unetLevels: unetLevels)
        }
        let (folder, config, weights) = try ModelLocation.diffusersModel(location, options: options, component: "adapter",
                                                                        className: T2IAdapter.className, what: "a T2I-Adapter")
        let model = try T2IAdapter(configJSON: config.bytes, origin: config.origin)
        try model.checkWeights(weights)
        return T2IAdapterComponent(name: folder, model: model, weights: ModelWeights(weights))
    }

    /// TencentARC's original files for SD 1.x (`t2iadapter_canny_sd14v1.pth`, `.safetensors`;
    /// what AUTOMATIC1111's ControlNet extension loads), renamed as diffusers'
    /// `scripts/convert_original_t2iadapter.py` does. The full adapter (`Adapter`: `conv_in`,
    /// `body.k` flat over `unetLevels` levels of resnets, `in_conv` where the width changes) or
    /// the light one (`Adapter_light`: `body.i.in_conv`, `body.i.body.j`, `body.i.out_conv`;
    /// the color adapter); both read 8x8 pixel-unshuffled pictures. Shapes give the config.
    public static func loadOriginal(_ path: String, unetLevels: Int) throws -> T2IAdapterComponent {
        let file = try TensorFiles.open(path)
        func fail(_ why: String) -> ModelSourceError { .checkpointLayout(file: path, detail: why) }
        func shape(_ key: String) -> [Int]? { file.info(key)?.shape }
        // body.<k>.<rest> → (k, rest)
        let body = file.tensorNames.compactMap { name -> (Int, String)? in
            guard name.hasPrefix("body."), let dot = name.dropFirst(5).firstIndex(of: "."), let k = Int(name.dropFirst(5)[..<dot]) else { return nil }
            return (k, String(name[name.index(after: dot)...]))
        }
        guard !body.isEmpty else { throw fail("has no body.* tensors: not a T2I-Adapter in TencentARC's layout") }
        if let odd = body.first(where: { $0.1.hasPrefix("skep.") || $0.1.hasPrefix("down_opt.") }) {
            throw fail("has body.\(odd.0).\(odd.1): an adapter with shortcut or strided-conv downsampling, which diffusers does not convert")
        }
        let light = body.contains { $0.1.hasPrefix("body.") }
        var config = T2IAdapter.Configuration()
        var entries: [(name: String, entry: MappedTensorSource.Entry)] = []
        func map(_ from: String, _ to: String) { entries.append(("adapter." + to, .init(source: from))) }
        let count = file.indices(under: "body.").count
        if light {
            config.adapterType = .lightAdapter
            guard let first = shape("body.0.in_conv.weight"), first.count == 4 else { throw fail("has no body.0.in_conv.weight") }
            config.numResBlocks = file.indices(under: "body.0.body.").count
            config.channels = try (0..<(count - 1)).map { i in
                guard let s = shape("body.\(i).out_conv.weight") else { throw fail("has no body.\(i).out_conv.weight") }
                return s[0]
            }
            config.inChannels = first[1] / 64
            guard first[1] % 64 == 0 else { throw fail("body.0.in_conv takes \(first[1]) channels, not an 8x8 unshuffled picture's") }
            for (k, rest) in body {
                if rest.hasPrefix("body.") {
                    let j = rest.dropFirst(5).prefix { $0 != "." }
                    map("body.\(k).\(rest)", "body.\(k).resnets.\(j).\(rest.dropFirst(5 + j.count + 1))")
                } else {
                    map("body.\(k).\(rest)", "body.\(k).\(rest)")
                }
            }
        } else {
            config.adapterType = .fullAdapter
            guard let convIn = shape("conv_in.weight"), convIn.count == 4, convIn[1] % 64 == 0 else {
                throw fail("has no conv_in.weight taking an 8x8 unshuffled picture: not a full T2I-Adapter in TencentARC's layout")
            }
            guard unetLevels > 0, count % unetLevels == 0 else {
                throw fail("has \(count) resnet blocks, which do not divide among the UNet's \(unetLevels) levels: it was made for another model")
            }
            config.inChannels = convIn[1] / 64
            config.numResBlocks = count / unetLevels
            config.channels = try (0..<unetLevels).map { i in
                guard let s = shape("body.\(i * config.numResBlocks).block1.weight") else { throw fail("has no body.\(i * config.numResBlocks).block1.weight") }
                return s[0]
            }
            map("conv_in.weight", "conv_in.weight")
            map("conv_in.bias", "conv_in.bias")
            for (k, rest) in body {
                let (i, j) = (k / config.numResBlocks, k % config.numResBlocks)
                map("body.\(k).\(rest)", rest.hasPrefix("in_conv.") ? "body.\(i).\(rest)" : "body.\(i).resnets.\(j).\(rest)")
            }
        }
        let model = try T2IAdapter(config: config)
        let weights = try MappedTensorSource(base: file, entries: entries, origin: path)
        try model.checkWeights(weights)
        return T2IAdapterComponent(name: path, model: model, weights: ModelWeights(weights))
    }

    /// The adapter's input from a picture, as diffusers' `_preprocess_adapter_image`: a PIL
    /// lanczos resize to the output size, then [0, 1], channels first. A one-channel (sketch)
    /// adapter reads the picture in gray (PIL `convert("L")`, which is what its users pass).
    func input(_ image: Image, width: Int, height: Int) throws -> Tensor {
        let channels = model.config.inChannels
        guard channels == 1 || channels == 3 else {
            throw PipelineError("\(name) takes \(channels)-channel images; pictures give 1 (gray) or 3 (RGB)")
        }
        let resized = image.converted(channels: channels).resized(width: width, height: height, filter: .lanczos)
        return VaeImageProcessor.numpyToPt(VaeImageProcessor.pilToNumpy([resized]))
    }
}

/// What one T2I-Adapter follows, and how strongly.
public struct T2IAdapterGuidance: Sendable {
    /// The conditioning image (a sketch, edges, depth, a pose), resized to the output size.
    public var image: Image
    /// diffusers' `adapter_conditioning_scale`: the weight of its features (with several
    /// adapters, one each: `MultiAdapter`'s weights).
    public var conditioningScale: Double

    public init(image: Image, conditioningScale: Double = 1) {
        self.image = image
        self.conditioningScale = conditioningScale
    }
}

extension StableDiffusionComponents {
    /// Fails unless the adapters can feed this UNet: each feature the UNet takes must have the
    /// width and scale of its down block (a feature left over after the down blocks reaches the
    /// mid block only when its shape matches, as in diffusers). Several adapters must shrink
    /// images alike, as diffusers' `MultiAdapter` requires.
    public func checkT2IAdapters(_ adapters: [T2IAdapterComponent]) throws {
        guard let first = adapters.first else { return }
        for a in adapters.dropFirst() where a.model.downscaleFactor != first.model.downscaleFactor
            || a.model.totalDownscaleFactor != first.model.totalDownscaleFactor {
            throw PipelineError("the T2I-Adapters \(first.name) and \(a.name) shrink images differently (downscale factor "
                                + "\(first.model.downscaleFactor) vs \(a.model.downscaleFactor), in total \(first.model.totalDownscaleFactor) "
                                + "vs \(a.model.totalDownscaleFactor)): several adapters' features add up, so they must match")
        }
        let u = unet.config, vaeScale = vae.model.spatialScaleFactor
        // Scales as fractions of the image at a size every factor divides.
        let side = (vaeScale << u.blockOutChannels.count) * first.model.totalDownscaleFactor
        for a in adapters {
            let features = a.model.featureShapes(height: side, width: side)
            var problems: [String] = []
            for (i, crossAttention) in u.downBlocksHaveCrossAttention.enumerated() where i < features.count {
                // A cross-attention block takes its feature before its downsampler, a plain one after.
                let halvings = i + (!crossAttention && i < u.downBlockTypes.count - 1 ? 1 : 0)
                let want = [u.blockOutChannels[i], (side / vaeScale) >> halvings]
                let have = [features[i][0], features[i][1]]
                if want != have {
                    problems.append("feature \(i) has \(have[0]) channels at 1/\(side / have[1]) of the image, but down block \(i) "
                                    + "takes \(want[0]) at 1/\(side / want[1])")
                }
            }
            guard problems.isEmpty else {
                throw PipelineError("\(a.name) is not a T2I-Adapter for \(name): \(problems.joined(separator: "; "))")
            }
        }
    }
}

extension StableDiffusionPipeline {
    /// The adapters' features for this request, as the UNet adds them: each adapter's times its
    /// scale, summed over adapters (diffusers' `T2IAdapter` output times the scale, or
    /// `MultiAdapter`'s weighted sum, in that order), one row per UNet row. Computed once.
    func t2iAdapterStates(_ r: GenerationRequest, width: Int, height: Int, rows: Int) throws -> [Tensor] {
        var sums: [Tensor] = []
        for (adapter, guidance) in zip(components.t2iAdapters, r.t2iAdapters) {
            let exe = try executable("t2i_adapter.\(adapter.name)|\(height)x\(width)", weights: adapter.weights, options: compileOptions) {
                try adapter.model.graph(batch: 1, height: height, width: width)
            }
            let out = try exe.run([T2IAdapter.Name.image: try backend.upload(try adapter.input(guidance.image, width: width, height: height))])
            let scale = Float(guidance.conditioningScale)
            for i in 0..<out.count {
                let feature = try out[T2IAdapter.Name.feature(i)]!.toHost().converted(to: .float32)
                if i == sums.count { sums.append(Tensor(zeros: feature.shape)) }  // 0 + w·f is w·f exactly
                for j in 0..<feature.count { sums[i].floats[j] += scale * feature.floats[j] }
            }
        }
        release("t2i_adapter", components.t2iAdapters.map(\.weights))
        return sums.map { repeatRows($0, rows) }
    }

    /// How many UNet evaluations from the start get the adapters' features: diffusers' SDXL
    /// adapter pipeline's `i < int(num_inference_steps * adapter_conditioning_factor)`, which
    /// counts evaluations against the steps asked for (or, with `denoising_end`, those kept).
    /// SD 1.x/2.x's pipeline has no factor and adapts every evaluation, which a factor of 1 keeps.
    func t2iAdaptedEvaluations(_ r: GenerationRequest, total: Int) -> Int {
        if !components.isXL && r.adapterConditioningFactor == 1 { return total }
        return Int(Double(r.denoisingEnd == nil ? r.steps : total) * r.adapterConditioningFactor)
    }
}
