// bpe.h - byte-level BPE text tokenizer: train, encode, decode, save, load.
//
// Header-only, stb style. In exactly one .cpp file:
//     #define BPE_IMPLEMENTATION
//     #include "tokenizers/bpe.h"
//
// Token ids are LOCAL to this tokenizer: 0..255 are the raw bytes, 256 + i is merge i.
// The unified model vocabulary (special tokens, text, image, speech) adds its own offset
// (text token j -> id 8 + j, see mot.h). Special tokens do not exist here, so encoding any
// byte string yields only ids in 0..bpe_vocab_size()-1, and decode(encode(x)) == x for
// every byte string x (invalid UTF-8, NUL bytes and the empty string included).
//
// ---------------------------------------------------------------------------------------
// Model file format (".bpe"), all integers little-endian uint32:
//
//   offset  size  field
//   0       4     magic, the ASCII bytes 'M' 'O' 'T' 'B'
//   4       4     version = 1
//   8       4     n_merges
//   12      8*n   n_merges records, in merge order; record i is
//                   uint32 left, uint32 right
//                 and defines token 256 + i = concatenation of tokens left and right.
//
// The file is exactly 12 + 8 * n_merges bytes; vocab size = 256 + n_merges.
// bpe_load rejects: a file it cannot open or read, a wrong magic, a version other than 1,
// a file shorter or longer than 12 + 8 * n_merges bytes (truncated / trailing garbage),
// a merge whose left or right id is >= its own id 256 + i, a pair merged twice, more than
// BPE_MAX_MERGES merges, and a merge building a token longer than BPE_MAX_WORD bytes (no word
// is longer, so training never makes one).
// ---------------------------------------------------------------------------------------
//
// Pre-tokenisation (GPT-2 style, on bytes). Text is split into "words" and merges never
// cross a word boundary. Each byte has a class:
//   letter : A-Z a-z and every byte >= 0x80 (so UTF-8 letters stay whole; the price is
//            that non-ASCII punctuation such as an em dash also counts as a letter)
//   digit  : 0-9
//   space  : ' ' \t \n \v \f \r
//   other  : everything else (ASCII punctuation, control bytes, NUL)
// A word is, tried in this order at the current position:
//   1. an English contraction: 's 't 'm 'd 're 've 'll (lower case, as in GPT-2);
//   2. an optional single leading ' ' followed by a maximal run of one class among
//      letter / digit / other (" hello", "123", " ...");
//   3. a maximal run of space bytes, except that when the run is followed by a non-space
//      byte and ends in ' ', that last ' ' is left to become the leading space of the
//      next word ("a  b" -> "a" " " " b"). Unlike GPT-2, "\n\tb" stays "\n\t" "b".
// Every word is at most BPE_MAX_WORD bytes (longer runs are cut), which bounds the cost of
// training and encoding on pathological input (megabytes without a space); natural
// prose practically never hits the cap.
//
// Training counts word frequencies once, then merges over the unique words, updating the
// pair counts incrementally (only words containing the merged pair are touched) with a
// lazy max-heap. Ties between equally frequent pairs go to the smaller (left, right) pair,
// so training is deterministic.
//
// Encoding applies merges to each word in merge order (lowest merge index first, left to
// right), which reproduces exactly how the training corpus was segmented. Results for
// words up to BPE_CACHE_MAX_WORD bytes are cached inside the Bpe object (bounded: the
// cache is dropped when full), so one Bpe must not be used by two threads encoding at
// the same time; give each thread its own copy (bpe_encode_word is const and thread-safe).

#ifndef BPE_H
#define BPE_H

#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#define BPE_MAX_WORD 256                // max bytes per pre-token word
#define BPE_MAX_MERGES (1 << 24)        // bpe_load refuses larger models before reading them
#define BPE_CACHE_MAX_WORD 64           // longer words are not cached
#define BPE_CACHE_MAX_SLOTS (1 << 20)   // cache is dropped when half full at this size
#define BPE_CACHE_MAX_TOKENS (1 << 22)  // ... or when it holds this many ids

// One slot of the encode cache (open addressing); word_len 0 marks an empty slot.
struct BpeCacheSlot {
    uint64_t hash;
    uint32_t word_off, ids_off;  // into Bpe::cache_bytes / Bpe::cache_ids
    uint16_t word_len, n_ids;
};

