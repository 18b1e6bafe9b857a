import DiffuseCore
import DiffuseCPU
import DiffuseGraph
import Testing

/// Deterministic non-zero test data (never zeros: they hide unwritten outputs).
func randomTensor(_ shape: [Int], seed: UInt64, scale: Float = 1) -> Tensor {
    var s = seed &* 0x9E37_79B9_7F4A_7C15 &+ 1
    let t = Tensor(zeros: shape)
    for i in 0..<t.count {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17
        var v = (Float(s >> 40) / Float(1 << 24)) * 2 - 1
        if abs(v) < 0.01 { v = 0.37 }
        t.floats[i] = v * scale
    }
    return t
}

struct OpCase {
    var inputs: [(String, Tensor)] = []
    var params: [(String, Tensor)] = []
}

/// Builds a graph with `build`, runs it on the reference and the CPU backend (every option
/// set given), and checks max |cpu − ref| ≤ tol · max(1, max |ref|).
func check(_ label: String, _ c: OpCase, options: [CompileOptions] = [CompileOptions(), CompileOptions(flags: ["baseline"])],
           tol: Float = 1e-5, build: (GraphBuilder, [String: Value], Params) -> Value) throws {
    let b = GraphBuilder()
    var ins: [String: Value] = [:]
    for (n, t) in c.inputs { ins[n] = b.input(n, shape: t.shape, dtype: t.dtype) }
    let out = build(b, ins, Params(b))
    b.output("out", out)
    let graph = try b.finish()
    let weights = ModelWeights(InMemoryTensors(c.params))
    let taken = Set(graph.inputs.map(\.name))
    let feeds = Dictionary(uniqueKeysWithValues: c.inputs.filter { taken.contains($0.0) })
    let reference = ReferenceBackend()
    let ref = try reference.compile(graph, weights: weights, options: CompileOptions()).run(host: feeds, on: reference)["out"]!
    let cpu = try CPUBackend()
    for o in options {
        let got = try cpu.compile(graph, weights: weights, options: o).run(host: feeds, on: cpu)["out"]!
        #expect(got.shape == ref.shape, "\(label): shape \(got.shape) vs \(ref.shape)")
        let r = ref.toFloatArray(), g = got.toFloatArray()
        var maxErr: Float = 0, maxRef: Float = 0
        for i in r.indices { maxErr = max(maxErr, abs(r[i] - g[i])); maxRef = max(maxRef, abs(r[i])) }
        #expect(!g.contains { $0.isNaN }, "\(label): NaN in output")
        #expect(maxErr <= tol * max(1, maxRef), "\(label) [\(o.attention) \(o.flags.sorted())]: max error \(maxErr), max |ref| \(maxRef)")
    }
}

@Suite("CPU ops against the reference interpreter")
struct OpTests {
    @Test("conv2d: kernels, strides, asymmetric padding, dilation, layouts")
    func conv() throws {
        let cases: [(x: [Int], o: Int, k: Int, attrs: Conv2dAttributes, bias: Bool)] = [
            ([2, 3, 7, 5], 16, 3, Conv2dAttributes(padding: (1, 1, 1, 1)), true),
            ([1, 8, 9, 9], 8, 1, Conv2dAttributes(), true),
            ([1, 16, 8, 6], 8, 3, Conv2dAttributes(stride: (2, 2), padding: (0, 1, 0, 1)), true),
            ([2, 8, 6, 6], 3, 3, Conv2dAttributes(padding: (1, 1, 1, 1)), false),
            ([1, 4, 9, 7], 8, 3, Conv2dAttributes(padding: (2, 2, 2, 2), dilation: (2, 2)), true),
        ]
        for (i, c) in cases.enumerated() {
            var oc = OpCase()
            oc.inputs = [("x", randomTensor(c.x, seed: UInt64(i)))]
            oc.params = [("w", randomTensor([c.o, c.x[1], c.k, c.k], seed: 100 + UInt64(i), scale: 0.3)),
                         ("b", randomTensor([c.o], seed: 200 + UInt64(i)))]
            try check("conv \(c.x) -> \(c.o) k\(c.k)", oc) { b, ins, p in
                ins["x"]!.conv2d(p.weight("w", [c.o, c.x[1], c.k, c.k]), c.bias ? p.weight("b", [c.o]) : nil, attributes: c.attrs)
            }
        }
    }

