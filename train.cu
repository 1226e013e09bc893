// train.cu — the mot trainer (binary: ./mot): flags, data loader, training loop, evaluation, checkpoints, logging.
//
// Built by nvcc when the CUDA toolkit is present (then it includes the GPU path, mot.cu, and trains
// on the GPU when one is there) and by g++ otherwise (plain C++: the CPU reference in mot.h only).
//
//   ./mot --help                        all flags with their defaults
//   ./mot sample --help               generation from a checkpoint (text, image, speech)
//   ./mot --data 'data/x/train_*.bin' --steps 200 --save run/model.ckpt
//
// Sections, in order: flags; run folders and timing; the engine (CPU reference or GPU) and the
// validation loss; the dataset folder; scoring and generation (downstream evaluation, samples);
// ./mot sample; memory check and log trimming; the run (setup, one training step, evaluation,
// logs, checkpoints) and main, which reads as the training loop.
#include "mot.h"
#define STB_IMAGE_IMPLEMENTATION
#define STBI_ONLY_PNG  // JPEG goes to libjpeg-turbo (see tokenizers/vq.h); no other stb decoder is reachable
#include <stb/stb_image.h>
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>
#define BPE_IMPLEMENTATION
#include "tokenizers/bpe.h"
#define VQ_IMPLEMENTATION
#include "tokenizers/vq.h"
#define SPEECH_IMPLEMENTATION
#include "tokenizers/speech.h"

// The GPU path is compiled in when nvcc builds this file, and when the CUDA-on-CPU layer does
// (`make mot_cpu_cuda`: test/cuda_cpu.h defines CUDA_CPU).
#if defined(__CUDACC__) || defined(CUDA_CPU)
#define MOT_GPU 1
#include "mot.cu"
#endif

#include <chrono>
#include <cstdlib>
#include <map>
#include <sys/stat.h>
#include <unistd.h>
#ifdef MOT_GPU
#include <cuda_runtime.h>
#endif

// Guidance defaults, measured on the main job's model (dev/RESULTS.md, "What the main job learns").
static const double CFG_IMAGE = 3.0, CFG_CAPTION = 1.0;
static const int BEST_OF = 8;  // images sampled per caption -> image; the model's own reading picks one

// ============================================================================================
// Flags
// ============================================================================================
struct Args {
    MotConfig cfg;
    MotOptim opt;
    int batch = 8, seq = 128, accum = 1;
    uint64_t seed = 1;
    std::string data = "data/default/train_*.bin", val, init_from, save, debug_state, log, out;
    int save_every = 0, keep = 3, eval_every = 0, eval_batches = 4, log_every = 1, threads = 0;
    int eval_items = 100, eval_gen = 2;
    std::string tokenizers;  // dataset folder with text.bpe, image.vq, speech.sp (default: --data's folder)
    bool resume = false, overwrite = false, cpu = false, fp32 = false, bf16 = false, eval_only = false;
    double cfg_image = CFG_IMAGE, cfg_caption = CFG_CAPTION;
    int best_of = BEST_OF;
    int diff_loss = MOT_DIFF_MSE;  // --diffusion-loss: a training option, not stored (mot.h, MotDiffLoss)
    std::vector<std::string> set;  // the model-shape flags the user gave (checked against --init-from)
    std::vector<int> experts;      // --experts: one count for every FFN copy, or one per copy
    std::string experts_text;
};

static void usage(FILE* f) {
    fprintf(f,
            "usage: mot [flags]   (train a MoT or dense model; mot sample --help for generation)\n"
            "model (the dense baseline is the same model with one tower):\n"
            "  --layers N        transformer layers                        (4)\n"
            "  --dim N           model width D                             (256)\n"
            "  --heads N         attention heads (D/heads must be even)    (8)\n"
            "  --ffn N           SwiGLU hidden width F                     (3*D)\n"
            "  --mot | --dense   one tower per modality, or one tower      (--mot)\n"
            "  --tie-attn        share attention weights across modalities (off)\n"
            "  --tie-ffn         share FFN weights across modalities       (off)\n"
            "  --tie-norm        share norm gains across modalities        (off)\n"
            "  --setting S       tokens (images as VQ codes) or transfusion (images as 49 pixel patches\n"
            "                    trained by diffusion; data: the tf_*.bin shards of data/build.sh\n"
            "                    --transfusion)                                             (tokens)\n"
            "  --experts LIST    experts per FFN: one count for every tower, or one per tower (1)\n"
            "                    e.g. --dense --experts 4 (MoE-4x), --experts 4,1,1 (MoT + MoE in text),\n"
            "                    --tie-attn --experts 4,4,4 (MoMa-style); expert choice in training,\n"
            "                    auxiliary routers for causal eval and generation (on the CPU).\n"
            "                    With --init-from a checkpoint without experts: sparse upcycling\n"
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
            "  --diffusion-loss W  Transfusion: weighting of the image noise MSE in the training loss,\n"
            "                    mse (the paper's) or min-snr (min-SNR-5, Hang et al. 2023: less weight\n"
            "                    at low noise); the validation image loss is the plain MSE either way  (mse)\n"
            "checkpoints, evaluation and logs:\n"
            "  --out DIR         run folder: log.csv, step_NNNNNN.ckpt every --save-every steps, model.ckpt,\n"
            "                    eval.csv, samples/  (without --out or --save nothing is saved)\n"
            "  --resume          continue from the newest DIR/step_*.ckpt (with --out)\n"
            "  --overwrite       delete the run already in DIR (checkpoints, log, eval, samples) first\n"
            "  --init-from FILE  start from a checkpoint (resumes its step, optimizer and data order)\n"
            "  --save FILE       write a checkpoint at the end (atomically)  (DIR/model.ckpt with --out)\n"
            "  --save-every N    also every N steps                        (0 = only at the end)\n"
            "  --keep N          periodic checkpoints kept in DIR          (3)\n"
            "  --eval-every N    validation loss every N steps (with --val) (0 = only at the end)\n"
            "  --eval-batches N  batches per validation                    (4)\n"
            "  --eval-items N    items per downstream eval (image/speech -> caption)  (100)\n"
            "  --eval-gen N      images generated per class for caption -> image, final eval  (2)\n"
            "  --cfg W           guidance scale for generated images (eval, samples)  (3)\n"
            "  --caption-cfg W   guidance scale for generated captions (eval)         (1)\n"
            "  --best-of N       images sampled per caption, the model's own caption score picks one  (8)\n"
            "  --tokenizers DIR  dataset folder with the tokenizers, classes and eval sets\n"
            "                    (default: the folder of --data); enables downstream eval and samples\n"
            "  --debug-state F   write the debug state of the first batch (dev/FORMATS.md)\n"
            "  --eval-only       evaluate (validation loss, downstream tasks with --eval-gen) and exit\n"
            "  --log FILE        append one CSV line per step to FILE      (DIR/log.csv with --out)\n"
            "  --log-every N     print every N steps                       (1)\n"
            "  --threads N       OpenMP threads                            (all cores)\n"
            "device (the GPU is used when the build has CUDA and a GPU is present):\n"
            "  --cpu             train with the CPU reference even if there is a GPU\n"
            "  --fp32            GPU in fp32 instead of bf16 with fp32 master weights\n"
            "  --bf16            the CPU in bf16 as the GPU (products on bf16 operands, summed in fp32;\n"
            "                    fp32 master weights), on AMX tiles, AVX512-BF16 or a plain loop\n"
            "                    (the GPU's default)                       (CPU: fp32)\n");
}

[[noreturn]] static void die(const std::string& msg, int code = 1) {
    fprintf(stderr, "error: %s\n", msg.c_str());
#ifdef MOT_MPI
    int up = 0;
    MPI_Initialized(&up);
    if (up) MPI_Abort(MPI_COMM_WORLD, code);  // the other ranks would wait forever
#endif
    exit(code);
}

// Strict number parsing: the whole string must be a number in range, else a one-line error.
static long parse_int(const char* flag, const char* s, long lo, long hi) {
    char* end = nullptr;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi)
        die(std::string("bad value for ") + flag + ": '" + s + "' (expected an integer in [" + std::to_string(lo) +
                ", " + std::to_string(hi) + "])",
            2);
    return v;
}
static double parse_float(const char* flag, const char* s, double lo, double hi) {
    char* end = nullptr;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) {
        char range[96];
        snprintf(range, sizeof range, "[%g, %g]", lo, hi);  // "1e+38", not a 39-digit number
        die(std::string("bad value for ") + flag + ": '" + s + "' (expected a number in " + range + ")", 2);
    }
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
        if (f == "--help" || f == "-h") {
            usage(stdout);
            exit(0);
        } else if (f == "--layers") {
            a.cfg.n_layer = parse_int("--layers", val(), 1, 1024);
            a.set.push_back("n_layer");
        } else if (f == "--dim") {
            a.cfg.d_model = parse_int("--dim", val(), 2, 65536);
            a.set.push_back("d_model");
        } else if (f == "--heads") {
            a.cfg.n_head = parse_int("--heads", val(), 1, 1024);
            a.set.push_back("n_head");
        } else if (f == "--ffn") {
            a.cfg.d_ff = parse_int("--ffn", val(), 1, 1 << 20);
            ffn_set = true;
            a.set.push_back("d_ff");
        } else if (f == "--mot" || f == "--dense") {
            const int k = f == "--mot" ? MOT_N_MOD : 1;
            if (std::find(a.set.begin(), a.set.end(), "n_tower") != a.set.end() && a.cfg.n_tower != k)
                die("give either --mot or --dense, not both", 2);
            a.cfg.n_tower = k;
            a.set.push_back("n_tower");
        } else if (f == "--tie-attn") {
            a.cfg.tie_attn = 1;
            a.set.push_back("tie_attn");
        } else if (f == "--tie-ffn") {
            a.cfg.tie_ffn = 1;
            a.set.push_back("tie_ffn");
        } else if (f == "--tie-norm") {
            a.cfg.tie_norm = 1;
            a.set.push_back("tie_norm");
        } else if (f == "--setting") {
            const std::string v = val();
            if (v != "tokens" && v != "transfusion")
                die("bad value for --setting: '" + v + "' (expected tokens or transfusion)", 2);
            a.cfg.setting = v == "transfusion" ? MOT_SETTING_TRANSFUSION : MOT_SETTING_TOKENS;
            a.set.push_back("setting");
        } else if (f == "--diffusion-loss") {
            const std::string v = val();
            if (v != "mse" && v != "min-snr")
                die("bad value for --diffusion-loss: '" + v + "' (expected mse or min-snr)", 2);
            a.diff_loss = v == "min-snr" ? MOT_DIFF_MIN_SNR : MOT_DIFF_MSE;
        } else if (f == "--experts") {
            a.experts_text = val();
            a.experts.clear();
            for (size_t p = 0;;) {
                const size_t q = a.experts_text.find(',', p);
                const std::string one = a.experts_text.substr(p, q == std::string::npos ? q : q - p);
                a.experts.push_back((int)parse_int("--experts", one.c_str(), 1, MOT_MAX_EXPERT));
                if (q == std::string::npos) break;
                p = q + 1;
            }
            if (a.experts.size() > MOT_N_MOD)
                die("bad value for --experts: '" + a.experts_text + "' (at most 3 counts: text, image, speech)", 2);
            for (int k = 0; k < MOT_N_MOD; k++) a.set.push_back(MOT_CONFIG_NAMES[12 + k]);
        } else if (f == "--data") a.data = val();
        else if (f == "--val") a.val = val();
        else if (f == "--batch") a.batch = parse_int("--batch", val(), 1, 1 << 16);
        else if (f == "--seq") {
            a.seq = parse_int("--seq", val(), 1, 1 << 20);
            a.set.push_back("max_seq");
        } else if (f == "--accum") a.accum = parse_int("--accum", val(), 1, 1 << 16);
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
        else if (f == "--overwrite") a.overwrite = true;
        else if (f == "--cfg") a.cfg_image = parse_float("--cfg", val(), 0, 100);
        else if (f == "--caption-cfg") a.cfg_caption = parse_float("--caption-cfg", val(), 0, 100);
        else if (f == "--best-of") a.best_of = parse_int("--best-of", val(), 1, 1024);
        else if (f == "--cpu") a.cpu = true;
        else if (f == "--eval-only") a.eval_only = true;
        else if (f == "--fp32") a.fp32 = true;
        else if (f == "--bf16") a.bf16 = true;
        else if (f == "--keep") a.keep = parse_int("--keep", val(), 1, 1 << 20);
        else if (f == "--save-every") a.save_every = parse_int("--save-every", val(), 0, 1 << 30);
        else if (f == "--eval-every") a.eval_every = parse_int("--eval-every", val(), 0, 1 << 30);
        else if (f == "--eval-batches") a.eval_batches = parse_int("--eval-batches", val(), 1, 1 << 20);
        else if (f == "--eval-items") a.eval_items = parse_int("--eval-items", val(), 0, 1 << 20);
        else if (f == "--eval-gen") a.eval_gen = parse_int("--eval-gen", val(), 0, 1 << 20);
        else if (f == "--tokenizers") a.tokenizers = val();
        else if (f == "--debug-state") a.debug_state = val();
        else if (f == "--log") a.log = val();
        else if (f == "--log-every") a.log_every = parse_int("--log-every", val(), 1, 1 << 30);
        else if (f == "--threads") a.threads = parse_int("--threads", val(), 1, 4096);
        else die("unknown flag '" + f + "' (see mot --help)", 2);
    }
    if (!ffn_set) a.cfg.d_ff = 3 * a.cfg.d_model;
    if (a.resume && a.out.empty()) die("--resume needs --out DIR (the run folder to resume)", 2);
    if (a.resume && !a.init_from.empty()) die("give either --resume or --init-from, not both", 2);
    if (a.overwrite && a.out.empty()) die("--overwrite needs --out DIR (the run folder to start over)", 2);
    if (a.overwrite && a.resume) die("give either --resume or --overwrite, not both", 2);
    if (a.bf16 && a.fp32) die("give either --bf16 or --fp32, not both", 2);
    // the debug state's loss and gradient are the paper's objective, and its format has no field for another
    if (a.diff_loss != MOT_DIFF_MSE && !a.debug_state.empty())
        die("--debug-state records the plain-MSE objective: give it without --diffusion-loss min-snr", 2);
    a.cfg.max_seq = a.seq;
    return a;
}

