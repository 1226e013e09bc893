// Checkpoint reader (mot.h), as ./mot --init-from and mot sample use it: header, then a model
// built from the header's config, then the full load; a loaded model must run a decode step.
#include "mot.h"
#include "test/fuzz/fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* d, size_t n) {
    const std::string path = fuzz_file(d, n, ".ckpt");
    MotConfig c;
    std::string err;
    if (!mot_read_checkpoint_config(path, &c, &err)) {
        fuzz_check_error(err, path);
        return 0;
    }
    MotModel<float> m;
    mot_init(&m, c, 1);  // affordable: the header reader checked the file holds 4P bytes of it
    MotTrainState st;
    bool opt = false;
    if (!mot_load_checkpoint(path, &m, &st, &opt, &err)) {
        fuzz_check_error(err, path);
        return 0;
    }
    FUZZ_REQUIRE(st.step >= 0 && st.step <= MOT_MAX_STEP);
    MotKVCache<float> kv;
    mot_kv_init(&kv, c, 2);
    std::vector<float> logits(c.vocab);
    mot_decode_step(&m, &kv, MOT_BOS, logits.data());
    return 0;
}
