import DiffuseCore
import DiffuseCPU
import DiffuseGraph
import DiffuseModels
@testable import DiffusePipelines
import FoundationEssentials
import Testing

/// IP-Adapter: diffusers' outputs where the fixture set has the goldens (`golden/<variant>/
/// ip_adapter/`, made by scripts/fixtures/make_ip_adapter_reference.py), and for every fixture
/// model what holds by construction, with a synthetic image encoder and adapter files written in
/// h94/IP-Adapter's layout for that model's UNet: scale 0 and zero value projections leave the
/// pipeline as it was, image tokens equal to the prompt's scale the cross-attention by 1 + s,
/// diffusers' per-block (InstantStyle) scales, and refusals that name what is wrong.
@Suite struct IPAdapterTests {
    static let models = (try? ReferenceModel.all()) ?? []

    @Test func diffusersGoldens() throws {
        try expectOptionalGoldens(ReferenceCheck.checkIPAdapter, models: Self.models, label: "IP-Adapter",
                                  script: "make_ip_adapter_reference.py")
    }

    // MARK: - Synthetic files

    /// The synthetic image encoder's `projection_dim` (what a plain adapter's projection reads).
    static let projectionDim = 8

    /// A `CLIPVisionModelWithProjection` folder (config.json, model.safetensors) with seeded weights:
    /// hidden 16, 2 heads, 2 layers, 16x16 pictures in 4x4 patches.
    static func imageEncoderFolder(in dir: TemporaryDirectory, name: String = "image_encoder",
                                   projectionDim: Int = projectionDim) throws -> String {
        let folder = dir.join(name)
        try Files.createDirectory(folder)
        let config = """
            {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
             "hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 2, "intermediate_size": 24,
             "image_size": 16, "patch_size": 4, "projection_dim": \(projectionDim), "num_channels": 3,
             "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05}
            """
        let configPath = Files.join(folder, "config.json")
        try Files.write(Array(config.utf8), to: configPath)
        let model = try CLIPVisionModelWithProjection(configPath: configPath)
        let random = model.randomWeights(seed: 41)
        try SafeTensors.write(try model.parameters.map { ($0.name, try random.tensor($0.name)) },
                              to: Files.join(folder, "model.safetensors"))
        return folder
    }

    /// A plain IP-Adapter's tensors for `unet` in the original layout: `image_proj.proj` [4·cross,
    /// projection_dim] and its LayerNorm, and `ip_adapter.<2i+1>.to_k_ip/to_v_ip.weight`
    /// [channels, cross] for each cross-attention layer i, seeded.
    static func adapterTensors(for unet: UNet2DConditionModel, seed: UInt64, projectionDim: Int = projectionDim,
                               crossAttentionDim: Int? = nil, zeroValues: Bool = false) throws -> [(String, Tensor)] {
        let cross = crossAttentionDim ?? unet.config.crossAttentionDims[0]
        var shapes: [(name: String, shape: [Int])] = [
            ("image_proj.proj.weight", [4 * cross, projectionDim]), ("image_proj.proj.bias", [4 * cross]),
            ("image_proj.norm.weight", [cross]), ("image_proj.norm.bias", [cross])]
        for (i, layer) in unet.crossAttentionLayers.enumerated() {
            shapes += [("ip_adapter.\(2 * i + 1).to_k_ip.weight", [layer.channels, cross]),
                       ("ip_adapter.\(2 * i + 1).to_v_ip.weight", [layer.channels, cross])]
        }
        let random = RandomWeights(parameters: shapes, seed: seed)
        return try shapes.map { p in
            (p.name, zeroValues && p.name.hasSuffix(".to_v_ip.weight") ? Tensor(zeros: p.shape) : try random.tensor(p.name))
        }
    }

    @discardableResult
    static func writeAdapter(_ tensors: [(String, Tensor)], in dir: TemporaryDirectory, name: String) throws -> String {
        let path = dir.join(name)
        try SafeTensors.write(tensors, to: path)
        return path
    }

    /// A deterministic RGB picture of any size.
    static func picture(width: Int, height: Int, seed: Int) -> Image {
        var pixels = [UInt8](repeating: 0, count: width * height * 3)
        for y in 0..<height {
            for x in 0..<width {
                for c in 0..<3 {
                    pixels[3 * (y * width + x) + c] = UInt8((x * (29 + 13 * c) + y * (17 + 7 * c) + (x * y + seed) % 23 + 41 * seed) % 256)
                }
            }
        }
        return Image(width: width, height: height, channels: 3, pixels: pixels)
    }

    /// Seeded values in [−scale, scale).
    static func noise(_ shape: [Int], seed: UInt64, scale: Float = 1) -> Tensor {
        let t = Tensor(zeros: shape)
        var state = seed &* 0x9E37_79B9_7F4A_7C15 &+ 0x2545_F491_4F6C_DD1D
        for i in 0..<t.count {
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            t.floats[i] = (Float(state >> 40) / Float(1 << 24) * 2 - 1) * scale
        }
        return t
    }

    static func request() -> GenerationRequest {
        var r = GenerationRequest(prompt: "a lighthouse at dusk")
        (r.steps, r.seed) = (2, 7)
        return r
    }

    // MARK: - The UNet's cross-attention layers

