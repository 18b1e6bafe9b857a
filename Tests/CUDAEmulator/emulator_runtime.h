// The CPU emulator's side of a kernel module: prepended to each kernel family's CUDA C source
// when the emulated NVRTC (cuda_emulator.cpp) compiles it as C++ for the host.
//
// Every CUDA thread of a block is a fiber (ucontext) on the calling OS thread; blocks run one
// after another. A fiber runs until it reaches __syncthreads() or a warp collective (shuffle,
// ldmatrix, mma), where it waits for the other threads of its block or warp, so the kernels'
// barriers and cross-lane exchanges mean what they mean on the GPU. `__shared__` variables
// become function statics: one copy, shared by the block's fibers, since blocks never overlap.
// Nothing here is fast; it exists so CI can run the real kernels and host code without a GPU.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <ucontext.h>

#include "emulator_numbers.h"

#define DIFFUSE_EMULATOR 1
#define __CUDA_ARCH__ 900
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __align__(n) alignas(n)
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__ __restrict

struct emu_dim3 { unsigned x, y, z; };
struct float4 { float x, y, z, w; };
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
static inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
static inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
static inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }

static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
static inline int __float_as_int(float f) { int u; memcpy(&u, &f, 4); return u; }
static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
static inline int __float2int_rn(float v) { return (int)nearbyintf(v); }
// Round-to-nearest arithmetic that the compiler may not contract into an FMA.
static inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
static inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
static inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
// glibc declares these names itself.
#define __sincosf emu_sincosf
#define __expf emu_expf
#define __fdividef emu_fdividef
static inline void emu_sincosf(float v, float* s, float* c) { *s = sinf(v); *c = cosf(v); }
static inline float emu_expf(float v) { return expf(v); }
static inline float emu_fdividef(float a, float b) { return a / b; }
static inline float rsqrtf(float v) { return 1.0f / sqrtf(v); }
[[noreturn]] static inline void __trap() { fprintf(stderr, "cuda emulator: __trap() in a kernel\n"); abort(); }
template <typename A, typename B> static inline auto min(A a, B b) -> decltype(a + b) { return a < b ? a : b; }
template <typename A, typename B> static inline auto max(A a, B b) -> decltype(a + b) { return a > b ? a : b; }

// ---- Fibers -------------------------------------------------------------------------------
// On x86-64 a fiber switch saves the callee-saved registers and the floating-point control
// words on the stack and swaps stack pointers (swapcontext would also make a system call per
// switch for the signal mask: 20x slower). Elsewhere, ucontext.

#if defined(__x86_64__)
struct EmuContext { void* sp; };
extern "C" void emu_switch_context(EmuContext* from, EmuContext* to);
asm(R"(
    .text
    .p2align 4
    .hidden emu_switch_context
    .type emu_switch_context, @function
emu_switch_context:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq (%rsi), %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch_context, .-emu_switch_context
)");
// A new fiber's stack as emu_switch_context leaves it: control words, six registers, then
// `entry` as the return address (and a null one above it, keeping the ABI's alignment).
static inline void emu_make_context(EmuContext* c, char* stack, size_t bytes, void (*entry)()) {
    unsigned long long* top = (unsigned long long*)(((uintptr_t)(stack + bytes)) & ~(uintptr_t)15);
    top[-1] = 0;
    top[-2] = (unsigned long long)entry;
    for (int i = 3; i <= 8; ++i) top[-i] = 0;
    unsigned control[2];
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control[0]), "=m"(control[1]));
    memcpy(&top[-9], control, 8);
    c->sp = &top[-9];
}
#else
struct EmuContext { ucontext_t uc; };
static inline void emu_switch_context(EmuContext* from, EmuContext* to) { swapcontext(&from->uc, &to->uc); }
static inline void emu_make_context(EmuContext* c, char* stack, size_t bytes, void (*entry)()) {
    getcontext(&c->uc);
    c->uc.uc_stack.ss_sp = stack;
    c->uc.uc_stack.ss_size = bytes;
    c->uc.uc_link = nullptr;
    makecontext(&c->uc, entry, 0);
}
#endif

