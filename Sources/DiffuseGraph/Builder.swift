import DiffuseCore

/// An error in building a graph: an unsupported configuration or inconsistent shapes, named
/// by the module path where it happened.
public struct GraphError: Error, CustomStringConvertible {
    public let scope: String
    public let message: String
    public init(scope: String, message: String) { self.scope = scope; self.message = message }
    public var description: String { scope.isEmpty ? message : "\(scope): \(message)" }
}

/// Records the ops a model's forward pass emits. Shape errors do not crash: the first one is
/// kept and thrown by `finish()`, so model code reads like the diffusers module it mirrors.
public final class GraphBuilder {
    public private(set) var graph = Graph()
    /// Parameters declared so far, by name, with their shapes.
    public private(set) var declaredParameters: [(name: String, shape: [Int])] = []
    private var parameterValues: [String: ValueID] = [:]
    private var scopeStack: [String] = []
    private(set) var firstError: GraphError?

    public init() {}

    public var scope: String { scopeStack.last ?? "" }

    /// Runs `body` with ops attributed to `name` (joined to the current scope with a dot).
    public func withScope<R>(_ name: String, _ body: () throws -> R) rethrows -> R {
        try withScope(absolute: scope.isEmpty ? name : "\(scope).\(name)", body)
    }

    /// Runs `body` with ops attributed to the module path `path`, whatever scope encloses it.
    public func withScope<R>(absolute path: String, _ body: () throws -> R) rethrows -> R {
        scopeStack.append(path)
        defer { scopeStack.removeLast() }
        return try body()
    }

    public func fail(_ message: String) {
        if firstError == nil { firstError = GraphError(scope: scope, message: message) }
    }

    /// Appends a node and returns its value.
    @discardableResult
    public func emit(_ op: Op, _ inputs: [Value], shape: [Int], dtype: DType = .float32) -> Value {
        let id = ValueID(graph.nodes.count)
        graph.nodes.append(Node(op: op, inputs: inputs.map(\.id), shape: shape, dtype: dtype, scope: scope))
        return Value(builder: self, id: id, shape: shape, dtype: dtype)
    }

    public func input(_ name: String, shape: [Int], dtype: DType = .float32) -> Value {
        emit(.input(name), [], shape: shape, dtype: dtype)
    }

    /// A weight of the model, declared once per name; its dtype is decided when the graph is bound.
    public func parameter(_ name: String, shape: [Int]) -> Value {
        if let v = parameterValues[name] {
            let n = graph[v]
            if n.shape != shape { fail("parameter \(name) declared with shapes \(n.shape) and \(shape)") }
            return Value(builder: self, id: v, shape: n.shape, dtype: n.dtype)
        }
        let v = emit(.parameter(.named(name)), [], shape: shape)
        parameterValues[name] = v.id
        declaredParameters.append((name, shape))
        return v
    }

    public func constant(_ t: Tensor) -> Value {
        emit(.constant(ConstantTensor(t)), [], shape: t.shape, dtype: t.dtype)
    }

    public func output(_ name: String, _ v: Value) {
        graph.outputs.append((name, v.id))
    }

    /// The finished graph (dead nodes removed), or the first error recorded while building.
    public func finish() throws -> Graph {
        if let e = firstError { throw e }
        return graph.prunedDeadNodes()
    }

    /// Sum of the element counts of all declared parameters.
    public var parameterCount: Int { declaredParameters.reduce(0) { $0 + $1.shape.reduce(1, *) } }
}

/// A symbolic tensor: a value of the graph under construction. Model code composes these with
/// the methods below, which append ops and infer shapes.
public struct Value {
    public unowned let builder: GraphBuilder
    public let id: ValueID
    public let shape: [Int]
    public let dtype: DType

    public var rank: Int { shape.count }
    public var count: Int { shape.reduce(1, *) }

    func axis(_ a: Int) -> Int { a < 0 ? a + rank : a }

    // MARK: layers' building blocks

    public func conv2d(_ weight: Value, _ bias: Value?, stride: Int = 1, padding: Int = 0) -> Value {
        conv2d(weight, bias, attributes: Conv2dAttributes(stride: (stride, stride), padding: (padding, padding, padding, padding)))
    }

