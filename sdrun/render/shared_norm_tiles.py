"""Tiled VAE decode and encode whose tiles share every GroupNorm's statistics: no colour shift between tiles.

Why. A VAE run on one tile normalises each GroupNorm with that tile's own mean and variance, so a dark tile is
brightened and a red one greyed (diffusers' `enable_tiling`: the colour shift between tiles users report). Exact
shared statistics need every layer's statistics over the whole image before any tile passes that layer: all tiles'
activations kept between layers (an earlier design; 12x slower than diffusers' tiling at 4K on an H200).

How (the "fast" design of the multidiffusion tiled VAE, written anew):
1. Statistics pass: the input shrunk (nearest, so each value is one of the input's) to at most one tile's area is
   run through the decoder (encoder) untiled, recording each GroupNorm's mean and variance per (image, group).
   It costs a tile's memory and, at 4K, 3% of the decode's time.
2. Tile pass: every tile runs the whole decoder (encoder) once, each GroupNorm normalising with the recorded
   statistics, so that all tiles see the same affine map per channel; a smoothstep ramp across each overlap hands
   over from one tile to the next (weights summing to 1), and a tile's zero-padded edge gets weight 0.
Each tile and the statistics pass is one call of `vae.decoder` (`vae.encoder`), so a wrapper of that call (the
decode stage's fp16 -> fp32 retry of an overflowing call) redoes just that call, the statistics with it.

The statistics of a smaller rendition are an estimate, the same for every tile: where they are off, the whole
image shifts a little, evenly, instead of tile by tile. Shrinking by nearest keeps the input's distribution of
values; an area or antialiased shrink smooths it, and the statistics with it (tiny VAE: mean error 6x that of
nearest). Measured with bench/tiled_vae.py on an H200 (SD 1.5 VAE architecture, random weights conditioned as the
bench says, fp16, 3840x2160, tiles of 512 with 64 overlap; error against the untiled decode; docs/benchmarks.md):

                  seconds  peak GiB   max    mean   colour  spread   seam
    untiled        0.969    18.98
    diffusers      1.211     0.89    1.67   0.109   0.41    0.70    0.103
    this module    0.828     1.04    0.77   0.050   0.23    0.22    0.048

(colour: the largest per-channel mean error over a quarter-tile block; spread: the largest minus the smallest of
them, tiles shifted against each other; seam: the mean error inside the overlaps.)
"""

import math

import torch
import torch.nn.functional as F
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn
from torch.overrides import TorchFunctionMode


