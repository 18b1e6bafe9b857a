import DiffuseCore
import DiffuseGraph
import Testing
@testable import DiffuseSchedulers

/// Every scheduler golden in `golden/schedulers`: built from its fully resolved config in
/// `configs.json`, then the schedules for every stored step count and the 25-step rollout.
struct SchedulerGoldenTests {
    static let directory = Fixtures.reference("golden/schedulers")

    struct Golden: CustomTestStringConvertible, Sendable {
        let name: String
        var testDescription: String { name }
    }

    /// The golden files present, by name (the file name without `.safetensors`).
    static let goldens: [Golden] = {
        let files = (try? Files.list(directory)) ?? []
        return files.filter { $0.hasSuffix(".safetensors") }.map { Golden(name: String($0.dropLast(12))) }.sorted { $0.name < $1.name }
    }()

    static func configs() throws -> JSON { try Files.readJSON(Files.join(directory, "configs.json")) }

    /// A fresh scheduler for a golden, from its resolved config (class in `_class_name`). An
    /// `eta` entry, where a golden records one, is DDIM's step argument.
    static func makeScheduler(_ name: String) throws -> Scheduler {
        guard let entry = try configs()[name] else {
            throw SchedulerError.invalidConfig(origin: "configs.json", detail: "no config for golden '\(name)'")
        }
        let scheduler = try Schedulers.make(config: SchedulerConfig(json: entry, origin: "configs.json[\(name)]"))
        if let eta = entry["eta"]?.double, let ddim = scheduler as? DDIMScheduler { ddim.eta = eta }
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
    static func expectTimesteps(_ got: [Double], _ want: Tensor, _ what: String,
                                sourceLocation: SourceLocation = #_sourceLocation) {
        if want.dtype == .int64 {
            #expect(got == want.toIntArray().map(Double.init), "\(what)", sourceLocation: sourceLocation)
        } else {
            expectCloseEach(got, want, tolerance: 1e-5, what, sourceLocation: sourceLocation)
        }
    }

    @Test func goldensArePresent() {
        #expect(!Self.goldens.isEmpty, "no scheduler goldens under \(Self.directory)")
    }

    @Test(arguments: goldens)
    func alphasCumprod(_ golden: Golden) throws {
        let file = try SafeTensorsFile(path: Files.join(Self.directory, golden.name + ".safetensors"))
        let scheduler = try Self.makeScheduler(golden.name)
        expectCloseEach(scheduler.alphasCumprod, try file.tensor("alphas_cumprod"), tolerance: 1e-5, "\(golden.name) alphas_cumprod")
    }

    @Test(arguments: goldens)
    func schedules(_ golden: Golden) throws {
        let file = try SafeTensorsFile(path: Files.join(Self.directory, golden.name + ".safetensors"))
        let counts = Self.stepCounts(file)
        #expect(!counts.isEmpty)
        for n in counts {
            let scheduler = try Self.makeScheduler(golden.name)
            try scheduler.setTimesteps(n)
            Self.expectTimesteps(scheduler.timesteps, try file.tensor("timesteps_\(n)"), "\(golden.name) timesteps_\(n)")
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
        let file = try SafeTensorsFile(path: Files.join(Self.directory, golden.name + ".safetensors"))
        let stepTimesteps = try file.tensor("step_timesteps")
        let scheduler = try Self.makeScheduler(golden.name)
        try scheduler.setTimesteps(try Self.rolloutSteps(file, golden.name))
        Self.expectTimesteps(scheduler.timesteps, stepTimesteps, "\(golden.name) step_timesteps")

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
    }

    /// img2img's add_noise at the step indices a golden records (where it records any).
    @Test(arguments: goldens)
    func addNoise(_ golden: Golden) throws {
        let file = try SafeTensorsFile(path: Files.join(Self.directory, golden.name + ".safetensors"))
        guard file.info("add_noise") != nil else { return }
        let scheduler = try Self.makeScheduler(golden.name)
        try scheduler.setTimesteps(try Self.rolloutSteps(file, golden.name))
        let original = HostTensor(try file.tensor("add_noise_original")), noise = HostTensor(try file.tensor("add_noise_noise"))
        let want = try file.tensor("add_noise")
        for (k, index) in try file.tensor("add_noise_indices").toIntArray().enumerated() {
            let got = try scheduler.addNoise(original: original, noise: noise, stepIndex: index, algebra: HostAlgebra())
            expectClose(try host(got), row(want, k), tolerance: 1e-5, "\(golden.name) add_noise[\(index)]")
        }
    }
}
