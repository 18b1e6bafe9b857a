import DiffuseCore
import DiffuseGraph

/// Scaled dot-product attention on token-major tensors: q [B,Sq,·], k/v [B,Sk,·] with head h
/// at columns h·d ..< (h+1)·d of each row (`stride` apart), output [B,Sq,H·dv].
///
/// The fused path is flash-style: per (batch, head, block of 96 queries) it walks blocks of
/// 256 keys, keeping a running max and sum per query (online softmax), so the scores in memory
/// at once are one 96×256 tile per thread, never Sq×Sk. K is packed once, transposed in panels
/// of 16 keys ([Sk/16][d][16], so the score kernel reads one contiguous panel rather than
/// striding a whole row of keys per step, which mapped every load to one L1 set), and V is
/// padded, so the two inner products run as 6×16 register-blocked FMA micro-kernels: twelve
/// independent accumulators keep both FMA pipes busy through their 4-cycle latency.
struct AttentionProblem {
    var q: UnsafePointer<Float>, qStride: Int
    var k: UnsafePointer<Float>, kStride: Int
    var v: UnsafePointer<Float>, vStride: Int
    var out: UnsafeMutablePointer<Float>
    var batch: Int, heads: Int, sq: Int, sk: Int, dqk: Int, dv: Int
    var scale: Float
    var causal: Bool
}

enum Attention {
    static let blockQ = 96
    static let blockK = 256
    /// Query rows per micro-kernel call; row blocks are padded to a multiple of it.
    static let rowBlock = 6

    @inline(__always) static func roundUp(_ x: Int, _ m: Int) -> Int { (x + m - 1) / m * m }

    /// Bytes of scratch `run` needs (packed K and V, per-thread tiles).
    static func scratchBytes(_ p: AttentionProblem, _ impl: AttentionImplementation) -> Int {
        let skPad = roundUp(p.sk, 16), dvPad = roundUp(p.dv, 8)
        let packed = p.batch * p.heads * (p.dqk * skPad + skPad * dvPad)
        let rowsAtOnce: Int
        switch impl {
        case .fused: rowsAtOnce = blockQ
        case .math: rowsAtOnce = roundUp(p.sq, rowBlock)
        case .sliced(let n): rowsAtOnce = roundUp(max(1, n), rowBlock)
        }
        let tileCols = impl == .fused ? blockK : skPad
        let perThread = rowsAtOnce * (p.dqk + tileCols + dvPad + 2)
        return (packed + Parallel.threads * perThread) * 4 + 64 * (Parallel.threads + 2)
    }

    static func run(_ p: AttentionProblem, _ impl: AttentionImplementation, scratch: UnsafeMutableRawPointer) {
        let skPad = roundUp(p.sk, 16), dvPad = roundUp(p.dv, 8)
        let kt = scratch.assumingMemoryBound(to: Float.self)            // [B,H][skPad/16][dqk][16]
        let vp = kt + p.batch * p.heads * p.dqk * skPad                  // [B,H][skPad][dvPad]
        let threadScratch = vp + p.batch * p.heads * skPad * dvPad
        pack(p, kt, vp, skPad: skPad, dvPad: dvPad)

        let rowsAtOnce: Int, tileCols: Int
        switch impl {
        case .fused: rowsAtOnce = blockQ; tileCols = blockK
        case .math: rowsAtOnce = roundUp(p.sq, rowBlock); tileCols = skPad
        case .sliced(let n): rowsAtOnce = roundUp(max(1, n), rowBlock); tileCols = skPad
        }
        let perThread = rowsAtOnce * (p.dqk + tileCols + dvPad + 2) + 16
        let qBlocks = (p.sq + rowsAtOnce - 1) / rowsAtOnce
        Parallel.forEach(p.batch * p.heads * qBlocks) { task in
            let bh = task / qBlocks
            let q0 = (task % qBlocks) * rowsAtOnce
            let base = threadScratch + Parallel.threadIndex * perThread
            let qTile = base                                  // [rows][dqk], pre-scaled
            let sTile = qTile + rowsAtOnce * p.dqk             // [rows][tileCols]
            let oTile = sTile + rowsAtOnce * tileCols          // [rows][dvPad]
            let mRow = oTile + rowsAtOnce * dvPad
            let lRow = mRow + rowsAtOnce
            block(p, bh: bh, q0: q0, rows: rowsAtOnce, tileCols: tileCols,
                  kt: kt + bh * p.dqk * skPad, vp: vp + bh * skPad * dvPad, skPad: skPad, dvPad: dvPad,
                  qTile: qTile, sTile: sTile, oTile: oTile, m: mRow, l: lRow)
        }
    }

