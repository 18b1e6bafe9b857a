import DiffuseCore
import DiffuseCPU
@testable import DiffusePipelines
import Testing

/// AUTOMATIC1111 prompt syntax and long prompts (`PromptWeighting`, after diffusers' community
/// lpw_stable_diffusion): its parser against lpw's `parse_prompt_attention`
/// (`Fixtures/prompt_weighting_parse.json`), diffusers' outputs where the fixture set has the
/// goldens (`golden/<variant>/prompt_weighting/`; both from
/// scripts/fixtures/make_prompt_weighting_reference.py), and on every fixture model what the
/// weighting must keep.
@Suite struct PromptWeightingTests {
    /// The SD 1.x/2.x models (lpw_stable_diffusion has one text encoder).
    static let models = ((try? ReferenceModel.all()) ?? []).filter { model in
        (try? Files.readJSON(Files.join(model.folder, "model_index.json")))?["_class_name"]?.string?.contains("XL") != true
    }

    static func parseGoldens() throws -> [JSON] {
        let here = String(#filePath)
        let path = String(here[..<here.lastIndex(of: "/")!]) + "/Fixtures/prompt_weighting_parse.json"
        return try #require(try Files.readJSON(path).array)
    }

    @Test func parserMatchesLongPromptWeighting() throws {
        let goldens = try Self.parseGoldens()
        #expect(!goldens.isEmpty)
        for golden in goldens {
            let text = try #require(golden["text"]?.string)
            let want = try #require(golden["pieces"]?.array).map { ($0.array?[0].string ?? "?", $0.array?[1].double ?? .nan) }
            let got = try PromptWeighting.parse(text)
            #expect(got.map(\.text) == want.map(\.0), "\(text)")
            #expect(got.map(\.weight) == want.map(\.1), "\(text): weights \(got.map(\.weight)) vs \(want.map(\.1))")
        }
    }

    @Test func aWeightThatIsNoNumberIsAnError() throws {
        #expect(throws: PipelineError.self) { try PromptWeighting.parse("a (word:1.2.3) here") }
    }

    @Test func diffusersGoldens() throws {
        try expectOptionalGoldens(ReferenceCheck.checkPromptWeighting, models: Self.models, label: "prompt weighting",
                                  script: "make_prompt_weighting_reference.py")
    }

    /// A prompt of one window without weights is the plain prompt where the tokenizer pads with
    /// EOS (lpw puts the pads before the last EOS); a prompt of more windows takes 77 states per
    /// window; a weight of 1 written out changes nothing; a weight changes the states.
    @Test(arguments: models) func windowsAndWeights(model: ReferenceModel) throws {
        let components = try StableDiffusionComponents.load(model.folder)
        let pipeline = StableDiffusionPipeline(components: components, backend: try CPUBackend(), options: PipelineOptions(precision: .float32))
        let tokenizer = try #require(components.textEncoder).tokenizer
        var r = GenerationRequest(prompt: "a harbour at dusk")
        r.promptWeighting = true
        func states(_ prompt: String, chunks: Int = 3) throws -> Tensor {
            r.prompt = prompt
            r.maxPromptChunks = chunks
            return try pipeline.encodeWeightedPrompt(r, count: 1, guidance: false).hidden
        }
        let plain = try states("a harbour at dusk")
        if tokenizer.padTokenId == tokenizer.eosTokenId {
            let unweighted = try pipeline.encodePrompt("a harbour at dusk", negative: nil, count: 1, guidance: false, clipSkip: nil).hidden
            #expect(plain.toFloatArray() == unweighted.toFloatArray())
        }
        #expect(try states("(a harbour:1.0) at dusk").toFloatArray() == plain.toFloatArray())
        #expect(try states("(a harbour:1.5) at dusk").toFloatArray() != plain.toFloatArray())
        let window = tokenizer.modelMaxLength - 2
        var long = "a harbour"
        while tokenizer.encode(long).count <= window + 3 { long += " at dusk" }
        #expect(try states(long).shape[1] == 2 * tokenizer.modelMaxLength)
        #expect(try states(long, chunks: 1).shape[1] == tokenizer.modelMaxLength)
    }
}
