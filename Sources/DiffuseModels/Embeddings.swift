import DiffuseGraph

/// diffusers' `Timesteps`: the sinusoidal projection of (possibly fractional) timesteps.
struct Timesteps {
    let attributes: TimestepEmbeddingAttributes

    init(numChannels: Int, flipSinToCos: Bool, downscaleFreqShift: Double, scale: Double = 1) {
        attributes = TimestepEmbeddingAttributes(dim: numChannels, flipSinToCos: flipSinToCos,
                                                 downscaleFreqShift: Float(downscaleFreqShift), scale: Float(scale))
    }

    /// timesteps [N] -> [N, numChannels], always float32 (as diffusers computes it).
    func callAsFunction(_ timesteps: Value) -> Value { timesteps.timestepEmbedding(attributes) }
}

/// diffusers' `TimestepEmbedding`: `linear_2(act(linear_1(sample + cond_proj(condition))))`, then
/// an optional post activation.
struct TimestepEmbedding {
    let p: Params
    let linear1: Linear
    let linear2: Linear
    let act: UnaryOp
    let postAct: UnaryOp?
    let condProj: Linear?

    init(_ p: Params, inChannels: Int, timeEmbedDim: Int, act: UnaryOp = .silu, outDim: Int? = nil,
         postAct: UnaryOp? = nil, condProjDim: Int? = nil) {
        self.p = p
        linear1 = Linear(p["linear_1"], inChannels, timeEmbedDim)
        condProj = condProjDim.map { Linear(p["cond_proj"], $0, inChannels, bias: false) }
        linear2 = Linear(p["linear_2"], timeEmbedDim, outDim ?? timeEmbedDim)
        self.act = act
        self.postAct = postAct
    }

    func callAsFunction(_ sample: Value, condition: Value? = nil) -> Value {
        p.scope {
            var x = sample
            if let condProj, let condition { x = x + condProj(condition) }
            x = linear2(linear1(x).unary(act))
            if let postAct { x = x.unary(postAct) }
            return x
        }
    }
}
