/// Fused (flash-style) attention: tiles of queries against tiles of keys with an online
/// softmax, so the score matrix never reaches memory. Heads are read by stride from token-major
/// [B, S, H*D] tensors (packed qkv/kv included). fp16/bf16 use tensor cores (mma.sync
/// m16n8k16, fp32 accumulation); float32 uses FMA. One instantiation per padded head dim.
///
/// Two families: `attention` (16-bit: FlashAttention-2's pipelined scheme with ldmatrix and
/// cp.async) and `attentionBasic` (flag "basic-attention"; 16-bit: synchronous loads and a
/// transposed copy of V, the first kernel this backend had, kept as a known-good fallback and
/// a baseline for the pipelined one). float32 is the same FMA kernel in both.
enum AttentionKernels {
    /// Padded head dims with a kernel; larger heads take the math path.
    static let headDimBuckets = [16, 32, 48, 64, 80, 96, 128, 160]

    /// Padded head dims up to this give each warp of the pipelined kernel two 16-row query tiles
    /// (more registers, half the shared-memory reads per tensor-core operation); larger heads one.
    static let twoTilesMaxHeadDim = 64

    static let source = program(sixteenBit: "#define ATTN_TWO_TILES_MAX \(twoTilesMaxHeadDim)\n" + pipelined,
                                entry: "flash_attention")
    static let basicSource = program(sixteenBit: basic, entry: "flash_attention_basic")

    /// Query rows per block of the pipelined 16-bit kernel (4 warps of one or two 16-row tiles).
    static func rowsPerBlock16(dp: Int) -> Int { dp <= twoTilesMaxHeadDim ? 128 : 64 }
    /// Bytes of dynamic shared memory the pipelined 16-bit kernel needs for padded head dim `dp`:
    /// the query tile and two 64-row key and value tiles, rows padded by 8 elements.
    static func sharedBytes16(dp: Int) -> Int { (rowsPerBlock16(dp: dp) + 4 * 64) * (dp + 8) * 2 }
    /// The same for the basic kernel: query and key tiles, and V transposed.
    static func basicSharedBytes16(dp: Int) -> Int { ((64 + 64) * (dp + 8) + dp * (64 + 8)) * 2 }

    private static func program(sixteenBit: String, entry: String) -> String {
        [arguments, "#if DT == 0", float32, "#else", mmaHelpers, sixteenBit, "#endif"].joined(separator: "\n") + "\n"
            + headDimBuckets.map {
                "extern \"C\" __global__ void __launch_bounds__(128) \(entry)_d\($0)(AttnArgs a, float scale) { flash_attention<\($0)>(a, scale); }"
            }.joined(separator: "\n") + "\n"
    }

