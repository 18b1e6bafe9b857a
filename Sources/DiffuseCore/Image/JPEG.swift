/// JPEG (ITU T.81) decoding: baseline, extended-sequential and progressive Huffman-coded
/// frames with 8-bit samples, one (gray) or three (YCbCr, or RGB per the Adobe marker or
/// component ids) components, any integral sampling factors (4:4:4, 4:2:2, 4:2:0, 4:4:0,
/// 4:1:1, ...), restart markers and multi-scan sequential files.
///
/// The pixels are meant to equal what PIL (libjpeg-turbo with its defaults) returns: the
/// accurate integer IDCT (`JDCT_ISLOW`, with its range-limit table), libjpeg's "fancy"
/// triangle-filter upsampling for 2x horizontal and/or 2x vertical chroma, box replication
/// for other ratios, and its fixed-point YCbCr→RGB tables. Not done: libjpeg's block
/// smoothing of progressive files whose low-frequency coefficients were never fully sent
/// (standard encoders always send them), CMYK/YCCK, 12-bit, lossless, hierarchical and
/// arithmetic-coded files (each rejected with its own error). libjpeg *warns* and guesses
/// on corrupt entropy data (bad Huffman codes, missing restart markers, data ending early);
/// here each of those is an error. The EXIF orientation is reported, not applied
/// (`Image.load` applies it, as diffusers' `load_image` does).
public enum JPEG {
    /// Decodes a JPEG file's bytes; `name` is the file named in errors.
    public static func decode(_ bytes: [UInt8], name: String) throws -> ImageFile {
        let decoder = JPEGDecoder(name: name)
        return try bytes.withUnsafeBufferPointer { try decoder.decode($0) }
    }
}

/// Zigzag position → natural (row-major) position in an 8x8 block.
private let naturalOrder: [Int] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5,
    12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21, 28,
    35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51,
    58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
]

/// A canonical Huffman table (T.81 Annex C) with a 9-bit lookup for the short codes.
private final class HuffmanTable {
    static let lookupBits = 9
    /// `length << 8 | symbol` for every 9-bit prefix that starts with a code of ≤ 9 bits; 0 otherwise.
    var lookup = [UInt16](repeating: 0, count: 1 << lookupBits)
    /// Largest code of each length (−1 when there is none), and the offset from a code to its symbol index.
    var maxCode = [Int32](repeating: -1, count: 17)
    var valueOffset = [Int32](repeating: 0, count: 17)
    var symbols: [UInt8]

    /// nil when the code lengths overflow (more codes of a length than fit, or an all-ones code).
    init?(counts: [Int], symbols: [UInt8]) {
        self.symbols = symbols
        var code: Int32 = 0
        var k: Int32 = 0
        for length in 1...16 {
            valueOffset[length] = k - code
            let n = Int32(counts[length - 1])
            if n > 0 {
                if length <= HuffmanTable.lookupBits {
                    for i in 0..<n {
                        let c = Int(code + i)
                        let shift = HuffmanTable.lookupBits - length
                        let entry = UInt16(length << 8) | UInt16(symbols[Int(k + i)])
                        for j in (c << shift)..<((c + 1) << shift) { lookup[j] = entry }
                    }
                }
                code += n
                k += n
                maxCode[length] = code - 1
            }
            // No code may be all ones (libjpeg's JERR_BAD_HUFF_TABLE).
            if code >= Int32(1) << length { return nil }
            code <<= 1
        }
    }
}

/// Reads entropy-coded bits: undoes 0xFF00 stuffing, stops at markers and feeds zeros past
/// them (as libjpeg does), counting those so that using them is reported as data ending early.
private struct BitReader {
    let data: UnsafeBufferPointer<UInt8>
    var pos: Int
    var buffer: UInt64 = 0   // valid bits are the top `count` bits
    var count = 0
    var padding = 0          // zero bytes fed past a marker or the end of the file
    var hitMarker = false

    init(_ data: UnsafeBufferPointer<UInt8>, at pos: Int) {
        self.data = data
        self.pos = pos
    }

    @inline(__always)
    mutating func fill() {
        while count <= 56 {
            var byte: UInt8 = 0
            if pos < data.count && !hitMarker {
                byte = data[pos]
                if byte == 0xFF {
                    let next = pos + 1 < data.count ? data[pos + 1] : 0xD9
                    if next == 0x00 {
                        pos += 2
                    } else {
                        hitMarker = true
                        byte = 0
                        padding += 1
                    }
                } else {
                    pos += 1
                }
            } else {
                padding += 1
            }
            buffer |= UInt64(byte) << UInt64(56 - count)
            count += 8
        }
    }

    @inline(__always)
    mutating func bits(_ n: Int) -> Int {
        if n == 0 { return 0 }
        if count < n { fill() }
        let v = Int(buffer >> UInt64(64 - n))
        buffer <<= UInt64(n)
        count -= n
        return v
    }

    @inline(__always)
    mutating func bit() -> Int { bits(1) }

    /// `n` bits as a signed value (T.81 F.2.2.1 EXTEND).
    @inline(__always)
    mutating func receiveExtend(_ n: Int) -> Int {
        if n == 0 { return 0 }
        let v = bits(n)
        return v < 1 << (n - 1) ? v - (1 << n) + 1 : v
    }

