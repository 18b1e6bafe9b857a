import DiffuseCore
import DiffuseGraph
import DiffuseModels
import Foundation
import Testing

/// A fixture config with one key replaced, as JSON text.
private func config(_ path: String, setting key: String, to value: String) throws -> [UInt8] {
    let json = try Files.readJSON(path)
    guard case .object(var members) = json else { throw FileError(path, "not an object") }
    let parsed = try JSON.parse(value)
    if let i = members.firstIndex(where: { $0.0 == key }) { members[i].1 = parsed } else { members.append((key, parsed)) }
    return Array(JSON.object(members).serialized().utf8)
}

/// The first real UNet config of the shared data (SD 1.x's layout).
private var unetConfigPath: String { Fixtures.data("configs/sd15/unet/config.json") }

@Suite struct ConfigTests {
    /// Each unsupported value is rejected when the model is built, naming the key and the value.
    @Test(arguments: [
        ("down_block_types", #"["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]"#,
         "down_block_types[1]", "SimpleCrossAttnDownBlock2D"),
        ("up_block_types", #"["UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]"#,
         "up_block_types[1]", "AttnUpBlock2D"),
        ("mid_block_type", #""UNetMidBlock2DSimpleCrossAttn""#, "mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("class_embed_type", #""projection""#, "class_embed_type", "projection"),
        ("class_embed_type", #""timestep""#, "class_embed_type", "timestep"),
        ("num_class_embeds", "0", "num_class_embeds", "0"),
        ("class_embeddings_concat", "true", "class_embeddings_concat", "true"),
        ("addition_embed_type", #""text""#, "addition_embed_type", "text"),
        ("act_fn", #""mish""#, "act_fn", "mish"),
        ("resnet_time_scale_shift", #""scale_shift""#, "resnet_time_scale_shift", "scale_shift"),
        ("time_embedding_type", #""learned""#, "time_embedding_type", "learned"),
        ("only_cross_attention", "[true, false]", "only_cross_attention", "[true, false]"),
        ("dual_cross_attention", "true", "dual_cross_attention", "true"),
        ("encoder_hid_dim", "1024", "encoder_hid_dim", "1024"),
        ("attention_type", #""gated""#, "attention_type", "gated"),
        ("num_attention_heads", "8", "num_attention_heads", "8"),
        ("norm_num_groups", "null", "norm_num_groups", "null"),
        ("attention_head_dim", "[8, 8]", "attention_head_dim", "[8, 8]"),
        ("attention_head_dim", "7", "attention_head_dim[0]", "7"),
    ])
    func unetRejects(_ key: String, _ value: String, _ expectedKey: String, _ expectedValue: String) throws {
        let bytes = try config(unetConfigPath, setting: key, to: value)
        let c = try decodeConfiguration(UNet2DConditionModel.Configuration.self, from: bytes, origin: "test")
        do {
            _ = try UNet2DConditionModel(config: c)
            Issue.record("\(key) = \(value) was accepted")
        } catch let e as ConfigError {
            #expect(e.key == expectedKey)
            #expect(e.value.contains(expectedValue))
            #expect(e.description.contains(expectedKey) && e.description.contains(expectedValue), "\(e)")
        }
    }

    /// stabilityai/stable-diffusion-x4-upscaler's UNet config builds: the noise level as a class
    /// (an embedding of 1000 rows of the time embedding's width) and the prompt attended to by the
    /// first attention of the blocks with only_cross_attention, not by the mid block's.
    @Test func x4UpscalerUNet() throws {
        let json = #"""
        {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
         "block_out_channels": [256, 512, 512, 1024], "center_input_sample": false, "cross_attention_dim": 1024,
         "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
         "downsample_padding": 1, "dual_cross_attention": false, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 7,
         "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "num_class_embeds": 1000,
         "only_cross_attention": [true, true, true, false], "out_channels": 4, "sample_size": 128,
         "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
         "use_linear_projection": true}
        """#
        let unet = try UNet2DConditionModel(config: try decodeConfiguration(UNet2DConditionModel.Configuration.self,
                                                                             from: Array(json.utf8), origin: "x4"))
        let shapes = Dictionary(uniqueKeysWithValues: unet.parameters.map { ($0.name, $0.shape) })
        #expect(shapes["class_embedding.weight"] == [1000, 1024])
        #expect(shapes["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight"] == [512, 1024])
        #expect(shapes["up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight"] == [1024, 1024])
        #expect(shapes["up_blocks.2.attentions.0.transformer_blocks.0.attn1.to_k.weight"] == [512, 1024])
        #expect(shapes["mid_block.attentions.0.transformer_blocks.0.attn1.to_k.weight"] == [1024, 1024])
        #expect(shapes["down_blocks.3.attentions.0.transformer_blocks.0.attn1.to_k.weight"] == [1024, 1024])
        #expect(unet.selfAttentionLayers.allSatisfy { $0.hasPrefix("mid_block") || $0.hasPrefix("down_blocks.3") || $0.hasPrefix("up_blocks.0") })
    }

    @Test func otherModelsReject() throws {
        let vaePath = Fixtures.data("configs/sd15/vae/config.json")
        let vae = try decodeConfiguration(AutoencoderKL.Configuration.self, from: config(
            vaePath, setting: "down_block_types",
            to: #"["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"]"#), origin: vaePath)
        #expect { try AutoencoderKL(config: vae) } throws: { e in
            (e as? ConfigError).map { $0.key == "down_block_types[1]" && $0.value.contains("AttnDownEncoderBlock2D") } ?? false
        }

        let tinyPath = Fixtures.data("configs/taesd/config.json")
        let tiny = try decodeConfiguration(AutoencoderTiny.Configuration.self,
                                           from: config(tinyPath, setting: "upsample_fn", to: #""bilinear""#), origin: tinyPath)
        #expect { try AutoencoderTiny(config: tiny) } throws: { e in
            (e as? ConfigError).map { $0.key == "upsample_fn" && $0.value.contains("bilinear") } ?? false
        }

        let clipPath = Fixtures.data("configs/sd15/text_encoder/config.json")
        let clip = try decodeConfiguration(CLIPTextConfig.self, from: config(clipPath, setting: "hidden_act", to: #""relu6""#),
                                           origin: clipPath)
        #expect { try CLIPTextModel(config: clip) } throws: { e in
            (e as? ConfigError).map { $0.key == "hidden_act" && $0.value.contains("relu6") } ?? false
        }
    }

    /// A config key of the wrong type names the file and the key.
    @Test func malformedConfigNamesFileAndKey() throws {
        let bytes = try config(unetConfigPath, setting: "layers_per_block", to: #""two""#)
        do {
            _ = try decodeConfiguration(UNet2DConditionModel.Configuration.self, from: bytes, origin: "unet/config.json")
            Issue.record("a string layers_per_block was accepted")
        } catch let e as ConfigFileError {
            #expect(e.description.contains("unet/config.json") && e.description.contains("layers_per_block"), "\(e)")
        }
    }

    /// Missing keys take diffusers' defaults, which are SD 1.x's UNet but for the text width
    /// (cross_attention_dim 1280).
    @Test func defaultsFillMissingKeys() throws {
        let sd = try UNet2DConditionModel.Configuration.load(unetConfigPath)
        let json = #"{"cross_attention_dim": \#(sd.crossAttentionDim)}"#
        let defaults = try decodeConfiguration(UNet2DConditionModel.Configuration.self, from: Array(json.utf8), origin: json)
        #expect(try UNet2DConditionModel(config: defaults).parameterCount == UNet2DConditionModel(config: sd).parameterCount)
        #expect(defaults.midBlockType == "UNetMidBlock2DCrossAttn")
        let noMid = try decodeConfiguration(UNet2DConditionModel.Configuration.self,
                                            from: Array(#"{"mid_block_type": null}"#.utf8), origin: "json")
        #expect(noMid.midBlockType == nil)
    }
}

extension UNet2DConditionModel.Configuration {
    static func load(_ path: String) throws -> Self { try loadConfiguration(Self.self, from: path) }
}

/// Weight files that do not fit the model.
@Suite(.serialized) struct WeightCheckTests {
    /// The tiny SD 1.5 VAE's weights with `edit` applied, written to a temporary file.
    private func editedWeights(_ edit: (inout [(String, Tensor)]) -> Void) throws -> (AutoencoderKL, SafeTensorsFile) {
        let folder = Fixtures.reference("models/tiny-sd15/vae")
        let vae = try AutoencoderKL(configPath: Files.join(folder, "config.json"))
        let original = try Goldens.weights(in: folder)
        var tensors = try original.tensorNames.map { ($0, try original.tensor($0)) }
        edit(&tensors)
        let path = NSTemporaryDirectory() + "diffuse-models-\(UUID().uuidString).safetensors"
        try SafeTensors.write(tensors, to: path)
        defer { unlink(path) }
        return (vae, try SafeTensorsFile(path: path))
    }

    @Test func misshapenTensorNamesTensorAndShapes() throws {
        let name = "decoder.up_blocks.0.resnets.0.conv1.weight"
        let (vae, file) = try editedWeights { tensors in
            let i = tensors.firstIndex { $0.0 == name }!
            let s = tensors[i].1.shape
            tensors[i].1 = Tensor(zeros: [s[0], s[1], 1, 1])
        }
        let expected = try #require(vae.parameters.first { $0.name == name }).shape
        do {
            try vae.checkWeights(file)
            Issue.record("a misshapen tensor was accepted")
        } catch let e as WeightError {
            let text = e.description
            #expect(text.contains(name) && text.contains("\(expected)") && text.contains("[\(expected[0]), \(expected[1]), 1, 1]"), "\(text)")
        }
        // Binding the graph on a backend reports the same.
        let graph = try vae.decoderGraph(batch: 1, height: 8, width: 8)
        #expect { try ReferenceBackend().compile(graph, weights: ModelWeights(file), options: CompileOptions()) } throws: { e in
            "\(e)".contains(name) && "\(e)".contains("\(expected)")
        }
    }

    @Test func missingTensorIsNamed() throws {
        let name = "encoder.conv_in.bias"
        let (vae, file) = try editedWeights { $0.removeAll { $0.0 == name } }
        #expect { try vae.checkWeights(file) } throws: { "\($0)".contains(name) && "\($0)".contains("missing") }
    }

    @Test func unusedTensorsAreWarned() throws {
        let (vae, file) = try editedWeights { $0.append(("decoder.extra.weight", Tensor(zeros: [2]))) }
        var warnings: [String] = []
        Log.warningHandler = { warnings.append($0) }
        defer { Log.warningHandler = nil }
        let unused = try vae.checkWeights(file)
        #expect(unused == ["decoder.extra.weight"])
        #expect(warnings.count == 1 && warnings[0].contains("decoder.extra.weight") && warnings[0].contains("AutoencoderKL"))
    }

    /// 16-bit files load: the same weights in float16 and bfloat16 decode close to float32.
    @Test(arguments: [DType.float16, .bfloat16])
    func halfPrecisionFiles(_ dtype: DType) throws {
        let (vae, file) = try editedWeights { tensors in
            tensors = tensors.map { ($0.0, $0.1.converted(to: dtype)) }
        }
        #expect(try vae.checkWeights(file).isEmpty)
        let golden = try Goldens.file("tiny-sd15/vae")
        let latents = try golden.tensor("latents").slice(0..<1)
        let sf = Float(vae.scalingFactor)
        let graph = try vae.decoderGraph(batch: latents.shape[0], height: latents.shape[2], width: latents.shape[3])
        let out = try run(graph, weights: file, on: TestBackends.all[0],
                          feeds: [AutoencoderKL.Name.latents: latents.mapFloats { $0 / sf }])
        // Rounding the weights to 8 (bf16) or 11 (fp16) mantissa bits moves the output a little.
        let c = Comparison(try #require(out[AutoencoderKL.Name.sample]), try golden.tensor("decoded").slice(0..<1), tolerance: 0.1)
        #expect(c.passes && c.maxError > 0, "\(dtype): \(c)")
    }
}

extension WeightCheckTests {
    /// A CLIP text model saved by transformers 5 (no `text_model.` prefix) loads through
    /// `canonicalWeights` and gives the same outputs.
    @Test func clipWithoutTextModelPrefix() throws {
        let testCase = try #require(GoldenTests.textEncoderCases.first)
        let folder = Goldens.modelFolder(testCase)
        let original = try Goldens.weights(in: folder)
        let stripped = try original.tensorNames.map { name in
            (name.hasPrefix("text_model.") ? String(name.dropFirst("text_model.".count)) : name, try original.tensor(name))
        }
        let path = NSTemporaryDirectory() + "diffuse-clip-\(UUID().uuidString).safetensors"
        try SafeTensors.write(stripped, to: path)
        defer { unlink(path) }
        let file = try SafeTensorsFile(path: path)
        let config = try loadConfiguration(CLIPTextConfig.self, from: Files.join(folder, "config.json"))
        let clip: any CLIPTextEncoder = config.architectures?.contains("CLIPTextModelWithProjection") == true
            ? try CLIPTextModelWithProjection(config: config) : try CLIPTextModel(config: config)
        #expect(throws: WeightError.self) { try clip.checkWeights(file) }
        let weights = clip.canonicalWeights(file)
        #expect(try clip.checkWeights(weights).isEmpty)
        #expect(clip.canonicalWeights(original) === original)

        let golden = try Goldens.file(testCase)
        let ids = try golden.tensor("input_ids").slice(0..<1)
        let rows = [ids.toIntArray()]
        let graph = try clip.graph(batch: 1, sequenceLength: rows[0].count, outputs: [.lastHiddenState])
        let out = try run(graph, weights: weights, on: TestBackends.all[0],
                          feeds: [CLIPTextModel.Name.inputIds: clip.inputIdsTensor(rows)])
        expectClose(out[CLIPTextOutput.lastHiddenState.name], try golden.tensor("last_hidden_state").slice(0..<1),
                    tolerance: TestBackends.all[0].tolerance, "\(testCase) without the text_model. prefix")
    }
}
