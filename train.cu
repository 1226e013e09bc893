// train.cu — the mot trainer: flags, data loader, training loop, evaluation, checkpoints, logging.
//
// Built by nvcc when the CUDA toolkit is present and by g++ otherwise (the file is plain C++ unless
// __CUDACC__ is defined). This version trains with the CPU reference in mot.h; on a machine with a
// GPU it says that the GPU path is not part of this build yet.
//
//   ./train --help                      all flags with their defaults
//   ./train --data 'data/x/train_*.bin' --steps 200 --save run/model.ckpt
#include "mot.h"

#include <chrono>
#include <cstdlib>
#include <sys/stat.h>
#ifdef __CUDACC__
#include <cuda_runtime.h>
#endif

struct Args {
    MotConfig cfg;
    MotOptim opt;
    int batch = 8, seq = 128, accum = 1;
    uint64_t seed = 1;
    std::string data = "data/default/train_*.bin", val, init_from, save, debug_state, log, out;
    int save_every = 0, keep = 3, eval_every = 0, eval_batches = 4, log_every = 1, threads = 0;
    bool resume = false;
    std::vector<std::string> set;  // the model-shape flags the user gave (checked against --init-from)
};

static void usage(FILE* f) {
    fprintf(f,
            "usage: train [flags]\n"
            "model (the dense baseline is the same model with one tower):\n"
            "  --layers N        transformer layers                        (4)\n"
            "  --dim N           model width D                             (256)\n"
            "  --heads N         attention heads (D/heads must be even)    (8)\n"
            "  --ffn N           SwiGLU hidden width F                     (3*D)\n"
            "  --mot | --dense   one tower per modality, or one tower      (--mot)\n"
            "  --tie-attn        share attention weights across modalities (off)\n"
            "  --tie-ffn         share FFN weights across modalities       (off)\n"
            "  --tie-norm        share norm gains across modalities        (off)\n"
            "data and batches:\n"
            "  --data PATTERN    training shards (glob)                    (data/default/train_*.bin)\n"
            "  --val PATTERN     validation shards (glob)                  (none)\n"
            "  --batch N         sequences per micro-batch                 (8)\n"
            "  --seq N           sequence length T                         (128)\n"
            "  --accum N         micro-batches per optimizer step          (1)\n"
            "optimizer (AdamW, linear warmup then cosine to --min-lr x peak):\n"
            "  --steps N         optimizer steps                           (200)\n"
            "  --lr X            peak learning rate                        (3e-3)\n"
            "  --warmup N        warmup steps                              (20)\n"
            "  --min-lr X        final learning rate as a fraction of peak (0.05)\n"
            "  --wd X            decoupled weight decay                    (0.1)\n"
            "  --clip X          global gradient-norm clip, 0 = off        (1.0)\n"
            "  --seed N          initialisation and data order             (1)\n"
            "checkpoints, evaluation and logs:\n"
            "  --out DIR         run folder: log.csv, step_NNNNNN.ckpt every --save-every steps, model.ckpt\n"
            "  --resume          continue from the newest DIR/step_*.ckpt (with --out)\n"
            "  --init-from FILE  start from a checkpoint (resumes its step, optimizer and data order)\n"
            "  --save FILE       write a checkpoint at the end (atomically)  (DIR/model.ckpt with --out)\n"
            "  --save-every N    also every N steps                        (0 = only at the end)\n"
            "  --keep N          periodic checkpoints kept in DIR          (3)\n"
            "  --eval-every N    validation loss every N steps (with --val) (0 = only at the end)\n"
            "  --eval-batches N  batches per validation                    (4)\n"
            "  --debug-state F   write the debug state of the first batch (see README)\n"
            "  --log FILE        append one CSV line per step to FILE      (DIR/log.csv with --out)\n"
            "  --log-every N     print every N steps                       (1)\n"
            "  --threads N       OpenMP threads                            (all cores)\n");
}

[[noreturn]] static void die(const std::string& msg, int code = 1) {
    fprintf(stderr, "error: %s\n", msg.c_str());
    exit(code);
}

