// cusyncbn CUDA kernels: per-rank moments, the finalize after the all-reduce,
// normalization, and the backward reduction and elementwise pass.
//
// The maths (written once; _backend.py states it with the same names)
// -------------------------------------------------------------------------
// The input is viewed as x[A][C][B]: channel-second layouts are (N, C, prod(spatial)),
// channel-last ones (N * prod(spatial), C, 1) (template flag CL). For channel c:
//
//   per thread:  shifted sums around its first value s:  S1 = sum(x - s), S2 = sum((x - s)^2)
//                -> (n, mean = s + S1/n, M2 = S2 - S1^2/n)        (stable: deviations ~ std)
//   merge:       Chan: n = na + nb, d = mb - ma, mean = ma + d nb/n, M2 = M2a + M2b + d^2 na nb / n
//   payload:     buf[c] = n m, buf[C+c] = M2 + n (m - K)^2, buf[2C] = n   (double; K = running
//                mean when finite, else 0; identical on every rank) -> summed over ranks by NCCL
//   finalize:    N = buf[2C], mean = buf[c]/N, var = max(buf[C+c]/N - (mean-K)^2, 0),
//                invstd = rsqrt(var + eps); if N > 0 the running statistics move by momentum
//   normalize:   y = (x - mean) * (invstd * w) + b
//   backward:    buf[c] = sum dy, buf[C+c] = sum dy (x - mean)       (local, then summed)
//                weight.grad += buf[C+c] * invstd (local), bias.grad += buf[c] (local)
//                dx = (dy - buf[c]/N - (x - mean) invstd^2 buf[C+c]/N) * w invstd
//                (eval: dx = dy * w * invstd)
//
// Reductions are split over the whole GPU: channel-second grids are (splits, C) with
// every block reducing a slice of one channel; channel-last grids are (channel tiles,
// splits) with threads along channels (coalesced) and rows spread over blockDim.y and
// the splits. Each block writes its partial to a double workspace; the last block to
// finish a channel (or channel tile) -- found with a device-wide ticket, the counter
// reset by that block for the next launch -- merges the splits in a fixed order
// (deterministic) and writes the payload. One launch per reduction, no host round trip.
// The backward elementwise pass derives its per-channel coefficients from the reduced
// payload itself. Launches per training step: forward 3 (moments, finalize, normalize)
// and backward 2 (sums, dx), plus one all-reduce each.
// Vector width VEC (a power of two, up to 16 bytes) is the widest the pointers' alignment
// allows such that, in the reductions, a vector stays inside one channel (channel-second:
// B % VEC == 0) or on consecutive channels of a row (channel-last: C % VEC == 0); the
// elementwise passes step the channel per element, so their vectors may straddle
// channels and only need total % VEC == 0.
//
// Kernel arguments (one vocabulary throughout):
//   x, dy, y, dx     input / output arrays of T, contiguous, viewed as [A][C][B]
//   A, C, B          rows, channels, elements per (row, channel); total = A * C * B
//   running_mean/var the layer's running statistics (P = parameter type); nullptr: not tracked
//   weight, bias     affine parameters (P); nullptr: 1 and 0
//   weight_grad/bias_grad  gradients accumulated in place (P); nullptr: not wanted
//   stats            [mean | invstd | invstd * w | b], 4C values of S (float, or double for double input)
//   buf              the all-reduce payload (double): forward 2C + 1, backward 2C
//   count            &forward buf[2C], the global count N (backward)
//   part, ticket     per-split partials (double workspace) and per-channel(-tile) arrival
//                    counters (unsigned, zero between launches) of the split reductions
//
// 16-bit types travel as raw 16-bit words (half_t, bf16_t) converted with PTX / bit
// operations, so no CUDA header is needed and NVRTC compiles this file anywhere.

typedef long long i64;

#define CL_THREADS 512           // threads per block of the channel-last reductions (the host agrees)

