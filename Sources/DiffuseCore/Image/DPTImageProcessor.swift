/// transformers' `DPTImageProcessor` (its PIL backend, `DPTImageProcessorPil`): what a DPT depth
/// estimator sees. RGB, resized with PIL's filter to `size` (or, with `keep_aspect_ratio`, by the
/// side's scale that changes the picture least, both sides then rounded to a multiple of
/// `ensure_multiple_of`), `/ 255`, `(x − mean) / std`, then with `do_pad` centred zero padding to
/// a multiple of `size_divisor`; [1, 3, H, W] float32.
public struct DPTImageProcessor: Sendable, Equatable {
    public var doResize = true
    public var height = 384
    public var width = 384
    public var resample: ResampleFilter = .bicubic
    public var keepAspectRatio = false
    public var ensureMultipleOf = 1
    public var doRescale = true
    public var rescaleFactor: Double = 1.0 / 255
    public var doNormalize = true
    /// transformers' IMAGENET_STANDARD_MEAN/STD.
    public var imageMean: [Float] = [0.5, 0.5, 0.5]
    public var imageStd: [Float] = [0.5, 0.5, 0.5]
    public var doPad = false
    public var sizeDivisor: Int?

    public init() {}

    /// Reads `preprocessor_config.json` (a `DPTImageProcessor` or the older `DPTFeatureExtractor`);
    /// errors name the file and the key.
    public init(configPath path: String) throws {
        let json = try Files.readJSON(path)
        func fail(_ key: String, _ why: String) -> FileError { FileError(path, "\(key): \(why)") }
        if let size = json["size"] {
            if let n = size.int {
                (height, width) = (n, n)
            } else if let h = size["height"]?.int, let w = size["width"]?.int {
                (height, width) = (h, w)
            } else {
                throw fail("size", "\(size.serialized()) is neither a number nor {\"height\", \"width\"}")
            }
        }
        doResize = json["do_resize"]?.bool ?? doResize
        doRescale = json["do_rescale"]?.bool ?? doRescale
        doNormalize = json["do_normalize"]?.bool ?? doNormalize
        doPad = json["do_pad"]?.bool ?? doPad
        keepAspectRatio = json["keep_aspect_ratio"]?.bool ?? keepAspectRatio
        rescaleFactor = json["rescale_factor"]?.double ?? rescaleFactor
        if let m = json["ensure_multiple_of"], m != .null {
            guard let n = m.int, n > 0 else { throw fail("ensure_multiple_of", "\(m.serialized()) is not a positive whole number") }
            ensureMultipleOf = n
        }
        if let d = json["size_divisor"], d != .null {
            guard let n = d.int, n > 0 else { throw fail("size_divisor", "\(d.serialized()) is not a positive whole number") }
            sizeDivisor = n
        }
        resample = try ImageProcessorSettings.resample(json, path: path) ?? resample
        imageMean = try ImageProcessorSettings.channels(json, "image_mean", path: path) ?? imageMean
        imageStd = try ImageProcessorSettings.channels(json, "image_std", path: path) ?? imageStd
        if imageStd.contains(0) { throw fail("image_std", "a standard deviation of 0 divides by zero") }
        if height <= 0 || width <= 0 { throw fail("size", "must be positive") }
    }

    /// transformers' `get_resize_output_image_size` for a picture of this size.
    public func resizedSize(height inH: Int, width inW: Int) -> (height: Int, width: Int) {
        var scaleH = Double(height) / Double(inH), scaleW = Double(width) / Double(inW)
        if keepAspectRatio {
            // Scale as little as possible: fit the side whose scale is nearer 1.
            if abs(1 - scaleW) < abs(1 - scaleH) { scaleH = scaleW } else { scaleW = scaleH }
        }
        func constrained(_ v: Double) -> Int {
            let m = Double(ensureMultipleOf)
            // Python's round (half to even), then never below 0.
            let x = (v / m).rounded(.toNearestOrEven) * m
            return Int(x < 0 ? (v / m).rounded(.up) * m : x)
        }
        return (constrained(scaleH * Double(inH)), constrained(scaleW * Double(inW)))
    }

    /// `processor(images=image, return_tensors="pt").pixel_values`: [1, 3, H, W] float32.
    public func pixelValues(_ image: Image) -> Tensor {
        var im = image.rgb
        if doResize {
            let (h, w) = resizedSize(height: im.height, width: im.width)
            im = im.resized(width: w, height: h, filter: resample)
        }
        let pixels = ImageProcessorSettings.pixelTensor(im, rescaleFactor: doRescale ? rescaleFactor : nil,
                                                        mean: doNormalize ? imageMean : nil, std: imageStd)
        guard doPad, let divisor = sizeDivisor else { return pixels }
        return Self.centrePadded(pixels, divisor: divisor)
    }

    /// transformers' DPT `pad_image`: zeros around, split as `pad // 2` before and the rest after.
    public static func centrePadded(_ x: Tensor, divisor: Int) -> Tensor {
        let (h, w) = (x.shape[2], x.shape[3])
        let (ph, pw) = ((h + divisor - 1) / divisor * divisor, (w + divisor - 1) / divisor * divisor)
        if ph == h && pw == w { return x }
        let (top, left) = ((ph - h) / 2, (pw - w) / 2)
        let out = Tensor(zeros: [1, 3, ph, pw])
        for c in 0..<3 {
            for y in 0..<h {
                (out.floats + (c * ph + y + top) * pw + left).update(from: x.floats + (c * h + y) * w, count: w)
            }
        }
        return out
    }
}
