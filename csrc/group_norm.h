// GroupNorm, optionally fused with the SiLU that follows it and with a per-channel addition before it: the
// plain-data boundary between the torch binding and the kernels. No torch headers here (style.md P6).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

enum class GnDtype : int { kHalf = 0, kBFloat16 = 1, kFloat = 2 };

struct GroupNormParams {
    // x and y: (batch, channels, pixels) in NCHW order (pixel fastest) or, when channels_last, in NHWC order
    // (channel fastest), both dense, 16-byte aligned, same layout. NCHW needs pixels, NHWC channels, to be a
    // multiple of the elements in 16 bytes (the binding checks; the kernels read 16-byte vectors).
    const void *__restrict__ x;
    void *__restrict__ y;
    const void *__restrict__ weight;   // (channels,) in param_dtype, or null for 1
    const void *__restrict__ bias;     // (channels,) in param_dtype, or null for 0
    // (batch, channels) in x's dtype, added to x before it is normalised (a ResNet block's time embedding), or null
    const void *__restrict__ channel_add;
    float *__restrict__ partials;      // workspace: batch * groups * splits * 3 floats (count, mean, M2)
    float *__restrict__ scale_shift;   // workspace: batch * channels * 2 floats (y = x * scale + shift)
    int64_t pixels;
    int batch, channels, groups;
    int splits;  // pieces each (image, group) is reduced in, in parallel (group_norm_splits)
    float eps;
    bool channels_last, silu;
    GnDtype dtype, param_dtype;
};

// How many pieces the statistics of each (image, group) are reduced in: enough blocks to fill `num_sms`.
int group_norm_splits(int64_t pixels, int batch, int channels, int groups, bool channels_last, int num_sms);

// Launches the three kernels on `stream`; returns the first CUDA error (from configuration or launch), never
// synchronizes.
cudaError_t group_norm_fwd(const GroupNormParams &params, cudaStream_t stream);
