import DiffuseCore
import DiffuseGraph
#if canImport(Glibc)
import Glibc
#endif

/// One GPU: the primary context, the one stream everything runs on, loaded kernel modules,
/// the caching allocator, pinned staging buffers and the cuBLASLt handle.
final class CUDAContext: @unchecked Sendable {
    let driver: DriverAPI
    let compiler: KernelCompiler
    let cublas: CuBLASLt
    let device: Int32
    let context: CUhandle
    let stream: CUhandle
    let deviceName: String
    let architecture: Int
    let multiprocessors: Int
    let maxThreadsPerMultiprocessor: Int
    let totalMemory: Int
    let maxSharedOptin: Int
    let driverVersion: Int
    let allocator: DeviceAllocator
    private(set) var staging: Staging!
    let cublasHandle: CuBLASLt.Handle
    private(set) var workspace: DeviceBuffer!
    static let workspaceBytes = 32 << 20
    /// `DIFFUSE_CUDA_SYNC=1` (or the self-test): wait after every step and name the op that
    /// failed, instead of reporting an asynchronous error at the next sync.
    var syncEachStep: Bool
    private var cudnnState: CuDNN?? = .none
    /// Flag "autotune" (the analogue of torch.compile's max-autotune and cudnn.benchmark): the
    /// fastest measured cuBLASLt algorithm (its heuristic-result bytes) and cuDNN algorithm and
    /// math type per problem, measured once per process.
    private var tunedGemms: [String: [UInt8]] = [:]
    private var tunedConvolutions: [String: (algorithm: Int32, math: Int32)] = [:]
    private var timingEvents: (CUhandle, CUhandle)?
    /// cuDNN if libcudnn.so.9 loads (and `DIFFUSE_CUDA_NO_CUDNN` is unset), else nil; tried once.
    var cudnn: CuDNN? {
        if case .some(let d) = cudnnState { return d }
        var d: CuDNN?
        if Files.environment("DIFFUSE_CUDA_NO_CUDNN") != "1" {
            do { d = try CuDNN(stream: stream) } catch {
                Log.info("CUDA: cuDNN not used (\(error)); convolutions run as im2col + cuBLASLt")
            }
        }
        cudnnState = .some(d)
        return d
    }
    private let lock = NSLockLite()
    private var modules: [String: CUhandle] = [:]
    private var functions: [String: CUhandle] = [:]

    static let minimumDriver = 12000

