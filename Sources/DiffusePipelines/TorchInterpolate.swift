import DiffuseCore

/// `torch.nn.functional.interpolate` on host planes, for the small resizes pipelines make of
/// their inputs (a depth map to the latents, an IP-Adapter mask to an attention layer).
public enum TorchInterpolate {
    /// `torch.nn.functional.interpolate(x, size=(toHeight, toWidth), mode="bicubic",
    /// align_corners=False)` of one plane, as ATen's CPU kernel computes it in float32: the source
    /// coordinate (i + ½)·in/out − ½ (unclamped), Keys' cubic with a = −0.75, neighbours clamped to
    /// the edge, along the width first.
    public static func bicubic(_ x: [Float], height inH: Int, width inW: Int, toHeight outH: Int, toWidth outW: Int) -> [Float] {
        func taps(_ input: Int, _ output: Int) -> [(index: [Int], weight: [Float])] {
            let scale = Float(input) / Float(output)
            return (0..<output).map { i in
                let real = scale * (Float(i) + 0.5) - 0.5
                let floor = real.rounded(.down)
                let t = real - floor
                let index = (0..<4).map { min(max(Int(floor) - 1 + $0, 0), input - 1) }
                return (index, cubicWeights(t))
            }
        }
        let (xs, ys) = (taps(inW, outW), taps(inH, outH))
        var out = [Float](repeating: 0, count: outH * outW)
        for (oy, y) in ys.enumerated() {
            for (ox, tx) in xs.enumerated() {
                var sum: Float = 0
                for j in 0..<4 {
                    let row = y.index[j] * inW
                    var line: Float = 0
                    for i in 0..<4 { line += x[row + tx.index[i]] * tx.weight[i] }
                    sum += line * y.weight[j]
                }
                out[oy * outW + ox] = sum
            }
        }
        return out
    }

    /// ATen's `get_cubic_upsample_coefficients` (Keys' kernel, a = −0.75) at offset t ∈ [0, 1).
    static func cubicWeights(_ t: Float) -> [Float] {
        let a: Float = -0.75
        func near(_ x: Float) -> Float { ((a + 2) * x - (a + 3)) * x * x + 1 }
        func far(_ x: Float) -> Float { ((a * x - 5 * a) * x + 8 * a) * x - 4 * a }
        return [far(t + 1), near(t), near(1 - t), far(2 - t)]
    }

}
