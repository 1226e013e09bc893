// bench_bpe - train the byte-level BPE on a real corpus and time training, encoding and
// decoding.
//
//   apt-get install -y bible-kjv && bible "gen1:1-rev22:21" > /tmp/kjv.txt
//   make dev/bench_bpe
//   ./dev/bench_bpe [CORPUS=/tmp/kjv.txt] [VOCAB...=2048 4096]

#define BPE_IMPLEMENTATION
#include "tokenizers/bpe.h"

#include <chrono>
#include <cstdio>
#include <ctime>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

static double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// CPU time of this process: on a shared machine wall time alone overstates the cost
static double cpu_s() {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char** argv) {
    const char* path = argc > 1 ? argv[1] : "/tmp/kjv.txt";
    std::vector<int> vocabs;
    for (int i = 2; i < argc; i++) vocabs.push_back(atoi(argv[i]));
    if (vocabs.empty()) vocabs = {2048, 4096};

    std::string text, err;
    if (!bpe_read_file(path, &text, &err)) {
        fprintf(stderr, "bench_bpe: %s\n(make it with: bible \"gen1:1-rev22:21\" > /tmp/kjv.txt)\n", err.c_str());
        return 1;
    }
    const double mb = text.size() / 1e6;
    printf("corpus %s: %.2f MB\n", path, mb);

    double t0 = now_s();
    BpeWordCounts wc;
    bpe_count_words(&wc, text.data(), text.size());
    double t_count = now_s() - t0;
    printf("count words: %.3f s (%llu words, %zu unique)\n", t_count, (unsigned long long)wc.n_words, wc.counts.size());

    for (int vocab : vocabs) {
        Bpe b;
        double c0 = cpu_s();
        t0 = now_s();
        if (!bpe_train(&b, wc, vocab, false, &err)) {
            fprintf(stderr, "bench_bpe: %s\n", err.c_str());
            return 1;
        }
        double t_train = now_s() - t0, c_train = cpu_s() - c0;

        // cold: empty per-word cache; warm: second pass over the same text
        std::vector<int> ids;
        ids.reserve(text.size());
        t0 = now_s();
        bpe_encode(&b, text.data(), text.size(), &ids);
        double t_cold = now_s() - t0;
        ids.clear();
        c0 = cpu_s();
        t0 = now_s();
        bpe_encode(&b, text.data(), text.size(), &ids);
        double t_warm = now_s() - t0, c_warm = cpu_s() - c0;

        std::string back;
        back.reserve(text.size());
        t0 = now_s();
        bool ok = bpe_decode(b, ids.data(), ids.size(), &back, &err);
        double t_dec = now_s() - t0;
        ok = ok && back == text;
        for (int id : ids) ok = ok && id >= 0 && id < bpe_vocab_size(b);

        printf(
            "vocab %d: train %.3f s (count %.3f + merge %.3f; merge CPU %.3f s) | %zu tokens, "
            "%.2f bytes/token | encode %.1f MB/s cold, %.1f MB/s warm (%.1f MB/s per CPU "
            "second) | decode %.0f MB/s | round trip %s\n",
            bpe_vocab_size(b), t_count + t_train, t_count, t_train, c_train, ids.size(),
            (double)text.size() / ids.size(), mb / t_cold, mb / t_warm, mb / c_warm, mb / t_dec, ok ? "OK" : "FAILED");
        if (!ok) return 1;

        // worst case for the cache: random bytes, every word new
        std::mt19937 rng(1);
        std::string rnd(4 << 20, '\0');
        for (char& c : rnd) c = (char)(rng() & 0xff);
        Bpe fresh = b;
        ids.clear();
        t0 = now_s();
        bpe_encode(&fresh, rnd.data(), rnd.size(), &ids);
        double t_rnd = now_s() - t0;
        back.clear();
        ok = bpe_decode(b, ids.data(), ids.size(), &back, &err) && back == rnd;
        printf("vocab %d: random bytes %.1f MB: encode %.1f MB/s, round trip %s\n", bpe_vocab_size(b), rnd.size() / 1e6,
               rnd.size() / 1e6 / t_rnd, ok ? "OK" : "FAILED");
        if (!ok) return 1;
    }
    return 0;
}
