// test_mot.cpp — the model's math: gradients against finite differences, causality, MoT vs
// dense equivalence, tower isolation, AdamW and the schedule, and overfitting one batch.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
#include <array>

#include "mot.h"
#include "test/common.h"

// A tiny config whose vocabulary has all three modalities: text [0,12), image [12,18), speech [18,24).
static MotConfig tiny(int towers, int tie_attn = 0, int tie_ffn = 0, int tie_norm = 0) {
    MotConfig c;
    c.n_layer = 2;
    c.d_model = 8;
    c.n_head = 2;
    c.d_ff = 12;
    c.vocab = 24;
    c.image_begin = 12;
    c.speech_begin = 18;
    c.max_seq = 10;
    c.n_tower = towers;
    c.tie_attn = tie_attn;
    c.tie_ffn = tie_ffn;
    c.tie_norm = tie_norm;
    return c;
}

// For every tensor of every layer and tower: ||fd - analytic|| / ||analytic|| <= 1e-6 (central
// differences, step 1e-5, double precision: this lands near 1e-9).
static void gradient_check(const MotConfig& c) {
    omp_set_num_threads(1);  // thousands of tiny forward passes: threads only add overhead
    MotModel<double> m;
    mot_init(&m, c, 7);
    randomize(&m, 11);
    MotBatch b = random_batch(c, 2, 9, 3);
    REQUIRE(b.group[1] > b.group[0]);  // every modality present
    REQUIRE(b.group[2] > b.group[1]);
    REQUIRE(b.group[3] > b.group[2]);
    mot_forward(&m, b);
    mot_zero_grad(&m);
    mot_backward(&m, b);
    const double h = 1e-5;
    for (int p = 0; p < P_COUNT; p++) {
        const MotParamInfo& info = m.tab.p[p];
        for (int l = 0; l < info.layers; l++)
            for (int k = 0; k < info.copies; k++) {
                double num = 0, den = 0;
                for (size_t i = 0; i < info.each(); i++) {
                    const size_t idx = info.at(l, k) + i;
                    const double w = m.params[idx];
                    m.params[idx] = w + h;
                    const double lp = mot_forward(&m, b);
                    m.params[idx] = w - h;
                    const double lm = mot_forward(&m, b);
                    m.params[idx] = w;
                    const double fd = (lp - lm) / (2 * h), an = m.grads[idx];
                    num += (fd - an) * (fd - an);
                    den += an * an;
                }
                INFO(info.name, " layer ", l, " copy ", k);
                REQUIRE(den > 0);
                CHECK(std::sqrt(num / den) <= 1e-6);
            }
    }
    omp_set_num_threads(omp_get_num_procs());
}

TEST_CASE("gradient check: MoT") { gradient_check(tiny(3)); }
TEST_CASE("gradient check: dense") { gradient_check(tiny(1)); }
TEST_CASE("gradient check: MoT, attention tied") { gradient_check(tiny(3, 1, 0, 0)); }
TEST_CASE("gradient check: MoT, FFN tied") { gradient_check(tiny(3, 0, 1, 0)); }
TEST_CASE("gradient check: MoT, norms tied") { gradient_check(tiny(3, 0, 0, 1)); }

TEST_CASE("matmul: all four layouts, accumulate or not, against a plain triple loop") {
    // sizes around the blocking: edges of the 12 x 32 micro-tile, K over one 256-deep slice and
    // not a multiple of the 16-deep transposed packing, M over one 240-row block; N = 32, 64 with B
    // untransposed is read in place (M <= 480), the other N packed; B transposed is read in place
    // with the product turned round for M <= 192, packed for M = 250
    uint64_t rng = 3;
    for (int M : {1, 13, 20, 250})
        for (int N : {5, 32, 64, 70})
            for (int K : {7, 48, 300})
                for (int ta = 0; ta < 2; ta++)
                    for (int tb = 0; tb < 2; tb++)
                        for (int acc = 0; acc < 2; acc++) {
                            std::vector<float> A((size_t)M * K), B((size_t)K * N), C((size_t)M * N);
                            for (float& v : A) v = float(mot_rand_normal(&rng));
                            for (float& v : B) v = float(mot_rand_normal(&rng));
                            for (float& v : C) v = float(mot_rand_normal(&rng));
                            const std::vector<float> C0 = C;
                            matmul(C.data(), N, A.data(), ta ? M : K, ta, B.data(), tb ? K : N, tb, M, N, K, acc);
                            double worst = 0;
                            for (int i = 0; i < M; i++)
                                for (int j = 0; j < N; j++) {
                                    double r = acc ? C0[(size_t)i * N + j] : 0, mag = std::fabs(r);
                                    for (int k = 0; k < K; k++) {
                                        const double t = double(ta ? A[(size_t)k * M + i] : A[(size_t)i * K + k]) *
                                                         double(tb ? B[(size_t)j * K + k] : B[(size_t)k * N + j]);
                                        r += t;
                                        mag += std::fabs(t);
                                    }
                                    worst = std::max(worst, std::fabs(C[(size_t)i * N + j] - r) / mag);
                                }
                            INFO(M, "x", N, "x", K, " transA ", ta, " transB ", tb, " accumulate ", acc);
                            CHECK(worst < 1e-6);  // fp32 rounding of a sum of K products, relative to its magnitudes
                        }
    // B read in place (85 rows) and packed (600 rows): the same rows come out bit for bit, as the
    // MoT = dense tests need of a tower's rows inside the whole batch's product
    for (int ta = 0; ta < 2; ta++) {
        const int M = 600, N = 64, K = 300, r0 = 100, m = 85;
        std::vector<float> A((size_t)M * K), B((size_t)K * N), C((size_t)M * N), Cr((size_t)m * N), Ar((size_t)m * K);
        for (float& v : A) v = float(mot_rand_normal(&rng));
        for (float& v : B) v = float(mot_rand_normal(&rng));
        for (int i = 0; i < m; i++)
            for (int k = 0; k < K; k++)
                Ar[(size_t)i * K + k] = ta ? A[(size_t)k * M + r0 + i] : A[(size_t)(r0 + i) * K + k];
        gemm_detail::matmul_serial(C.data(), N, A.data(), ta ? M : K, ta, B.data(), N, false, M, N, K, false);
        gemm_detail::matmul_serial(Cr.data(), N, Ar.data(), K, false, B.data(), N, false, m, N, K, false);
        INFO("transA ", ta);
        CHECK(std::memcmp(Cr.data(), C.data() + (size_t)r0 * N, Cr.size() * sizeof(float)) == 0);
    }
    // B transposed: 600 rows packed, 85 rows turned round (B read in place, C^T transposed into C),
    // accumulating into C or not, over two 256-deep slices: again the same bits
    for (int ta = 0; ta < 2; ta++)
        for (int acc = 0; acc < 2; acc++) {
            const int M = 600, N = 70, K = 300, r0 = 100, m = 85;
            std::vector<float> A((size_t)M * K), B((size_t)N * K), C((size_t)M * N), Cr((size_t)m * N),
                Ar((size_t)m * K);
            for (float& v : A) v = float(mot_rand_normal(&rng));
            for (float& v : B) v = float(mot_rand_normal(&rng));
            for (float& v : C) v = float(mot_rand_normal(&rng));
            for (int i = 0; i < m; i++) {
                for (int k = 0; k < K; k++)
                    Ar[(size_t)i * K + k] = ta ? A[(size_t)k * M + r0 + i] : A[(size_t)(r0 + i) * K + k];
                for (int j = 0; j < N; j++) Cr[(size_t)i * N + j] = C[(size_t)(r0 + i) * N + j];
            }
            gemm_detail::matmul_serial(C.data(), N, A.data(), ta ? M : K, ta, B.data(), K, true, M, N, K, acc);
            gemm_detail::matmul_serial(Cr.data(), N, Ar.data(), K, false, B.data(), K, true, m, N, K, acc);
            INFO("transA ", ta, " accumulate ", acc);
            CHECK(std::memcmp(Cr.data(), C.data() + (size_t)r0 * N, Cr.size() * sizeof(float)) == 0);
        }
}

