// VQ model file (tokenizers/vq.h): load, then decode every code and encode a test pattern.
#define STB_IMAGE_IMPLEMENTATION
#define STBI_ONLY_PNG
#include <stb/stb_image.h>
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>
#define VQ_IMPLEMENTATION
#include "tokenizers/vq.h"
#include "test/fuzz/fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* d, size_t n) {
    const std::string path = fuzz_file(d, n, ".vq");
    VqModel m;
    std::string err;
    if (!vq_model_load(path.c_str(), &m, &err)) {
        fuzz_check_error(err, path);
        return 0;
    }
    const int T = vq_tokens(m);
    std::vector<int32_t> codes(T);
    for (int t = 0; t < T; t++) codes[t] = t % m.codes;
    std::vector<uint8_t> img((size_t)m.side * m.side);
    FUZZ_REQUIRE(vq_decode(m, codes.data(), codes.size(), img.data(), &err));
    // Encoding costs side^2 x codes (bounded at load by VQ_MAX_ENCODE_WORK = 2^31: 0.7 s at -O2,
    // over libFuzzer's 10 s timeout once instrumented with ASan and UBSan). Encode only the
    // cheaper models here; the reader, under test, has already run in full.
    if ((uint64_t)m.side * m.side * m.codes <= (1ull << 26)) {
        vq_encode(m, img.data(), codes.data());
        for (int32_t c : codes) FUZZ_REQUIRE(c >= 0 && c < m.codes);
    }
    codes[0] = m.codes;  // out of range: refused
    FUZZ_REQUIRE(!vq_decode(m, codes.data(), codes.size(), img.data(), &err));
    return 0;
}
