/// A rectangle of pixels: columns `left..<right`, rows `top..<bottom` (PIL's crop box).
public struct CropRegion: Equatable, Sendable, CustomStringConvertible {
    public var left: Int, top: Int, right: Int, bottom: Int

    public init(left: Int, top: Int, right: Int, bottom: Int) {
        (self.left, self.top, self.right, self.bottom) = (left, top, right, bottom)
    }

    public var width: Int { right - left }
    public var height: Int { bottom - top }
    public var description: String { "(\(left), \(top), \(right), \(bottom))" }
}

/// Pillow's crop, paste and compositing, with its 8-bit arithmetic, for diffusers' inpainting
/// overlay.
extension Image {
    /// `Image.crop(box)` of a region inside the image.
    public func cropped(_ r: CropRegion) -> Image {
        precondition(r.left >= 0 && r.top >= 0 && r.right <= width && r.bottom <= height && r.width > 0 && r.height > 0,
                     "crop \(r) outside a \(width)x\(height) image")
        let c = channels, rowLength = r.width * c
        var out = [UInt8](repeating: 0, count: r.height * rowLength)
        for y in 0..<r.height {
            let from = ((r.top + y) * width + r.left) * c
            out[(y * rowLength)..<((y + 1) * rowLength)] = pixels[from..<(from + rowLength)]
        }
        return Image(width: r.width, height: r.height, channels: c, pixels: out)
    }

    /// `Image.paste(image, (x, y))`: `image` (converted to this mode, as PIL does) copied in with
    /// its top-left corner at (x, y); what falls outside is clipped.
    public mutating func paste(_ image: Image, x: Int, y: Int) {
        let src = image.converted(channels: channels), c = channels
        let x0 = max(x, 0), x1 = min(x + src.width, width), y0 = max(y, 0), y1 = min(y + src.height, height)
        guard x0 < x1, y0 < y1 else { return }
        let count = (x1 - x0) * c
        for row in y0..<y1 {
            let from = ((row - y) * src.width + (x0 - x)) * c, to = (row * width + x0) * c
            pixels[to..<(to + count)] = src.pixels[from..<(from + count)]
        }
    }

    /// `Image.paste(image, mask=mask)` with an "L" mask of this size: every sample (alpha too)
    /// becomes PIL's `BLEND`, `(old·(255 − m) + new·m) / 255` rounded as Pillow's `DIV255`.
    public mutating func paste(_ image: Image, mask: Image) {
        precondition(image.width == width && image.height == height && mask.width == width && mask.height == height
                     && mask.channels == 1 && image.channels == channels, "paste: images do not match")
        let c = channels
        for i in 0..<(width * height) {
            let m = UInt32(mask.pixels[i])
            for k in 0..<c {
                let t = UInt32(pixels[i * c + k]) * (255 - m) + UInt32(image.pixels[i * c + k]) * m + 128
                pixels[i * c + k] = UInt8(((t >> 8) + t) >> 8)
            }
        }
    }

    /// `ImageOps.invert`: 255 − every sample.
    public func inverted() -> Image {
        Image(width: width, height: height, channels: channels, pixels: pixels.map { 255 - $0 })
    }

    /// `Image.alpha_composite(overlay)` of two RGBA images of one size: `overlay` over this,
    /// in Pillow's fixed point (AlphaComposite.c, 7 extra bits, rounded divisions by 255).
    public func alphaComposited(_ overlay: Image) -> Image {
        precondition(channels == 4 && overlay.channels == 4 && overlay.width == width && overlay.height == height,
                     "alpha_composite needs two RGBA images of one size")
        let bits: UInt32 = 7
        func div255(_ a: UInt32) -> UInt32 { ((a >> 8) + a) >> 8 }
        var out = pixels
        for i in stride(from: 0, to: pixels.count, by: 4) {
            let sa = UInt32(overlay.pixels[i + 3])
            guard sa != 0 else { continue }
            let blend = UInt32(pixels[i + 3]) * (255 - sa)
            let outa255 = sa * 255 + blend
            let coef1 = sa * 255 * 255 * (1 << bits) / outa255
            let coef2 = 255 * (1 << bits) - coef1
            for k in 0..<3 {
                let t = UInt32(overlay.pixels[i + k]) * coef1 + UInt32(pixels[i + k]) * coef2
                out[i + k] = UInt8(div255(t + (0x80 << bits)) >> bits)
            }
            out[i + 3] = UInt8(div255(outa255 + 0x80))
        }
        return Image(width: width, height: height, channels: 4, pixels: out)
    }
}
