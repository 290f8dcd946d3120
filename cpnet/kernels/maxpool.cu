// Max pooling over (possibly overlapping) ksize x ksize windows, NCHW.
//
// Output size is floor((H + 2*pad - ksize) / stride) + 1. Padding never wins: only positions inside the
// input are compared. Ties go to the first maximum in row-major window order (strict >); NaN propagates (the
// first NaN of a window wins, as NumPy's maximum and the host path have it), and argmax holds
// the flat index h*W + w of the winner inside its (n, c) plane (-1 if a window covers no input at all).
// Index arithmetic in I: 32-bit unsigned unless the launcher sets `wide` (an array of 2^31 elements or more);
// see im2col.cu. Comparisons and the backward's sums run in F (float for bf16; the maximum itself is exact).
// pool_window, pool_takes and pool_covering: pool.cuh (shared with lrn.cu's fused LRN -> pool kernels).

template <typename I>
__device__ __forceinline__ void maxpool_forward_body(const T* __restrict__ x, T* __restrict__ y,
                                                     int* __restrict__ argmax,
                                                     int N, int C, int H, int W, int ksize, int stride,
                                                     int pad, int Ho, int Wo)
{
    const I total = (I)N * C * Ho * Wo;
    for (I e = (I)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (I)blockDim.x * gridDim.x) {
        const int ox = (int)(e % Wo);
        const int oy = (int)((e / Wo) % Ho);
        const I nc = e / ((I)Wo * Ho);
        const T* plane = x + nc * H * W;
        int hs, he, ws, we;
        pool_window(oy, ksize, stride, pad, H, hs, he);
        pool_window(ox, ksize, stride, pad, W, ws, we);
        int best_at = -1;
        F best = F(0);
        for (int h = hs; h < he; ++h) {
            for (int w = ws; w < we; ++w) {
                const F v = F(plane[h * W + w]);
                if (pool_takes(v, best, best_at)) {
                    best = v;
                    best_at = h * W + w;
                }
            }
        }
        y[e] = T(best);
        argmax[e] = best_at;
    }
}

extern "C" __global__ void maxpool_forward_kernel(const T* __restrict__ x, T* __restrict__ y,
                                                  int* __restrict__ argmax,
                                                  int N, int C, int H, int W, int ksize, int stride,
                                                  int pad, int Ho, int Wo, int wide)
{
    if (wide)
        maxpool_forward_body<long long>(x, y, argmax, N, C, H, W, ksize, stride, pad, Ho, Wo);
    else
        maxpool_forward_body<unsigned int>(x, y, argmax, N, C, H, W, ksize, stride, pad, Ho, Wo);
}

// dx[n, c, h, w] = sum of dy over the outputs whose window covers (h, w) and whose argmax is (h, w).
// One thread per input element gathers from those outputs (oy, ox ascending): no atomics, deterministic.
template <typename I>
__device__ __forceinline__ void maxpool_backward_body(const T* __restrict__ dy, const int* __restrict__ argmax,
                                                      T* __restrict__ dx,
                                                      int N, int C, int H, int W, int ksize, int stride,
                                                      int pad, int Ho, int Wo)
{
    const I total = (I)N * C * H * W;
    for (I e = (I)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (I)blockDim.x * gridDim.x) {
        const int w = (int)(e % W);
        const int h = (int)((e / W) % H);
        const I nc = e / ((I)W * H);
        int oy0, oy1, ox0, ox1;
        pool_covering(h, ksize, stride, pad, Ho, oy0, oy1);
        pool_covering(w, ksize, stride, pad, Wo, ox0, ox1);
        const int here = h * W + w;
        const I obase = nc * Ho * Wo;
        F acc = F(0);
        for (int oy = oy0; oy < oy1; ++oy) {
            for (int ox = ox0; ox < ox1; ++ox) {
                const I o = obase + (I)oy * Wo + ox;
                if (argmax[o] == here) acc += F(dy[o]);
            }
        }
        dx[e] = T(acc);
    }
}

extern "C" __global__ void maxpool_backward_kernel(const T* __restrict__ dy, const int* __restrict__ argmax,
                                                   T* __restrict__ dx,
                                                   int N, int C, int H, int W, int ksize, int stride,
                                                   int pad, int Ho, int Wo, int wide)
{
    if (wide)
        maxpool_backward_body<long long>(dy, argmax, dx, N, C, H, W, ksize, stride, pad, Ho, Wo);
    else
        maxpool_backward_body<unsigned int>(dy, argmax, dx, N, C, H, W, ksize, stride, pad, Ho, Wo);
}
