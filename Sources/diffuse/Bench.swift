import ArgumentParser
import DiffuseCore
import DiffuseCPU
import DiffuseGraph
import DiffusePipelines
import DiffuseSchedulers

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure latency, throughput, memory and error of each speed/memory technique on real architectures.",
        discussion: """
            Without --model, the architecture's real configs run with seeded random weights (timings do \
            not depend on weight values). Rows: setup, median latency, speed-up against the first setup, \
            GFLOP/s, peak resident memory (and GPU memory), and the output's error against the first setup.
            """)

    @Flag(help: "Benchmark single ops (conv, matmul, group norm, attention) instead of a model.")
    var ops = false

    @Option(help: "Built-in architecture: sd15, sd21, sd21-base, sdxl-base, sdxl-turbo, bksdm-small, bksdm-tiny.")
    var architecture = "sd15"

    @Option(help: "Benchmark a real model instead (folder, repo id, or .safetensors).")
    var model: String?

    @Option(help: "unet, vae, taesd, text-encoder, depth-estimator (the model's DPT, else DPT-Hybrid's architecture at 384x384), safety-checker (the model's, else SD 1.x's CLIP ViT-L/14 checker, on images of --size) or pipeline.")
    var component = "unet"

    @Option(help: "Image size WxH.")
    var size = "512x512"

    @Option(help: "Denoising steps (pipeline component).")
    var steps = 20

    @Option(help: "Sampler of the pipeline component: \(SchedulerName.allCases.map(\.rawValue).joined(separator: ", ")).")
    var scheduler = "ddim"

    @Option(help: "Batch (default: 2 for the UNet, as with guidance; 1 otherwise).")
    var batch: Int?

    @Option(help: "Comma-separated setups; the first is the baseline (default: baseline,fused-attention,compiled,fused-qkv,int8 on the CPU; fp32,tf32,fp16,bf16 on CUDA).")
    var setups: String?

    @Option(help: "Timed repetitions (the median is reported).")
    var reps = 3

    @Flag(help: "Print one JSON object {\"rows\": [...]} instead of a table.")
    var json = false

    @OptionGroup var runtime: RuntimeOptions

    func run() throws {
        let backend = try runtime.backend()
        if ops {
            try runOps(backend)
            return
        }
        guard let component = Benchmark.Component(rawValue: self.component) else {
            throw ValidationError("unknown component '\(self.component)': use \(Benchmark.Component.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        let (w, h) = try parseSize(size)
        let names = (setups ?? (backend.name == "cpu" ? "baseline,fused-attention,compiled,fused-qkv,int8" : "fp32,tf32,fp16,bf16"))
            .split(separator: ",").map(String.init)
        let setupList = try names.map { try Benchmark.Setup.named($0, backend: backend.name) }
        // Without a model the depth estimator is DPT-Hybrid's architecture, whatever --architecture says.
        let architectureName = model ?? (component == .depthEstimator ? "dpt-hybrid-midas" : architecture)
        let makeComponents: () throws -> StableDiffusionComponents
        if let model {
            makeComponents = { try StableDiffusionComponents.load(model) }
        } else {
            let arch = try EmbeddedArchitecture.parse(architecture, pipelinesOnly: true)
            makeComponents = { try StableDiffusionComponents.randomWeights(arch, seed: 1) }
        }
        var request = Benchmark.Request(component: component, architecture: architectureName, width: w, height: h, steps: steps,
                                        batch: batch, reps: reps, setups: setupList)
        request.scheduler = try SchedulerName(parsing: scheduler).rawValue
        if !json {
            print("\(architectureName) \(component.rawValue) \(size)\(component == .pipeline ? ", \(steps) \(scheduler) steps" : "") on \(backend.deviceDescription)")
            print(pad("setup", 18) + pad("median", 11) + pad("speed-up", 10) + pad("GFLOP/s", 9) + pad("peak RSS", 11)
                  + (backend.name == "cpu" ? "" : pad("peak GPU", 11)) + "error vs first")
        }
        var first: Double?
        let rows = try Benchmark.run(request, backend: backend, components: makeComponents) { row in
            guard !json else { return }
            if row.times.isEmpty { print(pad(row.setup, 18) + row.note); return }
            if first == nil { first = row.median }
            let speedup = first.map { format2($0 / row.median) + "x" } ?? ""
            print(pad(row.setup, 18) + pad(format2(row.median) + " s", 11) + pad(speedup, 10)
                  + pad(row.gflops.map { format1($0) } ?? "", 9) + pad("\(row.peakRSS >> 20) MB", 11)
                  + (row.peakDevice.map { pad("\($0 >> 20) MB", 11) } ?? "")
                  + (row.maxRelErr.map { String($0) } ?? "—"))
        }
        if json {
            print(JSON.object([("device", .string(backend.deviceDescription)), ("rows", .array(rows.map(\.json)))]).serialized(pretty: true))
        }
    }

    func runOps(_ backend: Backend) throws {
        guard let cpu = backend as? CPUBackend else { throw ValidationError("--ops runs on the CPU (use cuda-selftest --benchmark on a GPU)") }
        var options = CompileOptions()
        options.attention = try parseAttention(runtime.attention)
        let rows = try OpsBench.run(backend: cpu, options: options, reps: reps)
        if json {
            print(JSON.object([("device", .string(backend.deviceDescription)), ("rows", .array(rows.map(\.json)))]).serialized(pretty: true))
            return
        }
        print("device: \(backend.deviceDescription)")
        print(pad("op", 12) + pad("shape", 44) + pad("median", 12) + "rate")
        for r in rows {
            let rate = r.flops.map { format1($0 / r.median / 1e9) + " GFLOP/s" } ?? r.bytes.map { format1($0 / r.median / 1e9) + " GB/s" } ?? ""
            print(pad(r.op, 12) + pad(r.shape, 44) + pad(format1(r.median * 1000) + " ms", 12) + rate)
        }
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
