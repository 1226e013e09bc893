// Speech model file (tokenizers/speech.h): load, encode a short tone, decode a few units.
#define SPEECH_IMPLEMENTATION
#include "tokenizers/speech.h"
#include "test/fuzz/fuzz.h"
#include <cmath>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* d, size_t n) {
    const std::string path = fuzz_file(d, n, ".sp");
    SpeechModel m;
    std::string err;
    if (!speech_model_load(&m, path.c_str(), &err)) {
        fuzz_check_error(err, path);
        return 0;
    }
    std::vector<float> x(1600);
    for (size_t i = 0; i < x.size(); i++) x[i] = 0.3f * sinf(0.05f * i);
    std::vector<int> units;
    FUZZ_REQUIRE(speech_encode(m, x.data(), x.size(), 16000, &units, &err));
    for (int u : units) FUZZ_REQUIRE(u >= 0 && u < m.K);
    // Decoding costs n_fft log n_fft per frame and iteration: keep each input cheap; the
    // duration model (learned run lengths, bounded at load) is what is under test.
    if (m.s.n_fft <= 1024 && units.size() <= 8) {
        SpeechDecodeOptions o;
        o.gl_iters = 1;
        std::vector<float> wav;
        FUZZ_REQUIRE(speech_decode(m, units.data(), units.size(), o, &wav, &err));
    }
    return 0;
}
