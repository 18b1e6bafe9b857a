import DiffuseGraph

/// diffusers' `TCDScheduler` (Zheng et al., "Trajectory Consistency Distillation"): LCM's
/// distilled schedule with strategic stochastic sampling. Each step predicts x̂₀ and ε̂, goes back
/// to the intermediate timestep s = ⌊(1 − γ)·t_prev⌋ along the predicted trajectory, then
/// re-noises from s to t_prev; γ (`eta`) = 0 is deterministic.
public final class TCDScheduler: Scheduler {
    public let className = "TCDScheduler"
    public let order = 1
    public let initNoiseSigma = 1.0
    public var sigmas: [Double] { [] }
    public let alphasCumprod: [Double]
    public private(set) var timesteps: [Double] = []

    /// diffusers' `eta` step argument, the paper's γ: how far each step goes back before it
    /// re-noises. The scheduler's own default is 0.3, the value TCD is used with; the pipelines
    /// pass their `eta` (default 0) explicitly.
    public var eta = 0.3

    private let numTrainTimesteps: Int
    private let originalInferenceSteps: Int
    private let finalAlphaCumprod: Double
    private let predictionType: PredictionType
    private var numInferenceSteps = 0

    public init(config: SchedulerConfig) throws {
        let r = config.reader(className)
        let schedule = try NoiseSchedule(r, betaStart: 0.00085, betaEnd: 0.012, betaSchedule: .scaledLinear)
        numTrainTimesteps = schedule.numTrainTimesteps
        alphasCumprod = schedule.alphasCumprod.map(Double.init)
        originalInferenceSteps = try LCMScheduler.originalInferenceSteps(r, numTrainTimesteps: numTrainTimesteps)
        finalAlphaCumprod = try r.bool("set_alpha_to_one", true) ? 1.0 : alphasCumprod[0]
        predictionType = try r.choice("prediction_type", .epsilon)
        try r.requireOff("thresholding", because: "dynamic thresholding is not implemented")
    }

    public func setTimesteps(_ numInferenceSteps: Int) throws {
        timesteps = try LCMScheduler.distilledTimesteps(numInferenceSteps, strength: 1, numTrainTimesteps: numTrainTimesteps,
                                                        originalInferenceSteps: originalInferenceSteps, className: className)
        self.numInferenceSteps = numInferenceSteps
    }

    /// diffusers' `set_timesteps(timesteps=…)`.
    public func setTimesteps(_ custom: CustomSchedule) throws {
        timesteps = try LCMScheduler.customTimesteps(custom, className: className, numTrainTimesteps: numTrainTimesteps,
                                                     originalInferenceSteps: originalInferenceSteps)
        numInferenceSteps = timesteps.count
    }

    public func setBeginIndex(_ index: Int) {}  // stateless: the next timestep comes from the step index

    public func modelInputScale(stepIndex: Int) throws -> Double {
        try checkStep(self, stepIndex)
        return 1
    }

    public func step(modelOutput: DeviceTensor, stepIndex i: Int, sample: DeviceTensor, algebra: LatentAlgebra,
                     noise: () throws -> DeviceTensor) throws -> SchedulerStepOutput {
        try checkStep(self, i)
        guard (0...1).contains(eta) else {
            throw SchedulerError.invalidValue(className: className, key: "eta", value: "\(eta)", expected: "in [0, 1]", origin: "step")
        }
        let t = Int(timesteps[i])
        let prevT = i + 1 < timesteps.count ? Int(timesteps[i + 1]) : 0
        // torch.floor((1 − eta) · t_prev) multiplies in float32.
        let s = Int((Float(1 - eta) * Float(prevT)).rounded(.down))
        let alphaProdT = alphasCumprod[t], betaProdT = 1 - alphaProdT
        let alphaProdPrev = prevT >= 0 ? alphasCumprod[prevT] : finalAlphaCumprod
        let alphaProdS = alphasCumprod[s], betaProdS = 1 - alphaProdS
        let x = LinearCombination(sample), m = LinearCombination(modelOutput)

        let (predOriginal, predEpsilon) = predictionType.originalAndEpsilon(
            alpha: alphaProdT.squareRoot(), sigma: betaProdT.squareRoot(), sample: x, output: m)
        let noised = alphaProdS.squareRoot() * predOriginal + betaProdS.squareRoot() * predEpsilon
        var prev = noised
        // No noise on the schedule's last step (diffusers counts it from step 0).
        if eta > 0 && i != numInferenceSteps - 1 {
            let ratio = alphaProdPrev / alphaProdS
            prev = ratio.squareRoot() * noised + (1 - ratio).squareRoot() * LinearCombination(try noise())
        }
        return SchedulerStepOutput(prevSample: try prev.evaluate(algebra), predOriginalSample: try predOriginal.evaluate(algebra))
    }

    public func addNoise(original: DeviceTensor, noise: DeviceTensor, stepIndex: Int,
                         algebra: LatentAlgebra) throws -> DeviceTensor {
        try noisedByAlphasCumprod(original, noise, stepIndex: stepIndex, algebra: algebra)
    }
}
