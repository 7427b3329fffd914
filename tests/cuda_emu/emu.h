// A CPU emulator for cusyncbn's CUDA kernels, so that CI (which has no GPU) runs them.
//
// cuda_emu/__init__.py compiles syncbn.cu with g++ after this prelude (and after two
// textual edits: `extern __shared__` -> `extern`, `__shared__` -> `static`, which make
// static shared arrays function statics shared by the block and dynamic shared memory
// the global `sh` below). Every launch runs its blocks one after the other; the threads
// of a block run as fibers (ucontext for the first entry, _setjmp/_longjmp after) on the
// caller's thread, so __syncthreads() and warp shuffles are real rendezvous points:
//
//   - __syncthreads() waits for every thread of the block; a thread that returns
//     while others wait (a barrier under divergent control flow) is reported;
//   - __shfl_down_sync(0xffffffff, ...) waits for the 32 lanes of the warp, exchanges,
//     and waits again, as the hardware's converged warp does;
//   - launch limits (block <= 1024 threads, grid.y/z <= 65535, dynamic shared <= 48 KiB)
//     and misaligned vector accesses (CUSYNCBN_CHECK_ALIGNED) are errors;
//   - parameter kinds (pointer element types, integer and float widths) are reported to
//     Python, which checks each launch's arguments against them as CuPy cannot.
//
// Blocks run one at a time, in index order or (emu_set_block_order) in a shuffled order
// per launch, as a GPU gives no order. What it cannot show: timing, races between
// concurrently running blocks (the last-block reductions are exercised for their logic
// under many orders of arrival, not for their memory ordering), or the PTX fp16
// conversion (replaced by _Float16 here).
#include <cmath>
#include <algorithm>
#include <csetjmp>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
#include <ucontext.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict

struct dim3 { unsigned x, y, z; };
struct half_t;                   // syncbn.cu's 16-bit storage types, named in signatures
struct bf16_t;

