// bench_gemm.cpp -- correctness and speed of the CPU reference's matmul (mot.h).
// Build: make dev/bench_gemm
// Usage: ./dev/bench_gemm [reps] [bf16]   (reps = timed repetitions per shape, default 15;
//        bf16: only the bf16 section, each engine's peak and GEMM)
//
// Correctness: every layout (NN, NT, TN, TT) x accumulate on/off x float/double x sizes with odd
// values and zeros, leading dimensions padded (odd, so rows are unaligned), against a naive triple
// loop in double. Error bound per element (the standard dot-product bound, with a 2x margin):
//   |C - ref| <= (K + 2) * eps_T * (sum_k |op(A)_ik| |op(B)_kj| + |C0_ij|)
// where eps_T is the machine epsilon of T. When !accumulate, C starts as NaN and must be overwritten.
#include "mot.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

static std::mt19937_64 rng(12345);

template <typename T>
static void fill(std::vector<T>& v) {
    std::uniform_real_distribution<double> d(-1.0, 1.0);
    for (auto& x : v) x = T(d(rng));
}

// One checked call; returns max(err / bound) over the elements (must be <= 1).
template <typename T>
static double check(int M, int N, int K, bool tA, bool tB, bool acc, bool nested = false) {
    const int ar = tA ? K : M, ac = tA ? M : K, br = tB ? N : K, bc = tB ? K : N;
    const int lda = ac + 3, ldb = bc + 5, ldc = N + 7;
    std::vector<T> A((size_t)std::max(ar, 1) * lda), B((size_t)std::max(br, 1) * ldb), C((size_t)std::max(M, 1) * ldc);
    fill(A), fill(B), fill(C);
    if (!acc) std::fill(C.begin(), C.end(), std::numeric_limits<T>::quiet_NaN());
    const std::vector<T> C0 = C;
    if (nested) {
#pragma omp parallel num_threads(2)
        {  // each thread does the same product into its own copy; only thread 0's is checked
            std::vector<T> Cl = C0;
            matmul(Cl.data(), ldc, A.data(), lda, tA, B.data(), ldb, tB, M, N, K, acc);
            if (omp_get_thread_num() == 0) C = Cl;
        }
    } else {
        matmul(C.data(), ldc, A.data(), lda, tA, B.data(), ldb, tB, M, N, K, acc);
    }
    const double eps = std::numeric_limits<T>::epsilon();
    double worst = 0;
    for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j) {
            double s = 0, sa = 0;
            for (int k = 0; k < K; ++k) {
                const double a = tA ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k];
                const double b = tB ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j];
                s += a * b, sa += std::fabs(a * b);
            }
            const double c0 = acc ? (double)C0[(size_t)i * ldc + j] : 0.0;
            const double got = C[(size_t)i * ldc + j], ref = c0 + s;
            const double bound = (K + 2) * eps * (sa + std::fabs(c0)) + 1e-300;
            const double r = std::fabs(got - ref) / bound;
            if (!(r <= 1.0)) return std::isnan(r) ? INFINITY : r;
            worst = std::max(worst, r);
        }
    // padding columns of C beyond N must be untouched
    for (int i = 0; i < M; ++i)
        for (int j = N; j < ldc; ++j)
            if (std::memcmp(&C[(size_t)i * ldc + j], &C0[(size_t)i * ldc + j], sizeof(T))) return INFINITY;
    return worst;
}

template <typename T>
static int check_all(const char* name) {
    struct S {
        int m, n, k;
    };
    std::vector<S> shapes;
    const int small[] = {0, 1, 7, 33, 129};
    for (int m : small)
        for (int n : small)
            for (int k : small) shapes.push_back({m, n, k});
    // larger: several MC row blocks, several KC slices, N beyond NC (4096), splits of 1024 rows
    shapes.insert(shapes.end(), {{1000, 257, 300},
                                 {300, 1000, 513},
                                 {13, 4099, 17},
                                 {250, 37, 1000},
                                 {481, 65, 259},
                                 {400, 768, 256},
                                 {274, 256, 768},
                                 {256, 768, 350}});
    int fails = 0;
    double worst = 0;
    long n = 0;
    for (const S& s : shapes)
        for (int lay = 0; lay < 4; ++lay)
            for (int acc = 0; acc < 2; ++acc) {
                const bool tA = lay & 2, tB = lay & 1;
                for (int nested = 0; nested < (s.m * s.n * (long)s.k > 1000000 ? 1 : 2); ++nested) {
                    const double r = check<T>(s.m, s.n, s.k, tA, tB, acc, nested);
                    ++n;
                    worst = std::max(worst, r);
                    if (!(r <= 1.0)) {
                        ++fails;
                        std::printf("FAIL %s M=%d N=%d K=%d %c%c acc=%d nested=%d err/bound=%g\n", name, s.m, s.n, s.k,
                                    tA ? 'T' : 'N', tB ? 'T' : 'N', acc, nested, r);
                    }
                }
            }
    std::printf("%s: %ld checks, %d failures, worst err/bound = %.3g\n", name, n, fails, worst);
    return fails;
}

