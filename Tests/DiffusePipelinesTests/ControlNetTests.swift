import DiffuseCore
import DiffuseCPU
import DiffuseGraph
import DiffuseModels
@testable import DiffusePipelines
import FoundationEssentials
import Testing

/// ControlNet: diffusers' outputs where the fixture set has the goldens (`golden/<variant>/
/// controlnet/`, made by scripts/fixtures/make_controlnet_reference.py), and for every fixture
/// model with a mid block what holds by construction: a ControlNet with zero residual
/// projections (as `ControlNetModel.from_unet` starts one) leaves the pipeline as it was.
@Suite struct ControlNetTests {
    static let models = ((try? ReferenceModel.all()) ?? []).filter {
        (try? StableDiffusionComponents.load($0.folder))?.unet.config.midBlockType != nil
    }

    @Test func diffusersGoldens() throws {
        try expectOptionalGoldens(ReferenceCheck.checkControlNet, models: Self.models, label: "ControlNet",
                                  script: "make_controlnet_reference.py")
    }

    /// A ControlNet folder made from a model's UNet, as `ControlNetModel.from_unet` makes one:
    /// the UNet's config and encoder weights, a seeded conditioning embedding (one stride-2 step
    /// per factor 2 of the VAE), and residual projections of zeros or seeded values.
    static func controlNetFolder(for model: ReferenceModel, in dir: TemporaryDirectory, zero: Bool) throws -> String {
        let c = try StableDiffusionComponents.load(model.folder)
        let folder = dir.join("controlnet-\(zero)")
        try Files.createDirectory(folder)
        let steps = c.vae.model.spatialScaleFactor.trailingZeroBitCount
        let widths = (0...steps).map { 8 * (1 + $0 / 2) }
        let unetJSON = try Files.readJSON(Files.join(model.folder, "unet", "config.json")).members!
        let config = JSON.object(unetJSON.filter { !["_class_name", "up_block_types", "out_channels"].contains($0.0) }
                                 + [("_class_name", .string("ControlNetModel")),
                                    ("conditioning_embedding_out_channels", .array(widths.map { .number(Double($0)) }))])
        let text = config.serialized(pretty: true)
        try Files.write(Array(text.utf8), to: Files.join(folder, "config.json"))
        let model = try ControlNetModel(configJSON: Array(text.utf8), origin: "test ControlNet")
        let random = model.randomWeights(seed: 23)
        let unet = c.unetWeights.source
        let tensors = try model.parameters.map { p -> (String, Tensor) in
            if p.name.hasPrefix("controlnet_down_blocks.") || p.name.hasPrefix("controlnet_mid_block.") || p.name.hasPrefix("controlnet_cond_embedding.conv_out.") {
                return (p.name, zero ? Tensor(zeros: p.shape) : try random.tensor(p.name))
            }
            return (p.name, unet.info(p.name) != nil ? try unet.tensor(p.name).converted(to: .float32) : try random.tensor(p.name))
        }
        try SafeTensors.write(tensors, to: Files.join(folder, "diffusion_pytorch_model.safetensors"))
        return folder
    }

