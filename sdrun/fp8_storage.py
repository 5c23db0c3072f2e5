"""fp8 weight storage: the weights of a model's linear and convolution layers kept in float8_e4m3fn, each cast to
the model's compute dtype (fp16 on the GPU with --fp16, else fp32) only while its own layer runs.

What stays in the compute dtype, and why:
- norms (GroupNorm, LayerNorm) and embedding tables are never covered: they are not linear or convolution layers,
  and their few parameters set the scale of everything after them;
- every bias: a few thousand values a layer, added unscaled to the output, where e4m3's 3-bit mantissa (up to 6%
  error) would shift whole channels; diffusers' layerwise casting stores them in fp8 too;
- the UNet's first and last convolutions (conv_in, conv_out: the latents in, the noise prediction out, 0.03% of
  SD 1.5's parameters) and its timestep and SDXL size/pooled-text embeddings, which condition every block;
- the text encoders' output projection (SDXL's pooled embedding).

The cast happens in a forward hook (diffusers' HookRegistry, the machinery of its `enable_layerwise_casting`), so
the fp8 tensor is what `.to(device)`, model offload and sequential offload move. On a GPU the cast is sdrun's
widening kernel (csrc/fp8_widen.cu: torch's own fp8 cast runs at a third of the memory bandwidth, and SD 1.5's 278
layers then cost 3.2 ms of each UNet call). Products are computed in the compute dtype: real fp8 matrix products
(torch._scaled_mm, sm_89+) took 1.5-3.4x as long at the UNet's linear shapes on an H200, quantizing the activations
each call included (bench/fp8_matmul.py), and are not used.
"""

import torch
from diffusers.hooks import HookRegistry, ModelHook

from sdrun.backends.fp8 import storage_dtype

HOOK_NAME = "sdrun_fp8_storage"
COVERED_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)
# Submodule names (one path component of a layer's name) whose layers keep the compute dtype, per component kind.
KEPT = {
    "unet": ("conv_in", "conv_out", "time_embedding", "add_embedding"),
    "text": ("embeddings", "text_projection"),
}


# An unfused LoRA's own small layers (PEFT's lora_A, lora_B, ...) keep the compute dtype: PEFT casts a layer's
# input to its LoRA weights' dtype, which in fp8 would feed fp8 activations to the cast-back weights. The layer
# the LoRA wraps (base_layer) is stored in fp8 like any other.
LORA_PARTS = ("lora_",)


class WeightStorageHook(ModelHook):
    """One layer's weight in fp8 between calls and in the compute dtype during its own forward. The fp8 tensor is
    put back after the call, not recomputed: fp8 values are exact in fp16 and fp32, so nothing drifts."""

    _is_stateful = False

    def __init__(self, compute_dtype: torch.dtype, widen):
        super().__init__()
        self.compute_dtype, self.widen = compute_dtype, widen
        self.stored = None

    def initialize_hook(self, module):
        module.weight.data = module.weight.data.to(storage_dtype())
        return module

    def pre_forward(self, module, *args, **kwargs):
        self.stored = module.weight.data
        module.weight.data = self.widen(self.stored, self.compute_dtype)
        return args, kwargs

    def post_forward(self, module, output):
        module.weight.data, self.stored = self.stored, None
        return output


def covered_layers(model: torch.nn.Module, kind: str) -> list[tuple[str, torch.nn.Module]]:
    """The (name, layer) pairs of `model` whose weights fp8 stores; `kind` is "unet" or "text"."""
    kept = KEPT[kind]
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, COVERED_LAYERS) and not set(name.split(".")) & set(kept)
            and not any(part.startswith(LORA_PARTS) for part in name.split("."))]


def covered_share(model: torch.nn.Module, kind: str) -> float:
    """The share of `model`'s parameters that fp8 stores (the weights of its covered layers)."""
    covered = sum(layer.weight.numel() for _, layer in covered_layers(model, kind))
    return covered / sum(p.numel() for p in model.parameters())


def torch_widen(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight.to(dtype)


def widener(device: torch.device):
    """How weights are widened on `device`, and a sentence when that is slower than it could be: on a GPU, sdrun's
    kernel (loaded, or compiled once, here); torch's cast on the CPU, or on a GPU where the kernel is unavailable."""
    if device.type != "cuda":
        return torch_widen, None
    from sdrun import ops
    from sdrun.errors import KernelUnavailable
    from sdrun.ops import _ext

    try:
        ops.load(device)
    except KernelUnavailable as unavailable:
        return torch_widen, ("fp8 weights widened by torch's cast, which runs at a third of the memory bandwidth, "
                             f"since sdrun's kernel is unavailable: {unavailable}")
    if _ext.get(device).widen_fp8 is None:
        return torch_widen, ("fp8 weights widened by torch's cast: the prebuilt kernels predate sdrun's fp8 one; "
                             "reinstall sdrun (`pip install --no-build-isolation .`) to rebuild them")
    if not _widens_like_torch(ops.widen_fp8, device):
        return torch_widen, ("fp8 weights widened by torch's cast: sdrun's kernel failed or disagreed with it on "
                             "this GPU (please report it, with `sdrun info`)")
    return ops.widen_fp8, None


def _widens_like_torch(widen, device: torch.device) -> bool:
    """Every e4m3 value, in both compute dtypes and through both of the kernel's paths (16 at a time, and one at a
    time for an unaligned start and the tail), as torch's cast gives it: once a run, before any weight is
    widened, so that a kernel miscompiled for some GPU cannot change an image silently."""
    values = torch.arange(256, dtype=torch.uint8, device=device).repeat(3).view(storage_dtype())
    for dtype in (torch.float16, torch.bfloat16):
        for part in (values, values[1:-2]):
            try:
                ours, theirs = widen(part, dtype), part.to(dtype)
            except RuntimeError:  # e.g. no kernel image for this GPU in a prebuilt extension
                return False
            nan = torch.isnan(theirs)
            if not (torch.equal(torch.isnan(ours), nan) and torch.equal(ours[~nan], theirs[~nan])):
                return False
    return True


def store_in_fp8(model: torch.nn.Module, kind: str, compute_dtype: torch.dtype, widen=torch_widen) -> int:
    """Store the covered weights of `model` in fp8 from now on, each `widen(weight, compute_dtype)`ed while its
    layer runs; returns how many layers."""
    layers = covered_layers(model, kind)
    for _, layer in layers:
        hook = WeightStorageHook(compute_dtype, widen)
        HookRegistry.check_if_exists_or_initialize(layer).register_hook(hook, HOOK_NAME)
    return len(layers)
