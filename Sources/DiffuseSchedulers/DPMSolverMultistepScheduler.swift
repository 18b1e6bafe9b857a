#if canImport(Glibc)
import Glibc
#endif
import DiffuseGraph

/// diffusers' `DPMSolverMultistepScheduler` (Lu et al., "DPM-Solver++"): an exponential
/// integrator in λ = log(α/σ) that reuses the previous model outputs (multistep). The default
/// `dpmsolver++` with `solver_order` 2 is "DPM++ 2M"; with `use_karras_sigmas` it is
/// "DPM++ 2M Karras". The SDE variants add noise each step.
///
/// `DPMSolverMultistepScheduler.edm(config:)` is diffusers' `EDMDPMSolverMultistepScheduler`:
/// the same solver over EDM's noise levels (α = 1, σ_t = σ) with EDM's preconditioning, for
/// EDM-trained models such as Playground v2.5.
public final class DPMSolverMultistepScheduler: Scheduler {
    public let className: String
    public let order = 1
    public var initNoiseSigma: Double { edm?.initNoiseSigma ?? 1 }
    public let alphasCumprod: [Double]
    public private(set) var timesteps: [Double] = []
    public private(set) var sigmas: [Double] = []

    enum AlgorithmType: String, CaseIterable {
        case dpmsolverPlusPlus = "dpmsolver++"
        case dpmsolver
        case sdeDpmsolverPlusPlus = "sde-dpmsolver++"
        case sdeDpmsolver = "sde-dpmsolver"
    }
    enum SolverType: String, CaseIterable { case midpoint, heun }

    private let schedule: NoiseSchedule
    private let solverOrder: Int
    private let predictionType: PredictionType
    private let algorithmType: AlgorithmType
    private let solverType: SolverType
    private let lowerOrderFinal: Bool
    private let eulerAtFinal: Bool
    private let useKarrasSigmas: Bool
    private let useExponentialSigmas: Bool
    private let useLuLambdas: Bool
    private let sigmaMin: Double?
    private let sigmaMax: Double?
    private let finalSigmasType: FinalSigmasType
    private let lambdaMinClipped: Double
    private let timestepSpacing: TimestepSpacing
    private let stepsOffset: Int
    /// EDM's noise levels and preconditioning, for `EDMDPMSolverMultistepScheduler`.
    private let edm: EDMSchedule?

    // Multistep state: the converted model outputs of the last `solverOrder` steps, oldest first.
    private var modelOutputs: [DeviceTensor?] = []
    private var lowerOrderNums = 0
    private var beginIndex = 0
    private var nextStepIndex: Int?

    public convenience init(config: SchedulerConfig) throws { try self.init(config: config, edm: false) }

    /// diffusers' `EDMDPMSolverMultistepScheduler` from its config (`sigma_min`, `sigma_max`,
    /// `sigma_data`, `sigma_schedule`, `rho` and the solver's keys).
    public static func edm(config: SchedulerConfig) throws -> DPMSolverMultistepScheduler {
        try DPMSolverMultistepScheduler(config: config, edm: true)
    }

