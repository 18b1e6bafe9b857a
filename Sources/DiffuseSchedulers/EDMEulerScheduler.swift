#if canImport(Glibc)
import Glibc
#endif
import DiffuseGraph

/// The noise levels and preconditioning of EDM (Karras et al., "Elucidating the Design Space of
/// Diffusion-Based Generative Models"), as diffusers' EDM schedulers share them: models trained
/// this way (Playground v2.5) see c_in·x and c_noise = ¼·log σ as their timestep, and their
/// output becomes x̂₀ = c_skip·x + c_out·F.
struct EDMSchedule {
    enum SigmaSchedule: String, CaseIterable { case karras, exponential }

    let sigmaMin: Double, sigmaMax: Double, sigmaData: Double, rho: Double
    let sigmaSchedule: SigmaSchedule
    let predictionType: PredictionType

    init(_ r: ConfigReader) throws {
        sigmaMin = try r.double("sigma_min", 0.002)
        sigmaMax = try r.double("sigma_max", 80)
        sigmaData = try r.double("sigma_data", 0.5)
        rho = try r.double("rho", 7)
        guard sigmaMin > 0 && sigmaMax > sigmaMin else {
            throw r.invalid("sigma_min", "\(sigmaMin) with sigma_max \(sigmaMax)", "0 < sigma_min < sigma_max")
        }
        sigmaSchedule = try r.choice("sigma_schedule", .karras)
        // diffusers' EDM preconditioning has no form for a model that predicts the sample.
        predictionType = try r.choice("prediction_type", .epsilon, allowed: [.epsilon, .vPrediction])
    }

    /// `n` noise levels from σ_max down to σ_min, in float32 as diffusers keeps them:
    /// Karras' ρ-spacing, or evenly spaced in log σ.
    func sigmas(count n: Int) -> [Double] {
        let ramp = n == 1 ? [0.0] : (0..<n).map { Double($0) / Double(n - 1) }
        switch sigmaSchedule {
        case .karras:
            let lo = pow(sigmaMin, 1 / rho), hi = pow(sigmaMax, 1 / rho)
            return ramp.map { Double(Float(pow(hi + $0 * (lo - hi), rho))) }
        case .exponential:
            let lo = log(sigmaMin), hi = log(sigmaMax)
            return ramp.reversed().map { Double(Float(exp(lo + $0 * (hi - lo)))) }
        }
    }

    /// c_noise: the timestep the model sees.
    func timestep(_ sigma: Double) -> Double { Double(Float(0.25 * log(sigma))) }

    /// c_in = 1/√(σ² + σ_data²).
    func inputScale(_ sigma: Double) -> Double { 1 / (sigma * sigma + sigmaData * sigmaData).squareRoot() }

    /// x̂₀ = c_skip·x + c_out·F (c_out negated for v-prediction).
    func denoised(_ x: LinearCombination, _ output: LinearCombination, sigma: Double) -> LinearCombination {
        let d2 = sigmaData * sigmaData, s2 = sigma * sigma
        let cOut = sigma * sigmaData / (s2 + d2).squareRoot()
        return (d2 / (s2 + d2)) * x + (predictionType == .vPrediction ? -cOut : cOut) * output
    }

    /// √(σ_max² + 1), diffusers' `init_noise_sigma` for both EDM schedulers.
    var initNoiseSigma: Double { (sigmaMax * sigmaMax + 1).squareRoot() }
}

/// diffusers' `EDMEulerScheduler`: Euler steps of dx/dσ = (x − x̂₀)/σ over EDM's noise levels,
/// with EDM's preconditioning (for EDM-trained models such as Playground v2.5). Without churn
/// (diffusers' default `s_churn` 0) it draws no noise.
public final class EDMEulerScheduler: Scheduler {
    public let className = "EDMEulerScheduler"
    public let order = 1
    /// EDM models have no discrete training schedule.
    public let alphasCumprod: [Double] = []
    public private(set) var timesteps: [Double] = []
    public private(set) var sigmas: [Double] = []
    public var initNoiseSigma: Double { edm.initNoiseSigma }

    private let edm: EDMSchedule
    private let finalSigmasType: FinalSigmasType

    public init(config: SchedulerConfig) throws {
        let r = config.reader(className)
        edm = try EDMSchedule(r)
        finalSigmasType = try r.choice("final_sigmas_type", .zero)
    }

    public func setTimesteps(_ numInferenceSteps: Int) throws {
        guard numInferenceSteps >= 1 else {
            throw SchedulerError.invalidStepCount(className: className, steps: numInferenceSteps, detail: "at least 1 is needed")
        }
        let s = edm.sigmas(count: numInferenceSteps)
        timesteps = s.map(edm.timestep)
        sigmas = s + [finalSigmasType == .zero ? 0 : s[s.count - 1]]
    }

    public func setBeginIndex(_ index: Int) {}

    public func modelInputScale(stepIndex: Int) throws -> Double {
        try checkStep(self, stepIndex)
        return edm.inputScale(sigmas[stepIndex])
    }

    public func step(modelOutput: DeviceTensor, stepIndex: Int, sample: DeviceTensor, algebra: LatentAlgebra,
                     noise: () throws -> DeviceTensor) throws -> SchedulerStepOutput {
        try checkStep(self, stepIndex)
        let sigma = sigmas[stepIndex], dt = sigmas[stepIndex + 1] - sigma
        let x = LinearCombination(sample)
        let denoised = edm.denoised(x, LinearCombination(modelOutput), sigma: sigma)
        // x + dt·(x − x̂₀)/σ
        let prev = x + (dt / sigma) * (x - denoised)
        return SchedulerStepOutput(prevSample: try prev.evaluate(algebra), predOriginalSample: try denoised.evaluate(algebra))
    }

    public func addNoise(original: DeviceTensor, noise: DeviceTensor, stepIndex: Int,
                         algebra: LatentAlgebra) throws -> DeviceTensor {
        try noisedBySigma(original, noise, stepIndex: stepIndex, algebra: algebra)
    }
}
