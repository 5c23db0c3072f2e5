// GroupNorm over (batch, channels, pixels), NCHW or NHWC, optionally fused with the SiLU that follows it in every
// ResNet block of the Stable Diffusion UNet and VAE (norm -> SiLU -> conv), and optionally with the addition of a
// value per (image, channel) before it (the UNet's ResNet blocks add their time embedding to conv1's output there).
//
// Why a kernel of our own: PyTorch's CUDA GroupNorm reduces each (image, group) in one block, so at the UNet's sizes
// (batch 2, 32 groups) it runs 64 blocks on a 132-SM GPU, then a separate elementwise pass, then diffusers' SiLU
// reads and writes the tensor once more.
//
// NHWC (channels-last, sdrun's fastest layout): one cooperative launch, `resident_nhwc`, its blocks all resident:
// 1. every block sums a run of pixels of one image over every channel: each thread keeps 16-byte vectors' worth of
//    channels, and sums (x + a - s) and its square, s being the (image, group)'s first value (the same in every
//    block, so the pieces simply add, and the sum of squares does not cancel catastrophically). The rows of a
//    block meet in shared memory, then one warp per group writes the piece's two sums.
// 2. grid sync; one warp per (image, group) adds its pieces and writes (mean, 1 / std).
// 3. grid sync; each thread turns its channels' statistics into y = x * scale + shift's coefficients (with the
//    addition folded into the shift: (x + a - mean) * scale + bias), then reads its pixels again, scales, SiLU,
//    stores.
// Measured on an H100 (bench/group_norm.py, GroupNorm + SiLU, fp16, µs per call from a CUDA graph): the
// three-launch path below took 23.7 µs at (2, 320, 64, 64) NHWC (12.5 µs NCHW), 14.0 at (2, 1280, 8, 8) and 48.1 at
// (2, 320, 128, 128): its NHWC statistics merged every channel's moments serially per group and per piece (Chan's
// formula, a division each), and each launch costs its ramp-up and drain. The resident kernel: 15.4, 9.1 and
// 37.5 µs; at (32, 320, 64, 64), too large for the L2 cache, both take about 160 µs. The three launches remain for
// NHWC batches too large to be resident.
//
// NCHW, three launches, each using the whole GPU:
// 1. statistics: every (image, group) is cut into `splits` pieces reduced by separate blocks. A thread sums
//    16-byte vectors shifted by the first value it reads (so the sum of squares does not cancel catastrophically),
//    turns them into (count, mean, M2), and threads merge those with Chan's parallel formula.
//    A per-channel addition `a` is added to each value as it is read.
// 2. finalize: one warp per (image, group) merges its pieces and writes y = x * scale + shift's two coefficients
//    for each of its channels (rstd * weight, bias - mean * rstd * weight, plus a * scale: (x + a) * scale + shift
//    is x * scale + (a * scale + shift), so the apply pass never sees the addition and x + a is never written).
// 3. apply: one 16-byte vector per thread per iteration: scale, shift, SiLU, store.
// Either way the tensor is read twice and written once, against PyTorch's two reads and one write plus SiLU's read
// and write (and, with the addition, the broadcast add's read and write before them). Statistics and arithmetic are
// float32; the output is rounded once.
#include <cooperative_groups.h>

#include "group_norm.h"
#include "vec16.cuh"

namespace {

using sdrun::Vec;

constexpr int kThreads = 256;
constexpr int kMaxNhwcThreads = 512;  // a row of 16-byte vectors of 2048 float32 channels (the binding's limit)

struct Moments {  // count, mean, sum of squared deviations
    float n, mean, m2;
};

__device__ __forceinline__ Moments merge(Moments a, Moments b) {  // Chan et al.
    const float n = a.n + b.n;
    if (n == 0.f) return a;
    const float delta = b.mean - a.mean, wb = b.n / n;
    return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb};
}

__device__ __forceinline__ Moments shuffle_down(Moments m, int offset) {
    return {__shfl_down_sync(0xffffffff, m.n, offset), __shfl_down_sync(0xffffffff, m.mean, offset),
            __shfl_down_sync(0xffffffff, m.m2, offset)};
}

