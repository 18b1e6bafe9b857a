import DiffuseCore
import DiffuseGraph
import Testing
@testable import DiffuseSchedulers

/// diffusers' `from_config` semantics on the models' real (minimal) scheduler_config.json files:
/// a key the file lacks takes the class's own default. The e2e goldens hold the timesteps and
/// init_noise_sigma of `Cls.from_config(pipe.scheduler.config)`, e.g. Euler from SD1.5's PNDM
/// file uses linspace spacing while DDIM and PNDM use leading.
struct FromConfigTests {
    struct Case: CustomTestStringConvertible, Sendable {
        let model: String
        let scheduler: String
        var testDescription: String { "\(model)/\(scheduler)" }
    }

    static func modelConfigPath(_ model: String) -> String {
        Fixtures.reference("models/\(model)/scheduler/scheduler_config.json")
    }

    /// A model's scheduler config as its pipeline holds it: StableDiffusionPipeline (not the SDXL
    /// one) fixes outdated configs when it is built, before any `from_config`.
    static func pipelineConfig(_ model: String) throws -> SchedulerConfig {
        let config = try SchedulerConfig.load(modelConfigPath(model))
        let index = try Files.readJSON(Fixtures.reference("models/\(model)/model_index.json"))
        return index["_class_name"]?.string == "StableDiffusionPipeline" ? config.fixedByStableDiffusionPipeline() : config
    }

    /// golden/<model>/e2e_<cli name>.safetensors, for models with a scheduler config.
    static let cases: [Case] = {
        let golden = Fixtures.reference("golden")
        var out: [Case] = []
        for model in ((try? Files.list(golden)) ?? []).sorted() where Files.exists(modelConfigPath(model)) {
            for file in ((try? Files.list(Files.join(golden, model))) ?? []).sorted()
            where file.hasPrefix("e2e_") && file.hasSuffix(".safetensors") {
                out.append(Case(model: model, scheduler: String(file.dropFirst(4).dropLast(12))))
            }
        }
        return out
    }()

