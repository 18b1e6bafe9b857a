import DiffuseCore
import DiffuseGraph

/// The latent arithmetic a scheduler needs; a Backend provides it on device tensors, tests on
/// host tensors. Every latent update of a step is one `combine` with host-computed coefficients,
/// so a denoising loop on a GPU never waits for the device.
public protocol LatentAlgebra {
    /// `Σ cᵢ·xᵢ` as one op into a new tensor; all `xᵢ` have one shape.
    func combine(_ terms: [(Double, DeviceTensor)]) throws -> DeviceTensor
    /// A host tensor on the device (noise a scheduler makes itself: the Brownian tree's).
    func upload(_ host: Tensor) throws -> DeviceTensor
    /// `x` clamped elementwise to [min, max], into a new tensor. Only the `clip_sample: true`
    /// configs of DDIM and LCM call it (diffusers' `pred_original_sample.clamp(...)`).
    func clamp(_ x: DeviceTensor, min: Double, max: Double) throws -> DeviceTensor
}

/// What one scheduler step returns.
public struct SchedulerStepOutput {
    /// The sample for the next step (diffusers' `prev_sample`).
    public let prevSample: DeviceTensor
    /// The predicted denoised sample x̂₀ where the scheduler forms one: diffusers'
    /// `pred_original_sample` (DDIM, Euler, Euler ancestral), LCM's `denoised`, and the
    /// data prediction DPM-Solver++ / UniPC keep as history. nil for PNDM.
    public let predOriginalSample: DeviceTensor?

    public init(prevSample: DeviceTensor, predOriginalSample: DeviceTensor?) {
        self.prevSample = prevSample
        self.predOriginalSample = predOriginalSample
    }
}

/// A diffusion sampler: the timestep schedule and the update rule, on the host in Float64.
///
/// Steps go by index into `timesteps`, not by timestep value (PNDM repeats values). Schedulers
/// with history (PNDM, DPM-Solver, UniPC) restart it when a step has the begin index and
/// otherwise expect consecutive indices. They keep only tensors they computed themselves, so a
/// `modelOutput` may be overwritten once `step` returns (a backend reusing its output buffer);
/// the `sample` passed in must stay unchanged until the next step, as the previous
/// `prevSample` always does.
public protocol Scheduler: AnyObject {
    /// The diffusers class this one matches, e.g. "EulerDiscreteScheduler".
    var className: String { get }
    /// After `setTimesteps`: diffusers' values (integers for DDIM/PNDM/DPM/UniPC/LCM, floats for Euler).
    var timesteps: [Double] { get }
    /// Sigma-based schedulers: one per timestep plus the final sigma, as diffusers has them. Empty otherwise.
    var sigmas: [Double] { get }
    /// The standard deviation of the initial noise: `latents = randn * initNoiseSigma`.
    var initNoiseSigma: Double { get }
    /// Model evaluations per step (1 for every scheduler here).
    var order: Int { get }
    /// ᾱ over the training timesteps, with diffusers' float32 values.
    var alphasCumprod: [Double] { get }

    /// Builds the schedule; a clear error for fewer than 1 step, more than the training
    /// timesteps, or what else the class cannot schedule.
    func setTimesteps(_ numInferenceSteps: Int) throws
    /// Builds a schedule given outright (`CustomSchedule`); classes diffusers gives no such
    /// argument refuse it by name.
    func setTimesteps(_ custom: CustomSchedule) throws
    /// Start at step `index` (img2img), as diffusers' `set_begin_index`.
    func setBeginIndex(_ index: Int)
    /// `scale_model_input` as a scalar factor for step `stepIndex` (1 for DDIM/PNDM, 1/√(σ²+1) for Euler).
    func modelInputScale(stepIndex: Int) throws -> Double
    /// One step. `noise` is called only by stochastic schedulers (Euler ancestral, LCM, DDIM with
    /// eta > 0, SDE DPM-Solver), at the point diffusers draws it.
    func step(modelOutput: DeviceTensor, stepIndex: Int, sample: DeviceTensor, algebra: LatentAlgebra,
              noise: () throws -> DeviceTensor) throws -> SchedulerStepOutput
    /// Called by a pipeline with its generator after drawing the initial latents, before the
    /// first step: a scheduler whose noise is not drawn from that stream step by step
    /// (`DPMSolverSDEScheduler`'s Brownian tree) takes its seed and kind of generator from it.
    func prepareNoise(generator: RandomSource) throws
    /// `add_noise` for img2img at timestep index `stepIndex`: √ᾱ·x₀ + √(1-ᾱ)·noise (or the sigma form).
    func addNoise(original: DeviceTensor, noise: DeviceTensor, stepIndex: Int, algebra: LatentAlgebra) throws -> DeviceTensor
}