// Merged over the block; the result is valid in thread 0.
__device__ Moments block_merge(Moments m) {
    __shared__ Moments warps[kThreads / 32];
    for (int offset = 16; offset > 0; offset /= 2) m = merge(m, shuffle_down(m, offset));
    if (threadIdx.x % 32 == 0) warps[threadIdx.x / 32] = m;
    __syncthreads();
    if (threadIdx.x < 32) {
        m = threadIdx.x < blockDim.x / 32 ? warps[threadIdx.x] : Moments{0.f, 0.f, 0.f};
        for (int offset = 16; offset > 0; offset /= 2) m = merge(m, shuffle_down(m, offset));
    }
    return m;
}

// Shifted sums of a thread's values, turned into Moments at the end.
struct Sums {
    float shift = 0.f, sum = 0.f, squares = 0.f, n = 0.f;
    __device__ void add(float v) {
        if (n == 0.f) shift = v;
        const float d = v - shift;
        sum += d, squares += d * d, n += 1.f;
    }
    __device__ Moments moments() const {
        if (n == 0.f) return {0.f, 0.f, 0.f};
        const float mean = sum / n;
        return {n, shift + mean, fmaxf(squares - sum * mean, 0.f)};
    }
};

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float(float v) { return v; }

// NCHW: the (image, group) is one contiguous run of channels_per_group * pixels values; block (split, image-group)
// reduces its split-th piece (a whole number of vectors).
template <typename T>
__global__ void __launch_bounds__(kThreads) stats_nchw(const GroupNormParams p) {
    using V = Vec<T>;
    const int group_index = blockIdx.y, split = blockIdx.x;  // group_index = image * groups + group
    const int64_t vectors = p.channels / p.groups * p.pixels / V::kN;
    const int64_t per_split = (vectors + p.splits - 1) / p.splits;
    const int64_t begin = split * per_split, end = begin + per_split < vectors ? begin + per_split : vectors;
    const T *x = static_cast<const T *>(p.x) + group_index * vectors * V::kN;
    // the group's first channel's addition: a vector lies within one channel (pixels is a multiple of kN)
    const T *add = p.channel_add == nullptr ? nullptr : static_cast<const T *>(p.channel_add) +
                                                            int64_t(group_index / p.groups) * p.add_stride +
                                                            group_index % p.groups * (p.channels / p.groups);
    Sums sums;
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
        float v[V::kN];
        V::load(x + i * V::kN, v);
        const float a = add == nullptr ? 0.f : to_float(add[i * V::kN / p.pixels]);
#pragma unroll
        for (int k = 0; k < V::kN; ++k) sums.add(v[k] + a);
    }
    const Moments m = block_merge(sums.moments());
    if (threadIdx.x == 0) {
        float *out = p.partials + (int64_t(group_index) * p.splits + split) * 3;
        out[0] = m.n, out[1] = m.mean, out[2] = m.m2;
    }
}

