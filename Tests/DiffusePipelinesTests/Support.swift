import DiffuseCore
import DiffuseCPU
import DiffuseGraph
import DiffuseModels
import DiffusePipelines
import DiffuseSchedulers
import DiffuseTokenizer
import Testing

/// Opens a reference model folder (diffusers layout) as pipeline components.
func loadComponents(_ folder: String) throws -> StableDiffusionComponents {
    try StableDiffusionComponents.load(folder: folder)
}

/// Max |a − b| / max(1, max |b|).
func relativeError(_ a: Tensor, _ b: Tensor) -> Float {
    let x = a.toFloatArray(), y = b.toFloatArray()
    var err: Float = 0, m: Float = 0
    for i in y.indices { err = max(err, abs(x[i] - y[i])); m = max(m, abs(y[i])) }
    return err / max(1, m)
}

/// The e2e goldens' fixed arguments that the README states rather than the files store:
/// "the full pipeline at 64x64, 4 steps, guidance 7.5". (The recorded timesteps do not give
/// the step count: PNDM's schedule has one entry more than `num_inference_steps`.)
func readmeE2EArguments() throws -> (steps: Int, guidance: Double) {
    let text = try Files.readText(Fixtures.reference("README.md"))
    let line = text.split(separator: "\n").first { $0.contains("e2e_") && $0.contains("guidance") } ?? ""
    let words = line.split(whereSeparator: { $0 == " " || $0 == "," })
    guard let g = words.firstIndex(of: "guidance"), g + 1 < words.count, let guidance = Double(words[g + 1]),
          let s = words.firstIndex(of: "steps"), s > 0, let steps = Int(words[s - 1]) else {
        throw FileError(Fixtures.reference("README.md"), "states no step count and guidance scale for the e2e goldens")
    }
    return (steps, guidance)
}

/// Variants with end-to-end goldens, discovered from the folder.
func e2eCases() -> [(variant: String, file: String)] {
    let golden = Fixtures.reference("golden")
    guard let variants = try? Files.list(golden) else { return [] }
    return variants.flatMap { v in
        ((try? Files.list(Files.join(golden, v))) ?? []).filter { $0.hasPrefix("e2e_") && $0.hasSuffix(".safetensors") }.map { (v, $0) }
    }
}

/// Runs goldens that only some fixture sets have (LoRA, textual inversion, image to image and
/// inpainting: added by `script`) on every model, in float32 on the CPU, expecting each to pass;
/// says when the set has none.
func expectOptionalGoldens(
    _ check: (String, String, Backend, PipelineOptions, ReferenceCheck.Tolerances, (String) -> Void) throws -> [ReferenceCheck.Result],
    models: [ReferenceModel], label: String, script: String
) throws {
    let backend = try CPUBackend()
    var checked = 0
    for model in models {
        let results = try check(Fixtures.reference, model.variant, backend, PipelineOptions(precision: .float32, attention: .fused),
                                .defaults(backend: "cpu", precision: .float32)) { _ in }
        for r in results { #expect(r.passed, "\(r)") }
        checked += results.count
    }
    if checked == 0 {
        print("\(label): this fixture set has no goldens (\(script) adds them); the other tests still run")
    } else {
        print("\(label): \(checked) checks against diffusers")
    }
}

/// The model with a UNet made from its own that takes `inChannels` inputs (an inpainting or
/// InstructPix2Pix UNet): conv_in widened, each extra input channel weighted by `extraWeight` times
/// the weights of the latent channel it falls on (0: the UNet computes what the plain one does).
func widenedConvIn(_ base: StableDiffusionComponents, inChannels wide: Int, extraWeight: Float) throws -> StableDiffusionComponents {
    let latent = base.unet.config.inChannels
    var config = base.unet.config
    config.inChannels = wide
    var c = base
    c.unet = try UNet2DConditionModel(config: config)
    let source = base.unetWeights.source
    let tensors = try source.tensorNames.map { name -> (String, Tensor) in
        let t = try source.tensor(name)
        guard name == "conv_in.weight" else { return (name, t) }
        let w = t.converted(to: .float32), (o, k) = (w.shape[0], w.shape[2] * w.shape[3])
        let widened = Tensor(zeros: [o, wide, w.shape[2], w.shape[3]])
        for oc in 0..<o {
            for ic in 0..<wide {
                let factor = ic < latent ? 1 : extraWeight
                for j in 0..<k { widened.floats[(oc * wide + ic) * k + j] = factor * w.floats[(oc * latent + ic % latent) * k + j] }
            }
        }
        return (name, widened)
    }
    c.unetWeights = ModelWeights(InMemoryTensors(tensors))
    return c
}

/// A pipeline on the CPU in fp32, as the by-construction tests run one.
func cpuPipeline(_ c: StableDiffusionComponents) throws -> StableDiffusionPipeline {
    StableDiffusionPipeline(components: c, backend: try CPUBackend(), options: PipelineOptions(precision: .float32))
}

/// A picture of ramps and a product pattern, `width` x `height` (no multiples of 8, so that a
/// pipeline rounds them down).
func rampPicture(width w: Int, height h: Int) -> Image {
    var pixels: [UInt8] = []
    for y in 0..<h {
        for x in 0..<w { pixels += [UInt8(x * 255 / w), UInt8((x * y) % 256), UInt8(y * 255 / h)] }
    }
    return Image(width: w, height: h, channels: 3, pixels: pixels)
}
