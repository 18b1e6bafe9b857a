import DiffuseCore
import DiffuseCPU
import DiffuseGraph
import DiffuseModels
import DiffusePipelines
import DiffuseTokenizer
import Testing

/// Textual-inversion embeddings: diffusers' own prompt embeddings where the fixture set has the
/// golden (`golden/<variant>/textual_inversion/`, made by
/// scripts/fixtures/make_textual_inversion_reference.py), and for every fixture model, embeddings
/// written here whose vectors are the encoder's own rows for some words: a prompt with the
/// embedding's token must then encode exactly as the prompt with those words.
@Suite struct TextualInversionTests {
    static let models = (try? ReferenceModel.all()) ?? []

    @Test func diffusersGoldens() throws {
        try expectOptionalGoldens(ReferenceCheck.checkTextualInversion, models: Self.models, label: "textual inversion",
                                  script: "make_textual_inversion_reference.py")
    }

    /// The rows of an encoder's token-embedding table for the ids `text` tokenizes to.
    static func rows(_ te: TextEncoderComponent, _ text: String) throws -> Tensor {
        let source = te.weights.source
        let name = try #require(source.tensorNames.first { $0.hasSuffix("embeddings.token_embedding.weight") })
        let table = try source.tensor(name).converted(to: .float32)
        let width = table.shape[1], ids = te.tokenizer.encode(text)
        return Tensor(shape: [ids.count, width], floats: ids.flatMap { id in (0..<width).map { table.floats[id * width + $0] } })
    }

    static func encode(_ c: StableDiffusionComponents, _ prompt: String, negative: String) throws -> StableDiffusionPipeline.PromptEmbeddings {
        try StableDiffusionPipeline(components: c, backend: try CPUBackend(), options: PipelineOptions(precision: .float32))
            .encodePrompt(prompt, negative: negative, count: 1, guidance: true, clipSkip: nil)
    }

    /// Each file format, with vectors copied from the encoder's own table: the token must encode
    /// as the words, in the prompt and the negative prompt, in any case, next to punctuation.
    @Test(arguments: models) func embeddingsStandForTheirVectors(model: ReferenceModel) throws {
        let base = try StableDiffusionComponents.load(model.folder)
        let dir = try TemporaryDirectory()
        var files: [TextualInversion] = []
        if let te2 = base.textEncoder2 {
            // SDXL's layout, the token from the file name (capitals included).
            let l = try Self.rows(base.textEncoder!, "red fox"), g = try Self.rows(te2, "red fox")
            try #require(l.shape[0] == g.shape[0], "the two tokenizers split 'red fox' differently")
            try SafeTensors.write([("clip_l", l), ("clip_g", g)], to: dir.join("Fox-Emb.safetensors"))
            files.append(try TextualInversion.open(dir.join("Fox-Emb.safetensors")))
            #expect(files[0].token == "Fox-Emb")
        } else {
            // AUTOMATIC1111's layout (token from the file name), diffusers' (token from the
            // tensor's name, one vector stored as [d]), and a token given on the command line.
            try SafeTensors.write([("emb_params", try Self.rows(base.textEncoder!, "red fox"))], to: dir.join("Fox-Emb.safetensors"))
            let a = try Self.rows(base.textEncoder!, "a")
            try #require(a.shape[0] == 1)
            try SafeTensors.write([("<a>", a.reshaped([a.shape[1]]))], to: dir.join("learned_embeds.safetensors"))
            // AUTOMATIC1111's older PyTorch file (string_to_param.*), read as data.
            try writeTorchCheckpoint([("string_to_param.*", try Self.rows(base.textEncoder!, "in snow"))], to: dir.join("weather.pt"))
            files = [try TextualInversion.open(dir.join("Fox-Emb.safetensors")),
                     try TextualInversion.open(dir.join("learned_embeds.safetensors")),
                     try TextualInversion.open(dir.join("weather.pt") + ":<snow>")]
            #expect(files.map(\.token) == ["Fox-Emb", "<a>", "<snow>"])
        }
        let adapted = try StableDiffusionComponents.load(model.folder, embeddings: files)
        let cases = base.textEncoder2 != nil
            ? [("a FOX-EMB on a hill!", "a red fox on a hill!", "fox-emb,blurry", "red fox ,blurry")]
            : [("<a> fox-emb on a hill, <snow>", "a red fox on a hill, in snow", "Fox-Emb<snow>", "red fox in snow")]
        for (prompt, words, negative, negativeWords) in cases {
            let got = try Self.encode(adapted, prompt, negative: negative), want = try Self.encode(base, words, negative: negativeWords)
            #expect(relativeError(got.hidden, want.hidden) < 1e-6, "\(model.variant): '\(prompt)' encodes unlike '\(words)'")
            // transformers pools at the largest id when eos_token_id is 2 (old configs): there an
            // added token's id moves the pooled row, as it does in diffusers.
            if let gp = got.pooled, let wp = want.pooled, base.textEncoder2?.encoder.config.eosTokenId != 2 {
                #expect(relativeError(gp, wp) < 1e-6, "\(model.variant): pooled output of '\(prompt)' differs")
            }
        }
        // Nothing else changed: a prompt without the tokens encodes as before.
        let plain = "a dog on a beach"
        #expect(relativeError(try Self.encode(adapted, plain, negative: "").hidden, try Self.encode(base, plain, negative: "").hidden) == 0)
    }

