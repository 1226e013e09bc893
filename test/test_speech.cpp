// test_speech.cpp — tests of the speech tokenizer (tokenizers/speech.h).
// Build and run from the repository root:
//   g++ -std=c++17 -O2 -march=native -fopenmp -Wall -Wextra -I. test/test_speech.cpp -o test_speech && ./test_speech
// Fixtures are generated in memory / under /tmp; the espeak-ng case runs only if it is installed.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#define SPEECH_IMPLEMENTATION
#include "tokenizers/speech.h"

#include <cmath>
#include <complex>
#include <cstdio>
#include <cstdlib>
#include <set>
#include <string>
#include <unistd.h>
#include <vector>

static std::string tmp_path(const char* name) { return "/tmp/test_speech_" + std::to_string(getpid()) + "_" + name; }

static uint64_t g_rng_state(uint64_t seed) { return seed; }
static float rnd(uint64_t* s) {  // uniform in [-1, 1)
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((*s >> 40) / (double)(1ull << 24)) * 2.0f - 1.0f;
}

static std::vector<float> sine(double freq, double rate, size_t n, double amp = 0.5, double noise = 0.0,
                               uint64_t seed = 1) {
    std::vector<float> x(n);
    uint64_t s = g_rng_state(seed);
    for (size_t i = 0; i < n; i++) x[i] = (float)(amp * sin(2 * M_PI * freq * i / rate) + noise * rnd(&s));
    return x;
}

// Frequency (Hz) of the largest |FFT| bin of a Hann-windowed 4096-sample chunk from the middle.
static double peak_freq(const std::vector<float>& x, int rate) {
    const int N = 4096;
    SpeechFFT f;
    REQUIRE(speech_fft_init(&f, N, nullptr));
    REQUIRE(x.size() >= (size_t)N);
    std::vector<float> re(N), im(N, 0.0f);
    size_t st = (x.size() - N) / 2;
    for (int i = 0; i < N; i++) re[i] = x[st + i] * (float)(0.5 - 0.5 * cos(2 * M_PI * i / N));
    speech_fft(f, re.data(), im.data(), false);
    int best = 1;
    for (int k = 1; k < N / 2; k++)
        if (re[k] * re[k] + im[k] * im[k] > re[best] * re[best] + im[best] * im[best]) best = k;
    return (double)best * rate / N;
}

// RMS of a band-limited part of the spectrum relative to the whole (for aliasing checks).
static double rms(const std::vector<float>& x, size_t from, size_t to) {
    double s = 0;
    for (size_t i = from; i < to; i++) s += (double)x[i] * x[i];
    return sqrt(s / (to - from));
}

TEST_CASE("FFT matches a naive DFT, and inverse undoes forward") {
    uint64_t s = 7;
    for (int n : {2, 8, 64, 512}) {
        SpeechFFT f;
        REQUIRE(speech_fft_init(&f, n, nullptr));
        std::vector<float> re(n), im(n);
        for (int i = 0; i < n; i++) {
            re[i] = rnd(&s);
            im[i] = rnd(&s);
        }
        std::vector<float> r0 = re, i0 = im;
        speech_fft(f, re.data(), im.data(), false);
        double maxerr = 0;
        for (int k = 0; k < n; k++) {
            std::complex<double> acc = 0;
            for (int t = 0; t < n; t++)
                acc += std::complex<double>(r0[t], i0[t]) * std::polar(1.0, -2 * M_PI * k * t / n);
            maxerr = std::max(maxerr, std::abs(acc - std::complex<double>(re[k], im[k])));
        }
        CHECK(maxerr < 1e-4 * sqrt((double)n));
        speech_fft(f, re.data(), im.data(), true);
        double back = 0;
        for (int i = 0; i < n; i++) back = std::max(back, (double)std::max(fabsf(re[i] - r0[i]), fabsf(im[i] - i0[i])));
        CHECK(back < 1e-5);
    }
    SpeechFFT f;
    std::string err;
    CHECK_FALSE(speech_fft_init(&f, 100, &err));
    CHECK(err.find("power of two") != std::string::npos);
}

