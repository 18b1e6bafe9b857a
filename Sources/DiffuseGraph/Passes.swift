/// Graph-to-graph rewrites. Each keeps the computation identical (up to float rounding) and
/// moves work into fewer, larger ops that backends run as one kernel.
public enum GraphPasses {
    /// The fusions the CPU backend runs with oneDNN post-ops and its fused GroupNorm kernel.
    public static func fuseForCPU(_ g: Graph) -> Graph {
        let cpuActivations: Set<UnaryOp> = [.silu, .gelu, .geluTanh, .quickGelu, .relu, .tanh, .sigmoid]
        return fuseEpilogues(fuseNormActivation(g, activations: [.silu]), activations: cpuActivations, maxAdds: 1)
    }

    /// GroupNorm followed by an activation (and nothing else reading the norm's output)
    /// becomes one GroupNorm with the activation fused.
    public static func fuseNormActivation(_ g: Graph, activations: Set<UnaryOp>) -> Graph {
        let uses = g.useCounts()
        var absorbed = Set<Int>()
        var replacement: [Int: Node] = [:]
        for (i, n) in g.nodes.enumerated() {
            guard case .unary(let u) = n.op, activations.contains(u) else { continue }
            let src = n.inputs[0].index
            guard case .groupNorm(let groups, let eps, nil) = g.nodes[src].op, uses[src] == 1 else { continue }
            var fused = g.nodes[src]
            fused.op = .groupNorm(groups: groups, eps: eps, activation: u)
            absorbed.insert(src)
            replacement[i] = fused
        }
        return rebuild(g, absorbed: absorbed, replacement: replacement)
    }

    /// conv2d/linear followed by a chain of single-use ops — an activation, an add of a
    /// same-shaped tensor (a residual), a scale — becomes one op with those as its epilogue.
    /// The fused op takes the place of the chain's last op, so a residual computed after the
    /// convolution (diffusers' `conv_shortcut`) is available to it.
    public static func fuseEpilogues(_ g: Graph, activations: Set<UnaryOp>, maxAdds: Int) -> Graph {
        let uses = g.useCounts()
        var users = Array(repeating: [Int](), count: g.nodes.count)
        for (i, n) in g.nodes.enumerated() { for v in n.inputs { users[v.index].append(i) } }
        var absorbed = Set<Int>()
        var replacement: [Int: Node] = [:]
        for (i, n) in g.nodes.enumerated() {
            var epilogue: [Epilogue]
            switch n.op {
            case .conv2d(let a): epilogue = a.epilogue
            // Quantized linears too: both backends apply the epilogue in their dequantization.
            case .linear(let a): epilogue = a.epilogue
            default: continue
            }
            var fused = n
            var current = i
            var adds = epilogue.filter { $0 == .addInput }.count
            while uses[current] == 1, users[current].count == 1 {
                let j = users[current][0]
                let u = g.nodes[j]
                // Two chains can meet at one add (ResnetBlock2D: conv_shortcut(x) + conv2(h)):
                // only the first claims it, or the second would read the first's absorbed output.
                guard !absorbed.contains(j), replacement[j] == nil else { break }
                if case .unary(let op) = u.op, activations.contains(op) {
                    epilogue.append(.activation(op))
                } else if case .affine(let s, 0) = u.op {
                    epilogue.append(.scale(s))
                } else if case .binary(.add) = u.op, adds < maxAdds {
                    let other = u.inputs[0].index == current ? u.inputs[1] : u.inputs[0]
                    guard other.index != current, g[other].shape == n.shape, g[other].dtype == n.dtype else { break }
                    epilogue.append(.addInput)
                    fused.inputs.append(other)
                    adds += 1
                } else {
                    break
                }
                absorbed.insert(current)
                current = j
            }
            guard current != i else { continue }
            switch n.op {
            case .conv2d(var a): a.epilogue = epilogue; fused.op = .conv2d(a)
            case .linear(var a): a.epilogue = epilogue; fused.op = .linear(a)
            default: break
            }
            fused.shape = g.nodes[current].shape
            replacement[current] = fused
        }
        return rebuild(g, absorbed: absorbed, replacement: replacement)
    }