// NHWC: block (split, image) reduces a run of pixels over every channel. Its threads form rows of `columns`
// threads, one per 16-byte vector of a pixel's channels; each row walks its own pixels, so a thread always sees the
// same kN channels. The rows' per-channel moments meet in shared memory, then one thread per group merges its
// channels' and writes the piece's moments.
template <typename T>
__global__ void __launch_bounds__(kMaxNhwcThreads) stats_nhwc(const GroupNormParams p) {
    using V = Vec<T>;
    extern __shared__ Moments channel_moments[];  // [rows][channels]
    const int image = blockIdx.y, split = blockIdx.x;
    const int columns = p.channels / V::kN, rows = blockDim.x / columns;
    const int row = threadIdx.x / columns, column = threadIdx.x % columns;
    const int64_t per_split = (p.pixels + p.splits - 1) / p.splits;
    const int64_t begin = split * per_split, end = begin + per_split < p.pixels ? begin + per_split : p.pixels;
    if (row < rows) {
        const T *x = static_cast<const T *>(p.x) + int64_t(image) * p.pixels * p.channels + column * V::kN;
        float a[V::kN] = {};  // this thread's channels' addition
        if (p.channel_add != nullptr)
            V::load(static_cast<const T *>(p.channel_add) + int64_t(image) * p.add_stride + column * V::kN, a);
        Sums sums[V::kN];
        for (int64_t pixel = begin + row; pixel < end; pixel += rows) {
            float v[V::kN];
            V::load(x + pixel * p.channels, v);
#pragma unroll
            for (int k = 0; k < V::kN; ++k) sums[k].add(v[k] + a[k]);
        }
#pragma unroll
        for (int k = 0; k < V::kN; ++k) channel_moments[row * p.channels + column * V::kN + k] = sums[k].moments();
    }
    __syncthreads();
    const int per_group = p.channels / p.groups;
    for (int g = threadIdx.x; g < p.groups; g += blockDim.x) {
        Moments m{0.f, 0.f, 0.f};
        for (int r = 0; r < rows; ++r)
            for (int c = g * per_group; c < (g + 1) * per_group; ++c) m = merge(m, channel_moments[r * p.channels + c]);
        float *out = p.partials + ((int64_t(image) * p.groups + g) * p.splits + split) * 3;
        out[0] = m.n, out[1] = m.mean, out[2] = m.m2;
    }
}

__device__ __forceinline__ float param(const void *values, int64_t i, GnDtype dtype, float otherwise) {
    if (values == nullptr) return otherwise;
    switch (dtype) {
        case GnDtype::kHalf: return __half2float(static_cast<const __half *>(values)[i]);
        case GnDtype::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16 *>(values)[i]);
        default: return static_cast<const float *>(values)[i];
    }
}

// One warp per (image, group): its lanes merge the group's pieces, then write its channels' coefficients.
__global__ void __launch_bounds__(kThreads) finalize(const GroupNormParams p) {
    const int group_index = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
    if (group_index >= p.batch * p.groups) return;  // the whole warp: group_index is the same in every lane
    const float *piece = p.partials + int64_t(group_index) * p.splits * 3;
    Moments m{0.f, 0.f, 0.f};
    for (int s = lane; s < p.splits; s += 32) m = merge(m, Moments{piece[3 * s], piece[3 * s + 1], piece[3 * s + 2]});
    for (int offset = 16; offset > 0; offset /= 2) m = merge(m, shuffle_down(m, offset));
    const float mean = __shfl_sync(0xffffffff, m.mean, 0), rstd = rsqrtf(__shfl_sync(0xffffffff, m.m2 / m.n, 0) + p.eps);
    const int per_group = p.channels / p.groups, image = group_index / p.groups, group = group_index % p.groups;
    for (int c = lane; c < per_group; c += 32) {
        const int channel = group * per_group + c;
        const float scale = rstd * param(p.weight, channel, p.param_dtype, 1.f);
        const int64_t index = int64_t(image) * p.channels + channel;
        const float added = param(p.channel_add, int64_t(image) * p.add_stride + channel, p.dtype, 0.f);
        float *out = p.scale_shift + 2 * index;
        out[0] = scale, out[1] = param(p.bias, channel, p.param_dtype, 0.f) + (added - mean) * scale;
    }
}

template <typename T, bool kChannelsLast, bool kSilu>
__global__ void __launch_bounds__(kThreads) apply(const GroupNormParams p) {
    using V = Vec<T>;
    const int64_t vectors = int64_t(p.batch) * p.channels * p.pixels / V::kN;
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    const T *x = static_cast<const T *>(p.x);
    T *y = static_cast<T *>(p.y);
    const float2 *coefficients = reinterpret_cast<const float2 *>(p.scale_shift);
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < vectors; i += stride) {
        const int64_t element = i * V::kN;
        float v[V::kN];
        V::load(x + element, v);
        if (kChannelsLast) {  // kN consecutive channels of one pixel
            const int64_t image = element / (p.pixels * p.channels);
            const int channel = int(element % p.channels);
            const float2 *ab = coefficients + image * p.channels + channel;
#pragma unroll
            for (int k = 0; k < V::kN; ++k) { const float2 c = ab[k]; v[k] = fmaf(v[k], c.x, c.y); }
        } else {  // kN pixels of one channel
            const float2 c = coefficients[element / p.pixels];
#pragma unroll
            for (int k = 0; k < V::kN; ++k) v[k] = fmaf(v[k], c.x, c.y);
        }
        if (kSilu) {
#pragma unroll
            for (int k = 0; k < V::kN; ++k) v[k] = v[k] / (1.f + __expf(-v[k]));
        }
        V::store(y + element, v);
    }
}

