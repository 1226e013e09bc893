// vq.cpp - command-line tool for the image tokenizer (tokenizers/vq.h).
//   g++ -std=c++17 -O2 -march=native -fopenmp -Wall -Wextra -I. tokenizers/vq.cpp -o vq -ljpeg
// Run without arguments for usage. Errors print one line and exit 1; bad usage exits 2.
#define STB_IMAGE_IMPLEMENTATION
#define STBI_ONLY_PNG  // JPEG is decoded by libjpeg-turbo (tokenizers/vq.h)
#include <stb/stb_image.h>
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>
#define VQ_IMPLEMENTATION
#include "tokenizers/vq.h"

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static const char* kUsage =
    "usage:\n"
    "  vq train OUT.vq [--patch P] [--codes K] [--iters N] [--samples N] [--side R]\n"
    "                  [--images N] [--seed S] [--init pp|random] FILE...\n"
    "      learn a codebook from IDX image files (raw or .gz) and/or PNG/JPEG files.\n"
    "      defaults: side 28, patch 4, codes 512, iters 30, samples 2000000 patches drawn\n"
    "      at random (0 = every patch), all images of each IDX file (--images N: first N)\n"
    "  vq encode MODEL.vq IMAGE            print the codes of a PNG/JPEG image, one line\n"
    "  vq encode MODEL.vq --idx FILE --index I   ... of image I of an IDX file\n"
    "  vq decode MODEL.vq OUT.png < codes.txt    codes (whitespace separated) -> PNG\n"
    "  vq psnr MODEL.vq IDXFILE [N]        mean PSNR (dB) of encode/decode, first N images\n"
    "  vq grid MODEL.vq IDXFILE OUT.png N  PNG of N originals beside their reconstructions\n";

static int usage() {
    fputs(kUsage, stderr);
    return 2;
}
static int die(const std::string& msg) {
    fprintf(stderr, "vq: %s\n", msg.c_str());
    return 1;
}
// Strict non-negative integer parse: the whole string must be digits.
static bool parse_count(const char* s, long long* out) {
    if (!s || !*s) return false;
    for (const char* p = s; *p; p++)
        if (*p < '0' || *p > '9') return false;
    errno = 0;
    *out = strtoll(s, nullptr, 10);
    return errno == 0;
}

// Append the first `limit` images (0 = all) of an IDX file, resized to side x side.
static size_t append_resized(const VqImages& im, int side, long long limit, std::vector<uint8_t>* out) {
    size_t n = limit > 0 ? std::min<size_t>((size_t)limit, im.n) : im.n;
    size_t at = out->size(), R2 = (size_t)side * side, src = (size_t)im.h * im.w;
    out->resize(at + n * R2);
    for (size_t i = 0; i < n; i++) vq_resize_u8(&im.pixels[i * src], im.w, im.h, &(*out)[at + i * R2], side);
    return n;
}

static bool load_idx_resized(const char* path, int side, long long limit, std::vector<uint8_t>* out, size_t* count,
                             std::string* err) {
    VqImages im;
    if (!vq_load_idx(path, &im, err)) return false;
    *count = append_resized(im, side, limit, out);
    return true;
}

