// test_experts.cpp — experts (dev/MATH.md, section 5): gradients against finite
// differences for MoE-4x, the MoT+MoE hybrid and MoMa-style with routers and auxiliary routers,
// expert choice (capacity, ties), one expert = the plain model bit for bit, causal routing in the
// KV-cached decoder, sparse upcycling, file versions, and the ./mot flags and their bad input.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "mot.h"
#include "test/common.h"

// The tiny config of test_mot.cpp: text [0,12), image [12,18), speech [18,24).
static MotConfig tiny(int towers, std::vector<int> experts, int tie_attn = 0, int tie_ffn = 0) {
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
    for (size_t f = 0; f < experts.size(); f++) c.n_expert[f] = experts[f];
    return c;
}
static MotConfig moe4x() { return tiny(1, {4}); }          // dense, 4 experts
static MotConfig hybrid() { return tiny(3, {4, 1, 1}); }   // MoT, 4 experts in the text tower
static MotConfig moma() { return tiny(3, {4, 4, 4}, 1); }  // attention tied, 4t4i4s

// The training objective loss + 0.01 aux_loss, whose gradient mot_backward computes. The aux BCE
// sees h detached, so its gradient reaches the aux routers U only: for every other tensor the
// finite difference is of the loss alone (and the loss does not depend on U at all).
template <typename S>
static double objective(MotModel<S>* m, const MotBatch& b, int p) {
    mot_forward(m, b);
    return p == P_U ? m->loss + MOT_AUX_WEIGHT * m->aux_loss : m->loss;
}

// Central differences (step 1e-5, double) for every tensor of every layer and copy, routers and
// aux routers included: ||fd - analytic|| / ||analytic|| <= 1e-6. The expert-choice selection is
// a step function of the weights; every perturbed forward must select exactly the rows of the
// unperturbed one (so the finite difference never crosses a selection boundary and measures the
// derivative with the selection held fixed, which is what the backward differentiates).
static void gradient_check(const MotConfig& c, uint64_t seed) {
    omp_set_num_threads(1);
    MotModel<double> m;
    mot_init(&m, c, 7);
    randomize(&m, seed);
    MotBatch b = random_batch(c, 2, 9, 3);
    REQUIRE(b.group[1] > b.group[0]);
    REQUIRE(b.group[2] > b.group[1]);
    REQUIRE(b.group[3] > b.group[2]);
    objective(&m, b, P_U);
    REQUIRE(m.aux_loss > 0);
    const std::vector<int32_t> sel = m.sel;
    mot_zero_grad(&m);
    mot_backward(&m, b);
    const double h = 1e-5;
    long crossed = 0, tried = 0;
    double worst = 0;
    for (int p = 0; p < P_COUNT; p++) {
        const MotParamInfo& info = m.tab.p[p];
        // a tower's router is one D x E matrix (stored as E rows of D): checked as a whole
        const bool router = p == P_WR || p == P_U;
        std::vector<int> rows_of_copy(info.copies, 1);  // table copies checked together
        if (router) {
            rows_of_copy.clear();
            for (int f = 0; f < mot_ffn_copies(c); f++)
                if (c.n_expert[f] > 1) rows_of_copy.push_back(c.n_expert[f]);
        }
        for (int l = 0; l < info.layers; l++)
            for (int k = 0, first = 0; k < (int)rows_of_copy.size(); first += rows_of_copy[k], k++) {
                double num = 0, den = 0;
                for (size_t i = 0; i < info.each() * rows_of_copy[k]; i++) {
                    const size_t idx = info.at(l, first) + i;
                    const double w = m.params[idx];
                    m.params[idx] = w + h;
                    const double lp = objective(&m, b, p);
                    crossed += m.sel != sel;
                    m.params[idx] = w - h;
                    const double lm = objective(&m, b, p);
                    crossed += m.sel != sel;
                    m.params[idx] = w;
                    tried += 2;
                    const double fd = (lp - lm) / (2 * h), an = m.grads[idx];
                    num += (fd - an) * (fd - an);
                    den += an * an;
                }
                INFO(std::string(info.name), " layer ", l, " copy ", k);
                REQUIRE(den > 0);
                // relative error 1e-6, or an absolute 1e-9: the rounding noise of the difference
                // quotient (~1e-16 |loss| / h per entry) for a router whose gates are saturated and
                // whose whole gradient is ~1e-5
                CHECK(std::sqrt(num) <= std::max(1e-6 * std::sqrt(den), 1e-9));
                if (std::sqrt(num) > 1e-9) worst = std::max(worst, std::sqrt(num / den));
            }
    }
    MESSAGE("worst tensor rel err (above the 1e-9 noise floor) ", worst, " over ", tried, " perturbed forwards");
    CHECK(crossed == 0);
    omp_set_num_threads(omp_get_num_procs());
}

TEST_CASE("gradient check: MoE-4x (dense, 4 experts), routers and aux routers included") {
    gradient_check(moe4x(), 11);
}
TEST_CASE("gradient check: MoT+MoE hybrid (4 experts in the text tower)") { gradient_check(hybrid(), 11); }
TEST_CASE("gradient check: MoMa-style (attention tied, 4 experts per modality)") { gradient_check(moma(), 11); }
TEST_CASE("gradient check: 2 and 3 experts in different towers, FFN of the image tower plain") {
    gradient_check(tiny(3, {2, 1, 3}), 12);
}

