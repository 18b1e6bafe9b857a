import DiffuseCore
import DiffuseGraph
import DiffuseModels
import DiffuseSchedulers

/// What to generate: diffusers' `__call__` arguments, with its defaults.
public struct GenerationRequest: Sendable {
    public var prompt: String
    /// nil: no negative prompt (an empty one for SD 1.x/2.x; zeros for SDXL when the model's
    /// `force_zeros_for_empty_prompt` is set).
    public var negativePrompt: String?
    /// SDXL's second text encoder reads these (diffusers' `prompt_2` and `negative_prompt_2`);
    /// nil or empty: the prompt and negative prompt. A refiner, which has that encoder alone,
    /// reads the prompt and negative prompt, as in diffusers.
    public var prompt2: String?
    public var negativePrompt2: String?
    public var steps: Int = 50
    /// Classifier-free guidance scale; at or below 1 there is no unconditional pass.
    public var guidanceScale: Double = 7.5
    /// diffusers' `guidance_rescale` (Common Diffusion Noise Schedules, §3.4); 0 is off.
    public var guidanceRescale: Double = 0
    /// Image size in pixels; nil takes the model's default (sample_size × 8).
    public var width: Int?
    public var height: Int?
    /// `num_images_per_prompt`.
    public var count: Int = 1
    /// Seeds a torch-compatible generator (`torch.Generator(generator).manual_seed(seed)`):
    /// the initial latents of all images come from it in one draw, then the step noise of
    /// ancestral samplers.
    public var seed: UInt64 = 0
    /// Which torch generator the seed reproduces: diffusers scripts pass
    /// `torch.Generator("cpu")` or `torch.Generator("cuda")`, and the two give different noise.
    public var generator: GeneratorKind = .cpu
    /// Initial latents [count, 4, h/8, w/8] instead of drawing them (scaled by the scheduler's
    /// init_noise_sigma, as diffusers does).
    public var latents: Tensor?
    /// Skip this many final CLIP layers for the prompt embeddings (diffusers' `clip_skip`).
    public var clipSkip: Int?
    /// AUTOMATIC1111's prompt syntax (`(word:1.3)`, `[word]`) and prompts longer than 75 tokens,
    /// encoded as diffusers' community `lpw_stable_diffusion` does for SD 1.x/2.x and sd_embed's
    /// `get_weighted_text_embeddings_sdxl` for SDXL (`PromptWeighting`).
    public var promptWeighting = false
    /// With `promptWeighting`: the most windows of 75 tokens a prompt may take; nil is each
    /// encoding's own limit (lpw's `max_embeddings_multiples` 3; none for sd_embed).
    public var maxPromptChunks: Int?
    /// A command-line scheduler name (ddim, euler-a, ...); nil uses the model's own scheduler.
    public var scheduler: String?
    /// Scheduler config keys set on top of the model's config and the name's (diffusers'
    /// `Cls.from_config(pipe.scheduler.config, key=value)`), e.g. `timestep_spacing: "trailing"`.
    public var schedulerOverrides: [String: JSON] = [:]
    /// Timesteps or sigmas given outright (diffusers' `timesteps=` and `sigmas=`, e.g. Align Your
    /// Steps) for the schedulers that take them; `steps` is then the schedule's length.
    public var customSchedule: CustomSchedule?
    /// diffusers' `eta`: the weight of fresh noise in the steps of the schedulers that take it
    /// (DDIM: 0 deterministic, 1 DDPM-like; TCD: its γ, 0.3 as TCD recommends). Others ignore it,
    /// as diffusers' pipelines do.
    public var eta: Double = 0
    /// Image-to-image: the starting image, and how much to change it, in (0, 1]; nil takes the
    /// pipeline's default (diffusers': 0.8 for image to image, 0.3 for SDXL's, 1 for inpainting, 0.9999 for
    /// SDXL inpainting). For an InstructPix2Pix model, the picture to edit (the prompt says how);
    /// it has no strength.
    public var initImage: Image?
    public var strength: Double?
    /// InstructPix2Pix's `image_guidance_scale`: how closely the edit keeps to the picture (the
    /// prompt's guidance is `guidanceScale`); nil takes diffusers' 1.5. Guidance runs (three passes)
    /// only when `guidanceScale` > 1 and this ≥ 1, as in diffusers.
    public var imageGuidanceScale: Double?
    public static let defaultImageGuidanceScale = 1.5
    /// The x4 upscaler's `noise_level`: how much noise the low-resolution picture gets before the
    /// UNet sees it (0 to the model's `max_noise_level`); nil takes diffusers' 20. Stable unCLIP's:
    /// how much noise the picture's CLIP embedding gets (0 to the noising scheduler's last step);
    /// nil takes diffusers' 0.
    public var noiseLevel: Int?
    public static let defaultNoiseLevel = 20
    /// A depth-to-image model's `depth_map` (stabilityai/stable-diffusion-2-depth): the picture's
    /// depth, [H, W] or [1 or count, H, W], in any units and at any size (larger is nearer, as
    /// DPT/MIDAS estimate it). It is resized to the latents' size and scaled to [-1, 1] per row.
    public var depthMap: Tensor?
    /// Image to image from latents instead of a picture ([count or 1, C, h, w], already scaled:
    /// a base model's output with `denoisingEnd`, as diffusers takes latents as `image`). The VAE
    /// encoder is skipped; the size follows the latents.
    public var imageLatents: Tensor?
    /// The SDXL "ensemble of expert denoisers" split, as a fraction of the training schedule in
    /// (0, 1) (diffusers' `denoising_end` / `denoising_start`): `denoisingEnd` stops the loop at
    /// the first timestep below (1 − f)·T, leaving noisy latents; `denoisingStart` (image to
    /// image) starts at that point instead of at `strength`, from the image's latents as they are
    /// (no noise added). A base model with `denoisingEnd` f and the refiner with `denoisingStart` f
    /// share one schedule.
    public var denoisingStart: Double?
    public var denoisingEnd: Double?
    /// Inpainting (with `initImage`): white (≥ 0.5 gray after resizing) marks what to repaint,
    /// black what to keep. An inpainting UNet (9 input channels) sees the mask and the kept
    /// part; any other UNet repaints by blending, as diffusers' inpainting pipelines do. Without
    /// a size, the output takes the model's default size, as in diffusers.
    public var maskImage: Image?
    /// Inpainting only the masked area (diffusers' `padding_mask_crop`, AUTOMATIC1111's "only
    /// masked" with its padding): the box around the mask's non-black pixels, grown by this many
    /// pixels and then to the output's aspect ratio, is cut from the image and the mask and
    /// generated at the full output size; each image is then fitted back into that box of the
    /// starting image, whose kept part is laid over it. Images come out at the starting image's
    /// size (the latents stay those of the box). The mask must have the image's size.
    public var paddingMaskCrop: Int?
    /// ControlNet guidance, one per `StableDiffusionComponents.controlNets` in the same order
    /// (several: diffusers' MultiControlNetModel, whose residuals add up). Without a size the
    /// output takes the starting image's, else the first control image's (rounded down to a
    /// multiple of 8), as diffusers' ControlNet pipelines (text, image to image, inpainting) do.
    public var controlNets: [ControlNetGuidance] = []
    /// diffusers' `guess_mode`: the ControlNets see the prompt's rows only (the unconditional
    /// pass gets no residuals) and weigh their residuals from 0.1 at the first skip to 1 at the
    /// mid block, so they steer even without a prompt. Always on for "shuffle" ControlNets
    /// (`global_pool_conditions`), as in diffusers.
    public var controlNetGuessMode = false
    /// T2I-Adapter guidance, one per `StableDiffusionComponents.t2iAdapters` in the same order
    /// (several: diffusers' MultiAdapter, whose features add up). From text only, as diffusers'
    /// adapter pipelines; without a size the output takes the first image's, rounded down to a
    /// multiple of the adapter's downscale factor.
    public var t2iAdapters: [T2IAdapterGuidance] = []
    /// diffusers' `adapter_conditioning_factor` (its SDXL adapter pipeline's): the fraction of
    /// the steps, from the start, that get the adapters' features.
    public var adapterConditioningFactor: Double = 1
    /// IP-Adapter guidance, one per `StableDiffusionComponents.ipAdapters` in the same order:
    /// the reference images and how strongly each cross-attention layer follows them
    /// (diffusers' `ip_adapter_image` and `set_ip_adapter_scale`).
    public var ipAdapters: [IPAdapterGuidance] = []
    /// SDXL micro-conditioning; nil means (height, width), (0, 0) and (height, width).
    public var originalSize: (height: Int, width: Int)?
    public var cropsCoordsTopLeft: (top: Int, left: Int) = (0, 0)
    public var targetSize: (height: Int, width: Int)?
    /// The micro-conditioning of the negative rows (diffusers' `negative_original_size`,
    /// `negative_crops_coords_top_left`, `negative_target_size`), which steer away from e.g. a
    /// small original. As diffusers' pipelines read them: from text, only when both sizes are
    /// given (else the negative rows are the positive ones); from an image, each size defaults
    /// to the positive one and the crop of the negative rows is the positive crop unless the
    /// model takes an aesthetic score; ControlNet inpainting takes none of them.
    public var negativeOriginalSize: (height: Int, width: Int)?
    public var negativeCropsCoordsTopLeft: (top: Int, left: Int) = (0, 0)
    public var negativeTargetSize: (height: Int, width: Int)?
    /// The SDXL refiner's conditioning (models with `requires_aesthetics_score`): the aesthetic
    /// score asked of the image, and the one the negative rows steer away from (diffusers'
    /// `aesthetic_score` and `negative_aesthetic_score`).
    public var aestheticScore: Double = 6
    public var negativeAestheticScore: Double = 2.5
    /// FreeU in the UNet's up blocks (diffusers' `enable_freeu(s1, s2, b1, b2)`); nil is off.
    public var freeU: FreeU?
    /// Perturbed-attention guidance (diffusers' PAG pipelines, `enable_pag=True`); nil is off.
    public var pag: PerturbedAttentionGuidance?
    /// false: stop at the final latents (diffusers' `output_type="latent"`), no VAE decode.
    public var decode = true

