import CDNNL
import DiffuseCore
import DiffuseGraph

extension Lowering {
    /// A key for a memory layout, to cache prepared weights by layout: a hash of the
    /// descriptor's bytes (descriptors come zero-initialised from oneDNN, so equal layouts
    /// hash equally).
    func formatKey(_ d: DNNL.MemoryDesc) -> String {
        var m = d.md
        var h: UInt64 = 0xCBF2_9CE4_8422_2325
        withUnsafeBytes(of: &m) { for b in $0 { h = (h ^ UInt64(b)) &* 0x100_0000_01B3 } }
        return String(h, radix: 16)
    }

    /// A convolution's strides, dilations (oneDNN counts from 0) and leading/trailing padding.
    static func geometry(_ a: Conv2dAttributes) -> (strides: [dnnl_dim_t], dilates: [dnnl_dim_t], padL: [dnnl_dim_t], padR: [dnnl_dim_t]) {
        ([dnnl_dim_t(a.stride.0), dnnl_dim_t(a.stride.1)],
         [dnnl_dim_t(a.dilation.0 - 1), dnnl_dim_t(a.dilation.1 - 1)],
         [dnnl_dim_t(a.padding.0), dnnl_dim_t(a.padding.2)],
         [dnnl_dim_t(a.padding.1), dnnl_dim_t(a.padding.3)])
    }

    /// A weight quantized once per output channel (`Quantize.weights`, its [N, …] rows flattened)
    /// and reordered from `logical` (its s8 values in torch's order) into the layout a primitive
    /// chose (for a convolution with a source zero point that layout carries the compensation,
    /// which the reorder computes); spilled when weights stream. Kept with the executable.
    func quantizedWeights(_ src: ParameterSource, logical: DNNL.MemoryDesc, into target: DNNL.MemoryDesc,
                          tag: String) throws -> QuantizedWeights {
        guard let weights else { throw BackendError("the graph has parameters but no weights were given") }
        let key = "cpu.\(tag):\(src):\(formatKey(target))" + (streamWeights ? ":spilled" : "")
        let ctx = context
        let file = try spillFile()
        let prepared = try weights.prepared(key) { () -> QuantizedWeights in
            let w = try weights.float32(src)
            let (q, scales) = Quantize.weights(w.reshaped([w.shape[0], w.count / w.shape[0]]))
            let packed = Tensor(zeros: [target.byteCount], dtype: .uint8)
            try withExtendedLifetime(q) { try DNNL.reorder(q.raw, logical, packed.raw, target, context: ctx) }
            weights.evict(src)
            return QuantizedWeights(packed: try spill(packed, into: file), scales: Tensor(shape: [w.shape[0]], floats: scales))
        }
        retained.append(prepared)
        keep(prepared.packed)
        return prepared
    }

    /// A parameter reordered once into the layout a primitive asked for: float32, or with 16-bit
    /// weight storage the same element order narrowed to float16/bfloat16, widened into the
    /// shared staging buffer right before each use (`weightSource`); spilled to a file when
    /// weights stream.
    func preparedWeights(_ src: ParameterSource, logical: DNNL.MemoryDesc, into target: DNNL.MemoryDesc,
                         tag: String) throws -> PreparedBuffer {
        guard let weights else { throw BackendError("the graph has parameters but no weights were given") }
        let storage = options.weightStorage ?? .float32
        let key = "cpu.\(tag):\(src):\(formatKey(target)):\(target.byteCount):\(storage)" + (streamWeights ? ":spilled" : "")
        let ctx = context
        let file = try spillFile()
        let prepared = try weights.prepared(key) { () -> PreparedBuffer in
            let plain = try weights.float32(src)
            let out = Tensor(zeros: [target.byteCount / 4], dtype: .float32)
            try withExtendedLifetime(plain) { try DNNL.reorder(plain.raw, logical, out.raw, target, context: ctx) }
            weights.evict(src)
            return try spill(storage == .float32 ? out : out.converted(to: storage), into: file)
        }
        keep(prepared)
        if storage != .float32 { weightStagingBytes = max(weightStagingBytes, target.byteCount) }
        return prepared
    }

