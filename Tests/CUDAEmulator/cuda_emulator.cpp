// A CPU emulator of the parts of the CUDA driver API, NVRTC and cuBLASLt that Diffuse's CUDA
// backend calls, so the backend's host code and its real kernels run in CI on machines without
// a GPU. Built as one shared library that the tests link under each library's name
// (libcuda.so.1, libnvrtc.so, libcublasLt.so, libcudnn.so.9) and point DIFFUSE_CUDA_LIBS at.
//
// - Memory is host memory; streams run everything at once, in order; events read a clock.
// - "NVRTC" compiles the kernel source as C++ with the host compiler, behind the fiber runtime
//   of emulator_runtime.h, into a shared object; the "cubin" is that object's bytes, so the
//   backend's on-disk kernel cache works unchanged. cuModuleLoadData loads it with dlopen.
// - Stream capture records launches, copies and matmuls (with copies of their parameters);
//   launching the graph replays them.
// - cuBLASLt matmuls are plain loops with float accumulation over the layouts, batches, types
//   (f32, tf32 rounding, f16, bf16, int8 -> int32, fp8 E4M3 -> f32) and the bias epilogue used.
// - cuDNN's forward convolution is a loop over the descriptors' logical NCHW dimensions in
//   either memory format (NCHW, NHWC), so the backend's descriptors are checked for what the
//   documentation says they mean; "algorithms" are one per math type.
//
// Build: c++ -std=c++17 -O2 -shared -fPIC -DEMU_RUNTIME='"<dir>/emulator_runtime.h"'
//        -DEMU_CXX='"c++"' cuda_emulator.cpp -o libcuda_emulator.so -ldl
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

#include "emulator_numbers.h"

#ifndef EMU_RUNTIME
#error "define EMU_RUNTIME as the path of emulator_runtime.h"
#endif
#ifndef EMU_CXX
#define EMU_CXX "c++"
#endif

#define EXPORT extern "C" __attribute__((visibility("default")))

namespace {

std::recursive_mutex lock;

// ---- Stream capture: work is either done now or recorded into the graph being captured -------

struct Graph { std::vector<std::function<int()>> work; };
Graph* capturing = nullptr;

// One stream for the whole process (the backend uses one): work from any thread runs in turn,
// since each kernel module's fiber runtime has one set of globals.
int submit(std::function<int()> f) {
    std::lock_guard<std::recursive_mutex> g(lock);
    if (capturing) { capturing->work.push_back(std::move(f)); return 0; }
    return f();
}

// ---- Kernel modules ---------------------------------------------------------------------------

struct Module {
    void* handle;
    std::string path;
};
struct Function {
    Module* module;
    std::string name;
    void (*body)(void**);
    int (*argSizes)(size_t*);
    int (*launch)(void (*)(void**), void**, const unsigned*, const unsigned*, unsigned, char*, size_t);
};

const char magic[] = "DIFFUSE-CUDA-EMULATOR-MODULE\n";

std::string lastError;

int fail(int code, std::string message) {
    lastError = std::move(message);
    fprintf(stderr, "cuda emulator: %s\n", lastError.c_str());
    return code;
}

}  // namespace

// ==== Driver API ================================================================================

typedef int CUresult;
typedef unsigned long long CUdeviceptr;

EXPORT CUresult cuInit(unsigned) { return 0; }
EXPORT CUresult cuDriverGetVersion(int* v) { *v = 13000; return 0; }
EXPORT CUresult cuDeviceGetCount(int* n) { *n = 1; return 0; }
EXPORT CUresult cuDeviceGet(int* d, int ordinal) { if (ordinal != 0) return 101; *d = 0; return 0; }
EXPORT CUresult cuDeviceGetName(char* name, int len, int) {
    snprintf(name, (size_t)len, "Diffuse CUDA emulator (CPU)");
    return 0;
}
EXPORT CUresult cuDeviceGetAttribute(int* v, int attribute, int) {
    switch (attribute) {
    case 16: *v = 2; break;            // multiprocessors: small grids keep emulation short
    case 39: *v = 1024; break;         // threads per multiprocessor
    case 75: *v = 9; break;            // compute capability 9.0: every kernel path is taken
    case 76: *v = 0; break;
    case 97: *v = 227 * 1024; break;   // opt-in shared memory per block
    default: *v = 0; break;
    }
    return 0;
}
EXPORT CUresult cuDeviceTotalMem_v2(size_t* bytes, int) { *bytes = (size_t)16 << 30; return 0; }
EXPORT CUresult cuDevicePrimaryCtxRetain(void** ctx, int) { static int c; *ctx = &c; return 0; }
EXPORT CUresult cuCtxSetCurrent(void*) { return 0; }
EXPORT CUresult cuCtxSynchronize() { return 0; }