    /// A new graph without `absorbed` nodes, with `replacement` nodes (inputs in old numbering)
    /// standing in for the nodes at those indices.
    static func rebuild(_ g: Graph, absorbed: Set<Int>, replacement: [Int: Node]) -> Graph {
        if absorbed.isEmpty && replacement.isEmpty { return g }
        var out = Graph()
        var remap = Array(repeating: -1, count: g.nodes.count)
        for (i, n) in g.nodes.enumerated() where !absorbed.contains(i) {
            var node = replacement[i] ?? n
            node.inputs = node.inputs.map { ValueID(remap[$0.index]) }
            remap[i] = out.nodes.count
            out.nodes.append(node)
        }
        out.outputs = g.outputs.map { ($0.name, ValueID(remap[$0.value.index])) }
        return out
    }
}

extension GraphPasses {
    /// diffusers' `fuse_qkv_projections`: where an attention's q, k and v come from linears of
    /// one input (self-attention), they become one linear whose weights are the three
    /// concatenated, and the attention reads q, k and v from its packed output; where only k
    /// and v share an input (cross-attention), those two fuse. One large matrix product
    /// instead of three small ones; the arithmetic per element is unchanged.
    public static func fuseQKVProjections(_ g: Graph) -> Graph {
        let uses = g.useCounts()
        /// The linear producing `v` if it is a plain one (parameter weights, no epilogue) used only here.
        func plainLinear(_ v: ValueID) -> (x: ValueID, weight: String, bias: String?)? {
            let n = g[v]
            guard case .linear(let a) = n.op, a.epilogue.isEmpty, a.quantization == .none, uses[v.index] == 1,
                  case .parameter(.named(let w)) = g[n.inputs[1]].op else { return nil }
            var bias: String?
            if a.hasBias {
                guard case .parameter(.named(let b)) = g[n.inputs[2]].op else { return nil }
                bias = b
            }
            return (n.inputs[0], w, bias)
        }

        var out = Graph()
        var remap = Array(repeating: -1, count: g.nodes.count)
        func emit(_ n: Node) -> Int {
            out.nodes.append(n)
            return out.nodes.count - 1
        }
        // Linears that will be fused are emitted at the attention instead.
        var skip = Set<Int>()
        var plans: [Int: (inputs: [ValueID], packing: AttentionPacking)] = [:]
        for (i, n) in g.nodes.enumerated() {
            guard case .attention(let a) = n.op, a.packing == .separate else { continue }
            let (q, k, v) = (n.inputs[0], n.inputs[1], n.inputs[2])
            guard let lk = plainLinear(k), let lv = plainLinear(v), lk.x == lv.x, (lk.bias == nil) == (lv.bias == nil) else { continue }
            if let lq = plainLinear(q), lq.x == lk.x, (lq.bias == nil) == (lk.bias == nil), q != k, k != v {
                skip.formUnion([q.index, k.index, v.index])
                plans[i] = ([q, k, v], .qkv)
            } else if k != v {
                skip.formUnion([k.index, v.index])
                plans[i] = ([k, v], .kv)
            }
        }
        guard !plans.isEmpty else { return g }
        for (i, n) in g.nodes.enumerated() where !skip.contains(i) {
            var node = n
            if let plan = plans[i], case .attention(var a) = n.op {
                let linears = plan.inputs.map { plainLinear($0)! }
                let widths = plan.inputs.map { g[$0].shape.last! }
                let x = linears[0].x
                let d = g[x].shape.last!
                let total = widths.reduce(0, +)
                var wNode = g[g[plan.inputs[0]].inputs[1]]
                wNode.op = .parameter(.concat(linears.map(\.weight), axis: 0))
                wNode.shape = [total, d]
                var inputs = [ValueID(remap[x.index]), ValueID(emit(wNode))]
                if linears[0].bias != nil {
                    var bNode = g[g[plan.inputs[0]].inputs[2]]
                    bNode.op = .parameter(.concat(linears.map { $0.bias! }, axis: 0))
                    bNode.shape = [total]
                    inputs.append(ValueID(emit(bNode)))
                }
                var linear = g[plan.inputs[0]]
                linear.inputs = inputs
                linear.shape = Array(g[x].shape.dropLast()) + [total]
                linear.scope = linear.scope.isEmpty ? n.scope : linear.scope
                let fused = ValueID(emit(linear))
                a.packing = plan.packing
                node.op = .attention(a)
                node.inputs = plan.packing == .qkv ? [fused] : [ValueID(remap[n.inputs[0].index]), fused]
            } else {
                node.inputs = n.inputs.map { ValueID(remap[$0.index]) }
            }
            remap[i] = emit(node)
        }
        out.outputs = g.outputs.map { ($0.name, ValueID(remap[$0.value.index])) }
        return out.prunedDeadNodes()
    }
}

