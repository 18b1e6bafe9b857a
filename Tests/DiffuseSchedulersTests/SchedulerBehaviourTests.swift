import DiffuseCore
import DiffuseGraph
import Testing
@testable import DiffuseSchedulers

/// Behaviour the goldens do not pin down: the latent arithmetic, restarts, img2img begin
/// indices, clipping, and diffusers' per-sample generator lists.
struct SchedulerBehaviourTests {
    static let shape = [1, 4, 8, 8]

    @Test func hostCombineIsOneRoundedDoubleSum() throws {
        let a = patternTensor([2, 3, 5], seed: 0.1), b = patternTensor([2, 3, 5], seed: 1.9), c = patternTensor([2, 3, 5], seed: 4.4)
        let coefficients = [0.7, -1.25, 3e-3]
        let out = try HostAlgebra().combine(zip(coefficients, [a, b, c].map(HostTensor.init)).map { ($0, $1) }).toHost()
        for i in 0..<out.count {
            let want = Float(coefficients[0] * a.element(i) + coefficients[1] * b.element(i) + coefficients[2] * c.element(i))
            #expect(out.floats[i] == want, "element \(i)")
        }
        let clamped = try HostAlgebra().clamp(HostTensor(a), min: -0.5, max: 0.25).toHost()
        for i in 0..<a.count { #expect(clamped.floats[i] == min(max(a.floats[i], -0.5), 0.25)) }
    }

    @Test func repeatedTensorsAreMergedAndZerosDropped() {
        let x = HostTensor(patternTensor(Self.shape)), y = HostTensor(patternTensor(Self.shape, seed: 3))
        let sum = 2 * LinearCombination(x) - 0.5 * LinearCombination(y) + LinearCombination(x) / 4 + 0.5 * LinearCombination(y)
        let merged = sum.merged
        #expect(merged.count == 1 && merged[0].0 == 2.25 && merged[0].1 === x)
        let zero = 0 * LinearCombination(x)
        #expect(zero.merged.count == 1, "an all-zero combination keeps one term, so the result has the right shape")
    }

    /// Every scheduler run twice over the same schedule gives the same samples: a step at the
    /// begin index restarts the history of the multistep schedulers.
    @Test(arguments: SchedulerName.allCases)
    func restartingReproducesTheRun(_ name: SchedulerName) throws {
        let scheduler = try name.make(try SchedulerErrorTests.baseConfig())
        try scheduler.setTimesteps(8)
        func run() throws -> [Float] {
            var x: DeviceTensor = HostTensor(patternTensor(Self.shape, seed: 0.3))
            var draws = 0.0
            try scheduler.prepareNoise(generator: TorchCPUGenerator(seed: 5))  // DPM++ SDE's Brownian seed
            for i in scheduler.timesteps.indices {
                let m = HostTensor(patternTensor(Self.shape, seed: Double(i) + 0.7))
                x = try scheduler.step(modelOutput: m, stepIndex: i, sample: x, algebra: HostAlgebra(), noise: {
                    draws += 1
                    return HostTensor(patternTensor(Self.shape, seed: 10 + draws))
                }).prevSample
            }
            return try x.toHost().toFloatArray()
        }
        let first = try run()
        #expect(first.allSatisfy { $0.isFinite })
        #expect(try run() == first)
    }

    /// img2img: a run that starts at the begin index (history empty there) equals a fresh
    /// scheduler's run from that index, and add_noise uses that index's noise level.
    /// A second-order scheduler starts on a first stage, as the pipelines' `t_start · order` does.
    /// DPM++ SDE's Brownian path is the same for both (one seed, the schedule's sigma range).
    @Test(arguments: [SchedulerName.dpmPlusPlus2MKarras, .unipc, .pndm, .euler, .ddim, .heun, .dpm2, .lms, .deis, .dpmPlusPlusSDEKarras])
    func beginIndex(_ name: SchedulerName) throws {
        let config = try SchedulerErrorTests.baseConfig()
        let begin = 3 * (try name.make(config).order)
        func run(_ scheduler: Scheduler) throws -> [Float] {
            try scheduler.prepareNoise(generator: TorchCPUGenerator(seed: 8))
            let original = HostTensor(patternTensor(Self.shape, seed: 0.9)), noise = HostTensor(patternTensor(Self.shape, seed: 5))
            var x = try scheduler.addNoise(original: original, noise: noise, stepIndex: begin, algebra: HostAlgebra())
            for i in begin..<scheduler.timesteps.count {
                let m = HostTensor(patternTensor(Self.shape, seed: Double(i)))
                x = try scheduler.step(modelOutput: m, stepIndex: i, sample: x, algebra: HostAlgebra()).prevSample
            }
            return try x.toHost().toFloatArray()
        }
        let used = try name.make(config)
        try used.setTimesteps(10)
        try used.prepareNoise(generator: TorchCPUGenerator(seed: 3))
        _ = try used.step(modelOutput: HostTensor(patternTensor(Self.shape)), stepIndex: 0,
                          sample: HostTensor(patternTensor(Self.shape, seed: 2)), algebra: HostAlgebra())
        used.setBeginIndex(begin)
        let fresh = try name.make(config)
        try fresh.setTimesteps(10)
        fresh.setBeginIndex(begin)
        #expect(try run(used) == run(fresh))
    }

    /// DDIM and LCM with clip_sample: x̂₀ is the unclipped prediction clamped to the range.
    @Test(arguments: ["DDIMScheduler", "LCMScheduler"])
    func clipSample(_ className: String) throws {
        let base = try SchedulerErrorTests.baseConfig()
        let clipped = try Schedulers.make(className: className, config: base.overriding(["clip_sample": .bool(true), "clip_sample_range": .number(0.5)]))
        let free = try Schedulers.make(className: className, config: base.overriding(["clip_sample": .bool(false)]))
        let x = HostTensor(patternTensor(Self.shape, seed: 0.2)), m = HostTensor(patternTensor(Self.shape, seed: 1.1))
        var clampedSome = false
        for s in [clipped, free] { try s.setTimesteps(4) }
        let a = try clipped.step(modelOutput: m, stepIndex: 0, sample: x, algebra: HostAlgebra(), noise: { x })
        let b = try free.step(modelOutput: m, stepIndex: 0, sample: x, algebra: HostAlgebra(), noise: { x })
        if className == "DDIMScheduler" {
            let got = try #require(a.predOriginalSample).toHost(), unclipped = try #require(b.predOriginalSample).toHost()
            for i in 0..<got.count {
                #expect(got.floats[i] == min(max(unclipped.floats[i], -0.5), 0.5))
                clampedSome = clampedSome || abs(unclipped.floats[i]) > 0.5
            }
            #expect(clampedSome, "the test input must reach the clip range")
        } else {
            #expect(try a.prevSample.toHost().toFloatArray() != b.prevSample.toHost().toFloatArray())
        }
    }

    /// DPM-Solver's sigma spacings as diffusers ranks them: Lu's lambdas may be set with Karras or
    /// exponential sigmas; Karras then wins over Lu, and Lu over exponential. Karras with
    /// exponential is refused, as diffusers refuses it.
    @Test func dpmSolverSigmaSpacingPrecedence() throws {
        let base = try SchedulerErrorTests.baseConfig()
        func sigmas(_ flags: [String]) throws -> [Double] {
            let config = base.overriding(Dictionary(uniqueKeysWithValues: flags.map { ($0, JSON.bool(true)) }))
            let scheduler = try Schedulers.make(className: "DPMSolverMultistepScheduler", config: config)
            try scheduler.setTimesteps(10)
            return scheduler.sigmas
        }
        let karras = try sigmas(["use_karras_sigmas"]), lu = try sigmas(["use_lu_lambdas"])
        let exponential = try sigmas(["use_exponential_sigmas"])
        #expect(karras != lu && lu != exponential)
        #expect(try sigmas(["use_karras_sigmas", "use_lu_lambdas"]) == karras)
        #expect(try sigmas(["use_lu_lambdas", "use_exponential_sigmas"]) == lu)
        #expect(throws: SchedulerError.self) { try sigmas(["use_karras_sigmas", "use_exponential_sigmas"]) }
    }

    /// The two-stage schedulers (two model evaluations per step): a step must follow the one
    /// before it, so a correction stage cannot be entered without its first stage, and the
    /// schedule interleaves each later timestep twice (Heun) or with its midpoint (DPM2).
    @Test(arguments: [SchedulerName.heun, .dpm2, .dpm2Ancestral])
    func twoStageSchedules(_ name: SchedulerName) throws {
        let scheduler = try name.make(try SchedulerErrorTests.baseConfig())
        #expect(scheduler.order == 2)
        try scheduler.setTimesteps(5)
        #expect(scheduler.timesteps.count == 9)
        let t = scheduler.timesteps
        if name == .heun {
            #expect(t[1] == t[2] && t[3] == t[4])
        } else {
            // Each midpoint lies below the timestep of its step's first stage.
            #expect(t[0] > t[1] && t[2] > t[3], "midpoints: \(t)")
        }
        let x = HostTensor(patternTensor(Self.shape)), m = HostTensor(patternTensor(Self.shape, seed: 2))
        _ = try scheduler.step(modelOutput: m, stepIndex: 0, sample: x, algebra: HostAlgebra(), noise: { x })
        #expect(throws: SchedulerError.self) {
            try scheduler.step(modelOutput: m, stepIndex: 2, sample: x, algebra: HostAlgebra(), noise: { x })
        }
    }

