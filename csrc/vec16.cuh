// 16 bytes of float16, bfloat16 or float32 as floats, for the elementwise kernels (group_norm.cu, geglu.cu).
// No torch headers here (style.md P6).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace sdrun {

// Vec<T>::load / store: kN values of T at a 16-byte aligned address, as floats (stores round to nearest).
template <typename T> struct Vec;
template <> struct Vec<__half> {
    static constexpr int kN = 8;
    __device__ static void load(const void *p, float (&v)[kN]) {
        const uint4 raw = *static_cast<const uint4 *>(p);
        const auto *h = reinterpret_cast<const __half2 *>(&raw);
        for (int i = 0; i < 4; ++i) { const float2 f = __half22float2(h[i]); v[2 * i] = f.x; v[2 * i + 1] = f.y; }
    }
    __device__ static void store(void *p, const float (&v)[kN]) {
        uint4 raw;
        auto *h = reinterpret_cast<__half2 *>(&raw);
        for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
        *static_cast<uint4 *>(p) = raw;
    }
};
template <> struct Vec<__nv_bfloat16> {
    static constexpr int kN = 8;
    __device__ static void load(const void *p, float (&v)[kN]) {
        const uint4 raw = *static_cast<const uint4 *>(p);
        const auto *h = reinterpret_cast<const __nv_bfloat162 *>(&raw);
        for (int i = 0; i < 4; ++i) { const float2 f = __bfloat1622float2(h[i]); v[2 * i] = f.x; v[2 * i + 1] = f.y; }
    }
    __device__ static void store(void *p, const float (&v)[kN]) {
        uint4 raw;
        auto *h = reinterpret_cast<__nv_bfloat162 *>(&raw);
        for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
        *static_cast<uint4 *>(p) = raw;
    }
};
template <> struct Vec<float> {
    static constexpr int kN = 4;
    __device__ static void load(const void *p, float (&v)[kN]) {
        const float4 f = *static_cast<const float4 *>(p);
        v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
    }
    __device__ static void store(void *p, const float (&v)[kN]) {
        *static_cast<float4 *>(p) = make_float4(v[0], v[1], v[2], v[3]);
    }
};

}  // namespace sdrun
