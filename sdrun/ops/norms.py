"""GroupNorm, fused with the SiLU that follows it, on sdrun's kernel (csrc/group_norm.cu), and its place in the UNet
and the VAE.

    group_norm(x, groups, weight, bias, eps, silu=False, channel_add=None)
        -> GroupNorm(x + channel_add[:, :, None, None]), then SiLU when `silu`

runs the kernel for CUDA tensors it supports (float16, bfloat16 or float32; NCHW with a multiple of 8 pixels, 4
for float32, or channels-last with such a multiple of channels) once the extension is loaded, and PyTorch's
GroupNorm and SiLU otherwise, so the models run anywhere. `channel_add` is a per-(image, channel) value added to x
first: a ResNet block's time embedding, which the kernel adds as it reads x, so the sum is never written.

`install_fused_norms(model)` puts it on every GroupNorm of the UNet or the VAE: each ResNet block's two norms run
fused with their SiLU, the second also adding the time embedding and the bias of the convolution before it (the
block's forward is diffusers' default one with those changes, and only blocks of that shape are changed), each
transformer's or attention's input norm runs plain, and an output norm runs fused with the SiLU after it. Under
a TorchFunctionMode the norms call PyTorch's `F.group_norm`, which the mode sees: the tiled VAE's shared statistics
work that way (render/shared_norm_tiles.py).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sdrun.ops import _ext
from sdrun.ops.packing import pack_linears, packed
from sdrun.ops.pointwise import runs_bare


def kernel_takes(x: torch.Tensor) -> bool:
    """Whether the kernel computes this x (the binding's checks, made here so that other inputs go to PyTorch)."""
    if not x.is_cuda or x.dim() < 3 or x.numel() == 0 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if not _ext.loaded() or _ext.get(x.device).group_norm is None:
        return False
    per_vector = 4 if x.dtype == torch.float32 else 8
    if x.data_ptr() % 16:
        return False
    if x.is_contiguous():
        return x[0, 0].numel() % per_vector == 0
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] % per_vector == 0 \
        and x.shape[1] <= 2048


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               silu: bool = False, channel_add: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm of x + channel_add (B, C) (then SiLU when `silu`): the kernel where it applies (see kernel_takes),
    else PyTorch; PyTorch too while a TorchFunctionMode is active, so that the mode sees `F.group_norm`."""
    params = [p for p in (weight, bias) if p is not None]
    dtypes = {p.dtype for p in params}  # the binding takes them on x's device, in one dtype: x's or float32
    params_fit = all(p.device == x.device for p in params) and len(dtypes) <= 1 and dtypes <= {x.dtype, torch.float32}
    add_fits = channel_add is None or (channel_add.shape == x.shape[:2] and channel_add.dtype == x.dtype
                                       and channel_add.device == x.device)
    if params_fit and add_fits and kernel_takes(x) and x.shape[1] % groups == 0 \
            and not torch._C._is_torch_function_mode_enabled():
        return _ext.get(x.device).group_norm(x, groups, weight, bias, eps, silu, _rows_as_read(channel_add))
    if channel_add is not None:
        x = x + channel_add.view(*channel_add.shape, *[1] * (x.dim() - 2))
    y = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(y) if silu else y


def _rows_as_read(channel_add: torch.Tensor | None) -> torch.Tensor | None:
    """channel_add as the binding reads it: each row's channels dense, rows a multiple of 16 bytes apart (0
    included: one row for every image) from a 16-byte aligned start; a copy only when it is not already so."""
    if channel_add is None:
        return None
    per_vector = 16 // channel_add.element_size()
    if channel_add.stride(1) == 1 and channel_add.stride(0) % per_vector == 0 and channel_add.data_ptr() % 16 == 0:
        return channel_add
    add = channel_add.contiguous()
    return add if add.data_ptr() % 16 == 0 else add.clone()


class FusedGroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters, same state-dict keys) that runs sdrun's kernel, with SiLU after it when
    `silu`."""

    def __init__(self, norm: nn.GroupNorm, silu: bool):
        super().__init__(norm.num_groups, norm.num_channels, norm.eps, affine=False)
        self.weight, self.bias = norm.weight, norm.bias  # the same Parameters, not copies
        self.affine, self.silu = norm.affine, silu

    def forward(self, x: torch.Tensor, channel_add: torch.Tensor | None = None) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.silu, channel_add)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", silu={self.silu}"


