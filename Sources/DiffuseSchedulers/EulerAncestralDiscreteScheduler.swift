import DiffuseGraph

/// diffusers' `EulerAncestralDiscreteScheduler` (k-diffusion's `sample_euler_ancestral`): an Euler
/// step down to σ_down, then fresh noise of size σ_up, with σ_down² + σ_up² = σ_next².
public final class EulerAncestralDiscreteScheduler: Scheduler {
    public let className = "EulerAncestralDiscreteScheduler"
    public let order = 1
    public let alphasCumprod: [Double]
    public private(set) var timesteps: [Double] = []
    public private(set) var sigmas: [Double] = []

    private let schedule: NoiseSchedule
    private let predictionType: PredictionType
    private let timestepSpacing: TimestepSpacing
    private let stepsOffset: Int

    public init(config: SchedulerConfig) throws {
        let r = config.reader(className)
        schedule = try NoiseSchedule(r, betaStart: 0.0001, betaEnd: 0.02, betaSchedule: .linear, terminalAlphaFloor: true)
        alphasCumprod = schedule.alphasCumprod.map(Double.init)
        predictionType = try r.choice("prediction_type", .epsilon, allowed: [.epsilon, .vPrediction])
        timestepSpacing = try r.choice("timestep_spacing", .linspace)
        stepsOffset = try r.int("steps_offset", 0)
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
        let ts = Sigmas.spacedTimesteps(n, trainSteps: steps, spacing: timestepSpacing, stepsOffset: stepsOffset)
        let fp = schedule.trainingSigmas.map(Double.init)
        sigmas = (ts.map { NumPy.interp($0, fp) } + [0]).map { Double(Float($0)) }
        timesteps = ts
    }

    public func setBeginIndex(_ index: Int) {}  // stateless: the sigma comes from the step index

    public func modelInputScale(stepIndex: Int) throws -> Double {
        try checkStep(self, stepIndex)
        return Sigmas.inputScale(sigmas[stepIndex])
    }

    public func step(modelOutput: DeviceTensor, stepIndex: Int, sample: DeviceTensor, algebra: LatentAlgebra,
                     noise: () throws -> DeviceTensor) throws -> SchedulerStepOutput {
        try checkStep(self, stepIndex)
        let sigma = sigmas[stepIndex], sigmaTo = sigmas[stepIndex + 1]
        let x = LinearCombination(sample), m = LinearCombination(modelOutput)
        let predOriginal = predictionType.originalSample(sigma: sigma, sample: x, output: m)
        let sigmaUp = (sigmaTo * sigmaTo * (sigma * sigma - sigmaTo * sigmaTo) / (sigma * sigma)).squareRoot()
        let sigmaDown = (sigmaTo * sigmaTo - sigmaUp * sigmaUp).squareRoot()
        let derivative = (x - predOriginal) / sigma
        let prev = x + (sigmaDown - sigma) * derivative + sigmaUp * LinearCombination(try noise())
        return SchedulerStepOutput(prevSample: try prev.evaluate(algebra), predOriginalSample: try predOriginal.evaluate(algebra))
    }

    public func addNoise(original: DeviceTensor, noise: DeviceTensor, stepIndex: Int,
                         algebra: LatentAlgebra) throws -> DeviceTensor {
        try noisedBySigma(original, noise, stepIndex: stepIndex, algebra: algebra)
    }
}