// Spec, "Experts": y_i = sum_e s_ie rmsnorm(FFN_e(h_i)), so a row i taken by expert e alone has
// dL/ds_ie = c = dt_i . n_ie (not ~0, as when the norm came after the gate and cancelled s), and
// its router logits get dr_ie' = s_ie' (delta_e'e - s_ie) c. With one layer and row i the only
// target, the loss reaches the router through row i alone, so dL/dWr[e'] = dr_ie' h_i exactly.
// c is measured independently: scaling g_ffn by (1 + t) scales y_i as s_ie (1 + t) would, so
// dL/dt = s_ie c.
TEST_CASE("router gradient: a row taken by one expert teaches its router (the size the math predicts)") {
    omp_set_num_threads(1);
    MotConfig c = moe4x();
    c.n_layer = 1;
    MotModel<double> m;
    mot_init(&m, c, 7);
    randomize(&m, 21);
    MotBatch b = random_batch(c, 1, 8, 5);
    mot_forward(&m, b);
    const int N = b.B * b.T, D = c.d_model, E = 4, C = m.plan.cap[0], Em = m.Emax;
    REQUIRE(C == 2);
    // a row that exactly one expert took
    int row = -1, ex = -1;
    for (int i = 0; i < N && row < 0; i++) {
        int takers = 0, last = -1;
        for (int e = 0; e < E; e++)
            for (int j = 0; j < C; j++)
                if (m.sel[(size_t)e * C + j] == i) {
                    takers++;
                    last = e;
                }
        if (takers == 1) {
            row = i;
            ex = last;
        }
    }
    REQUIRE(row >= 0);
    for (int i = 0; i < N; i++)
        if (i != b.order[row]) b.targets[i] = MOT_IGNORE;
    REQUIRE(b.targets[b.order[row]] != MOT_IGNORE);
    mot_forward(&m, b);
    const std::vector<int32_t> sel = m.sel;
    mot_zero_grad(&m);
    mot_backward(&m, b);
    const double* s = m.act.gate + (size_t)row * Em;
    const double* hi = m.act.h + (size_t)row * D;
    // c from the gain: dL/dt at t = 0 of g_ffn (1 + t)
    const size_t og = m.tab.p[P_GFFN].at(0, 0);
    const std::vector<double> g0(m.params.begin() + og, m.params.begin() + og + D);
    auto loss_at = [&](double t) {
        for (int d = 0; d < D; d++) m.params[og + d] = g0[d] * (1 + t);
        mot_forward(&m, b);
        CHECK(m.sel == sel);
        return m.loss;
    };
    const double t = 1e-5, cfd = (loss_at(t) - loss_at(-t)) / (2 * t) / s[ex];
    loss_at(0);
    MESSAGE("row ", row, " taken by expert ", ex, " alone: s = ", s[ex], ", dL/ds = ", cfd);
    CHECK(std::fabs(cfd) > 1e-3);
    const size_t orr = m.tab.p[P_WR].at(0, 0);
    double num = 0, den = 0;
    for (int e = 0; e < E; e++)
        for (int d = 0; d < D; d++) {
            const double want = s[e] * ((e == ex) - s[ex]) * cfd * hi[d], got = m.grads[orr + (size_t)e * D + d];
            num += (got - want) * (got - want);
            den += want * want;
        }
    CHECK(std::sqrt(num) <= 1e-6 * std::sqrt(den));
    omp_set_num_threads(omp_get_num_procs());
}

TEST_CASE("parameter table: experts multiply the FFN copies; routers exist only where E > 1") {
    MotConfig c = hybrid();
    MotParamTable t = mot_param_table(c);
    CHECK(t.p[P_W1].copies == 6);  // 4 text experts, 1 image, 1 speech
    CHECK(t.p[P_W2].copies == 6);
    CHECK(t.p[P_WR].copies == 4);
    CHECK(t.p[P_U].copies == 4);
    CHECK(t.p[P_WR].each() == (size_t)c.d_model);
    CHECK(mot_expert_copy(c, 1, 0) == 4);
    CHECK(mot_expert_copy(c, 2, 0) == 5);
    MotParamTable plain = mot_param_table(tiny(3, {1, 1, 1}));
    CHECK(plain.p[P_W1].copies == 3);
    CHECK(plain.p[P_WR].size() == 0);
    CHECK(plain.p[P_U].size() == 0);
    // the experts add (E - 1)(3DF) per layer and the routers 2 E D: nothing else changes
    const size_t D = 8, F = 12, L = 2;
    CHECK(t.total - plain.total == L * (3 * 3 * D * F + 2 * 4 * D));
    MotParamTable m4 = mot_param_table(moma());
    CHECK(m4.p[P_WQ].copies == 1);
    CHECK(m4.p[P_W1].copies == 12);
    CHECK(m4.p[P_WR].copies == 12);
}