namespace emu {

constexpr int kMaxThreads = 1024;
constexpr size_t kStack = 64 * 1024;
constexpr size_t kMaxDynamicShared = 48 * 1024;

enum State { kRunnable, kWaiting, kDone };

struct Fiber {
    ucontext_t uc;
    jmp_buf jb;
    bool started;
    State state;
    int barrier;                 // 0: the block; 1 + w: warp w
    dim3 idx;
    int linear;
};

inline std::vector<Fiber> fibers(kMaxThreads);
inline std::vector<char> stacks;
inline Fiber* cur = nullptr;
inline jmp_buf sched_jb;
inline ucontext_t sched_uc;
inline dim3 grid_dim, block_dim, block_idx;
inline int nthreads = 0;
inline int arrived[1 + kMaxThreads / 32];
inline std::string error;
inline void (*body)(void*) = nullptr;
inline void* body_arg = nullptr;
inline unsigned char shuffle_slots[kMaxThreads / 32][32][8];
inline unsigned block_order_seed = 0;          // 0: blocks in index order; else shuffled per launch

inline void fail(const std::string& what) {
    if (error.empty()) error = what;
}

// The fiber gives control back to the scheduler until it is released.
inline void yield() {
    if (!_setjmp(cur->jb)) _longjmp(sched_jb, 1);
}

inline int warp_size(int w) {
    int rest = nthreads - 32 * w;
    return rest < 32 ? rest : 32;
}

// Stops the calling thread (after fail()): the access it was about to make would fault.
[[noreturn]] inline void abort_thread() {
    cur->state = kDone;
    _longjmp(sched_jb, 1);
}

inline void barrier(int id) {
    cur->state = kWaiting;
    cur->barrier = id;
    arrived[id] += 1;
    yield();
}

inline void entry() {
    body(body_arg);
    cur->state = kDone;
    _longjmp(sched_jb, 1);
}

inline std::string where() {
    char s[96];
    std::snprintf(s, sizeof s, " (block %u,%u,%u of grid %u,%u,%u)", block_idx.x, block_idx.y, block_idx.z,
                  grid_dim.x, grid_dim.y, grid_dim.z);
    return s;
}

// Runs the threads of one block to completion, releasing barriers as they fill.
inline bool run_block() {
    for (int t = 0; t < nthreads; ++t) {
        Fiber& f = fibers[t];
        f.started = false;
        f.state = kRunnable;
        f.linear = t;
        f.idx = dim3{t % block_dim.x, (t / block_dim.x) % block_dim.y, t / (block_dim.x * block_dim.y)};
    }
    std::memset(arrived, 0, sizeof arrived);
    for (;;) {
        bool ran = false;
        for (int t = 0; t < nthreads; ++t) {
            Fiber& f = fibers[t];
            if (f.state != kRunnable) continue;
            ran = true;
            cur = &f;
            if (!_setjmp(sched_jb)) {
                if (!f.started) {
                    f.started = true;
                    getcontext(&f.uc);
                    f.uc.uc_stack.ss_sp = stacks.data() + t * kStack;
                    f.uc.uc_stack.ss_size = kStack;
                    f.uc.uc_link = nullptr;
                    makecontext(&f.uc, entry, 0);
                    swapcontext(&sched_uc, &f.uc);
                } else {
                    _longjmp(f.jb, 1);
                }
            }
            cur = nullptr;
        }
        // Release every barrier that all its threads reached.
        int done = 0, waiting = 0;
        for (int t = 0; t < nthreads; ++t) {
            done += fibers[t].state == kDone;
            waiting += fibers[t].state == kWaiting;
        }
        bool released = false;
        if (arrived[0] > 0 && arrived[0] == nthreads) {
            for (int t = 0; t < nthreads; ++t) fibers[t].state = kRunnable;
            arrived[0] = 0;
            released = true;
        }
        for (int w = 0; w * 32 < nthreads; ++w) {
            if (arrived[1 + w] > 0 && arrived[1 + w] == warp_size(w)) {
                for (int t = 32 * w; t < 32 * w + warp_size(w); ++t) fibers[t].state = kRunnable;
                arrived[1 + w] = 0;
                released = true;
            }
        }
        if (done == nthreads) return true;
        if (!ran && !released && waiting > 0) {
            fail("deadlock: " + std::to_string(waiting) + " threads wait at a barrier that " +
                 std::to_string(done) + " finished threads never reach (__syncthreads or a full-mask shuffle "
                 "under divergent control flow)" + where());
            return false;
        }
        if (!error.empty()) return false;
    }
}

template <typename T> char kind_of() {
    if (std::is_same<T, double>::value) return 'd';
    if (std::is_same<T, float>::value) return 'f';
    if (std::is_same<T, long long>::value) return 'q';
    if (std::is_same<T, unsigned long long>::value) return 'Q';
    if (std::is_same<T, int>::value) return 'i';
    if (std::is_same<T, unsigned int>::value) return 'I';
    if (std::is_same<T, unsigned short>::value) return 'H';
    return '?';
}

// One character per kernel parameter: a scalar kind, or '*' then the pointee's kind
// ('h' / 'b' for syncbn.cu's half_t / bf16_t).
template <typename T> struct Kind { static std::string get() { return std::string(1, kind_of<T>()); } };
template <typename T> struct Kind<T*> {
    static std::string get() { return "*" + Kind<typename std::remove_cv<T>::type>::get(); }
};

template <> struct Kind<half_t> { static std::string get() { return "h"; } };
template <> struct Kind<bf16_t> { static std::string get() { return "b"; } };

template <typename... P> std::string signature_of(void (*)(P...)) {
    std::string s;
    ((s += Kind<typename std::remove_cv<P>::type>::get() + ","), ...);
    return s;
}

template <typename... P, size_t... I>
void call(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<typename std::remove_cv<P>::type*>(args[I])...);
}

template <typename... P> struct Bound {
    void (*kernel)(P...);
    void** args;
    static void run(void* self) {
        Bound* b = static_cast<Bound*>(self);
        call(b->kernel, b->args, std::index_sequence_for<P...>{});
    }
};

