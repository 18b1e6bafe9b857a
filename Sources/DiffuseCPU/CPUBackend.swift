import CDNNL
#if canImport(Glibc)
import Glibc
#endif
import DiffuseCore
import DiffuseGraph

/// The CPU backend: oneDNN (blocked layouts, weights reordered once, fused post-ops) for
/// convolutions and matrix products, Swift SIMD kernels for everything else.
///
/// Compiling a graph lowers it to a program: one step per value, each step a closure over
/// fixed pointers into one arena planned by liveness (`MemoryPlanner`), so a run is a straight
/// walk over closures with no allocation. Values between convolutions stay in oneDNN's
/// blocked nChw8c layout; elementwise ops, GroupNorm, upsampling and channel concatenation
/// work on that layout directly, and explicit reorders appear only where an op needs plain
/// row-major data (attention, reshapes, linears).
public final class CPUBackend: Backend {
    let context: DNNL.Context

    public init() throws {
        context = try DNNL.Context.shared.get()
    }

    public var name: String { "cpu" }

    public var deviceDescription: String {
        var model = "CPU"
        if let info = try? Files.readText("/proc/cpuinfo"),
           let line = info.split(separator: "\n").first(where: { $0.hasPrefix("model name") }),
           let colon = line.firstIndex(of: ":") {
            model = line[line.index(after: colon)...].trimmingCharacters(in: " ")
        }
        return "\(model), \(Parallel.threads) threads"
    }

    public var peakMemoryBytes: Int { peakResidentBytes() }

    public func synchronize() throws {}

    public func upload(_ tensor: Tensor) throws -> DeviceTensor { HostTensor(tensor) }

    public func linearCombination(_ terms: [(Double, DeviceTensor)]) throws -> DeviceTensor {
        guard let first = terms.first else { throw BackendError("linearCombination of no terms") }
        let xs = try terms.map { try $0.1.toHost().converted(to: .float32) }
        for x in xs where x.shape != first.1.shape {
            throw BackendError("linearCombination: shapes \(xs.map(\.shape)) differ")
        }
        let out = Tensor(zeros: first.1.shape)
        withExtendedLifetime(xs) {
            Elementwise.linearCombination(zip(terms, xs).map { (Float($0.0.0), UnsafePointer($0.1.floats)) }, out.floats,
                                          count: out.count)
        }
        return HostTensor(out)
    }

    public func compile(_ graph: Graph, weights: ModelWeights?, options: CompileOptions) throws -> Executable {
        guard options.precision == .float32 else {
            throw BackendError("the CPU backend computes in float32 (no \(options.precision.rawValue) arithmetic on this CPU); "
                + "use --precision fp32")
        }
        if let w = options.weightStorage, ![.float32, .float16, .bfloat16].contains(w) {
            throw BackendError("the CPU backend stores weights as float32, float16 or bfloat16, not \(w)")
        }
        if options.flags.contains("autotune") {
            throw BackendError("autotune is a CUDA switch (cuBLASLt and cuDNN algorithm timing); oneDNN chooses its CPU kernels itself")
        }
        if options.flags.contains("basic-attention") {
            throw BackendError("basic-attention picks between the CUDA backend's two flash-attention kernels; the CPU has one")
        }
        if options.flags.contains("channels-last") {
            throw BackendError("channels-last is a CUDA layout; the CPU backend lets oneDNN choose its blocked layouts (nChw8c)")
        }
        if let n = graph.nodes.first(where: \.channelsLast) {
            // oneDNN picks blocked layouts (nChw8c) on its own, which suit AVX2 better than NHWC.
            throw BackendError("the CPU backend runs images NCHW; \(n.scope) \(n.op.name) is channels-last "
                + "(GraphPasses.channelsLast is for the CUDA backend)")
        }
        if let weights { try weights.validate(graph) }
        let optimize = !options.flags.contains("baseline")
        let g = optimize ? GraphPasses.fuseForCPU(graph) : graph
        return try Lowering(graph: g, weights: weights, options: options, context: context, blocked: optimize).build()
    }
}

extension StringProtocol {
    func trimmingCharacters(in set: Character) -> String {
        var s = Substring(self)
        while s.first == set { s.removeFirst() }
        while s.last == set { s.removeLast() }
        return String(s)
    }
}

/// A compiled graph: steps over one arena.
final class CPUExecutable: Executable {
    let graph: Graph
    let arenaBytes: Int
    let arena: Tensor
    let scratch: Tensor
    let steps: [() throws -> Void]
    /// What each step does, for `DIFFUSE_PROFILE`.
    let labels: [String]
    /// Feeds for the current run, read by the input steps.
    let feeds: FeedBox
    let outputs: [(name: String, read: () -> Tensor)]
    /// Keeps oneDNN objects and prepared weights alive.
    let retained: [AnyObject]
    /// Streamed weights: out of the process's memory again after each run.
    let spilled: [SpilledRegion]

    init(graph: Graph, arena: Tensor, scratch: Tensor, steps: [() throws -> Void], labels: [String], feeds: FeedBox,
         outputs: [(name: String, read: () -> Tensor)], retained: [AnyObject], spilled: [SpilledRegion]) {
        self.graph = graph
        self.arena = arena
        self.arenaBytes = arena.byteCount
        self.scratch = scratch
        self.steps = steps
        self.labels = labels
        self.feeds = feeds
        self.outputs = outputs
        self.retained = retained
        self.spilled = spilled
    }

    func run(_ feeds: [String: DeviceTensor]) throws -> [String: DeviceTensor] {
        try graph.checkFeeds(feeds) { $0.shape }
        self.feeds.tensors = try feeds.mapValues { try $0.toHost() }
        defer {
            self.feeds.tensors = [:]
            for r in spilled { r.dropResident() }
        }
        if Profile.enabled {
            for (step, label) in zip(steps, labels) {
                let t0 = now()
                try step()
                Profile.add(label, now() - t0)
            }
        } else {
            for step in steps { try step() }
        }
        var out: [String: DeviceTensor] = [:]
        for o in outputs { out[o.name] = HostTensor(o.read()) }
        return out
    }
}

