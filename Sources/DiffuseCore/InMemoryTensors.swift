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
