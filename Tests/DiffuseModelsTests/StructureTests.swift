import DiffuseCore
import DiffuseGraph
import DiffuseModels
import Testing

@Suite struct StructureTests {
    /// Every convolution and linear layer is attributed to the module that owns its weight (or
    /// the module around it), so profiles and errors name `down_blocks.1.attentions.0.transformer_blocks.0.attn1`.
    @Test(arguments: GoldenTests.unetCases)
    func opsAreAttributedToTheirModules(_ testCase: String) throws {
        let unet = try UNet2DConditionModel(configPath: Files.join(Goldens.modelFolder(testCase), "config.json"))
        let graph = try unet.graph(batch: 1, height: 8, width: 8, sequenceLength: 7)
        var checked = 0
        for node in graph.nodes {
            switch node.op {
            case .conv2d, .linear:
                guard case .parameter(let source) = graph[node.inputs[1]].op else { continue }
                #expect(!node.scope.isEmpty && source.description.hasPrefix(node.scope + "."),
                        "op in scope \(node.scope) uses \(source)")
                checked += 1
            default: break
            }
        }
        #expect(checked > 0)
    }

    /// diffusers crops the upsampled maps to the skips when the latent size is not a multiple of
    /// 2^upsamplers; the graph does the same, so any size gives an output of the input's size.
    @Test(arguments: GoldenTests.unetCases)
    func oddLatentSizes(_ testCase: String) throws {
        let unet = try UNet2DConditionModel(configPath: Files.join(Goldens.modelFolder(testCase), "config.json"))
        for (h, w) in [(9, 9), (5, 12), (7, 6)] {
            let graph = try unet.graph(batch: 1, height: h, width: w, sequenceLength: 3)
            let out = try #require(graph.outputs.first)
            #expect(graph[out.value].shape == [1, unet.config.outChannels, h, w])
        }
    }

    /// `mid_block_type: null` (BK-SDM) builds no mid block.
    @Test func noMidBlock() throws {
        var config = UNet2DConditionModel.Configuration()
        config.midBlockType = nil
        let unet = try UNet2DConditionModel(config: config)
        #expect(!unet.parameters.contains { $0.name.hasPrefix("mid_block.") })
        config.midBlockType = "UNetMidBlock2DCrossAttn"
        #expect(try UNet2DConditionModel(config: config).parameters.contains { $0.name.hasPrefix("mid_block.") })
    }

    /// Heads come from `attention_head_dim` (diffusers' naming quirk): SD 2.x's [5, 10, 20, 20]
    /// heads of 64 channels, SD 1.x's 8 heads of 40, 80, 160.
    @Test(arguments: ["sd15", "sd21", "sdxl-base"])
    func headsFollowAttentionHeadDim(_ folder: String) throws {
        let unet = try UNet2DConditionModel(configPath: Fixtures.data("configs/\(folder)/unet/config.json"))
        let graph = try unet.graph(batch: 1, height: 8, width: 8, sequenceLength: 1)
        let heads = unet.config.numAttentionHeadsPerBlock
        let channels = unet.config.blockOutChannels
        for node in graph.nodes {
            guard case .attention(let a) = node.op else { continue }
            // down_blocks.<i>, up_blocks.<j> (reversed), mid_block (last)
            let parts = node.scope.split(separator: ".")
            let width = node.shape[2]
            let i: Int
            switch parts[0] {
            case "down_blocks": i = Int(parts[1])!
            case "up_blocks": i = channels.count - 1 - Int(parts[1])!
            default: i = channels.count - 1
            }
            #expect(a.heads == heads[i] && width == channels[i], "\(node.scope): \(a.heads) heads over \(width)")
            #expect(a.upcast == unet.config.upcastAttention)
        }
    }

    /// transformers' pooling rule: with `eos_token_id == 2` the position of the largest id,
    /// otherwise the first `eos_token_id`.
    @Test func eosIndices() throws {
        var config = CLIPTextConfig()
        config.vocabSize = 16
        config.hiddenSize = 8
        config.numAttentionHeads = 2
        config.numHiddenLayers = 1
        config.intermediateSize = 8
        let ids = [[1, 9, 7, 3, 7], [1, 7, 12, 7, 0], [4, 5, 6, 5, 4]]
        config.eosTokenId = 7
        let first = try CLIPTextModel(config: config).eosIndices(inputIds: ids).toIntArray()
        #expect(first == [2, 5 + 1, 10 + 0])
        config.eosTokenId = 2
        let legacy = try CLIPTextModel(config: config).eosIndices(inputIds: ids).toIntArray()
        #expect(legacy == [1, 5 + 2, 10 + 2])
    }

    /// Only the layers an output needs are in the graph: hidden_states[-2] skips the last layer.
    @Test func clipGraphStopsAtTheDeepestOutput() throws {
        let folder = Fixtures.reference("models/tiny-sd15/text_encoder")
        let clip = try CLIPTextModel(configPath: Files.join(folder, "config.json"))
        let last = clip.config.numHiddenLayers - 1
        let penultimate = try clip.graph(batch: 1, sequenceLength: 5, outputs: [.penultimateHiddenState])
        #expect(!penultimate.parameters.contains { $0.source.description.contains("layers.\(last).") })
        #expect(penultimate.inputs.map(\.name) == [CLIPTextModel.Name.inputIds])
        let full = try clip.graph(batch: 1, sequenceLength: 5, outputs: [.lastHiddenState])
        #expect(full.parameters.contains { $0.source.description.contains("layers.\(last).") })
        #expect(throws: (any Error).self) { try clip.graph(batch: 1, outputs: [.textEmbeds]) }
        #expect(throws: (any Error).self) { try clip.graph(batch: 1, outputs: [.hiddenState(clip.config.numHiddenLayers + 1)]) }
        #expect(throws: (any Error).self) { try clip.graph(batch: 1, sequenceLength: clip.config.maxPositionEmbeddings + 1, outputs: [.lastHiddenState]) }
    }
}

