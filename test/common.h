// common.h — helpers shared by the model tests (test_mot.cpp on the CPU, test_gpu.cu on the GPU).
#pragma once
#include <vector>

#include "mot.h"

// Random tokens drawn from the modalities `mods`, random targets likewise, two of them ignored
// (the second and the last position).
static inline MotBatch random_batch(const MotConfig& c, int B, int T, uint64_t seed, std::vector<int> mods = {0, 1, 2}) {
    MotBatch b;
    b.B = B; b.T = T;
    auto draw = [&](uint64_t* s) {
        int m = mods[mot_rand_u64(s) % mods.size()];
        int lo = m == 0 ? 0 : m == 1 ? c.image_begin : c.speech_begin;
        int hi = m == 0 ? c.image_begin : m == 1 ? c.speech_begin : c.vocab;
        return lo + (int)(mot_rand_u64(s) % (hi - lo));
    };
    for (int i = 0; i < B * T; i++) { b.tokens.push_back(draw(&seed)); b.targets.push_back(draw(&seed)); }
    b.targets[1] = MOT_IGNORE;
    b.targets[B * T - 1] = MOT_IGNORE;
    mot_group(c, &b);
    return b;
}
