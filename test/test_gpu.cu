// test_gpu.cu — the GPU path (mot.cu) against the CPU reference (mot.h): logits, losses and every
// parameter gradient on the same parameters and batch, in fp32 (tight) and bf16 (loose), over head
// dims 2..128, sequence lengths that do not fill the tiles, one-sequence and one-modality batches,
// MoT, dense and every tie switch; a debug state file (written by this test, or the one given with
// `--debug-state FILE`, e.g. from `./mot --debug-state FILE`); 10 training steps; bitwise
// determinism; gradient accumulation.
//
// Two builds of this file:
//   test/test_gpu      nvcc, on a real GPU (without one, every case is excluded and shows as skipped)
//   test/test_gpu_cpu  the same source through the CUDA-on-CPU layer (test/cuda_cpu.h): runs
//                      everywhere, and is what `make test` runs on a machine without a GPU
//   ./test/test_gpu[_cpu] [--debug-state FILE] [doctest flags]
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include "mot.cu"
#include "test/common.h"

#include <unistd.h>

static std::string g_debug_state;  // --debug-state FILE

// ---- helpers shared with test_mot.cpp's style ---------------------------------------------------
// Vocabulary with all three modalities: text [0, 40), image [40, 72), speech [72, 96).
static MotConfig small_config(int d_model, int n_head, int towers, int T, int tie_attn = 0, int tie_ffn = 0,
                              int tie_norm = 0) {
    MotConfig c;
    c.n_layer = 2; c.d_model = d_model; c.n_head = n_head; c.d_ff = d_model * 3 / 2;
    c.vocab = 96; c.image_begin = 40; c.speech_begin = 72; c.max_seq = T;
    c.n_tower = towers; c.tie_attn = tie_attn; c.tie_ffn = tie_ffn; c.tie_norm = tie_norm;
    return c;
}


// Well-scaled random parameters (std 0.1 matrices, gains near 1) so that every gradient matters.
static void randomize(MotModel<float>* m, uint64_t seed) {
    for (int p = 0; p < P_COUNT; p++) {
        const MotParamInfo& in = m->tab.p[p];
        for (size_t i = 0; i < in.size(); i++)
            m->params[in.offset + i] = float(in.decay ? 0.1 * mot_rand_normal(&seed) : 1.0 + 0.2 * mot_rand_normal(&seed));
    }
}

static double rel_err(const float* a, const float* ref, size_t n) {  // ||a - ref|| / ||ref||
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        const double d = double(a[i]) - double(ref[i]);
        num += d * d;
        den += double(ref[i]) * double(ref[i]);
    }
    if (den == 0) return num == 0 ? 0 : INFINITY;
    return std::sqrt(num / den);
}
static bool all_finite(const std::vector<float>& v) {
    for (float x : v)
        if (!std::isfinite(x)) return false;
    return true;
}

// Compares the GPU gradients with the reference tensor by tensor (each layer and tower copy):
// ||gpu - ref|| / ||ref|| <= tol. A tensor whose reference gradient is exactly zero (a tower with
// no rows in the batch, or q/k when T = 1, where softmax over one key has no gradient) must be
// zero up to rounding: ||gpu|| <= tol * 1e-2 * ||all reference gradients||. Prints the worst error.
static void check_grads(const MotParamTable& tab, const std::vector<float>& gpu, const std::vector<float>& ref,
                        double tol, const char* what) {
    REQUIRE(gpu.size() == ref.size());
    CHECK(all_finite(gpu));
    double all = 0;
    for (float x : ref) all += double(x) * double(x);
    all = std::sqrt(all);
    double worst = 0;
    std::string worst_name;
    for (int p = 0; p < P_COUNT; p++) {
        const MotParamInfo& info = tab.p[p];
        for (int l = 0; l < info.layers; l++)
            for (int c = 0; c < info.copies; c++) {
                const size_t at = info.at(l, c);
                const std::string name = std::string(info.name) + " layer " + std::to_string(l) + " copy " + std::to_string(c);
                double rn = 0, gn = 0;
                for (size_t i = 0; i < info.each(); i++) {
                    rn += double(ref[at + i]) * double(ref[at + i]);
                    gn += double(gpu[at + i]) * double(gpu[at + i]);
                }
                if (rn == 0) {
                    INFO(what, ": gradient of ", name, " is zero on the CPU, norm ", std::sqrt(gn), " on the GPU");
                    CHECK(std::sqrt(gn) <= tol * 1e-2 * all);
                    continue;
                }
                const double e = rel_err(gpu.data() + at, ref.data() + at, info.each());
                INFO(what, ": gradient of ", name, " rel err ", e);
                CHECK(e <= tol);
                if (e > worst) { worst = e; worst_name = name; }
            }
    }
    printf("  %s: worst gradient rel err %.3e (%s), tolerance %.0e\n", what, worst, worst_name.c_str(), tol);
}

