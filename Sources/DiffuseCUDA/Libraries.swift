import DiffuseCore
#if canImport(Glibc)
import Glibc
#endif

/// Everything that can stop the CUDA backend, each naming what is missing or what failed.
public enum CUDAError: Error, CustomStringConvertible {
    case libraryNotFound(library: String, tried: [String])
    case symbolMissing(library: String, symbol: String)
    case driverTooOld(found: Int, needed: Int)
    case noDevice(String)
    case driver(call: String, code: Int32, name: String, message: String)
    case nvrtc(call: String, code: Int32, message: String)
    case compile(program: String, log: String)
    case cublas(call: String, status: Int32)
    case unsupported(String)
    case invalidInput(String)

    public var description: String {
        switch self {
        case let .libraryNotFound(lib, tried):
            return "CUDA: cannot load \(lib) (tried \(tried.joined(separator: ", "))); set DIFFUSE_CUDA_LIBS to the folders that hold the CUDA libraries"
        case let .symbolMissing(lib, sym):
            return "CUDA: \(lib) has no symbol \(sym) (library too old?)"
        case let .driverTooOld(found, needed):
            return "CUDA: the driver supports CUDA \(found / 1000).\(found % 1000 / 10), this backend needs \(needed / 1000).\(needed % 1000 / 10) or newer"
        case let .noDevice(why): return "CUDA: no usable device: \(why)"
        case let .driver(call, code, name, message): return "CUDA: \(call) failed with \(name) (\(code)): \(message)"
        case let .nvrtc(call, code, message): return "NVRTC: \(call) failed (\(code)): \(message)"
        case let .compile(program, log): return "NVRTC: compiling \(program) failed:\n\(log)"
        case let .cublas(call, status): return "cuBLASLt: \(call) failed with status \(status)"
        case let .unsupported(what): return "CUDA backend: \(what)"
        case let .invalidInput(what): return "CUDA backend: \(what)"
        }
    }
}

/// A shared library opened with dlopen, found on the standard loader path, in `DIFFUSE_CUDA_LIBS`
/// (colon-separated folders: the run script points it at the Python wheels' `nvidia/*/lib`) or in
/// the usual toolkit folders. Why dlopen: one binary then builds and runs where CUDA is absent.
final class DynamicLibrary: @unchecked Sendable {
    let name: String
    let path: String
    private let handle: UnsafeMutableRawPointer

    /// Folders searched before the loader's own path: `DIFFUSE_CUDA_LIBS`, whose entries may be
    /// glob patterns (`.../site-packages/nvidia/*/lib`).
    static var searchFolders: [String] {
        guard let s = Files.environment("DIFFUSE_CUDA_LIBS") else { return [] }
        return s.split(separator: ":").map(String.init).filter { !$0.isEmpty }.flatMap(expand)
    }

    /// Folders tried after the loader's path: toolkit installs, the driver's usual homes, and
    /// the NVIDIA wheels of an active virtualenv or conda environment.
    static var fallbackFolders: [String] {
        var dirs = ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib",
                    "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib/wsl/lib"]
        for env in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
            if let prefix = Files.environment(env), !prefix.isEmpty {
                dirs += expand(Files.join(prefix, "lib/python3*/site-packages/nvidia/*/lib"))
            }
        }
        return dirs
    }

    /// The folders a glob pattern matches (the pattern itself when it has no wildcard).
    static func expand(_ pattern: String) -> [String] {
        guard pattern.contains("*") || pattern.contains("?") else { return [pattern] }
        var g = glob_t()
        defer { globfree(&g) }
        guard glob(pattern, 0, nil, &g) == 0 else { return [] }
        return (0..<Int(g.gl_pathc)).compactMap { g.gl_pathv[$0].map { String(cString: $0) } }.sorted()
    }

    /// Opens the first of `names` that loads.
    init(_ names: [String]) throws {
        var tried: [String] = []
        var found: (String, UnsafeMutableRawPointer)?
        let candidates = DynamicLibrary.searchFolders.flatMap { d in names.map { Files.join(d, $0) } }
            + names
            + DynamicLibrary.fallbackFolders.flatMap { d in names.map { Files.join(d, $0) } }
        for c in candidates {
            if c.hasPrefix("/") && !Files.exists(c) { continue }
            tried.append(c)
            if let h = dlopen(c, RTLD_NOW | RTLD_GLOBAL) { found = (c, h); break }
        }
        guard let (p, h) = found else {
            let err = dlerror().map { String(cString: $0) } ?? ""
            throw CUDAError.libraryNotFound(library: names[0] + (err.isEmpty ? "" : " [\(err)]"),
                                            tried: tried.isEmpty ? names : tried)
        }
        name = names[0]
        path = p
        handle = h
    }

    func symbol<T>(_ s: String, as: T.Type = T.self) throws -> T {
        guard let p = dlsym(handle, s) else { throw CUDAError.symbolMissing(library: path, symbol: s) }
        return unsafeBitCast(p, to: T.self)
    }

    func optionalSymbol<T>(_ s: String, as: T.Type = T.self) -> T? {
        dlsym(handle, s).map { unsafeBitCast($0, to: T.self) }
    }
}

