#if canImport(Glibc)
import Glibc
#endif
import DiffuseCore
import DiffuseGraph

/// FreeU (Si et al., "FreeU: Free Lunch in Diffusion U-Net", 2023), as diffusers'
/// `enable_freeu(s1, s2, b1, b2)`: in the first two up blocks, before each skip joins the hidden
/// state, the first half of the hidden state's channels is scaled by b (the backbone's
/// denoising) and the skip's lowest frequencies by s (its high-frequency detail kept). No
/// weights, no training: a per-channel scale and two thin matmuls per skip joined.
public struct FreeU: Sendable, Hashable, CustomStringConvertible {
    public var s1: Double, s2: Double, b1: Double, b2: Double

    public init(s1: Double, s2: Double, b1: Double, b2: Double) {
        (self.s1, self.s2, self.b1, self.b2) = (s1, s2, b1, b2)
    }

    /// The values diffusers' FreeU docs give for each family (from the FreeU authors).
    public static let stableDiffusion1 = FreeU(s1: 0.9, s2: 0.2, b1: 1.5, b2: 1.6)
    public static let stableDiffusion2 = FreeU(s1: 0.9, s2: 0.2, b1: 1.4, b2: 1.6)
    public static let stableDiffusionXL = FreeU(s1: 0.6, s2: 0.4, b1: 1.1, b2: 1.2)

    public var description: String { "s1 \(s1), s2 \(s2), b1 \(b1), b2 \(b2)" }

    /// diffusers tests the four values for truth (`getattr(self, "s1", None) and …`), so a zero
    /// among them switches FreeU off altogether; kept.
    var isEnabled: Bool { s1 != 0 && s2 != 0 && b1 != 0 && b2 != 0 }

    /// diffusers' `apply_freeu` for up block `resolutionIndex` (only 0 and 1 change anything).
    func callAsFunction(resolutionIndex: Int, hidden: Value, skip: Value) -> (hidden: Value, skip: Value) {
        guard isEnabled, resolutionIndex < 2 else { return (hidden, skip) }
        let (b, s) = resolutionIndex == 0 ? (b1, s1) : (b2, s2)
        let channels = hidden.shape[1], half = channels / 2
        let backbone = Tensor(shape: [1, channels, 1, 1], floats: (0..<channels).map { $0 < half ? Float(b) : 1 })
        let scaled = hidden * hidden.builder.constant(backbone)
        // diffusers scales the hidden state in place: where the skip is that same tensor (a UNet
        // without a mid block joins its last down block's output with itself), it is scaled too.
        return (scaled, Self.fourierFilter(skip.id == hidden.id ? scaled : skip, scale: s))
    }

    /// diffusers' `fourier_filter(x, threshold=1, scale)`: the centred spectrum (fftshift of the
    /// 2-D FFT) times `scale` on its central 2x2 block, transformed back, real part. That block
    /// holds the frequencies {0, −1} on each axis, so the filter is x + (scale − 1)·P x with P
    /// the real part of the projection onto those Fourier modes: rank at most 7, written as
    /// P = E·Eᵀ/(H·W) with E's columns the cosines and sines of the modes. Two small matmuls,
    /// where an FFT would need an op of its own on every backend.
    static func fourierFilter(_ x: Value, scale: Double) -> Value {
        let (n, c, h, w) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3])
        let basis = lowFrequencyBasis(height: h, width: w)
        let rank = basis.count / (h * w)
        let e = x.builder.constant(Tensor(shape: [h * w, rank], floats: basis))
        let flat = x.reshape([n * c, h * w])
        let low = flat.matmul(e).matmul(e, transposeB: true)
        return x + (low * Float((scale - 1) / Double(h * w))).reshape([n, c, h, w])
    }

    /// E, row-major [H·W, r]: for each mode (k_y, k_x) of {0, H−1} × {0, W−1} (one value where the
    /// axis has length 1), cos θ and, unless θ ≡ 0, sin θ at every pixel, θ = 2π(k_y·y/H + k_x·x/W).
    static func lowFrequencyBasis(height h: Int, width w: Int) -> [Float] {
        let ky = Array(Set([0, h - 1])).sorted(), kx = Array(Set([0, w - 1])).sorted()
        var columns: [[Double]] = []
        for a in ky {
            for b in kx {
                let theta = (0..<(h * w)).map { 2 * Double.pi * (Double(a * ($0 / w)) / Double(h) + Double(b * ($0 % w)) / Double(w)) }
                columns.append(theta.map { cos($0) })
                if a != 0 || b != 0 { columns.append(theta.map { sin($0) }) }
            }
        }
        return (0..<(h * w)).flatMap { p in columns.map { Float($0[p]) } }
    }
}