template <typename... P>
const char* launch(void (*kernel)(P...), const unsigned* g, const unsigned* b, size_t shared, void** args) {
    error.clear();
    grid_dim = dim3{g[0], g[1], g[2]};
    block_dim = dim3{b[0], b[1], b[2]};
    const unsigned long long threads = (unsigned long long)b[0] * b[1] * b[2];
    if (threads == 0 || threads > kMaxThreads || b[2] > 64)
        fail("invalid block " + std::to_string(b[0]) + "x" + std::to_string(b[1]) + "x" + std::to_string(b[2]));
    if (g[0] == 0 || g[1] == 0 || g[2] == 0 || g[0] > 2147483647u || g[1] > 65535 || g[2] > 65535)
        fail("invalid grid " + std::to_string(g[0]) + "x" + std::to_string(g[1]) + "x" + std::to_string(g[2]));
    if (shared > kMaxDynamicShared) fail("dynamic shared memory " + std::to_string(shared) + " > 48 KiB");
    if (!error.empty()) return error.c_str();
    nthreads = (int)threads;
    if (stacks.size() < kMaxThreads * kStack) stacks.resize(kMaxThreads * kStack);
    Bound<P...> bound{kernel, args};
    body = &Bound<P...>::run;
    body_arg = &bound;
    std::vector<dim3> order;
    for (unsigned z = 0; z < g[2]; ++z)
        for (unsigned y = 0; y < g[1]; ++y)
            for (unsigned x = 0; x < g[0]; ++x) order.push_back(dim3{x, y, z});
    if (block_order_seed != 0) {                     // a GPU runs blocks in no set order
        std::mt19937 rng(block_order_seed++);
        std::shuffle(order.begin(), order.end(), rng);
    }
    for (const dim3& b_idx : order) {
        block_idx = b_idx;
        if (!run_block()) return error.c_str();
    }
    return error.empty() ? nullptr : error.c_str();
}

}  // namespace emu

#define threadIdx (emu::cur->idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

// Dynamic shared memory (`extern __shared__ double sh[];` after the textual edit).
alignas(16) double sh[emu::kMaxDynamicShared / sizeof(double)];

inline void __syncthreads() { emu::barrier(0); }

template <typename T> T __shfl_down_sync(unsigned mask, T v, int delta) {
    static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
    if (mask != 0xffffffffu) emu::fail("__shfl_down_sync with a partial mask is not emulated");
    const int lane = emu::cur->linear & 31, w = emu::cur->linear >> 5;
    if (emu::warp_size(w) != 32) emu::fail("full-mask shuffle in a partial warp" + emu::where());
    std::memcpy(emu::shuffle_slots[w][lane], &v, sizeof(T));
    emu::barrier(1 + w);
    T r = v;
    if (lane + delta < 32) std::memcpy(&r, emu::shuffle_slots[w][lane + delta], sizeof(T));
    emu::barrier(1 + w);
    return r;
}

#define CUSYNCBN_CHECK_ALIGNED(ptr, bytes)                                                        \
    do {                                                                                           \
        if (reinterpret_cast<uintptr_t>(ptr) % (bytes) != 0) {                                     \
            emu::fail("misaligned " + std::to_string(bytes) + "-byte vector access" + emu::where()); \
            emu::abort_thread();                                                                   \
        }                                                                                          \
    } while (0)

// Blocks run one after another, so device-wide ordering is trivially satisfied: the
// last-block pattern (fence, ticket, L2 read) is emulated by plain operations.
inline void __threadfence() {}
inline void __threadfence_system() {}
inline int atomicMin(int* address, int value) {       // fibers never preempt: a plain update is atomic
    const int old = *address;
    if (value < old) *address = value;
    return old;
}
inline unsigned atomicAdd(unsigned* address, unsigned value) {
    unsigned old = *address;
    *address = old + value;
    return old;
}
template <typename T> inline T __ldcg(const T* p) { return *p; }

inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline float emu_half_to_float(unsigned short bits) { _Float16 h; std::memcpy(&h, &bits, 2); return (float)h; }
inline unsigned short emu_float_to_half(float f) {
    _Float16 h = (_Float16)f;
    unsigned short bits;
    std::memcpy(&bits, &h, 2);
    return bits;
}
extern "C" void emu_set_block_order(unsigned seed) { emu::block_order_seed = seed; }

using std::isfinite;
using std::sqrt;
using std::min;
