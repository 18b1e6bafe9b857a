import DiffuseCore
import DiffusePipelines
import FoundationEssentials
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Runs the built `diffuse` binary (beside the test bundle) and returns its exit status, stdout
/// and stderr; `environment` adds to (or replaces in) this process's environment.
func runDiffuse(_ arguments: [String], environment: [String: String] = [:]) throws -> (status: Int32, out: String, err: String) {
    let bundle = CommandLine.arguments[0]
    let dir = bundle.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
    let binary = dir + "/diffuse"
    guard Files.exists(binary) else { throw FileError(binary, "not built (run `swift build` first)") }
    return spawn(binary, arguments, environment: environment)
}

/// Runs `executable` with `arguments` and waits: exit status (128 + signal if killed), stdout, stderr.
func spawn(_ executable: String, _ arguments: [String], environment: [String: String]) -> (status: Int32, out: String, err: String) {
    let tmp = "/tmp/diffuse-cli-\(getpid())-\(UInt32.random(in: 0 ... .max))"
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 1, tmp + ".out", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    posix_spawn_file_actions_addopen(&actions, 2, tmp + ".err", O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    let argv = ([executable] + arguments).map { strdup($0) } + [nil]
    defer { argv.forEach { free($0) } }
    var env: [String] = []
    var p = environ
    while let entry = p.pointee {
        let s = String(cString: entry)
        if let key = s.split(separator: "=", maxSplits: 1).first, environment[String(key)] == nil { env.append(s) }
        p += 1
    }
    env += environment.map { "\($0.key)=\($0.value)" }
    let envp = env.map { strdup($0) } + [nil]
    defer { envp.forEach { free($0) } }
    var pid: pid_t = 0
    let started = executable.contains("/") ? posix_spawn(&pid, executable, &actions, nil, argv, envp)
                                           : posix_spawnp(&pid, executable, &actions, nil, argv, envp)
    guard started == 0 else { return (127, "", "cannot start \(executable)") }
    var status: Int32 = 0
    waitpid(pid, &status, 0)
    let out = (try? Files.readText(tmp + ".out")) ?? "", err = (try? Files.readText(tmp + ".err")) ?? ""
    unlink(tmp + ".out"); unlink(tmp + ".err")
    let exited = status & 0x7F == 0
    return (exited ? (status >> 8) & 0xFF : 128 + (status & 0x7F), out, err)
}

func temporaryFolder() -> String {
    let dir = "/tmp/diffuse-cli-test-\(getpid())-\(UInt32.random(in: 0 ... .max))"
    try? Files.createDirectory(dir)
    return dir
}

/// The `golden/cli/*.json` cases.
func cliCases() -> [String] {
    ((try? Files.list(Fixtures.reference("golden/cli"))) ?? []).filter { $0.hasSuffix(".json") }.map { String($0.dropLast(5)) }
}

@Suite("The diffuse command line")
struct CommandLineTests {
    /// diffusers ran these with `generator=torch.Generator("cpu").manual_seed(seed)` and
    /// `num_images_per_prompt=count`: the command's own seed path (torch-compatible RNG, the
    /// initial latents of all images in one draw, ancestral noise after) must give the same pixels.
    @Test(arguments: cliCases())
    func seedPath(_ name: String) throws {
        let args = try Files.readJSON(Fixtures.reference("golden/cli/\(name).json"))
        let golden = try SafeTensorsFile(path: Fixtures.reference("golden/cli/\(name).safetensors"))
        let expected = try golden.tensor("image_uint8")
        let dir = temporaryFolder()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let count = args["count"]?.int ?? 1
        var argv = ["generate", args["prompt"]!.string!, "--model", Fixtures.reference("models/\(args["model"]!.string!)"),
                    "--scheduler", args["sched"]!.string!, "--steps", "\(args["steps"]!.int!)",
                    "--guidance", "\(args["guidance"]!.double!)",
                    "--size", "\(args["width"]!.int!)x\(args["height"]!.int!)", "--seed", "\(args["seed"]!.int!)",
                    "--count", "\(count)", "--output", dir + "/out.png", "--device", "cpu"]
        let negative = args["negative"]?.string ?? ""
        if !negative.isEmpty { argv += ["--negative-prompt", negative] }
        let run = try runDiffuse(argv)
        #expect(run.status == 0, "\(name): exit \(run.status): \(run.err)")
        let paths = count == 1 ? [dir + "/out.png"] : (1...count).map { dir + "/out-\($0).png" }
        #expect(run.out.split(separator: "\n").map(String.init) == paths, "\(name): printed \(run.out)")
        for (i, path) in paths.enumerated() {
            let file = try ImageFile.read(path)
            let want = expected.slice(i..<(i + 1)).toFloatArray()
            let got = file.image.rgb.pixels.map(Float.init)
            #expect(got.count == want.count, "\(name): image \(i) has \(got.count / 3) pixels, diffusers made \(want.count / 3)")
            let off = zip(got, want).map { abs($0 - $1) }
            #expect((off.max() ?? 0) <= 1, "\(name): image \(i) differs by up to \(off.max() ?? 0) levels")
            print("\(name) image \(i): \(off.filter { $0 > 0 }.count) of \(off.count) values one level off")

            // The parameters chunk reads back as AUTOMATIC1111 writes it.
            let text = try #require(file.text("parameters"))
            let lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
            #expect(lines.first == args["prompt"]!.string!)
            if !negative.isEmpty { #expect(lines.contains("Negative prompt: \(negative)")) }
            var fields: [String: String] = [:]
            for part in lines.last!.split(separator: ",") {
                let kv = part.split(separator: ":", maxSplits: 1).map { String($0).trimmingSpaces }
                if kv.count == 2 { fields[kv[0]] = kv[1] }
            }
            #expect(fields["Steps"] == "\(args["steps"]!.int!)")
            #expect(fields["Seed"] == "\(args["seed"]!.int!)")
            #expect(fields["Size"] == "\(args["width"]!.int!)x\(args["height"]!.int!)")
            #expect(Double(fields["CFG scale"] ?? "") == args["guidance"]!.double!)
            #expect(fields["Sampler"] != nil && fields["Model"] != nil)
        }
    }

    @Test("inpainting: --image and --mask make an image of the model's size, its strength recorded")
    func inpainting() throws {
        let dir = temporaryFolder()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let picture = dir + "/picture.png", mask = dir + "/mask.png", out = dir + "/inpainted.png"
        var pixels: [UInt8] = [], maskPixels: [UInt8] = []
        for y in 0..<16 {
            for x in 0..<24 {
                pixels += [UInt8(x * 10), UInt8(y * 15), 90]
                maskPixels.append(x < 12 ? 0 : 255)
            }
        }
        try Image(width: 24, height: 16, channels: 3, pixels: pixels).writePNG(picture)
        try Image(width: 24, height: 16, channels: 1, pixels: maskPixels).writePNG(mask)
        let r = try runDiffuse(["generate", "a boat", "--model", Fixtures.reference("models/tiny-sd15"), "--image", picture,
                                "--mask", mask, "--steps", "2", "--seed", "1", "--output", out])
        #expect(r.status == 0, "\(r.err)")
        let file = try ImageFile.read(out)
        let components = try StableDiffusionComponents.load(Fixtures.reference("models/tiny-sd15"))
        #expect(file.image.width == components.defaultImageSize.width && file.image.height == components.defaultImageSize.height)
        #expect(file.text("parameters")?.contains("Denoising strength: 1.0") == true)

        // Only the masked area: the output keeps the picture's size; the record says so.
        let cropped = dir + "/cropped.png"
        let c = try runDiffuse(["generate", "a boat", "--model", Fixtures.reference("models/tiny-sd15"), "--image", picture,
                                "--mask", mask, "--padding-mask-crop", "2", "--steps", "2", "--seed", "1", "--output", cropped])
        #expect(c.status == 0, "\(c.err)")
        let only = try ImageFile.read(cropped)
        #expect(only.image.width == 24 && only.image.height == 16)
        let parameters = only.text("parameters") ?? ""
        #expect(parameters.contains("Inpaint area: Only masked, Masked area padding: 2"), "\(parameters)")
        #expect(parameters.contains("Size: \(components.defaultImageSize.width)x\(components.defaultImageSize.height)"), "\(parameters)")
    }

    @Test("--pag-scale: perturbed-attention guidance changes the image and is recorded; scale 0 is no PAG")
    func perturbedAttentionGuidance() throws {
        let dir = temporaryFolder()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let common = ["generate", "a boat", "--model", Fixtures.reference("models/tiny-sd15"), "--steps", "2", "--seed", "3"]
        let plain = try runDiffuse(common + ["--output", dir + "/plain.png"])
        let off = try runDiffuse(common + ["--pag-scale", "0", "--output", dir + "/off.png"])
        let pag = try runDiffuse(common + ["--pag-scale", "2.5", "--pag-layer", "up", "--pag-layer", "mid", "--pag-adaptive-scale", "0.001",
                                           "--guidance-rescale", "0.3", "--output", dir + "/pag.png"])
        #expect(plain.status == 0 && off.status == 0 && pag.status == 0, "\(plain.err) \(off.err) \(pag.err)")
        let a = try ImageFile.read(dir + "/plain.png"), b = try ImageFile.read(dir + "/off.png"), c = try ImageFile.read(dir + "/pag.png")
        #expect(a.image == b.image)
        #expect(a.image != c.image)
        let parameters = c.text("parameters") ?? ""
        #expect(parameters.contains("CFG rescale: 0.3, PAG scale: 2.5, PAG adaptive scale: 0.001, PAG layers: \"up, mid\""), "\(parameters)")
    }

    @Test("an InstructPix2Pix model edits --image: its image guidance is recorded, strength and a mask are refused")
    func instructPix2Pix() throws {
        guard let source = InstructPix2PixTests.models.first else { return }
        let dir = temporaryFolder()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let model = dir + "/instruct-pix2pix", picture = dir + "/picture.png"
        try InstructPix2PixTests.writeModel(from: source.folder, to: model, extraWeight: 0.5)
        try InstructPix2PixTests.picture.writePNG(picture)
        let common = ["generate", "make it snow", "--model", model, "--image", picture, "--steps", "2", "--seed", "3"]
        let plain = try runDiffuse(common + ["--output", dir + "/plain.png"])
        let closer = try runDiffuse(common + ["--image-guidance-scale", "2.5", "--output", dir + "/closer.png"])
        #expect(plain.status == 0 && closer.status == 0, "\(plain.err) \(closer.err)")
        let a = try ImageFile.read(dir + "/plain.png"), b = try ImageFile.read(dir + "/closer.png")
        #expect(a.image != b.image)
        let size = InstructPix2PixTests.outputSize(try StableDiffusionComponents.load(model))
        #expect(a.image.width == size.width && a.image.height == size.height)
        let parameters = b.text("parameters") ?? ""
        #expect(parameters.contains("CFG scale: 7.5, Image CFG scale: 2.5, Seed: 3"), "\(parameters)")
        #expect(a.text("parameters")?.contains("Image CFG scale: 1.5") == true)
        #expect(!parameters.contains("Denoising strength"))

        let strength = try runDiffuse(common + ["--strength", "0.5", "--output", dir + "/strength.png"])
        #expect(strength.status != 0 && strength.err.contains("takes no strength"), "\(strength.err)")
        let noPicture = try runDiffuse(["generate", "make it snow", "--image-guidance-scale", "2", "--output", dir + "/none.png"])
        #expect(noPicture.status != 0 && noPicture.err.contains("--image-guidance-scale needs --image"), "\(noPicture.err)")
        let plainModel = try runDiffuse(["generate", "a boat", "--model", source.folder, "--image", picture, "--steps", "1",
                                         "--image-guidance-scale", "2", "--output", dir + "/plain-model.png"])
        #expect(plainModel.status != 0 && plainModel.err.contains("image guidance scale is for InstructPix2Pix models"), "\(plainModel.err)")
        #expect(!Files.exists(dir + "/strength.png") && !Files.exists(dir + "/plain-model.png"))
    }

    @Test("the x4 upscaler enlarges --image by the VAE's factor; --noise-level is recorded and bounded")
    func upscaler() throws {
        guard let source = UpscalerTests.models.first else { return }
        let dir = temporaryFolder()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let model = dir + "/x4-upscaler", picture = dir + "/low.png"
        try UpscalerTests.writeModel(from: source.folder, to: model)
        try UpscalerTests.picture.writePNG(picture)
        let common = ["generate", "a sharp photo", "--model", model, "--image", picture, "--steps", "2", "--seed", "5"]
        let run = try runDiffuse(common + ["--noise-level", "40", "--output", dir + "/up.png"])
        #expect(run.status == 0, "\(run.err)")
        let file = try ImageFile.read(dir + "/up.png")
        let f = try StableDiffusionComponents.load(model).vae.model.spatialScaleFactor
        #expect(file.image.width == UpscalerTests.picture.width / f * f * f && file.image.height == UpscalerTests.picture.height / f * f * f)
        let parameters = file.text("parameters") ?? ""
        #expect(parameters.contains("Noise level: 40") && !parameters.contains("Denoising strength"), "\(parameters)")
        let tooMuch = try runDiffuse(common + ["--noise-level", "400", "--output", dir + "/too-much.png"])
        #expect(tooMuch.status != 0 && tooMuch.err.contains("noise level must be in [0, 350]"), "\(tooMuch.err)")
        let noPicture = try runDiffuse(["generate", "a boat", "--noise-level", "20", "--output", dir + "/none.png"])
        #expect(noPicture.status != 0 && noPicture.err.contains("--noise-level needs --image"), "\(noPicture.err)")
        #expect(!Files.exists(dir + "/too-much.png"))
    }

    @Test("--latent-upscaler doubles the model's latents with the same generator; a latent upscaler model doubles --image")
    func latentUpscaler() throws {
        guard let source = LatentUpscalerTests.models.first else { return }
        let dir = temporaryFolder()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let model = dir + "/latent-upscaler", picture = dir + "/low.png"
        try LatentUpscalerTests.writeModel(from: source.folder, to: model)
        let f = try StableDiffusionComponents.load(source.folder).vae.model.spatialScaleFactor
        let side = 8 * f
        let run = try runDiffuse(["generate", "a sharp photo", "--model", source.folder, "--latent-upscaler", model, "--steps", "2",
                                  "--upscale-steps", "2", "--upscale-guidance", "3", "--seed", "5", "--size", "\(side)x\(side)",
                                  "--output", dir + "/chain.png"])
        #expect(run.status == 0, "\(run.err)")
        let file = try ImageFile.read(dir + "/chain.png")
        #expect(file.image.width == 2 * side && file.image.height == 2 * side)
        #expect((file.text("parameters") ?? "").contains(#"Latent upscaler: "latent-upscaler", Upscale steps: 2, Upscale CFG scale: 3.0"#))
        // What the library makes of the same chain: one generator through both pipelines.
        var r = GenerationRequest(prompt: "a sharp photo")
        (r.steps, r.seed, r.width, r.height, r.guidanceScale) = (2, 5, side, side, 7.5)
        let base = try cpuPipeline(try StableDiffusionComponents.load(source.folder))
        let generator = base.makeGenerator(r)
        var up = GenerationRequest(prompt: "a sharp photo")
        (up.steps, up.guidanceScale, up.imageLatents) = (2, 3, try base.generateLatents(r, generator: generator))
        let expected = try cpuPipeline(try StableDiffusionComponents.load(model)).generate(up, generator: generator).images[0]
        let mean = zip(file.image.pixels, expected.pixels).reduce(0.0) { $0 + abs(Double($1.0) - Double($1.1)) } / Double(expected.pixels.count)
        #expect(mean < 0.5, "mean difference \(mean) levels from the library's chain")

        try rampPicture(width: 4 * f + 3, height: 6 * f + 1).writePNG(picture)
        let direct = try runDiffuse(["generate", "a sharp photo", "--model", model, "--image", picture, "--steps", "2", "--seed", "5",
                                     "--output", dir + "/direct.png"])
        #expect(direct.status == 0, "\(direct.err)")
        let doubled = try ImageFile.read(dir + "/direct.png")
        #expect(doubled.image.width == 8 * f && doubled.image.height == 12 * f)
        #expect(!(doubled.text("parameters") ?? "").contains("Denoising strength"))

        let both = try runDiffuse(["generate", "a boat", "--latent-upscaler", model, "--refiner", model, "--output", dir + "/both.png"])
        #expect(both.status != 0 && both.err.contains("not both"), "\(both.err)")
        let noSteps = try runDiffuse(["generate", "a boat", "--latent-upscaler", model, "--upscale-steps", "0", "--output", dir + "/none.png"])
        #expect(noSteps.status != 0 && noSteps.err.contains("--upscale-steps must be at least 1"), "\(noSteps.err)")
        let alone = try runDiffuse(["generate", "a boat", "--upscale-guidance", "2", "--output", dir + "/alone.png"])
        #expect(alone.status != 0 && alone.err.contains("are for --latent-upscaler"), "\(alone.err)")
        let notOne = try runDiffuse(["generate", "a boat", "--model", source.folder, "--latent-upscaler", source.folder, "--steps", "1",
                                     "--size", "\(side)x\(side)", "--output", dir + "/not.png"])
        #expect(notOne.status != 0 && notOne.err.contains("is not a latent upscaler"), "\(notOne.err)")
    }

    @Test("a depth-to-image model changes --image along --depth-map (a PNG or a float tensor); without one it is refused")
    func depthToImage() throws {
        guard let source = DepthToImageTests.models.first else { return }
        let dir = temporaryFolder()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let model = dir + "/depth-model", picture = dir + "/picture.png"
        try DepthToImageTests.writeModel(from: source.folder, to: model, weight: 0.5)
        try DepthToImageTests.picture.writePNG(picture)
        // The same depth as a gray PNG and as a float tensor.
        let depth = DepthToImageTests.depthMap()
        let top = depth.toFloatArray().max() ?? 1
        let levels = depth.toFloatArray().map { ($0 / top * 255).rounded() }
        let (h, w) = (depth.shape[1], depth.shape[2])
        try Image(width: w, height: h, channels: 1, pixels: levels.map { UInt8($0) }).writePNG(dir + "/depth.png")
        try SafeTensors.write([("depth_map", Tensor(shape: [h, w], floats: levels))], to: dir + "/depth.safetensors")
        let common = ["generate", "a stone bridge", "--model", model, "--image", picture, "--steps", "2", "--seed", "3", "--strength", "0.9"]
        let png = try runDiffuse(common + ["--depth-map", dir + "/depth.png", "--output", dir + "/png.png"])
        let tensor = try runDiffuse(common + ["--depth-map", dir + "/depth.safetensors", "--output", dir + "/tensor.png"])
        #expect(png.status == 0 && tensor.status == 0, "\(png.err) \(tensor.err)")
        let a = try ImageFile.read(dir + "/png.png"), b = try ImageFile.read(dir + "/tensor.png")
        #expect(a.image == b.image)
        let f = try StableDiffusionComponents.load(model).vae.model.spatialScaleFactor
        let p = DepthToImageTests.picture
        #expect(a.image.width == p.width / f * f && a.image.height == p.height / f * f)
        #expect(a.text("parameters")?.contains("Denoising strength: 0.9") == true, "\(a.text("parameters") ?? "")")

        let none = try runDiffuse(common + ["--output", dir + "/none.png"])
        #expect(none.status != 0 && none.err.contains("give the picture's depth map too"), "\(none.err)")
        let noPicture = try runDiffuse(["generate", "a boat", "--depth-map", dir + "/depth.png", "--output", dir + "/no-picture.png"])
        #expect(noPicture.status != 0 && noPicture.err.contains("--depth-map needs --image"), "\(noPicture.err)")
        let missing = try runDiffuse(common + ["--depth-map", dir + "/absent.npy", "--output", dir + "/missing.png"])
        #expect(missing.status != 0 && missing.err.contains("absent.npy"), "\(missing.err)")
        #expect(!Files.exists(dir + "/none.png") && !Files.exists(dir + "/missing.png"))
    }

    @Test("an image variation model varies --image at the model's size, with an empty prompt; a prompt is refused")
    func imageVariation() throws {
        guard let source = ImageVariationTests.models.first else { return }
        let dir = temporaryFolder()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let model = dir + "/variations", picture = dir + "/picture.png"
        try ImageVariationTests.writeModel(from: source.folder, to: model)
        try ImageVariationTests.picture.writePNG(picture)
        let inspect = try runDiffuse(["inspect", model])
        #expect(inspect.out.contains("read for the picture's CLIP image embedding: image_encoder (CLIPVisionModelWithProjection)"), "\(inspect.out)")
        let run = try runDiffuse(["generate", "", "--model", model, "--image", picture, "--steps", "2", "--count", "2",
                                  "--output", dir + "/variation.png"])
        #expect(run.status == 0, "\(run.err)")
        let components = try StableDiffusionComponents.load(model)
        #expect(components.isImageVariation && components.textEncoder == nil)
        let file = try ImageFile.read(dir + "/variation-1.png")
        #expect(file.image.width == components.defaultImageSize.width && file.image.height == components.defaultImageSize.height)
        #expect(file.text("parameters")?.contains("Denoising strength") == false)
        let prompted = try runDiffuse(["generate", "a cat", "--model", model, "--image", picture, "--output", dir + "/prompted.png"])
        #expect(prompted.status != 0 && prompted.err.contains("takes no prompt (the picture is the prompt"), "\(prompted.err)")
        let noPicture = try runDiffuse(["generate", "", "--model", model, "--output", dir + "/none.png"])
        #expect(noPicture.status != 0 && noPicture.err.contains("give the picture to make variations of"), "\(noPicture.err)")
        #expect(!Files.exists(dir + "/prompted.png") && !Files.exists(dir + "/none.png"))
    }

    @Test("Stable unCLIP varies --image as the prompt says; --noise-level is recorded and bounded by its noising scheduler")
    func stableUnCLIP() throws {
        guard let source = StableUnCLIPTests.models.first else { return }
        let dir = temporaryFolder()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let model = dir + "/unclip", picture = dir + "/picture.png"
        try StableUnCLIPTests.writeModel(from: source.folder, to: model)
        try ImageVariationTests.picture.writePNG(picture)
        let common = ["generate", "a watercolor", "--model", model, "--image", picture, "--steps", "2", "--seed", "8"]
        let run = try runDiffuse(common + ["--noise-level", "200", "--output", dir + "/unclip.png"])
        #expect(run.status == 0, "\(run.err)")
        let components = try StableDiffusionComponents.load(model)
        #expect(components.isStableUnCLIP)
        let file = try ImageFile.read(dir + "/unclip.png")
        #expect(file.image.width == components.defaultImageSize.width && file.image.height == components.defaultImageSize.height)
        let parameters = file.text("parameters") ?? ""
        #expect(parameters.contains("Noise level: 200") && !parameters.contains("Denoising strength"), "\(parameters)")
        let tooMuch = try runDiffuse(common + ["--noise-level", "1000", "--output", dir + "/too-much.png"])
        #expect(tooMuch.status != 0 && tooMuch.err.contains("noise level must be in [0, 999]"), "\(tooMuch.err)")
        let strength = try runDiffuse(common + ["--strength", "0.5", "--output", dir + "/strength.png"])
        #expect(strength.status != 0 && strength.err.contains("StableUnCLIPImg2ImgPipeline takes no strength"), "\(strength.err)")
        #expect(!Files.exists(dir + "/too-much.png") && !Files.exists(dir + "/strength.png"))
    }

    @Test("a union ControlNet takes several --control-image, each with its --control-mode (a number or a name)")
    func controlNetUnion() throws {
        guard let model = ControlNetUnionTests.models.first else { return }
        let dir = try TemporaryDirectory()
        let plain = try ControlNetTests.controlNetFolder(for: model, in: dir, zero: false)
        let union = try ControlNetUnionTests.unionFolder(from: plain, in: dir, silent: false)
        let control = dir.join("control.png")
        try ControlNetTests.control.writePNG(control)
        let common = ["generate", "a red boat", "--model", model.folder, "--controlnet", union, "--steps", "2", "--seed", "2"]
        let named = try runDiffuse(common + ["--control-image", control, "--control-mode", "canny", "--control-image", control,
                                             "--control-mode", "depth", "--controlnet-scale", "0.8", "--controlnet-scale", "0.5",
                                             "--output", dir.join("named.png")])
        let numbered = try runDiffuse(common + ["--control-image", control, "--control-mode", "3", "--control-image", control,
                                                "--control-mode", "1", "--controlnet-scale", "0.8", "--controlnet-scale", "0.5",
                                                "--output", dir.join("numbered.png")])
        #expect(named.status == 0 && numbered.status == 0, "\(named.err) \(numbered.err)")
        #expect(try Image.read(dir.join("named.png")) == Image.read(dir.join("numbered.png")))
        let unknown = try runDiffuse(common + ["--control-image", control, "--control-mode", "sketchy", "--output", dir.join("x.png")])
        #expect(unknown.status != 0 && unknown.err.contains("--control-mode sketchy: give a number or one of"), "\(unknown.err)")
        let uneven = try runDiffuse(common + ["--control-image", control, "--control-image", control, "--control-mode", "1",
                                              "--output", dir.join("y.png")])
        #expect(uneven.status != 0 && uneven.err.contains("give one --control-mode per --control-image"), "\(uneven.err)")
        let none = try runDiffuse(common + ["--control-image", control, "--output", dir.join("z.png")])
        #expect(none.status != 0 && none.err.contains("needs a control mode"), "\(none.err)")
        #expect(!Files.exists(dir.join("x.png")) && !Files.exists(dir.join("y.png")) && !Files.exists(dir.join("z.png")))
    }

    @Test("--ip-adapter-mask: once per --ip-adapter, one mask per picture, \"none\" for an unmasked adapter")
    func ipAdapterMaskCounts() throws {
        let common = ["generate", "a boat", "--model", Fixtures.reference("models/tiny-sd15"), "--ip-adapter", "a.safetensors",
                      "--ip-adapter-image", "p.png,q.png", "--output", "/tmp/never-written.png"]
        let perPicture = try runDiffuse(common + ["--ip-adapter-mask", "m.png"])
        #expect(perPicture.status != 0 && perPicture.err.contains("IP-Adapter 1 has 2 pictures, so it needs 2 masks, not 1"), "\(perPicture.err)")
        let perAdapter = try runDiffuse(common + ["--ip-adapter-mask", "m.png,n.png", "--ip-adapter-mask", "none"])
        #expect(perAdapter.status != 0 && perAdapter.err.contains("give --ip-adapter-mask once per --ip-adapter"), "\(perAdapter.err)")
    }

    @Test("--refiner: the base runs to the switch, the refiner on from its latents; with the base as its own refiner that is one run")
    func refiner() throws {
        let dir = temporaryFolder()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let model = Fixtures.reference("models/tiny-sdxl")
        guard Files.exists(model) else { return }
        let common = ["generate", "a red boat", "--model", model, "--scheduler", "euler", "--steps", "5", "--seed", "4"]
        let plain = try runDiffuse(common + ["--output", dir + "/plain.png"])
        let refined = try runDiffuse(common + ["--refiner", model, "--refiner-start", "0.6", "--output", dir + "/refined.png"])
        #expect(plain.status == 0 && refined.status == 0, "\(plain.err) \(refined.err)")
        let a = try ImageFile.read(dir + "/plain.png"), b = try ImageFile.read(dir + "/refined.png")
        #expect(a.image == b.image)
        #expect(b.text("parameters")?.contains("Refiner switch at: 0.6") == true)
    }

    @Test("bad input: one clear line, a non-zero exit, no stack trace, nothing overwritten")
    func badInput() throws {
        let dir = temporaryFolder()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let model = Fixtures.reference("models/tiny-sd15")
        let existing = dir + "/exists.png"
        try Files.write(Array("keep me".utf8), to: existing)
        let notImage = dir + "/not-an-image.png"
        try Files.write(Array("plain text".utf8), to: notImage)
        let picture = dir + "/picture.png"
        try Image(width: 16, height: 16, channels: 3).writePNG(picture)
        let cases: [([String], String)] = [
            (["generate", "x", "--model", model, "--scheduler", "fancy"], "fancy"),
            (["generate", "x", "--model", model, "--size", "100x64"], "multiple"),
            (["generate", "x", "--model", model, "--steps", "0"], "steps"),
            (["generate", "x", "--model", model, "--image", notImage, "--strength", "1.5"], "strength"),
            (["generate", "x", "--model", model, "--image", notImage, "--output", dir + "/a.png"], "not-an-image.png"),
            (["generate", "x", "--model", model, "--mask", notImage], "--mask needs --image"),
            (["generate", "x", "--model", model, "--refiner", model, "--image", picture], "--refiner follows text to image"),
            (["generate", "x", "--model", model, "--refiner-config", model], "--refiner-config needs --refiner"),
            (["generate", "x", "--model", model, "--control-image", picture], "--control-image needs --controlnet"),
            (["generate", "x", "--model", model, "--controlnet-guess-mode"], "--controlnet-guess-mode needs --controlnet"),
            (["generate", "x", "--model", model, "--controlnet", dir], "give one --control-image per --controlnet"),
            (["generate", "x", "--model", model, "--controlnet", dir, "--control-image", picture, "--controlnet-scale", "1", "--controlnet-scale", "2"], "--controlnet-scale once for all"),
            (["generate", "x", "--model", model, "--controlnet", dir, "--control-image", picture, "--control-guidance", "0.9:0.1"], "--control-guidance 0.9:0.1"),
            (["generate", "x", "--model", model, "--controlnet", dir, "--control-image", picture], "config.json"),
            (["generate", "x", "--model", model, "--refiner", model, "--refiner-start", "1"], "--refiner-start must be in (0, 1)"),
            (["generate", "x", "--model", model, "--refiner", model], "not an SDXL model"),
            (["generate", "x", "--model", model, "--image", picture, "--padding-mask-crop", "8"], "--padding-mask-crop needs --image and --mask"),
            (["generate", "x", "--model", model, "--strength", "0.5"], "--strength needs --image"),
            (["generate", "x", "--model", model, "--image", picture, "--mask", notImage], "not-an-image.png"),
            (["generate", "x", "--model", dir + "/no-such-model", "--output", dir + "/b.png"], "no-such-model"),
            (["generate", "x", "--model", model, "--output", existing], "exists"),
            (["generate", "x", "--model", model, "--device", "tpu"], "tpu"),
            (["generate", "x", "--model", model, "--device", "cpu", "--channels-last"], "--channels-last"),
            (["generate", "x", "--model", model, "--prompt-2", "y"], "prompt_2"),
            (["generate", "x", "--model", model, "--freeu", "0.9,0.2"], "--freeu takes four numbers"),
            (["generate", "x", "--model", model, "--scheduler", "euler", "--timesteps", "10,500"], "must decrease"),
            (["generate", "x", "--model", model, "--timesteps", "999,x"], "--timesteps takes numbers"),
            (["generate", "x", "--model", model, "--timesteps", "999", "--sigmas", "1,0"], "not both"),
            (["generate", "x", "--model", model, "--scheduler", "pndm", "--timesteps", "ays"], "PNDMScheduler: takes no custom timesteps"),
            (["generate", "x", "--model", model, "--original-size", "512x512"], "micro-conditioning"),
            (["generate", "x", "--model", model, "--negative-target-size", "0x512"], "--negative-target-size must be WxH"),
            (["generate", "x", "--model", model, "--crops-coords-top-left", "12"], "--crops-coords-top-left must be TOP,LEFT"),
            (["generate", "x", "--model", model, "--pag-layer", "mid"], "--pag-layer need --pag-scale"),
            (["generate", "x", "--model", model, "--pag-scale=-1"], "--pag-scale must be 0 or more"),
            (["generate", "x", "--model", model, "--pag-scale", "3", "--pag-layer", "middle"], "\"middle\" matches no self-attention layer"),
            (["generate", "x", "--model", model, "--guidance-rescale", "1.5"], "--guidance-rescale must be in [0, 1]"),
            (["generate", "x", "--model", model, "--prompt-weighting", "--max-prompt-chunks", "0"], "--max-prompt-chunks must be at least 1"),
            (["generate", "x", "--model", model, "--scheduler-config", "trailing"], "--scheduler-config takes key=value"),
            (["generate", "x", "--model", model, "--scheduler", "euler", "--scheduler-config", "timestep_spacng=trailing"],
             "scheduler config timestep_spacng: EulerDiscreteScheduler does not read it"),
            (["generate", "(x:1.2.3)", "--model", model, "--prompt-weighting"], "the weight '1.2.3' in \"(x:1.2.3)\" is not a number"),
        ]
        for (argv, mention) in cases {
            let r = try runDiffuse(argv + (argv.contains("--output") ? [] : ["--output", dir + "/out.png"]))
            #expect(r.status != 0, "\(argv): exit 0")
            #expect(r.err.contains(mention), "\(argv): the message does not mention \(mention): \(r.err)")
            #expect(!r.err.contains("Fatal error") && !r.err.contains("Stack") && r.status < 128, "\(argv): crashed: \(r.err)")
        }
        #expect(try Files.readText(existing) == "keep me")
    }
}

extension String {
    var trimmingSpaces: String {
        var s = Substring(self)
        while s.first == " " { s.removeFirst() }
        while s.last == " " { s.removeLast() }
        return String(s)
    }
}
