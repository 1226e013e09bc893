// roofline.cpp — a MODEL of one training step of the GPU path (mot.cu) on a given GPU: every kernel
// and GEMM with its FLOPs, the bytes it must move to and from device memory, the bound, and the
// lower-bound time max(FLOPs / peak, bytes / bandwidth). No GPU is involved: these are not
// measurements (dev/bench_gpu measures). Bytes are compulsory traffic (each operand read once,
// each result written once; caches assumed perfect within a kernel), so times are lower bounds.
//
//   make dev/roofline (or make roofline, which runs it)
//   ./dev/roofline [--gpu h100|a100] [--dim D --layers L --heads H --ffn F --seq T --batch B
//                  --vocab V --accum A] [--experts E] [--fp32] [--design before|tc|current|target] [--kernels]
// Without shape flags it prints the two shapes of dev/RESULTS.md: D=512/L=8/T=512 and
// D=1024/L=24/T=2048.
//
// Designs.
//   `before`: mot.cu before the GPU-speed issue: bf16 GEMM operands on tensor cores with fp32
//     outputs, fp32 activations, attention on fp32 CUDA cores.
//   `tc`: the same with attention on tensor cores in bf16 mode at head dims 64 and 128
//     (mot_attn_tc_*: fp32 q/k/v/dO rounded to bf16 as they are read, fp32 accumulation; the
//     backward is a dK/dV pass and a separate dQ pass that recomputes S and dP, 14 Dh FLOPs per
//     pair instead of 10, because mot.cu uses no atomics). mot.cu until bf16 activations.
//   `current`: mot.cu as it is: `tc` plus, in bf16 mode, bf16 activations: the GEMMs whose
//     consumers only need bf16 write bf16 (q, k, v, a, u1, u3, y2, du, dO), QK-norm + RoPE writes
//     bf16 qr, kr, attention reads bf16 and writes bf16 o, dq, dk, SwiGLU reads and writes bf16;
//     the residual stream and its gradient stay fp32 (the norm kernel is the residual add; the
//     backward adds into the residual gradient in place, with no copies). A step's first
//     micro-batch writes the weight gradients with beta 0 (mot_gpu_backward(g, false)): no memset
//     of them and no read of C in those GEMMs; only the gradients they do not write (embedding,
//     gains, routers) are zeroed.
//   `target`: `current` plus what is planned and NOT implemented: SwiGLU in the W1/W3 GEMM
//     epilogue (a custom GEMM: cuBLASLt has no gated epilogue), a one-pass attention backward
//     (10 Dh FLOPs per pair), the RMSNorm backward fused with its gain-gradient partial sums.
// Byte counts are per kernel of mot.cu: each array a kernel reads or writes, once, in the
// precision it is stored in (fp32 4, bf16 2), and a GEMM with beta = 1 also reads C. Checked
// against the bytes each launch really moves, as the CUDA-on-CPU layer counts them, family by
// family (test_gpu_cpu, "dev/roofline's bytes"): GEMMs to the byte, the rest within 12%.
//
// Experts (--experts E, default 4; 1 leaves them out): a third model, dense with E experts per
// layer (MoE-Ex, expert choice, capacity factor 1: the FFN GEMMs keep their FLOPs but read E weight
// copies), adds the routing kernels of mot.cu: fp32 router and aux-router GEMMs, softmax and aux
// BCE, the radix select (E blocks of 256 threads, 9 passes over the scores: on a real GPU it is
// latency bound, far from this bandwidth bound), gathers, the gated sum and their backward.
//
// Peaks (dense, no sparsity), from NVIDIA's datasheets:
//   H100 SXM5 80GB: bf16 tensor 989.4 TFLOP/s, fp32 CUDA cores 66.9 TFLOP/s, HBM3 3.35 TB/s
//     (NVIDIA H100 Tensor Core GPU datasheet, 2023)
//   A100 SXM4 80GB: bf16 tensor 312 TFLOP/s, fp32 CUDA cores 19.5 TFLOP/s, HBM2e 2.039 TB/s
//     (NVIDIA A100 Tensor Core GPU datasheet, 2021)
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

