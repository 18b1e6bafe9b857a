import DiffuseCore

/// The configs and tokenizers for a single-file checkpoint, which has none of its own: a
/// built-in architecture's, or a diffusers folder's (`from_single_file(config=…)`).
struct CheckpointConfigs {
    let origin: String
    let modelIndex: ConfigFile
    private let embedded: EmbeddedArchitecture?
    private let folder: String?
    /// Where a folder lacks a tokenizer, the family's built-in one.
    private let fallback: EmbeddedArchitecture

    init(_ architecture: EmbeddedArchitecture) throws {
        guard let index = architecture.modelIndex else {
            throw ModelSourceError.unsupported(location: "built-in \(architecture.name)", detail: "is not a pipeline architecture")
        }
        origin = "embedded \(architecture.name)"
        modelIndex = index
        embedded = architecture
        folder = nil
        fallback = architecture
    }

    init(folder: String, fallback: EmbeddedArchitecture) throws {
        let indexPath = Files.join(folder, "model_index.json")
        guard Files.exists(indexPath) else { throw DiffusersFolder.notAPipeline(folder) }
        origin = folder
        modelIndex = try ConfigFile(path: indexPath)
        embedded = nil
        self.folder = folder
        self.fallback = fallback
    }

    func config(_ component: String) throws -> ConfigFile {
        if let embedded {
            guard let file = embedded.config(component) else {
                throw ModelSourceError.missingFile(component: component, path: "embedded \(embedded.name)/\(component)/config.json")
            }
            return file
        }
        let dir = Files.join(folder!, component)
        for name in ["config.json", "scheduler_config.json"] where Files.exists(Files.join(dir, name)) {
            return try ConfigFile(path: Files.join(dir, name))
        }
        throw ModelSourceError.missingFile(component: component, path: Files.join(dir, "config.json"))
    }

    func tokenizer(_ component: String) -> TokenizerFiles {
        if let folder {
            let dir = Files.join(folder, component)
            if Files.exists(Files.join(dir, "vocab.json")) && Files.exists(Files.join(dir, "merges.txt")) { return .folder(dir) }
            let config = Files.join(dir, "tokenizer_config.json"), map = Files.join(dir, "special_tokens_map.json")
            if Files.exists(config) || Files.exists(map) {
                return .builtInCLIP(tokenizerConfig: try? ConfigFile(path: config), specialTokensMap: try? ConfigFile(path: map))
            }
        }
        let files = (embedded ?? fallback).tokenizerFiles(component)
        return .builtInCLIP(tokenizerConfig: files.config, specialTokensMap: files.specialTokensMap)
    }
}

/// Single-file checkpoints in the original layouts (`.safetensors` with `model.diffusion_model.*`,
/// `first_stage_model.*` and the text encoders' keys), read through renaming views under the
/// diffusers names, without copying. Configs and tokenizers come from a built-in architecture
/// chosen from the keys, or from a config folder.
public enum SingleFileCheckpoint {
    public static func open(_ path: String, options: ModelSourceOptions = .init()) throws -> ModelSource {
        let lower = path.lowercased()
        guard lower.hasSuffix(".safetensors") || lower.hasSuffix(".index.json") || TensorFiles.checkpointExtensions.contains(where: { lower.hasSuffix($0) }) else {
            throw ModelSourceError.unsupported(location: path, detail: "is neither a checkpoint (.safetensors, .ckpt, .pt, .pth, .bin) nor a diffusers folder")
        }
        return try open(file: try TensorFiles.open(path), origin: path, options: options)
    }

