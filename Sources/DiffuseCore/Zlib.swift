import CZlib

public struct CompressionError: Error, CustomStringConvertible {
    public let message: String
    public var description: String { message }
}

/// zlib/gzip streams through the system zlib.
public enum Zlib {
    public enum Format {
        /// RFC 1950 (zlib header; PNG's IDAT)
        case zlib
        /// RFC 1952 (.gz files)
        case gzip
        /// zlib or gzip, detected from the header
        case auto
        /// RFC 1951 with no header (zip archives' deflated entries)
        case raw
    }

    /// Decompresses a whole stream, or only its first `limit` bytes: decoders that know how much
    /// they need (PNG image data, text chunks) stop there, so a decompression bomb cannot
    /// exhaust memory.
    public static func inflate(_ input: [UInt8], format: Format = .auto, limit: Int = .max) throws -> [UInt8] {
        var stream = z_stream()
        let windowBits: Int32
        switch format {
        case .zlib: windowBits = 15
        case .gzip: windowBits = 15 + 16
        case .auto: windowBits = 15 + 32
        case .raw: windowBits = -15
        }
        guard inflateInit2_(&stream, windowBits, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
            throw CompressionError(message: "zlib: cannot initialise inflate")
        }
        defer { inflateEnd(&stream) }
        var out: [UInt8] = []
        out.reserveCapacity(min(input.count * 4, limit))
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        var status: Int32 = Z_OK
        try input.withUnsafeBufferPointer { inp in
            stream.next_in = UnsafeMutablePointer(mutating: inp.baseAddress)
            stream.avail_in = UInt32(inp.count)
            repeat {
                status = chunk.withUnsafeMutableBufferPointer { c -> Int32 in
                    stream.next_out = c.baseAddress
                    stream.avail_out = UInt32(c.count)
                    return CZlib.inflate(&stream, Z_NO_FLUSH)
                }
                guard status == Z_OK || status == Z_STREAM_END else {
                    throw CompressionError(message: "corrupt compressed data (zlib status \(status))")
                }
                out.append(contentsOf: chunk[0..<(chunk.count - Int(stream.avail_out))])
                if out.count >= limit {
                    out.removeSubrange(limit...)
                    return
                }
                if status == Z_OK && stream.avail_in == 0 && stream.avail_out != 0 {
                    throw CompressionError(message: "compressed data ends early (truncated file?)")
                }
            } while status != Z_STREAM_END
        }
        return out
    }

    /// Compresses to a zlib stream (RFC 1950).
    public static func deflate(_ input: [UInt8], level: Int32 = 6) throws -> [UInt8] {
        var stream = z_stream()
        guard deflateInit_(&stream, level, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
            throw CompressionError(message: "zlib: cannot initialise deflate")
        }
        defer { deflateEnd(&stream) }
        let bound = Int(deflateBound(&stream, UInt(input.count)))
        var out = [UInt8](repeating: 0, count: bound)
        let produced: Int = try input.withUnsafeBufferPointer { inp in
            try out.withUnsafeMutableBufferPointer { o in
                stream.next_in = UnsafeMutablePointer(mutating: inp.baseAddress)
                stream.avail_in = UInt32(inp.count)
                stream.next_out = o.baseAddress
                stream.avail_out = UInt32(o.count)
                guard CZlib.deflate(&stream, Z_FINISH) == Z_STREAM_END else {
                    throw CompressionError(message: "zlib: deflate failed")
                }
                return o.count - Int(stream.avail_out)
            }
        }
        return Array(out[0..<produced])
    }

    /// CRC-32 as PNG chunks use it.
    public static func crc32(_ bytes: [UInt8], initial: UInt = 0) -> UInt32 {
        bytes.withUnsafeBufferPointer { UInt32(CZlib.crc32(initial, $0.baseAddress, UInt32($0.count))) }
    }
}
