import DiffuseCore
import DiffuseCPU
import DiffuseGraph
import DiffuseModels
@testable import DiffusePipelines
import DiffuseSchedulers
import FoundationEssentials
import Testing

/// The SDXL refiner and the ensemble of expert denoisers. diffusers' outputs are checked with
/// the image goldens (`refiner`, `ensemble` cases of make_image_reference.py); here, what holds
/// by construction for every fixture model.
@Suite struct RefinerTests {
    static let models = (try? ReferenceModel.all()) ?? []

    /// Stopping at a split and continuing from the latents with the same model is one run: the
    /// first part ends where the second begins, on the same schedule (a deterministic,
    /// single-step scheduler carries no state across).
    @Test(arguments: models) func splitScheduleIsOneRun(model: ReferenceModel) throws {
        let c = try StableDiffusionComponents.load(model.folder)
        let pipeline = try cpuPipeline(c)
        for (scheduler, split) in [("euler", 0.6), ("ddim", 0.35)] {
            var r = GenerationRequest(prompt: "a lighthouse at dusk")
            (r.steps, r.seed, r.count, r.scheduler) = (5, 9, 2, scheduler)
            let whole = try pipeline.generateLatents(r)
            var first = r
            first.denoisingEnd = split
            let part = try pipeline.generateLatents(first)
            #expect(part.toFloatArray() != whole.toFloatArray())
            var second = r
            (second.imageLatents, second.denoisingStart) = (part, split)
            #expect(try pipeline.generateLatents(second).toFloatArray() == whole.toFloatArray(), "\(model.variant) \(scheduler)")
        }
    }

    /// The split follows diffusers' cutoff round(T − f·T): the base keeps the timesteps at or
    /// above it, the second part those below.
    @Test func splitIndices() throws {
        let model = try #require(Self.models.first)
        let c = try StableDiffusionComponents.load(model.folder)
        let scheduler = try Schedulers.make(named: "euler", config: c.schedulerConfig)
        try scheduler.setTimesteps(10)
        let cutoff = try StableDiffusionPipeline.cutoffTimestep(0.8, scheduler)
        #expect(cutoff == (0.2 * Double(scheduler.alphasCumprod.count)).rounded())
        let end = try StableDiffusionPipeline.endIndex(denoisingEnd: 0.8, scheduler: scheduler, begin: 0)
        let begin = try StableDiffusionPipeline.beginIndex(denoisingStart: 0.8, scheduler: scheduler)
        #expect(end == begin && scheduler.timesteps[end - 1] >= 200 && scheduler.timesteps[begin] < 200)
    }

    /// A refiner made from an SDXL fixture: its second text encoder alone, a UNet taking that
    /// encoder's states and 5 time ids, requires_aesthetics_score (as the real refiner's folder).
    static func refinerFolder(from base: String, in dir: TemporaryDirectory) throws -> String {
        let folder = dir.join("refiner")
        try copyTree(base, to: folder)
        for name in ["text_encoder", "tokenizer"] { try FileManager.default.removeItem(atPath: Files.join(folder, name)) }
        func edit(_ file: String, _ change: ([(String, JSON)]) -> [(String, JSON)]) throws {
            let path = Files.join(folder, file)
            try Files.write(Array(JSON.object(change(try Files.readJSON(path).members!)).serialized(pretty: true).utf8), to: path, overwrite: true)
        }
        try edit("model_index.json") { members in
            members.map { k, v in ["text_encoder", "tokenizer"].contains(k) ? (k, JSON.array([.null, .null])) : (k, v) }
                .filter { $0.0 != "force_zeros_for_empty_prompt" }
                + [("requires_aesthetics_score", .bool(true)), ("force_zeros_for_empty_prompt", .bool(false))]
        }
        let te2 = try Files.readJSON(Files.join(folder, "text_encoder_2", "config.json"))
        let unetConfig = try Files.readJSON(Files.join(folder, "unet", "config.json"))
        let timeDim = unetConfig["addition_time_embed_dim"]!.int!
        try edit("unet/config.json") { members in
            members.map { k, v in
                switch k {
                case "cross_attention_dim": return (k, te2["hidden_size"]!)
                case "projection_class_embeddings_input_dim": return (k, .number(Double(te2["projection_dim"]!.int! + 5 * timeDim)))
                default: return (k, v)
                }
            }
        }
        let unet = try UNet2DConditionModel(config: try decodeConfiguration(
            UNet2DConditionModel.Configuration.self, from: try Files.read(Files.join(folder, "unet", "config.json")), origin: "refiner unet"))
        let weights = unet.randomWeights(seed: 17)
        let unetFile = Files.join(folder, "unet", "diffusion_pytorch_model.safetensors")
        try FileManager.default.removeItem(atPath: unetFile)
        try SafeTensors.write(try weights.tensorNames.map { ($0, try weights.tensor($0)) }, to: unetFile)
        return folder
    }

