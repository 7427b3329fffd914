// cusyncbn CUDA kernels: per-rank moments, normalization (with the finalize folded in),
// and the backward reduction and input gradient. Four kernels per training step.
//
// The maths (written once; _backend.py states it with the same names, in its vocabulary table)
// -------------------------------------------------------------------------
// The input is viewed as x[A][C][B]: channel-second layouts are (N, C, prod(spatial)),
// channel-last ones (N * prod(spatial), C, 1). Kernels named *_cs walk one channel's slab
// (channel-second, long runs B); kernels named *_cl tile the rows of C * B values and give each
// thread fixed columns, walking rows (channel-last, B == 1: a column is a channel; channel-second
// with short runs: a row holds several channels' runs; the host chooses, _tuning.layout_for).
// For channel c, with n = A * B and x0 the channel's first element x[0][c][0] (loaded once,
// so that deviations from it are of the size of the standard deviation):
//
//   moments:     s1 = sum(x - x0), s2 = sum((x - x0)^2)      (per thread in the accumulator
//                type, then summed in double in a fixed order) -> m = x0 + s1/n,
//                m2 = s2 - s1^2/n (M2: the sum of squared deviations from the local mean m)
//   payload:     buf[c] = n m, buf[C+c] = m2 + n (m - K)^2, buf[2C] = n, buf[2C+1] = t,
//                buf[2C+2] = t^2   (double; K the pivot, identical on every rank and kept in
//                `pivot` for the normalize kernel: the global mean of the layer's previous batch
//                (`pivot_state`), or on a first call the mean a first all-reduce gave
//                (`pivot_payload`); t the collective tag) -> summed over ranks by NCCL
//   normalize:   N = buf[2C], mean = buf[c]/N, var = max(buf[C+c]/N - (mean-K)^2, 0),
//                invstd = rsqrt(var + eps), y = (x - mean) * scale + offset (scale = invstd * w,
//                offset = b); block 0 writes stats, flags[0] and (when N > 0, the tags agree
//                and the channel is finite) moves the running statistics by momentum and
//                stores mean in `pivot_state_out`
//   backward:    buf[c] = sum_dy = sum dy, buf[C+c] = sum_dy_xmu = sum dy (x - mean),
//                buf[2C] = t, buf[2C+1] = t^2;
//                weight.grad += sum_dy_xmu * invstd (local), bias.grad += sum_dy (local)
//   dx:          dx = (dy - mean_dy - (x - mean) * proj) * scale, mean_dy = buf[c]/N,
//                proj = invstd^2 buf[C+c]/N; block 0 writes flags[1]   (eval: dx = dy * scale)
//   epilogue:    normalize writes y = act(z), z = (x - mean) * scale + offset + residual
//                (residual nullptr: + 0), act(z) = z < 0 ? 0 : z when `relu` (NaN and -0 stay, as
//                torch.relu), else z; computed in the accumulator type, rounded once to T
//   mask:        under ReLU the backward reads the forward's y (never a copy of z): every formula
//                of backward and dx takes g = y > 0 ? dy : 0 for dy, and dx writes dresidual = g
//                (without ReLU, g = dy); eval: dx = g * scale
//   tags:        the ranks agree when sum t == ranks * t and sum t^2 == ranks * t^2
//   report:      normalize and dx also publish their flag bits to the host: one 64-bit store of
//                (seq << 2) | bits into a slot of pinned host memory (mapped: the device writes
//                it over the bus); the host knows the slot is final when it reads its seq back
//
// Reductions are split over the whole GPU: slab grids are (splits, C) with every block
// reducing a slice of one channel; row-tile grids are (tiles, splits) with blocks (LANES, ROWS):
// lanes along a row, VEC columns per thread (16-byte loads), rows spread over ROWS and the
// splits. A block sums its threads' values in a fixed order (warp shuffles, then shared memory)
// and writes its partial to a double workspace; the last block to finish a channel (or tile)
// -- found with a device-wide ticket, the counter reset by that block for the next launch --
// sums the splits in a fixed order (deterministic) and writes the payload (a channel cut by a
// tile edge: the last of its tiles, on a second ticket). One launch per reduction, no host
// round trip. The elementwise kernels use the same grids: every block derives the coefficients
// of its own channels once (into shared memory, then registers), never per element.
//
// The epilogue is chosen at run time (`residual`, `relu`, `y`, `dresidual` are arguments, not
// template parameters: every instantiation compiles once, with NVRTC in CI): a kernel holds the
// plain loop and the epilogue's, and branches once per channel (slab) or thread between them.
// The epilogue's loops stream more arrays (normalize: the residual; backward: y; dx: y in and
// dresidual out) with fewer loads in flight per array (half; dx's, a quarter: Io::batch2 and
// batch3), so that the kernels stay within the register budget without spilling.
//
// Vector width VEC (a power of two, up to 16 bytes) is the widest the pointers' alignment
// allows such that a vector stays inside one channel's run (slabs: B % VEC == 0) or inside one
// row (row tiles: C * B % VEC == 0; it may cross from one channel's run into the next's).
//
// The elementwise kernels walk their reduction's grid backward (mirrored blocks, each thread's
// vectors last first): they start on what the reduction read last, the most likely to be in L2.
//
// Kernel arguments (one vocabulary throughout):
//   x, dy, y, dx     input / output arrays of T, contiguous, viewed as [A][C][B]; in backward and
//                    dx, y is the forward's output under ReLU (nullptr: no ReLU, the mask is 1);
//                    dx nullptr: only dresidual wanted (fixed statistics, x not read)
//   residual         added before the activation (T, as x; nullptr: none)
//   relu             1: the forward's activation is ReLU, 0: none
//   dresidual        the residual's gradient g (T, as dx; nullptr: not wanted)
//   A, C, B          rows, channels, elements per (row, channel) (B == 1 channel-last)
//   running_mean/var the layer's running statistics (P = parameter type); nullptr: not tracked
//   weight, bias     affine parameters (P); nullptr: 1 and 0
//   weight_grad/bias_grad  gradients accumulated in place (P); nullptr: not wanted
//   stats            [mean | invstd | scale | offset | flags[2]], 4C + 2 values of S (float,
//                    or double for double input)
//   buf              the all-reduce payload (double): forward 2C + 3, backward 2C + 2;
//                    nullptr in normalize / dx: fixed (eval) statistics
//   pivot_state      the pivot state per channel (double, C; nullptr: 0), read by moments
//   pivot_payload    a reduced forward payload whose means are the pivot (nullptr: none)
//   pivot_state_out  where normalize stores this batch's global means (the next pivot state)
//   pivot            the pivot K per channel (double, C), written by moments for normalize
//   count            &forward buf[2C], the global count N (dx)
//   tag, ranks       this rank's collective tag and the number of ranks (doubles, exact)
//   part, ticket     per-split partials (double workspace) and per-channel(-tile) arrival
//                    counters (unsigned, zero between launches) of the split reductions
//   report, seq      the pass's host report slot (pinned, mapped; nullptr: none) and its
//                    sequence number (cusyncbn/_flags.py)
//
// Compile-time settings come from the host (cusyncbn/_kernels/__init__.py passes them
// with -D): CUSYNCBN_MAX_THREADS (the largest block), CUSYNCBN_MIN_THREADS_PER_SM (the
// occupancy the register budget is sized for), CUSYNCBN_LOADS (16-byte loads in flight
// per array and thread).
//
// 16-bit types travel as raw 16-bit words (half_t, bf16_t) converted in pairs with PTX
// (or bit operations), so no CUDA header is needed and NVRTC compiles this file anywhere.

typedef long long i64;

#if !defined(CUSYNCBN_MAX_THREADS) || !defined(CUSYNCBN_MIN_THREADS_PER_SM) || !defined(CUSYNCBN_LOADS)
#error "compile with the -D options of cusyncbn/_kernels/__init__.py (options())"
#endif

// Registers per thread are capped so that CUSYNCBN_MIN_THREADS_PER_SM threads fit on an SM
// whatever the block size (65536 / 1024 = 64 registers for 50% occupancy).
#define BOUNDS __launch_bounds__(CUSYNCBN_MAX_THREADS, CUSYNCBN_MIN_THREADS_PER_SM / CUSYNCBN_MAX_THREADS)

