import DiffuseCore
import DiffuseGraph

/// Latent arithmetic on the host: each output element is `Σ cᵢ·xᵢ` accumulated in double and
/// rounded once to float32. Tensors of other backends are copied to the host first.
public struct HostAlgebra: LatentAlgebra {
    public init() {}

    private func host(_ x: DeviceTensor) throws -> Tensor {
        let t = try (x as? HostTensor)?.tensor ?? x.toHost()
        return t.dtype == .float32 ? t : t.converted(to: .float32)
    }

    public func combine(_ terms: [(Double, DeviceTensor)]) throws -> DeviceTensor {
        guard let first = terms.first else { throw SchedulerError.shapeMismatch(detail: "a combination needs at least one term") }
        let inputs = try terms.map { try host($0.1) }
        for (i, t) in inputs.enumerated() where t.shape != first.1.shape {
            throw SchedulerError.shapeMismatch(detail: "term \(i) has shape \(t.shape), term 0 has \(first.1.shape)")
        }
        let out = Tensor(zeros: first.1.shape, dtype: .float32)
        let dst = out.floats
        let sources = inputs.map { $0.floats }
        let coefficients = terms.map(\.0)
        withExtendedLifetime(inputs) {  // `sources` points into them
            Parallel.chunks(out.count, grain: 4096) { range in
                for e in range {
                    var sum = 0.0
                    for (c, src) in zip(coefficients, sources) { sum += c * Double(src[e]) }
                    dst[e] = Float(sum)
                }
            }
        }
        return HostTensor(out)
    }

    public func upload(_ host: Tensor) throws -> DeviceTensor { HostTensor(host) }

    public func clamp(_ x: DeviceTensor, min lower: Double, max upper: Double) throws -> DeviceTensor {
        let t = try host(x)
        let out = Tensor(zeros: t.shape, dtype: .float32)
        let lo = Float(lower), hi = Float(upper)
        for i in 0..<t.count { out.floats[i] = Swift.min(Swift.max(t.floats[i], lo), hi) }
        return HostTensor(out)
    }
}

/// A backend's latent arithmetic: `combine` is the backend's one-op `linearCombination`.
/// `clamp`, which only `clip_sample: true` configs need, goes through the host (a device sync
/// per step) because backends have no clamp op.
public struct BackendAlgebra: LatentAlgebra {
    public let backend: Backend

    public init(_ backend: Backend) { self.backend = backend }

    public func combine(_ terms: [(Double, DeviceTensor)]) throws -> DeviceTensor {
        try backend.linearCombination(terms)
    }

    public func upload(_ host: Tensor) throws -> DeviceTensor { try backend.upload(host) }

    public func clamp(_ x: DeviceTensor, min: Double, max: Double) throws -> DeviceTensor {
        let clamped = try HostAlgebra().clamp(HostTensor(try x.toHost()), min: min, max: max)
        return try backend.upload(try clamped.toHost())
    }
}