TEST_CASE("bf16: rounding to nearest even, and the round trip") {
    CHECK(mot_bf16_round(1.0f) == 0x3f80);
    CHECK(mot_bf16_float(0x3f80) == 1.0f);
    CHECK(mot_bf16_round(1.0f + 0x1p-8f) == 0x3f80);             // halfway, to the even neighbour (down)
    CHECK(mot_bf16_round(1.0f + 3 * 0x1p-8f) == 0x3f82);         // halfway, to the even neighbour (up)
    CHECK(mot_bf16_round(1.0f + 0x1p-8f + 0x1p-20f) == 0x3f81);  // past halfway: up
    CHECK(mot_bf16_round(-2.5f) == 0xc020);
    CHECK(mot_bf16_round(3.4e38f) == 0x7f80);  // past the largest bf16: infinity
    CHECK(std::isinf(mot_bf16_float(mot_bf16_round(INFINITY))));
    CHECK(std::isnan(mot_bf16_float(mot_bf16_round(NAN))));
    uint64_t rng = 5;
    for (int i = 0; i < 1000; i++) {  // within half a unit in the last place: 2^-8 relative
        const float x = float(mot_rand_normal(&rng));
        const float y = mot_bf16_float(mot_bf16_round(x));
        CHECK(std::fabs(y - x) <= std::fabs(x) * 0x1p-8f);
        CHECK(mot_bf16_round(y) == mot_bf16_round(x));  // rounding a bf16 value changes nothing
    }
}

// Random operands of a bf16 product in matmul's layouts: op(A) M x K and op(B) K x N (bf16, from
// normals), C M x ldc (fp32).
static void bf16_operands(int M, int N, int K, bool ta, bool tb, int lda, int ldb, int ldc, uint64_t* rng,
                          std::vector<uint16_t>* A, std::vector<uint16_t>* B, std::vector<float>* C) {
    A->resize((size_t)(ta ? K : M) * lda);
    B->resize((size_t)(tb ? N : K) * ldb);
    C->resize((size_t)M * ldc);
    for (auto& v : *A) v = mot_bf16_round(float(mot_rand_normal(rng)));
    for (auto& v : *B) v = mot_bf16_round(float(mot_rand_normal(rng)));
    for (auto& v : *C) v = float(mot_rand_normal(rng));
}

