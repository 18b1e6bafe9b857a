import DiffuseGraph

/// The UNet's side of perturbed-attention guidance (PAG; Ahn et al., "Self-Rectifying Diffusion
/// Sampling with Perturbed-Attention Guidance", 2024), as diffusers'
/// `PAGCFGIdentitySelfAttnProcessor2_0` and `PAGIdentitySelfAttnProcessor2_0`: in the
/// self-attention layers named by `appliedLayers`, the last `perturbedRows` rows of the batch
/// attend through the identity map — each token sees only itself, so the attention's output is
/// its value projection. The other rows attend as usual.
public struct PerturbedAttention: Sendable, Hashable, CustomStringConvertible {
    /// diffusers' `pag_applied_layers`: patterns searched (as `re.search`) in the module paths of
    /// the UNet's self-attention layers, e.g. `mid`, `down_blocks.2`, `up_blocks.0.attentions.1`.
    public var appliedLayers: [String]
    /// How many rows at the end of the batch are the perturbed pass (the image count).
    public var perturbedRows: Int

    public init(appliedLayers: [String], perturbedRows: Int) {
        self.appliedLayers = appliedLayers
        self.perturbedRows = perturbedRows
    }

    public var description: String { "\(appliedLayers) on the last \(perturbedRows) rows" }

    /// Whether the self-attention module at `path` is perturbed. diffusers skips a match whose
    /// pattern and path both end in the same number after their last dot ("a fake integral
    /// match"); no UNet self-attention path ends in a number, but the rule is kept as written.
    public func applies(to path: String) -> Bool {
        appliedLayers.contains { Self.matches($0, path) }
    }

    static func matches(_ pattern: String, _ path: String) -> Bool {
        guard let regex = try? Regex(pattern), path.contains(regex) else { return false }
        let (a, b) = (pattern.split(separator: ".").last ?? "", path.split(separator: ".").last ?? "")
        let fake = !a.isEmpty && a.allSatisfy(\.isNumber) && !b.isEmpty && b.allSatisfy(\.isNumber) && a == b
        return !fake
    }

    /// The patterns that are no valid regular expression, or match none of `paths` (diffusers
    /// raises "Cannot find PAG layer" for those): each with what is wrong, for an error message.
    public static func problems(_ patterns: [String], selfAttentionPaths paths: [String]) -> [String] {
        patterns.compactMap { pattern in
            if pattern.isEmpty { return "an empty layer pattern" }
            do { _ = try Regex(pattern) } catch { return "\"\(pattern)\" is no valid regular expression" }
            return paths.contains { matches(pattern, $0) } ? nil : "\"\(pattern)\" matches no self-attention layer"
        }
    }
}

extension UNet2DConditionModel {
    /// The self-attention layers (`…transformer_blocks.<k>.attn1`), which PAG can perturb: one
    /// beside every cross-attention layer, but for the blocks with `only_cross_attention`.
    public var selfAttentionLayers: [String] {
        let only = config.onlyCrossAttentionPerBlock, n = only.count
        return crossAttentionLayers.map { String($0.path.dropLast()) + "1" }.filter { path in
            let parts = path.split(separator: ".")
            guard parts.count > 1, let i = Int(parts[1]) else { return true }  // the mid block's never is
            return !(parts[0] == "down_blocks" ? only[i] : only[n - 1 - i])
        }
    }
}
