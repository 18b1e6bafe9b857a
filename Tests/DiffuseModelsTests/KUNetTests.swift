import DiffuseCore
import DiffuseGraph
import DiffuseModels
import DiffuseSchedulers
import Testing

/// The K-UNet (stabilityai/sd-x2-latent-upscaler's denoiser) against diffusers' outputs for the
/// configs of Fixtures/k_unet (made by scripts/fixtures/make_k_unet_fixture.py): the declared
/// parameters are diffusers' state dict, name for name and shape for shape, and the forward pass
/// gives diffusers' noise_pred on every backend. The weights are drawn again from their seeds with
/// the torch-compatible generator, so the fixture holds only configs, inputs and outputs.
@Suite struct KUNetTests {
    static let folder: String = {
        let here = String(#filePath)
        return Files.join(String(here[..<here.lastIndex(of: "/")!]), "Fixtures", "k_unet")
    }()

    struct Case: CustomStringConvertible, Sendable {
        let name: String
        let weightSeed: UInt64
        let weightScale: Float
        let fourierScale: Float
        let parameters: [(String, [Int])]
        var description: String { name }
    }

    static let cases: [Case] = {
        guard let index = try? Files.readJSON(Files.join(folder, "cases.json")) else { return [] }
        return (index["cases"]?.array ?? []).compactMap { c in
            guard let name = c["name"]?.string, let seed = c["weight_seed"]?.int, let scale = c["weight_scale"]?.double,
                  let fourier = c["fourier_scale"]?.double, let parameters = c["parameters"]?.array else { return nil }
            return Case(name: name, weightSeed: UInt64(seed), weightScale: Float(scale), fourierScale: Float(fourier),
                        parameters: parameters.compactMap { p in
                            guard let pair = p.array, pair.count == 2, let n = pair[0].string, let s = pair[1].array else { return nil }
                            return (n, s.compactMap(\.int))
                        })
        }
    }()

    @Test func fixtureHasCases() { #expect(Self.cases.count >= 2, "no cases in \(Self.folder)/cases.json") }

    /// Tensor i in name order is `torch.randn(shape, generator=manual_seed(seed + i)) * scale`.
    static func weights(_ c: Case) -> InMemoryTensors {
        InMemoryTensors(c.parameters.enumerated().map { i, p in
            let scale = p.0 == "time_proj.weight" ? c.fourierScale : c.weightScale
            let t = TorchCPUGenerator(seed: c.weightSeed + UInt64(i)).randn(p.1)
            for k in 0..<t.count { t.floats[k] *= scale }
            return (p.0, t)
        })
    }

    @Test(arguments: cases) func parametersAreDiffusers(_ c: Case) throws {
        let model = try UNet2DConditionModel(configPath: Files.join(Self.folder, c.name, "config.json"))
        let ours = Dictionary(uniqueKeysWithValues: model.parameters.map { ($0.name, $0.shape) })
        let theirs = Dictionary(uniqueKeysWithValues: c.parameters.map { ($0.0, $0.1) })
        #expect(Set(ours.keys).subtracting(theirs.keys).sorted() == [], "declared but not in diffusers' state dict")
        #expect(Set(theirs.keys).subtracting(ours.keys).sorted() == [], "in diffusers' state dict but not declared")
        for (name, shape) in theirs where ours[name] != nil { #expect(ours[name] == shape, "\(name)") }
    }

    @Test(arguments: cases) func forwardIsDiffusers(_ c: Case) throws {
        let model = try UNet2DConditionModel(configPath: Files.join(Self.folder, c.name, "config.json"))
        #expect(model.config.isKUNet)
        let golden = try SafeTensorsFile(path: Files.join(Self.folder, c.name, "golden.safetensors"))
        let sample = try golden.tensor("sample"), ehs = try golden.tensor("encoder_hidden_states")
        let feeds: [String: Tensor] = [UNet2DConditionModel.Name.sample: sample,
                                       UNet2DConditionModel.Name.timestep: try golden.tensor("timestep"),
                                       UNet2DConditionModel.Name.encoderHiddenStates: ehs,
                                       UNet2DConditionModel.Name.timestepCond: try golden.tensor("timestep_cond")]
        let graph = try model.graph(batch: sample.shape[0], height: sample.shape[2], width: sample.shape[3],
                                    sequenceLength: ehs.shape[1])
        let weights = Self.weights(c)
        for b in TestBackends.all {
            let out = try run(graph, weights: weights, on: b, feeds: feeds)
            expectClose(out[UNet2DConditionModel.Name.noisePred], try golden.tensor("noise_pred"), tolerance: b.tolerance,
                        "\(c.name) on \(b)")
        }
    }

    /// What the K blocks cannot take is refused when the config is read, naming the key.
    @Test func unfitConfigsAreRefusedByName() throws {
        let path = Files.join(Self.folder, "four_blocks", "config.json")
        func refusal(_ change: (inout UNet2DConditionModel.Configuration) -> Void) -> String {
            do {
                var config = try loadConfiguration(UNet2DConditionModel.Configuration.self, from: path)
                change(&config)
                _ = try UNet2DConditionModel(config: config)
                return ""
            } catch { return "\(error)" }
        }
        #expect(refusal { _ in } == "")
        #expect(refusal { $0.midBlockType = "UNetMidBlock2DCrossAttn" }.contains("mid_block_type"))
        #expect(refusal { $0.blockOutChannels = [16, 16, 32, 32] }.contains("block_out_channels[0]"))
        #expect(refusal { $0.timeEmbeddingDim = 128 }.contains("first up block"))
        #expect(refusal { $0.upBlockTypes[3] = "UpBlock2D" }.contains("up_block_types[3]"))
        #expect(refusal { $0.timeEmbeddingType = "learned" }.contains("time_embedding_type"))
        #expect(refusal { $0.numClassEmbeds = 10 }.contains("no class"))
    }
}
