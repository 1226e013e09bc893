// test_cuda_cpu.cu — the CUDA-on-CPU layer (test/cuda_cpu.h) itself, and the GPU trainer through it.
//   1. what the layer promises: barriers, shuffles, cuBLAS's column-major GEMM, bf16 rounding
//   2. every check, each proven by a deliberately broken kernel or call run in a child process
//      (this file is compiled with -fsanitize=thread's instrumentation for the race check):
//      the report must name the launch (file:line), the kernel, the block and the thread, and the
//      child must exit non-zero
//   3. the GPU trainer (./mot_cpu_cuda) against the CPU trainer (./mot): losses to the printed
//      digits, with --accum, experts, the Transfusion setting, and resume reproducing an
//      uninterrupted run bitwise
//   4. data parallel: mpirun -np 2 ./mot_cpu_cuda_mpi equals one process with --accum 2, bitwise
// Built only through the layer (make test/test_cuda_cpu): this file is CUDA, rewritten by cuda_cpu.pl.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "mot.h"
#include "test/common.h"

#define CK(call) REQUIRE((call) == cudaSuccess)

template <typename T>
static T* dev(size_t n) {
    void* p = nullptr;
    CK(cudaMalloc(&p, n * sizeof(T)));
    return (T*)p;
}
template <typename T>
static std::vector<T> get(const T* d, size_t n) {
    std::vector<T> h(n);
    CK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
}
template <typename T>
static T* put(const std::vector<T>& h) {
    T* d = dev<T>(h.size());
    CK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}

// ============================================================================================
// 1. What the layer promises
// ============================================================================================
// Each thread writes its slot, waits, then reads its neighbour's: right only if the barrier holds
// every thread until all have written.
__global__ void rotate_kernel(int* out) {
    __shared__ int s[96];
    const int t = threadIdx.x + blockDim.x * threadIdx.y;
    s[t] = t * 10 + blockIdx.x;
    __syncthreads();
    out[blockIdx.x * 96 + t] = s[(t + 1) % 96];
}
TEST_CASE("cuda_cpu: __syncthreads is a barrier; blockIdx, threadIdx and blockDim are per thread") {
    int* d = dev<int>(3 * 96);
    rotate_kernel<<<3, dim3(32, 3)>>>(d);
    std::vector<int> h = get(d, 3 * 96);
    for (int b = 0; b < 3; b++)
        for (int t = 0; t < 96; t++) CHECK(h[b * 96 + t] == ((t + 1) % 96) * 10 + b);
    CK(cudaFree(d));
}

__global__ void shuffle_kernel(int* out) {
    const int l = threadIdx.x;
    out[0 * 64 + l] = __shfl_xor_sync(0xffffffffu, l, 5);
    out[1 * 64 + l] = __shfl_up_sync(0xffffffffu, l, 3);
    out[2 * 64 + l] = __shfl_down_sync(0xffffffffu, l, 3, 16);
    out[3 * 64 + l] = __shfl_sync(0xffffffffu, l, 7, 8);
}
TEST_CASE("cuda_cpu: warp shuffles follow CUDA's lane rules (xor, up, down, idx, width)") {
    int* d = dev<int>(4 * 64);
    shuffle_kernel<<<1, 64>>>(d);
    std::vector<int> h = get(d, 4 * 64);
    for (int l = 0; l < 64; l++) {
        const int w = l / 32 * 32, j = l % 32;
        INFO("lane ", l);
        CHECK(h[l] == w + (j ^ 5));
        CHECK(h[64 + l] == (j >= 3 ? l - 3 : l));
        CHECK(h[128 + l] == (j % 16 + 3 < 16 ? l + 3 : l));
        CHECK(h[192 + l] == w + j / 8 * 8 + 7);
    }
    CK(cudaFree(d));
}

TEST_CASE("cuda_cpu: bf16 conversions round to nearest even (the real cuda_bf16.h)") {
    CHECK(__bfloat162float(__float2bfloat16(1.0f + 1.0f / 256)) == 1.0f);                       // tie -> even (down)
    CHECK(__bfloat162float(__float2bfloat16(1.0f + 3.0f / 256)) == 1.0f + 1.0f / 64);           // tie -> even (up)
    CHECK(__bfloat162float(__float2bfloat16(1.0f + 1.0f / 256 + 1e-6f)) == 1.0f + 1.0f / 128);  // above the tie
}