    /// The next Huffman symbol, or nil for a code that is not in the table.
    @inline(__always)
    mutating func decode(_ table: HuffmanTable) -> Int? {
        if count < 16 { fill() }
        let entry = table.lookup[Int(buffer >> UInt64(64 - HuffmanTable.lookupBits))]
        if entry != 0 {
            let length = Int(entry >> 8)
            buffer <<= UInt64(length)
            count -= length
            return Int(entry & 0xFF)
        }
        let peek = Int32(truncatingIfNeeded: buffer >> 48)
        for length in (HuffmanTable.lookupBits + 1)...16 {
            let code = peek >> Int32(16 - length)
            if code <= table.maxCode[length] {
                buffer <<= UInt64(length)
                count -= length
                return Int(table.symbols[Int(code + table.valueOffset[length])])
            }
        }
        return nil
    }

    /// True when bits past the end of the segment were consumed.
    var overran: Bool { padding > 0 && count < padding * 8 }

    /// Forgets buffered bits, e.g. at a restart marker.
    mutating func reset() {
        buffer = 0
        count = 0
        padding = 0
        hitMarker = false
    }
}

private final class Component {
    let id: Int, h: Int, v: Int, tq: Int
    /// Sample size of this component (libjpeg's downsampled_width/height).
    var width = 0, height = 0
    /// Blocks stored, padded to whole MCUs.
    var blocksPerLine = 0, blocksPerColumn = 0
    var coefficients: UnsafeMutablePointer<Int16>? = nil
    /// The quantization table, latched at the first scan that carries the component (as libjpeg).
    var quant: [Int32]? = nil
    var dcPredictor = 0

    init(id: Int, h: Int, v: Int, tq: Int) {
        self.id = id
        self.h = h
        self.v = v
        self.tq = tq
    }

    func block(_ bx: Int, _ by: Int) -> UnsafeMutablePointer<Int16> {
        coefficients! + (by * blocksPerLine + bx) * 64
    }

    deinit { coefficients?.deallocate() }
}

private struct Frame {
    var width = 0, height = 0
    var progressive = false
    var components: [Component] = []
    var hMax = 1, vMax = 1
    var mcusPerLine = 0, mcusPerColumn = 0
}

private final class JPEGDecoder {
    let name: String
    var quantTables = [[Int32]?](repeating: nil, count: 4)
    var dcTables = [HuffmanTable?](repeating: nil, count: 4)
    var acTables = [HuffmanTable?](repeating: nil, count: 4)
    var frame: Frame? = nil
    var restartInterval = 0
    var sawJFIF = false
    var adobeTransform: Int? = nil
    var orientation: Int? = nil
    var scanCount = 0
    var eobrun = 0

    init(name: String) { self.name = name }

    func error(_ p: ImageError.Problem) -> ImageError { ImageError(name, p) }

    func markerName(_ m: UInt8) -> String {
        let hex = String(m, radix: 16, uppercase: true)
        return "0xFF" + (hex.count == 1 ? "0" : "") + hex
    }

    func decode(_ data: UnsafeBufferPointer<UInt8>) throws -> ImageFile {
        guard data.count >= 2, data[0] == 0xFF, data[1] == 0xD8 else { throw error(.notAnImage("no JPEG start-of-image marker")) }
        var pos = 2
        markers: while true {
            // Find the next marker; libjpeg skips stray bytes before it (with a warning).
            while pos < data.count && data[pos] != 0xFF { pos += 1 }
            while pos < data.count && data[pos] == 0xFF { pos += 1 }
            guard pos < data.count else {
                throw error(.truncated(frame == nil ? "the file ends before the image frame" : "the file ends before the end-of-image marker"))
            }
            let marker = data[pos]
            pos += 1
            switch marker {
            case 0xD9:  // EOI
                break markers
            case 0xD0...0xD7, 0x01, 0x00:
                // Stray RSTn, TEM, or stuffed data left after a scan: no segment (libjpeg skips them too).
                continue
            case 0xD8:
                throw error(.corrupt("a second start-of-image marker at byte \(pos - 2)"))
            default:
                break
            }
            guard data.count - pos >= 2 else { throw error(.truncated("marker \(markerName(marker)) has no length")) }
            let length = Int(data[pos]) << 8 | Int(data[pos + 1])
            guard length >= 2 else { throw error(.corrupt("marker \(markerName(marker)) has length \(length)")) }
            guard data.count - pos >= length else {
                throw error(.truncated("marker segment \(markerName(marker)) needs \(length) bytes, only \(data.count - pos) left"))
            }
            let segment = UnsafeBufferPointer(rebasing: data[(pos + 2)..<(pos + length)])
            pos += length
            switch marker {
            case 0xC0, 0xC1, 0xC2:
                try parseFrame(segment, progressive: marker == 0xC2)
            case 0xC3: throw error(.unsupported("lossless JPEG (SOF3)"))
            case 0xC5, 0xC6, 0xC7: throw error(.unsupported("hierarchical JPEG (SOF\(marker - 0xC0))"))
            case 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF:
                throw error(.unsupported("arithmetic-coded JPEG (SOF\(marker - 0xC0))"))
            case 0xC4: try parseHuffmanTables(segment)
            case 0xDB: try parseQuantTables(segment)
            case 0xDD:
                guard segment.count >= 2 else { throw error(.corrupt("DRI segment of \(segment.count) bytes")) }
                restartInterval = Int(segment[0]) << 8 | Int(segment[1])
            case 0xDC: throw error(.unsupported("a DNL marker (image height defined after the scan)"))
            case 0xDA:
                pos = try decodeScan(segment, data: data, at: pos)
            case 0xE0:
                if segment.starts(with: Array("JFIF\0".utf8)) { sawJFIF = true }
            case 0xE1:
                if orientation == nil, segment.starts(with: Array("Exif\0\0".utf8)) {
                    orientation = EXIF.orientation(Array(segment.dropFirst(6))[...])
                }
            case 0xEE:
                if segment.count >= 12, segment.starts(with: Array("Adobe".utf8)) { adobeTransform = Int(segment[11]) }
            default:
                break   // other APPn, COM, JPGn: not needed
            }
        }
        guard let frame else { throw error(.corrupt("no image frame (SOF marker) before the end of the image")) }
        guard scanCount > 0 else { throw error(.corrupt("no scan (SOS marker) before the end of the image")) }
        let image = try output(frame)
        return ImageFile(format: .jpeg, image: image, text: [], exifOrientation: orientation ?? 1)
    }

