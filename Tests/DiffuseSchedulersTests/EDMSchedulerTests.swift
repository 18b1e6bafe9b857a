import DiffuseCore
import DiffuseGraph
import Foundation
import Testing
@testable import DiffuseSchedulers

/// diffusers' EDM schedulers (their pipeline goldens are `golden/<variant>/edm/`, made by
/// scripts/fixtures/make_edm_reference.py): the noise levels and timesteps EDM defines, and the
/// configs they refuse, by key.
struct EDMSchedulerTests {
    static let playground: [String: JSON] = [
        "_class_name": .string("EDMDPMSolverMultistepScheduler"), "sigma_min": .number(0.002), "sigma_max": .number(80),
        "sigma_data": .number(0.5), "sigma_schedule": .string("exponential"), "solver_order": .number(2),
        "algorithm_type": .string("dpmsolver++"), "final_sigmas_type": .string("zero"),
    ]

    /// Exponential sigmas are evenly spaced in log σ from σ_max to σ_min, Karras' in σ^(1/ρ); the
    /// model's timestep is ¼·log σ; the initial noise is √(σ_max² + 1); the input scale is
    /// 1/√(σ² + σ_data²).
    @Test func noiseLevelsAndPreconditioning() throws {
        let dpm = try Schedulers.make(config: try SchedulerConfig(Self.playground))
        #expect(dpm.className == "EDMDPMSolverMultistepScheduler")
        try dpm.setTimesteps(5)
        #expect(dpm.sigmas.count == 6 && dpm.sigmas.last == 0)
        #expect(abs(dpm.sigmas[0] - 80) < 1e-4 && abs(dpm.sigmas[4] - 0.002) < 1e-8)
        let logs = dpm.sigmas.prefix(5).map { log($0) }
        for i in 1..<4 { #expect(abs((logs[i] - logs[i - 1]) - (logs[i + 1] - logs[i])) < 1e-5) }
        for (t, s) in zip(dpm.timesteps, dpm.sigmas) { #expect(abs(t - 0.25 * log(s)) < 1e-6) }
        #expect(abs(dpm.initNoiseSigma - (80.0 * 80 + 1).squareRoot()) < 1e-9)
        #expect(abs(try dpm.modelInputScale(stepIndex: 2) - 1 / (dpm.sigmas[2] * dpm.sigmas[2] + 0.25).squareRoot()) < 1e-12)
        #expect(dpm.alphasCumprod.isEmpty)

        var euler = Self.playground
        euler["_class_name"] = .string("EDMEulerScheduler")
        euler["sigma_schedule"] = .string("karras")
        euler["final_sigmas_type"] = .string("sigma_min")
        let e = try Schedulers.make(config: try SchedulerConfig(euler))
        try e.setTimesteps(4)
        #expect(e.sigmas.count == 5 && e.sigmas[4] == e.sigmas[3])
        let roots = e.sigmas.prefix(4).map { pow($0, 1 / 7.0) }
        for i in 1..<3 { #expect(abs((roots[i] - roots[i - 1]) - (roots[i + 1] - roots[i])) < 1e-5) }
    }

    /// What diffusers' EDM classes cannot run fails at the config, naming the key.
    @Test func refusals() throws {
        func message(_ overrides: [String: JSON]) -> String {
            do { _ = try Schedulers.make(config: try SchedulerConfig(Self.playground.merging(overrides) { $1 })); return "" } catch { return "\(error)" }
        }
        #expect(message(["prediction_type": .string("sample")]).contains("prediction_type"))
        #expect(message(["algorithm_type": .string("dpmsolver")]).contains("algorithm_type"))
        #expect(message(["algorithm_type": .string("sde-dpmsolver++"), "solver_order": .number(3)]).contains("solver_order"))
        #expect(message(["sigma_schedule": .string("linear")]).contains("sigma_schedule"))
        #expect(message(["sigma_min": .number(90)]).contains("sigma_min"))
        #expect(message([:]).isEmpty)
    }
}
