// mot.h — Mixture-of-Transformers: the model definition shared by the CPU and GPU paths,
// the plain C++ CPU reference (forward, backward, AdamW) and the file formats.
//
// Read this file top to bottom. The math is dev/MATH.md; in short: every weight
// (Q/K/V/O, QK-norm gains, FFN, norm gains) has one copy per modality ("tower"), attention is
// global over the whole interleaved sequence, and the embedding and output head are shared.
// The dense baseline is this same code with one tower. The Transfusion setting (images as 49
// pixel patches trained by diffusion, dev/MATH.md section 7) is a config switch: its pieces
// sit beside what they extend (patch input and timestep embedding beside the embedding, the
// image-block mask in attention, the noise loss beside cross_entropy, DDIM beside the decoder).
//
// Layout of the file (sections 1-6 are the reading path: plain loops, no processor-specific code):
//   1. vocabulary and config          6. AdamW and the learning-rate schedule
//   2. parameter table                7. fast paths: the fast twin of each plain function that has
//   3. batches, grouping, batch plan     one (matmul_fast, ...); -DMOT_PLAIN switches them all off
//   4. matmul, plain                  8. files: token shards and loader, checkpoint, debug state
//   5. the CPU reference: layers,     9. generation: one token at a time with a KV cache
//      forward and backward side by side
//
// Everything is a template on the scalar type S: float for training, double for gradient checks.
// The header is self-contained (no implementation define needed): all functions are inline.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>
#include <glob.h>
#include <cstdlib>
#include <new>
#include <stdexcept>
#include <cerrno>
#include <fcntl.h>
#include <unistd.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MOT_BF16_X86 1  // the bf16 engines of section 7 (AMX, AVX512-BF16), chosen at run time
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#else
inline int omp_in_parallel() { return 0; }
inline int omp_get_level() { return 0; }
inline int omp_get_max_threads() { return 1; }
inline int omp_get_thread_num() { return 0; }
inline int omp_get_num_threads() { return 1; }
inline int omp_get_num_procs() { return 1; }
inline void omp_set_num_threads(int) {}
#endif

// ============================================================================================
// 1. Vocabulary and config
// ============================================================================================
// One vocabulary of V ids in contiguous ranges: special tokens, text (BPE), image codes, speech
// units. Special tokens count as text. modality(id) is a pure function of the id.
enum MotSpecial {
    MOT_PAD = 0,
    MOT_BOS = 1,
    MOT_EOS = 2,
    MOT_BOI = 3,
    MOT_EOI = 4,
    MOT_BOA = 5,
    MOT_EOA = 6,
    MOT_N_SPECIAL = 8
};
enum MotModality { MOD_TEXT = 0, MOD_IMAGE = 1, MOD_SPEECH = 2, MOT_N_MOD = 3 };
static const char* const MOT_MOD_NAME[MOT_N_MOD] = {"text", "image", "speech"};
static const int32_t MOT_IGNORE = -1;  // a target that contributes nothing to the loss

struct MotVocab {
    int32_t vocab = 0;         // V: ids are [0, V)
    int32_t image_begin = 0;   // text (with the specials) is [0, image_begin)
    int32_t speech_begin = 0;  // image is [image_begin, speech_begin), speech is [speech_begin, V)
};

struct MotConfig {
    int32_t n_layer = 4, d_model = 256, n_head = 8, d_ff = 768;
    int32_t vocab = 4096, image_begin = 2048, speech_begin = 3072;
    int32_t max_seq = 256;
    int32_t n_tower = 3;                              // 3 = MoT (one tower per modality), 1 = dense
    int32_t tie_attn = 0, tie_ffn = 0, tie_norm = 0;  // 1 = that component has one shared copy
    // Experts of each FFN copy (section 5, "Experts"): entry f is FFN copy f, i.e. tower f, or the one
    // FFN when it is tied or dense (then only entry 0 may exceed 1). 1 = the plain FFN, no router.
    int32_t n_expert[MOT_N_MOD] = {1, 1, 1};
    // MOT_SETTING_TOKENS: every position is a token (Chameleon). MOT_SETTING_TRANSFUSION: image
    // positions carry a 16-value pixel patch and are trained by diffusion (section 5, "Transfusion").
    int32_t setting = 0;
};
enum MotSetting { MOT_SETTING_TOKENS = 0, MOT_SETTING_TRANSFUSION = 1 };
enum { MOT_CONFIG_INTS = 16, MOT_CONFIG_INTS_V1 = 12, MOT_CONFIG_INTS_V2 = 15, MOT_MAX_EXPERT = 64 };
static const char* const MOT_CONFIG_NAMES[MOT_CONFIG_INTS] = {
    "n_layer", "d_model",  "n_head",  "d_ff",     "vocab",       "image_begin", "speech_begin", "max_seq",
    "n_tower", "tie_attn", "tie_ffn", "tie_norm", "n_expert[0]", "n_expert[1]", "n_expert[2]",  "setting"};
inline void mot_config_to_ints(const MotConfig& c, int32_t o[MOT_CONFIG_INTS]) {
    int32_t v[MOT_CONFIG_INTS] = {c.n_layer,      c.d_model,     c.n_head,      c.d_ff,     c.vocab,   c.image_begin,
                                  c.speech_begin, c.max_seq,     c.n_tower,     c.tie_attn, c.tie_ffn, c.tie_norm,
                                  c.n_expert[0],  c.n_expert[1], c.n_expert[2], c.setting};
    memcpy(o, v, sizeof v);
}
inline MotConfig mot_config_from_ints(const int32_t v[MOT_CONFIG_INTS]) {
    MotConfig c;
    c.n_layer = v[0];
    c.d_model = v[1];
    c.n_head = v[2];
    c.d_ff = v[3];
    c.vocab = v[4];
    c.image_begin = v[5];
    c.speech_begin = v[6];
    c.max_seq = v[7];
    c.n_tower = v[8];
    c.tie_attn = v[9];
    c.tie_ffn = v[10];
    c.tie_norm = v[11];
    c.n_expert[0] = v[12];
    c.n_expert[1] = v[13];
    c.n_expert[2] = v[14];
    c.setting = v[15];
    return c;
}
inline bool mot_transfusion(const MotConfig& c) { return c.setting == MOT_SETTING_TRANSFUSION; }

// FFN copy f has n_expert[f] experts. The experts of all copies are the copies of w1, w3, w2, in
// order (copy f's experts first at mot_expert_copy(f, 0)); with one expert each this is the plain
// per-tower layout. Copies with more than one expert also own that many rows of the router wr and
// the auxiliary router u, in the same order.
inline int mot_ffn_copies(const MotConfig& c) { return c.tie_ffn ? 1 : c.n_tower; }
inline int mot_ffn_copy_of_mod(const MotConfig& c, int md) { return mot_ffn_copies(c) == 1 ? 0 : md; }
inline int mot_expert_copy(const MotConfig& c, int f, int e) {
    int k = e;
    for (int g = 0; g < f; g++) k += c.n_expert[g];
    return k;
}
inline int mot_router_copy(const MotConfig& c, int f, int e) {
    int k = e;
    for (int g = 0; g < f; g++) k += c.n_expert[g] > 1 ? c.n_expert[g] : 0;
    return k;
}
// How experts choose rows: expert choice over the batch (training, "EC" evaluation), or each row
// alone through the auxiliary routers ("causal": evaluation, generation, the KV cache).
enum MotRoute { MOT_ROUTE_EC = 0, MOT_ROUTE_CAUSAL = 1 };
static const double MOT_AUX_WEIGHT = 0.01;  // weight of the aux-router BCE in the training objective
inline bool mot_has_experts(const MotConfig& c) {
    for (int f = 0; f < mot_ffn_copies(c); f++)
        if (c.n_expert[f] > 1) return true;
    return false;
}
// The FFN copies whose rows skip the sublayer's own norm (bit f: copy f has E > 1 experts, each
// of which normalises its own output; rmsnorm_forward's gain_only).
inline unsigned mot_gain_only_copies(const MotConfig& c) {
    unsigned m = 0;
    for (int f = 0; f < mot_ffn_copies(c); f++)
        if (c.n_expert[f] > 1) m |= 1u << f;
    return m;
}
inline MotVocab mot_vocab(const MotConfig& c) { return MotVocab{c.vocab, c.image_begin, c.speech_begin}; }

inline int mot_modality(const MotConfig& c, int id) {
    return id < c.image_begin ? MOD_TEXT : id < c.speech_begin ? MOD_IMAGE : MOD_SPEECH;
}

// Bounds on a config: generous for any model this code can train, small enough that the
// parameter count (< 2^52) and every byte size derived from it stay exact in 64 bits.
enum { MOT_MAX_LAYER = 4096, MOT_MAX_DIM = 65536, MOT_MAX_FFN = 1 << 20, MOT_MAX_SEQ = 1 << 20 };

// Returns "" when the config is usable, else what is wrong with it.
inline std::string mot_config_error(const MotConfig& c) {
    char b[200];
    if (c.n_layer < 1 || c.d_model < 2 || c.n_head < 1 || c.d_ff < 1 || c.max_seq < 1) return "sizes must be positive";
    // Upper bounds keep every size computed from a config (parameter table, activations,
    // file sizes) far below 2^63, so a hostile file header cannot make them wrap.
    if (c.n_layer > MOT_MAX_LAYER || c.d_model > MOT_MAX_DIM || c.d_ff > MOT_MAX_FFN || c.max_seq > MOT_MAX_SEQ) {
        snprintf(b, sizeof b, "sizes too large (at most %d layers, d_model %d, d_ff %d, max_seq %d)", MOT_MAX_LAYER,
                 MOT_MAX_DIM, MOT_MAX_FFN, MOT_MAX_SEQ);
        return b;
    }
    if (c.d_model % c.n_head) {
        snprintf(b, sizeof b, "d_model %d is not a multiple of n_head %d", c.d_model, c.n_head);
        return b;
    }
    if ((c.d_model / c.n_head) % 2) return "head dimension d_model/n_head must be even (RoPE rotates pairs)";
    if (c.n_tower != 1 && c.n_tower != MOT_N_MOD) return "n_tower must be 1 (dense) or 3 (MoT)";
    if (!(MOT_N_SPECIAL <= c.image_begin && c.image_begin <= c.speech_begin && c.speech_begin <= c.vocab))
        return "vocabulary ranges must satisfy 8 <= image_begin <= speech_begin <= vocab";
    if (c.vocab > 65536) return "vocab must be at most 65536 (shards store uint16 ids)";
    for (int t : {c.tie_attn, c.tie_ffn, c.tie_norm})
        if (t != 0 && t != 1) return "tie switches must be 0 or 1";
    for (int f = 0; f < MOT_N_MOD; f++) {
        if (c.n_expert[f] < 1 || c.n_expert[f] > MOT_MAX_EXPERT) {
            snprintf(b, sizeof b, "n_expert must be in [1, %d] (got %d)", (int)MOT_MAX_EXPERT, c.n_expert[f]);
            return b;
        }
        if (f >= mot_ffn_copies(c) && c.n_expert[f] != 1)
            return "n_expert: only the first entry is used when the FFN has one copy (dense or tied); the others must be 1";
    }
    if (c.setting != MOT_SETTING_TOKENS && c.setting != MOT_SETTING_TRANSFUSION)
        return "setting must be 0 (tokens) or 1 (transfusion)";
    if (mot_transfusion(c) && mot_has_experts(c))
        return "experts are not supported in the Transfusion setting (expert choice would mix noised image rows across the batch)";
    if (mot_transfusion(c) && c.image_begin == c.speech_begin)
        return "the Transfusion setting needs an image id range (image positions are marked by image ids)";
    return "";
}

// ============================================================================================
// 2. Parameter table: every tensor, its shape, its number of tower copies, decayed or not.
// All parameters live in one allocation, in this order; tensor p of layer l, copy c starts at
// offset + (l * copies + c) * rows * cols. Gradients and Adam moments use the same layout.
// ============================================================================================
// The last five serve only image positions in the Transfusion setting (one copy each; none at all
// in the token setting, so token-setting files are unchanged).
enum MotParam {
    P_EMB,
    P_WQ,
    P_WK,
    P_WV,
    P_WO,
    P_GQ,
    P_GK,
    P_GATTN,
    P_W1,
    P_W3,
    P_W2,
    P_WR,
    P_U,
    P_GFFN,
    P_GOUT,
    P_HEAD,
    P_WIN,
    P_BIN,
    P_WT,
    P_WOUT,
    P_BOUT,
    P_COUNT
};
enum { MOT_PATCH = 16, MOT_IMAGE_POS = 49, MOT_IMAGE_SIDE = 28 };  // 4x4 patches, 7x7 of them, 28x28 pixels
enum MotPart { PART_SHARED, PART_ATTN, PART_FFN, PART_NORM };      // which tying switch governs it

struct MotParamInfo {
    const char* name;
    int part;  // MotPart
    int layers, copies, rows, cols;
    bool decay;     // AdamW weight decay: matrices and embedding yes, gains no
    size_t offset;  // in elements, from the start of the allocation
    size_t each() const { return (size_t)rows * cols; }
    size_t size() const { return (size_t)layers * copies * rows * cols; }
    size_t at(int layer, int copy) const { return offset + ((size_t)layer * copies + copy) * each(); }
};
struct MotParamTable {
    MotParamInfo p[P_COUNT];
    size_t total;
};

inline MotParamTable mot_param_table(const MotConfig& c) {
    const int D = c.d_model, Dh = c.d_model / c.n_head, F = c.d_ff, V = c.vocab, L = c.n_layer, K = c.n_tower;
    const int ka = c.tie_attn ? 1 : K, kn = c.tie_norm ? 1 : K;
    // FFN: one copy per expert (one per tower without experts); routers: one row per expert of the
    // copies that have more than one (none without experts). Stored E x D, so r = h wr^T.
    const int kf = mot_expert_copy(c, mot_ffn_copies(c), 0), kr = mot_router_copy(c, mot_ffn_copies(c), 0);
    const int tf = mot_transfusion(c) ? 1 : 0, P = MOT_PATCH;
    // (the table's columns are aligned by hand)
    // clang-format off
    MotParamTable t{{
        {"emb",    PART_SHARED, 1, 1,  V, D,  true,  0},
        {"wq",     PART_ATTN,   L, ka, D, D,  true,  0},
        {"wk",     PART_ATTN,   L, ka, D, D,  true,  0},
        {"wv",     PART_ATTN,   L, ka, D, D,  true,  0},
        {"wo",     PART_ATTN,   L, ka, D, D,  true,  0},
        {"gq",     PART_ATTN,   L, ka, 1, Dh, false, 0},
        {"gk",     PART_ATTN,   L, ka, 1, Dh, false, 0},
        {"g_attn", PART_NORM,   L, kn, 1, D,  false, 0},
        {"w1",     PART_FFN,    L, kf, D, F,  true,  0},
        {"w3",     PART_FFN,    L, kf, D, F,  true,  0},
        {"w2",     PART_FFN,    L, kf, F, D,  true,  0},
        {"wr",     PART_FFN,    L, kr, 1, D,  true,  0},
        {"u",      PART_FFN,    L, kr, 1, D,  true,  0},
        {"g_ffn",  PART_NORM,   L, kn, 1, D,  false, 0},
        {"g_out",  PART_NORM,   1, kn, 1, D,  false, 0},
        {"head",   PART_SHARED, 1, 1,  D, V,  true,  0},
        {"w_in",   PART_SHARED, 1, tf, P, D,  true,  0},   // patch -> model width
        {"b_in",   PART_SHARED, 1, tf, 1, D,  false, 0},
        {"w_t",    PART_SHARED, 1, tf, D, D,  true,  0},   // timestep sinusoid -> model width
        {"w_out",  PART_SHARED, 1, tf, D, P,  true,  0},   // final norm -> predicted noise
        {"b_out",  PART_SHARED, 1, tf, 1, P,  false, 0},
    }, 0};
    // clang-format on
    for (int i = 0; i < P_COUNT; i++) {
        t.p[i].offset = t.total;
        t.total += t.p[i].size();
    }
    return t;
}

// Deterministic random numbers (splitmix64): the same stream on every machine and compiler.
inline uint64_t mot_rand_u64(uint64_t* s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
inline double mot_rand_uniform(uint64_t* s) { return (mot_rand_u64(s) >> 11) * (1.0 / 9007199254740992.0); }
inline double mot_rand_normal(uint64_t* s) {  // Box-Muller; one draw per call keeps the stream simple
    double u1 = mot_rand_uniform(s), u2 = mot_rand_uniform(s);
    return sqrt(-2.0 * log(u1 + 1e-300)) * cos(6.283185307179586 * u2);
}

// ============================================================================================
// 3. Batches, grouping by modality and the batch plan
// ============================================================================================
// A batch is B rows of T tokens with their next-token targets, in original order (index b*T+t).
// All model activations are kept in GROUPED order: rows sorted by modality (stable), so each
// tower's rows are one contiguous range and every per-tower projection is one plain matmul.
// The grouping is an index list computed once per batch, on the host, before the step starts.
struct MotBatch {
    int B = 0, T = 0;
    std::vector<int32_t> tokens, targets;         // [B*T], original order; target MOT_IGNORE = no loss
    std::vector<int32_t> order;                   // grouped row r -> original index b*T+t
    std::vector<int32_t> row_of;                  // original index -> grouped row
    int32_t group[MOT_N_MOD + 1] = {0, 0, 0, 0};  // rows [group[m], group[m+1]) have modality m
    // Attention: position t of a sequence sees positions 0 .. vis[b*T+t] (t itself when causal;
    // in the Transfusion setting, the end of its image block). Set by mot_group.
    std::vector<int32_t> vis;
    // Transfusion setting only (empty otherwise), original order. An image position (its token is
    // any image id) has the model input xin (the noised patch x_t, 16 values), the step t of its
    // image in tstep (0 = clean: no diffusion loss) and the noise eps it must predict. The loader
    // draws t and eps (mot_diffuse); tests set them directly.
    std::vector<float> xin, eps;  // [B*T*16]
    std::vector<int32_t> tstep;   // [B*T], 0..1000
};

inline void mot_group(const MotConfig& c, MotBatch* b) {
    const int N = b->B * b->T;
    b->order.resize(N);
    b->row_of.resize(N);
    int count[MOT_N_MOD] = {0, 0, 0};
    for (int i = 0; i < N; i++) count[mot_modality(c, b->tokens[i])]++;
    b->group[0] = 0;
    for (int m = 0; m < MOT_N_MOD; m++) b->group[m + 1] = b->group[m] + count[m];
    int next[MOT_N_MOD] = {b->group[0], b->group[1], b->group[2]};
    for (int i = 0; i < N; i++) {
        int r = next[mot_modality(c, b->tokens[i])]++;
        b->order[r] = i;
        b->row_of[i] = r;
    }
    // Causal, except that in the Transfusion setting each run of consecutive image positions (one
    // image: the data put BOI and EOI around each 49) is a block whose positions all see each other.
    b->vis.resize(N);
    for (int s = 0; s < b->B; s++)
        for (int t = 0; t < b->T; t++) {
            const int i = s * b->T + t;
            b->vis[i] = t;
            if (!mot_transfusion(c) || mot_modality(c, b->tokens[i]) != MOD_IMAGE) continue;
            int e = t;
            while (e + 1 < b->T && mot_modality(c, b->tokens[i + e + 1 - t]) == MOD_IMAGE) e++;
            for (int u = t; u <= e; u++) b->vis[s * b->T + u] = e;
            t = e;
        }
}

// ---- Transfusion: noise schedule and timestep embedding (dev/MATH.md, section 7) ---------
enum { MOT_DIFF_STEPS = 1000 };
static const double MOT_DIFF_WEIGHT = 5.0;  // the image MSE's weight in the training loss
// Cosine schedule: f(t) = cos^2(((t/1000) + 0.008)/1.008 * pi/2), beta_t = min(1 - f(t)/f(t-1), 0.999),
// abar(t) = prod over s <= t of (1 - beta_s); abar(0) = 1 (the clean image).
inline double mot_abar(int t) {
    static const std::vector<double> table = [] {
        std::vector<double> a(MOT_DIFF_STEPS + 1, 1.0);
        auto f = [](int s) {
            double c = cos((s / 1000.0 + 0.008) / 1.008 * M_PI / 2);
            return c * c;
        };
        for (int s = 1; s <= MOT_DIFF_STEPS; s++) a[s] = a[s - 1] * (1.0 - std::min(1.0 - f(s) / f(s - 1), 0.999));
        return a;
    }();
    return table[std::max(0, std::min(t, (int)MOT_DIFF_STEPS))];
}
// Weighting of the diffusion loss: a training option (the trainer's --diffusion-loss), not part of
// the model, which predicts eps and samples the same way under either; so it is not stored in
// checkpoints, like the learning rate. MOT_DIFF_MSE is the paper's plain MSE (the default).
// MOT_DIFF_MIN_SNR is min-SNR-gamma (Hang et al. 2023): each noised position's squared error is
// weighted by w(t) = min(SNR, gamma) / SNR = min(1, gamma / SNR), SNR = abar / (1 - abar).
// Why it is meant to help the high-noise end: a squared eps error e implies an x0 error e / SNR, so
// the plain eps MSE is an x0 loss weighted by SNR; and most of it (and of its gradient) comes from
// low t, where eps is nearly unpredictable (noise MSE 0.5-1 at t = 1 in dev/RESULTS.md's runs, 0.01
// at t = 1000) and the image barely changes. min-SNR leaves t >= 262 (SNR <= 5 on this schedule) at
// weight 1 and cuts the weight below it (0.56 at t = 200, 0.04 at t = 50, 2e-4 at t = 1): high t
// gains no weight, low t loses it, so high t gets a larger share of each (Adam-normalised) update.
// Mean weight over t uniform in 1..1000: 0.82. Measured effect: dev/RESULTS.md ("min-SNR").
enum MotDiffLoss { MOT_DIFF_MSE = 0, MOT_DIFF_MIN_SNR = 1 };
static const double MOT_MIN_SNR_GAMMA = 5.0;
inline double mot_diff_loss_weight(int mode, int t) {
    if (mode != MOT_DIFF_MIN_SNR || t <= 0) return 1.0;
    const double a = mot_abar(t);
    return std::min(1.0, MOT_MIN_SNR_GAMMA * (1 - a) / a);
}
// sinusoid(t) = [sin(t w_j) || cos(t w_j)], w_j = 10000^(-2j/D), j = 0..D/2-1 (D even).
template <typename S>
void mot_sinusoid(S* out, int t, int D) {
    for (int j = 0; j < D / 2; j++) {
        const double w = pow(10000.0, -2.0 * j / D);
        out[j] = S(sin(t * w));
        out[D / 2 + j] = S(cos(t * w));
    }
}
// x_t = sqrt(abar(t)) x0 + sqrt(1 - abar(t)) eps, for one patch of n values.
inline void mot_noise_patch(float* xt, const float* x0, const float* eps, int t, int n) {
    const double a = mot_abar(t);
    for (int j = 0; j < n; j++) xt[j] = float(sqrt(a) * x0[j] + sqrt(1 - a) * eps[j]);
}

// Calls fn(copy, r0, r1) for each contiguous row range that uses one copy of a component:
// one call over all rows when the component is tied (or dense), else one per present modality.
template <class Fn>
inline void mot_for_each_copy(int copies, const int32_t* group, Fn fn) {
    if (copies == 1) {
        if (group[MOT_N_MOD] > 0) fn(0, 0, group[MOT_N_MOD]);
        return;
    }
    for (int m = 0; m < MOT_N_MOD; m++)
        if (group[m + 1] > group[m]) fn(m, group[m], group[m + 1]);
}

// ---- the batch plan ----------------------------------------------------------------------------
// The rows of an FFN copy: all rows when the FFN is shared (dense, tied), else its modality's.
inline void mot_ffn_rows(const MotConfig& c, const int32_t* group, int f, int* r0, int* r1) {
    *r0 = mot_ffn_copies(c) == 1 ? 0 : group[f];
    *r1 = mot_ffn_copies(c) == 1 ? group[MOT_N_MOD] : group[f + 1];
}

// The slot layout of a batch depends only on its row counts: computed on the host once per batch.
// With one expert per copy, slot j of copy f is row r0 + j (the plain layout).
inline void mot_expert_slots(const MotConfig& c, const int32_t* group, int32_t* slot0, int32_t* cap) {
    int at = 0;
    for (int f = 0; f < MOT_N_MOD; f++) {
        slot0[f] = at;
        cap[f] = 0;
        if (f >= mot_ffn_copies(c)) continue;
        int r0, r1;
        mot_ffn_rows(c, group, f, &r0, &r1);
        const int E = c.n_expert[f];
        cap[f] = (r1 - r0 + E - 1) / E;
        at += E * cap[f];
    }
    slot0[MOT_N_MOD] = at;
}

// Rows of a batch that copies with experts route, in one layer: the denominator of the aux routers'
// agreement (the plan's expert_rows).
inline long mot_expert_rows(const MotConfig& c, const int32_t* group) {
    long rows = 0;
    for (int f = 0; f < mot_ffn_copies(c); f++) {
        int r0, r1;
        mot_ffn_rows(c, group, f, &r0, &r1);
        if (c.n_expert[f] > 1) rows += r1 - r0;
    }
    return rows;
}

// The LM target of original position i, or MOT_IGNORE. In the Transfusion setting only positions
// whose input and target are both discrete tokens count: not an image position, not BOI (whose
// target is a patch).
inline int mot_lm_target(const MotConfig& c, const MotBatch& b, int i) {
    const int tgt = b.targets[i];
    if (tgt < 0) return MOT_IGNORE;
    if (mot_transfusion(c) && (mot_modality(c, b.tokens[i]) == MOD_IMAGE || mot_modality(c, tgt) == MOD_IMAGE))
        return MOT_IGNORE;
    return tgt;
}

// Everything the host derives from a grouped batch, computed once per forward by mot_plan and
// read by the CPU forward and backward and by the GPU's upload alike, so the two cannot drift
// apart: per-row lists in grouped order, the target counts, the expert slots, the embedding
// gradient's lists and the Transfusion steps. (RoPE's tables depend on the config alone:
// mot_rope_tables, built once per model.)
struct MotPlan {
    int N = 0, group[MOT_N_MOD + 1] = {0, 0, 0, 0};  // as the batch's
    std::vector<int32_t> tok, tgt, pos;              // per grouped row: token, LM target (mot_lm_target), position t
    int n_valid = 0, n_mod[MOT_N_MOD] = {0, 0, 0};   // LM targets, in all and per target modality
    // experts: expert e of FFN copy f keeps cap[f] rows, in slots slot0[f] + e cap[f] ..;
    // expert_rows: rows routed by copies with experts in one layer (the aux agreement's denominator)
    int32_t slot0[MOT_N_MOD + 1] = {0, 0, 0, 0}, cap[MOT_N_MOD] = {0, 0, 0};
    long expert_rows = 0;
    // The rows that take an embedding row: all but the Transfusion image rows [i0, i1), which take
    // patches. Sorted by token, then row: token emb_tok[u] sits in rows emb_rows[emb_start[u] ..
    // emb_start[u+1]), so the embedding gradient adds each token's rows in row order.
    int i0 = 0, i1 = 0;
    std::vector<int32_t> emb_rows, emb_tok, emb_start;
    // Transfusion: the distinct diffusion steps of the image rows, increasing (step_t); image row
    // i0 + k has step step_t[step_of[k]], and the image rows of step s are i0 + step_rows[step_start[s]
    // .. step_start[s+1]), increasing. n_noised: image rows with t >= 1 (the MSE's count).
    std::vector<int32_t> step_t, step_of, step_rows, step_start;
    int n_noised = 0;
};

// Builds the plan of batch b (grouped by mot_group) for config c, checking the batch as it goes:
// returns "" or what is wrong with it (a batch the model cannot run must not index out of bounds).
inline std::string mot_plan(const MotConfig& c, const MotBatch& b, MotPlan* p) {
    const int N = b.B * b.T;
    if (b.B < 1 || b.T < 1 || b.T > c.max_seq)
        return "batch shape " + std::to_string(b.B) + " x " + std::to_string(b.T) + " (max_seq " +
               std::to_string(c.max_seq) + ")";
    if ((int)b.tokens.size() != N || (int)b.targets.size() != N || (int)b.order.size() != N ||
        (int)b.row_of.size() != N || (int)b.vis.size() != N)
        return "batch arrays have the wrong size (call mot_group first)";
    if (b.group[0] != 0 || b.group[MOT_N_MOD] != N) return "batch grouping is inconsistent (call mot_group)";
    const bool tf = mot_transfusion(c);
    if (tf &&
        (b.xin.size() != (size_t)N * MOT_PATCH || b.eps.size() != (size_t)N * MOT_PATCH || (int)b.tstep.size() != N))
        return "a Transfusion batch needs xin, eps (16 each) and tstep per position";
    p->N = N;
    for (int m = 0; m <= MOT_N_MOD; m++) p->group[m] = b.group[m];
    p->tok.resize(N);
    p->tgt.resize(N);
    p->pos.resize(N);
    p->n_valid = 0;
    for (int m = 0; m < MOT_N_MOD; m++) p->n_mod[m] = 0;
    for (int r = 0; r < N; r++) {
        const int i = b.order[r];
        if (i < 0 || i >= N || b.row_of[i] != r) return "order / row_of are not inverse permutations";
        const int tok = b.tokens[i];
        if (tok < 0 || tok >= c.vocab) return "token id outside the vocabulary";
        if (b.targets[i] < MOT_IGNORE || b.targets[i] >= c.vocab) return "target id outside the vocabulary";
        const int m = mot_modality(c, tok);
        if (r < b.group[m] || r >= b.group[m + 1]) return "row is outside its modality's group range";
        p->tok[r] = tok;
        p->tgt[r] = mot_lm_target(c, b, i);
        p->pos[r] = i % b.T;
        if (p->tgt[r] >= 0) p->n_valid++, p->n_mod[mot_modality(c, p->tgt[r])]++;  // the loss's denominators
    }
    // the attention (CPU loops, GPU tile bounds) relies on t <= vis[t] < T, vis non-decreasing in t
    for (int i = 0; i < N; i++) {
        const int t = i % b.T, prev = t > 0 ? b.vis[i - 1] : 0;
        if (b.vis[i] < t || b.vis[i] >= b.T || b.vis[i] < prev)
            return "vis is not a valid attention bound (call mot_group)";
    }
    mot_expert_slots(c, b.group, p->slot0, p->cap);
    p->expert_rows = mot_expert_rows(c, b.group);
    // embedding gradient lists
    p->i0 = b.group[MOD_IMAGE];
    p->i1 = tf ? b.group[MOD_IMAGE + 1] : p->i0;
    p->emb_rows.clear();
    for (int r = 0; r < N; r++)
        if (r < p->i0 || r >= p->i1) p->emb_rows.push_back(r);
    std::stable_sort(p->emb_rows.begin(), p->emb_rows.end(), [&](int x, int y) { return p->tok[x] < p->tok[y]; });
    p->emb_tok.clear();
    p->emb_start.clear();
    for (size_t k = 0; k < p->emb_rows.size(); k++)
        if (k == 0 || p->tok[p->emb_rows[k]] != p->tok[p->emb_rows[k - 1]]) {
            p->emb_tok.push_back(p->tok[p->emb_rows[k]]);
            p->emb_start.push_back((int32_t)k);
        }
    p->emb_start.push_back((int32_t)p->emb_rows.size());
    // Transfusion steps: a counting sort of the image rows by step
    p->step_t.clear();
    p->step_of.clear();
    p->step_rows.clear();
    p->step_start.clear();
    p->n_noised = 0;
    if (!tf) return "";
    const int ni = p->i1 - p->i0;
    std::vector<int> count(MOT_DIFF_STEPS + 1, 0), index(MOT_DIFF_STEPS + 1, -1);
    for (int k = 0; k < ni; k++) {
        const int t = b.tstep[b.order[p->i0 + k]];
        if (t < 0 || t > MOT_DIFF_STEPS) return "diffusion step outside [0, 1000]";
        count[t]++;
    }
    for (int t = 0, at = 0; t <= MOT_DIFF_STEPS; t++) {
        if (!count[t]) continue;
        index[t] = (int)p->step_t.size();
        p->step_t.push_back(t);
        p->step_start.push_back(at);
        at += count[t];
    }
    p->step_start.push_back(ni);
    p->step_of.resize(ni);
    p->step_rows.resize(ni);
    std::vector<int> next(p->step_start.begin(), p->step_start.end() - 1);
    for (int k = 0; k < ni; k++) {
        const int s = index[b.tstep[b.order[p->i0 + k]]];
        p->step_of[k] = s;
        p->step_rows[next[s]++] = k;
    }
    p->n_noised = ni - count[0];
    return "";
}

// ============================================================================================
// 4. matmul: the one matrix product every layer uses
// ============================================================================================
// C[M x N] = (accumulate ? C : 0) + op(A) * op(B), row-major with leading dimensions.
// op(A) is M x K: A[i*lda + k] when !transA, A[k*lda + i] when transA.
// op(B) is K x N: B[k*ldb + j] when !transB, B[j*ldb + k] when transB.
// C must not overlap A or B. Each element of C is its own sum over k in order, so a row's result
// does not depend on the other rows (a tower's row range gives what the same rows give inside a
// larger product: the MoT = dense test relies on it). Rows are shared among threads outside an
// OpenMP region; which thread computes a row does not change it.
template <typename T>
void matmul_plain(T* C, int ldc, const T* A, int lda, bool transA, const T* B, int ldb, bool transB, int M, int N,
                  int K, bool accumulate) {
    if (M <= 0 || N <= 0) return;
#pragma omp parallel for schedule(static) if (omp_get_level() == 0 && 2.0 * M * N * K >= 2e6)
    for (int i = 0; i < M; i++) {
        T* c = C + (size_t)i * ldc;
        if (!accumulate) std::fill(c, c + N, T(0));
        for (int k = 0; k < K; k++) {
            const T a = transA ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k];
            if (transB)
                for (int j = 0; j < N; j++) c[j] += a * B[(size_t)j * ldb + k];
            else
                for (int j = 0; j < N; j++) c[j] += a * B[(size_t)k * ldb + j];
        }
    }
}

