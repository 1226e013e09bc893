// speech.h — the speech tokenizer: 16 kHz audio <-> discrete speech units.
//
// Like the first iteration of HuBERT, the units are k-means clusters of spectral features:
//
//   encode: WAV -> mono -> resample to 16 kHz -> log-mel frames (20 ms hop, 50 frames/s)
//           -> per-band mean/variance normalisation -> nearest of K centroids
//           -> collapse consecutive repeats ("5 5 5 9 9" -> "5 9")
//   decode: units -> each unit held for its learned mean run length (or a fixed number of frames)
//           -> that unit's mean linear magnitude spectrum (kept from training)
//           -> Griffin-Lim phase reconstruction (fast/momentum variant, 32 iterations) -> 16 kHz WAV
//
// Decoding is deliberately crude (one average spectrum per unit, no vocoder): it exists so that
// units can be listened to and sanity-checked, not to produce natural speech.
//
// Usage (stb style): in exactly one .cpp file
//     #define SPEECH_IMPLEMENTATION
//     #include "tokenizers/speech.h"
// Everything else includes the header for the declarations only. No global state: a loaded
// SpeechModel is read-only during encode/decode, so many threads can share one.
// Library functions never exit(): they return false and fill *err (if err is non-null).
//
// ---------------------------------------------------------------------------------------------
// Choices (and why)
//   sample rate 16,000 Hz      every input is resampled to this (speech has little above 8 kHz)
//   window 400 samples (25 ms), periodic Hann, zero-padded to an FFT of 512 -> 257 bins
//   hop 320 samples (20 ms)    50 frames/s before collapsing: keeps unit sequences short.
//                              Frame t is centred on the middle of samples [t*hop, (t+1)*hop), so
//                              a clip of n samples has ceil(n/hop) frames and frames tile the clip.
//   80 mel bands               Slaney mel scale and area normalisation (librosa's default),
//                              0..8000 Hz, on the power spectrum; feature = ln(mel + 1e-6)
//   K = 256 units (default)    fits easily in the shared vocabulary; espeak-ng speech is not very
//                              varied, and fewer units give the LM an easier job
//   k-means                    k-means++ init, then Lloyd until < 0.1% of frames change (max 30
//                              iterations); empty clusters are re-seeded with the worst-fit frame
//   decode duration            each unit is held for its mean run length measured on the training
//                              data (silence units are long, consonants short), accumulated with
//                              rounding so the total length is right on average; or, with
//                              SpeechDecodeOptions::repeat = R > 0, a fixed R frames per unit
//   Griffin-Lim                synthesis hop = hop/4 (80 samples, 5x window overlap, so the
//                              phase is well constrained), magnitudes linearly interpolated between
//                              20 ms frames to soften unit boundaries, random initial phase from a
//                              fixed seed, fast Griffin-Lim momentum 0.99 (Perraudin et al. 2013)
//   resampling                 windowed-sinc low-pass interpolation: Blackman-windowed sinc,
//                              16 zero crossings each side, cutoff 0.97 x the lower Nyquist rate;
//                              kernel tabulated per phase when the rate ratio is a small fraction
//                              (22,050 -> 16,000 has 320 phases), computed directly otherwise
//
// Measured (dev/bench_speech.cpp: 300 espeak-ng clips, 397 s, 7 accents x 12 voice variants,
// speed 120-200, pitch 20-80; 40 held-out clips; 2 Zen 5 cores shared with other jobs):
//   K=256: training 4-10 s; 22-24 units/s after collapsing (from 50 frames/s); encode ~0.6-1.1 ms
//   per second of audio; decode (32 Griffin-Lim iterations) ~45 ms per second of audio; decoded
//   length 1.06x the original on average; log-mel distance to the original after DTW 0.75
//   (Griffin-Lim from the true magnitudes 0.21, an unrelated clip 1.98).
//
// ---------------------------------------------------------------------------------------------
// Model file (.sp), all little-endian, float32 = IEEE-754 binary32, no padding:
//   offset  size            field
//   0       4               magic "MOTA" (bytes 'M','O','T','A')
//   4       4   uint32      version = 1
//   8       4   uint32      sample_rate   (16000)
//   12      4   uint32      n_fft         (512, a power of two)
//   16      4   uint32      win_length    (400, <= n_fft)
//   20      4   uint32      hop           (320)
//   24      4   uint32      n_mels        (80)
//   28      4   uint32      K             (number of units, 256)
//   32      4*n_mels        float32 mean[n_mels]      per-band mean of the log-mel training frames
//   ...     4*n_mels        float32 std[n_mels]       per-band standard deviation (> 0)
//   ...     4*K*n_mels      float32 centroid[K][n_mels]   in normalised space ((x - mean) / std)
//   ...     4*K*B           float32 spectrum[K][B], B = n_fft/2 + 1: mean linear magnitude
//                           spectrum |STFT| of the training frames assigned to each unit
//   ...     4*K             float32 duration[K]: mean run length of each unit, in frames (>= 1)
//   total = 32 + 4*(2*n_mels + K*n_mels + K*B + K) bytes; the loader rejects any other size,
//   a bad magic, another version, settings out of range, and a duration outside
//   [1, SPEECH_MAX_DURATION] frames.
// Bounds on hostile input: files over SPEECH_MAX_FILE bytes are refused before reading, WAV
// clips over SPEECH_MAX_SECONDS, and decoding to more than SPEECH_MAX_DECODE_FRAMES frames.
// With the defaults (n_mels 80, K 256, B 257) the file is 346,784 bytes.
// ---------------------------------------------------------------------------------------------
#ifndef SPEECH_H
#define SPEECH_H
#define SPEECH_MAX_FILE (1u << 30)      // bytes of a WAV or model file
#define SPEECH_MAX_SECONDS 3600         // WAV clip length
#define SPEECH_MAX_DURATION 500         // a unit's mean run length, in frames (10 s at 50 frames/s)
#define SPEECH_MAX_DECODE_FRAMES 30000  // decoded length (10 minutes at 50 frames/s)
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

// ---- FFT: iterative radix-2, complex, in place, split real/imaginary arrays -----------------
struct SpeechFFT {
    int n = 0;
    std::vector<float> cs, sn;  // cos/sin(2*pi*k/n), k < n/2
    std::vector<int> rev;       // bit-reversal permutation
};
bool speech_fft_init(SpeechFFT* f, int n, std::string* err);  // n must be a power of two >= 2
// forward: X[k] = sum_t x[t] e^{-2 pi i k t / n}; inverse: e^{+...} and divided by n
void speech_fft(const SpeechFFT& f, float* re, float* im, bool inverse);

// ---- WAV -------------------------------------------------------------------------------------
// Parse RIFF/WAVE PCM 16-bit (any channel count, mixed to mono by averaging; any rate) into
// floats in [-1, 1). A data chunk whose size is a streaming placeholder (>= 0x7FFF0000, as
// written by `espeak-ng --stdout`) runs to the end of the input.
bool speech_wav_parse(const uint8_t* data, size_t n, std::vector<float>* mono, int* sample_rate, std::string* err);
bool speech_wav_read(const char* path, std::vector<float>* mono, int* sample_rate, std::string* err);
// Read and resample to target_rate (errors are prefixed with the path).
bool speech_wav_load(const char* path, int target_rate, std::vector<float>* out, std::string* err);
// 16-bit mono PCM, samples clipped to [-1, 1].
void speech_wav_encode(const float* x, size_t n, int sample_rate, std::vector<uint8_t>* bytes);
bool speech_wav_write(const char* path, const float* x, size_t n, int sample_rate, std::string* err);

