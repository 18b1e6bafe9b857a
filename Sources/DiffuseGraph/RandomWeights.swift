import DiffuseCore

/// Seeded random weights for a model's declared parameters, made on demand, so benchmarks run
/// the real architectures without downloading anything. Values follow torch's default
/// initialisation closely enough that activations stay in range: linear and conv weights
/// uniform in ±1/√fan_in, biases small, norm weights 1 and norm biases 0.
/// Each tensor depends only on (seed, name), never on the order tensors are asked for.
public final class RandomWeights: TensorSource {
    public let seed: UInt64
    public let dtype: DType
    private let shapes: [String: [Int]]
    public let tensorNames: [String]
    public var origin: String { "random weights (seed \(seed))" }

    public init(parameters: [(name: String, shape: [Int])], seed: UInt64 = 0, dtype: DType = .float32) {
        self.seed = seed
        self.dtype = dtype
        var shapes: [String: [Int]] = [:]
        for p in parameters { shapes[p.name] = p.shape }
        self.shapes = shapes
        tensorNames = parameters.map(\.name)
    }

    public func info(_ name: String) -> (dtype: DType, shape: [Int])? { shapes[name].map { (dtype, $0) } }

    public func tensor(_ name: String) throws -> Tensor {
        guard let shape = shapes[name] else { throw SafeTensorsError.missingTensor(file: origin, tensor: name) }
        let t = Tensor(zeros: shape, dtype: .float32)
        let n = t.count
        let isNorm = name.contains("norm") || name.contains("ln_")
        if shape.count == 1 && isNorm {
            // BatchNorm's statistics start as torch's: mean 0, variance 1.
            if name.hasSuffix(".weight") || name.hasSuffix("running_var") { for i in 0..<n { t.floats[i] = 1 } }
            return dtype == .float32 ? t : t.converted(to: dtype)
        }
        let fanIn = shape.count > 1 ? shape.dropFirst().reduce(1, *) : max(shape[0], 1)
        let bound: Float = shape.count == 1 ? 0.02 : name.contains("embedding") ? 0.03 : 1 / Float(fanIn).squareRoot()
        var h: UInt64 = seed &* 0x9E37_79B9_7F4A_7C15
        for b in name.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01B3 }
        let base = h
        let p = t.floats
        Parallel.chunks(n, grain: 1 << 16) { range in
            // splitmix64 per chunk start: deterministic whatever the thread count.
            var state = base &+ UInt64(range.lowerBound) &* 0x9E37_79B9_7F4A_7C15
            for i in range {
                state &+= 0x9E37_79B9_7F4A_7C15
                var z = state
                z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
                z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
                z ^= z >> 31
                let u = Float(z >> 40) * (1 / Float(1 << 24))  // [0, 1)
                p[i] = (2 * u - 1) * bound
            }
        }
        return dtype == .float32 ? t : t.converted(to: dtype)
    }
}