typealias CUresult = Int32
typealias CUdeviceptr = UInt64
typealias CUhandle = OpaquePointer?

/// The driver API functions the backend calls (libcuda.so.1 comes with the NVIDIA driver).
final class DriverAPI: @unchecked Sendable {
    typealias FnI32Ptr = @convention(c) (UnsafeMutablePointer<Int32>) -> CUresult
    let library: DynamicLibrary
    let cuInit: @convention(c) (UInt32) -> CUresult
    let cuDriverGetVersion: FnI32Ptr
    let cuDeviceGetCount: FnI32Ptr
    let cuDeviceGet: @convention(c) (UnsafeMutablePointer<Int32>, Int32) -> CUresult
    let cuDeviceGetName: @convention(c) (UnsafeMutablePointer<CChar>, Int32, Int32) -> CUresult
    let cuDeviceGetAttribute: @convention(c) (UnsafeMutablePointer<Int32>, Int32, Int32) -> CUresult
    let cuDeviceTotalMem: @convention(c) (UnsafeMutablePointer<Int>, Int32) -> CUresult
    let cuDevicePrimaryCtxRetain: @convention(c) (UnsafeMutablePointer<CUhandle>, Int32) -> CUresult
    let cuCtxSetCurrent: @convention(c) (CUhandle) -> CUresult
    let cuCtxSynchronize: (@convention(c) () -> CUresult)?
    let cuMemAlloc: @convention(c) (UnsafeMutablePointer<CUdeviceptr>, Int) -> CUresult
    let cuMemFree: @convention(c) (CUdeviceptr) -> CUresult
    let cuMemAllocHost: @convention(c) (UnsafeMutablePointer<UnsafeMutableRawPointer?>, Int) -> CUresult
    let cuMemFreeHost: @convention(c) (UnsafeMutableRawPointer?) -> CUresult
    let cuMemcpyHtoDAsync: @convention(c) (CUdeviceptr, UnsafeRawPointer?, Int, CUhandle) -> CUresult
    let cuMemcpyDtoHAsync: @convention(c) (UnsafeMutableRawPointer?, CUdeviceptr, Int, CUhandle) -> CUresult
    let cuMemcpyDtoDAsync: @convention(c) (CUdeviceptr, CUdeviceptr, Int, CUhandle) -> CUresult
    let cuMemsetD8Async: @convention(c) (CUdeviceptr, UInt8, Int, CUhandle) -> CUresult
    let cuMemGetInfo: @convention(c) (UnsafeMutablePointer<Int>, UnsafeMutablePointer<Int>) -> CUresult
    let cuStreamCreate: @convention(c) (UnsafeMutablePointer<CUhandle>, UInt32) -> CUresult
    let cuStreamSynchronize: @convention(c) (CUhandle) -> CUresult
    let cuEventCreate: @convention(c) (UnsafeMutablePointer<CUhandle>, UInt32) -> CUresult
    let cuEventRecord: @convention(c) (CUhandle, CUhandle) -> CUresult
    let cuEventSynchronize: @convention(c) (CUhandle) -> CUresult
    let cuEventElapsedTime: (@convention(c) (UnsafeMutablePointer<Float>, CUhandle, CUhandle) -> CUresult)?
    let cuEventDestroy: (@convention(c) (CUhandle) -> CUresult)?
    let cuModuleLoadData: @convention(c) (UnsafeMutablePointer<CUhandle>, UnsafeRawPointer) -> CUresult
    let cuModuleGetFunction: @convention(c) (UnsafeMutablePointer<CUhandle>, CUhandle, UnsafePointer<CChar>) -> CUresult
    let cuFuncSetAttribute: @convention(c) (CUhandle, Int32, Int32) -> CUresult
    let cuLaunchKernel: @convention(c) (CUhandle, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, CUhandle,
                                        UnsafeMutablePointer<UnsafeMutableRawPointer?>?,
                                        UnsafeMutablePointer<UnsafeMutableRawPointer?>?) -> CUresult
    // CUDA graphs (optional: capture is skipped where the driver lacks them).
    let cuStreamBeginCapture: (@convention(c) (CUhandle, Int32) -> CUresult)?
    let cuStreamEndCapture: (@convention(c) (CUhandle, UnsafeMutablePointer<CUhandle>) -> CUresult)?
    let cuGraphInstantiateWithFlags: (@convention(c) (UnsafeMutablePointer<CUhandle>, CUhandle, UInt64) -> CUresult)?
    let cuGraphLaunch: (@convention(c) (CUhandle, CUhandle) -> CUresult)?
    let cuGraphExecDestroy: (@convention(c) (CUhandle) -> CUresult)?
    let cuGraphDestroy: (@convention(c) (CUhandle) -> CUresult)?
    let cuGetErrorName: @convention(c) (CUresult, UnsafeMutablePointer<UnsafePointer<CChar>?>) -> CUresult
    let cuGetErrorString: @convention(c) (CUresult, UnsafeMutablePointer<UnsafePointer<CChar>?>) -> CUresult

