// bench_speech.cpp — trains the speech tokenizer on espeak-ng clips and reports the figures:
// units per second after collapsing, training time, encode/decode speed, and round-trip
// log-mel distances. Needs `espeak-ng` on PATH (apt-get install -y espeak-ng).
//
// Build and run (from the repository root):
//   make dev/bench_speech
//   ./dev/bench_speech [--train 300] [--test 40] [--units 256] [--out /tmp/speech_bench]
// It writes OUT/model.sp, OUT/orig_N.wav and OUT/resynth_N.wav (listen to them, or check with
// `sox OUT/resynth_0.wav -n stat`), and OUT/train.list (the training clips are also saved as
// OUT/train/*.wav so the CLI can be timed on the same data: `speech train m.sp --list OUT/train.list`).
#define SPEECH_IMPLEMENTATION
#include "tokenizers/speech.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <sys/stat.h>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

static double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

static const char* kVoices[] = {"en-us",         "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan",
                                "en-gb-x-gbcwmd"};
static const char* kVariants[] = {"", "+m1", "+m2", "+m3", "+m4", "+m5", "+m6", "+m7", "+f1", "+f2", "+f3", "+f4"};
static const char* kWords[] = {"zero",     "one",   "two",   "three",   "four",    "five",  "six",   "seven",  "eight",
                               "nine",     "ten",   "jack",  "queen",   "king",    "ace",   "clubs", "hearts", "spades",
                               "diamonds", "red",   "green", "blue",    "yellow",  "black", "white", "circle", "square",
                               "triangle", "small", "large", "the",     "a",       "of",    "and",   "is",     "on",
                               "left",     "right", "above", "below",   "picture", "shows", "there", "cat",    "dog",
                               "house",    "tree",  "water", "morning", "evening"};

