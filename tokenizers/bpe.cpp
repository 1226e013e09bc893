// bpe - command line tool for the byte-level BPE tokenizer in bpe.h.
//
//   bpe train OUT.bpe VOCAB_SIZE FILE...        train on the files, write the model
//   bpe encode [--bin] MODEL.bpe < text > ids   ids as decimal text, space separated
//                                               (--bin: uint16 little-endian)
//   bpe decode [--bin] MODEL.bpe < ids > text   inverse of encode
//   bpe info MODEL.bpe                          vocab size and the last merges
//
// Ids are the tokenizer's local ids (0..255 bytes, 256.. merges), not the unified
// model vocabulary. Errors print one line and exit 1; bad usage exits 2.

#define BPE_IMPLEMENTATION
#include "tokenizers/bpe.h"

#include <chrono>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static int usage() {
    fprintf(stderr,
            "usage: bpe train OUT.bpe VOCAB_SIZE FILE...\n"
            "       bpe encode [--bin] MODEL.bpe < text > tokens\n"
            "       bpe decode [--bin] MODEL.bpe < tokens > text\n"
            "       bpe info MODEL.bpe\n"
            "tokens are space separated decimal ids, or with --bin uint16 little-endian\n");
    return 2;
}

static int fail(const std::string& msg) {
    fprintf(stderr, "bpe: %s\n", msg.c_str());
    return 1;
}

static bool write_stdout(const void* p, size_t n) { return fwrite(p, 1, n, stdout) == n; }

static double now_s() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

static int cmd_train(int argc, char** argv) {
    if (argc < 5) return usage();
    char* end = nullptr;
    errno = 0;
    long v = strtol(argv[3], &end, 10);
    if (errno || end == argv[3] || *end || v < 256 || v > (1 << 24))
        return fail(std::string("bad VOCAB_SIZE '") + argv[3] + "' (need an integer 256..16777216)");
    std::vector<std::string> files(argv + 4, argv + argc);
    Bpe b;
    std::string err;
    double t0 = now_s();
    if (!bpe_train_files(&b, files, (int)v, true, &err)) return fail(err);
    if (!bpe_save(b, argv[2], &err)) return fail(err);
    fprintf(stderr, "bpe: wrote %s: %d tokens (%zu merges) in %.2f s\n", argv[2], bpe_vocab_size(b), b.merges.size(),
            now_s() - t0);
    return 0;
}

static int cmd_encode(const char* model, bool bin) {
    Bpe b;
    std::string err, text;
    if (!bpe_load(&b, model, &err)) return fail(err);
    if (bin && bpe_vocab_size(b) > 65536)
        return fail(std::string(model) + ": vocab " + std::to_string(bpe_vocab_size(b)) +
                    " does not fit --bin uint16 ids");
    if (!bpe_read_file("-", &text, &err)) return fail(err);
    double t0 = now_s();
    std::vector<int> ids;
    bpe_encode(&b, text.data(), text.size(), &ids);
    double dt = now_s() - t0;
    std::string out;
    if (bin) {
        out.reserve(ids.size() * 2);
        for (int id : ids) {
            out.push_back((char)(id & 0xff));
            out.push_back((char)(id >> 8 & 0xff));
        }
    } else {
        out.reserve(ids.size() * 5);
        char buf[16];
        for (size_t i = 0; i < ids.size(); i++) {
            int n = snprintf(buf, sizeof buf, i ? " %d" : "%d", ids[i]);
            out.append(buf, n);
        }
        if (!ids.empty()) out.push_back('\n');
    }
    if (!write_stdout(out.data(), out.size()) || fflush(stdout) != 0)
        return fail(std::string("stdout: write failed: ") + strerror(errno));
    fprintf(stderr, "bpe: %zu bytes -> %zu tokens (%.2f bytes/token), %.1f MB/s\n", text.size(), ids.size(),
            ids.empty() ? 0.0 : (double)text.size() / ids.size(), text.size() / 1e6 / (dt > 0 ? dt : 1e-9));
    return 0;
}

static int cmd_decode(const char* model, bool bin) {
    Bpe b;
    std::string err, in;
    if (!bpe_load(&b, model, &err)) return fail(err);
    if (!bpe_read_file("-", &in, &err)) return fail(err);
    std::vector<int> ids;
    if (bin) {
        if (in.size() % 2) return fail("stdin: odd number of bytes (" + std::to_string(in.size()) + ") for uint16 ids");
        ids.resize(in.size() / 2);
        for (size_t i = 0; i < ids.size(); i++) ids[i] = (uint8_t)in[2 * i] | (uint8_t)in[2 * i + 1] << 8;
    } else {
        const char* p = in.c_str();  // NUL terminated
        while (true) {
            while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r') p++;
            if (!*p) break;
            const char* q = p;
            while (*q && *q != ' ' && *q != '\n' && *q != '\t' && *q != '\r') q++;
            std::string word(p, q);
            char* end = nullptr;
            errno = 0;
            long long v = strtoll(word.c_str(), &end, 10);
            if (word.empty() || *end || errno || word[0] == '+')
                return fail("stdin: token " + std::to_string(ids.size()) + " is not an id: '" + word.substr(0, 40) +
                            "'");
            if (v < 0 || v >= bpe_vocab_size(b))
                return fail("stdin: bad token id " + word + " at position " + std::to_string(ids.size()) +
                            " (vocab size " + std::to_string(bpe_vocab_size(b)) + ")");
            ids.push_back((int)v);
            p = q;
        }
    }
    std::string out;
    if (!bpe_decode(b, ids.data(), ids.size(), &out, &err)) return fail("stdin: " + err);
    if (!write_stdout(out.data(), out.size()) || fflush(stdout) != 0)
        return fail(std::string("stdout: write failed: ") + strerror(errno));
    return 0;
}

static std::string escape(const std::string& s) {
    std::string r;
    for (unsigned char c : s) {
        if (c == '\n') r += "\\n";
        else if (c == '\t') r += "\\t";
        else if (c == '\\') r += "\\\\";
        else if (c < 32 || c == 127) {
            char buf[8];
            snprintf(buf, sizeof buf, "\\x%02x", c);
            r += buf;
        } else r.push_back((char)c);
    }
    return r;
}

static int cmd_info(const char* model) {
    Bpe b;
    std::string err;
    if (!bpe_load(&b, model, &err)) return fail(err);
    printf("%s: %d tokens (256 bytes + %zu merges)\n", model, bpe_vocab_size(b), b.merges.size());
    size_t n = b.merges.size(), from = n > 20 ? n - 20 : 0;
    for (size_t i = from; i < n; i++)
        printf("%6zu = %u + %u  \"%s\"\n", 256 + i, b.merges[i].first, b.merges[i].second,
               escape(b.bytes[256 + i]).c_str());
    return 0;
}

int main(int argc, char** argv) {
    if (argc < 2) return usage();
    std::string cmd = argv[1];
    if (cmd == "train") return cmd_train(argc, argv);
    if (cmd == "info") return argc == 3 ? cmd_info(argv[2]) : usage();
    if (cmd == "encode" || cmd == "decode") {
        bool bin = false;
        const char* model = nullptr;
        for (int i = 2; i < argc; i++) {
            if (strcmp(argv[i], "--bin") == 0) bin = true;
            else if (!model && argv[i][0] != '-') model = argv[i];
            else return usage();
        }
        if (!model) return usage();
        return cmd == "encode" ? cmd_encode(model, bin) : cmd_decode(model, bin);
    }
    return usage();
}
