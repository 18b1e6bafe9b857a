#if canImport(Glibc)
import Glibc
#endif
/// Everything that can be wrong with a safetensors file, each naming the file and, where it
/// applies, the tensor.
public enum SafeTensorsError: Error, CustomStringConvertible, Equatable {
    case truncated(file: String, size: Int)
    case headerPastEnd(file: String, headerLength: UInt64, fileSize: Int)
    case invalidHeader(file: String, detail: String)
    case duplicateName(file: String, tensor: String)
    case unknownDType(file: String, tensor: String, dtype: String)
    case invalidEntry(file: String, tensor: String, detail: String)
    case offsetsOutOfRange(file: String, tensor: String, begin: Int, end: Int, dataSize: Int)
    case overlapping(file: String, tensor: String, other: String)
    case sizeMismatch(file: String, tensor: String, shape: [Int], dtype: DType, expected: Int, actual: Int)
    case missingTensor(file: String, tensor: String)

    public var description: String {
        switch self {
        case let .truncated(f, size):
            return "\(f): truncated safetensors file (\(size) bytes, shorter than the 8-byte header length)"
        case let .headerPastEnd(f, n, size):
            return "\(f): safetensors header length \(n) runs past the end of the file (\(size) bytes); the file is truncated or not safetensors"
        case let .invalidHeader(f, d):
            return "\(f): invalid safetensors header: \(d)"
        case let .duplicateName(f, t):
            return "\(f): tensor '\(t)' appears twice in the header"
        case let .unknownDType(f, t, d):
            return "\(f): tensor '\(t)' has unknown dtype '\(d)'"
        case let .invalidEntry(f, t, d):
            return "\(f): tensor '\(t)': \(d)"
        case let .offsetsOutOfRange(f, t, b, e, n):
            return "\(f): tensor '\(t)' has data offsets [\(b), \(e)) outside the \(n)-byte data section (truncated file?)"
        case let .overlapping(f, t, o):
            return "\(f): tensors '\(o)' and '\(t)' overlap in the data section"
        case let .sizeMismatch(f, t, shape, dtype, expected, actual):
            return "\(f): tensor '\(t)' of shape \(shape) and dtype \(dtype) needs \(expected) bytes but its offsets span \(actual)"
        case let .missingTensor(f, t):
            return "\(f): no tensor named '\(t)'"
        }
    }
}

/// A source of named tensors: a safetensors file, a sharded checkpoint, random weights, or a
/// renaming view over another source.
public protocol TensorSource: AnyObject {
    /// Where the tensors come from, for error messages.
    var origin: String { get }
    /// Every tensor name, in a stable order.
    var tensorNames: [String] { get }
    /// dtype and shape, without reading data.
    func info(_ name: String) -> (dtype: DType, shape: [Int])?
    /// The tensor's data (zero-copy where possible).
    func tensor(_ name: String) throws -> Tensor
    /// A hint that the tensor's data will not be read again soon (a backend has its own copy):
    /// memory-mapped sources drop its pages, which otherwise count as resident memory.
    func evict(_ name: String)
}

extension TensorSource {
    public func evict(_ name: String) {}
}

/// One safetensors file, memory-mapped. Tensors are handed out without copying.
public final class SafeTensorsFile: TensorSource {
    public struct Entry: Sendable {
        public let dtype: DType
        public let shape: [Int]
        public let begin: Int
        public let end: Int
    }

    public let path: String
    public let names: [String]
    public let entries: [String: Entry]
    public let metadata: [(String, String)]
    private let file: MappedFile
    private let dataStart: Int

    public var origin: String { path }
    public var tensorNames: [String] { names }

