import DiffuseCore
import DiffuseTokenizer

/// What a component is to a pipeline.
public enum ComponentKind: String, Sendable {
    /// A network with a config and weights (UNet, VAE, text encoder).
    case model
    /// A scheduler config.
    case scheduler
    /// A tokenizer (a folder, or CLIP's built-in vocabulary).
    case tokenizer

    /// diffusers/transformers' class naming: `...Scheduler`, `...Tokenizer(Fast)`, the rest models.
    init(className: String) {
        if className.hasSuffix("Scheduler") || className.hasSuffix("SchedulerState") {
            self = .scheduler
        } else if className.contains("Tokenizer") {
            self = .tokenizer
        } else {
            self = .model
        }
    }
}

/// Where a tokenizer's files are.
public enum TokenizerFiles: Sendable, Equatable {
    /// A tokenizer folder (`vocab.json`, `merges.txt`, `tokenizer_config.json`, `special_tokens_map.json`).
    case folder(String)
    /// CLIP's vocabulary built into the binary, with a tokenizer folder's two JSON files (the
    /// model's own, or the embedded copies of the real repo's): for single-file checkpoints.
    case builtInCLIP(tokenizerConfig: ConfigFile?, specialTokensMap: ConfigFile?)
}

/// One component of a model as a pipeline needs it: its class, its config and where it came
/// from, its weights under diffusers/transformers names, or its tokenizer files.
public struct ComponentSource {
    /// The pipeline's name for it: `unet`, `vae`, `text_encoder`, `tokenizer_2`, `scheduler`, `vae_tiny`, ...
    public let name: String
    /// `diffusers` or `transformers` (nil when model_index.json does not say, as for extra folders).
    public let library: String?
    /// The class (`UNet2DConditionModel`, `AutoencoderTiny`, `CLIPTextModelWithProjection`, `EulerDiscreteScheduler`, ...).
    public let className: String
    /// `config.json` or `scheduler_config.json`; nil for tokenizers.
    public let config: ConfigFile?
    /// The weights; nil for schedulers and tokenizers, and for built-in architectures without weights.
    public let weights: TensorSource?
    /// The tokenizer's files; nil unless this is a tokenizer.
    public let tokenizer: TokenizerFiles?
    /// The folder, or `file.safetensors (unet)`, for messages.
    public let location: String
    /// The weights variant that was read (`fp16`), nil for the default files.
    public let variant: String?
    /// Things worth telling the user (a variant chosen automatically, a decoder-only VAE, ...).
    public var notes: [String]

    public init(name: String, library: String?, className: String, config: ConfigFile?, weights: TensorSource?,
                tokenizer: TokenizerFiles? = nil, location: String, variant: String? = nil, notes: [String] = []) {
        self.name = name
        self.library = library
        self.className = className
        self.config = config
        self.weights = weights
        self.tokenizer = tokenizer
        self.location = location
        self.variant = variant
        self.notes = notes
    }

    public var kind: ComponentKind { ComponentKind(className: className) }

    /// The config, or an error naming the component when it has none.
    public func requireConfig() throws -> ConfigFile {
        guard let config else { throw ModelSourceError.missingFile(component: name, path: "\(location)/config.json") }
        return config
    }

    /// The weights, or an error naming the component when there are none.
    public func requireWeights() throws -> TensorSource {
        guard let weights else {
            throw ModelSourceError.missingWeights(component: name, folder: location, expected: ["weights"], found: [])
        }
        return weights
    }

    /// Builds the CLIP tokenizer this component describes.
    public func makeTokenizer() throws -> CLIPTokenizer {
        switch tokenizer {
        case .folder(let path)?:
            return try CLIPTokenizer(folder: path)
        case let .builtInCLIP(config, map)?:
            return try CLIPTokenizer(bpeGzip: Array(EmbeddedCLIPVocabulary.gzip), origin: EmbeddedCLIPVocabulary.origin,
                                     tokenizerConfig: config.map { ($0.bytes, $0.origin) },
                                     specialTokensMap: map.map { ($0.bytes, $0.origin) })
        case nil:
            throw ModelSourceError.inconsistent(detail: "component '\(name)' (\(className)) at \(location) is not a tokenizer")
        }
    }
}
