import CDNNL
import DiffuseCore
import DiffuseGraph

/// A thin, throwing Swift face on oneDNN's C API (v2.6): engine and stream, memory
/// descriptors, primitives with their argument lists. Everything oneDNN-specific lives here
/// and in the step builders; kernels never see it.
enum DNNL {
    struct Failure: Error, CustomStringConvertible {
        let what: String
        let status: dnnl_status_t
        var description: String { "oneDNN: \(what) failed (status \(status.rawValue))" }
    }

    static func check(_ s: dnnl_status_t, _ what: @autoclosure () -> String) throws {
        if s != dnnl_success { throw Failure(what: what(), status: s) }
    }

    /// One CPU engine and one in-order stream for the process.
    final class Context: @unchecked Sendable {
        let engine: dnnl_engine_t
        let stream: dnnl_stream_t

        init() throws {
            var e: dnnl_engine_t?
            try check(dnnl_engine_create(&e, dnnl_cpu, 0), "creating the CPU engine")
            var s: dnnl_stream_t?
            try check(dnnl_stream_create(&s, e, dnnl_stream_default_flags.rawValue), "creating a stream")
            engine = e!
            stream = s!
        }

        static let shared: Result<Context, Error> = Result { try Context() }
    }

    /// A memory descriptor (dims, data type, layout).
    struct MemoryDesc {
        var md = dnnl_memory_desc_t()

        init(_ md: dnnl_memory_desc_t) { self.md = md }

        init(dims: [Int], type: dnnl_data_type_t = dnnl_f32, tag: dnnl_format_tag_t) throws {
            var d = dims.map { dnnl_dim_t($0) }
            try check(dnnl_memory_desc_init_by_tag(&md, Int32(dims.count), &d, type, tag), "describing memory \(dims)")
        }

        init(dims: [Int], type: dnnl_data_type_t = dnnl_f32, strides: [Int]) throws {
            var d = dims.map { dnnl_dim_t($0) }
            var s = strides.map { dnnl_dim_t($0) }
            try check(dnnl_memory_desc_init_by_strides(&md, Int32(dims.count), &d, type, &s), "describing memory \(dims)")
        }

        /// Row-major (plain) memory of these dims.
        static func plain(_ dims: [Int], type: dnnl_data_type_t = dnnl_f32) throws -> MemoryDesc {
            try MemoryDesc(dims: dims, type: type, strides: DiffuseGraph.strides(dims))
        }

        /// Let the primitive choose the layout.
        static func any(_ dims: [Int], type: dnnl_data_type_t = dnnl_f32) throws -> MemoryDesc {
            try MemoryDesc(dims: dims, type: type, tag: dnnl_format_tag_any)
        }

        var byteCount: Int {
            var m = md
            return Int(dnnl_memory_desc_get_size(&m))
        }

        func equals(_ other: MemoryDesc) -> Bool {
            var a = md, b = other.md
            return dnnl_memory_desc_equal(&a, &b) != 0
        }
    }

    /// A memory object over a caller-owned buffer.
    final class Memory {
        let handle: dnnl_memory_t
        let desc: MemoryDesc

        init(_ desc: MemoryDesc, _ pointer: UnsafeMutableRawPointer?, _ context: Context) throws {
            var m: dnnl_memory_t?
            var md = desc.md
            try check(dnnl_memory_create(&m, &md, context.engine, pointer), "creating a memory object")
            handle = m!
            self.desc = desc
        }

        deinit { dnnl_memory_destroy(handle) }
    }

    /// Post-ops and other attributes of a primitive.
    final class Attributes {
        let attr: dnnl_primitive_attr_t

        init() throws {
            var a: dnnl_primitive_attr_t?
            try check(dnnl_primitive_attr_create(&a), "creating attributes")
            attr = a!
            // The executable hands every primitive a slice of one shared scratch buffer.
            try check(dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user), "setting scratchpad mode")
        }

        func setPostOps(_ ops: [Epilogue], dstDesc: MemoryDesc) throws {
            guard !ops.isEmpty else { return }
            var po: dnnl_post_ops_t?
            try check(dnnl_post_ops_create(&po), "creating post-ops")
            defer { dnnl_post_ops_destroy(po) }
            for op in ops {
                switch op {
                case .addInput:
                    try check(dnnl_post_ops_append_sum(po, 1), "appending a sum post-op")
                case .scale(let s):
                    try check(dnnl_post_ops_append_eltwise(po, 1, dnnl_eltwise_linear, s, 0), "appending a scale post-op")
                case .activation(let u):
                    let (alg, alpha, beta) = try DNNL.eltwise(u)
                    try check(dnnl_post_ops_append_eltwise(po, 1, alg, alpha, beta), "appending a \(u) post-op")
                }
            }
            try check(dnnl_primitive_attr_set_post_ops(attr, po), "setting post-ops")
        }

