// bench_gpu.cu — GPU training-step benchmark: tokens/s, MFU, device memory, MoT/dense step-time
// ratio and attention TFLOP/s, for D=512/L=8/H=8/T=512 and D=1024/L=24/H=16/T=2048 (the two
// shapes of dev/roofline; F = 3D, the default data's vocabulary V = 2824: text [0,2056), image
// [2056,2568), speech [2568,2824)).
//
//   make dev/bench_gpu (or make bench-gpu, which runs it)
//   ./dev/bench_gpu [--steps N] [--batch-small B] [--batch-large B] [--fp32] [--only small|large]
//
// One step = zero_grad + forward (incl. loss read) + backward + AdamW (incl. norm read), timed
// with CUDA events after 2 warm-up steps; the median over --steps is reported.
//
// MFU = model FLOPs per step / (step time * 989e12), 989 TFLOP/s = H100 SXM dense bf16 peak:
//   model FLOPs per step = tokens * (6 * N_active + 6 * L * D * T)
//   N_active = L * (4 D^2 + 3 D F) + D * V   (the weights ONE token multiplies: one tower per
//              layer, so MoT and dense have the same N_active; the embedding is a gather)
//   6 * L * D * T = causal attention, fwd + bwd (QK^T and PV: 2 * 2 * D * T/2 per token and
//              layer forward, times 3 for forward + backward).
// The output head's recomputation in the backward and the attention recomputation are not
// counted (hardware FLOPs are higher than model FLOPs).
// Attention: layer 0's attention forward, the delta kernel and the backward alone (the kernels
// mot_attn_tensor_cores picks), on the last batch's q, k, v, dO, timed with CUDA events (median
// of 10 after 2 warm-up). TFLOP/s are given two ways: model FLOPs, 12 Dh per causal (query, key)
// pair and head (forward QK^T and PV: 4 Dh; backward: 8 Dh; the count MFU uses), and executed
// FLOPs, 18 Dh (the backward recomputes S and dP in its dQ pass: 14 Dh).
// Memory: bytes the model allocated (MotGpu::bytes) and the device memory in use after the
// steps (cudaMemGetInfo: total - free; includes the CUDA context and cuBLAS). All buffers are
// allocated at init, so the latter is the high-water mark of this process.
#include "mot.cu"

#include <chrono>

static __global__ void bench_init_kernel(float* w, size_t n, uint64_t seed, float std, int is_gain) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (is_gain) {
        w[i] = 1.0f;
        return;
    }
    // two hashed uniforms -> Box-Muller normal
    uint64_t z = seed + 0x9E3779B97F4A7C15ull * (i + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u1 = ((z >> 40) + 1) * (1.0f / 16777217.0f), u2 = ((z >> 16) & 0xFFFFFF) * (1.0f / 16777216.0f);
    w[i] = std * sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);
}

// Interleaved documents: runs of one modality, 1..400 tokens long, random ids in its range.
static MotBatch bench_batch(const MotConfig& c, int B, int T, uint64_t seed) {
    MotBatch b;
    b.B = B;
    b.T = T;
    std::vector<int> seq;
    for (int bi = 0; bi < B; bi++) {
        seq.clear();
        while ((int)seq.size() < T + 1) {
            const int m = (int)(mot_rand_u64(&seed) % 3), len = 1 + (int)(mot_rand_u64(&seed) % 400);
            const int lo = m == 0 ? 0 : m == 1 ? c.image_begin : c.speech_begin;
            const int hi = m == 0 ? c.image_begin : m == 1 ? c.speech_begin : c.vocab;
            for (int i = 0; i < len && (int)seq.size() < T + 1; i++)
                seq.push_back(lo + (int)(mot_rand_u64(&seed) % (hi - lo)));
        }
        for (int t = 0; t < T; t++) {
            b.tokens.push_back(seq[t]);
            b.targets.push_back(seq[t + 1]);
        }
    }
    mot_group(c, &b);
    return b;
}

struct BenchResult {
    double step_s = 0, tok_s = 0, mfu = 0, model_gb = 0, used_gb = 0, loss = 0, attn_s = 0, attn_pairs = 0;
    size_t params = 0;
};

