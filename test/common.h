// common.h — helpers shared by the tests: random batches (test_mot, test_gpu, test_experts) and
// Transfusion batches (test_transfusion, test_gpu); for the tests that write files and run commands
// (test_files, test_crash, test_experts, test_transfusion, test_cuda_cpu), a temporary folder, byte
// I/O, a shell runner, a small mixed-modality shard and documents of the Transfusion form.
// Include doctest first.
#pragma once
#include <sys/wait.h>

#include <cstdio>
#include <string>
#include <vector>

#include "mot.h"

// Random tokens drawn from the modalities `mods`, random targets likewise, two of them ignored
// (the second and the last position).
// Random parameters for the finite-difference checks: matrices N(0, 0.3^2), gains near 1, large
// enough that the finite differences are not dominated by rounding.
template <typename S>
static inline void randomize(MotModel<S>* m, uint64_t seed) {
    for (int p = 0; p < P_COUNT; p++) {
        const MotParamInfo& in = m->tab.p[p];
        for (size_t i = 0; i < in.size(); i++)
            m->params[in.offset + i] = S(in.decay ? 0.3 * mot_rand_normal(&seed) : 1.0 + 0.2 * mot_rand_normal(&seed));
    }
}

static inline MotBatch random_batch(const MotConfig& c, int B, int T, uint64_t seed,
                                    std::vector<int> mods = {0, 1, 2}) {
    MotBatch b;
    b.B = B;
    b.T = T;
    auto draw = [&](uint64_t* s) {
        int m = mods[mot_rand_u64(s) % mods.size()];
        int lo = m == 0 ? 0 : m == 1 ? c.image_begin : c.speech_begin;
        int hi = m == 0 ? c.image_begin : m == 1 ? c.speech_begin : c.vocab;
        return lo + (int)(mot_rand_u64(s) % (hi - lo));
    };
    for (int i = 0; i < B * T; i++) {
        b.tokens.push_back(draw(&seed));
        b.targets.push_back(draw(&seed));
    }
    b.targets[1] = MOT_IGNORE;
    b.targets[B * T - 1] = MOT_IGNORE;
    mot_group(c, &b);
    return b;
}

// A document of the Transfusion form with small images of `np` patches:
//   BOS text text BOI [np image positions] EOI BOA speech speech EOA EOS ...
// repeated to length T + 1; targets are the next tokens. Image k of the batch gets step t[k % t.size()].
static inline MotBatch tf_batch(const MotConfig& c, int B, int T, uint64_t seed, std::vector<int> ts, int np = 4) {
    MotBatch b;
    b.B = B;
    b.T = T;
    int img = 0;
    for (int s = 0; s < B; s++) {
        std::vector<int> doc, tstep;
        while ((int)doc.size() < T + 1) {
            doc.push_back(MOT_BOS);
            for (int i = 0; i < 2; i++) doc.push_back(8 + (int)(mot_rand_u64(&seed) % 4));
            doc.push_back(MOT_BOI);
            const int t = ts[img++ % ts.size()];
            for (int i = 0; i < np; i++) {
                doc.push_back(c.image_begin);
                tstep.resize(doc.size(), 0);
                tstep.back() = t;
            }
            doc.push_back(MOT_EOI);
            doc.push_back(MOT_BOA);
            for (int i = 0; i < 2; i++) doc.push_back(c.speech_begin + (int)(mot_rand_u64(&seed) % 6));
            doc.push_back(MOT_EOA);
            doc.push_back(MOT_EOS);
        }
        tstep.resize(doc.size(), 0);
        for (int t = 0; t < T; t++) {
            b.tokens.push_back(doc[t]);
            b.targets.push_back(doc[t + 1]);
            b.tstep.push_back(mot_modality(c, doc[t]) == MOD_IMAGE ? tstep[t] : 0);
        }
    }
    for (size_t i = 0; i < b.tokens.size() * MOT_PATCH; i++) {
        b.xin.push_back(float(mot_rand_normal(&seed)));
        b.eps.push_back(float(mot_rand_normal(&seed)));
    }
    mot_group(c, &b);
    return b;
}

// Feeds the first n tokens of sequence 0 of b (forwarded already) through the KV-cached decoder and
// returns the largest |decoded logit - full-forward logit|; m must be in double.
static inline double kv_decode_worst(MotModel<double>* m, const MotBatch& b, int n, MotKVCache<double>* kv) {
    const MotConfig& c = m->cfg;
    mot_kv_init(kv, c, c.max_seq);
    std::vector<double> lg(c.vocab);
    double worst = 0;
    for (int i = 0; i < n; i++) {
        REQUIRE(mot_decode_step(m, kv, b.tokens[i], lg.data()));
        for (int v = 0; v < c.vocab; v++) worst = std::max(worst, std::fabs(lg[v] - mot_logit(*m, b, i, v)));
    }
    return worst;
}

