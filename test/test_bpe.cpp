// Tests for tokenizers/bpe.h. Standalone: generates its own corpus, writes model files
// under /tmp and removes them.
//   g++ -std=c++17 -O2 -march=native -fopenmp -Wall -Wextra -I. test/test_bpe.cpp -o test_bpe

#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#define BPE_IMPLEMENTATION
#include "tokenizers/bpe.h"

#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

// ---- helpers ---------------------------------------------------------------------------

static std::string make_corpus(size_t min_bytes, uint32_t seed) {
    static const char* sentences[] = {
        "The quick brown fox jumps over the lazy dog.",
        "It was the best of times, it was the worst of times.",
        "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
        "In 1969, 3 astronauts flew 384400 km to the Moon and back.",
        "Don't count your chickens before they're hatched; they'll surprise you.",
        "A journey of a thousand miles begins with a single step!",
        "Why did the chicken cross the road? To get to the other side.",
        "Reading, writing and arithmetic: the three R's of old-fashioned schooling.",
        "The rain in Spain stays mainly in the plain, or so I've heard.",
        "All happy families are alike; each unhappy family is unhappy in its own way.",
        "We'd rather be sailing (weather permitting) than sitting in traffic.",
        "Caf\xc3\xa9 na\xc3\xafve r\xc3\xa9sum\xc3\xa9: some words carry accents in UTF-8.",
    };
    const int ns = sizeof sentences / sizeof *sentences;
    std::mt19937 rng(seed);
    std::string s;
    while (s.size() < min_bytes) {
        s += sentences[rng() % ns];
        s += (rng() % 4 == 0) ? "\n\n" : (rng() % 2 ? " " : "\n");
    }
    return s;
}

static std::string random_bytes(std::mt19937& rng, size_t n) {
    std::string s(n, '\0');
    int mode = rng() % 4;
    for (size_t i = 0; i < n; i++) {
        uint32_t r = rng();
        switch (mode) {
            case 0: s[i] = (char)(r & 0xff); break;               // any byte
            case 1: s[i] = " etaoinshrdlu\n'.,0"[r % 18]; break;  // text-like
            case 2:
                s[i] = (char)((r % 3 == 0)   ? 0x80 + (r >> 8) % 64  // UTF-8-ish, often
                              : (r % 3 == 1) ? 0xc0 + (r >> 8) % 32  // invalid
                                             : 'a' + (r >> 8) % 26);
                break;
            default: s[i] = (r % 5 == 0) ? '\0' : " \t\r\nab"[r % 6]; break;  // NULs, spaces
        }
    }
    return s;
}

// Independent reference: pre-tokenise, then apply the merges in training order to each
// word, replacing every occurrence left to right.
static std::vector<int> reference_encode(const Bpe& b, const std::string& text) {
    std::vector<int> out;
    const uint8_t* p = (const uint8_t*)text.data();
    for (size_t i = 0; i < text.size();) {
        size_t e = bpe_word_end(p, text.size(), i);
        std::vector<int> w(p + i, p + e);
        for (size_t m = 0; m < b.merges.size() && w.size() > 1; m++) {
            std::vector<int> nw;
            for (size_t j = 0; j < w.size();) {
                if (j + 1 < w.size() && w[j] == (int)b.merges[m].first && w[j + 1] == (int)b.merges[m].second) {
                    nw.push_back(256 + (int)m);
                    j += 2;
                } else {
                    nw.push_back(w[j++]);
                }
            }
            w.swap(nw);
        }
        out.insert(out.end(), w.begin(), w.end());
        i = e;
    }
    return out;
}

static std::vector<std::string> words_of(const std::string& s) {
    std::vector<std::string> w;
    const uint8_t* p = (const uint8_t*)s.data();
    for (size_t i = 0; i < s.size();) {
        size_t e = bpe_word_end(p, s.size(), i);
        w.push_back(s.substr(i, e - i));
        i = e;
    }
    return w;
}

static std::string tmp_path(const char* name) { return "/tmp/test_bpe_" + std::to_string(getpid()) + "_" + name; }

// Removes its files when the test case ends, even if a REQUIRE failed.
struct TmpFiles {
    std::vector<std::string> paths;
    ~TmpFiles() {
        for (const std::string& p : paths) remove(p.c_str());
    }
};

static void write_file(const std::string& path, const std::string& data) {
    FILE* f = fopen(path.c_str(), "wb");
    REQUIRE(f);
    REQUIRE(fwrite(data.data(), 1, data.size(), f) == data.size());
    REQUIRE(fclose(f) == 0);
}

