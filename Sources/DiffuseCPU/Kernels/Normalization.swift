import DiffuseCore
import DiffuseGraph

/// GroupNorm, LayerNorm and softmax with float32 statistics that stay accurate when the mean
/// is large against the spread: sums are taken around a per-channel shift (the channel's
/// first value) and combined per group with Chan's parallel-variance formula in Float64.
enum Normalization {
    /// Per-channel (sum, sum of squares) of x − shift over `count` elements at stride 1.
    @inline(__always)
    static func shiftedSums(_ x: UnsafePointer<Float>, _ count: Int, shift: Float) -> (Double, Double) {
        var s1 = 0.0, s2 = 0.0
        let sv = F8(repeating: shift)
        var i = 0
        while i < count {
            // Chunks of 1024 in float lanes, then folded into Float64.
            let end = Swift.min(count, i + 1024)
            var a1 = F8(), a2 = F8()
            while i + 8 <= end {
                let d = load8(x + i) - sv
                a1 += d
                a2 = a2.addingProduct(d, d)
                i += 8
            }
            while i < end { let d = x[i] - shift; s1 += Double(d); s2 += Double(d * d); i += 1 }
            s1 += Double(a1.sum())
            s2 += Double(a2.sum())
        }
        return (s1, s2)
    }

    /// GroupNorm over x [N, C, spatial], plain (NCHW) or blocked nChw8c, with an optional
    /// activation fused into the normalizing pass.
    static func groupNorm(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, n: Int, c: Int, spatial: Int,
                          groups: Int, eps: Float, weight: UnsafePointer<Float>, bias: UnsafePointer<Float>,
                          activation: UnaryOp?, blocked: Bool) {
        // 1. Per channel: mean and M2 (sum of squared deviations from the channel mean).
        let mean = UnsafeMutablePointer<Double>.allocate(capacity: n * c)
        let m2 = UnsafeMutablePointer<Double>.allocate(capacity: n * c)
        defer { mean.deallocate(); m2.deallocate() }
        let cnt = Double(spatial)
        if blocked {
            let blocks = c / 8
            Parallel.forEach(n * blocks) { t in
                let base = x + t * spatial * 8
                let shift = load8(base)
                var s1 = SIMD8<Double>(), s2 = SIMD8<Double>()
                var p = 0
                while p < spatial {
                    let end = Swift.min(spatial, p + 512)
                    var a1 = F8(), a2 = F8()
                    while p < end {
                        let d = load8(base + p * 8) - shift
                        a1 += d
                        a2 = a2.addingProduct(d, d)
                        p += 1
                    }
                    s1 += SIMD8<Double>(a1)
                    s2 += SIMD8<Double>(a2)
                }
                let shiftD = SIMD8<Double>(shift)
                for l in 0..<8 {
                    let ch = t * 8 + l  // = ni * c + cb * 8 + l
                    mean[ch] = shiftD[l] + s1[l] / cnt
                    m2[ch] = s2[l] - s1[l] * s1[l] / cnt
                }
            }
        } else {
            Parallel.forEach(n * c) { t in
                let base = x + t * spatial
                let shift = base[0]
                let (s1, s2) = shiftedSums(base, spatial, shift: shift)
                mean[t] = Double(shift) + s1 / cnt
                m2[t] = s2 - s1 * s1 / cnt
            }
        }
        // 2. Per group: combine channels; per channel: the affine map y = a·x + b.
        let cg = c / groups
        let scale = UnsafeMutablePointer<Float>.allocate(capacity: n * c)
        let shift = UnsafeMutablePointer<Float>.allocate(capacity: n * c)
        defer { scale.deallocate(); shift.deallocate() }
        for ni in 0..<n {
            for g in 0..<groups {
                let first = ni * c + g * cg
                var mu = 0.0
                for k in 0..<cg { mu += mean[first + k] }
                mu /= Double(cg)
                var total = 0.0
                for k in 0..<cg { let d = mean[first + k] - mu; total += m2[first + k] + cnt * d * d }
                let inv = 1 / (total / (cnt * Double(cg)) + Double(eps)).squareRoot()
                for k in 0..<cg {
                    let ch = g * cg + k
                    let a = inv * Double(weight[ch])
                    scale[first + k] = Float(a)
                    shift[first + k] = Float(Double(bias[ch]) - mu * a)
                }
            }
        }
        // 3. Normalize (and activate).
        if blocked {
            let blocks = c / 8
            Parallel.forEach(n * blocks) { t in
                let a = load8(scale + t * 8), b = load8(shift + t * 8)
                let src = x + t * spatial * 8, dst = y + t * spatial * 8
                if let act = activation {
                    if act == .silu {
                        for p in 0..<spatial { store8(vsilu(b.addingProduct(load8(src + p * 8), a)), dst + p * 8) }
                    } else {
                        for p in 0..<spatial { store8(vapply(act, b.addingProduct(load8(src + p * 8), a)), dst + p * 8) }
                    }
                } else {
                    for p in 0..<spatial { store8(b.addingProduct(load8(src + p * 8), a), dst + p * 8) }
                }
            }
        } else {
            Parallel.forEach(n * c) { t in
                affineRow(x + t * spatial, y + t * spatial, spatial, scale[t], shift[t], activation)
            }
        }
    }

