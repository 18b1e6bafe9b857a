import DiffuseCore
import DiffuseGraph
import DiffuseModels

/// An IP-Adapter file as h94/IP-Adapter publishes them (`ip-adapter_sd15.safetensors`,
/// `ip-adapter-plus_sdxl_vit-h.bin`, `ip-adapter-full-face_sd15.safetensors`, ...): the image projection under `image_proj.` and, for
/// each cross-attention layer of the UNet, `ip_adapter.<id>.to_k_ip.weight` and
/// `.to_v_ip.weight` (ids 1, 3, 5, … in diffusers' `attn_processors` order). diffusers'
/// `load_ip_adapter` reads the same files.
public struct IPAdapterComponent {
    public var name: String
    public var projection: IPAdapterImageProjection
    /// The whole file; the projection's weights keep its names.
    public var weights: ModelWeights

    public init(name: String, projection: IPAdapterImageProjection, weights: ModelWeights) {
        self.name = name
        self.projection = projection
        self.weights = weights
    }

    /// Opens a `.safetensors` file or a PyTorch file (`.bin`, whose nested `image_proj` and
    /// `ip_adapter` dicts read as the same dotted names).
    public static func load(_ path: String) throws -> IPAdapterComponent {
        guard Files.exists(path) else { throw PipelineError("IP-Adapter \(path): no such file") }
        guard !Files.isDirectory(path) else {
            throw PipelineError("IP-Adapter \(path) is a folder; give the adapter file (e.g. models/ip-adapter_sd15.safetensors)")
        }
        let source = try TensorFiles.open(path)
        let projection = try IPAdapterImageProjection(weights: source)
        try projection.checkDeclaredWeights(source)
        guard source.tensorNames.contains(where: { $0.hasPrefix("ip_adapter.") }) else {
            throw PipelineError("IP-Adapter \(path) has no ip_adapter.* attention weights")
        }
        return IPAdapterComponent(name: path, projection: projection, weights: ModelWeights(source))
    }

    /// What `diffuse inspect` says of the file.
    public var summary: [String] {
        let p = projection
        let kind: String
        switch p.kind {
        case .imageProjection(let d, let t):
            kind = "IP-Adapter image projection (diffusers' ImageProjection): image_embeds of \(d) channels to \(t) tokens"
        case .plus(let d, let hidden, let q, let heads, let depth):
            kind = "IP-Adapter Plus resampler (IPAdapterPlusImageProjection): penultimate hidden states of \(d) channels to \(q) tokens (\(depth) blocks, width \(hidden), \(heads) heads of 64)"
        case .full(let d):
            kind = "IP-Adapter Full projection (IPAdapterFullImageProjection): every penultimate hidden state of \(d) channels a token"
        }
        let layers = weights.source.tensorNames.filter { $0.hasPrefix("ip_adapter.") && $0.hasSuffix(".to_k_ip.weight") }.count
        return [kind, "tokens of \(p.crossAttentionDim) channels (the UNet's cross_attention_dim) for \(layers) cross-attention layers"]
    }

    /// This adapter's attention weights under the names the UNet graph declares for adapter
    /// `index` (`<layer>.processor.to_k_ip.<index>.weight`, diffusers' once loaded). Fails,
    /// naming the file, unless it fits the UNet: a `[channels, cross_attention_dim]` pair for
    /// every cross-attention layer.
    public func attentionWeights(for unet: UNet2DConditionModel, index: Int) throws -> TensorSource {
        let file = weights.source
        let cross = unet.config.crossAttentionDims[0]
        guard projection.crossAttentionDim == cross else {
            throw PipelineError("IP-Adapter \(name) makes tokens of \(projection.crossAttentionDim) channels; the UNet's cross-attention takes \(cross): it was made for another model")
        }
        let layers = unet.crossAttentionLayers
        var names: [(name: String, entry: MappedTensorSource.Entry)] = []
        for (i, layer) in layers.enumerated() {
            for kind in ["to_k_ip", "to_v_ip"] {
                let original = "ip_adapter.\(2 * i + 1).\(kind).weight"
                guard let info = file.info(original) else {
                    throw PipelineError("IP-Adapter \(name) has no \(original) for the UNet's cross-attention \(layer.path): it was made for another model")
                }
                guard info.shape == [layer.channels, cross] else {
                    throw PipelineError("IP-Adapter \(name): \(original) has shape \(info.shape); the UNet's \(layer.path) needs [\(layer.channels), \(cross)]: it was made for another model")
                }
                names.append(("\(layer.path).processor.\(kind).\(index).weight", .init(source: original)))
            }
        }
        let extra = file.tensorNames.filter { $0.hasPrefix("ip_adapter.") }.count - names.count
        if extra > 0 {
            throw PipelineError("IP-Adapter \(name) has \(extra) more attention weights than the UNet's \(layers.count) cross-attention layers take: it was made for another model")
        }
        return try MappedTensorSource(base: file, entries: names, origin: file.origin)
    }
}