struct Bpe {
    std::vector<std::pair<uint32_t, uint32_t>> merges;  // merge i -> token 256 + i
    // derived from merges by bpe_init:
    std::vector<std::string> bytes;  // token -> the bytes it stands for
    // pair (left << 32 | right) -> merge index, open addressing: the encode inner loop
    // is mostly these lookups, and a flat table beats std::unordered_map there
    std::vector<uint64_t> rank_keys;  // ~0 = empty
    std::vector<int> rank_vals;
    // encode cache: word bytes -> token ids
    std::vector<BpeCacheSlot> cache;
    size_t cache_used = 0;
    std::string cache_bytes;
    std::vector<int> cache_ids;
};

// Word frequencies of a corpus, the input of training.
struct BpeWordCounts {
    std::unordered_map<std::string, uint64_t> counts;
    uint64_t n_bytes = 0, n_words = 0;
};

// Number of tokens: 256 + number of merges.
int bpe_vocab_size(const Bpe& b);

// Build a tokenizer from a merge list (checks ids, builds lookup tables).
bool bpe_init(Bpe* b, const std::vector<std::pair<uint32_t, uint32_t>>& merges, std::string* err);

// End (exclusive) of the pre-token word that starts at p[i], i < n.
size_t bpe_word_end(const uint8_t* p, size_t n, size_t i);

// Add the words of a text to the counts.
void bpe_count_words(BpeWordCounts* wc, const void* data, size_t n);

// Train to vocab_size tokens (>= 256). Stops early, with fewer tokens, only when no pair
// is left to merge. progress: print merges done / total and rate on stderr.
bool bpe_train(Bpe* b, const BpeWordCounts& wc, int vocab_size, bool progress, std::string* err);
bool bpe_train_files(Bpe* b, const std::vector<std::string>& paths, int vocab_size, bool progress, std::string* err);

// Append the tokens of data to out. Never fails; all ids are < bpe_vocab_size(b).
void bpe_encode(Bpe* b, const void* data, size_t n, std::vector<int>* out);
// Append the tokens of ONE word (no pre-tokenisation, no cache).
void bpe_encode_word(const Bpe& b, const uint8_t* p, size_t n, std::vector<int>* out);

// Append the bytes of ids to out. Fails, naming the id and its position, on an id
// outside 0..vocab-1.
bool bpe_decode(const Bpe& b, const int* ids, size_t n, std::string* out, std::string* err);

bool bpe_save(const Bpe& b, const char* path, std::string* err);
bool bpe_load(Bpe* b, const char* path, std::string* err);

// Read a whole file ("-" = stdin) into out.
bool bpe_read_file(const char* path, std::string* out, std::string* err);

#endif  // BPE_H

// =======================================================================================
#if defined(BPE_IMPLEMENTATION) && !defined(BPE_IMPLEMENTATION_DONE)
#define BPE_IMPLEMENTATION_DONE

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>
#include <queue>
#include <sys/stat.h>

static inline uint64_t bpe__key(uint32_t a, uint32_t b) { return (uint64_t)a << 32 | b; }

