import ArgumentParser
import DiffuseCore
import DiffusePipelines

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Describe a model: its components, classes, dtypes, parameter counts and scheduler; for a .safetensors file, its tensors.")

    @Argument(help: "A diffusers folder, a Hugging Face repo id in the local cache, or a .safetensors file.")
    var model: String

    @OptionGroup var source: SourceOptions

    func run() throws {
        print(try ModelDescription.describe(model, options: try source.options()))
    }
}