namespace { size_t allocated = 0; std::map<CUdeviceptr, size_t> allocations; }

EXPORT CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    std::lock_guard<std::recursive_mutex> g(lock);
    void* m = aligned_alloc(256, (bytes + 255) / 256 * 256 + 256);
    if (!m) return 2;  // CUDA_ERROR_OUT_OF_MEMORY
    *p = (CUdeviceptr)m;
    allocations[*p] = bytes;
    allocated += bytes;
    return 0;
}
EXPORT CUresult cuMemFree_v2(CUdeviceptr p) {
    std::lock_guard<std::recursive_mutex> g(lock);
    auto it = allocations.find(p);
    if (it == allocations.end()) return fail(1, "cuMemFree of an address cuMemAlloc did not return");
    allocated -= it->second;
    allocations.erase(it);
    free((void*)p);
    return 0;
}
EXPORT CUresult cuMemAllocHost_v2(void** p, size_t bytes) { *p = aligned_alloc(256, (bytes + 255) / 256 * 256 + 256); return *p ? 0 : 2; }
EXPORT CUresult cuMemFreeHost(void* p) { free(p); return 0; }
EXPORT CUresult cuMemGetInfo_v2(size_t* freeBytes, size_t* total) {
    *total = (size_t)16 << 30;
    *freeBytes = *total > allocated ? *total - allocated : 0;
    return 0;
}
EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void*) {
    // Host sources are read when the work runs, as the GPU would (the caller keeps them alive).
    return submit([=] { memcpy((void*)dst, src, n); return 0; });
}
EXPORT CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void*) {
    return submit([=] { memcpy(dst, (const void*)src, n); return 0; });
}
EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void*) {
    return submit([=] { memmove((void*)dst, (const void*)src, n); return 0; });
}
EXPORT CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void*) {
    return submit([=] { memset((void*)dst, v, n); return 0; });
}

EXPORT CUresult cuStreamCreate(void** s, unsigned) { static int stream; *s = &stream; return 0; }
EXPORT CUresult cuStreamSynchronize(void*) { return 0; }
EXPORT CUresult cuStreamBeginCapture_v2(void*, int) {
    std::lock_guard<std::recursive_mutex> g(lock);
    if (capturing) return fail(900, "cuStreamBeginCapture while capturing");
    capturing = new Graph();
    return 0;
}
EXPORT CUresult cuStreamBeginCapture(void* s, int mode) { return cuStreamBeginCapture_v2(s, mode); }
EXPORT CUresult cuStreamEndCapture(void*, void** graph) {
    std::lock_guard<std::recursive_mutex> g(lock);
    if (!capturing) return fail(901, "cuStreamEndCapture without a capture");
    *graph = capturing;
    capturing = nullptr;
    return 0;
}
EXPORT CUresult cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
    *exec = new Graph(*(Graph*)graph);
    return 0;
}
EXPORT CUresult cuGraphLaunch(void* exec, void*) {
    std::lock_guard<std::recursive_mutex> g(lock);
    for (auto& w : ((Graph*)exec)->work) if (int r = w()) return r;
    return 0;
}
EXPORT CUresult cuGraphDestroy(void* graph) { delete (Graph*)graph; return 0; }
EXPORT CUresult cuGraphExecDestroy(void* exec) { delete (Graph*)exec; return 0; }

namespace { using Clock = std::chrono::steady_clock; }
EXPORT CUresult cuEventCreate(void** e, unsigned) { *e = new Clock::time_point(Clock::now()); return 0; }
EXPORT CUresult cuEventDestroy_v2(void* e) { delete (Clock::time_point*)e; return 0; }
EXPORT CUresult cuEventDestroy(void* e) { return cuEventDestroy_v2(e); }
EXPORT CUresult cuEventRecord(void* e, void*) {
    return submit([=] { *(Clock::time_point*)e = Clock::now(); return 0; });
}
EXPORT CUresult cuEventSynchronize(void*) { return 0; }
EXPORT CUresult cuEventElapsedTime(float* ms, void* a, void* b) {
    *ms = std::chrono::duration<float, std::milli>(*(Clock::time_point*)b - *(Clock::time_point*)a).count();
    return 0;
}
EXPORT CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }

