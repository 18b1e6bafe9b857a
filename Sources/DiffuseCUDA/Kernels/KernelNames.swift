import DiffuseCore

/// The kernel entry points the backend launches, by family (the compile test checks each one
/// is in its cubin).
enum KernelNames {
    static let elementwise = ["unary_kernel", "binary_same", "binary_same_v8", "binary_bcast", "binary_bcast_v8",
                              "affine_kernel", "clamp_kernel", "geglu_kernel", "geglu_v8", "epilogue_kernel", "epilogue_v8", "embedding_i32", "embedding_i64",
                              "timestep_embedding", "im2col_kernel", "im2col_nhwc_kernel", "resize_bilinear", "max_pool2d"]
    static let norm = ["groupnorm_stats", "groupnorm_apply", "groupnorm_stats_nhwc", "groupnorm_finalize_nhwc",
                       "groupnorm_apply_nhwc", "layernorm_kernel", "softmax_kernel", "softmax_f32in",
                       "reduce_kernel"]
    static let attention = AttentionKernels.headDimBuckets.map { "flash_attention_d\($0)" }
    static let attentionBasic = AttentionKernels.headDimBuckets.map { "flash_attention_basic_d\($0)" }
    static let quantize = ["quantize_rows_int8", "quantize_rows_e4m3", "dequantize_i32", "dequantize_f32"]
    static let castTypes: [DType] = [.float32, .float16, .bfloat16, .float64, .int8, .uint8, .int32, .int64, .bool]
    static let copy = ["strided_copy_1", "strided_copy_2", "strided_copy_4", "strided_copy_8", "linear_combination",
                            "torch_philox_normal"]
        + castTypes.flatMap { s in castTypes.map { d in cast(s, d) } }

    static func launched(_ f: KernelFamily) -> [String] {
        switch f {
        case .elementwise: return elementwise
        case .copy: return copy
        case .norm: return norm
        case .attention: return attention
        case .attentionBasic: return attentionBasic
        case .quantize: return quantize
        }
    }

    static func typeName(_ d: DType) -> String {
        switch d {
        case .float32: return "f32"
        case .float16: return "f16"
        case .bfloat16: return "bf16"
        case .float64: return "f64"
        case .int8: return "i8"
        case .uint8: return "u8"
        case .int32: return "i32"
        case .int64: return "i64"
        case .bool: return "bool"
        }
    }

    static func cast(_ from: DType, _ to: DType) -> String { "cast_\(typeName(from))_\(typeName(to))" }
}
