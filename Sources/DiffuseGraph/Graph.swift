import DiffuseCore
#if canImport(Glibc)
import Glibc
#endif

/// A value in a graph: the index of the node that defines it (graphs are in SSA form).
public struct ValueID: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let index: Int
    public init(_ index: Int) { self.index = index }
    public static func < (a: ValueID, b: ValueID) -> Bool { a.index < b.index }
    public var description: String { "%\(index)" }
}

public enum UnaryOp: String, Sendable, Hashable, CaseIterable {
    case silu, gelu, geluTanh, quickGelu, relu, tanh, sigmoid, exp, neg, sqrt, rsqrt, square, abs
}

public enum BinaryOp: String, Sendable, Hashable, CaseIterable {
    case add, sub, mul, div
}

public enum ReduceOp: String, Sendable, Hashable {
    case mean, sum, max
}

/// What a conv2d or linear does to its result before storing it; the graph's fusion pass folds
/// following ops into this list so backends can run them as epilogues (oneDNN post-ops,
/// cuBLASLt/own-kernel epilogues).
public enum Epilogue: Sendable, Hashable, CustomStringConvertible {
    /// `y = activation(y)`
    case activation(UnaryOp)
    /// `y = y + extra` where extra is the op's next unused input (same shape as y).
    case addInput
    /// `y = y * s`
    case scale(Float)

    public var description: String {
        switch self {
        case .activation(let u): return u.rawValue
        case .addInput: return "+input"
        case .scale(let s): return "*\(s)"
        }
    }
}

/// How a linear layer computes: in the activation precision, or with dynamically quantized
/// int8 activations and per-channel int8 weights (diffusers' `dynamic_quant`), or fp8 on GPUs.
public enum Quantization: String, Sendable, Hashable {
    case none
    case dynamicInt8
    case fp8
}

public struct LinearAttributes: Sendable, Hashable {
    public var epilogue: [Epilogue]
    public var quantization: Quantization
    /// Whether the op has a bias input (after x and weight).
    public var hasBias: Bool
    public init(epilogue: [Epilogue] = [], quantization: Quantization = .none, hasBias: Bool) {
        self.epilogue = epilogue
        self.quantization = quantization
        self.hasBias = hasBias
    }
}

public struct Conv2dAttributes: Sendable, Hashable {
    public var stride: (Int, Int)
    /// Padding as (top, bottom, left, right): diffusers' VAE downsampler pads asymmetrically.
    public var padding: (Int, Int, Int, Int)
    public var dilation: (Int, Int)
    public var groups: Int
    public var epilogue: [Epilogue]
    /// Dynamic int8 (`GraphPasses.quantizeConvolutions`); CPU only.
    public var quantization: Quantization = .none
    /// Whether the op has a bias input (after x and weight); set by the builder.
    public var hasBias = false

    public init(stride: (Int, Int) = (1, 1), padding: (Int, Int, Int, Int) = (0, 0, 0, 0),
                dilation: (Int, Int) = (1, 1), groups: Int = 1, epilogue: [Epilogue] = []) {
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.epilogue = epilogue
    }

    public static func == (a: Self, b: Self) -> Bool {
        a.stride == b.stride && a.padding == b.padding && a.dilation == b.dilation && a.groups == b.groups
            && a.epilogue == b.epilogue && a.hasBias == b.hasBias && a.quantization == b.quantization
    }

    public func hash(into h: inout Hasher) {
        h.combine(stride.0); h.combine(stride.1)
        h.combine(padding.0); h.combine(padding.1); h.combine(padding.2); h.combine(padding.3)
        h.combine(dilation.0); h.combine(dilation.1); h.combine(groups); h.combine(epilogue); h.combine(hasBias)
        h.combine(quantization)
    }
}

/// How attention's inputs are packed. Fused QKV projections produce one tensor holding
/// q, k and v side by side on the last axis; backends read them with strides.
public enum AttentionPacking: Sendable, Hashable {
    /// q [B,Sq,H*D], k [B,Sk,H*D], v [B,Sk,H*Dv]
    case separate
    /// one input [B,S,3*H*D]
    case qkv
    /// q [B,Sq,H*D] and kv [B,Sk,2*H*D]
    case kv
}

