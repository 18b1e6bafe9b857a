import DiffuseCore
import DiffuseCPU
import DiffuseGraph
import DiffuseModels
@testable import DiffusePipelines
import Testing

/// The DPT depth estimator of depth-to-image models: transformers' outputs where the fixture set
/// has the goldens (`golden/<variant>/dpt/`, made by scripts/fixtures/make_dpt_reference.py), and
/// what holds by construction for small random DPT-Hybrid and DPT models: the CPU graph computes
/// what the reference interpreter does, BiT's weight standardization makes the depth blind to
/// each convolution's per-channel scale and offset, and a depth model without a depth map uses
/// its estimator's.
@Suite struct DepthEstimatorTests {
    @Test func transformersGoldens() throws {
        try expectOptionalGoldens(ReferenceCheck.checkDepthEstimator, models: (try? ReferenceModel.all()) ?? [],
                                  label: "DPT depth estimator", script: "make_dpt_reference.py")
    }

    /// A small DPT-Hybrid: BiT stages of one or two bottlenecks, a 2x2 token grid at 32 pixels.
    static var hybrid: DPTConfig {
        var c = DPTConfig()
        (c.isHybrid, c.hiddenSize, c.numHiddenLayers, c.numAttentionHeads, c.intermediateSize) = (true, 16, 3, 2, 24)
        (c.imageSize, c.patchSize, c.backboneOutIndices) = (32, 16, [0, 1, 1, 2])
        (c.neckHiddenSizes, c.reassembleFactors, c.fusionHiddenSize) = ([8, 16, 12, 16], [1, 1, 1, 0.5], 8)
        var bit = BiTConfig()
        (bit.layerType, bit.globalPadding, bit.embeddingDynamicPadding) = ("bottleneck", "SAME", true)
        (bit.depths, bit.hiddenSizes, bit.embeddingSize, bit.numGroups, bit.outStages) = ([1, 2, 1], [8, 16, 32], 8, 2, [1, 2, 3])
        c.backboneConfig = bit
        c.backboneFeatmapShape = [1, 32, 2, 2]
        return c
    }

    /// A small DPT reading 8-pixel patches, reassembled at 4, 2, 1 and 1/2 of the grid, with
    /// BatchNorm in the fusion units.
    static var plain: DPTConfig {
        var c = DPTConfig()
        (c.hiddenSize, c.numHiddenLayers, c.numAttentionHeads, c.intermediateSize) = (16, 2, 2, 24)
        (c.imageSize, c.patchSize, c.backboneOutIndices, c.readoutType) = (32, 8, [0, 1, 1, 1], "add")
        (c.neckHiddenSizes, c.fusionHiddenSize, c.useBatchNormInFusionResidual) = ([8, 8, 16, 16], 8, true)
        return c
    }

    /// Seeded torch-like weights, the head's last bias raised so that its ReLU keeps most of the
    /// map (as trained estimators' does).
    static func weights(_ model: DPTForDepthEstimation, seed: UInt64) throws -> TensorSource {
        let random = model.randomWeights(seed: seed)
        return InMemoryTensors(try model.parameters.map { name, _ in
            (name, name == "head.head.4.bias" ? Tensor(shape: [1], floats: [1]) : try random.tensor(name))
        })
    }

    static func depth(_ model: DPTForDepthEstimation, _ weights: TensorSource, side: Int, backend: Backend) throws -> [Float] {
        let g = try model.graph(batch: 1, height: side, width: side)
        var processor = DPTImageProcessor()
        processor.doResize = false
        let x = processor.pixelValues(rampPicture(width: side, height: side))
        return try backend.compile(g, weights: ModelWeights(model.standardizingWeights(weights)), options: CompileOptions())
            .run(host: [DPTForDepthEstimation.pixelValues: x], on: backend)[DPTForDepthEstimation.predictedDepth]!.toFloatArray()
    }

    @Test(arguments: ["hybrid", "plain"]) func cpuComputesWhatTheInterpreterDoes(kind: String) throws {
        let model = try DPTForDepthEstimation(config: kind == "hybrid" ? Self.hybrid : Self.plain)
        let weights = try Self.weights(model, seed: 3)
        // Plain DPT also at another size than its own: the positions are resized.
        for side in kind == "hybrid" ? [32] : [32, 48] {
            let want = try Self.depth(model, weights, side: side, backend: ReferenceBackend())
            let got = try Self.depth(model, weights, side: side, backend: try CPUBackend())
            #expect(want.count == side * side * (kind == "hybrid" ? 1 : 4))
            let scale = max(1, want.map(abs).max() ?? 0)
            #expect(zip(got, want).map { abs($0 - $1) }.max()! <= 1e-4 * scale, "\(kind) at \(side)")
            #expect(Set(want).count > 1, "\(kind): a constant depth says nothing")
        }
    }

    /// `WeightStandardizedConv2d` normalises each output channel of a BiT weight: scaling one and
    /// shifting it changes nothing downstream.
    @Test func weightStandardizationIgnoresScaleAndOffset() throws {
        let model = try DPTForDepthEstimation(config: Self.hybrid)
        let weights = try Self.weights(model, seed: 5)
        let changed = try model.parameters.map { name, shape -> (String, Tensor) in
            let t = try weights.tensor(name)
            guard name.hasPrefix("dpt.embeddings.backbone.") && shape.count == 4 else { return (name, t) }
            // Output channel r scaled by 0.7·(r + 1) and shifted by r mod 3.
            let n = t.count / shape[0]
            return (name, Tensor(shape: shape, floats: (0..<t.count).map { i in t.floats[i] * Float(1 + i / n) * 0.7 + Float(i / n % 3) }))
        }
        let cpu = try CPUBackend()
        let a = try Self.depth(model, weights, side: 32, backend: cpu)
        let b = try Self.depth(model, InMemoryTensors(changed), side: 32, backend: cpu)
        let scale = max(1, a.map(abs).max() ?? 0)
        #expect(zip(a, b).map { abs($0 - $1) }.max()! <= 1e-4 * scale)
    }