// Strict number parsing: the whole string must be a number in range, else a one-line error.
static long parse_int(const char* flag, const char* s, long lo, long hi) {
    char* end = nullptr;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        die(std::string("bad value for ") + flag + ": '" + s + "' (expected an integer in [" + std::to_string(lo) +
                ", " + std::to_string(hi) + "])", 2);
    return v;
}
static double parse_float(const char* flag, const char* s, double lo, double hi) {
    char* end = nullptr;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi))
        die(std::string("bad value for ") + flag + ": '" + s + "' (expected a number in [" + std::to_string(lo) +
                ", " + std::to_string(hi) + "])", 2);
    return v;
}

static Args parse_args(int argc, char** argv) {
    Args a;
    bool ffn_set = false;
    for (int i = 1; i < argc; i++) {
        const std::string f = argv[i];
        auto val = [&]() -> const char* {
            if (i + 1 >= argc) die("flag " + f + " needs a value", 2);
            return argv[++i];
        };
        if (f == "--help" || f == "-h") { usage(stdout); exit(0); }
        else if (f == "--layers") { a.cfg.n_layer = parse_int("--layers", val(), 1, 1024); a.set.push_back("n_layer"); }
        else if (f == "--dim") { a.cfg.d_model = parse_int("--dim", val(), 2, 65536); a.set.push_back("d_model"); }
        else if (f == "--heads") { a.cfg.n_head = parse_int("--heads", val(), 1, 1024); a.set.push_back("n_head"); }
        else if (f == "--ffn") { a.cfg.d_ff = parse_int("--ffn", val(), 1, 1 << 20); ffn_set = true; a.set.push_back("d_ff"); }
        else if (f == "--mot") { a.cfg.n_tower = MOT_N_MOD; a.set.push_back("n_tower"); }
        else if (f == "--dense") { a.cfg.n_tower = 1; a.set.push_back("n_tower"); }
        else if (f == "--tie-attn") { a.cfg.tie_attn = 1; a.set.push_back("tie_attn"); }
        else if (f == "--tie-ffn") { a.cfg.tie_ffn = 1; a.set.push_back("tie_ffn"); }
        else if (f == "--tie-norm") { a.cfg.tie_norm = 1; a.set.push_back("tie_norm"); }
        else if (f == "--data") a.data = val();
        else if (f == "--val") a.val = val();
        else if (f == "--batch") a.batch = parse_int("--batch", val(), 1, 1 << 16);
        else if (f == "--seq") a.seq = parse_int("--seq", val(), 1, 1 << 20);
        else if (f == "--accum") a.accum = parse_int("--accum", val(), 1, 1 << 16);
        else if (f == "--steps") a.opt.steps = parse_int("--steps", val(), 0, 1 << 30);
        else if (f == "--lr") a.opt.lr = parse_float("--lr", val(), 0, 1e38);
        else if (f == "--warmup") a.opt.warmup = parse_int("--warmup", val(), 1, 1 << 30);
        else if (f == "--min-lr") a.opt.min_lr_frac = parse_float("--min-lr", val(), 0, 1);
        else if (f == "--wd") a.opt.weight_decay = parse_float("--wd", val(), 0, 10);
        else if (f == "--clip") a.opt.grad_clip = parse_float("--clip", val(), 0, 1e9);
        else if (f == "--seed") a.seed = parse_int("--seed", val(), 0, 0x7fffffffffffffffL);
        else if (f == "--init-from") a.init_from = val();
        else if (f == "--save") a.save = val();
        else if (f == "--out") a.out = val();
        else if (f == "--resume") a.resume = true;
        else if (f == "--keep") a.keep = parse_int("--keep", val(), 1, 1 << 20);
        else if (f == "--save-every") a.save_every = parse_int("--save-every", val(), 0, 1 << 30);
        else if (f == "--eval-every") a.eval_every = parse_int("--eval-every", val(), 0, 1 << 30);
        else if (f == "--eval-batches") a.eval_batches = parse_int("--eval-batches", val(), 1, 1 << 20);
        else if (f == "--debug-state") a.debug_state = val();
        else if (f == "--log") a.log = val();
        else if (f == "--log-every") a.log_every = parse_int("--log-every", val(), 1, 1 << 30);
        else if (f == "--threads") a.threads = parse_int("--threads", val(), 1, 4096);
        else die("unknown flag '" + f + "' (see train --help)", 2);
    }
    if (!ffn_set) a.cfg.d_ff = 3 * a.cfg.d_model;
    if (a.resume && a.out.empty()) die("--resume needs --out DIR (the run folder to resume)", 2);
    if (a.resume && !a.init_from.empty()) die("give either --resume or --init-from, not both", 2);
    a.cfg.max_seq = a.seq;
    return a;
}

