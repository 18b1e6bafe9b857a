// The CUDA backend.
//
// Why dlopen: the driver (libcuda.so.1), NVRTC, cuBLASLt (and cuDNN if present) are loaded with
// dlopen/dlsym and declared here as @convention(c) function types, so the one `diffuse` binary
// builds where no CUDA is installed and runs on machines without a GPU; `CUDABackend.init()`
// throws an error naming the library, symbol, driver version or device that is missing.
// Libraries are looked for in `DIFFUSE_CUDA_LIBS` (colon-separated folders, e.g. the Python
// wheels' site-packages/nvidia/*/lib), on the loader's path (LD_LIBRARY_PATH included) and in the
// usual toolkit folders.
//
// Kernels: CUDA C in Kernels/ (one Swift file per family), compiled at first use by NVRTC for
// the device's sm_XX and cached on disk ($XDG_CACHE_HOME or ~/.cache/diffuse/cuda). They need
// no CUDA headers: the 16-bit types and conversions are our own (PTX cvt, bit arithmetic).
// The few PTX sites (cvt, mma, ldmatrix, cp.async) have a DIFFUSE_EMULATOR branch for the tests'
// CPU emulator (Tests/CUDAEmulator), which runs this whole backend and its kernels without a GPU.
//
// Why arenas: every compiled graph gets one device buffer planned by MemoryPlanner (values alive
// at the same time never overlap; reshapes and leading-axis slices are views), plus fixed input
// buffers and one scratch buffer. Pointers never change after compile, each op's launch
// arguments and cuBLASLt descriptors/algorithms are prepared once, and `run` only queues work on
// the backend's one stream without host syncs, which is what CUDA-graph capture will need.
// Weights are uploaded once per `ModelWeights` (its `prepared` cache), so graphs of other
// shapes share them. Device memory comes from a caching allocator whose high-water mark is
// `peakMemoryBytes`; host transfers go through pinned staging buffers. With the
// "sequential-offload" flag weights stay in page-locked host memory instead: the graph is
// reordered so each weight comes right before its first reader, and the planner gives it an
// arena slot like any activation, filled by an async upload step (capturable, no host sync).
//
// Random numbers: `torchNormal` runs torch's CUDA normal kernel (Kernels/Random.swift) so that
// `torch.Generator("cuda")` seeds give the same bits as in PyTorch on the same GPU.
//
// Before lowering, GraphPasses fold activations, residual adds and scales into conv/linear
// epilogues (bias and a leading residual add go into the cuBLASLt call itself) and activations
// into GroupNorm (flag "no-fusion" turns this off).
//
// Precision: activations are stored in float32 (fp32, tf32), float16 or bfloat16; every
// kernel computes in float32 and GroupNorm/LayerNorm/softmax statistics are float32. GEMMs
// (linear, matmul, conv after im2col, math attention) are cuBLASLt with float32 accumulation
// (tf32: CUBLAS_COMPUTE_32F_FAST_TF32). `weightStorage` keeps conv/linear weights in another
// float type, widened by a cast before use. Graph inputs keep their declared dtype (timesteps
// stay float32), and `toHost` returns floats as float32.
//
// Layout: row-major NCHW, unless the "channels-last" flag applies GraphPasses.channelsLast after
// fusion: then ungrouped convolutions, GroupNorms and upsamplings run on [N,H,W,C] images and
// the transformer blocks' layout permutes vanish. Convolution runs on cuDNN's forward
// convolution (NCHW or NHWC descriptors; fp32 restricted to FMA math so it stays IEEE fp32) when
// libcudnn.so.9 loads and the padding is symmetric, else as im2col + cuBLASLt GEMM (any kernel,
// stride, dilation, asymmetric padding, groups; in NHWC one GEMM per chunk with bias and a
// residual inside cuBLASLt, a 1x1 kernel straight on the input); other epilogues follow in one
// kernel. Flag "no-cudnn" (or DIFFUSE_CUDA_NO_CUDNN=1) forces the im2col path. Channels-last
// GroupNorm is three kernels (per-chunk sums reading whole pixels, per-group statistics,
// elementwise apply). Attention is a flash-style kernel (mma.sync tensor cores for fp16/bf16 with
// FlashAttention-2's double-buffered tiles, FMA for float32) for head dims up to 160, else the
// math path; flag "basic-attention" takes the first, unpipelined 16-bit kernel instead. The
// memory-bound kernels (conv/linear epilogue, GEGLU, binaries, GroupNorm, LayerNorm) move eight
// elements per 16-byte access where sizes come in eights and addresses are aligned. Flag "autotune" picks cuBLASLt
// and cuDNN algorithms by timing the candidates on the real buffers at build time instead of
// taking the heuristics' first choice.

import DiffuseCore
import DiffuseGraph

public final class CUDABackend: Backend, TorchCUDANormalDevice {
    let ctx: CUDAContext

    /// Opens GPU `ordinal`; throws a clear error when CUDA, NVRTC, cuBLASLt or a device is missing.
    public init(device ordinal: Int = 0) throws {
        ctx = try CUDAContext(ordinal: ordinal)
    }

    public var name: String { "cuda" }

    public var deviceDescription: String {
        let gib = Double(ctx.totalMemory) / Double(1 << 30)
        let gibText = String(Int(gib * 10) / 10) + "." + String(Int(gib * 10) % 10)
        return "\(ctx.deviceName) (sm_\(ctx.architecture), \(ctx.multiprocessors) SMs, \(gibText) GiB), driver CUDA \(ctx.driverVersion / 1000).\(ctx.driverVersion % 1000 / 10), NVRTC \(ctx.compiler.nvrtcVersion), cuBLASLt \(ctx.cublas.cublasLtGetVersion())"
    }