__device__ __forceinline__ void accumulate(float2 &total, float2 piece) { total.x += piece.x, total.y += piece.y; }

// Summed over the warp; the result is valid in lane 0.
__device__ __forceinline__ float2 warp_sum(float2 t) {
    for (int offset = 16; offset > 0; offset /= 2)
        t.x += __shfl_down_sync(0xffffffff, t.x, offset), t.y += __shfl_down_sync(0xffffffff, t.y, offset);
    return t;
}

// NHWC, one cooperative launch (see the top of the file). Block (split, image) owns a run of the image's pixels
// in phases 1 and 3; `p.partials` holds each piece's (sum, squares) as float2 [image][group][split], and
// `p.scale_shift` each (image, group)'s (mean, rstd) as float2.
template <typename T, bool kSilu>
__global__ void __launch_bounds__(kMaxNhwcThreads) resident_nhwc(const GroupNormParams p) {
    using V = Vec<T>;
    extern __shared__ float2 channel_sums[];  // [rows][channels]: (sum, squares) of x + a - s
    const int image = blockIdx.y, split = blockIdx.x;
    const int columns = p.channels / V::kN, rows = blockDim.x / columns;
    const int row = threadIdx.x / columns, column = threadIdx.x % columns;
    const int per_group = p.channels / p.groups, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int full_warps = blockDim.x / 32;  // the block's last warp may be partial: it sits out the shuffles
    const int64_t per_split = (p.pixels + p.splits - 1) / p.splits;
    const int64_t begin = split * per_split, end = begin + per_split < p.pixels ? begin + per_split : p.pixels;
    const T *images = static_cast<const T *>(p.x);
    const T *add = static_cast<const T *>(p.channel_add);  // (batch, channels) or null
    // the shift of (image, group): its first value, plus its channel's addition
    auto group_shift = [&](int64_t img, int group) {
        const int64_t first = img * p.add_stride + group * per_group;
        return to_float(images[img * p.pixels * p.channels + group * per_group]) +
               (add == nullptr ? 0.f : to_float(add[first]));
    };

    // 1. this block's piece: per channel over its pixels, then per group
    const T *x = images + int64_t(image) * p.pixels * p.channels + column * V::kN;
    float a[V::kN], s[V::kN], sum[V::kN] = {}, squares[V::kN] = {};
#pragma unroll
    for (int k = 0; k < V::kN; ++k) {
        const int channel = column * V::kN + k;
        a[k] = add == nullptr ? 0.f : to_float(add[int64_t(image) * p.add_stride + channel]);
        s[k] = group_shift(image, channel / per_group);
    }
#pragma unroll 4
    for (int64_t pixel = begin + row; pixel < end; pixel += rows) {
        float v[V::kN];
        V::load(x + pixel * p.channels, v);
#pragma unroll
        for (int k = 0; k < V::kN; ++k) {
            const float d = v[k] + a[k] - s[k];
            sum[k] += d, squares[k] = fmaf(d, d, squares[k]);
        }
    }
#pragma unroll
    for (int k = 0; k < V::kN; ++k)
        channel_sums[row * p.channels + column * V::kN + k] = make_float2(sum[k], squares[k]);
    __syncthreads();
    for (int c = threadIdx.x; c < p.channels; c += blockDim.x) {  // rows into row 0: each thread its own channels
        float2 t = channel_sums[c];
        for (int r = 1; r < rows; ++r) accumulate(t, channel_sums[r * p.channels + c]);
        channel_sums[c] = t;
    }
    __syncthreads();
    float2 *pieces = reinterpret_cast<float2 *>(p.partials);
    for (int g = warp; warp < full_warps && g < p.groups; g += full_warps) {
        float2 t{0.f, 0.f};
        for (int c = lane; c < per_group; c += 32) accumulate(t, channel_sums[g * per_group + c]);
        t = warp_sum(t);
        if (lane == 0) pieces[(int64_t(image) * p.groups + g) * p.splits + split] = t;
    }
    cooperative_groups::this_grid().sync();

    // 2. one warp per (image, group), over the grid: its pieces into (mean, rstd)
    float2 *stats = reinterpret_cast<float2 *>(p.scale_shift);
    const int64_t grid_warps = int64_t(gridDim.x) * gridDim.y * full_warps;
    const int64_t first_item = (int64_t(blockIdx.y) * gridDim.x + blockIdx.x) * full_warps + warp;
    for (int64_t item = first_item; warp < full_warps && item < int64_t(p.batch) * p.groups; item += grid_warps) {
        float2 t{0.f, 0.f};
        for (int i = lane; i < p.splits; i += 32) accumulate(t, pieces[item * p.splits + i]);
        t = warp_sum(t);
        if (lane == 0) {
            const float n = float(p.pixels) * per_group, mean = t.x / n;
            stats[item] = make_float2(group_shift(item / p.groups, int(item % p.groups)) + mean,
                                      rsqrtf(fmaxf(t.y / n - mean * mean, 0.f) + p.eps));
        }
    }
    cooperative_groups::this_grid().sync();

    // 3. this block's pixels again: y = x * scale + shift, then SiLU
    float scale[V::kN], shift[V::kN];
#pragma unroll
    for (int k = 0; k < V::kN; ++k) {
        const int channel = column * V::kN + k;
        const float2 m = stats[int64_t(image) * p.groups + channel / per_group];
        scale[k] = m.y * param(p.weight, channel, p.param_dtype, 1.f);
        shift[k] = param(p.bias, channel, p.param_dtype, 0.f) + (a[k] - m.x) * scale[k];
    }
    T *y = static_cast<T *>(p.y) + int64_t(image) * p.pixels * p.channels + column * V::kN;
#pragma unroll 4
    for (int64_t pixel = begin + row; pixel < end; pixel += rows) {
        float v[V::kN];
        V::load(x + pixel * p.channels, v);
#pragma unroll
        for (int k = 0; k < V::kN; ++k) {
            v[k] = fmaf(v[k], scale[k], shift[k]);
            if (kSilu) v[k] = v[k] / (1.f + __expf(-v[k]));
        }
        V::store(y + pixel * p.channels, v);
    }
}