static inline uint64_t bpe__mix(uint64_t x) {  // murmur3 finaliser
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

int bpe_vocab_size(const Bpe& b) { return 256 + (int)b.merges.size(); }

bool bpe_init(Bpe* b, const std::vector<std::pair<uint32_t, uint32_t>>& merges, std::string* err) {
    if (merges.size() > (size_t)INT_MAX - 256) {
        if (err) *err = "too many merges";
        return false;
    }
    // build into a fresh object so that *b is untouched on failure (merges may alias it)
    Bpe t;
    const std::vector<std::pair<uint32_t, uint32_t>>& m = merges;
    size_t cap = 16;
    while (cap < 2 * m.size() + 2) cap *= 2;  // load <= 1/2
    t.rank_keys.assign(cap, ~(uint64_t)0);
    t.rank_vals.assign(cap, 0);
    t.bytes.assign(256 + m.size(), std::string());
    for (int c = 0; c < 256; c++) t.bytes[c] = std::string(1, (char)c);
    for (size_t i = 0; i < m.size(); i++) {
        uint32_t id = 256 + (uint32_t)i, l = m[i].first, r = m[i].second;
        if (l >= id || r >= id) {
            if (err)
                *err = "merge " + std::to_string(i) + " (" + std::to_string(l) + ", " + std::to_string(r) +
                       ") refers to token " + std::to_string(std::max(l, r)) + " >= its own id " + std::to_string(id);
            return false;
        }
        uint64_t key = bpe__key(l, r);
        size_t h = bpe__mix(key) & (cap - 1);
        while (t.rank_keys[h] != ~(uint64_t)0 && t.rank_keys[h] != key) h = (h + 1) & (cap - 1);
        if (t.rank_keys[h] == key) {
            if (err)
                *err = "merge " + std::to_string(i) + " repeats pair (" + std::to_string(l) + ", " + std::to_string(r) +
                       ")";
            return false;
        }
        t.rank_keys[h] = key;
        t.rank_vals[h] = (int)i;
        t.bytes[id] = t.bytes[l] + t.bytes[r];
        // Merges never cross a pre-token word, so no real token is longer than a word; a longer
        // one is a hostile file (doubling merges would build 2^31-byte tokens from 260 bytes).
        if (t.bytes[id].size() > BPE_MAX_WORD) {
            if (err)
                *err = "merge " + std::to_string(i) + " builds a token of " + std::to_string(t.bytes[id].size()) +
                       " bytes, longer than the longest word (" + std::to_string(BPE_MAX_WORD) + ")";
            return false;
        }
    }
    t.merges = m;
    *b = std::move(t);  // also empties the encode cache
    return true;
}

// ---- pre-tokenisation ------------------------------------------------------------------

enum { BPE__SPACE = 0, BPE__LETTER = 1, BPE__DIGIT = 2, BPE__OTHER = 3 };

static inline int bpe__class(uint8_t c) {
    if (c >= 0x80) return BPE__LETTER;
    uint8_t lc = c | 32;  // maps A-Z onto a-z, nothing else onto a-z
    if (lc >= 'a' && lc <= 'z') return BPE__LETTER;
    if (c >= '0' && c <= '9') return BPE__DIGIT;
    if (c == ' ' || (c >= 9 && c <= 13)) return BPE__SPACE;
    return BPE__OTHER;
}

size_t bpe_word_end(const uint8_t* p, size_t n, size_t i) {
    size_t lim = n - i > BPE_MAX_WORD ? i + BPE_MAX_WORD : n;
    if (p[i] == '\'' && i + 1 < lim) {  // contractions, as GPT-2
        uint8_t c = p[i + 1];
        if (c == 's' || c == 't' || c == 'm' || c == 'd') return i + 2;
        if (i + 2 < lim) {
            uint8_t d = p[i + 2];
            if ((c == 'r' && d == 'e') || (c == 'v' && d == 'e') || (c == 'l' && d == 'l')) return i + 3;
        }
    }
    size_t j = i;
    if (p[j] == ' ' && j + 1 < lim && bpe__class(p[j + 1]) != BPE__SPACE) j++;
    int c = bpe__class(p[j]);
    j++;
    if (c != BPE__SPACE) {
        while (j < lim && bpe__class(p[j]) == c) j++;
        return j;
    }
    while (j < lim && bpe__class(p[j]) == BPE__SPACE) j++;
    // leave a final ' ' to lead the next word
    if (j < n && bpe__class(p[j]) != BPE__SPACE && j - 1 > i && p[j - 1] == ' ') return j - 1;
    return j;
}

void bpe_count_words(BpeWordCounts* wc, const void* data, size_t n) {
    const uint8_t* p = (const uint8_t*)data;
    std::string key;
    for (size_t i = 0; i < n;) {
        size_t e = bpe_word_end(p, n, i);
        key.assign((const char*)p + i, e - i);
        wc->counts[key]++;
        wc->n_words++;
        i = e;
    }
    wc->n_bytes += n;
}

// ---- training --------------------------------------------------------------------------

namespace {
struct BpeHeapItem {
    int64_t count;
    uint64_t key;
    // priority_queue puts the "largest" on top: highest count, then smallest pair
    bool operator<(const BpeHeapItem& o) const { return count != o.count ? count < o.count : key > o.key; }
};
}  // namespace

bool bpe_train(Bpe* b, const BpeWordCounts& wc, int vocab_size, bool progress, std::string* err) {
    if (vocab_size < 256) {
        if (err) *err = "vocab size " + std::to_string(vocab_size) + " is below 256 (the byte tokens)";
        return false;
    }
    const int n_merges = vocab_size - 256;
    typedef std::chrono::steady_clock clk;
    auto t0 = clk::now();

    // unique words as symbol sequences
    std::vector<std::vector<int>> words;
    std::vector<int64_t> freq;
    words.reserve(wc.counts.size());
    freq.reserve(wc.counts.size());
    for (const auto& kv : wc.counts) {
        if (kv.first.size() < 2) continue;  // nothing to merge
        words.emplace_back(kv.first.begin(), kv.first.end());
        for (int& s : words.back()) s &= 0xff;  // char may be signed
        freq.push_back((int64_t)kv.second);
    }

    // initial pair counts and, per pair, the words that contain it
    std::unordered_map<uint64_t, int64_t> count;
    std::unordered_map<uint64_t, std::vector<int>> where;
    for (size_t k = 0; k < words.size(); k++) {
        const std::vector<int>& w = words[k];
        for (size_t j = 0; j + 1 < w.size(); j++) {
            uint64_t key = bpe__key(w[j], w[j + 1]);
            count[key] += freq[k];
            std::vector<int>& lst = where[key];
            if (lst.empty() || lst.back() != (int)k) lst.push_back((int)k);
        }
    }
    std::priority_queue<BpeHeapItem> heap;
    for (const auto& kv : count) heap.push({kv.second, kv.first});

    std::vector<std::pair<uint32_t, uint32_t>> merges;
    merges.reserve(n_merges);
    std::unordered_map<uint64_t, int64_t> delta;
    std::vector<int> nw;
    auto t_last = t0;
    bool printed = false;  // a progress line is open on stderr
    for (int m = 0; m < n_merges; m++) {
        // best pair; an entry is current iff its count equals the pair's count now,
        // because every change of a count pushes a fresh entry
        BpeHeapItem top = {0, 0};
        bool found = false;
        while (!heap.empty()) {
            top = heap.top();
            heap.pop();
            auto it = count.find(top.key);
            if (it != count.end() && it->second == top.count && top.count > 0) {
                found = true;
                break;
            }
        }
        if (!found) break;  // every word is a single token
        const int a = (int)(top.key >> 32), c = (int)(top.key & 0xffffffffu), id = 256 + m;
        merges.push_back({(uint32_t)a, (uint32_t)c});

        std::vector<int> lst = std::move(where[top.key]);
        where.erase(top.key);
        std::sort(lst.begin(), lst.end());
        lst.erase(std::unique(lst.begin(), lst.end()), lst.end());
        delta.clear();
        for (int k : lst) {
            std::vector<int>& w = words[k];
            const int64_t f = freq[k];
            nw.clear();
            for (size_t j = 0; j < w.size();) {
                if (j + 1 < w.size() && w[j] == a && w[j + 1] == c) {
                    nw.push_back(id);
                    j += 2;
                } else {
                    nw.push_back(w[j]);
                    j++;
                }
            }
            if (nw.size() == w.size()) continue;  // stale entry in where: pair already gone
            // pair counts change only next to merged positions, but recounting the whole
            // (short) word is simpler and the net delta is the same
            for (size_t j = 0; j + 1 < w.size(); j++) delta[bpe__key(w[j], w[j + 1])] -= f;
            for (size_t j = 0; j + 1 < nw.size(); j++) {
                uint64_t key = bpe__key(nw[j], nw[j + 1]);
                delta[key] += f;
                if (nw[j] == id || nw[j + 1] == id) {
                    std::vector<int>& l2 = where[key];
                    if (l2.empty() || l2.back() != k) l2.push_back(k);
                }
            }
            w.swap(nw);
        }
        for (const auto& kv : delta) {
            if (kv.second == 0) continue;
            auto it = count.find(kv.first);
            int64_t v = (it == count.end() ? 0 : it->second) + kv.second;
            if (v <= 0) {
                if (it != count.end()) count.erase(it);
                where.erase(kv.first);
            } else {
                if (it == count.end()) count.emplace(kv.first, v);
                else it->second = v;
                heap.push({v, kv.first});
            }
        }

        if (progress) {
            auto now = clk::now();
            if (m + 1 == n_merges || std::chrono::duration<double>(now - t_last).count() > 0.25) {
                t_last = now;
                printed = true;
                double s = std::chrono::duration<double>(now - t0).count();
                fprintf(stderr, "\rbpe: merges %d/%d  %.0f merges/s  (last pair count %lld)   ", m + 1, n_merges,
                        (m + 1) / (s > 0 ? s : 1e-9), (long long)top.count);
                fflush(stderr);
            }
        }
    }
    if (progress) {
        double s = std::chrono::duration<double>(clk::now() - t0).count();
        if (printed) fputc('\n', stderr);
        fprintf(stderr, "bpe: %zu merges in %.2f s, vocab %zu%s\n", merges.size(), s, 256 + merges.size(),
                (int)merges.size() < n_merges ? " (stopped early: no pairs left)" : "");
    }
    return bpe_init(b, merges, err);
}

bool bpe_train_files(Bpe* b, const std::vector<std::string>& paths, int vocab_size, bool progress, std::string* err) {
    BpeWordCounts wc;
    std::string text;
    for (const std::string& path : paths) {
        if (!bpe_read_file(path.c_str(), &text, err)) return false;
        bpe_count_words(&wc, text.data(), text.size());
        if (progress)
            fprintf(stderr, "bpe: %s: %.2f MB, total %.2f MB, %llu words, %zu unique\n", path.c_str(),
                    text.size() / 1e6, wc.n_bytes / 1e6, (unsigned long long)wc.n_words, wc.counts.size());
    }
    return bpe_train(b, wc, vocab_size, progress, err);
}

// ---- encoding --------------------------------------------------------------------------

static inline int bpe__rank(const Bpe& b, int l, int r) {
    const uint64_t key = bpe__key((uint32_t)l, (uint32_t)r);
    if (b.rank_keys.empty()) return INT_MAX;  // never initialised: bytes only
    const size_t mask = b.rank_keys.size() - 1;
    for (size_t h = bpe__mix(key) & mask;; h = (h + 1) & mask) {
        uint64_t k = b.rank_keys[h];
        if (k == key) return b.rank_vals[h];
        if (k == ~(uint64_t)0) return INT_MAX;
    }
}

static inline uint64_t bpe__hash(const uint8_t* p, size_t n) {
    uint64_t h = n * 0x9e3779b97f4a7c15ULL, v;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        memcpy(&v, p + i, 8);
        h = (h ^ v) * 0xff51afd7ed558ccdULL;
        h ^= h >> 29;
    }
    if (i < n) {
        v = 0;
        memcpy(&v, p + i, n - i);
        h = (h ^ v) * 0xff51afd7ed558ccdULL;
    }
    return bpe__mix(h);
}