struct Gpu {
    const char* name;
    double tensor, fp32, bw;  // FLOP/s, FLOP/s, bytes/s
};
static const Gpu H100{"H100 SXM5 80GB", 989.4e12, 66.9e12, 3.35e12};
static const Gpu A100{"A100 SXM4 80GB", 312e12, 19.5e12, 2.039e12};

struct Shape {
    long D, L, H, F, T, B, V, A;  // A: micro-batches per optimizer step
};
enum OpKind { KERNEL, GEMM, MEMSET };  // test_gpu_cpu checks the bytes of each kind against the CPU layer's counts
struct Op {
    std::string family, name;
    double flops, bytes;
    bool tensor;   // on tensor cores (else fp32 CUDA cores)
    double count;  // launches of this op per micro-batch (or per optimizer step for AdamW)
    int kind = KERNEL;
};

enum Design { BEFORE, TC, CURRENT, TARGET };
static const char* design_name(int d) {
    return d == BEFORE    ? "before (fp32 attention)"
           : d == TC      ? "tc (tensor-core attention, fp32 activations)"
           : d == CURRENT ? "current (mot.cu today)"
                          : "target (planned, not implemented)";
}

// One micro-batch's forward and backward, plus the optimizer step divided by A. Byte counts follow
// the kernels of mot.cu one by one (for `current`, the code as it is): every array a kernel reads
// or writes, once, in the precision it is stored in. A GEMM with beta = 1 reads its C as well.
static std::vector<Op> step_ops(const Shape& s, int towers, bool bf16, int design, int experts = 1) {
    std::vector<Op> ops;
    const double N = (double)s.B * s.T, D = s.D, F = s.F, V = s.V, L = s.L, H = s.H, Dh = D / H;
    const bool target = design == TARGET;
    // attention on tensor cores: mot_attn_tensor_cores's rule, everywhere in `target`
    const bool attn_tc = bf16 && design != BEFORE && (target || Dh == 64 || Dh == 128);
    const double eb = bf16 ? 2 : 4;                       // GEMM operands
    const double ab = bf16 && design >= CURRENT ? 2 : 4;  // activations between kernels (MotBuf)
    // o: an activation; before, fp32 (read by the delta kernel) plus the bf16 copy for the Wo GEMM
    const double o_read = design >= CURRENT ? ab : 4, o_write = design >= CURRENT ? ab : 4 + (bf16 ? 2 : 0);
    const double attn_bwd = target ? 10 : 14;  // FLOPs per (query, key) pair per Dh, backward
    const bool tc = bf16;                      // GEMMs on tensor cores only in bf16 mode (fp32: PEDANTIC)
    const double E = experts;
    // weight-gradient GEMMs read their fp32 C (beta 1) in every micro-batch, or (current, target:
    // beta 0 in a step's first micro-batch) in A - 1 of A
    const double dw_reads = design >= CURRENT ? (s.A - 1.0) / s.A : 1.0;
    // distinct tokens in a micro-batch, for uniform draws: the embedding rows read, and the rows of
    // its gradient added to
    const double U = V * (1 - std::exp(-N / V));
    // A GEMM M x N x K over `towers` row ranges: each tower's weight is read once; beta = 1 also
    // reads C (in its precision, out_b).
    auto gemm = [&](const char* fam, const std::string& name, double M, double Nn, double K, double wcopies,
                    double out_b, double cnt, bool beta1 = false) {
        ops.push_back({fam, name, 2 * M * Nn * K, M * K * eb + wcopies * K * Nn * eb + M * Nn * out_b * (beta1 ? 2 : 1),
                       tc, cnt, GEMM});
    };
    auto elem = [&](const char* fam, const char* name, double flops, double bytes, double cnt) {
        ops.push_back({fam, name, flops, bytes, false, cnt});
    };
    const double W = towers;                      // weight copies touched per projection (one per tower with rows)
    const double WF = experts > 1 ? experts : W;  // FFN weight copies: one per expert
    const double y2b = experts > 1 ? 4 : ab;      // y2 is fp32 with experts (the gated sum adds into it)
    // ---- forward, per layer
    gemm("gemm", "q, k, v projections", N, D, D, W, ab, 3 * L);
    elem("norm/rope", "QK-norm + RoPE (q, k)", 12 * N * D, N * D * 2 * ab + N * H * 4, 2 * L);
    const double pairs = s.B * H * (double)s.T * (s.T + 1) / 2;  // causal (query, key) pairs
    ops.push_back({"attention", attn_tc ? "flash attention forward (tensor cores)" : "attention forward (fp32 cores)",
                   4 * Dh * pairs, N * D * (3 * ab + o_write) + N * H * 4, attn_tc, L});
    gemm("gemm", "output projection Wo", N, D, D, W, ab, L);
    // the residual add is the norm kernel: reads the sublayer output and the fp32 stream, writes
    // the stream and its bf16 copy
    elem("norm/rope", "RMSNorm + residual (attention)", 6 * N * D, N * D * (ab + 4 + 4 + (bf16 ? 2 : 0)) + N * 4, L);
    if (target) {
        gemm("gemm", "W1, W3 (SwiGLU in the epilogue)", N, 2 * F, D, WF, 0, L);
        elem("swiglu", "SwiGLU output (epilogue write)", 6 * N * F, N * F * (eb + 2 * ab), L);  // u; u1, u3 kept
    } else {
        gemm("gemm", "W1, W3", N, F, D, WF, ab, 2 * L);
        elem("swiglu", "SwiGLU", 6 * N * F, N * F * (2 * ab + eb), L);
    }
    gemm("gemm", "W2", N, D, F, WF, experts > 1 ? 4 : ab, L);
    auto fp32_gemm = [&](const char* name, double flops, double bytes, double cnt) {
        ops.push_back({"routing", name, flops, bytes, false, cnt, GEMM});  // fp32 operands, PEDANTIC: CUDA cores
    };
    if (experts > 1) {  // forward routing, per layer
        fp32_gemm("router + aux-router logits (fp32)", 4 * N * D * E, N * D * 4 + 2 * D * E * 4 + 2 * N * E * 4, L);
        elem("routing", "softmax, aux sigmoid + BCE, reduce", 12 * N * E, 5 * N * E * 4 + N * 8, L);
        elem("routing", "expert choice (radix select, E blocks)", 20 * 9 * N * E, 9 * N * E * 4 + N * E * 4 + N * 4, L);
        elem("routing", "gather rows into expert slots", 0, N * D * 2 * eb + N * 4, L);
        elem("routing", "gated sum in expert order", 2 * N * D, 2 * N * D * 4 + 2 * N * E * 4, L);
    }
    elem("norm/rope", "RMSNorm + residual (FFN)", 6 * N * D, N * D * (y2b + 4 + 4 + (bf16 ? 2 : 0)) + N * 4, L);
    // ---- head: forward, then recomputed in the backward
    elem("norm/rope", "final RMSNorm", 4 * N * D, N * D * (4 + eb) + N * 4, 1);
    gemm("head", "output head (forward)", N, V, D, 1, 4, 1);
    elem("head", "cross-entropy forward", 4 * N * V, N * V * 4, 1);
    gemm("head", "output head (recomputed)", N, V, D, 1, 4, 1);
    elem("head", "cross-entropy backward", 3 * N * V, N * V * (4 + eb), 1);
    gemm("head", "dz = dlogits W_head^T", N, D, V, 1, 4, 1);
    // reads z and dlogits; beta 0 in a step's first micro-batch (the first chunk of the head's; a
    // chunked head's later chunks read the gradient again, not counted)
    ops.push_back(
        {"head", "dW_head += z^T dlogits", 2 * D * V * N, N * (D + V) * eb + D * V * 4 * (1 + dw_reads), tc, 1, GEMM});
    elem("norm/rope", "final RMSNorm backward + gain partials", 10 * N * D, N * D * (4 + 4 + 4 + 4 + 4), 1);
    // ---- backward, per layer: each projection y = x W gives dx = dy W^T (into an activation, or
    // added to the fp32 residual gradient: beta 1) and dW += x^T dy (fp32, beta 1)
    auto gemm_bwd = [&](const char* name, double in, double out, double cnt, double wc, double dx_b, bool dx_acc) {
        gemm("gemm", std::string(name) + " dx", N, in, out, wc, dx_b, cnt, dx_acc);
        // dW: reads x and dy (each row once, whichever copy it belongs to), writes each copy's fp32
        // gradient (and reads it when beta = 1)
        ops.push_back({"gemm", std::string(name) + " dW", 2 * in * out * N,
                       N * (in + out) * eb + wc * in * out * 4 * (1 + dw_reads), tc, cnt, GEMM});
    };
    // RMSNorm backward (one pass: dy fp32, x, writes dx as a GEMM operand) and the gain-gradient
    // partial sums (a second pass over dy and x), fused into one pass in the target
    auto norm_bwd = [&](const char* name, double xb, double cnt) {
        elem("norm/rope", name, 10 * N * D, N * D * (4 + xb + eb + (target ? 0 : 4 + xb)) + N * 4, cnt);
    };
    norm_bwd(target ? "RMSNorm backward + gain partials, one pass (FFN)" : "RMSNorm backward + gain partials (FFN)",
             y2b, L);
    if (experts > 1) {  // backward routing, per layer
        elem("routing", "gate backward (ds = dt . ye, dye = s dt)", 4 * N * D, N * D * (4 + 4 + eb) + N * E * 4, L);
        elem("routing", "gather rows again (backward)", 0, N * D * 2 * eb + N * 4, L);
        elem("routing", "scatter-add dX in expert order", N * D, 3 * N * D * 4 + N * E * 4, L);
        elem("routing", "softmax backward + aux gradient", 10 * N * E, 6 * N * E * 4, L);
        fp32_gemm("router GEMMs backward (dWr, dh, dU; fp32)", 6 * N * D * E,
                  4 * N * D * 4 + 2 * N * E * 4 + 4 * D * E * 4, L);
    }
    gemm_bwd("W2", F, D, L, WF, ab, false);
    elem("swiglu", "SwiGLU backward", 10 * N * F, N * F * (3 * ab + 2 * eb), L);
    if (design <= TC) elem("copies", "residual gradient copy (dh = dx)", 0, 2 * N * D * 4, L);
    gemm_bwd("W1, W3", D, F, 2 * L, WF, 4, true);
    norm_bwd(target ? "RMSNorm backward + gain partials, one pass (attention)"
                    : "RMSNorm backward + gain partials (attention)",
             ab, L);
    gemm_bwd("Wo", D, D, L, W, ab, false);
    elem("attention", "delta = rowsum(dO o)", 2 * N * D, N * D * (ab + o_read) + N * H * 4, L);
    // attention backward: 14 Dh FLOPs per pair (s, dp, dV, dK in the dK/dV pass; s, dp, dQ in the
    // dQ pass, each pass reading q, k, v, dO), 10 in the target (one pass, S and dP computed once)
    {
        const double reads = (target ? 1 : 2) * 4 * ab, writes = 2 * ab + eb;  // dq, dk; dv (a GEMM operand)
        ops.push_back(
            {"attention", attn_tc ? "flash attention backward (tensor cores)" : "attention backward (fp32 cores)",
             attn_bwd * Dh * pairs, N * D * (reads + writes) + s.B * H * s.T * 8 * (target ? 1 : 2), attn_tc, L});
    }
    if (design <= TC) elem("copies", "residual gradient copy (dx = dh)", 0, 2 * N * D * 4, L);
    // reads dq and q, writes dyun and the GEMM operand; the gain partials read dyun and q again
    elem("norm/rope", "QK-norm + RoPE backward + gain partials (q, k)", 20 * N * D,
         N * D * (ab + ab + ab + eb + 2 * ab) + N * H * 4, 2 * L);
    gemm_bwd("q, k, v", D, D, 3 * L, W, 4, true);
    // forward: U table rows in, x (fp32 and its bf16 copy) out; backward: dx in, U gradient rows
    // read and written, and the token/row index lists
    elem("embedding", "embedding gather and gradient", N * D,
         U * D * 4 * 3 + N * D * (4 + (bf16 ? 2 : 0) + 4) + 4 * (2 * N + 3 * U), 1);
    // ---- optimizer: once per A micro-batches
    const double P = towers * L * (4 * D * D + 2 * Dh + 2 * D) + WF * L * 3 * D * F +
                     (experts > 1 ? 2 * E * D * L : 0) + 2 * V * D + D;
    // zeroing: every gradient before (memset), or only those the beta-0 GEMMs do not write: the
    // embedding, gains and routers (the head's dW is written by the first chunk's GEMM)
    const double P_zero =
        design >= CURRENT ? V * D + towers * L * (2 * Dh + 2 * D) + D + (experts > 1 ? 2 * E * D * L : 0) : P;
    ops.push_back({"adamw", design >= CURRENT ? "zero unwritten grads (memsets)" : "zero grad (memset)", 0, P_zero * 4,
                   false, 1.0 / s.A, MEMSET});
    elem("adamw", "gradient norm + AdamW", 12 * P, P * (4 + 4 * 7 + (bf16 ? 2 : 0)), 1.0 / s.A);
    return ops;
}

