import CDNNL
import DiffuseCore
import DiffuseGraph

/// Physical layout of a 4-D activation on the CPU.
enum Layout: Equatable {
    /// Row-major in logical order (NCHW for images).
    case plain
    /// oneDNN's nChw8c: [N][C/8][H][W][8]; needs C % 8 == 0.
    case blocked8
    /// Another layout a primitive chose (its descriptor is kept beside the value); only
    /// reorders read such a value.
    case opaque
}

/// A host buffer that prepared weights live in, cached in `ModelWeights`; with streamed
/// weights ("sequential-offload") a mapping of the weights' spill file.
final class PreparedBuffer {
    let tensor: Tensor
    let spilled: SpilledRegion?
    init(_ tensor: Tensor, spilled: SpilledRegion? = nil) {
        self.tensor = tensor
        self.spilled = spilled
    }

    /// Runs `body`, which reads the buffer, with a spilled buffer's pages mapped in for it
    /// and out of the process again after it.
    @inline(__always) func whileResident(_ body: () throws -> Void) rethrows {
        guard let spilled else { return try body() }
        spilled.prefetch()
        defer { spilled.dropResident() }
        try body()
    }
}

/// Turns a graph into a `CPUExecutable`: chooses layouts, creates oneDNN primitives and
/// reorders their weights, plans the arena, and builds one closure per step.
final class Lowering {
    typealias Resolve = (Int) -> UnsafeMutableRawPointer
    /// Makes a value's step once pointers are known: given the value's own storage and a
    /// resolver for its inputs, returns the closure a run calls (nil for views and externals).
    typealias Maker = (_ out: UnsafeMutableRawPointer, _ ptr: Resolve) throws -> (() throws -> Void)?

    struct Value {
        var shape: [Int]
        var dtype: DType
        var layout: Layout
        var storage: Storage
        var inputs: [Int]
        var external: UnsafeMutableRawPointer?
        var bytes: Int { shape.reduce(1, *) * dtype.size }
    }

    let graph: Graph
    let weights: ModelWeights?
    let options: CompileOptions
    let context: DNNL.Context
    let blocked: Bool

    var values: [Value] = []
    var makers: [Maker] = []
    /// Per value: what its step does, for profiles ("conv2d 3x3", "layout reorder", ...).
    var labels: [String] = []
    var currentLabel = ""
    /// Graph value -> program value (-1: a parameter not materialized as a plain value yet).
    var programOf: [Int]
    var conversions: [String: Int] = [:]
    /// Descriptors of values in `.opaque` layouts.
    var opaqueDescs: [Int: DNNL.MemoryDesc] = [:]
    var scratchBytes = 0
    var scratch: Tensor?
    /// With 16-bit weight storage: the float32 buffer weights are widened into before each use.
    var weightStagingBytes = 0
    var weightStaging: Tensor?
    var retained: [AnyObject] = []
    /// Spilled weights the program reads (streamed weights only).
    var spilledRegions: [SpilledRegion] = []
    var uses: [Int]

    init(graph: Graph, weights: ModelWeights?, options: CompileOptions, context: DNNL.Context, blocked: Bool) {
        self.graph = graph
        self.weights = weights
        self.options = options
        self.context = context
        self.blocked = blocked
        programOf = Array(repeating: -1, count: graph.nodes.count)
        uses = graph.useCounts()
    }

    // MARK: program values

    @discardableResult
    func add(_ v: Value, _ make: @escaping Maker) -> Int {
        values.append(v)
        makers.append(make)
        labels.append(currentLabel)
        return values.count - 1
    }

    func parameterSource(_ g: ValueID) -> ParameterSource? {
        if case .parameter(let s) = graph[g].op { return s }
        return nil
    }

    /// The program value for a graph value, converted to `layout` if one is given.
    func operand(_ g: ValueID, _ layout: Layout? = nil) throws -> Int {
        var p = programOf[g.index]
        if p < 0 {
            guard let src = parameterSource(g) else { throw BackendError("internal: value \(g) used before it is defined") }
            let t = try plainParameter(src)
            p = add(Value(shape: graph[g].shape, dtype: .float32, layout: .plain, storage: .external, inputs: [],
                          external: t.raw)) { _, _ in nil }
            programOf[g.index] = p
        }
        guard let layout, values[p].layout != layout else { return p }
        return try convert(p, to: layout)
    }