static void bpe__cache_reset(Bpe* b, size_t slots) {
    b->cache.assign(slots, BpeCacheSlot{0, 0, 0, 0, 0});
    b->cache_used = 0;
    b->cache_bytes.clear();
    b->cache_ids.clear();
}

// Insert a word (not present) with its ids; grows, or drops everything when full.
static void bpe__cache_put(Bpe* b, uint64_t h, const uint8_t* p, size_t len, const int* ids, size_t n_ids) {
    if (b->cache_ids.size() + n_ids > BPE_CACHE_MAX_TOKENS || 2 * (b->cache_used + 1) > BPE_CACHE_MAX_SLOTS)
        bpe__cache_reset(b, b->cache.size());
    if (2 * (b->cache_used + 1) > b->cache.size()) {  // grow to keep load <= 1/2
        std::vector<BpeCacheSlot> old;
        old.swap(b->cache);
        b->cache.assign(old.size() * 2, BpeCacheSlot{0, 0, 0, 0, 0});
        const size_t mask = b->cache.size() - 1;
        for (const BpeCacheSlot& s : old) {
            if (!s.word_len) continue;
            size_t i = s.hash & mask;
            while (b->cache[i].word_len) i = (i + 1) & mask;
            b->cache[i] = s;
        }
    }
    const size_t mask = b->cache.size() - 1;
    size_t i = h & mask;
    while (b->cache[i].word_len) i = (i + 1) & mask;
    b->cache[i] =
        BpeCacheSlot{h, (uint32_t)b->cache_bytes.size(), (uint32_t)b->cache_ids.size(), (uint16_t)len, (uint16_t)n_ids};
    b->cache_bytes.append((const char*)p, len);
    b->cache_ids.insert(b->cache_ids.end(), ids, ids + n_ids);
    b->cache_used++;
}