EXPORT CUresult cuModuleLoadData(void** module, const void* image) {
    std::lock_guard<std::recursive_mutex> g(lock);
    const char* bytes = (const char*)image;
    if (strncmp(bytes, magic, sizeof(magic) - 1) != 0) return fail(200, "cuModuleLoadData: not a module of the emulator's NVRTC");
    size_t size;
    memcpy(&size, bytes + sizeof(magic) - 1, sizeof(size));
    char path[] = "/tmp/diffuse-cuda-emulator-XXXXXX.so";
    int fd = mkstemps(path, 3);
    if (fd < 0) return fail(200, "cuModuleLoadData: cannot write a temporary file");
    const char* data = bytes + sizeof(magic) - 1 + sizeof(size);
    for (size_t done = 0; done < size;) {
        ssize_t w = write(fd, data + done, size - done);
        if (w <= 0) { close(fd); unlink(path); return fail(200, "cuModuleLoadData: short write"); }
        done += (size_t)w;
    }
    close(fd);
    void* h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    unlink(path);
    if (!h) return fail(200, std::string("cuModuleLoadData: dlopen: ") + dlerror());
    *module = new Module{h, path};
    return 0;
}
EXPORT CUresult cuModuleGetFunction(void** function, void* module, const char* name) {
    Module* m = (Module*)module;
    auto body = (void (*)(void**))dlsym(m->handle, (std::string("emu_kernel_") + name).c_str());
    auto sizes = (int (*)(size_t*))dlsym(m->handle, (std::string("emu_arg_sizes_") + name).c_str());
    auto launch = (int (*)(void (*)(void**), void**, const unsigned*, const unsigned*, unsigned, char*, size_t))dlsym(m->handle, "emu_launch");
    if (!body || !sizes || !launch) return fail(500, std::string("cuModuleGetFunction: no kernel ") + name);  // CUDA_ERROR_NOT_FOUND
    *function = new Function{m, name, body, sizes, launch};
    return 0;
}
EXPORT CUresult cuFuncSetAttribute(void*, int, int) { return 0; }

EXPORT CUresult cuLaunchKernel(void* function, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                               unsigned sharedBytes, void*, void** params, void** extra) {
    Function* f = (Function*)function;
    if (extra) return fail(1, "cuLaunchKernel: 'extra' parameters are not emulated");
    if (bx * by * bz > 1024) return fail(1, "cuLaunchKernel " + f->name + ": more than 1024 threads per block");  // CUDA_ERROR_INVALID_VALUE
    if (sharedBytes > 227 * 1024) return fail(1, "cuLaunchKernel " + f->name + ": too much shared memory");
    // Copy the arguments now, as the driver does: the caller may reuse its storage.
    size_t sizes[64];
    const int n = f->argSizes(sizes);
    auto storage = std::make_shared<std::vector<std::vector<unsigned char>>>();
    for (int i = 0; i < n; ++i) storage->emplace_back((unsigned char*)params[i], (unsigned char*)params[i] + sizes[i]);
    const unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
    static const bool trace = getenv("DIFFUSE_CUDA_EMULATOR_TRACE") != nullptr;
    return submit([=] {
        if (trace) fprintf(stderr, "cuda emulator: %s grid (%u,%u,%u) block (%u,%u,%u) shared %u\n", f->name.c_str(), gx, gy, gz, bx, by, bz, sharedBytes);
        std::vector<void*> p;
        for (auto& a : *storage) p.push_back(a.data());
        char error[256] = {0};
        if (f->launch(f->body, p.data(), grid, block, sharedBytes, error, sizeof(error)))
            return fail(719, "kernel " + f->name + ": " + error);  // CUDA_ERROR_LAUNCH_FAILED
        return 0;
    });
}

EXPORT CUresult cuGetErrorName(CUresult code, const char** s) {
    static std::string name;
    name = "CUDA_EMULATOR_ERROR_" + std::to_string(code);
    *s = name.c_str();
    return 0;
}
EXPORT CUresult cuGetErrorString(CUresult, const char** s) {
    *s = lastError.empty() ? "emulator error" : lastError.c_str();
    return 0;
}

// ==== NVRTC =====================================================================================

namespace {
struct Program {
    std::string source, name, log;
    std::vector<char> binary;
};

int run(const std::string& command, std::string& output) {
    FILE* p = popen((command + " 2>&1").c_str(), "r");
    if (!p) return -1;
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, p)) > 0) output.append(buf, n);
    const int status = pclose(p);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

std::string quote(const std::string& s) {
    std::string q = "'";
    for (char c : s) { if (c == '\'') q += "'\\''"; else q += c; }
    return q + "'";
}

bool readFile(const std::string& path, std::string& out) {
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) return false;
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
    fclose(f);
    return true;
}

bool writeFile(const std::string& path, const std::string& text) {
    FILE* f = fopen(path.c_str(), "wb");
    if (!f) return false;
    const bool ok = fwrite(text.data(), 1, text.size(), f) == text.size();
    return fclose(f) == 0 && ok;
}

