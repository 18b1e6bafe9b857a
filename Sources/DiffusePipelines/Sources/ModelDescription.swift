import DiffuseCore

/// What `diffuse inspect` prints: a model's components (class, config, weights, parameter count,
/// dtypes, key settings), or for a single `.safetensors` file its detected layout and tensors.
public struct ModelDescription: CustomStringConvertible {
    public struct Component {
        public let name: String
        public let className: String
        public let kind: ComponentKind
        /// Where the config and the weights (or tokenizer files) come from.
        public let configOrigin: String?
        public let weightsOrigin: String?
        public let variant: String?
        /// Sum of the element counts of the weights (`sum(p.numel())`).
        public let parameterCount: Int
        public let tensorCount: Int
        /// Tensors and elements per dtype, most elements first.
        public let dtypes: [(dtype: DType, tensors: Int, elements: Int)]
        /// The settings worth seeing at a glance, as `key = value`.
        public let settings: [(key: String, value: String)]
        public let notes: [String]
    }

    public struct TensorEntry: Equatable {
        public let name: String
        public let dtype: DType
        public let shape: [Int]
    }

    /// What was inspected.
    public let origin: String
    /// `diffusers folder`, `Hugging Face cache …`, `single-file checkpoint …`, or a file's layout.
    public let kind: String
    public let pipelineClass: String?
    public let components: [Component]
    public let skipped: [(name: String, className: String)]
    /// For a `.safetensors` file: every tensor, in file order, and the detected layout.
    public let layout: SafeTensorsLayout?
    public let tensors: [TensorEntry]
    public let metadata: [(String, String)]
    public let notes: [String]

    /// Describes what `location` names. A `.safetensors` file is always described (its tensors and
    /// layout, plus its components when it is a checkpoint that opens); a malformed file, or a
    /// folder or repo id that does not open, is one error.
    public static func describe(_ location: String, options: ModelSourceOptions = .init()) throws -> ModelDescription {
        let lower = location.lowercased()
        if Files.exists(location) && !Files.isDirectory(location)
            && (lower.hasSuffix(".safetensors") || lower.hasSuffix(".index.json") || TensorFiles.checkpointExtensions.contains(where: { lower.hasSuffix($0) })) {
            return try describeFile(location, options: options)
        }
        if let component = try describeComponentFolder(location, options: options) { return component }
        return try describe(try ModelSource.open(location, options: options))
    }

    /// A folder (or cached repo) holding one model, not a pipeline: a config.json naming a
    /// diffusers class (`_class_name`: a ControlNet, a T2I-Adapter, a UNet) or a transformers
    /// one (`architectures`: an image encoder) beside its weights. nil for anything else.
    static func describeComponentFolder(_ location: String, options: ModelSourceOptions) throws -> ModelDescription? {
        guard let folder = try? ModelLocation.resolve(location, hubCache: options.hubCache).folder,
              !Files.exists(Files.join(folder, "model_index.json")), Files.exists(Files.join(folder, "config.json")) else { return nil }
        let json = try ConfigFile(path: Files.join(folder, "config.json")).object()
        let (className, library): (String, String)
        if let name = json["_class_name"]?.string {
            (className, library) = (name, "diffusers")
        } else if let name = json["architectures"]?.array?.first?.string {
            (className, library) = (name, "transformers")
        } else {
            return nil
        }
        guard ComponentKind(className: className) == .model else { return nil }
        let source = try DiffusersFolder.component(name: Files.lastComponent(folder), library: library, className: className,
                                                   folder: folder, variant: options.variant, listedIn: nil)
        return ModelDescription(origin: location, kind: "\(library) model folder", pipelineClass: nil, components: [try describe(source)],
                                skipped: [], layout: nil, tensors: [], metadata: [], notes: [])
    }

    public static func describe(_ source: ModelSource) throws -> ModelDescription {
        let kind: String
        switch source.kind {
        case .diffusersFolder: kind = "diffusers folder"
        case let .huggingFaceCache(repo, revision, commit): kind = "Hugging Face cache: \(repo) at \(revision) (\(commit)), \(source.path ?? "")"
        case let .singleFile(layout, configs): kind = "\(layout), configs from \(configs)"
        case .builtIn(let a): kind = "built-in architecture \(a.name): \(a.summary)"
        }
        return ModelDescription(origin: source.origin, kind: kind, pipelineClass: source.pipelineClass,
                                components: try source.components.map(describe), skipped: source.skipped, layout: nil,
                                tensors: [], metadata: [], notes: source.notes)
    }