void bpe_encode_word(const Bpe& b, const uint8_t* p, size_t n, std::vector<int>* out) {
    if (n == 0) return;
    if (n <= 32) {
        // short word: repeatedly merge every occurrence of the lowest-ranked pair
        int s[32];
        size_t len = n;
        for (size_t i = 0; i < n; i++) s[i] = p[i];
        while (len > 1) {
            int best = INT_MAX;
            for (size_t i = 0; i + 1 < len; i++) best = std::min(best, bpe__rank(b, s[i], s[i + 1]));
            if (best == INT_MAX) break;
            const int l = (int)b.merges[best].first, r = (int)b.merges[best].second;
            size_t o = 0;
            for (size_t i = 0; i < len;) {
                if (i + 1 < len && s[i] == l && s[i + 1] == r) {
                    s[o++] = 256 + best;
                    i += 2;
                } else {
                    s[o++] = s[i++];
                }
            }
            len = o;
        }
        out->insert(out->end(), s, s + len);
        return;
    }
    // long word: linked list of symbols + min-heap of (rank, position), O(n log n).
    // Merges come out in rank order and, within a rank, left to right, since a merge
    // only creates pairs of higher rank than its own (token 256+r can only appear in
    // merges after r).
    std::vector<int> tok(p, p + n), prv(n), nxt(n);
    for (size_t i = 0; i < n; i++) {
        prv[i] = (int)i - 1;
        nxt[i] = i + 1 < n ? (int)i + 1 : -1;
    }
    typedef std::pair<int, int> RP;  // (rank, left position)
    std::priority_queue<RP, std::vector<RP>, std::greater<RP>> heap;
    for (size_t i = 0; i + 1 < n; i++) {
        int r = bpe__rank(b, tok[i], tok[i + 1]);
        if (r != INT_MAX) heap.push({r, (int)i});
    }
    while (!heap.empty()) {
        RP e = heap.top();
        heap.pop();
        int i = e.second;
        if (tok[i] < 0) continue;  // merged into its left neighbour
        int j = nxt[i];
        if (j < 0 || bpe__rank(b, tok[i], tok[j]) != e.first) continue;  // pair changed
        tok[i] = 256 + e.first;
        tok[j] = -1;
        nxt[i] = nxt[j];
        if (nxt[j] >= 0) prv[nxt[j]] = i;
        if (prv[i] >= 0) {
            int r = bpe__rank(b, tok[prv[i]], tok[i]);
            if (r != INT_MAX) heap.push({r, prv[i]});
        }
        if (nxt[i] >= 0) {
            int r = bpe__rank(b, tok[i], tok[nxt[i]]);
            if (r != INT_MAX) heap.push({r, i});
        }
    }
    for (int i = 0; i >= 0; i = nxt[i]) out->push_back(tok[i]);
}