static std::string u32(uint32_t v) {
    std::string s;
    for (int k = 0; k < 4; k++) s.push_back((char)(v >> (8 * k) & 0xff));
    return s;
}

static std::string model_bytes(const char* magic, uint32_t version, uint32_t n,
                               const std::vector<std::pair<uint32_t, uint32_t>>& merges) {
    std::string s(magic, 4);
    s += u32(version) + u32(n);
    for (auto& m : merges) s += u32(m.first) + u32(m.second);
    return s;
}

static bool check_encode_ok(Bpe* b, const std::string& s) {
    std::vector<int> ids;
    bpe_encode(b, s.data(), s.size(), &ids);
    for (int id : ids)
        if (id < 0 || id >= bpe_vocab_size(*b)) return false;
    std::string back, err;
    if (!bpe_decode(*b, ids.data(), ids.size(), &back, &err)) return false;
    return back == s;
}

// One trained tokenizer shared by the tests (training takes milliseconds, but sharing
// keeps the checks about the same model).
static const Bpe& trained() {
    static Bpe b;
    static bool done = false;
    if (!done) {
        std::string corpus = make_corpus(20000, 1), err;
        BpeWordCounts wc;
        bpe_count_words(&wc, corpus.data(), corpus.size());
        bool ok = bpe_train(&b, wc, 512, false, &err);
        REQUIRE_MESSAGE(ok, err);
        done = true;
    }
    return b;
}

// ---- pre-tokenisation ------------------------------------------------------------------

TEST_CASE("pre-tokeniser splits GPT-2 style") {
    typedef std::vector<std::string> V;
    CHECK(words_of("Hello world") == V{"Hello", " world"});
    CHECK(words_of("don't stop") == V{"don", "'t", " stop"});
    CHECK(words_of("they're we'll I've") == V{"they", "'re", " we", "'ll", " I", "'ve"});
    CHECK(words_of("a  b") == V{"a", " ", " b"});
    CHECK(words_of("x\n\ny") == V{"x", "\n\n", "y"});
    CHECK(words_of("end  ") == V{"end", "  "});
    CHECK(words_of("abc123def") == V{"abc", "123", "def"});
    CHECK(words_of("Wait... what?!") == V{"Wait", "...", " what", "?!"});
    CHECK(words_of(" 42 apples") == V{" 42", " apples"});
    CHECK(words_of("caf\xc3\xa9 ok") == V{"caf\xc3\xa9", " ok"});
    CHECK(words_of(std::string("a\0b", 3)) == V{"a", std::string(1, '\0'), "b"});
    CHECK(words_of("").empty());
    // runs are cut at BPE_MAX_WORD bytes
    std::string longrun(1000, 'x');
    for (const std::string& w : words_of(longrun)) CHECK(w.size() <= BPE_MAX_WORD);
}

TEST_CASE("pre-tokeniser covers random input exactly") {
    std::mt19937 rng(7);
    for (int t = 0; t < 2000; t++) {
        std::string s = random_bytes(rng, rng() % 600);
        std::string joined;
        for (const std::string& w : words_of(s)) {
            REQUIRE(!w.empty());
            REQUIRE(w.size() <= BPE_MAX_WORD);
            joined += w;
        }
        REQUIRE(joined == s);
    }
}

// ---- training --------------------------------------------------------------------------

TEST_CASE("training reaches the target vocab and compresses") {
    const Bpe& b = trained();
    CHECK(bpe_vocab_size(b) == 512);
    CHECK(b.merges.size() == 256);
    for (size_t i = 0; i < b.merges.size(); i++) {
        CHECK(b.merges[i].first < 256 + i);
        CHECK(b.merges[i].second < 256 + i);
    }
    // frequent words of the corpus became single tokens
    Bpe bb = b;
    std::vector<int> ids;
    std::string w = " the";
    bpe_encode(&bb, w.data(), w.size(), &ids);
    CHECK(ids.size() == 1);

    std::string corpus = make_corpus(20000, 1);
    ids.clear();
    bpe_encode(&bb, corpus.data(), corpus.size(), &ids);
    MESSAGE("corpus " << corpus.size() << " bytes -> " << ids.size() << " tokens");
    CHECK(ids.size() * 3 < corpus.size());  // > 3 bytes per token on its own corpus
}

TEST_CASE("merged tokens never cross a word boundary") {
    const Bpe& b = trained();
    for (int t = 256; t < bpe_vocab_size(b); t++) {
        const std::string& s = b.bytes[t];
        CHECK_MESSAGE(bpe_word_end((const uint8_t*)s.data(), s.size(), 0) == s.size(),
                      "token " << t << " '" << s << "'");
    }
}

