import DiffuseCore
import DiffuseGraph

/// Elementwise kernels on contiguous float32 buffers. Each splits its range over the cores;
/// below ~16K elements the split costs more than it saves, so small tensors run inline.
enum Elementwise {
    static let grain = 1 << 14

    /// `y = op(x)`; x and y may be the same buffer.
    static func unary(_ op: UnaryOp, _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, count: Int) {
        Parallel.chunks(count, grain: grain) { r in
            var i = r.lowerBound
            switch op {  // one loop per op keeps the switch out of the inner loop
            case .silu: while i + 8 <= r.upperBound { store8(vsilu(load8(x + i)), y + i); i += 8 }
            case .gelu: while i + 8 <= r.upperBound { store8(vgelu(load8(x + i)), y + i); i += 8 }
            case .quickGelu: while i + 8 <= r.upperBound { store8(vquickGelu(load8(x + i)), y + i); i += 8 }
            default: while i + 8 <= r.upperBound { store8(vapply(op, load8(x + i)), y + i); i += 8 }
            }
            if i < r.upperBound {
                let n = r.upperBound - i
                storePartial(vapply(op, loadPartial(x + i, n)), y + i, n)
            }
        }
    }

    /// `y = x·scale + shift`.
    static func affine(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, count: Int, scale: Float, shift: Float) {
        let s = F8(repeating: scale), t = F8(repeating: shift)
        Parallel.chunks(count, grain: grain) { r in
            var i = r.lowerBound
            while i + 8 <= r.upperBound { store8(t.addingProduct(load8(x + i), s), y + i); i += 8 }
            while i < r.upperBound { y[i] = x[i] * scale + shift; i += 1 }
        }
    }

    static func clamp(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, count: Int, lo: Float, hi: Float) {
        let l = F8(repeating: lo), h = F8(repeating: hi)
        Parallel.chunks(count, grain: grain) { r in
            var i = r.lowerBound
            while i + 8 <= r.upperBound { store8(vmin(vmax(load8(x + i), l), h), y + i); i += 8 }
            while i < r.upperBound { y[i] = Swift.min(Swift.max(x[i], lo), hi); i += 1 }
        }
    }

    @inline(__always) static func apply(_ op: BinaryOp, _ a: F8, _ b: F8) -> F8 {
        switch op {
        case .add: return a + b
        case .sub: return a - b
        case .mul: return a * b
        case .div: return a / b
        }
    }

    @inline(__always) static func apply(_ op: BinaryOp, _ a: Float, _ b: Float) -> Float {
        switch op {
        case .add: return a + b
        case .sub: return a - b
        case .mul: return a * b
        case .div: return a / b
        }
    }

    /// A run of `count` elements where each operand is contiguous (stride 1) or constant (stride 0).
    @inline(__always)
    static func run(_ op: BinaryOp, _ a: UnsafePointer<Float>, _ sa: Int, _ b: UnsafePointer<Float>, _ sb: Int,
                    _ y: UnsafeMutablePointer<Float>, _ count: Int) {
        var i = 0
        switch (sa, sb) {
        case (1, 1):
            switch op {
            case .add: while i + 8 <= count { store8(load8(a + i) + load8(b + i), y + i); i += 8 }
            case .mul: while i + 8 <= count { store8(load8(a + i) * load8(b + i), y + i); i += 8 }
            default: while i + 8 <= count { store8(apply(op, load8(a + i), load8(b + i)), y + i); i += 8 }
            }
        case (1, 0):
            let bv = F8(repeating: b[0])
            while i + 8 <= count { store8(apply(op, load8(a + i), bv), y + i); i += 8 }
        case (0, 1):
            let av = F8(repeating: a[0])
            while i + 8 <= count { store8(apply(op, av, load8(b + i)), y + i); i += 8 }
        default: break
        }
        while i < count { y[i] = apply(op, a[i * sa], b[i * sb]); i += 1 }
    }

