import DiffuseCore
import DiffuseGraph

/// diffusers' `LCMScheduler` (Luo et al., "Latent Consistency Models"): each step maps the sample
/// straight to a denoised estimate through the consistency boundary condition
/// (c_skip·x + c_out·x̂₀), then re-noises it to the next timestep of a schedule drawn from the
/// `original_inference_steps` distillation schedule. The last step returns the denoised estimate.
public final class LCMScheduler: Scheduler {
    public let className = "LCMScheduler"
    public let order = 1
    public let initNoiseSigma = 1.0
    public var sigmas: [Double] { [] }
    public let alphasCumprod: [Double]
    public private(set) var timesteps: [Double] = []

    private let numTrainTimesteps: Int
    private let originalInferenceSteps: Int
    private let clipSampleRange: Double?
    private let finalAlphaCumprod: Double
    private let predictionType: PredictionType
    private let timestepScaling: Double

    public init(config: SchedulerConfig) throws {
        let r = config.reader(className)
        let schedule = try NoiseSchedule(r, betaStart: 0.00085, betaEnd: 0.012, betaSchedule: .scaledLinear)
        numTrainTimesteps = schedule.numTrainTimesteps
        alphasCumprod = schedule.alphasCumprod.map(Double.init)
        originalInferenceSteps = try Self.originalInferenceSteps(r, numTrainTimesteps: numTrainTimesteps)
        clipSampleRange = try r.bool("clip_sample", false) ? try r.double("clip_sample_range", 1.0) : nil
        finalAlphaCumprod = try r.bool("set_alpha_to_one", true) ? 1.0 : alphasCumprod[0]
        predictionType = try r.choice("prediction_type", .epsilon)
        try r.requireOff("thresholding", because: "dynamic thresholding is not implemented")
        timestepScaling = try r.double("timestep_scaling", 10.0)
    }

    public func setTimesteps(_ numInferenceSteps: Int) throws {
        try setTimesteps(numInferenceSteps, strength: 1)
    }

    /// The schedule for img2img, where only the first `strength` of the distillation schedule is used.
    public func setTimesteps(_ numInferenceSteps: Int, strength: Double) throws {
        timesteps = try Self.distilledTimesteps(numInferenceSteps, strength: strength, numTrainTimesteps: numTrainTimesteps,
                                                originalInferenceSteps: originalInferenceSteps, className: className)
    }

    /// diffusers' `set_timesteps(timesteps=…)`.
    public func setTimesteps(_ custom: CustomSchedule) throws {
        timesteps = try Self.customTimesteps(custom, className: className, numTrainTimesteps: numTrainTimesteps,
                                             originalInferenceSteps: originalInferenceSteps)
    }

    /// LCM's and TCD's custom timesteps: whole, decreasing, within the training timesteps; as
    /// diffusers, a warning for timesteps off the distillation schedule, which the model never saw.
    static func customTimesteps(_ custom: CustomSchedule, className: String, numTrainTimesteps: Int,
                                originalInferenceSteps: Int) throws -> [Double] {
        let ts = try custom.checkedTimesteps(className, trainSteps: numTrainTimesteps, integers: true)
        let k = numTrainTimesteps / originalInferenceSteps
        let distilled = Set((1...originalInferenceSteps).map { Double($0 * k - 1) })
        let off = ts.dropFirst().filter { !distilled.contains($0) }
        if !off.isEmpty {
            Log.warning("\(className): custom timesteps \(off.map { String(Int($0)) }.joined(separator: ", ")) are not on the "
                        + "distillation schedule (every \(k)th timestep from \(k - 1)); expect unexpected results, as diffusers warns")
        }
        return ts
    }

    /// `original_inference_steps`, the length of the distillation schedule (LCM and TCD).
    static func originalInferenceSteps(_ r: ConfigReader, numTrainTimesteps: Int) throws -> Int {
        let steps = try r.int("original_inference_steps", 50)
        guard steps >= 1 && steps <= numTrainTimesteps else {
            throw r.unsupported("original_inference_steps", "\(steps)", supported: ["1 to num_train_timesteps (\(numTrainTimesteps))"])
        }
        return steps
    }

