import DiffuseCore
import DiffuseGraph
import DiffuseSchedulers
@testable import DiffusePipelines
import Testing

/// diffusers' `from_pretrained` builds each component from the class model_index.json names; a
/// scheduler config whose `_class_name` says otherwise (a scheduler saved into a folder without
/// updating the index) is read by that class, as diffusers reads it.
@Test func theSchedulerClassIsTheIndexs() throws {
    guard let model = try ReferenceModel.all().first else { return }
    let dir = try TemporaryDirectory()
    let out = dir.join("model")
    try copyTree(model.folder, to: out)
    let index = try Files.readJSON(Files.join(out, "model_index.json"))
    let named = index["scheduler"]?.array?.last?.string ?? ""
    let path = Files.join(out, "scheduler", "scheduler_config.json")
    let config = try Files.readJSON(path)
    let other = named == "DDIMScheduler" ? "EulerDiscreteScheduler" : "DDIMScheduler"
    let changed = JSON.object([("_class_name", .string(other))] + (config.members ?? []).filter { $0.0 != "_class_name" })
    try Files.write(Array(changed.serialized(pretty: true).utf8), to: path)
    let loaded = try StableDiffusionComponents.load(out)
    #expect(loaded.schedulerConfig.className == named)
    #expect(try Schedulers.make(config: loaded.schedulerConfig).className == named)
}

/// `schedulerOverrides` (the CLI's `--scheduler-config`) go on top of the model's config and of
/// what a sampler name fixes, as `Cls.from_config(config, key=value)`; a key the class does not
/// read is refused, naming the keys it reads.
@Test func schedulerOverridesWinAndUnreadKeysAreRefused() throws {
    guard let model = try ReferenceModel.all().first else { return }
    let pipeline = StableDiffusionPipeline(components: try StableDiffusionComponents.load(model.folder), backend: ReferenceBackend(),
                                           options: PipelineOptions(precision: .float32))
    var r = GenerationRequest(prompt: "x")
    r.scheduler = "euler"
    r.schedulerOverrides = ["timestep_spacing": .string("trailing")]
    let trailing = try pipeline.makeScheduler(r)
    try trailing.setTimesteps(4)
    #expect(trailing.timesteps.first == 999)
    // The name fixes Karras sigmas; an override turns them off again.
    r.scheduler = "dpm2-karras"
    r.schedulerOverrides = ["use_karras_sigmas": .bool(false)]
    let plain = try pipeline.makeScheduler(r), named = try SchedulerName.dpm2.make(pipeline.components.schedulerConfig)
    try plain.setTimesteps(5)
    try named.setTimesteps(5)
    #expect(plain.sigmas == named.sigmas)
    r.schedulerOverrides = ["noise_sampler_seed": .number(3)]
    #expect(throws: PipelineError.self) { try pipeline.makeScheduler(r) }
    r.scheduler = "dpm++sde"
    let sde = try #require(try pipeline.makeScheduler(r) as? DPMSolverSDEScheduler)
    #expect(sde.noiseSamplerSeed == 3)
}
