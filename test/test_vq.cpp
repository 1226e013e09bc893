// test_vq.cpp - tests for the image tokenizer (tokenizers/vq.h).
//   g++ -std=c++17 -O2 -march=native -fopenmp -Wall -Wextra -I. test/test_vq.cpp -o /tmp/test_vq && /tmp/test_vq
// Self-contained: every fixture (stroke images, PNG/JPEG/IDX/gzip/model bytes) is generated here.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#define STB_IMAGE_IMPLEMENTATION
#define STBI_ONLY_PNG  // JPEG is decoded by libjpeg-turbo (tokenizers/vq.h)
#include <stb/stb_image.h>
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>
#define VQ_IMPLEMENTATION
#include "tokenizers/vq.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

std::string tmp_path(const char* name) { return std::string("/tmp/test_vq_") + std::to_string(getpid()) + "_" + name; }

void write_bytes(const std::string& path, const std::vector<uint8_t>& b) {
    FILE* f = fopen(path.c_str(), "wb");
    REQUIRE(f);
    if (!b.empty()) REQUIRE(fwrite(b.data(), 1, b.size(), f) == b.size());
    fclose(f);
}

void append_to(void* ctx, void* data, int size) {
    auto* v = (std::vector<uint8_t>*)ctx;
    v->insert(v->end(), (uint8_t*)data, (uint8_t*)data + size);
}

// 28x28 "handwriting": 2-4 thick anti-aliased strokes plus maybe a blob, light on black.
void draw_image(vq_detail::Rng& r, uint8_t* img) {
    std::vector<float> f(28 * 28, 0.f);
    auto dot = [&](double cx, double cy, double rad) {
        for (int y = 0; y < 28; y++)
            for (int x = 0; x < 28; x++) {
                double d = std::sqrt((x + 0.5 - cx) * (x + 0.5 - cx) + (y + 0.5 - cy) * (y + 0.5 - cy));
                float v = (float)std::min(1.0, std::max(0.0, rad + 0.5 - d));
                f[y * 28 + x] = std::max(f[y * 28 + x], v);
            }
    };
    int strokes = 2 + (int)r.below(3);
    for (int s = 0; s < strokes; s++) {
        double x0 = 5 + 18 * r.uniform(), y0 = 5 + 18 * r.uniform();
        double x1 = 5 + 18 * r.uniform(), y1 = 5 + 18 * r.uniform();
        for (int t = 0; t <= 20; t++) dot(x0 + (x1 - x0) * t / 20, y0 + (y1 - y0) * t / 20, 1.3);
    }
    if (r.below(2)) dot(6 + 16 * r.uniform(), 6 + 16 * r.uniform(), 2 + 2 * r.uniform());
    for (int i = 0; i < 28 * 28; i++) img[i] = (uint8_t)std::lround(255 * f[i]);
}

std::vector<uint8_t> make_idx(uint32_t magic, uint32_t n, uint32_t h, uint32_t w, size_t data_bytes) {
    std::vector<uint8_t> b;
    for (uint32_t v : {magic, n, h, w})
        for (int i = 3; i >= 0; i--) b.push_back((uint8_t)(v >> (8 * i)));
    for (size_t i = 0; i < data_bytes; i++) b.push_back((uint8_t)(i * 7));
    return b;
}

VqModel small_model() {
    VqModel m;
    m.side = 8;
    m.patch = 4;
    m.codes = 3;
    for (int i = 0; i < 3 * 16; i++) m.centroids.push_back(i / 47.f);
    return m;
}

}  // namespace

