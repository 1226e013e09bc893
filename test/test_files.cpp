// test_files.cpp — shards, loader, checkpoints and debug states: round trips and every bad-input
// path, both through the library (error strings) and through the ./mot command (exit codes).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <map>

#include "mot.h"
#include "test/common.h"

static int count_lines(const std::string& s) { return (int)std::count(s.begin(), s.end(), '\n'); }

TEST_CASE("shard: write and read back, loader windows and targets") {
    auto toks = make_tokens(5000, 1);
    std::string err;
    REQUIRE(mot_write_shard(tmp("a.bin"), VOC, toks.data(), toks.size(), &err));
    MotShard s;
    REQUIRE(mot_read_shard(tmp("a.bin"), &s, &err));
    CHECK(s.tokens == toks);
    CHECK(s.vocab.vocab == 64);
    CHECK(s.vocab.speech_begin == 48);
    MotLoader ld;
    REQUIRE(mot_loader_open(&ld, tmp("a.bin"), 32, 123, &err));
    MotConfig c;
    c.vocab = 64;
    c.image_begin = 24;
    c.speech_begin = 48;
    MotBatch b1, b2;
    mot_loader_next(&ld, c, 4, 32, &b1);
    int seen[3] = {0, 0, 0};
    for (int i = 0; i < 4 * 32; i++) {
        seen[mot_modality(c, b1.tokens[i])]++;
        if (i % 32 != 31) CHECK(b1.targets[i] == b1.tokens[i + 1]);  // targets are the next token
    }
    CHECK(seen[0] > 0);
    CHECK(seen[1] > 0);
    CHECK(seen[2] > 0);
    MotLoader ld2;  // deterministic for a seed
    REQUIRE(mot_loader_open(&ld2, tmp("a.bin"), 32, 123, &err));
    mot_loader_next(&ld2, c, 4, 32, &b2);
    CHECK(b1.tokens == b2.tokens);
    CHECK(b1.order == b2.order);
}

TEST_CASE("shard: every bad input gets an error naming the file") {
    auto toks = make_tokens(100, 2);
    std::string err, good;
    REQUIRE(mot_write_shard(tmp("g.bin"), VOC, toks.data(), toks.size(), &err));
    good = read_bytes(tmp("g.bin"));
    MotShard s;
    auto bad = [&](const std::string& name, const std::string& bytes, const std::string& expect) {
        write_bytes(tmp(name), bytes);
        CHECK_FALSE(mot_read_shard(tmp(name), &s, &err));
        INFO(err);
        CHECK(err.find(tmp(name)) == 0);
        CHECK(err.find(expect) != std::string::npos);
    };
    std::string b = good;
    b[0] = 'X';
    bad("magic.bin", b, "bad magic");
    b = good;
    b[4] = 9;
    bad("version.bin", b, "version 9");
    bad("trunc.bin", good.substr(0, good.size() - 3), "truncated");
    bad("short.bin", good.substr(0, 10), "truncated");
    bad("empty.bin", "", "truncated");
    b = good;
    b[32] = (char)0xff;
    b[33] = 0x7f;  // token 32767 >= 64
    bad("oov.bin", b, "outside the vocabulary");
    CHECK_FALSE(mot_read_shard(tmp("missing.bin"), &s, &err));
    CHECK(err.find("missing.bin: cannot open") != std::string::npos);
    std::vector<uint16_t> oov = {1, 2, 64};
    CHECK_FALSE(mot_write_shard(tmp("w.bin"), VOC, oov.data(), 3, &err));  // the writer refuses too
    CHECK(err.find("outside the vocabulary") != std::string::npos);
    MotLoader ld;
    CHECK_FALSE(mot_loader_open(&ld, tmp("nothing_*.bin"), 8, 1, &err));
    CHECK(err.find("no file matches") != std::string::npos);
    CHECK_FALSE(mot_loader_open(&ld, tmp("g.bin"), 500, 1, &err));
    CHECK(err.find("fewer than one window") != std::string::npos);
}

static MotConfig small_config() {
    MotConfig c;
    c.n_layer = 2;
    c.d_model = 16;
    c.n_head = 2;
    c.d_ff = 32;
    c.vocab = 64;
    c.image_begin = 24;
    c.speech_begin = 48;
    c.max_seq = 16;
    return c;
}

