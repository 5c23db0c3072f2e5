"""Tiled VAE decode and encode: GPU memory set by the tile, not the image; no seams, no colour shift between tiles.

ALGORITHM_PLACEHOLDER
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn
from torch.overrides import TorchFunctionMode

from sdrun.errors import UsageError

MIN_TILE_LATENTS = 8  # smaller tiles are mostly margin (HALO_PIXELS at the latent resolution on each side)
# How far (in pixels at a segment's input resolution) a segment's output depends on its input: a ResnetBlock2D is
# two 3x3 convolutions (2), with the up- or downsampler after it or the decoder's conv_in before it at most 4.
# Tile pixels closer than this to a tile edge see the tile's zero padding instead of the neighbouring pixels, so
# they get no weight in the blend or in the GroupNorm statistics.
HALO_PIXELS = 4

Statistics = tuple[torch.Tensor, torch.Tensor]  # one GroupNorm's mean and variance per (sample, group), float64


def scale_factor(vae) -> int:
    """Image pixels per latent pixel: 8 for the SD 1.x/2.x/XL VAEs, 2 for the tiny test model."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@apply_forward_hook  # moves a model-offloaded VAE to its GPU first, as vae.decode does
@torch.no_grad()
def decode_tiled(vae, latents: torch.Tensor, tile: int, overlap: int, store: torch.device | str | None = None):
    """(B, 4, h, w) latents as `vae.decode` takes them -> (B, 3, f*h, f*w) images, like `vae.decode(...).sample`.

    `tile` and `overlap` are in latent pixels. Latents that fit in one tile are decoded untiled (the exact result).
    `store` is where the image-sized activations between stages live: by default the CPU when decoding on a GPU
    (GPU memory then holds one tile's work), else the latents' device; pass the GPU to trade memory for speed.
    """
    _check_tile(tile, overlap, MIN_TILE_LATENTS, "latent pixels")
    grid = _Grid.covering(latents.shape[-2:], tile, overlap)
    return _run(_decoder_stages(vae), latents, grid, store)


