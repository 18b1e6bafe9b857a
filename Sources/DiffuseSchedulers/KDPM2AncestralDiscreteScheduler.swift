import DiffuseGraph

/// diffusers' `KDPM2AncestralDiscreteScheduler` ("DPM2 a"): DPM-Solver-2 towards the ancestral
/// step's σ_down, then fresh noise of σ_up, as Euler ancestral splits each step. Two model
/// evaluations per step, interleaved in the schedule as for `KDPM2DiscreteScheduler`.
public final class KDPM2AncestralDiscreteScheduler: Scheduler {
    public let className = "KDPM2AncestralDiscreteScheduler"
    public let order = 2
    public let alphasCumprod: [Double]
    public private(set) var timesteps: [Double] = []
    /// diffusers' interleaved sigmas: σ₀, σ₁, σ₁, …, σₙ(= 0), σₙ.
    public private(set) var sigmas: [Double] = []

    private let base: DiscreteSigmaSchedule
    private let predictionType: PredictionType
    // Interleaved like `sigmas`: the midpoints √(σₖ·σ_down,ₖ) and the ancestral split of each step.
    private var sigmasInterpol: [Double] = []
    private var sigmasUp: [Double] = []
    private var sigmasDown: [Double] = []
    private var sequence = StepSequence()
    private var firstStageSample: DeviceTensor?

    public init(config: SchedulerConfig) throws {
        let r = config.reader(className)
        let schedule = try NoiseSchedule(r, betaStart: 0.00085, betaEnd: 0.012, betaSchedule: .linear, hasRescale: false)
        alphasCumprod = schedule.alphasCumprod.map(Double.init)
        predictionType = try r.choice("prediction_type", .epsilon, allowed: [.epsilon, .vPrediction])
        base = try DiscreteSigmaSchedule(r, schedule: schedule)
        sigmas = base.untimedSigmas
    }

    public var initNoiseSigma: Double { base.initNoiseSigma(sigmas) }

    public func setTimesteps(_ numInferenceSteps: Int) throws {
        let (ts, s) = try base.make(numInferenceSteps, className: className)
        let n = ts.count
        // The ancestral split of σₖ → σₖ₊₁ in float32, as diffusers computes it with torch.
        var up = [Double](repeating: 0, count: n + 1), down = up, interpol = up
        for k in 0..<n {
            let sigma = Float(s[k]), next = Float(s[k + 1])
            let u = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).squareRoot()
            up[k] = Double(u)
            down[k] = Double((next * next - u * u).squareRoot())
            // The last step has no midpoint (diffusers zeroes the last two).
            interpol[k] = k < n - 1 ? Sigmas.logMidpoint(s[k], down[k]) : 0
        }
        sigmas = Sigmas.interleaved(s)
        sigmasInterpol = Sigmas.interleaved(interpol)
        sigmasUp = Sigmas.interleaved(up)
        sigmasDown = Sigmas.interleaved(down)
        timesteps = base.interleavedTimesteps(ts, midpoints: Array(interpol[0..<(n - 1)]))
        firstStageSample = nil
        sequence.reset()
    }

    public func setBeginIndex(_ index: Int) { sequence.beginIndex = index }

    private func inFirstStage(_ i: Int) -> Bool { firstStageSample == nil || i == sequence.beginIndex }

    public func modelInputScale(stepIndex i: Int) throws -> Double {
        try checkStep(self, i)
        return Sigmas.inputScale(inFirstStage(i) ? sigmas[i] : sigmasInterpol[i - 1])
    }

    public func step(modelOutput: DeviceTensor, stepIndex i: Int, sample: DeviceTensor, algebra: LatentAlgebra,
                     noise: () throws -> DeviceTensor) throws -> SchedulerStepOutput {
        try checkStep(self, i)
        if try sequence.enter(i, className: className) { firstStageSample = nil }
        let x = LinearCombination(sample), m = LinearCombination(modelOutput)
        let prev: LinearCombination, predOriginal: LinearCombination
        if let start = firstStageSample {
            // Second stage at the midpoint: to σ_down with its slope, then σ_up of fresh noise.
            let sigma = sigmas[i - 1], sigmaInterpol = sigmasInterpol[i - 1]
            predOriginal = predictionType.originalSample(sigma: sigmaInterpol, sample: x, output: m)
            let derivative = (x - predOriginal) / sigmaInterpol
            prev = LinearCombination(start) + (sigmasDown[i - 1] - sigma) * derivative
                + sigmasUp[i - 1] * LinearCombination(try noise())
            firstStageSample = nil
        } else {
            let sigma = sigmas[i], sigmaInterpol = sigmasInterpol[i]
            predOriginal = predictionType.originalSample(sigma: sigma, sample: x, output: m)
            prev = x + (sigmaInterpol - sigma) * ((x - predOriginal) / sigma)
            firstStageSample = sample
        }
        return SchedulerStepOutput(prevSample: try prev.evaluate(algebra), predOriginalSample: try predOriginal.evaluate(algebra))
    }

    public func addNoise(original: DeviceTensor, noise: DeviceTensor, stepIndex: Int,
                         algebra: LatentAlgebra) throws -> DeviceTensor {
        try noisedBySigma(original, noise, stepIndex: stepIndex, algebra: algebra)
    }
}