    // MARK: - Marker segments

    func parseFrame(_ s: UnsafeBufferPointer<UInt8>, progressive: Bool) throws {
        guard frame == nil else { throw error(.unsupported("more than one frame (SOF marker)")) }
        guard s.count >= 6 else { throw error(.corrupt("SOF segment of \(s.count) bytes")) }
        let precision = Int(s[0])
        let height = Int(s[1]) << 8 | Int(s[2]), width = Int(s[3]) << 8 | Int(s[4])
        let n = Int(s[5])
        guard precision == 8 else { throw error(.unsupported("\(precision)-bit samples (only 8-bit JPEG is supported)")) }
        guard height > 0 else { throw error(.unsupported("image height 0 (defined later by a DNL marker)")) }
        guard width > 0 else { throw error(.corrupt("image width 0")) }
        guard width * height <= ImageError.maxPixels else { throw error(.tooLarge(width: width, height: height)) }
        guard s.count == 6 + 3 * n else { throw error(.corrupt("SOF segment of \(s.count) bytes for \(n) components")) }
        switch n {
        case 1, 3: break
        case 4: throw error(.unsupported("4-component (CMYK/YCCK) JPEG"))
        default: throw error(.unsupported("\(n)-component JPEG"))
        }
        var f = Frame()
        f.width = width
        f.height = height
        f.progressive = progressive
        for i in 0..<n {
            let id = Int(s[6 + 3 * i]), h = Int(s[7 + 3 * i] >> 4), v = Int(s[7 + 3 * i] & 15), tq = Int(s[8 + 3 * i])
            guard (1...4).contains(h), (1...4).contains(v) else {
                throw error(.corrupt("component \(id) has sampling factors \(h)x\(v)"))
            }
            guard tq <= 3 else { throw error(.corrupt("component \(id) uses quantization table \(tq)")) }
            guard !f.components.contains(where: { $0.id == id }) else { throw error(.corrupt("component id \(id) appears twice")) }
            f.components.append(Component(id: id, h: h, v: v, tq: tq))
        }
        f.hMax = f.components.map(\.h).max()!
        f.vMax = f.components.map(\.v).max()!
        for c in f.components where f.hMax % c.h != 0 || f.vMax % c.v != 0 {
            throw error(.unsupported("fractional sampling factors (component \(c.id) is \(c.h)x\(c.v), the maximum \(f.hMax)x\(f.vMax))"))
        }
        f.mcusPerLine = (width + 8 * f.hMax - 1) / (8 * f.hMax)
        f.mcusPerColumn = (height + 8 * f.vMax - 1) / (8 * f.vMax)
        for c in f.components {
            c.width = (width * c.h + f.hMax - 1) / f.hMax
            c.height = (height * c.v + f.vMax - 1) / f.vMax
            c.blocksPerLine = f.mcusPerLine * c.h
            c.blocksPerColumn = f.mcusPerColumn * c.v
            let count = c.blocksPerLine * c.blocksPerColumn * 64
            c.coefficients = .allocate(capacity: count)
            c.coefficients!.initialize(repeating: 0, count: count)
        }
        frame = f
    }

    func parseHuffmanTables(_ s: UnsafeBufferPointer<UInt8>) throws {
        var p = 0
        while p < s.count {
            guard s.count - p >= 17 else { throw error(.corrupt("DHT segment is cut short")) }
            let tc = Int(s[p] >> 4), th = Int(s[p] & 15)
            guard tc <= 1, th <= 3 else { throw error(.corrupt("DHT defines table class \(tc), id \(th)")) }
            let counts = (0..<16).map { Int(s[p + 1 + $0]) }
            let total = counts.reduce(0, +)
            guard total <= 256, s.count - p - 17 >= total else { throw error(.corrupt("DHT table with \(total) symbols is cut short or too long")) }
            let symbols = Array(s[(p + 17)..<(p + 17 + total)])
            // DC symbols are bit counts of a difference: at most 15 (libjpeg rejects more).
            if tc == 0, let bad = symbols.first(where: { $0 > 15 }) {
                throw error(.corrupt("DC Huffman table \(th) has symbol \(bad) (at most 15)"))
            }
            guard let table = HuffmanTable(counts: counts, symbols: symbols) else {
                throw error(.corrupt("bad Huffman table (\(tc == 0 ? "DC" : "AC") \(th)): code lengths overflow"))
            }
            if tc == 0 { dcTables[th] = table } else { acTables[th] = table }
            p += 17 + total
        }
    }

