// GroupNorm over (batch, channels, pixels), NCHW or NHWC, optionally fused with the SiLU that follows it in every
// ResNet block of the Stable Diffusion UNet and VAE (norm -> SiLU -> conv), and optionally with the addition of a
// value per (image, channel) before it (the UNet's ResNet blocks add their time embedding to conv1's output there).
//
// Why a kernel of our own: PyTorch's CUDA GroupNorm reduces each (image, group) in one block, so at the UNet's sizes
// (batch 2, 32 groups) it runs 64 blocks on a 132-SM GPU, then a separate elementwise pass, then diffusers' SiLU
// reads and writes the tensor once more.
//
// Three launches, each using the whole GPU:
// 1. statistics: every (image, group) is cut into `splits` pieces reduced by separate blocks. A thread sums
//    16-byte vectors shifted by the first value it reads (so the sum of squares does not cancel catastrophically),
//    turns them into (count, mean, M2), and threads merge those with Chan's parallel formula.
//    A per-channel addition `a` is added to each value as it is read.
// 2. finalize: one warp per (image, group) merges its pieces and writes y = x * scale + shift's two coefficients
//    for each of its channels (rstd * weight, bias - mean * rstd * weight, plus a * scale: (x + a) * scale + shift
//    is x * scale + (a * scale + shift), so the apply pass never sees the addition and x + a is never written).
// 3. apply: one 16-byte vector per thread per iteration: scale, shift, SiLU, store.
// So the tensor is read twice and written once, against PyTorch's two reads and one write plus SiLU's read and
// write (and, with the addition, the broadcast add's read and write before them). Statistics and arithmetic are
// float32; the output is rounded once.
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
                                                            int64_t(group_index) * (p.channels / p.groups);
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
            V::load(static_cast<const T *>(p.channel_add) + int64_t(image) * p.channels + column * V::kN, a);
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
        const float added = param(p.channel_add, index, p.dtype, 0.f);
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

int blocks_for(int64_t items, int num_sms) {
    const int64_t blocks = (items + kThreads - 1) / kThreads, most = int64_t(num_sms) * 16;
    return int(blocks < most ? blocks : most);
}

template <typename T>
cudaError_t launch(const GroupNormParams &p, cudaStream_t stream) {
    constexpr int kN = Vec<T>::kN;
    if (p.channels_last) {
        const int columns = p.channels / kN, rows = kThreads / columns > 0 ? kThreads / columns : 1;
        const int threads = rows * columns;
        if (threads > kMaxNhwcThreads) return cudaErrorInvalidValue;  // the binding limits channels
        const size_t smem = size_t(rows) * p.channels * sizeof(Moments);
        if (smem > 48 * 1024) return cudaErrorInvalidValue;
        stats_nhwc<T><<<dim3(p.splits, p.batch), threads, smem, stream>>>(p);
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

int group_norm_splits(int64_t pixels, int batch, int channels, int groups, bool channels_last, int num_sms) {
    // About four blocks per SM in all, and no piece under 8 K values (smaller ones cost more to launch and merge
    // than they save).
    const int64_t units = channels_last ? batch : int64_t(batch) * groups;
    const int64_t values = pixels * channels / (channels_last ? 1 : groups);
    int64_t splits = (4 * int64_t(num_sms) + units - 1) / units;
    const int64_t most = values / 8192 > 1 ? values / 8192 : 1;
    splits = splits < most ? splits : most;
    return int(splits < 1024 ? splits : 1024);
}

cudaError_t group_norm_fwd(const GroupNormParams &params, cudaStream_t stream) {
    if (int64_t(params.batch) * params.channels * params.pixels == 0) return cudaSuccess;
    switch (params.dtype) {
        case GnDtype::kHalf: return launch<__half>(params, stream);
        case GnDtype::kBFloat16: return launch<__nv_bfloat16>(params, stream);
        default: return launch<float>(params, stream);
    }
}
