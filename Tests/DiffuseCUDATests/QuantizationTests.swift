#if DEBUG
// The host half of the quantized linears (weight quantization, E4M3 and int8 rounding), the
// self-test's tolerances and the kernels' compilation for pre-Ada GPUs, checked without a GPU.
import DiffuseCore
import DiffuseGraph
import Testing
@testable import DiffuseCUDA

@Suite struct QuantizationTests {
    /// The value of an E4M3 code (0x7F and 0xFF are NaN).
    static func decodeE4M3(_ code: UInt8) -> Float {
        let sign: Float = code & 0x80 != 0 ? -1 : 1
        let e = Int(code >> 3) & 15, m = Float(code & 7)
        if e == 15 && m == 7 { return .nan }
        return sign * (e == 0 ? m * 0x1p-9 : (1 + m / 8) * Float(sign: .plus, exponent: e - 7, significand: 1))
    }

    /// The nearest E4M3 code by search (ties to the even code), beyond ±448 saturated.
    static func nearestE4M3(_ v: Float) -> UInt8 {
        let a = min(abs(v), 448)
        var best: UInt8 = 0
        var bestError = Float.infinity
        for c in UInt8(0)...0x7E {
            let e = abs(decodeE4M3(c) - a)
            if e < bestError || (e == bestError && c & 1 == 0) { best = c; bestError = e }
        }
        return (v.sign == .minus ? 0x80 : 0) | best
    }

    @Test func e4m3RoundsToNearestEvenAndSaturates() {
        let codes = (UInt8(0)...0x7E).map(Self.decodeE4M3)
        var values = codes + zip(codes, codes.dropFirst()).map { ($0 + $1) / 2 }  // exact values and ties
        var rng = TestRandom(42)
        for _ in 0..<4000 { values.append(rng.uniform(-500, 500)) }
        for _ in 0..<4000 { values.append(rng.uniform(-0.03, 0.03)) }
        values += [449, 464, 1e6, .infinity, 0x1p-10, 0x1p-6 - 0x1p-12]
        for v in values + values.map({ -$0 }) {
            #expect(HostQuantizer.e4m3(v) == Self.nearestE4M3(v), "e4m3(\(v))")
        }
        #expect(HostQuantizer.e4m3(.nan) & 0x7F == 0x7F)
    }

    @Test func int8RoundsToNearestEvenAndClamps() {
        for v in stride(from: Float(-131), through: 131, by: 0.125) {
            #expect(Int(HostQuantizer.int8(v)) == Int(max(-127, min(127, v.rounded(.toNearestOrEven)))), "int8(\(v))")
        }
    }

