import DiffuseCore
import DiffuseCPU
import DiffuseGraph
import DiffuseModels
@testable import DiffusePipelines
import FoundationEssentials
import Testing

/// Union ControlNets (diffusers' `ControlNetUnionModel`, xinsir/controlnet-union-sdxl-1.0):
/// diffusers' outputs where the fixture set has the goldens (`golden/<variant>/controlnet_union/`,
/// made by scripts/fixtures/make_controlnet_union_reference.py), and for every SDXL fixture model
/// with a mid block what holds by construction: a union ControlNet whose control-type embedding
/// and image offsets are silent is the plain ControlNet with the same weights, the modes and a
/// second image matter once they are not, and what the union pipelines refuse is refused by name.
@Suite struct ControlNetUnionTests {
    static let models = ControlNetTests.models.filter { (try? StableDiffusionComponents.load($0.folder))?.isXL == true }

    @Test func diffusersGoldens() throws {
        try expectOptionalGoldens(ReferenceCheck.checkControlNetUnion, models: Self.models, label: "union ControlNet",
                                  script: "make_controlnet_union_reference.py")
    }

    /// A union ControlNet folder made from `plain` (a ControlNet folder): its config with the
    /// union keys, its weights, and seeded union parts; `silent` zeroes the control-type
    /// embedding's output layer and the images' offset projection. The attention's q, k and v are
    /// written fused, as torch's `nn.MultiheadAttention` stores them.
    static func unionFolder(from plain: String, in dir: TemporaryDirectory, silent: Bool) throws -> String {
        let folder = dir.join("union-\(silent)")
        try Files.createDirectory(folder)
        let members = try Files.readJSON(Files.join(plain, "config.json")).members!.filter { $0.0 != "_class_name" }
        let width = try #require(members.first { $0.0 == "block_out_channels" }?.1.array?.first?.int)
        let config = JSON.object(members + [("_class_name", .string("ControlNetUnionModel")), ("num_control_type", .number(8)),
                                            ("num_trans_channel", .number(Double(width))), ("num_proj_channel", .number(Double(width))),
                                            ("num_trans_head", .number(width % 4 == 0 ? 4 : 2)), ("num_trans_layer", .number(1))])
        let text = config.serialized(pretty: true)
        try Files.write(Array(text.utf8), to: Files.join(folder, "config.json"))
        let model = try ControlNetModel(configJSON: Array(text.utf8), origin: "test union ControlNet")
        let base = try SafeTensorsFile(path: Files.join(plain, "diffusion_pytorch_model.safetensors"))
        let random = model.randomWeights(seed: 31)
        var tensors: [(String, Tensor)] = []
        var fused: [String: [String: Tensor]] = [:]
        for p in model.parameters {
            var t = base.info(p.name) != nil ? try base.tensor(p.name) : try random.tensor(p.name)
            if silent && (p.name.hasPrefix("spatial_ch_projs.") || p.name.hasPrefix("control_add_embedding.linear_2.")) {
                t = Tensor(zeros: p.shape)
            }
            if let r = p.name.range(of: #"\.attn\.[qkv]_proj\."#, options: .regularExpression) {
                let key = p.name[..<r.lowerBound] + ".attn.in_proj_" + (p.name.hasSuffix("weight") ? "weight" : "bias")
                fused[String(key), default: [:]][String(p.name[r].dropFirst(6).prefix(1))] = t
                continue
            }
            tensors.append((p.name, t))
        }
        for (name, parts) in fused { tensors.append((name, concatenate(["q", "k", "v"].map { parts[$0]! }, axis: 0))) }
        try SafeTensors.write(tensors, to: Files.join(folder, "diffusion_pytorch_model.safetensors"))
        return folder
    }

    static func request(_ modes: [Int], guidance: Double = 5) -> GenerationRequest {
        var r = GenerationRequest(prompt: "a red boat")
        (r.steps, r.seed, r.count, r.decode, r.guidanceScale, r.scheduler) = (3, 12, 2, false, guidance, "euler-a")
        r.controlNets = modes.enumerated().map { k, mode in
            ControlNetGuidance(image: ControlNetTests.control, conditioningScale: 0.8 + 0.2 * Double(k), controlMode: mode)
        }
        return r
    }