    private static let arguments = #"""
// Pointers (as integers), shapes, row strides (ld*) and batch strides (bs*) in elements.
struct AttnArgs {
    i64 q, k, v, o;
    i64 B, H, Sq, Sk, D, Dv;
    i64 ldq, ldk, ldv, ldo;
    i64 bsq, bsk, bsv, bso;
    i64 causal, vec;
};
"""#

    private static let float32 = #"""

// float32: 128 threads = 32 query rows x 4 threads; thread `part` owns dims part, part+4, ...
template <int DP>
__device__ __forceinline__ void flash_attention(const AttnArgs& a, float scale) {
    constexpr int BQ = 32, BK = 32, DPT = DP / 4;
    __shared__ float Ks[BK * DP];
    __shared__ float Vs[BK * DP];
    const int tid = threadIdx.x, row = tid >> 2, part = tid & 3;
    const i64 b = blockIdx.z, h = blockIdx.y, q0 = (i64)blockIdx.x * BQ;
    const i64 qi = q0 + row;
    const float* Q = (const float*)a.q + b * a.bsq + h * a.D;
    const float* K = (const float*)a.k + b * a.bsk + h * a.D;
    const float* V = (const float*)a.v + b * a.bsv + h * a.Dv;
    float q[DPT], o[DPT];
#pragma unroll
    for (int i = 0; i < DPT; ++i) {
        const int d = part + 4 * i;
        q[i] = (qi < a.Sq && d < a.D) ? Q[qi * a.ldq + d] * scale : 0.0f;
        o[i] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    const i64 kvEnd = a.causal ? (a.Sk < q0 + BQ ? a.Sk : q0 + BQ) : a.Sk;
    for (i64 kv0 = 0; kv0 < kvEnd; kv0 += BK) {
        for (int idx = tid; idx < BK * DP; idx += blockDim.x) {
            const int r = idx / DP, c = idx - r * DP;
            const i64 key = kv0 + r;
            Ks[idx] = (key < a.Sk && c < a.D) ? K[key * a.ldk + c] : 0.0f;
            Vs[idx] = (key < a.Sk && c < a.Dv) ? V[key * a.ldv + c] : 0.0f;
        }
        __syncthreads();
        float s[BK];
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < BK; ++j) {
            float p = 0.0f;
#pragma unroll
            for (int i = 0; i < DPT; ++i) p += q[i] * Ks[j * DP + part + 4 * i];
            p += __shfl_xor_sync(0xffffffffu, p, 1);
            p += __shfl_xor_sync(0xffffffffu, p, 2);
            const i64 key = kv0 + j;
            if (key >= a.Sk || (a.causal && key > qi)) p = -INFINITY;
            s[j] = p;
            mx = fmaxf(mx, p);
        }
        const float mNew = fmaxf(m, mx);
        const float mSafe = mNew == -INFINITY ? 0.0f : mNew;
        const float corr = expf(m - mSafe);
        l *= corr;
#pragma unroll
        for (int i = 0; i < DPT; ++i) o[i] *= corr;
#pragma unroll
        for (int j = 0; j < BK; ++j) {
            const float p = expf(s[j] - mSafe);
            l += p;
#pragma unroll
            for (int i = 0; i < DPT; ++i) o[i] += p * Vs[j * DP + part + 4 * i];
        }
        m = mNew;
        __syncthreads();
    }
    if (qi < a.Sq) {
        const float inv = 1.0f / l;
        float* O = (float*)a.o + b * a.bso + qi * a.ldo + h * a.Dv;
#pragma unroll
        for (int i = 0; i < DPT; ++i) {
            const int d = part + 4 * i;
            if (d < a.Dv) O[d] = o[i] * inv;
        }
    }
}
"""#

    private static let mmaHelpers = #"""
#if DT == 1
#define MMA_AB "f16"
#else
#define MMA_AB "bf16"
#endif

// D (16x8, f32) += A (16x16, row) * B (16x8, col).
__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
#ifdef DIFFUSE_EMULATOR
    emu_mma16816<T>(c, a, b0, b1, tofloat);
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." MMA_AB "." MMA_AB ".f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ u32 pack2(float lo, float hi) {
    return (u32)fromfloat<T>(lo).bits | ((u32)fromfloat<T>(hi).bits << 16);
}

"""#

    private static let pipelined = #"""
// Shared-memory addresses, ldmatrix and cp.async: PTX on the GPU, the same lane by lane in the
// tests' CPU emulator (Tests/CUDAEmulator).
#ifdef DIFFUSE_EMULATOR
__device__ __forceinline__ u32 smem_address(const void* p) { return emu_smem_address(p); }
__device__ __forceinline__ void ldsm_x4(u32* r, u32 address) { emu_ldmatrix_x4(r, address, false); }
__device__ __forceinline__ void ldsm_x4_trans(u32* r, u32 address) { emu_ldmatrix_x4(r, address, true); }
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool full) { emu_cp_async16(dst, src, full); }
__device__ __forceinline__ void cp_async_commit() {}
__device__ __forceinline__ void cp_async_wait_all() {}
#else
__device__ __forceinline__ u32 smem_address(const void* p) {
    u64 a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (u32)a;
}

// Four 8x8 16-bit matrices from shared memory; lane l gives the address of row l % 8 of matrix
// l / 8 and receives (row g, cols 2t, 2t+1) of each (.trans: (rows 2t, 2t+1, col g)).
__device__ __forceinline__ void ldsm_x4(u32* r, u32 address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}
__device__ __forceinline__ void ldsm_x4_trans(u32* r, u32 address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}

// 16 bytes global -> shared without passing through registers; zeros when !full.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool full) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(full ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
#endif