// Tolerances, as ||gpu - cpu|| / ||cpu|| per tensor (and |gpu - cpu| / |cpu| for losses).
// fp32: both sides compute in float with different summation orders (cuBLAS blocking, online
// softmax, tree reductions, FMA contraction); each op carries ~1e-7 relative rounding and the
// chain (2 layers forward + backward, with norms that divide) amplifies that to ~1e-6..1e-5.
// 1e-3 leaves two orders of margin, while any indexing/math bug gives errors of order 1.
// bf16: GEMM operands are rounded to 8-bit mantissas (relative 2^-9 = 2e-3 each); that error
// accumulates over ~10 GEMMs per path and the backward, so ~1e-2 is expected; 5e-2 still
// catches real bugs (order 1).
static const double TOL_FP32_GRAD = 1e-3, TOL_FP32_LOGITS = 1e-4, TOL_FP32_LOSS = 1e-4;
static const double TOL_BF16_GRAD = 5e-2, TOL_BF16_LOGITS = 3e-2, TOL_BF16_LOSS = 2e-2;

static double rel1(double a, double ref) { return std::fabs(a - ref) / std::max(1e-12, std::fabs(ref)); }

// One forward + backward on the CPU and the GPU with the same parameters and batch.
static void compare_once(const char* name, const MotConfig& c, int B, int T, std::vector<int> mods, bool bf16,
                         int head_rows = 0) {
    INFO("case ", name, (bf16 ? " (bf16)" : " (fp32)"));
    printf("%s%s: L=%d D=%d H=%d F=%d V=%d towers=%d ties=%d%d%d B=%d T=%d\n", name, bf16 ? " bf16" : " fp32",
           c.n_layer, c.d_model, c.n_head, c.d_ff, c.vocab, c.n_tower, c.tie_attn, c.tie_ffn, c.tie_norm, B, T);
    MotModel<float> cpu;
    mot_init(&cpu, c, 5);
    randomize(&cpu, 9);
    MotBatch b = random_batch(c, B, T, 13, mods);
    mot_forward(&cpu, b);
    mot_zero_grad(&cpu);
    mot_backward(&cpu, b);

    MotGpu g;
    std::string err;
    REQUIRE_MESSAGE(mot_gpu_init(&g, c, B, T, bf16, &err), err);
    if (head_rows > 0) g.head_rows = std::min(g.head_rows, head_rows);  // exercise the chunked head
    mot_gpu_upload(&g, cpu);
    mot_gpu_zero_grad(&g);
    const double loss = mot_gpu_forward(&g, b);
    mot_gpu_backward(&g);
    std::vector<float> grads, logits;
    mot_gpu_grads(&g, &grads);
    mot_gpu_logits(&g, b, &logits);

    const double tl = bf16 ? TOL_BF16_LOSS : TOL_FP32_LOSS;
    printf("  loss gpu %.7f cpu %.7f (rel %.2e)\n", loss, cpu.loss, rel1(loss, cpu.loss));
    CHECK(std::isfinite(loss));
    CHECK(rel1(loss, cpu.loss) <= tl);
    CHECK(g.n_valid == cpu.n_valid);
    for (int m = 0; m < MOT_N_MOD; m++) {
        INFO("modality ", MOT_MOD_NAME[m]);
        CHECK(g.n_mod[m] == cpu.n_mod[m]);
        if (cpu.n_mod[m]) CHECK(rel1(g.loss_mod[m], cpu.loss_mod[m]) <= tl);
        else CHECK(g.loss_mod[m] == 0.0);
    }
    const int N = B * T, V = c.vocab;
    std::vector<float> ref((size_t)N * V);
    for (int i = 0; i < N; i++)
        for (int j = 0; j < V; j++) ref[(size_t)i * V + j] = mot_logit(cpu, b, i, j);
    const double el = rel_err(logits.data(), ref.data(), ref.size());
    printf("  logits rel err %.3e\n", el);
    CHECK(all_finite(logits));
    CHECK(el <= (bf16 ? TOL_BF16_LOGITS : TOL_FP32_LOGITS));
    check_grads(g.tab, grads, cpu.grads, bf16 ? TOL_BF16_GRAD : TOL_FP32_GRAD, name);
    mot_gpu_free(&g);
}