/// The image encoder IP-Adapters read (`image_encoder/`, a `CLIPVisionModelWithProjection`)
/// and the preprocessing its inputs get.
public struct ImageEncoderComponent {
    public var name: String
    public var model: CLIPVisionModelWithProjection
    public var weights: ModelWeights
    public var processor: CLIPImageProcessor

    /// Opens an image-encoder folder (config.json and its weights) or a Hugging Face cache repo
    /// id. The processor is `featureExtractor`'s `preprocessor_config.json` when given (a
    /// pipeline's `feature_extractor/`), else diffusers' default for the encoder's image size.
    public static func load(_ location: String, featureExtractor: String? = nil,
                            options: ModelSourceOptions = .init()) throws -> ImageEncoderComponent {
        let (folder, configPath) = try ModelLocation.componentFolder(location, hubCache: options.hubCache, component: "image_encoder",
                                                                     what: "an image encoder")
        let model = try CLIPVisionModelWithProjection(configPath: configPath)
        let source = try DiffusersFolder.component(name: "image_encoder", library: "transformers",
                                                   className: CLIPVisionModelWithProjection.className,
                                                   folder: folder, variant: options.variant, listedIn: nil)
        let weights = try source.requireWeights()
        try model.checkWeights(weights)
        let processor = try processor(featureExtractor, for: model, what: "the image encoder \(folder)")
        return ImageEncoderComponent(name: folder, model: model, weights: ModelWeights(weights), processor: processor)
    }

    /// The `preprocessor_config.json` at `featureExtractor` (else diffusers' default for the
    /// encoder's image size), which must make the pictures `model` takes.
    static func processor(_ featureExtractor: String?, for model: CLIPVisionModelWithProjection, what: String) throws -> CLIPImageProcessor {
        let processor = try featureExtractor.map { try CLIPImageProcessor(configPath: $0) }
            ?? CLIPImageProcessor(imageSize: model.config.imageSize)
        let out = processor.outputSize
        guard out.height == model.config.imageSize && out.width == model.config.imageSize else {
            throw PipelineError("\(featureExtractor ?? "the image processor") makes \(out.width)x\(out.height) pictures; \(what) takes \(model.config.imageSize)x\(model.config.imageSize)")
        }
        return processor
    }

    /// The image encoder for IP-Adapters as diffusers finds one: `explicit` when given, else the
    /// model folder's `image_encoder/` (a pipeline's own), else `image_encoder/` beside the
    /// adapter file. A model folder's `feature_extractor/` sets the preprocessing, as diffusers
    /// uses a pipeline's own processor.
    public static func find(_ explicit: String?, model: String?, adapter: String,
                            options: ModelSourceOptions = .init()) throws -> ImageEncoderComponent {
        let modelFolder = try model.flatMap { try ModelLocation.resolve($0, hubCache: options.hubCache).folder }
        let featureExtractor = modelFolder.flatMap(StableDiffusionComponents.featureExtractorConfig(in:))
        if let explicit { return try load(explicit, featureExtractor: featureExtractor, options: options) }
        if let folder = modelFolder.map({ Files.join($0, "image_encoder") }), Files.exists(Files.join(folder, "config.json")) {
            return try load(folder, featureExtractor: featureExtractor, options: options)
        }
        guard let beside = besideAdapter(adapter) else {
            throw PipelineError("no image encoder for the IP-Adapter \(adapter): the model has no image_encoder/ and none is beside the file; give one (e.g. h94/IP-Adapter's models/image_encoder)")
        }
        return try load(beside, featureExtractor: featureExtractor, options: options)
    }

    /// Where an IP-Adapter file's image encoder is in h94/IP-Adapter's layout: `image_encoder/`
    /// beside the file (`models/image_encoder` for `models/ip-adapter_sd15.safetensors`), as
    /// diffusers' `load_ip_adapter(..., image_encoder_folder="image_encoder")` looks for it.
    public static func besideAdapter(_ adapterPath: String) -> String? {
        let folder = Files.join(Files.directory(of: adapterPath), "image_encoder")
        return Files.exists(Files.join(folder, "config.json")) ? folder : nil
    }
}

/// One IP-Adapter's images and scale in a request (diffusers' `ip_adapter_image` entry and
/// `set_ip_adapter_scale`).
public struct IPAdapterGuidance: Sendable {
    /// The reference pictures; several give their tokens side by side.
    public var images: [Image]
    public var scale: IPAdapterScale
    /// One mask per picture (diffusers' `ip_adapter_masks`, after `IPAdapterMaskProcessor`):
    /// resized to the output, gray, white (from half up) where that picture applies. Each picture
    /// is then attended to apart, weighted by its mask at each attention layer. nil: everywhere.
    public var masks: [Image]?