public struct AttentionAttributes: Sendable, Hashable {
    public var heads: Int
    public var scale: Float
    public var causal: Bool
    public var packing: AttentionPacking
    /// diffusers' `upcast_attention`: QKᵀ and the softmax must run in float32 even when the
    /// activations are 16-bit (SD 2.1 overflows in fp16 otherwise). No effect in fp32.
    public var upcast: Bool
    public init(heads: Int, scale: Float, causal: Bool = false, packing: AttentionPacking = .separate, upcast: Bool = false) {
        self.heads = heads
        self.scale = scale
        self.causal = causal
        self.packing = packing
        self.upcast = upcast
    }
}

/// Sinusoidal timestep embedding as diffusers' `get_timestep_embedding`.
public struct TimestepEmbeddingAttributes: Sendable, Hashable {
    public var dim: Int
    public var flipSinToCos: Bool
    public var downscaleFreqShift: Float
    public var scale: Float
    public var maxPeriod: Float
    public init(dim: Int, flipSinToCos: Bool, downscaleFreqShift: Float, scale: Float = 1, maxPeriod: Float = 10000) {
        self.dim = dim
        self.flipSinToCos = flipSinToCos
        self.downscaleFreqShift = downscaleFreqShift
        self.scale = scale
        self.maxPeriod = maxPeriod
    }
}

/// Where a parameter's data comes from.
public enum ParameterSource: Sendable, Hashable, CustomStringConvertible {
    /// A tensor of the model's weight source.
    case named(String)
    /// Several tensors concatenated along an axis (fused QKV weights).
    case concat([String], axis: Int)
    /// A convolution weight [O,I,kh,kw] stored as [O,kh,kw,I] (`GraphPasses.channelsLast`).
    case channelsLast(String)

    public var names: [String] {
        switch self {
        case .named(let n), .channelsLast(let n): return [n]
        case .concat(let ns, _): return ns
        }
    }

    public var description: String {
        switch self {
        case .named(let n): return n
        case .concat(let ns, let a): return "concat(\(ns.joined(separator: ", ")), axis: \(a))"
        case .channelsLast(let n): return "\(n) (channels last)"
        }
    }
}

/// The operations a forward pass is made of. Shapes are static; layouts are logical
/// row-major (NCHW for images); backends choose physical layouts themselves.
public enum Op: Sendable, Hashable {
    case input(String)
    case parameter(ParameterSource)
    /// A small host constant baked into the graph (position ids, masks).
    case constant(ConstantTensor)
    /// x [N,C,H,W], weight [O,C/groups,kh,kw], bias [O]? (then epilogue inputs).
    case conv2d(Conv2dAttributes)
    /// x [...,K], weight [N,K] (torch layout), bias [N]? (then epilogue inputs) -> [...,N].
    case linear(LinearAttributes)
    /// a [...,M,K] @ b [...,K,N] (or b [...,N,K] when transposeB); batch dims must match.
    case matmul(transposeB: Bool)
    /// Elementwise with numpy broadcasting.
    case binary(BinaryOp)
    case unary(UnaryOp)
    /// `x * scale + shift`.
    case affine(scale: Float, shift: Float)
    case clamp(min: Float, max: Float)
    /// x [N,C,...], weight [C], bias [C]; optional fused activation on the result.
    case groupNorm(groups: Int, eps: Float, activation: UnaryOp?)
    /// Over the last axis; weight and bias [D].
    case layerNorm(eps: Float)
    /// Over the last axis.
    case softmax
    case attention(AttentionAttributes)
    /// `a * gelu(b)` where [a, b] = x.chunk(2, last axis): diffusers' GEGLU after its projection.
    case geglu
    /// [N,C,H,W] -> [N,C,2H,2W], nearest.
    case upsampleNearest2x
    /// [N,C,H,W] -> [N,C,H',W'] (the node's shape): torch's `interpolate(mode="bilinear")` with
    /// the scale in/out per side (`size=`, or an integer `scale_factor`).
    case resizeBilinear(alignCorners: Bool)
    /// [N,C,H,W] -> [N,C,(H−kh)/sh+1,(W−kw)/sw+1]: torch's `max_pool2d` without padding (pad
    /// first, with what the model pads with) and with floor rounding.
    case maxPool2d(kernel: [Int], stride: [Int])
    case concat(axis: Int)
    case reshape([Int])
    case permute([Int])
    /// `length` elements from `start` along `axis`.
    case slice(axis: Int, start: Int, length: Int)
    /// ids (int32/int64) [...], table [V,D] -> [...,D].
    case embedding
    /// timesteps [B] -> [B, dim] (float32).
    case timestepEmbedding(TimestepEmbeddingAttributes)
    /// Reduce over `axes`, keeping them as size 1.
    case reduce(ReduceOp, axes: [Int])
    case cast(DType)

