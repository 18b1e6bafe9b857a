#if canImport(Glibc)
import Glibc
#endif

/// A PyTorch checkpoint (what `torch.save` writes since torch 1.6: `.ckpt`, `.pt`, `.pth`, `.bin`)
/// read as tensors without running any of it.
///
/// The file is a zip archive: `<name>/data.pkl` is a pickle of the saved object, and each tensor's
/// storage is the raw bytes of `<name>/data/<key>`. A pickle is a program: `pickle.load` imports
/// and calls whatever it names, which is how a checkpoint can run code. Here the pickle is only
/// interpreted as data: the few calls a state dict is made of (`_rebuild_tensor_v2`,
/// `_rebuild_parameter`, `OrderedDict`) are recognised, and anything else becomes an opaque value
/// that is never called. That is the same trust `torch.load(weights_only=True)` (what diffusers
/// uses) gives, without its allow-list errors for the harmless extras old checkpoints carry
/// (PyTorch Lightning callbacks, numpy scalars).
///
/// Tensor names are the state dict's keys; a checkpoint that wraps its weights in `state_dict`
/// (Lightning's `.ckpt`) is unwrapped, as diffusers and AUTOMATIC1111 do, and nested dicts are
/// joined with dots (AUTOMATIC1111 embeddings: `string_to_param.*`). Storages stored uncompressed,
/// as torch writes them, are used in place (memory-mapped); strided views are copied.
public final class TorchCheckpointFile: TensorSource {
    public let path: String
    public private(set) var tensorNames: [String] = []
    private let file: MappedFile
    private var entries: [String: PickledTensor] = [:]

    public var origin: String { path }

    /// Whether `path` starts as torch.save's files do: a zip archive, or (before torch 1.6) a
    /// pickle's protocol opcode where a safetensors file has its header length (whose JSON then
    /// starts with `{` at byte 8).
    public static func looksLikeCheckpoint(_ path: String) -> Bool {
        guard let m = try? MappedFile(path: path) else { return false }
        return withExtendedLifetime(m) {
            let b = m.bytes
            return b.starts(with: [0x50, 0x4B, 0x03, 0x04]) || (b.first == 0x80 && (b.count <= 8 || b[8] != 0x7B))
        }
    }

    public init(path: String) throws {
        self.path = path
        file = try MappedFile(path: path)
        let bytes = file.bytes
        if bytes.first == 0x80 {
            throw FileError(path, "is a PyTorch file in the format before torch 1.6 (a bare pickle); re-save it with a newer torch.save, or as .safetensors")
        }
        let archive = try ZipDirectory(bytes, path: path)
        guard let pickleName = archive.names.first(where: { $0.hasSuffix("data.pkl") && $0.split(separator: "/").count <= 2 }) else {
            throw FileError(path, "is not a PyTorch checkpoint (a zip archive without data.pkl)")
        }
        let prefix = String(pickleName.dropLast("data.pkl".count))
        if let order = archive.names.first(where: { $0 == prefix + "byteorder" }),
           let text = String(bytes: try archive.contents(order, bytes), encoding: .utf8), text != "little" {
            throw FileError(path, "stores its tensors \(text)-endian; only little-endian checkpoints are read")
        }
        let root = try Unpickler(try archive.contents(pickleName, bytes), path: path).load()
        // Lightning checkpoints hold the weights under "state_dict".
        var top = root
        if case .dict(let d) = root, let inner = d.value(forKey: "state_dict"), case .dict = inner { top = inner }
        var storages: [String: ZipDirectory.Entry] = [:]
        func collect(_ value: PickleValue, _ name: String) throws {
            switch value {
            case .dict(let d):
                for (key, v) in d.items {
                    guard let k = key.keyString else { continue }
                    try collect(v, name.isEmpty ? k : name + "." + k)
                }
            case .tensor(let t):
                guard let entry = archive.entry(prefix + "data/" + t.storage) else {
                    throw FileError(path, "tensor '\(name)' names storage \(t.storage), which the archive lacks")
                }
                // The last element's index + 1 (a 0-d tensor is one element at its offset).
                let needed = t.shape.contains(0) ? 0 : t.offset + 1 + zip(t.shape, t.strides).reduce(0) { $0 + ($1.0 - 1) * $1.1 }
                guard needed * t.dtype.size <= entry.size else {
                    throw FileError(path, "tensor '\(name)' \(t.shape) reaches past the end of its storage \(t.storage)")
                }
                guard entries[name] == nil else { throw FileError(path, "names two tensors '\(name)'") }
                storages[t.storage] = entry
                tensorNames.append(name)
                entries[name] = t
            default:
                break  // step counts, names, Lightning's callbacks: not tensors
            }
        }
        try collect(top, "")
        if tensorNames.isEmpty { throw FileError(path, "holds no tensors") }
        self.storages = storages
    }