// Rows [row0, row0 + rows) x DP columns of src (row stride ld) into dst (row stride DP + 8, so
// the 8 rows an ldmatrix reads fall in different banks), zero outside [0, nrows) x [0, D).
// vec (D and ld multiples of 8, 16-byte aligned base): asynchronous 16-byte copies.
template <int DP>
__device__ __forceinline__ void stage_tile(u16* dst, const u16* src, i64 row0, i64 nrows, i64 ld, i64 D, int rows,
                                           bool vec) {
    constexpr int LDS = DP + 8, CHUNKS = DP / 8;
    if (vec) {
        for (int idx = threadIdx.x; idx < rows * CHUNKS; idx += blockDim.x) {
            const int r = idx / CHUNKS, c = (idx - r * CHUNKS) * 8;
            const bool full = row0 + r < nrows && c < D;
            const u16* from = full ? src + (row0 + r) * ld + c : src;
            cp_async16(smem_address(dst + r * LDS + c), from, full);
        }
    } else {
        for (int idx = threadIdx.x; idx < rows * DP; idx += blockDim.x) {
            const int r = idx / DP, c = idx - r * DP;
            dst[r * LDS + c] = (row0 + r < nrows && c < D) ? src[(row0 + r) * ld + c] : (u16)0;
        }
    }
}