    /// A ControlNet in one file, in lllyasviel's original layout (under `control_model.`, or
    /// bare) or as a diffusers state dict, read with the model's UNet config, is the folder's:
    /// the same parameters and weights. A file of something else is refused by name.
    @Test(arguments: models) func singleFiles(model: ReferenceModel) throws {
        let dir = try TemporaryDirectory()
        let folder = try Self.controlNetFolder(for: model, in: dir, zero: false)
        let want = try ControlNetComponent.load(folder)
        let unetConfig = try StableDiffusionComponents.load(model.folder).unetConfigFile!
        let source = want.weights.source
        let diffusers = try want.model.parameters.map { ($0.name, try source.tensor($0.name)) }
        // The hint block's convolutions sit at the even indices of its Sequential.
        let blocks = want.model.parameters.filter { $0.name.hasPrefix("controlnet_cond_embedding.blocks.") && $0.name.hasSuffix(".weight") }.count
        let config = ConfigFile(bytes: try Files.read(Files.join(folder, "config.json")), origin: "config.json")
        let mapping = try LDMKeyTables.controlNet(config: config, hintIndices: (0...(blocks + 1)).map { 2 * $0 }, sourcePrefix: "")
        try SafeTensors.write(diffusers, to: dir.join("diffusers.safetensors"))
        var files = ["diffusers.safetensors"]
        // An LCM-distilled UNet's guidance embedding (time_cond_proj_dim) has no original name:
        // such models exist in diffusers' layout alone.
        if want.model.config.unet.timeCondProjDim == nil {
            let original = try diffusers.map { name, t -> (String, Tensor) in (try #require(mapping.source(forTarget: name)).name, t) }
            #expect(original.contains { $0.0 == "input_hint_block.\(2 * (blocks + 1)).weight" } && original.contains { $0.0 == "zero_convs.0.0.weight" })
            try SafeTensors.write(original.map { ("control_model." + $0.0, $0.1) }, to: dir.join("control_model.safetensors"))
            try SafeTensors.write(original, to: dir.join("bare.safetensors"))
            files += ["control_model.safetensors", "bare.safetensors"]
        }
        for file in files {
            let got = try ControlNetComponent.load(dir.join(file), unetConfig: unetConfig)
            #expect(got.model.parameters.map(\.name) == want.model.parameters.map(\.name), "\(file)")
            #expect(got.model.config.conditioningEmbeddingOutChannels == want.model.config.conditioningEmbeddingOutChannels, "\(file)")
            for (name, t) in diffusers {
                #expect(try got.weights.source.tensor(name).toFloatArray() == t.toFloatArray(), "\(file): \(name)")
            }
        }
        do {
            _ = try ControlNetComponent.load(Files.join(model.folder, "unet", "diffusion_pytorch_model.safetensors"), unetConfig: unetConfig)
            Issue.record("a UNet file was read as a ControlNet")
        } catch {
            #expect("\(error)".contains("not a ControlNet"), "\(error)")
        }
        #expect(throws: PipelineError.self) { try ControlNetComponent.load(dir.join("diffusers.safetensors")) }
    }

    /// A picture of edges, not the model's size (a multiple of 16 on both sides).
    static let control: Image = {
        let (w, h) = (64, 48)
        var pixels = [UInt8](repeating: 0, count: w * h * 3)
        for y in 0..<h { for x in 0..<w where x % 11 == 0 || y == h / 2 { pixels[3 * (y * w + x)] = 255; pixels[3 * (y * w + x) + 1] = 200 } }
        return Image(width: w, height: h, channels: 3, pixels: pixels)
    }()

    @Test(arguments: models) func zeroResidualsLeaveThePipeline(model: ReferenceModel) throws {
        let dir = try TemporaryDirectory()
        let base = try StableDiffusionComponents.load(model.folder)
        var controlled = base
        controlled.controlNets = [try ControlNetComponent.load(try Self.controlNetFolder(for: model, in: dir, zero: true))]
        var r = GenerationRequest(prompt: "a lighthouse at dusk")
        (r.steps, r.seed, r.count) = (3, 5, 2)
        var c = r
        c.controlNets = [ControlNetGuidance(image: Self.control)]
        (r.width, r.height) = (Self.control.width, Self.control.height)   // the control image's size is the default
        let want = try cpuPipeline(base).generateLatents(r)
        let got = try cpuPipeline(controlled).generateLatents(c)
        #expect(relativeError(got, want) < 1e-5, "\(relativeError(got, want))")
    }

    /// Seeded residual projections change the result; scale 0, or a guidance window the steps
    /// never enter, gives the plain pipeline back.
    @Test func residualsAndTheirScale() throws {
        let model = try #require(Self.models.first)
        let dir = try TemporaryDirectory()
        let base = try StableDiffusionComponents.load(model.folder)
        var controlled = base
        let unit = try ControlNetComponent.load(try Self.controlNetFolder(for: model, in: dir, zero: false))
        controlled.controlNets = [unit]
        let pipeline = try cpuPipeline(controlled)
        var r = GenerationRequest(prompt: "a lighthouse at dusk")
        (r.steps, r.seed, r.scheduler, r.width, r.height) = (4, 5, "ddim", Self.control.width, Self.control.height)
        let plain = try cpuPipeline(base).generateLatents(r)
        r.controlNets = [ControlNetGuidance(image: Self.control)]
        let full = try pipeline.generateLatents(r)
        #expect(relativeError(full, plain) > 1e-3)
        var off = r
        off.controlNets[0].conditioningScale = 0
        #expect(relativeError(try pipeline.generateLatents(off), plain) < 1e-5)
        var late = r
        (late.controlNets[0].guidanceStart, late.controlNets[0].guidanceEnd) = (0.5, 1)
        let half = try pipeline.generateLatents(late)
        #expect(relativeError(half, full) > 1e-4 && relativeError(half, plain) > 1e-4)
        // Guess mode steers differently (the prompt's rows only, residuals weighted 0.1 → 1).
        var guess = r
        guess.controlNetGuessMode = true
        let guessed = try pipeline.generateLatents(guess)
        #expect(relativeError(guessed, full) > 1e-4 && relativeError(guessed, plain) > 1e-4)
        // Two ControlNets add up: the same one twice at half the scale is the one at full scale.
        var twice = controlled
        twice.controlNets = [unit, unit]
        var halves = r
        halves.controlNets = Array(repeating: ControlNetGuidance(image: Self.control, conditioningScale: 0.5), count: 2)
        #expect(relativeError(try cpuPipeline(twice).generateLatents(halves), full) < 1e-5)
    }

    /// The command line: the output takes the control image's size; the PNG records the unit.
    @Test func commandLine() throws {
        let model = try #require(Self.models.first)
        let dir = try TemporaryDirectory()
        let folder = try Self.controlNetFolder(for: model, in: dir, zero: false)
        let control = dir.join("edges.png"), out = dir.join("out.png")
        try Self.control.writePNG(control)
        let r = try runDiffuse(["generate", "a boat", "--model", model.folder, "--controlnet", folder, "--control-image", control,
                                "--controlnet-scale", "0.5", "--control-guidance", "0:0.6", "--steps", "2", "--output", out])
        #expect(r.status == 0, "\(r.err)")
        let file = try ImageFile.read(out)
        #expect(file.image.width == Self.control.width && file.image.height == Self.control.height)
        #expect(file.text("parameters")?.contains("Weight: 0.5, Guidance Start: 0.0, Guidance End: 0.6") == true)
    }

    @Test func refusals() throws {
        let model = try #require(Self.models.first)
        let dir = try TemporaryDirectory()
        let base = try StableDiffusionComponents.load(model.folder)
        var r = GenerationRequest(prompt: "x")
        r.steps = 2
        r.controlNets = [ControlNetGuidance(image: Self.control)]
        #expect(message { try cpuPipeline(base).generateLatents(r) }?.contains("need a ControlNet") == true)
        var controlled = base
        controlled.controlNets = [try ControlNetComponent.load(try Self.controlNetFolder(for: model, in: dir, zero: true))]
        let pipeline = try cpuPipeline(controlled)
        var without = r
        without.controlNets = []
        #expect(message { try pipeline.generateLatents(without) }?.contains("need one control image each (got 0)") == true)
        var window = r
        (window.controlNets[0].guidanceStart, window.controlNets[0].guidanceEnd) = (0.7, 0.2)
        #expect(message { try pipeline.generateLatents(window) }?.contains("0 ≤ start < end ≤ 1") == true)
        var latents = r
        latents.imageLatents = Tensor(zeros: [1, base.vae.model.latentChannels, 5, 7])
        #expect(message { try pipeline.generateLatents(latents) }?.contains("not from latents") == true)
        // A ControlNet made for another UNet is named with what differs.
        if let other = try ReferenceModel.all().first(where: { m in
            (try? StableDiffusionComponents.load(m.folder))?.unet.config.blockOutChannels != base.unet.config.blockOutChannels }) {
            let otherBase = try StableDiffusionComponents.load(other.folder)
            let text = message { try otherBase.checkControlNet(controlled.controlNets[0]) } ?? ""
            #expect(text.contains("is not a ControlNet for") && text.contains("block_out_channels"), "\(text)")
        }
        // A folder that is not a ControlNet.
        #expect(message { try ControlNetComponent.load(Files.join(model.folder, "unet")) }?.contains("not a ControlNet") == true)
    }
}
