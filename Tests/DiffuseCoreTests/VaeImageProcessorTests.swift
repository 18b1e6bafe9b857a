import DiffuseCore
import Testing

@Suite("VaeImageProcessor")
struct VaeImageProcessorTests {
    @Test("preprocess (resize to a multiple of 8, /255, 2x-1) equals diffusers' float32 tensor exactly")
    func preprocess() throws {
        for c in ImageFixtures.cases("preprocess") {
            let image = try Image.load(ImageFixtures.path(c["source"]!.string!))
            let tensor = try VaeImageProcessor.preprocess([image], height: c["height"]?.int, width: c["width"]?.int,
                                                          vaeScaleFactor: c["vae_scale_factor"]!.int!)
            let expected = try ImageFixtures.expected.tensor(c["expected"]!.string!)
            #expect(tensor.shape == expected.shape)
            #expect(tensor.toFloatArray() == expected.toFloatArray(), "\(c["expected"]!.string!)")
        }
    }

    @Test("the inpainting mask processor (resize, then gray, /255, binarized at 0.5) equals PIL's exactly")
    func preprocessMask() throws {
        let cases = ImageFixtures.cases("mask")
        #expect(!cases.isEmpty)
        for c in cases {
            let image = try Image.load(ImageFixtures.path(c["source"]!.string!))
            let mask = try VaeImageProcessor.preprocessMask([image], height: c["height"]?.int, width: c["width"]?.int,
                                                            vaeScaleFactor: c["vae_scale_factor"]!.int!)
            let expected = try ImageFixtures.expected.tensor(c["expected"]!.string!)
            #expect(mask.shape == expected.shape)
            #expect(mask.toFloatArray() == expected.toFloatArray(), "\(c["expected"]!.string!)")
        }
        // The threshold: 127/255 keeps, 128/255 repaints; colour goes through PIL's luma.
        let levels = Image(width: 4, height: 1, channels: 3, pixels: [127, 127, 127, 128, 128, 128, 255, 0, 0, 0, 255, 0])
        let m = try VaeImageProcessor.preprocessMask([levels], height: 1, width: 4, vaeScaleFactor: 1)
        #expect(m.shape == [1, 1, 1, 4] && m.toFloatArray() == [0, 1, 0, 1])  // red: luma 76, green: 150
    }

    @Test("postprocess ((x/2+0.5).clamp(0,1), ×255, round half to even) equals numpy's uint8 exactly")
    func postprocess() throws {
        for c in ImageFixtures.cases("postprocess") {
            let input = try ImageFixtures.expected.tensor(c["input"]!.string!)
            let images = try VaeImageProcessor.postprocess(input)
            let expected = try ImageFixtures.expected.tensor(c["expected"]!.string!)
            let got = VaeImageProcessor.uint8Tensor(images)
            #expect(got.shape == expected.shape)
            #expect(got.toIntArray() == expected.toIntArray())
        }
    }

    /// The reference pipelines' own `image_float` (output_type="np") and `image_uint8` (PIL).
    @Test("numpy_to_pil turns the reference pipelines' float images into their uint8 images")
    func referencePipelines() throws {
        let manifest = try Files.readJSON(Fixtures.reference("golden/manifest.json"))
        var checked = 0
        for (file, _) in manifest["files"]?.members ?? manifest.members ?? [] where file.contains("/e2e_") {
            let path = Fixtures.reference(file.hasPrefix("golden/") ? file : "golden/" + file)
            guard Files.exists(path) else { continue }
            let golden = try SafeTensorsFile(path: path)
            guard golden.info("image_float") != nil, golden.info("image_uint8") != nil else { continue }
            let images = try VaeImageProcessor.numpyToPil(golden.tensor("image_float"))
            #expect(VaeImageProcessor.uint8Tensor(images).toIntArray() == (try golden.tensor("image_uint8")).toIntArray(), "\(file)")
            checked += 1
        }
        #expect(checked > 0, "no e2e goldens with image_float and image_uint8 under \(Fixtures.reference)")
    }

    @Test("rounding: x·255 exactly halfway rounds to even, NaN and out-of-range clamp")
    func rounding() throws {
        // 0.5/255 and 1.5/255 land on k + 0.5 after ×255 in float32 only if representable; use
        // values whose product is exact: (k + 0.5) / 255 computed in Double, then checked.
        var values: [Float] = []
        var expected: [UInt8] = []
        for k in 0..<255 {
            let x = Float((Double(k) + 0.5) / 255)
            let product = x * 255
            guard product == Float(k) + 0.5 else { continue }
            values.append(x)
            expected.append(UInt8(k % 2 == 0 ? k : k + 1))
        }
        #expect(values.count > 10)
        values += [.nan, -0.5, 1.5, 0, 1]
        expected += [0, 0, 255, 0, 255]
        let t = Tensor(shape: [1, 1, values.count, 1], floats: values)
        #expect(try VaeImageProcessor.numpyToPil(t)[0].pixels == expected)
    }

    @Test("preprocess then postprocess gives the image back; bad tensors are refused")
    func roundTrip() throws {
        var rng = TestRandom(seed: 11)
        let images = (0..<2).map { _ in Image(width: 16, height: 24, channels: 3, pixels: rng.bytes(16 * 24 * 3)) }
        let tensor = try VaeImageProcessor.preprocess(images)
        #expect(tensor.shape == [2, 3, 24, 16])
        #expect(try VaeImageProcessor.postprocess(tensor) == images)
        #expect(try VaeImageProcessor.images(uint8: VaeImageProcessor.uint8Tensor(images)) == images)
        #expect(imageError { try VaeImageProcessor.postprocess(Tensor(zeros: [1, 2, 4, 4])) } != nil)
        #expect(imageError { try VaeImageProcessor.postprocess(Tensor(zeros: [1, 3, 4, 4], dtype: .int32)) } != nil)
        #expect(imageError { try VaeImageProcessor.preprocess([Image(width: 7, height: 30, channels: 3)]) } != nil)
        #expect(imageError { try VaeImageProcessor.preprocess([images[0], images[1].converted(channels: 1)]) } != nil)
        // diffusers floors the size to a multiple of the VAE scale factor.
        #expect(VaeImageProcessor.defaultHeightWidth(Image(width: 37, height: 29, channels: 3)) == (24, 32))
    }

    @Test("mode conversions follow PIL: alpha dropped, gray replicated, luma in fixed point")
    func conversions() {
        let rgba = Image(width: 2, height: 1, channels: 4, pixels: [10, 200, 30, 0, 255, 255, 255, 128])
        #expect(rgba.rgb.pixels == [10, 200, 30, 255, 255, 255])
        // L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16
        let luma: Int = (19595 * 10 + 38470 * 200 + 7471 * 30 + 0x8000) >> 16
        #expect(rgba.converted(channels: 1).pixels == [UInt8(luma), 255])
        #expect(rgba.converted(channels: 2).pixels[1] == 0)
        let gray = Image(width: 2, height: 1, channels: 1, pixels: [7, 250])
        #expect(gray.rgb.pixels == [7, 7, 7, 250, 250, 250])
        #expect(gray.converted(channels: 4).pixels == [7, 7, 7, 255, 250, 250, 250, 255])
    }
}
