// test_transfusion.cpp — the Transfusion setting (dev/MATH.md, section 7): gradients against
// finite differences with the noise and t fixed, the image-block attention mask, which positions
// the losses count, the cosine schedule, DDIM, and the KV-cached denoising step against the full
// forward.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "mot.h"
#include "test/common.h"

// text [0,12), image [12,18) (any image id marks an image position), speech [18,24)
static MotConfig tiny_tf(int towers, int tie_attn = 0, int tie_ffn = 0, int tie_norm = 0) {
    MotConfig c;
    c.n_layer = 2;
    c.d_model = 8;
    c.n_head = 2;
    c.d_ff = 12;
    c.vocab = 24;
    c.image_begin = 12;
    c.speech_begin = 18;
    c.max_seq = 24;
    c.n_tower = towers;
    c.tie_attn = tie_attn;
    c.tie_ffn = tie_ffn;
    c.tie_norm = tie_norm;
    c.setting = MOT_SETTING_TRANSFUSION;
    return c;
}

static double eps_hat_at(const MotModel<double>& m, const MotBatch& b, int i, int j) {
    return m.act.eps_hat[(size_t)b.row_of[i] * MOT_PATCH + j];
}

// Every tensor of every layer and copy, w_in b_in w_t w_out b_out included: ||fd - analytic|| /
// ||analytic|| <= 1e-6 (central differences, step 1e-5, in double). One image of each sequence is
// noised, one clean, so the clean image's positions must add nothing. diff_loss: the weighting of
// the diffusion term (min-SNR: t = 700 has weight 1, t = 150 about 0.31, t = 35 about 0.02).
static void gradient_check(const MotConfig& c, int diff_loss = MOT_DIFF_MSE, std::vector<int> ts = {700, 0, 35}) {
    omp_set_num_threads(1);
    MotModel<double> m;
    mot_init(&m, c, 7);
    randomize(&m, 11);
    m.diff_loss = diff_loss;
    MotBatch b = tf_batch(c, 2, 16, 3, ts);
    REQUIRE(b.group[1] > b.group[0]);
    REQUIRE(b.group[2] > b.group[1]);
    REQUIRE(b.group[3] > b.group[2]);
    mot_forward(&m, b);
    REQUIRE(m.n_mod[MOD_IMAGE] > 0);
    REQUIRE(m.n_mod[MOD_TEXT] > 0);
    REQUIRE(m.n_mod[MOD_SPEECH] > 0);
    mot_zero_grad(&m);
    mot_backward(&m, b);
    const double h = 1e-5;
    int checked = 0;
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
                INFO(std::string(info.name), " layer ", l, " copy ", k);
                REQUIRE(den > 0);
                CHECK(std::sqrt(num / den) <= 1e-6);
                checked++;
            }
        if (p >= P_WIN) CHECK(info.copies == 1);
    }
    CHECK(checked > 0);
    omp_set_num_threads(omp_get_num_procs());
}

TEST_CASE("Transfusion gradient check: MoT") { gradient_check(tiny_tf(3)); }
TEST_CASE("Transfusion gradient check: dense") { gradient_check(tiny_tf(1)); }
TEST_CASE("Transfusion gradient check: MoT, attention tied") { gradient_check(tiny_tf(3, 1, 0, 0)); }
TEST_CASE("Transfusion gradient check: MoT, FFN and norms tied") { gradient_check(tiny_tf(3, 0, 1, 1)); }
TEST_CASE("Transfusion gradient check: min-SNR weighting, MoT") {
    gradient_check(tiny_tf(3), MOT_DIFF_MIN_SNR, {700, 0, 150, 35});
}
TEST_CASE("Transfusion gradient check: min-SNR weighting, dense") {
    gradient_check(tiny_tf(1), MOT_DIFF_MIN_SNR, {150, 0, 700, 5});
}

