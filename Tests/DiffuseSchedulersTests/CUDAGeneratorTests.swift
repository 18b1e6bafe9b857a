import DiffuseCore
import Testing
@testable import DiffuseSchedulers

/// The CUDA generator emulation. Its values were compared once with an H100 (see the report);
/// here: Philox4x32-10 against the Random123 known-answer vectors, and the offset bookkeeping
/// that decides which Philox blocks each call uses.
struct CUDAGeneratorTests {
    @Test func philoxKnownAnswers() {
        // Random123's kat_vectors for philox4x32-10: (counter, key) → output.
        let cases: [((UInt32, UInt32, UInt32, UInt32), (UInt32, UInt32), [UInt32])] = [
            ((0, 0, 0, 0), (0, 0), [0x6627_E8D5, 0xE169_C58D, 0xBC57_AC4C, 0x9B00_DBD8]),
            ((0xFFFF_FFFF, 0xFFFF_FFFF, 0xFFFF_FFFF, 0xFFFF_FFFF), (0xFFFF_FFFF, 0xFFFF_FFFF),
             [0x408F_276D, 0x41C8_3B0E, 0xA20B_C7C6, 0x6D54_51FD]),
            ((0x243F_6A88, 0x85A3_08D3, 0x1319_8A2E, 0x0370_7344), (0xA409_3822, 0x299F_31D0),
             [0xD16C_FE09, 0x94FD_CCEB, 0x5001_E420, 0x2412_6EA1]),
        ]
        for (counter, key, want) in cases {
            let got = Philox4x32.block(counter: counter, key: key)
            #expect([got.0, got.1, got.2, got.3] == want)
        }
    }

    @Test func offsetGrowsByFourPerNormal4Call() {
        let g = TorchCUDAGenerator(seed: 42, multiprocessorCount: 132)
        _ = g.randn([2, 4, 8, 8])  // one curand_normal4 per thread
        #expect(g.offset == 4)
        _ = g.randn([1_200_000])  // more than 4 · 1056 · 256 elements: two calls per thread
        #expect(g.offset == 12)
        let fewerSMs = TorchCUDAGenerator(seed: 42, multiprocessorCount: 2)
        _ = fewerSMs.randn([1, 4, 64, 64])  // 16384 elements on 4096 threads: one call each
        #expect(fewerSMs.offset == 4)
        _ = fewerSMs.randn([1, 4, 64, 65])
        #expect(fewerSMs.offset == 12)
    }

    @Test func drawsAreStandardNormalAndContinue() {
        let g = TorchCUDAGenerator(seed: 7)
        let a = g.randn([4, 64, 64]).toFloatArray(), b = g.randn([4, 64, 64]).toFloatArray()
        #expect(a != b)
        #expect(TorchCUDAGenerator(seed: 7).randn([4, 64, 64]).toFloatArray() == a)
        let mean = a.reduce(0, +) / Float(a.count)
        let variance = a.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Float(a.count)
        #expect(abs(mean) < 0.03 && abs(variance - 1) < 0.05, "mean \(mean), variance \(variance)")
    }
}
