#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import FoundationEssentials

/// A file-system error that names the path.
public struct FileError: Error, CustomStringConvertible {
    public let path: String
    public let reason: String
    public init(_ path: String, _ reason: String) { self.path = path; self.reason = reason }
    public var description: String { "\(path): \(reason)" }
}

/// A read-only memory mapping of a whole file; unmapped when the last tensor using it goes away.
public final class MappedFile: @unchecked Sendable {
    public let path: String
    public let base: UnsafeMutableRawPointer?
    public let size: Int

    public init(path: String) throws {
        self.path = path
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw FileError(path, "cannot open (\(String(cString: strerror(errno))))") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw FileError(path, "cannot stat (\(String(cString: strerror(errno))))") }
        if (st.st_mode & S_IFMT) == S_IFDIR { throw FileError(path, "is a directory, not a file") }
        size = Int(st.st_size)
        if size == 0 { base = nil; return }
        let p = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0)
        guard let p, p != MAP_FAILED else { throw FileError(path, "cannot map (\(String(cString: strerror(errno))))") }
        base = p
    }

    public var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: base, count: size) }

    deinit { if let base { munmap(base, size) } }
}

public enum Files {
    public static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    public static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }

    public static func read(_ path: String) throws -> [UInt8] {
        let m = try MappedFile(path: path)
        if m.size > 0 { return Array(m.bytes) }
        // Size 0 may mean a file whose size is not known in advance (/proc): read until EOF.
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw FileError(path, "cannot open (\(String(cString: strerror(errno))))") }
        defer { close(fd) }
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 { throw FileError(path, "read failed (\(String(cString: strerror(errno))))") }
            if n == 0 { break }
            out.append(contentsOf: chunk[0..<n])
        }
        return out
    }

    public static func readText(_ path: String) throws -> String {
        let bytes = try read(path)
        guard let s = String(validating: bytes, as: UTF8.self) else { throw FileError(path, "is not valid UTF-8 text") }
        return s
    }

    /// Reads and parses a JSON file; errors name the file.
    public static func readJSON(_ path: String) throws -> JSON {
        let bytes = try read(path)
        do { return try JSON.parse(bytes) } catch let e as JSON.ParseError {
            throw FileError(path, "invalid JSON: \(e)")
        }
    }

    /// Entries of a directory, sorted by name.
    public static func list(_ path: String) throws -> [String] {
        do { return try FileManager.default.contentsOfDirectory(atPath: path).sorted() } catch {
            throw FileError(path, "cannot list directory")
        }
    }

    /// Writes `bytes` through a temporary file and a rename, so a failure never leaves a
    /// half-written file, and an existing file is replaced only when `overwrite` is set.
    public static func write(_ bytes: UnsafeRawBufferPointer, to path: String, overwrite: Bool = true) throws {
        if !overwrite && exists(path) { throw FileError(path, "already exists (pass --overwrite to replace it)") }
        let tmp = path + ".tmp-\(getpid())"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        guard fd >= 0 else { throw FileError(path, "cannot create (\(String(cString: strerror(errno))))") }
        var done = 0
        while done < bytes.count {
            let n = Glibc.write(fd, bytes.baseAddress! + done, bytes.count - done)
            if n <= 0 {
                let reason = String(cString: strerror(errno))
                close(fd); unlink(tmp)
                throw FileError(path, "write failed (\(reason))")
            }
            done += n
        }
        close(fd)
        if !overwrite {
            // link() fails if the target appeared meanwhile: never clobber.
            guard link(tmp, path) == 0 else {
                let reason = String(cString: strerror(errno))
                unlink(tmp)
                throw FileError(path, "cannot write (\(reason))")
            }
            unlink(tmp)
        } else if rename(tmp, path) != 0 {
            let reason = String(cString: strerror(errno))
            unlink(tmp)
            throw FileError(path, "cannot write (\(reason))")
        }
    }

    public static func write(_ bytes: [UInt8], to path: String, overwrite: Bool = true) throws {
        try bytes.withUnsafeBytes { try write($0, to: path, overwrite: overwrite) }
    }

    public static func createDirectory(_ path: String) throws {
        do { try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true) } catch {
            throw FileError(path, "cannot create directory")
        }
    }

    public static func join(_ parts: String...) -> String {
        var out = ""
        for p in parts where !p.isEmpty {
            if p.hasPrefix("/") || out.isEmpty { out = p } else { out += (out.hasSuffix("/") ? "" : "/") + p }
        }
        return out
    }

    /// The last component of a path (the path itself when it has no "/"), for messages and records.
    public static func lastComponent(_ path: String) -> String {
        path.split(separator: "/").last.map(String.init) ?? path
    }

    /// The folder holding `path` ("." for a bare name).
    public static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    public static func environment(_ name: String) -> String? {
        guard let v = getenv(name) else { return nil }
        return String(cString: v)
    }
}
