// mot.cu — the GPU path of mot: the same model as the CPU reference in mot.h (same parameter
// table and layout, same math, same grouping of rows by modality), with hand-written CUDA kernels
// and cuBLAS GEMMs. One translation unit: a trainer or test compiled by nvcc does
// `#include "mot.cu"` (it includes mot.h) and links -lcublas.
//
// Layout of the file:
//   1. error checking, the MotGpu struct, small helpers
//   2. kernels, in the order of their CPU twins in mot.h (section 5, then 6):
//        kernels                                   CPU twin (mot.h)
//        mot_rmsnorm_{forward,backward}_kernel,    rmsnorm_forward, rmsnorm_backward
//          mot_gain_{partial,final}_kernel
//        mot_qknorm_rope_{forward,backward}_kernel rmsnorm_forward over heads + rope_apply
//        mot_attn_{forward,backward_dkv,           attention_forward, attention_backward
//          backward_dq,delta}_kernel; on tensor
//          cores mot_attn_tc_{forward,dkv,dq}_kernel
//        mot_swiglu_{forward,backward}_kernel      swiglu_forward, swiglu_backward
//        mot_router_softmax_kernel, mot_expert_*,  ffn_forward_experts, ffn_backward_experts,
//          mot_gather_rows_kernel, mot_aux_*,        mot_expert_choice, router_logits
//          mot_router_backward_kernel
//        mot_ce_{forward,backward}_kernel,         cross_entropy
//          mot_loss_reduce_kernel
//        mot_mse_kernel, mot_sum_kernel            diffusion_loss
//        mot_embed_{,backward_}kernel,             mot_forward's embedding gather and image
//          mot_sinusoid_kernel,                      input (mot_sinusoid), mot_backward's
//          mot_image_input_kernel,                   embedding and timestep gradients
//          mot_temb_backward_kernel
//        mot_sumsq_{partial,final}_kernel,         mot_grad_norm, mot_adamw_step
//          mot_adamw_kernel, mot_to_bf16_kernel
//      The linear layers (linear_forward, linear_backward on the CPU) are cuBLAS GEMMs: section 3.
//   3. GEMMs (cuBLAS, row-major wrapper) and per-tower linear layers
//   4. the public API: init/upload/download/forward/backward/zero_grad/adamw/logits/grads/free
//   5. data parallel over GPUs with NCCL (only with -DMOT_MPI)
//
// Precision. bf16 = false: everything fp32 (cuBLAS with CUBLAS_COMPUTE_32F_PEDANTIC, so no TF32),
// for tight comparisons with the CPU; the kernels are the same code as on plain float arrays
// (the ones that compute on activations are templates on the element type). bf16 = true rounds
// where mot.h's "bf16 mode" says (the one definition, which the CPU's --bf16 follows too). Here:
// the stored activations are MotBuf arrays in bf16, written so by the GEMMs (cuBLAS, fp32
// accumulation) and by the kernels (QK-norm + RoPE, attention, SwiGLU), which compute in fp32
// inside; the fp32 residual stream x, h has a bf16 copy (x_b, h_b) that the GEMMs read, z one
// too (z_b), and the backward's GEMM operands (gdy, gqk, du1, du3, dlogits) are bf16 arrays.
// Attention at head dims 64 and 128 runs on tensor cores (bf16 operands, fp32 accumulation and
// softmax; mot_attn_tensor_cores has the rule). The bf16 weight copy is refreshed by the AdamW
// kernel (and on upload).
//
// Determinism: no atomics anywhere. Every reduction (norm gains, embedding, loss, gradient norm)
// is summed in a fixed order that depends only on the shapes, so a run is bitwise reproducible
// on the same GPU model and software versions (cuBLAS is deterministic on one stream).
//
// No device-to-host synchronisation inside forward or backward: the grouping (order, row_of,
// group ranges), the embedding-gradient index lists, the target counts and the distinct diffusion
// steps are the batch's plan, computed on the host by mot.h's mot_plan (the one the CPU forward
// uses) and uploaded once per forward with the Transfusion patches and noise (mot_gpu_set_batch);
// the only reads back are the loss (end of
// forward) and the gradient norm (end of the AdamW step). Experts need no more: each expert's
// capacity C = ceil(n / E) follows from the row counts, so every size is known on the host and
// the selection itself stays on the device.
#pragma once
#include "mot.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cublas_v2.h>
#include <mma.h>
#include <cfloat>
#include <type_traits>
#ifdef MOT_MPI
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1  // the C API only (OpenMPI's C++ bindings warn under -Wextra)
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>
#include <nccl.h>
#endif

// ============================================================================================
// 1. Error checking, the GPU model, helpers
// ============================================================================================
#define MOT_CUDA_CHECK(call)                                                                            \
    do {                                                                                                \
        cudaError_t mot_e_ = (call);                                                                    \
        if (mot_e_ != cudaSuccess) {                                                                    \
            fprintf(stderr, "%s:%d: CUDA error %s: %s\n", __FILE__, __LINE__, cudaGetErrorName(mot_e_), \
                    cudaGetErrorString(mot_e_));                                                        \
            exit(1);                                                                                    \
        }                                                                                               \
    } while (0)
#define MOT_CUBLAS_CHECK(call)                                                               \
    do {                                                                                     \
        cublasStatus_t mot_s_ = (call);                                                      \
        if (mot_s_ != CUBLAS_STATUS_SUCCESS) {                                               \
            fprintf(stderr, "%s:%d: cuBLAS error %d: %s\n", __FILE__, __LINE__, (int)mot_s_, \
                    cublasGetStatusString(mot_s_));                                          \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)
// After every kernel launch. Build with -DMOT_GPU_DEBUG_SYNC to also synchronise after each
// launch, so that an asynchronous fault is reported at the launch that caused it.
#ifdef MOT_GPU_DEBUG_SYNC
#define MOT_LAUNCH_CHECK()                       \
    do {                                         \
        MOT_CUDA_CHECK(cudaGetLastError());      \
        MOT_CUDA_CHECK(cudaDeviceSynchronize()); \
    } while (0)
#else
#define MOT_LAUNCH_CHECK() MOT_CUDA_CHECK(cudaGetLastError())
#endif

typedef __nv_bfloat16 mot_bf16;

// An activation: an fp32 array (fp32 mode, or where fp32 is needed) and/or a bf16 array (bf16
// mode). Kernels write whichever pointers are non-null; they read f if it is there, else b.
struct MotBuf {
    float* f = nullptr;
    mot_bf16* b = nullptr;
};

// Which tower copy a row (grouped order) uses: rows [0, g1) text, [g1, g2) image, [g2, N) speech.
struct MotRows {
    int copies, g1, g2;
};
__device__ __forceinline__ int mot_dev_copy(const MotRows& t, int pos) {
    return t.copies == 1 ? 0 : pos < t.g1 ? 0 : pos < t.g2 ? 1 : 2;
}
__device__ __forceinline__ void mot_store(float* f, mot_bf16* b, size_t i, float v) {
    if (f) f[i] = v;
    if (b) b[i] = __float2bfloat16(v);
}
// (for loads that only move data, as attention's into shared memory and registers)
__device__ __forceinline__ float mot_load(const MotBuf& x, size_t i) { return x.f ? x.f[i] : __bfloat162float(x.b[i]); }
static inline MotBuf mot_f32(float* f) { return MotBuf{f, nullptr}; }
static inline MotBuf mot_buf_at(const MotBuf& b, size_t off) {
    MotBuf r;
    r.f = b.f ? b.f + off : nullptr;
    r.b = b.b ? b.b + off : nullptr;
    return r;
}
// Typed access for kernels that compute on activations: they are templates on the element type
// (float or mot_bf16), so fp32 mode runs exactly the code it ran on plain float arrays (a
// per-element branch, as mot_load has, changes how the compiler contracts and vectorises).
__device__ __forceinline__ float mot_ld(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float mot_ld(const mot_bf16* p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void mot_st(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void mot_st(mot_bf16* p, size_t i, float v) { p[i] = __float2bfloat16(v); }
template <typename T>
static inline T* mot_typed(const MotBuf& b) {  // the array of element type T, which must be there
    T* p = nullptr;
    if constexpr (std::is_same<T, float>::value) p = b.f;
    else p = b.b;
    if (!p) {
        fprintf(stderr, "mot.cu: an activation is not in the precision its kernel expects\n");
        exit(1);
    }
    return p;
}
// calls f(T()) with T the element type of activation b: float if it has an fp32 array, else bf16
template <typename Fn>
static inline void mot_by_type(const MotBuf& b, Fn&& f) {
    if (b.f) f(float());
    else f(mot_bf16());
}

struct MotGpu {
    MotConfig cfg;
    MotParamTable tab;
    bool bf16 = false;
    int maxB = 0, maxT = 0, maxN = 0;  // capacity given to mot_gpu_init
    int B = 0, T = 0, N = 0;           // shape of the last forward's batch
    int head_rows = 0;                 // rows of logits per output-head chunk (may be lowered after init)
    size_t bytes = 0;                  // device memory allocated by this model
    cudaStream_t stream = nullptr;
    cublasHandle_t cublas = nullptr;
    void* cublas_ws = nullptr;
    // parameters, gradients, Adam moments (fp32, table order) and the bf16 weight copy
    float *params = nullptr, *grads = nullptr, *adam_m = nullptr, *adam_v = nullptr;
    mot_bf16* params_bf = nullptr;
    float *rope_cos = nullptr, *rope_sin = nullptr;  // max_seq x Dh/2
    // activations, [L][N][...] in grouped order (see mot.h MotActs). The residual stream x, h is
    // fp32 with a bf16 copy (x_b, h_b) for the GEMMs in bf16 mode; the MotBuf activations are fp32
    // or bf16 by mode (y2 stays fp32 with experts: the gated sum adds into it).
    float *x = nullptr, *h = nullptr, *q_rstd = nullptr, *k_rstd = nullptr, *a_rstd = nullptr;
    float *y2_rstd = nullptr, *z_rstd = nullptr;
    MotBuf q, k, v, qr, kr, o, a, y2, u1, u3, u;              // u1, u3, u: L x NS x F
    float* lse = nullptr;                                     // L x B x H x T, attention row logsumexp (log2 units)
    float* z_f = nullptr;                                     // fp32 mode: z (N x D)
    mot_bf16 *x_b = nullptr, *h_b = nullptr, *z_b = nullptr;  // bf16 mode copies
    // output head
    float* logits = nullptr;                       // head_rows x V (fp32 logits; fp32-mode dlogits in place)
    mot_bf16* dlogits_b = nullptr;                 // head_rows x V (bf16 mode)
    float *ce_lse = nullptr, *row_loss = nullptr;  // N
    double* loss_out = nullptr;                    // 4: sum of row losses (all, text, image, speech)
    // backward scratch. dx: the residual gradient (dL/dx, then dL/dh, then dL/dx of the layer
    // below), fp32 like the stream; the rest fp32 or bf16 by mode.
    float *dx = nullptr, *dt = nullptr, *delta = nullptr;
    MotBuf dO, dq, dk, dyun, du;
    MotBuf gdy, du1, du3, dv, gqk;                  // GEMM operands
    float* gain_part = nullptr;                     // partial sums of the gain-gradient reduction
    double *norm_part = nullptr, *norm2 = nullptr;  // gradient-norm reduction
    // batch indices on the device (one upload per forward) and their host copies
    int* idx_dev = nullptr;
    int* idx_host = nullptr;     // pinned
    double* host_out = nullptr;  // pinned, 6 doubles (losses, then the aux sums)
    int *tok_g = nullptr, *tgt_g = nullptr, *pos_g = nullptr, *row_of = nullptr;
    int *emb_rows = nullptr, *emb_tok = nullptr, *emb_start = nullptr;
    int* vis = nullptr;  // per position (b*T + t): the last position it attends to
    MotPlan plan;        // of the last batch (mot.h, mot_plan): grouping, target counts, slots, lists
    bool have_batch = false;
    // experts (dev/MATH.md, section 5): allocated only when some FFN copy has more than one. u1, u3, u and
    // their gradients hold one row per expert slot (NS per layer; NS = N without experts).
    bool experts = false;
    int route = MOT_ROUTE_EC;                // for the next forward: expert choice, or causal (aux routers)
    int route_fwd = MOT_ROUTE_EC;            // the route of the last forward
    int Emax = 1, NS = 0;                    // most experts of any copy; slots per layer for this batch
    float *gate = nullptr, *aux = nullptr;   // L x N x Emax: router softmax s, aux-router sigmoid a
    int *sel = nullptr, *slot_of = nullptr;  // L x NS: row of each slot; L x N x Emax: slot of (row, expert) or -1
    float* ye = nullptr;                     // L x NS x D: each slot's expert output, normalised (rmsnorm, no gain)
    float* ye_rstd = nullptr;                // L x NS: 1/rms of each slot's expert output before its norm
    MotBuf xg, dye;                          // NS x D: gathered rows of h; gradient of ye (GEMM operands)
    float *dX = nullptr, *ds = nullptr, *dz = nullptr;  // NS x D; N x Emax router / aux-router logit gradients
    double *aux_row = nullptr, *aux_out = nullptr;      // 2N per-row BCE and agreement; 2 sums over the forward
    // Transfusion setting (dev/MATH.md, section 7): allocated only in it. The image rows are the
    // contiguous range [group[1], group[2]), and these arrays are indexed from its start (image row
    // i = grouped row group[1] + i). The timestep embedding is computed once per distinct step of
    // the batch (plan.step_t: every patch of an image shares its t), not once per image row.
    bool tf = false;
    float *pin = nullptr, *eps = nullptr;                      // N x 16: each image row's input patch x_t, its noise
    float *eps_hat = nullptr, *deps = nullptr;                 // N x 16: predicted noise, the loss gradient wrt it
    float *sinu = nullptr, *temb = nullptr, *dtemb = nullptr;  // n_steps x D: sinusoid(t), its W_t, dL/d(temb)
    double* row_se = nullptr;  // N: squared error of each noised image row (0 when clean)
    // the diffusion loss weighting (MotModel's diff_loss). In row_se's allocation, after its N:
    // row_wse (N, each row's squared error times w(t)), wse_sum (1, their sum) and snr_w (1001,
    // the min-SNR weight of each t, mot_diff_loss_weight), so Transfusion's buffers stay one list
    int diff_loss = MOT_DIFF_MSE;
    double *row_wse = nullptr, *wse_sum = nullptr, *snr_w = nullptr;
    double wse_host = 0;  // the last forward's wse_sum (with min-SNR only)
    int *step_of = nullptr, *step_t = nullptr, *step_rows = nullptr, *step_start = nullptr;  // device lists
    int* tf_idx_host = nullptr;  // pinned: the four lists above (4N + 1)
    float* tf_host = nullptr;    // pinned: pin and eps for the upload (2 x 16N)
    // results of the last forward, as MotModel's: loss is the training objective (Transfusion:
    // loss_lm + 5 loss_mod[image], the image entry being the MSE over the n_mod[image] noised rows)
    double loss = 0, loss_lm = 0, loss_mod[MOT_N_MOD] = {0, 0, 0};
    int n_valid = 0, n_mod[MOT_N_MOD] = {0, 0, 0};
    double aux_loss = 0, aux_agree = 0;  // as MotModel's: EC forwards of a model with experts
};

static inline int mot_blocks(size_t n, int threads) { return (int)((n + threads - 1) / threads); }

template <typename Tp>
static inline Tp* mot_dev_alloc(MotGpu* g, size_t count) {
    if (count == 0) count = 1;
    void* p = nullptr;
    MOT_CUDA_CHECK(cudaMalloc(&p, count * sizeof(Tp)));
    g->bytes += count * sizeof(Tp);
    return (Tp*)p;
}

// ============================================================================================
// 2. Kernels
// ============================================================================================
// ---- warp reductions (butterfly: every lane ends with the same value) -----------------------
__device__ __forceinline__ float mot_warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

// ---- RMSNorm over rows of C (one warp per row), with per-tower gains and a residual --------
// CPU twin: rmsnorm_forward, rmsnorm_backward (with the residual add of mot_forward)
// out = (resid ? resid : 0) + x * rstd * g[copy],  rstd = 1 / sqrt(mean(x^2) + eps)
// A sublayer's residual add is this kernel: one pass reads its output x (a GEMM output, bf16 in
// bf16 mode) and the fp32 stream resid, and writes the new stream (fp32, plus the bf16 copy the
// next GEMMs read). The stream stays fp32 because it is the sum of 2L small updates: in bf16
// (8 significant bits) each add would lose the part of an update below 2^-9 of the stream.
// Rows of an FFN copy with experts (bit mot_dev_copy(fr, row) of gain_only; CPU: mot_gain_only)
// take the gain alone, rstd 1: each expert normalised its own output.
template <typename TX>
static __global__ void mot_rmsnorm_forward_kernel(float* out, mot_bf16* outb, float* rstd, const TX* x, const float* g,
                                                  const float* resid, int rows, int C, MotRows tw, MotRows fr,
                                                  unsigned gain_only) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;  // the whole warp leaves together
    const TX* xi = x + (size_t)row * C;
    const float* gi = g + (size_t)mot_dev_copy(tw, row) * C;
    float ss = 0;
    for (int j = lane; j < C; j += 32) ss += mot_ld(xi, j) * mot_ld(xi, j);
    ss = mot_warp_sum(ss);
    const bool go = (gain_only >> mot_dev_copy(fr, row)) & 1u;
    const float r = go ? 1.0f : 1.0f / sqrtf(ss / (float)C + (float)MOT_NORM_EPS);
    if (lane == 0) rstd[row] = r;
    for (int j = lane; j < C; j += 32) {
        float v = mot_ld(xi, j) * r * gi[j];
        if (resid) v = resid[(size_t)row * C + j] + v;
        mot_store(out, outb, (size_t)row * C + j, v);
    }
}
// dx = r g dy - r^3 / C * x * sum(x g dy)   (the gain gradient is reduced separately; gain-only
// rows: dx = g dy)
template <typename TX>
static __global__ void mot_rmsnorm_backward_kernel(MotBuf dx, const float* dy, const TX* x, const float* rstd,
                                                   const float* g, int rows, int C, MotRows tw, MotRows fr,
                                                   unsigned gain_only) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const TX* xi = x + (size_t)row * C;
    const float* dyi = dy + (size_t)row * C;
    const float* gi = g + (size_t)mot_dev_copy(tw, row) * C;
    float dot = 0;
    if (!((gain_only >> mot_dev_copy(fr, row)) & 1u))
        for (int j = lane; j < C; j += 32) dot += mot_ld(xi, j) * gi[j] * dyi[j];
    dot = mot_warp_sum(dot);
    const float r = rstd[row];
    for (int j = lane; j < C; j += 32)
        mot_store(dx.f, dx.b, (size_t)row * C + j, r * gi[j] * dyi[j] - r * r * r / (float)C * mot_ld(xi, j) * dot);
}

// Gain gradient, deterministic two-stage column sum over the rows [r0, r1) of one tower copy:
//   dg[j] += sum_i dy[i][j] * x[i][j] * rstd[i]      (x null: the plain column sum of dy, for biases)
// Stage 1: block (32 x 8) per (32 columns, chunk of MOT_GAIN_ROWS rows) -> part[chunk][j].
// Stage 2: dg[j] += sum over chunks in order.
enum { MOT_GAIN_ROWS = 256 };
template <typename TY, typename TX>
static __global__ void mot_gain_partial_kernel(float* part, const TY* dy, const TX* x, const float* rstd, int r0,
                                               int r1, int C) {
    __shared__ float sm[8][33];
    const int j = blockIdx.x * 32 + threadIdx.x, chunk = blockIdx.y;
    const int a = r0 + chunk * MOT_GAIN_ROWS, b = min(r1, a + MOT_GAIN_ROWS);
    float acc = 0;
    if (j < C)
        for (int i = a + threadIdx.y; i < b; i += 8)
            acc += x ? mot_ld(dy, (size_t)i * C + j) * mot_ld(x, (size_t)i * C + j) * rstd[i]
                     : mot_ld(dy, (size_t)i * C + j);
    sm[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && j < C) {
        float s = 0;
        for (int y = 0; y < 8; y++) s += sm[y][threadIdx.x];
        part[(size_t)chunk * C + j] = s;
    }
}
static __global__ void mot_gain_final_kernel(float* dg, const float* part, int nchunk, int C) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= C) return;
    float s = 0;
    for (int c = 0; c < nchunk; c++) s += part[(size_t)c * C + j];
    dg[j] += s;
}