// The CPU speed is in matmul_fast, its fast twin (section 7: packed panels and a vector
// micro-kernel). The model calls matmul; compiled with -DMOT_PLAIN it runs the plain product
// above, and every other fast twin of section 7 is switched off with it.
template <typename T>
void matmul_fast(T* C, int ldc, const T* A, int lda, bool transA, const T* B, int ldb, bool transB, int M, int N, int K,
                 bool accumulate);
template <typename T>
inline void matmul(T* C, int ldc, const T* A, int lda, bool transA, const T* B, int ldb, bool transB, int M, int N,
                   int K, bool accumulate) {
#ifdef MOT_PLAIN
    matmul_plain(C, ldc, A, lda, transA, B, ldb, transB, M, N, K, accumulate);
#else
    matmul_fast(C, ldc, A, lda, transA, B, ldb, transB, M, N, K, accumulate);
#endif
}

// ---- bf16: the same product with its operands in bf16, summed in fp32 --------------------------
// bf16 is the top half of an fp32 (its 8 exponent bits and 8 significant bits). In a bf16 mode
// the matrix products take operands rounded once to bf16 (to nearest, ties to even) and sum their
// products in fp32. A product of two bf16 values is exact in fp32 (8 x 8 significant bits fit in
// 24), so the only rounding past the operands' is the fp32 sum's.
inline uint16_t mot_bf16_round(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    const uint32_t nearest = (u + 0x7fffu + ((u >> 16) & 1)) >> 16;    // to nearest, ties to even
    const uint32_t nan = (u >> 16) | 0x40;                             // a NaN stays a (quiet) NaN
    return uint16_t((u & 0x7fffffffu) > 0x7f800000u ? nan : nearest);  // (no branch: loops vectorise)
}
inline float mot_bf16_float(uint16_t h) {
    const uint32_t u = uint32_t(h) << 16;
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}
// An operand element as bf16 bits: given so (uint16_t), or an fp32 value rounded as it is read.
inline uint16_t mot_bf16_bits(uint16_t h) { return h; }
inline uint16_t mot_bf16_bits(float x) { return mot_bf16_round(x); }

// C[M x N] (fp32) = (accumulate ? C : 0) + op(A) op(B) in matmul's layouts, each operand either bf16
// bit patterns (TA, TB = uint16_t) or fp32 values that are rounded to bf16 as they are read (float):
// the same product as rounding them first. Each element of C summed in fp32 over k in order, as
// matmul_plain does.
template <typename TA, typename TB>
void matmul_bf16_plain(float* C, int ldc, const TA* A, int lda, bool transA, const TB* B, int ldb, bool transB, int M,
                       int N, int K, bool accumulate) {
    if (M <= 0 || N <= 0) return;
#pragma omp parallel for schedule(static) if (omp_get_level() == 0 && 2.0 * M * N * K >= 2e6)
    for (int i = 0; i < M; i++) {
        float* c = C + (size_t)i * ldc;
        if (!accumulate) std::fill(c, c + N, 0.0f);
        for (int k = 0; k < K; k++) {
            const float a = mot_bf16_float(mot_bf16_bits(transA ? A[(size_t)k * lda + i] : A[(size_t)i * lda + k]));
            for (int j = 0; j < N; j++)
                c[j] += a * mot_bf16_float(mot_bf16_bits(transB ? B[(size_t)j * ldb + k] : B[(size_t)k * ldb + j]));
        }
    }
}

// The bf16 product the model calls: the fast twin (section 7) runs it on the machine's matrix
// engine (AMX tiles, AVX512-BF16) where it has one; -DMOT_PLAIN runs the loop above.
template <typename TA, typename TB>
void matmul_bf16_fast(float* C, int ldc, const TA* A, int lda, bool transA, const TB* B, int ldb, bool transB, int M,
                      int N, int K, bool accumulate);
template <typename TA, typename TB>
void matmul_bf16(float* C, int ldc, const TA* A, int lda, bool transA, const TB* B, int ldb, bool transB, int M, int N,
                 int K, bool accumulate) {
#ifdef MOT_PLAIN
    matmul_bf16_plain(C, ldc, A, lda, transA, B, ldb, transB, M, N, K, accumulate);
#else
    matmul_bf16_fast(C, ldc, A, lda, transA, B, ldb, transB, M, N, K, accumulate);
#endif
}
// A product's op(B) (K x N) rounded to bf16 and packed once into the engines' tile layout, for
// several products (section 7: mot_bf16_pack, matmul_bf16_packed).
struct MotBf16Packed {
    int K = 0, N = 0, nk = 0;
    std::vector<uint16_t> tiles;      // nk tiles per 16-column group of op(B)
    uint16_t at(int k, int j) const;  // op(B)(k, j)
};

// ============================================================================================
// 5. The CPU reference
// ============================================================================================
// Activations for one batch (B x T, N = B*T rows in grouped order), carved out of one allocation.
// Per-layer arrays are [L][...]. The CPU keeps the full attention matrix for the backward pass;
// the GPU path recomputes it instead.
template <typename S>
struct MotActs {
    S* x;                // (L+1) x N x D   residual stream: x[0] = embedding, x[l+1] = output of layer l
    S *q, *k, *v;        // L x N x D       raw projections x Wq, x Wk, x Wv
    S *q_rstd, *k_rstd;  // L x N x H       1/rms of each head of q and k (QK-norm)
    S *qr, *kr;          // L x N x D       q, k after QK-norm and RoPE
    S* att;              // L x B x H x T x T  softmax probabilities (row t, column j <= t)
    S* o;                // L x N x D       attention output, heads concatenated
    S *a, *a_rstd;       // L x N x D, L x N   o Wo, and 1/rms(a)
    S* h;                // L x N x D       x + rmsnorm(a) * g_attn
    S *u1, *u3, *u;      // L x NS x F      h W1, h W3, silu(u1) * u3 (per expert slot; NS = N without experts)
    S *y2, *y2_rstd;     // L x N x D, L x N   u W2, and 1/rms(y2)
    S *gate, *aux;       // L x N x Emax    experts: router softmax s, auxiliary router sigmoid a
    S *ye, *ye_rstd;     // L x NS x D, L x NS  experts: each slot's output rmsnorm(u W2), and 1/rms(u W2)
    S *z, *z_rstd;       // N x D, N        final norm output
    S* logits;           // N x V           grouped order
    S* dlogits;          // N x V           gradient of the loss wrt the logits
    // Transfusion setting only (size 0 otherwise); grouped order, image rows used
    S *pin, *sinu;      // N x 16, N x D   each image row's input patch x_t and sinusoid(t)
    S *eps_hat, *deps;  // N x 16, N x 16  predicted noise, and the loss gradient wrt it
};

// The backward's scratch arrays (grouped order), carved out of one allocation like the activations.
template <typename S>
struct MotScratch {
    S *dx, *dh, *dt;       // N x D: the residual stream's gradient; dL/dh; the gradient into a sublayer
    S *dq, *dk, *dv, *dO;  // N x D: attention's gradients
    S *du1, *du3, *du;     // NS x F: the FFN's (per expert slot)
    S *xg, *db;            // NS x D, experts only: each slot's gathered row of h; its dye, then dX
};

template <typename S>
struct MotModel {
    MotConfig cfg;
    MotParamTable tab;
    std::vector<S> params, grads, adam_m, adam_v;  // one allocation each, table order
    int B = 0, T = 0;                              // the batch shape the activations are sized for
    std::vector<S> act_mem, scratch_mem;
    MotActs<S> act{};
    MotScratch<S> scr{};
    std::vector<S> rope_cos, rope_sin;  // max_seq x Dh/2
    // results of the last forward
    // loss: the training objective (token setting: the CE mean; Transfusion: loss_lm + 5 loss_mod[image]).
    // loss_mod: CE per target modality; in the Transfusion setting loss_mod[image] is the image MSE
    // and n_mod[image] the number of noised image positions.
    double loss = 0, loss_lm = 0, loss_mod[MOT_N_MOD] = {0, 0, 0};
    int n_valid = 0, n_mod[MOT_N_MOD] = {0, 0, 0};
    std::vector<double> pos_loss;  // -log p(target) per position, original order (0 where ignored)
    MotPlan plan;                  // of the last forward's batch (mot_plan); the backward reads it too
    // experts (section 5, "Experts"); none of this is used by a model without them
    int route = MOT_ROUTE_EC;            // MOT_ROUTE_EC (training, "EC" eval) or MOT_ROUTE_CAUSAL (aux routers)
    int diff_loss = MOT_DIFF_MSE;        // Transfusion: the weighting of the diffusion term of `loss` (MotDiffLoss)
    bool force_expert_path = false;      // test hook: run the expert code even with one expert per copy
    double aux_loss = 0, aux_agree = 0;  // last EC forward: aux-router BCE (summed over layers and copies),
                                         // and the fraction of rows (of expert copies, over layers)
                                         // whose aux routers pick exactly their EC experts
    int Emax = 1, NS = 0;                // most experts of any copy; expert slots allocated per layer
    std::vector<int32_t> sel;            // L x NS: the grouped row each expert slot holds (EC)
    // bf16 mode (float models only; "bf16 mode" below): the forward and backward round where the
    // GPU's bf16 mode does. Each weight matrix of the products, rounded and packed as a product's
    // op(B) both ways (packed[2i] = W, packed[2i + 1] = W^T; packed_at[i] its offset, ascending),
    // refreshed by each forward (mot_bf16_refresh).
    bool bf16 = false;
    std::vector<MotBf16Packed> packed;
    std::vector<size_t> packed_at;

    S* param(int p, int layer = 0, int copy = 0) { return params.data() + tab.p[p].at(layer, copy); }
    S* grad(int p, int layer = 0, int copy = 0) { return grads.data() + tab.p[p].at(layer, copy); }
};

// RoPE's tables (max_seq x Dh/2): the angle of position pos in pair j is pos 10000^(-2j/Dh). The
// GPU path uploads the same tables.
template <typename S>
void mot_rope_tables(const MotConfig& c, std::vector<S>* cs, std::vector<S>* sn) {
    const int half = c.d_model / c.n_head / 2;
    cs->resize((size_t)c.max_seq * half);
    sn->resize((size_t)c.max_seq * half);
    for (int pos = 0; pos < c.max_seq; pos++)
        for (int j = 0; j < half; j++) {
            double ang = pos * pow(10000.0, -2.0 * j / (2 * half));
            (*cs)[(size_t)pos * half + j] = S(cos(ang));
            (*sn)[(size_t)pos * half + j] = S(sin(ang));
        }
}

// Builds a model with freshly initialised parameters: matrices and embedding N(0, 0.02), gains 1.
// The draws are made in double from one seeded stream, so float and double models start equal.
template <typename S>
void mot_init(MotModel<S>* m, const MotConfig& c, uint64_t seed) {
    m->cfg = c;
    m->tab = mot_param_table(c);
    m->params.assign(m->tab.total, S(0));
    m->grads.assign(m->tab.total, S(0));
    m->adam_m.assign(m->tab.total, S(0));
    m->adam_v.assign(m->tab.total, S(0));
    uint64_t rng = seed;
    for (int p = 0; p < P_COUNT; p++) {
        const MotParamInfo& info = m->tab.p[p];
        S* w = m->params.data() + info.offset;
        const bool bias = p == P_BIN || p == P_BOUT;  // biases start at 0, gains at 1
        for (size_t i = 0; i < info.size(); i++) w[i] = info.decay ? S(0.02 * mot_rand_normal(&rng)) : S(bias ? 0 : 1);
    }
    mot_rope_tables(c, &m->rope_cos, &m->rope_sin);
    m->B = m->T = 0;
}

// Expert slots: copy f's E_f experts take ceil(n_f / E_f) of its n_f rows each, so N rows need at
// most N + sum(E_f - 1) slots in all (NS); Emax is the most experts of any copy. (Without experts:
// NS = N, Emax = 1.) The GPU path sizes its buffers the same way.
inline void mot_expert_sizes(const MotConfig& c, size_t N, size_t* NS, size_t* Emax) {
    *NS = N;
    *Emax = 1;
    for (int f = 0; f < mot_ffn_copies(c); f++) {
        *NS += c.n_expert[f] - 1;
        *Emax = std::max<size_t>(*Emax, c.n_expert[f]);
    }
}

// Sizes the activation memory for a B x T batch (only reallocates when the shape changes).
template <typename S>
void mot_alloc_acts(MotModel<S>* m, int B, int T) {
    if (m->B == B && m->T == T) return;
    const MotConfig& c = m->cfg;
    const size_t L = c.n_layer, D = c.d_model, H = c.n_head, F = c.d_ff, V = c.vocab, N = (size_t)B * T;
    const bool ex = mot_has_experts(c) || m->force_expert_path, tf = mot_transfusion(c);
    size_t NS, Em;
    mot_expert_sizes(c, N, &NS, &Em);
    // Every activation array and its size, in one table: the arrays are consecutive slices of one
    // allocation, in this order.
    MotActs<S>& A = m->act;
    const std::pair<S**, size_t> acts[] = {
        {&A.x, (L + 1) * N * D},
        {&A.q, L * N * D},
        {&A.k, L * N * D},
        {&A.v, L * N * D},
        {&A.q_rstd, L * N * H},
        {&A.k_rstd, L * N * H},
        {&A.qr, L * N * D},
        {&A.kr, L * N * D},
        {&A.att, L * B * H * T * T},
        {&A.o, L * N * D},
        {&A.a, L * N * D},
        {&A.a_rstd, L * N},
        {&A.h, L * N * D},
        {&A.u1, L * NS * F},
        {&A.u3, L * NS * F},
        {&A.u, L * NS * F},
        {&A.y2, L * N * D},
        {&A.y2_rstd, L * N},
        {&A.gate, ex ? L * N * Em : 0},
        {&A.aux, ex ? L * N * Em : 0},
        {&A.ye, ex ? L * NS * D : 0},
        {&A.ye_rstd, ex ? L * NS : 0},
        {&A.z, N * D},
        {&A.z_rstd, N},
        {&A.logits, N * V},
        {&A.dlogits, N * V},
        {&A.pin, tf ? N * MOT_PATCH : 0},
        {&A.sinu, tf ? N * D : 0},
        {&A.eps_hat, tf ? N * MOT_PATCH : 0},
        {&A.deps, tf ? N * MOT_PATCH : 0},
    };
    // The backward's scratch, the same way: dx, dh, dt, dq, dk, dv, dO (N x D each), du1, du3, du
    // (NS x F each) and, with experts, two NS x D arrays per slot (gathered rows of h, which the
    // forward uses too; then dye and dX).
    MotScratch<S>& Z = m->scr;
    const std::pair<S**, size_t> scratch[] = {
        {&Z.dx, N * D},   {&Z.dh, N * D},  {&Z.dt, N * D},           {&Z.dq, N * D},
        {&Z.dk, N * D},   {&Z.dv, N * D},  {&Z.dO, N * D},           {&Z.du1, NS * F},
        {&Z.du3, NS * F}, {&Z.du, NS * F}, {&Z.xg, ex ? NS * D : 0}, {&Z.db, ex ? NS * D : 0},
    };
    size_t total = 0;
    for (const auto& a : acts) total += a.second;
    m->act_mem.assign(total, S(0));
    S* p = m->act_mem.data();
    for (const auto& a : acts) *a.first = p, p += a.second;
    total = 0;
    for (const auto& a : scratch) total += a.second;
    m->scratch_mem.assign(total, S(0));
    p = m->scratch_mem.data();
    for (const auto& a : scratch) *a.first = p, p += a.second;
    m->sel.assign(ex ? L * NS : 0, 0);
    m->NS = (int)NS;
    m->Emax = (int)Em;
    m->B = B;
    m->T = T;
}

// ---- bf16 mode: where values are rounded (the one definition, for the CPU and the GPU) ---------
// The GPU trains in bf16 by default (mot.cu), the CPU with --bf16; both round at the same points,
// each value once, to nearest even (mot_bf16_round):
//  1. the operands of the model's matrix products: weights, activations, gradients (mot_matmul),
//     summed in fp32. Three kinds of product stay fp32: the routers' (the expert selection
//     compares their logits exactly), the Transfusion projections W_in, W_t, W_out (one side 16,
//     or one row per distinct step: a negligible share of a step, and the predicted noise whose
//     error is the loss stays free of rounding), and so the matmul calls of those.
//  2. the activations stored in bf16 (mot_bf16_keep; the GPU's bf16 MotBuf arrays): q, k, v; qr, kr
//     (after QK-norm and RoPE); o (attention's output); a; u1, u3; u (SwiGLU's output); y2 (without
//     experts: with them y2 is the fp32 sum of the gated experts); in the backward du, dO, dq, dk,
//     dv (attention's gradients) and dq, dk again after the inverse RoPE.
//  3. everything else stays fp32: the residual stream x, h and its gradient (each sublayer adds an
//     update far smaller than the stream: bf16 would drop the part below 2^-9 of it), norms and
//     their statistics, softmax, attention's probabilities, logits, cross-entropy, the gradients,
//     the master weights and AdamW. The bf16 weight copy is the master weights rounded.
// The GPU's tensor-core attention (head dims 64 and 128, mot.cu) also rounds the probabilities to
// bf16 before P V; its CUDA-core kernels and the CPU do not.
inline float mot_bf16_rounded(float x) { return mot_bf16_float(mot_bf16_round(x)); }

// Point 2: an activation rounded in place (bf16 mode of a float model; nothing otherwise).
template <typename S>
void mot_bf16_keep(const MotModel<S>& m, S* x, size_t n) {
    if constexpr (std::is_same<S, float>::value) {
        if (!m.bf16) return;
#pragma omp parallel for schedule(static) if (omp_get_level() == 0 && n >= (1 << 15))
        for (size_t i = 0; i < n; i++) x[i] = mot_bf16_rounded(x[i]);
    } else {
        (void)m, (void)x, (void)n;
    }
}
// Point 1: the model's matrix product, matmul's arguments; in bf16 mode on operands rounded to bf16.
template <typename S>
void mot_matmul(const MotModel<S>& m, S* C, int ldc, const S* A, int lda, bool transA, const S* B, int ldb, bool transB,
                int M, int N, int K, bool accumulate) {
    if constexpr (std::is_same<S, float>::value) {
        if (m.bf16) {
            // a weight matrix as op(B) (W or W^T) comes packed; every other operand is rounded as read
            const float* w = m.params.data();
            if (B >= w && B < w + m.params.size() && ldb == (transB ? K : N)) {
                const auto at = std::lower_bound(m.packed_at.begin(), m.packed_at.end(), size_t(B - w));
                if (at != m.packed_at.end() && *at == size_t(B - w)) {
                    const MotBf16Packed& p = m.packed[2 * (at - m.packed_at.begin()) + transB];
                    if (p.K == K && p.N == N) {
                        matmul_bf16_packed(C, ldc, A, lda, transA, p, M, accumulate);
                        return;
                    }
                }
            }
            matmul_bf16(C, ldc, A, lda, transA, B, ldb, transB, M, N, K, accumulate);
            return;
        }
    }
    matmul(C, ldc, A, lda, transA, B, ldb, transB, M, N, K, accumulate);
}
// Each forward packs the weight matrices anew (W and W^T of each copy of each layer's projections
// and of the head), so whatever wrote the parameters (AdamW, a checkpoint, a test), the products
// read them rounded; each packed weight then serves every product of the step that reads it.
template <typename S>
void mot_bf16_refresh(MotModel<S>* m) {
    if constexpr (std::is_same<S, float>::value) {
        if (!m->bf16) return;
        std::vector<std::pair<size_t, int>> w;  // offset and parameter of each weight copy, ascending
        for (int p : {P_WQ, P_WK, P_WV, P_WO, P_W1, P_W3, P_W2, P_HEAD})
            for (int l = 0; l < m->tab.p[p].layers; l++)
                for (int k = 0; k < m->tab.p[p].copies; k++) w.push_back({m->tab.p[p].at(l, k), p});
        std::sort(w.begin(), w.end());
        m->packed_at.resize(w.size());
        for (size_t i = 0; i < w.size(); i++) m->packed_at[i] = w[i].first;
        m->packed.resize(2 * w.size());
#pragma omp parallel for schedule(dynamic)
        for (size_t j = 0; j < m->packed.size(); j++) {
            const MotParamInfo& in = m->tab.p[w[j / 2].second];
            const float* W = m->params.data() + w[j / 2].first;
            if (j % 2 == 0) mot_bf16_pack(&m->packed[j], W, in.cols, false, in.rows, in.cols);  // W: rows x cols
            else mot_bf16_pack(&m->packed[j], W, in.cols, true, in.cols, in.rows);              // W^T
        }
    } else {
        (void)m;
    }
}