TEST_CASE("checkpoint: round trip of parameters, optimizer state and train state; atomic write") {
    MotModel<float> a, b;
    mot_init(&a, small_config(), 1);
    for (size_t i = 0; i < a.adam_m.size(); i++) {
        a.adam_m[i] = i * 1e-3f;
        a.adam_v[i] = i * 1e-4f;
    }
    std::string err;
    REQUIRE(mot_save_checkpoint(tmp("m.ckpt"), a, MotTrainState{42, 0xABCDEF}, true, &err));
    CHECK(access(tmp("m.ckpt.tmp").c_str(), F_OK) != 0);  // the temp file was renamed away
    mot_init(&b, small_config(), 2);
    MotTrainState st;
    bool has_opt = false;
    REQUIRE(mot_load_checkpoint(tmp("m.ckpt"), &b, &st, &has_opt, &err));
    CHECK(has_opt);
    CHECK(st.step == 42);
    CHECK(st.data_rng == 0xABCDEF);
    CHECK(a.params == b.params);
    CHECK(a.adam_m == b.adam_m);
    CHECK(a.adam_v == b.adam_v);
}

TEST_CASE("checkpoint: wrong magic, version, truncation, other config, missing file") {
    MotModel<float> a;
    mot_init(&a, small_config(), 1);
    std::string err;
    REQUIRE(mot_save_checkpoint(tmp("c.ckpt"), a, MotTrainState{}, false, &err));
    const std::string good = read_bytes(tmp("c.ckpt"));
    auto bad = [&](const std::string& name, const std::string& bytes, const std::string& expect) {
        write_bytes(tmp(name), bytes);
        CHECK_FALSE(mot_load_checkpoint(tmp(name), &a, nullptr, nullptr, &err));
        INFO(err);
        CHECK(err.find(tmp(name)) == 0);
        CHECK(err.find(expect) != std::string::npos);
    };
    std::string b = good;
    b[1] = 'X';
    bad("magic.ckpt", b, "bad magic");
    b = good;
    b[4] = 5;
    bad("version.ckpt", b, "version 5");
    bad("trunc.ckpt", good.substr(0, good.size() - 1), "truncated");
    bad("head.ckpt", good.substr(0, 20), "truncated");
    MotModel<float> other;
    MotConfig oc = small_config();
    oc.d_model = 32;
    mot_init(&other, oc, 1);
    CHECK_FALSE(mot_load_checkpoint(tmp("c.ckpt"), &other, nullptr, nullptr, &err));
    CHECK(err.find("d_model is 16 in the file but 32") != std::string::npos);
    CHECK_FALSE(mot_load_checkpoint(tmp("none.ckpt"), &a, nullptr, nullptr, &err));
    CHECK(err.find("cannot open") != std::string::npos);
}

TEST_CASE("debug state: round trip, and bad files are refused") {
    MotConfig c = small_config();
    MotModel<float> m;
    mot_init(&m, c, 3);
    auto toks = make_tokens(40, 3);
    MotBatch b;
    b.B = 2;
    b.T = 16;
    for (int i = 0; i < 32; i++) {
        b.tokens.push_back(toks[i]);
        b.targets.push_back(toks[i + 1]);
    }
    mot_group(c, &b);
    mot_forward(&m, b);
    mot_zero_grad(&m);
    mot_backward(&m, b);
    MotDebugState d = mot_debug_capture(m, b), e;
    std::string err;
    REQUIRE(mot_write_debug_state(tmp("d.dbg"), d, &err));
    REQUIRE(mot_read_debug_state(tmp("d.dbg"), &e, &err));
    CHECK(e.params == d.params);
    CHECK(e.grads == d.grads);
    CHECK(e.logits == d.logits);
    CHECK(e.tokens == d.tokens);
    CHECK(e.targets == d.targets);
    CHECK(e.loss == d.loss);
    CHECK(e.n_mod[1] == d.n_mod[1]);
    CHECK(mot_config_mismatch(e.cfg, c).empty());
    const std::string good = read_bytes(tmp("d.dbg"));
    std::string x = good;
    x[0] = 'Q';
    write_bytes(tmp("x.dbg"), x);
    CHECK_FALSE(mot_read_debug_state(tmp("x.dbg"), &e, &err));
    CHECK(err.find("bad magic") != std::string::npos);
    write_bytes(tmp("t.dbg"), good.substr(0, good.size() - 7));
    CHECK_FALSE(mot_read_debug_state(tmp("t.dbg"), &e, &err));
    CHECK(err.find("truncated") != std::string::npos);
}

