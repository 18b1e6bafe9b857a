import DiffuseCore
import DiffuseTokenizer
import Testing

/// One serialized suite: the truncation tests install a process-wide warning handler.
@Suite(.serialized)
struct CLIPTokenizerTests {
    static let goldens: [TokenizerGolden] = (try? TokenizerGolden.all()) ?? []
    static let bpeFile = Fixtures.data("clip/bpe_simple_vocab_16e6.txt.gz")

    @Test func goldensArePresent() throws {
        #expect(try !TokenizerGolden.all().isEmpty, "no golden/<variant>/tokenizer*.safetensors under \(Fixtures.reference)")
    }

    /// input_ids, attention_mask and every untruncated_ids_<i>, as diffusers computed them.
    @Test(arguments: goldens)
    func matchesGolden(_ golden: TokenizerGolden) throws {
        let tokenizer = try CLIPTokenizer(folder: golden.tokenizerFolder)
        try check(tokenizer, against: golden)
    }

    /// The vocabulary built from CLIP's original merges file equals the one in any reference
    /// folder rebuilt from it, and gives the same ids for that folder's goldens.
    @Test func bpeFileMatchesReferenceFolders() throws {
        let fromGz = try CLIPTokenizer(bpeFile: Self.bpeFile)
        #expect(fromGz.vocab.count == 49408)
        var matched = 0
        for golden in Self.goldens {
            let folder = try CLIPTokenizer(folder: golden.tokenizerFolder)
            guard folder.vocab.count == fromGz.vocab.count else { continue }
            #expect(folder.vocab == fromGz.vocab, "\(golden.tokenizerFolder) differs from \(Self.bpeFile)")
            let sameSpecials = try CLIPTokenizer(bpeFile: Self.bpeFile, padToken: folder.padToken,
                                                 modelMaxLength: folder.modelMaxLength)
            try check(sameSpecials, against: golden)
            matched += 1
        }
        #expect(matched > 0, "no reference tokenizer has CLIP's 49408-token vocabulary")
    }

    func check(_ tokenizer: CLIPTokenizer, against golden: TokenizerGolden) throws {
        let prompts = try golden.prompts()
        let expected = try golden.expected(count: prompts.count)
        #expect(tokenizer.modelMaxLength == expected.length)
        #expect(expected.inputIds.count == prompts.count)
        _ = capturingWarnings {  // the long prompt's truncation warning is checked elsewhere
            for (i, prompt) in prompts.enumerated() {
                let out = tokenizer(prompt)
                #expect(out.inputIds == expected.inputIds[i], "\(golden) prompt \(i): input_ids")
                #expect(out.attentionMask == expected.attentionMask[i], "\(golden) prompt \(i): attention_mask")
                #expect(out.untruncatedIds == expected.untruncatedIds[i], "\(golden) prompt \(i): untruncated_ids")
                #expect(Array(out.untruncatedIds.dropFirst().dropLast()) == tokenizer.encode(prompt))
            }
        }
    }

