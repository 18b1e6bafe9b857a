import DiffuseCore
import DiffuseGraph

/// Dynamically quantized linear layers on the GPU (`Quantization.dynamicInt8` and `.fp8`, marked
/// by `GraphPasses.quantizeLinears`), as diffusers' dynamic-quantization recipe computes them:
///
///     y[m, n] = (Σₖ qx[m, k] · qw[n, k]) · sx[m] · sw[n] + bias[n], then the epilogue ops
///
/// - weights quantized once per output channel on the host (sw[n] = max |w[n]| / L) and kept
///   on the device per ModelWeights, so graphs of every shape share them;
/// - activations quantized per row on every run (sx[m] = max |x[m]| / L) by one kernel;
/// - the products by cuBLASLt on tensor cores: int8 × int8 → int32 (IMMA, sm_75+) or
///   E4M3 × E4M3 → float32 (sm_89+);
/// - one kernel that dequantizes, adds the bias and applies the epilogue.
///
/// L is 127 for int8 (symmetric, -128 unused) and 448 for E4M3 (its largest finite value).
///
/// cuBLASLt runs both only in the "TN" layout, which is ours: its A is our weight [N, K] read
/// transposed, its B our activations [M, K]. Its int8 kernels want K and N multiples of 4,
/// its fp8 kernels K and N multiples of 16 with 16-byte aligned pointers, so K and N are
/// padded to 16 with zeros: padded weight columns meet padded activation columns (zero
/// products) and padded weight rows give output columns nobody reads. Every layer therefore
/// runs quantized; one falls back to the float path only when cuBLASLt offers no algorithm
/// for it (an old cuBLASLt, say), with a warning.
///
/// Everything is prepared at build time; `run` queues kernels and matmuls only, so quantized
/// layers can be captured into a CUDA graph. Rows go in chunks that fit `scratchBudget`
/// (quantized rows, their scales and the product share the executable's scratch buffer).
enum QuantizedLinear {
    /// The largest level: values are scaled so max |x| maps to it.
    static func maxLevel(_ q: Quantization) -> Float { q == .fp8 ? 448 : 127 }

    /// K and N are padded to this (elements; one byte each in the quantized operands).
    static let padding = 16

    /// Scratch bytes for one chunk of rows (quantized rows, row scales, product).
    static let scratchBudget = 64 << 20

    /// Backend flag `quantize-chunk-rows=N` caps the rows per chunk (the self-test uses it to
    /// run the chunked path on small shapes).
    static func chunkRowsFlag(_ flags: Set<String>) -> Int? {
        let prefix = "quantize-chunk-rows="
        return flags.lazy.compactMap { $0.hasPrefix(prefix) ? Int($0.dropFirst(prefix.count)) : nil }.first
    }

    /// The source of a linear's weight: a parameter, possibly behind the cast that widens
    /// 16-bit weight storage.
    static func parameterSource(_ g: Graph, _ v: ValueID) -> ParameterSource? {
        let n = g[v]
        switch n.op {
        case .parameter(let src): return src
        case .cast: return parameterSource(g, n.inputs[0])
        default: return nil
        }
    }

    /// The sizes and scratch layout of one quantized linear [M, K] x [N, K]ᵀ.
    struct Layout {
        let m: Int, n: Int, k: Int
        let kPadded: Int, nPadded: Int
        let rowsPerChunk: Int
        /// Scratch offsets of one chunk: quantized rows [rows, kPadded] at 0, their scales
        /// [rows] float32, the product [rows, nPadded] int32 or float32.
        let scalesOffset: Int, productOffset: Int
        let scratchBytes: Int

        init(m: Int, n: Int, k: Int, flags: Set<String>) {
            func roundUp(_ v: Int, _ a: Int) -> Int { (v + a - 1) / a * a }
            self.m = m
            self.n = n
            self.k = k
            kPadded = roundUp(max(k, 1), QuantizedLinear.padding)
            nPadded = roundUp(max(n, 1), QuantizedLinear.padding)
            let perRow = kPadded + 4 + nPadded * 4
            var maxRows = max(1, QuantizedLinear.scratchBudget / perRow)
            if let cap = QuantizedLinear.chunkRowsFlag(flags), cap > 0 { maxRows = min(maxRows, cap) }
            // Chunks of equal size rather than full ones and a small remainder.
            let chunks = max(1, (m + maxRows - 1) / maxRows)
            rowsPerChunk = max(1, (m + chunks - 1) / chunks)
            scalesOffset = roundUp(rowsPerChunk * kPadded, 256)
            productOffset = roundUp(scalesOffset + rowsPerChunk * 4, 256)
            scratchBytes = productOffset + rowsPerChunk * nPadded * 4
        }
    }

