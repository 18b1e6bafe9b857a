import DiffuseCore
import DiffusePipelines
import FoundationEssentials
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The reference's diffusers pipeline folders (`models/<variant>` with a model_index.json).
struct ReferenceModel: CustomTestStringConvertible, Sendable {
    let variant: String
    let folder: String
    var testDescription: String { variant }

    static func all() throws -> [ReferenceModel] {
        let models = Fixtures.reference("models")
        return try Files.list(models).compactMap { name in
            let folder = Files.join(models, name)
            return Files.exists(Files.join(folder, "model_index.json")) ? ReferenceModel(variant: name, folder: folder) : nil
        }
    }

    /// The models the original single-file layout can hold: an LCM-distilled UNet's guidance
    /// embedding (`time_embedding.cond_proj`) has no name there, in diffusers' single-file
    /// loader either, so such models only come as folders.
    static func withOriginalLayout() throws -> [ReferenceModel] {
        try all().filter { model in
            let unet = try Files.readJSON(Files.join(model.folder, "unet", "config.json"))
            return unet["time_cond_proj_dim"].map(\.isNull) ?? true
        }
    }

    /// model_index.json's components that a pipeline uses: name → class.
    func listedComponents() throws -> [(name: String, className: String)] {
        let index = try Files.readJSON(Files.join(folder, "model_index.json"))
        return (index.members ?? []).compactMap { key, value in
            guard !key.hasPrefix("_"), let pair = value.array, pair.count == 2, let cls = pair[1].string,
                  !["safety_checker", "feature_extractor", "image_encoder"].contains(key) else { return nil }
            return (key, cls)
        }
    }

    /// The component's weights file as the folder stores it, read directly.
    func weightsFile(_ component: String) throws -> SafeTensorsFile? {
        for name in ["diffusion_pytorch_model.safetensors", "model.safetensors"] {
            let path = Files.join(folder, component, name)
            if Files.exists(path) { return try SafeTensorsFile(path: path) }
        }
        return nil
    }
}

/// A fresh folder under the system's temporary directory, removed with its contents at the end.
final class TemporaryDirectory {
    let path: String

    init() throws {
        let base = Files.environment("TMPDIR") ?? "/tmp"
        var template = Array((base + "/diffuse-sources-XXXXXX").utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw FileError(base, "cannot create a temporary folder")
        }
        path = String(cString: made)
    }

    func join(_ parts: String...) -> String { parts.reduce(path) { Files.join($0, $1) } }

    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// Copies a folder tree (files copied byte for byte).
func copyTree(_ from: String, to: String) throws {
    try Files.createDirectory(to)
    for entry in try Files.list(from) {
        let source = Files.join(from, entry), target = Files.join(to, entry)
        if Files.isDirectory(source) { try copyTree(source, to: target) } else { try Files.write(Files.read(source), to: target) }
    }
}

/// Every file under a folder, relative, sorted (to check that nothing was written).
func listTree(_ folder: String, prefix: String = "") throws -> [String] {
    var out: [String] = []
    for entry in try Files.list(folder) {
        let path = Files.join(folder, entry)
        if Files.isDirectory(path) { out += try listTree(path, prefix: prefix + entry + "/") } else { out.append(prefix + entry) }
    }
    return out.sorted()
}

func makeLink(_ target: String, at path: String) throws {
    guard symlink(target, path) == 0 else { throw FileError(path, "cannot create a link to \(target)") }
}

/// Same dtype, shape and bytes.
func identical(_ a: Tensor, _ b: Tensor) -> Bool {
    a.dtype == b.dtype && a.shape == b.shape && memcmp(a.raw, b.raw, a.byteCount) == 0
}

func transposed(_ t: Tensor) -> Tensor {
    let (rows, cols) = (t.shape[0], t.shape[1])
    let out = Tensor(zeros: [cols, rows], dtype: t.dtype)
    let size = t.dtype.size
    for r in 0..<rows {
        for c in 0..<cols {
            (out.raw + (c * rows + r) * size).copyMemory(from: t.raw + (r * cols + c) * size, byteCount: size)
        }
    }
    return out
}

/// Tensors stacked along the first axis.
func concatenated(_ parts: [Tensor]) -> Tensor {
    let out = Tensor(zeros: [parts.map { $0.shape[0] }.reduce(0, +)] + parts[0].shape.dropFirst(), dtype: parts[0].dtype)
    var offset = 0
    for p in parts {
        (out.raw + offset).copyMemory(from: p.raw, byteCount: p.byteCount)
        offset += p.byteCount
    }
    return out
}

/// Writes a model's components in the original single-file layout of `family`, using the key
/// tables backwards: each diffusers tensor goes where the table says it comes from (fused q/k/v
/// concatenated, 1x1-conv attention weights given their trailing dimensions, OpenCLIP's
/// projection transposed). `extra` tensors (buffers, EMA copies) are added as they are.
func originalLayoutTensors(_ source: ModelSource, family: StableDiffusionFamily) throws -> [(String, Tensor)] {
    var out: [(String, Tensor)] = []
    for (component, prefix) in family.prefixes {
        let c = try source.component(component)
        let weights = try #require(c.weights)
        let mapping = try SingleFileCheckpoint.keyMapping(component: component, className: c.className, config: try c.requireConfig(),
                                                          family: family)
        var order: [String] = []
        var parts: [String: [(LeafTransform, Tensor)]] = [:]
        for name in weights.tensorNames {
            let (sourceName, transform) = try #require(mapping.source(forTarget: name), "no checkpoint name for \(component) tensor \(name)")
            let key = prefix + sourceName
            if parts[key] == nil { order.append(key) }
            parts[key, default: []].append((transform, try weights.tensor(name)))
        }
        for key in order {
            let pieces = parts[key]!
            switch pieces[0].0 {
            case .identity: out.append((key, pieces[0].1))
            case .convToLinear: out.append((key, pieces[0].1.reshaped(pieces[0].1.shape + [1, 1])))
            case .transpose: out.append((key, transposed(pieces[0].1)))
            case .chunk(_, let count):
                let sorted = pieces.compactMap { p -> (Int, Tensor)? in
                    if case .chunk(let i, _) = p.0 { return (i, p.1) } else { return nil }
                }.sorted { $0.0 < $1.0 }
                #expect(sorted.map(\.0) == Array(0..<count), "\(key): parts \(sorted.map(\.0))")
                out.append((key, concatenated(sorted.map(\.1))))
            }
        }
    }
    return out
}

/// A tensor source with names and shapes but no data (zeros if asked): real architectures'
/// layouts without gigabytes of weights.
final class ShapeOnlySource: TensorSource {
    let origin: String
    let tensorNames: [String]
    private let shapes: [String: (DType, [Int])]

