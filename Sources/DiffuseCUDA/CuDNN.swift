import DiffuseCore
import DiffuseGraph

/// cuDNN's (legacy, still shipped in v9) convolution API, loaded if libcudnn.so.9 is present.
/// Only the forward convolution is used; bias and epilogues run in our own kernel after it.
final class CuDNN: @unchecked Sendable {
    typealias Handle = OpaquePointer?
    typealias Fn1 = @convention(c) (UnsafeMutablePointer<Handle>) -> Int32
    typealias FnD = @convention(c) (Handle) -> Int32
    let library: DynamicLibrary
    let cudnnGetVersion: @convention(c) () -> Int
    let cudnnCreate: Fn1
    let cudnnSetStream: @convention(c) (Handle, CUhandle) -> Int32
    let cudnnCreateTensorDescriptor: Fn1
    let cudnnDestroyTensorDescriptor: FnD
    let cudnnSetTensor4dDescriptor: @convention(c) (Handle, Int32, Int32, Int32, Int32, Int32, Int32) -> Int32
    let cudnnCreateFilterDescriptor: Fn1
    let cudnnDestroyFilterDescriptor: FnD
    let cudnnSetFilter4dDescriptor: @convention(c) (Handle, Int32, Int32, Int32, Int32, Int32, Int32) -> Int32
    let cudnnCreateConvolutionDescriptor: Fn1
    let cudnnDestroyConvolutionDescriptor: FnD
    let cudnnSetConvolution2dDescriptor: @convention(c) (Handle, Int32, Int32, Int32, Int32, Int32, Int32, Int32, Int32) -> Int32
    let cudnnSetConvolutionGroupCount: @convention(c) (Handle, Int32) -> Int32
    let cudnnSetConvolutionMathType: @convention(c) (Handle, Int32) -> Int32
    let cudnnGetConvolutionForwardAlgorithm_v7: @convention(c) (Handle, Handle, Handle, Handle, Handle, Int32,
                                                                 UnsafeMutablePointer<Int32>, UnsafeMutableRawPointer) -> Int32
    let cudnnGetConvolutionForwardWorkspaceSize: @convention(c) (Handle, Handle, Handle, Handle, Handle, Int32,
                                                                 UnsafeMutablePointer<Int>) -> Int32
    let cudnnFindConvolutionForwardAlgorithmEx: @convention(c) (Handle, Handle, CUdeviceptr, Handle, CUdeviceptr, Handle, Handle,
                                                                CUdeviceptr, Int32, UnsafeMutablePointer<Int32>,
                                                                UnsafeMutableRawPointer, CUdeviceptr, Int) -> Int32
    let cudnnConvolutionForward: @convention(c) (Handle, UnsafeRawPointer, Handle, CUdeviceptr, Handle, CUdeviceptr, Handle,
                                                 Int32, CUdeviceptr, Int, UnsafeRawPointer, Handle, CUdeviceptr) -> Int32
    let cudnnGetErrorString: @convention(c) (Int32) -> UnsafePointer<CChar>?
    private(set) var handle: Handle = nil

    init(stream: CUhandle) throws {
        let l = try DynamicLibrary(["libcudnn.so.9", "libcudnn.so"])
        library = l
        cudnnGetVersion = try l.symbol("cudnnGetVersion")
        cudnnCreate = try l.symbol("cudnnCreate")
        cudnnSetStream = try l.symbol("cudnnSetStream")
        cudnnCreateTensorDescriptor = try l.symbol("cudnnCreateTensorDescriptor")
        cudnnDestroyTensorDescriptor = try l.symbol("cudnnDestroyTensorDescriptor")
        cudnnSetTensor4dDescriptor = try l.symbol("cudnnSetTensor4dDescriptor")
        cudnnCreateFilterDescriptor = try l.symbol("cudnnCreateFilterDescriptor")
        cudnnDestroyFilterDescriptor = try l.symbol("cudnnDestroyFilterDescriptor")
        cudnnSetFilter4dDescriptor = try l.symbol("cudnnSetFilter4dDescriptor")
        cudnnCreateConvolutionDescriptor = try l.symbol("cudnnCreateConvolutionDescriptor")
        cudnnDestroyConvolutionDescriptor = try l.symbol("cudnnDestroyConvolutionDescriptor")
        cudnnSetConvolution2dDescriptor = try l.symbol("cudnnSetConvolution2dDescriptor")
        cudnnSetConvolutionGroupCount = try l.symbol("cudnnSetConvolutionGroupCount")
        cudnnSetConvolutionMathType = try l.symbol("cudnnSetConvolutionMathType")
        cudnnGetConvolutionForwardAlgorithm_v7 = try l.symbol("cudnnGetConvolutionForwardAlgorithm_v7")
        cudnnGetConvolutionForwardWorkspaceSize = try l.symbol("cudnnGetConvolutionForwardWorkspaceSize")
        cudnnFindConvolutionForwardAlgorithmEx = try l.symbol("cudnnFindConvolutionForwardAlgorithmEx")
        cudnnConvolutionForward = try l.symbol("cudnnConvolutionForward")
        cudnnGetErrorString = try l.symbol("cudnnGetErrorString")
        try check(cudnnCreate(&handle), "cudnnCreate")
        try check(cudnnSetStream(handle, stream), "cudnnSetStream")
    }