    @Test func tokenizerAddsAndExpandsTokens() throws {
        let model = try #require(Self.models.first)
        let tokenizer = try StableDiffusionComponents.load(model.folder).textEncoder!.tokenizer
        let (added, ids) = try tokenizer.addingEmbeddingTokens("<Thing>", vectors: 3)
        #expect(ids == Array(tokenizer.vocabSize..<(tokenizer.vocabSize + 3)) && added.vocabSize == tokenizer.vocabSize + 3)
        #expect(added.addedTokens.suffix(3).map(\.content) == ["<Thing>", "<Thing>_1", "<Thing>_2"])
        let a = tokenizer.encode("a"), b = tokenizer.encode("b")
        // Split out anywhere (even inside a word), in any case; written out, a later vector is itself.
        #expect(added.encode("a<thing>b") == a + ids + b)
        #expect(added.encode("a <THING> b") == a + ids + b)
        #expect(added.encode("<thing>_2") == [ids[2]])
        // One vector: just the token.
        let (single, one) = try tokenizer.addingEmbeddingTokens("<one>", vectors: 1)
        #expect(single.encode("<one> b") == one + b && single.expansions.isEmpty)
        // Refused as diffusers refuses them: a token already known, or its later vectors' names.
        let known = try #require(tokenizer.vocab.keys.sorted().first { !$0.hasSuffix("</w>") && $0.count > 1 })
        #expect(throws: TokenizerError.self) { try tokenizer.addingEmbeddingTokens(known, vectors: 1) }
        #expect(throws: TokenizerError.self) { try added.addingEmbeddingTokens("<Thing>", vectors: 1) }
        #expect(throws: TokenizerError.self) { try added.addingEmbeddingTokens("<thing>", vectors: 1) }  // matched alike
        let (x1, _) = try tokenizer.addingEmbeddingTokens("<x>_1", vectors: 1)
        #expect(throws: TokenizerError.self) { try x1.addingEmbeddingTokens("<x>", vectors: 2) }
    }