// The kernels' names: the identifiers after `extern "C" __global__ void` (after
// `__launch_bounds__(...)` too) once the preprocessor has expanded the source's macros.
std::vector<std::string> kernelNames(const std::string& preprocessed) {
    std::vector<std::string> names;
    const std::string marker = "emu_global_marker";
    for (size_t at = preprocessed.find(marker); at != std::string::npos; at = preprocessed.find(marker, at + 1)) {
        size_t i = at + marker.size();
        auto skipSpace = [&] { while (i < preprocessed.size() && isspace((unsigned char)preprocessed[i])) ++i; };
        skipSpace();
        if (preprocessed.compare(i, 4, "void") != 0) continue;
        i += 4;
        skipSpace();
        const size_t start = i;
        while (i < preprocessed.size() && (isalnum((unsigned char)preprocessed[i]) || preprocessed[i] == '_')) ++i;
        std::string name = preprocessed.substr(start, i - start);
        skipSpace();
        if (!name.empty() && i < preprocessed.size() && preprocessed[i] == '(') names.push_back(name);
    }
    return names;
}
}  // namespace

typedef int nvrtcResult;

EXPORT nvrtcResult nvrtcVersion(int* major, int* minor) { *major = 13; *minor = 0; return 0; }
EXPORT nvrtcResult nvrtcGetNumSupportedArchs(int* n) { *n = 1; return 0; }
EXPORT nvrtcResult nvrtcGetSupportedArchs(int* archs) { archs[0] = 90; return 0; }
EXPORT const char* nvrtcGetErrorString(nvrtcResult r) {
    switch (r) {
    case 0: return "NVRTC_SUCCESS";
    case 6: return "NVRTC_ERROR_COMPILATION (emulator: the host compiler failed)";
    default: return "NVRTC emulator error";
    }
}
EXPORT nvrtcResult nvrtcCreateProgram(void** prog, const char* src, const char* name, int, const char* const*, const char* const*) {
    *prog = new Program{src, name ? name : "kernel.cu", "", {}};
    return 0;
}
EXPORT nvrtcResult nvrtcDestroyProgram(void** prog) { delete (Program*)*prog; *prog = nullptr; return 0; }

// Compiles with the host compiler: the source's -D options apply, the rest (architecture,
// language standard) are the GPU compiler's business.
EXPORT nvrtcResult nvrtcCompileProgram(void* prog, int numOptions, const char* const* options) {
    Program* p = (Program*)prog;
    std::string defines;
    for (int i = 0; i < numOptions; ++i) {
        std::string o = options[i];
        if (o.rfind("--define-macro=", 0) == 0) o = "-D" + o.substr(15);
        if (o.rfind("-D", 0) == 0) defines += " " + quote(o);
    }
    char dir[] = "/tmp/diffuse-nvrtc-emulator-XXXXXX";
    if (!mkdtemp(dir)) { p->log = "cannot make a temporary folder"; return 6; }
    const std::string d = dir, cu = d + "/kernels.cpp", pre = d + "/marked.cpp", so = d + "/kernels.so";
    std::string out;
    // Pass 1: find the kernels' names in the preprocessed source.
    writeFile(pre, "#define __global__ emu_global_marker\n#define __launch_bounds__(...)\n#define DIFFUSE_EMULATOR 1\n"
                   "#define __CUDA_ARCH__ 900\n" + p->source);
    if (run(EMU_CXX " -std=c++17 -E -P -x c++" + defines + " " + quote(pre), out) != 0) {
        p->log = out;
        return 6;
    }
    std::string program = std::string("#include \"") + EMU_RUNTIME + "\"\n" + p->source + "\n";
    for (const auto& n : kernelNames(out)) program += "EMU_KERNEL(" + n + ")\n";
    writeFile(cu, program);
    // Pass 2: the shared object.
    std::string log;
    const int status = run(EMU_CXX " -std=c++17 -O1 -fPIC -shared -w -fno-strict-aliasing" + defines + " " + quote(cu) + " -o " + quote(so), log);
    p->log = log;
    std::string binary;
    const bool ok = status == 0 && readFile(so, binary);
    unlink(cu.c_str());
    unlink(pre.c_str());
    unlink(so.c_str());
    rmdir(dir);
    if (!ok) return 6;
    const size_t size = binary.size();
    p->binary.assign(magic, magic + sizeof(magic) - 1);
    p->binary.insert(p->binary.end(), (const char*)&size, (const char*)&size + sizeof(size));
    p->binary.insert(p->binary.end(), binary.begin(), binary.end());
    return 0;
}
EXPORT nvrtcResult nvrtcGetProgramLogSize(void* prog, size_t* n) { *n = ((Program*)prog)->log.size() + 1; return 0; }
EXPORT nvrtcResult nvrtcGetProgramLog(void* prog, char* log) {
    const std::string& l = ((Program*)prog)->log;
    memcpy(log, l.c_str(), l.size() + 1);
    return 0;
}
EXPORT nvrtcResult nvrtcGetCUBINSize(void* prog, size_t* n) { *n = ((Program*)prog)->binary.size(); return 0; }
EXPORT nvrtcResult nvrtcGetCUBIN(void* prog, char* out) {
    const auto& b = ((Program*)prog)->binary;
    memcpy(out, b.data(), b.size());
    return 0;
}

