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

/// diffusers' `GaussianFourierProjection` as UNets build it (`log=False`, weight `time_proj.weight`):
/// `[cos(x), sin(x)]` (or `[sin, cos]`) of `x = t·W·2π`, [N] → [N, 2·embeddingSize].
struct GaussianFourierProjection {
    let p: Params
    let weight: Value
    let flipSinToCos: Bool

    init(_ p: Params, embeddingSize: Int, flipSinToCos: Bool) {
        self.p = p
        weight = p.weight("weight", [embeddingSize])
        self.flipSinToCos = flipSinToCos
    }

    func callAsFunction(_ t: Value) -> Value {
        p.scope {
            let (n, d) = (t.shape[0], weight.shape[0])
            // torch's `x[:, None] * W[None, :] * 2 * np.pi`, left to right, π rounded to float.
            let x = (t.reshape([n, 1]) * weight.reshape([1, d])).affine(scale: 2).affine(scale: Float(Double.pi))
            // The sinusoidal embedding of width 2 has the one frequency 1: it is [sin, cos] (or
            // [cos, sin]) of each value, so one op gives both for all n·d of them.
            let pairs = x.reshape([n * d]).timestepEmbedding(TimestepEmbeddingAttributes(dim: 2, flipSinToCos: flipSinToCos,
                                                                                          downscaleFreqShift: 0))
            return pairs.reshape([n, d, 2]).transpose(1, 2).reshape([n, 2 * d])
        }
    }
}