    private var storages: [String: ZipDirectory.Entry] = [:]
    private var inflated: [String: TensorStorage] = [:]
    private let lock = NSLockLite()

    public func info(_ name: String) -> (dtype: DType, shape: [Int])? {
        entries[name].map { ($0.dtype, $0.shape) }
    }

    /// Drops the mapped pages of the tensor's storage (read back from the file if used again), as
    /// `SafeTensorsFile.evict` does.
    public func evict(_ name: String) {
        guard let e = entries[name], let s = storages[e.storage], s.method == 0, let base = file.base else { return }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let start = (s.dataOffset + page - 1) / page * page, end = (s.dataOffset + s.size) / page * page
        if end > start { madvise(base + start, end - start, MADV_DONTNEED) }
    }

    public func tensor(_ name: String) throws -> Tensor {
        guard let e = entries[name], let s = storages[e.storage] else { throw FileError(path, "has no tensor '\(name)'") }
        let storage: TensorStorage
        if s.method == 0 {
            guard let base = file.base else { return Tensor(zeros: e.shape, dtype: e.dtype) }
            storage = TensorStorage(borrowing: base + s.dataOffset, byteCount: s.size, owner: file)
        } else {
            storage = try lock.withLock {
                if let done = inflated[e.storage] { return done }
                let bytes = try ZipDirectory.inflate(s, file.bytes, path: path)
                let t = TensorStorage(byteCount: bytes.count)
                bytes.withUnsafeBytes { t.base.copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
                inflated[e.storage] = t
                return t
            }
        }
        let count = e.shape.reduce(1, *)
        let contiguous = zip(e.shape, e.strides).reversed().reduce((true, 1)) { acc, dim in
            (acc.0 && (dim.0 == 1 || dim.1 == acc.1), acc.1 * dim.0)
        }.0
        let byteOffset = e.offset * e.dtype.size
        if contiguous && Int(bitPattern: storage.base + byteOffset) % e.dtype.size == 0 {
            return Tensor(dtype: e.dtype, shape: e.shape, storage: storage, byteOffset: byteOffset)
        }
        // A strided view (a transpose saved as is) or misaligned bytes: gather into a fresh tensor.
        let out = Tensor(zeros: e.shape, dtype: e.dtype)
        let size = e.dtype.size
        var index = [Int](repeating: 0, count: e.shape.count)
        for i in 0..<count {
            var source = e.offset
            for (d, k) in index.enumerated() { source += k * e.strides[d] }
            (out.raw + i * size).copyMemory(from: storage.base + source * size, byteCount: size)
            var d = e.shape.count - 1
            while d >= 0 {
                index[d] += 1
                if index[d] < e.shape[d] { break }
                index[d] = 0
                d -= 1
            }
        }
        return out
    }
}

/// Weight files by their content, whatever their extension.
public enum TensorFiles {
    /// A PyTorch checkpoint (a zip archive) or a safetensors file, or an index of shards of either.
    public static func open(_ path: String) throws -> TensorSource {
        if path.hasSuffix(".index.json") { return try ShardedTensorFiles(indexPath: path) }
        return TorchCheckpointFile.looksLikeCheckpoint(path) ? try TorchCheckpointFile(path: path) : try SafeTensorsFile(path: path)
    }

