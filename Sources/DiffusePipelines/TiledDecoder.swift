import DiffuseCore

/// diffusers' `AutoencoderKL.tiled_decode`: latents cut into tiles of `tileSize / factor`
/// that overlap by a quarter, each decoded alone, then every tile blended into the one above
/// and the one to its left with linear ramps over the overlap, and cropped. Memory is bounded by
/// one tile's decode; the ramps hide the seams.
///
/// One deliberate difference: diffusers keeps `tile − blend` pixels of each tile while tiles
/// start `overlap · factor` pixels apart; the two agree for its default geometry (512-pixel
/// tiles: both 384) but not for every tile size, where its tiles land misaligned. Here the
/// kept width is the stride itself and the blend covers the rest of the tile, which is
/// diffusers' result for the default tile and stays aligned for any other.
public struct TiledDecoder {
    public var tileSize: Int
    public var factor: Int
    public var overlapFactor = 0.25

    public init(tileSize: Int, factor: Int) {
        self.tileSize = tileSize
        self.factor = factor
    }

    /// Latents between tile starts, and the pixels each tile keeps.
    var latentStride: Int { max(1, Int(Double(tileSize / factor) * (1 - overlapFactor))) }
    public var pixelStride: Int { latentStride * factor }

    /// Decodes z [1, C, h, w] with `decodeTile` (latents [1, C, th, tw] → pixels [1, 3, th·f, tw·f]).
    public func decode(_ z: Tensor, _ decodeTile: (Tensor) throws -> Tensor) throws -> Tensor {
        let latentTile = tileSize / factor
        let overlap = latentStride
        let rowLimit = pixelStride
        let blendExtent = tileSize - rowLimit
        let (c, h, w) = (z.shape[1], z.shape[2], z.shape[3])
        var rows: [[Tensor]] = []
        for i in stride(from: 0, to: h, by: overlap) {
            var row: [Tensor] = []
            for j in stride(from: 0, to: w, by: overlap) {
                let th = min(latentTile, h - i), tw = min(latentTile, w - j)
                let tile = Tensor(zeros: [1, c, th, tw])
                for ch in 0..<c {
                    for y in 0..<th {
                        (tile.floats + (ch * th + y) * tw).update(from: z.floats + (ch * h + i + y) * w + j, count: tw)
                    }
                }
                row.append(try decodeTile(tile).copy())
            }
            rows.append(row)
        }
        // Blend (in place, in diffusers' order: vertical then horizontal) and crop.
        let outH = h * factor, outW = w * factor
        let out = Tensor(zeros: [1, 3, outH, outW])
        var y0 = 0
        for i in rows.indices {
            var x0 = 0
            var rowHeight = 0
            for j in rows[i].indices {
                let tile = rows[i][j]
                if i > 0 { blendVertical(rows[i - 1][j], tile, blendExtent) }
                if j > 0 { blendHorizontal(rows[i][j - 1], tile, blendExtent) }
                let (th, tw) = (tile.shape[2], tile.shape[3])
                let keepH = min(rowLimit, th), keepW = min(rowLimit, tw)
                for ch in 0..<3 {
                    for y in 0..<keepH where y0 + y < outH {
                        let n = min(keepW, outW - x0)
                        if n > 0 { (out.floats + (ch * outH + y0 + y) * outW + x0).update(from: tile.floats + (ch * th + y) * tw, count: n) }
                    }
                }
                x0 += keepW
                rowHeight = keepH
            }
            y0 += rowHeight
        }
        return out
    }

    /// `b[..., y, :] = a[..., -extent + y, :]·(1 − y/extent) + b[..., y, :]·(y/extent)`.
    func blendVertical(_ a: Tensor, _ b: Tensor, _ extent: Int) {
        let e = min(a.shape[2], b.shape[2], extent)
        let (ah, bh, bw, aw) = (a.shape[2], b.shape[2], b.shape[3], a.shape[3])
        for ch in 0..<3 {
            for y in 0..<e {
                let t = Float(y) / Float(e)
                let ar = a.floats + (ch * ah + ah - e + y) * aw, br = b.floats + (ch * bh + y) * bw
                for x in 0..<min(aw, bw) { br[x] = ar[x] * (1 - t) + br[x] * t }
            }
        }
    }

    /// `b[..., x] = a[..., -extent + x]·(1 − x/extent) + b[..., x]·(x/extent)`.
    func blendHorizontal(_ a: Tensor, _ b: Tensor, _ extent: Int) {
        let e = min(a.shape[3], b.shape[3], extent)
        let (ah, aw, bh, bw) = (a.shape[2], a.shape[3], b.shape[2], b.shape[3])
        for ch in 0..<3 {
            for y in 0..<min(ah, bh) {
                let ar = a.floats + (ch * ah + y) * aw, br = b.floats + (ch * bh + y) * bw
                for x in 0..<e {
                    let t = Float(x) / Float(e)
                    br[x] = ar[aw - e + x] * (1 - t) + br[x] * t
                }
            }
        }
    }
}
