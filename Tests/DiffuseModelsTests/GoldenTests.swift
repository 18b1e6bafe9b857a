import DiffuseCore
import DiffuseGraph
import DiffuseModels
import Testing

/// The networks against the outputs diffusers/transformers computed from the tiny fixture
/// models, on every test backend.
@Suite struct GoldenTests {
    static let textEncoderCases = Goldens.cases { $0.hasPrefix("text_encoder") }
    static let unetCases = Goldens.cases { $0 == "unet" }
    static let vaeCases = Goldens.cases { $0 == "vae" }
    static let vaeTinyCases = Goldens.cases { $0 == "vae_tiny" }

    @Test func fixturesHaveModelGoldens() {
        #expect(!Self.textEncoderCases.isEmpty, "no text encoder goldens under \(Fixtures.reference)")
        #expect(!Self.unetCases.isEmpty, "no UNet goldens")
        #expect(!Self.vaeCases.isEmpty, "no VAE goldens")
        #expect(!Self.vaeTinyCases.isEmpty, "no vae_tiny goldens")
        #expect(TestBackends.cpuUnavailable == nil, "the CPU backend cannot start: \(TestBackends.cpuUnavailable ?? "")")
        #expect(Tolerances.float32 > 0 && Tolerances.float32Reordered >= Tolerances.float32,
                "tolerances not found in the README: \(Tolerances.float32), \(Tolerances.float32Reordered)")
    }

    @Test(arguments: textEncoderCases)
    func textEncoder(_ testCase: String) throws {
        let folder = Goldens.modelFolder(testCase)
        let config = try loadConfiguration(CLIPTextConfig.self, from: Files.join(folder, "config.json"))
        let golden = try Goldens.file(testCase)
        let weights = try Goldens.weights(in: folder)
        let withProjection = config.architectures?.contains("CLIPTextModelWithProjection") ?? false
        let model: any CLIPTextEncoder = withProjection
            ? try CLIPTextModelWithProjection(config: config) : try CLIPTextModel(config: config)
        #expect(try model.checkWeights(weights).isEmpty)

        let idsTensor = try golden.tensor("input_ids")
        let (batch, seq) = (idsTensor.shape[0], idsTensor.shape[1])
        let ids = idsTensor.toIntArray()
        let rows = (0..<batch).map { Array(ids[($0 * seq)..<(($0 + 1) * seq)]) }

        // Every output the golden file holds, by its transformers name.
        var wanted: [(CLIPTextOutput, String)] = [(.lastHiddenState, "last_hidden_state"),
                                                  (.penultimateHiddenState, "hidden_states_penultimate"),
                                                  (.normalizedHiddenState(-2), "clip_skip_1")]
        wanted += withProjection ? [(.textEmbeds, "text_embeds")] : [(.pooledOutput, "pooler_output")]
        wanted = wanted.filter { golden.info($0.1) != nil }
        #expect(wanted.count == 4, "\(testCase): golden outputs \(golden.tensorNames)")

        let graph = try model.graph(batch: batch, sequenceLength: seq, outputs: wanted.map(\.0))
        for b in TestBackends.all {
            let out = try run(graph, weights: weights, on: b, feeds: [
                CLIPTextModel.Name.inputIds: model.inputIdsTensor(rows),
                CLIPTextModel.Name.eosIndices: model.eosIndices(inputIds: rows),
            ])
            for (o, key) in wanted {
                expectClose(out[o.name], try golden.tensor(key), tolerance: b.tolerance, "\(testCase) \(key) on \(b)")
            }
        }
    }

    @Test(arguments: unetCases)
    func unet(_ testCase: String) throws {
        let folder = Goldens.modelFolder(testCase)
        let model = try UNet2DConditionModel(configPath: Files.join(folder, "config.json"))
        let golden = try Goldens.file(testCase)
        let weights = try Goldens.weights(in: folder)
        #expect(try model.checkWeights(weights).isEmpty)

        let sample = try golden.tensor("sample")
        let ehs = try golden.tensor("encoder_hidden_states")
        let batch = sample.shape[0]
        var feeds: [String: Tensor] = [UNet2DConditionModel.Name.sample: sample,
                                       UNet2DConditionModel.Name.encoderHiddenStates: ehs]
        var timeIds = 6
        if model.usesTextTimeConditioning {
            let ids = try golden.tensor("time_ids")
            timeIds = ids.shape[1]
            feeds[UNet2DConditionModel.Name.textEmbeds] = try golden.tensor("text_embeds")
            feeds[UNet2DConditionModel.Name.timeIds] = ids
        }
        feeds[UNet2DConditionModel.Name.timestepCond] = model.absentTimestepCond(batch: batch)
        let graph = try model.graph(batch: batch, height: sample.shape[2], width: sample.shape[3],
                                    sequenceLength: ehs.shape[1], timeIds: timeIds)
        let cases = golden.tensorNames.filter { $0.hasPrefix("noise_pred_") }.map { String($0.dropFirst("noise_pred_".count)) }
        #expect(!cases.isEmpty, "\(testCase): no noise_pred_<case> tensors")
        for b in TestBackends.all {
            let exe = try b.backend.compile(graph, weights: ModelWeights(weights), options: b.options)
            for c in cases {
                // A scalar timestep is broadcast to the batch, as the pipeline does.
                let t = try golden.tensor("timestep_\(c)").toFloatArray()
                feeds[UNet2DConditionModel.Name.timestep] = Tensor(shape: [batch], floats: t.count == 1 ? Array(repeating: t[0], count: batch) : t)
                let out = try exe.run(host: feeds, on: b.backend)
                expectClose(out[UNet2DConditionModel.Name.noisePred], try golden.tensor("noise_pred_\(c)"),
                            tolerance: b.tolerance, "\(testCase) noise_pred_\(c) on \(b)")
            }
        }
    }

    @Test(arguments: vaeCases)
    func vae(_ testCase: String) throws {
        let folder = Goldens.modelFolder(testCase)
        let model = try AutoencoderKL(configPath: Files.join(folder, "config.json"))
        let golden = try Goldens.file(testCase)
        let weights = try Goldens.weights(in: folder)
        #expect(try model.checkWeights(weights).isEmpty)
        let sf = try golden.tensor("scaling_factor").toFloatArray()[0]
        #expect(abs(model.scalingFactor - Double(sf)) < 1e-6, "config scaling_factor \(model.scalingFactor) vs golden \(sf)")

        // Decode, as the pipeline does: latents / scaling_factor.
        let latents = try golden.tensor("latents")
        let decoder = try model.decoderGraph(batch: latents.shape[0], height: latents.shape[2], width: latents.shape[3])
        let image = try golden.tensor("image")
        let encoder = try model.encoderGraph(batch: image.shape[0], height: image.shape[2], width: image.shape[3])
        for b in TestBackends.all {
            let decoded = try run(decoder, weights: weights, on: b, feeds: [
                AutoencoderKL.Name.latents: latents.mapFloats { $0 / sf },
            ])
            expectClose(decoded[AutoencoderKL.Name.sample], try golden.tensor("decoded"), tolerance: b.tolerance,
                        "\(testCase) decoded on \(b)")
            let encoded = try run(encoder, weights: weights, on: b, feeds: [AutoencoderKL.Name.sample: image])
            expectClose(encoded[AutoencoderKL.Name.mean], try golden.tensor("encode_mean"), tolerance: b.tolerance,
                        "\(testCase) encode_mean on \(b)")
            expectClose(encoded[AutoencoderKL.Name.logvar], try golden.tensor("encode_logvar"), tolerance: b.tolerance,
                        "\(testCase) encode_logvar on \(b)")
        }
    }

    @Test(arguments: vaeTinyCases)
    func vaeTiny(_ testCase: String) throws {
        let folder = Goldens.modelFolder(testCase)
        let model = try AutoencoderTiny(configPath: Files.join(folder, "config.json"))
        let golden = try Goldens.file(testCase)
        let weights = try Goldens.weights(in: folder)
        #expect(try model.checkWeights(weights).isEmpty)

        let latents = try golden.tensor("latents")
        let image = try golden.tensor("image")
        let decoder = try model.decoderGraph(batch: latents.shape[0], height: latents.shape[2], width: latents.shape[3])
        let encoder = try model.encoderGraph(batch: image.shape[0], height: image.shape[2], width: image.shape[3])
        for b in TestBackends.all {
            let decoded = try run(decoder, weights: weights, on: b, feeds: [AutoencoderTiny.Name.latents: latents])
            expectClose(decoded[AutoencoderTiny.Name.sample], try golden.tensor("decoded"), tolerance: b.tolerance,
                        "\(testCase) decoded on \(b)")
            let encoded = try run(encoder, weights: weights, on: b, feeds: [AutoencoderTiny.Name.sample: image])
            expectClose(encoded[AutoencoderTiny.Name.latents], try golden.tensor("encoded"), tolerance: b.tolerance,
                        "\(testCase) encoded on \(b)")
        }
    }
}