// ============================================================================================
// Run folders and timing
// ============================================================================================
// mkdir -p: creates the folder and its missing parents.
static bool mkdir_p(const std::string& dir) {
    for (size_t p = dir.find('/', 1);; p = dir.find('/', p + 1)) {
        const std::string part = dir.substr(0, p);
        if (mkdir(part.c_str(), 0755) != 0 && errno != EEXIST) return false;
        if (p == std::string::npos) return true;
    }
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

// "42s", "7m05s", "1h02m": for the ETA.
static std::string human_secs(double s) {
    char b[32];
    const long t = std::lround(std::max(0.0, s));
    if (t < 60) snprintf(b, sizeof b, "%lds", t);
    else if (t < 3600) snprintf(b, sizeof b, "%ldm%02lds", t / 60, t % 60);
    else snprintf(b, sizeof b, "%ldh%02ldm", t / 3600, t % 3600 / 60);
    return b;
}

// The files of a run in its folder (relative names, the ones a new run would write or append to).
static std::vector<std::string> run_files(const std::string& dir) {
    std::vector<std::string> out;
    for (const char* f : {"model.ckpt", "log.csv", "eval.csv", "loss.png"})
        if (access((dir + "/" + f).c_str(), F_OK) == 0) out.push_back(f);
    for (const std::string& p : periodic_checkpoints(dir)) out.push_back(p.substr(dir.size() + 1));
    glob_t gl;
    if (glob((dir + "/samples/*").c_str(), 0, nullptr, &gl) == 0) {
        for (size_t i = 0; i < gl.gl_pathc; i++) out.push_back(std::string(gl.gl_pathv[i]).substr(dir.size() + 1));
        globfree(&gl);
    }
    return out;
}

// ============================================================================================
// The engine (CPU reference or GPU) and the validation loss
// ============================================================================================
// Data parallel over GPUs (mot_mpi build, under mpirun): NCCL set up, the gradients averaged
// before each update, NCCL and MPI torn down. Any other build has one rank: nothing to do.
#if defined(MOT_MPI)
static bool start_data_parallel(int rank, int world, std::string* err) { return mot_gpu_dp_init(rank, world, err); }
static void average_grads(MotGpu* g) { mot_gpu_allreduce_grads(g); }
static void stop_data_parallel(bool on_gpu) {
    if (on_gpu) mot_gpu_dp_free();
    MPI_Finalize();
}
#elif defined(MOT_GPU)
static bool start_data_parallel(int, int, std::string*) { return true; }
static void average_grads(MotGpu*) {}
static void stop_data_parallel(bool) {}
#else
static void stop_data_parallel(bool) {}
#endif

// What trains: the CPU reference, or its GPU copy (nvcc build on a machine with a GPU). The CPU
// model holds the weights as of the last to_host(): checkpoints, downstream evaluation and
// sampling (generation runs on the CPU reference) read it there.
struct Engine {
    MotModel<float>* cpu = nullptr;
#ifdef MOT_GPU
    MotGpu gpu;
    bool on_gpu = false;
#endif
    bool gpu_active() const {
#ifdef MOT_GPU
        return on_gpu;
#else
        return false;
#endif
    }
    // Forward on a batch; the losses land in loss / loss_mod / n_mod / n_valid.
    double loss = 0, loss_lm = 0, loss_mod[MOT_N_MOD] = {0, 0, 0}, aux_loss = 0, aux_agree = 0;
    int n_valid = 0, n_mod[MOT_N_MOD] = {0, 0, 0};
    void forward(const MotBatch& b) {
#ifdef MOT_GPU
        if (on_gpu) {
            mot_gpu_forward(&gpu, b);
            take(gpu.loss, gpu.loss_mod, gpu.n_mod, gpu.n_valid);
            loss_lm = gpu.loss_lm;  // Transfusion: loss = loss_lm + 5 MSE
            aux_loss = gpu.aux_loss;
            aux_agree = gpu.aux_agree;
            return;
        }
#endif
        mot_forward(cpu, b);
        take(cpu->loss, cpu->loss_mod, cpu->n_mod, cpu->n_valid);
        loss_lm = cpu->loss_lm;
        aux_loss = cpu->aux_loss;
        aux_agree = cpu->aux_agree;
    }
    // With experts: expert choice (training, "EC" eval) or the auxiliary routers ("causal" eval).
    void set_route(int route) {
        cpu->route = route;
#ifdef MOT_GPU
        gpu.route = route;
#endif
    }
    // Transfusion: the weighting of the diffusion term of the training loss (MotDiffLoss).
    void set_diff_loss(int mode) {
        cpu->diff_loss = mode;
#ifdef MOT_GPU
        gpu.diff_loss = mode;
#endif
    }
    // accumulate = false for a step's first micro-batch: its gradients replace the old ones, without
    // a zeroing pass (the weight products write instead of add)
    void backward(const MotBatch& b, bool accumulate) {
#ifdef MOT_GPU
        if (on_gpu) {
            mot_gpu_backward(&gpu, accumulate);
            return;
        }
#endif
        mot_backward(cpu, b, accumulate);
    }
    // AdamW on the gradients accumulated over `accum` micro-batches; returns the gradient norm.
    double update(const MotOptim& o, int step, int accum) {
#ifdef MOT_GPU
        if (on_gpu) {
            average_grads(&gpu);  // data parallel: the mean over the ranks
            return mot_gpu_adamw_step(&gpu, o, step, 1.0 / accum);
        }
#endif
        if (accum > 1)
            for (float& g : cpu->grads) g /= accum;
        return mot_adamw_step(cpu, o, step);
    }
    void to_host() {
#ifdef MOT_GPU
        if (on_gpu) mot_gpu_download(&gpu, cpu);
#endif
    }
    // Which attention kernel the GPU runs at this head size (the CPU reference: none).
    std::string attn_kernel_note(bool bf16) const {
#ifdef MOT_GPU
        return mot_attn_kernel_note(bf16, cpu->cfg.d_model / cpu->cfg.n_head);
#else
        (void)bf16;
        return "";
#endif
    }

  private:
    void take(double l, const double* lm, const int* nm, int nv) {
        loss = loss_lm = l;
        n_valid = nv;
        for (int m = 0; m < MOT_N_MOD; m++) {
            loss_mod[m] = lm[m];
            n_mod[m] = nm[m];
        }
    }
};

// Mean validation loss (overall and per modality, weighted by target counts) over a fixed set
// of batches: the val loader restarts from the same seed each time, so evaluations compare.
// With experts, route picks expert choice over each batch (MOT_ROUTE_EC) or the auxiliary routers
// (MOT_ROUTE_CAUSAL); a model without experts gives the same loss either way.
static void evaluate(Engine* e, const std::string& pattern, const Args& a, double* loss, double mod[3],
                     int route = MOT_ROUTE_EC) {
    e->set_route(route);
    MotLoader ld;
    std::string err;
    if (!mot_loader_open(&ld, pattern, a.seq, 0x5EED, &err)) die(err);
    MotBatch b;
    double sum = 0, ms[3] = {0, 0, 0};
    long n = 0, mn[3] = {0, 0, 0};
    for (int i = 0; i < a.eval_batches; i++) {
        mot_loader_next(&ld, e->cpu->cfg, a.batch, a.seq, &b);
        e->forward(b);
        sum += e->loss_lm * e->n_valid;
        n += e->n_valid;
        for (int md = 0; md < 3; md++) {
            ms[md] += e->loss_mod[md] * e->n_mod[md];
            mn[md] += e->n_mod[md];
        }
    }
    *loss = n ? sum / n : 0;
    for (int md = 0; md < 3; md++) mod[md] = mn[md] ? ms[md] / mn[md] : NAN;
    // Transfusion: the objective, LM + 5 x the image MSE (mod[1]); the noise and t of each
    // validation batch are the same every time (the loader restarts from the same seed)
    if (mot_transfusion(e->cpu->cfg) && mn[MOD_IMAGE]) *loss += MOT_DIFF_WEIGHT * mod[MOD_IMAGE];
    e->set_route(MOT_ROUTE_EC);
}
// Both ways: EC into loss/mod, causal into closs/cmod (the same numbers without experts).
static void evaluate_both(Engine* e, const std::string& pattern, const Args& a, double* loss, double mod[3],
                          double* closs, double cmod[3]) {
    evaluate(e, pattern, a, loss, mod, MOT_ROUTE_EC);
    if (mot_has_experts(e->cpu->cfg)) {
        evaluate(e, pattern, a, closs, cmod, MOT_ROUTE_CAUSAL);
    } else {
        *closs = *loss;
        for (int md = 0; md < 3; md++) cmod[md] = mod[md];
    }
}

// ============================================================================================
// The dataset folder: tokenizers, classes, downstream eval sets (written by data/build.sh)
// ============================================================================================
struct DataDir {
    std::string dir;
    Bpe bpe;
    VqModel vq;
    SpeechModel sp;
    std::vector<std::string> class_name, class_caption;          // per class, from classes.txt
    std::vector<std::vector<uint16_t>> eval_image, eval_speech;  // documents BOS ... EOS
    std::vector<std::vector<uint8_t>> eval_image_px;             // Transfusion: each eval image's 784 pixels
    std::vector<int> eval_image_class, eval_speech_class;
    std::map<std::string, int> caption_class;  // every training caption and its class (captions.txt)
};

// The folder of a glob pattern ("data/default/train_*.bin" -> "data/default").
static std::string dir_of(const std::string& pattern) {
    size_t p = pattern.rfind('/');
    return p == std::string::npos ? "." : pattern.substr(0, p);
}

static bool load_tokenizers(const std::string& dir, const MotConfig& c, DataDir* d, std::string* err) {
    d->dir = dir;
    if (!bpe_load(&d->bpe, (dir + "/text.bpe").c_str(), err)) return false;
    if (!vq_model_load((dir + "/image.vq").c_str(), &d->vq, err)) return false;
    if (!speech_model_load(&d->sp, (dir + "/speech.sp").c_str(), err)) return false;
    if (MOT_N_SPECIAL + bpe_vocab_size(d->bpe) > c.image_begin || c.image_begin + d->vq.codes > c.speech_begin ||
        c.speech_begin + d->sp.K > c.vocab)
        return mot_fail(err, dir, "tokenizer sizes do not fit the model's vocabulary layout");
    return true;
}

// classes.txt: "index<TAB>name<TAB>caption" per line; eval_*.txt: "class<TAB>..." per document.
static bool read_lines(const std::string& path, std::vector<std::vector<std::string>>* rows, std::string* err) {
    FILE* f = fopen(path.c_str(), "r");
    if (!f) return mot_fail(err, path, std::string("cannot open: ") + strerror(errno));
    char line[4096];
    while (fgets(line, sizeof line, f)) {
        std::vector<std::string> cols;
        std::string l = line;
        while (!l.empty() && (l.back() == '\n' || l.back() == '\r')) l.pop_back();
        size_t p = 0;
        while (true) {
            size_t q = l.find('\t', p);
            cols.push_back(l.substr(p, q == std::string::npos ? std::string::npos : q - p));
            if (q == std::string::npos) break;
            p = q + 1;
        }
        rows->push_back(cols);
    }
    fclose(f);
    return true;
}

// base.bin and base.txt (the labels: labels.txt when given). With px, the shard must carry pixels
// (version 2) and each document's one image lands in px.
static bool load_eval_set(const std::string& base, const MotConfig& c, int n_classes,
                          std::vector<std::vector<uint16_t>>* docs, std::vector<int>* cls, std::string* err,
                          std::vector<std::vector<uint8_t>>* px = nullptr, const std::string& labels = "") {
    MotShard s;
    if (!mot_read_shard(base + ".bin", &s, err)) return false;
    if (px) {
        if (!s.pixels_version)
            return mot_fail(err, base + ".bin", "expected pixels (shard version 2) for the Transfusion setting");
        for (size_t k = 0; k < s.image_at.size(); k++)
            px->emplace_back(s.pixels.begin() + k * MOT_IMAGE_PIXELS, s.pixels.begin() + (k + 1) * MOT_IMAGE_PIXELS);
    }
    if (s.vocab.vocab != c.vocab || s.vocab.image_begin != c.image_begin || s.vocab.speech_begin != c.speech_begin)
        return mot_fail(err, base + ".bin", "vocabulary layout differs from the model's");
    for (size_t i = 0; i < s.tokens.size(); i++) {
        if (s.tokens[i] == MOT_BOS) docs->push_back({});
        if (!docs->empty()) docs->back().push_back(s.tokens[i]);
    }
    if (px && px->size() != docs->size())
        return mot_fail(err, base + ".bin",
                        std::to_string(px->size()) + " images for " + std::to_string(docs->size()) +
                            " documents (expected one image each)");
    std::vector<std::vector<std::string>> rows;
    const std::string lab = labels.empty() ? base + ".txt" : labels;
    if (!read_lines(lab, &rows, err)) return false;
    if (rows.size() != docs->size())
        return mot_fail(err, lab,
                        std::to_string(rows.size()) + " labels for " + std::to_string(docs->size()) + " documents in " +
                            base + ".bin");
    for (auto& r : rows) {
        int k = atoi(r[0].c_str());
        if (k < 0 || k >= n_classes) return mot_fail(err, base + ".txt", "class " + r[0] + " out of range");
        cls->push_back(k);
    }
    return true;
}

// Loads classes and eval sets when the folder has them (returns false only on a broken file).
static bool load_eval_sets(DataDir* d, const MotConfig& c, std::string* err) {
    std::vector<std::vector<std::string>> rows;
    const std::string cp = d->dir + "/classes.txt";
    if (access(cp.c_str(), R_OK) != 0) return true;
    if (!read_lines(cp, &rows, err)) return false;
    for (auto& r : rows) {
        if (r.size() < 3) return mot_fail(err, cp, "expected index<TAB>name<TAB>caption on every line");
        d->class_name.push_back(r[1]);
        d->class_caption.push_back(r[2]);
    }
    const std::string capp = d->dir + "/captions.txt";  // older dataset folders lack it
    if (access(capp.c_str(), R_OK) == 0) {
        std::vector<std::vector<std::string>> caps;
        if (!read_lines(capp, &caps, err)) return false;
        for (auto& r : caps) {
            if (r.size() < 2) return mot_fail(err, capp, "expected class<TAB>caption on every line");
            d->caption_class[r[1]] = atoi(r[0].c_str());
        }
    }
    if (mot_transfusion(c)) {  // the same eval images with their pixels (data/build.sh --transfusion)
        if (access((d->dir + "/tf_eval_image.bin").c_str(), R_OK) == 0 &&
            !load_eval_set(d->dir + "/tf_eval_image", c, (int)rows.size(), &d->eval_image, &d->eval_image_class, err,
                           &d->eval_image_px, d->dir + "/eval_image.txt"))
            return false;
    } else if (access((d->dir + "/eval_image.bin").c_str(), R_OK) == 0 &&
               !load_eval_set(d->dir + "/eval_image", c, (int)rows.size(), &d->eval_image, &d->eval_image_class, err))
        return false;
    if (access((d->dir + "/eval_speech.bin").c_str(), R_OK) == 0 &&
        !load_eval_set(d->dir + "/eval_speech", c, (int)rows.size(), &d->eval_speech, &d->eval_speech_class, err))
        return false;
    return true;
}

static std::vector<uint16_t> encode_text(DataDir* d, const std::string& text) {
    std::vector<int> ids;
    bpe_encode(&d->bpe, text.data(), text.size(), &ids);
    std::vector<uint16_t> out;
    for (int id : ids) out.push_back((uint16_t)(MOT_N_SPECIAL + id));
    return out;
}
static std::string decode_text(DataDir* d, const std::vector<int>& ids) {
    std::vector<int> local;
    for (int id : ids)
        if (id >= MOT_N_SPECIAL) local.push_back(id - MOT_N_SPECIAL);
    std::string s, err;
    bpe_decode(d->bpe, local.data(), local.size(), &s, &err);
    return s;
}

// ============================================================================================
// Scoring and generation
// ============================================================================================
// -log p of each candidate continuation (summed over its tokens) after a shared prefix, all
// candidates in one batch (PAD after the shorter ones: causal attention never looks at it).
// Transfusion: each row's image positions (a run of image ids, 49 when whole) take the patches of
// `px` (784 pixels) in order, as a clean image (t = 0); no diffusion loss, no noise.
static void clean_images(const MotConfig& c, MotBatch* b, const uint8_t* px) {
    const size_t N = (size_t)b->B * b->T;
    b->tstep.assign(N, 0);
    b->eps.assign(N * MOT_PATCH, 0.0f);
    b->xin.assign(N * MOT_PATCH, 0.0f);
    for (int r = 0; r < b->B; r++) {
        int patch = 0;
        for (int t = 0; t < b->T; t++) {
            const size_t i = (size_t)r * b->T + t;
            if (mot_modality(c, b->tokens[i]) != MOD_IMAGE) {
                patch = 0;
                continue;
            }
            if (!px || patch >= MOT_IMAGE_POS) continue;
            for (int j = 0; j < MOT_PATCH; j++)
                b->xin[i * MOT_PATCH + j] =
                    px[((patch / 7) * 4 + j / 4) * MOT_IMAGE_SIDE + (patch % 7) * 4 + j % 4] / 127.5f - 1.0f;
            patch++;
        }
    }
}

// The 49 markers of an image in the Transfusion setting (the pixels travel beside the tokens).
static void push_image_markers(const MotConfig& c, std::vector<uint16_t>* p) {
    p->push_back(MOT_BOI);
    for (int i = 0; i < MOT_IMAGE_POS; i++) p->push_back((uint16_t)c.image_begin);
    p->push_back(MOT_EOI);
}

// px: Transfusion only, the pixels of the image in the prefix (if any).
static std::vector<double> score_candidates(MotModel<float>* m, std::vector<uint16_t> prefix,
                                            const std::vector<std::vector<uint16_t>>& cands,
                                            const uint8_t* px = nullptr) {
    size_t longest = 0;
    for (auto& c : cands) longest = std::max(longest, c.size());
    const size_t room = (size_t)m->cfg.max_seq + 1;
    if (prefix.size() + longest > room) prefix.erase(prefix.begin(), prefix.end() - (room - longest));
    MotBatch b;
    b.B = (int)cands.size();
    b.T = (int)(prefix.size() + longest - 1);
    b.tokens.assign((size_t)b.B * b.T, MOT_PAD);
    b.targets.assign((size_t)b.B * b.T, MOT_IGNORE);
    for (int i = 0; i < b.B; i++) {
        std::vector<uint16_t> seq = prefix;
        seq.insert(seq.end(), cands[i].begin(), cands[i].end());
        for (size_t t = 0; t + 1 < seq.size(); t++) {
            b.tokens[(size_t)i * b.T + t] = seq[t];
            if (t + 1 >= prefix.size()) b.targets[(size_t)i * b.T + t] = seq[t + 1];
        }
    }
    mot_group(m->cfg, &b);
    if (mot_transfusion(m->cfg)) clean_images(m->cfg, &b, px);
    m->route = MOT_ROUTE_CAUSAL;  // with experts, no candidate may influence another's routing
    mot_forward(m, b);
    m->route = MOT_ROUTE_EC;
    std::vector<double> out(b.B, 0.0);
    for (int i = 0; i < b.B; i++)
        for (int t = 0; t < b.T; t++) out[i] += m->pos_loss[(size_t)i * b.T + t];
    return out;
}

// Generation follows the document grammar, switching modality on the begin and end tokens: in
// text the model may write text, EOS, BOI or BOA; after BOI it writes exactly image_tokens image
// codes, then EOI is forced; after BOA it writes speech units until it writes EOA (forced after
// max_speech units). It stops after writing `stop` or EOS, or after max_new tokens, and returns
// what it wrote (begin/end tokens included). Greedy when temperature <= 0.
struct GenSpec {
    int stop = MOT_EOS, max_new = 100, image_tokens = 49, max_speech = 200;
    double temperature = 1.0;
    int top_k = 0;
    // Classifier-free guidance (Chameleon-style, on logits): with cfg != 1 and an `uncond` prompt
    // (the same document without what conditions it), the logits are u + cfg * (c - u), c from the
    // prompt and u from `uncond`; every generated token is fed to both contexts.
    double cfg = 1.0;
    std::vector<uint16_t> uncond;
    // A caption: text tokens only (no BOI/BOA), and EOS only after at least one text token.
    bool caption = false;
    // Transfusion: the pixels of the image in the prompt (fed as one clean block, t = 0); images
    // are not written token by token there (BOI is not sampled: mot_ddim_image makes images).
    const uint8_t* image_px = nullptr;
};

// Decode steps and the time they took, over the whole run: the trainer's ETA prices the final
// generation with it.
static double g_gen_seconds = 0;
static long g_gen_steps = 0;

static std::vector<int> generate(MotModel<float>* m, const std::vector<uint16_t>& prompt, const GenSpec& g,
                                 uint64_t* rng) {
    const MotConfig& c = m->cfg;
    enum { TEXT, IMAGE, SPEECH } state = TEXT;
    int count = 0;  // image codes or speech units written in the current segment
    auto advance = [&](int t) {
        if (t == MOT_BOI) {
            state = IMAGE;
            count = 0;
        } else if (t == MOT_BOA) {
            state = SPEECH;
            count = 0;
        } else if (t == MOT_EOI || t == MOT_EOA) state = TEXT;
        else if (state != TEXT) count++;
    };
    const double t0 = now_s();
    long steps = 0;
    const bool guided = g.cfg != 1.0 && !g.uncond.empty();
    MotKVCache<float> kv, kvu;
    mot_kv_init(&kv, c, c.max_seq);
    if (guided) mot_kv_init(&kvu, c, c.max_seq);
    std::vector<float> logits(c.vocab), ulogits(guided ? c.vocab : 0), masked(c.vocab);
    const bool tf = mot_transfusion(c);
    for (size_t i = 0; i < prompt.size(); i++) {
        const uint16_t t = prompt[i];
        if (tf && mot_modality(c, t) == MOD_IMAGE) {  // a clean image: its whole block at once
            size_t e = i;
            while (e < prompt.size() && mot_modality(c, prompt[e]) == MOD_IMAGE) e++;
            std::vector<float> img(MOT_IMAGE_PIXELS, -1.0f), patches((e - i) * MOT_PATCH, -1.0f), eh(patches.size());
            if (g.image_px)
                for (int j = 0; j < MOT_IMAGE_PIXELS; j++) img[j] = g.image_px[j] / 127.5f - 1.0f;
            if (e - i == MOT_IMAGE_POS) mot_image_to_patches(img.data(), patches.data());
            if (!mot_image_step(m, &kv, (int)(e - i), patches.data(), 0, true, eh.data())) return {};
            i = e - 1;
            continue;
        }
        if (!mot_decode_step(m, &kv, t, logits.data())) return {};
        advance(t);
    }
    for (uint16_t t : g.uncond)
        if (guided && !mot_decode_step(m, &kvu, t, ulogits.data())) return {};
    steps += prompt.size() + (guided ? g.uncond.size() : 0);
    std::vector<int> out;
    int n_text = 0;  // text tokens written
    while ((int)out.size() < g.max_new) {
        if (guided)
            for (int j = 0; j < c.vocab; j++) logits[j] = ulogits[j] + float(g.cfg) * (logits[j] - ulogits[j]);
        std::fill(masked.begin(), masked.end(), -INFINITY);
        auto allow = [&](int lo, int hi) { std::copy(logits.begin() + lo, logits.begin() + hi, masked.begin() + lo); };
        int next;
        if (state == IMAGE && count >= g.image_tokens) next = MOT_EOI;
        else if (state == SPEECH && count >= g.max_speech) next = MOT_EOA;
        else {
            if (state == TEXT) {
                allow(MOT_N_SPECIAL, c.image_begin);
                if (!g.caption || n_text > 0) allow(MOT_EOS, MOT_EOS + 1);
                if (!g.caption && !tf) allow(MOT_BOI, MOT_BOI + 1);
                if (!g.caption) allow(MOT_BOA, MOT_BOA + 1);
            } else if (state == IMAGE) allow(c.image_begin, c.speech_begin);
            else {
                allow(c.speech_begin, c.vocab);
                allow(MOT_EOA, MOT_EOA + 1);
            }
            next = mot_sample(masked.data(), 0, c.vocab, g.temperature, g.top_k, rng);
        }
        n_text += state == TEXT && next >= MOT_N_SPECIAL;
        out.push_back(next);
        advance(next);
        if (next == g.stop || next == MOT_EOS) break;
        if (!mot_decode_step(m, &kv, next, logits.data())) break;  // context full
        if (guided && !mot_decode_step(m, &kvu, next, ulogits.data())) break;
        steps += 1 + guided;
    }
#pragma omp critical(mot_gen_time)
    {
        g_gen_seconds += now_s() - t0;
        g_gen_steps += steps;
    }
    return out;
}

// The ids of `ids` that lie in [lo, hi), shifted to start at 0 (image codes, speech units).
static std::vector<int> segment(const std::vector<int>& ids, int lo, int hi) {
    std::vector<int> out;
    for (int id : ids)
        if (id >= lo && id < hi) out.push_back(id - lo);
    return out;
}

static std::vector<uint16_t> prompt_for(DataDir* d, const std::string& text, int begin_token) {
    std::vector<uint16_t> p = {MOT_BOS};
    std::vector<uint16_t> t = encode_text(d, text);
    p.insert(p.end(), t.begin(), t.end());
    if (begin_token >= 0) p.push_back((uint16_t)begin_token);
    return p;
}

// Generated ids -> the pixels of their image; false unless they hold exactly one image's codes.
static bool image_pixels(DataDir* d, const MotConfig& c, const std::vector<int>& ids, std::vector<uint8_t>* px) {
    std::vector<int> local = segment(ids, c.image_begin, c.speech_begin);
    std::vector<int32_t> codes(local.begin(), local.end());
    px->assign((size_t)d->vq.side * d->vq.side, 0);
    std::string err;
    return (int)codes.size() == vq_tokens(d->vq) && vq_decode(d->vq, codes.data(), codes.size(), px->data(), &err);
}

// k-nearest-neighbour vote (k = 5, Euclidean on pixels) against the held-out real images.
static int knn_class(const std::vector<std::vector<uint8_t>>& ref, const std::vector<int>& ref_cls,
                     const std::vector<uint8_t>& px, int skip = -1) {
    std::vector<std::pair<double, int>> dist;
    for (size_t i = 0; i < ref.size(); i++) {
        if ((int)i == skip) continue;
        double s = 0;
        for (size_t j = 0; j < px.size(); j++) {
            double e = double(px[j]) - ref[i][j];
            s += e * e;
        }
        dist.push_back({s, ref_cls[i]});
    }
    const size_t k = std::min<size_t>(5, dist.size());
    std::partial_sort(dist.begin(), dist.begin() + k, dist.end());
    std::map<int, int> votes;
    int best = -1;
    for (size_t i = 0; i < k; i++)
        if (++votes[dist[i].second] > (best < 0 ? 0 : votes[best])) best = dist[i].second;
    return best;
}

struct Downstream {
    double img2cap = NAN, sp2cap = NAN, cap2img = NAN, knn_ceiling = NAN;
    double img2cap_gen = NAN, sp2cap_gen = NAN;  // the class named by the generated caption
    int n_img = 0, n_sp = 0, n_gen = 0;
};

// How `mot sample` and the evaluation decode: guidance scales for images and for captions.
struct Decoding {
    double cfg_image = CFG_IMAGE, cfg_caption = CFG_CAPTION;
    int best_of = BEST_OF;
    int ddim_steps = 50;  // Transfusion: DDIM steps per generated image
};

// The caption `mot sample --task caption/transcript` prints for a document prefix ending in EOI
// or EOA: greedy, text only, at least one token, guided against the caption alone (BOS).
static std::string generate_caption(MotModel<float>* m, DataDir* d, const std::vector<uint16_t>& prefix, double cfg,
                                    const uint8_t* px = nullptr) {
    GenSpec g;
    g.image_px = px;
    g.caption = true;
    g.temperature = 0;
    g.max_new = 40;
    g.cfg = cfg;
    g.uncond = {MOT_BOS};
    uint64_t rng = 1;
    return decode_text(d, generate(m, prefix, g, &rng));
}

// Caption -> image: `prompt` is BOS caption BOI; for guidance, the same document without its
// caption (BOS BOI).
static std::vector<int> generate_image(MotModel<float>* m, DataDir* d, const std::vector<uint16_t>& prompt, double cfg,
                                       uint64_t* rng) {
    GenSpec g;
    g.stop = MOT_EOI;
    g.max_new = vq_tokens(d->vq) + 1;
    g.image_tokens = vq_tokens(d->vq);
    g.cfg = cfg;
    g.uncond = {MOT_BOS, MOT_BOI};
    return generate(m, prompt, g, rng);
}

// Transfusion, caption -> image: the prompt (BOS caption BOI) in one KV cache, BOS BOI in the
// other for guidance (w != 1), DDIM over the 49 patches from x ~ N(0, I) drawn from rng; returns
// the 28x28 pixels (0..255), or nothing when the image would not fit in the context.
static double g_ddim_seconds = 0;
static long g_ddim_images = 0;
static std::vector<uint8_t> generate_image_ddim(MotModel<float>* m, const std::vector<uint16_t>& prompt, double cfg,
                                                int steps, uint64_t* rng) {
    const MotConfig& c = m->cfg;
    const double t0 = now_s();
    MotKVCache<float> kv, kvu;
    mot_kv_init(&kv, c, c.max_seq);
    std::vector<float> lg(c.vocab);
    for (uint16_t t : prompt)
        if (!mot_decode_step(m, &kv, t, lg.data())) return {};
    const bool guided = cfg != 1.0;
    if (guided) {
        mot_kv_init(&kvu, c, c.max_seq);
        for (uint16_t t : {MOT_BOS, MOT_BOI})
            if (!mot_decode_step(m, &kvu, t, lg.data())) return {};
    }
    std::vector<float> x(MOT_IMAGE_POS * MOT_PATCH), img(MOT_IMAGE_PIXELS);
    for (float& v : x) v = float(mot_rand_normal(rng));
    if (!mot_ddim_image(m, &kv, guided ? &kvu : nullptr, MOT_IMAGE_POS, steps, cfg, x.data())) return {};
    mot_patches_to_image(x.data(), img.data());
    std::vector<uint8_t> px(MOT_IMAGE_PIXELS);
    for (int j = 0; j < MOT_IMAGE_PIXELS; j++)
        px[j] = (uint8_t)std::lround(std::min(1.0f, std::max(-1.0f, img[j])) * 127.5f + 127.5f);
#pragma omp critical(mot_gen_time)
    {
        g_ddim_seconds += now_s() - t0;
        g_ddim_images++;
    }
    return px;
}

// Transfusion best of n: as rerank_images, on pixels.
static size_t rerank_pixels(MotModel<float>* m, const std::vector<std::vector<uint8_t>>& images,
                            const std::vector<std::vector<uint16_t>>& cands, const std::vector<double>& prior,
                            size_t target) {
    size_t best = 0;
    double best_score = -INFINITY;
    for (size_t i = 0; i < images.size(); i++) {
        if (images[i].size() != MOT_IMAGE_PIXELS) continue;
        std::vector<uint16_t> prefix = {MOT_BOS};
        push_image_markers(m->cfg, &prefix);
        std::vector<double> s = score_candidates(m, prefix, cands, images[i].data());
        double mx = -INFINITY, sum = 0;
        for (size_t c = 0; c < s.size(); c++) {
            s[c] = prior[c] - s[c];
            mx = std::max(mx, s[c]);
        }
        for (double x : s) sum += std::exp(x - mx);
        const double score = s[target] - mx - std::log(sum);
        if (score > best_score) {
            best_score = score;
            best = i;
        }
    }
    return best;
}

// Best of n (reranking, as DALL-E and Parti rerank their samples): among generated images (ids
// as generate_image returns them), the one from which the model reads back caption cands[target]
// most surely against the other candidates: softmax over PMI = log p(c | image) - log p(c), with
// prior[c] = -log p(c) at the start of a document. Scoring runs mot_forward: not thread-safe.
static size_t rerank_images(MotModel<float>* m, const std::vector<std::vector<int>>& images,
                            const std::vector<std::vector<uint16_t>>& cands, const std::vector<double>& prior,
                            size_t target) {
    size_t best = 0;
    double best_score = -INFINITY;
    for (size_t i = 0; i < images.size(); i++) {
        std::vector<uint16_t> prefix = {MOT_BOS, MOT_BOI};
        for (int t : images[i]) prefix.push_back((uint16_t)t);           // codes, then EOI
        if (images[i].empty() || images[i].back() != MOT_EOI) continue;  // cut short: no image
        std::vector<double> s = score_candidates(m, prefix, cands);
        double mx = -INFINITY, sum = 0;
        for (size_t c = 0; c < s.size(); c++) {
            s[c] = prior[c] - s[c];
            mx = std::max(mx, s[c]);
        }
        for (double x : s) sum += std::exp(x - mx);
        const double score = s[target] - mx - std::log(sum);
        if (score > best_score) {
            best_score = score;
            best = i;
        }
    }
    return best;
}

// Scoring, generation and the debug state run the fp32 reference whatever the training precision
// (--bf16), as they do after a GPU run: for as long as this lives, m is in fp32.
struct Fp32Scope {
    MotModel<float>* m;
    bool was;
    explicit Fp32Scope(MotModel<float>* model) : m(model), was(model->bf16) { m->bf16 = false; }
    ~Fp32Scope() { m->bf16 = was; }
};

// Image -> caption and speech -> caption: pick the class whose caption gains the most likelihood
// from the image (or the speech): log p(caption | image) - log p(caption), the second term being
// the caption at the start of a document. Without it, short or very predictable captions win
// whatever the image. Generated captions (with captions.txt): the class whose training caption the
// generated one is, exactly; any other text counts as wrong. Caption -> image: generate images for
// each class's caption and classify them with a k-NN on held-out real images.
static Downstream eval_downstream(MotModel<float>* m, DataDir* d, int max_items, int gen_per_class, uint64_t seed,
                                  const Decoding& dec = Decoding()) {
    const Fp32Scope fp32(m);
    Downstream r;
    const int C = (int)d->class_caption.size();
    if (C == 0) return r;
    std::vector<std::vector<uint16_t>> caps;
    for (int k = 0; k < C; k++) caps.push_back(encode_text(d, d->class_caption[k]));
    const std::vector<double> prior = score_candidates(m, {MOT_BOS}, caps);  // -log p(caption)
    const bool tf = mot_transfusion(m->cfg);
    // Transfusion: the pixels of eval document i when it holds an image (clean, t = 0)
    auto pixels_of = [&](const std::vector<std::vector<uint16_t>>& docs, int i) -> const uint8_t* {
        return tf && &docs == &d->eval_image && i < (int)d->eval_image_px.size() ? d->eval_image_px[i].data() : nullptr;
    };
    auto classify = [&](const std::vector<std::vector<uint16_t>>& docs, const std::vector<int>& cls, int* n) {
        int right = 0;
        *n = std::min<int>(max_items, (int)docs.size());
        for (int i = 0; i < *n; i++) {
            std::vector<uint16_t> prefix(docs[i].begin(), docs[i].end() - 1);  // drop EOS
            std::vector<double> s = score_candidates(m, prefix, caps, pixels_of(docs, i));
            for (int k = 0; k < C; k++) s[k] -= prior[k];
            right += (int)(std::min_element(s.begin(), s.end()) - s.begin()) == cls[i];
        }
        return *n ? double(right) / *n : NAN;
    };
    if (!d->eval_image.empty()) r.img2cap = classify(d->eval_image, d->eval_image_class, &r.n_img);
    if (!d->eval_speech.empty()) r.sp2cap = classify(d->eval_speech, d->eval_speech_class, &r.n_sp);
    auto named = [&](const std::vector<std::vector<uint16_t>>& docs, const std::vector<int>& cls, int n) {
        int right = 0;
#pragma omp parallel for schedule(dynamic) reduction(+ : right)
        for (int i = 0; i < n; i++) {  // decoding is one sequence at a time: items in parallel
            std::vector<uint16_t> prefix(docs[i].begin(), docs[i].end() - 1);
            auto it = d->caption_class.find(generate_caption(m, d, prefix, dec.cfg_caption, pixels_of(docs, i)));
            right += it != d->caption_class.end() && it->second == cls[i];
        }
        return n ? double(right) / n : NAN;
    };
    if (!d->caption_class.empty()) {
        if (r.n_img) r.img2cap_gen = named(d->eval_image, d->eval_image_class, r.n_img);
        if (r.n_sp) r.sp2cap_gen = named(d->eval_speech, d->eval_speech_class, r.n_sp);
    }
    if (gen_per_class > 0 && !d->eval_image.empty()) {
        std::vector<std::vector<uint8_t>> ref;
        std::vector<int> ref_cls;
        for (size_t i = 0; i < d->eval_image.size(); i++) {
            const auto& doc = d->eval_image[i];
            std::vector<int> ids;
            for (uint16_t t : doc)
                if (t >= m->cfg.image_begin && t < m->cfg.speech_begin) ids.push_back(t);
            std::vector<uint8_t> px;
            if (tf) px = d->eval_image_px[i];  // the real pixels (the token setting's are VQ-decoded)
            if (tf || image_pixels(d, m->cfg, ids, &px)) {
                ref.push_back(px);
                ref_cls.push_back(d->eval_image_class[i]);
            }
        }
        int right = 0;
        for (size_t i = 0; i < ref.size(); i++) right += knn_class(ref, ref_cls, ref[i], (int)i) == ref_cls[i];
        r.knn_ceiling = ref.empty() ? NAN : double(right) / ref.size();
        right = 0;
        r.n_gen = C * gen_per_class;
        const int n = std::max(1, dec.best_of);
        std::vector<std::vector<uint16_t>> prompts;  // encoded here: the BPE cache is not thread-safe
        for (int k = 0; k < C; k++) prompts.push_back(prompt_for(d, d->class_caption[k], MOT_BOI));
        std::vector<std::vector<int>> ids((size_t)r.n_gen * n);
        std::vector<std::vector<uint8_t>> pix(tf ? (size_t)r.n_gen * n : 0);
#pragma omp parallel for schedule(dynamic)
        for (int j = 0; j < r.n_gen * n; j++) {  // decoding is one sequence at a time: images in parallel
            uint64_t rng = seed ^ (0x9E3779B97F4A7C15ull * (j + 1));  // per image: the same for any thread count
            if (tf)
                pix[j] = generate_image_ddim(m, prompts[j / n / gen_per_class], dec.cfg_image, dec.ddim_steps, &rng);
            else ids[j] = generate_image(m, d, prompts[j / n / gen_per_class], dec.cfg_image, &rng);
        }
        for (int j = 0; j < r.n_gen; j++) {
            const int k = j / gen_per_class;
            if (tf) {  // Transfusion: the denoised pixels themselves
                std::vector<std::vector<uint8_t>> cand(pix.begin() + (size_t)j * n, pix.begin() + (size_t)(j + 1) * n);
                const size_t pick = n > 1 ? rerank_pixels(m, cand, caps, prior, k) : 0;
                if (cand[pick].size() == MOT_IMAGE_PIXELS) right += knn_class(ref, ref_cls, cand[pick]) == k;
                continue;
            }
            std::vector<std::vector<int>> cand(ids.begin() + (size_t)j * n, ids.begin() + (size_t)(j + 1) * n);
            const size_t pick = n > 1 ? rerank_images(m, cand, caps, prior, k) : 0;
            std::vector<uint8_t> px;
            if (image_pixels(d, m->cfg, cand[pick], &px)) right += knn_class(ref, ref_cls, px) == k;
        }
        r.cap2img = r.n_gen ? double(right) / r.n_gen : NAN;
    }
    return r;
}

static void print_downstream(const Downstream& r, int step) {
    printf(
        "eval %5d | image->caption %.3f scored, %.3f generated (%d) | speech->caption %.3f scored, %.3f generated (%d)",
        step, r.img2cap, r.img2cap_gen, r.n_img, r.sp2cap, r.sp2cap_gen, r.n_sp);
    if (r.n_gen) printf(" | caption->image %.3f (%d; k-NN on real images %.3f)", r.cap2img, r.n_gen, r.knn_ceiling);
    printf("\n");
}

// ---- samples for the run folder: an image per class, a spoken caption, a text continuation ----
static void write_samples(MotModel<float>* m, DataDir* d, const std::string& out, uint64_t seed, const Decoding& dec) {
    const Fp32Scope fp32(m);
    const std::string dir = out + "/samples";
    if (!mkdir_p(dir)) die(dir + ": cannot create: " + strerror(errno));
    uint64_t rng = seed ^ 0x5A5A;
    std::string err;
    FILE* f = fopen((dir + "/samples.txt").c_str(), "w");
    if (!f) die(dir + "/samples.txt: cannot open for writing: " + strerror(errno));
    const MotConfig& c = m->cfg;
    const int side = d->vq.side;
    std::vector<std::vector<uint16_t>> caps;
    for (const std::string& cap : d->class_caption) caps.push_back(encode_text(d, cap));
    const std::vector<double> prior = score_candidates(m, {MOT_BOS}, caps);
    for (size_t k = 0; k < d->class_caption.size() && mot_transfusion(c); k++) {  // Transfusion: DDIM
        std::vector<std::vector<uint8_t>> cand;
        for (int i = 0; i < std::max(1, dec.best_of); i++)
            cand.push_back(generate_image_ddim(m, prompt_for(d, d->class_caption[k], MOT_BOI), dec.cfg_image,
                                               dec.ddim_steps, &rng));
        const std::vector<uint8_t>& px = cand[cand.size() > 1 ? rerank_pixels(m, cand, caps, prior, k) : 0];
        if (px.size() != MOT_IMAGE_PIXELS) continue;
        char name[64];
        snprintf(name, sizeof name, "/image_%02zu.png", k);
        if (!vq_write_png((dir + name).c_str(), px.data(), MOT_IMAGE_SIDE, MOT_IMAGE_SIDE, &err)) die(err);
        fprintf(f, "image_%02zu.png\t%s\t(DDIM %d steps)\n", k, d->class_caption[k].c_str(), dec.ddim_steps);
    }
    for (size_t k = 0; k < d->class_caption.size() && !mot_transfusion(c);
         k++) {  // caption -> image, best of dec.best_of
        std::vector<std::vector<int>> cand;
        for (int i = 0; i < std::max(1, dec.best_of); i++)
            cand.push_back(generate_image(m, d, prompt_for(d, d->class_caption[k], MOT_BOI), dec.cfg_image, &rng));
        const std::vector<int>& ids = cand[cand.size() > 1 ? rerank_images(m, cand, caps, prior, k) : 0];
        std::vector<uint8_t> px;
        if (!image_pixels(d, c, ids, &px)) continue;
        char name[64];
        snprintf(name, sizeof name, "/image_%02zu.png", k);
        if (!vq_write_png((dir + name).c_str(), px.data(), side, side, &err)) die(err);
        fprintf(f, "image_%02zu.png\t%s\n", k, d->class_caption[k].c_str());
    }
    const std::string said =
        d->class_caption.empty() ? "a handwritten seven" : d->class_caption[7 % d->class_caption.size()];
    GenSpec gs;
    gs.stop = MOT_EOA;
    gs.max_new = gs.max_speech + 1;
    std::vector<int> units = segment(generate(m, prompt_for(d, said, MOT_BOA), gs, &rng), c.speech_begin, c.vocab);
    std::vector<float> wav;
    if (!units.empty() && speech_decode(d->sp, units.data(), units.size(), SpeechDecodeOptions(), &wav, &err) &&
        speech_wav_write((dir + "/speech.wav").c_str(), wav.data(), wav.size(), d->sp.s.sample_rate, &err))
        fprintf(f, "speech.wav\t%s\t(%zu units, %.2f s)\n", said.c_str(), units.size(),
                wav.size() / double(d->sp.s.sample_rate));
    const char* prompt = "In the beginning";
    GenSpec gt;
    gt.max_new = 60;
    gt.temperature = 0.8;
    gt.top_k = 40;
    std::vector<int> text = generate(m, prompt_for(d, prompt, -1), gt, &rng);
    std::string t = decode_text(d, text);
    for (char& ch : t)
        if (ch == '\n' || ch == '\t') ch = ' ';
    fprintf(f, "text\t%s%s\n", prompt, t.c_str());
    fclose(f);
    printf("wrote samples to %s\n", dir.c_str());
}

// ============================================================================================
// ./mot sample: generation from a checkpoint
// ============================================================================================
static void sample_usage(FILE* f) {
    fprintf(f,
            "usage: mot sample --ckpt FILE --task TASK [flags]\n"
            "  --task text        continue --prompt TEXT                    (prints the text)\n"
            "  --task image       caption --prompt TEXT to an image          (writes --output PNG)\n"
            "  --task speech      caption --prompt TEXT to speech            (writes --output WAV)\n"
            "  --task caption     image --input PNG/JPEG to a caption        (prints the text)\n"
            "  --task transcript  speech --input WAV to its transcript       (prints the text)\n"
            "  --cfg W            classifier-free guidance: logits u + W (c - u), u without the\n"
            "                     caption (image, speech) or without the input (caption, transcript)\n"
            "                                                                (3 for image, else 1 = off)\n"
            "  --steps N          image, Transfusion setting: DDIM steps (eta 0; guidance on the\n"
            "                     predicted noise, eps_u + W (eps_c - eps_u))   (50)\n"
            "  --best-of N        image: sample N, keep the one the model reads back as the prompt\n"
            "                     most surely against the classes' captions  (8; 1 = off)\n"
            "  --tokenizers DIR   folder with text.bpe, image.vq, speech.sp  (data/default)\n"
            "  --temp X           sampling temperature, 0 = greedy           (1.0 for image/speech, 0 for text)\n"
            "  --top-k N          sample among the N most likely, 0 = all    (0)\n"
            "  --max-tokens N     longest text or speech continuation        (100)\n"
            "  --seed N           sampling seed                              (1)\n");
}

struct SampleArgs {
    std::string ckpt, task, prompt, input, output, tokdir = "data/default";
    double temp = -1, cfg = -1;  // -1: the task's default
    int top_k = 0, max_tokens = 100, best_of = BEST_OF, steps = 50;
    uint64_t seed = 1;
    bool text_in() const { return task == "text" || task == "image" || task == "speech"; }
};

static SampleArgs parse_sample_args(int argc, char** argv) {
    SampleArgs s;
    for (int i = 2; i < argc; i++) {
        const std::string f = argv[i];
        auto val = [&]() -> const char* {
            if (i + 1 >= argc) die("flag " + f + " needs a value", 2);
            return argv[++i];
        };
        if (f == "--help" || f == "-h") {
            sample_usage(stdout);
            exit(0);
        } else if (f == "--ckpt") s.ckpt = val();
        else if (f == "--task") s.task = val();
        else if (f == "--prompt") s.prompt = val();
        else if (f == "--input") s.input = val();
        else if (f == "--output") s.output = val();
        else if (f == "--tokenizers") s.tokdir = val();
        else if (f == "--temp") s.temp = parse_float("--temp", val(), 0, 100);
        else if (f == "--cfg") s.cfg = parse_float("--cfg", val(), 0, 100);
        else if (f == "--best-of") s.best_of = parse_int("--best-of", val(), 1, 1024);
        else if (f == "--steps") s.steps = parse_int("--steps", val(), 1, 1000);
        else if (f == "--top-k") s.top_k = parse_int("--top-k", val(), 0, 1 << 20);
        else if (f == "--max-tokens") s.max_tokens = parse_int("--max-tokens", val(), 1, 1 << 20);
        else if (f == "--seed") s.seed = parse_int("--seed", val(), 0, 0x7fffffffffffffffL);
        else die("unknown flag '" + f + "' (see mot sample --help)", 2);
    }
    const std::string& task = s.task;
    if (task.empty()) die("mot sample needs --task (text, image, speech, caption or transcript)", 2);
    if (!s.text_in() && task != "caption" && task != "transcript")
        die("bad value for --task: '" + task + "' (expected text, image, speech, caption or transcript)", 2);
    if (task == "text" && s.cfg >= 0)
        die("--cfg needs a conditioned task (image, speech, caption, transcript), not text", 2);
    if (s.cfg < 0) s.cfg = task == "image" ? CFG_IMAGE : task == "text" ? 1.0 : CFG_CAPTION;
    if (s.ckpt.empty()) die("mot sample needs --ckpt FILE", 2);
    if (s.text_in() && s.prompt.empty()) die("--task " + task + " needs --prompt TEXT", 2);
    if (!s.text_in() && s.input.empty()) die("--task " + task + " needs --input FILE", 2);
    if ((task == "image" || task == "speech") && s.output.empty()) die("--task " + task + " needs --output FILE", 2);
    if (s.temp < 0) s.temp = task == "image" || task == "speech" ? 1.0 : 0.0;
    return s;
}

// The prompt first, then the classes' captions (classes.txt, when the folder has them): the
// candidates of --best-of are read back against these.
static std::vector<std::vector<uint16_t>> captions_to_rank(DataDir* d, const MotConfig& c, const std::string& prompt) {
    std::string err;
    if (!load_eval_sets(d, c, &err)) die(err);
    std::vector<std::vector<uint16_t>> caps = {encode_text(d, prompt)};
    for (const std::string& k : d->class_caption)
        if (k != prompt) caps.push_back(encode_text(d, k));
    return caps;
}

// --task image, Transfusion setting: DDIM over the 49 patches, the best of --best-of.
static void sample_image_ddim(MotModel<float>* m, DataDir* d, const SampleArgs& s, uint64_t* rng) {
    const MotConfig& c = m->cfg;
    std::string err;
    const std::vector<uint16_t> pr = prompt_for(d, s.prompt, MOT_BOI);
    if ((int)pr.size() + MOT_IMAGE_POS + 1 > c.max_seq)
        die("the model's context is too short for a whole image after this prompt");
    std::vector<std::vector<uint8_t>> cand;
    const double t0 = now_s();
    for (int i = 0; i < s.best_of; i++) cand.push_back(generate_image_ddim(m, pr, s.cfg, s.steps, rng));
    const double secs = now_s() - t0;
    size_t pick = 0;
    if (s.best_of > 1) {
        const auto caps = captions_to_rank(d, c, s.prompt);
        pick = rerank_pixels(m, cand, caps, score_candidates(m, {MOT_BOS}, caps), 0);
    }
    if (cand[pick].size() != MOT_IMAGE_PIXELS) die("image generation failed");
    if (!vq_write_png(s.output.c_str(), cand[pick].data(), MOT_IMAGE_SIDE, MOT_IMAGE_SIDE, &err)) die(err);
    printf("wrote %s (DDIM %d steps, guidance %g, %.3f s per image)\n", s.output.c_str(), s.steps, s.cfg,
           secs / s.best_of);
}

// --task image, tokens setting: image tokens up to EOI, the best of --best-of, decoded by the VQ.
static void sample_image_tokens(MotModel<float>* m, DataDir* d, const SampleArgs& s, GenSpec g, uint64_t* rng) {
    const MotConfig& c = m->cfg;
    std::string err;
    g.stop = MOT_EOI;
    g.max_new = g.image_tokens + 1;
    g.uncond = {MOT_BOS, MOT_BOI};
    std::vector<std::vector<int>> cand;
    for (int i = 0; i < s.best_of; i++) cand.push_back(generate(m, prompt_for(d, s.prompt, MOT_BOI), g, rng));
    size_t pick = 0;
    if (s.best_of > 1) {
        const auto caps = captions_to_rank(d, c, s.prompt);
        pick = rerank_images(m, cand, caps, score_candidates(m, {MOT_BOS}, caps), 0);
    }
    std::vector<uint8_t> px;
    if (!image_pixels(d, c, cand[pick], &px))
        die("the model's context is too short for a whole image after this prompt");
    if (!vq_write_png(s.output.c_str(), px.data(), d->vq.side, d->vq.side, &err)) die(err);
    printf("wrote %s\n", s.output.c_str());
}

// --task speech: speech units up to EOA, decoded to a WAV.
static void sample_speech(MotModel<float>* m, DataDir* d, const SampleArgs& s, GenSpec g, uint64_t* rng) {
    const MotConfig& c = m->cfg;
    std::string err;
    g.stop = MOT_EOA;
    g.max_new = s.max_tokens + 1;
    g.uncond = {MOT_BOS, MOT_BOA};
    std::vector<int> units = segment(generate(m, prompt_for(d, s.prompt, MOT_BOA), g, rng), c.speech_begin, c.vocab);
    std::vector<float> wav;
    if (units.empty()) die("the model ended the speech at once (no units generated)");
    if (!speech_decode(d->sp, units.data(), units.size(), SpeechDecodeOptions(), &wav, &err) ||
        !speech_wav_write(s.output.c_str(), wav.data(), wav.size(), d->sp.s.sample_rate, &err))
        die(err);
    printf("wrote %s (%zu units, %.2f s)\n", s.output.c_str(), units.size(), wav.size() / double(d->sp.s.sample_rate));
}

// --task caption (an image file) or transcript (a WAV): the input as the prompt, text generated after it.
static void sample_caption(MotModel<float>* m, DataDir* d, const SampleArgs& s, GenSpec g, uint64_t* rng) {
    const MotConfig& c = m->cfg;
    std::string err;
    std::vector<uint16_t> p = {MOT_BOS};
    std::vector<uint8_t> px;
    if (s.task == "caption" && mot_transfusion(c)) {  // the clean image (t = 0) as 49 patches
        if (!vq_load_image(s.input.c_str(), MOT_IMAGE_SIDE, &px, &err)) die(err);
        push_image_markers(c, &p);
        g.image_px = px.data();
    } else if (s.task == "caption") {
        if (!vq_load_image(s.input.c_str(), d->vq.side, &px, &err)) die(err);
        std::vector<int32_t> codes(vq_tokens(d->vq));
        vq_encode(d->vq, px.data(), codes.data());
        p.push_back(MOT_BOI);
        for (int32_t k : codes) p.push_back((uint16_t)(c.image_begin + k));
        p.push_back(MOT_EOI);
    } else {
        std::vector<float> wav;
        std::vector<int> units;
        if (!speech_wav_load(s.input.c_str(), d->sp.s.sample_rate, &wav, &err) ||
            !speech_encode(d->sp, wav.data(), wav.size(), d->sp.s.sample_rate, &units, &err))
            die(err);
        p.push_back(MOT_BOA);
        for (int u : units) p.push_back((uint16_t)(c.speech_begin + u));
        p.push_back(MOT_EOA);
    }
    if ((int)p.size() >= c.max_seq)
        die(s.input + ": too long for the model's context (" + std::to_string(p.size()) + " tokens, max_seq " +
            std::to_string(c.max_seq) + ")");
    // After EOI/EOA the grammar allows a caption, BOA (image then speech) or EOS; greedy picks
    // EOS, so captions are text only with at least one token, guided against BOS alone.
    g.caption = true;
    g.uncond = {MOT_BOS};
    std::vector<int> ids = generate(m, p, g, rng);
    printf("%s\n", decode_text(d, ids).c_str());
}

static int sample_main(int argc, char** argv) {
    const SampleArgs s = parse_sample_args(argc, argv);
    std::string err;
    MotConfig c;
    if (!mot_read_checkpoint_config(s.ckpt, &c, &err)) die(err);
    MotModel<float> m;
    mot_init(&m, c, 1);
    if (!mot_load_checkpoint(s.ckpt, &m, nullptr, nullptr, &err)) die(err);
    DataDir d;
    if (!load_tokenizers(s.tokdir, c, &d, &err)) die(err);
    uint64_t rng = s.seed;
    GenSpec g;
    g.max_new = s.max_tokens;
    g.max_speech = s.max_tokens;
    g.temperature = s.temp;
    g.top_k = s.top_k;
    g.image_tokens = vq_tokens(d.vq);
    g.cfg = s.cfg;
    if (s.text_in()) {  // a prompt that fills the context would generate nothing, silently
        const size_t n = prompt_for(&d, s.prompt, s.task == "text" ? -1 : MOT_BOI).size();
        if ((int)n >= c.max_seq)
            die("--prompt is " + std::to_string(n) + " tokens, too long for the model's context (max_seq " +
                    std::to_string(c.max_seq) + ")",
                2);
    }
    if (s.task == "text") {
        std::vector<int> ids = generate(&m, prompt_for(&d, s.prompt, -1), g, &rng);
        printf("%s%s\n", s.prompt.c_str(), decode_text(&d, ids).c_str());
    } else if (s.task == "image" && mot_transfusion(c)) sample_image_ddim(&m, &d, s, &rng);
    else if (s.task == "image") sample_image_tokens(&m, &d, s, g, &rng);
    else if (s.task == "speech") sample_speech(&m, &d, s, g, &rng);
    else sample_caption(&m, &d, s, g, &rng);
    return 0;
}

// ============================================================================================
// Memory check and log trimming
// ============================================================================================
// Refuses (one line) a model, batch or sequence whose memory exceeds this machine's RAM, before
// allocating it: with activations (CPU training) or only parameters, gradients and Adam moments.
static void check_memory(const Args& a, bool activations) {
    uint64_t P = 0;
    mot_param_count(a.cfg, &P);
    const double L = a.cfg.n_layer, D = a.cfg.d_model, H = a.cfg.n_head, F = a.cfg.d_ff, V = a.cfg.vocab;
    const double B = a.batch, T = a.seq, N = B * T;
    double bytes = 4.0 * 4 * P + 4.0 * T * (D / H);  // float params, grads, Adam m and v; RoPE tables
    const char* what = "parameters, gradients and optimizer state";
    if (activations) {  // mot_alloc_acts and its backward scratch, in double: no wrap
        bytes += 4.0 * (L * N * (9 * D + 2 * H + 2 + 3 * F) + L * B * H * T * T + N * (2 * V + D + 1) + 7 * N * D +
                        3 * N * F);
        if (mot_transfusion(a.cfg))
            bytes += 4.0 * N * (D + 3 * MOT_PATCH);  // patches, sinusoids, eps_hat, its gradient
        what = "parameters, optimizer state and activations";
    }
    const double ram = (double)sysconf(_SC_PHYS_PAGES) * sysconf(_SC_PAGESIZE);
    if (ram > 0 && bytes > ram)
        die("model too large for this machine: " + std::string(what) + " need " + std::to_string(llround(bytes / 1e9)) +
                " GB (L=" + std::to_string(a.cfg.n_layer) + " D=" + std::to_string(a.cfg.d_model) +
                " F=" + std::to_string(a.cfg.d_ff) + " batch " + std::to_string(a.batch) + " seq " +
                std::to_string(a.seq) + "), the machine has " + std::to_string(llround(ram / 1e9)) +
                " GB; lower --dim, --layers, --batch or --seq",
            2);
}

// Keeps the header and the rows of a CSV whose first column (the step) is <= step, dropping a
// torn last line too; rewritten atomically. A missing file is fine.
static bool trim_csv(const std::string& path, int64_t step, std::string* err) {
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) return true;
    std::string all, keep;
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) all.append(buf, n);
    fclose(f);
    bool dropped = false;
    for (size_t pos = 0, nl; pos < all.size(); pos = nl + 1) {
        nl = all.find('\n', pos);
        if (nl == std::string::npos) {
            dropped = true;
            break;
        }  // torn by a kill
        const std::string line = all.substr(pos, nl + 1 - pos);
        if (pos == 0 || atoll(line.c_str()) <= step) keep += line;
        else dropped = true;
    }
    if (!dropped) return true;
    return mot_write_atomic(path, err, [&](FILE* o) { return mot_put(o, keep.data(), keep.size()); });
}

