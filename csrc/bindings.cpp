// The only torch-facing C++ of sdrun: checks inputs, fills the kernels' plain parameter structs (MemEffAttnParams,
// Fp8WidenParams, GroupNormParams, GegluParams, LayerNormParams), launches on the current stream. Built by setup.py
// (extension sdrun._C) or just in time by sdrun/ops/_ext.py, together with mem_eff_attn.cu, fp8_widen.cu,
// group_norm.cu, geglu.cu and layer_norm.cu.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cmath>
#include <optional>

#include "fp8_widen.h"
#include "geglu.h"
#include "group_norm.h"
#include "layer_norm.h"
#include "mem_eff_attn.h"

// Messages are built with std::string and passed as one const char*: streaming numbers through TORCH_CHECK's
// variadic form crashed (SIGSEGV) in extensions built on the device image with torch 2.11.
#define CHECK_MSG(cond, msg) TORCH_CHECK(cond, std::string(msg).c_str())
static std::string str(int64_t x) { return std::to_string(x); }
static std::string str(at::IntArrayRef s) {
    std::string r = "(";
    for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
    return r + ")";
}
#define CHECK_DEVICE(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor")
#define CHECK_SHAPE(x, ...) \
    CHECK_MSG((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ "), got " + str((x).sizes()))
#define CHECK_LAST_CONTIGUOUS(x) TORCH_CHECK((x).stride(-1) == 1, #x " must have contiguous last dimension")

// The kernel reads 16-byte vectors: base 16-byte aligned and every stride a multiple of 8 elements.
static at::Tensor aligned(const at::Tensor &x) {
    bool ok = reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
    for (int i = 0; i < 3; ++i) ok = ok && x.stride(i) % 8 == 0;
    return ok ? x : x.contiguous();
}

// q: (batch, seqlen_q, heads, head_dim); k, v: (batch, seqlen_k, heads, head_dim); returns o like q (contiguous),
// or writes into `out` when given (same shape and dtype, contiguous last dimension).
at::Tensor mem_eff_attn_fwd_torch(at::Tensor q, at::Tensor k, at::Tensor v, double scale,
                                  std::optional<at::Tensor> out_, int64_t variant) {
    CHECK_DEVICE(q); CHECK_DEVICE(k); CHECK_DEVICE(v);
    CHECK_MSG(q.dim() == 4, "q must have 4 dimensions (batch, seqlen_q, heads, head_dim), got " + str(q.dim()));
    TORCH_CHECK(k.dim() == 4 && v.dim() == 4, "k and v must have 4 dimensions (batch, seqlen_k, heads, head_dim)");
    const auto dtype = q.scalar_type();
    TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, "q must be float16 or bfloat16");
    TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype, "q, k and v must have the same dtype");
    TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), "q, k and v must be on the same device");
    const int64_t batch = q.size(0), seqlen_q = q.size(1), heads = q.size(2), head_dim = q.size(3);
    const int64_t seqlen_k = k.size(1);
    CHECK_SHAPE(k, batch, seqlen_k, heads, head_dim);
    CHECK_SHAPE(v, batch, seqlen_k, heads, head_dim);
    CHECK_MSG(head_dim % 8 == 0 && head_dim <= 256, "head_dim must be a multiple of 8 and at most 256, got " + str(head_dim));
    TORCH_CHECK(seqlen_k >= 1, "k and v must hold at least one key (seqlen_k >= 1)");
    CHECK_MSG(std::isfinite(scale) && scale > 0, "scale must be a positive finite number, got " + std::to_string(scale));
    TORCH_CHECK(seqlen_q <= INT32_MAX && seqlen_k <= INT32_MAX && heads <= 65535 && batch <= 65535,
                "sizes out of range: seqlen < 2^31, heads and batch <= 65535");
    CHECK_LAST_CONTIGUOUS(q); CHECK_LAST_CONTIGUOUS(k); CHECK_LAST_CONTIGUOUS(v);

    at::cuda::CUDAGuard device_guard{q.device()};
    const auto *props = at::cuda::getCurrentDeviceProperties();
    const int sm = props->major * 10 + props->minor;
    const std::string cc = str(props->major) + "." + str(props->minor);
    CHECK_MSG(sm >= 75, "the sdrun attention kernel needs a GPU of compute capability 7.5 or newer, this one is " + cc);
    CHECK_MSG(dtype != at::kBFloat16 || sm >= 80, "bfloat16 needs compute capability 8.0 or newer, this GPU is " + cc +
                                                  ": use float16");
    const int max_smem = static_cast<int>(props->sharedMemPerBlockOptin);
    const int smem = mem_eff_attn_smem_bytes(int(head_dim), dtype == at::kBFloat16, max_smem);
    CHECK_MSG(smem <= max_smem, "head_dim " + str(head_dim) + " needs " + str(smem) +
                                " bytes of shared memory per block, this GPU allows " + str(max_smem));

    at::Tensor out;
    if (out_.has_value()) {
        out = out_.value();
        CHECK_DEVICE(out);
        TORCH_CHECK(out.scalar_type() == dtype, "out must have the dtype of q");
        CHECK_SHAPE(out, batch, seqlen_q, heads, head_dim);
        CHECK_LAST_CONTIGUOUS(out);
        TORCH_CHECK(reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0 && out.stride(0) % 8 == 0 &&
                        out.stride(1) % 8 == 0 && out.stride(2) % 8 == 0,
                    "out must be 16-byte aligned with strides that are multiples of 8");
    } else {
        out = at::empty_like(q, at::MemoryFormat::Contiguous);
    }
    if (batch == 0 || seqlen_q == 0 || heads == 0) return out;
    q = aligned(q); k = aligned(k); v = aligned(v);

    MemEffAttnParams p{};
    p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr(); p.o = out.data_ptr();
    p.q_batch_stride = q.stride(0); p.q_row_stride = q.stride(1); p.q_head_stride = q.stride(2);
    p.k_batch_stride = k.stride(0); p.k_row_stride = k.stride(1); p.k_head_stride = k.stride(2);
    p.v_batch_stride = v.stride(0); p.v_row_stride = v.stride(1); p.v_head_stride = v.stride(2);
    p.o_batch_stride = out.stride(0); p.o_row_stride = out.stride(1); p.o_head_stride = out.stride(2);
    p.batch = int(batch); p.heads = int(heads); p.seqlen_q = int(seqlen_q); p.seqlen_k = int(seqlen_k);
    p.head_dim = int(head_dim);
    p.scale_log2 = float(scale * M_LOG2E);  // the kernel exponentiates with exp2
    p.is_bf16 = dtype == at::kBFloat16;
    p.sm = sm;
    p.max_smem_per_block = max_smem;
    p.num_sms = props->multiProcessorCount;
    p.variant = int(variant);
    C10_CUDA_CHECK(mem_eff_attn_fwd(p, at::cuda::getCurrentCUDAStream()));  // launch errors; never synchronizes
    return out;
}