// A header of the given magic/version/config followed by `tail` bytes (little-endian host).
template <class T>
static std::string bytes_of(const T& v) {
    return std::string((const char*)&v, sizeof v);
}
static std::string header(const char* magic, const int32_t cfg[MOT_CONFIG_INTS]) {
    return std::string(magic, 4) + bytes_of<uint32_t>(4) +
           std::string((const char*)cfg, 4 * MOT_CONFIG_INTS);  // version 4
}

TEST_CASE("hostile headers: sizes that wrap, huge configs in tiny files, unchecked fields") {
    std::string err;
    // (headers below are version 4: config[16], then the experts per FFN copy and the setting)
    // a 40-byte shard claiming 2^63 tokens: 32 + 2n wraps to 32 + 0
    uint32_t sh[6] = {0, 1, 64, 24, 48, 0};
    memcpy(sh, "MOTS", 4);
    for (uint64_t n : {1ull << 63, (1ull << 63) + 4, ~0ull}) {
        write_bytes(tmp("wrap.bin"), bytes_of(sh) + bytes_of(n) + std::string(8, '\1'));
        MotShard s;
        CHECK_FALSE(mot_read_shard(tmp("wrap.bin"), &s, &err));
        CHECK(err.find(tmp("wrap.bin") + ": truncated or padded") == 0);
    }
    // a debug state with B = T = 2^29: the expected size overflows
    MotConfig c = small_config();
    int32_t ci[MOT_CONFIG_INTS];
    mot_config_to_ints(c, ci);
    MotDebugState d;
    write_bytes(tmp("big.dbg"),
                header("MOTD", ci) + bytes_of<int32_t>(1 << 29) + bytes_of<int32_t>(1 << 29) + std::string(64, 0));
    CHECK_FALSE(mot_read_debug_state(tmp("big.dbg"), &d, &err));
    CHECK(err.find("bad batch shape") != std::string::npos);
    c.max_seq = 1 << 20;
    mot_config_to_ints(c, ci);
    write_bytes(tmp("big.dbg"),
                header("MOTD", ci) + bytes_of<int32_t>(1 << 16) + bytes_of<int32_t>(1 << 20) + std::string(64, 0));
    CHECK_FALSE(mot_read_debug_state(tmp("big.dbg"), &d, &err));
    CHECK(err.find("truncated or padded") != std::string::npos);

    // checkpoint headers: each must be refused by the header reader, before any allocation
    auto ckpt = [&](const int32_t* cfg, uint32_t opt, uint32_t reserved, int64_t step) {
        return header("MOTC", cfg) + bytes_of(opt) + bytes_of(reserved) + bytes_of(step) + bytes_of<uint64_t>(7);
    };
    auto refused = [&](const std::string& bytes, const std::string& expect) {
        write_bytes(tmp("h.ckpt"), bytes);
        MotConfig fc;
        CHECK_FALSE(mot_read_checkpoint_config(tmp("h.ckpt"), &fc, &err));
        INFO(err);
        CHECK(err.find(tmp("h.ckpt") + ": ") == 0);
        CHECK(err.find(expect) != std::string::npos);
    };
    // L = 2^31-1, D = 2, F = 1431655762 made the parameter count wrap (then a heap overflow)
    int32_t wrap[MOT_CONFIG_INTS] = {0x7fffffff, 2, 1, 1431655762, 64, 24, 48, 16, 3, 0, 0, 0, 1, 1, 1};
    refused(ckpt(wrap, 1, 0, 0), "sizes too large");
    // the largest config the bounds allow, in a 92-byte file: the size check comes first
    int32_t huge[MOT_CONFIG_INTS] = {
        MOT_MAX_LAYER, MOT_MAX_DIM, 2, MOT_MAX_FFN, 65536, 24, 48, MOT_MAX_SEQ, 3, 0, 0, 0, 1, 1, 1};
    refused(ckpt(huge, 1, 0, 0), "truncated or padded: expected ");
    // the same with 64 experts in every FFN copy: the parameter count (with experts) still fits
    int32_t huge_experts[MOT_CONFIG_INTS] = {
        MOT_MAX_LAYER,  MOT_MAX_DIM,   2, MOT_MAX_FFN, 65536, 24, 48, MOT_MAX_SEQ, 3, 0, 0, 0, MOT_MAX_EXPERT,
        MOT_MAX_EXPERT, MOT_MAX_EXPERT};
    refused(ckpt(huge_experts, 1, 0, 0), "truncated or padded: expected ");
    mot_config_to_ints(small_config(), ci);
    MotModel<float> m;
    mot_init(&m, small_config(), 1);
    const std::string params(4 * m.tab.total, 0);
    refused(ckpt(ci, 0, 0, -1) + params, "step -1 out of range");
    refused(ckpt(ci, 0, 0, 1ll << 40) + params, "step 1099511627776 out of range");
    refused(ckpt(ci, 0, 5, 0) + params, "reserved header field is 5");
    refused(ckpt(ci, 2, 0, 0) + params, "bad has_optimizer flag 2");
    write_bytes(tmp("h.ckpt"), ckpt(ci, 0, 0, 1 << 30) + params);  // the largest step is fine
    CHECK(mot_load_checkpoint(tmp("h.ckpt"), &m, nullptr, nullptr, &err));
    // and through the commands: one line, exit 1, no crash
    write_bytes(tmp("wrap.ckpt"), ckpt(wrap, 1, 0, 0));
    write_bytes(tmp("huge.ckpt"), ckpt(huge, 1, 0, 0));
    for (const char* f : {"wrap.ckpt", "huge.ckpt"})
        for (std::string cmd : {"./mot --data " + tmp("g.bin") + " --seq 8 --init-from ",
                                std::string("./mot sample --task text --prompt hi --ckpt ")}) {
            std::string out;
            const int rc = run(cmd + tmp(f), &out);
            INFO(cmd, f, "\n", out);
            CHECK(rc == 1);
            CHECK(count_lines(out) == 1);
            CHECK(out.find(tmp(f) + ": ") != std::string::npos);
        }
}