// ============================================================================================
// The run: what main sets up once (in this order), then the pieces of one training step
// ============================================================================================
struct Run {
    Args a;
    int rank = 0, world = 1;  // data parallel (mot_mpi build under mpirun): this process, of how many
    MotConfig fc;             // the config of --init-from's checkpoint
    bool upcycle = false;     // --experts on a checkpoint without experts: sparse upcycling
    MotLoader loader;
    MotModel<float> model;
    MotTrainState st;  // the step and data order the run starts from
    Engine eng;
    DataDir dd;  // tokenizers and eval sets, where the dataset folder has them
    bool have_tok = false;
    Decoding dec;
    FILE* logf = nullptr;   // --log (DIR/log.csv): one row per step
    FILE* evalf = nullptr;  // DIR/eval.csv: one row per downstream evaluation
    bool downstream() const { return have_tok && !dd.class_caption.empty(); }
};

// Data parallel (mot_mpi build, launched by mpirun): every rank trains on its own batches, the
// gradients are averaged with NCCL, and rank 0 alone prints, evaluates and writes files.
static void start_ranks(int* argc, char*** argv, Run* r) {
#ifdef MOT_MPI
    MPI_Init(argc, argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &r->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &r->world);
    if (r->rank != 0) {
        if (!freopen("/dev/null", "w", stdout)) die("cannot silence stdout of rank " + std::to_string(r->rank));
        Args& a = r->a;
        a.out.clear();
        a.save.clear();
        a.log.clear();
        a.val.clear();
        a.debug_state.clear();
        a.resume = false;
        a.eval_items = 0;
    }
#else
    (void)argc, (void)argv, (void)r;
#endif
}