// ---- linear layer with per-tower weights ---------------------------------------------------
// y[rows] = x[rows] W[copy] for parameter p: one product per contiguous row range (section 3).
template <typename S>
void linear_forward(const MotModel<S>& m, S* y, const S* x, int p, int layer, const int32_t* group) {
    const MotParamInfo& info = m.tab.p[p];
    const int in = info.rows, out = info.cols;
    mot_for_each_copy(info.copies, group, [&](int c, int r0, int r1) {
        mot_matmul(m, y + (size_t)r0 * out, out, x + (size_t)r0 * in, in, false, m.params.data() + info.at(layer, c),
                   out, false, r1 - r0, out, in, false);
    });
}
// dx[rows] (+)= dy[rows] W[copy]^T,  dW[copy] (+)= x[rows]^T dy[rows]
template <typename S>
void linear_backward(MotModel<S>* m, S* dx, bool dx_accumulate, bool dW_accumulate, const S* dy, const S* x, int p,
                     int layer, const int32_t* group) {
    const MotParamInfo& info = m->tab.p[p];
    const int in = info.rows, out = info.cols;
    mot_for_each_copy(info.copies, group, [&](int c, int r0, int r1) {
        const size_t w = info.at(layer, c);
        mot_matmul(*m, dx + (size_t)r0 * in, in, dy + (size_t)r0 * out, out, false, m->params.data() + w, out, true,
                   r1 - r0, in, out, dx_accumulate);
        mot_matmul(*m, m->grads.data() + w, out, x + (size_t)r0 * in, in, true, dy + (size_t)r0 * out, out, false, in,
                   out, r1 - r0, dW_accumulate);
    });
}

// ---- RMSNorm with per-tower gains ------------------------------------------------------------
// y = x / sqrt(mean(x^2) + eps) * g[copy]. Rows are vectors of length C; `per_pos` rows share one
// position (QK-norm normalises each of the H heads of a position separately), so the copy of row
// i is the tower of position i / per_pos.
static const double MOT_NORM_EPS = 1e-5;

inline int mot_copy_of_row(int copies, const int32_t* group, int pos) {
    if (copies == 1) return 0;
    return pos < group[1] ? 0 : pos < group[2] ? 1 : 2;
}

// Experts: an FFN copy with E > 1 normalises inside each expert (section 5), so on its rows the
// FFN sublayer's norm is the gain alone, y = x g (rstd 1). Bit f of gain_only marks such a copy f
// of the ffn_copies FFN copies; gain_only = 0 everywhere else.
inline bool mot_gain_only(unsigned gain_only, int ffn_copies, const int32_t* group, int pos) {
    return gain_only && ((gain_only >> mot_copy_of_row(ffn_copies, group, pos)) & 1u);
}

// One row normalised in place without a gain (each expert's own norm): y = y r, returns r = 1/rms(y).
template <typename S>
S rmsnorm_inplace(S* y, int C) {
    S ss = 0;
    for (int j = 0; j < C; j++) ss += y[j] * y[j];
    const S r = S(1) / std::sqrt(ss / C + S(MOT_NORM_EPS));
    for (int j = 0; j < C; j++) y[j] *= r;
    return r;
}

template <typename S>
void rmsnorm_forward(S* y, S* rstd, const S* x, const S* g, int copies, const int32_t* group, int rows, int C,
                     int per_pos, int ffn_copies = 1, unsigned gain_only = 0) {
    // (threads only for batch-sized work: a decode step's few rows would pay more for the fork)
#pragma omp parallel for schedule(static) if ((size_t)rows * C >= (1 << 15))
    for (int i = 0; i < rows; i++) {
        const S* xi = x + (size_t)i * C;
        const S* gi = g + (size_t)mot_copy_of_row(copies, group, i / per_pos) * C;
        S ss = 0;
        for (int j = 0; j < C; j++) ss += xi[j] * xi[j];
        S r = mot_gain_only(gain_only, ffn_copies, group, i / per_pos) ? S(1)
                                                                       : S(1) / std::sqrt(ss / C + S(MOT_NORM_EPS));
        rstd[i] = r;
        for (int j = 0; j < C; j++) y[(size_t)i * C + j] = xi[j] * r * gi[j];
    }
}
// dx (+)= r * (g dy) - r^3 / C * x * sum(x * g dy);   dg[copy] += dy * x * r
// (gain-only rows: r = 1 and no second term, dx = g dy)
template <typename S>
void rmsnorm_backward(S* dx, bool dx_accumulate, S* dg, const S* dy, const S* x, const S* rstd, const S* g, int copies,
                      const int32_t* group, int rows, int C, int per_pos, int ffn_copies = 1, unsigned gain_only = 0) {
#pragma omp parallel for schedule(static)
    for (int i = 0; i < rows; i++) {
        const S *xi = x + (size_t)i * C, *dyi = dy + (size_t)i * C;
        const S* gi = g + (size_t)mot_copy_of_row(copies, group, i / per_pos) * C;
        S r = rstd[i], dot = 0;
        if (!mot_gain_only(gain_only, ffn_copies, group, i / per_pos))
            for (int j = 0; j < C; j++) dot += xi[j] * gi[j] * dyi[j];
        S* dxi = dx + (size_t)i * C;
        for (int j = 0; j < C; j++) {
            S v = r * gi[j] * dyi[j] - r * r * r / C * xi[j] * dot;
            dxi[j] = dx_accumulate ? dxi[j] + v : v;
        }
    }
    // gain gradients: each thread a block of columns, each column summed over the rows in order, so
    // the sums are deterministic; the rows are read in order (a column at a time strode through them)
    for (int c = 0; c < copies; c++) {
        int p0 = copies == 1 ? 0 : group[c], p1 = copies == 1 ? group[MOT_N_MOD] : group[c + 1];
        S* dgc = dg + (size_t)c * C;
#pragma omp parallel
        {
            const int nt = omp_get_num_threads(), t = omp_get_thread_num(), j0 = C * t / nt, j1 = C * (t + 1) / nt;
            std::vector<S> acc(j1 - j0, S(0)), term(j1 - j0);
            for (int i = p0 * per_pos; i < p1 * per_pos; i++) {
                const S *dyi = dy + (size_t)i * C, *xi = x + (size_t)i * C;
                const S r = rstd[i];
                // (two loops: each product rounded before it is added, never fused into an FMA)
                for (int j = j0; j < j1; j++) term[j - j0] = dyi[j] * xi[j] * r;
                for (int j = j0; j < j1; j++) acc[j - j0] += term[j - j0];
            }
            for (int j = j0; j < j1; j++) dgc[j] += acc[j - j0];
        }
    }
}

// ---- RoPE (rotate-half pairing: dims j and j + Dh/2) -----------------------------------------
// Forward rotates by +angle; the backward rotates the gradient by -angle (the inverse).
template <typename S>
void rope_apply(S* x, const MotModel<S>& m, const MotBatch& b, int sign) {
    const int N = b.B * b.T, D = m.cfg.d_model, H = m.cfg.n_head, half = D / H / 2;
#pragma omp parallel for schedule(static)
    for (int r = 0; r < N; r++) {
        const int pos = m.plan.pos[r];
        const S *cs = m.rope_cos.data() + (size_t)pos * half, *sn = m.rope_sin.data() + (size_t)pos * half;
        for (int h = 0; h < H; h++) {
            S* xh = x + (size_t)r * D + h * 2 * half;
            for (int j = 0; j < half; j++) {
                S x1 = xh[j], x2 = xh[j + half], s = sign * sn[j];
                xh[j] = x1 * cs[j] - x2 * s;
                xh[j + half] = x1 * s + x2 * cs[j];
            }
        }
    }
}

// ---- causal self-attention over the whole sequence (all modalities together) ---------------
// Rows are in grouped order, so each (b, h) first gathers its T query/key/value vectors into
// contiguous buffers in sequence order; causality is over sequence positions: position t sees
// 0 .. vis[t] (t, except inside a Transfusion image block, whose positions all see each other).

// Head h of the T positions of sequence bi, from grouped rows (N x D) into a T x Dh buffer, and back.
template <typename S>
void gather_head(S* dst, const S* src, const MotBatch& b, int bi, int h, int D, int Dh) {
    for (int t = 0; t < b.T; t++) {
        const S* row = src + (size_t)b.row_of[bi * b.T + t] * D + h * Dh;
        std::copy(row, row + Dh, dst + (size_t)t * Dh);
    }
}
// The same, transposed (Dh x T): a score loop over j then reads consecutive floats and
// vectorises; each score still sums over d in order (equal to the dot product up to rounding:
// not bit for bit the loop it replaced, dev/RESULTS.md).
template <typename S>
void gather_head_t(S* dst, const S* src, const MotBatch& b, int bi, int h, int D, int Dh) {
    for (int t = 0; t < b.T; t++) {
        const S* row = src + (size_t)b.row_of[bi * b.T + t] * D + h * Dh;
        for (int d = 0; d < Dh; d++) dst[(size_t)d * b.T + t] = row[d];
    }
}
template <typename S>
void scatter_head(S* dst, const S* src, const MotBatch& b, int bi, int h, int D, int Dh) {
    for (int t = 0; t < b.T; t++)
        std::copy(src + (size_t)t * Dh, src + (size_t)(t + 1) * Dh, dst + (size_t)b.row_of[bi * b.T + t] * D + h * Dh);
}

template <typename S>
void attention_forward(S* o, S* att, const S* q, const S* k, const S* v, const MotBatch& b, int D, int H) {
    const int T = b.T, Dh = D / H;
    const S scale = S(1) / std::sqrt(S(Dh));
#pragma omp parallel
    {
        std::vector<S> qh((size_t)T * Dh), kt((size_t)Dh * T), vh((size_t)T * Dh), oh((size_t)T * Dh);
#pragma omp for schedule(dynamic)
        for (int bh = 0; bh < b.B * H; bh++) {
            const int bi = bh / H, h = bh % H;
            gather_head(qh.data(), q, b, bi, h, D, Dh);
            gather_head_t(kt.data(), k, b, bi, h, D, Dh);
            gather_head(vh.data(), v, b, bi, h, D, Dh);
            S* A = att + (size_t)bh * T * T;
            for (int t = 0; t < T; t++) {
                S* p = A + (size_t)t * T;
                const int lim = b.vis[(size_t)bi * T + t];  // t, or the end of t's image block
                std::fill(p, p + lim + 1, S(0));            // p_j = q_t . k_j, summed over d in order
                for (int d = 0; d < Dh; d++) {
                    const S qd = qh[(size_t)t * Dh + d], *kd = &kt[(size_t)d * T];
                    for (int j = 0; j <= lim; j++) p[j] += qd * kd[j];
                }
                S mx = -INFINITY;
                for (int j = 0; j <= lim; j++) {
                    p[j] *= scale;
                    mx = std::max(mx, p[j]);
                }
                S sum = 0;
                for (int j = 0; j <= lim; j++) {
                    p[j] = std::exp(p[j] - mx);
                    sum += p[j];
                }
                for (int j = 0; j <= lim; j++) p[j] /= sum;
                for (int j = lim + 1; j < T; j++) p[j] = 0;
                S* ot = &oh[(size_t)t * Dh];
                std::fill(ot, ot + Dh, S(0));
                for (int j = 0; j <= lim; j++)
                    for (int d = 0; d < Dh; d++) ot[d] += p[j] * vh[(size_t)j * Dh + d];
            }
            scatter_head(o, oh.data(), b, bi, h, D, Dh);
        }
    }
}
// dp_j = dO . v_j;  ds_j = p_j (dp_j - sum_k p_k dp_k);  dq = scale sum_j ds_j k_j;
// dk_j += scale ds_j q;  dv_j += p_j dO.   Each (b, h) owns its rows, so (b, h) run in parallel.
template <typename S>
void attention_backward(S* dq, S* dk, S* dv, const S* dO, const S* att, const S* q, const S* k, const S* v,
                        const MotBatch& b, int D, int H) {
    const int T = b.T, Dh = D / H;
    const S scale = S(1) / std::sqrt(S(Dh));
#pragma omp parallel
    {
        std::vector<S> qh((size_t)T * Dh), kh((size_t)T * Dh), vt((size_t)Dh * T), doh((size_t)T * Dh),
            dqh((size_t)T * Dh), dkh((size_t)T * Dh), dvh((size_t)T * Dh), dp(T);
#pragma omp for schedule(dynamic)
        for (int bh = 0; bh < b.B * H; bh++) {
            const int bi = bh / H, h = bh % H;
            gather_head(qh.data(), q, b, bi, h, D, Dh);
            gather_head(kh.data(), k, b, bi, h, D, Dh);
            gather_head_t(vt.data(), v, b, bi, h, D, Dh);
            gather_head(doh.data(), dO, b, bi, h, D, Dh);
            std::fill(dqh.begin(), dqh.end(), S(0));
            std::fill(dkh.begin(), dkh.end(), S(0));
            std::fill(dvh.begin(), dvh.end(), S(0));
            const S* A = att + (size_t)bh * T * T;
            for (int t = 0; t < T; t++) {
                const S* p = A + (size_t)t * T;
                const S* dot = &doh[(size_t)t * Dh];
                const int lim = b.vis[(size_t)bi * T + t];
                std::fill(dp.begin(), dp.begin() + lim + 1, S(0));  // dp_j = dO_t . v_j
                for (int d = 0; d < Dh; d++) {
                    const S od = dot[d], *vd = &vt[(size_t)d * T];
                    for (int j = 0; j <= lim; j++) dp[j] += od * vd[j];
                }
                S sum = 0;
                for (int j = 0; j <= lim; j++) {
                    sum += p[j] * dp[j];
                    for (int d = 0; d < Dh; d++) dvh[(size_t)j * Dh + d] += p[j] * dot[d];
                }
                for (int j = 0; j <= lim; j++) {
                    S ds = p[j] * (dp[j] - sum) * scale;
                    for (int d = 0; d < Dh; d++) {
                        dqh[(size_t)t * Dh + d] += ds * kh[(size_t)j * Dh + d];
                        dkh[(size_t)j * Dh + d] += ds * qh[(size_t)t * Dh + d];
                    }
                }
            }
            scatter_head(dq, dqh.data(), b, bi, h, D, Dh);
            scatter_head(dk, dkh.data(), b, bi, h, D, Dh);
            scatter_head(dv, dvh.data(), b, bi, h, D, Dh);
        }
    }
}

// ---- SwiGLU: u = silu(u1) * u3, silu(z) = z sigmoid(z) ---------------------------------------
template <typename S>
void swiglu_forward(S* u, const S* u1, const S* u3, size_t n) {
#pragma omp parallel for schedule(static) if (n >= (1 << 15))
    for (size_t i = 0; i < n; i++) u[i] = u1[i] / (S(1) + std::exp(-u1[i])) * u3[i];
}
// du1 = du * u3 * silu'(u1), silu'(z) = s (1 + z (1 - s));  du3 = du * silu(u1)
template <typename S>
void swiglu_backward(S* du1, S* du3, const S* du, const S* u1, const S* u3, size_t n) {
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        S s = S(1) / (S(1) + std::exp(-u1[i]));
        du1[i] = du[i] * u3[i] * s * (S(1) + u1[i] * (S(1) - s));
        du3[i] = du[i] * u1[i] * s;
    }
}

// ---- experts: the FFN of a copy as E SwiGLU experts with expert-choice routing ---------------
// Spec, "Experts". For FFN copy f with rows [r0, r1) (n rows) and E > 1 experts:
//   s = softmax(h Wr^T)   C = ceil(n / E)   S_e = the C rows with the largest s_ie (ties: lower row)
//   y2_i = sum over e with i in S_e of s_ie rmsnorm(FFN_e(h_i))  (then the gain g_ffn alone: the norm
//          is each expert's, after it and before its gate, so the gate's scale reaches the output)
//   a = sigmoid(h U^T), trained by BCE against [i in S_e] on detached h (weight MOT_AUX_WEIGHT);
//   causal routing replaces S_e by {i : a_ie > 0.5}.
// Rows of one tower are in sequence order (b*T + t) within the grouped order, so "lower row index"
// is the lower grouped row. Expert e of copy f keeps its C rows in the slots slot0[f] + e*C ..: u1,
// u3, u, ye (normalised) and ye_rstd are stored per slot for the backward, and sel maps each slot
// to its row.
// Expert choice for expert e: the C of n rows with the largest s[i * ld + e], ties to the lower i,
// written to out (as r0 + i) in increasing row order. A heap (partial_sort) stays in bounds even
// if a NaN breaks the ordering.
template <typename S>
void mot_expert_choice(int32_t* out, const S* s, int ld, int e, int n, int C, int r0) {
    std::vector<int32_t> idx(n);
    for (int i = 0; i < n; i++) idx[i] = i;
    std::partial_sort(idx.begin(), idx.begin() + C, idx.end(), [&](int32_t a, int32_t b) {
        const S x = s[(size_t)a * ld + e], y = s[(size_t)b * ld + e];
        return x > y || (x == y && a < b);
    });
    std::sort(idx.begin(), idx.begin() + C);
    for (int j = 0; j < C; j++) out[j] = r0 + idx[j];
}

// Router and aux-router logits of n rows h (n x D): s = h Wr^T and a = h U^T (Wr, U: E x D),
// E columns of each row of s and a (row length ld).
template <typename S>
void router_logits_fast(S* s, S* a, int ld, const S* h, const S* Wr, const S* U, int n, int E, int D);
template <typename S>
void router_logits(S* s, S* a, int ld, const S* h, const S* Wr, const S* U, int n, int E, int D) {
#ifdef MOT_PLAIN
    matmul(s, ld, h, D, false, Wr, D, true, n, E, D, false);
    matmul(a, ld, h, D, false, U, D, true, n, E, D, false);
#else
    router_logits_fast(s, a, ld, h, Wr, U, n, E, D);                       // both as one product (section 7)
#endif
}

// FFN sublayer of layer l up to the norm: y2 = FFN(h) for every row (the plain FFN for copies with
// one expert, the gated expert mixture otherwise). In EC mode also adds the aux-router loss.
template <typename S>
void ffn_forward_experts(MotModel<S>* m, const MotBatch& b, int l) {
    const MotConfig& c = m->cfg;
    const MotParamTable& tab = m->tab;
    const int N = b.B * b.T, D = c.d_model, F = c.d_ff, Em = m->Emax, NS = m->NS;
    MotActs<S>& A = m->act;
    const S* h = A.h + (size_t)l * N * D;
    S *y2 = A.y2 + (size_t)l * N * D, *ye = A.ye + (size_t)l * NS * D, *yr = A.ye_rstd + (size_t)l * NS;
    S *u1 = A.u1 + (size_t)l * NS * F, *u3 = A.u3 + (size_t)l * NS * F, *u = A.u + (size_t)l * NS * F;
    S *gate = A.gate + (size_t)l * N * Em, *aux = A.aux + (size_t)l * N * Em;
    S* xg = m->scr.xg;  // gathered rows of h
    const S* P = m->params.data();
    const size_t e1 = tab.p[P_W1].each(), e2 = tab.p[P_W2].each();
    for (int f = 0; f < mot_ffn_copies(c); f++) {
        int r0, r1;
        mot_ffn_rows(c, b.group, f, &r0, &r1);
        const int n = r1 - r0, E = c.n_expert[f];
        if (n == 0) continue;
        const int k = mot_expert_copy(c, f, 0);
        const S *W1 = P + tab.p[P_W1].at(l, k), *W3 = P + tab.p[P_W3].at(l, k), *W2 = P + tab.p[P_W2].at(l, k);
        if (E == 1) {  // the plain FFN on this copy's rows, exactly as linear_forward does it
            const size_t s0 = m->plan.slot0[f];
            mot_matmul(*m, u1 + s0 * F, F, h + (size_t)r0 * D, D, false, W1, F, false, n, F, D, false);
            mot_matmul(*m, u3 + s0 * F, F, h + (size_t)r0 * D, D, false, W3, F, false, n, F, D, false);
            for (S* t : {u1, u3}) mot_bf16_keep(*m, t + s0 * F, (size_t)n * F);
            swiglu_forward(u + s0 * F, u1 + s0 * F, u3 + s0 * F, (size_t)n * F);
            mot_bf16_keep(*m, u + s0 * F, (size_t)n * F);
            mot_matmul(*m, y2 + (size_t)r0 * D, D, u + s0 * F, F, false, W2, D, false, n, D, F, false);
            continue;
        }
        // router logits and gates s = softmax(h Wr^T); aux logits h U^T (made sigmoids below)
        const int kr = mot_router_copy(c, f, 0);
        S *sg = gate + (size_t)r0 * Em, *sa = aux + (size_t)r0 * Em;
        router_logits(sg, sa, Em, h + (size_t)r0 * D, P + tab.p[P_WR].at(l, kr), P + tab.p[P_U].at(l, kr), n, E, D);
        // Routing, parallel over rows or over experts (when n E >= 1024): each writes only its own
        // entries, and the BCE terms are summed after, in order, so the bits do not depend on the
        // threads.
#pragma omp parallel for schedule(static) if (n * E >= 1024)
        for (int i = 0; i < n; i++) {
            S* si = sg + (size_t)i * Em;
            S mx = si[0], sum = 0;
            for (int e = 1; e < E; e++) mx = std::max(mx, si[e]);
            for (int e = 0; e < E; e++) {
                si[e] = std::exp(si[e] - mx);
                sum += si[e];
            }
            for (int e = 0; e < E; e++) si[e] /= sum;
        }
        const bool ec = m->route == MOT_ROUTE_EC;
        const int C = m->plan.cap[f];
        int32_t* sel = m->sel.data() + (size_t)l * NS + m->plan.slot0[f];
        std::vector<char> chosen(ec ? (size_t)n * E : 0, 0);
        std::vector<double> bce(ec ? (size_t)n * E : 0);
        if (ec) {
#pragma omp parallel for schedule(dynamic) if (n * E >= 1024)
            for (int e = 0; e < E; e++) {
                mot_expert_choice(sel + (size_t)e * C, sg, Em, e, n, C, r0);
                for (int j = 0; j < C; j++) chosen[(size_t)(sel[(size_t)e * C + j] - r0) * E + e] = 1;
            }
        }
        // EC: the aux BCE from the logits (softplus(z) - t z, stable), a mean over rows and experts,
        // and whether each row's causal experts (a > 0.5, i.e. z > 0) are exactly its EC experts.
        // Then the aux logits become sigmoids.
        long agree = 0;
#pragma omp parallel for schedule(static) reduction(+ : agree) if (n * E >= 1024)
        for (int i = 0; i < n; i++) {
            S* ai = sa + (size_t)i * Em;
            if (ec) {
                bool same = true;
                for (int e = 0; e < E; e++) {
                    const double z = ai[e], t = chosen[(size_t)i * E + e];
                    bce[(size_t)i * E + e] = std::max(z, 0.0) + std::log1p(std::exp(-std::fabs(z))) - t * z;
                    same = same && (z > 0) == (t > 0);
                }
                agree += same;
            }
            for (int e = 0; e < E; e++) ai[e] = S(1) / (S(1) + std::exp(-ai[e]));
        }
        if (ec) {
            double sum = 0;
            for (double v : bce) sum += v;
            m->aux_loss += sum / ((double)n * E);
            m->aux_agree += agree;  // a count here; mot_forward divides by the number of rows
        }
        // expert e on its ce rows re (slots from sb): X = h[re], ye = rmsnorm(swiglu(X W1, X W3) W2)
        // (no gain: the sublayer's g_ffn scales the sum)
        auto run_expert = [&](int e, const int32_t* re, int ce, size_t sb) {
            S* x = xg + sb * D;
            for (int j = 0; j < ce; j++)
                std::copy(h + (size_t)re[j] * D, h + (size_t)(re[j] + 1) * D, x + (size_t)j * D);
            mot_matmul(*m, u1 + sb * F, F, x, D, false, W1 + e * e1, F, false, ce, F, D, false);
            mot_matmul(*m, u3 + sb * F, F, x, D, false, W3 + e * e1, F, false, ce, F, D, false);
            for (S* t : {u1, u3}) mot_bf16_keep(*m, t + sb * F, (size_t)ce * F);
            swiglu_forward(u + sb * F, u1 + sb * F, u3 + sb * F, (size_t)ce * F);
            mot_bf16_keep(*m, u + sb * F, (size_t)ce * F);
            mot_matmul(*m, ye + sb * D, D, u + sb * F, F, false, W2 + e * e2, D, false, ce, D, F, false);
            for (int j = 0; j < ce; j++) yr[sb + j] = rmsnorm_inplace(ye + (sb + j) * D, D);
        };
        // y2_i = sum of s_ie ye over the experts that took row i, added in expert order
        std::fill(y2 + (size_t)r0 * D, y2 + (size_t)r1 * D, S(0));
        auto add_expert = [&](int e, const int32_t* re, int ce, size_t sb) {
            for (int j = 0; j < ce; j++) {
                const S gs = sg[(size_t)(re[j] - r0) * Em + e];
                const S* src = ye + (sb + j) * D;
                S* dst = y2 + (size_t)re[j] * D;
                for (int d = 0; d < D; d++) dst[d] += gs * src[d];
            }
        };
        if (ec) {
            // one thread per expert (each matmul then runs on one thread: the same bits as threaded),
            // each into its own slots; few large parallel regions instead of many small ones
#pragma omp parallel for schedule(dynamic)
            for (int e = 0; e < E; e++) run_expert(e, sel + (size_t)e * C, C, m->plan.slot0[f] + (size_t)e * C);
            for (int e = 0; e < E; e++) add_expert(e, sel + (size_t)e * C, C, m->plan.slot0[f] + (size_t)e * C);
        } else {
            // causal (forward only): the rows each aux router takes, one expert at a time in the
            // copy's first slots, used at once
            std::vector<int32_t> rows;
            for (int e = 0; e < E; e++) {
                rows.clear();
                for (int i = 0; i < n; i++)
                    if (sa[(size_t)i * Em + e] > S(0.5)) rows.push_back(r0 + i);
                if (rows.empty()) continue;
                run_expert(e, rows.data(), (int)rows.size(), m->plan.slot0[f]);
                add_expert(e, rows.data(), (int)rows.size(), m->plan.slot0[f]);
            }
        }
    }
}