TEST_CASE("config: expert counts are checked") {
    MotConfig c = tiny(1, {4});
    CHECK(mot_config_error(c).empty());
    c.n_expert[1] = 2;  // dense has one FFN copy
    CHECK(mot_config_error(c).find("n_expert") != std::string::npos);
    c = tiny(3, {0, 1, 1});
    CHECK(mot_config_error(c).find("n_expert must be in [1, 64]") != std::string::npos);
    c = tiny(3, {1, MOT_MAX_EXPERT + 1, 1});
    CHECK(mot_config_error(c).find("n_expert") != std::string::npos);
    c = tiny(3, {4, 1, 1}, 0, 1);  // FFN tied: one copy
    CHECK(mot_config_error(c).empty());
    CHECK(mot_param_table(c).p[P_W1].copies == 4);
}

TEST_CASE("expert choice: the C largest gates, ties to the lower row") {
    // 7 rows, 2 experts, C = 4; column 0 has ties at the boundary
    const double s[7 * 2] = {0.5, 0.5, 0.7, 0.3, 0.5, 0.5, 0.2, 0.8, 0.5, 0.5, 0.9, 0.1, 0.5, 0.5};
    int32_t out[4];
    mot_expert_choice(out, s, 2, 0, 7, 4, 100);
    // expert 0: 0.9 (row 5), 0.7 (row 1), then the 0.5s of rows 0, 2, 4, 6 -> rows 0 and 2 win
    CHECK(std::vector<int32_t>(out, out + 4) == std::vector<int32_t>{100, 101, 102, 105});
    mot_expert_choice(out, s, 2, 1, 7, 4, 0);
    // expert 1: 0.8 (row 3), then 0.5 at rows 0, 2, 4, 6 -> 0, 2, 4
    CHECK(std::vector<int32_t>(out, out + 4) == std::vector<int32_t>{0, 2, 3, 4});
}

TEST_CASE("expert choice in the model: every expert takes exactly C = ceil(n/E) rows of its own copy") {
    for (MotConfig c : {moe4x(), hybrid(), moma(), tiny(3, {3, 2, 4})}) {
        MotModel<double> m;
        mot_init(&m, c, 1);
        randomize(&m, 6);
        MotBatch b = random_batch(c, 3, 10, 17);
        mot_forward(&m, b);
        for (int l = 0; l < c.n_layer; l++)
            for (int f = 0; f < mot_ffn_copies(c); f++) {
                int r0, r1;
                mot_ffn_rows(c, b.group, f, &r0, &r1);
                const int n = r1 - r0, E = c.n_expert[f];
                if (E == 1) continue;
                const int C = (n + E - 1) / E;
                CHECK(m.plan.cap[f] == C);
                for (int e = 0; e < E; e++) {
                    const int32_t* s = m.sel.data() + (size_t)l * m.NS + m.plan.slot0[f] + e * C;
                    // C distinct rows of this copy, in increasing order, and no unchosen row of the
                    // copy has a larger gate (nor an equal gate at a lower row) than a chosen one
                    double worst_in = 1e9;
                    int worst_row = -1;
                    for (int j = 0; j < C; j++) {
                        CHECK(s[j] >= r0);
                        CHECK(s[j] < r1);
                        if (j) CHECK(s[j] > s[j - 1]);
                        const double g = m.act.gate[((size_t)l * b.B * b.T + s[j]) * m.Emax + e];
                        if (g < worst_in || (g == worst_in && s[j] > worst_row)) {
                            worst_in = g;
                            worst_row = s[j];
                        }
                    }
                    for (int r = r0; r < r1; r++) {
                        if (std::find(s, s + C, r) != s + C) continue;
                        const double g = m.act.gate[((size_t)l * b.B * b.T + r) * m.Emax + e];
                        CHECK((g < worst_in || (g == worst_in && r > worst_row)));
                    }
                }
            }
    }
}

TEST_CASE("expert choice: with a zero router every gate ties and each expert takes its copy's first C rows") {
    MotConfig c = moma();
    MotModel<double> m;
    mot_init(&m, c, 1);
    randomize(&m, 3);
    const MotParamInfo& r = m.tab.p[P_WR];
    std::fill(m.params.begin() + r.offset, m.params.begin() + r.offset + r.size(), 0.0);
    MotBatch b = random_batch(c, 2, 10, 4);
    mot_forward(&m, b);
    for (int l = 0; l < c.n_layer; l++)
        for (int f = 0; f < 3; f++) {
            const int n = b.group[f + 1] - b.group[f], C = (n + 3) / 4;
            for (int e = 0; e < 4; e++)
                for (int j = 0; j < C; j++)
                    CHECK(m.sel[(size_t)l * m.NS + m.plan.slot0[f] + e * C + j] == b.group[f] + j);
        }
}

// One expert per copy is the plain model: the expert code path, forced on, gives the plain path's
// logits, losses and gradients bit for bit (float, threads on), and the file layout is unchanged.
TEST_CASE("--experts 1: the expert code path equals the plain model bitwise") {
    for (MotConfig c : {tiny(3, {1, 1, 1}), tiny(1, {1}), tiny(3, {1, 1, 1}, 1, 0), tiny(3, {1, 1, 1}, 0, 1)}) {
        c.d_model = 32;
        c.n_head = 4;
        c.d_ff = 80;
        c.max_seq = 48;
        MotModel<float> a, e;
        mot_init(&a, c, 5);
        mot_init(&e, c, 5);
        e.force_expert_path = true;
        CHECK(a.params == e.params);
        MotBatch b = random_batch(c, 3, 48, 9);
        const double la = mot_forward(&a, b), le = mot_forward(&e, b);
        CHECK(la == le);
        for (int md = 0; md < 3; md++) CHECK(a.loss_mod[md] == e.loss_mod[md]);
        const size_t NV = (size_t)b.B * b.T * c.vocab;
        CHECK(std::equal(a.act.logits, a.act.logits + NV, e.act.logits));
        mot_zero_grad(&a);
        mot_backward(&a, b);
        mot_zero_grad(&e);
        mot_backward(&e, b);
        CHECK(a.grads == e.grads);
        CHECK(e.aux_loss == 0);
    }
}