static void set_threads(int threads) {
#ifdef _OPENMP
    if (threads) omp_set_num_threads(threads);
#else
    (void)threads;
#endif
}

static void print_threads() {
#ifdef _OPENMP
    printf("threads: %d\n", omp_get_max_threads());
#endif
}

// --out DIR: created, refused if it holds a run (unless --resume or --overwrite), cleared with
// --overwrite; --resume picks the newest intact checkpoint. An unwritable --save is found now.
static void prepare_run_folder(Args* a) {
    std::string err;
    if (!a->out.empty()) {
        if (!mkdir_p(a->out)) die(a->out + ": cannot create the run folder: " + strerror(errno));
        // A folder holding a run is continued or cleared, never silently mixed with a new one.
        const std::vector<std::string> held = run_files(a->out);
        if (!held.empty() && !a->resume && !a->overwrite && !a->eval_only)
            die(a->out + " already holds a run (" + held[0] + (held.size() > 1 ? ", ..." : "") +
                    "): add --resume to continue it or --overwrite to start over",
                2);
        if (a->overwrite && !a->eval_only)
            for (const std::string& f : held)
                if (remove((a->out + "/" + f).c_str()) != 0 && errno != ENOENT)
                    die(a->out + "/" + f + ": cannot delete: " + strerror(errno));
        if (a->log.empty()) a->log = a->out + "/log.csv";
        if (a->save.empty()) a->save = a->out + "/model.ckpt";
        if (a->resume) {
            // Newest first; one whose header or size is wrong (a truncated or damaged file) is
            // skipped, saying so, for the previous one that --keep left.
            std::vector<std::string> ck = periodic_checkpoints(a->out);
            for (size_t i = ck.size(); i-- > 0 && a->init_from.empty();) {
                if (mot_read_checkpoint_config(ck[i], nullptr, &err)) a->init_from = ck[i];
                else printf("resume: skipping %s\n", err.c_str());
            }
            if (a->init_from.empty())
                printf("resume: no %scheckpoint in %s, starting fresh\n", ck.empty() ? "" : "intact ", a->out.c_str());
            else if (a->init_from != ck.back()) printf("resume: falling back to %s\n", a->init_from.c_str());
        }
    }
    if (!a->save.empty()) {  // find an unwritable --save now, not after hours of training
        FILE* f = fopen((a->save + ".tmp").c_str(), "wb");
        if (!f) die(a->save + ".tmp: cannot open for writing: " + strerror(errno));
        fclose(f);
        remove((a->save + ".tmp").c_str());
    }
}

