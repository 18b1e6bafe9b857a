import DiffuseCore
import DiffuseGraph

/// Tensors held in memory, for tests: named random weights.
final class MemorySource: TensorSource {
    var tensors: [String: Tensor] = [:]
    var names: [String] = []
    var origin: String { "self-test weights" }
    var tensorNames: [String] { names }
    func info(_ name: String) -> (dtype: DType, shape: [Int])? { tensors[name].map { ($0.dtype, $0.shape) } }
    func tensor(_ name: String) throws -> Tensor {
        guard let t = tensors[name] else { throw SafeTensorsError.missingTensor(file: origin, tensor: name) }
        return t
    }
    func add(_ name: String, _ t: Tensor) { if tensors[name] == nil { names.append(name) }; tensors[name] = t }
}

/// A deterministic generator (splitmix64) for test data.
struct TestRandom {
    var state: UInt64
    init(_ seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    /// Uniform in [lo, hi), never exactly zero.
    mutating func uniform(_ lo: Float, _ hi: Float) -> Float {
        let u = Float(next() >> 40) * (1 / Float(1 << 24))
        let v = lo + (hi - lo) * u
        return v == 0 ? 1e-3 : v
    }
    mutating func tensor(_ shape: [Int], _ lo: Float = -1, _ hi: Float = 1) -> Tensor {
        let n = shape.reduce(1, *)
        return Tensor(shape: shape, floats: (0..<n).map { _ in uniform(lo, hi) })
    }
}

/// One op check: a small graph, its inputs and weights, run on the GPU and on ReferenceBackend.
public struct OpCase: Sendable, CustomStringConvertible {
    public let name: String
    /// Precisions to run (all four unless the op has no float path, e.g. casts to int).
    var precisions: [Precision] = Precision.allCases
    var attention: [AttentionImplementation] = [.fused]
    var weightStorage: DType? = nil
    /// Backend flag sets to run (convolutions: with cuDNN and with im2col + GEMM).
    var flagSets: [Set<String>] = [[]]
    /// The allowed error where the op itself is approximate (quantized linears), used where it
    /// is larger than the precision's.
    var tolerance: Double? = nil
    /// Builds the graph; returns host inputs and weights.
    let make: @Sendable (GraphBuilder, inout TestRandom, MemorySource) -> [String: Tensor]

    public var description: String { name }

    /// The graph, host inputs and weights of this case (deterministic).
    func build() throws -> (graph: Graph, feeds: [String: Tensor], weights: MemorySource) {
        let b = GraphBuilder()
        let source = MemorySource()
        var rng = TestRandom(stableHash(name))
        let feeds = make(b, &rng, source)
        return (try b.finish(), feeds, source)
    }

    /// The outputs ReferenceBackend computes for this case.
    public func referenceOutputs() throws -> [String: Tensor] {
        let (graph, feeds, source) = try build()
        let exe = try ReferenceBackend().compile(graph, weights: ModelWeights(source), options: CompileOptions())
        return try exe.run(host: feeds, on: ReferenceBackend())
    }

    /// Allowed max |gpu - ref| / max(1, max |ref|).
    static func tolerance(_ p: Precision) -> Double {
        switch p {
        case .float32: return 2e-4
        case .tf32: return 2e-2
        case .float16: return 2e-2
        case .bfloat16: return 8e-2
        }
    }
}

extension OpCase {
    init(_ name: String, precisions: [Precision] = Precision.allCases, attention: [AttentionImplementation] = [.fused],
         weightStorage: DType? = nil, _ make: @escaping @Sendable (GraphBuilder, inout TestRandom, MemorySource) -> [String: Tensor]) {
        self.name = name
        self.precisions = precisions
        self.attention = attention
        self.weightStorage = weightStorage
        self.make = make
        // Convolutions run with cuDNN and with im2col + GEMM, image ops also channels-last,
        // GEMMs and convolutions also with the algorithms autotuning picks, and attention with
        // both fused kernels.
        if name.hasPrefix("attention") {
            flagSets = [[], ["basic-attention"]]
        } else if name.hasPrefix("conv") {
            flagSets = [[], ["no-cudnn"], ["channels-last"], ["channels-last", "no-cudnn"], ["autotune"],
                        ["channels-last", "autotune"], ["channels-last", "no-cudnn", "autotune"]]
        } else if name.hasPrefix("channels-last") {
            flagSets = [[], ["channels-last"], ["channels-last", "no-cudnn"], ["channels-last", "autotune"]]
        } else if ["group_norm", "upsample"].contains(where: { name.hasPrefix($0) }) {
            flagSets = [[], ["channels-last"]]
        } else if ["linear", "matmul"].contains(where: { name.hasPrefix($0) }), !name.contains("int8"), !name.contains("fp8") {
            flagSets = [[], ["autotune"]]
        }
    }
}

/// The result of one op check in one configuration.
public struct OpCheck: CustomStringConvertible, Sendable {
    public let name: String
    public let configuration: String
    public let error: Double
    public let tolerance: Double
    public let failure: String?
    /// Why the check did not run on this device (it then counts as passed).
    public var skipped: String? = nil
    public var passed: Bool { skipped != nil || (failure == nil && error <= tolerance) }
    public var description: String {
        if let skipped { return "skip  \(pad(name, 34)) \(pad(configuration, 22)) \(skipped)" }
        let status = passed ? "pass" : "FAIL"
        let detail = failure.map { " (\($0))" } ?? ""
        return "\(status)  \(pad(name, 34)) \(pad(configuration, 22)) max err \(formatError(error)) / tol \(formatError(tolerance))\(detail)"
    }
}

func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s : s + String(repeating: " ", count: n - s.count) }

