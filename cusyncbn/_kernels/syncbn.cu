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
// the splits. Per-split partials go to a double workspace and a one-thread-per-channel
// kernel combines them. Vector width VEC loads 16 bytes at a time where the layout
// keeps a vector inside one channel (channel-second: B % VEC == 0) or on consecutive
// channels (channel-last: C % VEC == 0) and pointers are 16-byte aligned; the host
// picks VEC = 1 otherwise.
//
// 16-bit types travel as raw 16-bit words (half_t, bf16_t) converted with PTX / bit
// operations, so no CUDA header is needed and NVRTC compiles this file anywhere.

typedef long long i64;

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

// ---- statistics helpers ------------------------------------------------------------

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

struct Moments { double n, mean, m2; };

__device__ __forceinline__ Moments chan_merge(Moments a, Moments b) {
    double n = a.n + b.n;
    if (n == 0) return a;
    double d = b.mean - a.mean;
    Moments r;
    r.n = n;
    r.mean = a.mean + d * (b.n / n);
    r.m2 = a.m2 + b.m2 + d * d * (a.n * b.n / n);
    return r;
}

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

__device__ __forceinline__ Moments shfl_down(Moments m, int offset) {
    Moments r;
    r.n = __shfl_down_sync(0xffffffffu, m.n, offset);
    r.mean = __shfl_down_sync(0xffffffffu, m.mean, offset);
    r.m2 = __shfl_down_sync(0xffffffffu, m.m2, offset);
    return r;
}

// Chan-merge over all threads of a 1-D block; the result is valid in thread 0.
__device__ Moments block_merge(Moments m) {
    __shared__ double sh[3][32];
    for (int off = 16; off > 0; off >>= 1) m = chan_merge(m, shfl_down(m, off));
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) { sh[0][warp] = m.n; sh[1][warp] = m.mean; sh[2][warp] = m.m2; }
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    if (warp == 0) {
        Moments z = {0, 0, 0};
        Moments w = lane < warps ? Moments{sh[0][lane], sh[1][lane], sh[2][lane]} : z;
        for (int off = 16; off > 0; off >>= 1) w = chan_merge(w, shfl_down(w, off));
        m = w;
    }
    return m;
}

// Sum of two doubles over a 1-D block; valid in thread 0.
__device__ void block_sum2(double& a, double& b) {
    __shared__ double sh[2][32];
    for (int off = 16; off > 0; off >>= 1) {
        a += __shfl_down_sync(0xffffffffu, a, off);
        b += __shfl_down_sync(0xffffffffu, b, off);
    }
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) { sh[0][warp] = a; sh[1][warp] = b; }
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    if (warp == 0) {
        a = lane < warps ? sh[0][lane] : 0.0;
        b = lane < warps ? sh[1][lane] : 0.0;
        for (int off = 16; off > 0; off >>= 1) {
            a += __shfl_down_sync(0xffffffffu, a, off);
            b += __shfl_down_sync(0xffffffffu, b, off);
        }
    }
}

// ---- forward: per-rank moments ------------------------------------------------------

// Channel-second: grid (splits, C), 1-D blocks. Block (s, c) reduces elements
// j = s*blockDim*VEC + ... of channel c, j in [0, A*B), at address (j / B * C + c) * B + j % B.
// part[(c * splits + s) * 3 + {0, 1, 2}] = (n, mean, M2) of the slice.
template <typename T, int VEC>
__global__ void moments_partial_cs(const T* __restrict__ x, i64 A, int C, i64 B, double* __restrict__ part) {
    typedef typename Acc<T>::type S;
    const int c = blockIdx.y, splits = gridDim.x;
    const i64 per_channel = A * B;
    Shifted<S> t;
    t.init();
    for (i64 j = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * VEC; j < per_channel;
         j += (i64)splits * blockDim.x * VEC) {
        const i64 a = j / B, b = j - a * B;
        S v[VEC];
        load<T, VEC>(x, (a * C + c) * B + b, v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) t.add(v[k]);
    }
    Moments m = block_merge(to_moments(t));
    if (threadIdx.x == 0) {
        double* p = part + ((i64)c * splits + blockIdx.x) * 3;
        p[0] = m.n; p[1] = m.mean; p[2] = m.m2;
    }
}