// The training shards (their vocabulary layout goes into the config), --val checked against them,
// and the checkpoint's config (its sequence length unless --seq was given).
static void open_data(Run* r) {
    Args& a = r->a;
    std::string err;
    const bool seq_set = std::find(a.set.begin(), a.set.end(), "max_seq") != a.set.end();
    if (!a.init_from.empty()) {
        if (!mot_read_checkpoint_config(a.init_from, &r->fc, &err)) die(err);
        if (!seq_set) a.seq = a.cfg.max_seq = r->fc.max_seq;
    }
    // Every rank reads the same stream of batches and trains on its share of each step (see
    // train_step), so a data-parallel run equals one process with --accum = the number of ranks.
    if (!mot_loader_open(&r->loader, a.data, a.seq, a.seed ^ 0xDA7A, &err)) die(err);
    a.cfg.vocab = r->loader.vocab.vocab;
    a.cfg.image_begin = r->loader.vocab.image_begin;
    a.cfg.speech_begin = r->loader.vocab.speech_begin;
    if (!a.val.empty()) {  // a bad --val found now, not after the last training step
        MotLoader vl;
        if (!mot_loader_open(&vl, a.val, a.seq, 0, &err)) die(err);
        if (memcmp(&vl.vocab, &r->loader.vocab, sizeof(MotVocab)) != 0)
            die(vl.shards[0].path + ": vocabulary layout differs from the training data's (" +
                r->loader.shards[0].path + ")");
    }
}

