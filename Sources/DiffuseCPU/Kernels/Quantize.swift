import DiffuseCore
import DiffuseGraph

/// Dynamic int8 quantization for oneDNN's u8·s8 matrix products.
///
/// Activations: each row scaled by max|x|/127 and shifted by 128 into u8 (the matmul subtracts
/// the 128 as its source zero point). Weights: each output channel scaled by max|w|/63 into
/// 7-bit s8. On AVX2 without VNNI the products are summed in pairs in 16-bit lanes before
/// widening; with 7-bit weights the largest pair, 2·255·63, still fits, so nothing saturates.
enum Quantize {
    static let weightLevels: Float = 63

    /// Per-channel weight quantization of w [N, K] (torch layout): s8 values and scales [N].
    static func weights(_ w: Tensor) -> (values: Tensor, scales: [Float]) {
        let (n, k) = (w.shape[0], w.shape[1])
        let q = Tensor(zeros: [n, k], dtype: .int8)
        var scales = [Float](repeating: 0, count: n)
        let src = w.floats, dst = q.pointer(as: Int8.self)
        for r in 0..<n {
            var m: Float = 0
            for c in 0..<k { m = max(m, abs(src[r * k + c])) }
            let s = m > 0 ? m / weightLevels : 1
            scales[r] = s
            for c in 0..<k { dst[r * k + c] = Int8((src[r * k + c] / s).rounded()) }
        }
        return (q, scales)
    }

    /// Rows of x [M, K] into u8 with zero point 128; the per-row scales go to `scales`.
    static func activations(_ x: UnsafePointer<Float>, rows: Int, k: Int, _ q: UnsafeMutablePointer<UInt8>,
                            _ scales: UnsafeMutablePointer<Float>) {
        Parallel.chunks(rows, grain: max(1, 8192 / k)) { range in
            for r in range {
                let row = x + r * k, out = q + r * k
                var mv = F8()
                var i = 0
                while i + 8 <= k { let v = load8(row + i); mv = vmax(mv, vmax(v, -v)); i += 8 }
                var m = mv.max()
                while i < k { m = max(m, abs(row[i])); i += 1 }
                let s: Float = m > 0 ? m / 127 : 1
                scales[r] = s
                let inv = F8(repeating: 1 / s)
                // x/s + 128 + 1.5·2²³ rounds to the nearest integer in the low mantissa bits.
                let magic = F8(repeating: 12582912 + 128)
                i = 0
                while i + 8 <= k {
                    let t = load8(row + i) * inv + magic
                    let bits = unsafeBitCast(t, to: SIMD8<UInt32>.self)
                    let b = SIMD8<UInt8>(truncatingIfNeeded: bits)
                    UnsafeMutableRawPointer(out + i).storeBytes(of: b, as: SIMD8<UInt8>.self)
                    i += 8
                }
                while i < k { out[i] = UInt8(min(255, max(1, (row[i] / s).rounded() + 128))); i += 1 }
            }
        }
    }

    /// y[r][n] = acc[r][n]·sx[r]·sw[n] + bias[n], then the epilogue (activation, residual, scale).
    static func dequantize(_ acc: UnsafePointer<Int32>, rows: Int, n: Int, rowScales: UnsafePointer<Float>,
                           columnScales: UnsafePointer<Float>, bias: UnsafePointer<Float>?, epilogue: [Epilogue],
                           residual: UnsafePointer<Float>?, _ y: UnsafeMutablePointer<Float>) {
        Parallel.chunks(rows, grain: max(1, 8192 / n)) { range in
            for r in range {
                let a = acc + r * n, o = y + r * n
                let sx = F8(repeating: rowScales[r])
                var c = 0
                while c + 8 <= n {
                    let ai = UnsafeRawPointer(a + c).loadUnaligned(as: SIMD8<Int32>.self)
                    var v = SIMD8<Float>(ai) * sx * load8(columnScales + c)
                    if let bias { v += load8(bias + c) }
                    for e in epilogue {
                        switch e {
                        case .activation(let u): v = vapply(u, v)
                        case .addInput: v += load8(residual! + r * n + c)
                        case .scale(let s): v *= F8(repeating: s)
                        }
                    }
                    store8(v, o + c)
                    c += 8
                }
                while c < n {
                    var v = Float(a[c]) * rowScales[r] * columnScales[c] + (bias?[c] ?? 0)
                    for e in epilogue {
                        switch e {
                        case .activation(let u): v = Float(ScalarMath.apply(u, Double(v)))
                        case .addInput: v += residual![r * n + c]
                        case .scale(let s): v *= s
                        }
                    }
                    o[c] = v
                    c += 1
                }
            }
        }
    }
}
