import DiffuseCore
import DiffuseGraph
import Testing
@testable import DiffuseSchedulers

/// Bad names, step counts and config values give clear errors naming what is wrong.
struct SchedulerErrorTests {
    /// The SD1.5-style config of the first fixture model with one.
    static func baseConfig() throws -> SchedulerConfig {
        try SchedulerConfig.load(FromConfigTests.modelConfigPath(try FromConfigTests.anyModel()))
    }

    static func message(_ body: () throws -> Void) -> String? {
        do { try body() } catch { return "\(error)" }
        return nil
    }

    @Test func unknownSchedulerNameListsTheValidOnes() throws {
        let config = try Self.baseConfig()
        let text = try #require(Self.message { _ = try Schedulers.make(named: "dpm++4m", config: config) })
        #expect(text.contains("'dpm++4m'"))
        for name in SchedulerName.allCases { #expect(text.contains(name.rawValue)) }
        #expect(throws: SchedulerError.self) { try SchedulerName(parsing: "") }
        #expect(try SchedulerName(parsing: "DPM++2M-Karras") == .dpmPlusPlus2MKarras)
    }

    @Test(arguments: SchedulerName.allCases)
    func badStepCounts(_ name: SchedulerName) throws {
        let scheduler = try name.make(try Self.baseConfig())
        for steps in [0, -3, 1001] {
            let text = try #require(Self.message { try scheduler.setTimesteps(steps) }, "\(name): \(steps) steps accepted")
            #expect(text.contains(scheduler.className) && text.contains("\(steps)"), "\(text)")
        }
    }

    @Test func lcmStepsBeyondTheDistillationSchedule() throws {
        let lcm = try LCMScheduler(config: try Self.baseConfig().overriding(["original_inference_steps": .number(20)]))
        let text = try #require(Self.message { try lcm.setTimesteps(21) })
        #expect(text.contains("original_inference_steps"))
        try lcm.setTimesteps(20)
    }

    /// Each unsupported value names the class, the key and the value.
    @Test func unsupportedConfigValues() throws {
        let base = try Self.baseConfig()
        let cases: [(String, String, JSON, String)] = [
            ("DDIMScheduler", "beta_schedule", .string("cosine"), "cosine"),
            ("EulerDiscreteScheduler", "timestep_spacing", .string("uniform"), "uniform"),
            ("PNDMScheduler", "prediction_type", .string("sample"), "sample"),
            ("EulerAncestralDiscreteScheduler", "prediction_type", .string("flow_prediction"), "flow_prediction"),
            ("DDIMScheduler", "thresholding", .bool(true), "true"),
            ("DPMSolverMultistepScheduler", "variance_type", .string("learned_range"), "learned_range"),
            ("DPMSolverMultistepScheduler", "algorithm_type", .string("dpmsolver"), "dpmsolver"),  // with final_sigmas_type zero
            ("DPMSolverMultistepScheduler", "solver_order", .number(4), "4"),
            ("UniPCMultistepScheduler", "use_flow_sigmas", .bool(true), "true"),
            ("EulerDiscreteScheduler", "use_beta_sigmas", .bool(true), "true"),
            ("LCMScheduler", "num_train_timesteps", .string("1000"), "\"1000\""),
            ("DDIMScheduler", "trained_betas", .array([.number(0.1), .number(0.2)]), "2 values"),
        ]
        for (cls, key, value, shown) in cases {
            let text = try #require(Self.message { _ = try Schedulers.make(className: cls, config: base.overriding([key: value])) },
                                    "\(cls) accepted \(key) = \(value)")
            #expect(text.contains(cls) && text.contains(key) && text.contains(shown), "\(text)")
            #expect(text.contains(base.origin), "\(text)")
        }
    }

    @Test func unknownKeysAreIgnored() throws {
        let config = try Self.baseConfig().overriding(["some_future_option": .number(3), "clip_sample_range": .number(2)])
        for name in Schedulers.classNames { _ = try Schedulers.make(className: name, config: config) }
    }

    @Test func unsupportedClassAndMissingClassName() throws {
        let base = try Self.baseConfig()
        let text = try #require(Self.message { _ = try Schedulers.make(className: "CMStochasticIterativeScheduler", config: base) })
        #expect(text.contains("CMStochasticIterativeScheduler") && text.contains("EulerDiscreteScheduler"))
        let anonymous = try SchedulerConfig(["beta_schedule": .string("linear")], origin: "inline")
        #expect(Self.message { _ = try Schedulers.make(config: anonymous) }?.contains("_class_name") == true)
        #expect(throws: SchedulerError.self) { try SchedulerConfig(json: .array([])) }
    }

    @Test func stepsOutsideTheScheduleOrOutOfOrder() throws {
        let config = try Self.baseConfig()
        let x = HostTensor(patternTensor([1, 4, 8, 8])), m = HostTensor(patternTensor([1, 4, 8, 8], seed: 2))
        for name in SchedulerName.allCases {
            let scheduler = try name.make(config)
            let unset = Self.message { _ = try scheduler.step(modelOutput: m, stepIndex: 0, sample: x, algebra: HostAlgebra(), noise: { x }) }
            #expect(unset?.contains("setTimesteps") == true, "\(name): \(unset ?? "no error")")
            #expect(throws: SchedulerError.self) { try scheduler.modelInputScale(stepIndex: 0) }
            try scheduler.setTimesteps(10)
            let beyond = Self.message { _ = try scheduler.step(modelOutput: m, stepIndex: 99, sample: x, algebra: HostAlgebra(), noise: { x }) }
            #expect(beyond?.contains("99") == true, "\(name): \(beyond ?? "no error")")
            #expect(throws: SchedulerError.self) { try scheduler.modelInputScale(stepIndex: 99) }
        }
        // Multistep schedulers keep history: a skipped step is an error, restarting at the begin index is not.
        for name in [SchedulerName.dpmPlusPlus2M, .unipc, .pndm] {
            let scheduler = try name.make(config)
            try scheduler.setTimesteps(10)
            _ = try scheduler.step(modelOutput: m, stepIndex: 0, sample: x, algebra: HostAlgebra())
            let skipped = Self.message { _ = try scheduler.step(modelOutput: m, stepIndex: 2, sample: x, algebra: HostAlgebra()) }
            #expect(skipped?.contains("expected step 1") == true, "\(name): \(skipped ?? "no error")")
            _ = try scheduler.step(modelOutput: m, stepIndex: 0, sample: x, algebra: HostAlgebra())
        }
    }

    @Test func stochasticStepsNeedNoise() throws {
        let scheduler = try SchedulerName.eulerAncestral.make(try Self.baseConfig())
        try scheduler.setTimesteps(4)
        let x = HostTensor(patternTensor([1, 4, 8, 8]))
        let text = Self.message { _ = try scheduler.step(modelOutput: x, stepIndex: 0, sample: x, algebra: HostAlgebra()) }
        #expect(text?.contains("noise") == true)
    }

    @Test func combiningDifferentShapesFails() {
        let a = HostTensor(patternTensor([1, 4, 8, 8])), b = HostTensor(patternTensor([1, 4, 8, 9]))
        let text = Self.message { _ = try HostAlgebra().combine([(1, a), (2, b)]) }
        #expect(text?.contains("[1, 4, 8, 9]") == true)
        #expect(throws: SchedulerError.self) { try HostAlgebra().combine([]) }
    }
}
