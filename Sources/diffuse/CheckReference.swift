import ArgumentParser
import DiffuseCore
import DiffuseGraph
import DiffusePipelines

/// Runs a reference fixture set's goldens (text encoders, UNet, VAEs, end to end) on a chosen
/// device and precision; one line per output, exit status 1 if any fails.
struct CheckReference: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check-reference",
        abstract: "Check the engine against golden outputs computed by diffusers (shared/reference layout).")

    @Option(help: "The fixture folder (models/ and golden/); default $DIFFUSE_REFERENCE or ../shared/reference.")
    var reference: String?

    @Option(help: "Allowed max |error| / max(1, max|golden|) for every model output (default by precision: 1e-4 fp32 on the CPU, 1e-3 fp32/tf32 on CUDA, 2e-2 fp16, 2e-2 UNet and 4e-2 others in bf16).")
    var tolerance: Float?

    @Option(help: "Allowed mean difference of e2e images in 8-bit levels (default 0.5 in fp32/tf32, 3 in fp16, 4 in bf16).")
    var maxMeanLevels: Float?

    @Option(help: "Only variants whose name contains this text.")
    var filter: String?

    @OptionGroup var runtime: RuntimeOptions

    func run() throws {
        let backend = try runtime.backend()
        let options = try runtime.pipelineOptions(for: backend)
        var tolerances = ReferenceCheck.Tolerances.defaults(backend: backend.name, precision: options.precision)
        if let t = tolerance { tolerances.unet = t; tolerances.models = t }
        if let l = maxMeanLevels { tolerances.meanLevels = l }
        let folder = reference ?? Fixtures.reference
        print("reference \(folder) on \(backend.deviceDescription), \(options.precision.rawValue), attention \(options.attention)")
        let results = try ReferenceCheck.run(reference: folder, backend: backend, options: options, tolerances: tolerances,
                                             filter: filter) { print($0) }
        let failed = results.filter { !$0.passed }.count
        print("\(results.count - failed) passed, \(failed) failed")
        if failed > 0 { throw ExitCode(1) }
    }
}