TEST_CASE("vq_assign matches brute force (SIMD path, odd k, dim > 64 path)") {
    vq_detail::Rng r(7);
    for (int dim : {4, 16, 81}) {
        for (int k : {1, 37, 64}) {
            std::vector<float> c((size_t)k * dim), x(203 * (size_t)dim);
            for (auto& v : c) v = (float)r.uniform();
            for (auto& v : x) v = (float)r.uniform();
            std::vector<int32_t> idx(203);
            std::vector<float> d2(203);
            vq_assign(c.data(), k, dim, x.data(), 203, idx.data(), d2.data());
            for (int i = 0; i < 203; i++) {
                double best = 1e30;
                for (int j = 0; j < k; j++) {
                    double e = 0;
                    for (int d = 0; d < dim; d++)
                        e += (x[i * dim + d] - c[j * dim + d]) * (x[i * dim + d] - c[j * dim + d]);
                    best = std::min(best, e);
                }
                // allow float rounding ties: the chosen code must be (nearly) as close as the best
                CHECK(d2[i] <= best + 1e-4);
            }
        }
    }
}

TEST_CASE("k-means recovers known clusters (k-means++ and weights)") {
    const int K = 8, D = 16, per = 150;
    vq_detail::Rng r(3);
    std::vector<float> centers(K * D), x;
    for (int k = 0; k < K; k++)
        for (int d = 0; d < D; d++) centers[k * D + d] = (d % K == k) ? 0.9f : 0.1f;  // pairwise distance ~1.6
    for (int k = 0; k < K; k++)
        for (int i = 0; i < per; i++)
            for (int d = 0; d < D; d++) x.push_back(centers[k * D + d] + 0.05f * (float)(r.uniform() - 0.5));
    VqKmeansOpts o;
    o.k = K;
    o.iters = 20;
    o.seed = 11;
    std::vector<float> c;
    double sse = 0;
    std::string err;
    REQUIRE(vq_kmeans(x.data(), nullptr, x.size() / D, D, o, &c, &sse, &err));
    std::vector<int> used(K, 0);
    for (int k = 0; k < K; k++) {  // each true centre has exactly one learned centroid near it
        int near = 0;
        for (int j = 0; j < K; j++) {
            double e = 0;
            for (int d = 0; d < D; d++) e += (c[j * D + d] - centers[k * D + d]) * (c[j * D + d] - centers[k * D + d]);
            if (e < 0.01) {
                near++;
                used[j]++;
            }
        }
        CHECK(near == 1);
    }
    for (int j = 0; j < K; j++) CHECK(used[j] == 1);
    CHECK(sse < K * per * D * 0.0005);  // noise variance is 0.05^2/12 per value

    // Weighted points equal repeated points: 3 points with weights 1, 1, 2 and k = 1 give
    // the weighted mean.
    float p3[3] = {0.f, 1.f, 0.5f}, w3[3] = {1.f, 1.f, 2.f};
    o.k = 1;
    REQUIRE(vq_kmeans(p3, w3, 3, 1, o, &c, &sse, &err));
    CHECK(c[0] == doctest::Approx(0.5f));

    // Fewer distinct points than k: no crash, every point is represented exactly.
    float two[4] = {0.f, 0.f, 1.f, 1.f};
    o.k = 5;
    REQUIRE(vq_kmeans(two, nullptr, 2, 2, o, &c, &sse, &err));
    CHECK(sse == doctest::Approx(0.0));
    CHECK_FALSE(vq_kmeans(two, nullptr, 0, 2, o, &c, &sse, &err));

    // keep_init starts from the given centroids: the true centres are already a fixed point.
    o.k = K;
    o.keep_init = true;
    o.iters = 3;
    c = centers;
    REQUIRE(vq_kmeans(x.data(), nullptr, x.size() / D, D, o, &c, &sse, &err));
    for (int i = 0; i < K * D; i++) CHECK(std::fabs(c[i] - centers[i]) < 0.01);
    c.pop_back();
    CHECK_FALSE(vq_kmeans(x.data(), nullptr, x.size() / D, D, o, &c, &sse, &err));
}