// cuBLAS semantics: column-major, op(A) m x k, op(B) k x n, leading dimensions may exceed the rows,
// beta == 0 never reads C.
static float ref_elt(const std::vector<float>& X, int ld, bool t, int r, int c) {
    return t ? X[c + (size_t)r * ld] : X[r + (size_t)c * ld];
}
TEST_CASE("cuda_cpu: cublasGemmEx has cuBLAS's column-major semantics") {
    cublasHandle_t h;
    REQUIRE(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS);
    const int m = 5, n = 7, k = 9;
    uint64_t seed = 3;
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++)
            for (float beta : {0.0f, 1.0f}) {
                const int lda = (ta ? k : m) + 2, ldb = (tb ? n : k) + 1, ldc = m + 3;
                std::vector<float> A((size_t)lda * (ta ? m : k)), B((size_t)ldb * (tb ? k : n)), C((size_t)ldc * n);
                for (float& x : A) x = (float)mot_rand_normal(&seed);
                for (float& x : B) x = (float)mot_rand_normal(&seed);
                for (float& x : C) x = beta == 0 ? NAN : (float)mot_rand_normal(&seed);  // beta 0: never read
                float *dA = put(A), *dB = put(B), *dC = put(C);
                const float alpha = 0.5f;
                REQUIRE(cublasGemmEx(h, ta ? CUBLAS_OP_T : CUBLAS_OP_N, tb ? CUBLAS_OP_T : CUBLAS_OP_N, m, n, k, &alpha,
                                     dA, CUDA_R_32F, lda, dB, CUDA_R_32F, ldb, &beta, dC, CUDA_R_32F, ldc,
                                     CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
                std::vector<float> out = get(dC, C.size());
                for (int j = 0; j < n; j++)
                    for (int i = 0; i < m; i++) {
                        double s = 0;
                        for (int p = 0; p < k; p++) s += (double)ref_elt(A, lda, ta, i, p) * ref_elt(B, ldb, tb, p, j);
                        const double want = alpha * s + (beta == 0 ? 0.0 : beta * C[i + (size_t)j * ldc]);
                        INFO("ta ", ta, " tb ", tb, " beta ", beta, " C(", i, ",", j, ")");
                        CHECK(std::fabs(out[i + (size_t)j * ldc] - want) <= 1e-5 * (1 + std::fabs(want)));
                    }
                for (int j = 0; j < n; j++)  // rows past m of each column are untouched
                    for (int i = m; i < ldc; i++)
                        CHECK(memcmp(&out[i + (size_t)j * ldc], &C[i + (size_t)j * ldc], 4) == 0);
                CK(cudaFree(dA));
                CK(cudaFree(dB));
                CK(cudaFree(dC));
            }
    // a leading dimension below the rows is an error, as in cuBLAS
    const float one = 1, zero = 0;
    float* d = dev<float>(64);
    CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, 4, &one, d, CUDA_R_32F, 3, d, CUDA_R_32F, 4, &zero, d,
                       CUDA_R_32F, 4, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_INVALID_VALUE);
    CK(cudaFree(d));
    cublasDestroy(h);
}

// A bf16 C (mot.cu writes activations that only feed bf16 consumers this way): alpha A B + beta C
// formed in fp32 and rounded once, to nearest even, as the GPU's epilogue does. C = A B with
// A = [1, 1] (1 x 2) and column j of B = [1, t_j]: 1 + t_j is exact in fp32, and t_j = 2^-8 and
// 3 * 2^-8 put it exactly halfway between bf16 neighbours (even: 1, and 1 + 2^-6; truncation or
// rounding half up would give 1 + 2^-7 for one of them), 2^-8 + 2^-15 just above the tie.
// Then beta = 1 on a bf16 C holding t_j, with A B = 1: the same sums, read from C, one rounding.
TEST_CASE("cuda_cpu: cublasGemmEx into a bf16 C rounds alpha A B + beta C once, to nearest even") {
    cublasHandle_t h;
    REQUIRE(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS);
    const float t[3] = {1.0f / 256, 3.0f / 256, 1.0f / 256 + 1.0f / 32768};
    const float want[3] = {1.0f, 1.0f + 1.0f / 64, 1.0f + 1.0f / 128};
    auto bf = [](std::vector<float> v) {
        std::vector<__nv_bfloat16> b;
        for (float x : v) b.push_back(__float2bfloat16(x));
        return b;
    };
    __nv_bfloat16* dA = put(bf({1, 1}));
    __nv_bfloat16* dB = put(bf({1, t[0], 1, t[1], 1, t[2]}));
    __nv_bfloat16* dB0 = put(bf({1, 0, 1, 0, 1, 0}));
    __nv_bfloat16* dC = put(bf({t[0], t[1], t[2]}));
    for (int k = 0; k < 3; k++) CHECK(__bfloat162float(__float2bfloat16(t[k])) == t[k]);  // exact operands
    const float one = 1, zero = 0;
    for (int pass = 0; pass < 2; pass++) {
        INFO((pass == 0 ? "beta 0, 1 + t_j from A B" : "beta 1, 1 from A B + t_j from C"));
        if (pass == 1) CK(cudaMemcpy(dC, bf({t[0], t[1], t[2]}).data(), 6, cudaMemcpyHostToDevice));
        REQUIRE(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 1, 3, 2, &one, dA, CUDA_R_16BF, 1, pass ? dB0 : dB,
                             CUDA_R_16BF, 2, pass ? &one : &zero, dC, CUDA_R_16BF, 1, CUBLAS_COMPUTE_32F,
                             CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
        const std::vector<__nv_bfloat16> out = get(dC, 3);
        for (int j = 0; j < 3; j++) {
            INFO("column ", j);
            CHECK(__bfloat162float(out[j]) == want[j]);
        }
    }
    // a bf16 C needs bf16 operands, as in cuBLAS
    float* d = dev<float>(16);
    CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &one, d, CUDA_R_32F, 2, d, CUDA_R_32F, 2, &zero, dC,
                       CUDA_R_16BF, 2, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_NOT_SUPPORTED);
    CK(cudaFree(d));
    CK(cudaFree(dA));
    CK(cudaFree(dB));
    CK(cudaFree(dB0));
    CK(cudaFree(dC));
    cublasDestroy(h);
}

