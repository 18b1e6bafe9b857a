import DiffuseCore
import DiffuseCPU
import DiffuseModels
@testable import DiffusePipelines
import Testing

/// Perturbed-attention guidance in the pipeline: diffusers' PAG pipelines' outputs where the
/// fixture set has the goldens (`golden/<variant>/pag/`, made by
/// scripts/fixtures/make_pag_reference.py), and for every fixture model that a zero scale is no
/// PAG, that PAG acts, and that layers the UNet has not are refused by name.
@Suite struct PAGTests {
    static let models = (try? ReferenceModel.all()) ?? []

    @Test func diffusersGoldens() throws {
        try expectOptionalGoldens(ReferenceCheck.checkPAG, models: Self.models, label: "PAG", script: "make_pag_reference.py")
    }

    static func pipeline(_ model: ReferenceModel) throws -> StableDiffusionPipeline {
        StableDiffusionPipeline(components: try StableDiffusionComponents.load(model.folder), backend: try CPUBackend(),
                                options: PipelineOptions(precision: .float32))
    }

    @Test(arguments: models) func zeroScaleIsNoPAGAndAScaleActs(model: ReferenceModel) throws {
        let pipeline = try Self.pipeline(model)
        let layer = pipeline.components.unet.selfAttentionLayers.first!
        var r = GenerationRequest(prompt: "a lighthouse")
        (r.steps, r.seed, r.width, r.height, r.decode, r.guidanceScale) = (2, 4, 64, 48, false, 5)
        let plain = try pipeline.generate(r).latents.toFloatArray()
        let scale = plain.map(abs).max() ?? 1
        func difference(_ pag: PerturbedAttentionGuidance) throws -> Float {
            r.pag = pag
            return zip(try pipeline.generate(r).latents.toFloatArray(), plain).map { abs($0 - $1) }.max() ?? 0
        }
        #expect(try difference(PerturbedAttentionGuidance(scale: 0, appliedLayers: [layer])) == 0)
        #expect(try difference(PerturbedAttentionGuidance(scale: 3, appliedLayers: [])) == 0)
        // A scale that the adaptive rate takes to 0 from the first step on.
        #expect(try difference(PerturbedAttentionGuidance(scale: 1, adaptiveScale: 1, appliedLayers: [layer])) <= 1e-5 * scale)
        #expect(try difference(PerturbedAttentionGuidance(scale: 3, appliedLayers: [layer])) > 1e-3 * scale)
    }

    @Test(arguments: models) func badSettingsAreRefusedByName(model: ReferenceModel) throws {
        let pipeline = try Self.pipeline(model)
        var r = GenerationRequest(prompt: "a lighthouse")
        (r.steps, r.width, r.height, r.decode) = (1, 64, 48, false)
        func message(_ pag: PerturbedAttentionGuidance) -> String {
            r.pag = pag
            do { _ = try pipeline.generate(r); return "" } catch { return "\(error)" }
        }
        #expect(message(PerturbedAttentionGuidance(appliedLayers: ["no_such_block"])).contains("\"no_such_block\" matches no self-attention layer"))
        #expect(message(PerturbedAttentionGuidance(appliedLayers: ["up_blocks.("])).contains("no valid regular expression"))
        #expect(message(PerturbedAttentionGuidance(scale: -1)).contains("PAG scale must be 0 or more"))
        #expect(message(PerturbedAttentionGuidance(scale: .nan)).contains("PAG scale must be 0 or more"))
        #expect(message(PerturbedAttentionGuidance(adaptiveScale: -0.1)).contains("adaptive scale"))
    }

    @Test func adaptiveScaleFallsWithTheTimestepToZero() {
        let pag = PerturbedAttentionGuidance(scale: 4, adaptiveScale: 0.005)
        #expect(pag.scale(atTimestep: 1000) == 4)
        #expect(pag.scale(atTimestep: 800) == Float(4) - Float(0.005) * 200)
        #expect(pag.scale(atTimestep: 100) == 0)
        #expect(PerturbedAttentionGuidance(scale: 4).scale(atTimestep: 1) == 4)
        #expect(!PerturbedAttentionGuidance(scale: 0).isEnabled)
    }
}