void bpe_encode(Bpe* b, const void* data, size_t n, std::vector<int>* out) {
    const uint8_t* p = (const uint8_t*)data;
    if (b->cache.empty()) bpe__cache_reset(b, 1 << 12);
    for (size_t i = 0; i < n;) {
        size_t e = bpe_word_end(p, n, i), len = e - i;
        const uint8_t* w = p + i;
        i = e;
        if (len == 1) {
            out->push_back(w[0]);
            continue;
        }
        if (len > BPE_CACHE_MAX_WORD) {
            bpe_encode_word(*b, w, len, out);
            continue;
        }
        const uint64_t h = bpe__hash(w, len);
        const size_t mask = b->cache.size() - 1;
        size_t k = h & mask;
        for (; b->cache[k].word_len; k = (k + 1) & mask) {
            const BpeCacheSlot& s = b->cache[k];
            if (s.hash == h && s.word_len == len && !memcmp(b->cache_bytes.data() + s.word_off, w, len)) break;
        }
        const BpeCacheSlot& s = b->cache[k];
        if (s.word_len) {  // hit
            const int* ids = b->cache_ids.data() + s.ids_off;
            out->insert(out->end(), ids, ids + s.n_ids);
        } else {
            size_t start = out->size();
            bpe_encode_word(*b, w, len, out);
            bpe__cache_put(b, h, w, len, out->data() + start, out->size() - start);
        }
    }
}