// WMMA: one warp per 16 x 16 tile of C = A B (A 32 x 16 row-major, B 16 x 32 column-major, bf16).
__global__ void wmma_gemm_kernel(float* C, const __nv_bfloat16* A, const __nv_bfloat16* B) {
    using namespace nvcuda;
    __shared__ __align__(32) float tile[4][16 * 16];
    const int w = threadIdx.x / 32, ti = w / 2, tj = w % 2;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    wmma::fill_fragment(c, 0.0f);
    wmma::load_matrix_sync(a, A + ti * 16 * 16, 16);
    wmma::load_matrix_sync(b, B + tj * 16 * 16, 16);
    wmma::mma_sync(c, a, b, c);
    for (int i = 0; i < c.num_elements; i++) c.x[i] *= 2.0f;  // the same operation on every element
    wmma::store_matrix_sync(tile[w], c, 16, wmma::mem_row_major);
    __syncwarp();  // the tile one lane stored is read by every lane of the warp
    for (int e = threadIdx.x % 32; e < 256; e += 32) C[(ti * 16 + e / 16) * 32 + tj * 16 + e % 16] = tile[w][e];
}
TEST_CASE("cuda_cpu: WMMA tiles (bf16 in, fp32 accumulation) multiply as a GEMM does") {
    uint64_t seed = 5;
    std::vector<__nv_bfloat16> A(32 * 16), B(16 * 32);
    for (auto& x : A) x = __float2bfloat16((float)mot_rand_normal(&seed));
    for (auto& x : B) x = __float2bfloat16((float)mot_rand_normal(&seed));
    __nv_bfloat16 *dA = put(A), *dB = put(B);
    float* dC = dev<float>(32 * 32);
    wmma_gemm_kernel<<<1, 128>>>(dC, dA, dB);
    std::vector<float> C = get(dC, 32 * 32);
    for (int i = 0; i < 32; i++)
        for (int j = 0; j < 32; j++) {
            float s = 0;
            for (int k = 0; k < 16; k++) s += __bfloat162float(A[i * 16 + k]) * __bfloat162float(B[j * 16 + k]);
            INFO("C(", i, ",", j, ")");
            CHECK(C[i * 32 + j] == 2.0f * s);
        }
}

// A fragment stored, then refilled at once and stored again (as the attention kernels' loops do):
// lane 0 runs on after its store and refills the fragment before the other lanes have compared
// their copies with it, which the store's lane check must not take for lane-dependent code.
__global__ void wmma_reuse_kernel(float* out) {
    using namespace nvcuda;
    __shared__ __align__(32) float tile[3 * 16 * 16];
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    for (int n = 0; n < 3; n++) {
        wmma::fill_fragment(c, (float)n);
        wmma::store_matrix_sync(tile + n * 256, c, 16, wmma::mem_row_major);
    }
    __syncwarp();
    for (int n = 0; n < 3; n++) out[n * 32 + threadIdx.x] = tile[n * 256 + threadIdx.x];
}
TEST_CASE("cuda_cpu: a fragment refilled after a store is not taken for lane-dependent code") {
    float* d = dev<float>(96);
    wmma_reuse_kernel<<<1, 32>>>(d);
    std::vector<float> o = get(d, 96);
    for (int i = 0; i < 96; i++) CHECK(o[i] == (float)(i / 32));
}

// ============================================================================================
// 2. The checks: each broken kernel or call runs in a child; its stderr must hold the report
// ============================================================================================
struct Child {
    int status = 0;
    std::string err;
};
static Child in_child(const std::function<void()>& fn) {
    int pipefd[2];
    REQUIRE(pipe(pipefd) == 0);
    fflush(stdout);
    const pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        close(pipefd[0]);
        dup2(pipefd[1], 2);
        fn();
        _exit(0);  // not reported: the parent sees status 0
    }
    close(pipefd[1]);
    Child c;
    char buf[4096];
    ssize_t n;
    while ((n = read(pipefd[0], buf, sizeof buf)) > 0) c.err.append(buf, (size_t)n);
    close(pipefd[0]);
    waitpid(pid, &c.status, 0);
    return c;
}
// The line of this file that holds the first launch (<<<) or CUDA call (cudaX() at or after line
// `from`: the site a report must name. Read from the source rather than counted from __LINE__, so
// the layout of a call (one line or several) does not matter.
static int call_site(int from) {
    std::ifstream f("test/test_cuda_cpu.cu");
    REQUIRE_MESSAGE(f, "test/test_cuda_cpu.cu: cannot open (the tests run from the repository root)");
    std::string text;
    for (int n = 1; std::getline(f, text); n++) {
        if (n < from) continue;
        if (text.find("<<<") != std::string::npos) return n;
        for (size_t p = text.find("cuda"); p != std::string::npos; p = text.find("cuda", p + 1))
            if (p + 4 < text.size() && isupper((unsigned char)text[p + 4]) && text.find('(', p) != std::string::npos)
                return n;
    }
    FAIL("no launch or CUDA call at or after line ", from);
    return 0;
}
// The child must exit non-zero with one report naming the site of the first launch or CUDA call
// at or after `line` (file:line), and holding every `want`.
static void expect_report(const std::function<void()>& fn, int line, std::vector<std::string> want) {
    Child c = in_child(fn);
    INFO("stderr: ", c.err);
    CHECK(WIFEXITED(c.status));
    CHECK(WEXITSTATUS(c.status) != 0);
    CHECK(c.err.find("cuda_cpu: test/test_cuda_cpu.cu:" + std::to_string(call_site(line)) + ":") != std::string::npos);
    for (const std::string& w : want) CHECK(c.err.find(w) != std::string::npos);
}