    /// Over-long prompts are cut to modelMaxLength with EOS kept, and the warning names the removed
    /// text: the end of the prompt, as the tokenizer spells it (lower case, words spaced).
    @Test(arguments: goldens)
    func truncationWarningNamesRemovedText(_ golden: TokenizerGolden) throws {
        let tokenizer = try CLIPTokenizer(folder: golden.tokenizerFolder)
        var long = try golden.prompts().filter { tokenizer.encode($0).count > tokenizer.modelMaxLength - 2 }
        // One prompt that certainly overflows, built from the fixture's own words.
        let words = try golden.prompts().joined(separator: " ")
        long.append(String(repeating: words + " ", count: tokenizer.modelMaxLength) + "the very end")
        for prompt in long {
            var out: TokenizerOutput?
            let warnings = capturingWarnings { out = tokenizer(prompt) }
            let result = try #require(out)
            let removed = try #require(result.truncatedText, "\(golden): no truncated text for a long prompt")
            #expect(!removed.isEmpty)
            // A cut inside a character's UTF-8 bytes leaves its tail bytes to decode as U+FFFD, as
            // transformers' decode (errors="replace") spells them in diffusers' warning.
            let whole = String(removed.drop { $0 == "\u{FFFD}" })
            #expect(squeezed(prompt).hasSuffix(squeezed(whole)), "\(golden): \"\(removed)\" is not the end of the prompt")
            #expect(warnings.contains { $0.contains("truncated") && $0.hasSuffix(": " + removed) },
                    "\(golden): warnings \(warnings) do not name \"\(removed)\"")
            #expect(result.inputIds.count == tokenizer.modelMaxLength)
            #expect(result.inputIds.last == tokenizer.eosTokenId)
            #expect(!result.attentionMask.contains(0))
            #expect(result.untruncatedIds.count > tokenizer.modelMaxLength)
        }
        // A prompt that fits warns about nothing.
        let warnings = capturingWarnings { #expect(tokenizer("a b c").truncatedText == nil) }
        #expect(warnings.isEmpty)
    }

    /// `!` as the pad token (SD 2, SDXL's tokenizer_2) is split out everywhere as its own id;
    /// otherwise a run of `!` is one word.
    @Test(arguments: goldens)
    func exclamationMarkAsPadToken(_ golden: TokenizerGolden) throws {
        let tokenizer = try CLIPTokenizer(folder: golden.tokenizerFolder)
        let ids = tokenizer.encode("world!!!x")
        let bang = try #require(tokenizer.tokenToId("!"))
        if tokenizer.padToken == "!" {
            #expect(tokenizer.padTokenId == bang)
            #expect(ids.filter { $0 == bang }.count == 3)
            #expect(ids == tokenizer.encode("world") + [bang, bang, bang] + tokenizer.encode("x"))
        } else {
            #expect(tokenizer.padTokenId == tokenizer.eosTokenId)
            #expect(ids == tokenizer.encode("world") + tokenizer.encode("!!!") + tokenizer.encode("x"))
            #expect(!ids.contains(bang) || tokenizer.encode("!!!").count < 3)
        }
    }

    /// NFC, whitespace collapse and lower-casing happen before BPE.
    @Test(arguments: goldens)
    func normalization(_ golden: TokenizerGolden) throws {
        let tokenizer = try CLIPTokenizer(folder: golden.tokenizerFolder)
        #expect(tokenizer.encode("cafe\u{301} Cre\u{300}me") == tokenizer.encode("café crème"))
        #expect(tokenizer.encode("  A\tRED \n\n car ") == tokenizer.encode("a red car"))
        #expect(tokenizer.encode("HeLLo WORLD") == tokenizer.encode("hello world"))
        #expect(tokenizer.encode("") == [])
        // The special tokens typed in the text are split out as themselves.
        #expect(tokenizer.encode("a<|endoftext|>b") == tokenizer.encode("a") + [tokenizer.eosTokenId] + tokenizer.encode("b"))
    }

    /// decode gives back the text as normalized, words separated by spaces.
    @Test(arguments: goldens)
    func decodeRoundTrip(_ golden: TokenizerGolden) throws {
        let tokenizer = try CLIPTokenizer(folder: golden.tokenizerFolder)
        for prompt in try golden.prompts() {
            let text = tokenizer.decode(tokenizer.encode(prompt))
            #expect(squeezed(text) == squeezed(prompt), "\(golden): \"\(prompt)\" decoded as \"\(text)\"")
            #expect(text.first?.isWhitespace != true && text.last?.isWhitespace != true)
        }
        let words = tokenizer.decode(tokenizer.encode("red car"))
        #expect(words == "red car")
        #expect(tokenizer.decode([tokenizer.bosTokenId]) == tokenizer.bosToken)
    }
}
