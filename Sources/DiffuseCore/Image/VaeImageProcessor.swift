/// diffusers' `VaeImageProcessor` for PIL images: images in and out of the VAE's [-1, 1]
/// NCHW float32 tensors, with the same float32 arithmetic step by step, so pixels that go
/// through here equal the ones diffusers produces.
public enum VaeImageProcessor {
    /// `get_default_height_width`: the requested (or the image's) size, rounded down to a
    /// multiple of the VAE scale factor.
    public static func defaultHeightWidth(_ image: Image, height: Int? = nil, width: Int? = nil,
                                          vaeScaleFactor: Int = 8) -> (height: Int, width: Int) {
        let h = height ?? image.height, w = width ?? image.width
        return (h - h % vaeScaleFactor, w - w % vaeScaleFactor)
    }

    /// `preprocess` for PIL images: every image is resized (PIL `resize`, LANCZOS by default) to
    /// the default size of the first, then `pil_to_numpy` (x / 255 in float32), `numpy_to_pt`
    /// and `normalize` (2x − 1). Returns [N, C, H, W] float32; C is the images' channel count
    /// (3 for RGB, which is what the VAE takes: `Image.load` already converts to RGB).
    public static func preprocess(_ images: [Image], height: Int? = nil, width: Int? = nil, vaeScaleFactor: Int = 8,
                                  resample: ResampleFilter = .lanczos, doNormalize: Bool = true) throws -> Tensor {
        let resized = try resizedToDefault(images, height: height, width: width, vaeScaleFactor: vaeScaleFactor, resample: resample)
        let pt = numpyToPt(pilToNumpy(resized))
        return doNormalize ? normalize(pt) : pt
    }

    /// `preprocess` of the inpainting pipelines' `mask_processor` (`do_normalize=False,
    /// do_binarize=True, do_convert_grayscale=True`): resized as images are, then gray (PIL
    /// `convert("L")`, after the resize as diffusers does it), x / 255, and binarized: 0 below 0.5,
    /// 1 from 0.5 up. Returns [N, 1, H, W] float32; 1 marks what to repaint.
    public static func preprocessMask(_ masks: [Image], height: Int? = nil, width: Int? = nil, vaeScaleFactor: Int = 8,
                                      resample: ResampleFilter = .lanczos) throws -> Tensor {
        let resized = try resizedToDefault(masks, height: height, width: width, vaeScaleFactor: vaeScaleFactor, resample: resample)
        let gray = numpyToPt(pilToNumpy(resized.map { $0.converted(channels: 1) }))
        return map(gray) { $0 < 0.5 ? 0 : 1 }
    }

    /// The resize step of `preprocess`: every image to the default size of the first.
    static func resizedToDefault(_ images: [Image], height: Int?, width: Int?, vaeScaleFactor: Int,
                                 resample: ResampleFilter) throws -> [Image] {
        guard let first = images.first else {
            throw ImageError("VaeImageProcessor.preprocess", .invalidInput("no images"))
        }
        let size = defaultHeightWidth(first, height: height, width: width, vaeScaleFactor: vaeScaleFactor)
        guard size.height > 0, size.width > 0 else {
            throw ImageError("VaeImageProcessor.preprocess", .invalidInput(
                "a \(first.width)x\(first.height) image is smaller than one \(vaeScaleFactor)-pixel latent cell"))
        }
        for (i, image) in images.enumerated() where image.channels != first.channels {
            throw ImageError("VaeImageProcessor.preprocess", .invalidInput(
                "image \(i) is \(image.mode) but image 0 is \(first.mode); convert them to the same mode"))
        }
        return images.map { $0.resized(width: size.width, height: size.height, filter: resample) }
    }

    /// `postprocess(image, output_type="pil")`: [N, C, H, W] in [-1, 1] → images, through
    /// `denormalize`, `pt_to_numpy` and `numpy_to_pil`. C is 1 (gray), 3 (RGB) or 4 (RGBA).
    public static func postprocess(_ tensor: Tensor, doDenormalize: Bool = true) throws -> [Image] {
        let t = try float32(tensor, "postprocess")
        guard t.rank == 4, [1, 3, 4].contains(t.shape[1]) else {
            throw ImageError("VaeImageProcessor.postprocess", .invalidInput("expected an [N, C, H, W] tensor with C = 1, 3 or 4, got \(t.shape)"))
        }
        return try numpyToPil(ptToNumpy(doDenormalize ? denormalize(t) : t))
    }

    /// `pil_to_numpy`: [N, H, W, C] float32 = uint8 / 255 (single-precision division, as numpy
    /// does for `astype(np.float32) / 255.0`). All images must share size and mode.
    public static func pilToNumpy(_ images: [Image]) -> Tensor {
        let first = images.first!
        precondition(images.allSatisfy { $0.width == first.width && $0.height == first.height && $0.channels == first.channels },
                     "pil_to_numpy needs images of one size and mode")
        let per = first.pixels.count
        let out = Tensor(zeros: [images.count, first.height, first.width, first.channels])
        let dst = out.floats
        for (n, image) in images.enumerated() {
            image.pixels.withUnsafeBufferPointer { src in
                for i in 0..<per { dst[n * per + i] = Float(src[i]) / 255 }
            }
        }
        return out
    }

