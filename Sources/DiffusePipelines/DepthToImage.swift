import DiffuseCore
import DiffuseGraph
import DiffuseModels

/// Depth-to-image (diffusers' `StableDiffusionDepth2ImgPipeline`, stabilityai/stable-diffusion-2-depth):
/// image to image whose UNet also sees the picture's depth, one channel beside the latents.
///
/// The depth is the caller's `depth_map` (any estimator's output, as a file) or, as diffusers
/// does without one, what the model's DPT `depth_estimator` makes of the picture.
public enum DepthToImage {
    /// diffusers' `prepare_depth_map` for a given `depth_map`: bicubic to the latents' size
    /// (`F.interpolate(..., mode="bicubic", align_corners=False)`), scaled to [-1, 1] by each
    /// row's minimum and maximum, one row per image ([count, 1, h, w]).
    public static func depthMask(_ depth: Tensor, latentHeight h: Int, latentWidth w: Int, count: Int) throws -> Tensor {
        guard depth.rank == 2 || depth.rank == 3 else {
            throw PipelineError("the depth map has shape \(depth.shape); it must be [height, width] or [rows, height, width]")
        }
        let rows = depth.rank == 3 ? depth.shape[0] : 1
        let (inH, inW) = (depth.shape[depth.rank - 2], depth.shape[depth.rank - 1])
        guard rows == 1 || rows == count else {
            throw PipelineError("the depth map has \(rows) rows; give one, or one per image (\(count))")
        }
        guard inH > 0 && inW > 0 else { throw PipelineError("the depth map has shape \(depth.shape): it is empty") }
        let source = depth.converted(to: .float32)
        let out = Tensor(zeros: [rows, 1, h, w])
        for r in 0..<rows {
            let plane = Array(UnsafeBufferPointer(start: source.floats + r * inH * inW, count: inH * inW))
            guard plane.allSatisfy(\.isFinite) else {
                throw PipelineError("the depth map\(rows > 1 ? "'s row \(r + 1)" : "") holds a value that is not a number")
            }
            let resized = TorchInterpolate.bicubic(plane, height: inH, width: inW, toHeight: h, toWidth: w)
            let (lo, hi) = (resized.min()!, resized.max()!)
            // A constant map comes out of the resize constant to a few float steps, not exactly.
            guard hi - lo > 1e-6 * max(abs(lo), abs(hi)) else {
                throw PipelineError("the depth map\(rows > 1 ? "'s row \(r + 1)" : "") is flat at the latents' size (\(w)x\(h)): "
                                    + "it says nothing of depth (diffusers would divide by zero)")
            }
            for (i, v) in resized.enumerated() { out.floats[r * h * w + i] = 2 * (v - lo) / (hi - lo) - 1 }
        }
        return rows == count ? out : concatenate(Array(repeating: out, count: count), axis: 0)
    }

    /// A depth map from a file: a float tensor in `.safetensors` (the only one, or the one named
    /// `depth_map` or `depth`) or `.npy` (`numpy.save` of float16/32/64), [H, W] or [rows, H, W];
    /// or a PNG/JPEG picture, whose gray level (PIL's `convert("L")`) is the depth (white near).
    public static func loadDepthMap(_ path: String) throws -> Tensor {
        let lower = path.lowercased()
        let tensor: Tensor
        if lower.hasSuffix(".safetensors") {
            let file = try SafeTensorsFile(path: path)
            let floats = file.names.filter { file.entries[$0]!.dtype.isFloatingPoint }
            guard let name = floats.count == 1 ? floats[0] : ["depth_map", "depth"].first(where: floats.contains) else {
                throw PipelineError("\(path): a depth map file holds one float tensor (or one named depth_map); this one holds "
                                    + (floats.isEmpty ? "none" : floats.joined(separator: ", ")))
            }
            tensor = try file.tensor(name).converted(to: .float32)
        } else if lower.hasSuffix(".npy") {
            tensor = try NumPyArray.read(path)
        } else {
            let image = try Image.load(path).converted(channels: 1)
            tensor = Tensor(shape: [image.height, image.width], floats: image.pixels.map(Float.init))
        }
        guard tensor.rank == 2 || tensor.rank == 3 else {
            throw PipelineError("\(path): the depth map has shape \(tensor.shape); it must be [height, width] or [rows, height, width]")
        }
        return tensor
    }
}

/// A depth-to-image model's `depth_estimator/` (transformers' `DPTForDepthEstimation`) with the
/// preprocessing of its `feature_extractor/` (`DPTImageProcessor`).
public struct DepthEstimatorComponent {
    public var name: String
    public var model: DPTForDepthEstimation
    /// BiT's convolution weights standardized as they load.
    public var weights: ModelWeights
    public var processor: DPTImageProcessor

