import ArgumentParser
import DiffuseCore

@main
struct Diffuse: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "diffuse",
        abstract: "Text-to-image diffusion (Stable Diffusion 1.x/2.x, SDXL, BK-SDM, Turbo/LCM) on CPUs and NVIDIA GPUs.",
        subcommands: [Generate.self, Inspect.self, Bench.self, CheckReference.self, CUDASelfTestCommand.self])
}
