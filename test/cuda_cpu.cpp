// cuda_cpu.cpp — the machinery behind cuda_cpu.h: fibers and the block scheduler, device memory,
// the checks (each report names the launch's file:line, the kernel, the block and the thread, and
// exits with status 1), the CUDA runtime calls, cuBLAS GEMMs and, with -DCUDA_CPU_MPI, NCCL over MPI.
//
// Contents:
//   1. reports            2. fibers (a context switch in a few instructions)
//   3. the block scheduler: barriers, shuffles, shared arrays, launch checks
//   4. device memory: guarded allocations, copies and their checks, signal handlers
//   5. the runtime API    6. cuBLAS          7. NCCL over MPI
#include "cuda_cpu.h"

#include <algorithm>
#include <cfenv>
#include <chrono>
#include <climits>
#include <csignal>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <unordered_set>
#include <sys/mman.h>
#include <unistd.h>
#include <vector>
#include <xmmintrin.h>
#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#ifdef CUDA_CPU_MPI
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#include <mpi.h>
#include <nccl.h>
#endif

// this file defines the real functions behind the call-site macros of cuda_cpu.h
#undef cudaMemcpy
#undef cudaMemcpyAsync
#undef cudaMemset
#undef cudaMemsetAsync
#undef cudaFree
#undef cublasGemmEx

