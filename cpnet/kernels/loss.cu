// Softmax cross-entropy (cpnet/ops/loss.py): one kernel per direction, where the CuPy expression chains about a
// dozen (max, shift, exp, sum, log, the label gather, the sum, the scaling; then copy, scatter, divide).
//
//   forward, one thread per row n of the (N, K) logits z:
//     m = max_k z[k];  lse = log(sum_k exp(z[k] - m));  p[n, k] = exp(z[k] - m - lse)   (kept for backward)
//     row_loss[n] = -(z[label] - m - lse) / N      (so the loss is the plain sum of row_loss)
//   backward, one thread per element:  dz[n, k] = (p[n, k] - [k == label]) / N
//
// A label outside [0, K) gives a NaN row loss and no one-hot term (the host path refuses such labels before it
// gets here; on a GPU they are not looked at, and NaN is what the NaN guard catches). Loads are T, arithmetic F,
// and the row loss is F (a bf16 loss would lose the digits that the learning curves show).

__device__ __forceinline__ float xent_exp(float a) { return expf(a); }
__device__ __forceinline__ double xent_exp(double a) { return exp(a); }
__device__ __forceinline__ float xent_log(float a) { return logf(a); }
__device__ __forceinline__ double xent_log(double a) { return log(a); }
// A quiet NaN by its bits (NVRTC compiles without math.h, so there is no NAN macro to rely on).
__device__ __forceinline__ float xent_nan(float) { return __uint_as_float(0x7FC00000u); }
__device__ __forceinline__ double xent_nan(double) { return __longlong_as_double(0x7FF8000000000000LL); }

extern "C" __global__ void softmax_xent_forward_kernel(const T* __restrict__ z, const int* __restrict__ labels,
                                                       T* __restrict__ p, F* __restrict__ row_loss, int N, int K)
{
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long n = (long long)blockIdx.x * blockDim.x + threadIdx.x; n < N; n += stride) {
        const T* const zr = z + n * K;
        T* const pr = p + n * K;
        F m = F(zr[0]);
        for (int k = 1; k < K; ++k) {
            const F v = F(zr[k]);
            m = (v > m || v != v) ? v : m;  // NaN wins, as NumPy's max
        }
        F s = F(0);
        for (int k = 0; k < K; ++k)
            s += xent_exp(F(zr[k]) - m);
        const F lse = xent_log(s);
        for (int k = 0; k < K; ++k)
            pr[k] = T(xent_exp(F(zr[k]) - m - lse));
        const int label = labels[n];
        row_loss[n] = (label >= 0 && label < K) ? -(F(zr[label]) - m - lse) / F(N) : xent_nan(F(0));
    }
}

extern "C" __global__ void softmax_xent_backward_kernel(const T* __restrict__ p, const int* __restrict__ labels,
                                                        T* __restrict__ dz, int N, int K)
{
    const long long total = (long long)N * K;
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const long long n = e / K;
        const int k = (int)(e - n * K);
        const F one_hot = labels[n] == k ? F(1) : F(0);
        dz[e] = T((F(p[e]) - one_hot) / F(N));
    }
}