constexpr double NONFINITE = 1, DESYNC = 2;         // flag bits (_backend.py)

// Loads issued before any is used, per array: CUSYNCBN_LOADS 16-byte loads' worth (at most
// 8 loads), so that narrow vectors keep as many bytes in flight as 16-byte ones.
template <int BYTES> struct Batch {
    static constexpr int raw = CUSYNCBN_LOADS * 16 / BYTES;
    static constexpr int value = raw < 1 ? 1 : (raw > 8 ? 8 : raw);
};

struct half_t { unsigned short bits; };
struct bf16_t { unsigned short bits; };

__device__ __forceinline__ float to_acc(half_t v) {
#ifdef __CUDA_ARCH__
    float f;
    asm("{ cvt.f32.f16 %0, %1; }" : "=f"(f) : "h"(v.bits));
    return f;
#else  // compiled for the CPU by the kernel emulator in tests/cuda_emu, which defines these
    return emu_half_to_float(v.bits);
#endif
}
__device__ __forceinline__ float to_acc(bf16_t v) { return __uint_as_float(((unsigned int)v.bits) << 16); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ half_t from_acc<half_t>(float v) {
    half_t h;
#ifdef __CUDA_ARCH__
    asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(h.bits) : "f"(v));
#else
    h.bits = emu_float_to_half(v);
#endif
    return h;
}
__device__ __forceinline__ unsigned short bf16_bits(float v) {
    const unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);   // NaN stays quiet
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);                   // nearest, ties even
}
template <> __device__ __forceinline__ bf16_t from_acc<bf16_t>(float v) { return bf16_t{bf16_bits(v)}; }

// ---- packed 16-bit conversions: two values per 32-bit word -----------------------------------

__device__ __forceinline__ void unpack2(unsigned w, half_t, float& lo, float& hi) {
#ifdef __CUDA_ARCH__
    asm("{ .reg .f16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }"
        : "=f"(lo), "=f"(hi) : "r"(w));
#else
    lo = emu_half_to_float((unsigned short)(w & 0xffffu));
    hi = emu_half_to_float((unsigned short)(w >> 16));
#endif
}
__device__ __forceinline__ void unpack2(unsigned w, bf16_t, float& lo, float& hi) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
}
template <typename A, typename B> struct Same { static constexpr bool value = false; };
template <typename A> struct Same<A, A> { static constexpr bool value = true; };

// Two values rounded to T (half_t or bf16_t) in one 32-bit word, lo in the low half.
template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned w;
    if constexpr (Same<T, half_t>::value) {
        asm("{ cvt.rn.f16x2.f32 %0, %1, %2; }" : "=r"(w) : "f"(hi), "f"(lo));
    } else {
        asm("{ cvt.rn.bf16x2.f32 %0, %1, %2; }" : "=r"(w) : "f"(hi), "f"(lo));
    }
    return w;
#else
    return (unsigned)from_acc<T>(lo).bits | ((unsigned)from_acc<T>(hi).bits << 16);
#endif
}

// ---- vector loads and stores -------------------------------------------------------------

template <typename U, int N> struct alignas(sizeof(U) * N) Vec { U v[N]; };
template <bool C, typename A, typename B> struct Pick { typedef A type; };
template <typename A, typename B> struct Pick<false, A, B> { typedef B type; };

// A misaligned vector access faults on the GPU; the CPU emulator (tests/cuda_emu)
// defines this hook to report one instead. Nothing on the GPU.
#ifndef CUSYNCBN_CHECK_ALIGNED
#define CUSYNCBN_CHECK_ALIGNED(ptr, bytes)
#endif

// VEC elements of T as loaded (raw; 16-bit pairs as 32-bit words), converted only when used,
// so that a batch of loads in flight costs 16 bytes of registers per load whatever T.
template <typename T, int VEC> struct Io {
    static constexpr bool pairs = sizeof(T) == 2 && VEC % 2 == 0;
    typedef typename Acc<T>::type S;
    typedef Vec<unsigned, pairs ? VEC / 2 : 1> Words;
    typedef typename Pick<pairs, Words, Vec<T, VEC>>::type Raw;
    static constexpr int vec = VEC;
    static constexpr int bytes = sizeof(T) * VEC;
    static constexpr int batch = Batch<bytes>::value;
    // dx streams two arrays and holds four coefficients per channel: half the loads per array
    // keep it within the register budget (VEC = 8: 32 registers of coefficients). The epilogue's
    // loops streaming three arrays (backward: dy, x, y) take half too; dx's (dy, x, y in, dx and
    // dresidual out), a quarter (one 16-byte load per array).
    static constexpr int batch2 = batch > 1 ? batch / 2 : 1;
    static constexpr int batch3 = batch > 3 ? batch / 4 : 1;

    static __device__ __forceinline__ Raw load(const T* p) {
        CUSYNCBN_CHECK_ALIGNED(p, bytes);
        return *reinterpret_cast<const Raw*>(p);
    }
    static __device__ __forceinline__ void unpack(const Raw& r, S (&out)[VEC]) {
        if constexpr (pairs) {
#pragma unroll
            for (int k = 0; k < VEC / 2; ++k) unpack2(r.v[k], T{}, out[2 * k], out[2 * k + 1]);
        } else {
#pragma unroll
            for (int k = 0; k < VEC; ++k) out[k] = to_acc(r.v[k]);
        }
    }
    static __device__ __forceinline__ void store(T* p, const S (&in)[VEC]) {
        Raw r;
        if constexpr (pairs) {
#pragma unroll
            for (int k = 0; k < VEC / 2; ++k) r.v[k] = pack2<T>(in[2 * k], in[2 * k + 1]);
        } else {
#pragma unroll
            for (int k = 0; k < VEC; ++k) r.v[k] = from_acc<T>(in[k]);
        }
        CUSYNCBN_CHECK_ALIGNED(p, bytes);
        *reinterpret_cast<Raw*>(p) = r;
    }
};

// ---- the epilogue ----------------------------------------------------------------------------

// The forward's epilogue on one vector: v += the residual's vector q (when `residual`), then ReLU
// (when `relu`) as torch.relu: v < 0 ? 0 : v, so that NaN and -0 stay.
template <typename io>
__device__ __forceinline__ void epilogue(typename io::S (&v)[io::vec], const typename io::Raw& q, bool residual,
                                         int relu) {
    typedef typename io::S S;
    if (residual) {
        S d[io::vec];
        io::unpack(q, d);
#pragma unroll
        for (int e = 0; e < io::vec; ++e) v[e] += d[e];
    }
    if (relu) {
#pragma unroll
        for (int e = 0; e < io::vec; ++e) v[e] = v[e] < 0 ? (S)0 : v[e];
    }
}

// The backward's mask on one vector of dy: g = y > 0 ? dy : 0, m the forward's output's vector.
template <typename io> __device__ __forceinline__ void mask(typename io::S (&g)[io::vec], const typename io::Raw& m) {
    typedef typename io::S S;
    S yv[io::vec];
    io::unpack(m, yv);
#pragma unroll
    for (int e = 0; e < io::vec; ++e) g[e] = yv[e] > 0 ? g[e] : (S)0;
}

// ---- the walks: 32-bit indices, one 64-bit offset ---------------------------------------------

__device__ __forceinline__ int thread_rank() { return threadIdx.x + threadIdx.y * blockDim.x; }
__device__ __forceinline__ int block_threads() { return blockDim.x * blockDim.y; }

// Traversal order. A reduction (moments, backward sums) walks forward; the elementwise pass after it (normalize, dx)
// walks BACKWARD: its blocks take the reduction's blocks' work in reverse order (block i of n does what block
// n - 1 - i did, as GPUs start blocks in about index order) and each thread takes its vectors last first, so that the
// second kernel starts on the data the first one read last, which is the most likely to be still in L2
// (docs/KERNELS.md, "Traversal order"). The elementwise passes are elementwise given their channels'
// coefficients: the order changes no result.
constexpr bool FORWARD = false, BACKWARD = true;