// The periodic checkpoints of a run folder, oldest first (names sort by step).
static std::vector<std::string> periodic_checkpoints(const std::string& dir) {
    std::vector<std::string> out;
    glob_t gl;
    if (glob((dir + "/step_*.ckpt").c_str(), 0, nullptr, &gl) == 0) {
        out.assign(gl.gl_pathv, gl.gl_pathv + gl.gl_pathc);
        globfree(&gl);
    }
    std::sort(out.begin(), out.end());
    return out;
}

static double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Mean validation loss (overall and per modality, weighted by target counts) over a fixed set
// of batches: the val loader restarts from the same seed each time, so evaluations compare.
static void evaluate(MotModel<float>* m, const std::string& pattern, const Args& a, double* loss, double mod[3]) {
    MotLoader ld;
    std::string err;
    if (!mot_loader_open(&ld, pattern, a.seq, 0x5EED, &err)) die(err);
    MotBatch b;
    double sum = 0, ms[3] = {0, 0, 0};
    long n = 0, mn[3] = {0, 0, 0};
    for (int i = 0; i < a.eval_batches; i++) {
        mot_loader_next(&ld, m->cfg, a.batch, a.seq, &b);
        mot_forward(m, b);
        sum += m->loss * m->n_valid;
        n += m->n_valid;
        for (int md = 0; md < 3; md++) { ms[md] += m->loss_mod[md] * m->n_mod[md]; mn[md] += m->n_mod[md]; }
    }
    *loss = n ? sum / n : 0;
    for (int md = 0; md < 3; md++) mod[md] = mn[md] ? ms[md] / mn[md] : NAN;
}

static void report_device() {
#ifdef __CUDACC__
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0)
        printf("device: no GPU (%s); training with the CPU reference\n",
               e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA device");
    else
        printf("device: %d GPU(s) found, but this build has no GPU path yet; training with the CPU reference\n", n);
#else
    printf("device: CPU-only build; training with the CPU reference\n");
#endif
}