    /// Opens an estimator folder (config.json and its weights). The processor is
    /// `featureExtractor`'s `preprocessor_config.json` when given, else transformers' default
    /// at the model's image size.
    public static func load(_ folder: String, featureExtractor: String? = nil) throws -> DepthEstimatorComponent {
        let configPath = Files.join(folder, "config.json")
        let model = try DPTForDepthEstimation(configPath: configPath)
        let source = try DiffusersFolder.component(name: "depth_estimator", library: "transformers",
                                                   className: DPTForDepthEstimation.className, folder: folder, variant: nil, listedIn: nil)
        let weights = try source.requireWeights()
        try model.checkWeights(weights)
        var processor = DPTImageProcessor()
        if let featureExtractor {
            processor = try DPTImageProcessor(configPath: featureExtractor)
        } else {
            (processor.height, processor.width) = (model.config.imageSize, model.config.imageSize)
        }
        return DepthEstimatorComponent(name: folder, model: model, weights: ModelWeights(model.standardizingWeights(weights)),
                                       processor: processor)
    }
}

extension StableDiffusionPipeline {
    /// diffusers' `prepare_depth_map` without a `depth_map`: the depth estimator's
    /// `predicted_depth` [1, H, W] of the picture as its processor prepares it, in the text
    /// encoder's precision (diffusers runs it under autocast to the pipeline's dtype).
    func estimatedDepth(_ image: Image) throws -> Tensor {
        guard let estimator = components.depthEstimator else {
            throw PipelineError("\(components.name) has no depth_estimator: give the picture's depth map")
        }
        let pixels = estimator.processor.pixelValues(image)
        let (h, w) = (pixels.shape[2], pixels.shape[3])
        do {
            try estimator.model.checkInputSize(height: h, width: w)
        } catch {
            throw PipelineError("the depth estimator's processor made a \(w)x\(h) picture of the \(image.width)x\(image.height) one, "
                                + "which the estimator cannot read: \(error)")
        }
        let exe = try executable("depth_estimator|\(h)x\(w)", weights: estimator.weights, options: textEncoderCompileOptions) {
            try estimator.model.graph(batch: 1, height: h, width: w)
        }
        let depth = try exe.run([DPTForDepthEstimation.pixelValues: try backend.upload(pixels)])[DPTForDepthEstimation.predictedDepth]!
        return try depth.toHost().converted(to: .float32).copy()
    }
}

/// The `.npy` format's float arrays (NumPy's format description, versions 1 to 3): a header
/// naming the dtype, order and shape, then the data.
enum NumPyArray {
    static func read(_ path: String) throws -> Tensor {
        let bytes = try Files.read(path)
        func fail(_ why: String) -> PipelineError { PipelineError("\(path): \(why)") }
        let magic: [UInt8] = [0x93] + Array("NUMPY".utf8)
        guard bytes.count >= 10, Array(bytes[0..<6]) == magic else { throw fail("not a NumPy .npy file") }
        let major = bytes[6]
        let (lengthBytes, start) = major == 1 ? (2, 10) : (4, 12)
        guard (1...3).contains(major), bytes.count >= start else { throw fail("NumPy format version \(major) is not one this reads") }
        let headerLength = (0..<lengthBytes).reduce(0) { $0 | Int(bytes[8 + $1]) << (8 * $1) }
        guard bytes.count >= start + headerLength else { throw fail("the header is cut short") }
        let header = String(decoding: bytes[start..<start + headerLength], as: UTF8.self)
        func trimmed(_ text: Substring) -> String {
            String(text.drop { $0.isWhitespace }.reversed().drop { $0.isWhitespace }.reversed())
        }
        func field(_ key: String) -> String? {
            guard let r = header.firstRange(of: "'\(key)':") else { return nil }
            return trimmed(header[r.upperBound...])
        }
        guard let descr = field("descr"), let order = field("fortran_order"), let shapeText = field("shape") else {
            throw fail("the header (\(trimmed(header[...]))) lacks descr, fortran_order or shape")
        }
        guard order.hasPrefix("False") else { throw fail("the array is in Fortran order; save it in C order") }
        let dtypes: [String: (DType, Int)] = ["'<f2'": (.float16, 2), "'<f4'": (.float32, 4), "'<f8'": (.float64, 8)]
        guard let (dtype, size) = dtypes.first(where: { descr.hasPrefix($0.key) })?.value else {
            throw fail("the array's dtype \(descr.prefix { $0 != "," }) is not a little-endian float16, float32 or float64")
        }
        guard let close = shapeText.firstIndex(of: ")") else { throw fail("the header's shape cannot be read") }
        let dims = shapeText[shapeText.index(after: shapeText.startIndex)..<close].split(separator: ",")
            .map { trimmed($0) }.filter { !$0.isEmpty }
        let shape = try dims.map { d -> Int in
            guard let v = Int(d), v >= 0 else { throw fail("the header's shape (\(shapeText.prefix { $0 != ")" })) is not whole numbers") }
            return v
        }
        let count = shape.reduce(1, *), offset = start + headerLength
        guard bytes.count - offset == count * size else {
            throw fail("shape \(shape) of \(descr.prefix { $0 != "," }) needs \(count * size) bytes of data; the file has \(bytes.count - offset)")
        }
        let storage = TensorStorage(byteCount: count * size)
        bytes.withUnsafeBytes { storage.base.copyMemory(from: $0.baseAddress! + offset, byteCount: count * size) }
        return Tensor(dtype: dtype, shape: shape, storage: storage).converted(to: .float32)
    }
}