// Windowed-sinc resampling (see the choices above). Output length = round(n * out_rate / in_rate).
void speech_resample(const float* in, size_t n, int in_rate, int out_rate, std::vector<float>* out);

// ---- features --------------------------------------------------------------------------------
struct SpeechSettings {
    int sample_rate = 16000, n_fft = 512, win_length = 400, hop = 320, n_mels = 80;
};
struct SpeechFrontend {  // settings plus everything derived from them (read-only once built)
    SpeechSettings s;
    int n_bins = 0;  // n_fft/2 + 1
    SpeechFFT fft;
    std::vector<float> window;        // periodic Hann, win_length
    std::vector<int> mel_lo, mel_hi;  // band m uses bins [mel_lo[m], mel_hi[m])
    std::vector<float> mel_w;         // weights, n_mels * n_bins (mostly zero; only [lo,hi) read)
};
bool speech_frontend_init(SpeechFrontend* fe, const SpeechSettings& s, std::string* err);
int speech_num_frames(const SpeechFrontend& fe, size_t n_samples);  // ceil(n / hop)
// Per frame: log-mel (n_mels floats) and, if mag != nullptr, |STFT| (n_bins floats).
void speech_features(const SpeechFrontend& fe, const float* x, size_t n, std::vector<float>* logmel,
                     std::vector<float>* mag);
// Log-mel distance between two clips: RMS over frames and bands of the difference of
// ln(mel + floor), floor = 1e-5 x the largest mel value of clip a (a 50 dB range, so that
// near-silence does not dominate). Frames beyond the shorter clip are ignored.
float speech_logmel_distance(const SpeechFrontend& fe, const float* a, size_t na, const float* b, size_t nb);

// ---- model -----------------------------------------------------------------------------------
struct SpeechModel {
    SpeechSettings s;
    int K = 0;
    std::vector<float> mean, std_;  // n_mels each
    std::vector<float> centroid;    // K * n_mels, normalised space
    std::vector<float> spectrum;    // K * n_bins, mean linear magnitude
    std::vector<float> duration;    // K, mean run length in frames
    // derived by speech_model_finish (not stored):
    SpeechFrontend fe;
    std::vector<float> cnorm;  // |centroid_k|^2
};
bool speech_model_finish(SpeechModel* m, std::string* err);  // validate + build derived data
bool speech_model_save(const SpeechModel& m, const char* path, std::string* err);
bool speech_model_serialize(const SpeechModel& m, std::vector<uint8_t>* bytes);
bool speech_model_parse(SpeechModel* m, const uint8_t* data, size_t n, std::string* err);
bool speech_model_load(SpeechModel* m, const char* path, std::string* err);  // errors name the file

// ---- training --------------------------------------------------------------------------------
struct SpeechTrainOptions {
    int K = 256;
    int max_iters = 30;
    int max_frames = 200000;  // k-means runs on at most this many frames (evenly subsampled);
                              // the final assignment, spectra and durations use every frame
    uint32_t seed = 1234;
    bool verbose = true;  // progress on stderr
    SpeechSettings settings;
};
// clips: mono audio already at settings.sample_rate.
bool speech_train(const std::vector<std::vector<float>>& clips, const SpeechTrainOptions& opt, SpeechModel* m,
                  std::string* err);

// ---- encode ----------------------------------------------------------------------------------
// Nearest centroid of each log-mel frame (n_frames * n_mels floats, not yet normalised).
void speech_assign(const SpeechModel& m, const float* logmel, int n_frames, int* units);
// One unit per frame (not collapsed); samples at m.s.sample_rate.
void speech_encode_frames(const SpeechModel& m, const float* x, size_t n, std::vector<int>* units);
// Collapse consecutive repeats; runs (optional) receives each run's length.
void speech_collapse(const int* frames, size_t n, std::vector<int>* units, std::vector<int>* runs);
// The entry point for the dataset builder: an in-memory buffer at any sample rate ->
// collapsed units in [0, K). Thread-safe on a shared model.
bool speech_encode(const SpeechModel& m, const float* x, size_t n, int sample_rate, std::vector<int>* units,
                   std::string* err);
// The same from 16-bit PCM samples (e.g. what libespeak-ng's synthesis callback delivers).
bool speech_encode_i16(const SpeechModel& m, const int16_t* x, size_t n, int sample_rate, std::vector<int>* units,
                       std::string* err);

// ---- decode ----------------------------------------------------------------------------------
struct SpeechDecodeOptions {
    int repeat = 0;          // frames per unit: 0 = the unit's learned mean run length
    int gl_iters = 32;       // Griffin-Lim iterations
    float momentum = 0.99f;  // fast Griffin-Lim; 0 = classic Griffin-Lim
    int overlap = 4;         // synthesis hop = hop / overlap
    uint32_t seed = 1;       // initial random phase
};
// Units (collapsed) -> samples at m.s.sample_rate. Fails on a unit outside [0, K).
bool speech_decode(const SpeechModel& m, const int* units, size_t n, const SpeechDecodeOptions& opt,
                   std::vector<float>* out, std::string* err);
// One unit per 20 ms frame (no duration model) -> samples; n_frames * hop samples long.
bool speech_decode_frames(const SpeechModel& m, const int* frame_units, size_t n_frames, const SpeechDecodeOptions& opt,
                          std::vector<float>* out, std::string* err);
// Griffin-Lim from magnitudes given per 20 ms frame (n_frames * n_bins): output n_frames * hop.
void speech_griffin_lim(const SpeechFrontend& fe, const float* mag, int n_frames, const SpeechDecodeOptions& opt,
                        std::vector<float>* out);

#endif  // SPEECH_H

// =============================================================================================
// Implementation (guarded separately, stb style, so that a translation unit may include the
// header for declarations first and again later with SPEECH_IMPLEMENTATION defined).
#if defined(SPEECH_IMPLEMENTATION) && !defined(SPEECH_IMPLEMENTATION_DONE)
#define SPEECH_IMPLEMENTATION_DONE
#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>

static bool speech_fail_(std::string* err, const std::string& msg) {
    if (err) *err = msg;
    return false;
}

// ---- FFT ----------------------------------------------------------------------------------------
bool speech_fft_init(SpeechFFT* f, int n, std::string* err) {
    if (n < 2 || (n & (n - 1)) != 0)
        return speech_fail_(err, "FFT size " + std::to_string(n) + " is not a power of two");
    f->n = n;
    f->cs.resize(n / 2);
    f->sn.resize(n / 2);
    for (int k = 0; k < n / 2; k++) {  // in double: twiddle error would otherwise grow with log n
        double a = 2.0 * M_PI * k / n;
        f->cs[k] = (float)cos(a);
        f->sn[k] = (float)sin(a);
    }
    f->rev.resize(n);
    int bits = 0;
    while ((1 << bits) < n) bits++;
    for (int i = 0; i < n; i++) {
        int r = 0;
        for (int b = 0; b < bits; b++) r |= ((i >> b) & 1) << (bits - 1 - b);
        f->rev[i] = r;
    }
    return true;
}

