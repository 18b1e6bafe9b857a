#if canImport(Glibc)
import Glibc
#endif
import DiffuseGraph

/// diffusers' `DPMSolverSinglestepScheduler` (Lu et al., "DPM-Solver" and "DPM-Solver++",
/// singlestep form): the steps come in groups of 1, 2 or 3 (`order_list`), and each step of a
/// group integrates from the sample at the group's start, using the model outputs taken inside
/// the group, so an order-k group costs k evaluations and reaches order k at its end. diffusers'
/// docs map AUTOMATIC1111's "DPM++ SDE" to it; the command line calls it `dpm++2s`.
public final class DPMSolverSinglestepScheduler: Scheduler {
    public let className = "DPMSolverSinglestepScheduler"
    public let order = 1
    public let initNoiseSigma = 1.0
    public let alphasCumprod: [Double]
    public private(set) var timesteps: [Double] = []
    public private(set) var sigmas: [Double] = []

    /// The multistep class's algorithms but its SDE-DPM-Solver, which diffusers has not here.
    enum AlgorithmType: String, CaseIterable {
        case dpmsolverPlusPlus = "dpmsolver++"
        case dpmsolver
        case sdeDpmsolverPlusPlus = "sde-dpmsolver++"

        /// The same algorithm for the steps both classes take.
        var multistep: DPMSolverMultistepScheduler.AlgorithmType {
            switch self {
            case .dpmsolverPlusPlus: return .dpmsolverPlusPlus
            case .dpmsolver: return .dpmsolver
            case .sdeDpmsolverPlusPlus: return .sdeDpmsolverPlusPlus
            }
        }
    }
    typealias SolverType = DPMSolverMultistepScheduler.SolverType

    private let schedule: NoiseSchedule
    private let solverOrder: Int
    private let predictionType: PredictionType
    private let algorithmType: AlgorithmType
    private let solverType: SolverType
    /// diffusers switches this on for good (in the config) at the first schedule that needs it:
    /// steps not a multiple of the order, or a final sigma of zero.
    private var lowerOrderFinal: Bool
    private let respacing: SigmaRespacing
    private let finalSigmasType: FinalSigmasType
    private let lambdaMinClipped: Double

    // The converted outputs of the last `solverOrder` steps (oldest first), the group's starting
    // sample, and each step's order.
    private var modelOutputs: [DeviceTensor?] = []
    private var groupSample: DeviceTensor?
    private var orderList: [Int] = []
    private var sequence = StepSequence()

    public init(config: SchedulerConfig) throws {
        let r = config.reader(className)
        schedule = try NoiseSchedule(r, betaStart: 0.0001, betaEnd: 0.02, betaSchedule: .linear, hasRescale: false)
        alphasCumprod = schedule.alphasCumprod.map(Double.init)
        solverOrder = try r.int("solver_order", 2)
        guard (1...3).contains(solverOrder) else { throw r.unsupported("solver_order", "\(solverOrder)", supported: ["1", "2", "3"]) }
        predictionType = try r.choice("prediction_type", .epsilon)
        try r.requireOff("thresholding", because: "dynamic thresholding is not implemented")
        // diffusers rewrites "deis" to dpmsolver++ and the UniPC/DEIS solver types to midpoint.
        algorithmType = try r.choice("algorithm_type", .dpmsolverPlusPlus, aliases: ["deis": .dpmsolverPlusPlus])
        solverType = try r.choice("solver_type", .midpoint, aliases: ["logrho": .midpoint, "bh1": .midpoint, "bh2": .midpoint])
        lowerOrderFinal = try r.bool("lower_order_final", false)
        respacing = try SigmaRespacing(r)
        try r.requireOff("use_flow_sigmas", because: "flow-matching sigmas are for flow models, not Stable Diffusion")
        try r.requireOff("use_dynamic_shifting", because: "dynamic shifting is for flow models")
        try r.requireNull("variance_type", because: "learned variance outputs are not supported")
        finalSigmasType = try r.choice("final_sigmas_type", .zero)
        if finalSigmasType == .zero && algorithmType == .dpmsolver {
            throw r.unsupported("final_sigmas_type", "\"zero\" with algorithm_type \"dpmsolver\"", supported: ["sigma_min"])
        }
        lambdaMinClipped = try r.double("lambda_min_clipped", -.infinity)
        sigmas = schedule.trainingSigmas.map(Double.init)
    }

