import DiffuseCore
import DiffuseGraph

/// What a compiled graph does on each run, prepared once with fixed device pointers.
enum Step {
    case launch(Launch)
    case gemm(GemmPlan)
    case copy(dst: CUdeviceptr, src: CUdeviceptr, bytes: Int)
    case cudnn(CudnnConvolution, x: CUdeviceptr, w: CUdeviceptr, y: CUdeviceptr, workspace: CUdeviceptr)
    /// A weight streamed in from page-locked host memory (sequential offload).
    case upload(dst: CUdeviceptr, src: PinnedBuffer, bytes: Int)
}

/// A graph compiled for the GPU: lowered to device dtypes, planned into one arena, weights
/// bound, every kernel launch and cuBLASLt call prepared. `run` only queues work on the stream.
final class CUDAExecutable: Executable {
    let graph: Graph
    let lowered: Graph
    let ctx: CUDAContext
    let options: CompileOptions
    /// The activation storage type.
    let T: DType
    let arenaBytes: Int
    private var arena: DeviceBuffer?
    private var scratch: DeviceBuffer?
    private var keepAlive: [AnyObject] = []
    private var pointers: [CUdeviceptr]
    private var inputs: [(name: String, index: Int)] = []
    private var steps: [(step: Step, node: Int)] = []
    /// Per step, with `DIFFUSE_PROFILE=1`: the op's profile label and what runs it.
    private var stepLabels: [String] = []
    /// Timing events around the steps (created on the first profiled run).
    private var profileEvents: [CUhandle] = []
    private let computeType: Int32
    /// Convolutions cuDNN takes (chosen while sizing the scratch buffer).
    private var cudnnConvolutions: [Int: CudnnConvolution] = [:]
    /// With the "cuda-graphs" flag: the steps captured once as a CUDA graph and replayed with
    /// one launch (inputs are copied into their fixed buffers before it). Capture happens on
    /// the first run; if any call refuses to be captured the executable runs its steps as usual.
    private var captureGraphs: Bool
    private var graphExec: CUhandle = nil
    /// Seconds the first run spent capturing and instantiating the graph.
    private(set) var captureSeconds: Double?
    /// With the "sequential-offload" flag (diffusers' `enable_sequential_cpu_offload`): weights
    /// stay in page-locked host memory and each is uploaded into the arena just before the op
    /// that reads it, so the device holds the activations and a few layers' weights at a time.
    let offloadWeights: Bool
    /// With the "autotune" flag: GEMM and convolution algorithms chosen by timing the candidates
    /// on this GPU at build time (as torch.compile's max-autotune and cudnn.benchmark), not by
    /// the libraries' heuristics alone.
    let autotune: Bool
    private let weights: ModelWeights?
    /// Weights (and their widening casts) read only by quantized linears: left off the device.
    private var quantizedOnly: Set<Int> = []

    init(_ ctx: CUDAContext, graph: Graph, weights: ModelWeights?, options: CompileOptions) throws {
        self.ctx = ctx
        self.graph = graph
        self.options = options
        T = options.precision.activationType
        let W = options.weightStorage ?? T
        guard W == .float32 || W == .float16 || W == .bfloat16 else {
            throw CUDAError.unsupported("weight storage \(W) (use float32, float16 or bfloat16)")
        }
        computeType = options.precision == .tf32 ? CuBLASLt.compute32FFastTF32 : CuBLASLt.compute32F
        // A profiled run times each step with events, so it is not captured.
        captureGraphs = options.flags.contains("cuda-graphs") && !ctx.syncEachStep && !Profile.enabled
        offloadWeights = options.flags.contains("sequential-offload")
        autotune = options.flags.contains("autotune")
        self.weights = weights
        if !graph.parameters.isEmpty {
            guard let weights else { throw CUDAError.invalidInput("the graph has parameters but no weights were given") }
            try weights.validate(graph)
        }
        // Fold activations, residual adds and scales into conv/linear epilogues and activations
        // into GroupNorm: fewer launches and fewer round trips through memory.
        var fused = graph
        if !options.flags.contains("no-fusion") {
            let all = Set(UnaryOp.allCases)
            fused = GraphPasses.fuseEpilogues(GraphPasses.fuseNormActivation(graph, activations: all), activations: all, maxAdds: 4)
        }
        // Convolutions, GroupNorms and upsamplings on [N,H,W,C] (PyTorch's channels_last).
        if options.flags.contains("channels-last") { fused = GraphPasses.channelsLast(fused) }
        let device = lowerForDevice(fused, activation: T, weightStorage: W)
        let g = offloadWeights ? GraphPasses.parametersAtFirstUse(device) : device
        lowered = g
        pointers = [CUdeviceptr](repeating: 0, count: g.nodes.count)

        // Float weights that only quantized linears read are not needed on the device (the
        // quantized copy is): neither uploaded nor widened, unless a layer falls back to float.
        let unused = CUDAExecutable.readOnlyAsQuantizedWeights(g)
        quantizedOnly = unused

        // Plan the arena (streamed weights are planned in it like activations).
        let offload = offloadWeights
        let plan = MemoryPlanner.plan(g) { i in
            unused.contains(i) ? .external : CUDAExecutable.storage(g, i, streamParameters: offload)
        }
        arenaBytes = plan.arenaBytes
        if plan.arenaBytes > 0 { arena = try ctx.allocator.allocate(plan.arenaBytes) }
        let base = arena?.pointer ?? 0

        // External values: inputs (one fixed buffer each), parameters (shared per ModelWeights), constants.
        for (i, n) in g.nodes.enumerated() {
            if quantizedOnly.contains(i) { continue }
            if let off = plan.offsets[i] { pointers[i] = base + UInt64(off); continue }
            switch n.op {
            case .input(let name):
                let b = try ctx.allocator.allocate(max(n.byteCount, 1))
                keepAlive.append(b)
                pointers[i] = b.pointer
                inputs.append((name, i))
            case .parameter(let src):
                let b = try CUDAExecutable.deviceWeight(ctx, weights!, src, n.dtype)
                keepAlive.append(b)
                pointers[i] = b.pointer
            case .constant(let c):
                let t = c.tensor.converted(to: n.dtype)
                let b = try ctx.allocator.allocate(max(t.byteCount, 1))
                try ctx.staging.upload(t.raw, bytes: t.byteCount, to: b.pointer)
                keepAlive.append(b)
                pointers[i] = b.pointer
            default:
                // A view of an external value (reshape of an input, no-op slice of a weight).
                if case .view(let input, let off) = CUDAExecutable.storage(g, i, streamParameters: offload) {
                    pointers[i] = pointers[n.inputs[input].index] + UInt64(off)
                } else {
                    throw CUDAError.unsupported("internal: value %\(i) (\(n.op.name)) has no storage")
                }
            }
        }

        let scratchBytes = try g.nodes.indices.map { try scratchNeed($0) }.max() ?? 0
        if scratchBytes > 0 { scratch = try ctx.allocator.allocate(scratchBytes) }
        for i in g.nodes.indices { try build(i) }
        try ctx.synchronize()  // weights and constants are on the device before the first run
    }

    // MARK: storage

    static func storage(_ g: Graph, _ i: Int, streamParameters: Bool = false) -> Storage {
        let n = g.nodes[i]
        switch n.op {
        case .parameter where streamParameters:
            return .own(bytes: n.byteCount)
        case .input, .parameter, .constant:
            return .external
        case .reshape:
            return .view(input: 0, byteOffset: 0)
        case .cast(let d) where d == g[n.inputs[0]].dtype:
            return .view(input: 0, byteOffset: 0)
        case .slice(let axis, let start, _):
            let src = g[n.inputs[0]].shape
            if src[..<axis].allSatisfy({ $0 == 1 }) {
                return .view(input: 0, byteOffset: start * src[(axis + 1)...].reduce(1, *) * n.dtype.size)
            }
            return .own(bytes: n.byteCount)
        case .unary, .affine, .clamp:
            return .inPlace(input: 0, bytes: n.byteCount)
        default:
            return .own(bytes: n.byteCount)
        }
    }

