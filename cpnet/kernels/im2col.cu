// im2col / col2im for convolution as one GEMM over the whole batch.
//
// col has shape (C*kh*kw, N*Ho*Wo): row r = c*kh*kw + i*kw + j, column q = n*Ho*Wo + oy*Wo + ox, and
// col[r, q] = x[n, c, oy*sy - ph + i, ox*sx - pw + j], zero where that position falls in the padding.
// T (float, double or bf16) and its compute type F come from typedef lines the loader puts before this text (see
// cpnet/kernels/__init__.py); im2col only copies, col2im sums in F and rounds once.
//
// Both kernels run on a 2-D grid, grid-stride in both directions: blockIdx.y walks channels (im2col) or (n, c)
// planes (col2im), the x threads walk the columns of one channel or the pixels of one plane. So a thread splits
// its flat index into coordinates once (the divisions that were most of the old one-thread-per-element kernels'
// work) and then walks the kh x kw window with additions only; consecutive threads touch consecutive columns.
//
// Index arithmetic runs in the type I: 32-bit unsigned when every array the kernel touches has fewer than 2^31
// elements (`wide` = 0, the launcher decides), else 64-bit. `fixed` = 1 lets the geometries of cpnet's presets
// (11x11 stride 4, 5x5 and 3x3 stride 1) run with kh, kw, sy, sx as compile-time constants (unrolled window
// loops, divisions by a constant stride); 0, or any other geometry, runs them as run-time values. Both give the
// same bits: the constants change the instructions, not the operations on the data.

template <typename I, int KH, int KW, int SY, int SX>
__device__ __forceinline__ void im2col_body(const T* __restrict__ x, T* __restrict__ col,
                                            int N, int C, int H, int W, int kh_, int kw_,
                                            int sy_, int sx_, int ph, int pw, int Ho, int Wo)
{
    const int kh = KH ? KH : kh_, kw = KW ? KW : kw_, sy = SY ? SY : sy_, sx = SX ? SX : sx_;
    const I hw_out = (I)Ho * Wo;
    const I cols = (I)N * hw_out;
    const I plane = (I)H * W;
    for (int c = blockIdx.y; c < C; c += gridDim.y) {
        T* const rows = col + (I)c * kh * kw * cols;  // row c*kh*kw, the first of this channel's window rows
        for (I q = (I)blockIdx.x * blockDim.x + threadIdx.x; q < cols; q += (I)blockDim.x * gridDim.x) {
            const I n = q / hw_out;
            const I rest = q - n * hw_out;
            const int oy = (int)(rest / Wo);
            const int ox = (int)(rest - (I)oy * Wo);
            const int h0 = oy * sy - ph, w0 = ox * sx - pw;
            const T* const src = x + (n * C + c) * plane;
            T* dst = rows + q;
            for (int i = 0; i < kh; ++i) {
                const int h = h0 + i;
                const bool row_in = h >= 0 && h < H;
                for (int j = 0; j < kw; ++j) {
                    const int w = w0 + j;
                    *dst = (row_in && w >= 0 && w < W) ? src[(I)h * W + w] : T(0);
                    dst += cols;
                }
            }
        }
    }
}

// The presets' geometries with compile-time window and stride (when `fixed`), any other at run time. Body is
// Im2col or Col2im below: src, dst and the geometry, the same parameters for both.
template <typename Body, typename I>
__device__ __forceinline__ void with_geometry(const T* __restrict__ src, T* __restrict__ dst,
                                              int N, int C, int H, int W, int kh, int kw,
                                              int sy, int sx, int ph, int pw, int Ho, int Wo, int fixed)
{
    if (fixed && kh == 11 && kw == 11 && sy == 4 && sx == 4)
        Body::template run<I, 11, 11, 4, 4>(src, dst, N, C, H, W, kh, kw, sy, sx, ph, pw, Ho, Wo);
    else if (fixed && kh == 5 && kw == 5 && sy == 1 && sx == 1)
        Body::template run<I, 5, 5, 1, 1>(src, dst, N, C, H, W, kh, kw, sy, sx, ph, pw, Ho, Wo);
    else if (fixed && kh == 3 && kw == 3 && sy == 1 && sx == 1)
        Body::template run<I, 3, 3, 1, 1>(src, dst, N, C, H, W, kh, kw, sy, sx, ph, pw, Ho, Wo);
    else
        Body::template run<I, 0, 0, 0, 0>(src, dst, N, C, H, W, kh, kw, sy, sx, ph, pw, Ho, Wo);
}

