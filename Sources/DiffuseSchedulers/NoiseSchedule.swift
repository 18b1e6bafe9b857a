#if canImport(Glibc)
import Glibc
#endif

enum BetaSchedule: String, CaseIterable {
    case linear
    case scaledLinear = "scaled_linear"
    case squaredcosCapV2 = "squaredcos_cap_v2"
}

enum PredictionType: String, CaseIterable {
    case epsilon
    case sample
    case vPrediction = "v_prediction"
}

enum TimestepSpacing: String, CaseIterable {
    case leading, linspace, trailing
}

enum FinalSigmasType: String, CaseIterable {
    case zero
    case sigmaMin = "sigma_min"
}

/// The training noise schedule every class builds the same way: betas → ᾱ = cumprod(1 - β).
/// The values are float32, computed as diffusers' torch code computes them, so everything derived
/// from them (timesteps found from sigmas, the per-step coefficients) matches diffusers closely.
struct NoiseSchedule {
    let numTrainTimesteps: Int
    let betaSchedule: BetaSchedule
    let alphasCumprod: [Float]

    /// Reads `num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule`, `trained_betas` and,
    /// for classes that have it, `rescale_betas_zero_snr`.
    /// - terminalAlphaFloor: the sigma-based classes set ᾱ[T-1] = 2⁻²⁴ after a zero-SNR rescale
    ///   so that the last sigma stays finite.
    init(_ r: ConfigReader, betaStart: Double, betaEnd: Double, betaSchedule: BetaSchedule,
         hasRescale: Bool = true, terminalAlphaFloor: Bool = false) throws {
        let n = try r.int("num_train_timesteps", 1000)
        guard n >= 2 else { throw r.unsupported("num_train_timesteps", "\(n)", supported: ["at least 2"]) }
        numTrainTimesteps = n
        self.betaSchedule = try r.choice("beta_schedule", betaSchedule)
        var betas: [Float]
        if let trained = try r.doubles("trained_betas") {
            guard trained.count == n else {
                throw r.invalid("trained_betas", "a list of \(trained.count) values", "a list of num_train_timesteps (\(n)) betas")
            }
            betas = trained.map { Float($0) }
        } else {
            let start = try r.double("beta_start", betaStart), end = try r.double("beta_end", betaEnd)
            switch self.betaSchedule {
            case .linear:
                betas = NoiseSchedule.torchLinspace(start, end, n)
            case .scaledLinear:
                betas = NoiseSchedule.torchLinspace(start.squareRoot(), end.squareRoot(), n).map { $0 * $0 }
            case .squaredcosCapV2:
                betas = NoiseSchedule.betasForAlphaBar(n)
            }
        }
        let rescale = hasRescale ? try r.bool("rescale_betas_zero_snr", false) : false
        if rescale { betas = NoiseSchedule.rescaleZeroTerminalSNR(betas) }
        var ac = NoiseSchedule.cumprod(betas.map { 1 - $0 })
        if rescale && terminalAlphaFloor { ac[n - 1] = 0x1p-24 }
        alphasCumprod = ac
    }

    /// One past the last timestep the DPM-Solvers schedule: timesteps whose λ = log(α/σ) is
    /// below `lambda_min_clipped` are never used (for cosine schedules), as diffusers'
    /// `searchsorted` of the flipped float32 λ finds.
    func lastTimestep(lambdaMinClipped: Double) -> Int {
        let lambdas = alphasCumprod.map { ac -> Float in
            let alpha = ac.squareRoot(), sigma = (1 - ac).squareRoot()
            return Float(log(Double(alpha))) - Float(log(Double(sigma)))
        }
        return numTrainTimesteps - (lambdas.reversed().firstIndex { Double($0) >= lambdaMinClipped } ?? numTrainTimesteps)
    }

    /// `torch.linspace(start, end, steps, dtype=float32)` on the CPU: the first half counts up from
    /// `start`, the second half down from `end`, each value one fused multiply-add in float.
    static func torchLinspace(_ start: Double, _ end: Double, _ steps: Int) -> [Float] {
        let s = Float(start), e = Float(end)
        if steps == 1 { return [s] }
        let step = (e - s) / Float(steps - 1)
        return (0..<steps).map { i in
            i < steps / 2 ? s.addingProduct(step, Float(i)) : e.addingProduct(-step, Float(steps - i - 1))
        }
    }