__global__ void half_barrier_kernel(float* out) {
    if (threadIdx.x < 16) __syncthreads();  // threads 16..31 never get here
    out[threadIdx.x] = 1;
}
__global__ void two_barriers_kernel(float* out) {
    if (threadIdx.x % 2) __syncthreads();
    else __syncthreads();
    out[threadIdx.x] = 1;
}
TEST_CASE("cuda_cpu check: a __syncthreads() that not every thread of the block reaches") {
    float* d = dev<float>(64);
    int line = __LINE__ + 1;
    expect_report(
        [&] { half_barrier_kernel<<<2, 32>>>(d); }, line,
        {"kernel half_barrier_kernel, block (0,0,0), thread (16,0,0)", "exited without reaching __syncthreads()"});
    line = __LINE__ + 1;
    expect_report([&] { two_barriers_kernel<<<1, 32>>>(d); }, line,
                  {"kernel two_barriers_kernel, block (0,0,0), thread (", "must meet at the same barrier"});
}

__global__ void shuffle_exited_kernel(float* out) {
    if (threadIdx.x >= 16) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f * threadIdx.x, 1);
}
__global__ void shuffle_waits_kernel(float* out) {
    if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f * threadIdx.x, 1);
    __syncthreads();
}
__global__ void shuffle_outside_mask_kernel(float* out) {
    if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1.0f * threadIdx.x, 20);
}
TEST_CASE("cuda_cpu check: a shuffle whose mask names lanes that exited or never arrive") {
    float* d = dev<float>(32);
    int line = __LINE__ + 1;
    expect_report([&] { shuffle_exited_kernel<<<1, 32>>>(d); }, line,
                  {"kernel shuffle_exited_kernel, block (0,0,0), thread (0,0,0)", "names lane 16, which has exited"});
    line = __LINE__ + 1;
    expect_report([&] { shuffle_waits_kernel<<<1, 32>>>(d); }, line,
                  {"kernel shuffle_waits_kernel, block (0,0,0), thread (", "names lane 16, which never arrives",
                   "waiting at __syncthreads()"});
    line = __LINE__ + 1;
    expect_report([&] { shuffle_outside_mask_kernel<<<1, 32>>>(d); }, line,
                  {"kernel shuffle_outside_mask_kernel", "reads lane 20, which is not in the mask"});
}

__global__ void plain_kernel(float* out) { out[threadIdx.x] = 1; }
__global__ void __launch_bounds__(64) bounded_kernel(float* out) { out[threadIdx.x] = 1; }
__global__ void big_shared_kernel(float* out) {
    __shared__ float big[12289];  // 49,156 bytes
    big[threadIdx.x] = 1;
    out[threadIdx.x] = big[threadIdx.x];
}
TEST_CASE("cuda_cpu check: launches over the block/grid limits, __launch_bounds__ or 48 KB of shared memory") {
    float* d = dev<float>(2048);
    int line = __LINE__ + 1;
    expect_report([&] { plain_kernel<<<1, dim3(32, 33)>>>(d); }, line,
                  {"kernel plain_kernel", "threads per block is 1056"});
    line = __LINE__ + 1;
    expect_report([&] { plain_kernel<<<dim3(1, 65536), 32>>>(d); }, line,
                  {"kernel plain_kernel", "gridDim.y is 65536"});
    line = __LINE__ + 1;
    expect_report([&] { plain_kernel<<<1, dim3(2, 2, 65)>>>(d); }, line, {"blockDim.z is 65"});
    line = __LINE__ + 1;
    expect_report([&] { plain_kernel<<<1, 32, 49153>>>(d); }, line, {"dynamic shared memory in bytes is 49153"});
    line = __LINE__ + 1;
    expect_report([&] { bounded_kernel<<<1, 128>>>(d); }, line,
                  {"kernel bounded_kernel, block (0,0,0), thread (0,0,0)",
                   "128 threads per block, over the kernel's "
                   "__launch_bounds__(64)"});
    line = __LINE__ + 1;
    expect_report([&] { big_shared_kernel<<<1, 32>>>(d); }, line,
                  {"kernel big_shared_kernel, block (0,0,0), thread (0,0,0)", "__shared__ big", "49156 bytes"});
}

