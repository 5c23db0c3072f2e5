"""GEGLU's gate on sdrun's kernel (csrc/geglu.cu), and its place in the UNet.

    geglu(projected) -> projected[..., :n] * GELU(projected[..., n:])   (n = half the last dimension)

runs the kernel for CUDA tensors it supports (contiguous float16, bfloat16 or float32 whose last dimension is twice a
multiple of 8, of 4 for float32) once the extension is loaded, and diffusers' own two operations otherwise, so the
UNet runs anywhere. `install_fused_geglu(unet)` gives every GEGLU of the UNet's feed-forward layers (diffusers'
`GEGLU`, GELU in its exact form, in every transformer block of SD 1.x, 2.x and SDXL) a forward that projects, then
gates in one pass: diffusers' chunk() leaves the two halves strided, so PyTorch's GELU and product ran its generic
strided elementwise kernel twice, with a rounded intermediate.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from sdrun.ops import _ext


def kernel_takes(projected: torch.Tensor) -> bool:
    """Whether the kernel computes this input (the binding's checks, made here so that others go to PyTorch)."""
    if not projected.is_cuda or projected.dim() < 1 or projected.dtype not in (torch.float16, torch.bfloat16,
                                                                                 torch.float32):
        return False
    if not _ext.loaded() or _ext.get(projected.device).geglu is None:
        return False
    per_vector = 4 if projected.dtype == torch.float32 else 8
    return projected.is_contiguous() and projected.shape[-1] % (2 * per_vector) == 0 and projected.data_ptr() % 16 == 0


def geglu(projected: torch.Tensor) -> torch.Tensor:
    """The first half of the last dimension times GELU of the second: the kernel where it applies, else PyTorch."""
    if kernel_takes(projected):
        return _ext.get(projected.device).geglu(projected)
    hidden, gate = projected.chunk(2, dim=-1)
    return hidden * F.gelu(gate)


def fused_geglu_forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers' GEGLU.forward (0.42) with the gate in one pass; like it, ignores the deprecated `scale`."""
    return geglu(self.proj(hidden_states))


def install_fused_geglu(unet: nn.Module) -> int:
    """Give every diffusers GEGLU of `unet` the one-pass gate; returns how many it changed. Subclasses and modules
    whose gelu was overridden keep their own forward."""
    from diffusers.models.activations import GEGLU

    changed = 0
    for module in unet.modules():
        if type(module) is GEGLU and "gelu" not in module.__dict__:
            module.forward = types.MethodType(fused_geglu_forward, module)
            changed += 1
    return changed
