#if canImport(Glibc)
import Glibc
#endif
import DiffuseGraph

/// diffusers' `UniPCMultistepScheduler` (Zhao et al., "UniPC: A Unified Predictor-Corrector
/// Framework"): each step first corrects the current sample with the new model output (UniC),
/// then predicts the next one from the recent outputs (UniP). `solver_type` "bh2" (the default)
/// or "bh1" picks B(h).
public final class UniPCMultistepScheduler: Scheduler {
    public let className = "UniPCMultistepScheduler"
    public let order = 1
    public let initNoiseSigma = 1.0
    public let alphasCumprod: [Double]
    public private(set) var timesteps: [Double] = []
    public private(set) var sigmas: [Double] = []

    enum SolverType: String, CaseIterable { case bh1, bh2 }

    private let schedule: NoiseSchedule
    private let solverOrder: Int
    private let predictionType: PredictionType
    private let predictX0: Bool
    private let solverType: SolverType
    private let lowerOrderFinal: Bool
    private let disableCorrector: Set<Int>
    private let useKarrasSigmas: Bool
    private let useExponentialSigmas: Bool
    private let sigmaMin: Double?
    private let sigmaMax: Double?
    private let timestepSpacing: TimestepSpacing
    private let stepsOffset: Int
    private let finalSigmasType: FinalSigmasType

    // Predictor-corrector state: converted outputs of the last `solverOrder` steps (oldest
    // first), the corrected sample of the last step and the order it was predicted with.
    private var modelOutputs: [DeviceTensor?] = []
    private var lowerOrderNums = 0
    private var lastSample: DeviceTensor?
    private var thisOrder = 1
    private var beginIndex = 0
    private var nextStepIndex: Int?

    public init(config: SchedulerConfig) throws {
        let r = config.reader(className)
        schedule = try NoiseSchedule(r, betaStart: 0.0001, betaEnd: 0.02, betaSchedule: .linear, terminalAlphaFloor: true)
        alphasCumprod = schedule.alphasCumprod.map(Double.init)
        solverOrder = try r.int("solver_order", 2)
        guard solverOrder >= 1 else { throw r.unsupported("solver_order", "\(solverOrder)", supported: ["1 or more"]) }
        predictionType = try r.choice("prediction_type", .epsilon)
        try r.requireOff("thresholding", because: "dynamic thresholding is not implemented")
        predictX0 = try r.bool("predict_x0", true)
        // diffusers rewrites the DPM-Solver solver types to bh2.
        solverType = try r.choice("solver_type", .bh2, aliases: ["midpoint": .bh2, "heun": .bh2, "logrho": .bh2])
        lowerOrderFinal = try r.bool("lower_order_final", true)
        disableCorrector = Set(try r.ints("disable_corrector") ?? [])
        try r.requireNull("solver_p", because: "an external predictor scheduler is not supported")
        useKarrasSigmas = try r.bool("use_karras_sigmas", false)
        useExponentialSigmas = try r.bool("use_exponential_sigmas", false)
        try r.requireOff("use_beta_sigmas", because: "beta-distribution sigmas are not implemented")
        try r.requireOff("use_flow_sigmas", because: "flow-matching sigmas are for flow models, not Stable Diffusion")
        try r.requireOff("use_dynamic_shifting", because: "dynamic shifting is for flow models")
        try r.requireNull("shift_terminal", because: "it applies to flow sigmas only")
        if useKarrasSigmas && useExponentialSigmas {
            throw r.unsupported("use_exponential_sigmas", "true together with use_karras_sigmas = true",
                                supported: ["at most one of use_karras_sigmas, use_exponential_sigmas"])
        }
        sigmaMin = try r.optionalDouble("sigma_min")
        sigmaMax = try r.optionalDouble("sigma_max")
        timestepSpacing = try r.choice("timestep_spacing", .linspace)
        stepsOffset = try r.int("steps_offset", 0)
        finalSigmasType = try r.choice("final_sigmas_type", .zero)
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
        if useKarrasSigmas || useExponentialSigmas {
            let logSigmas = Sigmas.logSigmas(training)
            let lo = sigmaMin ?? fp[0], hi = sigmaMax ?? fp[fp.count - 1]
            s = useKarrasSigmas ? Sigmas.karras(sigmaMin: lo, sigmaMax: hi, count: n)
                                : Sigmas.exponential(sigmaMin: lo, sigmaMax: hi, count: n)
            ts = s.map { Sigmas.sigmaToT($0, logSigmas: logSigmas) }
            if useKarrasSigmas { ts = ts.map(NumPy.round) }
        } else {
            s = ts.map { NumPy.interp($0, fp) }
        }
        // With Karras or exponential spacing "sigma_min" means the smallest scheduled sigma.
        let last: Double
        switch finalSigmasType {
        case .zero: last = 0
        case .sigmaMin: last = useKarrasSigmas || useExponentialSigmas ? s[s.count - 1] : fp[0]
        }
        sigmas = (s + [last]).map { Double(Float($0)) }
        timesteps = ts.map { Double(Int64($0)) }  // diffusers stores them as int64
        resetHistory()
        nextStepIndex = nil
    }

