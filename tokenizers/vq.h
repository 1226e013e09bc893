// vq.h - the image tokenizer of mot: a patch vector quantiser.
//
// An image is converted to grey, resized to R x R pixels (default 28), cut into P x P
// patches (default 4, so (28/4)^2 = 49 patches, row-major patch order), and every patch is
// replaced by the index of its nearest centroid in a codebook of K codes (default 512)
// learned with k-means (weighted k-means++ initialisation, then Lloyd iterations, OpenMP).
// Decoding pastes the centroids back. Exactly one token per patch; tokens are LOCAL ids
// 0..K-1 (the data builder adds the vocabulary offset image_begin).
//
// Default 4x4 patches / 512 codes, trained on 2M patches drawn from the 120k MNIST +
// Fashion-MNIST training images, 30 Lloyd iterations (~15 s on 2 cores). Mean per-image
// PSNR (0..255 pixels, whole 28x28 image) on the 10k test sets, from dev/bench_vq.cpp:
//   4x4,  512 codes: MNIST 23.82 dB, Fashion 22.35 dB   (default: 49 tokens, vocab 512)
//   4x4, 1024 codes: MNIST 24.91 dB, Fashion 23.19 dB
//   2x2,  256 codes: MNIST 32.52 dB, Fashion 29.15 dB   (196 tokens per image)
// Training is deterministic for a given seed and thread count (partial sums are combined in
// thread order; a different OMP_NUM_THREADS may change the last bits).
//
// Pixels are grey uint8, 0 = black, 255 = white, stored row-major. Nothing is inverted:
// MNIST / Fashion-MNIST are light ink on black. PNGs with alpha are composited over white.
//
// Model file (.vq), every field little-endian, byte by byte:
//   offset  size         field
//   0       4            magic, the four ASCII bytes 'M' 'O' 'T' 'V'
//   4       4            uint32 version = 1
//   8       4            uint32 R, image side in pixels
//   12      4            uint32 P, patch side in pixels (R % P == 0)
//   16      4            uint32 K, number of codes
//   20      4*K*P*P      float32 centroids, code-major: code k, patch row y, column x at
//                        offset 20 + 4*((k*P + y)*P + x); pixel values in 0..1 (1 = white)
//   the file is exactly 20 + 4*K*P*P bytes long. The loader rejects a wrong magic or
//   version, a truncated or over-long file, R % P != 0, zero sizes and non-finite values.
//
// IDX files (MNIST format): magic 0x00000803 (unsigned bytes, 3 dims), then big-endian
// uint32 n, rows, cols, then n*rows*cols bytes. Gzipped IDX (.gz, as Debian ships
// Fashion-MNIST) is recognised by its content and inflated in memory.
//
// Usage: exactly one .cpp does   #define VQ_IMPLEMENTATION   before including vq.h. The
// implementation calls stb_image / stb_image_write functions (declared below, not
// included, so vq.h never compiles stb twice): link one translation unit that has
//   #define STB_IMAGE_IMPLEMENTATION        + #include <stb/stb_image.h>
//   #define STB_IMAGE_WRITE_IMPLEMENTATION  + #include <stb/stb_image_write.h>
// (with STBI_ONLY_PNG: stb decodes PNG only; JPEG goes to libjpeg-turbo, so link -ljpeg)
// (not STB_IMAGE_STATIC). Library functions never exit: they return false and fill *err
// with a one-line message that names the file ("x.png: not a PNG/JPEG image").
#ifndef VQ_H
#define VQ_H

// Bounds on hostile input. Images: at most VQ_MAX_PIXELS pixels (checked from the header,
// before decoding); beyond the decoder's own buffer, resampling needs O(side^2) memory whatever
// the shape. JPEG is decoded by libjpeg-turbo (link with -ljpeg) with at most VQ_MAX_JPEG_SCANS
// progressive scans and VQ_MAX_JPEG_MEMORY bytes of work memory; PNG by stb_image. Files over
// VQ_MAX_FILE bytes are refused before being read.
#define VQ_MAX_PIXELS (1u << 24)
#define VQ_MAX_JPEG_SCANS 100
#define VQ_MAX_JPEG_MEMORY (256L << 20)
#define VQ_MAX_FILE (1u << 30)
#define VQ_MAX_ENCODE_WORK (1ull << 31)  // side^2 x codes of a model: the cost of encoding one image

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

// A trained codebook.
struct VqModel {
    int side = 28;                 // R: images are R x R
    int patch = 4;                 // P: patches are P x P
    int codes = 512;               // K
    std::vector<float> centroids;  // K * P * P, values 0..1
};

// A stack of n grey images, each h x w, row-major, one after another.
struct VqImages {
    int n = 0, h = 0, w = 0;
    std::vector<uint8_t> pixels;  // n * h * w
};

struct VqKmeansOpts {
    int k = 512;
    int iters = 30;  // Lloyd iterations (upper bound)
    uint64_t seed = 1;
    bool plusplus = true;    // k-means++ init; false = k random points (baseline)
    bool keep_init = false;  // start from the k*dim values already in *centroids
    double tol = 0.0;        // stop when the relative SSE improvement falls below tol (0: never)
    bool verbose = false;    // progress on stderr
};

struct VqTrainOpts {
    int side = 28, patch = 4, codes = 512;
    int iters = 30;
    long long samples = 2000000;  // patches drawn at random (with replacement); 0 = all patches
    uint64_t seed = 1;
    bool plusplus = true;
    double tol = 1e-4;
    bool verbose = true;
};

// ---- files and images ----
bool vq_read_file(const char* path, std::vector<uint8_t>* out, std::string* err);
// True if the bytes look like an IDX image file or a gzipped file.
bool vq_is_idx_or_gz(const uint8_t* data, size_t n);
// Parse IDX bytes (inflated first if gzipped); name is used in messages.
bool vq_parse_idx(const uint8_t* data, size_t n, const char* name, VqImages* out, std::string* err);
bool vq_load_idx(const char* path, VqImages* out, std::string* err);
// Decode PNG/JPEG bytes to grey (alpha over white) and resize to side x side.
bool vq_image_from_memory(const uint8_t* data, size_t n, const char* name, int side, std::vector<uint8_t>* out,
                          std::string* err);
bool vq_load_image(const char* path, int side, std::vector<uint8_t>* out, std::string* err);
// Resample a grey float image: area average when shrinking, bilinear when enlarging
// (per axis). Non-square inputs are stretched; vq_image_from_memory pads to square first.
void vq_resize(const float* src, int w, int h, float* dst, int dw, int dh);
// Resize one grey uint8 image (w x h) to side x side.
void vq_resize_u8(const uint8_t* src, int w, int h, uint8_t* dst, int side);
bool vq_write_png(const char* path, const uint8_t* grey, int w, int h, std::string* err);

// ---- k-means ----
// x: n points of dim floats; w: n weights (nullptr = all 1). Writes k*dim centroids.
bool vq_kmeans(const float* x, const float* w, size_t n, int dim, const VqKmeansOpts& o, std::vector<float>* centroids,
               double* sse, std::string* err);