    /// Where a primitive reads its weights: the prepared tensor itself (float32), or the
    /// staging buffer with a step that widens the 16-bit copy into it first.
    func weightSource(_ prepared: PreparedBuffer) -> (pointer: UnsafeMutableRawPointer, widen: (() -> Void)?) {
        let packed = prepared.tensor
        guard packed.dtype != .float32, let staging = weightStaging else { return (packed.raw, nil) }
        let n = packed.count
        let dst = staging.floats
        let dtype = packed.dtype
        let src = packed.raw
        return (staging.raw, {
            Parallel.chunks(n, grain: 1 << 16) { r in
                if dtype == .float16 {
                    FloatConversion.float16ToFloat(src.assumingMemoryBound(to: Float16.self) + r.lowerBound, dst + r.lowerBound, count: r.count)
                } else {
                    FloatConversion.bfloat16ToFloat(src.assumingMemoryBound(to: UInt16.self) + r.lowerBound, dst + r.lowerBound, count: r.count)
                }
            }
        })
    }

    func lowerConv(_ node: Node, _ g: ValueID, _ a: Conv2dAttributes) throws {
        guard let wsrc = parameterSource(node.inputs[1]) else {
            throw BackendError("conv2d weights must be model parameters")
        }
        guard a.groups == 1 else { throw BackendError("grouped convolutions are not supported on the CPU backend") }
        switch a.quantization {
        case .none: break
        case .dynamicInt8: if try lowerConvInt8(node, g, a, weights: wsrc) { return }
        case .fp8: throw BackendError("fp8 convolutions are not supported on the CPU backend")
        }
        guard DNNL.supports(a.epilogue) else { throw BackendError("conv2d epilogue \(a.epilogue) has no oneDNN form") }
        let xs = graph[node.inputs[0]].shape, ws = graph[node.inputs[1]].shape
        // oneDNN picks the source, weight and destination layouts its fastest kernel wants
        // (nChw8c on AVX2); pinning any of them can drop it to a slow reference kernel.
        var srcMD = try DNNL.MemoryDesc.any(xs), dstMD = try DNNL.MemoryDesc.any(node.shape)
        var wMD = try DNNL.MemoryDesc.any(ws)
        var biasMD = try DNNL.MemoryDesc.plain([ws[0]])
        var desc = dnnl_convolution_desc_t()
        var (strides, dilates, padL, padR) = Self.geometry(a)
        try withUnsafeMutablePointer(to: &biasMD.md) { bp in
            try DNNL.check(dnnl_dilated_convolution_forward_desc_init(
                &desc, dnnl_forward_inference, dnnl_convolution_auto, &srcMD.md, &wMD.md, a.hasBias ? bp : nil, &dstMD.md,
                &strides, &dilates, &padL, &padR), "describing conv2d \(xs) * \(ws)")
        }
        let attr = try DNNL.Attributes()
        try attr.setPostOps(a.epilogue, dstDesc: dstMD)
        let prim = try withUnsafePointer(to: &desc) {
            try DNNL.Primitive(opDesc: UnsafeRawPointer($0), attributes: attr, context: context, what: "conv2d \(xs) * \(ws)")
        }
        scratchBytes = max(scratchBytes, prim.scratchpadBytes)
        let chosenW = prim.desc(dnnl_query_weights_md)
        let packed = try preparedWeights(wsrc, logical: try .plain(ws), into: chosenW, tag: "conv")
        let srcChosen = prim.desc(dnnl_query_src_md), dstChosen = prim.desc(dnnl_query_dst_md)

        // The source, converted to the chosen layout (shared conversions when it is one of ours).
        let x: Int
        if let l = try layout(of: srcChosen, shape: xs) { x = try operand(node.inputs[0], l) } else {
            x = try reorderTo(try operand(node.inputs[0]), srcChosen)
        }
        // The destination: one of our layouts (kept, or reordered to plain for the baseline),
        // or a private one that is reordered to plain right after.
        let dstLayout = try layout(of: dstChosen, shape: node.shape)
        let keep = dstLayout == .plain || (dstLayout == .blocked8 && blocked)
        let residual: Int?
        if a.epilogue.contains(.addInput) {
            let r = node.inputs[a.hasBias ? 3 : 2]
            residual = keep ? try operand(r, dstLayout!) : try reorderTo(try operand(r), dstChosen)
        } else {
            residual = nil
        }
        let bias = a.hasBias ? try operand(node.inputs[2]) : nil
        let inputs = [x] + (residual.map { [$0] } ?? [])
        let bytes = dstChosen.byteCount
        let storage: Storage = residual != nil ? .inPlace(input: 1, bytes: bytes) : .own(bytes: bytes)
        let conv = add(Value(shape: node.shape, dtype: .float32, layout: keep ? dstLayout! : .opaque, storage: storage,
                             inputs: inputs)) { [unowned self] out, ptr in
            try self.primitiveStep(prim, src: (srcChosen, ptr(x)), weights: (chosenW, packed), dst: (dstChosen, out),
                                   bias: bias.map { (biasMD, ptr($0)) }, residual: residual.map { ptr($0) }, bytes: bytes,
                                   what: "conv2d \(xs) * \(ws)")
        }
        if keep {
            programOf[g.index] = conv
        } else {
            opaqueDescs[conv] = dstChosen
            programOf[g.index] = try convert(conv, to: .plain)
        }
    }