// ---- the trainer command ----------------------------------------------------------------------
// Every failure is one line on stderr naming the flag or file, with a non-zero exit, never a crash.
static void expect_error(const std::string& args, const std::string& expect, int code = -1) {
    std::string out;
    int rc = run("./mot " + args, &out);
    INFO("./mot ", args, "\n", out);
    CHECK(rc != 0);
    CHECK(rc < 128);  // an exit, not a signal
    if (code >= 0) CHECK(rc == code);
    CHECK(count_lines(out) == 1);
    CHECK(out.find("error: ") == 0);
    CHECK(out.find(expect) != std::string::npos);
}

TEST_CASE("mot: trains on a shard, loss falls, writes checkpoint and debug state; resume works") {
    REQUIRE(access("./mot", X_OK) == 0);
    auto toks = make_tokens(20000, 5);
    std::string err, out;
    REQUIRE(mot_write_shard(tmp("train_0.bin"), VOC, toks.data(), toks.size(), &err));
    const std::string base = "--data " + tmp("train_0.bin") +
                             " --layers 2 --dim 32 --heads 4 --seq 32 --batch 4"
                             " --lr 3e-3 --warmup 5 --threads 2";
    int rc = run("./mot " + base + " --steps 40 --save " + tmp("r.ckpt") + " --debug-state " + tmp("r.dbg") +
                     " --log " + tmp("r.csv"),
                 &out);
    INFO(out);
    REQUIRE(rc == 0);
    CHECK(out.find("step    40/40") != std::string::npos);
    std::string csv = read_bytes(tmp("r.csv"));
    CHECK(count_lines(csv) == 41);
    double first = atof(csv.substr(csv.find("\n1,") + 3).c_str());
    double last = atof(csv.substr(csv.find("\n40,") + 4).c_str());
    MESSAGE("train loss ", first, " -> ", last);
    CHECK(last < first - 0.5);
    MotDebugState d;
    REQUIRE(mot_read_debug_state(tmp("r.dbg"), &d, &err));
    CHECK(d.cfg.d_model == 32);
    // resume: flags that agree are accepted; steps continue from the checkpoint
    rc = run("./mot " + base + " --steps 45 --init-from " + tmp("r.ckpt"), &out);
    CHECK(rc == 0);
    CHECK(out.find("resumed from") != std::string::npos);
    CHECK(out.find("step    45/45") != std::string::npos);
    CHECK(out.find("step     1/") == std::string::npos);
    // without model flags the checkpoint decides the shape, sequence length included
    rc = run("./mot --data " + tmp("train_0.bin") + " --eval-only --val " + tmp("train_0.bin") + " --init-from " +
                 tmp("r.ckpt"),
             &out);
    CHECK(rc == 0);
    CHECK(out.find("T=32") != std::string::npos);
    // and ones that disagree are refused, naming the field
    expect_error(base + " --dim 64 --init-from " + tmp("r.ckpt"), "d_model is 32 in the checkpoint but 64");
    expect_error("--data " + tmp("train_0.bin") + " --seq 16 --init-from " + tmp("r.ckpt"), "max_seq");
}