    public func setTimesteps(_ numInferenceSteps: Int) throws {
        let n = numInferenceSteps, steps = schedule.numTrainTimesteps
        guard n >= 1 else { throw SchedulerError.invalidStepCount(className: className, steps: n, detail: "at least 1 is needed") }
        guard n <= steps else {
            throw SchedulerError.invalidStepCount(className: className, steps: n, detail: "at most num_train_timesteps (\(steps))")
        }
        // Always linspace spacing: this class has no timestep_spacing.
        var ts = NumPy.multistepTimesteps(n, last: schedule.lastTimestep(lambdaMinClipped: lambdaMinClipped), trainSteps: steps,
                                          spacing: .linspace, stepsOffset: 0)
        let training = schedule.trainingSigmas
        var s: [Double]
        if let respaced = respacing.respace(training.reversed().map(Double.init), count: n, training: training) {
            s = respaced.sigmas
            // Karras timesteps are rounded, exponential ones truncated by the int64 cast.
            ts = respacing.kind == .karras ? respaced.timesteps.map(NumPy.round) : respaced.timesteps
        } else {
            s = ts.map { NumPy.interp($0, training.map(Double.init)) }
        }
        install(timesteps: ts, sigmas: s)
    }

    /// diffusers' `set_timesteps(timesteps=…)`: whole timesteps, the training sigmas interpolated
    /// at them; refused with re-spaced sigmas, as in diffusers.
    public func setTimesteps(_ custom: CustomSchedule) throws {
        let ts = try custom.checkedTimesteps(className, trainSteps: schedule.numTrainTimesteps, refusing: respacing.configKey,
                                             integers: true)
        install(timesteps: ts, sigmas: ts.map { NumPy.interp($0, schedule.trainingSigmas.map(Double.init)) })
    }

    private func install(timesteps ts: [Double], sigmas s: [Double]) {
        let last = finalSigmasType == .zero ? 0 : Double(schedule.trainingSigmas[0])
        sigmas = (s + [last]).map { Double(Float($0)) }
        timesteps = ts.map { Double(Int64($0)) }
        modelOutputs = Array(repeating: nil, count: solverOrder)
        groupSample = nil
        sequence.reset()
        if ts.count % solverOrder != 0 || finalSigmasType == .zero { lowerOrderFinal = true }
        orderList = Self.orderList(steps: ts.count, order: solverOrder, lowerOrderFinal: lowerOrderFinal,
                                   finalZero: finalSigmasType == .zero)
    }

    /// diffusers' `get_order_list`: the order of each step, in groups 1, 2, (3); with
    /// `lower_order_final` the last group is cut to what the steps left allow, and a final
    /// sigma of zero ends on a first-order step.
    static func orderList(steps: Int, order: Int, lowerOrderFinal: Bool, finalZero: Bool) -> [Int] {
        let group = Array(1...order)
        var orders: [Int]
        if lowerOrderFinal {
            let whole = steps / order, rest = steps % order
            switch (order, rest) {
            case (1, _): orders = Array(repeating: 1, count: steps)
            case (_, 0): orders = Array(repeating: group, count: max(whole - 1, 0)).flatMap { $0 } + Array(1..<order) + [1]
            default: orders = Array(repeating: group, count: whole).flatMap { $0 } + Array(1...rest)
            }
        } else {
            orders = Array(repeating: group, count: steps / order).flatMap { $0 }
        }
        if finalZero, !orders.isEmpty { orders[orders.count - 1] = 1 }
        return orders
    }

    public func setBeginIndex(_ index: Int) { sequence.beginIndex = index }