    func parseQuantTables(_ s: UnsafeBufferPointer<UInt8>) throws {
        var p = 0
        while p < s.count {
            let pq = Int(s[p] >> 4), tq = Int(s[p] & 15)
            guard pq <= 1, tq <= 3 else { throw error(.corrupt("DQT defines table \(tq) with precision \(pq)")) }
            let size = pq == 0 ? 64 : 128
            guard s.count - p - 1 >= size else { throw error(.corrupt("DQT segment is cut short")) }
            var table = [Int32](repeating: 0, count: 64)
            for k in 0..<64 {
                let v = pq == 0 ? Int32(s[p + 1 + k]) : Int32(s[p + 1 + 2 * k]) << 8 | Int32(s[p + 2 + 2 * k])
                table[naturalOrder[k]] = v
            }
            quantTables[tq] = table
            p += 1 + size
        }
    }

    // MARK: - Scans

    enum BlockMode { case baseline, dcFirst, dcRefine, acFirst, acRefine }

    struct ScanComponent {
        let component: Component
        let dc: HuffmanTable?
        let ac: HuffmanTable?
    }

    /// Decodes one scan whose header is `s` and whose entropy-coded data starts at `start`;
    /// returns the position after the data.
    func decodeScan(_ s: UnsafeBufferPointer<UInt8>, data: UnsafeBufferPointer<UInt8>, at start: Int) throws -> Int {
        guard let frame else { throw error(.corrupt("scan (SOS) before the frame header (SOF)")) }
        guard s.count >= 1 else { throw error(.corrupt("empty SOS segment")) }
        let n = Int(s[0])
        guard (1...4).contains(n), s.count == 4 + 2 * n else { throw error(.corrupt("SOS segment of \(s.count) bytes for \(n) components")) }
        let ss = Int(s[1 + 2 * n]), se = Int(s[2 + 2 * n]), ah = Int(s[3 + 2 * n] >> 4), al = Int(s[3 + 2 * n] & 15)
        scanCount += 1
        let scan = scanCount
        if frame.progressive {
            var bad = ss == 0 ? se != 0 : (se < ss || se > 63 || n != 1)
            if ah != 0 && al != ah - 1 { bad = true }
            if al > 13 { bad = true }
            if bad { throw error(.corrupt("invalid progressive parameters in scan \(scan) (Ss=\(ss) Se=\(se) Ah=\(ah) Al=\(al))")) }
        }
        let dcFirst = frame.progressive && ss == 0 && ah == 0
        let needDC = !frame.progressive || dcFirst
        let needAC = !frame.progressive || ss > 0
        var comps: [ScanComponent] = []
        for i in 0..<n {
            let id = Int(s[1 + 2 * i]), td = Int(s[2 + 2 * i] >> 4), ta = Int(s[2 + 2 * i] & 15)
            guard let c = frame.components.first(where: { $0.id == id }) else {
                throw error(.corrupt("scan \(scan) names component \(id), which the frame does not have"))
            }
            guard !comps.contains(where: { $0.component === c }) else { throw error(.corrupt("scan \(scan) names component \(id) twice")) }
            guard td <= 3, ta <= 3 else { throw error(.corrupt("scan \(scan) uses Huffman table \(max(td, ta))")) }
            let dc = dcTables[td], ac = acTables[ta]
            if needDC && dc == nil { throw error(.corrupt("scan \(scan) uses DC Huffman table \(td), which is not defined")) }
            if needAC && ac == nil { throw error(.corrupt("scan \(scan) uses AC Huffman table \(ta), which is not defined")) }
            if c.quant == nil {
                guard let q = quantTables[c.tq] else {
                    throw error(.corrupt("component \(c.id) uses quantization table \(c.tq), which is not defined"))
                }
                c.quant = q
            }
            comps.append(ScanComponent(component: c, dc: dc, ac: ac))
        }
        if n > 1 {
            let blocks = comps.reduce(0) { $0 + $1.component.h * $1.component.v }
            guard blocks <= 10 else { throw error(.corrupt("interleaved scan \(scan) has \(blocks) blocks per MCU (at most 10)")) }
        }

        // Each MCU is one block in a single-component scan, else h x v blocks of each component.
        let single = n == 1 ? comps[0].component : nil
        let mcusPerLine = single.map { ($0.width + 7) / 8 } ?? frame.mcusPerLine
        let mcuCount = mcusPerLine * (single.map { ($0.height + 7) / 8 } ?? frame.mcusPerColumn)
        for c in comps { c.component.dcPredictor = 0 }
        eobrun = 0
        var reader = BitReader(data, at: start)
        let mode: BlockMode = !frame.progressive ? .baseline
            : ss == 0 ? (ah == 0 ? .dcFirst : .dcRefine) : (ah == 0 ? .acFirst : .acRefine)
        @inline(__always)
        func decodeBlock(_ sc: ScanComponent, _ block: UnsafeMutablePointer<Int16>) -> Bool {
            switch mode {
            case .baseline: return decodeBaselineBlock(&reader, sc, block)
            case .dcFirst: return decodeDCFirst(&reader, sc, block, al: al)
            case .dcRefine:
                if reader.bit() != 0 { block[0] |= Int16(truncatingIfNeeded: 1 << al) }
                return true
            case .acFirst: return decodeACFirst(&reader, sc, block, ss: ss, se: se, al: al)
            case .acRefine: return decodeACRefine(&reader, sc, block, ss: ss, se: se, al: al)
            }
        }

        for mcu in 0..<mcuCount {
            if restartInterval > 0 && mcu > 0 && mcu % restartInterval == 0 {
                try restart(&reader, data: data, scan: scan, mcu: mcu)
                for c in comps { c.component.dcPredictor = 0 }
                eobrun = 0
            }
            let mx = mcu % mcusPerLine, my = mcu / mcusPerLine
            var ok = true
            if let c = single {
                ok = decodeBlock(comps[0], c.block(mx, my))
            } else {
                for sc in comps {
                    let c = sc.component
                    for v in 0..<c.v {
                        for h in 0..<c.h where ok {
                            ok = decodeBlock(sc, c.block(mx * c.h + h, my * c.v + v))
                        }
                    }
                }
            }
            // Past the data the reader feeds zero bits, which always decode (the first canonical
            // code is all zeros): running out shows as bits used past the end, not as a bad code.
            if reader.overran {
                throw error(reader.pos >= data.count
                    ? .truncated("the entropy-coded data of scan \(scan) ends at MCU \(mcu) of \(mcuCount)")
                    : .corrupt("the entropy-coded data of scan \(scan) ends early, at MCU \(mcu) of \(mcuCount)"))
            }
            guard ok else { throw error(.corrupt("bad Huffman data in scan \(scan), MCU \(mcu)")) }
        }
        return reader.pos
    }