    private init(config: SchedulerConfig, edm isEDM: Bool) throws {
        className = isEDM ? "EDMDPMSolverMultistepScheduler" : "DPMSolverMultistepScheduler"
        let r = config.reader(className)
        schedule = try NoiseSchedule(r, betaStart: 0.0001, betaEnd: 0.02, betaSchedule: .linear, terminalAlphaFloor: true)
        edm = isEDM ? try EDMSchedule(r) : nil
        alphasCumprod = isEDM ? [] : schedule.alphasCumprod.map(Double.init)
        solverOrder = try r.int("solver_order", 2)
        guard (1...3).contains(solverOrder) else { throw r.unsupported("solver_order", "\(solverOrder)", supported: ["1", "2", "3"]) }
        predictionType = try r.choice("prediction_type", .epsilon)
        try r.requireOff("thresholding", because: "dynamic thresholding is not implemented")
        // diffusers rewrites "deis" to dpmsolver++ and the UniPC/DEIS solver types to midpoint.
        algorithmType = try r.choice("algorithm_type", .dpmsolverPlusPlus, aliases: ["deis": .dpmsolverPlusPlus])
        solverType = try r.choice("solver_type", .midpoint, aliases: ["logrho": .midpoint, "bh1": .midpoint, "bh2": .midpoint])
        if algorithmType == .sdeDpmsolver && solverOrder == 3 {
            throw r.unsupported("solver_order", "3 with algorithm_type \"sde-dpmsolver\"", supported: ["1", "2"])
        }
        if isEDM {
            // EDM's solver is data-predicting only, and has no third-order SDE step.
            guard algorithmType == .dpmsolverPlusPlus || algorithmType == .sdeDpmsolverPlusPlus else {
                throw r.unsupported("algorithm_type", "\"\(algorithmType.rawValue)\"", supported: ["dpmsolver++", "sde-dpmsolver++"])
            }
            if algorithmType == .sdeDpmsolverPlusPlus && solverOrder == 3 {
                throw r.unsupported("solver_order", "3 with algorithm_type \"sde-dpmsolver++\"", supported: ["1", "2"])
            }
        }
        lowerOrderFinal = try r.bool("lower_order_final", true)
        eulerAtFinal = try r.bool("euler_at_final", false)
        useKarrasSigmas = try r.bool("use_karras_sigmas", false)
        useExponentialSigmas = try r.bool("use_exponential_sigmas", false)
        useLuLambdas = try r.bool("use_lu_lambdas", false)
        try r.requireOff("use_beta_sigmas", because: "beta-distribution sigmas are not implemented")
        try r.requireOff("use_flow_sigmas", because: "flow-matching sigmas are for flow models, not Stable Diffusion")
        try r.requireOff("use_dynamic_shifting", because: "dynamic shifting is for flow models")
        try r.requireNull("variance_type", because: "learned variance outputs are not supported")
        // As diffusers: Karras and exponential sigmas exclude each other; Lu's lambdas may be set
        // with either, and then Karras wins over them and they win over exponential.
        if useKarrasSigmas && useExponentialSigmas {
            throw r.unsupported("use_karras_sigmas", "true together with use_exponential_sigmas",
                                supported: ["at most one of them"])
        }
        // Not init arguments of this class, but diffusers reads them when a config carries them.
        sigmaMin = try r.optionalDouble("sigma_min")
        sigmaMax = try r.optionalDouble("sigma_max")
        finalSigmasType = try r.choice("final_sigmas_type", .zero)
        if finalSigmasType == .zero && !(algorithmType == .dpmsolverPlusPlus || algorithmType == .sdeDpmsolverPlusPlus) {
            throw r.unsupported("final_sigmas_type", "\"zero\" with algorithm_type \"\(algorithmType.rawValue)\"",
                                supported: ["sigma_min"])
        }
        lambdaMinClipped = try r.double("lambda_min_clipped", -.infinity)
        timestepSpacing = try r.choice("timestep_spacing", .linspace)
        stepsOffset = try r.int("steps_offset", 0)
        sigmas = schedule.trainingSigmas.map(Double.init)
    }

    public func setTimesteps(_ numInferenceSteps: Int) throws {
        let n = numInferenceSteps, steps = schedule.numTrainTimesteps
        guard n >= 1 else { throw SchedulerError.invalidStepCount(className: className, steps: n, detail: "at least 1 is needed") }
        modelOutputs = Array(repeating: nil, count: solverOrder)
        lowerOrderNums = 0
        nextStepIndex = nil
        if let edm {
            let s = edm.sigmas(count: n)
            sigmas = s + [finalSigmasType == .zero ? 0 : Double(Float(edm.sigmaMin))]
            timesteps = s.map(edm.timestep)
            return
        }
        guard n <= steps else {
            throw SchedulerError.invalidStepCount(className: className, steps: n, detail: "at most num_train_timesteps (\(steps))")
        }
        let training = schedule.trainingSigmas
        var ts = NumPy.multistepTimesteps(n, last: schedule.lastTimestep(lambdaMinClipped: lambdaMinClipped), trainSteps: steps,
                                          spacing: timestepSpacing, stepsOffset: stepsOffset)
        let fp = training.map(Double.init)
        let logSigmas = Sigmas.logSigmas(training)
        var s: [Double]
        if useKarrasSigmas || (useExponentialSigmas && !useLuLambdas) {
            let lo = sigmaMin ?? fp[0], hi = sigmaMax ?? fp[fp.count - 1]
            s = useKarrasSigmas ? Sigmas.karras(sigmaMin: lo, sigmaMax: hi, count: n)
                                : Sigmas.exponential(sigmaMin: lo, sigmaMax: hi, count: n)
            ts = s.map { Sigmas.sigmaToT($0, logSigmas: logSigmas) }
            if useKarrasSigmas && schedule.betaSchedule != .squaredcosCapV2 { ts = ts.map(NumPy.round) }
        } else if useLuLambdas {
            // Lu et al.'s spacing: log σ evenly spaced from the largest training sigma to the smallest.
            let logMax = Double(logSigmas[logSigmas.count - 1]), logMin = Double(logSigmas[0])
            s = NumPy.linspace(0, 1, n).map { exp(logMax + $0 * (logMin - logMax)) }
            ts = s.map { Sigmas.sigmaToT($0, logSigmas: logSigmas) }
            if schedule.betaSchedule != .squaredcosCapV2 { ts = ts.map(NumPy.round) }
        } else {
            s = ts.map { NumPy.interp($0, fp) }
        }
        let last: Double
        switch finalSigmasType {
        case .zero: last = 0
        case .sigmaMin: last = fp[0]
        }
        sigmas = (s + [last]).map { Double(Float($0)) }
        timesteps = ts.map { Double(Int64($0)) }  // diffusers stores them as int64
    }