TEST_CASE("mot: bad flags, bad values, missing and broken files") {
    auto toks = make_tokens(2000, 6);
    std::string err;
    REQUIRE(mot_write_shard(tmp("ok_0.bin"), VOC, toks.data(), toks.size(), &err));
    const std::string data = "--data " + tmp("ok_0.bin") + " --steps 1 --seq 16 --batch 1 --layers 1 --dim 8 --heads 2";
    expect_error("--bogus", "unknown flag '--bogus'", 2);
    expect_error("--dim abc", "bad value for --dim: 'abc'", 2);
    expect_error("--lr -1", "bad value for --lr", 2);
    expect_error("--lr abc", "bad value for --lr: 'abc' (expected a number in [0, 1e+38])", 2);  // not 39 digits
    {
        std::string out;
        CHECK(run("./mot sample --task bogus", &out) == 2);
        CHECK(count_lines(out) == 1);
        CHECK(out.find("'bogus' (expected text, image, speech, caption or transcript)") != std::string::npos);
    }
    expect_error("--steps", "--steps needs a value", 2);
    expect_error(data + " --heads 3", "not a multiple of n_head", 2);
    expect_error("--data " + tmp("nope_*.bin"), "no file matches");
    write_bytes(tmp("bad_0.bin"), "MOTX garbage");
    expect_error("--data " + tmp("bad_0.bin"), "bad_0.bin: truncated");
    std::string g = read_bytes(tmp("ok_0.bin"));
    g[0] = 'Z';
    write_bytes(tmp("magic_0.bin"), g);
    expect_error("--data " + tmp("magic_0.bin"), "bad magic");
    g = read_bytes(tmp("ok_0.bin"));
    g[40] = (char)0xff;
    g[41] = (char)0xff;
    write_bytes(tmp("oov_0.bin"), g);
    expect_error("--data " + tmp("oov_0.bin"), "token 65535 at position 4 is outside the vocabulary");
    expect_error(data + " --init-from " + tmp("missing.ckpt"), "missing.ckpt: cannot open");
    write_bytes(tmp("junk.ckpt"), "MOTC\x01");
    expect_error(data + " --init-from " + tmp("junk.ckpt"), "junk.ckpt: truncated");
    expect_error(data + " --save /nonexistent/dir/x.ckpt", "/nonexistent/dir/x.ckpt.tmp: cannot open for writing");
    // sizes beyond the machine get a message before any allocation, not std::bad_alloc
    expect_error("--data " + tmp("ok_0.bin") + " --seq 16 --dim 65536 --heads 8", "model too large for this machine",
                 2);
    expect_error("--data " + tmp("ok_0.bin") + " --seq 1900 --batch 65536 --layers 1 --dim 8 --heads 2",
                 "model too large", 2);
    auto longer = make_tokens(120000, 7);
    REQUIRE(mot_write_shard(tmp("long_0.bin"), VOC, longer.data(), longer.size(), &err));
    expect_error("--data " + tmp("long_0.bin") + " --seq 100000", "model too large for this machine", 2);
    // a bad --val is found before the first step (no log, no checkpoint written)
    expect_error(data + " --steps 5 --val " + tmp("nope_*.bin") + " --out " + tmp("runV"),
                 "nope_*.bin: no file matches");
    CHECK(access(tmp("runV/log.csv").c_str(), F_OK) != 0);
    expect_error(data + " --dense --mot", "give either --mot or --dense, not both", 2);
    expect_error(data + " --mot --dense", "give either --mot or --dense, not both", 2);
    expect_error(data + " --bf16 --fp32", "give either --bf16 or --fp32, not both", 2);
}

