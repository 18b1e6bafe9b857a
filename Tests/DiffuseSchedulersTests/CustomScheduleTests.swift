import DiffuseCore
import DiffuseGraph
import Testing
@testable import DiffuseSchedulers

/// Schedules given outright (diffusers' `timesteps=` / `sigmas=`): which classes take them, what
/// they make of them, and the clear refusals. The pipelines' goldens
/// (`golden/<variant>/custom_schedule/`) pin the values against diffusers.
struct CustomScheduleTests {
    /// The command-line names whose diffusers class takes custom timesteps, and the one that
    /// also takes sigmas.
    static let takeTimesteps: Set<SchedulerName> = [.euler, .heun, .ddpm, .dpmPlusPlus2M, .dpmPlusPlus2MSDE, .dpmPlusPlus3MSDE, .dpmPlusPlus2S, .lcm, .tcd]
    static let takeSigmas: Set<SchedulerName> = [.euler]
    static let ays = [999.0, 850, 736, 645, 545, 455, 343, 233, 124, 24]

    @Test(arguments: SchedulerName.allCases)
    func takenOrRefusedByName(_ name: SchedulerName) throws {
        let scheduler = try name.make(try SchedulerErrorTests.baseConfig())
        for (custom, takes) in [(CustomSchedule.timesteps(Self.ays), Self.takeTimesteps.contains(name)),
                                (.sigmas([14.6, 3.9, 0.9, 0]), Self.takeSigmas.contains(name))] {
            do {
                try scheduler.setTimesteps(custom)
                #expect(takes, "\(name) took \(custom)")
                if case let .timesteps(ts) = custom {
                    // Heun repeats every timestep after the first (its two stages).
                    let once = scheduler.timesteps.enumerated().filter { $0.offset == 0 || name != .heun || $0.offset % 2 == 1 }.map(\.element)
                    #expect(once == ts, "\(name): \(scheduler.timesteps)")
                }
            } catch let error as SchedulerError {
                #expect(!takes, "\(name) refused \(custom): \(error)")
                #expect("\(error)".contains(scheduler.className), "\(error)")
            }
        }
    }

    /// Sigmas from a step-count schedule, given back outright, put the timesteps where the
    /// step count did: the inversion of the training sigmas (`_sigma_to_t`) is the interpolation's.
    @Test func eulerSigmasInvertToTheirTimesteps() throws {
        let euler = try SchedulerName.euler.make(try SchedulerErrorTests.baseConfig())
        try euler.setTimesteps(12)
        let (ts, sigmas) = (euler.timesteps, euler.sigmas)
        try euler.setTimesteps(.sigmas(sigmas))
        #expect(euler.sigmas == sigmas)
        for (got, want) in zip(euler.timesteps, ts) { #expect(abs(got - want) < 2e-3, "\(got) vs \(want)") }
        #expect(euler.initNoiseSigma == sigmas.max())
    }

    @Test func badSchedulesAreRefusedWithTheReason() throws {
        let config = try SchedulerErrorTests.baseConfig()
        let cases: [(SchedulerName, CustomSchedule, String)] = [
            (.euler, .timesteps([]), "empty"),
            (.euler, .timesteps([999, 1200]), "outside the training timesteps"),
            (.euler, .timesteps([500, 600]), "must decrease"),
            (.euler, .timesteps([-1]), "outside"),
            (.euler, .sigmas([3]), "at least 2"),
            (.euler, .sigmas([3, 5, 0]), "must decrease"),
            (.euler, .sigmas([3, 0, 0]), "not positive"),
            (.dpmPlusPlus2M, .timesteps([999, 500.5]), "whole timesteps"),
            (.dpmPlusPlus2M, .sigmas([3, 0]), "not sigmas"),
            (.dpmPlusPlus2MKarras, .timesteps([999, 500]), "use_karras_sigmas"),
            (.lcm, .timesteps([999, 500.5]), "whole"),
            (.ddim, .timesteps([999, 500]), "takes no custom timesteps"),
        ]
        for (name, custom, mention) in cases {
            let message = SchedulerErrorTests.message { try name.make(config).setTimesteps(custom) }
            #expect(message?.contains(mention) == true, "\(name) \(custom): \(message ?? "accepted")")
        }
    }

    @Test func alignYourStepsAreDiffusersLists() {
        #expect(CustomSchedule.alignYourSteps["StableDiffusionTimesteps"] == .timesteps(Self.ays))
        for (name, schedule) in CustomSchedule.alignYourSteps {
            #expect(schedule.stepCount == 10, "\(name)")
        }
    }
}
