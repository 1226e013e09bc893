// bench_cpu.cpp — CPU reference speed: one training step (forward + backward + AdamW) in fp32 and
// in bf16 mode (--bf16, on the machine's bf16 engine), dense, MoT, MoE-4x, MoMa-style (4t4i4s) and
// the MoT+MoE hybrid side by side on the same shape and the same tokens; then the Transfusion
// setting (images as pixel patches, diffusion loss) on the same shape against the token setting,
// and the time to sample one image with 50 DDIM steps on the CPU main job's model.
//
//   make bench          (or: ./dev/bench_cpu [D L H F T B V steps])
//
// FLOPs per step (matmuls and attention; elementwise work and AdamW not counted):
//   forward  = 2N L (4D^2 + 3DF) + 2N D V + L * 2 B T(T+1) D      (N = B T tokens)
//   step     = 3 * forward                                        (backward = 2x forward)
// MoT and dense do the same FLOPs per token; MoT only splits each projection by modality. The
// expert models too, up to the routers (2 E D per row and layer, forward) and capacity rounding.
#include "mot.h"

#include <chrono>
#include <cstdlib>
#include <vector>

static double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int main(int argc, char** argv) {
    int D = 256, L = 4, H = 8, F = 768, T = 256, B = 4, V = 4096, steps = 10;
    int* vals[] = {&D, &L, &H, &F, &T, &B, &V, &steps};
    for (int i = 1; i < argc && i <= 8; i++) *vals[i - 1] = atoi(argv[i]);
    printf("shape: D=%d L=%d H=%d F=%d T=%d B=%d V=%d, %d threads, best of %d steps after 1 warmup\n", D, L, H, F, T, B,
           V, omp_get_max_threads(), steps);
    printf("bf16 engine: %s\n", mot_bf16_engine_note().c_str());
    const double N = (double)B * T;
    const double fwd = 2 * N * L * (4.0 * D * D + 3.0 * D * F) + 2 * N * D * V + L * 2.0 * B * T * (T + 1.0) * D;
    const double flops = 3 * fwd;
    printf("FLOPs per step: %.2f G (%.1f M per token)\n", flops / 1e9, flops / N / 1e6);
    // The architectures at the same FLOPs per token (experts: capacity factor 1, so E C ~ n rows
    // pass through an expert; the router adds 2 E D per row). Steps are taken round-robin, one per
    // model in turn, so that a slow phase of a shared machine hits every model alike; the best of
    // 10 (not 5): with 5, the 2-thread ratios of six runs on a quiet machine spread by up to 11%.
    struct Arch {
        const char* name;
        int towers, tie_attn;
        int experts[3];
        int setting;
    };
    const Arch archs[] = {{"dense", 1, 0, {1, 1, 1}, 0},     {"MoT", 3, 0, {1, 1, 1}, 0},
                          {"MoE-4x", 1, 0, {4, 1, 1}, 0},    {"MoMa-4t4i4s", 3, 1, {4, 4, 4}, 0},
                          {"hybrid-4t", 3, 0, {4, 1, 1}, 0}, {"dense-tf", 1, 0, {1, 1, 1}, 1},
                          {"MoT-tf", 3, 0, {1, 1, 1}, 1}};
    const int K = sizeof archs / sizeof archs[0];
    // model a in fp32, model K + a the same in bf16 mode
    std::vector<MotModel<float>> models(2 * K);
    std::vector<MotBatch> batches(K);
    std::vector<double> best(2 * K, 1e30);
    for (int a = 0; a < K; a++) {
        MotConfig c;
        c.n_layer = L;
        c.d_model = D;
        c.n_head = H;
        c.d_ff = F;
        c.vocab = V;
        c.max_seq = T;
        c.image_begin = V / 2;
        c.speech_begin = 3 * V / 4;
        c.n_tower = archs[a].towers;
        c.tie_attn = archs[a].tie_attn;
        for (int f = 0; f < 3; f++) c.n_expert[f] = archs[a].experts[f];
        c.setting = archs[a].setting;
        mot_init(&models[a], c, 1);
        models[K + a] = models[a];
        models[K + a].bf16 = true;
        MotBatch& b = batches[a];  // a realistic mix: 35% text, 40% image, 25% speech, in runs like documents
        b.B = B;
        b.T = T;
        uint64_t rng = 7;
        for (int i = 0; i < B * T; i++) {
            double u = ((i / 32) * 0.618034) - (long)((i / 32) * 0.618034);
            int lo = u < 0.35 ? 0 : u < 0.75 ? c.image_begin : c.speech_begin;
            int hi = u < 0.35 ? c.image_begin : u < 0.75 ? c.speech_begin : V;
            b.tokens.push_back(lo + (int)(mot_rand_u64(&rng) % (hi - lo)));
        }
        for (int i = 0; i < B * T; i++) b.targets.push_back(i + 1 < B * T ? b.tokens[i + 1] : 0);
        mot_group(c, &b);
        if (c.setting == MOT_SETTING_TRANSFUSION) {  // each image run a block of patches with its own t
            b.tstep.assign(B * T, 0);
            b.xin.resize((size_t)B * T * MOT_PATCH);
            b.eps.resize((size_t)B * T * MOT_PATCH);
            for (int i = 0; i < B * T; i++)
                b.tstep[i] = mot_modality(c, b.tokens[i]) == MOD_IMAGE ? 1 + (i / 32) % 1000 : 0;
            for (size_t i = 0; i < b.xin.size(); i++) {
                b.xin[i] = float(mot_rand_normal(&rng));
                b.eps[i] = float(mot_rand_normal(&rng));
            }
        }
    }
    MotOptim o;
    for (int s = 0; s <= steps; s++)
        for (int a = 0; a < 2 * K; a++) {
            MotModel<float>& m = models[a];
            const double t0 = now_s();
            mot_forward(&m, batches[a % K]);
            mot_backward(&m, batches[a % K], false);  // as the trainer: no zeroing pass
            mot_adamw_step(&m, o, s);
            const double dt = now_s() - t0;
            if (s > 0) best[a] = std::min(best[a], dt);
        }
    for (int a = 0; a < 2 * K; a++) {
        const int base = a < K ? 0 : K;  // dense in the same precision
        printf(
            "%-12s %s %6.1fM params | step %7.1f ms | %7.0f tokens/s | %6.1f GFLOP/s | / dense %.3f | fp32 / bf16 %s\n",
            archs[a % K].name, a < K ? "fp32" : "bf16", models[a].tab.total / 1e6, best[a] * 1e3, N / best[a],
            flops / best[a] / 1e9, best[a] / best[base],
            a < K ? "  -  " : std::to_string(best[a - K] / best[a]).substr(0, 5).c_str());
    }
    printf("MoT / dense step time: fp32 %.3f, bf16 %.3f\n", best[1] / best[0], best[K + 1] / best[K]);
    printf("bf16 speed-up (fp32 / bf16 step time): dense %.3f, MoT %.3f\n", best[0] / best[K], best[1] / best[K + 1]);
    printf("Transfusion / token setting step time: MoT %.3f, dense %.3f (target <= 1.1)\n", best[6] / best[1],
           best[5] / best[0]);

    // Sampling one image by DDIM on the CPU main job's model (make train: L=4, D=128, H=4, F=384,
    // T=128, the dataset's V=2824): a 6-token prompt, 50 steps over the 49 patches at once, with
    // guidance (two KV caches, 100 block passes) and without.
    MotConfig c;
    c.n_layer = 4;
    c.d_model = 128;
    c.n_head = 4;
    c.d_ff = 384;
    c.max_seq = 128;
    c.vocab = 2824;
    c.image_begin = 2056;
    c.speech_begin = 2568;
    c.setting = MOT_SETTING_TRANSFUSION;
    MotModel<float> m;
    mot_init(&m, c, 1);
    std::vector<float> lg(c.vocab), x(MOT_IMAGE_POS * MOT_PATCH);
    for (int guided = 1; guided >= 0; guided--) {
        double bt = 1e30;
        for (int rep = 0; rep < 3; rep++) {
            const double t0 = now_s();
            MotKVCache<float> kv, kvu;
            mot_kv_init(&kv, c, c.max_seq);
            mot_kv_init(&kvu, c, c.max_seq);
            for (int t : {(int)MOT_BOS, 100, 200, 300, 400, (int)MOT_BOI}) mot_decode_step(&m, &kv, t, lg.data());
            for (int t : {MOT_BOS, MOT_BOI}) mot_decode_step(&m, &kvu, t, lg.data());
            uint64_t r = 3;
            for (float& v : x) v = float(mot_rand_normal(&r));
            mot_ddim_image(&m, &kv, guided ? &kvu : nullptr, MOT_IMAGE_POS, 50, 3.0, x.data());
            bt = std::min(bt, now_s() - t0);
        }
        printf("DDIM sample, main-job model (L=4 D=128), 50 steps, %s: %.3f s per image (target < 1 s)\n",
               guided ? "guidance 3 (2 x 50 block passes)" : "no guidance", bt);
    }
    return 0;
}