    /// Opens a checkpoint from any tensor source (a file, or shapes alone in tests).
    public static func open(file: TensorSource, origin: String, options: ModelSourceOptions = .init()) throws -> ModelSource {
        let layout = SafeTensorsLayout.detect(file)
        guard case .stableDiffusion(let family) = layout else {
            switch layout {
            case .ldmVAE, .diffusersVAE, .tinyVAE:
                throw ModelSourceError.unsupported(location: origin, detail: "holds only a VAE (\(layout)): give it as the VAE of a model")
            case .diffusersUNet, .clipTextModel:
                throw ModelSourceError.unsupported(location: origin, detail: "holds one diffusers component (\(layout)): open the pipeline folder it belongs to")
            default:
                throw ModelSourceError.checkpointLayout(file: origin, detail: "has no model.diffusion_model.* tensors: not a Stable Diffusion checkpoint")
            }
        }

        if let architecture = options.architecture, !family.architectures.contains(architecture) {
            throw ModelSourceError.inconsistent(detail: "\(origin) is a \(family) checkpoint, not \(architecture.summary)")
        }
        if family.architectures.isEmpty && options.config == nil {
            throw ModelSourceError.unsupported(location: origin, detail: "is an \(family) checkpoint, whose configs are not built in: give its "
                                               + "config folder (stabilityai/stable-diffusion-xl-refiner-1.0's model_index.json and component configs) with --config")
        }
        var notes: [String] = []
        let configs: CheckpointConfigs
        if let location = options.config {
            let folder: String
            switch try ModelLocation.resolve(location, hubCache: options.hubCache) {
            case .folder(let f): folder = f
            case .cached(_, _, _, let f): folder = f
            case .file(let f): throw ModelSourceError.notAPipeline(folder: f, detail: "a config folder must be a diffusers folder with model_index.json")
            }
            configs = try CheckpointConfigs(folder: folder, fallback: family.architectures.first ?? .sdxlBase)  // the refiner: SDXL's second tokenizer
        } else {
            let architecture = try options.architecture ?? chooseArchitecture(file, family: family, origin: origin,
                                                                               predictionType: options.predictionType, notes: &notes)
            configs = try CheckpointConfigs(architecture)
        }
        let entries = try DiffusersFolder.componentEntries(configs.modelIndex)
        let isXL = entries.pipelineClass.contains("XL")
        guard isXL == family.isXL else {
            throw ModelSourceError.inconsistent(detail: "\(origin) is a \(family) checkpoint, but the configs of \(configs.origin) are for \(entries.pipelineClass)")
        }

        // Playground v2.5 is SDXL with its latents' statistics stored beside the weights.
        let playground = family == .sdxl && options.config == nil ? try playgroundStatistics(file, origin: origin) : nil
        if playground != nil {
            notes.append("Playground v2.5 (edm_mean, edm_std): the VAE normalises latents with them and scaling_factor 0.5, "
                         + "and the scheduler is EDMDPMSolverMultistepScheduler, as diffusers' from_single_file makes them")
        }

        // CosXL (and CosXL Edit) mark their EDM v-prediction with the noise range they were trained on.
        let cosXL = family == .sdxl && options.config == nil && playground == nil ? try cosXLSigmas(file, origin: origin) : nil
        if let cosXL {
            notes.append("CosXL (edm_vpred.sigma_min \(cosXL.min), sigma_max \(cosXL.max)): the scheduler is EDMEulerScheduler with "
                         + "v-prediction, sigma_data 1 and exponential sigmas, as diffusers' docs set it for CosXL")
        }

        let prefixes = Dictionary(uniqueKeysWithValues: family.prefixes.map { ($0.component, $0.prefix) })
        var components: [ComponentSource] = []
        for entry in entries.used {
            let location = "\(origin) (\(entry.name))"
            switch ComponentKind(className: entry.className) {
            case .tokenizer:
                components.append(ComponentSource(name: entry.name, library: entry.library, className: entry.className, config: nil,
                                                  weights: nil, tokenizer: configs.tokenizer(entry.name), location: location))
            case .scheduler:
                var config = playground != nil ? Self.playgroundScheduler : try configs.config(entry.name)
                if let cosXL { config = Self.cosXLScheduler(sigmaMin: cosXL.min, sigmaMax: cosXL.max) }
                if cosXL == nil, let type = try predictionType(file, options: options, family: family, notes: &notes) {
                    config = try config.setting([("prediction_type", .string(type))], note: "prediction_type \(type)")
                }
                let className = playground != nil ? "EDMDPMSolverMultistepScheduler" : cosXL != nil ? "EDMEulerScheduler" : entry.className
                components.append(ComponentSource(name: entry.name, library: entry.library, className: className, config: config,
                                                  weights: nil, location: location))
            case .model:
                guard let prefix = prefixes[entry.name] else {
                    throw ModelSourceError.unsupported(location: origin, detail: "the configs list '\(entry.name)' (\(entry.className)), which \(family) checkpoints do not hold")
                }
                guard file.tensorNames.contains(where: { $0.hasPrefix(prefix) }) else {
                    // A checkpoint may leave out its VAE (or text encoders); the pipeline then needs them from elsewhere.
                    notes.append("the checkpoint has no \(entry.name) (\(prefix)*)")
                    continue
                }
                var config = try configs.config(entry.name)
                if entry.name == "unet" {
                    config = try inputChannels(file, config: config, builtIn: options.config == nil, origin: origin, notes: &notes)
                }
                if entry.name == "vae", let (mean, std) = playground {
                    config = try config.setting([("latents_mean", .array(mean.map { .number(Double($0)) })),
                                                 ("latents_std", .array(std.map { .number(Double($0)) })), ("scaling_factor", .number(0.5))],
                                                note: "Playground v2.5's latents statistics")
                }
                let mapping = try keyMapping(component: entry.name, className: entry.className, config: config, family: family)
                let view = try mapping.view(of: file, origin: "\(origin) (\(entry.name), \(prefix)*)", configOrigin: config.origin)
                components.append(ComponentSource(name: entry.name, library: entry.library, className: entry.className, config: config,
                                                  weights: view, location: location))
            }
        }
        return ModelSource(origin: origin, path: origin, kind: .singleFile(layout: layout, configs: configs.origin),
                           pipelineClass: entries.pipelineClass, modelIndex: configs.modelIndex, components: components,
                           skipped: entries.skipped, notes: notes)
    }

