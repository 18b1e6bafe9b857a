import DiffuseGraph

/// diffusers' `DDIMScheduler` (Song et al., "Denoising Diffusion Implicit Models"): each step
/// predicts x̂₀ and the noise ε̂, then moves to the previous timestep of the schedule as
/// x_prev = √ᾱ_prev·x̂₀ + √(1-ᾱ_prev-σ²)·ε̂ + σ·z, with σ = eta·√variance (eta = 0: deterministic).
public final class DDIMScheduler: Scheduler {
    public let className = "DDIMScheduler"
    public let order = 1
    public let initNoiseSigma = 1.0
    public var sigmas: [Double] { [] }
    public let alphasCumprod: [Double]
    public private(set) var timesteps: [Double] = []

    /// diffusers' `eta` step argument (the pipelines' default 0): the weight of fresh noise,
    /// 0 for DDIM, 1 for DDPM-like sampling.
    public var eta = 0.0

    private let numTrainTimesteps: Int
    private let predictionType: PredictionType
    private let clipSampleRange: Double?
    private let finalAlphaCumprod: Double
    private let stepsOffset: Int
    private let timestepSpacing: TimestepSpacing
    private var numInferenceSteps = 0

    /// Built from a `scheduler_config.json` with this class's defaults for missing keys.
    public init(config: SchedulerConfig) throws {
        let r = config.reader(className)
        let schedule = try NoiseSchedule(r, betaStart: 0.0001, betaEnd: 0.02, betaSchedule: .linear)
        numTrainTimesteps = schedule.numTrainTimesteps
        alphasCumprod = schedule.alphasCumprod.map(Double.init)
        predictionType = try r.choice("prediction_type", .epsilon)
        try r.requireOff("thresholding", because: "dynamic thresholding is not implemented")
        clipSampleRange = try r.bool("clip_sample", true) ? try r.double("clip_sample_range", 1.0) : nil
        finalAlphaCumprod = try r.bool("set_alpha_to_one", true) ? 1.0 : alphasCumprod[0]
        stepsOffset = try r.int("steps_offset", 0)
        timestepSpacing = try r.choice("timestep_spacing", .leading)
    }

    public func setTimesteps(_ numInferenceSteps: Int) throws {
        let n = numInferenceSteps, steps = numTrainTimesteps
        guard n >= 1 else { throw SchedulerError.invalidStepCount(className: className, steps: n, detail: "at least 1 is needed") }
        guard n <= steps else {
            throw SchedulerError.invalidStepCount(className: className, steps: n,
                                                  detail: "at most num_train_timesteps (\(steps))")
        }
        self.numInferenceSteps = n
        timesteps = NumPy.integerTimesteps(n, trainSteps: steps, spacing: timestepSpacing, stepsOffset: stepsOffset)
    }

    public func setBeginIndex(_ index: Int) {}  // stateless: every step stands alone

    public func modelInputScale(stepIndex: Int) throws -> Double {
        try checkStep(self, stepIndex)
        return 1
    }

    public func step(modelOutput: DeviceTensor, stepIndex: Int, sample: DeviceTensor, algebra: LatentAlgebra,
                     noise: () throws -> DeviceTensor) throws -> SchedulerStepOutput {
        try checkStep(self, stepIndex)
        let t = Int(timesteps[stepIndex])
        let prevT = t - numTrainTimesteps / numInferenceSteps
        let alphaProdT = alphasCumprod[t]
        let alphaProdPrev = prevT >= 0 ? alphasCumprod[prevT] : finalAlphaCumprod
        let betaProdT = 1 - alphaProdT
        let x = LinearCombination(sample), eps = LinearCombination(modelOutput)

        var (predOriginal, predEpsilon) = predictionType.originalAndEpsilon(
            alpha: alphaProdT.squareRoot(), sigma: betaProdT.squareRoot(), sample: x, output: eps)
        var predOriginalTensor: DeviceTensor? = nil
        if let range = clipSampleRange {
            let clipped = try algebra.clamp(try predOriginal.evaluate(algebra), min: -range, max: range)
            predOriginalTensor = clipped
            predOriginal = LinearCombination(clipped)
        }

        let variance = (1 - alphaProdPrev) / betaProdT * (1 - alphaProdT / alphaProdPrev)
        let stdDev = eta * variance.squareRoot()
        let direction = (1 - alphaProdPrev - stdDev * stdDev).squareRoot()
        var prev = alphaProdPrev.squareRoot() * predOriginal + direction * predEpsilon
        if eta > 0 { prev = prev + stdDev * LinearCombination(try noise()) }
        return SchedulerStepOutput(prevSample: try prev.evaluate(algebra),
                                   predOriginalSample: try predOriginalTensor ?? predOriginal.evaluate(algebra))
    }

    public func addNoise(original: DeviceTensor, noise: DeviceTensor, stepIndex: Int,
                         algebra: LatentAlgebra) throws -> DeviceTensor {
        try noisedByAlphasCumprod(original, noise, stepIndex: stepIndex, algebra: algebra)
    }
}