    public var name: String {
        switch self {
        case .input: return "input"
        case .parameter: return "parameter"
        case .constant: return "constant"
        case .conv2d: return "conv2d"
        case .linear: return "linear"
        case .matmul: return "matmul"
        case .binary(let b): return b.rawValue
        case .unary(let u): return u.rawValue
        case .affine: return "affine"
        case .clamp: return "clamp"
        case .groupNorm: return "group_norm"
        case .layerNorm: return "layer_norm"
        case .softmax: return "softmax"
        case .attention: return "attention"
        case .geglu: return "geglu"
        case .upsampleNearest2x: return "upsample_nearest2x"
        case .resizeBilinear: return "resize_bilinear"
        case .maxPool2d: return "max_pool2d"
        case .concat: return "concat"
        case .reshape: return "reshape"
        case .permute: return "permute"
        case .slice: return "slice"
        case .embedding: return "embedding"
        case .timestepEmbedding: return "timestep_embedding"
        case .reduce: return "reduce"
        case .cast: return "cast"
        }
    }
}

/// A host tensor usable as an op attribute (hashable by identity of its values).
public struct ConstantTensor: Sendable, Hashable {
    public let tensor: Tensor
    public init(_ tensor: Tensor) { self.tensor = tensor }
    public static func == (a: Self, b: Self) -> Bool {
        a.tensor.dtype == b.tensor.dtype && a.tensor.shape == b.tensor.shape
            && memcmp(a.tensor.raw, b.tensor.raw, a.tensor.byteCount) == 0
    }
    public func hash(into h: inout Hasher) {
        h.combine(tensor.dtype); h.combine(tensor.shape)
    }
}

public struct Node: Sendable {
    public var op: Op
    public var inputs: [ValueID]
    public var shape: [Int]
    public var dtype: DType
    /// The module path that emitted it (e.g. `down_blocks.0.resnets.1`), for errors and profiles.
    public var scope: String
    /// conv2d, groupNorm and upsampleNearest2x only: the image operands and the result are
    /// stored [N,H,W,C] (and a conv weight [O,kh,kw,I]) instead of NCHW. Set by
    /// `GraphPasses.channelsLast`; a backend that does not implement it must refuse the graph.
    public var channelsLast = false

    public var count: Int { shape.reduce(1, *) }
    public var byteCount: Int { count * dtype.size }
}

/// A forward pass: nodes in topological order (node i defines value i), named inputs and outputs.
public struct Graph: Sendable {
    public var nodes: [Node] = []
    public var outputs: [(name: String, value: ValueID)] = []

    public init() {}

    public subscript(_ v: ValueID) -> Node { nodes[v.index] }

    public var inputs: [(name: String, value: ValueID)] {
        nodes.indices.compactMap { i in
            if case .input(let n) = nodes[i].op { return (n, ValueID(i)) }
            return nil
        }
    }

    public var parameters: [(source: ParameterSource, value: ValueID)] {
        nodes.indices.compactMap { i in
            if case .parameter(let s) = nodes[i].op { return (s, ValueID(i)) }
            return nil
        }
    }

    /// For each value, the index of the last node that reads it (outputs live to the end).
    public func lastUses() -> [Int] {
        var last = Array(repeating: -1, count: nodes.count)
        for (i, n) in nodes.enumerated() { for v in n.inputs { last[v.index] = max(last[v.index], i) } }
        for (_, v) in outputs { last[v.index] = nodes.count }
        return last
    }

    /// Number of readers of each value (outputs count as one).
    public func useCounts() -> [Int] {
        var uses = Array(repeating: 0, count: nodes.count)
        for n in nodes { for v in n.inputs { uses[v.index] += 1 } }
        for (_, v) in outputs { uses[v.index] += 1 }
        return uses
    }

    /// Drops nodes no output depends on, renumbering values.
    public func prunedDeadNodes() -> Graph {
        var live = Array(repeating: false, count: nodes.count)
        for (_, v) in outputs { live[v.index] = true }
        for i in nodes.indices.reversed() where live[i] { for v in nodes[i].inputs { live[v.index] = true } }
        var remap = Array(repeating: -1, count: nodes.count)
        var g = Graph()
        for i in nodes.indices where live[i] {
            var n = nodes[i]
            n.inputs = n.inputs.map { ValueID(remap[$0.index]) }
            remap[i] = g.nodes.count
            g.nodes.append(n)
        }
        g.outputs = outputs.map { ($0.name, ValueID(remap[$0.value.index])) }
        return g
    }

