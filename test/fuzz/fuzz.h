// fuzz.h — shared by the libFuzzer targets in test/fuzz (built by `make fuzz`, see run.sh).
// Each target writes the input to a file, calls a reader on it as the tools do, and crashes
// (a finding) on a sanitizer report or when a rejection is not ONE printable line that starts
// with the file's name: "<file>: <what is wrong>".
#pragma once
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

// The input as a file, one per process (libFuzzer -fork/-jobs run several).
static inline std::string fuzz_file(const uint8_t* d, size_t n, const char* ext) {
    static std::string path;
    if (path.empty()) {
        const char* dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
        path = std::string(dir) + "/mot_fuzz_" + std::to_string(getpid()) + ext;
    }
    FILE* f = fopen(path.c_str(), "wb");
    if (!f) abort();
    if (n && fwrite(d, 1, n, f) != n) abort();
    fclose(f);
    return path;
}

// A rejection must name the file and be one line of printable text.
static inline void fuzz_check_error(const std::string& err, const std::string& path) {
    bool bad = err.compare(0, path.size() + 2, path + ": ") != 0 || err.size() == path.size() + 2;
    for (char c : err) bad |= (unsigned char)c < 32 || (unsigned char)c > 126;
    if (bad) {
        fprintf(stderr, "fuzz: bad rejection message: '%s' (must be one printable line starting '%s: ')\n", err.c_str(),
                path.c_str());
        abort();
    }
}
#define FUZZ_REQUIRE(cond)                                         \
    do {                                                           \
        if (!(cond)) {                                             \
            fprintf(stderr, "fuzz: property failed: %s\n", #cond); \
            abort();                                               \
        }                                                          \
    } while (0)