    /// Consumes the RSTn marker expected after `mcu` MCUs.
    func restart(_ reader: inout BitReader, data: UnsafeBufferPointer<UInt8>, scan: Int, mcu: Int) throws {
        var p = reader.pos
        // Bytes left before the marker are the unused end of the segment; skip them.
        while p < data.count {
            if data[p] == 0xFF, p + 1 < data.count, data[p + 1] != 0x00, data[p + 1] != 0xFF { break }
            p += 1
        }
        guard p + 1 < data.count else { throw error(.truncated("the file ends in scan \(scan) before restart marker at MCU \(mcu)")) }
        guard (0xD0...0xD7).contains(data[p + 1]) else {
            throw error(.corrupt("expected a restart marker in scan \(scan) at MCU \(mcu), found \(markerName(data[p + 1]))"))
        }
        reader.reset()
        reader.pos = p + 2
    }

    // MARK: Block decoders (return false on a Huffman code that is not in the table)

    func decodeBaselineBlock(_ r: inout BitReader, _ sc: ScanComponent, _ block: UnsafeMutablePointer<Int16>) -> Bool {
        guard let t = r.decode(sc.dc!) else { return false }
        let c = sc.component
        c.dcPredictor = Int(Int32(truncatingIfNeeded: c.dcPredictor &+ r.receiveExtend(t)))
        block[0] = Int16(truncatingIfNeeded: c.dcPredictor)
        let ac = sc.ac!
        var k = 1
        while k < 64 {
            guard let rs = r.decode(ac) else { return false }
            let run = rs >> 4, size = rs & 15
            if size == 0 {
                if run != 15 { break }
                k += 16
                continue
            }
            k += run
            if k > 63 { return false }
            block[naturalOrder[k]] = Int16(truncatingIfNeeded: r.receiveExtend(size))
            k += 1
        }
        return true
    }

    func decodeDCFirst(_ r: inout BitReader, _ sc: ScanComponent, _ block: UnsafeMutablePointer<Int16>, al: Int) -> Bool {
        guard let t = r.decode(sc.dc!) else { return false }
        let c = sc.component
        c.dcPredictor = Int(Int32(truncatingIfNeeded: c.dcPredictor &+ r.receiveExtend(t)))
        block[0] = Int16(truncatingIfNeeded: c.dcPredictor << al)
        return true
    }

    func decodeACFirst(_ r: inout BitReader, _ sc: ScanComponent, _ block: UnsafeMutablePointer<Int16>, ss: Int, se: Int, al: Int) -> Bool {
        if eobrun > 0 {
            eobrun -= 1
            return true
        }
        let ac = sc.ac!
        var k = ss
        while k <= se {
            guard let rs = r.decode(ac) else { return false }
            let run = rs >> 4, size = rs & 15
            if size == 0 {
                if run < 15 {
                    // EOBn: this block and the next 2^run - 1 + bits(run) blocks end here.
                    eobrun = (1 << run) - 1 + r.bits(run)
                    break
                }
                k += 16
                continue
            }
            k += run
            if k > 63 { return false }
            block[naturalOrder[k]] = Int16(truncatingIfNeeded: r.receiveExtend(size) << al)
            k += 1
        }
        return true
    }

