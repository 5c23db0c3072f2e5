// LayerNorm over the last dimension, with the residual addition before it in the same pass: a transformer block's
// `h = attn(norm(h)) + h; norm2(h)` reads the attention's output and h once, and writes h and norm2(h) (PyTorch:
// one pass to add, writing h, and one to normalise, reading it back).
//
// One warp per row; each lane keeps its share of the row in registers (up to kVecs 16-byte vectors), so the row is
// read once: the sum (rounded to the dtype, as PyTorch's addition rounds it), then the mean, then the variance as
// the mean of squared deviations (two passes over registers: no cancellation), then the output. Statistics in
// float32.
#include "layer_norm.h"
#include "vec16.cuh"

namespace {

using sdrun::Vec;
constexpr int kWarps = 4;

template <typename T> __device__ __forceinline__ float rounded(float x);
template <> __device__ __forceinline__ float rounded<__half>(float x) { return __half2float(__float2half_rn(x)); }
template <> __device__ __forceinline__ float rounded<__nv_bfloat16>(float x) {
    return __bfloat162float(__float2bfloat16_rn(x));
}
template <> __device__ __forceinline__ float rounded<float>(float x) { return x; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}

template <typename T, int kVecs, bool kResidual>
__global__ void __launch_bounds__(32 * kWarps) layer_norm(const LayerNormParams p) {
    using V = Vec<T>;
    constexpr int kN = V::kN;
    const int lane = threadIdx.x % 32;
    const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
    if (row >= p.rows) return;
    const int vectors = p.width / kN;
    const int64_t start = row * p.width;
    float v[kVecs][kN];
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
        const int column = (lane + 32 * i) * kN;
        if (lane + 32 * i >= vectors) continue;
        V::load(static_cast<const T *>(p.x) + start + column, v[i]);
        if constexpr (kResidual) {
            float r[kN];
            V::load(static_cast<const T *>(p.residual) + start + column, r);
#pragma unroll
            for (int k = 0; k < kN; ++k) v[i][k] = rounded<T>(v[i][k] + r[k]);
            V::store(static_cast<T *>(p.sum) + start + column, v[i]);
        }
#pragma unroll
        for (int k = 0; k < kN; ++k) total += v[i][k];
    }
    const float mean = warp_sum(total) / p.width;
    float squares = 0.f;
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
        if (lane + 32 * i >= vectors) continue;
#pragma unroll
        for (int k = 0; k < kN; ++k) squares += (v[i][k] - mean) * (v[i][k] - mean);
    }
    const float rstd = rsqrtf(warp_sum(squares) / p.width + p.eps);
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
        const int column = (lane + 32 * i) * kN;
        if (lane + 32 * i >= vectors) continue;
        float w[kN], b[kN];
        if (p.weight) V::load(static_cast<const T *>(p.weight) + column, w);
        if (p.bias) V::load(static_cast<const T *>(p.bias) + column, b);
#pragma unroll
        for (int k = 0; k < kN; ++k)
            v[i][k] = (v[i][k] - mean) * rstd * (p.weight ? w[k] : 1.f) + (p.bias ? b[k] : 0.f);
        V::store(static_cast<T *>(p.y) + start + column, v[i]);
    }
}

template <typename T, int kVecs>
cudaError_t launch(const LayerNormParams &p, cudaStream_t stream) {
    const int64_t blocks = (p.rows + kWarps - 1) / kWarps;
    if (p.residual)
        layer_norm<T, kVecs, true><<<blocks, 32 * kWarps, 0, stream>>>(p);
    else
        layer_norm<T, kVecs, false><<<blocks, 32 * kWarps, 0, stream>>>(p);
    return cudaGetLastError();
}

template <typename T>
cudaError_t launch(const LayerNormParams &p, cudaStream_t stream) {
    const int per_lane = (p.width / Vec<T>::kN + 31) / 32;  // the vectors each lane holds, rounded up to a power of 2
    if (per_lane <= 1) return launch<T, 1>(p, stream);
    if (per_lane <= 2) return launch<T, 2>(p, stream);
    if (per_lane <= 4) return launch<T, 4>(p, stream);
    if (per_lane <= 8) return launch<T, 8>(p, stream);
    return launch<T, 16>(p, stream);
}

}  // namespace

cudaError_t layer_norm_fwd(const LayerNormParams &params, cudaStream_t stream) {
    if (params.rows == 0) return cudaSuccess;
    switch (params.dtype) {
        case LnDtype::kHalf: return launch<__half>(params, stream);
        case LnDtype::kBFloat16: return launch<__nv_bfloat16>(params, stream);
        default: return launch<float>(params, stream);
    }
}
