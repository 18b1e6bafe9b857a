import DiffuseCore
import DiffuseGraph
import Testing
@testable import DiffuseSchedulers

/// Every scheduler golden in the reference set's `golden/schedulers`, and in `Fixtures/schedulers`
/// for the classes the reference does not cover (scripts/fixtures/make_scheduler_reference.py;
/// `DIFFUSE_SCHEDULER_FIXTURES` points elsewhere): each built from its fully resolved config in
/// its folder's `configs.json`, then the schedules for every stored step count and the rollout.
struct SchedulerGoldenTests {
    static let directories: [String] = {
        let here = String(#filePath)
        let own = Files.environment("DIFFUSE_SCHEDULER_FIXTURES") ?? String(here[..<here.lastIndex(of: "/")!]) + "/Fixtures/schedulers"
        return [Fixtures.reference("golden/schedulers"), own]
    }()

    struct Golden: CustomTestStringConvertible, Sendable {
        let directory: String
        let name: String
        var testDescription: String { name }
        var path: String { Files.join(directory, name + ".safetensors") }
    }

    /// The golden files present, by name (the file name without `.safetensors`).
    static let goldens: [Golden] = directories.flatMap { directory in
        let files = (try? Files.list(directory)) ?? []
        return files.filter { $0.hasSuffix(".safetensors") }.map { Golden(directory: directory, name: String($0.dropLast(12))) }
            .sorted { $0.name < $1.name }
    }

    /// A fresh scheduler for a golden, from its resolved config (class in `_class_name`). An
    /// `eta` entry, where a golden records one, is the step argument of DDIM or TCD.
    static func makeScheduler(_ golden: Golden) throws -> Scheduler {
        let configs = try Files.readJSON(Files.join(golden.directory, "configs.json"))
        guard let entry = configs[golden.name] else {
            throw SchedulerError.invalidConfig(origin: "configs.json", detail: "no config for golden '\(golden.name)'")
        }
        let scheduler = try Schedulers.make(config: SchedulerConfig(json: entry, origin: "configs.json[\(golden.name)]"))
        if let eta = entry["eta"]?.double {
            if let ddim = scheduler as? DDIMScheduler { ddim.eta = eta }
            if let tcd = scheduler as? TCDScheduler { tcd.eta = eta }
        }
        return scheduler
    }

    /// Step counts with a stored `timesteps_{n}`.
    static func stepCounts(_ file: SafeTensorsFile) -> [Int] {
        file.tensorNames.compactMap { $0.hasPrefix("timesteps_") ? Int($0.dropFirst("timesteps_".count)) : nil }.sorted()
    }

    /// The step count of the rollout: the n whose stored `timesteps_{n}` is `step_timesteps`
    /// (PNDM's schedule has one entry more than its step count).
    static func rolloutSteps(_ file: SafeTensorsFile, _ name: String) throws -> Int {
        let stepTimesteps = try file.tensor("step_timesteps").toFloatArray()
        let n = try stepCounts(file).first { try file.tensor("timesteps_\($0)").toFloatArray() == stepTimesteps }
        return try #require(n, "\(name): no timesteps_{n} matches step_timesteps")
    }

    /// Integer timesteps exactly, float ones within the README's 1e-5.
    static func expectTimesteps(_ got: [Double], _ want: Tensor, _ what: String, scheduler: Scheduler,
                                sourceLocation: SourceLocation = #_sourceLocation) {
        if want.dtype == .int64 {
            #expect(got == want.toIntArray().map(Double.init), "\(what)", sourceLocation: sourceLocation)
        } else if scheduler is KDPM2AncestralDiscreteScheduler && got.count == want.count {
            // Its midpoint timesteps (odd indices) invert σ_mid = √(σ·σ_down), and diffusers'
            // float32 σ_down = √(σ_next² − σ_up²) cancels about three digits on the last steps;
            // with torch's float sqrt an ulp off (not correctly rounded), those timesteps are
            // only good to about 1e-4 of a training step, so they are held to 1e-3 of one.
            for i in 0..<want.count {
                let tolerance = i % 2 == 1 ? 1e-3 : 1e-5 * max(1, abs(want.element(i)))
                #expect(abs(got[i] - want.element(i)) <= tolerance, "\(what)[\(i)]: \(got[i]) vs golden \(want.element(i))",
                        sourceLocation: sourceLocation)
            }
        } else {
            expectCloseEach(got, want, tolerance: 1e-5, what, sourceLocation: sourceLocation)
        }
    }