void speech_fft(const SpeechFFT& f, float* re, float* im, bool inverse) {
    const int n = f.n;
    for (int i = 0; i < n; i++) {
        int j = f.rev[i];
        if (j > i) {
            std::swap(re[i], re[j]);
            std::swap(im[i], im[j]);
        }
    }
    const float sgn = inverse ? 1.0f : -1.0f;
    for (int len = 2; len <= n; len <<= 1) {
        const int half = len >> 1, step = n / len;
        for (int i = 0; i < n; i += len) {
            for (int k = 0; k < half; k++) {
                float wr = f.cs[k * step], wi = sgn * f.sn[k * step];
                int a = i + k, b = a + half;
                float tr = re[b] * wr - im[b] * wi;
                float ti = re[b] * wi + im[b] * wr;
                re[b] = re[a] - tr;
                im[b] = im[a] - ti;
                re[a] += tr;
                im[a] += ti;
            }
        }
    }
    if (inverse) {
        float s = 1.0f / n;
        for (int i = 0; i < n; i++) {
            re[i] *= s;
            im[i] *= s;
        }
    }
}

// ---- WAV ----------------------------------------------------------------------------------------
static uint32_t speech_u32_(const uint8_t* p) { return p[0] | (p[1] << 8) | (p[2] << 16) | ((uint32_t)p[3] << 24); }
static uint16_t speech_u16_(const uint8_t* p) { return (uint16_t)(p[0] | (p[1] << 8)); }

bool speech_wav_parse(const uint8_t* d, size_t n, std::vector<float>* mono, int* sample_rate, std::string* err) {
    if (n == 0) return speech_fail_(err, "empty file");
    if (n < 12 || memcmp(d, "RIFF", 4) != 0) return speech_fail_(err, "not a RIFF/WAVE file (no RIFF header)");
    if (memcmp(d + 8, "WAVE", 4) != 0) return speech_fail_(err, "not a RIFF/WAVE file (RIFF but not WAVE)");
    bool have_fmt = false, have_data = false, streamed = false;
    int format = 0, channels = 0, bits = 0, block = 0;
    uint32_t rate = 0;
    size_t data_off = 0, data_len = 0;
    size_t pos = 12;
    while (pos + 8 <= n && !(have_fmt && have_data)) {
        const uint8_t* c = d + pos;
        uint32_t size = speech_u32_(c + 4);
        size_t body = pos + 8, avail = n - body;
        if (memcmp(c, "data", 4) == 0) {
            have_data = true;
            data_off = body;
            if (size > avail) {
                // Tools that write to a pipe cannot seek back to fix the size: they leave a
                // placeholder near 2^31 or 2^32. Anything smaller that overruns is truncation.
                if (size < 0x7FFF0000u)
                    return speech_fail_(err, "truncated data chunk (header says " + std::to_string(size) +
                                                 " bytes, file has " + std::to_string(avail) + ")");
                streamed = true;
                data_len = avail;
            } else {
                data_len = size;
            }
            pos = body + data_len + (data_len & 1);
            continue;
        }
        if (size > avail) {
            std::string id((const char*)c, 4);
            for (char& ch : id)
                if (ch < 32 || ch > 126) ch = '?';
            return speech_fail_(err, "truncated '" + id + "' chunk");
        }
        if (memcmp(c, "fmt ", 4) == 0) {
            if (size < 16) return speech_fail_(err, "fmt chunk too short");
            const uint8_t* f = d + body;
            format = speech_u16_(f);
            channels = speech_u16_(f + 2);
            rate = speech_u32_(f + 4);
            block = speech_u16_(f + 12);
            bits = speech_u16_(f + 14);
            if (format == 0xFFFE && size >= 40) format = speech_u16_(f + 24);  // EXTENSIBLE: sub-format GUID
            have_fmt = true;
        }
        pos = body + size + (size & 1);
    }
    if (!have_fmt) return speech_fail_(err, "no fmt chunk");
    if (!have_data) return speech_fail_(err, "no data chunk");
    if (format != 1) {
        const char* name = format == 3 ? " (IEEE float)" : format == 6 ? " (A-law)" : format == 7 ? " (mu-law)" : "";
        return speech_fail_(err, "non-PCM format " + std::to_string(format) + name + ": convert to 16-bit PCM");
    }
    if (bits != 16)
        return speech_fail_(err, std::to_string(bits) + "-bit samples not supported: convert to 16-bit PCM");
    if (channels < 1) return speech_fail_(err, "fmt chunk says 0 channels");
    if (rate < 1000 || rate > 768000) return speech_fail_(err, "unsupported sample rate " + std::to_string(rate));
    if (block != 2 * channels) return speech_fail_(err, "bad block align " + std::to_string(block));
    size_t frames = data_len / block;
    if (!streamed && data_len % block != 0) return speech_fail_(err, "truncated data (partial sample at the end)");
    if (frames / rate >= SPEECH_MAX_SECONDS)
        return speech_fail_(err, "clip longer than " + std::to_string(SPEECH_MAX_SECONDS) + " s");
    mono->assign(frames, 0.0f);
    const float scale = 1.0f / (32768.0f * channels);
    const uint8_t* p = d + data_off;
    for (size_t i = 0; i < frames; i++) {
        int sum = 0;
        for (int ch = 0; ch < channels; ch++, p += 2) sum += (int16_t)speech_u16_(p);
        (*mono)[i] = sum * scale;
    }
    *sample_rate = (int)rate;
    return true;
}

static bool speech_read_file_(const char* path, std::vector<uint8_t>* buf, std::string* err) {
    FILE* f = fopen(path, "rb");
    if (!f) return speech_fail_(err, std::string(path) + ": cannot open: " + strerror(errno));
    if (fseek(f, 0, SEEK_END) == 0 && ftell(f) > (long)SPEECH_MAX_FILE) {  // refused before reading
        fclose(f);
        return speech_fail_(
            err, std::string(path) + ": file too large (over " + std::to_string(SPEECH_MAX_FILE) + " bytes)");
    }
    rewind(f);
    buf->clear();
    uint8_t tmp[1 << 16];
    size_t got;
    while ((got = fread(tmp, 1, sizeof tmp, f)) > 0) buf->insert(buf->end(), tmp, tmp + got);
    bool bad = ferror(f);
    fclose(f);
    if (bad) return speech_fail_(err, std::string(path) + ": read error");
    return true;
}

bool speech_wav_read(const char* path, std::vector<float>* mono, int* sample_rate, std::string* err) {
    std::vector<uint8_t> buf;
    if (!speech_read_file_(path, &buf, err)) return false;
    std::string e;
    if (!speech_wav_parse(buf.data(), buf.size(), mono, sample_rate, &e))
        return speech_fail_(err, std::string(path) + ": " + e);
    return true;
}

bool speech_wav_load(const char* path, int target_rate, std::vector<float>* out, std::string* err) {
    std::vector<float> x;
    int rate = 0;
    if (!speech_wav_read(path, &x, &rate, err)) return false;
    if (rate == target_rate) {
        out->swap(x);
        return true;
    }
    speech_resample(x.data(), x.size(), rate, target_rate, out);
    return true;
}

void speech_wav_encode(const float* x, size_t n, int sample_rate, std::vector<uint8_t>* b) {
    b->assign(44 + 2 * n, 0);
    uint8_t* p = b->data();
    auto put32 = [](uint8_t* q, uint32_t v) {
        q[0] = v;
        q[1] = v >> 8;
        q[2] = v >> 16;
        q[3] = v >> 24;
    };
    auto put16 = [](uint8_t* q, uint16_t v) {
        q[0] = v;
        q[1] = v >> 8;
    };
    memcpy(p, "RIFF", 4);
    put32(p + 4, (uint32_t)(36 + 2 * n));
    memcpy(p + 8, "WAVE", 4);
    memcpy(p + 12, "fmt ", 4);
    put32(p + 16, 16);
    put16(p + 20, 1);
    put16(p + 22, 1);
    put32(p + 24, sample_rate);
    put32(p + 28, sample_rate * 2);
    put16(p + 32, 2);
    put16(p + 34, 16);
    memcpy(p + 36, "data", 4);
    put32(p + 40, (uint32_t)(2 * n));
    for (size_t i = 0; i < n; i++) {
        float v = std::max(-1.0f, std::min(1.0f, x[i])) * 32767.0f;
        put16(p + 44 + 2 * i, (uint16_t)(int16_t)lrintf(v));
    }
}

