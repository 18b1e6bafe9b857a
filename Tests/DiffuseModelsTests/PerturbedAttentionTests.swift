#if canImport(Glibc)
import Glibc
#endif
import DiffuseCore
import DiffuseGraph
@testable import DiffuseModels
import Testing

/// Perturbed-attention guidance's identity attention: the perturbed rows come out as
/// `to_out(to_v(x))` and the others as plain attention, on every backend; and which layers
/// diffusers' `_set_pag_attn_processor` would pick by pattern.
@Suite struct PerturbedAttentionTests {
    @Test(arguments: TestBackends.all) func perturbedRowsAreTheValueProjection(backend: TestBackend) throws {
        let (batch, tokens, dim, perturbed) = (5, 6, 8, 2)
        let b = GraphBuilder()
        let x = b.input("x", shape: [batch, tokens, dim])
        let attention = Attention(Params(b)["attn1"], queryDim: dim, heads: 2, dimHead: 4)
        let pag = PerturbedAttention(appliedLayers: ["attn1"], perturbedRows: perturbed)
        b.output("pag", attention(x, perturbed: pag))
        b.output("plain", attention(x, perturbed: PerturbedAttention(appliedLayers: ["attn2"], perturbedRows: perturbed)))
        b.output("identity", attention.toOut(attention.toV(x)))
        let graph = try b.finish()
        let shapes = graph.parameters.flatMap { p in p.source.names.map { ($0, graph.nodes[p.value.index].shape) } }
        let weights = ModelWeights(RandomWeights(parameters: shapes, seed: 11))
        let values: [Float] = (0..<(batch * tokens * dim)).map { i in
            let t = Double(i)
            return Float(sin(t * 0.37) + 0.3 * cos(t * 1.3))
        }
        let out = try backend.backend.compile(graph, weights: weights, options: backend.options)
            .run(host: ["x": Tensor(shape: [batch, tokens, dim], floats: values)], on: backend.backend)
        let (got, plain, identity) = (out["pag"]!.toFloatArray(), out["plain"]!.toFloatArray(), out["identity"]!.toFloatArray())
        let row = tokens * dim, kept = (batch - perturbed) * row
        let scale = plain.map(abs).max()!
        for i in 0..<got.count {
            let want = i < kept ? plain[i] : identity[i]
            #expect(abs(got[i] - want) <= 1e-5 * scale, "element \(i): \(got[i]) vs \(want)")
        }
        // The identity rows differ from attention's, or the test would prove nothing.
        #expect(zip(plain[kept...], identity[kept...]).map { abs($0 - $1) }.max()! > 1e-2 * scale)
    }

    @Test func layersAreFoundAsDiffusersFindsThem() {
        let paths = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1", "down_blocks.10.attentions.1.transformer_blocks.0.attn1",
                     "mid_block.attentions.0.transformer_blocks.0.attn1", "up_blocks.0.attentions.2.transformer_blocks.1.attn1"]
        func picked(_ patterns: [String]) -> [String] {
            let p = PerturbedAttention(appliedLayers: patterns, perturbedRows: 1)
            return paths.filter(p.applies(to:))
        }
        #expect(picked(["mid"]) == [paths[2]])
        // re.search: a pattern matches anywhere, "." is any character, "down_blocks.1" also finds block 10.
        #expect(picked(["down_blocks.1"]) == [paths[0], paths[1]])
        #expect(picked([#"down_blocks\.1\."#]) == [paths[0]])
        #expect(picked(["up", "mid"]) == [paths[2], paths[3]])
        #expect(picked([#"attentions\.(1|2)"#]) == [paths[1], paths[3]])
        // diffusers' "fake integral match": a pattern and a path ending in the same number after
        // their last dot do not match.
        #expect(!PerturbedAttention.matches("blocks.1", "blocks.1"))
        #expect(PerturbedAttention.matches("blocks", "blocks.1"))

        #expect(PerturbedAttention.problems(["mid", "up_blocks.0"], selfAttentionPaths: paths).isEmpty)
        let problems = PerturbedAttention.problems(["middle", "(", ""], selfAttentionPaths: paths)
        #expect(problems.count == 3)
        #expect(problems[0].contains("\"middle\" matches no self-attention layer"))
        #expect(problems[1].contains("no valid regular expression"))
        #expect(problems[2].contains("empty"))
    }

    @Test func selfAttentionLayersPairTheCrossAttentionLayers() throws {
        let json = #"{"block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32, "norm_num_groups": 8, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": 8}"#
        let unet = try UNet2DConditionModel(config: try decodeConfiguration(UNet2DConditionModel.Configuration.self,
                                                                              from: Array(json.utf8), origin: "test"))
        #expect(unet.selfAttentionLayers == ["down_blocks.0.attentions.0.transformer_blocks.0.attn1",
                                             "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
                                             "up_blocks.1.attentions.1.transformer_blocks.0.attn1",
                                             "mid_block.attentions.0.transformer_blocks.0.attn1"])
    }
}