TEST_CASE("bf16 matmul: every engine this machine has, against the plain bf16 loop, on odd shapes") {
    // The plain loop adds op(A)_ik op(B)_kj to C0 (or zero) over k in order in fp32; an engine adds
    // the same exact products (a product of two bf16 values is exact in fp32) in another order. Each
    // fp32 sum of n terms is within (n - 1) u sum |terms| of the exact sum (u = 2^-24), so the two
    // differ by at most 2 (K + 1) u (sum_k |op(A)_ik op(B)_kj| + |C0_ij|). Inputs are normal numbers
    // (no denormals: the engines flush them, the loop does not).
    const int saved = mot_bf16_engine();
    int ran = 0;
    for (int e = 0; e < MOT_BF16_ENGINES; e++) {
        if (!mot_bf16_set_engine(e)) {
            const std::string why = std::string("bf16 engine skipped (not on this machine, or a -DMOT_PLAIN build): ") +
                                    MOT_BF16_ENGINE_NAME[e];
            MESSAGE(why);
            continue;
        }
        ran++;
        uint64_t rng = 11 + e;
        struct Shape {
            int M, N, K;
        };
        std::vector<Shape> shapes = {{130, 97, 161}};  // over 2 MFLOP: packed and computed by all threads
        for (int M : {1, 17, 40, 100})
            for (int N : {1, 15, 33, 64})
                for (int K : {1, 2, 31, 33, 100}) shapes.push_back({M, N, K});
        for (const Shape& sh : shapes) {
            const int M = sh.M, N = sh.N, K = sh.K;
            for (int ta = 0; ta < 2; ta++)
                for (int tb = 0; tb < 2; tb++)
                    for (int acc = 0; acc < 2; acc++) {
                        const int lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 1, ldc = N + 2;
                        std::vector<uint16_t> A, B;
                        std::vector<float> C;
                        bf16_operands(M, N, K, ta, tb, lda, ldb, ldc, &rng, &A, &B, &C);
                        std::vector<float> R = C;
                        matmul_bf16(C.data(), ldc, A.data(), lda, ta, B.data(), ldb, tb, M, N, K, acc);
                        matmul_bf16_plain(R.data(), ldc, A.data(), lda, ta, B.data(), ldb, tb, M, N, K, acc);
                        double worst = 0;
                        for (int i = 0; i < M; i++)
                            for (int j = 0; j < N; j++) {
                                double mag = acc ? std::fabs(R[(size_t)i * ldc + j]) : 0;
                                for (int k = 0; k < K; k++)
                                    mag += std::fabs(
                                        double(mot_bf16_float(ta ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k])) *
                                        mot_bf16_float(tb ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j]));
                                const double bound = 2.0 * (K + 1) * 0x1p-24 * mag;
                                worst =
                                    std::max(worst, std::fabs(C[(size_t)i * ldc + j] - R[(size_t)i * ldc + j]) / bound);
                            }
                        INFO(std::string(MOT_BF16_ENGINE_NAME[e]), " ", M, "x", N, "x", K, " transA ", ta, " transB ",
                             tb, " accumulate ", acc);
                        CHECK(worst <= 1.0);
                    }
        }
        // the padding columns of C (between N and ldc) are never written
        std::vector<uint16_t> A(40 * 33, mot_bf16_round(1.0f)), B(33 * 15, mot_bf16_round(0.5f));
        std::vector<float> C(40 * 20, -7.0f);
        matmul_bf16(C.data(), 20, A.data(), 33, false, B.data(), 15, false, 40, 15, 33, false);
        for (int i = 0; i < 40; i++)
            for (int j = 0; j < 20; j++) CHECK(C[(size_t)i * 20 + j] == (j < 15 ? 16.5f : -7.0f));
    }
    CHECK(ran >= 1);
    mot_bf16_set_engine(saved);
}

TEST_CASE("bf16 matmul with B packed once: bit for bit the product of the unpacked B, on every engine") {
    const int saved = mot_bf16_engine();
    for (int e = 0; e < MOT_BF16_ENGINES; e++) {
        if (!mot_bf16_set_engine(e)) continue;  // the case above says which it skips
        uint64_t rng = 29 + e;
        for (auto [M, N, K] : std::vector<std::array<int, 3>>{{1, 1, 1}, {17, 33, 31}, {40, 64, 100}, {130, 97, 161}})
            for (int ta = 0; ta < 2; ta++)
                for (int tb = 0; tb < 2; tb++)
                    for (int acc = 0; acc < 2; acc++) {
                        const int lda = (ta ? M : K) + 1, ldb = (tb ? K : N) + 3, ldc = N;
                        std::vector<uint16_t> A, B;
                        std::vector<float> C;
                        bf16_operands(M, N, K, ta, tb, lda, ldb, ldc, &rng, &A, &B, &C);
                        std::vector<float> R = C;
                        MotBf16Packed P;
                        mot_bf16_pack(&P, B.data(), ldb, tb, K, N);
                        bool holds = true;  // the packed layout holds op(B)
                        for (int k = 0; k < K; k++)
                            for (int j = 0; j < N; j++)
                                holds = holds && P.at(k, j) == (tb ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j]);
                        CHECK(holds);
                        matmul_bf16_packed(C.data(), ldc, A.data(), lda, ta, P, M, acc);
                        matmul_bf16(R.data(), ldc, A.data(), lda, ta, B.data(), ldb, tb, M, N, K, acc);
                        INFO(std::string(MOT_BF16_ENGINE_NAME[e]), " ", M, "x", N, "x", K, " transA ", ta, " transB ",
                             tb, " accumulate ", acc);
                        CHECK(std::memcmp(C.data(), R.data(), C.size() * sizeof(float)) == 0);
                    }
    }
    mot_bf16_set_engine(saved);
}

