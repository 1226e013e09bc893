// test_data.cpp — the dataset builder end to end, on its --small setting: it installs the real
// sources (MNIST, Fashion-MNIST, prose, espeak-ng) when missing, trains the three tokenizers and
// writes shards; this test checks every document's structure, the modality ranges and mix, the
// eval sets, caching, and that training batches see all three modalities.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <functional>

#define STB_IMAGE_IMPLEMENTATION
#define STBI_ONLY_PNG  // JPEG is decoded by libjpeg-turbo (tokenizers/vq.h)
#include <stb/stb_image.h>
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>
#define VQ_IMPLEMENTATION
#include "tokenizers/vq.h"
#include "mot.h"

// One folder per checkout: worktrees testing at the same time must not delete each other's build.
static const std::string OUT = [] {
    char cwd[4096];
    const std::string here = getcwd(cwd, sizeof cwd) ? cwd : ".";
    return "/tmp/mot_test_data_" + std::to_string(std::hash<std::string>{}(here) % 1000000);
}();

static int run(const std::string& cmd, std::string* out) {
    FILE* p = popen((cmd + " 2>&1").c_str(), "r");
    REQUIRE(p);
    char buf[4096];
    size_t n;
    out->clear();
    while ((n = fread(buf, 1, sizeof buf, p)) > 0) out->append(buf, n);
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

// Builds once for the whole file (the first test case that needs it).
static void build() {
    static bool done = false;
    if (done) return;
    std::string out;
    int rc = run("rm -rf " + OUT + " && bash data/build.sh " + OUT + " --small --transfusion", &out);
    INFO(out.substr(out.size() > 3000 ? out.size() - 3000 : 0));
    REQUIRE(rc == 0);
    done = true;
}

struct Counts {
    long tok[MOT_N_MOD] = {0, 0, 0};
    long docs = 0, images = 0, speech = 0, errors = 0;
};

// Every document is BOS ... EOS; an image is BOI, exactly `image_tokens` image codes, EOI; speech
// is BOA, one or more speech units, EOA; everything else is text.
static Counts check_docs(const MotShard& s, int image_tokens) {
    Counts c;
    const MotConfig cfg = [&] {
        MotConfig k;
        k.vocab = s.vocab.vocab;
        k.image_begin = s.vocab.image_begin;
        k.speech_begin = s.vocab.speech_begin;
        return k;
    }();
    enum { OUTSIDE, TEXT, IMAGE, SPEECH } state = OUTSIDE;
    int run_len = 0;
    for (uint16_t t : s.tokens) {
        const int m = mot_modality(cfg, t);
        c.tok[m]++;
        switch (state) {
            case OUTSIDE:
                if (t != MOT_BOS) c.errors++;
                state = TEXT;
                c.docs++;
                break;
            case TEXT:
                if (t == MOT_BOI) {
                    state = IMAGE;
                    run_len = 0;
                } else if (t == MOT_BOA) {
                    state = SPEECH;
                    run_len = 0;
                } else if (t == MOT_EOS) state = OUTSIDE;
                else if (m != MOD_TEXT || t < MOT_N_SPECIAL) c.errors++;
                break;
            case IMAGE:
                if (t == MOT_EOI) {
                    c.errors += run_len != image_tokens;
                    c.images++;
                    state = TEXT;
                } else if (m != MOD_IMAGE) c.errors++;
                else run_len++;
                break;
            case SPEECH:
                if (t == MOT_EOA) {
                    c.errors += run_len == 0;
                    c.speech++;
                    state = TEXT;
                } else if (m != MOD_SPEECH) c.errors++;
                else run_len++;
                break;
        }
    }
    c.errors += state != OUTSIDE;  // the shard ends with a whole document
    return c;
}

TEST_CASE("data: the small build's shards hold well-formed interleaved documents in the right ranges") {
    build();
    std::string err;
    MotLoader ld;
    REQUIRE(mot_loader_open(&ld, OUT + "/train_*.bin", 128, 1, &err));
    CHECK(ld.vocab.image_begin == MOT_N_SPECIAL + 2048);
    CHECK(ld.vocab.speech_begin == ld.vocab.image_begin + 512);
    CHECK(ld.vocab.vocab == ld.vocab.speech_begin + 256);
    Counts total;
    for (const MotShard& s : ld.shards) {
        Counts c = check_docs(s, 49);
        INFO(s.path);
        CHECK(c.errors == 0);
        for (int m = 0; m < 3; m++) total.tok[m] += c.tok[m];
        total.docs += c.docs;
        total.images += c.images;
        total.speech += c.speech;
    }
    const double n = total.tok[0] + total.tok[1] + total.tok[2];
    MESSAGE("train: ", total.docs, " docs, ", total.images, " images, ", total.speech, " speech clips; shares text ",
            total.tok[0] / n, " image ", total.tok[1] / n, " speech ", total.tok[2] / n);
    CHECK(total.tok[0] / n == doctest::Approx(0.35).epsilon(0.1));  // the default mix, within 10%
    CHECK(total.tok[1] / n == doctest::Approx(0.40).epsilon(0.1));
    CHECK(total.tok[2] / n == doctest::Approx(0.25).epsilon(0.1));
    // classifier-free guidance needs caption -> image documents without their caption: BOS BOI
    // codes EOI EOS; the manifest counts them (--caption-drop 0.1 of the caption-first ones)
    long bare = 0;
    for (const MotShard& s : ld.shards)
        for (size_t i = 0; i + 52 < s.tokens.size(); i++) {
            if (s.tokens[i] != MOT_BOS) continue;
            bare += s.tokens[i + 1] == MOT_BOI && s.tokens[i + 51] == MOT_EOI && s.tokens[i + 52] == MOT_EOS;
        }
    MESSAGE("caption-less image documents: ", bare);
    CHECK(bare > 0);
    std::string man;
    REQUIRE(run("grep '^train docs' " + OUT + "/manifest.txt", &man) == 0);
    CHECK(man.find("caption dropped " + std::to_string(bare) + ")") != std::string::npos);
    MotShard v;
    REQUIRE(mot_read_shard(OUT + "/val_000.bin", &v, &err));
    CHECK(check_docs(v, 49).errors == 0);
    // "all three modalities present in every batch, on average": 20 training batches of 8 x 128
    MotConfig cfg;
    cfg.vocab = ld.vocab.vocab;
    cfg.image_begin = ld.vocab.image_begin;
    cfg.speech_begin = ld.vocab.speech_begin;
    int with_all = 0;
    MotBatch b;
    for (int i = 0; i < 20; i++) {
        mot_loader_next(&ld, cfg, 8, 128, &b);
        with_all += b.group[1] > b.group[0] && b.group[2] > b.group[1] && b.group[3] > b.group[2];
    }
    CHECK(with_all == 20);
}

TEST_CASE("data: eval sets, classes and tokenizers are there and consistent") {
    build();
    std::string err, out;
    for (const char* name : {"eval_image", "eval_speech"}) {
        MotShard s;
        REQUIRE(mot_read_shard(OUT + "/" + name + ".bin", &s, &err));
        Counts c = check_docs(s, 49);
        CHECK(c.errors == 0);
        REQUIRE(run(std::string("wc -l < ") + OUT + "/" + name + ".txt", &out) == 0);
        CHECK(atol(out.c_str()) == c.docs);  // one label per document
    }
    // captions.txt: every training caption with its class (460 captions over 20 classes), so the
    // trainer can name the class of a generated caption
    REQUIRE(run("cut -f1 " + OUT + "/captions.txt | sort -n | uniq | wc -l; wc -l < " + OUT +
                    "/captions.txt; grep -c -P "
                    "'^7\\ta handwritten seven$' " +
                    OUT + "/captions.txt",
                &out) == 0);
    CHECK(out == "20\n460\n1\n");
    REQUIRE(run("cut -f3 " + OUT + "/classes.txt", &out) == 0);
    CHECK(std::count(out.begin(), out.end(), '\n') == 20);
    CHECK(out.find("a handwritten seven\n") != std::string::npos);
    CHECK(out.find("a photo of an ankle boot\n") != std::string::npos);
    for (const char* f : {"text.bpe", "image.vq", "speech.sp", "manifest.txt"}) {
        struct stat sb;
        INFO(f);
        CHECK(stat((OUT + "/" + f).c_str(), &sb) == 0);
    }
}

TEST_CASE("data: the Transfusion form holds the same documents, with each image's pixels in place of its codes") {
    build();
    std::string err;
    VqModel vq;
    REQUIRE_MESSAGE(vq_model_load((OUT + "/image.vq").c_str(), &vq, &err), err);
    for (const std::string name : {"train_000.bin", "val_000.bin", "eval_image.bin"}) {
        INFO(name);
        MotShard tok, tf;
        REQUIRE_MESSAGE(mot_read_shard(OUT + "/" + name, &tok, &err), err);
        REQUIRE_MESSAGE(mot_read_shard(OUT + "/tf_" + name, &tf, &err), err);
        CHECK_FALSE(tok.pixels_version);
        CHECK(tf.pixels_version);
        REQUIRE(tf.tokens.size() == tok.tokens.size());
        long differ = 0, images = 0, codes_match = 0, codes = 0;
        for (size_t i = 0; i < tok.tokens.size(); i++) {
            const bool img = tok.tokens[i] >= tok.vocab.image_begin && tok.tokens[i] < tok.vocab.speech_begin;
            differ += img ? tf.tokens[i] != tf.vocab.image_begin : tf.tokens[i] != tok.tokens[i];
            if (tok.tokens[i] == MOT_BOI) images++;
        }
        CHECK(differ == 0);
        REQUIRE((long)tf.image_at.size() == images);
        // the pixels are the image the codes came from: encoding them again gives the same codes
        std::vector<int32_t> c(49);
        for (size_t k = 0; k < tf.image_at.size(); k += 7) {
            vq_encode(vq, tf.pixels.data() + k * MOT_IMAGE_PIXELS, c.data());
            for (int j = 0; j < 49; j++) {
                codes++;
                codes_match += c[j] + tok.vocab.image_begin == tok.tokens[tf.image_at[k] + j];
            }
        }
        CHECK(codes > 0);
        CHECK(codes_match == codes);
    }
    // the loader fills Transfusion batches from them; a token-setting model is told it has the wrong form
    MotLoader ld;
    REQUIRE(mot_loader_open(&ld, OUT + "/tf_train_*.bin", 128, 1, &err));
    MotConfig cfg;
    cfg.vocab = ld.vocab.vocab;
    cfg.image_begin = ld.vocab.image_begin;
    cfg.speech_begin = ld.vocab.speech_begin;
    CHECK(mot_loader_setting_error(ld, cfg).find("the model is in the token setting") != std::string::npos);
    cfg.setting = MOT_SETTING_TRANSFUSION;
    CHECK(mot_loader_setting_error(ld, cfg) == "");
    MotBatch b;
    mot_loader_next(&ld, cfg, 8, 128, &b);
    CHECK(b.xin.size() == 8u * 128 * MOT_PATCH);
}

TEST_CASE("data: the Transfusion setting trains on the tf shards, samples an image by DDIM and captions it") {
    build();
    std::string out;
    int rc = run("./mot --setting transfusion --data '" + OUT + "/tf_train_*.bin' --val '" + OUT +
                     "/tf_val_*.bin' --out " + OUT +
                     "/tfrun --overwrite --layers 1 --dim 32 --heads 2 --seq 64 --batch 4 --steps 10 --log-every 10"
                     " --eval-items 5 --eval-gen 1 --best-of 1 --threads 2",
                 &out);
    INFO(out);
    REQUIRE(rc == 0);
    CHECK(out.find("Transfusion (images by diffusion)") != std::string::npos);
    CHECK(out.find("eval    10 | image->caption") != std::string::npos);
    CHECK(out.find("caption->image") != std::string::npos);
    struct stat sb;
    CHECK(stat((OUT + "/tfrun/samples/image_07.png").c_str(), &sb) == 0);
    const std::string ck = OUT + "/tfrun/model.ckpt";
    rc = run("./mot sample --ckpt " + ck + " --tokenizers " + OUT +
                 " --task image --prompt 'a handwritten seven' --steps 5"
                 " --best-of 1 --output " +
                 OUT + "/tf7.png",
             &out);
    REQUIRE(rc == 0);
    CHECK(out.find("DDIM 5 steps") != std::string::npos);
    int w = 0, h = 0, n = 0;
    unsigned char* img = stbi_load((OUT + "/tf7.png").c_str(), &w, &h, &n, 1);
    REQUIRE(img);
    CHECK(w == 28);
    CHECK(h == 28);
    stbi_image_free(img);
    rc = run("./mot sample --ckpt " + ck + " --tokenizers " + OUT + " --task caption --input " + OUT +
                 "/tf7.png --max-tokens 5",
             &out);
    CHECK(rc == 0);
    CHECK(std::count(out.begin(), out.end(), '\n') == 1);
    rc = run("./mot sample --ckpt " + ck + " --tokenizers " + OUT + " --task image --prompt x --steps 0 --output " +
                 OUT + "/x.png",
             &out);
    CHECK(rc == 2);
    CHECK(out.find("--steps") != std::string::npos);
}

TEST_CASE("data: a second run is cached and changes nothing; a different option is refused") {
    build();
    std::string out;
    struct stat before, after;
    REQUIRE(stat((OUT + "/train_000.bin").c_str(), &before) == 0);
    REQUIRE(run("bash data/build.sh " + OUT + " --small --transfusion", &out) == 0);
    CHECK(out.find("nothing to do") != std::string::npos);
    REQUIRE(stat((OUT + "/train_000.bin").c_str(), &after) == 0);
    CHECK(before.st_mtime == after.st_mtime);
    CHECK(run("bash data/build.sh " + OUT + " --small --seed 2", &out) != 0);
    CHECK(out.find("--force") != std::string::npos);
    CHECK(run("bash data/build.sh /proc/nope --small", &out) != 0);
    CHECK(out.find("error") != std::string::npos);
}

TEST_CASE("data: the trainer trains on the built shards and evaluates downstream tasks") {
    build();
    std::string out;
    int rc = run("./mot --data '" + OUT + "/train_*.bin' --val '" + OUT + "/val_*.bin' --out " + OUT +
                     "/run --layers 1 --dim 32 --heads 2 --seq 64 --batch 4 --steps 20 --log-every 10"
                     " --eval-items 10 --eval-gen 1 --threads 2",
                 &out);
    INFO(out);
    REQUIRE(rc == 0);
    CHECK(out.find("tokenizers: " + OUT + " (20 classes") != std::string::npos);
    CHECK(out.find("eval    20 | image->caption") != std::string::npos);
    CHECK(out.find(" generated (10)") != std::string::npos);  // the class named by generated captions
    CHECK(out.find("caption->image") != std::string::npos);
    struct stat sb;
    CHECK(stat((OUT + "/run/samples/image_07.png").c_str(), &sb) == 0);
    CHECK(stat((OUT + "/run/eval.csv").c_str(), &sb) == 0);
    // the sample command: caption -> image, and an image -> caption on it
    rc = run("./mot sample --ckpt " + OUT + "/run/model.ckpt --tokenizers " + OUT +
                 " --task image --prompt 'a handwritten seven' --output " + OUT + "/seven.png",
             &out);
    CHECK(rc == 0);
    rc = run("./mot sample --ckpt " + OUT + "/run/model.ckpt --tokenizers " + OUT + " --task caption --input " + OUT +
                 "/seven.png --max-tokens 5",
             &out);
    CHECK(rc == 0);
    INFO(out);
    CHECK(out.size() > 1);  // a caption: at least one text token before EOS, never an empty line
    CHECK(out.back() == '\n');
    CHECK(std::count(out.begin(), out.end(), '\n') == 1);
    // guidance: --cfg 0 keeps only the unconditional logits (BOS BOI ...), so the caption no
    // longer matters (with one sample: best of N picks by the caption); at --cfg 1 (no guidance)
    // and the default it does
    auto image = [&](const std::string& prompt, const std::string& cfg, const std::string& file) {
        std::string o;
        REQUIRE(run("./mot sample --ckpt " + OUT + "/run/model.ckpt --tokenizers " + OUT + " --task image --prompt '" +
                        prompt + "' " + cfg + " --output " + OUT + "/" + file,
                    &o) == 0);
        FILE* f = fopen((OUT + "/" + file).c_str(), "rb");
        REQUIRE(f);
        std::string bytes;
        char buf[4096];
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, f)) > 0) bytes.append(buf, n);
        fclose(f);
        return bytes;
    };
    CHECK(image("a handwritten seven", "--cfg 0 --best-of 1", "u7.png") ==
          image("a photo of a dress", "--cfg 0 --best-of 1", "ud.png"));
    CHECK(image("a handwritten seven", "--cfg 1", "c7.png") != image("a photo of a dress", "--cfg 1", "cd.png"));
    CHECK(image("a handwritten seven", "", "g7.png") != image("a handwritten seven", "--cfg 1", "c7b.png"));
    rc = run("./mot sample --ckpt " + OUT + "/run/model.ckpt --tokenizers " + OUT +
                 " --task caption --input /nonexistent.png",
             &out);
    CHECK(rc == 1);
    CHECK(out.find("/nonexistent.png") != std::string::npos);
    // a prompt that fills the context (T=64) leaves nothing to generate: an error, not silence
    std::string longp;
    for (int i = 0; i < 40; i++) longp += "and God said ";
    rc = run(
        "./mot sample --ckpt " + OUT + "/run/model.ckpt --tokenizers " + OUT + " --task text --prompt '" + longp + "'",
        &out);
    INFO(out);
    CHECK(rc == 2);
    CHECK(std::count(out.begin(), out.end(), '\n') == 1);
    CHECK(out.find("--prompt is ") != std::string::npos);
    CHECK(out.find("too long for the model's context (max_seq 64)") != std::string::npos);
    // the JPEG whose Huffman counts overflow stb's tables (see test_vq): one line, exit 1
    std::string dht = "\xFF\xD8\xFF\xC4\x00\x13" + std::string(1, '\0') + std::string(16, '\xFF') + "\xFF\xD9";
    FILE* f = fopen((OUT + "/crafted.jpg").c_str(), "wb");
    REQUIRE(f);
    fwrite(dht.data(), 1, dht.size(), f);
    fclose(f);
    rc = run("./mot sample --ckpt " + OUT + "/run/model.ckpt --tokenizers " + OUT + " --task caption --input " + OUT +
                 "/crafted.jpg",
             &out);
    CHECK(rc == 1);
    CHECK(std::count(out.begin(), out.end(), '\n') == 1);
    CHECK(out.find("crafted.jpg: corrupt JPEG image") != std::string::npos);
}