def fused_resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs):
    """diffusers' ResnetBlock2D.forward (0.42) for blocks that neither resample nor scale-shift, with norm1 and
    norm2 computing the SiLU that follows each, and norm2 adding, as it reads, the projected time embedding and
    conv1's bias (`_norm2_addition`). conv2's bias is added by the shortcut, with its own: in the epilogue of its GEMM
    (ops/pointwise.py) or in cuDNN's one bias pass. A convolution that something wraps (LoRA, a hook) runs whole, as
    diffusers runs it."""
    channel_add, conv1_bias_added = _norm2_addition(self, temb, input_tensor.shape[0])
    hidden_states = self.norm1(input_tensor)
    if conv1_bias_added:
        hidden_states = self.conv1._conv_forward(hidden_states, self.conv1.weight, None)
    else:
        hidden_states = self.conv1(hidden_states)
    if self.time_emb_proj is None and temb is not None and self.time_embedding_norm == "default":
        hidden_states = hidden_states + temb
    hidden_states = self.dropout(self.norm2(hidden_states, channel_add))
    shortcut, conv2 = self.conv_shortcut, self.conv2
    if shortcut is not None and runs_bare(shortcut) and runs_bare(conv2) and None not in (shortcut.bias, conv2.bias):
        output = shortcut._conv_forward(input_tensor, shortcut.weight, shortcut.bias + conv2.bias)
        output += conv2._conv_forward(hidden_states, conv2.weight, None)
    else:
        output = (input_tensor if shortcut is None else shortcut(input_tensor)) + conv2(hidden_states)
    # SD's blocks scale by 1: x / 1.0 is x exactly, and skipping it saves a pass over the block's output
    return output if self.output_scale_factor == 1 else output / self.output_scale_factor


def _norm2_addition(block, temb: torch.Tensor | None, batch: int) -> tuple[torch.Tensor | None, bool]:
    """What `block`'s norm2 adds per (image, channel) before it normalises: the projected time embedding and, when
    conv1 runs bare, conv1's bias; and whether the bias is in it (conv1 then runs without it). Where
    `pack_time_projections` packed the blocks' projections, one GEMM a forward computes them all, biases included."""
    projected = None
    if block.time_emb_proj is not None and temb is not None:
        shared = vars(block).get("sdrun_time_projection")
        projected = None if shared is None else shared.of(block.time_emb_proj, temb)
        if projected is not None and shared.adds_conv1_biases:
            return projected, True
        if projected is None:  # the block's own nonlinearity activates the embedding, as in diffusers
            projected = block.time_emb_proj(temb if block.skip_time_act else block.nonlinearity(temb))
    conv1 = block.conv1
    if not runs_bare(conv1) or conv1.bias is None:
        return projected, False
    return (conv1.bias.expand(batch, -1) if projected is None else projected + conv1.bias), True


class SharedTimeProjection:
    """The time-embedding projections of a UNet's fused ResNet blocks, packed (ops/packing.py): the first block a
    forward reaches computes SiLU(temb) and every block's projection with one GEMM, and each block takes its
    columns. The GEMM's bias also carries each block's conv1 bias while every conv1 runs bare, so that no block adds
    it alone. diffusers runs a SiLU, a GEMM and a broadcast addition in every block (22 of each in SD 1.5), all on
    the same embedding."""

    def __init__(self, blocks: list[nn.Module]):
        self.blocks, self.layers = blocks, [block.time_emb_proj for block in blocks]  # kept: ids stay unique
        self.columns, start = {}, 0
        for layer in self.layers:
            self.columns[id(layer)] = (start, start + layer.out_features)
            start += layer.out_features
        self.source = self.projected = None  # the embedding last projected, and all its projections
        self.adds_conv1_biases = False

    def of(self, layer: nn.Module, temb: torch.Tensor) -> torch.Tensor | None:
        """`layer`'s projection of SiLU(temb) (plus its block's conv1 bias when `adds_conv1_biases`), or None when
        `layer` is not one of the packed layers (a LoRA layer wraps it) or they no longer lie packed: the block then
        projects alone."""
        if id(layer) not in self.columns:
            return None
        if temb is not self.source:
            self.source, self.projected = temb, self._project(temb)
        if self.projected is None:
            return None
        start, stop = self.columns[id(layer)]
        return self.projected[:, start:stop]

    def _project(self, temb: torch.Tensor) -> torch.Tensor | None:
        views = packed(self.layers)
        if views is None:
            return None
        weight, bias = views
        conv1s = [block.conv1 for block in self.blocks]
        self.adds_conv1_biases = bias is not None and all(
            runs_bare(conv) and conv.bias is not None and conv.bias.dtype == bias.dtype for conv in conv1s)
        if self.adds_conv1_biases:
            bias = bias + torch.cat([conv.bias for conv in conv1s])
        return F.linear(F.silu(temb), weight, bias)