// ---- QK-norm (per head, per-tower gains) + RoPE, one thread per (row, head) ---------------
// CPU twin: rmsnorm_forward over the heads, then rope_apply (mot_forward; backward in mot_backward)
// out = rope(rmsnorm(x_head) * g[copy]) at the row's sequence position; rstd is [rows][H].
template <typename TA>
static __global__ void mot_qknorm_rope_forward_kernel(TA* out, float* rstd, const TA* x, const float* g,
                                                      const float* cosT, const float* sinT, const int* pos_g, int N,
                                                      int H, int Dh, MotRows tw) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= N * H) return;
    const int r = idx / H, half = Dh / 2;
    const TA* xi = x + (size_t)idx * Dh;  // row r, head h: (r * H + h) * Dh
    TA* yi = out + (size_t)idx * Dh;
    const float* gi = g + (size_t)mot_dev_copy(tw, r) * Dh;
    float ss = 0;
    for (int j = 0; j < Dh; j++) ss += mot_ld(xi, j) * mot_ld(xi, j);
    const float rs = 1.0f / sqrtf(ss / (float)Dh + (float)MOT_NORM_EPS);
    rstd[idx] = rs;
    const float *cs = cosT + (size_t)pos_g[r] * half, *sn = sinT + (size_t)pos_g[r] * half;
    for (int j = 0; j < half; j++) {
        const float y1 = mot_ld(xi, j) * rs * gi[j], y2 = mot_ld(xi, j + half) * rs * gi[j + half];
        mot_st(yi, j, y1 * cs[j] - y2 * sn[j]);
        mot_st(yi, j + half, y1 * sn[j] + y2 * cs[j]);
    }
}
// Backward: dyun = rope^-1(dy) (kept for the gain gradient), dx = rmsnorm backward of dyun. In
// bf16 mode the second loop reads back the rounded dyun: one more bf16 rounding of dy, as the GEMM
// operand dx gets anyway.
template <typename TA>
static __global__ void mot_qknorm_rope_backward_kernel(MotBuf dx, TA* dyun, const TA* dy, const TA* x,
                                                       const float* rstd, const float* g, const float* cosT,
                                                       const float* sinT, const int* pos_g, int N, int H, int Dh,
                                                       MotRows tw) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= N * H) return;
    const int r = idx / H, half = Dh / 2;
    const size_t base = (size_t)idx * Dh;
    const float* gi = g + (size_t)mot_dev_copy(tw, r) * Dh;
    const float *cs = cosT + (size_t)pos_g[r] * half, *sn = sinT + (size_t)pos_g[r] * half;
    float dot = 0;
    for (int j = 0; j < half; j++) {  // rotate by -angle
        const float d1 = mot_ld(dy, base + j), d2 = mot_ld(dy, base + j + half);
        const float e1 = d1 * cs[j] + d2 * sn[j], e2 = -d1 * sn[j] + d2 * cs[j];
        mot_st(dyun, base + j, e1);
        mot_st(dyun, base + j + half, e2);
        dot += mot_ld(x, base + j) * gi[j] * e1 + mot_ld(x, base + j + half) * gi[j + half] * e2;
    }
    const float rs = rstd[idx];
    for (int j = 0; j < Dh; j++)
        mot_store(dx.f, dx.b, base + j,
                  rs * gi[j] * mot_ld(dyun, base + j) - rs * rs * rs / (float)Dh * mot_ld(x, base + j) * dot);
}

// ---- causal attention, flash style ----------------------------------------------------------
// CPU twin: attention_forward, attention_backward
// Rows of q, k, v, o are in grouped order; the kernels walk sequence positions t of sequence b
// and read row row_of[b*T + t], so the reordering costs nothing extra. Nothing T x T is stored:
// the forward keeps the running max / sum per query row and writes only the row logsumexp
// (in log2 units: lse2 = log2 sum_j 2^(s_j * log2 e)); the backward recomputes probabilities.
//
// Thread layout: G = DH / PER threads share one query (or key) row; each owns PER of the DH
// dimensions, as VEC-wide chunks interleaved across the G threads (so the G threads read
// neighbouring shared-memory words: no bank conflicts; all rows of a warp read the same key).
template <int DH, int PER>
struct MotAttnLayout {
    static constexpr int G = DH / PER;
    static constexpr int VEC = (PER % 4 == 0) ? 4 : 1;
    static constexpr int NCH = PER / VEC;
    static_assert(DH % PER == 0 && (G & (G - 1)) == 0 && G <= 32, "bad attention layout");
    __device__ static __forceinline__ int dim(int c, int v, int g) { return (c * G + g) * VEC + v; }
};
template <int DH, int PER>
__device__ __forceinline__ void mot_attn_load(float* r, const MotBuf& x, size_t row, int g) {
    typedef MotAttnLayout<DH, PER> Lay;
#pragma unroll
    for (int c = 0; c < Lay::NCH; c++)
#pragma unroll
        for (int v = 0; v < Lay::VEC; v++) r[c * Lay::VEC + v] = mot_load(x, row + Lay::dim(c, v, g));
}
// partial dot product of the owned dimensions with a shared-memory row (16-byte aligned)
template <int DH, int PER>
__device__ __forceinline__ float mot_attn_dot(const float* r, const float* srow, int g) {
    typedef MotAttnLayout<DH, PER> Lay;
    float s = 0;
#pragma unroll
    for (int c = 0; c < Lay::NCH; c++) {
        if constexpr (Lay::VEC == 4) {
            const float4 w = *reinterpret_cast<const float4*>(srow + Lay::dim(c, 0, g));
            s += r[c * 4 + 0] * w.x + r[c * 4 + 1] * w.y + r[c * 4 + 2] * w.z + r[c * 4 + 3] * w.w;
        } else {
#pragma unroll
            for (int v = 0; v < Lay::VEC; v++) s += r[c * Lay::VEC + v] * srow[Lay::dim(c, v, g)];
        }
    }
    return s;
}
template <int DH, int PER>
__device__ __forceinline__ void mot_attn_axpy(float* acc, float a, const float* srow, int g) {
    typedef MotAttnLayout<DH, PER> Lay;
#pragma unroll
    for (int c = 0; c < Lay::NCH; c++) {
        if constexpr (Lay::VEC == 4) {
            const float4 w = *reinterpret_cast<const float4*>(srow + Lay::dim(c, 0, g));
            acc[c * 4 + 0] += a * w.x;
            acc[c * 4 + 1] += a * w.y;
            acc[c * 4 + 2] += a * w.z;
            acc[c * 4 + 3] += a * w.w;
        } else {
#pragma unroll
            for (int v = 0; v < Lay::VEC; v++) acc[c * Lay::VEC + v] += a * srow[Lay::dim(c, v, g)];
        }
    }
}
// sum over the G threads of a row (butterfly: all G get the same bits)
template <int G>
__device__ __forceinline__ float mot_group_sum(float s) {
#pragma unroll
    for (int off = G / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    return s;
}
// Loads rows [p0, p0 + ROWS) of sequence `rows` (head h) into shared memory; zeros past T.
template <int DH, int ROWS>
__device__ __forceinline__ void mot_attn_tile(float* dst, const MotBuf& src, const int* rows, int p0, int T, int D,
                                              int h, int tid, int nthreads) {
    for (int i = tid; i < ROWS * DH; i += nthreads) {
        const int p = p0 + i / DH, d = i % DH;
        dst[i] = p < T ? mot_load(src, (size_t)rows[p] * D + h * DH + d) : 0.0f;
    }
}

// Forward. grid (ceil(T / BQ), B * H), block BQ * G threads; one query row per G threads.
template <int DH, int PER, int BQ, int BK>
static __global__ void __launch_bounds__(BQ*(DH / PER))
    mot_attn_forward_kernel(MotBuf o, float* lse2, MotBuf q, MotBuf k, MotBuf v, const int* row_of, const int* vis_of,
                            int T, int H, float qscale) {
    typedef MotAttnLayout<DH, PER> Lay;
    constexpr int G = Lay::G, NT = BQ * G;
    __shared__ __align__(16) float Ks[BK * DH];
    __shared__ __align__(16) float Vs[BK * DH];
    const int D = H * DH, bh = blockIdx.y, b = bh / H, h = bh % H;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;  // longest rows first
    const int tid = threadIdx.x, g = tid % G, t = q0 + tid / G;
    const bool valid = t < T;
    const int tc = valid ? t : T - 1;  // invalid rows compute on a real row and write nothing
    const int* rows = row_of + (size_t)b * T;
    const int* vis = vis_of + (size_t)b * T;  // t, or the end of t's image block (non-decreasing)
    const size_t qoff = (size_t)rows[tc] * D + h * DH;
    const int vtc = vis[tc];
    float qv[PER], acc[PER];
    mot_attn_load<DH, PER>(qv, q, qoff, g);
#pragma unroll
    for (int i = 0; i < PER; i++) {
        qv[i] *= qscale;
        acc[i] = 0;
    }
    float m = -INFINITY, l = 0;
    const int kend = vis[min(T, q0 + BQ) - 1] + 1;  // the tile's largest vis (causal: min(T, q0 + BQ))
    for (int k0 = 0; k0 < kend; k0 += BK) {
        __syncthreads();
        mot_attn_tile<DH, BK>(Ks, k, rows, k0, T, D, h, tid, NT);
        mot_attn_tile<DH, BK>(Vs, v, rows, k0, T, D, h, tid, NT);
        __syncthreads();
        float s[BK];
        float mt = -INFINITY;
#pragma unroll
        for (int jj = 0; jj < BK; jj++) {
            const float d = mot_group_sum<G>(mot_attn_dot<DH, PER>(qv, Ks + jj * DH, g));
            s[jj] = (k0 + jj <= vtc) ? d : -INFINITY;
            mt = fmaxf(mt, s[jj]);
        }
        // key 0 is in the first tile and never masked, so mn is finite from the first tile on
        const float mn = fmaxf(m, mt);
        const float alpha = exp2f(m - mn);  // 0 on the first tile (m = -inf)
        l *= alpha;
#pragma unroll
        for (int i = 0; i < PER; i++) acc[i] *= alpha;
#pragma unroll
        for (int jj = 0; jj < BK; jj++) {
            const float p = exp2f(s[jj] - mn);  // masked: exp2(-inf) = 0
            l += p;
            mot_attn_axpy<DH, PER>(acc, p, Vs + jj * DH, g);
        }
        m = mn;
    }
    if (valid) {
        const float inv = 1.0f / l;
#pragma unroll
        for (int c = 0; c < Lay::NCH; c++)
#pragma unroll
            for (int vv = 0; vv < Lay::VEC; vv++)
                mot_store(o.f, o.b, qoff + Lay::dim(c, vv, g), acc[c * Lay::VEC + vv] * inv);
        if (g == 0) lse2[(size_t)bh * T + t] = m + log2f(l);
    }
}

// delta[bh][t] = sum_d dO[row][h*Dh+d] * o[row][h*Dh+d]  (the softmax backward's row term)
template <typename TA>
static __global__ void mot_attn_delta_kernel(float* delta, const TA* dO, const TA* o, const int* row_of, int B, int T,
                                             int H, int Dh) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * H * T) return;
    const int bh = idx / T, t = idx % T, b = bh / H, h = bh % H;
    const size_t off = (size_t)row_of[(size_t)b * T + t] * H * Dh + h * Dh;
    float s = 0;
    for (int d = 0; d < Dh; d++) s += mot_ld(dO, off + d) * mot_ld(o, off + d);
    delta[idx] = s;
}

// Backward for dK, dV: one key row per G threads; loops over the query rows that see the key row (i >= it, or in its image block).
//   p = 2^(s2 - lse2_i), dv_j += p dO_i, ds = p (dO_i . v_j - delta_i), dk_j += scale ds q_i
template <int DH, int PER, int BKR, int BQT>
static __global__ void __launch_bounds__(BKR*(DH / PER))
    mot_attn_backward_dkv_kernel(MotBuf dk, MotBuf dv, MotBuf q, MotBuf k, MotBuf v, MotBuf dO, const float* lse2,
                                 const float* delta, const int* row_of, const int* vis_of, int T, int H, float scale,
                                 float c2) {
    typedef MotAttnLayout<DH, PER> Lay;
    constexpr int G = Lay::G, NT = BKR * G;
    __shared__ __align__(16) float Qs[BQT * DH];
    __shared__ __align__(16) float Ds[BQT * DH];
    __shared__ float Ls[BQT], Es[BQT];
    __shared__ int Vq[BQT];  // vis of the tile's query rows (-1 past T)
    const int D = H * DH, bh = blockIdx.y, b = bh / H, h = bh % H;
    const int k0 = blockIdx.x * BKR;  // lowest key rows (most queries) first
    const int tid = threadIdx.x, g = tid % G, j = k0 + tid / G;
    const bool valid = j < T;
    const int jc = valid ? j : T - 1;
    const int* rows = row_of + (size_t)b * T;
    const int* vis = vis_of + (size_t)b * T;  // t, or the end of t's image block (non-decreasing)
    const size_t koff = (size_t)rows[jc] * D + h * DH;
    float kv[PER], vv[PER], dka[PER], dva[PER];
    mot_attn_load<DH, PER>(kv, k, koff, g);
    mot_attn_load<DH, PER>(vv, v, koff, g);
#pragma unroll
    for (int i = 0; i < PER; i++) {
        dka[i] = 0;
        dva[i] = 0;
    }
    int qfirst = k0;  // the first query row that sees key k0 (k0 itself when causal)
    while (qfirst > 0 && vis[qfirst - 1] >= k0) qfirst--;
    for (int i0 = qfirst; i0 < T; i0 += BQT) {
        __syncthreads();
        mot_attn_tile<DH, BQT>(Qs, q, rows, i0, T, D, h, tid, NT);
        mot_attn_tile<DH, BQT>(Ds, dO, rows, i0, T, D, h, tid, NT);
        for (int ii = tid; ii < BQT; ii += NT) {
            const int i = i0 + ii;
            Ls[ii] = i < T ? lse2[(size_t)bh * T + i] : 0.0f;
            Es[ii] = i < T ? delta[(size_t)bh * T + i] : 0.0f;
            Vq[ii] = i < T ? vis[i] : -1;
        }
        __syncthreads();
#pragma unroll 4
        for (int ii = 0; ii < BQT; ii++) {
            const float s = mot_group_sum<G>(mot_attn_dot<DH, PER>(kv, Qs + ii * DH, g)) * c2;
            const float dp = mot_group_sum<G>(mot_attn_dot<DH, PER>(vv, Ds + ii * DH, g));
            const float p = Vq[ii] >= jc ? exp2f(s - Ls[ii]) : 0.0f;
            const float ds = p * (dp - Es[ii]);
            mot_attn_axpy<DH, PER>(dva, p, Ds + ii * DH, g);
            mot_attn_axpy<DH, PER>(dka, ds, Qs + ii * DH, g);
        }
    }
    if (valid) {
#pragma unroll
        for (int c = 0; c < Lay::NCH; c++)
#pragma unroll
            for (int e = 0; e < Lay::VEC; e++) {
                const size_t off = koff + Lay::dim(c, e, g);
                mot_store(dk.f, dk.b, off, dka[c * Lay::VEC + e] * scale);
                mot_store(dv.f, dv.b, off, dva[c * Lay::VEC + e]);
            }
    }
}

// Backward for dQ: one query row per G threads; loops over key rows j <= query row.
template <int DH, int PER, int BQ, int BK>
static __global__ void __launch_bounds__(BQ*(DH / PER))
    mot_attn_backward_dq_kernel(MotBuf dq, MotBuf q, MotBuf k, MotBuf v, MotBuf dO, const float* lse2,
                                const float* delta, const int* row_of, const int* vis_of, int T, int H, float scale,
                                float c2) {
    typedef MotAttnLayout<DH, PER> Lay;
    constexpr int G = Lay::G, NT = BQ * G;
    __shared__ __align__(16) float Ks[BK * DH];
    __shared__ __align__(16) float Vs[BK * DH];
    const int D = H * DH, bh = blockIdx.y, b = bh / H, h = bh % H;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;
    const int tid = threadIdx.x, g = tid % G, t = q0 + tid / G;
    const bool valid = t < T;
    const int tc = valid ? t : T - 1;
    const int* rows = row_of + (size_t)b * T;
    const int* vis = vis_of + (size_t)b * T;  // t, or the end of t's image block (non-decreasing)
    const size_t qoff = (size_t)rows[tc] * D + h * DH;
    const int vtc = vis[tc];
    float qv[PER], dov[PER], dqa[PER];
    mot_attn_load<DH, PER>(qv, q, qoff, g);
    mot_attn_load<DH, PER>(dov, dO, qoff, g);
#pragma unroll
    for (int i = 0; i < PER; i++) dqa[i] = 0;
    const float L2 = lse2[(size_t)bh * T + tc], E = delta[(size_t)bh * T + tc];
    const int kend = vis[min(T, q0 + BQ) - 1] + 1;  // the tile's largest vis (causal: min(T, q0 + BQ))
    for (int k0 = 0; k0 < kend; k0 += BK) {
        __syncthreads();
        mot_attn_tile<DH, BK>(Ks, k, rows, k0, T, D, h, tid, NT);
        mot_attn_tile<DH, BK>(Vs, v, rows, k0, T, D, h, tid, NT);
        __syncthreads();
#pragma unroll 4
        for (int jj = 0; jj < BK; jj++) {
            const float s = mot_group_sum<G>(mot_attn_dot<DH, PER>(qv, Ks + jj * DH, g)) * c2;
            const float dp = mot_group_sum<G>(mot_attn_dot<DH, PER>(dov, Vs + jj * DH, g));
            const float p = (k0 + jj <= vtc) ? exp2f(s - L2) : 0.0f;
            mot_attn_axpy<DH, PER>(dqa, p * (dp - E), Ks + jj * DH, g);
        }
    }
    if (valid) {
#pragma unroll
        for (int c = 0; c < Lay::NCH; c++)
#pragma unroll
            for (int e = 0; e < Lay::VEC; e++)
                mot_store(dq.f, dq.b, qoff + Lay::dim(c, e, g), dqa[c * Lay::VEC + e] * scale);
    }
}

// ---- causal attention on tensor cores (bf16 mode, head dims 64 and 128) --------------------
// CPU twin: attention_forward, attention_backward
// The same math as the kernels above, with the three products of each tile (S = Q K^T, O += P V;
// in the backward also dP = dO V^T, dV += P^T dO, dK += dS^T Q, dQ += dS K) done by WMMA:
// bf16 operands, fp32 accumulation. Q/K/V/dO are bf16 in global memory in bf16 mode (fp32 ones,
// as the tests also pass, are rounded to bf16 as they are copied into shared memory); O, dQ, dK,
// dV are written in the precision of their arrays. Each warp owns 16 rows of the block (query
// rows in the forward and dQ kernels, key rows in the dK/dV kernel) and keeps its operand rows
// and its accumulators in fragments. A fragment's element order is hidden, so every row-wise step
// (masking, the online softmax, rescaling by alpha, dividing by l, writing out) stores the
// fragment to the warp's own shared-memory tile, works there, and loads it back; the code uses
// WMMA only through load/store/fill/mma, which is what the CUDA-on-CPU layer can check.
// Shared memory stays under the 48 KB a block gets without opting in: 28 KB (forward), 40 KB
// (dK/dV) and 36 KB (dQ) at head dim 128. dQ has its own kernel as before (no atomics).
typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, mot_bf16, nvcuda::wmma::row_major> MotFragA;
typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, mot_bf16, nvcuda::wmma::row_major> MotFragB;
typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, mot_bf16, nvcuda::wmma::col_major> MotFragBt;
typedef nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> MotFragC;
enum { MOT_TC_THREADS = 128, MOT_TC_ROWS = 64, MOT_TC_COLS = 32 };  // 4 warps x 16 rows; 32 columns per tile