    /// Successive-approximation refinement of AC coefficients (T.81 G.1.2.3), following
    /// libjpeg's `decode_mcu_AC_refine`.
    func decodeACRefine(_ r: inout BitReader, _ sc: ScanComponent, _ block: UnsafeMutablePointer<Int16>, ss: Int, se: Int, al: Int) -> Bool {
        let p1 = 1 << al, m1 = -1 << al
        var k = ss
        /// Refines an already non-zero coefficient with one correction bit.
        func refine(_ z: Int, _ r: inout BitReader) {
            let coef = Int(block[z])
            if r.bit() != 0 && coef & p1 == 0 {
                block[z] = Int16(truncatingIfNeeded: coef >= 0 ? coef + p1 : coef + m1)
            }
        }
        if eobrun == 0 {
            let ac = sc.ac!
            while k <= se {
                guard let rs = r.decode(ac) else { return false }
                var run = rs >> 4
                let size = rs & 15
                var value = 0
                if size != 0 {
                    // size must be 1 here; libjpeg only warns otherwise.
                    value = r.bit() != 0 ? p1 : m1
                } else if run != 15 {
                    eobrun = 1 << run
                    if run > 0 { eobrun += r.bits(run) }
                    break
                }
                // Skip `run` zero coefficients, refining the non-zero ones passed on the way.
                while k <= se {
                    let z = naturalOrder[k]
                    if block[z] != 0 {
                        refine(z, &r)
                    } else {
                        if run == 0 { break }
                        run -= 1
                    }
                    k += 1
                }
                if value != 0 {
                    if k > 63 { return false }
                    block[naturalOrder[k]] = Int16(truncatingIfNeeded: value)
                }
                k += 1
            }
        }
        if eobrun > 0 {
            // Within an end-of-band run only the non-zero coefficients get correction bits.
            while k <= se {
                let z = naturalOrder[k]
                if block[z] != 0 { refine(z, &r) }
                k += 1
            }
            eobrun -= 1
        }
        return true
    }

    // MARK: - Output

    /// IDCT, upsampling and colour conversion, as libjpeg-turbo does them by default.
    func output(_ frame: Frame) throws -> Image {
        let comps = frame.components
        // Inverse DCT of every block into planes of whole blocks.
        var planes: [[UInt8]] = []
        for c in comps {
            let stride = c.blocksPerLine * 8
            var plane = [UInt8](repeating: 0, count: stride * c.blocksPerColumn * 8)
            let quant = c.quant ?? [Int32](repeating: 0, count: 64)   // a component no scan carried stays 0
            plane.withUnsafeMutableBufferPointer { out in
                let base = out.baseAddress!
                quant.withUnsafeBufferPointer { q in
                    Parallel.chunks(c.blocksPerColumn) { rows in
                        for by in rows {
                            for bx in 0..<c.blocksPerLine {
                                IDCT.islow(c.block(bx, by), q.baseAddress!, base + by * 8 * stride + bx * 8, stride: stride)
                            }
                        }
                    }
                }
            }
            planes.append(plane)
        }

        let width = frame.width, height = frame.height
        let channels = comps.count == 1 ? 1 : 3
        var pixels = [UInt8](repeating: 0, count: width * height * channels)
        // Colour space as libjpeg guesses it (jdapimin.c default_decompress_parms).
        let isRGB: Bool
        if comps.count != 3 || sawJFIF {
            isRGB = false
        } else if let t = adobeTransform {
            isRGB = t == 0
        } else {
            isRGB = comps[0].id == 0x52 && comps[1].id == 0x47 && comps[2].id == 0x42   // 'R' 'G' 'B'
        }
        let upsamplers = comps.enumerated().map { i, c in
            Upsampler(component: c, plane: planes[i], hFactor: frame.hMax / c.h, vFactor: frame.vMax / c.v)
        }
        pixels.withUnsafeMutableBufferPointer { out in
            let base = out.baseAddress!
            Parallel.chunks(height, grain: 16) { rows in
                var rowBuffers = upsamplers.map { _ in [UInt8](repeating: 0, count: width + 8) }
                for y in rows {
                    for i in 0..<upsamplers.count {
                        rowBuffers[i].withUnsafeMutableBufferPointer { upsamplers[i].row(y, into: $0.baseAddress!, width: width) }
                    }
                    let dst = base + y * width * channels
                    if channels == 1 {
                        rowBuffers[0].withUnsafeBufferPointer { dst.update(from: $0.baseAddress!, count: width) }
                    } else if isRGB {
                        for x in 0..<width {
                            dst[3 * x] = rowBuffers[0][x]; dst[3 * x + 1] = rowBuffers[1][x]; dst[3 * x + 2] = rowBuffers[2][x]
                        }
                    } else {
                        YCbCr.toRGB(rowBuffers[0], rowBuffers[1], rowBuffers[2], dst, width: width)
                    }
                }
            }
        }
        return Image(width: width, height: height, channels: channels, pixels: pixels)
    }
}

/// libjpeg-turbo's upsampling of one component to full resolution (jdsample.c): the
/// triangle ("fancy") filters for 2:1 horizontal (when the component is wider than 2
/// samples), 1:2 vertical and 2:2; box replication for every other integral ratio.
/// Neighbours past the component's edge repeat the edge sample, as libjpeg's context rows do.
private struct Upsampler {
    let plane: [UInt8]
    let stride: Int
    let width: Int, height: Int   // the component's real samples
    let hFactor: Int, vFactor: Int
    let fancyH: Bool, fancyV: Bool