__device__ __forceinline__ int block_x(bool backward) { return backward ? gridDim.x - 1 - blockIdx.x : blockIdx.x; }
__device__ __forceinline__ int block_y(bool backward) { return backward ? gridDim.y - 1 - blockIdx.y : blockIdx.y; }

// How many of first, first + stride, ... are below end (0 when first >= end).
__device__ __forceinline__ int count_below(i64 first, i64 end, i64 stride) {
    return first < end ? (int)((end - 1 - first) / stride) + 1 : 0;
}

// Element j = a * B + b of channel c's slab in x[A][C][B], at offset (a * C + c) * B + b,
// moved by a fixed stride (negative: backward): one division up front, then adds and one compare per vector.
struct SlabWalk {
    int b, db, B;
    i64 at, step, wrap;
    __device__ SlabWalk(i64 j, int stride, int C, int B_, int c) : B(B_) {
        const i64 row = j / B;
        b = (int)(j - row * B);
        at = (row * C + c) * B + b;
        const int da = stride / B;                     // toward zero: db has the sign of stride, |db| < B
        db = stride - da * B;
        step = (i64)da * C * B + db;
        wrap = (i64)(C - 1) * B;                       // b leaves [0, B): one row more (or less) of the slab
    }
    template <bool DIR> __device__ __forceinline__ void move() {
        b += db;
        at += step;
        if constexpr (DIR == FORWARD) {
            if (b >= B) { b -= B; at += wrap; }
        } else {
            if (b < 0) { b += B; at -= wrap; }
        }
    }
};

// Calls load(u, offset) for BATCH vectors, then use(u, offset) for each, over `count` vectors of a walk: full
// batches without a bound check, then the rest as one more batch (one round trip to memory, not one per leftover
// vector), whose unused slots load the first leftover again (unconditional loads: predicated ones cost registers
// that spill) and are not used. The use order is the walk's order whatever the batching.
template <int BATCH, bool DIR, typename Load, typename Use>
__device__ __forceinline__ void slab_loop(SlabWalk& w, int count, Load load, Use use) {
    int m = 0;
#pragma unroll 1                                       // BATCH loads in flight: the setting, not twice it
    for (; m + BATCH <= count; m += BATCH) {
        i64 at[BATCH];
#pragma unroll
        for (int u = 0; u < BATCH; ++u) { at[u] = w.at; load(u, w.at); w.template move<DIR>(); }
#pragma unroll
        for (int u = 0; u < BATCH; ++u) use(u, at[u]);
    }
    const int rest = count - m;
    if (rest <= 0) return;
    if constexpr (BATCH <= 2) {                        // at most one leftover
        load(0, w.at);
        use(0, w.at);
        return;
    }
    SlabWalk again = w;                                // the leftovers' offsets, walked again for their use
    const i64 first = w.at;
#pragma unroll
    for (int u = 0; u < BATCH; ++u) {
        load(u, u < rest ? w.at : first);
        w.template move<DIR>();
    }
#pragma unroll
    for (int u = 0; u < BATCH; ++u) {
        if (u < rest) use(u, again.at);
        again.template move<DIR>();
    }
}

// The same over `count` offsets at, at + step, ... (BACKWARD: the same offsets, last first).
template <int BATCH, bool DIR, typename Load, typename Use>
__device__ __forceinline__ void strided_loop(i64 at, i64 step, int count, Load load, Use use) {
    if constexpr (DIR == BACKWARD) {
        at += (i64)(count - 1) * step;
        step = -step;
    }
    int m = 0;
#pragma unroll 1
    for (; m + BATCH <= count; m += BATCH, at += BATCH * step) {
#pragma unroll
        for (int u = 0; u < BATCH; ++u) load(u, at + u * step);
#pragma unroll
        for (int u = 0; u < BATCH; ++u) use(u, at + u * step);
    }
    const int rest = count - m;
    if (rest <= 0) return;
    if constexpr (BATCH <= 2) {                        // at most one leftover
        load(0, at);
        use(0, at);
        return;
    }
#pragma unroll
    for (int u = 0; u < BATCH; ++u) load(u, at + (u < rest ? u : 0) * step);
#pragma unroll
    for (int u = 0; u < BATCH; ++u) {
        if (u < rest) use(u, at + u * step);
    }
}

// The channel-second slab of this block's split: vectors from (split * blockDim.x + threadIdx.x) * VEC in steps of
// gridDim.x * blockDim.x * VEC, up to A * B; `count` of them. The walk starts at the first (FORWARD) or the last.
template <int VEC, bool DIR> __device__ __forceinline__ SlabWalk slab_of(int A, int C, int B, int c, int& count) {
    const i64 first = ((i64)block_x(DIR) * blockDim.x + threadIdx.x) * VEC;
    const int stride = gridDim.x * blockDim.x * VEC;
    count = count_below(first, (i64)A * B, stride);
    return DIR == FORWARD ? SlabWalk(first, stride, C, B, c)
                          : SlabWalk(first + (i64)(count - 1) * stride, -stride, C, B, c);
}

// Channel-second grids loop over channels beyond grid.y: block row y takes channels y, y + gridDim.y, ... < C, the
// elementwise passes those of the mirrored row, last first. f(c) for each.
template <bool DIR, typename F> __device__ __forceinline__ void for_channels(int C, F f) {
    const int G = gridDim.y, y = block_y(DIR);
    if constexpr (DIR == FORWARD) {
        for (int c = y; c < C; c += G) f(c);
    } else {
        for (int c = y + (C - 1 - y) / G * G; c >= y; c -= G) f(c);      // (y < C: grid.y <= C)
    }
}

// ---- row tiles (*_cl kernels): x[A][C][B] as A rows of K = C * B columns ------------------------

// Column k of a row belongs to channel k / B. Channel-last (B == 1) a column is a channel; channel-second with short
// rows, a row of a tile holds the rows of several channels, one after the other, and a vector may hold the end of
// one channel's row and the start of the next's (K % VEC == 0, so it never leaves the row). Block (tile, split) of
// (LANES, ROWS) threads covers columns tile * LANES * VEC .. + LANES * VEC - 1 (ncol of them in the last tile) and
// rows split * ROWS + ty + m * splits * ROWS; thread (tx, ty) owns the VEC columns from k0.
template <int VEC> struct RowTile {
    int K, B, k_first, ncol, ch0, nch, k0, rel0, pos0;   // column k0: channel ch0 + rel0, position pos0 of B
    __device__ RowTile(int C, int B_, int tile) : B(B_) {
        K = C * B;
        k_first = tile * blockDim.x * VEC;
        ncol = min((int)blockDim.x * VEC, K - k_first);
        ch0 = k_first / B;
        nch = (k_first + ncol - 1) / B - ch0 + 1;
        k0 = k_first + threadIdx.x * VEC;
        const int c = k0 / B;
        rel0 = c - ch0;
        pos0 = k0 - c * B;
    }
    __device__ __forceinline__ bool owns() const { return k0 < K; }
    // f(e, c) for the thread's columns k0 + e, e = 0 .. VEC - 1, of channels ch0 + c (kept as a running count, not
    // an array: the column's channel costs no register after its use).
    template <typename F> __device__ __forceinline__ void each(F f) const {
        int c = rel0, p = pos0;
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            f(e, c);
            if (++p == B) { p = 0; ++c; }
        }
    }
    // Coefficient j (of N per channel, cf as channel_coefficients fills it) of this thread's columns.
    template <int N, typename S> __device__ __forceinline__ void coefficient(const S* cf, int j, S (&out)[VEC]) const {
        each([&](int e, int c) { out[e] = cf[c * N + j]; });
    }
};

// This thread's rows of a row-tile grid, for strided_loop: the offset of its first row, the step, the count (the
// elementwise passes take the mirrored split's rows).
struct RowWalk {
    i64 at, step;
    int count;
};
template <bool DIR, int VEC> __device__ __forceinline__ RowWalk rows_of(const RowTile<VEC>& t, int A) {
    const int a = block_y(DIR) * blockDim.y + threadIdx.y, stride = gridDim.y * blockDim.y;
    return RowWalk{(i64)a * t.K + t.k0, (i64)stride * t.K, count_below(a, A, stride)};
}