    init() throws {
        let l = try DynamicLibrary(["libcuda.so.1", "libcuda.so"])
        library = l
        cuInit = try l.symbol("cuInit")
        cuDriverGetVersion = try l.symbol("cuDriverGetVersion")
        cuDeviceGetCount = try l.symbol("cuDeviceGetCount")
        cuDeviceGet = try l.symbol("cuDeviceGet")
        cuDeviceGetName = try l.symbol("cuDeviceGetName")
        cuDeviceGetAttribute = try l.symbol("cuDeviceGetAttribute")
        cuDeviceTotalMem = try l.symbol("cuDeviceTotalMem_v2")
        cuDevicePrimaryCtxRetain = try l.symbol("cuDevicePrimaryCtxRetain")
        cuCtxSetCurrent = try l.symbol("cuCtxSetCurrent")
        cuCtxSynchronize = l.optionalSymbol("cuCtxSynchronize")
        cuMemAlloc = try l.symbol("cuMemAlloc_v2")
        cuMemFree = try l.symbol("cuMemFree_v2")
        cuMemAllocHost = try l.symbol("cuMemAllocHost_v2")
        cuMemFreeHost = try l.symbol("cuMemFreeHost")
        cuMemcpyHtoDAsync = try l.symbol("cuMemcpyHtoDAsync_v2")
        cuMemcpyDtoHAsync = try l.symbol("cuMemcpyDtoHAsync_v2")
        cuMemcpyDtoDAsync = try l.symbol("cuMemcpyDtoDAsync_v2")
        cuMemsetD8Async = try l.symbol("cuMemsetD8Async")
        cuMemGetInfo = try l.symbol("cuMemGetInfo_v2")
        cuStreamCreate = try l.symbol("cuStreamCreate")
        cuStreamSynchronize = try l.symbol("cuStreamSynchronize")
        cuEventCreate = try l.symbol("cuEventCreate")
        cuEventRecord = try l.symbol("cuEventRecord")
        cuEventSynchronize = try l.symbol("cuEventSynchronize")
        cuEventElapsedTime = l.optionalSymbol("cuEventElapsedTime_v2") ?? l.optionalSymbol("cuEventElapsedTime")
        cuEventDestroy = l.optionalSymbol("cuEventDestroy_v2") ?? l.optionalSymbol("cuEventDestroy")
        cuModuleLoadData = try l.symbol("cuModuleLoadData")
        cuModuleGetFunction = try l.symbol("cuModuleGetFunction")
        cuFuncSetAttribute = try l.symbol("cuFuncSetAttribute")
        cuLaunchKernel = try l.symbol("cuLaunchKernel")
        cuStreamBeginCapture = l.optionalSymbol("cuStreamBeginCapture_v2") ?? l.optionalSymbol("cuStreamBeginCapture")
        cuStreamEndCapture = l.optionalSymbol("cuStreamEndCapture")
        cuGraphInstantiateWithFlags = l.optionalSymbol("cuGraphInstantiateWithFlags")
        cuGraphLaunch = l.optionalSymbol("cuGraphLaunch")
        cuGraphExecDestroy = l.optionalSymbol("cuGraphExecDestroy")
        cuGraphDestroy = l.optionalSymbol("cuGraphDestroy")
        cuGetErrorName = try l.symbol("cuGetErrorName")
        cuGetErrorString = try l.symbol("cuGetErrorString")
    }