    /// Packs Kᵀ in 16-key panels [skPad/16][dqk][16] and V [skPad][dvPad] per (batch, head), zero-padded.
    static func pack(_ p: AttentionProblem, _ kt: UnsafeMutablePointer<Float>, _ vp: UnsafeMutablePointer<Float>,
                     skPad: Int, dvPad: Int) {
        Parallel.forEach(p.batch * p.heads) { bh in
            let b = bh / p.heads, h = bh % p.heads
            let ktb = kt + bh * p.dqk * skPad, vpb = vp + bh * skPad * dvPad
            for j in 0..<skPad {
                if j < p.sk {
                    let krow = p.k + (b * p.sk + j) * p.kStride + h * p.dqk
                    let panel = ktb + (j / 16) * p.dqk * 16 + j % 16
                    for d in 0..<p.dqk { panel[d * 16] = krow[d] }
                    let vrow = p.v + (b * p.sk + j) * p.vStride + h * p.dv
                    let dst = vpb + j * dvPad
                    dst.update(from: vrow, count: p.dv)
                    for d in p.dv..<dvPad { dst[d] = 0 }
                } else {
                    let panel = ktb + (j / 16) * p.dqk * 16 + j % 16
                    for d in 0..<p.dqk { panel[d * 16] = 0 }
                    for d in 0..<dvPad { vpb[j * dvPad + d] = 0 }
                }
            }
        }
    }

    /// One block of query rows against all keys, `tileCols` keys at a time.
    static func block(_ p: AttentionProblem, bh: Int, q0: Int, rows: Int, tileCols: Int,
                      kt: UnsafePointer<Float>, vp: UnsafePointer<Float>, skPad: Int, dvPad: Int,
                      qTile: UnsafeMutablePointer<Float>, sTile: UnsafeMutablePointer<Float>,
                      oTile: UnsafeMutablePointer<Float>, m: UnsafeMutablePointer<Float>, l: UnsafeMutablePointer<Float>) {
        let b = bh / p.heads, h = bh % p.heads
        let validRows = min(rows, p.sq - q0)
        // Gather and pre-scale the query rows; rows past the end are zero.
        for r in 0..<rows {
            let dst = qTile + r * p.dqk
            if r < validRows {
                let src = p.q + (b * p.sq + q0 + r) * p.qStride + h * p.dqk
                for d in 0..<p.dqk { dst[d] = src[d] * p.scale }
            } else {
                dst.initialize(repeating: 0, count: p.dqk)
            }
        }
        oTile.initialize(repeating: 0, count: rows * dvPad)
        m.initialize(repeating: -.infinity, count: rows)
        l.initialize(repeating: 0, count: rows)

        // With a causal mask, keys past the block's last query contribute nothing.
        let keyEnd = p.causal ? min(skPad, roundUp(q0 + validRows, 16)) : skPad
        var k0 = 0
        while k0 < keyEnd {
            let kn = min(tileCols, keyEnd - k0)
            scores(qTile, p.dqk, kt + k0 * p.dqk, sTile, tileCols, rows: rows, cols: kn)
            // Online softmax over this tile.
            for r in 0..<rows {
                let s = sTile + r * tileCols
                let limit = p.causal ? min(p.sk, q0 + r + 1) : p.sk  // keys ≥ limit are masked
                let valid = max(0, min(kn, limit - k0))
                var maxv = F8(repeating: -.infinity)
                var j0 = 0
                while j0 + 8 <= valid { maxv = vmax(maxv, load8(s + j0)); j0 += 8 }
                var tileMax = maxv.max()
                while j0 < valid { tileMax = max(tileMax, s[j0]); j0 += 1 }
                let newMax = max(m[r], tileMax)
                if newMax == -.infinity {  // the whole row is masked so far
                    for j in 0..<kn { s[j] = 0 }
                    continue
                }
                let correction = m[r] == -.infinity ? 0 : expf1(m[r] - newMax)
                let mv = F8(repeating: newMax)
                var sum = F8()
                var j = 0
                while j + 8 <= valid { let e = vexp(load8(s + j) - mv); store8(e, s + j); sum += e; j += 8 }
                var total = sum.sum()
                while j < valid { let e = expf1(s[j] - newMax); s[j] = e; total += e; j += 1 }
                for jj in valid..<kn { s[jj] = 0 }
                l[r] = l[r] * correction + total
                m[r] = newMax
                if correction != 1 {
                    let o = oTile + r * dvPad
                    let cv = F8(repeating: correction)
                    var d = 0
                    while d < dvPad { store8(load8(o + d) * cv, o + d); d += 8 }
                }
            }
            accumulate(sTile, tileCols, vp + k0 * dvPad, dvPad, oTile, rows: rows, keys: kn)
            k0 += kn
        }
        // Normalize and scatter the valid rows into the token-major output.
        for r in 0..<validRows {
            let inv = l[r] > 0 ? 1 / l[r] : 0
            let src = oTile + r * dvPad
            let dst = p.out + (b * p.sq + q0 + r) * (p.heads * p.dv) + h * p.dv
            for d in 0..<p.dv { dst[d] = src[d] * inv }
        }
    }