    static func describeFile(_ path: String, options: ModelSourceOptions) throws -> ModelDescription {
        let file = try TensorFiles.open(path)
        let layout = SafeTensorsLayout.detect(file)
        let tensors = file.tensorNames.map { name -> TensorEntry in
            let info = file.info(name)!
            return TensorEntry(name: name, dtype: info.dtype, shape: info.shape)
        }
        let metadata = (file as? SafeTensorsFile)?.metadata ?? []
        var components: [Component] = []
        var pipelineClass: String?
        var notes: [String] = []
        var kind = layout.description
        switch layout {
        case .stableDiffusion:
            // A checkpoint that does not map still gets its tensors listed, with the reason.
            do {
                let source = try SingleFileCheckpoint.open(file: file, origin: path, options: options)
                components = try source.components.map(describe)
                pipelineClass = source.pipelineClass
                notes = source.notes
                if case let .singleFile(_, configs) = source.kind { kind += ", configs from \(configs)" }
            } catch {
                notes.append("cannot be opened as a model: \(error)")
            }
        case .ldmVAE, .diffusersVAE, .tinyVAE:
            do {
                components = [try describe(try VAESource.openFile(file, origin: path))]
            } catch {
                notes.append("cannot be opened as a VAE: \(error)")
            }
        default:
            // A LoRA file: what it adapts, listed before its tensors.
            if let lora = try? LoRAFile(path: path) {
                kind = "LoRA adapter, \(lora.format.rawValue) format"
                notes += lora.summary
            } else if let adapter = try? IPAdapterComponent.load(path) {
                kind = "IP-Adapter"
                notes += adapter.summary
            } else if let embedding = try? TextualInversion(path: path) {
                kind = "textual-inversion embedding"
                notes += embedding.summary
            }
        }
        let skipped: [(name: String, className: String)] = []
        return ModelDescription(origin: path, kind: kind, pipelineClass: pipelineClass, components: components, skipped: skipped,
                                layout: layout, tensors: tensors, metadata: metadata, notes: notes)
    }

    static func describe(_ c: ComponentSource) throws -> Component {
        var count = 0
        var byType: [DType: (tensors: Int, elements: Int)] = [:]
        if let weights = c.weights {
            for name in weights.tensorNames {
                guard let info = weights.info(name) else { continue }
                let n = info.shape.reduce(1, *)
                count += n
                byType[info.dtype, default: (0, 0)].tensors += 1
                byType[info.dtype, default: (0, 0)].elements += n
            }
        }
        let dtypes = byType.map { (dtype: $0.key, tensors: $0.value.tensors, elements: $0.value.elements) }
            .sorted { $0.elements > $1.elements }
        let weightsOrigin: String?
        switch c.tokenizer {
        case .folder(let f)?: weightsOrigin = f
        case .builtInCLIP?: weightsOrigin = EmbeddedCLIPVocabulary.origin
        case nil: weightsOrigin = c.weights?.origin
        }
        return Component(name: c.name, className: c.className, kind: c.kind, configOrigin: c.config?.origin, weightsOrigin: weightsOrigin,
                         variant: c.variant, parameterCount: count, tensorCount: c.weights?.tensorNames.count ?? 0, dtypes: dtypes,
                         settings: try settings(c), notes: c.notes)
    }

    /// The settings that tell models of a class apart.
    static func settings(_ c: ComponentSource) throws -> [(key: String, value: String)] {
        if c.kind == .tokenizer {
            let t = try c.makeTokenizer()
            return [("vocab_size", "\(t.vocabSize)"), ("pad_token", JSON.quote(t.padToken)), ("model_max_length", "\(t.modelMaxLength)")]
        }
        guard let config = c.config else { return [] }
        let json = try config.object()
        let keys: [String]
        switch c.className {
        case "UNet2DConditionModel":
            keys = ["sample_size", "in_channels", "block_out_channels", "layers_per_block", "down_block_types", "mid_block_type",
                    "cross_attention_dim", "attention_head_dim", "transformer_layers_per_block", "use_linear_projection",
                    "addition_embed_type", "upcast_attention", "time_cond_proj_dim"]
        case "AutoencoderKL":
            keys = ["block_out_channels", "latent_channels", "scaling_factor", "shift_factor", "force_upcast"]
        case "AutoencoderTiny":
            keys = ["latent_channels", "encoder_block_out_channels", "decoder_block_out_channels", "scaling_factor", "use_midblock_gn"]
        case "ControlNetModel", "ControlNetUnionModel":
            keys = ["in_channels", "block_out_channels", "down_block_types", "cross_attention_dim", "conditioning_channels",
                    "conditioning_embedding_out_channels", "controlnet_conditioning_channel_order", "global_pool_conditions",
                    "addition_embed_type"]
                + (c.className == "ControlNetUnionModel" ? ["num_control_type", "num_trans_layer", "num_trans_head"] : [])
        case "T2IAdapter":
            keys = ["adapter_type", "in_channels", "channels", "num_res_blocks", "downscale_factor"]
        case "CLIPVisionModelWithProjection":
            keys = ["hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size", "projection_dim"]
        case "CLIPTextModel", "CLIPTextModelWithProjection":
            keys = ["hidden_size", "num_hidden_layers", "num_attention_heads", "hidden_act", "vocab_size"]
                + (c.className == "CLIPTextModelWithProjection" ? ["projection_dim"] : [])
        default:
            keys = c.kind == .scheduler
                ? ["_class_name", "prediction_type", "timestep_spacing", "beta_schedule", "beta_start", "beta_end", "num_train_timesteps",
                   "steps_offset", "use_karras_sigmas"]
                : []
        }
        return keys.compactMap { key in json[key].map { (key, $0.description) } }
    }