    /// `torch.cumprod` on the CPU: accumulated in double, each partial product stored as float.
    static func cumprod(_ x: [Float]) -> [Float] {
        var acc = 1.0
        return x.map { v in
            acc *= Double(v)
            return Float(acc)
        }
    }

    /// diffusers' `betas_for_alpha_bar` with the cosine ᾱ(t) of "squaredcos_cap_v2" (in double, then float).
    static func betasForAlphaBar(_ n: Int, maxBeta: Double = 0.999) -> [Float] {
        func alphaBar(_ t: Double) -> Double {
            let c = cos((t + 0.008) / 1.008 * Double.pi / 2)
            return c * c
        }
        return (0..<n).map { i in
            let t1 = Double(i) / Double(n), t2 = Double(i + 1) / Double(n)
            return Float(min(1 - alphaBar(t2) / alphaBar(t1), maxBeta))
        }
    }

    /// diffusers' `rescale_zero_terminal_snr` (arXiv 2305.08891, Algorithm 1) in float32: shifts and
    /// scales √ᾱ so the last timestep has zero signal and the first keeps its value.
    static func rescaleZeroTerminalSNR(_ betas: [Float]) -> [Float] {
        var sqrtAc = cumprod(betas.map { 1 - $0 }).map { $0.squareRoot() }
        let first = sqrtAc[0], last = sqrtAc[sqrtAc.count - 1]
        let scale = first / (first - last)
        sqrtAc = sqrtAc.map { ($0 - last) * scale }
        let ac = sqrtAc.map { $0 * $0 }
        var alphas = [ac[0]]
        for i in 1..<ac.count { alphas.append(ac[i] / ac[i - 1]) }
        return alphas.map { 1 - $0 }
    }

    /// ((1 - ᾱ)/ᾱ)^½ per training timestep, in float32 as torch computes it.
    var trainingSigmas: [Float] {
        alphasCumprod.map { ((1 - $0) / $0).squareRoot() }
    }
}

/// The numpy arithmetic diffusers' `set_timesteps` uses, in double precision like numpy.
enum NumPy {
    /// `np.linspace(start, stop, num, endpoint=...)`: `i·step + start`, the endpoint exact.
    static func linspace(_ start: Double, _ stop: Double, _ num: Int, endpoint: Bool = true) -> [Double] {
        guard num > 0 else { return [] }
        let div = endpoint ? num - 1 : num
        var y: [Double]
        if div > 0 {
            let step = (stop - start) / Double(div)
            y = (0..<num).map { Double($0) * step + start }
        } else {
            y = (0..<num).map { Double($0) * (stop - start) + start }
        }
        if endpoint && num > 1 { y[num - 1] = stop }
        return y
    }

    /// `np.arange(start, stop, step)` for floats: ⌈(stop-start)/step⌉ values `start + i·δ`, with
    /// δ = (start + step) - start as numpy's fill computes it.
    static func arange(_ start: Double, _ stop: Double, _ step: Double) -> [Double] {
        let length = Int(((stop - start) / step).rounded(.up))
        guard length > 0 else { return [] }
        let delta = (start + step) - start
        return (0..<length).map { i in i == 0 ? start : i == 1 ? start + step : start + Double(i) * delta }
    }

    /// The integer timesteps of DDIM's and DDPM's `set_timesteps`, by `timestep_spacing`.
    static func integerTimesteps(_ n: Int, trainSteps steps: Int, spacing: TimestepSpacing, stepsOffset: Int) -> [Double] {
        switch spacing {
        case .linspace: return linspace(0, Double(steps - 1), n).map(round).reversed()
        case .leading: return (0..<n).reversed().map { Double($0 * (steps / n) + stepsOffset) }
        case .trailing: return arange(Double(steps), 0, -Double(steps) / Double(n)).map { round($0) - 1 }
        }
    }

    /// The integer timesteps of the multistep solvers' `set_timesteps` (DPM-Solver, UniPC, DEIS):
    /// n of n + 1 evenly spaced below `last` (the training steps, or fewer where λ is clipped).
    static func multistepTimesteps(_ n: Int, last: Int, trainSteps steps: Int, spacing: TimestepSpacing,
                                   stepsOffset: Int) -> [Double] {
        switch spacing {
        case .linspace: return linspace(0, Double(last - 1), n + 1).map(round).reversed().dropLast()
        case .leading: return (0...n).reversed().dropLast().map { Double($0 * (last / (n + 1)) + stepsOffset) }
        case .trailing: return arange(Double(last), 0, -Double(steps) / Double(n)).map { round($0) - 1 }
        }
    }