// The cases: every head dim the attention kernels are instantiated for (2: one thread per row and
// pair-wise RoPE; 16: one thread per row; 64 and 128: a row split over 2..8 threads), sequence lengths
// that are not multiples of the attention tiles (64 query rows, 32 keys) or are 1, one-sequence
// batches, MoT, dense, every tie switch, and batches where one or two towers have no rows. In bf16,
// head dims 64 and 128 run the tensor-core attention kernels and the others the fp32 ones.
static void compare_all(bool bf16) {
    compare_once("mot dh16", small_config(64, 4, 3, 77), 3, 77, {0, 1, 2}, bf16, 50);
    compare_once("mot dh64", small_config(128, 2, 3, 130), 2, 130, {0, 1, 2}, bf16);
    compare_once("mot dh128 B=1 T=65", small_config(128, 1, 3, 65), 1, 65, {0, 1, 2}, bf16);
    compare_once("mot dh32 T=1", small_config(64, 2, 3, 1), 3, 1, {0, 1, 2}, bf16);
    if (!bf16) {  // D = 16 and 8: bf16 GEMMs over K = 8 average nothing away, so only fp32 is a fair test;
                  // the attention layouts these dims select do not depend on the mode
        compare_once("mot dh4 B=1 T=33", small_config(16, 4, 3, 33), 1, 33, {0, 1, 2}, bf16);
        compare_once("mot dh2 T=65", small_config(8, 4, 3, 65), 2, 65, {0, 1, 2}, bf16);
    }
    compare_once("dense dh16", small_config(64, 4, 1, 77), 2, 77, {0, 1, 2}, bf16, 29);
    compare_once("dense all ties", small_config(64, 4, 1, 33, 1, 1, 1), 2, 33, {0, 1, 2}, bf16);
    compare_once("mot tie-attn", small_config(64, 4, 3, 40, 1, 0, 0), 2, 40, {0, 1, 2}, bf16);
    compare_once("mot tie-ffn tie-norm", small_config(64, 4, 3, 40, 0, 1, 1), 2, 40, {0, 1, 2}, bf16);
    compare_once("mot text only", small_config(64, 4, 3, 33), 2, 33, {0}, bf16);
    compare_once("mot image only", small_config(64, 4, 3, 33), 2, 33, {1}, bf16);
    compare_once("mot speech only", small_config(64, 4, 3, 33), 1, 33, {2}, bf16);
    compare_once("mot dh8 T=5", small_config(32, 4, 3, 5), 4, 5, {1, 2}, bf16);
}

TEST_CASE("gpu: fp32 forward and backward match the CPU reference") { compare_all(false); }
TEST_CASE("gpu: bf16 forward and backward are close to the CPU reference") { compare_all(true); }