// The reductions issue BATCH independent loads before using any: with one load in flight
// per thread (load, then accumulate, then the next load) a scalar or 8-byte load path
// cannot keep enough bytes in flight to reach the memory bandwidth.
constexpr int BATCH = 4;

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
template <> __device__ __forceinline__ bf16_t from_acc<bf16_t>(float v) {
    unsigned int u = __float_as_uint(v);
    bf16_t b;
    if ((u & 0x7fffffffu) > 0x7f800000u) {          // NaN stays a quiet NaN
        b.bits = (unsigned short)((u >> 16) | 0x40u);
    } else {                                         // round to nearest, ties to even
        b.bits = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    return b;
}

// VEC consecutive elements, one 16-byte (or narrower) transaction when VEC > 1.
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Vec { T v[VEC]; };

// A misaligned vector access faults on the GPU; the CPU emulator (tests/cuda_emu)
// defines this hook to report one instead. Nothing on the GPU.
#ifndef CUSYNCBN_CHECK_ALIGNED
#define CUSYNCBN_CHECK_ALIGNED(ptr, bytes)
#endif

template <typename T, int VEC>
__device__ __forceinline__ void load(const T* p, i64 i, typename Acc<T>::type (&out)[VEC]) {
    CUSYNCBN_CHECK_ALIGNED(p + i, sizeof(Vec<T, VEC>));
    Vec<T, VEC> pack = *reinterpret_cast<const Vec<T, VEC>*>(p + i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = to_acc(pack.v[k]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, i64 i, const typename Acc<T>::type (&in)[VEC]) {
    Vec<T, VEC> pack;
#pragma unroll
    for (int k = 0; k < VEC; ++k) pack.v[k] = from_acc<T>(in[k]);
    CUSYNCBN_CHECK_ALIGNED(p + i, sizeof(Vec<T, VEC>));
    *reinterpret_cast<Vec<T, VEC>*>(p + i) = pack;
}

// ---- grid-stride walks without a 64-bit division per step ----------------------------------

// Element j = a * B + b of channel c's slab in x[A][C][B], at address (a * C + c) * B + b,
// advanced by a fixed stride: one division up front, then adds and one compare per step.
struct SlabWalk {
    i64 a, b, at, da, db, step, wrap, B;
    __device__ SlabWalk(i64 j, i64 stride, int C, i64 B_, int c) : B(B_) {
        a = j / B;
        b = j - a * B;
        at = (a * C + c) * B + b;
        da = stride / B;
        db = stride - da * B;
        step = da * C * B + db;
        wrap = (C - 1) * B;                            // b passes B: one more row of the slab
    }
    __device__ __forceinline__ void next() {
        a += da;
        b += db;
        at += step;
        if (b >= B) { b -= B; a += 1; at += wrap; }
    }
};

// Channel c = (i / B) % C of flat element i of x[A][C][B] (B = 1: channel-last), advanced by
// a fixed stride the same way.
struct ChannelWalk {
    i64 r, dr, B;
    int c, dc, C;
    __device__ ChannelWalk(i64 i, i64 stride, int C_, i64 B_) : B(B_), C(C_) {
        const i64 q = i / B, dq = stride / B;
        r = i - q * B;
        c = (int)(q % C);
        dr = stride - dq * B;
        dc = (int)(dq % C);
    }
    __device__ __forceinline__ void next() {
        r += dr;
        c += dc;
        if (r >= B) { r -= B; c += 1; }
        if (c >= C) c -= C;                            // c + dc + 1 < 2C
    }
};

// Steps (channel c, position r in its run of B) to the next flat element; true when the
// channel changed. Vectors of the elementwise kernels may straddle channels (any B and C).
__device__ __forceinline__ bool next_element(int& c, i64& r, int C, i64 B, bool channel_last) {
    if (!channel_last && ++r < B) return false;
    r = 0;
    c = c + 1 == C ? 0 : c + 1;
    return true;
}

// ---- reduction values: Chan-merged moments and plain sums ---------------------------

// Running (n, mean, M2) of one thread, kept as shifted sums until the end.
template <typename S> struct Shifted {
    S shift, s1, s2;
    i64 n;
    __device__ void init() { shift = 0; s1 = 0; s2 = 0; n = 0; }
    __device__ __forceinline__ void add(S v) {
        if (n == 0) shift = v;
        S d = v - shift;
        s1 += d;
        s2 += d * d;
        n += 1;
    }
};

struct Moments {
    static constexpr int width = 3;
    double n, mean, m2;
};
struct Sums {                       // backward: (sum dy, sum dy (x - mean))
    static constexpr int width = 2;
    double dy, dyx;
};

__device__ __forceinline__ Moments merge(Moments a, Moments b) {
    double n = a.n + b.n;
    if (n == 0) return a;
    double d = b.mean - a.mean;
    Moments r;
    r.n = n;
    r.mean = a.mean + d * (b.n / n);
    r.m2 = a.m2 + b.m2 + d * d * (a.n * b.n / n);
    return r;
}
__device__ __forceinline__ Sums merge(Sums a, Sums b) { return Sums{a.dy + b.dy, a.dyx + b.dyx}; }

template <typename S> __device__ __forceinline__ Moments to_moments(const Shifted<S>& t) {
    Moments m;
    m.n = (double)t.n;
    if (t.n == 0) { m.mean = 0; m.m2 = 0; return m; }
    double s1 = (double)t.s1;
    m.mean = (double)t.shift + s1 / m.n;
    double m2 = (double)t.s2 - s1 * s1 / m.n;
    m.m2 = m2 > 0 ? m2 : 0;
    return m;
}

// Both value types are plain structs of doubles; these view them as arrays.
template <typename R> __device__ __forceinline__ double* fields(R& r) { return reinterpret_cast<double*>(&r); }

template <typename R> __device__ __forceinline__ R shfl_down(R r, int offset) {
#pragma unroll
    for (int f = 0; f < R::width; ++f) fields(r)[f] = __shfl_down_sync(0xffffffffu, fields(r)[f], offset);
    return r;
}

// A block's partial, written by it and read back by the last block of its channel. The
// read goes through L2 (__ldcg): L1 is not coherent between SMs.
template <typename R> __device__ __forceinline__ void put(double* p, R r) {
#pragma unroll
    for (int f = 0; f < R::width; ++f) p[f] = fields(r)[f];
}
template <typename R> __device__ __forceinline__ R get(const double* p) {
    R r;
#pragma unroll
    for (int f = 0; f < R::width; ++f) fields(r)[f] = __ldcg(p + f);
    return r;
}

// Merge over all threads of a 1-D block; the result is valid in thread 0. Every thread
// of the block must call it (it synchronizes).
template <typename R> __device__ R block_merge(R m) {
    __shared__ double sh[R::width * 32];
    for (int off = 16; off > 0; off >>= 1) m = merge(m, shfl_down(m, off));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) {
        for (int f = 0; f < R::width; ++f) sh[f * 32 + warp] = fields(m)[f];
    }
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    if (warp == 0) {
        R w{};
        if (lane < warps) {
            for (int f = 0; f < R::width; ++f) fields(w)[f] = sh[f * 32 + lane];
        }
        for (int off = 16; off > 0; off >>= 1) w = merge(w, shfl_down(w, off));
        m = w;
    }
    __syncthreads();                                   // sh is free for the next call
    return m;
}

// Merge over threadIdx.y of a (LANES, ROWS) block (ROWS a power of two) through shared
// memory sh[width][ROWS][LANES]; valid in the threads with threadIdx.y == 0. Every thread
// must call it.
template <typename R> __device__ R column_merge(R m, double* sh) {
    const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
    for (int f = 0; f < R::width; ++f) sh[(f * by + ty) * bx + tx] = fields(m)[f];
    __syncthreads();
    for (int stride = by / 2; stride > 0; stride >>= 1) {
        if (ty < stride) {
            R a, b;
            for (int f = 0; f < R::width; ++f) {
                fields(a)[f] = sh[(f * by + ty) * bx + tx];
                fields(b)[f] = sh[(f * by + ty + stride) * bx + tx];
            }
            R r = merge(a, b);
            for (int f = 0; f < R::width; ++f) sh[(f * by + ty) * bx + tx] = fields(r)[f];
        }
        __syncthreads();
    }
    R r{};
    for (int f = 0; f < R::width; ++f) fields(r)[f] = sh[f * by * bx + tx];
    __syncthreads();                                   // sh is free for the next call
    return r;
}

// Called by every thread of a block once its partials are written: true (in every thread)
// in the last of `count` blocks to arrive on `*ticket`, which that block resets to zero
// for the next launch (all others have arrived by then).
__device__ bool arrive_last(unsigned* ticket, unsigned count) {
    __shared__ bool last;
    __threadfence();                                   // our partials are visible device-wide
    __syncthreads();                                   // ... for every thread of the block
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        last = atomicAdd(ticket, 1u) == count - 1;
        if (last) *ticket = 0;
    }
    __syncthreads();
    return last;
}

// The second half of a split reduction. Channel-second: `r` is this block's value for
// channel c (valid in thread 0); returns true where the channel's total is to be written,
// `r` then being the whole channel's value (in thread 0): directly when the channel has one
// block, else in the last block to arrive, which merges every split's partial in index
// order (deterministic).
template <typename R> __device__ bool channel_total(R& r, int c, double* part, unsigned* ticket) {
    const int splits = gridDim.x;
    if (splits == 1) return true;
    const i64 row = (i64)c * splits;
    if (threadIdx.x == 0) put(part + (row + blockIdx.x) * R::width, r);
    if (!arrive_last(ticket + c, splits)) return false;
    R acc{};
    for (int s = threadIdx.x; s < splits; s += blockDim.x) acc = merge(acc, get<R>(part + (row + s) * R::width));
    r = block_merge(acc);
    return true;
}

// Channel-last: r[k] is this block's value for channel c0 + k (valid where threadIdx.y == 0);
// the same protocol per channel tile (blockIdx.x), sh being the column_merge scratch.
template <typename R, int VEC>
__device__ bool tile_total(R (&r)[VEC], int c0, int C, double* part, unsigned* ticket, double* sh) {
    const int splits = gridDim.y, ty = threadIdx.y;
    if (splits == 1) return true;
    for (int k = 0; k < VEC; ++k) {
        if (ty == 0 && c0 + k < C) put(part + ((i64)(c0 + k) * splits + blockIdx.y) * R::width, r[k]);
    }
    if (!arrive_last(ticket + blockIdx.x, splits)) return false;
    for (int k = 0; k < VEC; ++k) {
        R acc{};
        if (c0 + k < C) {
            for (int s = ty; s < splits; s += blockDim.y)
                acc = merge(acc, get<R>(part + ((i64)(c0 + k) * splits + s) * R::width));
        }
        r[k] = column_merge(acc, sh);
    }
    return true;
}

// ---- forward: this rank's payload ------------------------------------------------------

// The shift K of channel c: the running mean where tracked and finite, else 0 (the same
// on every rank, and the same in the moments and in the finalize).
template <typename P> __device__ __forceinline__ double shift_of(const P* running_mean, int c) {
    if (running_mean == nullptr) return 0;
    const double k = (double)running_mean[c];
    return isfinite(k) ? k : 0;
}

// buf[c] = n m, buf[C+c] = M2 + n (m - K)^2, buf[2C] = n (see the top of this file).
template <typename P>
__device__ void write_moments(int c, int C, Moments m, const P* running_mean, double* buf) {
    const double shift = shift_of(running_mean, c);
    const double d = m.mean - shift;
    buf[c] = m.n * m.mean;
    buf[C + c] = m.m2 + m.n * d * d;
    if (c == 0) buf[2 * C] = m.n;
}

// Channel-second: grid (splits, min(C, 65535)), 1-D blocks. Block (s, c) reduces elements
// j = s*blockDim*VEC + k*splits*blockDim*VEC of channel c, j in [0, A*B) (see SlabWalk),
// into part[(c * splits + s) * 3 + {0, 1, 2}] = (n, mean, M2); ticket[c] finds the last.
template <typename T, typename P, int VEC>
__global__ void moments_cs(const T* __restrict__ x, i64 A, int C, i64 B, const P* __restrict__ running_mean,
                           double* __restrict__ part, unsigned* __restrict__ ticket, double* __restrict__ buf) {
    typedef typename Acc<T>::type S;
    const int splits = gridDim.x;
    for (int c = blockIdx.y; c < C; c += gridDim.y) {        // grid.y is at most 65535
        Shifted<S> t;
        t.init();
        SlabWalk w(((i64)blockIdx.x * blockDim.x + threadIdx.x) * VEC, (i64)splits * blockDim.x * VEC, C, B, c);
        while (w.a < A) {
            S v[BATCH][VEC];
            bool in[BATCH];
#pragma unroll
            for (int u = 0; u < BATCH; ++u, w.next()) {
                in[u] = w.a < A;
                if (in[u]) load<T, VEC>(x, w.at, v[u]);
            }
#pragma unroll
            for (int u = 0; u < BATCH; ++u) {
                if (!in[u]) break;
#pragma unroll
                for (int k = 0; k < VEC; ++k) t.add(v[u][k]);
            }
        }
        Moments m = block_merge(to_moments(t));
        if (channel_total(m, c, part, ticket) && threadIdx.x == 0) write_moments(c, C, m, running_mean, buf);
    }
}

// Channel-last: grid (ceil(C / (LANES * VEC)), splits), blocks (LANES, ROWS) of at most
// CL_THREADS threads, LANES a power of two <= 32 fitted to C (every lane has channels) and
// ROWS = CL_THREADS / LANES. Thread (tx, ty) owns channels c0 .. c0+VEC-1,
// c0 = (blockIdx.x * LANES + tx) * VEC, and rows a = blockIdx.y * ROWS + ty + k * splits * ROWS;
// ticket[blockIdx.x] finds the last block of the channel tile, whose threads then merge the
// splits of their own channels (the host bounds splits so that this stays short).
template <typename T, typename P, int VEC>
__global__ void __launch_bounds__(CL_THREADS) moments_cl(const T* __restrict__ x, i64 A, int C, const P* __restrict__ running_mean,
                           double* __restrict__ part, unsigned* __restrict__ ticket, double* __restrict__ buf) {
    typedef typename Acc<T>::type S;
    const int rows_per_block = blockDim.y, splits = gridDim.y, ty = threadIdx.y;
    const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    Shifted<S> t[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) t[k].init();
    if (c0 < C) {
        const i64 stride = (i64)splits * rows_per_block;
        for (i64 a = (i64)blockIdx.y * rows_per_block + ty; a < A; a += BATCH * stride) {
            S v[BATCH][VEC];
#pragma unroll
            for (int u = 0; u < BATCH; ++u) {
                if (a + u * stride < A) load<T, VEC>(x, (a + u * stride) * C + c0, v[u]);
            }
#pragma unroll
            for (int u = 0; u < BATCH; ++u) {
                if (a + u * stride >= A) break;
#pragma unroll
                for (int k = 0; k < VEC; ++k) t[k].add(v[u][k]);
            }
        }
    }
    extern __shared__ double sh[];                     // [3][blockDim.y][blockDim.x]
    Moments m[VEC];
    for (int k = 0; k < VEC; ++k) m[k] = column_merge(to_moments(t[k]), sh);
    if (tile_total(m, c0, C, part, ticket, sh) && ty == 0) {
        for (int k = 0; k < VEC && c0 + k < C; ++k) write_moments(c0 + k, C, m[k], running_mean, buf);
    }
}

// ---- forward: after the all-reduce --------------------------------------------------

// stats = [mean | invstd | scale = invstd * w | shift = b], each of length C.
template <typename S, typename P>
__global__ void forward_finalize(const double* __restrict__ buf, int C, P* running_mean, P* running_var,
                                 double momentum, double eps, int unbiased,
                                 const P* __restrict__ weight, const P* __restrict__ bias, S* __restrict__ stats) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const double n = buf[2 * C];
    const double shift = shift_of(running_mean, c);
    double mean = 0, var = 0;
    if (n > 0) {
        mean = buf[c] / n;
        const double d = mean - shift;
        var = (buf[C + c] - n * d * d) / n;
        var = var > 0 ? var : 0;
    }
    const double invstd = 1.0 / sqrt(var + eps);
    stats[c] = (S)mean;
    stats[C + c] = (S)invstd;
    stats[2 * C + c] = (S)(invstd * (weight ? (double)weight[c] : 1.0));
    stats[3 * C + c] = (S)(bias ? (double)bias[c] : 0.0);
    if (n > 0 && running_mean != nullptr && running_var != nullptr) {
        const double v = (unbiased && n > 1) ? var * (n / (n - 1)) : var;
        running_mean[c] = (P)((double)running_mean[c] * momentum + mean * (1.0 - momentum));
        running_var[c] = (P)((double)running_var[c] * momentum + v * (1.0 - momentum));
    }
}