TEST_CASE("backward without accumulating: the zero_grad + backward gradients, over any old contents") {
    // mot_backward(m, b, false) lets the weight products write their gradient and zeroes the rest
    // first; it must equal zero_grad + mot_backward(m, b) for every architecture, also when a tower
    // has no rows (its copies are not written and must be zeroed), and accumulating a second batch
    // on top must equal doing both on zeroed gradients.
    std::vector<MotConfig> cs = {tiny(1, {1}), tiny(3, {1, 1, 1}), tiny(3, {1, 1, 1}, 1, 1), moe4x(), hybrid(),
                                 moma(),       tiny(3, {3, 1, 2})};
    MotConfig tf = tiny(3, {1, 1, 1});
    tf.setting = MOT_SETTING_TRANSFUSION;
    cs.push_back(tf);
    for (size_t ci = 0; ci < cs.size(); ci++)
        for (int absent : {-1, 1}) {  // absent: a modality with no rows in the first batch
            MotConfig c = cs[ci];
            const bool tfs = mot_transfusion(c);
            if (tfs && absent >= 0) continue;
            c.d_model = 32;
            c.n_head = 4;
            c.d_ff = 80;
            c.max_seq = 48;
            INFO("config ", ci, " absent modality ", absent);
            std::vector<int> mods = absent < 0 ? std::vector<int>{0, 1, 2} : std::vector<int>{0, 2};
            MotBatch b1 = tfs ? tf_batch(c, 2, 48, 9, {300, 0, 40}) : random_batch(c, 3, 48, 9, mods);
            MotBatch b2 = tfs ? tf_batch(c, 2, 48, 4, {700, 20}) : random_batch(c, 2, 48, 4);
            if (absent >= 0) REQUIRE(b1.group[absent + 1] == b1.group[absent]);
            MotModel<float> a, w;
            mot_init(&a, c, 5);
            mot_init(&w, c, 5);
            mot_forward(&a, b1);
            mot_forward(&w, b1);
            mot_zero_grad(&a);
            mot_backward(&a, b1);
            std::fill(w.grads.begin(), w.grads.end(), 7.0f);  // old contents the pass must not keep
            mot_backward(&w, b1, false);
            CHECK(a.grads == w.grads);
            mot_forward(&a, b2);
            mot_forward(&w, b2);
            mot_backward(&a, b2);
            mot_backward(&w, b2, true);
            CHECK(a.grads == w.grads);
        }
}

TEST_CASE("determinism: experts give the same bits on 1 and 2 threads (a resumed run must match)") {
    for (MotConfig c : {moe4x(), moma(), tiny(3, {3, 1, 2})}) {
        c.d_model = 32;
        c.n_head = 4;
        c.d_ff = 80;
        c.max_seq = 48;
        MotModel<float> a, b;
        mot_init(&a, c, 5);
        mot_init(&b, c, 5);
        MotBatch bt = random_batch(c, 3, 48, 9);
        omp_set_num_threads(1);
        mot_forward(&a, bt);
        mot_zero_grad(&a);
        mot_backward(&a, bt);
        omp_set_num_threads(2);
        mot_forward(&b, bt);
        mot_zero_grad(&b);
        mot_backward(&b, bt);
        CHECK(a.loss == b.loss);
        CHECK(a.aux_loss == b.aux_loss);
        CHECK(a.grads == b.grads);
        omp_set_num_threads(omp_get_num_procs());
    }
}

TEST_CASE("generation: the KV-cache decode equals the full forward with causal routing") {
    for (MotConfig c : {moe4x(), hybrid(), moma()}) {
        MotModel<double> m;
        mot_init(&m, c, 1);
        MotBatch b = random_batch(c, 1, 10, 13);
        m.route = MOT_ROUTE_CAUSAL;
        // weights under which the aux routers send some rows to no expert and some to several
        // (else the test is weak): the first of a few seeds that does
        int none = 0, several = 0;
        for (uint64_t seed = 5; seed < 25 && (none == 0 || several == 0); seed++) {
            randomize(&m, seed);
            mot_forward(&m, b);
            none = several = 0;
            for (int l = 0; l < c.n_layer; l++)
                for (int r = 0; r < 10; r++) {
                    const int f = mot_ffn_copy_of_mod(c, mot_modality(c, b.tokens[b.order[r]]));
                    if (c.n_expert[f] == 1) continue;
                    int k = 0;
                    for (int e = 0; e < c.n_expert[f]; e++) k += m.act.aux[((size_t)l * 10 + r) * m.Emax + e] > 0.5;
                    none += k == 0;
                    several += k > 1;
                }
        }
        REQUIRE(none > 0);
        REQUIRE(several > 0);
        MotKVCache<double> kv;
        const double worst = kv_decode_worst(&m, b, 10, &kv);
        CHECK(worst < 1e-12);
        // and causal routing is causal: the logits at position i do not depend on later tokens
        MotBatch b2 = b;
        for (int i = 6; i < 10; i++) b2.tokens[i] = (b.tokens[i] + 5) % c.vocab;
        mot_group(c, &b2);
        std::vector<double> before;
        for (int i = 0; i < 6; i++)
            for (int v = 0; v < c.vocab; v++) before.push_back(mot_logit(m, b, i, v));
        mot_forward(&m, b2);
        bool same = true;
        for (int i = 0; i < 6; i++)
            for (int v = 0; v < c.vocab; v++) same &= mot_logit(m, b2, i, v) == before[(size_t)i * c.vocab + v];
        CHECK(same);
    }
}