namespace cuda_cpu {

Coords g_coords;
bool g_in_kernel = false;

// ============================================================================================
// 1. Reports
// ============================================================================================
static const LaunchSite* g_site = nullptr;  // the launch running now
static const char* g_api_file = nullptr;    // the runtime/cuBLAS call running now (for signal reports)
static int g_api_line = 0;
static const char* g_api_what = nullptr;

// "cuda_cpu: FILE:LINE: kernel K, block (x,y,z), thread (x,y,z): WHAT" (or the host call's site),
// written with write(2) so that signal handlers can use it too; then exit status 1.
static void vreport(const char* file, int line, const char* fmt, va_list ap) {
    char msg[1024], out[1400];
    vsnprintf(msg, sizeof msg, fmt, ap);
    int n;
    if (g_in_kernel && g_site) {
        const uint3 b = g_coords.block_idx, t = g_coords.thread_idx;
        n = snprintf(out, sizeof out, "cuda_cpu: %s:%d: kernel %s, block (%u,%u,%u), thread (%u,%u,%u): %s\n",
                     g_site->file, g_site->line, g_site->kernel, b.x, b.y, b.z, t.x, t.y, t.z, msg);
    } else {
        n = snprintf(out, sizeof out, "cuda_cpu: %s:%d: %s\n", file ? file : "?", line, msg);
    }
    fflush(stdout);
    if (write(2, out, (size_t)std::min(n, (int)sizeof out - 1)) < 0) {}
    _exit(1);
}
[[noreturn]] static void report(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
[[noreturn]] static void report(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vreport(nullptr, 0, fmt, ap);
    va_end(ap);
    _exit(1);
}
[[noreturn]] static void report_at(const char* file, int line, const char* fmt, ...)
    __attribute__((format(printf, 3, 4)));
[[noreturn]] static void report_at(const char* file, int line, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vreport(file, line, fmt, ap);
    va_end(ap);
    _exit(1);
}

// ============================================================================================
// 2. Fibers
// ============================================================================================
// switch_stack(&save, to): pushes the callee-saved registers and the SSE/x87 control words on the
// current stack, stores the stack pointer in *save, loads `to` and pops the same from there. A new
// fiber's stack is laid out as if it had called switch_stack, with fiber_main as the return address.
// Each fiber keeps its own MXCSR, so kernels run with the invalid-operation trap on (section 4).
#if defined(__x86_64__)
extern "C" void cuda_cpu_switch_stack(void** save, void* to);
asm(R"(
    .text
    .globl cuda_cpu_switch_stack
    .type cuda_cpu_switch_stack, @function
cuda_cpu_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuda_cpu_switch_stack, .-cuda_cpu_switch_stack
    .section .note.GNU-stack,"",@progbits
)");
#else
#error "cuda_cpu: the fiber switch is written for x86-64"
#endif

struct Thread {
    void* sp = nullptr;  // saved stack pointer while switched out
    uint3 idx;
    enum State { RUNNABLE, AT_BARRIER, AT_SHFL, EXITED } state = RUNNABLE;
    const char* wait_file = nullptr;  // where it waits
    int wait_line = 0;
    // a pending warp exchange
    int kind = 0;  // ShflKind, or SHFL_SYNC for __syncwarp
    unsigned mask = 0;
    int arg = 0, width = 32;
    uint64_t value = 0, result = 0;
};
enum { SHFL_SYNC = 100, SHFL_CONVERGE = 101 };  // __syncwarp(); a WMMA call's convergence check

static size_t stack_bytes() {
    static size_t s = [] {
        size_t kb = 256;
        if (const char* e = getenv("CUDA_CPU_STACK_KB")) kb = (size_t)std::max(16L, atol(e));
        return kb << 10;
    }();
    return s;
}
static const size_t kPage = 4096;
struct Stack {
    char* lo = nullptr;  // the guard page; the usable stack is [lo + kPage, lo + kPage + stack_bytes())
};
static std::vector<Stack> g_stacks;  // one per thread index of a block, reused by every block

static char* stack_for(int t) {
    if ((int)g_stacks.size() <= t) g_stacks.resize(t + 1);
    Stack& s = g_stacks[t];
    if (!s.lo) {
        void* p = mmap(nullptr, stack_bytes() + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) report("cannot map a fiber stack of %zu KB", stack_bytes() >> 10);
        mprotect(p, kPage, PROT_NONE);  // a stack overflow faults here (reported by the SIGSEGV handler)
        s.lo = (char*)p;
    }
    return s.lo;
}

static std::vector<Thread> g_threads;  // the running block's threads
static Thread* g_cur = nullptr;
static void* g_sched_sp = nullptr;
static void (*g_body)(void*) = nullptr;
static void* g_body_arg = nullptr;
#ifdef __SANITIZE_ADDRESS__
static const void* g_sched_stack_bottom = nullptr;
static size_t g_sched_stack_size = 0;
#endif

[[noreturn]] static void fiber_main();
static void fiber_exit_switch();

static void fiber_init(Thread* t, int index) {
    char* top = stack_for(index) + kPage + stack_bytes();  // 16-byte aligned (page aligned)
    void** sp = (void**)top;
    *--sp = nullptr;                              // fake return address of fiber_main (keeps the ABI's alignment)
    *--sp = (void*)&fiber_main;                   // where switch_stack's `ret` goes
    for (int i = 0; i < 6; i++) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
    uint32_t ctl[2];
    ctl[0] = (_mm_getcsr() & ~0x3Fu) & ~(1u << 7);  // flags cleared, invalid-operation trap on
    uint16_t cw;
    __asm__ volatile("fnstcw %0" : "=m"(cw));
    ctl[1] = cw;
    *--sp = nullptr;
    memcpy(sp, ctl, 8);
    t->sp = sp;
}

// scheduler -> thread t
static void resume(Thread* t) {
    g_cur = t;
    g_coords.thread_idx = t->idx;
    g_in_kernel = true;
#ifdef __SANITIZE_ADDRESS__
    void* fake = nullptr;
    const int i = (int)(t - g_threads.data());
    __sanitizer_start_switch_fiber(&fake, stack_for(i) + kPage, stack_bytes());
#endif
    cuda_cpu_switch_stack(&g_sched_sp, t->sp);
#ifdef __SANITIZE_ADDRESS__
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
    g_in_kernel = false;
}
// thread -> scheduler; returns when the scheduler resumes this thread
static void yield() {
    Thread* me = g_cur;
#ifdef __SANITIZE_ADDRESS__
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, g_sched_stack_bottom, g_sched_stack_size);
#endif
    cuda_cpu_switch_stack(&me->sp, g_sched_sp);
#ifdef __SANITIZE_ADDRESS__
    __sanitizer_finish_switch_fiber(fake, &g_sched_stack_bottom, &g_sched_stack_size);
#endif
}
static void fiber_main() {
#ifdef __SANITIZE_ADDRESS__
    __sanitizer_finish_switch_fiber(nullptr, &g_sched_stack_bottom, &g_sched_stack_size);
#endif
    g_body(g_body_arg);
    g_cur->state = Thread::EXITED;
    fiber_exit_switch();
    __builtin_unreachable();
}
static void fiber_exit_switch() {
#ifdef __SANITIZE_ADDRESS__
    __asan_handle_no_return();  // unpoison this stack's dead frames: the next block's fiber reuses it
    __sanitizer_start_switch_fiber(nullptr, g_sched_stack_bottom, g_sched_stack_size);  // this fiber is done
#endif
    void* dead;
    cuda_cpu_switch_stack(&dead, g_sched_sp);
}

// ============================================================================================
// 3. The block scheduler
// ============================================================================================
static const size_t kSharedLimit = 48 * 1024;  // static + dynamic shared memory without opt-in
static const uint32_t kNaN = 0x7FA07FA0u;      // a signaling NaN as float, and as each bf16 half
static void fill_nan(void* p, size_t bytes) {
    unsigned char pat[4];
    memcpy(pat, &kNaN, 4);
    unsigned char* c = (unsigned char*)p;
    for (size_t i = 0; i < bytes; i++) c[i] = pat[((uintptr_t)(c + i)) & 3];
}

struct SharedArray {
    void* p;
    size_t bytes;
    const char* name;
};
static std::vector<SharedArray> g_shared_launch;  // the static shared arrays this launch declared
static uint32_t g_interval = 0;                   // barrier intervals so far (the race check's clock)
static const char* g_interval_file = nullptr;     // the __syncthreads() that began the current one
static int g_interval_line = 0;
static std::vector<void*> g_shared_block;  // ... and those filled for the running block
static size_t g_shared_static = 0;
static std::vector<char> g_dyn_shared;  // dynamic shared memory of the running block
static bool g_dyn_filled = false;

static std::vector<uint32_t> g_warp_syncs;  // full-warp __syncwarp() calls per warp of the block (race check)
static const char* state_name(const Thread& t) {
    switch (t.state) {
        case Thread::RUNNABLE: return "running";
        case Thread::AT_BARRIER: return "waiting at __syncthreads()";
        case Thread::AT_SHFL:
            return t.kind == SHFL_SYNC       ? "waiting at __syncwarp()"
                   : t.kind == SHFL_CONVERGE ? "waiting at a wmma call"
                                             : "waiting at a shuffle";
        default: return "exited";
    }
}
// Reports about another thread than the one that ran last name that thread.
[[noreturn]] static void report_thread(const Thread& t, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
[[noreturn]] static void report_thread(const Thread& t, const char* fmt, ...) {
    g_coords.thread_idx = t.idx;
    g_in_kernel = true;
    va_list ap;
    va_start(ap, fmt);
    vreport(nullptr, 0, fmt, ap);
    va_end(ap);
    _exit(1);
}

void syncthreads(const char* file, int line) {
    if (!g_in_kernel) report_at(file, line, "__syncthreads() called outside a kernel");
    g_cur->state = Thread::AT_BARRIER;
    g_cur->wait_file = file;
    g_cur->wait_line = line;
    yield();
}

uint64_t shfl_bits(ShflKind kind, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line) {
    if (!g_in_kernel) report_at(file, line, "warp shuffle called outside a kernel");
    if (width < 1 || width > 32 || (width & (width - 1)))
        report("shuffle at %s:%d: width %d is not a power of two in [1, 32]", file, line, width);
    Thread* me = g_cur;
    const int tid = (int)(me - g_threads.data()), lane = tid % 32;
    if (!(mask >> lane & 1u))
        report("shuffle at %s:%d: mask 0x%08x does not name the calling lane %d", file, line, mask, lane);
    me->state = Thread::AT_SHFL;
    me->kind = kind;
    me->mask = mask;
    me->value = bits;
    me->arg = arg;
    me->width = width;
    me->wait_file = file;
    me->wait_line = line;
    yield();
    return me->result;
}
void syncwarp(const char* file, int line, unsigned mask) {
    if (!g_in_kernel) report_at(file, line, "__syncwarp() called outside a kernel");
    (void)shfl_bits((ShflKind)SHFL_SYNC, mask, 0, 0, 32, file, line);  // the lanes meet; the value is unused
}
void wmma_converge(const void* p, size_t ldm_bytes, const char* what) {
    if (!g_in_kernel) report("wmma::%s called outside a kernel", what);
    if (p && ((uintptr_t)p % 32 || ldm_bytes % 16))
        report("wmma::%s: pointer %p must be 32-byte aligned and ldm a multiple of 16 bytes (it is %zu)", what, p,
               ldm_bytes);
    const int tid = (int)(g_cur - g_threads.data()), w0 = tid / 32 * 32,
              lanes = std::min(32, (int)g_threads.size() - w0);
    if (lanes != 32) report("wmma::%s in a warp of %d threads: WMMA needs whole warps", what, lanes);
    (void)shfl_bits((ShflKind)SHFL_CONVERGE, 0xffffffffu, 0, 0, 32, what, 0);
}
bool wmma_store_lane(const void* frag, size_t bytes) {
    const uint64_t lane0 = shfl_bits(SHFL_IDX, 0xffffffffu, (uint64_t)(uintptr_t)frag, 0, 32, "store_matrix_sync", 0);
    if (memcmp(frag, (const void*)(uintptr_t)lane0, bytes) != 0)
        report(
            "wmma::store_matrix_sync: this lane's fragment differs from lane 0's: lane-dependent code on "
            "fragment elements relies on a layout the API hides");
    // every lane has compared before any runs on: lane 0 may next refill the fragment it compared
    // against (a loop-local fragment, fill_fragment has no meeting point)
    (void)shfl_bits((ShflKind)SHFL_CONVERGE, 0xffffffffu, 0, 0, 32, "store_matrix_sync", 0);
    return (g_cur - g_threads.data()) % 32 == 0;
}

// Lane `lane` of a warp whose lanes 0.. are at `w` has arrived at a shuffle. If every lane named
// in its mask has arrived too, the exchange happens and they all run on.
static void try_exchange(Thread* w, int nlanes, int lane) {
    const Thread& t = w[lane];
    const unsigned mask = t.mask;
    for (int j = 0; j < 32; j++) {
        if (!(mask >> j & 1u)) continue;
        if (j >= nlanes)
            report_thread(t, "shuffle at %s:%d: mask 0x%08x names lane %d, but this warp has %d lanes", t.wait_file,
                          t.wait_line, mask, j, nlanes);
        if (w[j].state == Thread::EXITED)
            report_thread(t, "shuffle at %s:%d: mask 0x%08x names lane %d, which has exited", t.wait_file, t.wait_line,
                          mask, j);
        if (w[j].state != Thread::AT_SHFL) return;  // not there yet
        if (w[j].mask != mask || w[j].kind != t.kind)
            report_thread(t,
                          "shuffle at %s:%d (mask 0x%08x) meets lane %d at %s:%d with mask 0x%08x: the lanes of a mask "
                          "must run the same shuffle",
                          t.wait_file, t.wait_line, mask, j, w[j].wait_file, w[j].wait_line, w[j].mask);
    }
    for (int j = 0; j < 32; j++) {
        if (!(mask >> j & 1u)) continue;
        Thread& d = w[j];
        const int wd = d.width, seg = j / wd * wd;
        int src = j;
        switch (d.kind) {
            case SHFL_IDX: src = seg + ((d.arg % wd) + wd) % wd; break;
            case SHFL_UP: src = (j - seg) - d.arg >= 0 ? j - d.arg : j; break;
            case SHFL_DOWN: src = (j - seg) + d.arg < wd ? j + d.arg : j; break;
            case SHFL_XOR:
                src = j ^ d.arg;
                if (src >= seg + wd || src >= 32) src = j;
                break;
            default: break;
        }
        if (d.kind < SHFL_SYNC && (src >= nlanes || !(mask >> src & 1u)))
            report_thread(d, "shuffle at %s:%d: lane %d reads lane %d, which is not in the mask 0x%08x", d.wait_file,
                          d.wait_line, j, src, mask);
        d.result = w[src].value;
    }
    for (int j = 0; j < 32; j++)
        if (mask >> j & 1u) w[j].state = Thread::RUNNABLE;
    if (t.kind == SHFL_SYNC && mask == 0xffffffffu) g_warp_syncs[(w - g_threads.data()) / 32]++;  // orders memory
}

// Runs one block to completion.
static void run_block(int nthreads) {
    g_threads.assign(nthreads, Thread());
    const dim3 bd = g_coords.block_dim;
    for (int i = 0; i < nthreads; i++) {
        g_threads[i].idx = make_uint3(i % bd.x, i / bd.x % bd.y, i / (bd.x * bd.y));
        fiber_init(&g_threads[i], i);
    }
    g_shared_block.clear();
    g_warp_syncs.assign((nthreads + 31) / 32, 0);
    g_dyn_filled = false;
    g_interval++;
    g_interval_file = nullptr;  // a new block: a new interval, so every shadow byte is stale
    int exited = 0, at_barrier = 0;
    while (exited < nthreads) {
        bool ran = false;
        for (int i = 0; i < nthreads; i++) {
            Thread& t = g_threads[i];
            if (t.state != Thread::RUNNABLE) continue;
            ran = true;
            resume(&t);
            if (t.state == Thread::EXITED) {
                exited++;
            } else if (t.state == Thread::AT_BARRIER) {
                if (++at_barrier == nthreads) {  // everyone is here: check they are at the same barrier, release
                    for (Thread& u : g_threads)
                        if (u.wait_line != t.wait_line || strcmp(u.wait_file, t.wait_file) != 0)
                            report_thread(u,
                                          "waits at __syncthreads() at %s:%d while thread (%u,%u,%u) waits at the one "
                                          "at %s:%d: a block's threads must meet at the same barrier",
                                          u.wait_file, u.wait_line, t.idx.x, t.idx.y, t.idx.z, t.wait_file,
                                          t.wait_line);
                    for (Thread& u : g_threads) u.state = Thread::RUNNABLE;
                    at_barrier = 0;
                    g_interval++;
                    g_interval_file = t.wait_file;
                    g_interval_line = t.wait_line;
                }
            } else if (t.state == Thread::AT_SHFL) {
                const int w0 = i / 32 * 32;
                try_exchange(&g_threads[w0], std::min(32, nthreads - w0), i - w0);
            }
        }
        if (ran || exited == nthreads) continue;
        // Nothing can run and not everyone has finished: say why.
        const Thread* gone = nullptr;
        for (const Thread& u : g_threads)
            if (u.state == Thread::EXITED) {
                gone = &u;
                break;
            }
        for (const Thread& u : g_threads) {
            if (u.state == Thread::AT_BARRIER && gone)
                report_thread(*gone,
                              "exited without reaching __syncthreads() at %s:%d, where thread (%u,%u,%u) waits: "
                              "every thread of a block must reach it",
                              u.wait_file, u.wait_line, u.idx.x, u.idx.y, u.idx.z);
            if (u.state == Thread::AT_SHFL) {
                const int i = (int)(&u - g_threads.data()), w0 = i / 32 * 32;
                for (int j = 0; j < 32 && w0 + j < nthreads; j++) {
                    const Thread& o = g_threads[w0 + j];
                    if (!(u.mask >> j & 1u) || o.state == Thread::AT_SHFL) continue;
                    if (o.state == Thread::EXITED)
                        report_thread(u, "shuffle at %s:%d: mask 0x%08x names lane %d, which has exited", u.wait_file,
                                      u.wait_line, u.mask, j);
                    report_thread(u,
                                  "shuffle at %s:%d: mask 0x%08x names lane %d, which never arrives (it is %s at "
                                  "%s:%d)",
                                  u.wait_file, u.wait_line, u.mask, j, state_name(o), o.wait_file, o.wait_line);
                }
            }
        }
        report_thread(g_threads[0], "the block's threads wait for each other forever");
    }
    g_cur = nullptr;
}

// ---- device-memory traffic (cuda_cpu.h, traffic_begin) ---------------------------------------------
static bool g_traffic_on = false;
static std::unordered_set<uintptr_t> g_tr_read, g_tr_write;  // distinct bytes of the running launch
static std::vector<Traffic> g_traffic;
static bool is_device(const void* p);  // section 4
static void traffic_access(const void* p, size_t n, bool write) {
    if (!is_device(p)) return;  // shared memory, the stack, host memory
    std::unordered_set<uintptr_t>& seen = write ? g_tr_write : g_tr_read;
    for (size_t i = 0; i < n; i++) seen.insert((uintptr_t)p + i);
}
static void traffic_close(const char* what) {
    g_traffic.push_back({what, g_tr_read.size(), g_tr_write.size()});
    g_tr_read.clear();
    g_tr_write.clear();
}
bool traffic_begin() {
#ifdef CUDA_CPU_RACE
    g_traffic.clear();
    g_traffic_on = true;
    return true;
#else
    return false;  // kernels' accesses are invisible without the instrumentation
#endif
}
std::vector<Traffic> traffic_end() {
    g_traffic_on = false;
    return std::move(g_traffic);
}

// ---- the shared-memory race check --------------------------------------------------------------
// A race: two threads touch the same byte of a __shared__ array in one barrier interval (between two
// __syncthreads() of the block), and at least one of them writes it. Built in with -DCUDA_CPU_RACE,
// for code compiled with -fsanitize=thread: GCC then calls __tsan_readN/__tsan_writeN before every
// load and store, and the functions at the end of this file, not ThreadSanitizer's runtime (which is
// not linked), answer them. Accesses outside the launch's shared arrays return at once.
struct ByteShadow {
    uint32_t interval = 0;
    int32_t writer = -1;            // thread index in the block, or -1
    int32_t r1 = -1, r2 = -1;       // two distinct readers (-1: none), enough to name one that is not you
    int32_t rwarp = -1;             // the warp of every reader, or -1 when they span warps
    uint32_t wsync = 0, rsync = 0;  // the writer's / last reader's warp's __syncwarp() count then
};
struct ArrayShadow {
    const char* lo;
    size_t bytes;
    std::vector<ByteShadow> shadow;
};
static std::vector<ArrayShadow> g_race_arrays;
static void race_track(const void* p, size_t bytes) {
    for (ArrayShadow& a : g_race_arrays)
        if (a.lo == p) return;
    g_race_arrays.push_back({(const char*)p, bytes, std::vector<ByteShadow>(bytes)});
}
[[noreturn]] static void race_report(const ArrayShadow& a, size_t off, int other, const char* other_did,
                                     const char* me_do) {
    const char* name = "?";
    for (const SharedArray& s : g_shared_launch)
        if (s.p == a.lo) name = s.name;
    const Thread& o = g_threads[other];
    char since[200] = "the start of the block";
    if (g_interval_file) snprintf(since, sizeof since, "__syncthreads() at %s:%d", g_interval_file, g_interval_line);
    report(
        "data race on __shared__ %s (byte %zu of %zu): thread (%u,%u,%u) %s it and this thread %s it with no "
        "__syncthreads() between (both since %s)",
        name, off, a.bytes, o.idx.x, o.idx.y, o.idx.z, other_did, me_do, since);
}
// A full-warp __syncwarp() orders the accesses of that warp's lanes; only __syncthreads() orders
// those of different warps.
static inline void race_access(const void* p, size_t n, bool write) {
    if (g_traffic_on && g_in_kernel) traffic_access(p, n, write);
    if (!g_in_kernel || g_race_arrays.empty()) return;
    const char* c = (const char*)p;
    for (ArrayShadow& a : g_race_arrays) {
        if (c + n <= a.lo || c >= a.lo + a.bytes) continue;
        const int me = (int)(g_cur - g_threads.data()), warp = me / 32;
        const uint32_t now = g_warp_syncs[warp];
        for (size_t i = 0; i < n; i++) {
            const size_t off = (size_t)(c + i - a.lo);
            if (off >= a.bytes) break;
            ByteShadow& b = a.shadow[off];
            if (b.interval != g_interval) b = ByteShadow{g_interval, -1, -1, -1, -1, 0, 0};
            if (b.writer >= 0 && b.writer != me) {
                if (b.writer / 32 == warp && now > b.wsync) b.writer = -1;  // ordered by a __syncwarp()
                else race_report(a, off, b.writer, "writes", write ? "writes" : "reads");
            }
            if (write) {
                const int other = b.r1 >= 0 && b.r1 != me ? b.r1 : b.r2;
                if (other >= 0 && !(b.rwarp == warp && now > b.rsync)) race_report(a, off, other, "reads", "writes");
                b.r1 = b.r2 = b.rwarp = -1;
                b.writer = me;
                b.wsync = now;
            } else {
                if (b.r1 < 0) {
                    b.r1 = me;
                    b.rwarp = warp;
                } else if (b.r1 != me && b.r2 < 0) b.r2 = me;
                if (b.rwarp != warp) b.rwarp = -1;
                b.rsync = now;
            }
        }
        return;
    }
}

void launch_bounds(const char* file, int line, int max_threads, int) {
    const dim3 b = g_coords.block_dim;
    const long n = (long)b.x * b.y * b.z;
    if (n > max_threads)
        report("launched with %ld threads per block, over the kernel's __launch_bounds__(%d) at %s:%d", n, max_threads,
               file, line);
}

void shared_array(void* p, size_t bytes, const char* name, const char* file, int line) {
    if (!g_in_kernel) report_at(file, line, "__shared__ %s declared outside a kernel", name);
    if (std::find(g_shared_block.begin(), g_shared_block.end(), p) != g_shared_block.end()) return;
    g_shared_block.push_back(p);
    fill_nan(p, bytes);  // a read before any write finds a signaling NaN
    for (const SharedArray& s : g_shared_launch)
        if (s.p == p) return;
    g_shared_launch.push_back({p, bytes, name});
    race_track(p, bytes);
    g_shared_static += bytes;
    if (g_shared_static + g_site->smem > kSharedLimit)
        report(
            "__shared__ %s (%s:%d) brings the block's shared memory to %zu bytes (static %zu + dynamic %zu), over "
            "the %zu bytes a launch may use",
            name, file, line, g_shared_static + g_site->smem, g_shared_static, g_site->smem, kSharedLimit);
}
void* dynamic_shared() {
    if (!g_in_kernel) report("extern __shared__ used outside a kernel");
    if (!g_dyn_filled) {
        fill_nan(g_dyn_shared.data(), g_dyn_shared.size());
        g_dyn_filled = true;
        if (g_site->smem) {
            bool known = false;
            for (const SharedArray& a : g_shared_launch) known |= a.p == g_dyn_shared.data();
            if (!known) {
                g_shared_launch.push_back({g_dyn_shared.data(), g_site->smem, "(dynamic)"});
                race_track(g_dyn_shared.data(), g_site->smem);
            }
        }
    }
    return g_dyn_shared.data();
}

static void install_handlers();

void run_grid(const LaunchSite& site, void (*body)(void*), void* arg) {
    install_handlers();
    g_site = &site;
    const dim3 g = site.grid, b = site.block;
    auto bad = [&](const char* what, long v, long lim) {
        report_at(site.file, site.line, "launch of kernel %s: %s is %ld, outside [1, %ld]", site.kernel, what, v, lim);
    };
    if (b.x < 1 || b.x > 1024) bad("blockDim.x", b.x, 1024);
    if (b.y < 1 || b.y > 1024) bad("blockDim.y", b.y, 1024);
    if (b.z < 1 || b.z > 64) bad("blockDim.z", b.z, 64);
    const long nt = (long)b.x * b.y * b.z;
    if (nt > 1024) bad("the number of threads per block", nt, 1024);
    if (g.x < 1 || g.x > 2147483647u) bad("gridDim.x", g.x, 2147483647L);
    if (g.y < 1 || g.y > 65535) bad("gridDim.y", g.y, 65535);
    if (g.z < 1 || g.z > 65535) bad("gridDim.z", g.z, 65535);
    if (site.smem > kSharedLimit) bad("the dynamic shared memory in bytes", (long)site.smem, (long)kSharedLimit);
    g_body = body;
    g_body_arg = arg;
    g_shared_launch.clear();
    g_race_arrays.clear();
    g_shared_static = 0;
    g_dyn_shared.assign(site.smem + 16, 0);
    g_coords.block_dim = b;
    g_coords.grid_dim = g;
    for (unsigned z = 0; z < g.z; z++)
        for (unsigned y = 0; y < g.y; y++)
            for (unsigned x = 0; x < g.x; x++) {
                g_coords.block_idx = make_uint3(x, y, z);
                run_block((int)nt);
            }
    if (g_traffic_on) traffic_close(site.kernel);
    g_site = nullptr;
}

const uint3& thread_idx_checked() { report("threadIdx read outside a kernel"); }

// ============================================================================================
// 4. Device memory
// ============================================================================================
// Each cudaMalloc gets its own mapping: the allocation ends flush against an unmapped guard page
// (its start is 16-byte aligned, so at most 12 bytes of slack lie between its end and the guard),
// with another guard page before it. An access past the end faults, and the SIGSEGV handler names
// the kernel, block and thread. In an AddressSanitizer build, allocations come from ASan's malloc
// instead, which catches every byte. New memory holds signaling NaNs (kNaN), and kernels run with
// the invalid-operation trap on: arithmetic on memory nothing wrote raises SIGFPE, reported the same way.
struct Alloc {
    char* base;
    size_t size;
    bool pinned;  // cudaMallocHost: host memory that kernels may also use
    char* map;    // the mapping (guarded device allocations), else null
    size_t map_len;
};
static std::map<uintptr_t, Alloc> g_allocs;
static size_t g_device_bytes = 0;

// The allocation holding p (its end included, as a pointer may point there), or null.
static const Alloc* find_alloc(const void* p) {
    auto it = g_allocs.upper_bound((uintptr_t)p);
    if (it == g_allocs.begin()) return nullptr;
    --it;
    const Alloc& a = it->second;
    if ((const char*)p < a.base || (const char*)p > a.base + a.size) return nullptr;
    return &a;
}
static bool is_device(const void* p) {
    const Alloc* a = find_alloc(p);
    return a && !a->pinned;
}

static void* device_alloc(size_t size) {
#ifdef __SANITIZE_ADDRESS__
    const size_t rounded = (size + 255) / 256 * 256;
    char* base = (char*)aligned_alloc(256, rounded);
    if (!base) return nullptr;
    fill_nan(base, rounded);
    ASAN_POISON_MEMORY_REGION(base + size, rounded - size);
    g_allocs[(uintptr_t)base] = Alloc{base, size, false, nullptr, 0};
#else
    const size_t len = (size + 15) / 16 * 16, pages = (len + kPage - 1) / kPage * kPage;
    if (pages < len) return nullptr;
    char* map = (char*)mmap(nullptr, pages + 2 * kPage, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (map == MAP_FAILED) return nullptr;
    if (mprotect(map + kPage, pages, PROT_READ | PROT_WRITE) != 0) {
        munmap(map, pages + 2 * kPage);
        return nullptr;
    }
    char* base = map + kPage + pages - len;
    fill_nan(base, len);
    g_allocs[(uintptr_t)base] = Alloc{base, size, false, map, pages + 2 * kPage};
#endif
    g_device_bytes += size;
    return base;
}

// What an address that faulted is, for the report.
static void describe_address(const void* p, char* out, size_t n) {
    const char* c = (const char*)p;
    for (const auto& kv : g_allocs) {
        const Alloc& a = kv.second;
        if (a.pinned) continue;
        if (c >= a.base + a.size && c < a.base + a.size + kPage + 16) {
            snprintf(out, n, "byte %zu of a device allocation of %zu bytes: past its end", (size_t)(c - a.base),
                     a.size);
            return;
        }
        if (c < a.base && c >= a.base - kPage - 16) {
            snprintf(out, n, "%zu bytes before the start of a device allocation of %zu bytes", (size_t)(a.base - c),
                     a.size);
            return;
        }
    }
    for (size_t i = 0; i < g_stacks.size(); i++)
        if (g_stacks[i].lo && c >= g_stacks[i].lo && c < g_stacks[i].lo + kPage) {
            snprintf(out, n,
                     "the guard page of thread %zu's fiber stack (a stack overflow: set CUDA_CPU_STACK_KB above %zu)",
                     i, stack_bytes() >> 10);
            return;
        }
    snprintf(out, n, "not in any device allocation (freed, or never allocated)");
}

static char g_altstack[64 * 1024];
static void on_signal(int sig, siginfo_t* si, void*) {
    char where[256] = "";
    if (g_in_kernel || g_api_what) {
        if (sig == SIGFPE) {
            if (g_in_kernel)
                report(
                    "invalid floating-point operation: arithmetic on a signaling NaN, i.e. on device or shared memory "
                    "that nothing wrote (or 0*inf, inf-inf, sqrt of a negative)");
            report_at(g_api_file, g_api_line, "%s reads device memory that nothing wrote (a signaling NaN operand)",
                      g_api_what);
        }
        describe_address(si->si_addr, where, sizeof where);
        if (g_in_kernel) report("invalid memory access at %p: %s", si->si_addr, where);
        report_at(g_api_file, g_api_line, "%s: invalid memory access at %p: %s", g_api_what, si->si_addr, where);
    }
    signal(sig, SIG_DFL);  // not ours: let the default action happen when the instruction runs again
}
// Installed at every launch and GEMM: a test framework may have put its own handlers in between.
static void install_handlers() {
    static bool alt = false;
    if (!alt) {
        stack_t ss;
        ss.ss_sp = g_altstack;
        ss.ss_size = sizeof g_altstack;
        ss.ss_flags = 0;
        sigaltstack(&ss, nullptr);
        alt = true;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_signal;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGSEGV, &sa, nullptr);
    sigaction(SIGBUS, &sa, nullptr);
    sigaction(SIGFPE, &sa, nullptr);
#ifdef __SANITIZE_ADDRESS__
    __asan_set_error_report_callback([](const char*) {
        if (g_in_kernel && g_site) {
            char out[512];
            const uint3 b = g_coords.block_idx, t = g_coords.thread_idx;
            const int n = snprintf(out, sizeof out,
                                   "cuda_cpu: %s:%d: kernel %s, block (%u,%u,%u), thread (%u,%u,%u): "
                                   "AddressSanitizer report above\n",
                                   g_site->file, g_site->line, g_site->kernel, b.x, b.y, b.z, t.x, t.y, t.z);
            if (write(2, out, (size_t)n) < 0) {}
        }
    });
#endif
}

static const char* kind_name(cudaMemcpyKind k) {
    switch (k) {
        case cudaMemcpyHostToHost: return "cudaMemcpyHostToHost";
        case cudaMemcpyHostToDevice: return "cudaMemcpyHostToDevice";
        case cudaMemcpyDeviceToHost: return "cudaMemcpyDeviceToHost";
        case cudaMemcpyDeviceToDevice: return "cudaMemcpyDeviceToDevice";
        default: return "cudaMemcpyDefault";
    }
}
// [p, p + n) must lie in one device allocation.
static void check_device_range(const char* file, int line, const char* call, const char* role, const void* p,
                               size_t n) {
    const Alloc* a = find_alloc(p);
    if (!a || a->pinned) report_at(file, line, "%s: the %s %p is not device memory", call, role, p);
    const size_t off = (size_t)((const char*)p - a->base);
    if (n > a->size - off)
        report_at(file, line,
                  "%s: %zu bytes at offset %zu of a %zu-byte device allocation run %zu bytes past its end (%s)", call,
                  n, off, a->size, n - (a->size - off), role);
}
// A copy out of device memory must not carry the fill of memory that nothing wrote.
static void check_written(const char* file, int line, const char* call, const void* p, size_t n) {
    const char* c = (const char*)p;
    const char* a = (const char*)(((uintptr_t)c + 3) & ~(uintptr_t)3);
    for (; a + 4 <= c + n; a += 4) {
        uint32_t w;
        memcpy(&w, a, 4);
        if (w == kNaN)
            report_at(file, line, "%s reads device memory that nothing wrote (byte %zu of the %zu copied)", call,
                      (size_t)(a - c), n);
    }
}

cudaError_t memcpy_at(const char* file, int line, void* dst, const void* src, size_t n, cudaMemcpyKind kind) {
    if (n == 0) return cudaSuccess;
    if (!dst || !src) report_at(file, line, "%s of %zu bytes with a null pointer", kind_name(kind), n);
    const bool dd = is_device(dst), sd = is_device(src);
    if (kind == cudaMemcpyDefault)
        kind = dd ? (sd ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice)
                  : (sd ? cudaMemcpyDeviceToHost : cudaMemcpyHostToHost);
    const char* k = kind_name(kind);
    const bool want_dd = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    const bool want_sd = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    if (want_dd) check_device_range(file, line, k, "destination", dst, n);
    else if (dd) report_at(file, line, "%s: the destination %p is device memory (wrong direction?)", k, dst);
    if (want_sd) check_device_range(file, line, k, "source", src, n);
    else if (sd) report_at(file, line, "%s: the source %p is device memory (wrong direction?)", k, src);
    if (want_sd) check_written(file, line, k, src, n);
    memmove(dst, src, n);
    return cudaSuccess;
}
cudaError_t memset_at(const char* file, int line, void* dst, int value, size_t n) {
    if (n == 0) return cudaSuccess;
    check_device_range(file, line, "cudaMemset", "destination", dst, n);
    memset(dst, value, n);
    if (g_traffic_on) g_traffic.push_back({"cudaMemset", 0, n});
    return cudaSuccess;
}
cudaError_t free_at(const char* file, int line, void* p) {
    if (!p) return cudaSuccess;
    auto it = g_allocs.find((uintptr_t)p);
    if (it == g_allocs.end() || it->second.pinned)
        report_at(file, line, "cudaFree(%p): not a pointer that cudaMalloc returned (or freed twice)", p);
    const Alloc a = it->second;
    g_allocs.erase(it);
    g_device_bytes -= a.size;
#ifdef __SANITIZE_ADDRESS__
    free(a.base);
#else
    munmap(a.map, a.map_len);  // a later access faults
#endif
    return cudaSuccess;
}

void check_pointer_arg(const LaunchSite& site, int index, const void* p) {
    if (!p || find_alloc(p)) return;
    report_at(site.file, site.line,
              "launch of kernel %s: argument %d (%p) is a host pointer, not memory from "
              "cudaMalloc or cudaMallocHost",
              site.kernel, index + 1, p);
}

}  // namespace cuda_cpu

using namespace cuda_cpu;

// ============================================================================================
// 5. The runtime API (everything runs at the call: streams and events only keep time)
// ============================================================================================
struct CUstream_st {
    int id;
};
struct CUevent_st {
    double t;
};
static double now_ms() {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

cudaError_t cudaGetDeviceCount(int* n) {
    *n = 1;
    return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
cudaError_t cudaGetDevice(int* d) {
    *d = 0;
    return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
    if (d != 0) return cudaErrorInvalidDevice;
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "cuda_cpu (CUDA on the CPU)");
    p->totalGlobalMem = (size_t)sysconf(_SC_PHYS_PAGES) * (size_t)sysconf(_SC_PAGESIZE);
    p->sharedMemPerBlock = kSharedLimit;
    p->regsPerBlock = 65536;
    p->warpSize = 32;
    p->maxThreadsPerBlock = 1024;
    p->maxThreadsDim[0] = 1024;
    p->maxThreadsDim[1] = 1024;
    p->maxThreadsDim[2] = 64;
    p->maxGridSize[0] = 2147483647;
    p->maxGridSize[1] = 65535;
    p->maxGridSize[2] = 65535;
    p->major = 9;
    p->minor = 0;
    p->multiProcessorCount = 1;
    return cudaSuccess;
}
cudaError_t cudaMemGetInfo(size_t* free_b, size_t* total) {
    *total = (size_t)sysconf(_SC_PHYS_PAGES) * (size_t)sysconf(_SC_PAGESIZE);
    *free_b = (size_t)sysconf(_SC_AVPHYS_PAGES) * (size_t)sysconf(_SC_PAGESIZE);
    return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaGetLastError() { return cudaSuccess; }  // a failed launch reports and exits at once
cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
const char* cudaGetErrorName(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
        case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
        default: return "cudaErrorUnknown";
    }
}
const char* cudaGetErrorString(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorMemoryAllocation: return "out of memory";
        case cudaErrorInvalidDevice: return "invalid device ordinal";
        default: return "unknown error";
    }
}
cudaError_t cudaMalloc(void** p, size_t size) {
    if (!p) return cudaErrorInvalidValue;
    *p = nullptr;
    if (size == 0) return cudaSuccess;
    *p = device_alloc(size);
    return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFree(void* p) { return free_at("?", 0, p); }
cudaError_t cudaMallocHost(void** p, size_t size) {
    if (!p) return cudaErrorInvalidValue;
    char* b = (char*)aligned_alloc(64, (std::max<size_t>(size, 1) + 63) / 64 * 64);
    if (!b) return cudaErrorMemoryAllocation;
    g_allocs[(uintptr_t)b] = Alloc{b, size, true, nullptr, 0};
    *p = b;
    return cudaSuccess;
}
cudaError_t cudaHostAlloc(void** p, size_t size, unsigned int) { return cudaMallocHost(p, size); }
cudaError_t cudaFreeHost(void* p) {
    if (!p) return cudaSuccess;
    auto it = g_allocs.find((uintptr_t)p);
    if (it == g_allocs.end() || !it->second.pinned)
        report_at("?", 0, "cudaFreeHost(%p): not a pointer that cudaMallocHost returned", p);
    g_allocs.erase(it);
    free(p);
    return cudaSuccess;
}
cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind k) { return memcpy_at("?", 0, d, s, n, k); }
cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind k, cudaStream_t) {
    return memcpy_at("?", 0, d, s, n, k);
}
cudaError_t cudaMemset(void* d, int v, size_t n) { return memset_at("?", 0, d, v, n); }
cudaError_t cudaMemsetAsync(void* d, int v, size_t n, cudaStream_t) { return memset_at("?", 0, d, v, n); }
cudaError_t cudaStreamCreate(cudaStream_t* s) {
    static int next = 1;
    *s = new CUstream_st{next++};
    return cudaSuccess;
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned int) { return cudaStreamCreate(s); }
cudaError_t cudaStreamDestroy(cudaStream_t s) {
    delete s;
    return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaEventCreate(cudaEvent_t* e) {
    *e = new CUevent_st{0};
    return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t) {
    e->t = now_ms();
    return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
    *ms = (float)(b->t - a->t);
    return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
    delete e;
    return cudaSuccess;
}

// ============================================================================================
// 6. cuBLAS: the GEMM mot calls, with cuBLAS's column-major semantics
// ============================================================================================
struct cublasContext {
    cudaStream_t stream;
};
cublasStatus_t cublasCreate_v2(cublasHandle_t* h) {
    *h = new cublasContext{nullptr};
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy_v2(cublasHandle_t h) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    delete h;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetStream_v2(cublasHandle_t h, cudaStream_t s) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    h->stream = s;
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t h, void* ws, size_t bytes) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (bytes) check_device_range("?", 0, "cublasSetWorkspace", "workspace", ws, bytes);
    return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t) {
    return h ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_INITIALIZED;
}
const char* cublasGetStatusString(cublasStatus_t s) {
    switch (s) {
        case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
        case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
        case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
        case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
        default: return "CUBLAS_STATUS_INTERNAL_ERROR";
    }
}

static float load_elt(const void* p, cudaDataType_t t, size_t i) {
    if (t == CUDA_R_32F) return ((const float*)p)[i];
    return __bfloat162float(((const __nv_bfloat16*)p)[i]);
}
static size_t elt_bytes(cudaDataType_t t) { return t == CUDA_R_32F ? 4 : 2; }

namespace cuda_cpu {
// C (m x n, column-major, ldc) = alpha op(A) op(B) + beta C, with op(A) m x k and op(B) k x n.
// beta == 0 never reads C (it may hold anything, NaN included), as in cuBLAS. Products accumulate
// in fp32 (compute types 32F and 32F_PEDANTIC: no TF32), in eight interleaved partial sums.
// C is fp32, or bf16 with bf16 A and B (cuBLAS's CUDA_R_16BF / 32F-compute combination): then
// alpha s + beta C is formed in fp32 and rounded once to nearest even (cuda_bf16.h's
// __float2bfloat16, the rounding of the GPU's cvt.rn.bf16.f32).
cublasStatus_t gemm_at(const char* file, int line, cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                       int n, int k, const void* alpha, const void* A, cudaDataType_t at, int lda, const void* B,
                       cudaDataType_t bt, int ldb, const void* beta, void* C, cudaDataType_t ct, int ldc,
                       cublasComputeType_t compute, cublasGemmAlgo_t) {
    if (!h) return CUBLAS_STATUS_NOT_INITIALIZED;
    const bool opA_ok = ta == CUBLAS_OP_N || ta == CUBLAS_OP_T, opB_ok = tb == CUBLAS_OP_N || tb == CUBLAS_OP_T;
    if (!opA_ok || !opB_ok || m < 0 || n < 0 || k < 0) return CUBLAS_STATUS_INVALID_VALUE;
    const int a_rows = ta == CUBLAS_OP_N ? m : k, a_cols = ta == CUBLAS_OP_N ? k : m;
    const int b_rows = tb == CUBLAS_OP_N ? k : n, b_cols = tb == CUBLAS_OP_N ? n : k;
    if (lda < std::max(1, a_rows) || ldb < std::max(1, b_rows) || ldc < std::max(1, m))
        return CUBLAS_STATUS_INVALID_VALUE;
    const bool types_ok = (at == CUDA_R_32F && bt == CUDA_R_32F) || (at == CUDA_R_16BF && bt == CUDA_R_16BF);
    if (!types_ok || (ct != CUDA_R_32F && !(ct == CUDA_R_16BF && at == CUDA_R_16BF)))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    if (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_PEDANTIC) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
    const float al = *(const float*)alpha, be = *(const float*)beta;
    if (g_traffic_on)
        g_traffic.push_back({"cublasGemmEx",
                             (size_t)m * k * elt_bytes(at) + (size_t)k * n * elt_bytes(bt) +
                                 (be != 0.0f ? (size_t)m * n * elt_bytes(ct) : 0),
                             (size_t)m * n * elt_bytes(ct)});
    // every operand must be device memory, within its allocation
    if (k > 0) {
        check_device_range(file, line, "cublasGemmEx", "A", A, ((size_t)(a_cols - 1) * lda + a_rows) * elt_bytes(at));
        check_device_range(file, line, "cublasGemmEx", "B", B, ((size_t)(b_cols - 1) * ldb + b_rows) * elt_bytes(bt));
    }
    check_device_range(file, line, "cublasGemmEx", "C", C, ((size_t)(n - 1) * ldc + m) * elt_bytes(ct));
    install_handlers();
    g_api_file = file;
    g_api_line = line;
    g_api_what = "cublasGemmEx";
    const unsigned csr = _mm_getcsr();
    _mm_setcsr((csr & ~0x3Fu) & ~(1u << 7));                  // trap on signaling NaNs: an operand nothing wrote
    std::vector<float> Ar((size_t)m * k), Bc((size_t)n * k);  // op(A) by rows, op(B) by columns
    for (int i = 0; i < m; i++)
        for (int p = 0; p < k; p++)
            Ar[(size_t)i * k + p] =
                ta == CUBLAS_OP_N ? load_elt(A, at, i + (size_t)p * lda) : load_elt(A, at, p + (size_t)i * lda);
    for (int j = 0; j < n; j++)
        for (int p = 0; p < k; p++)
            Bc[(size_t)j * k + p] =
                tb == CUBLAS_OP_N ? load_elt(B, bt, p + (size_t)j * ldb) : load_elt(B, bt, j + (size_t)p * ldb);
    float* Cf = (float*)C;
    __nv_bfloat16* Cb = (__nv_bfloat16*)C;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++) {
            const float* a = &Ar[(size_t)i * k];
            const float* b = &Bc[(size_t)j * k];
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            int p = 0;
            for (; p + 8 <= k; p += 8)
                for (int u = 0; u < 8; u++) acc[u] += a[p + u] * b[p + u];
            for (; p < k; p++) acc[p % 8] += a[p] * b[p];
            const float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
            const size_t at_c = i + (size_t)j * ldc;
            if (ct == CUDA_R_32F) {
                float& c = Cf[at_c];
                c = be == 0.0f ? al * s : al * s + be * c;
            } else {
                Cb[at_c] = __float2bfloat16(be == 0.0f ? al * s : al * s + be * __bfloat162float(Cb[at_c]));
            }
        }
    _mm_setcsr(csr);
    g_api_what = nullptr;
    return CUBLAS_STATUS_SUCCESS;
}
}  // namespace cuda_cpu
cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                            const void* alpha, const void* A, cudaDataType_t at, int lda, const void* B,
                            cudaDataType_t bt, int ldb, const void* beta, void* C, cudaDataType_t ct, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t algo) {
    return gemm_at("?", 0, h, ta, tb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc, compute, algo);
}