    public init(path: String) throws {
        self.path = path
        file = try MappedFile(path: path)
        let bytes = file.bytes
        guard bytes.count >= 8 else { throw SafeTensorsError.truncated(file: path, size: bytes.count) }
        let n = bytes.loadUnaligned(as: UInt64.self).littleEndian
        guard n <= UInt64(bytes.count - 8) else {
            throw SafeTensorsError.headerPastEnd(file: path, headerLength: n, fileSize: bytes.count)
        }
        dataStart = 8 + Int(n)
        let dataSize = bytes.count - dataStart
        let header: JSON
        do {
            header = try JSON.parse(UnsafeRawBufferPointer(rebasing: bytes[8..<dataStart]), rejectDuplicateKeys: true)
        } catch let e as JSON.ParseError {
            if e.message.hasPrefix("duplicate key") {
                let name = String(e.message.dropFirst("duplicate key \"".count).dropLast())
                throw SafeTensorsError.duplicateName(file: path, tensor: name)
            }
            throw SafeTensorsError.invalidHeader(file: path, detail: "not valid JSON (\(e))")
        }
        guard let members = header.members else {
            throw SafeTensorsError.invalidHeader(file: path, detail: "the header is not a JSON object")
        }
        var names: [String] = []
        var entries: [String: Entry] = [:]
        var meta: [(String, String)] = []
        for (name, value) in members {
            if name == "__metadata__" {
                guard let m = value.members else {
                    throw SafeTensorsError.invalidHeader(file: path, detail: "__metadata__ is not an object")
                }
                for (k, v) in m {
                    guard let s = v.string else {
                        throw SafeTensorsError.invalidHeader(file: path, detail: "__metadata__ value for '\(k)' is not a string")
                    }
                    meta.append((k, s))
                }
                continue
            }
            guard value.members != nil else {
                throw SafeTensorsError.invalidEntry(file: path, tensor: name, detail: "entry is not an object")
            }
            guard let dtypeName = value["dtype"]?.string else {
                throw SafeTensorsError.invalidEntry(file: path, tensor: name, detail: "missing 'dtype'")
            }
            guard let dtype = DType(rawValue: dtypeName) else {
                throw SafeTensorsError.unknownDType(file: path, tensor: name, dtype: dtypeName)
            }
            guard let shapeJSON = value["shape"]?.array else {
                throw SafeTensorsError.invalidEntry(file: path, tensor: name, detail: "missing or invalid 'shape'")
            }
            var shape: [Int] = []
            for d in shapeJSON {
                guard let v = d.int, v >= 0 else {
                    throw SafeTensorsError.invalidEntry(file: path, tensor: name, detail: "shape \(shapeJSON.map(\.description)) has an invalid dimension")
                }
                shape.append(v)
            }
            guard let offs = value["data_offsets"]?.array, offs.count == 2, let b = offs[0].int, let e = offs[1].int else {
                throw SafeTensorsError.invalidEntry(file: path, tensor: name, detail: "missing or invalid 'data_offsets'")
            }
            guard b >= 0, e >= b, e <= dataSize else {
                throw SafeTensorsError.offsetsOutOfRange(file: path, tensor: name, begin: b, end: e, dataSize: dataSize)
            }
            let (elements, overflow) = shape.reduce((1, false)) { acc, d in
                let (m, o) = acc.0.multipliedReportingOverflow(by: d)
                return (m, acc.1 || o)
            }
            let expected = overflow ? Int.max : elements.multipliedReportingOverflow(by: dtype.size).partialValue
            guard !overflow, expected == e - b else {
                throw SafeTensorsError.sizeMismatch(file: path, tensor: name, shape: shape, dtype: dtype,
                                                    expected: expected, actual: e - b)
            }
            names.append(name)
            entries[name] = Entry(dtype: dtype, shape: shape, begin: b, end: e)
        }
        // Overlap: sort by start; each tensor must begin at or after the previous one's end.
        let byStart = names.filter { entries[$0]!.end > entries[$0]!.begin }.sorted { entries[$0]!.begin < entries[$1]!.begin }
        for (a, b) in zip(byStart, byStart.dropFirst()) where entries[b]!.begin < entries[a]!.end {
            throw SafeTensorsError.overlapping(file: path, tensor: b, other: a)
        }
        self.names = names
        self.entries = entries
        self.metadata = meta
    }

    public func info(_ name: String) -> (dtype: DType, shape: [Int])? {
        entries[name].map { ($0.dtype, $0.shape) }
    }

    /// Drops the mapped pages that lie wholly inside the tensor's bytes (they are read back
    /// from the file if the tensor is used again).
    public func evict(_ name: String) {
        guard let e = entries[name], let base = file.base else { return }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let start = (dataStart + e.begin + page - 1) / page * page, end = (dataStart + e.end) / page * page
        if end > start { madvise(base + start, end - start, MADV_DONTNEED) }
    }

    public func tensor(_ name: String) throws -> Tensor {
        guard let e = entries[name] else { throw SafeTensorsError.missingTensor(file: path, tensor: name) }
        let count = e.end - e.begin
        guard count > 0, let base = file.base else { return Tensor(zeros: e.shape, dtype: e.dtype) }
        let p = base + dataStart + e.begin
        if Int(bitPattern: p) % e.dtype.size != 0 {
            // Misaligned data (a header length that is not a multiple of 8): copy once.
            let t = Tensor(zeros: e.shape, dtype: e.dtype)
            t.raw.copyMemory(from: p, byteCount: count)
            return t
        }
        return Tensor(dtype: e.dtype, shape: e.shape,
                      storage: TensorStorage(borrowing: p, byteCount: count, owner: file))
    }
}