// The loss column of a log.csv, as exact text, by step.
static std::map<int, std::string> losses(const std::string& csv) {
    std::map<int, std::string> out;
    size_t pos = csv.find('\n') + 1;
    while (pos < csv.size()) {
        size_t end = csv.find('\n', pos);
        std::string line = csv.substr(pos, end - pos);
        size_t c1 = line.find(','), c2 = line.find(',', c1 + 1);
        out[atoi(line.c_str())] = line.substr(c1 + 1, c2 - c1 - 1);
        pos = end + 1;
    }
    return out;
}

TEST_CASE("mot: a resumed run's losses are bitwise identical to an uninterrupted run's") {
    auto toks = make_tokens(20000, 8);
    std::string err, out;
    REQUIRE(mot_write_shard(tmp("res_0.bin"), VOC, toks.data(), toks.size(), &err));
    const std::string base = "./mot --data " + tmp("res_0.bin") +
                             " --layers 2 --dim 32 --heads 4 --seq 32 --batch 4 --warmup 5 --steps 24 --threads 2";
    REQUIRE(run(base + " --out " + tmp("deep/er/runA"), &out) == 0);  // parents are created
    // run B saves every 4 steps, keeping the newest 2
    REQUIRE(run(base + " --out " + tmp("runB") + " --save-every 4 --keep 2", &out) == 0);
    std::string outc;
    REQUIRE(run("ls " + tmp("runB"), &outc) == 0);
    CHECK(outc.find("step_000020.ckpt") != std::string::npos);
    CHECK(outc.find("step_000024.ckpt") != std::string::npos);
    CHECK(outc.find("step_000016.ckpt") == std::string::npos);
    // resume B from step 20 into a fresh folder and compare steps 21..24 with run A
    REQUIRE(run("rm -rf " + tmp("runD") + " && mkdir " + tmp("runD") + " && cp " + tmp("runB") + "/step_000020.ckpt " +
                    tmp("runD") + "/",
                &outc) == 0);
    REQUIRE(run(base + " --out " + tmp("runD") + " --resume", &out) == 0);
    CHECK(out.find("resumed from") != std::string::npos);
    auto a = losses(read_bytes(tmp("deep/er/runA/log.csv"))), d = losses(read_bytes(tmp("runD/log.csv")));
    REQUIRE(d.size() == 4);
    for (int s = 21; s <= 24; s++) {
        INFO("step ", s);
        CHECK(d[s] == a[s]);
    }
    MotModel<float> ma, md;
    MotConfig c;
    REQUIRE(mot_read_checkpoint_config(tmp("deep/er/runA/model.ckpt"), &c, &err));
    mot_init(&ma, c, 1);
    mot_init(&md, c, 1);
    REQUIRE(mot_load_checkpoint(tmp("deep/er/runA/model.ckpt"), &ma, nullptr, nullptr, &err));
    REQUIRE(mot_load_checkpoint(tmp("runD/model.ckpt"), &md, nullptr, nullptr, &err));
    CHECK(ma.params == md.params);  // and so are the final weights
}