    /// A reorder of value `p` into an arbitrary oneDNN layout (not cached).
    func reorderTo(_ p: Int, _ target: DNNL.MemoryDesc) throws -> Int {
        let from = try desc(p)
        let r = try DNNL.Primitive(reorderFrom: from, to: target, context: context)
        scratchBytes = max(scratchBytes, r.scratchpadBytes)
        let ctx = context
        let id = add(Value(shape: values[p].shape, dtype: .float32, layout: .opaque, storage: .own(bytes: target.byteCount),
                           inputs: [p])) { [unowned self] out, ptr in
            let bound = DNNL.BoundPrimitive(r, try [(DNNL_ARG_FROM, DNNL.Memory(from, ptr(p), ctx)),
                                                   (DNNL_ARG_TO, DNNL.Memory(target, out, ctx))] + self.scratchBinding(r),
                                            context: ctx, what: "a source reorder")
            self.retained.append(bound)
            return { try bound.execute() }
        }
        opaqueDescs[id] = target
        return id
    }

    func lowerLinear(_ node: Node, _ g: ValueID, _ a: LinearAttributes) throws {
        guard let wsrc = parameterSource(node.inputs[1]) else {
            throw BackendError("linear weights must be model parameters")
        }
        if a.quantization == .dynamicInt8 { return try lowerLinearInt8(node, g, a, weights: wsrc) }
        guard a.quantization == .none else { throw BackendError("\(a.quantization) linears are not supported on the CPU backend") }
        guard DNNL.supports(a.epilogue) else { throw BackendError("linear epilogue \(a.epilogue) has no oneDNN form") }
        let (m, n, k, x, bias, residual) = try linearOperands(node, a)
        var srcMD = try DNNL.MemoryDesc.plain([m, k]), dstMD = try DNNL.MemoryDesc.plain([m, n])
        var wMD = try DNNL.MemoryDesc.any([k, n])
        var biasMD = try DNNL.MemoryDesc.plain([1, n])
        var desc = dnnl_matmul_desc_t()
        try withUnsafeMutablePointer(to: &biasMD.md) { bp in
            try DNNL.check(dnnl_matmul_desc_init(&desc, &srcMD.md, &wMD.md, a.hasBias ? bp : nil, &dstMD.md),
                           "describing linear [\(m), \(k)] x [\(n), \(k)]")
        }
        let attr = try DNNL.Attributes()
        try attr.setPostOps(a.epilogue, dstDesc: dstMD)
        let prim = try withUnsafePointer(to: &desc) {
            try DNNL.Primitive(opDesc: UnsafeRawPointer($0), attributes: attr, context: context, what: "linear \([n, k])")
        }
        scratchBytes = max(scratchBytes, prim.scratchpadBytes)
        let chosenW = prim.desc(dnnl_query_weights_md)
        // torch stores [out, in]: as a [K, N] matrix that is column-major.
        let packed = try preparedWeights(wsrc, logical: try DNNL.MemoryDesc(dims: [k, n], strides: [1, k]), into: chosenW,
                                         tag: "linear")
        let inputs = [x] + (residual.map { [$0] } ?? [])
        let storage: Storage = residual != nil ? .inPlace(input: 1, bytes: node.byteCount) : .own(bytes: node.byteCount)
        let byteCount = node.byteCount
        programOf[g.index] = add(Value(shape: node.shape, dtype: .float32, layout: .plain, storage: storage, inputs: inputs)) {
            [unowned self] out, ptr in
            try self.primitiveStep(prim, src: (srcMD, ptr(x)), weights: (chosenW, packed), dst: (dstMD, out),
                                   bias: bias.map { (biasMD, ptr($0)) }, residual: residual.map { ptr($0) }, bytes: byteCount,
                                   what: "linear \([n, k])")
        }
    }