    public func conv2d(_ weight: Value, _ bias: Value?, attributes a: Conv2dAttributes) -> Value {
        let w = weight.shape
        guard rank == 4, w.count == 4, shape[1] == w[1] * a.groups, w[0] % a.groups == 0 else {
            builder.fail("conv2d: input \(shape) does not fit weight \(w) with \(a.groups) groups")
            return self
        }
        let ho = (shape[2] + a.padding.0 + a.padding.1 - a.dilation.0 * (w[2] - 1) - 1) / a.stride.0 + 1
        let wo = (shape[3] + a.padding.2 + a.padding.3 - a.dilation.1 * (w[3] - 1) - 1) / a.stride.1 + 1
        guard ho > 0, wo > 0 else { builder.fail("conv2d: input \(shape) too small for kernel \(w)"); return self }
        var attrs = a
        attrs.hasBias = bias != nil
        return builder.emit(.conv2d(attrs), [self, weight] + (bias.map { [$0] } ?? []), shape: [shape[0], w[0], ho, wo])
    }

    /// `x @ weight.T + bias`, weight in torch's [out, in] layout.
    public func linear(_ weight: Value, _ bias: Value?) -> Value {
        guard weight.rank == 2, shape.last == weight.shape[1] else {
            builder.fail("linear: input \(shape) does not fit weight \(weight.shape)")
            return self
        }
        return builder.emit(.linear(LinearAttributes(hasBias: bias != nil)), [self, weight] + (bias.map { [$0] } ?? []),
                            shape: Array(shape.dropLast()) + [weight.shape[0]])
    }

    public func matmul(_ b: Value, transposeB: Bool = false) -> Value {
        let (m, k) = (shape[rank - 2], shape[rank - 1])
        let kb = transposeB ? b.shape[b.rank - 1] : b.shape[b.rank - 2]
        let n = transposeB ? b.shape[b.rank - 2] : b.shape[b.rank - 1]
        guard k == kb, rank == b.rank, shape.dropLast(2) == b.shape.dropLast(2) else {
            builder.fail("matmul: \(shape) and \(b.shape)\(transposeB ? " (transposed)" : "") do not fit")
            return self
        }
        return builder.emit(.matmul(transposeB: transposeB), [self, b], shape: Array(shape.dropLast(2)) + [m, n])
    }

    public func binary(_ op: BinaryOp, _ other: Value) -> Value {
        guard let s = broadcastShape(shape, other.shape) else {
            builder.fail("\(op.rawValue): shapes \(shape) and \(other.shape) do not broadcast")
            return self
        }
        return builder.emit(.binary(op), [self, other], shape: s)
    }

    public func unary(_ op: UnaryOp) -> Value { builder.emit(.unary(op), [self], shape: shape) }

    public func silu() -> Value { unary(.silu) }
    public func gelu(approximate: Bool = false) -> Value { unary(approximate ? .geluTanh : .gelu) }
    public func quickGelu() -> Value { unary(.quickGelu) }
    public func relu() -> Value { unary(.relu) }
    public func tanh() -> Value { unary(.tanh) }
    public func sigmoid() -> Value { unary(.sigmoid) }

    public func affine(scale: Float, shift: Float = 0) -> Value {
        builder.emit(.affine(scale: scale, shift: shift), [self], shape: shape)
    }

    public func scaled(_ s: Float) -> Value { affine(scale: s) }

    public func clamp(min lo: Float, max hi: Float) -> Value {
        builder.emit(.clamp(min: lo, max: hi), [self], shape: shape)
    }

    public func groupNorm(groups: Int, eps: Float, weight: Value, bias: Value) -> Value {
        guard rank >= 2, shape[1] % groups == 0, weight.shape == [shape[1]], bias.shape == [shape[1]] else {
            builder.fail("group_norm: \(groups) groups do not fit input \(shape) (weight \(weight.shape))")
            return self
        }
        return builder.emit(.groupNorm(groups: groups, eps: eps, activation: nil), [self, weight, bias], shape: shape)
    }

    public func layerNorm(eps: Float, weight: Value, bias: Value) -> Value {
        guard let d = shape.last, weight.shape == [d], bias.shape == [d] else {
            builder.fail("layer_norm: weight \(weight.shape) does not fit input \(shape)")
            return self
        }
        return builder.emit(.layerNorm(eps: eps), [self, weight, bias], shape: shape)
    }

    public func softmax() -> Value { builder.emit(.softmax, [self], shape: shape) }