TEST_CASE("bf16 matmul on fp32 operands: bit for bit the product of the operands rounded first, on every engine") {
    // (fp32 operands are rounded as they are packed or read: the model's activations skip a pass)
    const int saved = mot_bf16_engine();
    for (int e = 0; e < MOT_BF16_ENGINES; e++) {
        if (!mot_bf16_set_engine(e)) continue;  // the case above says which it skips
        uint64_t rng = 41 + e;
        for (auto [M, N, K] : std::vector<std::array<int, 3>>{{1, 1, 1}, {17, 33, 31}, {130, 97, 161}})
            for (int ta = 0; ta < 2; ta++)
                for (int tb = 0; tb < 2; tb++) {
                    const int lda = (ta ? M : K) + 2, ldb = (tb ? K : N) + 1, ldc = N + 1;
                    std::vector<float> A((size_t)(ta ? K : M) * lda), B((size_t)(tb ? N : K) * ldb);
                    for (float& v : A) v = float(mot_rand_normal(&rng));  // not bf16 values: rounding matters
                    for (float& v : B) v = float(mot_rand_normal(&rng));
                    A[0] = -0.0f;
                    B.back() = 3.0f + 0x1p-8f;  // a tie: rounds to even (3)
                    std::vector<uint16_t> Ab(A.size()), Bb(B.size());
                    for (size_t i = 0; i < A.size(); i++) Ab[i] = mot_bf16_round(A[i]);
                    for (size_t i = 0; i < B.size(); i++) Bb[i] = mot_bf16_round(B[i]);
                    std::vector<float> C((size_t)M * ldc, 0.5f), R(C.size(), 0.5f), S(C.size(), 0.5f);
                    matmul_bf16(C.data(), ldc, A.data(), lda, ta, B.data(), ldb, tb, M, N, K, true);
                    matmul_bf16(R.data(), ldc, Ab.data(), lda, ta, Bb.data(), ldb, tb, M, N, K, true);
                    matmul_bf16(S.data(), ldc, A.data(), lda, ta, Bb.data(), ldb, tb, M, N, K, true);
                    MotBf16Packed P;
                    mot_bf16_pack(&P, B.data(), ldb, tb, K, N);
                    std::vector<float> Q((size_t)M * ldc, 0.5f);
                    matmul_bf16_packed(Q.data(), ldc, A.data(), lda, ta, P, M, true);
                    INFO(std::string(MOT_BF16_ENGINE_NAME[e]), " ", M, "x", N, "x", K, " transA ", ta, " transB ", tb);
                    CHECK(std::memcmp(C.data(), R.data(), C.size() * sizeof(float)) == 0);
                    CHECK(std::memcmp(S.data(), R.data(), C.size() * sizeof(float)) == 0);
                    CHECK(std::memcmp(Q.data(), R.data(), C.size() * sizeof(float)) == 0);
                }
    }
    mot_bf16_set_engine(saved);
}

TEST_CASE("parameter table: copies follow the tying switches; each extra tower adds 4D^2 + 3DF + gains per layer") {
    MotConfig c = tiny(3, 0, 1, 0);
    MotParamTable t = mot_param_table(c);
    CHECK(t.p[P_WQ].copies == 3);
    CHECK(t.p[P_W1].copies == 1);
    CHECK(t.p[P_GATTN].copies == 3);
    CHECK(t.p[P_EMB].copies == 1);
    CHECK(t.p[P_HEAD].copies == 1);
    CHECK(t.p[P_HEAD].offset + t.p[P_HEAD].size() == t.total);
    MotConfig d = tiny(1), k3 = tiny(3);
    const size_t D = 24, F = 64, Dh = 12, L = d.n_layer;  // F = 8D/3: matrices add 12 D^2 per tower
    d.d_model = k3.d_model = D;
    d.d_ff = k3.d_ff = F;
    d.n_head = k3.n_head = 2;
    const size_t extra = mot_param_table(k3).total - mot_param_table(d).total;
    const size_t per_layer = 4 * D * D + 3 * D * F + 2 * Dh + 2 * D;  // Wq Wk Wv Wo, W1 W3 W2, gq gk, g_attn g_ffn
    CHECK(4 * D * D + 3 * D * F == 12 * D * D);
    CHECK(extra == 2 * (L * per_layer + D));  // + g_out, for 2 extra towers
}

TEST_CASE("causality: changing the token at position j changes no logit before j") {
    MotConfig c = tiny(3);
    MotModel<double> m;
    mot_init(&m, c, 1);
    randomize(&m, 2);
    MotBatch b = random_batch(c, 1, 10, 5);
    mot_forward(&m, b);
    std::vector<double> before;
    for (int i = 0; i < 10; i++)
        for (int v = 0; v < c.vocab; v++) before.push_back(mot_logit(m, b, i, v));
    const int j = 6;
    MotBatch b2 = b;
    b2.tokens[j] = (b.tokens[j] + 7) % c.vocab;  // likely another modality: the grouping changes too
    mot_group(c, &b2);
    mot_forward(&m, b2);
    bool same_before = true, changed_at = false;
    for (int i = 0; i < 10; i++)
        for (int v = 0; v < c.vocab; v++) {
            const double x = mot_logit(m, b2, i, v);
            if (i < j && x != before[(size_t)i * c.vocab + v]) same_before = false;
            if (i == j && x != before[(size_t)i * c.vocab + v]) changed_at = true;
        }
    CHECK(same_before);
    CHECK(changed_at);
}

TEST_CASE("MoT with identical towers equals dense; per-tower gradients sum to dense gradients") {
    MotConfig cm = tiny(3), cd = tiny(1);
    MotModel<double> dense, mot;
    mot_init(&dense, cd, 1);
    randomize(&dense, 4);
    mot_init(&mot, cm, 1);
    for (int p = 0; p < P_COUNT; p++) {  // copy dense tensor into every tower copy
        const MotParamInfo &di = dense.tab.p[p], &mi = mot.tab.p[p];
        for (int l = 0; l < mi.layers; l++)
            for (int k = 0; k < mi.copies; k++)
                std::copy(dense.params.begin() + di.at(l, 0), dense.params.begin() + di.at(l, 0) + di.each(),
                          mot.params.begin() + mi.at(l, k));
    }
    MotBatch b = random_batch(cm, 2, 10, 8);
    double ld = mot_forward(&dense, b), lm = mot_forward(&mot, b);
    CHECK(ld == lm);
    bool exact = true;
    for (int i = 0; i < b.B * b.T; i++)
        for (int v = 0; v < cm.vocab; v++) exact &= mot_logit(dense, b, i, v) == mot_logit(mot, b, i, v);
    CHECK(exact);
    mot_zero_grad(&dense);
    mot_backward(&dense, b);
    mot_zero_grad(&mot);
    mot_backward(&mot, b);
    for (int p = 0; p < P_COUNT; p++) {
        const MotParamInfo &di = dense.tab.p[p], &mi = mot.tab.p[p];
        if (di.size() == 0) continue;  // the routers: empty without experts
        double worst = 0;
        for (int l = 0; l < mi.layers; l++)
            for (size_t i = 0; i < di.each(); i++) {
                double sum = 0;
                for (int k = 0; k < mi.copies; k++) sum += mot.grads[mi.at(l, k) + i];
                const double ref = dense.grads[di.at(l, 0) + i];
                worst = std::max(worst, std::fabs(sum - ref) / (std::fabs(ref) + 1e-12));
            }
        INFO(di.name);
        CHECK(worst < 1e-9);
    }
}

