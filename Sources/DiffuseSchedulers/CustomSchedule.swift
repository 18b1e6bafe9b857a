/// A schedule given outright instead of a step count: diffusers' `set_timesteps(timesteps=…)` or
/// `set_timesteps(sigmas=…)`, which its pipelines take as `timesteps=` and `sigmas=` (Align Your
/// Steps and other tuned schedules). The step count is then the schedule's length.
public enum CustomSchedule: Sendable, Equatable {
    /// Training timesteps, high to low, one per step.
    case timesteps([Double])
    /// Sigmas, high to low, one per step and the final one (often 0).
    case sigmas([Double])

    /// The denoising steps it asks for.
    public var stepCount: Int {
        switch self {
        case let .timesteps(t): return t.count
        case let .sigmas(s): return max(s.count - 1, 0)
        }
    }

    var kind: String {
        switch self {
        case .timesteps: return "timesteps"
        case .sigmas: return "sigmas"
        }
    }

    /// Align Your Steps (Sabour et al. 2024), the 10-step schedules diffusers ships as
    /// `diffusers.schedulers.AysSchedules`, by the names it gives them.
    public static let alignYourSteps: [String: CustomSchedule] = [
        "StableDiffusionTimesteps": .timesteps([999, 850, 736, 645, 545, 455, 343, 233, 124, 24]),
        "StableDiffusionSigmas": .sigmas([14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.0]),
        "StableDiffusionXLTimesteps": .timesteps([999, 845, 730, 587, 443, 310, 193, 116, 53, 13]),
        "StableDiffusionXLSigmas": .sigmas([14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.0]),
    ]
}

extension Scheduler {
    /// Schedulers that take no custom schedule say so by name, as diffusers' `retrieve_timesteps`.
    public func setTimesteps(_ custom: CustomSchedule) throws {
        throw SchedulerError.customSchedule(className: className, detail: "takes no custom \(custom.kind) (its set_timesteps has no `\(custom.kind)` argument in diffusers)")
    }
}

extension CustomSchedule {
    /// The timesteps, checked: at least one, strictly decreasing (diffusers' DDPM, LCM and TCD
    /// demand it; for the others anything else is not a denoising schedule), within the
    /// training timesteps [0, trainSteps), and whole where the class keeps integers.
    func checkedTimesteps(_ className: String, trainSteps: Int, refusing respacing: String? = nil,
                          integers: Bool = false) throws -> [Double] {
        guard case let .timesteps(ts) = self else {
            throw SchedulerError.customSchedule(className: className, detail: "takes custom timesteps, not sigmas")
        }
        if let respacing {
            throw SchedulerError.customSchedule(className: className, detail: "cannot take custom timesteps with \(respacing), as in diffusers")
        }
        guard !ts.isEmpty else { throw SchedulerError.customSchedule(className: className, detail: "the custom timesteps are empty") }
        for (i, t) in ts.enumerated() {
            guard t.isFinite && t >= 0 && t < Double(trainSteps) else {
                throw SchedulerError.customSchedule(className: className, detail: "timestep \(t) is outside the training timesteps 0 to \(trainSteps - 1)")
            }
            if integers && t != t.rounded() {
                throw SchedulerError.customSchedule(className: className, detail: "takes whole timesteps (diffusers stores them as int64), got \(t)")
            }
            if i > 0 && t >= ts[i - 1] {
                throw SchedulerError.customSchedule(className: className, detail: "custom timesteps must decrease (\(ts[i - 1]) then \(t))")
            }
        }
        return ts
    }

    /// The sigmas, checked: at least one step and the final sigma, strictly decreasing, the
    /// last one 0 or more.
    func checkedSigmas(_ className: String) throws -> [Double] {
        guard case let .sigmas(s) = self else {
            throw SchedulerError.customSchedule(className: className, detail: "takes custom sigmas, not timesteps")
        }
        guard s.count >= 2 else {
            throw SchedulerError.customSchedule(className: className, detail: "custom sigmas need one per step and the final one (at least 2, got \(s.count))")
        }
        for (i, v) in s.enumerated() {
            guard v.isFinite && v >= 0 && (i == s.count - 1 || v > 0) else {
                throw SchedulerError.customSchedule(className: className, detail: "sigma \(v) is not positive (only the last may be 0)")
            }
            if i > 0 && v >= s[i - 1] {
                throw SchedulerError.customSchedule(className: className, detail: "custom sigmas must decrease (\(s[i - 1]) then \(v))")
            }
        }
        return s
    }
}