// 16-bit (FlashAttention-2's scheme): 4 warps, each with MT tiles of 16 query rows (two for
// heads up to ATTN_TWO_TILES_MAX, so every K/V fragment read from shared memory feeds twice the
// tensor-core work); key/value tiles of 64 rows, double-buffered, so the next tile loads
// (cp.async) while this one computes; every mma operand comes from shared memory by ldmatrix
// (.trans for V: no transposed copy). mma m16n8k16 fragment layouts (PTX ISA): g = lane / 4,
// t = lane % 4; A (g, 2t..), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..); B (k = 2t.., n = g),
// (k = 2t+8.., n = g); C (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1): elements e < 2 are row g,
// e >= 2 row g + 8.
template <int DP>
__device__ __forceinline__ void flash_attention(const AttnArgs& a, float scale) {
    constexpr int MT = DP <= ATTN_TWO_TILES_MAX ? 2 : 1;
    constexpr int BQ = 64 * MT, BK = 64, LDS = DP + 8, KC = DP / 16, NT = DP / 8;
    constexpr u32 TILE_BYTES = BK * LDS * 2;
    DYNAMIC_SHARED(unsigned char, smem);
    u16* Qs = (u16*)smem;
    u16* Ks = Qs + BQ * LDS;      // two tiles
    u16* Vs = Ks + 2 * BK * LDS;  // two tiles
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const i64 b = blockIdx.z, h = blockIdx.y, q0 = (i64)blockIdx.x * BQ;
    const u16* Q = (const u16*)a.q + b * a.bsq + h * a.D;
    const u16* K = (const u16*)a.k + b * a.bsk + h * a.D;
    const u16* V = (const u16*)a.v + b * a.bsv + h * a.Dv;
    const bool vec = a.vec != 0;
    const float scaleLog2 = scale * 1.4426950408889634f;
    const i64 kvEnd = a.causal ? (a.Sk < q0 + BQ ? a.Sk : q0 + BQ) : a.Sk;
    const int tiles = (int)((kvEnd + BK - 1) / BK);

    stage_tile<DP>(Qs, Q, q0, a.Sq, a.ldq, a.D, BQ, vec);
    if (tiles > 0) {
        stage_tile<DP>(Ks, K, 0, a.Sk, a.ldk, a.D, BK, vec);
        stage_tile<DP>(Vs, V, 0, a.Sk, a.ldv, a.Dv, BK, vec);
    }
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();

    // This warp's query rows as A fragments, for every 16 columns of the head.
    u32 qf[MT][KC][4];
    i64 row0[MT];  // first query row of each of this lane's m-tiles (+8 for e >= 2)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const int r = (warp * MT + mt) * 16;
        row0[mt] = q0 + r + g;
        const u32 base = smem_address(Qs + (r + (lane & 15)) * LDS + (lane >> 4) * 8);
#pragma unroll
        for (int kc = 0; kc < KC; ++kc) ldsm_x4(qf[mt][kc], base + kc * 32);
    }
    // Per-lane ldmatrix byte offsets within a tile. K as B of S = Q Kᵀ: matrices (keys 0-7, k 0-7),
    // (keys 0-7, k 8-15), (keys 8-15, k 0-7), (keys 8-15, k 8-15) = b0, b1 of key blocks j, j+1.
    // V as B of O = P V, transposed: (keys 0-7, dims 0-7), (keys 8-15, dims 0-7), (keys 0-7,
    // dims 8-15), (keys 8-15, dims 8-15) = b0, b1 of dim blocks n, n+1.
    const u32 kLane = (u32)((((lane >> 4) * 8 + (lane & 7)) * LDS + ((lane >> 3) & 1) * 8) * 2);
    const u32 vLane = (u32)(((((lane >> 3) & 1) * 8 + (lane & 7)) * LDS + (lane >> 4) * 8) * 2);
    const u32 kBase = smem_address(Ks) + kLane, vBase = smem_address(Vs) + vLane;

    float o[MT][NT][4];
    float m[MT][2], l[MT][2];  // running max (log2 units) and partial sum per row (g, g + 8)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int n = 0; n < NT; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.0f;
        m[mt][0] = m[mt][1] = -INFINITY;
        l[mt][0] = l[mt][1] = 0.0f;
    }

    for (int tile = 0; tile < tiles; ++tile) {
        const int cur = tile & 1;
        const i64 kv0 = (i64)tile * BK;
        if (tile + 1 < tiles) {  // into the other buffer, last read before the previous barrier
            stage_tile<DP>(Ks + (cur ^ 1) * BK * LDS, K, kv0 + BK, a.Sk, a.ldk, a.D, BK, vec);
            stage_tile<DP>(Vs + (cur ^ 1) * BK * LDS, V, kv0 + BK, a.Sk, a.ldv, a.Dv, BK, vec);
            cp_async_commit();
        }
        const u32 kTile = kBase + cur * TILE_BYTES, vTile = vBase + cur * TILE_BYTES;

        float s[MT][8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int j = 0; j < 8; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.0f;
        }
#pragma unroll
        for (int jp = 0; jp < 4; ++jp) {
#pragma unroll
            for (int kc = 0; kc < KC; ++kc) {
                u32 kb[4];
                ldsm_x4(kb, kTile + (jp * 16 * LDS + kc * 16) * 2);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816(s[mt][2 * jp], qf[mt][kc], kb[0], kb[1]);
                    mma16816(s[mt][2 * jp + 1], qf[mt][kc], kb[2], kb[3]);
                }
            }
        }
        // Online softmax in base 2. Keys past the end (and, causal, after the query) only occur
        // in the last tiles.
        const bool mask = a.causal || kv0 + BK > a.Sk;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
            for (int j = 0; j < 8; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float v = s[mt][j][e] * scaleLog2;
                    if (mask) {
                        const i64 key = kv0 + j * 8 + 2 * t + (e & 1);
                        if (key >= a.Sk || (a.causal && key > row0[mt] + (e >> 1) * 8)) v = -INFINITY;
                    }
                    s[mt][j][e] = v;
                    mx[e >> 1] = fmaxf(mx[e >> 1], v);
                }
            }
            float ms[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
                const float mNew = fmaxf(m[mt][r], mx[r]);
                ms[r] = mNew == -INFINITY ? 0.0f : mNew;
                const float corr = exp2f(m[mt][r] - ms[r]);
                l[mt][r] *= corr;
#pragma unroll
                for (int n = 0; n < NT; ++n) { o[mt][n][2 * r] *= corr; o[mt][n][2 * r + 1] *= corr; }
                m[mt][r] = mNew;
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    s[mt][j][e] = exp2f(s[mt][j][e] - ms[e >> 1]);
                    l[mt][e >> 1] += s[mt][j][e];
                }
            }
        }
        // The probabilities of key blocks 2kc, 2kc+1 (C layout) are the A fragment of keys 16kc..16kc+15.
