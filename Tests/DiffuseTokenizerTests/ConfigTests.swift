import DiffuseCore
import DiffuseTokenizer
import Testing

/// Special tokens come from tokenizer_config.json and special_tokens_map.json as transformers
/// resolves them.
struct TokenizerConfigTests {
    /// A reference tokenizer folder with its configuration files replaced.
    func withConfig(_ config: String?, map: String?, _ body: (CLIPTokenizer) throws -> Void) throws {
        let source = try TokenizerGolden.smallestFolder()
        try withScratchFolder { folder in
            for file in ["vocab.json", "merges.txt"] {
                try Files.write(try Files.read(Files.join(source, file)), to: Files.join(folder, file))
            }
            if let config { try Files.write(Array(config.utf8), to: Files.join(folder, "tokenizer_config.json")) }
            if let map { try Files.write(Array(map.utf8), to: Files.join(folder, "special_tokens_map.json")) }
            try body(try CLIPTokenizer(folder: folder))
        }
    }

    @Test func defaultsWithoutConfigFiles() throws {
        try withConfig(nil, map: nil) { t in
            #expect(t.bosToken == "<|startoftext|>" && t.eosToken == "<|endoftext|>")
            #expect(t.padToken == "<|endoftext|>" && t.padTokenId == t.eosTokenId)
            #expect(t.modelMaxLength == CLIPTokenizer.defaultModelMaxLength)
            #expect(t("a").inputIds.count == CLIPTokenizer.defaultModelMaxLength)
        }
    }

    /// special_tokens_map.json overrides tokenizer_config.json ...
    @Test func specialTokensMapOverridesConfig() throws {
        try withConfig(#"{"pad_token": "!", "model_max_length": 16}"#, map: #"{"pad_token": "<|endoftext|>"}"#) { t in
            #expect(t.padToken == "<|endoftext|>")
            #expect(t.modelMaxLength == 16)
            #expect(t("a").inputIds.count == 16)
        }
    }

    /// ... unless the config has added_tokens_decoder, which transformers reads instead.
    @Test func addedTokensDecoderTakesPrecedence() throws {
        let config = #"""
            {"pad_token": "!", "added_tokens_decoder": {"0": {"content": "!", "normalized": false, "special": true}}}
            """#
        try withConfig(config, map: #"{"pad_token": "<|endoftext|>"}"#) { t in
            #expect(t.padToken == "!")
            #expect(t.padTokenId == t.tokenToId("!"))
            #expect(t.encode("a!b") == t.encode("a") + [t.padTokenId] + t.encode("b"))
        }
    }

    /// A special token marked `normalized` (as in the SDXL repositories' files) is matched after
    /// lower-casing; one that is not must match exactly.
    @Test func normalizedSpecialTokensMatchAfterLowercasing() throws {
        let eos = #"{"content": "<|endoftext|>", "normalized": NORM, "lstrip": false, "rstrip": false, "single_word": false}"#
        for normalized in [true, false] {
            let token = eos.replacing("NORM", with: "\(normalized)")
            try withConfig(#"{"eos_token": \#(token), "unk_token": \#(token)}"#, map: nil) { t in
                let upper = t.encode("a <|ENDOFTEXT|> b")
                #expect((upper == t.encode("a") + [t.eosTokenId] + t.encode("b")) == normalized)
                #expect(t.encode("a <|endoftext|> b") == t.encode("a") + [t.eosTokenId] + t.encode("b"))
            }
        }
    }

    /// A pad token outside the vocabulary gets the next free id.
    @Test func newPadTokenIsNumberedAfterVocabulary() throws {
        try withConfig(#"{"pad_token": "<pad>"}"#, map: nil) { t in
            #expect(t.padTokenId == t.vocab.count)
            #expect(t.idToToken(t.padTokenId) == "<pad>")
            #expect(t.encode("x<pad>y") == t.encode("x") + [t.padTokenId] + t.encode("y"))
            #expect(t("x").inputIds.last == t.padTokenId)
        }
    }
}
