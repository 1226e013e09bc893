// cuda_cpu.h — runs mot's CUDA code on the CPU: kernels, the runtime calls, cuBLAS and NCCL,
// compiled by g++ with no nvcc and no driver. What a kernel sees is declared here; the machinery
// (the fiber scheduler, device memory, the checks and their reports, cuBLAS, NCCL over MPI) is in
// cuda_cpu.cpp. test/CUDA_CPU.md tells the whole story.
//
// How a .cu file gets here. test/cuda_cpu.pl copies it to build/cuda_cpu/ with three rewrites
// that keep every line where it was (so file:line in reports, warnings and gdb are the original's):
//   kernel<<<grid, block, smem, stream>>>(args)  ->  cuda_cpu::launch(__FILE__, __LINE__, "kernel",
//                                                      kernel, grid, block, smem, stream)(args)
//   __shared__ T a[N];                            ->  static T a[N]; cuda_cpu_shared(a);
//   __launch_bounds__(n) f(...) {                 ->  f(...) { cuda_cpu::launch_bounds(__FILE__, __LINE__, n);
// and the compiler is given `-include test/cuda_cpu.h`. The sources themselves stay ordinary CUDA:
// nvcc builds them unchanged.
//
// The execution model. Each CUDA thread is a fiber (its own stack, switched by a few instructions
// of assembly). One block runs at a time; its threads run in turn, each until it reaches a
// __syncthreads() (a real barrier), a warp shuffle (the lanes named in the mask exchange values
// once all of them have arrived) or its end. threadIdx/blockIdx/blockDim/gridDim are macros that
// read the running fiber's coordinates. __shared__ arrays are static arrays, refilled with NaN
// bytes when a block first reaches their declaration: blocks never overlap, so static storage is
// per block.
#pragma once
#define CUDA_CPU 1

// The real CUDA headers give the types, enums and API declarations; cuda_cpu.cpp defines the
// functions. No libcudart, libcublas or libnccl is linked.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cublas_v2.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- execution-space keywords: plain C++ on the CPU ------------------------------------------
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __constant__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __constant__ static
// __shared__ and __launch_bounds__ are rewritten by cuda_cpu.pl before the compiler sees them.

namespace cuda_cpu {

// Where a launch comes from and what it asks for; every report names it.
struct LaunchSite {
    const char* file;
    int line;
    const char* kernel;
    dim3 grid, block;
    size_t smem;
};

// The running CUDA thread's coordinates (the scheduler updates them on every switch).
struct Coords {
    uint3 thread_idx, block_idx;
    dim3 block_dim, grid_dim;
};
extern Coords g_coords;
extern bool g_in_kernel;
const uint3& thread_idx_checked();  // reports a use outside a kernel
inline const uint3& thread_idx() { return g_in_kernel ? g_coords.thread_idx : thread_idx_checked(); }

// Kernel-side primitives (each may switch to another fiber).
void syncthreads(const char* file, int line);
void syncwarp(const char* file, int line, unsigned mask);
struct SyncwarpAt {  // __syncwarp() and __syncwarp(mask), with the call site
    const char* file;
    int line;
    void operator()(unsigned mask = 0xffffffffu) const { syncwarp(file, line, mask); }
};
enum ShflKind { SHFL_IDX, SHFL_UP, SHFL_DOWN, SHFL_XOR };
uint64_t shfl_bits(ShflKind kind, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line);
template <typename T>
inline T shfl(ShflKind kind, const char* file, int line, unsigned mask, T v, int arg, int width = 32) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle of a type over 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    bits = shfl_bits(kind, mask, bits, arg, width, file, line);
    memcpy(&v, &bits, sizeof(T));
    return v;
}
void launch_bounds(const char* file, int line, int max_threads, int min_blocks = 0);
void shared_array(void* p, size_t bytes, const char* name, const char* file, int line);
void* dynamic_shared();

// Host side of a launch: checks the configuration, then runs every block of the grid, calling
// body(arg) on each thread's fiber.
void run_grid(const LaunchSite& site, void (*body)(void*), void* arg);
// A pointer argument must be null, inside a device allocation, or pinned host memory.
void check_pointer_arg(const LaunchSite& site, int index, const void* p);

template <typename Tuple, size_t... I>
inline void check_pointer_args(const LaunchSite& site, const Tuple& t, std::index_sequence<I...>) {
    auto one = [&](int i, const auto& v) {
        if constexpr (std::is_pointer<std::decay_t<decltype(v)>>::value) check_pointer_arg(site, i, (const void*)v);
    };
    (one((int)I, std::get<I>(t)), ...);
}