    /// `y = a op b` with numpy broadcasting, all buffers row-major. Dimensions are merged so
    /// the inner loop is one long run in which each operand is contiguous or constant.
    static func binary(_ op: BinaryOp, _ a: UnsafePointer<Float>, _ aShape: [Int], _ b: UnsafePointer<Float>, _ bShape: [Int],
                       _ y: UnsafeMutablePointer<Float>, _ shape: [Int]) {
        let total = shape.reduce(1, *)
        if aShape == bShape {
            Parallel.chunks(total, grain: grain) { r in
                run(op, a + r.lowerBound, 1, b + r.lowerBound, 1, y + r.lowerBound, r.count)
            }
            return
        }
        // Broadcast strides (0 where the operand has size 1).
        func bstrides(_ s: [Int]) -> [Int] {
            let full = [Int](repeating: 1, count: shape.count - s.count) + s
            return zip(DiffuseGraph.strides(full), full).map { $1 == 1 ? 0 : $0 }
        }
        var dims: [(n: Int, sa: Int, sb: Int)] = []
        for (d, (x, z)) in zip(shape, zip(bstrides(aShape), bstrides(bShape))) where d != 1 { dims.append((d, x, z)) }
        // Merge a dimension into the next inner one when both operands continue contiguously.
        var merged: [(n: Int, sa: Int, sb: Int)] = []
        for d in dims {
            if let last = merged.last, last.sa == d.sa * d.n, last.sb == d.sb * d.n {
                merged[merged.count - 1] = (last.n * d.n, d.sa, d.sb)
            } else {
                merged.append(d)
            }
        }
        guard let inner = merged.last else { y[0] = apply(op, a[0], b[0]); return }
        // Size-1 output dims were dropped, so the innermost run's strides are 0 or 1.
        let outer = Array(merged.dropLast())
        let outerCount = outer.reduce(1) { $0 * $1.n }
        Parallel.chunks(outerCount, grain: max(1, grain / inner.n)) { r in
            for o in r {
                var rem = o, oa = 0, ob = 0
                for d in outer.reversed() {
                    let idx = rem % d.n
                    rem /= d.n
                    oa += idx * d.sa
                    ob += idx * d.sb
                }
                run(op, a + oa, inner.sa, b + ob, inner.sb, y + o * inner.n, inner.n)
            }
        }
    }

    /// `y = a op b` where a is blocked nChw8c [N][C/8][HW][8] and b holds one value per
    /// (n, c) (shape [N,C,1,1], or [1,C,1,1] when `bBatchStride` is 0).
    static func channelBroadcastBlocked(_ op: BinaryOp, _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, bBatchStride: Int,
                                        _ y: UnsafeMutablePointer<Float>, n: Int, c: Int, hw: Int) {
        let blocks = c / 8
        Parallel.forEach(n * blocks) { t in
            let ni = t / blocks, cb = t % blocks
            let bv = load8(b + ni * bBatchStride + cb * 8)
            let base = t * hw * 8
            for p in 0..<hw { store8(apply(op, load8(a + base + p * 8), bv), y + base + p * 8) }
        }
    }

    /// `y = Σ cᵢ·xᵢ` in one pass (the scheduler's latent update).
    static func linearCombination(_ terms: [(Float, UnsafePointer<Float>)], _ y: UnsafeMutablePointer<Float>, count: Int) {
        Parallel.chunks(count, grain: grain) { r in
            var i = r.lowerBound
            while i + 8 <= r.upperBound {
                var acc = F8(repeating: terms[0].0) * load8(terms[0].1 + i)
                for t in terms.dropFirst() { acc = acc.addingProduct(F8(repeating: t.0), load8(t.1 + i)) }
                store8(acc, y + i)
                i += 8
            }
            while i < r.upperBound {
                var acc = terms[0].0 * terms[0].1[i]
                for t in terms.dropFirst() { acc += t.0 * t.1[i] }
                y[i] = acc
                i += 1
            }
        }
    }

    /// diffusers' GEGLU: rows of 2d → d, `h · gelu(gate)` with [h, gate] the two halves.
    static func geglu(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, rows: Int, d: Int) {
        Parallel.chunks(rows, grain: max(1, grain / d)) { r in
            for row in r {
                let h = x + row * 2 * d, g = h + d, o = y + row * d
                var i = 0
                while i + 8 <= d { store8(load8(h + i) * vgelu(load8(g + i)), o + i); i += 8 }
                if i < d {
                    let n = d - i
                    storePartial(loadPartial(h + i, n) * vgelu(loadPartial(g + i, n)), o + i, n)
                }
            }
        }
    }
}
