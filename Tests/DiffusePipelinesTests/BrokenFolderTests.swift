import DiffuseCore
import DiffuseTokenizer
import DiffusePipelines
import FoundationEssentials
import Testing

/// A writable copy of a reference pipeline folder to break in one way per test.
struct FolderCopy {
    let dir: TemporaryDirectory
    let model: ReferenceModel
    var path: String { dir.join(model.variant) }

    init(_ model: ReferenceModel? = nil) throws {
        self.model = try model ?? #require(try ReferenceModel.all().first)
        dir = try TemporaryDirectory()
        try copyTree(self.model.folder, to: dir.join(self.model.variant))
    }

    func join(_ parts: String...) -> String { parts.reduce(path) { Files.join($0, $1) } }
    func remove(_ relative: String) throws { try FileManager.default.removeItem(atPath: join(relative)) }
    func write(_ relative: String, _ text: String) throws { try Files.write(Array(text.utf8), to: join(relative)) }
    func move(_ from: String, _ to: String) throws { try FileManager.default.moveItem(atPath: join(from), toPath: join(to)) }

    /// The component's weights file name in the folder.
    func weightsFile(_ component: String) throws -> String {
        try #require(try Files.list(join(component)).first { $0.hasSuffix(".safetensors") })
    }

    func open(_ options: ModelSourceOptions = .init()) throws -> ModelSource { try ModelSource.open(path, options: options) }
}

@Suite("Sources: broken folders")
struct BrokenFolderTests {
    @Test func noModelIndex() throws {
        let copy = try FolderCopy()
        try copy.remove("model_index.json")
        let error = #expect(throws: ModelSourceError.self) { try copy.open() }
        guard case .notAPipeline(let folder, let detail)? = error else { Issue.record("\(String(describing: error))"); return }
        #expect(folder == copy.path && detail.contains("model_index.json"))
        // A component folder is told apart from a pipeline.
        let unet = try #require(message { try ModelSource.open(copy.join("unet")) })
        #expect(unet.contains("model_index.json") && unet.contains("UNet2DConditionModel") && unet.contains("one component"), "\(unet)")
    }