__global__ void past_end_kernel(float* out, int n) {
    out[threadIdx.x] = 1;
    if (threadIdx.x == 5) out[n] = 2;  // one past the end
}
__global__ void before_start_kernel(float* out) {
    if (threadIdx.x == 3) out[-1000] = 2;  // 4,000 bytes before: in the guard page
}
TEST_CASE("cuda_cpu check: an out-of-bounds device access") {
    float* d = dev<float>(64);  // 256 bytes: ends flush against the guard page
    int line = __LINE__ + 1;
    expect_report([&] { past_end_kernel<<<1, 32>>>(d, 64); }, line,
                  {"kernel past_end_kernel, block (0,0,0), thread (5,0,0)",
                   "byte 256 of a device allocation of 256 bytes: past its end"});
    line = __LINE__ + 1;
    expect_report(
        [&] { before_start_kernel<<<2, 32>>>(d); }, line,
        {"kernel before_start_kernel, block (0,0,0), thread (3,0,0)", "before the start of a device allocation"});
}

__global__ void scale_kernel(float* out, const float* in) { out[threadIdx.x] = 2.0f * in[threadIdx.x]; }
__global__ void shared_unwritten_kernel(float* out) {
    __shared__ float s[32];
    if (threadIdx.x != 7) s[threadIdx.x] = 1;
    __syncthreads();
    out[threadIdx.x] = s[(threadIdx.x + 1) % 32] + 1.0f;  // thread 6 reads s[7], which nobody wrote
}
TEST_CASE("cuda_cpu check: a read of device or shared memory that nothing wrote") {
    float* in = dev<float>(32);  // never written
    float* out = dev<float>(32);
    int line = __LINE__ + 1;
    expect_report([&] { scale_kernel<<<1, 32>>>(out, in); }, line,
                  {"kernel scale_kernel, block (0,0,0), thread (0,0,0)", "memory that nothing wrote"});
    line = __LINE__ + 1;
    expect_report([&] { shared_unwritten_kernel<<<1, 32>>>(out); }, line,
                  {"kernel shared_unwritten_kernel, block (0,0,0), thread (6,0,0)", "memory that nothing wrote"});
    line = __LINE__ + 1;
    expect_report(
        [&] {
            std::vector<float> h(32);
            cudaMemcpy(h.data(), in, 128, cudaMemcpyDeviceToHost);
        },
        line, {"cudaMemcpyDeviceToHost reads device memory that nothing wrote (byte 0"});
}

__global__ void racy_kernel(float* out) {
    __shared__ float s[64];
    s[threadIdx.x] = threadIdx.x;
    out[threadIdx.x] = s[(threadIdx.x + 1) % 64];  // no __syncthreads(): reads what another thread writes
}
__global__ void racy_write_kernel(float* out) {
    __shared__ float total[1];
    if (threadIdx.x < 2) total[0] = threadIdx.x;  // two writers of one element
    __syncthreads();
    out[threadIdx.x] = total[0];
}
TEST_CASE("cuda_cpu check: a shared-memory data race") {
    float* d = dev<float>(64);
    int line = __LINE__ + 1;
    expect_report([&] { racy_kernel<<<1, 64>>>(d); }, line,
                  {"kernel racy_kernel, block (0,0,0), thread (1,0,0)", "data race on __shared__ s (byte 4 of 256)",
                   "thread (0,0,0) reads it and this thread writes it", "since the start of the block"});
    line = __LINE__ + 1;
    expect_report([&] { racy_write_kernel<<<1, 32>>>(d); }, line,
                  {"kernel racy_write_kernel, block (0,0,0), thread (1,0,0)", "data race on __shared__ total",
                   "thread (0,0,0) writes it and this thread writes it"});
}

__global__ void no_syncwarp_kernel(float* out) {
    __shared__ float s[32];
    if (threadIdx.x == 0)
        for (int i = 0; i < 32; i++) s[i] = i;
    out[threadIdx.x] = s[threadIdx.x];  // no __syncwarp(): lane 1 reads what lane 0 wrote
}
TEST_CASE("cuda_cpu check: a shared-memory race inside a warp (a __syncwarp() missing)") {
    float* d = dev<float>(32);
    const int line = __LINE__ + 1;
    expect_report([&] { no_syncwarp_kernel<<<1, 32>>>(d); }, line,
                  {"kernel no_syncwarp_kernel, block (0,0,0), thread (1,0,0)",
                   "data race on __shared__ s (byte 4 of 128)", "thread (0,0,0) writes it and this thread reads it"});
}

__global__ void wmma_lane_layout_kernel(float* out) {
    using namespace nvcuda;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    wmma::fill_fragment(c, 1.0f);
    c.x[0] = (float)threadIdx.x;  // per-lane code: depends on the layout the API hides
    wmma::store_matrix_sync(out, c, 16, wmma::mem_row_major);
}
__global__ void wmma_misaligned_kernel(float* out, const __nv_bfloat16* a_src) {
    using namespace nvcuda;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
    wmma::load_matrix_sync(a, a_src + 8, 16);  // 16 bytes past a 32-byte boundary
    out[threadIdx.x] = __bfloat162float(a.x[0]);
}
TEST_CASE("cuda_cpu check: WMMA code that relies on the fragment layout, misaligned tiles, partial warps") {
    float* d = dev<float>(256);
    std::vector<__nv_bfloat16> h(512, __float2bfloat16(1.0f));
    __nv_bfloat16* a = put(h);
    int line = __LINE__ + 1;
    expect_report([&] { wmma_lane_layout_kernel<<<1, 32>>>(d); }, line,
                  {"kernel wmma_lane_layout_kernel, block (0,0,0), thread (1,0,0)", "differs from lane 0's"});
    line = __LINE__ + 1;
    expect_report([&] { wmma_misaligned_kernel<<<1, 32>>>(d, a); }, line,
                  {"kernel wmma_misaligned_kernel, block (0,0,0), thread (0,0,0)", "must be 32-byte aligned"});
    line = __LINE__ + 1;
    expect_report([&] { wmma_lane_layout_kernel<<<1, 16>>>(d); }, line, {"WMMA needs whole warps"});
}