// Backward of ffn_forward_experts (EC only): dt = dL/dy2 (N x D); adds dL/dh into dh and the
// gradients of the experts, the router and (from the aux BCE) the auxiliary router.
template <typename S>
void ffn_backward_experts(MotModel<S>* m, const MotBatch& b, int l, const S* dt, S* dh, bool acc) {
    const MotConfig& c = m->cfg;
    const MotParamTable& tab = m->tab;
    const int N = b.B * b.T, D = c.d_model, F = c.d_ff, Em = m->Emax, NS = m->NS;
    const MotActs<S>& A = m->act;
    const S* h = A.h + (size_t)l * N * D;
    const S *ye = A.ye + (size_t)l * NS * D, *yr = A.ye_rstd + (size_t)l * NS;
    const S *gate = A.gate + (size_t)l * N * Em, *aux = A.aux + (size_t)l * N * Em;
    const S *u1 = A.u1 + (size_t)l * NS * F, *u3 = A.u3 + (size_t)l * NS * F, *u = A.u + (size_t)l * NS * F;
    S *du1 = m->scr.du1, *du3 = m->scr.du3, *du = m->scr.du;
    S *xg = m->scr.xg, *db = m->scr.db;  // per slot: gathered h rows; dye, then dX
    const S* P = m->params.data();
    S* G = m->grads.data();
    const size_t e1 = tab.p[P_W1].each(), e2 = tab.p[P_W2].each();
    for (int f = 0; f < mot_ffn_copies(c); f++) {
        int r0, r1;
        mot_ffn_rows(c, b.group, f, &r0, &r1);
        const int n = r1 - r0, E = c.n_expert[f];
        if (n == 0) continue;
        const int k = mot_expert_copy(c, f, 0);
        const size_t o1 = tab.p[P_W1].at(l, k), o3 = tab.p[P_W3].at(l, k), o2 = tab.p[P_W2].at(l, k);
        const S* hr = h + (size_t)r0 * D;
        if (E == 1) {  // the plain FFN, exactly as linear_backward does it
            const size_t s0 = m->plan.slot0[f];
            mot_matmul(*m, du + s0 * F, F, dt + (size_t)r0 * D, D, false, P + o2, D, true, n, F, D, false);
            mot_bf16_keep(*m, du + s0 * F, (size_t)n * F);
            mot_matmul(*m, G + o2, D, u + s0 * F, F, true, dt + (size_t)r0 * D, D, false, F, D, n, acc);
            swiglu_backward(du1 + s0 * F, du3 + s0 * F, du + s0 * F, u1 + s0 * F, u3 + s0 * F, (size_t)n * F);
            mot_matmul(*m, dh + (size_t)r0 * D, D, du1 + s0 * F, F, false, P + o1, F, true, n, D, F, true);
            mot_matmul(*m, G + o1, F, hr, D, true, du1 + s0 * F, F, false, D, F, n, acc);
            mot_matmul(*m, dh + (size_t)r0 * D, D, du3 + s0 * F, F, false, P + o3, F, true, n, D, F, true);
            mot_matmul(*m, G + o3, F, hr, D, true, du3 + s0 * F, F, false, D, F, n, acc);
            continue;
        }
        const int C = m->plan.cap[f];
        const int32_t* sel = m->sel.data() + (size_t)l * NS + m->plan.slot0[f];
        std::vector<S> ds((size_t)n * E, S(0));  // dL/ds, then dL/d(router logits)
        // one thread per expert, as in the forward; each writes only its own slots, its own
        // weight gradients and its own column of ds
#pragma omp parallel for schedule(dynamic)
        for (int e = 0; e < E; e++) {
            const int32_t* re = sel + (size_t)e * C;
            const size_t sb = m->plan.slot0[f] + (size_t)e * C;
            S *x = xg + sb * D, *dy = db + sb * D;
            // y2_i += s_ie n_j with n_j = r_j w_j the normalised expert output (w_j = u_j W2, stored
            // as n_j): dL/ds_ie = dt_i . n_j, and through the norm (rmsnorm_backward without a gain,
            // r^3 w (w . v) = r n (n . v)) dL/dw_j = s_ie r_j (dt_i - n_j (n_j . dt_i) / D)
            for (int j = 0; j < C; j++) {
                const S* dti = dt + (size_t)re[j] * D;
                const S* nj = ye + (sb + j) * D;
                const S gs = gate[(size_t)re[j] * Em + e], r = yr[sb + j];
                S dot = 0;
                for (int d = 0; d < D; d++) dot += dti[d] * nj[d];
                for (int d = 0; d < D; d++) dy[(size_t)j * D + d] = gs * r * (dti[d] - nj[d] * dot / D);
                ds[(size_t)(re[j] - r0) * E + e] = dot;
            }
            // the expert's SwiGLU FFN on its gathered rows X: w = swiglu(X W1, X W3) W2
            mot_matmul(*m, du + sb * F, F, dy, D, false, P + o2 + e * e2, D, true, C, F, D, false);
            mot_bf16_keep(*m, du + sb * F, (size_t)C * F);
            mot_matmul(*m, G + o2 + e * e2, D, u + sb * F, F, true, dy, D, false, F, D, C, acc);
            swiglu_backward(du1 + sb * F, du3 + sb * F, du + sb * F, u1 + sb * F, u3 + sb * F, (size_t)C * F);
            for (int j = 0; j < C; j++)
                std::copy(h + (size_t)re[j] * D, h + (size_t)(re[j] + 1) * D, x + (size_t)j * D);
            mot_matmul(*m, G + o1 + e * e1, F, x, D, true, du1 + sb * F, F, false, D, F, C, acc);
            mot_matmul(*m, G + o3 + e * e1, F, x, D, true, du3 + sb * F, F, false, D, F, C, acc);
            mot_matmul(*m, dy, D, du1 + sb * F, F, false, P + o1 + e * e1, F, true, C, D, F, false);  // dX, over dye
            mot_matmul(*m, dy, D, du3 + sb * F, F, false, P + o3 + e * e1, F, true, C, D, F, true);
        }
        for (int e = 0; e < E; e++)  // dh += dX, in expert order (experts may share a row)
            for (int j = 0; j < C; j++) {
                const S* src = db + (m->plan.slot0[f] + (size_t)e * C + j) * D;
                S* dst = dh + (size_t)sel[(size_t)e * C + j] * D;
                for (int d = 0; d < D; d++) dst[d] += src[d];
            }
        // softmax backward: dr_ie = s_ie (ds_ie - sum_k s_ik ds_ik); then dWr += dr^T h, dh += dr Wr
        for (int i = 0; i < n; i++) {
            const S* si = gate + (size_t)(r0 + i) * Em;
            S* di = ds.data() + (size_t)i * E;
            S dot = 0;
            for (int e = 0; e < E; e++) dot += si[e] * di[e];
            for (int e = 0; e < E; e++) di[e] = si[e] * (di[e] - dot);
        }
        const size_t orr = tab.p[P_WR].at(l, mot_router_copy(c, f, 0)), ou = tab.p[P_U].at(l, mot_router_copy(c, f, 0));
        matmul(G + orr, D, ds.data(), E, true, hr, D, false, E, D, n, true);
        matmul(dh + (size_t)r0 * D, D, ds.data(), E, false, P + orr, D, false, n, D, E, true);
        // aux BCE, mean over n x E, weight MOT_AUX_WEIGHT: dz = w (a - t) / (n E); h is detached
        std::vector<S> dz((size_t)n * E);
        for (int i = 0; i < n; i++)
            for (int e = 0; e < E; e++) dz[(size_t)i * E + e] = aux[(size_t)(r0 + i) * Em + e];
        for (int e = 0; e < E; e++)
            for (int j = 0; j < C; j++) dz[(size_t)(sel[(size_t)e * C + j] - r0) * E + e] -= S(1);
        const S w = S(MOT_AUX_WEIGHT / ((double)n * E));
        for (S& v : dz) v *= w;
        matmul(G + ou, D, dz.data(), E, true, hr, D, false, E, D, n, true);
    }
}

// ---- output head and cross-entropy ---------------------------------------------------------
// loss = mean over valid targets of logsumexp(logits) - logits[target]; loss_m restricts the
// mean to positions whose TARGET has modality m. Writes dlogits = (softmax - onehot) / n_valid.
template <typename S>
void cross_entropy(MotModel<S>* m, const MotBatch& b) {
    const int N = b.B * b.T, V = m->cfg.vocab;
    std::vector<double> row_loss(N, 0.0);
    const MotPlan& p = m->plan;
    const int n_valid = p.n_valid;
#pragma omp parallel for schedule(static)
    for (int r = 0; r < N; r++) {
        const int tgt = p.tgt[r];
        const S* lg = m->act.logits + (size_t)r * V;
        S* dl = m->act.dlogits + (size_t)r * V;
        if (tgt < 0) {
            std::fill(dl, dl + V, S(0));
            continue;
        }
        S mx = lg[0];
        for (int j = 1; j < V; j++) mx = std::max(mx, lg[j]);
        S sum = 0;
        for (int j = 0; j < V; j++) {
            dl[j] = std::exp(lg[j] - mx);
            sum += dl[j];
        }
        row_loss[r] = double(std::log(sum) + mx - lg[tgt]);
        const S inv = S(1) / (sum * n_valid);
        for (int j = 0; j < V; j++) dl[j] *= inv;
        dl[tgt] -= S(1) / n_valid;
    }
    // summed in row order so the loss is the same whatever the thread count
    double total = 0, mod_sum[MOT_N_MOD] = {0, 0, 0};
    for (int r = 0; r < N; r++) {
        const int tgt = p.tgt[r];
        if (tgt < 0) continue;
        const int md = mot_modality(m->cfg, tgt);
        total += row_loss[r];
        mod_sum[md] += row_loss[r];
    }
    m->pos_loss.assign(N, 0.0);
    for (int r = 0; r < N; r++) m->pos_loss[b.order[r]] = row_loss[r];
    m->n_valid = n_valid;
    m->loss = n_valid ? total / n_valid : 0.0;
    for (int md = 0; md < MOT_N_MOD; md++) {
        m->n_mod[md] = p.n_mod[md];
        m->loss_mod[md] = p.n_mod[md] ? mod_sum[md] / p.n_mod[md] : 0.0;
    }
    m->loss_lm = m->loss;
}

// ---- Transfusion: image output and the diffusion loss -------------------------------------
// eps_hat = z W_out + b_out on the image rows; MSE = one mean over the noised (t >= 1) image
// positions and their 16 values of (eps_hat - eps)^2; loss = loss_lm + 5 MSE. With m->diff_loss =
// MOT_DIFF_MIN_SNR, loss = loss_lm + 5 WMSE, WMSE = sum of w(t) (eps_hat - eps)^2 over the same
// positions divided by the same count (w = 1 gives the MSE exactly); loss_mod[image] stays the
// plain MSE, so reported and validation image losses compare across weightings. Writes deps and
// the per-position squared error (mean over the 16 values, unweighted) into pos_loss. Call after
// cross_entropy.
template <typename S>
void diffusion_loss(MotModel<S>* m, const MotBatch& b) {
    const int D = m->cfg.d_model, P = MOT_PATCH, r0 = b.group[MOD_IMAGE], r1 = b.group[MOD_IMAGE + 1];
    MotActs<S>& A = m->act;
    matmul(A.eps_hat + (size_t)r0 * P, P, A.z + (size_t)r0 * D, D, false, m->param(P_WOUT), P, false, r1 - r0, P, D,
           false);
    const int n = m->plan.n_noised;
    double sum = 0, wsum = 0;
    for (int r = r0; r < r1; r++) {
        const int i = b.order[r];
        const double w = mot_diff_loss_weight(m->diff_loss, b.tstep[i]);
        S *e = A.eps_hat + (size_t)r * P, *de = A.deps + (size_t)r * P;
        double se = 0;
        for (int j = 0; j < P; j++) {
            e[j] += m->param(P_BOUT)[j];
            const double d = double(e[j]) - b.eps[(size_t)i * P + j];
            se += d * d;
            de[j] = b.tstep[i] > 0 ? S(w * MOT_DIFF_WEIGHT * 2 * d / ((double)n * P)) : S(0);
        }
        if (b.tstep[i] > 0) {
            sum += se;
            wsum += w * se;
            m->pos_loss[i] = se / P;
        }
    }
    m->n_mod[MOD_IMAGE] = n;
    m->loss_mod[MOD_IMAGE] = n ? sum / ((double)n * P) : 0.0;
    m->loss = m->loss_lm + MOT_DIFF_WEIGHT * (n ? wsum / ((double)n * P) : 0.0);
}

// ---- the whole model -----------------------------------------------------------------------
// Forward pass: fills the activations, the logits (grouped order) and the losses; returns loss.
template <typename S>
double mot_forward(MotModel<S>* m, const MotBatch& b) {
    const MotConfig& c = m->cfg;
    mot_alloc_acts(m, b.B, b.T);
    const int N = b.B * b.T, D = c.d_model, H = c.n_head, Dh = D / H, F = c.d_ff, V = c.vocab;
    const int32_t* g = b.group;
    const MotParamTable& tab = m->tab;
    MotActs<S>& A = m->act;
    const size_t ND = (size_t)N * D, NF = (size_t)N * F;

    const bool experts = mot_has_experts(c) || m->force_expert_path;
    const std::string bad = mot_plan(c, b, &m->plan);  // the batch's index lists, once
    if (!bad.empty()) throw std::invalid_argument("mot_forward: " + bad);
    const MotPlan& p = m->plan;
    m->aux_loss = m->aux_agree = 0;
    mot_bf16_refresh(m);
    const bool tf = mot_transfusion(c);
    const int i0 = p.i0, i1 = p.i1;  // image rows that take patches (Transfusion)
    for (int r = 0; r < N; r++) {    // embedding, gathered straight into grouped order
        if (r >= i0 && r < i1) continue;
        const S* e = m->param(P_EMB) + (size_t)p.tok[r] * D;
        std::copy(e, e + D, A.x + (size_t)r * D);
    }
    if (i1 > i0) {  // Transfusion image rows: x_t W_in + b_in + sinusoid(t) W_t
        for (int r = i0; r < i1; r++) {
            const int i = b.order[r];
            for (int j = 0; j < MOT_PATCH; j++) A.pin[(size_t)r * MOT_PATCH + j] = S(b.xin[(size_t)i * MOT_PATCH + j]);
            mot_sinusoid(A.sinu + (size_t)r * D, b.tstep[i], D);
        }
        S* xr = A.x + (size_t)i0 * D;
        matmul(xr, D, A.pin + (size_t)i0 * MOT_PATCH, MOT_PATCH, false, m->param(P_WIN), D, false, i1 - i0, D,
               MOT_PATCH, false);
        matmul(xr, D, A.sinu + (size_t)i0 * D, D, false, m->param(P_WT), D, false, i1 - i0, D, D, true);
        for (int r = 0; r < i1 - i0; r++)
            for (int j = 0; j < D; j++) xr[(size_t)r * D + j] += m->param(P_BIN)[j];
    }
    for (int l = 0; l < c.n_layer; l++) {
        const S* x = A.x + l * ND;
        S *q = A.q + l * ND, *k = A.k + l * ND, *v = A.v + l * ND, *qr = A.qr + l * ND, *kr = A.kr + l * ND;
        S *o = A.o + l * ND, *a = A.a + l * ND, *h = A.h + l * ND, *y2 = A.y2 + l * ND;
        S *u1 = A.u1 + l * NF, *u3 = A.u3 + l * NF, *u = A.u + l * NF;
        S* y = A.x + (l + 1) * ND;
        const int ka = tab.p[P_GQ].copies, kn = tab.p[P_GATTN].copies;
        // attention sublayer: h = x + rmsnorm(attn(x) Wo) * g_attn
        linear_forward(*m, q, x, P_WQ, l, g);
        linear_forward(*m, k, x, P_WK, l, g);
        linear_forward(*m, v, x, P_WV, l, g);
        for (S* t : {q, k, v}) mot_bf16_keep(*m, t, ND);
        rmsnorm_forward(qr, A.q_rstd + (size_t)l * N * H, q, m->param(P_GQ, l), ka, g, N * H, Dh, H);
        rmsnorm_forward(kr, A.k_rstd + (size_t)l * N * H, k, m->param(P_GK, l), ka, g, N * H, Dh, H);
        rope_apply(qr, *m, b, +1);
        rope_apply(kr, *m, b, +1);
        for (S* t : {qr, kr}) mot_bf16_keep(*m, t, ND);
        attention_forward(o, A.att + (size_t)l * b.B * H * b.T * b.T, qr, kr, v, b, D, H);
        mot_bf16_keep(*m, o, ND);
        linear_forward(*m, a, o, P_WO, l, g);
        mot_bf16_keep(*m, a, ND);
        rmsnorm_forward(h, A.a_rstd + (size_t)l * N, a, m->param(P_GATTN, l), kn, g, N, D, 1);
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < ND; i++) h[i] += x[i];
        // FFN sublayer: y = h + rmsnorm(swiglu(h) W2) * g_ffn; rows of a copy with experts: y = h + y2 * g_ffn,
        // y2 the gated sum of the experts' normalised outputs
        if (experts) {
            ffn_forward_experts(m, b, l);
        } else {
            linear_forward(*m, u1, h, P_W1, l, g);
            linear_forward(*m, u3, h, P_W3, l, g);
            for (S* t : {u1, u3}) mot_bf16_keep(*m, t, NF);
            swiglu_forward(u, u1, u3, NF);
            mot_bf16_keep(*m, u, NF);
            linear_forward(*m, y2, u, P_W2, l, g);
            mot_bf16_keep(*m, y2, ND);
        }
        rmsnorm_forward(y, A.y2_rstd + (size_t)l * N, y2, m->param(P_GFFN, l), kn, g, N, D, 1, mot_ffn_copies(c),
                        mot_gain_only_copies(c));
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < ND; i++) y[i] += h[i];
    }
    rmsnorm_forward(A.z, A.z_rstd, A.x + c.n_layer * ND, m->param(P_GOUT), tab.p[P_GOUT].copies, g, N, D, 1);
    mot_matmul(*m, A.logits, V, A.z, D, false, m->param(P_HEAD), V, false, N, V, D, false);
    cross_entropy(m, b);
    if (tf) diffusion_loss(m, b);
    if (experts && m->route == MOT_ROUTE_EC) {  // aux_agree: a count of rows so far (over layers)
        const long rows = p.expert_rows * c.n_layer;
        m->aux_agree = rows ? m->aux_agree / rows : 0;
    }
    return m->loss;  // the reported loss: the training objective adds MOT_AUX_WEIGHT * aux_loss
}

// For a backward pass that does not accumulate (mot_backward and mot_gpu_backward with
// accumulate = false): the gradient ranges [first, second) it must zero before it runs, i.e. all
// but the head and the attention, FFN and expert matrices of copies that have rows in the batch
// (each of those is written by one product per layer and copy, or by the head's first). Adjacent
// ranges are merged, so the count stays small for the GPU's memsets.
inline std::vector<std::pair<size_t, size_t>> mot_grad_unwritten(const MotConfig& c, const MotParamTable& tab,
                                                                 const int32_t* g) {
    std::vector<std::pair<size_t, size_t>> out;
    auto zero = [&](size_t lo, size_t n) {
        if (n == 0) return;
        if (!out.empty() && out.back().second == lo) out.back().second = lo + n;
        else out.push_back({lo, lo + n});
    };
    for (int p = 0; p < P_COUNT; p++) {
        const MotParamInfo& info = tab.p[p];
        std::vector<char> absent(info.copies, 0);                // copies of p with no rows in the batch
        if (p == P_WQ || p == P_WK || p == P_WV || p == P_WO) {  // written: the copies the products visit
            std::fill(absent.begin(), absent.end(), 1);
            mot_for_each_copy(info.copies, g, [&](int k, int, int) { absent[k] = 0; });
        } else if (p == P_W1 || p == P_W3 || p == P_W2) {  // every expert of an FFN copy without rows
            for (int f = 0; f < mot_ffn_copies(c); f++) {
                int r0, r1;
                mot_ffn_rows(c, g, f, &r0, &r1);
                for (int e = 0; e < c.n_expert[f]; e++) absent[mot_expert_copy(c, f, e)] = r1 == r0;
            }
        } else if (p != P_HEAD) {
            zero(info.offset, info.size());
            continue;
        }
        for (int l = 0; l < info.layers; l++)
            for (int k = 0; k < info.copies; k++)
                if (absent[k]) zero(info.at(l, k), info.each());
    }
    return out;
}

// Backward pass. accumulate = true: ADDS into m->grads (call mot_zero_grad first; accumulation over
// several batches is gradient accumulation). accumulate = false (the first or only micro-batch):
// the same gradients without zeroing first. The weight products then write instead of add, which
// saves a pass over the gradients and a read of every weight gradient: memory traffic that grows
// with the parameters, not the tokens (12 ms of a 400 ms step for a 31.5M-parameter MoMa-style
// model on 1,024 tokens). Needs the activations of the forward pass of the same batch (with experts,
// an EC forward: the gradient is that of loss + MOT_AUX_WEIGHT * aux_loss).
template <typename S>
void mot_backward(MotModel<S>* m, const MotBatch& b, bool accumulate = true) {
    const MotConfig& c = m->cfg;
    const int N = b.B * b.T, D = c.d_model, H = c.n_head, Dh = D / H, F = c.d_ff, V = c.vocab;
    const int32_t* g = b.group;
    const MotParamTable& tab = m->tab;
    MotActs<S>& A = m->act;
    const size_t ND = (size_t)N * D, NF = (size_t)N * F;
    const bool experts = mot_has_experts(c) || m->force_expert_path;
    const MotScratch<S>& Z = m->scr;
    S *dx = Z.dx, *dh = Z.dh, *dt = Z.dt, *dq = Z.dq, *dk = Z.dk, *dv = Z.dv, *dO = Z.dO, *du1 = Z.du1, *du3 = Z.du3,
      *du = Z.du;
    S* G = m->grads.data();
    const bool acc = accumulate;
    if (!acc)
        for (const auto& r : mot_grad_unwritten(c, tab, g)) std::fill(G + r.first, G + r.second, S(0));

    // head and final norm
    mot_matmul(*m, m->grad(P_HEAD), V, A.z, D, true, A.dlogits, V, false, D, V, N, acc);
    mot_matmul(*m, dt, D, A.dlogits, V, false, m->param(P_HEAD), V, true, N, D, V, false);
    const bool tf = mot_transfusion(c);
    const int i0 = g[MOD_IMAGE], i1 = tf ? g[MOD_IMAGE + 1] : i0, ni = i1 - i0, PT = MOT_PATCH;
    if (ni > 0) {  // eps_hat = z W_out + b_out on the image rows
        const S* de = A.deps + (size_t)i0 * PT;
        matmul(m->grad(P_WOUT), PT, A.z + (size_t)i0 * D, D, true, de, PT, false, D, PT, ni, true);
        matmul(dt + (size_t)i0 * D, D, de, PT, false, m->param(P_WOUT), PT, true, ni, D, PT, true);
        for (int r = 0; r < ni; r++)
            for (int j = 0; j < PT; j++) m->grad(P_BOUT)[j] += de[(size_t)r * PT + j];
    }
    rmsnorm_backward(dx, false, m->grad(P_GOUT), dt, A.x + c.n_layer * ND, A.z_rstd, m->param(P_GOUT),
                     tab.p[P_GOUT].copies, g, N, D, 1);
    for (int l = c.n_layer - 1; l >= 0; l--) {
        const S* x = A.x + l * ND;
        const S *q = A.q + l * ND, *k = A.k + l * ND, *v = A.v + l * ND, *qr = A.qr + l * ND, *kr = A.kr + l * ND;
        const S *o = A.o + l * ND, *a = A.a + l * ND, *h = A.h + l * ND, *y2 = A.y2 + l * ND;
        const S *u1 = A.u1 + l * NF, *u3 = A.u3 + l * NF, *u = A.u + l * NF;
        const int ka = tab.p[P_GQ].copies, kn = tab.p[P_GATTN].copies;
        // FFN sublayer; dx holds dL/dy. The residual passes dy straight to dh.
        rmsnorm_backward(dt, false, m->grad(P_GFFN, l), dx, y2, A.y2_rstd + (size_t)l * N, m->param(P_GFFN, l), kn, g,
                         N, D, 1, mot_ffn_copies(c), mot_gain_only_copies(c));  // dt = dL/dy2
        if (experts) {
            std::copy(dx, dx + ND, dh);
            ffn_backward_experts(m, b, l, dt, dh, acc);
        } else {
            linear_backward(m, du, false, acc, dt, u, P_W2, l, g);
            mot_bf16_keep(*m, du, NF);
            swiglu_backward(du1, du3, du, u1, u3, NF);
            std::copy(dx, dx + ND, dh);
            linear_backward(m, dh, true, acc, du1, h, P_W1, l, g);
            linear_backward(m, dh, true, acc, du3, h, P_W3, l, g);
        }
        // attention sublayer; dh holds dL/dh. The residual passes dh straight to dx.
        rmsnorm_backward(dt, false, m->grad(P_GATTN, l), dh, a, A.a_rstd + (size_t)l * N, m->param(P_GATTN, l), kn, g,
                         N, D, 1);  // dt = dL/da
        linear_backward(m, dO, false, acc, dt, o, P_WO, l, g);
        mot_bf16_keep(*m, dO, ND);
        attention_backward(dq, dk, dv, dO, A.att + (size_t)l * b.B * H * b.T * b.T, qr, kr, v, b, D, H);
        for (S* t : {dq, dk, dv}) mot_bf16_keep(*m, t, ND);
        rope_apply(dq, *m, b, -1);
        rope_apply(dk, *m, b, -1);
        for (S* t : {dq, dk}) mot_bf16_keep(*m, t, ND);
        // QK-norm backward, in place through dt: dq <- dL/dq_raw
        rmsnorm_backward(dt, false, m->grad(P_GQ, l), dq, q, A.q_rstd + (size_t)l * N * H, m->param(P_GQ, l), ka, g,
                         N * H, Dh, H);
        std::copy(dt, dt + ND, dq);
        rmsnorm_backward(dt, false, m->grad(P_GK, l), dk, k, A.k_rstd + (size_t)l * N * H, m->param(P_GK, l), ka, g,
                         N * H, Dh, H);
        std::copy(dt, dt + ND, dk);
        std::copy(dh, dh + ND, dx);
        linear_backward(m, dx, true, acc, dq, x, P_WQ, l, g);
        linear_backward(m, dx, true, acc, dk, x, P_WK, l, g);
        linear_backward(m, dx, true, acc, dv, x, P_WV, l, g);
    }
    S* dE = m->grad(P_EMB);
    if (ni > 0) {  // image rows: x_t W_in + b_in + sinusoid(t) W_t
        const S* dxi = dx + (size_t)i0 * D;
        matmul(m->grad(P_WIN), D, A.pin + (size_t)i0 * PT, PT, true, dxi, D, false, PT, D, ni, true);
        matmul(m->grad(P_WT), D, A.sinu + (size_t)i0 * D, D, true, dxi, D, false, D, D, ni, true);
        for (int r = 0; r < ni; r++)
            for (int j = 0; j < D; j++) m->grad(P_BIN)[j] += dxi[(size_t)r * D + j];
    }
    // embedding: each token's rows added in row order (the same sums however many threads)
    const MotPlan& p = m->plan;
#pragma omp parallel for schedule(dynamic, 16)
    for (int u = 0; u < (int)p.emb_tok.size(); u++) {
        S* e = dE + (size_t)p.emb_tok[u] * D;
        for (int k = p.emb_start[u]; k < p.emb_start[u + 1]; k++)
            for (int j = 0; j < D; j++) e[j] += dx[(size_t)p.emb_rows[k] * D + j];
    }
}