// ---- attention alone: the kernel chosen by mot_attn_tensor_cores against attention_forward /
// attention_backward in double, on random q, k, v, dO (q, k at the unit RMS QK-norm leaves them,
// times 1.5, so the softmax is far from uniform: logits of std ~2.2). Returns the worst of the
// four relative errors ||gpu - ref|| / ||ref|| of o, dq, dk, dv, and prints each. B*T rows in
// grouped order reach sequence order through row_of, as in the model.
//
// Tolerances for the tensor-core kernels (bf16 operands, fp32 accumulation). Every operand of
// the six products is rounded to bf16 once: a relative error of at most 2^-9 = 2e-3 per element,
// ~1.1e-3 rms. Errors of independent elements add in quadrature, as the signal does, so o (made
// from rounded q, k, P and v) lands near 2e-3; dV likewise. dS = P (dP - delta) subtracts the
// row mean of dP, which cancels part of the signal and magnifies the relative error of dP, so dQ
// and dK are a few times worse (~5e-3). Measured through the CPU layer: o and dV 3.3e-3..4.0e-3,
// dQ and dK 5.5e-3..5.9e-3 at head dims 64 and 128. Tolerances: 1e-2 for o and dV, 2e-2 for dQ
// and dK, two to four times that, while an indexing, masking or scaling bug gives errors of
// order 1 (a key off by one tile, a wrong scale or a missing rescale each give > 0.1).
// The fp32 kernels are held to 1e-5 (float rounding only), which is also how the fallback is seen.
template <int DH>
static double attn_compare(const char* name, int H, int B, int T, std::vector<int> mods, bool bf16, double tol_o,
                           double tol_d) {
    MotConfig c = small_config(DH * H, H, 3, T);
    MotGpu g;
    std::string err;
    REQUIRE_MESSAGE(mot_gpu_init(&g, c, B, T, bf16, &err), err);
    const MotBatch b = random_batch(c, B, T, 31 + T, mods);
    mot_gpu_set_batch(&g, b);
    const int N = B * T, D = c.d_model;
    const size_t ND = (size_t)N * D;
    uint64_t seed = 77 + DH + T;
    std::vector<double> in[4];  // q, k, v, dO (grouped rows)
    for (int a = 0; a < 4; a++) {
        in[a].resize(ND);
        for (double& x : in[a]) x = (a < 2 ? 1.5 : 1.0) * mot_rand_normal(&seed);
    }
    // the reference in double
    std::vector<double> att((size_t)B * H * T * T), o(ND), dq(ND), dk(ND), dv(ND);
    attention_forward(o.data(), att.data(), in[0].data(), in[1].data(), in[2].data(), b, D, H);
    attention_backward(dq.data(), dk.data(), dv.data(), in[3].data(), att.data(), in[0].data(), in[1].data(),
                       in[2].data(), b, D, H);
    // the GPU
    float* dev[8];  // q k v dO o dq dk dv
    for (float*& p : dev) MOT_CUDA_CHECK(cudaMalloc(&p, ND * sizeof(float)));
    float* lse2 = nullptr;
    MOT_CUDA_CHECK(cudaMalloc(&lse2, (size_t)N * H * sizeof(float)));
    for (int a = 0; a < 4; a++) {
        std::vector<float> f(in[a].begin(), in[a].end());
        MOT_CUDA_CHECK(cudaMemcpy(dev[a], f.data(), ND * sizeof(float), cudaMemcpyHostToDevice));
    }
    MotBuf ob, dvb;
    ob.f = dev[4];
    dvb.f = dev[7];
    mot_attn_forward_dh<DH>(&g, ob, lse2, dev[0], dev[1], dev[2]);
    mot_attn_delta_kernel<<<mot_blocks((size_t)N * H, 256), 256, 0, g.stream>>>(g.delta, dev[3], dev[4], g.row_of, B, T,
                                                                                 H, DH);
    MOT_LAUNCH_CHECK();
    mot_attn_backward_dh<DH>(&g, dev[5], dev[6], dvb, dev[3], lse2, dev[0], dev[1], dev[2]);
    const std::vector<double>* ref[4] = {&o, &dq, &dk, &dv};
    const char* what[4] = {"o", "dq", "dk", "dv"};
    double worst = 0;
    printf("attention %s %s (%s), Dh=%d H=%d B=%d T=%d:", name, bf16 ? "bf16" : "fp32",
           mot_attn_tensor_cores(bf16, DH) ? "tensor cores" : "fp32 kernels", DH, H, B, T);
    for (int a = 0; a < 4; a++) {
        std::vector<float> got(ND);
        MOT_CUDA_CHECK(cudaMemcpy(got.data(), dev[4 + a], ND * sizeof(float), cudaMemcpyDeviceToHost));
        CHECK(all_finite(got));
        // T = 1: softmax over one key has no gradient, so dq and dk are zero in the reference;
        // measure them against the size of dv instead
        const bool zero = std::all_of(ref[a]->begin(), ref[a]->end(), [](double x) { return x == 0; });
        auto norm = [](const auto& x) {
            double s = 0;
            for (double e : x) s += e * e;
            return std::sqrt(s);
        };
        std::vector<float> r(ref[a]->begin(), ref[a]->end());
        const double e = zero ? norm(got) / norm(dv) : rel_err(got.data(), r.data(), ND);
        printf(" %s %.2e", what[a], e);
        INFO(name, ": ", what[a], " rel err ", e);
        CHECK(e <= (a == 0 || a == 3 ? tol_o : tol_d));
        worst = std::max(worst, e);
    }
    printf("\n");
    for (float* p : dev) MOT_CUDA_CHECK(cudaFree(p));
    MOT_CUDA_CHECK(cudaFree(lse2));
    mot_gpu_free(&g);
    return worst;
}