    @Test("conv2d with fused epilogue: activation, residual add, scale")
    func convEpilogue() throws {
        var oc = OpCase()
        oc.inputs = [("x", randomTensor([2, 8, 7, 5], seed: 1)), ("r", randomTensor([2, 16, 7, 5], seed: 2))]
        oc.params = [("w", randomTensor([16, 8, 3, 3], seed: 3, scale: 0.2)), ("b", randomTensor([16], seed: 4))]
        try check("conv+silu", oc) { b, ins, p in
            ins["x"]!.conv2d(p.weight("w", [16, 8, 3, 3]), p.weight("b", [16]), padding: 1).silu()
        }
        try check("conv+residual/scale", oc) { b, ins, p in
            let h = ins["x"]!.conv2d(p.weight("w", [16, 8, 3, 3]), p.weight("b", [16]), padding: 1)
            return (ins["r"]! + h) / 2
        }
        try check("residual used twice", oc) { b, ins, p in
            let h = ins["x"]!.conv2d(p.weight("w", [16, 8, 3, 3]), p.weight("b", [16]), padding: 1)
            return (h + ins["r"]!) * ins["r"]!
        }
    }

    @Test("linear, batched matmul, transposed matmul")
    func linearAndMatmul() throws {
        var oc = OpCase()
        oc.inputs = [("x", randomTensor([2, 7, 13], seed: 5)), ("r", randomTensor([2, 7, 9], seed: 6)),
                     ("a", randomTensor([3, 5, 13], seed: 7)), ("bt", randomTensor([3, 11, 13], seed: 8)),
                     ("bn", randomTensor([3, 13, 11], seed: 9))]
        oc.params = [("w", randomTensor([9, 13], seed: 10)), ("b", randomTensor([9], seed: 11))]
        try check("linear", oc) { _, ins, p in ins["x"]!.linear(p.weight("w", [9, 13]), p.weight("b", [9])) }
        try check("linear no bias", oc) { _, ins, p in ins["x"]!.linear(p.weight("w", [9, 13]), nil) }
        try check("linear+gelu+residual", oc) { _, ins, p in
            ins["x"]!.linear(p.weight("w", [9, 13]), p.weight("b", [9])).gelu() + ins["r"]!
        }
        try check("matmul", oc) { _, ins, _ in ins["a"]!.matmul(ins["bn"]!) }
        try check("matmul transposed", oc) { _, ins, _ in ins["a"]!.matmul(ins["bt"]!, transposeB: true) }
    }

    @Test("binary ops with broadcasting, plain and blocked")
    func binary() throws {
        var oc = OpCase()
        oc.inputs = [("x", randomTensor([2, 16, 5, 3], seed: 12)), ("y", randomTensor([2, 16, 5, 3], seed: 13)),
                     ("v", randomTensor([2, 16, 1, 1], seed: 14)), ("c", randomTensor([16, 1, 1], seed: 15)),
                     ("row", randomTensor([3], seed: 16)), ("s", randomTensor([1], seed: 17)),
                     ("p", randomTensor([2, 1, 3], seed: 18)), ("q", randomTensor([1, 4, 1], seed: 19))]
        oc.params = [("w", randomTensor([16, 16, 1, 1], seed: 20, scale: 0.3)), ("b", randomTensor([16], seed: 21))]
        for op in BinaryOp.allCases {
            // Divisors are kept away from zero: x / (|y| + 0.5) is well conditioned.
            func rhs(_ v: Value) -> Value { op == .div ? v.unary(.abs).affine(scale: 1, shift: 0.5) : v }
            try check("\(op) same", oc) { _, ins, _ in ins["x"]!.binary(op, rhs(ins["y"]!)) }
            try check("\(op) channel", oc) { _, ins, _ in ins["x"]!.binary(op, rhs(ins["v"]!)) }
            try check("\(op) row", oc) { _, ins, _ in ins["x"]!.binary(op, rhs(ins["row"]!)) }
            try check("\(op) scalar", oc) { _, ins, _ in ins["s"]!.binary(op, rhs(ins["x"]!)) }
            try check("\(op) general", oc) { _, ins, _ in ins["p"]!.binary(op, rhs(ins["q"]!)) }
            // A blocked conv output with a per-(n, c) vector, each side.
            try check("\(op) blocked channel", oc) { _, ins, p in
                let h = ins["x"]!.conv2d(p.weight("w", [16, 16, 1, 1]), p.weight("b", [16]))
                return h.binary(op, rhs(ins["v"]!)).binary(op, rhs(ins["c"]!))
            }
            try check("\(op) vector with blocked", oc) { _, ins, p in
                ins["v"]!.binary(op, rhs(ins["x"]!.conv2d(p.weight("w", [16, 16, 1, 1]), p.weight("b", [16]))))
            }
        }
    }

