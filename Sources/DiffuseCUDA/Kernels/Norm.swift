/// Normalizations and reductions with float32 statistics whatever the storage type:
/// GroupNorm (+activation) in two launches (partial sums over many blocks, then normalize),
/// LayerNorm and softmax one warp per row, and a general reduce.
enum NormKernels {
    static let source = #"""
// GroupNorm, step 1: each block sums one chunk of one group, shifted by the group's first
// element (so sum of squares minus squared sum does not cancel catastrophically).
// vec: groupLen and chunkLen multiples of 8, x 16-byte aligned (8-wide reads).
extern "C" __global__ void groupnorm_stats(const T* x, float* partial, i64 groupLen, i64 chunkLen, int vec) {
    __shared__ float scratch[32];
    const i64 g = blockIdx.y, chunk = blockIdx.x;
    const T* base = x + g * groupLen;
    const float shift = tofloat(base[0]);
    const i64 start = chunk * chunkLen;
    const i64 end = start + chunkLen < groupLen ? start + chunkLen : groupLen;
    float s1 = 0.0f, s2 = 0.0f;
    if (vec) {
        for (i64 i = start + threadIdx.x * 8; i < end; i += blockDim.x * 8) {
            float v[8];
            load8(base + i, v);
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                const float d = v[k] - shift;
                s1 += d;
                s2 += d * d;
            }
        }
    } else {
        for (i64 i = start + threadIdx.x; i < end; i += blockDim.x) {
            const float v = tofloat(base[i]) - shift;
            s1 += v;
            s2 += v * v;
        }
    }
    s1 = block_reduce(s1, scratch, false);
    s2 = block_reduce(s2, scratch, false);
    if (threadIdx.x == 0) {
        partial[(g * gridDim.x + chunk) * 2] = s1;
        partial[(g * gridDim.x + chunk) * 2 + 1] = s2;
    }
}

// GroupNorm, step 2: merge the group's partial sums, then normalize this block's chunk with the
// per-channel weight and bias and the optional activation (act < 0: none). vec: spatial and
// chunkLen multiples of 8, x and y 16-byte aligned (eight elements of one channel at a time).
extern "C" __global__ void groupnorm_apply(const T* x, T* y, const float* partial, const T* w, const T* b,
                                           i64 groupLen, i64 chunkLen, i64 spatial, i64 channelsPerGroup,
                                           i64 groups, float eps, int act, int vec) {
    __shared__ float scratch[32];
    const i64 g = blockIdx.y, chunk = blockIdx.x, chunks = gridDim.x;
    const T* base = x + g * groupLen;
    float s1 = 0.0f, s2 = 0.0f;
    for (i64 k = threadIdx.x; k < chunks; k += blockDim.x) {
        s1 += partial[(g * chunks + k) * 2];
        s2 += partial[(g * chunks + k) * 2 + 1];
    }
    s1 = block_reduce(s1, scratch, false);
    s2 = block_reduce(s2, scratch, false);
    const float n = (float)groupLen;
    const float m1 = s1 / n;
    float var = s2 / n - m1 * m1;
    var = var < 0.0f ? 0.0f : var;
    const float mean = tofloat(base[0]) + m1;
    const float rstd = 1.0f / sqrtf(var + eps);
    const i64 c0 = (g % groups) * channelsPerGroup;
    const i64 start = chunk * chunkLen;
    const i64 end = start + chunkLen < groupLen ? start + chunkLen : groupLen;
    if (vec) {
        for (i64 i = start + threadIdx.x * 8; i < end; i += blockDim.x * 8) {
            const i64 c = c0 + i / spatial;
            const float wc = tofloat(w[c]), bc = tofloat(b[c]);
            float v[8];
            load8(base + i, v);
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                v[k] = (v[k] - mean) * rstd * wc + bc;
                if (act >= 0) v[k] = activate(v[k], act);
            }
            store8(y + g * groupLen + i, v);
        }
        return;
    }
    for (i64 i = start + threadIdx.x; i < end; i += blockDim.x) {
        const i64 c = c0 + i / spatial;
        float v = (tofloat(base[i]) - mean) * rstd * tofloat(w[c]) + tofloat(b[c]);
        if (act >= 0) v = activate(v, act);
        y[g * groupLen + i] = fromfloat<T>(v);
    }
}