TEST_CASE("upcycling: every expert holds its tower's FFN exactly, routers start N(0, 0.02), the rest is copied") {
    MotConfig sc = tiny(3, {1, 1, 1}, 1);
    sc.d_model = 32;
    sc.n_head = 4;
    sc.d_ff = 64;
    MotConfig dc = sc;
    dc.n_expert[0] = 4;
    dc.n_expert[1] = 2;
    dc.n_expert[2] = 4;
    MotModel<float> src, dst;
    mot_init(&src, sc, 1);
    randomize(&src, 2);
    mot_init(&dst, dc, 9);
    REQUIRE(mot_upcycle(&dst, src) == "");
    for (int p = 0; p < P_COUNT; p++) {
        const MotParamInfo &si = src.tab.p[p], &di = dst.tab.p[p];
        INFO(std::string(si.name));
        if (p == P_WR || p == P_U) {
            double sum = 0, sq = 0;
            for (size_t i = 0; i < di.size(); i++) {
                sum += dst.params[di.offset + i];
                sq += dst.params[di.offset + i] * dst.params[di.offset + i];
            }
            const double n = di.size(), mean = sum / n, sd = std::sqrt(sq / n - mean * mean);
            CHECK(n == 2.0 * 10 * 32);  // 10 router rows of D per layer
            CHECK(std::fabs(mean) < 0.004);
            CHECK(sd == doctest::Approx(0.02).epsilon(0.1));
            continue;
        }
        for (int l = 0; l < si.layers; l++)
            for (int f = 0; f < si.copies; f++) {
                const int n_e = (p == P_W1 || p == P_W3 || p == P_W2) ? dc.n_expert[f] : 1;
                for (int e = 0; e < n_e; e++) {
                    const size_t to =
                        (p == P_W1 || p == P_W3 || p == P_W2) ? di.at(l, mot_expert_copy(dc, f, e)) : di.at(l, f);
                    CHECK(std::equal(src.params.begin() + si.at(l, f), src.params.begin() + si.at(l, f) + si.each(),
                                     dst.params.begin() + to));
                }
            }
    }
    CHECK(std::all_of(dst.adam_m.begin(), dst.adam_m.end(), [](float x) { return x == 0; }));
    // different shapes and sources with experts are refused
    MotConfig bad = dc;
    bad.d_model = 16;
    bad.n_head = 2;
    MotModel<float> wrong;
    mot_init(&wrong, bad, 1);
    CHECK(mot_upcycle(&wrong, src).find("d_model") != std::string::npos);
    CHECK(mot_upcycle(&wrong, dst).find("already has experts") != std::string::npos);
}