TEST_CASE("cuda_cpu check: a host pointer passed to a kernel") {
    std::vector<float> host(32);
    const int line = __LINE__ + 1;
    expect_report([&] { plain_kernel<<<1, 32>>>(host.data()); }, line,
                  {"kernel plain_kernel: argument 1", "is a host pointer"});
}

TEST_CASE("cuda_cpu check: a copy in the wrong direction or past an allocation") {
    float* d = dev<float>(16);
    std::vector<float> h(32, 1.0f);
    int line = __LINE__ + 1;
    expect_report([&] { cudaMemcpy(d, h.data(), 64, cudaMemcpyDeviceToHost); }, line,
                  {"cudaMemcpyDeviceToHost: the destination", "is device memory (wrong direction?)"});
    line = __LINE__ + 1;
    expect_report(
        [&] { cudaMemcpy(d, h.data(), 68, cudaMemcpyHostToDevice); }, line,
        {"cudaMemcpyHostToDevice: 68 bytes at offset 0 of a 64-byte device allocation run 4 bytes past its end"});
    line = __LINE__ + 1;
    expect_report([&] { cudaMemset(d + 8, 0, 40); }, line,
                  {"cudaMemset: 40 bytes at offset 32", "run 8 bytes past its end"});
    line = __LINE__ + 1;
    expect_report([&] { cudaFree(h.data()); }, line, {"cudaFree", "not a pointer that cudaMalloc returned"});
}

// ============================================================================================
// 3-4. The GPU trainer through the layer against the CPU trainer; data parallel over MPI
// ============================================================================================
// the training shard: documents mixing the three modalities, as the dataset does
static std::string shard() {
    static const std::string path = write_shard("train_0.bin", 7);
    return path;
}
static const char* kModel = " --layers 2 --dim 32 --heads 2 --seq 32 --batch 4 --lr 3e-3 --warmup 2 --threads 1";
// the "loss X.XXXX" of every printed step line
static std::vector<std::string> printed_losses(const std::string& out) {
    std::vector<std::string> v;
    size_t at = 0;
    while ((at = out.find("\nstep ", at)) != std::string::npos) {
        const size_t l = out.find("| loss ", at);
        if (l == std::string::npos) break;
        v.push_back(out.substr(l + 7, out.find(' ', l + 7) - (l + 7)));
        at = l;
    }
    return v;
}
// log.csv rows without the timing column (tokens/s, the 8th)
static std::vector<std::string> log_rows(const std::string& csv) {
    std::vector<std::string> rows;
    size_t a = 0;
    while (a < csv.size()) {
        size_t e = csv.find('\n', a);
        if (e == std::string::npos) e = csv.size();
        std::string row = csv.substr(a, e - a), kept;
        a = e + 1;
        if (row.empty() || !isdigit((unsigned char)row[0])) continue;  // the header
        int col = 0;
        size_t s = 0;
        while (s <= row.size()) {
            size_t c = row.find(',', s);
            if (c == std::string::npos) c = row.size();
            if (++col != 8) kept += row.substr(s, c - s) + ",";
            s = c + 1;
        }
        rows.push_back(kept);
    }
    return rows;
}

TEST_CASE("cuda_cpu trainer: the GPU path gives the CPU trainer's losses (fp32), with and without --accum") {
    for (const char* extra : {" --steps 8", " --steps 6 --accum 2"}) {
        INFO("flags:", extra);
        std::string cpu, gpu;
        const std::string base = std::string(" --data ") + shard() + kModel + extra;
        REQUIRE(run("./mot --cpu" + base, &cpu) == 0);
        REQUIRE(run("./mot_cpu_cuda --fp32" + base, &gpu) == 0);
        CHECK(gpu.find("device: the GPU code on the CPU") != std::string::npos);
        const std::vector<std::string> lc = printed_losses(cpu), lg = printed_losses(gpu);
        INFO("cpu:\n", cpu, "\ngpu:\n", gpu);
        CHECK(lc.size() >= 6);
        CHECK(lc == lg);
    }
}

// the lines that start with `prefix` (e.g. "val "), and the "| aux A agree G" of every step line
static std::vector<std::string> lines_with(const std::string& out, const std::string& prefix) {
    std::vector<std::string> v;
    size_t a = 0;
    while (a < out.size()) {
        size_t e = out.find('\n', a);
        if (e == std::string::npos) e = out.size();
        const std::string line = out.substr(a, e - a);
        a = e + 1;
        if (line.compare(0, prefix.size(), prefix) == 0) v.push_back(line);
        const size_t x = line.find("| aux ");
        if (x != std::string::npos && line.compare(0, 5, "step ") == 0)
            v.push_back(line.substr(x, line.find(" | lr") - x));
    }
    return v;
}

