#if canImport(Glibc)
import Glibc
#endif
import DiffuseGraph

/// diffusers' `DPMSolverSDEScheduler`: k-diffusion's `sample_dpmpp_sde`, AUTOMATIC1111's
/// "DPM++ SDE" (and "DPM++ SDE Karras" with Karras sigmas). Each step is DPM-Solver++(2S) with
/// ancestral noise (η = 1, r = ½): a first stage from σ to the midpoint √(σ·σ_next) in log σ,
/// a model evaluation there, and a second stage over the whole step using that midpoint's x̂₀.
/// Both stages add noise from one Brownian path (torchsde's `BrownianInterval`, see
/// `BrownianTree`), so the second stage's noise contains the first's, as the SDE requires. The
/// last step, to σ = 0, is one Euler step. As in diffusers the schedule interleaves the
/// midpoint timesteps between the main ones: 2n − 1 model evaluations for n steps.
///
/// The path's seed is the config's `noise_sampler_seed`; without one diffusers draws it from
/// torch's default generator at the first step, which `prepareNoise` reproduces from the
/// pipeline's generator (see `RandomSource.defaultGeneratorSeed`).
public final class DPMSolverSDEScheduler: Scheduler {
    public let className = "DPMSolverSDEScheduler"
    public let order = 2
    public let alphasCumprod: [Double]
    /// diffusers' float64 timesteps: t₀, then for each later step k the midpoint's and tₖ.
    public private(set) var timesteps: [Double] = []
    /// diffusers' interleaved sigmas: σ₀, σ₁, σ₁, …, σₙ₋₁, σₙ₋₁, 0.
    public private(set) var sigmas: [Double] = []
    /// The Brownian path's seed: the config's `noise_sampler_seed`, or what `prepareNoise` draws.
    public var noiseSamplerSeed: UInt64?

    private let base: DiscreteSigmaSchedule
    private let predictionType: PredictionType
    private let configSeed: UInt64?
    private var sequence = StepSequence()
    /// The sample the first stage started from, until the second stage uses it.
    private var firstStageSample: DeviceTensor?
    private var noiseSampler: BrownianTreeNoiseSampler?
    /// Tests replaying diffusers' own query times (the float32 σ, σ_next of each noise draw) in
    /// place of these, which may be an ulp away; see `sigmaFn`.
    var brownianQueryTimes: ((_ sigma: Float, _ sigmaNext: Float) throws -> (Float, Float))?
    /// The kind of generator the path draws with (the pipeline's; CPU until `prepareNoise`).
    private var makeGenerator: (UInt64) -> RandomSource = { TorchCPUGenerator(seed: $0) }

    public init(config: SchedulerConfig) throws {
        let r = config.reader(className)
        let schedule = try NoiseSchedule(r, betaStart: 0.00085, betaEnd: 0.012, betaSchedule: .linear, hasRescale: false)
        alphasCumprod = schedule.alphasCumprod.map(Double.init)
        // diffusers raises NotImplementedError for "sample" in `step`.
        predictionType = try r.choice("prediction_type", .epsilon, allowed: [.epsilon, .vPrediction])
        // Its `_convert_to_karras` spans the interpolated sigmas, whatever sigma_min/max say.
        base = try DiscreteSigmaSchedule(r, schedule: schedule, karrasHonoursRange: false)
        if let seed = try r.optionalDouble("noise_sampler_seed") {
            // JSON numbers are read as doubles here, exact up to 2⁵³.
            guard seed >= 0, seed <= 0x1p53, seed == seed.rounded() else {
                throw r.invalid("noise_sampler_seed", "\(seed)", "a non-negative integer up to 2^53, or null")
            }
            configSeed = UInt64(seed)
        } else {
            configSeed = nil
        }
        noiseSamplerSeed = configSeed
        sigmas = base.untimedSigmas
    }

    public var initNoiseSigma: Double { base.initNoiseSigma(sigmas) }

    public func setTimesteps(_ numInferenceSteps: Int) throws {
        let (ts, s) = try base.makeFloat64(numInferenceSteps, className: className, float32Timesteps: false)
        let n = ts.count
        // The midpoint timesteps invert exp(−(tₖ + ½(tₖ₊₁ − tₖ))), t = −log σ, in float64 from the
        // float64 sigmas, as `_second_order_timesteps` does.
        let logSigmas = Sigmas.logSigmas(base.schedule.trainingSigmas)
        let midpoints = (0..<(n - 1)).map { k -> Double in
            let t = -log(s[k]), tNext = -log(s[k + 1])
            return Sigmas.sigmaToT(exp(-(t + (tNext - t) * 0.5)), logSigmas: logSigmas)
        }
        timesteps = [ts[0]] + (1..<n).flatMap { [midpoints[$0 - 1], ts[$0]] }
        let rounded = (s + [0]).map { Double(Float($0)) }
        sigmas = [rounded[0]] + rounded[1..<n].flatMap { [$0, $0] } + [rounded[n]]
        firstStageSample = nil
        noiseSampler = nil
        noiseSamplerSeed = configSeed
        sequence.reset()
    }

    public func setBeginIndex(_ index: Int) { sequence.beginIndex = index }

    public func prepareNoise(generator: RandomSource) throws {
        makeGenerator = generator.reseeded
        noiseSampler = nil
        noiseSamplerSeed = try configSeed ?? generator.defaultGeneratorSeed()
    }

