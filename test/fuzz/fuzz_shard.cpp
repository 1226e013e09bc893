// Token shard reader (mot.h): any bytes -> a shard or a one-line error.
#include "mot.h"
#include "test/fuzz/fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* d, size_t n) {
    const std::string path = fuzz_file(d, n, ".bin");
    MotShard s;
    std::string err;
    if (!mot_read_shard(path, &s, &err)) {
        fuzz_check_error(err, path);
        return 0;
    }
    if (s.pixels_version)  // version 2: tokens, then 784 pixels per BOI ... EOI block of 49
        FUZZ_REQUIRE(s.tokens.size() * 2 + 40 + s.image_at.size() * MOT_IMAGE_PIXELS == n &&
                     s.pixels.size() == s.image_at.size() * MOT_IMAGE_PIXELS);
    else FUZZ_REQUIRE(s.tokens.size() * 2 + 32 == n);
    for (uint16_t t : s.tokens) FUZZ_REQUIRE(t < s.vocab.vocab);
    return 0;
}