    /// float32 host copy of a parameter, shared through the weights' cache (spilled when
    /// weights stream and it is large, e.g. a token embedding of which a run reads 77 rows).
    func plainParameter(_ src: ParameterSource) throws -> Tensor {
        guard let weights else { throw BackendError("the graph has parameters but no weights were given") }
        let key = "cpu.f32:\(src)" + (streamWeights ? ":spilled" : "")
        let file = try spillFile()
        let prepared = try weights.prepared(key) { () -> PreparedBuffer in
            let b = try spill(try weights.float32(src), into: file)
            // Copied into the file: the source's pages are not needed (unspilled, `b` may be them).
            if b.spilled != nil { weights.evict(src) }
            return b
        }
        keep(prepared)
        return prepared.tensor
    }

    // MARK: streamed weights

    /// "sequential-offload" on the CPU: prepared weights live in a spill file and each step maps
    /// in only what it reads (see `SpillFile`).
    var streamWeights: Bool { options.flags.contains("sequential-offload") }
    /// Smaller weights (biases, norms) stay in memory: together they are a few MB.
    static let spillThreshold = 1 << 20

    /// The weights' spill file when weights stream (one per model, shared by its graphs).
    /// Fetched before a `prepared` closure runs: the weights' cache lock is not reentrant.
    func spillFile() throws -> SpillFile? {
        guard streamWeights, let weights else { return nil }
        return try weights.prepared("cpu.spill-file") { try SpillFile() }
    }

    /// A prepared tensor, moved into the spill file when there is one and it is large enough.
    func spill(_ t: Tensor, into file: SpillFile?) throws -> PreparedBuffer {
        guard let file, t.byteCount >= Self.spillThreshold else { return PreparedBuffer(t) }
        let (mapped, region) = try file.store(t)
        return PreparedBuffer(mapped, spilled: region)
    }

    /// Keeps a prepared buffer alive with the executable; a spilled one is also dropped from
    /// memory at the end of every run, whichever step read it.
    func keep(_ b: PreparedBuffer) {
        retained.append(b)  // the executable keeps its weights even if the cache is cleared
        if let r = b.spilled { spilledRegions.append(r) }
    }

    func md(_ shape: [Int], _ layout: Layout, type: dnnl_data_type_t = dnnl_f32) throws -> DNNL.MemoryDesc {
        switch layout {
        case .plain: return try .plain(shape, type: type)
        case .blocked8: return try DNNL.MemoryDesc(dims: shape, type: type, tag: dnnl_nChw8c)
        case .opaque: throw BackendError("internal: an opaque layout has no standard descriptor")
        }
    }

    /// The descriptor of program value `p` as it is stored.
    func desc(_ p: Int) throws -> DNNL.MemoryDesc {
        if let d = opaqueDescs[p] { return d }
        return try md(values[p].shape, values[p].layout)
    }

    /// Our layout matching a descriptor a primitive chose, if it is one of ours.
    func layout(of d: DNNL.MemoryDesc, shape: [Int]) throws -> Layout? {
        if d.equals(try md(shape, .plain)) { return .plain }
        if shape.count == 4, shape[1] % 8 == 0, d.equals(try md(shape, .blocked8)) { return .blocked8 }
        return nil
    }

    /// A reorder step between plain and blocked layouts (cached per value and layout).
    func convert(_ p: Int, to layout: Layout) throws -> Int {
        let key = "\(p):\(layout)"
        if let c = conversions[key] { return c }
        let saved = currentLabel
        currentLabel = "reorder to \(layout)"
        defer { currentLabel = saved }
        let shape = values[p].shape
        let from = try desc(p), to = try md(shape, layout)
        let r = try DNNL.Primitive(reorderFrom: from, to: to, context: context)
        scratchBytes = max(scratchBytes, r.scratchpadBytes)
        let ctx = context
        let c = add(Value(shape: shape, dtype: .float32, layout: layout, storage: .own(bytes: values[p].bytes), inputs: [p])) {
            [unowned self] out, ptr in
            let bound = DNNL.BoundPrimitive(r, try [(DNNL_ARG_FROM, DNNL.Memory(from, ptr(p), ctx)),
                                                   (DNNL_ARG_TO, DNNL.Memory(to, out, ctx))]
                                            + self.scratchBinding(r), context: ctx, what: "a layout reorder")
            self.retained.append(bound)
            return { try bound.execute() }
        }
        conversions[key] = c
        return c
    }

