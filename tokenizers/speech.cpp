// speech.cpp — command-line front end of the speech tokenizer (tokenizers/speech.h).
//
//   speech train OUT.sp [--units K] [--iters N] [--seed S] [--list FILE] [FILE.wav ...]
//   speech encode MODEL.sp IN.wav [IN2.wav ...] [--frames]  > units.txt   (one line per file)
//   speech decode MODEL.sp OUT.wav [--repeat R] [--iters N]  < units.txt
//   speech info MODEL.sp
//
// Build: g++ -std=c++17 -O2 -march=native -fopenmp -Wall -Wextra -I. tokenizers/speech.cpp -o speech
// Exit status: 0 ok, 1 error (one line on stderr), 2 usage.
#define SPEECH_IMPLEMENTATION
#include "tokenizers/speech.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static void usage() {
    fprintf(stderr,
            "usage:\n"
            "  speech train OUT.sp [--units K] [--iters N] [--seed S] [--list FILE] [FILE.wav ...]\n"
            "        k-means units on log-mel frames (default K=256); --list reads one WAV path per line\n"
            "  speech encode MODEL.sp IN.wav [IN2.wav ...] [--frames]\n"
            "        prints one line of space-separated units per file (--frames: do not collapse repeats)\n"
            "  speech decode MODEL.sp OUT.wav [--repeat R] [--iters N] < units.txt\n"
            "        units -> mean spectra -> Griffin-Lim -> 16 kHz WAV (R frames per unit; default: learned)\n"
            "  speech info MODEL.sp\n");
    exit(2);
}

static int die(const std::string& msg) {
    fprintf(stderr, "speech: %s\n", msg.c_str());
    return 1;
}

// Parses a non-negative int option value; false on junk.
static bool parse_int(const char* s, int lo, int hi, int* out) {
    char* end = nullptr;
    long v = strtol(s, &end, 10);
    if (!*s || *end || v < lo || v > hi) return false;
    *out = (int)v;
    return true;
}

static double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

static int cmd_train(int argc, char** argv) {
    if (argc < 1) usage();
    const char* out = argv[0];
    SpeechTrainOptions opt;
    std::vector<std::string> files;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        bool has = i + 1 < argc;
        if (a == "--units" && has) {
            if (!parse_int(argv[++i], 1, 65536, &opt.K)) return die(std::string("bad --units '") + argv[i] + "'");
        } else if (a == "--iters" && has) {
            if (!parse_int(argv[++i], 1, 1000, &opt.max_iters))
                return die(std::string("bad --iters '") + argv[i] + "'");
        } else if (a == "--seed" && has) {
            int s;
            if (!parse_int(argv[++i], 0, 2147483647, &s)) return die(std::string("bad --seed '") + argv[i] + "'");
            opt.seed = (uint32_t)s;
        } else if (a == "--list" && has) {
            const char* lf = argv[++i];
            FILE* f = fopen(lf, "r");
            if (!f) return die(std::string(lf) + ": cannot open: " + strerror(errno));
            char line[4096];
            while (fgets(line, sizeof line, f)) {
                std::string s = line;
                while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
                if (!s.empty() && s[0] != '#') files.push_back(s);
            }
            fclose(f);
        } else if (a.size() > 1 && a[0] == '-') {
            usage();
        } else {
            files.push_back(a);
        }
    }
    if (files.empty()) return die("train: no WAV files given");
    double t0 = now_s();
    std::vector<std::vector<float>> clips(files.size());
    std::string err;
    for (size_t i = 0; i < files.size(); i++) {
        if (!speech_wav_load(files[i].c_str(), opt.settings.sample_rate, &clips[i], &err)) return die(err);
        if ((i + 1) % 100 == 0 || i + 1 == files.size())
            fprintf(stderr, "\rspeech: read %zu/%zu files", i + 1, files.size());
    }
    fprintf(stderr, " (%.1f s)\n", now_s() - t0);
    SpeechModel m;
    double t1 = now_s();
    if (!speech_train(clips, opt, &m, &err)) return die(err);
    fprintf(stderr, "speech: training took %.1f s\n", now_s() - t1);
    if (!speech_model_save(m, out, &err)) return die(err);
    fprintf(stderr, "speech: wrote %s\n", out);
    return 0;
}