    @Test(arguments: models) func aSilentUnionIsThePlainControlNet(model: ReferenceModel) throws {
        let dir = try TemporaryDirectory()
        let plainFolder = try ControlNetTests.controlNetFolder(for: model, in: dir, zero: false)
        let base = try StableDiffusionComponents.load(model.folder)
        var plain = base, union = base
        plain.controlNets = [try ControlNetComponent.load(plainFolder)]
        union.controlNets = [try ControlNetComponent.load(try Self.unionFolder(from: plainFolder, in: dir, silent: true))]
        #expect(union.controlNets[0].model.config.union != nil)
        for guidance in [5.0, 1.0] {
            var r = Self.request([2], guidance: guidance)
            let got = try cpuPipeline(union).generate(r).latents.toFloatArray()
            r.controlNets[0].controlMode = nil
            let expected = try cpuPipeline(plain).generate(r).latents.toFloatArray()
            let scale = expected.map(abs).max() ?? 1
            #expect(zip(got, expected).map { abs($0 - $1) }.max() ?? 0 <= 1e-5 * scale, "guidance \(guidance)")
        }
    }

    @Test(arguments: models) func modesAndImagesMatter(model: ReferenceModel) throws {
        let dir = try TemporaryDirectory()
        let plainFolder = try ControlNetTests.controlNetFolder(for: model, in: dir, zero: false)
        var c = try StableDiffusionComponents.load(model.folder)
        c.controlNets = [try ControlNetComponent.load(try Self.unionFolder(from: plainFolder, in: dir, silent: false))]
        let pipeline = try cpuPipeline(c)
        let first = try pipeline.generate(Self.request([3])).latents.toFloatArray()
        #expect(try pipeline.generate(Self.request([1])).latents.toFloatArray() != first)
        #expect(try pipeline.generate(Self.request([3, 0])).latents.toFloatArray() != first)

        func message(_ change: (inout GenerationRequest) -> Void) -> String {
            var r = Self.request([3])
            r.steps = 1
            change(&r)
            do { _ = try pipeline.generate(r); return "" } catch { return "\(error)" }
        }
        #expect(message { $0.controlNets[0].controlMode = nil }.contains("needs a control mode"))
        #expect(message { $0.controlNets[0].controlMode = 8 }.contains("is not below the union ControlNet's num_control_type 8"))
        #expect(message { $0.controlNets = [] }.contains("needs at least one control image"))
        #expect(message { $0.controlNetGuessMode = true }.contains("guess mode under classifier-free guidance"))
        #expect(message { $0.controlNetGuessMode = true; $0.guidanceScale = 1 } == "")
        #expect(message { $0.pag = PerturbedAttentionGuidance(scale: 2) }.contains("perturbed-attention guidance with a union ControlNet"))
        // Two union ControlNets (MultiControlNetUnionModel) take an image each: the same one twice
        // at scales 0.3 and 0.5 is it once at 0.8, its residuals being linear in the scale.
        var two = c
        two.controlNets = [c.controlNets[0], c.controlNets[0]]
        var once = Self.request([3])
        once.controlNets[0].conditioningScale = 0.8
        var twice = Self.request([3, 3])
        (twice.controlNets[0].conditioningScale, twice.controlNets[1].conditioningScale) = (0.3, 0.5)
        twice.controlNets[1].image = twice.controlNets[0].image
        let want = try pipeline.generate(once).latents.toFloatArray()
        let got = try cpuPipeline(two).generate(twice).latents.toFloatArray()
        let scale = want.map(abs).max() ?? 1
        #expect(zip(got, want).map { abs($0 - $1) }.max() ?? 0 <= 1e-4 * scale)
        #expect(throws: PipelineError.self) { try cpuPipeline(two).generate(Self.request([3])) }
        var mixed = c
        mixed.controlNets.append(try ControlNetComponent.load(plainFolder))
        do {
            _ = try cpuPipeline(mixed).generate(twice)
            Issue.record("a union and a plain ControlNet were taken together")
        } catch {
            #expect("\(error)".contains("union ControlNets only"), "\(error)")
        }
        // A plain ControlNet takes no mode.
        var plain = c
        plain.controlNets = [try ControlNetComponent.load(plainFolder)]
        var r = Self.request([3])
        r.steps = 1
        #expect(throws: PipelineError.self) { try cpuPipeline(plain).generate(r) }
    }
}