TEST_CASE("isolation: a batch with no image tokens leaves every image-tower gradient exactly zero") {
    MotConfig c = tiny(3);
    MotModel<double> m;
    mot_init(&m, c, 1);
    randomize(&m, 3);
    MotBatch b = random_batch(c, 2, 10, 9, {MOD_TEXT, MOD_SPEECH});
    REQUIRE(b.group[2] == b.group[1]);
    mot_forward(&m, b);
    mot_zero_grad(&m);
    mot_backward(&m, b);
    for (int p = 0; p < P_COUNT; p++) {
        const MotParamInfo& in = m.tab.p[p];
        if (in.copies <= 1) continue;  // shared, or absent (0 copies: experts' routers, Transfusion's projections)
        for (int l = 0; l < in.layers; l++) {
            double img = 0, txt = 0;
            for (size_t i = 0; i < in.each(); i++) {
                img += std::fabs(m.grads[in.at(l, MOD_IMAGE) + i]);
                txt += std::fabs(m.grads[in.at(l, MOD_TEXT) + i]);
            }
            INFO(in.name, " layer ", l);
            CHECK(img == 0.0);
            CHECK(txt > 0.0);
        }
    }
}

TEST_CASE("AdamW: one step against the formula worked by hand") {
    MotModel<double> m;
    mot_init(&m, tiny(1), 1);
    MotOptim o;
    o.lr = 0.01;
    o.warmup = 1;
    o.steps = 10;
    o.grad_clip = 0;
    std::fill(m.grads.begin(), m.grads.end(), 0.0);
    const size_t iw = m.tab.p[P_WQ].offset, ig = m.tab.p[P_GQ].offset;  // a decayed matrix, a gain
    m.params[iw] = 0.5;
    m.grads[iw] = 0.2;
    m.params[ig] = 1.5;
    m.grads[ig] = -0.4;
    mot_adamw_step(&m, o, 0);
    // step 1: m = 0.1 g, v = 0.05 g^2; mhat = g, vhat = g^2; update = lr * g / (|g| + eps)
    const double lr = 0.01;  // warmup 1: the first step is at peak
    CHECK(m.params[iw] == doctest::Approx(0.5 - lr * 0.1 * 0.5 - lr * 0.2 / (0.2 + 1e-8)).epsilon(1e-14));
    CHECK(m.params[ig] == doctest::Approx(1.5 + lr * 0.4 / (0.4 + 1e-8)).epsilon(1e-14));
    CHECK(m.adam_m[iw] == doctest::Approx(0.1 * 0.2));
    CHECK(m.adam_v[iw] == doctest::Approx(0.05 * 0.04));
    // second step with the same gradient: m = 0.19 g, v = 0.0975 g^2, bias corrections 0.19, 0.0975
    const double w1 = m.params[iw];
    mot_adamw_step(&m, o, 1);
    const double lr2 = mot_lr_at(o, 1);
    CHECK(m.params[iw] == doctest::Approx(w1 - lr2 * 0.1 * w1 - lr2 * 0.2 / (0.2 + 1e-8)).epsilon(1e-12));
}

TEST_CASE("AdamW: global-norm clipping scales every gradient by clip / norm") {
    MotModel<double> m;
    mot_init(&m, tiny(1), 1);
    MotOptim o;
    o.grad_clip = 1.0;
    o.weight_decay = 0;
    o.warmup = 1;
    std::fill(m.grads.begin(), m.grads.end(), 0.0);
    const size_t i0 = m.tab.p[P_WQ].offset, i1 = m.tab.p[P_HEAD].offset;
    m.grads[i0] = 3;
    m.grads[i1] = 4;  // norm 5
    double norm = mot_adamw_step(&m, o, 0);
    CHECK(norm == doctest::Approx(5.0));
    CHECK(m.adam_m[i0] == doctest::Approx(0.1 * 3 / (5 + 1e-6)));
    CHECK(m.adam_m[i1] == doctest::Approx(0.1 * 4 / (5 + 1e-6)));
    m.grads[i0] = 0.3;
    m.grads[i1] = 0.4;
    m.adam_m[i0] = 0;  // norm 0.5: not clipped
    mot_adamw_step(&m, o, 1);
    CHECK(m.adam_m[i0] == doctest::Approx(0.1 * 0.3));
}

TEST_CASE("schedule: linear warmup, peak, cosine to the floor") {
    MotOptim o;
    o.lr = 1e-3;
    o.warmup = 10;
    o.steps = 110;
    o.min_lr_frac = 0.05;
    CHECK(mot_lr_at(o, 0) == doctest::Approx(1e-4));
    CHECK(mot_lr_at(o, 4) == doctest::Approx(5e-4));
    CHECK(mot_lr_at(o, 9) == doctest::Approx(1e-3));
    CHECK(mot_lr_at(o, 10) == doctest::Approx(1e-3));                               // peak
    CHECK(mot_lr_at(o, 59) == doctest::Approx(0.5 * (1e-3 + 5e-5)).epsilon(1e-2));  // half way
    CHECK(mot_lr_at(o, 109) == doctest::Approx(5e-5));                              // end: floor
}