TEST_CASE("gpu: tensor-core attention (bf16) matches the CPU reference; the rule picks it at head dims 64, 128") {
    for (int dh : {2, 4, 8, 16, 32, 64, 128}) {
        CHECK(!mot_attn_tensor_cores(false, dh));  // fp32 mode keeps the exact kernels
        CHECK(mot_attn_tensor_cores(true, dh) == (dh == 64 || dh == 128));
    }
    CHECK(mot_attn_kernel_note(true, 32).find("head dim 32 has no tensor-core kernel") != std::string::npos);
    // T not a multiple of the 64-row / 32-column tiles, B = 1 and B > 1, mixed and one-modality batches
    const double TO = 1e-2, TD = 2e-2;
    attn_compare<64>("mixed", 2, 2, 77, {0, 1, 2}, true, TO, TD);
    attn_compare<64>("B=1 text only", 1, 1, 130, {0}, true, TO, TD);
    attn_compare<64>("T=1", 2, 3, 1, {0, 1, 2}, true, TO, TD);
    attn_compare<128>("mixed", 2, 2, 45, {0, 1, 2}, true, TO, TD);
    attn_compare<128>("B=1 image and speech", 1, 1, 97, {1, 2}, true, TO, TD);
    // the same shapes through the fp32 kernels (fp32 mode): float rounding only
    attn_compare<64>("mixed", 2, 2, 77, {0, 1, 2}, false, 1e-5, 1e-5);
    attn_compare<128>("mixed", 2, 2, 45, {0, 1, 2}, false, 1e-5, 1e-5);
    // the fallback: head dim 32 in bf16 runs the fp32 kernels, so it meets the fp32 tolerance
    attn_compare<32>("fallback", 2, 2, 77, {0, 1, 2}, true, 1e-5, 1e-5);
}

TEST_CASE("gpu: a model with experts is refused with a reason, not computed wrong") {
    MotConfig c = small_config(64, 4, 3, 16);
    c.n_expert[0] = 4;
    MotGpu g;
    std::string err;
    CHECK_FALSE(mot_gpu_init(&g, c, 2, 16, false, &err));
    CHECK(err.find("experts") != std::string::npos);
}

TEST_CASE("gpu: backward accumulates (two backward passes = twice the gradient)") {
    const MotConfig c = small_config(64, 4, 3, 40);
    MotModel<float> cpu;
    mot_init(&cpu, c, 5);
    randomize(&cpu, 9);
    MotBatch b = random_batch(c, 2, 40, 21);
    MotGpu g;
    std::string err;
    REQUIRE_MESSAGE(mot_gpu_init(&g, c, 2, 40, false, &err), err);
    mot_gpu_upload(&g, cpu);
    mot_gpu_zero_grad(&g);
    mot_gpu_forward(&g, b);
    mot_gpu_backward(&g);
    std::vector<float> one, two;
    mot_gpu_grads(&g, &one);
    mot_gpu_forward(&g, b);
    mot_gpu_backward(&g);
    mot_gpu_grads(&g, &two);
    for (float& x : one) x *= 2;
    CHECK(rel_err(two.data(), one.data(), one.size()) <= 1e-6);
    mot_gpu_free(&g);
}