// The walks as objects, for helpers that run one of several loops over the same vectors
// (`walk.template run<BATCH>(load, use)`; NVRTC takes no generic lambda in device code).
template <bool DIR> struct SlabLoop {
    SlabWalk& w;
    int count;
    template <int BATCH, typename Load, typename Use> __device__ __forceinline__ void run(Load load, Use use) const {
        slab_loop<BATCH, DIR>(w, count, load, use);
    }
};
template <bool DIR> struct RowsLoop {
    RowWalk w;
    template <int BATCH, typename Load, typename Use> __device__ __forceinline__ void run(Load load, Use use) const {
        strided_loop<BATCH, DIR>(w.at, w.step, w.count, load, use);
    }
};

// ---- block and split sums (fixed order: bitwise reproducible) ---------------------------------

// Sums v over the threads of a block that share a lane (threads t and t + LANES * k hold the
// same channels; LANES = 1 for 1-D channel-second blocks) into tile[(lane * CH + k) * W + f]
// (in shared memory, items = lanes * CH * W doubles); sh is scratch of
// max(warps * items, threads) doubles. Every thread must call it.
template <int CH, int W>
__device__ void tile_sum(double (&v)[CH][W], int lanes, double* sh, double* tile) {
    const int t = thread_rank(), nt = block_threads();
    for (int off = 16; off >= lanes; off >>= 1) {
#pragma unroll
        for (int k = 0; k < CH; ++k) {
#pragma unroll
            for (int f = 0; f < W; ++f) v[k][f] += __shfl_down_sync(0xffffffffu, v[k][f], off);
        }
    }
    const int items = lanes * CH * W, warp = t >> 5, lane = t & 31;
    if (lane < lanes) {
#pragma unroll
        for (int k = 0; k < CH; ++k) {
#pragma unroll
            for (int f = 0; f < W; ++f) sh[warp * items + (lane * CH + k) * W + f] = v[k][f];
        }
    }
    __syncthreads();
    for (int i = t; i < items; i += nt) {
        double s = 0;
        for (int w = 0; w < nt >> 5; ++w) s += sh[w * items + i];
        tile[i] = s;
    }
    __syncthreads();
}

// Called by every thread of a block once its partials are written: true (in every thread)
// in the last of `count` blocks to arrive on `*ticket`, which that block resets to zero
// for the next launch (all others have arrived by then).
__device__ bool arrive_last(unsigned* ticket, unsigned count) {
    __shared__ bool last;
    __threadfence();                                   // our partials are visible device-wide
    __syncthreads();                                   // ... for every thread of the block
    if (thread_rank() == 0) {
        last = atomicAdd(ticket, 1u) == count - 1;
        // The last block acquires the others' partials: fence after seeing the final count
        // (the PTX memory model's acquire side of the writers' fence + atomic).
        if (last) { __threadfence(); *ticket = 0; }
    }
    __syncthreads();
    return last;
}

// The second half of a split reduction: tile holds this block's sums for channels c0 ..
// c0 + nch - 1 (W doubles each); split `s` of `splits`. Returns true where the channels'
// totals are in tile: directly with one split, else in the last block to arrive, which sums
// every split's partial (part[(c * splits + s) * W + f]) in a fixed order. The read goes
// through L2 (__ldcg): L1 is not coherent between SMs. Every thread must call it.
template <int W>
__device__ bool split_total(double* tile, int c0, int nch, int splits, int s, double* part, unsigned* ticket,
                            double* sh) {
    if (splits == 1) return true;
    const int t = thread_rank(), nt = block_threads(), items = nch * W;
    for (int i = t; i < items; i += nt) part[((i64)(c0 + i / W) * splits + s) * W + i % W] = tile[i];
    if (!arrive_last(ticket, splits)) return false;
    const int J = items < nt ? nt / items : 1;         // threads per item, each summing every J-th split
    for (int u = t; u < J * items; u += nt) {
        const int i = u % items, j = u / items;
        const double* p = part + (i64)(c0 + i / W) * splits * W + i % W;
        double acc = 0;
        for (int q = j; q < splits; q += J) acc += __ldcg(p + (i64)q * W);
        sh[u] = acc;
    }
    __syncthreads();
    for (int i = t; i < items; i += nt) {
        double acc = 0;
        for (int j = 0; j < J; ++j) acc += sh[j * items + i];
        tile[i] = acc;
    }
    __syncthreads();
    return true;
}

// Row tiles of short channel-second rows: the tile's column totals (tile[2 * i + f] for column k_first + i, ncol
// columns, tile width W) -> the channel totals. A channel whose columns all lie in this tile is written at once (its
// columns summed in order). One that spans several tiles (only a tile's first and last channel can) leaves this
// tile's share in edge[(tile * 2 + side) * 2 + f] (side 0: the tile's first channel, 1: its last) and arrives on
// edge_ticket[c], which the last of its tiles to arrive resets; that one sums the shares in tile order (fixed:
// bitwise reproducible). One thread per channel, each with its own fence / ticket / fence (as arrive_last).
template <typename F>
__device__ void channel_totals(const double* tile, int k_first, int ncol, int W, int B, double* edge,
                               unsigned* edge_ticket, F write) {
    const int ch0 = k_first / B, nch = (k_first + ncol - 1) / B - ch0 + 1, tile_index = k_first / W;
    for (int i = thread_rank(); i < nch; i += block_threads()) {
        const int c = ch0 + i, lo = c * B > k_first ? c * B - k_first : 0, hi = min(c * B + B - k_first, ncol);
        double t1 = 0, t2 = 0;
        for (int k = lo; k < hi; ++k) { t1 += tile[2 * k]; t2 += tile[2 * k + 1]; }
        const int first = c * B / W, last = (c * B + B - 1) / W;
        if (first == last) { write(c, t1, t2); continue; }
        double* share = edge + ((i64)tile_index * 2 + (i == 0 ? 0 : 1)) * 2;
        share[0] = t1;
        share[1] = t2;
        __threadfence();                               // our share is visible device-wide
        if (atomicAdd(edge_ticket + c, 1u) != (unsigned)(last - first)) continue;
        __threadfence();                               // ... and the others' are visible to us
        edge_ticket[c] = 0;
        t1 = 0;
        t2 = 0;
        for (int t = first; t <= last; ++t) {
            const double* other = edge + ((i64)t * 2 + (c == t * W / B ? 0 : 1)) * 2;
            t1 += __ldcg(other);
            t2 += __ldcg(other + 1);
        }
        write(c, t1, t2);
    }
}

// Per-thread sums (a[e], b[e]) of columns tile_k0 + lane * CH + e (of K, column k in channel k / B; slab kernels:
// one column, the channel) -> the channel totals, passed to write(c, total_a, total_b) once per channel, in the
// block that finishes it (split `split` of `splits`, arriving on `ticket`; with B > 1 through channel_totals, on
// `edge` and `edge_ticket`). Every thread must call it.
template <int CH, typename S, typename F>
__device__ void finish_sums(const S (&a)[CH], const S (&b)[CH], int lanes, int tile_k0, int K, int B, int splits,
                            int split, double* part, unsigned* ticket, double* edge, unsigned* edge_ticket, F write) {
    extern __shared__ double sh[];                     // tile_sum scratch, then the tile
    const int items = lanes * CH * 2, nt = block_threads();
    double* tile = sh + (nt > (nt >> 5) * items ? nt : (nt >> 5) * items);
    double sums[CH][2];
#pragma unroll
    for (int e = 0; e < CH; ++e) { sums[e][0] = a[e]; sums[e][1] = b[e]; }
    tile_sum<CH, 2>(sums, lanes, sh, tile);
    const int ncol = min(lanes * CH, K - tile_k0);
    if (!split_total<2>(tile, tile_k0, ncol, splits, split, part, ticket, sh)) return;
    if (B == 1) {
        for (int i = thread_rank(); i < ncol; i += nt) write(tile_k0 + i, tile[2 * i], tile[2 * i + 1]);
    } else {
        channel_totals(tile, tile_k0, ncol, lanes * CH, B, edge, edge_ticket, write);
    }
}