    /// A parameter in page-locked host memory in `dtype`, converted once per ModelWeights and
    /// shared by every graph compiled against them (sequential offload streams it from there).
    static func hostWeight(_ ctx: CUDAContext, _ w: ModelWeights, _ src: ParameterSource, _ dtype: DType) throws -> PinnedBuffer {
        try w.prepared("cuda-host:\(ObjectIdentifier(ctx).hashValue):\(dtype):\(src)") {
            let t = try w.tensor(src, as: dtype)
            let b = try PinnedBuffer(driver: ctx.driver, bytes: t.byteCount)
            b.pointer.copyMemory(from: t.raw, byteCount: t.byteCount)
            return b
        }
    }

    /// A parameter on the device in `dtype`, uploaded once per ModelWeights and shared by every
    /// graph compiled against them.
    static func deviceWeight(_ ctx: CUDAContext, _ w: ModelWeights, _ src: ParameterSource, _ dtype: DType) throws -> DeviceBuffer {
        try w.prepared("cuda:\(ObjectIdentifier(ctx).hashValue):\(dtype):\(src)") {
            let t = try w.tensor(src, as: dtype)
            let b = try ctx.allocator.allocate(max(t.byteCount, 1))
            try ctx.staging.upload(t.raw, bytes: t.byteCount, to: b.pointer)
            return b
        }
    }

    // MARK: run

    func run(_ feeds: [String: DeviceTensor]) throws -> [String: DeviceTensor] {
        try ctx.makeCurrent()
        try graph.checkFeeds(feeds) { $0.shape }
        for (name, i) in inputs {
            guard let f = feeds[name] as? CUDADeviceTensor else {
                throw CUDAError.invalidInput("input '\(name)' is not a CUDA tensor (upload it with the CUDA backend)")
            }
            let n = lowered.nodes[i]
            if f.dtype == n.dtype {
                try ctx.copyAsync(dst: pointers[i], src: f.pointer, bytes: n.byteCount)
            } else {
                try castLaunch(from: f.pointer, f.dtype, to: pointers[i], n.dtype, count: n.count, label: "input \(name)")
                    .map { try ctx.launch($0) }
            }
        }
        if captureGraphs && graphExec == nil { captureGraph() }
        if let exec = graphExec, let launch = ctx.driver.cuGraphLaunch {
            try ctx.driver.check(launch(exec, ctx.stream), "cuGraphLaunch")
        } else if Profile.enabled {
            try enqueueProfiledSteps()
        } else {
            try enqueueSteps()
        }
        var out: [String: DeviceTensor] = [:]
        for (name, v) in lowered.outputs {
            let n = lowered[v]
            out[name] = CUDADeviceTensor(shape: n.shape, dtype: n.dtype, pointer: pointers[v.index], owner: self, context: ctx)
        }
        return out
    }

    /// Queues every step on the stream.
    private func enqueueSteps() throws {
        for (step, node) in steps {
            try enqueue(step)
            if ctx.syncEachStep {
                do { try ctx.synchronize() } catch {
                    let n = lowered.nodes[node]
                    throw CUDAError.invalidInput("\(n.scope.isEmpty ? "" : n.scope + ": ")\(n.op.name) %\(node) failed: \(error)")
                }
            }
        }
    }

    private func enqueue(_ step: Step) throws {
        switch step {
        case .launch(let l): try ctx.launch(l)
        case .gemm(let p): try p.run()
        case .copy(let dst, let src, let bytes): try ctx.copyAsync(dst: dst, src: src, bytes: bytes)
        case .cudnn(let c, let x, let w, let y, let ws): try c.run(x: x, w: w, y: y, workspace: ws)
        case .upload(let dst, let src, let bytes): try ctx.uploadAsync(dst: dst, src: src, bytes: bytes)
        }
    }

    /// Queues the steps with a timing event after each, waits, and adds each step's time to the
    /// profile under its label (launch gaps included: they are part of what a step costs).
    private func enqueueProfiledSteps() throws {
        let d = ctx.driver
        guard let elapsed = d.cuEventElapsedTime else { return try enqueueSteps() }
        while profileEvents.count < steps.count + 1 {
            var e: CUhandle = nil
            try d.check(d.cuEventCreate(&e, 0), "cuEventCreate")
            profileEvents.append(e)
        }
        try d.check(d.cuEventRecord(profileEvents[0], ctx.stream), "cuEventRecord")
        for (k, (step, _)) in steps.enumerated() {
            try enqueue(step)
            try d.check(d.cuEventRecord(profileEvents[k + 1], ctx.stream), "cuEventRecord")
        }
        try d.check(d.cuEventSynchronize(profileEvents[steps.count]), "cuEventSynchronize")
        for k in steps.indices {
            var ms: Float = 0
            try d.check(elapsed(&ms, profileEvents[k], profileEvents[k + 1]), "cuEventElapsedTime")
            Profile.add(stepLabels[k], Double(ms) / 1000)
        }
    }

    /// Captures the steps into a CUDA graph (stream capture, thread-local mode) and instantiates it.
    private func captureGraph() {
        let d = ctx.driver
        guard let begin = d.cuStreamBeginCapture, let end = d.cuStreamEndCapture, let instantiate = d.cuGraphInstantiateWithFlags,
              d.cuGraphLaunch != nil else {
            captureGraphs = false
            return
        }
        let t0 = now()
        var graph: CUhandle = nil
        do {
            try d.check(begin(ctx.stream, 1), "cuStreamBeginCapture")  // CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
            do { try enqueueSteps() } catch {
                _ = end(ctx.stream, &graph)
                throw error
            }
            try d.check(end(ctx.stream, &graph), "cuStreamEndCapture")
            var exec: CUhandle = nil
            try d.check(instantiate(&exec, graph, 0), "cuGraphInstantiateWithFlags")
            graphExec = exec
            captureSeconds = now() - t0
        } catch {
            Log.warning("CUDA graph capture failed (\(error)); running the steps one by one")
            captureGraphs = false
        }
        if graph != nil { _ = d.cuGraphDestroy?(graph) }
    }

    deinit {
        if graphExec != nil { _ = ctx.driver.cuGraphExecDestroy?(graphExec) }
        for e in profileEvents { _ = ctx.driver.cuEventDestroy?(e) }
    }

    // MARK: building steps

    private func add(_ s: Step, _ node: Int) {
        steps.append((s, node))
        if Profile.enabled { stepLabels.append(lowered.profileLabel(node) + " [\(CUDAExecutable.implementation(s))]") }
    }

    /// What runs a step, for profile labels: the kernel's name, cuBLASLt, cuDNN or a copy.
    static func implementation(_ s: Step) -> String {
        switch s {
        case .launch(let l): return l.label.components(separatedBy: " for ").first ?? l.label
        case .gemm: return "cublasLt"
        case .cudnn: return "cudnn"
        case .copy: return "copy"
        case .upload: return "upload"
        }
    }

    private func launch(_ family: KernelFamily, _ name: String, grid: (UInt32, UInt32, UInt32), block: UInt32 = 256,
                        shared: Int = 0, _ args: [KernelArg], node: Int) throws {
        let f = try ctx.function(family, T, name, sharedBytes: shared)
        add(.launch(Launch(function: f, grid: grid, block: block, sharedBytes: UInt32(shared), args: KernelArgs(args),
                           label: "\(name) for \(lowered.nodes[node].scope) %\(node)")), node)
    }

