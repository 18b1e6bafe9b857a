import DiffuseCore
import DiffuseCPU
import DiffuseGraph
import DiffusePipelines
import Testing

@Suite("End-to-end parity with diffusers")
struct EndToEndTests {
    /// Every `golden/<variant>/e2e_<scheduler>.safetensors`: prompt and negative from
    /// prompts.json, the stored initial latents, the scheduler named by the file; the
    /// latents after every step, the final latents and the 8-bit image must match.
    @Test(arguments: e2eCases().map { "\($0.variant)/\($0.file)" })
    func e2e(_ path: String) throws {
        let parts = path.split(separator: "/").map(String.init)
        let (variant, file) = (parts[0], parts[1])
        let golden = try SafeTensorsFile(path: Fixtures.reference("golden/\(path)"))
        let prompts = try Files.readJSON(Fixtures.reference("golden/\(variant)/prompts.json"))
        let components = try loadComponents(Fixtures.reference("models/\(variant)"))
        let image = try golden.tensor("image_uint8")
        let (steps, guidance) = try readmeE2EArguments()
        var r = GenerationRequest(prompt: prompts["e2e_prompt"]!.string!)
        r.negativePrompt = prompts["e2e_negative_prompt"]?.string
        r.steps = steps
        r.guidanceScale = guidance
        r.height = image.shape[1]
        r.width = image.shape[2]
        r.latents = try golden.tensor("init_latents")
        r.scheduler = String(file.dropFirst(4).dropLast(12))  // e2e_<name>.safetensors

        for attention in [AttentionImplementation.fused, .math] {
            let pipeline = StableDiffusionPipeline(components: components, backend: try CPUBackend(),
                                                   options: PipelineOptions(attention: attention))
            // The prompt embeddings the UNet saw.
            let cfg = try golden.tensor("prompt_embeds_cfg")
            let e = try pipeline.encodePrompt(r.prompt, negative: r.negativePrompt, count: 1,
                                              guidance: pipeline.doesClassifierFreeGuidance(guidanceScale: guidance), clipSkip: nil)
            #expect(relativeError(e.hidden, cfg) <= 1e-4, "\(path): prompt embeddings off by \(relativeError(e.hidden, cfg))")
            if let pooled = try? golden.tensor("add_text_embeds_cfg") {
                #expect(relativeError(e.pooled!, pooled) <= 1e-4, "\(path): pooled embeddings")
            }
            var stepLatents: [Tensor] = []
            let stepGolden = try golden.tensor("step_latents")
            let result = try pipeline.generate(r) { p in
                if p.phase == .denoising { stepLatents.append(try! p.latents!.toHost()) }
                return true
            }
            #expect(stepLatents.count == stepGolden.shape[0], "\(path): \(stepLatents.count) steps, diffusers took \(stepGolden.shape[0])")
            for (i, got) in stepLatents.prefix(stepGolden.shape[0]).enumerated() {
                let want = stepGolden.slice(i..<(i + 1)).reshaped(got.shape)
                #expect(relativeError(got, want) <= 1e-3, "\(path) [\(attention)]: step \(i) latents off by \(relativeError(got, want))")
            }
            let err = relativeError(result.latents, try golden.tensor("latents_out"))
            #expect(err <= 1e-3, "\(path) [\(attention)]: final latents off by \(err)")
            let pixels = VaeImageProcessor.uint8Tensor(result.images)
            let want = image.toFloatArray(), got = pixels.toFloatArray()
            let off = zip(want, got).map { abs($0 - $1) }
            #expect(off.max()! <= 1, "\(path) [\(attention)]: pixels differ by up to \(off.max()!)")
            print("\(path) [\(attention)]: latents rel err \(err), pixels off by 1 level: \(off.filter { $0 > 0 }.count) of \(off.count)")
        }
    }
}