// Slow reference trainer: recount every pair of every word before each merge.
static std::vector<std::pair<uint32_t, uint32_t>> reference_train(const BpeWordCounts& wc, int vocab) {
    std::vector<std::vector<int>> words;
    std::vector<uint64_t> freq;
    for (auto& kv : wc.counts) {
        words.emplace_back();
        for (unsigned char c : kv.first) words.back().push_back(c);
        freq.push_back(kv.second);
    }
    std::vector<std::pair<uint32_t, uint32_t>> merges;
    for (int id = 256; id < vocab; id++) {
        std::map<std::pair<int, int>, uint64_t> cnt;
        for (size_t k = 0; k < words.size(); k++)
            for (size_t j = 0; j + 1 < words[k].size(); j++) cnt[{words[k][j], words[k][j + 1]}] += freq[k];
        if (cnt.empty()) break;
        auto best = cnt.begin();  // highest count, first (smallest) pair on ties
        for (auto it = cnt.begin(); it != cnt.end(); ++it)
            if (it->second > best->second) best = it;
        int a = best->first.first, c = best->first.second;
        merges.push_back({(uint32_t)a, (uint32_t)c});
        for (auto& w : words) {
            std::vector<int> nw;
            for (size_t j = 0; j < w.size();) {
                if (j + 1 < w.size() && w[j] == a && w[j + 1] == c) {
                    nw.push_back(id);
                    j += 2;
                } else {
                    nw.push_back(w[j++]);
                }
            }
            w.swap(nw);
        }
    }
    return merges;
}

TEST_CASE("incremental training equals the slow reference trainer") {
    std::mt19937 rng(5);
    for (int t = 0; t < 4; t++) {
        // English, then byte soups with many overlapping pairs ("aaaa", "abab")
        std::string text = t == 0 ? make_corpus(6000, 17) : random_bytes(rng, 6000);
        if (t == 3) {
            text.clear();
            for (int i = 0; i < 3000; i++) text.push_back("aab "[rng() % 4]);
        }
        BpeWordCounts wc;
        bpe_count_words(&wc, text.data(), text.size());
        Bpe b;
        std::string err;
        REQUIRE(bpe_train(&b, wc, 450, false, &err));
        CHECK(b.merges == reference_train(wc, 450));
    }
}

TEST_CASE("training is deterministic") {
    std::string corpus = make_corpus(8000, 3), err;
    BpeWordCounts wc;
    bpe_count_words(&wc, corpus.data(), corpus.size());
    Bpe a, b;
    REQUIRE(bpe_train(&a, wc, 400, false, &err));
    REQUIRE(bpe_train(&b, wc, 400, false, &err));
    CHECK(a.merges == b.merges);
}

TEST_CASE("training edge cases") {
    std::string err;
    BpeWordCounts wc;
    std::string tiny = "ab ab ab";
    bpe_count_words(&wc, tiny.data(), tiny.size());
    Bpe b;
    CHECK_FALSE(bpe_train(&b, wc, 255, false, &err));
    CHECK(err.find("255") != std::string::npos);
    REQUIRE(bpe_train(&b, wc, 256, false, &err));  // bytes only
    CHECK(bpe_vocab_size(b) == 256);
    CHECK(check_encode_ok(&b, "hello"));
    // only "ab", " ab" -> " a"+"b" or similar: stops early when no pair is left
    REQUIRE(bpe_train(&b, wc, 1000, false, &err));
    CHECK(bpe_vocab_size(b) < 1000);
    CHECK(bpe_vocab_size(b) > 256);
    std::vector<int> ids;
    bpe_encode(&b, tiny.data(), tiny.size(), &ids);
    CHECK(ids.size() == 3);  // "ab" " ab" " ab"
    // empty corpus
    BpeWordCounts empty;
    REQUIRE(bpe_train(&b, empty, 300, false, &err));
    CHECK(bpe_vocab_size(b) == 256);
}

// ---- encode / decode -------------------------------------------------------------------