// Per-channel coefficients of channels c0 .. c0 + nch - 1 into shared memory (N of S per
// channel), one thread per channel, so that each is computed once per block. Every thread
// must call it; f(c, out) writes channel c's coefficients.
template <int N, typename S, typename F> __device__ void channel_coefficients(int c0, int nch, S* cf, F f) {
    __syncthreads();                                   // cf is free: earlier readers are done
#pragma unroll 1                                       // (no trip count computed up front, kept live in a register)
    for (int i = thread_rank(); i < nch; i += block_threads()) f(c0 + i, cf + i * N);
    __syncthreads();
}

// ---- forward: this rank's payload ------------------------------------------------------

// The pivot K of channel c, the same on every rank: the reduced mean of a first all-reduce
// (pivot_payload: a layer's first call, or a call without state), else the caller's pivot
// state (the global mean of the layer's previous batch), else 0; 0 where not finite.
__device__ __forceinline__ double pivot_of(const double* pivot_state, const double* pivot_payload, int c, int C) {
    double K = 0;
    if (pivot_payload != nullptr) {
        const double n = pivot_payload[2 * C];
        K = n > 0 ? pivot_payload[c] / n : 0;
    } else if (pivot_state != nullptr) {
        K = pivot_state[c];
    }
    return isfinite(K) ? K : 0;
}

__device__ __forceinline__ void write_tags(double* at, double tag) {
    at[0] = tag;
    at[1] = tag * tag;
}

// From the sums around the channel's first element x0: buf[c] = n m, buf[C+c] = m2 + n (m - K)^2.
__device__ void write_moments(int c, int C, double n, double x0, double s1, double s2, const double* pivot_state,
                              const double* pivot_payload, double* pivot, double* buf) {
    const double d1 = s1 / n, m = x0 + d1;
    double m2 = s2 - s1 * d1;
    m2 = m2 < 0 ? 0 : m2;                              // (NaN stays NaN)
    const double K = pivot_of(pivot_state, pivot_payload, c, C), d = m - K;
    buf[c] = n * m;
    buf[C + c] = m2 + n * d * d;
    pivot[c] = K;
}

// No local input: zeros, n = 0 and the tags (one block).
__device__ void empty_moments(int C, const double* pivot_state, const double* pivot_payload, double tag,
                              double* pivot, double* buf) {
    for (int c = thread_rank(); c < C; c += block_threads()) {
        buf[c] = 0;
        buf[C + c] = 0;
        pivot[c] = pivot_of(pivot_state, pivot_payload, c, C);
    }
    if (thread_rank() == 0) {
        buf[2 * C] = 0;
        write_tags(buf + 2 * C + 1, tag);
    }
}

// Channel-second slabs: grid (splits, min(C, 65535)), 1-D blocks; block (s, y) sums its slice of
// channels y, y + gridDim.y, ...; ticket[c] finds the last block of channel c.
#define MOMENTS_PARAMS                                                                                        \
    const T *__restrict__ x, int A, int C, int B, const double *__restrict__ pivot_state,                    \
        const double *__restrict__ pivot_payload, double tag, double *__restrict__ part,                      \
        unsigned *__restrict__ ticket, double *__restrict__ pivot, double *__restrict__ buf

template <typename T, int VEC> __global__ void BOUNDS moments_cs(MOMENTS_PARAMS) {
    typedef Io<T, VEC> io;
    typedef typename io::S S;
    constexpr int BATCH = io::batch;
    if (A == 0 || B == 0) { empty_moments(C, pivot_state, pivot_payload, tag, pivot, buf); return; }
    for_channels<FORWARD>(C, [&](int c) {
        const S x0 = to_acc(x[(i64)c * B]);
        S s1 = 0, s2 = 0;
        typename io::Raw r[BATCH];
        int count;
        SlabWalk w = slab_of<VEC, FORWARD>(A, C, B, c, count);
        slab_loop<BATCH, FORWARD>(w, count, [&](int u, i64 at) { r[u] = io::load(x + at); }, [&](int u, i64) {
            S v[VEC];
            io::unpack(r[u], v);
#pragma unroll
            for (int e = 0; e < VEC; ++e) { const S d = v[e] - x0; s1 += d; s2 += d * d; }
        });
        const S a1[1] = {s1}, a2[1] = {s2};
        finish_sums(a1, a2, 1, c, C, 1, gridDim.x, blockIdx.x, part, ticket + c, nullptr, nullptr,
                    [&](int ch, double t1, double t2) {
                        write_moments(ch, C, (double)A * B, (double)x0, t1, t2, pivot_state, pivot_payload, pivot,
                                      buf);
                        if (ch == 0) { buf[2 * C] = (double)A * B; write_tags(buf + 2 * C + 1, tag); }
                    });
    });
}

// The row-tile reductions' workspace: `part` holds the split partials (K * splits * 2 doubles, with more than one
// split), then the edge shares of channel_totals (tiles * 4 doubles, B > 1); `ticket` the tiles' tickets, then the
// channels' (C, B > 1).
__device__ __forceinline__ double* edge_shares(double* part, int K) {
    return part + (gridDim.y > 1 ? (i64)K * gridDim.y * 2 : 0);
}

// Row tiles (channel-last, and channel-second with short rows; RowTile): grid (tiles, splits), blocks (LANES, ROWS);
// ticket[tile] finds the last block of the tile, channel_totals the last tile of a channel that spans several.
// Every column of a channel is summed around the channel's first element x[0][c][0].
template <typename T, int VEC> __global__ void BOUNDS moments_cl(MOMENTS_PARAMS) {
    typedef Io<T, VEC> io;
    typedef typename io::S S;
    constexpr int BATCH = io::batch;
    if (A == 0) { empty_moments(C, pivot_state, pivot_payload, tag, pivot, buf); return; }
    const RowTile<VEC> t(C, B, blockIdx.x);
    S s1[VEC], s2[VEC], x0[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) { s1[e] = 0; s2[e] = 0; x0[e] = 0; }
    if (t.owns()) {
        if (B == 1) {
            io::unpack(io::load(x + t.k0), x0);        // row 0: the channels' first elements
        } else {
            t.each([&](int e, int c) { x0[e] = to_acc(x[(i64)(t.ch0 + c) * B]); });
        }
        typename io::Raw r[BATCH];
        const RowWalk w = rows_of<FORWARD>(t, A);
        strided_loop<BATCH, FORWARD>(w.at, w.step, w.count, [&](int u, i64 at) { r[u] = io::load(x + at); },
                                     [&](int u, i64) {
                                         S v[VEC];
                                         io::unpack(r[u], v);
#pragma unroll
                                         for (int e = 0; e < VEC; ++e) {
                                             const S d = v[e] - x0[e];
                                             s1[e] += d;
                                             s2[e] += d * d;
                                         }
                                     });
    }
    finish_sums(s1, s2, blockDim.x, t.k_first, t.K, B, gridDim.y, blockIdx.y, part, ticket + blockIdx.x,
                edge_shares(part, t.K), ticket + gridDim.x, [&](int c, double t1, double t2) {
                    write_moments(c, C, (double)A * B, (double)to_acc(x[(i64)c * B]), t1, t2, pivot_state,
                                  pivot_payload, pivot, buf);
                    if (c == 0) { buf[2 * C] = (double)A * B; write_tags(buf + 2 * C + 1, tag); }
                });
}

// ---- forward: normalization (the finalize folded in) ----------------------------------------

// Channel c's mean and biased variance: from the reduced payload, or fixed (buf == nullptr:
// the running statistics).
template <typename P>
__device__ __forceinline__ void channel_stats(int c, int C, const double* buf, const double* pivot,
                                              const P* running_mean, const P* running_var, double& mean,
                                              double& var) {
    if (buf == nullptr) {
        mean = (double)running_mean[c];
        var = (double)running_var[c];
        return;
    }
    const double n = buf[2 * C];
    mean = 0;
    var = 0;
    if (n > 0) {
        mean = buf[c] / n;
        const double d = mean - pivot[c];
        var = (buf[C + c] - n * d * d) / n;
        var = var < 0 ? 0 : var;                       // (NaN stays NaN)
    }
}