TEST_CASE("train on drawn strokes, encode/decode held-out images above a PSNR floor") {
    vq_detail::Rng r(5);
    const int n_train = 300, n_test = 50;
    std::vector<uint8_t> imgs((n_train + n_test) * 784);
    for (int i = 0; i < n_train + n_test; i++) draw_image(r, &imgs[i * 784]);
    VqTrainOpts o;
    o.codes = 64;
    o.iters = 20;
    o.verbose = false;
    VqModel m;
    std::string err;
    REQUIRE(vq_train(imgs.data(), n_train, o, &m, &err));
    CHECK(vq_tokens(m) == 49);
    REQUIRE(vq_model_check(m, &err));
    for (float v : m.centroids) {
        CHECK(v >= 0.f);
        CHECK(v <= 1.f);
    }
    const uint8_t* test = &imgs[n_train * 784];
    double psnr = vq_eval_psnr(m, test, n_test);
    MESSAGE("held-out PSNR of 64-code 4x4 codebook on drawn strokes: " << psnr << " dB");
    CHECK(psnr > 19.0);  // floor; measured 21.1 dB
    std::vector<uint8_t> blank(784, 0);
    double blank_psnr = 0;
    for (int i = 0; i < n_test; i++) blank_psnr += vq_psnr(test + i * 784, blank.data(), 784) / n_test;
    MESSAGE("an all-black guess scores " << blank_psnr << " dB");
    CHECK(blank_psnr < psnr - 6);

    // Codes are in range, row-major patch order: a blob in the top-left patch only changes
    // token 0.
    std::vector<int32_t> codes(49), codes2(49);
    std::vector<uint8_t> img(784, 0), rec(784);
    vq_encode(m, img.data(), codes.data());
    for (int y = 0; y < 4; y++)
        for (int x = 0; x < 4; x++) img[y * 28 + x] = 255;
    vq_encode(m, img.data(), codes2.data());
    CHECK(codes2[0] != codes[0]);
    for (int t = 1; t < 49; t++) CHECK(codes2[t] == codes[t]);

    // decode(encode(x)) is a fixed point up to uint8 rounding of centroids.
    vq_encode(m, test, codes.data());
    REQUIRE(vq_decode(m, codes.data(), 49, rec.data(), &err));
    std::vector<uint8_t> rec2(784);
    vq_encode(m, rec.data(), codes2.data());
    REQUIRE(vq_decode(m, codes2.data(), 49, rec2.data(), &err));
    CHECK(vq_psnr(rec.data(), rec2.data(), 784) > 40);

    // Batch encode equals per-image encode.
    std::vector<int32_t> batch(n_test * 49);
    vq_encode_batch(m, test, n_test, batch.data());
    for (int i = 0; i < n_test; i += 7) {
        vq_encode(m, test + i * 784, codes.data());
        for (int t = 0; t < 49; t++) CHECK(batch[i * 49 + t] == codes[t]);
    }

    // Bad codes are errors, not crashes.
    codes[3] = 64;
    CHECK_FALSE(vq_decode(m, codes.data(), 49, rec.data(), &err));
    CHECK(err.find("out of range") != std::string::npos);
    codes[3] = -1;
    CHECK_FALSE(vq_decode(m, codes.data(), 49, rec.data(), &err));
    CHECK_FALSE(vq_decode(m, codes.data(), 48, rec.data(), &err));

    // Random init (baseline) also trains; sampled patches work.
    o.plusplus = false;
    o.samples = 2000;
    VqModel m2;
    REQUIRE(vq_train(imgs.data(), n_train, o, &m2, &err));
    CHECK(vq_eval_psnr(m2, test, n_test) > 18.0);
    o.side = 28;
    o.patch = 5;
    CHECK_FALSE(vq_train(imgs.data(), n_train, o, &m2, &err));
}