    func scratchBinding(_ prim: DNNL.Primitive) throws -> [(Int32, DNNL.Memory)] {
        guard prim.scratchpadBytes > 0, let scratch else { return [] }
        return [(DNNL_ARG_SCRATCHPAD, try DNNL.Memory(prim.desc(dnnl_query_scratchpad_md), scratch.raw, context))]
    }

    // MARK: build

    func build() throws -> CPUExecutable {
        for i in graph.nodes.indices {
            currentLabel = graph.profileLabel(i)
            try graph.withNodeContext(i) { try lower(graph.nodes[i], ValueID(i)) }
        }
        currentLabel = "output"
        var outputValues: [(String, Int, DType)] = []
        for (name, g) in graph.outputs {
            outputValues.append((name, try operand(g, .plain), graph[g].dtype))
        }

        // Liveness over the program; outputs live to the end.
        var lastUse = Array(repeating: -1, count: values.count)
        for (i, v) in values.enumerated() { for x in v.inputs { lastUse[x] = max(lastUse[x], i) } }
        for (_, p, _) in outputValues { lastUse[p] = values.count }
        let plan = MemoryPlanner.plan(inputs: values.map(\.inputs), lastUse: lastUse) { values[$0].storage }
        let arena = Tensor(zeros: [max(plan.arenaBytes, 64)], dtype: .uint8)
        let scratch = Tensor(zeros: [max(scratchBytes, 64)], dtype: .uint8)
        self.scratch = scratch
        if weightStagingBytes > 0 {
            let staging = Tensor(zeros: [weightStagingBytes / 4])
            weightStaging = staging
            retained.append(PreparedBuffer(staging))
        }
        let base = arena.raw
        var pointers = [UnsafeMutableRawPointer?](repeating: nil, count: values.count)
        for i in values.indices {
            if let off = plan.offsets[i] { pointers[i] = base + off } else { pointers[i] = values[i].external }
        }
        let resolve: Resolve = { i in
            guard let p = pointers[i] else { fatalError("internal: value \(i) has no storage") }
            return p
        }
        var steps: [() throws -> Void] = []
        var stepLabels: [String] = []
        for (i, m) in makers.enumerated() {
            if let s = try m(pointers[i] ?? UnsafeMutableRawPointer(bitPattern: 64)!, resolve) {
                steps.append(s)
                stepLabels.append(labels[i])
            }
        }
        let outputs: [(name: String, read: () -> Tensor)] = outputValues.map { name, p, dtype in
            let shape = values[p].shape
            let src = resolve(p)
            return (name, {
                let t = Tensor(zeros: shape, dtype: dtype)
                t.raw.copyMemory(from: src, byteCount: t.byteCount)
                return t
            })
        }
        return CPUExecutable(graph: graph, arena: arena, scratch: scratch, steps: steps, labels: stepLabels, feeds: feeds,
                             outputs: outputs, retained: retained, spilled: spilledRegions)
    }

    // MARK: ops