static bool speech_write_file_(const char* path, const std::vector<uint8_t>& b, std::string* err) {
    FILE* f = fopen(path, "wb");
    if (!f) return speech_fail_(err, std::string(path) + ": cannot create: " + strerror(errno));
    bool ok = fwrite(b.data(), 1, b.size(), f) == b.size();
    ok = (fclose(f) == 0) && ok;
    if (!ok) return speech_fail_(err, std::string(path) + ": write error");
    return true;
}
bool speech_wav_write(const char* path, const float* x, size_t n, int sample_rate, std::string* err) {
    std::vector<uint8_t> b;
    speech_wav_encode(x, n, sample_rate, &b);
    return speech_write_file_(path, b, err);
}

// ---- resampling -----------------------------------------------------------------------------------
// h(d) = 2 fc sinc(2 fc d) * blackman(d / hw), d in input samples, fc in cycles per input sample.
static double speech_kernel_(double d, double fc, double hw) {
    if (fabs(d) >= hw) return 0.0;
    double x = 2.0 * fc * d;
    double s = fabs(x) < 1e-12 ? 1.0 : sin(M_PI * x) / (M_PI * x);
    double u = (d / hw + 1.0) * 0.5;  // 0..1 across the window
    double w = 0.42 - 0.5 * cos(2 * M_PI * u) + 0.08 * cos(4 * M_PI * u);
    return 2.0 * fc * s * w;
}

void speech_resample(const float* in, size_t n, int in_rate, int out_rate, std::vector<float>* out) {
    if (in_rate <= 0 || out_rate <= 0) {
        out->clear();
        return;
    }
    if (in_rate == out_rate || n == 0) {
        out->assign(in, in + n);
        return;
    }
    const int zeros = 16;
    const double fc = 0.5 * std::min(1.0, (double)out_rate / in_rate) * 0.97;
    const double hw = zeros / (2.0 * fc);  // half-width in input samples
    const int k0 = (int)ceil(hw), taps = 2 * k0 + 2;
    size_t m_out = (size_t)llround((double)n * out_rate / in_rate);
    out->assign(m_out, 0.0f);
    // Output m sits at input position t = m * in/out = i0 + p/L with L = out/g, M = in/g.
    long long g = std::gcd((long long)in_rate, (long long)out_rate);
    long long L = out_rate / g, M = in_rate / g;
    std::vector<float> table;
    if (L <= 4096) {
        table.resize((size_t)L * taps);
        for (long long p = 0; p < L; p++)
            for (int k = 0; k < taps; k++)
                table[p * taps + k] = (float)speech_kernel_((double)p / L - (k - k0), fc, hw);
    }
    std::vector<float> w(taps);
    for (size_t m = 0; m < m_out; m++) {
        long long num = (long long)m * M;
        long long i0 = num / L, p = num % L;
        const float* wt;
        if (!table.empty()) {
            wt = &table[p * taps];
        } else {
            for (int k = 0; k < taps; k++) w[k] = (float)speech_kernel_((double)p / L - (k - k0), fc, hw);
            wt = w.data();
        }
        double acc = 0;
        long long j0 = i0 - k0;
        for (int k = 0; k < taps; k++) {
            long long j = j0 + k;
            if (j >= 0 && j < (long long)n) acc += wt[k] * in[j];
        }
        (*out)[m] = (float)acc;
    }
}

// ---- features -------------------------------------------------------------------------------------
static double speech_hz_to_mel_(double f) {  // Slaney: linear below 1 kHz, logarithmic above
    const double fsp = 200.0 / 3, min_log_hz = 1000.0, min_log_mel = min_log_hz / fsp, step = log(6.4) / 27.0;
    return f < min_log_hz ? f / fsp : min_log_mel + log(f / min_log_hz) / step;
}
static double speech_mel_to_hz_(double m) {
    const double fsp = 200.0 / 3, min_log_hz = 1000.0, min_log_mel = min_log_hz / fsp, step = log(6.4) / 27.0;
    return m < min_log_mel ? m * fsp : min_log_hz * exp(step * (m - min_log_mel));
}

bool speech_frontend_init(SpeechFrontend* fe, const SpeechSettings& s, std::string* err) {
    if (s.sample_rate < 1000 || s.sample_rate > 768000)
        return speech_fail_(err, "bad sample rate " + std::to_string(s.sample_rate));
    if (s.n_fft < 16 || s.n_fft > 65536 || (s.n_fft & (s.n_fft - 1)))
        return speech_fail_(err, "bad n_fft " + std::to_string(s.n_fft));
    if (s.win_length < 2 || s.win_length > s.n_fft)
        return speech_fail_(err, "bad win_length " + std::to_string(s.win_length));
    if (s.hop < 1 || s.hop > s.n_fft) return speech_fail_(err, "bad hop " + std::to_string(s.hop));
    if (s.n_mels < 1 || s.n_mels > 512) return speech_fail_(err, "bad n_mels " + std::to_string(s.n_mels));
    fe->s = s;
    fe->n_bins = s.n_fft / 2 + 1;
    if (!speech_fft_init(&fe->fft, s.n_fft, err)) return false;
    fe->window.resize(s.win_length);
    for (int i = 0; i < s.win_length; i++) fe->window[i] = (float)(0.5 - 0.5 * cos(2 * M_PI * i / s.win_length));
    // Triangular filters on mel-spaced edges, each scaled to unit area (2 / width in Hz).
    const int nb = fe->n_bins, nm = s.n_mels;
    double mlo = speech_hz_to_mel_(0.0), mhi = speech_hz_to_mel_(s.sample_rate / 2.0);
    std::vector<double> edge(nm + 2);
    for (int i = 0; i < nm + 2; i++) edge[i] = speech_mel_to_hz_(mlo + (mhi - mlo) * i / (nm + 1));
    fe->mel_w.assign((size_t)nm * nb, 0.0f);
    fe->mel_lo.assign(nm, 0);
    fe->mel_hi.assign(nm, 0);
    for (int m = 0; m < nm; m++) {
        double lo = edge[m], c = edge[m + 1], hi = edge[m + 2], norm = 2.0 / (hi - lo);
        int first = nb, last = 0;
        for (int k = 0; k < nb; k++) {
            double f = (double)k * s.sample_rate / s.n_fft;
            double w = std::max(0.0, std::min((f - lo) / (c - lo), (hi - f) / (hi - c)));
            if (w > 0) {
                fe->mel_w[(size_t)m * nb + k] = (float)(w * norm);
                first = std::min(first, k);
                last = k + 1;
            }
        }
        if (first >= last) {
            first = 0;
            last = 0;
        }  // empty band (only with too many mels): stays at the floor
        fe->mel_lo[m] = first;
        fe->mel_hi[m] = last;
    }
    return true;
}

int speech_num_frames(const SpeechFrontend& fe, size_t n) { return (int)((n + fe.s.hop - 1) / fe.s.hop); }