    public var peakMemoryBytes: Int { ctx.allocator.peak }

    public func resetPeakMemory() { ctx.allocator.resetPeak() }

    public func compile(_ graph: Graph, weights: ModelWeights?, options: CompileOptions) throws -> Executable {
        try ctx.makeCurrent()
        return try CUDAExecutable(ctx, graph: graph, weights: weights, options: options)
    }

    /// Copies a host tensor to the device, keeping its dtype.
    public func upload(_ tensor: Tensor) throws -> DeviceTensor {
        try ctx.makeCurrent()
        let b = try ctx.allocator.allocate(max(tensor.byteCount, 1))
        try ctx.staging.upload(tensor.raw, bytes: tensor.byteCount, to: b.pointer)
        return CUDADeviceTensor(shape: tensor.shape, dtype: tensor.dtype, pointer: b.pointer, owner: b, context: ctx)
    }

    /// `Σ cᵢ·xᵢ` in double, written as a new float32 tensor; eight terms per launch.
    public func linearCombination(_ terms: [(Double, DeviceTensor)]) throws -> DeviceTensor {
        try ctx.makeCurrent()
        guard let first = terms.first else { throw CUDAError.invalidInput("linearCombination of no terms") }
        var xs: [CUDADeviceTensor] = []
        for (_, t) in terms {
            guard let x = t as? CUDADeviceTensor else { throw CUDAError.invalidInput("linearCombination: a term is not a CUDA tensor") }
            guard x.count == first.1.shape.reduce(1, *) else {
                throw CUDAError.invalidInput("linearCombination: shapes \(x.shape) and \(first.1.shape) differ")
            }
            guard [.float32, .float16, .bfloat16].contains(x.dtype) else {
                throw CUDAError.invalidInput("linearCombination: a term has dtype \(x.dtype)")
            }
            xs.append(x)
        }
        let count = xs[0].count
        let out = try ctx.allocator.allocate(max(count * 4, 1))
        let f = try ctx.function(.copy, .float32, "linear_combination")
        var done = 0
        while done < terms.count {
            var ptrs: [UInt64] = [], kinds: [Int] = [], coefs: [Double] = []
            if done > 0 { ptrs.append(out.pointer); kinds.append(0); coefs.append(1) }
            while done < terms.count && ptrs.count < 8 {
                let x = xs[done]
                ptrs.append(x.pointer)
                kinds.append(x.dtype == .float32 ? 0 : x.dtype == .float16 ? 1 : 2)
                coefs.append(terms[done].0)
                done += 1
            }
            var s = StructBytes()
            s.i64(ptrs.count)
            for k in 0..<8 { s.u64(k < ptrs.count ? ptrs[k] : 0) }
            s.i64Array(kinds, count: 8)
            for k in 0..<8 { s.f64(k < coefs.count ? coefs[k] : 0) }
            if count > 0 {
                try ctx.launch(Launch(function: f, grid: (ctx.elementwiseGrid(count), 1, 1), block: 256, sharedBytes: 0,
                                      args: KernelArgs([.ptr(out.pointer), .i64(Int64(count)), .bytes(s.bytes)]),
                                      label: "linear_combination"))
            }
        }
        return CUDADeviceTensor(shape: first.1.shape, dtype: .float32, pointer: out.pointer, owner: out, context: ctx)
    }

    public var multiprocessorCount: Int { ctx.multiprocessors }
    public var maxThreadsPerMultiprocessor: Int { ctx.maxThreadsPerMultiprocessor }

    /// torch's CUDA normal kernel (Kernels/Random.swift) with `threads` threads in total at Philox
    /// `offset`: `count` float32 normals, bit-exact with `torch.randn` on this GPU when `threads`
    /// is torch's grid for `count` (TorchCUDAGenerator computes it and keeps the offset).
    public func torchNormal(count: Int, seed: UInt64, offset: UInt64, threads: Int) throws -> Tensor {
        try ctx.makeCurrent()
        guard count > 0 else { return Tensor(zeros: [0], dtype: .float32) }
        guard threads > 0, threads % 256 == 0, offset % 4 == 0 else {
            throw CUDAError.invalidInput("torchNormal: \(threads) threads (a multiple of 256) at offset \(offset) (a multiple of 4)")
        }
        let out = try ctx.allocator.allocate(count * 4)
        let f = try ctx.function(.copy, .float32, "torch_philox_normal")
        try ctx.launch(Launch(function: f, grid: (UInt32(threads / 256), 1, 1), block: 256, sharedBytes: 0,
                              args: KernelArgs([.ptr(out.pointer), .i64(Int64(count)), .i64(Int64(bitPattern: seed)),
                                                .i64(Int64(bitPattern: offset)), .f32(0), .f32(1)]),
                              label: "torch_philox_normal"))
        let t = Tensor(zeros: [count], dtype: .float32)
        try ctx.staging.download(out.pointer, bytes: count * 4, to: t.raw)
        return t
    }

    public func synchronize() throws {
        try ctx.makeCurrent()
        try ctx.synchronize()
    }

    /// Frees cached device blocks no tensor uses (after dropping executables or weights).
    public func emptyCache() { ctx.allocator.emptyCache() }
}