    /// diffusers' `set_timesteps(timesteps=…)` (Align Your Steps): the training sigmas
    /// interpolated at those whole timesteps, then the final sigma. The EDM form has no such
    /// argument; re-spaced sigmas are refused, as in diffusers.
    public func setTimesteps(_ custom: CustomSchedule) throws {
        guard edm == nil else {
            throw SchedulerError.customSchedule(className: className, detail: "takes no custom timesteps (diffusers' has no `timesteps` argument)")
        }
        let refused = useKarrasSigmas ? "use_karras_sigmas" : useLuLambdas ? "use_lu_lambdas"
            : useExponentialSigmas ? "use_exponential_sigmas" : nil
        let ts = try custom.checkedTimesteps(className, trainSteps: schedule.numTrainTimesteps, refusing: refused, integers: true)
        modelOutputs = Array(repeating: nil, count: solverOrder)
        lowerOrderNums = 0
        nextStepIndex = nil
        let fp = schedule.trainingSigmas.map(Double.init)
        sigmas = (ts.map { NumPy.interp($0, fp) } + [finalSigmasType == .zero ? 0 : fp[0]]).map { Double(Float($0)) }
        timesteps = ts
    }

    public func setBeginIndex(_ index: Int) { beginIndex = index }

    public func modelInputScale(stepIndex: Int) throws -> Double {
        try checkStep(self, stepIndex)
        return edm?.inputScale(sigmas[stepIndex]) ?? 1
    }

    /// α_t = 1/√(σ²+1) and σ_t = σ·α_t for a sigma of the schedule (EDM: 1 and σ, its inputs
    /// being scaled before the model).
    private func alphaSigma(_ index: Int) -> (alpha: Double, sigma: Double) {
        let s = sigmas[index]
        if edm != nil { return (1, s) }
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
            modelOutputs = Array(repeating: nil, count: solverOrder)
            lowerOrderNums = 0
        } else if stepIndex != nextStepIndex {
            throw SchedulerError.stepOutOfOrder(className: className, expected: nextStepIndex ?? beginIndex, got: stepIndex)
        }
        let i = stepIndex, count = timesteps.count
        let lowerOrderFinalStep = i == count - 1
            && (eulerAtFinal || (lowerOrderFinal && count < 15) || finalSigmasType == .zero)
        let lowerOrderSecond = i == count - 2 && lowerOrderFinal && count < 15

        let converted = try convertModelOutput(modelOutput, sample: sample, index: i).evaluate(algebra)
        modelOutputs.removeFirst()
        modelOutputs.append(converted)

