"""Plain-PyTorch attention, the yardstick for tests and `sdrun info`'s self-test (flash-attention's attention_ref)."""

from __future__ import annotations

import math

import torch


def reference_attention(q, k, v, scale: float | None = None, upcast: bool = True, reorder_ops: bool = False):
    """softmax(scale * q k^T) v for (batch, seqlen, heads, head_dim) tensors, materialising the whole score matrix.

    upcast=True computes in float32 (the truth to compare with); upcast=False, reorder_ops=True estimates what a
    same-precision PyTorch implementation gets (scale applied to k instead of q). Returns the dtype of q.
    """
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if not reorder_ops:
        scores = torch.einsum("bthd,bshd->bhts", q * scale, k)
    else:
        scores = torch.einsum("bthd,bshd->bhts", q, k * scale)
    attn = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.einsum("bhts,bshd->bthd", attn, v).to(dtype)