    /// Throws a `CUDAError.driver` naming `call` unless `code` is CUDA_SUCCESS.
    func check(_ code: CUresult, _ call: @autoclosure () -> String) throws {
        if code == 0 { return }
        var name: UnsafePointer<CChar>?
        var msg: UnsafePointer<CChar>?
        _ = cuGetErrorName(code, &name)
        _ = cuGetErrorString(code, &msg)
        throw CUDAError.driver(call: call(), code: code, name: name.map { String(cString: $0) } ?? "CUDA_ERROR_\(code)",
                               message: msg.map { String(cString: $0) } ?? "unknown error")
    }

    // CUdevice_attribute values used here.
    static let attrMultiprocessorCount: Int32 = 16
    static let attrMaxThreadsPerMultiprocessor: Int32 = 39
    static let attrComputeCapabilityMajor: Int32 = 75
    static let attrComputeCapabilityMinor: Int32 = 76
    static let attrMaxSharedMemoryPerBlockOptin: Int32 = 97
    // CUfunction_attribute
    static let funcAttrMaxDynamicSharedSizeBytes: Int32 = 8
}

/// NVRTC: compiles the CUDA C kernels at run time for the device's architecture. It loads on
/// its own, without a driver, so kernels can be compiled (and checked) on a machine with no GPU.
final class NVRTC: @unchecked Sendable {
    let library: DynamicLibrary
    let nvrtcVersion: @convention(c) (UnsafeMutablePointer<Int32>, UnsafeMutablePointer<Int32>) -> Int32
    let nvrtcCreateProgram: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, UnsafePointer<CChar>, UnsafePointer<CChar>?,
                                            Int32, UnsafePointer<UnsafePointer<CChar>?>?, UnsafePointer<UnsafePointer<CChar>?>?) -> Int32
    let nvrtcCompileProgram: @convention(c) (OpaquePointer?, Int32, UnsafePointer<UnsafePointer<CChar>?>?) -> Int32
    let nvrtcGetProgramLogSize: @convention(c) (OpaquePointer?, UnsafeMutablePointer<Int>) -> Int32
    let nvrtcGetProgramLog: @convention(c) (OpaquePointer?, UnsafeMutablePointer<CChar>) -> Int32
    let nvrtcGetCUBINSize: @convention(c) (OpaquePointer?, UnsafeMutablePointer<Int>) -> Int32
    let nvrtcGetCUBIN: @convention(c) (OpaquePointer?, UnsafeMutablePointer<CChar>) -> Int32
    let nvrtcDestroyProgram: @convention(c) (UnsafeMutablePointer<OpaquePointer?>) -> Int32
    let nvrtcGetErrorString: @convention(c) (Int32) -> UnsafePointer<CChar>?
    let nvrtcGetSupportedArchs: (@convention(c) (UnsafeMutablePointer<Int32>) -> Int32)?
    let nvrtcGetNumSupportedArchs: (@convention(c) (UnsafeMutablePointer<Int32>) -> Int32)?
    let version: (major: Int, minor: Int)

    init() throws {
        let l = try DynamicLibrary(["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"])
        library = l
        nvrtcVersion = try l.symbol("nvrtcVersion")
        nvrtcCreateProgram = try l.symbol("nvrtcCreateProgram")
        nvrtcCompileProgram = try l.symbol("nvrtcCompileProgram")
        nvrtcGetProgramLogSize = try l.symbol("nvrtcGetProgramLogSize")
        nvrtcGetProgramLog = try l.symbol("nvrtcGetProgramLog")
        nvrtcGetCUBINSize = try l.symbol("nvrtcGetCUBINSize")
        nvrtcGetCUBIN = try l.symbol("nvrtcGetCUBIN")
        nvrtcDestroyProgram = try l.symbol("nvrtcDestroyProgram")
        nvrtcGetErrorString = try l.symbol("nvrtcGetErrorString")
        nvrtcGetSupportedArchs = l.optionalSymbol("nvrtcGetSupportedArchs")
        nvrtcGetNumSupportedArchs = l.optionalSymbol("nvrtcGetNumSupportedArchs")
        var major: Int32 = 0, minor: Int32 = 0
        _ = nvrtcVersion(&major, &minor)
        version = (Int(major), Int(minor))
    }

    func check(_ code: Int32, _ call: String) throws {
        if code == 0 { return }
        let msg = nvrtcGetErrorString(code).map { String(cString: $0) } ?? "error \(code)"
        throw CUDAError.nvrtc(call: call, code: code, message: msg)
    }

    /// The architectures (`sm_XX` numbers) this NVRTC can compile for.
    var supportedArchitectures: [Int] {
        guard let count = nvrtcGetNumSupportedArchs, let get = nvrtcGetSupportedArchs else { return [] }
        var n: Int32 = 0
        guard count(&n) == 0, n > 0 else { return [] }
        var archs = [Int32](repeating: 0, count: Int(n))
        guard get(&archs) == 0 else { return [] }
        return archs.map(Int.init)
    }

    /// Compiles `source` to a cubin with `options`; throws the compiler log on failure.
    func compile(source: String, name: String, options: [String]) throws -> [UInt8] {
        var prog: OpaquePointer?
        try check(source.withCString { s in name.withCString { n in nvrtcCreateProgram(&prog, s, n, 0, nil, nil) } },
                  "nvrtcCreateProgram(\(name))")
        defer { _ = nvrtcDestroyProgram(&prog) }
        let cOptions = options.map { strdup($0) }
        defer { cOptions.forEach { free($0) } }
        let result = cOptions.map { UnsafePointer($0) }.withUnsafeBufferPointer { opts in
            nvrtcCompileProgram(prog, Int32(opts.count), opts.baseAddress)
        }
        var logSize = 0
        _ = nvrtcGetProgramLogSize(prog, &logSize)
        var log = ""
        if logSize > 1 {
            var buf = [CChar](repeating: 0, count: logSize + 1)
            _ = nvrtcGetProgramLog(prog, &buf)
            log = String(cString: buf)
        }
        if result != 0 { throw CUDAError.compile(program: "\(name) \(options.joined(separator: " "))", log: log) }
        var size = 0
        try check(nvrtcGetCUBINSize(prog, &size), "nvrtcGetCUBINSize(\(name))")
        var cubin = [CChar](repeating: 0, count: size)
        try check(nvrtcGetCUBIN(prog, &cubin), "nvrtcGetCUBIN(\(name))")
        return cubin.map { UInt8(bitPattern: $0) }
    }
}