// GroupNorm on channels-last [N, S, C], step 1: block (chunk, n) sums pixels
// [chunk * chunkPixels, ...) of image n. A thread owns channels t, t + blockDim, ... (the host
// sizes the block to C), so a warp reads consecutive channels of one pixel; per-channel sums go
// to the group's shared accumulators once per thread. Shifted by the group's first element.
#define GN_MAX_GROUPS 128
extern "C" __global__ void groupnorm_stats_nhwc(const T* x, float* partial, i64 spatial, i64 C, i64 groups,
                                                i64 chunkPixels) {
    __shared__ float s1[GN_MAX_GROUPS], s2[GN_MAX_GROUPS];
    const i64 n = blockIdx.y, chunk = blockIdx.x, chunks = gridDim.x;
    const i64 cg = C / groups;
    for (i64 g = threadIdx.x; g < groups; g += blockDim.x) { s1[g] = 0.0f; s2[g] = 0.0f; }
    __syncthreads();
    const T* image = x + n * spatial * C;
    const i64 p0 = chunk * chunkPixels;
    const i64 p1 = p0 + chunkPixels < spatial ? p0 + chunkPixels : spatial;
    for (i64 c = threadIdx.x; c < C; c += blockDim.x) {
        const i64 g = c / cg;
        const float shift = tofloat(image[g * cg]);
        float a = 0.0f, b = 0.0f;
        for (i64 p = p0; p < p1; ++p) {
            const float v = tofloat(image[p * C + c]) - shift;
            a += v;
            b += v * v;
        }
        atomicAdd(&s1[g], a);
        atomicAdd(&s2[g], b);
    }
    __syncthreads();
    for (i64 g = threadIdx.x; g < groups; g += blockDim.x) {
        float* out = partial + ((n * groups + g) * chunks + chunk) * 2;
        out[0] = s1[g];
        out[1] = s2[g];
    }
}

// Step 2: one warp per (image, group) merges its chunks into mean and 1/std (stats[2 * ng]).
extern "C" __global__ void groupnorm_finalize_nhwc(const T* x, const float* partial, float* stats, i64 ngTotal,
                                                   i64 chunks, i64 spatial, i64 C, i64 groups, float eps) {
    const i64 ng = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (ng >= ngTotal) return;
    float a = 0.0f, b = 0.0f;
    for (i64 k = lane; k < chunks; k += 32) {
        a += partial[(ng * chunks + k) * 2];
        b += partial[(ng * chunks + k) * 2 + 1];
    }
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) {
        const i64 n = ng / groups, g = ng - n * groups, cg = C / groups;
        const float count = (float)(spatial * cg);
        const float m1 = a / count;
        float var = b / count - m1 * m1;
        var = var < 0.0f ? 0.0f : var;
        stats[ng * 2] = tofloat(x[n * spatial * C + g * cg]) + m1;
        stats[ng * 2 + 1] = 1.0f / sqrtf(var + eps);
    }
}

// Step 3: normalize elementwise with the per-channel weight and bias and the optional activation.
extern "C" __global__ void groupnorm_apply_nhwc(const T* x, T* y, const float* stats, const T* w, const T* b,
                                                i64 count, i64 spatial, i64 C, i64 groups, int act) {
    const i64 cg = C / groups;
    GRID_STRIDE(i, count) {
        const i64 c = i % C, n = i / (spatial * C);
        const i64 ng = n * groups + c / cg;
        float v = (tofloat(x[i]) - stats[ng * 2]) * stats[ng * 2 + 1] * tofloat(w[c]) + tofloat(b[c]);
        if (act >= 0) v = activate(v, act);
        y[i] = fromfloat<T>(v);
    }
}