// A norm's weight or bias: on x's device, (size,), contiguous. Each norm checks its dtype rule itself.
static void check_affine(const at::Tensor &t, const at::Tensor &x, int64_t size) {
    CHECK_DEVICE(t);
    TORCH_CHECK(t.device() == x.device(), "weight and bias must be on x's device");
    CHECK_SHAPE(t, size);
    TORCH_CHECK(t.is_contiguous(), "weight and bias must be contiguous");
}

static GnDtype gn_dtype(at::ScalarType t) {
    return t == at::kHalf ? GnDtype::kHalf : t == at::kBFloat16 ? GnDtype::kBFloat16 : GnDtype::kFloat;
}

// x: (batch, channels, *pixels), float16, bfloat16 or float32, contiguous (NCHW) or, with 4 dimensions, channels-last
// (NHWC); weight and bias: (channels,) in x's dtype or float32, or absent; channel_add: (batch, channels) in x's
// dtype, each row dense, rows any multiple of 16 bytes apart (0 included), or absent. Returns
// GroupNorm(x + channel_add[:, :, None, None]), then SiLU when `silu`, in x's dtype and memory format.
at::Tensor group_norm(at::Tensor x, int64_t groups, std::optional<at::Tensor> weight, std::optional<at::Tensor> bias,
                      double eps, bool silu, std::optional<at::Tensor> channel_add) {
    CHECK_DEVICE(x);
    CHECK_MSG(x.dim() >= 3, "x must have at least 3 dimensions (batch, channels, pixels...), got " + str(x.dim()));
    const auto dtype = x.scalar_type();
    TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
                "x must be float16, bfloat16 or float32");
    const int64_t batch = x.size(0), channels = x.size(1), pixels = x.numel() / std::max<int64_t>(batch * channels, 1);
    CHECK_MSG(groups >= 1 && channels % groups == 0,
              "channels (" + str(channels) + ") must be a multiple of groups (" + str(groups) + ")");
    const bool channels_last = x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
    TORCH_CHECK(channels_last || x.is_contiguous(), "x must be contiguous or, with 4 dimensions, channels-last");
    const int64_t per_vector = dtype == at::kFloat ? 4 : 8;  // the kernels read 16-byte vectors
    CHECK_MSG(channels_last ? channels % per_vector == 0 : pixels % per_vector == 0,
              std::string(channels_last ? "channels" : "pixels (the product of the dimensions after channels)") +
                  " must be a multiple of " + str(per_vector) + " for this dtype, got " +
                  str(channels_last ? channels : pixels));
    CHECK_MSG(!channels_last || channels <= 2048, "channels-last x may have at most 2048 channels, got " + str(channels));
    TORCH_CHECK(batch <= INT32_MAX && channels <= INT32_MAX && groups <= INT32_MAX, "sizes out of range");
    TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "x must be 16-byte aligned");
    CHECK_MSG(std::isfinite(eps) && eps > 0, "eps must be a positive finite number, got " + std::to_string(eps));
    at::ScalarType param_dtype = dtype;
    for (const auto *param : {&weight, &bias}) {
        if (!param->has_value()) continue;
        const at::Tensor &t = param->value();
        check_affine(t, x, channels);
        TORCH_CHECK(t.scalar_type() == dtype || t.scalar_type() == at::kFloat,
                    "weight and bias must have x's dtype or float32");
        param_dtype = t.scalar_type();
    }
    TORCH_CHECK(!(weight.has_value() && bias.has_value()) || weight->scalar_type() == bias->scalar_type(),
                "weight and bias must have the same dtype");
    if (channel_add.has_value()) {  // the kernels read it as x's dtype, in 16-byte vectors for channels-last x
        const at::Tensor &a = channel_add.value();
        CHECK_DEVICE(a);
        TORCH_CHECK(a.device() == x.device(), "channel_add must be on x's device");
        CHECK_MSG(a.sizes() == at::IntArrayRef({batch, channels}),
                  "channel_add must have shape (batch, channels) = " + str(at::IntArrayRef({batch, channels})) +
                      ", got " + str(a.sizes()));
        TORCH_CHECK(a.scalar_type() == dtype, "channel_add must be in x's dtype");
        // rows may lie apart (a slice of a wider matrix) or coincide (stride 0), each row's channels dense; the
        // kernels read rows in 16-byte vectors
        CHECK_MSG((a.stride(1) == 1 || channels == 1) && a.stride(0) >= 0 && a.stride(0) % per_vector == 0,
                  "channel_add's channels must be dense and its row stride a multiple of " + str(per_vector) +
                      ", got strides " + str(a.strides()));
        TORCH_CHECK(reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 == 0, "channel_add must be 16-byte aligned");
    }

    at::cuda::CUDAGuard device_guard{x.device()};
    at::Tensor y = at::empty_like(x, channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
    if (x.numel() == 0) return y;
    GroupNormParams p{};
    p.pixels = pixels; p.batch = int(batch); p.channels = int(channels); p.groups = int(groups);
    p.dtype = gn_dtype(dtype); p.param_dtype = gn_dtype(param_dtype);
    const GroupNormPlan plan = group_norm_plan(pixels, p.batch, p.channels, p.groups, channels_last, p.dtype, silu);
    p.splits = plan.splits; p.resident = plan.resident;
    at::Tensor partials = at::empty({batch * groups * p.splits * 3}, x.options().dtype(at::kFloat));
    at::Tensor scale_shift = at::empty({batch * channels * 2}, x.options().dtype(at::kFloat));
    p.x = x.data_ptr(); p.y = y.data_ptr();
    p.weight = weight.has_value() ? weight->data_ptr() : nullptr;
    p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
    p.channel_add = channel_add.has_value() ? channel_add->data_ptr() : nullptr;
    p.add_stride = channel_add.has_value() ? channel_add->stride(0) : 0;
    p.partials = partials.data_ptr<float>(); p.scale_shift = scale_shift.data_ptr<float>();
    p.eps = float(eps); p.channels_last = channels_last; p.silu = silu;
    C10_CUDA_CHECK(group_norm_fwd(p, at::cuda::getCurrentCUDAStream()));  // launch errors; never synchronizes
    return y;
}

