import ArgumentParser
import DiffuseCore
import DiffuseCPU
import DiffuseCUDA
import DiffuseGraph
import DiffuseModels
import DiffusePipelines
import DiffuseSchedulers
#if canImport(Glibc)
import Glibc
#endif

/// Options shared by the commands that run models.
struct RuntimeOptions: ParsableArguments {
    @Option(help: "Where to run: cpu, cuda, or auto (CUDA when an NVIDIA GPU is usable).")
    var device = "auto"

    @Option(help: "Arithmetic precision: fp32, tf32, fp16 or bf16 (default: fp16 on CUDA, fp32 on the CPU).")
    var precision: String?

    @Option(help: "Attention: fused (flash-style, default), math, or sliced:N.")
    var attention = "fused"

    @Option(help: "Keep weights in this type and widen them on the fly: fp16 or bf16 (half the weight memory).")
    var weights: String?

    @Option(help: "Quantize the large linear layers dynamically, as diffusers' recipe: int8 (CPU and CUDA) or fp8 (E4M3; CUDA on sm_89 or newer: Ada, Hopper); int8-conv also quantizes the UNet's convolutions (CPU only: faster, more error).")
    var quantize: String?

    @Flag(help: "Fuse the q, k and v projections into one matrix product (diffusers' fuse_qkv_projections).")
    var fuseQKV = false

    @Flag(help: "CUDA: run convolutions, GroupNorms and upsamplings on channels-last (NHWC) images, as PyTorch's channels_last memory format (tensor-core convolutions without layout transposes).")
    var channelsLast = false

    @Flag(help: "CUDA: capture each model's run once as a CUDA graph and replay it (no per-kernel launch cost, no host work in the denoising loop).")
    var cudaGraphs = false

    @Flag(help: "CUDA: choose each GEMM and convolution algorithm by timing the candidates on this GPU when a model is first prepared (as torch.compile's max-autotune and cudnn.benchmark; adds seconds to the first run).")
    var autotune = false

    @Option(help: "Decode in overlapping tiles of this many pixels (bounds the VAE's memory for large images).")
    var vaeTile: Int?

    @Flag(help: "Decode the images of a batch one at a time.")
    var vaeSlicing = false

    @Option(help: "Keep only the model in use prepared: yes or no (default: yes on the CPU, no on CUDA).")
    var lowMemory: String?

    @Option(help: "Offload to fit small memories: model (only the component in use prepared, as diffusers' enable_model_cpu_offload; the same as --low-memory yes) or sequential (as enable_sequential_cpu_offload: on CUDA weights stream in from host memory layer by layer; on the CPU prepared weights live in a file (DIFFUSE_SPILL_DIR, default /var/tmp) and each layer maps in its own from the page cache: least memory, slower).")
    var offload: String?

    func backend() throws -> Backend {
        switch device {
        case "cpu": return try CPUBackend()
        case "cuda": return try CUDABackend()
        case "auto":
            if let cuda = try? CUDABackend() { return cuda }
            return try CPUBackend()
        default: throw ValidationError("unknown device '\(device)': use cpu, cuda or auto")
        }
    }

    func pipelineOptions(for backend: Backend) throws -> PipelineOptions {
        let p: Precision
        if let name = precision {
            guard let v = Precision(rawValue: name) else { throw ValidationError("unknown precision '\(name)': use fp32, tf32, fp16 or bf16") }
            p = v
        } else {
            p = backend.name == "cuda" ? .float16 : .float32
        }
        var o = PipelineOptions(precision: p, attention: try parseAttention(attention))
        if let w = weights {
            guard let d = DType(name: w), d == .float16 || d == .bfloat16 || d == .float32 else {
                throw ValidationError("unknown --weights '\(w)': use fp16, bf16 or fp32")
            }
            o.weightStorage = d
        }
        if let q = quantize {
            switch q {
            case "int8": o.quantization = .dynamicInt8
            case "int8-conv": o.quantization = .dynamicInt8; o.quantizeConvolutions = true
            case "fp8": o.quantization = .fp8
            case "none": break
            default: throw ValidationError("unknown --quantize '\(q)': use int8, int8-conv or fp8")
            }
        }
        o.fuseQKV = fuseQKV
        for (on, flag) in [(channelsLast, "channels-last"), (cudaGraphs, "cuda-graphs"), (autotune, "autotune")] where on {
            guard backend.name == "cuda" else { throw ValidationError("--\(flag) is for --device cuda (this run is on \(backend.name))") }
            o.flags.insert(flag)
        }
        if let t = vaeTile {
            guard t >= 16 && t % 8 == 0 else { throw ValidationError("--vae-tile must be a multiple of 8, at least 16 (got \(t))") }
            o.vaeTile = t
        }
        o.vaeSlicing = vaeSlicing
        switch lowMemory {
        case nil: o.releaseComponentsAfterUse = backend.name == "cpu"
        case "yes": o.releaseComponentsAfterUse = true
        case "no": o.releaseComponentsAfterUse = false
        default: throw ValidationError("--low-memory takes yes or no")
        }
        switch offload {
        case nil, "none": break
        case "model": o.releaseComponentsAfterUse = true
        case "sequential": o.sequentialOffload = true
        default: throw ValidationError("unknown --offload '\(offload!)': use model or sequential")
        }
        return o
    }
}

