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
/// ControlNet's under `controlnet.`, for a graph that runs both; IP-Adapters' attention weights
/// beside the UNet's under no prefix, their names being the UNet's module paths).
public final class PrefixedTensorSources: TensorSource {
    /// Longest prefix first; equal prefixes in the order given.
    private let parts: [(prefix: String, source: TensorSource)]
    public let tensorNames: [String]
    public let origin: String

    public init(_ parts: [(prefix: String, source: TensorSource)]) {
        self.parts = parts.enumerated().sorted { a, b in
            a.element.prefix.count != b.element.prefix.count ? a.element.prefix.count > b.element.prefix.count : a.offset < b.offset
        }.map(\.element)
        var seen = Set<String>()
        tensorNames = parts.flatMap { part in part.source.tensorNames.map { part.prefix + $0 } }.filter { seen.insert($0).inserted }
        origin = parts.map(\.source.origin).joined(separator: " + ")
    }

    private func part(_ name: String) -> (TensorSource, String)? {
        // The longest matching prefix whose source holds the name wins, so "" can hold the rest;
        // sources sharing a prefix are asked in the order given.
        var fallback: (TensorSource, String)?
        for (prefix, source) in self.parts where name.hasPrefix(prefix) {
            let inner = String(name.dropFirst(prefix.count))
            if source.info(inner) != nil { return (source, inner) }
            fallback = fallback ?? (source, inner)
        }
        return fallback
    }

    public func info(_ name: String) -> (dtype: DType, shape: [Int])? { part(name).flatMap { $0.0.info($0.1) } }

    public func tensor(_ name: String) throws -> Tensor {
        guard let (source, inner) = part(name) else { throw SafeTensorsError.missingTensor(file: origin, tensor: name) }
        return try source.tensor(inner)
    }

    public func evict(_ name: String) { if let (source, inner) = part(name) { source.evict(inner) } }
}