    public init(prompt: String) { self.prompt = prompt }
}

/// What one ControlNet follows, and how strongly.
public struct ControlNetGuidance: Sendable {
    /// The conditioning image (an edge map, a pose, a depth map), resized to the output size.
    public var image: Image
    /// diffusers' `controlnet_conditioning_scale`: the weight of its residuals.
    public var conditioningScale: Double
    /// diffusers' `control_guidance_start` / `control_guidance_end`: the fraction of the steps
    /// during which it acts.
    public var guidanceStart: Double
    public var guidanceEnd: Double
    /// For a union ControlNet (diffusers' `control_mode`): the image's control type, an index
    /// of the model's task embedding (xinsir's union models: 0 openpose, 1 depth, 2 thick lines
    /// (HED, scribble), 3 thin lines (canny, lineart, MLSD), 4 normal, 5 segmentation, 6 tile,
    /// 7 repaint). A union ControlNet takes one or more images, each with its mode.
    public var controlMode: Int?

    public init(image: Image, conditioningScale: Double = 1, guidanceStart: Double = 0, guidanceEnd: Double = 1,
                controlMode: Int? = nil) {
        self.image = image
        self.conditioningScale = conditioningScale
        self.guidanceStart = guidanceStart
        self.guidanceEnd = guidanceEnd
        self.controlMode = controlMode
    }