// y = (x - mean) * scale + offset: cf[0..2] = (mean, scale, offset) = (mean, invstd * w, b) of channel c.
template <typename S, typename P>
__device__ __forceinline__ void normalize_coefficients(int c, int C, const double* buf, const double* pivot,
                                                       const P* running_mean, const P* running_var, double eps,
                                                       const P* weight, const P* bias, S* cf) {
    double mean, var;
    channel_stats(c, C, buf, pivot, running_mean, running_var, mean, var);
    const double invstd = 1.0 / sqrt(var + eps);
    cf[0] = (S)mean;
    cf[1] = (S)(invstd * (weight ? (double)weight[c] : 1.0));
    cf[2] = (S)(bias ? (double)bias[c] : 0.0);
}

// The host report: one system-scope 64-bit store, (seq << 24) | ((channel + 1) << 2) | bits
// (bits < 4; channel the first non-finite channel, -1 for none, below 2^22 - 1). The host polls
// the slot without any CUDA call; a value carrying its seq is final.
__device__ __forceinline__ void publish_report(unsigned long long* report, unsigned long long seq, int bits,
                                               int channel) {
    if (report == nullptr) return;
    __threadfence_system();
    const unsigned long long where = (unsigned long long)((channel + 1) & 0x3FFFFF);
    *(volatile unsigned long long*)report = (seq << 24) | (where << 2) | (unsigned long long)bits;
}

__device__ __forceinline__ bool tags_agree(const double* sums, double tag, double ranks) {
    return sums[0] == ranks * tag && sums[1] == ranks * tag * tag;
}

// Block 0's duty: stats for every channel, flags[0], and the running statistics (batch mode,
// N > 0, tags agreeing, channel finite). Every thread of the block calls it.
template <typename S, typename P>
__device__ void write_stats(int C, const double* buf, const double* pivot, double tag, double ranks,
                            P* running_mean, P* running_var, double momentum, double eps, int unbiased,
                            const P* weight, const P* bias, S* stats, unsigned long long* report,
                            unsigned long long seq, double* pivot_state_out, int strict) {
    __shared__ int first_nonfinite;                    // the first non-finite channel (C: none)
    if (thread_rank() == 0) first_nonfinite = C;
    __syncthreads();
    const bool batch = buf != nullptr;
    const double n = batch ? buf[2 * C] : 0;
    const bool desync = batch && !tags_agree(buf + 2 * C + 1, tag, ranks);
    for (int c = thread_rank(); c < C; c += block_threads()) {
        double mean, var;
        channel_stats(c, C, buf, pivot, running_mean, running_var, mean, var);
        const double invstd = 1.0 / sqrt(var + eps);
        stats[c] = (S)mean;
        stats[C + c] = (S)invstd;
        stats[2 * C + c] = (S)(invstd * (weight ? (double)weight[c] : 1.0));
        stats[3 * C + c] = (S)(bias ? (double)bias[c] : 0.0);
        if (batch && !(isfinite(mean) && isfinite(var))) atomicMin(&first_nonfinite, c);
    }
    __syncthreads();
    // The running statistics and the pivot move per finite channel; with `strict` (nonfinite
    // = "raise") none moves when any channel is not finite.
    const bool nonfinite = first_nonfinite < C;
    const bool update = batch && n > 0 && !desync && !(strict && nonfinite);
    for (int c = thread_rank(); update && c < C; c += block_threads()) {
        double mean, var;
        channel_stats(c, C, buf, pivot, running_mean, running_var, mean, var);
        if (!(isfinite(mean) && isfinite(var))) continue;
        if (pivot_state_out != nullptr) pivot_state_out[c] = mean;
        if (running_mean != nullptr && running_var != nullptr) {
            const double v = (unbiased && n > 1) ? var * (n / (n - 1)) : var;
            running_mean[c] = (P)((double)running_mean[c] * momentum + mean * (1.0 - momentum));
            running_var[c] = (P)((double)running_var[c] * momentum + v * (1.0 - momentum));
        }
    }
    if (thread_rank() == 0) {
        const int bits = (nonfinite ? (int)NONFINITE : 0) + (desync ? (int)DESYNC : 0);
        stats[4 * C] = (S)bits;
        publish_report(report, seq, bits, nonfinite ? first_nonfinite : -1);
    }
}

// The normalize loops over this thread's vectors (a SlabLoop or RowsLoop): y = affine(x) from x
// alone (io::batch loads in flight), or with the epilogue y = act(affine(x) + residual) (x and
// the residual, io::batch2 loads each); affine(v) applies the channels' (mean, scale, offset) to
// a vector in place.
template <typename io, typename T, typename Walk, typename Affine>
__device__ __forceinline__ void normalize_loops(const Walk& walk, const T* x, T* y, const T* residual, int relu,
                                                Affine affine) {
    typedef typename io::S S;
    auto out = [&](const typename io::Raw& xr, const typename io::Raw& rr, i64 at, bool fused) {
        S v[io::vec];
        io::unpack(xr, v);
        affine(v);
        if (fused) epilogue<io>(v, rr, residual != nullptr, relu);
        io::store(y + at, v);
    };
    if (residual == nullptr && !relu) {
        typename io::Raw r[io::batch];
        walk.template run<io::batch>([&](int u, i64 at) { r[u] = io::load(x + at); },
                                     [&](int u, i64 at) { out(r[u], r[u], at, false); });
    } else {
        typename io::Raw r[io::batch2], q[io::batch2];
        walk.template run<io::batch2>([&](int u, i64 at) {
            r[u] = io::load(x + at);
            if (residual != nullptr) q[u] = io::load(residual + at);
        }, [&](int u, i64 at) { out(r[u], q[u], at, true); });
    }
}

#define NORMALIZE_PARAMS                                                                                      \
    const T *__restrict__ x, T *__restrict__ y, int A, int C, int B, const double *__restrict__ buf,          \
        const double *__restrict__ pivot, double tag, double ranks, P *running_mean, P *running_var,          \
        double momentum, double eps, int unbiased, const P *__restrict__ weight, const P *__restrict__ bias,  \
        typename Acc<T>::type *__restrict__ stats, unsigned long long *report, unsigned long long seq,        \
        double *pivot_state_out, int strict, const T *__restrict__ residual, int relu
#define NORMALIZE_STATS_DUTY                                                                                  \
    if (blockIdx.x == 0 && blockIdx.y == 0)                                                                   \
        write_stats(C, buf, pivot, tag, ranks, running_mean, running_var, momentum, eps, unbiased, weight, bias, \
                    stats, report, seq, pivot_state_out, strict);

// Channel-second, the grid of moments_cs, walked BACKWARD.
template <typename T, typename P, int VEC> __global__ void BOUNDS normalize_cs(NORMALIZE_PARAMS) {
    typedef Io<T, VEC> io;
    typedef typename io::S S;
    NORMALIZE_STATS_DUTY
    if (A == 0 || B == 0) return;
    extern __shared__ double sh[];
    S* cf = reinterpret_cast<S*>(sh);
    for_channels<BACKWARD>(C, [&](int c) {
        channel_coefficients<3>(c, 1, cf, [&](int ch, S* out) {
            normalize_coefficients(ch, C, buf, pivot, running_mean, running_var, eps, weight, bias, out);
        });
        const S mean = cf[0], scale = cf[1], offset = cf[2];
        int count;
        SlabWalk w = slab_of<VEC, BACKWARD>(A, C, B, c, count);
        normalize_loops<io>(SlabLoop<BACKWARD>{w, count}, x, y, residual, relu, [&](S (&v)[VEC]) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) v[e] = (v[e] - mean) * scale + offset;
        });
    });
}

// Row tiles, the grid of moments_cl, walked BACKWARD: each thread keeps its VEC columns' coefficients in registers
// and walks rows.
template <typename T, typename P, int VEC> __global__ void BOUNDS normalize_cl(NORMALIZE_PARAMS) {
    typedef Io<T, VEC> io;
    typedef typename io::S S;
    NORMALIZE_STATS_DUTY
    extern __shared__ double sh[];
    S* cf = reinterpret_cast<S*>(sh);
    const RowTile<VEC> t(C, B, block_x(BACKWARD));
    channel_coefficients<3>(t.ch0, t.nch, cf, [&](int ch, S* out) {
        normalize_coefficients(ch, C, buf, pivot, running_mean, running_var, eps, weight, bias, out);
    });
    if (!t.owns()) return;
    S mean[VEC], scale[VEC], offset[VEC];
    t.template coefficient<3>(cf, 0, mean);
    t.template coefficient<3>(cf, 1, scale);
    t.template coefficient<3>(cf, 2, offset);
    normalize_loops<io>(RowsLoop<BACKWARD>{rows_of<BACKWARD>(t, A)}, x, y, residual, relu, [&](S (&v)[VEC]) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = (v[e] - mean[e]) * scale[e] + offset[e];
    });
}

