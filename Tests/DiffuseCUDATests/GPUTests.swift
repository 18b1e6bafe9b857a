import DiffuseCore
import DiffuseGraph
import Testing
@testable import DiffuseCUDA

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
        let source = MemorySource()
        var rng = TestRandom(3)
        source.add("w", rng.tensor([64, 32]))
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
        let out = try exe.run(host: ["x": rng.tensor([5, 32])], on: backend)
        #expect(out["y"]?.shape == [5, 64])
        _ = before
    }
}
