/// Kernels of the dynamically quantized linear layers (QuantizedLinear.swift): each row of the
/// activations quantized by its own max |x| into int8 (±127) or fp8 E4M3 (±448) for cuBLASLt,
/// and the dequantization of cuBLASLt's products with bias and epilogue in one pass.
///
/// The quantized rows are `kp` bytes long (k rounded up to 16, zeros after k: they meet zero
/// weight columns, so the products are unchanged) and written four bytes at a time.
/// fp8 conversion is a PTX instruction of sm_89 (Ada) and newer; on older devices the kernel
/// compiles to a trap, and the backend refuses fp8 layers there before launching anything.
enum QuantizeKernels {
    static let source = #"""
// max |x| over one row, on every thread of the block.
__device__ __forceinline__ float row_absmax(const T* xr, i64 k) {
    __shared__ float red[32];
    float m = 0.0f;
    for (i64 j = threadIdx.x; j < k; j += blockDim.x) m = fmaxf(m, fabsf(tofloat(xr[j])));
    return block_reduce(m, red, true);
}

// The block's row: writes its scale max|x| / level and returns level / max|x| (0 for a zero row).
__device__ __forceinline__ float row_scale(const T* xr, i64 k, float level, float* scale) {
    const float m = row_absmax(xr, k);
    if (threadIdx.x == 0) *scale = m / level;
    return m > 0.0f ? level / m : 0.0f;
}

// Element c of the row, times `inv`; 0 in the padding.
__device__ __forceinline__ float scaled(const T* xr, i64 c, i64 k, float inv) {
    return c < k ? tofloat(xr[c]) * inv : 0.0f;
}

// One block per row: q[r] = round(x[r] / s[r]) with s[r] = max |x[r]| / 127, round to nearest
// even (as torch.round), clamped to ±127 so the scale is symmetric.
extern "C" __global__ void quantize_rows_int8(const T* x, u32* q, float* scales, i64 k, i64 kp) {
    const i64 r = blockIdx.x;
    const T* xr = x + r * k;
    const float inv = row_scale(xr, k, 127.0f, scales + r);
    u32* qr = q + r * (kp / 4);
    for (i64 j = threadIdx.x; j < kp / 4; j += blockDim.x) {
        u32 packed = 0;
        for (int e = 0; e < 4; ++e) {
            const int v = max(-127, min(127, __float2int_rn(scaled(xr, 4 * j + e, k, inv))));
            packed |= ((u32)v & 0xffu) << (8 * e);
        }
        qr[j] = packed;
    }
}

// One block per row: q[r] = e4m3(x[r] / s[r]) with s[r] = max |x[r]| / 448 (E4M3's largest
// finite value), round to nearest even, saturating.
extern "C" __global__ void quantize_rows_e4m3(const T* x, u32* q, float* scales, i64 k, i64 kp) {
#if __CUDA_ARCH__ >= 890
    const i64 r = blockIdx.x;
    const T* xr = x + r * k;
    const float inv = row_scale(xr, k, 448.0f, scales + r);
    u32* qr = q + r * (kp / 4);
    for (i64 j = threadIdx.x; j < kp / 4; j += blockDim.x) {
        const i64 c = 4 * j;
        // cvt packs its first operand into the high byte: element c + 1 goes first.
        u16 lo, hi;
#ifdef DIFFUSE_EMULATOR
        lo = (u16)(emu_float_to_e4m3(scaled(xr, c, k, inv)) | emu_float_to_e4m3(scaled(xr, c + 1, k, inv)) << 8);
        hi = (u16)(emu_float_to_e4m3(scaled(xr, c + 2, k, inv)) | emu_float_to_e4m3(scaled(xr, c + 3, k, inv)) << 8);
#else
        asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo)
            : "f"(scaled(xr, c + 1, k, inv)), "f"(scaled(xr, c, k, inv)));
        asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi)
            : "f"(scaled(xr, c + 3, k, inv)), "f"(scaled(xr, c + 2, k, inv)));
#endif
        qr[j] = (u32)lo | ((u32)hi << 16);
    }
#else
    __trap();
#endif
}

// y[row0 + r, c] = acc[r, c] · sx[r] · sw[c] (+ bias[c]), then the epilogue ops, for the `rows`
// rows cuBLASLt left in acc (row stride lda >= n: the weight's rows are padded too).
template <typename A>
__device__ __forceinline__ void dequantize_impl(const A* acc, i64 lda, const float* sx, const float* sw, const T* bias,
                                                T* y, i64 row0, i64 rows, i64 n, const EpilogueOps& ops) {
    GRID_STRIDE(i, rows * n) {
        const i64 r = i / n, c = i - r * n;
        float v = (float)acc[r * lda + c] * sx[r] * sw[c];
        if (bias) v += tofloat(bias[c]);
        const i64 o = (row0 + r) * n + c;
        y[o] = fromfloat<T>(apply_epilogue(v, o, ops));
    }
}
extern "C" __global__ void dequantize_i32(const int* acc, i64 lda, const float* sx, const float* sw, const T* bias,
                                          T* y, i64 row0, i64 rows, i64 n, EpilogueOps ops) {
    dequantize_impl<int>(acc, lda, sx, sw, bias, y, row0, rows, n, ops);
}
extern "C" __global__ void dequantize_f32(const float* acc, i64 lda, const float* sx, const float* sw, const T* bias,
                                          T* y, i64 row0, i64 rows, i64 n, EpilogueOps ops) {
    dequantize_impl<float>(acc, lda, sx, sw, bias, y, row0, rows, n, ops);
}
"""#
}
