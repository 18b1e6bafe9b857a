#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// libm in Double, under a namespace so it never collides with `Value`'s methods.
public enum Libm {
    @inlinable public static func exp(_ x: Double) -> Double { Glibc.exp(x) }
    @inlinable public static func log(_ x: Double) -> Double { Glibc.log(x) }
    @inlinable public static func erf(_ x: Double) -> Double { Glibc.erf(x) }
    @inlinable public static func tanh(_ x: Double) -> Double { Glibc.tanh(x) }
    @inlinable public static func sin(_ x: Double) -> Double { Glibc.sin(x) }
    @inlinable public static func cos(_ x: Double) -> Double { Glibc.cos(x) }
}

/// Where each output pixel of a bilinear resize reads along one axis, as ATen's CPU kernel
/// computes it in float32 (`compute_source_index_and_lambda`): the source coordinate
/// `scale·i` (align_corners) or `max(scale·(i + ½) − ½, 0)`, its floor clamped to the last
/// index, the next index unless at the edge, and the two weights. Equal sizes copy.
public struct BilinearTaps: Sendable {
    public var index0: [Int32]
    public var index1: [Int32]
    public var lambda0: [Float]
    public var lambda1: [Float]

    public init(input: Int, output: Int, alignCorners: Bool) {
        index0 = []; index1 = []; lambda0 = []; lambda1 = []
        let scale: Float = alignCorners ? (output > 1 ? Float(input - 1) / Float(output - 1) : 0) : Float(input) / Float(output)
        for i in 0..<output {
            if input == output {
                index0.append(Int32(i)); index1.append(Int32(i)); lambda0.append(1); lambda1.append(0)
                continue
            }
            let source = alignCorners ? scale * Float(i) : Swift.max(scale * (Float(i) + 0.5) - 0.5, 0)
            let i0 = Swift.min(Int(source.rounded(.down)), input - 1)
            let l1 = Swift.min(Swift.max(source - Float(i0), 0), 1)
            index0.append(Int32(i0))
            index1.append(Int32(i0 + (i0 < input - 1 ? 1 : 0)))
            lambda0.append(1 - l1)
            lambda1.append(l1)
        }
    }
}