    /// y = act(a·x + b) over a contiguous run.
    @inline(__always)
    static func affineRow(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, _ count: Int, _ a: Float, _ b: Float,
                          _ activation: UnaryOp?) {
        let av = F8(repeating: a), bv = F8(repeating: b)
        var i = 0
        if let act = activation {
            if act == .silu {
                while i + 8 <= count { store8(vsilu(bv.addingProduct(load8(x + i), av)), y + i); i += 8 }
            } else {
                while i + 8 <= count { store8(vapply(act, bv.addingProduct(load8(x + i), av)), y + i); i += 8 }
            }
            if i < count { storePartial(vapply(act, bv.addingProduct(loadPartial(x + i, count - i), av)), y + i, count - i) }
        } else {
            while i + 8 <= count { store8(bv.addingProduct(load8(x + i), av), y + i); i += 8 }
            while i < count { y[i] = x[i] * a + b; i += 1 }
        }
    }

    /// LayerNorm over rows of `d`.
    static func layerNorm(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, rows: Int, d: Int, eps: Float,
                          weight: UnsafePointer<Float>, bias: UnsafePointer<Float>) {
        Parallel.chunks(rows, grain: max(1, 8192 / d)) { r in
            for row in r {
                let src = x + row * d, dst = y + row * d
                let (s1, s2) = shiftedSums(src, d, shift: src[0])
                let mu = Double(src[0]) + s1 / Double(d)
                let variance = Swift.max(0, (s2 - s1 * s1 / Double(d)) / Double(d))
                let inv = Float(1 / (variance + Double(eps)).squareRoot())
                let m = F8(repeating: Float(mu)), iv = F8(repeating: inv)
                var i = 0
                while i + 8 <= d {
                    let normalized = (load8(src + i) - m) * iv
                    store8(load8(bias + i).addingProduct(normalized, load8(weight + i)), dst + i)
                    i += 8
                }
                while i < d { dst[i] = (src[i] - Float(mu)) * inv * weight[i] + bias[i]; i += 1 }
            }
        }
    }

    /// Softmax over rows of `d`.
    static func softmax(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, rows: Int, d: Int) {
        Parallel.chunks(rows, grain: max(1, 8192 / d)) { r in
            for row in r { softmaxRow(x + row * d, y + row * d, d) }
        }
    }

    @inline(__always)
    static func softmaxRow(_ src: UnsafePointer<Float>, _ dst: UnsafeMutablePointer<Float>, _ d: Int) {
        var mv = F8(repeating: -.infinity)
        var i = 0
        while i + 8 <= d { mv = vmax(mv, load8(src + i)); i += 8 }
        var m = mv.max()
        while i < d { m = Swift.max(m, src[i]); i += 1 }
        let m8 = F8(repeating: m)
        var sv = F8()
        i = 0
        while i + 8 <= d { let e = vexp(load8(src + i) - m8); store8(e, dst + i); sv += e; i += 8 }
        var s = sv.sum()
        if i < d {
            let e = vexp(loadPartial(src + i, d - i) - m8)
            for k in 0..<(d - i) { dst[i + k] = e[k]; s += e[k] }
        }
        let inv = F8(repeating: 1 / s)
        i = 0
        while i + 8 <= d { store8(load8(dst + i) * inv, dst + i); i += 8 }
        while i < d { dst[i] *= 1 / s; i += 1 }
    }
}
