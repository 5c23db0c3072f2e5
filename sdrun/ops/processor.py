"""`--xformers` in the pipeline: diffusers attention processors that run sdrun's kernel, and `install(pipe)`.

`SdrunAttnProcessor` is diffusers' `AttnProcessor2_0.__call__` (diffusers 0.42) with the SDPA call swapped for
`memory_efficient_attention`; `SdrunIPAdapterAttnProcessor` is its `IPAdapterAttnProcessor2_0.__call__` the same
way: the text attention and each IP-Adapter's image attention are separate kernel calls, added as diffusers adds
them (two separately normalised softmaxes: one call over the concatenated keys would not be the same sum). q, k, v
stay in the (batch, tokens, heads, head_dim) layout the projections produce, so no transposes are needed. Where
`pack_projections` laid a module's projections side by side (ops/packing.py), q, k and v (or k and v of a
cross-attention) come from one GEMM, as strided views of its result.

Order does not matter: `install` turns every processor it knows into sdrun's (an IP-Adapter's keeps its trained
modules, the same parameters), and records itself on the pipeline so that `reinstall` can run it again after
anything that sets processors anew (diffusers' `load_ip_adapter` does). Modules the kernel does not cover stay on
PyTorch SDPA, reported once by `InstallReport.summary()`, never per call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import (
    Attention,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    IPAdapterXFormersAttnProcessor,
)

from sdrun.ops import supports
from sdrun.ops.attention import memory_efficient_attention
from sdrun.ops.packing import pack_linears, packed


def _kernel_attention(query, key, value, scale: float, compute_dtype: torch.dtype) -> torch.Tensor:
    """(batch, tokens, heads, head_dim) in, (batch, tokens, heads * head_dim) out in the dtype of `query`; float32
    inputs are computed in `compute_dtype` (the kernel has no float32 path)."""
    dtype = query.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        query, key, value = (x.to(compute_dtype) for x in (query, key, value))
    return memory_efficient_attention(query, key, value, scale).flatten(2).to(dtype)


def _attention_block(attn, hidden_states, encoder_hidden_states, temb, compute_dtype, image_adapters=()):
    """The body both processors share: diffusers' projections and output layers around kernel attention.
    `image_adapters`: (scale, to_k_ip, to_v_ip, image states) of each IP-Adapter whose scale is not 0; each adds
    `scale * attention(query, to_k_ip(states), to_v_ip(states))` to the text attention."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)

    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size = hidden_states.shape[0]

    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    self_attention = encoder_hidden_states is None
    if self_attention:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    layers = _projections(attn, not self_attention)
    views = packed(layers)
    if views is None:
        query, key, value = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
    else:  # one GEMM; its outputs are strided views of its result, which the kernel reads as they are
        projected = F.linear(encoder_hidden_states, *views).split([layer.out_features for layer in layers], dim=-1)
        query, key, value = projected if self_attention else (attn.to_q(hidden_states), *projected)

    head_dim = key.shape[-1] // attn.heads
    # (batch, tokens, heads, head_dim): the kernel's layout, a view of the projections' output
    query = query.view(batch_size, -1, attn.heads, head_dim)
    key = key.view(batch_size, -1, attn.heads, head_dim)
    value = value.view(batch_size, -1, attn.heads, head_dim)
    if attn.norm_q is not None:  # normalises the last dimension: layout-independent
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)

    hidden_states = _kernel_attention(query, key, value, attn.scale, compute_dtype)
    for scale, to_k_ip, to_v_ip, image_states in image_adapters:
        image_key = to_k_ip(image_states).view(batch_size, -1, attn.heads, head_dim)
        image_value = to_v_ip(image_states).view(batch_size, -1, attn.heads, head_dim)
        hidden_states = hidden_states + scale * _kernel_attention(query, image_key, image_value, attn.scale,
                                                                  compute_dtype)

    hidden_states = attn.to_out[0](hidden_states)  # linear proj
    hidden_states = attn.to_out[1](hidden_states)  # dropout
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    # SD's modules rescale by 1: x / 1.0 is x exactly, and skipping it saves a pass over the output
    return hidden_states if attn.rescale_output_factor == 1 else hidden_states / attn.rescale_output_factor


class SdrunAttnProcessor:
    """Self- and cross-attention of SD 1.x/2.x/SDXL through the sdrun kernel. float32 modules compute attention
    in `compute_dtype` (float16 by default) and cast back."""

    def __init__(self, compute_dtype: torch.dtype = torch.float16):
        self.compute_dtype = compute_dtype

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("the sdrun attention kernel takes no attention mask (Stable Diffusion passes none)")
        return _attention_block(attn, hidden_states, encoder_hidden_states, temb, self.compute_dtype)


class SdrunIPAdapterAttnProcessor(IPAdapterAttnProcessor2_0):
    """An IP-Adapter's cross-attention through the sdrun kernel: text attention plus `scale[i]` times each
    adapter's image attention. A subclass of diffusers' processor, so `set_ip_adapter_scale` and
    `unload_ip_adapter` treat it as theirs. What the kernel path does not cover (IP-Adapter masks, an attention
    mask, image tokens appended to the text instead of passed as a tuple) runs diffusers' own `__call__`."""

    def __init__(self, trained: IPAdapterAttnProcessor2_0, compute_dtype: torch.dtype = torch.float16):
        torch.nn.Module.__init__(self)  # not diffusers' __init__: it would make new, untrained projections
        self.hidden_size, self.cross_attention_dim = trained.hidden_size, trained.cross_attention_dim
        self.num_tokens, self.scale = trained.num_tokens, trained.scale
        self.to_k_ip, self.to_v_ip = trained.to_k_ip, trained.to_v_ip  # the trained modules themselves
        self.compute_dtype = compute_dtype

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 scale: float = 1.0, ip_adapter_masks=None):
        if attention_mask is not None or ip_adapter_masks is not None or not isinstance(encoder_hidden_states, tuple):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, scale,
                                    ip_adapter_masks)
        text_states, image_states = encoder_hidden_states
        adapters = [(s, to_k, to_v, states)
                    for s, to_k, to_v, states in zip(self.scale, self.to_k_ip, self.to_v_ip, image_states)
                    if not (all(x == 0 for x in s) if isinstance(s, list) else s == 0)]  # diffusers skips these
        return _attention_block(attn, hidden_states, text_states, temb, self.compute_dtype, adapters)