TEST_CASE(
    "min-SNR weighting: w(t) = min(SNR, 5) / SNR; loss = LM + 5 weighted MSE; the MSE it reports is plain; mse is today's loss bit for bit") {
    // the weight: 1 from SNR <= 5 (t >= 262 on the cosine schedule) up, min-SNR / SNR below
    for (int t : {1, 50, 200, 261, 262, 500, 1000}) {
        const double a = mot_abar(t), snr = a / (1 - a);
        INFO("t = ", t);
        CHECK(mot_diff_loss_weight(MOT_DIFF_MIN_SNR, t) == doctest::Approx(std::min(snr, 5.0) / snr).epsilon(1e-12));
        CHECK(mot_diff_loss_weight(MOT_DIFF_MSE, t) == 1.0);
    }
    CHECK(mot_diff_loss_weight(MOT_DIFF_MIN_SNR, 261) < 1);
    CHECK(mot_diff_loss_weight(MOT_DIFF_MIN_SNR, 262) == 1);
    CHECK(mot_diff_loss_weight(MOT_DIFF_MIN_SNR, 1) < 1e-3);
    for (int t = 2; t <= 1000; t++)  // never decreasing in t: low noise is what loses weight
        CHECK(mot_diff_loss_weight(MOT_DIFF_MIN_SNR, t) >= mot_diff_loss_weight(MOT_DIFF_MIN_SNR, t - 1));

    MotConfig c = tiny_tf(3);
    MotModel<double> m;
    mot_init(&m, c, 1);
    randomize(&m, 2);
    const int T = 20, P = MOT_PATCH;
    MotBatch b = tf_batch(c, 2, T, 5, {300, 0, 40, 120});
    const int N = b.B * T;
    // mse: exactly today's formulas, loss = loss_lm + 5 MSE and deps = 5 * 2 (eps_hat - eps) / (n 16)
    mot_forward(&m, b);
    const int n = m.n_mod[MOD_IMAGE];
    REQUIRE(n > 0);
    CHECK(m.loss == m.loss_lm + MOT_DIFF_WEIGHT * m.loss_mod[MOD_IMAGE]);
    for (int i = 0; i < N; i++)
        if (mot_modality(c, b.tokens[i]) == MOD_IMAGE)
            for (int j = 0; j < P; j++) {
                const double d = eps_hat_at(m, b, i, j) - b.eps[(size_t)i * P + j];
                CHECK(m.act.deps[(size_t)b.row_of[i] * P + j] ==
                      (b.tstep[i] > 0 ? MOT_DIFF_WEIGHT * 2 * d / ((double)n * P) : 0.0));
            }
    const double loss_mse = m.loss, lm = m.loss_lm, mse = m.loss_mod[MOD_IMAGE];
    mot_zero_grad(&m);
    mot_backward(&m, b);
    const std::vector<double> g_mse = m.grads;
    // min-SNR: the same MSE and LM loss reported, the objective weighted by hand
    m.diff_loss = MOT_DIFF_MIN_SNR;
    mot_forward(&m, b);
    CHECK(m.loss_lm == lm);
    CHECK(m.loss_mod[MOD_IMAGE] == mse);
    CHECK(m.n_mod[MOD_IMAGE] == n);
    double wse = 0;
    for (int i = 0; i < N; i++)
        if (mot_modality(c, b.tokens[i]) == MOD_IMAGE && b.tstep[i] > 0)
            for (int j = 0; j < P; j++) {
                const double d = eps_hat_at(m, b, i, j) - b.eps[(size_t)i * P + j];
                wse += mot_diff_loss_weight(MOT_DIFF_MIN_SNR, b.tstep[i]) * d * d;
            }
    CHECK(m.loss == doctest::Approx(lm + 5 * wse / ((double)n * P)).epsilon(1e-12));
    CHECK(m.loss < loss_mse);  // t = 40, 120 lose weight, t = 300 keeps it
    mot_zero_grad(&m);
    mot_backward(&m, b);
    CHECK(m.grads != g_mse);
    // with every t at 262 or more, min-SNR is the plain MSE, bit for bit
    MotBatch hi = tf_batch(c, 2, T, 5, {300, 0, 262, 999});
    m.diff_loss = MOT_DIFF_MSE;
    const double l_hi = mot_forward(&m, hi);
    mot_zero_grad(&m);
    mot_backward(&m, hi);
    const std::vector<double> g_hi = m.grads;
    m.diff_loss = MOT_DIFF_MIN_SNR;
    CHECK(mot_forward(&m, hi) == l_hi);
    mot_zero_grad(&m);
    mot_backward(&m, hi);
    CHECK(m.grads == g_hi);
}

TEST_CASE("config: the setting is validated, experts are refused, the token setting has no image-tower tensors") {
    MotConfig c = tiny_tf(3);
    CHECK(mot_config_error(c) == "");
    c.n_expert[0] = 2;
    CHECK(mot_config_error(c).find("experts are not supported in the Transfusion setting") != std::string::npos);
    c = tiny_tf(3);
    c.setting = 2;
    CHECK(mot_config_error(c).find("setting must be") != std::string::npos);
    c = tiny_tf(3);
    MotParamTable tt = mot_param_table(c);
    const int D = c.d_model, P = MOT_PATCH;
    CHECK(tt.p[P_WIN].size() == (size_t)P * D);
    CHECK(tt.p[P_WT].size() == (size_t)D * D);
    CHECK(tt.p[P_WOUT].size() == (size_t)D * P);
    uint64_t n;
    REQUIRE(mot_param_count(c, &n));
    CHECK(n == tt.total);
    c.setting = MOT_SETTING_TOKENS;
    MotParamTable tk = mot_param_table(c);
    CHECK(tt.total - tk.total == (size_t)(2 * P + 1 + D) * D + P);
    CHECK(tk.p[P_HEAD].offset + tk.p[P_HEAD].size() == tk.total);
    MotModel<double> m;
    mot_init(&m, tiny_tf(3), 1);  // biases start at 0
    for (int j = 0; j < D; j++) CHECK(m.param(P_BIN)[j] == 0);
    for (int j = 0; j < P; j++) CHECK(m.param(P_BOUT)[j] == 0);
}

TEST_CASE("losses: LM over token->token positions only, 5x the MSE over noised image positions") {
    MotConfig c = tiny_tf(3);
    MotModel<double> m;
    mot_init(&m, c, 1);
    randomize(&m, 2);
    MotBatch b = tf_batch(c, 1, 20, 5, {300, 0});  // image 1 noised, image 2 clean
    mot_forward(&m, b);
    // counts by hand
    int n_lm = 0, n_img = 0;
    double mse = 0;
    for (int i = 0; i < 20; i++) {
        const bool in_img = mot_modality(c, b.tokens[i]) == MOD_IMAGE,
                   tg_img = mot_modality(c, b.targets[i]) == MOD_IMAGE;
        if (!in_img && !tg_img) n_lm++;
        if (b.tokens[i] == MOT_BOI) CHECK(mot_lm_target(c, b, i) == MOT_IGNORE);
        if (in_img && b.tstep[i] > 0) {
            n_img++;
            for (int j = 0; j < MOT_PATCH; j++) {
                const double d = eps_hat_at(m, b, i, j) - b.eps[(size_t)i * MOT_PATCH + j];
                mse += d * d;
            }
        }
    }
    REQUIRE(n_img == 4);
    CHECK(m.n_valid == n_lm);
    CHECK(m.n_mod[MOD_IMAGE] == n_img);
    CHECK(m.loss_mod[MOD_IMAGE] == doctest::Approx(mse / (n_img * MOT_PATCH)).epsilon(1e-12));
    CHECK(m.loss == doctest::Approx(m.loss_lm + 5 * m.loss_mod[MOD_IMAGE]).epsilon(1e-12));
    // a clean image adds no diffusion loss: changing its noise target changes nothing
    MotBatch b2 = b;
    for (int i = 0; i < 20; i++)
        if (mot_modality(c, b.tokens[i]) == MOD_IMAGE && b.tstep[i] == 0)
            for (int j = 0; j < MOT_PATCH; j++) b2.eps[(size_t)i * MOT_PATCH + j] += 1;
    const double l1 = m.loss;
    CHECK(mot_forward(&m, b2) == l1);
}