template <typename S>
void mot_zero_grad(MotModel<S>* m) {
    std::fill(m->grads.begin(), m->grads.end(), S(0));
}

// Logit of original position i (= b*T + t) for vocabulary entry j, after a forward pass.
template <typename S>
S mot_logit(const MotModel<S>& m, const MotBatch& b, int i, int j) {
    return m.act.logits[(size_t)b.row_of[i] * m.cfg.vocab + j];
}

// ============================================================================================
// 6. AdamW and the learning-rate schedule
// ============================================================================================
// Defaults follow the paper's Transfusion recipe: betas (0.9, 0.95), eps 1e-8, weight decay 0.1
// (decoupled, on matrices and the embedding only), global-norm clipping at 1.0, linear warmup,
// then cosine decay to min_lr_frac of the peak at the last step.
struct MotOptim {
    double lr = 3e-3, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1, grad_clip = 1.0;
    double min_lr_frac = 0.05;
    int warmup = 20, steps = 200;
};

// Learning rate of step `step` (0-based): warmup ramps (step+1)/warmup * peak; after it, cosine
// from the peak (at step = warmup) to the floor (at step = steps - 1).
inline double mot_lr_at(const MotOptim& o, int step) {
    if (step < o.warmup) return o.lr * (step + 1) / o.warmup;
    const double floor_lr = o.lr * o.min_lr_frac;
    const int span = std::max(1, o.steps - 1 - o.warmup);
    const double progress = std::min(1.0, double(step - o.warmup) / span);
    return floor_lr + 0.5 * (o.lr - floor_lr) * (1.0 + cos(M_PI * progress));
}

// The fast twin of the loop below (section 7); it returns the first chunk it left to the loop.
template <typename S>
size_t mot_sumsq_chunks_fast(double* part, const S* g, size_t c, size_t cend, size_t chunk, size_t n);

template <typename S>
double mot_grad_norm(const MotModel<S>& m) {
    // Fixed chunks summed in double, then the chunk sums in order: the same result whatever the
    // number of threads (a resumed run must reproduce an uninterrupted one bit for bit). Each
    // chunk keeps eight running sums, lane j taking elements j, j+8, ...: eight independent chains
    // instead of one, whose order a vector of eight doubles follows exactly.
    const size_t n = m.grads.size(), chunk = 1 << 16, nchunks = (n + chunk - 1) / chunk;
    std::vector<double> part(nchunks, 0.0);
    const S* g = m.grads.data();
#pragma omp parallel
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        size_t c = nchunks * t / nt;
        const size_t cend = nchunks * (t + 1) / nt;
#ifndef MOT_PLAIN
        c = mot_sumsq_chunks_fast(part.data(), g, c, cend, chunk, n);
#endif
        for (; c < cend; c++) {
            const size_t lo = c * chunk, hi = std::min(n, (c + 1) * chunk);
            double a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            size_t i = lo;
            for (; i + 8 <= hi; i += 8)
                for (int j = 0; j < 8; j++) a[j] += double(g[i + j]) * double(g[i + j]);
            for (; i < hi; i++) a[(i - lo) & 7] += double(g[i]) * double(g[i]);
            part[c] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
        }
    }
    double ss = 0;
    for (double p : part) ss += p;
    return sqrt(ss);
}

template <typename S>
void mot_adamw_fast(MotModel<S>* m, const MotOptim& o, double lr, S scale, S b1, S b2, S inv_bc1, S inv_bc2, S eps,
                    S lr_s);

// One AdamW update for step `step` (0-based; bias correction uses t = step + 1). Clips the
// gradients to global norm grad_clip first (as torch.nn.utils.clip_grad_norm_). Returns the
// gradient norm before clipping.
template <typename S>
double mot_adamw_step(MotModel<S>* m, const MotOptim& o, int step) {
    const double norm = mot_grad_norm(*m);
    const double clip = (o.grad_clip > 0 && norm > o.grad_clip) ? o.grad_clip / (norm + 1e-6) : 1.0;
    const double lr = mot_lr_at(o, step), t = step + 1;
    const double bc1 = 1.0 - pow(o.beta1, t), bc2 = 1.0 - pow(o.beta2, t);
    const S b1 = S(o.beta1), b2 = S(o.beta2), inv_bc1 = S(1 / bc1), inv_bc2 = S(1 / bc2), eps = S(o.eps);
    const S lr_s = S(lr), scale = S(clip);
#ifdef MOT_PLAIN
    S *W = m->params.data(), *Gr = m->grads.data(), *M = m->adam_m.data(), *Vv = m->adam_v.data();
    for (int p = 0; p < P_COUNT; p++) {
        const MotParamInfo& info = m->tab.p[p];
        const S keep = S(1.0 - (info.decay ? lr * o.weight_decay : 0.0));  // decoupled weight decay
        const long lo = (long)info.offset, hi = lo + (long)info.size();
#pragma omp parallel for schedule(static)
        for (long i = lo; i < hi; i++) {
            const S gi = Gr[i] * scale;
            M[i] = b1 * M[i] + (S(1) - b1) * gi;
            Vv[i] = b2 * Vv[i] + (S(1) - b2) * gi * gi;
            W[i] = W[i] * keep - lr_s * (M[i] * inv_bc1) / (std::sqrt(Vv[i] * inv_bc2) + eps);
        }
    }
#else
    mot_adamw_fast(m, o, lr, scale, b1, b2, inv_bc1, inv_bc2, eps, lr_s);  // the same update, blocked (section 7)
#endif
    return norm;
}

// ============================================================================================
// 7. Fast paths: the fast twins of plain functions above, all off with -DMOT_PLAIN
// ============================================================================================
// Each computes what its plain twin computes; where the sums run in another order (matmul_fast,
// router_logits_fast) the results agree within rounding, elsewhere bit for bit. The tests run
// with both (make test builds the CPU tests a second time with -DMOT_PLAIN).

// ---- matmul_fast: the one routine where the CPU speed lives ----------------------------------
// BLIS-style: for each NC-wide column block and KC-deep slice of K, op(B) is packed into NR-column
// panels (a product of at most 2 MC rows reads an untransposed B in place instead, and one of at
// most 192 rows with B transposed is turned round: C^T = B op(A)^T, B's rows read in place); for each
// MC-tall row block op(A) is packed into MR-row panels; a register-blocked MR x NR micro-kernel
// then sweeps the panels. Packing absorbs the transposes (and zero-pads the edges), so
// one micro-kernel serves all four layouts and every size, and each element of C is computed by the
// same sequence of operations wherever its row falls: a tower's row range gives bit-identical
// results to the same rows inside a larger matmul (the MoT = dense test relies on it).
// Threads: C is split into one contiguous slab per thread (along the longer of M and N); each runs
// the serial algorithm with its own thread_local packing buffers. Inside an OpenMP region, or for
// products under ~2 MFLOP, it runs single-threaded. C must not overlap A or B. ("Inside" counts a
// region of one thread too: a caller can make everything below it serial that way.)
namespace gemm_detail {

// Block sizes, for AMD Zen 5 (per core: 32 zmm registers, 2 x 512-bit FMA pipes, 48 KiB L1D,
// 1 MiB L2; L3 shared).
template <typename T>
struct Cfg {
    static constexpr int L = 64 / sizeof(T);  // lanes in one 512-bit register (16 float, 8 double)
    // Micro-tile MR x NR = 12 x (2 registers): 24 accumulator registers + 2 for the B row + 1 spare
    // out of 32. 24 independent FMA chains cover the FMA latency (4 cycles x 2 pipes = 8 needed), and
    // each k step does 2 vector loads + 12 broadcasts for 24 FMAs.
    static constexpr int MR = 12;
    static constexpr int NR = 2 * L;
    // KC: depth of one packed slice. The KC x NR B micro-panel (256*32*4 = 32 KiB for float) is reused
    // by every A micro-panel of the block, so it should stay in the 48 KiB L1D. (Measured: KC 256/384/512
    // x MC 120/240 are all within ~5% on the model's shapes; 256/240 is as good as any.)
    static constexpr int KC = 256;
    // MC: rows of the packed A block (MC x KC = 240*256*4 = 240 KiB float), kept resident in the
    // 1 MiB L2 while all NR-wide B micro-panels stream past it. Multiple of MR.
    static constexpr int MC = 20 * MR;
    // NC: columns of the packed B block (KC x NC = 4 MiB float at most), lives in L2/L3 and is reused
    // for all MC-row blocks. Large enough that the model's widths (<= 4096) need a single block.
    static constexpr int NC = 4096;
};

// Pack op(A)[i0 .. i0+mc) x [p0 .. p0+kc) into MR-row panels: Ap[(panel*kc + k)*MR + r].
template <typename T>
void pack_A(T* Ap, const T* A, int lda, bool transA, int i0, int p0, int mc, int kc) {
    constexpr int MR = Cfg<T>::MR;
    for (int ip = 0; ip < mc; ip += MR, Ap += MR * kc) {
        const int mr = std::min(MR, mc - ip);
        if (transA) {  // op(A)(i,k) = A[k*lda + i]: contiguous along i
            for (int k = 0; k < kc; ++k) {
                const T* src = A + (size_t)(p0 + k) * lda + i0 + ip;
                for (int r = 0; r < MR; ++r) Ap[k * MR + r] = r < mr ? src[r] : T(0);
            }
        } else {  // op(A)(i,k) = A[i*lda + k]: contiguous along k
            // Walk k outermost, gathering one MR-column at a time: contiguous writes, MR read streams
            // (measured ~1.5x faster than row-by-row with strided writes).
            const T* src[MR];  // row pointers; padding rows reuse the last valid row but are never read
            for (int r = 0; r < MR; ++r) src[r] = A + (size_t)(i0 + ip + std::min(r, mr - 1)) * lda + p0;
            if (mr == MR) {
                for (int k = 0; k < kc; ++k)
                    for (int r = 0; r < MR; ++r) Ap[k * MR + r] = src[r][k];
            } else {
                for (int k = 0; k < kc; ++k)
                    for (int r = 0; r < MR; ++r) Ap[k * MR + r] = r < mr ? src[r][k] : T(0);
            }
        }
    }
}

#if defined(__GNUC__) && !defined(__clang__)
#define MOT_TRANSPOSE16 1  // GCC's two-vector __builtin_shuffle; clang (the fuzz builds) keeps the plain copy
// dst[k * ldd + c] = src[c * lds + k] for a 16 x 16 block of floats: 16 vector loads, four rounds
// of two-register shuffles (round s swaps the off-diagonal s x s blocks of every 2s x 2s block),
// 16 vector stores. Packing a 256 x 768 weight transposed: 0.33 -> 0.14 ns per float (as fast as
// the plain copy; cache-warm, one thread), for the backward's dX = dY W^T of every model.
inline void transpose16(float* dst, int ldd, const float* src, int lds) {
    typedef float V __attribute__((vector_size(64)));
    typedef int I __attribute__((vector_size(64)));
    V r[16];
    for (int i = 0; i < 16; ++i) std::memcpy(&r[i], src + (size_t)i * lds, sizeof(V));
    const I lo8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}, hi8 = lo8 + 8;
    const I lo4 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27}, hi4 = lo4 + 4;
    const I lo2 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29}, hi2 = lo2 + 2;
    const I lo1 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}, hi1 = lo1 + 1;
    // (the masks by reference: a 64-byte value passed by value draws a psABI note without AVX-512)
    auto round = [&r](int s, const I& lo, const I& hi) {
#if defined(__GNUC__) && !defined(__CUDACC__)
#pragma GCC unroll 16
#endif
        for (int i = 0; i < 16; ++i)
            if (!(i & s)) {
                const V a = r[i], b = r[i + s];
                r[i] = __builtin_shuffle(a, b, lo);
                r[i + s] = __builtin_shuffle(a, b, hi);
            }
    };
    round(8, lo8, hi8);
    round(4, lo4, hi4);
    round(2, lo2, hi2);
    round(1, lo1, hi1);
    for (int i = 0; i < 16; ++i) std::memcpy(dst + (size_t)i * ldd, &r[i], sizeof(V));
}
#endif

// Pack op(B)[p0 .. p0+kc) x [j0 .. j0+nc) into NR-column panels: Bp[(panel*kc + k)*NR + c].
template <typename T>
void pack_B(T* Bp, const T* B, int ldb, bool transB, int p0, int j0, int kc, int nc) {
    constexpr int NR = Cfg<T>::NR;
    for (int jp = 0; jp < nc; jp += NR, Bp += NR * kc) {
        const int nr = std::min(NR, nc - jp);
        if (!transB) {  // op(B)(k,j) = B[k*ldb + j]: contiguous along j
            for (int k = 0; k < kc; ++k) {
                const T* src = B + (size_t)(p0 + k) * ldb + j0 + jp;
                for (int c = 0; c < NR; ++c) Bp[k * NR + c] = c < nr ? src[c] : T(0);
            }
        } else {  // op(B)(k,j) = B[j*ldb + k]: contiguous along k
            // In 16-deep blocks: each column's 16 contiguous reads land in 16 rows of the panel, which
            // stay in L1 (measured 1.6x faster than a column at a time over all kc rows, for a copy
            // that costs 10-15% of a product with the ~100 rows an expert gets).
            for (int k0 = 0; k0 < kc; k0 += 16) {
                const int kn = std::min(16, kc - k0);
#ifdef MOT_TRANSPOSE16
                if constexpr (std::is_same<T, float>::value)
                    if (kn == 16 && nr == NR) {  // whole 16 x 16 blocks in registers
                        for (int c0 = 0; c0 < NR; c0 += 16)
                            transpose16(Bp + k0 * NR + c0, NR, B + (size_t)(j0 + jp + c0) * ldb + p0 + k0, ldb);
                        continue;
                    }
#endif
                for (int c = 0; c < NR; ++c) {
                    const T* src = B + (size_t)(j0 + jp + c) * ldb + p0 + k0;
                    if (c < nr)
                        for (int k = 0; k < kn; ++k) Bp[(k0 + k) * NR + c] = src[k];
                    else
                        for (int k = 0; k < kn; ++k) Bp[(k0 + k) * NR + c] = T(0);
                }
            }
        }
    }
}

// Micro-kernel: the m x n (<= R x NR) tile at C gets (acc ? C : 0) + Ap * Bp over depth kc, for
// the first R of the panel's MR rows. The accumulators are GCC vector-extension registers; the
// unrolled i loop becomes 2 R FMAs with broadcast memory operands. R < MR serves a tile's last rows:
// an expert's ~100-row products would otherwise spend up to 11 of every 12 edge rows on padding.
// B's k rows are ldbp apart (NR when packed). pf, when set, walks the next panel's rows alongside.
// ROWS: A is not a packed panel but R rows read in place, lda apart, each contiguous along k
// (rows past m repeat row m - 1); matmul's turned-round product passes the rows of its B this way.
template <typename T, int R = Cfg<T>::MR, bool ROWS = false>
inline void micro_kernel(int kc, const T* __restrict Ap, const T* __restrict Bp, T* C, int ldc, int m, int n, bool acc,
                         int ldbp = Cfg<T>::NR, const T* pf = nullptr, int lda = 0) {
    constexpr int MR = Cfg<T>::MR, NR = Cfg<T>::NR, L = Cfg<T>::L;
    typedef T V __attribute__((vector_size(64)));
    const T* a[R];
    if constexpr (ROWS)
        for (int i = 0; i < R; ++i) a[i] = Ap + (size_t)std::min(i, m - 1) * lda;
    V c[R][2];
    for (int i = 0; i < R; ++i) c[i][0] = c[i][1] = V{};
    for (int k = 0; k < kc; ++k, Bp += ldbp) {
        if (pf) {
            __builtin_prefetch(pf);
            __builtin_prefetch(pf + L);
            pf += ldbp;
        }
        V b0, b1;
        std::memcpy(&b0, Bp, sizeof b0);
        std::memcpy(&b1, Bp + L, sizeof b1);
#if defined(__GNUC__) && !defined(__CUDACC__)
#pragma GCC unroll 16
#endif
        for (int i = 0; i < R; ++i) {
            T ai;
            if constexpr (ROWS) ai = a[i][k];
            else ai = Ap[i];
            c[i][0] += ai * b0;
            c[i][1] += ai * b1;
        }
        if constexpr (!ROWS) Ap += MR;
    }
    if (m == R && n == NR) {  // full tile: vector read-modify-write of C (C may be unaligned)
        for (int i = 0; i < R; ++i)
            for (int h = 0; h < 2; ++h) {
                T* dst = C + (size_t)i * ldc + h * L;
                if (acc) {
                    V x;
                    std::memcpy(&x, dst, sizeof x);
                    c[i][h] += x;
                }
                std::memcpy(dst, &c[i][h], sizeof(V));
            }
    } else {  // edge tile: go through a scratch tile, write only the m x n valid part
        alignas(64) T tmp[R][NR];
        std::memcpy(tmp, c, sizeof tmp);
        for (int i = 0; i < m; ++i)
            for (int j = 0; j < n; ++j) {
                T& dst = C[(size_t)i * ldc + j];
                dst = acc ? dst + tmp[i][j] : tmp[i][j];
            }
    }
}

// dst[j * ldd + i] = src[i * lds + j] for an m x n block of src.
template <typename T>
void transpose_block(T* dst, int ldd, const T* src, int lds, int m, int n) {
    int i0 = 0;
#ifdef MOT_TRANSPOSE16
    if constexpr (std::is_same<T, float>::value)
        for (; i0 + 16 <= m; i0 += 16) {
            int j0 = 0;
            for (; j0 + 16 <= n; j0 += 16)
                transpose16(dst + (size_t)j0 * ldd + i0, ldd, src + (size_t)i0 * lds + j0, lds);
            for (int i = i0; i < i0 + 16; ++i)
                for (int j = j0; j < n; ++j) dst[(size_t)j * ldd + i] = src[(size_t)i * lds + j];
        }
#endif
    for (int i = i0; i < m; ++i)
        for (int j = 0; j < n; ++j) dst[(size_t)j * ldd + i] = src[(size_t)i * lds + j];
}

// Per-thread packing buffers, 64-byte aligned, grown on demand and reused across calls.
template <typename T>
struct PackBuf {
    T* p = nullptr;
    size_t n = 0;
    ~PackBuf() { std::free(p); }
    T* get(size_t need) {
        if (need > n) {
            std::free(p);
            n = (need + 15) & ~size_t(15);
            p = static_cast<T*>(std::aligned_alloc(64, n * sizeof(T)));  // size is a multiple of 64 bytes
            if (!p) {
                n = 0;
                throw std::bad_alloc();
            }
        }
        return p;
    }
};

// Serial Goto/BLIS loop nest over an M x N block of C (K > 0).
template <typename T>
void matmul_serial(T* C, int ldc, const T* A, int lda, bool transA, const T* B, int ldb, bool transB, int M, int N,
                   int K, bool accumulate) {
    using G = Cfg<T>;
    static thread_local PackBuf<T> bufA, bufB;
    const int kcmax = std::min(K, G::KC);
    if (transB && M <= 192) {
        // Few rows and B transposed (the backward's dX = dY W^T of an expert or a small tower): packing
        // W^T copies the whole weight for a handful of row tiles. Instead C^T = B op(A)^T is formed in
        // a scratch block, with op(A)^T packed (small) and the rows of B read in place, 12 at a time,
        // then transposed into C. (Measured, one thread, cold 256 x 768 weights: 22% less time at
        // M = 64, 8% at 90, 12% at 128, 6% at 192; at 240 the packed path is as fast.)
        static thread_local PackBuf<T> bufC;
        const int ldt = (M + 15) & ~15;
        T* Ap = bufA.get((size_t)(M + G::NR) * kcmax);
        T* Ct = bufC.get((size_t)N * ldt);
        if (accumulate) transpose_block(Ct, ldt, C, ldc, M, N);  // C's old value comes first in each sum
        for (int pc = 0; pc < K; pc += G::KC) {
            const int kc = std::min(G::KC, K - pc);
            const bool acc = accumulate || pc > 0;
            pack_B(Ap, A, lda, !transA, pc, 0, kc, M);  // op(A)^T as B panels: Ap[(panel*kc + k)*NR + i]
            for (int jr = 0; jr < N; jr += G::MR) {     // 12 rows of B stay in L1 ...
                const int m = std::min(G::MR, N - jr);
                const T* b = B + (size_t)jr * ldb + pc;
                for (int r = G::MR; r < 2 * G::MR && jr + r < N; ++r)  // the next 12 rows are cold (2-4% less time)
                    for (int k = 0; k < kc; k += 64 / (int)sizeof(T)) __builtin_prefetch(b + (size_t)r * ldb + k);
                for (int ir = 0; ir < M; ir += G::NR) {  // ... while the panels of op(A) stream past
                    const int n = std::min(G::NR, M - ir);
                    T* c = Ct + (size_t)jr * ldt + ir;
                    const T* a = Ap + (size_t)ir * kc;  // each FMA as in the packed path (a b = b a): the same bits
                    if (m > 8) micro_kernel<T, G::MR, true>(kc, b, a, c, ldt, m, n, acc, G::NR, nullptr, ldb);
                    else if (m > 4) micro_kernel<T, 8, true>(kc, b, a, c, ldt, m, n, acc, G::NR, nullptr, ldb);
                    else micro_kernel<T, 4, true>(kc, b, a, c, ldt, m, n, acc, G::NR, nullptr, ldb);
                }
            }
        }
        transpose_block(C, ldc, Ct, ldt, N, M);
        return;
    }
    const int ncmax = std::min(N, G::NC), mcmax = std::min(M, G::MC);
    T* Ap = bufA.get((size_t)(mcmax + G::MR) * kcmax);
    T* Bp = bufB.get((size_t)(ncmax + G::NR) * kcmax);
    for (int jc = 0; jc < N; jc += G::NC) {
        const int nc = std::min(G::NC, N - jc);
        for (int pc = 0; pc < K; pc += G::KC) {
            const int kc = std::min(G::KC, K - pc);
            const bool acc = accumulate || pc > 0;  // first K slice overwrites C unless accumulating
            // With few rows op(B) is read in place when it can be (each k row of a panel is NR
            // contiguous floats of B): the copy is not paid back over a handful of row tiles, and B is
            // often a cold weight (an expert's is read once per step), so the first row tile prefetches
            // the next panel instead. Cold 256 x 768 and 768 x 256 products, one thread: 15-18% less time
            // at M = 85 (an expert of MoMa-style at the bench shape), 22% at 40, 6% at 256, 0 at 1024.
            const bool direct = !transB && nc % G::NR == 0 && M <= 2 * G::MC;
            if (!direct) pack_B(Bp, B, ldb, transB, pc, jc, kc, nc);
            const int ldbp = direct ? ldb : G::NR;  // distance between a panel's k rows
            for (int ic = 0; ic < M; ic += G::MC) {
                const int mc = std::min(G::MC, M - ic);
                pack_A(Ap, A, lda, transA, ic, pc, mc, kc);
                for (int jr = 0; jr < nc; jr += G::NR)        // B micro-panel stays in L1 ...
                    for (int ir = 0; ir < mc; ir += G::MR) {  // ... while A micro-panels stream from L2
                        const int m = std::min(G::MR, mc - ir), n = std::min(G::NR, nc - jr);
                        const T *a = Ap + (size_t)ir * kc,
                                *b = direct ? B + (size_t)pc * ldb + jc + jr : Bp + (size_t)jr * kc;
                        T* c = C + (size_t)(ic + ir) * ldc + jc + jr;
                        const T* pf = direct && ir == 0 && jr + G::NR < nc ? b + G::NR : nullptr;
                        if (m > 8) micro_kernel(kc, a, b, c, ldc, m, n, acc, ldbp, pf);  // the same sums whichever runs
                        else if (m > 4) micro_kernel<T, 8>(kc, a, b, c, ldc, m, n, acc, ldbp, pf);
                        else micro_kernel<T, 4>(kc, a, b, c, ldc, m, n, acc, ldbp, pf);
                    }
            }
        }
    }
}

}  // namespace gemm_detail

// The fast twin of matmul_plain (section 4): the same product, the same arguments.
// C must not overlap A or B. Multithreaded (OpenMP) unless called inside a parallel region.
template <typename T>
void matmul_fast(T* C, int ldc, const T* A, int lda, bool transA, const T* B, int ldb, bool transB, int M, int N, int K,
                 bool accumulate) {
    using G = gemm_detail::Cfg<T>;
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {  // empty product: C = accumulate ? C : 0
        if (!accumulate)
            for (int i = 0; i < M; ++i) std::fill(C + (size_t)i * ldc, C + (size_t)i * ldc + N, T(0));
        return;
    }
    // Threads: one per slab of C, none when nested or when the product is too small to pay for the
    // fork (~2 MFLOP, a few hundred microseconds of serial work at most).
    const bool splitM = M >= N;  // split the longer side: the duplicated packing is of the smaller operand
    const int tile = splitM ? G::MR : G::NR, tiles = ((splitM ? M : N) + tile - 1) / tile;
    int nt = omp_get_level() > 0 ? 1 : std::min(omp_get_max_threads(), tiles);
    if (2.0 * M * N * K < 2e6) nt = 1;
    if (nt <= 1) {
        gemm_detail::matmul_serial(C, ldc, A, lda, transA, B, ldb, transB, M, N, K, accumulate);
        return;
    }
#pragma omp parallel num_threads(nt)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        const int lo = (int)((long)tiles * t / n) * tile;  // slab boundaries on whole micro-tiles
        const int hi = std::min((int)((long)tiles * (t + 1) / n) * tile, splitM ? M : N);
        if (hi > lo) {
            if (splitM)  // rows [lo, hi) of C and op(A)
                gemm_detail::matmul_serial(C + (size_t)lo * ldc, ldc, transA ? A + lo : A + (size_t)lo * lda, lda,
                                           transA, B, ldb, transB, hi - lo, N, K, accumulate);
            else  // columns [lo, hi) of C and op(B)
                gemm_detail::matmul_serial(C + lo, ldc, A, lda, transA, transB ? B + (size_t)lo * ldb : B + lo, ldb,
                                           transB, M, hi - lo, K, accumulate);
        }
    }
}