TEST_CASE("a small model overfits one batch: loss from ~log(V) to below 0.05 in 150 steps") {
    MotConfig c = tiny(3);
    c.d_model = 32;
    c.n_head = 4;
    c.d_ff = 64;
    c.vocab = 48;
    c.image_begin = 24;
    c.speech_begin = 36;
    c.max_seq = 16;
    MotModel<float> m;
    mot_init(&m, c, 1);
    MotBatch b = random_batch(c, 2, 16, 21);
    MotOptim o;
    o.lr = 1e-2;
    o.warmup = 10;
    o.steps = 150;
    o.weight_decay = 0;
    const double first = mot_forward(&m, b);
    CHECK(first == doctest::Approx(std::log(48.0)).epsilon(0.1));
    double last = first;
    for (int s = 0; s < o.steps; s++) {
        last = mot_forward(&m, b);
        mot_zero_grad(&m);
        mot_backward(&m, b);
        mot_adamw_step(&m, o, s);
    }
    last = mot_forward(&m, b);
    MESSAGE("overfit: loss ", first, " -> ", last);
    CHECK(last < 0.05);
}

// The float model against the double one on the same batch, through the path this build runs:
// the fast twins (section 7 of mot.h), or the plain functions alone when built with -DMOT_PLAIN
// (make test runs this file both ways). Either path must give the double model's gradients and
// losses within fp32 rounding, so the two paths agree with each other within it. Big enough that
// matmul_fast takes its packed paths (row blocks, edge tiles, threads).
static void float_against_double(const MotConfig& c) {
    MotModel<float> mf;
    MotModel<double> md;
    mot_init(&mf, c, 5);
    mot_init(&md, c, 5);  // drawn in double: both start from the same values
    const MotBatch b = random_batch(c, 4, 48, 9);
    MotOptim o;
    o.lr = 1e-3;
    o.warmup = 1;
    o.steps = 4;
    for (int s = 0; s < o.steps; s++) {
        const double lf = mot_forward(&mf, b), ld = mot_forward(&md, b);
        INFO("step ", s);
        CHECK(std::fabs(lf - ld) <= 2e-6 * ld);
        mot_zero_grad(&mf);
        mot_zero_grad(&md);
        mot_backward(&mf, b);
        mot_backward(&md, b);
        if (s == 0) {  // the gradient before any update: the whole forward and backward
            double num = 0, den = 0;
            for (size_t i = 0; i < md.grads.size(); i++) {
                const double d = double(mf.grads[i]) - md.grads[i];
                num += d * d;
                den += md.grads[i] * md.grads[i];
            }
            MESSAGE("float against double, relative gradient difference ", std::sqrt(num / den));
            CHECK(std::sqrt(num / den) <= 1e-5);
        }
        mot_adamw_step(&mf, o, s);
        mot_adamw_step(&md, o, s);
    }
}

// tiny()'s layout at D = 64, vocabulary 48 (text [0,24), image [24,36), speech [36,48)), T <= 48.
static MotConfig wider(MotConfig c, int d_ff) {
    c.d_model = 64;
    c.n_head = 4;
    c.d_ff = d_ff;
    c.vocab = 48;
    c.image_begin = 24;
    c.speech_begin = 36;
    c.max_seq = 48;
    return c;
}

TEST_CASE("float against double within fp32 rounding, on this build's path (fast, or plain with -DMOT_PLAIN): MoT") {
    float_against_double(wider(tiny(3), 192));
}

TEST_CASE("float against double within fp32 rounding, on this build's path: MoMa-style (experts, routers)") {
    MotConfig c = wider(tiny(3, 1), 128);
    for (int f = 0; f < 3; f++) c.n_expert[f] = 4;
    float_against_double(c);
}

// ---- bf16 mode (--bf16 on the CPU): a whole step against fp32 -------------------------------
// ||a - ref|| / ||ref|| over n values (0 when both are zero).
static double rel_norm(const float* a, const float* ref, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        const double d = double(a[i]) - double(ref[i]);
        num += d * d;
        den += double(ref[i]) * double(ref[i]);
    }
    return den == 0 ? (num == 0 ? 0 : INFINITY) : std::sqrt(num / den);
}

