// fp8 weights widened for one layer's call: the plain-data boundary between the torch binding and the kernel.
// No torch headers here (style.md P6).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

struct Fp8WidenParams {
    const void *__restrict__ src;  // n float8_e4m3fn values, in memory order
    void *__restrict__ dst;        // n float16 (or bfloat16) values, in the same order
    int64_t n;
    bool to_bf16;
};

// Launches on `stream`; returns the first CUDA error (from configuration or launch), never synchronizes.
cudaError_t fp8_widen(const Fp8WidenParams &params, cudaStream_t stream);
