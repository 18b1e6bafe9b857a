#if canImport(Glibc)
import Glibc
#endif
import DiffuseGraph

/// diffusers' `DDPMScheduler` (Ho et al., "Denoising Diffusion Probabilistic Models"): ancestral
/// sampling of the posterior q(x_prev | x_t, x̂₀), whose mean mixes x̂₀ and x_t (formula 7) and
/// whose variance is fresh noise at every step but the one reaching t = 0.
public final class DDPMScheduler: Scheduler {
    public let className = "DDPMScheduler"
    public let order = 1
    public let initNoiseSigma = 1.0
    public var sigmas: [Double] { [] }
    public let alphasCumprod: [Double]
    public private(set) var timesteps: [Double] = []

    enum VarianceType: String, CaseIterable {
        case fixedSmall = "fixed_small"
        case fixedSmallLog = "fixed_small_log"
        case fixedLarge = "fixed_large"
    }

    private let numTrainTimesteps: Int
    private let predictionType: PredictionType
    private let varianceType: VarianceType
    private let clipSampleRange: Double?
    private let timestepSpacing: TimestepSpacing
    private let stepsOffset: Int

    public init(config: SchedulerConfig) throws {
        let r = config.reader(className)
        let schedule = try NoiseSchedule(r, betaStart: 0.0001, betaEnd: 0.02, betaSchedule: .linear)
        numTrainTimesteps = schedule.numTrainTimesteps
        alphasCumprod = schedule.alphasCumprod.map(Double.init)
        // The learned variances need a UNet with twice the latent channels; Stable Diffusion's have none.
        varianceType = try r.choice("variance_type", .fixedSmall)
        predictionType = try r.choice("prediction_type", .epsilon)
        try r.requireOff("thresholding", because: "dynamic thresholding is not implemented")
        clipSampleRange = try r.bool("clip_sample", true) ? try r.double("clip_sample_range", 1.0) : nil
        timestepSpacing = try r.choice("timestep_spacing", .leading)
        stepsOffset = try r.int("steps_offset", 0)
    }

    public func setTimesteps(_ numInferenceSteps: Int) throws {
        let n = numInferenceSteps, steps = numTrainTimesteps
        guard n >= 1 else { throw SchedulerError.invalidStepCount(className: className, steps: n, detail: "at least 1 is needed") }
        guard n <= steps else {
            throw SchedulerError.invalidStepCount(className: className, steps: n, detail: "at most num_train_timesteps (\(steps))")
        }
        timesteps = NumPy.integerTimesteps(n, trainSteps: steps, spacing: timestepSpacing, stepsOffset: stepsOffset)
    }

    /// diffusers' `set_timesteps(timesteps=…)`: each step goes to the next timestep given.
    public func setTimesteps(_ custom: CustomSchedule) throws {
        timesteps = try custom.checkedTimesteps(className, trainSteps: numTrainTimesteps, integers: true)
    }

    public func setBeginIndex(_ index: Int) {}  // stateless: every step stands alone

    public func modelInputScale(stepIndex: Int) throws -> Double {
        try checkStep(self, stepIndex)
        return 1
    }

    public func step(modelOutput: DeviceTensor, stepIndex i: Int, sample: DeviceTensor, algebra: LatentAlgebra,
                     noise: () throws -> DeviceTensor) throws -> SchedulerStepOutput {
        try checkStep(self, i)
        let t = Int(timesteps[i])
        let prevT = i + 1 < timesteps.count ? Int(timesteps[i + 1]) : -1
        let alphaProdT = alphasCumprod[t], alphaProdPrev = prevT >= 0 ? alphasCumprod[prevT] : 1
        let betaProdT = 1 - alphaProdT, betaProdPrev = 1 - alphaProdPrev
        let currentAlpha = alphaProdT / alphaProdPrev, currentBeta = 1 - currentAlpha
        let x = LinearCombination(sample), m = LinearCombination(modelOutput)

        var predOriginal = predictionType.originalAndEpsilon(alpha: alphaProdT.squareRoot(), sigma: betaProdT.squareRoot(),
                                                             sample: x, output: m).original
        if let range = clipSampleRange {
            predOriginal = LinearCombination(try algebra.clamp(try predOriginal.evaluate(algebra), min: -range, max: range))
        }
        var prev = (alphaProdPrev.squareRoot() * currentBeta / betaProdT) * predOriginal
            + (currentAlpha.squareRoot() * betaProdPrev / betaProdT) * x
        if t > 0 {
            // The posterior variance β̃ (clamped before diffusers takes its log), or β itself.
            let small = max(betaProdPrev / betaProdT * currentBeta, 1e-20)
            let std: Double
            switch varianceType {
            case .fixedSmall: std = small.squareRoot()
            case .fixedSmallLog: std = exp(0.5 * log(small))
            case .fixedLarge: std = currentBeta.squareRoot()
            }
            prev = prev + std * LinearCombination(try noise())
        }
        return SchedulerStepOutput(prevSample: try prev.evaluate(algebra), predOriginalSample: try predOriginal.evaluate(algebra))
    }

    public func addNoise(original: DeviceTensor, noise: DeviceTensor, stepIndex: Int,
                         algebra: LatentAlgebra) throws -> DeviceTensor {
        try noisedByAlphasCumprod(original, noise, stepIndex: stepIndex, algebra: algebra)
    }
}