TEST_CASE("encode matches the reference merge order") {
    Bpe b = trained();
    std::string corpus = make_corpus(3000, 9);
    std::vector<int> ids;
    bpe_encode(&b, corpus.data(), corpus.size(), &ids);
    CHECK(ids == reference_encode(b, corpus));
    // long words take the heap path (> 32 bytes) and the cap (> BPE_MAX_WORD)
    std::mt19937 rng(11);
    for (int t = 0; t < 300; t++) {
        std::string s;
        size_t n = 20 + rng() % 400;
        for (size_t i = 0; i < n; i++) s.push_back("thesaoinl"[rng() % 9]);
        if (t % 3 == 0) s = " " + s;
        ids.clear();
        bpe_encode(&b, s.data(), s.size(), &ids);
        REQUIRE(ids == reference_encode(b, s));
        ids.clear();  // the uncached word encoder agrees too
        if (s.size() <= BPE_MAX_WORD) {
            bpe_encode_word(b, (const uint8_t*)s.data(), s.size(), &ids);
            REQUIRE(ids == reference_encode(b, s));
        }
    }
    for (int t = 0; t < 300; t++) {
        std::string s = random_bytes(rng, rng() % 300);
        ids.clear();
        bpe_encode(&b, s.data(), s.size(), &ids);
        REQUIRE(ids == reference_encode(b, s));
    }
}

TEST_CASE("exact round trip on thousands of random byte strings") {
    Bpe b = trained();
    std::mt19937 rng(42);
    int n_ok = 0, n = 5000;
    for (int t = 0; t < n; t++) {
        std::string s = random_bytes(rng, t < 10 ? t : rng() % (t % 50 == 0 ? 5000 : 200));
        if (check_encode_ok(&b, s)) n_ok++;
        else FAIL_CHECK("round trip failed for string " << t << " of " << s.size() << " bytes");
    }
    CHECK(n_ok == n);
    // the empty string and every single byte
    std::vector<int> ids;
    bpe_encode(&b, "", 0, &ids);
    CHECK(ids.empty());
    std::string out, err;
    CHECK(bpe_decode(b, ids.data(), 0, &out, &err));
    CHECK(out.empty());
    for (int c = 0; c < 256; c++) {
        std::string s(1, (char)c);
        ids.clear();
        bpe_encode(&b, s.data(), 1, &ids);
        CHECK(ids == std::vector<int>{c});
    }
    // all ids decode, and the cache stays correct when reused across strings
    std::string corpus = make_corpus(5000, 5);
    CHECK(check_encode_ok(&b, corpus));
    CHECK(check_encode_ok(&b, corpus));
}

TEST_CASE("decode rejects bad ids and names them") {
    const Bpe& b = trained();
    std::string out, err;
    int bad1[] = {72, 105, 512};
    CHECK_FALSE(bpe_decode(b, bad1, 3, &out, &err));
    CHECK(err.find("512") != std::string::npos);
    CHECK(err.find("position 2") != std::string::npos);
    int bad2[] = {-1};
    CHECK_FALSE(bpe_decode(b, bad2, 1, &out, &err));
    CHECK(err.find("-1") != std::string::npos);
    int good[] = {511, 0, 255};
    out.clear();
    CHECK(bpe_decode(b, good, 3, &out, &err));
    CHECK(out == b.bytes[511] + std::string(1, '\0') + "\xff");
}

// ---- model files -----------------------------------------------------------------------

TEST_CASE("model save / load round trip") {
    Bpe a = trained(), b;
    std::string path = tmp_path("model.bpe"), err;
    TmpFiles cleanup{{path}};
    REQUIRE_MESSAGE(bpe_save(a, path.c_str(), &err), err);
    REQUIRE_MESSAGE(bpe_load(&b, path.c_str(), &err), err);
    CHECK(a.merges == b.merges);
    CHECK(bpe_vocab_size(b) == 512);
    std::string data;
    REQUIRE(bpe_read_file(path.c_str(), &data, &err));
    CHECK(data.size() == 12 + 8 * 256);
    CHECK(data.compare(0, 4, "MOTB") == 0);
    CHECK(data[4] == 1);
    std::mt19937 rng(3);
    for (int t = 0; t < 500; t++) {
        std::string s = t % 2 ? random_bytes(rng, rng() % 300) : make_corpus(200, t);
        std::vector<int> ia, ib;
        bpe_encode(&a, s.data(), s.size(), &ia);
        bpe_encode(&b, s.data(), s.size(), &ib);
        REQUIRE(ia == ib);
    }
}