    /// The extensions PyTorch checkpoints go by.
    public static let checkpointExtensions = [".bin", ".ckpt", ".pt", ".pth"]
}

// MARK: - Zip

/// The central directory of a zip archive (zip64 included), for reading entries in place.
struct ZipDirectory {
    struct Entry {
        let method: Int
        let dataOffset: Int
        /// Stored bytes (compressed size) and, for deflated entries, the inflated size.
        let size: Int
        let storedSize: Int
    }

    private(set) var names: [String] = []
    private var entries: [String: Entry] = [:]
    let path: String

    func entry(_ name: String) -> Entry? { entries[name] }

    init(_ bytes: UnsafeRawBufferPointer, path: String) throws {
        self.path = path
        func u16(_ at: Int) -> Int { Int(bytes.loadUnaligned(fromByteOffset: at, as: UInt16.self).littleEndian) }
        func u32(_ at: Int) -> Int { Int(bytes.loadUnaligned(fromByteOffset: at, as: UInt32.self).littleEndian) }
        func u64(_ at: Int) -> Int { Int(truncatingIfNeeded: bytes.loadUnaligned(fromByteOffset: at, as: UInt64.self).littleEndian) }
        func corrupt(_ what: String) -> FileError { FileError(path, "is a damaged zip archive (\(what))") }
        // The end-of-central-directory record, at most 64 KiB of comment from the end.
        guard bytes.count >= 22 else { throw corrupt("too short") }
        var eocd = bytes.count - 22
        while eocd >= max(0, bytes.count - 22 - 65535), u32(eocd) != 0x0605_4B50 { eocd -= 1 }
        guard eocd >= 0, u32(eocd) == 0x0605_4B50 else { throw corrupt("no end-of-directory record") }
        var count = u16(eocd + 10), directory = u32(eocd + 16)
        if eocd >= 20, u32(eocd - 20) == 0x0706_4B50 {  // zip64 locator
            let record = u64(eocd - 20 + 8)
            guard record >= 0, record + 56 <= bytes.count, u32(record) == 0x0606_4B50 else { throw corrupt("bad zip64 record") }
            count = u64(record + 32)
            directory = u64(record + 48)
        }
        var at = directory
        for _ in 0..<count {
            guard at >= 0, at + 46 <= bytes.count, u32(at) == 0x0201_4B50 else { throw corrupt("bad directory entry") }
            let method = u16(at + 10)
            var stored = u32(at + 20), size = u32(at + 24), local = u32(at + 42)
            let nameLength = u16(at + 28), extraLength = u16(at + 30), commentLength = u16(at + 32)
            guard at + 46 + nameLength + extraLength <= bytes.count else { throw corrupt("entry past the end") }
            let name = String(decoding: UnsafeRawBufferPointer(rebasing: bytes[(at + 46)..<(at + 46 + nameLength)]), as: UTF8.self)
            // Zip64 sizes and offsets live in extra field 1, in this order, for the fields at 0xFFFFFFFF.
            var extra = at + 46 + nameLength
            let extraEnd = extra + extraLength
            while extra + 4 <= extraEnd {
                let id = u16(extra), length = u16(extra + 2)
                if id == 1 {
                    var field = extra + 4
                    if size == 0xFFFF_FFFF { size = u64(field); field += 8 }
                    if stored == 0xFFFF_FFFF { stored = u64(field); field += 8 }
                    if local == 0xFFFF_FFFF { local = u64(field) }
                }
                extra += 4 + length
            }
            guard local >= 0, local + 30 <= bytes.count, u32(local) == 0x0403_4B50 else { throw corrupt("bad local header for \(name)") }
            let data = local + 30 + u16(local + 26) + u16(local + 28)
            guard data + stored <= bytes.count, stored >= 0, size >= 0 else { throw corrupt("\(name) runs past the end") }
            guard method == 0 || method == 8 else {
                throw FileError(path, "entry \(name) is compressed with method \(method); only stored and deflated entries are read")
            }
            names.append(name)
            entries[name] = Entry(method: method, dataOffset: data, size: method == 0 ? stored : size, storedSize: stored)
            at += 46 + nameLength + extraLength + commentLength
        }
    }