def scale_factor(vae) -> int:
    """Image pixels per latent pixel: 8 for the SD 1.x/2.x/XL VAEs, 2 for the tiny test model."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@apply_forward_hook  # moves a model-offloaded VAE to its GPU first, as vae.decode does
@torch.no_grad()
def decode(vae, latents: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """(B, C, h, w) latents as `vae.decode` takes them -> (B, 3, f*h, f*w) pixels, in tiles of `tile` image pixels
    sharing `overlap`; one image at a time. Latents that fit in one tile are decoded whole (the exact result)."""
    factor = scale_factor(vae)
    if vae.post_quant_conv is not None:
        latents = vae.post_quant_conv(latents)  # per pixel: the same on the whole as on each tile
    grid = _Grid(latents.shape[-2:], tile // factor, overlap // factor)
    return torch.cat([_tiled(vae.decoder, image[None], grid, factor) for image in latents])


@apply_forward_hook
@torch.no_grad()
def encode(vae, pixels: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """(B, 3, H, W) pixels in [-1, 1] (H, W multiples of the scale factor f) -> (B, 2C, H/f, W/f), the latent
    distribution's mean and log-variance as `vae.encode(...).latent_dist.parameters`, in tiles as `decode`."""
    factor = scale_factor(vae)
    grid = _Grid((pixels.shape[-2] // factor, pixels.shape[-1] // factor), tile // factor, overlap // factor)
    moments = torch.cat([_tiled(vae.encoder, image[None], grid, 1) for image in pixels])
    return vae.quant_conv(moments) if vae.quant_conv is not None else moments


def _tiled(network: nn.Module, inputs: torch.Tensor, grid: "_Grid", out_per_grid: int) -> torch.Tensor:
    """`network` over one image (1, C, H, W), in the tiles of `grid` (in latent pixels, of which the input has
    `inputs.shape[-1] / grid.width` pixels per side, the output `out_per_grid`): the statistics pass, then each tile's,
    blended in float32."""
    if grid.tile_count == 1:
        return network(inputs)
    in_per_grid = inputs.shape[-1] // grid.width
    norms = _SharedGroupNorm(sum(isinstance(m, nn.GroupNorm) for m in network.modules()))
    with norms:
        norms.recording = True
        network(_shrunk(inputs, grid.tile_area * in_per_grid ** 2))
        norms.recording = False
        out = None
        for rows, cols in grid.tiles():
            piece = network(inputs[..., rows.start * in_per_grid:rows.stop * in_per_grid,
                                   cols.start * in_per_grid:cols.stop * in_per_grid])
            if out is None:
                out = torch.zeros(*piece.shape[:2], grid.height * out_per_grid, grid.width * out_per_grid,
                                  dtype=torch.float32, device=piece.device)
            weights = grid.weights(rows, cols, out_per_grid, piece.device)
            out[..., rows.start * out_per_grid:rows.stop * out_per_grid,
                cols.start * out_per_grid:cols.stop * out_per_grid] += piece.float() * weights
    return out.to(piece.dtype)


def _shrunk(inputs: torch.Tensor, area: int) -> torch.Tensor:
    """`inputs` scaled down (nearest: each value one of the input's, its distribution kept) to at most `area`."""
    height, width = inputs.shape[-2:]
    scale = min(1.0, math.sqrt(area / (height * width)))
    size = (max(1, math.floor(height * scale)), max(1, math.floor(width * scale)))
    return F.interpolate(inputs, size=size, mode="nearest-exact")


class _SharedGroupNorm(TorchFunctionMode):
    """While active, the k-th `F.group_norm` of a network's pass (`count` of them a pass: each of its GroupNorm
    modules once) normalises with statistics k, recorded from the input while `recording`. Counting modulo `count`
    lets a wrapper run the same pass twice (the fp32 retry): the second overwrites or reuses the same slots.
    Intercepting the function rather than the modules also works under accelerate's offload hooks, which replace
    modules' forward."""

    def __init__(self, count: int):
        super().__init__()
        self.count, self.calls, self.recording = count, 0, False
        # per slot, GroupNorm with the recorded statistics as one affine map per channel: (scale, shift), (B, C)
        self.affine: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * count

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.group_norm:
            return func(*args, **kwargs)
        x, groups, weight, bias, eps = _group_norm_arguments(*args, **kwargs)
        slot, self.calls = self.calls % self.count, self.calls + 1
        if self.recording:
            grouped = x.float().flatten(2).unflatten(1, (groups, -1)).flatten(2)  # (B, G, values)
            variance, mean = torch.var_mean(grouped, dim=-1, correction=0)
            self.affine[slot] = _affine(x.shape[1] // groups, mean, variance, weight, bias, eps)
        scale, shift = self.affine[slot]
        per_pixel = (*scale.shape, *[1] * (x.dim() - 2))
        # in float32 and rounded once to x's dtype, as GroupNorm computes in fp16
        return torch.addcmul(shift.view(per_pixel), x, scale.view(per_pixel)).to(x.dtype)


def _group_norm_arguments(input, num_groups, weight=None, bias=None, eps=1e-5):  # noqa: A002 (F.group_norm's names)
    return input, num_groups, weight, bias, eps


def _affine(per_group: int, mean, variance, weight, bias, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm with the given per-(image, group) mean and variance as x * scale + shift per (image, channel),
    float32."""
    scale = torch.rsqrt(variance + eps).repeat_interleave(per_group, dim=1)
    shift = -mean.repeat_interleave(per_group, dim=1) * scale
    if weight is not None:
        scale, shift = scale * weight.float(), shift * weight.float()
    if bias is not None:
        shift = shift + bias.float()
    return scale, shift


class _Axis:
    """Tiles along one axis of `length` latent pixels: as few as cover it with tiles of at most `tile` overlapping
    by at least `overlap`, all of one size, spread from edge to edge."""

    def __init__(self, length: int, tile: int, overlap: int):
        count = 1 if length <= tile else math.ceil((length - overlap) / (tile - overlap))
        self.length, self.size = length, math.ceil((length + (count - 1) * overlap) / count)
        self.starts = [0] if count == 1 else [round(i * (length - self.size) / (count - 1)) for i in range(count)]

    def spans(self) -> list[slice]:
        return [slice(start, start + self.size) for start in self.starts]

    def weights(self, index: int, per_unit: int, device) -> torch.Tensor:
        """Tile `index`'s blend weight at each of its pixels (`per_unit` a latent pixel): 1 where it is alone, a
        smoothstep across each overlap from 0 at the tile's edge, divided by the sum over the tiles (which it is
        already, unless a tile overlaps both neighbours so far that their ramps meet)."""
        def raw(i: int) -> torch.Tensor:
            start = self.starts[i]
            positions = start + (torch.arange(self.size * per_unit, device=device) + 0.5) / per_unit
            weight = torch.ones_like(positions)
            if i > 0:  # rising across the overlap with the previous tile
                weight *= _smoothstep(positions, start, self.starts[i - 1] + self.size)
            if i < len(self.starts) - 1:  # falling across the overlap with the next one
                weight *= 1 - _smoothstep(positions, self.starts[i + 1], start + self.size)
            return weight

        total = torch.zeros(self.length * per_unit, device=device)
        for i, start in enumerate(self.starts):
            total[start * per_unit:(start + self.size) * per_unit] += raw(i)
        mine = slice(self.starts[index] * per_unit, (self.starts[index] + self.size) * per_unit)
        return raw(index) / total[mine]


def _smoothstep(positions: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """0 at `low`, 1 at `high`, smooth between (flat ends: no kink in the blend); s(u) + s(1 - u) = 1."""
    if high <= low:
        return (positions >= low).float()
    u = ((positions - low) / (high - low)).clamp(0, 1)
    return u * u * (3 - 2 * u)


class _Grid:
    """The tiles over a (height, width) latent-pixel grid, `tile` and `overlap` latent pixels."""

    def __init__(self, size, tile: int, overlap: int):
        self.height, self.width = size
        self.rows, self.cols = _Axis(self.height, tile, overlap), _Axis(self.width, tile, overlap)
        self.tile_area = tile * tile

    @property
    def tile_count(self) -> int:
        return len(self.rows.starts) * len(self.cols.starts)

    def tiles(self) -> list[tuple[slice, slice]]:
        return [(rows, cols) for rows in self.rows.spans() for cols in self.cols.spans()]

    def weights(self, rows: slice, cols: slice, per_unit: int, device) -> torch.Tensor:
        row = self.rows.weights(self.rows.starts.index(rows.start), per_unit, device)
        col = self.cols.weights(self.cols.starts.index(cols.start), per_unit, device)
        return row[:, None] * col
