import DiffuseCore
import DiffuseCPU
import DiffuseGraph
import DiffuseModels
import FoundationEssentials
@testable import DiffusePipelines
import Testing

/// diffusers' `StableDiffusionSafetyChecker`: its scoring (numpy's float32 rounding to three
/// places, the special-care adjustment), diffusers' pipeline with one where the fixture set has
/// the goldens (`golden/<variant>/safety_checker/`, scripts/fixtures/make_safety_checker_reference.py),
/// and on every SD 1.x/2.x fixture model a checker added to its folder as the command line meets it.
@Suite struct SafetyCheckerTests {
    static let models = ((try? ReferenceModel.all()) ?? []).filter { model in
        (try? Files.readJSON(Files.join(model.folder, "model_index.json")))?["_class_name"]?.string?.contains("XL") != true
    }

    /// A unit embedding at cosine `c` from [1, 0].
    static func at(_ c: Float) -> [Float] { [c, (1 - c * c).squareRoot()] }

    @Test func scoresRoundToThreePlacesAndSpecialCareAdjusts() {
        var concepts = SafetyConcepts(concepts: [[1, 0]], conceptThresholds: [0.5], specialCare: [[0, 1]], specialCareThresholds: [2])
        func flags(_ embeddings: [[Float]]) -> [Bool] {
            concepts.flags(imageEmbeds: Tensor(shape: [embeddings.count, 2], floats: embeddings.flatMap { $0 }))
        }
        // Any length: the embedding is normalized. 0.0004 above the threshold rounds to 0.0; 0.0006 to 0.001.
        #expect(flags([[3, 0], [0, 2], Self.at(0.5004), Self.at(0.5006), Self.at(0.495)]) == [true, false, false, true, false])
        // A special-care match makes the concepts 0.01 easier: 0.495 now scores 0.005.
        concepts.specialCareThresholds = [0.1]
        #expect(flags([Self.at(0.495), Self.at(0.489)]) == [true, false])
    }

    @Test func diffusersGoldens() throws {
        try expectOptionalGoldens(ReferenceCheck.checkSafetyChecker, models: Self.models, label: "safety checker",
                                  script: "make_safety_checker_reference.py")
    }

