import ArgumentParser
import DiffuseCore
import DiffuseCUDA

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

    func run() throws {
        var ok = true
        if !benchmarkOnly {
            ok = CUDASelfTest.run(filter: filter, exclude: exclude, log: { print($0) })
        }
        if benchmark || benchmarkOnly {
            ok = CUDASelfTest.benchmark(log: { print($0) }) && ok
        }
        if !ok { throw ExitCode(1) }
    }
}