enum EmuState { EMU_RUN, EMU_WAIT_BLOCK, EMU_WAIT_WARP, EMU_DONE };

struct EmuThread {
    EmuContext context;
    emu_dim3 tid;
    unsigned linear;
    unsigned phase;  // which of the warp's two exchange slots this lane's next collective uses
    EmuState state;
    char* stack;
};

// What each lane contributes to a warp collective. Two, used alternately: a lane can only come
// back to one after the collective in between, whose barrier every lane passes after reading it.
struct EmuWarpSlot {
    unsigned long long words[32][4];
    const void* pointers[32];
};

static EmuThread* emu_threads = nullptr;
static unsigned emu_thread_capacity = 0;
static EmuThread* emu_cur = nullptr;
static EmuContext emu_scheduler;
static emu_dim3 emu_block_idx, emu_block_dim, emu_grid_dim;
static unsigned char* emu_dynamic_shared = nullptr;
static EmuWarpSlot emu_warps[32][2];
static void (*emu_body)(void**) = nullptr;
static void** emu_params = nullptr;
static const size_t emu_stack_bytes = 256 * 1024;

#define threadIdx (emu_cur->tid)
#define blockIdx emu_block_idx
#define blockDim emu_block_dim
#define gridDim emu_grid_dim
#define DYNAMIC_SHARED(type, name) type* name = (type*)emu_dynamic_shared

static inline void emu_wait(EmuState s) {
    emu_cur->state = s;
    emu_switch_context(&emu_cur->context, &emu_scheduler);
}
static inline void __syncthreads() { emu_wait(EMU_WAIT_BLOCK); }
static inline void __syncwarp(unsigned = 0xffffffffu) { emu_wait(EMU_WAIT_WARP); }
static inline unsigned emu_lane() { return emu_cur->linear & 31u; }
// The slot of this lane's next collective (and the lane moves on to the other one).
static inline EmuWarpSlot& emu_warp() {
    EmuWarpSlot& w = emu_warps[emu_cur->linear >> 5][emu_cur->phase];
    emu_cur->phase ^= 1;
    return w;
}

template <typename V> static inline V __shfl_xor_sync(unsigned, V v, int laneMask, int width = 32) {
    static_assert(sizeof(V) <= 8, "shuffle of a wide type");
    EmuWarpSlot& w = emu_warp();
    const unsigned lane = emu_lane();
    memcpy(&w.words[lane][0], &v, sizeof(V));
    __syncwarp();
    const unsigned src = (lane ^ (unsigned)laneMask) & (unsigned)(width - 1) | (lane & ~(unsigned)(width - 1));
    V r;
    memcpy(&r, &w.words[src][0], sizeof(V));
    return r;
}
template <typename V> static inline V __shfl_sync(unsigned, V v, int srcLane, int width = 32) {
    EmuWarpSlot& w = emu_warp();
    const unsigned lane = emu_lane();
    memcpy(&w.words[lane][0], &v, sizeof(V));
    __syncwarp();
    V r;
    memcpy(&r, &w.words[(lane & ~(unsigned)(width - 1)) + ((unsigned)srcLane & (unsigned)(width - 1))][0], sizeof(V));
    return r;
}
// Fibers never preempt each other, so a plain read-modify-write is atomic.
template <typename V> static inline V atomicAdd(V* p, V v) { const V old = *p; *p = old + v; return old; }
template <typename V> static inline V atomicMax(V* p, V v) { const V old = *p; if (v > old) *p = v; return old; }

// ---- Tensor-core and async-copy instructions, lane by lane (PTX ISA fragment layouts) --------

static inline unsigned emu_smem_address(const void* p) { return (unsigned)((const unsigned char*)p - emu_dynamic_shared); }
static inline unsigned char* emu_smem(unsigned address) { return emu_dynamic_shared + address; }

