// bf16: the storage type of `--precision bf16` (bfloat16: the upper 16 bits of an IEEE float32, 8 exponent and 7
// mantissa bits), put before a kernel file by cpnet/kernels/__init__.py's kernel_source, followed by
// `typedef bf16 T; typedef float F;`: the kernels load T, compute in F (float32) and store T.
//
// Our own struct rather than cuda_bf16.h's __nv_bfloat16: the same text then compiles under NVRTC (no include
// path needed), nvcc and the host shim's g++, and the rounding is the same bits everywhere. The arrays are uint16
// on the Python side (NumPy and CuPy have no bfloat16 dtype); cpnet/precision.py does the same conversions there.
//
//   float -> bf16: round to nearest, ties to even (add 0x7FFF plus the lowest kept bit, keep the upper half);
//                  NaN stays NaN (quiet bit set), infinities stay, values past the largest bf16 round to inf
//   bf16 -> float: exact (the 16 bits become the upper half, the lower half zero)

__device__ __forceinline__ unsigned short float_to_bf16_bits(float f)
{
    const unsigned int u = __float_as_uint(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u)
        return (unsigned short)((u >> 16) | 0x0040u);
    return (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

struct bf16 {
    unsigned short bits;
    bf16() = default;
    __device__ bf16(float f) : bits(float_to_bf16_bits(f)) {}
    __device__ operator float() const { return __uint_as_float((unsigned int)bits << 16); }
};