    /// `np.round`: halves go to the even neighbour.
    static func round(_ x: Double) -> Double { x.rounded(.toNearestOrEven) }

    /// `np.interp(x, np.arange(len(fp)), fp)`.
    static func interp(_ x: Double, _ fp: [Double]) -> Double {
        let n = fp.count
        if x.isNaN { return x }
        if x <= 0 { return fp[0] }
        if x >= Double(n - 1) { return fp[n - 1] }
        let j = Int(x)  // xp[j] <= x < xp[j+1]
        if Double(j) == x { return fp[j] }
        let slope = fp[j + 1] - fp[j]  // xp steps by 1
        let y = slope * (x - Double(j)) + fp[j]
        return y.isNaN ? slope * (x - Double(j + 1)) + fp[j + 1] : y
    }
}

/// Sigma-space helpers shared by Euler, DPM-Solver and UniPC.
enum Sigmas {
    /// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma, interpolated
    /// linearly in `logSigmas` (float32, increasing), equals log σ. The bracket width is a
    /// float32 difference, as numpy computes it from the float32 array.
    static func sigmaToT(_ sigma: Double, logSigmas: [Float]) -> Double {
        let logSigma = log(max(sigma, 1e-10))
        var low = 0
        for (i, l) in logSigmas.enumerated() where logSigma - Double(l) >= 0 { low = i }
        low = min(low, logSigmas.count - 2)
        let lo = logSigmas[low], hi = logSigmas[low + 1]
        let w = min(max((Double(lo) - logSigma) / Double(lo - hi), 0), 1)
        return (1 - w) * Double(low) + w * Double(low + 1)
    }

    /// `_sigma_to_t` of a float32 sigma: the log and the interpolation weight are float32. A
    /// torch sigma (the two-stage classes' midpoints: numpy hands the 0-dim tensor back to torch)
    /// weighs the two indices in float32 too; a numpy one (custom sigmas) in float64, as numpy
    /// promotes float32 × int64.
    static func sigmaToTFloat32(_ sigma: Double, logSigmas: [Float], numpy: Bool = false) -> Double {
        let logSigma = logf(max(Float(sigma), 1e-10))
        var low = 0
        for (i, l) in logSigmas.enumerated() where logSigma - l >= 0 { low = i }
        low = min(low, logSigmas.count - 2)
        let lo = logSigmas[low], hi = logSigmas[low + 1]
        let w = min(max((lo - logSigma) / (lo - hi), 0), 1)
        return numpy ? Double(1 - w) * Double(low) + Double(w) * Double(low + 1) : Double((1 - w) * Float(low) + w * Float(low + 1))
    }

    /// Karras et al. (2022) sigmas: ρ = 7 interpolation between σ_max and σ_min.
    static func karras(sigmaMin: Double, sigmaMax: Double, count: Int) -> [Double] {
        let rho = 7.0
        let minInvRho = pow(sigmaMin, 1 / rho), maxInvRho = pow(sigmaMax, 1 / rho)
        return NumPy.linspace(0, 1, count).map { pow(maxInvRho + $0 * (minInvRho - maxInvRho), rho) }
    }

    /// Sigmas evenly spaced in log space from σ_max down to σ_min.
    static func exponential(sigmaMin: Double, sigmaMax: Double, count: Int) -> [Double] {
        NumPy.linspace(log(sigmaMax), log(sigmaMin), count).map { exp($0) }
    }

    /// `np.log` of the float32 training sigmas.
    static func logSigmas(_ sigmas: [Float]) -> [Float] {
        sigmas.map { Float(log(Double($0))) }
    }
}

extension Sigmas {
    /// The float32 timesteps of the sigma-based classes' `set_timesteps` (Euler, Heun, DPM2, LMS),
    /// spaced by `timestep_spacing` over `steps` training timesteps.
    /// With `float32` false, numpy's float64 values (DPMSolverSDEScheduler's `dtype=float`).
    static func spacedTimesteps(_ n: Int, trainSteps steps: Int, spacing: TimestepSpacing, stepsOffset: Int,
                                float32: Bool = true) -> [Double] {
        let rounded: (Double) -> Double = float32 ? { Double(Float($0)) } : { $0 }
        switch spacing {
        case .linspace:
            return NumPy.linspace(0, Double(steps - 1), n).reversed().map(rounded)
        case .leading:
            let ratio = steps / n
            return (0..<n).reversed().map { rounded(Double($0 * ratio) + Double(stepsOffset)) }
        case .trailing:
            return NumPy.arange(Double(steps), 0, -Double(steps) / Double(n)).map { rounded(NumPy.round($0) - 1) }
        }
    }
}