struct Generate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make images from a prompt (and optionally a starting image).",
        discussion: """
            Without --model, a small built-in demonstration model is used: it has random weights \
            (nothing was trained), so its images show that the pipeline runs, not the prompt.
            """)

    @Argument(help: "What to draw.")
    var prompt: String

    @Option(name: .customLong("negative-prompt"), help: "What to steer away from.")
    var negativePrompt: String?

    @Option(help: "The model: a diffusers folder, a Hugging Face repo id already in the local cache (org/name), or a single-file checkpoint (SD 1.x / SDXL original layout: .safetensors, or PyTorch .ckpt/.pt/.pth/.bin read as data).")
    var model: String?

    @OptionGroup var source: SourceOptions

    @Option(help: "Denoising steps.")
    var steps = 20

    @Option(help: "Classifier-free guidance scale (≤ 1 turns off the unconditional pass).")
    var guidance = 7.5

    @Option(help: ArgumentHelp("Rescales the guided prediction toward the prompt's standard deviation, against over-exposure (diffusers' guidance_rescale, 0 to 1; 0.7 for zero-terminal-SNR models). Only under classifier-free guidance.", valueName: "fraction"))
    var guidanceRescale = 0.0

    @Option(help: ArgumentHelp("Perturbed-attention guidance (diffusers' PAG pipelines' pag_scale; their default is 3): one more UNet pass per image, its self-attention made the identity in the --pag-layer layers, and the prediction pushed away from it for sharper structure. Works with or without --guidance. 0 is off.", valueName: "scale"))
    var pagScale: Double?

    @Option(help: ArgumentHelp("PAG's scale falls with the timestep t as pag-scale − this·(1000 − t), down to 0 (diffusers' pag_adaptive_scale; default 0, constant).", valueName: "rate"))
    var pagAdaptiveScale = 0.0

    @Option(help: ArgumentHelp("A self-attention layer PAG perturbs (diffusers' pag_applied_layers): a regular expression searched in the UNet's module paths, e.g. mid, down_blocks.2, up_blocks.0.attentions.1. Repeat for several (default: mid).", valueName: "pattern"))
    var pagLayer: [String] = []

    @Option(help: "Sampler: \(SchedulerName.allCases.map(\.rawValue).joined(separator: ", ")) (default: the model's own).")
    var scheduler: String?

    @Option(name: .customLong("scheduler-config"),
            help: ArgumentHelp("A scheduler config key set on top of the model's (and the sampler name's), as diffusers' from_config(config, key=value); repeatable. The value is JSON (true, 0.5, null, \"text\") or else text, e.g. timestep_spacing=trailing, rescale_betas_zero_snr=true, noise_sampler_seed=0.", valueName: "key=value"))
    var schedulerConfig: [String] = []

    @Option(help: ArgumentHelp("Timesteps given outright instead of --steps (diffusers' timesteps=), high to low, e.g. 999,850,736,645,545,455,343,233,124,24, or ays for Align Your Steps' 10-step schedule for the model (diffusers' AysSchedules). For euler, dpm++2m(-sde), dpm++2s, heun, ddpm, lcm and tcd.", valueName: "t1,t2,…|ays"))
    var timesteps: String?

    @Option(help: ArgumentHelp("Sigmas given outright instead of --steps (diffusers' sigmas=), high to low, one per step and the final one, e.g. 14.615,6.475,…,0.0, or ays. For euler.", valueName: "s1,s2,…|ays"))
    var sigmas: String?

    @Option(help: ArgumentHelp("FreeU (diffusers' enable_freeu): rebalances the UNet's up blocks for more detail, no training. Four numbers s1,s2,b1,b2, e.g. 0.9,0.2,1.5,1.6, or recommended for the values diffusers' docs give the model's family (SD 1.x, 2.x, SDXL).", valueName: "s1,s2,b1,b2|recommended"))
    var freeu: String?

    @Option(help: "Noise weight of the steps of ddim (0: deterministic, the default; 1: DDPM-like) and tcd (its gamma; TCD recommends 0.3); other samplers ignore it, as diffusers' eta.")
    var eta = 0.0

    @Option(help: "Image size WxH in pixels, multiples of 8 (default: the model's).")
    var size: String?

    @Option(help: "Random seed (default: a random one, printed).")
    var seed: UInt64?

    @Option(help: "Which torch generator the seed is for: cpu (torch.Generator(\"cpu\"), the default) or cuda (torch.Generator(\"cuda\"): drawn on the GPU with --device cuda, bit-exact; emulated on the host otherwise).")
    var generator = "cpu"

    @Option(help: "Number of images (drawn together from one seed, as diffusers' num_images_per_prompt).")
    var count = 1

    @Option(name: .customLong("clip-skip"), help: "Skip this many final CLIP layers for the prompt.")
    var clipSkip: Int?

    @Flag(help: "Read AUTOMATIC1111's prompt syntax ((word) x1.1, [word] /1.1, (word:1.3); \\( for a literal parenthesis) and take prompts longer than 75 tokens, as diffusers' community lpw_stable_diffusion pipeline encodes them (SD 1.x/2.x) and sd_embed's get_weighted_text_embeddings_sdxl (SDXL).")
    var promptWeighting = false

    @Flag(help: "Do not run the model's safety checker (diffusers' safety_checker=None). By default a model folder that has one (SD 1.x's safety_checker/) checks every image as diffusers does and returns a flagged one black.")
    var noSafetyChecker = false

    @Option(help: "With --prompt-weighting: the most windows of 75 tokens a prompt may take (default: 3 for SD 1.x/2.x, lpw's max_embeddings_multiples; no limit for SDXL, as sd_embed).")
    var maxPromptChunks: Int?

    @Option(help: "Starting image for image-to-image (PNG or JPEG); with an InstructPix2Pix model, the picture to edit as the prompt says; with the x4 upscaler, the picture to enlarge; with a depth-to-image model, the picture to change (with --depth-map); with an image variation model, the picture to vary (give an empty prompt); with Stable unCLIP, the picture to vary as the prompt says.")
    var image: String?

    @Option(name: .customLong("depth-map"), help: ArgumentHelp("Depth-to-image models (stable-diffusion-2-depth): the depth of --image, larger or whiter nearer, as DPT or MiDaS estimate it (diffusers' depth_map): a .safetensors or .npy float tensor [H, W] or [rows, H, W], or a PNG or JPEG read as gray. Any size and units: it is resized to the latents and scaled to [-1, 1]. Without it the model's own DPT depth_estimator estimates it.", valueName: "file"))
    var depthMap: String?

    @Option(name: .customLong("image-guidance-scale"), help: ArgumentHelp("InstructPix2Pix models: how closely the edit keeps to --image (diffusers' image_guidance_scale, default 1.5); --guidance is the prompt's. Both guide only with --guidance above 1 and this at least 1.", valueName: "scale"))
    var imageGuidanceScale: Double?

    @Option(name: .customLong("noise-level"), help: ArgumentHelp("The x4 upscaler: how much noise --image gets before the model sees it (diffusers' noise_level, default 20, up to the model's max_noise_level, 350): more lets the model invent more detail. Stable unCLIP: how much noise the picture's CLIP embedding gets (default 0, up to 999): more strays further from the picture.", valueName: "level"))
    var noiseLevel: Int?

    @Option(help: "Inpainting: a mask for --image (PNG or JPEG), white where to repaint, black where to keep. An inpainting model (9-channel UNet) sees the mask; any other model blends the kept part back at each step, as diffusers' inpainting pipelines do. The output takes the model's size (with --controlnet, the image's) unless --size is given.")
    var mask: String?

    @Option(name: .customLong("padding-mask-crop"), help: ArgumentHelp("Inpainting only the masked area (diffusers' padding_mask_crop, AUTOMATIC1111's \"only masked\"): the box around the mask, grown by this many pixels and then to the output's shape, is generated at the full --size and pasted back, so the output keeps --image's size and detail. The mask must have the image's size.", valueName: "pixels"))
    var paddingMaskCrop: Int?

    @Option(help: "How much to change the starting image, in (0, 1] (default, as diffusers: for image-to-image 0.8, or 0.3 for SDXL; for inpainting 1, or 0.9999 for SDXL).")
    var strength: Double?

    @Option(name: .customLong("controlnet"), help: ArgumentHelp("A ControlNet for the model (a diffusers ControlNetModel folder or repo id, e.g. lllyasviel/sd-controlnet-canny for SD 1.5, or one file: lllyasviel's control_v11p_sd15_canny.pth/.safetensors, or a diffusers state dict, read with the model's UNet config), with its conditioning image from --control-image; repeat both for several (their guidance adds up, as diffusers' MultiControlNetModel).", valueName: "model"))
    var controlnets: [String] = []

    @Option(name: .customLong("control-image"), help: "A ControlNet's conditioning image (an edge map, pose, depth map: PNG or JPEG), one per --controlnet in the same order, resized to the output size; without --size the output takes --image's size, else the first control image's. Works from text, with --image, and with --image --mask.")
    var controlImages: [String] = []

    @Option(name: .customLong("control-mode"), help: ArgumentHelp("A union ControlNet (ControlNetUnionModel, e.g. xinsir/controlnet-union-sdxl-1.0): the kind of each --control-image, one per image (diffusers' control_mode): a number, or xinsir's names openpose 0, depth 1, hed/scribble/softedge 2, canny/lineart/mlsd 3, normal 4, segment 5, tile 6, repaint 7. With it, one --controlnet takes all the --control-image options, and --controlnet-scale and --control-guidance are per image.", valueName: "mode"))
    var controlModes: [String] = []

    @Option(name: .customLong("controlnet-scale"), help: "The weight of a ControlNet's guidance (diffusers' controlnet_conditioning_scale): one for all, or one per --controlnet (default 1).")
    var controlnetScales: [Double] = []

    @Option(name: .customLong("control-guidance"), help: ArgumentHelp("The part of the steps a ControlNet acts in, as start:end fractions (diffusers' control_guidance_start and _end): one for all, or one per --controlnet (default 0:1).", valueName: "start:end"))
    var controlGuidances: [String] = []

    @Flag(name: .customLong("controlnet-guess-mode"), help: "ControlNet guess mode (diffusers' guess_mode): the ControlNets steer from the image alone, without the prompt's help.")
    var controlnetGuessMode = false

    @Option(name: .customLong("t2i-adapter"), help: ArgumentHelp("A T2I-Adapter for the model (a diffusers T2IAdapter folder or repo id, e.g. TencentARC/t2iadapter_canny_sd15v2 or TencentARC/t2i-adapter-sketch-sdxl-1.0, or TencentARC's original SD 1.x file, e.g. t2iadapter_canny_sd14v1.pth), with its conditioning image from --t2i-adapter-image; repeat both for several (their features add up, as diffusers' MultiAdapter). From text only, as diffusers' adapter pipelines.", valueName: "model"))
    var t2iAdapters: [String] = []

    @Option(name: .customLong("t2i-adapter-image"), help: ArgumentHelp("A T2I-Adapter's conditioning image (a sketch, edges, depth, a pose: PNG or JPEG), one per --t2i-adapter in the same order, resized to the output size (in gray for one-channel adapters); without --size the output takes the first one's size, rounded down to the adapter's downscale factor.", valueName: "image"))
    var t2iAdapterImages: [String] = []

    @Option(name: .customLong("t2i-adapter-scale"), help: "The weight of a T2I-Adapter's features (diffusers' adapter_conditioning_scale): one for all, or one per --t2i-adapter (default 1).")
    var t2iAdapterScales: [Double] = []

    @Option(name: .customLong("adapter-conditioning-factor"), help: "The fraction of the steps, from the start, that the T2I-Adapters guide (diffusers' adapter_conditioning_factor, default 1).")
    var adapterConditioningFactor: Double?

    @Option(name: .customLong("ip-adapter"), help: ArgumentHelp("An IP-Adapter (diffusers' load_ip_adapter): an h94/IP-Adapter file such as models/ip-adapter_sd15.safetensors or ip-adapter-plus_sdxl_vit-h.bin, guided by the picture from --ip-adapter-image; repeat both for several.", valueName: "file"))
    var ipAdapters: [String] = []

    @Option(name: .customLong("ip-adapter-image"), help: ArgumentHelp("An IP-Adapter's reference picture (PNG or JPEG), one per --ip-adapter in the same order; several for one adapter as a,b (their tokens side by side, as diffusers' list of images).", valueName: "image"))
    var ipAdapterImages: [String] = []

    @Option(name: .customLong("ip-adapter-mask"), help: ArgumentHelp("Masks for an IP-Adapter's pictures (diffusers' ip_adapter_masks): one per picture as a,b (white where that picture applies; resized to the output), given once per --ip-adapter in the same order, \"none\" for an adapter without masks. Each masked picture is then attended to apart: two faces or styles side by side.", valueName: "mask"))
    var ipAdapterMasks: [String] = []

    @Option(name: .customLong("ip-adapter-scale"), help: ArgumentHelp("How strongly the images steer (diffusers' set_ip_adapter_scale, default 1): one for all or one per --ip-adapter; a number; a list, one per masked picture, e.g. '[0.7, 0.4]'; or InstantStyle's per-block form as JSON, e.g. '{\"up\": {\"block_0\": [0.0, 1.0, 0.0]}}' (blocks not named get 0).", valueName: "scale"))
    var ipAdapterScales: [String] = []

    @Option(name: .customLong("image-encoder"), help: ArgumentHelp("The IP-Adapters' image encoder (a CLIPVisionModelWithProjection folder or repo id). Default: the model's image_encoder/, else image_encoder/ beside the first --ip-adapter file (h94/IP-Adapter's layout: models/image_encoder for models/*.safetensors; the ViT-H one also serves sdxl_models/*vit-h*).", valueName: "model"))
    var imageEncoder: String?

    @Option(help: ArgumentHelp("SDXL base + refiner (diffusers' ensemble of expert denoisers): the model runs the first part of the schedule, this refiner model (stable-diffusion-xl-refiner-1.0: a folder or repo id) the rest from its latents, and decodes.", valueName: "model"))
    var refiner: String?

    @Option(name: .customLong("refiner-config"), help: ArgumentHelp("With --refiner as one file (sd_xl_refiner_1.0.safetensors): the refiner's diffusers folder or repo id (stabilityai/stable-diffusion-xl-refiner-1.0) whose configs and tokenizer go with the file's weights. The model's --config, --architecture and --prediction-type are the base's, not the refiner's.", valueName: "folder"))
    var refinerConfig: String?

    @Option(name: .customLong("refiner-start"), help: "With --refiner: the fraction of the schedule after which the refiner takes over (diffusers' denoising_end/denoising_start).")
    var refinerStart = 0.8

    @Option(name: .customLong("latent-upscaler"), help: ArgumentHelp("Then double the result in latent space with this latent x2 upscaler (stabilityai/sd-x2-latent-upscaler: a folder or repo id; diffusers' StableDiffusionLatentUpscalePipeline), which continues the same generator and decodes, as diffusers' example of it does.", valueName: "model"))
    var latentUpscaler: String?

    @Option(name: .customLong("upscale-steps"), help: "With --latent-upscaler: its denoising steps (default 20, as diffusers' example).")
    var upscaleStepsOption: Int?

    @Option(name: .customLong("upscale-guidance"), help: "With --latent-upscaler: its guidance scale (default 0, as diffusers' example: the prompt is then not used; above 1, classifier-free guidance).")
    var upscaleGuidanceOption: Double?

    var upscaleSteps: Int { upscaleStepsOption ?? 20 }
    var upscaleGuidance: Double { upscaleGuidanceOption ?? 0 }

    @OptionGroup(title: "SDXL conditioning") var sdxl: SDXLOptions

    @Option(name: .customLong("aesthetic-score"), help: "SDXL refiner models: the aesthetic score asked for (diffusers' aesthetic_score).")
    var aestheticScore = 6.0

    @Option(name: .customLong("negative-aesthetic-score"), help: "SDXL refiner models: the aesthetic score the negative prompt stands for (diffusers' negative_aesthetic_score).")
    var negativeAestheticScore = 2.5

    @Option(help: "Use another VAE: a VAE folder, repo id or .safetensors file (AutoencoderKL, or a tiny autoencoder such as TAESD).")
    var vae: String?

    @Option(name: .customLong("lora"), help: ArgumentHelp("A LoRA to fuse into the model, with an optional strength (default 1); repeat for several. sd-scripts/AUTOMATIC1111 or diffusers/peft .safetensors files.", valueName: "file[:scale]"))
    var loras: [String] = []

    @Option(name: .customLong("embedding"), help: ArgumentHelp("A textual-inversion embedding to add, called up in prompts by its token (default: the token the file names, else the file name without extension, as AUTOMATIC1111 does); repeat for several. diffusers, AUTOMATIC1111 or SDXL (clip_l/clip_g) .safetensors files, or AUTOMATIC1111's .pt files.", valueName: "file[:token]"))
    var embeddings: [String] = []

    @Option(help: "Output PNG path; with --count N > 1, out.png becomes out-1.png … out-N.png.")
    var output = "diffuse.png"

    @Flag(help: "Replace existing output files.")
    var overwrite = false

    @OptionGroup var runtime: RuntimeOptions

    func validate() throws {
        guard steps >= 1 else { throw ValidationError("--steps must be at least 1 (got \(steps))") }
        guard count >= 1 else { throw ValidationError("--count must be at least 1 (got \(count))") }
        if model == nil && source.architecture == nil {
            if !loras.isEmpty { throw ValidationError("--lora needs --model (or --architecture): the demonstration model takes no adapters") }
            if !embeddings.isEmpty { throw ValidationError("--embedding needs --model (or --architecture): the demonstration model takes no embeddings") }
        }
        if let strength {
            guard image != nil else { throw ValidationError("--strength needs --image: it says how much of the starting image to change") }
            guard strength > 0 && strength <= 1 else { throw ValidationError("--strength must be in (0, 1] (got \(strength))") }
        }
        if mask != nil && image == nil { throw ValidationError("--mask needs --image: the mask marks what to repaint in it") }
        if noiseLevel != nil && image == nil {
            throw ValidationError("--noise-level needs --image: it is how much noise the x4 upscaler adds to the picture")
        }
        if depthMap != nil && image == nil {
            throw ValidationError("--depth-map needs --image: it is the depth of the picture a depth-to-image model changes")
        }
        if let s = imageGuidanceScale {
            guard image != nil else { throw ValidationError("--image-guidance-scale needs --image: it weighs the picture an InstructPix2Pix model edits") }
            guard s.isFinite else { throw ValidationError("--image-guidance-scale must be a number (got \(s))") }
        }
        if let paddingMaskCrop {
            guard mask != nil else { throw ValidationError("--padding-mask-crop needs --image and --mask: it crops around the mask") }
            guard paddingMaskCrop >= 0 else { throw ValidationError("--padding-mask-crop must be 0 or more pixels (got \(paddingMaskCrop))") }
        }
        if !controlModes.isEmpty {
            // One union ControlNet takes every image; several (MultiControlNetUnionModel) one each.
            guard controlnets.count == 1 || controlnets.count == controlImages.count else {
                throw ValidationError("--control-mode is for union ControlNets: one takes every --control-image, several one each "
                                      + "(\(controlnets.count) ControlNets, \(controlImages.count) images)")
            }
            guard controlModes.count == controlImages.count else {
                throw ValidationError("give one --control-mode per --control-image (\(controlImages.count) images, \(controlModes.count) modes)")
            }
            _ = try controlModeValues()
        } else if controlnets.count != controlImages.count {
            throw ValidationError(controlnets.isEmpty ? "--control-image needs --controlnet"
                                  : "give one --control-image per --controlnet (\(controlnets.count) ControlNets, \(controlImages.count) images)")
        }
        _ = try controlNetSettings()
        if controlnetGuessMode && controlnets.isEmpty { throw ValidationError("--controlnet-guess-mode needs --controlnet") }
        if t2iAdapters.count != t2iAdapterImages.count {
            throw ValidationError(t2iAdapters.isEmpty ? "--t2i-adapter-image needs --t2i-adapter"
                                  : "give one --t2i-adapter-image per --t2i-adapter (\(t2iAdapters.count) adapters, \(t2iAdapterImages.count) images)")
        }
        if t2iAdapters.isEmpty {
            if !t2iAdapterScales.isEmpty { throw ValidationError("--t2i-adapter-scale needs --t2i-adapter") }
            if adapterConditioningFactor != nil { throw ValidationError("--adapter-conditioning-factor needs --t2i-adapter") }
        } else {
            if model == nil && source.architecture == nil { throw ValidationError("--t2i-adapter needs --model: the demonstration model takes no adapters") }
            if image != nil { throw ValidationError("--t2i-adapter works from text, as diffusers' adapter pipelines: it takes no --image") }
            if !controlnets.isEmpty { throw ValidationError("--t2i-adapter and --controlnet together have no diffusers pipeline: use one or the other") }
            if let f = adapterConditioningFactor, !(f >= 0 && f <= 1) {
                throw ValidationError("--adapter-conditioning-factor must be in [0, 1] (got \(f))")
            }
        }
        _ = try t2iAdapterScaleValues()
        if ipAdapters.count != ipAdapterImages.count {
            throw ValidationError(ipAdapters.isEmpty ? "--ip-adapter-image needs --ip-adapter"
                                  : "give one --ip-adapter-image per --ip-adapter (\(ipAdapters.count) adapters, \(ipAdapterImages.count) images)")
        }
        if !ipAdapterMasks.isEmpty {
            guard ipAdapterMasks.count == ipAdapters.count else {
                throw ValidationError("give --ip-adapter-mask once per --ip-adapter (\(ipAdapters.count) adapters, \(ipAdapterMasks.count) given; "
                                      + "\"none\" for an adapter without masks)")
            }
            for (k, masks) in ipAdapterMasks.enumerated() where masks != "none" {
                let (m, n) = (Self.imageList(masks).count, Self.imageList(ipAdapterImages[k]).count)
                guard m == n else {
                    throw ValidationError("--ip-adapter-mask \(masks): IP-Adapter \(k + 1) has \(n) picture\(n == 1 ? "" : "s"), so it needs \(n) mask\(n == 1 ? "" : "s"), not \(m)")
                }
            }
        }
        if ipAdapters.isEmpty {
            if !ipAdapterScales.isEmpty { throw ValidationError("--ip-adapter-scale needs --ip-adapter") }
            if imageEncoder != nil { throw ValidationError("--image-encoder needs --ip-adapter: it is the IP-Adapters' image encoder") }
        } else if model == nil && source.architecture == nil {
            throw ValidationError("--ip-adapter needs --model: the demonstration model takes no adapters")
        }
        _ = try ipAdapterScaleTexts()
        if latentUpscaler == nil && (upscaleStepsOption != nil || upscaleGuidanceOption != nil) {
            throw ValidationError("--upscale-steps and --upscale-guidance are for --latent-upscaler")
        }
        if latentUpscaler != nil {
            guard refiner == nil else { throw ValidationError("give --refiner or --latent-upscaler, not both") }
            guard upscaleSteps >= 1 else { throw ValidationError("--upscale-steps must be at least 1 (got \(upscaleSteps))") }
            guard upscaleGuidance.isFinite && upscaleGuidance >= 0 else { throw ValidationError("--upscale-guidance must be 0 or more (got \(upscaleGuidance))") }
        }
        if refinerConfig != nil && refiner == nil { throw ValidationError("--refiner-config needs --refiner: it is the refiner file's config folder") }
        if refiner != nil {
            guard image == nil else { throw ValidationError("--refiner follows text to image; refine a picture with --model REFINER --image it") }
            guard refinerStart > 0 && refinerStart < 1 else { throw ValidationError("--refiner-start must be in (0, 1) (got \(refinerStart))") }
            guard model != nil || source.architecture != nil else { throw ValidationError("--refiner needs --model: the SDXL base it refines") }
        }
        if let s = scheduler { _ = try SchedulerName(parsing: s) }
        if timesteps != nil && sigmas != nil { throw ValidationError("give --timesteps or --sigmas, not both") }
        if let freeu, freeu != "recommended" { _ = try Self.freeUValues(freeu) }
        guard guidanceRescale >= 0 && guidanceRescale <= 1 else { throw ValidationError("--guidance-rescale must be in [0, 1] (got \(guidanceRescale))") }
        if pagScale == nil && (pagAdaptiveScale != 0 || !pagLayer.isEmpty) {
            throw ValidationError("--pag-adaptive-scale and --pag-layer need --pag-scale (perturbed-attention guidance is off without it)")
        }
        if let s = pagScale, !(s >= 0) { throw ValidationError("--pag-scale must be 0 or more (got \(s))") }
        guard pagAdaptiveScale >= 0 else { throw ValidationError("--pag-adaptive-scale must be 0 or more (got \(pagAdaptiveScale))") }
        _ = try customSchedule(xl: false)
        if let size { _ = try parseSize(size) }
        guard GeneratorKind(rawValue: generator) != nil else { throw ValidationError("unknown --generator '\(generator)': use cpu or cuda") }
        if let c = clipSkip, c < 0 { throw ValidationError("--clip-skip must be 0 or more (got \(c))") }
        if let n = maxPromptChunks, n < 1 { throw ValidationError("--max-prompt-chunks must be at least 1 (got \(n))") }
        guard output.lowercased().hasSuffix(".png") else { throw ValidationError("--output must name a .png file (got \(output))") }
    }

    func run() throws {
        let outputs = outputPaths()
        if !overwrite {
            for path in outputs where Files.exists(path) {
                throw PipelineError("\(path) already exists; pass --overwrite to replace it")
            }
        }
        let seed = self.seed ?? UInt64(UInt32.random(in: .min ... .max))
        if self.seed == nil { Log.info("seed: \(seed)") }

        let progress = ProgressReporter()
        progress.phase("loading")
        let backend = try runtime.backend()
        var components = try loadModel()
        if noSafetyChecker { components.safetyChecker = nil }
        if model == nil, let vae { components.vae = try StableDiffusionComponents.loadAutoencoder(vae) }
        for controlnet in controlnets {
            let c = try ControlNetComponent.load(controlnet, unetConfig: components.unetConfigFile, options: try source.options())
            try components.checkControlNet(c)
            components.controlNets.append(c)
        }
        components.t2iAdapters = try t2iAdapters.map {
            try T2IAdapterComponent.load($0, unetLevels: components.unet.config.downBlockTypes.count, options: try source.options())
        }
        try components.checkT2IAdapters(components.t2iAdapters)
        if !ipAdapters.isEmpty {
            let adapters = try ipAdapters.map { try IPAdapterComponent.load($0) }
            try components.loadIPAdapters(adapters, imageEncoder: try loadImageEncoder())
        }
        let options = try runtime.pipelineOptions(for: backend)
        var pipeline: StableDiffusionPipeline? = StableDiffusionPipeline(components: components, backend: backend, options: options)
        var r = GenerationRequest(prompt: prompt)
        r.negativePrompt = negativePrompt
        r.steps = steps
        r.guidanceScale = guidance
        r.seed = seed
        r.generator = GeneratorKind(rawValue: generator) ?? .cpu
        r.count = count
        r.clipSkip = clipSkip
        r.promptWeighting = promptWeighting
        r.maxPromptChunks = maxPromptChunks
        r.scheduler = scheduler
        r.schedulerOverrides = try schedulerOverrides()
        r.customSchedule = try customSchedule(xl: components.isXL)
        r.freeU = try freeU(for: components)
        r.guidanceRescale = guidanceRescale
        r.pag = pagScale.map { PerturbedAttentionGuidance(scale: $0, adaptiveScale: pagAdaptiveScale, appliedLayers: pagLayer.isEmpty ? ["mid"] : pagLayer) }
        r.eta = eta
        if let size { (r.width, r.height) = try parseSize(size) }
        if let image {
            r.initImage = try Image.load(image)
            r.strength = strength
            r.imageGuidanceScale = imageGuidanceScale
            r.noiseLevel = noiseLevel
            r.depthMap = try depthMap.map(DepthToImage.loadDepthMap)
        }
        if let mask { r.maskImage = try Image.load(mask) }
        r.paddingMaskCrop = paddingMaskCrop
        (r.aestheticScore, r.negativeAestheticScore) = (aestheticScore, negativeAestheticScore)
        try sdxl.apply(to: &r)
        if components.isXL {
            sdxl.warnings(fromText: image == nil, zerosForEmptyNegative: components.forceZerosForEmptyPrompt,
                          negativePrompt: negativePrompt).forEach(Log.warning)
        }
        if guidanceRescale != 0 && !(pipeline?.doesClassifierFreeGuidance(r) ?? true) {
            Log.warning("--guidance-rescale does nothing without classifier-free guidance (--guidance above 1), as in diffusers")
        }
        r.controlNetGuessMode = controlnetGuessMode
        let settings = try controlNetSettings()
        let modes = try controlModeValues()
        r.controlNets = try zip(controlImages, settings).enumerated().map { k, item in
            let (path, s) = item
            return ControlNetGuidance(image: try Image.load(path), conditioningScale: s.scale, guidanceStart: s.start, guidanceEnd: s.end,
                                      controlMode: modes.isEmpty ? nil : modes[k])
        }
        r.t2iAdapters = try zip(t2iAdapterImages, try t2iAdapterScaleValues()).map {
            T2IAdapterGuidance(image: try Image.load($0), conditioningScale: $1)
        }
        r.adapterConditioningFactor = adapterConditioningFactor ?? 1
        r.ipAdapters = try zip(ipAdapterImages, try ipAdapterScaleValues(unet: components.unet.config)).enumerated().map { k, item in
            let masks = k < ipAdapterMasks.count && ipAdapterMasks[k] != "none"
                ? try Self.imageList(ipAdapterMasks[k]).map { try Image.load($0) } : nil
            return IPAdapterGuidance(images: try Self.imageList(item.0).map { try Image.load($0) }, scale: item.1, masks: masks)
        }
        let strength = image == nil || components.isInstructPix2Pix || components.isUpscaler || components.isImageVariation
            || components.isStableUnCLIP || components.isLatentUpscaler ? nil : pipeline!.strength(r)
        // AUTOMATIC1111 records an InstructPix2Pix model's image guidance as "Image CFG scale".
        let imageGuidance = components.isInstructPix2Pix ? r.imageGuidanceScale ?? GenerationRequest.defaultImageGuidanceScale : nil
        let noise = components.isUpscaler ? r.noiseLevel ?? GenerationRequest.defaultNoiseLevel
            : components.isStableUnCLIP ? r.noiseLevel ?? 0 : nil
        var result: GenerationResult
        if let refiner {
            r.denoisingEnd = refinerStart
            r.decode = false
            let first = try pipeline!.generate(r) { p in progress.update(p); return true }
            pipeline = nil  // the base's prepared models go before the refiner's come
            progress.phase("loading refiner")
            // The refiner is its own model: the base's single-file settings are not its.
            let refinerOptions = ModelSourceOptions(variant: source.variant, config: refinerConfig)
            let second = StableDiffusionPipeline(components: try StableDiffusionComponents.load(refiner, options: refinerOptions),
                                                 backend: backend, options: options)
            guard second.components.isXL else { throw PipelineError("\(refiner) is not an SDXL model; --refiner takes an SDXL refiner") }
            (r.denoisingEnd, r.denoisingStart, r.imageLatents, r.decode, r.width, r.height) = (nil, refinerStart, first.latents, true, nil, nil)
            // ControlNets and adapters guide the base (they are loaded for it, not the refiner).
            (r.controlNets, r.t2iAdapters, r.ipAdapters) = ([], [], [])
            result = Self.following(first, try second.generate(r) { p in progress.update(p); return true })
        } else if let latentUpscaler {
            // diffusers' example: the model's latents (output_type="latent"), then the upscaler
            // with the same prompt and the same generator, continued.
            r.decode = false
            let generator = pipeline!.makeGenerator(r)
            let first = try pipeline!.generate(r, generator: generator) { p in progress.update(p); return true }
            pipeline = nil
            progress.phase("loading latent upscaler")
            let second = StableDiffusionPipeline(
                components: try StableDiffusionComponents.load(latentUpscaler, options: ModelSourceOptions(variant: source.variant)),
                backend: backend, options: options)
            guard second.components.isLatentUpscaler else {
                throw PipelineError("\(latentUpscaler) is not a latent upscaler (StableDiffusionLatentUpscalePipeline, e.g. stabilityai/sd-x2-latent-upscaler)")
            }
            if components.isXL || second.components.vae.model.scalingFactor != components.vae.model.scalingFactor {
                // diffusers runs it anyway; the upscaler learned SD 1.x/2.x's latent space.
                Log.warning("\(latentUpscaler) upscales in its VAE's latent space (scaling factor \(second.components.vae.model.scalingFactor)); "
                            + "\(components.name)'s latents (scaling factor \(components.vae.model.scalingFactor)) may not be in it")
            }
            var up = GenerationRequest(prompt: prompt)
            (up.negativePrompt, up.steps, up.guidanceScale, up.count) = (negativePrompt, upscaleSteps, upscaleGuidance, count)
            (up.seed, up.generator, up.imageLatents) = (seed, r.generator, first.latents)
            result = Self.following(first, try second.generate(up, generator: generator) { p in progress.update(p); return true })
        } else {
            result = try pipeline!.generate(r) { p in progress.update(p); return true }
        }
        progress.finish()

        // The generated size (with --padding-mask-crop the images have the starting image's).
        let factor = components.vae.model.spatialScaleFactor
        let (width, height) = (result.latents.shape[3] * factor, result.latents.shape[2] * factor)
        for (i, (img, path)) in zip(result.images, outputs).enumerated() {
            let parameters = a1111Parameters(seed: seed, width: width, height: height, model: components.name,
                                             strength: strength, imageGuidance: imageGuidance, noiseLevel: noise,
                                             index: count > 1 ? i : nil)
            try img.writePNG(path, text: [("parameters", parameters)], overwrite: overwrite)
            print(path)
        }
        let denoise = result.timings.filter { $0.phase.hasSuffix("denoise") }.reduce(0) { $0 + $1.seconds }
        Log.info("\(backend.deviceDescription): \(format2(Double(result.denoisingSteps) / max(denoise, 1e-9))) it/s, "
                 + result.timings.map { "\($0.phase) \(format2($0.seconds)) s" }.joined(separator: ", "))
    }

    /// A second model's result after the base's (the refiner, the latent upscaler): the base's
    /// timings first, named so, and both models' denoising steps.
    static func following(_ first: GenerationResult, _ second: GenerationResult) -> GenerationResult {
        var result = second
        result.timings = first.timings.map { ("base \($0.phase)", $0.seconds) } + second.timings
        result.denoisingSteps += first.denoisingSteps
        return result
    }

    /// --freeu: four numbers, or the values diffusers' docs recommend for the model's family.
    func freeU(for components: StableDiffusionComponents) throws -> FreeU? {
        guard let freeu else { return nil }
        return freeu == "recommended" ? .recommended(for: components) : try Self.freeUValues(freeu)
    }

    static func freeUValues(_ text: String) throws -> FreeU {
        guard let v = parseNumbers(text), v.count == 4, v.allSatisfy(\.isFinite) else {
            throw ValidationError("--freeu takes four numbers s1,s2,b1,b2 (e.g. 0.9,0.2,1.5,1.6) or recommended (got \(text))")
        }
        return FreeU(s1: v[0], s2: v[1], b1: v[2], b2: v[3])
    }

    /// `--scheduler-config key=value`: each value read as JSON where it is JSON, else as text.
    func schedulerOverrides() throws -> [String: JSON] {
        var overrides: [String: JSON] = [:]
        for item in schedulerConfig {
            guard let eq = item.firstIndex(of: "="), eq != item.startIndex else {
                throw ValidationError("--scheduler-config takes key=value (got \"\(item)\")")
            }
            let key = String(item[..<eq]), text = String(item[item.index(after: eq)...])
            guard overrides[key] == nil else { throw ValidationError("--scheduler-config \(key) is given twice") }
            overrides[key] = (try? JSON.parse(text)) ?? .string(text)
        }
        return overrides
    }

    /// --timesteps or --sigmas: a list, or "ays" for Align Your Steps' schedule for SD or SDXL.
    func customSchedule(xl: Bool) throws -> CustomSchedule? {
        guard let given = timesteps ?? sigmas else { return nil }
        let option = timesteps != nil ? "--timesteps" : "--sigmas"
        if given == "ays" {
            return CustomSchedule.alignYourSteps["StableDiffusion\(xl ? "XL" : "")\(timesteps != nil ? "Timesteps" : "Sigmas")"]
        }
        guard let values = parseNumbers(given) else {
            throw ValidationError("\(option) takes numbers separated by commas, or ays (got \(given))")
        }
        return timesteps != nil ? .timesteps(values) : .sigmas(values)
    }

    /// An option's values for `count` units (ControlNets, adapters): none (each gets
    /// `fallback`), one for all, or one each; any other number is refused, naming the option.
    static func perUnit<T>(_ values: [T], count: Int, option: String, units: String, unitOption: String, fallback: T) throws -> [T] {
        switch values.count {
        case 0: return Array(repeating: fallback, count: count)
        case 1: return Array(repeating: values[0], count: count)
        case count: return values
        default: throw ValidationError("give \(option) once for all \(units) or once per \(unitOption) (\(count)), not \(values.count) times")
        }
    }

    /// Each ControlNet's scale and `--control-guidance start:end` window (fractions with
    /// 0 ≤ start < end ≤ 1): one value for all, or one per `--controlnet`.
    func controlNetSettings() throws -> [(scale: Double, start: Double, end: Double)] {
        // A union ControlNet's settings are per image.
        let union = !controlModes.isEmpty
        func perUnit<T>(_ values: [T], _ option: String, _ fallback: T) throws -> [T] {
            try Self.perUnit(values, count: union ? controlImages.count : controlnets.count, option: option,
                             units: union ? "control images" : "ControlNets", unitOption: union ? "--control-image" : "--controlnet",
                             fallback: fallback)
        }
        let windows = try controlGuidances.map { text -> (Double, Double) in
            let parts = text.split(separator: ":").map { Double($0) }
            guard parts.count == 2, let start = parts[0], let end = parts[1], start >= 0, start < end, end <= 1 else {
                throw ValidationError("--control-guidance \(text): expected start:end with 0 ≤ start < end ≤ 1, e.g. 0:0.8")
            }
            return (start, end)
        }
        let scales = try perUnit(controlnetScales, "--controlnet-scale", 1.0)
        return zip(scales, try perUnit(windows, "--control-guidance", (0.0, 1.0))).map { ($0, $1.0, $1.1) }
    }

    /// xinsir's union ControlNet control types by name (the ProMax's numbering; the first six are
    /// the original union model's too).
    static let controlModeNames = ["openpose": 0, "depth": 1, "hed": 2, "scribble": 2, "softedge": 2, "canny": 3, "lineart": 3,
                                   "mlsd": 3, "normal": 4, "segment": 5, "tile": 6, "repaint": 7]

    /// `--control-mode` values as numbers.
    func controlModeValues() throws -> [Int] {
        try controlModes.map { text in
            if let n = Int(text), n >= 0 { return n }
            guard let n = Self.controlModeNames[text.lowercased()] else {
                throw ValidationError("--control-mode \(text): give a number or one of "
                                      + Self.controlModeNames.keys.sorted().joined(separator: ", "))
            }
            return n
        }
    }

    /// Each `--t2i-adapter`'s scale: one for all, or one each.
    func t2iAdapterScaleValues() throws -> [Double] {
        guard t2iAdapterScales.allSatisfy(\.isFinite) else { throw ValidationError("--t2i-adapter-scale must be a finite number") }
        return try Self.perUnit(t2iAdapterScales, count: t2iAdapters.count, option: "--t2i-adapter-scale", units: "T2I-Adapters",
                                unitOption: "--t2i-adapter", fallback: 1)
    }

    func loadImageEncoder() throws -> ImageEncoderComponent {
        try ImageEncoderComponent.find(imageEncoder, model: model, adapter: ipAdapters[0], options: try source.options())
    }

    /// Each `--ip-adapter`'s scale as given (default "1").
    func ipAdapterScaleTexts() throws -> [String] {
        try Self.perUnit(ipAdapterScales, count: ipAdapters.count, option: "--ip-adapter-scale", units: "IP-Adapters",
                         unitOption: "--ip-adapter", fallback: "1")
    }

    /// Each `--ip-adapter`'s scale: a number, or diffusers' per-block form as JSON.
    func ipAdapterScaleValues(unet: UNet2DConditionModel.Configuration) throws -> [IPAdapterScale] {
        try ipAdapterScaleTexts().map { text -> IPAdapterScale in
            if let s = Float(text) {
                guard s.isFinite else { throw ValidationError("--ip-adapter-scale \(text) is not a finite number") }
                return .uniform(s)
            }
            if let json = try? JSON.parse(text), let list = json.array {
                let values = list.compactMap(\.double).map(Float.init)
                guard values.count == list.count, !values.isEmpty, values.allSatisfy(\.isFinite) else {
                    throw ValidationError("--ip-adapter-scale \(text): a list gives one number per masked picture")
                }
                return .perImage(values)
            }
            guard let json = try? JSON.parse(text), json.members != nil else {
                throw ValidationError("--ip-adapter-scale \(text): expected a number, a list of numbers (one per masked picture, e.g. '[0.7, 0.4]') "
                                      + "or a JSON object such as '{\"up\": {\"block_0\": [0.0, 1.0, 0.0]}}'")
            }
            return try IPAdapterScale.blocks(json, unet: unet)
        }
    }

    /// `a.png,b.png` is two pictures unless the whole text names a file.
    static func imageList(_ text: String) -> [String] {
        Files.exists(text) ? [text] : text.split(separator: ",").map(String.init)
    }

    func loadModel() throws -> StableDiffusionComponents {
        let loras = try self.loras.map(LoRA.open), embeddings = try self.embeddings.map(TextualInversion.open)
        guard let model else {
            if let name = source.architecture {
                let arch = try EmbeddedArchitecture.parse(name, pipelinesOnly: true)
                Log.info("no --model given: \(arch.summary) with seeded RANDOM weights; the image is noise, the timing is real")
                return try StableDiffusionComponents.randomWeights(arch, seed: 1, loras: loras, embeddings: embeddings)
            }
            Log.info("no --model given: using the built-in demonstration model (\(DemoModel.name)); "
                     + "its image shows the pipeline running, not the prompt")
            return try DemoModel.components()
        }
        return try StableDiffusionComponents.load(model, options: try source.options(), vae: vae, loras: loras, embeddings: embeddings)
    }

    func outputPaths() -> [String] {
        guard count > 1 else { return [output] }
        let stem = String(output.dropLast(4))
        return (1...count).map { "\(stem)-\($0).png" }
    }

    /// The generation parameters in AUTOMATIC1111's format, which other tools read back.
    func a1111Parameters(seed: UInt64, width: Int, height: Int, model: String, strength: Double?, imageGuidance: Double? = nil,
                         noiseLevel: Int? = nil, index: Int?) -> String {
        var lines = [prompt]
        if let negativePrompt { lines.append("Negative prompt: \(negativePrompt)") }
        // A custom schedule sets the steps (both Align Your Steps schedules have 10).
        let customSteps = (try? customSchedule(xl: false))??.stepCount
        var fields = [("Steps", "\(customSteps ?? steps)"), ("Sampler", samplerLabel), ("CFG scale", "\(guidance)"), ("Seed", "\(seed)"),
                      ("Size", "\(width)x\(height)"), ("Model", model)]
        if let imageGuidance { fields.insert(("Image CFG scale", "\(imageGuidance)"), at: 3) }
        if let index { fields.append(("Batch pos", "\(index)")) }
        if generator == "cuda" { fields.append(("RNG", "GPU")) }  // A1111's name for torch.Generator("cuda") noise
        if let clipSkip { fields.append(("Clip skip", "\(clipSkip)")) }
        if let given = timesteps ?? sigmas {
            // AUTOMATIC1111 names Align Your Steps as a schedule type; other lists are recorded as given.
            fields.append(given == "ays" ? ("Schedule type", "Align Your Steps") : (timesteps != nil ? "Timesteps" : "Sigmas", JSON.quote(given)))
        }
        fields += sdxl.parameterFields
        if let freeu { fields.append(("FreeU", JSON.quote(freeu))) }
        if guidanceRescale != 0 { fields.append(("CFG rescale", "\(guidanceRescale)")) }
        if let pagScale {
            fields.append(("PAG scale", "\(pagScale)"))
            if pagAdaptiveScale != 0 { fields.append(("PAG adaptive scale", "\(pagAdaptiveScale)")) }
            fields.append(("PAG layers", JSON.quote((pagLayer.isEmpty ? ["mid"] : pagLayer).joined(separator: ", "))))
        }
        if eta != 0 { fields.append(("Eta", "\(eta)")) }
        if !loras.isEmpty {  // quoted, as AUTOMATIC1111 quotes values holding ',' or ':'
            fields.append(("Lora", JSON.quote(loras.map(Files.lastComponent).joined(separator: ", "))))
        }
        if !embeddings.isEmpty {
            fields.append(("Embeddings", JSON.quote(embeddings.map(Files.lastComponent).joined(separator: ", "))))
        }
        if let strength { fields.append(("Denoising strength", "\(strength)")) }
        if let noiseLevel { fields.append(("Noise level", "\(noiseLevel)")) }
        if let paddingMaskCrop { fields += [("Inpaint area", "Only masked"), ("Masked area padding", "\(paddingMaskCrop)")] }
        for (k, (controlnet, setting)) in zip(controlnets, (try? controlNetSettings()) ?? []).enumerated() {
            // AUTOMATIC1111's ControlNet extension records each unit with its model and weight.
            let name = Files.lastComponent(controlnet)
            fields.append(("ControlNet \(k)", JSON.quote("Model: \(name), Weight: \(setting.scale), Guidance Start: \(setting.start), "
                                                     + "Guidance End: \(setting.end)")))
        }
        for (k, (adapter, scale)) in zip(t2iAdapters, (try? t2iAdapterScaleValues()) ?? []).enumerated() {
            fields.append(("T2I-Adapter \(k)", JSON.quote("Model: \(Files.lastComponent(adapter)), Weight: \(scale)")))
        }
        if let adapterConditioningFactor { fields.append(("T2I-Adapter factor", "\(adapterConditioningFactor)")) }
        for (k, (adapter, scale)) in zip(ipAdapters, (try? ipAdapterScaleTexts()) ?? []).enumerated() {
            fields.append(("IP-Adapter \(k)", JSON.quote("Model: \(Files.lastComponent(adapter)), Weight: \(scale)")))
        }
        if let refiner {
            fields += [("Refiner", JSON.quote(Files.lastComponent(refiner))),
                       ("Refiner switch at", "\(refinerStart)")]
        }
        if let latentUpscaler {
            fields += [("Latent upscaler", JSON.quote(Files.lastComponent(latentUpscaler))), ("Upscale steps", "\(upscaleSteps)"),
                       ("Upscale CFG scale", "\(upscaleGuidance)")]
        }
        fields.append(("Version", "diffuse"))
        lines.append(fields.map { "\($0.0): \($0.1)" }.joined(separator: ", "))
        return lines.joined(separator: "\n")
    }

    /// AUTOMATIC1111's name for the sampler.
    var samplerLabel: String {
        scheduler.flatMap { try? SchedulerName(parsing: $0) }?.samplerName ?? "default"
    }
}