template <typename S, typename P>
__global__ void eval_finalize(const P* __restrict__ running_mean, const P* __restrict__ running_var, int C,
                              double eps, const P* __restrict__ weight, const P* __restrict__ bias,
                              S* __restrict__ stats) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const double invstd = 1.0 / sqrt((double)running_var[c] + eps);
    stats[c] = (S)running_mean[c];
    stats[C + c] = (S)invstd;
    stats[2 * C + c] = (S)(invstd * (weight ? (double)weight[c] : 1.0));
    stats[3 * C + c] = (S)(bias ? (double)bias[c] : 0.0);
}

// ---- forward: normalization ----------------------------------------------------------

// Thread t handles elements [t*VEC, t*VEC + VEC) of the flat array (total elements).
// y = (x - mean[c]) * scale[c] + shift[c].
template <typename T, bool CL, int VEC>
__global__ void normalize(const T* __restrict__ x, T* __restrict__ y, i64 total, int C, i64 B,
                          const typename Acc<T>::type* __restrict__ stats) {
    typedef typename Acc<T>::type S;
    const S* mean = stats;
    const S* scale = stats + 2 * C;
    const S* shift = stats + 3 * C;
    const i64 stride = (i64)gridDim.x * blockDim.x * VEC;
    i64 i = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    for (ChannelWalk w(i, stride, C, B); i < total; i += stride, w.next()) {
        S v[VEC];
        load<T, VEC>(x, i, v);
        int c = w.c;
        i64 r = w.r;
        S m = mean[c], sc = scale[c], sh = shift[c];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            v[k] = (v[k] - m) * sc + sh;
            if (k + 1 < VEC && next_element(c, r, C, B, CL)) { m = mean[c]; sc = scale[c]; sh = shift[c]; }
        }
        store<T, VEC>(y, i, v);
    }
}

