#if canImport(Glibc)
import Glibc
#endif
import DiffuseCore
import DiffuseGraph
import Testing
@testable import DiffuseSchedulers

/// Row `i` of a stacked golden tensor, without its leading axis.
func row(_ t: Tensor, _ i: Int) -> Tensor {
    t.slice(i..<(i + 1)).reshaped(Array(t.shape.dropFirst()))
}

func host(_ x: DeviceTensor) throws -> Tensor { try x.toHost() }

/// max |a - b| over all elements, and max |b|.
func maxErrors(_ a: Tensor, _ b: Tensor) -> (error: Double, scale: Double) {
    var error = 0.0, scale = 0.0
    for i in 0..<b.count {
        error = max(error, abs(a.element(i) - b.element(i)))
        scale = max(scale, abs(b.element(i)))
    }
    return (error, scale)
}

/// max |x| over all elements.
func maxAbs(_ x: Tensor) -> Double { (0..<x.count).reduce(0) { max($0, abs(x.element($1))) } }

/// The README's rule: max abs error ≤ tolerance × max(1, max|ref|). `inputScale` raises the scale
/// to the magnitude of what the result was computed from, where that is larger: float32 rounding
/// is relative to the largest operand, so a step that cancels a large sample down to a small
/// result (σ_max = 4096 after a zero-SNR rescale) carries the sample's rounding in diffusers too.
func expectClose(_ got: Tensor, _ want: Tensor, tolerance: Double, inputScale: Double = 0, _ what: String,
                 sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(got.shape == want.shape, "\(what): shape \(got.shape) != \(want.shape)", sourceLocation: sourceLocation)
    guard got.shape == want.shape else { return }
    let (error, refScale) = maxErrors(got, want)
    let scale = max(refScale, inputScale)
    #expect(error <= tolerance * max(1, scale),
            "\(what): max abs error \(error) > \(tolerance) × max(1, \(scale))", sourceLocation: sourceLocation)
}

/// Element by element, each against its own magnitude (schedules: timesteps, sigmas).
func expectCloseEach(_ got: [Double], _ want: Tensor, tolerance: Double, _ what: String,
                     sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(got.count == want.count, "\(what): \(got.count) values, golden has \(want.count)", sourceLocation: sourceLocation)
    guard got.count == want.count else { return }
    for i in 0..<want.count {
        let r = want.element(i)
        if !(abs(got[i] - r) <= tolerance * max(1, abs(r))) {
            Issue.record("\(what)[\(i)]: \(got[i]) vs golden \(r)", sourceLocation: sourceLocation)
            return
        }
    }
}

/// A float tensor of `shape` with values from a fixed, non-trivial sequence.
func patternTensor(_ shape: [Int], seed: Double = 0.37) -> Tensor {
    let n = shape.reduce(1, *)
    let values: [Float] = (0..<n).map { i in
        let angle = Double(i) * 1.7 + seed
        return Float(sin(angle) * 1.3 + 0.1)
    }
    return Tensor(shape: shape, floats: values)
}