/// How to read a model the user points at.
struct SourceOptions: ParsableArguments {
    @Option(help: "Weights variant to read (e.g. fp16 for *.fp16.safetensors).")
    var variant: String?

    @Option(help: "Single-file checkpoints: a diffusers folder or repo id whose configs and tokenizers to use with the file's weights.")
    var config: String?

    @Option(help: "Single-file checkpoints: the built-in architecture to assume (\(EmbeddedArchitecture.all.map(\.name).joined(separator: ", "))), when the keys cannot tell (e.g. sdxl-turbo). Without --model: run that architecture with random weights (for timing).")
    var architecture: String?

    @Option(help: "Single-file checkpoints: epsilon or v_prediction (the weights cannot tell).")
    var predictionType: String?

    func options() throws -> ModelSourceOptions {
        var o = ModelSourceOptions(variant: variant, config: config, predictionType: predictionType)
        if let architecture { o.architecture = try EmbeddedArchitecture.parse(architecture) }
        if let p = predictionType, !["epsilon", "v_prediction", "sample"].contains(p) {
            throw ValidationError("unknown prediction type '\(p)': use epsilon or v_prediction")
        }
        return o
    }
}

/// `option`'s "WxH" in pixels as (width, height); an image size the model makes must be a
/// multiple of 8, a size it is only told about (SDXL's micro-conditioning) need not.
func parseSize(_ s: String, option: String = "--size", multipleOf: Int = 8) throws -> (width: Int, height: Int) {
    let parts = s.lowercased().split(separator: "x", omittingEmptySubsequences: false)
    guard parts.count == 2, let w = Int(parts[0]), let h = Int(parts[1]), w > 0, h > 0 else {
        throw ValidationError("\(option) must be WxH in pixels, e.g. 512x512 (got \(s))")
    }
    guard w % multipleOf == 0 && h % multipleOf == 0 else {
        throw ValidationError("\(option) \(s): width and height must be multiples of \(multipleOf)")
    }
    return (w, h)
}