    /// `crossAttentionLayers` lists every `attn2` the UNet declares, with its width, in the order of
    /// diffusers' `unet.attn_processors` (down blocks, up blocks, mid block; which numbers an
    /// original file's `ip_adapter.<2i+1>` weights), for the fixture models and SD 1.5 / SDXL.
    @Test func crossAttentionLayersFollowDiffusersOrder() throws {
        var unets = try Self.models.map { try StableDiffusionComponents.load($0.folder).unet }
        for name in ["sd15", "sdxl-base"] {
            let path = Fixtures.data("configs/\(name)/unet/config.json")
            if Files.exists(path) { unets.append(try UNet2DConditionModel(configPath: path)) }
        }
        try #require(!unets.isEmpty)
        for unet in unets {
            let declared = unet.parameters.compactMap { p -> (path: String, channels: Int)? in
                guard p.name.hasSuffix(".attn2.to_q.weight") else { return nil }
                return (String(p.name.dropLast(".to_q.weight".count)), p.shape[0])
            }
            let order = ["down_blocks", "up_blocks", "mid_block"]
            let want = order.flatMap { part in declared.filter { $0.path.hasPrefix(part + ".") } }
            #expect(want.count == declared.count)
            let got = unet.crossAttentionLayers
            #expect(got.map(\.path) == want.map(\.path))
            #expect(got.map(\.channels) == want.map(\.channels))
        }
    }

    // MARK: - Pipelines

    /// Scale 0 is the plain pipeline exactly (diffusers skips a zero-scale adapter); to_v_ip of
    /// zeros leaves it as it was; seeded ones change it. One picture twice attends to duplicated
    /// tokens, which softmax weighs as the one picture; the same adapter loaded twice at half the
    /// scale each is the one at full scale.
    @Test(arguments: models) func adapterBranch(model: ReferenceModel) throws {
        let dir = try TemporaryDirectory()
        let base = try StableDiffusionComponents.load(model.folder)
        let encoder = try ImageEncoderComponent.load(try Self.imageEncoderFolder(in: dir))
        let seeded = try IPAdapterComponent.load(
            try Self.writeAdapter(try Self.adapterTensors(for: base.unet, seed: 5), in: dir, name: "seeded.safetensors"))
        let zero = try IPAdapterComponent.load(
            try Self.writeAdapter(try Self.adapterTensors(for: base.unet, seed: 5, zeroValues: true), in: dir, name: "zero.safetensors"))
        let image = Self.picture(width: 60, height: 44, seed: 1)

        let r = Self.request()
        let plain = try cpuPipeline(base).generateLatents(r)

        var withSeeded = base
        try withSeeded.loadIPAdapters([seeded], imageEncoder: encoder)
        #expect(withSeeded.ipAdapters.count == 1 && withSeeded.imageEncoder != nil)
        let pipeline = try cpuPipeline(withSeeded)
        var ip = r
        ip.ipAdapters = [IPAdapterGuidance(images: [image], scale: .uniform(0))]
        do {
            let off = try pipeline.generateLatents(ip)
            #expect(off.shape == plain.shape)
            #expect(off.toFloatArray() == plain.toFloatArray(), "scale 0: \(relativeError(off, plain)) off the plain pipeline")
        } catch {
            Issue.record("scale 0 should give the plain pipeline: \(error)")
        }

        ip.ipAdapters = [IPAdapterGuidance(images: [image], scale: .uniform(1))]
        let on = try pipeline.generateLatents(ip)
        #expect(relativeError(on, plain) > 1e-3, "\(relativeError(on, plain))")

        var withZero = base
        try withZero.loadIPAdapters([zero], imageEncoder: encoder)
        let zeroed = try cpuPipeline(withZero).generateLatents(ip)
        #expect(relativeError(zeroed, plain) < 1e-6, "\(relativeError(zeroed, plain))")

        var twice = ip
        twice.ipAdapters = [IPAdapterGuidance(images: [image, image], scale: .uniform(1))]
        let duplicated = try pipeline.generateLatents(twice)
        #expect(relativeError(duplicated, on) < 1e-4, "\(relativeError(duplicated, on))")

        var two = base
        try two.loadIPAdapters([seeded, seeded], imageEncoder: encoder)
        var halves = ip
        halves.ipAdapters = Array(repeating: IPAdapterGuidance(images: [image], scale: .uniform(0.5)), count: 2)
        let summed = try cpuPipeline(two).generateLatents(halves)
        #expect(relativeError(summed, on) < 1e-4, "\(relativeError(summed, on))")
    }

    /// `base` with one seeded plain IP-Adapter and the test image encoder.
    static func withSeededAdapter(_ base: StableDiffusionComponents, seed: UInt64, in dir: TemporaryDirectory) throws -> StableDiffusionComponents {
        var c = base
        try c.loadIPAdapters([try IPAdapterComponent.load(
            try writeAdapter(try adapterTensors(for: base.unet, seed: seed), in: dir, name: "a.safetensors"))],
                             imageEncoder: try ImageEncoderComponent.load(try imageEncoderFolder(in: dir)))
        return c
    }