    func check(_ s: Int32, _ call: @autoclosure () -> String) throws {
        if s == 0 { return }
        let msg = cudnnGetErrorString(s).map { String(cString: $0) } ?? "status \(s)"
        throw CUDAError.unsupported("cuDNN: \(call()) failed: \(msg)")
    }

    var version: Int { cudnnGetVersion() }

    // cudnnDataType_t, cudnnTensorFormat_t, cudnnConvolutionMode_t, cudnnMathType_t
    static let dataFloat: Int32 = 0, dataHalf: Int32 = 2, dataBFloat16: Int32 = 9
    static let formatNCHW: Int32 = 0, formatNHWC: Int32 = 1
    static let crossCorrelation: Int32 = 1
    static let mathDefault: Int32 = 0, mathTensorOp: Int32 = 1, mathFMA: Int32 = 3
    /// sizeof(cudnnConvolutionFwdAlgoPerf_t): algo, status, time (4 each), memory (8, at 16),
    /// determinism (24), mathType (28), reserved[3].
    static let perfSize = 48

    static func dataType(_ d: DType) -> Int32? {
        switch d {
        case .float32: return dataFloat
        case .float16: return dataHalf
        case .bfloat16: return dataBFloat16
        default: return nil
        }
    }
}

/// One convolution prepared with cuDNN: descriptors and algorithm chosen at compile time.
final class CudnnConvolution {
    private let dnn: CuDNN
    private var x: CuDNN.Handle = nil, y: CuDNN.Handle = nil, w: CuDNN.Handle = nil, conv: CuDNN.Handle = nil
    private(set) var algorithm: Int32 = 0
    private(set) var workspaceBytes = 0
    private let scalars: UnsafeMutablePointer<Float>