    @Test("unary ops, affine, clamp")
    func unary() throws {
        var oc = OpCase()
        oc.inputs = [("x", randomTensor([3, 37], seed: 22, scale: 6))]
        for op in UnaryOp.allCases {
            let positive = op == .sqrt || op == .rsqrt
            try check("\(op)", oc) { _, ins, _ in (positive ? ins["x"]!.unary(.abs).affine(scale: 1, shift: 0.1) : ins["x"]!).unary(op) }
        }
        try check("affine", oc) { _, ins, _ in ins["x"]!.affine(scale: 0.3, shift: -2) }
        try check("clamp", oc) { _, ins, _ in ins["x"]!.clamp(min: -1.5, max: 2) }
    }

    @Test("group norm (plain, blocked, fused SiLU), layer norm, softmax")
    func norms() throws {
        var oc = OpCase()
        oc.inputs = [("x", randomTensor([2, 6, 7, 5], seed: 23, scale: 3)), ("t", randomTensor([3, 7, 13], seed: 24, scale: 4)),
                     ("y", randomTensor([2, 16, 4, 3], seed: 25))]
        oc.params = [("gw", randomTensor([6], seed: 26)), ("gb", randomTensor([6], seed: 27)),
                     ("lw", randomTensor([13], seed: 28)), ("lb", randomTensor([13], seed: 29)),
                     ("w", randomTensor([16, 16, 3, 3], seed: 30, scale: 0.2)), ("b", randomTensor([16], seed: 31)),
                     ("bw", randomTensor([16], seed: 32)), ("bb", randomTensor([16], seed: 33))]
        try check("group norm", oc) { _, ins, p in
            ins["x"]!.groupNorm(groups: 3, eps: 1e-5, weight: p.weight("gw", [6]), bias: p.weight("gb", [6]))
        }
        try check("group norm + silu", oc) { _, ins, p in
            ins["x"]!.groupNorm(groups: 2, eps: 1e-6, weight: p.weight("gw", [6]), bias: p.weight("gb", [6])).silu()
        }
        try check("blocked group norm (groups straddle blocks)", oc) { _, ins, p in
            let h = ins["y"]!.conv2d(p.weight("w", [16, 16, 3, 3]), p.weight("b", [16]), padding: 1)
            return h.groupNorm(groups: 4, eps: 1e-5, weight: p.weight("bw", [16]), bias: p.weight("bb", [16])).silu()
        }
        try check("layer norm", oc) { _, ins, p in
            ins["t"]!.layerNorm(eps: 1e-5, weight: p.weight("lw", [13]), bias: p.weight("lb", [13]))
        }
        try check("softmax", oc) { _, ins, _ in ins["t"]!.softmax() }
        // A mean 100 times the spread: naive E[x²]−E[x]² in float32 would lose the variance.
        var shifted = OpCase()
        let big = randomTensor([1, 6, 9, 9], seed: 34, scale: 0.5)
        for i in 0..<big.count { big.floats[i] += 50 }
        shifted.inputs = [("x", big)]
        shifted.params = oc.params
        try check("group norm, large mean", shifted, tol: 1e-4) { _, ins, p in
            ins["x"]!.groupNorm(groups: 3, eps: 1e-5, weight: p.weight("gw", [6]), bias: p.weight("gb", [6]))
        }
    }

