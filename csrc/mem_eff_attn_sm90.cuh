// sdrun memory-efficient attention, Hopper path (sm_90a): the same algorithm as mem_eff_attn_kernel.cuh, with the
// two matrix products on wgmma, tiles loaded by TMA, and warps that specialise.
//
// Algorithm (FlashAttention-2 tiling; FlashAttention-3's warp specialisation, ping-pong and intra-warpgroup
// overlap, Shah et al. 2024). One CTA owns 64 * kComputeWGs query rows of one (batch, head):
//   the last warpgroup loads: one thread issues TMA copies of Q once, then of K/V tiles of kBlockN keys into
//     kStages buffers; each buffer has a "full" mbarrier (TMA completes its bytes) and an "empty" one (every
//     compute warp arrives when done reading it). It hands its registers to the compute warpgroups (setmaxnreg).
//   warpgroups 0 .. kComputeWGs - 1 compute, 64 query rows each. Per key tile j:
//     S_j = Q K_j^T            wgmma, A = Q and B = K_j from shared memory
//     O  += P_{j-1} V_{j-1}    wgmma issued right behind it, A = P from registers, B = V transposed
//     softmax(S_j) -> P_j      while P_{j-1} V_{j-1} still runs on the tensor cores
//     O  *= exp2(m_old - m_new) once that product has landed.
//   They take turns issuing their products (one named barrier each, "ping-pong"), so one's softmax runs while
//   another's products keep the tensor cores busy.
// The fp32 accumulator of S has exactly the register layout of the A operand of the second product, so P never
// leaves registers. Tiles are 64 columns (128 bytes) wide, 128-byte swizzled (TMA writes them so, wgmma reads them
// so): head_dim 40 is zero-padded to 64 by TMA's out-of-bounds fill, 80 takes two such column atoms. Q K^T reduces
// over head_dim rounded up to 16; P V computes all 64 (128) columns, the padding ones are zeros and never stored.
//
// Measured (ncu, H200, d = 40): the compute warps stall mostly on short fixed-latency chains ("wait"), with the
// exp2 unit 51% and the tensor cores 44% busy; a third compute warpgroup (more warps to switch between) gave 1.2x.
//
// The last wave's tiles may run split (the launcher's sm90_split_tiles picks how many): such a tile becomes
// kComputeWGs CTAs of 64 query rows each, whose warpgroups take every kComputeWGs-th key tile of the same rows, and
// warpgroup 0 merges the partial outputs (each rescaled by exp2 of its row max over the merged max) through the K/V
// buffers once every warpgroup is done. A wave that would hold tail tiles on a third of the SMs then holds three
// times as many CTAs of a third of the work each. Measured (H100, one run, against main's unsplit kernel):
// (2,10,4096,4096,64) 399 -> 480 TFLOP/s (0.93x -> 1.13x cuDNN), (2,5,9216,9216,64) 476 -> 526; shapes whose last
// wave is full are unchanged.
//
// Key tiles are visited last to first (the partial tile first, masked to -inf, so every row max is finite from the
// start), as in the sm80 kernel; rows past seqlen_q or seqlen_k arrive as zeros.
//
// Build alone: nvcc -std=c++17 -O3 -DSDRUN_SM90A -gencode arch=compute_90a,code=sm_90a -Xptxas -v -c csrc/mem_eff_attn.cu
#pragma once
#include "mem_eff_attn_kernel.cuh"  // exp2_approx, pack2, quad_max, quad_sum, smem_addr
#include "mem_eff_attn_sm90_ptx.cuh"