// kernel<<<grid, block, smem, stream>>>(args) becomes launch(...)(args): the arguments are
// converted to the kernel's parameter types once, as CUDA does, and every thread calls the
// kernel with its own copy of them.
template <typename... P>
struct Launch {
    LaunchSite site;
    void (*kernel)(P...);
    template <typename... A>
    void operator()(A&&... a) const {
        static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
        struct Call {
            void (*kernel)(P...);
            std::tuple<std::decay_t<P>...> args;
        } call{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(a)...)};
        check_pointer_args(site, call.args, std::index_sequence_for<P...>());
        run_grid(
            site, [](void* c) { std::apply(static_cast<Call*>(c)->kernel, static_cast<Call*>(c)->args); }, &call);
    }
};
template <typename... P>
inline Launch<P...> launch(const char* file, int line, const char* name, void (*kernel)(P...), dim3 grid, dim3 block,
                           size_t smem = 0, cudaStream_t = nullptr) {
    return Launch<P...>{LaunchSite{file, line, name, grid, block, smem}, kernel};
}

}  // namespace cuda_cpu

// ---- the built-in variables and intrinsics a kernel uses ---------------------------------------
#define threadIdx (cuda_cpu::thread_idx())
#define blockIdx (cuda_cpu::g_coords.block_idx)
#define blockDim (cuda_cpu::g_coords.block_dim)
#define gridDim (cuda_cpu::g_coords.grid_dim)
constexpr int warpSize = 32;
#define __syncthreads() cuda_cpu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) cuda_cpu::SyncwarpAt{__FILE__, __LINE__}(__VA_ARGS__)
#define __shfl_sync(...) cuda_cpu::shfl(cuda_cpu::SHFL_IDX, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) cuda_cpu::shfl(cuda_cpu::SHFL_UP, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) cuda_cpu::shfl(cuda_cpu::SHFL_DOWN, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) cuda_cpu::shfl(cuda_cpu::SHFL_XOR, __FILE__, __LINE__, __VA_ARGS__)
#define cuda_cpu_shared(a) cuda_cpu::shared_array((void*)&(a), sizeof(a), #a, __FILE__, __LINE__)

// CUDA's min/max are overloaded for the integer and floating types (device and host); std::min
// takes one type, so mixed calls like min(size_t, size_t + int) need these.
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> min(A a, B b) {
    return b < a ? (std::common_type_t<A, B>)b : (std::common_type_t<A, B>)a;
}
template <typename A, typename B,
          typename = std::enable_if_t<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>>
inline std::common_type_t<A, B> max(A a, B b) {
    return a < b ? (std::common_type_t<A, B>)b : (std::common_type_t<A, B>)a;
}

// ---- WMMA (nvcuda::wmma): warp-wide tile multiply-accumulate ------------------------------------
// On a GPU a fragment's elements are spread over the warp's 32 lanes in a layout the API hides. Here
// every lane holds the whole tile (num_elements = rows x cols), so code that only fills, loads,
// multiplies, stores and applies the same operation to every x[i] computes exactly what it would on
// a GPU. A store checks that all lanes' copies agree: code that treats lanes differently relies on
// the hidden layout, and is reported. Every call must be reached by the whole warp (a convergence
// check that, unlike __syncwarp(), orders no memory). Pointers must be 32-byte aligned and ldm a
// multiple of 16 bytes, as on the GPU.
#include <mma.h>  // the real header declares nothing outside nvcc: its guard is set here
namespace cuda_cpu {
void wmma_converge(const void* p, size_t ldm_bytes, const char* what);  // whole warp arrives; checks p, ldm
bool wmma_store_lane(const void* frag, size_t bytes);                   // lanes agree? true on lane 0
}  // namespace cuda_cpu
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K>
struct tile_shape;
template <int M, int N, int K>
struct tile_shape<matrix_a, M, N, K> {
    static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct tile_shape<matrix_b, M, N, K> {
    static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct tile_shape<accumulator, M, N, K> {
    static constexpr int rows = M, cols = N;
};
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static constexpr int rows = tile_shape<Use, M, N, K>::rows, cols = tile_shape<Use, M, N, K>::cols;
    static constexpr int num_elements = rows * cols;
    typedef T element_type;
    T x[num_elements];  // the whole tile, row by row
};
template <typename Use, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v) {
    for (int i = 0; i < f.num_elements; i++) f.x[i] = (T)v;
}
template <typename F, typename T>
inline void copy_tile(F& f, const T* p, unsigned ldm, bool row_major) {
    for (int r = 0; r < f.rows; r++)
        for (int c = 0; c < f.cols; c++)
            f.x[r * f.cols + c] = row_major ? p[(size_t)r * ldm + c] : p[(size_t)c * ldm + r];
}
template <typename F, typename T>
__attribute__((no_sanitize("thread"))) inline void copy_tile_unchecked(F& f, const T* p, unsigned ldm, bool row_major) {
    for (int r = 0; r < f.rows; r++)
        for (int c = 0; c < f.cols; c++)
            f.x[r * f.cols + c] = row_major ? p[(size_t)r * ldm + c] : p[(size_t)c * ldm + r];
}
// Lanes 0 and 1 read through the race check; the others read the same bytes unchecked. The check
// keeps two readers per byte, and all lanes read in one step (no __syncwarp() between), so two
// lanes report every race 32 would, for a sixteenth of the checking.
template <typename F, typename T>
inline void load_tile(F& f, const T* p, unsigned ldm, bool row_major) {
    cuda_cpu::wmma_converge(p, ldm * sizeof(T), "load_matrix_sync");
    const uint3 t = cuda_cpu::thread_idx();
    const dim3 bd = cuda_cpu::g_coords.block_dim;
    if ((t.x + bd.x * (t.y + bd.y * t.z)) % 32 < 2) copy_tile(f, p, ldm, row_major);
    else copy_tile_unchecked(f, p, ldm, row_major);
}
template <typename Use, int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<Use, M, N, K, T, row_major>& f, const T* p, unsigned ldm) {
    load_tile(f, p, ldm, true);
}
template <typename Use, int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<Use, M, N, K, T, col_major>& f, const T* p, unsigned ldm) {
    load_tile(f, p, ldm, false);
}
template <int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t l) {
    load_tile(f, p, ldm, l == mem_row_major);
}
template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t l) {
    cuda_cpu::wmma_converge(p, ldm * sizeof(T), "store_matrix_sync");
    if (!cuda_cpu::wmma_store_lane(&f, sizeof f)) return;  // one lane writes the tile all lanes hold
    for (int r = 0; r < f.rows; r++)
        for (int c = 0; c < f.cols; c++)
            (l == mem_row_major ? p[(size_t)r * ldm + c] : p[(size_t)c * ldm + r]) = f.x[r * f.cols + c];
}
inline float wmma_float(float v) { return v; }
inline float wmma_float(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float wmma_float(__half v) { return __half2float(v); }
// d = a b + c, products accumulated in fp32 in k order. Fragments are lane-private (never shared
// memory), so the race check's instrumentation is left out here: every lane of every warp runs
// this whole product, and the instrumented loop made tensor-core kernels several times slower.
template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
__attribute__((no_sanitize("thread"))) inline void mma_sync(fragment<accumulator, M, N, K, TC>& d,
                                                            const fragment<matrix_a, M, N, K, TA, LA>& a,
                                                            const fragment<matrix_b, M, N, K, TB, LB>& b,
                                                            const fragment<accumulator, M, N, K, TC>& c) {
    cuda_cpu::wmma_converge(nullptr, 0, "mma_sync");
    float fa[M * K], fbt[N * K], out[M * N];  // b transposed, so the k loop runs over contiguous floats
    for (int i = 0; i < M * K; i++) fa[i] = wmma_float(a.x[i]);
    for (int k = 0; k < K; k++)
        for (int j = 0; j < N; j++) fbt[j * K + k] = wmma_float(b.x[k * N + j]);
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float s = wmma_float(c.x[i * N + j]);
            for (int k = 0; k < K; k++) s += fa[i * K + k] * fbt[j * K + k];
            out[i * N + j] = s;
        }
    for (int i = 0; i < M * N; i++) d.x[i] = (TC)out[i];
}
}  // namespace wmma
}  // namespace nvcuda