// An NHWC block's threads: rows of `columns` threads, one per 16-byte vector of a pixel's channels, about kThreads
// in all (the binding's channel limit keeps `columns` within kMaxNhwcThreads).
struct NhwcBlock {
    int columns, rows;
    int threads() const { return rows * columns; }
};

NhwcBlock nhwc_block(int channels, GnDtype dtype) {
    const int columns = channels / (dtype == GnDtype::kFloat ? 4 : 8);
    return {columns, kThreads / columns > 0 ? kThreads / columns : 1};
}

size_t resident_smem(NhwcBlock block, int channels) { return size_t(block.rows) * channels * sizeof(float2); }

const void *resident_kernel(GnDtype dtype, bool silu) {
    switch (dtype) {
        case GnDtype::kHalf:
            return silu ? reinterpret_cast<const void *>(resident_nhwc<__half, true>)
                        : reinterpret_cast<const void *>(resident_nhwc<__half, false>);
        case GnDtype::kBFloat16:
            return silu ? reinterpret_cast<const void *>(resident_nhwc<__nv_bfloat16, true>)
                        : reinterpret_cast<const void *>(resident_nhwc<__nv_bfloat16, false>);
        default:
            return silu ? reinterpret_cast<const void *>(resident_nhwc<float, true>)
                        : reinterpret_cast<const void *>(resident_nhwc<float, false>);
    }
}

