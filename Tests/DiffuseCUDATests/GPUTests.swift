import DiffuseCore
import DiffuseGraph
import Testing
import DiffuseCUDA

/// The CUDA backend if a GPU and the CUDA libraries are present, else nil (tests skip).
let gpuBackend: CUDABackend? = {
    do { return try CUDABackend() } catch {
        print("skipping GPU tests: \(error)")
        return nil
    }
}()

@Suite(.serialized) struct GPUTests {
    /// Every op against ReferenceBackend in fp32 (tight), tf32, fp16 and bf16 (loose).
    @Test(.enabled(if: gpuBackend != nil, "no CUDA device"), arguments: OpCases.all)
    func op(_ c: OpCase) throws {
        let backend = try #require(gpuBackend)
        for r in CUDASelfTest.check(c, on: backend) {
            #expect(r.passed, "\(r)")
        }
    }

    @Test(.enabled(if: gpuBackend != nil, "no CUDA device"))
    func linearCombinationAndTransfers() throws {
        let backend = try #require(gpuBackend)
        for r in CUDASelfTest.checkLinearCombination(backend) + CUDASelfTest.checkTransfers(backend) {
            #expect(r.passed, "\(r)")
        }
    }

    /// Graphs of other shapes share the uploaded weights; peak memory is tracked.
    @Test(.enabled(if: gpuBackend != nil, "no CUDA device"))
    func weightsAreSharedAcrossShapes() throws {
        let backend = try #require(gpuBackend)
        let source = InMemoryTensors([("w", randomTensor([64, 32], seed: 3))])
        let weights = ModelWeights(source)
        func graph(_ rows: Int) throws -> Graph {
            let b = GraphBuilder()
            b.output("y", b.input("x", shape: [rows, 32]).linear(b.parameter("w", shape: [64, 32]), nil))
            return try b.finish()
        }
        _ = try backend.compile(graph(3), weights: weights, options: CompileOptions())
        let before = backend.peakMemoryBytes
        let exe = try backend.compile(graph(5), weights: weights, options: CompileOptions())
        #expect(backend.peakMemoryBytes > 0)
        let out = try exe.run(host: ["x": randomTensor([5, 32], seed: 4)], on: backend)
        #expect(out["y"]?.shape == [5, 64])
        _ = before
    }
}

/// Deterministic non-zero data in [-1, 1).
func randomTensor(_ shape: [Int], seed: UInt64) -> Tensor {
    var s = seed &* 0x9E37_79B9_7F4A_7C15 &+ 1
    let t = Tensor(zeros: shape)
    for i in 0..<t.count {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17
        let v = Float(s >> 40) / Float(1 << 24) * 2 - 1
        t.floats[i] = v == 0 ? 0.37 : v
    }
    return t
}