// Rows [p0, p0 + ROWS) of sequence `rows` (head h) into shared memory as bf16; zeros past T.
template <int DH, int ROWS>
__device__ __forceinline__ void mot_tc_tile(mot_bf16* dst, const MotBuf& src, const int* rows, int p0, int T, int D,
                                            int h, int tid) {
    for (int i = tid; i < ROWS * DH / 4; i += MOT_TC_THREADS) {
        const int p = p0 + i / (DH / 4), d = (i % (DH / 4)) * 4;
        const size_t at = p < T ? (size_t)rows[p] * D + h * DH + d : 0;
        if (src.b) {  // 4 bf16 as one 8-byte word
            uint2 x = make_uint2(0u, 0u);
            if (p < T) x = *reinterpret_cast<const uint2*>(src.b + at);
            *reinterpret_cast<uint2*>(dst + (size_t)i * 4) = x;
            continue;
        }
        float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (p < T) x = *reinterpret_cast<const float4*>(src.f + at);
        mot_bf16* o = dst + (size_t)i * 4;
        o[0] = __float2bfloat16(x.x);
        o[1] = __float2bfloat16(x.y);
        o[2] = __float2bfloat16(x.z);
        o[3] = __float2bfloat16(x.w);
    }
}
// C (16 x 16 at c) += sum over DH/16 steps of A fragments a[kk] times tiles of B^T rows at bt
// (B^T row-major with ldm DH: the K or V rows of a tile)
template <int DH>
__device__ __forceinline__ void mot_tc_abt(MotFragC& c, const MotFragA* a, const mot_bf16* bt) {
#pragma unroll
    for (int kk = 0; kk < DH / 16; kk++) {
        MotFragBt f;
        nvcuda::wmma::load_matrix_sync(f, bt + kk * 16, DH);
        nvcuda::wmma::mma_sync(c, a[kk], f, c);
    }
}
// acc[dt] += A (16 x K, row-major, ldm LDA, bf16) times B (K x DH, row-major, ldm DH) for every
// 16-column slice dt of DH
template <int DH, int K, int LDA>
__device__ __forceinline__ void mot_tc_ab(MotFragC* acc, const mot_bf16* a, const mot_bf16* b) {
#pragma unroll
    for (int kk = 0; kk < K / 16; kk++) {
        MotFragA fa;
        nvcuda::wmma::load_matrix_sync(fa, a + kk * 16, LDA);
#pragma unroll
        for (int dt = 0; dt < DH / 16; dt++) {
            MotFragB fb;
            nvcuda::wmma::load_matrix_sync(fb, b + (size_t)kk * 16 * DH + dt * 16, DH);
            nvcuda::wmma::mma_sync(acc[dt], fa, fb, acc[dt]);
        }
    }
}
// Writes a warp's 16 x DH accumulator rows to global memory, row rr times scale (and mul[rr] if
// mul is given), for rows r0 + rr < T, through the 16 x 16 float scratch tile `tmp`.
template <int DH>
__device__ __forceinline__ void mot_tc_write(float* f, mot_bf16* bf, const MotFragC* acc, float* tmp, const float* mul,
                                             float scale, const int* rows, int r0, int T, int D, int h, int lane) {
#pragma unroll
    for (int dt = 0; dt < DH / 16; dt++) {
        nvcuda::wmma::store_matrix_sync(tmp, acc[dt], 16, nvcuda::wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
            const int rr = e / 16, r = r0 + rr;
            if (r < T)
                mot_store(f, bf, (size_t)rows[r] * D + h * DH + dt * 16 + e % 16,
                          tmp[e] * (mul ? mul[rr] : 1.0f) * scale);
        }
        __syncwarp();
    }
}

// Forward. grid (ceil(T / 64), B * H), 128 threads; warp w owns query rows q0 + 16w .. + 15.
template <int DH>
static __global__ void __launch_bounds__(MOT_TC_THREADS)
    mot_attn_tc_forward_kernel(MotBuf o, float* lse2, MotBuf q, MotBuf k, MotBuf v, const int* row_of,
                               const int* vis_of, int T, int H, float c2) {
    constexpr int BQ = MOT_TC_ROWS, BK = MOT_TC_COLS, NF = DH / 16;
    static_assert(BQ <= 2 * BK && BK >= 16, "Q is staged in the K/V tiles; the scratch tile is 16 x 16");
    __shared__ __align__(32) mot_bf16 KV[2 * BK * DH];  // K tile, V tile (Q before the loop)
    __shared__ __align__(32) float S[BQ * BK];          // scores of each warp's rows; then its scratch
    __shared__ __align__(32) mot_bf16 P[BQ * BK];       // probabilities (unnormalised), bf16
    __shared__ float Rs[BQ];                            // per row: alpha of this tile, then 1 / l
    mot_bf16 *Ks = KV, *Vs = KV + BK * DH;
    const int D = H * DH, bh = blockIdx.y, b = bh / H, h = bh % H;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;  // longest rows first
    const int tid = threadIdx.x, w = tid / 32, lane = tid % 32;
    const int* rows = row_of + (size_t)b * T;
    const int* vis = vis_of + (size_t)b * T;  // t, or the end of t's image block (non-decreasing)
    mot_tc_tile<DH, BQ>(KV, q, rows, q0, T, D, h, tid);
    __syncthreads();
    MotFragA qf[NF];
    MotFragC of[NF];
#pragma unroll
    for (int kk = 0; kk < NF; kk++) {
        nvcuda::wmma::load_matrix_sync(qf[kk], KV + w * 16 * DH + kk * 16, DH);
        nvcuda::wmma::fill_fragment(of[kk], 0.0f);
    }
    float* Sw = S + w * 16 * BK;
    mot_bf16* Pw = P + w * 16 * BK;
    float* Rw = Rs + w * 16;
    // lanes 2r and 2r+1 run the softmax of the warp's row r, each over every other column
    const int r = lane / 2, half = lane % 2, t = q0 + w * 16 + r, vt = t < T ? vis[t] : t;
    float m = -INFINITY, l = 0;
    const int kend = vis[min(T, q0 + BQ) - 1] + 1;  // the tile's largest vis (causal: min(T, q0 + BQ))
    for (int k0 = 0; k0 < kend; k0 += BK) {
        __syncthreads();
        mot_tc_tile<DH, BK>(Ks, k, rows, k0, T, D, h, tid);
        mot_tc_tile<DH, BK>(Vs, v, rows, k0, T, D, h, tid);
        __syncthreads();
#pragma unroll
        for (int n = 0; n < BK / 16; n++) {
            MotFragC s;
            nvcuda::wmma::fill_fragment(s, 0.0f);
            mot_tc_abt<DH>(s, qf, Ks + n * 16 * DH);
            nvcuda::wmma::store_matrix_sync(Sw + n * 16, s, BK, nvcuda::wmma::mem_row_major);
        }
        __syncwarp();
        // key 0 is in the first tile and never masked, so mn is finite from the first tile on
        float mt = -INFINITY;
        for (int c = half; c < BK; c += 2) mt = fmaxf(mt, k0 + c <= vt ? Sw[r * BK + c] * c2 : -INFINITY);
        mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1));
        const float mn = fmaxf(m, mt), alpha = exp2f(m - mn);  // alpha 0 on the first tile
        float sum = 0;
        for (int c = half; c < BK; c += 2) {
            // l sums the rounded p that multiply V, so o stays a weighted mean of the V rows
            const mot_bf16 p = __float2bfloat16(k0 + c <= vt ? exp2f(Sw[r * BK + c] * c2 - mn) : 0.0f);
            Pw[r * BK + c] = p;
            sum += __bfloat162float(p);
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        l = l * alpha + sum;
        m = mn;
        if (half == 0) Rw[r] = alpha;
        __syncwarp();
        // O *= alpha row by row, through the scratch tile; skipped when no row's max moved
        bool moved = false;
        for (int i = 0; i < 16; i++) moved |= Rw[i] != 1.0f;
        if (moved) {
#pragma unroll
            for (int dt = 0; dt < NF; dt++) {
                nvcuda::wmma::store_matrix_sync(Sw, of[dt], 16, nvcuda::wmma::mem_row_major);
                __syncwarp();
                for (int e = lane; e < 256; e += 32) Sw[e] *= Rw[e / 16];
                __syncwarp();
                nvcuda::wmma::load_matrix_sync(of[dt], Sw, 16, nvcuda::wmma::mem_row_major);
                __syncwarp();  // every lane has read the tile before the next store
            }
        }
        mot_tc_ab<DH, BK, BK>(of, Pw, Vs);
        __syncwarp();
    }
    if (half == 0) {
        Rw[r] = 1.0f / l;
        if (t < T) lse2[(size_t)bh * T + t] = m + log2f(l);
    }
    __syncwarp();
    mot_tc_write<DH>(o.f, o.b, of, Sw, Rw, 1.0f, rows, q0 + w * 16, T, D, h, lane);
}

// Backward for dK, dV. grid (ceil(T / 64), B * H), 128 threads; warp w owns key rows
// k0 + 16w .. + 15 and walks the query tiles i0 >= k0 (32 rows each):
//   S^T = K Q^T, dP^T = V dO^T, p = 2^(s c2 - lse2_i) (0 where i < j), ds = p (dp - delta_i),
//   dV += P^T dO, dK += dS^T Q (times the softmax scale at the end)
template <int DH>
static __global__ void __launch_bounds__(MOT_TC_THREADS)
    mot_attn_tc_dkv_kernel(MotBuf dk, MotBuf dv, MotBuf q, MotBuf k, MotBuf v, MotBuf dO, const float* lse2,
                           const float* delta, const int* row_of, const int* vis_of, int T, int H, float scale,
                           float c2) {
    constexpr int BKR = MOT_TC_ROWS, BQT = MOT_TC_COLS, NF = DH / 16;
    static_assert(DH <= 4 * BQT && BQT >= 16, "K and V are staged in the S/dP tiles; the scratch tile is 16 x 16");
    __shared__ __align__(32) mot_bf16 Qs[BQT * DH];
    __shared__ __align__(32) mot_bf16 Ds[BQT * DH];
    __shared__ __align__(32) float SD[2 * BKR * BQT];  // S^T, dP^T (K, then V, before the loop)
    __shared__ __align__(32) mot_bf16 Pt[BKR * BQT];
    __shared__ __align__(32) mot_bf16 dSt[BKR * BQT];
    __shared__ float Ls[BQT], Es[BQT];
    __shared__ int Vq[BQT];  // vis of the tile's query rows (-1 past T)
    const int D = H * DH, bh = blockIdx.y, b = bh / H, h = bh % H;
    const int k0 = blockIdx.x * BKR;  // lowest key rows (most queries) first
    const int tid = threadIdx.x, w = tid / 32, lane = tid % 32;
    const int* rows = row_of + (size_t)b * T;
    const int* vis = vis_of + (size_t)b * T;  // t, or the end of t's image block (non-decreasing)
    mot_bf16* stage = reinterpret_cast<mot_bf16*>(SD);
    MotFragA kf[NF], vf[NF];
    MotFragC dka[NF], dva[NF];
    mot_tc_tile<DH, BKR>(stage, k, rows, k0, T, D, h, tid);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < NF; kk++) nvcuda::wmma::load_matrix_sync(kf[kk], stage + w * 16 * DH + kk * 16, DH);
    __syncthreads();
    mot_tc_tile<DH, BKR>(stage, v, rows, k0, T, D, h, tid);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < NF; kk++) {
        nvcuda::wmma::load_matrix_sync(vf[kk], stage + w * 16 * DH + kk * 16, DH);
        nvcuda::wmma::fill_fragment(dka[kk], 0.0f);
        nvcuda::wmma::fill_fragment(dva[kk], 0.0f);
    }
    float *St = SD + w * 16 * BQT, *dPt = SD + (BKR + w * 16) * BQT;
    mot_bf16 *Ptw = Pt + w * 16 * BQT, *dStw = dSt + w * 16 * BQT;
    int qfirst = k0;  // the first query row that sees key k0 (k0 itself when causal)
    while (qfirst > 0 && vis[qfirst - 1] >= k0) qfirst--;
    for (int i0 = qfirst; i0 < T; i0 += BQT) {
        __syncthreads();
        mot_tc_tile<DH, BQT>(Qs, q, rows, i0, T, D, h, tid);
        mot_tc_tile<DH, BQT>(Ds, dO, rows, i0, T, D, h, tid);
        for (int ii = tid; ii < BQT; ii += MOT_TC_THREADS) {
            const int i = i0 + ii;
            Ls[ii] = i < T ? lse2[(size_t)bh * T + i] : 0.0f;
            Es[ii] = i < T ? delta[(size_t)bh * T + i] : 0.0f;
            Vq[ii] = i < T ? vis[i] : -1;
        }
        __syncthreads();
#pragma unroll
        for (int n = 0; n < BQT / 16; n++) {
            MotFragC s, dp;
            nvcuda::wmma::fill_fragment(s, 0.0f);
            nvcuda::wmma::fill_fragment(dp, 0.0f);
            mot_tc_abt<DH>(s, kf, Qs + n * 16 * DH);
            mot_tc_abt<DH>(dp, vf, Ds + n * 16 * DH);
            nvcuda::wmma::store_matrix_sync(St + n * 16, s, BQT, nvcuda::wmma::mem_row_major);
            nvcuda::wmma::store_matrix_sync(dPt + n * 16, dp, BQT, nvcuda::wmma::mem_row_major);
        }
        __syncwarp();
        for (int e = lane; e < 16 * BQT; e += 32) {
            const int j = k0 + w * 16 + e / BQT, ii = e % BQT;
            const float p = Vq[ii] >= j ? exp2f(St[e] * c2 - Ls[ii]) : 0.0f;
            Ptw[e] = __float2bfloat16(p);
            dStw[e] = __float2bfloat16(p * (dPt[e] - Es[ii]));
        }
        __syncwarp();
        mot_tc_ab<DH, BQT, BQT>(dva, Ptw, Ds);
        mot_tc_ab<DH, BQT, BQT>(dka, dStw, Qs);
    }
    // St was last read before the final __syncwarp of the loop: free as the scratch tile
    mot_tc_write<DH>(dk.f, dk.b, dka, St, nullptr, scale, rows, k0 + w * 16, T, D, h, lane);
    mot_tc_write<DH>(dv.f, dv.b, dva, St, nullptr, 1.0f, rows, k0 + w * 16, T, D, h, lane);
}

// Backward for dQ. grid (ceil(T / 64), B * H), 128 threads; warp w owns query rows q0 + 16w ..
// + 15 and walks the key tiles its rows see (k0 <= vis of its rows; 32 keys each):
//   S = Q K^T, dP = dO V^T, p = 2^(s c2 - lse2_i), ds = p (dp - delta_i), dQ += dS K (times scale)
template <int DH>
static __global__ void __launch_bounds__(MOT_TC_THREADS)
    mot_attn_tc_dq_kernel(MotBuf dq, MotBuf q, MotBuf k, MotBuf v, MotBuf dO, const float* lse2, const float* delta,
                          const int* row_of, const int* vis_of, int T, int H, float scale, float c2) {
    constexpr int BQ = MOT_TC_ROWS, BK = MOT_TC_COLS, NF = DH / 16;
    static_assert(BQ <= 2 * BK && BK >= 16, "Q and dO are staged in the K/V tiles; the scratch tile is 16 x 16");
    __shared__ __align__(32) mot_bf16 KV[2 * BK * DH];  // K tile, V tile (Q, then dO, before the loop)
    __shared__ __align__(32) float SD[2 * BQ * BK];     // S, dP of each warp's rows
    __shared__ __align__(32) mot_bf16 dS[BQ * BK];
    __shared__ float Ls[BQ], Es[BQ];
    __shared__ int Vr[BQ];  // vis of the block's query rows (the row itself past T)
    mot_bf16 *Ks = KV, *Vs = KV + BK * DH;
    const int D = H * DH, bh = blockIdx.y, b = bh / H, h = bh % H;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BQ;
    const int tid = threadIdx.x, w = tid / 32, lane = tid % 32;
    const int* rows = row_of + (size_t)b * T;
    const int* vis = vis_of + (size_t)b * T;  // t, or the end of t's image block (non-decreasing)
    MotFragA qf[NF], df[NF];
    MotFragC dqa[NF];
    mot_tc_tile<DH, BQ>(KV, q, rows, q0, T, D, h, tid);
    for (int ii = tid; ii < BQ; ii += MOT_TC_THREADS) {
        const int i = q0 + ii;
        Ls[ii] = i < T ? lse2[(size_t)bh * T + i] : 0.0f;
        Es[ii] = i < T ? delta[(size_t)bh * T + i] : 0.0f;
        Vr[ii] = i < T ? vis[i] : i;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < NF; kk++) nvcuda::wmma::load_matrix_sync(qf[kk], KV + w * 16 * DH + kk * 16, DH);
    __syncthreads();
    mot_tc_tile<DH, BQ>(KV, dO, rows, q0, T, D, h, tid);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < NF; kk++) {
        nvcuda::wmma::load_matrix_sync(df[kk], KV + w * 16 * DH + kk * 16, DH);
        nvcuda::wmma::fill_fragment(dqa[kk], 0.0f);
    }
    float *Sw = SD + w * 16 * BK, *dPw = SD + (BQ + w * 16) * BK;
    mot_bf16* dSw = dS + w * 16 * BK;
    const int kend = vis[min(T, q0 + BQ) - 1] + 1;  // the tile's largest vis (causal: min(T, q0 + BQ))
    for (int k0 = 0; k0 < kend; k0 += BK) {
        __syncthreads();
        mot_tc_tile<DH, BK>(Ks, k, rows, k0, T, D, h, tid);
        mot_tc_tile<DH, BK>(Vs, v, rows, k0, T, D, h, tid);
        __syncthreads();
#pragma unroll
        for (int n = 0; n < BK / 16; n++) {
            MotFragC s, dp;
            nvcuda::wmma::fill_fragment(s, 0.0f);
            nvcuda::wmma::fill_fragment(dp, 0.0f);
            mot_tc_abt<DH>(s, qf, Ks + n * 16 * DH);
            mot_tc_abt<DH>(dp, df, Vs + n * 16 * DH);
            nvcuda::wmma::store_matrix_sync(Sw + n * 16, s, BK, nvcuda::wmma::mem_row_major);
            nvcuda::wmma::store_matrix_sync(dPw + n * 16, dp, BK, nvcuda::wmma::mem_row_major);
        }
        __syncwarp();
        for (int e = lane; e < 16 * BK; e += 32) {
            const int ii = w * 16 + e / BK, j = k0 + e % BK;
            const float p = j <= Vr[ii] ? exp2f(Sw[e] * c2 - Ls[ii]) : 0.0f;
            dSw[e] = __float2bfloat16(p * (dPw[e] - Es[ii]));
        }
        __syncwarp();
        mot_tc_ab<DH, BK, BK>(dqa, dSw, Ks);
        __syncwarp();
    }
    mot_tc_write<DH>(dq.f, dq.b, dqa, Sw, nullptr, scale, rows, q0 + w * 16, T, D, h, lane);
}

// ---- SwiGLU --------------------------------------------------------------------------------
// CPU twin: swiglu_forward, swiglu_backward
// One elementwise pass each way; in bf16 mode u1, u3, u, du and du1, du3 are all bf16 (6 bytes
// per element forward, 10 backward). cuBLASLt has no gated epilogue (only bias, ReLU, GELU and
// their gradients), so the GEMMs cannot produce u directly.
template <typename TA>
static __global__ void mot_swiglu_forward_kernel(MotBuf u, const TA* u1, const TA* u3, size_t n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float a = mot_ld(u1, i);
    mot_store(u.f, u.b, i, a / (1.0f + expf(-a)) * mot_ld(u3, i));
}
template <typename TA>
static __global__ void mot_swiglu_backward_kernel(MotBuf du1, MotBuf du3, const TA* du, const TA* u1, const TA* u3,
                                                  size_t n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float a = mot_ld(u1, i), s = 1.0f / (1.0f + expf(-a));
    mot_store(du1.f, du1.b, i, mot_ld(du, i) * mot_ld(u3, i) * s * (1.0f + a * (1.0f - s)));
    mot_store(du3.f, du3.b, i, mot_ld(du, i) * a * s);
}

// ---- experts (dev/MATH.md section 5; CPU twin: ffn_forward_experts / ffn_backward_experts) ---------
// Per layer and FFN copy f with E > 1 experts and rows [r0, r1) (n rows, C = ceil(n / E)):
// router and aux-router logits (fp32 GEMMs), softmax, expert choice (one block per expert),
// gather of each expert's C rows into its slots, the expert GEMMs, and the gated sum back into
// the rows. Arrays: s, a, slot_of are [row][Emax] (ld = Emax); sel is [slot]; ye is [slot][D].
// Every row's sum runs over the experts in order in one thread: no atomics, reproducible.

// gates s = softmax(router logits), one thread per row (in place; same order of operations as the CPU)
static __global__ void mot_router_softmax_kernel(float* s, int n, int E, int ld) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float* si = s + (size_t)i * ld;
    float mx = si[0], sum = 0;
    for (int e = 1; e < E; e++) mx = fmaxf(mx, si[e]);
    for (int e = 0; e < E; e++) {
        si[e] = expf(si[e] - mx);
        sum += si[e];
    }
    for (int e = 0; e < E; e++) si[e] /= sum;
}