// ---- backward: this rank's sums -----------------------------------------------------------

// buf[c] = sum_dy, buf[C+c] = sum_dy_xmu; this rank's parameter gradients accumulate
// (before the all-reduce overwrites the payload).
template <typename S, typename P>
__device__ void write_sums(int c, int C, double sum_dy, double sum_dy_xmu, const S* stats, double tag,
                           P* weight_grad, P* bias_grad, double* buf) {
    buf[c] = sum_dy;
    buf[C + c] = sum_dy_xmu;
    if (weight_grad != nullptr) weight_grad[c] = (P)((double)weight_grad[c] + sum_dy_xmu * (double)stats[C + c]);
    if (bias_grad != nullptr) bias_grad[c] = (P)((double)bias_grad[c] + sum_dy);
    if (c == 0) write_tags(buf + 2 * C, tag);
}

__device__ void empty_sums(int C, double tag, double* buf) {
    for (int c = thread_rank(); c < C; c += block_threads()) {
        buf[c] = 0;
        buf[C + c] = 0;
    }
    if (thread_rank() == 0) write_tags(buf + 2 * C, tag);
}

// The backward loops over this thread's vectors (a SlabLoop or RowsLoop): dy and x (io::batch
// loads in flight each) or, under ReLU, dy, x and y (io::batch2 each); add(g, x) sums a vector of
// g (dy masked by y under ReLU) and of x.
template <typename io, typename T, typename Walk, typename Sum>
__device__ __forceinline__ void backward_loops(const Walk& walk, const T* dy, const T* x, const T* y, Sum sum) {
    typedef typename io::S S;
    auto add = [&](const typename io::Raw& gr, const typename io::Raw& xr, const typename io::Raw& yr, bool masked) {
        S gv[io::vec], v[io::vec];
        io::unpack(gr, gv);
        io::unpack(xr, v);
        if (masked) mask<io>(gv, yr);
        sum(gv, v);
    };
    if (y == nullptr) {
        typename io::Raw g[io::batch], r[io::batch];
        walk.template run<io::batch>([&](int u, i64 at) { g[u] = io::load(dy + at); r[u] = io::load(x + at); },
                                     [&](int u, i64) { add(g[u], r[u], r[u], false); });
    } else {
        typename io::Raw g[io::batch2], r[io::batch2], m[io::batch2];
        walk.template run<io::batch2>([&](int u, i64 at) {
            g[u] = io::load(dy + at);
            r[u] = io::load(x + at);
            m[u] = io::load(y + at);
        }, [&](int u, i64) { add(g[u], r[u], m[u], true); });
    }
}

#define BACKWARD_PARAMS                                                                                       \
    const T *__restrict__ dy, const T *__restrict__ x, int A, int C, int B,                                   \
        const typename Acc<T>::type *__restrict__ stats, double tag, double *__restrict__ part,              \
        unsigned *__restrict__ ticket, P *weight_grad, P *bias_grad, double *__restrict__ buf,                \
        const T *__restrict__ y

// Same grids, partials (width 2) and tickets as moments_cs / moments_cl.
template <typename T, typename P, int VEC> __global__ void BOUNDS backward_cs(BACKWARD_PARAMS) {
    typedef Io<T, VEC> io;
    typedef typename io::S S;
    if (A == 0 || B == 0) { empty_sums(C, tag, buf); return; }
    for_channels<FORWARD>(C, [&](int c) {
        const S mean = stats[c];
        S sum_dy = 0, sum_dy_xmu = 0;
        int count;
        SlabWalk w = slab_of<VEC, FORWARD>(A, C, B, c, count);
        backward_loops<io>(SlabLoop<FORWARD>{w, count}, dy, x, y, [&](const S (&g)[VEC], const S (&v)[VEC]) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) { sum_dy += g[e]; sum_dy_xmu += g[e] * (v[e] - mean); }
        });
        const S a1[1] = {sum_dy}, a2[1] = {sum_dy_xmu};
        finish_sums(a1, a2, 1, c, C, 1, gridDim.x, blockIdx.x, part, ticket + c, nullptr, nullptr,
                    [&](int ch, double t1, double t2) {
                        write_sums(ch, C, t1, t2, stats, tag, weight_grad, bias_grad, buf);
                    });
    });
}

template <typename T, typename P, int VEC> __global__ void BOUNDS backward_cl(BACKWARD_PARAMS) {
    typedef Io<T, VEC> io;
    typedef typename io::S S;
    if (A == 0) { empty_sums(C, tag, buf); return; }
    const RowTile<VEC> t(C, B, blockIdx.x);
    S sum_dy[VEC], sum_dy_xmu[VEC], mean[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) { sum_dy[e] = 0; sum_dy_xmu[e] = 0; mean[e] = 0; }
    if (t.owns()) {
        t.each([&](int e, int c) { mean[e] = stats[t.ch0 + c]; });
        backward_loops<io>(RowsLoop<FORWARD>{rows_of<FORWARD>(t, A)}, dy, x, y,
                           [&](const S (&g)[VEC], const S (&v)[VEC]) {
#pragma unroll
                               for (int e = 0; e < VEC; ++e) {
                                   sum_dy[e] += g[e];
                                   sum_dy_xmu[e] += g[e] * (v[e] - mean[e]);
                               }
                           });
    }
    finish_sums(sum_dy, sum_dy_xmu, blockDim.x, t.k_first, t.K, B, gridDim.y, blockIdx.y, part, ticket + blockIdx.x,
                edge_shares(part, t.K), ticket + gridDim.x, [&](int c, double t1, double t2) {
                    write_sums(c, C, t1, t2, stats, tag, weight_grad, bias_grad, buf);
                });
}

// ---- backward: dx, after the all-reduce -------------------------------------------------

// cf[0..3] = (mean, mean_dy, proj, scale): dx = (dy - mean_dy - (x - mean) * proj) * scale, with
// mean_dy = buf[c] / N and proj = invstd^2 * buf[C+c] / N (N = max(count, 1)).
template <typename S>
__device__ __forceinline__ void dx_coefficients(int c, int C, const S* stats, const double* buf, double n, S* cf) {
    const double invstd = (double)stats[C + c];
    cf[0] = stats[c];
    cf[1] = (S)(buf[c] / n);
    cf[2] = (S)(buf[C + c] / n * (invstd * invstd));
    cf[3] = stats[2 * C + c];
}

// Block 0 writes flags[1] (and the report): DESYNC when the backward tags disagree (0 with
// fixed statistics).
template <typename S>
__device__ __forceinline__ void write_backward_flag(int C, const double* buf, double tag, double ranks, S* stats,
                                                    unsigned long long* report, unsigned long long seq) {
    if (blockIdx.x == 0 && blockIdx.y == 0 && thread_rank() == 0) {
        const int bits = (buf != nullptr && !tags_agree(buf + 2 * C, tag, ranks)) ? (int)DESYNC : 0;
        stats[4 * C + 1] = (S)bits;
        publish_report(report, seq, bits, -1);
    }
}

