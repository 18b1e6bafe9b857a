import DiffuseCore
import DiffuseCPU
import DiffuseModels
@testable import DiffusePipelines
import Testing

/// FreeU in the pipeline: diffusers' outputs where the fixture set has the goldens
/// (`golden/<variant>/freeu/`, made by scripts/fixtures/make_freeu_reference.py), and for every
/// fixture model that the neutral values are no FreeU at all, while others act.
@Suite struct FreeUPipelineTests {
    static let models = (try? ReferenceModel.all()) ?? []

    @Test func diffusersGoldens() throws {
        try expectOptionalGoldens(ReferenceCheck.checkFreeU, models: Self.models, label: "FreeU", script: "make_freeu_reference.py")
    }

    @Test(arguments: models) func neutralValuesAreNoFreeU(model: ReferenceModel) throws {
        let pipeline = StableDiffusionPipeline(components: try StableDiffusionComponents.load(model.folder), backend: try CPUBackend(),
                                               options: PipelineOptions(precision: .float32))
        var r = GenerationRequest(prompt: "a harbour")
        (r.steps, r.seed, r.width, r.height, r.decode) = (2, 9, 64, 48, false)
        let plain = try pipeline.generate(r).latents.toFloatArray()
        let scale = plain.map(abs).max() ?? 1
        func difference(_ f: FreeU) throws -> Float {
            r.freeU = f
            return zip(try pipeline.generate(r).latents.toFloatArray(), plain).map { abs($0 - $1) }.max() ?? 0
        }
        // The same arithmetic (×1, + 0·low), in a graph the backend may fuse otherwise.
        #expect(try difference(FreeU(s1: 1, s2: 1, b1: 1, b2: 1)) <= 1e-5 * scale)
        #expect(try difference(.stableDiffusion1) > 1e-3 * scale)
    }
}