    /// The refiner as one file in Stability's SGM layout (sd_xl_refiner_1.0.safetensors: its UNet,
    /// VAE and OpenCLIP-bigG under `conditioner.embedders.0.model.`) reads with its config folder
    /// as the folder's weights; without configs it is refused, naming the option.
    @Test func refinerSingleFile() throws {
        let base = try #require(Self.models.first { (try? StableDiffusionComponents.load($0.folder))?.isXL == true })
        let dir = try TemporaryDirectory()
        let folder = try Self.refinerFolder(from: base.folder, in: dir)
        let source = try ModelSource.open(folder)
        // Each component's tensors under their original names: the key tables run backwards.
        let file = dir.join("refiner.safetensors")
        try SafeTensors.write(try originalLayoutTensors(source, family: .sdxlRefiner), to: file)
        #expect(SafeTensorsLayout.detect(try SafeTensorsFile(path: file)) == .stableDiffusion(.sdxlRefiner))

        let single = try ModelSource.open(file, options: .init(config: folder))
        for name in ["unet", "vae", "text_encoder_2"] {
            let want = try source.component(name).requireWeights(), got = try single.component(name).requireWeights()
            for target in want.tensorNames {
                #expect(try got.tensor(target).toFloatArray() == want.tensor(target).toFloatArray(), "\(name): \(target)")
            }
        }
        let refiner = try StableDiffusionComponents(source: single)
        #expect(refiner.textEncoder == nil && refiner.requiresAestheticsScore && refiner.timeIdCount == 5)
        #expect(message { try ModelSource.open(file) }?.contains("--config") == true)
    }

    /// The refiner loads without the first encoder, encodes prompts with the second alone, and
    /// conditions on the aesthetic scores (negative rows: the negative score, crop (0, 0)).
    @Test func refinerFromAnSDXLFixture() throws {
        let base = try #require(Self.models.first { (try? StableDiffusionComponents.load($0.folder))?.isXL == true })
        let dir = try TemporaryDirectory()
        let refiner = try StableDiffusionComponents.load(try Self.refinerFolder(from: base.folder, in: dir))
        #expect(refiner.textEncoder == nil && refiner.isXL && refiner.requiresAestheticsScore && refiner.timeIdCount == 5)
        let pipeline = try cpuPipeline(refiner)
        let embeddings = try pipeline.encodePrompt("a red boat", negative: nil, count: 1, guidance: true, clipSkip: nil)
        #expect(embeddings.hidden.shape[2] == refiner.textEncoder2!.encoder.hiddenSize)
        var r = GenerationRequest(prompt: "a red boat")
        r.cropsCoordsTopLeft = (4, 8)
        r.aestheticScore = 7
        let ids = pipeline.timeIds(r, width: 64, height: 48, count: 2, guidance: true)
        #expect(ids.shape == [4, 5])
        #expect(ids.toFloatArray() == [48, 64, 0, 0, 2.5, 48, 64, 0, 0, 2.5, 48, 64, 4, 8, 7, 48, 64, 4, 8, 7])
        // It runs image to image at SDXL's default strength (0.3), and from text too.
        (r.steps, r.initImage) = (4, Image(width: 64, height: 48, channels: 3, pixels: [UInt8](repeating: 128, count: 64 * 48 * 3)))
        #expect(pipeline.strength(r) == 0.3)
        #expect(try pipeline.generate(r).images.count == 1)
        // An SDXL embedding gives the refiner its clip_g vectors (diffusers' refiner recipe).
        let width1 = try StableDiffusionComponents.load(base.folder).textEncoder!.encoder.hiddenSize
        let width2 = refiner.textEncoder2!.encoder.hiddenSize
        let embedding = dir.join("thing.safetensors")
        try SafeTensors.write([("clip_l", Tensor(zeros: [2, width1])), ("clip_g", Tensor(zeros: [2, width2]))], to: embedding)
        let withEmbedding = try StableDiffusionComponents.load(dir.join("refiner"), embeddings: [try TextualInversion(path: embedding, token: "<thing>")])
        #expect(withEmbedding.textEncoder2!.tokenizer.vocabSize == refiner.textEncoder2!.tokenizer.vocabSize + 2)
        // A requires_aesthetics_score that disagrees with the UNet is refused by name.
        var index = try Files.readText(dir.join("refiner", "model_index.json"))
        index = index.replacingOccurrences(of: "\"requires_aesthetics_score\": true", with: "\"requires_aesthetics_score\": false")
        try Files.write(Array(index.utf8), to: dir.join("refiner", "model_index.json"), overwrite: true)
        let text = message { try StableDiffusionComponents.load(dir.join("refiner")) } ?? ""
        #expect(text.contains("requires_aesthetics_score"), "\(text)")
    }

    @Test func refusals() throws {
        let model = try #require(Self.models.first)
        let c = try StableDiffusionComponents.load(model.folder)
        let pipeline = try cpuPipeline(c)
        let factor = c.vae.model.spatialScaleFactor
        var r = GenerationRequest(prompt: "x")
        r.steps = 3
        r.denoisingEnd = 1.2
        #expect(message { try pipeline.generateLatents(r) }?.contains("denoising end must be a fraction in (0, 1)") == true)
        r.denoisingEnd = 0.5
        r.denoisingStart = 0.7
        #expect(message { try pipeline.generateLatents(r) }?.contains("must come before") == true)
        r.denoisingEnd = nil
        #expect(message { try pipeline.generateLatents(r) }?.contains("continues an image") == true)
        r.imageLatents = Tensor(zeros: [1, c.vae.model.latentChannels, 3, 3])
        r.initImage = Image(width: 8, height: 8, channels: 3)
        #expect(message { try pipeline.generateLatents(r) }?.contains("not both") == true)
        r.initImage = nil
        r.width = 4 * factor
        #expect(message { try pipeline.generateLatents(r) }?.contains("image latents make \(3 * factor)x\(3 * factor) images") == true)
    }
}
