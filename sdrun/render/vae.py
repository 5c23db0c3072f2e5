"""The VAE's side of a render: the dtype it computes in, decoding and encoding with their float32 retries.

Decoding and encoding compute in `vae_dtype` (SDXL's own VAE in bfloat16 where the GPU has it, --vae-fp32 in
float32, other VAEs in their own dtype), the weights cast for the call only; a call whose result is not finite is
redone in float32, and the metadata records what happened (DecodeNotes). An untiled decode runs its large
convolutions in bands (banded_decode.py: a third less memory, the same pixels). The decode and encode stages (stages.py)
call these; so does `sdrun decode` for saved latents.
"""

import contextlib
from dataclasses import asdict, dataclass

import torch
from diffusers.utils.torch_utils import get_module_execution_device

from sdrun.errors import SdrunError
from sdrun.render import banded_decode, sampling, shared_norm_tiles
from sdrun.render.forwards import forward_replaced


class RenderFailed(SdrunError):
    """This item could not be rendered (NaN latents, a VAE that gives NaN even in float32)."""


@dataclass
class DecodeNotes:
    """How the VAE's calls went, for the image metadata."""

    # computed in float32, wholly or some tiles, although the model is fp16 (--vae-fp32, SDXL's own VAE without
    # native bf16, a retry)
    vae_fp32: bool = False
    vae_dtype: str | None = None  # what the last decode computed in ("bfloat16": SDXL's own VAE on a bf16 GPU)
    # a decode or encode (or a tile of it) gave NaN, or an image came out black, and was redone in float32
    nan_retry: bool = False
    tiled_retry: bool = False  # a decode ran out of memory and was redone in tiles

    def record(self) -> dict:
        """For the metadata's "decode" object."""
        return asdict(self)


def decode_latents(engine, latents: torch.Tensor, tiles: tuple[int, int] | None, notes: DecodeNotes):
    """Latents -> pixels in [-1, 1], in VAE tiles of (size, overlap) image pixels when `tiles` is given, in
    `vae_dtype`'s dtype. A decoder call whose output is not finite (the whole image, or one tile of a tiled
    decode) is redone in float32, that call only; an all-black output is decoded again in float32."""
    if not torch.isfinite(latents).all():
        raise RenderFailed("the denoiser produced NaN/inf latents" + sampling.nan_advice(engine))
    vae = engine.pipe.vae
    dtype = vae_dtype(engine)
    pixels = _vae_decode(vae, latents, dtype, tiles, notes)
    if not torch.isfinite(pixels).all() or bool((pixels <= -1).all()):
        notes.nan_retry, dtype = True, torch.float32
        pixels = _vae_decode(vae, latents, dtype, tiles, notes)
        if not torch.isfinite(pixels).all():
            raise RenderFailed("the VAE produced NaN even in float32: the model's VAE weights are likely broken")
    notes.vae_fp32 |= dtype == torch.float32 and vae.dtype != torch.float32
    notes.vae_dtype = str(dtype).removeprefix("torch.")
    return pixels


def vae_dtype(engine) -> torch.dtype:
    """What the VAE decodes and encodes in (plan._build predicts the same): float32 with --vae-fp32. SDXL's own
    VAE, whose config says force_upcast, gives NaN in fp16 on real images (the reason the fp16-fix VAE exists, whose
    config says force_upcast false): it computes in bfloat16, which has float32's range at fp16's memory, where the GPU
    computes bf16 natively (on an H200 at 1024x1024: 2.4 against 4.9 GiB above the weights, 88 against 117 ms,
    0.5/255 from float32's pixels on average; ComfyUI and Forge do the same), else in float32. Any other VAE
    decodes in its own dtype: a --vae file has no config of its own, so it is tried in fp16 (vae_file.py), and SD
    1.x/2.x VAEs carry force_upcast too but decode fine in fp16, as diffusers' own SD pipeline does (upcasting them
    cost 0.75 GiB at 512x512 and 2.5 GiB at 1024x1024 on an H200)."""
    vae = engine.pipe.vae
    if "vae_fp32" in engine.flags:
        return torch.float32
    if vae.dtype == torch.float16 and engine.family == "sdxl" and bool(getattr(vae.config, "force_upcast", False)):
        return torch.bfloat16 if engine.native_bf16 else torch.float32
    return vae.dtype