    /// `model`'s folder with a seeded checker (a small ViT, every threshold out of reach, or
    /// every image flagged with `flagAll`) listed in model_index.json, in a temporary folder.
    static func withChecker(_ model: ReferenceModel, flagAll: Bool, dir: TemporaryDirectory) throws -> String {
        let folder = dir.join(model.variant)
        try copyTree(model.folder, to: folder)
        var vision = CLIPVisionConfig()
        (vision.hiddenSize, vision.intermediateSize, vision.numHiddenLayers, vision.numAttentionHeads) = (32, 37, 2, 4)
        (vision.imageSize, vision.patchSize, vision.projectionDim) = (30, 6, 12)
        let encoder = try CLIPVisionModelWithProjection(config: vision, encoderScope: ["vision_model", "vision_model"])
        let random = RandomWeights(parameters: encoder.parameters.map { ($0.name, $0.shape) }, seed: 5)
        var tensors = try encoder.parameters.map { ($0.name, try random.tensor($0.name)) }
        let concepts = RandomWeights(parameters: [("concept_embeds", [17, 12]), ("special_care_embeds", [3, 12])], seed: 6)
        tensors += try ["concept_embeds", "special_care_embeds"].map { ($0, try concepts.tensor($0)) }
        let threshold: Float = flagAll ? -2 : 2
        tensors += [("concept_embeds_weights", Tensor(shape: [17], floats: Array(repeating: threshold, count: 17))),
                    ("special_care_embeds_weights", Tensor(shape: [3], floats: Array(repeating: 2, count: 3)))]
        try Files.createDirectory(Files.join(folder, "safety_checker"))
        try SafeTensors.write(tensors, to: Files.join(folder, "safety_checker", "model.safetensors"))
        let config = """
            {"architectures": ["StableDiffusionSafetyChecker"], "projection_dim": 12, "vision_config": {"hidden_size": 32,
             "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 30, "patch_size": 6}}
            """
        try Files.write(Array(config.utf8), to: Files.join(folder, "safety_checker", "config.json"))
        try Files.createDirectory(Files.join(folder, "feature_extractor"))
        try Files.write(Array(#"{"crop_size": 30, "size": 30, "do_center_crop": true, "resample": 3}"#.utf8),
                        to: Files.join(folder, "feature_extractor", "preprocessor_config.json"))
        let indexPath = Files.join(folder, "model_index.json")
        let index = try Files.readJSON(indexPath)
        let listed: [(String, JSON)] = [("safety_checker", .array([.string("stable_diffusion"), .string("StableDiffusionSafetyChecker")])),
                                        ("feature_extractor", .array([.string("transformers"), .string("CLIPImageProcessor")]))]
        let members = (index.members ?? []).filter { !["safety_checker", "feature_extractor"].contains($0.0) } + listed
        try Files.write(Array(JSON.object(members).serialized().utf8), to: indexPath)
        return folder
    }

    /// The command line runs a folder's checker: a flagged image is written black with a
    /// warning; --no-safety-checker skips it; a checker that flags nothing changes nothing.
    @Test(arguments: models) func commandLineRunsTheFoldersChecker(model: ReferenceModel) throws {
        let dir = try TemporaryDirectory()
        let flagging = try Self.withChecker(model, flagAll: true, dir: dir)
        let base = ["generate", "a lighthouse", "--steps", "2", "--seed", "3", "--count", "2"]
        func pixels(_ name: String) throws -> [[UInt8]] {
            try [1, 2].map { try Image.load(dir.join("\(name)-\($0).png")).pixels }
        }
        let flagged = try runDiffuse(base + ["--model", flagging, "--output", dir.join("flagged.png")])
        #expect(flagged.status == 0, "\(flagged.err)")
        #expect(flagged.err.contains("Potential NSFW content was detected in image(s) 1, 2"), "\(flagged.err)")
        #expect(try pixels("flagged").allSatisfy { $0.allSatisfy { $0 == 0 } })

        let skipped = try runDiffuse(base + ["--model", flagging, "--no-safety-checker", "--output", dir.join("skipped.png")])
        #expect(skipped.status == 0 && !skipped.err.contains("NSFW"), "\(skipped.err)")
        let plain = try runDiffuse(base + ["--model", model.folder, "--output", dir.join("plain.png")])
        #expect(plain.status == 0)
        #expect(try pixels("skipped") == pixels("plain"))
        #expect(try pixels("plain").contains { $0.contains { $0 != 0 } })

        let other = try TemporaryDirectory()
        let passing = try Self.withChecker(model, flagAll: false, dir: other)
        let components = try StableDiffusionComponents.load(passing)
        #expect(components.safetyChecker != nil)
        let pipeline = StableDiffusionPipeline(components: components, backend: try CPUBackend(), options: PipelineOptions(precision: .float32))
        var r = GenerationRequest(prompt: "a lighthouse")
        (r.steps, r.seed, r.count) = (2, 3, 2)
        let result = try pipeline.generate(r)
        #expect(result.nsfwContentDetected == [false, false])
        #expect(result.images.map(\.pixels) == (try pixels("plain")))
    }

    /// `diffuse bench --component safety-checker` times a model's own checker.
    @Test func benchTimesTheModelsChecker() throws {
        let model = try #require(Self.models.first)
        let dir = try TemporaryDirectory()
        let folder = try Self.withChecker(model, flagAll: false, dir: dir)
        let run = try runDiffuse(["bench", "--model", folder, "--component", "safety-checker", "--size", "40x24",
                                  "--setups", "compiled,int8", "--reps", "1", "--json"])
        #expect(run.status == 0, "\(run.err)")
        let rows = try #require(try JSON.parse(Array(run.out.utf8))["rows"]?.array)
        #expect(rows.map { $0["setup"]?.string } == ["compiled", "int8"])
        #expect(rows.allSatisfy { $0["component"]?.string == "safety-checker" && ($0["median_s"]?.double ?? 0) > 0 })
    }

    /// A folder that lists a checker it does not have loads without one, saying so.
    @Test func aListedCheckerThatIsMissingLoadsWithoutOne() throws {
        let model = try #require(Self.models.first)
        let dir = try TemporaryDirectory()
        let folder = try Self.withChecker(model, flagAll: true, dir: dir)
        try FileManager.default.removeItem(atPath: Files.join(folder, "safety_checker"))
        #expect(try StableDiffusionComponents.load(folder).safetyChecker == nil)
    }
}