        deinit { dnnl_primitive_attr_destroy(attr) }
    }

    /// oneDNN's eltwise algorithm for an activation.
    static func eltwise(_ u: UnaryOp) throws -> (dnnl_alg_kind_t, Float, Float) {
        switch u {
        case .silu: return (dnnl_eltwise_swish, 1, 0)
        case .quickGelu: return (dnnl_eltwise_swish, 1.702, 0)
        case .gelu: return (dnnl_eltwise_gelu_erf, 0, 0)
        case .geluTanh: return (dnnl_eltwise_gelu_tanh, 0, 0)
        case .relu: return (dnnl_eltwise_relu, 0, 0)
        case .tanh: return (dnnl_eltwise_tanh, 0, 0)
        case .sigmoid: return (dnnl_eltwise_logistic, 0, 0)
        default: throw BackendError("no oneDNN post-op for \(u)")
        }
    }

    /// Whether an epilogue can run as oneDNN post-ops.
    static func supports(_ ops: [Epilogue]) -> Bool {
        var sums = 0
        for op in ops {
            switch op {
            case .addInput: sums += 1
            case .scale: break
            case .activation(let u): if (try? eltwise(u)) == nil { return false }
            }
        }
        return sums <= 1
    }

    /// A primitive with its descriptor.
    final class Primitive {
        let pd: dnnl_primitive_desc_t
        let primitive: dnnl_primitive_t

        /// Creates from an op descriptor (conv, matmul, ...).
        init(opDesc: UnsafeRawPointer, attributes: Attributes?, context: Context, what: String) throws {
            var pd: dnnl_primitive_desc_t?
            try check(dnnl_primitive_desc_create(&pd, opDesc, attributes?.attr, context.engine, nil),
                      "creating \(what)")
            self.pd = pd!
            var p: dnnl_primitive_t?
            let status = dnnl_primitive_create(&p, pd)
            if status != dnnl_success { dnnl_primitive_desc_destroy(pd); throw Failure(what: "creating \(what)", status: status) }
            primitive = p!
        }

        /// A reorder between two layouts.
        init(reorderFrom src: MemoryDesc, to dst: MemoryDesc, context: Context) throws {
            var pd: dnnl_primitive_desc_t?
            var s = src.md, d = dst.md
            let attr = try Attributes()
            try check(dnnl_reorder_primitive_desc_create(&pd, &s, context.engine, &d, context.engine, attr.attr),
                      "creating a reorder")
            self.pd = pd!
            var p: dnnl_primitive_t?
            try check(dnnl_primitive_create(&p, pd), "creating a reorder")
            primitive = p!
        }

        func desc(_ what: dnnl_query_t, _ index: Int32 = 0) -> MemoryDesc {
            MemoryDesc(dnnl_primitive_desc_query_md(pd, what, index).pointee)
        }

        var scratchpadBytes: Int { desc(dnnl_query_scratchpad_md).byteCount }

        /// The kernel oneDNN chose, e.g. "jit_uni_int8:avx2" or "ref_int8:any".
        var implementation: String {
            var s: UnsafePointer<CChar>?
            guard dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &s) == dnnl_success, let s else { return "" }
            return String(cString: s)
        }

        deinit {
            dnnl_primitive_destroy(primitive)
            dnnl_primitive_desc_destroy(pd)
        }
    }

    /// A primitive bound to its memory objects: one `execute` per run.
    final class BoundPrimitive {
        let primitive: Primitive
        let memories: [Memory]
        var args: [dnnl_exec_arg_t]
        let stream: dnnl_stream_t
        let what: String

        init(_ primitive: Primitive, _ bindings: [(Int32, Memory)], context: Context, what: String) {
            self.primitive = primitive
            memories = bindings.map(\.1)
            args = bindings.map { dnnl_exec_arg_t(arg: $0.0, memory: $0.1.handle) }
            stream = context.stream
            self.what = what
        }

        func execute() throws {
            let n = Int32(args.count)
            try args.withUnsafeBufferPointer { a in
                try check(dnnl_primitive_execute(primitive.primitive, stream, n, a.baseAddress), "running \(what)")
            }
        }
    }

    /// Copies `src` (layout `from`) into `dst` (layout `to`) once, e.g. to reorder weights.
    static func reorder(_ src: UnsafeMutableRawPointer, _ from: MemoryDesc, _ dst: UnsafeMutableRawPointer, _ to: MemoryDesc,
                        context: Context) throws {
        let r = try Primitive(reorderFrom: from, to: to, context: context)
        let a = try Memory(from, src, context), b = try Memory(to, dst, context)
        let scratch = r.scratchpadBytes > 0 ? Tensor(zeros: [r.scratchpadBytes], dtype: .uint8) : nil
        var bindings: [(Int32, Memory)] = [(DNNL_ARG_FROM, a), (DNNL_ARG_TO, b)]
        if let scratch { bindings.append((DNNL_ARG_SCRATCHPAD, try Memory(r.desc(dnnl_query_scratchpad_md), scratch.raw, context))) }
        // The scratch tensor must outlive the run: Swift may release a local after its last use.
        try withExtendedLifetime(scratch) {
            try BoundPrimitive(r, bindings, context: context, what: "a reorder").execute()
            try check(dnnl_stream_wait(context.stream), "waiting for a reorder")
        }
    }
}