    /// The steps of one quantized linear, or nil when cuBLASLt has no quantized algorithm for
    /// it (the caller then runs the layer in float). `x` is [M, K] and `y` [M, N] in `T`;
    /// `epilogue` is the kernels' EpilogueOps struct; the weight is quantized on first use.
    static func steps(_ ctx: CUDAContext, _ quantization: Quantization, _ layout: Layout, T: DType,
                      x: CUdeviceptr, weight: () throws -> QuantizedWeight, bias: CUdeviceptr?, y: CUdeviceptr,
                      epilogue: [UInt8], scratch: CUdeviceptr, label: String) throws -> [Step]? {
        let fp8 = quantization == .fp8
        guard !fp8 || ctx.architecture >= 89 else {
            throw CUDAError.unsupported("fp8 linear layers need an sm_89 or newer GPU (Ada, Hopper); \(ctx.deviceName) is sm_\(ctx.architecture) (quantize to int8 instead)")
        }
        if layout.m == 0 { return [] }
        let qx = scratch, sx = scratch + UInt64(layout.scalesOffset), product = scratch + UInt64(layout.productOffset)
        func gemm(rows: Int, x qx: CUdeviceptr, weight w: CUdeviceptr, rowLabel: String) throws -> GemmPlan {
            let element: Int32? = fp8 ? CuBLASLt.r8FE4M3 : nil
            return try GemmPlan(ctx, m: rows, n: layout.nPadded, k: layout.kPadded, batch: 1,
                                a: GemmOperand(pointer: qx, ld: layout.kPadded, batchStride: 0, dtype: .int8, elementType: element),
                                b: GemmOperand(pointer: w, ld: layout.kPadded, batchStride: 0, dtype: .int8, elementType: element),
                                transposeB: true,
                                d: GemmOperand(pointer: product, ld: layout.nPadded, batchStride: 0, dtype: fp8 ? .float32 : .int32),
                                computeType: fp8 ? CuBLASLt.compute32F : CuBLASLt.compute32I,
                                scaleType: fp8 ? CuBLASLt.r32F : CuBLASLt.r32I, label: "\(label)\(rowLabel)")
        }
        // Ask cuBLASLt before quantizing the weight, so a layer it cannot run costs no second copy.
        do {
            _ = try gemm(rows: layout.rowsPerChunk, x: qx, weight: scratch, rowLabel: "")
        } catch let error as CUDAError {
            switch error {
            case .cublas, .unsupported:
                Log.warning("CUDA: \(label) runs in float: cuBLASLt cannot run it \(fp8 ? "in fp8" : "in int8") (\(error))")
                return nil
            default:
                throw error
            }
        }

        let w = try weight()
        let quantize = try ctx.function(.quantize, T, fp8 ? "quantize_rows_e4m3" : "quantize_rows_int8")
        let dequantize = try ctx.function(.quantize, T, fp8 ? "dequantize_f32" : "dequantize_i32")
        var steps: [Step] = []
        var row0 = 0
        while row0 < layout.m {
            let rows = min(layout.rowsPerChunk, layout.m - row0)
            let rowLabel = layout.rowsPerChunk < layout.m ? " rows \(row0)..<\(row0 + rows)" : ""
            let xChunk = x + UInt64(row0 * layout.k * T.size)
            steps.append(.launch(Launch(function: quantize, grid: (UInt32(rows), 1, 1), block: 128, sharedBytes: 0,
                                        args: KernelArgs([.ptr(xChunk), .ptr(qx), .ptr(sx), .i64(Int64(layout.k)),
                                                          .i64(Int64(layout.kPadded))]),
                                        label: "quantize activations for \(label)\(rowLabel)")))
            steps.append(.gemm(try gemm(rows: rows, x: qx, weight: w.values.pointer, rowLabel: rowLabel)))
            steps.append(.launch(Launch(function: dequantize, grid: (ctx.elementwiseGrid(rows * layout.n), 1, 1), block: 256,
                                        sharedBytes: 0,
                                        args: KernelArgs([.ptr(product), .i64(Int64(layout.nPadded)), .ptr(sx), .ptr(w.scales.pointer),
                                                          .ptr(bias ?? 0), .ptr(y), .i64(Int64(row0)), .i64(Int64(rows)),
                                                          .i64(Int64(layout.n)), .bytes(epilogue)]),
                                        label: "dequantize for \(label)\(rowLabel)")))
            row0 += rows
        }
        return steps
    }
}

/// A linear weight quantized per output channel, on the device: values [nPadded, kPadded]
/// (int8 or E4M3 bytes, zero padding) and scales [nPadded] float32, w[n, k] ≈ value · scale[n].
final class QuantizedWeight {
    let values: DeviceBuffer
    let scales: DeviceBuffer