    /// The step of a conv2d or linear primitive: widen 16-bit weights if stored so, copy the
    /// residual into the destination unless it is already there (the sum post-op adds to it), run.
    func primitiveStep(_ prim: DNNL.Primitive, src: (DNNL.MemoryDesc, UnsafeMutableRawPointer),
                       weights: (DNNL.MemoryDesc, PreparedBuffer), dst: (DNNL.MemoryDesc, UnsafeMutableRawPointer),
                       bias: (DNNL.MemoryDesc, UnsafeMutableRawPointer)?, residual: UnsafeMutableRawPointer?, bytes: Int,
                       what: String) throws -> () throws -> Void {
        let ctx = context
        let (wp, widen) = weightSource(weights.1)
        var bindings: [(Int32, DNNL.Memory)] = [
            (DNNL_ARG_SRC, try DNNL.Memory(src.0, src.1, ctx)),
            (DNNL_ARG_WEIGHTS, try DNNL.Memory(weights.0, wp, ctx)),
            (DNNL_ARG_DST, try DNNL.Memory(dst.0, dst.1, ctx)),
        ]
        if let bias { bindings.append((DNNL_ARG_BIAS, try DNNL.Memory(bias.0, bias.1, ctx))) }
        bindings += try scratchBinding(prim)
        let bound = DNNL.BoundPrimitive(prim, bindings, context: ctx, what: what)
        retained.append(bound)
        let out = dst.1
        return {
            if let r = residual, r != out { out.copyMemory(from: r, byteCount: bytes) }
            try weights.1.whileResident {
                widen?()
                try bound.execute()
            }
        }
    }

    func lowerMatmul(_ node: Node, _ g: ValueID, transposeB: Bool) throws {
        let sa = graph[node.inputs[0]].shape
        let m = sa[sa.count - 2], k = sa[sa.count - 1]
        let n = node.shape[node.shape.count - 1]
        let batch = node.count / (m * n)
        let a = try operand(node.inputs[0], .plain), b = try operand(node.inputs[1], .plain)
        var aMD = try DNNL.MemoryDesc.plain([batch, m, k])
        var bMD = transposeB ? try DNNL.MemoryDesc(dims: [batch, k, n], strides: [n * k, 1, k]) : try DNNL.MemoryDesc.plain([batch, k, n])
        var dMD = try DNNL.MemoryDesc.plain([batch, m, n])
        var desc = dnnl_matmul_desc_t()
        try DNNL.check(dnnl_matmul_desc_init(&desc, &aMD.md, &bMD.md, nil, &dMD.md), "describing matmul \(sa)")
        let prim = try withUnsafePointer(to: &desc) {
            try DNNL.Primitive(opDesc: UnsafeRawPointer($0), attributes: try DNNL.Attributes(), context: context, what: "matmul")
        }
        scratchBytes = max(scratchBytes, prim.scratchpadBytes)
        let ctx = context
        let (am, bm, dm) = (aMD, bMD, dMD)
        programOf[g.index] = add(Value(shape: node.shape, dtype: .float32, layout: .plain, storage: .own(bytes: node.byteCount),
                                       inputs: [a, b])) { [unowned self] out, ptr in
            let bound = DNNL.BoundPrimitive(prim, try [
                (DNNL_ARG_SRC, DNNL.Memory(am, ptr(a), ctx)), (DNNL_ARG_WEIGHTS, DNNL.Memory(bm, ptr(b), ctx)),
                (DNNL_ARG_DST, DNNL.Memory(dm, out, ctx)),
            ] + self.scratchBinding(prim), context: ctx, what: "matmul")
            self.retained.append(bound)
            return { try bound.execute() }
        }
    }

    /// Whether `s` is one value per (n, c) of the 4-D `full` shape: [N|1, C, 1, 1].
    func isChannelVector(_ s: [Int], of full: [Int]) -> Bool {
        guard full.count == 4, s.count <= 4 else { return false }
        let p = [Int](repeating: 1, count: 4 - s.count) + s
        return (p[0] == full[0] || p[0] == 1) && p[1] == full[1] && p[2] == 1 && p[3] == 1 && p != full
    }

