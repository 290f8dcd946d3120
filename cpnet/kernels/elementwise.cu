// Elementwise kernels: each replaces a chain of CuPy elementwise launches by one pass over memory.
//
// All take flat arrays of n elements (the launcher splits larger arrays into chunks of fewer than 2^31) and do,
// per element, exactly the operations of the NumPy path in the same order, so the results are bit-identical
// (NaN payloads aside: a GPU writes its own canonical NaN). Loads are T, arithmetic and scalars F (the compute
// type: float for bf16, which rounds once per stored element, as cpnet/precision.py does on the host).
//
// Each thread takes ILP elements a grid stride apart per pass and issues all their loads before any store: with
// one load in flight per thread these kernels are bound by memory latency, not bandwidth. The launcher sizes the
// grid for n / ILP threads.

constexpr int ILP = 4;
// Products that the NumPy path rounds before adding go through mul_rn, which the compiler never fuses into an
// FMA (host_shim.h defines __fmul_rn / __dmul_rn as a plain product).

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// Momentum SGD (Krizhevsky et al. 2012, section 5), w and v updated in place:
//   v = momentum * v - wd_lr * w - lr * g;  w = w + v   (the wd_lr term is skipped when wd_lr == 0)
__device__ __forceinline__ F momentum_step(F w, F g, F v, F momentum, F wd_lr, F lr)
{
    F u = mul_rn(v, momentum);
    if (wd_lr != F(0))
        u = u - mul_rn(wd_lr, w);
    return u - mul_rn(lr, g);
}

extern "C" __global__ void sgd_momentum_kernel(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ v,
                                               int n, F momentum, F wd_lr, F lr)
{
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long e0 = (long long)blockIdx.x * blockDim.x + threadIdx.x; e0 < n; e0 += ILP * stride) {
        F wk[ILP], gk[ILP], vk[ILP];
        for (int k = 0; k < ILP; ++k) {
            const long long e = e0 + k * stride;
            wk[k] = e < n ? F(w[e]) : F(0);
            gk[k] = e < n ? F(g[e]) : F(0);
            vk[k] = e < n ? F(v[e]) : F(0);
        }
        for (int k = 0; k < ILP; ++k) {
            const long long e = e0 + k * stride;
            const F u = momentum_step(wk[k], gk[k], vk[k], momentum, wd_lr, lr);
            if (e < n) {
                v[e] = T(u);
                w[e] = T(wk[k] + u);
            }
        }
    }
}

// The same update for many arrays in one launch (a device's whole parameter memory: the optimizer's
// multi-tensor step). `table` holds MULTI_ROW int64 per array: the addresses of its w, g and v, the index of its
// first element in the concatenation of all `arrays` arrays (ascending), and 1 where weight decay applies (else
// the wd_lr term is skipped, as sgd_momentum_kernel does with wd_lr = 0); n is the total number of elements.
// Element e belongs to the last array whose first index is <= e (a binary search over the rows), and sees
// exactly sgd_momentum_kernel's operations, so the results are those of one launch per array, bit for bit.
constexpr int MULTI_ROW = 5;

extern "C" __global__ void sgd_momentum_multi_kernel(const long long* __restrict__ table, int arrays, int n,
                                                     F momentum, F wd_lr, F lr)
{
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long e0 = (long long)blockIdx.x * blockDim.x + threadIdx.x; e0 < n; e0 += ILP * stride) {
        F wk[ILP], gk[ILP], vk[ILP], dk[ILP];
        T* wp[ILP];
        T* vp[ILP];
        for (int k = 0; k < ILP; ++k) {
            const long long e = e0 + k * stride;
            wp[k] = vp[k] = nullptr;
            wk[k] = gk[k] = vk[k] = dk[k] = F(0);
            if (e >= n)
                continue;
            int lo = 0, hi = arrays - 1;
            while (lo < hi) {
                const int mid = (lo + hi + 1) / 2;
                if (table[mid * MULTI_ROW + 3] <= e)
                    lo = mid;
                else
                    hi = mid - 1;
            }
            const long long* const row = table + lo * MULTI_ROW;
            const long long i = e - row[3];
            wp[k] = reinterpret_cast<T*>(row[0]) + i;
            vp[k] = reinterpret_cast<T*>(row[2]) + i;
            wk[k] = F(*wp[k]);
            gk[k] = F(reinterpret_cast<const T*>(row[1])[i]);
            vk[k] = F(*vp[k]);
            dk[k] = row[4] ? wd_lr : F(0);
        }
        for (int k = 0; k < ILP; ++k) {
            if (wp[k] == nullptr)
                continue;
            const F u = momentum_step(wk[k], gk[k], vk[k], momentum, dk[k], lr);
            *vp[k] = T(u);
            *wp[k] = T(wk[k] + u);
        }
    }
}

// Inverted dropout with the counter hash of cpnet.ops.dropout.counter_uniform: element first + e (mod 2^32) draws
//   h = (first + e) * 0x9E3779B9, then for each key: h ^= key; h ^= h >> 16; h *= 0x7FEB352D; h ^= h >> 15;
//   h *= 0x846CA68B; h ^= h >> 16;   u = (h >> 8) * 2^-24 in [0, 1)
// and is kept when u >= p: mask = scale (= 1 / (1 - p)) or 0, stored as T, y = x * mask (that stored mask, so
// backward's dy * mask scales by the same number). The keys and `first` are the uint32 bit patterns passed as int.
__device__ __forceinline__ F counter_uniform(unsigned int counter, unsigned int key0, unsigned int key1)
{
    const unsigned int keys[2] = {key0, key1};
    unsigned int h = counter * 0x9E3779B9u;
    for (int r = 0; r < 2; ++r) {
        h ^= keys[r];
        h ^= h >> 16;
        h *= 0x7FEB352Du;
        h ^= h >> 15;
        h *= 0x846CA68Bu;
        h ^= h >> 16;
    }
    return F(h >> 8) * F(1.0 / 16777216.0);
}