TEST_CASE("checkpoint and debug state: round trip with experts; version 1 files still load") {
    char t[] = "/tmp/mot_experts_XXXXXX";
    REQUIRE(mkdtemp(t) != nullptr);
    const std::string dir = t;
    std::string err;
    MotConfig c = hybrid();
    MotModel<float> a, b;
    mot_init(&a, c, 1);
    REQUIRE(mot_save_checkpoint(dir + "/e.ckpt", a, MotTrainState{3, 4}, true, &err));
    MotConfig fc;
    REQUIRE(mot_read_checkpoint_config(dir + "/e.ckpt", &fc, &err));
    CHECK(mot_config_mismatch(fc, c).empty());
    mot_init(&b, fc, 2);
    REQUIRE(mot_load_checkpoint(dir + "/e.ckpt", &b, nullptr, nullptr, &err));
    CHECK(a.params == b.params);
    // a version-1 file: the same bytes without the three expert counts and the setting, version 1
    MotConfig pc = tiny(3, {1, 1, 1});
    MotModel<float> p, q;
    mot_init(&p, pc, 3);
    REQUIRE(mot_save_checkpoint(dir + "/p.ckpt", p, MotTrainState{5, 6}, false, &err));
    FILE* f = fopen((dir + "/p.ckpt").c_str(), "rb");
    std::string bytes;
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) bytes.append(buf, n);
    fclose(f);
    std::string v1 = bytes.substr(0, 56) + bytes.substr(72);
    v1[4] = 1;
    f = fopen((dir + "/v1.ckpt").c_str(), "wb");
    fwrite(v1.data(), 1, v1.size(), f);
    fclose(f);
    REQUIRE(mot_read_checkpoint_config(dir + "/v1.ckpt", &fc, &err));
    CHECK(mot_config_mismatch(fc, pc).empty());
    mot_init(&q, fc, 4);
    MotTrainState st;
    REQUIRE(mot_load_checkpoint(dir + "/v1.ckpt", &q, &st, nullptr, &err));
    CHECK(p.params == q.params);
    CHECK(st.step == 5);
    CHECK(st.data_rng == 6);
    v1[4] = 5;
    f = fopen((dir + "/v5.ckpt").c_str(), "wb");
    fwrite(v1.data(), 1, v1.size(), f);
    fclose(f);
    CHECK_FALSE(mot_read_checkpoint_config(dir + "/v5.ckpt", &fc, &err));
    CHECK(err.find("version 5") != std::string::npos);
    // debug state: the current version with experts, and a version-1 file
    MotBatch bt = random_batch(c, 2, 8, 1);
    mot_forward(&a, bt);
    mot_zero_grad(&a);
    mot_backward(&a, bt);
    REQUIRE(mot_write_debug_state(dir + "/e.dbg", mot_debug_capture(a, bt), &err));
    MotDebugState d;
    REQUIRE(mot_read_debug_state(dir + "/e.dbg", &d, &err));
    CHECK(d.cfg.n_expert[0] == 4);
    CHECK(d.grads.size() == a.grads.size());
    mot_forward(&p, bt);
    mot_zero_grad(&p);
    mot_backward(&p, bt);
    REQUIRE(mot_write_debug_state(dir + "/p.dbg", mot_debug_capture(p, bt), &err));
    f = fopen((dir + "/p.dbg").c_str(), "rb");
    bytes.clear();
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) bytes.append(buf, n);
    fclose(f);
    v1 = bytes.substr(0, 56) + bytes.substr(72);
    v1[4] = 1;
    f = fopen((dir + "/v1.dbg").c_str(), "wb");
    fwrite(v1.data(), 1, v1.size(), f);
    fclose(f);
    REQUIRE(mot_read_debug_state(dir + "/v1.dbg", &d, &err));
    CHECK(d.params == std::vector<float>(p.params.begin(), p.params.end()));
    CHECK(d.loss == float(p.loss));
    // version 3 (the old expert rule, the norm of the gated sum): a file with experts is refused
    // with its version and the reason; a file without experts is read as it was
    auto as_v3 = [&](const std::string& from, const std::string& to) {
        FILE* g = fopen((dir + from).c_str(), "rb");
        std::string s;
        size_t k;
        while ((k = fread(buf, 1, sizeof buf, g)) > 0) s.append(buf, k);
        fclose(g);
        s[4] = 3;
        g = fopen((dir + to).c_str(), "wb");
        fwrite(s.data(), 1, s.size(), g);
        fclose(g);
    };
    as_v3("/e.ckpt", "/e3.ckpt");
    as_v3("/e.dbg", "/e3.dbg");
    as_v3("/p.ckpt", "/p3.ckpt");
    as_v3("/p.dbg", "/p3.dbg");
    CHECK_FALSE(mot_read_checkpoint_config(dir + "/e3.ckpt", &fc, &err));
    CHECK(err.find(dir + "/e3.ckpt: version 3") == 0);
    CHECK(err.find("old expert rule") != std::string::npos);
    CHECK_FALSE(mot_load_checkpoint(dir + "/e3.ckpt", &b, nullptr, nullptr, &err));
    CHECK(err.find("old expert rule") != std::string::npos);
    CHECK_FALSE(mot_read_debug_state(dir + "/e3.dbg", &d, &err));
    CHECK(err.find(dir + "/e3.dbg: version 3") == 0);
    REQUIRE(mot_read_checkpoint_config(dir + "/p3.ckpt", &fc, &err));
    CHECK(mot_config_mismatch(fc, pc).empty());
    REQUIRE(mot_load_checkpoint(dir + "/p3.ckpt", &q, &st, nullptr, &err));
    CHECK(p.params == q.params);
    REQUIRE(mot_read_debug_state(dir + "/p3.dbg", &d, &err));
    CHECK(d.loss == float(p.loss));
}

TEST_CASE("training: MoE-4x learns one batch and its aux routers learn to route like expert choice") {
    MotConfig c = tiny(1, {4});
    c.d_model = 32;
    c.n_head = 4;
    c.d_ff = 64;
    c.vocab = 48;
    c.image_begin = 24;
    c.speech_begin = 36;
    c.max_seq = 16;
    MotModel<float> m;
    mot_init(&m, c, 1);
    MotBatch b = random_batch(c, 4, 16, 21);
    MotOptim o;
    o.lr = 1e-2;
    o.warmup = 10;
    o.steps = 150;
    o.weight_decay = 0;
    const double first = mot_forward(&m, b), aux0 = m.aux_loss;
    for (int s = 0; s < o.steps; s++) {
        mot_forward(&m, b);
        mot_zero_grad(&m);
        mot_backward(&m, b);
        mot_adamw_step(&m, o, s);
    }
    const double last = mot_forward(&m, b);
    MESSAGE("MoE-4x overfit: loss ", first, " -> ", last, "; aux BCE ", aux0, " -> ", m.aux_loss, " (agree ",
            m.aux_agree, ")");
    CHECK(last < 0.1);
    // a constant predictor of [i in S_e] does no better than the entropy of the base rate C/n
    // (about 1/4) per layer; "no expert" for every row is right for the rows no expert took
    const double p = double(m.plan.cap[0]) / (b.B * b.T), H = -(p * std::log(p) + (1 - p) * std::log(1 - p));
    CHECK(m.aux_loss < 0.75 * c.n_layer * H);
    long untaken = 0;
    for (int l = 0; l < c.n_layer; l++)
        for (int r = 0; r < b.B * b.T; r++) {
            bool taken = false;
            for (int j = 0; j < 4 * m.plan.cap[0]; j++) taken |= m.sel[(size_t)l * m.NS + j] == r;
            untaken += !taken;
        }
    const double baseline = double(untaken) / (c.n_layer * b.B * b.T);
    MESSAGE("rows routed like EC: ", m.aux_agree, " (answering no expert everywhere: ", baseline, ")");
    CHECK(m.aux_agree > baseline + 0.1);
    m.route = MOT_ROUTE_CAUSAL;
    const double causal = mot_forward(&m, b);
    MESSAGE("causal routing on the same batch: loss ", causal);
    CHECK(std::isfinite(causal));
}

