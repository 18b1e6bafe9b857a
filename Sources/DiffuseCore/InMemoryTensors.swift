/// Named tensors held in memory: test weights, converted checkpoints, renamed views.
public final class InMemoryTensors: TensorSource {
    public private(set) var tensorNames: [String] = []
    private var tensors: [String: Tensor] = [:]
    public let origin: String

    public init(_ tensors: [(String, Tensor)] = [], origin: String = "in-memory tensors") {
        self.origin = origin
        for (n, t) in tensors { self[n] = t }
    }

    public subscript(name: String) -> Tensor? {
        get { tensors[name] }
        set {
            if tensors[name] == nil, newValue != nil { tensorNames.append(name) }
            if newValue == nil { tensorNames.removeAll { $0 == name } }
            tensors[name] = newValue
        }
    }

    public func info(_ name: String) -> (dtype: DType, shape: [Int])? { tensors[name].map { ($0.dtype, $0.shape) } }

    public func tensor(_ name: String) throws -> Tensor {
        guard let t = tensors[name] else { throw SafeTensorsError.missingTensor(file: origin, tensor: name) }
        return t
    }
}

/// Several sources seen as one, each one's names behind its prefix (a UNet's weights beside a
/// ControlNet's under `controlnet.`, for a graph that runs both).
public final class PrefixedTensorSources: TensorSource {
    private let parts: [(prefix: String, source: TensorSource)]
    public let tensorNames: [String]
    public let origin: String

    public init(_ parts: [(prefix: String, source: TensorSource)]) {
        self.parts = parts
        tensorNames = parts.flatMap { part in part.source.tensorNames.map { part.prefix + $0 } }
        origin = parts.map(\.source.origin).joined(separator: " + ")
    }

    private func part(_ name: String) -> (TensorSource, String)? {
        // The longest matching prefix wins, so "" can hold the rest.
        for (prefix, source) in parts.sorted(by: { $0.prefix.count > $1.prefix.count }) where name.hasPrefix(prefix) {
            return (source, String(name.dropFirst(prefix.count)))
        }
        return nil
    }

    public func info(_ name: String) -> (dtype: DType, shape: [Int])? { part(name).flatMap { $0.0.info($0.1) } }

    public func tensor(_ name: String) throws -> Tensor {
        guard let (source, inner) = part(name) else { throw SafeTensorsError.missingTensor(file: origin, tensor: name) }
        return try source.tensor(inner)
    }

    public func evict(_ name: String) { if let (source, inner) = part(name) { source.evict(inner) } }
}

/// Several sources with disjoint names seen as one (a UNet's weights and the attention weights
/// IP-Adapters add under the UNet's own module paths). The first source holding a name wins.
public final class UnionTensorSource: TensorSource {
    private let sources: [TensorSource]
    private let owner: [String: Int]
    public let tensorNames: [String]
    public let origin: String

    public init(_ sources: [TensorSource]) {
        self.sources = sources
        var owner: [String: Int] = [:], names: [String] = []
        for (i, s) in sources.enumerated() {
            for n in s.tensorNames where owner[n] == nil { owner[n] = i; names.append(n) }
        }
        self.owner = owner
        tensorNames = names
        origin = sources.map(\.origin).joined(separator: " + ")
    }

    public func info(_ name: String) -> (dtype: DType, shape: [Int])? { owner[name].flatMap { sources[$0].info(name) } }

    public func tensor(_ name: String) throws -> Tensor {
        guard let i = owner[name] else { throw SafeTensorsError.missingTensor(file: origin, tensor: name) }
        return try sources[i].tensor(name)
    }

    public func evict(_ name: String) { if let i = owner[name] { sources[i].evict(name) } }
}