// LayerNorm over the last axis, one warp per row, exact two-pass statistics (the row stays in L1).
// vec: d a multiple of 8, x, y, w and b 16-byte aligned (8-wide accesses).
extern "C" __global__ void layernorm_kernel(const T* x, T* y, const T* w, const T* b, i64 rows, i64 d, float eps,
                                            int vec) {
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* xr = x + row * d;
    if (vec) {
        float v[8], s = 0.0f;
        for (i64 j = lane * 8; j < d; j += 256) {
            load8(xr + j, v);
#pragma unroll
            for (int k = 0; k < 8; ++k) s += v[k];
        }
        const float mean = warp_sum(s) / (float)d;
        float q = 0.0f;
        for (i64 j = lane * 8; j < d; j += 256) {
            load8(xr + j, v);
#pragma unroll
            for (int k = 0; k < 8; ++k) { const float t = v[k] - mean; q += t * t; }
        }
        const float rstd = 1.0f / sqrtf(warp_sum(q) / (float)d + eps);
        for (i64 j = lane * 8; j < d; j += 256) {
            float wv[8], bv[8];
            load8(xr + j, v);
            load8(w + j, wv);
            load8(b + j, bv);
#pragma unroll
            for (int k = 0; k < 8; ++k) v[k] = (v[k] - mean) * rstd * wv[k] + bv[k];
            store8(y + row * d + j, v);
        }
        return;
    }
    float s = 0.0f;
    for (i64 j = lane; j < d; j += 32) s += tofloat(xr[j]);
    const float mean = warp_sum(s) / (float)d;
    float v = 0.0f;
    for (i64 j = lane; j < d; j += 32) { const float t = tofloat(xr[j]) - mean; v += t * t; }
    const float rstd = 1.0f / sqrtf(warp_sum(v) / (float)d + eps);
    T* yr = y + row * d;
    for (i64 j = lane; j < d; j += 32) yr[j] = fromfloat<T>((tofloat(xr[j]) - mean) * rstd * tofloat(w[j]) + tofloat(b[j]));
}

// Softmax over the last axis of x * scale, one warp per row. With `causal`, row r holds query
// qOffset + r % rowsPerSlice and only keys j <= query take part (the rest are written as 0).
template <typename TI>
__device__ __forceinline__ void softmax_impl(const TI* x, T* y, i64 rows, i64 len, float scale, int causal,
                                             i64 rowsPerSlice, i64 qOffset) {
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    i64 limit = len;
    if (causal) {
        const i64 q = qOffset + row % rowsPerSlice;
        limit = q + 1 < len ? q + 1 : len;
    }
    const TI* xr = x + row * len;
    float m = -INFINITY;
    for (i64 j = lane; j < limit; j += 32) m = fmaxf(m, tofloat(xr[j]) * scale);
    m = warp_max(m);
    float s = 0.0f;
    for (i64 j = lane; j < limit; j += 32) s += expf(tofloat(xr[j]) * scale - m);
    const float inv = 1.0f / warp_sum(s);
    T* yr = y + row * len;
    for (i64 j = lane; j < len; j += 32) yr[j] = fromfloat<T>(j < limit ? expf(tofloat(xr[j]) * scale - m) * inv : 0.0f);
}
extern "C" __global__ void softmax_kernel(const T* x, T* y, i64 rows, i64 len, float scale, int causal,
                                          i64 rowsPerSlice, i64 qOffset) {
    softmax_impl<T>(x, y, rows, len, scale, causal, rowsPerSlice, qOffset);
}
extern "C" __global__ void softmax_f32in(const float* x, T* y, i64 rows, i64 len, float scale, int causal,
                                         i64 rowsPerSlice, i64 qOffset) {
    softmax_impl<float>(x, y, rows, len, scale, causal, rowsPerSlice, qOffset);
}

// Reduce (op 0 mean, 1 sum, 2 max): one block per output element; `out*` describe the kept
// axes (input strides), `red*` the reduced ones.
struct ReduceDesc {
    i64 outRank; i64 outShape[MAXR]; i64 outStride[MAXR];
    i64 redRank; i64 redShape[MAXR]; i64 redStride[MAXR];
    i64 nRed; i64 op;
};

extern "C" __global__ void reduce_kernel(const T* x, T* y, i64 nOut, ReduceDesc d) {
    __shared__ float scratch[32];
    const bool isMax = d.op == 2;
    for (i64 o = blockIdx.x; o < nOut; o += gridDim.x) {
        i64 base = 0, rem = o;
        for (int k = (int)d.outRank - 1; k >= 0; --k) {
            const i64 q = rem / d.outShape[k];
            base += (rem - q * d.outShape[k]) * d.outStride[k];
            rem = q;
        }
        float acc = isMax ? -INFINITY : 0.0f;
        for (i64 r = threadIdx.x; r < d.nRed; r += blockDim.x) {
            i64 off = base, rr = r;
            for (int k = (int)d.redRank - 1; k >= 0; --k) {
                const i64 q = rr / d.redShape[k];
                off += (rr - q * d.redShape[k]) * d.redStride[k];
                rr = q;
            }
            const float v = tofloat(x[off]);
            acc = isMax ? fmaxf(acc, v) : acc + v;
        }
        acc = block_reduce(acc, scratch, isMax);
        if (threadIdx.x == 0) y[o] = fromfloat<T>(d.op == 0 ? acc / (float)d.nRed : acc);
        __syncthreads();
    }
}
"""#
}