// Nearest centroid (squared L2) of each point; dist2 may be nullptr.
void vq_assign(const float* c, int k, int dim, const float* x, size_t n, int32_t* idx, float* dist2);

// ---- model ----
bool vq_train(const uint8_t* images, size_t n_images, const VqTrainOpts& o, VqModel* out, std::string* err);
bool vq_model_check(const VqModel& m, std::string* err);
bool vq_model_save(const VqModel& m, const char* path, std::string* err);
bool vq_model_parse(const uint8_t* data, size_t n, const char* name, VqModel* m, std::string* err);
bool vq_model_load(const char* path, VqModel* m, std::string* err);
inline int vq_tokens(const VqModel& m) { return (m.side / m.patch) * (m.side / m.patch); }
// Patches of one side x side image as floats 0..1: (side/p)^2 patches of p*p values.
void vq_patches(const uint8_t* img, int side, int p, float* out);
// Encode one R x R image to vq_tokens(m) codes.
void vq_encode(const VqModel& m, const uint8_t* img, int32_t* codes);
// Encode n R x R images (OpenMP); codes gets n * vq_tokens(m).
void vq_encode_batch(const VqModel& m, const uint8_t* imgs, size_t n, int32_t* codes);
// Decode vq_tokens(m) codes to an R x R image; false if a code is out of range.
bool vq_decode(const VqModel& m, const int32_t* codes, size_t n_codes, uint8_t* img, std::string* err);
// PSNR in dB of two uint8 buffers (peak 255); identical buffers give 100 (a cap, not inf).
double vq_psnr(const uint8_t* a, const uint8_t* b, size_t n);
// Mean per-image PSNR of encode -> decode over the first n images of imgs (R x R each).
double vq_eval_psnr(const VqModel& m, const uint8_t* imgs, size_t n);

#endif  // VQ_H

// ===========================================================================================
#ifdef VQ_IMPLEMENTATION
#ifndef VQ_IMPLEMENTATION_DONE
#define VQ_IMPLEMENTATION_DONE

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <csetjmp>
#include <jpeglib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

// The stb functions we use, declared exactly as stb declares them (extern "C").
extern "C" {
unsigned char* stbi_load_from_memory(unsigned char const* buffer, int len, int* x, int* y, int* channels_in_file,
                                     int desired_channels);
int stbi_info_from_memory(unsigned char const* buffer, int len, int* x, int* y, int* comp);
const char* stbi_failure_reason(void);
void stbi_image_free(void* retval_from_stbi_load);
int stbi_zlib_decode_noheader_buffer(char* obuffer, int olen, const char* ibuffer, int ilen);
int stbi_write_png(char const* filename, int w, int h, int comp, const void* data, int stride_in_bytes);
}

namespace vq_detail {

inline bool fail(std::string* err, const std::string& msg) {
    if (err) *err = msg;
    return false;
}

// splitmix64: small, seedable, no global state.
inline double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull) {}
    uint64_t next() {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    double uniform() { return (next() >> 11) * (1.0 / 9007199254740992.0); }  // [0,1)
    uint64_t below(uint64_t n) { return n ? next() % n : 0; }
};

inline uint32_t be32(const uint8_t* p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
inline uint32_t le32(const uint8_t* p) {
    return (uint32_t)p[3] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[1] << 8 | p[0];
}
inline void put_le32(std::vector<uint8_t>& b, uint32_t v) {
    for (int i = 0; i < 4; i++) b.push_back((uint8_t)(v >> (8 * i)));
}

inline bool is_gzip(const uint8_t* d, size_t n) { return n >= 2 && d[0] == 0x1f && d[1] == 0x8b; }
inline bool is_png(const uint8_t* d, size_t n) { return n >= 8 && memcmp(d, "\x89PNG\r\n\x1a\n", 8) == 0; }
inline bool is_jpeg(const uint8_t* d, size_t n) { return n >= 3 && d[0] == 0xFF && d[1] == 0xD8 && d[2] == 0xFF; }

// Inflate a gzip member (RFC 1952) with stb's raw-deflate decoder.
inline bool gunzip(const uint8_t* d, size_t n, const char* name, std::vector<uint8_t>* out, std::string* err) {
    std::string nm = name;
    if (n < 18 || d[2] != 8) return fail(err, nm + ": truncated or unsupported gzip data");
    uint8_t flg = d[3];
    size_t p = 10;
    if (flg & 4) {  // FEXTRA
        if (p + 2 > n) return fail(err, nm + ": truncated gzip header");
        p += 2 + (d[p] | d[p + 1] << 8);
    }
    for (int bit : {8, 16}) {  // FNAME, FCOMMENT: zero-terminated
        if (!(flg & bit)) continue;
        while (p < n && d[p]) p++;
        p++;
    }
    if (flg & 2) p += 2;  // FHCRC
    if (p + 8 > n) return fail(err, nm + ": truncated gzip header");
    uint32_t isize = le32(d + n - 4);  // uncompressed size mod 2^32 (our files are < 4 GB)
    if (isize > (1u << 30)) return fail(err, nm + ": gzip data too large (" + std::to_string(isize) + " bytes)");
    // deflate expands at most 1032:1, so a larger ISIZE is a lie: refused before allocating it
    if (isize > 1032.0 * n) return fail(err, nm + ": corrupt gzip size field");
    if (n - p > (size_t)INT32_MAX) return fail(err, nm + ": gzip file too large");
    out->assign(isize, 0);
    // The 8-byte trailer stays in the input: stb's bit reader may look a few bytes past the
    // last deflate block, and stops at that block's end anyway.
    int got = stbi_zlib_decode_noheader_buffer((char*)out->data(), (int)isize, (const char*)d + p, (int)(n - p));
    if (got < 0 || (uint32_t)got != isize) return fail(err, nm + ": corrupt or truncated gzip data");
    return true;
}

// Separable resampling taps for one axis: output o takes sum_j w_j * in[idx_j].
struct Taps {
    std::vector<int> start, count, idx;
    std::vector<float> w;
};
inline Taps make_taps(int n_in, int n_out) {
    Taps t;
    double scale = (double)n_in / n_out;
    for (int o = 0; o < n_out; o++) {
        t.start.push_back((int)t.idx.size());
        if (scale >= 1.0) {  // shrink: exact area average over [o*scale, (o+1)*scale)
            double a = o * scale, b = (o + 1) * scale;
            for (int i = (int)std::floor(a); i < (int)std::ceil(b) && i < n_in; i++) {
                double ov = std::min(b, i + 1.0) - std::max(a, (double)i);
                if (ov > 1e-9) {
                    t.idx.push_back(i);
                    t.w.push_back((float)(ov / scale));
                }
            }
        } else {  // enlarge: bilinear between pixel centres, clamped at the edges
            double s = (o + 0.5) * scale - 0.5;
            s = std::max(0.0, std::min(s, n_in - 1.0));
            int i0 = (int)std::floor(s), i1 = std::min(i0 + 1, n_in - 1);
            float f = (float)(s - i0);
            t.idx.push_back(i0);
            t.w.push_back(1 - f);
            t.idx.push_back(i1);
            t.w.push_back(f);
        }
        t.count.push_back((int)t.idx.size() - t.start.back());
    }
    return t;
}

inline uint64_t hash_bytes(const uint8_t* p, int n) {
    uint64_t h = 0xcbf29ce484222325ull;
    int i = 0;
    for (; i + 8 <= n; i += 8) {  // 8 bytes at a time, then a strong mix
        uint64_t v;
        memcpy(&v, p + i, 8);
        h = (h ^ v) * 0x9E3779B97F4A7C15ull;
        h ^= h >> 29;
    }
    for (; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    h ^= h >> 32;
    h *= 0xD6E8FEB86659FD93ull;
    return h ^ (h >> 32);
}

}  // namespace vq_detail

// ------------------------------------------------------------------------------------------
// files and images

bool vq_read_file(const char* path, std::vector<uint8_t>* out, std::string* err) {
    using namespace vq_detail;
    FILE* f = fopen(path, "rb");
    if (!f) return fail(err, std::string(path) + ": cannot open (" + strerror(errno) + ")");
    if (fseek(f, 0, SEEK_END) == 0 && ftell(f) > (long)VQ_MAX_FILE) {  // refused before reading
        fclose(f);
        return fail(err, std::string(path) + ": file too large (over " + std::to_string(VQ_MAX_FILE) + " bytes)");
    }
    rewind(f);
    out->clear();
    uint8_t buf[1 << 16];
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, f)) > 0) out->insert(out->end(), buf, buf + got);
    bool bad = ferror(f);
    int e = errno;
    fclose(f);
    if (bad) return fail(err, std::string(path) + ": read error (" + strerror(e) + ")");
    return true;
}