    /// Playground v2.5's `edm_mean` and `edm_std` (one value per latent channel, any shape), or
    /// nil when the checkpoint has neither; one without the other, or a non-finite or non-positive
    /// deviation, is an error naming the file.
    static func playgroundStatistics(_ file: TensorSource, origin: String) throws -> (mean: [Float], std: [Float])? {
        let (hasMean, hasStd) = (file.info("edm_mean") != nil, file.info("edm_std") != nil)
        guard hasMean || hasStd else { return nil }
        guard hasMean && hasStd else {
            throw ModelSourceError.checkpointLayout(file: origin, detail: "has \(hasMean ? "edm_mean" : "edm_std") without \(hasMean ? "edm_std" : "edm_mean") (Playground v2.5 stores both)")
        }
        let mean = try file.tensor("edm_mean").toFloatArray(), std = try file.tensor("edm_std").toFloatArray()
        guard mean.count == std.count, !mean.isEmpty, mean.allSatisfy(\.isFinite), std.allSatisfy({ $0.isFinite && $0 > 0 }) else {
            throw ModelSourceError.checkpointLayout(file: origin, detail: "edm_mean \(mean) and edm_std \(std) are not one finite mean and positive deviation per latent channel")
        }
        return (mean, std)
    }

    /// CosXL's noise range (`edm_vpred.sigma_min`, `edm_vpred.sigma_max`, one value each, as
    /// ComfyUI saves EDM v-prediction models), or nil when the checkpoint has neither.
    static func cosXLSigmas(_ file: TensorSource, origin: String) throws -> (min: Double, max: Double)? {
        let (hasMin, hasMax) = (file.info("edm_vpred.sigma_min") != nil, file.info("edm_vpred.sigma_max") != nil)
        guard hasMax || hasMin else { return nil }
        let lower = hasMin ? try file.tensor("edm_vpred.sigma_min").toFloatArray() : [0.002]
        guard hasMax, let upper = try file.tensor("edm_vpred.sigma_max").toFloatArray().first else {
            throw ModelSourceError.checkpointLayout(file: origin, detail: "has edm_vpred.sigma_min without edm_vpred.sigma_max (CosXL stores the range)")
        }
        guard lower.count == 1, let low = lower.first, low.isFinite, upper.isFinite, low > 0, upper > low else {
            throw ModelSourceError.checkpointLayout(file: origin, detail: "edm_vpred.sigma_min \(lower) and sigma_max \(upper) are not one noise range 0 < min < max")
        }
        return (Double(low), Double(upper))
    }

    /// The scheduler diffusers' docs give CosXL (`EDMEulerScheduler(sigma_min=0.002,
    /// sigma_max=120.0, sigma_data=1.0, prediction_type="v_prediction",
    /// sigma_schedule="exponential")`), with the checkpoint's own range.
    static func cosXLScheduler(sigmaMin: Double, sigmaMax: Double) -> ConfigFile {
        ConfigFile(text: """
            {"_class_name": "EDMEulerScheduler", "sigma_min": \(sigmaMin), "sigma_max": \(sigmaMax), "sigma_data": 1.0,
             "prediction_type": "v_prediction", "sigma_schedule": "exponential", "num_train_timesteps": 1000}
            """, origin: "CosXL's scheduler (diffusers' docs, the checkpoint's sigma range)")
    }