    /// Floating-point operations of one run (multiply-add = 2), for GFLOP/s reports.
    public var flops: Double {
        var total = 0.0
        for n in nodes {
            switch n.op {
            case .conv2d(let a):
                let w = self[n.inputs[1]].shape
                total += 2 * Double(n.count) * Double(w[1] * w[2] * w[3])
                _ = a
            case .linear:
                let k = self[n.inputs[1]].shape[1]
                total += 2 * Double(n.count) * Double(k)
            case .matmul(let tb):
                let b = self[n.inputs[1]].shape
                let k = tb ? b[b.count - 1] : b[b.count - 2]
                total += 2 * Double(n.count) * Double(k)
            case .attention(let a):
                let q = self[n.inputs[0]].shape
                let sk: Int
                switch a.packing {
                case .separate: sk = self[n.inputs[1]].shape[1]
                case .qkv: sk = q[1]
                case .kv: sk = self[n.inputs[1]].shape[1]
                }
                let batch = q[0], sq = q[1]
                let dOut = n.shape[2]
                let dQK: Int
                switch a.packing {
                case .separate, .kv: dQK = q[2]
                case .qkv: dQK = (q[2] - dOut) / 2
                }
                total += 2 * Double(batch * sq * sk) * Double(dQK + dOut)
            default: break
            }
        }
        return total
    }

    /// A readable listing, one node a line.
    public var dump: String {
        var lines: [String] = []
        for (i, n) in nodes.enumerated() {
            var attrs = ""
            switch n.op {
            case .input(let s): attrs = " \"\(s)\""
            case .parameter(let s): attrs = " \(s)"
            case .conv2d(let a):
                attrs = " s\(a.stride) p\(a.padding) g\(a.groups) \(a.epilogue)" + (a.quantization == .none ? "" : " \(a.quantization)")
            case .linear(let a): attrs = (a.epilogue.isEmpty ? "" : " \(a.epilogue)") + (a.quantization == .none ? "" : " \(a.quantization)")
            default: break
            }
            lines.append("%\(i) = \(n.op.name)\(attrs)(\(n.inputs.map(\.description).joined(separator: ", "))) : \(n.dtype)\(n.shape)  [\(n.scope)]")
        }
        lines.append("outputs: " + outputs.map { "\($0.name)=\($0.value)" }.joined(separator: ", "))
        return lines.joined(separator: "\n")
    }
}

extension Graph {
    /// Appends a node derived from `template` (its scope and attributes kept) with another op,
    /// inputs and shape, and the dtype and layout flag given (nil: the template's); returns its
    /// index. For passes that rebuild a graph node by node.
    public mutating func append(_ template: Node, _ op: Op, _ inputs: [Int], shape: [Int], dtype: DType? = nil,
                                channelsLast: Bool? = nil) -> Int {
        var n = template
        n.op = op
        n.inputs = inputs.map { ValueID($0) }
        n.shape = shape
        if let dtype { n.dtype = dtype }
        if let channelsLast { n.channelsLast = channelsLast }
        nodes.append(n)
        return nodes.count - 1
    }

    /// A profile label for node `i`: the op and what distinguishes its cost (kernel size, fused
    /// epilogue, quantization, attention shape), the same on every backend.
    public func profileLabel(_ i: Int) -> String {
        let n = nodes[i]
        switch n.op {
        case .conv2d(let a):
            // Weight [O,I,kh,kw], or [O,kh,kw,I] channels-last.
            let w = self[n.inputs[1]].shape
            let (kh, kw) = n.channelsLast ? (w[1], w[2]) : (w[2], w[3])
            return "conv2d \(kh)x\(kw)" + (n.channelsLast ? " nhwc" : "") + epilogueLabel(a.epilogue)
                + (a.quantization == .none ? "" : " \(a.quantization)")
        case .linear(let a):
            return "linear" + (a.quantization == .none ? "" : " \(a.quantization)") + epilogueLabel(a.epilogue)
        case .attention(let a):
            let q = self[n.inputs[0]].shape
            return "attention \(q[1])x\(a.packing == .separate ? self[n.inputs[1]].shape[1] : q[1])"
        case .groupNorm(_, _, let act): return "group_norm" + (act.map { "+\($0.rawValue)" } ?? "")
        default: return n.op.name
        }
    }

    /// " [silu,+input]" for a fused epilogue, "" for none.
    private func epilogueLabel(_ e: [Epilogue]) -> String {
        e.isEmpty ? "" : " [" + e.map(\.description).joined(separator: ",") + "]"
    }
}