// The same model and batch in fp32 and in bf16 mode (mot.h, "bf16 mode"): loss, logits and every
// gradient tensor (each layer and tower copy). The bounds are test_gpu.cu's for the GPU's bf16
// mode against the fp32 CPU, and justified the same way: each rounding to bf16 (8 significant bits)
// errs by at most 2^-9 relative, ~1.7e-3 rms; a path through these 2-layer models meets ~20 of them
// forward (x, W, q/k/v, qr/kr, o, a, h, u1/u3, u, y2 per layer; z and W_head at the head), which
// add in quadrature to ~8e-3 on the logits, and ~38 more backward (~1e-2 on a typical gradient; a
// gradient that is a sum which cancels, as the QK-norm gains', magnifies it). Bounds: logits 3e-2,
// gradients 5e-2, loss 2e-2, while a misplaced rounding or a wrong operand gives errors of order 1.
// The experts' routers compare logits computed from h, which bf16 moves by ~1e-2: a row near a tie
// can change experts, so at most a tenth of the (row, expert) choices may differ, and a router's
// gradient, a sum over rows that can cancel, is judged against its whole parameter's norm (as
// test_gpu.cu judges the GPU's). Returns the worst gradient error.
static double bf16_against_fp32(const MotConfig& c, const MotBatch& b, const std::string& what) {
    MotModel<float> mf;
    mot_init(&mf, c, 5);
    uint64_t seed = 17;
    for (int p = 0; p < P_COUNT; p++) {  // std 0.1 matrices, gains near 1: every gradient matters
        const MotParamInfo& in = mf.tab.p[p];
        for (size_t i = 0; i < in.size(); i++)
            mf.params[in.offset + i] =
                float(in.decay ? 0.1 * mot_rand_normal(&seed) : 1.0 + 0.2 * mot_rand_normal(&seed));
    }
    MotModel<float> mb = mf;
    mb.bf16 = true;
    const double lf = mot_forward(&mf, b), lb = mot_forward(&mb, b);
    mot_backward(&mf, b, false);
    mot_backward(&mb, b, false);
    const size_t NV = (size_t)b.B * b.T * c.vocab;
    const double el = rel_norm(mb.act.logits, mf.act.logits, NV), eloss = std::fabs(lb - lf) / lf;
    INFO(what);
    CHECK(std::isfinite(lb));
    CHECK(eloss <= 2e-2);
    CHECK(el >= 1e-4);         // bf16 mode did round: fp32 rounding alone stays near 1e-7
    if (mot_has_experts(c)) {  // (row, expert) choices of the EC selection that differ
        long differ = 0, used = 0;
        for (int l = 0; l < c.n_layer; l++)
            for (int f = 0; f < mot_ffn_copies(c); f++)
                for (int e = 0; e < (c.n_expert[f] > 1 ? c.n_expert[f] : 0); e++) {
                    const size_t e0 = (size_t)l * mf.NS + mf.plan.slot0[f] + (size_t)e * mf.plan.cap[f];
                    std::vector<int32_t> x(mf.sel.begin() + e0, mf.sel.begin() + e0 + mf.plan.cap[f]),
                        y(mb.sel.begin() + e0, mb.sel.begin() + e0 + mf.plan.cap[f]);
                    std::sort(x.begin(), x.end());
                    std::sort(y.begin(), y.end());
                    for (int32_t r : y) differ += !std::binary_search(x.begin(), x.end(), r);
                    used += mf.plan.cap[f];
                }
        MESSAGE(what, ": ", differ, " of ", used, " expert choices differ from fp32's");
        CHECK(differ * 10 <= used);
        if (differ) {  // another function of the parameters: only the loss compares
            MESSAGE(what, ": another selection, logits and gradients not compared");
            return 0;
        }
    }
    CHECK(el <= 3e-2);
    double worst = 0, all = 0;
    for (float g : mf.grads) all += double(g) * g;
    all = std::sqrt(all);
    std::string worst_name;
    for (int p = 0; p < P_COUNT; p++) {
        const MotParamInfo& info = mf.tab.p[p];
        double whole = 0;
        for (size_t i = 0; i < info.size(); i++) whole += double(mf.grads[info.offset + i]) * mf.grads[info.offset + i];
        for (int l = 0; l < info.layers; l++)
            for (int k = 0; k < info.copies; k++) {
                const size_t at = info.at(l, k);
                const float *gb = mb.grads.data() + at, *gf = mf.grads.data() + at;
                const std::string name =
                    std::string(info.name) + " layer " + std::to_string(l) + " copy " + std::to_string(k);
                double d = 0, nf = 0, nb = 0;  // ||gb - gf||^2, ||gf||^2, ||gb||^2
                for (size_t i = 0; i < info.each(); i++) {
                    d += (double(gb[i]) - gf[i]) * (double(gb[i]) - gf[i]);
                    nf += double(gf[i]) * gf[i];
                    nb += double(gb[i]) * gb[i];
                }
                // routers: against the whole router parameter; a tensor whose fp32 gradient is zero
                // (a copy with no rows): zero up to rounding, against all gradients
                const double e = (p == P_WR || p == P_U) ? std::sqrt(d / whole)
                                 : nf == 0               ? std::sqrt(nb) / (1e-2 * all)
                                                         : std::sqrt(d / nf);
                INFO(what, ": gradient of ", name, " rel err ", e);
                CHECK(e <= 5e-2);
                if (e > worst) worst = e, worst_name = name;
            }
    }
    MESSAGE(what, ": bf16 against fp32: loss ", eloss, ", logits ", el, ", worst gradient ", worst, " (", worst_name,
            ")");
    return worst;
}

TEST_CASE("bf16 mode: a training step against fp32 (MoT, dense, MoMa-style experts, Transfusion)") {
    MotConfig mot = wider(tiny(3), 96);
    bf16_against_fp32(mot, random_batch(mot, 2, 48, 9), "MoT");
    MotConfig dense = wider(tiny(1), 96);
    bf16_against_fp32(dense, random_batch(dense, 2, 48, 9), "dense");
    MotConfig moma = wider(tiny(3, 1), 96);
    for (int f = 0; f < 3; f++) moma.n_expert[f] = 4;
    for (int seed : {2, 5})  // batches on which no row is near an expert's threshold
        bf16_against_fp32(moma, random_batch(moma, 2, 48, seed), "MoMa-style, batch " + std::to_string(seed));
    MotConfig tf = wider(tiny(3), 96);
    tf.setting = MOT_SETTING_TRANSFUSION;
    bf16_against_fp32(tf, tf_batch(tf, 2, 48, 9, {0, 300, 999}), "Transfusion");
}