def pack_time_projections(unet: nn.Module) -> int:
    """Pack the time-embedding projections of the fused ResNet blocks of `unet` whose embedding goes through a SiLU
    first (every one of SD 1.x, 2.x and SDXL); returns how many blocks share the one GEMM."""
    blocks = [module for module in unet.modules()
              if getattr(vars(module).get("forward"), "__func__", None) is fused_resnet_forward
              and module.time_emb_proj is not None and type(module.nonlinearity) is nn.SiLU
              and not module.skip_time_act]
    if len(blocks) < 2 or not pack_linears([block.time_emb_proj for block in blocks]):
        return 0
    shared = SharedTimeProjection(blocks)
    for block in blocks:
        block.sdrun_time_projection = shared
    return len(blocks)


@dataclass
class NormsReport:
    model: str  # "UNet", "VAE": for the summary
    fused_with_silu: int = 0
    plain: int = 0
    left: list[str] = field(default_factory=list)  # GroupNorms left on PyTorch, by module name

    def summary(self) -> str:
        line = f"{self.fused_with_silu + self.plain} {self.model} GroupNorms use the sdrun kernel " \
               f"({self.fused_with_silu} fused with their SiLU)"
        if self.left:
            line += f"; {len(self.left)} stay on PyTorch ({', '.join(self.left)}): their blocks have another shape"
        return line


# The input norms that run plain (no SiLU follows them), as (parent class name, attribute): a transformer's, and a
# VAE attention's (diffusers' processors call it on the (B, C, pixels) view)
PLAIN_NORMS = {("Transformer2DModel", "norm"), ("Attention", "group_norm")}


def _resnet_fusable(block) -> bool:
    # a block without a time projection (the VAE's, whose decoder says "group") treats the embedding as "default"
    return (isinstance(block.norm1, nn.GroupNorm) and isinstance(block.norm2, nn.GroupNorm)
            and isinstance(block.nonlinearity, nn.SiLU) and block.upsample is None and block.downsample is None
            and (block.time_embedding_norm == "default" or block.time_emb_proj is None))


def install_fused_norms(model: nn.Module, name: str = "UNet") -> NormsReport:
    """Put the kernel on the GroupNorms of `model`, a UNet or a VAE (the module docstring says which, and how)."""
    from diffusers.models.resnet import ResnetBlock2D

    report = NormsReport(name)
    fused: set[int] = set()
    for module in model.modules():
        if isinstance(module, ResnetBlock2D) and _resnet_fusable(module):
            module.norm1, module.norm2 = FusedGroupNorm(module.norm1, True), FusedGroupNorm(module.norm2, True)
            module.forward = types.MethodType(fused_resnet_forward, module)
            fused.update((id(module.norm1), id(module.norm2)))
            report.fused_with_silu += 2
        # the UNet's output norm, and the VAE encoder's and decoder's: conv_norm_out, then conv_act
        if isinstance(getattr(module, "conv_norm_out", None), nn.GroupNorm) and isinstance(module.conv_act, nn.SiLU):
            module.conv_norm_out, module.conv_act = FusedGroupNorm(module.conv_norm_out, True), nn.Identity()
            fused.add(id(module.conv_norm_out))
            report.fused_with_silu += 1
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in fused or not isinstance(child, nn.GroupNorm):
                continue
            if (type(parent).__name__, child_name) in PLAIN_NORMS:
                setattr(parent, child_name, FusedGroupNorm(child, False))
                report.plain += 1
            else:
                report.left.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return report