// An unsigned key with the order of the float (larger score, larger key); -0 and +0 are one key,
// as they compare equal on the CPU.
__device__ __forceinline__ unsigned mot_score_key(float v) {
    unsigned u;
    memcpy(&u, &v, sizeof u);
    if (v == 0.0f) u = 0;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Expert choice for expert e = blockIdx.x: the C of n rows with the largest s[i][e], ties to the
// lower row i (the CPU's mot_expert_choice, exactly). A radix select finds the C-th largest key in
// 8 passes of 4-bit digits (per-thread counts over a contiguous chunk of rows, summed by a tree in
// shared memory), then a scan in row order takes the rows above it and the first rows equal to it.
// Writes sel[slot0 + e*C + j] = r0 + i for the j-th taken row and slot_of[i][e] = its slot or -1.
enum { MOT_SEL_THREADS = 256, MOT_SEL_BITS = 4, MOT_SEL_BINS = 1 << MOT_SEL_BITS };
static __global__ void __launch_bounds__(MOT_SEL_THREADS)
    mot_expert_select_kernel(int* sel, int* slot_of, const float* s, int ld, int n, int C, int r0, int slot0) {
    __shared__ int cnt[MOT_SEL_BINS][MOT_SEL_THREADS];
    __shared__ int run[2][MOT_SEL_THREADS];
    const int e = blockIdx.x, tid = threadIdx.x, per = (n + MOT_SEL_THREADS - 1) / MOT_SEL_THREADS;
    const int a = min(n, tid * per), b = min(n, a + per);
    unsigned prefix = 0, mask = 0;
    int k = C;  // the k-th largest key among those that match prefix under mask
    for (int shift = 32 - MOT_SEL_BITS; shift >= 0; shift -= MOT_SEL_BITS) {
        int c[MOT_SEL_BINS];
#pragma unroll
        for (int j = 0; j < MOT_SEL_BINS; j++) c[j] = 0;
        for (int i = a; i < b; i++) {
            const unsigned key = mot_score_key(s[(size_t)i * ld + e]);
            if ((key & mask) != prefix) continue;
            const unsigned d = (key >> shift) & (MOT_SEL_BINS - 1);
#pragma unroll
            for (int j = 0; j < MOT_SEL_BINS; j++) c[j] += d == (unsigned)j;
        }
#pragma unroll
        for (int j = 0; j < MOT_SEL_BINS; j++) cnt[j][tid] = c[j];
        __syncthreads();
        for (int st = MOT_SEL_THREADS / 2; st > 0; st >>= 1) {
            if (tid < st)
#pragma unroll
                for (int j = 0; j < MOT_SEL_BINS; j++) cnt[j][tid] += cnt[j][tid + st];
            __syncthreads();
        }
        // every thread makes the same choice: the digit whose bin holds the k-th largest
        int above = 0, d = MOT_SEL_BINS - 1;
        for (; d > 0; d--) {
            if (above + cnt[d][0] >= k) break;
            above += cnt[d][0];
        }
        k -= above;
        prefix |= (unsigned)d << shift;
        mask |= (unsigned)(MOT_SEL_BINS - 1) << shift;
        __syncthreads();  // all have read cnt before the next pass writes it
    }
    const unsigned thr = prefix;  // the C-th largest key; take k of the rows equal to it
    int gt = 0, eq = 0;
    for (int i = a; i < b; i++) {
        const unsigned key = mot_score_key(s[(size_t)i * ld + e]);
        gt += key > thr;
        eq += key == thr;
    }
    run[0][tid] = gt;
    run[1][tid] = eq;
    __syncthreads();
    if (tid == 0) {  // exclusive prefix sums over the threads' chunks, in row order
        int sg = 0, sq = 0;
        for (int t = 0; t < MOT_SEL_THREADS; t++) {
            const int x = run[0][t], y = run[1][t];
            run[0][t] = sg;
            run[1][t] = sq;
            sg += x;
            sq += y;
        }
    }
    __syncthreads();
    gt = run[0][tid];
    eq = run[1][tid];
    for (int i = a; i < b; i++) {
        const unsigned key = mot_score_key(s[(size_t)i * ld + e]);
        const int j = gt + min(eq, k);  // taken rows before row i
        const bool take = key > thr || (key == thr && eq < k);
        gt += key > thr;
        eq += key == thr;
        if (take) sel[slot0 + e * C + j] = r0 + i;
        slot_of[(size_t)i * ld + e] = take ? slot0 + e * C + j : -1;
    }
}

// Auxiliary routers, one thread per row: a = sigmoid(z) in place. With expert choice (ec) also the
// row's BCE against [row in S_e] from the logits (softplus(z) - t z, in double as on the CPU) into
// row[i], and into row[n + i] whether a > 0.5 picks exactly the EC experts.
static __global__ void mot_aux_router_kernel(float* a, double* row, const int* slot_of, int n, int E, int ld, int ec) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    double bce = 0;
    bool same = true;
    for (int e = 0; e < E; e++) {
        const float z = a[(size_t)i * ld + e];
        if (ec) {
            const bool t = slot_of[(size_t)i * ld + e] >= 0;
            const double zd = z;
            bce += fmax(zd, 0.0) + log1p(exp(-fabs(zd))) - (t ? zd : 0.0);
            same = same && ((z > 0) == t);
        }
        a[(size_t)i * ld + e] = 1.0f / (1.0f + expf(-z));
    }
    if (ec) {
        row[i] = bce;
        row[n + i] = same ? 1.0 : 0.0;
    }
}
// One block: out[0] += (sum of row[0 .. n)) / nE, out[1] += sum of row[n .. 2n); fixed order.
static __global__ void __launch_bounds__(MOT_SEL_THREADS)
    mot_aux_reduce_kernel(double* out, const double* row, int n, double nE) {
    __shared__ double sm[2][MOT_SEL_THREADS];
    const int tid = threadIdx.x, per = (n + MOT_SEL_THREADS - 1) / MOT_SEL_THREADS;
    double s0 = 0, s1 = 0;
    for (int r = tid * per; r < min(n, (tid + 1) * per); r++) {
        s0 += row[r];
        s1 += row[n + r];
    }
    sm[0][tid] = s0;
    sm[1][tid] = s1;
    __syncthreads();
    for (int st = MOT_SEL_THREADS / 2; st > 0; st >>= 1) {
        if (tid < st) {
            sm[0][tid] += sm[0][tid + st];
            sm[1][tid] += sm[1][tid + st];
        }
        __syncthreads();
    }
    if (tid == 0) {
        out[0] += sm[0][0] / nE;
        out[1] += sm[1][0];
    }
}

// x[slot] = h[sel[slot]] for `slots` slots, D wide, in the precision of the GEMM operand x
static __global__ void mot_gather_rows_kernel(MotBuf x, const float* hf, const mot_bf16* hb, const int* sel, int slots,
                                              int D) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)slots * D) return;
    const size_t src = (size_t)sel[i / D] * D + i % D;
    if (x.f) x.f[i] = hf[src];
    if (x.b) x.b[i] = hb[src];
}
// y[i] = sum over experts e (in order) that took row i of s[i][e] ye[slot_of[i][e]]  (0 if none)
static __global__ void mot_expert_combine_kernel(float* y, const float* ye, const float* s, const int* slot_of, int n,
                                                 int E, int ld, int D) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)n * D) return;
    const size_t i = idx / D, d = idx % D;
    float acc = 0;
    for (int e = 0; e < E; e++) {
        const int sl = slot_of[i * ld + e];
        if (sl >= 0) acc += s[i * ld + e] * ye[(size_t)sl * D + d];
    }
    y[idx] = acc;
}
// Causal routing, expert e having run on all n rows (ye[i], row order): y[i] (+)= s[i][e] ye[i]
// where a[i][e] > 0.5. Experts are added one launch at a time, in order (first: y = 0 + ...).
static __global__ void mot_expert_causal_add_kernel(float* y, const float* ye, const float* s, const float* a, int n,
                                                    int e, int ld, int D, int first) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)n * D) return;
    const size_t i = idx / D;
    float acc = first ? 0.0f : y[idx];
    if (a[i * ld + e] > 0.5f) acc += s[i * ld + e] * ye[idx];
    y[idx] = acc;
}
// Each expert's own norm, in place, one warp per slot: ye = ye * rstd, rstd = 1/rms(ye) (no gain).
static __global__ void mot_expert_norm_kernel(float* ye, float* rstd, int slots, int D) {
    const int w = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (w >= slots) return;  // the whole warp leaves together
    float* yj = ye + (size_t)w * D;
    float ss = 0;
    for (int d = lane; d < D; d += 32) ss += yj[d] * yj[d];
    ss = mot_warp_sum(ss);
    const float r = 1.0f / sqrtf(ss / (float)D + (float)MOT_NORM_EPS);
    if (lane == 0) rstd[w] = r;
    for (int d = lane; d < D; d += 32) yj[d] *= r;
}
// Backward of the gated sum of normalised outputs n (= ye), one warp per slot of the copy (slots
// slot0 .. slot0 + E*C): ds[row][e] = dt[row] . n[slot], and the gradient of the expert's output
// before its norm dye[slot] = s r (dt[row] - n[slot] ds / D).
static __global__ void mot_expert_dye_kernel(MotBuf dye, float* ds, const float* dt, const float* ye,
                                             const float* ye_rstd, const float* s, const int* sel, int slot0, int slots,
                                             int C, int ld, int D) {
    const int w = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (w >= slots) return;  // the whole warp leaves together
    const int sl = slot0 + w, e = w / C, r = sel[sl];
    const float gs = s[(size_t)r * ld + e], rs = ye_rstd[sl];
    const float *dti = dt + (size_t)r * D, *nj = ye + (size_t)sl * D;
    float dot = 0;
    for (int d = lane; d < D; d += 32) dot += dti[d] * nj[d];
    dot = mot_warp_sum(dot);
    for (int d = lane; d < D; d += 32)
        mot_store(dye.f, dye.b, (size_t)sl * D + d, gs * rs * (dti[d] - nj[d] * dot / (float)D));
    if (lane == 0) ds[(size_t)r * ld + e] = dot;
}
// dh[i] += sum over experts e (in order) that took row i of dX[slot_of[i][e]]
static __global__ void mot_expert_scatter_kernel(float* dh, const float* dX, const int* slot_of, int n, int E, int ld,
                                                 int D) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)n * D) return;
    const size_t i = idx / D, d = idx % D;
    float acc = dh[idx];
    for (int e = 0; e < E; e++) {
        const int sl = slot_of[i * ld + e];
        if (sl >= 0) acc += dX[(size_t)sl * D + d];
    }
    dh[idx] = acc;
}
// One thread per row: the softmax backward in place, ds <- s (ds - sum_k s_k ds_k); and the aux
// BCE gradient dz = w (a - [row in S_e]) with w = MOT_AUX_WEIGHT / (n E).
static __global__ void mot_router_backward_kernel(float* ds, float* dz, const float* s, const float* a,
                                                  const int* slot_of, int n, int E, int ld, float w) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const size_t o = (size_t)i * ld;
    float dot = 0;
    for (int e = 0; e < E; e++) dot += s[o + e] * ds[o + e];
    for (int e = 0; e < E; e++) {
        ds[o + e] = s[o + e] * (ds[o + e] - dot);
        dz[o + e] = (a[o + e] - (slot_of[o + e] >= 0 ? 1.0f : 0.0f)) * w;
    }
}

// ---- cross-entropy over one chunk of rows (block per row, two passes over the row) ---------
// CPU twin: cross_entropy
enum { MOT_CE_THREADS = 256 };
static __global__ void __launch_bounds__(MOT_CE_THREADS)
    mot_ce_forward_kernel(float* lse, float* row_loss, const float* logits, const int* tgt, int V) {
    __shared__ float red[MOT_CE_THREADS];
    const int r = blockIdx.x, tid = threadIdx.x;
    const float* lg = logits + (size_t)r * V;
    float mx = -INFINITY;
    for (int j = tid; j < V; j += MOT_CE_THREADS) mx = fmaxf(mx, lg[j]);
    red[tid] = mx;
    __syncthreads();
    for (int s = MOT_CE_THREADS / 2; s > 0; s >>= 1) {
        if (tid < s) red[tid] = fmaxf(red[tid], red[tid + s]);
        __syncthreads();
    }
    mx = red[0];
    __syncthreads();
    float sum = 0;
    for (int j = tid; j < V; j += MOT_CE_THREADS) sum += expf(lg[j] - mx);
    red[tid] = sum;
    __syncthreads();
    for (int s = MOT_CE_THREADS / 2; s > 0; s >>= 1) {
        if (tid < s) red[tid] += red[tid + s];
        __syncthreads();
    }
    if (tid == 0) {
        const float l = logf(red[0]) + mx;
        const int t = tgt[r];
        lse[r] = l;
        row_loss[r] = t >= 0 ? l - lg[t] : 0.0f;
    }
}
// dlogits = (softmax - onehot(target)) / n_valid, 0 for ignored rows. In place (lf == logits)
// in fp32 mode, into the bf16 buffer lb in bf16 mode.
static __global__ void mot_ce_backward_kernel(float* lf, mot_bf16* lb, const float* logits, const float* lse,
                                              const int* tgt, int rows, int V, float inv_n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * V) return;
    const int r = (int)(i / V), j = (int)(i % V), t = tgt[r];
    float d = 0;
    if (t >= 0) d = expf(logits[i] - lse[r]) * inv_n - (j == t ? inv_n : 0.0f);
    mot_store(lf, lb, i, d);
}
// One block: out[0] = sum of row losses, out[1 + m] = the sum over rows whose target has
// modality m. Each thread sums a contiguous range in order, then a fixed tree.
enum { MOT_RED_THREADS = 256 };
static __global__ void __launch_bounds__(MOT_RED_THREADS)
    mot_loss_reduce_kernel(double* out, const float* row_loss, const int* tgt, int N, int image_begin,
                           int speech_begin) {
    __shared__ double sm[4][MOT_RED_THREADS];
    const int tid = threadIdx.x, per = (N + MOT_RED_THREADS - 1) / MOT_RED_THREADS;
    double s[4] = {0, 0, 0, 0};
    for (int r = tid * per; r < min(N, (tid + 1) * per); r++) {
        const int t = tgt[r];
        if (t < 0) continue;
        const double l = row_loss[r];
        s[0] += l;
        s[1 + (t < image_begin ? 0 : t < speech_begin ? 1 : 2)] += l;
    }
    for (int c = 0; c < 4; c++) sm[c][tid] = s[c];
    __syncthreads();
    for (int st = MOT_RED_THREADS / 2; st > 0; st >>= 1) {
        if (tid < st)
            for (int c = 0; c < 4; c++) sm[c][tid] += sm[c][tid + st];
        __syncthreads();
    }
    if (tid < 4) out[tid] = sm[tid][0];
}

// ---- Transfusion: the diffusion loss (CPU: diffusion_loss) -----------------------------------
// One thread per image row: eps_hat += b_out (the GEMM wrote z W_out), the squared error against
// eps in double, and deps = w(t) scale (eps_hat - eps) with scale = 5 * 2 / (n * 16) (n noised
// rows) on noised rows, 0 on clean (t = 0) ones, which add no loss. w_of_t: the weight of each
// step (min-SNR; then row_wse gets each row's weighted error), or null for the plain MSE (w = 1).
static __global__ void mot_mse_kernel(float* eps_hat, float* deps, double* row_se, double* row_wse, const float* b_out,
                                      const float* eps, const int* step_of, const int* step_t, const double* w_of_t,
                                      int n, double scale) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n) return;
    const int t = step_t[step_of[r]];
    const bool noised = t > 0;
    const double w = w_of_t ? w_of_t[t] : 1.0, ws = w * scale;
    double se = 0;
    for (int j = 0; j < MOT_PATCH; j++) {
        const size_t i = (size_t)r * MOT_PATCH + j;
        const float e = eps_hat[i] + b_out[j];
        eps_hat[i] = e;
        const double d = (double)e - (double)eps[i];
        se += d * d;
        deps[i] = noised ? (float)(ws * d) : 0.0f;
    }
    row_se[r] = noised ? se : 0.0;
    if (w_of_t) row_wse[r] = noised ? w * se : 0.0;
}
// One block: out[0] = sum of x[0, n), each thread a contiguous range in order, then a fixed tree.
static __global__ void __launch_bounds__(MOT_RED_THREADS) mot_sum_kernel(double* out, const double* x, int n) {
    __shared__ double sm[MOT_RED_THREADS];
    const int tid = threadIdx.x, per = (n + MOT_RED_THREADS - 1) / MOT_RED_THREADS;
    double s = 0;
    for (int r = tid * per; r < min(n, (tid + 1) * per); r++) s += x[r];
    sm[tid] = s;
    __syncthreads();
    for (int st = MOT_RED_THREADS / 2; st > 0; st >>= 1) {
        if (tid < st) sm[tid] += sm[tid + st];
        __syncthreads();
    }
    if (tid == 0) out[0] = sm[0];
}

// ---- embedding: x[r] = E[token of grouped row r] -------------------------------------------
// CPU twin: the embedding gather of mot_forward and the embedding gradient of mot_backward
static __global__ void mot_embed_kernel(float* x, mot_bf16* xb, const float* emb, const int* tok_g, int N, int D) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)N * D) return;
    const size_t r = i / D, j = i % D;
    mot_store(x, xb, i, emb[(size_t)tok_g[r] * D + j]);
}

// Embedding gradient: one block per distinct token, rows summed in increasing row order.
static __global__ void mot_embed_backward_kernel(float* dE, const float* dx, const int* rows, const int* tok,
                                                 const int* start, int D) {
    const int u = blockIdx.x, r0 = start[u], r1 = start[u + 1];
    float* e = dE + (size_t)tok[u] * D;
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float acc = 0;
        for (int k = r0; k < r1; k++) acc += dx[(size_t)rows[k] * D + j];
        e[j] += acc;
    }
}

// ---- Transfusion: image input x_t W_in + b_in + sinusoid(t) W_t (CPU: mot_sinusoid, mot_forward)
// The image rows take this in place of an embedding row. sinusoid(t) = [sin(t w_j) || cos(t w_j)],
// w_j = 10000^(-2j/D), in double as mot_sinusoid; one row per distinct step of the batch.
static __global__ void mot_sinusoid_kernel(float* s, const int* step_t, int n, int D) {
    const int half = D / 2;
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n * half) return;
    const int k = (int)(i / half), j = (int)(i % half);
    const double w = pow(10000.0, -2.0 * j / D);
    s[(size_t)k * D + j] = (float)sin(step_t[k] * w);
    s[(size_t)k * D + half + j] = (float)cos(step_t[k] * w);
}
// x = (x_t W_in, which the GEMM left in x) + temb[step of the row] + b_in over the n image rows,
// into x and its bf16 copy
static __global__ void mot_image_input_kernel(float* x, mot_bf16* xb, const float* b_in, const float* temb,
                                              const int* step_of, int n, int D) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)n * D) return;
    const size_t r = i / D, j = i % D;
    mot_store(x, xb, i, x[i] + temb[(size_t)step_of[r] * D + j] + b_in[j]);
}
// dtemb[k] = sum of dx over the image rows of step k, in increasing row order (as the embedding)
static __global__ void mot_temb_backward_kernel(float* dtemb, const float* dx, const int* rows, const int* start,
                                                int D) {
    const int k = blockIdx.x, r0 = start[k], r1 = start[k + 1];
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float acc = 0;
        for (int u = r0; u < r1; u++) acc += dx[(size_t)rows[u] * D + j];
        dtemb[(size_t)k * D + j] = acc;
    }
}