bool vq_is_idx_or_gz(const uint8_t* d, size_t n) {
    return vq_detail::is_gzip(d, n) || (n >= 4 && d[0] == 0 && d[1] == 0 && d[2] == 8);
}

bool vq_parse_idx(const uint8_t* d, size_t n, const char* name, VqImages* out, std::string* err) {
    using namespace vq_detail;
    std::string nm = name;
    if (n == 0) return fail(err, nm + ": empty file");
    if (is_gzip(d, n)) {
        std::vector<uint8_t> raw;
        if (!gunzip(d, n, name, &raw, err)) return false;
        return vq_parse_idx(raw.data(), raw.size(), name, out, err);
    }
    if (n < 4) return fail(err, nm + ": truncated IDX header (" + std::to_string(n) + " bytes)");
    uint32_t magic = be32(d);
    if (magic != 0x00000803) {
        char b[160];
        snprintf(b, sizeof b, ": not an IDX image file (magic 0x%08x, expected 0x00000803)", magic);
        return fail(err, nm + b);
    }
    if (n < 16) return fail(err, nm + ": truncated IDX header (" + std::to_string(n) + " bytes, need 16)");
    uint64_t cnt = be32(d + 4), rows = be32(d + 8), cols = be32(d + 12);
    if (cnt > (uint64_t)INT32_MAX) return fail(err, nm + ": bad IDX image count " + std::to_string(cnt));
    if (rows == 0 || cols == 0 || rows > 65536 || cols > 65536)
        return fail(err, nm + ": bad IDX image size " + std::to_string(rows) + "x" + std::to_string(cols));
    uint64_t need = cnt * rows * cols;  // < 2^32 * 2^32, no overflow
    if (n - 16 < need)
        return fail(err, nm + ": truncated IDX (header says " + std::to_string(cnt) + " images of " +
                             std::to_string(rows) + "x" + std::to_string(cols) + " = " + std::to_string(need) +
                             " bytes, file has " + std::to_string(n - 16) + ")");
    if (n - 16 > need) return fail(err, nm + ": IDX has " + std::to_string(n - 16 - need) + " bytes after the data");
    out->n = (int)cnt;
    out->h = (int)rows;
    out->w = (int)cols;
    out->pixels.assign(d + 16, d + 16 + need);
    return true;
}

bool vq_load_idx(const char* path, VqImages* out, std::string* err) {
    std::vector<uint8_t> data;
    if (!vq_read_file(path, &data, err)) return false;
    return vq_parse_idx(data.data(), data.size(), path, out, err);
}

void vq_resize(const float* src, int w, int h, float* dst, int dw, int dh) {
    using namespace vq_detail;
    Taps tx = make_taps(w, dw), ty = make_taps(h, dh);
    std::vector<float> tmp((size_t)h * dw);  // horizontal pass first
    for (int y = 0; y < h; y++)
        for (int x = 0; x < dw; x++) {
            float s = 0;
            for (int j = tx.start[x]; j < tx.start[x] + tx.count[x]; j++) s += tx.w[j] * src[(size_t)y * w + tx.idx[j]];
            tmp[(size_t)y * dw + x] = s;
        }
    for (int y = 0; y < dh; y++)
        for (int x = 0; x < dw; x++) {
            float s = 0;
            for (int j = ty.start[y]; j < ty.start[y] + ty.count[y]; j++)
                s += ty.w[j] * tmp[(size_t)ty.idx[j] * dw + x];
            dst[(size_t)y * dw + x] = s;
        }
}

void vq_resize_u8(const uint8_t* src, int w, int h, uint8_t* dst, int side) {
    if (w == side && h == side) {
        memcpy(dst, src, (size_t)side * side);
        return;
    }
    std::vector<float> in(src, src + (size_t)w * h), o((size_t)side * side);
    vq_resize(in.data(), w, h, o.data(), side, side);
    for (size_t i = 0; i < o.size(); i++) dst[i] = (uint8_t)std::lround(std::min(255.f, std::max(0.f, o[i])));
}

