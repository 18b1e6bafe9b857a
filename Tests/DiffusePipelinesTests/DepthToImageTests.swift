import DiffuseCore
import DiffuseCPU
import DiffuseGraph
import DiffuseModels
@testable import DiffusePipelines
import Foundation
import Testing

/// Depth to image: diffusers' outputs where the fixture set has the goldens
/// (`golden/<variant>/depth/`, made by scripts/fixtures/make_depth_reference.py), and for every
/// SD 1.x/2.x fixture model what holds by construction: a UNet whose depth channel has zero
/// weights is the image-to-image pipeline, the depth map matters once it has weights (its units
/// do not: it is scaled to [-1, 1]), the depth map files read alike, and what diffusers' pipeline
/// takes no argument for is refused by name.
@Suite struct DepthToImageTests {
    /// The fixture models a depth model can be made from: one text encoder, no guidance embedding.
    static let models = ((try? ReferenceModel.all()) ?? []).filter { model in
        (try? StableDiffusionComponents.load(model.folder)).map { !$0.isXL && $0.unet.config.timeCondProjDim == nil } ?? false
    }

    @Test func diffusersGoldens() throws {
        try expectOptionalGoldens(ReferenceCheck.checkDepthToImage, models: Self.models, label: "depth to image",
                                  script: "make_depth_reference.py")
    }

    /// A picture whose size is no multiple of 8, so that the pipeline rounds it down.
    static let picture = rampPicture(width: 66, height: 43)

    /// A depth map [1, 17, 25]: a slope and a bump, `scale` and `offset` its units.
    static func depthMap(scale: Float = 1, offset: Float = 0, bumpX: Float = 0.3) -> Tensor {
        let (h, w) = (17, 25)
        var values: [Float] = []
        for y in 0..<h {
            for x in 0..<w {
                let (u, v) = (Float(x) / Float(w - 1), Float(y) / Float(h - 1))
                values.append(offset + scale * (v + 2 * exp(-((u - bumpX) * (u - bumpX) + (v - 0.5) * (v - 0.5)) / 0.04)))
            }
        }
        return Tensor(shape: [1, h, w], floats: values)
    }

    static func depthModel(_ base: StableDiffusionComponents, weight: Float) throws -> StableDiffusionComponents {
        try widenedConvIn(base, inChannels: base.vae.model.latentChannels + 1, extraWeight: weight)
    }

    @Test(arguments: models) func blindToDepthIsImageToImage(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        let depth = try Self.depthModel(base, weight: 0)
        #expect(depth.isDepthToImage && !base.isDepthToImage && !depth.isInstructPix2Pix && !depth.hasInpaintingUNet)
        let (plain, depthPipeline) = (try cpuPipeline(base), try cpuPipeline(depth))
        for (guidance, strength, scheduler) in [(5.0, 0.8, "euler-a"), (1.0, 1.0, "ddim"), (7.0, 0.5, "dpm++2m")] {
            var r = GenerationRequest(prompt: "a stone bridge")
            (r.steps, r.seed, r.count, r.decode, r.scheduler, r.guidanceScale) = (4, 9, 2, false, scheduler, guidance)
            (r.initImage, r.strength, r.negativePrompt) = (Self.picture, strength, "blurry")
            let expected = try plain.generate(r).latents.toFloatArray()
            r.depthMap = Self.depthMap()
            let got = try depthPipeline.generate(r).latents.toFloatArray()
            let scale = expected.map(abs).max() ?? 1
            #expect(zip(got, expected).map { abs($0 - $1) }.max() ?? 0 <= 1e-5 * scale, "guidance \(guidance), \(scheduler)")
        }
    }