// ==== cuBLASLt ==================================================================================

namespace {
// cudaDataType_t values and cuBLASLt attribute numbers (as in Libraries.swift).
enum { R32F = 0, R16F = 2, R8I = 3, R32I = 10, R16BF = 14, R8FE4M3 = 28 };
enum { COMPUTE32F = 68, COMPUTE32I = 72, COMPUTE32F_FAST_TF32 = 77 };

struct MatmulDesc { int compute, scale; int transA = 0, transB = 0; unsigned epilogue = 1; const void* bias = nullptr; };
struct Layout { int type; unsigned long long rows, cols; long long ld; int batch = 1; long long stride = 0; };

double load(const void* base, int type, long long index) {
    switch (type) {
    case R32F: return ((const float*)base)[index];
    case R16F: return emu_half_to_float(((const unsigned short*)base)[index]);
    case R16BF: return emu_bf16_to_float(((const unsigned short*)base)[index]);
    case R8I: return ((const signed char*)base)[index];
    case R32I: return ((const int*)base)[index];
    case R8FE4M3: return emu_e4m3_to_float(((const unsigned char*)base)[index]);
    }
    return NAN;
}
void store(void* base, int type, long long index, double v) {
    switch (type) {
    case R32F: ((float*)base)[index] = (float)v; break;
    case R16F: ((unsigned short*)base)[index] = emu_float_to_half((float)v); break;
    case R16BF: ((unsigned short*)base)[index] = emu_float_to_bf16((float)v); break;
    case R32I: ((int*)base)[index] = (int)v; break;
    case R8I: ((signed char*)base)[index] = (signed char)v; break;
    }
}
}  // namespace

typedef int cublasStatus_t;

EXPORT size_t cublasLtGetVersion() { return 130000; }
EXPORT cublasStatus_t cublasLtCreate(void** h) { static int handle; *h = &handle; return 0; }
EXPORT cublasStatus_t cublasLtMatmulDescCreate(void** d, int compute, int scale) { *d = new MatmulDesc{compute, scale}; return 0; }
EXPORT cublasStatus_t cublasLtMatmulDescDestroy(void* d) { delete (MatmulDesc*)d; return 0; }
EXPORT cublasStatus_t cublasLtMatmulDescSetAttribute(void* desc, int attribute, const void* buf, size_t size) {
    MatmulDesc* d = (MatmulDesc*)desc;
    switch (attribute) {
    case 3: memcpy(&d->transA, buf, 4); return 0;
    case 4: memcpy(&d->transB, buf, 4); return 0;
    case 7: memcpy(&d->epilogue, buf, 4); return 0;
    case 8: memcpy(&d->bias, buf, sizeof(void*)); return 0;
    }
    fail(15, "cublasLtMatmulDescSetAttribute: attribute " + std::to_string(attribute) + " (" + std::to_string(size) + " bytes) is not emulated");
    return 15;  // CUBLAS_STATUS_NOT_SUPPORTED
}
EXPORT cublasStatus_t cublasLtMatrixLayoutCreate(void** l, int type, unsigned long long rows, unsigned long long cols, long long ld) {
    *l = new Layout{type, rows, cols, ld};
    return 0;
}
EXPORT cublasStatus_t cublasLtMatrixLayoutDestroy(void* l) { delete (Layout*)l; return 0; }
EXPORT cublasStatus_t cublasLtMatrixLayoutSetAttribute(void* layout, int attribute, const void* buf, size_t) {
    Layout* l = (Layout*)layout;
    switch (attribute) {
    case 5: memcpy(&l->batch, buf, 4); return 0;
    case 6: memcpy(&l->stride, buf, 8); return 0;
    }
    fail(15, "cublasLtMatrixLayoutSetAttribute: attribute " + std::to_string(attribute) + " is not emulated");
    return 15;
}
EXPORT cublasStatus_t cublasLtMatmulPreferenceCreate(void** p) { static int pref; *p = &pref; return 0; }
EXPORT cublasStatus_t cublasLtMatmulPreferenceDestroy(void*) { return 0; }
EXPORT cublasStatus_t cublasLtMatmulPreferenceSetAttribute(void*, int, const void*, size_t) { return 0; }

