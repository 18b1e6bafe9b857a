import DiffuseGraph

/// diffusers' `LMSDiscreteScheduler` (k-diffusion's "LMS"): a linear multistep method in sigma.
/// Each step integrates the Lagrange polynomial through the last (up to four) slopes dx/dσ over
/// [σᵢ, σᵢ₊₁], as diffusers does with `scipy.integrate.quad`; here the integral is exact.
public final class LMSDiscreteScheduler: Scheduler {
    public let className = "LMSDiscreteScheduler"
    public let order = 1
    public let alphasCumprod: [Double]
    public private(set) var timesteps: [Double] = []
    public private(set) var sigmas: [Double] = []

    /// diffusers' `step(order=4)`: how many past slopes the method uses.
    static let maxOrder = 4

    private let base: DiscreteSigmaSchedule
    private let predictionType: PredictionType
    private var sequence = StepSequence()
    /// The slopes of the last steps, oldest first.
    private var derivatives: [DeviceTensor] = []

    public init(config: SchedulerConfig) throws {
        let r = config.reader(className)
        let schedule = try NoiseSchedule(r, betaStart: 0.0001, betaEnd: 0.02, betaSchedule: .linear, hasRescale: false)
        alphasCumprod = schedule.alphasCumprod.map(Double.init)
        predictionType = try r.choice("prediction_type", .epsilon)
        base = try DiscreteSigmaSchedule(r, schedule: schedule, karrasHonoursRange: false)
        sigmas = base.untimedSigmas
    }

    public var initNoiseSigma: Double { base.initNoiseSigma(sigmas) }

    public func setTimesteps(_ numInferenceSteps: Int) throws {
        let (ts, s) = try base.make(numInferenceSteps, className: className)
        sigmas = s
        timesteps = ts.map { Double(Float($0)) }
        derivatives = []
        sequence.reset()
    }

    public func setBeginIndex(_ index: Int) { sequence.beginIndex = index }

    public func modelInputScale(stepIndex: Int) throws -> Double {
        try checkStep(self, stepIndex)
        return Sigmas.inputScale(sigmas[stepIndex])
    }

    /// ∫ over [σₜ, σₜ₊₁] of the Lagrange basis polynomial for slope `current` (0 = newest) through
    /// σₜ, σₜ₋₁, …, σₜ₋ₒᵣ𝒹ₑᵣ₊₁. The integrand has degree at most 3, so three Gauss–Legendre nodes
    /// give the integral exactly.
    func lmsCoefficient(order: Int, t: Int, current: Int) -> Double {
        func basis(_ tau: Double) -> Double {
            var product = 1.0
            for k in 0..<order where k != current {
                product *= (tau - sigmas[t - k]) / (sigmas[t - current] - sigmas[t - k])
            }
            return product
        }
        let a = sigmas[t], b = sigmas[t + 1]
        let mid = (a + b) / 2, half = (b - a) / 2, node = (0.6).squareRoot()
        return half * (5 * basis(mid - half * node) + 8 * basis(mid) + 5 * basis(mid + half * node)) / 9
    }

    public func step(modelOutput: DeviceTensor, stepIndex i: Int, sample: DeviceTensor, algebra: LatentAlgebra,
                     noise: () throws -> DeviceTensor) throws -> SchedulerStepOutput {
        try checkStep(self, i)
        if try sequence.enter(i, className: className) { derivatives = [] }
        let sigma = sigmas[i]
        let x = LinearCombination(sample), m = LinearCombination(modelOutput)
        let predOriginal = predictionType.originalSample(sigma: sigma, sample: x, output: m)
        derivatives.append(try ((x - predOriginal) / sigma).evaluate(algebra))
        if derivatives.count > Self.maxOrder { derivatives.removeFirst() }
        // diffusers counts the order from step 0, not from the begin index, and pairs the
        // coefficients with the slopes it has (zip): after an img2img start fewer terms are used.
        let order = min(i + 1, Self.maxOrder)
        var prev = x
        for k in 0..<min(order, derivatives.count) {
            prev = prev + lmsCoefficient(order: order, t: i, current: k) * LinearCombination(derivatives[derivatives.count - 1 - k])
        }
        return SchedulerStepOutput(prevSample: try prev.evaluate(algebra), predOriginalSample: try predOriginal.evaluate(algebra))
    }

    public func addNoise(original: DeviceTensor, noise: DeviceTensor, stepIndex: Int,
                         algebra: LatentAlgebra) throws -> DeviceTensor {
        try noisedBySigma(original, noise, stepIndex: stepIndex, algebra: algebra)
    }
}