    init(component c: Component, plane: [UInt8], hFactor: Int, vFactor: Int) {
        self.plane = plane
        stride = c.blocksPerLine * 8
        width = c.width
        height = c.height
        self.hFactor = hFactor
        self.vFactor = vFactor
        switch (hFactor, vFactor) {
        case (2, 1): fancyH = c.width > 2; fancyV = false
        case (1, 2): fancyH = false; fancyV = true
        case (2, 2): fancyH = c.width > 2; fancyV = fancyH
        default: fancyH = false; fancyV = false
        }
    }

    func row(_ y: Int, into out: UnsafeMutablePointer<UInt8>, width outWidth: Int) {
        plane.withUnsafeBufferPointer { p in
            let base = p.baseAddress!
            let near = min(y / vFactor, height - 1)
            if hFactor == 2 && fancyV {
                // h2v2: vertical 3:1 blend into column sums, then horizontal 3:1 with rounding 8/7.
                let far = y % 2 == 0 ? max(near - 1, 0) : min(near + 1, height - 1)
                let r0 = base + near * stride, r1 = base + far * stride
                @inline(__always) func colsum(_ x: Int) -> Int { Int(r0[x]) * 3 + Int(r1[x]) }
                for x in 0..<(outWidth + 1) / 2 {
                    let this = colsum(x)
                    let last = colsum(max(x - 1, 0)), next = colsum(min(x + 1, width - 1))
                    out[2 * x] = UInt8((this * 3 + last + 8) >> 4)
                    out[2 * x + 1] = UInt8((this * 3 + next + 7) >> 4)
                }
            } else if fancyV {
                // h1v2: vertical 3:1 with rounding bias 1 above, 2 below.
                let above = y % 2 == 0
                let far = above ? max(near - 1, 0) : min(near + 1, height - 1)
                let r0 = base + near * stride, r1 = base + far * stride
                let bias = above ? 1 : 2
                for x in 0..<outWidth { out[x] = UInt8((Int(r0[x]) * 3 + Int(r1[x]) + bias) >> 2) }
            } else if fancyH {
                // h2v1: horizontal 3:1 with rounding bias 1 left, 2 right.
                let r = base + near * stride
                for x in 0..<(outWidth + 1) / 2 {
                    let this = Int(r[x]) * 3
                    out[2 * x] = UInt8((this + Int(r[max(x - 1, 0)]) + 1) >> 2)
                    out[2 * x + 1] = UInt8((this + Int(r[min(x + 1, width - 1)]) + 2) >> 2)
                }
            } else if hFactor == 1 {
                out.update(from: base + near * stride, count: outWidth)
            } else {
                let r = base + near * stride
                for x in 0..<outWidth { out[x] = r[x / hFactor] }
            }
        }
    }
}

/// libjpeg's YCbCr → RGB in 16-bit fixed point (jdcolor.c `build_ycc_rgb_table`).
private enum YCbCr {
    static let scaleBits = 16
    static let half = 1 << (scaleBits - 1)
    static func fix(_ x: Double) -> Int { Int(x * Double(1 << scaleBits) + 0.5) }

    static let crToR: [Int32] = (0..<256).map { Int32((fix(1.40200) * ($0 - 128) + half) >> scaleBits) }
    static let cbToB: [Int32] = (0..<256).map { Int32((fix(1.77200) * ($0 - 128) + half) >> scaleBits) }
    static let crToG: [Int32] = (0..<256).map { Int32(-fix(0.71414) * ($0 - 128)) }
    static let cbToG: [Int32] = (0..<256).map { Int32(-fix(0.34414) * ($0 - 128) + half) }

    static func toRGB(_ y: [UInt8], _ cb: [UInt8], _ cr: [UInt8], _ out: UnsafeMutablePointer<UInt8>, width: Int) {
        crToR.withUnsafeBufferPointer { crR in
        cbToB.withUnsafeBufferPointer { cbB in
        crToG.withUnsafeBufferPointer { crG in
        cbToG.withUnsafeBufferPointer { cbG in
            for x in 0..<width {
                let l = Int32(y[x]), b = Int(cb[x]), r = Int(cr[x])
                out[3 * x] = clamp(l + crR[r])
                out[3 * x + 1] = clamp(l + ((cbG[b] + crG[r]) >> Int32(scaleBits)))
                out[3 * x + 2] = clamp(l + cbB[b])
            }
        }}}}
    }

    @inline(__always)
    static func clamp(_ v: Int32) -> UInt8 { UInt8(truncatingIfNeeded: min(max(v, 0), 255)) }
}

/// libjpeg's accurate integer inverse DCT (jidctint.c `jpeg_idct_islow`: the
/// Loeffler–Ligtenberg–Moschytz algorithm with 13-bit constants and 2 extra bits between
/// the passes), including its output range-limit table.
enum IDCT {
    static let constBits = 13
    static let pass1Bits = 2

    /// Output sample for a descaled value: libjpeg masks it to 10 bits and looks it up, which
    /// clamps [-512, 511] + 128 to [0, 255] (and wraps beyond, as libjpeg does).
    static let rangeLimit: [UInt8] = (0..<1024).map { i in
        let v = (i < 512 ? i : i - 1024) + 128
        return UInt8(min(max(v, 0), 255))
    }

    @inline(__always)
    static func descale(_ x: Int, _ n: Int) -> Int { (x + (1 << (n - 1))) >> n }

