// to_jpeg.cpp — seeds for fuzz_image: a PNG (as `vq decode` writes it) to a baseline and a
// progressive JPEG with libjpeg-turbo. Usage: to_jpeg IN.png OUT_BASE.jpg OUT_PROG.jpg
#define STB_IMAGE_IMPLEMENTATION
#define STBI_ONLY_PNG
#include <stb/stb_image.h>
#include <cstdio>
#include <jpeglib.h>

static bool write_jpeg(const char* path, const unsigned char* px, int w, int h, bool progressive) {
    FILE* f = fopen(path, "wb");
    if (!f) return false;
    jpeg_compress_struct c;
    jpeg_error_mgr e;
    c.err = jpeg_std_error(&e);
    jpeg_create_compress(&c);
    jpeg_stdio_dest(&c, f);
    c.image_width = w;
    c.image_height = h;
    c.input_components = 3;
    c.in_color_space = JCS_RGB;
    jpeg_set_defaults(&c);
    jpeg_set_quality(&c, 85, TRUE);
    if (progressive) jpeg_simple_progression(&c);
    jpeg_start_compress(&c, TRUE);
    while (c.next_scanline < c.image_height) {
        JSAMPROW row = (JSAMPROW)(px + (size_t)c.next_scanline * w * 3);
        jpeg_write_scanlines(&c, &row, 1);
    }
    jpeg_finish_compress(&c);
    jpeg_destroy_compress(&c);
    return fclose(f) == 0;
}

int main(int argc, char** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: to_jpeg IN.png BASE.jpg PROG.jpg\n");
        return 2;
    }
    int w, h, ch;
    unsigned char* px = stbi_load(argv[1], &w, &h, &ch, 3);
    if (!px) {
        fprintf(stderr, "%s: cannot read\n", argv[1]);
        return 1;
    }
    bool ok = write_jpeg(argv[2], px, w, h, false) && write_jpeg(argv[3], px, w, h, true);
    stbi_image_free(px);
    return ok ? 0 : 1;
}