    @Test func casesArePresent() { #expect(!Self.cases.isEmpty) }

    @Test(arguments: cases)
    func pipelineSchedule(_ c: Case) throws {
        let config = try Self.pipelineConfig(c.model)
        let golden = try SafeTensorsFile(path: Fixtures.reference("golden/\(c.model)/e2e_\(c.scheduler).safetensors"))
        let want = try golden.tensor("timesteps")
        let scheduler = try SchedulerName(parsing: c.scheduler).make(config)
        // The step count whose schedule has the golden's length (PNDM adds one timestep).
        var steps = 0
        for n in 1...want.count {
            try scheduler.setTimesteps(n)
            if scheduler.timesteps.count == want.count { steps = n; break }
        }
        #expect(steps > 0, "\(c): no step count gives \(want.count) timesteps")
        expectCloseEach(scheduler.timesteps, want, tolerance: 1e-6, "\(c) timesteps")
        let sigma = try golden.tensor("init_noise_sigma").element(0)
        #expect(abs(scheduler.initNoiseSigma - sigma) <= 1e-5 * max(1, sigma), "\(c) init_noise_sigma \(scheduler.initNoiseSigma) vs \(sigma)")
    }

    /// The model's own scheduler (its `_class_name`) builds from every model folder.
    @Test func modelsOwnSchedulers() throws {
        let models = try Files.list(Fixtures.reference("models")).filter { Files.exists(Self.modelConfigPath($0)) }
        #expect(!models.isEmpty)
        for model in models {
            let config = try Self.pipelineConfig(model)
            let scheduler = try Schedulers.make(config: config)
            #expect(scheduler.className == config.className)
            try scheduler.setTimesteps(4)
        }
    }

    /// Every command-line golden's scheduler name builds from its model's config and schedules its steps.
    @Test func commandLineCases() throws {
        let dir = Fixtures.reference("golden/cli")
        let cases = try Files.list(dir).filter { $0.hasSuffix(".json") }
        #expect(!cases.isEmpty)
        for file in cases {
            let args = try Files.readJSON(Files.join(dir, file))
            let model = try #require(args["model"]?.string), name = try #require(args["sched"]?.string)
            let steps = try #require(args["steps"]?.int)
            let scheduler = try Schedulers.make(named: name, config: Self.pipelineConfig(model))
            try scheduler.setTimesteps(steps)
            #expect(scheduler.timesteps.count == steps, "\(file): \(name) scheduled \(scheduler.timesteps.count) timesteps")
        }
    }

    /// `_use_default_values` (written by newer diffusers) marks keys that were only defaults:
    /// another class must not inherit them.
    @Test func useDefaultValuesAreNotCarriedOver() throws {
        let file = try #require(try Files.readJSON(Self.modelConfigPath(try Self.anyModel())).members)
        let members = file.filter { $0.0 != "timestep_spacing" && $0.0 != "_class_name" } + [("timestep_spacing", JSON.string("leading"))]
        let explicit = try EulerDiscreteScheduler(config: SchedulerConfig(json: .object(members)))
        let marked = try EulerDiscreteScheduler(config: SchedulerConfig(
            json: .object(members + [("_use_default_values", .array([.string("timestep_spacing")]))])))
        try explicit.setTimesteps(4)
        try marked.setTimesteps(4)
        let trainSteps = Double(file.first { $0.0 == "num_train_timesteps" }?.1.int ?? 1000)
        #expect(marked.timesteps.first == trainSteps - 1, "the marked key falls back to Euler's linspace default")
        #expect(explicit.timesteps.first != trainSteps - 1, "an explicit leading spacing is kept")
    }

    /// StableDiffusionPipeline's fix-ups of an outdated config (steps_offset 1, clip_sample false).
    /// A key the file names changes for every class built from it; a key the file left to its
    /// class's default changes only for that class's own scheduler: diffusers' `from_config`
    /// drops it (`_use_default_values`), so another class, or the same class built by name,
    /// takes its own default.
    @Test func stableDiffusionPipelineFixups() throws {
        let schedule: [(String, JSON)] = [("beta_start", .number(0.00085)), ("beta_end", .number(0.012)),
                                           ("beta_schedule", .string("scaled_linear")), ("num_train_timesteps", .number(1000))]
        func file(_ className: String, _ keys: [(String, JSON)]) throws -> SchedulerConfig {
            try SchedulerConfig(json: .object([("_class_name", .string(className))] + schedule + keys))
        }
        func first(_ s: Scheduler) throws -> Double { try s.setTimesteps(4); return s.timesteps[0] }  // leading: 750 + offset

        let named = try file("DDIMScheduler", [("steps_offset", .number(0)), ("clip_sample", .bool(false))]).fixedByStableDiffusionPipeline()
        #expect(try first(Schedulers.make(config: named)) == 751)
        #expect(try first(Schedulers.make(named: "pndm", config: named)) == 751)

        let raw = try file("PNDMScheduler", [("skip_prk_steps", .bool(true))])
        let omitted = raw.fixedByStableDiffusionPipeline()
        #expect(try first(Schedulers.make(config: omitted)) == 751, "the pipeline's own PNDM")
        #expect(try first(Schedulers.make(named: "pndm", config: omitted)) == 750, "PNDMScheduler.from_config")
        #expect(try first(Schedulers.make(named: "ddim", config: omitted)) == 750, "DDIMScheduler.from_config")
        #expect(try first(Schedulers.make(config: raw)) == 750, "SDXL's pipeline fixes nothing")

        // DDIM's clip_sample defaults to true: its own scheduler stops clipping, one built by name does not.
        let ddim = try file("DDIMScheduler", [("steps_offset", .number(1))]).fixedByStableDiffusionPipeline()
        let x = HostTensor(patternTensor(SchedulerBehaviourTests.shape, seed: 0.2))
        let shape = SchedulerBehaviourTests.shape
        let m = HostTensor(Tensor(shape: shape, floats: patternTensor(shape, seed: 1.1).toFloatArray().map { $0 * 8 }))
        func x0(_ s: Scheduler) throws -> [Float] {
            try s.setTimesteps(4)
            return try #require(try s.step(modelOutput: m, stepIndex: 0, sample: x, algebra: HostAlgebra()).predOriginalSample).toHost().toFloatArray()
        }
        let own = try x0(Schedulers.make(config: ddim)), byName = try x0(Schedulers.make(named: "ddim", config: ddim))
        #expect(own.contains { abs($0) > 1 }, "the own scheduler does not clip")
        #expect(byName.allSatisfy { abs($0) <= 1 } && byName == own.map { min(max($0, -1), 1) }, "DDIMScheduler.from_config clips")
    }

    static func anyModel() throws -> String {
        try #require(try Files.list(Fixtures.reference("models")).sorted().first { Files.exists(modelConfigPath($0)) })
    }
}