    /// An entry's bytes (inflated when deflated).
    func contents(_ name: String, _ bytes: UnsafeRawBufferPointer) throws -> [UInt8] {
        let e = entries[name]!
        if e.method == 0 { return Array(bytes[e.dataOffset..<(e.dataOffset + e.size)]) }
        return try Self.inflate(e, bytes, path: path)
    }

    static func inflate(_ e: Entry, _ bytes: UnsafeRawBufferPointer, path: String) throws -> [UInt8] {
        let out = try Zlib.inflate(Array(bytes[e.dataOffset..<(e.dataOffset + e.storedSize)]), format: .raw, limit: e.size)
        guard out.count == e.size else { throw FileError(path, "a deflated entry inflates to \(out.count) bytes, not \(e.size)") }
        return out
    }
}

// MARK: - Pickle

/// What a checkpoint's pickle is made of, as data.
indirect enum PickleValue {
    case none
    case bool(Bool)
    case int(Int)
    case float(Double)
    case string(String)
    case bytes([UInt8])
    case tuple([PickleValue])
    case list(PickleList)
    case dict(PickleDict)
    /// A class or function the pickle names (never imported or called).
    case global(String)
    /// A torch storage: its element type and archive key.
    case storage(dtype: DType?, key: String, typeName: String)
    case tensor(PickledTensor)
    /// The result of calling or building something not modelled here.
    case opaque(String)

    var keyString: String? {
        switch self {
        case .string(let s): return s
        case .int(let i): return String(i)
        default: return nil
        }
    }
}

/// A tensor as `_rebuild_tensor_v2` describes it: a view into a storage of the archive.
struct PickledTensor {
    let dtype: DType
    let shape: [Int]
    let strides: [Int]
    /// In elements from the storage's start.
    let offset: Int
    /// The storage's archive key (`data/<key>`).
    let storage: String
}

final class PickleList { var items: [PickleValue] = [] }

final class PickleDict {
    var items: [(PickleValue, PickleValue)] = []
    func value(forKey key: String) -> PickleValue? { items.first { $0.0.keyString == key }?.1 }
}

/// A pickle interpreter (protocols 2 to 5) that builds values and never calls anything.
struct Unpickler {
    let data: [UInt8]
    let path: String

    init(_ data: [UInt8], path: String) {
        self.data = data
        self.path = path
    }

    /// torch's storage classes and the element types they hold.
    static let storageTypes: [String: DType] = [
        "FloatStorage": .float32, "HalfStorage": .float16, "BFloat16Storage": .bfloat16, "DoubleStorage": .float64,
        "LongStorage": .int64, "IntStorage": .int32, "CharStorage": .int8, "ByteStorage": .uint8, "BoolStorage": .bool,
    ]