/// The sigma re-spacings the k-diffusion classes share: `use_karras_sigmas` (Karras et al.'s ρ = 7)
/// or `use_exponential_sigmas` (even in log σ), between the ends of the interpolated sigmas or the
/// config's `sigma_min`/`sigma_max`.
struct SigmaRespacing {
    enum Kind { case none, karras, exponential }
    let kind: Kind
    private let sigmaMin: Double?
    private let sigmaMax: Double?
    /// LMS's Karras sigmas ignore `sigma_min`/`sigma_max` (its own `_convert_to_karras`).
    private let karrasHonoursRange: Bool

    init(_ r: ConfigReader, karrasHonoursRange: Bool = true) throws {
        let karras = try r.bool("use_karras_sigmas", false), exponential = try r.bool("use_exponential_sigmas", false)
        try r.requireOff("use_beta_sigmas", because: "beta-distribution sigmas are not implemented")
        if karras && exponential {
            throw r.unsupported("use_exponential_sigmas", "true together with use_karras_sigmas = true",
                                supported: ["at most one of use_karras_sigmas, use_exponential_sigmas"])
        }
        kind = karras ? .karras : exponential ? .exponential : .none
        // Not init arguments of every class, but diffusers reads them when a config carries them.
        sigmaMin = try r.optionalDouble("sigma_min")
        sigmaMax = try r.optionalDouble("sigma_max")
        self.karrasHonoursRange = karrasHonoursRange
    }

    /// The config key that asks for the re-spacing, nil for none: diffusers refuses custom
    /// timesteps with it.
    var configKey: String? {
        switch kind {
        case .none: return nil
        case .karras: return "use_karras_sigmas"
        case .exponential: return "use_exponential_sigmas"
        }
    }

    /// `count` re-spaced sigmas from `interpolated` (high to low), with the fractional training
    /// timesteps they fall on; nil when the config asks for none.
    func respace(_ interpolated: [Double], count: Int, training: [Float]) -> (sigmas: [Double], timesteps: [Double])? {
        let honoursRange = kind == .exponential || karrasHonoursRange
        let lo = (honoursRange ? sigmaMin : nil) ?? interpolated[interpolated.count - 1]
        let hi = (honoursRange ? sigmaMax : nil) ?? interpolated[0]
        let s: [Double]
        switch kind {
        case .none: return nil
        case .karras: s = Sigmas.karras(sigmaMin: lo, sigmaMax: hi, count: count)
        case .exponential: s = Sigmas.exponential(sigmaMin: lo, sigmaMax: hi, count: count)
        }
        let logSigmas = Sigmas.logSigmas(training)
        return (s, s.map { Sigmas.sigmaToT($0, logSigmas: logSigmas) })
    }
}

/// The schedule Heun, DPM2 and LMS start from: float32 timesteps by spacing, the training sigmas
/// interpolated at them (or re-spaced), and a final 0, all as diffusers computes them.
struct DiscreteSigmaSchedule {
    let schedule: NoiseSchedule
    let timestepSpacing: TimestepSpacing
    let stepsOffset: Int
    let respacing: SigmaRespacing

    init(_ r: ConfigReader, schedule: NoiseSchedule, karrasHonoursRange: Bool = true) throws {
        self.schedule = schedule
        timestepSpacing = try r.choice("timestep_spacing", .linspace)
        stepsOffset = try r.int("steps_offset", 0)
        respacing = try SigmaRespacing(r, karrasHonoursRange: karrasHonoursRange)
    }

    /// n timesteps and n + 1 float32 sigmas (the last 0); re-spaced timesteps keep their fractions.
    func make(_ n: Int, className: String) throws -> (timesteps: [Double], sigmas: [Double]) {
        let (ts, s) = try makeFloat64(n, className: className, float32Timesteps: true)
        return (ts, (s + [0]).map { Double(Float($0)) })
    }

