import DiffuseCore
import DiffuseCPU
import DiffuseSchedulers
@testable import DiffusePipelines
import Testing

/// Custom schedules in the pipeline (diffusers' `timesteps=` / `sigmas=`): diffusers' outputs
/// where the fixture set has the goldens (`golden/<variant>/custom_schedule/`, made by
/// scripts/fixtures/make_custom_schedule_reference.py), and for every fixture model that a
/// step count's own schedule, given outright, is the same run.
@Suite struct CustomScheduleGoldenTests {
    static let models = (try? ReferenceModel.all()) ?? []

    @Test func diffusersGoldens() throws {
        try expectOptionalGoldens(ReferenceCheck.checkCustomSchedule, models: Self.models, label: "custom schedules",
                                  script: "make_custom_schedule_reference.py")
    }

    @Test(arguments: models) func givenScheduleIsTheStepCountsOwn(model: ReferenceModel) throws {
        let components = try StableDiffusionComponents.load(model.folder)
        let pipeline = StableDiffusionPipeline(components: components, backend: try CPUBackend(), options: PipelineOptions(precision: .float32))
        var r = GenerationRequest(prompt: "a windmill")
        (r.steps, r.seed, r.width, r.height, r.scheduler, r.guidanceScale) = (3, 5, 64, 48, "dpm++2m", 4)
        let scheduler = try Schedulers.make(named: "dpm++2m", config: components.schedulerConfig)
        try scheduler.setTimesteps(r.steps)
        let plain = try pipeline.generate(r)
        (r.steps, r.customSchedule) = (50, .timesteps(scheduler.timesteps))
        let given = try pipeline.generate(r)
        #expect(given.latents.toFloatArray() == plain.latents.toFloatArray())
        #expect(given.denoisingSteps == plain.denoisingSteps)
    }
}