static int cmd_encode(int argc, char** argv) {
    if (argc < 2) usage();
    SpeechModel m;
    std::string err;
    if (!speech_model_load(&m, argv[0], &err)) return die(err);
    bool frames = false;
    std::vector<const char*> files;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--frames")) frames = true;
        else if (argv[i][0] == '-' && argv[i][1]) usage();
        else files.push_back(argv[i]);
    }
    if (files.empty()) usage();
    for (const char* path : files) {
        std::vector<float> x;
        int rate = 0;
        if (!speech_wav_read(path, &x, &rate, &err)) return die(err);
        std::vector<int> u;
        if (frames) {
            std::vector<float> rs;
            speech_resample(x.data(), x.size(), rate, m.s.sample_rate, &rs);
            speech_encode_frames(m, rs.data(), rs.size(), &u);
        } else if (!speech_encode(m, x.data(), x.size(), rate, &u, &err)) {
            return die(std::string(path) + ": " + err);
        }
        std::string line;
        for (size_t i = 0; i < u.size(); i++) line += (i ? " " : "") + std::to_string(u[i]);
        printf("%s\n", line.c_str());
    }
    if (fflush(stdout) != 0) return die("stdout: write error");
    return 0;
}

static int cmd_decode(int argc, char** argv) {
    if (argc < 2) usage();
    SpeechDecodeOptions opt;
    for (int i = 2; i < argc; i++) {
        std::string a = argv[i];
        bool has = i + 1 < argc;
        if (a == "--repeat" && has) {
            if (!parse_int(argv[++i], 1, 1000, &opt.repeat)) return die(std::string("bad --repeat '") + argv[i] + "'");
        } else if (a == "--iters" && has) {
            if (!parse_int(argv[++i], 0, 10000, &opt.gl_iters))
                return die(std::string("bad --iters '") + argv[i] + "'");
        } else {
            usage();
        }
    }
    SpeechModel m;
    std::string err;
    if (!speech_model_load(&m, argv[0], &err)) return die(err);
    std::vector<int> units;
    char tok[64];
    int c, len = 0;
    auto flush_tok = [&]() -> bool {
        if (!len) return true;
        tok[len] = 0;
        len = 0;
        int v;
        if (!parse_int(tok, 0, 1 << 30, &v)) return false;
        units.push_back(v);
        return true;
    };
    while ((c = getchar()) != EOF) {
        if (c == ' ' || c == '\n' || c == '\t' || c == '\r') {
            if (!flush_tok()) return die(std::string("stdin: bad unit '") + tok + "'");
        } else if (len < 62) {
            tok[len++] = (char)c;
        } else {
            return die("stdin: unit token too long");
        }
    }
    if (!flush_tok()) return die(std::string("stdin: bad unit '") + tok + "'");
    if (units.empty()) return die("stdin: no units to decode");
    std::vector<float> y;
    if (!speech_decode(m, units.data(), units.size(), opt, &y, &err)) return die("stdin: " + err);
    if (!speech_wav_write(argv[1], y.data(), y.size(), m.s.sample_rate, &err)) return die(err);
    fprintf(stderr, "speech: %zu units -> %.2f s of audio in %s\n", units.size(), (double)y.size() / m.s.sample_rate,
            argv[1]);
    return 0;
}

static int cmd_info(int argc, char** argv) {
    if (argc != 1) usage();
    SpeechModel m;
    std::string err;
    if (!speech_model_load(&m, argv[0], &err)) return die(err);
    double md = 0;
    for (float d : m.duration) md += d;
    printf("sample_rate %d\nn_fft %d\nwin_length %d\nhop %d\nn_mels %d\nK %d\nmean_duration_frames %.3f\n",
           m.s.sample_rate, m.s.n_fft, m.s.win_length, m.s.hop, m.s.n_mels, m.K, md / m.K);
    return 0;
}

int main(int argc, char** argv) {
    if (argc < 2) usage();
    std::string cmd = argv[1];
    if (cmd == "train") return cmd_train(argc - 2, argv + 2);
    if (cmd == "encode") return cmd_encode(argc - 2, argv + 2);
    if (cmd == "decode") return cmd_decode(argc - 2, argv + 2);
    if (cmd == "info") return cmd_info(argc - 2, argv + 2);
    usage();
}