    public func modelInputScale(stepIndex: Int) throws -> Double {
        try checkStep(self, stepIndex)
        return 1
    }

    /// α_t = 1/√(σ²+1) and σ_t = σ·α_t, and λ = log α_t − log σ_t, at a sigma of the schedule.
    private func alphaSigma(_ index: Int) -> (alpha: Double, sigma: Double) {
        let alpha = 1 / (sigmas[index] * sigmas[index] + 1).squareRoot()
        return (alpha, sigmas[index] * alpha)
    }

    private func lambda(_ index: Int) -> Double {
        let (alpha, sigma) = alphaSigma(index)
        return log(alpha) - log(sigma)
    }

    public func step(modelOutput: DeviceTensor, stepIndex i: Int, sample: DeviceTensor, algebra: LatentAlgebra,
                     noise: () throws -> DeviceTensor) throws -> SchedulerStepOutput {
        try checkStep(self, i)
        if try sequence.enter(i, className: className) {
            modelOutputs = Array(repeating: nil, count: solverOrder)
            groupSample = nil
        }
        guard i < orderList.count else {
            // diffusers' order list is shorter than the schedule only with lower_order_final off
            // and steps a multiple of the order, which set_timesteps never leaves; kept for safety.
            throw SchedulerError.stepIndexOutOfRange(className: className, index: i, count: orderList.count)
        }
        let converted = try convertModelOutput(modelOutput, sample: sample, index: i).evaluate(algebra)
        modelOutputs.removeFirst()
        modelOutputs.append(converted)
        let z = algorithmType == .sdeDpmsolverPlusPlus ? LinearCombination(try noise()) : nil
        var order = orderList[i]
        while modelOutputs[solverOrder - order] == nil { order -= 1 }
        if order == 1 { groupSample = sample }
        let x = LinearCombination(groupSample!)
        let prev: LinearCombination
        switch order {
        case 1: prev = firstOrderUpdate(x, i, z)
        case 2: prev = secondOrderUpdate(x, i, z)
        default: prev = thirdOrderUpdate(x, i, z)
        }
        let isDataPrediction = algorithmType != .dpmsolver
        return SchedulerStepOutput(prevSample: try prev.evaluate(algebra), predOriginalSample: isDataPrediction ? converted : nil)
    }

    /// The model output in the form the solver integrates: x̂₀ for DPM-Solver++, ε̂ for DPM-Solver.
    private func convertModelOutput(_ modelOutput: DeviceTensor, sample: DeviceTensor, index: Int) -> LinearCombination {
        let x = LinearCombination(sample), m = LinearCombination(modelOutput)
        let (alpha, sigma) = alphaSigma(index)
        switch (algorithmType, predictionType) {
        case (.dpmsolver, .epsilon): return m
        case (.dpmsolver, .sample): return (x - alpha * m) / sigma
        case (.dpmsolver, .vPrediction): return alpha * m + sigma * x
        case (_, .epsilon): return (x - sigma * m) / alpha
        case (_, .sample): return m
        case (_, .vPrediction): return alpha * x - sigma * m
        }
    }

    private func output(_ back: Int) -> LinearCombination { LinearCombination(modelOutputs[solverOrder - 1 - back]!) }

    /// DPM-Solver-1 from sigma i to i + 1 (a DDIM step in λ).
    private func firstOrderUpdate(_ x: LinearCombination, _ i: Int, _ z: LinearCombination?) -> LinearCombination {
        DPMSolverMultistepScheduler.firstOrderStep(x, output(0), to: alphaSigma(i + 1), from: alphaSigma(i),
                                                   h: lambda(i + 1) - lambda(i), z, algorithmType.multistep)
    }