    func lowerBinary(_ node: Node, _ g: ValueID, _ op: BinaryOp) throws {
        let sa = graph[node.inputs[0]].shape, sb = graph[node.inputs[1]].shape
        let shape = node.shape
        var pa = try operand(node.inputs[0]), pb = try operand(node.inputs[1])
        let bytes = node.byteCount
        let count = node.count
        if sa == sb, values[pa].layout == values[pb].layout {
            let layout = values[pa].layout
            programOf[g.index] = add(Value(shape: shape, dtype: .float32, layout: layout, storage: .inPlace(input: 0, bytes: bytes),
                                           inputs: [pa, pb])) { out, ptr in
                let a = ptr(pa).assumingMemoryBound(to: Float.self), b = ptr(pb).assumingMemoryBound(to: Float.self)
                let y = out.assumingMemoryBound(to: Float.self)
                return { Elementwise.binary(op, a, [count], b, [count], y, [count]) }
            }
            return
        }
        // A blocked image with a per-(n, c) vector: add the time embedding, scale channels.
        var blockedSide: (image: Int, vector: Int, vectorShape: [Int])?
        if values[pa].layout == .blocked8, sa == shape, isChannelVector(sb, of: shape) {
            blockedSide = (pa, pb, sb)
        } else if values[pb].layout == .blocked8, sb == shape, isChannelVector(sa, of: shape), op == .add || op == .mul {
            blockedSide = (pb, pa, sa)
        }
        if let bs = blockedSide {
            let vec = try operand(node.inputs[bs.image == pa ? 1 : 0], .plain)
            let padded = [Int](repeating: 1, count: 4 - bs.vectorShape.count) + bs.vectorShape
            let batchStride = padded[0] == 1 ? 0 : shape[1]
            let image = bs.image
            programOf[g.index] = add(Value(shape: shape, dtype: .float32, layout: .blocked8,
                                           storage: .inPlace(input: 0, bytes: bytes), inputs: [image, vec])) { out, ptr in
                let x = ptr(image).assumingMemoryBound(to: Float.self), v = ptr(vec).assumingMemoryBound(to: Float.self)
                let y = out.assumingMemoryBound(to: Float.self)
                return {
                    Elementwise.channelBroadcastBlocked(op, x, v, bBatchStride: batchStride, y, n: shape[0], c: shape[1],
                                                        hw: shape[2] * shape[3])
                }
            }
            return
        }
        pa = try operand(node.inputs[0], .plain)
        pb = try operand(node.inputs[1], .plain)
        let (a0, b0) = (pa, pb)
        programOf[g.index] = add(Value(shape: shape, dtype: .float32, layout: .plain,
                                       storage: sa == shape ? .inPlace(input: 0, bytes: bytes) : .own(bytes: bytes),
                                       inputs: [a0, b0])) { out, ptr in
            let a = ptr(a0).assumingMemoryBound(to: Float.self), b = ptr(b0).assumingMemoryBound(to: Float.self)
            let y = out.assumingMemoryBound(to: Float.self)
            return { Elementwise.binary(op, a, sa, b, sb, y, shape) }
        }
    }

