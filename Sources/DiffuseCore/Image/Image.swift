/// An 8-bit image with interleaved samples: 1 = gray (PIL "L"), 2 = gray + alpha ("LA"),
/// 3 = RGB, 4 = RGBA. Rows run top to bottom, `pixels.count == width * height * channels`.
public struct Image: Equatable, Sendable {
    public var width: Int
    public var height: Int
    public var channels: Int
    public var pixels: [UInt8]

    public init(width: Int, height: Int, channels: Int, pixels: [UInt8]) {
        precondition(width >= 0 && height >= 0 && (1...4).contains(channels), "invalid image geometry \(width)x\(height)x\(channels)")
        precondition(pixels.count == width * height * channels,
                     "\(pixels.count) samples for a \(width)x\(height) image with \(channels) channels")
        self.width = width
        self.height = height
        self.channels = channels
        self.pixels = pixels
    }

    /// A black (and, with alpha, transparent) image.
    public init(width: Int, height: Int, channels: Int) {
        self.init(width: width, height: height, channels: channels,
                  pixels: [UInt8](repeating: 0, count: width * height * channels))
    }

    public var hasAlpha: Bool { channels == 2 || channels == 4 }

    /// PIL's mode name for this layout.
    public var mode: String { ["L", "LA", "RGB", "RGBA"][channels - 1] }

    /// Converts between gray, gray + alpha, RGB and RGBA the way PIL's `Image.convert` does:
    /// alpha is dropped (never composited), gray is replicated, and colour becomes gray through
    /// ITU-R 601-2 luma in PIL's fixed point (`(19595 R + 38470 G + 7471 B + 0x8000) >> 16`).
    public func converted(channels target: Int) -> Image {
        precondition((1...4).contains(target), "cannot convert to \(target) channels")
        if target == channels { return self }
        let n = width * height
        var out = [UInt8](repeating: 0, count: n * target)
        let sourceColor = channels >= 3
        let targetColor = target >= 3
        let targetAlpha = target == 2 || target == 4
        pixels.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                for i in 0..<n {
                    let s = i * channels, d = i * target
                    if targetColor {
                        if sourceColor {
                            dst[d] = src[s]; dst[d + 1] = src[s + 1]; dst[d + 2] = src[s + 2]
                        } else {
                            dst[d] = src[s]; dst[d + 1] = src[s]; dst[d + 2] = src[s]
                        }
                    } else {
                        dst[d] = sourceColor ? Image.luma(src[s], src[s + 1], src[s + 2]) : src[s]
                    }
                    if targetAlpha {
                        dst[d + target - 1] = hasAlpha ? src[s + channels - 1] : 255
                    }
                }
            }
        }
        return Image(width: width, height: height, channels: target, pixels: out)
    }

    /// PIL `convert("RGB")`: what diffusers' `load_image` hands to the pipeline.
    public var rgb: Image { converted(channels: 3) }

    @inline(__always)
    static func luma(_ r: UInt8, _ g: UInt8, _ b: UInt8) -> UInt8 {
        UInt8(truncatingIfNeeded: (UInt32(r) * 19595 + UInt32(g) * 38470 + UInt32(b) * 7471 + 0x8000) >> 16)
    }

    /// The image turned upright for an EXIF orientation (1...8), as PIL's
    /// `ImageOps.exif_transpose` does. Unknown values leave the image as it is.
    public func orientedUpright(exifOrientation orientation: Int) -> Image {
        // For each output pixel (x, y), the source pixel; `w`/`h` are the source size.
        let w = width, h = height
        let swap = orientation >= 5 && orientation <= 8
        let outW = swap ? h : w, outH = swap ? w : h
        let source: (Int, Int) -> (Int, Int)
        switch orientation {
        case 2: source = { x, y in (w - 1 - x, y) }            // FLIP_LEFT_RIGHT
        case 3: source = { x, y in (w - 1 - x, h - 1 - y) }    // ROTATE_180
        case 4: source = { x, y in (x, h - 1 - y) }            // FLIP_TOP_BOTTOM
        case 5: source = { x, y in (y, x) }                    // TRANSPOSE
        case 6: source = { x, y in (y, h - 1 - x) }            // ROTATE_270 (90° clockwise)
        case 7: source = { x, y in (w - 1 - y, h - 1 - x) }    // TRANSVERSE
        case 8: source = { x, y in (w - 1 - y, x) }            // ROTATE_90 (90° counter-clockwise)
        default: return self
        }
        var out = [UInt8](repeating: 0, count: pixels.count)
        let c = channels
        pixels.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                for y in 0..<outH {
                    for x in 0..<outW {
                        let (sx, sy) = source(x, y)
                        let s = (sy * w + sx) * c, d = (y * outW + x) * c
                        for k in 0..<c { dst[d + k] = src[s + k] }
                    }
                }
            }
        }
        return Image(width: outW, height: outH, channels: c, pixels: out)
    }
}

// MARK: - Files

/// A decoded image file: the pixels as stored, its text chunks (PNG tEXt/zTXt/iTXt, in file
/// order) and its EXIF orientation (1 when absent).
public struct ImageFile {
    public enum Format: String, Sendable { case png = "PNG", jpeg = "JPEG" }

    public var format: Format
    public var image: Image
    public var text: [(key: String, value: String)]
    public var exifOrientation: Int

    public init(format: Format, image: Image, text: [(key: String, value: String)] = [], exifOrientation: Int = 1) {
        self.format = format
        self.image = image
        self.text = text
        self.exifOrientation = exifOrientation
    }

    /// The value of the first text chunk named `key`.
    public func text(_ key: String) -> String? { text.first { $0.key == key }?.value }