    private func elementwise(_ name: String, count: Int, _ args: [KernelArg], node: Int,
                             family: KernelFamily = .elementwise) throws {
        try launch(family, name, grid: (ctx.elementwiseGrid(count), 1, 1), args, node: node)
    }

    /// A cast kernel from one dtype to another (nil when nothing needs converting).
    func castLaunch(from src: CUdeviceptr, _ s: DType, to dst: CUdeviceptr, _ d: DType, count: Int, label: String) throws -> Launch? {
        if count == 0 { return nil }
        let f = try ctx.function(.copy, .float32, KernelNames.cast(s, d))
        return Launch(function: f, grid: (ctx.elementwiseGrid(count), 1, 1), block: 256, sharedBytes: 0,
                      args: KernelArgs([.ptr(src), .ptr(dst), .i64(Int64(count))]), label: "cast \(s)->\(d) for \(label)")
    }

    private func ptr(_ node: Node, _ k: Int) -> CUdeviceptr { pointers[node.inputs[k].index] }
    private func shape(_ node: Node, _ k: Int) -> [Int] { lowered[node.inputs[k]].shape }

    /// Scratch bytes node i needs during its own launches.
    private func scratchNeed(_ i: Int) throws -> Int {
        let n = lowered.nodes[i]
        switch n.op {
        case .groupNorm(let groups, _, _) where n.channelsLast:
            let g = groupNormNHWCGrid(n, groups)
            return n.shape[0] * groups * (g.chunks + 1) * 2 * 4
        case .groupNorm(let groups, _, _):
            let (ng, chunks) = groupNormGrid(n, groups)
            return ng * chunks * 2 * 4
        case .conv2d(let a):
            // cuDNN wants 16-byte aligned tensors (a channel slice of a view may not be).
            let aligned = [ptr(n, 0), ptr(n, 1), pointers[i]].allSatisfy { $0 % 16 == 0 }
            if aligned, !options.flags.contains("no-cudnn"), let dnn = ctx.cudnn,
               let c = try? CudnnConvolution(dnn, input: shape(n, 0), weight: shape(n, 1), output: n.shape, attributes: a,
                                             dtype: T, precision: options.precision, channelsLast: n.channelsLast,
                                             tune: autotune ? (ctx, ptr(n, 0), ptr(n, 1), pointers[i]) : nil) {
                cudnnConvolutions[i] = c
                return c.workspaceBytes
            }
            return convPlan(n, a).scratchBytes
        case .linear(let a) where a.quantization != .none:
            let w = shape(n, 1)
            return QuantizedLinear.Layout(m: n.count / max(w[0], 1), n: w[0], k: w[1], flags: options.flags).scratchBytes
        case .attention(let a):
            let geo = attentionGeometry(n, a)
            if useFused(geo) { return 0 }
            let rows = sliceRows(geo)
            return a.heads * rows * geo.sk * (4 + T.size) + 256
        default:
            return 0
        }
    }

