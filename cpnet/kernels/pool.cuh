// pool.cuh: the max-pooling rules shared by maxpool.cu and lrn.cu's fused LRN -> pool kernels, put before those
// files by cpnet/kernels/__init__.py's kernel_source (after the T and F typedefs), so that both compare and
// gather exactly alike.

// Whether value v (at a later position in row-major window order) takes a window's maximum from `best`, the value
// at `best_at` (< 0: nothing seen yet). Ties go to the first maximum (strict >); NaN propagates: the first NaN of
// a window wins and keeps winning.
__device__ __forceinline__ bool pool_takes(F v, F best, int best_at)
{
    return best_at < 0 || v > best || (v != v && best == best);
}

// Output o's window along one axis: it starts at o*stride - pad (returned); the input positions it reads are
// s <= i < e (inside [0, n): padding is never read).
__device__ __forceinline__ int pool_window(int o, int ksize, int stride, int pad, int n, int& s, int& e)
{
    const int start = o * stride - pad;
    s = max(start, 0);
    e = min(start + ksize, n);
    return start;
}

// The outputs o0 <= o < o1 along one axis whose window covers input position i: output o covers
// [o*stride - pad, o*stride - pad + ksize), so (i + pad - ksize) / stride < o <= (i + pad) / stride, below n.
__device__ __forceinline__ void pool_covering(int i, int ksize, int stride, int pad, int n, int& o0, int& o1)
{
    o0 = (i + pad < ksize) ? 0 : (i + pad - ksize) / stride + 1;
    o1 = min((i + pad) / stride + 1, n);
}