// ---- gradient norm (deterministic: fixed chunks per block, fixed trees) and AdamW ----------
// CPU twin: mot_grad_norm, mot_adamw_step
enum { MOT_NORM_BLOCKS = 1024 };
static __global__ void __launch_bounds__(MOT_RED_THREADS)
    mot_sumsq_partial_kernel(double* part, const float* x, size_t n, float scale) {
    __shared__ double sm[MOT_RED_THREADS];
    const size_t chunk = (n + MOT_NORM_BLOCKS - 1) / MOT_NORM_BLOCKS;
    const size_t a = (size_t)blockIdx.x * chunk, b = min(n, a + chunk);
    double s = 0;
    for (size_t i = a + threadIdx.x; i < b; i += MOT_RED_THREADS) {
        const double v = (double)(x[i] * scale);
        s += v * v;
    }
    sm[threadIdx.x] = s;
    __syncthreads();
    for (int st = MOT_RED_THREADS / 2; st > 0; st >>= 1) {
        if ((int)threadIdx.x < st) sm[threadIdx.x] += sm[threadIdx.x + st];
        __syncthreads();
    }
    if (threadIdx.x == 0) part[blockIdx.x] = sm[0];
}
static __global__ void __launch_bounds__(MOT_RED_THREADS) mot_sumsq_final_kernel(double* out, const double* part) {
    __shared__ double sm[MOT_RED_THREADS];
    double s = 0;
    for (int i = threadIdx.x; i < MOT_NORM_BLOCKS; i += MOT_RED_THREADS) s += part[i];
    sm[threadIdx.x] = s;
    __syncthreads();
    for (int st = MOT_RED_THREADS / 2; st > 0; st >>= 1) {
        if ((int)threadIdx.x < st) sm[threadIdx.x] += sm[threadIdx.x + st];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = sm[0];
}
// Same arithmetic as mot_adamw_step in mot.h; the clip factor is computed on the device from
// the squared norm, so nothing waits for the host.
static __global__ void mot_adamw_kernel(float* w, mot_bf16* wb, const float* gr, float* mm, float* vv, size_t n,
                                        float grad_scale, const double* norm2, double grad_clip, float b1, float b2,
                                        float inv_bc1, float inv_bc2, float eps, float lr, float keep) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const double norm = sqrt(*norm2);
    const float clip = (float)((grad_clip > 0 && norm > grad_clip) ? grad_clip / (norm + 1e-6) : 1.0);
    const float gi = (gr[i] * grad_scale) * clip;
    const float m = b1 * mm[i] + (1.0f - b1) * gi;
    const float v = b2 * vv[i] + (1.0f - b2) * gi * gi;
    mm[i] = m;
    vv[i] = v;
    const float nw = w[i] * keep - lr * (m * inv_bc1) / (sqrtf(v * inv_bc2) + eps);
    w[i] = nw;
    if (wb) wb[i] = __float2bfloat16(nw);
}
static __global__ void mot_to_bf16_kernel(mot_bf16* dst, const float* src, size_t n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = __float2bfloat16(src[i]);
}

// ============================================================================================
// 3. GEMMs
// ============================================================================================
// Row-major C[M x N] = op(A)[M x K] op(B)[K x N] + beta C (leading dimensions in elements).
// cuBLAS is column-major, where a row-major X is X^T, so it computes C^T = op(B)^T op(A)^T:
// gemm(opB, opA, m = N, n = M, k = K, B, ldb, A, lda, C, ldc).
// mot_gemm_as: operands in bf16 (bf) or fp32; mot_gemm: in the precision of the mode. C is fp32,
// or bf16 (an activation that only feeds bf16 consumers: bf16 operands, fp32 accumulation, the
// result rounded to nearest even once, as cuBLAS's epilogue does).
static inline void mot_gemm_to(MotGpu* g, bool bf, bool transA, bool transB, int M, int N, int K, const void* A,
                               int lda, const void* B, int ldb, float beta, void* C, bool c_bf, int ldc) {
    if (M <= 0 || N <= 0 || K <= 0) return;
    if (c_bf && !bf) {
        fprintf(stderr, "mot_gemm: a bf16 result needs bf16 operands\n");
        exit(1);
    }
    const cudaDataType_t t = bf ? CUDA_R_16BF : CUDA_R_32F;
    const cublasComputeType_t ct = bf ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_PEDANTIC;
    const float alpha = 1.0f;
    MOT_CUBLAS_CHECK(cublasGemmEx(g->cublas, transB ? CUBLAS_OP_T : CUBLAS_OP_N, transA ? CUBLAS_OP_T : CUBLAS_OP_N, N,
                                  M, K, &alpha, B, t, ldb, A, t, lda, &beta, C, c_bf ? CUDA_R_16BF : CUDA_R_32F, ldc,
                                  ct, CUBLAS_GEMM_DEFAULT));
}
static inline void mot_gemm_as(MotGpu* g, bool bf, bool transA, bool transB, int M, int N, int K, const void* A,
                               int lda, const void* B, int ldb, float beta, float* C, int ldc) {
    mot_gemm_to(g, bf, transA, transB, M, N, K, A, lda, B, ldb, beta, C, false, ldc);
}
static inline void mot_gemm(MotGpu* g, bool transA, bool transB, int M, int N, int K, const void* A, int lda,
                            const void* B, int ldb, float beta, float* C, int ldc) {
    mot_gemm_as(g, g->bf16, transA, transB, M, N, K, A, lda, B, ldb, beta, C, ldc);
}
// into an activation, at element `off`: its fp32 array if it has one, else its bf16 array
static inline void mot_gemm(MotGpu* g, bool transA, bool transB, int M, int N, int K, const void* A, int lda,
                            const void* B, int ldb, float beta, const MotBuf& C, size_t off, int ldc) {
    if (C.f) mot_gemm_to(g, g->bf16, transA, transB, M, N, K, A, lda, B, ldb, beta, C.f + off, false, ldc);
    else mot_gemm_to(g, g->bf16, transA, transB, M, N, K, A, lda, B, ldb, beta, C.b + off, true, ldc);
}
// element `off` of a GEMM operand, in the precision of the mode
static inline const void* mot_op(const MotGpu* g, const MotBuf& b, size_t off) {
    return g->bf16 ? (const void*)(b.b + off) : (const void*)(b.f + off);
}
static inline const void* mot_weight(const MotGpu* g, int p, int layer, int copy) {
    const size_t at = g->tab.p[p].at(layer, copy);
    return g->bf16 ? (const void*)(g->params_bf + at) : (const void*)(g->params + at);
}
// y[rows] = x[rows] W[copy], one GEMM per contiguous row range of a tower (host-side ranges)
static inline void mot_linear_forward(MotGpu* g, const MotBuf& y, const MotBuf& x, int p, int layer) {
    const MotParamInfo& info = g->tab.p[p];
    const int in = info.rows, out = info.cols;
    mot_for_each_copy(info.copies, g->plan.group, [&](int c, int r0, int r1) {
        mot_gemm(g, false, false, r1 - r0, out, in, mot_op(g, x, (size_t)r0 * in), in, mot_weight(g, p, layer, c), out,
                 0.0f, y, (size_t)r0 * out, out);
    });
}
// dx[rows] = dx_beta * dx[rows] + dy[rows] W[copy]^T  (dx may be empty);
// dW[copy] = dw_beta * dW[copy] + x[rows]^T dy[rows]
static inline void mot_linear_backward(MotGpu* g, const MotBuf& dx, float dx_beta, const MotBuf& dy, const MotBuf& x,
                                       int p, int layer, float dw_beta) {
    const MotParamInfo& info = g->tab.p[p];
    const int in = info.rows, out = info.cols;
    mot_for_each_copy(info.copies, g->plan.group, [&](int c, int r0, int r1) {
        const int n = r1 - r0;
        if (dx.f || dx.b)
            mot_gemm(g, false, true, n, in, out, mot_op(g, dy, (size_t)r0 * out), out, mot_weight(g, p, layer, c), out,
                     dx_beta, dx, (size_t)r0 * in, in);
        mot_gemm(g, true, false, in, out, n, mot_op(g, x, (size_t)r0 * in), in, mot_op(g, dy, (size_t)r0 * out), out,
                 dw_beta, g->grads + info.at(layer, c), out);
    });
}

// ============================================================================================
// 4. The public API
// ============================================================================================
inline bool mot_gpu_available(std::string* why) {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        if (why) *why = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
        cudaGetLastError();  // clear the sticky-free error so later calls start clean
        return false;
    }
    if (n == 0) {
        if (why) *why = "no CUDA device";
        return false;
    }
    return true;
}

// head dims with an attention kernel instantiation
inline bool mot_gpu_head_dim_ok(int Dh) {
    return Dh == 2 || Dh == 4 || Dh == 8 || Dh == 16 || Dh == 32 || Dh == 64 || Dh == 128;
}

inline bool mot_gpu_init(MotGpu* g, const MotConfig& c, int B, int T, bool bf16, std::string* err) {
    std::string bad = mot_config_error(c);
    if (!bad.empty()) {
        if (err) *err = "bad config: " + bad;
        return false;
    }
    const int Dh = c.d_model / c.n_head;
    if (!mot_gpu_head_dim_ok(Dh)) {
        if (err)
            *err = "head dimension " + std::to_string(Dh) +
                   " is not supported by the GPU attention kernels "
                   "(supported: 2, 4, 8, 16, 32, 64, 128)";
        return false;
    }
    if (B < 1 || T < 1 || T > c.max_seq) {
        if (err)
            *err = "bad batch shape B=" + std::to_string(B) + " T=" + std::to_string(T) + " (max_seq " +
                   std::to_string(c.max_seq) + ")";
        return false;
    }
    if ((size_t)B * T * std::max(c.d_ff, std::max(c.d_model, c.vocab)) > (size_t)INT32_MAX) {
        if (err) *err = "batch too large for 32-bit GEMM row offsets";
        return false;
    }
    std::string why;
    if (!mot_gpu_available(&why)) {
        if (err) *err = "no GPU: " + why;
        return false;
    }
    *g = MotGpu();
    g->cfg = c;
    g->tab = mot_param_table(c);
    g->bf16 = bf16;
    g->maxB = B;
    g->maxT = T;
    g->maxN = B * T;
    const size_t L = c.n_layer, D = c.d_model, H = c.n_head, F = c.d_ff, V = c.vocab, N = (size_t)B * T;
    const size_t P = g->tab.total;
    // expert slots, sized as the CPU's (E_f <= MOT_MAX_EXPERT, checked by mot_config_error)
    g->experts = mot_has_experts(c);
    size_t NS, Em;
    mot_expert_sizes(c, N, &NS, &Em);
    g->Emax = (int)Em;
    MOT_CUDA_CHECK(cudaStreamCreateWithFlags(&g->stream, cudaStreamNonBlocking));
    MOT_CUBLAS_CHECK(cublasCreate(&g->cublas));
    MOT_CUBLAS_CHECK(cublasSetStream(g->cublas, g->stream));
    const size_t ws = 32u << 20;  // a fixed workspace keeps cuBLAS results reproducible on a stream
    MOT_CUDA_CHECK(cudaMalloc(&g->cublas_ws, ws));
    g->bytes += ws;
    MOT_CUBLAS_CHECK(cublasSetWorkspace(g->cublas, g->cublas_ws, ws));
    MOT_CUBLAS_CHECK(cublasSetMathMode(g->cublas, CUBLAS_DEFAULT_MATH));

    g->params = mot_dev_alloc<float>(g, P);
    g->grads = mot_dev_alloc<float>(g, P);
    g->adam_m = mot_dev_alloc<float>(g, P);
    g->adam_v = mot_dev_alloc<float>(g, P);
    MOT_CUDA_CHECK(cudaMemsetAsync(g->params, 0, P * 4, g->stream));
    MOT_CUDA_CHECK(cudaMemsetAsync(g->grads, 0, P * 4, g->stream));
    MOT_CUDA_CHECK(cudaMemsetAsync(g->adam_m, 0, P * 4, g->stream));
    MOT_CUDA_CHECK(cudaMemsetAsync(g->adam_v, 0, P * 4, g->stream));
    if (bf16) g->params_bf = mot_dev_alloc<mot_bf16>(g, P);

    // RoPE tables, the CPU's
    std::vector<float> cs, sn;
    mot_rope_tables(c, &cs, &sn);
    g->rope_cos = mot_dev_alloc<float>(g, cs.size());
    g->rope_sin = mot_dev_alloc<float>(g, sn.size());
    MOT_CUDA_CHECK(cudaMemcpyAsync(g->rope_cos, cs.data(), cs.size() * 4, cudaMemcpyHostToDevice, g->stream));
    MOT_CUDA_CHECK(cudaMemcpyAsync(g->rope_sin, sn.data(), sn.size() * 4, cudaMemcpyHostToDevice, g->stream));
    MOT_CUDA_CHECK(cudaStreamSynchronize(g->stream));  // cs, sn are about to go out of scope

    // activations: fp32 or bf16 by mode (buf), the residual stream fp32 (with bf16 copies)
    auto buf = [&](size_t n) {
        MotBuf b;
        if (bf16) b.b = mot_dev_alloc<mot_bf16>(g, n);
        else b.f = mot_dev_alloc<float>(g, n);
        return b;
    };
    g->x = mot_dev_alloc<float>(g, (L + 1) * N * D);
    g->h = mot_dev_alloc<float>(g, L * N * D);
    g->q = buf(L * N * D);
    g->k = buf(L * N * D);
    g->v = buf(L * N * D);
    g->qr = buf(L * N * D);
    g->kr = buf(L * N * D);
    g->o = buf(L * N * D);
    g->a = buf(L * N * D);
    g->y2 = g->experts ? mot_f32(mot_dev_alloc<float>(g, L * N * D)) : buf(L * N * D);
    g->u1 = buf(L * NS * F);
    g->u3 = buf(L * NS * F);
    g->u = buf(L * NS * F);
    g->q_rstd = mot_dev_alloc<float>(g, L * N * H);
    g->k_rstd = mot_dev_alloc<float>(g, L * N * H);
    g->a_rstd = mot_dev_alloc<float>(g, L * N);
    g->y2_rstd = mot_dev_alloc<float>(g, L * N);
    g->z_rstd = mot_dev_alloc<float>(g, N);
    g->lse = mot_dev_alloc<float>(g, L * N * H);  // L x B x H x T
    g->z_f = nullptr;
    g->x_b = g->h_b = g->z_b = nullptr;
    if (bf16) {
        g->x_b = mot_dev_alloc<mot_bf16>(g, L * N * D);  // layer inputs x^0 .. x^(L-1)
        g->h_b = mot_dev_alloc<mot_bf16>(g, L * N * D);
        g->z_b = mot_dev_alloc<mot_bf16>(g, N * D);
    } else {
        g->z_f = mot_dev_alloc<float>(g, N * D);
    }
    // output head: chunks of rows so the logits never need N x V memory
    const size_t budget = (size_t)1 << 26;  // elements of one logits chunk (256 MB fp32)
    g->head_rows = (int)std::max<size_t>(1, std::min<size_t>(N, budget / V));
    g->logits = mot_dev_alloc<float>(g, (size_t)g->head_rows * V);
    g->dlogits_b = bf16 ? mot_dev_alloc<mot_bf16>(g, (size_t)g->head_rows * V) : nullptr;
    g->ce_lse = mot_dev_alloc<float>(g, N);
    g->row_loss = mot_dev_alloc<float>(g, N);
    g->loss_out = mot_dev_alloc<double>(g, 5);
    // backward scratch
    g->dx = mot_dev_alloc<float>(g, N * D);
    g->dt = mot_dev_alloc<float>(g, N * D);
    g->dO = buf(N * D);
    g->dq = buf(N * D);
    g->dk = buf(N * D);
    g->dyun = buf(N * D);
    g->du = buf(NS * F);
    g->delta = mot_dev_alloc<float>(g, N * H);
    g->gdy = buf(N * D);
    g->du1 = buf(NS * F);
    g->du3 = buf(NS * F);
    if (g->experts) {
        g->gate = mot_dev_alloc<float>(g, L * N * Em);
        g->aux = mot_dev_alloc<float>(g, L * N * Em);
        g->slot_of = mot_dev_alloc<int>(g, L * N * Em);
        g->sel = mot_dev_alloc<int>(g, L * NS);
        g->ye = mot_dev_alloc<float>(g, L * NS * D);
        g->ye_rstd = mot_dev_alloc<float>(g, L * NS);
        g->xg = buf(NS * D);
        g->dye = buf(NS * D);
        g->dX = mot_dev_alloc<float>(g, NS * D);
        g->ds = mot_dev_alloc<float>(g, N * Em);
        g->dz = mot_dev_alloc<float>(g, N * Em);
        g->aux_row = mot_dev_alloc<double>(g, 2 * N);
        g->aux_out = mot_dev_alloc<double>(g, 2);
    }
    g->dv = buf(N * D);
    g->gqk = buf(N * D);
    // gain reduction partials: at most ceil(rows / MOT_GAIN_ROWS) chunks of C columns, with
    // rows * C = N * D for both the row norms (N x D) and the QK-norms (N*H x Dh)
    g->gain_part = mot_dev_alloc<float>(g, N * D / MOT_GAIN_ROWS + 2 * D + 64);
    g->norm_part = mot_dev_alloc<double>(g, MOT_NORM_BLOCKS);
    g->norm2 = mot_dev_alloc<double>(g, 1);
    // batch indices: tok_g, tgt_g, pos_g, row_of, emb_rows, emb_tok (N each), emb_start (N + 1), vis (N)
    const size_t ni = 8 * N + 1;
    g->idx_dev = mot_dev_alloc<int>(g, ni);
    MOT_CUDA_CHECK(cudaMallocHost(&g->idx_host, ni * sizeof(int)));
    MOT_CUDA_CHECK(cudaMallocHost(&g->host_out, 7 * sizeof(double)));
    g->tok_g = g->idx_dev;
    g->tgt_g = g->tok_g + N;
    g->pos_g = g->tgt_g + N;
    g->row_of = g->pos_g + N;
    g->emb_rows = g->row_of + N;
    g->emb_tok = g->emb_rows + N;
    g->emb_start = g->emb_tok + N;
    g->vis = g->emb_start + N + 1;
    // Transfusion. The image projections run in fp32 in both modes: w_in and w_out have one side of
    // 16 (GEMMs with K = 16 or N = 16 are memory-bound: bf16 operands would save nothing) and w_t is
    // applied per distinct step (at most 1001 rows a batch, however many image rows), so all three
    // cost a negligible part of a step, and fp32 keeps the predicted noise, whose error is the
    // loss, free of bf16 rounding. So z is also kept in fp32 in bf16 mode (z_f, for z W_out).
    g->tf = mot_transfusion(c);
    if (g->tf) {
        const size_t P16 = N * MOT_PATCH, S = std::min<size_t>(N, MOT_DIFF_STEPS + 1);
        if (!g->z_f) g->z_f = mot_dev_alloc<float>(g, N * D);
        g->pin = mot_dev_alloc<float>(g, P16);
        g->eps = mot_dev_alloc<float>(g, P16);
        g->eps_hat = mot_dev_alloc<float>(g, P16);
        g->deps = mot_dev_alloc<float>(g, P16);
        g->sinu = mot_dev_alloc<float>(g, S * D);
        g->temb = mot_dev_alloc<float>(g, S * D);
        g->dtemb = mot_dev_alloc<float>(g, S * D);
        g->row_se = mot_dev_alloc<double>(g, 2 * N + 1 + MOT_DIFF_STEPS + 1);
        g->row_wse = g->row_se + N;
        g->wse_sum = g->row_wse + N;
        g->snr_w = g->wse_sum + 1;
        std::vector<double> w(MOT_DIFF_STEPS + 1);
        for (int t = 0; t <= MOT_DIFF_STEPS; t++) w[t] = mot_diff_loss_weight(MOT_DIFF_MIN_SNR, t);
        MOT_CUDA_CHECK(cudaMemcpy(g->snr_w, w.data(), w.size() * sizeof(double), cudaMemcpyHostToDevice));
        // step_of, step_t, step_rows (N each), step_start (N + 1); the same layout on the host
        g->step_of = mot_dev_alloc<int>(g, 4 * N + 1);
        g->step_t = g->step_of + N;
        g->step_rows = g->step_t + N;
        g->step_start = g->step_rows + N;
        MOT_CUDA_CHECK(cudaMallocHost(&g->tf_idx_host, (4 * N + 1) * sizeof(int)));
        MOT_CUDA_CHECK(cudaMallocHost(&g->tf_host, 2 * P16 * sizeof(float)));
    }
    MOT_CUDA_CHECK(cudaStreamSynchronize(g->stream));
    return true;
}