// ---- mot_sumsq_chunks_fast: the gradient norm's chunk sums (twin of the loop in mot_grad_norm) --
// float: four whole chunks at a time, one vector of sums each, so that four add chains are in
// flight (one chain, or the scalar loop, leaves the pass latency-bound: 2.5 ms against 1.4 ms for
// 31.5M floats on 2 threads; the same bits either way). Returns the first chunk not summed.
template <typename S>
size_t mot_sumsq_chunks_fast(double* part, const S* g, size_t c, size_t cend, size_t chunk, size_t n) {
#if defined(__GNUC__) && !defined(__CUDACC__)
    if constexpr (std::is_same<S, float>::value) {
        typedef float V8f __attribute__((vector_size(32)));
        typedef double V8d __attribute__((vector_size(64)));
        for (; c + 4 <= cend && (c + 4) * chunk <= n; c += 4) {
            V8d acc[4] = {};
            for (size_t i = 0; i < chunk; i += 8)
                for (int q = 0; q < 4; q++) {
                    V8f x;
                    std::memcpy(&x, g + (c + q) * chunk + i, sizeof x);
                    const V8d y = __builtin_convertvector(x, V8d);
                    acc[q] += y * y;
                }
            for (int q = 0; q < 4; q++) {
                const V8d& a = acc[q];
                part[c + q] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
            }
        }
    }
#else
    (void)part, (void)g, (void)cend, (void)chunk, (void)n;
#endif
    return c;
}

// ---- mot_adamw_fast: the AdamW update of mot_adamw_step in blocks (twin of its plain loop) ----
template <typename S>
void mot_adamw_fast(MotModel<S>* m, const MotOptim& o, double lr, S scale, S b1, S b2, S inv_bc1, S inv_bc2, S eps,
                    S lr_s) {
    S *W = m->params.data(), *Gr = m->grads.data(), *M = m->adam_m.data(), *Vv = m->adam_v.data();
    // One parallel region; each thread updates its share of every tensor in blocks of 16 floats.
    // (Measured on the bench machine, 31.5M floats, 2 threads: 7.5-8.6 ms in 16-float blocks,
    // 10.5-11 ms as one long vector loop; the same bits either way. Memory-bound: 28 bytes per
    // parameter, so this pass grows with the parameter count, not the FLOPs.)
#pragma omp parallel
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        for (int p = 0; p < P_COUNT; p++) {
            const MotParamInfo& info = m->tab.p[p];
            const S keep = S(1.0 - (info.decay ? lr * o.weight_decay : 0.0));  // decoupled weight decay
            const long n = (long)info.size(), lo = (long)info.offset + n * t / nt,
                       hi = (long)info.offset + n * (t + 1) / nt;
            for (long i0 = lo; i0 < hi; i0 += 16) {
                const long i1 = std::min(hi, i0 + 16);
#pragma omp simd
                for (long i = i0; i < i1; i++) {
                    const S gi = Gr[i] * scale;
                    M[i] = b1 * M[i] + (S(1) - b1) * gi;
                    Vv[i] = b2 * Vv[i] + (S(1) - b2) * gi * gi;
                    W[i] = W[i] * keep - lr_s * (M[i] * inv_bc1) / (std::sqrt(Vv[i] * inv_bc2) + eps);
                }
            }
        }
    }
}

// ---- router_logits_fast: both router products as one (twin of router_logits) ---------------
// [Wr; U] h^T (2E x n), then transposed into place: h Wr^T itself, E columns wide, fills each
// 32-column micro-tile with padding and copies all of h for each product (MoMa-style at the bench
// shape: 1.3 ms of a 66 ms forward, with the softmax; this way 0.45 without). Each logit is the
// same sum in the same order as in the fast product of h Wr^T alone.
template <typename S>
void router_logits_fast(S* s, S* a, int ld, const S* h, const S* Wr, const S* U, int n, int E, int D) {
    std::vector<S> wu((size_t)2 * E * D), lt((size_t)2 * E * n);
    std::copy(Wr, Wr + (size_t)E * D, wu.begin());
    std::copy(U, U + (size_t)E * D, wu.begin() + (size_t)E * D);
    matmul_fast(lt.data(), n, wu.data(), D, false, h, D, true, 2 * E, n, D, false);
    for (int i = 0; i < n; i++)
        for (int e = 0; e < E; e++) {
            s[(size_t)i * ld + e] = lt[(size_t)e * n + i];
            a[(size_t)i * ld + e] = lt[(size_t)(E + e) * n + i];
        }
}

// ---- matmul_bf16_fast: the bf16 product on the machine's matrix engine (twin of matmul_bf16_plain)
// Three engines behind one interface, picked at run time by what the processor and the kernel
// allow: AMX tiles (tdpbf16ps: a 16 x 16 fp32 tile += 16 x 32 bf16 times 32 x 16 bf16), AVX512-BF16
// (vdpbf16ps: 16 fp32 lanes += pairs of bf16 products), or the plain loop. Compiled for any x86-64
// (each engine's functions carry their own target attribute); used only where CPUID says the
// instructions exist and, for AMX, Linux grants the tile data (arch_prctl ARCH_REQ_XCOMP_PERM).
// Default: AMX where usable; else AVX512-BF16 on AMD, whose vdpbf16ps runs at twice the fp32 FMA
// rate (Intel's runs at half, so AMX is Intel's engine); else the plain loop.
// Both operands are packed first, by all threads, into 1 KiB tiles (pack_a, pack_b: zero-padded to
// 32 x 32 blocks, B with k in pairs, the layout both instructions read), so every tile load is
// contiguous. Each
// 32 x 32 block of C starts from C (accumulate) or zero and adds the products over K: in another
// order than the plain loop, so equal within fp32 rounding (the tests bound it).
// Both engines flush denormal inputs and outputs to zero (as the GPU's tensor cores do).
enum MotBf16Engine { MOT_BF16_PLAIN = 0, MOT_BF16_AVX512 = 1, MOT_BF16_AMX = 2, MOT_BF16_ENGINES = 3 };
static const char* const MOT_BF16_ENGINE_NAME[MOT_BF16_ENGINES] = {"plain loop", "AVX512-BF16", "AMX tiles"};

// Whether the processor has AMX tiles with bf16 (CPUID leaf 7: AMX-TILE and AMX-BF16).
inline bool mot_bf16_amx_cpuid() {
#ifdef MOT_BF16_X86
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d & (1u << 24)) && (d & (1u << 22));
#else
    return false;
#endif
}
// Whether this machine can run engine e (asked once; for AMX this is where the tile data is
// requested). A -DMOT_PLAIN build runs the plain loop only.
inline bool mot_bf16_usable(int e) {
#if defined(MOT_BF16_X86) && !defined(MOT_PLAIN)
    static const bool avx512 = [] {
        unsigned a = 0, b = 0, c = 0, d = 0;
        return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5)) && __builtin_cpu_supports("avx512f");
    }();
    static const bool amx = mot_bf16_amx_cpuid() &&
                            syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
    if (e == MOT_BF16_AVX512) return avx512;
    if (e == MOT_BF16_AMX) return amx;
#endif
    return e == MOT_BF16_PLAIN;
}
// Where vdpbf16ps beats the fp32 FMA: AMD's processors (twice its rate on Zen 4 and 5); Intel's run
// it at half the fp32 rate (measured here: 108 against 217 GFLOP/s per core), so there it is no default.
inline bool mot_bf16_avx512_pays() {
#ifdef MOT_BF16_X86
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid(0, &a, &b, &c, &d) && b == 0x68747541u /* "Auth" */ && d == 0x69746e65u /* "enti" */ &&
           c == 0x444d4163u /* "cAMD" */;
#else
    return false;
#endif
}
inline int& mot_bf16_engine_slot() {
    static int e = mot_bf16_usable(MOT_BF16_AMX)                                ? MOT_BF16_AMX
                   : mot_bf16_usable(MOT_BF16_AVX512) && mot_bf16_avx512_pays() ? MOT_BF16_AVX512
                                                                                : MOT_BF16_PLAIN;
    return e;
}
// The engine matmul_bf16_fast runs (process-wide).
inline int mot_bf16_engine() { return mot_bf16_engine_slot(); }
// The engine in use and, where it is not the fastest kind, why (the trainer prints it once).
inline std::string mot_bf16_engine_note() {
    const int e = mot_bf16_engine();
    std::string s = MOT_BF16_ENGINE_NAME[e];
#ifdef MOT_PLAIN
    return s + " (a -DMOT_PLAIN build)";
#endif
    if (e != MOT_BF16_AMX && mot_bf16_amx_cpuid())
        s += " (the processor has AMX tiles, but the kernel refused their state: arch_prctl XTILEDATA)";
    else if (e == MOT_BF16_PLAIN)
        s += mot_bf16_usable(MOT_BF16_AVX512)
                 ? " (no AMX tiles; this processor's AVX512-BF16 is slower than its fp32 FMA)"
                 : " (no AMX tiles or AVX512-BF16 here)";
    return s;
}
// Forces engine e (tests, benchmarks); false, changing nothing, where this machine cannot run it.
inline bool mot_bf16_set_engine(int e) {
    if (e < 0 || e >= MOT_BF16_ENGINES || !mot_bf16_usable(e)) return false;
    mot_bf16_engine_slot() = e;
    return true;
}

namespace bf16_detail {
constexpr int BLK = 32;    // rows and columns of one block of C; K is padded to a multiple of it too
constexpr int TILE = 512;  // bf16 values in one packed tile: 16 rows of 64 bytes
inline int round_up(int n) { return (n + BLK - 1) / BLK * BLK; }

// Rows 16g .. 16g+15 of op(A) (M x K) as nk = Kp / 32 tiles of 16 x 32, each 1 KiB contiguous:
// tile kb, at Ap + (g nk + kb) TILE, holds columns 32kb .. 32kb+31. Zero beyond M and K.
// Two k-neighbours as one 32-bit word of a packed tile: k even in the low half (both tile layouts
// keep k and k + 1 side by side). Operands are bf16 bits, or fp32 values rounded here.
template <typename T>
inline uint32_t pair_bits(T lo, T hi) {
    return uint32_t(mot_bf16_bits(lo)) | uint32_t(mot_bf16_bits(hi)) << 16;
}
inline void put_word(uint16_t* t, size_t word, uint32_t v) { std::memcpy(t + 2 * word, &v, 4); }

// Rows 16g .. 16g+15 of op(A) (M x K) as nk = Kp / 32 tiles of 16 x 32, each 1 KiB contiguous:
// tile kb, at Ap + (g nk + kb) TILE, holds columns 32kb .. 32kb+31. Zero beyond M and K.
template <typename TA>
void pack_a(uint16_t* Ap, const TA* A, int lda, bool transA, int M, int K, int nk, int g) {
    uint16_t* t = Ap + (size_t)g * nk * TILE;
    std::fill(t, t + (size_t)nk * TILE, uint16_t(0));
    const int i0 = 16 * g, n = std::max(0, std::min(M, i0 + 16) - i0);  // (0 in the padding beyond M)
    if (!transA) {
        for (int i = 0; i < n; i++)
            for (int kb = 0; kb * BLK < K; kb++) {
                const TA* src = A + (size_t)(i0 + i) * lda + kb * BLK;
                uint16_t* d = t + (size_t)kb * TILE + i * BLK;
                const int m = std::min(BLK, K - kb * BLK);
                for (int k = 0; k < m; k++) d[k] = mot_bf16_bits(src[k]);
            }
    } else {  // op(A)(i, k) = A[k lda + i]: rows k, k + 1 give the 16 words of column pair k / 2
        uint32_t w[16];
        for (int k = 0; k < K; k += 2) {
            const TA *r0 = A + (size_t)k * lda + i0, *r1 = k + 1 < K ? r0 + lda : nullptr;
            for (int i = 0; i < n; i++) w[i] = pair_bits(r0[i], r1 ? r1[i] : TA(0));
            const size_t base = (size_t)(k / BLK) * (TILE / 2) + (k % BLK) / 2;
            for (int i = 0; i < n; i++) put_word(t, base + (size_t)i * (BLK / 2), w[i]);
        }
    }
}
// Columns 16h .. 16h+15 of op(B) (K x N) as nk tiles of 16 pairs of k x 16 columns, k in pairs
// (the layout tdpbf16ps and vdpbf16ps read): in tile kb, at Bp + (h nk + kb) TILE, element (k, j)
// sits at (((k % 32) / 2) 16 + j % 16) 2 + k % 2, i.e. word ((k % 32) / 2) 16 + j holds k and k + 1
// of column j. Zero beyond N and K.
template <typename TB>
void pack_b(uint16_t* Bp, const TB* B, int ldb, bool transB, int N, int K, int nk, int h) {
    uint16_t* t = Bp + (size_t)h * nk * TILE;
    std::fill(t, t + (size_t)nk * TILE, uint16_t(0));
    const int j0 = 16 * h, n = std::max(0, std::min(N, j0 + 16) - j0);
    auto word = [](int k, int j) { return (size_t)(k / BLK) * (TILE / 2) + (k % BLK) / 2 * 16 + j; };
    if (transB) {  // op(B)(k, j) = B[j ldb + k]: k and k + 1 are neighbours in row j
        for (int j = 0; j < n; j++) {
            const TB* r = B + (size_t)(j0 + j) * ldb;
            for (int k = 0; k < K; k += 2) put_word(t, word(k, j), pair_bits(r[k], k + 1 < K ? r[k + 1] : TB(0)));
        }
    } else {  // rows k, k + 1 give one 64-byte row of words
        uint32_t w[16];
        for (int k = 0; k < K; k += 2) {
            const TB *r0 = B + (size_t)k * ldb + j0, *r1 = k + 1 < K ? r0 + ldb : nullptr;
            for (int j = 0; j < n; j++) w[j] = pair_bits(r0[j], r1 ? r1[j] : TB(0));
            std::memcpy(t + 2 * word(k, 0), w, (size_t)n * 4);
        }
    }
}

#ifdef MOT_BF16_X86
// c[32 x 32] (row stride ldc floats) = (load ? c : 0) + the rows of A's tile rows a0, a1 times
// the columns of B's tile columns b0, b1, over nk tiles of K: 2 x 2 tiles of C (tiles 0-3), two of
// A (4, 5), two of B (6, 7); the caller has loaded the tile configuration. C goes straight from
// memory into the accumulator tiles and back.
__attribute__((target("amx-tile,amx-bf16"))) inline void block_amx(float* c, int ldc, bool load, const uint16_t* a0,
                                                                   const uint16_t* a1, const uint16_t* b0,
                                                                   const uint16_t* b1, int nk) {
    const int ld = ldc * 4;
    if (load) {
        _tile_loadd(0, c, ld);
        _tile_loadd(1, c + 16, ld);
        _tile_loadd(2, c + (size_t)16 * ldc, ld);
        _tile_loadd(3, c + (size_t)16 * ldc + 16, ld);
    } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int kb = 0; kb < nk; kb++) {
        const size_t o = (size_t)kb * TILE;
        // each load just before its first use: tiles are not renamed, so a load waits for the
        // products still reading the tile it overwrites (this order: 5-10% faster than all four first)
        _tile_loadd(4, a0 + o, 64);
        _tile_loadd(6, b0 + o, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, b1 + o, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(5, a1 + o, 64);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c, ld);
    _tile_stored(1, c + 16, ld);
    _tile_stored(2, c + (size_t)16 * ldc, ld);
    _tile_stored(3, c + (size_t)16 * ldc + 16, ld);
}
struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
    uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};
__attribute__((target("amx-tile"))) inline void tiles_on() {
    static const TileConfig cfg;
    _tile_loadconfig(&cfg);
}
__attribute__((target("amx-tile"))) inline void tiles_off() { _tile_release(); }

// The same block with vdpbf16ps, from the same packed tiles: 8 rows at a time, 8 x 2 registers of
// 16 fp32 sums.
__attribute__((target("avx512f,avx512bf16"))) inline void block_avx512(float* c, int ldc, bool load, const uint16_t* a0,
                                                                       const uint16_t* a1, const uint16_t* b0,
                                                                       const uint16_t* b1, int nk) {
    for (int r0 = 0; r0 < BLK; r0 += 8) {
        const uint16_t* a = (r0 < 16 ? a0 : a1) + (r0 % 16) * BLK;
        __m512 acc[8][2];
        for (int r = 0; r < 8; r++) {
            const float* cr = c + (size_t)(r0 + r) * ldc;
            acc[r][0] = load ? _mm512_loadu_ps(cr) : _mm512_setzero_ps();
            acc[r][1] = load ? _mm512_loadu_ps(cr + 16) : _mm512_setzero_ps();
        }
        for (int kb = 0; kb < nk; kb++) {
            const size_t o = (size_t)kb * TILE;
            for (int p = 0; p < 16; p++) {
                const __m512bh v0 = (__m512bh)_mm512_loadu_si512(b0 + o + p * 32),
                               v1 = (__m512bh)_mm512_loadu_si512(b1 + o + p * 32);
                for (int r = 0; r < 8; r++) {
                    uint32_t pair;
                    std::memcpy(&pair, a + o + r * BLK + 2 * p, 4);
                    const __m512bh x = (__m512bh)_mm512_set1_epi32((int)pair);
                    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, v0);
                    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, v1);
                }
            }
        }
        for (int r = 0; r < 8; r++) {
            _mm512_storeu_ps(c + (size_t)(r0 + r) * ldc, acc[r][0]);
            _mm512_storeu_ps(c + (size_t)(r0 + r) * ldc + 16, acc[r][1]);
        }
    }
}
#endif
}  // namespace bf16_detail

namespace bf16_detail {
// C = (accumulate ? C : 0) + op(A) op(B) on the AMX or AVX512-BF16 engine, op(B) packed here from B
// or, when Bt is given, already packed (Bt: nk tiles per 16-column group, as pack_b writes them).
template <typename TA, typename TB>
void run(int engine, float* C, int ldc, const TA* A, int lda, bool transA, const uint16_t* Bt, const TB* B, int ldb,
         bool transB, int M, int N, int K, bool accumulate) {
    const int Mp = round_up(M), Np = round_up(N), Kp = round_up(K), nk = Kp / BLK;
    thread_local std::vector<uint16_t> Ap, Bp;
    Ap.resize((size_t)Mp * Kp);
    if (!Bt) Bp.resize((size_t)Kp * Np);
    uint16_t *ap = Ap.data(), *bp = Bt ? nullptr : Bp.data();
    const uint16_t* bt = Bt ? Bt : bp;
    const int nbi = Mp / BLK, nbj = Np / BLK;
#pragma omp parallel if (omp_get_level() == 0 && 2.0 * M * N * K >= 2e6)
    {
        // each thread packs a share of the tile rows of A and columns of B (a barrier after each)
#pragma omp for schedule(static)
        for (int g = 0; g < Mp / 16; g++) pack_a(ap, A, lda, transA, M, K, nk, g);
        if (bp) {
#pragma omp for schedule(static)
            for (int h = 0; h < Np / 16; h++) pack_b(bp, B, ldb, transB, N, K, nk, h);
        }
#ifdef MOT_BF16_X86
        alignas(64) float out[BLK * BLK];
        if (engine == MOT_BF16_AMX) tiles_on();
            // B's 32-column panel outermost: it stays in L1 while A's row blocks stream past
#pragma omp for collapse(2) schedule(static)
        for (int bj = 0; bj < nbj; bj++)
            for (int bi = 0; bi < nbi; bi++) {
                const uint16_t *a0 = ap + (size_t)(2 * bi) * nk * TILE, *a1 = a0 + (size_t)nk * TILE;
                const uint16_t *b0 = bt + (size_t)(2 * bj) * nk * TILE, *b1 = b0 + (size_t)nk * TILE;
                const int i0 = bi * BLK, j0 = bj * BLK, mi = std::min(BLK, M - i0), nj = std::min(BLK, N - j0);
                // a whole block works on C in place; an edge block on a zero-padded copy
                const bool whole = mi == BLK && nj == BLK;
                float* c = whole ? C + (size_t)i0 * ldc + j0 : out;
                const int ld = whole ? ldc : BLK;
                if (!whole && accumulate)
                    for (int i = 0; i < BLK; i++)
                        for (int j = 0; j < BLK; j++)
                            out[i * BLK + j] = i < mi && j < nj ? C[(size_t)(i0 + i) * ldc + j0 + j] : 0.0f;
                if (engine == MOT_BF16_AMX) block_amx(c, ld, accumulate, a0, a1, b0, b1, nk);
                else block_avx512(c, ld, accumulate, a0, a1, b0, b1, nk);
                if (!whole)
                    for (int i = 0; i < mi; i++)
                        std::memcpy(C + (size_t)(i0 + i) * ldc + j0, out + i * BLK, nj * sizeof(float));
            }
        if (engine == MOT_BF16_AMX) tiles_off();
#else
        (void)engine, (void)nbi, (void)nbj, (void)bt;
#endif
    }
}
}  // namespace bf16_detail

template <typename TA, typename TB>
void matmul_bf16_fast(float* C, int ldc, const TA* A, int lda, bool transA, const TB* B, int ldb, bool transB, int M,
                      int N, int K, bool accumulate) {
    const int engine = mot_bf16_engine();
    if (M <= 0 || N <= 0) return;
    if (engine != MOT_BF16_PLAIN && K > 0)
        bf16_detail::run(engine, C, ldc, A, lda, transA, nullptr, B, ldb, transB, M, N, K, accumulate);
    else matmul_bf16_plain(C, ldc, A, lda, transA, B, ldb, transB, M, N, K, accumulate);
}

// ---- a bf16 operand packed once for many products -------------------------------------------
// A weight is read by several products between two optimizer steps (the forward and the
// backward's dX); packed once into the engines' tile layout (pack_b), each product skips packing it.
inline uint16_t MotBf16Packed::at(int k, int j) const {
    using namespace bf16_detail;
    return tiles[((size_t)(j / 16) * nk + k / BLK) * TILE + ((k % BLK) / 2 * 16 + j % 16) * 2 + (k & 1)];
}
// Packs op(B) (K x N, matmul's layouts; bf16 bits or fp32 values to round) into p.
template <typename TB>
void mot_bf16_pack(MotBf16Packed* p, const TB* B, int ldb, bool transB, int K, int N) {
    using namespace bf16_detail;
    p->K = K;
    p->N = N;
    p->nk = round_up(std::max(K, 1)) / BLK;
    const int groups = round_up(std::max(N, 1)) / 16;
    p->tiles.resize((size_t)groups * p->nk * TILE);
#pragma omp parallel for schedule(static) if (omp_get_level() == 0 && (double)K * N >= 1e5)
    for (int h = 0; h < groups; h++) pack_b(p->tiles.data(), B, ldb, transB, N, K, p->nk, h);
}
// matmul_bf16 with op(B) packed: the same result, bit for bit, as matmul_bf16 on the B it was
// packed from (the same engine, the same sums; the plain engine unpacks it for its loop).
template <typename TA>
void matmul_bf16_packed(float* C, int ldc, const TA* A, int lda, bool transA, const MotBf16Packed& B, int M,
                        bool accumulate) {
    const int N = B.N, K = B.K, engine = mot_bf16_engine();
    if (M <= 0 || N <= 0) return;
    if (engine != MOT_BF16_PLAIN && K > 0) {
        bf16_detail::run(engine, C, ldc, A, lda, transA, B.tiles.data(), (const uint16_t*)nullptr, 0, false, M, N, K,
                         accumulate);
        return;
    }
    std::vector<uint16_t> Bu((size_t)K * N);  // the plain loop on op(B) unpacked: its sums, bit for bit
    for (int k = 0; k < K; k++)
        for (int j = 0; j < N; j++) Bu[(size_t)k * N + j] = B.at(k, j);
    matmul_bf16_plain(C, ldc, A, lda, transA, Bu.data(), N, false, M, N, K, accumulate);
}

// ============================================================================================
// 8. Files. All little-endian. Every reader checks magic, version, sizes, and the value ranges,
// and reports "<path>: <what is wrong>" through `err` (it never exits).
// ============================================================================================
inline bool mot_fail(std::string* err, const std::string& path, const std::string& what) {
    if (err) *err = path + ": " + what;
    return false;
}
// Checked size arithmetic: false when the exact result does not fit in 64 bits.
inline bool mot_mul(uint64_t a, uint64_t b, uint64_t* r) { return !__builtin_mul_overflow(a, b, r); }
inline bool mot_add(uint64_t a, uint64_t b, uint64_t* r) { return !__builtin_add_overflow(a, b, r); }
inline long mot_file_size(FILE* f) {
    if (fseek(f, 0, SEEK_END) != 0) return -1;
    long n = ftell(f);
    if (fseek(f, 0, SEEK_SET) != 0) return -1;
    return n;
}
// fsync of the folder holding `path`, so that a rename in it survives a power cut.
inline bool mot_sync_dir_of(const std::string& path) {
    const size_t slash = path.rfind('/');
    const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
    const int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY);
    if (fd < 0) return false;
    const bool ok = fsync(fd) == 0 || errno == EINVAL;  // some file systems cannot sync folders
    close(fd);
    return ok;
}
// Writes to path.tmp, fsyncs it, renames it into place and fsyncs the folder: a reader, a killed
// run or a crashed machine sees the old file or the whole new one, never a half-written one.
template <class Fn>
inline bool mot_write_atomic(const std::string& path, std::string* err, Fn write_body) {
    const std::string tmp = path + ".tmp";
    FILE* f = fopen(tmp.c_str(), "wb");
    if (!f) return mot_fail(err, tmp, std::string("cannot open for writing: ") + strerror(errno));
    errno = 0;
    bool ok = write_body(f);
    ok = (fflush(f) == 0) && ok;
    ok = ok && (fsync(fileno(f)) == 0 || errno == EINVAL);
    const int e = errno;
    ok = (fclose(f) == 0) && ok;
    if (!ok) {
        remove(tmp.c_str());
        return mot_fail(err, tmp, std::string("write failed: ") + strerror(e ? e : errno ? errno : EIO));
    }
    if (rename(tmp.c_str(), path.c_str()) != 0) {
        const int re = errno;
        remove(tmp.c_str());
        return mot_fail(err, path, std::string("cannot rename temp file into place: ") + strerror(re));
    }
    if (!mot_sync_dir_of(path)) return mot_fail(err, path, std::string("cannot sync its folder: ") + strerror(errno));
    return true;
}
inline bool mot_put(FILE* f, const void* p, size_t bytes) { return fwrite(p, 1, bytes, f) == bytes; }
inline bool mot_get(FILE* f, void* p, size_t bytes) { return fread(p, 1, bytes, f) == bytes; }