    init(_ entries: [(String, DType, [Int])], origin: String) {
        self.origin = origin
        tensorNames = entries.map(\.0)
        shapes = Dictionary(entries.map { ($0.0, ($0.1, $0.2)) }, uniquingKeysWith: { a, _ in a })
    }

    func info(_ name: String) -> (dtype: DType, shape: [Int])? { shapes[name].map { ($0.0, $0.1) } }

    func tensor(_ name: String) throws -> Tensor {
        guard let (dtype, shape) = shapes[name] else { throw SafeTensorsError.missingTensor(file: origin, tensor: name) }
        return Tensor(zeros: shape, dtype: dtype)
    }
}

/// The error's text, for checks that it names what is wrong.
func message(_ body: () throws -> Any) -> String? {
    do { _ = try body(); return nil } catch { return "\(error)" }
}

/// Writes a state dict as torch.save does (a zip archive, stored: `archive/data.pkl`, a protocol-2
/// pickle of an OrderedDict of `_rebuild_tensor_v2` calls, and one storage per tensor under
/// `archive/data/`), so that tests can make `.bin` files without torch. torch.load reads them.
/// With `wrappedIn`, the state dict is the value of that key of a dict (Lightning's `state_dict`).
func writeTorchCheckpoint(_ tensors: [(String, Tensor)], wrappedIn key: String? = nil, to path: String) throws {
    let storageNames: [DType: String] = [.float32: "FloatStorage", .float16: "HalfStorage", .bfloat16: "BFloat16Storage",
                                         .float64: "DoubleStorage", .int64: "LongStorage", .int32: "IntStorage"]
    var pickle: [UInt8] = [0x80, 0x02]
    func global(_ module: String, _ name: String) { pickle += [0x63] + Array("\(module)\n\(name)\n".utf8) }
    func string(_ s: String) { let b = Array(s.utf8); pickle += [0x58] + le32(b.count) + b }
    func int(_ v: Int) { pickle += [0x4A] + le32(v) }
    func ints(_ v: [Int]) { pickle.append(0x28); v.forEach(int); pickle.append(0x74) }
    if let key { pickle += [0x7D, 0x28]; string(key) }  // EMPTY_DICT, MARK, the key
    global("collections", "OrderedDict"); pickle += [0x29, 0x52, 0x28]
    var entries: [(String, [UInt8])] = []
    for (index, (name, t)) in tensors.enumerated() {
        guard let storage = storageNames[t.dtype] else { throw FileError(path, "no torch storage for \(t.dtype)") }
        string(name)
        global("torch._utils", "_rebuild_tensor_v2")
        pickle += [0x28, 0x28]
        string("storage"); global("torch", storage); string("\(index)"); string("cpu"); int(t.count)
        pickle += [0x74, 0x51]  // TUPLE, BINPERSID
        int(0)
        ints(t.shape)
        ints(t.shape.indices.map { t.shape[($0 + 1)...].reduce(1, *) })
        pickle.append(0x89)
        global("collections", "OrderedDict"); pickle += [0x29, 0x52, 0x74, 0x52]
        entries.append(("archive/data/\(index)", Array(UnsafeRawBufferPointer(start: t.raw, count: t.count * t.dtype.size))))
    }
    pickle += key == nil ? [0x75, 0x2E] : [0x75, 0x75, 0x2E]  // SETITEMS (twice when wrapped), STOP
    entries = [("archive/data.pkl", pickle), ("archive/byteorder", Array("little".utf8))] + entries + [("archive/version", Array("3\n".utf8))]

    var out: [UInt8] = [], directory: [UInt8] = []
    for (name, data) in entries {
        let offset = out.count, crc = Int(Zlib.crc32(data)), nameBytes = Array(name.utf8)
        let common = le16(20) + le16(0) + le16(0) + le16(0) + le16(0) + le32(crc) + le32(data.count) + le32(data.count)
            + le16(nameBytes.count) + le16(0)
        out += le32(0x0403_4B50) + common + nameBytes + data
        directory += le32(0x0201_4B50) + le16(20) + common + le16(0) + le16(0) + le16(0) + le32(0) + le32(offset) + nameBytes
    }
    let start = out.count
    out += directory + le32(0x0605_4B50) + le16(0) + le16(0) + le16(entries.count) + le16(entries.count)
        + le32(directory.count) + le32(start) + le16(0)
    try Files.write(out, to: path)
}

private func le16(_ v: Int) -> [UInt8] { [UInt8(v & 0xFF), UInt8(v >> 8 & 0xFF)] }
private func le32(_ v: Int) -> [UInt8] { le16(v & 0xFFFF) + le16(v >> 16 & 0xFFFF) }