    /// Without classifier-free guidance (no negative image) and for several images per prompt,
    /// scale 0 is still the plain pipeline and a live adapter still changes every image.
    @Test(arguments: models) func withoutGuidanceAndSeveralImages(model: ReferenceModel) throws {
        let dir = try TemporaryDirectory()
        let base = try StableDiffusionComponents.load(model.folder)
        let pipeline = try cpuPipeline(try Self.withSeededAdapter(base, seed: 9, in: dir))
        var r = Self.request()
        (r.guidanceScale, r.count) = (1, 2)
        let plain = try cpuPipeline(base).generateLatents(r)
        r.ipAdapters = [IPAdapterGuidance(images: [Self.picture(width: 36, height: 52, seed: 2)], scale: .uniform(0))]
        do {
            #expect(try pipeline.generateLatents(r).toFloatArray() == plain.toFloatArray())
        } catch {
            Issue.record("scale 0 should give the plain pipeline: \(error)")
        }
        r.ipAdapters[0].scale = .uniform(1)
        let on = try pipeline.generateLatents(r)
        for k in 0..<r.count {
            let a = on.slice(k..<(k + 1)).copy(), b = plain.slice(k..<(k + 1)).copy()
            #expect(relativeError(a, b) > 1e-3, "image \(k): \(relativeError(a, b))")
        }
    }

    // MARK: - Masks