TEST_CASE("batch plan: image rows take no embedding, the step lists group them by distinct step") {
    const MotConfig c = tiny_tf(3);
    const MotBatch b = tf_batch(c, 2, 20, 5, {300, 0, 300, 7});
    MotPlan p;
    REQUIRE(mot_plan(c, b, &p) == "");
    CHECK(p.i0 == b.group[MOD_IMAGE]);
    CHECK(p.i1 == b.group[MOD_IMAGE + 1]);
    const int ni = p.i1 - p.i0;
    REQUIRE(ni > 0);
    CHECK((int)p.emb_rows.size() == 40 - ni);
    for (int r : p.emb_rows) CHECK((r < p.i0 || r >= p.i1));
    for (int k = 0; k < 40; k++) CHECK(p.tgt[k] == mot_lm_target(c, b, b.order[k]));
    // steps: distinct and increasing; every image row under its own step, each step's rows increasing
    int noised = 0;
    std::vector<int> seen(ni, 0);
    REQUIRE(p.step_start.size() == p.step_t.size() + 1);
    for (size_t s = 0; s < p.step_t.size(); s++) {
        if (s > 0) CHECK(p.step_t[s - 1] < p.step_t[s]);
        for (int j = p.step_start[s]; j < p.step_start[s + 1]; j++) {
            const int k = p.step_rows[j];
            seen[k]++;
            CHECK(p.step_of[k] == (int)s);
            CHECK(b.tstep[b.order[p.i0 + k]] == p.step_t[s]);
            if (j > p.step_start[s]) CHECK(p.step_rows[j - 1] < k);
        }
    }
    for (int k = 0; k < ni; k++) {
        CHECK(seen[k] == 1);
        noised += b.tstep[b.order[p.i0 + k]] > 0;
    }
    CHECK(p.n_noised == noised);
    CHECK(p.step_t == std::vector<int32_t>{0, 7, 300});
    MotBatch bad = b;
    bad.tstep[b.order[p.i0]] = 1001;
    CHECK(mot_plan(c, bad, &p).find("diffusion step outside") != std::string::npos);
    bad = b;
    bad.eps.pop_back();
    CHECK(mot_plan(c, bad, &p).find("a Transfusion batch needs xin, eps") != std::string::npos);
}

TEST_CASE("mask: a patch sees every patch of its own image and nothing later outside it") {
    MotConfig c = tiny_tf(3);
    MotModel<double> m;
    mot_init(&m, c, 1);
    randomize(&m, 2);
    const int T = 20;
    MotBatch b = tf_batch(c, 1, T, 5, {500}, 4);  // BOS x x BOI [4..7] EOI ...
    REQUIRE(b.tokens[3] == MOT_BOI);
    for (int t = 0; t < T; t++) {
        INFO("position ", t);
        // the second document's image starts at 18 and is cut by the window end: a block of 18..19
        CHECK(b.vis[t] == (t >= 4 && t <= 7 ? 7 : t >= 18 ? 19 : t));
    }
    mot_forward(&m, b);
    std::vector<double> lg0, eh0;
    for (int i = 0; i < T; i++) {
        for (int v = 0; v < c.vocab; v++) lg0.push_back(mot_logit(m, b, i, v));
        for (int j = 0; j < MOT_PATCH; j++)
            eh0.push_back(mot_modality(c, b.tokens[i]) == MOD_IMAGE ? eps_hat_at(m, b, i, j) : 0);
    }
    // change the last patch of the image: the first patch's output changes; no position before the
    // image changes
    MotBatch b2 = b;
    for (int j = 0; j < MOT_PATCH; j++) b2.xin[7 * MOT_PATCH + j] += 0.5f;
    mot_forward(&m, b2);
    bool first_changed = false, before_same = true;
    for (int j = 0; j < MOT_PATCH; j++) first_changed |= eps_hat_at(m, b2, 4, j) != eh0[4 * MOT_PATCH + j];
    for (int i = 0; i < 4; i++)
        for (int v = 0; v < c.vocab; v++) before_same &= mot_logit(m, b2, i, v) == lg0[(size_t)i * c.vocab + v];
    CHECK(first_changed);
    CHECK(before_same);
    // change the token right after the image (EOI -> a text id): no image position changes
    MotBatch b3 = b;
    b3.tokens[8] = 9;
    mot_group(c, &b3);
    mot_forward(&m, b3);
    bool image_same = true;
    for (int i = 4; i <= 7; i++)
        for (int j = 0; j < MOT_PATCH; j++) image_same &= eps_hat_at(m, b3, i, j) == eh0[(size_t)i * MOT_PATCH + j];
    CHECK(image_same);
    // and the timestep of the image reaches its outputs
    MotBatch b4 = b;
    for (int i = 4; i <= 7; i++) b4.tstep[i] = 20;
    mot_forward(&m, b4);
    CHECK(eps_hat_at(m, b4, 4, 0) != eh0[4 * MOT_PATCH]);
}

