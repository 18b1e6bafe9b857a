#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// PIL's convolution resampling filters (`Image.Resampling`), with PIL's supports.
public enum ResampleFilter: String, Sendable, CaseIterable {
    case box, bilinear, hamming, bicubic, lanczos

    /// diffusers' `PIL_INTERPOLATION` names ("lanczos", "bicubic", "linear", ...).
    public init?(diffusersName name: String) {
        switch name.lowercased() {
        case "lanczos": self = .lanczos
        case "bicubic", "cubic": self = .bicubic
        case "bilinear", "linear": self = .bilinear
        case "box": self = .box
        case "hamming": self = .hamming
        default: return nil
        }
    }

    var support: Double {
        switch self {
        case .box: return 0.5
        case .bilinear, .hamming: return 1
        case .bicubic: return 2
        case .lanczos: return 3
        }
    }

    /// The kernels of Pillow's Resample.c, in the same double-precision arithmetic.
    func weight(_ x: Double) -> Double {
        switch self {
        case .box:
            return x > -0.5 && x <= 0.5 ? 1 : 0
        case .bilinear:
            let x = abs(x)
            return x < 1 ? 1 - x : 0
        case .hamming:
            let x = abs(x)
            if x == 0 { return 1 }
            if x >= 1 { return 0 }
            let px = x * Double.pi
            // PIL writes 0.54f and 0.46f: single-precision constants widened to double.
            return sin(px) / px * (Double(Float(0.54)) + Double(Float(0.46)) * cos(px))
        case .bicubic:
            let a = -0.5, x = abs(x)
            if x < 1 { return ((a + 2) * x - (a + 3)) * x * x + 1 }
            if x < 2 { return (((x - 5) * x + 8) * x - 4) * a }
            return 0
        case .lanczos:
            return -3 <= x && x < 3 ? Self.sinc(x) * Self.sinc(x / 3) : 0
        }
    }

    private static func sinc(_ x: Double) -> Double {
        if x == 0 { return 1 }
        let px = x * Double.pi
        return sin(px) / px
    }
}

/// PIL's `resize(box=...)`: the source region to resample, in pixels (PIL passes floats as C
/// floats). A region of zero height (or width) stretches the filter's view of one edge.
public struct ResampleBox: Equatable, Sendable {
    public var left: Float, top: Float, right: Float, bottom: Float
    public init(left: Float, top: Float, right: Float, bottom: Float) {
        (self.left, self.top, self.right, self.bottom) = (left, top, right, bottom)
    }
}

extension Image {
    /// `PIL.Image.resize((width, height), resample=filter, box=box)`, bit for bit: Pillow's
    /// separable two-pass convolution whose support widens with the downscale factor, with its
    /// 22-bit fixed-point coefficients and rounding. Images with alpha are resized
    /// premultiplied, as PIL does for "LA" and "RGBA". `box` nil is the whole image.
    public func resized(width newWidth: Int, height newHeight: Int, filter: ResampleFilter = .lanczos,
                        box: ResampleBox? = nil) -> Image {
        precondition(newWidth > 0 && newHeight > 0, "cannot resize to \(newWidth)x\(newHeight)")
        let whole = ResampleBox(left: 0, top: 0, right: Float(width), bottom: Float(height))
        let box = box ?? whole
        if newWidth == width && newHeight == height && box == whole { return self }
        if hasAlpha {
            return premultiplied().resampled(newWidth, newHeight, filter, box).unpremultiplied()
        }
        return resampled(newWidth, newHeight, filter, box)
    }

    /// ImagingResampleInner (Pillow 13): each pass runs only when it changes something (PIL
    /// compares the box's far edge with the *output* size, and so do we). Normally horizontal
    /// first, over just the source rows the vertical filter reads; but when the height shrinks
    /// by more than twice as many pixels as the width, vertical first (Pillow ≤ 12 always went
    /// horizontal first, so those sizes differ there by a few levels).
    private func resampled(_ newWidth: Int, _ newHeight: Int, _ filter: ResampleFilter, _ box: ResampleBox) -> Image {
        let needHorizontal = newWidth != width || box.left != 0 || box.right != Float(newWidth)
        let needVertical = newHeight != height || box.top != 0 || box.bottom != Float(newHeight)
        let shrinkH = height - newHeight, shrinkW = width - newWidth
        let horizontalFirst = !(shrinkH > 0 && shrinkH > shrinkW * 2)
        let vertical = ResampleCoefficients(inSize: height, in0: box.top, in1: box.bottom, outSize: newHeight, filter: filter)
        let horizontal = needHorizontal
            ? ResampleCoefficients(inSize: width, in0: box.left, in1: box.right, outSize: newWidth, filter: filter) : nil
        if horizontalFirst {
            guard let horizontal else { return needVertical ? verticalPass(vertical) : self }
            let first = vertical.bounds.first!.start
            let last = vertical.bounds.last!.start + vertical.bounds.last!.count
            let image = horizontalPass(horizontal, rows: first..<last)
            return needVertical ? image.verticalPass(vertical.shifted(by: -first)) : image
        }
        let image = needVertical ? verticalPass(vertical) : self
        return horizontal.map { image.horizontalPass($0, rows: 0..<image.height) } ?? image
    }

