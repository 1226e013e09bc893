// dev/diffusion_t.cpp — a Transfusion model's denoising error per diffusion step t: the
// "known trap at small scale" check of diffusion (the model learns the low-noise end first): look
// at the error per t bucket, not only the loss. For the first N images of a pixel shard, each as
// `BOS BOI <49 patches> EOI` (no caption: the unconditional prefix), noised at one t for all
// patches with fixed noise (the same for every model), it prints per t the noise MSE
// mean (eps_hat - eps)^2 and the MSE of the x0 it implies, clip((x_t - sqrt(1 - abar) eps_hat) /
// sqrt(abar), -1, 1) as DDIM computes it, against the real image, beside the all-black guess's.
//
//   make dev/diffusion_t && ./dev/diffusion_t CKPT SHARD [N_IMAGES (20)] [THREADS (1)]
//   e.g. ./dev/diffusion_t runs/tf/model.ckpt 'data/default/small/tf_val_000.bin'
#include "mot.h"

[[noreturn]] static void die(const std::string& m) {
    fprintf(stderr, "diffusion_t: %s\n", m.c_str());
    exit(1);
}

int main(int argc, char** argv) {
    if (argc < 3 || argc > 5) die("usage: diffusion_t CKPT SHARD [N_IMAGES] [THREADS]");
    const int n_img = argc > 3 ? atoi(argv[3]) : 20;
    if (n_img < 1 || n_img > 10000) die(std::string("bad N_IMAGES '") + argv[3] + "' (1..10000)");
    omp_set_num_threads(argc > 4 ? std::max(1, atoi(argv[4])) : 1);
    std::string err;
    MotConfig c;
    if (!mot_read_checkpoint_config(argv[1], &c, &err)) die(err);
    if (!mot_transfusion(c)) die(std::string(argv[1]) + ": not a Transfusion model (setting 0)");
    const int T = MOT_IMAGE_POS + 3, P = MOT_PATCH;
    if (c.max_seq < T) die(std::string(argv[1]) + ": max_seq " + std::to_string(c.max_seq) + " < 52");
    MotModel<float> m;
    mot_init(&m, c, 1);
    if (!mot_load_checkpoint(argv[1], &m, nullptr, nullptr, &err)) die(err);
    MotShard sh;
    if (!mot_read_shard(argv[2], &sh, &err)) die(err);
    if (!sh.pixels_version) die(std::string(argv[2]) + ": a token shard (version 1), not pixels");
    if (sh.image_at.size() < (size_t)n_img)
        die(std::string(argv[2]) + " has " + std::to_string(sh.image_at.size()) + " images, fewer than " +
            std::to_string(n_img));
    // x0 of every patch of every image, and one fixed noise draw used at every t
    std::vector<float> x0((size_t)n_img * MOT_IMAGE_POS * P), img(MOT_IMAGE_PIXELS), noise(x0.size());
    for (int k = 0; k < n_img; k++) {
        for (int q = 0; q < MOT_IMAGE_PIXELS; q++) img[q] = sh.pixels[(size_t)k * MOT_IMAGE_PIXELS + q] / 127.5f - 1.0f;
        mot_image_to_patches(img.data(), x0.data() + (size_t)k * MOT_IMAGE_POS * P);
    }
    uint64_t rng = 0xD1FF;
    for (float& e : noise) e = float(mot_rand_normal(&rng));
    double black = 0;
    for (float v : x0) black += (v + 1.0) * (v + 1.0);
    black /= x0.size();
    printf("%s: %d images of %s, prefix BOS BOI, fixed noise; all-black guess x0 MSE %.3f\n", argv[1], n_img, argv[2],
           black);
    printf("%6s %10s %10s %10s\n", "t", "SNR", "noise MSE", "x0 MSE");
    MotBatch b;
    b.B = n_img;
    b.T = T;
    double se_sum = 0, x0_sum = 0;
    const int grid[] = {1, 10, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 950, 1000};
    for (int t : grid) {
        b.tokens.assign((size_t)n_img * T, 0);
        b.targets.assign((size_t)n_img * T, MOT_IGNORE);
        b.tstep.assign((size_t)n_img * T, 0);
        b.xin.assign((size_t)n_img * T * P, 0.0f);
        b.eps.assign((size_t)n_img * T * P, 0.0f);
        for (int k = 0; k < n_img; k++) {
            int32_t* tok = b.tokens.data() + (size_t)k * T;
            tok[0] = MOT_BOS;
            tok[1] = MOT_BOI;
            for (int p = 0; p < MOT_IMAGE_POS; p++) {
                const size_t i = (size_t)k * T + 2 + p, src = ((size_t)k * MOT_IMAGE_POS + p) * P;
                tok[2 + p] = c.image_begin;
                b.tstep[i] = t;
                std::copy(noise.begin() + src, noise.begin() + src + P, b.eps.begin() + i * P);
                mot_noise_patch(&b.xin[i * P], &x0[src], &noise[src], t, P);
            }
            tok[T - 1] = MOT_EOI;
        }
        mot_group(c, &b);
        mot_forward(&m, b);
        const double a = mot_abar(t);
        double se = 0, xe = 0;
        for (int k = 0; k < n_img; k++)
            for (int p = 0; p < MOT_IMAGE_POS; p++) {
                const size_t i = (size_t)k * T + 2 + p, src = ((size_t)k * MOT_IMAGE_POS + p) * P;
                const float* eh = m.act.eps_hat + (size_t)b.row_of[i] * P;
                for (int j = 0; j < P; j++) {
                    const double d = eh[j] - b.eps[i * P + j];
                    const double xh = std::min(1.0, std::max(-1.0, (b.xin[i * P + j] - sqrt(1 - a) * eh[j]) / sqrt(a)));
                    se += d * d;
                    xe += (xh - x0[src + j]) * (xh - x0[src + j]);
                }
            }
        se /= x0.size();
        xe /= x0.size();
        se_sum += se;
        x0_sum += xe;
        printf("%6d %10.3g %10.4f %10.4f%s\n", t, a / (1 - a), se, xe, xe > black ? "  (worse than black)" : "");
    }
    const int ng = sizeof grid / sizeof grid[0];
    printf("%6s %10s %10.4f %10.4f  (mean over the %d steps)\n", "mean", "", se_sum / ng, x0_sum / ng, ng);
    return 0;
}