@dataclass
class InstallReport:
    kernel_modules: int = 0
    image_modules: int = 0  # of those, IP-Adapter modules: their image attention runs on the kernel too
    left_on_sdpa: list[tuple[str, str]] = field(default_factory=list)  # (module name, reason)
    cast_from_fp32: bool = False  # float32 modules run their attention in float16 (the kernel has no fp32 path)

    def summary(self) -> str:
        line = f"xformers: {self.kernel_modules} attention modules use the sdrun kernel"
        if self.cast_from_fp32:
            line += " (in float16: the model is float32 and the kernel has no float32 path; add --fp16)"
        if self.image_modules:
            line += f", {self.image_modules} of them IP-Adapter modules with their image attention"
        if not self.left_on_sdpa:
            return line
        names = ", ".join(name for name, _ in self.left_on_sdpa)
        reasons = sorted({reason for _, reason in self.left_on_sdpa})
        verb = "stays" if len(self.left_on_sdpa) == 1 else "stay"
        return f"{line}; {len(self.left_on_sdpa)} ({names}) {verb} on PyTorch SDPA: {'; '.join(reasons)}"


@dataclass(frozen=True)
class Installed:
    """The latest install, kept on the pipeline (`pipe.sdrun_kernel`): what it was asked for, for `reinstall`,
    and its report, current whichever came last (the kernel or an adapter)."""

    device: torch.device | str | None
    compute_dtype: torch.dtype
    report: InstallReport


# Processors whose __call__ is the plain SD path we copied, and diffusers' IP-Adapter processors, which all compute
# what IPAdapterAttnProcessor2_0 does; anything else (added KV, ...) is left alone.
_PLAIN = ("AttnProcessor2_0", "AttnProcessor", "SdrunAttnProcessor")
_IP_ADAPTER = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0, IPAdapterXFormersAttnProcessor)


def install(pipe, device: torch.device | str | None = None, compute_dtype: torch.dtype = torch.float16) -> InstallReport:
    """Set sdrun's processors on every diffusers `Attention` module of `pipe` the kernel supports.

    `device` is where the pipeline will run (default: the module's own device if CUDA, else "cuda", since
    offloading keeps modules on the CPU until they run). Returns the counts and what stayed on SDPA, and why.
    """
    components = getattr(pipe, "components", None) or {"": pipe}
    report = InstallReport()
    plain = SdrunAttnProcessor(compute_dtype)
    for comp_name, comp in components.items():
        if not isinstance(comp, torch.nn.Module):
            continue
        for name, mod in comp.named_modules():
            if not isinstance(mod, Attention):
                continue
            param = next(mod.parameters())
            dev = torch.device(device) if device is not None else (param.device if param.is_cuda else torch.device("cuda"))
            dtype = param.dtype if param.dtype in (torch.float16, torch.bfloat16) else compute_dtype
            current = mod.get_processor()
            reason = supports(mod.to_k.out_features // mod.heads, dtype, dev) or _unsupported(mod, current)
            if reason is not None:
                report.left_on_sdpa.append((f"{comp_name}.{name}" if comp_name else name, reason))
                continue
            if isinstance(current, _IP_ADAPTER):
                mod.set_processor(SdrunIPAdapterAttnProcessor(current, compute_dtype))
                report.image_modules += 1
            else:
                mod.set_processor(plain)
            report.kernel_modules += 1
            report.cast_from_fp32 |= param.dtype == torch.float32
    pipe.sdrun_kernel = Installed(device, compute_dtype, report)
    return report


def _unsupported(mod, current) -> str | None:
    """Why a module the kernel could compute keeps its processor, or None."""
    if getattr(mod, "added_kv_proj_dim", None) is not None:
        return "it has added key/value projections"
    if not isinstance(current, _IP_ADAPTER):
        return None if type(current).__name__ in _PLAIN else f"it uses the {type(current).__name__} processor"
    if mod.norm_q is not None or mod.norm_k is not None:  # diffusers' IP-Adapter processor does not apply them
        return "it is an IP-Adapter module with query/key norms"
    return None


def pack_projections(model: torch.nn.Module) -> int:
    """Lay the input projections of each attention module of `model` side by side (ops/packing.py): to_q, to_k and
    to_v of a self-attention, to_k and to_v of a cross-attention, so that the processor projects with one GEMM
    instead of three or two. Returns how many modules it packed."""
    modules = [module for module in model.modules() if isinstance(module, Attention)]
    return sum(pack_linears(_projections(module, module.is_cross_attention)) for module in modules)


def _projections(attn, cross_attention: bool) -> tuple:
    """The layers that project the same input: q, k and v of a self-attention; k and v of a cross-attention."""
    return (attn.to_k, attn.to_v) if cross_attention else (attn.to_q, attn.to_k, attn.to_v)


def reinstall(pipe) -> None:
    """After something set attention processors anew: `install` again as it was asked for, if it was (the new
    report replaces `pipe.sdrun_kernel.report`)."""
    installed = getattr(pipe, "sdrun_kernel", None)
    if installed is not None:
        install(pipe, installed.device, installed.compute_dtype)