    @Test func badEmbeddingsAreRefusedByName() throws {
        let sd = try #require(Self.models.first { $0.variant.contains("sd15") } ?? Self.models.first)
        let base = try StableDiffusionComponents.load(sd.folder)
        let width = base.textEncoder!.encoder.config.hiddenSize
        let dir = try TemporaryDirectory()
        func attempt(_ name: String, _ tensors: [(String, Tensor)], token: String? = nil, folder: String? = nil) -> String {
            let path = dir.join(name)
            do {
                try SafeTensors.write(tensors, to: path)
                _ = try StableDiffusionComponents.load(folder ?? sd.folder, embeddings: [try TextualInversion(path: path, token: token)])
                return "loaded"
            } catch { return "\(error)" }
        }
        #expect(attempt("good.safetensors", [("emb_params", Tensor(zeros: [2, width]))]) == "loaded")
        let wide = attempt("wide.safetensors", [("emb_params", Tensor(zeros: [2, width + 1]))])
        #expect(wide.contains("wide.safetensors") && wide.contains("\(width + 1) wide"), "\(wide)")
        let many = attempt("many.safetensors", [("a", Tensor(zeros: [width])), ("b", Tensor(zeros: [width])), ("c", Tensor(zeros: [width]))])
        #expect(many.contains("many.safetensors") && many.contains("'a'"), "\(many)")
        let cube = attempt("cube.safetensors", [("emb_params", Tensor(zeros: [1, 2, width]))])
        #expect(cube.contains("'emb_params'") && cube.contains("not an embedding"), "\(cube)")
        let known = try #require(base.textEncoder!.tokenizer.vocab.keys.sorted().first { !$0.hasSuffix("</w>") && $0.count > 1 })
        let taken = attempt("taken.safetensors", [("emb_params", Tensor(zeros: [1, width]))], token: known)
        #expect(taken.contains("taken.safetensors") && taken.contains(JSON.quote(known)), "\(taken)")
        if base.textEncoder2 == nil {
            let xl = attempt("xl.safetensors", [("clip_l", Tensor(zeros: [1, width])), ("clip_g", Tensor(zeros: [1, 8]))])
            #expect(xl.contains("xl.safetensors") && xl.contains("text_encoder_2"), "\(xl)")
        }
        let uneven = attempt("uneven.safetensors", [("clip_l", Tensor(zeros: [1, width])), ("clip_g", Tensor(zeros: [2, 8]))])
        #expect(uneven.contains("uneven.safetensors") && uneven.contains("clip_g"), "\(uneven)")
        // Two files under one token.
        try SafeTensors.write([("emb_params", Tensor(zeros: [1, width]))], to: dir.join("one.safetensors"))
        #expect(throws: PipelineError.self) {
            try StableDiffusionComponents.load(sd.folder, embeddings: [try TextualInversion.open(dir.join("one.safetensors") + ":tok"),
                                                                       try TextualInversion.open(dir.join("good.safetensors") + ":tok")])
        }
        // A damaged PyTorch file is named.
        try Files.write([0x50, 0x4B, 0x03, 0x04] + [UInt8](repeating: 0, count: 64), to: dir.join("old.pt"))
        let damaged = message { try TextualInversion.open(dir.join("old.pt")) }
        #expect(damaged?.contains("old.pt") == true && damaged?.contains("zip") == true, "\(damaged ?? "loaded")")
    }

    @Test func commandLineAddsAndRecordsTheEmbedding() throws {
        let model = try #require(Self.models.first { $0.variant.contains("sd15") } ?? Self.models.first)
        let base = try StableDiffusionComponents.load(model.folder)
        let dir = try TemporaryDirectory()
        let path = dir.join("fox-emb.safetensors")
        try SafeTensors.write([("emb_params", try Self.rows(base.textEncoder!, "red fox"))], to: path)
        let inspect = try runDiffuse(["inspect", path])
        #expect(inspect.status == 0 && inspect.out.contains("textual-inversion embedding") && inspect.out.contains("token 'fox-emb'"),
                "\(inspect.out)\(inspect.err)")
        func generate(_ prompt: String, _ extra: [String], _ out: String) throws -> ImageFile {
            let run = try runDiffuse(["generate", prompt, "--model", model.folder, "--steps", "2", "--size", "64x64",
                                      "--seed", "3", "--device", "cpu", "--output", dir.join(out)] + extra)
            #expect(run.status == 0, "exit \(run.status): \(run.err)")
            return try ImageFile.read(dir.join(out))
        }
        let words = try generate("a red fox", [], "words.png")
        let token = try generate("a fox-emb", ["--embedding", path], "token.png")
        #expect(token.image == words.image, "the embedding's token did not stand for its vectors")
        #expect(token.text("parameters")?.contains("Embeddings: \"fox-emb.safetensors\"") == true, "\(token.text("parameters") ?? "")")
        let demo = try runDiffuse(["generate", "x", "--embedding", path, "--output", dir.join("demo.png")])
        #expect(demo.status != 0 && demo.err.contains("--embedding needs --model"), "\(demo.err)")
    }
}