// ---- backward: this rank's sums -----------------------------------------------------------

// buf[c] = sum dy, buf[C+c] = sum dy (x - mean); this rank's parameter gradients accumulate
// (before the all-reduce overwrites the payload).
template <typename S, typename P>
__device__ void write_sums(int c, int C, Sums r, const S* stats, P* weight_grad, P* bias_grad, double* buf) {
    buf[c] = r.dy;
    buf[C + c] = r.dyx;
    if (weight_grad != nullptr) weight_grad[c] = (P)((double)weight_grad[c] + r.dyx * (double)stats[C + c]);
    if (bias_grad != nullptr) bias_grad[c] = (P)((double)bias_grad[c] + r.dy);
}

// Same grids, partials (width 2) and tickets as moments_cs / moments_cl.
template <typename T, typename P, int VEC>
__global__ void backward_cs(const T* __restrict__ dy, const T* __restrict__ x, i64 A, int C, i64 B,
                            const typename Acc<T>::type* __restrict__ stats, double* __restrict__ part,
                            unsigned* __restrict__ ticket, P* weight_grad, P* bias_grad, double* __restrict__ buf) {
    typedef typename Acc<T>::type S;
    const int splits = gridDim.x;
    for (int c = blockIdx.y; c < C; c += gridDim.y) {        // grid.y is at most 65535
        const S m = stats[c];
        S sdy = 0, sdyx = 0;
        SlabWalk w(((i64)blockIdx.x * blockDim.x + threadIdx.x) * VEC, (i64)splits * blockDim.x * VEC, C, B, c);
        while (w.a < A) {
            S g[BATCH][VEC], v[BATCH][VEC];
            bool in[BATCH];
#pragma unroll
            for (int u = 0; u < BATCH; ++u, w.next()) {
                in[u] = w.a < A;
                if (in[u]) {
                    load<T, VEC>(dy, w.at, g[u]);
                    load<T, VEC>(x, w.at, v[u]);
                }
            }
#pragma unroll
            for (int u = 0; u < BATCH; ++u) {
                if (!in[u]) break;
#pragma unroll
                for (int k = 0; k < VEC; ++k) { sdy += g[u][k]; sdyx += g[u][k] * (v[u][k] - m); }
            }
        }
        Sums r = block_merge(Sums{(double)sdy, (double)sdyx});
        if (channel_total(r, c, part, ticket) && threadIdx.x == 0)
            write_sums(c, C, r, stats, weight_grad, bias_grad, buf);
    }
}