struct Totals {
    double time = 0, flops = 0, model_flops = 0;
    std::map<std::string, double> family_time;
    // per layer, in bytes per (token x d_model) element: the kernels other than GEMMs (and their
    // launches), and the GEMMs
    double layer_other = 0, layer_launches = 0, layer_gemm = 0;
};
static Totals sum(const std::vector<Op>& ops, const Gpu& g, const Shape& s, bool print) {
    Totals t;
    if (print)
        printf("  %-44s %8s %10s %10s %7s %10s\n", "kernel / GEMM (per micro-batch)", "launches", "GFLOP", "MB",
               "bound", "us (lower)");
    for (const Op& o : ops) {
        const double peak = o.tensor ? g.tensor : g.fp32;
        const double tc = o.flops / peak, tm = o.bytes / g.bw, tt = std::max(tc, tm) * o.count;
        t.time += tt;
        t.flops += o.flops * o.count;
        t.family_time[o.family] += tt;
        if (o.count >= s.L) {  // per-layer work (counted once per layer or more)
            const double per = o.bytes * o.count / s.L / ((double)s.B * s.T * s.D);
            if (o.family == "gemm") t.layer_gemm += per;
            else {
                t.layer_other += per;
                t.layer_launches += o.count / s.L;
            }
        }
        if (print)
            printf("  %-44s %8.2f %10.2f %10.1f %7s %10.1f\n", o.name.c_str(), o.count, o.flops * o.count / 1e9,
                   o.bytes * o.count / 1e6, tc >= tm ? (o.tensor ? "tensor" : "fp32") : "memory", tt * 1e6);
    }
    const double N = (double)s.B * s.T, D = s.D, F = s.F, V = s.V, L = s.L;
    t.model_flops = N * (6 * (L * (4 * D * D + 3 * D * F) + D * V) + 6 * L * D * s.T);  // as dev/bench_gpu
    return t;
}

