/// PNG (ISO/IEC 15948) reading and writing.
///
/// The reader takes every standard colour type and bit depth, all five filters, Adam7
/// interlacing and split IDAT data, checks every CRC, and returns 8-bit samples:
/// gray → 1 channel, gray + alpha → 2, RGB → 3, RGBA → 4, palette → RGB (RGBA with tRNS);
/// a tRNS colour key on gray or RGB becomes an alpha channel. Depths below 8 are scaled as the
/// PNG spec says (bit replication); 16-bit samples keep their high byte, which is what PIL
/// does for 16-bit RGB, RGBA and gray+alpha (PIL clips 16-bit *gray* to 255 instead, which
/// turns most of such an image white; we do not copy that).
///
/// The writer emits 8-bit gray, gray + alpha, RGB or RGBA with adaptive row filters and text
/// chunks as PIL's `PngInfo.add_text` writes them (the AUTOMATIC1111 `parameters` convention):
/// `tEXt` when the value is Latin-1, otherwise an uncompressed `iTXt` in UTF-8. Readers that
/// understand PNG text (PIL's `Image.info`, AUTOMATIC1111, ComfyUI, exiftool) read both.
public enum PNG {
    public static let signature: [UInt8] = [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]

    // MARK: - Writing

    /// Encodes `image` (8-bit, any of the four layouts) with `text` chunks, in order, before the
    /// image data. `level` is the zlib compression level.
    public static func encode(_ image: Image, text: [(String, String)] = [], level: Int32 = 6) throws -> [UInt8] {
        let name = "<PNG encoder>"
        guard image.width > 0, image.height > 0 else {
            throw ImageError(name, .invalidInput("a PNG needs at least one pixel, got \(image.width)x\(image.height)"))
        }
        guard image.width <= Int(Int32.max), image.height <= Int(Int32.max) else {
            throw ImageError(name, .invalidInput("\(image.width)x\(image.height) is larger than PNG allows"))
        }
        var out = signature
        var ihdr: [UInt8] = []
        ihdr.appendBigEndian(UInt32(image.width))
        ihdr.appendBigEndian(UInt32(image.height))
        let colorType: UInt8 = [0, 4, 2, 6][image.channels - 1]
        ihdr += [8, colorType, 0, 0, 0]   // depth, colour type, deflate, adaptive filtering, no interlace
        appendChunk("IHDR", ihdr, to: &out)
        for (key, value) in text {
            let (type, data) = try textChunk(key: key, value: value, name: name)
            appendChunk(type, data, to: &out)
        }
        let filtered = filterRows(image)
        let compressed: [UInt8]
        do { compressed = try Zlib.deflate(filtered, level: level) } catch {
            throw ImageError(name, .invalidInput("cannot compress the image data (\(error))"))
        }
        // IDAT chunks of at most 1 MiB keep every chunk well inside what streaming readers buffer.
        let idatSize = 1 << 20
        var start = 0
        repeat {
            let end = min(compressed.count, start + idatSize)
            appendChunk("IDAT", Array(compressed[start..<end]), to: &out)
            start = end
        } while start < compressed.count
        appendChunk("IEND", [], to: &out)
        return out
    }

    /// A text chunk as PIL's `add_text` writes it: tEXt for Latin-1 values, else iTXt.
    static func textChunk(key: String, value: String, name: String) throws -> (String, [UInt8]) {
        let keyScalars = Array(key.unicodeScalars)
        let validKey = (1...79).contains(keyScalars.count)
            && keyScalars.allSatisfy { (32...126).contains($0.value) || (161...255).contains($0.value) }
            && keyScalars.first != " " && keyScalars.last != " " && !key.contains("  ")
        guard validKey else {
            throw ImageError(name, .invalidInput(
                "PNG text keyword \"\(key)\" must be 1 to 79 printable Latin-1 characters without leading, trailing or double spaces"))
        }
        guard !value.unicodeScalars.contains("\0") else {
            throw ImageError(name, .invalidInput("PNG text \"\(key)\" contains a NUL character, which PNG text cannot hold"))
        }
        var data = keyScalars.map { UInt8($0.value) }
        data.append(0)
        if value.unicodeScalars.allSatisfy({ $0.value <= 0xFF }) {
            data += value.unicodeScalars.map { UInt8($0.value) }
            return ("tEXt", data)
        }
        // Not compressed, no language tag, no translated keyword: PIL's add_itxt defaults.
        data += [0, 0, 0, 0]
        data += Array(value.utf8)
        return ("iTXt", data)
    }

