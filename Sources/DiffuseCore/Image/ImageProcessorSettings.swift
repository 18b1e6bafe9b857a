/// What transformers' image processors (their PIL backends) share: the `preprocessor_config.json`
/// keys for the resampling filter and the per-channel normalisation, and the last step, uint8
/// RGB to `(x · rescale − mean) / std` planes.
enum ImageProcessorSettings {
    /// `resample`, by PIL's numbering: 0 nearest (not supported), 1 lanczos, 2 bilinear,
    /// 3 bicubic, 4 box, 5 hamming. nil when the key is absent.
    static func resample(_ json: JSON, path: String) throws -> ResampleFilter? {
        guard let r = json["resample"] else { return nil }
        let filters: [Int: ResampleFilter] = [1: .lanczos, 2: .bilinear, 3: .bicubic, 4: .box, 5: .hamming]
        guard let n = r.int, let f = filters[n] else {
            throw FileError(path, "resample: \(r.serialized()) is not a supported PIL filter (1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming)")
        }
        return f
    }

    /// `image_mean` or `image_std`: three numbers, or one for every channel. nil when absent.
    static func channels(_ json: JSON, _ key: String, path: String) throws -> [Float]? {
        guard let v = json[key] else { return nil }
        let values = v.array?.compactMap { $0.double.map { Float($0) } } ?? v.double.map { [Float($0)] } ?? []
        guard values.count == 3 || values.count == 1 else { throw FileError(path, "\(key): \(v.serialized()) is not 3 numbers") }
        return values.count == 3 ? values : Array(repeating: values[0], count: 3)
    }

    /// [1, 3, H, W] float32 of an RGB picture as numpy computes it: uint8 → float64 · factor →
    /// float32, then (x − mean) / std in float32. nil factor or mean: that step is skipped.
    static func pixelTensor(_ im: Image, rescaleFactor: Double?, mean: [Float]?, std: [Float]) -> Tensor {
        let (h, w) = (im.height, im.width)
        let out = Tensor(zeros: [1, 3, h, w])
        for c in 0..<3 {
            for y in 0..<h {
                for x in 0..<w {
                    let byte = im.pixels[3 * (y * w + x) + c]
                    var v = rescaleFactor.map { Float(Double(byte) * $0) } ?? Float(byte)
                    if let mean { v = (v - mean[c]) / std[c] }
                    out.floats[(c * h + y) * w + x] = v
                }
            }
        }
        return out
    }
}