    func lower(_ node: Node, _ g: ValueID) throws {
        let shape = node.shape
        let bytes = node.byteCount
        func set(_ p: Int) { programOf[g.index] = p }

        switch node.op {
        case .input(let name):
            let dtype = node.dtype
            let feeds = self.feeds
            set(add(Value(shape: shape, dtype: dtype, layout: .plain, storage: .own(bytes: bytes), inputs: [])) { dst, _ in
                return {
                    guard let feed = feeds.tensors[name] else { throw BackendError("missing input '\(name)'") }
                    let t = feed.dtype == dtype ? feed : feed.converted(to: dtype)
                    withExtendedLifetime(t) { dst.copyMemory(from: t.raw, byteCount: bytes) }
                }
            })

        case .parameter:
            break  // materialized on first use, in the form its consumer needs

        case .constant(let c):
            let t = c.tensor.dtype.isFloatingPoint ? c.tensor.converted(to: .float32) : c.tensor
            retained.append(PreparedBuffer(t))
            set(add(Value(shape: shape, dtype: t.dtype, layout: .plain, storage: .external, inputs: [], external: t.raw)) { _, _ in nil })

        case .conv2d(let a):
            try lowerConv(node, g, a)

        case .linear(let a):
            try lowerLinear(node, g, a)

        case .matmul(let tb):
            try lowerMatmul(node, g, transposeB: tb)

        case .binary(let op):
            try lowerBinary(node, g, op)

        case .unary(let op):
            try lowerElementwise(node, g) { Elementwise.unary(op, $0, $1, count: $2) }

        case .affine(let scale, let shift):
            try lowerElementwise(node, g) { Elementwise.affine($0, $1, count: $2, scale: scale, shift: shift) }

        case .clamp(let lo, let hi):
            try lowerElementwise(node, g) { Elementwise.clamp($0, $1, count: $2, lo: lo, hi: hi) }

        case .groupNorm(let groups, let eps, let act):
            let x = try operand(node.inputs[0])
            let layout = values[x].layout
            let w = try operand(node.inputs[1]), b = try operand(node.inputs[2])
            let (n, c) = (shape[0], shape[1])
            let spatial = shape.dropFirst(2).reduce(1, *)
            set(add(Value(shape: shape, dtype: .float32, layout: layout, storage: .inPlace(input: 0, bytes: bytes),
                          inputs: [x, w, b])) { out, ptr in
                let src = ptr(x).assumingMemoryBound(to: Float.self)
                let dst = out.assumingMemoryBound(to: Float.self)
                let wp = ptr(w).assumingMemoryBound(to: Float.self), bp = ptr(b).assumingMemoryBound(to: Float.self)
                return {
                    Normalization.groupNorm(src, dst, n: n, c: c, spatial: spatial, groups: groups, eps: eps, weight: wp,
                                            bias: bp, activation: act, blocked: layout == .blocked8)
                }
            })

        case .layerNorm(let eps):
            let x = try operand(node.inputs[0], .plain)
            let w = try operand(node.inputs[1]), b = try operand(node.inputs[2])
            let d = shape.last!, rows = node.count / d
            set(add(Value(shape: shape, dtype: .float32, layout: .plain, storage: .inPlace(input: 0, bytes: bytes),
                          inputs: [x, w, b])) { out, ptr in
                let src = ptr(x).assumingMemoryBound(to: Float.self)
                let dst = out.assumingMemoryBound(to: Float.self)
                let wp = ptr(w).assumingMemoryBound(to: Float.self), bp = ptr(b).assumingMemoryBound(to: Float.self)
                return { Normalization.layerNorm(src, dst, rows: rows, d: d, eps: eps, weight: wp, bias: bp) }
            })

        case .softmax:
            let x = try operand(node.inputs[0], .plain)
            let d = shape.last!, rows = node.count / d
            set(add(Value(shape: shape, dtype: .float32, layout: .plain, storage: .inPlace(input: 0, bytes: bytes),
                          inputs: [x])) { out, ptr in
                let src = ptr(x).assumingMemoryBound(to: Float.self)
                let dst = out.assumingMemoryBound(to: Float.self)
                return { Normalization.softmax(src, dst, rows: rows, d: d) }
            })

        case .attention(let a):
            try lowerAttention(node, g, a)

        case .geglu:
            let x = try operand(node.inputs[0], .plain)
            let d = shape.last!, rows = node.count / d
            set(add(Value(shape: shape, dtype: .float32, layout: .plain, storage: .own(bytes: bytes), inputs: [x])) {
                out, ptr in
                let src = ptr(x).assumingMemoryBound(to: Float.self)
                let dst = out.assumingMemoryBound(to: Float.self)
                return { Elementwise.geglu(src, dst, rows: rows, d: d) }
            })

        case .upsampleNearest2x:
            let x = try operand(node.inputs[0])
            let layout = values[x].layout
            let s = graph[node.inputs[0]].shape
            let planes = layout == .blocked8 ? s[0] * s[1] / 8 : s[0] * s[1]
            set(add(Value(shape: shape, dtype: .float32, layout: layout, storage: .own(bytes: bytes), inputs: [x])) {
                out, ptr in
                let src = ptr(x).assumingMemoryBound(to: Float.self)
                let dst = out.assumingMemoryBound(to: Float.self)
                return { DataMovement.upsample2x(src, dst, planes: planes, h: s[2], w: s[3], lanes: layout == .blocked8 ? 8 : 1) }
            })

        case .resizeBilinear(let alignCorners):
            let s = graph[node.inputs[0]].shape
            let ty = BilinearTaps(input: s[2], output: shape[2], alignCorners: alignCorners)
            let tx = BilinearTaps(input: s[3], output: shape[3], alignCorners: alignCorners)
            try lowerPlainIntoOwn(node, g) { src, dst in
                DataMovement.resizeBilinear(src, dst, planes: s[0] * s[1], inH: s[2], inW: s[3], rows: ty, columns: tx)
            }

        case .maxPool2d(let kernel, let stride):
            let s = graph[node.inputs[0]].shape
            try lowerPlainIntoOwn(node, g) { src, dst in
                DataMovement.maxPool2d(src, dst, planes: s[0] * s[1], h: s[2], w: s[3], kernel: kernel, stride: stride)
            }

        case .concat(let axis):
            // Channel concatenation of blocked tensors is a concatenation of per-image slabs.
            let ps = try node.inputs.map { try operand($0) }
            let allBlocked = axis == 1 && shape.count == 4 && ps.allSatisfy { values[$0].layout == .blocked8 }
            let layout: Layout = allBlocked ? .blocked8 : .plain
            let inputs = try node.inputs.map { try operand($0, layout) }
            let outer = shape[..<axis].reduce(1, *)
            let inners = node.inputs.map { graph[$0].shape[axis...].reduce(1, *) }
            set(add(Value(shape: shape, dtype: node.dtype, layout: layout, storage: .own(bytes: bytes), inputs: inputs)) {
                out, ptr in
                let parts = zip(inputs, inners).map { (UnsafePointer(ptr($0).assumingMemoryBound(to: Float.self)), $1) }
                let dst = out.assumingMemoryBound(to: Float.self)
                return { DataMovement.concat(parts, dst, outer: outer) }
            })

        case .reshape:
            let x = try operand(node.inputs[0], .plain)
            set(add(Value(shape: shape, dtype: node.dtype, layout: .plain, storage: .view(input: 0, byteOffset: 0),
                          inputs: [x], external: values[x].external)) { _, _ in nil })

        case .permute(let perm):
            let x = try operand(node.inputs[0], .plain)
            let s = graph[node.inputs[0]].shape
            set(add(Value(shape: shape, dtype: .float32, layout: .plain, storage: .own(bytes: bytes), inputs: [x])) {
                out, ptr in
                let src = ptr(x).assumingMemoryBound(to: Float.self)
                let dst = out.assumingMemoryBound(to: Float.self)
                return { DataMovement.permute(src, s, perm, dst) }
            })

        case .slice(let axis, let start, let length):
            let x = try operand(node.inputs[0], .plain)
            let s = graph[node.inputs[0]].shape
            let outer = s[..<axis].reduce(1, *), inner = s[(axis + 1)...].reduce(1, *)
            if outer == 1 {
                let off = start * inner * node.dtype.size
                set(add(Value(shape: shape, dtype: node.dtype, layout: .plain, storage: .view(input: 0, byteOffset: off),
                              inputs: [x], external: values[x].external.map { $0 + off })) { _, _ in nil })
            } else {
                set(add(Value(shape: shape, dtype: .float32, layout: .plain, storage: .own(bytes: bytes), inputs: [x])) {
                    out, ptr in
                    let src = ptr(x).assumingMemoryBound(to: Float.self)
                    let dst = out.assumingMemoryBound(to: Float.self)
                    return { DataMovement.slice(src, dst, outer: outer, axisSize: s[axis], start: start, length: length, inner: inner) }
                })
            }

        case .embedding:
            let ids = try operand(node.inputs[0], .plain)
            let table = try operand(node.inputs[1])
            let ts = graph[node.inputs[1]].shape
            let idType = values[ids].dtype
            let count = graph[node.inputs[0]].count
            set(add(Value(shape: shape, dtype: .float32, layout: .plain, storage: .own(bytes: bytes), inputs: [ids, table])) {
                out, ptr in
                let idp = ptr(ids), tp = ptr(table).assumingMemoryBound(to: Float.self)
                let dst = out.assumingMemoryBound(to: Float.self)
                return { try DataMovement.embedding(ids: idp, idType: idType, count: count, table: tp, rows: ts[0], d: ts[1], dst) }
            })

        case .timestepEmbedding(let a):
            let t = try operand(node.inputs[0], .plain)
            let count = graph[node.inputs[0]].count
            set(add(Value(shape: shape, dtype: .float32, layout: .plain, storage: .own(bytes: bytes), inputs: [t])) {
                out, ptr in
                let src = ptr(t).assumingMemoryBound(to: Float.self)
                let dst = out.assumingMemoryBound(to: Float.self)
                return { DataMovement.timestepEmbedding(src, count: count, a, dst) }
            })

        case .reduce(let op, let axes):
            let s = graph[node.inputs[0]].shape
            try lowerPlainIntoOwn(node, g) { src, dst in DataMovement.reduce(op, src, s, axes: axes, dst) }

        case .cast(let to):
            let x = try operand(node.inputs[0], .plain)
            let from = values[x].dtype
            let count = node.count
            set(add(Value(shape: shape, dtype: to, layout: .plain, storage: .own(bytes: bytes), inputs: [x])) { out, ptr in
                let src = ptr(x)
                return {
                    let t = Tensor(dtype: from, shape: [count], storage: TensorStorage(borrowing: src, byteCount: count * from.size,
                                                                                      owner: ArenaOwner.shared))
                    let converted = t.converted(to: to)
                    withExtendedLifetime(converted) { out.copyMemory(from: converted.raw, byteCount: count * to.size) }
                }
            })
        }
    }

