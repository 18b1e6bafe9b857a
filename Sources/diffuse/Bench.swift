import ArgumentParser
import DiffuseCore
import DiffuseCPU
import DiffuseGraph

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure latency, throughput and memory of the engine's kernels and models.")

    @Flag(help: "Benchmark single ops (conv, matmul, group norm, attention) instead of models.")
    var ops = false

    @Option(help: "Timed repetitions (the median is reported).")
    var reps = 5

    @Option(help: "Attention path: fused, math, or sliced:N.")
    var attention = "fused"

    @Flag(help: "Print one JSON object {\"rows\": [...]} instead of a table.")
    var json = false

    func run() throws {
        let backend = try CPUBackend()
        var options = CompileOptions()
        options.attention = try parseAttention(attention)
        if ops {
            let rows = try OpsBench.run(backend: backend, options: options, reps: reps)
            if json {
                print(JSON.object([("device", .string(backend.deviceDescription)), ("rows", .array(rows.map(\.json)))]).serialized(pretty: true))
            } else {
                print("device: \(backend.deviceDescription)")
                print(pad("op", 12) + pad("shape", 44) + pad("median", 12) + "rate")
                for r in rows {
                    let rate = r.flops.map { String(format1($0 / r.median / 1e9)) + " GFLOP/s" }
                        ?? r.bytes.map { String(format1($0 / r.median / 1e9)) + " GB/s" } ?? ""
                    print(pad(r.op, 12) + pad(r.shape, 44) + pad(format1(r.median * 1000) + " ms", 12) + rate)
                }
            }
            return
        }
        throw ValidationError("model benchmarks are not implemented yet; use --ops")
    }
}

func parseAttention(_ s: String) throws -> AttentionImplementation {
    switch s {
    case "fused": return .fused
    case "math": return .math
    default:
        if s.hasPrefix("sliced:"), let n = Int(s.dropFirst(7)), n > 0 { return .sliced(n) }
        throw ValidationError("unknown attention '\(s)': use fused, math or sliced:N")
    }
}

func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s + " " : s + String(repeating: " ", count: n - s.count) }

func format1(_ x: Double) -> String {
    let r = (x * 10).rounded() / 10
    return r == r.rounded() ? String(Int(r)) + ".0" : String(r)
}