// ============================================================================================
// 7. NCCL over MPI: device memory is host memory here, so a collective is an MPI call on it
// ============================================================================================
#ifdef CUDA_CPU_MPI
struct ncclComm {
    MPI_Comm comm;
    int rank, nranks;
};
const char* ncclGetErrorString(ncclResult_t r) {
    switch (r) {
        case ncclSuccess: return "no error";
        case ncclInvalidArgument: return "invalid argument";
        case ncclSystemError: return "system error (MPI)";
        default: return "unhandled error";
    }
}
ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    memset(id, 0, sizeof *id);
    snprintf(id->internal, sizeof id->internal, "cuda_cpu-mpi-%d", (int)getpid());
    return ncclSuccess;
}
ncclResult_t ncclCommInitRank(ncclComm_t* c, int nranks, ncclUniqueId, int rank) {
    int r = -1, n = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &r);
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    if (r != rank || n != nranks) return ncclInvalidArgument;  // one communicator: MPI_COMM_WORLD's ranks
    ncclComm* cm = new ncclComm{MPI_COMM_NULL, rank, nranks};
    if (MPI_Comm_dup(MPI_COMM_WORLD, &cm->comm) != MPI_SUCCESS) {
        delete cm;
        return ncclSystemError;
    }
    *c = cm;
    return ncclSuccess;
}
ncclResult_t ncclCommDestroy(ncclComm_t c) {
    if (!c) return ncclInvalidArgument;
    MPI_Comm_free(&c->comm);
    delete c;
    return ncclSuccess;
}
ncclResult_t ncclCommCount(const ncclComm_t c, int* n) {
    *n = c->nranks;
    return ncclSuccess;
}
ncclResult_t ncclCommUserRank(const ncclComm_t c, int* r) {
    *r = c->rank;
    return ncclSuccess;
}
// Rank 0 reduces (in MPI's order) and broadcasts, so every rank holds the same bits, as with NCCL.
ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t type, ncclRedOp_t op,
                           ncclComm_t c, cudaStream_t) {
    if (!c) return ncclInvalidArgument;
    MPI_Datatype mt;
    size_t eb;
    switch (type) {
        case ncclFloat32:
            mt = MPI_FLOAT;
            eb = 4;
            break;
        case ncclFloat64:
            mt = MPI_DOUBLE;
            eb = 8;
            break;
        case ncclInt32:
            mt = MPI_INT;
            eb = 4;
            break;
        case ncclInt64:
            mt = MPI_LONG_LONG;
            eb = 8;
            break;
        default: return ncclInvalidArgument;
    }
    MPI_Op mo;
    switch (op) {
        case ncclSum:
        case ncclAvg: mo = MPI_SUM; break;
        case ncclProd: mo = MPI_PROD; break;
        case ncclMax: mo = MPI_MAX; break;
        case ncclMin: mo = MPI_MIN; break;
        default: return ncclInvalidArgument;
    }
    if (op == ncclAvg && type != ncclFloat32 && type != ncclFloat64) return ncclInvalidArgument;
    check_device_range("?", 0, "ncclAllReduce", "send buffer", send, count * eb);
    check_device_range("?", 0, "ncclAllReduce", "receive buffer", recv, count * eb);
    if (send != recv) memmove(recv, send, count * eb);
    const size_t chunk = (size_t)1 << 30;
    for (size_t at = 0; at < count; at += chunk) {
        const int n = (int)std::min(chunk, count - at);
        char* p = (char*)recv + at * eb;
        const int ok = c->rank == 0 ? MPI_Reduce(MPI_IN_PLACE, p, n, mt, mo, 0, c->comm)
                                    : MPI_Reduce(p, nullptr, n, mt, mo, 0, c->comm);
        if (ok != MPI_SUCCESS || MPI_Bcast(p, n, mt, 0, c->comm) != MPI_SUCCESS) return ncclSystemError;
    }
    if (op == ncclAvg) {
        for (size_t i = 0; i < count; i++) {
            if (type == ncclFloat32) ((float*)recv)[i] /= (float)c->nranks;
            else ((double*)recv)[i] /= (double)c->nranks;
        }
    }
    return ncclSuccess;
}
#endif  // CUDA_CPU_MPI