extension GraphPasses {
    /// Marks linears for dynamic int8 quantization (diffusers' `dynamic_quant` recipe): the
    /// activations are quantized per row on the fly and the weights per output channel once.
    /// `filter` decides per layer, like the recipe's `dynamic_quant_filter_fn`; the default keeps
    /// small matrix products in float, where quantizing costs more than it saves.
    public static func quantizeLinears(_ g: Graph, as quantization: Quantization = .dynamicInt8,
                                       filter: ((_ rows: Int, _ inFeatures: Int, _ outFeatures: Int) -> Bool)? = nil) -> Graph {
        let keep = filter ?? { rows, k, n in k >= 64 && n >= 64 && rows * k * n >= 1 << 22 }
        var out = g
        for (i, n) in g.nodes.enumerated() {
            guard case .linear(var a) = n.op, a.quantization == .none else { continue }
            let w = g[n.inputs[1]].shape
            guard case .parameter = g[n.inputs[1]].op, keep(n.count / w[0], w[1], w[0]) else { continue }
            a.quantization = quantization
            out.nodes[i].op = .linear(a)
        }
        return out
    }
}

extension GraphPasses {
    /// Marks convolutions for dynamic int8 (the CPU's u8·s8 convolution): activations scaled
    /// per tensor on the fly, weights per output channel once. The default filter skips thin
    /// ones (a UNet's conv_in from 4 latent channels, conv_out to 4), whose error costs more
    /// than their time.
    public static func quantizeConvolutions(_ g: Graph,
                                            filter: ((_ inputFeatures: Int, _ outChannels: Int) -> Bool)? = nil) -> Graph {
        let keep = filter ?? { k, n in k >= 64 && n >= 64 }
        var out = g
        for (i, n) in g.nodes.enumerated() {
            guard case .conv2d(var a) = n.op, a.quantization == .none, a.groups == 1,
                  case .parameter = g[n.inputs[1]].op else { continue }
            let w = g[n.inputs[1]].shape
            guard keep(w.dropFirst().reduce(1, *), w[0]) else { continue }
            a.quantization = .dynamicInt8
            out.nodes[i].op = .conv2d(a)
        }
        return out
    }
}

extension GraphPasses {
    /// The same graph with every parameter moved to just before its first reader. A backend that
    /// streams weights in (sequential offload) then plans each weight's buffer like any other
    /// value: alive from its upload to its last reader, so only a few layers' weights are
    /// resident at once.
    public static func parametersAtFirstUse(_ g: Graph) -> Graph {
        var out = Graph()
        var map = [Int](repeating: -1, count: g.nodes.count)
        func emit(_ i: Int) {
            var n = g.nodes[i]
            n.inputs = n.inputs.map { ValueID(map[$0.index]) }
            out.nodes.append(n)
            map[i] = out.nodes.count - 1
        }
        for (i, n) in g.nodes.enumerated() {
            if case .parameter = n.op { continue }
            // Only parameters can be unplaced here: everything else precedes its readers.
            for v in n.inputs where map[v.index] < 0 { emit(v.index) }
            emit(i)
        }
        for i in g.nodes.indices where map[i] < 0 { emit(i) }  // parameters nothing reads
        out.outputs = g.outputs.map { ($0.name, ValueID(map[$0.value.index])) }
        return out
    }
}

