import DiffuseCore
import DiffuseCPU
import DiffuseModels
@testable import DiffusePipelines
import Testing

/// EDM models (Playground v2.5): diffusers' outputs where the fixture set has the goldens
/// (`golden/<variant>/edm/`, made by scripts/fixtures/make_edm_reference.py), and for every SDXL
/// fixture model what holds by construction of the VAE's latent statistics.
@Suite struct EDMTests {
    static let models = (try? ReferenceModel.all()) ?? []

    @Test func diffusersGoldens() throws {
        try expectOptionalGoldens(ReferenceCheck.checkEDM, models: Self.models, label: "EDM", script: "make_edm_reference.py")
    }

    /// A VAE with latents_mean 0 and latents_std 1 is the plain VAE, bit for bit (image to image
    /// encodes with them, every SDXL pipeline decodes with them); other statistics change the
    /// image; a list of the wrong length is refused by name; SD 1.x/2.x pipelines ignore them.
    @Test(arguments: models) func latentStatistics(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        guard let vae = base.vae.model as? AutoencoderKL else { return }
        func with(_ mean: [Double], _ std: [Double]) throws -> StableDiffusionPipeline {
            var config = vae.config
            (config.latentsMean, config.latentsStd) = (mean, std)
            var c = base
            c.vae = AutoencoderComponent(model: try AutoencoderKL(config: config), weights: base.vae.weights)
            return StableDiffusionPipeline(components: c, backend: try CPUBackend(), options: PipelineOptions(precision: .float32))
        }
        let channels = vae.latentChannels
        var r = GenerationRequest(prompt: "a red barn")
        (r.steps, r.seed, r.width, r.height, r.strength) = (2, 3, 64, 48, 0.7)
        r.initImage = IPAdapterTests.picture(width: 70, height: 50, seed: 2)
        let original = StableDiffusionPipeline(components: base, backend: try CPUBackend(), options: PipelineOptions(precision: .float32))
        let plain = try original.generate({ var q = r; q.initImage = nil; return q }())
        let neutral = try with(Array(repeating: 0, count: channels), Array(repeating: 1, count: channels))
        let plainImg2Img = try original.generate(r)
        let neutralImg2Img = try neutral.generate(r)
        #expect(neutralImg2Img.latents.toFloatArray() == plainImg2Img.latents.toFloatArray())
        #expect(neutralImg2Img.images == plainImg2Img.images)

        let shifted = try with(Array(repeating: 0.3, count: channels), Array(repeating: 1.5, count: channels))
        var text = r
        text.initImage = nil
        let moved = try shifted.generate(text)
        #expect(moved.latents.toFloatArray() == plain.latents.toFloatArray(), "the statistics act outside the denoising loop")
        #expect((moved.images == plain.images) == !base.isXL, "SDXL pipelines apply them, SD 1.x/2.x ones not")

        if base.isXL {
            do {
                _ = try with([0.1], [1]).generate(text)
                Issue.record("a latents_mean of the wrong length was accepted")
            } catch {
                #expect("\(error)".contains("latents_mean"), "\(error)")
            }
        }
    }
}