#pragma unroll
        for (int kc = 0; kc < BK / 16; ++kc) {
            u32 pa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                pa[mt][0] = pack2(s[mt][2 * kc][0], s[mt][2 * kc][1]);
                pa[mt][1] = pack2(s[mt][2 * kc][2], s[mt][2 * kc][3]);
                pa[mt][2] = pack2(s[mt][2 * kc + 1][0], s[mt][2 * kc + 1][1]);
                pa[mt][3] = pack2(s[mt][2 * kc + 1][2], s[mt][2 * kc + 1][3]);
            }
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                u32 vb[4];
                ldsm_x4_trans(vb, vTile + (kc * 16 * LDS + np * 16) * 2);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816(o[mt][2 * np], pa[mt], vb[0], vb[1]);
                    mma16816(o[mt][2 * np + 1], pa[mt], vb[2], vb[3]);
                }
            }
        }
        if (tile + 1 < tiles) cp_async_wait_all();
        __syncthreads();  // the next tile is in; this one's readers are done before it is refilled
    }
    T* O = (T*)a.o + b * a.bso + h * a.Dv;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float sum = l[mt][r];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            const float inv = 1.0f / sum;
            const i64 q = row0[mt] + r * 8;
            if (q >= a.Sq) continue;
            T* row = O + q * a.ldo;
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                const i64 d = n * 8 + 2 * t;
                if (d >= a.Dv) continue;
                const float v0 = o[mt][n][2 * r] * inv, v1 = o[mt][n][2 * r + 1] * inv;
                if (vec) {  // Dv even, pairs aligned
                    *(u32*)&row[d] = pack2(v0, v1);
                } else {
                    row[d] = fromfloat<T>(v0);
                    if (d + 1 < a.Dv) row[d + 1] = fromfloat<T>(v1);
                }
            }
        }
    }
}

"""#

    private static let basic = #"""
// rows x DP tile of src (row stride ld) into dst (row stride lds), zero outside [0,nrows) x [0,D).
__device__ __forceinline__ void load_tile(u16* dst, int lds, const u16* src, i64 row0, i64 nrows, i64 ld, i64 D,
                                          int rows, int DP, bool vec) {
    if (vec) {
        const int chunks = DP / 8;
        for (int idx = threadIdx.x; idx < rows * chunks; idx += blockDim.x) {
            const int r = idx / chunks, c = (idx - r * chunks) * 8;
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (row0 + r < nrows && c < D) v = *(const uint4*)(src + (row0 + r) * ld + c);
            *(uint4*)(dst + r * lds + c) = v;
        }
    } else {
        for (int idx = threadIdx.x; idx < rows * DP; idx += blockDim.x) {
            const int r = idx / DP, c = idx - r * DP;
            dst[r * lds + c] = (row0 + r < nrows && c < D) ? src[(row0 + r) * ld + c] : (u16)0;
        }
    }
}

// Like load_tile but stores transposed: dst[c * ldt + r].
__device__ __forceinline__ void load_tile_t(u16* dst, int ldt, const u16* src, i64 row0, i64 nrows, i64 ld, i64 D,
                                            int rows, int DP, bool vec) {
    if (vec) {
        const int chunks = DP / 8;
        for (int idx = threadIdx.x; idx < rows * chunks; idx += blockDim.x) {
            const int r = idx / chunks, c = (idx - r * chunks) * 8;
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (row0 + r < nrows && c < D) v = *(const uint4*)(src + (row0 + r) * ld + c);
            const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int e = 0; e < 8; ++e) dst[(c + e) * ldt + r] = (u16)(w[e >> 1] >> ((e & 1) * 16));
        }
    } else {
        for (int idx = threadIdx.x; idx < rows * DP; idx += blockDim.x) {
            const int r = idx / DP, c = idx - r * DP;
            dst[c * ldt + r] = (row0 + r < nrows && c < D) ? src[(row0 + r) * ld + c] : (u16)0;
        }
    }
}