TEST_CASE("WAV write/read round trip, stereo mixing, streamed size") {
    std::vector<float> x = sine(440, 16000, 1234, 0.7, 0.2);
    x[0] = 1.5f;   // clipped to +1
    x[1] = -1.5f;  // clipped to -1
    std::string path = tmp_path("rt.wav"), err;
    REQUIRE(speech_wav_write(path.c_str(), x.data(), x.size(), 16000, &err));
    std::vector<float> y;
    int rate = 0;
    REQUIRE(speech_wav_read(path.c_str(), &y, &rate, &err));
    CHECK(rate == 16000);
    REQUIRE(y.size() == x.size());
    CHECK(fabsf(y[0] - 32767 / 32768.0f) < 1e-6f);
    CHECK(fabsf(y[1] + 32767 / 32768.0f) < 1e-6f);
    double maxerr = 0;
    for (size_t i = 2; i < x.size(); i++) maxerr = std::max(maxerr, (double)fabsf(x[i] - y[i]));
    CHECK(maxerr < 2.0 / 32767);  // written as round(x * 32767), read as v / 32768
    remove(path.c_str());

    // stereo: build by hand, left = +8192, right = -4096 -> mono (8192 - 4096) / 2 / 32768
    std::vector<uint8_t> b;
    speech_wav_encode(x.data(), 4, 22050, &b);
    b.resize(44 + 4 * 3);
    b[22] = 2;  // channels
    b[32] = 4;  // block align
    uint32_t dsize = 12, bps = 22050 * 4;
    memcpy(&b[40], &dsize, 4);
    memcpy(&b[28], &bps, 4);
    for (int i = 0; i < 3; i++) {
        int16_t l = 8192, r = -4096;
        memcpy(&b[44 + 4 * i], &l, 2);
        memcpy(&b[46 + 4 * i], &r, 2);
    }
    REQUIRE(speech_wav_parse(b.data(), b.size(), &y, &rate, &err));
    CHECK(rate == 22050);
    REQUIRE(y.size() == 3);
    CHECK(y[2] == doctest::Approx(2048.0 / 32768).epsilon(1e-6));

    // data size left as a streaming placeholder (espeak-ng --stdout): read to the end
    speech_wav_encode(x.data(), 100, 16000, &b);
    uint32_t ph = 0x7ffff000u;
    memcpy(&b[40], &ph, 4);
    REQUIRE(speech_wav_parse(b.data(), b.size(), &y, &rate, &err));
    CHECK(y.size() == 100);

    // an extra chunk before fmt (LIST) and an odd-sized chunk are skipped
    std::vector<uint8_t> c(b.begin(), b.begin() + 12);
    const uint8_t list[] = {'L', 'I', 'S', 'T', 3, 0, 0, 0, 'a', 'b', 'c', 0};
    c.insert(c.end(), list, list + sizeof list);
    c.insert(c.end(), b.begin() + 12, b.end());
    uint32_t real = 200;
    memcpy(&c[12 + sizeof list + 28], &real, 4);
    REQUIRE(speech_wav_parse(c.data(), c.size(), &y, &rate, &err));
    CHECK(y.size() == 100);
}

TEST_CASE("resampling keeps frequency and amplitude, removes what cannot be represented") {
    // 1 kHz at 22,050 Hz -> 16 kHz
    std::vector<float> x = sine(1000, 22050, 22050), y;
    speech_resample(x.data(), x.size(), 22050, 16000, &y);
    CHECK(y.size() == 16000);
    CHECK(fabs(peak_freq(y, 16000) - 1000) < 8);
    CHECK(rms(y, 2000, 14000) == doctest::Approx(0.5 / sqrt(2)).epsilon(0.01));
    // 7 kHz at 44.1 kHz is kept (below the 8 kHz Nyquist) ...
    x = sine(7000, 44100, 44100);
    speech_resample(x.data(), x.size(), 44100, 16000, &y);
    CHECK(fabs(peak_freq(y, 16000) - 7000) < 8);
    CHECK(rms(y, 2000, 14000) > 0.3);
    // ... 11 kHz would alias to 5 kHz: the low-pass must remove it (> 60 dB down)
    x = sine(11000, 44100, 44100);
    speech_resample(x.data(), x.size(), 44100, 16000, &y);
    CHECK(rms(y, 2000, 14000) < 0.5 * 1e-3);
    // upsampling 8 kHz -> 16 kHz keeps a 1.5 kHz tone; an odd rate ratio uses the direct path
    x = sine(1500, 8000, 8000);
    speech_resample(x.data(), x.size(), 8000, 16000, &y);
    CHECK(y.size() == 16000);
    CHECK(fabs(peak_freq(y, 16000) - 1500) < 8);
    x = sine(1500, 44111, 44111);
    speech_resample(x.data(), x.size(), 44111, 16000, &y);
    CHECK(y.size() == 16000);
    CHECK(fabs(peak_freq(y, 16000) - 1500) < 8);
    CHECK(rms(y, 2000, 14000) == doctest::Approx(0.5 / sqrt(2)).epsilon(0.01));
}

