#if DEBUG
// Internals (index helpers, dtype lowering, argument packing); `@testable` needs a debug build.
import DiffuseCore
#if canImport(Glibc)
import Glibc
#endif
import DiffuseGraph
import Testing
@testable import DiffuseCUDA

@Suite struct InternalTests {
    @Test func collapseMergesContiguousAxes() {
        // A contiguous copy collapses to one axis.
        let (s, st) = collapseAxes([2, 3, 4], [[12, 4, 1], [12, 4, 1]])
        #expect(s == [24] && st == [[1], [1]])
        // A transpose of the last two axes keeps them apart; size-1 axes vanish.
        let (s2, st2) = collapseAxes([2, 1, 4, 3], [[12, 12, 1, 4], [12, 12, 3, 1]])
        #expect(s2 == [2, 4, 3] && st2 == [[12, 1, 4], [12, 3, 1]])
        // Broadcast along the middle axis.
        #expect(broadcastStrides([3, 1, 7], [2, 3, 5, 7]) == [0, 7, 0, 1])
        #expect(broadcastStrides([7], [2, 7]) == [0, 1])
    }

    @Test func stridedStructLayout() throws {
        let bytes = try stridedStruct([2, 3], [[3, 1], [1, 2]])
        #expect(bytes.count == 8 * 25)
        let v = bytes.withUnsafeBytes { raw in (0..<25).map { raw.load(fromByteOffset: $0 * 8, as: Int64.self) } }
        #expect(v[0] == 2)
        #expect(Array(v[1...2]) == [2, 3])
        #expect(Array(v[9...10]) == [3, 1])
        #expect(Array(v[17...18]) == [1, 2])
    }

    @Test func kernelArgsAreAlignedAndPacked() {
        let s: [UInt8] = Array(0..<24)
        let args = KernelArgs([.i32(7), .ptr(0x1234_5678_9abc), .f32(1.5), .bytes(s)])
        #expect(args.count == 4)
        for k in 0..<4 { #expect(Int(bitPattern: args.pointers[k]) % 16 == 0) }
        #expect(args.pointers[0]!.load(as: Int32.self) == 7)
        #expect(args.pointers[1]!.load(as: UInt64.self) == 0x1234_5678_9abc)
        #expect(args.pointers[2]!.load(as: Float.self) == 1.5)
        #expect(args.pointers[3]!.load(fromByteOffset: 23, as: UInt8.self) == 23)
    }

    @Test func loweringAssignsDeviceTypes() throws {
        let b = GraphBuilder()
        let t = b.input("t", shape: [2])
        let ids = b.input("ids", shape: [2, 3], dtype: .int64)
        let w = b.parameter("lin.weight", shape: [4, 8])
        let table = b.parameter("emb.weight", shape: [10, 8])
        let temb = t.timestepEmbedding(TimestepEmbeddingAttributes(dim: 8, flipSinToCos: true, downscaleFreqShift: 0))
        let e = ids.embedding(table).reshape([6, 8])
        b.output("a", temb.linear(w, nil))
        b.output("b", e.linear(w, nil))
        b.output("c", e.cast(.int32))
        let g = lowerForDevice(try b.finish(), activation: .bfloat16, weightStorage: .float16)
        func node(_ name: String) -> Node { g[g.outputs.first { $0.name == name }!.value] }
        // Timesteps stay float32 on the device; embeddings are written in the activation type.
        #expect(g.nodes.contains { if case .input("t") = $0.op { return $0.dtype == .float32 }; return false })
        #expect(g.nodes.contains { if case .timestepEmbedding = $0.op { return $0.dtype == .bfloat16 }; return false })
        // The linear weight is stored in float16 and widened once (shared by both linears).
        #expect(g.nodes.contains { if case .parameter(.named("lin.weight")) = $0.op { return $0.dtype == .float16 }; return false })
        #expect(g.nodes.contains { if case .parameter(.named("emb.weight")) = $0.op { return $0.dtype == .bfloat16 }; return false })
        #expect(g.nodes.filter { if case .cast(.bfloat16) = $0.op { return true }; return false }.count == 1)
        #expect(node("a").dtype == .bfloat16 && node("b").dtype == .bfloat16)
        #expect(node("c").dtype == .int32)
        // Every op's float inputs now have one type per kernel.
        for n in g.nodes {
            switch n.op {
            case .linear: #expect(n.inputs.allSatisfy { g[$0].dtype == .bfloat16 })
            case .embedding: #expect(g[n.inputs[0]].dtype == .int64 && g[n.inputs[1]].dtype == .bfloat16)
            default: break
            }
        }
    }

    @Test func cacheKeyIsStable() {
        #expect(stableHash("abc") == stableHash("abc"))
        #expect(stableHash("abc") != stableHash("abd"))
    }

}
#endif

#if DEBUG
@Suite struct LibrarySearchTests {
    @Test func globPatternsExpandToFolders() throws {
        let base = "/tmp/diffuse-cuda-glob-\(getpid())"
        defer { for d in ["a/lib", "b/lib", "c/other", "a", "b", "c", ""] { rmdir(Files.join(base, d)) } }
        for d in ["a/lib", "b/lib", "c/other"] { try Files.createDirectory(Files.join(base, d)) }
        #expect(DynamicLibrary.expand(base + "/*/lib") == [base + "/a/lib", base + "/b/lib"])
        #expect(DynamicLibrary.expand("/no/wildcard") == ["/no/wildcard"])
        #expect(DynamicLibrary.expand(base + "/*/missing").isEmpty)
    }
}

/// The graphs the GPU self-test runs channels-last, rewritten as the CUDA backend does (fused,
/// then `GraphPasses.channelsLast`), compute what the originals do on the reference interpreter:
/// a wrong layout rule shows here, without a GPU.
@Suite struct ChannelsLastCaseTests {
    static let cases = OpCases.all.filter { $0.flagSets.contains { $0.contains("channels-last") } }

    @Test(arguments: cases)
    func rewriteKeepsValues(_ c: OpCase) throws {
        let (graph, feeds, source) = try c.build()
        let all = Set(UnaryOp.allCases)
        let fused = GraphPasses.fuseEpilogues(GraphPasses.fuseNormActivation(graph, activations: all), activations: all, maxAdds: 4)
        let nhwc = GraphPasses.channelsLast(fused)
        let eligible = graph.nodes.contains { n in
            switch n.op {
            case .conv2d(let a): return a.groups == 1
            case .groupNorm, .upsampleNearest2x: return n.shape.count == 4
            default: return false
            }
        }
        let converted = nhwc.nodes.contains { $0.channelsLast }
        #expect(converted == eligible, "\(c.name): channels-last \(converted), expected \(eligible) (grouped convolutions stay NCHW)")
        let weights = ModelWeights(source)
        let expected = try c.referenceOutputs()
        let got = try ReferenceBackend().compile(nhwc, weights: weights, options: CompileOptions()).run(host: feeds, on: ReferenceBackend())
        for (name, ref) in expected {
            let g = try #require(got[name], "\(c.name): output \(name) missing")
            #expect(g.shape == ref.shape)
            let err = zip(g.toFloatArray(), ref.toFloatArray()).map { abs($0 - $1) }.max() ?? 0
            #expect(err <= 1e-5, "\(c.name): output \(name) differs by \(err)")
        }
    }
}
#endif