// ---- decoding --------------------------------------------------------------------------

bool bpe_decode(const Bpe& b, const int* ids, size_t n, std::string* out, std::string* err) {
    const int v = (int)b.bytes.size();
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= v) {
            if (err)
                *err = "bad token id " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
                       " (vocab size " + std::to_string(v) + ")";
            return false;
        }
        out->append(b.bytes[ids[i]]);
    }
    return true;
}

// ---- files -----------------------------------------------------------------------------

static void bpe__put32(std::string* s, uint32_t v) {
    for (int k = 0; k < 4; k++) s->push_back((char)(v >> (8 * k) & 0xff));
}

static uint32_t bpe__get32(const std::string& s, size_t o) {
    const uint8_t* p = (const uint8_t*)s.data() + o;
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

bool bpe_save(const Bpe& b, const char* path, std::string* err) {
    std::string s = "MOTB";
    bpe__put32(&s, 1);
    bpe__put32(&s, (uint32_t)b.merges.size());
    for (const auto& m : b.merges) {
        bpe__put32(&s, m.first);
        bpe__put32(&s, m.second);
    }
    FILE* f = fopen(path, "wb");
    if (!f) {
        if (err) *err = std::string(path) + ": cannot open for writing: " + strerror(errno);
        return false;
    }
    bool ok = fwrite(s.data(), 1, s.size(), f) == s.size();
    if (fclose(f) != 0) ok = false;
    if (!ok && err) *err = std::string(path) + ": write failed: " + strerror(errno);
    return ok;
}

bool bpe_read_file(const char* path, std::string* out, std::string* err) {
    bool is_stdin = strcmp(path, "-") == 0;
    FILE* f = is_stdin ? stdin : fopen(path, "rb");
    if (!f) {
        if (err) *err = std::string(path) + ": cannot open: " + strerror(errno);
        return false;
    }
    out->clear();
    char buf[1 << 16];
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, f)) > 0) out->append(buf, got);
    bool ok = !ferror(f);
    if (!is_stdin) fclose(f);
    if (!ok && err) *err = std::string(path) + ": read error: " + strerror(errno);
    return ok;
}

bool bpe_load(Bpe* b, const char* path, std::string* err) {
    std::string s, e;
    const std::string P = std::string(path) + ": ";
    struct stat sb;  // the size first: a huge file is refused before it is read into memory
    if (stat(path, &sb) == 0 && S_ISREG(sb.st_mode) && (uint64_t)sb.st_size > 12 + 8 * (uint64_t)BPE_MAX_MERGES) {
        if (err) *err = P + "too large for a BPE model (" + std::to_string((uint64_t)sb.st_size) + " bytes)";
        return false;
    }
    if (!bpe_read_file(path, &s, err)) return false;
    if (s.size() < 12) {
        if (err) *err = P + "truncated header (" + std::to_string(s.size()) + " bytes, need 12)";
        return false;
    }
    if (memcmp(s.data(), "MOTB", 4) != 0) {
        if (err) *err = P + "not a BPE model (bad magic, expected \"MOTB\")";
        return false;
    }
    uint32_t version = bpe__get32(s, 4), n = bpe__get32(s, 8);
    if (version != 1) {
        if (err) *err = P + "unsupported version " + std::to_string(version) + " (expected 1)";
        return false;
    }
    uint64_t want = 12 + 8 * (uint64_t)n;
    if (s.size() != want) {
        if (err)
            *err = P + (s.size() < want ? "truncated" : "trailing bytes") + ": " + std::to_string(s.size()) +
                   " bytes, header says " + std::to_string(n) + " merges = " + std::to_string(want) + " bytes";
        return false;
    }
    if (n > BPE_MAX_MERGES) {
        if (err) *err = P + "header says " + std::to_string(n) + " merges, more than " + std::to_string(BPE_MAX_MERGES);
        return false;
    }
    std::vector<std::pair<uint32_t, uint32_t>> merges(n);
    for (uint32_t i = 0; i < n; i++) merges[i] = {bpe__get32(s, 12 + 8 * (size_t)i), bpe__get32(s, 16 + 8 * (size_t)i)};
    if (!bpe_init(b, merges, &e)) {
        if (err) *err = P + e;
        return false;
    }
    return true;
}

#endif  // BPE_IMPLEMENTATION
