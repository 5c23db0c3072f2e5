// Widening fp8 (e4m3) weights to fp16 or bf16, once per layer call (sdrun/fp8_storage.py: --fp8 stores weights in
// fp8 and computes in 16 bits).
//
// Why a kernel of our own: torch's `.to(float16)` of a float8_e4m3fn tensor converts one value at a time through
// float32 and runs at about 1 TB/s on an H200 (100M values in 0.29 ms), a third of the memory bandwidth; SD 1.5's
// 278 fp8 layers then cost 3.2 ms of every UNet call (a whole 512x512 fp16 step replayed from a CUDA graph: 12 ms).
// Here each thread reads 16 values with one 16-byte load and converts them in pairs (cvt.rn.f16x2.e4m3x2 on
// sm_89+, emulated by cuda_fp8.h below that), then writes 32 bytes. Every e4m3 value is exact in fp16 and in bf16,
// so the result equals torch's cast bit for bit (NaN stays NaN).
// A base pointer that is not 16-byte aligned (a view into a larger buffer) takes the one-value-a-thread path.
#include "fp8_widen.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;  // grid-stride beyond: enough to fill any GPU, no 2^31 grid limit to mind
constexpr int kValuesPerVector = 16;

__device__ __forceinline__ __half2 widen_pair(__nv_fp8x2_storage_t pair) {
    return __half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3));
}

template <bool kBf16>
__global__ void widen_vectors(const uint4 *__restrict__ src, uint4 *__restrict__ dst, int64_t vectors) {
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < vectors; i += stride) {
        const uint4 packed = src[i];
        const auto *pairs = reinterpret_cast<const __nv_fp8x2_storage_t *>(&packed);
        uint4 out[2];
        if constexpr (kBf16) {
            auto *wide = reinterpret_cast<__nv_bfloat162 *>(out);
#pragma unroll
            for (int k = 0; k < 8; ++k) wide[k] = __float22bfloat162_rn(__half22float2(widen_pair(pairs[k])));
        } else {
            auto *wide = reinterpret_cast<__half2 *>(out);
#pragma unroll
            for (int k = 0; k < 8; ++k) wide[k] = widen_pair(pairs[k]);
        }
        dst[2 * i] = out[0];
        dst[2 * i + 1] = out[1];
    }
}

template <bool kBf16>
__global__ void widen_values(const __nv_fp8_storage_t *__restrict__ src, void *__restrict__ dst, int64_t begin,
                             int64_t n) {
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t i = begin + int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
        const __half value = __half(__nv_cvt_fp8_to_halfraw(src[i], __NV_E4M3));
        if constexpr (kBf16) {
            static_cast<__nv_bfloat16 *>(dst)[i] = __float2bfloat16_rn(__half2float(value));
        } else {
            static_cast<__half *>(dst)[i] = value;
        }
    }
}

int blocks_for(int64_t items) {
    return int((items + kThreads - 1) / kThreads < kMaxBlocks ? (items + kThreads - 1) / kThreads : kMaxBlocks);
}

template <bool kBf16>
cudaError_t launch(const Fp8WidenParams &p, cudaStream_t stream) {
    const bool aligned = reinterpret_cast<uintptr_t>(p.src) % 16 == 0 && reinterpret_cast<uintptr_t>(p.dst) % 16 == 0;
    const int64_t vectors = aligned ? p.n / kValuesPerVector : 0;
    if (vectors > 0) {
        widen_vectors<kBf16><<<blocks_for(vectors), kThreads, 0, stream>>>(
            static_cast<const uint4 *>(p.src), static_cast<uint4 *>(p.dst), vectors);
    }
    const int64_t done = vectors * kValuesPerVector;
    if (done < p.n) {
        widen_values<kBf16><<<blocks_for(p.n - done), kThreads, 0, stream>>>(
            static_cast<const __nv_fp8_storage_t *>(p.src), p.dst, done, p.n);
    }
    return cudaGetLastError();
}

}  // namespace

cudaError_t fp8_widen(const Fp8WidenParams &params, cudaStream_t stream) {
    if (params.n <= 0) return cudaSuccess;
    return params.to_bf16 ? launch<true>(params, stream) : launch<false>(params, stream);
}
