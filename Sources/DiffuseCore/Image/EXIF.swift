/// The one EXIF field the pipeline needs: IFD0's Orientation tag, which phones use instead of
/// rotating the pixels. EXIF is metadata, so a malformed block is ignored rather than an error
/// (the image itself is still fine), as viewers do.
enum EXIF {
    /// Orientation (1...8) from a TIFF-structured EXIF block (the payload of PNG's `eXIf` chunk,
    /// or a JPEG APP1 segment after its "Exif\0\0" header); nil when absent or unreadable.
    static func orientation(_ tiff: ArraySlice<UInt8>) -> Int? {
        let b = Array(tiff)
        guard b.count >= 8 else { return nil }
        let little: Bool
        switch (b[0], b[1]) {
        case (0x49, 0x49): little = true    // "II"
        case (0x4D, 0x4D): little = false   // "MM"
        default: return nil
        }
        func u16(_ o: Int) -> Int? {
            guard o >= 0, o + 2 <= b.count else { return nil }
            return little ? Int(b[o]) | Int(b[o + 1]) << 8 : Int(b[o]) << 8 | Int(b[o + 1])
        }
        func u32(_ o: Int) -> Int? {
            guard let lo = u16(little ? o : o + 2), let hi = u16(little ? o + 2 : o) else { return nil }
            return hi << 16 | lo
        }
        guard u16(2) == 42, let ifd = u32(4), let count = u16(ifd) else { return nil }
        for i in 0..<count {
            let entry = ifd + 2 + 12 * i
            guard let tag = u16(entry), let type = u16(entry + 2), let n = u32(entry + 4) else { return nil }
            // Orientation is one SHORT stored inline in the value field.
            if tag == 0x0112, type == 3, n >= 1, let v = u16(entry + 8) {
                return (1...8).contains(v) ? v : nil
            }
        }
        return nil
    }
}
