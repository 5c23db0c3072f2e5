"""VAE decode and encode in overlapping tiles of the plan's size, every tile normalised with the same GroupNorm
statistics (render/shared_norm_tiles.py: no colour shift between tiles, at about diffusers' tiling's speed and
memory). Each tile is one call of the decoder, so the decode stage's fp16 overflow guard redoes only that tile."""

import torch

from sdrun.render import shared_norm_tiles


def decode(vae, latents: torch.Tensor, size: int, overlap: int) -> torch.Tensor:
    """Latents (already divided by the scaling factor) -> pixels in [-1, 1], in tiles of `size` image pixels
    sharing `overlap`."""
    return shared_norm_tiles.decode(vae, latents, size, overlap)


def encode(vae, pixels: torch.Tensor, size: int, overlap: int) -> torch.Tensor:
    """Pixels in [-1, 1] -> the latent distribution's parameters (mean and log-variance), tile by tile."""
    return shared_norm_tiles.encode(vae, pixels, size, overlap)