    @Test func goldensArePresent() {
        for directory in Self.directories {
            #expect(Self.goldens.contains { $0.directory == directory }, "no scheduler goldens under \(directory)")
        }
    }

    @Test(arguments: goldens)
    func alphasCumprod(_ golden: Golden) throws {
        let file = try SafeTensorsFile(path: golden.path)
        let scheduler = try Self.makeScheduler(golden)
        expectCloseEach(scheduler.alphasCumprod, try file.tensor("alphas_cumprod"), tolerance: 1e-5, "\(golden.name) alphas_cumprod")
    }

    @Test(arguments: goldens)
    func schedules(_ golden: Golden) throws {
        let file = try SafeTensorsFile(path: golden.path)
        let counts = Self.stepCounts(file)
        #expect(!counts.isEmpty)
        for n in counts {
            let scheduler = try Self.makeScheduler(golden)
            try scheduler.setTimesteps(n)
            Self.expectTimesteps(scheduler.timesteps, try file.tensor("timesteps_\(n)"), "\(golden.name) timesteps_\(n)",
                                 scheduler: scheduler)
            let sigma = try file.tensor("init_noise_sigma_\(n)").element(0)
            #expect(abs(scheduler.initNoiseSigma - sigma) <= 1e-5 * max(1, abs(sigma)),
                    "\(golden.name) init_noise_sigma_\(n): \(scheduler.initNoiseSigma) vs \(sigma)")
            // The generator stores sigmas only for goldens whose names it knows to be sigma-based.
            if file.info("sigmas_\(n)") != nil {
                expectCloseEach(scheduler.sigmas, try file.tensor("sigmas_\(n)"), tolerance: 1e-5, "\(golden.name) sigmas_\(n)")
            }
        }
    }

    /// Feeds the stored model outputs (and step noise) through our own rollout and compares
    /// every step; the tolerance grows linearly from 1e-5 to 1e-4 by the last step (README).
    @Test(arguments: goldens)
    func rollout(_ golden: Golden) throws {
        let file = try SafeTensorsFile(path: golden.path)
        let stepTimesteps = try file.tensor("step_timesteps")
        let scheduler = try Self.makeScheduler(golden)
        try scheduler.setTimesteps(try Self.rolloutSteps(file, golden.name))
        Self.expectTimesteps(scheduler.timesteps, stepTimesteps, "\(golden.name) step_timesteps", scheduler: scheduler)

        let modelOutputs = try file.tensor("model_outputs")
        let scaled = try file.tensor("scaled_model_inputs")
        let prevSamples = try file.tensor("prev_samples")
        let predOriginal = file.info("pred_original_samples") != nil ? try file.tensor("pred_original_samples") : nil
        let stepNoise = file.info("step_noise") != nil ? try file.tensor("step_noise") : nil
        let count = stepTimesteps.count
        #expect(modelOutputs.shape[0] == count && prevSamples.shape[0] == count)

        let algebra = HostAlgebra()
        var sample: DeviceTensor = HostTensor(try file.tensor("initial_sample"))
        var draws = 0
        let brownian = try Self.replayBrownianTimes(file, scheduler, golden.name)
        for i in 0..<count {
            let tolerance = 1e-5 + (1e-4 - 1e-5) * Double(i) / Double(max(count - 1, 1))
            let input = try algebra.combine([(try scheduler.modelInputScale(stepIndex: i), sample)])
            expectClose(try host(input), row(scaled, i), tolerance: tolerance, "\(golden.name) scaled_model_inputs[\(i)]")
            let out = try scheduler.step(modelOutput: HostTensor(row(modelOutputs, i)), stepIndex: i, sample: sample,
                                         algebra: algebra, noise: {
                guard let stepNoise, draws < stepNoise.shape[0] else {
                    throw SchedulerError.noiseRequired(className: "golden \(golden.name) has no noise for draw \(draws)")
                }
                draws += 1
                return HostTensor(row(stepNoise, draws - 1))
            })
            let inputScale = maxAbs(try host(sample))
            expectClose(try host(out.prevSample), row(prevSamples, i), tolerance: tolerance, inputScale: inputScale,
                        "\(golden.name) prev_samples[\(i)]")
            if let predOriginal {
                let x0 = try #require(out.predOriginalSample, "\(golden.name): no predOriginalSample")
                expectClose(try host(x0), row(predOriginal, i), tolerance: tolerance, inputScale: inputScale,
                            "\(golden.name) pred_original_samples[\(i)]")
            }
            sample = out.prevSample
        }
        #expect(draws == (stepNoise?.shape[0] ?? 0), "\(golden.name): the scheduler drew \(draws) noise tensors")
        if let brownian { #expect(brownian.used == brownian.recorded, "\(golden.name): Brownian noise drawn \(brownian.used) times") }
    }

    /// DPMSolverSDEScheduler's goldens record the times diffusers queried its Brownian path at:
    /// each of ours must be within 1e-6 of diffusers' (relative: torch's exp and log are MKL's, an
    /// ulp from glibc's, and σ = exp(−(−log σ)) turns an ulp of the log into a few of σ), and the
    /// rollout then goes on with diffusers' exact times, whose 1e-6 rounding an ulp could cross.
    final class BrownianReplay {
        let recorded: Int
        var used = 0
        init(recorded: Int) { self.recorded = recorded }
    }

    static func replayBrownianTimes(_ file: SafeTensorsFile, _ scheduler: Scheduler, _ name: String) throws -> BrownianReplay? {
        guard file.info("brownian_times") != nil, let sde = scheduler as? DPMSolverSDEScheduler else { return nil }
        let times = try file.tensor("brownian_times").toFloatArray()
        let replay = BrownianReplay(recorded: times.count / 2)
        sde.brownianQueryTimes = { sigma, sigmaNext in
            let k = replay.used
            guard k < replay.recorded else {
                throw SchedulerError.noiseRequired(className: "golden \(name) records \(replay.recorded) Brownian draws; draw \(k + 1)")
            }
            replay.used += 1
            let (a, b) = (times[2 * k], times[2 * k + 1])
            #expect(abs(sigma - a) <= 1e-6 * a && abs(sigmaNext - b) <= 1e-6 * b,
                    "\(name) Brownian draw \(k): (\(sigma), \(sigmaNext)) vs diffusers' (\(a), \(b))")
            return (a, b)
        }
        return replay
    }

    /// img2img's add_noise at the step indices a golden records (where it records any).
    @Test(arguments: goldens)
    func addNoise(_ golden: Golden) throws {
        let file = try SafeTensorsFile(path: golden.path)
        guard file.info("add_noise") != nil else { return }
        let scheduler = try Self.makeScheduler(golden)
        try scheduler.setTimesteps(try Self.rolloutSteps(file, golden.name))
        let original = HostTensor(try file.tensor("add_noise_original")), noise = HostTensor(try file.tensor("add_noise_noise"))
        let want = try file.tensor("add_noise")
        for (k, index) in try file.tensor("add_noise_indices").toIntArray().enumerated() {
            let got = try scheduler.addNoise(original: original, noise: noise, stepIndex: index, algebra: HostAlgebra())
            expectClose(try host(got), row(want, k), tolerance: 1e-5, "\(golden.name) add_noise[\(index)]")
        }
    }
}