    private func resetHistory() {
        modelOutputs = Array(repeating: nil, count: solverOrder)
        lowerOrderNums = 0
        lastSample = nil
        thisOrder = 1
    }

    public func setBeginIndex(_ index: Int) { beginIndex = index }

    public func modelInputScale(stepIndex: Int) throws -> Double {
        try checkStep(self, stepIndex)
        return 1
    }

    private func alphaSigma(_ index: Int) -> (alpha: Double, sigma: Double) {
        let s = sigmas[index]
        let alpha = 1 / (s * s + 1).squareRoot()
        return (alpha, s * alpha)
    }

    private func lambda(_ index: Int) -> Double {
        let (alpha, sigma) = alphaSigma(index)
        return log(alpha) - log(sigma)
    }

    public func step(modelOutput: DeviceTensor, stepIndex: Int, sample: DeviceTensor, algebra: LatentAlgebra,
                     noise: () throws -> DeviceTensor) throws -> SchedulerStepOutput {
        try checkStep(self, stepIndex)
        if stepIndex == beginIndex {
            resetHistory()
        } else if stepIndex != nextStepIndex {
            throw SchedulerError.stepOutOfOrder(className: className, expected: nextStepIndex ?? beginIndex, got: stepIndex)
        }
        let i = stepIndex
        let converted = try convertModelOutput(modelOutput, sample: sample, index: i).evaluate(algebra)
        var x = sample
        if i > 0, !disableCorrector.contains(i - 1), let last = lastSample {
            x = try correctorUpdate(LinearCombination(converted), lastSample: LinearCombination(last), i: i,
                                    order: thisOrder).evaluate(algebra)
        }
        modelOutputs.removeFirst()
        modelOutputs.append(converted)

        let order = lowerOrderFinal ? min(solverOrder, timesteps.count - i) : solverOrder
        thisOrder = min(order, lowerOrderNums + 1)  // warm-up for the multistep
        lastSample = x
        let prev = predictorUpdate(LinearCombination(x), i: i, order: thisOrder)
        lowerOrderNums = min(lowerOrderNums + 1, solverOrder)
        nextStepIndex = i + 1
        return SchedulerStepOutput(prevSample: try prev.evaluate(algebra), predOriginalSample: predictX0 ? converted : nil)
    }

    /// x̂₀ (predict_x0, the default) or ε̂.
    private func convertModelOutput(_ modelOutput: DeviceTensor, sample: DeviceTensor, index: Int) -> LinearCombination {
        let (alpha, sigma) = alphaSigma(index)
        let x = LinearCombination(sample), m = LinearCombination(modelOutput)
        switch (predictX0, predictionType) {
        case (true, .epsilon): return (x - sigma * m) / alpha
        case (true, .sample): return m
        case (true, .vPrediction): return alpha * x - sigma * m
        case (false, .epsilon): return m
        case (false, .sample): return (x - alpha * m) / sigma
        case (false, .vPrediction): return alpha * m + sigma * x
        }
    }

    /// The coefficients shared by UniP and UniC: h·φ₁(h), B(h), and for each order k the right
    /// side b_k of the order conditions (with hh = -h when predicting x₀).
    private func phiCoefficients(h: Double, order: Int) -> (hPhi1: Double, bH: Double, b: [Double]) {
        let hh = predictX0 ? -h : h
        let hPhi1 = expm1(hh)
        var hPhiK = hPhi1 / hh - 1
        var factorial = 1.0
        let bH = solverType == .bh1 ? hh : expm1(hh)
        var b: [Double] = []
        for k in 1...order {
            b.append(hPhiK * factorial / bH)
            factorial *= Double(k + 1)
            hPhiK = hPhiK / hh - 1 / factorial
        }
        return (hPhi1, bH, b)
    }

    /// The data (or noise) term of both updates: σ_t/σ_s·x - α_t·hφ₁·m₀ (x₀ form).
    private func baseUpdate(_ x: LinearCombination, _ m0: LinearCombination, t: Int, s: Int, hPhi1: Double) -> LinearCombination {
        let (alphaT, sigmaT) = alphaSigma(t), (alphaS, sigmaS) = alphaSigma(s)
        return predictX0 ? (sigmaT / sigmaS) * x - (alphaT * hPhi1) * m0
                         : (alphaT / alphaS) * x - (sigmaT * hPhi1) * m0
    }