extension StructureTests {
    /// The CPU fusion passes keep every model graph well formed: each node reads only values
    /// defined before it (a ResnetBlock2D's `conv_shortcut(x) + conv2(h)` once broke this).
    @Test(arguments: GoldenTests.unetCases)
    func fusedGraphsAreWellFormed(_ testCase: String) throws {
        let unet = try UNet2DConditionModel(configPath: Files.join(Goldens.modelFolder(testCase), "config.json"))
        let fused = GraphPasses.fuseForCPU(try unet.graph(batch: 1, height: 8, width: 8, sequenceLength: 3))
        for (i, node) in fused.nodes.enumerated() {
            #expect(node.inputs.allSatisfy { $0.index >= 0 && $0.index < i }, "node \(i) (\(node.op.name) in \(node.scope)) reads \(node.inputs)")
        }
        #expect(fused.outputs.allSatisfy { $0.value.index >= 0 && $0.value.index < fused.nodes.count })
    }

    /// Sequential offload's reordering: same values, every weight right before its first reader,
    /// and a plan that holds far fewer weight bytes at once than the whole model.
    @Test(arguments: GoldenTests.unetCases)
    func parametersMoveToFirstUse(_ testCase: String) throws {
        let unet = try UNet2DConditionModel(configPath: Files.join(Goldens.modelFolder(testCase), "config.json"))
        let g = try unet.graph(batch: 1, height: 8, width: 8, sequenceLength: 3)
        let moved = GraphPasses.parametersAtFirstUse(g)
        #expect(moved.nodes.count == g.nodes.count)
        var firstReader = [Int](repeating: -1, count: moved.nodes.count)
        for (i, node) in moved.nodes.enumerated() {
            #expect(node.inputs.allSatisfy { $0.index < i }, "node \(i) reads a later value")
            for v in node.inputs where firstReader[v.index] < 0 { firstReader[v.index] = i }
        }
        func isParameter(_ i: Int) -> Bool { if case .parameter = moved.nodes[i].op { return true } else { return false } }
        var weightBytes = 0
        for i in moved.nodes.indices where isParameter(i) {
            weightBytes += moved.nodes[i].byteCount
            guard firstReader[i] >= 0 else { continue }
            let next = ((i + 1)..<moved.nodes.count).first { !isParameter($0) }
            #expect(next == firstReader[i], "weight %\(i) (\(moved.nodes[i].scope)) is not right before its first reader")
        }
        let plan = MemoryPlanner.plan(moved) { i in
            if case .parameter = moved.nodes[i].op { return .own(bytes: moved.nodes[i].byteCount) }
            if case .input = moved.nodes[i].op { return .external }
            return .own(bytes: moved.nodes[i].byteCount)
        }
        let activations = MemoryPlanner.plan(g) { i in
            switch g.nodes[i].op {
            case .parameter, .input: return .external
            default: return .own(bytes: g.nodes[i].byteCount)
            }
        }
        #expect(plan.arenaBytes < activations.arenaBytes + weightBytes / 2,
                "streamed arena \(plan.arenaBytes) vs activations \(activations.arenaBytes) + weights \(weightBytes)")

        let weights = ModelWeights(unet.randomWeights(seed: 3))
        let feeds = Dictionary(uniqueKeysWithValues: g.inputs.map { input in
            let shape = g[input.value].shape
            return (input.name, Tensor(shape: shape, floats: (0..<shape.reduce(1, *)).map { Float(($0 * 37) % 101) / 50 - 1 }))
        })
        let a = try ReferenceBackend().compile(g, weights: weights, options: CompileOptions()).run(host: feeds, on: ReferenceBackend())
        let b = try ReferenceBackend().compile(moved, weights: weights, options: CompileOptions()).run(host: feeds, on: ReferenceBackend())
        for (name, t) in a { #expect(b[name]?.toFloatArray() == t.toFloatArray(), "output \(name)") }
    }
}