template <typename T, typename P, int VEC>
__global__ void __launch_bounds__(CL_THREADS) backward_cl(const T* __restrict__ dy, const T* __restrict__ x, i64 A, int C,
                            const typename Acc<T>::type* __restrict__ stats, double* __restrict__ part,
                            unsigned* __restrict__ ticket, P* weight_grad, P* bias_grad, double* __restrict__ buf) {
    typedef typename Acc<T>::type S;
    const int rows_per_block = blockDim.y, splits = gridDim.y, ty = threadIdx.y;
    const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    S sdy[VEC], sdyx[VEC], m[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) { sdy[k] = 0; sdyx[k] = 0; m[k] = c0 + k < C ? stats[c0 + k] : (S)0; }
    if (c0 < C) {
        const i64 stride = (i64)splits * rows_per_block;
        for (i64 a = (i64)blockIdx.y * rows_per_block + ty; a < A; a += BATCH * stride) {
            S g[BATCH][VEC], v[BATCH][VEC];
#pragma unroll
            for (int u = 0; u < BATCH; ++u) {
                if (a + u * stride < A) {
                    load<T, VEC>(dy, (a + u * stride) * C + c0, g[u]);
                    load<T, VEC>(x, (a + u * stride) * C + c0, v[u]);
                }
            }
#pragma unroll
            for (int u = 0; u < BATCH; ++u) {
                if (a + u * stride >= A) break;
#pragma unroll
                for (int k = 0; k < VEC; ++k) { sdy[k] += g[u][k]; sdyx[k] += g[u][k] * (v[u][k] - m[k]); }
            }
        }
    }
    extern __shared__ double sh[];                     // [2][blockDim.y][blockDim.x]
    Sums r[VEC];
    for (int k = 0; k < VEC; ++k) r[k] = column_merge(Sums{(double)sdy[k], (double)sdyx[k]}, sh);
    if (tile_total(r, c0, C, part, ticket, sh) && ty == 0) {
        for (int k = 0; k < VEC && c0 + k < C; ++k) write_sums(c0 + k, C, r[k], stats, weight_grad, bias_grad, buf);
    }
}

