// test_crash.cpp — crash safety of the trainer: kill -9 at random moments and resume, a
// damaged newest checkpoint, a full disk, and log.csv after a resume. Runs ./mot.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <map>
#include <set>

#include "mot.h"
#include "test/common.h"

// The training shard of every case (documents mixing the three modalities).
static std::string shard() {
    static const std::string path = write_shard("train_0.bin", 11);
    return path;
}

static const int STEPS = 600;
static std::string flags(int steps = STEPS) {
    return "--data " + shard() + " --layers 1 --dim 16 --heads 2 --seq 16 --batch 2 --warmup 5 --threads 1 --steps " +
           std::to_string(steps);
}

// log.csv rows: step -> the loss column as exact text; `dups` counts steps seen more than once.
static std::map<int, std::string> losses(const std::string& csv, int* dups = nullptr) {
    std::map<int, std::string> out;
    if (dups) *dups = 0;
    size_t pos = csv.find('\n') + 1;
    while (pos > 0 && pos < csv.size()) {
        size_t end = csv.find('\n', pos);
        if (end == std::string::npos) break;
        std::string line = csv.substr(pos, end - pos);
        size_t c1 = line.find(','), c2 = line.find(',', c1 + 1);
        int step = atoi(line.c_str());
        if (dups && out.count(step)) ++*dups;
        out[step] = line.substr(c1 + 1, c2 - c1 - 1);
        pos = end + 1;
    }
    return out;
}

// The uninterrupted run everything is compared with.
static const std::map<int, std::string>& reference() {
    static std::map<int, std::string> ref;
    if (ref.empty()) {
        std::string out;
        REQUIRE(run("./mot " + flags() + " --out " + tmp("ref"), &out) == 0);
        ref = losses(read_bytes(tmp("ref/log.csv")));
        REQUIRE(ref.size() == (size_t)STEPS);
    }
    return ref;
}

// Step of the newest periodic checkpoint whose header and size are intact (-1 if none).
static int newest_intact(const std::string& dir) {
    std::string out;
    run("ls " + dir + " 2>/dev/null", &out);
    int best = -1;
    for (size_t p = 0; (p = out.find("step_", p)) != std::string::npos; p += 5) {
        const std::string name = out.substr(p, 16);
        if (name.size() != 16 || name.substr(11) != ".ckpt" || out.compare(p + 16, 1, "\n") != 0) continue;
        MotConfig c;
        std::string err;
        if (mot_read_checkpoint_config(dir + "/" + name, &c, &err)) best = std::max(best, atoi(name.c_str() + 5));
    }
    return best;
}

static double now_ms() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

// Starts ./mot with stdout and stderr into `log`; returns its pid.
static pid_t spawn(const std::string& args, const std::string& log) {
    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
        dup2(fd, 1);
        dup2(fd, 2);
        execl("/bin/sh", "sh", "-c", ("exec ./mot " + args).c_str(), (char*)nullptr);
        _exit(127);
    }
    return pid;
}

