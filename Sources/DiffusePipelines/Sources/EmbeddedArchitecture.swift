import CDiffuseResources
import DiffuseCore

/// The configuration files of the real models, built into the binary (generated into
/// `EmbeddedConfigData.swift` by `scripts/embed-configs.py` from `shared/data/configs`).
/// Single-file checkpoints carry no configs and take them from here; the benchmarks build the
/// real architectures from them without any weights or data folder.
public struct EmbeddedArchitecture: Sendable, Hashable, CustomStringConvertible {
    /// The folder name under `configs/` (`sd15`, `sdxl-base`, ...).
    public let name: String
    /// What it is and which Hugging Face repo the files come from.
    public let summary: String

    public static let sd15 = EmbeddedArchitecture("sd15", "Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5)")
    public static let sd21 = EmbeddedArchitecture("sd21", "Stable Diffusion 2.1, 768 px, v-prediction (stabilityai/stable-diffusion-2-1)")
    public static let sd21Base = EmbeddedArchitecture("sd21-base", "Stable Diffusion 2.1 base, 512 px, epsilon (stabilityai/stable-diffusion-2-1-base)")
    public static let sdxlBase = EmbeddedArchitecture("sdxl-base", "Stable Diffusion XL 1.0 base (stabilityai/stable-diffusion-xl-base-1.0)")
    public static let sdxlTurbo = EmbeddedArchitecture("sdxl-turbo", "SDXL Turbo (stabilityai/sdxl-turbo)")
    public static let bksdmSmall = EmbeddedArchitecture("bksdm-small", "BK-SDM-Small: SD 1.4 with a smaller UNet (nota-ai/bk-sdm-small)")
    public static let bksdmTiny = EmbeddedArchitecture("bksdm-tiny", "BK-SDM-Tiny: SD 1.4 with a smaller UNet (nota-ai/bk-sdm-tiny)")
    /// Not a pipeline: the `AutoencoderTiny` config of madebyollin/taesd (`config.json`).
    public static let taesd = EmbeddedArchitecture("taesd", "TAESD tiny autoencoder (madebyollin/taesd)")

    public static let all: [EmbeddedArchitecture] = [.sd15, .sd21, .sd21Base, .sdxlBase, .sdxlTurbo, .bksdmSmall, .bksdmTiny, .taesd]

    private init(_ name: String, _ summary: String) {
        self.name = name
        self.summary = summary
    }

    /// By folder name, with a few common spellings (`sd1.5`, `sdxl`, `sd2.1-base`).
    public static func named(_ name: String) -> EmbeddedArchitecture? {
        let key = String(name.lowercased().filter { $0 != "." }.map { $0 == "_" ? "-" : $0 })
        let aliases = ["sdxl": "sdxl-base", "sd21base": "sd21-base", "sd2-base": "sd21-base", "sd2": "sd21",
                       "bksdmsmall": "bksdm-small", "bksdmtiny": "bksdm-tiny", "bk-sdm-small": "bksdm-small",
                       "bk-sdm-tiny": "bksdm-tiny", "sdxlturbo": "sdxl-turbo"]
        let canonical = aliases[key] ?? key
        return all.first { $0.name == canonical }
    }

    /// Every embedded file: path inside the folder (`unet/config.json`) and contents.
    public var files: [(path: String, text: String)] { EmbeddedConfigData.files[name] ?? [] }

    /// One file by its path inside the folder.
    public func file(_ path: String) -> ConfigFile? {
        files.first { $0.path == path }.map { ConfigFile(text: $0.text, origin: "embedded \(name)/\($0.path)") }
    }

    public var modelIndex: ConfigFile? { file("model_index.json") }

    /// A component's config: `config.json`, or `scheduler_config.json` for the scheduler.
    public func config(_ component: String) -> ConfigFile? {
        file("\(component)/config.json") ?? file("\(component)/scheduler_config.json")
    }

    /// A tokenizer folder's `tokenizer_config.json` and `special_tokens_map.json`.
    public func tokenizerFiles(_ component: String) -> (config: ConfigFile?, specialTokensMap: ConfigFile?) {
        (file("\(component)/tokenizer_config.json"), file("\(component)/special_tokens_map.json"))
    }

    public var description: String { name }

    public static func == (a: EmbeddedArchitecture, b: EmbeddedArchitecture) -> Bool { a.name == b.name }
    public func hash(into h: inout Hasher) { h.combine(name) }
}

/// CLIP's BPE vocabulary (`bpe_simple_vocab_16e6.txt.gz`, MIT), linked into the binary by the
/// `CDiffuseResources` target, for checkpoints that carry no tokenizer.
public enum EmbeddedCLIPVocabulary {
    public static let origin = "built-in bpe_simple_vocab_16e6.txt.gz"

    /// The gzip bytes, without copying.
    public static var gzip: UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: diffuse_clip_bpe_gz_data(), count: diffuse_clip_bpe_gz_size())
    }
}