// ---- backward: after the all-reduce -------------------------------------------------

// dx = (dy - mean_dy[c] - (x - mean[c]) * k[c]) * scale[c], with mean_dy = buf[c] / N and
// k = invstd^2 * buf[C+c] / N from the reduced payload (N = count[0]); buf == nullptr means
// fixed (eval) statistics: mean_dy = k = 0.
template <typename T, typename S>
__device__ __forceinline__ void dx_coefficients(int c, int C, const S* stats, const double* buf, double inv_n,
                                                S& mean, S& mdy, S& k, S& scale) {
    mean = stats[c];
    scale = stats[2 * C + c];
    if (buf != nullptr) {
        const double invstd = (double)stats[C + c];
        mdy = (S)(buf[c] * inv_n);
        k = (S)(buf[C + c] * inv_n * invstd * invstd);
    } else {
        mdy = 0;
        k = 0;
    }
}

template <typename T, bool CL, int VEC>
__global__ void backward_elementwise(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                     i64 total, int C, i64 B, const typename Acc<T>::type* __restrict__ stats,
                                     const double* __restrict__ buf, const double* __restrict__ count) {
    typedef typename Acc<T>::type S;
    const double inv_n = (buf != nullptr && count[0] > 0) ? 1.0 / count[0] : 0.0;
    const i64 stride = (i64)gridDim.x * blockDim.x * VEC;
    i64 i = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    for (ChannelWalk w(i, stride, C, B); i < total; i += stride, w.next()) {
        S g[VEC], v[VEC];
        load<T, VEC>(dy, i, g);
        load<T, VEC>(x, i, v);
        int c = w.c;
        i64 r = w.r;
        S m, a, b, sc;
        dx_coefficients<T>(c, C, stats, buf, inv_n, m, a, b, sc);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            g[k] = (g[k] - a - (v[k] - m) * b) * sc;
            if (k + 1 < VEC && next_element(c, r, C, B, CL)) dx_coefficients<T>(c, C, stats, buf, inv_n, m, a, b, sc);
        }
        store<T, VEC>(dx, i, g);
    }
}
