import DiffuseCore
import DiffuseGraph
import DiffuseModels
import Foundation
import Testing

/// TAEF2, the FLUX.2 tiny autoencoder: real fp16 weights in taesd.py's key layout with the
/// mid-block GroupNorm pool branch, against float32 goldens of a real photo.
@Suite struct TAEF2Tests {
    static var folder: String { Fixtures.data("taef2") }

    static func load() throws -> (AutoencoderTiny, encoder: SafeTensorsFile, decoder: SafeTensorsFile, golden: SafeTensorsFile) {
        let model = try AutoencoderTiny(configPath: Files.join(folder, "config.json"))
        return (model, try SafeTensorsFile(path: Files.join(folder, "encoder.safetensors")),
                try SafeTensorsFile(path: Files.join(folder, "decoder.safetensors")),
                try SafeTensorsFile(path: Files.join(folder, "golden.safetensors")))
    }

    /// Every tensor of both files is declared with its shape, and nothing else.
    @Test func weightsMatchArchitecture() throws {
        let (model, encoder, decoder, _) = try Self.load()
        #expect(model.layout == .original)
        #expect(model.encoder.parameters.contains { $0.name.contains("pool") })
        #expect(try model.encoder.checkWeights(encoder).isEmpty)
        #expect(try model.decoder.checkWeights(decoder).isEmpty)
        let fileCount = { (f: SafeTensorsFile) in f.tensorNames.reduce(0) { $0 + f.info($1)!.shape.reduce(1, *) } }
        #expect(model.encoder.parameterCount == fileCount(encoder))
        #expect(model.decoder.parameterCount == fileCount(decoder))
    }

    /// Encode the photo, decode the golden latents and the encoder's own latents; print the round
    /// trip's PSNR. The graphs take and give [-1, 1] images (diffusers' convention); taesd.py's
    /// goldens are in [0, 1].
    @Test func photoRoundTrip() throws {
        let (model, encoderWeights, decoderWeights, golden) = try Self.load()
        let pixels = try golden.tensor("image_uint8")  // [H,W,3]
        let (h, w) = (pixels.shape[0], pixels.shape[1])
        let image = hwcToNCHW(pixels).mapFloats { $0 / 255 * 2 - 1 }
        let goldenLatents = try golden.tensor("latents")
        let encoder = try model.encoderGraph(batch: 1, height: h, width: w)
        let decoder = try model.decoderGraph(batch: 1, height: goldenLatents.shape[2], width: goldenLatents.shape[3])

        var ran = false
        for b in TestBackends.all {
            guard encoder.flops + decoder.flops <= b.flopLimit else {
                print("taef2: skipping the \(b) backend: \(Int((encoder.flops + decoder.flops) / 1e9)) GFLOP is over its test limit of \(Int(b.flopLimit / 1e9)) GFLOP")
                continue
            }
            ran = true
            let latents = try #require(try run(encoder, weights: encoderWeights, on: b,
                                               feeds: [AutoencoderTiny.Name.sample: image])[AutoencoderTiny.Name.latents])
            expectClose(latents, goldenLatents, tolerance: b.tolerance, "taef2 latents on \(b)")

            let decode = try b.backend.compile(decoder, weights: ModelWeights(decoderWeights), options: b.options)
            func decoded(_ z: Tensor) throws -> Tensor {
                try #require(try decode.run(host: [AutoencoderTiny.Name.latents: z], on: b.backend)[AutoencoderTiny.Name.sample])
            }
            expectClose(try decoded(goldenLatents).mapFloats { ($0 + 1) / 2 }, try golden.tensor("decoded"),
                        tolerance: b.tolerance, "taef2 decoded on \(b)")
            expectClose(try decoded(try golden.tensor("random_latents")).mapFloats { ($0 + 1) / 2 },
                        try golden.tensor("decoded_random"), tolerance: b.tolerance, "taef2 decoded_random on \(b)")

            // The round trip through our own latents, as 8-bit pixels.
            let roundTrip = try decoded(latents)
            let psnr = psnr8(roundTrip, pixels)
            print("taef2 round trip PSNR on \(b): \(String(format: "%.2f", psnr)) dB")
            #expect(psnr >= 24, "taef2 round trip PSNR \(psnr) dB on \(b)")
        }
        if !ran { print("taef2: no test backend is fast enough for the 256x256 photo; only the weights were checked") }
    }
}

/// [H,W,C] uint8 -> [1,C,H,W] float32 (0...255).
func hwcToNCHW(_ t: Tensor) -> Tensor {
    let (h, w, c) = (t.shape[0], t.shape[1], t.shape[2])
    let src = t.toFloatArray()
    var out = [Float](repeating: 0, count: h * w * c)
    for y in 0..<h { for x in 0..<w { for k in 0..<c { out[(k * h + y) * w + x] = src[(y * w + x) * c + k] } } }
    return Tensor(shape: [1, c, h, w], floats: out)
}

/// PSNR of a [-1, 1] NCHW image, rounded to 8 bits as the pipelines save it, against [H,W,C] pixels.
func psnr8(_ image: Tensor, _ pixels: Tensor) -> Double {
    let reference = hwcToNCHW(pixels).toFloatArray()
    var se = 0.0
    for (v, r) in zip(image.toFloatArray(), reference) {
        let q = (min(max((Double(v) + 1) / 2, 0), 1) * 255).rounded()
        se += (q - Double(r)) * (q - Double(r))
    }
    let mse = se / Double(reference.count)
    return mse == 0 ? .infinity : 10 * log10(255 * 255 / mse)
}