public enum SafeTensors {
    /// Serializes tensors (in the given order) with optional `__metadata__`, as the safetensors
    /// library does: little-endian header length, JSON header padded with spaces to 8 bytes.
    public static func serialize(_ tensors: [(String, Tensor)], metadata: [(String, String)] = []) -> [UInt8] {
        var members: [(String, JSON)] = []
        if !metadata.isEmpty { members.append(("__metadata__", .object(metadata.map { ($0.0, .string($0.1)) }))) }
        var offset = 0
        for (name, t) in tensors {
            members.append((name, .object([
                ("dtype", .string(t.dtype.rawValue)),
                ("shape", .array(t.shape.map { .number(Double($0)) })),
                ("data_offsets", .array([.number(Double(offset)), .number(Double(offset + t.byteCount))])),
            ])))
            offset += t.byteCount
        }
        var header = Array(JSON.object(members).serialized().utf8)
        while header.count % 8 != 0 { header.append(0x20) }
        var out: [UInt8] = []
        out.reserveCapacity(8 + header.count + offset)
        withUnsafeBytes(of: UInt64(header.count).littleEndian) { out.append(contentsOf: $0) }
        out.append(contentsOf: header)
        for (_, t) in tensors {
            out.append(contentsOf: UnsafeRawBufferPointer(start: t.raw, count: t.byteCount))
        }
        return out
    }

    public static func write(_ tensors: [(String, Tensor)], metadata: [(String, String)] = [], to path: String,
                             overwrite: Bool = true) throws {
        try Files.write(serialize(tensors, metadata: metadata), to: path, overwrite: overwrite)
    }

    /// Opens a `.safetensors` file or a sharded checkpoint's `.safetensors.index.json`.
    public static func open(_ path: String) throws -> TensorSource {
        path.hasSuffix(".index.json") ? try ShardedTensorFiles(indexPath: path) : try SafeTensorsFile(path: path)
    }
}

/// A checkpoint split over several files, described by `*.safetensors.index.json` (or, for
/// PyTorch shards, `*.bin.index.json`): `{"metadata": ..., "weight_map": {tensor: file}}`.
public final class ShardedTensorFiles: TensorSource {
    public let indexPath: String
    public let shards: [TensorSource]
    private let shardOf: [String: Int]
    public let tensorNames: [String]
    public var origin: String { indexPath }

    public init(indexPath: String) throws {
        self.indexPath = indexPath
        let index = try Files.readJSON(indexPath)
        guard let map = index["weight_map"]?.members else {
            throw FileError(indexPath, "has no \"weight_map\" object")
        }
        let dir = indexPath.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
        var files: [String] = []
        var fileIndex: [String: Int] = [:]
        var expected: [(String, String)] = []
        for (tensor, file) in map {
            guard let f = file.string else { throw FileError(indexPath, "weight_map entry for '\(tensor)' is not a file name") }
            if fileIndex[f] == nil { fileIndex[f] = files.count; files.append(f) }
            expected.append((tensor, f))
        }
        var shards: [TensorSource] = []
        for f in files {
            let p = Files.join(dir.isEmpty ? "." : dir, f)
            guard Files.exists(p) else { throw FileError(p, "shard listed in \(indexPath) is missing") }
            shards.append(try TensorFiles.open(p))
        }
        var shardOf: [String: Int] = [:]
        var names: [String] = []
        for (tensor, f) in expected {
            let s = fileIndex[f]!
            guard shards[s].info(tensor) != nil else {
                throw SafeTensorsError.missingTensor(file: shards[s].origin, tensor: tensor)
            }
            shardOf[tensor] = s
            names.append(tensor)
        }
        self.shards = shards
        self.shardOf = shardOf
        self.tensorNames = names
    }

    public func info(_ name: String) -> (dtype: DType, shape: [Int])? {
        shardOf[name].flatMap { shards[$0].info(name) }
    }

    public func tensor(_ name: String) throws -> Tensor {
        guard let s = shardOf[name] else { throw SafeTensorsError.missingTensor(file: indexPath, tensor: name) }
        return try shards[s].tensor(name)
    }

    public func evict(_ name: String) {
        if let s = shardOf[name] { shards[s].evict(name) }
    }
}
