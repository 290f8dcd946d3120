// The network input made on the GPU from the uint8 pixels the loader read (data/augment.py's RawBatch): crop,
// horizontal flip, PCA lighting, mean subtraction and input scale in one launch, the same float32 operations in
// the same order as data/augment.py's crop_into on the host, so the result is the same bits:
//
//   out[j, c, y, x] = ((float(u) + shift[j, c]) - mean[c, sy, sx]) * scale    where the source pixel
//   (sy, sx) = (oy + y, ox + (flip ? crop - 1 - x : x)) lies in the stored S x S image, else 0 (a --pad border:
//   the mean colour, with no lighting; crop_into writes 0 there too). scale = 1 multiplies exactly. Pixels in the
//   crop's erased box (random erasing: y0 <= y < y1 and x0 <= x < x1, output coordinates) are 0 as well.
//
// The pixels u come from `src`, uint8 (images, region, region, 3) in the file's HWC order:
//   windowed = 1: each crop its own window, region = crop, cut at the crop's (oy, ox) (what lies outside the stored
//                 image is never read), so row m of the table is window m;
//   windowed = 0: whole stored images, region = S, read at (sy, sx) (ten evaluation views of one image share it).
// `table` holds 8 int32 per crop (m: the src image, oy, ox, flip, then the erased box y0, x0, y1, x1), `shift` 3 float32 (the lighting's RGB shift,
// eigvec @ (alpha * eigval) computed on the host; 0 for evaluation, and x + 0 is x for the pixels' x >= 0),
// `mean` float32 (3, S, S). Crops first .. first + n - 1 of the table fill out (n, 3, crop, crop).
//
// Arithmetic in float whatever T is: float32 is the host's type; T = double stores it exactly (the host's float32
// batch widened), T = bf16 rounds it once to nearest even (the host's precision.to_bf16 of the float32 batch).
// The product goes through __fmul_rn so that no compiler fuses it with the subtraction before it.
// 2-D grid: y blocks over the n*3 output planes (j, c), x threads over the crop*crop pixels of one.

extern "C" __global__ void augment_kernel(const unsigned char* __restrict__ src, const int* __restrict__ table,
                                          const float* __restrict__ shift, const float* __restrict__ mean,
                                          T* __restrict__ out, int n, int first, int crop, int size, int region,
                                          int windowed, float scale)
{
    const int cc = crop * crop;
    const long long planes = (long long)n * 3;
    for (long long jc = blockIdx.y; jc < planes; jc += gridDim.y) {
        const long long j = jc / 3;
        const int c = (int)(jc - 3 * j);
        const int* const row = table + 8 * (first + j);
        const int oy = row[1], ox = row[2], flip = row[3];
        const int ey0 = row[4], ex0 = row[5], ey1 = row[6], ex1 = row[7];
        const unsigned char* const img = src + (long long)row[0] * region * region * 3 + c;
        const float s = shift[3 * (first + j) + c];
        const float* const mc = mean + (long long)c * size * size;
        T* const dst = out + jc * cc;
        for (int p = (int)(blockIdx.x * blockDim.x + threadIdx.x); p < cc; p += (int)(blockDim.x * gridDim.x)) {
            const int y = p / crop;
            const int x = p - y * crop;
            const int xs = flip ? crop - 1 - x : x;
            const int sy = oy + y, sx = ox + xs;
            float v = 0.0f;
            const bool erased = y >= ey0 && y < ey1 && x >= ex0 && x < ex1;
            if (!erased && sy >= 0 && sy < size && sx >= 0 && sx < size) {
                const int ry = windowed ? y : sy, rx = windowed ? xs : sx;
                v = (float)img[((long long)ry * region + rx) * 3] + s;
                v = v - mc[(long long)sy * size + sx];
                v = __fmul_rn(v, scale);
            }
            dst[p] = T(v);
        }
    }
}
