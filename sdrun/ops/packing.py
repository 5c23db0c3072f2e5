"""Linear layers that read the same input, laid side by side in one tensor so that one GEMM computes them all.

`pack_linears(layers)` copies the layers' weights (and biases, when every layer has one) into one tensor each and
makes every layer's parameter a view of it: no memory is added, the layers' own tensors are freed, and each layer
still computes alone as before. `packed(layers)` gives the spanning (weight, bias) views while the layers still lie
so, and None once anything has given one a tensor of its own (a move, an fp8 cast, a LoRA merged into a copy) or
wraps it (a LoRA layer, a hook): callers then run the layers one by one, so packing never changes what is computed.
A LoRA merged in place changes the packed tensor itself. Pack once the weights are where they stay
(`Backend.placed`).

Used by the attention processor (q, k and v by one GEMM) and the fused ResNet blocks (every block's time-embedding
projection by one GEMM a forward).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def bare_linear(layer) -> bool:
    """A plain nn.Linear that nothing wraps (a PEFT LoRA layer is not one) and no hook runs around (offload, fp8)."""
    return type(layer) is nn.Linear and "forward" not in vars(layer) and not layer._forward_hooks \
        and not layer._forward_pre_hooks


def pack_linears(layers) -> bool:
    """Lay the layers' weights (and biases, if all have one) side by side; False, changing nothing, unless every
    layer is bare and they share input width, dtype and device."""
    if not all(map(bare_linear, layers)) or len({layer.bias is None for layer in layers}) != 1 \
            or len({(layer.in_features, layer.weight.dtype, layer.weight.device) for layer in layers}) != 1:
        return False
    for name in ("weight", "bias"):
        if getattr(layers[0], name) is None:
            continue
        joined = torch.cat([getattr(layer, name).detach() for layer in layers])
        start = 0
        for layer in layers:
            getattr(layer, name).data = joined[start:start + layer.out_features]
            start += layer.out_features
    return True


def packed(layers) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) spanning `layers` when they lie side by side as `pack_linears` laid them and run bare; the
    bias is None when the layers have none. Else None."""
    views = []
    for name in ("weight", "bias"):
        first = getattr(layers[0], name)
        if first is None:
            if any(layer.bias is not None for layer in layers):
                return None
            views.append(None)
            continue
        row = math.prod(first.shape[1:])  # elements a row: the input width of a weight, 1 for a bias
        storage, rows = first.untyped_storage().data_ptr(), 0
        for layer in layers:
            tensor = getattr(layer, name)
            if not bare_linear(layer) or tensor is None or not tensor.is_contiguous() or tensor.dtype != first.dtype \
                    or tensor.shape[1:] != first.shape[1:] or tensor.untyped_storage().data_ptr() != storage \
                    or tensor.storage_offset() != first.storage_offset() + rows * row:
                return None
            rows += tensor.shape[0]
        views.append(first.as_strided((rows, *first.shape[1:]), first.stride()))
    return views[0], views[1]