// ---- runtime calls that can go wrong in ways a report should place: they take the call site ----
namespace cuda_cpu {
// Device-memory traffic, for checking dev/roofline's byte counts: between traffic_begin() and
// traffic_end(), every kernel launch, cublasGemmEx and cudaMemset records the distinct bytes of
// device allocations it read and the distinct bytes it wrote (a byte read by many threads, or
// twice, counts once: compulsory traffic, as the roofline counts it; a byte read and written counts
// in both). Kernels are counted only in the instrumented build (-DCUDA_CPU_RACE, test_gpu_cpu),
// whose load and store hooks see their accesses; elsewhere traffic_begin() returns false.
// GEMMs count A and B once and C (read too when beta != 0) at their element sizes.
struct Traffic {
    std::string what;  // kernel name, "cublasGemmEx" or "cudaMemset"
    size_t read, written;
};
bool traffic_begin();
std::vector<Traffic> traffic_end();

cudaError_t memcpy_at(const char* file, int line, void* dst, const void* src, size_t n, cudaMemcpyKind kind);
cudaError_t memset_at(const char* file, int line, void* dst, int value, size_t n);
cudaError_t free_at(const char* file, int line, void* p);
cublasStatus_t gemm_at(const char* file, int line, cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                       int n, int k, const void* alpha, const void* A, cudaDataType_t at, int lda, const void* B,
                       cudaDataType_t bt, int ldb, const void* beta, void* C, cudaDataType_t ct, int ldc,
                       cublasComputeType_t compute, cublasGemmAlgo_t algo);
}  // namespace cuda_cpu
#define cudaMemcpy(dst, src, n, kind) cuda_cpu::memcpy_at(__FILE__, __LINE__, dst, src, n, kind)
#define cudaMemcpyAsync(dst, src, n, kind, ...) cuda_cpu::memcpy_at(__FILE__, __LINE__, dst, src, n, kind)
#define cudaMemset(dst, v, n) cuda_cpu::memset_at(__FILE__, __LINE__, dst, v, n)
#define cudaMemsetAsync(dst, v, n, ...) cuda_cpu::memset_at(__FILE__, __LINE__, dst, v, n)
#define cudaFree(p) cuda_cpu::free_at(__FILE__, __LINE__, p)
#undef cublasGemmEx
#define cublasGemmEx(...) cuda_cpu::gemm_at(__FILE__, __LINE__, __VA_ARGS__)