// Windowed frame centred on sample c (zero outside the clip) -> FFT in re/im.
static void speech_frame_fft_(const SpeechFrontend& fe, const float* x, size_t n, long long c, float* re, float* im) {
    const int N = fe.s.n_fft, W = fe.s.win_length;
    long long start = c - W / 2;
    for (int i = 0; i < W; i++) {
        long long j = start + i;
        re[i] = (j >= 0 && j < (long long)n) ? x[j] * fe.window[i] : 0.0f;
    }
    for (int i = W; i < N; i++) re[i] = 0.0f;
    for (int i = 0; i < N; i++) im[i] = 0.0f;
    speech_fft(fe.fft, re, im, false);
}

static const float SPEECH_LOG_EPS = 1e-6f;

void speech_features(const SpeechFrontend& fe, const float* x, size_t n, std::vector<float>* logmel,
                     std::vector<float>* mag) {
    const int T = speech_num_frames(fe, n), N = fe.s.n_fft, nb = fe.n_bins, nm = fe.s.n_mels, hop = fe.s.hop;
    logmel->resize((size_t)T * nm);
    if (mag) mag->resize((size_t)T * nb);
    std::vector<float> re(N), im(N), pw(nb);
    for (int t = 0; t < T; t++) {
        speech_frame_fft_(fe, x, n, (long long)t * hop + hop / 2, re.data(), im.data());
        for (int k = 0; k < nb; k++) pw[k] = re[k] * re[k] + im[k] * im[k];
        if (mag)
            for (int k = 0; k < nb; k++) (*mag)[(size_t)t * nb + k] = sqrtf(pw[k]);
        float* out = &(*logmel)[(size_t)t * nm];
        for (int m = 0; m < nm; m++) {
            const float* w = &fe.mel_w[(size_t)m * nb];
            float e = 0;
            for (int k = fe.mel_lo[m]; k < fe.mel_hi[m]; k++) e += w[k] * pw[k];
            out[m] = logf(e + SPEECH_LOG_EPS);
        }
    }
}

float speech_logmel_distance(const SpeechFrontend& fe, const float* a, size_t na, const float* b, size_t nb_) {
    std::vector<float> la, lb;
    speech_features(fe, a, na, &la, nullptr);
    speech_features(fe, b, nb_, &lb, nullptr);
    const int nm = fe.s.n_mels;
    size_t T = std::min(la.size(), lb.size()) / nm;
    if (T == 0) return 0.0f;
    // Features are ln(e + eps); recover e, re-floor relative to clip a's peak.
    float peak = 0;
    for (float v : la) peak = std::max(peak, expf(v) - SPEECH_LOG_EPS);
    const float floor_ = std::max(peak * 1e-5f, 1e-12f);
    double s = 0;
    for (size_t i = 0; i < T * nm; i++) {
        float ea = std::max(expf(la[i]) - SPEECH_LOG_EPS, 0.0f), eb = std::max(expf(lb[i]) - SPEECH_LOG_EPS, 0.0f);
        double d = log(ea + floor_) - log(eb + floor_);
        s += d * d;
    }
    return (float)sqrt(s / (T * nm));
}

// ---- model file -----------------------------------------------------------------------------------
static const uint32_t SPEECH_VERSION = 1;

bool speech_model_finish(SpeechModel* m, std::string* err) {
    if (!speech_frontend_init(&m->fe, m->s, err)) return false;
    const int nm = m->s.n_mels, nb = m->fe.n_bins, K = m->K;
    if (K < 1 || K > 65536) return speech_fail_(err, "bad K " + std::to_string(K));
    if ((int)m->mean.size() != nm || (int)m->std_.size() != nm || m->centroid.size() != (size_t)K * nm ||
        m->spectrum.size() != (size_t)K * nb || (int)m->duration.size() != K)
        return speech_fail_(err, "model arrays have the wrong sizes");
    for (float v : m->std_)
        if (!(v > 0) || !std::isfinite(v)) return speech_fail_(err, "model has a non-positive std");
    for (const std::vector<float>* a : {&m->mean, &m->centroid, &m->spectrum})
        for (float v : *a)
            if (!std::isfinite(v)) return speech_fail_(err, "model has a non-finite value");
    for (float v : m->spectrum)
        if (v < 0) return speech_fail_(err, "model has a negative magnitude");
    for (float v : m->duration)
        if (!(v >= 1.0f && v <= SPEECH_MAX_DURATION))
            return speech_fail_(
                err, "model has a unit duration outside [1, " + std::to_string(SPEECH_MAX_DURATION) + "] frames");
    m->cnorm.assign(K, 0.0f);
    for (int k = 0; k < K; k++) {
        float s = 0;
        for (int j = 0; j < nm; j++) s += m->centroid[(size_t)k * nm + j] * m->centroid[(size_t)k * nm + j];
        m->cnorm[k] = s;
    }
    return true;
}

bool speech_model_serialize(const SpeechModel& m, std::vector<uint8_t>* b) {
    b->clear();
    auto put32 = [&](uint32_t v) {
        for (int i = 0; i < 4; i++) b->push_back((uint8_t)(v >> (8 * i)));
    };
    auto putf = [&](const std::vector<float>& v) {
        for (float f : v) {
            uint32_t u;
            memcpy(&u, &f, 4);
            put32(u);
        }
    };
    b->reserve(32 + 4 * (m.mean.size() + m.std_.size() + m.centroid.size() + m.spectrum.size() + m.duration.size()));
    for (char ch : {'M', 'O', 'T', 'A'}) b->push_back((uint8_t)ch);
    put32(SPEECH_VERSION);
    put32(m.s.sample_rate);
    put32(m.s.n_fft);
    put32(m.s.win_length);
    put32(m.s.hop);
    put32(m.s.n_mels);
    put32(m.K);
    putf(m.mean);
    putf(m.std_);
    putf(m.centroid);
    putf(m.spectrum);
    putf(m.duration);
    return true;
}

bool speech_model_save(const SpeechModel& m, const char* path, std::string* err) {
    std::vector<uint8_t> b;
    speech_model_serialize(m, &b);
    return speech_write_file_(path, b, err);
}

bool speech_model_parse(SpeechModel* m, const uint8_t* d, size_t n, std::string* err) {
    if (n < 8 || memcmp(d, "MOTA", 4) != 0) return speech_fail_(err, "not a speech model (bad magic)");
    uint32_t ver = speech_u32_(d + 4);
    if (ver != SPEECH_VERSION) return speech_fail_(err, "unsupported speech model version " + std::to_string(ver));
    if (n < 32) return speech_fail_(err, "truncated speech model header");
    uint32_t h[6];
    for (int i = 0; i < 6; i++) h[i] = speech_u32_(d + 8 + 4 * i);
    if (h[0] > 768000 || h[1] > 65536 || h[2] > 65536 || h[3] > 65536 || h[4] > 512 || h[4] < 1 || h[5] > 65536 ||
        h[5] < 1)
        return speech_fail_(err, "speech model settings out of range");
    m->s.sample_rate = h[0];
    m->s.n_fft = h[1];
    m->s.win_length = h[2];
    m->s.hop = h[3];
    m->s.n_mels = h[4];
    m->K = h[5];
    const size_t nm = h[4], K = h[5], nb = h[1] / 2 + 1;
    const size_t floats = 2 * nm + K * nm + K * nb + K, want = 32 + 4 * floats;
    if (n < want)
        return speech_fail_(
            err, "truncated speech model (" + std::to_string(n) + " bytes, expected " + std::to_string(want) + ")");
    if (n > want) return speech_fail_(err, "speech model has " + std::to_string(n - want) + " trailing bytes");
    const uint8_t* p = d + 32;
    auto getf = [&](std::vector<float>* v, size_t count) {
        v->resize(count);
        if (count) memcpy(v->data(), p, 4 * count);  // little-endian host assumed (x86/ARM)
        p += 4 * count;
    };
    getf(&m->mean, nm);
    getf(&m->std_, nm);
    getf(&m->centroid, K * nm);
    getf(&m->spectrum, K * nb);
    getf(&m->duration, K);
    return speech_model_finish(m, err);
}