// Two noisy tones plus near-silence, K = 3: one unit per sound (with more units than sounds,
// k-means would split a tone's frames by their noise).
static SpeechModel train_tones() {
    std::vector<std::vector<float>> clips;
    for (int i = 0; i < 4; i++) {
        clips.push_back(sine(500, 16000, 16000, 0.5, 0.01, 10 + i));
        clips.push_back(sine(2000, 16000, 16000, 0.5, 0.01, 20 + i));
        clips.push_back(sine(0, 16000, 8000, 0.0, 0.001, 30 + i));
    }
    SpeechTrainOptions opt;
    opt.K = 3;
    opt.verbose = false;
    SpeechModel m;
    std::string err;
    REQUIRE(speech_train(clips, opt, &m, &err));
    return m;
}

TEST_CASE("pipeline on synthetic tones: distinct units, decode has the right length and pitch") {
    SpeechModel m = train_tones();
    CHECK(m.K == 3);
    std::vector<float> a = sine(500, 16000, 16000, 0.5, 0.01, 99), b = sine(2000, 16000, 16000, 0.5, 0.01, 98);
    std::vector<int> fa, fb, ua, ub;
    speech_encode_frames(m, a.data(), a.size(), &fa);
    speech_encode_frames(m, b.data(), b.size(), &fb);
    CHECK(fa.size() == 50);  // 1 s at 50 frames/s
    // interior frames of a steady tone: one unit each, and different for the two tones
    std::set<int> sa(fa.begin() + 2, fa.end() - 2), sb(fb.begin() + 2, fb.end() - 2);
    CHECK(sa.size() == 1);
    CHECK(sb.size() == 1);
    CHECK(*sa.begin() != *sb.begin());
    std::string err;
    REQUIRE(speech_encode(m, a.data(), a.size(), 16000, &ua, &err));
    CHECK(ua.size() <= 3);  // collapsed: the steady part is one unit (edge frames may differ)
    for (int u : ua) CHECK((u >= 0 && u < m.K));
    // the same tone at 22,050 Hz encodes to the same steady unit
    std::vector<float> a22 = sine(500, 22050, 22050, 0.5, 0.01, 97);
    std::vector<int> u22;
    REQUIRE(speech_encode(m, a22.data(), a22.size(), 22050, &u22, &err));
    CHECK(std::find(u22.begin(), u22.end(), *sa.begin()) != u22.end());
    // and from 16-bit samples
    std::vector<int16_t> a16(a.size());
    for (size_t i = 0; i < a.size(); i++) a16[i] = (int16_t)lrintf(a[i] * 32767);
    std::vector<int> u16;
    REQUIRE(speech_encode_i16(m, a16.data(), a16.size(), 16000, &u16, &err));
    CHECK(u16 == ua);

    // decode: 10 units x 3 frames x 320 samples, peak near 500 Hz
    std::vector<int> units(10, *sa.begin());
    SpeechDecodeOptions opt;
    opt.repeat = 3;
    std::vector<float> y;
    REQUIRE(speech_decode(m, units.data(), units.size(), opt, &y, &err));
    CHECK(y.size() == 10 * 3 * 320);
    CHECK(fabs(peak_freq(y, 16000) - 500) < 40);
    CHECK(rms(y, 0, y.size()) > 0.05);
    // the decoded audio re-encodes to the same unit
    std::vector<int> fy;
    speech_encode_frames(m, y.data(), y.size(), &fy);
    int same = 0;
    for (size_t t = 2; t + 2 < fy.size(); t++) same += fy[t] == *sa.begin();
    CHECK(same >= (int)(fy.size() - 4) * 9 / 10);
    // learned durations: a 2 kHz unit was seen in long runs, so one unit lasts many frames
    std::vector<float> yb;
    opt.repeat = 0;
    REQUIRE(speech_decode(m, &*sb.begin(), 1, opt, &yb, &err));
    CHECK(yb.size() >= 10 * 320);
    CHECK(fabs(peak_freq(yb, 16000) - 2000) < 40);
    // out-of-range units are an error
    int bad[2] = {0, m.K};
    CHECK_FALSE(speech_decode(m, bad, 2, opt, &y, &err));
    CHECK(err.find("out of range") != std::string::npos);
}

