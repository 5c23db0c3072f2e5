"""The Python face of sdrun's attention kernel: a thin wrapper registered as a torch custom op.

    memory_efficient_attention(q, k, v, scale=None) -> o
    q: (batch, seqlen_q, heads, head_dim), k and v: (batch, seqlen_k, heads, head_dim), on one CUDA device,
    all float16 or all bfloat16 (bfloat16 needs compute capability 8.0+). head_dim: a multiple of 8 up to 256
    (compiled buckets 32, 40, 64, 80, 96, 128, 160, 192, 256; others pad up with zeros). Any seqlen >= 1.
    Strided inputs are fine as long as the last dimension is contiguous (else they are copied).
    o: (batch, seqlen_q, heads, head_dim), contiguous, dtype of q. scale defaults to 1 / sqrt(head_dim).

Inference only: there is no backward and no autograd.Function. Registered as `sdrun::mem_eff_attn` with a fake
(meta) implementation, so torch.compile(fullgraph=True) and CUDA graph capture go through it.
"""

from __future__ import annotations

import math

import torch

from sdrun.ops import _ext


def maybe_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous() if x.stride(-1) != 1 else x


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return _ext.get(q.device if q.is_cuda else None).fwd(maybe_contiguous(q), maybe_contiguous(k), maybe_contiguous(v), scale)


@torch.library.custom_op("sdrun::mem_eff_attn", mutates_args=())
def mem_eff_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return _forward(q, k, v, scale)


@mem_eff_attn.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    torch._check(k.shape[0] == q.shape[0] and k.shape[2] == q.shape[2] and k.shape[3] == q.shape[3])
    torch._check(v.shape == k.shape)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def memory_efficient_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(scale * q k^T) v in (batch, seqlen, heads, head_dim) layout; see the module docstring."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if torch.compiler.is_compiling():
        return mem_eff_attn(q, k, v, float(scale))  # traceable: the custom op and its fake implementation
    # Eager: call the compiled op directly. torch.library's Python dispatch adds a fixed cost per call, which
    # matters for SD's many small attention calls (bench/unet.py measures both ways).
    return _forward(q, k, v, float(scale))