TEST_CASE("mot --bf16: the engine is named, a resume is bitwise, checkpoints pass between bf16 and fp32 runs") {
    auto toks = make_tokens(20000, 9);
    std::string err, out, outc;
    REQUIRE(mot_write_shard(tmp("b16_0.bin"), VOC, toks.data(), toks.size(), &err));
    const std::string base =
        "./mot --data " + tmp("b16_0.bin") + " --layers 2 --dim 64 --heads 4 --seq 32 --batch 4 --warmup 4 --steps 12";
    REQUIRE(run("rm -rf " + tmp("b16A") + " " + tmp("b16B") + " " + tmp("b16C") + " " + tmp("f32A"), &outc) == 0);
    REQUIRE(run(base + " --bf16 --threads 2 --out " + tmp("b16A"), &out) == 0);
    INFO(out);
    CHECK(out.find(", bf16 on ") != std::string::npos);  // the engine, once
    CHECK(out.find("bf16 on", out.find("bf16 on") + 1) == std::string::npos);
    REQUIRE(run(base + " --threads 2 --out " + tmp("f32A"), &out) == 0);
    CHECK(out.find("bf16") == std::string::npos);
    // bf16 changes the numbers, a little (the step test in test_mot bounds by how much)
    auto a = losses(read_bytes(tmp("b16A/log.csv"))), f = losses(read_bytes(tmp("f32A/log.csv")));
    REQUIRE(a.size() == 12);
    CHECK(a[12] != f[12]);
    CHECK(std::fabs(atof(a[12].c_str()) - atof(f[12].c_str())) < 0.05);
    // resume: from run B's step-6 checkpoint, on one thread, steps 7..12 and the weights as run A's
    REQUIRE(run(base + " --bf16 --threads 2 --save-every 6 --out " + tmp("b16B"), &out) == 0);
    REQUIRE(run("mkdir " + tmp("b16C") + " && cp " + tmp("b16B") + "/step_000006.ckpt " + tmp("b16C") + "/", &outc) ==
            0);
    REQUIRE(run(base + " --bf16 --threads 1 --out " + tmp("b16C") + " --resume", &out) == 0);
    auto c = losses(read_bytes(tmp("b16C/log.csv")));
    REQUIRE(c.size() == 6);
    for (int s = 7; s <= 12; s++) {
        INFO("step ", s);
        CHECK(c[s] == a[s]);
    }
    MotConfig cfg;
    REQUIRE(mot_read_checkpoint_config(tmp("b16A/model.ckpt"), &cfg, &err));
    MotModel<float> ma, mc;
    mot_init(&ma, cfg, 1);
    mot_init(&mc, cfg, 1);
    REQUIRE(mot_load_checkpoint(tmp("b16A/model.ckpt"), &ma, nullptr, nullptr, &err));
    REQUIRE(mot_load_checkpoint(tmp("b16C/model.ckpt"), &mc, nullptr, nullptr, &err));
    CHECK(ma.params == mc.params);
    // a bf16 run's checkpoint continues in fp32, and that one in bf16 again
    REQUIRE(run(base + " --steps 14 --init-from " + tmp("b16A/model.ckpt") + " --save " + tmp("b16_to_f32.ckpt"),
                &out) == 0);
    CHECK(out.find("resumed from") != std::string::npos);
    CHECK(out.find("step    14/14") != std::string::npos);
    REQUIRE(run(base + " --bf16 --steps 16 --init-from " + tmp("b16_to_f32.ckpt") + " --save " + tmp("back.ckpt"),
                &out) == 0);
    CHECK(out.find("step    16/16") != std::string::npos);
    MotTrainState st;
    REQUIRE(mot_load_checkpoint(tmp("back.ckpt"), &ma, &st, nullptr, &err));
    CHECK(st.step == 16);
}

TEST_CASE("mot: a NaN or Inf loss stops the run with a message and keeps the last good checkpoint") {
    auto toks = make_tokens(5000, 9);
    std::string err, out;
    REQUIRE(mot_write_shard(tmp("nan_0.bin"), VOC, toks.data(), toks.size(), &err));
    // lr 1e30: after one update the weights overflow float and the next loss is not finite
    int rc = run("./mot --data " + tmp("nan_0.bin") +
                     " --layers 1 --dim 16 --heads 2 --seq 16 --batch 2"
                     " --warmup 1 --clip 0 --lr 1e30 --steps 10 --save-every 1 --out " +
                     tmp("runN"),
                 &out);
    INFO(out);
    CHECK(rc == 1);
    CHECK(out.find("error: loss is") != std::string::npos);
    CHECK(out.find("stopping") != std::string::npos);
    MotConfig c;
    REQUIRE(mot_read_checkpoint_config(tmp("runN/step_000001.ckpt"), &c, &err));
    MotModel<float> m;
    mot_init(&m, c, 1);
    MotTrainState st;
    REQUIRE(mot_load_checkpoint(tmp("runN/step_000001.ckpt"), &m, &st, nullptr, &err));
    CHECK(st.step == 1);
    bool finite = true;
    for (float w : m.params) finite &= std::isfinite(w);
    CHECK(finite);
    CHECK(access(tmp("runN/model.ckpt").c_str(), F_OK) != 0);  // no final checkpoint of a broken model
}