TEST_CASE("Griffin-Lim recovers a signal from its magnitudes") {
    SpeechFrontend fe;
    REQUIRE(speech_frontend_init(&fe, SpeechSettings(), nullptr));
    // a gliding tone plus a steady one, amplitude-modulated: phase must be consistent across frames
    std::vector<float> x(16000);
    for (size_t i = 0; i < x.size(); i++) {
        double t = i / 16000.0;
        x[i] = (float)((0.3 * sin(2 * M_PI * (300 * t + 400 * t * t)) + 0.2 * sin(2 * M_PI * 1800 * t)) *
                       (0.6 + 0.4 * sin(2 * M_PI * 3 * t)));
    }
    std::vector<float> lm, mag, y, sil(x.size(), 0.0f);
    speech_features(fe, x.data(), x.size(), &lm, &mag);
    int T = (int)(lm.size() / 80);
    CHECK(T == 50);
    const float d_sil = speech_logmel_distance(fe, x.data(), x.size(), sil.data(), sil.size());
    for (int overlap : {4, 3}) {  // 3: odd number of synthesis frames (the unpaired last FFT)
        SpeechDecodeOptions opt;
        opt.overlap = overlap;
        speech_griffin_lim(fe, mag.data(), T, opt, &y);
        CHECK(y.size() == x.size());
        float d = speech_logmel_distance(fe, x.data(), x.size(), y.data(), y.size());
        CHECK(d < 0.1f * d_sil);
        CHECK(rms(y, 0, y.size()) == doctest::Approx(rms(x, 0, x.size())).epsilon(0.15));
    }
}

