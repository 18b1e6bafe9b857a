import DiffuseCore
import DiffuseGraph
import DiffuseModels

/// A VAE given apart from the model (`--vae`): a VAE folder (`AutoencoderKL` or `AutoencoderTiny`
/// config and weights), a pipeline folder (its `vae`), a repo id in the cache, or one
/// `.safetensors` file (an LDM VAE such as `vae-ft-mse-840000-ema-pruned`, a whole checkpoint's
/// VAE, a diffusers VAE file, or TAESD in diffusers' or taesd.py's layout).
public enum VAESource {
    /// Opens the VAE at `location` as the component `vae`.
    /// - Parameters:
    ///   - modelVAEConfig: the config of the VAE it replaces. A `.safetensors` `AutoencoderKL` carries
    ///     no config; the model's own has the right scaling factor (SD 0.18215, SDXL 0.13025), and
    ///     the SD family shares one VAE architecture. Without it, SD 1.5's is used.
    ///   - options: `config` (a folder with the VAE's config.json), `variant`, `hubCache`.
    public static func open(_ location: String, modelVAEConfig: ConfigFile? = nil, options: ModelSourceOptions = .init()) throws
        -> ComponentSource {
        let explicitConfig = try options.config.map { try explicitVAEConfig($0, hubCache: options.hubCache) }
        switch try ModelLocation.resolve(location, hubCache: options.hubCache) {
        case .folder(let folder), .cached(_, _, _, let folder):
            return try openFolder(folder, options: options)
        case .file(let path):
            let lower = path.lowercased()
            guard lower.hasSuffix(".safetensors") || TensorFiles.checkpointExtensions.contains(where: { lower.hasSuffix($0) }) else {
                throw ModelSourceError.unsupported(location: path, detail: "is neither a weights file (.safetensors, .ckpt, .pt, .pth, .bin) nor a VAE folder")
            }
            return try openFile(try TensorFiles.open(path), origin: path, config: explicitConfig, modelVAEConfig: modelVAEConfig)
        }
    }

    /// A VAE folder (config.json with an autoencoder class), or a pipeline folder's `vae`.
    static func openFolder(_ folder: String, options: ModelSourceOptions) throws -> ComponentSource {
        if Files.exists(Files.join(folder, "model_index.json")) {
            var c = try DiffusersFolder.open(folder, origin: folder, kind: .diffusersFolder, options: options).component("vae")
            c.notes.append("the VAE of the pipeline \(folder)")
            return c
        }
        let configPath = Files.join(folder, "config.json")
        guard Files.exists(configPath) else {
            throw ModelSourceError.missingFile(component: "vae", path: configPath)
        }
        let config = try ConfigFile(path: configPath)
        guard let className = try config.object()["_class_name"]?.string, ["AutoencoderKL", "AutoencoderTiny"].contains(className) else {
            let found = (try? config.json()["_class_name"]?.string) ?? nil
            throw ModelSourceError.unsupported(location: folder, detail: "is not a VAE folder: \(configPath) has _class_name \(found ?? "missing"), "
                                                + "not AutoencoderKL or AutoencoderTiny")
        }
        return try DiffusersFolder.component(name: "vae", library: "diffusers", className: className, folder: folder,
                                             variant: options.variant, listedIn: nil)
    }

    /// One weights file, told apart by its keys.
    public static func openFile(_ file: TensorSource, origin: String, config explicit: ConfigFile? = nil,
                                modelVAEConfig: ConfigFile? = nil) throws -> ComponentSource {
        let layout = SafeTensorsLayout.detect(file)
        let location = "\(origin) (vae)"
        func klConfig() throws -> ConfigFile {
            if let explicit { return explicit }
            if let modelVAEConfig, try ConfigReader(modelVAEConfig).string("_class_name") != "AutoencoderTiny" { return modelVAEConfig }
            return EmbeddedArchitecture.sd15.config("vae")!
        }
        switch layout {
        case .ldmVAE, .stableDiffusion:
            // A VAE file, or the VAE of a whole checkpoint.
            let prefix: String
            if case .ldmVAE(let p) = layout { prefix = p } else { prefix = "first_stage_model." }
            guard file.tensorNames.contains(where: { $0.hasPrefix(prefix) }) else {
                throw ModelSourceError.checkpointLayout(file: origin, detail: "the checkpoint has no VAE (\(prefix)*)")
            }
            let config = try klConfig()
            let view = try LDMKeyTables.vae(config: config, sourcePrefix: prefix).view(of: file, origin: "\(origin) (vae, LDM layout)",
                                                                                       configOrigin: config.origin)
            try checkFits(view, config, origin: origin)
            return ComponentSource(name: "vae", library: "diffusers", className: "AutoencoderKL", config: config, weights: view,
                                   location: location)
        case .diffusersVAE:
            let config = try klConfig(), weights = try DeprecatedAttentionNames.view(file)
            try checkFits(weights, config, origin: origin)
            return ComponentSource(name: "vae", library: "diffusers", className: "AutoencoderKL", config: config,
                                   weights: weights, location: location)
        case .tinyVAE(let keys):
            let (config, weights) = try tinyVAE(file, keys: keys, origin: origin, explicit: explicit)
            var notes: [String] = []
            if keys == .taesdDecoder { notes.append("decoder only: latents can be decoded, images not encoded") }
            if keys == .taesdEncoder { notes.append("encoder only: images can be encoded, latents not decoded") }
            return ComponentSource(name: "vae", library: "diffusers", className: "AutoencoderTiny", config: config, weights: weights,
                                   location: location, notes: notes)
        default:
            throw ModelSourceError.unsupported(location: origin, detail: "is not a VAE (\(layout))")
        }
    }