    public init(images: [Image], scale: IPAdapterScale = .uniform(1), masks: [Image]? = nil) {
        self.images = images
        self.scale = scale
        self.masks = masks
    }
}

extension StableDiffusionPipeline {
    /// Each IP-Adapter's image tokens as the denoiser takes them, [rows, images × tokens, C]
    /// with rows [negative × count, positive × count] under guidance, else [positive × count]:
    /// diffusers' `prepare_ip_adapter_image_embeds` (the CLIP image processor, the image
    /// encoder's `image_embeds` or penultimate hidden states; negatives are zeros, or for the
    /// hidden states the encoder's output for an all-zero input), then the UNet's
    /// `encoder_hid_proj`, computed once per generation instead of at every step.
    func ipAdapterTokens(_ r: GenerationRequest, count n: Int, guidance: Bool) throws -> [Tensor] {
        let c = components
        guard !c.ipAdapters.isEmpty, let encoder = c.imageEncoder else { return [] }
        let options = textEncoderCompileOptions
        var result: [Tensor] = []
        for (adapter, request) in zip(c.ipAdapters, r.ipAdapters) {
            let m = request.images.count
            let pixels = concatenate(request.images.map { encoder.processor.pixelValues($0) }, axis: 0)
            let output = adapter.projection.imageEncoderOutput
            func encode(_ x: Tensor) throws -> Tensor {
                let exe = try executable("image_encoder|\(m)|\(output.name)", weights: encoder.weights, options: options) {
                    try encoder.model.graph(batch: m, outputs: [output])
                }
                return try exe.run([CLIPVisionModelWithProjection.pixelValues: try backend.upload(x)])[output.name]!
                    .toHost().converted(to: .float32).copy()
            }
            let positive = try encode(pixels)
            var embeds = positive
            if guidance {
                let negative = output == .imageEmbeds ? Tensor(zeros: positive.shape) : try encode(Tensor(zeros: pixels.shape))
                embeds = concatenate([negative, positive], axis: 0)
            }
            let rows = embeds.shape[0]
            let sequence = embeds.rank == 3 ? embeds.shape[1] : 1
            let exe = try executable("ip_adapter|\(adapter.name)|\(rows)|\(sequence)", weights: adapter.weights, options: options) {
                try adapter.projection.graph(batch: rows, sequence: sequence)
            }
            let tokens = try exe.run([IPAdapterImageProjection.input: try backend.upload(embeds)])[IPAdapterImageProjection.output]!
                .toHost().converted(to: .float32).copy()
            // Each group of m images becomes one row of m × tokens tokens, repeated per image made.
            let (t, width) = (tokens.shape[1], tokens.shape[2])
            let groups = (0..<(rows / m)).map { g in tokens.slice((g * m)..<((g + 1) * m)).copy().reshaped([1, m * t, width]) }
            result.append(concatenate(groups.flatMap { Array(repeating: $0, count: n) }, axis: 0))
        }
        release("image_encoder", [encoder.weights])
        release("ip_adapter", c.ipAdapters.map(\.weights))
        return result
    }
}

/// diffusers' `IPAdapterMaskProcessor.downsample`: a preprocessed mask (H × W, 0 or 1) as the
/// weights of an attention layer's `queries` queries. The grid keeps the mask's aspect ratio
/// (rows ⌊√(queries / ratio)⌋, one more unless they divide the queries, columns the quotient),
/// resized bicubically; queries past the grid get 0, and a larger grid is cut, as diffusers does
/// when the mask's shape is not the output's.
enum IPAdapterMaskDownsample {
    static func weights(_ plane: [Float], height: Int, width: Int, queries: Int) -> Tensor {
        let ratio = Double(width) / Double(height)
        var rows = max(Int((Double(queries) / ratio).squareRoot()), 1)
        if queries % rows != 0 { rows += 1 }
        let columns = queries / rows
        var grid = TorchInterpolate.bicubic(plane, height: height, width: width, toHeight: rows, toWidth: max(columns, 1))
        if grid.count < queries { grid += [Float](repeating: 0, count: queries - grid.count) }
        return Tensor(shape: [1, queries, 1], floats: Array(grid.prefix(queries)))
    }
}

/// Graph inputs made once per name however often a model asks for them (an IP-Adapter mask at
/// each attention layer of the same size).
final class GraphInputs {
    let builder: GraphBuilder
    var made: [String: Value] = [:]

    init(_ builder: GraphBuilder) { self.builder = builder }

    subscript(_ name: String, _ shape: [Int]) -> Value {
        if let v = made[name] { return v }
        let v = builder.input(name, shape: shape)
        made[name] = v
        return v
    }
}