namespace sdrun {

template <typename T, int kHeadDim_, int kBlockN_, int kComputeWGs_ = 2, int kStages_ = 0, bool kPingPong_ = true>
struct Sm90Traits {
    using elem = T;
    static constexpr int kHeadDim = kHeadDim_;
    static constexpr int kHeadDimK = (kHeadDim + 15) / 16 * 16;  // Q K^T reduction, multiple of wgmma k = 16
    static constexpr int kAtoms = (kHeadDim + 63) / 64;          // 64-column swizzle atoms per row
    static constexpr int kHeadDimPad = 64 * kAtoms;              // P V output columns: the wgmma N
    static constexpr int kComputeWGs = kComputeWGs_, kBlockM = 64 * kComputeWGs, kBlockN = kBlockN_;
    static constexpr int kThreads = 128 * (kComputeWGs + 1);  // compute warpgroups, then the loader warpgroup
    // setmaxnreg: the kernel starts with kEntryRegs per thread (64 K registers over kThreads, in steps of 8); the
    // loader drops to 24 and the compute warpgroups take only what it frees: asking for more waits forever.
    // 2 compute warpgroups: 168 -> 240 registers; 3: 128 -> 160 (a 4th would get 112, and deadlocked at 120).
    static constexpr int kEntryRegs = 65536 / kThreads / 8 * 8;
    static constexpr int kComputeRegs = (kEntryRegs + (kEntryRegs - 24) / kComputeWGs) / 8 * 8;
    static constexpr bool kPingPong = kPingPong_;  // compute warpgroups take turns issuing their products
    static constexpr int kQAtomBytes = kBlockM * 128, kKVAtomBytes = kBlockN * 128;
    static constexpr int kQBytes = kAtoms * kQAtomBytes, kKVBytes = kAtoms * kKVAtomBytes;  // one of K or V
    // K/V buffers: kStages_, or 0 = as many as fit in the 227 KB a block may have (at most 8), after 1 KB for
    // aligning the tiles and the barriers.
    static constexpr int kMaxStages = (227 * 1024 - 1024 - kQBytes - 136) / (2 * kKVBytes);
    static constexpr int kStages = kStages_ > 0 ? kStages_ : (kMaxStages < 8 ? kMaxStages : 8);
    static constexpr int kBarOffset = kQBytes + 2 * kStages * kKVBytes;  // full[kStages], empty[kStages], q
    static constexpr int kSmemBytes = 1024 + kBarOffset + (2 * kStages + 1) * 8;
    static_assert(kHeadDim % 8 == 0 && kHeadDim <= 128 && kBlockN % 16 == 0, "tile shape");
    static_assert(kStages >= 3, "buffers: the compute warpgroups hold two (tile j - 1's V, tile j)");
    // A split CTA's warpgroup frees tile j only after tile j + kComputeWGs has landed: that many buffers deadlock.
    static_assert(kStages > kComputeWGs, "buffers: a split warpgroup holds tile j while it waits for j + kComputeWGs");
    static_assert(2 * kSmemBytes > 228 * 1024, "one CTA per SM: the launcher counts the slots of a wave so");
    static_assert(kStages * kKVBytes >= 4 * (kComputeWGs - 1) * 128 * (kHeadDimPad / 2 + 4), "split partials fit");
};

// The TMA boxes: q (64 columns x kBlockM rows), k and v (64 x kBlockN), each over (head_dim, seqlen, heads, batch).
struct Sm90TensorMaps {
    CUtensorMap q, k, v;
};

// Tiles are (kBlockM query rows, head, batch), numbered with the row block fastest. grid = split_from +
// (tiles - split_from) * kComputeWGs CTAs: tile i < split_from is CTA i; each later tile is kComputeWGs split CTAs.
// kThreads threads, Tr::kSmemBytes of dynamic shared memory.
template <typename Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    mem_eff_attn_sm90_kernel(const MemEffAttnParams p, const __grid_constant__ Sm90TensorMaps tm, int split_from) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using T = typename Tr::elem;
    constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kStages = Tr::kStages;
    constexpr int kSAcc = kBlockN / 2, kOAcc = Tr::kHeadDimPad / 2;  // fp32 accumulators per thread (64 x N / 128)
    constexpr int kPSteps = kBlockN / 16;                             // k = 16 steps of P V
    constexpr int kComputeWGs = Tr::kComputeWGs, kComputeWarps = 4 * kComputeWGs;  // arrivals that empty a buffer
    constexpr float kInf = __builtin_huge_valf();