static int cmd_train(int argc, char** argv) {
    VqTrainOpts o;
    long long images = 0;
    std::string out;
    std::vector<std::string> files;
    for (int i = 0; i < argc; i++) {
        std::string a = argv[i];
        if (a.size() > 2 && a[0] == '-' && a[1] == '-') {
            if (i + 1 >= argc) return usage();
            const char* v = argv[++i];
            long long x = 0;
            if (a == "--init") {
                if (strcmp(v, "pp") && strcmp(v, "random")) return usage();
                o.plusplus = strcmp(v, "pp") == 0;
                continue;
            }
            if (!parse_count(v, &x)) return die(a + ": '" + v + "' is not a non-negative integer");
            if (a == "--patch") o.patch = (int)x;
            else if (a == "--codes") o.codes = (int)x;
            else if (a == "--iters") o.iters = (int)x;
            else if (a == "--samples") o.samples = x;
            else if (a == "--side") o.side = (int)x;
            else if (a == "--images") images = x;
            else if (a == "--seed") o.seed = (uint64_t)x;
            else return usage();
        } else if (out.empty()) {
            out = a;
        } else {
            files.push_back(a);
        }
    }
    if (out.empty() || files.empty()) return usage();
    if (o.side <= 0 || o.side > 4096 || o.patch <= 0 || o.side % o.patch)
        return die("--patch " + std::to_string(o.patch) + " must divide --side " + std::to_string(o.side));
    if (o.codes <= 0 || o.codes > (1 << 24)) return die("--codes must be 1.." + std::to_string(1 << 24));
    std::vector<uint8_t> pool;
    std::string err;
    for (const std::string& f : files) {
        std::vector<uint8_t> data;
        if (!vq_read_file(f.c_str(), &data, &err)) return die(err);
        if (vq_is_idx_or_gz(data.data(), data.size())) {
            VqImages im;
            if (!vq_parse_idx(data.data(), data.size(), f.c_str(), &im, &err)) return die(err);
            size_t n = append_resized(im, o.side, images, &pool);
            fprintf(stderr, "%s: %zu images of %dx%d\n", f.c_str(), n, im.h, im.w);
        } else {
            std::vector<uint8_t> img;
            if (!vq_image_from_memory(data.data(), data.size(), f.c_str(), o.side, &img, &err)) {
                if (err.find("not a PNG/JPEG") != std::string::npos) err = f + ": not an IDX file or a PNG/JPEG image";
                return die(err);
            }
            pool.insert(pool.end(), img.begin(), img.end());
        }
    }
    size_t n = pool.size() / ((size_t)o.side * o.side);
    VqModel m;
    if (!vq_train(pool.data(), n, o, &m, &err)) return die(err);
    if (!vq_model_save(m, out.c_str(), &err)) return die(err);
    fprintf(stderr, "wrote %s (R=%d P=%d K=%d, %d tokens per image)\n", out.c_str(), m.side, m.patch, m.codes,
            vq_tokens(m));
    return 0;
}

static int cmd_encode(int argc, char** argv) {
    if (argc != 2 && argc != 5) return usage();
    VqModel m;
    std::string err;
    if (!vq_model_load(argv[0], &m, &err)) return die(err);
    std::vector<uint8_t> img;
    if (argc == 2) {
        if (!vq_load_image(argv[1], m.side, &img, &err)) return die(err);
    } else {
        if (strcmp(argv[1], "--idx") || strcmp(argv[3], "--index")) return usage();
        long long index = 0;
        if (!parse_count(argv[4], &index))
            return die(std::string("--index: '") + argv[4] + "' is not a non-negative integer");
        VqImages im;
        if (!vq_load_idx(argv[2], &im, &err)) return die(err);
        if (index >= im.n)
            return die(std::string(argv[2]) + ": index " + std::to_string(index) + " out of range (" +
                       std::to_string(im.n) + " images)");
        img.resize((size_t)m.side * m.side);
        vq_resize_u8(&im.pixels[(size_t)index * im.h * im.w], im.w, im.h, img.data(), m.side);
    }
    std::vector<int32_t> codes(vq_tokens(m));
    vq_encode(m, img.data(), codes.data());
    std::string line;
    for (size_t i = 0; i < codes.size(); i++) line += (i ? " " : "") + std::to_string(codes[i]);
    printf("%s\n", line.c_str());
    return 0;
}

static int cmd_decode(int argc, char** argv) {
    if (argc != 2) return usage();
    VqModel m;
    std::string err;
    if (!vq_model_load(argv[0], &m, &err)) return die(err);
    std::vector<uint8_t> text;
    uint8_t buf[4096];
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, stdin)) > 0) text.insert(text.end(), buf, buf + got);
    if (ferror(stdin)) return die("<stdin>: read error");
    std::string s(text.begin(), text.end());
    std::vector<int32_t> codes;
    size_t i = 0;
    while (i < s.size()) {
        if (isspace((unsigned char)s[i])) {
            i++;
            continue;
        }
        size_t j = i;
        while (j < s.size() && !isspace((unsigned char)s[j])) j++;
        std::string tok = s.substr(i, j - i);
        long long v;
        if (!parse_count(tok.c_str(), &v))
            return die("<stdin>: '" + tok.substr(0, 20) + "' is not a code (non-negative integer)");
        if (v >= m.codes) return die("<stdin>: code " + tok.substr(0, 20) + " >= K=" + std::to_string(m.codes));
        codes.push_back((int32_t)v);
        i = j;
    }
    std::vector<uint8_t> img((size_t)m.side * m.side);
    if (!vq_decode(m, codes.data(), codes.size(), img.data(), &err)) return die("<stdin>: " + err);
    if (!vq_write_png(argv[1], img.data(), m.side, m.side, &err)) return die(err);
    return 0;
}