// ---- files and commands -----------------------------------------------------------------------
static const MotVocab VOC{64, 24, 48};  // text [0,24) image [24,48) speech [48,64)

// One fresh folder per test process.
static inline std::string tmpdir() {
    static std::string d;
    if (d.empty()) {
        char t[] = "/tmp/mot_test_XXXXXX";
        REQUIRE(mkdtemp(t) != nullptr);
        d = t;
    }
    return d;
}
static inline std::string tmp(const std::string& name) { return tmpdir() + "/" + name; }

static inline void write_bytes(const std::string& path, const std::string& bytes) {
    FILE* f = fopen(path.c_str(), "wb");
    REQUIRE(f);
    fwrite(bytes.data(), 1, bytes.size(), f);
    fclose(f);
}
// The whole file, or "" when it cannot be opened.
static inline std::string read_bytes(const std::string& path) {
    std::string s;
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) return s;
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, n);
    fclose(f);
    return s;
}
// Runs a shell command; its stdout and stderr land in *out. Returns the exit status (128: killed).
static inline int run(const std::string& cmd, std::string* out) {
    FILE* p = popen((cmd + " 2>&1").c_str(), "r");
    REQUIRE(p);
    char buf[4096];
    out->clear();
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, p)) > 0) out->append(buf, n);
    const int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

// Documents mixing the three modalities the way the dataset does: BOS text BOI image EOI BOA
// speech EOA EOS, ids drawn from VOC's ranges.
static inline std::vector<uint16_t> make_tokens(size_t n, uint64_t seed) {
    std::vector<uint16_t> t;
    while (t.size() < n) {
        t.push_back(MOT_BOS);
        for (int i = 0; i < 5; i++) t.push_back(8 + mot_rand_u64(&seed) % 16);
        t.push_back(MOT_BOI);
        for (int i = 0; i < 6; i++) t.push_back(24 + mot_rand_u64(&seed) % 24);
        t.push_back(MOT_EOI);
        t.push_back(MOT_BOA);
        for (int i = 0; i < 4; i++) t.push_back(48 + mot_rand_u64(&seed) % 16);
        t.push_back(MOT_EOA);
        t.push_back(MOT_EOS);
    }
    t.resize(n);
    return t;
}
// A 20,000-token shard of such documents in the temporary folder; returns its path.
static inline std::string write_shard(const std::string& name, uint64_t seed) {
    const std::vector<uint16_t> t = make_tokens(20000, seed);
    std::string err;
    REQUIRE_MESSAGE(mot_write_shard(tmp(name), VOC, t.data(), t.size(), &err), err);
    return tmp(name);
}

// Documents like the dataset's: BOS caption BOI [49] EOI EOS, BOS BOI [49] EOI caption EOS (image
// first), BOS BOA speech EOA EOS; image k's pixels are (k * 7 + i) % 256.
static inline std::vector<uint16_t> tf_tokens(int docs, uint64_t seed, int* n_images) {
    std::vector<uint16_t> t;
    *n_images = 0;
    for (int d = 0; d < docs; d++) {
        const int kind = d % 3;
        t.push_back(MOT_BOS);
        if (kind == 0) t.push_back(8 + mot_rand_u64(&seed) % 16);
        if (kind < 2) {
            t.push_back(MOT_BOI);
            for (int i = 0; i < MOT_IMAGE_POS; i++) t.push_back(VOC.image_begin);
            t.push_back(MOT_EOI);
            ++*n_images;
        } else {
            t.push_back(MOT_BOA);
            t.push_back(VOC.speech_begin + mot_rand_u64(&seed) % 16);
            t.push_back(MOT_EOA);
        }
        if (kind == 1) t.push_back(8 + mot_rand_u64(&seed) % 16);
        t.push_back(MOT_EOS);
    }
    return t;
}
static inline std::vector<uint8_t> tf_pixels(int n_images) {
    std::vector<uint8_t> p((size_t)n_images * MOT_IMAGE_PIXELS);
    for (size_t i = 0; i < p.size(); i++) p[i] = uint8_t((i / MOT_IMAGE_PIXELS * 7 + i) % 256);
    return p;
}