// The model's config: the flags', or with --init-from the checkpoint's (flags the user set must
// agree with it), with --experts applied; checked, and refused where it cannot fit in memory.
static void settle_config(Run* r) {
    Args& a = r->a;
    const MotConfig& fc = r->fc;
    std::string err;
    // --experts counts the model's FFN copies: the flags' towers, or the checkpoint's where the flags
    // leave them open. A checkpoint without experts and a model with them: sparse upcycling.
    if (!a.experts.empty()) {
        auto given = [&](const char* n) { return std::find(a.set.begin(), a.set.end(), n) != a.set.end(); };
        MotConfig towers = a.cfg;
        if (!a.init_from.empty() && !given("n_tower")) towers.n_tower = fc.n_tower;
        if (!a.init_from.empty() && !given("tie_ffn")) towers.tie_ffn = fc.tie_ffn;
        const int kf = mot_ffn_copies(towers);
        if (a.experts.size() != 1 && (int)a.experts.size() != kf)
            die("bad value for --experts: '" + a.experts_text + "' (expected one count, or " + std::to_string(kf) +
                    ": one per FFN tower of this model)",
                2);
        for (int f = 0; f < MOT_N_MOD; f++)
            a.cfg.n_expert[f] = f >= kf ? 1 : a.experts.size() == 1 ? a.experts[0] : a.experts[f];
        r->upcycle = !a.init_from.empty() && !mot_has_experts(fc) && mot_has_experts(a.cfg);
    }
    const MotConfig wanted = a.cfg;
    if (!a.init_from.empty()) {
        int32_t fv[MOT_CONFIG_INTS], av[MOT_CONFIG_INTS];
        mot_config_to_ints(fc, fv);
        mot_config_to_ints(a.cfg, av);
        for (int i = 0; i < MOT_CONFIG_INTS; i++) {
            std::string name = MOT_CONFIG_NAMES[i];
            bool from_data = name == "vocab" || name == "image_begin" || name == "speech_begin";
            bool user_set = std::find(a.set.begin(), a.set.end(), name) != a.set.end();
            if (r->upcycle && i >= MOT_CONFIG_INTS_V1) continue;  // the experts are what upcycling changes
            if ((from_data || user_set) && fv[i] != av[i])
                die(a.init_from + ": config does not match: " + name + " is " + std::to_string(fv[i]) +
                    " in the checkpoint but " + std::to_string(av[i]) + " from the " +
                    (from_data ? "data (" + a.data + ")" : std::string("flags")));
        }
        a.cfg = fc;
        if (r->upcycle)
            for (int f = 0; f < MOT_N_MOD; f++) a.cfg.n_expert[f] = wanted.n_expert[f];
    }
    std::string bad = mot_config_error(a.cfg);
    if (!bad.empty()) die("bad model config: " + bad, 2);
    if (a.diff_loss != MOT_DIFF_MSE && !mot_transfusion(a.cfg))
        die("--diffusion-loss min-snr needs the Transfusion setting (--setting transfusion)", 2);
    bad = mot_loader_setting_error(r->loader, a.cfg);  // the shards' form must match the setting
    if (!bad.empty()) die(bad + (mot_transfusion(a.cfg) ? "" : " (add --setting transfusion)"), 2);
    if (!a.val.empty()) {
        MotLoader vl;
        if (!mot_loader_open(&vl, a.val, a.seq, 0, &err)) die(err);
        bad = mot_loader_setting_error(vl, a.cfg);
        if (!bad.empty()) die(bad, 2);
    }
    check_memory(a, false);
}