namespace vq_detail {

// Printable ASCII only: decoder messages may quote bytes from the file (stb's PNG chunk types).
inline std::string printable(const char* s) {
    std::string o = s ? s : "?";
    for (char& c : o)
        if ((unsigned char)c < 32 || (unsigned char)c > 126) c = '?';
    return o;
}

// Area-averages a w x h grey image, centred on an s x s square (s = max(w, h)) padded with the
// mean border colour, down to side x side (s >= side). Rows arrive one at a time and memory is
// O(side^2) whatever the input's shape: a 16777216 x 1 strip costs what a square does. The
// border mean is only known at the end, so the padding is added from each output pixel's
// uncovered area then.
struct Shrinker {
    int w, h, side, ox, oy;
    double scale, border = 0;
    long long nb = 0;
    std::vector<double> acc, cx, cy;  // sums per output pixel; covered fraction per output column/row
    Shrinker(int w_, int h_, int side_) : w(w_), h(h_), side(side_) {
        const int s = std::max(w, h);
        scale = (double)s / side;
        ox = (s - w) / 2;
        oy = (s - h) / 2;
        acc.assign((size_t)side * side, 0.0);
        cx.assign(side, 0.0);
        cy.assign(side, 0.0);
        for (int x = 0; x < w; x++) span(x + ox, [&](int o, double wt) { cx[o] += wt; });
        for (int y = 0; y < h; y++) span(y + oy, [&](int o, double wt) { cy[o] += wt; });
    }
    // Output cells overlapped by padded pixel i ([i, i+1)), with weight overlap / scale: at most two.
    template <class F>
    void span(int i, F f) const {
        int o = std::min(side - 1, (int)(i / scale));
        for (; o < side && o * scale < i + 1.0; o++) {
            const double ov = std::min((o + 1) * scale, i + 1.0) - std::max(o * scale, (double)i);
            if (ov > 1e-9) f(o, ov / scale);
        }
    }
    void row(int y, const float* g) {
        double wy[2];
        int oyc[2], ny = 0;
        span(y + oy, [&](int o, double wt) {
            if (ny < 2) {
                oyc[ny] = o;
                wy[ny++] = wt;
            }
        });
        for (int x = 0; x < w; x++) {
            if (x == 0 || y == 0 || x == w - 1 || y == h - 1) {
                border += g[x];
                nb++;
            }
            span(x + ox, [&](int o, double wt) {
                for (int k = 0; k < ny; k++) acc[(size_t)oyc[k] * side + o] += wy[k] * wt * g[x];
            });
        }
    }
    void finish(std::vector<uint8_t>* out) const {
        const double fill = border / std::max(1LL, nb);
        out->resize((size_t)side * side);
        for (int y = 0; y < side; y++)
            for (int x = 0; x < side; x++) {
                const double v = acc[(size_t)y * side + x] + fill * (1.0 - cx[x] * cy[y]);
                (*out)[(size_t)y * side + x] = (uint8_t)std::lround(std::min(255.0, std::max(0.0, v)));
            }
    }
};

// Grey = BT.601 luma; alpha composited over white so transparent clip art stays visible.
inline float luma(const unsigned char* p, int ch) {
    const float g = 0.299f * p[0] + 0.587f * p[1] + 0.114f * p[2];
    if (ch < 4) return g;
    const float a = p[3] / 255.f;
    return a * g + (1 - a) * 255.f;
}

// Takes rows of RGB(A) pixels: shrinking streams them (Shrinker); enlarging (the image is
// smaller than side x side, so tiny) keeps the padded square and resizes it bilinearly.
struct GreySink {
    int w, h, side;
    bool enlarge;
    Shrinker* shr = nullptr;
    std::vector<float> grey, rowbuf;
    GreySink(int w_, int h_, int side_) : w(w_), h(h_), side(side_), enlarge(std::max(w_, h_) < side_) {
        if (enlarge) grey.resize((size_t)w * h);
        else shr = new Shrinker(w, h, side);
        rowbuf.resize(w);
    }
    ~GreySink() { delete shr; }
    GreySink(const GreySink&) = delete;
    GreySink& operator=(const GreySink&) = delete;
    void row(int y, const unsigned char* px, int ch) {
        float* g = enlarge ? &grey[(size_t)y * w] : rowbuf.data();
        for (int x = 0; x < w; x++) g[x] = luma(px + (size_t)ch * x, ch);
        if (!enlarge) shr->row(y, g);
    }
    void finish(std::vector<uint8_t>* out) {
        if (!enlarge) {
            shr->finish(out);
            return;
        }
        const int s = std::max(w, h);
        double border = 0;
        long nb = 0;
        for (int y = 0; y < h; y++)
            for (int x = 0; x < w; x++)
                if (x == 0 || y == 0 || x == w - 1 || y == h - 1) {
                    border += grey[(size_t)y * w + x];
                    nb++;
                }
        // Non-square: pad the short side with the mean border colour rather than distort shapes.
        std::vector<float> sq((size_t)s * s, (float)(border / std::max(1L, nb)));
        const int ox = (s - w) / 2, oy = (s - h) / 2;
        for (int y = 0; y < h; y++) memcpy(&sq[(size_t)(y + oy) * s + ox], &grey[(size_t)y * w], w * sizeof(float));
        std::vector<float> r((size_t)side * side);
        vq_resize(sq.data(), s, s, r.data(), side, side);
        out->resize(r.size());
        for (size_t i = 0; i < r.size(); i++) (*out)[i] = (uint8_t)std::lround(std::min(255.f, std::max(0.f, r[i])));
    }
};

// libjpeg reports fatal errors through error_exit, which must not return: jump back.
struct JpegErr {
    jpeg_error_mgr mgr;
    jmp_buf jump;
};
inline void jpeg_error_exit_(j_common_ptr c) { longjmp(((JpegErr*)c->err)->jump, 1); }
inline void jpeg_silent_(j_common_ptr) {}  // warnings are counted, not printed
inline void jpeg_progress_(j_common_ptr c) {
    // A progressive JPEG may carry thousands of tiny scans, each a pass over the whole image.
    if (c->is_decompressor && ((j_decompress_ptr)c)->input_scan_number > VQ_MAX_JPEG_SCANS)
        longjmp(((JpegErr*)c->err)->jump, 2);
}

// The libjpeg part of decode_jpeg: no C++ object with a destructor lives in this frame, so a
// longjmp out of it skips nothing. Returns 0, or 1 (libjpeg error) / 2 (too many scans).
// (No C++ object with a destructor lives in this function: longjmp would skip it, and GCC warns
// that its locals may be clobbered. Its results go out through the pointers; 3: too large.)
inline int jpeg_run_(jpeg_decompress_struct* cinfo, JpegErr* je, const uint8_t* data, size_t n, int side,
                     GreySink** sink, unsigned char** rowpx) {
    switch (setjmp(je->jump)) {
        case 0: break;
        case 2: return 2;
        default: return 1;
    }
    jpeg_mem_src(cinfo, data, (unsigned long)n);
    jpeg_read_header(cinfo, TRUE);
    if ((uint64_t)cinfo->image_width * cinfo->image_height > VQ_MAX_PIXELS) return 3;
    cinfo->out_color_space = JCS_RGB;
    // Large images are decoded at 1/2, 1/4 or 1/8 by libjpeg's scaled IDCT, never below side.
    cinfo->scale_num = 1;
    cinfo->scale_denom = 1;
    while (cinfo->scale_denom < 8 &&
           std::max(cinfo->image_width, cinfo->image_height) / (2 * cinfo->scale_denom) >= (unsigned)side)
        cinfo->scale_denom *= 2;
    jpeg_start_decompress(cinfo);
    const int w = (int)cinfo->output_width, h = (int)cinfo->output_height;
    *sink = new GreySink(w, h, side);
    *rowpx = (unsigned char*)malloc((size_t)w * 3);
    if (!*rowpx) return 1;
    while (cinfo->output_scanline < cinfo->output_height) {
        JSAMPROW rp = *rowpx;
        const int y = (int)cinfo->output_scanline;
        if (jpeg_read_scanlines(cinfo, &rp, 1) != 1) return 1;
        (*sink)->row(y, *rowpx, 3);
    }
    jpeg_finish_decompress(cinfo);
    return 0;
}

// JPEG through libjpeg-turbo, which is built (and fuzzed upstream) for hostile input; stb's
// JPEG decoder reads out of bounds on crafted Huffman tables and is compiled out (STBI_ONLY_PNG).
inline bool decode_jpeg(const uint8_t* data, size_t n, const std::string& nm, int side, std::vector<uint8_t>* out,
                        std::string* err) {
    jpeg_decompress_struct cinfo;
    JpegErr je;
    jpeg_progress_mgr prog;
    memset(&prog, 0, sizeof prog);
    cinfo.err = jpeg_std_error(&je.mgr);
    je.mgr.error_exit = jpeg_error_exit_;
    je.mgr.output_message = jpeg_silent_;
    prog.progress_monitor = jpeg_progress_;
    jpeg_create_decompress(&cinfo);
    cinfo.progress = &prog;
    cinfo.mem->max_memory_to_use = VQ_MAX_JPEG_MEMORY;
    GreySink* sink = nullptr;
    unsigned char* rowpx = nullptr;
    const int rc = jpeg_run_(&cinfo, &je, data, n, side, &sink, &rowpx);
    const std::string dims = std::to_string(cinfo.image_width) + "x" + std::to_string(cinfo.image_height);
    char msg[JMSG_LENGTH_MAX] = "";
    if (rc == 1 || (rc == 0 && je.mgr.num_warnings > 0))  // a warning: e.g. truncated data filled with grey
        je.mgr.format_message((j_common_ptr)&cinfo, msg);
    else if (rc == 2) snprintf(msg, sizeof msg, "more than %d progressive scans", VQ_MAX_JPEG_SCANS);
    jpeg_destroy_decompress(&cinfo);
    free(rowpx);
    if (rc == 0 && !msg[0]) sink->finish(out);
    delete sink;
    if (rc == 3)
        return fail(err,
                    nm + ": image too large (" + dims + ", more than " + std::to_string(VQ_MAX_PIXELS) + " pixels)");
    if (msg[0]) return fail(err, nm + ": corrupt JPEG image (" + printable(msg) + ")");
    return true;
}

// Checks a PNG's chunk structure before stb sees it, and fixes what Debian's stb (2022-09-08)
// mishandles (both found by test/fuzz/fuzz_image):
//  - a chunk whose length runs past the end of the file: stb reallocs its IDAT buffer to that
//    length (up to 2 GB from a 1 KB file) before noticing the data is missing; refused here;
//  - an empty first IDAT: stb memcpy()s into a null buffer (undefined behaviour); an empty IDAT
//    carries no data, so such chunks are dropped from a copy.
// Returns false (a corrupt file) or the bytes to decode in *out / *len.
inline bool png_prepare(const uint8_t* d, size_t n, std::vector<uint8_t>* copy, const uint8_t** out, size_t* len) {
    *out = d;
    *len = n;
    bool empty_idat = false;
    size_t p = 8;
    for (; p + 12 <= n; p += 12 + (size_t)be32(d + p)) {
        const size_t clen = be32(d + p);
        if (clen > n - p - 12) return false;
        empty_idat |= clen == 0 && memcmp(d + p + 4, "IDAT", 4) == 0;
        if (memcmp(d + p + 4, "IEND", 4) == 0) break;
    }
    if (!empty_idat) return true;
    copy->assign(d, d + 8);
    for (p = 8; p + 12 <= n; p += 12 + (size_t)be32(d + p)) {
        const size_t clen = be32(d + p);
        if (!(clen == 0 && memcmp(d + p + 4, "IDAT", 4) == 0)) copy->insert(copy->end(), d + p, d + p + 12 + clen);
        if (memcmp(d + p + 4, "IEND", 4) == 0) break;
    }
    *out = copy->data();
    *len = copy->size();
    return true;
}

}  // namespace vq_detail