// ---- token shard (.bin) ----------------------------------------------------------------------
//   offset  size  field
//   0       4     magic "MOTS"
//   4       4     uint32 version = 1 (tokens only) or 2 (tokens and pixels: the Transfusion form)
//   8       4     uint32 vocab          (V)
//   12      4     uint32 image_begin    (text, specials included, is [0, image_begin))
//   16      4     uint32 speech_begin   (image is [image_begin, speech_begin), speech [speech_begin, V))
//   20      4     uint32 reserved = 0
//   24      8     uint64 n_tokens
//   version 1:
//   32      2*n   uint16 token ids: documents one after another, each BOS ... EOS
//   version 2:
//   32      8     uint64 n_images
//   40      2*n   uint16 token ids as in version 1, where every image is BOI, 49 image ids, EOI
//                 (the ids only mark the positions; data/build.cpp writes image_begin), and image
//                 ids occur nowhere else
//   ...     784*n_images  uint8 pixels: image k (the k-th BOI) as 28x28 grey, row-major, 0..255;
//                 the model's patch values are p / 127.5 - 1, cut into 49 raster-order 4x4 patches
enum {
    MOT_SHARD_VERSION = 1,
    MOT_SHARD_VERSION_PIXELS = 2,
    MOT_SHARD_HEADER = 32,
    MOT_SHARD_HEADER_V2 = 40,
    MOT_IMAGE_PIXELS = 784
};

struct MotShard {
    std::string path;
    MotVocab vocab;
    std::vector<uint16_t> tokens;
    // version 2 only: 784 pixels per image, and the token position of each image's first patch
    std::vector<uint8_t> pixels;
    std::vector<uint64_t> image_at;
    bool pixels_version = false;
};

// Version 2's rule: every BOI is followed by exactly 49 image ids and EOI, and image ids appear
// only there. Returns "" or what is wrong; fills the first-patch position of each image.
inline std::string mot_check_image_blocks(const MotVocab& v, const uint16_t* t, size_t n, std::vector<uint64_t>* at) {
    at->clear();
    for (size_t i = 0; i < n; i++) {
        const bool img = t[i] >= v.image_begin && t[i] < v.speech_begin;
        if (img)
            return "image id " + std::to_string(t[i]) + " at position " + std::to_string(i) +
                   " outside a BOI ... EOI block";
        if (t[i] != MOT_BOI) continue;
        size_t k = i + 1;
        while (k < n && t[k] >= v.image_begin && t[k] < v.speech_begin) k++;
        if (k - i - 1 != MOT_IMAGE_POS || k >= n || t[k] != MOT_EOI)
            return "the image at position " + std::to_string(i) + " has " + std::to_string(k - i - 1) +
                   " image positions" + (k < n && t[k] == MOT_EOI ? "" : " and no EOI after them") +
                   " (expected 49 then EOI)";
        at->push_back(i + 1);
        i = k;
    }
    return "";
}

// pixels == nullptr: version 1. Otherwise version 2 with n_images = the number of BOI blocks.
inline bool mot_write_shard(const std::string& path, const MotVocab& v, const uint16_t* tokens, size_t n,
                            std::string* err, const uint8_t* pixels = nullptr) {
    for (size_t i = 0; i < n; i++)
        if (tokens[i] >= v.vocab)
            return mot_fail(err, path,
                            "token " + std::to_string(tokens[i]) + " at position " + std::to_string(i) +
                                " is outside the vocabulary (size " + std::to_string(v.vocab) + ")");
    std::vector<uint64_t> at;
    if (pixels) {
        std::string bad = mot_check_image_blocks(v, tokens, n, &at);
        if (!bad.empty()) return mot_fail(err, path, bad);
    }
    return mot_write_atomic(path, err, [&](FILE* f) {
        uint32_t h[6] = {0,
                         (uint32_t)(pixels ? MOT_SHARD_VERSION_PIXELS : MOT_SHARD_VERSION),
                         (uint32_t)v.vocab,
                         (uint32_t)v.image_begin,
                         (uint32_t)v.speech_begin,
                         0};
        memcpy(h, "MOTS", 4);
        uint64_t nt = n, ni = at.size();
        return mot_put(f, h, sizeof h) && mot_put(f, &nt, 8) && (!pixels || mot_put(f, &ni, 8)) &&
               mot_put(f, tokens, n * 2) && (!pixels || mot_put(f, pixels, ni * MOT_IMAGE_PIXELS));
    });
}

inline bool mot_read_shard(const std::string& path, MotShard* out, std::string* err) {
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) return mot_fail(err, path, std::string("cannot open: ") + strerror(errno));
    struct Closer {
        FILE* f;
        ~Closer() { fclose(f); }
    } closer{f};
    const long size = mot_file_size(f);
    uint32_t h[6];
    uint64_t n, ni = 0;
    if (size < MOT_SHARD_HEADER || !mot_get(f, h, sizeof h) || !mot_get(f, &n, 8))
        return mot_fail(err, path, "truncated: shorter than the 32-byte shard header");
    if (memcmp(h, "MOTS", 4) != 0) return mot_fail(err, path, "not a mot token shard (bad magic, expected MOTS)");
    if (h[1] != MOT_SHARD_VERSION && h[1] != MOT_SHARD_VERSION_PIXELS)
        return mot_fail(err, path, "unsupported shard version " + std::to_string(h[1]) + " (expected 1 or 2)");
    const bool px = h[1] == MOT_SHARD_VERSION_PIXELS;
    if (px && (size < MOT_SHARD_HEADER_V2 || !mot_get(f, &ni, 8)))
        return mot_fail(err, path, "truncated: shorter than the 40-byte shard header of version 2");
    MotVocab v{(int32_t)h[2], (int32_t)h[3], (int32_t)h[4]};
    if (!(MOT_N_SPECIAL <= v.image_begin && v.image_begin <= v.speech_begin && v.speech_begin <= v.vocab &&
          v.vocab <= 65536))
        return mot_fail(err, path, "bad vocabulary ranges in header");
    if (h[5] != 0) return mot_fail(err, path, "reserved header field is " + std::to_string(h[5]) + " (expected 0)");
    // Compared without computing 32 + 2n (+ 784 n_images), which can wrap.
    const uint64_t body = (uint64_t)size - (px ? MOT_SHARD_HEADER_V2 : MOT_SHARD_HEADER);
    const uint64_t pix_bytes = ni <= body / MOT_IMAGE_PIXELS ? ni * MOT_IMAGE_PIXELS : UINT64_MAX;
    if (pix_bytes > body || (body - pix_bytes) % 2 != 0 || (body - pix_bytes) / 2 != n)
        return mot_fail(err, path,
                        "truncated or padded: header says " + std::to_string(n) + " tokens" +
                            (px ? " and " + std::to_string(ni) + " images" : std::string()) + " but the file has " +
                            std::to_string(size) + " bytes (expected " +
                            (px ? "40 + 2 per token + 784 per image)" : "32 + 2 per token)"));
    out->path = path;
    out->vocab = v;
    out->tokens.resize(n);
    out->pixels_version = px;
    if (!mot_get(f, out->tokens.data(), 2 * n)) return mot_fail(err, path, "read error");
    for (size_t i = 0; i < n; i++)
        if (out->tokens[i] >= v.vocab)
            return mot_fail(err, path,
                            "token " + std::to_string(out->tokens[i]) + " at position " + std::to_string(i) +
                                " is outside the vocabulary (size " + std::to_string(v.vocab) + ")");
    out->image_at.clear();
    out->pixels.clear();
    if (px) {
        std::string bad = mot_check_image_blocks(v, out->tokens.data(), n, &out->image_at);
        if (!bad.empty()) return mot_fail(err, path, bad);
        if (out->image_at.size() != ni)
            return mot_fail(err, path,
                            "header says " + std::to_string(ni) + " images but the tokens hold " +
                                std::to_string(out->image_at.size()));
        out->pixels.resize(pix_bytes);  // every byte value is a valid pixel (0..255)
        if (!mot_get(f, out->pixels.data(), pix_bytes)) return mot_fail(err, path, "read error in pixels");
    }
    return true;
}

// ---- data loader -------------------------------------------------------------------------------
// Samples B windows of T+1 tokens at uniform random offsets over all shards (each window inside
// one shard). Deterministic for a seed: the only state is the RNG, which checkpoints can save.
struct MotLoader {
    std::vector<MotShard> shards;
    std::vector<uint64_t> windows;  // cumulative number of valid window starts per shard
    MotVocab vocab;
    uint64_t rng = 0;
    bool pixels = false;  // the shards are version 2 (the Transfusion form)
};

inline bool mot_loader_open(MotLoader* ld, const std::string& pattern, int T, uint64_t seed, std::string* err) {
    glob_t gl;
    int rc = glob(pattern.c_str(), 0, nullptr, &gl);
    if (rc != 0) {
        if (rc == GLOB_NOMATCH) return mot_fail(err, pattern, "no file matches this data pattern");
        return mot_fail(err, pattern, "cannot read the data pattern");
    }
    std::vector<std::string> paths(gl.gl_pathv, gl.gl_pathv + gl.gl_pathc);
    globfree(&gl);
    ld->shards.clear();
    ld->windows.clear();
    uint64_t total = 0;
    for (const std::string& p : paths) {
        MotShard s;
        if (!mot_read_shard(p, &s, err)) return false;
        if (!ld->shards.empty() && memcmp(&s.vocab, &ld->shards[0].vocab, sizeof(MotVocab)) != 0)
            return mot_fail(err, p, "vocabulary layout differs from " + ld->shards[0].path);
        if (!ld->shards.empty() && s.pixels_version != ld->shards[0].pixels_version)
            return mot_fail(err, p,
                            "shard version differs from " + ld->shards[0].path + " (pixels in one, not the other)");
        if (s.tokens.size() < (size_t)T + 1)
            return mot_fail(err, p,
                            "has " + std::to_string(s.tokens.size()) + " tokens, fewer than one window of " +
                                std::to_string(T + 1) + " (sequence length + 1)");
        total += s.tokens.size() - T;
        ld->windows.push_back(total);
        ld->shards.push_back(std::move(s));
    }
    ld->vocab = ld->shards[0].vocab;
    ld->pixels = ld->shards[0].pixels_version;
    ld->rng = seed;
    return true;
}

// "" when the loader's shards suit the model's setting: pixels (version 2) exactly for Transfusion.
inline std::string mot_loader_setting_error(const MotLoader& ld, const MotConfig& c) {
    if (mot_transfusion(c) && !ld.pixels)
        return ld.shards[0].path +
               ": a token shard (version 1) but the model is in the Transfusion setting (it needs pixels: version 2)";
    if (!mot_transfusion(c) && ld.pixels)
        return ld.shards[0].path +
               ": a shard with pixels (version 2, the Transfusion form) but the model is in the token setting";
    return "";
}

// Transfusion: the noise of the images in window row bi of b (positions of image ids in the
// window from shard s at offset off). Per image, t is uniform in {1..1000}, or, half of the time
// when the image comes before its caption (BOS BOI ... EOI then text), in {1..500}; eps ~ N(0, I);
// xin = x_t. All drawn from the loader's stream, so a resumed run and every validation pass
// (which reopens its loader with the same seed) see the same noise.
inline void mot_loader_diffuse(MotLoader* ld, const MotConfig& c, const MotShard& sh, uint64_t off, int bi,
                               MotBatch* b) {
    const int T = b->T;
    int t_img = 0;
    uint64_t cur = UINT64_MAX;  // the image whose t is t_img
    for (int t = 0; t < T; t++) {
        const size_t i = (size_t)bi * T + t;
        b->tstep[i] = 0;
        std::fill(b->xin.begin() + i * MOT_PATCH, b->xin.begin() + (i + 1) * MOT_PATCH, 0.0f);
        std::fill(b->eps.begin() + i * MOT_PATCH, b->eps.begin() + (i + 1) * MOT_PATCH, 0.0f);
        if (mot_modality(c, b->tokens[i]) != MOD_IMAGE) continue;
        const uint64_t p = off + t;
        const size_t k = std::upper_bound(sh.image_at.begin(), sh.image_at.end(), p) - sh.image_at.begin() - 1;
        const uint64_t start = sh.image_at[k];
        if (k != cur) {
            cur = k;
            const uint64_t after = start + MOT_IMAGE_POS + 1;  // the token after EOI
            const bool image_first = start >= 2 && sh.tokens[start - 2] == MOT_BOS && after < sh.tokens.size() &&
                                     sh.tokens[after] >= MOT_N_SPECIAL && mot_modality(c, sh.tokens[after]) == MOD_TEXT;
            const bool light = image_first && (mot_rand_u64(&ld->rng) & 1);
            t_img = 1 + (int)(mot_rand_u64(&ld->rng) % (light ? 500 : MOT_DIFF_STEPS));
        }
        const int patch = (int)(p - start);
        float x0[MOT_PATCH], e[MOT_PATCH];
        const uint8_t* px = sh.pixels.data() + k * MOT_IMAGE_PIXELS;
        for (int j = 0; j < MOT_PATCH; j++) {
            x0[j] = px[((patch / 7) * 4 + j / 4) * MOT_IMAGE_SIDE + (patch % 7) * 4 + j % 4] / 127.5f - 1.0f;
            e[j] = float(mot_rand_normal(&ld->rng));
        }
        b->tstep[i] = t_img;
        std::copy(e, e + MOT_PATCH, b->eps.begin() + i * MOT_PATCH);
        mot_noise_patch(&b->xin[i * MOT_PATCH], x0, e, t_img, MOT_PATCH);
    }
}

// Fills a batch (tokens, targets, grouping). A PAD target is ignored.
inline void mot_loader_next(MotLoader* ld, const MotConfig& c, int B, int T, MotBatch* b) {
    b->B = B;
    b->T = T;
    b->tokens.resize((size_t)B * T);
    b->targets.resize((size_t)B * T);
    for (int bi = 0; bi < B; bi++) {
        uint64_t w = mot_rand_u64(&ld->rng) % ld->windows.back();
        size_t s = std::upper_bound(ld->windows.begin(), ld->windows.end(), w) - ld->windows.begin();
        uint64_t off = w - (s ? ld->windows[s - 1] : 0);
        const uint16_t* tok = ld->shards[s].tokens.data() + off;
        for (int t = 0; t < T; t++) {
            b->tokens[(size_t)bi * T + t] = tok[t];
            b->targets[(size_t)bi * T + t] = tok[t + 1] == MOT_PAD ? MOT_IGNORE : tok[t + 1];
        }
        if (mot_transfusion(c) && ld->pixels) {
            b->tstep.resize((size_t)B * T);
            b->xin.resize((size_t)B * T * MOT_PATCH);
            b->eps.resize((size_t)B * T * MOT_PATCH);
            mot_loader_diffuse(ld, c, ld->shards[s], off, bi, b);
        }
    }
    mot_group(c, b);
}

// ---- checkpoint (.ckpt) ------------------------------------------------------------------------
//   offset  size  field
//   0       4     magic "MOTC"
//   4       4     uint32 version = 4
//   8       64    int32 config[16]: n_layer d_model n_head d_ff vocab image_begin speech_begin
//                 max_seq n_tower tie_attn tie_ffn tie_norm n_expert[0] n_expert[1] n_expert[2] setting
//   72      4     uint32 has_optimizer (1: Adam moments follow the parameters)
//   76      4     uint32 reserved = 0
//   80      8     int64 step (number of optimizer steps taken)
//   88      8     uint64 data loader RNG state
//   96      4*P   float32 parameters, in parameter-table order (P = table total)
//   ...     4*P   float32 Adam first moments   (if has_optimizer)
//   ...     4*P   float32 Adam second moments  (if has_optimizer)
// Older versions: version 3 has the layout of 4 but its experts (E > 1) were trained under the
// old expert rule, out = h + rmsnorm(sum_e s_ie FFN_e(h)) g, so a version-3 file with experts is
// refused (the weights would run under a different function); without experts it is read. Version
// 2 has config[15] (setting 0, tokens), so every later field is 4 bytes earlier and the parameters
// start at 92; version 1 has config[12] (also one expert per copy), parameters at 80.
enum { MOT_CKPT_VERSION = 4, MOT_CKPT_HEADER = 96 };

// The number of config ints in a checkpoint or debug-state header of this version (0: unknown).
inline int mot_config_ints_of_version(uint32_t version) {
    return version == 1                   ? MOT_CONFIG_INTS_V1
           : version == 2                 ? MOT_CONFIG_INTS_V2
           : version == 3 || version == 4 ? MOT_CONFIG_INTS
                                          : 0;
}
// "" unless a file of this version holds experts made under the old expert rule (version 3).
inline std::string mot_old_expert_rule(uint32_t version, const MotConfig& c) {
    if (version != 3 || !mot_has_experts(c)) return "";
    return "version 3 file with experts: made under the old expert rule (the norm of the gated sum); this "
           "mot normalises each expert's output before its gate (version 4), so retrain (or upcycle again)";
}

struct MotTrainState {
    int64_t step = 0;
    uint64_t data_rng = 0;
};

template <typename S>
inline bool mot_put_floats(FILE* f, const std::vector<S>& v) {
    std::vector<float> buf(v.begin(), v.end());
    return mot_put(f, buf.data(), buf.size() * 4);
}
template <typename S>
inline bool mot_get_floats(FILE* f, std::vector<S>* v, size_t n) {
    std::vector<float> buf(n);
    if (!mot_get(f, buf.data(), n * 4)) return false;
    v->assign(buf.begin(), buf.end());
    return true;
}

template <typename S>
bool mot_save_checkpoint(const std::string& path, const MotModel<S>& m, const MotTrainState& st, bool with_optimizer,
                         std::string* err) {
    return mot_write_atomic(path, err, [&](FILE* f) {
        uint32_t h[2] = {0, MOT_CKPT_VERSION};
        memcpy(h, "MOTC", 4);
        int32_t cfg[MOT_CONFIG_INTS];
        mot_config_to_ints(m.cfg, cfg);
        uint32_t flags[2] = {with_optimizer ? 1u : 0u, 0};
        bool ok = mot_put(f, h, 8) && mot_put(f, cfg, sizeof cfg) && mot_put(f, flags, 8) && mot_put(f, &st.step, 8) &&
                  mot_put(f, &st.data_rng, 8) && mot_put_floats(f, m.params);
        if (with_optimizer) ok = ok && mot_put_floats(f, m.adam_m) && mot_put_floats(f, m.adam_v);
        return ok;
    });
}

// Says which config field differs, or "" when they match.
inline std::string mot_config_mismatch(const MotConfig& file, const MotConfig& want) {
    int32_t a[MOT_CONFIG_INTS], b[MOT_CONFIG_INTS];
    mot_config_to_ints(file, a);
    mot_config_to_ints(want, b);
    for (int i = 0; i < MOT_CONFIG_INTS; i++)
        if (a[i] != b[i])
            return std::string("config does not match: ") + MOT_CONFIG_NAMES[i] + " is " + std::to_string(a[i]) +
                   " in the file but " + std::to_string(b[i]) + " is wanted";
    return "";
}

// Parameter count of a valid config (mot_config_error == ""), in checked arithmetic; false if it
// does not fit in 64 bits (cannot happen within the config bounds, kept as a second guard).
inline bool mot_param_count(const MotConfig& c, uint64_t* total) {
    const uint64_t D = c.d_model, Dh = c.d_model / c.n_head, F = c.d_ff, V = c.vocab, L = c.n_layer, K = c.n_tower;
    const uint64_t ka = c.tie_attn ? 1 : K, kn = c.tie_norm ? 1 : K;
    // FFN copies: one per expert; router rows: one per expert of copies with more than one (as in
    // mot_param_table; n_expert is bounded by mot_config_error, so these sums are small)
    const uint64_t kf = mot_expert_copy(c, mot_ffn_copies(c), 0), kr = mot_router_copy(c, mot_ffn_copies(c), 0);
    const uint64_t tf = mot_transfusion(c) ? 1 : 0, P = MOT_PATCH;  // w_in b_in w_t w_out b_out
    const uint64_t per[][4] = {{1, 1, V, D},  {L, ka, 4 * D, D}, {L, ka, 2, Dh},
                               {L, kn, 2, D}, {L, kf, 3 * D, F}, {L, kr, 2, D},
                               {1, kn, 1, D}, {1, 1, D, V},      {1, tf, 2 * P + 1 + D, D},
                               {1, tf, 1, P}};
    uint64_t t = 0;
    for (auto& q : per) {
        uint64_t x;
        if (!mot_mul(q[0], q[1], &x) || !mot_mul(x, q[2], &x) || !mot_mul(x, q[3], &x) || !mot_add(t, x, &t))
            return false;
    }
    *total = t;
    return true;
}

// The largest step a checkpoint may record (the trainer's --steps bound; the loop counts in int).
static const int64_t MOT_MAX_STEP = 1 << 30;

// Reads and checks a checkpoint's header against its file size, without reading the weights:
// the config, the has_optimizer flag, reserved = 0, 0 <= step <= 2^30, and the exact size
// header + 4P(1 or 3), the header being 92 bytes (80 for version 1). Callers build the model only
// after this, so a header cannot make them allocate more than the file holds.
inline bool mot_read_checkpoint_header(const std::string& path, MotConfig* cfg, MotTrainState* st, bool* has_optimizer,
                                       std::string* err) {
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) return mot_fail(err, path, std::string("cannot open: ") + strerror(errno));
    uint32_t h[2], flags[2];
    int32_t c[MOT_CONFIG_INTS] = {0, 0, 0, 0, 0, 0, 0, 0,
                                  0, 0, 0, 0, 1, 1, 1, 0};  // older versions: one expert each, tokens
    MotTrainState s;
    const long size = mot_file_size(f);
    bool ok = size >= 0 && mot_get(f, h, 8);
    const int nc = ok ? mot_config_ints_of_version(h[1]) : 0;
    ok = ok && (nc == 0 || (mot_get(f, c, 4 * nc) && mot_get(f, flags, 8) && mot_get(f, &s.step, 8) &&
                            mot_get(f, &s.data_rng, 8)));
    fclose(f);
    if (!ok) return mot_fail(err, path, "truncated: shorter than the checkpoint header (80, 92 or 96 bytes)");
    if (memcmp(h, "MOTC", 4) != 0) return mot_fail(err, path, "not a mot checkpoint (bad magic, expected MOTC)");
    if (nc == 0)
        return mot_fail(err, path, "unsupported checkpoint version " + std::to_string(h[1]) + " (expected 1 to 4)");
    const MotConfig fc = mot_config_from_ints(c);
    std::string bad = mot_config_error(fc);
    if (!bad.empty()) return mot_fail(err, path, "bad config in header: " + bad);
    bad = mot_old_expert_rule(h[1], fc);
    if (!bad.empty()) return mot_fail(err, path, bad);
    if (flags[0] > 1)
        return mot_fail(err, path, "bad has_optimizer flag " + std::to_string(flags[0]) + " (expected 0 or 1)");
    if (flags[1] != 0)
        return mot_fail(err, path, "reserved header field is " + std::to_string(flags[1]) + " (expected 0)");
    if (s.step < 0 || s.step > MOT_MAX_STEP)
        return mot_fail(err, path, "step " + std::to_string(s.step) + " out of range [0, 2^30]");
    uint64_t P, want;
    const uint64_t header = 8 + 4 * (uint64_t)nc + 24;  // MOT_CKPT_HEADER, or 80/92 for versions 1/2
    if (!mot_param_count(fc, &P) || !mot_mul(P, 4 * (flags[0] ? 3 : 1), &want) || !mot_add(want, header, &want))
        return mot_fail(err, path, "bad config in header: parameter count overflows");
    if ((uint64_t)size != want)
        return mot_fail(
            err, path,
            "truncated or padded: expected " + std::to_string(want) + " bytes, found " + std::to_string(size));
    if (cfg) *cfg = fc;
    if (st) *st = s;
    if (has_optimizer) *has_optimizer = flags[0] != 0;
    return true;
}

// Reads only the config of a checkpoint (so a trainer can build the model to load into); the
// whole header and the file size are checked first.
inline bool mot_read_checkpoint_config(const std::string& path, MotConfig* cfg, std::string* err) {
    return mot_read_checkpoint_header(path, cfg, nullptr, nullptr, err);
}

// Loads a checkpoint into a model already built (mot_init) with the config the caller wants;
// a checkpoint made with any other config is refused, naming the first field that differs.
template <typename S>
bool mot_load_checkpoint(const std::string& path, MotModel<S>* m, MotTrainState* st, bool* has_optimizer,
                         std::string* err) {
    MotConfig fc;
    MotTrainState s;
    bool opt = false;
    if (!mot_read_checkpoint_header(path, &fc, &s, &opt, err)) return false;
    std::string mis = mot_config_mismatch(fc, m->cfg);
    if (!mis.empty()) return mot_fail(err, path, mis);
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) return mot_fail(err, path, std::string("cannot open: ") + strerror(errno));
    struct Closer {
        FILE* f;
        ~Closer() { fclose(f); }
    } closer{f};
    uint32_t h[2];
    if (!mot_get(f, h, 8)) return mot_fail(err, path, "read error in the header");
    const long header = 8 + 4 * mot_config_ints_of_version(h[1]) + 24;  // 96, or 80/92 for versions 1/2
    const size_t P = m->tab.total;
    if (fseek(f, header, SEEK_SET) != 0 || !mot_get_floats(f, &m->params, P))
        return mot_fail(err, path, "read error in parameters");
    if (opt && (!mot_get_floats(f, &m->adam_m, P) || !mot_get_floats(f, &m->adam_v, P)))
        return mot_fail(err, path, "read error in optimizer state");
    if (st) *st = s;
    if (has_optimizer) *has_optimizer = opt;
    return true;
}

// Sparse upcycling (dev/MATH.md, section 5): dst, built by mot_init with the wanted config, takes every
// tensor of src, whose config must be the same except for one expert per FFN copy. Each expert of
// FFN copy f starts as an exact copy of src's FFN copy f; the routers and auxiliary routers keep
// dst's fresh N(0, 0.02) draws (at 0 all gates would tie and every expert would take the same
// rows); the Adam moments stay zero. Returns "" or what stands in the way.
template <typename S>
std::string mot_upcycle(MotModel<S>* dst, const MotModel<S>& src) {
    MotConfig a = src.cfg, b = dst->cfg;
    if (mot_has_experts(a)) return "the source already has experts (upcycling starts from one expert per FFN copy)";
    for (int f = 0; f < MOT_N_MOD; f++) a.n_expert[f] = b.n_expert[f];
    std::string mis = mot_config_mismatch(a, b);
    if (!mis.empty()) return mis;
    for (int p = 0; p < P_COUNT; p++) {
        const MotParamInfo &si = src.tab.p[p], &di = dst->tab.p[p];
        if (p == P_WR || p == P_U) continue;
        if (p != P_W1 && p != P_W3 && p != P_W2) {
            std::copy(src.params.begin() + si.offset, src.params.begin() + si.offset + si.size(),
                      dst->params.begin() + di.offset);
            continue;
        }
        for (int l = 0; l < si.layers; l++)
            for (int f = 0; f < si.copies; f++)
                for (int e = 0; e < b.n_expert[f]; e++)
                    std::copy(src.params.begin() + si.at(l, f), src.params.begin() + si.at(l, f) + si.each(),
                              dst->params.begin() + di.at(l, mot_expert_copy(b, f, e)));
    }
    return "";
}