    /// UniP-p: predicts x at step i + 1 from the last `order` converted outputs.
    private func predictorUpdate(_ x: LinearCombination, i: Int, order: Int) -> LinearCombination {
        let m0 = LinearCombination(modelOutputs[solverOrder - 1]!)
        let lambdaS0 = lambda(i)
        let h = lambda(i + 1) - lambdaS0
        var rks: [Double] = [], d1s: [LinearCombination] = []
        for k in 1..<max(order, 1) {
            let rk = (lambda(i - k) - lambdaS0) / h
            rks.append(rk)
            d1s.append((LinearCombination(modelOutputs[solverOrder - 1 - k]!) - m0) / rk)
        }
        rks.append(1)
        let (hPhi1, bH, b) = phiCoefficients(h: h, order: order)
        var result = baseUpdate(x, m0, t: i + 1, s: i, hPhi1: hPhi1)
        if !d1s.isEmpty {
            let rhos = order == 2 ? [0.5] : solveLinear(leadingBlock(vandermonde(rks, order)), Array(b.dropLast()))
            let scale = (predictX0 ? alphaSigma(i + 1).alpha : alphaSigma(i + 1).sigma) * bH
            for (rho, d1) in zip(rhos, d1s) { result = result - (scale * rho) * d1 }
        }
        return result
    }

    /// UniC-p: corrects the sample of step i (predicted at step i - 1) with the new output `modelT`.
    private func correctorUpdate(_ modelT: LinearCombination, lastSample x: LinearCombination, i: Int,
                                 order: Int) -> LinearCombination {
        let m0 = LinearCombination(modelOutputs[solverOrder - 1]!)
        let lambdaS0 = lambda(i - 1)
        let h = lambda(i) - lambdaS0
        var rks: [Double] = [], d1s: [LinearCombination] = []
        for k in 1..<max(order, 1) {
            let rk = (lambda(i - k - 1) - lambdaS0) / h
            rks.append(rk)
            d1s.append((LinearCombination(modelOutputs[solverOrder - 1 - k]!) - m0) / rk)
        }
        rks.append(1)
        let (hPhi1, bH, b) = phiCoefficients(h: h, order: order)
        let rhos = order == 1 ? [0.5] : solveLinear(vandermonde(rks, order), b)
        let scale = (predictX0 ? alphaSigma(i).alpha : alphaSigma(i).sigma) * bH
        var result = baseUpdate(x, m0, t: i, s: i - 1, hPhi1: hPhi1)
        for (rho, d1) in zip(rhos, d1s) { result = result - (scale * rho) * d1 }
        return result - (scale * rhos[rhos.count - 1]) * (modelT - m0)
    }

    public func addNoise(original: DeviceTensor, noise: DeviceTensor, stepIndex: Int,
                         algebra: LatentAlgebra) throws -> DeviceTensor {
        try checkStep(self, stepIndex)
        let (alpha, sigma) = alphaSigma(stepIndex)
        return try algebra.combine([(alpha, original), (sigma, noise)])
    }
}

/// R[k][j] = rks[j]^k for k in 0..<order: the order conditions of UniPC.
private func vandermonde(_ rks: [Double], _ order: Int) -> [[Double]] {
    (0..<order).map { k in rks.map { pow($0, Double(k)) } }
}

/// The leading (n-1)×(n-1) block of a square matrix.
private func leadingBlock(_ m: [[Double]]) -> [[Double]] { m.dropLast().map { [Double]($0.dropLast()) } }

/// Solves the small dense system A·x = b by Gaussian elimination with partial pivoting
/// (`torch.linalg.solve` for UniPC's order conditions).
func solveLinear(_ a: [[Double]], _ b: [Double]) -> [Double] {
    var m = a, y = b
    let n = y.count
    for col in 0..<n {
        let pivot = (col..<n).max { Swift.abs(m[$0][col]) < Swift.abs(m[$1][col]) }!
        m.swapAt(col, pivot)
        y.swapAt(col, pivot)
        for row in (col + 1)..<n {
            let f = m[row][col] / m[col][col]
            for c in col..<n { m[row][c] -= f * m[col][c] }
            y[row] -= f * y[col]
        }
    }
    var x = [Double](repeating: 0, count: n)
    for row in (0..<n).reversed() {
        var s = y[row]
        for c in (row + 1)..<n { s -= m[row][c] * x[c] }
        x[row] = s / m[row][row]
    }
    return x
}
