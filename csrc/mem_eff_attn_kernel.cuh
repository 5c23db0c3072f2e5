// sdrun memory-efficient attention, forward only: O = softmax(scale * Q K^T) V, exact, O(N) memory.
//
// Algorithm (FlashAttention-2, Dao 2023). One CTA owns kBlockM query rows of one (batch, head); each warp owns
// 16 * kMTiles of them. The CTA walks the keys in tiles of kBlockN: S = Q K^T on tensor cores (mma.sync m16n8k16, fp32
// accumulate), online softmax in registers (running row max m and row sum l; when m grows, the partial O and l are
// rescaled by exp2(m_old - m_new)), then O += P V with P re-used straight from the S accumulators as the A operand.
// The N x N matrix never exists. K/V tiles are loaded with cp.async into padded shared memory, two stages deep:
// tile j+1 loads while tile j computes (one __syncthreads per tile). When head_dim % 16 == 8 (SD's 40), a ones
// column in V's padding makes the P V mma produce the softmax row sums too, saving the FP32 adds.
//
// Edges: head_dim is a multiple of 8; the Q K^T reduction is padded to kHeadDimK (multiple of 16) with zero
// columns (cp.async zero-fill), P V computes only kHeadDim/8 output tiles. Key tiles are visited last to first,
// so the only partial tile (keys >= seqlen_k, masked to -inf) comes first and every row max is finite from the
// start. Query rows >= seqlen_q are computed on zeros and never stored.
//
// Types: fp16 and bf16 in, fp32 accumulate. sm_75 has no m16n8k16 (two m16n8k8 instead), no cp.async (plain
// loads) and no bf16 mma (the host refuses bf16 there).
//
// Build alone: nvcc -std=c++17 -O3 -gencode arch=compute_90,code=sm_90 -Xptxas -v -c csrc/mem_eff_attn.cu
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "mem_eff_attn.h"

namespace sdrun {

// ---------------------------------------------------------------- PTX wrappers
__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; `valid == false` writes 16 zero bytes instead (rows or columns out of range).
__device__ __forceinline__ void cp_async_16(void *dst, const void *src, bool valid) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
#else
    *reinterpret_cast<uint4 *>(dst) = valid ? *reinterpret_cast<const uint4 *>(src) : make_uint4(0, 0, 0, 0);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group 0;\n" ::);
#endif
}

// Four 8x8 b16 matrices from shared memory; lane i gives the address of row i%8 of matrix i/8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
}

// d += A(16x16, row) * B(16x8, col), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (std::is_same_v<T, __half>) {
#if __CUDA_ARCH__ >= 800
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else  // sm_75: k=16 as two k=8 halves
        asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(b0));
        asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[2]), "r"(a[3]), "r"(b1));
#endif
    } else {
#if __CUDA_ARCH__ >= 800
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
        __trap();  // unreachable: the binding refuses bf16 below sm_80
#endif
    }
}

__device__ __forceinline__ float exp2_approx(float x) {  // MUFU.EX2; exp2(-inf) = 0
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi) {  // lo -> lower column
    if constexpr (std::is_same_v<T, __half>) {
        __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&h);
    } else {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&h);
    }
}

