// im2col / col2im for convolution as one GEMM over the whole batch.
//
// col has shape (C*kh*kw, N*Ho*Wo): row r = c*kh*kw + i*kw + j, column q = n*Ho*Wo + oy*Wo + ox, and
// col[r, q] = x[n, c, oy*sy - ph + i, ox*sx - pw + j], zero where that position falls in the padding.
// T (float, double or bf16) and its compute type F come from typedef lines the loader puts before this text (see
// cpnet/kernels/__init__.py); im2col only copies, col2im sums in F and rounds once. One thread per output element, grid-stride loop, bounds check on every index.
//
// Index arithmetic runs in the type I: 32-bit unsigned when every array the kernel touches has fewer than 2^31
// elements (`wide` = 0, the launcher decides), else 64-bit. The divisions that split a flat index into
// (row, column, ...) are most of these kernels' work, and a 64-bit division costs several times a 32-bit one.

template <typename I>
__device__ __forceinline__ void im2col_body(const T* __restrict__ x, T* __restrict__ col,
                                            int N, int C, int H, int W, int kh, int kw,
                                            int sy, int sx, int ph, int pw, int Ho, int Wo)
{
    const I cols = (I)N * Ho * Wo;
    const I total = (I)C * kh * kw * cols;
    for (I e = (I)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (I)blockDim.x * gridDim.x) {
        const I r = e / cols;
        const I q = e - r * cols;
        const int j = (int)(r % kw);
        const int i = (int)((r / kw) % kh);
        const int c = (int)(r / ((I)kw * kh));
        const int ox = (int)(q % Wo);
        const int oy = (int)((q / Wo) % Ho);
        const int n = (int)(q / ((I)Wo * Ho));
        const int h = oy * sy - ph + i;
        const int w = ox * sx - pw + j;
        col[e] = (h >= 0 && h < H && w >= 0 && w < W) ? x[(((I)n * C + c) * H + h) * W + w] : T(0);
    }
}

extern "C" __global__ void im2col_kernel(const T* __restrict__ x, T* __restrict__ col,
                                         int N, int C, int H, int W, int kh, int kw,
                                         int sy, int sx, int ph, int pw, int Ho, int Wo, int wide)
{
    if (wide)
        im2col_body<long long>(x, col, N, C, H, W, kh, kw, sy, sx, ph, pw, Ho, Wo);
    else
        im2col_body<unsigned int>(x, col, N, C, H, W, kh, kw, sy, sx, ph, pw, Ho, Wo);
}

// The adjoint of im2col: x[n, c, h, w] = sum of every col entry that im2col copied from (n, c, h, w).
// One thread per input element gathers them (window offset i, j ascending), so no atomics are needed
// and the result does not depend on thread scheduling.
template <typename I>
__device__ __forceinline__ void col2im_body(const T* __restrict__ col, T* __restrict__ x,
                                            int N, int C, int H, int W, int kh, int kw,
                                            int sy, int sx, int ph, int pw, int Ho, int Wo)
{
    const I cols = (I)N * Ho * Wo;
    const I total = (I)N * C * H * W;
    for (I e = (I)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (I)blockDim.x * gridDim.x) {
        const int w = (int)(e % W);
        const int h = (int)((e / W) % H);
        const int c = (int)((e / ((I)W * H)) % C);
        const int n = (int)(e / ((I)W * H * C));
        const I qbase = (I)n * Ho * Wo;
        F acc = F(0);
        for (int i = 0; i < kh; ++i) {
            const int hp = h + ph - i;  // = oy * sy for the output row whose window puts offset i on h
            if (hp < 0 || hp % sy != 0 || hp / sy >= Ho) continue;
            const int oy = hp / sy;
            for (int j = 0; j < kw; ++j) {
                const int wp = w + pw - j;
                if (wp < 0 || wp % sx != 0 || wp / sx >= Wo) continue;
                const int ox = wp / sx;
                const I r = ((I)c * kh + i) * kw + j;
                acc += F(col[r * cols + qbase + (I)oy * Wo + ox]);
            }
        }
        x[e] = T(acc);
    }
}

extern "C" __global__ void col2im_kernel(const T* __restrict__ col, T* __restrict__ x,
                                         int N, int C, int H, int W, int kh, int kw,
                                         int sy, int sx, int ph, int pw, int Ho, int Wo, int wide)
{
    if (wide)
        col2im_body<long long>(col, x, N, C, H, W, kh, kw, sy, sx, ph, pw, Ho, Wo);
    else
        col2im_body<unsigned int>(col, x, N, C, H, W, kh, kw, sy, sx, ph, pw, Ho, Wo);
}