static void report(const Gpu& g, const Shape& s, bool bf16, int design, bool kernels, int experts) {
    printf(
        "MODEL (not a measurement): %s, D=%ld L=%ld H=%ld F=%ld T=%ld B=%ld V=%ld, %ld micro-batch(es) per "
        "AdamW step, %s, design %s\n",
        g.name, s.D, s.L, s.H, s.F, s.T, s.B, s.V, s.A, bf16 ? "bf16 GEMMs" : "fp32", design_name(design));
    const int models = experts > 1 ? 3 : 2;
    char moe[32];
    snprintf(moe, sizeof moe, "MoE-%dx", experts);
    Totals tot[3];
    for (int k = 0; k < models; k++) {
        const int towers = k == 0 ? 3 : 1;
        std::vector<Op> ops = step_ops(s, towers, bf16, design, k == 2 ? experts : 1);
        if (kernels) printf(" %s\n", k == 0 ? "MoT (3 towers)" : k == 1 ? "dense" : moe);
        tot[k] = sum(ops, g, s, kernels);
    }
    for (int k = 0; k < models; k++) {
        const Totals& t = tot[k];
        printf("  %-6s lower-bound time per micro-batch %8.2f ms | hardware %7.1f TFLOP | MFU ceiling %5.1f%% |",
               k == 0   ? "MoT"
               : k == 1 ? "dense"
                        : moe,
               t.time * 1e3, t.flops / 1e12, 100 * t.model_flops / (t.time * g.tensor));
        for (const auto& f : t.family_time) printf(" %s %.0f%%", f.first.c_str(), 100 * f.second / t.time);
        printf("\n");
    }
    printf(
        "  per layer (dense): the kernels other than GEMMs (norms, RoPE, SwiGLU, attention, copies) move %.0f "
        "bytes per token x d_model element in %.0f passes (lines above), the GEMMs %.0f\n",
        tot[1].layer_other, tot[1].layer_launches, tot[1].layer_gemm);
    printf("  MoT / dense time ratio: %.3f", tot[0].time / tot[1].time);
    if (models == 3) printf(" | %s / dense: %.3f", moe, tot[2].time / tot[1].time);
    printf("\n\n");
}