@apply_forward_hook
@torch.no_grad()
def encode_tiled(vae, images: torch.Tensor, tile: int, overlap: int, store: torch.device | str | None = None):
    """(B, 3, H, W) images in [-1, 1] -> (B, 8, H/f, W/f) parameters (mean, log-variance) of the latent distribution,
    like `vae.encode(images).latent_dist.parameters`.

    `tile` and `overlap` are in image pixels and, like H and W, multiples of f (8 for SD VAEs). `store`: as in
    `decode_tiled`.
    """
    factor = scale_factor(vae)
    _check_tile(tile, overlap, MIN_TILE_LATENTS * factor, "image pixels")
    for name, value in (("tile size", tile), ("tile overlap", overlap), ("image height", images.shape[-2]),
                        ("image width", images.shape[-1])):
        if value % factor:
            raise UsageError(f"the {name} {value} is not a multiple of {factor}, the VAE's scale factor: "
                             f"round it to a multiple of {factor}")
    grid = _Grid.covering((images.shape[-2] // factor, images.shape[-1] // factor), tile // factor, overlap // factor)
    return _run(_encoder_stages(vae), images, grid, store)


def _check_tile(tile: int, overlap: int, minimum: int, unit: str) -> None:
    if tile < minimum:
        raise UsageError(f"tile size {tile} {unit} is too small for a VAE tile: use at least {minimum} (--tile-size)")
    if not 0 <= overlap <= tile // 2:
        raise UsageError(f"tile overlap {overlap} {unit} must be between 0 and half the tile size {tile}: "
                         "lower --tile-overlap or raise --tile-size")


# ---- the network as a chain of stages ---------------------------------------------------------------------------

def _decoder_stages(vae) -> list[nn.Module]:
    """The modules `vae.decode` runs, in order, each feeding the next (Decoder.forward without latent_embeds)."""
    decoder = vae.decoder
    return [*_present(vae.post_quant_conv), decoder.conv_in, *_block_stages(decoder.mid_block),
            *(stage for block in decoder.up_blocks for stage in _block_stages(block)),
            decoder.conv_norm_out, decoder.conv_act, decoder.conv_out]


def _encoder_stages(vae) -> list[nn.Module]:
    """The modules `vae.encode` runs before building the distribution, in order (Encoder.forward)."""
    encoder = vae.encoder
    return [encoder.conv_in, *(stage for block in encoder.down_blocks for stage in _block_stages(block)),
            *_block_stages(encoder.mid_block), encoder.conv_norm_out, encoder.conv_act, encoder.conv_out,
            *_present(vae.quant_conv)]


def _block_stages(block: nn.Module) -> list[nn.Module]:
    """A VAE block's forward as its parts, for the block types whose forward is a plain chain of them; any other
    block stays one stage (still correct, with a wider dependence on its input than HALO_PIXELS assumes)."""
    if isinstance(block, UNetMidBlock2D):
        pairs = zip(block.attentions, block.resnets[1:])
        return [block.resnets[0], *(stage for pair in pairs for stage in pair if stage is not None)]
    if isinstance(block, (UpDecoderBlock2D, DownEncoderBlock2D)):
        samplers = getattr(block, "upsamplers", None) or getattr(block, "downsamplers", None) or []
        return [*block.resnets, *samplers]
    return [block]


def _present(module):
    return [module] if module is not None else []


def _segments(stages: list[nn.Module]) -> list[list[nn.Module]]:
    """Stages grouped so that every group but the first starts with a stage holding GroupNorms: each group is one
    ResnetBlock2D or attention block with the norm-free stages after it (convolutions, up/downsamplers)."""
    segments: list[list[nn.Module]] = []
    for stage in stages:
        if segments and not (_has_group_norm(stage) and any(_has_group_norm(s) for s in segments[-1])):
            segments[-1].append(stage)
        else:
            segments.append([stage])
    return segments


def _has_group_norm(stage: nn.Module) -> bool:
    return any(isinstance(module, nn.GroupNorm) for module in stage.modules())


def _run_chain(stages, x: torch.Tensor) -> torch.Tensor:
    for stage in stages:
        x = stage(x, temb=None) if isinstance(stage, ResnetBlock2D) else stage(x)  # as the VAE blocks call them
    return x


# ---- running the segments tile by tile ----------------------------------------------------------------------------

def _run(stages, inputs: torch.Tensor, grid: "_Grid", store) -> torch.Tensor:
    """Every segment over every tile, the tiles' outputs blended into one tensor before the next segment starts."""
    if grid.tile_count == 1:
        return _run_chain(stages, inputs)
    if store is None:
        store = "cpu" if inputs.device.type != "cpu" else inputs.device
    x = inputs.to(store)
    for segment in _segments(stages):
        x = _run_segment(segment, x, grid, inputs.device)
    return x.to(inputs.device)


class _Pause(Exception):
    """A tile's pass reached a GroupNorm whose statistics over the whole input are not known yet."""


def _run_segment(segment, source: torch.Tensor, grid: "_Grid", device) -> torch.Tensor:
    """One segment over all tiles of `source` (the blended output of the segment before). The k-th GroupNorm in it
    needs statistics over the whole input: pass k records them from every tile and stops there; the pass after the
    last GroupNorm runs the tiles to the end and blends their outputs."""
    resolution = source.shape[-2] // grid.rows.length
    margin = HALO_PIXELS / resolution  # latent pixels
    norm = _SharedGroupNorm(grid, margin)
    while True:
        out = None
        with norm:
            for tile in grid.tiles():
                norm.start_tile(tile)
                try:
                    piece = _run_chain(segment, source[(..., *grid.region(tile, resolution))].to(device).contiguous())
                except _Pause:
                    continue
                out_resolution = piece.shape[-2] // grid.rows.size
                if out is None:
                    size = (grid.rows.length * out_resolution, grid.cols.length * out_resolution)
                    out = torch.zeros(*piece.shape[:2], *size, dtype=piece.dtype, device=source.device)
                weights = grid.weights(tile, out_resolution, margin, piece.device).to(piece.dtype)
                out[(..., *grid.region(tile, out_resolution))] += (piece * weights).to(out.device)
        if not norm.paused():
            return out
        norm.learn_pending()


class _SharedGroupNorm(TorchFunctionMode):
    """While active, a tile's k-th `F.group_norm` call normalises with the k-th statistics learnt over all tiles; at
    the first call with none learnt yet, it adds the tile's weighted moments to the pending ones and pauses the tile.
    Intercepting the function, not the modules, also catches the attention block's norm and works under
    accelerate's offload hooks, which replace the modules' forward."""

    def __init__(self, grid: "_Grid", margin: float):
        super().__init__()
        self.grid, self.margin = grid, margin
        self.learnt: list[Statistics] = []
        self.pending: _Moments | None = None
        self.tile, self.calls = (0, 0), 0

    def start_tile(self, tile) -> None:
        self.tile, self.calls = tile, 0

    def paused(self) -> bool:
        return self.pending is not None

    def learn_pending(self) -> None:
        self.learnt.append(self.pending.statistics())
        self.pending = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.group_norm:
            return func(*args, **kwargs)
        x, groups, weight, bias, eps = _group_norm_arguments(*args, **kwargs)
        call, self.calls = self.calls, self.calls + 1
        if call < len(self.learnt):
            mean, variance = self.learnt[call]
            return _normalise(x, groups, mean, variance, weight, bias, eps)
        if self.pending is None:
            self.pending = _Moments()
        self.pending.add(x, groups, self._weights(x))
        raise _Pause

    def _weights(self, x: torch.Tensor) -> torch.Tensor:
        """The current tile's blend weights at x's resolution; x is (B, C, H, W), or (B, C, H*W) in attention."""
        spatial = x.shape[2:]
        resolution = math.isqrt(math.prod(spatial) // (self.grid.rows.size * self.grid.cols.size))
        weights = self.grid.weights(self.tile, resolution, self.margin, x.device)
        if weights.numel() != math.prod(spatial) or (len(spatial) == 2 and weights.shape != spatial):
            raise RuntimeError(f"a GroupNorm input of size {tuple(spatial)} does not match the tile's "
                               f"{self.grid.rows.size}x{self.grid.cols.size} latent pixels at any resolution")
        return weights.reshape(spatial)


def _group_norm_arguments(input, num_groups, weight=None, bias=None, eps=1e-5):  # noqa: A002 (F.group_norm's names)
    return input, num_groups, weight, bias, eps


def _normalise(x, groups, mean, variance, weight, bias, eps) -> torch.Tensor:
    """GroupNorm's output with the given per-(sample, group) mean and variance, as one multiply-add per element."""
    per_group = x.shape[1] // groups
    scale = torch.rsqrt(variance + eps).repeat_interleave(per_group, dim=1)  # (B, C), float64
    shift = -mean.repeat_interleave(per_group, dim=1) * scale
    if weight is not None:
        scale, shift = scale * weight.double(), shift * weight.double()
    if bias is not None:
        shift = shift + bias.double()
    per_pixel = (*scale.shape, *[1] * (x.dim() - 2))
    return torch.addcmul(shift.to(x.dtype).view(per_pixel), x, scale.to(x.dtype).view(per_pixel))


class _Moments:
    """Weighted mean and variance per (sample, group), merged tile by tile (Chan et al.'s parallel update, in float64,
    from each tile's own centred moments in float32: no cancellation from large means)."""

    def __init__(self):
        self.total = self.mean = self.m2 = 0.0

    def add(self, x: torch.Tensor, groups: int, weights: torch.Tensor) -> None:
        grouped = x.float().unflatten(1, (groups, -1))  # (B, G, C/G, H, W) or (B, G, C/G, H*W)
        within = tuple(range(2, grouped.dim()))
        total = float(weights.sum()) * grouped.shape[2]
        mean = (grouped * weights).sum(within) / total
        m2 = ((grouped - mean.view(*mean.shape, *[1] * len(within))).square() * weights).sum(within)
        mean, m2 = mean.double().cpu(), m2.double().cpu()
        merged = self.total + total
        delta = mean - self.mean
        self.mean = self.mean + delta * (total / merged)
        self.m2 = self.m2 + m2 + delta.square() * (self.total * total / merged)
        self.total = merged

    def statistics(self) -> Statistics:
        return self.mean, self.m2 / self.total


# ---- the tile layout and the blend weights, in latent pixels ------------------------------------------------------

@dataclass(frozen=True)
class _Axis:
    """Where the tiles lie along one axis: equal tiles spread evenly from edge to edge, so neighbours overlap by at
    least the requested amount; in the middle of each overlap a smoothstep ramp hands over from one to the next."""

    length: int
    starts: tuple[int, ...]
    size: int  # every tile's extent (the whole axis when it fits in one tile)

    @classmethod
    def covering(cls, length: int, tile: int, overlap: int) -> "_Axis":
        if length <= tile:
            return cls(length, (0,), length)
        count = math.ceil((length - overlap) / (tile - overlap))
        return cls(length, tuple(round(i * (length - tile) / (count - 1)) for i in range(count)), tile)

    def ramp(self, margin: float) -> float:
        """The ramp length: each overlap less a margin at both ends, and short enough that ramps never meet."""
        if len(self.starts) == 1:
            return 0.0
        strides = [b - a for a, b in zip(self.starts, self.starts[1:])]
        return max(0.0, min(self.size - max(strides) - 2 * margin, min(strides)))

    def weights(self, index: int, resolution: int, margin: float, device) -> torch.Tensor:
        """Tile `index`'s blend weight at each of its pixels, at `resolution` pixels per latent pixel. Over the axis
        the tiles' weights sum to 1 at every pixel, and are 0 within `margin` latent pixels of a tile's inner edge
        (when the overlap is at least twice the margin)."""
        positions = self.starts[index] + (torch.arange(self.size * resolution, device=device) + 0.5) / resolution
        ramp = self.ramp(margin)
        weight = torch.ones_like(positions)
        if index > 0:
            weight *= _rise(positions, self._seam(index - 1), ramp)
        if index < len(self.starts) - 1:
            weight *= 1 - _rise(positions, self._seam(index), ramp)
        return weight

    def _seam(self, index: int) -> float:
        """The middle of the overlap of tile `index` and the next."""
        return (self.starts[index + 1] + self.starts[index] + self.size) / 2


def _rise(positions: torch.Tensor, seam: float, ramp: float) -> torch.Tensor:
    """0 before the ramp centred on `seam`, 1 after it, smoothstep between; s(u) + s(1 - u) = 1, so a tile's rise and
    its neighbour's fall sum to 1, and the flat ends leave no kink in the blended image."""
    if ramp == 0:
        return (positions >= seam).float()
    u = ((positions - seam) / ramp + 0.5).clamp(0, 1)
    return u * u * (3 - 2 * u)


@dataclass(frozen=True)
class _Grid:
    rows: _Axis
    cols: _Axis

    @classmethod
    def covering(cls, size, tile: int, overlap: int) -> "_Grid":
        return cls(_Axis.covering(size[0], tile, overlap), _Axis.covering(size[1], tile, overlap))

    @property
    def tile_count(self) -> int:
        return len(self.rows.starts) * len(self.cols.starts)

    def tiles(self) -> list[tuple[int, int]]:
        """(row index, column index) of every tile, row by row."""
        return [(i, j) for i in range(len(self.rows.starts)) for j in range(len(self.cols.starts))]

    def region(self, tile, resolution: int) -> tuple[slice, slice]:
        """Where tile (i, j) lies in a tensor with `resolution` pixels per latent pixel."""
        top, left = self.rows.starts[tile[0]] * resolution, self.cols.starts[tile[1]] * resolution
        return slice(top, top + self.rows.size * resolution), slice(left, left + self.cols.size * resolution)

    def weights(self, tile, resolution: int, margin: float, device) -> torch.Tensor:
        return (self.rows.weights(tile[0], resolution, margin, device)[:, None]
                * self.cols.weights(tile[1], resolution, margin, device))
