import DiffuseCore
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
