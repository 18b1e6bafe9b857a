import DiffuseCore
import DiffuseGraph
import DiffuseModels
import DiffuseSchedulers
import DiffuseTokenizer

extension StableDiffusionComponents {
    /// Opens a diffusers pipeline folder (`model_index.json` and one folder per component).
    /// Errors name the missing file or component.
    public static func load(folder: String) throws -> StableDiffusionComponents {
        guard Files.isDirectory(folder) else { throw FileError(folder, "is not a model folder") }
        let indexPath = Files.join(folder, "model_index.json")
        guard Files.exists(indexPath) else {
            throw FileError(folder, "has no model_index.json: not a diffusers pipeline folder")
        }
        let index = try Files.readJSON(indexPath)
        let className = index["_class_name"]?.string ?? "?"
        guard ["StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusionImg2ImgPipeline",
               "StableDiffusionXLImg2ImgPipeline"].contains(className) else {
            throw FileError(indexPath, "pipeline class \(className) is not supported (Stable Diffusion 1.x/2.x and SDXL are)")
        }
        func has(_ component: String) -> Bool { index[component]?.array?.first.map { !$0.isNull } ?? false }
        for c in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] where !has(c) {
            throw FileError(indexPath, "lists no \(c) component")
        }
        let isXL = has("text_encoder_2")
        func textEncoder(_ name: String, _ tokenizer: String, projection: Bool) throws -> TextEncoderComponent {
            let config = try componentFile(folder, name, "config.json")
            let encoder: any CLIPTextEncoder = projection ? try CLIPTextModelWithProjection(configPath: config)
                : try CLIPTextModel(configPath: config)
            let weights = encoder.canonicalWeights(try componentWeights(folder, name, base: "model"))
            try encoder.checkWeights(weights)
            let tokenizerFolder = Files.join(folder, tokenizer)
            guard Files.isDirectory(tokenizerFolder) else { throw FileError(tokenizerFolder, "is missing (the \(tokenizer) component)") }
            return TextEncoderComponent(tokenizer: try CLIPTokenizer(folder: tokenizerFolder), encoder: encoder, weights: ModelWeights(weights))
        }
        let unet = try UNet2DConditionModel(configPath: try componentFile(folder, "unet", "config.json"))
        let unetWeights = try componentWeights(folder, "unet", base: "diffusion_pytorch_model")
        try unet.checkWeights(unetWeights)
        return StableDiffusionComponents(
            name: String(folder.split(separator: "/").last ?? Substring(folder)),
            textEncoder: try textEncoder("text_encoder", "tokenizer", projection: false),
            textEncoder2: isXL ? try textEncoder("text_encoder_2", "tokenizer_2", projection: true) : nil,
            unet: unet, unetWeights: ModelWeights(unetWeights),
            vae: try loadAutoencoder(Files.join(folder, "vae")),
            schedulerConfig: try SchedulerConfig.load(try componentFile(folder, "scheduler", "scheduler_config.json")),
            forceZerosForEmptyPrompt: index["force_zeros_for_empty_prompt"]?.bool ?? isXL)
    }

    /// A VAE folder: AutoencoderKL or AutoencoderTiny, by its config's `_class_name`.
    public static func loadAutoencoder(_ folder: String) throws -> AutoencoderComponent {
        let configPath = try componentFile(folder, "", "config.json")
        let className = try Files.readJSON(configPath)["_class_name"]?.string
        let weights = try componentWeights(folder, "", base: "diffusion_pytorch_model")
        let model: any ImageAutoencoder = className == "AutoencoderTiny" ? try AutoencoderTiny(configPath: configPath)
            : try AutoencoderKL(configPath: configPath)
        try model.checkWeights(weights)
        return AutoencoderComponent(model: model, weights: ModelWeights(weights))
    }
}

func componentFile(_ folder: String, _ component: String, _ file: String) throws -> String {
    let path = Files.join(folder, component, file)
    guard Files.exists(path) else { throw FileError(path, "is missing\(component.isEmpty ? "" : " (the \(component) component)")") }
    return path
}

/// A component's weights: `<base>.safetensors` or a sharded `<base>.safetensors.index.json`.
func componentWeights(_ folder: String, _ component: String, base: String) throws -> TensorSource {
    let dir = Files.join(folder, component)
    for name in ["\(base).safetensors", "\(base).safetensors.index.json"] where Files.exists(Files.join(dir, name)) {
        return try SafeTensors.open(Files.join(dir, name))
    }
    if Files.exists(Files.join(dir, "\(base).bin")) {
        throw FileError(Files.join(dir, "\(base).bin"), "is a pickle checkpoint; convert it to safetensors (pickles can run code and are not read)")
    }
    throw FileError(dir, "has no \(base).safetensors")
}
