import DiffuseCore
import DiffuseGraph
#if canImport(Glibc)
import Glibc
#endif

/// The kernel families: one CUDA C program each, compiled with NVRTC per storage type where the
/// family depends on it.
public enum KernelFamily: String, CaseIterable, Sendable {
    case elementwise, copy, norm, attention, attentionBasic, quantize

    var body: String {
        switch self {
        case .elementwise: return ElementwiseKernels.source
        case .copy: return CopyKernels.source + "\n" + RandomKernels.source
        case .norm: return NormKernels.source
        case .attention: return AttentionKernels.source
        case .attentionBasic: return AttentionKernels.basicSource
        case .quantize: return QuantizeKernels.source
        }
    }

    /// Whether the family is compiled once per storage type (`-DDT=`); `copy` is type-free.
    public var dependsOnStorage: Bool { self != .copy }

    /// The entry points the backend launches from this family.
    public var kernelNames: [String] { KernelNames.launched(self) }

    /// The full translation unit.
    var source: String { CommonKernels.source + "\n" + body }
}

/// The storage types kernels are instantiated for, as `-DDT=` codes.
enum StorageKind: Int, CaseIterable, Sendable {
    case float32 = 0, float16 = 1, bfloat16 = 2

    init?(_ d: DType) {
        switch d {
        case .float32: self = .float32
        case .float16: self = .float16
        case .bfloat16: self = .bfloat16
        default: return nil
        }
    }

    var dtype: DType {
        switch self {
        case .float32: return .float32
        case .float16: return .float16
        case .bfloat16: return .bfloat16
        }
    }
}

/// Compiles kernel programs with NVRTC for one architecture and caches the cubins on disk,
/// keyed by a hash of source, options, architecture and NVRTC version, under
/// `$XDG_CACHE_HOME/diffuse/cuda` or `~/.cache/diffuse/cuda` (never next to the user's models).
public final class KernelCompiler: @unchecked Sendable {
    let nvrtc: NVRTC
    public let architecture: Int
    let cacheFolder: String?
    private let lock = NSLockLite()
    private var memory: [String: [UInt8]] = [:]

    /// Loads NVRTC (no GPU needed) to compile for `sm_<architecture>`.
    public convenience init(architecture: Int, cacheFolder: String? = KernelCompiler.defaultCacheFolder) throws {
        try self.init(nvrtc: NVRTC(), architecture: architecture, cacheFolder: cacheFolder)
    }

    init(nvrtc: NVRTC, architecture: Int, cacheFolder: String?) {
        self.nvrtc = nvrtc
        self.architecture = architecture
        self.cacheFolder = cacheFolder
    }

    /// NVRTC's version, e.g. "13.0".
    public var nvrtcVersion: String { "\(nvrtc.version.major).\(nvrtc.version.minor)" }

    public static var defaultCacheFolder: String? {
        if let x = Files.environment("XDG_CACHE_HOME"), !x.isEmpty { return Files.join(x, "diffuse/cuda") }
        if let h = Files.environment("HOME"), !h.isEmpty { return Files.join(h, ".cache/diffuse/cuda") }
        return nil
    }

    func options(for family: KernelFamily, storage: StorageKind) -> [String] {
        var o = ["--gpu-architecture=sm_\(architecture)", "--std=c++17"]
        if family.dependsOnStorage { o.append("-DDT=\(storage.rawValue)") }
        return o
    }

    /// The cubin of `family` for `storage` (ignored for type-free families).
    public func cubin(_ family: KernelFamily, storage s: DType) throws -> [UInt8] {
        guard let storage = StorageKind(s) else { throw CUDAError.unsupported("no kernels for storage type \(s)") }
        let opts = options(for: family, storage: family.dependsOnStorage ? storage : .float32)
        let source = family.source
        let keyText = "\(family.rawValue)|\(opts.joined(separator: " "))|nvrtc \(nvrtcVersion)"
        let key = String(stableHash(keyText + "\n" + source), radix: 16)
        lock.lock()
        defer { lock.unlock() }
        if let c = memory[key] { return c }
        let path = cacheFolder.map { Files.join($0, "\(family.rawValue)-\(key).cubin") }
        if let path, let cached = readCache(path, keyText: keyText, sourceHash: stableHash(source)) {
            memory[key] = cached
            return cached
        }
        let name = "\(family.rawValue)\(family.dependsOnStorage ? "_\(storage.dtype)" : "").cu"
        let cubin = try nvrtc.compile(source: source, name: name, options: opts)
        memory[key] = cubin
        if let path { writeCache(path, keyText: keyText, sourceHash: stableHash(source), cubin: cubin) }
        return cubin
    }

    // Cache file: "diffuse-cubin\n<keyText>\n<source hash>\n" then the cubin bytes. The header is
    // checked on load so a hash collision can never hand out the wrong binary.
    private func header(_ keyText: String, _ sourceHash: UInt64) -> [UInt8] {
        Array("diffuse-cubin\n\(keyText)\n\(String(sourceHash, radix: 16))\n".utf8)
    }

    private func readCache(_ path: String, keyText: String, sourceHash: UInt64) -> [UInt8]? {
        guard Files.exists(path), let bytes = try? Files.read(path) else { return nil }
        let h = header(keyText, sourceHash)
        guard bytes.count > h.count, Array(bytes[0..<h.count]) == h else { return nil }
        return Array(bytes[h.count...])
    }

    private func writeCache(_ path: String, keyText: String, sourceHash: UInt64, cubin: [UInt8]) {
        guard let folder = cacheFolder else { return }
        do {
            try Files.createDirectory(folder)
            try Files.write(header(keyText, sourceHash) + cubin, to: path)
        } catch {
            Log.warning("CUDA: cannot write the kernel cache \(path): \(error)")
        }
    }
}

/// FNV-1a 64 with a final avalanche: a stable hash for cache keys (Swift's Hasher is seeded per run).
func stableHash(_ s: String) -> UInt64 {
    var h: UInt64 = 0xcbf2_9ce4_8422_2325
    for b in s.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
    h ^= h >> 33
    h = h &* 0xff51_afd7_ed55_8ccd
    h ^= h >> 33
    return h
}