// One layer's attention, forward + backward, as mot_gpu_forward/backward launch it; returns the
// median seconds. Uses layer 0's buffers of the last step (recomputing what they already hold).
static double bench_attention(MotGpu* g, int reps) {
    const int Dh = g->cfg.d_model / g->cfg.n_head;
    const MotBuf o = g->o;
    cudaEvent_t e0, e1;
    MOT_CUDA_CHECK(cudaEventCreate(&e0));
    MOT_CUDA_CHECK(cudaEventCreate(&e1));
    std::vector<double> t;
    for (int r = 0; r < reps + 2; r++) {
        MOT_CUDA_CHECK(cudaEventRecord(e0, g->stream));
        MOT_DH_SWITCH(Dh, (mot_attn_forward_dh<DHC>(g, o, g->lse, g->qr, g->kr, g->v)));
        mot_gpu_attn_delta(g, g->dO, o);
        MOT_DH_SWITCH(Dh, (mot_attn_backward_dh<DHC>(g, g->dq, g->dk, g->dv, g->dO, g->lse, g->qr, g->kr, g->v)));
        MOT_CUDA_CHECK(cudaEventRecord(e1, g->stream));
        MOT_CUDA_CHECK(cudaEventSynchronize(e1));
        float ms = 0;
        MOT_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
        if (r >= 2) t.push_back(ms / 1e3);
    }
    MOT_CUDA_CHECK(cudaEventDestroy(e0));
    MOT_CUDA_CHECK(cudaEventDestroy(e1));
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

static BenchResult bench_one(const MotConfig& c, int B, int T, bool bf16, int steps) {
    BenchResult r;
    MotGpu g;
    std::string err;
    if (!mot_gpu_init(&g, c, B, T, bf16, &err)) {
        fprintf(stderr, "error: %s\n", err.c_str());
        exit(1);
    }
    for (int p = 0; p < P_COUNT; p++) {
        const MotParamInfo& info = g.tab.p[p];
        bench_init_kernel<<<mot_blocks(info.size(), 256), 256, 0, g.stream>>>(g.params + info.offset, info.size(),
                                                                              1234 + p, 0.02f, info.decay ? 0 : 1);
        MOT_LAUNCH_CHECK();
    }
    if (g.bf16) {
        mot_to_bf16_kernel<<<mot_blocks(g.tab.total, 256), 256, 0, g.stream>>>(g.params_bf, g.params, g.tab.total);
        MOT_LAUNCH_CHECK();
    }
    MOT_CUDA_CHECK(cudaStreamSynchronize(g.stream));
    MotOptim o;
    o.lr = 1e-3;
    o.warmup = 5;
    o.steps = steps + 2;
    std::vector<MotBatch> batches;
    for (int i = 0; i < 4; i++) batches.push_back(bench_batch(c, B, T, 77 + i));
    cudaEvent_t e0, e1;
    MOT_CUDA_CHECK(cudaEventCreate(&e0));
    MOT_CUDA_CHECK(cudaEventCreate(&e1));
    std::vector<double> times;
    for (int s = 0; s < steps + 2; s++) {
        MOT_CUDA_CHECK(cudaEventRecord(e0, g.stream));
        r.loss = mot_gpu_forward(&g, batches[s % batches.size()]);
        mot_gpu_backward(&g, false);  // as the trainer: the GEMMs write the weight gradients
        mot_gpu_adamw_step(&g, o, s, 1.0);
        MOT_CUDA_CHECK(cudaEventRecord(e1, g.stream));
        MOT_CUDA_CHECK(cudaEventSynchronize(e1));
        float ms = 0;
        MOT_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
        if (s >= 2) times.push_back(ms / 1e3);
    }
    std::sort(times.begin(), times.end());
    r.step_s = times[times.size() / 2];
    const double tokens = (double)B * T, D = c.d_model, F = c.d_ff, V = c.vocab, L = c.n_layer;
    const double n_active = L * (4 * D * D + 3 * D * F) + D * V;
    const double flops = tokens * (6 * n_active + 6 * L * D * T);
    r.tok_s = tokens / r.step_s;
    r.mfu = flops / (r.step_s * 989e12);
    size_t fr = 0, tot = 0;
    MOT_CUDA_CHECK(cudaMemGetInfo(&fr, &tot));
    r.used_gb = (tot - fr) / 1e9;
    r.model_gb = g.bytes / 1e9;
    r.params = g.tab.total;
    r.attn_s = bench_attention(&g, 10);
    r.attn_pairs = (double)B * c.n_head * T * (T + 1) / 2;
    MOT_CUDA_CHECK(cudaEventDestroy(e0));
    MOT_CUDA_CHECK(cudaEventDestroy(e1));
    mot_gpu_free(&g);
    return r;
}

int main(int argc, char** argv) {
    int steps = 10, b_small = 32, b_large = 4;
    bool bf16 = true;
    std::string only;
    for (int i = 1; i < argc; i++) {
        const std::string f = argv[i];
        if (f == "--steps" && i + 1 < argc) steps = atoi(argv[++i]);
        else if (f == "--batch-small" && i + 1 < argc) b_small = atoi(argv[++i]);
        else if (f == "--batch-large" && i + 1 < argc) b_large = atoi(argv[++i]);
        else if (f == "--fp32") bf16 = false;
        else if (f == "--only" && i + 1 < argc) only = argv[++i];
        else {
            fprintf(stderr,
                    "usage: bench_gpu [--steps N] [--batch-small B] [--batch-large B] [--fp32] [--only small|large]\n");
            return 2;
        }
    }
    if (steps < 1) steps = 1;
    std::string why;
    if (!mot_gpu_available(&why)) {
        printf("no GPU: %s; nothing to benchmark\n", why.c_str());
        return 0;
    }
    cudaDeviceProp prop;
    MOT_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s, %d SMs, %.1f GB; precision %s; median of %d steps after 2 warm-up\n", prop.name,
           prop.multiProcessorCount, prop.totalGlobalMem / 1e9, bf16 ? "bf16 GEMMs (fp32 master)" : "fp32", steps);
    printf("MFU = tokens*(6*N_active + 6*L*D*T) / (step time * 989e12)\n\n");
    struct Shape {
        const char* name;
        int D, L, H, T, B;
    };
    const Shape shapes[] = {{"small", 512, 8, 8, 512, b_small}, {"large", 1024, 24, 16, 2048, b_large}};
    printf("%-6s %-5s %5s %3s %3s %5s %3s %9s %9s %11s %7s %8s %8s %8s %9s %11s\n", "shape", "model", "D", "L", "H",
           "T", "B", "params(M)", "step(ms)", "tokens/s", "MFU(%)", "model GB", "used GB", "loss", "attn(ms)",
           "attn TFLOP/s");
    for (const Shape& s : shapes) {
        if (!only.empty() && only != s.name) continue;
        printf("%-6s attention: %s\n", s.name, mot_attn_kernel_note(bf16, s.D / s.H).c_str());
        double t_step[2] = {0, 0};
        for (int towers : {3, 1}) {
            MotConfig c;
            c.n_layer = s.L;
            c.d_model = s.D;
            c.n_head = s.H;
            c.d_ff = 3 * s.D;
            c.vocab = 2824;
            c.image_begin = 2056;
            c.speech_begin = 2568;
            c.max_seq = s.T;
            c.n_tower = towers;
            const BenchResult r = bench_one(c, s.B, s.T, bf16, steps);
            t_step[towers == 3 ? 0 : 1] = r.step_s;
            const double dh = (double)s.D / s.H;  // attention TFLOP/s: model (12 Dh per pair) / executed (18 Dh)
            printf("%-6s %-5s %5d %3d %3d %5d %3d %9.1f %9.2f %11.0f %7.2f %8.2f %8.2f %8.4f %9.3f %5.1f / %5.1f\n",
                   s.name, towers == 3 ? "MoT" : "dense", s.D, s.L, s.H, s.T, s.B, r.params / 1e6, r.step_s * 1e3,
                   r.tok_s, 100 * r.mfu, r.model_gb, r.used_gb, r.loss, r.attn_s * 1e3,
                   12 * dh * r.attn_pairs / r.attn_s / 1e12, 18 * dh * r.attn_pairs / r.attn_s / 1e12);
        }
        printf("%-6s MoT/dense step-time ratio: %.3f\n", s.name, t_step[0] / t_step[1]);
    }
    return 0;
}
