/// CUDA C shared by every kernel family: integer names, our own 16-bit float types with the
/// conversions written in PTX or bit arithmetic (so NVRTC needs no CUDA headers), the storage
/// type `T` chosen by `-DDT=0|1|2` (float, f16, bf16), activations, reductions, the conv2d/linear
/// epilogue and the strided index helper.
enum CommonKernels {
    static let source = #"""
typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

// NVRTC has no math.h macros.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
// The kernel's dynamic shared memory (the CPU emulator of the tests defines its own).
#ifndef DYNAMIC_SHARED
#define DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

struct __align__(2) f16 { u16 bits; };
struct __align__(2) bf16 { u16 bits; };

__device__ __forceinline__ float tofloat(float v) { return v; }
__device__ __forceinline__ float tofloat(f16 v) {
#ifdef DIFFUSE_EMULATOR
    return emu_half_to_float(v.bits);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
#endif
}
__device__ __forceinline__ float tofloat(bf16 v) { return __uint_as_float(((u32)v.bits) << 16); }

template <typename D> __device__ __forceinline__ D fromfloat(float v);
template <> __device__ __forceinline__ float fromfloat<float>(float v) { return v; }
template <> __device__ __forceinline__ f16 fromfloat<f16>(float v) {
    f16 h;
#ifdef DIFFUSE_EMULATOR
    h.bits = emu_float_to_half(v);
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
#endif
    return h;
}
// Round to nearest even; every NaN becomes the quiet NaN 0x7FC0 (as torch does).
template <> __device__ __forceinline__ bf16 fromfloat<bf16>(float v) {
    u32 u = __float_as_uint(v);
    bf16 h;
    if ((u & 0x7fffffffu) > 0x7f800000u) { h.bits = 0x7fc0; return h; }
    u += 0x7fffu + ((u >> 16) & 1u);
    h.bits = (u16)(u >> 16);
    return h;
}

#ifndef DT
#define DT 0
#endif
#if DT == 0
typedef float T;
#elif DT == 1
typedef f16 T;
#else
typedef bf16 T;
#endif

#define GRID_STRIDE(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)
// For the 8-wide kernels, whose host side guarantees fewer than 2^31 elements: 32-bit indices
// (a 64-bit division is a long instruction sequence on the GPU, a 32-bit one a few).
#define GRID_STRIDE32(i, n) for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += gridDim.x * blockDim.x)

// Eight consecutive elements as floats: one 16-byte access for 16-bit types, two for float.
// p must be 16-byte aligned (the host checks before choosing an 8-wide kernel).
__device__ __forceinline__ void load8(const T* p, float* v) {
#if DT == 0
    const float4 a = ((const float4*)p)[0], b = ((const float4*)p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
#else
    const uint4 u = *(const uint4*)p;
    const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        T lo, hi;
        lo.bits = (u16)(w[k] & 0xffffu);
        hi.bits = (u16)(w[k] >> 16);
        v[2 * k] = tofloat(lo);
        v[2 * k + 1] = tofloat(hi);
    }
#endif
}
__device__ __forceinline__ void store8(T* p, const float* v) {
#if DT == 0
    ((float4*)p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    ((float4*)p)[1] = make_float4(v[4], v[5], v[6], v[7]);
#else
    u32 w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = (u32)fromfloat<T>(v[2 * k]).bits | ((u32)fromfloat<T>(v[2 * k + 1]).bits << 16);
    *(uint4*)p = make_uint4(w[0], w[1], w[2], w[3]);
#endif
}

// UnaryOp codes, in the order of UnaryOp.allCases.
__device__ __forceinline__ float activate(float v, int op) {
    switch (op) {
    case 0: return v / (1.0f + expf(-v));                                   // silu
    case 1: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));      // gelu (exact)
    case 2: {                                                               // gelu (tanh)
        const float c = 0.79788456080286536f;
        return 0.5f * v * (1.0f + tanhf(c * (v + 0.044715f * v * v * v)));
    }
    case 3: return v / (1.0f + expf(-1.702f * v));                          // quick_gelu
    case 4: return v < 0.0f ? 0.0f : v;                                     // relu (NaN stays NaN)
    case 5: return tanhf(v);
    case 6: return 1.0f / (1.0f + expf(-v));                                // sigmoid
    case 7: return expf(v);
    case 8: return -v;
    case 9: return sqrtf(v);
    case 10: return 1.0f / sqrtf(v);
    case 11: return v * v;
    case 12: return fabsf(v);
    }
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum (or max) over the block; every thread gets the result. `scratch` holds 32 floats.
__device__ __forceinline__ float block_reduce(float v, float* scratch, bool isMax) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = isMax ? warp_max(v) : warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = lane < warps ? scratch[lane] : (isMax ? -INFINITY : 0.0f);
    r = isMax ? warp_max(r) : warp_sum(r);
    return r;
}

// The conv2d/linear epilogue after the GEMM (CUDAExecutable.epilogueStruct writes it): the ops
// in order, kind 0: activation `arg`; kind 1: add extra input `arg` (shaped like the output,
// read at the output's index); kind 2: multiply by `scale`.
struct EpilogueOps { i64 count; i64 kind[8]; i64 arg[8]; double scale[8]; i64 extra[4]; };

__device__ __forceinline__ float apply_epilogue(float v, i64 i, const EpilogueOps& ops) {
    for (int k = 0; k < (int)ops.count; ++k) {
        const i64 kind = ops.kind[k];
        if (kind == 0) v = activate(v, (int)ops.arg[k]);
        else if (kind == 1) v += tofloat(((const T*)ops.extra[ops.arg[k]])[i]);
        else v *= (float)ops.scale[k];
    }
    return v;
}

// The same for elements i0 .. i0 + 7 (extra inputs 16-byte aligned at i0).
__device__ __forceinline__ void apply_epilogue8(float* v, i64 i0, const EpilogueOps& ops) {
    for (int k = 0; k < (int)ops.count; ++k) {
        const i64 kind = ops.kind[k];
        if (kind == 0) {
            const int op = (int)ops.arg[k];
#pragma unroll
            for (int j = 0; j < 8; ++j) v[j] = activate(v[j], op);
        } else if (kind == 1) {
            float e[8];
            load8((const T*)ops.extra[ops.arg[k]] + i0, e);
#pragma unroll
            for (int j = 0; j < 8; ++j) v[j] += e[j];
        } else {
            const float s = (float)ops.scale[k];
#pragma unroll
            for (int j = 0; j < 8; ++j) v[j] *= s;
        }
    }
}

// Up to 8 dimensions with two stride sets: the index helper of broadcasts and strided copies.
#define MAXR 8
struct Strided { i64 rank; i64 shape[MAXR]; i64 sa[MAXR]; i64 sb[MAXR]; };

__device__ __forceinline__ void strided_offsets(const Strided& s, i64 i, i64& oa, i64& ob) {
    oa = 0;
    ob = 0;
    for (int d = (int)s.rank - 1; d >= 0; --d) {
        const i64 n = s.shape[d];
        const i64 q = i / n;
        const i64 r = i - q * n;
        oa += r * s.sa[d];
        ob += r * s.sb[d];
        i = q;
    }
}
"""#
}