    @Test("attention: fused equals math; packings; causal; odd sizes")
    func attention() throws {
        let impls: [CompileOptions] = [CompileOptions(attention: .fused), CompileOptions(attention: .math),
                                       CompileOptions(attention: .sliced(3))]
        for (heads, d, sq, sk) in [(1, 5, 7, 11), (2, 40, 70, 77), (8, 40, 300, 300), (2, 64, 9, 600)] {
            var oc = OpCase()
            oc.inputs = [("q", randomTensor([2, sq, heads * d], seed: 35)), ("k", randomTensor([2, sk, heads * d], seed: 36)),
                         ("v", randomTensor([2, sk, heads * d], seed: 37)), ("qkv", randomTensor([2, sq, 3 * heads * d], seed: 38)),
                         ("kv", randomTensor([2, sk, 2 * heads * d], seed: 39))]
            try check("attention h\(heads) d\(d) \(sq)x\(sk)", oc, options: impls) { _, ins, _ in
                ins["q"]!.attention(ins["k"]!, ins["v"]!, heads: heads)
            }
            try check("causal h\(heads) d\(d) \(sq)", oc, options: impls) { _, ins, _ in
                ins["q"]!.attention(ins["q"]!, ins["q"]!, heads: heads, causal: true)
            }
            let attrs = AttentionAttributes(heads: heads, scale: 1 / Float(d).squareRoot(), packing: .qkv)
            try check("packed qkv", oc, options: impls) { b, ins, _ in
                b.emit(.attention(attrs), [ins["qkv"]!], shape: [2, sq, heads * d])
            }
            var kvAttrs = attrs
            kvAttrs.packing = .kv
            try check("packed kv", oc, options: impls) { b, ins, _ in
                b.emit(.attention(kvAttrs), [ins["q"]!, ins["kv"]!], shape: [2, sq, heads * d])
            }
        }
    }