    private func build(_ i: Int) throws {
        let n = lowered.nodes[i]
        let y = pointers[i]
        let count = n.count
        if quantizedOnly.contains(i) { return }
        switch n.op {
        case .parameter(let src) where offloadWeights:
            let host = try CUDAExecutable.hostWeight(ctx, weights!, src, n.dtype)
            keepAlive.append(host)
            add(.upload(dst: y, src: host, bytes: n.byteCount), i)
        case .input, .parameter, .constant, .reshape:
            return
        case .cast(let d):
            let s = lowered[n.inputs[0]].dtype
            if s == d { return }
            if let l = try castLaunch(from: ptr(n, 0), s, to: y, d, count: count, label: "\(n.scope) %\(i)") { add(.launch(l), i) }

        case .unary(let u):
            try elementwise("unary_kernel", count: count, [.ptr(ptr(n, 0)), .ptr(y), .i64(Int64(count)), .i32(Int32(UnaryOp.allCases.firstIndex(of: u)!))], node: i)
        case .affine(let s, let t):
            try elementwise("affine_kernel", count: count, [.ptr(ptr(n, 0)), .ptr(y), .i64(Int64(count)), .f32(s), .f32(t)], node: i)
        case .clamp(let lo, let hi):
            try elementwise("clamp_kernel", count: count, [.ptr(ptr(n, 0)), .ptr(y), .i64(Int64(count)), .f32(lo), .f32(hi)], node: i)
        case .binary(let op):
            let code = Int32(BinaryOp.allCases.firstIndex(of: op)!)
            let sa = shape(n, 0), sb = shape(n, 1)
            if sa == n.shape && sb == n.shape {
                if eightWide(count, [ptr(n, 0), ptr(n, 1), y]) {
                    try elementwise("binary_same_v8", count: count / 8, [.ptr(ptr(n, 0)), .ptr(ptr(n, 1)), .ptr(y), .i32(Int32(count / 8)), .i32(code)], node: i)
                } else {
                    try elementwise("binary_same", count: count, [.ptr(ptr(n, 0)), .ptr(ptr(n, 1)), .ptr(y), .i64(Int64(count)), .i32(code)], node: i)
                }
            } else {
                let strides = [broadcastStrides(sa, n.shape), broadcastStrides(sb, n.shape)]
                let s = try stridedStruct(n.shape, strides)
                if broadcastEightWide(n.shape, strides, [ptr(n, 0), ptr(n, 1)], y) {
                    try elementwise("binary_bcast_v8", count: count / 8, [.ptr(ptr(n, 0)), .ptr(ptr(n, 1)), .ptr(y), .i32(Int32(count / 8)), .i32(code), .bytes(s)], node: i)
                } else {
                    try elementwise("binary_bcast", count: count, [.ptr(ptr(n, 0)), .ptr(ptr(n, 1)), .ptr(y), .i64(Int64(count)), .i32(code), .bytes(s)], node: i)
                }
            }
        case .geglu:
            let d = n.shape.last!
            if d % 8 == 0, eightWide(2 * count, [ptr(n, 0), y]) {
                try elementwise("geglu_v8", count: count / 8, [.ptr(ptr(n, 0)), .ptr(y), .i32(Int32(count / 8)), .i32(Int32(d / 8))], node: i)
            } else {
                try elementwise("geglu_kernel", count: count, [.ptr(ptr(n, 0)), .ptr(y), .i64(Int64(count / max(d, 1))), .i64(Int64(d))], node: i)
            }

        case .linear(let a):
            try buildLinear(i, n, a)
        case .matmul(let tb):
            let sa = shape(n, 0), sb = shape(n, 1)
            let m = sa[sa.count - 2], k = sa[sa.count - 1], nn = n.shape[n.shape.count - 1]
            let batch = count / max(m * nn, 1)
            let plan = try GemmPlan(ctx, m: m, n: nn, k: k, batch: batch,
                                    a: GemmOperand(pointer: ptr(n, 0), ld: k, batchStride: m * k, dtype: T),
                                    b: GemmOperand(pointer: ptr(n, 1), ld: tb ? k : nn, batchStride: k * nn, dtype: T),
                                    transposeB: tb, d: GemmOperand(pointer: y, ld: nn, batchStride: m * nn, dtype: T),
                                    computeType: computeType, tune: autotune, label: "matmul \(n.scope) %\(i) \(sa)x\(sb)")
            _ = sb
            add(.gemm(plan), i)
        case .conv2d(let a):
            guard a.quantization == .none else {
                throw CUDAError.unsupported("quantized convolutions run on the CPU backend only; on CUDA quantize the linears (--quantize int8 or fp8)")
            }
            try buildConv(i, n, a)

        case .groupNorm(let groups, let eps, let act) where n.channelsLast:
            try buildGroupNormNHWC(i, n, groups: groups, eps: eps, activation: act)
        case .groupNorm(let groups, let eps, let act):
            let (ng, chunks) = groupNormGrid(n, groups)
            let spatial = n.shape[2...].reduce(1, *)
            let cg = n.shape[1] / groups
            let groupLen = cg * spatial
            let partial = scratch!.pointer
            // Eight elements of one channel at a time where a channel's pixels come in eights.
            let vec: Int32 = spatial % 8 == 0 && eightWide(count, [ptr(n, 0), y]) ? 1 : 0
            try launch(.norm, "groupnorm_stats", grid: (UInt32(chunks), UInt32(ng), 1),
                       [.ptr(ptr(n, 0)), .ptr(partial), .i64(Int64(groupLen)), .i64(Int64(CUDAExecutable.groupNormChunk)), .i32(vec)], node: i)
            let actCode = act.map { Int32(UnaryOp.allCases.firstIndex(of: $0)!) } ?? -1
            try launch(.norm, "groupnorm_apply", grid: (UInt32(chunks), UInt32(ng), 1),
                       [.ptr(ptr(n, 0)), .ptr(y), .ptr(partial), .ptr(ptr(n, 1)), .ptr(ptr(n, 2)), .i64(Int64(groupLen)),
                        .i64(Int64(CUDAExecutable.groupNormChunk)), .i64(Int64(spatial)), .i64(Int64(cg)), .i64(Int64(groups)),
                        .f32(eps), .i32(actCode), .i32(vec)], node: i)
        case .layerNorm(let eps):
            let d = n.shape.last!
            let rows = count / max(d, 1)
            let vec: Int32 = d % 8 == 0 && eightWide(count, [ptr(n, 0), y, ptr(n, 1), ptr(n, 2)]) ? 1 : 0
            try launch(.norm, "layernorm_kernel", grid: (UInt32((rows + 3) / 4), 1, 1), block: 128,
                       [.ptr(ptr(n, 0)), .ptr(y), .ptr(ptr(n, 1)), .ptr(ptr(n, 2)), .i64(Int64(rows)), .i64(Int64(d)), .f32(eps), .i32(vec)], node: i)
        case .softmax:
            let d = n.shape.last!
            let rows = count / max(d, 1)
            try launch(.norm, "softmax_kernel", grid: (UInt32((rows + 3) / 4), 1, 1), block: 128,
                       [.ptr(ptr(n, 0)), .ptr(y), .i64(Int64(rows)), .i64(Int64(d)), .f32(1), .i32(0), .i64(1), .i64(0)], node: i)
        case .reduce(let op, let axes):
            try buildReduce(i, n, op, axes)

        case .attention(let a):
            try buildAttention(i, n, a)

        case .upsampleNearest2x where n.channelsLast:
            // [N,H,W,C] -> [N,2H,2W,C]: axes (n, h, dy, w, dx, c), dy and dx read the same pixel.
            let s = n.shape
            let (h, w, c) = (s[1] / 2, s[2] / 2, s[3])
            let st = try stridedStruct([s[0], h, 2, w, 2, c], [[h * w * c, w * c, 0, c, 0, 1],
                                                               [4 * h * w * c, 4 * w * c, 2 * w * c, 2 * c, c, 1]])
            try stridedCopy(n.dtype, from: ptr(n, 0), to: y, count: count, st, node: i)
        case .upsampleNearest2x:
            let s = n.shape
            let (h, w) = (s[2] / 2, s[3] / 2)
            let st = try stridedStruct([s[0] * s[1], h, 2, w, 2], [[h * w, w, 0, 1, 0], [4 * h * w, 4 * w, 2 * w, 2, 1]])
            try stridedCopy(n.dtype, from: ptr(n, 0), to: y, count: count, st, node: i)
        case .permute(let perm):
            let src = shape(n, 0)
            let inStrides = strides(src)
            let st = try stridedStruct(n.shape, [perm.map { inStrides[$0] }, strides(n.shape)])
            try stridedCopy(n.dtype, from: ptr(n, 0), to: y, count: count, st, node: i)
        case .slice(let axis, let start, _):
            if case .view = CUDAExecutable.storage(lowered, i) { return }
            let src = shape(n, 0)
            let st = try stridedStruct(n.shape, [strides(src), strides(n.shape)])
            let off = UInt64(start * strides(src)[axis] * n.dtype.size)
            try stridedCopy(n.dtype, from: ptr(n, 0) + off, to: y, count: count, st, node: i)
        case .concat(let axis):
            let outer = n.shape[..<axis].reduce(1, *)
            let innerOut = n.shape[axis...].reduce(1, *)
            var offset = 0
            for k in n.inputs.indices {
                let inner = shape(n, k)[axis...].reduce(1, *)
                if inner > 0 && outer > 0 {
                    let st = try stridedStruct([outer, inner], [[inner, 1], [innerOut, 1]])
                    try stridedCopy(n.dtype, from: ptr(n, k), to: y + UInt64(offset * n.dtype.size), count: outer * inner, st, node: i)
                }
                offset += inner
            }
        case .resizeBilinear(let alignCorners):
            let s = shape(n, 0)
            try elementwise("resize_bilinear", count: count,
                            [.ptr(ptr(n, 0)), .ptr(y), .i64(Int64(s[0] * s[1])), .i64(Int64(s[2])), .i64(Int64(s[3])),
                             .i64(Int64(n.shape[2])), .i64(Int64(n.shape[3])), .i32(alignCorners ? 1 : 0)], node: i)
        case .maxPool2d(let kernel, let stride):
            let s = shape(n, 0)
            try elementwise("max_pool2d", count: count,
                            [.ptr(ptr(n, 0)), .ptr(y), .i64(Int64(s[0] * s[1])), .i64(Int64(s[2])), .i64(Int64(s[3])),
                             .i64(Int64(n.shape[2])), .i64(Int64(n.shape[3])), .i64(Int64(kernel[0])), .i64(Int64(kernel[1])),
                             .i64(Int64(stride[0])), .i64(Int64(stride[1]))], node: i)
        case .embedding:
            let ids = lowered[n.inputs[0]]
            let table = shape(n, 1)
            try elementwise(ids.dtype == .int32 ? "embedding_i32" : "embedding_i64", count: count,
                            [.ptr(ptr(n, 0)), .ptr(ptr(n, 1)), .ptr(y), .i64(Int64(ids.count)), .i64(Int64(table[1])), .i64(Int64(table[0]))], node: i)
        case .timestepEmbedding(let a):
            let b = lowered[n.inputs[0]].count
            let half = a.dim / 2
            let negLog = -Float(Libm.log(Double(a.maxPeriod)))
            try elementwise("timestep_embedding", count: count,
                            [.ptr(ptr(n, 0)), .ptr(y), .i64(Int64(b)), .i64(Int64(a.dim)), .i64(Int64(half)),
                             .i32(a.flipSinToCos ? 1 : 0), .f32(negLog), .f32(Float(half) - a.downscaleFreqShift), .f32(a.scale)], node: i)
        }
    }

    private func stridedCopy(_ d: DType, from x: CUdeviceptr, to y: CUdeviceptr, count: Int, _ s: [UInt8], node: Int) throws {
        if count == 0 { return }
        try elementwise("strided_copy_\(d.size)", count: count, [.ptr(x), .ptr(y), .i64(Int64(count)), .bytes(s)], node: node, family: .copy)
    }

    // MARK: linear and conv