// ---- debug state (.dbg): one batch with everything a second implementation must reproduce ----
//   offset  size   field
//   0       4      magic "MOTD"
//   4       4      uint32 version = 4
//   8       64     int32 config[16] (as in the checkpoint)
//   72      4      int32 B
//   76      4      int32 T
//   80      4*P    float32 parameters (table order)
//   ...     4*B*T  int32 input tokens, original order (b*T + t)
//   ...     4*B*T  int32 targets (-1 = ignored)
//   ...     4*B*T  int32 tstep         } Transfusion setting only (config setting = 1): each
//   ...     64*B*T float32 xin[16]     } position's diffusion step, input patch and noise
//   ...     64*B*T float32 eps[16]     } (0 at token positions)
//   ...     4*B*T*V float32 logits, original order
//   ...     64*B*T float32 eps_hat[16] (Transfusion only; 0 at token positions)
//   ...     4      float32 loss (the training objective: in Transfusion LM + 5 MSE)
//   ...     12     float32 loss per modality (text, image, speech; 0 when no target of it; in
//                  Transfusion the image entry is the MSE)
//   ...     12     int32 number of targets per modality (Transfusion image: noised image positions)
//   ...     4*P    float32 gradient of the loss wrt every parameter (table order; with experts, of
//                  the training objective loss + 0.01 aux_loss, from expert-choice routing)
// Older versions: version 3 is read as 4 unless it has experts (the old expert rule, as for
// checkpoints: refused). Version 2 (setting 0) has config[15], so B, T and the rest are 4 bytes
// earlier; version 1 has config[12] (one expert per copy), 16 bytes earlier.
enum { MOT_DEBUG_VERSION = 4, MOT_MAX_BATCH = 1 << 16 };

struct MotDebugState {
    MotConfig cfg;
    int B = 0, T = 0;
    std::vector<float> params, logits, grads;
    std::vector<int32_t> tokens, targets;
    std::vector<int32_t> tstep;            // Transfusion only: B*T
    std::vector<float> xin, eps, eps_hat;  // Transfusion only: B*T*16 each
    float loss = 0, loss_mod[MOT_N_MOD] = {0, 0, 0};
    int32_t n_mod[MOT_N_MOD] = {0, 0, 0};
};

// Captures the state after mot_forward + mot_backward on batch b (grads must hold that batch only).
template <typename S>
MotDebugState mot_debug_capture(const MotModel<S>& m, const MotBatch& b) {
    MotDebugState d;
    d.cfg = m.cfg;
    d.B = b.B;
    d.T = b.T;
    d.params.assign(m.params.begin(), m.params.end());
    d.grads.assign(m.grads.begin(), m.grads.end());
    d.tokens = b.tokens;
    d.targets = b.targets;
    const int N = b.B * b.T, V = m.cfg.vocab;
    if (mot_transfusion(m.cfg)) {
        d.tstep = b.tstep;
        d.xin = b.xin;
        d.eps = b.eps;
        d.eps_hat.assign((size_t)N * MOT_PATCH, 0.0f);
        for (int r = b.group[MOD_IMAGE]; r < b.group[MOD_IMAGE + 1]; r++)
            for (int j = 0; j < MOT_PATCH; j++)
                d.eps_hat[(size_t)b.order[r] * MOT_PATCH + j] = float(m.act.eps_hat[(size_t)r * MOT_PATCH + j]);
    }
    d.logits.resize((size_t)N * V);
    for (int i = 0; i < N; i++)
        for (int j = 0; j < V; j++) d.logits[(size_t)i * V + j] = float(mot_logit(m, b, i, j));
    d.loss = float(m.loss);
    for (int md = 0; md < MOT_N_MOD; md++) {
        d.loss_mod[md] = float(m.loss_mod[md]);
        d.n_mod[md] = m.n_mod[md];
    }
    return d;
}

inline bool mot_write_debug_state(const std::string& path, const MotDebugState& d, std::string* err) {
    return mot_write_atomic(path, err, [&](FILE* f) {
        uint32_t h[2] = {0, MOT_DEBUG_VERSION};
        memcpy(h, "MOTD", 4);
        int32_t cfg[MOT_CONFIG_INTS];
        mot_config_to_ints(d.cfg, cfg);
        int32_t bt[2] = {d.B, d.T};
        const bool tf = mot_transfusion(d.cfg);
        return mot_put(f, h, 8) && mot_put(f, cfg, sizeof cfg) && mot_put(f, bt, 8) &&
               mot_put(f, d.params.data(), 4 * d.params.size()) && mot_put(f, d.tokens.data(), 4 * d.tokens.size()) &&
               mot_put(f, d.targets.data(), 4 * d.targets.size()) &&
               (!tf || (mot_put(f, d.tstep.data(), 4 * d.tstep.size()) && mot_put(f, d.xin.data(), 4 * d.xin.size()) &&
                        mot_put(f, d.eps.data(), 4 * d.eps.size()))) &&
               mot_put(f, d.logits.data(), 4 * d.logits.size()) &&
               (!tf || mot_put(f, d.eps_hat.data(), 4 * d.eps_hat.size())) && mot_put(f, &d.loss, 4) &&
               mot_put(f, d.loss_mod, 12) && mot_put(f, d.n_mod, 12) && mot_put(f, d.grads.data(), 4 * d.grads.size());
    });
}

inline bool mot_read_debug_state(const std::string& path, MotDebugState* d, std::string* err) {
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) return mot_fail(err, path, std::string("cannot open: ") + strerror(errno));
    struct Closer {
        FILE* f;
        ~Closer() { fclose(f); }
    } closer{f};
    const long size = mot_file_size(f);
    uint32_t h[2];
    int32_t cfg[MOT_CONFIG_INTS] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0},
            bt[2];  // older versions: one expert each, tokens
    bool ok = mot_get(f, h, 8);
    const int nc = ok ? mot_config_ints_of_version(h[1]) : 0;
    if (!ok || (nc && (!mot_get(f, cfg, 4 * nc) || !mot_get(f, bt, 8))))
        return mot_fail(err, path, "truncated: shorter than the debug-state header");
    if (memcmp(h, "MOTD", 4) != 0) return mot_fail(err, path, "not a mot debug state (bad magic, expected MOTD)");
    if (nc == 0)
        return mot_fail(err, path, "unsupported debug-state version " + std::to_string(h[1]) + " (expected 1 to 4)");
    d->cfg = mot_config_from_ints(cfg);
    std::string bad = mot_config_error(d->cfg);
    if (!bad.empty()) return mot_fail(err, path, "bad config in header: " + bad);
    bad = mot_old_expert_rule(h[1], d->cfg);
    if (!bad.empty()) return mot_fail(err, path, bad);
    d->B = bt[0];
    d->T = bt[1];
    if (d->B < 1 || d->B > MOT_MAX_BATCH || d->T < 1 || d->T > d->cfg.max_seq)
        return mot_fail(err, path,
                        "bad batch shape in header (B " + std::to_string(d->B) + ", T " + std::to_string(d->T) + ")");
    uint64_t P, want;
    const uint64_t N = (uint64_t)d->B * d->T, V = d->cfg.vocab;
    // 16 + 4 config ints + 8P + 8N + 4NV + 28 (+ 4N + 3 * 64N in Transfusion), checked (B and T bound
    // it far below 2^64: a second guard)
    const bool tf = mot_transfusion(d->cfg);
    const uint64_t per_pos = 4 * V + 8 + (tf ? 4 + 3 * 4 * MOT_PATCH : 0);
    if (!mot_param_count(d->cfg, &P) || !mot_mul(N, per_pos, &want) || !mot_add(want, 8 * P + 16 + 4 * nc + 28, &want))
        return mot_fail(err, path, "sizes in header overflow");
    if ((uint64_t)size != want)
        return mot_fail(
            err, path,
            "truncated or padded: expected " + std::to_string(want) + " bytes, found " + std::to_string(size));
    d->params.resize(P);
    d->grads.resize(P);
    d->tokens.resize(N);
    d->targets.resize(N);
    d->logits.resize(N * V);
    const uint64_t NP = tf ? N * MOT_PATCH : 0;
    d->tstep.resize(tf ? N : 0);
    d->xin.resize(NP);
    d->eps.resize(NP);
    d->eps_hat.resize(NP);
    ok = mot_get(f, d->params.data(), 4 * P) && mot_get(f, d->tokens.data(), 4 * N) &&
         mot_get(f, d->targets.data(), 4 * N) && mot_get(f, d->tstep.data(), 4 * d->tstep.size()) &&
         mot_get(f, d->xin.data(), 4 * NP) && mot_get(f, d->eps.data(), 4 * NP) &&
         mot_get(f, d->logits.data(), 4 * N * V) && mot_get(f, d->eps_hat.data(), 4 * NP) && mot_get(f, &d->loss, 4) &&
         mot_get(f, d->loss_mod, 12) && mot_get(f, d->n_mod, 12) && mot_get(f, d->grads.data(), 4 * P);
    if (!ok) return mot_fail(err, path, "read error");
    for (size_t i = 0; i < d->tstep.size(); i++)
        if (d->tstep[i] < 0 || d->tstep[i] > MOT_DIFF_STEPS)
            return mot_fail(err, path, "diffusion step " + std::to_string(d->tstep[i]) + " outside [0, 1000]");
    for (size_t i = 0; i < N; i++) {
        if (d->tokens[i] < 0 || d->tokens[i] >= (int32_t)V)
            return mot_fail(err, path, "token id " + std::to_string(d->tokens[i]) + " outside the vocabulary");
        if (d->targets[i] < MOT_IGNORE || d->targets[i] >= (int32_t)V)
            return mot_fail(err, path, "target id " + std::to_string(d->targets[i]) + " outside the vocabulary");
    }
    return true;
}

// ============================================================================================
// 9. Generation: one token at a time with a KV cache
// ============================================================================================
// The same math as mot_forward for a single sequence, fed one token per call: each layer keeps
// the keys (after QK-norm and RoPE) and values of every earlier position, so a new token costs
// one row of every projection plus attention over the cache.
template <typename S>
struct MotKVCache {
    int len = 0, cap = 0;
    std::vector<S> k, v;  // L x cap x D
};

template <typename S>
void mot_kv_init(MotKVCache<S>* kv, const MotConfig& c, int cap) {
    kv->len = 0;
    kv->cap = std::min(cap, c.max_seq);
    kv->k.assign((size_t)c.n_layer * kv->cap * c.d_model, S(0));
    kv->v.assign((size_t)c.n_layer * kv->cap * c.d_model, S(0));
}

// y[out] = x[in] W[in x out] for one row: no packing, since each weight is read once anyway.
template <typename S>
void mot_matvec(S* y, const S* x, const S* W, int in, int out) {
    std::fill(y, y + out, S(0));
    for (int k = 0; k < in; k++) {
        const S xk = x[k], *w = W + (size_t)k * out;
        for (int j = 0; j < out; j++) y[j] += xk * w[j];
    }
}

// Feeds n positions kv->len .. kv->len + n - 1, all of modality md, whose layer-0 inputs are the
// rows of x (n x D, overwritten), and writes their final-norm outputs z (n x D). The positions see
// the cache and, among themselves, each earlier one (block = false) or all of them (block = true:
// a Transfusion image). commit = false leaves the cache as it was, so a denoising step can be run
// again on the same prefix. Returns false when the positions would pass max_seq.
template <typename S>
bool mot_decode_rows(MotModel<S>* m, MotKVCache<S>* kv, int n, int md, bool block, bool commit, S* x, S* z) {
    const MotConfig& c = m->cfg;
    if (n < 1 || kv->len + n > kv->cap) return false;
    const int D = c.d_model, H = c.n_head, Dh = D / H, half = Dh / 2, F = c.d_ff, pos0 = kv->len;
    const MotParamTable& t = m->tab;
    const int fc = mot_ffn_copy_of_mod(c, md), E = c.n_expert[fc];  // these rows' FFN copy and its experts
    auto copy = [&](int p) {
        if (p == P_W1 || p == P_W3 || p == P_W2) return mot_expert_copy(c, fc, 0);
        return t.p[p].copies == 1 ? 0 : md;
    };
    auto W = [&](int p, int l) { return m->param(p, l, copy(p)); };
    const size_t nD = (size_t)n * D, nF = (size_t)n * F;
    std::vector<S> q(nD), k(nD), v(nD), o(nD), a(nD), h(nD), u1(nF), u3(nF), u(nF), y2(nD), rs((size_t)n * H);
    const int32_t rows[MOT_N_MOD + 1] = {0, md >= 1 ? 0 : n, md >= 2 ? 0 : n, n};  // a batch of n rows of md
    // one row: no packing, since each weight is read once anyway; several: the packed matmul
    auto lin = [&](S* out, const S* in, const S* w, int ri, int co) {
        if (n == 1) mot_matvec(out, in, w, ri, co);
        else matmul(out, co, in, ri, false, w, co, false, n, co, ri, false);
    };
    const S scale = S(1) / std::sqrt(S(Dh));
    // Without commit the new keys and values go to a scratch copy of the cache rows they would take.
    std::vector<S> kscr, vscr;
    for (int l = 0; l < c.n_layer; l++) {
        lin(q.data(), x, W(P_WQ, l), D, D);
        lin(k.data(), x, W(P_WK, l), D, D);
        lin(v.data(), x, W(P_WV, l), D, D);
        rmsnorm_forward(q.data(), rs.data(), q.data(), m->param(P_GQ, l), t.p[P_GQ].copies, rows, n * H, Dh, H);
        rmsnorm_forward(k.data(), rs.data(), k.data(), m->param(P_GK, l), t.p[P_GK].copies, rows, n * H, Dh, H);
        for (int i = 0; i < n; i++) {
            const S *cs = m->rope_cos.data() + (size_t)(pos0 + i) * half,
                    *sn = m->rope_sin.data() + (size_t)(pos0 + i) * half;
            for (S* zz : {q.data() + (size_t)i * D, k.data() + (size_t)i * D})
                for (int hh = 0; hh < H; hh++)
                    for (int j = 0; j < half; j++) {
                        S *z1 = zz + hh * Dh + j, *z2 = z1 + half, a1 = *z1, a2 = *z2;
                        *z1 = a1 * cs[j] - a2 * sn[j];
                        *z2 = a1 * sn[j] + a2 * cs[j];
                    }
        }
        S* Kc = kv->k.data() + (size_t)l * kv->cap * D;
        S* Vc = kv->v.data() + (size_t)l * kv->cap * D;
        if (!commit) {  // keep the rows the block overwrites, restored below
            kscr.assign(Kc + (size_t)pos0 * D, Kc + (size_t)(pos0 + n) * D);
            vscr.assign(Vc + (size_t)pos0 * D, Vc + (size_t)(pos0 + n) * D);
        }
        std::copy(k.begin(), k.end(), Kc + (size_t)pos0 * D);
        std::copy(v.begin(), v.end(), Vc + (size_t)pos0 * D);
        for (int i = 0; i < n; i++) {  // serial: a few rows against the cache cost less than a fork
            const int last = block ? pos0 + n - 1 : pos0 + i;  // the last position row i sees
            std::vector<S> p(last + 1);
            const S* qi = q.data() + (size_t)i * D;
            S* oi = o.data() + (size_t)i * D;
            for (int hh = 0; hh < H; hh++) {
                S mx = -INFINITY, sum = 0;
                for (int j = 0; j <= last; j++) {
                    S sc = 0;
                    for (int d = 0; d < Dh; d++) sc += qi[hh * Dh + d] * Kc[(size_t)j * D + hh * Dh + d];
                    p[j] = sc * scale;
                    mx = std::max(mx, p[j]);
                }
                for (int j = 0; j <= last; j++) {
                    p[j] = std::exp(p[j] - mx);
                    sum += p[j];
                }
                for (int d = 0; d < Dh; d++) oi[hh * Dh + d] = 0;
                for (int j = 0; j <= last; j++)
                    for (int d = 0; d < Dh; d++) oi[hh * Dh + d] += p[j] / sum * Vc[(size_t)j * D + hh * Dh + d];
            }
        }
        if (!commit) {
            std::copy(kscr.begin(), kscr.end(), Kc + (size_t)pos0 * D);
            std::copy(vscr.begin(), vscr.end(), Vc + (size_t)pos0 * D);
        }
        lin(a.data(), o.data(), W(P_WO, l), D, D);
        rmsnorm_forward(h.data(), rs.data(), a.data(), m->param(P_GATTN, l), t.p[P_GATTN].copies, rows, n, D, 1);
        for (size_t j = 0; j < nD; j++) h[j] += x[j];
        if (E == 1) {
            lin(u1.data(), h.data(), W(P_W1, l), D, F);
            lin(u3.data(), h.data(), W(P_W3, l), D, F);
            swiglu_forward(u.data(), u1.data(), u3.data(), nF);
            lin(y2.data(), u.data(), W(P_W2, l), F, D);
        } else {  // causal routing, row by row: expert e runs iff sigmoid(h U_e) > 0.5; its normalised
                  // output is weighted by its gate s_e
            const S *Wr = m->param(P_WR, l, mot_router_copy(c, fc, 0)),
                    *U = m->param(P_U, l, mot_router_copy(c, fc, 0));
            std::vector<S> sg(E), sa(E), ye(D);
            for (int i = 0; i < n; i++) {
                const S* hi = h.data() + (size_t)i * D;
                S* yi = y2.data() + (size_t)i * D;
                S mx = -INFINITY, sum = 0;
                for (int e = 0; e < E; e++) {
                    S r = 0, zz = 0;
                    for (int d = 0; d < D; d++) {
                        r += hi[d] * Wr[(size_t)e * D + d];
                        zz += hi[d] * U[(size_t)e * D + d];
                    }
                    sg[e] = r;
                    sa[e] = S(1) / (S(1) + std::exp(-zz));
                    mx = std::max(mx, r);
                }
                for (int e = 0; e < E; e++) {
                    sg[e] = std::exp(sg[e] - mx);
                    sum += sg[e];
                }
                std::fill(yi, yi + D, S(0));
                for (int e = 0; e < E; e++) {
                    if (!(sa[e] > S(0.5))) continue;
                    const size_t ek = mot_expert_copy(c, fc, e);
                    mot_matvec(u1.data(), hi, m->param(P_W1, l, ek), D, F);
                    mot_matvec(u3.data(), hi, m->param(P_W3, l, ek), D, F);
                    swiglu_forward(u.data(), u1.data(), u3.data(), F);
                    mot_matvec(ye.data(), u.data(), m->param(P_W2, l, ek), F, D);
                    rmsnorm_inplace(ye.data(), D);
                    const S gs = sg[e] / sum;
                    for (int d = 0; d < D; d++) yi[d] += gs * ye[d];
                }
            }
        }
        rmsnorm_forward(x, rs.data(), y2.data(), m->param(P_GFFN, l), t.p[P_GFFN].copies, rows, n, D, 1,
                        mot_ffn_copies(c), mot_gain_only_copies(c));
        for (size_t j = 0; j < nD; j++) x[j] += h[j];
    }
    rmsnorm_forward(z, rs.data(), x, m->param(P_GOUT), t.p[P_GOUT].copies, rows, n, D, 1);
    if (commit) kv->len += n;
    return true;
}

// Feeds `token` at position kv->len and writes the next-token logits (V values). Returns false
// when the cache is full (the position would reach max_seq).
template <typename S>
bool mot_decode_step(MotModel<S>* m, MotKVCache<S>* kv, int token, S* logits) {
    const int D = m->cfg.d_model;
    std::vector<S> x(m->param(P_EMB) + (size_t)token * D, m->param(P_EMB) + (size_t)(token + 1) * D), z(D);
    if (!mot_decode_rows(m, kv, 1, mot_modality(m->cfg, token), false, true, x.data(), z.data())) return false;
    mot_matvec(logits, z.data(), m->param(P_HEAD), D, m->cfg.vocab);
    return true;
}

// Transfusion: one image block of n positions (49 when generating) after the cache, with inputs
// xt (n x 16, the noised patches) at diffusion step t; writes the predicted noise (n x 16).
// commit = false for a denoising step; commit = true appends the block to the cache (a clean
// image, t = 0, that the text after it conditions on) and also writes the logits of its last
// position into last_logits when given.
template <typename S>
bool mot_image_step(MotModel<S>* m, MotKVCache<S>* kv, int n, const S* xt, int t, bool commit, S* eps_hat,
                    S* last_logits = nullptr) {
    const int D = m->cfg.d_model, P = MOT_PATCH;
    std::vector<S> x((size_t)n * D), z((size_t)n * D), sn(D), te(D);
    mot_sinusoid(sn.data(), t, D);
    mot_matvec(te.data(), sn.data(), m->param(P_WT), D, D);
    matmul(x.data(), D, xt, P, false, m->param(P_WIN), D, false, n, D, P, false);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < D; j++) x[(size_t)i * D + j] += m->param(P_BIN)[j] + te[j];
    if (!mot_decode_rows(m, kv, n, MOD_IMAGE, true, commit, x.data(), z.data())) return false;
    matmul(eps_hat, P, z.data(), D, false, m->param(P_WOUT), P, false, n, P, D, false);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < P; j++) eps_hat[(size_t)i * P + j] += m->param(P_BOUT)[j];
    if (last_logits) mot_matvec(last_logits, z.data() + (size_t)(n - 1) * D, m->param(P_HEAD), D, m->cfg.vocab);
    return true;
}

// Transfusion: DDIM sampling of one image (eta = 0) after the prefix held in kv, over the n image
// positions at once. Steps t_i = round(1000 (S - i) / S), i = 0..S-1, then t = 0. At each step
//   eps = eps_u + w (eps_c - eps_u)   (classifier-free guidance: eps_c with the caption in kv, eps_u
//                                      with the caption-dropped prefix in kvu; kvu null: eps = eps_c)
//   x0  = clip((x - sqrt(1 - abar(t)) eps) / sqrt(abar(t)), -1, 1)
//   x   = sqrt(abar(t')) x0 + sqrt(1 - abar(t')) eps,   t' the next step (abar(0) = 1: x = x0 at the end)
// x (n x 16) holds the starting noise on entry (x ~ N(0, I): mot_rand_normal) and the image on exit.
// The caches are left as they were: the caller appends the clean image with mot_image_step(t = 0).
template <typename S>
bool mot_ddim_image(MotModel<S>* m, MotKVCache<S>* kv, MotKVCache<S>* kvu, int n, int steps, double w, S* x) {
    if (steps < 1) return false;
    const size_t np = (size_t)n * MOT_PATCH;
    std::vector<S> ec(np), eu(np);
    for (int i = 0; i < steps; i++) {
        const int t = (int)std::lround(1000.0 * (steps - i) / steps);
        const int tn = i + 1 < steps ? (int)std::lround(1000.0 * (steps - i - 1) / steps) : 0;
        bool ok[2] = {true, true};
        // The two predictions are independent: one thread each. Inside, everything runs serially
        // (matmul is serial inside any region, the norms and SwiGLU for so few rows): 49 rows make
        // small matmuls whose forks cost more than they save (measured 10x slower on a loaded
        // 2-core machine), so without guidance the one pass runs in a region of one thread.
#pragma omp parallel for schedule(static) num_threads(kvu ? 2 : 1)
        for (int j = 0; j < (kvu ? 2 : 1); j++)
            ok[j] = mot_image_step(m, j ? kvu : kv, n, x, t, false, j ? eu.data() : ec.data());
        if (!ok[0] || !ok[1]) return false;
        if (kvu)
            for (size_t j = 0; j < np; j++) ec[j] = eu[j] + S(w) * (ec[j] - eu[j]);
        const double a = mot_abar(t), an = mot_abar(tn);
        for (size_t j = 0; j < np; j++) {
            const double x0 = std::min(1.0, std::max(-1.0, (double(x[j]) - sqrt(1 - a) * double(ec[j])) / sqrt(a)));
            x[j] = S(sqrt(an) * x0 + sqrt(1 - an) * double(ec[j]));
        }
    }
    return true;
}

// Patches (49 x 16, raster order of 4x4 patches) <-> a 28x28 image, both in [-1, 1].
template <typename S>
void mot_patches_to_image(const S* patches, S* image) {
    for (int p = 0; p < MOT_IMAGE_POS; p++)
        for (int j = 0; j < MOT_PATCH; j++)
            image[((p / 7) * 4 + j / 4) * MOT_IMAGE_SIDE + (p % 7) * 4 + j % 4] = patches[p * MOT_PATCH + j];
}
template <typename S>
void mot_image_to_patches(const S* image, S* patches) {
    for (int p = 0; p < MOT_IMAGE_POS; p++)
        for (int j = 0; j < MOT_PATCH; j++)
            patches[p * MOT_PATCH + j] = image[((p / 7) * 4 + j / 4) * MOT_IMAGE_SIDE + (p % 7) * 4 + j % 4];
}

// Samples an id in [lo, hi) from softmax(logits / temperature), keeping the top_k most likely
// (top_k <= 0: all). temperature <= 0 is greedy (ties go to the lowest id). Deterministic for rng.
template <typename S>
int mot_sample(const S* logits, int lo, int hi, double temperature, int top_k, uint64_t* rng) {
    int best = lo;
    for (int j = lo; j < hi; j++)
        if (logits[j] > logits[best]) best = j;
    if (temperature <= 0 || hi - lo == 1) return best;
    std::vector<std::pair<double, int>> c;
    for (int j = lo; j < hi; j++) c.push_back({double(logits[j]), j});
    if (top_k > 0 && top_k < (int)c.size()) {
        std::partial_sort(c.begin(), c.begin() + top_k, c.end(), [](auto& a, auto& b) {
            return a.first > b.first || (a.first == b.first && a.second < b.second);
        });
        c.resize(top_k);
    }
    double mx = c[0].first, sum = 0;
    for (auto& e : c) mx = std::max(mx, e.first);
    for (auto& e : c) {
        e.first = exp((e.first - mx) / temperature);
        sum += e.first;
    }
    double u = mot_rand_uniform(rng) * sum;
    for (auto& e : c) {
        if (u < e.first) return e.second;
        u -= e.first;
    }
    return c.back().second;
}