def _vae_decode(vae, latents: torch.Tensor, dtype: torch.dtype, tiles: tuple[int, int] | None,
                notes: DecodeNotes) -> torch.Tensor:
    """Decode (in tiles when given) in `dtype`; below float32, a call that overflows is redone in float32."""
    with _computing_in(vae, dtype):
        scaled = latent_scaling(vae, latents.float(), to_unet=False)
        scaled = scaled.to(get_module_execution_device(vae), dtype)
        guard = _upcast_overflowing(vae.decoder, notes) if dtype != torch.float32 else contextlib.nullcontext()
        with torch.no_grad(), guard:
            if tiles is not None:
                return shared_norm_tiles.decode(vae, scaled, *tiles)
            with banded_decode.banded(vae.decoder):  # a tiled decode's memory is flat already
                return vae.decode(scaled, return_dict=False)[0]


@contextlib.contextmanager
def _computing_in(vae, dtype: torch.dtype):
    """The VAE's weights in `dtype` for the block only: they stay stored as loaded (fp16 beside an fp16 UNet)."""
    stored = vae.dtype
    if dtype != stored:
        vae.to(dtype=dtype)
    try:
        yield
    finally:
        if dtype != stored:
            vae.to(dtype=stored)


@contextlib.contextmanager
def _upcast_overflowing(decoder, notes: DecodeNotes):
    """Redo a decoder call (a tiled decode makes one a tile, and one its statistics pass) whose output is not finite
    in float32, and hand back its result in the decoder's dtype: only the tiles that overflow pay for float32."""
    forward = decoder.forward

    def guarded(sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = forward(sample, *args, **kwargs)
        if torch.isfinite(out).all():
            return out
        notes.nan_retry = notes.vae_fp32 = True
        decoder.to(dtype=torch.float32)
        try:
            # pixels are clamped to [-1, 1] when they become an image: clamping to the dtype's range first loses
            # nothing, and keeps a float32 value past it from turning into inf again
            limit = torch.finfo(out.dtype).max
            return forward(sample.float(), *args, **kwargs).clamp(-limit, limit).to(out.dtype)
        finally:
            decoder.to(dtype=out.dtype)

    with forward_replaced(decoder, guarded):
        yield


def encode_pixels(engine, pixels: torch.Tensor, tiled_plan, notes: DecodeNotes) -> torch.Tensor:
    """Pixels in [-1, 1] -> the mean of the VAE's latent distribution in the UNet's latent space (float32), in
    `vae_dtype`'s dtype (SDXL's own VAE overflows fp16 encoding too, as diffusers' SDXL img2img knows), redone in
    float32 if not finite; in the plan's VAE tiles when `tiled_plan` is given."""
    vae = engine.pipe.vae
    dtype = vae_dtype(engine)
    parameters = _vae_encode(vae, pixels, dtype, tiled_plan)
    if not torch.isfinite(parameters).all() and dtype != torch.float32:
        notes.nan_retry = notes.vae_fp32 = True
        parameters = _vae_encode(vae, pixels, torch.float32, tiled_plan)
    if not torch.isfinite(parameters).all():
        raise RenderFailed("the VAE's encoder produced NaN from the init image even in float32: the model's VAE "
                           "weights are likely broken")
    mean = parameters[:, : parameters.shape[1] // 2].float()
    return latent_scaling(vae, mean, to_unet=True)


def _vae_encode(vae, pixels: torch.Tensor, dtype: torch.dtype, tiled_plan) -> torch.Tensor:
    """The encoder's latent-distribution parameters, in the plan's VAE tiles when given."""
    with _computing_in(vae, dtype), torch.no_grad():
        pixels = pixels.to(get_module_execution_device(vae), dtype)
        if tiled_plan is not None:
            return shared_norm_tiles.encode(vae, pixels, tiled_plan.vae_tile, tiled_plan.vae_overlap)
        return vae.encode(pixels).latent_dist.parameters


def latent_scaling(vae, latents: torch.Tensor, to_unet: bool) -> torch.Tensor:
    """Between the VAE's latent space and the UNet's: the scaling factor, and SDXL-style mean/std where given."""
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        return (latents - mean) * config.scaling_factor / std if to_unet else latents * std / config.scaling_factor + mean
    return latents * config.scaling_factor if to_unet else latents / config.scaling_factor