/// cuBLASLt: matmuls, convolutions (after im2col) and the math attention path.
final class CuBLASLt: @unchecked Sendable {
    typealias Handle = OpaquePointer?
    let library: DynamicLibrary
    let cublasLtCreate: @convention(c) (UnsafeMutablePointer<Handle>) -> Int32
    let cublasLtGetVersion: @convention(c) () -> Int
    let cublasLtMatmulDescCreate: @convention(c) (UnsafeMutablePointer<Handle>, Int32, Int32) -> Int32
    let cublasLtMatmulDescDestroy: @convention(c) (Handle) -> Int32
    let cublasLtMatmulDescSetAttribute: @convention(c) (Handle, Int32, UnsafeRawPointer, Int) -> Int32
    let cublasLtMatrixLayoutCreate: @convention(c) (UnsafeMutablePointer<Handle>, Int32, UInt64, UInt64, Int64) -> Int32
    let cublasLtMatrixLayoutDestroy: @convention(c) (Handle) -> Int32
    let cublasLtMatrixLayoutSetAttribute: @convention(c) (Handle, Int32, UnsafeRawPointer, Int) -> Int32
    let cublasLtMatmulPreferenceCreate: @convention(c) (UnsafeMutablePointer<Handle>) -> Int32
    let cublasLtMatmulPreferenceDestroy: @convention(c) (Handle) -> Int32
    let cublasLtMatmulPreferenceSetAttribute: @convention(c) (Handle, Int32, UnsafeRawPointer, Int) -> Int32
    let cublasLtMatmulAlgoGetHeuristic: @convention(c) (Handle, Handle, Handle, Handle, Handle, Handle, Handle, Int32,
                                                        UnsafeMutableRawPointer, UnsafeMutablePointer<Int32>) -> Int32
    let cublasLtMatmul: @convention(c) (Handle, Handle, UnsafeRawPointer, CUdeviceptr, Handle, CUdeviceptr, Handle,
                                        UnsafeRawPointer, CUdeviceptr, Handle, CUdeviceptr, Handle, UnsafeRawPointer?,
                                        CUdeviceptr, Int, CUhandle) -> Int32