// ldmatrix .x4: lane l gives row l % 8 of matrix l / 8 and gets (row l / 4, cols 2(l % 4), +1) of
// each matrix; .trans gets (rows 2(l % 4), +1, col l / 4).
static inline void emu_ldmatrix_x4(unsigned* r, unsigned address, bool trans) {
    EmuWarpSlot& w = emu_warp();
    const unsigned lane = emu_lane();
    w.pointers[lane] = emu_smem(address);
    __syncwarp();
    const unsigned g = lane >> 2, t = lane & 3;
    for (int j = 0; j < 4; ++j) {
        unsigned short lo, hi;
        if (!trans) {
            const unsigned short* row = (const unsigned short*)w.pointers[j * 8 + g];
            lo = row[2 * t];
            hi = row[2 * t + 1];
        } else {
            lo = ((const unsigned short*)w.pointers[j * 8 + 2 * t])[g];
            hi = ((const unsigned short*)w.pointers[j * 8 + 2 * t + 1])[g];
        }
        r[j] = (unsigned)lo | ((unsigned)hi << 16);
    }
}

// mma.sync m16n8k16 row.col, f32 accumulators: lane (g = l / 4, t = l % 4) holds
// A[g][2t..], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..]; B[2t..][g], B[2t+8..][g] (k, n);
// C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1].
template <typename Half>
static inline void emu_mma16816(float* c, const unsigned* a, unsigned b0, unsigned b1, float (*widen)(Half)) {
    EmuWarpSlot& w = emu_warp();
    const unsigned lane = emu_lane();
    for (int i = 0; i < 4; ++i) w.words[lane][i] = a[i] | ((unsigned long long)(i < 2 ? (i == 0 ? b0 : b1) : 0) << 32);
    __syncwarp();
    auto half = [&](unsigned word, int which) { Half h; h.bits = (unsigned short)(which ? word >> 16 : word & 0xffffu); return widen(h); };
    auto A = [&](int row, int k) {
        const int gl = row & 7, hiRow = row >> 3, kk = k & 7, hiK = k >> 3;
        const unsigned src = gl * 4 + (kk >> 1);
        return half((unsigned)w.words[src][hiRow + 2 * hiK], kk & 1);
    };
    auto B = [&](int k, int n) {
        const int kk = k & 7, hiK = k >> 3;
        const unsigned src = n * 4 + (kk >> 1);
        return half((unsigned)(w.words[src][hiK] >> 32), kk & 1);
    };
    const unsigned g = lane >> 2, t = lane & 3;
    float out[4];
    for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
        float s = c[i];
        for (int k = 0; k < 16; ++k) s += A(row, k) * B(k, col);
        out[i] = s;
    }
    for (int i = 0; i < 4; ++i) c[i] = out[i];
}

// cp.async: copied at once (a legal schedule: the wait that must follow then has nothing to do).
static inline void emu_cp_async16(unsigned dst, const void* src, bool full) {
    if (full) memcpy(emu_smem(dst), src, 16);
    else memset(emu_smem(dst), 0, 16);
}

// ---- Launch ----------------------------------------------------------------------------------

template <typename... A, size_t... I>
static inline void emu_invoke(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(*(typename std::remove_cv<typename std::remove_reference<A>::type>::type*)p[I]...);
}
template <typename... A> static inline void emu_call(void (*f)(A...), void** p) { emu_invoke(f, p, std::index_sequence_for<A...>{}); }
template <typename... A> static inline int emu_arg_sizes(void (*)(A...), size_t* out) {
    const size_t s[] = {sizeof(typename std::remove_reference<A>::type)..., 0};
    for (size_t i = 0; i < sizeof...(A); ++i) out[i] = s[i];
    return (int)sizeof...(A);
}

// Each kernel K gets emu_kernel_K (runs K's body with the launch's parameters) and
// emu_arg_sizes_K (how many parameters and the size of each, for copying them into a graph).
#define EMU_KERNEL(name) \
    extern "C" void emu_kernel_##name(void** p) { emu_call(name, p); } \
    extern "C" int emu_arg_sizes_##name(size_t* out) { return emu_arg_sizes(name, out); }

