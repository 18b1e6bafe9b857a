import DiffuseCore

/// A plain interpreter of the graph: loops, Float64 accumulation, float32 storage, the full
/// score matrix in attention. It is the yardstick every fast backend and every op test is
/// checked against; it ignores precision options and quantization (it is always float32).
public final class ReferenceBackend: Backend {
    public init() {}
    public var name: String { "reference" }
    public var deviceDescription: String { "host, naive reference loops" }
    public var peakMemoryBytes: Int { 0 }
    public func synchronize() throws {}

    public func upload(_ tensor: Tensor) throws -> DeviceTensor { HostTensor(tensor) }

    public func linearCombination(_ terms: [(Double, DeviceTensor)]) throws -> DeviceTensor {
        let xs = try terms.map { try $0.1.toHost().toFloatArray() }
        var out = [Float](repeating: 0, count: xs[0].count)
        for i in out.indices {
            var s = 0.0
            for (t, x) in zip(terms, xs) { s += t.0 * Double(x[i]) }
            out[i] = Float(s)
        }
        return HostTensor(Tensor(shape: terms[0].1.shape, floats: out))
    }

    public func compile(_ graph: Graph, weights: ModelWeights?, options: CompileOptions) throws -> Executable {
        if let weights { try weights.validate(graph) }
        return ReferenceExecutable(graph: graph, weights: weights)
    }
}

final class ReferenceExecutable: Executable {
    let graph: Graph
    let weights: ModelWeights?
    var arenaBytes: Int { graph.nodes.reduce(0) { $0 + $1.byteCount } }

    init(graph: Graph, weights: ModelWeights?) {
        self.graph = graph
        self.weights = weights
    }

    func run(_ feeds: [String: DeviceTensor]) throws -> [String: DeviceTensor] {
        try graph.checkFeeds(feeds) { $0.shape }
        var values = [[Float]](repeating: [], count: graph.nodes.count)
        for (i, node) in graph.nodes.enumerated() {
            values[i] = try node.channelsLast ? evaluateChannelsLast(node, values) : evaluate(node, values, feeds)
        }
        var out: [String: DeviceTensor] = [:]
        for (name, v) in graph.outputs {
            let n = graph[v]
            let t = Tensor(shape: n.shape, floats: values[v.index])
            out[name] = HostTensor(n.dtype == .float32 ? t : t.converted(to: n.dtype))
        }
        return out
    }

    /// A channels-last op: its NCHW twin on transposed copies (the yardstick stays one code path).
    private func evaluateChannelsLast(_ node: Node, _ values: [[Float]]) throws -> [Float] {
        var sub = Graph()
        var feeds: [String: DeviceTensor] = [:]
        for (k, v) in node.inputs.enumerated() {
            var t = Tensor(shape: graph[v].shape, floats: values[v.index])
            if t.shape.count == 4 { t = t.permuted([0, 3, 1, 2]) }  // NHWC activations and OHWI weights alike
            sub.nodes.append(Node(op: .input("x\(k)"), inputs: [], shape: t.shape, dtype: .float32, scope: node.scope))
            feeds["x\(k)"] = HostTensor(t)
        }
        var n = node
        n.channelsLast = false
        n.inputs = node.inputs.indices.map { ValueID($0) }
        n.shape = nchwShape(node.shape)
        n.dtype = .float32
        sub.nodes.append(n)
        sub.outputs = [("y", ValueID(sub.nodes.count - 1))]
        let y = try ReferenceExecutable(graph: sub, weights: nil).run(feeds)["y"]!.toHost()
        return y.permuted([0, 2, 3, 1]).toFloatArray()
    }

