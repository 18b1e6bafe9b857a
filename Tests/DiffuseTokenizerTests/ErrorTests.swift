import DiffuseCore
import DiffuseTokenizer
import FoundationEssentials
import Testing

/// Missing or corrupt tokenizer files give errors that name the file.
struct TokenizerErrorTests {
    /// The smallest reference tokenizer folder, copied into a scratch folder and then damaged.
    func withDamagedFolder(_ damage: (String) throws -> Void, expect fragments: [String]) throws {
        let source = try TokenizerGolden.smallestFolder()
        try withScratchFolder { folder in
            try copyTokenizerFiles(from: source, to: folder)
            _ = try CLIPTokenizer(folder: folder)  // intact, it loads
            try damage(folder)
            let error = #expect(throws: (any Error).self) { try CLIPTokenizer(folder: folder) }
            let message = error.map { "\($0)" } ?? ""
            for fragment in fragments {
                #expect(message.contains(fragment), "\"\(message)\" does not mention \(fragment)")
            }
        }
    }

    func write(_ text: String, _ folder: String, _ file: String) throws {
        try Files.write(Array(text.utf8), to: Files.join(folder, file))
    }

    func remove(_ folder: String, _ file: String) throws {
        try FileManager.default.removeItem(atPath: Files.join(folder, file))
    }

    @Test func missingFolder() throws {
        let path = "/tmp/diffuse-no-such-tokenizer-\(UInt64.random(in: 0..<UInt64.max))"
        let error = #expect(throws: FileError.self) { try CLIPTokenizer(folder: path) }
        #expect(error?.path == path)
    }

    @Test func missingVocab() throws {
        try withDamagedFolder({ try remove($0, "vocab.json") }, expect: ["vocab.json"])
    }

    @Test func truncatedVocab() throws {
        try withDamagedFolder({ folder in
            let bytes = try Files.read(Files.join(folder, "vocab.json"))
            try Files.write(Array(bytes.prefix(bytes.count / 2)), to: Files.join(folder, "vocab.json"))
        }, expect: ["vocab.json", "JSON"])
    }

    @Test func vocabWithBadId() throws {
        try withDamagedFolder({ try write("{\"a\": 0, \"b\": \"one\"}", $0, "vocab.json") }, expect: ["vocab.json", "\"b\""])
    }

    @Test func vocabNotAnObject() throws {
        try withDamagedFolder({ try write("[1, 2, 3]", $0, "vocab.json") }, expect: ["vocab.json"])
    }

    @Test func missingMerges() throws {
        try withDamagedFolder({ try remove($0, "merges.txt") }, expect: ["merges.txt"])
    }

    @Test func malformedMergeLine() throws {
        try withDamagedFolder({ folder in
            let text = try Files.readText(Files.join(folder, "merges.txt"))
            try write(text + "a b c\n", folder, "merges.txt")
        }, expect: ["merges.txt", "line ", "a b c"])
    }

    @Test func mergeOutsideVocabulary() throws {
        try withDamagedFolder({ folder in
            let text = try Files.readText(Files.join(folder, "merges.txt"))
            try write(text + "zzq\u{1F600} xyz\n", folder, "merges.txt")
        }, expect: ["merges.txt", "zzq\u{1F600}", "not in the vocabulary"])
    }

    @Test func corruptConfig() throws {
        try withDamagedFolder({ try write("{\"model_max_length\": 77,", $0, "tokenizer_config.json") },
                              expect: ["tokenizer_config.json"])
    }

    @Test func configWithBadLength() throws {
        try withDamagedFolder({ try write("{\"model_max_length\": 1}", $0, "tokenizer_config.json") },
                              expect: ["tokenizer_config.json", "model_max_length"])
    }

    @Test func configWithBadToken() throws {
        try withDamagedFolder({ try write("{\"pad_token\": 5}", $0, "special_tokens_map.json") },
                              expect: ["special_tokens_map.json", "pad_token"])
    }

    @Test func missingBPEFile() throws {
        let path = "/tmp/diffuse-no-such-vocab-\(UInt64.random(in: 0..<UInt64.max)).txt.gz"
        let error = #expect(throws: FileError.self) { try CLIPTokenizer(bpeFile: path) }
        #expect(error?.path == path)
    }

    @Test func truncatedBPEFile() throws {
        let bytes = try Files.read(CLIPTokenizerTests.bpeFile)
        try withScratchFolder { folder in
            let path = Files.join(folder, "bpe_simple_vocab_16e6.txt.gz")
            for damaged in [Array(bytes.prefix(bytes.count / 2)), Array("not gzip at all".utf8)] {
                try Files.write(damaged, to: path)
                let error = #expect(throws: FileError.self) { try CLIPTokenizer(bpeFile: path) }
                #expect(error?.path == path)
            }
        }
    }

    @Test func bpeFileWithTooFewMerges() throws {
        try withScratchFolder { folder in
            let path = Files.join(folder, "short.txt.gz")
            // (a zlib stream: inflate detects the header, as for gzip)
            try Files.write(try Zlib.deflate(Array("#version: 0.2\ni n\nt h\n".utf8)), to: path)
            let error = #expect(throws: FileError.self) { try CLIPTokenizer(bpeFile: path) }
            #expect(error?.path == path)
            #expect(error?.reason.contains("merge") == true)
        }
    }

    @Test func lengthWithoutRoomForSpecialTokens() throws {
        #expect(throws: TokenizerError.self) { try CLIPTokenizer(bpeFile: CLIPTokenizerTests.bpeFile, modelMaxLength: 1) }
    }
}