// The row-wise kernels' (GEGLU, LayerNorm) common checks on x: a contiguous CUDA tensor of at least one dimension,
// float16, bfloat16 or float32. Returns the elements in the 16-byte vectors they read.
static int64_t check_rows(const at::Tensor &x) {
    CHECK_DEVICE(x);
    CHECK_MSG(x.dim() >= 1, "x must have at least one dimension");
    const auto dtype = x.scalar_type();
    TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
                "x must be float16, bfloat16 or float32");
    TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
    return dtype == at::kFloat ? 4 : 8;
}

// x: (..., 2 * width), contiguous, float16, bfloat16 or float32: a GEGLU projection's output [hidden | gate].
// Returns hidden * GELU(gate), (..., width), contiguous, in x's dtype; GELU in its exact (erf) form.
at::Tensor geglu(at::Tensor x) {
    const int64_t per_vector = check_rows(x), last = x.size(-1);
    const auto dtype = x.scalar_type();
    CHECK_MSG(last % (2 * per_vector) == 0, "x's last dimension must be twice a multiple of " + str(per_vector) +
                                                " for this dtype, got " + str(last));
    TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "x must be 16-byte aligned");
    at::cuda::CUDAGuard device_guard{x.device()};
    auto shape = x.sizes().vec();
    shape.back() = last / 2;
    at::Tensor y = at::empty(shape, x.options());
    GegluParams p{x.data_ptr(), y.data_ptr(), last == 0 ? 0 : x.numel() / last, last / 2, last,
                  dtype == at::kHalf ? GegluDtype::kHalf : dtype == at::kBFloat16 ? GegluDtype::kBFloat16
                                                                                  : GegluDtype::kFloat};
    C10_CUDA_CHECK(geglu_fwd(p, at::cuda::getCurrentCUDAStream()));  // launch errors; never synchronizes
    return y;
}