static uint64_t rng_next(uint64_t* s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// ln-mel frames of y, floored at 1e-5 x the peak mel energy of the reference (as speech_logmel_distance).
static std::vector<float> floored_logmel(const SpeechFrontend& fe, const std::vector<float>& y, float peak) {
    std::vector<float> lm;
    speech_features(fe, y.data(), y.size(), &lm, nullptr);
    for (float& v : lm) v = logf(std::max(expf(v) - 1e-6f, 0.0f) + peak * 1e-5f);
    return lm;
}

// Log-mel distance after dynamic time warping (steps (1,0), (0,1), (1,1)): mean per-frame RMS
// difference along the best path. Used where the decoded timing differs from the original.
static double dtw_distance(const SpeechFrontend& fe, const std::vector<float>& x, const std::vector<float>& y) {
    std::vector<float> lm;
    speech_features(fe, x.data(), x.size(), &lm, nullptr);
    float peak = 0;
    for (float v : lm) peak = std::max(peak, expf(v) - 1e-6f);
    std::vector<float> a = floored_logmel(fe, x, peak), b = floored_logmel(fe, y, peak);
    const int d = fe.s.n_mels, A = (int)(a.size() / d), B = (int)(b.size() / d);
    if (A == 0 || B == 0) return 0;
    const double INF = 1e30;
    std::vector<double> cost((size_t)(A + 1) * (B + 1), INF);
    std::vector<int> len((size_t)(A + 1) * (B + 1), 0);
    cost[0] = 0;
    for (int i = 1; i <= A; i++)
        for (int j = 1; j <= B; j++) {
            double c = 0;
            for (int k = 0; k < d; k++) {
                double t = a[(size_t)(i - 1) * d + k] - b[(size_t)(j - 1) * d + k];
                c += t * t;
            }
            c = sqrt(c / d);
            size_t here = (size_t)i * (B + 1) + j, up = here - (B + 1), left = here - 1, diag = up - 1;
            size_t best = diag;
            if (cost[up] < cost[best]) best = up;
            if (cost[left] < cost[best]) best = left;
            cost[here] = cost[best] + c;
            len[here] = len[best] + 1;
        }
    size_t end = (size_t)A * (B + 1) + B;
    return cost[end] / len[end];
}

struct Clip {
    std::string cmd;
    std::vector<float> x;
};

// A random phrase of 1-4 words in a random voice/variant/speed/pitch.
static std::string make_cmd(uint64_t* rng) {
    auto pick = [&](int n) { return (int)(rng_next(rng) % n); };
    std::string voice = std::string(kVoices[pick(7)]) + kVariants[pick(12)];
    int speed = 120 + pick(81), pitch = 20 + pick(61), nw = 1 + pick(4);
    std::string text;
    for (int i = 0; i < nw; i++) text += (i ? " " : "") + std::string(kWords[pick(50)]);
    return "espeak-ng --stdout -v " + voice + " -s " + std::to_string(speed) + " -p " + std::to_string(pitch) + " \"" +
           text + "\"";
}

static bool synth(Clip* c, std::string* err) {
    FILE* p = popen(c->cmd.c_str(), "r");
    if (!p) {
        *err = "popen failed";
        return false;
    }
    std::vector<uint8_t> b;
    uint8_t tmp[1 << 15];
    size_t got;
    while ((got = fread(tmp, 1, sizeof tmp, p)) > 0) b.insert(b.end(), tmp, tmp + got);
    int rc = pclose(p);
    if (rc != 0) {
        *err = c->cmd + ": exit " + std::to_string(rc);
        return false;
    }
    std::vector<float> x;
    int rate;
    if (!speech_wav_parse(b.data(), b.size(), &x, &rate, err)) {
        *err = c->cmd + ": " + *err;
        return false;
    }
    speech_resample(x.data(), x.size(), rate, 16000, &c->x);
    return true;
}

int main(int argc, char** argv) {
    int n_train = 300, n_test = 40, K = 256;
    std::string out = "/tmp/speech_bench";
    for (int i = 1; i + 1 < argc; i += 2) {
        std::string a = argv[i];
        if (a == "--train") n_train = atoi(argv[i + 1]);
        else if (a == "--test") n_test = atoi(argv[i + 1]);
        else if (a == "--units") K = atoi(argv[i + 1]);
        else if (a == "--out") out = argv[i + 1];
        else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (system("command -v espeak-ng >/dev/null") != 0) {
        fprintf(stderr, "bench_speech: espeak-ng not installed\n");
        return 1;
    }
    mkdir(out.c_str(), 0755);
    mkdir((out + "/train").c_str(), 0755);

    // 1. synthesise clips (two espeak-ng processes at a time)
    uint64_t rng = 42;
    std::vector<Clip> clips(n_train + n_test);
    for (auto& c : clips) c.cmd = make_cmd(&rng);
    double t0 = now_s();
    int bad = 0;
    std::string first_err;
#pragma omp parallel for schedule(dynamic, 1) num_threads(2)
    for (int i = 0; i < (int)clips.size(); i++) {
        std::string err;
        if (!synth(&clips[i], &err)) {
#pragma omp critical
            {
                bad++;
                if (first_err.empty()) first_err = err;
            }
        }
    }
    if (bad) {
        fprintf(stderr, "bench_speech: %d clips failed: %s\n", bad, first_err.c_str());
        return 1;
    }
    double audio_train = 0, audio_test = 0;
    std::vector<std::vector<float>> train, test;
    FILE* lf = fopen((out + "/train.list").c_str(), "w");
    for (int i = 0; i < (int)clips.size(); i++) {
        if (i < n_train) {
            audio_train += clips[i].x.size() / 16000.0;
            std::string path = out + "/train/" + std::to_string(i) + ".wav", err;
            if (!speech_wav_write(path.c_str(), clips[i].x.data(), clips[i].x.size(), 16000, &err)) {
                fprintf(stderr, "%s\n", err.c_str());
                return 1;
            }
            if (lf) fprintf(lf, "%s\n", path.c_str());
            train.push_back(clips[i].x);
        } else {
            audio_test += clips[i].x.size() / 16000.0;
            test.push_back(clips[i].x);
        }
    }
    if (lf) fclose(lf);
    printf("synthesised %d train clips (%.1f s audio) + %d test clips (%.1f s) in %.1f s\n", n_train, audio_train,
           n_test, audio_test, now_s() - t0);

    // 2. train
    SpeechTrainOptions opt;
    opt.K = K;
    SpeechModel m;
    std::string err;
    double t1 = now_s();
    if (!speech_train(train, opt, &m, &err)) {
        fprintf(stderr, "train: %s\n", err.c_str());
        return 1;
    }
    double t_train = now_s() - t1;
    printf("training: K=%d, %.2f s (%d threads)\n", K, t_train,
#ifdef _OPENMP
           omp_get_max_threads()
#else
           1
#endif
    );
    if (!speech_model_save(m, (out + "/model.sp").c_str(), &err)) {
        fprintf(stderr, "%s\n", err.c_str());
        return 1;
    }

    // 3. encode held-out clips: speed, units/s, unit usage
    double t2 = now_s();
    size_t n_units = 0;
    std::vector<std::vector<int>> units(test.size());
    for (size_t i = 0; i < test.size(); i++) {
        if (!speech_encode(m, test[i].data(), test[i].size(), 16000, &units[i], &err)) {
            fprintf(stderr, "%s\n", err.c_str());
            return 1;
        }
        n_units += units[i].size();
    }
    double t_enc = now_s() - t2;
    std::vector<int> used(K, 0);
    for (auto& u : units)
        for (int v : u) used[v] = 1;
    int n_used = 0;
    for (int v : used) n_used += v;
    printf(
        "encode (held-out): %.1f units/s after collapsing (%.0f frames/s before); %d of %d units used; "
        "%.0fx real time (%.2f ms per second of audio)\n",
        n_units / audio_test, 16000.0 / m.s.hop, n_used, K, audio_test / t_enc, 1000 * t_enc / audio_test);

    // 4. decode + round trip
    SpeechDecodeOptions dopt;
    double t3 = now_s(), dtw_units = 0, dtw_other = 0, dtw_vocoder = 0, d_units = 0, d_frames = 0, d_vocoder = 0,
           d_other = 0, d_silence = 0, len_ratio = 0;
    double t_dec = 0;
    for (size_t i = 0; i < test.size(); i++) {
        const std::vector<float>& x = test[i];
        double ts = now_s();
        std::vector<float> y;
        if (!speech_decode(m, units[i].data(), units[i].size(), dopt, &y, &err)) {
            fprintf(stderr, "%s\n", err.c_str());
            return 1;
        }
        t_dec += now_s() - ts;
        len_ratio += (double)y.size() / x.size();
        d_units += speech_logmel_distance(m.fe, x.data(), x.size(), y.data(), y.size());
        dtw_units += dtw_distance(m.fe, x, y);
        dtw_other += dtw_distance(m.fe, x, test[(i + 1) % test.size()]);
        // Frame-aligned resynthesis (uncollapsed units): isolates the unit quantisation + Griffin-Lim.
        std::vector<int> fr;
        speech_encode_frames(m, x.data(), x.size(), &fr);
        std::vector<float> yf;
        speech_decode_frames(m, fr.data(), fr.size(), dopt, &yf, &err);
        d_frames += speech_logmel_distance(m.fe, x.data(), x.size(), yf.data(), yf.size());
        // Reference points: Griffin-Lim from the clip's own magnitudes (the vocoder's floor), another
        // clip (what "unrelated" looks like), and silence.
        std::vector<float> lm, mag, yv;
        speech_features(m.fe, x.data(), x.size(), &lm, &mag);
        speech_griffin_lim(m.fe, mag.data(), (int)(lm.size() / m.s.n_mels), dopt, &yv);
        d_vocoder += speech_logmel_distance(m.fe, x.data(), x.size(), yv.data(), yv.size());
        dtw_vocoder += dtw_distance(m.fe, x, yv);
        const std::vector<float>& o = test[(i + 1) % test.size()];
        std::vector<float> other(x.size(), 0.0f);
        for (size_t j = 0; j < x.size() && j < o.size(); j++) other[j] = o[j];
        d_other += speech_logmel_distance(m.fe, x.data(), x.size(), other.data(), other.size());
        std::vector<float> sil(x.size(), 0.0f);
        d_silence += speech_logmel_distance(m.fe, x.data(), x.size(), sil.data(), sil.size());
        if (i < 4) {
            speech_wav_write((out + "/orig_" + std::to_string(i) + ".wav").c_str(), x.data(), x.size(), 16000, &err);
            speech_wav_write((out + "/resynth_" + std::to_string(i) + ".wav").c_str(), y.data(), y.size(), 16000, &err);
            speech_wav_write((out + "/resynth_frames_" + std::to_string(i) + ".wav").c_str(), yf.data(), yf.size(),
                             16000, &err);
            printf("  clip %zu: %s -> %zu units, %.2f s -> %.2f s\n", i, clips[n_train + i].cmd.c_str(),
                   units[i].size(), x.size() / 16000.0, y.size() / 16000.0);
        }
    }
    (void)t3;
    double n = (double)test.size();
    printf("decode: %.0fx real time (%.2f ms per second of output, %d Griffin-Lim iterations)\n",
           (len_ratio / n * audio_test) / t_dec, 1000 * t_dec / (len_ratio / n * audio_test), dopt.gl_iters);
    printf("decoded length / original length (learned durations): %.3f\n", len_ratio / n);
    printf("log-mel distance to the original (RMS of ln-mel difference, 50 dB floor; lower is better):\n");
    printf("  decode(collapsed units)                  %.3f   (misaligned: timing differs; see DTW below)\n",
           d_units / n);
    printf("  decode(per-frame units, aligned)         %.3f\n", d_frames / n);
    printf("  Griffin-Lim of the clip's own magnitudes %.3f   (vocoder floor)\n", d_vocoder / n);
    printf("  a different clip                         %.3f   (unrelated)\n", d_other / n);
    printf("  silence                                  %.3f\n", d_silence / n);
    printf("the same after dynamic time warping (per-frame RMS along the best path):\n");
    printf("  decode(collapsed units, learned durations) %.3f\n", dtw_units / n);
    printf("  Griffin-Lim of the clip's own magnitudes   %.3f   (vocoder floor)\n", dtw_vocoder / n);
    printf("  a different clip                           %.3f   (unrelated)\n", dtw_other / n);
    printf("wrote %s/model.sp, orig_*.wav, resynth_*.wav\n", out.c_str());
    return 0;
}
