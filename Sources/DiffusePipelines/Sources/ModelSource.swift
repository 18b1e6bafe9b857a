import DiffuseCore

/// How to open a model.
public struct ModelSourceOptions: Sendable {
    /// Weights variant (`fp16`): `diffusion_pytorch_model.fp16.safetensors`, `model.fp16.safetensors`,
    /// `*.safetensors.index.fp16.json`. Without it the default files are read, or the only
    /// variant when a component has nothing else.
    public var variant: String?
    /// For single-file checkpoints: a diffusers folder (or repo id in the cache) whose configs
    /// and tokenizers to use with the file's weights, as diffusers' `from_single_file(config=)`.
    public var config: String?
    /// For single-file checkpoints: which built-in architecture's configs to use, instead of
    /// the one detected from the keys (`sdxlTurbo` for an SDXL Turbo file, `sd21Base`, ...).
    public var architecture: EmbeddedArchitecture?
    /// For single-file checkpoints: the scheduler's `prediction_type` (`epsilon`, `v_prediction`),
    /// which the weights cannot tell. For SD 2.x it also picks 2.1 base (epsilon, 512 px) over
    /// 2.1 (v-prediction, 768 px, diffusers' default for SD 2 files).
    public var predictionType: String?
    /// The Hugging Face cache folder, instead of `HF_HUB_CACHE`/`HF_HOME`/`~/.cache/huggingface/hub`.
    public var hubCache: String?

    public init(variant: String? = nil, config: String? = nil, architecture: EmbeddedArchitecture? = nil,
                predictionType: String? = nil, hubCache: String? = nil) {
        self.variant = variant
        self.config = config
        self.architecture = architecture
        self.predictionType = predictionType
        self.hubCache = hubCache
    }
}

/// A model, whatever the user pointed at: a diffusers folder, a repo id in the Hugging Face
/// cache, a single-file checkpoint, or a built-in architecture without weights. Pipelines take
/// each component's config, weights (under diffusers/transformers names) and tokenizer from here.
public struct ModelSource {
    public enum Kind: Equatable {
        case diffusersFolder
        case huggingFaceCache(repo: String, revision: String, commit: String)
        /// `configs`: where the configs came from (`embedded sd15`, or a folder).
        case singleFile(layout: SafeTensorsLayout, configs: String)
        case builtIn(EmbeddedArchitecture)
    }

    /// What the user gave (a path, `org/name@revision`, an architecture name).
    public let origin: String
    /// The folder or file that was read (a snapshot folder for the cache); nil for built-ins.
    public let path: String?
    public let kind: Kind
    /// `_class_name` of model_index.json: `StableDiffusionPipeline`, `StableDiffusionXLPipeline`, ...
    public let pipelineClass: String
    /// model_index.json, for the pipeline's own settings (`force_zeros_for_empty_prompt`, ...).
    public let modelIndex: ConfigFile?
    /// The components, in model_index.json's order, then extra component folders (`vae_tiny`).
    public private(set) var components: [ComponentSource]
    /// Components that model_index.json lists which are read apart from the others (safety
    /// checker, picture encoders, their feature extractor) or not at all.
    public let skipped: [(name: String, className: String)]
    /// Things worth telling the user (choices made for them).
    public var notes: [String]

    public init(origin: String, path: String?, kind: Kind, pipelineClass: String, modelIndex: ConfigFile?,
                components: [ComponentSource], skipped: [(name: String, className: String)] = [], notes: [String] = []) {
        self.origin = origin
        self.path = path
        self.kind = kind
        self.pipelineClass = pipelineClass
        self.modelIndex = modelIndex
        self.components = components
        self.skipped = skipped
        self.notes = notes
    }

    public subscript(name: String) -> ComponentSource? { components.first { $0.name == name } }

    /// A component, or an error naming it and this model.
    public func component(_ name: String) throws -> ComponentSource {
        if let c = self[name] { return c }
        var detail = "it has " + components.map(\.name).joined(separator: ", ")
        if case .singleFile = kind, name == "vae" { detail += "; the checkpoint holds no VAE: give one separately" }
        throw ModelSourceError.missingComponent(component: name, model: origin, detail: detail)
    }

    /// A copy with `component` in place of the one of the same name (or added): `--vae`.
    public func replacing(_ component: ComponentSource) -> ModelSource {
        var copy = self
        if let i = copy.components.firstIndex(where: { $0.name == component.name }) {
            copy.components[i] = component
        } else {
            copy.components.append(component)
        }
        return copy
    }

    /// A pipeline-level setting of model_index.json (not a component entry).
    public func pipelineSetting(_ key: String) -> JSON? {
        guard let json = try? modelIndex?.json(), let value = json[key], value.array == nil else { return nil }
        return value
    }