/// `GraphPasses.channelsLast`: the same values from the reference interpreter, every ungrouped
/// convolution, GroupNorm and upsampling in NHWC, and layout changes only at the graph's edges
/// and around ops that need NCHW (no transposes around the transformer blocks).
@Suite struct ChannelsLastTests {
    @Test func permutedMatchesIndexArithmetic() {
        let shape = [2, 3, 4, 5]
        let x = Tensor(shape: shape, floats: (0..<120).map(Float.init))
        for perm in [[0, 2, 3, 1], [0, 3, 1, 2], [3, 2, 1, 0], [0, 1, 2, 3]] {
            for dtype in [DType.float32, .float16] {
                let y = x.converted(to: dtype).permuted(perm).converted(to: .float32)
                #expect(y.shape == perm.map { shape[$0] })
                let st = strides(shape), got = y.toFloatArray()
                var ok = true
                for o in 0..<120 {
                    var rem = o, src = 0
                    for k in (0..<4).reversed() { src += (rem % y.shape[k]) * st[perm[k]]; rem /= y.shape[k] }
                    if got[o] != Float(src) { ok = false }
                }
                #expect(ok, "permute \(perm) \(dtype)")
            }
        }
    }

    static func check(_ g: Graph, weights: ModelWeights, maxPermutes: Int, _ what: String) throws {
        for (label, graph) in [("plain", g), ("fused", GraphPasses.fuseEpilogues(
            GraphPasses.fuseNormActivation(g, activations: Set(UnaryOp.allCases)), activations: Set(UnaryOp.allCases), maxAdds: 4))] {
            let nhwc = GraphPasses.channelsLast(graph)
            var convs = 0, nhwcConvs = 0, permutes = 0
            for n in graph.nodes { if case .conv2d(let a) = n.op, a.groups == 1 { convs += 1 } }
            for n in nhwc.nodes {
                switch n.op {
                case .conv2d: if n.channelsLast { nhwcConvs += 1 }
                case .groupNorm, .upsampleNearest2x: #expect(n.channelsLast || n.shape.count != 4, "\(what) \(label): \(n.scope) \(n.op.name) stays NCHW")
                case .permute: permutes += 1
                default: break
                }
            }
            #expect(nhwcConvs == convs, "\(what) \(label): \(nhwcConvs) of \(convs) convolutions in NHWC")
            #expect(permutes <= maxPermutes, "\(what) \(label): \(permutes) permutes (at most \(maxPermutes) expected)")
            #expect(nhwc.parameters.count == graph.parameters.count, "\(what) \(label): weights duplicated or lost")
            let feeds = Dictionary(uniqueKeysWithValues: graph.inputs.map { input in
                let shape = graph[input.value].shape
                return (input.name, Tensor(shape: shape, floats: (0..<shape.reduce(1, *)).map { Float(($0 * 37) % 101) / 50 - 1 }))
            })
            let a = try ReferenceBackend().compile(graph, weights: weights, options: CompileOptions()).run(host: feeds, on: ReferenceBackend())
            let b = try ReferenceBackend().compile(nhwc, weights: weights, options: CompileOptions()).run(host: feeds, on: ReferenceBackend())
            for (name, t) in a {
                #expect(b[name]?.shape == t.shape, "\(what) \(label) output \(name) shape")
                let x = b[name]?.toFloatArray() ?? [], y = t.toFloatArray()
                let err = zip(x, y).map { abs(Double($0) - Double($1)) }.max() ?? .infinity
                #expect(x.count == y.count && err <= 1e-5, "\(what) \(label) output \(name): max error \(err)")
            }
        }
    }

    @Test(arguments: GoldenTests.unetCases)
    func unet(_ testCase: String) throws {
        let unet = try UNet2DConditionModel(configPath: Files.join(Goldens.modelFolder(testCase), "config.json"))
        let g = try unet.graph(batch: 2, height: 8, width: 8, sequenceLength: 5)
        // In: the sample. Out: the noise prediction. Nothing in between.
        try Self.check(g, weights: ModelWeights(unet.randomWeights(seed: 5)), maxPermutes: 2, testCase)
    }

    @Test(arguments: GoldenTests.vaeCases)
    func vae(_ testCase: String) throws {
        let vae = try AutoencoderKL(configPath: Files.join(Goldens.modelFolder(testCase), "config.json"))
        let weights = ModelWeights(vae.randomWeights(seed: 6))
        // The mid-block attention reads NCHW (a reshape of the image): one transpose each way there.
        try Self.check(try vae.decoderGraph(batch: 1, height: 8, width: 8), weights: weights, maxPermutes: 2, "\(testCase) decoder")
        try Self.check(try vae.encoderGraph(batch: 1, height: 64, width: 64), weights: weights, maxPermutes: 3, "\(testCase) encoder")
    }
}