    init(ordinal: Int = 0) throws {
        let driver = try DriverAPI()
        self.driver = driver
        try driver.check(driver.cuInit(0), "cuInit")
        var version: Int32 = 0
        try driver.check(driver.cuDriverGetVersion(&version), "cuDriverGetVersion")
        driverVersion = Int(version)
        guard driverVersion >= CUDAContext.minimumDriver else {
            throw CUDAError.driverTooOld(found: driverVersion, needed: CUDAContext.minimumDriver)
        }
        var count: Int32 = 0
        try driver.check(driver.cuDeviceGetCount(&count), "cuDeviceGetCount")
        guard count > ordinal else { throw CUDAError.noDevice("the driver reports \(count) devices, wanted device \(ordinal)") }
        var dev: Int32 = 0
        try driver.check(driver.cuDeviceGet(&dev, Int32(ordinal)), "cuDeviceGet")
        device = dev
        var nameBuf = [CChar](repeating: 0, count: 256)
        try driver.check(driver.cuDeviceGetName(&nameBuf, 255, dev), "cuDeviceGetName")
        deviceName = String(cString: nameBuf)
        func attribute(_ a: Int32) throws -> Int {
            var v: Int32 = 0
            try driver.check(driver.cuDeviceGetAttribute(&v, a, dev), "cuDeviceGetAttribute(\(a))")
            return Int(v)
        }
        let major = try attribute(DriverAPI.attrComputeCapabilityMajor)
        let minor = try attribute(DriverAPI.attrComputeCapabilityMinor)
        architecture = major * 10 + minor
        guard architecture >= 80 else {
            throw CUDAError.noDevice("\(deviceName) is sm_\(architecture); the kernels need sm_80 (Ampere) or newer")
        }
        multiprocessors = try attribute(DriverAPI.attrMultiprocessorCount)
        maxThreadsPerMultiprocessor = try attribute(DriverAPI.attrMaxThreadsPerMultiprocessor)
        maxSharedOptin = try attribute(DriverAPI.attrMaxSharedMemoryPerBlockOptin)
        var total = 0
        try driver.check(driver.cuDeviceTotalMem(&total, dev), "cuDeviceTotalMem")
        totalMemory = total
        // The primary context is the one the runtime-API libraries (cuBLASLt) use too.
        var ctx: CUhandle = nil
        try driver.check(driver.cuDevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain")
        context = ctx
        try driver.check(driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        var s: CUhandle = nil
        try driver.check(driver.cuStreamCreate(&s, 1), "cuStreamCreate")  // CU_STREAM_NON_BLOCKING
        stream = s

        let nvrtc = try NVRTC()
        let archs = nvrtc.supportedArchitectures
        let arch = architecture
        var target = arch
        if !archs.isEmpty && !archs.contains(target) {
            // A newer GPU than this NVRTC knows: compile for the newest architecture it supports
            // below the device's (cubins run on later minor revisions of the same major).
            guard let best = archs.filter({ $0 <= arch && $0 / 10 == arch / 10 }).max() else {
                throw CUDAError.unsupported("NVRTC \(nvrtc.version.major).\(nvrtc.version.minor) cannot compile for sm_\(arch) (it supports \(archs.map { "sm_\($0)" }.joined(separator: ", ")))")
            }
            target = best
        }
        compiler = KernelCompiler(nvrtc: nvrtc, architecture: target, cacheFolder: KernelCompiler.defaultCacheFolder)
        cublas = try CuBLASLt()
        var h: CuBLASLt.Handle = nil
        try cublas.check(cublas.cublasLtCreate(&h), "cublasLtCreate")
        cublasHandle = h
        syncEachStep = Files.environment("DIFFUSE_CUDA_SYNC") == "1"
        allocator = DeviceAllocator(driver: driver)
        staging = try Staging(driver: driver, stream: stream)
        workspace = try allocator.allocate(CUDAContext.workspaceBytes)
    }

    /// Makes the context current on the calling thread (contexts are per thread).
    func makeCurrent() throws {
        try driver.check(driver.cuCtxSetCurrent(context), "cuCtxSetCurrent")
    }

    func synchronize() throws {
        try driver.check(driver.cuStreamSynchronize(stream), "cuStreamSynchronize")
    }

    /// Milliseconds per run of `body`'s work on the stream: one warm-up, then the mean of `reps`
    /// runs between two events. Nil when the driver has no event timing.
    func time(reps: Int, _ body: () throws -> Void) throws -> Double? {
        guard let elapsed = driver.cuEventElapsedTime else { return nil }
        if timingEvents == nil {
            var a: CUhandle = nil, b: CUhandle = nil
            try driver.check(driver.cuEventCreate(&a, 0), "cuEventCreate")
            try driver.check(driver.cuEventCreate(&b, 0), "cuEventCreate")
            timingEvents = (a, b)
        }
        let (start, end) = timingEvents!
        try body()
        try driver.check(driver.cuEventRecord(start, stream), "cuEventRecord")
        for _ in 0..<reps { try body() }
        try driver.check(driver.cuEventRecord(end, stream), "cuEventRecord")
        try driver.check(driver.cuEventSynchronize(end), "cuEventSynchronize")
        var ms: Float = 0
        try driver.check(elapsed(&ms, start, end), "cuEventElapsedTime")
        return Double(ms) / Double(max(reps, 1))
    }

    func tunedGemm(_ key: String) -> [UInt8]? { lock.lock(); defer { lock.unlock() }; return tunedGemms[key] }
    func setTunedGemm(_ key: String, _ v: [UInt8]) { lock.lock(); tunedGemms[key] = v; lock.unlock() }
    func tunedConvolution(_ key: String) -> (algorithm: Int32, math: Int32)? {
        lock.lock(); defer { lock.unlock() }; return tunedConvolutions[key]
    }
    func setTunedConvolution(_ key: String, _ v: (algorithm: Int32, math: Int32)) { lock.lock(); tunedConvolutions[key] = v; lock.unlock() }

    /// The kernel `name` of `family` for storage type `storage`, loading its module on first use.
    func function(_ family: KernelFamily, _ storage: DType, _ name: String, sharedBytes: Int = 0) throws -> CUhandle {
        lock.lock()
        defer { lock.unlock() }
        let s = family.dependsOnStorage ? storage : .float32
        let fkey = "\(family.rawValue).\(s).\(name)"
        if let f = functions[fkey] {
            return f
        }
        let mkey = "\(family.rawValue).\(s)"
        var module = modules[mkey] ?? nil
        if module == nil {
            let cubin = try compiler.cubin(family, storage: s)
            try cubin.withUnsafeBytes { raw in
                try driver.check(driver.cuModuleLoadData(&module, raw.baseAddress!), "cuModuleLoadData(\(mkey))")
            }
            modules[mkey] = module
        }
        var f: CUhandle = nil
        try driver.check(name.withCString { driver.cuModuleGetFunction(&f, module, $0) }, "cuModuleGetFunction(\(name))")
        if sharedBytes > 48 * 1024 {
            guard sharedBytes <= maxSharedOptin else {
                throw CUDAError.unsupported("\(name) needs \(sharedBytes) bytes of shared memory; \(deviceName) allows \(maxSharedOptin)")
            }
            try driver.check(driver.cuFuncSetAttribute(f, DriverAPI.funcAttrMaxDynamicSharedSizeBytes, Int32(sharedBytes)),
                             "cuFuncSetAttribute(\(name), \(sharedBytes) bytes)")
        }
        functions[fkey] = f
        return f
    }

    func launch(_ l: Launch) throws {
        try driver.check(driver.cuLaunchKernel(l.function, l.grid.0, l.grid.1, l.grid.2, l.block, 1, 1, l.sharedBytes,
                                               stream, l.args.pointers, nil), "cuLaunchKernel(\(l.label))")
    }

    /// Grid for a grid-stride elementwise kernel of 256 threads over n elements.
    func elementwiseGrid(_ n: Int) -> UInt32 {
        UInt32(max(1, min((n + 255) / 256, multiprocessors * 32)))
    }

    func copyAsync(dst: CUdeviceptr, src: CUdeviceptr, bytes: Int) throws {
        if bytes == 0 || dst == src { return }
        try driver.check(driver.cuMemcpyDtoDAsync(dst, src, bytes, stream), "cuMemcpyDtoDAsync(\(bytes) bytes)")
    }

    /// Queues a copy from page-locked host memory (no host sync; capturable in a CUDA graph).
    func uploadAsync(dst: CUdeviceptr, src: PinnedBuffer, bytes: Int) throws {
        if bytes == 0 { return }
        try driver.check(driver.cuMemcpyHtoDAsync(dst, src.pointer, bytes, stream), "cuMemcpyHtoDAsync(\(bytes) bytes)")
    }
}

/// A kernel argument, packed into the parameter buffer cuLaunchKernel reads.
enum KernelArg {
    case ptr(CUdeviceptr)
    case i32(Int32)
    case i64(Int64)
    case f32(Float)
    /// A struct passed by value, made of 8-byte fields (see `StructBytes`).
    case bytes([UInt8])

    var size: Int {
        switch self {
        case .ptr, .i64: return 8
        case .i32, .f32: return 4
        case .bytes(let b): return b.count
        }
    }
}

/// Kernel arguments kept in stable memory for as long as the launch exists, so repeated runs
/// (and, later, CUDA-graph capture) launch without allocating.
final class KernelArgs {
    let storage: UnsafeMutableRawPointer
    let pointers: UnsafeMutablePointer<UnsafeMutableRawPointer?>
    let count: Int

    init(_ args: [KernelArg]) {
        var offsets: [Int] = []
        var total = 0
        for a in args {
            total = (total + 15) / 16 * 16
            offsets.append(total)
            total += a.size
        }
        storage = UnsafeMutableRawPointer.allocate(byteCount: max(total, 16), alignment: 16)
        pointers = UnsafeMutablePointer<UnsafeMutableRawPointer?>.allocate(capacity: max(args.count, 1))
        count = args.count
        for (a, off) in zip(args, offsets) {
            let p = storage + off
            switch a {
            case .ptr(let v): p.storeBytes(of: v, as: UInt64.self)
            case .i32(let v): p.storeBytes(of: v, as: Int32.self)
            case .i64(let v): p.storeBytes(of: v, as: Int64.self)
            case .f32(let v): p.storeBytes(of: v, as: Float.self)
            case .bytes(let b): b.withUnsafeBytes { p.copyMemory(from: $0.baseAddress!, byteCount: b.count) }
            }
        }
        for i in 0..<args.count { pointers[i] = storage + offsets[i] }
    }

    deinit {
        storage.deallocate()
        pointers.deallocate()
    }
}

/// Builds a by-value struct of 8-byte fields (i64 / double), as the kernels declare them.
struct StructBytes {
    private(set) var bytes: [UInt8] = []
    mutating func i64(_ v: Int) { withUnsafeBytes(of: Int64(v).littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func f64(_ v: Double) { u64(v.bitPattern) }
    /// `values` padded with zeros to `count` fields.
    mutating func i64Array(_ values: [Int], count: Int) {
        precondition(values.count <= count)
        for v in values { i64(v) }
        for _ in values.count..<count { i64(0) }
    }
}

struct Launch {
    let function: CUhandle
    let grid: (UInt32, UInt32, UInt32)
    let block: UInt32
    let sharedBytes: UInt32
    let args: KernelArgs
    let label: String
}

/// A block of device memory; returns to the allocator's cache when released.
final class DeviceBuffer: @unchecked Sendable {
    let pointer: CUdeviceptr
    let bytes: Int
    private let allocator: DeviceAllocator

    init(pointer: CUdeviceptr, bytes: Int, allocator: DeviceAllocator) {
        self.pointer = pointer
        self.bytes = bytes
        self.allocator = allocator
    }

    deinit { allocator.release(pointer, bytes) }
}

/// A caching allocator: freed blocks are kept by size class and handed out again, so the
/// steady state of a denoising loop never calls cuMemAlloc. All work is on one stream, so a
/// block freed on the host can be reused at once: later work is ordered after earlier work.
final class DeviceAllocator: @unchecked Sendable {
    private let driver: DriverAPI
    private let lock = NSLockLite()
    private var cache: [Int: [CUdeviceptr]] = [:]
    private(set) var inUse = 0
    private(set) var peak = 0
    private(set) var reserved = 0

    init(driver: DriverAPI) { self.driver = driver }

    /// Small blocks round to 512 bytes, large ones to 2 MiB.
    static func sizeClass(_ bytes: Int) -> Int {
        let b = max(bytes, 1)
        return b < (1 << 20) ? (b + 511) / 512 * 512 : (b + (2 << 20) - 1) / (2 << 20) * (2 << 20)
    }

    func allocate(_ bytes: Int) throws -> DeviceBuffer {
        let size = DeviceAllocator.sizeClass(bytes)
        lock.lock()
        defer { lock.unlock() }
        var ptr: CUdeviceptr = 0
        if var list = cache[size], let p = list.popLast() {
            cache[size] = list
            ptr = p
        } else {
            var result = driver.cuMemAlloc(&ptr, size)
            if result == 2 {  // CUDA_ERROR_OUT_OF_MEMORY: give the cache back and retry once
                _ = driver.cuCtxSynchronize?()
                releaseCacheLocked()
                result = driver.cuMemAlloc(&ptr, size)
            }
            if result == 2 {
                throw CUDAError.invalidInput("out of device memory allocating \(size >> 20) MiB (\(inUse >> 20) MiB in use)")
            }
            try driver.check(result, "cuMemAlloc(\(size) bytes)")
            reserved += size
        }
        inUse += size
        peak = max(peak, inUse)
        return DeviceBuffer(pointer: ptr, bytes: size, allocator: self)
    }

    func release(_ ptr: CUdeviceptr, _ size: Int) {
        lock.lock()
        cache[size, default: []].append(ptr)
        inUse -= size
        lock.unlock()
    }

    func resetPeak() {
        lock.lock()
        peak = inUse
        lock.unlock()
    }

    /// Frees every cached block (waits for the device first).
    func emptyCache() {
        lock.lock()
        _ = driver.cuCtxSynchronize?()
        releaseCacheLocked()
        lock.unlock()
    }

    private func releaseCacheLocked() {
        for (size, list) in cache {
            for p in list { _ = driver.cuMemFree(p); reserved -= size }
        }
        cache.removeAll()
    }
}

/// Two pinned host buffers used in turn for uploads and downloads, each guarded by an event so
/// the host never overwrites a buffer a copy still reads.
/// Page-locked host memory (cuMemAllocHost): the source of asynchronous uploads, which CUDA
/// graphs can capture (sequential offload keeps the weights here).
final class PinnedBuffer: @unchecked Sendable {
    let pointer: UnsafeMutableRawPointer
    let bytes: Int
    private let driver: DriverAPI

    init(driver: DriverAPI, bytes: Int) throws {
        var p: UnsafeMutableRawPointer?
        try driver.check(driver.cuMemAllocHost(&p, max(bytes, 1)), "cuMemAllocHost(\(bytes) bytes)")
        pointer = p!
        self.bytes = bytes
        self.driver = driver
    }

    deinit { _ = driver.cuMemFreeHost(pointer) }
}

final class Staging: @unchecked Sendable {
    static let chunk = 16 << 20
    /// The driver and stream, held strongly: the context owns this object and destroys it
    /// during its own teardown, when an unowned back-reference could no longer be read.
    private let driver: DriverAPI
    private let stream: CUhandle
    private var buffers: [UnsafeMutableRawPointer] = []
    private var events: [CUhandle] = []
    private var next = 0
    private let lock = NSLockLite()

    init(driver: DriverAPI, stream: CUhandle) throws {
        self.driver = driver
        self.stream = stream
        for _ in 0..<2 {
            var p: UnsafeMutableRawPointer?
            try driver.check(driver.cuMemAllocHost(&p, Staging.chunk), "cuMemAllocHost(\(Staging.chunk) bytes)")
            buffers.append(p!)
            var e: CUhandle = nil
            try driver.check(driver.cuEventCreate(&e, 2), "cuEventCreate")  // CU_EVENT_DISABLE_TIMING
            try driver.check(driver.cuEventRecord(e, stream), "cuEventRecord")
            events.append(e)
        }
    }

    deinit {
        for b in buffers { _ = driver.cuMemFreeHost(b) }
    }

    /// Copies host bytes to the device, queued on the stream (returns before the copy ends).
    func upload(_ src: UnsafeRawPointer, bytes: Int, to dst: CUdeviceptr) throws {
        lock.lock()
        defer { lock.unlock() }
        let d = driver
        var done = 0
        while done < bytes {
            let n = min(Staging.chunk, bytes - done)
            let slot = next
            next = (next + 1) % buffers.count
            try d.check(d.cuEventSynchronize(events[slot]), "cuEventSynchronize")
            buffers[slot].copyMemory(from: src + done, byteCount: n)
            try d.check(d.cuMemcpyHtoDAsync(dst + UInt64(done), buffers[slot], n, stream), "cuMemcpyHtoDAsync(\(n) bytes)")
            try d.check(d.cuEventRecord(events[slot], stream), "cuEventRecord")
            done += n
        }
    }

    /// Copies device bytes to host memory after all queued work (waits).
    func download(_ src: CUdeviceptr, bytes: Int, to dst: UnsafeMutableRawPointer) throws {
        lock.lock()
        defer { lock.unlock() }
        let d = driver
        var done = 0
        while done < bytes {
            let n = min(Staging.chunk, bytes - done)
            let slot = next
            next = (next + 1) % buffers.count
            try d.check(d.cuEventSynchronize(events[slot]), "cuEventSynchronize")
            try d.check(d.cuMemcpyDtoHAsync(buffers[slot], src + UInt64(done), n, stream), "cuMemcpyDtoHAsync(\(n) bytes)")
            try d.check(d.cuStreamSynchronize(stream), "cuStreamSynchronize")
            (dst + done).copyMemory(from: buffers[slot], byteCount: n)
            try d.check(d.cuEventRecord(events[slot], stream), "cuEventRecord")
            done += n
        }
    }
}

/// A tensor in device memory: an upload, a linear combination's result, or a view of an
/// executable's arena (a graph output, valid until that executable runs again).
public final class CUDADeviceTensor: DeviceTensor {
    public let shape: [Int]
    /// The dtype on the device; `toHost` hands floats back as float32.
    public let dtype: DType
    let pointer: CUdeviceptr
    /// Keeps the memory alive (a DeviceBuffer or an executable's arena).
    let owner: AnyObject
    let context: CUDAContext

    init(shape: [Int], dtype: DType, pointer: CUdeviceptr, owner: AnyObject, context: CUDAContext) {
        self.shape = shape
        self.dtype = dtype
        self.pointer = pointer
        self.owner = owner
        self.context = context
    }

    var count: Int { shape.reduce(1, *) }
    var byteCount: Int { count * dtype.size }

    /// Waits for queued work, copies to the host; float16/bfloat16 come back as float32.
    public func toHost() throws -> Tensor {
        try context.makeCurrent()
        let t = Tensor(zeros: shape, dtype: dtype)
        try context.staging.download(pointer, bytes: byteCount, to: t.raw)
        return dtype == .float16 || dtype == .bfloat16 ? t.converted(to: .float32) : t
    }
}
