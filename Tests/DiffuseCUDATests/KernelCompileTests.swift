import DiffuseCore
import Testing
import DiffuseCUDA

/// NVRTC on this machine, if any: `DIFFUSE_CUDA_LIBS` or the standard loader path.
let nvrtcCompiler: KernelCompiler? = {
    do {
        return try KernelCompiler(architecture: 90, cacheFolder: nil)
    } catch {
        print("skipping NVRTC kernel compilation: \(error)")
        return nil
    }
}()

@Suite struct KernelCompileTests {
    /// Every family compiles for sm_90 with every storage type it is instantiated for, and
    /// the cubin holds every kernel the backend launches.
    @Test(.enabled(if: nvrtcCompiler != nil, "NVRTC not found (set DIFFUSE_CUDA_LIBS)"),
          arguments: KernelFamily.allCases)
    func compiles(_ family: KernelFamily) throws {
        let compiler = try #require(nvrtcCompiler)
        let storages: [DType] = family.dependsOnStorage ? [.float32, .float16, .bfloat16] : [.float32]
        for s in storages {
            let cubin = try compiler.cubin(family, storage: s)
            #expect(cubin.count > 1000, "\(family) \(s): cubin of \(cubin.count) bytes")
            // ELF magic
            #expect(Array(cubin.prefix(4)) == [0x7f, 0x45, 0x4c, 0x46], "\(family) \(s) is not an ELF cubin")
            let text = String(decoding: cubin, as: UTF8.self)
            for name in family.kernelNames {
                #expect(text.contains(name), "\(family) \(s): kernel \(name) missing from the cubin")
            }
        }
    }
}