    /// The epilogue ops left for the elementwise kernel, as its struct; nil when none.
    private func epilogueStruct(_ ops: ArraySlice<Epilogue>, extras: [CUdeviceptr]) throws -> [UInt8] {
        guard ops.count <= 8, extras.count <= 4 else { throw CUDAError.unsupported("more than 8 epilogue ops or 4 extra inputs") }
        var kinds: [Int] = [], args: [Int] = [], scales: [Double] = []
        var extraIndex = 0
        for e in ops {
            switch e {
            case .activation(let u): kinds.append(0); args.append(UnaryOp.allCases.firstIndex(of: u)!); scales.append(1)
            case .addInput: kinds.append(1); args.append(extraIndex); scales.append(1); extraIndex += 1
            case .scale(let s): kinds.append(2); args.append(0); scales.append(Double(s))
            }
        }
        var s = StructBytes()
        s.i64(ops.count)
        s.i64Array(kinds, count: 8)
        s.i64Array(args, count: 8)
        for k in 0..<8 { s.f64(k < scales.count ? scales[k] : 1) }
        for k in 0..<4 { s.u64(k < extras.count ? extras[k] : 0) }
        return s.bytes
    }

    /// Extra inputs of a conv/linear epilogue, in order.
    private func extraInputs(_ n: Node, hasBias: Bool) -> [CUdeviceptr] {
        let first = hasBias ? 3 : 2
        return (first..<n.inputs.count).map { ptr(n, $0) }
    }

    /// Quantized linears that run in float because cuBLASLt has no quantized algorithm for them
    /// (each also logged as a warning); the self-test checks it stays empty.
    private(set) var quantizationFallbacks: [String] = []
    /// Parameters, and casts of them, whose every reader is the weight slot of a quantized
    /// linear (directly or through such a cast).
    static func readOnlyAsQuantizedWeights(_ g: Graph) -> Set<Int> {
        var readers = [[(node: Int, slot: Int)]](repeating: [], count: g.nodes.count)
        for (j, n) in g.nodes.enumerated() { for (slot, v) in n.inputs.enumerated() { readers[v.index].append((j, slot)) } }
        let outputs = Set(g.outputs.map(\.value.index))
        var result: Set<Int> = []
        // Readers come after their inputs, so walking backwards settles casts before their sources.
        for i in g.nodes.indices.reversed() {
            switch g.nodes[i].op {
            case .parameter, .cast: break
            default: continue
            }
            if case .cast = g.nodes[i].op, QuantizedLinear.parameterSource(g, ValueID(i)) == nil { continue }
            guard !readers[i].isEmpty, !outputs.contains(i) else { continue }
            let onlyQuantized = readers[i].allSatisfy { r in
                if result.contains(r.node) { return true }
                if case .linear(let a) = g.nodes[r.node].op { return r.slot == 1 && a.quantization != .none }
                return false
            }
            if onlyQuantized { result.insert(i) }
        }
        return result
    }

    private func buildLinear(_ i: Int, _ n: Node, _ a: LinearAttributes) throws {
        let y = pointers[i]
        let w = shape(n, 1)
        let (nOut, k) = (w[0], w[1])
        let m = n.count / max(nOut, 1)
        var extras = extraInputs(n, hasBias: a.hasBias)
        var weight = ptr(n, 1)
        if a.quantization != .none {
            guard let weights, let src = QuantizedLinear.parameterSource(lowered, n.inputs[1]) else {
                throw CUDAError.unsupported("\(a.quantization) linear \(n.scope) %\(i): the weight must be a model parameter")
            }
            let layout = QuantizedLinear.Layout(m: m, n: nOut, k: k, flags: options.flags)
            let label = "\(a.quantization) linear \(n.scope) %\(i) [\(m)x\(k)]x[\(nOut)x\(k)]ᵀ"
            if let steps = try QuantizedLinear.steps(ctx, a.quantization, layout, T: T, x: ptr(n, 0),
                                                     weight: { try QuantizedWeight.prepared(ctx, weights, src, a.quantization, layout) },
                                                     bias: a.hasBias ? ptr(n, 2) : nil, y: y,
                                                     epilogue: try epilogueStruct(a.epilogue[...], extras: extras),
                                                     scratch: scratch?.pointer ?? 0, label: label) {
                for s in steps { add(s, i) }
                return
            }
            quantizationFallbacks.append(label)
            if quantizedOnly.contains(n.inputs[1].index) {
                // The float weight was left off the device: bring it now, in the activation type.
                let b = try CUDAExecutable.deviceWeight(ctx, weights, src, T)
                keepAlive.append(b)
                weight = b.pointer
            }
        }
        var ops = a.epilogue[...]
        // y = x Wᵀ (+ residual through C when the first epilogue op adds an input) (+ bias).
        let c = takeLeadingResidual(&ops, &extras).map { GemmOperand(pointer: $0, ld: nOut, batchStride: 0, dtype: T) }
        let plan = try GemmPlan(ctx, m: m, n: nOut, k: k, batch: 1,
                                a: GemmOperand(pointer: ptr(n, 0), ld: k, batchStride: 0, dtype: T),
                                b: GemmOperand(pointer: weight, ld: k, batchStride: 0, dtype: T), transposeB: true,
                                d: GemmOperand(pointer: y, ld: nOut, batchStride: 0, dtype: T), c: c, beta: 1,
                                bias: a.hasBias ? ptr(n, 2) : nil, computeType: computeType, tune: autotune,
                                label: "linear \(n.scope) %\(i) [\(m)x\(k)]x[\(nOut)x\(k)]ᵀ")
        add(.gemm(plan), i)
        if !ops.isEmpty {
            try epilogue(i, y: y, bias: nil, count: n.count, inner: 1, channels: nOut, ops: ops, extras: extras)
        }
    }

    /// How a convolution runs: im2col into scratch (skipped for 1x1 stride-1 unpadded kernels)
    /// and cuBLASLt GEMMs, whole batch at once when the columns fit the budget, else per image
    /// and chunk of output pixels.
    struct ConvPlan {
        var direct: Bool
        var imagesPerChunk: Int
        var pixelsPerChunk: Int
        var scratchBytes: Int
    }
    static let convScratchBudget = 256 << 20

    private func convPlan(_ n: Node, _ a: Conv2dAttributes) -> ConvPlan {
        // Logical NCHW / OIHW dimensions whatever the layout (the column sizes are the same).
        let (x, w, yShape) = n.channelsLast ? (nchwShape(shape(n, 0)), nchwShape(shape(n, 1)), nchwShape(n.shape))
            : (shape(n, 0), shape(n, 1), n.shape)
        let hw = yShape[2] * yShape[3]
        let direct = w[2] == 1 && w[3] == 1 && a.stride == (1, 1) && a.padding == (0, 0, 0, 0)
        if direct { return ConvPlan(direct: true, imagesPerChunk: x[0], pixelsPerChunk: hw, scratchBytes: 0) }
        let kAll = x[1] * w[2] * w[3]
        let perImage = kAll * hw * T.size
        if perImage * x[0] <= CUDAExecutable.convScratchBudget {
            return ConvPlan(direct: false, imagesPerChunk: x[0], pixelsPerChunk: hw, scratchBytes: perImage * x[0])
        }
        let pixels = max(1, min(hw, CUDAExecutable.convScratchBudget / max(kAll * T.size, 1)))
        return ConvPlan(direct: false, imagesPerChunk: 1, pixelsPerChunk: pixels, scratchBytes: kAll * pixels * T.size)
    }