// The weights: fresh (seeded), resumed from --init-from with its optimizer state and data order,
// or upcycled from a checkpoint without experts.
static void load_weights(Run* r) {
    const Args& a = r->a;
    std::string err;
    mot_init(&r->model, a.cfg, a.seed);
    if (r->upcycle) {  // a new run from the checkpoint's weights: step 0, fresh optimizer, this seed's data order
        MotModel<float> src;
        mot_init(&src, r->fc, a.seed);
        if (!mot_load_checkpoint(a.init_from, &src, nullptr, nullptr, &err)) die(err);
        const std::string why = mot_upcycle(&r->model, src);
        if (!why.empty()) die(a.init_from + ": cannot upcycle: " + why);
        printf(
            "upcycled from %s: each FFN copied into its %s experts, routers and aux routers fresh N(0, 0.02); "
            "step 0, fresh optimizer\n",
            a.init_from.c_str(), a.experts_text.c_str());
    } else if (!a.init_from.empty()) {
        bool has_opt = false;
        if (!mot_load_checkpoint(a.init_from, &r->model, &r->st, &has_opt, &err)) die(err);
        if (has_opt) r->loader.rng = r->st.data_rng;  // resume the data order where it stopped
        printf("resumed from %s at step %lld%s\n", a.init_from.c_str(), (long long)r->st.step,
               has_opt ? "" : " (no optimizer state: moments start at zero)");
    }
}

#ifdef CUDA_CPU
static const char* GPU_KIND = "the GPU code on the CPU (test/cuda_cpu.h)";
#else
static const char* GPU_KIND = "GPU";
#endif

// The GPU when the build has one and it is there (and --cpu is not given), else the CPU reference.
static void start_engine(Run* r) {
    const Args& a = r->a;
    Engine& eng = r->eng;
    eng.cpu = &r->model;
    std::string why = "CPU-only build (no nvcc)";
#ifdef MOT_GPU
    std::string err;
    if (a.cpu) why = "--cpu given";
    else if (mot_gpu_available(&why)) {
        if (!start_data_parallel(r->rank, r->world, &err)) die("data parallel setup: " + err);
        if (!mot_gpu_init(&eng.gpu, a.cfg, a.batch, a.seq, !a.fp32, &err)) die(err);
        mot_gpu_upload(&eng.gpu, r->model);
        eng.on_gpu = true;
    }
#endif
    if (r->world > 1 && !eng.gpu_active()) die("data parallel runs need a GPU per rank (" + why + ")");
    if (!eng.gpu_active()) check_memory(a, true);
    if (eng.gpu_active()) {
        printf("device: %s x %d, %s\n", GPU_KIND, r->world, a.fp32 ? "fp32" : "bf16 with fp32 master weights");
        printf("attention: %s\n", eng.attn_kernel_note(!a.fp32).c_str());
    } else if (a.bf16) {
        r->model.bf16 = true;
        printf("device: CPU reference (%s), bf16 on %s\n", why.c_str(), mot_bf16_engine_note().c_str());
    } else printf("device: CPU reference (%s)\n", why.c_str());
    eng.set_diff_loss(a.diff_loss);
    if (a.diff_loss == MOT_DIFF_MIN_SNR)
        printf("diffusion loss: min-SNR weighted, gamma %g (validation image loss: the plain MSE)\n",
               MOT_MIN_SNR_GAMMA);
}

static void print_model_and_data(const Run& r) {
    const MotConfig& c = r.a.cfg;
    std::string experts_note;
    if (mot_has_experts(c)) {
        experts_note = ", experts";
        for (int f = 0; f < mot_ffn_copies(c); f++) experts_note += (f ? "," : " ") + std::to_string(c.n_expert[f]);
    }
    printf("model: %s%s, L=%d D=%d H=%d F=%d V=%d (text %d, image %d, speech %d), T=%d, %.2fM parameters%s%s%s%s\n",
           c.n_tower == 1 ? "dense" : "MoT (3 towers)", mot_transfusion(c) ? ", Transfusion (images by diffusion)" : "",
           c.n_layer, c.d_model, c.n_head, c.d_ff, c.vocab, c.image_begin, c.speech_begin - c.image_begin,
           c.vocab - c.speech_begin, c.max_seq, r.model.tab.total / 1e6, c.tie_attn ? ", attention tied" : "",
           c.tie_ffn ? ", FFN tied" : "", c.tie_norm ? ", norms tied" : "", experts_note.c_str());
    size_t ntok = 0;
    for (auto& s : r.loader.shards) ntok += s.tokens.size();
    printf("data: %zu shard(s), %zu tokens from %s\n", r.loader.shards.size(), ntok, r.a.data.c_str());
}

// Tokenizers and eval sets: optional (a bare folder of shards trains fine), but a broken file is an error.
static void open_dataset(Run* r) {
    const Args& a = r->a;
    std::string err;
    const std::string dir = a.tokenizers.empty() ? dir_of(a.data) : a.tokenizers;
    const bool present = access((dir + "/text.bpe").c_str(), F_OK) == 0;
    if (!a.tokenizers.empty() || present) {
        if (!load_tokenizers(dir, a.cfg, &r->dd, &err) || !load_eval_sets(&r->dd, a.cfg, &err)) die(err);
        r->have_tok = true;
        printf("tokenizers: %s (%zu classes, eval: %zu images, %zu speech clips)\n", dir.c_str(),
               r->dd.class_caption.size(), r->dd.eval_image.size(), r->dd.eval_speech.size());
    }
    r->dec.cfg_image = a.cfg_image;
    r->dec.cfg_caption = a.cfg_caption;
    r->dec.best_of = a.best_of;
}

// Opens a CSV for appending, writing its header when it is new or empty.
static FILE* open_csv(const std::string& path, const char* header) {
    struct stat sb;
    const bool fresh = stat(path.c_str(), &sb) != 0 || sb.st_size == 0;
    FILE* f = fopen(path.c_str(), "a");
    if (!f) die(path + ": cannot open for appending: " + strerror(errno));
    if (fresh) fputs(header, f);
    return f;
}

static void open_logs(Run* r) {
    const Args& a = r->a;
    std::string err;
    // Rows after the checkpoint's step were written by a run that died before its next
    // checkpoint; they are redone now, so drop them (log.csv never holds a step twice).
    // (With --resume and no checkpoint yet, everything logged before is redone from step 0.)
    if ((!a.init_from.empty() || a.resume) && !a.eval_only) {
        if (!a.log.empty() && !trim_csv(a.log, r->st.step, &err)) die(err);
        if (!a.out.empty() && !trim_csv(a.out + "/eval.csv", r->st.step, &err)) die(err);
    }
    if (r->downstream() && !a.out.empty())
        r->evalf = open_csv(a.out + "/eval.csv",
                            "step,image_to_caption,speech_to_caption,caption_to_image,knn_ceiling,"
                            "image_caption_generated,speech_caption_generated\n");
    if (!a.log.empty())
        r->logf = open_csv(a.log,
                           "step,loss,loss_text,loss_image,loss_speech,lr,grad_norm,tokens_per_s,val_loss,val_text,"
                           "val_image,val_speech,val_causal,val_causal_text,val_causal_image,val_causal_speech,"
                           "aux_loss,aux_agree\n");
}

