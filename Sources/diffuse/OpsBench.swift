import DiffuseCore
import DiffuseCPU
import DiffuseGraph

/// Single-op microbenchmarks: the kernels the UNet spends its time in, at SD 1.5 512x512 sizes.
/// Each graph applies its op `chain` times in a row (same weights), so the per-run copy of the
/// input in and the output out is spread over many ops; rows report the time of one op.
enum OpsBench {
    static let chain = 8

    struct Row {
        var op: String
        var shape: String
        var times: [Double]
        var flops: Double?
        var bytes: Double?

        var median: Double { times.sorted()[times.count / 2] }

        var json: JSON {
            var m: [(String, JSON)] = [("op", .string(op)), ("shape", .string(shape)),
                                       ("median_s", .number(median)), ("min_s", .number(times.min()!)),
                                       ("max_s", .number(times.max()!))]
            if let f = flops { m.append(("gflops", .number((f / median / 1e9 * 10).rounded() / 10))) }
            if let b = bytes { m.append(("gbps", .number((b / median / 1e9 * 10).rounded() / 10))) }
            return .object(m)
        }
    }

    /// `body` applied `chain` times, each to the previous result.
    static func repeated(_ x: Value, _ body: (Value) -> Value) -> Value {
        (0..<chain).reduce(x) { v, _ in body(v) }
    }

    static func time(_ graph: Graph, weights: ModelWeights, feeds: [String: Tensor], backend: Backend,
                     options: CompileOptions, reps: Int) throws -> [Double] {
        let exe = try backend.compile(graph, weights: weights, options: options)
        let device = try feeds.mapValues { try backend.upload($0) }
        let t0 = now()
        _ = try exe.run(device)  // warm-up: first-touch of the arena, oneDNN's JIT
        if Files.environment("DIFFUSE_BENCH_TRACE") != nil { Log.info("warm-up \(now() - t0) s") }
        return try (0..<reps).map { _ in
            let t0 = now()
            _ = try exe.run(device)
            try backend.synchronize()
            return (now() - t0) / Double(chain)
        }
    }

    static func run(backend: Backend, options: CompileOptions, reps: Int) throws -> [Row] {
        var rows: [Row] = []
        func graph(_ inputs: [(String, [Int])], params: [(String, [Int])], _ body: (GraphBuilder, [Value], Params) -> Value)
            throws -> (Graph, ModelWeights, [String: Tensor]) {
            let b = GraphBuilder()
            let ins = inputs.map { b.input($0.0, shape: $0.1) }
            b.output("out", body(b, ins, Params(b)))
            let weights = ModelWeights(RandomWeights(parameters: params, seed: 1))
            let feeds = Dictionary(uniqueKeysWithValues: inputs.enumerated().map { i, p in
                (p.0, try! RandomWeights(parameters: [(p.0, p.1)], seed: UInt64(10 + i)).tensor(p.0))
            })
            return (try b.finish(), weights, feeds)
        }

        // 3x3 convolution, N=2, 320 -> 320 channels at 64x64 (SD 1.5's first level at 512x512).
        let (cg, cw, cf) = try graph([("x", [2, 320, 64, 64])], params: [("w", [320, 320, 3, 3]), ("b", [320])]) { _, x, p in
            repeated(x[0]) { $0.conv2d(p.weight("w", [320, 320, 3, 3]), p.weight("b", [320]), padding: 1) }
        }
        rows.append(Row(op: "conv2d 3x3", shape: "2x320x64x64 -> 320", times: try time(cg, weights: cw, feeds: cf, backend: backend, options: options, reps: reps),
                        flops: cg.flops / Double(chain)))

        let (mg, mw, mf) = try graph([("x", [4096, 320])], params: [("w", [320, 320])]) { _, x, p in
            repeated(x[0]) { $0.linear(p.weight("w", [320, 320]), nil) }
        }
        rows.append(Row(op: "matmul", shape: "4096x320 @ 320x320", times: try time(mg, weights: mw, feeds: mf, backend: backend, options: options, reps: reps),
                        flops: mg.flops / Double(chain)))

        let (gg, gw, gf) = try graph([("x", [2, 320, 64, 64])], params: [("norm.weight", [320]), ("norm.bias", [320])]) { _, x, p in
            repeated(x[0]) { $0.groupNorm(groups: 32, eps: 1e-5, weight: p.weight("norm.weight", [320]), bias: p.weight("norm.bias", [320])) }
        }
        rows.append(Row(op: "group_norm", shape: "2x320x64x64, 32 groups", times: try time(gg, weights: gw, feeds: gf, backend: backend, options: options, reps: reps),
                        bytes: Double(2 * 2 * 320 * 64 * 64 * 4)))

        for keys in [77, 4096] {
            let (ag, aw, af) = try graph([("q", [2, 4096, 320]), ("k", [2, keys, 320]), ("v", [2, keys, 320])], params: []) { _, x, _ in
                repeated(x[0]) { $0.attention(x[1], x[2], heads: 8) }
            }
            rows.append(Row(op: "attention", shape: "2x8 heads, 4096 queries, \(keys) keys, d 40",
                            times: try time(ag, weights: aw, feeds: af, backend: backend, options: options, reps: reps),
                            flops: ag.flops / Double(chain)))
        }
        return rows
    }
}