    /// One picture under an all-white mask is the unmasked adapter; under an all-black one the
    /// adapter adds nothing (the pipeline at scale 0); two pictures under complementary masks
    /// differ from both side by side.
    @Test(arguments: models) func masks(model: ReferenceModel) throws {
        let dir = try TemporaryDirectory()
        let base = try StableDiffusionComponents.load(model.folder)
        let pipeline = try cpuPipeline(try Self.withSeededAdapter(base, seed: 5, in: dir))
        let (a, b) = (Self.picture(width: 36, height: 52, seed: 2), Self.picture(width: 40, height: 30, seed: 3))
        func flat(_ value: UInt8) -> Image { Image(width: 20, height: 12, channels: 1, pixels: Array(repeating: value, count: 240)) }
        func half(left: Bool) -> Image {
            Image(width: 20, height: 12, channels: 1, pixels: (0..<240).map { i in (i % 20 < 10) == left ? 255 : 0 })
        }
        func run(_ images: [Image], masks: [Image]?, scale: Float = 0.8, scales: IPAdapterScale? = nil) throws -> [Float] {
            var r = Self.request()
            (r.count, r.negativePrompt) = (2, "blurry")
            r.ipAdapters = [IPAdapterGuidance(images: images, scale: scales ?? .uniform(scale), masks: masks)]
            return try pipeline.generateLatents(r).toFloatArray()
        }
        func close(_ x: [Float], _ y: [Float]) -> Bool {
            let scale = y.map(abs).max() ?? 1
            return (zip(x, y).map { abs($0 - $1) }.max() ?? 0) <= 1e-5 * scale
        }
        let unmasked = try run([a], masks: nil)
        #expect(close(try run([a], masks: [flat(255)]), unmasked))
        #expect(close(try run([a], masks: [flat(0)]), try run([a], masks: nil, scale: 0)))
        let sides = try run([a, b], masks: [half(left: true), half(left: false)])
        #expect(!close(sides, try run([a, b], masks: nil)) && !close(sides, unmasked))
        // One scale per picture: equal ones are the uniform scale; a picture at 0 is as if black-masked.
        let masks = [half(left: true), half(left: false)]
        #expect(close(try run([a, b], masks: masks, scales: .perImage([0.8, 0.8])), sides))
        #expect(close(try run([a, b], masks: masks, scales: .perImage([0.8, 0])),
                      try run([a, b], masks: [half(left: true), flat(0)])))
        var r = Self.request()
        r.ipAdapters = [IPAdapterGuidance(images: [a, b], scale: .uniform(1), masks: [flat(255)])]
        #expect(throws: PipelineError.self) { try pipeline.generateLatents(r) }
        for (scales, masks) in [([Float](arrayLiteral: 0.5, 0.5), nil), ([0.5], [flat(255), flat(255)])] as [([Float], [Image]?)] {
            r.ipAdapters = [IPAdapterGuidance(images: [a, b], scale: .perImage(scales), masks: masks)]
            #expect(throws: PipelineError.self) { try pipeline.generateLatents(r) }
        }
    }

    /// diffusers' `IPAdapterMaskProcessor.downsample`: a grid of the mask's shape holding the
    /// queries, padded with zeros when it holds fewer, cut when it holds more.
    @Test func maskDownsample() {
        let ones = [Float](repeating: 1, count: 4 * 8)
        // 8 queries of a 2:1 mask: a 2x4 grid, all ones.
        #expect(IPAdapterMaskDownsample.weights(ones, height: 4, width: 8, queries: 8).toFloatArray().allSatisfy { abs($0 - 1) < 1e-6 })
        // 11 queries: rows ⌊√5.5⌋ = 2, one more as 2 does not divide 11, 3 columns: 9 ones, 2 zeros.
        let padded = IPAdapterMaskDownsample.weights(ones, height: 4, width: 8, queries: 11).toFloatArray()
        #expect(padded.count == 11 && padded.prefix(9).allSatisfy { abs($0 - 1) < 1e-6 } && padded.suffix(2) == [0, 0])
        // The left half white: the grid's left columns 1, its right ones 0.
        let left = (0..<32).map { Float($0 % 8 < 4 ? 1 : 0) }
        let grid = IPAdapterMaskDownsample.weights(left, height: 4, width: 8, queries: 8).toFloatArray()
        #expect(grid[0] > 0.9 && grid[3] < 0.1 && grid[4] > 0.9 && grid[7] < 0.1, "\(grid)")
    }

    // MARK: - The UNet

    /// With image tokens equal to the prompt's hidden states and to_k_ip/to_v_ip equal to each
    /// attn2's to_k/to_v, every cross-attention attends to the same thing twice: the output is
    /// the plain UNet's with each attn2's to_out.0.weight multiplied by 1 + s (bias unchanged).
    @Test(arguments: models) func promptTokensAsImageTokensScaleTheOutputProjection(model: ReferenceModel) throws {
        let c = try StableDiffusionComponents.load(model.folder)
        let unet = c.unet, config = unet.config
        let source = c.unetWeights.source
        let s: Float = 0.5
        let layers = unet.crossAttentionLayers
        try #require(!layers.isEmpty)
        let adapter = InMemoryTensors(origin: "attn2.to_k/to_v as to_k_ip/to_v_ip")
        let scaledOut = InMemoryTensors(origin: "attn2.to_out.0.weight × (1 + s)")
        for layer in layers {
            adapter["\(layer.path).processor.to_k_ip.0.weight"] = try source.tensor("\(layer.path).to_k.weight").converted(to: .float32).copy()
            adapter["\(layer.path).processor.to_v_ip.0.weight"] = try source.tensor("\(layer.path).to_v.weight").converted(to: .float32).copy()
            let w = try source.tensor("\(layer.path).to_out.0.weight").converted(to: .float32).copy()
            for i in 0..<w.count { w.floats[i] *= 1 + s }
            scaledOut["\(layer.path).to_out.0.weight"] = w
        }

        typealias Name = UNet2DConditionModel.Name
        let batch = 2, sequence = 5, cross = config.crossAttentionDims[0]
        let size = 2 << unet.numUpsamplers
        func graph(ipScale: Float?) throws -> Graph {
            let b = GraphBuilder()
            let xl = unet.usesTextTimeConditioning
            var inputs = UNet2DConditionModel.Inputs(
                sample: b.input(Name.sample, shape: [batch, config.inChannels, size, size]),
                timestep: b.input(Name.timestep, shape: [batch]),
                encoderHiddenStates: b.input(Name.encoderHiddenStates, shape: [batch, sequence, cross]),
                textEmbeds: xl ? b.input(Name.textEmbeds, shape: [batch, config.textEmbedsDim(timeIds: 6)]) : nil,
                timeIds: xl ? b.input(Name.timeIds, shape: [batch, 6]) : nil,
                timestepCond: config.timeCondProjDim.map { b.input(Name.timestepCond, shape: [batch, $0]) })
            if let ipScale {
                inputs.ipAdapters = [IPAdapterTokens(tokens: inputs.encoderHiddenStates, scale: .uniform(ipScale))]
            }
            b.output(Name.noisePred, unet(Params(b), inputs))
            return try b.finish()
        }
        var feeds: [String: Tensor] = [
            Name.sample: Self.noise([batch, config.inChannels, size, size], seed: 1),
            Name.timestep: Tensor(shape: [batch], floats: [500, 21]),
            Name.encoderHiddenStates: Self.noise([batch, sequence, cross], seed: 2, scale: 2)]
        if unet.usesTextTimeConditioning {
            feeds[Name.textEmbeds] = Self.noise([batch, config.textEmbedsDim(timeIds: 6)], seed: 3)
            feeds[Name.timeIds] = Tensor(shape: [batch, 6], floats: [64, 64, 0, 0, 64, 64, 48, 80, 4, 8, 48, 80])
        }
        if let cond = unet.absentTimestepCond(batch: batch) { feeds[Name.timestepCond] = cond }

        let backend = try CPUBackend()
        func run(_ g: Graph, _ weights: TensorSource) throws -> Tensor {
            try backend.compile(g, weights: ModelWeights(weights), options: CompileOptions(precision: .float32))
                .run(host: feeds, on: backend)[Name.noisePred]!
        }
        let withImage = try run(try graph(ipScale: s), PrefixedTensorSources([("", source), ("", adapter)]))
        let scaled = try run(try graph(ipScale: nil), PrefixedTensorSources([("", scaledOut), ("", source)]))
        let plain = try run(try graph(ipScale: nil), source)
        #expect(relativeError(withImage, scaled) < 2e-5, "\(relativeError(withImage, scaled))")
        #expect(relativeError(scaled, plain) > 1e-4, "the scaled projections should change the output: \(relativeError(scaled, plain))")
        // Scale 0 skips the branch: the graph needs no adapter weights at all.
        let skipped = try run(try graph(ipScale: 0), source)
        #expect(skipped.toFloatArray() == plain.toFloatArray())
    }

    // MARK: - Per-block scales

    /// diffusers' expansion (`_maybe_expand_lora_scales` with default 0, then
    /// `set_ip_adapter_scale`'s prefix match), written out independently: the scale of the
    /// cross-attention at `path`.
    static func diffusersScale(_ spec: JSON, layer path: String) -> Float {
        let parts = path.split(separator: ".").map(String.init)
        if parts[0] == "mid_block" {
            let mid = spec["mid"]
            return Float(mid?.double ?? mid?.array?.first?.double ?? 0)
        }
        let side = parts[0] == "down_blocks" ? "down" : "up"
        let block = parts[1], attention = Int(parts[3])!
        guard let value = spec[side] else { return 0 }
        let perBlock: JSON
        if value.members != nil {
            guard let v = value["block_\(block)"] else { return 0 }
            perBlock = v
        } else {
            perBlock = value
        }
        if let list = perBlock.array { return Float((list.count == 1 ? list[0] : list[attention]).double!) }
        return Float(perBlock.double!)
    }

    /// The UNet configs to expand scales on: SDXL's and SD 1.5's real ones, and the fixtures'.
    static func blockScaleConfigs() throws -> [(name: String, unet: UNet2DConditionModel)] {
        var out: [(String, UNet2DConditionModel)] = []
        for name in ["sdxl-base", "sd15"] {
            let path = Fixtures.data("configs/\(name)/unet/config.json")
            if Files.exists(path) { out.append((name, try UNet2DConditionModel(configPath: path))) }
        }
        for m in models { out.append((m.variant, try StableDiffusionComponents.load(m.folder).unet)) }
        return out
    }

    static func blockError(_ text: String, _ config: UNet2DConditionModel.Configuration) -> String? {
        do {
            _ = try IPAdapterScale.blocks(try JSON.parse(text), unet: config)
            return nil
        } catch let e as IPAdapterError {
            return e.description
        } catch {
            return "not an IPAdapterError: \(error)"
        }
    }

    /// InstantStyle's "style only" setting on the real SDXL UNet: the second attention of the
    /// last down block and of the first up block at 1, every other cross-attention at 0.
    @Test func instantStyleOnSDXL() throws {
        let path = Fixtures.data("configs/sdxl-base/unet/config.json")
        let unet = try UNet2DConditionModel(configPath: path)
        let c = unet.config
        // What the example assumes of the config: down block 2 and up block 0 have attentions,
        // 2 and 3 of them.
        try #require(c.downBlockTypes.count == 3 && c.downBlockTypes[2].contains("CrossAttn") && c.upBlockTypes[0].contains("CrossAttn"))
        try #require(c.layersPerDownBlock[2] == 2 && c.layersPerDownBlock.last! + 1 == 3)
        let spec = #"{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}}"#
        let scale = try IPAdapterScale.blocks(try JSON.parse(spec), unet: c)
        let layers = unet.crossAttentionLayers
        var ones = 0
        for layer in layers {
            let on = layer.path.hasPrefix("down_blocks.2.attentions.1.") || layer.path.hasPrefix("up_blocks.0.attentions.1.")
            #expect(scale.scale(forLayer: layer.path) == (on ? 1 : 0), "\(layer.path)")
            if on { ones += 1 }
        }
        let depth = c.transformerLayersPerDownBlock
        #expect(ones == depth[2] + depth[depth.count - 1])
        #expect(layers.contains { $0.path.hasPrefix("down_blocks.1.") } && layers.contains { $0.path.hasPrefix("mid_block.") })
        #expect(scale.scale(forLayer: "mid_block.attentions.0.transformer_blocks.0.attn2") == 0)
        #expect(scale.scale(forLayer: "down_blocks.1.attentions.1.transformer_blocks.1.attn2") == 0)
        #expect(scale.scale(forLayer: "up_blocks.0.attentions.2.transformer_blocks.9.attn2") == 0)
        // A number for "up" is every up block with attentions, all of their attentions.
        let up = try IPAdapterScale.blocks(try JSON.parse(#"{"up": 0.6}"#), unet: c)
        for layer in layers {
            #expect(up.scale(forLayer: layer.path) == (layer.path.hasPrefix("up_blocks.") ? 0.6 : 0), "\(layer.path)")
        }
        #expect(layers.contains { $0.path.hasPrefix("up_blocks.1.") })
        // Errors name the key.
        #expect(Self.blockError(#"{"up": {"block_9": 1}}"#, c)?.contains("block_9") == true)
        if let plain = c.upBlockTypes.indices.first(where: { !c.upBlockTypes[$0].contains("CrossAttn") }) {
            #expect(Self.blockError(#"{"up": {"block_\#(plain)": 1}}"#, c)?.contains("block_\(plain)") == true, "an up block without attentions")
        }
        #expect(Self.blockError(#"{"down": {"block_2": [1, 0, 1]}}"#, c)?.contains("down.block_2") == true)
        #expect(Self.blockError(#"{"up": {"block_0": [1, 0]}}"#, c)?.contains("up.block_0") == true)
        #expect(Self.blockError(#"{"middle": 1}"#, c)?.contains("middle") == true)
        #expect(Self.blockError(#"{"mid": [1, 1]}"#, c)?.contains("mid") == true)
        #expect(Self.blockError(#"{"down": {"block_1": "high"}}"#, c)?.contains("down.block_1") == true)
        #expect(Self.blockError("[1, 2]", c) != nil)
    }

    /// The expansion agrees with diffusers' for specs drawn from each config (its cross-attention
    /// blocks and their attention counts), on SDXL, SD 1.5 and every fixture UNet.
    @Test func blockScalesFollowDiffusers() throws {
        let configs = try Self.blockScaleConfigs()
        try #require(!configs.isEmpty)
        for (name, unet) in configs {
            let c = unet.config
            let layers = unet.crossAttentionLayers
            let down = c.downBlockTypes.indices.filter { c.downBlockTypes[$0].contains("CrossAttn") }
            let up = c.upBlockTypes.indices.filter { c.upBlockTypes[$0].contains("CrossAttn") }
            let n = c.downBlockTypes.count
            func list(_ count: Int, one: Int) -> String { "[" + (0..<count).map { $0 == one ? "1.0" : "0.0" }.joined(separator: ", ") + "]" }
            var specs = [#"{"up": 0.7}"#, #"{"down": 0.3}"#, "{}"]
            if let d = down.last, let u = up.first {
                let nd = c.layersPerDownBlock[d], nu = c.layersPerDownBlock[n - 1 - u] + 1
                specs.append(#"{"down": {"block_\#(d)": \#(list(nd, one: nd - 1))}, "up": {"block_\#(u)": \#(list(nu, one: min(1, nu - 1)))}}"#)
                specs.append(#"{"down": {"block_\#(d)": 0.4}, "up": {"block_\#(u)": [0.25]}}"#)
                // A wrong count of values names the block.
                let wrong = #"{"down": {"block_\#(d)": \#(list(nd + 1, one: 0))}}"#
                #expect(Self.blockError(wrong, c)?.contains("down.block_\(d)") == true, "\(name): \(wrong)")
            }
            if c.midBlockType != nil {
                specs.append(#"{"mid": 0.9, "up": 0.2}"#)
                specs.append(#"{"mid": [0.5]}"#)
            } else {
                #expect(Self.blockError(#"{"mid": 1}"#, c)?.contains("mid") == true, "\(name) has no mid block")
            }
            #expect(Self.blockError(#"{"up": {"block_\#(n + 5)": 1}}"#, c)?.contains("block_\(n + 5)") == true, "\(name)")
            for text in specs {
                let spec = try JSON.parse(text)
                let scale = try IPAdapterScale.blocks(spec, unet: c)
                for layer in layers {
                    #expect(scale.scale(forLayer: layer.path) == Self.diffusersScale(spec, layer: layer.path),
                            "\(name) \(text): \(layer.path)")
                }
            }
        }
    }

    // MARK: - Refusals

    /// Errors name what is wrong: an adapter for another UNet (the file and the tensor), a file
    /// with no image projection or a FaceID one, adapters without their image encoder or with
    /// one of another width, a request with another number of adapters than loaded.
    @Test(arguments: models) func refusals(model: ReferenceModel) throws {
        let dir = try TemporaryDirectory()
        let base = try StableDiffusionComponents.load(model.folder)
        let unet = base.unet, layers = unet.crossAttentionLayers
        let cross = unet.config.crossAttentionDims[0]
        let encoder = try ImageEncoderComponent.load(try Self.imageEncoderFolder(in: dir))
        let tensors = try Self.adapterTensors(for: unet, seed: 3)
        let good = try Self.writeAdapter(tensors, in: dir, name: "good.safetensors")
        /// The error loading the adapter at `path` into `c` with the synthetic encoder (or `other`, or none).
        func loading(_ path: String, into c: StableDiffusionComponents? = nil, other: ImageEncoderComponent? = nil,
                     withoutEncoder: Bool = false) -> String? {
            message {
                var components = c ?? base
                try components.loadIPAdapters([try IPAdapterComponent.load(path)],
                                               imageEncoder: withoutEncoder ? nil : other ?? encoder)
                return true
            }
        }
        #expect(loading(good) == nil)

        // A value projection of the wrong width for the last layer.
        let last = layers.count - 1, lastName = "ip_adapter.\(2 * last + 1).to_v_ip.weight"
        var reshaped = tensors
        let k = try #require(reshaped.firstIndex { $0.0 == lastName })
        reshaped[k].1 = Tensor(zeros: [layers[last].channels + 4, cross])
        let badShape = try Self.writeAdapter(reshaped, in: dir, name: "bad-shape.safetensors")
        let shapeText = loading(badShape) ?? ""
        #expect(shapeText.contains("bad-shape.safetensors") && shapeText.contains(lastName) && shapeText.contains(layers[last].path),
                "\(shapeText)")
        // A layer's key projection missing.
        let missingName = "ip_adapter.\(2 * last + 1).to_k_ip.weight"
        let missing = try Self.writeAdapter(tensors.filter { $0.0 != missingName }, in: dir, name: "missing.safetensors")
        let missingText = loading(missing) ?? ""
        #expect(missingText.contains("missing.safetensors") && missingText.contains(missingName), "\(missingText)")
        // One layer more than the UNet has.
        let extra = tensors + [("ip_adapter.\(2 * layers.count + 1).to_k_ip.weight", Tensor(zeros: [layers[0].channels, cross]))]
        let extraText = loading(try Self.writeAdapter(extra, in: dir, name: "extra.safetensors")) ?? ""
        #expect(extraText.contains("extra.safetensors") && extraText.contains("more attention weights"), "\(extraText)")
        // Tokens of another width than the UNet's cross-attention.
        let wide = try Self.writeAdapter(try Self.adapterTensors(for: unet, seed: 3, crossAttentionDim: cross + 8), in: dir,
                                         name: "wide.safetensors")
        let wideText = loading(wide) ?? ""
        #expect(wideText.contains("wide.safetensors") && wideText.contains("\(cross + 8)") && wideText.contains("\(cross)"), "\(wideText)")
        // This model's adapter in each fixture model whose UNet has other cross-attention layers.
        for other in Self.models where other.variant != model.variant {
            let o = try StableDiffusionComponents.load(other.folder)
            let same = o.unet.config.crossAttentionDims[0] == cross
                && o.unet.crossAttentionLayers.map(\.channels) == layers.map(\.channels)
            let text = loading(good, into: o)
            if same {
                #expect(text == nil, "\(other.variant): \(text ?? "")")
            } else {
                #expect(text?.contains("good.safetensors") == true && text?.contains("made for another model") == true,
                        "\(model.variant)'s adapter in \(other.variant): \(text ?? "loaded")")
            }
        }

        // No image projection; a FaceID file.
        let attention = tensors.filter { $0.0.hasPrefix("ip_adapter.") }
        let bare = try Self.writeAdapter(attention, in: dir, name: "bare.safetensors")
        let bareText = message { try IPAdapterComponent.load(bare) } ?? ""
        #expect(bareText.contains("bare.safetensors") && bareText.contains("image_proj"), "\(bareText)")
        let faceID = try Self.writeAdapter(attention + [("image_proj.norm.weight", Tensor(zeros: [cross])),
                                                        ("image_proj.norm.bias", Tensor(zeros: [cross])),
                                                        ("image_proj.proj.0.weight", Tensor(zeros: [2 * cross, 512]))],
                                           in: dir, name: "faceid.safetensors")
        let faceText = message { try IPAdapterComponent.load(faceID) } ?? ""
        #expect(faceText.contains("faceid.safetensors") && faceText.contains("FaceID"), "\(faceText)")
        #expect(message { try IPAdapterComponent.load(dir.join("absent.safetensors")) }?.contains("absent.safetensors") == true)
        #expect(message { try IPAdapterComponent.load(dir.path) } != nil)

        // The image encoder: absent, or of another projection width.
        #expect(loading(good, withoutEncoder: true)?.contains("image encoder") == true)
        let other = try ImageEncoderComponent.load(try Self.imageEncoderFolder(in: dir, name: "encoder-12", projectionDim: 12))
        let otherText = loading(good, other: other) ?? ""
        #expect(otherText.contains("good.safetensors") && otherText.contains("encoder-12") && otherText.contains("12"), "\(otherText)")
        // A feature extractor making pictures of another size than the encoder takes.
        let extractor = dir.join("preprocessor_config.json")
        try Files.write(Array(#"{"size": {"shortest_edge": 20}, "crop_size": {"height": 20, "width": 20}}"#.utf8), to: extractor)
        let sizeText = message { try ImageEncoderComponent.load(dir.join("image_encoder"), featureExtractor: extractor) } ?? ""
        #expect(sizeText.contains("20x20") && sizeText.contains("16x16"), "\(sizeText)")
        // The encoder beside the adapter file, as h94/IP-Adapter lays them out.
        #expect(ImageEncoderComponent.besideAdapter(good) == dir.join("image_encoder"))
        #expect(ImageEncoderComponent.besideAdapter(dir.join("encoder-12", "x.safetensors")) == nil)

        // Requests: one guidance per adapter loaded.
        var c = base
        try c.loadIPAdapters([try IPAdapterComponent.load(good)], imageEncoder: encoder)
        let pipeline = try cpuPipeline(c)
        let image = Self.picture(width: 20, height: 20, seed: 4)
        var r = Self.request()
        #expect(message { try pipeline.generateLatents(r) }?.contains("got images for 0") == true)
        r.ipAdapters = Array(repeating: IPAdapterGuidance(images: [image]), count: 2)
        #expect(message { try pipeline.generateLatents(r) }?.contains("got images for 2") == true)
        r.ipAdapters = [IPAdapterGuidance(images: [])]
        #expect(message { try pipeline.generateLatents(r) }?.contains("no image") == true)
        r.ipAdapters = [IPAdapterGuidance(images: [image], scale: .uniform(.nan))]
        #expect(message { try pipeline.generateLatents(r) }?.contains("scale") == true)
        r.ipAdapters = [IPAdapterGuidance(images: [image])]
        #expect(message { try cpuPipeline(base).generateLatents(r) }?.contains("need an IP-Adapter") == true)
        // Loading none takes them away again.
        try c.loadIPAdapters([], imageEncoder: nil)
        #expect(c.ipAdapters.isEmpty && c.imageEncoder == nil && c.ipAdapterAttentionWeights.isEmpty)
    }

    // MARK: - CLIPImageProcessor

    static let clipMean: [Double] = [0.48145466, 0.4578275, 0.40821073]
    static let clipStd: [Double] = [0.26862954, 0.26130258, 0.27577711]

    static func normalised(_ v: UInt8, channel c: Int) -> Float {
        Float((Double(v) / 255 - clipMean[c]) / clipStd[c])
    }

    @Test func imageProcessor() throws {
        let processor = CLIPImageProcessor(imageSize: 16)
        // Any picture becomes [1, 3, 16, 16]: the short side resized to 16, the long one cut.
        for (w, h) in [(60, 44), (36, 52), (16, 40), (17, 16)] {
            #expect(processor.pixelValues(Self.picture(width: w, height: h, seed: w)).shape == [1, 3, 16, 16], "\(w)x\(h)")
        }
        // A 16x16 picture is neither resized nor cut: each value is (v / 255 − mean) / std.
        let square = Self.picture(width: 16, height: 16, seed: 5)
        let x = processor.pixelValues(square)
        var worst: Float = 0
        for c in 0..<3 {
            for i in 0..<(16 * 16) {
                worst = max(worst, abs(x.floats[c * 256 + i] - Self.normalised(square.pixels[3 * i + c], channel: c)))
            }
        }
        #expect(worst < 2e-6, "\(worst)")
        // A grey picture comes out with the same values in RGB.
        let grey = Image(width: 16, height: 16, channels: 1, pixels: (0..<256).map { UInt8($0) })
        let g = processor.pixelValues(grey)
        #expect(g.shape == [1, 3, 16, 16])
        #expect(abs(g.floats[2 * 256 + 100] - Self.normalised(100, channel: 2)) < 2e-6)
        // PIL's bicubic keeps a constant picture constant, whatever the sizes.
        let colour: [UInt8] = [200, 120, 30]
        for (w, h) in [(37, 23), (19, 41), (9, 7), (16, 16)] {
            let uniform = Image(width: w, height: h, channels: 3, pixels: (0..<(w * h * 3)).map { colour[$0 % 3] })
            let u = processor.pixelValues(uniform)
            #expect(u.shape == [1, 3, 16, 16])
            for c in 0..<3 {
                let want = Self.normalised(colour[c], channel: c)
                let values = (0..<256).map { u.floats[c * 256 + $0] }
                #expect(values.allSatisfy { abs($0 - want) < 2e-6 }, "\(w)x\(h) channel \(c): \(values.min()!)...\(values.max()!), want \(want)")
            }
        }
        // A centred crop: of a picture 16 high whose columns are numbered, the middle 16 columns.
        let (w, h) = (22, 16)
        let columns = Image(width: w, height: h, channels: 3, pixels: (0..<(w * h * 3)).map { UInt8(10 * (($0 / 3) % w)) })
        let cropped = processor.pixelValues(columns)
        for col in 0..<16 {
            #expect(abs(cropped.floats[5 * 16 + col] - Self.normalised(UInt8(10 * (col + 3)), channel: 0)) < 2e-6, "column \(col)")
        }
    }

    @Test func imageProcessorConfig() throws {
        let dir = try TemporaryDirectory()
        let path = dir.join("preprocessor_config.json")
        try Files.write(Array(#"""
            {"size": {"shortest_edge": 20}, "crop_size": {"height": 20, "width": 20}, "resample": 2,
             "do_center_crop": true, "do_normalize": true, "do_resize": true,
             "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}
            """#.utf8), to: path)
        let p = try CLIPImageProcessor(configPath: path)
        #expect(p.size == .shortestEdge(20) && p.cropHeight == 20 && p.cropWidth == 20 && p.resample == .bilinear)
        #expect(p.imageMean == [0.5, 0.5, 0.5] && p.imageStd == [0.25, 0.25, 0.25])
        #expect(p.outputSize.height == 20 && p.outputSize.width == 20)
        let x = p.pixelValues(Self.picture(width: 30, height: 50, seed: 6))
        #expect(x.shape == [1, 3, 20, 20])
        let white = p.pixelValues(Image(width: 20, height: 20, channels: 3, pixels: Array(repeating: 255, count: 1200)))
        #expect(white.toFloatArray().allSatisfy { abs($0 - 2) < 1e-6 })   // (1 − 0.5) / 0.25

        // transformers' old `size: 224` form, and `crop_size` as one number.
        try Files.write(Array(#"{"size": 24, "crop_size": 24}"#.utf8), to: path)
        let old = try CLIPImageProcessor(configPath: path)
        #expect(old.size == .shortestEdge(24) && old.cropHeight == 24 && old.cropWidth == 24 && old.resample == .bicubic)

        // Nearest (PIL 0) is refused by name.
        try Files.write(Array(#"{"size": {"shortest_edge": 20}, "crop_size": {"height": 20, "width": 20}, "resample": 0}"#.utf8), to: path)
        let text = message { try CLIPImageProcessor(configPath: path) } ?? ""
        #expect(text.contains("resample") && text.contains(path), "\(text)")
        try Files.write(Array(#"{"image_std": [0.5, 0, 0.5]}"#.utf8), to: path)
        #expect(message { try CLIPImageProcessor(configPath: path) }?.contains("image_std") == true)
        try Files.write(Array(#"{"size": "big"}"#.utf8), to: path)
        #expect(message { try CLIPImageProcessor(configPath: path) }?.contains("size") == true)
    }
}