TEST_CASE("model file round trip and corrupt model files") {
    VqModel m = small_model();
    std::string path = tmp_path("m.vq"), err;
    REQUIRE(vq_model_save(m, path.c_str(), &err));
    std::vector<uint8_t> bytes;
    REQUIRE(vq_read_file(path.c_str(), &bytes, &err));
    REQUIRE(bytes.size() == 20 + 4 * 3 * 16);
    CHECK(memcmp(bytes.data(), "MOTV\x01\0\0\0\x08\0\0\0\x04\0\0\0\x03\0\0\0", 20) == 0);
    float f1;  // centroid 1 (code 0, row 0, col 1) at offset 24, little-endian float32
    uint32_t u = bytes[24] | bytes[25] << 8 | bytes[26] << 16 | (uint32_t)bytes[27] << 24;
    memcpy(&f1, &u, 4);
    CHECK(f1 == m.centroids[1]);
    VqModel l;
    REQUIRE(vq_model_load(path.c_str(), &l, &err));
    CHECK(l.side == 8);
    CHECK(l.patch == 4);
    CHECK(l.codes == 3);
    CHECK(l.centroids == m.centroids);

    auto bad = [&](std::vector<uint8_t> b, const char* what) {
        VqModel t;
        std::string e;
        CHECK_FALSE(vq_model_parse(b.data(), b.size(), "x.vq", &t, &e));
        CHECK_MESSAGE(e.find(what) != std::string::npos, e);
        CHECK(e.rfind("x.vq: ", 0) == 0);
    };
    bad({}, "empty");
    std::vector<uint8_t> b = bytes;
    b[0] = 'X';
    bad(b, "magic");
    b = bytes;
    b[4] = 2;
    bad(b, "version");
    b = bytes;
    b.pop_back();
    bad(b, "truncated");
    bad(std::vector<uint8_t>(bytes.begin(), bytes.begin() + 10), "truncated");
    b = bytes;
    b.push_back(0);
    bad(b, "extra");
    b = bytes;
    b[12] = 3;  // P = 3 does not divide R = 8
    bad(b, "inconsistent");
    b = bytes;
    b[16] = 0;  // K = 0
    bad(b, "inconsistent");
    b = bytes;
    b[16] = 4;  // K = 4 but data for 3
    bad(b, "truncated");
    // side 4096 with 8,192 codes of 1x1 patches: a 32 KB file whose encoding would take minutes
    b.assign(20 + 4 * 8192, 0);
    memcpy(b.data(), "MOTV\x01\0\0\0\0\x10\0\0\x01\0\0\0\0\x20\0\0", 20);
    bad(b, "too costly");
    b = bytes;
    b[20] = 0;
    b[21] = 0;
    b[22] = 0xC0;
    b[23] = 0x7F;  // NaN
    bad(b, "non-finite");
    CHECK_FALSE(vq_model_load((path + ".missing").c_str(), &l, &err));
    CHECK(err.find("cannot open") != std::string::npos);
    m.centroids.pop_back();
    CHECK_FALSE(vq_model_save(m, path.c_str(), &err));
    remove(path.c_str());
}