TEST_CASE("cosine schedule") {
    CHECK(mot_abar(0) == 1.0);
    CHECK(mot_abar(1000) > 2.3e-9);  // 2.429e-9: the clipped betas near t = 1000 keep it above 0
    CHECK(mot_abar(1000) < 2.5e-9);
    CHECK(mot_abar(1000) > 0);
    for (int t = 1; t <= 1000; t++) CHECK_MESSAGE(mot_abar(t) < mot_abar(t - 1), t);
    // f(t)/f(0) where no beta is clipped: abar(500) = cos^2((0.5 + 0.008)/1.008 pi/2) / cos^2(0.008/1.008 pi/2)
    auto f = [](double t) {
        double x = cos((t / 1000 + 0.008) / 1.008 * M_PI / 2);
        return x * x;
    };
    CHECK(mot_abar(500) == doctest::Approx(f(500) / f(0)).epsilon(1e-9));
    float x0[3] = {0.5f, -1, 1}, e[3] = {1, 2, -3}, xt[3];
    mot_noise_patch(xt, x0, e, 0, 3);
    CHECK(xt[1] == -1);
    mot_noise_patch(xt, x0, e, 250, 3);
    CHECK(xt[2] == doctest::Approx(sqrt(mot_abar(250)) - 3 * sqrt(1 - mot_abar(250))));
}

// Prefix tokens of sequence 0 of b (up to and including BOI at position `boi`) into the cache.
static void feed_prefix(MotModel<double>* m, MotKVCache<double>* kv, const MotBatch& b, int boi) {
    mot_kv_init(kv, m->cfg, m->cfg.max_seq);
    std::vector<double> lg(m->cfg.vocab);
    for (int i = 0; i <= boi; i++) REQUIRE(mot_decode_step(m, kv, b.tokens[i], lg.data()));
}

TEST_CASE("KV-cached denoising step equals the full forward; a committed clean image conditions the text after it") {
    for (int towers : {3, 1}) {
        MotConfig c = tiny_tf(towers);
        c.max_seq = 64;
        MotModel<double> m;
        mot_init(&m, c, 3);
        randomize(&m, 4);
        // BOS x x BOI [49 image positions at 4..52] EOI BOA ...
        MotBatch b = tf_batch(c, 1, 60, 9, {640}, MOT_IMAGE_POS);
        mot_forward(&m, b);
        MotKVCache<double> kv;
        feed_prefix(&m, &kv, b, 3);
        std::vector<double> xt(MOT_IMAGE_POS * MOT_PATCH), eh(xt.size()), eh2(xt.size());
        for (size_t j = 0; j < xt.size(); j++) xt[j] = b.xin[4 * MOT_PATCH + j];
        REQUIRE(mot_image_step(&m, &kv, MOT_IMAGE_POS, xt.data(), 640, false, eh.data()));
        CHECK(kv.len == 4);
        double worst = 0;
        for (int p = 0; p < MOT_IMAGE_POS; p++)
            for (int j = 0; j < MOT_PATCH; j++)
                worst = std::max(worst, std::fabs(eh[p * MOT_PATCH + j] - eps_hat_at(m, b, 4 + p, j)));
        CHECK(worst < 1e-12);
        // not committing left the cache unchanged: the same step again gives the same bits
        REQUIRE(mot_image_step(&m, &kv, MOT_IMAGE_POS, xt.data(), 640, false, eh2.data()));
        CHECK(eh == eh2);
        // a clean image committed, then EOI and the text: the logits equal the full forward with t = 0
        MotBatch bc = b;
        for (int i = 4; i < 53; i++) bc.tstep[i] = 0;
        mot_forward(&m, bc);
        REQUIRE(mot_image_step(&m, &kv, MOT_IMAGE_POS, xt.data(), 0, true, eh.data()));
        CHECK(kv.len == 53);
        std::vector<double> lg(c.vocab);
        double wl = 0;
        for (int i = 53; i < 60; i++) {
            REQUIRE(mot_decode_step(&m, &kv, b.tokens[i], lg.data()));
            for (int v = 0; v < c.vocab; v++) wl = std::max(wl, std::fabs(lg[v] - mot_logit(m, bc, i, v)));
        }
        CHECK(wl < 1e-12);
    }
}

TEST_CASE("DDIM with one step equals the closed form; guidance mixes the two predictions") {
    MotConfig c = tiny_tf(3);
    c.max_seq = 64;
    MotModel<double> m;
    mot_init(&m, c, 3);
    randomize(&m, 4);
    MotBatch b = tf_batch(c, 1, 60, 9, {640}, MOT_IMAGE_POS);
    MotKVCache<double> kv, kvu;
    feed_prefix(&m, &kv, b, 3);
    mot_kv_init(&kvu, c, c.max_seq);
    std::vector<double> lg(c.vocab);
    REQUIRE(mot_decode_step(&m, &kvu, MOT_BOS, lg.data()));  // caption dropped: BOS BOI
    REQUIRE(mot_decode_step(&m, &kvu, MOT_BOI, lg.data()));
    const size_t np = MOT_IMAGE_POS * MOT_PATCH;
    std::vector<double> x0(np), ec(np), eu(np);
    uint64_t rng = 17;
    for (double& v : x0) v = mot_rand_normal(&rng);
    const double a = mot_abar(1000);
    for (double w : {1.0, 3.0}) {
        std::vector<double> x = x0;
        REQUIRE(mot_ddim_image(&m, &kv, w == 1.0 ? nullptr : &kvu, MOT_IMAGE_POS, 1, w, x.data()));
        REQUIRE(mot_image_step(&m, &kv, MOT_IMAGE_POS, x0.data(), 1000, false, ec.data()));
        REQUIRE(mot_image_step(&m, &kvu, MOT_IMAGE_POS, x0.data(), 1000, false, eu.data()));
        bool clipped = false;
        for (size_t j = 0; j < np; j++) {
            const double e = w == 1.0 ? ec[j] : eu[j] + w * (ec[j] - eu[j]);
            const double want = std::min(1.0, std::max(-1.0, (x0[j] - sqrt(1 - a) * e) / sqrt(a)));
            clipped |= std::fabs(want) == 1.0;
            CHECK(x[j] == doctest::Approx(want).epsilon(1e-12));
        }
        CHECK(clipped);  // at t = 1000 the division by sqrt(abar) throws most values past [-1, 1]
    }
    CHECK(kv.len == 4);
    // two steps: t = 1000 then t = 500, the second from the first's x
    std::vector<double> x = x0, y = x0;
    REQUIRE(mot_ddim_image(&m, &kv, (MotKVCache<double>*)nullptr, MOT_IMAGE_POS, 2, 1.0, x.data()));
    for (int t : {1000, 500}) {
        REQUIRE(mot_image_step(&m, &kv, MOT_IMAGE_POS, y.data(), t, false, ec.data()));
        const double at = mot_abar(t), an = t == 1000 ? mot_abar(500) : 1.0;
        for (size_t j = 0; j < np; j++) {
            const double p0 = std::min(1.0, std::max(-1.0, (y[j] - sqrt(1 - at) * ec[j]) / sqrt(at)));
            y[j] = sqrt(an) * p0 + sqrt(1 - an) * ec[j];
        }
    }
    for (size_t j = 0; j < np; j++) CHECK(x[j] == doctest::Approx(y[j]).epsilon(1e-12));
}

