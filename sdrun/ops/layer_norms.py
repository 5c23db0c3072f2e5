"""LayerNorm on sdrun's kernel (csrc/layer_norm.cu), fused with the residual addition before it, and its place in
the UNet's transformer blocks.

    layer_norm(x, norm) -> norm(x)
    add_layer_norm(x, residual, norm) -> (x + residual, norm(x + residual))

run the kernel for CUDA tensors it supports (contiguous float16, bfloat16 or float32 rows whose width is a multiple
of 8, of 4 for float32, with the norm's parameters in x's dtype) once the extension is loaded, and PyTorch
otherwise, so the models run anywhere. `install_fused_layer_norms(unet)` gives every transformer block of the SD
shape (diffusers' BasicTransformerBlock with plain LayerNorms: SD 1.x, 2.x and SDXL) a forward whose residual
additions after self-attention and cross-attention happen in the LayerNorm that follows each: the sum is written
once and never read back for the norm. The feed-forward's addition has no norm after it and stays PyTorch's.

--xformers installs it. Measured on an H100 (twelfth session, docs/benchmarks.md): the kernel 1.1-3.2x PyTorch's
LayerNorm per call on the SD 1.5 shapes (2.0-3.0x with the addition, against PyTorch's add then norm), and one UNet
forward with channels-last 6.62 -> 6.43 ms at 512x512, 27.15 -> 26.58 ms at 1024x1024 (`bench/layer_norm.py`,
`bench/unet_profile.py --fused-layer-norms`). Its output equalled PyTorch's bit for bit on the tiny UNet: both
reduce in float32 and round once.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from sdrun.ops import _ext


def kernel_takes(x: torch.Tensor, norm: nn.LayerNorm, residual: torch.Tensor | None = None) -> bool:
    """Whether the kernel computes this call (the binding's checks, made here so that others go to PyTorch)."""
    if not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not x.is_contiguous():
        return False
    if not _ext.loaded() or _ext.get(x.device).layer_norm is None or x.data_ptr() % 16 or x.numel() == 0:
        return False
    width, per_vector = x.shape[-1], 4 if x.dtype == torch.float32 else 8
    if tuple(norm.normalized_shape) != (width,) or width % per_vector or width > 512 * per_vector:
        return False
    params = [p for p in (norm.weight, norm.bias) if p is not None]
    if any(p.dtype != x.dtype or p.device != x.device or not p.is_contiguous() or p.data_ptr() % 16 for p in params):
        return False
    return residual is None or (residual.shape == x.shape and residual.dtype == x.dtype and residual.is_contiguous()
                                and residual.device == x.device and residual.data_ptr() % 16 == 0)


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    if kernel_takes(x, norm):
        return _ext.get(x.device).layer_norm(x, norm.weight, norm.bias, norm.eps)[0]
    return norm(x)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, norm(x + residual)), the sum rounded to the dtype before the norm reads it, as PyTorch's
    addition rounds it."""
    if kernel_takes(x, norm, residual):
        normed, total = _ext.get(x.device).layer_norm(x, norm.weight, norm.bias, norm.eps, residual)
        return total, normed
    total = x + residual
    return total, norm(total)


def fused_transformer_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                              encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None,
                              class_labels=None, added_cond_kwargs=None):
    """diffusers' BasicTransformerBlock.forward (0.42) for norm_type "layer_norm" without positional embedding:
    self-attention, cross-attention and feed-forward, each after its LayerNorm and added to the residual stream,
    the first two additions made by the norm after them. GLIGEN inputs, forward chunking and 4-D inputs take
    diffusers' own forward."""
    kwargs = dict(cross_attention_kwargs or {})
    if "gligen" in kwargs or self._chunk_size is not None or hidden_states.ndim != 3:
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                  timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
    attn_output = self.attn1(layer_norm(hidden_states, self.norm1),
                             encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
                             attention_mask=attention_mask, **kwargs)
    hidden_states, normed = add_layer_norm(attn_output, hidden_states, self.norm2)
    attn_output = self.attn2(normed, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=encoder_attention_mask, **kwargs)
    hidden_states, normed = add_layer_norm(attn_output, hidden_states, self.norm3)
    return self.ff(normed) + hidden_states


def _fusable(block) -> bool:
    return (type(block).__name__ == "BasicTransformerBlock" and block.norm_type == "layer_norm"
            and block.pos_embed is None and block.attn2 is not None
            and all(type(getattr(block, name)) is nn.LayerNorm for name in ("norm1", "norm2", "norm3")))


def install_fused_layer_norms(unet: nn.Module) -> int:
    """Give every transformer block of the SD shape the fused forward; returns how many."""
    blocks = [module for module in unet.modules() if _fusable(module)]
    for block in blocks:
        block.forward = types.MethodType(fused_transformer_forward, block)
    return len(blocks)
