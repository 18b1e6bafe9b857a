import DiffuseGraph

/// diffusers' `HeunDiscreteScheduler` (Karras et al., Algorithm 1 without churn): each step is an
/// Euler step in sigma followed by a correction that averages the slopes at both ends, so it takes
/// two model evaluations. As in diffusers, the schedule interleaves them: every timestep after the
/// first appears twice, and the steps alternate between the Euler and the correction stage.
public final class HeunDiscreteScheduler: Scheduler {
    public let className = "HeunDiscreteScheduler"
    public let order = 2
    public let alphasCumprod: [Double]
    public private(set) var timesteps: [Double] = []
    /// diffusers' interleaved sigmas: σ₀, σ₁, σ₁, …, σₙ₋₁, σₙ₋₁, 0.
    public private(set) var sigmas: [Double] = []

    private let base: DiscreteSigmaSchedule
    private let predictionType: PredictionType
    private let clipSampleRange: Double?
    private var sequence = StepSequence()
    /// Between the two stages: the Euler stage's slope, step and starting sample.
    private var eulerStage: (derivative: DeviceTensor, dt: Double, sample: DeviceTensor)?

    public init(config: SchedulerConfig) throws {
        let r = config.reader(className)
        let schedule = try NoiseSchedule(r, betaStart: 0.00085, betaEnd: 0.012, betaSchedule: .linear, hasRescale: false)
        alphasCumprod = schedule.alphasCumprod.map(Double.init)
        predictionType = try r.choice("prediction_type", .epsilon)
        clipSampleRange = try r.bool("clip_sample", false) ? try r.double("clip_sample_range", 1.0) : nil
        base = try DiscreteSigmaSchedule(r, schedule: schedule)
        sigmas = base.untimedSigmas
    }

    public var initNoiseSigma: Double { base.initNoiseSigma(sigmas) }

    public func setTimesteps(_ numInferenceSteps: Int) throws {
        interleave(try base.make(numInferenceSteps, className: className))
    }

    /// diffusers' `set_timesteps(timesteps=…)`.
    public func setTimesteps(_ custom: CustomSchedule) throws {
        interleave(try base.make(custom, className: className))
    }

    private func interleave(_ schedule: (timesteps: [Double], sigmas: [Double])) {
        let (ts, s) = schedule
        let n = ts.count
        sigmas = [s[0]] + s[1..<n].flatMap { [$0, $0] } + [s[n]]
        timesteps = ([ts[0]] + ts[1...].flatMap { [$0, $0] }).map { Double(Float($0)) }
        eulerStage = nil
        sequence.reset()
    }

    public func setBeginIndex(_ index: Int) { sequence.beginIndex = index }

    public func modelInputScale(stepIndex: Int) throws -> Double {
        try checkStep(self, stepIndex)
        return Sigmas.inputScale(sigmas[stepIndex])
    }

    public func step(modelOutput: DeviceTensor, stepIndex i: Int, sample: DeviceTensor, algebra: LatentAlgebra,
                     noise: () throws -> DeviceTensor) throws -> SchedulerStepOutput {
        try checkStep(self, i)
        if try sequence.enter(i, className: className) { eulerStage = nil }
        let x = LinearCombination(sample), m = LinearCombination(modelOutput)
        // Both stages predict x̂₀ at sigmas[i]: the Euler stage's start, the sigma the correction reached.
        var predOriginal = predictionType.originalSample(sigma: sigmas[i], sample: x, output: m)
        if let range = clipSampleRange {
            predOriginal = LinearCombination(try algebra.clamp(try predOriginal.evaluate(algebra), min: -range, max: range))
        }
        let prev: LinearCombination
        if let stage = eulerStage {
            let derivative = 0.5 * ((x - predOriginal) / sigmas[i] + LinearCombination(stage.derivative))
            prev = LinearCombination(stage.sample) + stage.dt * derivative
            eulerStage = nil
        } else {
            let derivative = try ((x - predOriginal) / sigmas[i]).evaluate(algebra)
            let dt = sigmas[i + 1] - sigmas[i]
            prev = x + dt * LinearCombination(derivative)
            eulerStage = (derivative, dt, sample)
        }
        return SchedulerStepOutput(prevSample: try prev.evaluate(algebra), predOriginalSample: try predOriginal.evaluate(algebra))
    }

    public func addNoise(original: DeviceTensor, noise: DeviceTensor, stepIndex: Int,
                         algebra: LatentAlgebra) throws -> DeviceTensor {
        try noisedBySigma(original, noise, stepIndex: stepIndex, algebra: algebra)
    }
}