    /// With weight on the depth channel another depth map gives another image; the same map in
    /// other units (scaled and shifted) gives the same one, and one row per image equals one row
    /// for all when the rows are the same.
    @Test(arguments: models) func theDepthMatters(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        let pipeline = try cpuPipeline(try Self.depthModel(base, weight: 0.5))
        var r = GenerationRequest(prompt: "a stone bridge")
        (r.steps, r.seed, r.decode, r.initImage, r.depthMap) = (2, 7, false, Self.picture, Self.depthMap())
        let first = try pipeline.generate(r).latents
        let f = base.vae.model.spatialScaleFactor
        #expect(first.shape[2] == Self.picture.height / f && first.shape[3] == Self.picture.width / f)
        r.depthMap = Self.depthMap(scale: 40, offset: -3)
        let other = try pipeline.generate(r).latents.toFloatArray()
        let scale = first.toFloatArray().map(abs).max() ?? 1
        #expect(zip(other, first.toFloatArray()).map { abs($0 - $1) }.max() ?? 0 <= 1e-5 * scale)
        r.depthMap = Self.depthMap(bumpX: 0.8)
        #expect(try pipeline.generate(r).latents.toFloatArray() != first.toFloatArray())

        r.count = 2
        r.depthMap = Self.depthMap()
        let shared = try pipeline.generate(r).latents.toFloatArray()
        r.depthMap = concatenate([Self.depthMap(), Self.depthMap()], axis: 0)
        #expect(try pipeline.generate(r).latents.toFloatArray() == shared)
    }

    @Test(arguments: models) func whatThePipelineTakesNotIsRefusedByName(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        let pipeline = try cpuPipeline(try Self.depthModel(base, weight: 0.5))
        func message(_ change: (inout GenerationRequest) -> Void, on p: StableDiffusionPipeline? = nil) -> String {
            var r = GenerationRequest(prompt: "a stone bridge")
            (r.steps, r.decode, r.initImage, r.depthMap) = (1, false, Self.picture, Self.depthMap())
            change(&r)
            do { _ = try (p ?? pipeline).generate(r); return "" } catch { return "\(error)" }
        }
        #expect(message { $0.initImage = nil }.contains("is a depth-to-image model (its UNet takes the latents and the picture's depth)"))
        #expect(message { $0.depthMap = nil }.contains("give the picture's depth map too"))
        #expect(message { $0.maskImage = Self.picture }.contains("StableDiffusionDepth2ImgPipeline takes no mask"))
        #expect(message { $0.width = 64 }.contains("takes no size"))
        #expect(message { $0.guidanceRescale = 0.5 }.contains("takes no guidance rescale"))
        #expect(message { $0.denoisingEnd = 0.5 }.contains("takes no denoising end"))
        #expect(message { $0.customSchedule = .timesteps([900, 500]) }.contains("takes no custom timesteps"))
        #expect(message { $0.pag = PerturbedAttentionGuidance(scale: 2) }.contains("takes no perturbed-attention guidance"))
        #expect(message { $0.imageGuidanceScale = 2 }.contains("takes no image guidance scale"))
        #expect(message { $0.depthMap = Tensor(shape: [1, 4, 4], floats: Array(repeating: 2, count: 16)) }.contains("is flat"))
        #expect(message { $0.depthMap = Tensor(shape: [3, 4, 4], floats: (0..<48).map(Float.init)) }.contains("has 3 rows"))
        #expect(message { $0.depthMap = Tensor(shape: [2, 1, 4, 4], floats: (0..<32).map(Float.init)) }.contains("must be [height, width]"))
        var nan = (0..<16).map(Float.init)
        nan[5] = .nan
        #expect(message { $0.depthMap = Tensor(shape: [4, 4], floats: nan) }.contains("not a number"))
        // Strength and clip skip are the depth pipeline's, as image to image's.
        #expect(message { $0.strength = 0.5; $0.steps = 2; $0.clipSkip = 1 } == "")
        // A model that takes no depth refuses a depth map.
        #expect(message({ $0.depthMap = Self.depthMap() }, on: try cpuPipeline(base)).contains("a depth map is for depth-to-image models"))
    }