    /// Opens what `location` names: a diffusers folder, a single-file checkpoint (`.safetensors`,
    /// or PyTorch's `.ckpt`/`.pt`/`.pth`/`.bin`), or a repo id
    /// (`org/name`, optionally `@revision`) in the Hugging Face cache. Never downloads, never
    /// writes anything.
    public static func open(_ location: String, options: ModelSourceOptions = .init()) throws -> ModelSource {
        switch try ModelLocation.resolve(location, hubCache: options.hubCache) {
        case .folder(let folder):
            return try DiffusersFolder.open(folder, origin: location, kind: .diffusersFolder, options: options)
        case let .cached(repo, revision, commit, folder):
            return try DiffusersFolder.open(folder, origin: location, kind: .huggingFaceCache(repo: repo, revision: revision, commit: commit),
                                            options: options)
        case .file(let path):
            return try SingleFileCheckpoint.open(path, options: options)
        }
    }

    /// A built-in architecture with its configs and CLIP's built-in vocabulary but no weights
    /// (`weights` is nil): for benchmarks on random weights, and demos without downloads.
    public static func builtIn(_ architecture: EmbeddedArchitecture) throws -> ModelSource {
        guard let index = architecture.modelIndex else {
            throw ModelSourceError.unsupported(location: "built-in \(architecture.name)", detail: "is a single component, not a pipeline")
        }
        let entries = try DiffusersFolder.componentEntries(index)
        var components: [ComponentSource] = []
        for entry in entries.used {
            let tokenizerFiles = architecture.tokenizerFiles(entry.name)
            let isTokenizer = ComponentKind(className: entry.className) == .tokenizer
            components.append(ComponentSource(
                name: entry.name, library: entry.library, className: entry.className,
                config: isTokenizer ? nil : architecture.config(entry.name), weights: nil,
                tokenizer: isTokenizer ? .builtInCLIP(tokenizerConfig: tokenizerFiles.config, specialTokensMap: tokenizerFiles.specialTokensMap) : nil,
                location: "built-in \(architecture.name)/\(entry.name)"))
        }
        return ModelSource(origin: "built-in \(architecture.name)", path: nil, kind: .builtIn(architecture),
                           pipelineClass: entries.pipelineClass, modelIndex: index, components: components, skipped: entries.skipped,
                           notes: ["\(architecture.summary): configs only, no weights"])
    }
}

/// What a location names on this machine.
enum ModelLocation {
    case folder(String)
    case file(String)
    case cached(repo: String, revision: String, commit: String, folder: String)

    /// The folder the location names (a cached repo's snapshot for a repo id); nil for a file.
    var folder: String? {
        switch self {
        case .folder(let f), .cached(_, _, _, let f): return f
        case .file: return nil
        }
    }

    /// A location that must be one component's folder (its config.json beside its weights):
    /// the folder and the config's path. `what` names the component in the errors.
    static func componentFolder(_ location: String, hubCache: String?, component: String,
                                what: String) throws -> (folder: String, config: String) {
        let resolved = try resolve(location, hubCache: hubCache)
        guard let folder = resolved.folder else {
            throw ModelSourceError.unsupported(location: location, detail: "is a file; \(what) is a folder with config.json and its weights")
        }
        let config = Files.join(folder, "config.json")
        guard Files.exists(config) else { throw ModelSourceError.missingFile(component: component, path: config) }
        return (folder, config)
    }

    /// A diffusers model folder (or a cached repo id) as `<Class>.from_pretrained` opens it: the
    /// folder, its config.json, which must name `className`, and its weights.
    static func diffusersModel(_ location: String, options: ModelSourceOptions, component: String, className: String,
                               alsoAccepting others: [String] = [],
                               what: String) throws -> (folder: String, config: ConfigFile, weights: TensorSource) {
        let (folder, configPath) = try componentFolder(location, hubCache: options.hubCache, component: component, what: what)
        let config = try ConfigFile(path: configPath)
        let found = try config.object()["_class_name"]?.string
        guard let found, ([className] + others).contains(found) else {
            throw ModelSourceError.unsupported(location: folder, detail: "is not \(what): \(configPath) has _class_name "
                                                + "\(found ?? "missing"), not \(([className] + others).joined(separator: " or "))")
        }
        let source = try DiffusersFolder.component(name: component, library: "diffusers", className: found,
                                                   folder: folder, variant: options.variant, listedIn: nil)
        return (folder, config, try source.requireWeights())
    }

    static func resolve(_ location: String, hubCache: String?) throws -> ModelLocation {
        if let target = Links.danglingTarget(location) { throw ModelSourceError.brokenLink(path: location, target: target) }
        if Files.exists(location) { return Files.isDirectory(location) ? .folder(location) : .file(location) }
        guard let (repo, revision) = HuggingFaceCache.parseRepoID(location) else {
            throw ModelSourceError.notFound(location: location, detail: "no such file or folder (and not a Hugging Face repo id such as org/name)")
        }
        let cache = hubCache ?? HuggingFaceCache.directory
        do {
            let (folder, commit) = try HuggingFaceCache.snapshot(repo: repo, revision: revision, cache: cache)
            return .cached(repo: repo, revision: revision ?? "main", commit: commit, folder: folder)
        } catch ModelSourceError.notInCache(let repo, let cache, let detail) {
            // A relative path with one slash reads like a repo id: say both.
            throw ModelSourceError.notInCache(repo: repo, cache: cache, detail: detail + "; there is no file or folder '\(location)' either")
        }
    }
}