inline void mot_gpu_free(MotGpu* g) {
    if (!g->stream) return;
    MOT_CUDA_CHECK(cudaStreamSynchronize(g->stream));
    void* ptrs[] = {g->params,    g->grads,    g->adam_m,   g->adam_v, g->params_bf, g->rope_cos, g->rope_sin,
                    g->x,         g->h,        g->q_rstd,   g->k_rstd, g->a_rstd,    g->y2_rstd,  g->z_rstd,
                    g->lse,       g->z_f,      g->x_b,      g->h_b,    g->z_b,       g->logits,   g->dlogits_b,
                    g->ce_lse,    g->row_loss, g->loss_out, g->dx,     g->dt,        g->delta,    g->gain_part,
                    g->norm_part, g->norm2,    g->idx_dev,  g->gate,   g->aux,       g->slot_of,  g->sel,
                    g->ye,        g->ye_rstd,  g->dX,       g->ds,     g->dz,        g->aux_row,  g->aux_out,
                    g->pin,       g->eps,      g->eps_hat,  g->deps,   g->sinu,      g->temb,     g->dtemb,
                    g->row_se,    g->step_of,  g->cublas_ws};
    const MotBuf bufs[] = {g->q,  g->k,  g->v,    g->qr, g->kr,  g->o,   g->a,   g->y2, g->u1,  g->u3, g->u,  g->dO,
                           g->dq, g->dk, g->dyun, g->du, g->gdy, g->du1, g->du3, g->dv, g->gqk, g->xg, g->dye};
    MOT_CUBLAS_CHECK(cublasDestroy(g->cublas));  // before its workspace is freed
    for (void* p : ptrs)
        if (p) MOT_CUDA_CHECK(cudaFree(p));
    for (const MotBuf& b : bufs) {
        if (b.f) MOT_CUDA_CHECK(cudaFree(b.f));
        if (b.b) MOT_CUDA_CHECK(cudaFree(b.b));
    }
    if (g->idx_host) MOT_CUDA_CHECK(cudaFreeHost(g->idx_host));
    if (g->host_out) MOT_CUDA_CHECK(cudaFreeHost(g->host_out));
    if (g->tf_idx_host) MOT_CUDA_CHECK(cudaFreeHost(g->tf_idx_host));
    if (g->tf_host) MOT_CUDA_CHECK(cudaFreeHost(g->tf_host));
    MOT_CUDA_CHECK(cudaStreamDestroy(g->stream));
    *g = MotGpu();
}

static inline void mot_gpu_check_model(const MotGpu* g, const MotConfig& c, size_t n) {
    if (mot_config_mismatch(c, g->cfg) != "" || n != g->tab.total) {
        fprintf(stderr, "mot_gpu: host model does not match the GPU model (%s, %zu vs %zu parameters)\n",
                mot_config_mismatch(c, g->cfg).c_str(), n, g->tab.total);
        exit(1);
    }
}

// Copies the parameters and Adam moments to the device (and refreshes the bf16 weight copy).
inline void mot_gpu_upload(MotGpu* g, const MotModel<float>& host) {
    mot_gpu_check_model(g, host.cfg, host.params.size());
    const size_t P = g->tab.total;
    // every copy is ordered on the model's (non-blocking) stream, then waited for
    MOT_CUDA_CHECK(cudaStreamSynchronize(g->stream));
    MOT_CUDA_CHECK(cudaMemcpyAsync(g->params, host.params.data(), P * 4, cudaMemcpyHostToDevice, g->stream));
    if (host.adam_m.size() == P && host.adam_v.size() == P) {
        MOT_CUDA_CHECK(cudaMemcpyAsync(g->adam_m, host.adam_m.data(), P * 4, cudaMemcpyHostToDevice, g->stream));
        MOT_CUDA_CHECK(cudaMemcpyAsync(g->adam_v, host.adam_v.data(), P * 4, cudaMemcpyHostToDevice, g->stream));
    }
    if (g->bf16) {
        mot_to_bf16_kernel<<<mot_blocks(P, 256), 256, 0, g->stream>>>(g->params_bf, g->params, P);
        MOT_LAUNCH_CHECK();
    }
    MOT_CUDA_CHECK(cudaStreamSynchronize(g->stream));
}

inline void mot_gpu_download(MotGpu* g, MotModel<float>* host) {
    mot_gpu_check_model(g, host->cfg, host->params.size());
    const size_t P = g->tab.total;
    MOT_CUDA_CHECK(cudaStreamSynchronize(g->stream));
    host->adam_m.resize(P);
    host->adam_v.resize(P);
    MOT_CUDA_CHECK(cudaMemcpyAsync(host->params.data(), g->params, P * 4, cudaMemcpyDeviceToHost, g->stream));
    MOT_CUDA_CHECK(cudaMemcpyAsync(host->adam_m.data(), g->adam_m, P * 4, cudaMemcpyDeviceToHost, g->stream));
    MOT_CUDA_CHECK(cudaMemcpyAsync(host->adam_v.data(), g->adam_v, P * 4, cudaMemcpyDeviceToHost, g->stream));
    MOT_CUDA_CHECK(cudaStreamSynchronize(g->stream));
}

inline void mot_gpu_zero_grad(MotGpu* g) { MOT_CUDA_CHECK(cudaMemsetAsync(g->grads, 0, g->tab.total * 4, g->stream)); }

inline void mot_gpu_grads(MotGpu* g, std::vector<float>* out) {
    out->resize(g->tab.total);
    MOT_CUDA_CHECK(cudaMemcpyAsync(out->data(), g->grads, g->tab.total * 4, cudaMemcpyDeviceToHost, g->stream));
    MOT_CUDA_CHECK(cudaStreamSynchronize(g->stream));
}

// Host side of a batch: checks it, builds the index lists and uploads them (one copy).
static inline void mot_gpu_set_batch(MotGpu* g, const MotBatch& b) {
    const MotConfig& c = g->cfg;
    const int N = b.B * b.T;
    auto fail = [](const std::string& what) {
        fprintf(stderr, "mot_gpu_forward: %s\n", what.c_str());
        exit(1);
    };
    if (N > g->maxN) fail("batch shape exceeds what mot_gpu_init was given");
    // the batch's index lists, checked: the CPU forward builds the same plan (mot.h, mot_plan)
    const std::string bad = mot_plan(c, b, &g->plan);
    if (!bad.empty()) fail(bad);
    const MotPlan& p = g->plan;
    g->B = b.B;
    g->T = b.T;
    g->N = N;
    size_t NS, Em;
    mot_expert_sizes(c, N, &NS, &Em);
    g->NS = (int)NS;
    g->n_valid = p.n_valid;
    for (int m = 0; m < MOT_N_MOD; m++) g->n_mod[m] = p.n_mod[m];
    // upload the plan's lists and the grouping's, through the pinned host copy (idx_host has the
    // device's layout: each list sits as far from idx_host as from idx_dev)
    auto up = [g](int* dev, const int32_t* src, size_t n) {
        if (n == 0) return;
        int* host = g->idx_host + (dev - g->idx_dev);
        std::copy(src, src + n, host);
        MOT_CUDA_CHECK(cudaMemcpyAsync(dev, host, n * sizeof(int), cudaMemcpyHostToDevice, g->stream));
    };
    up(g->tok_g, p.tok.data(), N);
    up(g->tgt_g, p.tgt.data(), N);
    up(g->pos_g, p.pos.data(), N);
    up(g->row_of, b.row_of.data(), N);
    up(g->vis, b.vis.data(), N);
    up(g->emb_rows, p.emb_rows.data(), p.emb_rows.size());
    up(g->emb_tok, p.emb_tok.data(), p.emb_tok.size());
    up(g->emb_start, p.emb_start.data(), p.emb_start.size());
    if (g->tf) {
        // Transfusion: the image rows' patches and noise in grouped order, and the plan's step lists
        // (tf_idx_host has the device lists' layout from step_of)
        const int ni = p.i1 - p.i0;
        float *pin = g->tf_host, *eps = pin + (size_t)ni * MOT_PATCH;
        for (int r = 0; r < ni; r++) {
            const int i = b.order[p.i0 + r];
            std::copy(b.xin.begin() + (size_t)i * MOT_PATCH, b.xin.begin() + (size_t)(i + 1) * MOT_PATCH,
                      pin + (size_t)r * MOT_PATCH);
            std::copy(b.eps.begin() + (size_t)i * MOT_PATCH, b.eps.begin() + (size_t)(i + 1) * MOT_PATCH,
                      eps + (size_t)r * MOT_PATCH);
        }
        auto up_tf = [g](int* dev, const std::vector<int32_t>& src) {
            if (src.empty()) return;
            int* host = g->tf_idx_host + (dev - g->step_of);
            std::copy(src.begin(), src.end(), host);
            MOT_CUDA_CHECK(cudaMemcpyAsync(dev, host, src.size() * sizeof(int), cudaMemcpyHostToDevice, g->stream));
        };
        const size_t bytes = (size_t)ni * MOT_PATCH * sizeof(float);
        if (ni > 0) {
            MOT_CUDA_CHECK(cudaMemcpyAsync(g->pin, pin, bytes, cudaMemcpyHostToDevice, g->stream));
            MOT_CUDA_CHECK(cudaMemcpyAsync(g->eps, eps, bytes, cudaMemcpyHostToDevice, g->stream));
        }
        up_tf(g->step_of, p.step_of);
        up_tf(g->step_t, p.step_t);
        up_tf(g->step_rows, p.step_rows);
        up_tf(g->step_start, p.step_start);
    }
    g->have_batch = true;
}

static inline MotRows mot_gpu_rows(const MotGpu* g, int copies) {
    return MotRows{copies, g->plan.group[1], g->plan.group[2]};
}

// dg[copy] += column sums of dy * x * rstd over each copy's rows (per_pos rows per position)
static inline void mot_gpu_gain_grad(MotGpu* g, int p, int layer, const MotBuf& dy, const MotBuf& x, const float* rstd,
                                     int C, int per_pos) {
    const MotParamInfo& info = g->tab.p[p];
    mot_for_each_copy(info.copies, g->plan.group, [&](int c, int r0, int r1) {
        const int a = r0 * per_pos, b = r1 * per_pos, nchunk = (b - a + MOT_GAIN_ROWS - 1) / MOT_GAIN_ROWS;
        mot_by_type(dy, [&](auto ty) {
            mot_by_type(x, [&](auto tx) {
                typedef decltype(ty) TY;
                typedef decltype(tx) TX;
                mot_gain_partial_kernel<TY, TX><<<dim3((C + 31) / 32, nchunk), dim3(32, 8), 0, g->stream>>>(
                    g->gain_part, mot_typed<TY>(dy), mot_typed<TX>(x), rstd, a, b, C);
                MOT_LAUNCH_CHECK();
            });
        });
        mot_gain_final_kernel<<<mot_blocks(C, 128), 128, 0, g->stream>>>(g->grads + info.at(layer, c), g->gain_part,
                                                                         nchunk, C);
        MOT_LAUNCH_CHECK();
    });
}

// dst[j] += sum over the n rows of dy (C columns) of dy[.][j], the same deterministic reduction (biases)
static inline void mot_gpu_colsum(MotGpu* g, float* dst, const float* dy, int n, int C) {
    const int nchunk = (n + MOT_GAIN_ROWS - 1) / MOT_GAIN_ROWS;
    mot_gain_partial_kernel<float, float>
        <<<dim3((C + 31) / 32, nchunk), dim3(32, 8), 0, g->stream>>>(g->gain_part, dy, nullptr, nullptr, 0, n, C);
    MOT_LAUNCH_CHECK();
    mot_gain_final_kernel<<<mot_blocks(C, 128), 128, 0, g->stream>>>(dst, g->gain_part, nchunk, C);
    MOT_LAUNCH_CHECK();
}

// gain_only: mot_gain_only_copies for the FFN sublayer's norm, 0 for every other
static inline void mot_gpu_rmsnorm_forward(MotGpu* g, float* out, mot_bf16* outb, float* rstd, const MotBuf& x, int p,
                                           int layer, const float* resid, unsigned gain_only = 0) {
    const int N = g->N, D = g->cfg.d_model;
    const MotParamInfo& info = g->tab.p[p];
    mot_by_type(x, [&](auto t) {
        typedef decltype(t) T;
        mot_rmsnorm_forward_kernel<T><<<mot_blocks(N, 8), 256, 0, g->stream>>>(
            out, outb, rstd, mot_typed<T>(x), g->params + info.at(layer, 0), resid, N, D, mot_gpu_rows(g, info.copies),
            mot_gpu_rows(g, mot_ffn_copies(g->cfg)), gain_only);
        MOT_LAUNCH_CHECK();
    });
}
static inline void mot_gpu_rmsnorm_forward(MotGpu* g, float* out, mot_bf16* outb, float* rstd, float* x, int p,
                                           int layer, const float* resid, unsigned gain_only = 0) {
    mot_gpu_rmsnorm_forward(g, out, outb, rstd, mot_f32(x), p, layer, resid, gain_only);
}
// dx = norm backward of dy; gain gradient of tensor p accumulated
static inline void mot_gpu_rmsnorm_backward(MotGpu* g, MotBuf dx, float* dy, const MotBuf& x, const float* rstd, int p,
                                            int layer, unsigned gain_only = 0) {
    const int N = g->N, D = g->cfg.d_model;
    const MotParamInfo& info = g->tab.p[p];
    mot_by_type(x, [&](auto t) {
        typedef decltype(t) T;
        mot_rmsnorm_backward_kernel<T><<<mot_blocks(N, 8), 256, 0, g->stream>>>(
            dx, dy, mot_typed<T>(x), rstd, g->params + info.at(layer, 0), N, D, mot_gpu_rows(g, info.copies),
            mot_gpu_rows(g, mot_ffn_copies(g->cfg)), gain_only);
        MOT_LAUNCH_CHECK();
    });
    mot_gpu_gain_grad(g, p, layer, mot_f32(dy), x, rstd, D, 1);
}
static inline void mot_gpu_rmsnorm_backward(MotGpu* g, MotBuf dx, float* dy, float* x, const float* rstd, int p,
                                            int layer, unsigned gain_only = 0) {
    mot_gpu_rmsnorm_backward(g, dx, dy, mot_f32(x), rstd, p, layer, gain_only);
}
// QK-norm + RoPE of q or k (p = P_GQ or P_GK) of a layer; the backward also accumulates the gains'
// gradient (dyun: scratch)
static inline void mot_gpu_qknorm_forward(MotGpu* g, const MotBuf& out, float* rstd, const MotBuf& x, int p, int l) {
    const int N = g->N, H = g->cfg.n_head, Dh = g->cfg.d_model / H;
    mot_by_type(x, [&](auto t) {
        typedef decltype(t) T;
        mot_qknorm_rope_forward_kernel<T><<<mot_blocks((size_t)N * H, 128), 128, 0, g->stream>>>(
            mot_typed<T>(out), rstd, mot_typed<T>(x), g->params + g->tab.p[p].at(l, 0), g->rope_cos, g->rope_sin,
            g->pos_g, N, H, Dh, mot_gpu_rows(g, g->tab.p[p].copies));
        MOT_LAUNCH_CHECK();
    });
}
static inline void mot_gpu_qknorm_backward(MotGpu* g, const MotBuf& dx, const MotBuf& dy, const MotBuf& x,
                                           const float* rstd, int p, int l) {
    const int N = g->N, H = g->cfg.n_head, Dh = g->cfg.d_model / H;
    mot_by_type(x, [&](auto t) {
        typedef decltype(t) T;
        mot_qknorm_rope_backward_kernel<T><<<mot_blocks((size_t)N * H, 128), 128, 0, g->stream>>>(
            dx, mot_typed<T>(g->dyun), mot_typed<T>(dy), mot_typed<T>(x), rstd, g->params + g->tab.p[p].at(l, 0),
            g->rope_cos, g->rope_sin, g->pos_g, N, H, Dh, mot_gpu_rows(g, g->tab.p[p].copies));
        MOT_LAUNCH_CHECK();
    });
    mot_gpu_gain_grad(g, p, l, g->dyun, x, rstd, Dh, H);
}
static inline void mot_gpu_swiglu_forward(MotGpu* g, const MotBuf& u, const MotBuf& u1, const MotBuf& u3, size_t n) {
    mot_by_type(u1, [&](auto t) {
        typedef decltype(t) T;
        mot_swiglu_forward_kernel<T>
            <<<mot_blocks(n, 256), 256, 0, g->stream>>>(u, mot_typed<T>(u1), mot_typed<T>(u3), n);
        MOT_LAUNCH_CHECK();
    });
}
static inline void mot_gpu_swiglu_backward(MotGpu* g, const MotBuf& du1, const MotBuf& du3, const MotBuf& du,
                                           const MotBuf& u1, const MotBuf& u3, size_t n) {
    mot_by_type(u1, [&](auto t) {
        typedef decltype(t) T;
        mot_swiglu_backward_kernel<T><<<mot_blocks(n, 256), 256, 0, g->stream>>>(du1, du3, mot_typed<T>(du),
                                                                                 mot_typed<T>(u1), mot_typed<T>(u3), n);
        MOT_LAUNCH_CHECK();
    });
}
// g->delta = the attention backward's row term, sum over the head's dims of dO * o
static inline void mot_gpu_attn_delta(MotGpu* g, const MotBuf& dO, const MotBuf& o) {
    const int H = g->cfg.n_head;
    mot_by_type(o, [&](auto t) {
        typedef decltype(t) T;
        mot_attn_delta_kernel<T><<<mot_blocks((size_t)g->N * H, 256), 256, 0, g->stream>>>(
            g->delta, mot_typed<T>(dO), mot_typed<T>(o), g->row_of, g->B, g->T, H, g->cfg.d_model / H);
        MOT_LAUNCH_CHECK();
    });
}

// ---- attention dispatch over the head dimension --------------------------------------------
// THE rule for which attention kernels run: the tensor-core kernels in bf16 mode at head dims 64
// and 128 (multiples of the 16-wide WMMA tiles whose tiles fit the 48 KB of shared memory);
// everything else, and fp32 mode always (the tight reference), the fp32 CUDA-core kernels.
inline bool mot_attn_tensor_cores(bool bf16, int Dh) { return bf16 && (Dh == 64 || Dh == 128); }
// The rule in words, for the trainer's one startup line.
inline std::string mot_attn_kernel_note(bool bf16, int Dh) {
    if (mot_attn_tensor_cores(bf16, Dh))
        return "bf16 tensor-core flash kernels (WMMA, fp32 accumulation), head dim " + std::to_string(Dh);
    if (!bf16) return "fp32 CUDA-core kernels (fp32 mode keeps them as the exact reference)";
    return "fp32 CUDA-core kernels (head dim " + std::to_string(Dh) + " has no tensor-core kernel; 64 and 128 do)";
}
enum { MOT_ATT_BQ = 64, MOT_ATT_BK = 32, MOT_ATT_BKR = 64, MOT_ATT_BQT = 32 };
template <int DH>
static inline void mot_attn_forward_dh(MotGpu* g, const MotBuf& o, float* lse2, const MotBuf& q, const MotBuf& k,
                                       const MotBuf& v) {
    constexpr int PER = DH < 32 ? DH : 32;
    const int T = g->T, H = g->cfg.n_head;
    const float qscale = (float)(1.0 / sqrt((double)DH) * 1.4426950408889634);
    if constexpr (DH == 64 || DH == 128) {
        if (mot_attn_tensor_cores(g->bf16, DH)) {
            dim3 grid((T + MOT_TC_ROWS - 1) / MOT_TC_ROWS, g->B * H);
            mot_attn_tc_forward_kernel<DH>
                <<<grid, MOT_TC_THREADS, 0, g->stream>>>(o, lse2, q, k, v, g->row_of, g->vis, T, H, qscale);
            MOT_LAUNCH_CHECK();
            return;
        }
    }
    dim3 grid((T + MOT_ATT_BQ - 1) / MOT_ATT_BQ, g->B * H);
    mot_attn_forward_kernel<DH, PER, MOT_ATT_BQ, MOT_ATT_BK>
        <<<grid, MOT_ATT_BQ*(DH / PER), 0, g->stream>>>(o, lse2, q, k, v, g->row_of, g->vis, T, H, qscale);
    MOT_LAUNCH_CHECK();
}
template <int DH>
static inline void mot_attn_backward_dh(MotGpu* g, const MotBuf& dq, const MotBuf& dk, const MotBuf& dv,
                                        const MotBuf& dO, const float* lse2, const MotBuf& q, const MotBuf& k,
                                        const MotBuf& v) {
    constexpr int PER = DH < 16 ? DH : 16;
    const int T = g->T, H = g->cfg.n_head;
    const float scale = (float)(1.0 / sqrt((double)DH)), c2 = (float)(1.0 / sqrt((double)DH) * 1.4426950408889634);
    if constexpr (DH == 64 || DH == 128) {
        if (mot_attn_tensor_cores(g->bf16, DH)) {
            dim3 grid((T + MOT_TC_ROWS - 1) / MOT_TC_ROWS, g->B * H);
            mot_attn_tc_dkv_kernel<DH><<<grid, MOT_TC_THREADS, 0, g->stream>>>(dk, dv, q, k, v, dO, lse2, g->delta,
                                                                               g->row_of, g->vis, T, H, scale, c2);
            MOT_LAUNCH_CHECK();
            mot_attn_tc_dq_kernel<DH><<<grid, MOT_TC_THREADS, 0, g->stream>>>(dq, q, k, v, dO, lse2, g->delta,
                                                                              g->row_of, g->vis, T, H, scale, c2);
            MOT_LAUNCH_CHECK();
            return;
        }
    }
    dim3 gkv((T + MOT_ATT_BKR - 1) / MOT_ATT_BKR, g->B * H);
    mot_attn_backward_dkv_kernel<DH, PER, MOT_ATT_BKR, MOT_ATT_BQT><<<gkv, MOT_ATT_BKR*(DH / PER), 0, g->stream>>>(
        dk, dv, q, k, v, dO, lse2, g->delta, g->row_of, g->vis, T, H, scale, c2);
    MOT_LAUNCH_CHECK();
    dim3 gq((T + MOT_ATT_BQ - 1) / MOT_ATT_BQ, g->B * H);
    mot_attn_backward_dq_kernel<DH, PER, MOT_ATT_BQ, MOT_ATT_BK><<<gq, MOT_ATT_BQ*(DH / PER), 0, g->stream>>>(
        dq, q, k, v, dO, lse2, g->delta, g->row_of, g->vis, T, H, scale, c2);
    MOT_LAUNCH_CHECK();
}
#define MOT_DH_SWITCH(Dh, CALL)                                                            \
    switch (Dh) {                                                                          \
        case 2: {                                                                          \
            constexpr int DHC = 2;                                                         \
            CALL;                                                                          \
        } break;                                                                           \
        case 4: {                                                                          \
            constexpr int DHC = 4;                                                         \
            CALL;                                                                          \
        } break;                                                                           \
        case 8: {                                                                          \
            constexpr int DHC = 8;                                                         \
            CALL;                                                                          \
        } break;                                                                           \
        case 16: {                                                                         \
            constexpr int DHC = 16;                                                        \
            CALL;                                                                          \
        } break;                                                                           \
        case 32: {                                                                         \
            constexpr int DHC = 32;                                                        \
            CALL;                                                                          \
        } break;                                                                           \
        case 64: {                                                                         \
            constexpr int DHC = 64;                                                        \
            CALL;                                                                          \
        } break;                                                                           \
        case 128: {                                                                        \
            constexpr int DHC = 128;                                                       \
            CALL;                                                                          \
        } break;                                                                           \
        default: fprintf(stderr, "mot_gpu: unsupported head dimension %d\n", Dh); exit(1); \
    }

