#if canImport(Glibc)
import Glibc
#endif
import DiffuseGraph

/// diffusers' `DEISMultistepScheduler` (Zhang & Chen, "Fast Sampling of Diffusion Models with
/// Exponential Integrator"): a multistep exponential integrator of the noise prediction in
/// ρ = σ/α, whose coefficients integrate the Lagrange polynomial through the last outputs in log ρ
/// ("logrho"). Order 1 is DDIM.
public final class DEISMultistepScheduler: Scheduler {
    public let className = "DEISMultistepScheduler"
    public let order = 1
    public let initNoiseSigma = 1.0
    public let alphasCumprod: [Double]
    public private(set) var timesteps: [Double] = []
    public private(set) var sigmas: [Double] = []

    enum AlgorithmType: String, CaseIterable { case deis }
    enum SolverType: String, CaseIterable { case logrho }

    private let schedule: NoiseSchedule
    private let solverOrder: Int
    private let predictionType: PredictionType
    private let lowerOrderFinal: Bool
    private let respacing: SigmaRespacing
    private let timestepSpacing: TimestepSpacing
    private let stepsOffset: Int

    private var sequence = StepSequence()
    /// The last `solverOrder` outputs as noise predictions, oldest first.
    private var modelOutputs: [DeviceTensor?] = []
    private var lowerOrderNums = 0

    public init(config: SchedulerConfig) throws {
        let r = config.reader(className)
        schedule = try NoiseSchedule(r, betaStart: 0.0001, betaEnd: 0.02, betaSchedule: .linear, hasRescale: false)
        alphasCumprod = schedule.alphasCumprod.map(Double.init)
        solverOrder = try r.int("solver_order", 2)
        guard (1...3).contains(solverOrder) else { throw r.unsupported("solver_order", "\(solverOrder)", supported: ["1", "2", "3"]) }
        predictionType = try r.choice("prediction_type", .epsilon)
        try r.requireOff("thresholding", because: "dynamic thresholding is not implemented")
        // diffusers rewrites the DPM-Solver names to DEIS's own.
        _ = try r.choice("algorithm_type", AlgorithmType.deis, aliases: ["dpmsolver": .deis, "dpmsolver++": .deis])
        _ = try r.choice("solver_type", SolverType.logrho,
                         aliases: ["midpoint": .logrho, "heun": .logrho, "bh1": .logrho, "bh2": .logrho])
        lowerOrderFinal = try r.bool("lower_order_final", true)
        respacing = try SigmaRespacing(r)
        try r.requireOff("use_flow_sigmas", because: "flow-matching sigmas are for flow models, not Stable Diffusion")
        try r.requireOff("use_dynamic_shifting", because: "dynamic shifting is for flow models")
        timestepSpacing = try r.choice("timestep_spacing", .linspace)
        stepsOffset = try r.int("steps_offset", 0)
        sigmas = schedule.trainingSigmas.map(Double.init)
    }

    public func setTimesteps(_ numInferenceSteps: Int) throws {
        let n = numInferenceSteps, steps = schedule.numTrainTimesteps
        guard n >= 1 else { throw SchedulerError.invalidStepCount(className: className, steps: n, detail: "at least 1 is needed") }
        guard n <= steps else {
            throw SchedulerError.invalidStepCount(className: className, steps: n, detail: "at most num_train_timesteps (\(steps))")
        }
        var ts = NumPy.multistepTimesteps(n, last: steps, trainSteps: steps, spacing: timestepSpacing, stepsOffset: stepsOffset)
        let training = schedule.trainingSigmas
        let fp = training.map(Double.init)
        var s: [Double]
        // Re-spaced sigmas span the whole training range and end on their own last value; the
        // spaced ones end on the smallest training sigma.
        if let respaced = respacing.respace(fp.reversed(), count: n, training: training) {
            s = respaced.sigmas + [respaced.sigmas[n - 1]]
            ts = respacing.kind == .karras ? respaced.timesteps.map(NumPy.round) : respaced.timesteps
        } else {
            s = ts.map { NumPy.interp($0, fp) } + [fp[0]]
        }
        sigmas = s.map { Double(Float($0)) }
        timesteps = ts.map { Double(Int64($0)) }  // diffusers stores them as int64
        modelOutputs = Array(repeating: nil, count: solverOrder)
        lowerOrderNums = 0
        sequence.reset()
    }

    public func setBeginIndex(_ index: Int) { sequence.beginIndex = index }

    public func modelInputScale(stepIndex: Int) throws -> Double {
        try checkStep(self, stepIndex)
        return 1
    }

    /// α = 1/√(σ²+1) and σ_t = σ·α of a schedule sigma. DEIS's coefficients subtract nearly equal
    /// antiderivatives, so they are computed in float32 with torch's order of operations, as
    /// diffusers computes them on 0-dim float32 tensors; double precision would differ by more
    /// than the goldens' tolerance on third-order steps.
    private func alphaSigma(_ index: Int) -> (alpha: Float, sigma: Float) {
        let s = Float(sigmas[index])
        let alpha = 1 / (s * s + 1).squareRoot()
        return (alpha, s * alpha)
    }