    /// `numpy_to_pil`: [N, H, W, C] float32 in [0, 1] → images, `(x * 255).round()` in float32
    /// with round-half-to-even, as numpy does. Values outside [0, 1] are clamped and NaN
    /// becomes 0 (numpy's `astype("uint8")` would wrap them; the pipeline never produces them).
    public static func numpyToPil(_ tensor: Tensor) throws -> [Image] {
        let t = try float32(tensor, "numpy_to_pil")
        guard t.rank == 4, (1...4).contains(t.shape[3]) else {
            throw ImageError("VaeImageProcessor.numpy_to_pil", .invalidInput("expected an [N, H, W, C] tensor with C ≤ 4, got \(t.shape)"))
        }
        let (n, h, w, c) = (t.shape[0], t.shape[1], t.shape[2], t.shape[3])
        let per = h * w * c
        let src = t.floats
        return (0..<n).map { b in
            var pixels = [UInt8](repeating: 0, count: per)
            pixels.withUnsafeMutableBufferPointer { dst in
                for i in 0..<per {
                    let v = (src[b * per + i] * 255).rounded(.toNearestOrEven)
                    dst[i] = v >= 255 ? 255 : v > 0 ? UInt8(v) : 0   // NaN fails both tests: 0
                }
            }
            return Image(width: w, height: h, channels: c, pixels: pixels)
        }
    }

    /// `normalize`: 2x − 1, in float32.
    public static func normalize(_ tensor: Tensor) -> Tensor {
        map(tensor) { 2 * $0 - 1 }
    }

    /// `denormalize`: (x * 0.5 + 0.5).clamp(0, 1), in float32 (NaN stays NaN, as in torch).
    public static func denormalize(_ tensor: Tensor) -> Tensor {
        map(tensor) { x in
            let v = x * 0.5 + 0.5
            return v < 0 ? 0 : v > 1 ? 1 : v
        }
    }

    /// `numpy_to_pt`: NHWC → NCHW.
    public static func numpyToPt(_ tensor: Tensor) -> Tensor { permute(tensor, toChannelsFirst: true) }

    /// `pt_to_numpy`: NCHW → NHWC.
    public static func ptToNumpy(_ tensor: Tensor) -> Tensor { permute(tensor, toChannelsFirst: false) }

    /// Images as one [N, H, W, C] uint8 tensor (the layout of the golden `image_uint8`).
    public static func uint8Tensor(_ images: [Image]) -> Tensor {
        let first = images.first!
        precondition(images.allSatisfy { $0.width == first.width && $0.height == first.height && $0.channels == first.channels },
                     "a uint8 batch needs images of one size and mode")
        let per = first.pixels.count
        let out = Tensor(zeros: [images.count, first.height, first.width, first.channels], dtype: .uint8)
        let dst = out.pointer(as: UInt8.self)
        for (n, image) in images.enumerated() {
            image.pixels.withUnsafeBufferPointer { (dst + n * per).update(from: $0.baseAddress!, count: per) }
        }
        return out
    }

    /// The images of an [N, H, W, C] (or [H, W, C]) uint8 tensor.
    public static func images(uint8 tensor: Tensor) throws -> [Image] {
        let t = tensor.rank == 3 ? tensor.reshaped([1] + tensor.shape) : tensor
        guard t.dtype == .uint8, t.rank == 4, (1...4).contains(t.shape[3]) else {
            throw ImageError("uint8 image tensor", .invalidInput("expected uint8 [N, H, W, C] with C ≤ 4, got \(tensor.dtype) \(tensor.shape)"))
        }
        let (n, h, w, c) = (t.shape[0], t.shape[1], t.shape[2], t.shape[3])
        let per = h * w * c
        let src = t.pointer(as: UInt8.self)
        return (0..<n).map { Image(width: w, height: h, channels: c, pixels: Array(UnsafeBufferPointer(start: src + $0 * per, count: per))) }
    }

    // MARK: - Helpers

    private static func float32(_ t: Tensor, _ what: String) throws -> Tensor {
        guard t.dtype.isFloatingPoint else {
            throw ImageError("VaeImageProcessor.\(what)", .invalidInput("expected a floating-point tensor, got \(t.dtype)"))
        }
        // pt_to_numpy calls `.float()`: fp16/bf16 widen exactly.
        return t.converted(to: .float32)
    }

    private static func map(_ tensor: Tensor, _ f: (Float) -> Float) -> Tensor {
        let src = tensor.converted(to: .float32)
        let out = Tensor(zeros: src.shape)
        let s = src.floats, d = out.floats
        for i in 0..<src.count { d[i] = f(s[i]) }
        return out
    }

    private static func permute(_ tensor: Tensor, toChannelsFirst: Bool) -> Tensor {
        precondition(tensor.rank == 4 && tensor.dtype == .float32, "expected a 4-D float32 tensor, got \(tensor)")
        let s = tensor.shape
        let (n, h, w, c) = toChannelsFirst ? (s[0], s[1], s[2], s[3]) : (s[0], s[2], s[3], s[1])
        let out = Tensor(zeros: toChannelsFirst ? [n, c, h, w] : [n, h, w, c])
        let src = tensor.floats, dst = out.floats
        for b in 0..<n {
            for y in 0..<h {
                for x in 0..<w {
                    for ch in 0..<c {
                        let hwc = ((b * h + y) * w + x) * c + ch
                        let chw = ((b * c + ch) * h + y) * w + x
                        if toChannelsFirst { dst[chw] = src[hwc] } else { dst[hwc] = src[chw] }
                    }
                }
            }
        }
        return out
    }
}
