#if canImport(Glibc)
import Glibc
#endif
import DiffuseCore
import DiffuseGraph
@testable import DiffuseModels
import Testing

/// FreeU's Fourier filter, written as a rank-7 projection, against diffusers' definition computed
/// the long way (2-D DFT, fftshift, the central 2x2 block scaled, inverse, real part) on even,
/// odd, 1- and 2-long axes; and the backbone scaling of half the channels.
@Suite struct FreeUTests {
    /// diffusers' `fourier_filter(x, threshold=1, scale)` on one [H, W] plane, in Double.
    static func filteredByDFT(_ x: [Double], h: Int, w: Int, scale: Double) -> [Double] {
        // fftshift puts frequency k at index (k + n/2) mod n, so the block [n/2 − 1, n/2 + 1)
        // (clipped at 0 as Python's slice) holds these frequencies.
        func block(_ n: Int) -> Set<Int> { Set((max(n / 2 - 1, 0)..<(n / 2 + 1)).map { (($0 - n / 2) % n + n) % n }) }
        let (ky, kx) = (block(h), block(w))
        var out = [Double](repeating: 0, count: h * w)
        for u in 0..<h {
            for v in 0..<w {
                var (re, im) = (0.0, 0.0)
                for y in 0..<h {
                    for x0 in 0..<w {
                        let a = -2 * Double.pi * (Double(u * y) / Double(h) + Double(v * x0) / Double(w))
                        re += x[y * w + x0] * cos(a)
                        im += x[y * w + x0] * sin(a)
                    }
                }
                let m = ky.contains(u) && kx.contains(v) ? scale : 1
                for y in 0..<h {
                    for x0 in 0..<w {
                        let a = 2 * Double.pi * (Double(u * y) / Double(h) + Double(v * x0) / Double(w))
                        out[y * w + x0] += m * (re * cos(a) - im * sin(a)) / Double(h * w)
                    }
                }
            }
        }
        return out
    }

    @Test(arguments: [(4, 4), (3, 5), (1, 6), (2, 2), (6, 1), (7, 8)])
    func fourierFilterIsTheDFTs(h: Int, w: Int) throws {
        let b = GraphBuilder()
        let x = b.input("x", shape: [2, 3, h, w])
        b.output("y", FreeU.fourierFilter(x, scale: 0.3))
        let values = (0..<(6 * h * w)).map { Float(sin(Double($0) * 1.7) + 0.4 * cos(Double($0 * $0) * 0.3)) }
        let y = try ReferenceBackend().compile(try b.finish(), weights: nil, options: CompileOptions())
            .run(host: ["x": Tensor(shape: [2, 3, h, w], floats: values)], on: ReferenceBackend())["y"]!.toFloatArray()
        for plane in 0..<6 {
            let range = (plane * h * w)..<((plane + 1) * h * w)
            let want = Self.filteredByDFT(values[range].map(Double.init), h: h, w: w, scale: 0.3)
            for (got, expected) in zip(y[range], want) { #expect(abs(Double(got) - expected) < 1e-5, "\(h)x\(w): \(got) vs \(expected)") }
        }
    }

    /// The first half of the hidden state's channels times b; a skip that is the hidden state
    /// itself (diffusers' in-place write) is scaled before it is filtered; a zero anywhere is off.
    @Test func backboneScalingAndAliasing() throws {
        let b = GraphBuilder()
        let h = b.input("h", shape: [1, 4, 2, 2]), skip = b.input("s", shape: [1, 4, 2, 2])
        let f = FreeU(s1: 1, s2: 1, b1: 3, b2: 5)
        let (scaled, filtered) = f(resolutionIndex: 1, hidden: h, skip: skip)
        let (_, aliased) = f(resolutionIndex: 0, hidden: h, skip: h)
        b.output("scaled", scaled)
        b.output("filtered", filtered)
        b.output("aliased", aliased)
        let ones = Tensor(shape: [1, 4, 2, 2], floats: Array(repeating: 1, count: 16))
        let out = try ReferenceBackend().compile(try b.finish(), weights: nil, options: CompileOptions())
            .run(host: ["h": ones, "s": ones], on: ReferenceBackend())
        #expect(out["scaled"]!.toFloatArray() == Array(repeating: 5, count: 8) + Array(repeating: 1, count: 8))
        #expect(out["filtered"]!.toFloatArray() == ones.toFloatArray(), "scale 1 filters nothing")
        #expect(out["aliased"]!.toFloatArray() == Array(repeating: 3, count: 8) + Array(repeating: 1, count: 8))
        #expect(!FreeU(s1: 0.9, s2: 0, b1: 1.5, b2: 1.6).isEnabled)
        let untouched = FreeU(s1: 0.9, s2: 0, b1: 1.5, b2: 1.6)(resolutionIndex: 0, hidden: h, skip: skip)
        #expect(untouched.hidden.id == h.id && untouched.skip.id == skip.id)
    }
}