// logits of rows [r0, r0 + n) into g->logits (fp32)
static inline void mot_gpu_head_chunk(MotGpu* g, const MotBuf& z, int r0, int n) {
    const int D = g->cfg.d_model, V = g->cfg.vocab;
    mot_gemm(g, false, false, n, V, D, mot_op(g, z, (size_t)r0 * D), D, mot_weight(g, P_HEAD, 0, 0), V, 0.0f, g->logits,
             V);
}
static inline MotBuf mot_gpu_z(const MotGpu* g) {
    MotBuf z;
    z.f = g->z_f;
    z.b = g->z_b;
    return z;
}

// ---- experts: the FFN sublayer of a model with experts (ffn_forward_experts / ffn_backward_experts)
// Per-layer views of the expert arrays (slot-indexed arrays have NS rows per layer).
struct MotGpuExpertLayer {
    float *y2, *ye, *ye_rstd, *gate, *aux;  // y2: fp32 with experts (mot_gpu_init)
    int *sel, *slot_of;
    MotBuf u1, u3, u;
};
static inline MotGpuExpertLayer mot_gpu_expert_layer(MotGpu* g, int l) {
    const size_t N = g->N, NS = g->NS, D = g->cfg.d_model, F = g->cfg.d_ff, Em = g->Emax;
    MotGpuExpertLayer x;
    x.u1 = mot_buf_at(g->u1, l * NS * F);
    x.u3 = mot_buf_at(g->u3, l * NS * F);
    x.u = mot_buf_at(g->u, l * NS * F);
    x.y2 = g->y2.f + l * N * D;
    x.ye = g->ye + l * NS * D;
    x.ye_rstd = g->ye_rstd + l * NS;
    x.gate = g->gate + l * N * Em;
    x.aux = g->aux + l * N * Em;
    x.sel = g->sel + l * NS;
    x.slot_of = g->slot_of + l * N * Em;
    return x;
}

// y2 of layer l (before its norm): the plain FFN on the rows of copies with one expert, the gated
// mixture of experts on the others. Expert choice (g->route EC) also adds the aux-router BCE to
// g->aux_out; causal routing runs every expert on all n rows of its copy, one expert at a time in
// the copy's slots, and keeps a row's output where a > 0.5 (E times the FFN FLOPs, for evaluation
// only; the CPU reference computes just the routed rows, with the same result).
static inline void mot_gpu_ffn_forward_experts(MotGpu* g, int l, const MotBuf& h) {
    const MotConfig& c = g->cfg;
    const MotParamTable& tab = g->tab;
    const int D = c.d_model, F = c.d_ff, Em = g->Emax;
    const bool ec = g->route == MOT_ROUTE_EC;
    cudaStream_t st = g->stream;
    const MotGpuExpertLayer X = mot_gpu_expert_layer(g, l);
    for (int f = 0; f < mot_ffn_copies(c); f++) {
        int r0, r1;
        mot_ffn_rows(c, g->plan.group, f, &r0, &r1);
        const int n = r1 - r0, E = c.n_expert[f], k = mot_expert_copy(c, f, 0), s0 = g->plan.slot0[f];
        if (n == 0) continue;
        // expert e on `rows` rows of operand x: u1, u3, u in slots sb.., the output into out
        auto ffn = [&](int e, const void* x, int rows, size_t sb, float* out) {
            mot_gemm(g, false, false, rows, F, D, x, D, mot_weight(g, P_W1, l, k + e), F, 0.0f, X.u1, sb * F, F);
            mot_gemm(g, false, false, rows, F, D, x, D, mot_weight(g, P_W3, l, k + e), F, 0.0f, X.u3, sb * F, F);
            const size_t nf = (size_t)rows * F;
            mot_gpu_swiglu_forward(g, mot_buf_at(X.u, sb * F), mot_buf_at(X.u1, sb * F), mot_buf_at(X.u3, sb * F), nf);
            mot_gemm(g, false, false, rows, D, F, mot_op(g, X.u, sb * F), F, mot_weight(g, P_W2, l, k + e), D, 0.0f,
                     out, D);
        };
        if (E == 1) {
            ffn(0, mot_op(g, h, (size_t)r0 * D), n, s0, X.y2 + (size_t)r0 * D);
            continue;
        }
        // router and aux-router logits in fp32 in both modes (the selection compares them exactly)
        const int kr = mot_router_copy(c, f, 0), C = g->plan.cap[f];
        float *sg = X.gate + (size_t)r0 * Em, *sa = X.aux + (size_t)r0 * Em;
        int* so = X.slot_of + (size_t)r0 * Em;
        const float* hr = h.f + (size_t)r0 * D;
        mot_gemm_as(g, false, false, true, n, E, D, hr, D, g->params + tab.p[P_WR].at(l, kr), D, 0.0f, sg, Em);
        mot_gemm_as(g, false, false, true, n, E, D, hr, D, g->params + tab.p[P_U].at(l, kr), D, 0.0f, sa, Em);
        mot_router_softmax_kernel<<<mot_blocks(n, 128), 128, 0, st>>>(sg, n, E, Em);
        MOT_LAUNCH_CHECK();
        if (ec) {
            mot_expert_select_kernel<<<E, MOT_SEL_THREADS, 0, st>>>(X.sel, so, sg, Em, n, C, r0, s0);
            MOT_LAUNCH_CHECK();
        }
        mot_aux_router_kernel<<<mot_blocks(n, 128), 128, 0, st>>>(sa, g->aux_row, so, n, E, Em, ec ? 1 : 0);
        MOT_LAUNCH_CHECK();
        if (ec) {
            mot_aux_reduce_kernel<<<1, MOT_SEL_THREADS, 0, st>>>(g->aux_out, g->aux_row, n, (double)n * E);
            MOT_LAUNCH_CHECK();
            const size_t slots = (size_t)E * C;
            mot_gather_rows_kernel<<<mot_blocks(slots * D, 256), 256, 0, st>>>(mot_buf_at(g->xg, (size_t)s0 * D), h.f,
                                                                               h.b, X.sel + s0, (int)slots, D);
            MOT_LAUNCH_CHECK();
            for (int e = 0; e < E; e++) {
                const size_t sb = (size_t)s0 + (size_t)e * C;
                ffn(e, mot_op(g, g->xg, sb * D), C, sb, X.ye + sb * D);
            }
            mot_expert_norm_kernel<<<mot_blocks(slots, 8), 256, 0, st>>>(X.ye + (size_t)s0 * D, X.ye_rstd + s0,
                                                                         (int)slots, D);
            MOT_LAUNCH_CHECK();
            mot_expert_combine_kernel<<<mot_blocks((size_t)n * D, 256), 256, 0, st>>>(X.y2 + (size_t)r0 * D, X.ye, sg,
                                                                                      so, n, E, Em, D);
            MOT_LAUNCH_CHECK();
        } else {
            for (int e = 0; e < E; e++) {
                ffn(e, mot_op(g, h, (size_t)r0 * D), n, s0, X.ye + (size_t)s0 * D);
                mot_expert_norm_kernel<<<mot_blocks(n, 8), 256, 0, st>>>(X.ye + (size_t)s0 * D, X.ye_rstd + s0, n, D);
                MOT_LAUNCH_CHECK();
                mot_expert_causal_add_kernel<<<mot_blocks((size_t)n * D, 256), 256, 0, st>>>(
                    X.y2 + (size_t)r0 * D, X.ye + (size_t)s0 * D, sg, sa, n, e, Em, D, e == 0 ? 1 : 0);
                MOT_LAUNCH_CHECK();
            }
        }
    }
}

// Backward of mot_gpu_ffn_forward_experts (after an EC forward): dt = dL/dy2 (dt.f in fp32 always,
// the GEMM operand in the mode's precision); adds dL/dh into g->dx and the gradients of the
// experts, the routers and (the aux BCE, on detached h) the auxiliary routers.
static inline void mot_gpu_ffn_backward_experts(MotGpu* g, int l, const MotBuf& h, const MotBuf& dt, float dw_beta) {
    const MotConfig& c = g->cfg;
    const MotParamTable& tab = g->tab;
    const int D = c.d_model, F = c.d_ff, Em = g->Emax;
    cudaStream_t st = g->stream;
    const MotGpuExpertLayer X = mot_gpu_expert_layer(g, l);
    float* G = g->grads;
    for (int f = 0; f < mot_ffn_copies(c); f++) {
        int r0, r1;
        mot_ffn_rows(c, g->plan.group, f, &r0, &r1);
        const int n = r1 - r0, E = c.n_expert[f], k = mot_expert_copy(c, f, 0), s0 = g->plan.slot0[f];
        if (n == 0) continue;
        float* dh = g->dx + (size_t)r0 * D;  // dL/dh: the residual gradient, added to in place
        if (E == 1) {                        // the plain FFN, as mot_linear_backward does it
            const size_t sf = (size_t)s0 * F, nf = (size_t)n * F;
            mot_gemm(g, false, true, n, F, D, mot_op(g, dt, (size_t)r0 * D), D, mot_weight(g, P_W2, l, k), D, 0.0f,
                     g->du, sf, F);
            mot_gemm(g, true, false, F, D, n, mot_op(g, X.u, sf), F, mot_op(g, dt, (size_t)r0 * D), D, dw_beta,
                     G + tab.p[P_W2].at(l, k), D);
            mot_gpu_swiglu_backward(g, mot_buf_at(g->du1, sf), mot_buf_at(g->du3, sf), mot_buf_at(g->du, sf),
                                    mot_buf_at(X.u1, sf), mot_buf_at(X.u3, sf), nf);
            const int p13[2] = {P_W1, P_W3};
            const MotBuf* d13[2] = {&g->du1, &g->du3};
            for (int t = 0; t < 2; t++) {
                mot_gemm(g, false, true, n, D, F, mot_op(g, *d13[t], sf), F, mot_weight(g, p13[t], l, k), F, 1.0f, dh,
                         D);
                mot_gemm(g, true, false, D, F, n, mot_op(g, h, (size_t)r0 * D), D, mot_op(g, *d13[t], sf), F, dw_beta,
                         G + tab.p[p13[t]].at(l, k), F);
            }
            continue;
        }
        const int kr = mot_router_copy(c, f, 0), C = g->plan.cap[f];
        const size_t slots = (size_t)E * C;
        float *sg = X.gate + (size_t)r0 * Em, *sa = X.aux + (size_t)r0 * Em;
        const int* so = X.slot_of + (size_t)r0 * Em;
        // the gated sum of normalised outputs: ds = dt . ye, dye through the norm (ds is 0 where an
        // expert did not take the row)
        MOT_CUDA_CHECK(cudaMemsetAsync(g->ds + (size_t)r0 * Em, 0, (size_t)n * Em * sizeof(float), st));
        mot_expert_dye_kernel<<<mot_blocks(slots, 8), 256, 0, st>>>(g->dye, g->ds, dt.f, X.ye, X.ye_rstd, X.gate, X.sel,
                                                                    s0, (int)slots, C, Em, D);
        MOT_LAUNCH_CHECK();
        // each expert's SwiGLU FFN on its gathered rows
        for (int e = 0; e < E; e++) {
            const size_t sb = (size_t)s0 + (size_t)e * C;
            mot_gemm(g, false, true, C, F, D, mot_op(g, g->dye, sb * D), D, mot_weight(g, P_W2, l, k + e), D, 0.0f,
                     g->du, sb * F, F);
            mot_gemm(g, true, false, F, D, C, mot_op(g, X.u, sb * F), F, mot_op(g, g->dye, sb * D), D, dw_beta,
                     G + tab.p[P_W2].at(l, k + e), D);
        }
        const size_t sf = (size_t)s0 * F, nf = slots * F;
        mot_gpu_swiglu_backward(g, mot_buf_at(g->du1, sf), mot_buf_at(g->du3, sf), mot_buf_at(g->du, sf),
                                mot_buf_at(X.u1, sf), mot_buf_at(X.u3, sf), nf);
        mot_gather_rows_kernel<<<mot_blocks(slots * D, 256), 256, 0, st>>>(mot_buf_at(g->xg, (size_t)s0 * D), h.f, h.b,
                                                                           X.sel + s0, (int)slots, D);
        MOT_LAUNCH_CHECK();
        for (int e = 0; e < E; e++) {
            const size_t sb = (size_t)s0 + (size_t)e * C;
            mot_gemm(g, true, false, D, F, C, mot_op(g, g->xg, sb * D), D, mot_op(g, g->du1, sb * F), F, dw_beta,
                     G + tab.p[P_W1].at(l, k + e), F);
            mot_gemm(g, true, false, D, F, C, mot_op(g, g->xg, sb * D), D, mot_op(g, g->du3, sb * F), F, dw_beta,
                     G + tab.p[P_W3].at(l, k + e), F);
            mot_gemm(g, false, true, C, D, F, mot_op(g, g->du1, sb * F), F, mot_weight(g, P_W1, l, k + e), F, 0.0f,
                     g->dX + sb * D, D);
            mot_gemm(g, false, true, C, D, F, mot_op(g, g->du3, sb * F), F, mot_weight(g, P_W3, l, k + e), F, 1.0f,
                     g->dX + sb * D, D);
        }
        // dh += dX of every expert that took the row, in expert order
        mot_expert_scatter_kernel<<<mot_blocks((size_t)n * D, 256), 256, 0, st>>>(dh, g->dX, so, n, E, Em, D);
        MOT_LAUNCH_CHECK();
        // softmax backward and the aux BCE gradient; then the router GEMMs in fp32
        const float w = (float)(MOT_AUX_WEIGHT / ((double)n * E));
        float *dr = g->ds + (size_t)r0 * Em, *dz = g->dz + (size_t)r0 * Em;
        mot_router_backward_kernel<<<mot_blocks(n, 128), 128, 0, st>>>(dr, dz, sg, sa, so, n, E, Em, w);
        MOT_LAUNCH_CHECK();
        const float* hr = h.f + (size_t)r0 * D;
        const size_t orr = tab.p[P_WR].at(l, kr), ou = tab.p[P_U].at(l, kr);
        mot_gemm_as(g, false, true, false, E, D, n, dr, Em, hr, D, 1.0f, G + orr, D);
        mot_gemm_as(g, false, false, false, n, D, E, dr, Em, g->params + orr, D, 1.0f, dh, D);
        mot_gemm_as(g, false, true, false, E, D, n, dz, Em, hr, D, 1.0f, G + ou, D);
    }
}

