/// Kernels that do not depend on the storage type: strided copies by element size (permute,
/// slice, concat, upsample are all strided copies), casts between every pair of dtypes, and
/// the scheduler's linear combination (and, from Random.swift, torch's CUDA normal generator).
enum CopyKernels {
    static let source = #"""
// y[sb . idx] = x[sa . idx] for every idx of s.shape.
#define STRIDED_COPY(NAME, E) \
extern "C" __global__ void NAME(const E* x, E* y, i64 n, Strided s) { \
    GRID_STRIDE(i, n) { i64 ox, oy; strided_offsets(s, i, ox, oy); y[oy] = x[ox]; } \
}
STRIDED_COPY(strided_copy_1, u8)
STRIDED_COPY(strided_copy_2, u16)
STRIDED_COPY(strided_copy_4, u32)
STRIDED_COPY(strided_copy_8, u64)

__device__ __forceinline__ double to_double(float v) { return (double)v; }
__device__ __forceinline__ double to_double(f16 v) { return (double)tofloat(v); }
__device__ __forceinline__ double to_double(bf16 v) { return (double)tofloat(v); }
__device__ __forceinline__ double to_double(double v) { return v; }
__device__ __forceinline__ double to_double(i8 v) { return (double)v; }
__device__ __forceinline__ double to_double(u8 v) { return (double)v; }
__device__ __forceinline__ double to_double(int v) { return (double)v; }
__device__ __forceinline__ double to_double(i64 v) { return (double)v; }

struct boolean { u8 v; };
__device__ __forceinline__ double to_double(boolean v) { return v.v ? 1.0 : 0.0; }

__device__ __forceinline__ double clamp_trunc(double v, double lo, double hi) {
    v = trunc(v);
    if (v != v) return 0.0;
    return v < lo ? lo : (v > hi ? hi : v);
}
template <typename D> __device__ __forceinline__ D from_double(double v);
template <> __device__ __forceinline__ float from_double<float>(double v) { return (float)v; }
template <> __device__ __forceinline__ f16 from_double<f16>(double v) { return fromfloat<f16>((float)v); }
template <> __device__ __forceinline__ bf16 from_double<bf16>(double v) { return fromfloat<bf16>((float)v); }
template <> __device__ __forceinline__ double from_double<double>(double v) { return v; }
template <> __device__ __forceinline__ i8 from_double<i8>(double v) { return (i8)clamp_trunc(v, -128.0, 127.0); }
template <> __device__ __forceinline__ u8 from_double<u8>(double v) { return (u8)clamp_trunc(v, 0.0, 255.0); }
template <> __device__ __forceinline__ int from_double<int>(double v) { return (int)clamp_trunc(v, -2147483648.0, 2147483647.0); }
template <> __device__ __forceinline__ i64 from_double<i64>(double v) {
    return (i64)clamp_trunc(v, -9223372036854775808.0, 9223372036854774784.0);
}
template <> __device__ __forceinline__ boolean from_double<boolean>(double v) { boolean b; b.v = v != 0.0 ? 1 : 0; return b; }

#define CAST(SN, S, DN, D) \
extern "C" __global__ void cast_##SN##_##DN(const S* x, D* y, i64 n) { GRID_STRIDE(i, n) y[i] = from_double<D>(to_double(x[i])); }
#define CAST_FROM(SN, S) \
CAST(SN, S, f32, float) CAST(SN, S, f16, f16) CAST(SN, S, bf16, bf16) CAST(SN, S, f64, double) \
CAST(SN, S, i8, i8) CAST(SN, S, u8, u8) CAST(SN, S, i32, int) CAST(SN, S, i64, i64) CAST(SN, S, bool, boolean)
CAST_FROM(f32, float)
CAST_FROM(f16, f16)
CAST_FROM(bf16, bf16)
CAST_FROM(f64, double)
CAST_FROM(i8, i8)
CAST_FROM(u8, u8)
CAST_FROM(i32, int)
CAST_FROM(i64, i64)
CAST_FROM(bool, boolean)

// The scheduler's update y = sum_k coef[k] * x_k in double, written as float32. kind: the
// dtype of x_k (0 float32, 1 float16, 2 bfloat16).
struct LinearCombination { i64 count; i64 ptr[8]; i64 kind[8]; double coef[8]; };

extern "C" __global__ void linear_combination(float* y, i64 n, LinearCombination lc) {
    GRID_STRIDE(i, n) {
        double s = 0.0;
        for (int k = 0; k < (int)lc.count; ++k) {
            double v;
            if (lc.kind[k] == 0) v = (double)((const float*)lc.ptr[k])[i];
            else if (lc.kind[k] == 1) v = (double)tofloat(((const f16*)lc.ptr[k])[i]);
            else v = (double)tofloat(((const bf16*)lc.ptr[k])[i]);
            s += lc.coef[k] * v;
        }
        y[i] = (float)s;
    }
}
"""#
}