TEST_CASE("kill -9 at random moments: every restart resumes from the newest complete checkpoint, bitwise") {
    const auto& ref = reference();
    const std::string dir = tmp("killed");
    const std::string args = flags() + " --save-every 1 --keep 3 --out " + dir + " --resume";
    uint64_t rng = 2026;
    int kills = 0, restarts = 0, finished = 0;
    // Every fourth kill comes at a random moment of the startup (loading, resuming); the others
    // 0-40 ms (a few steps, each with its checkpoint) after training began (the "threads:" line), during a step, a checkpoint write or
    // the deletion of old ones. Startup time varies (a CUDA build probes for a GPU), so training
    // is detected from the output rather than guessed. Bounded: at most 200 starts.
    const double t0 = now_ms();
    std::string o;
    REQUIRE(run("./mot " + flags(0) + " --out " + tmp("startup"), &o) == 0);
    const long startup = (long)(now_ms() - t0);
    for (int it = 0; it < 200 && !finished; it++) {
        const int expect = newest_intact(dir);
        const std::string log = tmp("kill_" + std::to_string(it) + ".txt");
        pid_t pid = spawn(args, log);
        const bool kill_it = kills < 20 || it % 2 == 0;  // at least 20 kills, then let it run every other time
        if (kill_it) {
            long ms = (long)(mot_rand_u64(&rng) % (it % 4 == 0 ? startup + 1 : 40));
            siginfo_t si{};
            if (it % 4 != 0)  // wait (at most 20 s) until it trains; WNOWAIT: not reaped here
                for (int w = 0; w < 4000 && read_bytes(log).find("threads:") == std::string::npos &&
                                waitid(P_PID, pid, &si, WEXITED | WNOHANG | WNOWAIT) == 0 && si.si_pid == 0;
                     w++) {
                    struct timespec t5 = {0, 5000000L};
                    nanosleep(&t5, nullptr);
                }
            struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
            nanosleep(&ts, nullptr);
            kill(pid, SIGKILL);
        }
        int st = 0;
        REQUIRE(waitpid(pid, &st, 0) == pid);
        const std::string out = read_bytes(log);
        INFO("start ", it, " (newest intact checkpoint: ", expect, ")\n", out);
        if (WIFSIGNALED(st)) kills++;
        else {
            REQUIRE(WIFEXITED(st));
            REQUIRE(WEXITSTATUS(st) == 0);
            finished = 1;
        }
        // what it resumed from, when it got that far: always the newest intact checkpoint
        const size_t r = out.find("resumed from ");
        if (r != std::string::npos) {
            restarts++;
            CHECK(expect >= 0);
            CHECK(out.find(" at step " + std::to_string(expect) + "\n", r) != std::string::npos);
        } else if (out.find("starting fresh") != std::string::npos) {
            CHECK(expect == -1);
        }
    }
    MESSAGE(kills, " kills, ", restarts, " starts resumed from a checkpoint (startup ", startup, " ms)");
    CHECK(kills >= 20);
    CHECK(restarts >= 8);
    REQUIRE(finished);
    int dups = 0;
    auto got = losses(read_bytes(dir + "/log.csv"), &dups);
    CHECK(dups == 0);  // a step redone after a resume is logged once
    REQUIRE(got.size() == ref.size());
    for (auto& [step, loss] : ref) {
        INFO("step ", step);
        CHECK(got[step] == loss);
    }
    MotModel<float> a, b;
    MotConfig c;
    std::string err;
    REQUIRE(mot_read_checkpoint_config(tmp("ref/model.ckpt"), &c, &err));
    mot_init(&a, c, 1);
    mot_init(&b, c, 1);
    REQUIRE(mot_load_checkpoint(tmp("ref/model.ckpt"), &a, nullptr, nullptr, &err));
    REQUIRE(mot_load_checkpoint(dir + "/model.ckpt", &b, nullptr, nullptr, &err));
    CHECK(a.params == b.params);
}

// A run of `steps` steps saving every 10 into dir, from scratch.
static void run_to(const std::string& dir, int steps) {
    std::string out;
    REQUIRE(run("rm -rf " + dir + " && ./mot " + flags(steps) + " --save-every 10 --keep 10 --out " + dir, &out) == 0);
}

TEST_CASE("a truncated or corrupt newest checkpoint: --resume falls back to the previous one, saying so") {
    run_to(tmp("fb_ref"), 80);  // the same run without damage
    const auto ref = losses(read_bytes(tmp("fb_ref/log.csv")));
    for (const char* damage : {"truncate", "magic", "reserved"}) {
        INFO(damage);
        const std::string dir = tmp(std::string("fb_") + damage);
        run_to(dir, 80);  // then as if it had died after step 60: the checkpoints after it go
        std::string out;
        REQUIRE(run("rm " + dir + "/step_000070.ckpt " + dir + "/step_000080.ckpt " + dir + "/model.ckpt", &out) == 0);
        const std::string newest = dir + "/step_000060.ckpt";
        std::string b = read_bytes(newest);
        if (std::string(damage) == "truncate") b.resize(b.size() / 2);
        else if (std::string(damage) == "magic") b[0] = 'X';
        else b[76] = 1;  // the reserved field of a version-3 header (dev/FORMATS.md, "Checkpoint")
        FILE* f = fopen(newest.c_str(), "wb");
        REQUIRE(f);
        fwrite(b.data(), 1, b.size(), f);
        fclose(f);
        const int rc = run("./mot " + flags(80) + " --save-every 10 --keep 3 --out " + dir + " --resume", &out);
        INFO(out);
        REQUIRE(rc == 0);
        CHECK(out.find("resume: skipping " + newest + ": ") != std::string::npos);
        CHECK(out.find("resume: falling back to " + dir + "/step_000050.ckpt") != std::string::npos);
        CHECK(out.find("resumed from " + dir + "/step_000050.ckpt at step 50") != std::string::npos);
        int dups = 0;
        auto got = losses(read_bytes(dir + "/log.csv"), &dups);
        CHECK(dups == 0);
        CHECK(got.size() == 80);
        for (int s = 51; s <= 80; s++) CHECK(got[s] == ref.at(s));  // the same run as without damage
    }
}