    /// diffusers' `controlnet_keep`: 0 before the window's start and after its end, for step
    /// `index` of `count`.
    func keep(step index: Int, of count: Int) -> Double {
        Double(index) / Double(count) < guidanceStart || Double(index + 1) / Double(count) > guidanceEnd ? 0 : 1
    }
}

/// Perturbed-attention guidance (PAG; Ahn et al. 2024), as diffusers' `PAGMixin`: a third pass
/// of the prompt's rows whose self-attention in `appliedLayers` is the identity map, and the
/// prediction pushed away from it: `uncond + g·(text − uncond) + s·(text − perturbed)` (without
/// classifier-free guidance `text + s·(text − perturbed)`). Costs one more UNet row per image.
public struct PerturbedAttentionGuidance: Sendable, Hashable {
    /// diffusers' `pag_scale` (its default 3); 0 turns PAG off.
    public var scale: Double
    /// diffusers' `pag_adaptive_scale`: above 0 the scale falls with the timestep t as
    /// `max(scale − adaptiveScale·(1000 − t), 0)`.
    public var adaptiveScale: Double
    /// diffusers' `pag_applied_layers` (its default `["mid"]`): regular expressions searched in
    /// the paths of the UNet's self-attention layers (`mid`, `down_blocks.2`, `up_blocks.0.attentions.1`).
    public var appliedLayers: [String]