    /// diffusers' single-file scheduler for Playground v2.5 (`create_scheduler_from_ldm`'s
    /// "edm_dpm_solver_multistep"), the same as playgroundai/playground-v2.5-1024px-aesthetic's.
    static let playgroundScheduler = ConfigFile(text: """
        {"_class_name": "EDMDPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++", "dynamic_thresholding_ratio": 0.995,
         "euler_at_final": false, "final_sigmas_type": "zero", "lower_order_final": true, "num_train_timesteps": 1000,
         "prediction_type": "epsilon", "rho": 7.0, "sample_max_value": 1.0, "sigma_data": 0.5, "sigma_max": 80.0, "sigma_min": 0.002,
         "solver_order": 2, "solver_type": "midpoint", "thresholding": false}
        """, origin: "Playground v2.5's scheduler (diffusers' single-file default)")

    /// The key table of one component of a `family` checkpoint, for its config and class.
    public static func keyMapping(component: String, className: String, config: ConfigFile,
                                  family: StableDiffusionFamily) throws -> KeyMapping {
        guard let prefix = family.prefixes.first(where: { $0.component == component })?.prefix else {
            throw ModelSourceError.unsupported(location: config.origin, detail: "\(family) checkpoints hold no '\(component)'")
        }
        switch component {
        case "unet": return try LDMKeyTables.unet(config: config, sourcePrefix: prefix)
        case "vae": return try LDMKeyTables.vae(config: config, sourcePrefix: prefix)
        default:
            // SDXL's first encoder and SD 1's are OpenAI CLIP; the others are OpenCLIP.
            if prefix.hasSuffix(".transformer.") { return LDMKeyTables.clip(component: component, sourcePrefix: prefix) }
            return try LDMKeyTables.openCLIP(config: config, withProjection: className == "CLIPTextModelWithProjection",
                                             component: component, sourcePrefix: prefix)
        }
    }

    /// The built-in architecture whose UNet has the checkpoint's structure (SD 1.5 and the
    /// BK-SDM UNets differ in blocks); SD 2.x follows diffusers (2.1, v-prediction) unless the
    /// prediction type says epsilon (2.1 base).
    static func chooseArchitecture(_ file: TensorSource, family: StableDiffusionFamily, origin: String, predictionType: String?,
                                   notes: inout [String]) throws -> EmbeddedArchitecture {
        var candidates = family.architectures
        switch family {
        case .sd2 where predictionType == nil && [9, 5].contains(inputChannels(file)):
            // stable-diffusion-2-inpainting is a 512-px epsilon model, and diffusers configures it
            // so; stable-diffusion-2-depth (512-depth-ema) is one too.
            candidates = [.sd21Base]
            let model = inputChannels(file) == 9 ? "inpainting" : "depth-to-image"
            notes.append("SD 2.x \(model) checkpoint: using stable-diffusion-2-1-base's configs (512 px, epsilon) "
                         + "as stable-diffusion-2-\(model == "inpainting" ? "inpainting" : "depth") has them")
        case .sd2:
            candidates = predictionType == "epsilon" ? [.sd21Base] : [.sd21]
            if predictionType == nil {
                notes.append("SD 2.x checkpoint: using stable-diffusion-2-1's configs (768 px, v-prediction) as diffusers does; "
                             + "for a 512-px epsilon model (2.x base) give the prediction type epsilon")
            }
        case .sdxl:
            candidates = [.sdxlBase]  // Turbo has the same weights layout: only an option picks it
        case .sd1, .sdxlRefiner:
            break
        }
        let found = unetStructure(file)
        var seen: [String] = []
        for candidate in candidates {
            guard let config = candidate.config("unet") else { continue }
            let expected = try expectedStructure(config)
            if expected == found { return candidate }
            seen.append("\(candidate.name): \(expected)")
        }
        throw ModelSourceError.checkpointLayout(
            file: origin, detail: "its UNet has \(found), "
                + "which matches no built-in \(family) architecture (\(seen.joined(separator: "; "))); give its configs with a config folder")
    }

