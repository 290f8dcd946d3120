// The convolution's output layout pass with its bias and ReLU (cpnet/ops/conv.py), one launch each way where
// the array path takes two (the bias add into NCHW, then the ReLU; backward the ReLU mask, then the copy back to
// the GEMM's layout).
//
//   forward:  y[n, f, p] = relu(ym[f, n*HW + p] + b[f])        ym: the GEMM's (C, N*HW) output, y: NCHW
//                                                              (C: the output channels; F is the compute type)
//   backward: d[f, n*HW + p] = dy[n, f, p] * (y[n, f, p] > 0)  (without relu: the plain copy)
//
// relu(v) = v > 0 ? v : 0 with NaN passing through, the mask a product (a NaN or inf in dy stays non-finite),
// as relu_forward_kernel / relu_backward_kernel: the same bits as the two passes. Loads T, arithmetic F. The
// forward reads the GEMM output and the bias as F (bf16: the float32 accumulator and the float32 master bias), so
// bf16's y is rounded once, after bias and ReLU.
// 2-D grid: y blocks over the N*C planes (n, f), x threads over the HW pixels of one, so reads and writes are
// both contiguous runs and a thread splits no index.

extern "C" __global__ void conv_layout_forward_kernel(const F* __restrict__ ym, const F* __restrict__ b,
                                                      T* __restrict__ y, int N, int C, int HW, int relu)
{
    const long long planes = (long long)N * C;
    for (long long nf = blockIdx.y; nf < planes; nf += gridDim.y) {
        const long long n = nf / C;
        const int f = (int)(nf - n * C);
        const F* const src = ym + (long long)f * N * HW + n * HW;
        T* const dst = y + nf * HW;
        const F bias = F(b[f]);
        for (int p = (int)(blockIdx.x * blockDim.x + threadIdx.x); p < HW; p += (int)(blockDim.x * gridDim.x)) {
            const F v = F(src[p]) + bias;
            dst[p] = T((!relu || v > F(0) || v != v) ? v : F(0));
        }
    }
}

extern "C" __global__ void conv_layout_backward_kernel(const T* __restrict__ dy, const T* __restrict__ y,
                                                       T* __restrict__ d, int N, int C, int HW, int relu)
{
    const long long planes = (long long)N * C;
    for (long long nf = blockIdx.y; nf < planes; nf += gridDim.y) {
        const long long n = nf / C;
        const int f = (int)(nf - n * C);
        const T* const g = dy + nf * HW;
        const T* const out = y + nf * HW;
        T* const dst = d + (long long)f * N * HW + n * HW;
        for (int p = (int)(blockIdx.x * blockDim.x + threadIdx.x); p < HW; p += (int)(blockDim.x * gridDim.x))
            dst[p] = relu ? T(F(g[p]) * (F(out[p]) > F(0) ? F(1) : F(0))) : g[p];
    }
}
