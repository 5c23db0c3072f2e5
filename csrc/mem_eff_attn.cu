// Launchers for the sdrun attention kernel: the tile shape per head-dim bucket and dtype, one explicit
// instantiation each. No torch headers: builds with plain nvcc, e.g.
//   nvcc -std=c++17 -O3 -gencode arch=compute_90,code=sm_90 -Xptxas -v -c csrc/mem_eff_attn.cu
// Tuning builds (-DSDRUN_TUNE) add alternative shapes that params.variant selects (bench/attention.py --variants).
#include "mem_eff_attn.h"
#include "mem_eff_attn_kernel.cuh"
#include "static_switch.h"

namespace sdrun {

// Tile shapes: Traits<elem, head-dim bucket, kBlockM query rows, kBlockN keys, min CTAs per SM, K/V stages,
// 16-row tiles per warp>. Chosen on an H200 (torch 2.11, CUDA 13.0) with `SDRUN_TUNE=1
// bench/attention.py --variants ...` (bench/gpu.sh); TFLOP/s at (2,8,4096,4096,d) / (2,8,16384,16384,d)
// unless noted. Every default fits the 99 KB of shared memory per block of sm_86/89/120.
//   d=40: 128x64, 4 warps x 32 rows: 213 / 239. Losers: 128x128 same warps 208 / 231; 8 warps x 16 rows 177 / 202
//         (182 / 204 with 1 K/V stage and FADD row sums); 64x64 x 16 rows 160 / 189; 256x64 x 32 rows 194 / 210;
//         exp2 on packed f16x2 (half the MUFU work) 209 / 232; softmax in two 32-key parts 202 / 222.
//   d=64 (2,5,4096,4096): 64x64, 4 warps x 16 rows, 3 CTAs/SM: 232-235. Losers: the same at 2 CTAs/SM 188;
//         128x64 x 16 rows 201; x 32 rows 184; 64x128 165-201.
//   d=80 (2,8,1024,1024): 128x64, 4 warps x 32 rows: 150-156; 8 warps x 16 rows 146; 64x64 143; 128x128 111.
//   d=160 (2,8,256,256): 64x32, 4 warps x 16 rows: 27-35; 64x64 spills (255 registers): 25.
template <typename T, int kHeadDim> struct DefaultShape {
    using type = std::conditional_t<
        (kHeadDim == 64), Traits<T, kHeadDim, 64, 64, 3, 2, 1>,
        std::conditional_t<(kHeadDim <= 80), Traits<T, kHeadDim, 128, 64, 1, 2, 2>,
        std::conditional_t<(kHeadDim <= 96), Traits<T, kHeadDim, 128, 64, 1, 2, 1>,
        std::conditional_t<(kHeadDim <= 128), Traits<T, kHeadDim, 128, 32, 1, 2, 1>,  // 128x64x2 stages > 99 KB
        std::conditional_t<(kHeadDim <= 192), Traits<T, kHeadDim, 64, 32, 1, 2, 1>,
                           Traits<T, kHeadDim, 64, 32, 1, 1, 1>>>>>>;  // d=256: 2 stages > 99 KB
};
// Long sequences, d <= 40: capping registers at 168 fits 3 CTAs per SM instead of 2 (12 warps, not 8): 244-252
// instead of 234-239 TFLOP/s at (2,8,16384..32400,40), but the bigger waves leave a worse tail on short grids
// (184-195 instead of 213 at (2,8,4096,4096,40): 512 CTAs in 396 slots); run_sm80 weighs both.
template <typename T, int kHeadDim> using LongShape = Traits<T, kHeadDim, 128, 64, 3, 2, 2>;
constexpr float kLongShapeSpeedup = 1.15f;  // per-wave speed of LongShape over the default, from the numbers above

// GPUs with 64 KB of shared memory per block (sm_75, fp16 only) take this when the default does not fit.
template <typename T, int kHeadDim> using SmallShape = Traits<T, kHeadDim, 64, 32, 1, 1>;

template <typename Tr> cudaError_t prepare() {  // above 48 KB a kernel must opt in to dynamic shared memory
    if (Tr::kSmemBytes <= 48 * 1024) return cudaSuccess;
    return cudaFuncSetAttribute(mem_eff_attn_kernel<Tr>, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
}

// Fraction of the CTA slots the last wave leaves busy, over all waves: 1 = no tail.
template <typename Tr> float wave_efficiency(const MemEffAttnParams &p) {
    static int per_sm = 0;  // CTAs of this shape one SM holds (registers, shared memory), asked once
    if (per_sm == 0 && (prepare<Tr>() != cudaSuccess ||
                        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, mem_eff_attn_kernel<Tr>, Tr::kThreads,
                                                                      Tr::kSmemBytes) != cudaSuccess || per_sm < 1))
        per_sm = 1;
    const int64_t ctas = int64_t((p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM) * p.heads * p.batch;
    const int64_t slots = int64_t(per_sm) * p.num_sms, waves = (ctas + slots - 1) / slots;
    return float(ctas) / float(waves * slots);
}

template <typename Tr> cudaError_t launch(const MemEffAttnParams &p, cudaStream_t stream) {
    auto kernel = mem_eff_attn_kernel<Tr>;
    constexpr int smem = Tr::kSmemBytes;
    if (smem > p.max_smem_per_block) return cudaErrorInvalidConfiguration;  // the binding checks this first
    if (cudaError_t err = prepare<Tr>(); err != cudaSuccess) return err;
    dim3 grid((p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM, p.heads, p.batch);
    kernel<<<grid, Tr::kThreads, smem, stream>>>(p);
    return cudaGetLastError();
}

template <typename T, int kHeadDim> cudaError_t run_sm80(const MemEffAttnParams &p, cudaStream_t stream) {
#ifdef SDRUN_TUNE
    if constexpr (std::is_same_v<T, __half> && (kHeadDim == 40 || kHeadDim == 64 || kHeadDim == 80 || kHeadDim == 160)) {
        switch (p.variant) {
        case 1: return launch<Traits<T, kHeadDim, 128, 64, 1, 2, 2>>(p, stream);  // 4 warps x 32 rows
        case 2: return launch<Traits<T, kHeadDim, 128, 64, 3, 2, 2>>(p, stream);
        case 3: return launch<Traits<T, kHeadDim, 64, 64, 3, 2, 1>>(p, stream);   // 4 warps x 16 rows
        case 4: return launch<Traits<T, kHeadDim, 64, 64, 4, 2, 1>>(p, stream);
        case 5: return launch<Traits<T, kHeadDim, 128, 64, 2, 2, 2>>(p, stream);
        case 6: return launch<Traits<T, kHeadDim, 128, 32, 3, 2, 2>>(p, stream);
        case 8: return launch<Traits<T, kHeadDim, 64, 128, 3, 2, 1>>(p, stream);
        default: break;
        }
    }
#endif
    using Tr = typename DefaultShape<T, kHeadDim>::type;
    if constexpr (kHeadDim <= 40)
        if (kLongShapeSpeedup * wave_efficiency<LongShape<T, kHeadDim>>(p) > wave_efficiency<Tr>(p))
            return launch<LongShape<T, kHeadDim>>(p, stream);
    if constexpr (std::is_same_v<T, __half>)
        if (Tr::kSmemBytes > p.max_smem_per_block) return launch<SmallShape<T, kHeadDim>>(p, stream);
    return launch<Tr>(p, stream);
}

}  // namespace sdrun

int mem_eff_attn_bucket(int head_dim) {
    if (head_dim <= 0 || head_dim % 8 != 0 || head_dim > 256) return 0;
    return HEADDIM_SWITCH(head_dim, [&] { return kHeadDim; });
}

int mem_eff_attn_smem_bytes(int head_dim, bool is_bf16, int max_smem) {
    return FP16_SWITCH(is_bf16, [&] {
        return HEADDIM_SWITCH(head_dim, [&] {
            constexpr int dflt = sdrun::DefaultShape<elem_t, kHeadDim>::type::kSmemBytes;
            return (dflt <= max_smem || is_bf16) ? dflt : sdrun::SmallShape<elem_t, kHeadDim>::kSmemBytes;
        });
    });
}

cudaError_t mem_eff_attn_fwd(const MemEffAttnParams &params, cudaStream_t stream) {
    // A Hopper path (wgmma + TMA) slots in here, beside this one:
    //   if (params.sm >= 90 && sm90_supports(params)) return run_sm90(params, stream);
    return FP16_SWITCH(params.is_bf16, [&] {
        return HEADDIM_SWITCH(params.head_dim, [&] { return sdrun::run_sm80<elem_t, kHeadDim>(params, stream); });
    });
}