    static func appendChunk(_ type: String, _ data: [UInt8], to out: inout [UInt8]) {
        let typeBytes = Array(type.utf8)
        out.appendBigEndian(UInt32(data.count))
        out += typeBytes
        out += data
        let crc = Zlib.crc32(data, initial: UInt(Zlib.crc32(typeBytes)))
        out.appendBigEndian(crc)
    }

    /// Prefixes each row with the filter that minimizes the sum of absolute (signed) residuals,
    /// libpng's heuristic: usually within a few percent of the best choice, at little cost.
    static func filterRows(_ image: Image) -> [UInt8] {
        let bpp = image.channels
        let rowBytes = image.width * bpp
        var out = [UInt8](repeating: 0, count: image.height * (rowBytes + 1))
        var candidate = [UInt8](repeating: 0, count: rowBytes)
        let zeros = [UInt8](repeating: 0, count: rowBytes)
        image.pixels.withUnsafeBufferPointer { px in
            out.withUnsafeMutableBufferPointer { dst in
                candidate.withUnsafeMutableBufferPointer { cand in
                    zeros.withUnsafeBufferPointer { zero in
                        for y in 0..<image.height {
                            let cur = px.baseAddress! + y * rowBytes
                            let prev = y == 0 ? zero.baseAddress! : px.baseAddress! + (y - 1) * rowBytes
                            let rowOut = dst.baseAddress! + y * (rowBytes + 1)
                            var bestSum = Int.max
                            for filter in 0..<5 {
                                var sum = 0
                                for i in 0..<rowBytes {
                                    let a = i >= bpp ? cur[i - bpp] : 0
                                    let b = prev[i]
                                    let c = i >= bpp ? prev[i - bpp] : 0
                                    let predicted: UInt8
                                    switch filter {
                                    case 0: predicted = 0
                                    case 1: predicted = a
                                    case 2: predicted = b
                                    case 3: predicted = UInt8((Int(a) + Int(b)) >> 1)
                                    default: predicted = paeth(a, b, c)
                                    }
                                    let r = cur[i] &- predicted
                                    cand[i] = r
                                    sum += r < 128 ? Int(r) : 256 - Int(r)
                                }
                                if sum < bestSum {
                                    bestSum = sum
                                    rowOut[0] = UInt8(filter)
                                    (rowOut + 1).update(from: cand.baseAddress!, count: rowBytes)
                                }
                            }
                        }
                    }
                }
            }
        }
        return out
    }

    @inline(__always)
    static func paeth(_ a: UInt8, _ b: UInt8, _ c: UInt8) -> UInt8 {
        let p = Int(a) + Int(b) - Int(c)
        let pa = abs(p - Int(a)), pb = abs(p - Int(b)), pc = abs(p - Int(c))
        if pa <= pb && pa <= pc { return a }
        return pb <= pc ? b : c
    }

    // MARK: - Reading

    /// Decodes a PNG file's bytes; `name` is the file named in errors.
    public static func decode(_ bytes: [UInt8], name: String) throws -> ImageFile {
        var reader = Reader(bytes: bytes, name: name)
        return try reader.decode()
    }

    struct Header {
        var width = 0, height = 0, bitDepth = 0, colorType = 0, interlaced = false

        /// Samples per pixel as stored.
        var samples: Int { [1, 0, 3, 1, 2, 0, 4][colorType] }
        var bitsPerPixel: Int { samples * bitDepth }
        var colorName: String {
            ["grayscale", "", "RGB", "palette", "grayscale+alpha", "", "RGBA"][colorType]
        }
    }

    /// Adam7 passes: first column, first row, column step, row step.
    static let adam7: [(x: Int, y: Int, dx: Int, dy: Int)] = [
        (0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2),
    ]

    struct Reader {
        let bytes: [UInt8]
        let name: String
        var header = Header()
        var palette: [UInt8] = []        // RGB triples
        var paletteAlpha: [UInt8] = []   // tRNS for palette images
        var transparentKey: [UInt16]? = nil   // tRNS for gray / RGB
        var text: [(key: String, value: String)] = []
        var orientation = 1