static void emu_fiber_entry() {
    emu_body(emu_params);
    emu_cur->state = EMU_DONE;
    emu_switch_context(&emu_cur->context, &emu_scheduler);
    abort();  // a finished fiber is never resumed
}

// Runs one launch to completion; returns 0, or 1 with a message when the threads deadlock
// (a barrier that not every thread reaches).
extern "C" int emu_launch(void (*body)(void**), void** params, const unsigned* grid, const unsigned* block,
                          unsigned sharedBytes, char* error, size_t errorBytes) {
    const unsigned n = block[0] * block[1] * block[2];
    if (n == 0 || n > 1024) { snprintf(error, errorBytes, "block of %u threads", n); return 1; }
    if (n > emu_thread_capacity) {
        emu_threads = (EmuThread*)realloc(emu_threads, n * sizeof(EmuThread));
        for (unsigned i = emu_thread_capacity; i < n; ++i) emu_threads[i].stack = (char*)malloc(emu_stack_bytes);
        emu_thread_capacity = n;
    }
    static unsigned char* shared = nullptr;
    static size_t sharedCapacity = 0;
    if (sharedBytes > sharedCapacity) { free(shared); shared = (unsigned char*)aligned_alloc(128, (sharedBytes + 127) / 128 * 128); sharedCapacity = sharedBytes; }
    emu_dynamic_shared = shared;
    emu_body = body;
    emu_params = params;
    emu_grid_dim = {grid[0], grid[1], grid[2]};
    emu_block_dim = {block[0], block[1], block[2]};
    for (unsigned bz = 0; bz < grid[2]; ++bz)
    for (unsigned by = 0; by < grid[1]; ++by)
    for (unsigned bx = 0; bx < grid[0]; ++bx) {
        emu_block_idx = {bx, by, bz};
        for (unsigned i = 0; i < n; ++i) {
            EmuThread& t = emu_threads[i];
            t.linear = i;
            t.tid = {i % block[0], (i / block[0]) % block[1], i / (block[0] * block[1])};
            t.state = EMU_RUN;
            t.phase = 0;
            emu_make_context(&t.context, t.stack, emu_stack_bytes, emu_fiber_entry);
        }
        for (;;) {
            bool ran = false;
            for (unsigned i = 0; i < n; ++i) {
                if (emu_threads[i].state != EMU_RUN) continue;
                emu_cur = &emu_threads[i];
                emu_switch_context(&emu_scheduler, &emu_cur->context);
                ran = true;
            }
            // Release a barrier once every live thread (block) or lane (warp) waits at it.
            unsigned live = 0, atBlock = 0;
            for (unsigned i = 0; i < n; ++i) {
                live += emu_threads[i].state != EMU_DONE;
                atBlock += emu_threads[i].state == EMU_WAIT_BLOCK;
            }
            if (live == 0) break;
            bool released = false;
            if (atBlock == live) {
                for (unsigned i = 0; i < n; ++i) if (emu_threads[i].state == EMU_WAIT_BLOCK) emu_threads[i].state = EMU_RUN;
                released = true;
            }
            for (unsigned w0 = 0; w0 < n; w0 += 32) {
                const unsigned w1 = std::min(n, w0 + 32);
                unsigned wl = 0, ww = 0;
                for (unsigned i = w0; i < w1; ++i) { wl += emu_threads[i].state != EMU_DONE; ww += emu_threads[i].state == EMU_WAIT_WARP; }
                if (wl > 0 && ww == wl) {
                    for (unsigned i = w0; i < w1; ++i) if (emu_threads[i].state == EMU_WAIT_WARP) emu_threads[i].state = EMU_RUN;
                    released = true;
                }
            }
            if (!ran && !released) {
                snprintf(error, errorBytes, "deadlock in block (%u,%u,%u): %u live threads, %u at __syncthreads", bx, by, bz, live, atBlock);
                return 1;
            }
        }
    }
    return 0;
}