    /// A convolution: cuDNN where it took it while the scratch was sized, else im2col + GEMMs in
    /// the node's layout; the bias (unless the GEMM added it) and the other epilogue ops follow
    /// in one kernel.
    private func buildConv(_ i: Int, _ n: Node, _ a: Conv2dAttributes) throws {
        var extras = extraInputs(n, hasBias: a.hasBias)
        var ops = a.epilogue[...]
        var bias = a.hasBias ? ptr(n, 2) : nil
        if let c = cudnnConvolutions[i] {
            add(.cudnn(c, x: ptr(n, 0), w: ptr(n, 1), y: pointers[i], workspace: scratch?.pointer ?? 0), i)
        } else if n.channelsLast {
            try convGemmsNHWC(i, n, a, residual: takeLeadingResidual(&ops, &extras))
            bias = nil  // added by cuBLASLt along the output's columns
        } else {
            try convGemmsNCHW(i, n, a, residual: takeLeadingResidual(&ops, &extras))
        }
        if bias != nil || !ops.isEmpty {
            let (channels, inner) = n.channelsLast ? (n.shape[3], 1) : (n.shape[1], n.shape[2] * n.shape[3])
            try epilogue(i, y: pointers[i], bias: bias, count: n.count, inner: inner, channels: channels, ops: ops, extras: extras)
        }
    }

    /// Bias and epilogue ops over y in place, output element e having channel (e / inner) % channels;
    /// eight elements at a time where their bias is one value (NCHW, inner a multiple of 8) or
    /// eight consecutive ones (channels-last).
    private func epilogue(_ i: Int, y: CUdeviceptr, bias: CUdeviceptr?, count: Int, inner: Int, channels: Int,
                          ops: ArraySlice<Epilogue>, extras: [CUdeviceptr]) throws {
        let s = try epilogueStruct(ops, extras: extras)
        let biasFits = bias == nil || inner % 8 == 0 || (inner == 1 && channels % 8 == 0)
        if biasFits, eightWide(count, [y] + extras + (bias.map { [$0] } ?? [])) {
            try elementwise("epilogue_v8", count: count / 8,
                            [.ptr(y), .ptr(bias ?? 0), .i32(Int32(count / 8)), .i32(Int32(inner)), .i32(Int32(channels)), .bytes(s)], node: i)
        } else {
            try elementwise("epilogue_kernel", count: count,
                            [.ptr(y), .ptr(bias ?? 0), .i64(Int64(count)), .i64(Int64(inner)), .i64(Int64(channels)), .bytes(s)], node: i)
        }
    }

    /// Whether an 8-wide kernel may run over `count` elements through `pointers`: whole eights,
    /// 32-bit indices, 16-byte aligned addresses.
    private func eightWide(_ count: Int, _ pointers: [CUdeviceptr]) -> Bool {
        count % 8 == 0 && count < Int(Int32.max) && pointers.allSatisfy { $0 % 16 == 0 }
    }

    /// Whether binary_bcast_v8 applies: after collapsing, the innermost axis comes in eights and
    /// each operand either walks it contiguously (then every stride is a multiple of 8, so each
    /// eight starts aligned) or repeats one value along it.
    private func broadcastEightWide(_ shape: [Int], _ strides: [[Int]], _ operands: [CUdeviceptr], _ y: CUdeviceptr) -> Bool {
        let (s, st) = collapseAxes(shape, strides)
        guard let inner = s.last, inner % 8 == 0, eightWide(shape.reduce(1, *), [y]) else { return false }
        return zip(st, operands).allSatisfy { st, p in
            st.last == 0 || (st.last == 1 && st.dropLast().allSatisfy { $0 % 8 == 0 } && p % 16 == 0)
        }
    }

    /// Moves a leading residual add out of the epilogue ops: the GEMM adds it through its C operand.
    private func takeLeadingResidual(_ ops: inout ArraySlice<Epilogue>, _ extras: inout [CUdeviceptr]) -> CUdeviceptr? {
        guard ops.first == .addInput, !extras.isEmpty else { return nil }
        ops = ops.dropFirst()
        return extras.removeFirst()
    }

    /// An NCHW convolution as GEMMs per group: W[og, cg·kh·kw] · col[cg·kh·kw, pixels] (the input
    /// itself for a 1x1 stride-1 kernel), `residual` through C.
    private func convGemmsNCHW(_ i: Int, _ n: Node, _ a: Conv2dAttributes, residual: CUdeviceptr?) throws {
        let y = pointers[i]
        let x = shape(n, 0), w = shape(n, 1)
        let (batch, cin, h, wd) = (x[0], x[1], x[2], x[3])
        let (cout, cg, kh, kw) = (w[0], w[1], w[2], w[3])
        let (ho, wo) = (n.shape[2], n.shape[3])
        let hw = ho * wo
        let groups = a.groups
        let og = cout / groups
        let kg = cg * kh * kw, kAll = cin * kh * kw
        let plan = convPlan(n, a)
        let es = UInt64(T.size)
        var p0 = 0
        var image = 0
        while image < batch {
            let images = plan.imagesPerChunk
            let pixels = min(plan.pixelsPerChunk, hw - p0)
            let xImage = ptr(n, 0) + UInt64(image * cin * h * wd) * es
            let colPtr: CUdeviceptr
            let colLd: Int
            let colStride: Int
            if plan.direct {
                colPtr = xImage
                colLd = h * wd
                colStride = cin * h * wd
            } else {
                colPtr = scratch!.pointer
                colLd = pixels
                colStride = kAll * pixels
                try elementwise("im2col_kernel", count: images * kAll * pixels,
                                [.ptr(xImage), .ptr(colPtr), .bytes(convGeometry(a, cin: cin, h: h, w: wd, kh: kh, kw: kw, wo: wo, p0: p0,
                                                                                pixels: pixels, images: images, kAll: kAll))], node: i)
            }
            for grp in 0..<groups {
                let outOffset = UInt64(image * cout * hw + grp * og * hw + p0) * es
                let c = residual.map { GemmOperand(pointer: $0 + outOffset, ld: hw, batchStride: cout * hw, dtype: T) }
                let gemm = try GemmPlan(ctx, m: og, n: pixels, k: kg, batch: images,
                                        a: GemmOperand(pointer: ptr(n, 1) + UInt64(grp * og * kg) * es, ld: kg, batchStride: 0, dtype: T),
                                        b: GemmOperand(pointer: colPtr + UInt64(grp * kg * colLd) * es, ld: colLd, batchStride: colStride, dtype: T),
                                        transposeB: false,
                                        d: GemmOperand(pointer: y + outOffset, ld: hw, batchStride: cout * hw, dtype: T),
                                        c: c, beta: 1, computeType: computeType, tune: autotune,
                                        label: "conv2d \(n.scope) %\(i) \(x)*\(w)")
                add(.gemm(gemm), i)
            }
            p0 += pixels
            if p0 >= hw { p0 = 0; image += images }
        }
    }