// ---- checkpoints ----
static void save_checkpoint(Run* r, const std::string& path, int64_t step) {
    std::string err;
    r->eng.to_host();
    MotTrainState s{step, r->loader.rng};
    if (!mot_save_checkpoint(path, r->model, s, true, &err)) die(err);
    printf("saved %s (step %lld)\n", path.c_str(), (long long)step);
}
// Periodic: DIR/step_NNNNNN.ckpt keeping the newest --keep, or overwrite --save without --out.
static void save_periodic(Run* r, int64_t step) {
    const Args& a = r->a;
    if (a.out.empty()) {
        if (!a.save.empty()) save_checkpoint(r, a.save, step);
        return;
    }
    char name[64];
    snprintf(name, sizeof name, "/step_%06lld.ckpt", (long long)step);
    save_checkpoint(r, a.out + name, step);
    std::vector<std::string> ck = periodic_checkpoints(a.out);
    for (size_t i = 0; i + a.keep < ck.size(); i++) remove(ck[i].c_str());
}

// ---- evaluation ----
struct ValLoss {                                     // NAN where not evaluated
    double loss = NAN, mod[3] = {NAN, NAN, NAN};     // expert choice (EC) routing
    double causal = NAN, cmod[3] = {NAN, NAN, NAN};  // the auxiliary routers (= EC without experts)
};

static void print_val(const Run& r, long long step, const ValLoss& v) {
    printf("val  %5lld | loss %.4f | text %.3f image %.3f speech %.3f\n", step, v.loss, v.mod[0], v.mod[1], v.mod[2]);
    if (mot_has_experts(r.a.cfg))
        printf("val  %5lld | causal routing: loss %.4f | text %.3f image %.3f speech %.3f\n", step, v.causal, v.cmod[0],
               v.cmod[1], v.cmod[2]);
}

// --eval-only (e.g. with --init-from): the model as it is, no training step.
static int eval_only(Run* r) {
    const Args& a = r->a;
    ValLoss v;
    if (!a.val.empty()) {
        evaluate_both(&r->eng, a.val, a, &v.loss, v.mod, &v.causal, v.cmod);
        print_val(*r, (long long)r->st.step, v);
    }
    if (r->downstream())
        print_downstream(eval_downstream(&r->model, &r->dd, a.eval_items, a.eval_gen, a.seed, r->dec), (int)r->st.step);
    return 0;
}

// Validation loss and the downstream evaluation after `step` steps (generation only at the last).
static ValLoss evaluate_at(Run* r, int step, bool last) {
    const Args& a = r->a;
    ValLoss v;
    if (!a.val.empty()) evaluate_both(&r->eng, a.val, a, &v.loss, v.mod, &v.causal, v.cmod);
    if (r->downstream() && a.eval_items > 0) {
        r->eng.to_host();
        Downstream d = eval_downstream(&r->model, &r->dd, a.eval_items, last ? a.eval_gen : 0, a.seed, r->dec);
        print_downstream(d, step);
        if (r->evalf) {
            fprintf(r->evalf, "%d,%.4f,%.4f,%.4f,%.4f,%.4f,%.4f\n", step, d.img2cap, d.sp2cap, d.cap2img, d.knn_ceiling,
                    d.img2cap_gen, d.sp2cap_gen);
            fflush(r->evalf);
        }
    }
    return v;
}

// --debug-state FILE: the first batch of the run, computed by the CPU reference.
static void write_debug_state(Run* r, MotBatch* batch) {
    std::string err;
    const uint64_t rng = r->loader.rng;  // peek: the run still starts with this batch
    mot_loader_next(&r->loader, r->a.cfg, r->a.batch, r->a.seq, batch);
    r->loader.rng = rng;
    const Fp32Scope fp32(&r->model);  // the fp32 reference, in every mode (as a GPU run writes it)
    mot_zero_grad(&r->model);
    mot_forward(&r->model, *batch);
    mot_backward(&r->model, *batch);
    if (!mot_write_debug_state(r->a.debug_state, mot_debug_capture(r->model, *batch), &err)) die(err);
    printf("wrote debug state %s\n", r->a.debug_state.c_str());
}

// ---- one training step ----
struct StepLoss {
    double loss = 0, lmod[3] = {0, 0, 0}, aux = 0, agree = 0;  // means over the micro-batches (and ranks)
    int nmod[3] = {0, 0, 0};                                   // targets per modality
    double lr = 0, norm = 0, seconds = 0;
};

// The losses printed and logged: the mean over all ranks (one rank: as they are).
static void mean_over_ranks(StepLoss* s) {
#ifdef MOT_MPI
    s->loss = mot_gpu_dp_mean(s->loss);
    s->aux = mot_gpu_dp_mean(s->aux);
    s->agree = mot_gpu_dp_mean(s->agree);
    MPI_Allreduce(MPI_IN_PLACE, s->lmod, 3, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, s->nmod, 3, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
#else
    (void)s;
#endif
}

// --accum micro-batches forward and backward, then AdamW. Rank r takes the r-th of every `world`
// batches; the others are read past (`other`), so every rank's loader stays at the same place.
static StepLoss train_step(Run* r, int step, MotBatch* batch, MotBatch* other) {
    const Args& a = r->a;
    Engine& eng = r->eng;
    const double t0 = now_s();
    StepLoss s;
    for (int micro = 0; micro < a.accum; micro++) {
        for (int k = 0; k < r->world; k++)
            mot_loader_next(&r->loader, a.cfg, a.batch, a.seq, k == r->rank ? batch : other);
        eng.forward(*batch);
        eng.backward(*batch, micro > 0);
        s.loss += eng.loss / a.accum;
        s.aux += eng.aux_loss / a.accum;
        s.agree += eng.aux_agree / a.accum;
        for (int md = 0; md < 3; md++) {
            s.lmod[md] += eng.loss_mod[md] * eng.n_mod[md];
            s.nmod[md] += eng.n_mod[md];
        }
    }
    mean_over_ranks(&s);
    if (!std::isfinite(s.loss))
        die("loss is " + std::to_string(s.loss) + " at step " + std::to_string(step + 1) +
            ": stopping (the last saved checkpoint is kept)");
    s.lr = mot_lr_at(a.opt, step);
    s.norm = eng.update(a.opt, step, a.accum);
    s.seconds = now_s() - t0;
    return s;
}

// ETA: a moving average of the last steps' time (the first few are slow: caches, page faults),
// plus the evaluations still to come at their measured cost, plus the final generation
// (caption -> image eval and samples) priced at the measured time per decode step.
struct Eta {
    int first_step = 0;
    std::vector<double> recent;  // training seconds of recent steps
    double eval_seconds = 0;
    int evals_done = 0;
    static const size_t WINDOW = 50;
    static const int SKIP = 3;

    void add_step(int step, double seconds) {
        if (step - first_step < SKIP) return;
        recent.push_back(seconds);
        if (recent.size() > WINDOW) recent.erase(recent.begin());
    }
    void add_eval(double seconds) {
        eval_seconds += seconds;
        evals_done++;
    }
    std::string text(const Run& r, int step_done) const {
        const Args& a = r.a;
        if (recent.empty()) return "?";
        double mean = 0;
        for (double x : recent) mean += x;
        mean /= recent.size();
        const int left = a.opt.steps - step_done;
        double t = mean * left;
        const bool evals = !a.val.empty() || (r.downstream() && a.eval_items > 0);
        if (!evals || left == 0) return human_secs(t);
        if (!evals_done) return ">" + human_secs(t);  // not measured yet
        const int n_eval = (a.eval_every ? a.opt.steps / a.eval_every - step_done / a.eval_every : 0) +
                           (a.eval_every == 0 || a.opt.steps % a.eval_every != 0);  // the final one
        t += n_eval * eval_seconds / evals_done;
        if (r.have_tok && !a.out.empty() && g_gen_steps > 0) {
            const double per_step = g_gen_seconds / g_gen_steps;  // thread-seconds per decode step
            const double guided = a.cfg_image != 1.0 ? 2.0 : 1.0;
            const double img_steps = (vq_tokens(r.dd.vq) + 8) * guided;
            const double C = (double)r.dd.class_caption.size();
            int threads = 1;
#ifdef _OPENMP
            threads = omp_get_max_threads();
#endif
            t += per_step * a.best_of * (C * a.eval_gen * img_steps / threads + C * img_steps) +
                 per_step * 300;  // + speech, text
        }
        return human_secs(t);
    }
};

static void print_step(const Run& r, int step, const StepLoss& s, const ValLoss& v, const Eta& eta) {
    const Args& a = r.a;
    char mods[192] = "", *p = mods;
    for (int md = 0; md < 3; md++)
        p += s.nmod[md] ? snprintf(p, 40, " %s %.3f", MOT_MOD_NAME[md], s.lmod[md] / s.nmod[md])
                        : snprintf(p, 40, " %s -", MOT_MOD_NAME[md]);
    if (mot_has_experts(a.cfg)) snprintf(p, 60, " | aux %.3f agree %.2f", s.aux, s.agree);
    const double tokens = (double)a.batch * a.seq * a.accum * r.world;
    printf("step %5d/%d | loss %.4f |%s | lr %.2e | norm %.3f | %.0f tok/s | %.2f s | eta %s\n", step, a.opt.steps,
           s.loss, mods, s.lr, s.norm, tokens / s.seconds, s.seconds, eta.text(r, step).c_str());
    if (!std::isnan(v.loss)) print_val(r, step, v);
}

static void log_step(const Run& r, int step, const StepLoss& s, const ValLoss& v) {
    const Args& a = r.a;
    const bool experts = mot_has_experts(a.cfg);
    const double tokens = (double)a.batch * a.seq * a.accum * r.world;
    FILE* f = r.logf;
    fprintf(f, "%d,%.17g", step, s.loss);  // exact: resumed runs are compared bit for bit
    for (int md = 0; md < 3; md++) fprintf(f, ",%.6f", s.nmod[md] ? s.lmod[md] / s.nmod[md] : NAN);
    fprintf(f, ",%.6e,%.6f,%.1f,%.6f,%.6f,%.6f,%.6f", s.lr, s.norm, tokens / s.seconds, v.loss, v.mod[0], v.mod[1],
            v.mod[2]);
    fprintf(f, ",%.6f,%.6f,%.6f,%.6f,%.6f,%.6f\n", v.causal, v.cmod[0], v.cmod[1], v.cmod[2], experts ? s.aux : NAN,
            experts ? s.agree : NAN);
    fflush(f);
}

// After the last step: the final checkpoint, the logs closed, samples into the run folder.
static void finish(Run* r) {
    const Args& a = r->a;
    r->eng.to_host();
    if (!a.save.empty()) save_checkpoint(r, a.save, std::max<int64_t>(r->st.step, a.opt.steps));
    if (r->logf) fclose(r->logf);
    if (r->evalf) fclose(r->evalf);
    if (r->have_tok && !a.out.empty()) write_samples(&r->model, &r->dd, a.out, a.seed, r->dec);
    stop_data_parallel(r->eng.gpu_active());
}

int main(int argc, char** argv) {
    setvbuf(stdout, nullptr, _IOLBF, 0);
    // Any allocation that fails ends the program with one line, not std::bad_alloc's abort.
    std::set_new_handler([] { die("out of memory (an allocation failed; try a smaller model, batch or input)"); });
    if (argc > 1 && std::string(argv[1]) == "sample") return sample_main(argc, argv);
    Run r;
    r.a = parse_args(argc, argv);
    const Args& a = r.a;
    start_ranks(&argc, &argv, &r);
    set_threads(a.threads);
    prepare_run_folder(&r.a);
    open_data(&r);
    settle_config(&r);
    load_weights(&r);
    start_engine(&r);
    print_model_and_data(r);
    open_dataset(&r);
    print_threads();
    open_logs(&r);
    if (a.eval_only) return eval_only(&r);
    MotBatch batch, other_rank;
    if (!a.debug_state.empty()) write_debug_state(&r, &batch);
    if (a.save.empty() && a.log.empty() && r.rank == 0)
        printf(
            "note: no --out or --save given: nothing of this run is saved (--out DIR keeps the model, log and samples)\n");
    Eta eta;
    eta.first_step = (int)r.st.step;
    for (int step = (int)r.st.step; step < a.opt.steps; step++) {
        const StepLoss s = train_step(&r, step, &batch, &other_rank);
        eta.add_step(step, s.seconds);
        const bool last = step + 1 == a.opt.steps;
        ValLoss v;
        if ((a.eval_every && (step + 1) % a.eval_every == 0) || last) {
            const double t0 = now_s();
            v = evaluate_at(&r, step + 1, last);
            if (!last) eta.add_eval(now_s() - t0);
        }
        if ((step + 1) % a.log_every == 0 || last || step == (int)r.st.step) print_step(r, step + 1, s, v, eta);
        if (r.logf) log_step(r, step + 1, s, v);
        if (a.save_every && (step + 1) % a.save_every == 0) save_periodic(&r, step + 1);
    }
    finish(&r);
    return 0;
}
