import DiffuseCore
import DiffuseModels
import DiffusePipelines
import DiffuseTokenizer
import Testing

@Suite("Sources: built-in configs and vocabulary")
struct EmbeddedResourceTests {
    /// The embedded copies are the files of the shared config folders, byte for byte
    /// (`scripts/embed-configs.py` generated them), and nothing is missing.
    @Test(arguments: EmbeddedArchitecture.all)
    func configsAreTheSharedFiles(architecture: EmbeddedArchitecture) throws {
        let folder = Fixtures.data("configs/\(architecture.name)")
        let onDisk = try listTree(folder).filter { $0.hasSuffix(".json") }
        #expect(architecture.files.map(\.path) == onDisk)
        for path in onDisk {
            let file = try #require(architecture.file(path))
            #expect(file.bytes == (try Files.read(Files.join(folder, path))), "\(architecture.name)/\(path)")
            #expect(file.origin == "embedded \(architecture.name)/\(path)")
        }
        #expect(EmbeddedArchitecture.named(architecture.name) == architecture)
    }

    @Test func names() {
        #expect(EmbeddedArchitecture.named("SDXL") == .sdxlBase)
        #expect(EmbeddedArchitecture.named("sd2.1-base") == .sd21Base)
        #expect(EmbeddedArchitecture.named("bk_sdm_tiny") == .bksdmTiny)
        #expect(EmbeddedArchitecture.named("sd3") == nil)
    }

    @Test func vocabularyIsTheSharedFile() throws {
        #expect(Array(EmbeddedCLIPVocabulary.gzip) == (try Files.read(Fixtures.data("clip/bpe_simple_vocab_16e6.txt.gz"))))
    }

    /// Built-in tokenizers: CLIP's vocabulary with each architecture's own tokenizer settings
    /// give what the tokenizer files on disk give (the reference's full CLIP tokenizer folder
    /// for the vocabulary; the shared config files for the special tokens and padding).
    @Test func builtInTokenizers() throws {
        let prompts = ["a photo of a cat", "Hello, World!!! <|endoftext|>", "", String(repeating: "long prompt ", count: 40)]
        let clipFolder = try CLIPTokenizer(folder: Fixtures.reference("models/clip-tokenizer"))
        for architecture in EmbeddedArchitecture.all where architecture.modelIndex != nil {
            let source = try ModelSource.builtIn(architecture)
            for c in source.components where c.kind == .tokenizer {
                let builtIn = try c.makeTokenizer()
                let files = architecture.tokenizerFiles(c.name)
                let fromFile = try CLIPTokenizer(bpeFile: Fixtures.data("clip/bpe_simple_vocab_16e6.txt.gz"),
                                                 padToken: builtIn.padToken, modelMaxLength: builtIn.modelMaxLength)
                #expect(builtIn.vocab == clipFolder.vocab)
                #expect(files.specialTokensMap != nil)
                for prompt in prompts {
                    #expect(builtIn(prompt).inputIds == fromFile(prompt).inputIds, "\(architecture.name)/\(c.name): \(prompt)")
                }
                // SD 2 and SDXL's second tokenizer pad with "!"; the others with the end token.
                let map = try #require(files.specialTokensMap).json()
                let pad = map["pad_token"]?.string ?? map["pad_token"]?["content"]?.string
                #expect(builtIn.padToken == pad, "\(architecture.name)/\(c.name)")
            }
        }
    }

    /// Built-in architectures without weights: every component has its config, and the models
    /// build from them (what the benchmarks run on random weights).
    @Test(arguments: EmbeddedArchitecture.all.filter { $0.modelIndex != nil })
    func builtInArchitectures(architecture: EmbeddedArchitecture) throws {
        let source = try ModelSource.builtIn(architecture)
        #expect(source.kind == .builtIn(architecture))
        let index = try #require(architecture.modelIndex).json()
        #expect(source.pipelineClass == index["_class_name"]?.string)
        for c in source.components {
            #expect(c.weights == nil)
            switch c.kind {
            case .model: _ = try SingleFileTests.model(c.className, config: try c.requireConfig())
            case .scheduler: #expect(try c.requireConfig().json()["_class_name"]?.string == c.className)
            case .tokenizer: #expect(c.tokenizer != nil)
            }
        }
        #expect(source.skipped.map(\.name).allSatisfy { ["safety_checker", "feature_extractor", "image_encoder"].contains($0) })
        #expect(throws: ModelSourceError.self) { try ModelSource.builtIn(.taesd) }
    }
}
