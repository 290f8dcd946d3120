// Local response normalisation across channels (Krizhevsky et al. 2012, section 3.3), NCHW with H*W = HW.
//
//   scale[n,c,h,w] = k + alpha_eff * sum_{c' = c - (size-1)/2 .. c + size/2, 0 <= c' < C} x[n,c',h,w]^2
//   y = x * scale^(-beta)
//
// alpha_eff is alpha ('sum' convention) or alpha/size ('mean'); the caller decides. Channels outside [0, C)
// count as zeros. One thread per element; each sums its own window, so no shared memory is needed.
// x, y, dy, dx are T; the arithmetic, the scalars and the cached scale are F (float32 for bf16: the scale keeps
// its precision for backward, and y is rounded once).
// Index arithmetic in I: 32-bit unsigned unless the launcher sets `wide` (2^31 elements or more); see im2col.cu.

__device__ __forceinline__ float lrn_pow(float a, float b) { return powf(a, b); }
__device__ __forceinline__ double lrn_pow(double a, double b) { return pow(a, b); }

template <typename I>
__device__ __forceinline__ void lrn_forward_body(const T* __restrict__ x, T* __restrict__ y,
                                                 F* __restrict__ scale,
                                                 int N, int C, int HW, int size, F k, F alpha_eff, F beta)
{
    const I total = (I)N * C * HW;
    const int before = (size - 1) / 2, after = size / 2;
    for (I e = (I)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (I)blockDim.x * gridDim.x) {
        const int p = (int)(e % HW);
        const int c = (int)((e / HW) % C);
        const I base = (e / ((I)HW * C)) * C * HW + p;
        const int c0 = max(c - before, 0), c1 = min(c + after, C - 1);
        F sq = F(0);
        for (int cc = c0; cc <= c1; ++cc) {
            const F v = F(x[base + (I)cc * HW]);
            sq += v * v;
        }
        const F s = k + alpha_eff * sq;
        scale[e] = s;
        y[e] = T(F(x[e]) * lrn_pow(s, -beta));
    }
}

extern "C" __global__ void lrn_forward_kernel(const T* __restrict__ x, T* __restrict__ y, F* __restrict__ scale,
                                              int N, int C, int HW, int size, F k, F alpha_eff, F beta, int wide)
{
    if (wide)
        lrn_forward_body<long long>(x, y, scale, N, C, HW, size, k, alpha_eff, beta);
    else
        lrn_forward_body<unsigned int>(x, y, scale, N, C, HW, size, k, alpha_eff, beta);
}

// dx[c] = dy[c] * scale[c]^(-beta) - 2 * alpha_eff * beta * x[c] * sum_{c'} dy[c'] * y[c'] / scale[c'],
// c' over the channels whose window contains c: c - size/2 .. c + (size-1)/2, clipped to [0, C).
template <typename I>
__device__ __forceinline__ void lrn_backward_body(const T* __restrict__ x, const T* __restrict__ y,
                                                  const F* __restrict__ scale, const T* __restrict__ dy,
                                                  T* __restrict__ dx,
                                                  int N, int C, int HW, int size, F alpha_eff, F beta)
{
    const I total = (I)N * C * HW;
    const int before = size / 2, after = (size - 1) / 2;
    for (I e = (I)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (I)blockDim.x * gridDim.x) {
        const int p = (int)(e % HW);
        const int c = (int)((e / HW) % C);
        const I base = (e / ((I)HW * C)) * C * HW + p;
        const int c0 = max(c - before, 0), c1 = min(c + after, C - 1);
        F acc = F(0);
        for (int cc = c0; cc <= c1; ++cc) {
            const I o = base + (I)cc * HW;
            acc += F(dy[o]) * F(y[o]) / scale[o];
        }
        dx[e] = T(F(dy[e]) * lrn_pow(scale[e], -beta) - F(2) * alpha_eff * beta * F(x[e]) * acc);
    }
}

extern "C" __global__ void lrn_backward_kernel(const T* __restrict__ x, const T* __restrict__ y,
                                               const F* __restrict__ scale, const T* __restrict__ dy,
                                               T* __restrict__ dx,
                                               int N, int C, int HW, int size, F alpha_eff, F beta, int wide)
{
    if (wide)
        lrn_backward_body<long long>(x, y, scale, dy, dx, N, C, HW, size, alpha_eff, beta);
    else
        lrn_backward_body<unsigned int>(x, y, scale, dy, dx, N, C, HW, size, alpha_eff, beta);
}