    /// What tells the built-in UNets apart, and from any other (a tiny test UNet with the same
    /// blocks has other widths): blocks, the mid block, the first level's channels.
    struct UNetStructure: Equatable, CustomStringConvertible {
        var inputBlocks: Int
        var midBlock: Bool
        var channels: Int?

        var description: String {
            "\(inputBlocks) input blocks, \(midBlock ? "a" : "no") mid block, \(channels.map(String.init) ?? "unknown") channels"
        }
    }

    static func unetStructure(_ file: TensorSource) -> UNetStructure {
        let prefix = "model.diffusion_model."
        return UNetStructure(inputBlocks: file.indices(under: prefix + "input_blocks.").count,
                             midBlock: file.tensorNames.contains { $0.hasPrefix(prefix + "middle_block.") },
                             channels: file.info(prefix + "input_blocks.0.0.weight")?.shape.first)
    }

    static func expectedStructure(_ config: ConfigFile) throws -> UNetStructure {
        let c = try ConfigReader(config)
        let n = try c.strings("down_block_types")?.count ?? 4
        let layers = try c.perBlock("layers_per_block", count: n, default: 2)
        let mid = try c.nullableString("mid_block_type", missing: "UNetMidBlock2DCrossAttn") != nil
        let channels = try c.ints("block_out_channels")?.first ?? 320
        return UNetStructure(inputBlocks: 1 + layers.reduce(0, +) + (n - 1), midBlock: mid, channels: channels)
    }

    /// The scheduler's prediction type when something sets it: the option, or a `v_pred` marker
    /// tensor (some SDXL v-prediction fine-tunes carry one).
    static func predictionType(_ file: TensorSource, options: ModelSourceOptions, family: StableDiffusionFamily,
                               notes: inout [String]) throws -> String? {
        if let type = options.predictionType {
            guard ["epsilon", "v_prediction", "sample"].contains(type) else {
                throw ModelSourceError.unsupported(location: "prediction type", detail: "'\(type)' is not epsilon, v_prediction or sample")
            }
            return type
        }
        if file.info("v_pred") != nil {
            notes.append("the checkpoint has a v_pred marker: prediction_type v_prediction")
            return "v_prediction"
        }
        return nil
    }

    /// The input channels of the checkpoint's UNet, which only its first convolution tells. An
    /// inpainting checkpoint's takes 9 (latents, mask, masked-image latents): a built-in
    /// architecture's config follows it, as diffusers' single-file loading picks the inpainting
    /// configs; so do instruct-pix2pix's 8 and depth-to-image's 5. Other counts, or a given
    /// config folder that disagrees, are errors.
    static func inputChannels(_ file: TensorSource, config: ConfigFile, builtIn: Bool, origin: String,
                              notes: inout [String]) throws -> ConfigFile {
        guard let channels = inputChannels(file) else { return config }
        let expected = try ConfigReader(config).int("in_channels", default: 4)
        if channels == expected { return config }
        if builtIn && channels == 9 && expected == 4 {
            notes.append("an inpainting checkpoint (its UNet takes 9 input channels): give it an image and a mask")
            return try config.setting([("in_channels", .number(9))], note: "in_channels 9: inpainting")
        }
        if builtIn && channels == 8 && expected == 4 {
            notes.append("an InstructPix2Pix checkpoint (its UNet takes 8 input channels, the latents and the picture's): "
                         + "give it the picture to edit, and say in the prompt what to change")
            return try config.setting([("in_channels", .number(8))], note: "in_channels 8: InstructPix2Pix")
        }
        if builtIn && channels == 5 && expected == 4 {
            notes.append("a depth-to-image checkpoint (its UNet takes 5 input channels, the latents and the picture's depth): "
                         + "give it the picture and its depth map")
            return try config.setting([("in_channels", .number(5))], note: "in_channels 5: depth to image")
        }
        throw ModelSourceError.unsupported(
            location: origin, detail: "its UNet takes \(channels) input channels, "
                + "but \(config.origin) has in_channels \(expected)")
    }

    static func inputChannels(_ file: TensorSource) -> Int? {
        guard let shape = file.info("model.diffusion_model.input_blocks.0.0.weight")?.shape, shape.count == 4 else { return nil }
        return shape[1]
    }
}