    /// Throws when cuDNN cannot do this convolution the way the precision demands (the caller
    /// then falls back to im2col + GEMM). Padding must be symmetric. With `channelsLast` the
    /// shapes are as stored: input and output [N,H,W,C], weight [O,kh,kw,I].
    init(_ dnn: CuDNN, input: [Int], weight: [Int], output: [Int], attributes a: Conv2dAttributes, dtype: DType,
         precision: Precision, channelsLast: Bool = false,
         tune: (ctx: CUDAContext, x: CUdeviceptr, w: CUdeviceptr, y: CUdeviceptr)? = nil) throws {
        self.dnn = dnn
        scalars = UnsafeMutablePointer<Float>.allocate(capacity: 2)
        scalars[0] = 1
        scalars[1] = 0
        guard a.padding.0 == a.padding.1, a.padding.2 == a.padding.3 else {
            throw CUDAError.unsupported("cuDNN needs symmetric padding")
        }
        guard let t = CuDNN.dataType(dtype) else { throw CUDAError.unsupported("cuDNN conv on \(dtype)") }
        let i32 = { (v: Int) in Int32(v) }
        // cuDNN takes logical NCHW dimensions whatever the format.
        let (input, weight, output) = channelsLast ? (nchwShape(input), nchwShape(weight), nchwShape(output)) : (input, weight, output)
        let format = channelsLast ? CuDNN.formatNHWC : CuDNN.formatNCHW
        try dnn.check(dnn.cudnnCreateTensorDescriptor(&x), "cudnnCreateTensorDescriptor")
        try dnn.check(dnn.cudnnCreateTensorDescriptor(&y), "cudnnCreateTensorDescriptor")
        try dnn.check(dnn.cudnnCreateFilterDescriptor(&w), "cudnnCreateFilterDescriptor")
        try dnn.check(dnn.cudnnCreateConvolutionDescriptor(&conv), "cudnnCreateConvolutionDescriptor")
        try dnn.check(dnn.cudnnSetTensor4dDescriptor(x, format, t, i32(input[0]), i32(input[1]), i32(input[2]), i32(input[3])),
                      "cudnnSetTensor4dDescriptor(x \(input))")
        try dnn.check(dnn.cudnnSetTensor4dDescriptor(y, format, t, i32(output[0]), i32(output[1]), i32(output[2]), i32(output[3])),
                      "cudnnSetTensor4dDescriptor(y \(output))")
        try dnn.check(dnn.cudnnSetFilter4dDescriptor(w, t, format, i32(weight[0]), i32(weight[1]), i32(weight[2]), i32(weight[3])),
                      "cudnnSetFilter4dDescriptor(\(weight))")
        try dnn.check(dnn.cudnnSetConvolution2dDescriptor(conv, i32(a.padding.0), i32(a.padding.2), i32(a.stride.0), i32(a.stride.1),
                                                          i32(a.dilation.0), i32(a.dilation.1), CuDNN.crossCorrelation, CuDNN.dataFloat),
                      "cudnnSetConvolution2dDescriptor")
        if a.groups > 1 { try dnn.check(dnn.cudnnSetConvolutionGroupCount(conv, i32(a.groups)), "cudnnSetConvolutionGroupCount") }
        // float32 must stay IEEE fp32 (no TF32): FMA math only. tf32 and 16-bit may use tensor cores.
        let exact = precision == .float32
        let requested = exact ? CuDNN.mathFMA : dtype == .float32 ? CuDNN.mathDefault : CuDNN.mathTensorOp
        try dnn.check(dnn.cudnnSetConvolutionMathType(conv, requested), "cudnnSetConvolutionMathType")
        let maxResults: Int32 = 16
        let perf = UnsafeMutableRawPointer.allocate(byteCount: CuDNN.perfSize * Int(maxResults), alignment: 16)
        defer { perf.deallocate() }
        /// The first usable entry of a result list (both calls sort best first).
        func firstUsable(_ returned: Int32) -> (algo: Int32, math: Int32)? {
            for k in 0..<Int(returned) {
                let p = perf + k * CuDNN.perfSize
                let status = p.load(fromByteOffset: 4, as: Int32.self)
                let math = p.load(fromByteOffset: 28, as: Int32.self)
                if status != 0 { continue }
                if exact && math != CuDNN.mathFMA { continue }
                return (p.load(as: Int32.self), math)
            }
            return nil
        }
        var chosen: (algo: Int32, math: Int32)?
        var returned: Int32 = 0
        if let tune {
            // Autotuning: cuDNN times every algorithm on the real buffers (cudnn.benchmark), once per problem.
            let key = "\(input) \(weight) \(output) \(a) \(dtype) \(precision) nhwc:\(channelsLast)"
            if let known = tune.ctx.tunedConvolution(key) {
                chosen = (known.algorithm, known.math)
            } else {
                let wsBytes = CudnnConvolution.tuneWorkspaceBytes
                let ws = try tune.ctx.allocator.allocate(wsBytes)
                try dnn.check(dnn.cudnnFindConvolutionForwardAlgorithmEx(dnn.handle, x, tune.x, w, tune.w, conv, y, tune.y, maxResults,
                                                                          &returned, perf, ws.pointer, wsBytes),
                              "cudnnFindConvolutionForwardAlgorithmEx")
                withExtendedLifetime(ws) {}
                chosen = firstUsable(returned)
                if let chosen { tune.ctx.setTunedConvolution(key, (chosen.algo, chosen.math)) }
            }
        }
        if chosen == nil {
            try dnn.check(dnn.cudnnGetConvolutionForwardAlgorithm_v7(dnn.handle, x, w, conv, y, maxResults, &returned, perf),
                          "cudnnGetConvolutionForwardAlgorithm_v7")
            chosen = firstUsable(returned)
        }
        guard let chosen else { throw CUDAError.unsupported("cuDNN offers no algorithm for conv \(input) * \(weight)") }
        try dnn.check(dnn.cudnnSetConvolutionMathType(conv, chosen.math), "cudnnSetConvolutionMathType")
        algorithm = chosen.algo
        var ws = 0
        try dnn.check(dnn.cudnnGetConvolutionForwardWorkspaceSize(dnn.handle, x, w, conv, y, algorithm, &ws),
                      "cudnnGetConvolutionForwardWorkspaceSize")
        workspaceBytes = ws
    }

    /// The workspace cuDNN may use while timing algorithms (the chosen one's is allocated after).
    static let tuneWorkspaceBytes = 256 << 20

    deinit {
        if x != nil { _ = dnn.cudnnDestroyTensorDescriptor(x) }
        if y != nil { _ = dnn.cudnnDestroyTensorDescriptor(y) }
        if w != nil { _ = dnn.cudnnDestroyFilterDescriptor(w) }
        if conv != nil { _ = dnn.cudnnDestroyConvolutionDescriptor(conv) }
        scalars.deallocate()
    }

    func run(x xp: CUdeviceptr, w wp: CUdeviceptr, y yp: CUdeviceptr, workspace: CUdeviceptr) throws {
        try dnn.check(dnn.cudnnConvolutionForward(dnn.handle, scalars, x, xp, w, wp, conv, algorithm, workspace, workspaceBytes,
                                                  scalars + 1, y, yp), "cudnnConvolutionForward")
    }
}