// One "algorithm": no workspace, state OK (the heuristic result's layout: algo 64 bytes,
// workspaceSize at 64, state at 72, wavesCount at 76).
EXPORT cublasStatus_t cublasLtMatmulAlgoGetHeuristic(void*, void* desc, void* a, void* b, void*, void*, void*, int requested,
                                                     void* results, int* returned) {
    const MatmulDesc* d = (const MatmulDesc*)desc;
    const int ta = ((Layout*)a)->type, tb = ((Layout*)b)->type;
    if (d->epilogue != 1 && d->epilogue != 4) { *returned = 0; return 15; }
    if ((ta == R8I) != (d->compute == COMPUTE32I) || ta != tb) { *returned = 0; return 15; }
    if (requested < 1) { *returned = 0; return 7; }
    memset(results, 0, 96);
    *returned = 1;
    return 0;
}

// D = alpha op(A) op(B) + beta C, column-major (element (r, c) at r + c * ld), per batch.
EXPORT cublasStatus_t cublasLtMatmul(void*, void* descp, const void* alpha, const void* A, void* Al, const void* B, void* Bl,
                                     const void* beta, const void* C, void* Cl, void* D, void* Dl, const void*, void*, size_t, void*) {
    const MatmulDesc d = *(MatmulDesc*)descp;
    const Layout a = *(Layout*)Al, b = *(Layout*)Bl, c = *(Layout*)Cl, o = *(Layout*)Dl;
    const bool intScale = d.scale == R32I;
    double al, be;
    if (intScale) { al = *(const int*)alpha; be = *(const int*)beta; }
    else { al = *(const float*)alpha; be = *(const float*)beta; }
    const long long m = (long long)o.rows, n = (long long)o.cols;
    const long long k = d.transA ? (long long)a.rows : (long long)a.cols;
    const long long bk = d.transB ? (long long)b.cols : (long long)b.rows;
    if (k != bk || (d.transA ? (long long)a.cols : (long long)a.rows) != m || (d.transB ? (long long)b.rows : (long long)b.cols) != n)
        return fail(7, "cublasLtMatmul: layouts do not chain (" + std::to_string(m) + "x" + std::to_string(n) + ", k " + std::to_string(k) + " vs " + std::to_string(bk) + ")");
    const bool roundTF32 = d.compute == COMPUTE32F_FAST_TF32 && a.type == R32F;
    const bool integer = d.compute == COMPUTE32I;
    return submit([=] {
        std::vector<double> colA((size_t)k);
        for (int batch = 0; batch < o.batch; ++batch) {
            const long long oa = a.batch > 1 ? batch * a.stride : 0, ob = b.batch > 1 ? batch * b.stride : 0;
            const long long oc = c.batch > 1 ? batch * c.stride : 0, od = o.batch > 1 ? batch * o.stride : 0;
            for (long long i = 0; i < m; ++i) {
                for (long long p = 0; p < k; ++p) {
                    double v = load(A, a.type, oa + (d.transA ? p + i * a.ld : i + p * a.ld));
                    colA[(size_t)p] = roundTF32 ? emu_tf32((float)v) : v;
                }
                for (long long j = 0; j < n; ++j) {
                    float facc = 0;
                    long long iacc = 0;
                    for (long long p = 0; p < k; ++p) {
                        double v = load(B, b.type, ob + (d.transB ? j + p * b.ld : p + j * b.ld));
                        if (roundTF32) v = emu_tf32((float)v);
                        if (integer) iacc += (long long)colA[(size_t)p] * (long long)v;
                        else facc += (float)colA[(size_t)p] * (float)v;
                    }
                    const double acc = integer ? (double)(int)iacc : facc;
                    double r = al * acc;
                    if (be != 0) r += be * load(C, c.type, oc + i + j * c.ld);
                    if (d.epilogue == 4 && d.bias) r += load(d.bias, o.type, i);
                    if (!intScale) r = (float)r;
                    store(D, o.type, od + i + j * o.ld, r);
                }
            }
        }
        return 0;
    });
}

// ==== cuDNN (the legacy convolution API) ========================================================