        init(bytes: [UInt8], name: String) {
            self.bytes = bytes
            self.name = name
        }

        func error(_ p: ImageError.Problem) -> ImageError { ImageError(name, p) }

        func u32(_ o: Int) -> UInt32 {
            UInt32(bytes[o]) << 24 | UInt32(bytes[o + 1]) << 16 | UInt32(bytes[o + 2]) << 8 | UInt32(bytes[o + 3])
        }

        mutating func decode() throws -> ImageFile {
            guard bytes.starts(with: PNG.signature) else { throw error(.notAnImage("bad PNG signature")) }
            var pos = 8
            var idat: [UInt8] = []
            var seenIHDR = false, seenPLTE = false, seenIEND = false
            var idatState = 0   // 0 before IDAT, 1 inside the IDAT run, 2 after it
            var index = 0
            while pos < bytes.count {
                guard bytes.count - pos >= 8 else {
                    throw error(.truncated("chunk header at byte \(pos) is cut short (\(bytes.count - pos) bytes left)"))
                }
                let length = Int(u32(pos))
                let typeBytes = Array(bytes[(pos + 4)..<(pos + 8)])
                guard typeBytes.allSatisfy({ (65...90).contains($0) || (97...122).contains($0) }) else {
                    throw error(.corrupt("invalid chunk type \(typeBytes) at byte \(pos + 4)"))
                }
                let type = String(decoding: typeBytes, as: UTF8.self)
                guard length <= Int(Int32.max) else {
                    throw error(.corrupt("chunk '\(type)' claims \(length) bytes, more than PNG allows"))
                }
                let dataStart = pos + 8
                guard bytes.count - dataStart >= length + 4 else {
                    throw error(.truncated("chunk '\(type)' needs \(length + 4) bytes at byte \(dataStart), only \(bytes.count - dataStart) left"))
                }
                let data = bytes[dataStart..<(dataStart + length)]
                let stored = u32(dataStart + length)
                let computed = Zlib.crc32(Array(data), initial: UInt(Zlib.crc32(typeBytes)))
                guard stored == computed else { throw error(.badCRC(chunk: type, stored: stored, computed: computed)) }
                pos = dataStart + length + 4

                if index == 0 && type != "IHDR" { throw error(.corrupt("the first chunk is '\(type)', not IHDR")) }
                index += 1
                if idatState == 1 && type != "IDAT" { idatState = 2 }
                switch type {
                case "IHDR":
                    guard !seenIHDR else { throw error(.corrupt("more than one IHDR chunk")) }
                    seenIHDR = true
                    try parseHeader(data)
                case "PLTE":
                    guard !seenPLTE else { throw error(.corrupt("more than one PLTE chunk")) }
                    guard idatState == 0 else { throw error(.corrupt("PLTE after the image data")) }
                    guard length % 3 == 0, (3...768).contains(length) else {
                        throw error(.corrupt("PLTE chunk of \(length) bytes (must be 1 to 256 RGB entries)"))
                    }
                    guard header.colorType != 0 && header.colorType != 4 else {
                        throw error(.corrupt("PLTE chunk in a \(header.colorName) image"))
                    }
                    seenPLTE = true
                    palette = Array(data)
                case "tRNS":
                    guard idatState == 0 else { throw error(.corrupt("tRNS after the image data")) }
                    try parseTransparency(data, afterPalette: seenPLTE)
                case "IDAT":
                    guard idatState != 2 else { throw error(.corrupt("IDAT chunks are not consecutive")) }
                    idatState = 1
                    idat += data
                case "IEND":
                    seenIEND = true
                case "tEXt", "zTXt", "iTXt":
                    text.append(try parseText(type, data))
                case "eXIf":
                    orientation = EXIF.orientation(data) ?? 1
                default:
                    // Bit 5 of the first letter clear (upper case) marks a critical chunk.
                    if typeBytes[0] & 0x20 == 0 {
                        throw error(.unsupported("unknown critical chunk '\(type)'"))
                    }
                }
                if seenIEND { break }
            }
            guard seenIHDR else { throw error(.truncated("no IHDR chunk")) }
            guard idatState != 0 else {
                throw error(seenIEND ? .corrupt("no image data (IDAT) before IEND") : .truncated("the file ends before any image data (IDAT)"))
            }
            guard seenIEND else { throw error(.truncated("the file ends without an IEND chunk")) }
            if header.colorType == 3 && !seenPLTE { throw error(.corrupt("palette image without a PLTE chunk")) }
            let image = try decodePixels(idat)
            return ImageFile(format: .png, image: image, text: text, exifOrientation: orientation)
        }