    init(values: DeviceBuffer, scales: DeviceBuffer) {
        self.values = values
        self.scales = scales
    }

    /// The quantized form of parameter `src` ([n, k]), made and uploaded once per ModelWeights
    /// and context, like `CUDAExecutable.deviceWeight`.
    static func prepared(_ ctx: CUDAContext, _ weights: ModelWeights, _ src: ParameterSource, _ quantization: Quantization,
                         _ layout: QuantizedLinear.Layout) throws -> QuantizedWeight {
        try weights.prepared("cuda:\(ObjectIdentifier(ctx).hashValue):\(quantization):\(src)") {
            let w = try weights.float32(src)
            guard w.shape == [layout.n, layout.k] else {
                throw CUDAError.invalidInput("quantized linear weight \(src) has shape \(w.shape), expected [\(layout.n), \(layout.k)]")
            }
            let (values, scales) = HostQuantizer.quantize(w, as: quantization, rows: layout.nPadded, columns: layout.kPadded)
            let v = try ctx.allocator.allocate(values.byteCount)
            try ctx.staging.upload(values.raw, bytes: values.byteCount, to: v.pointer)
            let s = try ctx.allocator.allocate(scales.count * 4)
            try scales.withUnsafeBytes { try ctx.staging.upload($0.baseAddress!, bytes: $0.count, to: s.pointer) }
            return QuantizedWeight(values: v, scales: s)
        }
    }
}

/// Host side of the quantization: weights per output channel, the same rounding as the GPU
/// applies to activations (nearest even; E4M3 saturating like PTX `cvt.rn.satfinite`).
enum HostQuantizer {
    /// w [n, k] as bytes [rows, columns] (zero padded; rows >= n, columns >= k) and one scale
    /// per row (0 for padding rows and all-zero rows).
    static func quantize(_ w: Tensor, as quantization: Quantization, rows: Int, columns: Int) -> (values: Tensor, scales: [Float]) {
        let (n, k) = (w.shape[0], w.shape[1])
        let level = QuantizedLinear.maxLevel(quantization)
        let fp8 = quantization == .fp8
        let values = Tensor(zeros: [rows, columns], dtype: .int8)
        var scales = [Float](repeating: 0, count: rows)
        let src = UnsafePointer(w.floats), dst = values.pointer(as: UInt8.self)
        scales.withUnsafeMutableBufferPointer { scale in
            Parallel.chunks(n, grain: max(1, 16384 / max(k, 1))) { range in
                for r in range {
                    let row = src + r * k, out = dst + r * columns
                    var m: Float = 0
                    for c in 0..<k { m = max(m, abs(row[c])) }
                    scale[r] = m / level
                    let inv = m > 0 ? level / m : 0
                    if fp8 {
                        for c in 0..<k { out[c] = e4m3(row[c] * inv) }
                    } else {
                        for c in 0..<k { out[c] = UInt8(bitPattern: int8(row[c] * inv)) }
                    }
                }
            }
        }
        return (values, scales)
    }

    /// round(v) to nearest even, clamped to ±127. Adding 1.5·2²³ leaves the rounded value in
    /// the low mantissa bits (|v| < 2²²), without Swift's slow rounding calls.
    @inline(__always)
    static func int8(_ v: Float) -> Int8 {
        let t = v + 12_582_912
        let i = Int32(bitPattern: t.bitPattern &- 0x4B40_0000)
        return Int8(max(-127, min(127, i)))
    }

    /// float32 → fp8 E4M3 (1 sign, 4 exponent bits biased by 7, 3 mantissa bits; no infinities,
    /// 448 the largest finite value, 0x7F NaN): nearest even, beyond ±448 saturated.
    @inline(__always)
    static func e4m3(_ v: Float) -> UInt8 {
        let bits = v.bitPattern
        let sign = UInt8(truncatingIfNeeded: bits >> 24) & 0x80
        let a = Float(bitPattern: bits & 0x7FFF_FFFF)
        if a.isNaN { return sign | 0x7F }
        if a >= 448 { return sign | 0x7E }
        if a < 0x1p-6 {
            // Subnormals are multiples of 2⁻⁹ (code = the multiple); 8 is the smallest normal.
            let t = a * 512 + 12_582_912
            return sign | UInt8(truncatingIfNeeded: t.bitPattern &- 0x4B40_0000)
        }
        // Round float32's 23 mantissa bits to 3 (a carry moves into the exponent), rebias 127 → 7.
        var u = a.bitPattern
        u &+= 0x7_FFFF &+ ((u >> 20) & 1)
        let exponent = (u >> 23) &- 120
        return sign | UInt8(truncatingIfNeeded: exponent << 3) | UInt8(truncatingIfNeeded: (u >> 20) & 7)
    }
}
