import DiffuseGraph

/// diffusers' `PNDMScheduler` (Liu et al., "Pseudo Numerical Methods for Diffusion Models"): a
/// linear multistep method (PLMS) on the noise predictions. With `skip_prk_steps` (as every
/// Stable Diffusion config sets it) the schedule repeats the second timestep and warms up with
/// lower-order Adams-Bashforth steps; without it, Runge-Kutta (PRK) steps come first.
public final class PNDMScheduler: Scheduler {
    public let className = "PNDMScheduler"
    public let order = 1
    public let initNoiseSigma = 1.0
    public var sigmas: [Double] { [] }
    public let alphasCumprod: [Double]
    public private(set) var timesteps: [Double] = []

    private let numTrainTimesteps: Int
    private let predictionType: PredictionType
    private let skipPRKSteps: Bool
    private let finalAlphaCumprod: Double
    private let stepsOffset: Int
    private let timestepSpacing: TimestepSpacing
    private let pndmOrder = 4
    private var numInferenceSteps = 0
    private var prkCount = 0
    private var beginIndex = 0

    // Step state, as diffusers keeps it (tensors are copies the scheduler made).
    private var counter = 0
    private var ets: [DeviceTensor] = []
    private var curSample: DeviceTensor?
    private var curModelOutput: DeviceTensor?

    public init(config: SchedulerConfig) throws {
        let r = config.reader(className)
        let schedule = try NoiseSchedule(r, betaStart: 0.0001, betaEnd: 0.02, betaSchedule: .linear, hasRescale: false)
        numTrainTimesteps = schedule.numTrainTimesteps
        alphasCumprod = schedule.alphasCumprod.map(Double.init)
        predictionType = try r.choice("prediction_type", .epsilon, allowed: [.epsilon, .vPrediction])
        skipPRKSteps = try r.bool("skip_prk_steps", false)
        finalAlphaCumprod = try r.bool("set_alpha_to_one", false) ? 1.0 : alphasCumprod[0]
        stepsOffset = try r.int("steps_offset", 0)
        timestepSpacing = try r.choice("timestep_spacing", .leading)
    }

    public func setTimesteps(_ numInferenceSteps: Int) throws {
        let n = numInferenceSteps, steps = numTrainTimesteps
        guard n >= 1 else { throw SchedulerError.invalidStepCount(className: className, steps: n, detail: "at least 1 is needed") }
        guard n <= steps else {
            throw SchedulerError.invalidStepCount(className: className, steps: n, detail: "at most num_train_timesteps (\(steps))")
        }
        // The base schedule, ascending.
        var base: [Int]
        switch timestepSpacing {
        case .linspace:
            base = NumPy.linspace(0, Double(steps - 1), n).map { Int(NumPy.round($0)) }
        case .leading:
            base = (0..<n).map { $0 * (steps / n) + stepsOffset }
        case .trailing:
            base = NumPy.arange(Double(steps), 0, -Double(steps) / Double(n)).reversed().map { Int(NumPy.round($0)) - 1 }
        }
        var prk: [Int] = [], plms: [Int]
        if skipPRKSteps {
            // The second-to-last value appears twice: PLMS's first step needs a second evaluation.
            let secondToLast = base.count >= 2 ? [base[base.count - 2]] : []
            plms = Array((base.dropLast() + secondToLast + base.suffix(1)).reversed())
        } else {
            let half = steps / n / 2
            let pairs = base.suffix(pndmOrder).flatMap { [$0, $0 + half] }
            let doubled = pairs.dropLast().flatMap { [$0, $0] }
            prk = Array(doubled.dropFirst().dropLast().reversed())
            plms = Array(base.dropLast(3).reversed())
        }
        guard !(prk + plms).isEmpty else {
            throw SchedulerError.invalidStepCount(className: className, steps: n,
                                                  detail: "Runge-Kutta warm-up (skip_prk_steps = false) needs at least 4 steps")
        }
        self.numInferenceSteps = n
        prkCount = prk.count
        timesteps = (prk + plms).map(Double.init)
        reset()
    }

    public func setBeginIndex(_ index: Int) { beginIndex = index }

    private func reset() {
        counter = 0
        ets = []
        curSample = nil
        curModelOutput = nil
    }

    public func modelInputScale(stepIndex: Int) throws -> Double {
        try checkStep(self, stepIndex)
        return 1
    }