// ---- the trainer: ./mot with --experts -------------------------------------------------------
static bool exists(const std::string& path) { return access(path.c_str(), F_OK) == 0; }

static std::string shard(const std::string& name, uint64_t seed) { return write_shard(name, seed); }
static const std::string MODEL = " --layers 2 --dim 32 --heads 4 --seq 32 --batch 4 --lr 3e-3 --warmup 5 --threads 2";

// One line "error: ..." naming `expect`, exit code != 0 (and == code when given), and no file
// written: neither the --save target nor its temp file.
static void expect_error(const std::string& args, const std::string& expect, int code = -1) {
    const std::string save = tmp("never.ckpt");
    std::string out;
    const int rc = run("./mot " + args + " --save " + save, &out);
    INFO("./mot ", args, "\n", out);
    CHECK(rc != 0);
    CHECK(rc < 128);
    if (code >= 0) CHECK(rc == code);
    CHECK(std::count(out.begin(), out.end(), '\n') == 1);
    CHECK(out.find("error: ") == 0);
    CHECK(out.find(expect) != std::string::npos);
    CHECK_FALSE(exists(save));
    CHECK_FALSE(exists(save + ".tmp"));
}

TEST_CASE("mot --experts: MoE-4x, hybrid and MoMa-style train, report EC and causal validation and the aux router") {
    REQUIRE(access("./mot", X_OK) == 0);
    const std::string data = shard("exp_0.bin", 5);
    for (std::string arch : {"--dense --experts 4", "--experts 4,1,1", "--tie-attn --experts 4,4,4"}) {
        std::string out;
        const int rc = run("./mot --data " + data + " --val " + data + MODEL + " --steps 20 --eval-every 10 " + arch +
                               " --log " + tmp("e.csv") + " --save " + tmp("e.ckpt"),
                           &out);
        INFO(arch, "\n", out);
        REQUIRE(rc == 0);
        CHECK(out.find("experts 4") != std::string::npos);
        CHECK(out.find("aux ") != std::string::npos);
        CHECK(out.find("val     20 | causal routing: loss") != std::string::npos);
        const std::string csv = read_bytes(tmp("e.csv"));
        CHECK(csv.find("val_causal,val_causal_text,val_causal_image,val_causal_speech,aux_loss,aux_agree") !=
              std::string::npos);
        // and the checkpoint evaluates (both ways) and resumes
        CHECK(run("./mot --data " + data + " --val " + data + " --eval-only --init-from " + tmp("e.ckpt"), &out) == 0);
        CHECK(out.find("causal routing") != std::string::npos);
        CHECK(run("./mot --data " + data + MODEL + " --steps 22 " + arch + " --init-from " + tmp("e.ckpt"), &out) == 0);
        CHECK(out.find("step    22/22") != std::string::npos);
        remove(tmp("e.csv").c_str());
    }
}

TEST_CASE("mot --experts 1: the same run as without the flag, bit for bit (log and checkpoint)") {
    const std::string data = shard("one_0.bin", 6);
    std::string out;
    const std::string base = "./mot --data " + data + MODEL + " --steps 8";
    REQUIRE(run(base + " --log " + tmp("a.csv") + " --save " + tmp("a.ckpt"), &out) == 0);
    REQUIRE(run(base + " --experts 1 --log " + tmp("b.csv") + " --save " + tmp("b.ckpt"), &out) == 0);
    auto losses = [](const std::string& csv) {  // step and loss columns: everything but the timings
        std::string s;
        for (size_t p = csv.find('\n') + 1; p < csv.size(); p = csv.find('\n', p) + 1) {
            const size_t c2 = csv.find(',', csv.find(',', p) + 1);
            s += csv.substr(p, c2 - p) + "\n";
        }
        return s;
    };
    const std::string la = losses(read_bytes(tmp("a.csv")));
    CHECK(std::count(la.begin(), la.end(), '\n') == 8);
    CHECK(la == losses(read_bytes(tmp("b.csv"))));
    CHECK(read_bytes(tmp("a.ckpt")) == read_bytes(tmp("b.ckpt")));
}

