/* host_shim.h: lets g++ compile cpnet's CUDA kernels (*.cu) as plain C++ for the CPU.

   (echo 'typedef float T;'; cat im2col.cu) | g++ -O2 -shared -fPIC -ffp-contract=off -include host_shim.h -x c++ - -o im2col.so

   (cpnet/kernels/shim.py does this for every source and dtype, feeding g++ the same text CuPy compiles.)

   The CUDA keywords become nothing (or `inline`), and the launch built-ins gridDim, blockDim, blockIdx and
   threadIdx become ordinary global variables with C linkage. The host driver (cpnet/kernels/shim.py) sets
   gridDim/blockDim, then loops over every blockIdx and threadIdx and calls the kernel once per (block, thread),
   just as a launch would run it, so each kernel's own indexing, grid-stride loop and bounds checks are what
   execute. Threads run one after another, so only kernels without shared memory and __syncthreads() can run
   here; neither is defined below, so a kernel that uses them fails to compile instead of running wrongly.

   Under nvcc / NVRTC (__CUDACC__ defined) this header adds nothing. */
#ifndef CPNET_HOST_SHIM_H
#define CPNET_HOST_SHIM_H

#ifndef __CUDACC__

#include <math.h>
#include <cmath>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct dim3 {
    unsigned int x, y, z;
};
typedef dim3 uint3;

extern "C" {
dim3 gridDim = {1, 1, 1};
dim3 blockDim = {1, 1, 1};
uint3 blockIdx = {0, 0, 0};
uint3 threadIdx = {0, 0, 0};
}

/* Threads run sequentially, so an atomic add is a plain add that returns the old value. */
template <typename V>
inline V atomicAdd(V* address, V value) {
    V old = *address;
    *address = old + value;
    return old;
}

template <typename V>
inline V min(V a, V b) { return b < a ? b : a; }
template <typename V>
inline V max(V a, V b) { return a < b ? b : a; }

inline float rsqrtf(float v) { return 1.0f / sqrtf(v); }
inline double rsqrt(double v) { return 1.0 / sqrt(v); }

/* Products in round-to-nearest that the compiler must not fuse into an FMA (shim.py also compiles with
   -ffp-contract=off). */
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }

/* The bit casts of bf16.cuh (the bf16 stand-in: the same struct and rounding as on the GPU). */
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, sizeof u); return u; }
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, sizeof f); return f; }
/* and loss.cu's quiet NaN for double */
inline double __longlong_as_double(long long u) { double f; std::memcpy(&f, &u, sizeof f); return f; }

#endif /* __CUDACC__ */
#endif /* CPNET_HOST_SHIM_H */