// Channel-last: grid (ceil(C / (blockDim.x * VEC)), splits), blocks (32, ROWS). Thread
// (tx, ty) owns channels c0 .. c0+VEC-1, c0 = (blockIdx.x * 32 + tx) * VEC, and rows
// a = blockIdx.y * ROWS + ty + k * splits * ROWS.
template <typename T, int VEC>
__global__ void moments_partial_cl(const T* __restrict__ x, i64 A, int C, double* __restrict__ part) {
    typedef typename Acc<T>::type S;
    const int rows_per_block = blockDim.y, splits = gridDim.y;
    const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    Shifted<S> t[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) t[k].init();
    if (c0 < C) {
        for (i64 a = (i64)blockIdx.y * rows_per_block + threadIdx.y; a < A; a += (i64)splits * rows_per_block) {
            S v[VEC];
            if (VEC > 1) {
                load<T, VEC>(x, a * C + c0, v);
            } else {
                v[0] = to_acc(x[a * C + c0]);
            }
#pragma unroll
            for (int k = 0; k < VEC; ++k) t[k].add(v[k]);
        }
    }
    // Merge over threadIdx.y through shared memory, one channel at a time.
    extern __shared__ double sh[];                     // [3][blockDim.y][blockDim.x]
    const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
    for (int k = 0; k < VEC; ++k) {
        Moments m = to_moments(t[k]);
        sh[(0 * by + ty) * bx + tx] = m.n;
        sh[(1 * by + ty) * bx + tx] = m.mean;
        sh[(2 * by + ty) * bx + tx] = m.m2;
        __syncthreads();
        for (int stride = by / 2; stride > 0; stride >>= 1) {
            if (ty < stride) {
                Moments a = {sh[(0 * by + ty) * bx + tx], sh[(1 * by + ty) * bx + tx], sh[(2 * by + ty) * bx + tx]};
                const int o = ty + stride;
                Moments b = {sh[(0 * by + o) * bx + tx], sh[(1 * by + o) * bx + tx], sh[(2 * by + o) * bx + tx]};
                Moments r = chan_merge(a, b);
                sh[(0 * by + ty) * bx + tx] = r.n;
                sh[(1 * by + ty) * bx + tx] = r.mean;
                sh[(2 * by + ty) * bx + tx] = r.m2;
            }
            __syncthreads();
        }
        if (ty == 0 && c0 + k < C) {
            double* p = part + ((i64)(c0 + k) * splits + blockIdx.y) * 3;
            p[0] = sh[tx]; p[1] = sh[by * bx + tx]; p[2] = sh[2 * by * bx + tx];
        }
        __syncthreads();
    }
}

// One thread per channel: merge the splits and write this rank's payload.
template <typename P>
__global__ void moments_combine(const double* __restrict__ part, int C, int splits,
                                const P* __restrict__ running_mean, double* __restrict__ buf) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    Moments m = {0, 0, 0};
    for (int s = 0; s < splits; ++s) {
        const double* p = part + ((i64)c * splits + s) * 3;
        m = chan_merge(m, Moments{p[0], p[1], p[2]});
    }
    double shift = 0;
    if (running_mean != nullptr) {
        shift = (double)running_mean[c];
        if (!isfinite(shift)) shift = 0;
    }
    const double d = m.mean - shift;
    buf[c] = m.n * m.mean;
    buf[C + c] = m.m2 + m.n * d * d;
    if (c == 0) buf[2 * C] = m.n;
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
    double shift = 0;
    if (running_mean != nullptr) {
        shift = (double)running_mean[c];
        if (!isfinite(shift)) shift = 0;
    }
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
    for (i64 i = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * VEC; i < total;
         i += (i64)gridDim.x * blockDim.x * VEC) {
        S v[VEC];
        load<T, VEC>(x, i, v);
        if (CL) {
            const int c0 = (int)(i % C);
#pragma unroll
            for (int k = 0; k < VEC; ++k) v[k] = (v[k] - mean[c0 + k]) * scale[c0 + k] + shift[c0 + k];
        } else {
            const int c = (int)((i / B) % C);
            const S m = mean[c], sc = scale[c], sh = shift[c];
#pragma unroll
            for (int k = 0; k < VEC; ++k) v[k] = (v[k] - m) * sc + sh;
        }
        store<T, VEC>(y, i, v);
    }
}

// ---- backward: per-rank sums ----------------------------------------------------------

// part[(c * splits + s) * 2 + {0, 1}] = (sum dy, sum dy (x - mean)) over the slice.
template <typename T, int VEC>
__global__ void backward_partial_cs(const T* __restrict__ dy, const T* __restrict__ x, i64 A, int C, i64 B,
                                    const typename Acc<T>::type* __restrict__ stats, double* __restrict__ part) {
    typedef typename Acc<T>::type S;
    const int c = blockIdx.y, splits = gridDim.x;
    const i64 per_channel = A * B;
    const S m = stats[c];
    S sdy = 0, sdyx = 0;
    for (i64 j = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * VEC; j < per_channel;
         j += (i64)splits * blockDim.x * VEC) {
        const i64 a = j / B, b = j - a * B, i = (a * C + c) * B + b;
        S g[VEC], v[VEC];
        load<T, VEC>(dy, i, g);
        load<T, VEC>(x, i, v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) { sdy += g[k]; sdyx += g[k] * (v[k] - m); }
    }
    double a = sdy, b = sdyx;
    block_sum2(a, b);
    if (threadIdx.x == 0) {
        double* p = part + ((i64)c * splits + blockIdx.x) * 2;
        p[0] = a; p[1] = b;
    }
}