    /// n timesteps and the n sigmas before their float32 rounding (no final 0). Spaced timesteps
    /// are float32 unless `float32Timesteps` is false (DPMSolverSDEScheduler keeps numpy's float64).
    func makeFloat64(_ n: Int, className: String, float32Timesteps: Bool) throws -> (timesteps: [Double], sigmas: [Double]) {
        let steps = schedule.numTrainTimesteps
        guard n >= 1 else { throw SchedulerError.invalidStepCount(className: className, steps: n, detail: "at least 1 is needed") }
        guard n <= steps else {
            throw SchedulerError.invalidStepCount(className: className, steps: n, detail: "at most num_train_timesteps (\(steps))")
        }
        var ts = Sigmas.spacedTimesteps(n, trainSteps: steps, spacing: timestepSpacing, stepsOffset: stepsOffset,
                                        float32: float32Timesteps)
        let training = schedule.trainingSigmas
        let fp = training.map(Double.init)
        var s = ts.map { NumPy.interp($0, fp) }
        if let respaced = respacing.respace(s, count: n, training: training) { (s, ts) = (respaced.sigmas, respaced.timesteps) }
        return (ts, s)
    }

    /// `make` for timesteps given outright (diffusers' `timesteps=`, refused with re-spaced sigmas
    /// as diffusers refuses it): float32, the training sigmas interpolated at them, a final 0.
    func make(_ custom: CustomSchedule, className: String) throws -> (timesteps: [Double], sigmas: [Double]) {
        let ts = try custom.checkedTimesteps(className, trainSteps: schedule.numTrainTimesteps, refusing: respacing.configKey)
            .map { Double(Float($0)) }
        let fp = schedule.trainingSigmas.map(Double.init)
        return (ts, (ts.map { NumPy.interp($0, fp) } + [0]).map { Double(Float($0)) })
    }

    /// The sigmas before `setTimesteps` (all training sigmas, high to low, then 0), which give
    /// `init_noise_sigma` as diffusers' initial schedule does.
    var untimedSigmas: [Double] { schedule.trainingSigmas.reversed().map(Double.init) + [0] }

    /// DPM2's interleaved timesteps: the first main timestep, then for each later step k the
    /// midpoint timestep (inverted from `midpoints[k − 1]`, a float32 sigma) and the main one.
    /// Re-spaced timesteps stay float64 in diffusers (Karras's rounded); spaced ones are float32.
    func interleavedTimesteps(_ ts: [Double], midpoints: [Double]) -> [Double] {
        let main = respacing.kind == .karras ? ts.map(NumPy.round) : ts
        let logSigmas = Sigmas.logSigmas(schedule.trainingSigmas)
        let all = [main[0]] + (1..<ts.count).flatMap { [Sigmas.sigmaToTFloat32(midpoints[$0 - 1], logSigmas: logSigmas), main[$0]] }
        return respacing.kind == .none ? all.map { Double(Float($0)) } : all
    }

    /// diffusers' `init_noise_sigma` of these classes: the largest sigma, or √(σ²+1) of it for
    /// "leading" spacing.
    func initNoiseSigma(_ sigmas: [Double]) -> Double {
        let maxSigma = sigmas.max() ?? 0
        return timestepSpacing == .leading ? (maxSigma * maxSigma + 1).squareRoot() : maxSigma
    }
}

extension PredictionType {
    /// x̂₀ in the sigma parameterisation x = x₀ + σ·ε of the k-diffusion classes (the model sees
    /// x/√(σ²+1)): from ε, from v (c_out·v + c_skip·x), or the output itself.
    func originalSample(sigma: Double, sample x: LinearCombination, output m: LinearCombination) -> LinearCombination {
        switch self {
        case .epsilon: return x - sigma * m
        case .vPrediction: return (-sigma / (sigma * sigma + 1).squareRoot()) * m + x / (sigma * sigma + 1)
        case .sample: return m
        }
    }
}

extension PredictionType {
    /// x̂₀ and ε̂ in the form x = α·x₀ + σ·ε (α = √ᾱ, σ = √(1−ᾱ)) the DDPM-family classes use.
    func originalAndEpsilon(alpha: Double, sigma: Double, sample x: LinearCombination,
                            output m: LinearCombination) -> (original: LinearCombination, epsilon: LinearCombination) {
        switch self {
        case .epsilon: return ((x - sigma * m) / alpha, m)
        case .sample: return (m, (x - alpha * m) / sigma)
        case .vPrediction: return (alpha * x - sigma * m, alpha * m + sigma * x)
        }
    }
}

extension Sigmas {
    /// `scale_model_input` of the sigma-based classes: 1/√(σ²+1).
    static func inputScale(_ sigma: Double) -> Double { 1 / (sigma * sigma + 1).squareRoot() }
}