// 16-bit: 4 warps x 16 query rows; key tiles of 64. mma fragment layouts (PTX ISA, m16n8k16):
// g = lane / 4, t = lane % 4; A regs (g, 2t..), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..);
// B regs (k = 2t.., n = g), (k = 2t+8.., n = g); C (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
template <int DP>
__device__ __forceinline__ void flash_attention(const AttnArgs& a, float scale) {
    constexpr int BQ = 64, BK = 64, LDS = DP + 8, LDV = BK + 8, NT = DP / 8, KC = DP / 16;
    DYNAMIC_SHARED(unsigned char, smem);
    u16* Qs = (u16*)smem;
    u16* Ks = Qs + BQ * LDS;
    u16* Vt = Ks + BK * LDS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const i64 b = blockIdx.z, h = blockIdx.y, q0 = (i64)blockIdx.x * BQ;
    const u16* Q = (const u16*)a.q + b * a.bsq + h * a.D;
    const u16* K = (const u16*)a.k + b * a.bsk + h * a.D;
    const u16* V = (const u16*)a.v + b * a.bsv + h * a.Dv;
    const bool vec = a.vec != 0;
    const float scaleLog2 = scale * 1.4426950408889634f;

    load_tile(Qs, LDS, Q, q0, a.Sq, a.ldq, a.D, BQ, DP, vec);
    __syncthreads();
    const int r0 = warp * 16 + g;
    u32 qf[KC][4];
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
        qf[kc][0] = *(const u32*)&Qs[r0 * LDS + kc * 16 + 2 * t];
        qf[kc][1] = *(const u32*)&Qs[(r0 + 8) * LDS + kc * 16 + 2 * t];
        qf[kc][2] = *(const u32*)&Qs[r0 * LDS + kc * 16 + 8 + 2 * t];
        qf[kc][3] = *(const u32*)&Qs[(r0 + 8) * LDS + kc * 16 + 8 + 2 * t];
    }
    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
    const i64 qa = q0 + r0, qb = qa + 8;
    const i64 kvEnd = a.causal ? (a.Sk < q0 + BQ ? a.Sk : q0 + BQ) : a.Sk;

    for (i64 kv0 = 0; kv0 < kvEnd; kv0 += BK) {
        load_tile(Ks, LDS, K, kv0, a.Sk, a.ldk, a.D, BK, DP, vec);
        load_tile_t(Vt, LDV, V, kv0, a.Sk, a.ldv, a.Dv, BK, DP, vec);
        __syncthreads();

        float s[8][4];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
            for (int kc = 0; kc < KC; ++kc) {
                const u32 b0 = *(const u32*)&Ks[(j * 8 + g) * LDS + kc * 16 + 2 * t];
                const u32 b1 = *(const u32*)&Ks[(j * 8 + g) * LDS + kc * 16 + 8 + 2 * t];
                mma16816(s[j], qf[kc], b0, b1);
            }
        }
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const i64 key = kv0 + j * 8 + 2 * t + (e & 1);
                const i64 qrow = e < 2 ? qa : qb;
                float v = s[j][e] * scaleLog2;
                if (key >= a.Sk || (a.causal && key > qrow)) v = -INFINITY;
                s[j][e] = v;
            }
            mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
            mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
        const float ms0 = n0 == -INFINITY ? 0.0f : n0, ms1 = n1 == -INFINITY ? 0.0f : n1;
        const float c0 = exp2f(m0 - ms0), c1 = exp2f(m1 - ms1);
        l0 *= c0;
        l1 *= c1;
#pragma unroll
        for (int n = 0; n < NT; ++n) { o[n][0] *= c0; o[n][1] *= c0; o[n][2] *= c1; o[n][3] *= c1; }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            s[j][0] = exp2f(s[j][0] - ms0);
            s[j][1] = exp2f(s[j][1] - ms0);
            s[j][2] = exp2f(s[j][2] - ms1);
            s[j][3] = exp2f(s[j][3] - ms1);
            l0 += s[j][0] + s[j][1];
            l1 += s[j][2] + s[j][3];
        }
        m0 = n0;
        m1 = n1;
#pragma unroll
        for (int kc = 0; kc < 4; ++kc) {
            u32 pa[4];
            pa[0] = pack2(s[2 * kc][0], s[2 * kc][1]);
            pa[1] = pack2(s[2 * kc][2], s[2 * kc][3]);
            pa[2] = pack2(s[2 * kc + 1][0], s[2 * kc + 1][1]);
            pa[3] = pack2(s[2 * kc + 1][2], s[2 * kc + 1][3]);
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                const u32 b0 = *(const u32*)&Vt[(n * 8 + g) * LDV + kc * 16 + 2 * t];
                const u32 b1 = *(const u32*)&Vt[(n * 8 + g) * LDV + kc * 16 + 8 + 2 * t];
                mma16816(o[n], pa, b0, b1);
            }
        }
        __syncthreads();
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
    T* O = (T*)a.o + b * a.bso + h * a.Dv;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
        const i64 d = n * 8 + 2 * t;
        if (qa < a.Sq) {
            if (d < a.Dv) O[qa * a.ldo + d] = fromfloat<T>(o[n][0] * inv0);
            if (d + 1 < a.Dv) O[qa * a.ldo + d + 1] = fromfloat<T>(o[n][1] * inv0);
        }
        if (qb < a.Sq) {
            if (d < a.Dv) O[qb * a.ldo + d] = fromfloat<T>(o[n][2] * inv1);
            if (d + 1 < a.Dv) O[qb * a.ldo + d + 1] = fromfloat<T>(o[n][3] * inv1);
        }
    }
}

"""#
}