struct Im2col {
    template <typename I, int KH, int KW, int SY, int SX>
    __device__ static void run(const T* __restrict__ x, T* __restrict__ col, int N, int C, int H, int W, int kh,
                               int kw, int sy, int sx, int ph, int pw, int Ho, int Wo)
    {
        im2col_body<I, KH, KW, SY, SX>(x, col, N, C, H, W, kh, kw, sy, sx, ph, pw, Ho, Wo);
    }
};

// Grid: x threads over the N*Ho*Wo columns, y blocks over the C channels.
extern "C" __global__ void im2col_kernel(const T* __restrict__ x, T* __restrict__ col,
                                         int N, int C, int H, int W, int kh, int kw,
                                         int sy, int sx, int ph, int pw, int Ho, int Wo, int fixed, int wide)
{
    if (wide)
        im2col_body<long long, 0, 0, 0, 0>(x, col, N, C, H, W, kh, kw, sy, sx, ph, pw, Ho, Wo);
    else
        with_geometry<Im2col, unsigned int>(x, col, N, C, H, W, kh, kw, sy, sx, ph, pw, Ho, Wo, fixed);
}

// The adjoint of im2col: x[n, c, h, w] = sum of every col entry that im2col copied from (n, c, h, w).
// One thread per input element gathers them, so no atomics are needed and the result does not depend on
// thread scheduling. The outputs whose window covers row h are oy0..oy1 (window offset i = h + ph - oy*sy);
// they are visited with i ascending (oy descending), and likewise j, so each element is summed in the order
// of the host path (cpnet.ops.conv.col2im_cpu adds the window offsets (i, j) in ascending order): same bits.
template <typename I, int KH, int KW, int SY, int SX>
__device__ __forceinline__ void col2im_body(const T* __restrict__ col, T* __restrict__ x,
                                            int N, int C, int H, int W, int kh_, int kw_,
                                            int sy_, int sx_, int ph, int pw, int Ho, int Wo)
{
    const int kh = KH ? KH : kh_, kw = KW ? KW : kw_, sy = SY ? SY : sy_, sx = SX ? SX : sx_;
    const I hw_out = (I)Ho * Wo;
    const I cols = (I)N * hw_out;
    const I plane = (I)H * W;
    const I planes = (I)N * C;
    for (I nc = blockIdx.y; nc < planes; nc += gridDim.y) {
        const I n = nc / C;
        const int c = (int)(nc - n * C);
        const T* const src = col + (I)c * kh * kw * cols + n * hw_out;  // (row c*kh*kw, column n*Ho*Wo)
        T* const dst = x + nc * plane;
        for (I e = (I)blockIdx.x * blockDim.x + threadIdx.x; e < plane; e += (I)blockDim.x * gridDim.x) {
            const int h = (int)(e / W);
            const int w = (int)(e - (I)h * W);
            const int hp = h + ph, wp = w + pw;  // = oy*sy + i for every output row oy whose window holds h
            const int oy0 = hp < kh ? 0 : (hp - kh) / sy + 1, oy1 = min(hp / sy, Ho - 1);
            const int ox0 = wp < kw ? 0 : (wp - kw) / sx + 1, ox1 = min(wp / sx, Wo - 1);
            F acc = F(0);
            for (int oy = oy1; oy >= oy0; --oy) {
                const T* const row = src + (I)(hp - oy * sy) * kw * cols + (I)oy * Wo;  // window row i
                for (int ox = ox1; ox >= ox0; --ox)
                    acc += F(row[(I)(wp - ox * sx) * cols + ox]);  // window column j = wp - ox*sx
            }
            dst[e] = T(acc);
        }
    }
}

struct Col2im {
    template <typename I, int KH, int KW, int SY, int SX>
    __device__ static void run(const T* __restrict__ col, T* __restrict__ x, int N, int C, int H, int W, int kh,
                               int kw, int sy, int sx, int ph, int pw, int Ho, int Wo)
    {
        col2im_body<I, KH, KW, SY, SX>(col, x, N, C, H, W, kh, kw, sy, sx, ph, pw, Ho, Wo);
    }
};

// Grid: x threads over the H*W pixels of a plane, y blocks over the N*C planes.
extern "C" __global__ void col2im_kernel(const T* __restrict__ col, T* __restrict__ x,
                                         int N, int C, int H, int W, int kh, int kw,
                                         int sy, int sx, int ph, int pw, int Ho, int Wo, int fixed, int wide)
{
    if (wide)
        col2im_body<long long, 0, 0, 0, 0>(col, x, N, C, H, W, kh, kw, sy, sx, ph, pw, Ho, Wo);
    else
        with_geometry<Col2im, unsigned int>(col, x, N, C, H, W, kh, kw, sy, sx, ph, pw, Ho, Wo, fixed);
}
