import DiffuseCore
import DiffuseGraph
import DiffuseModels
import DiffuseSchedulers
import DiffuseTokenizer

/// The built-in demonstration model: a small Stable-Diffusion-1.x-shaped pipeline (CLIP text
/// encoder, UNet with cross-attention, AutoencoderKL) with seeded random weights and a
/// byte-level vocabulary, created in memory. Nothing in it was trained: its images show that
/// every stage of the pipeline runs, end to end, on this machine — not the prompt. Bring real
/// weights with `--model` for real images.
public enum DemoModel {
    public static let name = "demo (random weights, untrained)"

    static let textEncoderConfig = #"""
    {"architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 64, "intermediate_size": 256,
     "max_position_embeddings": 77, "num_attention_heads": 4, "num_hidden_layers": 3, "vocab_size": 514,
     "bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513, "projection_dim": 64, "layer_norm_eps": 1e-05}
    """#

    static let unetConfig = #"""
    {"_class_name": "UNet2DConditionModel", "sample_size": 32, "in_channels": 4, "out_channels": 4,
     "block_out_channels": [64, 128], "layers_per_block": 1, "norm_num_groups": 16, "attention_head_dim": 8,
     "cross_attention_dim": 64, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
     "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
    """#

    static let vaeConfig = #"""
    {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
     "block_out_channels": [32, 64, 64, 64], "layers_per_block": 1, "norm_num_groups": 16, "sample_size": 256,
     "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
     "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
     "scaling_factor": 0.18215}
    """#

    /// Stable Diffusion 1.5's scheduler file.
    static let schedulerConfig = #"""
    {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
     "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1,
     "trained_betas": null, "clip_sample": false}
    """#

    /// The demonstration pipeline's components (weights are made on first use).
    public static func components(seed: UInt64 = 2024) throws -> StableDiffusionComponents {
        func decode<T: Decodable>(_ type: T.Type, _ text: String, _ what: String) throws -> T {
            try decodeConfiguration(type, from: Array(text.utf8), origin: "built-in demo \(what) config")
        }
        let encoder = try CLIPTextModel(config: decode(CLIPTextConfig.self, textEncoderConfig, "text encoder"))
        let unet = try UNet2DConditionModel(config: decode(UNet2DConditionModel.Configuration.self, unetConfig, "UNet"))
        let vae = try AutoencoderKL(config: decode(AutoencoderKL.Configuration.self, vaeConfig, "VAE"))
        return StableDiffusionComponents(
            name: name,
            textEncoder: TextEncoderComponent(tokenizer: try CLIPTokenizer.byteLevel(), encoder: encoder,
                                              weights: ModelWeights(encoder.randomWeights(seed: seed))),
            textEncoder2: nil,
            unet: unet, unetWeights: ModelWeights(unet.randomWeights(seed: seed &+ 1)),
            vae: AutoencoderComponent(model: vae, weights: ModelWeights(vae.randomWeights(seed: seed &+ 2))),
            schedulerConfig: try SchedulerConfig(json: try JSON.parse(schedulerConfig), origin: "built-in demo scheduler config"),
            forceZerosForEmptyPrompt: false)
    }
}
