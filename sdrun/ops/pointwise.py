"""1x1 convolutions on channels-last activations as GEMMs, with the bias in cuBLAS's epilogue, and the test of
whether a convolution may be run without its bias so that a pass the caller makes anyway adds it.

Why: cuDNN's convolutions leave the bias to PyTorch, which adds it to an NHWC output in a broadcast pass of its own
(its generic strided `elementwise_kernel`): about 90 passes a UNet forward, 0.57 ms of 7.28 at 512x512 and 1.58 ms
at 1024x1024 (H100, tenth session). On the NHWC view a 1x1 convolution is the product (pixels, C_in) x (C_in, C_out),
and `F.linear` runs it through cublasLt with the bias added as the result is written. The 3x3 convolutions of a
ResNet block lose their bias passes in `ops.norms.fused_resnet_forward`: conv1's is added by the GroupNorm after it
as it reads, conv2's by the shortcut's epilogue.

`install_pointwise_convs(model)` (--channels-last) puts `PointwiseConv` in place of every plain 1x1 convolution:
the same Parameters under the same names, so LoRA (PEFT wraps it like any Conv2d), fp8 storage and offload hooks
apply as before; an NCHW input takes cuDNN's path unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PointwiseConv(nn.Conv2d):
    """nn.Conv2d of a 1x1 kernel, stride 1, no padding, one group, that runs a channels-last input as a GEMM."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv.in_channels, conv.out_channels, 1, bias=False, device="meta")
        self.weight, self.bias = conv.weight, conv.bias  # the same Parameters, not copies

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.dim() != 4 or not x.permute(0, 2, 3, 1).is_contiguous():
            return super()._conv_forward(x, weight, bias)
        batch, channels, height, width = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, channels)  # a view: (pixels, C_in)
        out = F.linear(rows, weight.flatten(1), bias)
        return out.view(batch, height, width, -1).permute(0, 3, 1, 2)  # NCHW shape, channels-last memory


def _pointwise(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.padding in ((0, 0), "valid") and module.dilation == (1, 1) and module.groups == 1
            and module.padding_mode == "zeros")


def install_pointwise_convs(model: nn.Module) -> int:
    """Replace every plain 1x1 convolution of `model` by a PointwiseConv; returns how many."""
    changed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _pointwise(child) and runs_bare(child):
                setattr(parent, name, PointwiseConv(child))
                changed += 1
    return changed


def runs_bare(conv: nn.Module) -> bool:
    """Whether calling `conv._conv_forward` does all that calling `conv` would: a Conv2d whose class keeps
    nn.Conv2d's forward, with no hook (offload, fp8 storage) and no forward of its own (the banded decode's). A LoRA
    layer (PEFT's wraps the convolution) is not a Conv2d. Only such a convolution may be run without its bias."""
    return (isinstance(conv, nn.Conv2d) and type(conv).forward is nn.Conv2d.forward and "forward" not in vars(conv)
            and not conv._forward_hooks and not conv._forward_pre_hooks)