TEST_CASE("model file round trip and corrupt model files") {
    SpeechModel m = train_tones();
    std::vector<uint8_t> bytes;
    REQUIRE(speech_model_serialize(m, &bytes));
    CHECK(bytes.size() == 32 + 4 * (2 * 80 + 3 * 80 + 3 * 257 + 3));
    CHECK(memcmp(bytes.data(), "MOTA", 4) == 0);
    std::string path = tmp_path("m.sp"), err;
    REQUIRE(speech_model_save(m, path.c_str(), &err));
    SpeechModel m2;
    REQUIRE(speech_model_load(&m2, path.c_str(), &err));
    CHECK(m2.K == m.K);
    CHECK(m2.s.hop == 320);
    CHECK(m2.s.n_fft == 512);
    CHECK(m2.centroid == m.centroid);
    CHECK(m2.spectrum == m.spectrum);
    CHECK(m2.duration == m.duration);
    CHECK(m2.mean == m.mean);
    CHECK(m2.std_ == m.std_);
    std::vector<float> a = sine(2000, 16000, 8000, 0.5, 0.01, 5);
    std::vector<int> u1, u2;
    speech_encode_frames(m, a.data(), a.size(), &u1);
    speech_encode_frames(m2, a.data(), a.size(), &u2);
    CHECK(u1 == u2);
    remove(path.c_str());

    SpeechModel bad;
    std::vector<uint8_t> c = bytes;
    c[0] = 'X';
    CHECK_FALSE(speech_model_parse(&bad, c.data(), c.size(), &err));
    CHECK(err.find("magic") != std::string::npos);
    c = bytes;
    c[4] = 2;
    CHECK_FALSE(speech_model_parse(&bad, c.data(), c.size(), &err));
    CHECK(err.find("version") != std::string::npos);
    for (size_t cut : {(size_t)0, (size_t)3, (size_t)20, (size_t)32, bytes.size() / 2, bytes.size() - 1}) {
        CHECK_FALSE(speech_model_parse(&bad, bytes.data(), cut, &err));
    }
    c = bytes;
    c.push_back(0);
    CHECK_FALSE(speech_model_parse(&bad, c.data(), c.size(), &err));
    c = bytes;
    c[12] = 100;  // n_fft 612: not a power of two (file size check fails first or settings check)
    CHECK_FALSE(speech_model_parse(&bad, c.data(), c.size(), &err));
    // no mel bins: found by fuzz_speech_model (a header with n_mels 0 passed an empty array to memcpy)
    {
        const uint32_t hdr[8] = {0x41544f4d /* MOTA */, 1, 16000, 2, 8848, 0, 0, 4};
        std::vector<uint8_t> z((const uint8_t*)hdr, (const uint8_t*)hdr + 32);
        z.resize(32 + 4 * (4 * 2 + 4), 0);  // K spectra of n_fft/2+1 = 2 bins, K durations
        CHECK_FALSE(speech_model_parse(&bad, z.data(), z.size(), &err));
        CHECK(err.find("settings out of range") != std::string::npos);
    }
    // durations are bounded: 1e9 frames per unit would make decode insert billions of frames
    for (float dur : {1e9f, (float)SPEECH_MAX_DURATION + 1, 0.5f, NAN}) {
        c = bytes;
        memcpy(&c[c.size() - 4], &dur, 4);  // the last unit's duration
        CHECK_FALSE(speech_model_parse(&bad, c.data(), c.size(), &err));
        CHECK(err.find("duration outside [1, 500]") != std::string::npos);
    }
    // and so is what decode makes: too many units give an error, not minutes of Griffin-Lim
    std::vector<int> many(SPEECH_MAX_DECODE_FRAMES + 1, 0);
    SpeechDecodeOptions one;
    one.repeat = 1;
    std::vector<float> wav;
    CHECK_FALSE(speech_decode(m, many.data(), many.size(), one, &wav, &err));
    CHECK(err.find("too long to decode") != std::string::npos);
    CHECK_FALSE(speech_model_load(&bad, "/nonexistent/m.sp", &err));
    CHECK(err.find("/nonexistent/m.sp") != std::string::npos);
}

TEST_CASE("bad WAV files give errors, not crashes") {
    std::vector<float> x = sine(440, 16000, 200);
    std::vector<uint8_t> good;
    speech_wav_encode(x.data(), x.size(), 16000, &good);
    std::vector<float> y;
    int rate;
    std::string err;
    auto fails_with = [&](const std::vector<uint8_t>& b, const char* what) {
        err.clear();
        bool ok = speech_wav_parse(b.data(), b.size(), &y, &rate, &err);
        CHECK_FALSE(ok);
        CHECK_MESSAGE(err.find(what) != std::string::npos, err);
    };
    std::vector<uint8_t> b = good;
    b[0] = 'X';
    fails_with(b, "not a RIFF/WAVE");
    b = good;
    b[8] = 'A';
    fails_with(b, "not a RIFF/WAVE");
    b = good;
    b[34] = 8;
    b[32] = 1;
    fails_with(b, "8-bit samples not supported: convert to 16-bit PCM");
    b = good;
    b[34] = 24;
    b[32] = 3;
    fails_with(b, "24-bit samples not supported");
    b = good;
    b[20] = 3;
    b[34] = 32;
    b[32] = 4;
    fails_with(b, "non-PCM format 3");
    fails_with(std::vector<uint8_t>(good.begin(), good.begin() + 44 + 100), "truncated data chunk");
    fails_with(std::vector<uint8_t>(good.begin(), good.begin() + 30), "truncated 'fmt ' chunk");
    fails_with(std::vector<uint8_t>(good.begin(), good.begin() + 36), "no data chunk");
    b = good;
    memcpy(&b[12], "junk", 4);
    fails_with(b, "no fmt chunk");
    fails_with(std::vector<uint8_t>(), "empty file");
    fails_with(std::vector<uint8_t>(good.begin(), good.begin() + 5), "not a RIFF/WAVE");

    // an empty file on disk: error names the file
    std::string path = tmp_path("empty.wav");
    FILE* f = fopen(path.c_str(), "wb");
    REQUIRE(f);
    fclose(f);
    CHECK_FALSE(speech_wav_read(path.c_str(), &y, &rate, &err));
    CHECK(err == path + ": empty file");
    remove(path.c_str());
    CHECK_FALSE(speech_wav_read("/nonexistent/x.wav", &y, &rate, &err));

    // random corruption of a valid header never crashes (ASan/valgrind would catch overreads)
    uint64_t s = 3;
    for (int trial = 0; trial < 3000; trial++) {
        b = good;
        int nflip = 1 + trial % 4;
        for (int k = 0; k < nflip; k++) b[(size_t)((rnd(&s) + 1) * 22) % 44] = (uint8_t)((rnd(&s) + 1) * 128);
        if (trial % 3 == 0) b.resize((size_t)((rnd(&s) + 1) * 0.5 * b.size()));
        speech_wav_parse(b.data(), b.size(), &y, &rate, &err);
    }
}

