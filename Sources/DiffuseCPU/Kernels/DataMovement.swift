import DiffuseCore
import DiffuseGraph

/// Kernels that move data without arithmetic (and the small index-based ops).
enum DataMovement {
    /// Nearest 2x upsampling of planes [P][H][W] (plain) or [P][H][W][8] (blocked, `lanes` 8).
    static func upsample2x(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, planes: Int, h: Int, w: Int, lanes: Int) {
        Parallel.forEach(planes * h) { t in
            let p = t / h, row = t % h
            let src = x + (p * h + row) * w * lanes
            let dst0 = y + (p * 2 * h + 2 * row) * 2 * w * lanes
            if lanes == 8 {
                for i in 0..<w {
                    let v = load8(src + i * 8)
                    store8(v, dst0 + 2 * i * 8)
                    store8(v, dst0 + (2 * i + 1) * 8)
                }
            } else {
                for i in 0..<w { let v = src[i]; dst0[2 * i] = v; dst0[2 * i + 1] = v }
            }
            (dst0 + 2 * w * lanes).update(from: dst0, count: 2 * w * lanes)
        }
    }

    /// Bilinear resize of planes [P][inH][inW] to [P][h][w] with precomputed taps, rows in
    /// parallel; the arithmetic order is ATen's (each source row along the width, then the two
    /// rows).
    static func resizeBilinear(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, planes: Int, inH: Int, inW: Int,
                               rows ty: BilinearTaps, columns tx: BilinearTaps) {
        let (h, w) = (ty.index0.count, tx.index0.count)
        Parallel.chunks(planes * h, grain: max(1, 4096 / max(w, 1))) { r in
            for t in r {
                let p = t / h, row = t % h
                let r0 = x + (p * inH + Int(ty.index0[row])) * inW, r1 = x + (p * inH + Int(ty.index1[row])) * inW
                let (l0, l1) = (ty.lambda0[row], ty.lambda1[row])
                let dst = y + t * w
                for i in 0..<w {
                    let (c0, c1) = (Int(tx.index0[i]), Int(tx.index1[i]))
                    let (w0, w1) = (tx.lambda0[i], tx.lambda1[i])
                    dst[i] = (r0[c0] * w0 + r0[c1] * w1) * l0 + (r1[c0] * w0 + r1[c1] * w1) * l1
                }
            }
        }
    }

    /// Max pooling of planes [P][H][W] without padding (NaN wins, as in torch).
    static func maxPool2d(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, planes: Int, h: Int, w: Int,
                          kernel: [Int], stride: [Int]) {
        let oh = (h - kernel[0]) / stride[0] + 1, ow = (w - kernel[1]) / stride[1] + 1
        Parallel.chunks(planes * oh, grain: max(1, 4096 / max(ow * kernel[0] * kernel[1], 1))) { r in
            for t in r {
                let p = t / oh, row = t % oh
                let top = x + (p * h + row * stride[0]) * w
                let dst = y + t * ow
                for i in 0..<ow {
                    var m = -Float.infinity
                    for a in 0..<kernel[0] {
                        let line = top + a * w + i * stride[1]
                        for b in 0..<kernel[1] where line[b] > m || line[b].isNaN { m = line[b] }
                    }
                    dst[i] = m
                }
            }
        }
    }

    /// Concatenation along an axis: per outer index, each part's inner block in turn.
    static func concat(_ parts: [(UnsafePointer<Float>, Int)], _ y: UnsafeMutablePointer<Float>, outer: Int) {
        let rowSize = parts.reduce(0) { $0 + $1.1 }
        Parallel.chunks(outer, grain: max(1, 16384 / max(rowSize, 1))) { r in
            for o in r {
                var dst = y + o * rowSize
                for (src, inner) in parts {
                    dst.update(from: src + o * inner, count: inner)
                    dst += inner
                }
            }
        }
    }

    /// A slice along an axis: `outer` rows of `length·inner` taken at `start·inner` from rows of `axisSize·inner`.
    static func slice(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, outer: Int, axisSize: Int, start: Int,
                      length: Int, inner: Int) {
        Parallel.chunks(outer, grain: max(1, 16384 / max(length * inner, 1))) { r in
            for o in r { (y + o * length * inner).update(from: x + (o * axisSize + start) * inner, count: length * inner) }
        }
    }

