import DiffuseCore

/// One operand of a row-major (batched) GEMM: pointer, row stride and batch stride in elements.
struct GemmOperand {
    var pointer: CUdeviceptr
    var ld: Int
    var batchStride: Int
    var dtype: DType
    /// cuBLASLt's element type where `dtype` cannot name it (fp8 E4M3 bytes are `.int8` here).
    var elementType: Int32? = nil
}

/// A cuBLASLt matmul prepared once (descriptors, algorithm, pointers) and launched many times:
/// row-major `D[b] = alpha * A[b] (M x K) * op(B[b]) + beta * C[b] (+ bias per column)`, with
/// op(B) = B (K x N) or Bᵀ (B stored N x K). cuBLASLt is column-major, so it computes
/// Dᵀ = op(B)ᵀ Aᵀ: its "A" is our B and its "B" is our A, and the bias runs along our columns.
/// `alpha` and `beta` are passed in `scaleType`: float32, or int32 for the int8 GEMM
/// (CUBLAS_COMPUTE_32I wants integer scalars).
final class GemmPlan {
    private let ctx: CUDAContext
    private var desc: CuBLASLt.Handle = nil
    private var layouts: [CuBLASLt.Handle] = [nil, nil, nil, nil]
    private let algo: UnsafeMutableRawPointer
    /// alpha, beta: two 4-byte values in the scale type.
    private let scalars: UnsafeMutableRawPointer
    private let a: GemmOperand, b: GemmOperand, c: GemmOperand, d: GemmOperand
    let label: String

