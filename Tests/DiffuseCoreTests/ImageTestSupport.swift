import DiffuseCore
import Testing

/// The image fixtures: files made by other encoders and what Pillow decodes from them
/// (`Fixtures/images/make_image_fixtures.py`). `DIFFUSE_IMAGE_FIXTURES` points elsewhere.
enum ImageFixtures {
    static let directory: String = {
        if let dir = Files.environment("DIFFUSE_IMAGE_FIXTURES") { return dir }
        let here = String(#filePath)
        return String(here[..<here.lastIndex(of: "/")!]) + "/Fixtures/images"
    }()

    static func path(_ relative: String) -> String { Files.join(directory, relative) }

    static let manifest: JSON = {
        do { return try Files.readJSON(path("manifest.json")) } catch {
            fatalError("cannot read the image fixture manifest: \(error)")
        }
    }()

    static let expected: SafeTensorsFile = {
        do { return try SafeTensorsFile(path: path("expected.safetensors")) } catch {
            fatalError("cannot read the image fixture tensors: \(error)")
        }
    }()

    /// The cases of one manifest section.
    static func cases(_ section: String) -> [JSON] { manifest[section]?.array ?? [] }

    /// An expected uint8 [H, W, C] tensor as an image.
    static func image(_ name: String) throws -> Image {
        try VaeImageProcessor.images(uint8: expected.tensor(name))[0]
    }
}

/// Largest per-sample difference between two images of the same geometry (nil if they differ).
func maxDifference(_ a: Image, _ b: Image) -> Int? {
    guard a.width == b.width, a.height == b.height, a.channels == b.channels else { return nil }
    var worst = 0
    for (x, y) in zip(a.pixels, b.pixels) { worst = max(worst, abs(Int(x) - Int(y))) }
    return worst
}

/// SplitMix64: deterministic test data without Foundation.
struct TestRandom {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
    mutating func byte() -> UInt8 { UInt8(truncatingIfNeeded: next()) }
    mutating func bytes(_ n: Int) -> [UInt8] { (0..<n).map { _ in byte() } }
}

/// Runs `body` and returns the ImageError it throws (recording an issue if it throws
/// something else or nothing).
func imageError(_ body: () throws -> Any, sourceLocation: SourceLocation = #_sourceLocation) -> ImageError? {
    do {
        _ = try body()
        Issue.record("expected an ImageError, but decoding succeeded", sourceLocation: sourceLocation)
    } catch let e as ImageError {
        return e
    } catch {
        Issue.record("expected an ImageError, got \(error)", sourceLocation: sourceLocation)
    }
    return nil
}

// MARK: - An independent PNG writer for tests

/// Writes PNGs of every colour type, bit depth, filter and interlacing from raw samples, so
/// the reader can be checked on files our own writer never produces.
struct TestPNG {
    var width: Int
    var height: Int
    var colorType: Int
    var bitDepth: Int
    var interlaced = false
    /// Samples per pixel as stored, row-major; values below 2^bitDepth.
    var samples: [Int]
    var palette: [UInt8] = []
    var trns: [UInt8]? = nil
    /// Chunks to insert before IDAT: (type, data).
    var extraChunks: [(String, [UInt8])] = []
    /// Filter type for row r of each pass is filters[r % filters.count].
    var filters: [UInt8] = [0, 1, 2, 3, 4]
    /// Split the compressed data into this many IDAT chunks.
    var idatChunks = 3

    var samplesPerPixel: Int { [1, 0, 3, 1, 2, 0, 4][colorType] }

    static func chunk(_ type: String, _ data: [UInt8]) -> [UInt8] {
        let t = Array(type.utf8)
        var out = be32(UInt32(data.count)) + t + data
        out += be32(Zlib.crc32(data, initial: UInt(Zlib.crc32(t))))
        return out
    }

    static func be32(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8((v >> 16) & 255), UInt8((v >> 8) & 255), UInt8(v & 255)] }