func formatError(_ e: Double) -> String {
    if e.isNaN { return "nan" }
    if e == 0 { return "0" }
    var m = e, x = 0
    while m < 1 { m *= 10; x -= 1 }
    while m >= 10 { m /= 10; x += 1 }
    let r = Int((m * 100).rounded())
    return "\(r / 100).\(String(format2: r % 100))e\(x)"
}

extension String {
    init(format2 v: Int) { self = v < 10 ? "0\(v)" : "\(v)" }
}

public enum OpCases {
    static func param(_ b: GraphBuilder, _ w: MemorySource, _ r: inout TestRandom, _ name: String, _ shape: [Int],
                      _ lo: Float = -1, _ hi: Float = 1) -> Value {
        w.add(name, r.tensor(shape, lo, hi))
        return b.parameter(name, shape: shape)
    }

    /// Dynamically quantized linears against the float reference, at a tolerance that fits the
    /// quantization (int8: steps of 1/127 of each row's and channel's range; E4M3: 3 mantissa
    /// bits). K and N off the multiples of 16 cuBLASLt wants run through the zero padding; a
    /// chunk cap runs the chunked path.
    static var quantizedLinears: [OpCase] {
        var cases: [OpCase] = []
        let shapes: [(String, [Int], Int, Bool, [Epilogue], Set<String>)] = [
            // name, x shape, out features, bias, epilogue, flags
            ("bias", [2, 9, 64], 48, true, [], []),
            ("bias gelu+input", [2, 9, 64], 48, true, [.activation(.gelu), .addInput], []),
            ("k37 n19 (padded) +input*0.5", [2, 7, 37], 19, false, [.addInput, .scale(0.5)], []),
            ("chunks of 16 rows +silu", [3, 15, 96], 40, true, [.activation(.silu)], ["quantize-chunk-rows=16"]),
        ]
        for q in [Quantization.dynamicInt8, .fp8] {
            for (suffix, xs, nOut, bias, epi, flags) in shapes {
                var c = OpCase("linear \(q == .fp8 ? "fp8" : "int8") \(suffix)") { b, r, w in
                    let x = b.input("x", shape: xs)
                    var ins = [x, param(b, w, &r, "w", [nOut, xs.last!], -0.3, 0.3)]
                    if bias { ins.append(param(b, w, &r, "b", [nOut])) }
                    let outShape = xs.dropLast() + [nOut]
                    var feeds = ["x": r.tensor(xs)]
                    for (k, e) in epi.enumerated() where e == .addInput {
                        ins.append(b.input("r\(k)", shape: Array(outShape)))
                        feeds["r\(k)"] = r.tensor(Array(outShape))
                    }
                    let a = LinearAttributes(epilogue: epi, quantization: q, hasBias: bias)
                    b.output("y", b.emit(.linear(a), ins, shape: Array(outShape)))
                    return feeds
                }
                c.tolerance = q == .fp8 ? 8e-2 : 2e-2
                c.flagSets = [flags]
                cases.append(c)
            }
        }
        return cases
    }

