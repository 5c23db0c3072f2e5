// sdrun memory-efficient attention: the plain-data boundary between the torch binding and the kernels.
// No torch headers here (style.md P6): raw pointers, strides in ELEMENTS, not bytes.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

struct MemEffAttnParams {
    // q: (batch, seqlen_q, heads, head_dim), k/v: (batch, seqlen_k, heads, head_dim), o like q.
    // The last dimension is contiguous; every other stride is a multiple of 8 elements and every
    // base pointer is 16-byte aligned (the binding makes a copy otherwise).
    const void *__restrict__ q;
    const void *__restrict__ k;
    const void *__restrict__ v;
    void *__restrict__ o;
    int64_t q_batch_stride, q_row_stride, q_head_stride;
    int64_t k_batch_stride, k_row_stride, k_head_stride;
    int64_t v_batch_stride, v_row_stride, v_head_stride;
    int64_t o_batch_stride, o_row_stride, o_head_stride;
    int batch, heads, seqlen_q, seqlen_k;
    int head_dim;        // a multiple of 8, at most 256
    float scale_log2;    // softmax scale * log2(e): the kernel exponentiates with exp2
    bool is_bf16;        // else fp16
    int sm;              // compute capability of the target device, e.g. 90 (picks the path; see mem_eff_attn.cu)
    int max_smem_per_block;  // the device's opt-in shared memory limit per block, bytes
    int num_sms;             // multiprocessors on the device (the launcher weighs tail effects with it)
    int variant;         // 0 = default; 9 = the portable mma.sync path on every GPU; 10 / 14 = the Hopper path
                         // with every / no tile split along the keys; others: tuning builds only
};

// Launches on `stream`; returns the first CUDA error (from configuration or launch), never synchronizes.
cudaError_t mem_eff_attn_fwd(const MemEffAttnParams &params, cudaStream_t stream);

// Shared memory (bytes) of the tile shape the launcher picks for this case on a device allowing max_smem per block.
int mem_eff_attn_smem_bytes(int head_dim, bool is_bf16, int max_smem);

// The head-dim bucket the kernel compiles for this head_dim (0 = unsupported).
int mem_eff_attn_bucket(int head_dim);