    /// A channels-last convolution as one GEMM per chunk of output pixels, as a linear:
    /// col[pixels, kh·kw·C] · W[O, kh·kw·C]ᵀ (the input itself for a 1x1 stride-1 kernel), with
    /// the bias and `residual` inside the cuBLASLt call.
    private func convGemmsNHWC(_ i: Int, _ n: Node, _ a: Conv2dAttributes, residual: CUdeviceptr?) throws {
        let y = pointers[i]
        let x = shape(n, 0), w = shape(n, 1)
        let (batch, h, wd, cin) = (x[0], x[1], x[2], x[3])
        let (cout, kh, kw) = (w[0], w[1], w[2])
        let (ho, wo) = (n.shape[1], n.shape[2])
        let hw = ho * wo
        let kAll = kh * kw * cin
        guard a.groups == 1, w[3] == cin else {
            throw CUDAError.unsupported("channels-last conv2d \(n.scope) %\(i): grouped convolutions stay NCHW")
        }
        let plan = convPlan(n, a)
        let es = UInt64(T.size)
        let label = "conv2d \(n.scope) %\(i) \(x)*\(w) NHWC"
        var p0 = 0, image = 0
        while image < batch {
            // Whole images (pixels == hw) or one image's pixel chunk: the rows are contiguous either way.
            let images = plan.imagesPerChunk
            let pixels = min(plan.pixelsPerChunk, hw - p0)
            let rows = images * pixels
            let outOffset = UInt64((image * hw + p0) * cout) * es
            let xImage = ptr(n, 0) + UInt64(image * h * wd * cin) * es
            let a0: CUdeviceptr
            if plan.direct {
                a0 = xImage
            } else {
                a0 = scratch!.pointer
                try elementwise("im2col_nhwc_kernel", count: rows * kAll,
                                [.ptr(xImage), .ptr(a0), .bytes(convGeometry(a, cin: cin, h: h, w: wd, kh: kh, kw: kw, wo: wo, p0: p0,
                                                                             pixels: pixels, images: images, kAll: kAll))], node: i)
            }
            let gemm = try GemmPlan(ctx, m: rows, n: cout, k: kAll, batch: 1,
                                    a: GemmOperand(pointer: a0, ld: kAll, batchStride: 0, dtype: T),
                                    b: GemmOperand(pointer: ptr(n, 1), ld: kAll, batchStride: 0, dtype: T), transposeB: true,
                                    d: GemmOperand(pointer: y + outOffset, ld: cout, batchStride: 0, dtype: T),
                                    c: residual.map { GemmOperand(pointer: $0 + outOffset, ld: cout, batchStride: 0, dtype: T) },
                                    beta: 1, bias: a.hasBias ? ptr(n, 2) : nil, computeType: computeType, tune: autotune, label: label)
            add(.gemm(gemm), i)
            p0 += pixels
            if p0 >= hw { p0 = 0; image += images }
        }
    }

    /// The im2col kernels' `ConvGeom` (an image is cin·h·w elements in either layout).
    private func convGeometry(_ a: Conv2dAttributes, cin: Int, h: Int, w: Int, kh: Int, kw: Int, wo: Int, p0: Int, pixels: Int,
                              images: Int, kAll: Int) -> [UInt8] {
        var g = StructBytes()
        for v in [cin, h, w, kh, kw, a.stride.0, a.stride.1, a.padding.0, a.padding.2, a.dilation.0, a.dilation.1,
                  wo, p0, pixels, images, cin * h * w, kAll] { g.i64(v) }
        return g.bytes
    }

    // MARK: norms and reductions

    /// Channels-last GroupNorm launch geometry: pixels per stats block (about 2048 blocks in
    /// all, at least 16 pixels each), and the block size that gives each thread whole channels.
    private func groupNormNHWCGrid(_ n: Node, _ groups: Int) -> (chunkPixels: Int, chunks: Int, block: Int) {
        let (batch, spatial, c) = (n.shape[0], n.shape[1] * n.shape[2], n.shape[3])
        let chunkPixels = max(16, (spatial * batch + 2047) / 2048)
        let perThread = (c + 1023) / 1024
        let block = min(1024, ((c + perThread - 1) / perThread + 31) / 32 * 32)
        return (chunkPixels, max(1, (spatial + chunkPixels - 1) / chunkPixels), block)
    }

    private func buildGroupNormNHWC(_ i: Int, _ n: Node, groups: Int, eps: Float, activation act: UnaryOp?) throws {
        let (batch, spatial, c) = (n.shape[0], n.shape[1] * n.shape[2], n.shape[3])
        guard groups <= 128, c % groups == 0 else {
            throw CUDAError.unsupported("channels-last group_norm \(n.scope) %\(i): \(groups) groups of \(c) channels (at most 128 groups)")
        }
        let g = groupNormNHWCGrid(n, groups)
        let partial = scratch!.pointer
        let stats = partial + UInt64(batch * groups * g.chunks * 2 * 4)
        try launch(.norm, "groupnorm_stats_nhwc", grid: (UInt32(g.chunks), UInt32(batch), 1), block: UInt32(g.block),
                   [.ptr(ptr(n, 0)), .ptr(partial), .i64(Int64(spatial)), .i64(Int64(c)), .i64(Int64(groups)),
                    .i64(Int64(g.chunkPixels))], node: i)
        let ng = batch * groups
        try launch(.norm, "groupnorm_finalize_nhwc", grid: (UInt32((ng + 3) / 4), 1, 1), block: 128,
                   [.ptr(ptr(n, 0)), .ptr(partial), .ptr(stats), .i64(Int64(ng)), .i64(Int64(g.chunks)), .i64(Int64(spatial)),
                    .i64(Int64(c)), .i64(Int64(groups)), .f32(eps)], node: i)
        let actCode = act.map { Int32(UnaryOp.allCases.firstIndex(of: $0)!) } ?? -1
        try launch(.norm, "groupnorm_apply_nhwc", grid: (ctx.elementwiseGrid(n.count), 1, 1),
                   [.ptr(ptr(n, 0)), .ptr(pointers[i]), .ptr(stats), .ptr(ptr(n, 1)), .ptr(ptr(n, 2)), .i64(Int64(n.count)),
                    .i64(Int64(spatial)), .i64(Int64(c)), .i64(Int64(groups)), .i32(actCode)], node: i)
    }

    static let groupNormChunk = 4096

    private func groupNormGrid(_ n: Node, _ groups: Int) -> (Int, Int) {
        let groupLen = n.count / max(n.shape[0] * groups, 1)
        return (n.shape[0] * groups, max(1, (groupLen + CUDAExecutable.groupNormChunk - 1) / CUDAExecutable.groupNormChunk))
    }

    private func buildReduce(_ i: Int, _ n: Node, _ op: ReduceOp, _ axes: [Int]) throws {
        let src = shape(n, 0)
        let st = strides(src)
        let keep = src.indices.filter { !axes.contains($0) }
        guard keep.count <= 8, axes.count <= 8 else { throw CUDAError.unsupported("reduce over rank \(src.count)") }
        var d = StructBytes()
        d.i64(keep.count)
        d.i64Array(keep.map { src[$0] }, count: 8)
        d.i64Array(keep.map { st[$0] }, count: 8)
        d.i64(axes.count)
        d.i64Array(axes.map { src[$0] }, count: 8)
        d.i64Array(axes.map { st[$0] }, count: 8)
        d.i64(axes.reduce(1) { $0 * src[$1] })
        d.i64(op == .mean ? 0 : op == .sum ? 1 : 2)
        try launch(.norm, "reduce_kernel", grid: (UInt32(max(1, min(n.count, 65535))), 1, 1),
                   [.ptr(ptr(n, 0)), .ptr(pointers[i]), .i64(Int64(n.count)), .bytes(d.bytes)], node: i)
    }

    // MARK: attention

    struct AttentionGeometry {
        var q: CUdeviceptr, k: CUdeviceptr, v: CUdeviceptr
        var ldq: Int, ldk: Int, ldv: Int
        var batch: Int, heads: Int, sq: Int, sk: Int, d: Int, dv: Int
        var causal: Bool
    }