    /// Every op check, simple ops first (a kernel that breaks the context stops the rest).
    public static var all: [OpCase] {
        var cases: [OpCase] = []
        for u in UnaryOp.allCases {
            let positive: Bool = [.sqrt, .rsqrt].contains(u)
            cases.append(OpCase("unary \(u.rawValue)") { b, r, _ in
                let x = b.input("x", shape: [3, 5, 67])
                b.output("y", x.unary(u))
                return ["x": r.tensor([3, 5, 67], positive ? 0.1 : -3, 3)]
            })
        }
        for op in BinaryOp.allCases {
            cases.append(OpCase("binary \(op.rawValue) same shape") { b, r, _ in
                let x = b.input("a", shape: [4, 33]), y = b.input("b", shape: [4, 33])
                b.output("y", x.binary(op, y))
                return ["a": r.tensor([4, 33]), "b": r.tensor([4, 33], 0.5, 2)]
            })
            cases.append(OpCase("binary \(op.rawValue) broadcast") { b, r, _ in
                let x = b.input("a", shape: [2, 3, 5, 7]), y = b.input("b", shape: [3, 1, 7])
                b.output("y", x.binary(op, y))
                b.output("z", y.binary(op, x))
                return ["a": r.tensor([2, 3, 5, 7], 0.5, 2), "b": r.tensor([3, 1, 7], 0.5, 2)]
            })
        }
        // Shapes in eights take the 8-wide kernels: same shape, a per-channel broadcast (the
        // resnet's time embedding), a row read whole and a column repeated along the row.
        for (suffix, xs, ys) in [(" same shape, 8-wide", [4, 32], [4, 32]), (" per-channel, 8-wide", [2, 16, 4, 8], [2, 16, 1, 1]),
                                 (" rows, 8-wide", [3, 5, 24], [24]), (" columns, 8-wide", [2, 6, 16], [2, 6, 1])] {
            cases.append(OpCase("binary add\(suffix)") { b, r, _ in
                let x = b.input("a", shape: xs), y = b.input("b", shape: ys)
                b.output("y", x.binary(.add, y))
                b.output("z", y.binary(.mul, x))
                return ["a": r.tensor(xs), "b": r.tensor(ys)]
            })
        }
        cases.append(OpCase("affine") { b, r, _ in
            let x = b.input("x", shape: [7, 13])
            b.output("y", x.affine(scale: 0.37, shift: -1.25))
            return ["x": r.tensor([7, 13], -3, 3)]
        })
        cases.append(OpCase("clamp") { b, r, _ in
            let x = b.input("x", shape: [7, 13])
            b.output("y", x.clamp(min: -0.5, max: 0.75))
            return ["x": r.tensor([7, 13], -2, 2)]
        })
        let epilogues: [(String, [Epilogue])] = [
            ("", []), (" +silu", [.activation(.silu)]), (" +input", [.addInput]),
            (" +input*0.5", [.addInput, .scale(0.5)]), (" gelu+input", [.activation(.gelu), .addInput]),
        ]
        for (suffix, epi) in epilogues {
            for bias in [true, false] {
                cases.append(OpCase("linear\(bias ? " bias" : "")\(suffix)") { b, r, w in
                    let x = b.input("x", shape: [2, 7, 37])
                    let wt = param(b, w, &r, "w", [19, 37], -0.3, 0.3)
                    var ins = [x, wt]
                    if bias { ins.append(param(b, w, &r, "b", [19])) }
                    var feeds = ["x": r.tensor([2, 7, 37])]
                    for (k, e) in epi.enumerated() where e == .addInput {
                        ins.append(b.input("r\(k)", shape: [2, 7, 19]))
                        feeds["r\(k)"] = r.tensor([2, 7, 19])
                    }
                    b.output("y", b.emit(.linear(LinearAttributes(epilogue: epi, hasBias: bias)), ins, shape: [2, 7, 19]))
                    return feeds
                })
            }
        }
        cases.append(OpCase("linear gelu+input, 8-wide epilogue") { b, r, w in
            let x = b.input("x", shape: [2, 4, 24]), res = b.input("r", shape: [2, 4, 16])
            let ins = [x, param(b, w, &r, "w", [16, 24], -0.3, 0.3), param(b, w, &r, "b", [16]), res]
            b.output("y", b.emit(.linear(LinearAttributes(epilogue: [.activation(.gelu), .addInput], hasBias: true)), ins, shape: [2, 4, 16]))
            return ["x": r.tensor([2, 4, 24]), "r": r.tensor([2, 4, 16])]
        })
        cases.append(OpCase("linear fp16 weights", precisions: [.float32], weightStorage: .float16) { b, r, w in
            let x = b.input("x", shape: [5, 64])
            b.output("y", x.linear(param(b, w, &r, "w", [48, 64], -0.2, 0.2), param(b, w, &r, "b", [48])))
            return ["x": r.tensor([5, 64])]
        })
        cases += quantizedLinears
        for tb in [false, true] {
            cases.append(OpCase("matmul\(tb ? " transposeB" : "")") { b, r, _ in
                let x = b.input("a", shape: [2, 3, 13, 17])
                let bs = tb ? [2, 3, 11, 17] : [2, 3, 17, 11]
                let y = b.input("b", shape: bs)
                b.output("y", x.matmul(y, transposeB: tb))
                return ["a": r.tensor([2, 3, 13, 17]), "b": r.tensor(bs)]
            })
        }
        let convs: [(String, [Int], [Int], Conv2dAttributes, Bool)] = [
            ("conv 3x3 p1 bias", [2, 5, 9, 11], [7, 5, 3, 3], Conv2dAttributes(padding: (1, 1, 1, 1)), true),
            ("conv 3x3 s2 pad (0,1,0,1)", [2, 6, 10, 12], [8, 6, 3, 3], Conv2dAttributes(stride: (2, 2), padding: (0, 1, 0, 1)), true),
            ("conv 1x1", [2, 12, 7, 5], [9, 12, 1, 1], Conv2dAttributes(), true),
            ("conv 1x1 no bias", [1, 12, 7, 5], [9, 12, 1, 1], Conv2dAttributes(), false),
            ("conv 3x3 dilation 2 groups 2", [2, 6, 11, 9], [4, 3, 3, 3], Conv2dAttributes(padding: (2, 2, 2, 2), dilation: (2, 2), groups: 2), true),
            ("conv 3x3 +silu+input", [2, 4, 8, 8], [4, 4, 3, 3], Conv2dAttributes(padding: (1, 1, 1, 1), epilogue: [.activation(.silu), .addInput]), true),
            ("conv 3x3 +input", [2, 4, 8, 8], [4, 4, 3, 3], Conv2dAttributes(padding: (1, 1, 1, 1), epilogue: [.addInput]), true),
            ("conv 3x3 16 channels +silu*0.5 (8-wide epilogue both layouts)", [2, 8, 4, 6], [16, 8, 3, 3],
             Conv2dAttributes(padding: (1, 1, 1, 1), epilogue: [.activation(.silu), .scale(0.5)]), true),
            ("conv 4x4 s(2,1) p(1,2,0,3)", [1, 3, 9, 10], [5, 3, 4, 4], Conv2dAttributes(stride: (2, 1), padding: (1, 2, 0, 3)), true),
        ]
        for (name, xs, ws, attrs, bias) in convs {
            cases.append(OpCase(name) { b, r, w in
                let x = b.input("x", shape: xs)
                let wt = param(b, w, &r, "w", ws, -0.3, 0.3)
                var a = attrs
                a.hasBias = bias
                let ho = (xs[2] + a.padding.0 + a.padding.1 - a.dilation.0 * (ws[2] - 1) - 1) / a.stride.0 + 1
                let wo = (xs[3] + a.padding.2 + a.padding.3 - a.dilation.1 * (ws[3] - 1) - 1) / a.stride.1 + 1
                let outShape = [xs[0], ws[0], ho, wo]
                var ins = [x, wt]
                if bias { ins.append(param(b, w, &r, "b", [ws[0]])) }
                var feeds = ["x": r.tensor(xs)]
                if attrs.epilogue.contains(.addInput) {
                    ins.append(b.input("res", shape: outShape))
                    feeds["res"] = r.tensor(outShape)
                }
                b.output("y", b.emit(.conv2d(a), ins, shape: outShape))
                return feeds
            })
        }
        cases.append(OpCase("conv fp16 weights", precisions: [.float32], weightStorage: .float16) { b, r, w in
            let x = b.input("x", shape: [1, 8, 6, 6])
            b.output("y", x.conv2d(param(b, w, &r, "w", [8, 8, 3, 3], -0.2, 0.2), param(b, w, &r, "b", [8]), padding: 1))
            return ["x": r.tensor([1, 8, 6, 6])]
        })
        for act in [nil, UnaryOp.silu] {
            cases.append(OpCase("group_norm\(act == nil ? "" : " +silu")") { b, r, w in
                let x = b.input("x", shape: [2, 12, 7, 9])
                let y = b.emit(.groupNorm(groups: 4, eps: 1e-5, activation: act),
                               [x, param(b, w, &r, "w", [12], 0.5, 1.5), param(b, w, &r, "b", [12])], shape: [2, 12, 7, 9])
                b.output("y", y)
                return ["x": r.tensor([2, 12, 7, 9], 1, 4)]
            })
        }
        cases.append(OpCase("group_norm large groups") { b, r, w in
            let x = b.input("x", shape: [1, 8, 64, 70])
            b.output("y", x.groupNorm(groups: 2, eps: 1e-6, weight: param(b, w, &r, "w", [8]), bias: param(b, w, &r, "b", [8])))
            return ["x": r.tensor([1, 8, 64, 70], 2, 5)]
        })
        cases.append(OpCase("group_norm +silu, 8-wide") { b, r, w in
            let x = b.input("x", shape: [2, 16, 6, 4])
            b.output("y", b.emit(.groupNorm(groups: 4, eps: 1e-5, activation: .silu),
                                 [x, param(b, w, &r, "w", [16], 0.5, 1.5), param(b, w, &r, "b", [16])], shape: [2, 16, 6, 4]))
            return ["x": r.tensor([2, 16, 6, 4], 1, 4)]
        })
        cases.append(OpCase("layer_norm 8-wide") { b, r, w in
            let x = b.input("x", shape: [3, 5, 320])
            b.output("y", x.layerNorm(eps: 1e-5, weight: param(b, w, &r, "w", [320]), bias: param(b, w, &r, "b", [320])))
            return ["x": r.tensor([3, 5, 320], -1, 3)]
        })
        cases.append(OpCase("geglu 8-wide") { b, r, _ in
            let x = b.input("x", shape: [2, 5, 48])
            b.output("y", x.geglu())
            return ["x": r.tensor([2, 5, 48], -3, 3)]
        })
        cases.append(OpCase("layer_norm") { b, r, w in
            let x = b.input("x", shape: [3, 7, 45])
            b.output("y", x.layerNorm(eps: 1e-5, weight: param(b, w, &r, "w", [45]), bias: param(b, w, &r, "b", [45])))
            return ["x": r.tensor([3, 7, 45], -1, 3)]
        })
        cases.append(OpCase("softmax") { b, r, _ in
            let x = b.input("x", shape: [5, 77])
            b.output("y", x.softmax())
            return ["x": r.tensor([5, 77], -4, 4)]
        })
        let implementations: [AttentionImplementation] = [.fused, .math, .sliced(7)]
        let attentions: [(String, Int, Int, Int, Int, Int, Int, Bool)] = [
            // name, batch, sq, sk, heads, d, dv, causal
            ("attention d40 (SD1 heads)", 2, 37, 45, 2, 40, 40, false),
            ("attention d64", 1, 70, 77, 3, 64, 64, false),
            ("attention d80 long", 1, 130, 130, 2, 80, 80, false),
            ("attention d160", 1, 66, 20, 1, 160, 160, false),
            ("attention d8 causal", 2, 23, 23, 4, 8, 8, true),
            ("attention d32 causal, several query and key tiles", 1, 300, 300, 2, 32, 32, true),
            ("attention d64 (SDXL heads), several tiles", 2, 270, 200, 2, 64, 64, false),
            ("attention d6 dv3", 1, 17, 9, 2, 6, 3, false),
            ("attention d200 (math fallback)", 1, 9, 11, 1, 200, 200, false),
        ]
        for (name, bt, sq, sk, h, d, dv, causal) in attentions {
            cases.append(OpCase(name, attention: implementations) { b, r, _ in
                let q = b.input("q", shape: [bt, sq, h * d])
                let k = b.input("k", shape: [bt, sk, h * d])
                let v = b.input("v", shape: [bt, sk, h * dv])
                b.output("o", q.attention(k, v, heads: h, causal: causal))
                return ["q": r.tensor([bt, sq, h * d], -2, 2), "k": r.tensor([bt, sk, h * d], -2, 2), "v": r.tensor([bt, sk, h * dv])]
            })
        }
        cases.append(OpCase("attention packed qkv", attention: implementations) { b, r, _ in
            let (h, d) = (2, 24)
            let x = b.input("qkv", shape: [2, 33, 3 * h * d])
            let a = AttentionAttributes(heads: h, scale: 1 / Float(d).squareRoot(), packing: .qkv)
            b.output("o", b.emit(.attention(a), [x], shape: [2, 33, h * d]))
            return ["qkv": r.tensor([2, 33, 3 * h * d], -2, 2)]
        })
        cases.append(OpCase("attention packed kv", attention: implementations) { b, r, _ in
            let (h, d) = (2, 32)
            let q = b.input("q", shape: [2, 30, h * d]), kv = b.input("kv", shape: [2, 19, 2 * h * d])
            let a = AttentionAttributes(heads: h, scale: 0.2, packing: .kv)
            b.output("o", b.emit(.attention(a), [q, kv], shape: [2, 30, h * d]))
            return ["q": r.tensor([2, 30, h * d], -2, 2), "kv": r.tensor([2, 19, 2 * h * d], -2, 2)]
        })
        cases.append(OpCase("geglu") { b, r, _ in
            let x = b.input("x", shape: [2, 5, 46])
            b.output("y", x.geglu())
            return ["x": r.tensor([2, 5, 46], -3, 3)]
        })
        cases.append(OpCase("upsample nearest 2x") { b, r, _ in
            let x = b.input("x", shape: [2, 3, 5, 7])
            b.output("y", x.upsampleNearest2x())
            return ["x": r.tensor([2, 3, 5, 7])]
        })
        cases.append(OpCase("concat axis 1 and 3") { b, r, _ in
            let x = b.input("a", shape: [2, 3, 4, 5]), y = b.input("b", shape: [2, 2, 4, 5])
            b.output("c1", Value.concat([x, y, x], axis: 1))
            b.output("c3", Value.concat([x, x.affine(scale: 2)], axis: 3))
            return ["a": r.tensor([2, 3, 4, 5]), "b": r.tensor([2, 2, 4, 5])]
        })
        cases.append(OpCase("permute and reshape") { b, r, _ in
            let x = b.input("x", shape: [2, 3, 4, 5])
            b.output("p", x.permute([0, 2, 3, 1]))
            b.output("q", x.reshape([6, 20]).permute([1, 0]).affine(scale: 1, shift: 1))
            b.output("s", x.permute([3, 1, 0, 2]).reshape([5, 24]))
            return ["x": r.tensor([2, 3, 4, 5])]
        })
        cases.append(OpCase("slice views and copies") { b, r, _ in
            let x = b.input("x", shape: [1, 6, 4, 5])
            b.output("a", x.slice(axis: 1, start: 2, length: 3).affine(scale: 3))
            b.output("b", x.slice(axis: 2, start: 1, length: 2))
            let c = x.chunk(2, axis: 1)
            b.output("c", c[1] - c[0])
            return ["x": r.tensor([1, 6, 4, 5])]
        })
        for idType in [DType.int32, .int64] {
            cases.append(OpCase("embedding \(idType) ids") { b, r, w in
                let ids = b.input("ids", shape: [2, 9], dtype: idType)
                b.output("y", ids.embedding(param(b, w, &r, "table", [50, 24])))
                let values = (0..<18).map { _ in Int(r.next() % 50) }
                let t = idType == .int32 ? Tensor(shape: [2, 9], dtype: .int32, values: values.map { Int32($0) })
                    : Tensor(shape: [2, 9], dtype: .int64, values: values.map { Int64($0) })
                return ["ids": t]
            })
        }
        let timesteps: [(String, TimestepEmbeddingAttributes)] = [
            ("timestep_embedding 32 flip", TimestepEmbeddingAttributes(dim: 32, flipSinToCos: true, downscaleFreqShift: 0)),
            ("timestep_embedding 33 shift 1", TimestepEmbeddingAttributes(dim: 33, flipSinToCos: false, downscaleFreqShift: 1, scale: 2)),
        ]
        for (name, a) in timesteps {
            cases.append(OpCase(name) { b, _, _ in
                let t = b.input("t", shape: [4])
                b.output("y", t.timestepEmbedding(a))
                return ["t": Tensor(shape: [4], floats: [999, 1, 437.25, 0])]
            })
        }
        let reductions: [(ReduceOp, [Int])] = [(.mean, [2, 3]), (.sum, [1]), (.max, [0, 2])]
        for (op, axes) in reductions {
            cases.append(OpCase("reduce \(op) \(axes)") { b, r, _ in
                let x = b.input("x", shape: [2, 3, 9, 7])
                b.output("y", x.reduce(op, axes: axes))
                return ["x": r.tensor([2, 3, 9, 7])]
            })
        }
        cases.append(OpCase("cast to int32 and back") { b, r, _ in
            let x = b.input("x", shape: [4, 9])
            b.output("y", x.cast(.int32).cast(.float32))
            // Quarter fractions are exact in every precision, so truncation cannot flip.
            let values = (0..<36).map { _ in Float(Int(r.next() % 40) - 20) + [0.25, 0.5, 0.75][Int(r.next() % 3)] }
            return ["x": Tensor(shape: [4, 9], floats: values)]
        })
        cases.append(OpCase("constant and mixed chain") { b, r, w in
            let x = b.input("x", shape: [2, 8, 6, 6])
            let c = b.constant(r.tensor([1, 8, 1, 1]))
            var h = x.groupNorm(groups: 2, eps: 1e-5, weight: param(b, w, &r, "n.w", [8], 0.5, 1.5), bias: param(b, w, &r, "n.b", [8])).silu()
            h = h.conv2d(param(b, w, &r, "c.w", [8, 8, 3, 3], -0.2, 0.2), param(b, w, &r, "c.b", [8]), padding: 1) + x + c
            let tokens = h.reshape([2, 8, 36]).permute([0, 2, 1])
            let qkv = tokens.linear(param(b, w, &r, "qkv.w", [24, 8], -0.4, 0.4), nil).chunk(3, axis: 2)
            let att = qkv[0].attention(qkv[1], qkv[2], heads: 2)
            b.output("y", att.layerNorm(eps: 1e-5, weight: param(b, w, &r, "ln.w", [8]), bias: param(b, w, &r, "ln.b", [8])))
            return ["x": r.tensor([2, 8, 6, 6])]
        })
        cases.append(OpCase("channels-last VAE-style block") { b, r, w in
            // Layout changes the pass must get right: a channel concat and slice, an upsampling,
            // and attention over `reshape(N,C,HW).transpose(1,2)` and back with a residual.
            let x = b.input("x", shape: [2, 6, 5, 7])
            let c1 = x.conv2d(param(b, w, &r, "c1.w", [10, 6, 3, 3], -0.3, 0.3), param(b, w, &r, "c1.b", [10]), padding: 1)
            let cat = Value.concat([c1, x], axis: 1)
            var h = cat.groupNorm(groups: 4, eps: 1e-5, weight: param(b, w, &r, "n.w", [16], 0.5, 1.5),
                                  bias: param(b, w, &r, "n.b", [16])).silu()
            h = h.slice(axis: 1, start: 2, length: 8).upsampleNearest2x()
            h = h.conv2d(param(b, w, &r, "c2.w", [8, 8, 3, 3], -0.2, 0.2), param(b, w, &r, "c2.b", [8]), padding: 1)
            let tokens = h.reshape([2, 8, 140]).transpose(1, 2)
            let qkv = tokens.linear(param(b, w, &r, "qkv.w", [24, 8], -0.4, 0.4), nil).chunk(3, axis: 2)
            let att = qkv[0].attention(qkv[1], qkv[2], heads: 1).transpose(1, 2).reshape([2, 8, 10, 14])
            b.output("y", (att + h).conv2d(param(b, w, &r, "c3.w", [3, 8, 1, 1], -0.3, 0.3), param(b, w, &r, "c3.b", [3])))
            return ["x": r.tensor([2, 6, 5, 7])]
        })
        return cases
    }
}