// ============================================================================================
// 8. The hooks of -fsanitize=thread instrumentation, for the race check (section 3)
// ============================================================================================
#ifdef CUDA_CPU_RACE
extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
#define CUDA_CPU_HOOKS(N)                                                \
    void __tsan_read##N(void* p) { race_access(p, N, false); }           \
    void __tsan_write##N(void* p) { race_access(p, N, true); }           \
    void __tsan_unaligned_read##N(void* p) { race_access(p, N, false); } \
    void __tsan_unaligned_write##N(void* p) { race_access(p, N, true); }
CUDA_CPU_HOOKS(1)
CUDA_CPU_HOOKS(2)
CUDA_CPU_HOOKS(4)
CUDA_CPU_HOOKS(8)
CUDA_CPU_HOOKS(16)
void __tsan_read_range(void* p, unsigned long n) { race_access(p, n, false); }
void __tsan_write_range(void* p, unsigned long n) { race_access(p, n, true); }
// atomics the instrumented standard library uses: done for real (sequentially consistent)
#define CUDA_CPU_ATOMICS(B, T)                                                                                     \
    T __tsan_atomic##B##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); }           \
    void __tsan_atomic##B##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); }           \
    T __tsan_atomic##B##_fetch_add(volatile T* a, T v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); } \
    T __tsan_atomic##B##_fetch_sub(volatile T* a, T v, int) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); } \
    T __tsan_atomic##B##_exchange(volatile T* a, T v, int) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); } \
    int __tsan_atomic##B##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {                           \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                    \
    }                                                                                                              \
    int __tsan_atomic##B##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                             \
        return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                     \
    }
CUDA_CPU_ATOMICS(8, unsigned char)
CUDA_CPU_ATOMICS(16, unsigned short)
CUDA_CPU_ATOMICS(32, unsigned int)
CUDA_CPU_ATOMICS(64, unsigned long long)
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
}
#endif  // CUDA_CPU_RACE
