// bench_gemm.cpp -- correctness and speed of the CPU reference's matmul (mot.h).
// Build: make dev/bench_gemm
// Usage: ./dev/bench_gemm [reps]   (reps = timed repetitions per shape, default 15)
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

int main(int argc, char** argv) {
    const int reps = argc > 1 ? std::atoi(argv[1]) : 15;
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
    return 0;
}