    func lowerAttention(_ node: Node, _ g: ValueID, _ a: AttentionAttributes) throws {
        let q0 = graph[node.inputs[0]].shape
        let heads = a.heads
        let dv = node.shape[2] / heads
        let inputs = try node.inputs.map { try operand($0, .plain) }
        var sk = q0[1], dqk = q0[2] / heads
        var qStride = q0[2], kStride = q0[2], vStride = q0[2]
        // Offsets (in floats) of k and v inside their tensors, and which input holds them.
        var kInput = 0, vInput = 0, kOffset = 0, vOffset = 0
        switch a.packing {
        case .separate:
            let ks = graph[node.inputs[1]].shape, vs = graph[node.inputs[2]].shape
            sk = ks[1]; kStride = ks[2]; vStride = vs[2]; kInput = 1; vInput = 2
        case .qkv:
            dqk = (q0[2] - node.shape[2]) / 2 / heads
            kOffset = heads * dqk; vOffset = 2 * heads * dqk
            kStride = q0[2]; vStride = q0[2]
        case .kv:
            let ks = graph[node.inputs[1]].shape
            sk = ks[1]; kStride = ks[2]; vStride = ks[2]; kInput = 1; vInput = 1; vOffset = heads * dqk
        }
        let template = AttentionProblem(q: UnsafePointer(bitPattern: 64)!, qStride: qStride, k: UnsafePointer(bitPattern: 64)!,
                                        kStride: kStride, v: UnsafePointer(bitPattern: 64)!, vStride: vStride,
                                        out: UnsafeMutablePointer(bitPattern: 64)!, batch: q0[0], heads: heads, sq: q0[1],
                                        sk: sk, dqk: dqk, dv: dv, scale: a.scale, causal: a.causal)
        let impl = options.attention
        scratchBytes = max(scratchBytes, Attention.scratchBytes(template, impl))
        programOf[g.index] = add(Value(shape: node.shape, dtype: .float32, layout: .plain, storage: .own(bytes: node.byteCount),
                                       inputs: inputs)) { [unowned self] out, ptr in
            var p = template
            p.q = UnsafePointer(ptr(inputs[0]).assumingMemoryBound(to: Float.self))
            p.k = UnsafePointer(ptr(inputs[kInput]).assumingMemoryBound(to: Float.self)) + kOffset
            p.v = UnsafePointer(ptr(inputs[vInput]).assumingMemoryBound(to: Float.self)) + vOffset
            p.out = out.assumingMemoryBound(to: Float.self)
            let scratch = self.scratch!.raw
            let problem = p
            return { Attention.run(problem, impl, scratch: scratch) }
        }
    }
}

extension Lowering {
    /// A linear's sizes (x is [m, k], the weight [n, k]) and the operands of x, the bias and the
    /// residual the epilogue adds, shared by the float and the int8 lowering.
    func linearOperands(_ node: Node, _ a: LinearAttributes) throws
        -> (m: Int, n: Int, k: Int, x: Int, bias: Int?, residual: Int?) {
        let ws = graph[node.inputs[1]].shape
        let (n, k) = (ws[0], ws[1])
        let x = try operand(node.inputs[0], .plain)
        let bias = a.hasBias ? try operand(node.inputs[2]) : nil
        let residual = a.epilogue.contains(.addInput) ? try operand(node.inputs[a.hasBias ? 3 : 2], .plain) : nil
        return (node.count / n, n, k, x, bias, residual)
    }