/// Comma-separated numbers (spaces ignored); nil if any is not a number.
func parseNumbers(_ text: String) -> [Double]? {
    let values = text.split(separator: ",", omittingEmptySubsequences: false).map { Double($0.filter { !$0.isWhitespace }) }
    return values.allSatisfy { $0 != nil } ? values.map { $0! } : nil
}

func format2(_ x: Double) -> String {
    let r = (x * 100).rounded() / 100
    var s = String(r)
    if let dot = s.firstIndex(of: ".") {
        let decimals = s.distance(from: dot, to: s.endIndex) - 1
        if decimals < 2 { s += String(repeating: "0", count: 2 - decimals) }
    }
    return s
}

/// Progress on stderr: the phase, and while denoising step i/N, it/s and the time left. On a
/// terminal one line is redrawn; otherwise each step is a line.
final class ProgressReporter {
    let tty = isatty(2) != 0
    var lastPhase = ""

    func phase(_ name: String) {
        guard name != lastPhase else { return }
        if tty && lastPhase == "denoising" { Log.printError("") }
        lastPhase = name
        Log.printError(name + "…")
    }

    func update(_ p: GenerationProgress) {
        if p.phase != .denoising { phase(p.phase.rawValue); return }
        if lastPhase != "denoising" { phase("denoising") }
        let rate = p.elapsed > 0 ? Double(p.step) / p.elapsed : 0
        let eta = rate > 0 ? Double(p.totalSteps - p.step) / rate : 0
        let line = "  step \(p.step)/\(p.totalSteps)  \(format2(rate)) it/s  ETA \(format2(eta)) s"
        if tty { Log.printError("\r" + line, terminator: "") } else { Log.printError(line) }
    }

    func finish() { if tty && lastPhase == "denoising" { Log.printError("") } }
}

extension EmbeddedArchitecture {
    /// The built-in architecture called `name`, or a usage error that lists them; with
    /// `pipelinesOnly`, the ones that are whole pipelines (not the tiny autoencoder alone).
    static func parse(_ name: String, pipelinesOnly: Bool = false) throws -> EmbeddedArchitecture {
        let choices = all.filter { !pipelinesOnly || $0 != .taesd }
        guard let a = named(name), choices.contains(a) else {
            throw ValidationError("unknown architecture '\(name)': use \(choices.map(\.name).joined(separator: ", "))")
        }
        return a
    }
}