    init(_ ctx: CUDAContext, m: Int, n: Int, k: Int, batch: Int, a: GemmOperand, b: GemmOperand, transposeB: Bool,
         d: GemmOperand, c: GemmOperand? = nil, beta: Float = 0, alpha: Float = 1, bias: CUdeviceptr? = nil,
         computeType: Int32, scaleType: Int32 = CuBLASLt.r32F, tune: Bool = false, label: String) throws {
        self.ctx = ctx
        self.a = a
        self.b = b
        self.d = d
        self.c = c ?? d
        self.label = label
        algo = UnsafeMutableRawPointer.allocate(byteCount: CuBLASLt.heuristicResultSize, alignment: 16)
        scalars = UnsafeMutableRawPointer.allocate(byteCount: 8, alignment: 8)
        let betaValue = c == nil ? 0 : beta
        if scaleType == CuBLASLt.r32I {
            scalars.storeBytes(of: Int32(alpha), as: Int32.self)
            scalars.storeBytes(of: Int32(betaValue), toByteOffset: 4, as: Int32.self)
        } else {
            scalars.storeBytes(of: alpha, as: Float.self)
            scalars.storeBytes(of: betaValue, toByteOffset: 4, as: Float.self)
        }
        let lt = ctx.cublas
        func check(_ s: Int32, _ call: String) throws { try lt.check(s, "\(call) for \(label)") }

        try check(lt.cublasLtMatmulDescCreate(&desc, computeType, scaleType), "cublasLtMatmulDescCreate")
        var transA: Int32 = transposeB ? 1 : 0
        var transB: Int32 = 0
        try check(lt.cublasLtMatmulDescSetAttribute(desc, CuBLASLt.descTransA, &transA, 4), "set TRANSA")
        try check(lt.cublasLtMatmulDescSetAttribute(desc, CuBLASLt.descTransB, &transB, 4), "set TRANSB")
        if let bias {
            var epi = CuBLASLt.epilogueBias
            var p = bias
            try check(lt.cublasLtMatmulDescSetAttribute(desc, CuBLASLt.descEpilogue, &epi, 4), "set EPILOGUE")
            try check(lt.cublasLtMatmulDescSetAttribute(desc, CuBLASLt.descBiasPointer, &p, 8), "set BIAS_POINTER")
        }

        // Column-major views: lt A = our B, lt B = our A, lt C/D = our C/D transposed.
        let shapes: [(GemmOperand, Int, Int)] = [
            (b, transposeB ? k : n, transposeB ? n : k),
            (a, k, m),
            (self.c, n, m),
            (d, n, m),
        ]
        for (i, (op, rows, cols)) in shapes.enumerated() {
            guard let t = op.elementType ?? GemmPlan.dataType(op.dtype) else {
                throw CUDAError.unsupported("cuBLASLt matmul on \(op.dtype) for \(label)")
            }
            try check(lt.cublasLtMatrixLayoutCreate(&layouts[i], t, UInt64(rows), UInt64(cols), Int64(op.ld)),
                      "cublasLtMatrixLayoutCreate")
            if batch > 1 {
                var count = Int32(batch)
                var stride = Int64(op.batchStride)
                try check(lt.cublasLtMatrixLayoutSetAttribute(layouts[i], CuBLASLt.layoutBatchCount, &count, 4), "set BATCH_COUNT")
                try check(lt.cublasLtMatrixLayoutSetAttribute(layouts[i], CuBLASLt.layoutStridedBatchOffset, &stride, 8),
                          "set STRIDED_BATCH_OFFSET")
            }
        }

        var pref: CuBLASLt.Handle = nil
        try check(lt.cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate")
        defer { _ = lt.cublasLtMatmulPreferenceDestroy(pref) }
        var ws = UInt64(CUDAContext.workspaceBytes)
        try check(lt.cublasLtMatmulPreferenceSetAttribute(pref, CuBLASLt.prefMaxWorkspaceBytes, &ws, 8), "set MAX_WORKSPACE_BYTES")
        // Tell the heuristic how aligned our pointers, row strides and batch strides really are.
        let prefs: [(Int32, GemmOperand)] = [(CuBLASLt.prefMinAlignmentA, b), (CuBLASLt.prefMinAlignmentB, a),
                                             (CuBLASLt.prefMinAlignmentC, self.c), (CuBLASLt.prefMinAlignmentD, d)]
        for (attr, op) in prefs {
            var align = UInt32(GemmPlan.alignment(op, batched: batch > 1))
            try check(lt.cublasLtMatmulPreferenceSetAttribute(pref, attr, &align, 4), "set MIN_ALIGNMENT")
        }
        // The heuristic's first choice, or with `tune` the fastest of its first candidates as
        // measured here (D must be scratch: the candidates run on the real pointers).
        let candidates = tune ? GemmPlan.tuneCandidates : 1
        let size = CuBLASLt.heuristicResultSize
        let results = UnsafeMutableRawPointer.allocate(byteCount: size * candidates, alignment: 16)
        defer { results.deallocate() }
        var found: Int32 = 0
        try check(lt.cublasLtMatmulAlgoGetHeuristic(ctx.cublasHandle, desc, layouts[0], layouts[1], layouts[2], layouts[3],
                                                    pref, Int32(candidates), results, &found), "cublasLtMatmulAlgoGetHeuristic")
        guard found > 0 else {
            throw CUDAError.unsupported("cuBLASLt has no algorithm for \(label) (m \(m), n \(n), k \(k), batch \(batch), \(a.dtype)/\(b.dtype) -> \(d.dtype))")
        }
        algo.copyMemory(from: results, byteCount: size)
        if tune && found > 1 {
            let operands = [a, b, self.c, d].map { "\($0.dtype)/\($0.ld)/\($0.batchStride)/\(GemmPlan.alignment($0, batched: batch > 1))" }
            let key = "\(m)x\(n)x\(k)x\(batch) t\(transposeB) \(operands) c\(c != nil) bias\(bias != nil) \(computeType) \(scaleType)"
            if let known = ctx.tunedGemm(key) {
                known.withUnsafeBytes { algo.copyMemory(from: $0.baseAddress!, byteCount: size) }
            } else {
                var best: (ms: Double, index: Int)?
                for i in 0..<Int(found) {
                    let r = results + i * size
                    guard r.load(fromByteOffset: CuBLASLt.heuristicWorkspaceOffset, as: Int.self) <= CUDAContext.workspaceBytes,
                          r.load(fromByteOffset: CuBLASLt.heuristicStateOffset, as: Int32.self) == 0 else { continue }
                    algo.copyMemory(from: r, byteCount: size)
                    // A candidate that fails to launch is just not chosen.
                    guard let ms = try? ctx.time(reps: 5, { try run() }) else { continue }
                    if best == nil || ms < best!.ms { best = (ms, i) }
                }
                let chosen = results + (best?.index ?? 0) * size
                algo.copyMemory(from: chosen, byteCount: size)
                ctx.setTunedGemm(key, Array(UnsafeRawBufferPointer(start: chosen, count: size)))
            }
        }
        let wsNeeded = algo.load(fromByteOffset: CuBLASLt.heuristicWorkspaceOffset, as: Int.self)
        guard wsNeeded <= CUDAContext.workspaceBytes else {
            throw CUDAError.unsupported("cuBLASLt algorithm for \(label) wants \(wsNeeded) bytes of workspace")
        }
    }

    deinit {
        let lt = ctx.cublas
        for l in layouts where l != nil { _ = lt.cublasLtMatrixLayoutDestroy(l) }
        if desc != nil { _ = lt.cublasLtMatmulDescDestroy(desc) }
        algo.deallocate()
        scalars.deallocate()
    }

    func run() throws {
        let lt = ctx.cublas
        try lt.check(lt.cublasLtMatmul(ctx.cublasHandle, desc, scalars, b.pointer, layouts[0], a.pointer, layouts[1],
                                       scalars + 4, c.pointer, layouts[2], d.pointer, layouts[3], algo,
                                       ctx.workspace.pointer, CUDAContext.workspaceBytes, ctx.stream),
                     "cublasLtMatmul for \(label)")
    }

    /// How many of the heuristic's candidates autotuning measures.
    static let tuneCandidates = 8

    static func dataType(_ d: DType) -> Int32? {
        switch d {
        case .float32: return CuBLASLt.r32F
        case .float16: return CuBLASLt.r16F
        case .bfloat16: return CuBLASLt.r16BF
        case .int8: return CuBLASLt.r8I
        case .int32: return CuBLASLt.r32I
        default: return nil
        }
    }

    /// The largest power of two (at most 256) dividing the operand's address and strides in bytes.
    static func alignment(_ op: GemmOperand, batched: Bool) -> Int {
        let es = op.dtype.size
        var v = Int(op.pointer) | (op.ld * es)
        if batched { v |= op.batchStride * es }
        var a = 256
        while a > es && v % a != 0 { a /= 2 }
        return a
    }
}
