/// diffusers' "inpaint only the masked area" (`padding_mask_crop`): the region around the mask
/// is cut out, generated at the full processing size, and pasted back into the original image.
extension VaeImageProcessor {
    /// `get_crop_region`: the smallest box holding every non-black pixel of the mask (gray, as
    /// `convert("L")`), grown by `padding` on each side within the image, then grown along one
    /// axis towards the processing aspect ratio `width`:`height` (kept inside the image, so a
    /// region near an edge shifts, and one that cannot fit stops at the image's size). nil when
    /// the mask is all black: there is nothing to repaint.
    public static func cropRegion(mask: Image, width: Int, height: Int, padding pad: Int) -> CropRegion? {
        let gray = mask.converted(channels: 1)
        let (w, h) = (gray.width, gray.height)
        func columnIsBlack(_ x: Int) -> Bool { (0..<h).allSatisfy { gray.pixels[$0 * w + x] == 0 } }
        func rowIsBlack(_ y: Int) -> Bool { (0..<w).allSatisfy { gray.pixels[y * w + $0] == 0 } }
        guard let first = (0..<w).first(where: { !columnIsBlack($0) }) else { return nil }
        let last = (0..<w).last { !columnIsBlack($0) }!
        let top = (0..<h).first { !rowIsBlack($0) }!, bottom = (0..<h).last { !rowIsBlack($0) }!

        var (x1, y1, x2, y2) = (max(first - pad, 0), max(top - pad, 0), min(last + 1 + pad, w), min(bottom + 1 + pad, h))
        // Python's `//` floors; `int()` of the float difference truncates.
        func halfDown(_ v: Int) -> Int { v >= 0 ? v / 2 : -((-v + 1) / 2) }
        let ratioProcessing = Double(width) / Double(height)
        if Double(x2 - x1) / Double(y2 - y1) > ratioProcessing {
            let diff = Int(Double(x2 - x1) / ratioProcessing - Double(y2 - y1))
            y1 -= halfDown(diff)
            y2 += diff - halfDown(diff)
            if y2 >= h { (y1, y2) = (y1 - (y2 - h), h) }
            if y1 < 0 { (y1, y2) = (0, y2 - y1) }
            y2 = min(y2, h)
        } else {
            let diff = Int(Double(y2 - y1) * ratioProcessing - Double(x2 - x1))
            x1 -= halfDown(diff)
            x2 += diff - halfDown(diff)
            if x2 >= w { (x1, x2) = (x1 - (x2 - w), w) }
            if x1 < 0 { (x1, x2) = (0, x2 - x1) }
            x2 = min(x2, w)
        }
        return CropRegion(left: x1, top: y1, right: x2, bottom: y2)
    }

    /// `_resize_and_fill`: resized (keeping its aspect ratio) to fit inside width×height,
    /// centred on RGB black, and the uncovered bands filled by stretching the resized image's
    /// edge (PIL's bicubic resize of a zero-height, or zero-width, box at that edge).
    public static func resizedAndFilled(_ image: Image, width: Int, height: Int, resample: ResampleFilter = .lanczos) -> Image {
        let ratio = Double(width) / Double(height), sourceRatio = Double(image.width) / Double(image.height)
        let srcW = ratio < sourceRatio ? width : image.width * height / image.height
        let srcH = ratio >= sourceRatio ? height : image.height * width / image.width
        let resized = image.resized(width: srcW, height: srcH, filter: resample)
        var out = Image(width: width, height: height, channels: 3)
        out.paste(resized, x: width / 2 - srcW / 2, y: height / 2 - srcH / 2)
        let (rw, rh) = (Float(resized.width), Float(resized.height))
        if ratio < sourceRatio {
            let fill = height / 2 - srcH / 2
            if fill > 0 {
                out.paste(resized.resized(width: width, height: fill, filter: .bicubic,
                                          box: ResampleBox(left: 0, top: 0, right: Float(width), bottom: 0)), x: 0, y: 0)
                out.paste(resized.resized(width: width, height: fill, filter: .bicubic,
                                          box: ResampleBox(left: 0, top: rh, right: Float(width), bottom: rh)), x: 0, y: fill + srcH)
            }
        } else if ratio > sourceRatio {
            let fill = width / 2 - srcW / 2
            if fill > 0 {
                out.paste(resized.resized(width: fill, height: height, filter: .bicubic,
                                          box: ResampleBox(left: 0, top: 0, right: 0, bottom: Float(height))), x: 0, y: 0)
                out.paste(resized.resized(width: fill, height: height, filter: .bicubic,
                                          box: ResampleBox(left: rw, top: 0, right: rw, bottom: Float(height))), x: fill + srcW, y: 0)
            }
        }
        return out
    }

    /// `_resize_and_crop`: resized (keeping its aspect ratio) to cover width×height, centred,
    /// the excess cut off; RGB.
    public static func resizedAndCropped(_ image: Image, width: Int, height: Int, resample: ResampleFilter = .lanczos) -> Image {
        let ratio = Double(width) / Double(height), sourceRatio = Double(image.width) / Double(image.height)
        let srcW = ratio > sourceRatio ? width : image.width * height / image.height
        let srcH = ratio <= sourceRatio ? height : image.height * width / image.width
        var out = Image(width: width, height: height, channels: 3)
        out.paste(image.resized(width: srcW, height: srcH, filter: resample), x: width / 2 - srcW / 2, y: height / 2 - srcH / 2)
        return out
    }

    /// `apply_overlay`: the generated `image` (of the crop's content at the processing size)
    /// fitted back into `region` of `initImage`, and the kept part of `initImage` (where the
    /// mask is not white, weighted by how black it is) laid over it, in Pillow's premultiplied
    /// paste and alpha compositing. The result has the initial image's size, RGB.
    public static func applyOverlay(mask: Image, initImage: Image, image: Image, region: CropRegion?) -> Image {
        let (width, height) = (initImage.width, initImage.height)
        var kept = Image(width: width, height: height, channels: 4)      // "RGBa", transparent black
        kept.paste(initImage.converted(channels: 4).premultiplied(), mask: mask.converted(channels: 1).inverted())
        kept = kept.unpremultiplied()                                     // "RGBA"
        var base = image
        if let region {
            var canvas = Image(width: width, height: height, channels: 4)
            canvas.paste(resizedAndCropped(image, width: region.width, height: region.height), x: region.left, y: region.top)
            base = canvas.converted(channels: 3)
        }
        return base.converted(channels: 4).alphaComposited(kept).converted(channels: 3)
    }
}