TEST_CASE("IDX parsing: valid, gzipped, truncated, wrong magic") {
    std::string err;
    VqImages im;
    std::vector<uint8_t> good = make_idx(0x803, 3, 2, 5, 30);
    REQUIRE(vq_parse_idx(good.data(), good.size(), "a.idx", &im, &err));
    CHECK(im.n == 3);
    CHECK(im.h == 2);
    CHECK(im.w == 5);
    CHECK(im.pixels[29] == (uint8_t)(29 * 7));

    auto bad = [&](const std::vector<uint8_t>& b, const char* what) {
        VqImages t;
        std::string e;
        CHECK_FALSE(vq_parse_idx(b.data(), b.size(), "a.idx", &t, &e));
        CHECK_MESSAGE(e.find(what) != std::string::npos, e);
    };
    bad({}, "empty");
    bad(make_idx(0x803, 3, 2, 5, 29), "truncated IDX");
    bad(std::vector<uint8_t>(good.begin(), good.begin() + 10), "truncated IDX header");
    bad({0, 0, 8}, "truncated IDX header");
    bad(make_idx(0x801, 30, 0, 0, 0), "not an IDX image file");
    bad(make_idx(0x803, 3, 0, 5, 0), "bad IDX image size");
    bad(make_idx(0x803, 3, 2, 5, 31), "after the data");
    bad(make_idx(0x803, 0x7FFFFFFF, 0xFFFF, 0xFFFF, 4), "truncated IDX");  // no overflow, no huge alloc
    bad(make_idx(0x803, 0xFFFFFFFF, 28, 28, 4), "bad IDX image count");
    bad({'h', 'e', 'l', 'l', 'o'}, "not an IDX image file");

    // gzip member around the IDX bytes (stb's zlib stream minus its 2-byte header and
    // 4-byte Adler trailer is raw deflate; CRC is not checked by the reader).
    int zlen = 0;
    unsigned char* z = stbi_zlib_compress(good.data(), (int)good.size(), &zlen, 8);
    REQUIRE(z);
    std::vector<uint8_t> gz = {0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3};
    gz.insert(gz.end(), z + 2, z + zlen - 4);
    free(z);
    for (int i = 0; i < 4; i++) gz.push_back(0);  // CRC32 (unchecked)
    for (int i = 0; i < 4; i++) gz.push_back((uint8_t)(good.size() >> (8 * i)));
    VqImages g;
    REQUIRE(vq_parse_idx(gz.data(), gz.size(), "a.gz", &g, &err));
    CHECK(g.pixels == im.pixels);
    CHECK(vq_is_idx_or_gz(gz.data(), gz.size()));
    std::vector<uint8_t> gzt(gz.begin(), gz.end() - 12);
    bad(gzt, "gzip");
    std::vector<uint8_t> gzc = gz;
    gzc[gzc.size() - 4] ^= 1;  // wrong ISIZE
    bad(gzc, "gzip");

    std::string path = tmp_path("t.idx");
    write_bytes(path, make_idx(0x803, 100, 28, 28, 100));
    CHECK_FALSE(vq_load_idx(path.c_str(), &im, &err));
    CHECK(err.find(path + ": truncated IDX") == 0);
    remove(path.c_str());
}

// RGB -> JPEG in memory with libjpeg-turbo. stb_image_write's JPEG writer is not used: UBSan
// flags a left shift of a negative value in it (stbiw__jpg_processDU), so the tests avoid it.
static bool jpeg_encode(const uint8_t* rgb, int w, int h, int quality, std::vector<uint8_t>* out) {
    jpeg_compress_struct c;
    jpeg_error_mgr e;
    c.err = jpeg_std_error(&e);
    jpeg_create_compress(&c);
    unsigned char* buf = nullptr;
    unsigned long len = 0;
    jpeg_mem_dest(&c, &buf, &len);
    c.image_width = w;
    c.image_height = h;
    c.input_components = 3;
    c.in_color_space = JCS_RGB;
    jpeg_set_defaults(&c);
    jpeg_set_quality(&c, quality, TRUE);
    jpeg_start_compress(&c, TRUE);
    while (c.next_scanline < c.image_height) {
        JSAMPROW row = (JSAMPROW)(rgb + (size_t)c.next_scanline * w * 3);
        jpeg_write_scanlines(&c, &row, 1);
    }
    jpeg_finish_compress(&c);
    jpeg_destroy_compress(&c);
    out->assign(buf, buf + len);
    free(buf);
    return len > 0;
}