        mutating func parseHeader(_ d: ArraySlice<UInt8>) throws {
            guard d.count == 13 else { throw error(.corrupt("IHDR chunk of \(d.count) bytes, expected 13")) }
            let o = d.startIndex
            let w = Int(u32(o)), h = Int(u32(o + 4))
            let depth = Int(d[o + 8]), color = Int(d[o + 9])
            guard w > 0, h > 0, w <= Int(Int32.max), h <= Int(Int32.max) else {
                throw error(.corrupt("invalid image size \(w)x\(h)"))
            }
            let allowed: [Int: [Int]] = [0: [1, 2, 4, 8, 16], 2: [8, 16], 3: [1, 2, 4, 8], 4: [8, 16], 6: [8, 16]]
            guard let depths = allowed[color] else { throw error(.corrupt("invalid colour type \(color)")) }
            guard depths.contains(depth) else {
                throw error(.corrupt("bit depth \(depth) is not allowed for colour type \(color)"))
            }
            guard d[o + 10] == 0 else { throw error(.unsupported("compression method \(d[o + 10])")) }
            guard d[o + 11] == 0 else { throw error(.unsupported("filter method \(d[o + 11])")) }
            guard d[o + 12] <= 1 else { throw error(.unsupported("interlace method \(d[o + 12])")) }
            guard w * h <= ImageError.maxPixels else { throw error(.tooLarge(width: w, height: h)) }
            header = Header(width: w, height: h, bitDepth: depth, colorType: color, interlaced: d[o + 12] == 1)
        }

        mutating func parseTransparency(_ d: ArraySlice<UInt8>, afterPalette: Bool) throws {
            let o = d.startIndex
            switch header.colorType {
            case 0:
                guard d.count == 2 else { throw error(.corrupt("tRNS chunk of \(d.count) bytes in a grayscale image, expected 2")) }
                transparentKey = [UInt16(d[o]) << 8 | UInt16(d[o + 1])]
            case 2:
                guard d.count == 6 else { throw error(.corrupt("tRNS chunk of \(d.count) bytes in an RGB image, expected 6")) }
                transparentKey = (0..<3).map { UInt16(d[o + 2 * $0]) << 8 | UInt16(d[o + 2 * $0 + 1]) }
            case 3:
                guard afterPalette else { throw error(.corrupt("tRNS before PLTE")) }
                guard d.count <= palette.count / 3 else {
                    throw error(.corrupt("tRNS has \(d.count) entries for a palette of \(palette.count / 3)"))
                }
                paletteAlpha = Array(d)
            default:
                throw error(.corrupt("tRNS chunk in a \(header.colorName) image, which has an alpha channel"))
            }
        }

        func parseText(_ type: String, _ d: ArraySlice<UInt8>) throws -> (key: String, value: String) {
            guard let nul = d.firstIndex(of: 0) else { throw error(.corrupt("\(type) chunk without a keyword terminator")) }
            let keyBytes = d[d.startIndex..<nul]
            guard (1...79).contains(keyBytes.count) else {
                throw error(.corrupt("\(type) keyword of \(keyBytes.count) bytes (must be 1 to 79)"))
            }
            let key = latin1(keyBytes)
            var rest = d[(nul + 1)...]
            switch type {
            case "tEXt":
                return (key, latin1(rest))
            case "zTXt":
                guard let method = rest.first else { throw error(.corrupt("zTXt '\(key)' has no compression method")) }
                guard method == 0 else { throw error(.unsupported("zTXt '\(key)' uses compression method \(method)")) }
                return (key, latin1(try inflateText(rest.dropFirst(), key: key)[...]))
            default: // iTXt
                guard rest.count >= 2 else { throw error(.corrupt("iTXt '\(key)' is cut short")) }
                let compressed = rest[rest.startIndex], method = rest[rest.startIndex + 1]
                guard compressed <= 1 else { throw error(.corrupt("iTXt '\(key)' has compression flag \(compressed)")) }
                guard compressed == 0 || method == 0 else {
                    throw error(.unsupported("iTXt '\(key)' uses compression method \(method)"))
                }
                rest = rest.dropFirst(2)
                // Language tag and translated keyword, each NUL-terminated.
                for field in ["language tag", "translated keyword"] {
                    guard let end = rest.firstIndex(of: 0) else {
                        throw error(.corrupt("iTXt '\(key)' has no terminator after its \(field)"))
                    }
                    rest = rest[(end + 1)...]
                }
                let raw = compressed == 1 ? try inflateText(rest, key: key)[...] : rest
                guard let value = String(validating: raw, as: UTF8.self) else {
                    throw error(.corrupt("iTXt '\(key)' is not valid UTF-8"))
                }
                return (key, value)
            }
        }