// A debug state written here from the CPU reference, as `./mot --debug-state FILE` writes one:
// parameters, one batch, and the logits, losses and gradients of one forward and backward.
static std::string write_own_debug_state() {
    const MotConfig c = small_config(64, 4, 3, 48);
    MotModel<float> m;
    mot_init(&m, c, 17);
    randomize(&m, 23);
    MotBatch b = random_batch(c, 2, 48, 31);
    mot_forward(&m, b);
    mot_zero_grad(&m);
    mot_backward(&m, b);
    char path[] = "/tmp/mot_test_gpu_debug_XXXXXX";
    const int fd = mkstemp(path);
    REQUIRE(fd >= 0);
    close(fd);
    std::string err;
    REQUIRE_MESSAGE(mot_write_debug_state(path, mot_debug_capture(m, b), &err), err);
    return path;
}

// The GPU (fp32) must reproduce a debug state's logits, losses and gradients from its parameters
// and batch.
TEST_CASE("gpu: debug state file") {
    const bool own = g_debug_state.empty();
    const std::string path = own ? write_own_debug_state() : g_debug_state;
    MotDebugState d;
    std::string err;
    REQUIRE_MESSAGE(mot_read_debug_state(path, &d, &err), err);
    if (own) remove(path.c_str());
    printf("debug state %s%s: L=%d D=%d H=%d V=%d B=%d T=%d\n", path.c_str(), own ? " (written by this test)" : "",
           d.cfg.n_layer, d.cfg.d_model, d.cfg.n_head, d.cfg.vocab, d.B, d.T);
    MotModel<float> host;
    mot_init(&host, d.cfg, 1);
    host.params = d.params;
    MotBatch b;
    b.B = d.B; b.T = d.T; b.tokens = d.tokens; b.targets = d.targets;
    mot_group(d.cfg, &b);
    MotGpu g;
    REQUIRE_MESSAGE(mot_gpu_init(&g, d.cfg, d.B, d.T, false, &err), err);
    mot_gpu_upload(&g, host);
    mot_gpu_zero_grad(&g);
    const double loss = mot_gpu_forward(&g, b);
    mot_gpu_backward(&g);
    std::vector<float> grads, logits;
    mot_gpu_grads(&g, &grads);
    mot_gpu_logits(&g, b, &logits);
    printf("  loss gpu %.7f file %.7f\n", loss, d.loss);
    CHECK(rel1(loss, d.loss) <= TOL_FP32_LOSS);
    for (int m = 0; m < MOT_N_MOD; m++) {
        INFO("modality ", MOT_MOD_NAME[m]);
        CHECK(g.n_mod[m] == d.n_mod[m]);
        if (d.n_mod[m]) CHECK(rel1(g.loss_mod[m], d.loss_mod[m]) <= TOL_FP32_LOSS);
    }
    const double el = rel_err(logits.data(), d.logits.data(), d.logits.size());
    printf("  logits rel err %.3e\n", el);
    CHECK(el <= TOL_FP32_LOGITS);
    check_grads(g.tab, grads, d.grads, TOL_FP32_GRAD, "debug state");
    mot_gpu_free(&g);
}