TEST_CASE("real speech from espeak-ng encodes to units in range") {
    if (system("command -v espeak-ng >/dev/null 2>&1") != 0) {
        MESSAGE("espeak-ng not installed: skipped");
        return;
    }
    const char* cmds[] = {"espeak-ng -w %s -v en-us+f3 -s 160 -p 50 \"seven of clubs\"",
                          "espeak-ng -w %s -v en-gb-scotland+m3 -s 140 -p 30 \"the queen of hearts\"",
                          "espeak-ng -w %s -v en+m1 -s 190 -p 70 \"four nine two\""};
    std::vector<std::vector<float>> clips;
    std::string err;
    for (int i = 0; i < 3; i++) {
        std::string path = tmp_path(("es" + std::to_string(i) + ".wav").c_str());
        char cmd[512];
        snprintf(cmd, sizeof cmd, cmds[i], path.c_str());
        REQUIRE(system(cmd) == 0);
        std::vector<float> x;
        int rate = 0;
        REQUIRE(speech_wav_read(path.c_str(), &x, &rate, &err));
        CHECK(rate == 22050);
        std::vector<float> r;
        REQUIRE(speech_wav_load(path.c_str(), 16000, &r, &err));
        CHECK(r.size() == doctest::Approx(x.size() * 16000.0 / 22050).epsilon(0.001));
        clips.push_back(r);
        remove(path.c_str());
    }
    SpeechTrainOptions opt;
    opt.K = 32;
    opt.verbose = false;
    SpeechModel m;
    REQUIRE(speech_train(clips, opt, &m, &err));
    std::vector<int> u;
    REQUIRE(speech_encode(m, clips[0].data(), clips[0].size(), 16000, &u, &err));
    double secs = clips[0].size() / 16000.0;
    CHECK(u.size() > 3 * secs);   // speech changes: many units
    CHECK(u.size() < 50 * secs);  // but never more than one per frame
    for (int v : u) CHECK((v >= 0 && v < 32));
    for (size_t i = 1; i < u.size(); i++) CHECK(u[i] != u[i - 1]);  // collapsed
    std::vector<float> y;
    SpeechDecodeOptions dopt;
    REQUIRE(speech_decode(m, u.data(), u.size(), dopt, &y, &err));
    CHECK(y.size() > 0.5 * clips[0].size());
    CHECK(y.size() < 2.0 * clips[0].size());
    CHECK(rms(y, 0, y.size()) > 0.01);
    // frame-aligned resynthesis is much closer to the original than silence is
    std::vector<int> fr;
    speech_encode_frames(m, clips[0].data(), clips[0].size(), &fr);
    REQUIRE(speech_decode_frames(m, fr.data(), fr.size(), dopt, &y, &err));
    std::vector<float> sil(clips[0].size(), 0.0f);
    float d = speech_logmel_distance(m.fe, clips[0].data(), clips[0].size(), y.data(), y.size());
    float ds = speech_logmel_distance(m.fe, clips[0].data(), clips[0].size(), sil.data(), sil.size());
    CHECK(d < 0.5f * ds);
}