    /// LCM's and TCD's schedule: n timesteps evenly picked from the distillation schedule (every
    /// k-th training timestep, k = T / original_inference_steps), of which the first `strength` is used.
    static func distilledTimesteps(_ n: Int, strength: Double, numTrainTimesteps: Int, originalInferenceSteps: Int,
                                   className: String) throws -> [Double] {
        guard n >= 1 else { throw SchedulerError.invalidStepCount(className: className, steps: n, detail: "at least 1 is needed") }
        guard n <= numTrainTimesteps else {
            throw SchedulerError.invalidStepCount(className: className, steps: n,
                                                  detail: "at most num_train_timesteps (\(numTrainTimesteps))")
        }
        let k = numTrainTimesteps / originalInferenceSteps
        let originCount = Int(Double(originalInferenceSteps) * strength)
        let origin = originCount >= 1 ? (1...originCount).reversed().map { $0 * k - 1 } : []
        guard origin.count / n >= 1 else {
            throw SchedulerError.invalidStepCount(className: className, steps: n,
                detail: "original_inference_steps × strength (\(originalInferenceSteps) × \(strength)) gives only \(origin.count) timesteps")
        }
        guard n <= originalInferenceSteps else {
            throw SchedulerError.invalidStepCount(className: className, steps: n,
                                                  detail: "at most original_inference_steps (\(originalInferenceSteps))")
        }
        let indices = NumPy.linspace(0, Double(origin.count), n, endpoint: false).map { Int($0.rounded(.down)) }
        return indices.map { Double(origin[$0]) }
    }

    public func setBeginIndex(_ index: Int) {}  // stateless: the next timestep comes from the step index

    public func modelInputScale(stepIndex: Int) throws -> Double {
        try checkStep(self, stepIndex)
        return 1
    }

    /// The consistency-model boundary condition: c_skip → 1 and c_out → 0 as t → 0.
    private func boundaryScalings(_ timestep: Int) -> (cSkip: Double, cOut: Double) {
        let sigmaData = 0.5
        let t = Double(timestep) * timestepScaling
        return (sigmaData * sigmaData / (t * t + sigmaData * sigmaData), t / (t * t + sigmaData * sigmaData).squareRoot())
    }

    public func step(modelOutput: DeviceTensor, stepIndex: Int, sample: DeviceTensor, algebra: LatentAlgebra,
                     noise: () throws -> DeviceTensor) throws -> SchedulerStepOutput {
        try checkStep(self, stepIndex)
        let t = Int(timesteps[stepIndex])
        let isLast = stepIndex == timesteps.count - 1
        let prevT = isLast ? t : Int(timesteps[stepIndex + 1])
        let alphaProdT = alphasCumprod[t]
        let alphaProdPrev = prevT >= 0 ? alphasCumprod[prevT] : finalAlphaCumprod
        let betaProdT = 1 - alphaProdT, betaProdPrev = 1 - alphaProdPrev
        let (cSkip, cOut) = boundaryScalings(t)
        let x = LinearCombination(sample), m = LinearCombination(modelOutput)

        var predOriginal = predictionType.originalAndEpsilon(alpha: alphaProdT.squareRoot(), sigma: betaProdT.squareRoot(),
                                                             sample: x, output: m).original
        if let range = clipSampleRange {
            predOriginal = LinearCombination(try algebra.clamp(try predOriginal.evaluate(algebra), min: -range, max: range))
        }
        let denoisedSum = cOut * predOriginal + cSkip * x
        let denoised = try denoisedSum.evaluate(algebra)
        if isLast { return SchedulerStepOutput(prevSample: denoised, predOriginalSample: denoised) }
        let prev = alphaProdPrev.squareRoot() * denoisedSum + betaProdPrev.squareRoot() * LinearCombination(try noise())
        return SchedulerStepOutput(prevSample: try prev.evaluate(algebra), predOriginalSample: denoised)
    }

    public func addNoise(original: DeviceTensor, noise: DeviceTensor, stepIndex: Int,
                         algebra: LatentAlgebra) throws -> DeviceTensor {
        try noisedByAlphasCumprod(original, noise, stepIndex: stepIndex, algebra: algebra)
    }
}