    /// DPT-Hybrid as stable-diffusion-2-depth's `depth_estimator/config.json` has it (older files
    /// say `embedding_type`, BiT lists BiT-50's four hidden sizes for three stages): the parameters
    /// are transformers' 122,377,985 but for the final layer norm and the first fusion layer's
    /// residual unit (1,181,696), which do not reach the depth.
    @Test func dptHybridMidasArchitecture() throws {
        let json = """
        {"embedding_type": "hybrid", "backbone_featmap_shape": [1, 1024, 24, 24], "neck_hidden_sizes": [256, 512, 768, 768],
         "reassemble_factors": [1, 1, 1, 0.5], "readout_type": "project", "use_batch_norm_in_fusion_residual": false,
         "backbone_config": {"depths": [3, 4, 9], "hidden_sizes": [256, 512, 1024, 2048], "layer_type": "bottleneck",
                             "global_padding": "same", "embedding_dynamic_padding": true, "out_features": ["stage1", "stage2", "stage3"]}}
        """
        let config = try decodeConfiguration(DPTConfig.self, from: Array(json.utf8), origin: "config.json")
        #expect(config.isHybrid && config.backboneConfig.outStages == [1, 2, 3])
        let model = try DPTForDepthEstimation(config: config)
        #expect(model.parameterCount == 121_196_289)
        #expect(try DPTForDepthEstimation(config: .dptHybridMidas).parameterCount == 121_196_289)
        var bad = config
        bad.backboneConfig.outStages = [1, 2]
        #expect(throws: ConfigError.self) { try DPTForDepthEstimation(config: bad) }
        bad = config
        bad.neckHiddenSizes = [256, 256, 768, 768]
        #expect(throws: ConfigError.self) { try DPTForDepthEstimation(config: bad) }
    }

    /// transformers' `get_resize_output_image_size`: the exact size, or with keep_aspect_ratio
    /// the side's scale that changes the picture least, rounded half to even to a multiple.
    @Test func processorSizes() {
        var p = DPTImageProcessor()
        #expect(p.resizedSize(height: 375, width: 500) == (384, 384))
        (p.keepAspectRatio, p.ensureMultipleOf) = (true, 32)
        #expect(p.resizedSize(height: 375, width: 500) == (384, 512))
        #expect(p.resizedSize(height: 600, width: 400) == (576, 384))
        p.ensureMultipleOf = 1
        #expect(p.resizedSize(height: 200, width: 100) == (384, 192))
        (p.height, p.width, p.ensureMultipleOf) = (20, 20, 8)
        // A 10x10 picture scales to 20, and 20 / 8 = 2.5 rounds (half to even) to 2 eights.
        #expect(p.resizedSize(height: 10, width: 10) == (16, 16))
        let padded = DPTImageProcessor.centrePadded(Tensor(shape: [1, 3, 2, 3], floats: (0..<18).map(Float.init)), divisor: 4)
        #expect(padded.shape == [1, 3, 4, 4])
        #expect(Array(padded.toFloatArray()[4..<8]) == [0, 1, 2, 0])
    }

    /// Without a depth map the pipeline makes one with its estimator: the same image as giving
    /// the estimator's output as the map. Without an estimator it asks for a map.
    @Test(arguments: DepthToImageTests.models.prefix(1)) func estimatedDepthIsTheEstimatorsMap(model: ReferenceModel) throws {
        var components = try DepthToImageTests.depthModel(try StableDiffusionComponents.load(model.folder), weight: 0.5)
        let dpt = try DPTForDepthEstimation(config: Self.hybrid)
        var processor = DPTImageProcessor()
        (processor.height, processor.width) = (32, 32)
        components.depthEstimator = DepthEstimatorComponent(name: "random DPT-Hybrid", model: dpt,
                                                            weights: ModelWeights(dpt.standardizingWeights(try Self.weights(dpt, seed: 9))),
                                                            processor: processor)
        let pipeline = try cpuPipeline(components)
        var r = GenerationRequest(prompt: "a stone bridge")
        (r.steps, r.seed, r.decode, r.initImage) = (2, 4, false, DepthToImageTests.picture)
        let estimated = try pipeline.generate(r).latents.toFloatArray()
        r.depthMap = try pipeline.estimatedDepth(DepthToImageTests.picture)
        #expect(r.depthMap!.shape == [1, 32, 32])
        #expect(try pipeline.generate(r).latents.toFloatArray() == estimated)
        r.depthMap = DepthToImageTests.depthMap()
        #expect(try pipeline.generate(r).latents.toFloatArray() != estimated)

        // A processor making another size than DPT-Hybrid's is refused by name.
        processor.height = 48
        components.depthEstimator!.processor = processor
        r.depthMap = nil
        do {
            _ = try cpuPipeline(components).generate(r)
            Issue.record("a 32x48 picture for a 32x32 DPT-Hybrid was taken")
        } catch {
            #expect("\(error)".contains("the depth estimator's processor made a 32x48 picture"), "\(error)")
        }
        components.depthEstimator = nil
        #expect(throws: (any Error).self) { try cpuPipeline(components).generate(r) }
    }
}
