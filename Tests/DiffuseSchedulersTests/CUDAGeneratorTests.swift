import DiffuseCore
import DiffuseGraph
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

    @Test func offsetGrowsByFourPerNormal4Call() throws {
        let g = TorchCUDAGenerator(seed: 42, multiprocessorCount: 132)
        _ = try g.randn([2, 4, 8, 8])  // one curand_normal4 per thread
        #expect(g.offset == 4)
        _ = try g.randn([1_200_000])  // more than 4 · 1056 · 256 elements: two calls per thread
        #expect(g.offset == 12)
        let fewerSMs = TorchCUDAGenerator(seed: 42, multiprocessorCount: 2)
        _ = try fewerSMs.randn([1, 4, 64, 64])  // 16384 elements on 4096 threads: one call each
        #expect(fewerSMs.offset == 4)
        _ = try fewerSMs.randn([1, 4, 64, 65])
        #expect(fewerSMs.offset == 12)
    }

    @Test func drawsAreStandardNormalAndContinue() throws {
        let g = TorchCUDAGenerator(seed: 7)
        let a = try g.randn([4, 64, 64]).toFloatArray(), b = try g.randn([4, 64, 64]).toFloatArray()
        #expect(a != b)
        #expect(try TorchCUDAGenerator(seed: 7).randn([4, 64, 64]).toFloatArray() == a)
        let mean = a.reduce(0, +) / Float(a.count)
        let variance = a.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Float(a.count)
        #expect(abs(mean) < 0.03 && abs(variance - 1) < 0.05, "mean \(mean), variance \(variance)")
    }

    /// A GPU stand-in that records what the generator asks it for.
    final class RecordingDevice: TorchCUDANormalDevice {
        let multiprocessorCount = 2
        let maxThreadsPerMultiprocessor = 1536
        var calls: [(count: Int, seed: UInt64, offset: UInt64, threads: Int)] = []
        func torchNormal(count: Int, seed: UInt64, offset: UInt64, threads: Int) throws -> Tensor {
            calls.append((count, seed, offset, threads))
            return Tensor(shape: [count], floats: (0..<count).map(Float.init))
        }
    }

    @Test func deviceDrawsWithTorchsGridAndOffsets() throws {
        let gpu = RecordingDevice()
        let g = TorchCUDAGenerator(seed: 5, device: gpu)
        #expect(g.isBitExact)
        let a = try g.randn([1, 4, 8, 8])  // 256 elements: one block
        let b = try g.randn([1, 4, 64, 64])  // 16384 elements: 2 SMs · 6 blocks = 3072 threads, two calls each
        #expect(a.shape == [1, 4, 8, 8] && b.shape == [1, 4, 64, 64])
        #expect(b.toFloatArray()[16383] == 16383)
        #expect(gpu.calls.map(\.threads) == [256, 3072])
        #expect(gpu.calls.map(\.offset) == [0, 4])
        #expect(gpu.calls.allSatisfy { $0.seed == 5 })
        #expect(g.offset == 12)
        // The host emulation with the same SM counts keeps the same bookkeeping.
        let host = TorchCUDAGenerator(seed: 5, multiprocessorCount: 2, maxThreadsPerMultiprocessor: 1536)
        _ = try host.randn([1, 4, 8, 8])
        _ = try host.randn([1, 4, 64, 64])
        #expect(host.offset == g.offset && !host.isBitExact)
    }
}