// Experts on the GPU path (dev/MATH.md, section 5): MoE-4x and MoMa-style train with the CPU trainer's
// printed losses, aux losses and agreement, and validation with expert choice and causal routing.
TEST_CASE("cuda_cpu trainer: experts train on the GPU path with the CPU trainer's losses (fp32)") {
    for (const char* experts : {" --dense --experts 4", " --tie-attn --experts 4,4,4"}) {
        INFO("flags:", experts);
        std::string cpu, gpu;
        const std::string base = std::string(" --data ") + shard() + " --val " + shard() + kModel + experts +
                                 " --steps 6 --eval-every 3 --eval-batches 2";
        REQUIRE(run("./mot --cpu" + base, &cpu) == 0);
        REQUIRE(run("./mot_cpu_cuda --fp32" + base, &gpu) == 0);
        INFO("cpu:\n", cpu, "\ngpu:\n", gpu);
        CHECK(gpu.find("device: the GPU code on the CPU") != std::string::npos);
        const std::vector<std::string> lc = printed_losses(cpu), lg = printed_losses(gpu);
        CHECK(lc.size() >= 6);
        CHECK(lc == lg);
        const std::vector<std::string> vc = lines_with(cpu, "val "), vg = lines_with(gpu, "val ");
        CHECK(vc.size() >= 10);  // 6 aux parts, 2 evaluations x (EC, causal)
        CHECK(vc == vg);
    }
}

// A shard of the Transfusion form (tokens and pixels, test/common.h's documents: captions with
// 49-patch images before and after them, and speech)
static std::string tf_shard() {
    static const std::string path = [] {
        int ni;
        const std::vector<uint16_t> t = tf_tokens(300, 5, &ni);
        const std::vector<uint8_t> px = tf_pixels(ni);
        std::string err;
        REQUIRE_MESSAGE(mot_write_shard(tmp("tf_0.bin"), VOC, t.data(), t.size(), &err, px.data()), err);
        return tmp("tf_0.bin");
    }();
    return path;
}
// The numbers of every "step" and "val" line between "| loss " and " | lr" (the loss, then text,
// image and speech), each with the number of decimals it was printed with
static std::vector<std::pair<double, int>> printed_numbers(const std::string& out) {
    std::vector<std::pair<double, int>> v;
    size_t a = 0;
    while (a < out.size()) {
        size_t e = out.find('\n', a);
        if (e == std::string::npos) e = out.size();
        std::string line = out.substr(a, e - a);
        a = e + 1;
        if (line.compare(0, 5, "step ") != 0 && line.compare(0, 4, "val ") != 0) continue;
        const size_t l = line.find("| loss ");
        if (l == std::string::npos) continue;
        line = line.substr(l + 7,
                           line.find(" | lr") == std::string::npos ? std::string::npos : line.find(" | lr") - l - 7);
        for (size_t s = 0; s < line.size();) {
            const size_t t = line.find(' ', s);
            const std::string w = line.substr(s, t == std::string::npos ? std::string::npos : t - s);
            s = t == std::string::npos ? line.size() : t + 1;
            if (w.empty() || !(isdigit((unsigned char)w[0]) || w[0] == '-') || w == "-" ||
                w.find('.') == std::string::npos)
                continue;
            v.push_back({atof(w.c_str()), (int)(w.size() - w.find('.') - 1)});
        }
    }
    return v;
}

// The Transfusion setting on the GPU path (patch input, timestep embedding, predicted noise, the
// diffusion loss, image-block attention), MoT and dense, from the same seed as the CPU trainer:
// every printed step and validation figure (loss = LM + 5 MSE, text CE, image MSE, speech CE)
// within one unit of its last printed digit in fp32 (the two sides differ by float rounding,
// ~1e-6, which can move a printed figure across a rounding boundary), and within 3% in bf16.
TEST_CASE("cuda_cpu trainer: Transfusion trains on the GPU path with the CPU trainer's losses") {
    for (const char* arch : {" --mot", " --dense"}) {
        INFO("flags:", arch);
        std::string cpu, gpu, bf;
        const std::string base = " --setting transfusion --data " + tf_shard() + " --val " + tf_shard() + arch +
                                 " --layers 2 --dim 32 --heads 2 --seq 64 --batch 4 --lr 3e-3 --warmup 2 --threads 1"
                                 " --steps 6 --eval-every 3 --eval-batches 2";
        REQUIRE(run("./mot --cpu" + base, &cpu) == 0);
        REQUIRE(run("./mot_cpu_cuda --fp32" + base, &gpu) == 0);
        REQUIRE(run("./mot_cpu_cuda" + base, &bf) == 0);
        INFO("cpu:\n", cpu, "\ngpu fp32:\n", gpu, "\ngpu bf16:\n", bf);
        CHECK(gpu.find("device: the GPU code on the CPU") != std::string::npos);
        CHECK(gpu.find("Transfusion (images by diffusion)") != std::string::npos);
        const auto nc = printed_numbers(cpu), ng = printed_numbers(gpu), nb = printed_numbers(bf);
        CHECK(nc.size() == 8u * 4);  // 6 steps and 2 validations, 4 figures each
        REQUIRE(ng.size() == nc.size());
        REQUIRE(nb.size() == nc.size());
        double worst = 0, worst_bf = 0;
        for (size_t i = 0; i < nc.size(); i++) {
            INFO("figure ", i, ": cpu ", nc[i].first, " gpu fp32 ", ng[i].first, " gpu bf16 ", nb[i].first);
            CHECK(ng[i].second == nc[i].second);
            CHECK(std::fabs(ng[i].first - nc[i].first) <= 1.01 * std::pow(10.0, -nc[i].second));
            CHECK(std::fabs(nb[i].first - nc[i].first) <=
                  3e-2 * std::fabs(nc[i].first) + std::pow(10.0, -nc[i].second));
            worst = std::max(worst, std::fabs(ng[i].first - nc[i].first));
            worst_bf =
                std::max(worst_bf, std::fabs(nb[i].first - nc[i].first) / std::max(1e-9, std::fabs(nc[i].first)));
        }
        printf("Transfusion%s: %zu printed figures; fp32 GPU path worst |diff| %.1e, bf16 worst rel diff %.2e\n", arch,
               nc.size(), worst, worst_bf);
    }
}

