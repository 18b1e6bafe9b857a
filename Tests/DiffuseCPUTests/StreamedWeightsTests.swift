import DiffuseCore
import DiffuseCPU
import DiffuseGraph
import Testing

/// Resident bytes of this process's mappings of spill files, from /proc/self/smaps.
func spilledResidentBytes() throws -> Int {
    let smaps = try Files.readText("/proc/self/smaps")
    var inSpill = false, kb = 0
    for line in smaps.split(separator: "\n") {
        let fields = line.split(separator: " ", omittingEmptySubsequences: true)
        if let first = fields.first, first.contains("-"), first.first?.isHexDigit == true {
            inSpill = line.contains("diffuse-weights-")
        } else if inSpill, fields.first == "Rss:", fields.count >= 2 {
            kb += Int(fields[1]) ?? 0
        }
    }
    return kb * 1024
}

@Suite("Streamed weights (sequential offload on the CPU)")
struct StreamedWeightsTests {
    /// The same graph with weights in memory and streamed from the spill file: identical
    /// outputs (the same primitives read the same bytes), the large weights written to the file,
    /// and none of their pages left in the process after a run.
    @Test("conv, linear, int8 linear and embedding read spilled weights; nothing stays resident")
    func streamed() throws {
        let b = GraphBuilder()
        let x = b.input("x", shape: [1, 128, 8, 8]), t = b.input("t", shape: [16, 1024])
        let ids = b.input("ids", shape: [5], dtype: .int32)
        let p = Params(b)
        b.output("conv", x.conv2d(p.weight("cw", [256, 128, 3, 3]), p.weight("cb", [256]), padding: 1).silu())
        b.output("lin", t.linear(p.weight("lw", [2048, 1024]), p.weight("lb", [2048])).gelu())
        b.output("emb", ids.embedding(p.weight("table", [2048, 256])))
        let graph = try b.finish()
        let params: [(String, Tensor)] = [
            ("cw", randomTensor([256, 128, 3, 3], seed: 1, scale: 0.05)), ("cb", randomTensor([256], seed: 2)),
            ("lw", randomTensor([2048, 1024], seed: 3, scale: 0.03)), ("lb", randomTensor([2048], seed: 4)),
            ("table", randomTensor([2048, 256], seed: 5)),
        ]
        let feeds = ["x": randomTensor([1, 128, 8, 8], seed: 6), "t": randomTensor([16, 1024], seed: 7),
                     "ids": Tensor(shape: [5], dtype: .int32, values: [Int32(0), 2047, 9, 1000, 9])]
        let cpu = try CPUBackend()
        let quantized = GraphPasses.quantizeLinears(GraphPasses.fuseForCPU(graph), filter: { _, _, _ in true })
        for (label, g) in [("float", graph), ("int8", quantized)] {
            let weights = ModelWeights(InMemoryTensors(params))
            let want = try cpu.compile(g, weights: weights, options: CompileOptions()).run(host: feeds, on: cpu)
            let streamed = try cpu.compile(g, weights: weights, options: CompileOptions(flags: ["sequential-offload"]))
            for run in 0..<2 {
                let got = try streamed.run(host: feeds, on: cpu)
                for (name, w) in want {
                    #expect(got[name]!.toFloatArray() == w.toFloatArray(), "\(label) \(name), run \(run): streamed differs")
                }
                #expect(try spilledResidentBytes() == 0, "\(label) run \(run): spilled weights still resident")
            }
            let file = weights.prepared("cpu.spill-file") { () -> SpillFile in
                Issue.record("\(label): the backend made no spill file")
                return try! SpillFile()
            }
            // conv (1.2 MB), linear (8 MB fp32 or 2 MB int8) and table (2 MB) each ≥ 1 MiB.
            let expected = label == "float" ? (256 * 128 * 9 + 2048 * 1024 + 2048 * 256) * 4 : (256 * 128 * 9 + 2048 * 256) * 4 + 2048 * 1024
            #expect(file.bytes >= expected, "\(label): \(file.bytes) bytes spilled, expected at least \(expected)")
        }
    }

    @Test("a spill directory that cannot be used is named in the error")
    func badDirectory() throws {
        do {
            _ = try SpillFile(directory: "/nonexistent/diffuse-spill")
            Issue.record("no error for a missing directory")
        } catch let e as SpillError {
            #expect(e.description.contains("/nonexistent/diffuse-spill"))
            #expect(e.description.contains("DIFFUSE_SPILL_DIR"))
        }
    }
}
