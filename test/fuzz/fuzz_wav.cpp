// WAV reader with resampling to 16 kHz (tokenizers/speech.h), as `mot sample --task transcript`.
#define SPEECH_IMPLEMENTATION
#include "tokenizers/speech.h"
#include "test/fuzz/fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* d, size_t n) {
    const std::string path = fuzz_file(d, n, ".wav");
    std::vector<float> x;
    std::string err;
    if (!speech_wav_load(path.c_str(), 16000, &x, &err)) {
        fuzz_check_error(err, path);
        return 0;
    }
    return 0;
}