bool vq_image_from_memory(const uint8_t* data, size_t n, const char* name, int side, std::vector<uint8_t>* out,
                          std::string* err) {
    using namespace vq_detail;
    std::string nm = name;
    if (n == 0) return fail(err, nm + ": empty file");
    if (!is_png(data, n) && !is_jpeg(data, n)) return fail(err, nm + ": not a PNG/JPEG image");
    if (n > (size_t)INT32_MAX) return fail(err, nm + ": file too large");
    if (side <= 0 || side > 4096) return fail(err, nm + ": bad target side " + std::to_string(side));
    if (is_jpeg(data, n)) return decode_jpeg(data, n, nm, side, out, err);
    std::vector<uint8_t> fixed;
    if (!png_prepare(data, n, &fixed, &data, &n))
        return fail(err, nm + ": corrupt PNG image (a chunk runs past the end of the file)");
    int w = 0, h = 0, ch = 0;
    // The size from the header first: the decoder allocates w x h x 4 bytes.
    if (stbi_info_from_memory(data, (int)n, &w, &h, &ch) && (uint64_t)w * h > VQ_MAX_PIXELS)
        return fail(err, nm + ": image too large (" + std::to_string(w) + "x" + std::to_string(h) + ", more than " +
                             std::to_string(VQ_MAX_PIXELS) + " pixels)");
    unsigned char* px = stbi_load_from_memory(data, (int)n, &w, &h, &ch, 4);
    if (!px) return fail(err, nm + ": corrupt PNG image (" + printable(stbi_failure_reason()) + ")");
    GreySink sink(w, h, side);
    for (int y = 0; y < h; y++) sink.row(y, px + (size_t)4 * w * y, 4);
    stbi_image_free(px);
    sink.finish(out);
    return true;
}

bool vq_load_image(const char* path, int side, std::vector<uint8_t>* out, std::string* err) {
    std::vector<uint8_t> data;
    if (!vq_read_file(path, &data, err)) return false;
    return vq_image_from_memory(data.data(), data.size(), path, side, out, err);
}

bool vq_write_png(const char* path, const uint8_t* grey, int w, int h, std::string* err) {
    if (!stbi_write_png(path, w, h, 1, grey, w)) return vq_detail::fail(err, std::string(path) + ": cannot write PNG");
    return true;
}

// ------------------------------------------------------------------------------------------
// k-means