TEST_CASE("log.csv holds every step once after a resume from an older checkpoint") {
    const std::string dir = tmp("dup");
    run_to(dir, 30);  // log rows 1..30, checkpoints 10, 20, 30
    std::string out;
    REQUIRE(
        run("rm " + dir + "/step_000030.ckpt " + dir + "/step_000020.ckpt && printf '31,torn' >> " + dir + "/log.csv",
            &out) == 0);
    REQUIRE(run("./mot " + flags(30) + " --save-every 10 --keep 3 --out " + dir + " --resume", &out) == 0);
    CHECK(out.find("at step 10") != std::string::npos);
    int dups = 0;
    auto got = losses(read_bytes(dir + "/log.csv"), &dups);
    CHECK(dups == 0);
    CHECK(got.size() == 30);
    CHECK(got.begin()->first == 1);
    CHECK(got.rbegin()->first == 30);
    CHECK(read_bytes(dir + "/log.csv").find("torn") == std::string::npos);
    // killed before its first checkpoint: a --resume starts fresh and logs steps 1.. once
    REQUIRE(run("rm " + dir + "/step_*.ckpt", &out) == 0);
    REQUIRE(run("./mot " + flags(30) + " --save-every 10 --keep 3 --out " + dir + " --resume", &out) == 0);
    CHECK(out.find("starting fresh") != std::string::npos);
    got = losses(read_bytes(dir + "/log.csv"), &dups);
    CHECK(dups == 0);
    CHECK(got.size() == 30);
}

TEST_CASE("a full disk: the checkpoint write fails with one line and the last good checkpoint stays") {
    // A small tmpfs when this process may mount one (root in a container usually can), else a
    // file-size limit (ulimit -f) that makes the same write fail.
    const std::string mnt = tmp("small");
    std::string out;
    REQUIRE(run("mkdir -p " + mnt, &out) == 0);
    const std::string dir = mnt + "/run";
    // step_000010.ckpt with Adam moments is 92 + 12 P bytes; room for the log and two of them
    MotConfig c;
    {
        REQUIRE(run("./mot " + flags(0) + " --save " + tmp("size.ckpt"), &out) == 0);
        std::string err;
        REQUIRE(mot_read_checkpoint_config(tmp("size.ckpt"), &c, &err));
    }
    const size_t ck = MOT_CKPT_HEADER + 12 * mot_param_table(c).total;
    const bool tmpfs =
        !getenv("MOT_TEST_NO_TMPFS") &&
        mount("tmpfs", mnt.c_str(), "tmpfs", 0, ("size=" + std::to_string(2 * ck + 64 * 1024)).c_str()) == 0;
    const std::string how = tmpfs ? "a tmpfs of " + std::to_string(2 * ck + 64 * 1024) + " bytes"
                                  : "ulimit -f (mount failed), checkpoints of " + std::to_string(ck) + " bytes";
    MESSAGE("disk full: ", how);
    // steps 1-20 elsewhere, then their checkpoints (10, 20) and log are copied in: the resumed
    // run's write of step 30 is the one that runs out of space
    run_to(tmp("before_full"), 20);
    REQUIRE(run("mkdir -p " + dir + " && cp " + tmp("before_full") + "/step_0000[12]0.ckpt " + tmp("before_full") +
                    "/log.csv " + dir + "/",
                &out) == 0);
    // bash's ulimit -f counts 1024-byte blocks: half a checkpoint
    const std::string prefix = tmpfs ? "" : "ulimit -f " + std::to_string(ck / 2 / 1024) + "; trap '' XFSZ; ";
    const int rc = run("bash -c \"" + prefix + "exec ./mot " + flags(40) + " --save-every 10 --keep 3 --out " + dir +
                           " --resume 2>" + tmp("full_err.txt") + "\"",
                       &out);
    const std::string err_out = read_bytes(tmp("full_err.txt"));
    INFO(out, "\nstderr: ", err_out);
    CHECK(rc == 1);
    CHECK(std::count(err_out.begin(), err_out.end(), '\n') == 1);
    CHECK(err_out.find("error: " + dir + "/step_000030.ckpt.tmp: write failed: ") == 0);
    CHECK(access((dir + "/step_000030.ckpt.tmp").c_str(), F_OK) != 0);  // no partial file left
    MotModel<float> m;
    mot_init(&m, c, 1);
    MotTrainState st;
    std::string err;
    CHECK(mot_load_checkpoint(dir + "/step_000020.ckpt", &m, &st, nullptr, &err));
    CHECK(st.step == 20);
    if (tmpfs) umount(mnt.c_str());
}