// Times one call shape; prints best and median GFLOP/s over reps timed calls.
template <typename T>
static void bench(const std::string& label, int M, int N, int K, bool tA, bool tB, bool acc, int reps) {
    const int lda = tA ? M : K, ldb = tB ? K : N, ldc = N;
    std::vector<T> A((size_t)(tA ? K : M) * lda), B((size_t)(tB ? N : K) * ldb), C((size_t)M * ldc);
    fill(A), fill(B), fill(C);
    for (int w = 0; w < 2; ++w)  // warm-up: page faults, thread pool, packing buffers
        matmul(C.data(), ldc, A.data(), lda, tA, B.data(), ldb, tB, M, N, K, acc);
    std::vector<double> g;
    for (int r = 0; r < reps; ++r) {
        auto t0 = std::chrono::steady_clock::now();
        matmul(C.data(), ldc, A.data(), lda, tA, B.data(), ldb, tB, M, N, K, acc);
        double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        g.push_back(2.0 * M * N * K / s * 1e-9);
    }
    std::sort(g.begin(), g.end());
    std::printf("  %-34s M=%5d N=%5d K=%5d  best %6.1f  median %6.1f GFLOP/s\n", label.c_str(), M, N, K, g.back(),
                g[g.size() / 2]);
}

// ---- bf16 (matmul_bf16, mot.h section 7): each engine's register-resident peak, then its GEMM ----
#ifdef MOT_BF16_X86
// One core's peak of each instruction, the operands never leaving registers (or tiles): FLOP/s.
// Reads the accumulators after a timed loop, so the compiler cannot drop the loop as unused.
__attribute__((target("avx512f"))) static void keep(const __m512* acc, int n) {
    float sink = 0;
    alignas(64) float lane[16];
    for (int i = 0; i < n; i++) {
        _mm512_store_ps(lane, acc[i]);
        sink += lane[0];
    }
    if (sink == 12345) std::printf(" ");
}
__attribute__((target("avx512f"))) static double peak_fp32_fma(long iters) {
    __m512 acc[24], x = _mm512_set1_ps(1.0f), y = _mm512_set1_ps(1e-9f);
    for (auto& a : acc) a = _mm512_setzero_ps();
    auto t0 = std::chrono::steady_clock::now();
    for (long i = 0; i < iters; i++)
#pragma GCC unroll 24
        for (int j = 0; j < 24; j++) acc[j] = _mm512_fmadd_ps(x, y, acc[j]);  // unrolled: acc stays in registers
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    keep(acc, 24);
    return iters * 24.0 * 16 * 2 / s;
}
__attribute__((target("avx512f,avx512bf16"))) static double peak_avx512_bf16(long iters) {
    __m512 acc[24];
    const __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80), y = (__m512bh)_mm512_set1_epi32(0x30003000);
    for (auto& a : acc) a = _mm512_setzero_ps();
    auto t0 = std::chrono::steady_clock::now();
    for (long i = 0; i < iters; i++)
#pragma GCC unroll 24
        for (int j = 0; j < 24; j++) acc[j] = _mm512_dpbf16_ps(acc[j], x, y);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    keep(acc, 24);
    return iters * 24.0 * 32 * 2 / s;
}
__attribute__((target("amx-tile,amx-bf16"))) static double peak_amx(long iters) {
    static const bf16_detail::TileConfig cfg;
    _tile_loadconfig(&cfg);
    alignas(64) static uint16_t ones[16 * 32];
    for (auto& v : ones) v = 0x3f80;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, ones, 64);
    _tile_loadd(5, ones, 64);
    _tile_loadd(6, ones, 64);
    _tile_loadd(7, ones, 64);
    auto t0 = std::chrono::steady_clock::now();
    for (long i = 0; i < iters; i++) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    alignas(64) float out[16 * 16];
    _tile_stored(0, out, 64);
    _tile_release();
    if (out[0] == 12345) std::printf(" ");
    return iters * 4.0 * 16 * 16 * 32 * 2 / s;
}
#endif

static double bench_bf16(int M, int N, int K, bool tA, bool tB, bool acc, int reps) {
    const int lda = tA ? M : K, ldb = tB ? K : N, ldc = N;
    std::vector<uint16_t> A((size_t)(tA ? K : M) * lda), B((size_t)(tB ? N : K) * ldb);
    std::vector<float> C((size_t)M * ldc, 0.0f);
    std::uniform_real_distribution<double> d(-1.0, 1.0);
    for (auto& x : A) x = mot_bf16_round(float(d(rng)));
    for (auto& x : B) x = mot_bf16_round(float(d(rng)));
    for (int w = 0; w < 2; ++w) matmul_bf16(C.data(), ldc, A.data(), lda, tA, B.data(), ldb, tB, M, N, K, acc);
    double best = 0;
    for (int r = 0; r < reps; ++r) {
        auto t0 = std::chrono::steady_clock::now();
        matmul_bf16(C.data(), ldc, A.data(), lda, tA, B.data(), ldb, tB, M, N, K, acc);
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        best = std::max(best, 2.0 * M * N * K / s * 1e-9);
    }
    return best;
}

