import DiffuseCore
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The CUDA backend without a GPU: `Tests/CUDAEmulator` emulates the driver API, NVRTC, cuBLASLt
/// and cuDNN's convolution on the CPU (kernels compiled as C++ by the host compiler, every CUDA
/// thread a fiber, tensor-core instructions lane by lane, the libraries' calls as loops over
/// what their descriptors mean), so the backend's host code and its real kernels run here. It
/// checks our code, not NVIDIA's: the GPU session scripts still have the last word on timing and
/// on what the hardware rounds differently.
struct CUDAEmulator {
    /// The folder holding the emulator under the CUDA libraries' names, or why there is none.
    static let folder: Result<String, FileError> = build()

    static var available: Bool { if case .success = folder { return true } else { return false } }

    static var skipReason: Comment {
        if case .failure(let e) = folder { return "CUDA emulator not built: \(e)" }
        return ""
    }

    /// The environment of a `diffuse` run on the emulator: its libraries before any real ones,
    /// a kernel cache of its own.
    static func environment(_ dir: String) -> [String: String] {
        ["DIFFUSE_CUDA_LIBS": dir, "XDG_CACHE_HOME": dir + "/cache"]
    }

    private static func build() -> Result<String, FileError> {
        let sources = Files.join(packageRoot(), "Tests/CUDAEmulator")
        guard let cxx = compiler() else {
            return .failure(FileError("c++", "no C++ compiler found (set CXX, or install g++ or clang++)"))
        }
        let dir = "/tmp/diffuse-cuda-emulator-\(getpid())"
        try? Files.createDirectory(dir)
        let library = dir + "/libcuda_emulator.so"
        let run = spawn(cxx, ["-std=c++17", "-O2", "-shared", "-fPIC", "-w",
                              "-DEMU_RUNTIME=\"\(sources)/emulator_runtime.h\"", "-DEMU_CXX=\"\(cxx)\"",
                              sources + "/cuda_emulator.cpp", "-o", library, "-ldl"], environment: [:])
        guard run.status == 0 else { return .failure(FileError(sources + "/cuda_emulator.cpp", "does not build: \(run.err)")) }
        for name in ["libcuda.so.1", "libnvrtc.so", "libcublasLt.so", "libcudnn.so.9"] {
            unlink(dir + "/" + name)
            symlink("libcuda_emulator.so", dir + "/" + name)
        }
        return .success(dir)
    }

    /// CXX if set, else the first of c++, g++, clang++ on PATH.
    private static func compiler() -> String? {
        if let cxx = Files.environment("CXX"), !cxx.isEmpty { return cxx }
        let path = (Files.environment("PATH") ?? "/usr/bin:/bin").split(separator: ":").map(String.init)
        for name in ["c++", "g++", "clang++"] {
            if let dir = path.first(where: { Files.exists(Files.join($0, name)) }) { return Files.join(dir, name) }
        }
        return nil
    }

    /// The package root, from this file's path.
    private static func packageRoot(_ file: String = #filePath) -> String {
        var parts = file.split(separator: "/", omittingEmptySubsequences: false)
        parts.removeLast(3)  // Tests/DiffusePipelinesTests/CUDAEmulatorTests.swift
        return parts.joined(separator: "/")
    }
}

@Suite("The CUDA backend on the CPU emulator", .serialized)
struct CUDAEmulatorTests {
    /// Every op of the self-test (each precision, fused and math attention, the pipelined and
    /// the basic attention kernels, 8-wide and scalar elementwise kernels, channels-last,
    /// CUDA graphs, int8 and fp8 linears) against the reference interpreter.
    @Test(.enabled(if: CUDAEmulator.available, CUDAEmulator.skipReason))
    func selfTest() throws {
        let dir = try CUDAEmulator.folder.get()
        let run = try runDiffuse(["cuda-selftest"], environment: CUDAEmulator.environment(dir))
        let summary = run.out.split(separator: "\n").last { $0.hasPrefix("CUDA self-test:") } ?? "no summary"
        let failures = run.out.split(separator: "\n").filter { $0.hasPrefix("FAIL") }
        #expect(run.status == 0, "exit \(run.status): \(summary)\n\(failures.prefix(20).joined(separator: "\n"))\n\(run.err.suffix(2000))")
        print(summary)
    }

    /// The tiny diffusers models end to end (text encoder, UNet, VAE, schedulers, images) on the
    /// emulated GPU against diffusers' goldens, in fp32 and fp16 with the compiled path's
    /// switches (fused QKV, CUDA graphs, channels-last, autotuned algorithms).
    @Test(.enabled(if: CUDAEmulator.available, CUDAEmulator.skipReason),
          arguments: [["--precision", "fp32"], ["--precision", "fp16", "--fuse-qkv", "--cuda-graphs", "--channels-last", "--autotune"]])
    func reference(_ options: [String]) throws {
        let dir = try CUDAEmulator.folder.get()
        let run = try runDiffuse(["check-reference", "--device", "cuda", "--reference", Fixtures.reference("")] + options,
                                 environment: CUDAEmulator.environment(dir))
        let failures = run.out.split(separator: "\n").filter { $0.hasPrefix("FAIL") }
        #expect(run.status == 0, "\(options): exit \(run.status)\n\(failures.prefix(20).joined(separator: "\n"))\n\(run.err.suffix(2000))")
        print("check-reference \(options.joined(separator: " ")): \(run.out.split(separator: "\n").last ?? "")")
    }
}
