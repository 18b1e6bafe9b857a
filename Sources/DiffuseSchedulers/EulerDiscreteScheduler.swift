#if canImport(Glibc)
import Glibc
#endif
import DiffuseGraph

/// diffusers' `EulerDiscreteScheduler` (Karras et al., "Elucidating the Design Space of
/// Diffusion-Based Generative Models", Algorithm 2 without churn): in sigma space the sample is
/// x = x₀ + σ·ε, the model sees x/√(σ²+1), and each step is an Euler step of dx/dσ = (x - x̂₀)/σ.
public final class EulerDiscreteScheduler: Scheduler {
    public let className = "EulerDiscreteScheduler"
    public let order = 1
    public let alphasCumprod: [Double]
    public private(set) var timesteps: [Double] = []
    public private(set) var sigmas: [Double] = []

    enum Interpolation: String, CaseIterable { case linear, logLinear = "log_linear" }
    enum TimestepType: String, CaseIterable { case discrete, continuous }

    private let schedule: NoiseSchedule
    private let predictionType: PredictionType
    private let interpolation: Interpolation
    private let respacing: SigmaRespacing
    private let timestepSpacing: TimestepSpacing
    private let timestepType: TimestepType
    private let stepsOffset: Int
    private let finalSigmasType: FinalSigmasType

    public init(config: SchedulerConfig) throws {
        let r = config.reader(className)
        schedule = try NoiseSchedule(r, betaStart: 0.0001, betaEnd: 0.02, betaSchedule: .linear, terminalAlphaFloor: true)
        alphasCumprod = schedule.alphasCumprod.map(Double.init)
        // diffusers also accepts "original_sample" as a name for "sample".
        predictionType = try r.choice("prediction_type", .epsilon, aliases: ["original_sample": .sample])
        interpolation = try r.choice("interpolation_type", .linear)
        respacing = try SigmaRespacing(r)
        timestepSpacing = try r.choice("timestep_spacing", .linspace)
        timestepType = try r.choice("timestep_type", .discrete)
        stepsOffset = try r.int("steps_offset", 0)
        finalSigmasType = try r.choice("final_sigmas_type", .zero)
        // Before setTimesteps, diffusers' schedule is every training sigma, high to low, then 0.
        sigmas = schedule.trainingSigmas.reversed().map(Double.init) + [0]
    }

    /// √(σ_max² + 1) for "leading" spacing, σ_max otherwise (diffusers' rule).
    public var initNoiseSigma: Double {
        let maxSigma = sigmas.max() ?? 0
        return timestepSpacing == .leading ? (maxSigma * maxSigma + 1).squareRoot() : maxSigma
    }

    public func setTimesteps(_ numInferenceSteps: Int) throws {
        let n = numInferenceSteps, steps = schedule.numTrainTimesteps
        guard n >= 1 else { throw SchedulerError.invalidStepCount(className: className, steps: n, detail: "at least 1 is needed") }
        guard n <= steps else {
            throw SchedulerError.invalidStepCount(className: className, steps: n, detail: "at most num_train_timesteps (\(steps))")
        }
        var ts = Sigmas.spacedTimesteps(n, trainSteps: steps, spacing: timestepSpacing, stepsOffset: stepsOffset)
        var s = interpolatedSigmas(at: ts)
        if let respaced = respacing.respace(s, count: n, training: schedule.trainingSigmas) {
            s = respaced.sigmas
            ts = respaced.timesteps.map { Double(Float($0)) }
        }
        sigmas = (s + [finalSigma]).map { Double(Float($0)) }
        timesteps = isContinuousV ? continuousTimesteps(sigmas) : ts
    }

    /// The training sigmas at timesteps `ts`: interpolated linearly, or with `log_linear`
    /// diffusers' quirk (kept): n + 1 values from σ_max to σ_min whatever the timesteps, before
    /// the final sigma is appended.
    private func interpolatedSigmas(at ts: [Double]) -> [Double] {
        let fp = schedule.trainingSigmas.map(Double.init)
        switch interpolation {
        case .linear:
            return ts.map { NumPy.interp($0, fp) }
        case .logLinear:
            let ends = [fp[fp.count - 1], fp[0]].map { Double(Float(log($0))) }
            return NoiseSchedule.torchLinspace(ends[0], ends[1], ts.count + 1).map { Double(Float(exp(Double($0)))) }
        }
    }

    private var finalSigma: Double { finalSigmasType == .zero ? 0 : Double(schedule.trainingSigmas[0]) }

    /// `timestep_type` "continuous" with v-prediction: the model sees ¼ log σ as its timestep.
    private var isContinuousV: Bool { timestepType == .continuous && predictionType == .vPrediction }

    private func continuousTimesteps(_ sigmas: [Double]) -> [Double] { sigmas.dropLast().map { Double(0.25 * Float(log($0))) } }

    /// diffusers' `set_timesteps(timesteps=…)`: the training sigmas interpolated at them (with
    /// `log_linear` interpolation diffusers ignores them for the sigmas, kept), then the final
    /// sigma; or `sigmas=…`: those, the timesteps the training sigmas put them at.
    public func setTimesteps(_ custom: CustomSchedule) throws {
        switch custom {
        case .timesteps:
            let refused = respacing.configKey ?? (isContinuousV ? "timestep_type continuous and v_prediction" : nil)
            let ts = try custom.checkedTimesteps(className, trainSteps: schedule.numTrainTimesteps, refusing: refused).map { Double(Float($0)) }
            sigmas = (interpolatedSigmas(at: ts) + [finalSigma]).map { Double(Float($0)) }
            timesteps = ts
        case .sigmas:
            sigmas = try custom.checkedSigmas(className).map { Double(Float($0)) }
            let logSigmas = Sigmas.logSigmas(schedule.trainingSigmas)
            timesteps = isContinuousV ? continuousTimesteps(sigmas)
                : sigmas.dropLast().map { Double(Float(Sigmas.sigmaToTFloat32($0, logSigmas: logSigmas, numpy: true))) }
        }
    }

    public func setBeginIndex(_ index: Int) {}  // stateless: the sigma comes from the step index

    public func modelInputScale(stepIndex: Int) throws -> Double {
        try checkStep(self, stepIndex)
        return Sigmas.inputScale(sigmas[stepIndex])
    }

    public func step(modelOutput: DeviceTensor, stepIndex: Int, sample: DeviceTensor, algebra: LatentAlgebra,
                     noise: () throws -> DeviceTensor) throws -> SchedulerStepOutput {
        try checkStep(self, stepIndex)
        let sigma = sigmas[stepIndex]
        let x = LinearCombination(sample), m = LinearCombination(modelOutput)
        let predOriginal = predictionType.originalSample(sigma: sigma, sample: x, output: m)
        let derivative = (x - predOriginal) / sigma
        let dt = sigmas[stepIndex + 1] - sigma
        let prev = x + dt * derivative
        return SchedulerStepOutput(prevSample: try prev.evaluate(algebra), predOriginalSample: try predOriginal.evaluate(algebra))
    }

    public func addNoise(original: DeviceTensor, noise: DeviceTensor, stepIndex: Int,
                         algebra: LatentAlgebra) throws -> DeviceTensor {
        try noisedBySigma(original, noise, stepIndex: stepIndex, algebra: algebra)
    }
}
