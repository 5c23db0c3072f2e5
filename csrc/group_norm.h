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
    // (batch, channels) in x's dtype, added to x before it is normalised (a ResNet block's time embedding), or null;
    // image i's row starts add_stride elements after image i - 1's (a column slice of a wider matrix, or 0: one row
    // for every image), its channels dense
    const void *__restrict__ channel_add;
    int64_t add_stride;
    // workspaces: batch * groups * splits * 3 floats, each piece's (count, mean, M2), or in the resident kernel its
    // (sum, squares); batch * channels * 2 floats, y = x * scale + shift's coefficients, or in the resident kernel
    // each (image, group)'s (mean, rstd)
    float *__restrict__ partials;
    float *__restrict__ scale_shift;
    int64_t pixels;
    int batch, channels, groups;
    int splits;     // pieces each (image, group) is reduced in, in parallel (group_norm_plan)
    bool resident;  // NHWC in one cooperative launch (group_norm_plan)
    float eps;
    bool channels_last, silu;
    GnDtype dtype, param_dtype;
};

// How the current device runs a norm: the pieces each (image, group)'s statistics are reduced in (enough blocks to
// fill the GPU), and whether NHWC runs as one cooperative launch with every block resident (the device supports
// it and the batch fits).
struct GroupNormPlan {
    int splits;
    bool resident;
};
GroupNormPlan group_norm_plan(int64_t pixels, int batch, int channels, int groups, bool channels_last, GnDtype dtype,
                             bool silu);

// Launches the kernel(s) on `stream`; returns the first CUDA error (from configuration or launch), never
// synchronizes.
cudaError_t group_norm_fwd(const GroupNormParams &params, cudaStream_t stream);
