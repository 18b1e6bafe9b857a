/// Elementwise kernels over the storage type `T`: unary activations, broadcast binaries,
/// affine, clamp, GEGLU, the conv/linear epilogue, embedding, timestep embedding and im2col.
/// All arithmetic is in float32 whatever `T` is.
enum ElementwiseKernels {
    static let source = #"""
extern "C" __global__ void unary_kernel(const T* x, T* y, i64 n, int op) {
    GRID_STRIDE(i, n) y[i] = fromfloat<T>(activate(tofloat(x[i]), op));
}

__device__ __forceinline__ float binary_op(float a, float b, int op) {
    switch (op) {
    case 0: return a + b;
    case 1: return a - b;
    case 2: return a * b;
    default: return a / b;
    }
}

extern "C" __global__ void binary_same(const T* a, const T* b, T* y, i64 n, int op) {
    GRID_STRIDE(i, n) y[i] = fromfloat<T>(binary_op(tofloat(a[i]), tofloat(b[i]), op));
}

extern "C" __global__ void binary_same_v8(const T* a, const T* b, T* y, u32 chunks, int op) {
    GRID_STRIDE32(c, chunks) {
        float va[8], vb[8];
        load8(a + (u64)c * 8, va);
        load8(b + (u64)c * 8, vb);
#pragma unroll
        for (int k = 0; k < 8; ++k) va[k] = binary_op(va[k], vb[k], op);
        store8(y + (u64)c * 8, va);
    }
}

// y is contiguous; a and b are read through broadcast strides (0 on broadcast axes).
extern "C" __global__ void binary_bcast(const T* a, const T* b, T* y, i64 n, int op, Strided s) {
    GRID_STRIDE(i, n) {
        i64 oa, ob;
        strided_offsets(s, i, oa, ob);
        y[i] = fromfloat<T>(binary_op(tofloat(a[oa]), tofloat(b[ob]), op));
    }
}

// Eight aligned elements from p (contiguous) or p[0] eight times (broadcast along the row).
__device__ __forceinline__ void load8_or_repeat(const T* p, bool contiguous, float* v) {
    if (contiguous) {
        load8(p, v);
        return;
    }
    const float x = tofloat(p[0]);
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = x;
}

// binary_bcast eight outputs at a time: the innermost (collapsed) axis is a multiple of 8 and
// each operand's stride along it is 1 (read 8 aligned elements) or 0 (one value for all 8).
extern "C" __global__ void binary_bcast_v8(const T* a, const T* b, T* y, u32 chunks, int op, Strided s) {
    const bool aRow = s.sa[s.rank - 1] != 0, bRow = s.sb[s.rank - 1] != 0;
    GRID_STRIDE32(c, chunks) {
        i64 oa, ob;
        strided_offsets(s, (i64)c * 8, oa, ob);
        float va[8], vb[8];
        load8_or_repeat(a + oa, aRow, va);
        load8_or_repeat(b + ob, bRow, vb);
#pragma unroll
        for (int k = 0; k < 8; ++k) va[k] = binary_op(va[k], vb[k], op);
        store8(y + (u64)c * 8, va);
    }
}

extern "C" __global__ void affine_kernel(const T* x, T* y, i64 n, float scale, float shift) {
    GRID_STRIDE(i, n) y[i] = fromfloat<T>(tofloat(x[i]) * scale + shift);
}

extern "C" __global__ void clamp_kernel(const T* x, T* y, i64 n, float lo, float hi) {
    GRID_STRIDE(i, n) {
        const float v = tofloat(x[i]);
        y[i] = fromfloat<T>(v < lo ? lo : (v > hi ? hi : v));
    }
}

// diffusers' GEGLU: [a, gate] = x.chunk(2, -1); y = a * gelu(gate).
extern "C" __global__ void geglu_kernel(const T* x, T* y, i64 rows, i64 d) {
    GRID_STRIDE(i, rows * d) {
        const i64 r = i / d, j = i - r * d;
        const T* xr = x + r * 2 * d;
        y[i] = fromfloat<T>(tofloat(xr[j]) * activate(tofloat(xr[d + j]), 1));
    }
}

// geglu_kernel eight outputs at a time (d a multiple of 8; d8 = d / 8).
extern "C" __global__ void geglu_v8(const T* x, T* y, u32 chunks, u32 d8) {
    GRID_STRIDE32(c, chunks) {
        const u32 r = c / d8, j = (c - r * d8) * 8;
        const T* xr = x + (u64)r * 16 * d8;
        float h[8], gate[8];
        load8(xr + j, h);
        load8(xr + (u64)d8 * 8 + j, gate);
#pragma unroll
        for (int k = 0; k < 8; ++k) h[k] *= activate(gate[k], 1);
        store8(y + (u64)c * 8, h);
    }
}

// What conv2d/linear do after the GEMM when cuBLASLt cannot: bias, then the epilogue ops.
extern "C" __global__ void epilogue_kernel(T* y, const T* bias, i64 n, i64 inner, i64 channels, EpilogueOps ops) {
    GRID_STRIDE(i, n) {
        float v = tofloat(y[i]);
        if (bias) v += tofloat(bias[(i / inner) % channels]);
        y[i] = fromfloat<T>(apply_epilogue(v, i, ops));
    }
}

// epilogue_kernel eight elements at a time. NCHW (inner = H*W, a multiple of 8): the eight share
// one channel. Channels-last (inner = 1, channels a multiple of 8): they are eight consecutive
// channels, so the bias is one aligned read too.
extern "C" __global__ void epilogue_v8(T* y, const T* bias, u32 chunks, u32 inner, u32 channels, EpilogueOps ops) {
    GRID_STRIDE32(c, chunks) {
        const u32 e0 = c * 8;
        float v[8];
        load8(y + e0, v);
        if (bias) {
            if (inner == 1) {
                float bv[8];
                load8(bias + e0 % channels, bv);
#pragma unroll
                for (int k = 0; k < 8; ++k) v[k] += bv[k];
            } else {
                const float bv = tofloat(bias[(e0 / inner) % channels]);
#pragma unroll
                for (int k = 0; k < 8; ++k) v[k] += bv;
            }
        }
        apply_epilogue8(v, e0, ops);
        store8(y + e0, v);
    }
}

// Rows of `table` [V, D] picked by ids; ids outside [0, V) are clamped so a bad id can never
// read outside the table (the tokenizer guarantees valid ids).
template <typename I>
__device__ __forceinline__ void embedding_impl(const I* ids, const T* table, T* y, i64 nIds, i64 d, i64 v) {
    GRID_STRIDE(i, nIds * d) {
        const i64 r = i / d, j = i - r * d;
        i64 id = (i64)ids[r];
        id = id < 0 ? 0 : (id >= v ? v - 1 : id);
        y[i] = table[id * d + j];
    }
}
// torch's interpolate(mode="bilinear") of planes [P][inH][inW] to [P][h][w]: ATen's source
// index and weights per axis (compute_source_index_and_lambda), each source row along the
// width first, then the two rows.
__device__ __forceinline__ void bilinear_tap(i64 o, i64 in, i64 out, int alignCorners, i64& i0, i64& i1, float& l0, float& l1) {
    if (in == out) { i0 = i1 = o; l0 = 1.0f; l1 = 0.0f; return; }
    const float scale = alignCorners ? (out > 1 ? (float)(in - 1) / (float)(out - 1) : 0.0f) : (float)in / (float)out;
    const float src = alignCorners ? __fmul_rn(scale, (float)o) : fmaxf(__fsub_rn(__fmul_rn(scale, (float)o + 0.5f), 0.5f), 0.0f);
    i0 = min((i64)floorf(src), in - 1);
    l1 = fminf(fmaxf(src - (float)i0, 0.0f), 1.0f);
    i1 = i0 + (i0 < in - 1 ? 1 : 0);
    l0 = 1.0f - l1;
}

extern "C" __global__ void resize_bilinear(const T* x, T* y, i64 planes, i64 inH, i64 inW, i64 h, i64 w, int alignCorners) {
    GRID_STRIDE(i, planes * h * w) {
        const i64 c = i % w, r = (i / w) % h, p = i / (w * h);
        i64 r0, r1, c0, c1; float a0, a1, b0, b1;
        bilinear_tap(r, inH, h, alignCorners, r0, r1, a0, a1);
        bilinear_tap(c, inW, w, alignCorners, c0, c1, b0, b1);
        const T* plane = x + p * inH * inW;
        const float top = tofloat(plane[r0 * inW + c0]) * b0 + tofloat(plane[r0 * inW + c1]) * b1;
        const float bottom = tofloat(plane[r1 * inW + c0]) * b0 + tofloat(plane[r1 * inW + c1]) * b1;
        y[i] = fromfloat<T>(top * a0 + bottom * a1);
    }
}

// torch's max_pool2d of planes [P][h][w] without padding (a NaN wins).
extern "C" __global__ void max_pool2d(const T* x, T* y, i64 planes, i64 h, i64 w, i64 oh, i64 ow, i64 kh, i64 kw, i64 sh, i64 sw) {
    GRID_STRIDE(i, planes * oh * ow) {
        const i64 c = i % ow, r = (i / ow) % oh, p = i / (ow * oh);
        const T* top = x + (p * h + r * sh) * w + c * sw;
        float m = -INFINITY;
        for (i64 a = 0; a < kh; ++a)
            for (i64 b = 0; b < kw; ++b) {
                const float v = tofloat(top[a * w + b]);
                if (v > m || v != v) m = v;  // a NaN wins
            }
        y[i] = fromfloat<T>(m);
    }
}

extern "C" __global__ void embedding_i32(const int* ids, const T* table, T* y, i64 nIds, i64 d, i64 v) {
    embedding_impl<int>(ids, table, y, nIds, d, v);
}
extern "C" __global__ void embedding_i64(const i64* ids, const T* table, T* y, i64 nIds, i64 d, i64 v) {
    embedding_impl<i64>(ids, table, y, nIds, d, v);
}

// diffusers' get_timestep_embedding, rounded to float32 where torch computes in float32;
// exp, sin and cos are evaluated in double so the result is the correctly rounded value.
extern "C" __global__ void timestep_embedding(const float* t, T* y, i64 batch, i64 dim, i64 half, int flip,
                                              float negLogMaxPeriod, float denom, float scale) {
    GRID_STRIDE(i, batch * dim) {
        const i64 b = i / dim, j = i - b * dim;
        float v = 0.0f;
        if (j < 2 * half) {
            const bool firstHalf = j < half;
            const i64 k = firstHalf ? j : j - half;
            float e = negLogMaxPeriod * (float)k;
            e = e / denom;
            const float freq = (float)exp((double)e);
            float arg = t[b] * freq;
            arg = scale * arg;
            const bool isSin = flip ? !firstHalf : firstHalf;
            v = isSin ? (float)sin((double)arg) : (float)cos((double)arg);
        }
        y[i] = fromfloat<T>(v);
    }
}

// im2col for a chunk of output pixels [p0, p0 + P) of `images` images: col[img][k][p] with
// k = (c * KH + ky) * KW + kx, zero where the window falls in the (possibly asymmetric) padding.
struct ConvGeom { i64 C, H, W, KH, KW, SH, SW, PT, PL, DH, DW, Wo, p0, P, images, imageStride, K; };

// The input pixel (iy, ix) that kernel tap r = ky * KW + kx reads for chunk pixel p; false in the padding.
__device__ __forceinline__ bool conv_tap(const ConvGeom& g, i64 p, i64 r, i64& iy, i64& ix) {
    const i64 pix = g.p0 + p;
    const i64 oy = pix / g.Wo, ox = pix - oy * g.Wo;
    const i64 ky = r / g.KW, kx = r - ky * g.KW;
    iy = oy * g.SH - g.PT + ky * g.DH;
    ix = ox * g.SW - g.PL + kx * g.DW;
    return iy >= 0 && iy < g.H && ix >= 0 && ix < g.W;
}

extern "C" __global__ void im2col_kernel(const T* x, T* col, ConvGeom g) {
    const i64 total = g.images * g.K * g.P;
    const i64 kk = g.KH * g.KW;
    GRID_STRIDE(i, total) {
        const i64 p = i % g.P;
        const i64 t = i / g.P;
        const i64 k = t % g.K;
        const i64 img = t / g.K;
        const i64 c = k / kk, r = k - c * kk;
        i64 iy, ix;
        col[i] = conv_tap(g, p, r, iy, ix) ? x[img * g.imageStride + (c * g.H + iy) * g.W + ix] : fromfloat<T>(0.0f);
    }
}

// im2col for channels-last images: col[img][p][k] with k = (ky * KW + kx) * C + c, the order
// of a [O, KH, KW, C] weight's rows, so the GEMM is col · Wᵀ and a warp copies consecutive
// channels. Same geometry as im2col_kernel (imageStride = H * W * C).
extern "C" __global__ void im2col_nhwc_kernel(const T* x, T* col, ConvGeom g) {
    const i64 total = g.images * g.K * g.P;
    const i64 kk = g.KH * g.KW;
    GRID_STRIDE(i, total) {
        const i64 c = i % g.C;
        const i64 t = i / g.C;
        const i64 r = t % kk;
        const i64 t2 = t / kk;
        const i64 p = t2 % g.P;
        const i64 img = t2 / g.P;
        i64 iy, ix;
        col[i] = conv_tap(g, p, r, iy, ix) ? x[img * g.imageStride + (iy * g.W + ix) * g.C + c] : fromfloat<T>(0.0f);
    }
}
"""#
}