    @Test("data movement: geglu, upsample, concat, reshape, permute, slice, embedding, timesteps, reduce, cast")
    func dataMovement() throws {
        var oc = OpCase()
        oc.inputs = [("x", randomTensor([2, 8, 5, 3], seed: 40)), ("y", randomTensor([2, 3, 5, 3], seed: 41)),
                     ("g", randomTensor([3, 5, 14], seed: 42)), ("t", Tensor(shape: [3], floats: [999, 1, 437.25])),
                     ("ids", Tensor(shape: [2, 4], dtype: .int64, values: [Int64(0), 5, 2, 9, 1, 1, 3, 7])),
                     ("ids32", Tensor(shape: [3], dtype: .int32, values: [Int32(4), 0, 8]))]
        oc.params = [("w", randomTensor([8, 8, 3, 3], seed: 43, scale: 0.2)), ("b", randomTensor([8], seed: 44)),
                     ("table", randomTensor([10, 6], seed: 45))]
        try check("geglu", oc) { _, ins, _ in ins["g"]!.geglu() }
        try check("upsample", oc) { _, ins, _ in ins["y"]!.upsampleNearest2x() }
        try check("upsample blocked", oc) { _, ins, p in
            ins["x"]!.conv2d(p.weight("w", [8, 8, 3, 3]), p.weight("b", [8]), padding: 1).upsampleNearest2x()
        }
        try check("concat channels", oc) { _, ins, _ in Value.concat([ins["x"]!, ins["y"]!], axis: 1) }
        try check("concat blocked", oc) { _, ins, p in
            let h = ins["x"]!.conv2d(p.weight("w", [8, 8, 3, 3]), p.weight("b", [8]), padding: 1)
            return Value.concat([h, h.silu()], axis: 1)
        }
        try check("concat last axis", oc) { _, ins, _ in Value.concat([ins["x"]!, ins["x"]!.scaled(2)], axis: 3) }
        try check("reshape", oc) { _, ins, _ in ins["x"]!.reshape([2, 8, 15]).scaled(3) }
        for perm in [[0, 2, 3, 1], [0, 3, 1, 2], [1, 0, 2, 3], [3, 2, 1, 0], [0, 1, 3, 2], [2, 0, 3, 1]] {
            try check("permute \(perm)", oc) { _, ins, _ in ins["x"]!.permute(perm) }
        }
        try check("slice axis 0 (view)", oc) { _, ins, _ in ins["x"]!.slice(axis: 0, start: 1, length: 1).scaled(2) }
        try check("slice axis 1", oc) { _, ins, _ in ins["x"]!.slice(axis: 1, start: 2, length: 3) }
        try check("chunk last", oc) { _, ins, _ in ins["g"]!.chunk(2, axis: -1)[1] }
        try check("embedding int64", oc) { _, ins, p in ins["ids"]!.embedding(p.weight("table", [10, 6])) }
        try check("embedding int32", oc) { _, ins, p in ins["ids32"]!.embedding(p.weight("table", [10, 6])) }
        for flip in [true, false] {
            try check("timesteps flip=\(flip)", oc) { _, ins, _ in
                ins["t"]!.timestepEmbedding(TimestepEmbeddingAttributes(dim: 10, flipSinToCos: flip, downscaleFreqShift: 1))
            }
        }
        try check("reduce mean", oc) { _, ins, _ in ins["x"]!.reduce(.mean, axes: [1, 2, 3]) }
        try check("reduce max", oc) { _, ins, _ in ins["x"]!.reduce(.max, axes: [2]) }
        try check("cast", oc) { _, ins, _ in ins["ids"]!.cast(.float32).scaled(0.5) }
        for alignCorners in [true, false] {
            for (h, w) in [(10, 6), (3, 7), (1, 1), (5, 2)] {
                try check("bilinear \(h)x\(w) align_corners=\(alignCorners)", oc) { _, ins, _ in
                    ins["x"]!.resizeBilinear(height: h, width: w, alignCorners: alignCorners)
                }
            }
        }
        try check("bilinear after a blocked conv", oc) { _, ins, p in
            ins["x"]!.conv2d(p.weight("w", [8, 8, 3, 3]), p.weight("b", [8]), padding: 1).resizeBilinear(height: 10, width: 6, alignCorners: true)
        }
        try check("max pool 3x3 stride 2 after zero padding", oc) { _, ins, _ in
            ins["x"]!.zeroPad2d(top: 0, bottom: 1, left: 1, right: 1).maxPool2d(kernel: (3, 3), stride: (2, 2))
        }
        try check("max pool 2x1 stride 1x2", oc) { _, ins, _ in ins["x"]!.maxPool2d(kernel: (2, 1), stride: (1, 2)) }
    }
}

@Suite("Graph passes keep results")
struct PassTests {
    @Test("fuse_qkv_projections: self-attention to one QKV linear, cross-attention to one KV linear")
    func fuseQKV() throws {
        let b = GraphBuilder()
        let x = b.input("x", shape: [2, 9, 16]), ctx = b.input("ctx", shape: [2, 5, 12])
        let p = Params(b)
        func attn(_ p: Params, _ kv: Value, bias: Bool) -> Value {
            let q = Linear(p["to_q"], 16, 16, bias: bias)(x)
            let k = Linear(p["to_k"], kv.shape[2], 16, bias: bias)(kv)
            let v = Linear(p["to_v"], kv.shape[2], 16, bias: bias)(kv)
            return q.attention(k, v, heads: 2)
        }
        b.output("out", attn(p["attn1"], x, bias: true) + attn(p["attn2"], ctx, bias: false))
        let graph = try b.finish()
        let fused = GraphPasses.fuseQKVProjections(graph)
        let packings = fused.nodes.compactMap { n -> AttentionPacking? in
            if case .attention(let a) = n.op { return a.packing } else { return nil }
        }
        #expect(packings == [.qkv, .kv])
        // QKV for self-attention; cross-attention keeps its to_q and fuses K and V.
        #expect(fused.nodes.filter { if case .linear = $0.op { true } else { false } }.count == 3)
        let weights = ModelWeights(RandomWeights(parameters: b.declaredParameters, seed: 3))
        let feeds = ["x": randomTensor([2, 9, 16], seed: 1), "ctx": randomTensor([2, 5, 12], seed: 2)]
        let cpu = try CPUBackend()
        let plain = try cpu.compile(graph, weights: weights, options: CompileOptions()).run(host: feeds, on: cpu)["out"]!
        let packed = try cpu.compile(fused, weights: weights, options: CompileOptions()).run(host: feeds, on: cpu)["out"]!
        let a = plain.toFloatArray(), c = packed.toFloatArray()
        #expect(zip(a, c).map { abs($0 - $1) }.max()! <= 1e-5)
    }
}

