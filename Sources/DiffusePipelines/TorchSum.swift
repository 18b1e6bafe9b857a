/// torch's float32 sum of a contiguous array as its CPU kernel computes it on one thread with
/// 8-lane (AVX2) vectors: `cascade_sum`'s `vectorized_inner_sum`. Where a result divides by a
/// sum that nearly cancels (lpw's mean restore on states whose mean is near 0), only the same
/// order of additions gives torch's float32 answer; a double-precision sum is more exact and
/// further from it. (AVX-512 builds that run the kernel with 16 lanes round differently.)
enum TorchSum {
    static let lanes = 8

    static func sum(_ x: UnsafeBufferPointer<Float>) -> Float {
        let vectors = x.count / lanes
        func load(_ v: Int) -> SIMD8<Float> { SIMD8<Float>(x[(v * lanes)..<((v + 1) * lanes)]) }
        // row_sum: the vectors as rows of 4 (`ilp_factor`), summed by multi_row_sum.
        let ilp = 4, rows = vectors / ilp
        var partial = multiRowSum(rows: rows, width: ilp) { i, k in load(i * ilp + k) }
        for v in (rows * ilp)..<vectors { partial[0] += load(v) }
        for k in 1..<ilp { partial[0] += partial[k] }
        var total: Float = 0
        for e in (vectors * lanes)..<x.count { total += x[e] }
        for l in 0..<lanes { total += partial[0][l] }
        return total
    }

    /// `multi_row_sum`: `width` running sums over `rows` rows, in four levels of chunks of
    /// 2^max(4, ⌈log2 rows⌉ / 4) rows, so that only partial sums of similar size meet.
    static func multiRowSum(rows: Int, width: Int, _ load: (Int, Int) -> SIMD8<Float>) -> [SIMD8<Float>] {
        let levels = 4
        let ceilLog2 = rows <= 2 ? 1 : Int.bitWidth - (rows - 1).leadingZeroBitCount
        let power = max(4, ceilLog2 / levels), step = 1 << power, mask = step - 1
        var acc = [[SIMD8<Float>]](repeating: [SIMD8<Float>](repeating: .zero, count: width), count: levels)
        var i = 0
        while i + step <= rows {
            for _ in 0..<step {
                for k in 0..<width { acc[0][k] += load(i, k) }
                i += 1
            }
            for j in 1..<levels {
                for k in 0..<width {
                    acc[j][k] += acc[j - 1][k]
                    acc[j - 1][k] = .zero
                }
                if i & (mask << (j * power)) != 0 { break }
            }
        }
        while i < rows {
            for k in 0..<width { acc[0][k] += load(i, k) }
            i += 1
        }
        for j in 1..<levels {
            for k in 0..<width { acc[0][k] += acc[j][k] }
        }
        return acc[0]
    }
}