// The attention kernel is named once at startup, by the rule in mot_attn_tensor_cores.
TEST_CASE("cuda_cpu trainer: says once which attention kernel runs, and why") {
    struct Case {
        const char* flags;
        const char* says;
    };
    const Case cases[] = {
        {" --dim 128 --heads 2", "attention: bf16 tensor-core flash kernels (WMMA, fp32 accumulation), head dim 64\n"},
        {" --dim 32 --heads 2",
         "attention: fp32 CUDA-core kernels (head dim 16 has no tensor-core kernel; 64 and 128 do)\n"},
        {" --dim 128 --heads 2 --fp32",
         "attention: fp32 CUDA-core kernels (fp32 mode keeps them as the exact reference)\n"},
    };
    for (const Case& c : cases) {
        std::string out;
        REQUIRE(run(std::string("./mot_cpu_cuda --data ") + shard() +
                        " --layers 1 --seq 16 --batch 2 --steps 1 --threads 1" + c.flags,
                    &out) == 0);
        INFO(c.flags, "\n", out);
        const size_t at = out.find(c.says);
        CHECK(at != std::string::npos);
        CHECK(out.find("attention: ", at + 1) == std::string::npos);
    }
}

TEST_CASE("cuda_cpu trainer: resume on the GPU path reproduces an uninterrupted run bitwise") {
    const std::string base = std::string("./mot_cpu_cuda --data ") + shard() + kModel + " --steps 8";
    std::string out;
    run("rm -rf " + tmp("full") + " " + tmp("resumed"), &out);
    REQUIRE(run(base + " --out " + tmp("full") + " --save-every 4", &out) == 0);
    REQUIRE(run("mkdir " + tmp("resumed") + " && cp " + tmp("full") + "/step_000004.ckpt " + tmp("resumed") + "/",
                &out) == 0);
    REQUIRE(run(base + " --out " + tmp("resumed") + " --resume", &out) == 0);
    INFO(out);
    const std::vector<std::string> full = log_rows(read_bytes(tmp("full") + "/log.csv"));
    const std::vector<std::string> resumed = log_rows(read_bytes(tmp("resumed") + "/log.csv"));
    REQUIRE(full.size() == 8);
    REQUIRE(resumed.size() >= 4);
    CHECK(std::vector<std::string>(full.end() - 4, full.end()) ==
          std::vector<std::string>(resumed.end() - 4, resumed.end()));
    CHECK(run("cmp " + tmp("full") + "/model.ckpt " + tmp("resumed") + "/model.ckpt", &out) == 0);
}

TEST_CASE("cuda_cpu trainer: mpirun -np 2 (NCCL over MPI) equals one process with --accum 2, bitwise") {
    const std::string mpirun =
        "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 "
        "mpirun --oversubscribe --mca btl self,vader --mca btl_vader_single_copy_mechanism none -np 2 ";
    const std::string args = std::string(" --fp32 --data ") + shard() + kModel + " --steps 6";
    std::string one, two;
    run("rm -rf " + tmp("dp1") + " " + tmp("dp2"), &one);
    REQUIRE(run("./mot_cpu_cuda" + args + " --accum 2 --out " + tmp("dp1"), &one) == 0);
    const int rc = run(mpirun + "./mot_cpu_cuda_mpi" + args + " --out " + tmp("dp2"), &two);
    INFO("one process:\n", one, "\nmpirun -np 2:\n", two);
    REQUIRE(rc == 0);
    CHECK(two.find("x 2,") != std::string::npos);  // "device: ... x 2, fp32"
    CHECK(printed_losses(one) == printed_losses(two));
    CHECK(log_rows(read_bytes(tmp("dp1") + "/log.csv")) == log_rows(read_bytes(tmp("dp2") + "/log.csv")));
    std::string out;
    CHECK(run("cmp " + tmp("dp1") + "/model.ckpt " + tmp("dp2") + "/model.ckpt", &out) == 0);
}