void vq_assign(const float* c, int k, int dim, const float* x, size_t n, int32_t* idx, float* dist2) {
    // argmin_j |x - c_j|^2 = argmin_j (|c_j|^2 - 2 x.c_j). Centroids are transposed to
    // [dim][k16] so the inner loop runs over 16 codes at once (one AVX-512 register).
    const int kp = (k + 15) / 16 * 16;
    std::vector<float> ct((size_t)dim * kp, 0.f), cn(kp, FLT_MAX);
    for (int j = 0; j < k; j++) {
        double s = 0;
        for (int d = 0; d < dim; d++) {
            ct[(size_t)d * kp + j] = c[(size_t)j * dim + d];
            s += (double)c[(size_t)j * dim + d] * c[(size_t)j * dim + d];
        }
        cn[j] = (float)s;
    }
    const float* CT = ct.data();
    const float* CN = cn.data();
    const long long N = (long long)n;
#pragma omp parallel
    {
        std::vector<float> sbuf((size_t)kp);
        float* s = sbuf.data();
#pragma omp for schedule(static, 64)
        for (long long i0 = 0; i0 < N; i0 += 4) {
            int nb = (int)std::min<long long>(4, N - i0);
            int bestj[4] = {0, 0, 0, 0};
            if (dim <= 64) {
                // 4 points share each centroid load, and the running minimum stays in 16
                // lanes per point: no distance buffer, no scalar argmin scan.
                float xm[4][64];  // -2 x
                for (int b = 0; b < 4; b++)
                    for (int d = 0; d < dim; d++) xm[b][d] = b < nb ? -2.f * x[(size_t)(i0 + b) * dim + d] : 0.f;
                float bv[4][16];
                int bi[4][16];
                for (int b = 0; b < 4; b++)
                    for (int t = 0; t < 16; t++) {
                        bv[b][t] = FLT_MAX;
                        bi[b][t] = 0;
                    }
                for (int k0 = 0; k0 < kp; k0 += 16) {
                    float a0[16], a1[16], a2[16], a3[16];
                    for (int t = 0; t < 16; t++) a0[t] = a1[t] = a2[t] = a3[t] = CN[k0 + t];
                    for (int d = 0; d < dim; d++) {
                        const float* r = CT + (size_t)d * kp + k0;
                        const float v0 = xm[0][d], v1 = xm[1][d], v2 = xm[2][d], v3 = xm[3][d];
#pragma omp simd
                        for (int t = 0; t < 16; t++) {
                            a0[t] += v0 * r[t];
                            a1[t] += v1 * r[t];
                            a2[t] += v2 * r[t];
                            a3[t] += v3 * r[t];
                        }
                    }
#pragma omp simd
                    for (int t = 0; t < 16; t++) {
                        if (a0[t] < bv[0][t]) {
                            bv[0][t] = a0[t];
                            bi[0][t] = k0 + t;
                        }
                        if (a1[t] < bv[1][t]) {
                            bv[1][t] = a1[t];
                            bi[1][t] = k0 + t;
                        }
                        if (a2[t] < bv[2][t]) {
                            bv[2][t] = a2[t];
                            bi[2][t] = k0 + t;
                        }
                        if (a3[t] < bv[3][t]) {
                            bv[3][t] = a3[t];
                            bi[3][t] = k0 + t;
                        }
                    }
                }
                for (int b = 0; b < nb; b++) {  // lane reduction; ties go to the lower index
                    int t0 = 0;
                    for (int t = 1; t < 16; t++)
                        if (bv[b][t] < bv[b][t0] || (bv[b][t] == bv[b][t0] && bi[b][t] < bi[b][t0])) t0 = t;
                    bestj[b] = bi[b][t0];
                }
            } else {
                for (int b = 0; b < nb; b++) {
                    for (int j = 0; j < kp; j++) s[j] = CN[j];
                    for (int d = 0; d < dim; d++) {
                        const float v = -2.f * x[(size_t)(i0 + b) * dim + d];
                        const float* r = CT + (size_t)d * kp;
#pragma omp simd
                        for (int j = 0; j < kp; j++) s[j] += v * r[j];
                    }
                    int best = 0;
                    for (int j = 1; j < k; j++)
                        if (s[j] < s[best]) best = j;
                    bestj[b] = best;
                }
            }
            for (int b = 0; b < nb; b++) {
                int best = bestj[b];
                idx[i0 + b] = best;
                if (dist2) {
                    // exact distance to the winner (the expanded form loses precision near 0)
                    const float* xi = x + (size_t)(i0 + b) * dim;
                    const float* cj = c + (size_t)best * dim;
                    float e = 0;
                    for (int d = 0; d < dim; d++) e += (xi[d] - cj[d]) * (xi[d] - cj[d]);
                    dist2[i0 + b] = e;
                }
            }
        }
    }
}

bool vq_kmeans(const float* x, const float* w, size_t n, int dim, const VqKmeansOpts& o, std::vector<float>* centroids,
               double* sse_out, std::string* err) {
    using namespace vq_detail;
    if (n == 0) return fail(err, "k-means: no points");
    if (dim <= 0 || o.k <= 0) return fail(err, "k-means: bad dim or k");
    if (n > (size_t)INT32_MAX) return fail(err, "k-means: too many points");
    const int k = o.k;
    const long long N = (long long)n;
    const double t_start = now_s();
    auto W = [&](size_t i) { return w ? (double)w[i] : 1.0; };
    Rng rng(o.seed);
    std::vector<float>& C = *centroids;
    if (o.keep_init && C.size() != (size_t)k * dim) return fail(err, "k-means: initial centroids have the wrong size");
    if (!o.keep_init) C.assign((size_t)k * dim, 0.f);
    double wtot = 0;
    for (size_t i = 0; i < n; i++) wtot += W(i);
    if (!(wtot > 0)) return fail(err, "k-means: weights sum to zero");

    // Draw an index with probability proportional to v[i] (v = weights or weight * D^2).
    auto draw = [&](const std::vector<double>& v, double total) -> size_t {
        double r = rng.uniform() * total, acc = 0;
        for (size_t i = 0; i < n; i++) {
            acc += v[i];
            if (acc > r && v[i] > 0) return i;
        }
        for (size_t i = n; i-- > 0;)
            if (v[i] > 0) return i;  // rounding fallback
        return 0;
    };

    if (o.keep_init) {
    } else if (o.plusplus) {
        // k-means++ (weighted): each next centroid is drawn with probability w * D^2.
        std::vector<float> mind(n, FLT_MAX);
        std::vector<double> p(n);
        for (size_t i = 0; i < n; i++) p[i] = W(i);
        size_t first = draw(p, wtot);
        memcpy(&C[0], x + first * dim, dim * sizeof(float));
        for (int j = 1; j < k; j++) {
            const float* cj = &C[(size_t)(j - 1) * dim];
            double total = 0;
#pragma omp parallel for reduction(+ : total) schedule(static)
            for (long long i = 0; i < N; i++) {
                const float* xi = x + (size_t)i * dim;
                float e = 0;
                for (int d = 0; d < dim; d++) e += (xi[d] - cj[d]) * (xi[d] - cj[d]);
                if (e < mind[i]) mind[i] = e;
                p[i] = W(i) * mind[i];
                total += p[i];
            }
            // Fewer distinct points than k: every point is already a centroid; repeat one.
            size_t pick = total > 0 ? draw(p, total) : (size_t)rng.below(n);
            memcpy(&C[(size_t)j * dim], x + pick * dim, dim * sizeof(float));
            if (o.verbose && (j % 128 == 0 || j == k - 1))
                fprintf(stderr, "\r  k-means++ init %d/%d  %.1f s", j + 1, k, now_s() - t_start);
        }
        if (o.verbose) fprintf(stderr, "\n");
    } else {
        // Plain random init (the baseline's choice): k points drawn by weight, i.e. uniformly
        // from the patches before duplicates were merged.
        std::vector<double> p(n);
        for (size_t i = 0; i < n; i++) p[i] = W(i);
        for (int j = 0; j < k; j++) memcpy(&C[(size_t)j * dim], x + draw(p, wtot) * dim, dim * sizeof(float));
    }

    std::vector<int32_t> idx(n);
    std::vector<float> d2(n);
    int nt = 1;
#ifdef _OPENMP
    nt = omp_get_max_threads();
#endif
    std::vector<double> sums((size_t)nt * k * dim), wsum((size_t)nt * k);
    double prev = -1, sse = 0;
    for (int it = 0; it < o.iters; it++) {
        vq_assign(C.data(), k, dim, x, n, idx.data(), d2.data());
        std::fill(sums.begin(), sums.end(), 0.0);
        std::fill(wsum.begin(), wsum.end(), 0.0);
        sse = 0;
        // Per-thread partial sums, combined in thread order: deterministic for a thread count.
#pragma omp parallel reduction(+ : sse)
        {
            int t = 0;
#ifdef _OPENMP
            t = omp_get_thread_num();
#endif
            double* S = &sums[(size_t)t * k * dim];
            double* WS = &wsum[(size_t)t * k];
#pragma omp for schedule(static)
            for (long long i = 0; i < N; i++) {
                double wi = W(i);
                int j = idx[i];
                WS[j] += wi;
                for (int d = 0; d < dim; d++) S[(size_t)j * dim + d] += wi * x[(size_t)i * dim + d];
                sse += wi * d2[i];
            }
        }
        for (int t = 1; t < nt; t++) {
            for (size_t q = 0; q < (size_t)k * dim; q++) sums[q] += sums[(size_t)t * k * dim + q];
            for (int j = 0; j < k; j++) wsum[j] += wsum[(size_t)t * k + j];
        }
        std::vector<int> empty;
        for (int j = 0; j < k; j++) {
            if (wsum[j] > 0)
                for (int d = 0; d < dim; d++) C[(size_t)j * dim + d] = (float)(sums[(size_t)j * dim + d] / wsum[j]);
            else empty.push_back(j);
        }
        // Empty clusters move to the points that cost the most (largest w * D^2).
        if (!empty.empty()) {
            std::vector<int32_t> order(n);
            std::iota(order.begin(), order.end(), 0);
            size_t m = std::min(empty.size(), n);
            std::partial_sort(order.begin(), order.begin() + m, order.end(),
                              [&](int32_t a, int32_t b) { return W(a) * d2[a] > W(b) * d2[b]; });
            for (size_t e = 0; e < m; e++)
                if (d2[order[e]] > 0)
                    memcpy(&C[(size_t)empty[e] * dim], x + (size_t)order[e] * dim, dim * sizeof(float));
        }
        if (o.verbose) {
            double mse = sse / (wtot * dim) * 255.0 * 255.0;
            fprintf(stderr, "  iter %3d  patch mse %.3f  (%.2f dB)  empty %zu  %.1f s\n", it + 1, mse,
                    mse > 0 ? 10 * std::log10(255.0 * 255.0 / mse) : 100.0, empty.size(), now_s() - t_start);
        }
        if (o.tol > 0 && prev > 0 && empty.empty() && (prev - sse) <= o.tol * prev) break;
        prev = sse;
    }
    if (sse_out) *sse_out = sse;
    return true;
}

