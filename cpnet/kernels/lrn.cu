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
// The fused LRN -> max pool kernels at the end use pool.cuh's rules (kernel_source puts it before this file).

__device__ __forceinline__ float lrn_pow(float a, float b) { return powf(a, b); }
__device__ __forceinline__ double lrn_pow(double a, double b) { return pow(a, b); }

// scale at channel c of the pixel whose channel 0 is x[base] (channel c' at base + c' * HW): the forward's window
// c - (size-1)/2 .. c + size/2 clipped to [0, C), summed in ascending order (the fused kernels below recompute it
// with this very function, so their scale is the plain forward's, bit for bit).
template <typename I>
__device__ __forceinline__ F lrn_scale_at(const T* __restrict__ x, I base, int HW, int c, int C, int size, F k,
                                          F alpha_eff)
{
    const int c0 = max(c - (size - 1) / 2, 0), c1 = min(c + size / 2, C - 1);
    F sq = F(0);
    for (int cc = c0; cc <= c1; ++cc) {
        const F v = F(x[base + (I)cc * HW]);
        sq += v * v;
    }
    return k + alpha_eff * sq;
}

template <typename I>
__device__ __forceinline__ void lrn_forward_body(const T* __restrict__ x, T* __restrict__ y,
                                                 F* __restrict__ scale,
                                                 int N, int C, int HW, int size, F k, F alpha_eff, F beta)
{
    const I total = (I)N * C * HW;
    for (I e = (I)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (I)blockDim.x * gridDim.x) {
        const int p = (int)(e % HW);
        const int c = (int)((e / HW) % C);
        const F s = lrn_scale_at<I>(x, (e / ((I)HW * C)) * C * HW + p, HW, c, C, size, k, alpha_eff);
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

// ---------------------------------------------------------------------------------------------------------------
// LRN -> max pool in one pass each way (layers 1-2 of the paper's and ccn2's conventions, which normalise before
// pooling): the LRN output and its scale never reach memory.
//
// Forward, one thread per pooled output: for each input position of its ksize x ksize window (inside the input:
// padding never wins) the LRN value x * scale^-beta, rounded to T as lrn_forward_kernel stores it, compared by
// pool.cuh's rule (ties to the first maximum, NaN propagates); writes y = the maximum and off = the winner's
// offset i*ksize + j inside its window (uint8: the host path's compact argmax; the launcher needs ksize^2 <= 255).
// The same values and comparisons as lrn_forward_kernel then maxpool_forward_kernel.
template <typename I>
__device__ __forceinline__ void lrn_pool_forward_body(const T* __restrict__ x, T* __restrict__ y,
                                                      unsigned char* __restrict__ off,
                                                      int N, int C, int H, int W, int size, F k, F alpha_eff, F beta,
                                                      int ksize, int stride, int pad, int Ho, int Wo)
{
    const I total = (I)N * C * Ho * Wo;
    const int HW = H * W;
    for (I e = (I)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (I)blockDim.x * gridDim.x) {
        const int ox = (int)(e % Wo);
        const int oy = (int)((e / Wo) % Ho);
        const I nc = e / ((I)Wo * Ho);
        const int c = (int)(nc % C);
        const I plane = nc * HW, image = (nc - c) * HW;
        int hs, he, ws, we;
        const int h0 = pool_window(oy, ksize, stride, pad, H, hs, he);
        const int w0 = pool_window(ox, ksize, stride, pad, W, ws, we);
        int best_at = -1;
        F best = F(0);
        for (int h = hs; h < he; ++h) {
            for (int w = ws; w < we; ++w) {
                const int p = h * W + w;
                const F s = lrn_scale_at<I>(x, image + p, HW, c, C, size, k, alpha_eff);
                const F v = F(T(F(x[plane + p]) * lrn_pow(s, -beta)));
                if (pool_takes(v, best, best_at)) {
                    best = v;
                    best_at = (h - h0) * ksize + (w - w0);
                }
            }
        }
        y[e] = T(best);
        off[e] = (unsigned char)best_at;
    }
}

extern "C" __global__ void lrn_pool_forward_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                   unsigned char* __restrict__ off,
                                                   int N, int C, int H, int W, int size, F k, F alpha_eff, F beta,
                                                   int ksize, int stride, int pad, int Ho, int Wo, int wide)
{
    if (wide)
        lrn_pool_forward_body<long long>(x, y, off, N, C, H, W, size, k, alpha_eff, beta, ksize, stride, pad, Ho, Wo);
    else
        lrn_pool_forward_body<unsigned int>(x, y, off, N, C, H, W, size, k, alpha_eff, beta, ksize, stride, pad,
                                            Ho, Wo);
}

// The pool's gradient at input (h, w) of the plane starting at dy + obase: the sum of dy over the covering outputs
// (oy, ox ascending) whose window offset `off` points at (h, w), as maxpool_backward_kernel sums it.
template <typename I>
__device__ __forceinline__ F pool_gather(const T* __restrict__ dy, const unsigned char* __restrict__ off, I obase,
                                         int h, int w, int ksize, int stride, int pad, int oy0, int oy1, int ox0,
                                         int ox1, int Wo)
{
    F acc = F(0);
    for (int oy = oy0; oy < oy1; ++oy) {
        const int i = (h - (oy * stride - pad)) * ksize;
        for (int ox = ox0; ox < ox1; ++ox) {
            const I o = obase + (I)oy * Wo + ox;
            if ((int)off[o] == i + w - (ox * stride - pad)) acc += F(dy[o]);
        }
    }
    return acc;
}

// Backward, one thread per input element (n, c, h, w): for each channel c' whose LRN window holds c, the pool's
// gradient g[c'] gathered through the window offsets (rounded to T, as maxpool_backward_kernel stores it) and
// LRN's y[c'] and scale[c'] recomputed from x; then lrn_backward_kernel's formula in its order:
//   dx[c] = g[c] * scale[c]^-beta - 2 * alpha_eff * beta * x[c] * sum_{c'} g[c'] * y[c'] / scale[c'].
template <typename I>
__device__ __forceinline__ void lrn_pool_backward_body(const T* __restrict__ x, const T* __restrict__ dy,
                                                       const unsigned char* __restrict__ off, T* __restrict__ dx,
                                                       int N, int C, int H, int W, int size, F k, F alpha_eff,
                                                       F beta, int ksize, int stride, int pad, int Ho, int Wo)
{
    const I total = (I)N * C * H * W;
    const int HW = H * W;
    for (I e = (I)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (I)blockDim.x * gridDim.x) {
        const int w = (int)(e % W);
        const int h = (int)((e / W) % H);
        const I nc = e / ((I)W * H);
        const int c = (int)(nc % C);
        const I image = (nc - c) * HW;  // channel 0 of this image
        const int p = h * W + w;
        int oy0, oy1, ox0, ox1;
        pool_covering(h, ksize, stride, pad, Ho, oy0, oy1);
        pool_covering(w, ksize, stride, pad, Wo, ox0, ox1);
        const int c0 = max(c - size / 2, 0), c1 = min(c + (size - 1) / 2, C - 1);
        F acc = F(0), g_here = F(0), s_here = F(1);
        for (int cc = c0; cc <= c1; ++cc) {
            const F g = F(T(pool_gather<I>(dy, off, (nc - c + cc) * Ho * Wo, h, w, ksize, stride, pad, oy0, oy1,
                                           ox0, ox1, Wo)));
            const F s = lrn_scale_at<I>(x, image + p, HW, cc, C, size, k, alpha_eff);
            const F yv = F(T(F(x[image + (I)cc * HW + p]) * lrn_pow(s, -beta)));
            acc += g * yv / s;
            if (cc == c) {
                g_here = g;
                s_here = s;
            }
        }
        dx[e] = T(g_here * lrn_pow(s_here, -beta) - F(2) * alpha_eff * beta * F(x[e]) * acc);
    }
}

extern "C" __global__ void lrn_pool_backward_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                                                    const unsigned char* __restrict__ off, T* __restrict__ dx,
                                                    int N, int C, int H, int W, int size, F k, F alpha_eff, F beta,
                                                    int ksize, int stride, int pad, int Ho, int Wo, int wide)
{
    if (wide)
        lrn_pool_backward_body<long long>(x, dy, off, dx, N, C, H, W, size, k, alpha_eff, beta, ksize, stride, pad,
                                          Ho, Wo);
    else
        lrn_pool_backward_body<unsigned int>(x, dy, off, dx, N, C, H, W, size, k, alpha_eff, beta, ksize, stride,
                                             pad, Ho, Wo);
}