TEST_CASE("mot: --out on a folder holding a run refuses; --overwrite clears the old run first") {
    auto toks = make_tokens(5000, 11);
    std::string err, out;
    REQUIRE(mot_write_shard(tmp("ow_0.bin"), VOC, toks.data(), toks.size(), &err));
    const std::string base =
        "--data " + tmp("ow_0.bin") + " --layers 1 --dim 16 --heads 2 --seq 16 --batch 2 --threads 1";
    const std::string dir = tmp("runO");
    REQUIRE(run("./mot " + base + " --steps 4 --save-every 2 --out " + dir, &out) == 0);
    REQUIRE(run("mkdir -p " + dir + "/samples && echo old > " + dir + "/samples/image_00.png && echo old > " + dir +
                    "/eval.csv",
                &out) == 0);
    const std::string model = read_bytes(dir + "/model.ckpt"), log = read_bytes(dir + "/log.csv");
    // a new run into it: refused, one line naming both ways out, nothing touched
    expect_error(base + " --steps 3 --out " + dir, dir + " already holds a run", 2);
    expect_error(base + " --steps 3 --out " + dir, "--resume to continue it or --overwrite to start over", 2);
    CHECK(read_bytes(dir + "/model.ckpt") == model);
    CHECK(read_bytes(dir + "/log.csv") == log);
    expect_error(base + " --steps 3 --overwrite", "--overwrite needs --out", 2);
    expect_error(base + " --steps 3 --out " + dir + " --overwrite --resume", "either --resume or --overwrite", 2);
    // --overwrite: the old checkpoints, samples, eval and log are gone before the new run starts
    REQUIRE(run("./mot " + base + " --steps 3 --seed 7 --save-every 3 --out " + dir + " --overwrite", &out) == 0);
    CHECK(access((dir + "/step_000002.ckpt").c_str(), F_OK) != 0);
    CHECK(access((dir + "/step_000004.ckpt").c_str(), F_OK) != 0);
    CHECK(access((dir + "/samples/image_00.png").c_str(), F_OK) != 0);
    CHECK(access((dir + "/eval.csv").c_str(), F_OK) != 0);
    auto l = losses(read_bytes(dir + "/log.csv"));
    CHECK(l.size() == 3);  // steps 1..3 of the new run only
    CHECK(l.count(4) == 0);
    CHECK(read_bytes(dir + "/model.ckpt") != model);
    MotConfig c;
    MotModel<float> m;
    MotTrainState st;
    REQUIRE(mot_read_checkpoint_config(dir + "/model.ckpt", &c, &err));
    mot_init(&m, c, 1);
    REQUIRE(mot_load_checkpoint(dir + "/model.ckpt", &m, &st, nullptr, &err));
    CHECK(st.step == 3);
    // --resume still continues a run in place (this is what make train does)
    REQUIRE(run("./mot " + base + " --steps 5 --seed 7 --out " + dir + " --resume", &out) == 0);
    CHECK(out.find("step     4/5") != std::string::npos);
}

TEST_CASE("mot: progress messages: ETA, and a warning when nothing is saved") {
    auto toks = make_tokens(5000, 12);
    std::string err, out;
    REQUIRE(mot_write_shard(tmp("eta_0.bin"), VOC, toks.data(), toks.size(), &err));
    const std::string base =
        "./mot --data " + tmp("eta_0.bin") + " --layers 1 --dim 16 --heads 2 --seq 16 --batch 2 --threads 1";
    REQUIRE(run(base + " --steps 12 --val " + tmp("eta_0.bin") + " --eval-every 8 --eval-batches 1", &out) == 0);
    INFO(out);
    CHECK(out.find("nothing of this run is saved") != std::string::npos);  // no --out, no --save
    // the first steps are not timed (they are slow); until an evaluation has been timed the ETA is
    // a lower bound; then it is a duration
    CHECK(out.find("step     1/12 ") != std::string::npos);
    CHECK(out.find("eta ?\n") != std::string::npos);
    CHECK(out.find("| eta >") != std::string::npos);
    const size_t last = out.find("step    11/12");
    REQUIRE(last != std::string::npos);
    const std::string line = out.substr(last, out.find('\n', last) - last);
    CHECK(line.find("| eta >") == std::string::npos);
    CHECK(line.back() == 's');
    REQUIRE(run(base + " --steps 1 --out " + tmp("etaO"), &out) == 0);
    CHECK(out.find("nothing of this run is saved") == std::string::npos);
    REQUIRE(run("./mot --help", &out) == 0);
    CHECK(out.find("without --out or --save nothing is saved") != std::string::npos);
}
