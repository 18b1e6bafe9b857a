import DiffuseCore

/// How a tensor under a diffusers name is made from one tensor of the underlying file. All but
/// `transpose` are views of the file's memory; nothing is copied when the view is built.
public enum TensorTransform: Equatable, Sendable, CustomStringConvertible {
    /// The tensor as stored.
    case identity
    /// The same elements under another shape (a 1x1 convolution's `[C, C, 1, 1]` read as a
    /// linear layer's `[C, C]`).
    case reshape([Int])
    /// Rows `range` of the first axis (q, k and v out of a fused `in_proj_weight`).
    case rows(Range<Int>)
    /// A matrix transposed (OpenCLIP's `text_projection`, stored as `x @ P` rather than a
    /// linear layer's weight); this one copies, and only small matrices need it.
    case transpose

    /// The shape after the transform, or a reason why it does not apply to `shape`.
    public func shape(from shape: [Int]) -> Result<[Int], TransformError> {
        switch self {
        case .identity:
            return .success(shape)
        case .reshape(let target):
            guard target.reduce(1, *) == shape.reduce(1, *) else {
                return .failure(TransformError("cannot reshape \(shape) to \(target)"))
            }
            return .success(target)
        case .rows(let range):
            guard let first = shape.first, range.lowerBound >= 0, range.upperBound <= first else {
                return .failure(TransformError("has no rows \(range.lowerBound)..<\(range.upperBound) (shape \(shape))"))
            }
            return .success([range.count] + shape.dropFirst())
        case .transpose:
            guard shape.count == 2 else { return .failure(TransformError("is not a matrix (shape \(shape)) and cannot be transposed")) }
            return .success([shape[1], shape[0]])
        }
    }

    /// Applies the transform (the shape was checked when the view was built).
    public func apply(_ t: Tensor) -> Tensor {
        switch self {
        case .identity: return t
        case .reshape(let target): return t.reshaped(target)
        case .rows(let range): return t.slice(range)
        case .transpose: return Self.transposed(t)
        }
    }

    static func transposed(_ t: Tensor) -> Tensor {
        let (rows, cols) = (t.shape[0], t.shape[1])
        let out = Tensor(zeros: [cols, rows], dtype: t.dtype)
        let size = t.dtype.size
        let src = t.raw, dst = out.raw
        for r in 0..<rows {
            for c in 0..<cols {
                (dst + (c * rows + r) * size).copyMemory(from: src + (r * cols + c) * size, byteCount: size)
            }
        }
        return out
    }

    public var description: String {
        switch self {
        case .identity: return "identity"
        case .reshape(let s): return "reshape \(s)"
        case .rows(let r): return "rows \(r.lowerBound)..<\(r.upperBound)"
        case .transpose: return "transpose"
        }
    }
}

public struct TransformError: Error, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
}

/// A renaming view of another tensor source: each of its names stands for one tensor of the
/// base source and a transform. Single-file checkpoints are read through it under diffusers'
/// names, without copying their data.
public final class MappedTensorSource: TensorSource {
    public struct Entry: Equatable, Sendable {
        /// The tensor's name in the base source.
        public let source: String
        public let transform: TensorTransform
        public init(source: String, transform: TensorTransform = .identity) {
            self.source = source
            self.transform = transform
        }
    }

    public let base: TensorSource
    public let origin: String
    public let tensorNames: [String]
    public let entries: [String: Entry]
    private let infos: [String: (dtype: DType, shape: [Int])]

    /// Builds the view; an entry whose source tensor is missing, or whose transform does not fit
    /// it, is an error naming both names.
    public init(base: TensorSource, entries: [(name: String, entry: Entry)], origin: String) throws {
        self.base = base
        self.origin = origin
        var names: [String] = []
        var map: [String: Entry] = [:]
        var infos: [String: (dtype: DType, shape: [Int])] = [:]
        for (name, entry) in entries {
            guard map[name] == nil else {
                throw ModelSourceError.checkpointLayout(file: base.origin, detail: "two tensors map to '\(name)' (one is '\(entry.source)')")
            }
            guard let info = base.info(entry.source) else {
                throw SafeTensorsError.missingTensor(file: base.origin, tensor: entry.source)
            }
            switch entry.transform.shape(from: info.shape) {
            case .success(let shape): infos[name] = (info.dtype, shape)
            case .failure(let e):
                throw ModelSourceError.checkpointLayout(file: base.origin, detail: "tensor '\(entry.source)' (for '\(name)') \(e)")
            }
            names.append(name)
            map[name] = entry
        }
        tensorNames = names
        self.entries = map
        self.infos = infos
    }

    public func info(_ name: String) -> (dtype: DType, shape: [Int])? { infos[name] }

    public func evict(_ name: String) {
        if let e = entries[name] { base.evict(e.source) }
    }

    public func tensor(_ name: String) throws -> Tensor {
        guard let e = entries[name] else { throw SafeTensorsError.missingTensor(file: origin, tensor: name) }
        return e.transform.apply(try base.tensor(e.source))
    }
}