    /// General permutation. Dimensions that stay adjacent are merged; when the innermost
    /// input dimension stays innermost the copy runs in contiguous runs, otherwise it is a
    /// batch of 2-D transposes done in 8x8 tiles (the common NCHW<->NHWC case).
    static func permute(_ x: UnsafePointer<Float>, _ shape: [Int], _ perm: [Int], _ y: UnsafeMutablePointer<Float>) {
        // Merge runs of input dims that remain consecutive in the output.
        var groups: [[Int]] = []
        for d in perm {
            if var last = groups.last, last.last! + 1 == d { last.append(d); groups[groups.count - 1] = last } else { groups.append([d]) }
        }
        let gOrder = groups.map { $0[0] }  // output order of groups, named by first input dim
        let inGroups = groups.sorted { $0[0] < $1[0] }
        let inSizes = inGroups.map { $0.reduce(1) { $0 * shape[$1] } }
        let outPerm = gOrder.map { g in inGroups.firstIndex { $0[0] == g }! }
        let n = inSizes.count
        if n == 1 { y.update(from: x, count: inSizes[0]); return }
        let inStrides = DiffuseGraph.strides(inSizes)
        let outShape = outPerm.map { inSizes[$0] }
        let total = inSizes.reduce(1, *)

        if outPerm.last == n - 1 {
            // The innermost input group stays innermost: contiguous runs.
            let run = inSizes[n - 1]
            let outerShape = Array(outShape.dropLast())
            let outerStrides = outPerm.dropLast().map { inStrides[$0] }
            Parallel.chunks(total / run, grain: max(1, 16384 / run)) { r in
                for o in r {
                    var rem = o, off = 0
                    for d in stride(from: outerShape.count - 1, through: 0, by: -1) {
                        off += (rem % outerShape[d]) * outerStrides[d]
                        rem /= outerShape[d]
                    }
                    (y + o * run).update(from: x + off, count: run)
                }
            }
            return
        }
        if n >= 2, outPerm[n - 1] == n - 2, outPerm[n - 2] == n - 1, Array(outPerm.prefix(n - 2)) == Array(0..<(n - 2)) {
            // A batch of transposes of the last two groups: [B][R][C] -> [B][C][R].
            let rows = inSizes[n - 2], cols = inSizes[n - 1]
            let batch = total / (rows * cols)
            let tilesR = (rows + 31) / 32, tilesC = (cols + 31) / 32
            Parallel.forEach(batch * tilesR * tilesC) { t in
                let b = t / (tilesR * tilesC)
                let tr = (t / tilesC) % tilesR, tc = t % tilesC
                let src = x + b * rows * cols, dst = y + b * rows * cols
                for r in (tr * 32)..<min(rows, tr * 32 + 32) {
                    for c in (tc * 32)..<min(cols, tc * 32 + 32) { dst[c * rows + r] = src[r * cols + c] }
                }
            }
            return
        }
        // Anything else: index arithmetic per element.
        let outStrides = DiffuseGraph.strides(outShape)
        let srcStrides = outPerm.map { inStrides[$0] }
        Parallel.chunks(total, grain: 16384) { r in
            for i in r {
                var rem = i, off = 0
                for d in 0..<n { off += (rem / outStrides[d]) * srcStrides[d]; rem %= outStrides[d] }
                y[i] = x[off]
            }
        }
    }

    /// Rows of `table` [rows][d] picked by integer ids (int32 or int64).
    static func embedding(ids: UnsafeRawPointer, idType: DType, count: Int, table: UnsafePointer<Float>, rows: Int, d: Int,
                          _ y: UnsafeMutablePointer<Float>) throws {
        for i in 0..<count {
            let id: Int
            switch idType {
            case .int64: id = Int(ids.load(fromByteOffset: i * 8, as: Int64.self))
            case .int32: id = Int(ids.load(fromByteOffset: i * 4, as: Int32.self))
            default: id = Int(ids.load(fromByteOffset: i * 4, as: Float.self))
            }
            guard id >= 0 && id < rows else { throw BackendError("embedding: id \(id) outside the table of \(rows) rows") }
            (y + i * d).update(from: table + id * d, count: d)
        }
    }

    static func timestepEmbedding(_ t: UnsafePointer<Float>, count: Int, _ a: TimestepEmbeddingAttributes,
                                  _ y: UnsafeMutablePointer<Float>) {
        for i in 0..<count {
            let e = ScalarMath.timestepEmbedding(t[i], a)
            (y + i * a.dim).update(from: e, count: a.dim)
        }
    }

    /// Reduction over `axes` of a row-major tensor (the reduced dims kept as size 1).
    static func reduce(_ op: ReduceOp, _ x: UnsafePointer<Float>, _ shape: [Int], axes: [Int], _ y: UnsafeMutablePointer<Float>) {
        let outShape = shape.enumerated().map { axes.contains($0.offset) ? 1 : $0.element }
        let outCount = outShape.reduce(1, *)
        let n = Double(axes.reduce(1) { $0 * shape[$1] })
        let inStrides = DiffuseGraph.strides(shape), outStrides = DiffuseGraph.strides(outShape)
        var acc = [Double](repeating: op == .max ? -.infinity : 0, count: outCount)
        let total = shape.reduce(1, *)
        for i in 0..<total {
            var rem = i, o = 0
            for d in 0..<shape.count {
                let idx = rem / inStrides[d]
                rem %= inStrides[d]
                if !axes.contains(d) { o += idx * outStrides[d] }
            }
            acc[o] = op == .max ? max(acc[o], Double(x[i])) : acc[o] + Double(x[i])
        }
        for o in 0..<outCount { y[o] = Float(op == .mean ? acc[o] / n : acc[o]) }
    }
}
