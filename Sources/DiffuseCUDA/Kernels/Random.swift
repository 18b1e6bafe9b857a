/// torch's CUDA `normal_` (ATen cuda/DistributionTemplates.h, `distribution_elementwise_grid_stride_kernel`
/// with cuRAND's `curand_normal4`), written out so that the same bits come out of the same GPU:
/// Philox4x32-10 with the seed as key, the thread index as subsequence and the generator's
/// offset/4 as counter; Box-Muller with the same float expressions as cuRAND's
/// `_curand_box_muller` (`logf`, `sqrtf`, the `__sincosf` hardware intrinsic, fused multiply-adds
/// as nvcc contracts them by default). Launched with torch's grid (256-thread blocks, at most
/// SMs · maxThreadsPerSM/256 of them), so element `li` gets the same draw as in torch.
enum RandomKernels {
    static let source = #"""
#define PHILOX_W32_0 0x9E3779B9u
#define PHILOX_W32_1 0xBB67AE85u
#define PHILOX_M4x32_0 0xD2511F53u
#define PHILOX_M4x32_1 0xCD9E8D57u
#define CURAND_2POW32_INV (2.3283064e-10f)
#define CURAND_2POW32_INV_2PI (2.3283064e-10f * 6.2831855f)

__device__ __forceinline__ void philox4x32_10(u32 c[4], u32 k0, u32 k1) {
    for (int round = 0; round < 10; ++round) {
        if (round > 0) { k0 += PHILOX_W32_0; k1 += PHILOX_W32_1; }
        u32 lo0 = PHILOX_M4x32_0 * c[0], hi0 = __umulhi(PHILOX_M4x32_0, c[0]);
        u32 lo1 = PHILOX_M4x32_1 * c[2], hi1 = __umulhi(PHILOX_M4x32_1, c[2]);
        u32 n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
        c[0] = n0; c[1] = lo1; c[2] = n2; c[3] = lo0;
    }
}

__device__ __forceinline__ void box_muller(u32 x, u32 y, float* out) {
    float u = x * CURAND_2POW32_INV + (CURAND_2POW32_INV / 2);
    float v = y * CURAND_2POW32_INV_2PI + (CURAND_2POW32_INV_2PI / 2);
    float s = sqrtf(-2.0f * logf(u));
    float sn, cs;
    __sincosf(v, &sn, &cs);
    out[0] = sn * s;
    out[1] = cs * s;
}

// y[li] = normal * stdev + mean for li < n; `offset` is the generator's Philox offset (a multiple of 4).
extern "C" __global__ void torch_philox_normal(float* y, i64 n, u64 seed, u64 offset, float mean, float stdev) {
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    const i64 threads = (i64)blockDim.x * gridDim.x;
    const i64 stride = threads * 4;
    const i64 rounded = ((n - 1) / stride + 1) * stride;
    u64 counter = offset / 4;
    for (i64 li = idx; li < rounded; li += stride, ++counter) {
        // curand_init(seed, idx, offset) then one curand4 per iteration.
        u32 c[4] = {(u32)counter, (u32)(counter >> 32), (u32)idx, (u32)((u64)idx >> 32)};
        philox4x32_10(c, (u32)seed, (u32)(seed >> 32));
        float r[4];
        box_muller(c[0], c[1], r);
        box_muller(c[2], c[3], r + 2);
        for (int ii = 0; ii < 4; ++ii) {
            i64 at = li + threads * ii;
            if (at < n) y[at] = r[ii] * stdev + mean;
        }
    }
}
"""#
}