    private func evaluate(_ node: Node, _ values: [[Float]], _ feeds: [String: DeviceTensor]) throws -> [Float] {
        func input(_ k: Int) -> [Float] { values[node.inputs[k].index] }
        func shapeOf(_ k: Int) -> [Int] { graph[node.inputs[k]].shape }
        let count = node.count
        switch node.op {
        case .input(let name):
            return try feeds[name]!.toHost().toFloatArray()
        case .parameter(let src):
            guard let weights else { throw BackendError("graph has parameters but no weights were given") }
            return try weights.float32(src).toFloatArray()
        case .constant(let c):
            return c.tensor.toFloatArray()

        case .conv2d(let a):
            let x = input(0), w = input(1)
            let xs = shapeOf(0), ws = shapeOf(1)
            let (n, c, h, wd) = (xs[0], xs[1], xs[2], xs[3])
            let (o, cg, kh, kw) = (ws[0], ws[1], ws[2], ws[3])
            let (ho, wo) = (node.shape[2], node.shape[3])
            let og = o / a.groups
            var out = [Float](repeating: 0, count: count)
            for b in 0..<n { for oc in 0..<o {
                let g = oc / og
                for oy in 0..<ho { for ox in 0..<wo {
                    var s = 0.0
                    for ic in 0..<cg {
                        let cin = g * cg + ic
                        for ky in 0..<kh {
                            let iy = oy * a.stride.0 - a.padding.0 + ky * a.dilation.0
                            if iy < 0 || iy >= h { continue }
                            for kx in 0..<kw {
                                let ix = ox * a.stride.1 - a.padding.2 + kx * a.dilation.1
                                if ix < 0 || ix >= wd { continue }
                                s += Double(x[((b * c + cin) * h + iy) * wd + ix]) * Double(w[((oc * cg + ic) * kh + ky) * kw + kx])
                            }
                        }
                    }
                    out[((b * o + oc) * ho + oy) * wo + ox] = Float(s)
                }}
            }}
            if a.hasBias {
                let bias = input(2)
                let hw = ho * wo
                for i in 0..<count { out[i] += bias[(i / hw) % o] }
            }
            return applyEpilogue(a.epilogue, out, firstExtra: a.hasBias ? 3 : 2, values, node)

        case .linear(let a):
            let x = input(0), w = input(1)
            let k = shapeOf(1)[1], nOut = shapeOf(1)[0]
            let rows = count / nOut
            var out = [Float](repeating: 0, count: count)
            for r in 0..<rows { for j in 0..<nOut {
                var s = 0.0
                for t in 0..<k { s += Double(x[r * k + t]) * Double(w[j * k + t]) }
                out[r * nOut + j] = Float(s)
            }}
            if a.hasBias {
                let bias = input(2)
                for i in 0..<count { out[i] += bias[i % nOut] }
            }
            return applyEpilogue(a.epilogue, out, firstExtra: a.hasBias ? 3 : 2, values, node)

        case .matmul(let tb):
            let a = input(0), b = input(1)
            let sa = shapeOf(0), sb = shapeOf(1)
            let m = sa[sa.count - 2], k = sa[sa.count - 1]
            let n = node.shape[node.shape.count - 1]
            let batch = count / (m * n)
            var out = [Float](repeating: 0, count: count)
            _ = sb
            for bi in 0..<batch { for i in 0..<m { for j in 0..<n {
                var s = 0.0
                for t in 0..<k {
                    let bv = tb ? b[bi * n * k + j * k + t] : b[bi * k * n + t * n + j]
                    s += Double(a[bi * m * k + i * k + t]) * Double(bv)
                }
                out[bi * m * n + i * n + j] = Float(s)
            }}}
            return out

        case .binary(let op):
            let a = input(0), b = input(1)
            let ia = broadcastIndexer(shapeOf(0), node.shape), ib = broadcastIndexer(shapeOf(1), node.shape)
            return (0..<count).map { Float(ScalarMath.apply(op, Double(a[ia($0)]), Double(b[ib($0)]))) }
        case .unary(let op):
            return input(0).map { Float(ScalarMath.apply(op, Double($0))) }
        case .affine(let s, let t):
            return input(0).map { Float(Double($0) * Double(s) + Double(t)) }
        case .clamp(let lo, let hi):
            return input(0).map { Swift.min(Swift.max($0, lo), hi) }

        case .groupNorm(let groups, let eps, let act):
            let x = input(0), w = input(1), b = input(2)
            let s = node.shape
            let c = s[1], spatial = s[2...].reduce(1, *)
            let cg = c / groups
            var out = [Float](repeating: 0, count: count)
            for n in 0..<s[0] { for g in 0..<groups {
                let base = (n * c + g * cg) * spatial
                let len = cg * spatial
                var mean = 0.0
                for i in 0..<len { mean += Double(x[base + i]) }
                mean /= Double(len)
                var v = 0.0
                for i in 0..<len { let d = Double(x[base + i]) - mean; v += d * d }
                v /= Double(len)
                let inv = 1 / (v + Double(eps)).squareRoot()
                for i in 0..<len {
                    let ch = g * cg + i / spatial
                    var y = (Double(x[base + i]) - mean) * inv * Double(w[ch]) + Double(b[ch])
                    if let act { y = ScalarMath.apply(act, y) }
                    out[base + i] = Float(y)
                }
            }}
            return out

        case .layerNorm(let eps):
            let x = input(0), w = input(1), b = input(2)
            let d = node.shape.last!
            var out = [Float](repeating: 0, count: count)
            for r in 0..<(count / d) {
                var mean = 0.0
                for i in 0..<d { mean += Double(x[r * d + i]) }
                mean /= Double(d)
                var v = 0.0
                for i in 0..<d { let t = Double(x[r * d + i]) - mean; v += t * t }
                v /= Double(d)
                let inv = 1 / (v + Double(eps)).squareRoot()
                for i in 0..<d { out[r * d + i] = Float((Double(x[r * d + i]) - mean) * inv * Double(w[i]) + Double(b[i])) }
            }
            return out

        case .softmax:
            let x = input(0)
            let d = node.shape.last!
            var out = [Float](repeating: 0, count: count)
            for r in 0..<(count / d) {
                var m = -Double.infinity
                for i in 0..<d { m = Swift.max(m, Double(x[r * d + i])) }
                var s = 0.0
                for i in 0..<d { s += Libm.exp(Double(x[r * d + i]) - m) }
                for i in 0..<d { out[r * d + i] = Float(Libm.exp(Double(x[r * d + i]) - m) / s) }
            }
            return out

        case .attention(let a):
            return attention(a, node, values)

        case .geglu:
            let x = input(0)
            let d = node.shape.last!
            var out = [Float](repeating: 0, count: count)
            for r in 0..<(count / d) { for i in 0..<d {
                let h = Double(x[r * 2 * d + i]), gate = Double(x[r * 2 * d + d + i])
                out[r * d + i] = Float(h * ScalarMath.apply(.gelu, gate))
            }}
            return out

        case .upsampleNearest2x:
            let x = input(0)
            let s = node.shape
            let (h, w) = (s[2], s[3])
            var out = [Float](repeating: 0, count: count)
            for p in 0..<(s[0] * s[1]) { for y in 0..<h { for xx in 0..<w {
                out[(p * h + y) * w + xx] = x[(p * (h / 2) + y / 2) * (w / 2) + xx / 2]
            }}}
            return out

        case .resizeBilinear(let alignCorners):
            let x = input(0), src = shapeOf(0), s = node.shape
            let (inH, inW, h, w) = (src[2], src[3], s[2], s[3])
            let ty = BilinearTaps(input: inH, output: h, alignCorners: alignCorners)
            let tx = BilinearTaps(input: inW, output: w, alignCorners: alignCorners)
            var out = [Float](repeating: 0, count: count)
            for p in 0..<(s[0] * s[1]) { for y in 0..<h { for xx in 0..<w {
                func at(_ r: Int32, _ c: Int32) -> Float { x[(p * inH + Int(r)) * inW + Int(c)] }
                let row0 = at(ty.index0[y], tx.index0[xx]) * tx.lambda0[xx] + at(ty.index0[y], tx.index1[xx]) * tx.lambda1[xx]
                let row1 = at(ty.index1[y], tx.index0[xx]) * tx.lambda0[xx] + at(ty.index1[y], tx.index1[xx]) * tx.lambda1[xx]
                out[(p * h + y) * w + xx] = row0 * ty.lambda0[y] + row1 * ty.lambda1[y]
            }}}
            return out

        case .maxPool2d(let kernel, let stride):
            let x = input(0), src = shapeOf(0), s = node.shape
            var out = [Float](repeating: 0, count: count)
            for p in 0..<(s[0] * s[1]) { for y in 0..<s[2] { for xx in 0..<s[3] {
                var m = -Float.infinity
                for i in 0..<kernel[0] { for j in 0..<kernel[1] {
                    let v = x[(p * src[2] + y * stride[0] + i) * src[3] + xx * stride[1] + j]
                    if v > m || v.isNaN { m = v }
                }}
                out[(p * s[2] + y) * s[3] + xx] = m
            }}}
            return out

        case .concat(let axis):
            let outer = node.shape[..<axis].reduce(1, *)
            var out: [Float] = []
            out.reserveCapacity(count)
            for o in 0..<outer {
                for k in node.inputs.indices {
                    let inner = shapeOf(k)[axis...].reduce(1, *)
                    out.append(contentsOf: input(k)[(o * inner)..<((o + 1) * inner)])
                }
            }
            return out

        case .reshape:
            return input(0)

        case .permute(let perm):
            let x = input(0)
            let src = shapeOf(0)
            let srcStrides = strides(src)
            let dstStrides = strides(node.shape)
            var out = [Float](repeating: 0, count: count)
            for i in 0..<count {
                var rem = i, off = 0
                for d in 0..<node.shape.count {
                    let idx = rem / dstStrides[d]
                    rem %= dstStrides[d]
                    off += idx * srcStrides[perm[d]]
                }
                out[i] = x[off]
            }
            return out

        case .slice(let axis, let start, let length):
            let x = input(0)
            let src = shapeOf(0)
            let outer = src[..<axis].reduce(1, *), inner = src[(axis + 1)...].reduce(1, *)
            var out: [Float] = []
            out.reserveCapacity(count)
            for o in 0..<outer {
                let base = (o * src[axis] + start) * inner
                out.append(contentsOf: x[base..<(base + length * inner)])
            }
            return out

        case .embedding:
            let ids = input(0), table = input(1)
            let d = shapeOf(1)[1], v = shapeOf(1)[0]
            var out = [Float](repeating: 0, count: count)
            for (r, id) in ids.enumerated() {
                let row = Int(id)
                guard row >= 0 && row < v else { throw BackendError("embedding: id \(row) outside the table of \(v) rows") }
                for i in 0..<d { out[r * d + i] = table[row * d + i] }
            }
            return out

        case .timestepEmbedding(let a):
            return input(0).flatMap { ScalarMath.timestepEmbedding($0, a) }

        case .reduce(let op, let axes):
            let x = input(0)
            let src = shapeOf(0)
            let srcStrides = strides(src), dstStrides = strides(node.shape)
            var acc = [Double](repeating: op == .max ? -.infinity : 0, count: count)
            for i in 0..<x.count {
                var rem = i, dst = 0
                for d in 0..<src.count {
                    let idx = rem / srcStrides[d]
                    rem %= srcStrides[d]
                    if !axes.contains(d) { dst += idx * dstStrides[d] }
                }
                acc[dst] = op == .max ? Swift.max(acc[dst], Double(x[i])) : acc[dst] + Double(x[i])
            }
            let n = Double(axes.reduce(1) { $0 * src[$1] })
            return acc.map { Float(op == .mean ? $0 / n : $0) }

        case .cast(let t):
            let x = input(0)
            if t.isFloatingPoint { return x }
            return x.map { $0.rounded(.towardZero) }
        }
    }