TEST_CASE("patches <-> image: raster order of 4x4 patches") {
    std::vector<double> img(784), p(784), back(784);
    for (int i = 0; i < 784; i++) img[i] = i;
    mot_image_to_patches(img.data(), p.data());
    CHECK(p[0] == 0);
    CHECK(p[1] == 1);
    CHECK(p[4] == 28);           // patch 0: rows 0..3, cols 0..3
    CHECK(p[16] == 4);           // patch 1 starts at column 4
    CHECK(p[7 * 16] == 4 * 28);  // patch 7 starts at row 4
    mot_patches_to_image(p.data(), back.data());
    CHECK(back == img);
}

TEST_CASE("float training on one Transfusion batch lowers both losses") {
    MotConfig c = tiny_tf(3);
    c.d_model = 16;
    c.d_ff = 32;
    MotModel<float> m;
    mot_init(&m, c, 1);
    MotBatch b = tf_batch(c, 2, 20, 5, {100, 400});
    MotOptim o;
    o.lr = 1e-2;
    o.warmup = 1;
    o.steps = 60;
    mot_forward(&m, b);
    const double lm0 = m.loss_lm, mse0 = m.loss_mod[MOD_IMAGE];
    for (int s = 0; s < 60; s++) {
        mot_forward(&m, b);
        mot_zero_grad(&m);
        mot_backward(&m, b);
        mot_adamw_step(&m, o, s);
    }
    mot_forward(&m, b);
    CHECK(m.loss_lm < 0.5 * lm0);
    CHECK(m.loss_mod[MOD_IMAGE] < 0.8 * mse0);
}

// ---- shards of the Transfusion form (version 2: tokens and pixels) --------------------------------
TEST_CASE("shard version 2: round trip; the loader gives x_t of the right pixels, t in range, and the noise") {
    int ni;
    const std::vector<uint16_t> t = tf_tokens(60, 1, &ni);
    const std::vector<uint8_t> px = tf_pixels(ni);
    std::string err;
    REQUIRE_MESSAGE(mot_write_shard(tmp("p.bin"), VOC, t.data(), t.size(), &err, px.data()), err);
    CHECK(read_bytes(tmp("p.bin")).size() == 40 + 2 * t.size() + 784 * (size_t)ni);
    MotShard s;
    REQUIRE_MESSAGE(mot_read_shard(tmp("p.bin"), &s, &err), err);
    CHECK(s.pixels_version);
    CHECK(s.tokens == t);
    CHECK(s.pixels == px);
    CHECK((int)s.image_at.size() == ni);
    // a version-1 shard is still read, with no pixels
    REQUIRE(mot_write_shard(tmp("v1.bin"), VOC, t.data(), t.size(), &err));
    REQUIRE(mot_read_shard(tmp("v1.bin"), &s, &err));
    CHECK_FALSE(s.pixels_version);

    MotConfig c = tiny_tf(3);
    c.vocab = VOC.vocab;
    c.image_begin = VOC.image_begin;
    c.speech_begin = VOC.speech_begin;
    c.max_seq = 128;
    MotLoader ld;
    REQUIRE(mot_loader_open(&ld, tmp("p.bin"), 100, 5, &err));
    CHECK(mot_loader_setting_error(ld, c) == "");
    MotConfig ct = c;
    ct.setting = MOT_SETTING_TOKENS;
    CHECK(mot_loader_setting_error(ld, ct).find("version 2") != std::string::npos);
    MotLoader l1;
    REQUIRE(mot_loader_open(&l1, tmp("v1.bin"), 100, 5, &err));
    CHECK(mot_loader_setting_error(l1, c).find(tmp("v1.bin") + ": a token shard") == 0);
    CHECK_FALSE(mot_loader_open(&l1, tmp("p.bin") + "," + tmp("v1.bin"), 100, 5, &err));  // no such file: fine
    int light = 0, images = 0;
    for (int it = 0; it < 20; it++) {
        MotBatch b;
        mot_loader_next(&ld, c, 4, 100, &b);
        REQUIRE(b.xin.size() == 400u * MOT_PATCH);
        for (int i = 0; i < 400; i++) {
            if (mot_modality(c, b.tokens[i]) != MOD_IMAGE) {
                CHECK(b.tstep[i] == 0);
                continue;
            }
            REQUIRE(b.tstep[i] >= 1);
            REQUIRE(b.tstep[i] <= 1000);
            // recover x0 from x_t and eps: it must be the pixels of a stored image, in [-1, 1]
            const double a = mot_abar(b.tstep[i]);
            for (int j = 0; j < MOT_PATCH; j++) {
                const double x0 =
                    (b.xin[(size_t)i * MOT_PATCH + j] - sqrt(1 - a) * b.eps[(size_t)i * MOT_PATCH + j]) / sqrt(a);
                if (b.tstep[i] < 300) CHECK(std::fabs(x0) <= 1.0 + 1e-3);
            }
            // one t per image: the next position of the same block has the same t
            if (i % 100 < 99 && b.vis[i] > i % 100) CHECK(b.tstep[i + 1] == b.tstep[i]);
            if (i % 100 == 0 || b.tokens[i - 1] == MOT_BOI) {
                images++;
                light += b.tstep[i] <= 500;
            }
        }
    }
    CHECK(images > 50);
    CHECK(light > images / 2);  // image-first documents draw t <= 500 half of the time
    // exact pixels: x0 recovered from x_t and eps is a stored image, pixel for pixel (t < 900 keeps
    // the division by sqrt(abar) accurate)
    MotLoader l2;
    REQUIRE(mot_loader_open(&l2, tmp("p.bin"), 100, 9, &err));
    bool found = false;
    for (int it = 0; it < 50 && !found; it++) {
        MotBatch b;
        mot_loader_next(&l2, c, 1, 100, &b);
        for (int i = 1; i < 100 && !found; i++) {
            if (b.tokens[i - 1] != MOT_BOI || i + 49 >= 100 || b.tstep[i] >= 900) continue;
            // which image? find the shard position by matching: x0 from x_t and eps
            const double a = mot_abar(b.tstep[i]);
            std::vector<double> x0(MOT_IMAGE_POS * MOT_PATCH), img(784);
            for (size_t j = 0; j < x0.size(); j++)
                x0[j] = (b.xin[(size_t)i * MOT_PATCH + j] - sqrt(1 - a) * b.eps[(size_t)i * MOT_PATCH + j]) / sqrt(a);
            mot_patches_to_image(x0.data(), img.data());
            const int p0 = (int)std::lround((img[0] + 1) * 127.5);  // image k starts at (791 k) % 256
            int k = -1;
            for (int q = 0; q < ni; q++)
                if ((791 * q) % 256 == p0) {
                    k = q;
                    break;
                }
            REQUIRE(k >= 0);
            double worst = 0;
            for (int j = 0; j < 784; j++)
                worst = std::max(worst, std::fabs(img[j] - (px[(size_t)k * 784 + j] / 127.5 - 1)));
            CHECK(worst < 1e-3);
            found = true;
        }
    }
    CHECK(found);
}