    /// Each weight row to its own scale; padding rows and columns zero.
    @Test(arguments: [Quantization.dynamicInt8, .fp8])
    func weightsArePerChannelAndPadded(_ q: Quantization) {
        var rng = TestRandom(7)
        var w = rng.tensor([5, 37], -0.3, 0.3)
        let values = w.toFloatArray()
        w = Tensor(shape: [5, 37], floats: values.enumerated().map { $0.offset / 37 == 3 ? 0 : $0.element })  // an all-zero row
        let (quantized, scales) = HostQuantizer.quantize(w, as: q, rows: 16, columns: 48)
        let level = QuantizedLinear.maxLevel(q)
        let bytes = quantized.pointer(as: UInt8.self)
        #expect(quantized.shape == [16, 48] && scales.count == 16)
        for r in 0..<16 {
            let row = r < 5 ? Array(w.toFloatArray()[(r * 37)..<(r * 37 + 37)]) : []
            let m = row.map(abs).max() ?? 0
            #expect(scales[r] == m / level)
            for c in 0..<48 {
                let b = bytes[r * 48 + c]
                guard r < 5, c < 37 else { #expect(b == 0, "padding [\(r), \(c)]"); continue }
                let back = (q == .fp8 ? Self.decodeE4M3(b) : Float(Int8(bitPattern: b))) * scales[r]
                // Half a step: int8 steps are the scale; E4M3's are 1/8 of the binade (2⁻⁹ below 2⁻⁶).
                let x = row[c] / max(scales[r], .leastNonzeroMagnitude)
                let binade = x == 0 ? 0 : Float(sign: .plus, exponent: abs(x).exponent - 3, significand: 1)
                let step = q == .fp8 ? max(binade, 0x1p-9) : 1
                #expect(abs(back - row[c]) <= step / 2 * scales[r] * 1.0001, "w[\(r), \(c)]")
            }
            // The row's largest magnitude lands on the largest level.
            if m > 0, let big = row.firstIndex(where: { abs($0) == m }) {
                let b = bytes[r * 48 + big]
                #expect(abs(q == .fp8 ? Self.decodeE4M3(b) : Float(Int8(bitPattern: b))) == level)
            }
        }
    }

    /// x with every row (last axis) quantized and dequantized as the GPU does.
    static func fakeQuantized(_ t: Tensor, _ q: Quantization) -> Tensor {
        let k = t.shape.last!, rows = t.count / k
        let (values, scales) = HostQuantizer.quantize(Tensor(shape: [rows, k], floats: t.toFloatArray()), as: q, rows: rows, columns: k)
        let bytes = values.pointer(as: UInt8.self)
        let out = (0..<(rows * k)).map { i in
            (q == .fp8 ? decodeE4M3(bytes[i]) : Float(Int8(bitPattern: bytes[i]))) * scales[i / k]
        }
        return Tensor(shape: t.shape, floats: out)
    }

    /// The GPU's quantized result, emulated on the host (activations and weights quantized and
    /// dequantized, then the float reference), stays within half the self-test's tolerance, so
    /// that tolerance fits the quantization with room for the device's float rounding.
    @Test(arguments: OpCases.quantizedLinears)
    func selfTestToleranceFitsTheQuantization(_ c: OpCase) throws {
        let (graph, feeds, source) = try c.build()
        let expected = try c.referenceOutputs()
        var quantizedFeeds = feeds
        for n in graph.nodes {
            guard case .linear(let a) = n.op, a.quantization != .none else { continue }
            guard case .input(let x) = graph[n.inputs[0]].op, case .parameter(.named(let w)) = graph[n.inputs[1]].op else {
                Issue.record("\(c.name): a quantized linear whose operands are not an input and a parameter")
                return
            }
            quantizedFeeds[x] = Self.fakeQuantized(feeds[x]!, a.quantization)
            source.tensors[w] = Self.fakeQuantized(source.tensors[w]!, a.quantization)
        }
        let exe = try ReferenceBackend().compile(graph, weights: ModelWeights(source), options: CompileOptions())
        let got = try exe.run(host: quantizedFeeds, on: ReferenceBackend())
        let tolerance = try #require(c.tolerance)
        for (name, ref) in expected {
            let error = CUDASelfTest.relativeError(try #require(got[name]), ref)
            #expect(error > 0 && error <= tolerance / 2, "\(c.name): emulated error \(error), tolerance \(tolerance)")
        }
    }

    @Test func chunkRowsFlagSplitsEvenly() {
        let l = QuantizedLinear.Layout(m: 45, n: 40, k: 96, flags: ["quantize-chunk-rows=16"])
        #expect(l.rowsPerChunk == 15 && l.kPadded == 96 && l.nPadded == 48)
        #expect(l.scalesOffset % 256 == 0 && l.productOffset % 256 == 0)
        #expect(l.productOffset >= l.scalesOffset + 15 * 4 && l.scratchBytes == l.productOffset + 15 * 48 * 4)
        let whole = QuantizedLinear.Layout(m: 8192, n: 2560, k: 320, flags: [])
        #expect(whole.rowsPerChunk * (whole.kPadded + 4 + whole.nPadded * 4) <= QuantizedLinear.scratchBudget)
        #expect((8192 + whole.rowsPerChunk - 1) / whole.rowsPerChunk == 2)
    }

    /// The fp8 conversion is an sm_89 instruction behind `#if __CUDA_ARCH__ >= 890`: the family
    /// still compiles for Ampere, with every entry point.
    @Test(.enabled(if: nvrtcCompiler != nil, "NVRTC not found (set DIFFUSE_CUDA_LIBS)"), arguments: [80, 86, 89])
    func quantizeKernelsCompileFor(_ architecture: Int) throws {
        let compiler = try KernelCompiler(architecture: architecture, cacheFolder: nil)
        let cubin = try compiler.cubin(.quantize, storage: .float16)
        let text = String(decoding: cubin, as: UTF8.self)
        for name in KernelFamily.quantize.kernelNames {
            #expect(text.contains(name), "sm_\(architecture): \(name) missing")
        }
    }
}
#endif