int main(int argc, char** argv) {
    setvbuf(stdout, nullptr, _IOLBF, 0);
    Args a = parse_args(argc, argv);
#ifdef _OPENMP
    if (a.threads) omp_set_num_threads(a.threads);
#endif
    std::string err;
    if (!a.out.empty()) {
        if (mkdir(a.out.c_str(), 0755) != 0 && errno != EEXIST) die(a.out + ": cannot create the run folder: " + strerror(errno));
        if (a.log.empty()) a.log = a.out + "/log.csv";
        if (a.save.empty()) a.save = a.out + "/model.ckpt";
        if (a.resume) {
            std::vector<std::string> ck = periodic_checkpoints(a.out);
            if (ck.empty()) printf("resume: no checkpoint in %s yet, starting fresh\n", a.out.c_str());
            else a.init_from = ck.back();
        }
    }
    if (!a.save.empty()) {  // find an unwritable --save now, not after hours of training
        FILE* f = fopen((a.save + ".tmp").c_str(), "wb");
        if (!f) die(a.save + ".tmp: cannot open for writing: " + strerror(errno));
        fclose(f);
        remove((a.save + ".tmp").c_str());
    }
    MotLoader loader;
    if (!mot_loader_open(&loader, a.data, a.seq, a.seed ^ 0xDA7A, &err)) die(err);
    a.cfg.vocab = loader.vocab.vocab;
    a.cfg.image_begin = loader.vocab.image_begin;
    a.cfg.speech_begin = loader.vocab.speech_begin;

    // With --init-from the checkpoint decides the model shape; flags the user set must agree.
    MotTrainState st;
    if (!a.init_from.empty()) {
        MotConfig fc;
        if (!mot_read_checkpoint_config(a.init_from, &fc, &err)) die(err);
        int32_t fv[MOT_CONFIG_INTS], av[MOT_CONFIG_INTS];
        mot_config_to_ints(fc, fv);
        mot_config_to_ints(a.cfg, av);
        for (int i = 0; i < MOT_CONFIG_INTS; i++) {
            std::string name = MOT_CONFIG_NAMES[i];
            bool from_data = name == "vocab" || name == "image_begin" || name == "speech_begin";
            bool user_set = std::find(a.set.begin(), a.set.end(), name) != a.set.end() || name == "max_seq";
            if ((from_data || user_set) && fv[i] != av[i])
                die(a.init_from + ": config does not match: " + name + " is " + std::to_string(fv[i]) +
                    " in the checkpoint but " + std::to_string(av[i]) + " from the " +
                    (from_data ? "data (" + a.data + ")" : std::string("flags")));
        }
        a.cfg = fc;
    }
    std::string bad = mot_config_error(a.cfg);
    if (!bad.empty()) die("bad model config: " + bad, 2);

    MotModel<float> model;
    mot_init(&model, a.cfg, a.seed);
    if (!a.init_from.empty()) {
        bool has_opt = false;
        if (!mot_load_checkpoint(a.init_from, &model, &st, &has_opt, &err)) die(err);
        if (has_opt) loader.rng = st.data_rng;  // resume the data order where it stopped
        printf("resumed from %s at step %lld%s\n", a.init_from.c_str(), (long long)st.step,
               has_opt ? "" : " (no optimizer state: moments start at zero)");
    }
    report_device();
    const MotParamTable& tab = model.tab;
    printf("model: %s, L=%d D=%d H=%d F=%d V=%d (text %d, image %d, speech %d), T=%d, %.2fM parameters%s%s%s\n",
           a.cfg.n_tower == 1 ? "dense" : "MoT (3 towers)", a.cfg.n_layer, a.cfg.d_model, a.cfg.n_head, a.cfg.d_ff,
           a.cfg.vocab, a.cfg.image_begin, a.cfg.speech_begin - a.cfg.image_begin, a.cfg.vocab - a.cfg.speech_begin,
           a.cfg.max_seq, tab.total / 1e6, a.cfg.tie_attn ? ", attention tied" : "", a.cfg.tie_ffn ? ", FFN tied" : "",
           a.cfg.tie_norm ? ", norms tied" : "");
    size_t ntok = 0;
    for (auto& s : loader.shards) ntok += s.tokens.size();
    printf("data: %zu shard(s), %zu tokens from %s\n", loader.shards.size(), ntok, a.data.c_str());
#ifdef _OPENMP
    printf("threads: %d\n", omp_get_max_threads());
#endif

    FILE* logf = nullptr;
    if (!a.log.empty()) {
        struct stat sb;
        const bool fresh = stat(a.log.c_str(), &sb) != 0 || sb.st_size == 0;
        logf = fopen(a.log.c_str(), "a");
        if (!logf) die(a.log + ": cannot open for appending: " + strerror(errno));
        if (fresh) fprintf(logf, "step,loss,loss_text,loss_image,loss_speech,lr,grad_norm,tokens_per_s,val_loss,val_text,"
                      "val_image,val_speech\n");
    }
    auto save = [&](const std::string& path, int64_t step) {
        MotTrainState s{step, loader.rng};
        if (!mot_save_checkpoint(path, model, s, true, &err)) die(err);
        printf("saved %s (step %lld)\n", path.c_str(), (long long)step);
    };
    // Periodic: DIR/step_NNNNNN.ckpt keeping the newest --keep, or overwrite --save without --out.
    auto save_periodic = [&](int64_t step) {
        if (a.out.empty()) {
            if (!a.save.empty()) save(a.save, step);
            return;
        }
        char name[64];
        snprintf(name, sizeof name, "/step_%06lld.ckpt", (long long)step);
        save(a.out + name, step);
        std::vector<std::string> ck = periodic_checkpoints(a.out);
        for (size_t i = 0; i + a.keep < ck.size(); i++) remove(ck[i].c_str());
    };

    MotBatch batch;
    const double tokens_per_step = (double)a.batch * a.seq * a.accum;
    const double t_start = now_s();
    for (int step = (int)st.step; step < a.opt.steps; step++) {
        const double t0 = now_s();
        mot_zero_grad(&model);
        double loss = 0, lmod[3] = {0, 0, 0};
        int nmod[3] = {0, 0, 0};
        for (int micro = 0; micro < a.accum; micro++) {
            mot_loader_next(&loader, a.cfg, a.batch, a.seq, &batch);
            mot_forward(&model, batch);
            mot_backward(&model, batch);
            if (step == (int)st.step && micro == 0 && !a.debug_state.empty()) {
                if (!mot_write_debug_state(a.debug_state, mot_debug_capture(model, batch), &err)) die(err);
                printf("wrote debug state %s\n", a.debug_state.c_str());
            }
            loss += model.loss / a.accum;
            for (int md = 0; md < 3; md++) { lmod[md] += model.loss_mod[md] * model.n_mod[md]; nmod[md] += model.n_mod[md]; }
        }
        if (!std::isfinite(loss)) die("loss is " + std::to_string(loss) + " at step " + std::to_string(step + 1) +
                                      ": stopping (the last saved checkpoint is kept)");
        if (a.accum > 1)
            for (float& g : model.grads) g /= a.accum;
        const double lr = mot_lr_at(a.opt, step);
        const double norm = mot_adamw_step(&model, a.opt, step);
        const double dt = now_s() - t0;
        double vl = NAN, vm[3] = {NAN, NAN, NAN};
        const bool last = step + 1 == a.opt.steps;
        if (!a.val.empty() && ((a.eval_every && (step + 1) % a.eval_every == 0) || last)) evaluate(&model, a.val, a, &vl, vm);
        if ((step + 1) % a.log_every == 0 || last || step == (int)st.step) {
            char mods[128] = "", *p = mods;
            for (int md = 0; md < 3; md++)
                p += nmod[md] ? snprintf(p, 40, " %s %.3f", MOT_MOD_NAME[md], lmod[md] / nmod[md])
                              : snprintf(p, 40, " %s -", MOT_MOD_NAME[md]);
            const double eta = (now_s() - t_start) / (step + 1 - st.step) * (a.opt.steps - step - 1);
            printf("step %5d/%d | loss %.4f |%s | lr %.2e | norm %.3f | %.0f tok/s | %.2f s | eta %.0f s\n", step + 1,
                   a.opt.steps, loss, mods, lr, norm, tokens_per_step / dt, dt, eta);
            if (!std::isnan(vl))
                printf("val  %5d | loss %.4f | text %.3f image %.3f speech %.3f\n", step + 1, vl, vm[0], vm[1], vm[2]);
        }
        if (logf) {
            fprintf(logf, "%d,%.17g", step + 1, loss);  // exact: resumed runs are compared bit for bit
            for (int md = 0; md < 3; md++) fprintf(logf, ",%.6f", nmod[md] ? lmod[md] / nmod[md] : NAN);
            fprintf(logf, ",%.6e,%.6f,%.1f,%.6f,%.6f,%.6f,%.6f\n", lr, norm, tokens_per_step / dt, vl, vm[0], vm[1], vm[2]);
            fflush(logf);
        }
        if (a.save_every && (step + 1) % a.save_every == 0) save_periodic(step + 1);
    }
    if (!a.debug_state.empty() && st.step >= a.opt.steps) {  // no step ran: still write the debug state
        mot_loader_next(&loader, a.cfg, a.batch, a.seq, &batch);
        mot_zero_grad(&model);
        mot_forward(&model, batch);
        mot_backward(&model, batch);
        if (!mot_write_debug_state(a.debug_state, mot_debug_capture(model, batch), &err)) die(err);
        printf("wrote debug state %s\n", a.debug_state.c_str());
    }
    if (!a.save.empty()) save(a.save, std::max<int64_t>(st.step, a.opt.steps));
    if (logf) fclose(logf);
    return 0;
}