TEST_CASE("grouping: rows sorted by modality, stable, and the index lists invert each other") {
    MotConfig c = tiny(3);
    MotBatch b = random_batch(c, 3, 10, 77);
    for (int r = 0; r < 30; r++) {
        CHECK(b.row_of[b.order[r]] == r);
        int md = mot_modality(c, b.tokens[b.order[r]]);
        CHECK(r >= b.group[md]);
        CHECK(r < b.group[md + 1]);
        if (r > 0 && mot_modality(c, b.tokens[b.order[r - 1]]) == md) CHECK(b.order[r - 1] < b.order[r]);
    }
}

TEST_CASE("batch plan: its lists match the batch, the embedding lists cover each row once, bad batches refused") {
    for (int towers : {3, 1}) {
        MotConfig c = tiny(towers);
        for (int f = 0; f < 3; f++) c.n_expert[f] = towers == 3 ? 2 : 1;
        const MotBatch b = random_batch(c, 3, 10, 91);
        MotPlan p;
        REQUIRE(mot_plan(c, b, &p) == "");
        int n_valid = 0, n_mod[3] = {0, 0, 0};
        for (int r = 0; r < 30; r++) {
            const int i = b.order[r];
            CHECK(p.tok[r] == b.tokens[i]);
            CHECK(p.tgt[r] == b.targets[i]);  // token setting: every target counts
            CHECK(p.pos[r] == i % b.T);
            if (b.targets[i] >= 0) n_valid++, n_mod[mot_modality(c, b.targets[i])]++;
        }
        CHECK(p.n_valid == n_valid);
        for (int m = 0; m < 3; m++) CHECK(p.n_mod[m] == n_mod[m]);
        // each row once; tokens increasing, rows increasing within a token
        std::vector<int> seen(30, 0);
        REQUIRE(p.emb_start.size() == p.emb_tok.size() + 1);
        CHECK(p.emb_start.back() == 30);
        for (size_t u = 0; u < p.emb_tok.size(); u++) {
            if (u > 0) CHECK(p.emb_tok[u - 1] < p.emb_tok[u]);
            for (int k = p.emb_start[u]; k < p.emb_start[u + 1]; k++) {
                seen[p.emb_rows[k]]++;
                CHECK(p.tok[p.emb_rows[k]] == p.emb_tok[u]);
                if (k > p.emb_start[u]) CHECK(p.emb_rows[k - 1] < p.emb_rows[k]);
            }
        }
        for (int r = 0; r < 30; r++) CHECK(seen[r] == 1);
        // two experts per tower: each copy's capacity is half its rows, rounded up, slots back to back
        for (int f = 0; f < mot_ffn_copies(c); f++) {
            int r0, r1;
            mot_ffn_rows(c, b.group, f, &r0, &r1);
            CHECK(p.cap[f] == (r1 - r0 + c.n_expert[f] - 1) / c.n_expert[f]);
            CHECK(p.slot0[f + 1] == p.slot0[f] + c.n_expert[f] * p.cap[f]);
        }
        CHECK(p.expert_rows == (towers == 3 ? 30 : 0));
        // broken batches: a one-line reason, and mot_forward refuses them instead of reading out of bounds
        auto refused = [&](MotBatch bad, const char* why) {
            MotPlan q;
            CHECK(mot_plan(c, bad, &q).find(why) != std::string::npos);
            MotModel<float> m;
            mot_init(&m, c, 1);
            CHECK_THROWS_AS(mot_forward(&m, bad), std::invalid_argument);
        };
        MotBatch bad = b;
        bad.tokens[b.order[0]] = c.vocab;
        refused(bad, "token id outside the vocabulary");
        bad = b;
        bad.targets[4] = c.vocab + 3;
        refused(bad, "target id outside the vocabulary");
        bad = b;
        std::swap(bad.order[0], bad.order[1]);
        refused(bad, "order / row_of are not inverse permutations");
        bad = b;
        bad.vis[5] = 2;  // position 5 seeing only up to 2
        refused(bad, "vis is not a valid attention bound");
        bad = b;
        bad.targets.pop_back();
        refused(bad, "wrong size");
        bad = b;
        bad.T = c.max_seq + 1;
        refused(bad, "max_seq");
    }
}

TEST_CASE("generation: the KV-cache decode gives the logits of the full forward, position by position") {
    for (int towers : {3, 1}) {
        MotConfig c = tiny(towers);
        MotModel<double> m;
        mot_init(&m, c, 1);
        randomize(&m, 5);
        MotBatch b = random_batch(c, 1, 10, 13);
        mot_forward(&m, b);
        MotKVCache<double> kv;
        const double worst = kv_decode_worst(&m, b, 10, &kv);
        std::vector<double> lg(c.vocab);
        CHECK(worst < 1e-12);
        CHECK_FALSE(mot_decode_step(&m, &kv, 0, lg.data()));  // cache full at max_seq
    }
}

TEST_CASE("sampling: greedy takes the argmax, top-k 1 equals greedy, the range is respected") {
    std::vector<float> lg = {0.1f, 3.0f, 2.0f, 5.0f, -1.0f};
    uint64_t rng = 1;
    CHECK(mot_sample(lg.data(), 0, 5, 0.0, 0, &rng) == 3);
    CHECK(mot_sample(lg.data(), 0, 3, 0.0, 0, &rng) == 1);
    CHECK(mot_sample(lg.data(), 0, 5, 1.0, 1, &rng) == 3);
    int counts[5] = {0, 0, 0, 0, 0};
    for (int i = 0; i < 2000; i++) counts[mot_sample(lg.data(), 1, 4, 1.0, 2, &rng)]++;
    CHECK(counts[0] == 0);
    CHECK(counts[2] == 0);
    CHECK(counts[4] == 0);
    CHECK(counts[3] > counts[1]);  // p(3) / p(1) = e^2
    CHECK(counts[1] > 100);
}