    @inline(__always) static func expf1(_ x: Float) -> Float { vexp(F8(repeating: x))[0] }

    /// S[rows][cols] = Q[rows][d] · Kᵀ (Kᵀ in 16-key panels [cols/16][d][16], S row stride `lds`).
    /// rows is a multiple of 6 and cols of 16.
    static func scores(_ q: UnsafePointer<Float>, _ d: Int, _ kt: UnsafePointer<Float>,
                       _ s: UnsafeMutablePointer<Float>, _ lds: Int, rows: Int, cols: Int) {
        // Panels outermost: one 16-key panel (d·16 floats) stays in L1 while every row group
        // passes over it; the query tile (rows·d floats) is L1-resident too.
        var c = 0
        while c < cols {
            let panel = kt + c * d
            var r = 0
            while r < rows {
                let q0 = q + r * d, q1 = q0 + d, q2 = q1 + d, q3 = q2 + d, q4 = q3 + d, q5 = q4 + d
                var a00 = F8(), a01 = F8(), a10 = F8(), a11 = F8(), a20 = F8(), a21 = F8()
                var a30 = F8(), a31 = F8(), a40 = F8(), a41 = F8(), a50 = F8(), a51 = F8()
                var kp = panel
                for t in 0..<d {
                    let b0 = load8(kp), b1 = load8(kp + 8)
                    var x = F8(repeating: q0[t]); a00 = a00.addingProduct(x, b0); a01 = a01.addingProduct(x, b1)
                    x = F8(repeating: q1[t]); a10 = a10.addingProduct(x, b0); a11 = a11.addingProduct(x, b1)
                    x = F8(repeating: q2[t]); a20 = a20.addingProduct(x, b0); a21 = a21.addingProduct(x, b1)
                    x = F8(repeating: q3[t]); a30 = a30.addingProduct(x, b0); a31 = a31.addingProduct(x, b1)
                    x = F8(repeating: q4[t]); a40 = a40.addingProduct(x, b0); a41 = a41.addingProduct(x, b1)
                    x = F8(repeating: q5[t]); a50 = a50.addingProduct(x, b0); a51 = a51.addingProduct(x, b1)
                    kp += 16
                }
                let o = s + r * lds + c
                store8(a00, o); store8(a01, o + 8)
                store8(a10, o + lds); store8(a11, o + lds + 8)
                store8(a20, o + 2 * lds); store8(a21, o + 2 * lds + 8)
                store8(a30, o + 3 * lds); store8(a31, o + 3 * lds + 8)
                store8(a40, o + 4 * lds); store8(a41, o + 4 * lds + 8)
                store8(a50, o + 5 * lds); store8(a51, o + 5 * lds + 8)
                r += 6
            }
            c += 16
        }
    }

