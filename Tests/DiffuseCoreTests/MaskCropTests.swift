import DiffuseCore
import Testing

/// Inpainting only the masked area (diffusers' `padding_mask_crop`) against what diffusers'
/// VaeImageProcessor made of the fixture pictures (`make_image_fixtures.py`, `make_mask_crop`).
@Suite("Mask crop")
struct MaskCropTests {
    @Test("get_crop_region, the cropped and filled image and mask, and apply_overlay equal diffusers' exactly")
    func maskCrop() throws {
        let cases = ImageFixtures.cases("mask_crop")
        #expect(!cases.isEmpty)
        for c in cases {
            let key = c["expected"]!.string!
            let image = try Image.load(ImageFixtures.path(c["image"]!.string!))
            let mask = try Image.load(ImageFixtures.path(c["mask"]!.string!))
            let (width, height) = (c["width"]!.int!, c["height"]!.int!)
            let want = c["region"]!.array!.map { $0.int! }
            let region = try #require(VaeImageProcessor.cropRegion(mask: mask, width: width, height: height, padding: c["padding"]!.int!))
            #expect([region.left, region.top, region.right, region.bottom] == want, "\(key)")

            let filled = VaeImageProcessor.resizedAndFilled(image.cropped(region), width: width, height: height)
            #expect(maxDifference(filled, try ImageFixtures.image(key + "_image")) == 0, "\(key) image")
            let binary = try VaeImageProcessor.preprocessMask(
                [VaeImageProcessor.resizedAndFilled(mask.cropped(region), width: width, height: height)],
                height: height, width: width)
            #expect(binary.toFloatArray() == (try ImageFixtures.expected.tensor(key + "_mask")).toFloatArray(), "\(key) mask")

            let generated = try ImageFixtures.image(key + "_generated")
            let overlay = VaeImageProcessor.applyOverlay(mask: mask, initImage: image, image: generated, region: region)
            #expect(maxDifference(overlay, try ImageFixtures.image(key + "_overlay")) == 0, "\(key) overlay")
        }
        for c in ImageFixtures.cases("overlay") {
            let overlay = VaeImageProcessor.applyOverlay(
                mask: try Image.load(ImageFixtures.path(c["mask"]!.string!)), initImage: try Image.load(ImageFixtures.path(c["image"]!.string!)),
                image: try ImageFixtures.image(c["generated"]!.string!), region: nil)
            #expect(maxDifference(overlay, try ImageFixtures.image(c["expected"]!.string!)) == 0, "\(c["expected"]!.string!)")
        }
    }

    @Test("_resize_and_fill and _resize_and_crop equal diffusers' for wide, tall and near-square sizes")
    func fit() throws {
        let cases = ImageFixtures.cases("fit")
        #expect(cases.contains { $0["mode"]?.string == "fill" } && cases.contains { $0["mode"]?.string == "crop" })
        for c in cases {
            let source = try Image.read(ImageFixtures.path(c["source"]!.string!))
            let (w, h) = (c["width"]!.int!, c["height"]!.int!)
            let out = c["mode"]!.string! == "fill" ? VaeImageProcessor.resizedAndFilled(source, width: w, height: h)
                                                   : VaeImageProcessor.resizedAndCropped(source, width: w, height: h)
            #expect(maxDifference(out, try ImageFixtures.image(c["expected"]!.string!)) == 0, "\(c["expected"]!.string!)")
        }
    }

    @Test("an all-black mask has no region; the region always holds the mask and stays inside the image")
    func regionBounds() {
        let black = Image(width: 20, height: 10, channels: 3)
        #expect(VaeImageProcessor.cropRegion(mask: black, width: 64, height: 64, padding: 8) == nil)
        var rng = TestRandom(seed: 5)
        for _ in 0..<200 {
            let (w, h) = (1 + rng.below(40), 1 + rng.below(40))
            var mask = Image(width: w, height: h, channels: 1)
            let (x, y) = (rng.below(w), rng.below(h))
            mask.pixels[y * w + x] = 1 + UInt8(rng.below(255))
            let (pw, ph) = (8 * (1 + rng.below(16)), 8 * (1 + rng.below(16)))
            let r = VaeImageProcessor.cropRegion(mask: mask, width: pw, height: ph, padding: rng.below(10))!
            #expect(r.left >= 0 && r.top >= 0 && r.right <= w && r.bottom <= h, "\(r) in \(w)x\(h)")
            #expect(r.left <= x && x < r.right && r.top <= y && y < r.bottom, "\(r) misses (\(x), \(y))")
        }
    }

    @Test("Pillow's compositing: paste with a mask, alpha_composite, invert, crop and clipped paste")
    func compositing() {
        // BLEND: (old·(255 − m) + new·m) / 255, rounded as DIV255.
        var dst = Image(width: 3, height: 1, channels: 1, pixels: [0, 100, 255])
        dst.paste(Image(width: 3, height: 1, channels: 1, pixels: [255, 200, 0]),
                  mask: Image(width: 3, height: 1, channels: 1, pixels: [128, 255, 1]))
        #expect(dst.pixels == [128, 200, 254])
        // An opaque overlay wins, a transparent one leaves the background.
        let background = Image(width: 2, height: 1, channels: 4, pixels: [10, 20, 30, 255, 10, 20, 30, 255])
        let overlay = Image(width: 2, height: 1, channels: 4, pixels: [200, 100, 0, 255, 200, 100, 0, 0])
        #expect(background.alphaComposited(overlay).pixels == [200, 100, 0, 255, 10, 20, 30, 255])
        #expect(Image(width: 1, height: 1, channels: 1, pixels: [3]).inverted().pixels == [252])
        let grid = Image(width: 3, height: 2, channels: 1, pixels: [0, 1, 2, 3, 4, 5])
        #expect(grid.cropped(CropRegion(left: 1, top: 0, right: 3, bottom: 2)).pixels == [1, 2, 4, 5])
        var canvas = Image(width: 2, height: 2, channels: 1)
        canvas.paste(grid, x: -1, y: 1)
        #expect(canvas.pixels == [0, 0, 1, 2])
    }
}