extension Scheduler {
    public func prepareNoise(generator: RandomSource) throws {}

    /// A step of a deterministic scheduler (a stochastic one throws if it needs noise).
    public func step(modelOutput: DeviceTensor, stepIndex: Int, sample: DeviceTensor,
                     algebra: LatentAlgebra) throws -> SchedulerStepOutput {
        try step(modelOutput: modelOutput, stepIndex: stepIndex, sample: sample, algebra: algebra,
                 noise: { throw SchedulerError.noiseRequired(className: self.className) })
    }
}

/// Everything a scheduler can reject, each naming the class and what is wrong.
public enum SchedulerError: Error, CustomStringConvertible, Equatable {
    case unknownScheduler(name: String, valid: [String])
    case unsupportedClass(name: String, origin: String, valid: [String])
    case unsupportedValue(className: String, key: String, value: String, supported: [String], origin: String)
    case unsupportedFeature(className: String, key: String, value: String, reason: String, origin: String)
    case invalidValue(className: String, key: String, value: String, expected: String, origin: String)
    case invalidConfig(origin: String, detail: String)
    case invalidStepCount(className: String, steps: Int, detail: String)
    case timestepsNotSet(className: String)
    case stepIndexOutOfRange(className: String, index: Int, count: Int)
    case stepOutOfOrder(className: String, expected: Int, got: Int)
    case noiseRequired(className: String)
    case shapeMismatch(detail: String)
    case customSchedule(className: String, detail: String)

    public var description: String {
        switch self {
        case let .unknownScheduler(name, valid):
            return "unknown scheduler '\(name)'; valid names: \(valid.joined(separator: ", "))"
        case let .unsupportedClass(name, origin, valid):
            return "\(origin): scheduler class '\(name)' is not supported; supported: \(valid.joined(separator: ", "))"
        case let .unsupportedValue(cls, key, value, supported, origin):
            let options = supported.isEmpty ? "" : " (supported: \(supported.joined(separator: ", ")))"
            return "\(origin): \(cls) does not support \(key) = \(value)\(options)"
        case let .unsupportedFeature(cls, key, value, reason, origin):
            return "\(origin): \(cls) does not support \(key) = \(value): \(reason)"
        case let .invalidValue(cls, key, value, expected, origin):
            return "\(origin): \(cls) needs \(key) to be \(expected), got \(value)"
        case let .invalidConfig(origin, detail):
            return "\(origin): \(detail)"
        case let .invalidStepCount(cls, steps, detail):
            return "\(cls): cannot schedule \(steps) inference steps: \(detail)"
        case let .timestepsNotSet(cls):
            return "\(cls): call setTimesteps before stepping"
        case let .stepIndexOutOfRange(cls, index, count):
            return "\(cls): step index \(index) is outside the \(count) scheduled timesteps"
        case let .stepOutOfOrder(cls, expected, got):
            return "\(cls): steps must be taken in order: expected step \(expected), got \(got) (restart at the begin index)"
        case let .noiseRequired(cls):
            return "\(cls): this configuration draws noise during a step; pass a noise source"
        case let .shapeMismatch(detail):
            return "latent shape mismatch: \(detail)"
        case let .customSchedule(cls, detail):
            return "\(cls): \(detail)"
        }
    }
}