/// Runs every op check on the GPU against ReferenceBackend and prints one line per op and
/// configuration (max error against the tolerance, pass/fail) and a summary. For the command
/// line on a GPU machine: `CUDASelfTest.run(log: { print($0) })`.
public enum CUDASelfTest {
    /// Returns true when every check passed. `filter` keeps the cases whose name contains it.
    /// `exclude` drops the cases whose name contains any of its strings (to get past an op that
    /// broke the context).
    public static func run(filter: String? = nil, exclude: [String] = [], log: (String) -> Void) -> Bool {
        let backend: CUDABackend
        do { backend = try CUDABackend() } catch {
            log("CUDA self-test: cannot start the backend: \(error)")
            return false
        }
        // Wait after every launch so a failing kernel is named, not reported later.
        backend.ctx.syncEachStep = true
        log("CUDA self-test on \(backend.deviceDescription)")
        var checks: [OpCheck] = []
        let start = now()
        let cases = OpCases.all.filter { c in
            (filter.map { c.name.contains($0) } ?? true) && !exclude.contains { c.name.contains($0) }
        }
        var broken: String?
        var brokenCase = ""
        for c in cases {
            for r in check(c, on: backend) {
                log(r.description)
                checks.append(r)
                if let f = r.failure, stickyErrors.contains(where: { f.contains($0) }) { broken = "\(c.name) [\(r.configuration)]"; brokenCase = c.name }
            }
            if broken != nil { break }
        }
        if let broken {
            log("CUDA self-test: \(broken) left the CUDA context unusable; stopping. Run again with exclude: [\"\(brokenCase)\"] to check the rest.")
        } else {
            for r in checkLinearCombination(backend) + checkTransfers(backend) {
                log(r.description)
                checks.append(r)
            }
        }
        let failed = checks.filter { !$0.passed }
        log("CUDA self-test: \(checks.count - failed.count) passed, \(failed.count) failed (\(checks.count) checks, \(Int((now() - start) * 1000)) ms, peak device memory \(backend.peakMemoryBytes >> 20) MiB)")
        if !failed.isEmpty { log("failed: " + failed.map { "\($0.name) [\($0.configuration)]" }.joined(separator: "; ")) }
        return failed.isEmpty
    }