static void write_file(const std::string& path, const std::string& bytes) {
    FILE* f = fopen(path.c_str(), "wb");
    REQUIRE(f);
    fwrite(bytes.data(), 1, bytes.size(), f);
    fclose(f);
}

// A RIFF/WAVE header with `bits` bits per sample and n bytes of (silent) data.
static std::string wav_bytes(int bits, int n) {
    auto u32 = [](uint32_t v) { return std::string((const char*)&v, 4); };
    auto u16 = [](uint16_t v) { return std::string((const char*)&v, 2); };
    return "RIFF" + u32(36 + n) + "WAVEfmt " + u32(16) + u16(1) + u16(1) + u32(16000) + u32(16000 * bits / 8) +
           u16(bits / 8) + u16(bits) + "data" + u32(n) + std::string(n, bits == 8 ? '\x80' : '\0');
}

TEST_CASE("tokenizer tools: bad inputs get one line naming the file and a non-zero exit") {
    build();
    std::string out;
    const std::string d = OUT + "/bad";
    REQUIRE(run("mkdir -p " + d, &out) == 0);
    write_file(d + "/corrupt.png", std::string("\x89PNG\r\n\x1a\n", 8) + "this is not a png");
    write_file(d + "/empty.png", "");
    write_file(d + "/header.wav", "RIFX this is not a wave file at all........................");
    write_file(d + "/eight.wav", wav_bytes(8, 1600));
    write_file(d + "/empty.wav", "");
    write_file(d + "/ids.txt", "1 2 99999\n");
    struct Case {
        std::string cmd, file, words;
    };
    const std::vector<Case> cases = {
        {"tokenizers/vq encode " + OUT + "/image.vq " + d + "/corrupt.png", "corrupt.png", ""},
        {"tokenizers/vq encode " + OUT + "/image.vq " + d + "/empty.png", "empty.png", "empty"},
        {"tokenizers/vq encode " + OUT + "/image.vq " + d + "/missing.png", "missing.png", ""},
        {"tokenizers/vq encode " + d + "/corrupt.png " + d + "/corrupt.png", "corrupt.png", ""},  // not a model
        {"tokenizers/speech encode " + OUT + "/speech.sp " + d + "/header.wav", "header.wav", "RIFF"},
        {"tokenizers/speech encode " + OUT + "/speech.sp " + d + "/eight.wav", "eight.wav", "8-bit"},
        {"tokenizers/speech encode " + OUT + "/speech.sp " + d + "/empty.wav", "empty.wav", ""},
        {"tokenizers/bpe decode " + OUT + "/text.bpe < " + d + "/ids.txt", "99999", ""},
    };
    for (const Case& c : cases) {
        const int rc = run("./" + c.cmd, &out);
        INFO(c.cmd, "\n", out);
        CHECK(rc == 1);
        CHECK(std::count(out.begin(), out.end(), '\n') == 1);
        CHECK(out.find(c.file) != std::string::npos);
        if (!c.words.empty()) CHECK(out.find(c.words) != std::string::npos);
    }
    for (const char* tool : {"bpe", "vq", "speech"}) {  // no arguments: usage, exit 2
        INFO(tool);
        CHECK(run(std::string("./tokenizers/") + tool, &out) == 2);
    }
}