    /// Scaled dot-product attention on token-major tensors: q [B,Sq,H*D], k [B,Sk,H*D],
    /// v [B,Sk,H*Dv] -> [B,Sq,H*Dv]. No head permutes are needed: backends index heads by stride.
    public func attention(_ k: Value, _ v: Value, heads: Int, scale: Float? = nil, causal: Bool = false,
                          upcast: Bool = false) -> Value {
        guard rank == 3, k.rank == 3, v.rank == 3, shape[0] == k.shape[0], k.shape[0] == v.shape[0],
              k.shape[1] == v.shape[1], shape[2] == k.shape[2], shape[2] % heads == 0, v.shape[2] % heads == 0
        else {
            builder.fail("attention: q \(shape), k \(k.shape), v \(v.shape) with \(heads) heads do not fit")
            return self
        }
        let d = shape[2] / heads
        let attrs = AttentionAttributes(heads: heads, scale: scale ?? 1 / Float(d).squareRoot(), causal: causal, upcast: upcast)
        return builder.emit(.attention(attrs), [self, k, v], shape: [shape[0], shape[1], v.shape[2]])
    }

    /// diffusers' GEGLU activation after its projection: `a * gelu(b)` with [a, b] = chunk(2).
    public func geglu() -> Value {
        guard let d = shape.last, d % 2 == 0 else { builder.fail("geglu: odd last dimension \(shape)"); return self }
        return builder.emit(.geglu, [self], shape: Array(shape.dropLast()) + [d / 2])
    }

    public func upsampleNearest2x() -> Value {
        guard rank == 4 else { builder.fail("upsample: input \(shape) is not 4-D"); return self }
        return builder.emit(.upsampleNearest2x, [self], shape: [shape[0], shape[1], shape[2] * 2, shape[3] * 2])
    }

    /// torch's `interpolate(x, size=(height, width), mode="bilinear", align_corners=...)` of
    /// [N,C,H,W]; the scale is in/out per side, as torch takes it for `size=` and for an integer
    /// `scale_factor` with `align_corners=True`.
    public func resizeBilinear(height: Int, width: Int, alignCorners: Bool) -> Value {
        guard rank == 4, height > 0, width > 0 else {
            builder.fail("bilinear resize of \(shape) to \(height)x\(width): input must be 4-D, the size positive")
            return self
        }
        if height == shape[2] && width == shape[3] { return self }
        return builder.emit(.resizeBilinear(alignCorners: alignCorners), [self], shape: [shape[0], shape[1], height, width])
    }

    /// torch's `max_pool2d(x, kernel, stride)` of [N,C,H,W] with no padding, floor rounding.
    public func maxPool2d(kernel: (Int, Int), stride: (Int, Int)) -> Value {
        guard rank == 4, kernel.0 > 0, kernel.1 > 0, stride.0 > 0, stride.1 > 0,
              shape[2] >= kernel.0, shape[3] >= kernel.1 else {
            builder.fail("max pool \(kernel.0)x\(kernel.1) stride \(stride.0)x\(stride.1) of \(shape): input must be 4-D and hold one window")
            return self
        }
        let out = [shape[0], shape[1], (shape[2] - kernel.0) / stride.0 + 1, (shape[3] - kernel.1) / stride.1 + 1]
        return builder.emit(.maxPool2d(kernel: [kernel.0, kernel.1], stride: [stride.0, stride.1]), [self], shape: out)
    }

    /// torch's `F.pad(x, [left, right, top, bottom], value=0)` of [N,C,H,W].
    public func zeroPad2d(top: Int, bottom: Int, left: Int, right: Int) -> Value {
        guard rank == 4, min(top, bottom, left, right) >= 0 else { builder.fail("pad of \(shape): input must be 4-D, pads ≥ 0"); return self }
        func zeros(_ s: [Int]) -> Value { builder.constant(Tensor(zeros: s)) }
        var x = self
        let (n, c) = (shape[0], shape[1])
        if top + bottom > 0 {
            let w = x.shape[3]
            x = Value.concat((top > 0 ? [zeros([n, c, top, w])] : []) + [x] + (bottom > 0 ? [zeros([n, c, bottom, w])] : []), axis: 2)
        }
        if left + right > 0 {
            let h = x.shape[2]
            x = Value.concat((left > 0 ? [zeros([n, c, h, left])] : []) + [x] + (right > 0 ? [zeros([n, c, h, right])] : []), axis: 3)
        }
        return x
    }