// ------------------------------------------------------------------------------------------
// model

void vq_patches(const uint8_t* img, int side, int p, float* out) {
    const int g = side / p;
    for (int py = 0; py < g; py++)
        for (int px = 0; px < g; px++)
            for (int y = 0; y < p; y++)
                for (int x = 0; x < p; x++) *out++ = img[(size_t)(py * p + y) * side + px * p + x] * (1.f / 255.f);
}

bool vq_train(const uint8_t* images, size_t n_images, const VqTrainOpts& o, VqModel* out, std::string* err) {
    using namespace vq_detail;
    if (o.side <= 0 || o.patch <= 0 || o.side % o.patch)
        return fail(err,
                    "train: side " + std::to_string(o.side) + " is not a multiple of patch " + std::to_string(o.patch));
    if (o.codes <= 0) return fail(err, "train: codes must be > 0");
    if (n_images == 0) return fail(err, "train: no images");
    const int p = o.patch, dim = p * p, g = o.side / p, T = g * g;
    const size_t R2 = (size_t)o.side * o.side;
    const unsigned long long total = (unsigned long long)n_images * T;
    const bool sample = o.samples > 0 && (unsigned long long)o.samples < total;
    const size_t m = sample ? (size_t)o.samples : (size_t)total;
    Rng rng(o.seed ^ 0xA5A5A5A5ull);

    // Collect patches as bytes and merge exact duplicates into weighted points: blank
    // background patches are a large share of MNIST, and k-means cost scales with points.
    if (m > (1u << 28)) return fail(err, "train: " + std::to_string(m) + " patches is too many (use samples <= 2^28)");
    std::vector<uint8_t> uniq;
    std::vector<uint32_t> counts;  // integer counts: float += 1 stalls at 2^24
    size_t cap = 1;
    while (cap < 2 * m) cap <<= 1;
    std::vector<uint32_t> table(cap, 0);  // 0 = empty, else unique index + 1
    std::vector<uint8_t> pb(dim);
    for (size_t s = 0; s < m; s++) {
        unsigned long long q = sample ? rng.below(total) : s;
        size_t im = q / T;
        int t = (int)(q % T), py = t / g, px = t % g;
        const uint8_t* img = images + im * R2;
        for (int y = 0; y < p; y++) memcpy(&pb[y * p], img + (size_t)(py * p + y) * o.side + px * p, p);
        size_t h = hash_bytes(pb.data(), dim) & (cap - 1);
        for (;;) {
            uint32_t e = table[h];
            if (!e) {
                table[h] = (uint32_t)counts.size() + 1;
                uniq.insert(uniq.end(), pb.begin(), pb.end());
                counts.push_back(1);
                break;
            }
            if (memcmp(&uniq[(size_t)(e - 1) * dim], pb.data(), dim) == 0) {
                counts[e - 1]++;
                break;
            }
            h = (h + 1) & (cap - 1);
        }
    }
    std::vector<uint32_t>().swap(table);
    const size_t nu = counts.size();
    std::vector<float> wts(counts.begin(), counts.end());
    std::vector<uint32_t>().swap(counts);
    if (o.verbose)
        fprintf(stderr, "vq train: %zu images, %zu patches (%s), %zu distinct, K=%d P=%d\n", n_images, m,
                sample ? "sampled" : "all", nu, o.codes, p);
    std::vector<float> xs(nu * dim);
    for (size_t i = 0; i < xs.size(); i++) xs[i] = uniq[i] * (1.f / 255.f);
    std::vector<uint8_t>().swap(uniq);

    VqKmeansOpts ko;
    ko.k = o.codes;
    ko.iters = o.iters;
    ko.seed = o.seed;
    ko.plusplus = o.plusplus;
    ko.tol = o.tol;
    ko.verbose = o.verbose;
    out->side = o.side;
    out->patch = p;
    out->codes = o.codes;
    return vq_kmeans(xs.data(), wts.data(), nu, dim, ko, &out->centroids, nullptr, err);
}

bool vq_model_check(const VqModel& m, std::string* err) {
    using vq_detail::fail;
    if (m.side <= 0 || m.side > 4096) return fail(err, "bad image side " + std::to_string(m.side));
    if (m.patch <= 0 || m.side % m.patch)
        return fail(err, "patch " + std::to_string(m.patch) + " does not divide side " + std::to_string(m.side));
    if (m.codes <= 0 || m.codes > (1 << 24)) return fail(err, "bad number of codes " + std::to_string(m.codes));
    if (m.centroids.size() != (size_t)m.codes * m.patch * m.patch)
        return fail(err, "codebook has " + std::to_string(m.centroids.size()) +
                             " values, expected K*P*P = " + std::to_string((size_t)m.codes * m.patch * m.patch));
    for (float v : m.centroids)
        if (!std::isfinite(v)) return fail(err, "codebook has a non-finite value");
    return true;
}