TEST_CASE("shard version 2: bad input is refused with one line naming the file") {
    int ni;
    const std::vector<uint16_t> t = tf_tokens(12, 2, &ni);
    const std::vector<uint8_t> px = tf_pixels(ni);
    std::string err;
    REQUIRE(mot_write_shard(tmp("g.bin"), VOC, t.data(), t.size(), &err, px.data()));
    const std::string good = read_bytes(tmp("g.bin"));
    MotShard s;
    auto bad = [&](const std::string& name, const std::string& bytes, const std::string& expect) {
        write_bytes(tmp(name), bytes);
        CHECK_FALSE(mot_read_shard(tmp(name), &s, &err));
        INFO(err);
        CHECK(err.find(tmp(name) + ": ") == 0);
        CHECK(err.find(expect) != std::string::npos);
        CHECK(err.find('\n') == std::string::npos);
    };
    bad("trunc_px.bin", good.substr(0, good.size() - 100), "truncated or padded");  // pixel block cut
    bad("pad_px.bin", good + std::string(784, '\0'), "truncated or padded");        // one image too many
    bad("short.bin", good.substr(0, 36), "truncated");                              // header cut
    std::string b = good;
    uint64_t n_img = ni + 1;  // header and pixel block agree, the tokens hold one image fewer
    memcpy(&b[32], &n_img, 8);
    bad("count.bin", b + std::string(784, '\0'), "images but the tokens hold");
    b = good;
    b[20] = 1;
    bad("reserved.bin", b, "reserved header field");
    b = good;
    b[4] = 3;
    bad("version.bin", b, "version 3");
    // an image of 48 and one of 50 positions; an image id outside a block; no EOI
    for (int delta : {-1, +1}) {
        std::vector<uint16_t> u = t;
        const size_t boi = std::find(u.begin(), u.end(), (uint16_t)MOT_BOI) - u.begin();
        if (delta < 0) u.erase(u.begin() + boi + 1);
        else u.insert(u.begin() + boi + 1, (uint16_t)VOC.image_begin);
        std::string bytes =
            good.substr(0, 40) + std::string((const char*)u.data(), 2 * u.size()) + good.substr(40 + 2 * t.size());
        uint64_t nt = u.size();
        memcpy(&bytes[24], &nt, 8);
        bad(delta < 0 ? "p48.bin" : "p50.bin", bytes, delta < 0 ? "has 48 image positions" : "has 50 image positions");
        CHECK_FALSE(mot_write_shard(tmp("w.bin"), VOC, u.data(), u.size(), &err, px.data()));  // the writer refuses too
        CHECK(err.find("image positions") != std::string::npos);
    }
    std::vector<uint16_t> u = t;
    u[0] = VOC.image_begin;  // BOS -> an image id
    std::string bytes =
        good.substr(0, 40) + std::string((const char*)u.data(), 2 * u.size()) + good.substr(40 + 2 * t.size());
    bad("stray.bin", bytes, "outside a BOI ... EOI block");
    u = t;
    u[std::find(u.begin(), u.end(), (uint16_t)MOT_EOI) - u.begin()] = MOT_EOS;
    bytes = good.substr(0, 40) + std::string((const char*)u.data(), 2 * u.size()) + good.substr(40 + 2 * t.size());
    bad("noeoi.bin", bytes, "no EOI");
    // a header claiming 2^61 images: 784 x n wraps; refused by size, before any allocation
    b = good;
    n_img = 1ull << 61;
    memcpy(&b[32], &n_img, 8);
    bad("wrap.bin", b, "truncated or padded");
    // pixels are uint8: every value is a valid pixel (0 -> -1, 255 -> +1); the model's input range
    CHECK(0 / 127.5f - 1.0f == -1.0f);
    CHECK(255 / 127.5f - 1.0f == 1.0f);
}

