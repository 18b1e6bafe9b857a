import DiffuseCore

/// Numeric precision of activations and arithmetic on a backend.
public enum Precision: String, Sendable, CaseIterable {
    /// float32 everywhere.
    case float32 = "fp32"
    /// float32 storage, TF32 tensor-core matmuls (torch's `allow_tf32`); CUDA only.
    case tf32
    /// float16 activations and weights, float32 accumulation and norm statistics.
    case float16 = "fp16"
    /// bfloat16 activations and weights, float32 accumulation and norm statistics.
    case bfloat16 = "bf16"

    /// The storage type of activations.
    public var activationType: DType {
        switch self {
        case .float32, .tf32: return .float32
        case .float16: return .float16
        case .bfloat16: return .bfloat16
        }
    }
}

/// How attention is computed.
public enum AttentionImplementation: Sendable, Hashable, CustomStringConvertible {
    /// Tiled with an online softmax: the score matrix is never materialized (flash-style).
    case fused
    /// softmax(QKᵀ)V with the full score matrix: the reference path.
    case math
    /// The math path a slice of query rows at a time (diffusers' `enable_attention_slicing`).
    case sliced(Int)

    public var description: String {
        switch self {
        case .fused: return "fused"
        case .math: return "math"
        case .sliced(let n): return "sliced(\(n))"
        }
    }
}

public struct CompileOptions: Sendable {
    public var precision: Precision
    /// Storage type of weights; nil means the activation type. fp16/bf16 storage with fp32
    /// precision keeps weights in 16 bits and widens them on the fly (halves weight memory).
    public var weightStorage: DType?
    public var attention: AttentionImplementation
    /// Backend-specific switches (e.g. "cuda-graphs", "channels-last"), each `name` or `name=value`.
    public var flags: Set<String>

    public init(precision: Precision = .float32, weightStorage: DType? = nil,
                attention: AttentionImplementation = .fused, flags: Set<String> = []) {
        self.precision = precision
        self.weightStorage = weightStorage
        self.attention = attention
        self.flags = flags
    }
}

/// A tensor held by a backend (host memory on the CPU, device memory on a GPU).
public protocol DeviceTensor: AnyObject {
    var shape: [Int] { get }
    var dtype: DType { get }
    /// Copies the data to the host (waits for pending work).
    func toHost() throws -> Tensor
}

/// A graph prepared for repeated runs: primitives created, weights bound, buffers planned.
public protocol Executable: AnyObject {
    var graph: Graph { get }
    /// Bytes of the activation arena (the planned peak of intermediate values).
    var arenaBytes: Int { get }
    /// Runs the graph. Outputs stay on the device; they remain valid until the next run.
    func run(_ feeds: [String: DeviceTensor]) throws -> [String: DeviceTensor]
}

public protocol Backend: AnyObject {
    /// "cpu" or "cuda".
    var name: String { get }
    /// The device in words (CPU model and threads, GPU name and memory).
    var deviceDescription: String { get }
    func compile(_ graph: Graph, weights: ModelWeights?, options: CompileOptions) throws -> Executable
    func upload(_ tensor: Tensor) throws -> DeviceTensor
    /// `Σ cᵢ·xᵢ` as one device op with host coefficients: the scheduler's per-step latent update.
    func linearCombination(_ terms: [(Double, DeviceTensor)]) throws -> DeviceTensor
    /// Waits for all queued work.
    func synchronize() throws
    /// Highest device memory in use so far, in bytes (weights, arenas, buffers).
    var peakMemoryBytes: Int { get }
    /// Starts `peakMemoryBytes` again from what is in use now (torch's `reset_peak_memory_stats`).
    func resetPeakMemory()
}

extension Backend {
    public func resetPeakMemory() {}
}

extension Executable {
    /// Runs with host tensors in and out (uploads, runs, copies back).
    public func run(host feeds: [String: Tensor], on backend: Backend) throws -> [String: Tensor] {
        var device: [String: DeviceTensor] = [:]
        for (k, v) in feeds { device[k] = try backend.upload(v) }
        return try run(device).mapValues { try $0.toHost() }
    }
}

/// Errors binding a graph's parameters to a weight source.
public enum WeightError: Error, CustomStringConvertible {
    case missing(tensor: String, origin: String)
    case shapeMismatch(tensor: String, origin: String, file: [Int], model: [Int])
    case notFloat(tensor: String, origin: String, dtype: DType)

    public var description: String {
        switch self {
        case let .missing(t, o): return "\(o): missing tensor '\(t)'"
        case let .shapeMismatch(t, o, f, m):
            return "\(o): tensor '\(t)' has shape \(f) but the model expects \(m)"
        case let .notFloat(t, o, d): return "\(o): tensor '\(t)' has dtype \(d), expected a float type"
        }
    }
}

/// A model's weights as a graph binds them: the source, plus a cache where backends keep
/// prepared forms (converted, reordered, quantized) so graphs of other shapes share them.
public final class ModelWeights {
    public let source: TensorSource
    private var prepared: [String: AnyObject] = [:]
    private let lock = NSLockLite()

    public init(_ source: TensorSource) { self.source = source }