    /// O[rows][dv] += P[rows][keys] · V[keys][dv] (P row stride `ldp`, V and O row stride `dv`,
    /// a multiple of 8). rows is a multiple of 6.
    static func accumulate(_ p: UnsafePointer<Float>, _ ldp: Int, _ v: UnsafePointer<Float>, _ dv: Int,
                           _ o: UnsafeMutablePointer<Float>, rows: Int, keys: Int) {
        var r = 0
        while r < rows {
            let p0 = p + r * ldp, p1 = p0 + ldp, p2 = p1 + ldp, p3 = p2 + ldp, p4 = p3 + ldp, p5 = p4 + ldp
            let o0 = o + r * dv, o1 = o0 + dv, o2 = o1 + dv, o3 = o2 + dv, o4 = o3 + dv, o5 = o4 + dv
            var c = 0
            while c + 16 <= dv {
                var a00 = load8(o0 + c), a01 = load8(o0 + c + 8), a10 = load8(o1 + c), a11 = load8(o1 + c + 8)
                var a20 = load8(o2 + c), a21 = load8(o2 + c + 8), a30 = load8(o3 + c), a31 = load8(o3 + c + 8)
                var a40 = load8(o4 + c), a41 = load8(o4 + c + 8), a50 = load8(o5 + c), a51 = load8(o5 + c + 8)
                var vptr = v + c
                for j in 0..<keys {
                    let b0 = load8(vptr), b1 = load8(vptr + 8)
                    var x = F8(repeating: p0[j]); a00 = a00.addingProduct(x, b0); a01 = a01.addingProduct(x, b1)
                    x = F8(repeating: p1[j]); a10 = a10.addingProduct(x, b0); a11 = a11.addingProduct(x, b1)
                    x = F8(repeating: p2[j]); a20 = a20.addingProduct(x, b0); a21 = a21.addingProduct(x, b1)
                    x = F8(repeating: p3[j]); a30 = a30.addingProduct(x, b0); a31 = a31.addingProduct(x, b1)
                    x = F8(repeating: p4[j]); a40 = a40.addingProduct(x, b0); a41 = a41.addingProduct(x, b1)
                    x = F8(repeating: p5[j]); a50 = a50.addingProduct(x, b0); a51 = a51.addingProduct(x, b1)
                    vptr += dv
                }
                store8(a00, o0 + c); store8(a01, o0 + c + 8); store8(a10, o1 + c); store8(a11, o1 + c + 8)
                store8(a20, o2 + c); store8(a21, o2 + c + 8); store8(a30, o3 + c); store8(a31, o3 + c + 8)
                store8(a40, o4 + c); store8(a41, o4 + c + 8); store8(a50, o5 + c); store8(a51, o5 + c + 8)
                c += 16
            }
            if c < dv {  // an 8-wide tail (head dim 40)
                var a0 = load8(o0 + c), a1 = load8(o1 + c), a2 = load8(o2 + c)
                var a3 = load8(o3 + c), a4 = load8(o4 + c), a5 = load8(o5 + c)
                var vptr = v + c
                for j in 0..<keys {
                    let b0 = load8(vptr)
                    a0 = a0.addingProduct(F8(repeating: p0[j]), b0)
                    a1 = a1.addingProduct(F8(repeating: p1[j]), b0)
                    a2 = a2.addingProduct(F8(repeating: p2[j]), b0)
                    a3 = a3.addingProduct(F8(repeating: p3[j]), b0)
                    a4 = a4.addingProduct(F8(repeating: p4[j]), b0)
                    a5 = a5.addingProduct(F8(repeating: p5[j]), b0)
                    vptr += dv
                }
                store8(a0, o0 + c); store8(a1, o1 + c); store8(a2, o2 + c)
                store8(a3, o3 + c); store8(a4, o4 + c); store8(a5, o5 + c)
            }
            r += 6
        }
    }
}