TEST_CASE("bad model files are rejected with a clear error") {
    Bpe b;
    std::string err, path = tmp_path("bad.bpe");
    TmpFiles cleanup{{path}};
    std::vector<std::pair<uint32_t, uint32_t>> ok = {{'a', 'b'}, {256, 'c'}};
    auto load = [&](const std::string& bytes) {
        write_file(path, bytes);
        err.clear();
        bool r = bpe_load(&b, path.c_str(), &err);
        if (!r) CHECK(err.find(path) == 0);  // names the file
        return r;
    };
    CHECK(load(model_bytes("MOTB", 1, 2, ok)));
    CHECK(bpe_vocab_size(b) == 258);
    CHECK(b.bytes[257] == "abc");

    CHECK_FALSE(load(model_bytes("MOTX", 1, 2, ok)));
    CHECK(err.find("magic") != std::string::npos);
    CHECK_FALSE(load(model_bytes("MOTB", 2, 2, ok)));
    CHECK(err.find("version 2") != std::string::npos);
    CHECK_FALSE(load(model_bytes("MOTB", 1, 3, ok)));  // header promises 3 merges
    CHECK(err.find("truncated") != std::string::npos);
    std::string full = model_bytes("MOTB", 1, 2, ok);
    CHECK_FALSE(load(full.substr(0, full.size() - 1)));
    CHECK(err.find("truncated") != std::string::npos);
    CHECK_FALSE(load(full.substr(0, 7)));
    CHECK(err.find("truncated") != std::string::npos);
    CHECK_FALSE(load(""));
    CHECK(err.find("truncated") != std::string::npos);
    CHECK_FALSE(load(full + "x"));
    CHECK(err.find("trailing") != std::string::npos);
    CHECK_FALSE(load(model_bytes("MOTB", 1, 2, {{'a', 'b'}, {257, 'c'}})));  // self reference
    CHECK(err.find("257") != std::string::npos);
    CHECK_FALSE(load(model_bytes("MOTB", 1, 1, {{'a', 300}})));  // forward reference
    CHECK(err.find("300") != std::string::npos);
    CHECK_FALSE(load(model_bytes("MOTB", 1, 2, {{'a', 'b'}, {'a', 'b'}})));
    CHECK(err.find("repeats") != std::string::npos);
    CHECK_FALSE(load(model_bytes("MOTB", 1, 0xffffffffu, {})));  // absurd count
    CHECK(err.find("truncated") != std::string::npos);
    // a merge bomb: merge i joins token 255+i with itself, doubling the length each time (2^31
    // bytes after 31 merges); refused at the first token longer than any pre-token word
    std::vector<std::pair<uint32_t, uint32_t>> bomb = {{'a', 'a'}};
    for (uint32_t i = 1; i < 31; i++) bomb.push_back({255 + i, 255 + i});
    CHECK_FALSE(load(model_bytes("MOTB", 1, (uint32_t)bomb.size(), bomb)));
    CHECK(err.find("merge 8 builds a token of 512 bytes, longer than the longest word (256)") != std::string::npos);
    CHECK(model_bytes("MOTB", 1, (uint32_t)bomb.size(), bomb).size() == 260);
    // failed loads leave the previously loaded tokenizer intact
    CHECK(bpe_vocab_size(b) == 258);
    CHECK(b.bytes[257] == "abc");
    CHECK(check_encode_ok(&b, "abcabc xyz"));

    std::string missing = tmp_path("does_not_exist.bpe");
    CHECK_FALSE(bpe_load(&b, missing.c_str(), &err));
    CHECK(err.find(missing) == 0);
    CHECK(err.find("cannot open") != std::string::npos);
    // saving to an impossible path fails cleanly
    CHECK_FALSE(bpe_save(trained(), "/nonexistent_dir/x.bpe", &err));
    CHECK(err.find("/nonexistent_dir/x.bpe") == 0);
}

TEST_CASE("train from files") {
    std::string p1 = tmp_path("c1.txt"), p2 = tmp_path("c2.txt"), err;
    TmpFiles cleanup{{p1, p2}};
    std::string c1 = make_corpus(4000, 21), c2 = make_corpus(4000, 22);
    write_file(p1, c1);
    write_file(p2, c2);
    Bpe a, b;
    REQUIRE_MESSAGE(bpe_train_files(&a, {p1, p2}, 300, false, &err), err);
    // same as counting the concatenated texts (both end between words)
    BpeWordCounts wc;
    bpe_count_words(&wc, c1.data(), c1.size());
    bpe_count_words(&wc, c2.data(), c2.size());
    REQUIRE(bpe_train(&b, wc, 300, false, &err));
    CHECK(a.merges == b.merges);
    CHECK_FALSE(bpe_train_files(&a, {p1, tmp_path("missing.txt")}, 300, false, &err));
    CHECK(err.find("missing.txt") != std::string::npos);
}