__device__ __forceinline__ float quad_max(float x) {  // the 4 lanes of an mma row group hold one row
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---------------------------------------------------------------- tile shapes
template <typename T, int kHeadDim_, int kBlockM_, int kBlockN_, int kMinBlocks_ = 1, int kStages_ = 2, int kMTiles_ = 1>
struct Traits {
    using elem = T;
    static constexpr int kHeadDim = kHeadDim_;                   // output columns computed, multiple of 8
    static constexpr int kHeadDimK = (kHeadDim + 15) / 16 * 16;  // Q.K^T reduction length, multiple of mma k = 16
    static constexpr int kBlockM = kBlockM_, kBlockN = kBlockN_;
    static constexpr int kMTiles = kMTiles_;  // 16-row tiles per warp: 2 halves the K/V ldmatrix per mma
    static constexpr int kWarpRows = 16 * kMTiles, kWarps = kBlockM / kWarpRows, kThreads = 32 * kWarps;
    static constexpr int kMinBlocks = kMinBlocks_;  // CTAs per SM the register budget must allow (__launch_bounds__)
    static constexpr int kStages = kStages_;  // K/V buffers: 2 = tile j+1 loads while tile j computes
    // Row sums on the tensor cores: when kHeadDim % 16 == 8 (SD's 40) the last V ldmatrix reads 8 padding columns
    // anyway; a column of ones there makes P V also produce sum(P), with no FADDs at all.
    static constexpr bool kRowSumMma = kHeadDim % 16 == 8;
    static constexpr int kStride = kHeadDimK + 8;  // smem row pitch: an odd number of 16 B units -> ldmatrix conflict-free
    static constexpr int kChunks = kHeadDimK / 8;  // 16-byte chunks per smem row
    static constexpr int kSmemBytes = (kBlockM + 2 * kStages * kBlockN) * kStride * int(sizeof(T));  // Q, K, V tiles
    static_assert(kBlockM % kWarpRows == 0 && kBlockN % 16 == 0 && kHeadDim % 8 == 0, "tile shape");
};

// Copies rows [0, kRows) of a tile (row r at gmem + r * row_stride) into smem; rows >= nrows and columns
// >= head_dim become zeros.
template <typename Tr, int kRows, bool kKeepPad = false>  // kKeepPad: leave columns >= head_dim untouched
__device__ __forceinline__ void load_tile(typename Tr::elem *smem, const typename Tr::elem *gmem, int64_t row_stride,
                                          int nrows, int head_dim) {
    constexpr int kTotal = kRows * Tr::kChunks;
#pragma unroll
    for (int it = 0; it < (kTotal + Tr::kThreads - 1) / Tr::kThreads; ++it) {
        const int i = it * Tr::kThreads + threadIdx.x;
        if (kTotal % Tr::kThreads == 0 || i < kTotal) {
            const int r = i / Tr::kChunks, c = i % Tr::kChunks;
            const bool ok = r < nrows && c * 8 < head_dim;
            if (kKeepPad && c * 8 >= head_dim) continue;
            cp_async_16(smem + r * Tr::kStride + c * 8, ok ? gmem + r * row_stride + c * 8 : gmem, ok);
        }
    }
}

// ---------------------------------------------------------------- the kernel
// grid = (ceil(seqlen_q / kBlockM), heads, batch): neighbouring CTAs share K/V of one head, which stays in L2.
template <typename Tr>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks) mem_eff_attn_kernel(const MemEffAttnParams p) {
    using T = typename Tr::elem;
    constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kStride = Tr::kStride;
    constexpr int kOutTiles = Tr::kHeadDim / 8;  // 8-wide output column tiles per thread row
    constexpr float kInf = __builtin_huge_valf();

    extern __shared__ __align__(16) unsigned char smem[];
    T *sQ = reinterpret_cast<T *>(smem);  // kBlockM x kStride
    T *sK = sQ + kBlockM * kStride;       // kStages x kBlockN x kStride
    T *sV = sK + Tr::kStages * kBlockN * kStride;  // kStages x kBlockN x kStride

    const int row0 = blockIdx.x * kBlockM, h = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;  // mma fragment: thread holds rows g, g+8 and columns 2t, 2t+1
    const T *q = static_cast<const T *>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + row0 * p.q_row_stride;
    const T *k = static_cast<const T *>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
    const T *v = static_cast<const T *>(p.v) + b * p.v_batch_stride + h * p.v_head_stride;
    const int n_blocks = (p.seqlen_k + kBlockN - 1) / kBlockN;
    const float sl2 = p.scale_log2;  // scale * log2(e), so exp(scale * x) = exp2(sl2 * x)

    if constexpr (Tr::kRowSumMma) {  // V's first padding column = 1, the rest 0, in every stage (loads skip it)
        for (int r = threadIdx.x; r < Tr::kStages * kBlockN; r += Tr::kThreads)
            *reinterpret_cast<uint4 *>(sV + r * kStride + Tr::kHeadDim) = make_uint4(pack2<T>(1.f, 0.f), 0, 0, 0);
    }
    // Key tiles are visited last to first (n = n_blocks - 1 - it): the partial one comes first.
    auto load_kv = [&](int it) {
        const int n = n_blocks - 1 - it, stage = it % Tr::kStages;
        load_tile<Tr, kBlockN>(sK + stage * kBlockN * kStride, k + int64_t(n) * kBlockN * p.k_row_stride,
                               p.k_row_stride, p.seqlen_k - n * kBlockN, p.head_dim);
        load_tile<Tr, kBlockN, Tr::kRowSumMma>(sV + stage * kBlockN * kStride, v + int64_t(n) * kBlockN * p.v_row_stride,
                                               p.v_row_stride, p.seqlen_k - n * kBlockN, p.head_dim);
    };
    load_tile<Tr, kBlockM>(sQ, q, p.q_row_stride, p.seqlen_q - row0, p.head_dim);
    load_kv(0);
    cp_async_commit();

    constexpr int kAccTiles = kOutTiles + (Tr::kRowSumMma ? 1 : 0);  // + the row-sum column tile
    constexpr int M = Tr::kMTiles;        // 16-row tiles this warp owns; index mi
    float o[M][kAccTiles][4] = {};        // unnormalised output, this thread's fragments of 16 x kHeadDim
    float m_run[M][2], l_run[M][2];       // running max of raw scores (rows g, g+8); running sum of exp2 terms
#pragma unroll
    for (int mi = 0; mi < M; ++mi) m_run[mi][0] = m_run[mi][1] = -kInf, l_run[mi][0] = l_run[mi][1] = 0.f;
    const T *sQw = sQ + warp * Tr::kWarpRows * kStride;  // this warp's query rows

    for (int it = 0; it < n_blocks; ++it) {
        cp_async_wait_all();
        __syncthreads();  // tile `it` landed; every warp is done with tile it - 1, so its buffer is free
        if (Tr::kStages == 2 && it + 1 < n_blocks) {
            load_kv(it + 1);  // lands while this tile computes
            cp_async_commit();
        }
        const T *sKt = sK + (it % Tr::kStages) * kBlockN * kStride;
        const T *sVt = sV + (it % Tr::kStages) * kBlockN * kStride;

        // S = Q K^T: s[mi][j] is the 16 x 8 tile of rows 16mi.., keys 8j .. 8j+7.
        float s[M][kBlockN / 8][4] = {};
#pragma unroll
        for (int ks = 0; ks < Tr::kHeadDimK / 16; ++ks) {
            uint32_t a[M][4];
#pragma unroll
            for (int mi = 0; mi < M; ++mi)
                ldmatrix_x4(a[mi], sQw + (mi * 16 + lane % 16) * kStride + ks * 16 + (lane / 16) * 8);
#pragma unroll
            for (int jp = 0; jp < kBlockN / 16; ++jp) {  // two key tiles per ldmatrix
                uint32_t kb[4];
                ldmatrix_x4(kb, sKt + (jp * 16 + (lane / 16) * 8 + lane % 8) * kStride + ks * 16 + (lane / 8 % 2) * 8);
#pragma unroll
                for (int mi = 0; mi < M; ++mi) {
                    mma_16816<T>(s[mi][2 * jp], a[mi], kb[0], kb[1]);
                    mma_16816<T>(s[mi][2 * jp + 1], a[mi], kb[2], kb[3]);
                }
            }
        }
        if (it == 0 && p.seqlen_k % kBlockN != 0) {  // mask keys past seqlen_k
            const int limit = p.seqlen_k - (n_blocks - 1) * kBlockN;
#pragma unroll
            for (int mi = 0; mi < M; ++mi)
#pragma unroll
                for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        if (8 * j + 2 * t + e % 2 >= limit) s[mi][j][e] = -kInf;
        }

        // Online softmax. r = 0: row g (accumulator elements 0, 1); r = 1: row g + 8 (elements 2, 3).
        // P ends up packed: pk[mi][j][r] holds row r's two probabilities of key tile j, the mma's A layout.
        uint32_t pk[M][kBlockN / 8][2];
#pragma unroll
        for (int mi = 0; mi < M; ++mi)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = m_run[mi][r];
#pragma unroll
                for (int j = 0; j < kBlockN / 8; ++j) mx = fmaxf(mx, fmaxf(s[mi][j][2 * r], s[mi][j][2 * r + 1]));
                mx = quad_max(mx);  // finite: the first tile visited holds a valid key
                const float mx_scaled = mx * sl2;
                const float corr = exp2_approx(m_run[mi][r] * sl2 - mx_scaled);  // 0 on the first tile
                m_run[mi][r] = mx;
                l_run[mi][r] *= corr;
#pragma unroll
                for (int d = 0; d < kAccTiles; ++d) o[mi][d][2 * r] *= corr, o[mi][d][2 * r + 1] *= corr;
#pragma unroll
                for (int j = 0; j < kBlockN / 8; ++j) {
                    const float p0 = exp2_approx(s[mi][j][2 * r] * sl2 - mx_scaled);  // one FFMA + one MUFU per score
                    const float p1 = exp2_approx(s[mi][j][2 * r + 1] * sl2 - mx_scaled);
                    if constexpr (!Tr::kRowSumMma) l_run[mi][r] += p0 + p1;
                    pk[mi][j][r] = pack2<T>(p0, p1);
                }
            }

        // O += P V: key tiles 2ks, 2ks+1 of P form one 16 x 16 A fragment; V is read transposed.
#pragma unroll
        for (int ks = 0; ks < kBlockN / 16; ++ks) {
            uint32_t a[M][4];
#pragma unroll
            for (int mi = 0; mi < M; ++mi)
                a[mi][0] = pk[mi][2 * ks][0], a[mi][1] = pk[mi][2 * ks][1], a[mi][2] = pk[mi][2 * ks + 1][0],
                a[mi][3] = pk[mi][2 * ks + 1][1];
            const T *vrow = sVt + (ks * 16 + (lane / 8 % 2) * 8 + lane % 8) * kStride;
#pragma unroll
            for (int dp = 0; dp < (kAccTiles + 1) / 2; ++dp) {  // two output column tiles per ldmatrix
                uint32_t vb[4];  // for an odd count the last pair reads 8 zero padding columns: 8 < kStride - kHeadDim
                ldmatrix_x4_trans(vb, vrow + dp * 16 + (lane / 16) * 8);
#pragma unroll
                for (int mi = 0; mi < M; ++mi) {
                    mma_16816<T>(o[mi][2 * dp], a[mi], vb[0], vb[1]);
                    if (2 * dp + 1 < kAccTiles) mma_16816<T>(o[mi][2 * dp + 1], a[mi], vb[2], vb[3]);
                }
            }
        }
        if (Tr::kStages == 1 && it + 1 < n_blocks) {
            __syncthreads();  // every warp is done with the single K/V buffer
            load_kv(it + 1);
            cp_async_commit();
        }
    }

    // Epilogue: normalise, stage the warp's rows in its own rows of sQ (no other warp reads them), then write
    // 16-byte chunks, skipping rows >= seqlen_q and columns >= head_dim.
    T *sO = sQ + warp * Tr::kWarpRows * kStride;
