// PNG (stb_image) and JPEG (libjpeg-turbo) files to a 28x28 grey image (tokenizers/vq.h), as
// `mot sample --task caption` and `vq encode` read them.
#define STB_IMAGE_IMPLEMENTATION
#define STBI_ONLY_PNG
#include <stb/stb_image.h>
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>
#define VQ_IMPLEMENTATION
#include "tokenizers/vq.h"
#include "test/fuzz/fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* d, size_t n) {
    const std::string path = fuzz_file(d, n, ".img");
    std::vector<uint8_t> px;
    std::string err;
    if (!vq_load_image(path.c_str(), 28, &px, &err)) {
        fuzz_check_error(err, path);
        return 0;
    }
    FUZZ_REQUIRE(px.size() == 28 * 28);
    return 0;
}