    public static func concat(_ values: [Value], axis: Int) -> Value {
        let first = values[0]
        let a = first.axis(axis)
        var s = first.shape
        s[a] = 0
        for v in values {
            var t = v.shape
            guard t.count == s.count else { first.builder.fail("concat: ranks differ"); return first }
            s[a] += t[a]
            t[a] = s[a]
            guard t == s else { first.builder.fail("concat: shapes \(values.map(\.shape)) differ off axis \(a)"); return first }
        }
        return first.builder.emit(.concat(axis: a), values, shape: s)
    }

    /// Reshape; one dimension may be -1.
    public func reshape(_ newShape: [Int]) -> Value {
        var s = newShape
        if let i = s.firstIndex(of: -1) {
            let known = s.enumerated().filter { $0.offset != i }.reduce(1) { $0 * $1.element }
            s[i] = known == 0 ? 0 : count / known
        }
        guard s.reduce(1, *) == count else { builder.fail("reshape: \(shape) to \(newShape)"); return self }
        if s == shape { return self }
        return builder.emit(.reshape(s), [self], shape: s)
    }

    public func permute(_ perm: [Int]) -> Value {
        guard perm.sorted() == Array(0..<rank) else { builder.fail("permute: \(perm) for rank \(rank)"); return self }
        if perm == Array(0..<rank) { return self }
        return builder.emit(.permute(perm), [self], shape: perm.map { shape[$0] })
    }

    public func transpose(_ a: Int, _ b: Int) -> Value {
        var p = Array(0..<rank)
        p.swapAt(axis(a), axis(b))
        return permute(p)
    }

    public func slice(axis: Int, start: Int, length: Int) -> Value {
        let a = self.axis(axis)
        guard start >= 0, length > 0, start + length <= shape[a] else {
            builder.fail("slice: [\(start), \(start + length)) outside axis \(a) of \(shape)")
            return self
        }
        if length == shape[a] { return self }
        var s = shape
        s[a] = length
        return builder.emit(.slice(axis: a, start: start, length: length), [self], shape: s)
    }

    /// torch.chunk for evenly divisible sizes.
    public func chunk(_ n: Int, axis: Int) -> [Value] {
        let a = self.axis(axis)
        guard shape[a] % n == 0 else { builder.fail("chunk: axis \(a) of \(shape) not divisible by \(n)"); return [self] }
        let len = shape[a] / n
        return (0..<n).map { slice(axis: a, start: $0 * len, length: len) }
    }

    /// Rows of `table` [V,D] picked by these integer ids.
    public func embedding(_ table: Value) -> Value {
        builder.emit(.embedding, [self, table], shape: shape + [table.shape[1]])
    }

    public func timestepEmbedding(_ a: TimestepEmbeddingAttributes) -> Value {
        builder.emit(.timestepEmbedding(a), [self], shape: [shape[0], a.dim])
    }

    public func reduce(_ op: ReduceOp, axes: [Int]) -> Value {
        var s = shape
        for a in axes { s[axis(a)] = 1 }
        return builder.emit(.reduce(op, axes: axes.map { axis($0) }.sorted()), [self], shape: s)
    }

    public func cast(_ t: DType) -> Value {
        t == dtype ? self : builder.emit(.cast(t), [self], shape: shape, dtype: t)
    }

    public static func + (a: Value, b: Value) -> Value { a.binary(.add, b) }
    public static func - (a: Value, b: Value) -> Value { a.binary(.sub, b) }
    public static func * (a: Value, b: Value) -> Value { a.binary(.mul, b) }
    public static func / (a: Value, b: Value) -> Value { a.binary(.div, b) }
    public static func * (a: Value, s: Float) -> Value { a.affine(scale: s) }
    public static func / (a: Value, s: Float) -> Value { a.affine(scale: 1 / s) }
}

/// numpy broadcasting of two shapes, or nil.
public func broadcastShape(_ a: [Int], _ b: [Int]) -> [Int]? {
    let n = max(a.count, b.count)
    var out = [Int](repeating: 1, count: n)
    for i in 0..<n {
        let x = i < n - a.count ? 1 : a[i - (n - a.count)]
        let y = i < n - b.count ? 1 : b[i - (n - b.count)]
        if x != y && x != 1 && y != 1 { return nil }
        out[i] = max(x, y)
    }
    return out
}