extern "C" __global__ void dropout_forward_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                  T* __restrict__ mask, int n, int first, F p, F scale,
                                                  int key0, int key1)
{
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long e0 = (long long)blockIdx.x * blockDim.x + threadIdx.x; e0 < n; e0 += ILP * stride) {
        F xk[ILP];
        for (int k = 0; k < ILP; ++k) {
            const long long e = e0 + k * stride;
            xk[k] = e < n ? F(x[e]) : F(0);
        }
        for (int k = 0; k < ILP; ++k) {
            const long long e = e0 + k * stride;
            const F u = counter_uniform((unsigned int)first + (unsigned int)e, (unsigned int)key0,
                                        (unsigned int)key1);
            const T m = T(u >= p ? scale : F(0));
            if (e < n) {
                mask[e] = m;
                y[e] = T(xk[k] * F(m));
            }
        }
    }
}

// Both fused towers' dropout in one launch: x is (rows, 2 * units), its columns [0, units) tower 0's units (keys
// key00, key01), the rest tower 1's (key10, key11). Element (r, t*units + u) draws tower t's keys at counter
// first + r*units + u: what dropout_forward_kernel draws for element (r, u) of tower t's own (rows, units) half,
// so mask and y are those of the two halves, bit for bit. n = rows * 2 * units.
extern "C" __global__ void dropout_towers_forward_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                         T* __restrict__ mask, int n, int units, int first,
                                                         F p, F scale, int key00, int key01, int key10, int key11)
{
    const long long stride = (long long)blockDim.x * gridDim.x;
    const long long width = 2LL * units;
    for (long long e0 = (long long)blockIdx.x * blockDim.x + threadIdx.x; e0 < n; e0 += ILP * stride) {
        F xk[ILP];
        for (int k = 0; k < ILP; ++k) {
            const long long e = e0 + k * stride;
            xk[k] = e < n ? F(x[e]) : F(0);
        }
        for (int k = 0; k < ILP; ++k) {
            const long long e = e0 + k * stride;
            const long long r = e / width;
            const long long c = e - r * width;
            const bool second = c >= units;
            const long long u = r * units + (second ? c - units : c);
            const F draw = counter_uniform((unsigned int)first + (unsigned int)u,
                                           (unsigned int)(second ? key10 : key00),
                                           (unsigned int)(second ? key11 : key01));
            const T m = T(draw >= p ? scale : F(0));
            if (e < n) {
                mask[e] = m;
                y[e] = T(xk[k] * F(m));
            }
        }
    }
}

// ReLU: y = x > 0 ? x : 0, except that NaN stays NaN (as NumPy's maximum(x, 0): -0.0 gives +0.0).
extern "C" __global__ void relu_forward_kernel(const T* __restrict__ x, T* __restrict__ y, int n)
{
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long e0 = (long long)blockIdx.x * blockDim.x + threadIdx.x; e0 < n; e0 += ILP * stride) {
        T xk[ILP];
        for (int k = 0; k < ILP; ++k) {
            const long long e = e0 + k * stride;
            xk[k] = e < n ? x[e] : T(0);
        }
        for (int k = 0; k < ILP; ++k) {
            const long long e = e0 + k * stride;
            const F v = F(xk[k]);
            if (e < n)
                y[e] = (v > F(0) || v != v) ? xk[k] : T(0);
        }
    }
}

// ReLU backward from the forward's output: dx = dy * (y > 0 ? 1 : 0) (y > 0 exactly where x > 0); a mask
// multiply, so a NaN or inf in dy stays non-finite where the unit is off.
extern "C" __global__ void relu_backward_kernel(const T* __restrict__ y, const T* __restrict__ dy,
                                                T* __restrict__ dx, int n)
{
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long e0 = (long long)blockIdx.x * blockDim.x + threadIdx.x; e0 < n; e0 += ILP * stride) {
        T yk[ILP], dyk[ILP];
        for (int k = 0; k < ILP; ++k) {
            const long long e = e0 + k * stride;
            yk[k] = e < n ? y[e] : T(0);
            dyk[k] = e < n ? dy[e] : T(0);
        }
        for (int k = 0; k < ILP; ++k) {
            const long long e = e0 + k * stride;
            if (e < n)
                dx[e] = T(F(dyk[k]) * (F(yk[k]) > F(0) ? F(1) : F(0)));
        }
    }
}

// The conversions of --precision bf16 (T = bf16, F = float; plain copies for float and double): narrow rounds
// float to T (to nearest, ties to even), widen is exact.
template <typename S, typename D>
__device__ __forceinline__ void convert_body(const S* __restrict__ x, D* __restrict__ y, int n)
{
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long e0 = (long long)blockIdx.x * blockDim.x + threadIdx.x; e0 < n; e0 += ILP * stride) {
        S xk[ILP];
        for (int k = 0; k < ILP; ++k) {
            const long long e = e0 + k * stride;
            xk[k] = e < n ? x[e] : S(0);
        }
        for (int k = 0; k < ILP; ++k) {
            const long long e = e0 + k * stride;
            if (e < n)
                y[e] = D(xk[k]);
        }
    }
}

extern "C" __global__ void narrow_kernel(const F* __restrict__ x, T* __restrict__ y, int n)
{
    convert_body<F, T>(x, y, n);
}

extern "C" __global__ void widen_kernel(const T* __restrict__ x, F* __restrict__ y, int n)
{
    convert_body<T, F>(x, y, n);
}