TEST_CASE("mot --init-from a checkpoint without experts upcycles: experts hold the source FFN exactly") {
    const std::string data = shard("up_0.bin", 7);
    std::string out, err;
    REQUIRE(run("./mot --data " + data + MODEL + " --steps 5 --tie-attn --save " + tmp("src.ckpt"), &out) == 0);
    const int rc = run("./mot --data " + data + " --init-from " + tmp("src.ckpt") +
                           " --experts 4,2,4 --steps 0 --save " + tmp("up.ckpt"),
                       &out);
    INFO(out);
    REQUIRE(rc == 0);
    CHECK(out.find("upcycled from") != std::string::npos);
    MotConfig sc, uc;
    REQUIRE(mot_read_checkpoint_config(tmp("src.ckpt"), &sc, &err));
    REQUIRE(mot_read_checkpoint_config(tmp("up.ckpt"), &uc, &err));
    CHECK(uc.tie_attn == 1);
    CHECK(uc.n_expert[1] == 2);
    MotModel<float> s, u;
    mot_init(&s, sc, 1);
    mot_init(&u, uc, 1);
    REQUIRE(mot_load_checkpoint(tmp("src.ckpt"), &s, nullptr, nullptr, &err));
    MotTrainState st;
    bool has_opt = false;
    REQUIRE(mot_load_checkpoint(tmp("up.ckpt"), &u, &st, &has_opt, &err));
    CHECK(st.step == 0);
    for (int p : {P_W1, P_W3, P_W2}) {
        const MotParamInfo &si = s.tab.p[p], &ui = u.tab.p[p];
        for (int l = 0; l < sc.n_layer; l++)
            for (int f = 0; f < 3; f++)
                for (int e = 0; e < uc.n_expert[f]; e++)
                    CHECK(std::equal(s.params.begin() + si.at(l, f), s.params.begin() + si.at(l, f) + si.each(),
                                     u.params.begin() + ui.at(l, mot_expert_copy(uc, f, e))));
    }
    for (int p : {P_EMB, P_WQ, P_GFFN, P_HEAD})
        CHECK(std::equal(s.params.begin() + s.tab.p[p].offset, s.params.begin() + s.tab.p[p].offset + s.tab.p[p].size(),
                         u.params.begin() + u.tab.p[p].offset));
    double sq = 0;
    const MotParamInfo& r = u.tab.p[P_WR];
    for (size_t i = 0; i < r.size(); i++) sq += u.params[r.offset + i] * u.params[r.offset + i];
    CHECK(std::sqrt(sq / r.size()) == doctest::Approx(0.02).epsilon(0.15));
    // an upcycled model trains on
    CHECK(run("./mot --data " + data + " --init-from " + tmp("up.ckpt") + " --steps 3", &out) == 0);
}

TEST_CASE("mot --experts: bad lists, bad counts and bad upcycling sources are one-line errors with no output") {
    const std::string data = "--data " + shard("bad_0.bin", 8) + MODEL + " --steps 2";
    expect_error(data + " --experts 4,1", "bad value for --experts: '4,1' (expected one count, or 3", 2);
    expect_error(data + " --dense --experts 4,1,1", "bad value for --experts: '4,1,1'", 2);
    expect_error(data + " --tie-ffn --experts 4,4,4", "bad value for --experts", 2);
    expect_error(data + " --experts 4,4,4,4", "at most 3 counts", 2);
    expect_error(data + " --experts 0", "bad value for --experts: '0' (expected an integer in [1, 64])", 2);
    expect_error(data + " --experts 65", "bad value for --experts: '65'", 2);
    expect_error(data + " --experts 99999999999999999999", "bad value for --experts", 2);
    expect_error(data + " --experts 4,-1,1", "bad value for --experts: '-1'", 2);
    std::string out;
    REQUIRE(run("./mot " + data + " --save " + tmp("src32.ckpt"), &out) == 0);
    REQUIRE(run("./mot " + data + " --experts 2 --save " + tmp("e2.ckpt"), &out) == 0);
    // a source of another shape, a source that already has other experts
    expect_error(data + " --dim 64 --experts 4 --init-from " + tmp("src32.ckpt"),
                 "src32.ckpt: config does not match: d_model");
    expect_error(data + " --dense --experts 4 --init-from " + tmp("src32.ckpt"),
                 "src32.ckpt: config does not match: n_tower");
    expect_error(data + " --experts 4 --init-from " + tmp("e2.ckpt"),
                 "e2.ckpt: config does not match: n_expert[0] is 2");
}

TEST_CASE("mot with experts trains on the GPU path: the GPU build on the CPU says so") {
    // ./mot_cpu_cuda is the GPU trainer run by the CUDA-on-CPU layer (built by make test, which
    // builds it before this test runs); mot.cu has experts, so there is no fallback to the CPU
    if (access("./mot_cpu_cuda", X_OK) != 0)
        FAIL("./mot_cpu_cuda is not built (make mot_cpu_cuda; make test builds it)");
    const std::string data = shard("gpu_0.bin", 9);
    std::string out;
    REQUIRE(run("./mot_cpu_cuda --data " + data + MODEL + " --steps 2 --dense --experts 4", &out) == 0);
    INFO(out);
    CHECK(out.find("device: the GPU code on the CPU") != std::string::npos);
    CHECK(out.find("device: CPU reference") == std::string::npos);
    CHECK(out.find("step     2/2") != std::string::npos);
}