namespace {
enum { DNN_FLOAT = 0, DNN_HALF = 2, DNN_BFLOAT16 = 9 };
enum { DNN_NCHW = 0, DNN_NHWC = 1 };
enum { DNN_BAD_PARAM = 3, DNN_NOT_SUPPORTED = 9 };
struct TensorDesc { int format = -1, type = 0, n = 0, c = 0, h = 0, w = 0; };
struct FilterDesc { int format = -1, type = 0, k = 0, c = 0, h = 0, w = 0; };
struct ConvDesc { int padH = 0, padW = 0, strideH = 1, strideW = 1, dilH = 1, dilW = 1, mode = 1, compute = 0, groups = 1, math = 0; };

int blasType(int dnnType) { return dnnType == DNN_FLOAT ? R32F : dnnType == DNN_HALF ? R16F : dnnType == DNN_BFLOAT16 ? R16BF : -1; }

// Offset of logical element (n, c, h, w) of an N x C x H x W tensor stored in `format`.
long long offset(int format, int C, int H, int W, long long n, long long c, long long h, long long w) {
    return format == DNN_NHWC ? ((n * H + h) * W + w) * C + c : ((n * C + c) * H + h) * W + w;
}

std::string convCheck(const TensorDesc& x, const FilterDesc& f, const ConvDesc& d, const TensorDesc& y) {
    if (x.format < 0 || y.format < 0 || f.format < 0) return "a descriptor was never set";
    if (x.type != y.type || x.type != f.type || blasType(x.type) < 0) return "data types differ or are not emulated";
    if (x.format != y.format || x.format != f.format) return "formats differ";
    if (d.mode != 1) return "only cross-correlation is emulated";
    if (f.c * d.groups != x.c || f.k != y.c || f.k % d.groups != 0) return "channels do not match the filter and groups";
    const int ho = (x.h + 2 * d.padH - d.dilH * (f.h - 1) - 1) / d.strideH + 1;
    const int wo = (x.w + 2 * d.padW - d.dilW * (f.w - 1) - 1) / d.strideW + 1;
    if (y.n != x.n || y.h != ho || y.w != wo)
        return "output " + std::to_string(y.n) + "x" + std::to_string(y.c) + "x" + std::to_string(y.h) + "x" + std::to_string(y.w) +
               " does not match the convolution's " + std::to_string(x.n) + "x" + std::to_string(f.k) + "x" + std::to_string(ho) + "x" + std::to_string(wo);
    return "";
}

// One result: algorithm 1 (IMPLICIT_PRECOMP_GEMM), no workspace, the descriptor's math type.
void writePerf(void* perf, const ConvDesc& d) {
    memset(perf, 0, 48);
    const int algo = 1, math = d.math;
    memcpy(perf, &algo, 4);
    const float time = 0.01f;
    memcpy((char*)perf + 8, &time, 4);
    memcpy((char*)perf + 28, &math, 4);
}
}  // namespace

typedef int cudnnStatus_t;