int blocks_for(int64_t items, int num_sms) {
    const int64_t blocks = (items + kThreads - 1) / kThreads, most = int64_t(num_sms) * 16;
    return int(blocks < most ? blocks : most);
}

template <typename T>
cudaError_t launch(const GroupNormParams &p, cudaStream_t stream) {
    constexpr int kN = Vec<T>::kN;
    if (p.channels_last) {
        const NhwcBlock block = nhwc_block(p.channels, p.dtype);
        if (block.threads() > kMaxNhwcThreads) return cudaErrorInvalidValue;  // the binding limits channels
        if (p.resident) {
            void *args[] = {const_cast<GroupNormParams *>(&p)};
            return cudaLaunchCooperativeKernel(resident_kernel(p.dtype, p.silu), dim3(p.splits, p.batch),
                                               dim3(block.threads()), args, resident_smem(block, p.channels), stream);
        }
        const size_t smem = size_t(block.rows) * p.channels * sizeof(Moments);
        if (smem > 48 * 1024) return cudaErrorInvalidValue;
        stats_nhwc<T><<<dim3(p.splits, p.batch), block.threads(), smem, stream>>>(p);
    } else {
        stats_nchw<T><<<dim3(p.splits, p.batch * p.groups), kThreads, 0, stream>>>(p);
    }
    finalize<<<(p.batch * p.groups * 32 + kThreads - 1) / kThreads, kThreads, 0, stream>>>(p);
    int device = 0, num_sms = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
    const int blocks = blocks_for(int64_t(p.batch) * p.channels * p.pixels / kN, num_sms);
    if (p.channels_last)
        p.silu ? apply<T, true, true><<<blocks, kThreads, 0, stream>>>(p) : apply<T, true, false><<<blocks, kThreads, 0, stream>>>(p);
    else
        p.silu ? apply<T, false, true><<<blocks, kThreads, 0, stream>>>(p) : apply<T, false, false><<<blocks, kThreads, 0, stream>>>(p);
    return cudaGetLastError();
}

}  // namespace

GroupNormPlan group_norm_plan(int64_t pixels, int batch, int channels, int groups, bool channels_last, GnDtype dtype,
                             bool silu) {
    int device = 0, num_sms = 0, cooperative = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
    cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device);
    if (channels_last && cooperative) {
        // Resident: at most kResidentPerSm blocks an SM (each grid sync waits for every block, and more blocks
        // than that bring no more bandwidth), and no more blocks than rows of pixels.
        constexpr int kResidentPerSm = 2;
        const NhwcBlock block = nhwc_block(channels, dtype);
        int per_sm = 0;
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, resident_kernel(dtype, silu), block.threads(),
                                                          resident_smem(block, channels)) != cudaSuccess)
            per_sm = 0, cudaGetLastError();
        const int64_t resident = int64_t(per_sm < kResidentPerSm ? per_sm : kResidentPerSm) * num_sms;
        if (batch <= resident) {
            const int64_t by_rows = (pixels + block.rows - 1) / block.rows, by_blocks = resident / batch;
            const int64_t splits = by_rows < by_blocks ? by_rows : by_blocks;
            return {int(splits > 1 ? splits : 1), true};
        }
    }
    // Three launches: about four blocks per SM in all, and no piece under 8 K values (smaller ones cost more to
    // launch and merge than they save).
    const int64_t units = channels_last ? batch : int64_t(batch) * groups;
    const int64_t values = pixels * channels / (channels_last ? 1 : groups);
    int64_t splits = (4 * int64_t(num_sms) + units - 1) / units;
    const int64_t most = values / 8192 > 1 ? values / 8192 : 1;
    splits = splits < most ? splits : most;
    return {int(splits < 1024 ? splits : 1024), false};
}

cudaError_t group_norm_fwd(const GroupNormParams &params, cudaStream_t stream) {
    if (int64_t(params.batch) * params.channels * params.pixels == 0) return cudaSuccess;
    switch (params.dtype) {
        case GnDtype::kHalf: return launch<__half>(params, stream);
        case GnDtype::kBFloat16: return launch<__nv_bfloat16>(params, stream);
        default: return launch<float>(params, stream);
    }
}