    /// A one-input elementwise op: any layout (the element order does not matter), in place
    /// when the input dies here.
    func lowerElementwise(_ node: Node, _ g: ValueID,
                          _ kernel: @escaping (UnsafePointer<Float>, UnsafeMutablePointer<Float>, Int) -> Void) throws {
        let x = try operand(node.inputs[0])
        let count = node.count
        programOf[g.index] = add(Value(shape: node.shape, dtype: .float32, layout: values[x].layout,
                                       storage: .inPlace(input: 0, bytes: node.byteCount), inputs: [x])) { out, ptr in
            let src = UnsafePointer(ptr(x).assumingMemoryBound(to: Float.self)), dst = out.assumingMemoryBound(to: Float.self)
            return { kernel(src, dst, count) }
        }
    }

    /// A one-input op reading plain float32 into a buffer of its own (a resize, a pooling, a
    /// reduction: the output is not the input's shape).
    func lowerPlainIntoOwn(_ node: Node, _ g: ValueID,
                           _ kernel: @escaping (UnsafePointer<Float>, UnsafeMutablePointer<Float>) -> Void) throws {
        let x = try operand(node.inputs[0], .plain)
        programOf[g.index] = add(Value(shape: node.shape, dtype: .float32, layout: .plain, storage: .own(bytes: node.byteCount),
                                       inputs: [x])) { out, ptr in
            let src = UnsafePointer(ptr(x).assumingMemoryBound(to: Float.self)), dst = out.assumingMemoryBound(to: Float.self)
            return { kernel(src, dst) }
        }
    }

    /// The current run's feeds, shared with the executable.
    let feeds = FeedBox()
}

/// Stands in as the owner of arena views: the executable keeps the arena alive.
final class ArenaOwner {
    static let shared = ArenaOwner()
}

/// Graph inputs of the current run, read by the input steps.
final class FeedBox {
    var tensors: [String: Tensor] = [:]
}

extension Graph {
    /// Runs `body`, prefixing any error with the node's scope and op.
    func withNodeContext<R>(_ i: Int, _ body: () throws -> R) throws -> R {
        do { return try body() } catch let e as BackendError {
            let n = nodes[i]
            throw BackendError("\(n.scope.isEmpty ? "" : n.scope + ": ")\(n.op.name): \(e.message)")
        }
    }
}
