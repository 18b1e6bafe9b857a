import DiffuseCore

/// A `DeviceTensor` in host memory: what the CPU and reference backends hand out.
public final class HostTensor: DeviceTensor {
    public let tensor: Tensor
    public init(_ tensor: Tensor) { self.tensor = tensor }
    public var shape: [Int] { tensor.shape }
    public var dtype: DType { tensor.dtype }
    public func toHost() throws -> Tensor { tensor }
}

/// Errors a backend raises while compiling or running a graph.
public struct BackendError: Error, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

extension Graph {
    /// Checks feeds against the graph's inputs: every input present, shapes equal.
    public func checkFeeds<T>(_ feeds: [String: T], shape: (T) -> [Int]) throws {
        for (name, v) in inputs {
            guard let f = feeds[name] else { throw BackendError("missing input '\(name)'") }
            guard shape(f) == self[v].shape else {
                throw BackendError("input '\(name)' has shape \(shape(f)), the graph expects \(self[v].shape)")
            }
        }
        for k in feeds.keys where !inputs.contains(where: { $0.name == k }) {
            throw BackendError("unknown input '\(k)' (the graph takes \(inputs.map(\.name).sorted().joined(separator: ", ")))")
        }
    }
}

/// Shared elementwise math, written once so every backend's reference numbers agree.
public enum ScalarMath {
    @inlinable public static func apply(_ op: UnaryOp, _ x: Double) -> Double {
        switch op {
        case .silu: return x / (1 + Libm.exp(-x))
        case .gelu: return 0.5 * x * (1 + Libm.erf(x / 2.0.squareRoot()))
        case .geluTanh:
            let c = (2 / Double.pi).squareRoot()
            return 0.5 * x * (1 + Libm.tanh(c * (x + 0.044715 * x * x * x)))
        case .quickGelu: return x / (1 + Libm.exp(-1.702 * x))
        case .relu: return max(x, 0)
        case .tanh: return Libm.tanh(x)
        case .sigmoid: return 1 / (1 + Libm.exp(-x))
        case .exp: return Libm.exp(x)
        case .neg: return -x
        case .sqrt: return x.squareRoot()
        case .rsqrt: return 1 / x.squareRoot()
        case .square: return x * x
        case .abs: return Swift.abs(x)
        }
    }

    @inlinable public static func apply(_ op: BinaryOp, _ a: Double, _ b: Double) -> Double {
        switch op {
        case .add: return a + b
        case .sub: return a - b
        case .mul: return a * b
        case .div: return a / b
        }
    }

    /// diffusers' `get_timestep_embedding`. The frequencies and arguments are rounded to
    /// float32 exactly where torch computes them in float32, so sin/cos of arguments near 1000
    /// agree with torch to an ulp instead of differing by the argument's rounding.
    public static func timestepEmbedding(_ t: Float, _ a: TimestepEmbeddingAttributes) -> [Float] {
        let half = a.dim / 2
        var out = [Float](repeating: 0, count: a.dim)
        let logMax = Float(Libm.log(Double(a.maxPeriod)))
        for i in 0..<half {
            let exponent = (-logMax * Float(i)) / (Float(half) - a.downscaleFreqShift)
            let freq = Float(Libm.exp(Double(exponent)))
            let arg = a.scale * (t * freq)
            let s = Float(Libm.sin(Double(arg))), c = Float(Libm.cos(Double(arg)))
            if a.flipSinToCos { out[i] = c; out[half + i] = s } else { out[i] = s; out[half + i] = c }
        }
        return out
    }
}
