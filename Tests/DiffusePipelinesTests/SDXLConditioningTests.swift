import DiffuseCore
import DiffuseCPU
import FoundationEssentials
@testable import DiffusePipelines
import Testing

/// SDXL's second prompts and size/crop micro-conditioning: diffusers' outputs where the fixture
/// set has the goldens (`golden/<variant>/sdxl_conditioning/`, made by
/// scripts/fixtures/make_sdxl_conditioning_reference.py), and for every fixture model what holds
/// by construction.
@Suite struct SDXLConditioningTests {
    static let models = (try? ReferenceModel.all()) ?? []

    @Test func diffusersGoldens() throws {
        try expectOptionalGoldens(ReferenceCheck.checkSDXLConditioning, models: Self.models, label: "SDXL conditioning",
                                  script: "make_sdxl_conditioning_reference.py")
    }

    static func pipeline(_ model: ReferenceModel) throws -> StableDiffusionPipeline {
        StableDiffusionPipeline(components: try StableDiffusionComponents.load(model.folder), backend: try CPUBackend(),
                                options: PipelineOptions(precision: .float32))
    }

    /// prompt_2 reaches the second encoder's columns alone; the same text as the prompt, or an
    /// empty one, is no second prompt at all. Other models refuse it by name.
    @Test(arguments: models) func secondPrompt(model: ReferenceModel) throws {
        let p = try Self.pipeline(model)
        func encode(_ prompt2: String?, negative2: String? = nil) throws -> Tensor {
            try p.encodePrompt("a tall ship", negative: "fog", prompt2: prompt2, negative2: negative2, count: 1, guidance: true, clipSkip: nil).hidden
        }
        guard p.components.isXL else {
            do {
                _ = try encode("a harbour")
                Issue.record("a model with one text encoder took prompt_2")
            } catch {
                #expect("\(error)".contains("prompt_2"), "\(error)")
            }
            return
        }
        guard let te1 = p.components.textEncoder else { return }  // a refiner: one encoder, which reads the prompt
        let plain = try encode(nil)
        #expect(try encode("a tall ship").toFloatArray() == plain.toFloatArray())
        #expect(try encode("", negative2: "").toFloatArray() == plain.toFloatArray())
        let other = try encode("a harbour", negative2: "rain")
        let width1 = te1.encoder.hiddenSize, width = plain.shape[2]
        func columns(_ t: Tensor, _ range: Range<Int>) -> [Float] {
            let v = t.toFloatArray()
            return stride(from: 0, to: v.count, by: width).flatMap { v[($0 + range.lowerBound)..<($0 + range.upperBound)] }
        }
        #expect(columns(other, 0..<width1) == columns(plain, 0..<width1), "the first encoder reads the prompt")
        #expect(columns(other, width1..<width) != columns(plain, width1..<width), "the second encoder reads prompt_2")
    }

    /// The negative rows' time ids as each diffusers pipeline makes them.
    @Test(arguments: models) func negativeTimeIds(model: ReferenceModel) throws {
        let p = try Self.pipeline(model)
        var r = GenerationRequest(prompt: "x")
        guard p.components.unet.usesTextTimeConditioning else {
            r.negativeOriginalSize = (32, 32)
            #expect(throws: PipelineError.self) { try p.validateMicroConditioning(r) }
            return
        }
        let aesthetic = p.components.requiresAestheticsScore
        func rows(_ r: GenerationRequest) -> (negative: [Float], positive: [Float]) {
            let v = p.timeIds(r, width: 64, height: 48, count: 1, guidance: true).toFloatArray()
            return (Array(v[0..<(v.count / 2)]), Array(v[(v.count / 2)...]))
        }
        r.originalSize = (96, 128)
        r.cropsCoordsTopLeft = (8, 16)
        r.negativeOriginalSize = (24, 40)
        r.negativeCropsCoordsTopLeft = (2, 3)
        let tail: [Float] = aesthetic ? [6] : [48, 64]
        #expect(rows(r).positive == [96, 128, 8, 16] + tail)
        if !aesthetic {
            // From text, one negative size alone is ignored; both replace the row, crop and all.
            #expect(rows(r).negative == rows(r).positive)
            r.negativeTargetSize = (40, 56)
            #expect(rows(r).negative == [24, 40, 2, 3, 40, 56])
            // From a picture the negative rows keep the positive crop.
            r.initImage = Image(width: 8, height: 8, channels: 3)
            #expect(rows(r).negative == [24, 40, 8, 16, 40, 56])
            // ControlNet inpainting: none of the negative conditioning.
            r.maskImage = Image(width: 8, height: 8, channels: 3)
            r.controlNets = [ControlNetGuidance(image: Image(width: 8, height: 8, channels: 3))]
            #expect(rows(r).negative == rows(r).positive)
        } else {
            #expect(rows(r).negative == [24, 40, 2, 3, 2.5])
        }
        r.negativeTargetSize = (0, 56)
        #expect(throws: PipelineError.self) { try p.validateMicroConditioning(r) }
    }

    /// The command line: the options reach the image, the PNG records them, and what diffusers
    /// would silently not use is said.
    @Test func commandLine() throws {
        let model = Fixtures.reference("models/tiny-sdxl")
        guard Files.exists(model) else { return }
        let dir = temporaryFolder()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let common = ["generate", "a lighthouse", "--model", model, "--steps", "2", "--seed", "3", "--size", "64x64"]
        let plain = try runDiffuse(common + ["--output", dir + "/plain.png"])
        let conditioned = try runDiffuse(common + ["--prompt-2", "a storm", "--negative-prompt", "", "--negative-original-size", "32x32",
                                                   "--negative-target-size", "64x64", "--crops-coords-top-left", "4,8",
                                                   "--output", dir + "/conditioned.png"])
        let half = try runDiffuse(common + ["--negative-original-size", "32x32", "--negative-prompt-2", "grain", "--output", dir + "/half.png"])
        #expect(plain.status == 0 && conditioned.status == 0 && half.status == 0, "\(plain.err) \(conditioned.err) \(half.err)")
        let a = try ImageFile.read(dir + "/plain.png"), b = try ImageFile.read(dir + "/conditioned.png"), c = try ImageFile.read(dir + "/half.png")
        #expect(a.image != b.image)
        let parameters = b.text("parameters") ?? ""
        #expect(parameters.contains("Prompt 2: a storm") && parameters.contains("Negative original size: 32x32")
                && parameters.contains("Crops coords top left: \"4,8\""), "\(parameters)")
        #expect(a.image == c.image, "one negative size from text, and negative_prompt_2 under zeroed negatives, change nothing")
        #expect(half.err.contains("--negative-target-size") && half.err.contains("force_zeros_for_empty_prompt"), "\(half.err)")
    }
}