        func inflateText(_ d: ArraySlice<UInt8>, key: String) throws -> [UInt8] {
            let limit = 64 << 20
            do {
                let out = try Zlib.inflate(Array(d), format: .zlib, limit: limit)
                guard out.count < limit else { throw error(.unsupported("text '\(key)' inflates to more than 64 MiB")) }
                return out
            } catch let e as CompressionError {
                throw error(.corrupt("compressed text '\(key)': \(e.message)"))
            }
        }

        func latin1(_ b: ArraySlice<UInt8>) -> String {
            var s = String.UnicodeScalarView()
            s.append(contentsOf: b.map { Unicode.Scalar($0) })
            return String(s)
        }

        // MARK: Pixels

        func decodePixels(_ idat: [UInt8]) throws -> Image {
            let h = header
            let passes = h.interlaced ? PNG.adam7 : [(x: 0, y: 0, dx: 1, dy: 1)]
            // Size of each pass's filtered data: a filter byte plus packed samples per row.
            var layout: [(pass: (x: Int, y: Int, dx: Int, dy: Int), width: Int, height: Int, rowBytes: Int, offset: Int)] = []
            var total = 0
            for p in passes {
                let pw = (h.width - p.x + p.dx - 1) / p.dx, ph = (h.height - p.y + p.dy - 1) / p.dy
                guard pw > 0, ph > 0 else { continue }
                let rowBytes = (pw * h.bitsPerPixel + 7) / 8
                layout.append((p, pw, ph, rowBytes, total))
                total += ph * (rowBytes + 1)
            }
            var data: [UInt8]
            do { data = try Zlib.inflate(idat, format: .zlib, limit: total) } catch let e as CompressionError {
                throw error(.corrupt("image data (IDAT): \(e.message)"))
            }
            guard data.count == total else {
                throw error(.truncated("image data inflates to \(data.count) bytes, expected \(total)"))
            }
            let outChannels: Int
            switch h.colorType {
            case 0: outChannels = transparentKey == nil ? 1 : 2
            case 2: outChannels = transparentKey == nil ? 3 : 4
            case 3: outChannels = paletteAlpha.isEmpty ? 3 : 4
            case 4: outChannels = 2
            default: outChannels = 4
            }
            var pixels = [UInt8](repeating: 0, count: h.width * h.height * outChannels)
            let bpp = max(1, h.bitsPerPixel / 8)   // filter distance in bytes
            var rowSamples = [UInt8](repeating: 0, count: h.width * outChannels)
            try data.withUnsafeMutableBufferPointer { buf in
                for l in layout {
                    var prior: UnsafeMutablePointer<UInt8>? = nil
                    for r in 0..<l.height {
                        let start = l.offset + r * (l.rowBytes + 1)
                        let filter = buf[start]
                        let row = buf.baseAddress! + start + 1
                        guard filter <= 4 else {
                            throw error(.corrupt("invalid filter type \(filter) in row \(r)\(h.interlaced ? " of an Adam7 pass" : "")"))
                        }
                        unfilter(row, prior: prior, count: l.rowBytes, bpp: bpp, filter: filter)
                        prior = row
                        let y = l.pass.y + r * l.pass.dy
                        if l.pass.dx == 1 {
                            pixels.withUnsafeMutableBufferPointer { px in
                                expand(row, width: l.width, into: px.baseAddress! + y * h.width * outChannels, channels: outChannels)
                            }
                        } else {
                            rowSamples.withUnsafeMutableBufferPointer { tmp in
                                expand(row, width: l.width, into: tmp.baseAddress!, channels: outChannels)
                                pixels.withUnsafeMutableBufferPointer { px in
                                    for i in 0..<l.width {
                                        let x = l.pass.x + i * l.pass.dx
                                        let d = (y * h.width + x) * outChannels
                                        for c in 0..<outChannels { px[d + c] = tmp[i * outChannels + c] }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            return Image(width: h.width, height: h.height, channels: outChannels, pixels: pixels)
        }

        /// Undoes one row's filter in place; `prior` is the previous reconstructed row of the
        /// same pass (nil on its first row, which PNG treats as zeros).
        func unfilter(_ row: UnsafeMutablePointer<UInt8>, prior: UnsafeMutablePointer<UInt8>?, count: Int, bpp: Int, filter: UInt8) {
            switch filter {
            case 1:
                for i in bpp..<max(bpp, count) { row[i] &+= row[i - bpp] }
            case 2:
                guard let prior else { return }
                for i in 0..<count { row[i] &+= prior[i] }
            case 3:
                for i in 0..<count {
                    let a = i >= bpp ? Int(row[i - bpp]) : 0
                    let b = prior.map { Int($0[i]) } ?? 0
                    row[i] &+= UInt8((a + b) >> 1)
                }
            case 4:
                for i in 0..<count {
                    let a = i >= bpp ? row[i - bpp] : 0
                    let b = prior?[i] ?? 0
                    let c = i >= bpp ? (prior?[i - bpp] ?? 0) : 0
                    row[i] &+= PNG.paeth(a, b, c)
                }
            default:
                break
            }
        }

        /// Turns one reconstructed row of `width` pixels into 8-bit output samples.
        func expand(_ row: UnsafeMutablePointer<UInt8>, width: Int, into out: UnsafeMutablePointer<UInt8>, channels: Int) {
            let h = header
            let spp = h.samples
            // Fast path: 8-bit samples that map one to one.
            if h.bitDepth == 8 && h.colorType != 3 && transparentKey == nil {
                out.update(from: row, count: width * spp)
                return
            }
            let depth = h.bitDepth
            let mask = (1 << depth) - 1
            func sample(_ i: Int) -> Int {
                switch depth {
                case 16: return Int(row[2 * i]) << 8 | Int(row[2 * i + 1])
                case 8: return Int(row[i])
                default:
                    let bit = i * depth
                    return Int(row[bit >> 3]) >> (8 - depth - (bit & 7)) & mask
                }
            }
            // Gray samples below 8 bits scale by bit replication (255 / (2^depth - 1)).
            let scale = depth < 8 ? 255 / mask : 1
            func to8(_ v: Int) -> UInt8 { depth == 16 ? UInt8(v >> 8) : UInt8(v * scale) }
            for x in 0..<width {
                let o = x * channels
                switch h.colorType {
                case 3:
                    let index = sample(x)
                    if index * 3 + 2 < palette.count {
                        out[o] = palette[index * 3]; out[o + 1] = palette[index * 3 + 1]; out[o + 2] = palette[index * 3 + 2]
                    } else {
                        // Out-of-range index: black, as PIL's zero-padded palette gives.
                        out[o] = 0; out[o + 1] = 0; out[o + 2] = 0
                    }
                    if channels == 4 { out[o + 3] = index < paletteAlpha.count ? paletteAlpha[index] : 255 }
                case 0:
                    let v = sample(x)
                    out[o] = to8(v)
                    if let key = transparentKey { out[o + 1] = v == Int(key[0]) ? 0 : 255 }
                case 2:
                    let r = sample(3 * x), g = sample(3 * x + 1), b = sample(3 * x + 2)
                    out[o] = to8(r); out[o + 1] = to8(g); out[o + 2] = to8(b)
                    if let key = transparentKey {
                        out[o + 3] = (r == Int(key[0]) && g == Int(key[1]) && b == Int(key[2])) ? 0 : 255
                    }
                default:   // gray + alpha, RGBA: 8- or 16-bit
                    for c in 0..<spp { out[o + c] = to8(sample(spp * x + c)) }
                }
            }
        }
    }
}

extension Array where Element == UInt8 {
    mutating func appendBigEndian(_ v: UInt32) {
        append(UInt8(v >> 24)); append(UInt8((v >> 16) & 0xFF)); append(UInt8((v >> 8) & 0xFF)); append(UInt8(v & 0xFF))
    }
}
