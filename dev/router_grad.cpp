// router_grad.cpp — how much gradient the experts' routers get while training: the norm of the
// router gradient (all router rows of a layer, before clipping) per layer, every step, of a MoE-4x
// trained on the default dataset with the CPU reference. Built against today's mot.h it measures
// today's expert rule (each expert's output normalised before its gate); built against the mot.h
// of an earlier commit, the rule of that commit (the norm of the gated sum, before 60a06ab):
//
//   make dev/router_grad && ./dev/router_grad > runs/router_new.txt
//   mkdir -p /tmp/oldrule && git show 60a06ab~1:mot.h > /tmp/oldrule/mot.h &&
//     g++ -std=c++17 -O3 -march=native -fopenmp -I/tmp/oldrule -I. dev/router_grad.cpp -o /tmp/router_grad_old &&
//     /tmp/router_grad_old > runs/router_old.txt
//   ./dev/router_grad [DATA_PATTERN ('data/default/train_*.bin')] [STEPS (200)] [D (256)] [THREADS (1)]
//
// The shape and schedule are those of the experts experiment at D=256 (4 layers, 4 heads, F = 3D,
// T=128, B=16, peak lr 3e-3 after 100 warmup steps of a 3,000-step cosine, seed 1 and its data
// order). Prints one line per step: the loss, the whole gradient's norm and
// each layer's router-gradient norm; then per layer the mean over the steps.
#include "mot.h"

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

int main(int argc, char** argv) {
    const std::string pattern = argc > 1 ? argv[1] : "data/default/train_*.bin";
    const int steps = argc > 2 ? atoi(argv[2]) : 200, D = argc > 3 ? atoi(argv[3]) : 256;
    omp_set_num_threads(argc > 4 ? atoi(argv[4]) : 1);
    const int T = 128, B = 16;
    if (steps < 1 || steps > 3000 || D < 8 || D % 8 || D > 4096) {
        fprintf(stderr, "router_grad: STEPS must be 1-3000 and D a multiple of 8\n");
        return 2;
    }
    MotLoader ld;
    std::string err;
    if (!mot_loader_open(&ld, pattern, T, 1 ^ 0xDA7A, &err)) {  // ./mot --seed 1's data order
        fprintf(stderr, "router_grad: %s\n", err.c_str());
        return 1;
    }
    MotConfig c;
    c.n_layer = 4;
    c.d_model = D;
    c.n_head = 4;
    c.d_ff = 3 * D;
    c.max_seq = T;
    c.vocab = ld.vocab.vocab;
    c.image_begin = ld.vocab.image_begin;
    c.speech_begin = ld.vocab.speech_begin;
    c.n_tower = 1;
    c.n_expert[0] = 4;  // MoE-4x: one tower, 4 experts
    const std::string bad = mot_config_error(c);
    if (!bad.empty()) {
        fprintf(stderr, "router_grad: %s\n", bad.c_str());
        return 1;
    }
    MotModel<float> m;
    mot_init(&m, c, 1);
    MotOptim o;
    o.lr = 3e-3;
    o.warmup = 100;
    o.steps = 3000;
    const MotParamInfo& wr = m.tab.p[P_WR];
    std::vector<double> mean(c.n_layer, 0.0);
    printf("# MoE-4x D=%d L=%d T=%d B=%d, %d steps; columns: step loss grad_norm router_norm[layer 0..%d]\n", D,
           c.n_layer, T, B, steps, c.n_layer - 1);
    MotBatch b;
    for (int s = 0; s < steps; s++) {
        mot_loader_next(&ld, c, B, T, &b);
        const double loss = mot_forward(&m, b);
        mot_zero_grad(&m);
        mot_backward(&m, b);
        double all = 0;
        for (float g : m.grads) all += double(g) * g;
        printf("%d %.5f %.5g", s + 1, loss, std::sqrt(all));
        for (int l = 0; l < c.n_layer; l++) {
            double n2 = 0;
            for (size_t i = 0; i < wr.copies * wr.each(); i++) {
                const double g = m.grads[wr.at(l, 0) + i];
                n2 += g * g;
            }
            printf(" %.5g", std::sqrt(n2));
            mean[l] += std::sqrt(n2) / steps;
        }
        printf("\n");
        fflush(stdout);
        mot_adamw_step(&m, o, s);
    }
    printf("# mean router-gradient norm per layer over %d steps:", steps);
    for (int l = 0; l < c.n_layer; l++) printf(" %.5g", mean[l]);
    printf("\n");
    return 0;
}