    /// One 8x8 block: `coef` in natural order, `quant` the table, output rows `stride` apart.
    static func islow(_ coef: UnsafePointer<Int16>, _ quant: UnsafePointer<Int32>, _ out: UnsafeMutablePointer<UInt8>, stride: Int) {
        var ws = (Int32(0), Int32(0), Int32(0), Int32(0), Int32(0), Int32(0), Int32(0), Int32(0),
                  Int32(0), Int32(0), Int32(0), Int32(0), Int32(0), Int32(0), Int32(0), Int32(0),
                  Int32(0), Int32(0), Int32(0), Int32(0), Int32(0), Int32(0), Int32(0), Int32(0),
                  Int32(0), Int32(0), Int32(0), Int32(0), Int32(0), Int32(0), Int32(0), Int32(0),
                  Int32(0), Int32(0), Int32(0), Int32(0), Int32(0), Int32(0), Int32(0), Int32(0),
                  Int32(0), Int32(0), Int32(0), Int32(0), Int32(0), Int32(0), Int32(0), Int32(0),
                  Int32(0), Int32(0), Int32(0), Int32(0), Int32(0), Int32(0), Int32(0), Int32(0),
                  Int32(0), Int32(0), Int32(0), Int32(0), Int32(0), Int32(0), Int32(0), Int32(0))
        rangeLimit.withUnsafeBufferPointer { limit in
        withUnsafeMutableBytes(of: &ws) { raw in
            let w = raw.baseAddress!.assumingMemoryBound(to: Int32.self)
            // Pass 1: columns, results scaled up by 2^pass1Bits.
            for col in 0..<8 {
                @inline(__always) func dq(_ row: Int) -> Int { Int(coef[row * 8 + col]) * Int(quant[row * 8 + col]) }
                if coef[8 + col] == 0 && coef[16 + col] == 0 && coef[24 + col] == 0 && coef[32 + col] == 0
                    && coef[40 + col] == 0 && coef[48 + col] == 0 && coef[56 + col] == 0 {
                    let dc = Int32(truncatingIfNeeded: dq(0) << pass1Bits)
                    for row in 0..<8 { w[row * 8 + col] = dc }
                    continue
                }
                let r = butterfly(dq(0), dq(1), dq(2), dq(3), dq(4), dq(5), dq(6), dq(7))
                let n = constBits - pass1Bits
                for row in 0..<8 { w[row * 8 + col] = Int32(truncatingIfNeeded: descale(r[row], n)) }
            }
            // Pass 2: rows, descaled by 8 and 2^pass1Bits, then range-limited.
            let n = constBits + pass1Bits + 3
            for row in 0..<8 {
                let v = w + row * 8
                let o = out + row * stride
                if v[1] == 0 && v[2] == 0 && v[3] == 0 && v[4] == 0 && v[5] == 0 && v[6] == 0 && v[7] == 0 {
                    let dc = limit[descale(Int(v[0]), pass1Bits + 3) & 1023]
                    for x in 0..<8 { o[x] = dc }
                    continue
                }
                let r = butterfly(Int(v[0]), Int(v[1]), Int(v[2]), Int(v[3]), Int(v[4]), Int(v[5]), Int(v[6]), Int(v[7]))
                for x in 0..<8 { o[x] = limit[descale(r[x], n) & 1023] }
            }
        }}
    }

    /// The 1-D LL&M transform of jidctint.c; outputs are scaled by 2^constBits.
    @inline(__always)
    static func butterfly(_ i0: Int, _ i1: Int, _ i2: Int, _ i3: Int, _ i4: Int, _ i5: Int, _ i6: Int, _ i7: Int) -> SIMD8<Int> {
        // Even part; the rotator is sqrt(2) * c(-6).
        var z1 = (i2 + i6) * 4433                 // FIX(0.541196100)
        let t2 = z1 + i6 * -15137                 // -FIX(1.847759065)
        let t3 = z1 + i2 * 6270                   // FIX(0.765366865)
        let t0 = (i0 + i4) << constBits
        let t1 = (i0 - i4) << constBits
        let t10 = t0 + t3, t13 = t0 - t3, t11 = t1 + t2, t12 = t1 - t2
        // Odd part; inputs are y7, y5, y3, y1.
        var o0 = i7, o1 = i5, o2 = i3, o3 = i1
        z1 = o0 + o3
        var z2 = o1 + o2, z3 = o0 + o2, z4 = o1 + o3
        let z5 = (z3 + z4) * 9633                 // FIX(1.175875602)
        o0 *= 2446                                // FIX(0.298631336)
        o1 *= 16819                               // FIX(2.053119869)
        o2 *= 25172                               // FIX(3.072711026)
        o3 *= 12299                               // FIX(1.501321110)
        z1 *= -7373                               // -FIX(0.899976223)
        z2 *= -20995                              // -FIX(2.562915447)
        z3 *= -16069                              // -FIX(1.961570560)
        z4 *= -3196                               // -FIX(0.390180644)
        z3 += z5
        z4 += z5
        o0 += z1 + z3
        o1 += z2 + z4
        o2 += z2 + z3
        o3 += z1 + z4
        return SIMD8(t10 + o3, t11 + o2, t12 + o1, t13 + o0, t13 - o0, t12 - o1, t11 - o2, t10 - o3)
    }
}