    /// The filtered scanlines (before compression).
    func scanlines() -> [UInt8] {
        let spp = samplesPerPixel
        let passes: [(Int, Int, Int, Int)] = interlaced
            ? [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
            : [(0, 0, 1, 1)]
        let bpp = max(1, spp * bitDepth / 8)
        var out: [UInt8] = []
        for (x0, y0, dx, dy) in passes {
            let xs = Array(stride(from: x0, to: width, by: dx)), ys = Array(stride(from: y0, to: height, by: dy))
            if xs.isEmpty || ys.isEmpty { continue }
            var prior: [UInt8]? = nil
            for (r, y) in ys.enumerated() {
                // Pack the row.
                var bits: [Int] = []
                for x in xs { for s in 0..<spp { bits.append(samples[(y * width + x) * spp + s]) } }
                var raw: [UInt8] = []
                if bitDepth == 16 {
                    for v in bits { raw += [UInt8(v >> 8), UInt8(v & 255)] }
                } else if bitDepth == 8 {
                    raw = bits.map { UInt8($0) }
                } else {
                    var acc = 0, n = 0
                    for v in bits {
                        acc = acc << bitDepth | v
                        n += bitDepth
                        if n == 8 { raw.append(UInt8(acc)); acc = 0; n = 0 }
                    }
                    if n > 0 { raw.append(UInt8(acc << (8 - n))) }
                }
                let filter = filters[r % filters.count]
                out.append(filter)
                for i in 0..<raw.count {
                    let a = i >= bpp ? Int(raw[i - bpp]) : 0
                    let b = prior.map { Int($0[i]) } ?? 0
                    let c = i >= bpp ? (prior.map { Int($0[i - bpp]) } ?? 0) : 0
                    var predicted = 0
                    switch filter {
                    case 1: predicted = a
                    case 2: predicted = b
                    case 3: predicted = (a + b) / 2
                    case 4:
                        let p = a + b - c
                        let pa = abs(p - a), pb = abs(p - b), pc = abs(p - c)
                        predicted = pa <= pb && pa <= pc ? a : (pb <= pc ? b : c)
                    default: predicted = 0
                    }
                    out.append(UInt8((Int(raw[i]) - predicted) & 255))
                }
                prior = raw
            }
        }
        return out
    }

    func encode() throws -> [UInt8] {
        var out: [UInt8] = [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]
        out += Self.chunk("IHDR", Self.be32(UInt32(width)) + Self.be32(UInt32(height))
                          + [UInt8(bitDepth), UInt8(colorType), 0, 0, interlaced ? 1 : 0])
        if !palette.isEmpty { out += Self.chunk("PLTE", palette) }
        if let trns { out += Self.chunk("tRNS", trns) }
        for (t, d) in extraChunks { out += Self.chunk(t, d) }
        let z = try Zlib.deflate(scanlines(), level: 9)
        let step = max(1, (z.count + idatChunks - 1) / idatChunks)
        for start in stride(from: 0, to: z.count, by: step) {
            out += Self.chunk("IDAT", Array(z[start..<min(z.count, start + step)]))
        }
        out += Self.chunk("IEND", [])
        return out
    }

    /// What the reader should return, by the PNG spec's rules (written independently of it).
    func expectedImage() -> Image {
        let spp = samplesPerPixel
        let maxValue = (1 << bitDepth) - 1
        func to8(_ v: Int) -> UInt8 { bitDepth == 16 ? UInt8(v >> 8) : UInt8(v * 255 / maxValue) }
        var key: [Int]? = nil
        if let trns, colorType == 0 || colorType == 2 {
            key = stride(from: 0, to: trns.count, by: 2).map { Int(trns[$0]) << 8 | Int(trns[$0 + 1]) }
        }
        var channels = [1, 0, 3, 3, 2, 0, 4][colorType]
        if key != nil || (colorType == 3 && trns != nil) { channels += 1 }
        var pixels: [UInt8] = []
        for p in 0..<(width * height) {
            let s = Array(samples[(p * spp)..<((p + 1) * spp)])
            if colorType == 3 {
                pixels += s[0] * 3 + 2 < palette.count ? Array(palette[(s[0] * 3)..<(s[0] * 3 + 3)]) : [0, 0, 0]
                if let trns { pixels.append(s[0] < trns.count ? trns[s[0]] : 255) }
            } else {
                pixels += s.map(to8)
                if let key { pixels.append(s == key ? 0 : 255) }
            }
        }
        return Image(width: width, height: height, channels: channels, pixels: pixels)
    }
}

// MARK: - A minimal JPEG builder for tests

/// Assembles JPEG files segment by segment, for structural errors that no encoder writes.
struct TestJPEG {
    var segments: [[UInt8]] = []

    static func segment(_ marker: UInt8, _ body: [UInt8]) -> [UInt8] {
        [0xFF, marker, UInt8((body.count + 2) >> 8), UInt8((body.count + 2) & 255)] + body
    }

    /// An 8x8 (by default) grayscale baseline frame whose Huffman tables have one 1-bit code
    /// each: DC difference category 0 ("0") and AC end-of-block ("0"), so every block costs
    /// the two bits "00" and decodes to flat 128.
    static func flatGray(width: Int = 8, height: Int = 8, sof: UInt8 = 0xC0, precision: UInt8 = 8,
                         components: [(id: UInt8, sampling: UInt8)] = [(1, 0x11)], restartInterval: Int = 0,
                         scanComponents: [UInt8]? = nil, entropy: [UInt8]? = nil, eoi: Bool = true) -> [UInt8] {
        var out: [UInt8] = [0xFF, 0xD8]
        out += segment(0xDB, [0x00] + [UInt8](repeating: 1, count: 64))
        var sofBody: [UInt8] = [precision, UInt8(height >> 8), UInt8(height & 255), UInt8(width >> 8), UInt8(width & 255),
                                UInt8(components.count)]
        for c in components { sofBody += [c.id, c.sampling, 0] }
        out += segment(sof, sofBody)
        let oneCode = [UInt8(1)] + [UInt8](repeating: 0, count: 15) + [0x00]
        out += segment(0xC4, [0x00] + oneCode + [0x10] + oneCode)
        if restartInterval > 0 { out += segment(0xDD, [UInt8(restartInterval >> 8), UInt8(restartInterval & 255)]) }
        let ids = scanComponents ?? components.map(\.id)
        out += segment(0xDA, [UInt8(ids.count)] + ids.flatMap { [$0, 0x00] } + [0, 63, 0])
        // Two zero bits per block, padded with ones.
        let blocks = ((width + 7) / 8) * ((height + 7) / 8) * components.count
        out += entropy ?? bitsToBytes(String(repeating: "00", count: blocks))
        if eoi { out += [0xFF, 0xD9] }
        return out
    }

    /// "0101…" → bytes, padded with 1 bits and with 0xFF stuffed.
    static func bitsToBytes(_ bits: String) -> [UInt8] {
        var out: [UInt8] = []
        var chars = Array(bits)
        while chars.count % 8 != 0 { chars.append("1") }
        for i in stride(from: 0, to: chars.count, by: 8) {
            var v: UInt8 = 0
            for c in chars[i..<(i + 8)] { v = v << 1 | (c == "1" ? 1 : 0) }
            out.append(v)
            if v == 0xFF { out.append(0) }
        }
        return out
    }
}
