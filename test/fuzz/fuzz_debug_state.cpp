// Debug-state reader (mot.h, read by the GPU test).
#include "mot.h"
#include "test/fuzz/fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* d, size_t n) {
    const std::string path = fuzz_file(d, n, ".dbg");
    MotDebugState s;
    std::string err;
    if (!mot_read_debug_state(path, &s, &err)) {
        fuzz_check_error(err, path);
        return 0;
    }
    FUZZ_REQUIRE(s.tokens.size() == (size_t)s.B * s.T && s.logits.size() == s.tokens.size() * s.cfg.vocab);
    FUZZ_REQUIRE(s.xin.size() == (mot_transfusion(s.cfg) ? s.tokens.size() * MOT_PATCH : 0) &&
                 s.eps_hat.size() == s.xin.size());
    return 0;
}