TEST_CASE("PNG/JPEG loading: grey, RGB, alpha, resize, bad files") {
    vq_detail::Rng r(9);
    std::vector<uint8_t> img(784), out;
    draw_image(r, img.data());
    std::string err, png = tmp_path("a.png");

    // grey PNG round trip at native size is exact
    REQUIRE(vq_write_png(png.c_str(), img.data(), 28, 28, &err));
    REQUIRE(vq_load_image(png.c_str(), 28, &out, &err));
    CHECK(out == img);

    // 2x nearest-upscaled RGB PNG shrinks back exactly (area average of equal 2x2 blocks)
    std::vector<uint8_t> big(56 * 56 * 3);
    for (int y = 0; y < 56; y++)
        for (int x = 0; x < 56; x++)
            for (int c = 0; c < 3; c++) big[(y * 56 + x) * 3 + c] = img[(y / 2) * 28 + x / 2];
    std::vector<uint8_t> pngb;
    REQUIRE(stbi_write_png_to_func(append_to, &pngb, 56, 56, 3, big.data(), 56 * 3));
    REQUIRE(vq_image_from_memory(pngb.data(), pngb.size(), "big.png", 28, &out, &err));
    CHECK(out == img);
    // and enlarging (bilinear) keeps the mean brightness close
    REQUIRE(vq_image_from_memory(pngb.data(), pngb.size(), "big.png", 84, &out, &err));
    REQUIRE(out.size() == 84 * 84);
    double m1 = 0, m2 = 0;
    for (uint8_t v : img) m1 += v / 784.0;
    for (uint8_t v : out) m2 += v / (84.0 * 84.0);
    CHECK(std::fabs(m1 - m2) < 3);

    // colour JPEG: pure red/green/blue bands convert to BT.601 luma (JPEG is lossy: tolerance)
    std::vector<uint8_t> rgb(48 * 48 * 3, 0);
    for (int y = 0; y < 48; y++)
        for (int x = 0; x < 48; x++) rgb[(y * 48 + x) * 3 + y / 16] = 255;
    std::vector<uint8_t> jpg;
    REQUIRE(jpeg_encode(rgb.data(), 48, 48, 95, &jpg));
    REQUIRE(vq_image_from_memory(jpg.data(), jpg.size(), "c.jpg", 24, &out, &err));
    CHECK(std::abs(out[4 * 24 + 12] - 76) < 8);    // red   0.299*255
    CHECK(std::abs(out[12 * 24 + 12] - 150) < 8);  // green 0.587*255
    CHECK(std::abs(out[20 * 24 + 12] - 29) < 8);   // blue  0.114*255

    // fully transparent RGBA -> white; non-square 8x4 -> padded, not stretched
    std::vector<uint8_t> rgba(8 * 4 * 4, 0);
    std::vector<uint8_t> tp;
    REQUIRE(stbi_write_png_to_func(append_to, &tp, 8, 4, 4, rgba.data(), 8 * 4));
    REQUIRE(vq_image_from_memory(tp.data(), tp.size(), "t.png", 8, &out, &err));
    for (uint8_t v : out) CHECK(v == 255);
    std::vector<uint8_t> wide(8 * 4, 255);  // white bar on a square canvas of border colour
    std::vector<uint8_t> wp;
    REQUIRE(stbi_write_png_to_func(append_to, &wp, 8, 4, 1, wide.data(), 8));
    REQUIRE(vq_image_from_memory(wp.data(), wp.size(), "w.png", 8, &out, &err));
    CHECK(out[0] == 255);

    auto bad = [&](const std::vector<uint8_t>& b, const char* what) {
        std::vector<uint8_t> o;
        std::string e;
        CHECK_FALSE(vq_image_from_memory(b.data(), b.size(), "x.png", 28, &o, &e));
        CHECK_MESSAGE(e.find(what) != std::string::npos, e);
        CHECK(e.rfind("x.png: ", 0) == 0);
    };
    bad({}, "empty file");
    bad({'G', 'I', 'F', '8', '9', 'a'}, "not a PNG/JPEG image");
    std::vector<uint8_t> corrupt(pngb.begin(), pngb.begin() + 8);
    for (int i = 0; i < 200; i++) corrupt.push_back((uint8_t)(i * 31));
    bad(corrupt, "corrupt PNG");
    bad(std::vector<uint8_t>(pngb.begin(), pngb.begin() + pngb.size() / 2), "corrupt PNG");
    bad({0xFF, 0xD8, 0xFF, 0xE0, 0, 0x10, 'J', 'F'}, "corrupt JPEG");

    std::string empty = tmp_path("empty.png");
    write_bytes(empty, {});
    CHECK_FALSE(vq_load_image(empty.c_str(), 28, &out, &err));
    CHECK(err == empty + ": empty file");
    CHECK_FALSE(vq_load_image((empty + ".missing").c_str(), 28, &out, &err));
    CHECK(err.find("cannot open") != std::string::npos);
    CHECK_FALSE(vq_write_png("/nonexistent-dir/x.png", img.data(), 28, 28, &err));
    remove(png.c_str());
    remove(empty.c_str());
}