    private func attentionGeometry(_ n: Node, _ a: AttentionAttributes) -> AttentionGeometry {
        let q = shape(n, 0)
        let h = a.heads
        let dv = n.shape[2] / h
        let es = UInt64(T.size)
        switch a.packing {
        case .separate:
            let ks = shape(n, 1), vs = shape(n, 2)
            return AttentionGeometry(q: ptr(n, 0), k: ptr(n, 1), v: ptr(n, 2), ldq: q[2], ldk: ks[2], ldv: vs[2],
                                     batch: q[0], heads: h, sq: q[1], sk: ks[1], d: q[2] / h, dv: dv, causal: a.causal)
        case .qkv:
            let d = (q[2] - h * dv) / 2 / h
            let base = ptr(n, 0)
            return AttentionGeometry(q: base, k: base + UInt64(h * d) * es, v: base + UInt64(2 * h * d) * es,
                                     ldq: q[2], ldk: q[2], ldv: q[2], batch: q[0], heads: h, sq: q[1], sk: q[1],
                                     d: d, dv: dv, causal: a.causal)
        case .kv:
            let kv = shape(n, 1)
            let d = q[2] / h
            return AttentionGeometry(q: ptr(n, 0), k: ptr(n, 1), v: ptr(n, 1) + UInt64(h * d) * es, ldq: q[2], ldk: kv[2],
                                     ldv: kv[2], batch: q[0], heads: h, sq: q[1], sk: kv[1], d: d, dv: dv, causal: a.causal)
        }
    }

    private func headBucket(_ g: AttentionGeometry) -> Int? {
        AttentionKernels.headDimBuckets.first { $0 >= max(g.d, g.dv) }
    }

    private func useFused(_ g: AttentionGeometry) -> Bool {
        if case .fused = options.attention { return headBucket(g) != nil }
        return false
    }

    private func sliceRows(_ g: AttentionGeometry) -> Int {
        if case .sliced(let s) = options.attention { return max(1, min(s, g.sq)) }
        return g.sq
    }

    private func buildAttention(_ i: Int, _ n: Node, _ a: AttentionAttributes) throws {
        let g = attentionGeometry(n, a)
        let o = pointers[i]
        let ldo = g.heads * g.dv
        if useFused(g), let dp = headBucket(g) {
            let aligned = [g.q, g.k, g.v, o].allSatisfy { $0 % 16 == 0 }
            let vec = T != .float32 && aligned && g.d % 8 == 0 && g.dv % 8 == 0 && [g.ldq, g.ldk, g.ldv].allSatisfy { $0 % 8 == 0 }
            var s = StructBytes()
            for v in [g.q, g.k, g.v, o] { s.u64(v) }
            for v in [g.batch, g.heads, g.sq, g.sk, g.d, g.dv, g.ldq, g.ldk, g.ldv, ldo,
                      g.sq * g.ldq, g.sk * g.ldk, g.sk * g.ldv, g.sq * ldo, g.causal ? 1 : 0, vec ? 1 : 0] { s.i64(v) }
            // float32 runs the same FMA kernel in both families (32 rows a block, static shared memory).
            let (family, entry, rowsPerBlock, shared): (KernelFamily, String, Int, Int) =
                options.flags.contains("basic-attention")
                ? (.attentionBasic, "flash_attention_basic_d\(dp)", T == .float32 ? 32 : 64,
                   T == .float32 ? 0 : AttentionKernels.basicSharedBytes16(dp: dp))
                : (.attention, "flash_attention_d\(dp)", T == .float32 ? 32 : AttentionKernels.rowsPerBlock16(dp: dp),
                   T == .float32 ? 0 : AttentionKernels.sharedBytes16(dp: dp))
            try launch(family, entry,
                       grid: (UInt32((g.sq + rowsPerBlock - 1) / rowsPerBlock), UInt32(g.heads), UInt32(g.batch)), block: 128,
                       shared: shared, [.bytes(s.bytes), .f32(a.scale)], node: i)
            return
        }
        // Math path: scores = scale * Q Kᵀ (float32) per head, softmax, then P V; a slice of
        // query rows at a time for `sliced`.
        let rowsMax = sliceRows(g)
        let es = UInt64(T.size)
        let scores = scratch!.pointer
        let probs = scores + UInt64((g.heads * rowsMax * g.sk * 4 + 255) / 256 * 256)
        let scoreCompute = T == .float32 ? computeType : CuBLASLt.compute32F
        for b in 0..<g.batch {
            var q0 = 0
            while q0 < g.sq {
                let rows = min(rowsMax, g.sq - q0)
                let qPtr = g.q + UInt64(b * g.sq * g.ldq + q0 * g.ldq) * es
                let kPtr = g.k + UInt64(b * g.sk * g.ldk) * es
                let vPtr = g.v + UInt64(b * g.sk * g.ldv) * es
                let oPtr = o + UInt64(b * g.sq * ldo + q0 * ldo) * es
                let s = try GemmPlan(ctx, m: rows, n: g.sk, k: g.d, batch: g.heads,
                                     a: GemmOperand(pointer: qPtr, ld: g.ldq, batchStride: g.d, dtype: T),
                                     b: GemmOperand(pointer: kPtr, ld: g.ldk, batchStride: g.d, dtype: T), transposeB: true,
                                     d: GemmOperand(pointer: scores, ld: g.sk, batchStride: rows * g.sk, dtype: .float32),
                                     alpha: a.scale, computeType: scoreCompute, label: "attention scores \(n.scope) %\(i)")
                add(.gemm(s), i)
                let totalRows = g.heads * rows
                try launch(.norm, "softmax_f32in", grid: (UInt32((totalRows + 3) / 4), 1, 1), block: 128,
                           [.ptr(scores), .ptr(probs), .i64(Int64(totalRows)), .i64(Int64(g.sk)), .f32(1),
                            .i32(g.causal ? 1 : 0), .i64(Int64(rows)), .i64(Int64(q0))], node: i)
                let pv = try GemmPlan(ctx, m: rows, n: g.dv, k: g.sk, batch: g.heads,
                                      a: GemmOperand(pointer: probs, ld: g.sk, batchStride: rows * g.sk, dtype: T),
                                      b: GemmOperand(pointer: vPtr, ld: g.ldv, batchStride: g.dv, dtype: T), transposeB: false,
                                      d: GemmOperand(pointer: oPtr, ld: ldo, batchStride: g.dv, dtype: T),
                                      computeType: computeType, label: "attention output \(n.scope) %\(i)")
                add(.gemm(pv), i)
                q0 += rows
            }
        }
    }
}

// MARK: index helpers

/// Strides of `inShape` broadcast to `outShape` (0 on broadcast axes), numpy rules.
func broadcastStrides(_ inShape: [Int], _ outShape: [Int]) -> [Int] {
    let pad = outShape.count - inShape.count
    let full = [Int](repeating: 1, count: pad) + inShape
    let st = strides(full)
    return full.indices.map { full[$0] == 1 && outShape[$0] != 1 ? 0 : st[$0] }
}

/// Drops size-1 axes and merges neighbours that are contiguous in every stride set.
func collapseAxes(_ shape: [Int], _ sets: [[Int]]) -> (shape: [Int], sets: [[Int]]) {
    var dims: [(Int, [Int])] = []
    for d in shape.indices where shape[d] != 1 { dims.append((shape[d], sets.map { $0[d] })) }
    var merged: [(Int, [Int])] = []
    for (size, st) in dims {
        if let last = merged.last, zip(last.1, st).allSatisfy({ $0.0 == $0.1 * size }) {
            merged[merged.count - 1] = (last.0 * size, st)
        } else {
            merged.append((size, st))
        }
    }
    return (merged.map(\.0), sets.indices.map { k in merged.map { $0.1[k] } })
}

/// The kernels' `Strided` struct for a walk over `shape` with two stride sets.
func stridedStruct(_ shape: [Int], _ sets: [[Int]]) throws -> [UInt8] {
    let (s, st) = collapseAxes(shape, sets)
    guard s.count <= 8 else { throw CUDAError.unsupported("strided access over \(s.count) axes (at most 8)") }
    var b = StructBytes()
    b.i64(s.count)
    b.i64Array(s, count: 8)
    b.i64Array(st[0], count: 8)
    b.i64Array(st[1], count: 8)
    return b.bytes
}