// x: (..., width), contiguous, float16, bfloat16 or float32; weight and bias: (width,) in x's dtype, or absent;
// residual: x's shape and dtype, contiguous, or absent. Returns [LayerNorm(x)] or, with a residual,
// [LayerNorm(s), s] for s = x + residual (rounded to the dtype), each like x.
std::vector<at::Tensor> layer_norm(at::Tensor x, std::optional<at::Tensor> weight, std::optional<at::Tensor> bias,
                                   double eps, std::optional<at::Tensor> residual) {
    const int64_t per_vector = check_rows(x), width = x.size(-1);
    const auto dtype = x.scalar_type();
    CHECK_MSG(width > 0 && width % per_vector == 0 && width / per_vector <= kLayerNormMaxVectors,
              "x's last dimension must be a positive multiple of " + str(per_vector) + " up to " +
                  str(per_vector * kLayerNormMaxVectors) + " for this dtype, got " + str(width));
    TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "x must be 16-byte aligned");
    CHECK_MSG(std::isfinite(eps) && eps > 0, "eps must be a positive finite number, got " + std::to_string(eps));
    for (const auto *param : {&weight, &bias}) {
        if (!param->has_value()) continue;
        const at::Tensor &t = param->value();
        check_affine(t, x, width);
        TORCH_CHECK(t.scalar_type() == dtype, "weight and bias must be in x's dtype");
        TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "weight and bias must be 16-byte aligned");
    }
    if (residual.has_value()) {
        const at::Tensor &r = residual.value();
        CHECK_DEVICE(r);
        TORCH_CHECK(r.device() == x.device(), "residual must be on x's device");
        CHECK_MSG(r.sizes() == x.sizes(), "residual must have x's shape " + str(x.sizes()) + ", got " + str(r.sizes()));
        TORCH_CHECK(r.is_contiguous() && r.scalar_type() == dtype, "residual must be contiguous, in x's dtype");
        TORCH_CHECK(reinterpret_cast<uintptr_t>(r.data_ptr()) % 16 == 0, "residual must be 16-byte aligned");
    }
    at::cuda::CUDAGuard device_guard{x.device()};
    std::vector<at::Tensor> out{at::empty_like(x)};
    if (residual.has_value()) out.push_back(at::empty_like(x));
    LayerNormParams p{};
    p.x = x.data_ptr(); p.y = out[0].data_ptr();
    p.residual = residual.has_value() ? residual->data_ptr() : nullptr;
    p.sum = residual.has_value() ? out[1].data_ptr() : nullptr;
    p.weight = weight.has_value() ? weight->data_ptr() : nullptr;
    p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
    p.rows = x.numel() / width; p.width = int(width); p.eps = float(eps);
    p.dtype = dtype == at::kHalf ? LnDtype::kHalf : dtype == at::kBFloat16 ? LnDtype::kBFloat16 : LnDtype::kFloat;
    C10_CUDA_CHECK(layer_norm_fwd(p, at::cuda::getCurrentCUDAStream()));  // launch errors; never synchronizes
    return out;
}

