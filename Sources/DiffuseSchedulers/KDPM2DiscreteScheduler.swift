#if canImport(Glibc)
import Glibc
#endif
import DiffuseGraph

/// diffusers' `KDPM2DiscreteScheduler` ("DPM2" in k-diffusion and AUTOMATIC1111): DPM-Solver-2,
/// a midpoint method in sigma. Each step evaluates the model at σᵢ, moves to the geometric mean of
/// σᵢ and σᵢ₊₁, evaluates there and takes the full step with that slope. As in diffusers, the
/// schedule interleaves the midpoint timesteps between the main ones.
public final class KDPM2DiscreteScheduler: Scheduler {
    public let className = "KDPM2DiscreteScheduler"
    public let order = 2
    public let alphasCumprod: [Double]
    public private(set) var timesteps: [Double] = []
    /// diffusers' interleaved sigmas: σ₀, σ₁, σ₁, …, σₙ(= 0), σₙ.
    public private(set) var sigmas: [Double] = []

    private let base: DiscreteSigmaSchedule
    private let predictionType: PredictionType
    /// The midpoint sigmas √(σₖ₋₁·σₖ), interleaved like `sigmas`.
    private var sigmasInterpol: [Double] = []
    private var sequence = StepSequence()
    /// The sample the first stage started from, until the second stage uses it.
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
        // exp(lerp(log σₖ, log σₖ₋₁, ½)) in float32, as torch computes it (index 0 is never used).
        let interpol = (0...n).map { k in k == 0 ? 0 : Sigmas.logMidpoint(s[k], s[k - 1]) }
        sigmas = Sigmas.interleaved(s)
        sigmasInterpol = Sigmas.interleaved(interpol)
        timesteps = base.interleavedTimesteps(ts, midpoints: Array(interpol[1..<n]))
        firstStageSample = nil
        sequence.reset()
    }

    public func setBeginIndex(_ index: Int) { sequence.beginIndex = index }

    /// Whether step `i` is a first stage (no sample waiting for its second).
    private func inFirstStage(_ i: Int) -> Bool { firstStageSample == nil || i == sequence.beginIndex }

    public func modelInputScale(stepIndex i: Int) throws -> Double {
        try checkStep(self, i)
        return Sigmas.inputScale(inFirstStage(i) ? sigmas[i] : sigmasInterpol[i])
    }

    public func step(modelOutput: DeviceTensor, stepIndex i: Int, sample: DeviceTensor, algebra: LatentAlgebra,
                     noise: () throws -> DeviceTensor) throws -> SchedulerStepOutput {
        try checkStep(self, i)
        if try sequence.enter(i, className: className) { firstStageSample = nil }
        let x = LinearCombination(sample), m = LinearCombination(modelOutput)
        let prev: LinearCombination, predOriginal: LinearCombination
        if let start = firstStageSample {
            // Second stage at the midpoint: its slope carries the first stage's sample to σₖ₊₁.
            let sigma = sigmas[i - 1], sigmaInterpol = sigmasInterpol[i], sigmaNext = sigmas[i]
            predOriginal = predictionType.originalSample(sigma: sigmaInterpol, sample: x, output: m)
            prev = LinearCombination(start) + (sigmaNext - sigma) * ((x - predOriginal) / sigmaInterpol)
            firstStageSample = nil
        } else {
            let sigma = sigmas[i], sigmaInterpol = sigmasInterpol[i + 1]
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

extension Sigmas {
    /// diffusers' interleaving for the two-stage classes: the first value once, every later one twice,
    /// and the last once more.
    static func interleaved(_ s: [Double]) -> [Double] {
        [s[0]] + s[1...].flatMap { [$0, $0] } + [s[s.count - 1]]
    }

    /// `a.log().lerp(b.log(), 0.5).exp()` in float32: the geometric mean of two sigmas, as torch's
    /// lerp computes it for a weight of ½ (`b − (b − a)·½`); 0 when either is 0.
    static func logMidpoint(_ a: Double, _ b: Double) -> Double {
        let la = logf(Float(a)), lb = logf(Float(b))
        let mid = lb - (lb - la) * 0.5
        return mid.isNaN ? 0 : Double(expf(mid))
    }
}
