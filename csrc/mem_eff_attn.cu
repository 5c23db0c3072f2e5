// Launchers for the sdrun attention kernel: the tile shape per head-dim bucket and dtype, one explicit
// instantiation each. No torch headers: builds with plain nvcc, e.g.
//   nvcc -std=c++17 -O3 -DSDRUN_SM90A -gencode arch=compute_90a,code=sm_90a -Xptxas -v -c csrc/mem_eff_attn.cu
// Tuning builds (-DSDRUN_TUNE) add alternative shapes that params.variant selects (bench/attention.py --variants):
// 1-8 for run_sm80, 11-13 for run_sm90.
#include "mem_eff_attn.h"
#include "mem_eff_attn_kernel.cuh"
#include "mem_eff_attn_sm90.cuh"
#include "static_switch.h"
#ifdef SDRUN_SM90A
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#endif

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

template <typename Kernel> cudaError_t prepare(Kernel kernel, int smem) {  // above 48 KB a kernel must opt in
    if (smem <= 48 * 1024) return cudaSuccess;
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
}
template <typename Tr> cudaError_t prepare() { return prepare(mem_eff_attn_kernel<Tr>, Tr::kSmemBytes); }

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

// Hopper (sm_90a): Sm90Traits<elem, head dim, kBlockN keys, compute warpgroups (64 query rows each), K/V buffers
// (0 = as many as fit), ping-pong>. Head dims with a wgmma path: SD's 40, 80 (SD 1.x) and 64 (SD 2.x, SDXL); the
// rest, and key sequences of one 128-key tile (cross-attention on 77 text tokens: the portable kernel was 1.3x
// faster there), take run_sm80. Measured on an H200 (torch 2.11, CUDA 13.0, 2026-11-22) with bench/attention.py,
// TFLOP/s at (2,8,4096,4096,40) / (2,5,4096,4096,64) / (2,8,16384,16384,40); cuDNN 255 / 330 / 289, run_sm80 214 / 222 / 241:
//   3 warpgroups x 128 keys (the default for d <= 64): 273 / 377 / 337.   2 warpgroups: 246 / 318 / 284;
//   2 x 192 keys: 259 / 330 / 295; 3 x 128 without ping-pong: 240 / 333 / 279 (3 warpgroups x 192 keys would need
//   more than their 160 registers). d = 80 keeps 2 warpgroups (its 128 padded output columns): 210 at (2,8,1024,1024,80).
//   Steps that got here, at (2,8,16384,16384,40): no warp specialisation, cp.async, one __syncthreads per tile 206;
//   a cp.async loader warpgroup with mbarriers 245 (loads alone, with no math, capped it at 350); TMA with 128-byte
//   swizzled tiles 293 (the unswizzled "interleaved" layout needs 16-byte TMA boxes); 3 compute warpgroups 337.
constexpr bool sm90_head_dim(int bucket) { return bucket == 40 || bucket == 64 || bucket == 80; }
template <typename T, int kHeadDim> using Sm90Shape = Sm90Traits<T, kHeadDim, 128, (kHeadDim <= 64 ? 3 : 2)>;

#ifdef SDRUN_SM90A
// cuTensorMapEncodeTiled, a driver function, found through the runtime: no -lcuda at link time.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
    static const auto fn = [] {
        void *ptr = nullptr;
        cudaDriverEntryPointQueryResult found;
#if CUDART_VERSION >= 12050
        cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &found);
#else
        cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &ptr, cudaEnableDefault, &found);
#endif
        return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(
            err == cudaSuccess && found == cudaDriverEntryPointSuccess ? ptr : nullptr);
    }();
    return fn;
}

