"""`--xformers` in the pipeline: a diffusers attention processor that runs sdrun's kernel, and `install(pipe)`.

The processor is diffusers' `AttnProcessor2_0.__call__` (diffusers 0.42) with the SDPA call swapped for
`memory_efficient_attention`; q, k, v stay in the (batch, tokens, heads, head_dim) layout the projections produce,
so no transposes are needed. Modules the kernel does not cover stay on PyTorch SDPA, reported once by
`InstallReport.summary()`, never per call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sdrun.ops import supports
from sdrun.ops.attention import memory_efficient_attention


class SdrunAttnProcessor:
    """Self- and cross-attention of SD 1.x/2.x/SDXL through the sdrun kernel. float32 modules compute attention
    in `compute_dtype` (float16 by default) and cast back."""

    def __init__(self, compute_dtype: torch.dtype = torch.float16):
        self.compute_dtype = compute_dtype

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("the sdrun attention kernel takes no attention mask (Stable Diffusion passes none)")
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

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        # (batch, tokens, heads, head_dim): the kernel's layout, a view of the projections' output
        query = query.view(batch_size, -1, attn.heads, head_dim)
        key = key.view(batch_size, -1, attn.heads, head_dim)
        value = value.view(batch_size, -1, attn.heads, head_dim)
        if attn.norm_q is not None:  # normalises the last dimension: layout-independent
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        dtype = query.dtype
        if dtype not in (torch.float16, torch.bfloat16):
            query, key, value = (x.to(self.compute_dtype) for x in (query, key, value))
        hidden_states = memory_efficient_attention(query, key, value, attn.scale)
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim).to(dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear proj
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@dataclass
class InstallReport:
    kernel_modules: int = 0
    left_on_sdpa: list[tuple[str, str]] = field(default_factory=list)  # (module name, reason)
    cast_from_fp32: bool = False  # float32 modules run their attention in float16 (the kernel has no fp32 path)

    def summary(self) -> str:
        line = f"xformers: {self.kernel_modules} attention modules use the sdrun kernel"
        if self.cast_from_fp32:
            line += " (in float16: the model is float32 and the kernel has no float32 path; add --fp16)"
        if not self.left_on_sdpa:
            return line
        names = ", ".join(name for name, _ in self.left_on_sdpa)
        reasons = sorted({reason for _, reason in self.left_on_sdpa})
        verb = "stays" if len(self.left_on_sdpa) == 1 else "stay"
        return f"{line}; {len(self.left_on_sdpa)} ({names}) {verb} on PyTorch SDPA: {'; '.join(reasons)}"


# Processors whose __call__ is the plain SD path we copied; anything else (IP-adapter, added KV, ...) is left alone.
_PLAIN = ("AttnProcessor2_0", "AttnProcessor", "SdrunAttnProcessor")


def install(pipe, device: torch.device | str | None = None, compute_dtype: torch.dtype = torch.float16) -> InstallReport:
    """Set SdrunAttnProcessor on every diffusers `Attention` module of `pipe` the kernel supports.

    `device` is where the pipeline will run (default: the module's own device if CUDA, else "cuda", since
    offloading keeps modules on the CPU until they run). Returns the counts and what stayed on SDPA, and why.
    """
    from diffusers.models.attention_processor import Attention

    components = getattr(pipe, "components", None) or {"": pipe}
    report = InstallReport()
    processor = SdrunAttnProcessor(compute_dtype)
    for comp_name, comp in components.items():
        if not isinstance(comp, torch.nn.Module):
            continue
        for name, mod in comp.named_modules():
            if not isinstance(mod, Attention):
                continue
            full = f"{comp_name}.{name}" if comp_name else name
            param = next(mod.parameters())
            dev = torch.device(device) if device is not None else (param.device if param.is_cuda else torch.device("cuda"))
            dtype = param.dtype if param.dtype in (torch.float16, torch.bfloat16) else compute_dtype
            head_dim = mod.to_k.out_features // mod.heads
            current = type(mod.get_processor()).__name__
            reason = supports(head_dim, dtype, dev)
            if reason is None and current not in _PLAIN:
                reason = f"it uses the {current} processor"
            if reason is None and getattr(mod, "added_kv_proj_dim", None) is not None:
                reason = "it has added key/value projections"
            if reason is None:
                mod.set_processor(processor)
                report.kernel_modules += 1
                report.cast_from_fp32 |= param.dtype == torch.float32
            else:
                report.left_on_sdpa.append((full, reason))
    return report