// Ops live in the dispatcher (torch.ops.sdrun_C.*): torch translates their errors into Python exceptions itself.
at::Tensor fwd(at::Tensor q, at::Tensor k, at::Tensor v, double scale, int64_t variant) {
    return mem_eff_attn_fwd_torch(q, k, v, scale, std::nullopt, variant);
}
void fwd_out(at::Tensor q, at::Tensor k, at::Tensor v, double scale, at::Tensor out, int64_t variant) {
    mem_eff_attn_fwd_torch(q, k, v, scale, out, variant);  // tests poison `out` first to catch unwritten elements
}
int64_t bucket(int64_t head_dim) { return mem_eff_attn_bucket(int(head_dim)); }

// src: float8_e4m3fn, any shape, non-overlapping and dense (a parameter: contiguous or channels-last); returns the
// same values in `dtype` (float16 or bfloat16) with src's shape and strides.
at::Tensor widen_fp8(at::Tensor src, at::ScalarType dtype) {
    CHECK_DEVICE(src);
    TORCH_CHECK(src.scalar_type() == at::kFloat8_e4m3fn, "src must be float8_e4m3fn");
    TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, "dtype must be float16 or bfloat16");
    TORCH_CHECK(src.is_non_overlapping_and_dense(), "src must be non-overlapping and dense (e.g. contiguous)");
    at::cuda::CUDAGuard device_guard{src.device()};
    at::Tensor out = at::empty_like(src, src.options().dtype(dtype));  // dense: the strides of src, element for element
    TORCH_CHECK(out.strides() == src.strides(), "internal: the widened tensor's strides differ from src's");
    Fp8WidenParams p{src.data_ptr(), out.data_ptr(), src.numel(), dtype == at::kBFloat16};
    C10_CUDA_CHECK(fp8_widen(p, at::cuda::getCurrentCUDAStream()));  // launch errors; never synchronizes
    return out;
}

TORCH_LIBRARY(sdrun_C, m) {
    m.def("fwd(Tensor q, Tensor k, Tensor v, float scale, int variant=0) -> Tensor");
    m.def("fwd_out(Tensor q, Tensor k, Tensor v, float scale, Tensor(a!) out, int variant=0) -> ()");
    m.def("bucket(int head_dim) -> int", &bucket);
    m.def("widen_fp8(Tensor src, ScalarType dtype) -> Tensor");
    m.def("group_norm(Tensor x, int groups, Tensor? weight, Tensor? bias, float eps, bool silu, "
          "Tensor? channel_add=None) -> Tensor");
    m.def("geglu(Tensor x) -> Tensor");
    m.def("layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps, Tensor? residual=None) -> Tensor[]");
}
TORCH_LIBRARY_IMPL(sdrun_C, CUDA, m) {
    m.impl("fwd", &fwd);
    m.impl("fwd_out", &fwd_out);
    m.impl("widen_fp8", &widen_fp8);
    m.impl("group_norm", &group_norm);
    m.impl("geglu", &geglu);
    m.impl("layer_norm", &layer_norm);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}  // importing the module registers the ops above