    /// The step (σ, σ_next) a step index belongs to: an even offset from the begin index is a
    /// first stage, an odd one the second stage of the step before it.
    private func isFirstStage(_ i: Int) -> Bool { (i - sequence.beginIndex) % 2 == 0 }

    private func stepSigmas(_ i: Int) -> (sigma: Float, next: Float) {
        isFirstStage(i) ? (Float(sigmas[i]), Float(sigmas[i + 1])) : (Float(sigmas[i - 1]), Float(sigmas[i]))
    }

    /// torch's float32 `t = −log σ` and the midpoint `σ(t + ½(t_next − t))`.
    private static func midpointSigma(_ sigma: Float, _ next: Float) -> Float {
        let t = -logf(sigma), tNext = -logf(next)
        return expf(-(t + (tNext - t) * 0.5))
    }

    public func modelInputScale(stepIndex i: Int) throws -> Double {
        try checkStep(self, i)
        if isFirstStage(i) { return Sigmas.inputScale(sigmas[i]) }
        let (sigma, next) = stepSigmas(i)
        return Sigmas.inputScale(Double(Self.midpointSigma(sigma, next)))
    }

    public func step(modelOutput: DeviceTensor, stepIndex i: Int, sample: DeviceTensor, algebra: LatentAlgebra,
                     noise: () throws -> DeviceTensor) throws -> SchedulerStepOutput {
        try checkStep(self, i)
        if try sequence.enter(i, className: className) { firstStageSample = nil }
        let first = isFirstStage(i)
        let (sigma, sigmaNext) = stepSigmas(i)
        let x = LinearCombination(sample), m = LinearCombination(modelOutput)
        // torch's float32 arithmetic on 0-dim tensors: σ(t) = exp(−t), t(σ) = −log σ. torch's
        // exp and log are MKL's (x86 builds), which agree with glibc's to an ulp but not always to
        // the bit; the Brownian path is queried at these times rounded to 1e-6, so about one query
        // in a hundred lands on the next 1e-6 and its noise moves by about 1e-3 of a unit.
        func sigmaFn(_ t: Float) -> Float { expf(-t) }
        func tFn(_ s: Float) -> Float { -logf(s) }
        let t = tFn(sigma)
        var tNext = tFn(sigmaNext)
        let tProposed = t + (tNext - t) * 0.5
        let sigmaInput = first ? sigma : sigmaFn(tProposed)
        let predOriginal = predictionType.originalSample(sigma: Double(sigmaInput), sample: x, output: m)

        let prev: LinearCombination
        if sigmaNext == 0 {
            prev = x + Double(sigmaNext - sigma) * ((x - predOriginal) / Double(sigma))
        } else {
            if first { tNext = tProposed }
            guard let from = first ? sample : firstStageSample else {
                throw SchedulerError.stepOutOfOrder(className: className, expected: i - 1, got: i)
            }
            let sigmaFrom = sigmaFn(t), sigmaTo = sigmaFn(tNext)
            let sigmaUp = min(sigmaTo, (sigmaTo * sigmaTo * (sigmaFrom * sigmaFrom - sigmaTo * sigmaTo) / (sigmaFrom * sigmaFrom)).squareRoot())
            let sigmaDown = (sigmaTo * sigmaTo - sigmaUp * sigmaUp).squareRoot()
            let ancestralT = tFn(sigmaDown)
            var (queryFrom, queryTo) = (sigmaFn(t), sigmaFn(tNext))
            if let replay = brownianQueryTimes { (queryFrom, queryTo) = try replay(queryFrom, queryTo) }
            let (w, scale) = try sampler(shape: sample.shape).noise(sigma: queryFrom, sigmaNext: queryTo)
            let brownian = LinearCombination(try algebra.upload(w))
            prev = Double(sigmaFn(ancestralT) / sigmaFn(t)) * LinearCombination(from)
                - Double(expm1f(t - ancestralT)) * predOriginal
                + scale * Double(sigmaUp) * brownian
            firstStageSample = first ? sample : nil
        }
        return SchedulerStepOutput(prevSample: try prev.evaluate(algebra), predOriginalSample: try predOriginal.evaluate(algebra))
    }

    /// diffusers' noise sampler, made at the first step that needs it: a path over the schedule's
    /// smallest positive and largest sigma, for samples of this shape.
    private func sampler(shape: [Int]) throws -> BrownianTreeNoiseSampler {
        if let noiseSampler, noiseSampler.tree.shape == shape { return noiseSampler }
        guard let seed = noiseSamplerSeed else {
            throw SchedulerError.noiseRequired(className: "\(className) (no noise_sampler_seed in its config and no generator given to prepareNoise)")
        }
        let positive = sigmas.filter { $0 > 0 }.map { Float($0) }
        let made = try BrownianTreeNoiseSampler(sigmaMin: positive.min() ?? 0, sigmaMax: positive.max() ?? 0, shape: shape,
                                                seed: seed, makeGenerator: makeGenerator)
        noiseSampler = made
        return made
    }

    public func addNoise(original: DeviceTensor, noise: DeviceTensor, stepIndex: Int,
                         algebra: LatentAlgebra) throws -> DeviceTensor {
        try noisedBySigma(original, noise, stepIndex: stepIndex, algebra: algebra)
    }
}