// Forward pass: activations, the row logsumexps and the losses. Reads the loss back (the only
// synchronisation). Returns the mean loss over the valid targets.
inline double mot_gpu_forward(MotGpu* g, const MotBatch& b) {
    mot_gpu_set_batch(g, b);
    const MotConfig& c = g->cfg;
    const int N = g->N, D = c.d_model, H = c.n_head, Dh = D / H, F = c.d_ff, V = c.vocab, L = c.n_layer;
    const size_t ND = (size_t)N * D, NF = (size_t)N * F;
    const MotParamTable& tab = g->tab;
    cudaStream_t st = g->stream;

    g->route_fwd = g->route;
    if (g->experts) MOT_CUDA_CHECK(cudaMemsetAsync(g->aux_out, 0, 2 * sizeof(double), st));
    // embedding rows, except (Transfusion) the image rows [i0, i1): x_t W_in + b_in + sinusoid(t) W_t
    const int i0 = g->plan.group[MOD_IMAGE], i1 = g->tf ? g->plan.group[MOD_IMAGE + 1] : i0, ni = i1 - i0,
              PT = MOT_PATCH;
    auto embed = [&](int r0, int r1) {
        if (r1 <= r0) return;
        mot_embed_kernel<<<mot_blocks((size_t)(r1 - r0) * D, 256), 256, 0, st>>>(
            g->x + (size_t)r0 * D, g->x_b ? g->x_b + (size_t)r0 * D : nullptr, g->params + tab.p[P_EMB].offset,
            g->tok_g + r0, r1 - r0, D);
        MOT_LAUNCH_CHECK();
    };
    if (ni > 0) {
        embed(0, i0);
        embed(i1, N);
        const int S = (int)g->plan.step_t.size();
        mot_sinusoid_kernel<<<mot_blocks((size_t)S * (D / 2), 256), 256, 0, st>>>(g->sinu, g->step_t, S, D);
        MOT_LAUNCH_CHECK();
        mot_gemm_as(g, false, false, false, S, D, D, g->sinu, D, g->params + tab.p[P_WT].offset, D, 0.0f, g->temb, D);
        mot_gemm_as(g, false, false, false, ni, D, PT, g->pin, PT, g->params + tab.p[P_WIN].offset, D, 0.0f,
                    g->x + (size_t)i0 * D, D);
        mot_image_input_kernel<<<mot_blocks((size_t)ni * D, 256), 256, 0, st>>>(
            g->x + (size_t)i0 * D, g->x_b ? g->x_b + (size_t)i0 * D : nullptr, g->params + tab.p[P_BIN].offset, g->temb,
            g->step_of, ni, D);
        MOT_LAUNCH_CHECK();
    } else {
        embed(0, N);
    }
    for (int l = 0; l < L; l++) {
        MotBuf x, h;
        x.f = g->x + l * ND;
        x.b = g->x_b ? g->x_b + l * ND : nullptr;
        h.f = g->h + l * ND;
        h.b = g->h_b ? g->h_b + l * ND : nullptr;
        const MotBuf q = mot_buf_at(g->q, l * ND), k = mot_buf_at(g->k, l * ND), v = mot_buf_at(g->v, l * ND);
        const MotBuf qr = mot_buf_at(g->qr, l * ND), kr = mot_buf_at(g->kr, l * ND), o = mot_buf_at(g->o, l * ND);
        const MotBuf a = mot_buf_at(g->a, l * ND), y2 = mot_buf_at(g->y2, l * ND);
        const MotBuf u1 = mot_buf_at(g->u1, l * NF), u3 = mot_buf_at(g->u3, l * NF), u = mot_buf_at(g->u, l * NF);
        // attention sublayer: h = x + rmsnorm(attn(x) Wo) * g_attn
        mot_linear_forward(g, q, x, P_WQ, l);
        mot_linear_forward(g, k, x, P_WK, l);
        mot_linear_forward(g, v, x, P_WV, l);
        mot_gpu_qknorm_forward(g, qr, g->q_rstd + (size_t)l * N * H, q, P_GQ, l);
        mot_gpu_qknorm_forward(g, kr, g->k_rstd + (size_t)l * N * H, k, P_GK, l);
        float* lse2 = g->lse + (size_t)l * N * H;
        MOT_DH_SWITCH(Dh, (mot_attn_forward_dh<DHC>(g, o, lse2, qr, kr, v)));
        mot_linear_forward(g, a, o, P_WO, l);
        mot_gpu_rmsnorm_forward(g, h.f, h.b, g->a_rstd + (size_t)l * N, a, P_GATTN, l, x.f);
        // FFN sublayer: y = h + rmsnorm(swiglu(h) W2) * g_ffn; rows of a copy with experts: y = h + y2 * g_ffn,
        // y2 the gated sum of the experts' normalised outputs
        if (g->experts) {
            mot_gpu_ffn_forward_experts(g, l, h);
        } else {
            mot_linear_forward(g, u1, h, P_W1, l);
            mot_linear_forward(g, u3, h, P_W3, l);
            mot_gpu_swiglu_forward(g, u, u1, u3, NF);
            mot_linear_forward(g, y2, u, P_W2, l);
        }
        mot_bf16* ynext_b = (g->x_b && l + 1 < L) ? g->x_b + (l + 1) * ND : nullptr;
        mot_gpu_rmsnorm_forward(g, g->x + (l + 1) * ND, ynext_b, g->y2_rstd + (size_t)l * N, y2, P_GFFN, l, h.f,
                                mot_gain_only_copies(c));
    }
    // final norm and the output head, chunk by chunk: logits, then per-row logsumexp and loss
    const MotBuf z = mot_gpu_z(g);
    mot_gpu_rmsnorm_forward(g, z.f, z.b, g->z_rstd, g->x + (size_t)L * ND, P_GOUT, 0, nullptr);
    for (int r0 = 0; r0 < N; r0 += g->head_rows) {
        const int n = std::min(g->head_rows, N - r0);
        mot_gpu_head_chunk(g, z, r0, n);
        mot_ce_forward_kernel<<<n, MOT_CE_THREADS, 0, st>>>(g->ce_lse + r0, g->row_loss + r0, g->logits, g->tgt_g + r0,
                                                            V);
        MOT_LAUNCH_CHECK();
    }
    mot_loss_reduce_kernel<<<1, MOT_RED_THREADS, 0, st>>>(g->loss_out, g->row_loss, g->tgt_g, N, c.image_begin,
                                                          c.speech_begin);
    MOT_LAUNCH_CHECK();
    if (g->tf) {  // Transfusion: eps_hat = z W_out + b_out on the image rows (fp32), the MSE into loss_out[4]
        if (ni > 0) {
            mot_gemm_as(g, false, false, false, ni, PT, D, g->z_f + (size_t)i0 * D, D, g->params + tab.p[P_WOUT].offset,
                        PT, 0.0f, g->eps_hat, PT);
            const double scale = MOT_DIFF_WEIGHT * 2 / ((double)std::max(1, g->plan.n_noised) * PT);
            const bool weighted = g->diff_loss == MOT_DIFF_MIN_SNR;
            mot_mse_kernel<<<mot_blocks(ni, 128), 128, 0, st>>>(g->eps_hat, g->deps, g->row_se, g->row_wse,
                                                                g->params + tab.p[P_BOUT].offset, g->eps, g->step_of,
                                                                g->step_t, weighted ? g->snr_w : nullptr, ni, scale);
            MOT_LAUNCH_CHECK();
            mot_sum_kernel<<<1, MOT_RED_THREADS, 0, st>>>(g->loss_out + 4, g->row_se, ni);
            MOT_LAUNCH_CHECK();
            if (weighted) {  // the weighted sum, for the objective only (loss_mod[image] stays the MSE)
                mot_sum_kernel<<<1, MOT_RED_THREADS, 0, st>>>(g->wse_sum, g->row_wse, ni);
                MOT_LAUNCH_CHECK();
                MOT_CUDA_CHECK(cudaMemcpyAsync(&g->wse_host, g->wse_sum, sizeof(double), cudaMemcpyDeviceToHost, st));
            }
        } else {
            MOT_CUDA_CHECK(cudaMemsetAsync(g->loss_out + 4, 0, sizeof(double), st));
        }
    }
    MOT_CUDA_CHECK(
        cudaMemcpyAsync(g->host_out, g->loss_out, (g->tf ? 5 : 4) * sizeof(double), cudaMemcpyDeviceToHost, st));
    if (g->experts)
        MOT_CUDA_CHECK(cudaMemcpyAsync(g->host_out + 5, g->aux_out, 2 * sizeof(double), cudaMemcpyDeviceToHost, st));
    MOT_CUDA_CHECK(cudaStreamSynchronize(st));
    g->loss = g->loss_lm = g->n_valid ? g->host_out[0] / g->n_valid : 0.0;
    for (int m = 0; m < MOT_N_MOD; m++) g->loss_mod[m] = g->n_mod[m] ? g->host_out[1 + m] / g->n_mod[m] : 0.0;
    if (g->tf) {  // as diffusion_loss: the image entry is the MSE over the noised rows' 16 values
        g->n_mod[MOD_IMAGE] = g->plan.n_noised;
        g->loss_mod[MOD_IMAGE] = g->plan.n_noised ? g->host_out[4] / ((double)g->plan.n_noised * PT) : 0.0;
        const bool weighted = g->diff_loss == MOT_DIFF_MIN_SNR;  // as diffusion_loss: the WMSE, the same count
        g->loss = g->loss_lm + MOT_DIFF_WEIGHT * (!weighted          ? g->loss_mod[MOD_IMAGE]
                                                  : g->plan.n_noised ? g->wse_host / ((double)g->plan.n_noised * PT)
                                                                     : 0.0);
    }
    // experts, EC: the aux BCE summed over layers and copies, and the fraction of rows of expert
    // copies (over layers) whose aux routers pick exactly their EC experts (as mot_forward)
    g->aux_loss = g->aux_agree = 0;
    if (g->experts && g->route == MOT_ROUTE_EC) {
        const long rows = g->plan.expert_rows * L;
        g->aux_loss = g->host_out[5];
        g->aux_agree = rows ? g->host_out[6] / rows : 0;
    }
    return g->loss;  // the reported loss: the training objective adds MOT_AUX_WEIGHT * aux_loss
}

// Backward pass for the batch of the last forward. accumulate = true: ADDS into the gradients
// (mot_gpu_zero_grad first). accumulate = false (a step's first micro-batch): the weight-gradient
// GEMMs write with beta 0 and only the gradients they do not write are zeroed (mot_grad_unwritten),
// which saves a memset and a read of every weight gradient (dev/roofline counts both).
inline void mot_gpu_backward(MotGpu* g, bool accumulate = true) {
    if (!g->have_batch) {
        fprintf(stderr, "mot_gpu_backward: no forward pass to differentiate\n");
        exit(1);
    }
    if (g->experts && g->route_fwd != MOT_ROUTE_EC) {
        fprintf(stderr, "mot_gpu_backward: the last forward used causal routing; training needs expert choice\n");
        exit(1);
    }
    const MotConfig& c = g->cfg;
    const int N = g->N, D = c.d_model, H = c.n_head, Dh = D / H, F = c.d_ff, V = c.vocab, L = c.n_layer;
    const size_t ND = (size_t)N * D, NF = (size_t)N * F;
    const MotParamTable& tab = g->tab;
    cudaStream_t st = g->stream;
    const MotBuf z = mot_gpu_z(g);
    const float wb = accumulate ? 1.0f : 0.0f;  // beta of the weight-gradient GEMMs
    if (!accumulate)
        for (const auto& r : mot_grad_unwritten(c, tab, g->plan.group))
            MOT_CUDA_CHECK(cudaMemsetAsync(g->grads + r.first, 0, (r.second - r.first) * 4, st));

    // output head, chunk by chunk: recompute the logits, dlogits from the stored logsumexp,
    // dz = dlogits W_head^T, dW_head += z^T dlogits
    const float inv_n = g->n_valid ? 1.0f / (float)g->n_valid : 0.0f;
    for (int r0 = 0; r0 < N; r0 += g->head_rows) {
        const int n = std::min(g->head_rows, N - r0);
        mot_gpu_head_chunk(g, z, r0, n);
        float* lf = g->bf16 ? nullptr : g->logits;
        mot_ce_backward_kernel<<<mot_blocks((size_t)n * V, 256), 256, 0, st>>>(
            lf, g->dlogits_b, g->logits, g->ce_lse + r0, g->tgt_g + r0, n, V, inv_n);
        MOT_LAUNCH_CHECK();
        MotBuf dl;
        dl.f = g->bf16 ? nullptr : g->logits;
        dl.b = g->dlogits_b;
        mot_gemm(g, false, true, n, D, V, mot_op(g, dl, 0), V, mot_weight(g, P_HEAD, 0, 0), V, 0.0f,
                 g->dt + (size_t)r0 * D, D);
        mot_gemm(g, true, false, D, V, n, mot_op(g, z, (size_t)r0 * D), D, mot_op(g, dl, 0), V, r0 == 0 ? wb : 1.0f,
                 g->grads + tab.p[P_HEAD].offset, V);
    }
    const int i0 = g->plan.group[MOD_IMAGE], i1 = g->tf ? g->plan.group[MOD_IMAGE + 1] : i0, ni = i1 - i0,
              PT = MOT_PATCH;
    if (ni > 0) {  // Transfusion, eps_hat = z W_out + b_out on the image rows (fp32): dz += deps W_out^T
        mot_gemm_as(g, false, false, true, ni, D, PT, g->deps, PT, g->params + tab.p[P_WOUT].offset, PT, 1.0f,
                    g->dt + (size_t)i0 * D, D);
        mot_gemm_as(g, false, true, false, D, PT, ni, g->z_f + (size_t)i0 * D, D, g->deps, PT, 1.0f,
                    g->grads + tab.p[P_WOUT].offset, PT);
        mot_gpu_colsum(g, g->grads + tab.p[P_BOUT].offset, g->deps, ni, PT);
    }
    MotBuf dxb;
    dxb.f = g->dx;
    mot_gpu_rmsnorm_backward(g, dxb, g->dt, g->x + (size_t)L * ND, g->z_rstd, P_GOUT, 0);  // dx = dL/dx^L

    // The residual gradient lives in g->dx: dL/dy on entering a layer's FFN sublayer, the FFN's
    // dx GEMMs (beta 1) add into it in place to make dL/dh, and the attention's to make dL/dx.
    // (The residual's identity path costs nothing: no copies.)
    for (int l = L - 1; l >= 0; l--) {
        MotBuf x, h;
        x.f = g->x + l * ND;
        x.b = g->x_b ? g->x_b + l * ND : nullptr;
        h.f = g->h + l * ND;
        h.b = g->h_b ? g->h_b + l * ND : nullptr;
        const MotBuf q = mot_buf_at(g->q, l * ND), k = mot_buf_at(g->k, l * ND), v = mot_buf_at(g->v, l * ND);
        const MotBuf qr = mot_buf_at(g->qr, l * ND), kr = mot_buf_at(g->kr, l * ND), o = mot_buf_at(g->o, l * ND);
        const MotBuf a = mot_buf_at(g->a, l * ND), y2 = mot_buf_at(g->y2, l * ND);
        const MotBuf u1 = mot_buf_at(g->u1, l * NF), u3 = mot_buf_at(g->u3, l * NF), u = mot_buf_at(g->u, l * NF);
        const MotBuf dx = mot_f32(g->dx);
        // FFN sublayer
        if (g->experts) {  // dL/dy2 in fp32 (g->dt) for the gate gradients, and as the mode's GEMM operand
            MotBuf dt;
            dt.f = g->dt;
            dt.b = g->gdy.b;
            mot_gpu_rmsnorm_backward(g, dt, g->dx, y2, g->y2_rstd + (size_t)l * N, P_GFFN, l, mot_gain_only_copies(c));
            mot_gpu_ffn_backward_experts(g, l, h, dt, wb);
        } else {
            mot_gpu_rmsnorm_backward(g, g->gdy, g->dx, y2, g->y2_rstd + (size_t)l * N, P_GFFN, l);  // gdy = dL/dy2
            mot_linear_backward(g, g->du, 0.0f, g->gdy, u, P_W2, l, wb);
            mot_gpu_swiglu_backward(g, g->du1, g->du3, g->du, u1, u3, NF);
            mot_linear_backward(g, dx, 1.0f, g->du1, h, P_W1, l, wb);
            mot_linear_backward(g, dx, 1.0f, g->du3, h, P_W3, l, wb);
        }
        // attention sublayer
        mot_gpu_rmsnorm_backward(g, g->gdy, g->dx, a, g->a_rstd + (size_t)l * N, P_GATTN, l);  // gdy = dL/da
        mot_linear_backward(g, g->dO, 0.0f, g->gdy, o, P_WO, l, wb);
        const float* lse2 = g->lse + (size_t)l * N * H;
        mot_gpu_attn_delta(g, g->dO, o);
        MOT_DH_SWITCH(Dh, (mot_attn_backward_dh<DHC>(g, g->dq, g->dk, g->dv, g->dO, lse2, qr, kr, v)));
        // QK-norm + RoPE backward for q, then its projection; then the same for k; then v
        mot_gpu_qknorm_backward(g, g->gqk, g->dq, q, g->q_rstd + (size_t)l * N * H, P_GQ, l);
        mot_linear_backward(g, dx, 1.0f, g->gqk, x, P_WQ, l, wb);
        mot_gpu_qknorm_backward(g, g->gqk, g->dk, k, g->k_rstd + (size_t)l * N * H, P_GK, l);
        mot_linear_backward(g, dx, 1.0f, g->gqk, x, P_WK, l, wb);
        mot_linear_backward(g, dx, 1.0f, g->dv, x, P_WV, l, wb);
    }
    if (ni > 0) {  // Transfusion, image rows: x_t W_in + b_in + sinusoid(t) W_t (fp32)
        const float* dxi = g->dx + (size_t)i0 * D;
        mot_gemm_as(g, false, true, false, PT, D, ni, g->pin, PT, dxi, D, 1.0f, g->grads + tab.p[P_WIN].offset, D);
        mot_gpu_colsum(g, g->grads + tab.p[P_BIN].offset, dxi, ni, D);
        const int n_steps = (int)g->plan.step_t.size();
        mot_temb_backward_kernel<<<n_steps, 128, 0, st>>>(g->dtemb, dxi, g->step_rows, g->step_start, D);
        MOT_LAUNCH_CHECK();
        mot_gemm_as(g, false, true, false, D, D, n_steps, g->sinu, D, g->dtemb, D, 1.0f, g->grads + tab.p[P_WT].offset,
                    D);
    }
    // embedding: one block per distinct token, rows in order
    const int n_emb = (int)g->plan.emb_tok.size();  // distinct tokens in the batch
    if (n_emb > 0) {
        mot_embed_backward_kernel<<<n_emb, 128, 0, st>>>(g->grads + tab.p[P_EMB].offset, g->dx, g->emb_rows, g->emb_tok,
                                                         g->emb_start, D);
        MOT_LAUNCH_CHECK();
    }
}

// One AdamW step over all parameters (mot_adamw_step semantics), after multiplying the
// gradients by grad_scale (e.g. 1 / accumulation steps). Returns the gradient norm before
// clipping (of the scaled gradients).
inline double mot_gpu_adamw_step(MotGpu* g, const MotOptim& o, int step, double grad_scale) {
    const size_t P = g->tab.total;
    cudaStream_t st = g->stream;
    const float gs = (float)grad_scale;
    mot_sumsq_partial_kernel<<<MOT_NORM_BLOCKS, MOT_RED_THREADS, 0, st>>>(g->norm_part, g->grads, P, gs);
    MOT_LAUNCH_CHECK();
    mot_sumsq_final_kernel<<<1, MOT_RED_THREADS, 0, st>>>(g->norm2, g->norm_part);
    MOT_LAUNCH_CHECK();
    const double lr = mot_lr_at(o, step), t = step + 1;
    const double bc1 = 1.0 - pow(o.beta1, t), bc2 = 1.0 - pow(o.beta2, t);
    for (int p = 0; p < P_COUNT; p++) {
        const MotParamInfo& info = g->tab.p[p];
        const size_t n = info.size();
        if (n == 0) continue;
        const float keep = (float)(1.0 - (info.decay ? lr * o.weight_decay : 0.0));
        mot_adamw_kernel<<<mot_blocks(n, 256), 256, 0, st>>>(
            g->params + info.offset, g->params_bf ? g->params_bf + info.offset : nullptr, g->grads + info.offset,
            g->adam_m + info.offset, g->adam_v + info.offset, n, gs, g->norm2, o.grad_clip, (float)o.beta1,
            (float)o.beta2, (float)(1 / bc1), (float)(1 / bc2), (float)o.eps, (float)lr, keep);
        MOT_LAUNCH_CHECK();
    }
    MOT_CUDA_CHECK(cudaMemcpyAsync(g->host_out, g->norm2, sizeof(double), cudaMemcpyDeviceToHost, st));
    MOT_CUDA_CHECK(cudaStreamSynchronize(st));
    return sqrt(g->host_out[0]);
}

// Logits of batch b in ORIGINAL order ([B*T][V], index (b*T + t) * V + j); runs a forward pass.
inline void mot_gpu_logits(MotGpu* g, const MotBatch& b, std::vector<float>* out) {
    mot_gpu_forward(g, b);
    const int N = g->N, V = g->cfg.vocab;
    out->assign((size_t)N * V, 0.0f);
    std::vector<float> chunk((size_t)g->head_rows * V);
    const MotBuf z = mot_gpu_z(g);
    for (int r0 = 0; r0 < N; r0 += g->head_rows) {
        const int n = std::min(g->head_rows, N - r0);
        mot_gpu_head_chunk(g, z, r0, n);
        MOT_CUDA_CHECK(cudaMemcpyAsync(chunk.data(), g->logits, (size_t)n * V * 4, cudaMemcpyDeviceToHost, g->stream));
        MOT_CUDA_CHECK(cudaStreamSynchronize(g->stream));
        for (int r = 0; r < n; r++)
            std::copy(chunk.begin() + (size_t)r * V, chunk.begin() + (size_t)(r + 1) * V,
                      out->begin() + (size_t)b.order[r0 + r] * V);
    }
}

// ============================================================================================
// 5. Data parallel over GPUs (NCCL, one process per GPU, launched with mpirun)
// ============================================================================================
#ifdef MOT_MPI
#define MOT_NCCL_CHECK(call)                                                                           \
    do {                                                                                               \
        ncclResult_t mot_r_ = (call);                                                                  \
        if (mot_r_ != ncclSuccess) {                                                                   \
            fprintf(stderr, "%s:%d: NCCL error %s\n", __FILE__, __LINE__, ncclGetErrorString(mot_r_)); \
            exit(1);                                                                                   \
        }                                                                                              \
    } while (0)
struct MotDp {
    int rank = 0, world = 1;
    ncclComm_t comm = nullptr;
};
static MotDp mot_dp;

// Call after MPI_Init and BEFORE mot_gpu_init: picks this process's GPU (the node-local rank
// modulo the GPU count), shares one NCCL id from rank 0 with MPI_Bcast and creates the
// communicator.
inline bool mot_gpu_dp_init(int rank, int world, std::string* err) {
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
        if (err) *err = "no GPU";
        return false;
    }
    int local = rank;
    if (const char* s = getenv("OMPI_COMM_WORLD_LOCAL_RANK")) local = atoi(s);
    else if (const char* s2 = getenv("MPI_LOCALRANKID")) local = atoi(s2);
    MOT_CUDA_CHECK(cudaSetDevice(local % ndev));
    ncclUniqueId id;
    if (rank == 0) MOT_NCCL_CHECK(ncclGetUniqueId(&id));
    if (MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD) != MPI_SUCCESS) {
        if (err) *err = "MPI_Bcast of the NCCL id failed";
        return false;
    }
    MOT_NCCL_CHECK(ncclCommInitRank(&mot_dp.comm, world, id, rank));
    mot_dp.rank = rank;
    mot_dp.world = world;
    return true;
}
// Averages the gradients over all ranks (in place, on the model's stream). Call after the last
// backward of a step and before mot_gpu_adamw_step; every rank then takes the same step.
inline void mot_gpu_allreduce_grads(MotGpu* g) {
    if (mot_dp.world <= 1) return;
    MOT_NCCL_CHECK(ncclAllReduce(g->grads, g->grads, g->tab.total, ncclFloat, ncclAvg, mot_dp.comm, g->stream));
}
// Mean of a host scalar over all ranks (for logging the loss).
inline double mot_gpu_dp_mean(double v) {
    if (mot_dp.world <= 1) return v;
    double s = 0;
    MPI_Allreduce(&v, &s, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    return s / mot_dp.world;
}
inline void mot_gpu_dp_free() {
    if (mot_dp.comm) MOT_NCCL_CHECK(ncclCommDestroy(mot_dp.comm));
    mot_dp = MotDp();
}
#endif  // MOT_MPI