bool vq_model_save(const VqModel& m, const char* path, std::string* err) {
    using namespace vq_detail;
    std::string e;
    if (!vq_model_check(m, &e)) return fail(err, std::string(path) + ": " + e);
    std::vector<uint8_t> b = {'M', 'O', 'T', 'V'};
    put_le32(b, 1);
    put_le32(b, (uint32_t)m.side);
    put_le32(b, (uint32_t)m.patch);
    put_le32(b, (uint32_t)m.codes);
    for (float v : m.centroids) {
        uint32_t u;
        memcpy(&u, &v, 4);
        put_le32(b, u);
    }
    FILE* f = fopen(path, "wb");
    if (!f) return fail(err, std::string(path) + ": cannot create (" + strerror(errno) + ")");
    bool ok = fwrite(b.data(), 1, b.size(), f) == b.size();
    ok = (fclose(f) == 0) && ok;
    if (!ok) return fail(err, std::string(path) + ": write failed");
    return true;
}

bool vq_model_parse(const uint8_t* d, size_t n, const char* name, VqModel* m, std::string* err) {
    using namespace vq_detail;
    std::string nm = name;
    if (n == 0) return fail(err, nm + ": empty file");
    if (n < 4 || memcmp(d, "MOTV", 4) != 0) return fail(err, nm + ": not a vq model (bad magic, expected \"MOTV\")");
    if (n < 20) return fail(err, nm + ": truncated vq model header (" + std::to_string(n) + " bytes, need 20)");
    uint32_t ver = le32(d + 4);
    if (ver != 1) return fail(err, nm + ": unsupported vq model version " + std::to_string(ver) + " (expected 1)");
    uint64_t R = le32(d + 8), P = le32(d + 12), K = le32(d + 16);
    if (R == 0 || P == 0 || K == 0 || R > 4096 || P > R || K > (1u << 24) || R % P)
        return fail(err, nm + ": inconsistent vq model sizes R=" + std::to_string(R) + " P=" + std::to_string(P) +
                             " K=" + std::to_string(K));
    // Encoding an image costs R^2 x K distance terms: bound it (about a second), so a small file
    // with a large side and many 1x1 codes cannot make encoding take minutes (found by fuzzing).
    if (R * R * K > VQ_MAX_ENCODE_WORK)
        return fail(err, nm + ": vq model too costly to use: side^2 x codes = " + std::to_string(R * R * K) +
                             " (at most " + std::to_string(VQ_MAX_ENCODE_WORK) + ")");
    uint64_t need = 20 + 4 * K * P * P;
    if (n < need)
        return fail(err, nm + ": truncated vq model (" + std::to_string(n) + " bytes, header implies " +
                             std::to_string(need) + ")");
    if (n > need)
        return fail(err, nm + ": vq model has " + std::to_string(n - need) + " extra bytes (header implies " +
                             std::to_string(need) + ")");
    VqModel t;
    t.side = (int)R;
    t.patch = (int)P;
    t.codes = (int)K;
    t.centroids.resize(K * P * P);
    for (size_t i = 0; i < t.centroids.size(); i++) {
        uint32_t u = le32(d + 20 + 4 * i);
        memcpy(&t.centroids[i], &u, 4);
    }
    std::string e;
    if (!vq_model_check(t, &e)) return fail(err, nm + ": " + e);
    *m = std::move(t);
    return true;
}

bool vq_model_load(const char* path, VqModel* m, std::string* err) {
    std::vector<uint8_t> data;
    if (!vq_read_file(path, &data, err)) return false;
    return vq_model_parse(data.data(), data.size(), path, m, err);
}

void vq_encode(const VqModel& m, const uint8_t* img, int32_t* codes) {
    const int dim = m.patch * m.patch, T = vq_tokens(m);
    std::vector<float> x((size_t)T * dim);
    vq_patches(img, m.side, m.patch, x.data());
    vq_assign(m.centroids.data(), m.codes, dim, x.data(), T, codes, nullptr);
}

void vq_encode_batch(const VqModel& m, const uint8_t* imgs, size_t n, int32_t* codes) {
    const int dim = m.patch * m.patch, T = vq_tokens(m);
    const size_t R2 = (size_t)m.side * m.side;
    const size_t chunk = 4096;  // bounded memory for any n
    std::vector<float> x(chunk * T * dim);
    for (size_t s = 0; s < n; s += chunk) {
        size_t c = std::min(chunk, n - s);
        for (size_t i = 0; i < c; i++) vq_patches(imgs + (s + i) * R2, m.side, m.patch, &x[i * T * dim]);
        vq_assign(m.centroids.data(), m.codes, dim, x.data(), c * T, codes + s * T, nullptr);
    }
}

bool vq_decode(const VqModel& m, const int32_t* codes, size_t n_codes, uint8_t* img, std::string* err) {
    using vq_detail::fail;
    const int p = m.patch, g = m.side / p;
    if (n_codes != (size_t)vq_tokens(m))
        return fail(err, "expected " + std::to_string(vq_tokens(m)) + " codes, got " + std::to_string(n_codes));
    for (size_t t = 0; t < n_codes; t++) {
        if (codes[t] < 0 || codes[t] >= m.codes)
            return fail(err, "code " + std::to_string(codes[t]) + " out of range (K=" + std::to_string(m.codes) + ")");
        const float* c = &m.centroids[(size_t)codes[t] * p * p];
        int py = (int)t / g, px = (int)t % g;
        for (int y = 0; y < p; y++)
            for (int x = 0; x < p; x++)
                img[(size_t)(py * p + y) * m.side + px * p + x] =
                    (uint8_t)std::lround(std::min(255.f, std::max(0.f, c[y * p + x] * 255.f)));
    }
    return true;
}

double vq_psnr(const uint8_t* a, const uint8_t* b, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        s += d * d;
    }
    double mse = s / (double)n;
    return mse > 0 ? std::min(100.0, 10 * std::log10(255.0 * 255.0 / mse)) : 100.0;
}

double vq_eval_psnr(const VqModel& m, const uint8_t* imgs, size_t n) {
    const int T = vq_tokens(m);
    const size_t R2 = (size_t)m.side * m.side;
    std::vector<int32_t> codes(n * T);
    vq_encode_batch(m, imgs, n, codes.data());
    double tot = 0;
#pragma omp parallel for reduction(+ : tot) schedule(static)
    for (long long i = 0; i < (long long)n; i++) {
        std::vector<uint8_t> rec(R2);
        vq_decode(m, &codes[i * T], T, rec.data(), nullptr);
        tot += vq_psnr(imgs + i * R2, rec.data(), R2);
    }
    return n ? tot / n : 0;
}

#endif  // VQ_IMPLEMENTATION_DONE
#endif  // VQ_IMPLEMENTATION
