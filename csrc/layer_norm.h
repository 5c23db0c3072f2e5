// LayerNorm over the last dimension, optionally of a sum: the plain-data boundary between the torch binding and the
// kernel. No torch headers here (style.md P6).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

enum class LnDtype : int { kHalf = 0, kBFloat16 = 1, kFloat = 2 };

struct LayerNormParams {
    // x, residual, sum, y: `rows` dense rows of `width` values of one dtype, 16-byte aligned, width a multiple of the
    // values in 16 bytes and at most kLayerNormMaxWidth16 bytes' worth; weight and bias: `width` values in that
    // dtype, or null. residual and sum are both null or both set.
    const void *__restrict__ x;
    const void *__restrict__ residual;
    void *__restrict__ sum;
    void *__restrict__ y;
    const void *__restrict__ weight;
    const void *__restrict__ bias;
    int64_t rows;
    int width;
    float eps;
    LnDtype dtype;
};

// The widest row in 16-byte vectors: 16 per lane of the warp that owns the row (2048 float32, 4096 float16 values).
constexpr int kLayerNormMaxVectors = 16 * 32;

// s = x + residual (rounded to the dtype, written to `sum`) when residual is set, else s = x; then
// y = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias over each row. Launches on `stream`; returns the first
// CUDA error (from configuration or launch), never synchronizes.
cudaError_t layer_norm_fwd(const LayerNormParams &params, cudaStream_t stream);