    public func step(modelOutput: DeviceTensor, stepIndex: Int, sample: DeviceTensor, algebra: LatentAlgebra,
                     noise: () throws -> DeviceTensor) throws -> SchedulerStepOutput {
        try checkStep(self, stepIndex)
        if stepIndex == beginIndex { reset() }
        guard stepIndex == beginIndex + counter else {
            throw SchedulerError.stepOutOfOrder(className: className, expected: beginIndex + counter, got: stepIndex)
        }
        let timestep = Int(timesteps[stepIndex])
        let prev = counter < prkCount && !skipPRKSteps
            ? try stepPRK(modelOutput, timestep, sample, algebra)
            : try stepPLMS(modelOutput, timestep, sample, algebra)
        counter += 1
        return SchedulerStepOutput(prevSample: prev, predOriginalSample: nil)
    }

    /// A fourth-order Runge-Kutta stage: four evaluations per step, their weighted mean at the last.
    private func stepPRK(_ modelOutput: DeviceTensor, _ timestep: Int, _ sample: DeviceTensor,
                         _ algebra: LatentAlgebra) throws -> DeviceTensor {
        let diffToPrev = counter % 2 == 1 ? 0 : numTrainTimesteps / numInferenceSteps / 2
        let prevTimestep = timestep - diffToPrev
        let stageTimestep = Int(timesteps[beginIndex + counter / 4 * 4])
        let mo = LinearCombination(modelOutput)
        let accumulated = curModelOutput.map(LinearCombination.init)
        var output = mo
        switch counter % 4 {
        case 0:
            curModelOutput = try (1 / 6 * mo).evaluate(algebra)
            ets.append(try mo.evaluate(algebra))
            curSample = sample
        case 1, 2:
            curModelOutput = try (accumulated! + 1 / 3 * mo).evaluate(algebra)
        default:
            output = accumulated! + 1 / 6 * mo
            curModelOutput = nil
        }
        return try prevSample(LinearCombination(curSample ?? sample), stageTimestep, prevTimestep, output).evaluate(algebra)
    }

    /// A linear multistep (Adams-Bashforth) step on the last four noise predictions.
    private func stepPLMS(_ modelOutput: DeviceTensor, _ timestep: Int, _ sample: DeviceTensor,
                          _ algebra: LatentAlgebra) throws -> DeviceTensor {
        var timestep = timestep
        var prevTimestep = timestep - numTrainTimesteps / numInferenceSteps
        if counter != 1 {
            ets = Array(ets.suffix(3))
            ets.append(try LinearCombination(modelOutput).evaluate(algebra))  // a copy: the caller may reuse its buffer
        } else {
            // The repeated timestep: evaluate again at t and average with the first slope.
            prevTimestep = timestep
            timestep += numTrainTimesteps / numInferenceSteps
        }
        let e = ets.map(LinearCombination.init)
        var x = LinearCombination(sample)
        let output: LinearCombination
        if ets.count == 1 && counter == 0 {
            output = LinearCombination(modelOutput)
            curSample = sample
        } else if ets.count == 1 && counter == 1 {
            output = (LinearCombination(modelOutput) + e[0]) / 2
            x = LinearCombination(curSample!)
            curSample = nil
        } else if ets.count == 2 {
            output = (3 * e[1] - e[0]) / 2
        } else if ets.count == 3 {
            output = (23 * e[2] - 16 * e[1] + 5 * e[0]) / 12
        } else {
            output = (1 / 24) * (55 * e[3] - 59 * e[2] + 37 * e[1] - 9 * e[0])
        }
        return try prevSample(x, timestep, prevTimestep, output).evaluate(algebra)
    }

    /// Formula (9) of the PNDM paper: x_{t-δ} from x_t and the (combined) noise prediction.
    private func prevSample(_ x: LinearCombination, _ timestep: Int, _ prevTimestep: Int,
                            _ modelOutput: LinearCombination) -> LinearCombination {
        let alphaProdT = alphasCumprod[timestep]
        let alphaProdPrev = prevTimestep >= 0 ? alphasCumprod[prevTimestep] : finalAlphaCumprod
        let betaProdT = 1 - alphaProdT, betaProdPrev = 1 - alphaProdPrev
        var eps = modelOutput
        if predictionType == .vPrediction {
            eps = alphaProdT.squareRoot() * modelOutput + betaProdT.squareRoot() * x
        }
        let sampleCoeff = (alphaProdPrev / alphaProdT).squareRoot()
        let denominator = alphaProdT * betaProdPrev.squareRoot() + (alphaProdT * betaProdT * alphaProdPrev).squareRoot()
        return sampleCoeff * x - (alphaProdPrev - alphaProdT) / denominator * eps
    }

    public func addNoise(original: DeviceTensor, noise: DeviceTensor, stepIndex: Int,
                         algebra: LatentAlgebra) throws -> DeviceTensor {
        try noisedByAlphasCumprod(original, noise, stepIndex: stepIndex, algebra: algebra)
    }
}