    public init(scale: Double = 3, adaptiveScale: Double = 0, appliedLayers: [String] = ["mid"]) {
        self.scale = scale
        self.adaptiveScale = adaptiveScale
        self.appliedLayers = appliedLayers
    }

    /// diffusers' `do_perturbed_attention_guidance`.
    public var isEnabled: Bool { scale > 0 && !appliedLayers.isEmpty }

    /// diffusers' `_get_pag_scale(t)`, in float32 as torch computes it from the timestep tensor
    /// (1000 is diffusers' literal, whatever the schedule's length).
    public func scale(atTimestep t: Double) -> Float {
        guard adaptiveScale > 0 && isEnabled else { return Float(scale) }
        return max(Float(scale) - Float(adaptiveScale) * (1000 - Float(t)), 0)
    }
}

/// The torch generator a seed is for.
public enum GeneratorKind: String, Sendable, CaseIterable {
    /// `torch.Generator("cpu")`: the same on every machine (the default, as diffusers recommends).
    case cpu
    /// `torch.Generator("cuda")`: drawn on the GPU when the pipeline runs on one (bit-exact);
    /// elsewhere emulated on the host (within 1.5e-6 of the GPU's values). Its element order
    /// depends on the GPU's multiprocessor count, as torch's does.
    case cuda
}

/// One generated batch.
public struct GenerationResult {
    /// The decoded images (empty when only latents were asked for).
    public var images: [Image]
    /// The final latents [count, 4, h/8, w/8] (diffusers' `output_type="latent"`).
    public var latents: Tensor
    /// Seconds spent per phase.
    public var timings: [(phase: String, seconds: Double)]
    /// UNet evaluations in the denoising loop (PNDM takes one more than the steps asked for).
    public var denoisingSteps: Int
    /// Per image, whether the model's safety checker flagged it (and it was made black); nil when
    /// the model has no checker or nothing was decoded (diffusers' `nsfw_content_detected`).
    public var nsfwContentDetected: [Bool]? = nil
}

/// Where a generation is, for progress displays and cancellation.
public struct GenerationProgress {
    public enum Phase: String { case loading, encodingPrompt = "encoding prompt", denoising, decoding }
    public var phase: Phase
    /// 1-based step within `totalSteps` while denoising.
    public var step: Int
    public var totalSteps: Int
    public var timestep: Double
    /// Seconds since the denoising loop started.
    public var elapsed: Double
    /// The latents after this step, on the backend (reading them waits for the device).
    public var latents: DeviceTensor?
}

/// Thrown when the progress callback asks to stop.
public struct GenerationCancelled: Error, CustomStringConvertible {
    public var description: String { "generation cancelled" }
}

/// A request the pipeline cannot run, with the reason in the user's terms.
public struct PipelineError: Error, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
