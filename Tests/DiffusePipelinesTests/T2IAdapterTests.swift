import DiffuseCore
import DiffuseCPU
import DiffuseGraph
import DiffuseModels
@testable import DiffusePipelines
import FoundationEssentials
import Testing

/// T2I-Adapters: diffusers' outputs where the fixture set has the goldens (`golden/<variant>/
/// t2i_adapter/`, made by scripts/fixtures/make_t2i_adapter_reference.py), diffusers' structure
/// for the published adapters' configs, the layout ops against their definitions, and for every
/// fixture model what holds by construction with a seeded adapter made for its UNet: scale 0 and
/// a conditioning factor of 0 leave the pipeline as it was, two adapters' features add, and
/// refusals name what is wrong.
@Suite struct T2IAdapterTests {
    static let models = (try? ReferenceModel.all()) ?? []

    @Test func diffusersGoldens() throws {
        try expectOptionalGoldens(ReferenceCheck.checkT2IAdapter, models: Self.models, label: "T2I-Adapter",
                                  script: "make_t2i_adapter_reference.py")
    }

    // MARK: - The model

    /// Parameter counts diffusers gives for the published adapters' configs (TencentARC's SD 1.5
    /// v2 adapters, a one-channel sketch one, the SDXL ones, a light one), and its state-dict names.
    @Test func publishedConfigurations() throws {
        let cases: [(json: String, count: Int, tensors: Int)] = [
            (#"{"_class_name": "T2IAdapter"}"#, 77_369_280, 38),
            (#"{"in_channels": 1}"#, 77_000_640, 38),
            (#"{"adapter_type": "full_adapter_xl", "downscale_factor": 16}"#, 79_028_160, 38),
            (#"{"adapter_type": "light_adapter", "channels": [320, 640, 1280], "num_res_blocks": 4}"#, 18_689_200, 80),
        ]
        for c in cases {
            let model = try T2IAdapter(configJSON: Array(c.json.utf8), origin: "config")
            #expect(model.parameterCount == c.count, "\(c.json)")
            #expect(model.parameters.count == c.tensors, "\(c.json)")
            #expect(model.parameters.allSatisfy { $0.name.hasPrefix("adapter.") })
        }
        let sd15 = try T2IAdapter(config: .init())
        #expect(sd15.parameters.contains { $0.name == "adapter.conv_in.weight" && $0.shape == [320, 192, 3, 3] })
        #expect(sd15.parameters.contains { $0.name == "adapter.body.1.in_conv.weight" && $0.shape == [640, 320, 1, 1] })
        #expect(sd15.parameters.contains { $0.name == "adapter.body.3.resnets.1.block2.weight" && $0.shape == [1280, 1280, 1, 1] })
        #expect(!sd15.parameters.contains { $0.name.hasPrefix("adapter.body.0.in_conv") })
        #expect(sd15.totalDownscaleFactor == 64)
        #expect(sd15.featureShapes(height: 520, width: 512) == [[320, 65, 64], [640, 33, 32], [1280, 17, 16], [1280, 9, 8]])
        var xl = T2IAdapter.Configuration()
        (xl.adapterType, xl.downscaleFactor) = (.fullAdapterXL, 16)
        #expect(try T2IAdapter(config: xl).featureShapes(height: 1024, width: 1024)
                == [[320, 64, 64], [640, 64, 64], [1280, 32, 32], [1280, 32, 32]])
    }

    /// Unknown adapter types and widths the architecture cannot hold fail at the config, by key.
    /// TencentARC's original files (the full `Adapter` of t2iadapter_*_sd14v1.pth: `conv_in`,
    /// `body.k` flat over the levels; the light `Adapter_light` of the color adapter) read as the
    /// diffusers adapter they convert to, config from the shapes; other layouts are refused.
    @Test func originalFiles() throws {
        let dir = try TemporaryDirectory()
        var full = T2IAdapter.Configuration()
        (full.inChannels, full.channels, full.numResBlocks) = (1, [8, 16, 32, 32], 2)
        var light = T2IAdapter.Configuration()
        (light.adapterType, light.channels, light.numResBlocks) = (.lightAdapter, [8, 16, 32], 3)
        for (k, config) in [full, light].enumerated() {
            let model = try T2IAdapter(config: config)
            let random = model.randomWeights(seed: UInt64(k + 4))
            let tensors = try model.parameters.map { ($0.name, try random.tensor($0.name)) }
            // diffusers' adapter.body.i.resnets.j → the original's body.(i·n + j) (full) or body.i.body.j (light).
            let original = tensors.map { name, t -> (String, Tensor) in
                var parts = name.dropFirst("adapter.".count).split(separator: ".").map(String.init)
                if parts.count > 3, parts[0] == "body", parts[2] == "resnets", let i = Int(parts[1]), let j = Int(parts[3]) {
                    parts = config.adapterType == .lightAdapter ? ["body", "\(i)", "body", "\(j)"] + parts[4...]
                        : ["body", "\(i * config.numResBlocks + j)"] + parts[4...]
                } else if parts.count > 2, parts[0] == "body", parts[2] == "in_conv", config.adapterType == .fullAdapter, let i = Int(parts[1]) {
                    parts[1] = "\(i * config.numResBlocks)"
                }
                return (parts.joined(separator: "."), t)
            }
            let path = dir.join("adapter\(k).safetensors")
            try SafeTensors.write(original, to: path)
            let got = try T2IAdapterComponent.load(path, unetLevels: 4)
            #expect(got.model.config == config, "\(got.model.config) vs \(config)")
            for (name, t) in tensors { #expect(try got.weights.source.tensor(name).toFloatArray() == t.toFloatArray(), "\(name)") }
        }
        func message(_ tensors: [(String, Tensor)], levels: Int = 4) throws -> String {
            let path = dir.join("bad.safetensors")
            try SafeTensors.write(tensors, to: path)
            do { _ = try T2IAdapterComponent.load(path, unetLevels: levels); return "" } catch { return "\(error)" }
        }
        let w = Tensor(zeros: [8, 8, 3, 3])
        #expect(try message([("conv_in.weight", Tensor(zeros: [8, 64, 3, 3])), ("body.0.skep.weight", w)]).contains("diffusers does not convert"))
        #expect(try message([("conv_in.weight", Tensor(zeros: [8, 64, 3, 3])), ("body.0.block1.weight", w), ("body.1.block1.weight", w),
                             ("body.2.block1.weight", w)]).contains("do not divide among the UNet's 4 levels"))
        #expect(try message([("time_embed.0.weight", w)]).contains("not a T2I-Adapter in TencentARC's layout"))
        #expect(throws: PipelineError.self) { try T2IAdapterComponent.load(dir.join("adapter0.safetensors")) }
    }

    @Test func configurationRefusals() throws {
        func message(_ json: String) -> String {
            do { _ = try T2IAdapter(configJSON: Array(json.utf8), origin: "adapter/config.json"); return "" } catch { return "\(error)" }
        }
        #expect(message(#"{"adapter_type": "medium_adapter"}"#).contains("adapter_type"))
        #expect(message(#"{"adapter_type": "medium_adapter"}"#).contains("adapter/config.json"))
        #expect(message(#"{"channels": []}"#).contains("channels"))
        #expect(message(#"{"adapter_type": "light_adapter", "channels": [2, 8]}"#).contains("quarter"))
        #expect(message(#"{"adapter_type": "full_adapter_xl", "channels": [8, 16, 32, 64]}"#).contains("block 3"))
        #expect(message(#"{"downscale_factor": 0}"#).contains("downscale_factor"))
        let model = try T2IAdapter(config: .init())
        #expect(throws: ConfigError.self) { try model.graph(batch: 1, height: 100, width: 64) }
    }

    /// `pixelUnshuffle` and ceil-mode `avgPool2x2Ceil` on the CPU backend against their
    /// definitions, at even and odd sizes (odd edges average the pixels they have).
    @Test(arguments: [(4, 6), (5, 7), (1, 3), (3, 1)])
    func layoutOps(height: Int, width: Int) throws {
        let (n, c) = (2, 3)
        let x = Self.noise([n, c, height * 2, width * 2], seed: 3)
        let b = GraphBuilder()
        let input = b.input("x", shape: x.shape)
        b.output("unshuffled", input.pixelUnshuffle(2))
        let odd = input.slice(axis: 2, start: 0, length: 2 * height - 1).slice(axis: 3, start: 0, length: 2 * width - 1)
        b.output("pooled", odd.avgPool2x2Ceil())
        b.output("pooled_even", input.avgPool2x2Ceil())
        let exe = try CPUBackend().compile(try b.finish(), weights: nil, options: CompileOptions(precision: .float32))
        let backend = try CPUBackend()
        let out = try exe.run(["x": try backend.upload(x)])
        let (H, W) = (2 * height, 2 * width)
        func at(_ t: Tensor, _ i: Int, _ ch: Int, _ y: Int, _ x: Int) -> Float { t.floats[((i * t.shape[1] + ch) * t.shape[2] + y) * t.shape[3] + x] }

        let unshuffled = try out["unshuffled"]!.toHost()
        #expect(unshuffled.shape == [n, 4 * c, height, width])
        for i in 0..<n { for ch in 0..<c { for y in 0..<H { for xx in 0..<W {
            #expect(at(unshuffled, i, ch * 4 + (y % 2) * 2 + xx % 2, y / 2, xx / 2) == at(x, i, ch, y, xx))
        } } } }

        for (name, h, w) in [("pooled", H - 1, W - 1), ("pooled_even", H, W)] {
            let pooled = try out[name]!.toHost()
            let (oh, ow) = ((h + 1) / 2, (w + 1) / 2)
            #expect(pooled.shape == [n, c, oh, ow])
            for i in 0..<n { for ch in 0..<c { for y in 0..<oh { for xx in 0..<ow {
                var sum: Float = 0, count: Float = 0
                for dy in 0..<2 where 2 * y + dy < h { for dx in 0..<2 where 2 * xx + dx < w { sum += at(x, i, ch, 2 * y + dy, 2 * xx + dx); count += 1 } }
                #expect(abs(at(pooled, i, ch, y, xx) - sum / count) <= 1e-6 * max(1, abs(sum)), "\(name) \(y),\(xx)")
            } } } }
        }
    }

    // MARK: - Pipelines

    /// A T2IAdapter folder (config.json, diffusion_pytorch_model.safetensors) with seeded weights.
    static func adapterFolder(_ config: T2IAdapter.Configuration, in dir: TemporaryDirectory, name: String, seed: UInt64) throws -> String {
        let folder = dir.join(name)
        try Files.createDirectory(folder)
        let json = """
            {"_class_name": "T2IAdapter", "in_channels": \(config.inChannels), "channels": \(config.channels),
             "num_res_blocks": \(config.numResBlocks), "downscale_factor": \(config.downscaleFactor),
             "adapter_type": "\(config.adapterType.rawValue)"}
            """
        try Files.write(Array(json.utf8), to: Files.join(folder, "config.json"))
        let model = try T2IAdapter(config: config)
        let random = model.randomWeights(seed: seed)
        try SafeTensors.write(try model.parameters.map { ($0.name, try random.tensor($0.name)) },
                              to: Files.join(folder, "diffusion_pytorch_model.safetensors"))
        return folder
    }

    /// The first of diffusers' full adapters whose features this UNet takes (`full_adapter`
    /// unshuffled by the VAE's scale, `full_adapter_xl` by twice that), with its widths.
    static func fittingConfiguration(_ c: StableDiffusionComponents, inChannels: Int = 3) throws -> T2IAdapter.Configuration? {
        let dir = try TemporaryDirectory()
        for (type, factor) in [(T2IAdapter.AdapterType.fullAdapter, 1), (.fullAdapterXL, 2)] {
            var config = T2IAdapter.Configuration()
            (config.inChannels, config.channels, config.numResBlocks) = (inChannels, c.unet.config.blockOutChannels, 1)
            (config.adapterType, config.downscaleFactor) = (type, factor * c.vae.model.spatialScaleFactor)
            let adapter = try T2IAdapterComponent.load(try adapterFolder(config, in: dir, name: type.rawValue, seed: 1))
            if (try? c.checkT2IAdapters([adapter])) != nil { return config }
        }
        return nil
    }

    static func request(_ c: StableDiffusionComponents, config: T2IAdapter.Configuration) -> GenerationRequest {
        var r = GenerationRequest(prompt: "a lighthouse on a cliff")
        (r.steps, r.seed) = (3, 11)
        // Odd multiples of the unshuffle factor: the pooling's ceil mode meets the UNet's.
        (r.width, r.height) = (5 * config.downscaleFactor, 3 * config.downscaleFactor)
        return r
    }

    /// Scale 0 and a conditioning factor of 0 give the plain pipeline (to float rounding: the
    /// denoiser graph has the additions, so its kernels may differ); a live adapter
    /// changes every image; two adapters with the same picture at scale 1 each are the one at
    /// scale 2 (f + f = 2f exactly); an adapter without guidance still changes the image.
    @Test(arguments: models) func adapterFeatures(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        guard let config = try Self.fittingConfiguration(base) else {
            print("\(model.variant): no full T2I-Adapter fits this UNet; skipped")
            return
        }
        let dir = try TemporaryDirectory()
        let adapter = try T2IAdapterComponent.load(try Self.adapterFolder(config, in: dir, name: "adapter", seed: 5))
        let picture = IPAdapterTests.picture(width: 70, height: 50, seed: 3)
        var r = Self.request(base, config: config)
        r.count = 2
        let plain = try cpuPipeline(base).generateLatents(r)

        var one = base
        one.t2iAdapters = [adapter]
        let pipeline = try cpuPipeline(one)
        r.t2iAdapters = [T2IAdapterGuidance(image: picture, conditioningScale: 0)]
        let off = try pipeline.generateLatents(r)
        #expect(relativeError(off, plain) < 1e-5, "scale 0: \(relativeError(off, plain))")
        r.t2iAdapters[0].conditioningScale = 2
        r.adapterConditioningFactor = 0
        let unadapted = try pipeline.generateLatents(r)
        #expect(relativeError(unadapted, plain) < 1e-5, "conditioning factor 0: \(relativeError(unadapted, plain))")
        r.adapterConditioningFactor = 1
        let doubled = try pipeline.generateLatents(r)
        for k in 0..<r.count {
            let a = doubled.slice(k..<(k + 1)).copy(), b = plain.slice(k..<(k + 1)).copy()
            #expect(relativeError(a, b) > 1e-3, "image \(k): \(relativeError(a, b))")
        }

        var two = base
        two.t2iAdapters = [adapter, adapter]
        r.t2iAdapters = Array(repeating: T2IAdapterGuidance(image: picture, conditioningScale: 1), count: 2)
        let summed = try cpuPipeline(two).generateLatents(r)
        #expect(summed.toFloatArray() == doubled.toFloatArray(), "\(relativeError(summed, doubled))")

        var unguided = r
        (unguided.guidanceScale, unguided.count) = (1, 1)
        unguided.t2iAdapters = [T2IAdapterGuidance(image: picture, conditioningScale: 1)]
        var plainUnguided = unguided
        plainUnguided.t2iAdapters = []
        let a = try pipeline.generateLatents(unguided), b = try cpuPipeline(base).generateLatents(plainUnguided)
        #expect(relativeError(a, b) > 1e-3, "\(relativeError(a, b))")
    }

    /// A one-channel adapter reads the picture in gray; without a size the output takes the
    /// picture's, rounded down to the unshuffle factor (diffusers' `_default_height_width`).
    @Test(arguments: models) func grayPicturesAndDefaultSize(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        guard let config = try Self.fittingConfiguration(base, inChannels: 1) else { return }
        let dir = try TemporaryDirectory()
        let adapter = try T2IAdapterComponent.load(try Self.adapterFolder(config, in: dir, name: "sketch", seed: 8))
        let f = config.downscaleFactor
        let picture = IPAdapterTests.picture(width: 5 * f + f / 2, height: 3 * f + 1, seed: 4)
        let input = try adapter.input(picture, width: 5 * f, height: 3 * f)
        let gray = picture.converted(channels: 1).resized(width: 5 * f, height: 3 * f, filter: .lanczos)
        #expect(input.shape == [1, 1, 3 * f, 5 * f])
        #expect(input.toFloatArray().map { UInt8(($0 * 255).rounded()) } == gray.pixels)

        var c = base
        c.t2iAdapters = [adapter]
        var r = GenerationRequest(prompt: "a cat")
        (r.steps, r.seed) = (1, 2)
        r.t2iAdapters = [T2IAdapterGuidance(image: picture)]
        let latents = try cpuPipeline(c).generateLatents(r)
        let scale = base.vae.model.spatialScaleFactor
        #expect(latents.shape[2] == 3 * f / scale && latents.shape[3] == 5 * f / scale)
    }

    /// Requests and adapters the pipeline cannot run fail with messages that name the problem.
    @Test(arguments: models) func refusals(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        guard let config = try Self.fittingConfiguration(base) else { return }
        let dir = try TemporaryDirectory()
        let adapter = try T2IAdapterComponent.load(try Self.adapterFolder(config, in: dir, name: "adapter", seed: 5))
        func message(_ c: StableDiffusionComponents, _ r: GenerationRequest) -> String {
            do { _ = try cpuPipeline(c).generateLatents(r); return "" } catch { return "\(error)" }
        }
        let picture = IPAdapterTests.picture(width: 40, height: 40, seed: 1)
        var c = base
        c.t2iAdapters = [adapter]
        var r = Self.request(base, config: config)
        #expect(message(c, r).contains("needs one image"))
        #expect(message(base, { var q = r; q.t2iAdapters = [T2IAdapterGuidance(image: picture)]; return q }()).contains("need a T2I-Adapter"))
        r.t2iAdapters = [T2IAdapterGuidance(image: picture)]
        var img2img = r
        img2img.initImage = picture
        #expect(message(c, img2img).contains("works from text"))
        var factor = r
        factor.adapterConditioningFactor = 1.5
        #expect(message(c, factor).contains("conditioning factor"))
        if config.downscaleFactor > base.vae.model.spatialScaleFactor {
            var size = r
            size.width = config.downscaleFactor * 3 + base.vae.model.spatialScaleFactor
            #expect(message(c, size).contains("downscale factor \(config.downscaleFactor)"))
        }

        // Widths the UNet does not have: the adapter and the mismatch are named.
        var wrong = config
        wrong.channels = config.channels.map { $0 * 2 }
        let misfit = try T2IAdapterComponent.load(try Self.adapterFolder(wrong, in: dir, name: "misfit", seed: 2))
        var misfitMessage = ""
        do { try base.checkT2IAdapters([misfit]) } catch { misfitMessage = "\(error)" }
        #expect(misfitMessage.contains("misfit") && misfitMessage.contains("feature 0"), "\(misfitMessage)")

        // Several adapters must shrink images alike (diffusers' MultiAdapter).
        var other = config
        other.downscaleFactor *= 2
        let otherAdapter = try T2IAdapterComponent.load(try Self.adapterFolder(other, in: dir, name: "other", seed: 3))
        #expect(throws: PipelineError.self) { try base.checkT2IAdapters([adapter, otherAdapter]) }

        // A folder of another model, and a missing weight, are named.
        do {
            _ = try T2IAdapterComponent.load(model.folder + "/unet")
            Issue.record("a UNet folder loaded as a T2I-Adapter")
        } catch {
            #expect("\(error)".contains("not a T2I-Adapter"), "\(error)")
        }
        let broken = try Self.adapterFolder(config, in: dir, name: "broken", seed: 4)
        let weights = try SafeTensorsFile(path: Files.join(broken, "diffusion_pytorch_model.safetensors"))
        let kept = try weights.tensorNames.filter { $0 != "adapter.conv_in.weight" }.map { ($0, try weights.tensor($0).copy()) }
        try SafeTensors.write(kept, to: Files.join(broken, "diffusion_pytorch_model.safetensors"), overwrite: true)
        #expect(throws: WeightError.self) { try T2IAdapterComponent.load(broken) }
    }

    /// The command line: `inspect` describes the adapter folder; `generate --t2i-adapter` makes
    /// the library's image and records the adapter; misuse is refused by option name.
    @Test func commandLine() throws {
        guard let model = Self.models.first(where: { (try? Self.fittingConfiguration(StableDiffusionComponents.load($0.folder))) != nil }),
              let config = try Self.fittingConfiguration(try StableDiffusionComponents.load(model.folder)) else { return }
        let dir = try TemporaryDirectory()
        let folder = try Self.adapterFolder(config, in: dir, name: "sketch-adapter", seed: 6)
        let inspect = try runDiffuse(["inspect", folder])
        #expect(inspect.status == 0 && inspect.out.contains("T2IAdapter") && inspect.out.contains("adapter_type=\"\(config.adapterType.rawValue)\""),
                "\(inspect.out)\(inspect.err)")
        let picture = IPAdapterTests.picture(width: 3 * config.downscaleFactor + 3, height: 2 * config.downscaleFactor, seed: 5)
        try picture.writePNG(dir.join("sketch.png"))
        let run = try runDiffuse(["generate", "a boat", "--model", model.folder, "--steps", "2", "--seed", "4", "--device", "cpu",
                                  "--t2i-adapter", folder, "--t2i-adapter-image", dir.join("sketch.png"), "--t2i-adapter-scale", "0.7",
                                  "--output", dir.join("out.png")])
        #expect(run.status == 0, "exit \(run.status): \(run.err)")
        let file = try ImageFile.read(dir.join("out.png"))
        #expect(file.text("parameters")?.contains("T2I-Adapter 0: \"Model: sketch-adapter, Weight: 0.7\"") == true, "\(file.text("parameters") ?? "")")

        var c = try StableDiffusionComponents.load(model.folder)
        c.t2iAdapters = [try T2IAdapterComponent.load(folder)]
        var r = GenerationRequest(prompt: "a boat")
        (r.steps, r.seed) = (2, 4)
        r.t2iAdapters = [T2IAdapterGuidance(image: try Image.load(dir.join("sketch.png")), conditioningScale: 0.7)]
        let images = try cpuPipeline(c).generate(r).images
        #expect(images.first == file.image, "the command line's image is not the pipeline's")

        for (arguments, complaint) in [(["--t2i-adapter-image", dir.join("sketch.png")], "--t2i-adapter-image needs --t2i-adapter"),
                                       (["--t2i-adapter", folder, "--t2i-adapter-image", dir.join("sketch.png"), "--image", dir.join("sketch.png")],
                                        "takes no --image"),
                                       (["--t2i-adapter", folder, "--t2i-adapter-image", dir.join("sketch.png"), "--adapter-conditioning-factor", "2"],
                                        "--adapter-conditioning-factor must be in [0, 1]")] {
            let refused = try runDiffuse(["generate", "x", "--model", model.folder, "--output", dir.join("no.png")] + arguments)
            #expect(refused.status != 0 && refused.err.contains(complaint), "\(refused.err)")
        }
    }

    /// Seeded values in [−1, 1).
    static func noise(_ shape: [Int], seed: UInt64) -> Tensor { IPAdapterTests.noise(shape, seed: seed) }
}