    /// TCD's eta (γ): 0 never draws noise and is deterministic; the scheduler's own default
    /// (0.3) re-noises every step but the last.
    @Test func tcdEta() throws {
        let scheduler = try SchedulerName.tcd.make(try SchedulerErrorTests.baseConfig())
        let tcd = try #require(scheduler as? TCDScheduler)
        #expect(tcd.eta == 0.3)
        try scheduler.setTimesteps(4)
        func run() throws -> Int {
            var x: DeviceTensor = HostTensor(patternTensor(Self.shape)), draws = 0
            for i in scheduler.timesteps.indices {
                x = try scheduler.step(modelOutput: HostTensor(patternTensor(Self.shape, seed: Double(i))), stepIndex: i, sample: x,
                                       algebra: HostAlgebra(), noise: { draws += 1; return HostTensor(patternTensor(Self.shape, seed: 9)) }).prevSample
            }
            return draws
        }
        #expect(try run() == 3)
        tcd.eta = 0
        #expect(try run() == 0)
        tcd.eta = 1.5
        #expect(throws: SchedulerError.self) { try run() }
    }

    /// The command line's names fix what AUTOMATIC1111's sampler names mean: "-karras" Karras
    /// sigmas, "2M SDE" the stochastic DPM-Solver++ of order 2.
    @Test func namesFixTheirSettings() {
        #expect(SchedulerName.lmsKarras.overrides["use_karras_sigmas"] == .bool(true))
        #expect(SchedulerName.lms.overrides.isEmpty)
        let sde = SchedulerName.dpmPlusPlus2MSDEKarras.overrides
        #expect(sde["algorithm_type"] == .string("sde-dpmsolver++") && sde["use_karras_sigmas"] == .bool(true))
        #expect(SchedulerName.dpm2AncestralKarras.samplerName == "DPM2 a Karras")
        for name in SchedulerName.allCases { #expect(Schedulers.classNames.contains(name.className)) }
    }

    /// diffusers' randn_tensor with a generator per batch entry draws each entry separately.
    @Test func generatorListsDrawPerBatchEntry() throws {
        let list = try randnTensor([2, 4, 8, 8], generators: [TorchCPUGenerator(seed: 1), TorchCPUGenerator(seed: 2)])
        let one = TorchCPUGenerator(seed: 1).randn([1, 4, 8, 8]), two = TorchCPUGenerator(seed: 2).randn([1, 4, 8, 8])
        #expect(list.toFloatArray() == one.toFloatArray() + two.toFloatArray())
        #expect(try randnTensor([3, 4], generators: [TorchCPUGenerator(seed: 5)]).toFloatArray()
                == TorchCPUGenerator(seed: 5).randn([3, 4]).toFloatArray())
        #expect(throws: RandomError.self) { try randnTensor([3, 4], generators: [TorchCPUGenerator(seed: 1), TorchCPUGenerator(seed: 2)]) }
        let reseeded = TorchCPUGenerator(seed: 9)
        _ = reseeded.randn([5])  // leaves a cached normal behind
        reseeded.manualSeed(1)
        #expect(reseeded.randn([5]).toFloatArray() == TorchCPUGenerator(seed: 1).randn([5]).toFloatArray())
    }
}