// The epilogue's gradients on the vector at `at` (raw vectors: g of dy, r of x, m of y): g masked
// by y (when `masked`) into dresidual (when given), then into dx (when given)
// dx = (g - mean_dy - (x - mean) * proj) * scale, with channel e's coefficients at [N == 1 ? 0 : e]
// (fixed statistics: mean = mean_dy = proj = 0 and x not read (`read_x` false), dx = g * scale).
template <typename io, int N, typename T>
__device__ __forceinline__ void epilogue_gradients(const typename io::Raw& g, const typename io::Raw& r,
                                                   const typename io::Raw& m, bool masked, bool read_x, T* dx,
                                                   T* dresidual, i64 at, const typename io::S (&mean)[N],
                                                   const typename io::S (&mean_dy)[N],
                                                   const typename io::S (&proj)[N],
                                                   const typename io::S (&scale)[N]) {
    typedef typename io::S S;
    S gv[io::vec], v[io::vec];
    io::unpack(g, gv);
    if (masked) mask<io>(gv, m);
    if (dresidual != nullptr) io::store(dresidual + at, gv);
    if (dx == nullptr) return;
    if (read_x) {
        io::unpack(r, v);
    } else {
#pragma unroll
        for (int e = 0; e < io::vec; ++e) v[e] = 0;
    }
#pragma unroll
    for (int e = 0; e < io::vec; ++e) {
        const int i = N == 1 ? 0 : e;
        gv[e] = (gv[e] - mean_dy[i] - (v[e] - mean[i]) * proj[i]) * scale[i];
    }
    io::store(dx + at, gv);
}

// The epilogue's loop of dx over this thread's vectors (a SlabLoop or RowsLoop), io::batch3 loads
// in flight per array (dy; x when `read_x`; y under ReLU).
template <typename io, int N, typename T, typename Walk>
__device__ __forceinline__ void epilogue_gradients_loop(const Walk& walk, const T* dy, const T* x, const T* y,
                                                        bool read_x,
                                                        T* dx, T* dresidual, const typename io::S (&mean)[N],
                                                        const typename io::S (&mean_dy)[N],
                                                        const typename io::S (&proj)[N],
                                                        const typename io::S (&scale)[N]) {
    typename io::Raw g[io::batch3], r[io::batch3], m[io::batch3];
    walk.template run<io::batch3>([&](int u, i64 at) {
        g[u] = io::load(dy + at);
        if (read_x) r[u] = io::load(x + at);
        if (y != nullptr) m[u] = io::load(y + at);
    }, [&](int u, i64 at) {
        epilogue_gradients<io>(g[u], r[u], m[u], y != nullptr, read_x, dx, dresidual, at, mean, mean_dy, proj, scale);
    });
}

#define DX_PARAMS                                                                                             \
    const T *__restrict__ dy, const T *__restrict__ x, T *__restrict__ dx, int A, int C, int B,               \
        typename Acc<T>::type *__restrict__ stats, const double *__restrict__ buf,                           \
        const double *__restrict__ count, double tag, double ranks, unsigned long long *report,              \
        unsigned long long seq, const T *__restrict__ y, T *__restrict__ dresidual

// Channel-second, the grid of backward_cs, walked BACKWARD. buf == nullptr: fixed statistics,
// dx = dy * scale (x is not read).
template <typename T, int VEC> __global__ void BOUNDS dx_cs(DX_PARAMS) {
    typedef Io<T, VEC> io;
    typedef typename io::S S;
    constexpr int BATCH = io::batch;
    write_backward_flag(C, buf, tag, ranks, stats, report, seq);
    if (A == 0 || B == 0) return;
    const double n = buf != nullptr && count[0] > 1 ? count[0] : 1.0;
    const bool fused = y != nullptr || dresidual != nullptr || dx == nullptr, read_x = buf != nullptr && dx != nullptr;
    extern __shared__ double sh[];
    S* cf = reinterpret_cast<S*>(sh);
    for_channels<BACKWARD>(C, [&](int c) {
        int vectors;
        SlabWalk w = slab_of<VEC, BACKWARD>(A, C, B, c, vectors);
        S mean[1] = {0}, mean_dy[1] = {0}, proj[1] = {0}, scale[1] = {stats[2 * C + c]};   // fixed: dx = dy * scale
        if (buf != nullptr) {
            channel_coefficients<4>(c, 1, cf, [&](int ch, S* out) { dx_coefficients(ch, C, stats, buf, n, out); });
            mean[0] = cf[0];
            mean_dy[0] = cf[1];
            proj[0] = cf[2];
        }
        if (fused) {                                   // the epilogue's loop (both statistics modes)
            epilogue_gradients_loop<io>(SlabLoop<BACKWARD>{w, vectors}, dy, x, y, read_x, dx, dresidual, mean, mean_dy,
                                        proj, scale);
            return;
        }
        typename io::Raw g[BATCH], r[BATCH];
        if (buf == nullptr) {
            slab_loop<BATCH, BACKWARD>(w, vectors, [&](int u, i64 at) { g[u] = io::load(dy + at); },
                                       [&](int u, i64 at) {
                                           S gv[VEC];
                                           io::unpack(g[u], gv);
#pragma unroll
                                           for (int e = 0; e < VEC; ++e) gv[e] *= scale[0];
                                           io::store(dx + at, gv);
                                       });
            return;
        }
        slab_loop<BATCH, BACKWARD>(w, vectors,
                                   [&](int u, i64 at) { g[u] = io::load(dy + at); r[u] = io::load(x + at); },
                                   [&](int u, i64 at) {
                                       S gv[VEC], v[VEC];
                                       io::unpack(g[u], gv);
                                       io::unpack(r[u], v);
#pragma unroll
                                       for (int e = 0; e < VEC; ++e) {
                                           gv[e] = (gv[e] - mean_dy[0] - (v[e] - mean[0]) * proj[0]) * scale[0];
                                       }
                                       io::store(dx + at, gv);
                                   });
    });
}

// Row tiles, the grid of backward_cl, walked BACKWARD.
template <typename T, int VEC> __global__ void BOUNDS dx_cl(DX_PARAMS) {
    typedef Io<T, VEC> io;
    typedef typename io::S S;
    constexpr int BATCH = io::batch2;
    write_backward_flag(C, buf, tag, ranks, stats, report, seq);
    const double n = buf != nullptr && count[0] > 1 ? count[0] : 1.0;
    extern __shared__ double sh[];
    S* cf = reinterpret_cast<S*>(sh);
    const RowTile<VEC> t(C, B, block_x(BACKWARD));
    if (buf != nullptr) {
        channel_coefficients<4>(t.ch0, t.nch, cf, [&](int ch, S* out) { dx_coefficients(ch, C, stats, buf, n, out); });
    }
    if (!t.owns()) return;
    const RowWalk w = rows_of<BACKWARD>(t, A);
    S mean[VEC], mean_dy[VEC], proj[VEC], scale[VEC];   // fixed statistics: dx = dy * scale
#pragma unroll
    for (int e = 0; e < VEC; ++e) { mean[e] = 0; mean_dy[e] = 0; proj[e] = 0; }
    t.each([&](int e, int c) { scale[e] = stats[2 * C + t.ch0 + c]; });
    if (buf != nullptr) {
        t.template coefficient<4>(cf, 0, mean);
        t.template coefficient<4>(cf, 1, mean_dy);
        t.template coefficient<4>(cf, 2, proj);
    }
    if (y != nullptr || dresidual != nullptr || dx == nullptr) {      // the epilogue's loop (both modes)
        epilogue_gradients_loop<io>(RowsLoop<BACKWARD>{w}, dy, x, y, buf != nullptr && dx != nullptr, dx, dresidual,
                                    mean, mean_dy, proj, scale);
        return;
    }
    typename io::Raw g[BATCH], r[BATCH];
    if (buf == nullptr) {
        strided_loop<BATCH, BACKWARD>(w.at, w.step, w.count, [&](int u, i64 at) { g[u] = io::load(dy + at); },
                                      [&](int u, i64 at) {
                                          S gv[VEC];
                                          io::unpack(g[u], gv);
#pragma unroll
                                          for (int e = 0; e < VEC; ++e) gv[e] *= scale[e];
                                          io::store(dx + at, gv);
                                      });
        return;
    }
    strided_loop<BATCH, BACKWARD>(w.at, w.step, w.count,
                                  [&](int u, i64 at) { g[u] = io::load(dy + at); r[u] = io::load(x + at); },
                                  [&](int u, i64 at) {
                                      S gv[VEC], v[VEC];
                                      io::unpack(g[u], gv);
                                      io::unpack(r[u], v);
#pragma unroll
                                      for (int e = 0; e < VEC; ++e) {
                                          gv[e] = (gv[e] - mean_dy[e] - (v[e] - mean[e]) * proj[e]) * scale[e];
                                      }
                                      io::store(dx + at, gv);
                                  });
}