    /// Checks that every parameter of `graph` exists with the declared shape and a float dtype.
    public func validate(_ graph: Graph) throws {
        for (src, v) in graph.parameters {
            for name in src.names {
                guard let info = source.info(name) else { throw WeightError.missing(tensor: name, origin: source.origin) }
                guard info.dtype.isFloatingPoint else {
                    throw WeightError.notFloat(tensor: name, origin: source.origin, dtype: info.dtype)
                }
                if case .named = src, info.shape != graph[v].shape {
                    throw WeightError.shapeMismatch(tensor: name, origin: source.origin, file: info.shape, model: graph[v].shape)
                }
                if case .channelsLast = src, info.shape.count != 4 || channelsLastShape(info.shape) != graph[v].shape {
                    throw WeightError.shapeMismatch(tensor: name, origin: source.origin, file: info.shape,
                                                    model: graph[v].shape.count == 4 ? nchwShape(graph[v].shape) : graph[v].shape)
                }
            }
        }
    }

    /// The parameter's data as float32 on the host (concatenating fused sources).
    public func float32(_ src: ParameterSource) throws -> Tensor {
        switch src {
        case .named(let n):
            return try source.tensor(n).converted(to: .float32)
        case .concat(let names, let axis):
            let parts = try names.map { try source.tensor($0).converted(to: .float32) }
            return concatenate(parts, axis: axis)
        case .channelsLast(let n):
            return try source.tensor(n).converted(to: .float32).permuted([0, 2, 3, 1])
        }
    }

    /// The parameter's data in `dtype` (float16/bfloat16 sources stay zero-copy when they match).
    public func tensor(_ src: ParameterSource, as dtype: DType) throws -> Tensor {
        if case .named(let n) = src, source.info(n)?.dtype == dtype { return try source.tensor(n) }
        return try float32(src).converted(to: dtype)
    }

    /// Tells the source the parameter's data will not be read again soon (a backend keeps its
    /// own prepared copy), so memory-mapped files can drop those pages.
    public func evict(_ src: ParameterSource) {
        for n in src.names { source.evict(n) }
    }

    /// A backend's prepared form of something, created once.
    public func prepared<T: AnyObject>(_ key: String, _ make: () throws -> T) rethrows -> T {
        lock.lock()
        defer { lock.unlock() }
        if let v = prepared[key] as? T { return v }
        let v = try make()
        prepared[key] = v
        return v
    }

    /// Drops prepared forms (e.g. after a precision change).
    public func clearPrepared() {
        lock.lock()
        prepared.removeAll()
        lock.unlock()
    }
}

/// [N,C,H,W] -> [N,H,W,C] and back.
public func channelsLastShape(_ s: [Int]) -> [Int] { [s[0], s[2], s[3], s[1]] }
public func nchwShape(_ s: [Int]) -> [Int] { [s[0], s[3], s[1], s[2]] }

extension Tensor {
    /// The tensor with its axes reordered (`out.shape[i] == shape[perm[i]]`), copied.
    public func permuted(_ perm: [Int]) -> Tensor {
        let outShape = perm.map { shape[$0] }
        let out = Tensor(zeros: outShape, dtype: dtype)
        guard out.count > 0 else { return out }
        let es = dtype.size
        let inStrides = strides(shape)
        let moved = perm.map { inStrides[$0] }  // source stride of each output axis
        let rank = perm.count
        if rank == 0 { out.raw.copyMemory(from: raw, byteCount: es); return out }
        let inner = outShape[rank - 1], innerStride = moved[rank - 1]
        // Outer axes by an index counter; the innermost one as a tight strided loop per element size.
        var index = [Int](repeating: 0, count: max(rank - 1, 0))
        var o = 0
        while o < out.count {
            var src = 0
            for k in 0..<(rank - 1) { src += index[k] * moved[k] }
            let d = out.raw + o * es, s = raw + src * es
            switch es {
            case 4:
                let dp = d.assumingMemoryBound(to: UInt32.self), sp = s.assumingMemoryBound(to: UInt32.self)
                for j in 0..<inner { dp[j] = sp[j * innerStride] }
            case 2:
                let dp = d.assumingMemoryBound(to: UInt16.self), sp = s.assumingMemoryBound(to: UInt16.self)
                for j in 0..<inner { dp[j] = sp[j * innerStride] }
            default:
                for j in 0..<inner { (d + j * es).copyMemory(from: s + j * innerStride * es, byteCount: es) }
            }
            o += inner
            var k = rank - 2
            while k >= 0 {
                index[k] += 1
                if index[k] < outShape[k] { break }
                index[k] = 0
                k -= 1
            }
        }
        return out
    }
}

/// Concatenates host tensors along `axis`.
public func concatenate(_ parts: [Tensor], axis: Int) -> Tensor {
    var shape = parts[0].shape
    shape[axis] = parts.reduce(0) { $0 + $1.shape[axis] }
    let out = Tensor(zeros: shape, dtype: parts[0].dtype)
    let outer = shape[..<axis].reduce(1, *)
    let es = parts[0].dtype.size
    var dst = out.raw
    for o in 0..<outer {
        for p in parts {
            let chunk = p.shape[axis...].reduce(1, *) * es
            dst.copyMemory(from: p.raw + o * chunk, byteCount: chunk)
            dst += chunk
        }
    }
    return out
}

/// A GPU that runs torch's CUDA normal kernel itself, so its draws are bit-exact (the CUDA
/// backend, through NVRTC); `TorchCUDAGenerator` in DiffuseSchedulers draws through it.
public protocol TorchCUDANormalDevice: AnyObject {
    var multiprocessorCount: Int { get }
    var maxThreadsPerMultiprocessor: Int { get }
    /// `count` float32 standard normals as torch's grid-stride kernel writes them with `threads`
    /// threads in total, starting at Philox offset `offset`.
    func torchNormal(count: Int, seed: UInt64, offset: UInt64, threads: Int) throws -> Tensor
}