// A PNG whose IHDR says w x h, with arbitrary chunks after it (CRCs are not checked by stb).
static std::vector<uint8_t> png_header(uint32_t w, uint32_t h, const std::string& extra_chunk_type) {
    std::vector<uint8_t> b = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    auto be = [&](uint32_t v) {
        for (int i = 3; i >= 0; i--) b.push_back((uint8_t)(v >> (8 * i)));
    };
    be(13);
    for (char c : std::string("IHDR")) b.push_back(c);
    be(w);
    be(h);
    for (uint8_t v : {8, 0, 0, 0, 0}) b.push_back(v);  // 8-bit grey
    be(0);                                             // CRC
    if (!extra_chunk_type.empty()) {
        be(0);
        for (char c : extra_chunk_type) b.push_back((uint8_t)c);
        be(0);
    }
    return b;
}

TEST_CASE("hostile images: stb's Huffman overflow, thin strips, huge headers, control bytes in errors") {
    std::vector<uint8_t> out;
    std::string err;
    // A DHT segment whose 16 code counts sum to 4,080 (at most 256 symbols exist): Debian's stb
    // (2022-09-08) writes and reads past h->size[257] in stbi__build_huffman on it. JPEG goes to
    // libjpeg-turbo, which refuses the table.
    std::vector<uint8_t> dht = {0xFF, 0xD8, 0xFF, 0xC4, 0x00, 0x13, 0x00};
    for (int i = 0; i < 16; i++) dht.push_back(0xFF);
    dht.push_back(0xFF);
    dht.push_back(0xD9);
    CHECK_FALSE(vq_image_from_memory(dht.data(), dht.size(), "crafted.jpg", 28, &out, &err));
    CHECK_MESSAGE(err.find("crafted.jpg: corrupt JPEG image (") == 0, err);
    CHECK(err.find('\n') == std::string::npos);
    // a truncated JPEG (libjpeg would fill the rest with grey and warn) is refused too
    std::vector<uint8_t> rgb(64 * 64 * 3, 90), jpg;
    REQUIRE(jpeg_encode(rgb.data(), 64, 64, 90, &jpg));
    REQUIRE(vq_image_from_memory(jpg.data(), jpg.size(), "ok.jpg", 28, &out, &err));
    std::vector<uint8_t> cut(jpg.begin(), jpg.begin() + jpg.size() * 2 / 3);
    CHECK_FALSE(vq_image_from_memory(cut.data(), cut.size(), "cut.jpg", 28, &out, &err));
    CHECK(err.find("cut.jpg: corrupt JPEG image") == 0);

    // Thin strips are valid images: the result is the strip on a square of its border colour,
    // computed row by row (memory O(side^2), not max(w, h)^2 = 1.6 GB of floats for 20000 x 1).
    for (int w : {20000, 1 << 24}) {
        std::vector<uint8_t> strip((size_t)w, 200), png;
        strip[w / 2] = 0;  // one dark pixel: the border mean stays 200 - 200/w
        REQUIRE(stbi_write_png_to_func(append_to, &png, w, 1, 1, strip.data(), w));
        INFO("width ", w, ", PNG of ", png.size(), " bytes");
        REQUIRE(vq_image_from_memory(png.data(), png.size(), "strip.png", 28, &out, &err));
        REQUIRE(out.size() == 784);
        for (uint8_t v : out) CHECK(std::abs(v - 200) <= 1);
    }
    std::vector<uint8_t> tall((size_t)30000, 10), png;  // and 1 x 30000, dark
    REQUIRE(stbi_write_png_to_func(append_to, &png, 1, 30000, 1, tall.data(), 1));
    REQUIRE(vq_image_from_memory(png.data(), png.size(), "tall.png", 28, &out, &err));
    for (uint8_t v : out) CHECK(v == 10);

    // An empty IDAT chunk before the data (valid PNG; stb memcpy()s into a null buffer on it,
    // found by fuzz_image): the same image as without it.
    {
        std::vector<uint8_t> grey(28 * 28), p0, p1, o0;
        for (size_t i = 0; i < grey.size(); i++) grey[i] = (uint8_t)(i * 7);
        REQUIRE(stbi_write_png_to_func(append_to, &p0, 28, 28, 1, grey.data(), 28));
        p1.assign(p0.begin(), p0.begin() + 33);  // signature + IHDR
        for (int b : {0, 0, 0, 0, 73, 68, 65, 84, 0x35, 0xAF, 0x06, 0x1E}) p1.push_back((uint8_t)b);  // "IDAT"
        p1.insert(p1.end(), p0.begin() + 33, p0.end());
        REQUIRE(vq_image_from_memory(p0.data(), p0.size(), "p0.png", 28, &o0, &err));
        REQUIRE(vq_image_from_memory(p1.data(), p1.size(), "p1.png", 28, &out, &err));
        CHECK(out == o0);
        CHECK(out == grey);
    }
    // An IDAT chunk claiming 1.2 GB in a 1 KB file: stb would realloc its buffer to 2 GB before
    // finding the data missing (found by fuzz_image); refused from the chunk lengths first.
    {
        std::vector<uint8_t> bomb = png_header(28, 28, "");
        for (int b : {0x48, 0x03, 0x37, 0x00, 73, 68, 65, 84}) bomb.push_back((uint8_t)b);  // "IDAT"
        bomb.resize(987, 0x5A);
        CHECK_FALSE(vq_image_from_memory(bomb.data(), bomb.size(), "bomb.png", 28, &out, &err));
        CHECK(err == "bomb.png: corrupt PNG image (a chunk runs past the end of the file)");
    }
    // A header promising more than VQ_MAX_PIXELS is refused before anything is allocated.
    std::vector<uint8_t> huge = png_header(5000, 5000, "");
    CHECK_FALSE(vq_image_from_memory(huge.data(), huge.size(), "huge.png", 28, &out, &err));
    CHECK(err == "huge.png: image too large (5000x5000, more than 16777216 pixels)");

    // stb's message for an unknown critical chunk quotes the chunk type's raw bytes; they must
    // not reach the (one-line) error.
    std::vector<uint8_t> ctl = png_header(4, 4, std::string("\n\x1b[2", 4));
    CHECK_FALSE(vq_image_from_memory(ctl.data(), ctl.size(), "ctl.png", 28, &out, &err));
    CHECK_MESSAGE(err.find("ctl.png: corrupt PNG image (") == 0, err);
    for (char c : err) CHECK((c >= 32 && c <= 126));
}

TEST_CASE("PSNR definition") {
    std::vector<uint8_t> a(100, 10), b(100, 10);
    CHECK(vq_psnr(a.data(), b.data(), 100) == 100.0);  // identical: capped
    b[0] = 20;                                         // mse = 100/100 = 1
    CHECK(vq_psnr(a.data(), b.data(), 100) == doctest::Approx(10 * std::log10(255.0 * 255.0)));
}