    /// Driver errors after which the context cannot be used any more.
    static let stickyErrors = ["ILLEGAL_ADDRESS", "LAUNCH_FAILED", "MISALIGNED_ADDRESS", "ILLEGAL_INSTRUCTION",
                               "HARDWARE_STACK_ERROR", "INVALID_PC", "CUDA_ERROR_ASSERT", "LAUNCH_TIMEOUT"]

    /// Runs one case in each of its configurations.
    public static func check(_ c: OpCase, on backend: CUDABackend) -> [OpCheck] {
        var results: [OpCheck] = []
        let graph: Graph, feeds: [String: Tensor], source: MemorySource
        let expected: [String: Tensor]
        do {
            (graph, feeds, source) = try c.build()
            expected = try c.referenceOutputs()
        } catch {
            return [OpCheck(name: c.name, configuration: "reference", error: .nan, tolerance: 0, failure: "\(error)")]
        }
        let quantized = graph.nodes.contains { if case .linear(let a) = $0.op { return a.quantization != .none }; return false }
        let fp8 = graph.nodes.contains { if case .linear(let a) = $0.op { return a.quantization == .fp8 }; return false }
        if fp8 && backend.ctx.architecture < 89 {
            return [OpCheck(name: c.name, configuration: "all", error: 0, tolerance: 0, failure: nil,
                            skipped: "fp8 needs sm_89 or newer; this GPU is sm_\(backend.ctx.architecture)")]
        }
        for p in c.precisions {
            for impl in c.attention { for flags in c.flagSets {
                let config = "\(p.rawValue)" + (c.attention.count > 1 ? " \(impl)" : "") + (c.weightStorage.map { " w:\($0)" } ?? "")
                    + flags.sorted().map { " \($0)" }.joined()
                let tol = max(OpCase.tolerance(p) * (c.weightStorage == nil ? 1 : 20), c.tolerance ?? 0)
                do {
                    let weights = ModelWeights(source)
                    let exe = try backend.compile(graph, weights: weights,
                                                  options: CompileOptions(precision: p, weightStorage: c.weightStorage,
                                                                          attention: impl, flags: flags))
                    // A quantized case that ran in float would pass without testing anything.
                    if quantized, let fallbacks = (exe as? CUDAExecutable)?.quantizationFallbacks, !fallbacks.isEmpty {
                        throw CUDAError.unsupported("ran in float, not quantized: \(fallbacks.joined(separator: "; "))")
                    }
                    let got = try exe.run(host: feeds, on: backend)
                    var worst = 0.0
                    for (name, ref) in expected {
                        guard let g = got[name] else { throw CUDAError.invalidInput("output \(name) missing") }
                        worst = max(worst, relativeError(g, ref))
                    }
                    results.append(OpCheck(name: c.name, configuration: config, error: worst, tolerance: tol, failure: nil))
                } catch {
                    results.append(OpCheck(name: c.name, configuration: config, error: .nan, tolerance: tol, failure: "\(error)"))
                }
            } }
        }
        return results
    }