#ifndef ROOFLINE_NO_MAIN  // test/test_gpu.cu includes this file for step_ops
int main(int argc, char** argv) {
    Gpu g = H100;
    bool bf16 = true, kernels = false, custom = false;
    int experts = 4;
    int design = -1;  // -1: all three
    Shape s{512, 8, 8, 1536, 512, 32, 2824, 1};
    auto num = [&](int& i, const char* f) {
        if (i + 1 >= argc) {
            fprintf(stderr, "roofline: %s needs a value\n", f);
            exit(2);
        }
        char* end;
        const long v = strtol(argv[++i], &end, 10);
        if (*end || v < 1 || v > (1L << 24)) {
            fprintf(stderr, "roofline: %s: expected an integer in [1, 16777216]\n", f);
            exit(2);
        }
        custom = true;
        return v;
    };
    for (int i = 1; i < argc; i++) {
        const std::string f = argv[i];
        if (f == "--gpu" && i + 1 < argc) {
            const std::string n = argv[++i];
            if (n == "h100") g = H100;
            else if (n == "a100") g = A100;
            else {
                fprintf(stderr, "roofline: --gpu: expected h100 or a100, got '%s'\n", n.c_str());
                return 2;
            }
        } else if (f == "--dim") s.D = num(i, "--dim");
        else if (f == "--layers") s.L = num(i, "--layers");
        else if (f == "--heads") s.H = num(i, "--heads");
        else if (f == "--ffn") s.F = num(i, "--ffn");
        else if (f == "--seq") s.T = num(i, "--seq");
        else if (f == "--batch") s.B = num(i, "--batch");
        else if (f == "--vocab") s.V = num(i, "--vocab");
        else if (f == "--accum") s.A = num(i, "--accum");
        else if (f == "--experts") {
            if (i + 1 >= argc) {
                fprintf(stderr, "roofline: --experts needs a value\n");
                return 2;
            }
            char* end;
            const long v = strtol(argv[++i], &end, 10);
            if (*end || v < 1 || v > 64) {
                fprintf(stderr, "roofline: --experts: expected an integer in [1, 64]\n");
                return 2;
            }
            experts = (int)v;
        } else if (f == "--fp32") bf16 = false;
        else if (f == "--kernels") kernels = true;
        else if (f == "--design" && i + 1 < argc) {
            const std::string d = argv[++i];
            if (d == "before") design = BEFORE;
            else if (d == "tc") design = TC;
            else if (d == "current") design = CURRENT;
            else if (d == "target") design = TARGET;
            else {
                fprintf(stderr, "roofline: --design: expected before, tc, current or target, got '%s'\n", d.c_str());
                return 2;
            }
        } else {
            fprintf(stderr,
                    "usage: roofline [--gpu h100|a100] [--dim D --layers L --heads H --ffn F --seq T --batch B "
                    "--vocab V --accum A] [--experts E] [--fp32] [--design before|tc|current|target] [--kernels]\n");
            return 2;
        }
    }
    if (s.D % s.H) {
        fprintf(stderr, "roofline: --dim %ld is not a multiple of --heads %ld\n", s.D, s.H);
        return 2;
    }
    std::vector<Shape> shapes;
    if (custom) shapes.push_back(s);
    else {
        shapes.push_back({512, 8, 8, 1536, 512, 32, 2824, 1});     // 16k tokens per step
        shapes.push_back({1024, 24, 16, 3072, 2048, 8, 2824, 4});  // 16k tokens per micro-batch, 64k per step
    }
    for (const Shape& sh : shapes)
        for (int d = BEFORE; d <= TARGET; d++)
            if (design < 0 || design == d) report(g, sh, bf16, d, kernels, experts);
    return 0;
}
#endif