    /// `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)` at the same size is
    /// the identity, keeps a constant, and its weights sum to one.
    @Test func bicubicResize() {
        let plane = (0..<(5 * 7)).map { Float(($0 * 37) % 11) }
        #expect(TorchInterpolate.bicubic(plane, height: 5, width: 7, toHeight: 5, toWidth: 7) == plane)
        let constant = TorchInterpolate.bicubic(Array(repeating: 3, count: 35), height: 5, width: 7, toHeight: 3, toWidth: 11)
        #expect(constant.allSatisfy { abs($0 - 3) < 1e-5 })
        for t: Float in [0, 0.25, 0.5, 0.9] { #expect(abs(TorchInterpolate.cubicWeights(t).reduce(0, +) - 1) < 1e-6) }
    }

    /// The same depth in a .safetensors, a .npy (float32, float64, float16) and a gray PNG reads alike.
    @Test func depthMapFiles() throws {
        let dir = try TemporaryDirectory()
        let (h, w) = (3, 4)
        let values = (0..<(h * w)).map { Float($0 * 20) }
        let tensor = Tensor(shape: [h, w], floats: values)
        try SafeTensors.write([("depth_map", tensor), ("note", Tensor(shape: [1], dtype: .int32, values: [Int32(1)]))],
                              to: dir.join("d.safetensors"))
        #expect(try DepthToImage.loadDepthMap(dir.join("d.safetensors")).toFloatArray() == values)
        func npy(_ descr: String, _ shape: String, _ data: [UInt8]) -> [UInt8] {
            var header = "{'descr': '\(descr)', 'fortran_order': False, 'shape': \(shape), }"
            while (10 + header.count + 1) % 64 != 0 { header += " " }
            header += "\n"
            let n = header.utf8.count
            return [0x93] + Array("NUMPY".utf8) + [1, 0, UInt8(n & 0xFF), UInt8(n >> 8)] + Array(header.utf8) + data
        }
        func bytes<T>(_ v: [T]) -> [UInt8] { v.withUnsafeBytes { Array($0) } }
        for (name, descr, data) in [("f4", "<f4", bytes(values)), ("f8", "<f8", bytes(values.map(Double.init))),
                                    ("f2", "<f2", bytes(values.map(Float16.init)))] {
            try Files.write(npy(descr, "(\(h), \(w))", data), to: dir.join("\(name).npy"))
            #expect(try DepthToImage.loadDepthMap(dir.join("\(name).npy")).toFloatArray() == values, "\(name)")
        }
        try Image(width: w, height: h, channels: 1, pixels: values.map { UInt8($0) }).writePNG(dir.join("d.png"))
        #expect(try DepthToImage.loadDepthMap(dir.join("d.png")).toFloatArray() == values)

        func message(_ path: String) -> String {
            do { _ = try DepthToImage.loadDepthMap(path); return "" } catch { return "\(error)" }
        }
        try Files.write(npy("<i8", "(\(h), \(w))", bytes(values.map { Int64($0) })), to: dir.join("ints.npy"))
        #expect(message(dir.join("ints.npy")).contains("is not a little-endian float16, float32 or float64"))
        try Files.write(npy("<f4", "(\(h), \(w + 1))", bytes(values)), to: dir.join("short.npy"))
        #expect(message(dir.join("short.npy")).contains("needs 60 bytes of data; the file has 48"))
        try Files.write(npy("<f4", "(\(h * w),)", bytes(values)), to: dir.join("flat.npy"))
        #expect(message(dir.join("flat.npy")).contains("must be [height, width] or [rows, height, width]"))
        try Files.write(Array("not numpy".utf8), to: dir.join("text.npy"))
        #expect(message(dir.join("text.npy")).contains("not a NumPy .npy file"))
        try SafeTensors.write([("a", tensor), ("b", tensor)], to: dir.join("two.safetensors"))
        #expect(message(dir.join("two.safetensors")).contains("holds a, b"))
    }

    /// `folder` (a diffusers model) with a depth UNet made as `widenedConvIn` makes it, written
    /// to `out` (for the command line, which loads models from disk).
    static func writeModel(from folder: String, to out: String, weight: Float) throws {
        try copyTree(folder, to: out)
        let base = try StableDiffusionComponents.load(folder)
        let depth = try depthModel(base, weight: weight)
        let unet = Files.join(out, "unet")
        var config = try Files.readText(Files.join(unet, "config.json"))
        let inChannels = "\"in_channels\": \(base.unet.config.inChannels)"
        #expect(config.contains(inChannels))
        config = config.replacing(inChannels, with: "\"in_channels\": \(depth.unet.config.inChannels)")
        try Files.write(Array(config.utf8), to: Files.join(unet, "config.json"))
        let source = depth.unetWeights.source
        try SafeTensors.write(try source.tensorNames.map { ($0, try source.tensor($0)) },
                              to: Files.join(unet, "diffusion_pytorch_model.safetensors"))
    }
}