    /// max |a - b| / max(1, max |b|); NaN anywhere gives NaN; a shape mismatch gives infinity.
    static func relativeError(_ a: Tensor, _ b: Tensor) -> Double {
        guard a.shape == b.shape else { return .infinity }
        let x = a.toFloatArray(), y = b.toFloatArray()
        var worst = 0.0, scale = 1.0
        for i in x.indices {
            let d = abs(Double(x[i]) - Double(y[i]))
            if d.isNaN { return .nan }
            worst = max(worst, d)
            scale = max(scale, abs(Double(y[i])))
        }
        return worst / scale
    }

    public static func checkLinearCombination(_ backend: CUDABackend) -> [OpCheck] {
        var results: [OpCheck] = []
        var rng = TestRandom(7)
        for (n, dtype) in [(3, DType.float32), (11, .float16), (5, .bfloat16)] {
            let name = "linearCombination \(n) terms"
            do {
                let xs = (0..<n).map { _ in rng.tensor([2, 4, 9, 7]) }
                let coefs = (0..<n).map { k in Double(k) * 0.37 - 1.1 }
                let terms = try zip(coefs, xs).enumerated().map { k, cx in
                    (cx.0, try backend.upload(k == 1 ? cx.1.converted(to: dtype) : cx.1))
                }
                let got = try backend.linearCombination(terms).toHost()
                let expected = try ReferenceBackend().linearCombination(zip(coefs, xs).enumerated().map { k, cx in
                    (cx.0, HostTensor(k == 1 ? cx.1.converted(to: dtype).converted(to: .float32) : cx.1))
                }).toHost()
                results.append(OpCheck(name: name, configuration: "x1 \(dtype)", error: relativeError(got, expected), tolerance: 1e-6, failure: nil))
            } catch {
                results.append(OpCheck(name: name, configuration: "x1 \(dtype)", error: .nan, tolerance: 1e-6, failure: "\(error)"))
            }
        }
        return results
    }

