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