    @Test func listedComponentWithoutFolder() throws {
        let copy = try FolderCopy()
        try copy.remove("text_encoder")
        let error = #expect(throws: ModelSourceError.self) { try copy.open() }
        #expect(error == .missingComponentFolder(component: "text_encoder", className: "CLIPTextModel", folder: copy.join("text_encoder"),
                                                 modelIndex: copy.join("model_index.json")))
        #expect("\(error!)".contains("lists the component 'text_encoder'"))
    }

    @Test func componentWithoutConfig() throws {
        let copy = try FolderCopy()
        try copy.remove("unet/config.json")
        #expect(throws: ModelSourceError.missingFile(component: "unet", path: copy.join("unet/config.json"))) { try copy.open() }
        try copy.remove("scheduler/scheduler_config.json")
        try copy.write("unet/config.json", "{\"_class_name\": \"UNet2DConditionModel\"}")
        #expect(throws: ModelSourceError.missingFile(component: "scheduler", path: copy.join("scheduler/scheduler_config.json"))) { try copy.open() }
    }

    @Test func componentWithoutWeights() throws {
        let copy = try FolderCopy()
        let file = try copy.weightsFile("vae")
        try copy.move("vae/\(file)", "vae/weights-elsewhere.safetensors")
        let error = #expect(throws: ModelSourceError.self) { try copy.open() }
        guard case let .missingWeights(component, folder, expected, found)? = error else { Issue.record("\(String(describing: error))"); return }
        #expect(component == "vae" && folder == copy.join("vae"))
        #expect(expected.contains("diffusion_pytorch_model.safetensors") && found.contains("weights-elsewhere.safetensors"))
    }

    /// Folders that ship PyTorch `.bin` weights (older repos, transformers' pytorch_model.bin)
    /// load as the safetensors do; a `.bin` from before torch 1.6 is refused by name.
    @Test func pytorchWeightsLoadAsData() throws {
        let copy = try FolderCopy()
        let original = try copy.open()
        for (component, bin) in [("unet", "diffusion_pytorch_model.bin"), ("text_encoder", "pytorch_model.bin")] {
            let file = try copy.weightsFile(component)
            let weights = try SafeTensorsFile(path: copy.join(component, file))
            try writeTorchCheckpoint(try weights.tensorNames.map { ($0, try weights.tensor($0)) }, to: copy.join(component, bin))
            try copy.remove("\(component)/\(file)")
        }
        let reopened = try copy.open()
        for component in ["unet", "text_encoder"] {
            let a = try original.component(component).requireWeights(), b = try reopened.component(component).requireWeights()
            #expect(b is TorchCheckpointFile && a.tensorNames.sorted() == b.tensorNames.sorted(), "\(component)")
            for name in a.tensorNames { #expect(identical(try a.tensor(name), try b.tensor(name)), "\(component) \(name)") }
        }
        _ = try StableDiffusionComponents(source: reopened)
        try Files.write([0x80, 0x02, 0x8A, 0x0A] + [UInt8](repeating: 0, count: 16), to: copy.join("unet/diffusion_pytorch_model.bin"))
        #expect(message { try copy.open() }?.contains("unet/diffusion_pytorch_model.bin") == true)
    }

    @Test func invalidModelIndex() throws {
        let copy = try FolderCopy()
        try copy.write("model_index.json", "{\"_class_name\": \"StableDiffusionPipeline\", \"unet\": ")
        #expect(message { try copy.open() }?.contains(copy.join("model_index.json")) == true)

        try copy.write("model_index.json", "{\"unet\": [\"diffusers\", \"UNet2DConditionModel\"]}")
        #expect(message { try copy.open() }?.contains("_class_name") == true)

        try copy.write("model_index.json", "{\"_class_name\": \"StableDiffusionPipeline\", \"unet\": [\"diffusers\"]}")
        let text = try #require(message { try copy.open() })
        #expect(text.contains("\"unet\"") && text.contains("[library, class]"), "\(text)")
    }

    @Test func configClassDisagreesWithModelIndex() throws {
        let copy = try FolderCopy()
        let config = try Files.readText(copy.join("vae/config.json"))
        try copy.write("vae/config.json", config.replacingOccurrences(of: "\"AutoencoderKL\"", with: "\"AutoencoderTiny\""))
        let error = #expect(throws: ModelSourceError.self) { try copy.open() }
        guard case .inconsistent(let detail)? = error else { Issue.record("\(String(describing: error))"); return }
        #expect(detail.contains(copy.join("vae/config.json")) && detail.contains("AutoencoderTiny") && detail.contains("AutoencoderKL"))
    }

    @Test func tokenizerFiles() throws {
        let copy = try FolderCopy()
        try copy.remove("tokenizer/merges.txt")
        #expect(throws: ModelSourceError.missingFile(component: "tokenizer", path: copy.join("tokenizer/merges.txt"))) { try copy.open() }
        try copy.write("tokenizer/tokenizer.json", "{}")
        // With vocab.json still there the pair is what is read, and half of it is missing.
        #expect(throws: ModelSourceError.missingFile(component: "tokenizer", path: copy.join("tokenizer/merges.txt"))) { try copy.open() }
        // tokenizer.json alone is read (transformers 5 saves no other), and a broken one is named.
        try copy.remove("tokenizer/vocab.json")
        let text = message { try StableDiffusionComponents.load(copy.path) } ?? ""
        #expect(text.contains(copy.join("tokenizer/tokenizer.json")) && text.contains("model"), "\(text)")
    }

    /// A tokenizer.json holding a folder's vocabulary and merges (in either merges format the
    /// tokenizers library writes) tokenizes as the folder does.
    @Test(arguments: (try? ReferenceModel.all()) ?? []) func tokenizerJSON(model: ReferenceModel) throws {
        let variant = model.variant
        let dir = try TemporaryDirectory()
        let prompts = ["a photo of an astronaut!!", "Hello,   WORLD!! <|endoftext|> café", "", "a!b?c... 123 don't"]
        for name in ["tokenizer", "tokenizer_2"] where Files.exists(Files.join(model.folder, name, "vocab.json")) {
            let folder = Files.join(model.folder, name)
            let reference = try CLIPTokenizer(folder: folder)
            let vocab = try Files.readText(Files.join(folder, "vocab.json"))
            let merges = try Files.readText(Files.join(folder, "merges.txt")).split(separator: "\n")
                .filter { !$0.hasPrefix("#version") && !$0.isEmpty }.map(String.init)
            for pairs in [false, true] {
                let list = merges.map { m in
                    pairs ? "[" + m.split(separator: " ").map { JSON.quote(String($0)) }.joined(separator: ",") + "]" : JSON.quote(m)
                }
                let out = dir.join("\(name)-\(pairs)")
                try Files.createDirectory(out)
                try Files.write(Array(("{\"added_tokens\": [], \"model\": {\"type\": \"BPE\", \"end_of_word_suffix\": \"</w>\", "
                                       + "\"vocab\": \(vocab), \"merges\": [\(list.joined(separator: ","))]}}").utf8),
                                to: Files.join(out, "tokenizer.json"))
                for extra in ["tokenizer_config.json", "special_tokens_map.json"] where Files.exists(Files.join(folder, extra)) {
                    try Files.write(try Files.read(Files.join(folder, extra)), to: Files.join(out, extra))
                }
                let fast = try CLIPTokenizer(folder: out)
                for p in prompts { #expect(fast(p).inputIds == reference(p).inputIds, "\(variant)/\(name) pairs \(pairs): \(p)") }
            }
        }
    }

    @Test func damagedWeights() throws {
        let copy = try FolderCopy()
        let file = copy.join("unet", try copy.weightsFile("unet"))
        try Files.write(Array(try Files.read(file).prefix(64)), to: file)
        let text = try #require(message { try copy.open() })
        #expect(text.contains(file), "\(text)")
    }

    /// A broken extra folder (one model_index.json does not list) does not stop the model.
    @Test func brokenExtraFolder() throws {
        let model = try #require(try ReferenceModel.all().first { Files.isDirectory(Files.join($0.folder, "vae_tiny")) })
        let copy = try FolderCopy(model)
        try copy.remove("vae_tiny/\(try copy.weightsFile("vae_tiny"))")
        let source = try copy.open()
        #expect(source["vae_tiny"] == nil && source["vae"] != nil)
        #expect(source.notes.contains { $0.contains("vae_tiny") && $0.contains("not loaded") })
    }

    @Test func notAModel() throws {
        let dir = try TemporaryDirectory()
        let options = ModelSourceOptions(hubCache: dir.path)
        let missing = try #require(message { try ModelSource.open(dir.join("no/such/model"), options: options) })
        #expect(missing.contains("no such file or folder"))
        // A relative path with one slash reads as a repo id as well: the message says both.
        let relative = try #require(message { try ModelSource.open("models/absent", options: options) })
        #expect(relative.contains("not found in the Hugging Face cache") && relative.contains("no file or folder 'models/absent'"))
        try Files.write(Array("hello".utf8), to: dir.join("notes.txt"))
        #expect(message { try ModelSource.open(dir.join("notes.txt")) }?.contains("neither a checkpoint") == true)
    }
}

@Suite("Sources: variants and shards")
struct VariantTests {
    /// Writes every model component's weights again as `<base>.<variant>.safetensors` in `dtype`.
    func addVariant(_ copy: FolderCopy, _ variant: String, dtype: DType, only: Set<String>? = nil) throws {
        let source = try copy.open()
        for c in source.components where c.kind == .model && (only?.contains(c.name) ?? true) {
            let weights = try #require(c.weights)
            let base = try copy.weightsFile(c.name).split(separator: ".")[0]
            try SafeTensors.write(try weights.tensorNames.map { ($0, try weights.tensor($0).converted(to: dtype)) },
                                  to: copy.join(c.name, "\(base).\(variant).safetensors"))
        }
    }

    @Test func variantIsReadWhenAsked() throws {
        let copy = try FolderCopy()
        try addVariant(copy, "fp16", dtype: .float16)
        let plain = try copy.open()
        let half = try copy.open(.init(variant: "fp16"))
        for c in plain.components where c.kind == .model {
            let h = try half.component(c.name)
            #expect(c.variant == nil && h.variant == "fp16")
            let want = try #require(c.weights), got = try #require(h.weights)
            #expect(got.tensorNames == want.tensorNames)
            for name in want.tensorNames {
                #expect(want.info(name)?.dtype == .float32 && got.info(name)?.dtype == .float16)
                #expect(identical(try got.tensor(name), try want.tensor(name).converted(to: .float16)), "\(c.name): \(name)")
            }
        }
    }

    @Test func onlyVariantIsReadWithoutAsking() throws {
        let copy = try FolderCopy()
        try addVariant(copy, "fp16", dtype: .float16)
        for c in try copy.open().components where c.kind == .model {
            try copy.remove("\(c.name)/\(try copy.weightsFile(c.name).split(separator: ".")[0]).safetensors")
        }
        let source = try copy.open()
        for c in source.components where c.kind == .model {
            #expect(c.variant == "fp16" && c.notes.contains { $0.contains("only fp16") })
            #expect(c.weights?.tensorNames.allSatisfy { c.weights?.info($0)?.dtype == .float16 } == true)
        }
        // Two variants and no default: the user must choose.
        try addVariant(copy, "bf16", dtype: .bfloat16)
        let error = #expect(throws: ModelSourceError.self) { try copy.open() }
        #expect("\(error!)".contains("bf16, fp16") && "\(error!)".contains("variant"))
        #expect(try copy.open(.init(variant: "bf16")).component("unet").variant == "bf16")
    }

    @Test func variantMissingSomewhere() throws {
        let copy = try FolderCopy()
        try addVariant(copy, "fp16", dtype: .float16, only: ["unet"])
        let source = try copy.open(.init(variant: "fp16"))
        #expect(try source.component("unet").variant == "fp16")
        let vae = try source.component("vae")
        #expect(vae.variant == nil && vae.notes.contains { $0.contains("no fp16 weights") })
        #expect(source.notes.contains { $0.hasPrefix("vae:") })
        // A variant that nothing has is an error, not a silent fallback.
        let error = #expect(throws: ModelSourceError.self) { try copy.open(.init(variant: "int8")) }
        #expect("\(error!)".contains("no component has int8 weights"))
    }

    /// Splits the UNet into shards with an index, as `save_pretrained(max_shard_size=…)` does.
    func shard(_ copy: FolderCopy, variant: String?, dtype: DType, parts: Int) throws -> TensorSource {
        let original = try #require(try copy.open().component("unet").weights)
        let names = original.tensorNames
        var weightMap: [(String, JSON)] = []
        for p in 0..<parts {
            let suffix = variant.map { ".\($0)" } ?? ""
            let file = "diffusion_pytorch_model-0000\(p + 1)-of-0000\(parts)\(suffix).safetensors"
            let chunk = names.enumerated().filter { $0.offset % parts == p }.map(\.element)
            try SafeTensors.write(try chunk.map { ($0, try original.tensor($0).converted(to: dtype)) }, to: copy.join("unet", file))
            weightMap += chunk.map { ($0, .string(file)) }
        }
        let index = JSON.object([("metadata", .object([("total_size", .number(0))])), ("weight_map", .object(weightMap))])
        try copy.write("unet/diffusion_pytorch_model.safetensors.index\(variant.map { ".\($0)" } ?? "").json", index.serialized(pretty: true))
        return original
    }

    @Test func shardedCheckpoints() throws {
        let copy = try FolderCopy()
        let original = try shard(copy, variant: nil, dtype: .float32, parts: 3)
        try copy.remove("unet/diffusion_pytorch_model.safetensors")
        let half = try shard(copy, variant: "fp16", dtype: .float16, parts: 2)
        for (variant, dtype) in [(nil, DType.float32), ("fp16", .float16)] as [(String?, DType)] {
            let unet = try copy.open(.init(variant: variant)).component("unet")
            #expect(unet.variant == variant)
            let weights = try #require(unet.weights as? ShardedTensorFiles)
            #expect(weights.shards.count == (variant == nil ? 3 : 2))
            #expect(Set(weights.tensorNames) == Set(original.tensorNames))
            for name in original.tensorNames {
                #expect(identical(try weights.tensor(name), try (variant == nil ? original : half).tensor(name).converted(to: dtype)))
            }
        }
        // A shard that the index lists but that is gone.
        try copy.remove("unet/diffusion_pytorch_model-00002-of-00003.safetensors")
        let text = try #require(message { try copy.open() })
        #expect(text.contains("diffusion_pytorch_model-00002-of-00003.safetensors") && text.contains("missing"), "\(text)")
    }

    /// The image size when none is asked for: the UNet's sample_size (a number, or [height, width])
    /// times the VAE's scale factor, as diffusers' pipelines compute it.
    @Test func defaultImageSizeFollowsSampleSize() throws {
        let copy = try FolderCopy()
        let configPath = copy.join("unet", "config.json")
        let config = try #require(try Files.readJSON(configPath).members)
        for (sampleSize, height, width) in [(JSON.number(6), 6, 6), (.array([.number(4), .number(10)]), 4, 10)] {
            let edited = config.filter { $0.0 != "sample_size" } + [("sample_size", sampleSize)]
            try copy.write("unet/config.json", JSON.object(edited).serialized(pretty: true))
            let components = try StableDiffusionComponents.load(folder: copy.path)
            let scale = components.vae.model.spatialScaleFactor
            let size = components.defaultImageSize
            #expect(size.width == width * scale && size.height == height * scale, "\(sampleSize): \(size)")
        }
    }

    /// Older diffusers VAEs (SD 1.5's own) name the attention query/key/value/proj_attn.
    @Test func deprecatedVAEAttentionNames() throws {
        // A model whose VAE has attention (a fixture set may leave the mid block's out).
        let withAttention = try ReferenceModel.all().first { model in
            try ModelSource.open(model.folder).component("vae").weights?.tensorNames.contains { $0.contains(".attentions.0.to_q.") } ?? false
        }
        guard let model = withAttention else { return }
        let copy = try FolderCopy(model)
        let want = try #require(try copy.open().component("vae").weights)
        let old = [("to_q.", "query."), ("to_k.", "key."), ("to_v.", "value."), ("to_out.0.", "proj_attn.")]
        let renamed = try want.tensorNames.map { name -> (String, Tensor) in
            var n = name
            for (new, legacy) in old where n.contains(".attentions.0." + new) {
                n = n.replacingOccurrences(of: ".attentions.0." + new, with: ".attentions.0." + legacy)
            }
            return (n, try want.tensor(name))
        }
        #expect(renamed.contains { $0.0.contains("query.") })
        try SafeTensors.write(renamed, to: copy.join("vae", try copy.weightsFile("vae")))
        let got = try #require(try copy.open().component("vae").weights)
        #expect(got.tensorNames.sorted() == want.tensorNames.sorted())
        for name in want.tensorNames { #expect(identical(try got.tensor(name), try want.tensor(name))) }
    }
}