    public static func checkTransfers(_ backend: CUDABackend) -> [OpCheck] {
        var results: [OpCheck] = []
        var rng = TestRandom(11)
        for dtype in [DType.float32, .float16, .bfloat16, .int64] {
            do {
                // Over 16 MiB so the staging buffers are used in turn.
                let t = rng.tensor([5, 1 << 20], -100, 100).converted(to: dtype)
                let back = try backend.upload(t).toHost()
                let err = relativeError(back, t.converted(to: dtype.isFloatingPoint ? .float32 : dtype).converted(to: .float32))
                results.append(OpCheck(name: "upload/toHost round trip", configuration: "\(dtype)", error: err, tolerance: 0, failure: nil))
            } catch {
                results.append(OpCheck(name: "upload/toHost round trip", configuration: "\(dtype)", error: .nan, tolerance: 0, failure: "\(error)"))
            }
        }
        return results
    }
}

extension CUDASelfTest {
    /// Times SD-sized ops (UNet at 64x64 latents, batch 2) in each precision and prints ms per
    /// run and TFLOP/s, so a slow kernel shows before a full benchmark.
    public static func benchmark(log: (String) -> Void) -> Bool {
        let backend: CUDABackend
        do { backend = try CUDABackend() } catch {
            log("CUDA benchmark: cannot start the backend: \(error)")
            return false
        }
        log("CUDA op benchmark on \(backend.deviceDescription)")
        typealias Make = (GraphBuilder, inout TestRandom, MemorySource) -> [String: Tensor]
        let attention: (Int, Int, Int) -> Make = { s, h, d in
            { b, r, _ in
                let q = b.input("q", shape: [2, s, h * d]), k = b.input("k", shape: [2, s, h * d]), v = b.input("v", shape: [2, s, h * d])
                b.output("o", q.attention(k, v, heads: h))
                return ["q": r.tensor([2, s, h * d]), "k": r.tensor([2, s, h * d]), "v": r.tensor([2, s, h * d])]
            }
        }
        let linear: (Quantization) -> Make = { q in
            { b, r, w in
                let x = b.input("x", shape: [2, 4096, 320])
                let ins = [x, OpCases.param(b, w, &r, "w", [2560, 320], -0.05, 0.05), OpCases.param(b, w, &r, "b", [2560])]
                b.output("y", b.emit(.linear(LinearAttributes(quantization: q, hasBias: true)), ins, shape: [2, 4096, 2560]))
                return ["x": r.tensor([2, 4096, 320])]
            }
        }
        let ops: [(String, [AttentionImplementation], Make)] = [
            ("attention S4096 h8 d40", [.fused, .math], attention(4096, 8, 40)),
            ("attention S4096 h10 d64", [.fused, .math], attention(4096, 10, 64)),
            ("attention S1024 h10 d64 (SDXL)", [.fused], attention(1024, 10, 64)),
            ("attention S256 h8 d160", [.fused], attention(256, 8, 160)),
            ("conv3x3 320->320 64x64", [.fused], { b, r, w in
                let x = b.input("x", shape: [2, 320, 64, 64])
                b.output("y", x.conv2d(OpCases.param(b, w, &r, "w", [320, 320, 3, 3], -0.05, 0.05), OpCases.param(b, w, &r, "b", [320]), padding: 1))
                return ["x": r.tensor([2, 320, 64, 64])]
            }),
            ("group_norm+silu 320ch 64x64", [.fused], { b, r, w in
                let x = b.input("x", shape: [2, 320, 64, 64])
                b.output("y", b.emit(.groupNorm(groups: 32, eps: 1e-5, activation: .silu),
                                     [x, OpCases.param(b, w, &r, "w", [320]), OpCases.param(b, w, &r, "b", [320])], shape: [2, 320, 64, 64]))
                return ["x": r.tensor([2, 320, 64, 64])]
            }),
            ("linear 8192x320 -> 2560", [.fused], linear(.none)),
            ("linear 8192x320 -> 2560 int8", [.fused], linear(.dynamicInt8)),
        ] + (backend.ctx.architecture >= 89 ? [("linear 8192x320 -> 2560 fp8", [.fused], linear(.fp8))] : [])
        /// Flag sets each op is timed with: convolutions with and without cuDNN, fused attention
        /// with the pipelined and the basic kernel.
        func variants(_ name: String, _ impl: AttentionImplementation) -> [Set<String>] {
            if name.hasPrefix("conv") { return [[], ["no-cudnn"]] }
            if name.hasPrefix("attention"), case .fused = impl { return [[], ["basic-attention"]] }
            return [[]]
        }
        var ok = true
        for (name, impls, make) in ops {
            let b = GraphBuilder()
            let source = MemorySource()
            var rng = TestRandom(stableHash(name))
            let feeds = make(b, &rng, source)
            for p in Precision.allCases {
                for impl in impls { for flags in variants(name, impl) {
                    do {
                        let graph = try b.finish()
                        let exe = try backend.compile(graph, weights: ModelWeights(source),
                                                      options: CompileOptions(precision: p, attention: impl, flags: flags))
                        var device: [String: DeviceTensor] = [:]
                        for (k, v) in feeds { device[k] = try backend.upload(v) }
                        for _ in 0..<3 { _ = try exe.run(device) }
                        try backend.synchronize()
                        let runs = 20
                        let t0 = now()
                        for _ in 0..<runs { _ = try exe.run(device) }
                        try backend.synchronize()
                        let ms = (now() - t0) * 1000 / Double(runs)
                        let tflops = graph.flops / (ms * 1e-3) / 1e12
                        let tf = Int(tflops * 10)
                        let config = p.rawValue + (impls.count > 1 ? " \(impl)" : "") + flags.sorted().map { " \($0)" }.joined()
                        log("\(pad(name, 32)) \(pad(config, 18)) \(formatMs(ms)) ms  \(tf / 10).\(tf % 10) TFLOP/s")
                    } catch {
                        ok = false
                        log("\(pad(name, 32)) \(pad(p.rawValue, 18)) failed: \(error)")
                    }
                } }
            }
        }
        log("peak device memory \(backend.peakMemoryBytes >> 20) MiB")
        return ok
    }

    static func formatMs(_ ms: Double) -> String {
        let v = Int((ms * 1000).rounded())
        let frac = v % 1000
        return "\(v / 1000)." + (frac < 10 ? "00" : frac < 100 ? "0" : "") + "\(frac)"
    }
}