// ---- the trainer ----------------------------------------------------------------------------------
TEST_CASE(
    "mot --setting transfusion: trains on pixel shards, logs the image MSE, records the setting; bad input refused") {
    if (access("./mot", X_OK) != 0) {
        MESSAGE("./mot not built: skipped");
        return;
    }
    int ni;
    const std::vector<uint16_t> t = tf_tokens(420, 3, &ni);
    const std::vector<uint8_t> px = tf_pixels(ni);
    std::string err, out;
    REQUIRE(mot_write_shard(tmp("tf.bin"), VOC, t.data(), t.size(), &err, px.data()));
    REQUIRE(mot_write_shard(tmp("tok.bin"), VOC, t.data(), t.size(), &err));
    const std::string model = " --layers 1 --dim 16 --heads 2 --seq 64 --batch 2 --threads 2";
    REQUIRE(run("./mot --setting transfusion --data " + tmp("tf.bin") + " --val " + tmp("tf.bin") + model +
                    " --steps 3 --log " + tmp("tf.csv") + " --save " + tmp("tf.ckpt") + " --debug-state " +
                    tmp("tf.dbg"),
                &out) == 0);
    INFO(out);
    CHECK(out.find("Transfusion (images by diffusion)") != std::string::npos);
    CHECK(out.find("device: CPU reference") != std::string::npos);
    CHECK(out.find("val      3 | loss") != std::string::npos);
    const std::string csv = read_bytes(tmp("tf.csv"));
    CHECK(std::count(csv.begin(), csv.end(), '\n') == 4);  // header + 3 steps
    // the image column is the MSE (about 1 for an untrained model predicting noise of variance 1)
    const std::string row = csv.substr(csv.find("\n1,") + 1);
    std::vector<std::string> f;
    for (size_t a = 0, b; a < row.size() && (b = row.find_first_of(",\n", a)) != std::string::npos; a = b + 1) {
        f.push_back(row.substr(a, b - a));
        if (row[b] == '\n') break;
    }
    REQUIRE(f.size() > 4);
    CHECK(atof(f[3].c_str()) > 0.5);
    CHECK(atof(f[3].c_str()) < 2.0);
    MotConfig c;
    REQUIRE(mot_read_checkpoint_config(tmp("tf.ckpt"), &c, &err));
    CHECK(c.setting == MOT_SETTING_TRANSFUSION);
    MotDebugState d;
    REQUIRE_MESSAGE(mot_read_debug_state(tmp("tf.dbg"), &d, &err), err);
    CHECK(d.cfg.setting == MOT_SETTING_TRANSFUSION);
    CHECK(d.tstep.size() == 2u * 64);
    CHECK(d.eps_hat.size() == 2u * 64 * MOT_PATCH);
    CHECK(d.n_mod[MOD_IMAGE] > 0);
    // the debug state is what the CPU reference computes on its batch
    MotModel<double> m;
    mot_init(&m, d.cfg, 1);
    m.params.assign(d.params.begin(), d.params.end());
    MotBatch b;
    b.B = d.B;
    b.T = d.T;
    b.tokens = d.tokens;
    b.targets = d.targets;
    b.tstep = d.tstep;
    b.xin = d.xin;
    b.eps = d.eps;
    mot_group(d.cfg, &b);
    CHECK(mot_forward(&m, b) == doctest::Approx(d.loss).epsilon(1e-4));
    // a truncated Transfusion debug state is refused
    const std::string dbg = read_bytes(tmp("tf.dbg"));
    write_bytes(tmp("tf_t.dbg"), dbg.substr(0, dbg.size() - 4 * 64));
    CHECK_FALSE(mot_read_debug_state(tmp("tf_t.dbg"), &d, &err));
    CHECK(err.find("truncated or padded") != std::string::npos);

    auto refused = [&](const std::string& args, const std::string& expect) {
        const int rc = run("./mot" + args + model + " --steps 1", &out);
        INFO(args, " -> ", out);
        CHECK(rc != 0);
        CHECK(out.find(expect) != std::string::npos);
        CHECK(std::count(out.begin(), out.end(), '\n') == 1);
    };
    refused(" --data " + tmp("tf.bin"), tmp("tf.bin") + ": a shard with pixels (version 2");
    refused(" --setting transfusion --data " + tmp("tok.bin"), tmp("tok.bin") + ": a token shard (version 1)");
    refused(" --setting transfusion --data " + tmp("tf.bin") + " --val " + tmp("tok.bin"),
            tmp("tok.bin") + ": a token shard");
    refused(" --setting diffusion --data " + tmp("tf.bin"), "bad value for --setting: 'diffusion'");
    refused(" --setting transfusion --experts 4 --data " + tmp("tf.bin"),
            "experts are not supported in the Transfusion setting");
    refused(" --setting tokens --data " + tmp("tf.bin") + " --init-from " + tmp("tf.ckpt"),
            "setting is 1 in the checkpoint but 0");
    refused(" --setting transfusion --diffusion-loss snr --data " + tmp("tf.bin"),
            "bad value for --diffusion-loss: 'snr'");
    refused(" --diffusion-loss min-snr --data " + tmp("tok.bin"),
            "--diffusion-loss min-snr needs the Transfusion setting");
    refused(
        " --setting transfusion --diffusion-loss min-snr --data " + tmp("tf.bin") + " --debug-state " + tmp("x.dbg"),
        "--debug-state records the plain-MSE objective");
    // min-SNR: step 1 reports the same image MSE as mse (same model, same batch) and a smaller
    // objective; validation is the plain MSE, the same under either option
    auto csv_row1 = [&](const std::string& path) {
        const std::string all = read_bytes(path), r = all.substr(all.find("\n1,") + 1);
        std::vector<std::string> f;
        for (size_t a = 0, b; a < r.size() && (b = r.find_first_of(",\n", a)) != std::string::npos; a = b + 1) {
            f.push_back(r.substr(a, b - a));
            if (r[b] == '\n') break;
        }
        return f;
    };
    remove(tmp("mse.csv").c_str());
    remove(tmp("snr.csv").c_str());
    REQUIRE(run("./mot --setting transfusion --data " + tmp("tf.bin") + model + " --steps 1 --log " + tmp("mse.csv"),
                &out) == 0);
    REQUIRE(run("./mot --setting transfusion --diffusion-loss min-snr --data " + tmp("tf.bin") + model +
                    " --steps 1 --log " + tmp("snr.csv"),
                &out) == 0);
    CHECK(out.find("diffusion loss: min-SNR weighted, gamma 5") != std::string::npos);
    const std::vector<std::string> fm = csv_row1(tmp("mse.csv")), fs = csv_row1(tmp("snr.csv"));
    REQUIRE(fm.size() > 4);
    REQUIRE(fs.size() > 4);
    CHECK(fm[3] == fs[3]);
    CHECK(atof(fs[1].c_str()) < atof(fm[1].c_str()));
    std::string val_mse, val_snr;
    const std::string ev = " --data " + tmp("tf.bin") + " --val " + tmp("tf.bin") + model + " --init-from " +
                           tmp("tf.ckpt") + " --eval-only";
    REQUIRE(run("./mot" + ev, &val_mse) == 0);
    REQUIRE(run("./mot" + ev + " --diffusion-loss min-snr", &val_snr) == 0);
    CHECK(val_mse.find("val      3 | loss") != std::string::npos);
    CHECK(val_mse.substr(val_mse.find("val      3")) == val_snr.substr(val_snr.find("val      3")));
    // resuming from the checkpoint without --setting takes the checkpoint's
    REQUIRE(run("./mot --data " + tmp("tf.bin") + model + " --steps 4 --init-from " + tmp("tf.ckpt"), &out) == 0);
    CHECK(out.find("step     4/4") != std::string::npos);
    // the GPU build run on the CPU trains this setting on the GPU path (bf16; test_cuda_cpu compares
    // its losses with the CPU trainer's in fp32)
    if (access("./mot_cpu_cuda", X_OK) == 0) {
        REQUIRE(run("./mot_cpu_cuda --setting transfusion --data " + tmp("tf.bin") + model + " --steps 1", &out) == 0);
        CHECK(out.find("device: the GPU code on the CPU") != std::string::npos);
    }
}