bool speech_model_load(SpeechModel* m, const char* path, std::string* err) {
    std::vector<uint8_t> buf;
    if (!speech_read_file_(path, &buf, err)) return false;
    std::string e;
    if (!speech_model_parse(m, buf.data(), buf.size(), &e)) return speech_fail_(err, std::string(path) + ": " + e);
    return true;
}

// ---- nearest centroid --------------------------------------------------------------------------------
// argmin_k |x - c_k|^2 = argmin_k (|c_k|^2 - 2 x.c_k); x already normalised.
static int speech_nearest_(const float* x, const float* cent, const float* cnorm, int K, int d, float* dist) {
    int best = 0;
    float bd = 3.4e38f;
    for (int k = 0; k < K; k++) {
        const float* c = cent + (size_t)k * d;
        float dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int j = 0; j < d; j++) dot += x[j] * c[j];
        float v = cnorm[k] - 2 * dot;
        if (v < bd) {
            bd = v;
            best = k;
        }
    }
    if (dist) {
        float xx = 0;
        for (int j = 0; j < d; j++) xx += x[j] * x[j];
        *dist = std::max(0.0f, bd + xx);
    }
    return best;
}

void speech_assign(const SpeechModel& m, const float* logmel, int T, int* units) {
    const int nm = m.s.n_mels;
    std::vector<float> x(nm);
    for (int t = 0; t < T; t++) {
        for (int j = 0; j < nm; j++) x[j] = (logmel[(size_t)t * nm + j] - m.mean[j]) / m.std_[j];
        units[t] = speech_nearest_(x.data(), m.centroid.data(), m.cnorm.data(), m.K, nm, nullptr);
    }
}

void speech_encode_frames(const SpeechModel& m, const float* x, size_t n, std::vector<int>* units) {
    std::vector<float> lm;
    speech_features(m.fe, x, n, &lm, nullptr);
    int T = (int)(lm.size() / m.s.n_mels);
    units->resize(T);
    speech_assign(m, lm.data(), T, units->data());
}

void speech_collapse(const int* f, size_t n, std::vector<int>* units, std::vector<int>* runs) {
    units->clear();
    if (runs) runs->clear();
    for (size_t i = 0; i < n; i++) {
        if (i > 0 && f[i] == f[i - 1]) {
            if (runs) runs->back()++;
            continue;
        }
        units->push_back(f[i]);
        if (runs) runs->push_back(1);
    }
}

bool speech_encode(const SpeechModel& m, const float* x, size_t n, int sample_rate, std::vector<int>* units,
                   std::string* err) {
    if (m.K < 1 || m.cnorm.size() != (size_t)m.K) return speech_fail_(err, "speech model not loaded");
    if (sample_rate < 1000 || sample_rate > 768000)
        return speech_fail_(err, "bad sample rate " + std::to_string(sample_rate));
    std::vector<float> rs;
    if (sample_rate != m.s.sample_rate) {
        speech_resample(x, n, sample_rate, m.s.sample_rate, &rs);
        x = rs.data();
        n = rs.size();
    }
    std::vector<int> fr;
    speech_encode_frames(m, x, n, &fr);
    speech_collapse(fr.data(), fr.size(), units, nullptr);
    return true;
}

bool speech_encode_i16(const SpeechModel& m, const int16_t* x, size_t n, int sample_rate, std::vector<int>* units,
                       std::string* err) {
    std::vector<float> f(n);
    for (size_t i = 0; i < n; i++) f[i] = x[i] * (1.0f / 32768.0f);  // same scale as speech_wav_parse
    return speech_encode(m, f.data(), n, sample_rate, units, err);
}