    private func horizontalPass(_ k: ResampleCoefficients, rows: Range<Int>) -> Image {
        let c = channels, outWidth = k.bounds.count
        var out = Image(width: outWidth, height: rows.count, channels: c)
        pixels.withUnsafeBufferPointer { src in
            out.pixels.withUnsafeMutableBufferPointer { dst in
                k.weights.withUnsafeBufferPointer { w in
                    let (src, dst, w) = (src.baseAddress!, dst.baseAddress!, w.baseAddress!)
                    Parallel.chunks(rows.count, grain: 8) { chunk in
                        for r in chunk {
                            let inRow = src + (rows.lowerBound + r) * width * c
                            let outRow = dst + r * outWidth * c
                            for xx in 0..<outWidth {
                                let b = k.bounds[xx]
                                let kw = w + xx * k.ksize
                                for ch in 0..<c {
                                    var ss = Int32(1 << (ResampleCoefficients.precisionBits - 1))
                                    var p = inRow + b.start * c + ch
                                    for x in 0..<b.count {
                                        ss = ss &+ Int32(p.pointee) &* kw[x]
                                        p += c
                                    }
                                    outRow[xx * c + ch] = ResampleCoefficients.clip8(ss)
                                }
                            }
                        }
                    }
                }
            }
        }
        return out
    }

    private func verticalPass(_ k: ResampleCoefficients) -> Image {
        let c = channels, rowLength = width * c, outHeight = k.bounds.count
        var out = Image(width: width, height: outHeight, channels: c)
        pixels.withUnsafeBufferPointer { src in
            out.pixels.withUnsafeMutableBufferPointer { dst in
                k.weights.withUnsafeBufferPointer { w in
                    let (src, dst, w) = (src.baseAddress!, dst.baseAddress!, w.baseAddress!)
                    Parallel.chunks(outHeight, grain: 4) { chunk in
                        var acc = [Int32](repeating: 0, count: rowLength)
                        for yy in chunk {
                            let b = k.bounds[yy]
                            let kw = w + yy * k.ksize
                            for i in 0..<rowLength { acc[i] = Int32(1 << (ResampleCoefficients.precisionBits - 1)) }
                            for y in 0..<b.count {
                                let row = src + (b.start + y) * rowLength
                                let weight = kw[y]
                                for i in 0..<rowLength { acc[i] = acc[i] &+ Int32(row[i]) &* weight }
                            }
                            let outRow = dst + yy * rowLength
                            for i in 0..<rowLength { outRow[i] = ResampleCoefficients.clip8(acc[i]) }
                        }
                    }
                }
            }
        }
        return out
    }

    /// PIL's "RGBA" → "RGBa" (and "LA" → "La"): colour × alpha / 255 with its rounding.
    func premultiplied() -> Image {
        var out = self
        let c = channels
        for i in stride(from: 0, to: pixels.count, by: c) {
            let alpha = UInt32(pixels[i + c - 1])
            for ch in 0..<(c - 1) {
                let t = UInt32(pixels[i + ch]) * alpha + 128
                out.pixels[i + ch] = UInt8(((t >> 8) + t) >> 8)
            }
        }
        return out
    }

    /// PIL's "RGBa" → "RGBA": colour × 255 / alpha, truncated and clipped.
    func unpremultiplied() -> Image {
        var out = self
        let c = channels
        for i in stride(from: 0, to: pixels.count, by: c) {
            let alpha = UInt32(pixels[i + c - 1])
            guard alpha != 0 && alpha != 255 else { continue }
            for ch in 0..<(c - 1) {
                out.pixels[i + ch] = UInt8(min(255, 255 * UInt32(pixels[i + ch]) / alpha))
            }
        }
        return out
    }
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for one axis.
struct ResampleCoefficients {
    /// 8 bits of result and 2 of headroom in an int32 accumulator.
    static let precisionBits = 32 - 8 - 2

    let ksize: Int
    /// For each output sample, the first source sample and how many are used.
    var bounds: [(start: Int, count: Int)]
    /// `ksize` fixed-point weights per output sample.
    let weights: [Int32]

    init(inSize: Int, in0: Float = 0, in1: Float? = nil, outSize: Int, filter: ResampleFilter) {
        // PIL passes the box as floats: (in1 - in0) is computed in single precision.
        let scale = Double((in1 ?? Float(inSize)) - in0) / Double(outSize)
        let filterScale = max(scale, 1)
        let support = filter.support * filterScale
        ksize = Int(support.rounded(.up)) * 2 + 1
        let invFilterScale = 1 / filterScale
        var bounds: [(start: Int, count: Int)] = []
        bounds.reserveCapacity(outSize)
        var weights = [Int32](repeating: 0, count: outSize * ksize)
        var k = [Double](repeating: 0, count: ksize)
        for xx in 0..<outSize {
            let center = Double(in0) + (Double(xx) + 0.5) * scale
            // C's (int) conversion truncates toward zero.
            let xmin = max(Int(center - support + 0.5), 0)
            let xmax = min(Int(center + support + 0.5), inSize) - xmin
            var total = 0.0
            for x in 0..<xmax {
                let w = filter.weight((Double(x + xmin) - center + 0.5) * invFilterScale)
                k[x] = w
                total += w
            }
            for x in 0..<xmax {
                var w = k[x]
                if total != 0 { w /= total }
                let scaled = w * Double(1 << Self.precisionBits)
                weights[xx * ksize + x] = Int32(w < 0 ? -0.5 + scaled : 0.5 + scaled)
            }
            bounds.append((xmin, max(xmax, 0)))
        }
        self.bounds = bounds
        self.weights = weights
    }

    func shifted(by delta: Int) -> ResampleCoefficients {
        var copy = self
        copy.bounds = bounds.map { ($0.start + delta, $0.count) }
        return copy
    }

    /// `clip8_lookups[ss >> PRECISION_BITS]`: the table clamps to [0, 255].
    @inline(__always)
    static func clip8(_ ss: Int32) -> UInt8 {
        let v = ss >> Int32(precisionBits)
        return v < 0 ? 0 : v > 255 ? 255 : UInt8(v)
    }
}