    /// A dynamically quantized linear: activations to u8 per row, oneDNN's u8·s8 → s32 matmul
    /// (zero point 128 on the source), then dequantization with bias and epilogue.
    func lowerLinearInt8(_ node: Node, _ g: ValueID, _ a: LinearAttributes, weights wsrc: ParameterSource) throws {
        let (m, n, k, x, bias, residual) = try linearOperands(node, a)

        var srcMD = try DNNL.MemoryDesc.plain([m, k], type: dnnl_u8), dstMD = try DNNL.MemoryDesc.plain([m, n], type: dnnl_s32)
        var wMD = try DNNL.MemoryDesc.any([k, n], type: dnnl_s8)
        var desc = dnnl_matmul_desc_t()
        try DNNL.check(dnnl_matmul_desc_init(&desc, &srcMD.md, &wMD.md, nil, &dstMD.md), "describing an int8 linear \([n, k])")
        let attr = try DNNL.Attributes()
        var zeroPoint: Int32 = 128
        try DNNL.check(dnnl_primitive_attr_set_zero_points(attr.attr, DNNL_ARG_SRC, 1, 0, &zeroPoint), "setting the source zero point")
        let prim = try withUnsafePointer(to: &desc) {
            try DNNL.Primitive(opDesc: UnsafeRawPointer($0), attributes: attr, context: context, what: "int8 linear \([n, k])")
        }
        scratchBytes = max(scratchBytes, prim.scratchpadBytes)
        let chosenW = prim.desc(dnnl_query_weights_md)
        let ctx = context
        let prepared = try quantizedWeights(wsrc, logical: try DNNL.MemoryDesc(dims: [k, n], type: dnnl_s8, strides: [1, k]),
                                            into: chosenW, tag: "int8")
        // Scratch of its own: the u8 activations, the row scales and the s32 products.
        let qx = add(Value(shape: [m * k], dtype: .uint8, layout: .plain, storage: .own(bytes: m * k), inputs: [x])) { _, _ in nil }
        let rowScales = add(Value(shape: [m], dtype: .float32, layout: .plain, storage: .own(bytes: m * 4), inputs: [x])) { _, _ in nil }
        let acc = add(Value(shape: [m, n], dtype: .int32, layout: .plain, storage: .own(bytes: m * n * 4), inputs: [qx, rowScales])) { _, _ in nil }
        var inputs = [x, qx, rowScales, acc]
        if let bias { inputs.append(bias) }
        if let residual { inputs.append(residual) }
        let epilogue = a.epilogue
        programOf[g.index] = add(Value(shape: node.shape, dtype: .float32, layout: .plain, storage: .own(bytes: node.byteCount),
                                       inputs: inputs)) { [unowned self] out, ptr in
            let bound = DNNL.BoundPrimitive(prim, try [
                (DNNL_ARG_SRC, DNNL.Memory(srcMD, ptr(qx), ctx)),
                (DNNL_ARG_WEIGHTS, DNNL.Memory(chosenW, prepared.packed.tensor.raw, ctx)),
                (DNNL_ARG_DST, DNNL.Memory(dstMD, ptr(acc), ctx)),
            ] + self.scratchBinding(prim), context: ctx, what: "int8 linear \([n, k])")
            self.retained.append(bound)
            let xp = UnsafePointer(ptr(x).assumingMemoryBound(to: Float.self))
            let qp = ptr(qx).assumingMemoryBound(to: UInt8.self)
            let sp = ptr(rowScales).assumingMemoryBound(to: Float.self)
            let ap = UnsafePointer(ptr(acc).assumingMemoryBound(to: Int32.self))
            let bp = bias.map { UnsafePointer(ptr($0).assumingMemoryBound(to: Float.self)) }
            let rp = residual.map { UnsafePointer(ptr($0).assumingMemoryBound(to: Float.self)) }
            let cs = UnsafePointer(prepared.scales.floats)
            let y = out.assumingMemoryBound(to: Float.self)
            return {
                Quantize.activations(xp, rows: m, k: k, qp, sp)
                try prepared.packed.whileResident { try bound.execute() }
                Quantize.dequantize(ap, rows: m, n: n, rowScales: sp, columnScales: cs, bias: bp, epilogue: epilogue,
                                    residual: rp, y)
            }
        }
    }
}

