// GEGLU's gate: the plain-data boundary between the torch binding and the kernel. No torch headers here (style.md P6).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

enum class GegluDtype : int { kHalf = 0, kBFloat16 = 1, kFloat = 2 };

struct GegluParams {
    // x: rows of 2 * width values, the projection's output [hidden | gate], each row at x + row * row_stride;
    // y: rows of width values, dense. 16-byte aligned; width and row_stride multiples of the values in 16 bytes.
    const void *__restrict__ x;
    void *__restrict__ y;
    int64_t rows, width, row_stride;
    GegluDtype dtype;
};

// y = hidden * GELU(gate), GELU in its exact (erf) form. Launches on `stream`; returns the first CUDA error (from
// configuration or launch), never synchronizes.
cudaError_t geglu_fwd(const GegluParams &params, cudaStream_t stream);