static void bf16_section(int reps) {
    std::printf("bf16 (matmul_bf16), %d threads, best of %d; peaks are one core's, register-resident:\n",
                omp_get_max_threads(), reps);
    double peak[MOT_BF16_ENGINES] = {0, 0, 0};
#ifdef MOT_BF16_X86
    if (__builtin_cpu_supports("avx512f"))
        std::printf("  peak fp32 FMA (AVX-512):  %7.1f GFLOP/s\n", peak_fp32_fma(20000000) * 1e-9);
    if (mot_bf16_usable(MOT_BF16_AVX512)) {
        peak[MOT_BF16_AVX512] = peak_avx512_bf16(20000000) * 1e-9;
        std::printf("  peak vdpbf16ps:           %7.1f GFLOP/s\n", peak[MOT_BF16_AVX512]);
    }
    if (mot_bf16_usable(MOT_BF16_AMX)) {
        peak[MOT_BF16_AMX] = peak_amx(2000000) * 1e-9;
        std::printf("  peak tdpbf16ps (AMX):     %7.1f GFLOP/s\n", peak[MOT_BF16_AMX]);
    }
#endif
    struct Shape {
        const char* what;
        int m, n, k;
        bool ta, tb, acc;
    };
    const Shape shapes[] = {{"square 1024^3        (NN)", 1024, 1024, 1024, false, false, false},
                            {"fwd  Y=X*W  256->768 (NN)", 1024, 768, 256, false, false, false},
                            {"fwd  Y=X*W  768->256 (NN)", 1024, 256, 768, false, false, false},
                            {"bwd dX+=dY*W^T 768   (NT)", 1024, 256, 768, false, true, true},
                            {"bwd dW+=X^T*dY       (TN)", 256, 768, 1024, true, false, true},
                            {"head 256->4096       (NN)", 1024, 4096, 256, false, false, false}};
    const int saved = mot_bf16_engine();
    for (int e = 0; e < MOT_BF16_ENGINES; e++) {
        if (!mot_bf16_set_engine(e)) {
            std::printf("  %s: not on this machine\n", MOT_BF16_ENGINE_NAME[e]);
            continue;
        }
        for (const Shape& s : shapes) {
            if (e == MOT_BF16_PLAIN && s.m * (long)s.n * s.k > 300000000L)
                continue;  // minutes at the plain loop's speed
            const double g = bench_bf16(s.m, s.n, s.k, s.ta, s.tb, s.acc, e == MOT_BF16_PLAIN ? 2 : reps);
            if (peak[e] > 0)
                std::printf("  %-12s %s M=%5d N=%5d K=%5d %8.1f GFLOP/s, %3.0f%% of %d x the core's peak\n",
                            MOT_BF16_ENGINE_NAME[e], s.what, s.m, s.n, s.k, g,
                            100 * g / (peak[e] * omp_get_max_threads()), omp_get_max_threads());
            else
                std::printf("  %-12s %s M=%5d N=%5d K=%5d %8.1f GFLOP/s\n", MOT_BF16_ENGINE_NAME[e], s.what, s.m, s.n,
                            s.k, g);
        }
    }
    mot_bf16_set_engine(saved);
}

int main(int argc, char** argv) {
    const int reps = argc > 1 ? std::atoi(argv[1]) : 15;
    if (argc > 2 && std::string(argv[2]) == "bf16") {  // ./dev/bench_gemm REPS bf16: the bf16 section alone
        bf16_section(reps);
        return 0;
    }
    int fails = check_all<float>("float") + check_all<double>("double");
    if (fails) {
        std::printf("CORRECTNESS FAILED (%d)\n", fails);
        return 1;
    }

    std::printf("fp32, %d threads, %d reps per shape (best / median):\n", omp_get_max_threads(), reps);
    const int dims[4][2] = {{256, 256}, {256, 768}, {768, 256}, {256, 4096}};
    const int rows[4] = {1024, 400, 350, 274};
    for (auto& d : dims) {
        const int in = d[0], out = d[1];
        std::printf(" (in,out) = (%d,%d)\n", in, out);
        for (int r : rows) {
            const std::string n = " rows=" + std::to_string(r);
            bench<float>("fwd  Y=X*W      (NN)" + n, r, out, in, false, false, false, reps);
            bench<float>("bwd dX+=dY*W^T  (NT)" + n, r, in, out, false, true, true, reps);
            bench<float>("bwd dW+=X^T*dY  (TN)" + n, in, out, r, true, false, true, reps);
        }
    }
    std::printf("fp64:\n");
    bench<double>("fwd  Y=X*W      (NN) rows=1024", 1024, 768, 256, false, false, false, reps);
    bench<double>("bwd dW+=X^T*dY  (TN) rows=1024", 256, 768, 1024, true, false, true, reps);
    bf16_section(reps);
    return 0;
}