    private func applyEpilogue(_ ops: [Epilogue], _ y: [Float], firstExtra: Int, _ values: [[Float]], _ node: Node) -> [Float] {
        var out = y
        var next = firstExtra
        for e in ops {
            switch e {
            case .activation(let u): out = out.map { Float(ScalarMath.apply(u, Double($0))) }
            case .scale(let s): out = out.map { $0 * s }
            case .addInput:
                let extra = values[node.inputs[next].index]
                next += 1
                for i in out.indices { out[i] += extra[i] }
            }
        }
        return out
    }

    private func attention(_ a: AttentionAttributes, _ node: Node, _ values: [[Float]]) -> [Float] {
        let q0 = graph[node.inputs[0]].shape
        let (batch, sq) = (q0[0], q0[1])
        let h = a.heads
        let dv = node.shape[2] / h
        // Resolve (tensor, row stride, column offset) for q, k, v from the packing.
        let qv = values[node.inputs[0].index]
        var q = (qv, q0[2], 0), k = q, v = q
        var sk = sq
        let dqk: Int
        switch a.packing {
        case .separate:
            let ks = graph[node.inputs[1]].shape
            sk = ks[1]
            dqk = q0[2] / h
            k = (values[node.inputs[1].index], ks[2], 0)
            v = (values[node.inputs[2].index], graph[node.inputs[2]].shape[2], 0)
        case .qkv:
            dqk = (q0[2] - node.shape[2]) / 2 / h
            q = (qv, q0[2], 0); k = (qv, q0[2], h * dqk); v = (qv, q0[2], 2 * h * dqk)
        case .kv:
            let ks = graph[node.inputs[1]].shape
            sk = ks[1]
            dqk = q0[2] / h
            k = (values[node.inputs[1].index], ks[2], 0)
            v = (values[node.inputs[1].index], ks[2], h * dqk)
        }
        var out = [Float](repeating: 0, count: node.count)
        var scores = [Double](repeating: 0, count: sk)
        for b in 0..<batch { for hd in 0..<h { for i in 0..<sq {
            var m = -Double.infinity
            for j in 0..<sk {
                if a.causal && j > i { scores[j] = -.infinity; continue }
                var s = 0.0
                let qBase = (b * sq + i) * q.1 + q.2 + hd * dqk
                let kBase = (b * sk + j) * k.1 + k.2 + hd * dqk
                for d in 0..<dqk { s += Double(q.0[qBase + d]) * Double(k.0[kBase + d]) }
                scores[j] = s * Double(a.scale)
                m = Swift.max(m, scores[j])
            }
            var total = 0.0
            for j in 0..<sk { scores[j] = scores[j] == -.infinity ? 0 : Libm.exp(scores[j] - m); total += scores[j] }
            for d in 0..<dv {
                var s = 0.0
                for j in 0..<sk {
                    let vIndex: Int = (b * sk + j) * v.1 + v.2 + hd * dv + d
                    s += scores[j] * Double(v.0[vIndex])
                }
                out[(b * sq + i) * (h * dv) + hd * dv + d] = Float(s / total)
            }
        }}}
        return out
    }
}

/// Row-major strides of a shape.
public func strides(_ shape: [Int]) -> [Int] {
    var s = [Int](repeating: 1, count: shape.count)
    var acc = 1
    for i in stride(from: shape.count - 1, through: 0, by: -1) { s[i] = acc; acc *= shape[i] }
    return s
}

/// Maps a flat index of `outShape` to the flat index of a tensor of `inShape` broadcast to it.
public func broadcastIndexer(_ inShape: [Int], _ outShape: [Int]) -> (Int) -> Int {
    if inShape == outShape { return { $0 } }
    let pad = outShape.count - inShape.count
    let full = [Int](repeating: 1, count: pad) + inShape
    let inStrides = strides(full).enumerated().map { full[$0.offset] == 1 ? 0 : $0.element }
    let outStrides = strides(outShape)
    return { i in
        var rem = i, off = 0
        for d in 0..<outShape.count {
            let idx = rem / outStrides[d]
            rem %= outStrides[d]
            off += idx * inStrides[d]
        }
        return off
    }
}