    public func step(modelOutput: DeviceTensor, stepIndex i: Int, sample: DeviceTensor, algebra: LatentAlgebra,
                     noise: () throws -> DeviceTensor) throws -> SchedulerStepOutput {
        try checkStep(self, i)
        if try sequence.enter(i, className: className) {
            modelOutputs = Array(repeating: nil, count: solverOrder)
            lowerOrderNums = 0
        }
        let count = timesteps.count
        let lowerOrderFinalStep = i == count - 1 && lowerOrderFinal && count < 15
        let lowerOrderSecond = i == count - 2 && lowerOrderFinal && count < 15

        // The output as a noise prediction, through x̂₀ as diffusers converts it.
        let (a, sg) = alphaSigma(i)
        let (alpha, sigma) = (Double(a), Double(sg))
        let x = LinearCombination(sample), m = LinearCombination(modelOutput)
        let predOriginal = predictionType.originalAndEpsilon(alpha: alpha, sigma: sigma, sample: x, output: m).original
        let converted = try ((x - alpha * predOriginal) / sigma).evaluate(algebra)
        modelOutputs.removeFirst()
        modelOutputs.append(converted)

        let prev: LinearCombination
        if solverOrder == 1 || lowerOrderNums < 1 || lowerOrderFinalStep {
            prev = firstOrderUpdate(LinearCombination(converted), x, i)
        } else if solverOrder == 2 || lowerOrderNums < 2 || lowerOrderSecond {
            prev = secondOrderUpdate(x, i)
        } else {
            prev = thirdOrderUpdate(x, i)
        }
        lowerOrderNums = min(lowerOrderNums + 1, solverOrder)
        return SchedulerStepOutput(prevSample: try prev.evaluate(algebra), predOriginalSample: nil)
    }

    /// DDIM in λ = log(α/σ).
    private func firstOrderUpdate(_ m: LinearCombination, _ x: LinearCombination, _ i: Int) -> LinearCombination {
        let (alphaT, sigmaT) = alphaSigma(i + 1), (alphaS, sigmaS) = alphaSigma(i)
        let h = (logf(alphaT) - logf(sigmaT)) - (logf(alphaS) - logf(sigmaS))
        return Double(alphaT / alphaS) * x - Double(sigmaT * (expf(h) - 1)) * m
    }

    /// ρ = σ_t/α_t of a schedule sigma (the sigma itself, up to rounding, as diffusers computes it).
    private func rho(_ index: Int) -> Float {
        let (alpha, sigma) = alphaSigma(index)
        return sigma / alpha
    }

    /// The antiderivative in ρ of the Lagrange basis in log ρ for node b against c (diffusers' `ind_fn`).
    private static func integral2(_ t: Float, _ b: Float, _ c: Float) -> Float {
        t * (-logf(c) + logf(t) - 1) / (logf(b) - logf(c))
    }

    private func secondOrderUpdate(_ x: LinearCombination, _ i: Int) -> LinearCombination {
        let alphaT = alphaSigma(i + 1).alpha, alphaS0 = alphaSigma(i).alpha
        let m0 = LinearCombination(modelOutputs[solverOrder - 1]!), m1 = LinearCombination(modelOutputs[solverOrder - 2]!)
        let rhoT = rho(i + 1), rhoS0 = rho(i), rhoS1 = rho(i - 1)
        let f = Self.integral2
        let coef1 = f(rhoT, rhoS0, rhoS1) - f(rhoS0, rhoS0, rhoS1)
        let coef2 = f(rhoT, rhoS1, rhoS0) - f(rhoS0, rhoS1, rhoS0)
        return Double(alphaT) * (x / Double(alphaS0) + Double(coef1) * m0 + Double(coef2) * m1)
    }

    /// The same for three nodes: diffusers' third-order `ind_fn`, term by term.
    private static func integral3(_ t: Float, _ b: Float, _ c: Float, _ d: Float) -> Float {
        let lt = logf(t), lb = logf(b), lc = logf(c), ld = logf(d)
        let numerator = t * (lc * (ld - lt + 1) - ld * lt + ld + lt * lt - 2 * lt + 2)
        return numerator / ((lb - lc) * (lb - ld))
    }

    private func thirdOrderUpdate(_ x: LinearCombination, _ i: Int) -> LinearCombination {
        let alphaT = alphaSigma(i + 1).alpha, alphaS0 = alphaSigma(i).alpha
        let m0 = LinearCombination(modelOutputs[2]!), m1 = LinearCombination(modelOutputs[1]!)
        let m2 = LinearCombination(modelOutputs[0]!)
        let rhoT = rho(i + 1), rhoS0 = rho(i), rhoS1 = rho(i - 1), rhoS2 = rho(i - 2)
        let f = Self.integral3
        let coef1 = f(rhoT, rhoS0, rhoS1, rhoS2) - f(rhoS0, rhoS0, rhoS1, rhoS2)
        let coef2 = f(rhoT, rhoS1, rhoS2, rhoS0) - f(rhoS0, rhoS1, rhoS2, rhoS0)
        let coef3 = f(rhoT, rhoS2, rhoS0, rhoS1) - f(rhoS0, rhoS2, rhoS0, rhoS1)
        return Double(alphaT) * (x / Double(alphaS0) + Double(coef1) * m0 + Double(coef2) * m1 + Double(coef3) * m2)
    }

    public func addNoise(original: DeviceTensor, noise: DeviceTensor, stepIndex: Int,
                         algebra: LatentAlgebra) throws -> DeviceTensor {
        try checkStep(self, stepIndex)
        let (alpha, sigma) = alphaSigma(stepIndex)
        return try algebra.combine([(Double(alpha), original), (Double(sigma), noise)])
    }
}
