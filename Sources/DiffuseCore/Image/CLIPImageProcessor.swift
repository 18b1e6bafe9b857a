/// transformers' `CLIPImageProcessor` (its PIL backend, `CLIPImageProcessorPil`): what an image
/// encoder such as an IP-Adapter's sees. RGB, the shortest edge resized to `size` (the long edge
/// to `int(size · long / short)`) with PIL's filter, a centre crop, `/ 255`, then
/// `(x − mean) / std` per channel, as [1, 3, crop, crop] float32.
///
/// The settings are `preprocessor_config.json`'s; diffusers' `load_ip_adapter` makes
/// `CLIPImageProcessor(size=image_size, crop_size=image_size)` when a pipeline has none.
public struct CLIPImageProcessor: Sendable, Equatable {
    public var doResize = true
    /// `size`: the shortest edge, or both sides.
    public var size: Size
    public var resample: ResampleFilter = .bicubic
    public var doCenterCrop = true
    public var cropHeight: Int
    public var cropWidth: Int
    public var doRescale = true
    public var rescaleFactor: Double = 1.0 / 255
    public var doNormalize = true
    public var imageMean: [Float] = [0.48145466, 0.4578275, 0.40821073]
    public var imageStd: [Float] = [0.26862954, 0.26130258, 0.27577711]

    public enum Size: Sendable, Equatable {
        case shortestEdge(Int)
        case exact(height: Int, width: Int)
    }

    /// `CLIPImageProcessor(size=s, crop_size=s)`.
    public init(imageSize s: Int) {
        size = .shortestEdge(s)
        cropHeight = s
        cropWidth = s
    }

    /// Reads `preprocessor_config.json`; errors name the file and the key.
    public init(configPath path: String) throws {
        let json = try Files.readJSON(path)
        func fail(_ key: String, _ why: String) -> FileError { FileError(path, "\(key): \(why)") }
        func sides(_ key: String, _ v: JSON) throws -> Size {
            if let n = v.int { return .shortestEdge(n) }
            if let e = v["shortest_edge"]?.int { return .shortestEdge(e) }
            if let h = v["height"]?.int, let w = v["width"]?.int { return .exact(height: h, width: w) }
            throw fail(key, "\(v.serialized()) is neither a number, {\"shortest_edge\": n} nor {\"height\", \"width\"}")
        }
        size = try json["size"].map { try sides("size", $0) } ?? .shortestEdge(224)
        switch try json["crop_size"].map({ try sides("crop_size", $0) }) ?? .exact(height: 224, width: 224) {
        case .shortestEdge(let n): (cropHeight, cropWidth) = (n, n)
        case .exact(let h, let w): (cropHeight, cropWidth) = (h, w)
        }
        doResize = json["do_resize"]?.bool ?? true
        doCenterCrop = json["do_center_crop"]?.bool ?? true
        doRescale = json["do_rescale"]?.bool ?? true
        doNormalize = json["do_normalize"]?.bool ?? true
        rescaleFactor = json["rescale_factor"]?.double ?? rescaleFactor
        resample = try ImageProcessorSettings.resample(json, path: path) ?? resample
        imageMean = try ImageProcessorSettings.channels(json, "image_mean", path: path) ?? imageMean
        imageStd = try ImageProcessorSettings.channels(json, "image_std", path: path) ?? imageStd
        if imageStd.contains(0) { throw fail("image_std", "a standard deviation of 0 divides by zero") }
        if min(cropHeight, cropWidth) <= 0 { throw fail("crop_size", "must be positive") }
        switch size {
        case .shortestEdge(let n) where n <= 0: throw fail("size", "must be positive")
        case .exact(let h, let w) where h <= 0 || w <= 0: throw fail("size", "must be positive")
        default: break
        }
    }

    /// The output's height and width.
    public var outputSize: (height: Int, width: Int) {
        if doCenterCrop { return (cropHeight, cropWidth) }
        if case .exact(let h, let w) = size { return (h, w) }
        return (-1, -1)
    }

    /// `processor(image, return_tensors="pt").pixel_values`: [1, 3, H, W] float32.
    public func pixelValues(_ image: Image) -> Tensor {
        var im = image.rgb
        if doResize {
            switch size {
            case .exact(let h, let w): im = im.resized(width: w, height: h, filter: resample)
            case .shortestEdge(let s):
                // transformers' get_resize_output_image_size(default_to_square=False).
                let short = min(im.width, im.height), long = max(im.width, im.height)
                let newLong = Int(Double(s) * Double(long) / Double(short))
                im = im.width <= im.height ? im.resized(width: s, height: newLong, filter: resample)
                                           : im.resized(width: newLong, height: s, filter: resample)
            }
        }
        if doCenterCrop { im = Self.centerCropped(im, height: cropHeight, width: cropWidth) }
        return ImageProcessorSettings.pixelTensor(im, rescaleFactor: doRescale ? rescaleFactor : nil,
                                                  mean: doNormalize ? imageMean : nil, std: imageStd)
    }

    /// transformers' `center_crop`: the box at `((H − h) // 2, (W − w) // 2)`, zero-padded
    /// around the image where the image is smaller than the crop.
    static func centerCropped(_ image: Image, height: Int, width: Int) -> Image {
        if image.width == width && image.height == height { return image }
        let top = floorDiv(image.height - height, 2), left = floorDiv(image.width - width, 2)
        var out = Image(width: width, height: height, channels: image.channels)
        let ch = image.channels
        for y in 0..<height {
            let sy = y + top
            guard sy >= 0 && sy < image.height else { continue }
            for x in 0..<width {
                let sx = x + left
                guard sx >= 0 && sx < image.width else { continue }
                for c in 0..<ch { out.pixels[(y * width + x) * ch + c] = image.pixels[(sy * image.width + sx) * ch + c] }
            }
        }
        return out
    }

    private static func floorDiv(_ a: Int, _ b: Int) -> Int { a >= 0 ? a / b : -((-a + b - 1) / b) }
}