TEST_CASE("files: version-2 checkpoints and debug states (config[15], no setting) still load, as the token setting") {
    MotConfig c = tiny_tf(3);
    c.setting = MOT_SETTING_TOKENS;
    MotModel<float> a, b;
    mot_init(&a, c, 3);
    std::string err;
    REQUIRE(mot_save_checkpoint(tmp("v3.ckpt"), a, MotTrainState{7, 8}, true, &err));
    std::string bytes = read_bytes(tmp("v3.ckpt"));
    CHECK(bytes.size() == MOT_CKPT_HEADER + 12 * a.tab.total);
    std::string v2 = bytes.substr(0, 68) + bytes.substr(72);  // drop config[15] (the setting)
    v2[4] = 2;
    write_bytes(tmp("v2.ckpt"), v2);
    MotConfig fc;
    REQUIRE_MESSAGE(mot_read_checkpoint_config(tmp("v2.ckpt"), &fc, &err), err);
    CHECK(fc.setting == MOT_SETTING_TOKENS);
    mot_init(&b, fc, 4);
    MotTrainState st;
    REQUIRE_MESSAGE(mot_load_checkpoint(tmp("v2.ckpt"), &b, &st, nullptr, &err), err);
    CHECK(a.params == b.params);
    CHECK(a.adam_v == b.adam_v);
    CHECK(st.step == 7);
    // a version-3 Transfusion checkpoint round-trips, and its setting must match the model's
    MotModel<float> t, u;
    mot_init(&t, tiny_tf(3), 5);
    REQUIRE(mot_save_checkpoint(tmp("tf3.ckpt"), t, MotTrainState{}, false, &err));
    mot_init(&u, tiny_tf(3), 6);
    REQUIRE(mot_load_checkpoint(tmp("tf3.ckpt"), &u, nullptr, nullptr, &err));
    CHECK(t.params == u.params);
    CHECK_FALSE(mot_load_checkpoint(tmp("tf3.ckpt"), &b, nullptr, nullptr, &err));
    CHECK(err.find("setting is 1 in the file but 0 is wanted") != std::string::npos);
    // debug state: version 2 is the version-3 token-setting file without the setting int
    MotBatch bt = random_batch(c, 2, 6, 1);
    mot_forward(&a, bt);
    mot_zero_grad(&a);
    mot_backward(&a, bt);
    REQUIRE(mot_write_debug_state(tmp("v3.dbg"), mot_debug_capture(a, bt), &err));
    bytes = read_bytes(tmp("v3.dbg"));
    v2 = bytes.substr(0, 68) + bytes.substr(72);
    v2[4] = 2;
    write_bytes(tmp("v2.dbg"), v2);
    MotDebugState d;
    REQUIRE_MESSAGE(mot_read_debug_state(tmp("v2.dbg"), &d, &err), err);
    CHECK(d.cfg.setting == MOT_SETTING_TOKENS);
    CHECK(d.loss == float(a.loss));
    CHECK(d.grads == std::vector<float>(a.grads.begin(), a.grads.end()));
    CHECK(d.tstep.empty());
    // a bad setting value in a header is refused
    std::string bad = bytes;
    bad[68] = 7;
    write_bytes(tmp("bad.dbg"), bad);
    CHECK_FALSE(mot_read_debug_state(tmp("bad.dbg"), &d, &err));
    CHECK(err.find("setting must be 0 (tokens) or 1 (transfusion)") != std::string::npos);
}