@Suite("Dynamic int8 linears")
struct Int8Tests {
    /// Quantized against the float reference: per-row 8-bit activations and per-channel 7-bit
    /// weights keep a linear within about 1% of float; bias, activation and residual epilogues
    /// run in the dequantization.
    @Test("int8 linear close to float, with epilogues", arguments: [(5, 64, 96), (300, 320, 320), (77, 768, 64)])
    func linear(_ m: Int, _ k: Int, _ n: Int) throws {
        let b = GraphBuilder()
        let x = b.input("x", shape: [m, k]), r = b.input("r", shape: [m, n])
        let p = Params(b)
        b.output("out", Linear(p["fc"], k, n)(x).gelu() + r)
        let graph = try b.finish()
        let quantized = GraphPasses.quantizeLinears(GraphPasses.fuseForCPU(graph), filter: { _, _, _ in true })
        #expect(quantized.nodes.contains { if case .linear(let a) = $0.op { a.quantization == .dynamicInt8 } else { false } })
        let weights = ModelWeights(RandomWeights(parameters: b.declaredParameters, seed: 9))
        let feeds = ["x": randomTensor([m, k], seed: 4), "r": randomTensor([m, n], seed: 5)]
        let cpu = try CPUBackend()
        let want = try cpu.compile(graph, weights: weights, options: CompileOptions()).run(host: feeds, on: cpu)["out"]!
        let got = try cpu.compile(quantized, weights: weights, options: CompileOptions(flags: ["baseline"])).run(host: feeds, on: cpu)["out"]!
        let w = want.toFloatArray(), g = got.toFloatArray()
        let scale = max(1, w.map(abs).max()!)
        let err = zip(w, g).map { abs($0 - $1) }.max()! / scale
        print("int8 linear \(m)x\(k)x\(n): max error \(err) of max |out|")
        #expect(err < 2e-2)
        #expect(err > 0, "the int8 path did not run (identical to float)")
    }

    /// int8 convolutions against float: per-tensor 8-bit activations and per-channel 7-bit
    /// weights; NHWC in and out of oneDNN from both of our layouts (blocked when compiled,
    /// plain in the baseline), with the SiLU and the residual add fused or not.
    @Test("int8 conv2d close to float: 3x3, strided with asymmetric padding, 1x1, epilogues, both layouts")
    func conv() throws {
        let b = GraphBuilder()
        let x = b.input("x", shape: [2, 64, 12, 10]), r = b.input("r", shape: [2, 96, 12, 10])
        let p = Params(b)
        let h = x.conv2d(p.weight("c1.weight", [96, 64, 3, 3]), p.weight("c1.bias", [96]), padding: 1).silu() + r
        let down = h.conv2d(p.weight("c2.weight", [64, 96, 3, 3]), p.weight("c2.bias", [64]),
                            attributes: Conv2dAttributes(stride: (2, 2), padding: (0, 1, 0, 1)))
        b.output("out", down.conv2d(p.weight("c3.weight", [128, 64, 1, 1]), nil))
        let graph = try b.finish()
        let quantized = GraphPasses.quantizeConvolutions(graph, filter: { _, _ in true })
        #expect(quantized.nodes.filter { if case .conv2d(let a) = $0.op { a.quantization == .dynamicInt8 } else { false } }.count == 3)
        let weights = ModelWeights(RandomWeights(parameters: b.declaredParameters, seed: 11))
        let feeds = ["x": randomTensor([2, 64, 12, 10], seed: 12), "r": randomTensor([2, 96, 12, 10], seed: 13)]
        let cpu = try CPUBackend()
        let want = try cpu.compile(graph, weights: weights, options: CompileOptions()).run(host: feeds, on: cpu)["out"]!
        for options in [CompileOptions(), CompileOptions(flags: ["baseline"])] {
            let got = try cpu.compile(quantized, weights: weights, options: options).run(host: feeds, on: cpu)["out"]!
            let w = want.toFloatArray(), g = got.toFloatArray()
            let err = zip(w, g).map { abs($0 - $1) }.max()! / max(1, w.map(abs).max()!)
            print("int8 conv2d chain \(options.flags.sorted()): max error \(err) of max |out|")
            #expect(err < 2e-2, "\(options.flags.sorted()): max error \(err)")
            #expect(err > 0, "the int8 path did not run (identical to float)")
        }
    }