    /// A file's names can fit a config whose widths they do not (same depth, other channels): the
    /// shapes are checked here too, so the error names the config the file was read with. (The
    /// unused-tensor warning comes once, when the model is loaded.)
    static func checkFits(_ weights: TensorSource, _ config: ConfigFile, origin: String) throws {
        let model = try AutoencoderKL(config: try decodeConfiguration(AutoencoderKL.Configuration.self, from: config.bytes,
                                                                     origin: config.origin))
        do {
            try model.checkDeclaredWeights(weights)
        } catch let error as WeightError {
            throw ModelSourceError.checkpointLayout(file: origin, detail: "the vae does not match its config \(config.origin): \(error)")
        }
    }

    /// TAESD weights under diffusers' names, and a config: the given one, or the built-in TAESD
    /// config with the latent channels of these weights (TAESD, TAESDXL: 4; TAESD3, TAEF1: 16) and
    /// the mid-block pool branch when they have one (TAEF2).
    static func tinyVAE(_ file: TensorSource, keys: TinyVAEKeys, origin: String, explicit: ConfigFile?) throws
        -> (ConfigFile, TensorSource) {
        var rules: [KeyRule] = []
        // taesd.py's Sequential indices; diffusers' decoder leaves out the leading clamp.
        func indices(_ prefix: String) -> [Int] { file.indices(under: prefix) }
        switch keys {
        case .diffusers:
            break
        case .taesdModule:
            rules += indices("encoder.").map { KeyRule("encoder.\($0).", "encoder.layers.\($0).") }
            rules += indices("decoder.").map { KeyRule("decoder.\($0).", "decoder.layers.\($0 - 1).") }
        case .taesdEncoder:
            rules += indices("").map { KeyRule("\($0).", "encoder.layers.\($0).") }
        case .taesdDecoder:
            rules += indices("").map { KeyRule("\($0).", "decoder.layers.\($0 - 1).") }
        }
        let weights: TensorSource = rules.isEmpty ? file
            : try KeyMapping(component: "vae", sourcePrefix: "", rules: rules).view(of: file, origin: "\(origin) (vae, \(keys.rawValue))",
                                                                                  configOrigin: "taesd.py")
        if let explicit { return (explicit, weights) }

        // The latent width: the decoder's first conv takes it, the encoder's last conv makes it.
        var latent: Int?
        if let first = weights.info("decoder.layers.0.weight")?.shape, first.count == 4 {
            latent = first[1]
        } else if let last = weights.tensorNames.filter({ $0.hasPrefix("encoder.layers.") && $0.hasSuffix(".weight") })
            .max(by: { layerIndex($0) < layerIndex($1) }), let shape = weights.info(last)?.shape, shape.count == 4 {
            latent = shape[0]
        }
        guard let latent else {
            throw ModelSourceError.checkpointLayout(file: origin, detail: "has no first decoder or last encoder convolution to read the latent channels from")
        }
        var changes: [(String, JSON)] = [("latent_channels", .number(Double(latent)))]
        if weights.tensorNames.contains(where: { $0.contains(".pool.") }) { changes.append(("use_midblock_gn", .bool(true))) }
        let config = try EmbeddedArchitecture.taesd.file("config.json")!
            .setting(changes, note: "latent_channels \(latent) from \(origin)" + (changes.count > 1 ? ", mid-block pool" : ""))
        return (config, weights)
    }

    private static func layerIndex(_ name: String) -> Int {
        Int(name.dropFirst("encoder.layers.".count).prefix { $0 != "." }) ?? -1
    }

    /// `config` for a VAE file: a folder with config.json (or the config.json itself).
    static func explicitVAEConfig(_ location: String, hubCache: String?) throws -> ConfigFile {
        switch try ModelLocation.resolve(location, hubCache: hubCache) {
        case .file(let path):
            return try ConfigFile(path: path)
        case .folder(let folder), .cached(_, _, _, let folder):
            for path in [Files.join(folder, "config.json"), Files.join(folder, "vae/config.json")] where Files.exists(path) {
                return try ConfigFile(path: path)
            }
            throw ModelSourceError.missingFile(component: "vae", path: Files.join(folder, "config.json"))
        }
    }
}