    public var description: String {
        var lines = ["\(origin)", "  \(kind)"]
        if let pipelineClass { lines.append("  pipeline: \(pipelineClass)") }
        for c in components {
            var head = "  \(c.name): \(c.className)"
            if c.kind == .model && c.tensorCount > 0 {
                let types = c.dtypes.map { "\($0.dtype) \($0.tensors)" }.joined(separator: ", ")
                head += " — \(Self.grouped(c.parameterCount)) parameters in \(c.tensorCount) tensors (\(types))"
            }
            if let v = c.variant { head += ", variant \(v)" }
            lines.append(head)
            if let o = c.configOrigin { lines.append("      config: \(o)") }
            if let o = c.weightsOrigin { lines.append("      \(c.kind == .tokenizer ? "files" : "weights"): \(o)") }
            if !c.settings.isEmpty { lines.append("      " + c.settings.map { "\($0.key)=\($0.value)" }.joined(separator: " ")) }
            lines += c.notes.map { "      note: \($0)" }
        }
        // Image variation's and Stable unCLIP's image encoder, and depth to image's depth
        // estimator, with their preprocessing, are read apart from the other components (as
        // IP-Adapters' are), not left unused.
        let embedsPicture = ["StableDiffusionImageVariationPipeline", "StableUnCLIPImg2ImgPipeline"].contains(pipelineClass ?? "")
        let depth = pipelineClass == "StableDiffusionDepth2ImgPipeline"
        let apart: Set<String> = embedsPicture ? ["image_encoder", "feature_extractor"] : depth ? ["depth_estimator", "feature_extractor"] : []
        let checker = skipped.contains { $0.name == "safety_checker" }
        let checking: Set<String> = checker ? ["safety_checker", "feature_extractor"] : []
        let read = skipped.filter { apart.contains($0.name) }
        let unused = skipped.filter { !apart.contains($0.name) && !checking.contains($0.name) }
        if checker {
            lines.append("  run on every image made, as diffusers does (--no-safety-checker skips it): "
                         + skipped.filter { checking.contains($0.name) }.map { "\($0.name) (\($0.className))" }.joined(separator: ", "))
        }
        if !read.isEmpty {
            lines.append("  read " + (depth ? "to estimate the picture's depth when no depth map is given: " : "for the picture's CLIP image embedding: ")
                         + read.map { "\($0.name) (\($0.className))" }.joined(separator: ", "))
        }
        if !unused.isEmpty {
            lines.append("  not used: " + unused.map { "\($0.name) (\($0.className))" }.joined(separator: ", "))
        }
        lines += notes.map { "  note: \($0)" }
        if !metadata.isEmpty { lines.append("  metadata: " + metadata.map { "\($0.0)=\($0.1)" }.joined(separator: ", ")) }
        if !tensors.isEmpty {
            let total = tensors.reduce(0) { $0 + $1.shape.reduce(1, *) }
            lines.append("  \(tensors.count) tensors, \(Self.grouped(total)) elements:")
            let width = min(tensors.map(\.name.count).max() ?? 0, 96)
            for t in tensors {
                let padded = t.name.count < width ? t.name + String(repeating: " ", count: width - t.name.count) : t.name
                lines.append("    \(padded)  \(t.dtype)  \(t.shape)")
            }
        }
        return lines.joined(separator: "\n")
    }

    /// 859520964 → "859,520,964".
    static func grouped(_ n: Int) -> String {
        let digits = Array(String(n))
        var out = ""
        for (i, d) in digits.enumerated() {
            if i > 0 && (digits.count - i) % 3 == 0 { out.append(",") }
            out.append(d)
        }
        return out
    }
}
