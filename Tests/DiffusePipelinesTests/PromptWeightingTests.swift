import DiffuseCore
import DiffuseCPU
import DiffuseSchedulers
@testable import DiffusePipelines
import Testing

/// AUTOMATIC1111 prompt syntax and long prompts (`PromptWeighting`, after diffusers' community
/// lpw_stable_diffusion for SD 1.x/2.x and sd_embed for SDXL): the parser against both
/// `parse_prompt_attention`s (`Fixtures/prompt_weighting_parse.json`), diffusers' outputs where
/// the fixture set has the goldens (`golden/<variant>/prompt_weighting/`; both from
/// scripts/fixtures/make_prompt_weighting_reference.py), and on every fixture model what the
/// weighting must keep.
@Suite struct PromptWeightingTests {
    static let all = (try? ReferenceModel.all()) ?? []
    static func isXL(_ model: ReferenceModel) -> Bool {
        (try? Files.readJSON(Files.join(model.folder, "model_index.json")))?["_class_name"]?.string?.contains("XL") == true
    }
    /// The SD 1.x/2.x models (lpw_stable_diffusion's encoding).
    static let models = all.filter { !isXL($0) }
    /// The SDXL models (sd_embed's).
    static let xlModels = all.filter(isXL)

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
            let got = try PromptWeighting.parse(text, splitsBreak: golden["split_break"]?.bool ?? false)
            #expect(got.map(\.text) == want.map(\.0), "\(text)")
            #expect(got.map(\.weight) == want.map(\.1), "\(text): weights \(got.map(\.weight)) vs \(want.map(\.1))")
        }
    }

    /// lpw's mean restore: torch's one-thread float32 sum, addition for addition
    /// (`Fixtures/torch_sums.json`, seeded randn arrays and what torch sums them to).
    @Test func sumsAsTorchDoes() throws {
        let here = String(#filePath)
        let path = String(here[..<here.lastIndex(of: "/")!]) + "/Fixtures/torch_sums.json"
        let cases = try #require(try Files.readJSON(path).array)
        #expect(!cases.isEmpty)
        for c in cases {
            let (seed, count, shift) = (try #require(c["seed"]?.int), try #require(c["count"]?.int), Float(c["shift"]?.double ?? 0))
            let x = TorchCPUGenerator(seed: UInt64(seed)).randn([count]).toFloatArray().map { shift == 0 ? $0 : $0 + shift }
            let sum = x.withUnsafeBufferPointer { TorchSum.sum($0) }
            #expect(sum == Float(try #require(c["sum"]?.double)), "seed \(seed), \(count) values")
            #expect(sum / Float(count) == Float(try #require(c["mean"]?.double)), "seed \(seed), \(count) values: the mean")
        }
    }

    @Test func aWeightThatIsNoNumberIsAnError() throws {
        #expect(throws: PipelineError.self) { try PromptWeighting.parse("a (word:1.2.3) here") }
    }

    @Test func diffusersGoldens() throws {
        try expectOptionalGoldens(ReferenceCheck.checkPromptWeighting, models: Self.all, label: "prompt weighting",
                                  script: "make_prompt_weighting_reference.py")
    }

    /// A model's pipeline (CPU, float32) and a request that weighs its prompt.
    static func weighting(_ model: ReferenceModel) throws -> (StableDiffusionPipeline, GenerationRequest) {
        let pipeline = StableDiffusionPipeline(components: try StableDiffusionComponents.load(model.folder), backend: try CPUBackend(),
                                               options: PipelineOptions(precision: .float32))
        var r = GenerationRequest(prompt: "")
        r.promptWeighting = true
        return (pipeline, r)
    }

    /// A prompt of one window without weights is the plain prompt where the tokenizer pads with
    /// EOS (lpw puts the pads before the last EOS); a prompt of more windows takes 77 states per
    /// window; a weight of 1 written out changes nothing; a weight changes the states.
    @Test(arguments: models) func windowsAndWeights(model: ReferenceModel) throws {
        var (pipeline, r) = try Self.weighting(model)
        let tokenizer = try #require(pipeline.components.textEncoder).tokenizer
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

    /// sd_embed's SDXL encoding: 77 states per window of 75 tokens with no limit unless asked;
    /// a weight of 1 written out changes nothing and a weight changes only its tokens' states;
    /// the pooled state is the last window's; with no negative prompt the model's
    /// force_zeros_for_empty_prompt decides between zeros and sd_embed's "empty"; a second prompt
    /// feeds the second encoder alone.
    @Test(arguments: xlModels) func sdEmbedWindowsAndWeights(model: ReferenceModel) throws {
        var (pipeline, r) = try Self.weighting(model)
        let components = pipeline.components
        let tokenizer = try #require(components.textEncoder2).tokenizer
        func encode(_ prompt: String, negative: String? = nil, chunks: Int? = nil, guidance: Bool = false) throws -> StableDiffusionPipeline.PromptEmbeddings {
            (r.prompt, r.negativePrompt, r.maxPromptChunks) = (prompt, negative, chunks)
            return try pipeline.encodeWeightedPrompt(r, count: 1, guidance: guidance)
        }
        let plain = try encode("a harbour at dusk")
        let width = plain.hidden.shape[2]
        #expect(plain.hidden.shape[1] == tokenizer.modelMaxLength)
        #expect(try encode("(a harbour:1.0) at dusk").hidden.toFloatArray() == plain.hidden.toFloatArray())
        // "(a harbour:1.5)": the states of BOS and of "at dusk" and after stay; those of "a harbour" scale.
        let harbour = tokenizer.encode("a harbour").count
        let weighted = try encode("(a harbour:1.5) at dusk").hidden.toFloatArray(), base = plain.hidden.toFloatArray()
        #expect(weighted[0..<width] == base[0..<width])
        #expect(weighted[((1 + harbour) * width)...] == base[((1 + harbour) * width)...])
        for i in width..<((1 + harbour) * width) { #expect(weighted[i] == base[i] * 1.5) }
        let window = tokenizer.modelMaxLength - 2
        var long = "a harbour"
        while tokenizer.encode(long).count <= 2 * window + 3 { long += " at dusk" }
        let three = try encode(long)
        #expect(three.hidden.shape[1] == 3 * tokenizer.modelMaxLength)
        #expect(try encode(long, chunks: 1).hidden.shape[1] == tokenizer.modelMaxLength)
        #expect(three.pooled!.toFloatArray() != plain.pooled!.toFloatArray())
        let guided = try encode("a harbour at dusk", guidance: true)
        let negativeRow = Array(guided.hidden.toFloatArray()[0..<(tokenizer.modelMaxLength * width)])
        #expect(negativeRow.allSatisfy { $0 == 0 } == components.forceZerosForEmptyPrompt)
        let empty = try encode("a harbour at dusk", negative: "", guidance: true).hidden.slice(0..<1)
        #expect(empty.toFloatArray() == (try encode("empty").hidden.toFloatArray()))
        // The two-prompt encoding of one prompt twice, without weights, is the one-prompt encoding;
        // another second prompt changes only the second encoder's part.
        r.prompt2 = "a harbour at dusk"
        #expect(try encode("a harbour at dusk").hidden.toFloatArray() == base)
        r.prompt2 = "a lighthouse at dawn"
        let second = try encode("a harbour at dusk").hidden.toFloatArray()
        let firstWidth = try #require(components.textEncoder).encoder.config.hiddenSize
        for t in 0..<tokenizer.modelMaxLength {
            #expect(second[(t * width)..<(t * width + firstWidth)] == base[(t * width)..<(t * width + firstWidth)])
        }
        #expect(second != base)
    }
}