/// `Σ cᵢ·xᵢ` over device tensors, written like diffusers' tensor arithmetic and evaluated as one
/// `LatentAlgebra.combine`. A tensor that appears in several terms is merged into one.
struct LinearCombination {
    private(set) var terms: [(Double, DeviceTensor)]

    init(_ x: DeviceTensor) { terms = [(1, x)] }
    private init(terms: [(Double, DeviceTensor)]) { self.terms = terms }

    static func + (a: LinearCombination, b: LinearCombination) -> LinearCombination {
        LinearCombination(terms: a.terms + b.terms)
    }
    static func - (a: LinearCombination, b: LinearCombination) -> LinearCombination { a + (-1) * b }
    static prefix func - (a: LinearCombination) -> LinearCombination { (-1) * a }
    static func * (c: Double, a: LinearCombination) -> LinearCombination {
        LinearCombination(terms: a.terms.map { (c * $0.0, $0.1) })
    }
    static func * (a: LinearCombination, c: Double) -> LinearCombination { c * a }
    static func / (a: LinearCombination, c: Double) -> LinearCombination { (1 / c) * a }

    /// The merged terms: one per distinct tensor, exact zeros dropped (at least one term kept).
    var merged: [(Double, DeviceTensor)] {
        var out: [(Double, DeviceTensor)] = []
        var slot: [ObjectIdentifier: Int] = [:]
        for (c, x) in terms {
            if let i = slot[ObjectIdentifier(x)] {
                out[i].0 += c
            } else {
                slot[ObjectIdentifier(x)] = out.count
                out.append((c, x))
            }
        }
        let nonzero = out.filter { $0.0 != 0 }
        return nonzero.isEmpty ? [out[0]] : nonzero
    }

    func evaluate(_ algebra: LatentAlgebra) throws -> DeviceTensor {
        try algebra.combine(merged)
    }
}

extension Scheduler {
    /// `add_noise` of the classes parameterised by ᾱ: √ᾱₜ·x₀ + √(1−ᾱₜ)·ε at step `stepIndex`'s timestep.
    func noisedByAlphasCumprod(_ original: DeviceTensor, _ noise: DeviceTensor, stepIndex: Int,
                               algebra: LatentAlgebra) throws -> DeviceTensor {
        try checkStep(self, stepIndex)
        let alphaProd = alphasCumprod[Int(timesteps[stepIndex])]
        return try algebra.combine([(alphaProd.squareRoot(), original), ((1 - alphaProd).squareRoot(), noise)])
    }

    /// `add_noise` of the sigma classes: x₀ + σ·ε with step `stepIndex`'s sigma.
    func noisedBySigma(_ original: DeviceTensor, _ noise: DeviceTensor, stepIndex: Int,
                       algebra: LatentAlgebra) throws -> DeviceTensor {
        try checkStep(self, stepIndex)
        return try algebra.combine([(1, original), (sigmas[stepIndex], noise)])
    }
}

/// Checks a step index against the schedule.
func checkStep(_ scheduler: Scheduler, _ index: Int) throws {
    guard !scheduler.timesteps.isEmpty else { throw SchedulerError.timestepsNotSet(className: scheduler.className) }
    guard scheduler.timesteps.indices.contains(index) else {
        throw SchedulerError.stepIndexOutOfRange(className: scheduler.className, index: index, count: scheduler.timesteps.count)
    }
}

/// Step-order bookkeeping for a scheduler that carries state from one step to the next: the state
/// restarts at the begin index, and every other step must follow the one before it.
struct StepSequence {
    var beginIndex = 0
    private var next: Int?

    /// Enters step `index`; true when it starts afresh (the caller clears its state).
    mutating func enter(_ index: Int, className: String) throws -> Bool {
        defer { next = index + 1 }
        if index == beginIndex { return true }
        guard index == next else { throw SchedulerError.stepOutOfOrder(className: className, expected: next ?? beginIndex, got: index) }
        return false
    }

    /// Forgets the last step (after a new schedule).
    mutating func reset() { next = nil }
}