    init() throws {
        let l = try DynamicLibrary(["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"])
        library = l
        cublasLtCreate = try l.symbol("cublasLtCreate")
        cublasLtGetVersion = try l.symbol("cublasLtGetVersion")
        cublasLtMatmulDescCreate = try l.symbol("cublasLtMatmulDescCreate")
        cublasLtMatmulDescDestroy = try l.symbol("cublasLtMatmulDescDestroy")
        cublasLtMatmulDescSetAttribute = try l.symbol("cublasLtMatmulDescSetAttribute")
        cublasLtMatrixLayoutCreate = try l.symbol("cublasLtMatrixLayoutCreate")
        cublasLtMatrixLayoutDestroy = try l.symbol("cublasLtMatrixLayoutDestroy")
        cublasLtMatrixLayoutSetAttribute = try l.symbol("cublasLtMatrixLayoutSetAttribute")
        cublasLtMatmulPreferenceCreate = try l.symbol("cublasLtMatmulPreferenceCreate")
        cublasLtMatmulPreferenceDestroy = try l.symbol("cublasLtMatmulPreferenceDestroy")
        cublasLtMatmulPreferenceSetAttribute = try l.symbol("cublasLtMatmulPreferenceSetAttribute")
        cublasLtMatmulAlgoGetHeuristic = try l.symbol("cublasLtMatmulAlgoGetHeuristic")
        cublasLtMatmul = try l.symbol("cublasLtMatmul")
    }

    func check(_ status: Int32, _ call: @autoclosure () -> String) throws {
        if status != 0 { throw CUDAError.cublas(call: call(), status: status) }
    }

    // cudaDataType_t (library_types.h)
    static let r32F: Int32 = 0, r16F: Int32 = 2, r8I: Int32 = 3, r32I: Int32 = 10, r16BF: Int32 = 14, r8FE4M3: Int32 = 28
    // cublasComputeType_t (cublas_api.h)
    static let compute32F: Int32 = 68, compute32I: Int32 = 72, compute32FFastTF32: Int32 = 77
    // cublasLtMatmulDescAttributes_t
    static let descTransA: Int32 = 3, descTransB: Int32 = 4, descEpilogue: Int32 = 7, descBiasPointer: Int32 = 8
    // cublasLtMatrixLayoutAttribute_t
    static let layoutBatchCount: Int32 = 5, layoutStridedBatchOffset: Int32 = 6
    // cublasLtMatmulPreferenceAttributes_t
    static let prefMaxWorkspaceBytes: Int32 = 1
    static let prefMinAlignmentA: Int32 = 5, prefMinAlignmentB: Int32 = 6, prefMinAlignmentC: Int32 = 7, prefMinAlignmentD: Int32 = 8
    // cublasLtEpilogue_t
    static let epilogueDefault: UInt32 = 1, epilogueRelu: UInt32 = 2, epilogueBias: UInt32 = 4, epilogueReluBias: UInt32 = 6
    static let epilogueGelu: UInt32 = 32, epilogueGeluBias: UInt32 = 36
    /// sizeof(cublasLtMatmulHeuristicResult_t): algo (64) + workspaceSize (8) + state (4) + wavesCount (4) + reserved (16).
    static let heuristicResultSize = 96
    static let heuristicWorkspaceOffset = 64
    static let heuristicStateOffset = 72
}