    /// Singlestep DPM-Solver-2: from the group's sample at sigma i − 1 to i + 1, with the outputs
    /// at i − 1 and i.
    private func secondOrderUpdate(_ x: LinearCombination, _ i: Int, _ z: LinearCombination?) -> LinearCombination {
        let h = lambda(i + 1) - lambda(i - 1), h0 = lambda(i) - lambda(i - 1)
        let m0 = output(0), m1 = output(1)
        return DPMSolverMultistepScheduler.secondOrderStep(x, d0: m1, d1: (1 / (h0 / h)) * (m0 - m1), to: alphaSigma(i + 1),
                                                           from: alphaSigma(i - 1), h: h, z, algorithmType.multistep, solverType)
    }

    /// Singlestep DPM-Solver-3: from the group's sample at sigma i − 2 to i + 1, with the outputs
    /// at i − 2, i − 1 and i (the midpoint form uses only the newer difference, as diffusers).
    private func thirdOrderUpdate(_ x: LinearCombination, _ i: Int, _ z: LinearCombination?) -> LinearCombination {
        let (alphaT, sigmaT) = alphaSigma(i + 1), (alphaS2, sigmaS2) = alphaSigma(i - 2)
        let h = lambda(i + 1) - lambda(i - 2), h0 = lambda(i) - lambda(i - 2), h1 = lambda(i - 1) - lambda(i - 2)
        let r0 = h0 / h, r1 = h1 / h
        let m0 = output(0), m1 = output(1), m2 = output(2)
        let d0 = m2
        let d10 = (1 / r1) * (m1 - m2), d11 = (1 / r0) * (m0 - m2)
        let d1 = (r0 / (r0 - r1)) * d10 - (r1 / (r0 - r1)) * d11
        let d2 = (2 / (r0 - r1)) * (d11 - d10)
        switch (algorithmType, solverType) {
        case (.dpmsolverPlusPlus, .midpoint):
            return (sigmaT / sigmaS2) * x - (alphaT * (exp(-h) - 1)) * d0 + (alphaT * ((exp(-h) - 1) / h + 1)) * d11
        case (.dpmsolverPlusPlus, .heun):
            return (sigmaT / sigmaS2) * x - (alphaT * (exp(-h) - 1)) * d0 + (alphaT * ((exp(-h) - 1) / h + 1)) * d1
                - (alphaT * ((exp(-h) - 1 + h) / (h * h) - 0.5)) * d2
        case (.dpmsolver, .midpoint):
            return (alphaT / alphaS2) * x - (sigmaT * (exp(h) - 1)) * d0 - (sigmaT * ((exp(h) - 1) / h - 1)) * d11
        case (.dpmsolver, .heun):
            return (alphaT / alphaS2) * x - (sigmaT * (exp(h) - 1)) * d0 - (sigmaT * ((exp(h) - 1) / h - 1)) * d1
                - (sigmaT * ((exp(h) - 1 - h) / (h * h) - 0.5)) * d2
        case (.sdeDpmsolverPlusPlus, .midpoint):
            return (sigmaT / sigmaS2 * exp(-h)) * x + (alphaT * (1 - exp(-2 * h))) * d0
                + (alphaT * ((1 - exp(-2 * h)) / (-2 * h) + 1)) * d11 + (sigmaT * (1 - exp(-2 * h)).squareRoot()) * z!
        case (.sdeDpmsolverPlusPlus, .heun):
            let e2h = exp(-2 * h)
            return (sigmaT / sigmaS2 * exp(-h)) * x + (alphaT * (1 - e2h)) * d0 + (alphaT * ((1 - e2h) / (-2 * h) + 1)) * d1
                + (alphaT * ((1 - e2h - 2 * h) / ((2 * h) * (2 * h)) - 0.5)) * d2 + (sigmaT * (1 - e2h).squareRoot()) * z!
        }
    }

    /// √ᾱ·x₀ + √(1 − ᾱ)·noise in the schedule's sigma form, as diffusers' `add_noise`.
    public func addNoise(original: DeviceTensor, noise: DeviceTensor, stepIndex: Int,
                         algebra: LatentAlgebra) throws -> DeviceTensor {
        try checkStep(self, stepIndex)
        let (alpha, sigma) = alphaSigma(stepIndex)
        return try algebra.combine([(alpha, original), (sigma, noise)])
    }
}
