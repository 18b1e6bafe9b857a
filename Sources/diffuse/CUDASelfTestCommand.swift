import ArgumentParser
import DiffuseCore
import DiffuseCUDA
import DiffuseSchedulers

/// Developer command: runs every CUDA op against the reference interpreter on this machine's
/// GPU and, optionally, times SD-sized ops. One line per case; the exit status says whether all passed.
struct CUDASelfTestCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cuda-selftest", abstract: "Check every CUDA kernel against the reference (needs an NVIDIA GPU).",
        shouldDisplay: false)

    @Option(help: "Only cases whose name contains this text.")
    var filter: String?

    @Option(help: "Skip cases whose name contains this text (repeatable).")
    var exclude: [String] = []

    @Flag(help: "Also time SD-sized ops in every precision.")
    var benchmark = false

    @Flag(help: "Only the timing, no checks.")
    var benchmarkOnly = false

    @Option(help: "Check torch.Generator(\"cuda\") against this file of torch.randn draws (scripts/device/make_cuda_rng_goldens.py).")
    var torchRandn: String?

    func run() throws {
        var ok = true
        if let torchRandn { ok = try checkTorchRandn(torchRandn) }
        // With --torch-randn alone only the generator is checked; --filter or --benchmark add the rest.
        if !benchmarkOnly && (torchRandn == nil || filter != nil || benchmark) {
            ok = CUDASelfTest.run(filter: filter, exclude: exclude, log: { print($0) }) && ok
        }
        if benchmark || benchmarkOnly {
            ok = CUDASelfTest.benchmark(log: { print($0) }) && ok
        }
        if !ok { throw ExitCode(1) }
    }
}

extension CUDASelfTestCommand {
    /// Tensors named `s<seed>/<call>/<d0>x<d1>...` hold the `call`-th `torch.randn` of that shape
    /// from one `torch.Generator("cuda").manual_seed(seed)`; each seed's calls are replayed in
    /// order through one TorchCUDAGenerator on this GPU and must match bit for bit. The host
    /// emulation's largest difference is printed beside.
    func checkTorchRandn(_ path: String) throws -> Bool {
        let file = try SafeTensorsFile(path: path)
        let gpu = try CUDABackend()
        struct Draw { var seed: UInt64; var call: Int; var shape: [Int]; var name: String }
        var draws: [Draw] = []
        for name in file.tensorNames {
            let parts = name.split(separator: "/")
            guard parts.count == 3, parts[0].hasPrefix("s"), let seed = UInt64(parts[0].dropFirst()), let call = Int(parts[1]) else {
                throw ValidationError("\(path): tensor '\(name)' is not named s<seed>/<call>/<shape>")
            }
            draws.append(Draw(seed: seed, call: call, shape: parts[2].split(separator: "x").compactMap { Int($0) }, name: name))
        }
        var ok = true
        for (seed, group) in Dictionary(grouping: draws, by: \.seed).sorted(by: { $0.key < $1.key }) {
            let device = TorchCUDAGenerator(seed: seed, device: gpu)
            let host = TorchCUDAGenerator(seed: seed, multiprocessorCount: gpu.multiprocessorCount,
                                          maxThreadsPerMultiprocessor: gpu.maxThreadsPerMultiprocessor)
            for d in group.sorted(by: { $0.call < $1.call }) {
                let want = try file.tensor(d.name).converted(to: .float32)
                let got = try device.randn(d.shape)
                let emulated = try host.randn(d.shape)
                let w = want.floats, g = got.floats, e = emulated.floats
                var mismatches = 0
                var hostWorst: Float = 0
                for i in 0..<want.count {
                    if w[i].bitPattern != g[i].bitPattern { mismatches += 1 }
                    hostWorst = max(hostWorst, abs(w[i] - e[i]))
                }
                let pass = want.shape == got.shape && mismatches == 0
                ok = ok && pass
                print("\(pass ? "ok  " : "FAIL") torch.randn seed \(seed) call \(d.call) \(d.shape): "
                      + "\(mismatches) of \(want.count) values differ in bits; host emulation max |Δ| \(hostWorst); offset now \(device.offset)")
            }
        }
        return ok
    }
}
