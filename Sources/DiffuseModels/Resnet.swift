import DiffuseGraph

/// diffusers' `ResnetBlock2D` with `time_embedding_norm="default"` and pre-norm:
/// `(shortcut(x) + conv2(act(norm2(conv1(act(norm1(x))) + time_emb_proj(act(temb)))))) / output_scale_factor`.
struct ResnetBlock2D {
    let p: Params
    let norm1: GroupNorm
    let conv1: Conv2d
    let timeEmbProj: Linear?
    let norm2: GroupNorm
    let conv2: Conv2d
    let convShortcut: Conv2d?
    let act: UnaryOp
    let outputScaleFactor: Float

    init(_ p: Params, inChannels: Int, outChannels: Int? = nil, tembChannels: Int?, groups: Int, groupsOut: Int? = nil,
         eps: Double, act: UnaryOp, outputScaleFactor: Double = 1) {
        self.p = p
        let out = outChannels ?? inChannels
        norm1 = GroupNorm(p["norm1"], groups: groups, channels: inChannels, eps: Float(eps))
        conv1 = Conv2d(p["conv1"], inChannels, out, kernel: 3, padding: 1)
        timeEmbProj = tembChannels.map { Linear(p["time_emb_proj"], $0, out) }
        norm2 = GroupNorm(p["norm2"], groups: groupsOut ?? groups, channels: out, eps: Float(eps))
        conv2 = Conv2d(p["conv2"], out, out, kernel: 3, padding: 1)
        convShortcut = inChannels != out ? Conv2d(p["conv_shortcut"], inChannels, out, kernel: 1) : nil
        self.act = act
        self.outputScaleFactor = Float(outputScaleFactor)
    }

    func callAsFunction(_ input: Value, temb: Value?) -> Value {
        p.scope {
            var h = conv1(norm1(input).unary(act))
            if let timeEmbProj, let temb {
                let t = timeEmbProj(temb.unary(act))
                h = h + t.reshape([t.shape[0], t.shape[1], 1, 1])
            }
            h = conv2(norm2(h).unary(act))
            let shortcut = convShortcut.map { $0(input) } ?? input
            let out = shortcut + h
            return outputScaleFactor == 1 ? out : out / outputScaleFactor
        }
    }
}

/// diffusers' `Downsample2D` with a convolution: a 3x3 stride-2 conv. With `padding` 0 (the VAE
/// encoder) diffusers pads one row and column at the bottom and right only.
struct Downsample2D {
    let p: Params
    let conv: Conv2d

    init(_ p: Params, channels: Int, outChannels: Int? = nil, padding: Int) {
        self.p = p
        let pads = padding == 0 ? (0, 1, 0, 1) : (padding, padding, padding, padding)
        conv = Conv2d(p["conv"], channels, outChannels ?? channels, kernel: 3,
                      attributes: Conv2dAttributes(stride: (2, 2), padding: pads))
    }

    func callAsFunction(_ x: Value) -> Value { p.scope { conv(x) } }
}

/// diffusers' `Upsample2D` with a convolution: nearest 2x, then a 3x3 conv. `outputSize` is
/// diffusers' `upsample_size`: for an odd skip size `n`, nearest interpolation from `ceil(n/2)`
/// to `n` picks exactly the first `n` rows of the 2x result, so the 2x result is cropped.
struct Upsample2D {
    let p: Params
    let conv: Conv2d

    init(_ p: Params, channels: Int, outChannels: Int? = nil) {
        self.p = p
        conv = Conv2d(p["conv"], channels, outChannels ?? channels, kernel: 3, padding: 1)
    }

    func callAsFunction(_ x: Value, outputSize: (Int, Int)? = nil) -> Value {
        p.scope {
            var h = x.upsampleNearest2x()
            if let (oh, ow) = outputSize {
                h = h.slice(axis: 2, start: 0, length: oh).slice(axis: 3, start: 0, length: ow)
            }
            return conv(h)
        }
    }
}
