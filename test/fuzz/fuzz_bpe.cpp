// BPE model file + encode/decode (tokenizers/bpe.h). Input: uint16 LE model length, the model
// file, then text. A loaded model must round-trip the text exactly and reject bad ids.
#define BPE_IMPLEMENTATION
#include "tokenizers/bpe.h"
#include "test/fuzz/fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* d, size_t n) {
    if (n < 2) return 0;
    const size_t mlen = std::min(n - 2, (size_t)(d[0] | d[1] << 8));
    const std::string path = fuzz_file(d + 2, mlen, ".bpe");
    Bpe b;
    std::string err;
    if (!bpe_load(&b, path.c_str(), &err)) {
        fuzz_check_error(err, path);
        return 0;
    }
    const uint8_t* text = d + 2 + mlen;
    const size_t tn = n - 2 - mlen;
    std::vector<int> ids;
    bpe_encode(&b, text, tn, &ids);
    std::string back;
    FUZZ_REQUIRE(bpe_decode(b, ids.data(), ids.size(), &back, &err));
    FUZZ_REQUIRE(back == std::string((const char*)text, tn));
    // the text's bytes read as ids: valid ones decode, others are refused with a message
    std::vector<int> raw;
    for (size_t i = 0; i + 1 < tn; i += 2) raw.push_back((int16_t)(text[i] | text[i + 1] << 8));
    back.clear();
    if (!bpe_decode(b, raw.data(), raw.size(), &back, &err)) FUZZ_REQUIRE(err.find("bad token id") == 0);
    return 0;
}