// The (head_dim, seqlen, heads, batch) view of q, k or v (strides in elements) with boxes of 64 columns x
// box_rows rows, 128-byte swizzled; columns past head_dim and rows past seqlen read as zeros.
template <typename T>
bool encode_tensor_map(CUtensorMap *map, const void *base, int head_dim, int seqlen, int heads, int batch,
                       int64_t row_stride, int64_t head_stride, int64_t batch_stride, int box_rows) {
    const auto encode = tensor_map_encoder();
    if (encode == nullptr) return false;
    cuuint64_t dims[4] = {cuuint64_t(head_dim), cuuint64_t(seqlen), cuuint64_t(heads), cuuint64_t(batch)};
    cuuint64_t strides[3] = {cuuint64_t(row_stride) * sizeof(T), cuuint64_t(head_stride) * sizeof(T),
                             cuuint64_t(batch_stride) * sizeof(T)};  // bytes, dimensions 1..3
    cuuint32_t box[4] = {64, cuuint32_t(box_rows), 1, 1}, elem_strides[4] = {1, 1, 1, 1};
    const auto dtype = std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    return encode(map, dtype, 4, const_cast<void *>(base), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                  CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                  CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// How many of the last tiles run split along the keys (mem_eff_attn_sm90.cuh): the last wave's, when their split
// CTAs (1 / kComputeWGs of a tile's work each) fill few enough rounds of the SMs (one CTA each) to finish sooner.
// kSplitCost: a split CTA's time over 1 / kComputeWGs of a whole one's. A split CTA's K/V traffic per FLOP is
// kComputeWGs times higher, and each warpgroup has only kStages / kComputeWGs buffers, so less prefetch. Measured
// on an H200 (2026-12-02, bench/attention.py --variants 0,10,14: every tile split / none), TFLOP/s:
//   d=40 (2,8,16384,16384): 166 / 305, so 1.8;  d=64 (2,5,9216,9216): 411 / 405, so 1.0;
//   d=80 (2,8,1024,1024): 118 / 166, so 1.4.
// With the tail split (variant 0) against none: (2,10,4096,4096,64) 380 / 330, (2,5,4096,4096,64) 341 / 309,
// (2,5,9216,9216,64) 436 / 405; d=40 at (2,8,4096,4096), two rounds at a cost of 1.25, lost: 210 / 234.
template <int kHeadDim> constexpr float kSplitCost = kHeadDim <= 40 ? 1.8f : kHeadDim <= 64 ? 1.0f : 1.4f;
template <typename Tr> int64_t sm90_split_tiles(const MemEffAttnParams &p, int64_t tiles) {
    if (p.variant == 10) return tiles;
    const int n_blocks = (p.seqlen_k + Tr::kBlockN - 1) / Tr::kBlockN;
    if (p.variant == 14 || n_blocks < 2 * Tr::kComputeWGs) return 0;  // too few key tiles to share out
    const int64_t tail = tiles % p.num_sms, rounds = (tail * Tr::kComputeWGs + p.num_sms - 1) / p.num_sms;
    return kSplitCost<Tr::kHeadDim> * float(rounds) < float(Tr::kComputeWGs) ? tail : 0;
}

template <typename Tr> cudaError_t launch_sm90(const MemEffAttnParams &p, cudaStream_t stream) {
    using T = typename Tr::elem;
    Sm90TensorMaps tm;
    if (!encode_tensor_map<T>(&tm.q, p.q, p.head_dim, p.seqlen_q, p.heads, p.batch, p.q_row_stride, p.q_head_stride,
                              p.q_batch_stride, Tr::kBlockM) ||
        !encode_tensor_map<T>(&tm.k, p.k, p.head_dim, p.seqlen_k, p.heads, p.batch, p.k_row_stride, p.k_head_stride,
                              p.k_batch_stride, Tr::kBlockN) ||
        !encode_tensor_map<T>(&tm.v, p.v, p.head_dim, p.seqlen_k, p.heads, p.batch, p.v_row_stride, p.v_head_stride,
                              p.v_batch_stride, Tr::kBlockN))
        return cudaErrorNotSupported;  // the caller takes the portable kernel instead
    auto kernel = mem_eff_attn_sm90_kernel<Tr>;
    if (Tr::kSmemBytes > p.max_smem_per_block) return cudaErrorInvalidConfiguration;
    if (cudaError_t err = prepare(kernel, Tr::kSmemBytes); err != cudaSuccess) return err;
    const int64_t tiles = int64_t((p.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM) * p.heads * p.batch;
    const int64_t split_from = tiles - sm90_split_tiles<Tr>(p, tiles);
    const int64_t ctas = split_from + (tiles - split_from) * Tr::kComputeWGs;
    if (ctas > INT32_MAX) return cudaErrorInvalidConfiguration;
    kernel<<<unsigned(ctas), Tr::kThreads, Tr::kSmemBytes, stream>>>(p, tm, int(split_from));
    return cudaGetLastError();
}

template <typename T, int kHeadDim> cudaError_t run_sm90(const MemEffAttnParams &p, cudaStream_t stream) {
#ifdef SDRUN_TUNE
    switch (p.variant) {
    case 11: return launch_sm90<Sm90Traits<T, kHeadDim, 128, 2>>(p, stream);
    case 12: if constexpr (kHeadDim <= 64) return launch_sm90<Sm90Traits<T, kHeadDim, 192, 2>>(p, stream); break;
    case 13: if constexpr (kHeadDim <= 64) return launch_sm90<Sm90Traits<T, kHeadDim, 128, 3, 0, false>>(p, stream); break;
    default: break;
    }
#endif
    return launch_sm90<Sm90Shape<T, kHeadDim>>(p, stream);
}

#endif  // SDRUN_SM90A

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

// SDRUN_SM90A: the build includes the sm_90a target (setup.py, or the just-in-time build on a Hopper GPU), so
// the wgmma kernel has real code for compute capability 9.0. variant 9 forces the portable mma.sync path there
// (the tests and bench/attention.py compare both on one GPU). A layout TMA cannot describe (cuTensorMapEncodeTiled
// refuses it) also takes the portable path.
cudaError_t mem_eff_attn_fwd(const MemEffAttnParams &params, cudaStream_t stream) {
    return FP16_SWITCH(params.is_bf16, [&] {
        return HEADDIM_SWITCH(params.head_dim, [&] {
#ifdef SDRUN_SM90A
            if constexpr (sdrun::sm90_head_dim(kHeadDim))
                if (params.sm == 90 && params.variant != 9 && params.seqlen_k > 128)
                    if (cudaError_t err = sdrun::run_sm90<elem_t, kHeadDim>(params, stream); err != cudaErrorNotSupported)
                        return err;
#endif
            return sdrun::run_sm80<elem_t, kHeadDim>(params, stream);
        });
    });
}