// The model, then the first n images of an IDX file resized to the model's side (psnr, grid).
static bool load_model_and_images(const char* model, const char* idx, long long n, VqModel* m,
                                  std::vector<uint8_t>* imgs, size_t* count, std::string* err) {
    if (!vq_model_load(model, m, err) || !load_idx_resized(idx, m->side, n, imgs, count, err)) return false;
    if (*count == 0) {
        *err = std::string(idx) + ": no images";
        return false;
    }
    return true;
}

static int cmd_psnr(int argc, char** argv) {
    if (argc != 2 && argc != 3) return usage();
    long long n = 0;
    if (argc == 3 && (!parse_count(argv[2], &n) || n == 0))
        return die(std::string("N: '") + argv[2] + "' is not a positive integer");
    VqModel m;
    std::vector<uint8_t> imgs;
    size_t count = 0;
    std::string err;
    if (!load_model_and_images(argv[0], argv[1], n, &m, &imgs, &count, &err)) return die(err);
    printf("%.3f dB mean PSNR over %zu images\n", vq_eval_psnr(m, imgs.data(), count), count);
    return 0;
}

static int cmd_grid(int argc, char** argv) {
    if (argc != 4) return usage();
    long long n = 0;
    if (!parse_count(argv[3], &n) || n == 0 || n > 10000)
        return die(std::string("N: '") + argv[3] + "' is not an integer in 1..10000");
    VqModel m;
    std::vector<uint8_t> imgs;
    size_t count = 0;
    std::string err;
    if (!load_model_and_images(argv[0], argv[1], n, &m, &imgs, &count, &err)) return die(err);
    // Layout: up to 8 pairs per row, each pair = original | reconstruction, pixels scaled 3x,
    // 2 px grey gap inside a pair and 8 px between pairs so the pairing is obvious.
    const int R = m.side, sc = 3, cell = R * sc, per_row = (int)std::min<size_t>(8, count);
    const int rows = (int)((count + per_row - 1) / per_row);
    const int pair_w = 2 * cell + 2, W = per_row * pair_w + (per_row + 1) * 8, H = rows * cell + (rows + 1) * 8;
    std::vector<uint8_t> out((size_t)W * H, 128);
    std::vector<int32_t> codes(vq_tokens(m));
    std::vector<uint8_t> rec((size_t)R * R);
    for (size_t i = 0; i < count; i++) {
        const uint8_t* orig = &imgs[i * R * R];
        vq_encode(m, orig, codes.data());
        vq_decode(m, codes.data(), codes.size(), rec.data(), nullptr);
        int ox = 8 + (int)(i % per_row) * (pair_w + 8), oy = 8 + (int)(i / per_row) * (cell + 8);
        for (int half = 0; half < 2; half++) {
            const uint8_t* src = half ? rec.data() : orig;
            int bx = ox + half * (cell + 2);
            for (int y = 0; y < cell; y++)
                for (int x = 0; x < cell; x++) out[(size_t)(oy + y) * W + bx + x] = src[(y / sc) * R + x / sc];
        }
    }
    if (!vq_write_png(argv[2], out.data(), W, H, &err)) return die(err);
    fprintf(stderr, "wrote %s: %zu pairs (original | reconstruction)\n", argv[2], count);
    return 0;
}

int main(int argc, char** argv) {
    if (argc < 2) return usage();
    std::string cmd = argv[1];
    if (cmd == "train") return cmd_train(argc - 2, argv + 2);
    if (cmd == "encode") return cmd_encode(argc - 2, argv + 2);
    if (cmd == "decode") return cmd_decode(argc - 2, argv + 2);
    if (cmd == "psnr") return cmd_psnr(argc - 2, argv + 2);
    if (cmd == "grid") return cmd_grid(argc - 2, argv + 2);
    return usage();
}