extension GraphPasses {
    /// Channels-last (NHWC) image activations end to end, as PyTorch's `channels_last` memory
    /// format: convolutions, GroupNorms and upsamplings run on [N,H,W,C] (tensor-core convolution
    /// kernels want it, and cuDNN otherwise transposes around every NCHW convolution), ops that
    /// do not care (elementwise, concat and slice along channels) follow their inputs, and the
    /// transformer blocks' `permute(0,2,3,1)`/`permute(0,3,1,2)` become free views. A value is
    /// converted back to NCHW only where an op needs it (a reshape of an image, a graph output).
    /// Grouped convolutions stay NCHW.
    public static func channelsLast(_ g: Graph) -> Graph {
        var out = Graph()
        var map = [Int](repeating: -1, count: g.nodes.count)
        /// Whether value i (original index) is stored NHWC: then out's node holds [N,H,W,C].
        var nhwc = [Bool](repeating: false, count: g.nodes.count)
        /// Whether value i (original index, logical [N,C,L]) is stored [N,L,C]: an NHWC image
        /// flattened for attention (the VAE's `reshape(N,C,HW).transpose(1,2)` and back).
        var nlc = [Bool](repeating: false, count: g.nodes.count)
        var toNHWC: [Int: Int] = [:], toNCHW: [Int: Int] = [:], lastWeights: [String: Int] = [:]
        let nchwToPhysical = [0, 3, 1, 2]  // logical NCHW axis -> its position in [N,H,W,C]

        func emit(_ template: Node, _ op: Op, _ inputs: [Int], _ shape: [Int], channelsLast: Bool = false) -> Int {
            out.append(template, op, inputs, shape: shape, channelsLast: channelsLast)
        }
        /// A permute of out's value v (a reshape when no element moves).
        func permute(_ v: Int, _ perm: [Int]) -> Int {
            let n = out.nodes[v]
            let shape = perm.map { n.shape[$0] }
            let moving = perm.filter { n.shape[$0] != 1 }
            if moving == moving.sorted() { return emit(n, .reshape(shape), [v], shape) }
            return emit(n, .permute(perm), [v], shape)
        }
        /// Original value i stored NHWC (its rank must be 4).
        func asNHWC(_ i: Int) -> Int {
            if nhwc[i] { return map[i] }
            if let c = toNHWC[i] { return c }
            let c = permute(map[i], [0, 2, 3, 1])
            toNHWC[i] = c
            return c
        }
        /// Original value i in its logical layout.
        func asNCHW(_ i: Int) -> Int {
            if !nhwc[i] && !nlc[i] { return map[i] }
            if let c = toNCHW[i] { return c }
            let c = permute(map[i], nlc[i] ? [0, 2, 1] : [0, 3, 1, 2])
            toNCHW[i] = c
            return c
        }
        /// Broadcast operand i of a 4D result, right-aligned as numpy does, stored NHWC.
        func broadcastNHWC(_ i: Int) -> Int {
            let s = g.nodes[i].shape
            if s.count == 4 { return asNHWC(i) }
            let v = asNCHW(i), s4 = [Int](repeating: 1, count: 4 - s.count) + s
            return permute(emit(out.nodes[v], .reshape(s4), [v], s4), [0, 2, 3, 1])
        }
        func keep(_ i: Int, _ n: Node) {
            map[i] = emit(n, n.op, n.inputs.map { asNCHW($0.index) }, n.shape)
        }

        for (i, n) in g.nodes.enumerated() {
            let ins = n.inputs.map(\.index)
            let image = n.shape.count == 4
            switch n.op {
            case .conv2d(let a) where image && a.groups == 1:
                var inputs = [asNHWC(ins[0])]
                let w = g.nodes[ins[1]]
                if case .parameter(.named(let name)) = w.op {
                    if lastWeights[name] == nil {
                        lastWeights[name] = emit(w, .parameter(.channelsLast(name)), [], channelsLastShape(w.shape))
                    }
                    inputs.append(lastWeights[name]!)
                } else {
                    inputs.append(permute(asNCHW(ins[1]), [0, 2, 3, 1]))
                }
                var k = 2
                if a.hasBias { inputs.append(asNCHW(ins[2])); k = 3 }
                inputs += ins[k...].map { g.nodes[$0].shape.count == 4 ? asNHWC($0) : asNCHW($0) }
                map[i] = emit(n, n.op, inputs, channelsLastShape(n.shape), channelsLast: true)
                nhwc[i] = true
            case .groupNorm where image, .upsampleNearest2x where image:
                map[i] = emit(n, n.op, [asNHWC(ins[0])] + ins.dropFirst().map { asNCHW($0) }, channelsLastShape(n.shape),
                              channelsLast: true)
                nhwc[i] = true
            case .unary, .affine, .clamp, .cast:
                let s = n.shape
                map[i] = emit(n, n.op, [map[ins[0]]], nhwc[ins[0]] ? channelsLastShape(s) : nlc[ins[0]] ? [s[0], s[2], s[1]] : s)
                nhwc[i] = nhwc[ins[0]]
                nlc[i] = nlc[ins[0]]
            case .reshape(let s) where nhwc[ins[0]] && s.count == 3 && s[0] == n.shape[0]
                && s[1] == g.nodes[ins[0]].shape[1] && s[2] == g.nodes[ins[0]].shape[2] * g.nodes[ins[0]].shape[3]:
                // [N,C,H,W] -> [N,C,HW] of an NHWC image: stored [N,HW,C], no element moves.
                map[i] = emit(n, .reshape([s[0], s[2], s[1]]), [map[ins[0]]], [s[0], s[2], s[1]])
                nlc[i] = true
            case .reshape(let s) where nlc[ins[0]] && s.count == 4 && s[0] == n.shape[0]
                && s[1] == g.nodes[ins[0]].shape[1] && s[2] * s[3] == g.nodes[ins[0]].shape[2]:
                // [N,C,HW] stored [N,HW,C] -> [N,C,H,W] stored NHWC.
                map[i] = emit(n, .reshape(channelsLastShape(s)), [map[ins[0]]], channelsLastShape(s))
                nhwc[i] = true
            case .permute(let perm) where perm == [0, 2, 1] && nlc[ins[0]]:
                map[i] = map[ins[0]]  // the logical [N,L,C] is the storage
            case .permute(let perm) where perm == [0, 2, 1] && !nlc[ins[0]] && n.shape.count == 3:
                // [N,L,C] -> [N,C,L]: stored [N,L,C], that is the input itself; converted only
                // if a reader needs the logical layout (most reshape it back to an image).
                map[i] = map[ins[0]]
                nlc[i] = true
            case .binary where image && ins.contains(where: { nhwc[$0] }):
                map[i] = emit(n, n.op, ins.map { broadcastNHWC($0) }, channelsLastShape(n.shape))
                nhwc[i] = true
            case .concat(let axis) where image && ins.contains(where: { nhwc[$0] }):
                map[i] = emit(n, .concat(axis: nchwToPhysical[axis]), ins.map { asNHWC($0) }, channelsLastShape(n.shape))
                nhwc[i] = true
            case .slice(let axis, let start, let length) where image && nhwc[ins[0]]:
                map[i] = emit(n, .slice(axis: nchwToPhysical[axis], start: start, length: length), [map[ins[0]]],
                              channelsLastShape(n.shape))
                nhwc[i] = true
            case .permute(let perm) where image && nhwc[ins[0]]:
                // logical = physical.permute([0,3,1,2]); the result is physical.permute(q).
                let q = perm.map { nchwToPhysical[$0] }
                map[i] = q == [0, 1, 2, 3] ? map[ins[0]] : permute(map[ins[0]], q)
            case .permute(let perm) where image && perm == [0, 3, 1, 2] && !nhwc[ins[0]]:
                // [N,H,W,C] -> NCHW: stored NHWC, that is the input itself.
                map[i] = map[ins[0]]
                nhwc[i] = true
            default:
                keep(i, n)
            }
        }
        out.outputs = g.outputs.map { ($0.name, ValueID(asNCHW($0.value.index))) }
        return removingDeadNodes(out)
    }

    /// The graph without values no output depends on (a weight replaced by its channels-last
    /// form must not be uploaded too). Inputs always stay: callers feed them by name.
    public static func removingDeadNodes(_ g: Graph) -> Graph {
        var live = [Bool](repeating: false, count: g.nodes.count)
        for (_, v) in g.outputs { live[v.index] = true }
        for i in g.nodes.indices.reversed() {
            if case .input = g.nodes[i].op { live[i] = true }
            if live[i] { for v in g.nodes[i].inputs { live[v.index] = true } }
        }
        var out = Graph()
        var map = [Int](repeating: -1, count: g.nodes.count)
        for (i, n) in g.nodes.enumerated() where live[i] {
            var m = n
            m.inputs = n.inputs.map { ValueID(map[$0.index]) }
            out.nodes.append(m)
            map[i] = out.nodes.count - 1
        }
        out.outputs = g.outputs.map { ($0.name, ValueID(map[$0.value.index])) }
        return out
    }
}