        let isSDE = algorithmType == .sdeDpmsolver || algorithmType == .sdeDpmsolverPlusPlus
        let z = isSDE ? LinearCombination(try noise()) : nil
        let x = LinearCombination(sample)
        let prev: LinearCombination
        if solverOrder == 1 || lowerOrderNums < 1 || lowerOrderFinalStep {
            prev = firstOrderUpdate(LinearCombination(converted), x, i, z)
        } else if solverOrder == 2 || lowerOrderNums < 2 || lowerOrderSecond {
            prev = secondOrderUpdate(x, i, z)
        } else {
            prev = thirdOrderUpdate(x, i, z)
        }
        lowerOrderNums = min(lowerOrderNums + 1, solverOrder)
        nextStepIndex = i + 1
        let isDataPrediction = algorithmType == .dpmsolverPlusPlus || algorithmType == .sdeDpmsolverPlusPlus
        return SchedulerStepOutput(prevSample: try prev.evaluate(algebra), predOriginalSample: isDataPrediction ? converted : nil)
    }

    /// The model output in the form the solver integrates: x̂₀ for DPM-Solver++, ε̂ for DPM-Solver.
    private func convertModelOutput(_ modelOutput: DeviceTensor, sample: DeviceTensor, index: Int) -> LinearCombination {
        let x = LinearCombination(sample), m = LinearCombination(modelOutput)
        if let edm { return edm.denoised(x, m, sigma: sigmas[index]) }
        let (alpha, sigma) = alphaSigma(index)
        switch (algorithmType, predictionType) {
        case (.dpmsolverPlusPlus, .epsilon), (.sdeDpmsolverPlusPlus, .epsilon): return (x - sigma * m) / alpha
        case (.dpmsolverPlusPlus, .sample), (.sdeDpmsolverPlusPlus, .sample): return m
        case (.dpmsolverPlusPlus, .vPrediction), (.sdeDpmsolverPlusPlus, .vPrediction): return alpha * x - sigma * m
        case (_, .epsilon): return m
        case (_, .sample): return (x - alpha * m) / sigma
        case (_, .vPrediction): return alpha * m + sigma * x
        }
    }

    /// DPM-Solver-1 (a DDIM step in λ).
    private func firstOrderUpdate(_ m: LinearCombination, _ x: LinearCombination, _ i: Int,
                                  _ z: LinearCombination?) -> LinearCombination {
        Self.firstOrderStep(x, m, to: alphaSigma(i + 1), from: alphaSigma(i), h: lambda(i + 1) - lambda(i), z, algorithmType)
    }

    /// DPM-Solver-1 of sample x from the noise level (αs, σs) to (αt, σt), h = λt − λs (the
    /// multistep and the singlestep class both take it).
    static func firstOrderStep(_ x: LinearCombination, _ m: LinearCombination, to t: (alpha: Double, sigma: Double),
                               from s: (alpha: Double, sigma: Double), h: Double, _ z: LinearCombination?,
                               _ algorithmType: AlgorithmType) -> LinearCombination {
        let (alphaT, sigmaT) = t, (alphaS, sigmaS) = s
        switch algorithmType {
        case .dpmsolverPlusPlus:
            return (sigmaT / sigmaS) * x - (alphaT * (exp(-h) - 1)) * m
        case .dpmsolver:
            return (alphaT / alphaS) * x - (sigmaT * (exp(h) - 1)) * m
        case .sdeDpmsolverPlusPlus:
            return (sigmaT / sigmaS * exp(-h)) * x + (alphaT * (1 - exp(-2 * h))) * m
                + (sigmaT * (1 - exp(-2 * h)).squareRoot()) * z!
        case .sdeDpmsolver:
            return (alphaT / alphaS) * x - (2 * sigmaT * (exp(h) - 1)) * m
                + (sigmaT * (exp(2 * h) - 1).squareRoot()) * z!
        }
    }

    /// Multistep DPM-Solver-2: the last two outputs give a first-difference correction D1.
    private func secondOrderUpdate(_ x: LinearCombination, _ i: Int, _ z: LinearCombination?) -> LinearCombination {
        let m0 = LinearCombination(modelOutputs[solverOrder - 1]!), m1 = LinearCombination(modelOutputs[solverOrder - 2]!)
        let h = lambda(i + 1) - lambda(i), h0 = lambda(i) - lambda(i - 1)
        let r0 = h0 / h
        return Self.secondOrderStep(x, d0: m0, d1: (1 / r0) * (m0 - m1), to: alphaSigma(i + 1), from: alphaSigma(i), h: h, z,
                                    algorithmType, solverType)
    }

    /// DPM-Solver-2 of sample x from (αs, σs) to (αt, σt) with the output D0 and its first
    /// difference D1 (the multistep and the singlestep class differ in which they are).
    static func secondOrderStep(_ x: LinearCombination, d0: LinearCombination, d1: LinearCombination,
                                to t: (alpha: Double, sigma: Double), from s: (alpha: Double, sigma: Double), h: Double,
                                _ z: LinearCombination?, _ algorithmType: AlgorithmType, _ solverType: SolverType) -> LinearCombination {
        let (alphaT, sigmaT) = t, (alphaS0, sigmaS0) = s
        switch (algorithmType, solverType) {
        case (.dpmsolverPlusPlus, .midpoint):
            return (sigmaT / sigmaS0) * x - (alphaT * (exp(-h) - 1)) * d0 - (0.5 * (alphaT * (exp(-h) - 1))) * d1
        case (.dpmsolverPlusPlus, .heun):
            return (sigmaT / sigmaS0) * x - (alphaT * (exp(-h) - 1)) * d0 + (alphaT * ((exp(-h) - 1) / h + 1)) * d1
        case (.dpmsolver, .midpoint):
            return (alphaT / alphaS0) * x - (sigmaT * (exp(h) - 1)) * d0 - (0.5 * (sigmaT * (exp(h) - 1))) * d1
        case (.dpmsolver, .heun):
            return (alphaT / alphaS0) * x - (sigmaT * (exp(h) - 1)) * d0 - (sigmaT * ((exp(h) - 1) / h - 1)) * d1
        case (.sdeDpmsolverPlusPlus, .midpoint):
            return (sigmaT / sigmaS0 * exp(-h)) * x + (alphaT * (1 - exp(-2 * h))) * d0
                + (0.5 * (alphaT * (1 - exp(-2 * h)))) * d1 + (sigmaT * (1 - exp(-2 * h)).squareRoot()) * z!
        case (.sdeDpmsolverPlusPlus, .heun):
            return (sigmaT / sigmaS0 * exp(-h)) * x + (alphaT * (1 - exp(-2 * h))) * d0
                + (alphaT * ((1 - exp(-2 * h)) / (-2 * h) + 1)) * d1 + (sigmaT * (1 - exp(-2 * h)).squareRoot()) * z!
        case (.sdeDpmsolver, .midpoint):
            return (alphaT / alphaS0) * x - (2 * (sigmaT * (exp(h) - 1))) * d0 - (sigmaT * (exp(h) - 1)) * d1
                + (sigmaT * (exp(2 * h) - 1).squareRoot()) * z!
        case (.sdeDpmsolver, .heun):
            return (alphaT / alphaS0) * x - (2 * (sigmaT * (exp(h) - 1))) * d0 - (2 * (sigmaT * ((exp(h) - 1) / h - 1))) * d1
                + (sigmaT * (exp(2 * h) - 1).squareRoot()) * z!
        }
    }

    /// Multistep DPM-Solver-3 from the last three outputs (diffusers has no third-order
    /// SDE-DPM-Solver; the config check rules it out).
    private func thirdOrderUpdate(_ x: LinearCombination, _ i: Int, _ z: LinearCombination?) -> LinearCombination {
        let (alphaT, sigmaT) = alphaSigma(i + 1), (alphaS0, sigmaS0) = alphaSigma(i)
        let m0 = LinearCombination(modelOutputs[2]!), m1 = LinearCombination(modelOutputs[1]!)
        let m2 = LinearCombination(modelOutputs[0]!)
        let h = lambda(i + 1) - lambda(i), h0 = lambda(i) - lambda(i - 1), h1 = lambda(i - 1) - lambda(i - 2)
        let r0 = h0 / h, r1 = h1 / h
        let d0 = m0
        let d10 = (1 / r0) * (m0 - m1), d11 = (1 / r1) * (m1 - m2)
        let d1 = d10 + (r0 / (r0 + r1)) * (d10 - d11)
        let d2 = (1 / (r0 + r1)) * (d10 - d11)
        switch algorithmType {
        case .dpmsolverPlusPlus:
            return (sigmaT / sigmaS0) * x - (alphaT * (exp(-h) - 1)) * d0 + (alphaT * ((exp(-h) - 1) / h + 1)) * d1
                - (alphaT * ((exp(-h) - 1 + h) / (h * h) - 0.5)) * d2
        case .dpmsolver, .sdeDpmsolver:
            return (alphaT / alphaS0) * x - (sigmaT * (exp(h) - 1)) * d0 - (sigmaT * ((exp(h) - 1) / h - 1)) * d1
                - (sigmaT * ((exp(h) - 1 - h) / (h * h) - 0.5)) * d2
        case .sdeDpmsolverPlusPlus:
            let e2h = exp(-2 * h)
            return (sigmaT / sigmaS0 * exp(-h)) * x + (alphaT * (1 - e2h)) * d0
                + (alphaT * ((1 - e2h) / (-2 * h) + 1)) * d1
                + (alphaT * ((1 - e2h - 2 * h) / ((2 * h) * (2 * h)) - 0.5)) * d2
                + (sigmaT * (1 - e2h).squareRoot()) * z!
        }
    }

    public func addNoise(original: DeviceTensor, noise: DeviceTensor, stepIndex: Int,
                         algebra: LatentAlgebra) throws -> DeviceTensor {
        try checkStep(self, stepIndex)
        let (alpha, sigma) = alphaSigma(stepIndex)
        return try algebra.combine([(alpha, original), (sigma, noise)])
    }
}