extension Lowering {
    /// A dynamically quantized convolution: activations to u8 NHWC with one scale and zero point
    /// per tensor, oneDNN's u8·s8 → s32 convolution (the zero point a run-time argument), then dequantization
    /// with bias and epilogue straight into the graph's layout (`Quantize.imageActivations`).
    /// Returns false where oneDNN has only its reference int8 kernel, and the caller runs the
    /// convolution in float.
    func lowerConvInt8(_ node: Node, _ g: ValueID, _ a: Conv2dAttributes, weights wsrc: ParameterSource) throws -> Bool {
        let xs = graph[node.inputs[0]].shape, ws = graph[node.inputs[1]].shape, ys = node.shape
        var srcMD = try DNNL.MemoryDesc(dims: xs, type: dnnl_u8, tag: dnnl_nhwc)
        var dstMD = try DNNL.MemoryDesc(dims: ys, type: dnnl_s32, tag: dnnl_nhwc)
        var wMD = try DNNL.MemoryDesc.any(ws, type: dnnl_s8)
        var desc = dnnl_convolution_desc_t()
        var (strides, dilates, padL, padR) = Self.geometry(a)
        try DNNL.check(dnnl_dilated_convolution_forward_desc_init(
            &desc, dnnl_forward_inference, dnnl_convolution_direct, &srcMD.md, &wMD.md, nil, &dstMD.md,
            &strides, &dilates, &padL, &padR), "describing an int8 conv2d \(xs) * \(ws)")
        let attr = try DNNL.Attributes()
        var zeroPoint = Int32.min  // DNNL_RUNTIME_S32_VAL: given with each run
        try DNNL.check(dnnl_primitive_attr_set_zero_points(attr.attr, DNNL_ARG_SRC, 1, 0, &zeroPoint), "setting the source zero point")
        let prim = try withUnsafePointer(to: &desc) {
            try DNNL.Primitive(opDesc: UnsafeRawPointer($0), attributes: attr, context: context, what: "int8 conv2d \(xs) * \(ws)")
        }
        guard !prim.implementation.hasPrefix("ref") else { return false }
        scratchBytes = max(scratchBytes, prim.scratchpadBytes)
        let chosenW = prim.desc(dnnl_query_weights_md)
        let ctx = context
        let prepared = try quantizedWeights(wsrc, logical: try DNNL.MemoryDesc.plain(ws, type: dnnl_s8), into: chosenW,
                                            tag: "int8conv")

        // Either of our layouts in; the output in the layout the float convolution would keep.
        var x = try operand(node.inputs[0])
        if values[x].layout == .opaque { x = try convert(x, to: .plain) }
        let inLayout = Quantize.ImageLayout(n: xs[0], c: xs[1], h: xs[2], w: xs[3], blocked: values[x].layout == .blocked8)
        let outBlocked = blocked && ys[1] % 8 == 0
        let outLayout = Quantize.ImageLayout(n: ys[0], c: ys[1], h: ys[2], w: ys[3], blocked: outBlocked)
        let residual = a.epilogue.contains(.addInput) ? try operand(node.inputs[a.hasBias ? 3 : 2], outBlocked ? .blocked8 : .plain) : nil
        let bias = a.hasBias ? try operand(node.inputs[2]) : nil
        let qBytes = xs.reduce(1, *), accBytes = ys.reduce(1, *) * 4
        let qx = add(Value(shape: [qBytes], dtype: .uint8, layout: .plain, storage: .own(bytes: qBytes), inputs: [x])) { _, _ in nil }
        let acc = add(Value(shape: [accBytes / 4], dtype: .int32, layout: .plain, storage: .own(bytes: accBytes), inputs: [qx])) { _, _ in nil }
        var inputs = [x, qx, acc]
        if let bias { inputs.append(bias) }
        if let residual { inputs.append(residual) }
        let epilogue = a.epilogue
        programOf[g.index] = add(Value(shape: ys, dtype: .float32, layout: outBlocked ? .blocked8 : .plain,
                                       storage: .own(bytes: node.byteCount), inputs: inputs)) { [unowned self] out, ptr in
            let zeroPoint = Tensor(zeros: [1], dtype: .int32)
            let bound = DNNL.BoundPrimitive(prim, try [
                (DNNL_ARG_SRC, DNNL.Memory(srcMD, ptr(qx), ctx)),
                (DNNL_ARG_WEIGHTS, DNNL.Memory(chosenW, prepared.packed.tensor.raw, ctx)),
                (DNNL_ARG_DST, DNNL.Memory(dstMD, ptr(acc), ctx)),
                (DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_SRC, DNNL.Memory(try .plain([1], type: dnnl_s32), zeroPoint.raw, ctx)),
            ] + self.scratchBinding(prim), context: ctx, what: "int8 conv2d \(xs) * \(ws)")
            self.retained.append(bound)
            self.retained.append(zeroPoint.storage)
            let zp = zeroPoint.raw.assumingMemoryBound(to: Int32.self)
            let xp = UnsafePointer(ptr(x).assumingMemoryBound(to: Float.self))
            let qp = ptr(qx).assumingMemoryBound(to: UInt8.self)
            let ap = UnsafePointer(ptr(acc).assumingMemoryBound(to: Int32.self))
            let bp = bias.map { UnsafePointer(ptr($0).assumingMemoryBound(to: Float.self)) }
            let rp = residual.map { UnsafePointer(ptr($0).assumingMemoryBound(to: Float.self)) }
            let cs = UnsafePointer(prepared.scales.floats)
            let y = out.assumingMemoryBound(to: Float.self)
            return {
                let (sx, z) = Quantize.imageActivations(xp, inLayout, qp)
                zp.pointee = z
                try prepared.packed.whileResident { try bound.execute() }
                Quantize.dequantizeImage(ap, outLayout, scale: sx, columnScales: cs, bias: bp, epilogue: epilogue, residual: rp, y)
            }
        }
        return true
    }
}

/// int8 weights in the layout a primitive asked for, with their per-channel scales.
final class QuantizedWeights {
    let packed: PreparedBuffer
    let scales: Tensor
    init(packed: PreparedBuffer, scales: Tensor) { self.packed = packed; self.scales = scales }
}
