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
                    store8(applyEpilogue(epilogue, v, residual.map { $0 + r * n + c }), o + c)
                    c += 8
                }
                while c < n {
                    let v = Float(a[c]) * rowScales[r] * columnScales[c] + (bias?[c] ?? 0)
                    o[c] = applyEpilogue(epilogue, v, residual.map { $0 + r * n + c })
                    c += 1
                }
            }
        }
    }
}

extension Quantize {
    /// A fused epilogue on 8 dequantized values; `residual` points at the 8 to add, if any.
    @inline(__always) static func applyEpilogue(_ ops: [Epilogue], _ x: F8, _ residual: UnsafePointer<Float>?) -> F8 {
        var v = x
        for e in ops {
            switch e {
            case .activation(let u): v = vapply(u, v)
            case .addInput: v += load8(residual!)
            case .scale(let s): v *= F8(repeating: s)
            }
        }
        return v
    }

    /// The same on one value.
    @inline(__always) static func applyEpilogue(_ ops: [Epilogue], _ x: Float, _ residual: UnsafePointer<Float>?) -> Float {
        var v = x
        for e in ops {
            switch e {
            case .activation(let u): v = Float(ScalarMath.apply(u, Double(v)))
            case .addInput: v += residual!.pointee
            case .scale(let s): v *= s
            }
        }
        return v
    }
}

/// Dynamic int8 for convolutions. oneDNN's AVX2 int8 convolution wants u8 sources in NHWC and
/// writes s32 in NHWC (given NCHW-blocked tensors it falls back to a reference kernel), so the
/// activations are quantized and transposed in one pass, and the products dequantized and
/// transposed back into the graph's layout in another. A convolution mixes every channel and
/// pixel, so the activations get one scale and zero point per tensor, from its range; weights
/// are per output channel in 7 bits, as for linears (so u8·s8 pairs cannot saturate).
extension Quantize {
    /// The activation layout of a convolution's input or output: plain NCHW, or nChw8c.
    struct ImageLayout {
        let n: Int, c: Int, h: Int, w: Int
        let blocked: Bool

        /// Offset of element (n, c, y, x).
        @inline(__always) func offset(_ b: Int, _ ch: Int, _ y: Int, _ x: Int) -> Int {
            blocked ? (((b * (c / 8) + ch / 8) * h + y) * w + x) * 8 + ch % 8 : ((b * c + ch) * h + y) * w + x
        }
    }

    /// (min, max) of `count` floats.
    static func range(_ x: UnsafePointer<Float>, count: Int) -> (Float, Float) {
        let parts = max(1, min(Parallel.threads * 4, count / 65536))
        var partial = [(Float, Float)](repeating: (0, 0), count: parts)
        partial.withUnsafeMutableBufferPointer { out in
            let o = out.baseAddress!
            Parallel.forEach(parts) { p in
                let lo = count * p / parts, hi = count * (p + 1) / parts
                var vlo = F8(repeating: .infinity), vhi = F8(repeating: -.infinity)
                var i = lo
                while i + 8 <= hi {
                    let v = load8(x + i)
                    vlo = vlo.replacing(with: v, where: v .< vlo)
                    vhi = vmax(vhi, v)
                    i += 8
                }
                var (a, b) = (vlo.min(), vhi.max())
                while i < hi { a = min(a, x[i]); b = max(b, x[i]); i += 1 }
                o[p] = (a, b)
            }
        }
        return (partial.map(\.0).min() ?? 0, partial.map(\.1).max() ?? 0)
    }

    /// x (NCHW or nChw8c float) into u8 NHWC: x ≈ (q − zeroPoint)·scale over the tensor's own
    /// range (asymmetric, so the mostly non-negative output of a SiLU gets all 256 levels).
    static func imageActivations(_ x: UnsafePointer<Float>, _ l: ImageLayout,
                                 _ q: UnsafeMutablePointer<UInt8>) -> (scale: Float, zeroPoint: Int32) {
        let (lo, hi) = range(x, count: l.n * l.c * l.h * l.w)
        let (a, b) = (min(lo, 0), max(hi, 0))  // 0 stays exact: padding is zeros
        let s: Float = b > a ? (b - a) / 255 : 1
        let zp = min(255, max(0, (-a / s).rounded()))
        let inv = 1 / s
        Parallel.chunks(l.n * l.h, grain: 1) { rows in
            for r in rows {
                let b = r / l.h, y = r % l.h
                if l.blocked {
                    let vinv = F8(repeating: inv), vzp = F8(repeating: zp)
                    let zero = F8(), top = F8(repeating: 255), magic = F8(repeating: 12582912)  // see `activations`
                    for cb in 0..<(l.c / 8) {
                        let src = x + l.offset(b, cb * 8, y, 0)
                        var dst = q + ((b * l.h + y) * l.w) * l.c + cb * 8
                        for px in 0..<l.w {
                            var t = load8(src + px * 8) * vinv + vzp
                            t = vmax(t, zero)
                            t = t.replacing(with: top, where: t .> top) + magic
                            let bytes = SIMD8<UInt8>(truncatingIfNeeded: unsafeBitCast(t, to: SIMD8<UInt32>.self))
                            UnsafeMutableRawPointer(dst).storeBytes(of: bytes, as: SIMD8<UInt8>.self)
                            dst += l.c
                        }
                    }
                } else {
                    for ch in 0..<l.c {
                        let src = x + l.offset(b, ch, y, 0)
                        let dst = q + ((b * l.h + y) * l.w) * l.c + ch
                        for px in 0..<l.w { dst[px * l.c] = UInt8(min(255, max(0, (src[px] * inv).rounded() + zp))) }
                    }
                }
            }
        }
        return (s, Int32(zp))
    }

    /// acc (s32 NHWC) · sx · sw[c] + bias[c], then the epilogue, into y in layout `l` (the
    /// residual, if any, in the same layout).
    static func dequantizeImage(_ acc: UnsafePointer<Int32>, _ l: ImageLayout, scale sx: Float,
                                columnScales: UnsafePointer<Float>, bias: UnsafePointer<Float>?, epilogue: [Epilogue],
                                residual: UnsafePointer<Float>?, _ y: UnsafeMutablePointer<Float>) {
        Parallel.chunks(l.n * l.h, grain: 1) { rows in
            for r in rows {
                let b = r / l.h, row = r % l.h
                let a = acc + ((b * l.h + row) * l.w) * l.c
                if l.blocked {
                    for cb in 0..<(l.c / 8) {
                        let scale = load8(columnScales + cb * 8) * F8(repeating: sx)
                        let bv = bias.map { load8($0 + cb * 8) } ?? F8()
                        let base = l.offset(b, cb * 8, row, 0)
                        for px in 0..<l.w {
                            let ai = UnsafeRawPointer(a + px * l.c + cb * 8).loadUnaligned(as: SIMD8<Int32>.self)
                            let v = SIMD8<Float>(ai) * scale + bv
                            store8(applyEpilogue(epilogue, v, residual.map { $0 + base + px * 8 }), y + base + px * 8)
                        }
                    }
                } else {
                    for ch in 0..<l.c {
                        let scale = columnScales[ch] * sx, bv = bias?[ch] ?? 0
                        let base = l.offset(b, ch, row, 0)
                        for px in 0..<l.w {
                            let v = Float(a[px * l.c + ch]) * scale + bv
                            y[base + px] = applyEpilogue(epilogue, v, residual.map { $0 + base + px })
                        }
                    }
                }
            }
        }
    }
}