    extern __shared__ unsigned char smem_raw[];
    unsigned char *smem = smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024);  // swizzle atoms: 1 KB aligned
    const uint32_t q_addr = smem_addr(smem), k_addr = q_addr + Tr::kQBytes, v_addr = k_addr + kStages * Tr::kKVBytes;
    const uint32_t full_bar = q_addr + Tr::kBarOffset, empty_bar = full_bar + kStages * 8;  // + 8 * stage
    const uint32_t q_bar = empty_bar + kStages * 8;  // Q's own: a split CTA's warpgroups start at different tiles

    const int tid = threadIdx.x, warp_id = tid / 32;
    const bool split = int(blockIdx.x) >= split_from;  // this CTA: 64 rows of a tile, its warpgroups split the keys
    const int tile = split ? split_from + (blockIdx.x - split_from) / kComputeWGs : blockIdx.x;
    const int row_blocks = (p.seqlen_q + kBlockM - 1) / kBlockM;
    const int row0 = tile % row_blocks * kBlockM + (split ? (blockIdx.x - split_from) % kComputeWGs * 64 : 0);
    const int h = tile / row_blocks % p.heads, b = tile / row_blocks / p.heads;
    const int n_blocks = (p.seqlen_k + kBlockN - 1) / kBlockN;  // key tile n_blocks - 1 - it is visited at step it
    if (row0 >= p.seqlen_q) return;  // a split CTA past the last row

    if (tid == 0)
        for (int st = 0; st < kStages; ++st)
            mbar_init(full_bar + 8 * st, 1), mbar_init(empty_bar + 8 * st, split ? 4 : kComputeWarps);  // its readers
    if (tid == 0) mbar_init(q_bar, 1);
    __syncthreads();

    if (warp_id >= kComputeWarps) {  // ------------------------------------ loader
        setmaxnreg_dec<24>();
        if (tid != 32 * kComputeWarps) return;
        tma_prefetch_desc(&tm.q), tma_prefetch_desc(&tm.k), tma_prefetch_desc(&tm.v);
        for (int it = 0; it < n_blocks; ++it) {
            const int st = it % kStages, key0 = (n_blocks - 1 - it) * kBlockN;
            if (it >= kStages) mbar_wait(empty_bar + 8 * st, (it / kStages + 1) % 2);  // tile it - kStages read
            if (it == 0) {  // Q first, once
                mbar_expect_tx(q_bar, Tr::kQBytes);
#pragma unroll
                for (int a = 0; a < Tr::kAtoms; ++a) tma_load_4d(q_addr + a * Tr::kQAtomBytes, &tm.q, q_bar, 64 * a, row0, h, b);
            }
            mbar_expect_tx(full_bar + 8 * st, 2 * Tr::kKVBytes);  // the one arrival
#pragma unroll
            for (int a = 0; a < Tr::kAtoms; ++a) {
                tma_load_4d(k_addr + st * Tr::kKVBytes + a * Tr::kKVAtomBytes, &tm.k, full_bar + 8 * st, 64 * a, key0, h, b);
                tma_load_4d(v_addr + st * Tr::kKVBytes + a * Tr::kKVAtomBytes, &tm.v, full_bar + 8 * st, 64 * a, key0, h, b);
            }
        }
    } else {  // ------------------------------------------------------- compute warpgroups
        setmaxnreg_inc<Tr::kComputeRegs>();
        // c through a shuffle from lane 0 (as CUTLASS's canonical_warp_group_idx): ptxas then knows every lane holds
        // the same value, so first, stride, the buffer indices and the wgmma descriptors derived from it stay on the
        // uniform datapath (with tid / 128 the split build's d = 40 loop took 498 instructions, 28 of them R2UR).
        const int c = __shfl_sync(0xffffffff, tid / 128, 0), warp = warp_id % 4, lane = tid % 32, g = lane / 4, t = lane % 4;
        const float sl2 = p.scale_log2;
        // Ping-pong: warpgroup c issues its products after bar.sync on barrier 1 + c, then lets the next one go.
        // Warpgroup 0 goes first; the last warpgroup's last turn has no successor, so it skips that arrive.
        // Every warpgroup takes `turns` turns (a split CTA's warpgroups with fewer key tiles end with empty ones).
        // This warpgroup visits key tiles first, first + stride, ...: `mine` of them. Divisions by constants:
        // one by the uniform stride would be a reciprocal sequence.
        const int first = split ? c : 0, stride = split ? kComputeWGs : 1;
        const int mine = !split ? n_blocks : n_blocks > c ? (n_blocks - 1 - c) / kComputeWGs + 1 : 0;
        const int turns = (split ? (n_blocks - 1) / kComputeWGs : n_blocks - 1) + 2;  // warpgroup 0's tiles, its last P V
        auto my_turn = [&] { if (Tr::kPingPong) named_bar_sync(1 + c, 256); };
        auto next_turn = [&] { if (Tr::kPingPong) named_bar_arrive(1 + (c + 1) % kComputeWGs, 256); };
        if (c == kComputeWGs - 1) next_turn();

        // S = Q K^T for key tile `it`: this warpgroup's 64 rows of Q times the tile's kBlockN rows of K, both
        // K-major; k step ks sits in atom ks / 4, 32 bytes per step along the row.
        // Q's address (a split CTA's Q is its 64 rows) through a shuffle too: ptxas would otherwise re-derive split
        // from blockIdx in every loop iteration (d = 40: 455 instructions instead of 446).
        const uint32_t qa = __shfl_sync(0xffffffff, q_addr + (split ? 0 : c * 64 * 128), 0);
        auto issue_qk = [&](float (&s)[kSAcc], int it) {
            const uint32_t kb = k_addr + (it % kStages) * Tr::kKVBytes;
#pragma unroll
            for (int ks = 0; ks < Tr::kHeadDimK / 16; ++ks)
                WgmmaSS<kBlockN>::template mma<T>(
                    s, wgmma_desc_sw128(qa + ks / 4 * Tr::kQAtomBytes + ks % 4 * 32, 16, 1024),
                    wgmma_desc_sw128(kb + ks / 4 * Tr::kKVAtomBytes + ks % 4 * 32, 16, 1024), ks > 0);
            wgmma_commit();
        };
        // O += P V for key tile `it`: V is the MN-major B operand (8-key groups 1024 bytes apart, column atoms
        // kKVAtomBytes apart); k step ks covers keys 16 ks .. 16 ks + 15, 2048 bytes further.
        float o[kOAcc];
#pragma unroll
        for (int i = 0; i < kOAcc; ++i) o[i] = 0.f;
        auto issue_pv = [&](const uint32_t (&pk)[kPSteps][4], int it) {
            const uint32_t vb = v_addr + (it % kStages) * Tr::kKVBytes;
#pragma unroll
            for (int ks = 0; ks < kPSteps; ++ks)
                WgmmaRS<Tr::kHeadDimPad>::template mma<T>(o, pk[ks], wgmma_desc_sw128(vb + ks * 2048, Tr::kKVAtomBytes, 1024), 1);
            wgmma_commit();
        };

        // Online softmax of one S tile, in place (S becomes unnormalised P). Accumulator element 4j + e holds row
        // g + 8 (e / 2) of this warp's 16, key 8j + 2t + e % 2; r = 0, 1 are rows g, g + 8. corr rescales O and l.
        // Both rows at once, with 4 partial maxima and sums each, so no chain of dependent instructions is long
        // (measured: the same speed as one running max and sum per row, within noise).
        float m_run[2] = {-kInf, -kInf}, l_run[2] = {0.f, 0.f};  // running max of raw scores; running sum (this thread's keys)
        auto softmax = [&](float (&s)[kSAcc], float (&corr)[2]) {
            constexpr int kJ = kBlockN / 8;  // 8-key column tiles; each holds 2 keys of each of this thread's rows
            float mx[2][4];
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
                for (int q = 0; q < 4; ++q) mx[r][q] = m_run[r];
#pragma unroll
            for (int j = 0; j < kJ; ++j)
#pragma unroll
                for (int r = 0; r < 2; ++r) mx[r][j % 4] = fmaxf(mx[r][j % 4], fmaxf(s[4 * j + 2 * r], s[4 * j + 2 * r + 1]));
            float mx_scaled[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float m = quad_max(fmaxf(fmaxf(mx[r][0], mx[r][1]), fmaxf(mx[r][2], mx[r][3])));
                mx_scaled[r] = m * sl2;  // m is finite: the first tile visited holds a valid key
                corr[r] = exp2_approx(m_run[r] * sl2 - mx_scaled[r]);  // 0 on the first tile
                m_run[r] = m;
            }
            float sum[2][4] = {};
#pragma unroll
            for (int j = 0; j < kJ; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int r = e / 2;
                    s[4 * j + e] = exp2_approx(s[4 * j + e] * sl2 - mx_scaled[r]);  // one FFMA + one MUFU per score
                    sum[r][j % 4] += s[4 * j + e];
                }
#pragma unroll
            for (int r = 0; r < 2; ++r)
                l_run[r] = l_run[r] * corr[r] + ((sum[r][0] + sum[r][1]) + (sum[r][2] + sum[r][3]));
        };
        auto to_p = [&](const float (&s)[kSAcc], uint32_t (&pk)[kPSteps][4]) {  // the A fragments of P V
#pragma unroll
            for (int ks = 0; ks < kPSteps; ++ks)
#pragma unroll
                for (int e = 0; e < 4; ++e) pk[ks][e] = pack2<T>(s[8 * ks + 2 * e], s[8 * ks + 2 * e + 1]);
        };

        uint32_t pk[kPSteps][4];
        float corr[2];
        if (mine > 0) {  // This warpgroup's first tile: S, mask (visit 0 holds the last, partial keys), P.
            mbar_wait(q_bar, 0);
            mbar_wait(full_bar + 8 * (first % kStages), first / kStages % 2);
            float s[kSAcc];
            my_turn();
            wgmma_fence();
            issue_qk(s, first);
            next_turn();
            wgmma_wait<0>();
            fence_regs(s);
            if (first == 0 && p.seqlen_k % kBlockN != 0) {
                const int limit = p.seqlen_k - (n_blocks - 1) * kBlockN;
#pragma unroll
                for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        if (8 * j + 2 * t + e % 2 >= limit) s[4 * j + e] = -kInf;
            }
            softmax(s, corr);
            to_p(s, pk);
        }
        for (int it = first + stride; it < n_blocks; it += stride) {  // every turn here has a successor
            const int prev = it - stride;
            mbar_wait(full_bar + 8 * (it % kStages), it / kStages % 2);
            // S is fresh each tile (its first wgmma overwrites it), and P and O are written only outside the
            // window in which P V runs: ordinary instructions defining wgmma inputs inside it make ptxas serialize
            // every wgmma (warning C7513).
            float s[kSAcc];
            my_turn();
            wgmma_fence();  // O was rescaled and P written by ordinary instructions
            issue_qk(s, it);
            issue_pv(pk, prev);
            next_turn();
            wgmma_wait<1>();  // S has landed; P V still runs
            fence_regs(s);
            softmax(s, corr);
            wgmma_wait<0>();
            fence_regs(o);
            if (lane == 0) mbar_arrive(empty_bar + 8 * (prev % kStages));  // this warp is done with tile prev
#pragma unroll
            for (int i = 0; i < Tr::kHeadDim / 2; ++i) o[i] *= corr[i % 4 / 2];  // padding columns stay 0
            to_p(s, pk);
        }
        // mine turns taken. The last P V, then empty turns up to `turns`; the last warpgroup's last has no successor.
        int turn = mine;
        auto end_turn = [&] { if (++turn < turns || c != kComputeWGs - 1) next_turn(); };
        if (mine > 0) {
            my_turn();
            wgmma_fence();
            issue_pv(pk, first + (mine - 1) * stride);
            end_turn();
            wgmma_wait<0>();
            fence_regs(o);
        }
        while (turn < turns) my_turn(), end_turn();

        if (split) {  // Merge into warpgroup 0. Thread i of every warpgroup holds the same rows and columns.
            constexpr int kPart = kOAcc + 4, kAll = 128 * kComputeWGs;  // o, then m and l of rows g, g + 8
            constexpr int kMergeBar = 1 + 2 * kComputeWGs;  // after ping-pong's and the epilogue's barriers
            float *part = reinterpret_cast<float *>(smem + Tr::kQBytes);  // the K/V buffers: every copy has landed
            const int i0 = tid % 128;
            named_bar_sync(kMergeBar, kAll);  // no wgmma reads the K/V buffers any more
            if (c > 0) {
                float *mine_part = part + (c - 1) * kPart * 128 + i0;  // element e at e * 128: no bank conflicts
#pragma unroll
                for (int i = 0; i < kOAcc; ++i) mine_part[i * 128] = o[i];
#pragma unroll
                for (int r = 0; r < 2; ++r) mine_part[(kOAcc + r) * 128] = m_run[r], mine_part[(kOAcc + 2 + r) * 128] = l_run[r];
                named_bar_arrive(kMergeBar, kAll);
                return;
            }
            named_bar_sync(kMergeBar, kAll);
            float m_all[2] = {m_run[0], m_run[1]};
#pragma unroll
            for (int w = 0; w < kComputeWGs - 1; ++w)
#pragma unroll
                for (int r = 0; r < 2; ++r) m_all[r] = fmaxf(m_all[r], part[(w * kPart + kOAcc + r) * 128 + i0]);
#pragma unroll
            for (int r = 0; r < 2; ++r) {  // m_all is finite: warpgroup 0 saw visit 0's valid key
                corr[r] = exp2_approx((m_run[r] - m_all[r]) * sl2);
                l_run[r] *= corr[r];
            }
#pragma unroll
            for (int i = 0; i < Tr::kHeadDim / 2; ++i) o[i] *= corr[i % 4 / 2];
#pragma unroll
            for (int w = 0; w < kComputeWGs - 1; ++w) {
                const float *theirs = part + w * kPart * 128 + i0;
                float wr[2];  // 0 for a warpgroup that saw no key tile (its max is -inf)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    wr[r] = exp2_approx((theirs[(kOAcc + r) * 128] - m_all[r]) * sl2);
                    l_run[r] += wr[r] * theirs[(kOAcc + 2 + r) * 128];
                }
#pragma unroll
                for (int i = 0; i < Tr::kHeadDim / 2; ++i) o[i] += wr[i % 4 / 2] * theirs[i * 128];
            }
        }

        // Epilogue: normalise into this warpgroup's own 64 rows of the Q tile (same atoms; 16-byte chunk q of row r
        // stored at chunk q ^ (r % 8), so neither these writes nor the reads below conflict on banks), then write
        // 16-byte chunks, skipping rows >= seqlen_q and columns >= head_dim.
        float inv[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) inv[r] = 1.f / quad_sum(l_run[r]);
        auto staged = [&](int row, int chunk) {  // row of the CTA's 128, 16-byte chunk of the padded row
            return smem + chunk / 8 * Tr::kQAtomBytes + row * 128 + ((chunk % 8) ^ (row % 8)) * 16;
        };
#pragma unroll
        for (int j = 0; j < Tr::kHeadDim / 8; ++j)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int row = c * 64 + warp * 16 + g + 8 * r;
                *reinterpret_cast<uint32_t *>(staged(row, j) + t * 4) =
                    pack2<T>(o[4 * j + 2 * r] * inv[r], o[4 * j + 2 * r + 1] * inv[r]);
            }
        named_bar_sync(1 + kComputeWGs + c, 128);  // this warpgroup's 4 warps only
        T *out = static_cast<T *>(p.o) + b * p.o_batch_stride + h * p.o_head_stride;
        constexpr int kChunks = Tr::kHeadDim / 8;
#pragma unroll
        for (int i = tid % 128; i < 64 * kChunks; i += 128) {
            const int col = i % kChunks, r = c * 64 + i / kChunks;
            if (row0 + r < p.seqlen_q && col * 8 < p.head_dim)
                *reinterpret_cast<uint4 *>(out + int64_t(row0 + r) * p.o_row_stride + col * 8) =
                    *reinterpret_cast<const uint4 *>(staged(r, col));
        }
    }
#else
    __trap();  // built without sm_90a: the launcher never picks this kernel then (SDRUN_SM90A unset)
#endif
}

}  // namespace sdrun
