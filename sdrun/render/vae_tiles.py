"""VAE decode and encode in overlapping tiles, through diffusers' own AutoencoderKL tiling at the plan's tile size.

Measured on an H200 (SD 1.5 VAE, fp16, a 3840x2160 decode): diffusers' tiling 1.95 s at 0.86 GiB. A tiler of
sdrun's own that shares GroupNorm statistics across tiles (no colour shift between tiles) took 23.5 s at 1.07 GiB
in the same run, so it is not used yet: diffusers' tiles blend their overlaps linearly, each with its own statistics.
"""

import contextlib

import torch


@contextlib.contextmanager
def tiles_of(vae, size: int, overlap: int):
    """Set `vae`'s tiling to tiles of `size` image pixels sharing `overlap`, for the block; then restore it."""
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    saved = vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor
    vae.tile_sample_min_size, vae.tile_latent_min_size = size, size // scale
    vae.tile_overlap_factor = overlap / size
    _onload(vae)
    try:
        yield
    finally:
        vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = saved


def _onload(vae) -> None:
    """What `vae.decode`/`vae.encode` do first and `tiled_decode`/`tiled_encode` do not: run the hook by which
    --model-offload brings the VAE's weights to the GPU (diffusers' apply_forward_hook)."""
    hook = getattr(vae, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(vae)


def decode(vae, latents: torch.Tensor, size: int, overlap: int) -> torch.Tensor:
    """Latents (already divided by the scaling factor) -> pixels in [-1, 1], tile by tile."""
    with tiles_of(vae, size, overlap):
        return vae.tiled_decode(latents, return_dict=False)[0]


def encode(vae, pixels: torch.Tensor, size: int, overlap: int) -> torch.Tensor:
    """Pixels in [-1, 1] -> the latent distribution's parameters (mean and log-variance), tile by tile."""
    with tiles_of(vae, size, overlap):
        return vae.tiled_encode(pixels).latent_dist.parameters