    /// Reads a PNG or JPEG file; the decoder is chosen from the file's signature, not its name.
    public static func read(_ path: String) throws -> ImageFile {
        let bytes = try Files.read(path)
        return try decode(bytes, name: path)
    }

    /// Decodes PNG or JPEG bytes; `name` is the file named in errors.
    public static func decode(_ bytes: [UInt8], name: String) throws -> ImageFile {
        if bytes.starts(with: PNG.signature) { return try PNG.decode(bytes, name: name) }
        if bytes.count >= 3, bytes[0] == 0xFF, bytes[1] == 0xD8, bytes[2] == 0xFF {
            return try JPEG.decode(bytes, name: name)
        }
        if bytes.isEmpty { throw ImageError(name, .truncated("the file is empty")) }
        if bytes == [0xFF, 0xD8] { throw ImageError(name, .truncated("the file ends after the JPEG start-of-image marker")) }
        if bytes.starts(with: PNG.signature.prefix(min(bytes.count, 4))) && bytes.count < 8 {
            throw ImageError(name, .truncated("the file ends inside the PNG signature"))
        }
        throw ImageError(name, .notAnImage(Self.describeSignature(bytes)))
    }

    /// A hint of what the file is, for the "not an image" error.
    static func describeSignature(_ bytes: [UInt8]) -> String {
        let known: [([UInt8], String)] = [
            ([0x47, 0x49, 0x46, 0x38], "a GIF file"),
            ([0x52, 0x49, 0x46, 0x46], "a RIFF (WebP?) file"),
            ([0x42, 0x4D], "a BMP file"),
            ([0x49, 0x49, 0x2A, 0x00], "a TIFF file"),
            ([0x4D, 0x4D, 0x00, 0x2A], "a TIFF file"),
            ([0x8A, 0x4D, 0x4E, 0x47], "an MNG file"),
        ]
        for (magic, what) in known where bytes.starts(with: magic) { return what }
        if bytes.count >= 12, bytes[4...7].elementsEqual("ftyp".utf8) { return "an ISO media (HEIC/AVIF?) file" }
        if bytes.starts(with: [0xFF, 0xD8]) { return "a JPEG start-of-image marker without a following marker" }
        let head = bytes.prefix(8).map { String($0, radix: 16, uppercase: true) }.map { $0.count == 1 ? "0" + $0 : $0 }
        return "unknown signature \(head.joined(separator: " "))"
    }
}

extension Image {
    /// Reads a PNG or JPEG file as stored (no EXIF rotation, alpha kept).
    public static func read(_ path: String) throws -> Image {
        try ImageFile.read(path).image
    }

    /// diffusers' `load_image`: reads the file, turns it upright by its EXIF orientation
    /// (`ImageOps.exif_transpose`) and converts it to RGB (`convert("RGB")`).
    public static func load(_ path: String) throws -> Image {
        let file = try ImageFile.read(path)
        return file.image.orientedUpright(exifOrientation: file.exifOrientation).rgb
    }

    /// Encodes as PNG with text chunks (tEXt when the value is Latin-1, else iTXt) and writes
    /// it through `Files.write`, which never replaces an existing file unless `overwrite` is set.
    public func writePNG(_ path: String, text: [(String, String)] = [], overwrite: Bool = false) throws {
        let bytes: [UInt8]
        do { bytes = try PNG.encode(self, text: text) } catch let e as ImageError {
            throw ImageError(path, e.problem)
        }
        try Files.write(bytes, to: path, overwrite: overwrite)
    }
}

// MARK: - Errors

/// What is wrong with an image file, naming the file.
public struct ImageError: Error, CustomStringConvertible, Equatable {
    public enum Problem: Equatable, Sendable {
        /// The signature is neither PNG nor JPEG (the text says what it looks like).
        case notAnImage(String)
        /// The file ends before the named structure is complete.
        case truncated(String)
        /// A PNG chunk's stored CRC does not match its contents.
        case badCRC(chunk: String, stored: UInt32, computed: UInt32)
        /// The structure or the compressed data is invalid.
        case corrupt(String)
        /// Valid but not handled here (arithmetic-coded or 12-bit JPEG, CMYK, ...).
        case unsupported(String)
        /// Larger than the decompression-bomb limit.
        case tooLarge(width: Int, height: Int)
        /// Bad data handed to an encoder (a text keyword, for instance).
        case invalidInput(String)
    }

    public let file: String
    public let problem: Problem

    public init(_ file: String, _ problem: Problem) {
        self.file = file
        self.problem = problem
    }

    public var description: String {
        switch problem {
        case let .notAnImage(what):
            return "\(file): not a PNG or JPEG image (\(what))"
        case let .truncated(what):
            return "\(file): truncated image file: \(what)"
        case let .badCRC(chunk, stored, computed):
            return "\(file): corrupt PNG: CRC mismatch in chunk '\(chunk)' (stored \(hex(stored)), computed \(hex(computed)))"
        case let .corrupt(what):
            return "\(file): corrupt image: \(what)"
        case let .unsupported(what):
            return "\(file): unsupported image: \(what)"
        case let .tooLarge(w, h):
            return "\(file): image of \(w)x\(h) pixels exceeds the limit of \(ImageError.maxPixels) pixels (decompression bomb?)"
        case let .invalidInput(what):
            return "\(file): \(what)"
        }
    }

    /// PIL's `MAX_IMAGE_PIXELS * 2`, where it refuses to open an image.
    public static let maxPixels = 2 * 89_478_485

    private func hex(_ v: UInt32) -> String {
        let s = String(v, radix: 16)
        return "0x" + String(repeating: "0", count: max(0, 8 - s.count)) + s
    }
}