EXPORT size_t cudnnGetVersion() { return 90000; }
EXPORT const char* cudnnGetErrorString(cudnnStatus_t s) {
    return s == 0 ? "CUDNN_STATUS_SUCCESS" : lastError.empty() ? "CUDNN emulator error" : lastError.c_str();
}
EXPORT cudnnStatus_t cudnnCreate(void** h) { static int handle; *h = &handle; return 0; }
EXPORT cudnnStatus_t cudnnSetStream(void*, void*) { return 0; }
EXPORT cudnnStatus_t cudnnCreateTensorDescriptor(void** d) { *d = new TensorDesc(); return 0; }
EXPORT cudnnStatus_t cudnnDestroyTensorDescriptor(void* d) { delete (TensorDesc*)d; return 0; }
EXPORT cudnnStatus_t cudnnSetTensor4dDescriptor(void* d, int format, int type, int n, int c, int h, int w) {
    if (format != DNN_NCHW && format != DNN_NHWC) return fail(DNN_NOT_SUPPORTED, "cudnnSetTensor4dDescriptor: format " + std::to_string(format));
    *(TensorDesc*)d = {format, type, n, c, h, w};
    return 0;
}
EXPORT cudnnStatus_t cudnnCreateFilterDescriptor(void** d) { *d = new FilterDesc(); return 0; }
EXPORT cudnnStatus_t cudnnDestroyFilterDescriptor(void* d) { delete (FilterDesc*)d; return 0; }
EXPORT cudnnStatus_t cudnnSetFilter4dDescriptor(void* d, int type, int format, int k, int c, int h, int w) {
    if (format != DNN_NCHW && format != DNN_NHWC) return fail(DNN_NOT_SUPPORTED, "cudnnSetFilter4dDescriptor: format " + std::to_string(format));
    *(FilterDesc*)d = {format, type, k, c, h, w};
    return 0;
}
EXPORT cudnnStatus_t cudnnCreateConvolutionDescriptor(void** d) { *d = new ConvDesc(); return 0; }
EXPORT cudnnStatus_t cudnnDestroyConvolutionDescriptor(void* d) { delete (ConvDesc*)d; return 0; }
EXPORT cudnnStatus_t cudnnSetConvolution2dDescriptor(void* desc, int padH, int padW, int u, int v, int dilH, int dilW, int mode, int compute) {
    ConvDesc* d = (ConvDesc*)desc;
    d->padH = padH; d->padW = padW; d->strideH = u; d->strideW = v; d->dilH = dilH; d->dilW = dilW; d->mode = mode; d->compute = compute;
    return 0;
}
EXPORT cudnnStatus_t cudnnSetConvolutionGroupCount(void* d, int g) { ((ConvDesc*)d)->groups = g; return 0; }
EXPORT cudnnStatus_t cudnnSetConvolutionMathType(void* d, int m) { ((ConvDesc*)d)->math = m; return 0; }
EXPORT cudnnStatus_t cudnnGetConvolutionForwardAlgorithm_v7(void*, void* x, void* w, void* conv, void* y, int requested, int* returned, void* perf) {
    const std::string why = convCheck(*(TensorDesc*)x, *(FilterDesc*)w, *(ConvDesc*)conv, *(TensorDesc*)y);
    if (!why.empty()) return fail(DNN_BAD_PARAM, "cudnnGetConvolutionForwardAlgorithm_v7: " + why);
    if (requested < 1) return DNN_BAD_PARAM;
    writePerf(perf, *(ConvDesc*)conv);
    *returned = 1;
    return 0;
}
EXPORT cudnnStatus_t cudnnFindConvolutionForwardAlgorithmEx(void* h, void* x, CUdeviceptr, void* w, CUdeviceptr, void* conv, void* y, CUdeviceptr,
                                                            int requested, int* returned, void* perf, CUdeviceptr, size_t) {
    return cudnnGetConvolutionForwardAlgorithm_v7(h, x, w, conv, y, requested, returned, perf);
}
EXPORT cudnnStatus_t cudnnGetConvolutionForwardWorkspaceSize(void*, void*, void*, void*, void*, int algo, size_t* bytes) {
    if (algo != 1) return fail(DNN_BAD_PARAM, "cudnnGetConvolutionForwardWorkspaceSize: algorithm " + std::to_string(algo) + " was never offered");
    *bytes = 0;
    return 0;
}
EXPORT cudnnStatus_t cudnnConvolutionForward(void*, const void* alpha, void* xd, CUdeviceptr xp, void* wd, CUdeviceptr wp, void* cd, int algo,
                                             CUdeviceptr, size_t, const void* beta, void* yd, CUdeviceptr yp) {
    const TensorDesc x = *(TensorDesc*)xd, y = *(TensorDesc*)yd;
    const FilterDesc f = *(FilterDesc*)wd;
    const ConvDesc d = *(ConvDesc*)cd;
    const std::string why = convCheck(x, f, d, y);
    if (!why.empty()) return fail(DNN_BAD_PARAM, "cudnnConvolutionForward: " + why);
    if (algo != 1) return fail(DNN_BAD_PARAM, "cudnnConvolutionForward: algorithm " + std::to_string(algo) + " was never offered");
    const float al = *(const float*)alpha, be = *(const float*)beta;
    const int t = blasType(x.type);
    const bool tf32Math = x.type == DNN_FLOAT && d.math != 3;  // CUDNN_FMA_MATH keeps IEEE fp32
    return submit([=] {
        const int cg = f.c, kg = f.k / d.groups;
        for (long long n = 0; n < y.n; ++n)
        for (long long k = 0; k < y.c; ++k)
        for (long long oh = 0; oh < y.h; ++oh)
        for (long long ow = 0; ow < y.w; ++ow) {
            const long long g = k / kg;
            float acc = 0;
            for (long long c = 0; c < cg; ++c)
            for (long long r = 0; r < f.h; ++r)
            for (long long s = 0; s < f.w; ++s) {
                const long long ih = oh * d.strideH - d.padH + r * d.dilH, iw = ow * d.strideW - d.padW + s * d.dilW;
                if (ih < 0 || ih >= x.h || iw < 0 || iw >= x.w) continue;
                float a = (float)load((const void*)xp, t, offset(x.format, x.c, x.h, x.w, n, g * cg + c, ih, iw));
                float b = (float)load((const void*)wp, t, offset(f.format, f.c, f.h, f.w, k, c, r, s));
                if (tf32Math) { a = emu_tf32(a); b = emu_tf32(b); }
                acc += a * b;
            }
            const long long o = offset(y.format, y.c, y.h, y.w, n, k, oh, ow);
            float v = al * acc;
            if (be != 0) v += be * (float)load((const void*)yp, t, o);
            store((void*)yp, t, o, v);
        }
        return 0;
    });
}
