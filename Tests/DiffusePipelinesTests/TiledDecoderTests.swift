import DiffuseCore
import DiffuseCPU
import DiffusePipelines
import Testing

@Suite("VAE tiling")
struct TiledDecoderTests {
    /// A decoder whose output at a pixel depends only on the latent under it: overlapping tiles
    /// then agree exactly, so blending and cropping must reproduce the one-pass result.
    func upsample(_ z: Tensor, factor: Int) -> Tensor {
        let (c, h, w) = (z.shape[1], z.shape[2], z.shape[3])
        let out = Tensor(zeros: [1, 3, h * factor, w * factor])
        for ch in 0..<3 {
            for y in 0..<(h * factor) {
                for x in 0..<(w * factor) {
                    out.floats[(ch * h * factor + y) * w * factor + x] = z.floats[((ch % c) * h + y / factor) * w + x / factor]
                }
            }
        }
        return out
    }

    @Test("tiles, blends and crops back to the one-pass image", arguments: [(13, 9, 32), (8, 8, 32), (20, 7, 16), (5, 17, 24)])
    func exactForLocalDecoder(_ h: Int, _ w: Int, _ tile: Int) throws {
        let z = Tensor(zeros: [1, 4, h, w])
        for i in 0..<z.count { z.floats[i] = Float((i * 7919) % 97) / 13 - 3 }
        var tiles = 0
        let tiled = try TiledDecoder(tileSize: tile, factor: 8).decode(z) { tiles += 1; return upsample($0, factor: 8) }
        let whole = upsample(z, factor: 8)
        #expect(tiled.shape == whole.shape)
        // Blending equal values, a·(1−t) + a·t, is a up to rounding.
        let worst = zip(tiled.toFloatArray(), whole.toFloatArray()).map { abs($0 - $1) }.max() ?? 0
        #expect(worst <= 1e-5, "tiled and one-pass images differ by \(worst)")
        #expect(tiles > 1, "the latents should need several tiles")
    }

    /// On a real VAE, tiling changes the image (each tile normalizes with its own GroupNorm
    /// statistics, as in diffusers), so closeness is measured by the benchmark, not asserted
    /// here. What must hold: a tile as large as the image is the one-pass decode, and smaller
    /// tiles give a complete, finite image of the right size.
    @Test("the tiny reference VAE: one tile is the plain decode; small tiles give a full image")
    func referenceVAE() throws {
        let golden = Fixtures.reference("golden")
        for variant in try Files.list(golden) {
            let folder = Fixtures.reference("models/\(variant)")
            guard Files.exists(Files.join(folder, "model_index.json")), let g = try? SafeTensorsFile(path: Files.join(golden, variant, "vae.safetensors")) else { continue }
            let components = try StableDiffusionComponents.load(folder: folder)
            let latents = try g.tensor("latents").slice(0..<1).copy()
            let side = max(latents.shape[2], latents.shape[3]) * components.vae.model.spatialScaleFactor  // covers a rectangle
            func decode(tile: Int?) throws -> Image {
                var o = PipelineOptions()
                o.vaeTile = tile
                return try StableDiffusionPipeline(components: components, backend: try CPUBackend(), options: o).decode(latents)[0]
            }
            let whole = try decode(tile: nil)
            #expect(try decode(tile: side).pixels == whole.pixels, "\(variant): a tile covering the image must not change it")
            let tiled = try decode(tile: side / 2)
            #expect(tiled.width == whole.width && tiled.height == whole.height)
            let diff = zip(whole.pixels, tiled.pixels).map { abs(Int($0) - Int($1)) }
            print("\(variant): tiles of \(side / 2) px vs one pass: mean |Δ| \(Double(diff.reduce(0, +)) / Double(diff.count)) levels")
        }
    }
}