// Ten AdamW steps on fresh batches, CPU and GPU from the same initial parameters. Adam divides
// by sqrt(v), so an element whose gradient is near zero can move by ~lr on one side and not
// the other; losses still agree closely over 10 steps (fp32 1e-3, bf16 3e-2 relative).
static void train_compare(bool bf16, int d_model = 64, int n_head = 4) {
    const MotConfig c = small_config(d_model, n_head, 3, 48);
    const int B = 3, T = 48;
    MotModel<float> cpu;
    mot_init(&cpu, c, 3);
    MotGpu g;
    std::string err;
    REQUIRE_MESSAGE(mot_gpu_init(&g, c, B, T, bf16, &err), err);
    mot_gpu_upload(&g, cpu);
    MotOptim o;
    o.lr = 3e-3; o.warmup = 3; o.steps = 10;
    const double tol = bf16 ? 3e-2 : 1e-3;
    for (int step = 0; step < o.steps; step++) {
        MotBatch b = random_batch(c, B, T, 100 + step);
        const double lc = mot_forward(&cpu, b);
        mot_zero_grad(&cpu);
        mot_backward(&cpu, b);
        const double nc = mot_adamw_step(&cpu, o, step);
        mot_gpu_zero_grad(&g);
        const double lg = mot_gpu_forward(&g, b);
        mot_gpu_backward(&g);
        const double ng = mot_gpu_adamw_step(&g, o, step, 1.0);
        printf("  %s step %2d: loss gpu %.6f cpu %.6f | grad norm gpu %.6f cpu %.6f\n", bf16 ? "bf16" : "fp32", step + 1,
               lg, lc, ng, nc);
        INFO("step ", step + 1);
        CHECK(rel1(lg, lc) <= tol);
        CHECK(rel1(ng, nc) <= 10 * tol);
    }
    MotModel<float> back;
    mot_init(&back, c, 0);
    mot_gpu_download(&g, &back);
    const double ep = rel_err(back.params.data(), cpu.params.data(), cpu.params.size());
    printf("  %s parameters after 10 steps: rel err %.3e\n", bf16 ? "bf16" : "fp32", ep);
    CHECK(ep <= (bf16 ? 5e-2 : 1e-2));
    mot_gpu_free(&g);
}
TEST_CASE("gpu: 10 fp32 training steps follow the CPU reference") { train_compare(false); }
TEST_CASE("gpu: 10 bf16 training steps stay close to the CPU reference") { train_compare(true); }
// head dim 64: attention on tensor cores (head dim 16 above runs the fp32 kernels)
TEST_CASE("gpu: 10 bf16 training steps with tensor-core attention stay close to the CPU reference") {
    REQUIRE(mot_attn_tensor_cores(true, 64));
    train_compare(true, 128, 2);
}

// Same seed, same batches -> bitwise the same losses, gradient norms and parameters.
static void run_steps(const MotConfig& c, bool bf16, int steps, std::vector<double>* trace, std::vector<float>* params) {
    MotModel<float> init;
    mot_init(&init, c, 11);
    MotGpu g;
    std::string err;
    REQUIRE_MESSAGE(mot_gpu_init(&g, c, 4, 64, bf16, &err), err);
    mot_gpu_upload(&g, init);
    MotOptim o;
    o.warmup = 2; o.steps = steps;
    for (int s = 0; s < steps; s++) {
        MotBatch b = random_batch(c, 4, 64, 500 + s);
        mot_gpu_zero_grad(&g);
        trace->push_back(mot_gpu_forward(&g, b));
        mot_gpu_backward(&g);
        trace->push_back(mot_gpu_adamw_step(&g, o, s, 0.5));
    }
    MotModel<float> back;
    mot_init(&back, c, 0);
    mot_gpu_download(&g, &back);
    *params = back.params;
    mot_gpu_free(&g);
}
TEST_CASE("gpu: same seed gives bitwise the same run") {
    const MotConfig c = small_config(128, 2, 3, 64);
    for (bool bf16 : {false, true}) {
        INFO((bf16 ? "bf16" : "fp32"));
        std::vector<double> t1, t2;
        std::vector<float> p1, p2;
        run_steps(c, bf16, 5, &t1, &p1);
        run_steps(c, bf16, 5, &t2, &p2);
        REQUIRE(t1.size() == t2.size());
        CHECK(memcmp(t1.data(), t2.data(), t1.size() * sizeof(double)) == 0);
        REQUIRE(p1.size() == p2.size());
        CHECK(memcmp(p1.data(), p2.data(), p1.size() * sizeof(float)) == 0);
    }
}

int main(int argc, char** argv) {
    // our own flag first; the rest goes to doctest
    std::vector<char*> args;
    for (int i = 0; i < argc; i++) {
        if (std::string(argv[i]) == "--debug-state" && i + 1 < argc) { g_debug_state = argv[++i]; continue; }
        args.push_back(argv[i]);
    }
    doctest::Context ctx;
    ctx.applyCommandLine((int)args.size(), args.data());
    std::string why;
    if (!mot_gpu_available(&why)) {
        printf("no GPU: %s; GPU tests skipped\n", why.c_str());
        ctx.addFilter("test-case-exclude", "gpu:*");
    }
    return ctx.run();
}