    /// The pipeline marks linears for quantization before the backend's fusion passes run:
    /// the activation and the residual add must still fold into the quantized linear.
    @Test("epilogues fuse into linears already marked for int8")
    func epiloguesAfterQuantization() throws {
        let b = GraphBuilder()
        let x = b.input("x", shape: [64, 128]), r = b.input("r", shape: [64, 96])
        b.output("out", Linear(Params(b)["fc"], 128, 96)(x).gelu() + r)
        let graph = try b.finish()
        let quantized = GraphPasses.quantizeLinears(graph, filter: { _, _, _ in true })
        let fused = GraphPasses.fuseForCPU(quantized)
        let linears = fused.nodes.compactMap { if case .linear(let a) = $0.op { a } else { nil } }
        #expect(linears.count == 1 && linears[0].quantization == .dynamicInt8)
        #expect(linears.first?.epilogue == [.activation(.gelu), .addInput], "epilogue \(linears.first?.epilogue ?? [])")
        #expect(fused.nodes.count < quantized.nodes.count)
        let weights = ModelWeights(RandomWeights(parameters: b.declaredParameters, seed: 3))
        let feeds = ["x": randomTensor([64, 128], seed: 1), "r": randomTensor([64, 96], seed: 2)]
        let cpu = try CPUBackend()
        let want = try cpu.compile(graph, weights: weights, options: CompileOptions()).run(host: feeds, on: cpu)["out"]!
        let got = try cpu.compile(quantized, weights: weights, options: CompileOptions()).run(host: feeds, on: cpu)["out"]!
        let w = want.toFloatArray(), g = got.toFloatArray()
        let err = zip(w, g).map { abs($0 - $1) }.max()! / max(1, w.map(abs).max()!)
        #expect(err < 2e-2 && err > 0, "max error \(err)")
    }
}

@Suite("16-bit weight storage")
struct HalfWeightTests {
    /// Weights kept as float16/bfloat16 and widened before each use: the result is the float32
    /// one with the weights rounded to 16 bits (relative differences of 2⁻¹¹ / 2⁻⁸ per weight).
    @Test("conv and linear with float16 and bfloat16 weights", arguments: [DType.float16, .bfloat16])
    func halfWeights(_ storage: DType) throws {
        var oc = OpCase()
        oc.inputs = [("x", randomTensor([2, 8, 9, 7], seed: 1)), ("t", randomTensor([2, 5, 24], seed: 2))]
        oc.params = [("w", randomTensor([16, 8, 3, 3], seed: 3, scale: 0.3)), ("b", randomTensor([16], seed: 4)),
                     ("lw", randomTensor([32, 24], seed: 5)), ("lb", randomTensor([32], seed: 6))]
        let tol: Float = storage == .float16 ? 2e-3 : 1.5e-2
        let options = [CompileOptions(weightStorage: storage), CompileOptions(weightStorage: storage, flags: ["baseline"])]
        try check("conv \(storage)", oc, options: options, tol: tol) { _, ins, p in
            ins["x"]!.conv2d(p.weight("w", [16, 8, 3, 3]), p.weight("b", [16]), padding: 1).silu()
        }
        try check("linear \(storage)", oc, options: options, tol: tol) { _, ins, p in
            ins["t"]!.linear(p.weight("lw", [32, 24]), p.weight("lb", [32]))
        }
    }
}