template <typename T, int VEC>
__global__ void backward_partial_cl(const T* __restrict__ dy, const T* __restrict__ x, i64 A, int C,
                                    const typename Acc<T>::type* __restrict__ stats, double* __restrict__ part) {
    typedef typename Acc<T>::type S;
    const int rows_per_block = blockDim.y, splits = gridDim.y;
    const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    S sdy[VEC], sdyx[VEC], m[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) { sdy[k] = 0; sdyx[k] = 0; m[k] = c0 + k < C ? stats[c0 + k] : (S)0; }
    if (c0 < C) {
        for (i64 a = (i64)blockIdx.y * rows_per_block + threadIdx.y; a < A; a += (i64)splits * rows_per_block) {
            S g[VEC], v[VEC];
            if (VEC > 1) {
                load<T, VEC>(dy, a * C + c0, g);
                load<T, VEC>(x, a * C + c0, v);
            } else {
                g[0] = to_acc(dy[a * C + c0]);
                v[0] = to_acc(x[a * C + c0]);
            }
#pragma unroll
            for (int k = 0; k < VEC; ++k) { sdy[k] += g[k]; sdyx[k] += g[k] * (v[k] - m[k]); }
        }
    }
    extern __shared__ double sh[];                     // [2][blockDim.y][blockDim.x]
    const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
    for (int k = 0; k < VEC; ++k) {
        sh[ty * bx + tx] = sdy[k];
        sh[(by + ty) * bx + tx] = sdyx[k];
        __syncthreads();
        for (int stride = by / 2; stride > 0; stride >>= 1) {
            if (ty < stride) {
                sh[ty * bx + tx] += sh[(ty + stride) * bx + tx];
                sh[(by + ty) * bx + tx] += sh[(by + ty + stride) * bx + tx];
            }
            __syncthreads();
        }
        if (ty == 0 && c0 + k < C) {
            double* p = part + ((i64)(c0 + k) * splits + blockIdx.y) * 2;
            p[0] = sh[tx]; p[1] = sh[by * bx + tx];
        }
        __syncthreads();
    }
}

// One thread per channel: sum the splits into the payload and accumulate this rank's
// parameter gradients (before the all-reduce overwrites the payload).
template <typename S, typename P>
__global__ void backward_combine(const double* __restrict__ part, int C, int splits,
                                 const S* __restrict__ stats, P* weight_grad, P* bias_grad,
                                 double* __restrict__ buf) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double sdy = 0, sdyx = 0;
    for (int s = 0; s < splits; ++s) {
        sdy += part[((i64)c * splits + s) * 2];
        sdyx += part[((i64)c * splits + s) * 2 + 1];
    }
    buf[c] = sdy;
    buf[C + c] = sdyx;
    if (weight_grad != nullptr) weight_grad[c] = (P)((double)weight_grad[c] + sdyx * (double)stats[C + c]);
    if (bias_grad != nullptr) bias_grad[c] = (P)((double)bias_grad[c] + sdy);
}

// ---- backward: after the all-reduce -------------------------------------------------

// coef = [mean_dy | k = invstd^2 * mean(dy (x - mean)) | scale = w * invstd], each of length C.
// buf == nullptr means fixed (eval) statistics: mean_dy = k = 0.
template <typename S>
__global__ void backward_coeffs(const double* __restrict__ buf, const double* __restrict__ count, int C,
                                const S* __restrict__ stats, S* __restrict__ coef) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double mdy = 0, k = 0;
    if (buf != nullptr && count[0] > 0) {
        const double n = count[0], invstd = (double)stats[C + c];
        mdy = buf[c] / n;
        k = buf[C + c] / n * invstd * invstd;
    }
    coef[c] = (S)mdy;
    coef[C + c] = (S)k;
    coef[2 * C + c] = stats[2 * C + c];
}

// dx = (dy - mean_dy[c] - (x - mean[c]) * k[c]) * scale[c]
template <typename T, bool CL, int VEC>
__global__ void backward_elementwise(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                                     i64 total, int C, i64 B, const typename Acc<T>::type* __restrict__ stats,
                                     const typename Acc<T>::type* __restrict__ coef) {
    typedef typename Acc<T>::type S;
    const S* mdy = coef;
    const S* kk = coef + C;
    const S* scale = coef + 2 * C;
    for (i64 i = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * VEC; i < total;
         i += (i64)gridDim.x * blockDim.x * VEC) {
        S g[VEC], v[VEC];
        load<T, VEC>(dy, i, g);
        load<T, VEC>(x, i, v);
        if (CL) {
            const int c0 = (int)(i % C);
#pragma unroll
            for (int k = 0; k < VEC; ++k)
                g[k] = (g[k] - mdy[c0 + k] - (v[k] - stats[c0 + k]) * kk[c0 + k]) * scale[c0 + k];
        } else {
            const int c = (int)((i / B) % C);
            const S m = stats[c], a = mdy[c], b = kk[c], sc = scale[c];
#pragma unroll
            for (int k = 0; k < VEC; ++k) g[k] = (g[k] - a - (v[k] - m) * b) * sc;
        }
        store<T, VEC>(dx, i, g);
    }
}