#pragma unroll
    for (int mi = 0; mi < M; ++mi) {
        if constexpr (Tr::kRowSumMma) {  // the ones column (held by lane t = 0 of each quad) summed P
            l_run[mi][0] = __shfl_sync(0xffffffffu, o[mi][kOutTiles][0], lane & ~3);
            l_run[mi][1] = __shfl_sync(0xffffffffu, o[mi][kOutTiles][2], lane & ~3);
        } else {
            l_run[mi][0] = quad_sum(l_run[mi][0]), l_run[mi][1] = quad_sum(l_run[mi][1]);
        }
        const float inv0 = 1.f / l_run[mi][0], inv1 = 1.f / l_run[mi][1];
        T *rows = sO + mi * 16 * kStride;
#pragma unroll
        for (int d = 0; d < kOutTiles; ++d) {
            *reinterpret_cast<uint32_t *>(rows + g * kStride + 8 * d + 2 * t) = pack2<T>(o[mi][d][0] * inv0, o[mi][d][1] * inv0);
            *reinterpret_cast<uint32_t *>(rows + (g + 8) * kStride + 8 * d + 2 * t) = pack2<T>(o[mi][d][2] * inv1, o[mi][d][3] * inv1);
        }
    }
    __syncwarp();
    T *out = static_cast<T *>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
#pragma unroll
    for (int i = lane; i < Tr::kWarpRows * kOutTiles; i += 32) {
        const int r = i / kOutTiles, c = i % kOutTiles, row = row0 + warp * Tr::kWarpRows + r;
        if (row < p.seqlen_q && c * 8 < p.head_dim)
            *reinterpret_cast<uint4 *>(out + row * p.o_row_stride + c * 8) =
                *reinterpret_cast<const uint4 *>(sO + r * kStride + c * 8);
    }
}

}  // namespace sdrun