// ---- training ---------------------------------------------------------------------------------------
static uint64_t speech_rng_(uint64_t* s) {  // splitmix64: deterministic, no global state
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double speech_uniform_(uint64_t* s) { return (speech_rng_(s) >> 11) * (1.0 / 9007199254740992.0); }

bool speech_train(const std::vector<std::vector<float>>& clips, const SpeechTrainOptions& opt, SpeechModel* m,
                  std::string* err) {
    SpeechFrontend fe;
    if (!speech_frontend_init(&fe, opt.settings, err)) return false;
    const int nm = opt.settings.n_mels, nb = fe.n_bins, K = opt.K;
    if (K < 1 || K > 65536) return speech_fail_(err, "bad number of units " + std::to_string(K));
    // 1. log-mel frames of every clip (parallel over clips).
    const int C = (int)clips.size();
    std::vector<size_t> off(C + 1, 0);
    for (int c = 0; c < C; c++) off[c + 1] = off[c] + speech_num_frames(fe, clips[c].size());
    const size_t N = off[C];
    if (N < (size_t)K)
        return speech_fail_(
            err, "only " + std::to_string(N) + " frames for " + std::to_string(K) + " units: need more audio");
    std::vector<float> X(N * nm);
#pragma omp parallel for schedule(dynamic, 4)
    for (int c = 0; c < C; c++) {
        std::vector<float> lm;
        speech_features(fe, clips[c].data(), clips[c].size(), &lm, nullptr);
        std::copy(lm.begin(), lm.end(), X.begin() + off[c] * nm);
    }
    // 2. per-band mean / std, then normalise in place.
    std::vector<double> mu(nm, 0.0), var(nm, 0.0);
    for (size_t i = 0; i < N; i++)
        for (int j = 0; j < nm; j++) mu[j] += X[i * nm + j];
    for (int j = 0; j < nm; j++) mu[j] /= N;
    for (size_t i = 0; i < N; i++)
        for (int j = 0; j < nm; j++) {
            double d = X[i * nm + j] - mu[j];
            var[j] += d * d;
        }
    m->s = opt.settings;
    m->K = K;
    m->mean.resize(nm);
    m->std_.resize(nm);
    for (int j = 0; j < nm; j++) {
        m->mean[j] = (float)mu[j];
        m->std_[j] = (float)std::max(sqrt(var[j] / N), 1e-3);  // a constant band must not blow up
    }
#pragma omp parallel for schedule(static)
    for (long long i = 0; i < (long long)N; i++)
        for (int j = 0; j < nm; j++) X[i * nm + j] = (X[i * nm + j] - m->mean[j]) / m->std_[j];
    // 3. k-means on an even subsample of at most max_frames frames.
    std::vector<size_t> sub;
    size_t S = std::min(N, (size_t)std::max(opt.max_frames, K));
    for (size_t i = 0; i < S; i++) sub.push_back(i * N / S);
    std::vector<float> Y(S * nm);
    for (size_t i = 0; i < S; i++) std::copy(&X[sub[i] * nm], &X[sub[i] * nm] + nm, &Y[i * nm]);
    if (opt.verbose)
        fprintf(stderr, "speech: %d clips, %zu frames (%.1f s of audio); k-means K=%d on %zu frames\n", C, N,
                N * (double)opt.settings.hop / opt.settings.sample_rate, K, S);
    uint64_t rng = opt.seed;
    std::vector<float> cent((size_t)K * nm), cn(K);
    // k-means++: each next centre drawn with probability proportional to squared distance.
    std::vector<float> d2(S);
    {
        size_t first = (size_t)(speech_uniform_(&rng) * S) % S;
        std::copy(&Y[first * nm], &Y[first * nm] + nm, &cent[0]);
        for (int k = 0; k < K; k++) {
            const float* c = &cent[(size_t)k * nm];
            double total = 0;
#pragma omp parallel for schedule(static) reduction(+ : total)
            for (long long i = 0; i < (long long)S; i++) {
                float s = 0;
                for (int j = 0; j < nm; j++) {
                    float d = Y[i * nm + j] - c[j];
                    s += d * d;
                }
                if (k == 0 || s < d2[i]) d2[i] = s;
                total += d2[i];
            }
            if (k + 1 == K) break;
            double r = speech_uniform_(&rng) * total, acc = 0;
            size_t pick = S - 1;
            for (size_t i = 0; i < S; i++) {
                acc += d2[i];
                if (acc >= r && d2[i] > 0) {
                    pick = i;
                    break;
                }
            }
            std::copy(&Y[pick * nm], &Y[pick * nm] + nm, &cent[(size_t)(k + 1) * nm]);
        }
    }
    // Lloyd iterations.
    std::vector<int> as(S, -1);
    std::vector<float> dist(S);
    std::vector<double> sum((size_t)K * nm);
    std::vector<long long> cnt(K);
    for (int it = 0; it < opt.max_iters; it++) {
        for (int k = 0; k < K; k++) {
            float s = 0;
            for (int j = 0; j < nm; j++) s += cent[(size_t)k * nm + j] * cent[(size_t)k * nm + j];
            cn[k] = s;
        }
        long long changed = 0;
        double inertia = 0;
#pragma omp parallel for schedule(static) reduction(+ : changed, inertia)
        for (long long i = 0; i < (long long)S; i++) {
            int a = speech_nearest_(&Y[i * nm], cent.data(), cn.data(), K, nm, &dist[i]);
            if (a != as[i]) {
                changed++;
                as[i] = a;
            }
            inertia += dist[i];
        }
        std::fill(sum.begin(), sum.end(), 0.0);
        std::fill(cnt.begin(), cnt.end(), 0);
        for (size_t i = 0; i < S; i++) {
            cnt[as[i]]++;
            for (int j = 0; j < nm; j++) sum[(size_t)as[i] * nm + j] += Y[i * nm + j];
        }
        int reseeded = 0;
        for (int k = 0; k < K; k++) {
            if (cnt[k] > 0) {
                for (int j = 0; j < nm; j++) cent[(size_t)k * nm + j] = (float)(sum[(size_t)k * nm + j] / cnt[k]);
            } else {  // empty cluster: move it onto the frame that is currently fitted worst
                size_t w = std::max_element(dist.begin(), dist.end()) - dist.begin();
                std::copy(&Y[w * nm], &Y[w * nm] + nm, &cent[(size_t)k * nm]);
                dist[w] = 0;
                reseeded++;
            }
        }
        if (opt.verbose)
            fprintf(stderr, "speech: k-means iter %2d: mean sq dist %.4f, %lld frames changed%s\n", it + 1, inertia / S,
                    changed, reseeded ? (", " + std::to_string(reseeded) + " empty re-seeded").c_str() : "");
        if (it > 0 && reseeded == 0 && changed * 1000 < (long long)S) break;
    }
    m->centroid = cent;
    m->duration.assign(K, 1.0f);
    m->spectrum.assign((size_t)K * nb, 0.0f);
    m->cnorm.assign(K, 0.0f);
    for (int k = 0; k < K; k++) {
        float s = 0;
        for (int j = 0; j < nm; j++) s += cent[(size_t)k * nm + j] * cent[(size_t)k * nm + j];
        m->cnorm[k] = s;
    }
    // 4. assign every frame; mean run lengths per unit.
    std::vector<int> all(N);
#pragma omp parallel for schedule(static)
    for (long long i = 0; i < (long long)N; i++)
        all[i] = speech_nearest_(&X[i * nm], cent.data(), m->cnorm.data(), K, nm, nullptr);
    std::vector<double> run_sum(K, 0.0), run_cnt(K, 0.0);
    for (int c = 0; c < C; c++) {
        std::vector<int> u, r;
        speech_collapse(&all[off[c]], off[c + 1] - off[c], &u, &r);
        for (size_t i = 0; i < u.size(); i++) {
            run_sum[u[i]] += r[i];
            run_cnt[u[i]] += 1;
        }
    }
    for (int k = 0; k < K; k++) m->duration[k] = run_cnt[k] > 0 ? (float)(run_sum[k] / run_cnt[k]) : 2.0f;
    // 5. mean linear magnitude spectrum per unit (a second STFT pass, so magnitudes are never all in memory).
    std::vector<double> spec((size_t)K * nb, 0.0), gspec(nb, 0.0);
    std::vector<long long> fcnt(K, 0);
    for (int c = 0; c < C; c++) {
        std::vector<float> lm, mag;
        speech_features(fe, clips[c].data(), clips[c].size(), &lm, &mag);
        for (size_t t = 0; t + off[c] < off[c + 1]; t++) {
            int u = all[off[c] + t];
            fcnt[u]++;
            for (int k = 0; k < nb; k++) {
                spec[(size_t)u * nb + k] += mag[t * nb + k];
                gspec[k] += mag[t * nb + k];
            }
        }
    }
    int unused = 0;
    for (int k = 0; k < K; k++) {
        if (fcnt[k] == 0) unused++;
        for (int b = 0; b < nb; b++)  // a unit no frame chose gets the global mean spectrum
            m->spectrum[(size_t)k * nb + b] = (float)(fcnt[k] ? spec[(size_t)k * nb + b] / fcnt[k] : gspec[b] / N);
    }
    if (opt.verbose) {
        std::vector<int> u;
        speech_collapse(all.data(), N, &u, nullptr);
        fprintf(stderr, "speech: trained: %d units (%d unused), %.1f units/s after collapsing\n", K, unused,
                u.size() / (N * (double)opt.settings.hop / opt.settings.sample_rate));
    }
    return speech_model_finish(m, err);
}

// ---- decode -----------------------------------------------------------------------------------------
void speech_griffin_lim(const SpeechFrontend& fe, const float* mag, int T, const SpeechDecodeOptions& opt,
                        std::vector<float>* out) {
    const int N = fe.s.n_fft, W = fe.s.win_length, nb = fe.n_bins, hop = fe.s.hop;
    const int ov = std::max(1, std::min(opt.overlap, hop));
    const int hs = hop / ov;           // synthesis hop
    const size_t L = (size_t)T * hop;  // output length
    const int J = (int)(L / hs);       // synthesis frames, frame j centred at j*hs + hs/2
    out->assign(L, 0.0f);
    if (T <= 0) return;
    // Target magnitudes per synthesis frame: linear interpolation between 20 ms frame centres.
    std::vector<float> S((size_t)J * nb);
    for (int j = 0; j < J; j++) {
        double pos = ((double)j * hs + hs / 2.0) / hop - 0.5;  // in frame units
        int a = (int)floor(pos);
        double f = pos - a;
        int a0 = std::max(0, std::min(T - 1, a)), a1 = std::max(0, std::min(T - 1, a + 1));
        for (int k = 0; k < nb; k++)
            S[(size_t)j * nb + k] = (float)((1 - f) * mag[(size_t)a0 * nb + k] + f * mag[(size_t)a1 * nb + k]);
    }
    // Overlap-add normaliser: sum of squared windows at each output sample.
    std::vector<float> norm(L, 0.0f);
    for (int j = 0; j < J; j++) {
        long long st = (long long)j * hs + hs / 2 - W / 2;
        for (int i = 0; i < W; i++) {
            long long p = st + i;
            if (p >= 0 && p < (long long)L) norm[p] += fe.window[i] * fe.window[i];
        }
    }
    for (auto& v : norm) v = v > 1e-6f ? 1.0f / v : 0.0f;
    const size_t JB = (size_t)J * nb;
    std::vector<float> tr(JB), ti(JB), pr(JB, 0.0f), pi(JB, 0.0f);  // t_n and previous c_n
    uint64_t rng = opt.seed ? opt.seed : 1;
    for (size_t i = 0; i < JB; i++) {
        double ph = 2 * M_PI * speech_uniform_(&rng);
        tr[i] = S[i] * (float)cos(ph);
        ti[i] = S[i] * (float)sin(ph);
    }
    std::vector<float> re(N), im(N), y(L);
    auto project_mag = [&]() {  // set |t| = S, keep the phase
        for (size_t i = 0; i < JB; i++) {
            float r = sqrtf(tr[i] * tr[i] + ti[i] * ti[i]);
            if (r > 1e-20f) {
                float g = S[i] / r;
                tr[i] *= g;
                ti[i] *= g;
            } else {
                tr[i] = S[i];
                ti[i] = 0;
            }
        }
    };
    // Two real frames share one complex FFT (frame j in the real part, j+1 in the imaginary part),
    // which halves the cost of both directions.
    auto istft = [&]() {  // t -> y (least-squares overlap-add)
        std::fill(y.begin(), y.end(), 0.0f);
        for (int j = 0; j < J; j += 2) {
            const bool two = j + 1 < J;
            const float* ar = &tr[(size_t)j * nb];
            const float* ai = &ti[(size_t)j * nb];
            const float* br = two ? &tr[(size_t)(j + 1) * nb] : nullptr;
            const float* bi = two ? &ti[(size_t)(j + 1) * nb] : nullptr;
            // Z = A + iB with A, B Hermitian (A[N-k] = conj A[k]); bins 0 and N/2 taken as real.
            for (int k = 0; k < nb; k++) {
                float Ar = ar[k], Ai = (k == 0 || k == N / 2) ? 0.0f : ai[k];
                float Br = two ? br[k] : 0.0f, Bi = (two && k != 0 && k != N / 2) ? bi[k] : 0.0f;
                re[k] = Ar - Bi;
                im[k] = Ai + Br;
                if (k > 0 && k < N / 2) {
                    re[N - k] = Ar + Bi;
                    im[N - k] = Br - Ai;
                }
            }
            speech_fft(fe.fft, re.data(), im.data(), true);
            for (int f = 0; f < (two ? 2 : 1); f++) {
                const float* src = f == 0 ? re.data() : im.data();
                long long st = (long long)(j + f) * hs + hs / 2 - W / 2;
                for (int i = 0; i < W; i++) {
                    long long p = st + i;
                    if (p >= 0 && p < (long long)L) y[p] += src[i] * fe.window[i];
                }
            }
        }
        for (size_t i = 0; i < L; i++) y[i] *= norm[i];
    };
    auto update = [&](int j, int k, float cr, float ci) {  // t_n = c_n + momentum * (c_n - c_{n-1})
        size_t i = (size_t)j * nb + k;
        tr[i] = cr + opt.momentum * (cr - pr[i]);
        ti[i] = ci + opt.momentum * (ci - pi[i]);
        pr[i] = cr;
        pi[i] = ci;
    };
    for (int it = 0; it < opt.gl_iters; it++) {
        project_mag();
        istft();
        // c_n = STFT(y), two frames per FFT: A[k] = (Z[k] + conj Z[N-k]) / 2, B[k] = (Z[k] - conj Z[N-k]) / 2i
        for (int j = 0; j < J; j += 2) {
            const bool two = j + 1 < J;
            for (int f = 0; f < 2; f++) {
                float* dst = f == 0 ? re.data() : im.data();
                long long st = (long long)(j + f) * hs + hs / 2 - W / 2;
                for (int i = 0; i < W; i++) {
                    long long p = st + i;
                    dst[i] = (f == 0 || two) && p >= 0 && p < (long long)L ? y[p] * fe.window[i] : 0.0f;
                }
                for (int i = W; i < N; i++) dst[i] = 0.0f;
            }
            speech_fft(fe.fft, re.data(), im.data(), false);
            for (int k = 0; k < nb; k++) {
                int kk = (N - k) & (N - 1);
                float zr = re[k], zi = im[k], wr = re[kk], wi = im[kk];
                update(j, k, 0.5f * (zr + wr), 0.5f * (zi - wi));
                if (two) update(j + 1, k, 0.5f * (zi + wi), -0.5f * (zr - wr));
            }
        }
    }
    project_mag();
    istft();
    out->swap(y);
}

bool speech_decode_frames(const SpeechModel& m, const int* fu, size_t T, const SpeechDecodeOptions& opt,
                          std::vector<float>* out, std::string* err) {
    if (m.K < 1 || m.cnorm.size() != (size_t)m.K) return speech_fail_(err, "speech model not loaded");
    const int nb = m.fe.n_bins;
    if (T > SPEECH_MAX_DECODE_FRAMES)
        return speech_fail_(err, "too long to decode: " + std::to_string(T) + " frames (at most " +
                                     std::to_string(SPEECH_MAX_DECODE_FRAMES) + ")");
    std::vector<float> mag(T * nb);
    for (size_t t = 0; t < T; t++) {
        if (fu[t] < 0 || fu[t] >= m.K)
            return speech_fail_(err,
                                "unit " + std::to_string(fu[t]) + " out of range [0, " + std::to_string(m.K) + ")");
        std::copy(&m.spectrum[(size_t)fu[t] * nb], &m.spectrum[(size_t)fu[t] * nb] + nb, &mag[t * nb]);
    }
    speech_griffin_lim(m.fe, mag.data(), (int)T, opt, out);
    return true;
}

bool speech_decode(const SpeechModel& m, const int* u, size_t n, const SpeechDecodeOptions& opt,
                   std::vector<float>* out, std::string* err) {
    if (m.K < 1 || m.cnorm.size() != (size_t)m.K) return speech_fail_(err, "speech model not loaded");
    std::vector<int> fr;
    double acc = 0;
    long long emitted = 0;
    for (size_t i = 0; i < n; i++) {
        if (u[i] < 0 || u[i] >= m.K)
            return speech_fail_(err, "unit " + std::to_string(u[i]) + " out of range [0, " + std::to_string(m.K) + ")");
        long long reps;
        if (opt.repeat > 0) {
            reps = opt.repeat;
        } else {  // carry the fractional part so the total duration is right on average
            acc += m.duration[u[i]];
            reps = std::max(1LL, llround(acc) - emitted);
        }
        emitted += reps;
        if (emitted > SPEECH_MAX_DECODE_FRAMES)  // checked before inserting: bounded memory for any input
            return speech_fail_(
                err, "too long to decode: more than " + std::to_string(SPEECH_MAX_DECODE_FRAMES) + " frames");
        fr.insert(fr.end(), (size_t)reps, u[i]);
    }
    return speech_decode_frames(m, fr.data(), fr.size(), opt, out, err);
}

#endif  // SPEECH_IMPLEMENTATION