    func load() throws -> PickleValue {
        var stack: [PickleValue] = []
        var marks: [Int] = []
        var memo: [Int: PickleValue] = [:]
        var i = 0
        func fail(_ why: String) -> FileError { FileError(path, "has a malformed pickle (\(why) at byte \(i))") }
        func take(_ n: Int) throws -> ArraySlice<UInt8> {
            guard n >= 0, i + n <= data.count else { throw fail("truncated") }
            defer { i += n }
            return data[i..<(i + n)]
        }
        func le(_ n: Int) throws -> Int {
            try take(n).reversed().reduce(0) { $0 << 8 | Int($1) }
        }
        func pop() throws -> PickleValue {
            guard let v = stack.popLast() else { throw fail("empty stack") }
            return v
        }
        func popMark() throws -> [PickleValue] {
            guard let m = marks.popLast(), m <= stack.count else { throw fail("no mark") }
            defer { stack.removeSubrange(m...) }
            return Array(stack[m...])
        }
        func text(_ n: Int) throws -> String { String(decoding: try take(n), as: UTF8.self) }
        func setItems(_ target: PickleValue, _ pairs: [PickleValue]) throws {
            guard case .dict(let d) = target else { return }  // items for an opaque object: dropped
            guard pairs.count % 2 == 0 else { throw fail("odd SETITEMS") }
            for k in stride(from: 0, to: pairs.count, by: 2) { d.items.append((pairs[k], pairs[k + 1])) }
        }
        func call(_ callable: PickleValue, _ args: PickleValue) throws -> PickleValue {
            guard case .global(let name) = callable else { return .opaque("call") }
            let a: [PickleValue]
            if case .tuple(let t) = args { a = t } else { a = [] }
            switch name {
            case "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor":
                guard a.count >= 4, case .storage(let dtype, let key, let typeName) = a[0], case .int(let offset) = a[1],
                      case .tuple(let size) = a[2], case .tuple(let stride) = a[3] else { throw fail("unexpected _rebuild_tensor_v2 arguments") }
                guard let dtype else { throw FileError(path, "holds a tensor of torch.\(typeName), which is not read") }
                let ints = { (v: [PickleValue]) -> [Int] in v.compactMap { if case .int(let x) = $0 { return x } else { return nil } } }
                let shape = ints(size), strides = ints(stride)
                guard shape.count == size.count, strides.count == shape.count, shape.allSatisfy({ $0 >= 0 }), offset >= 0 else {
                    throw fail("bad tensor shape")
                }
                return .tensor(PickledTensor(dtype: dtype, shape: shape, strides: strides, offset: offset, storage: key))
            case "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state":
                return a.first ?? .none
            case "collections.OrderedDict", "builtins.dict":
                let d = PickleDict()
                if case .list(let l)? = a.first {
                    for case .tuple(let pair) in l.items where pair.count == 2 { d.items.append((pair[0], pair[1])) }
                }
                return .dict(d)
            default:
                return .opaque(name)
            }
        }

        while i < data.count {
            let op = data[i]
            i += 1
            switch op {
            case 0x80: _ = try take(1)                                   // PROTO
            case 0x95: _ = try take(8)                                   // FRAME
            case 0x2E: return try pop()                                  // STOP
            case 0x28: marks.append(stack.count)                         // MARK
            case 0x7D: stack.append(.dict(PickleDict()))                 // EMPTY_DICT
            case 0x5D, 0x8F: stack.append(.list(PickleList()))           // EMPTY_LIST, EMPTY_SET
            case 0x29: stack.append(.tuple([]))                          // EMPTY_TUPLE
            case 0x64:                                                   // DICT
                let d = PickleDict()
                try setItems(.dict(d), try popMark())
                stack.append(.dict(d))
            case 0x6C, 0x91:                                             // LIST, FROZENSET
                let l = PickleList()
                l.items = try popMark()
                stack.append(.list(l))
            case 0x74: stack.append(.tuple(try popMark()))               // TUPLE
            case 0x85: stack.append(.tuple([try pop()]))                 // TUPLE1
            case 0x86:                                                   // TUPLE2
                let b = try pop(), a = try pop()
                stack.append(.tuple([a, b]))
            case 0x87:                                                   // TUPLE3
                let c = try pop(), b = try pop(), a = try pop()
                stack.append(.tuple([a, b, c]))
            case 0x73:                                                   // SETITEM
                let v = try pop(), k = try pop()
                guard let target = stack.last else { throw fail("empty stack") }
                try setItems(target, [k, v])
            case 0x75:                                                   // SETITEMS
                let pairs = try popMark()
                guard let target = stack.last else { throw fail("empty stack") }
                try setItems(target, pairs)
            case 0x61:                                                   // APPEND
                let v = try pop()
                if case .list(let l)? = stack.last { l.items.append(v) }
            case 0x65, 0x90:                                             // APPENDS, ADDITEMS
                let items = try popMark()
                if case .list(let l)? = stack.last { l.items += items }
            case 0x71: memo[try le(1)] = stack.last                      // BINPUT
            case 0x72: memo[try le(4)] = stack.last                      // LONG_BINPUT
            case 0x94: memo[memo.count] = stack.last                     // MEMOIZE
            case 0x68, 0x6A:                                             // BINGET, LONG_BINGET
                let k = try le(op == 0x68 ? 1 : 4)
                guard let v = memo[k] else { throw fail("unknown memo \(k)") }
                stack.append(v)
            case 0x63:                                                   // GLOBAL
                guard let nl = data[i...].firstIndex(of: 0x0A), let nl2 = data[(nl + 1)...].firstIndex(of: 0x0A) else { throw fail("bad GLOBAL") }
                let module = String(decoding: data[i..<nl], as: UTF8.self), name = String(decoding: data[(nl + 1)..<nl2], as: UTF8.self)
                i = nl2 + 1
                stack.append(.global(module + "." + name))
            case 0x93:                                                   // STACK_GLOBAL
                let name = try pop(), module = try pop()
                stack.append(.global("\(module.keyString ?? "?").\(name.keyString ?? "?")"))
            case 0x4A: stack.append(.int(Int(Int32(truncatingIfNeeded: try le(4)))))   // BININT
            case 0x4B: stack.append(.int(try le(1)))                     // BININT1
            case 0x4D: stack.append(.int(try le(2)))                     // BININT2
            case 0x8A, 0x8B:                                             // LONG1, LONG4
                let n = try le(op == 0x8A ? 1 : 4)
                let raw = try take(n)
                guard n <= 8 else { stack.append(.opaque("long")); continue }
                var v = raw.reversed().reduce(0) { $0 << 8 | Int($1) }
                if n > 0 && n < 8 && raw.last! & 0x80 != 0 { v -= 1 << (8 * n) }
                stack.append(.int(v))
            case 0x47:                                                   // BINFLOAT (big-endian)
                let bits = try take(8).reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
                stack.append(.float(Double(bitPattern: bits)))
            case 0x58, 0x54: stack.append(.string(try text(try le(4))))  // BINUNICODE, BINSTRING
            case 0x8C, 0x55: stack.append(.string(try text(try le(1))))  // SHORT_BINUNICODE, SHORT_BINSTRING
            case 0x8D: stack.append(.string(try text(try le(8))))        // BINUNICODE8
            case 0x42: stack.append(.bytes(Array(try take(try le(4)))))  // BINBYTES
            case 0x43: stack.append(.bytes(Array(try take(try le(1)))))  // SHORT_BINBYTES
            case 0x8E: stack.append(.bytes(Array(try take(try le(8)))))  // BINBYTES8
            case 0x4E: stack.append(.none)                               // NONE
            case 0x88: stack.append(.bool(true))                         // NEWTRUE
            case 0x89: stack.append(.bool(false))                        // NEWFALSE
            case 0x52:                                                   // REDUCE
                let args = try pop(), callable = try pop()
                stack.append(try call(callable, args))
            case 0x81:                                                   // NEWOBJ
                let args = try pop(), cls = try pop()
                stack.append(try call(cls, args))
            case 0x92:                                                   // NEWOBJ_EX
                _ = try pop()
                let args = try pop(), cls = try pop()
                stack.append(try call(cls, args))
            case 0x62:                                                   // BUILD: object state, not weights
                let state = try pop()
                if case .dict(let d)? = stack.last, case .dict(let s) = state { d.items += s.items }
            case 0x51:                                                   // BINPERSID
                let pid = try pop()
                guard case .tuple(let t) = pid, t.count >= 3, t[0].keyString == "storage", case .global(let type) = t[1],
                      let key = t[2].keyString else { throw fail("a persistent id that is not a torch storage") }
                let typeName = String(type.split(separator: ".").last ?? "")
                stack.append(.storage(dtype: Self.storageTypes[typeName], key: key, typeName: typeName))
            case 0x30: _ = try pop()                                     // POP
            case 0x31: _ = try popMark()                                 // POP_MARK
            case 0x32:                                                   // DUP
                guard let top = stack.last else { throw fail("empty stack") }
                stack.append(top)
            default:
                throw fail("unsupported opcode 0x" + String(op, radix: 16))
            }
        }
        throw fail("no STOP")
    }
}
