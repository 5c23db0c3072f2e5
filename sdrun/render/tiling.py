"""Tiled diffusion: the denoiser applied to overlapping latent windows, blended into one prediction per step.

MultiDiffusion (Bar-Tal et al. 2023) averages overlapping windows each step; Mixture of Diffusers (Jiménez 2023)
weights them so that each window fades out towards its neighbours, which hides seams with less overlap. sdrun
does the second: every window's prediction is weighted by a ramp that rises linearly across the overlap with each
neighbour (and stays 1 on sides that touch the canvas edge), and the weighted sum is divided by the summed weights.
The weights of two neighbours add up to exactly 1 across their overlap. One window covering the canvas has weight
1 everywhere, so it is exactly the untiled pass.

Windows are cut from every image of the batch and sent through the denoiser `batch` windows at a time (window
1 of every image, then window 2, ...), so the UNet sees a batch of window-sized latents: memory follows the window
size and the batch, not the image.
"""

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Windows:
    """A window layout over a latent canvas, in latent pixels."""

    height: int  # canvas
    width: int
    size: int  # window side (clipped to the canvas per axis)
    overlap: int  # at least this many latent pixels shared by neighbours
    batch: int  # windows per denoiser call

    @property
    def rows(self) -> list[int]:
        return positions(self.height, self.size, self.overlap)

    @property
    def cols(self) -> list[int]:
        return positions(self.width, self.size, self.overlap)

    @property
    def area(self) -> int:
        """Latent pixels of one window (windows are clipped to the canvas per axis)."""
        return min(self.size, self.height) * min(self.size, self.width)

    @property
    def count(self) -> int:
        return len(self.rows) * len(self.cols)

    def boxes(self) -> list[tuple[int, int, int, int]]:
        """(top, left, height, width) of every window, row by row."""
        h, w = min(self.size, self.height), min(self.size, self.width)
        return [(top, left, h, w) for top in self.rows for left in self.cols]


def positions(length: int, window: int, overlap: int) -> list[int]:
    """Start offsets of windows of `window` covering `length` with at least `overlap` shared, evenly spread so the
    last one ends at the edge."""
    if length <= window:
        return [0]
    count = math.ceil((length - window) / (window - overlap)) + 1
    return [round(i * (length - window) / (count - 1)) for i in range(count)]


def ramp(starts: list[int], index: int, window: int, length: int) -> torch.Tensor:
    """1-D weights of window `index` along one axis: rising over its overlap with the previous window, falling
    over its overlap with the next, 1 elsewhere. Two neighbours' weights sum to 1 on their overlap."""
    window = min(window, length)
    weights = torch.ones(window, dtype=torch.float64)
    start = starts[index]
    if index > 0:
        shared = starts[index - 1] + window - start
        if shared > 0:
            weights[:shared] = (torch.arange(shared, dtype=torch.float64) + 0.5) / shared
    if index + 1 < len(starts):
        shared = start + window - starts[index + 1]
        if shared > 0:
            weights[window - shared:] = torch.minimum(
                weights[window - shared:], (shared - torch.arange(shared, dtype=torch.float64) - 0.5) / shared)
    return weights


def weight_maps(windows: Windows) -> list[torch.Tensor]:
    """The (h, w) blending weights of every window, in boxes() order."""
    rows, cols = windows.rows, windows.cols
    maps = []
    for r in range(len(rows)):
        wy = ramp(rows, r, windows.size, windows.height)
        for c in range(len(cols)):
            maps.append(torch.outer(wy, ramp(cols, c, windows.size, windows.width)))
    return maps


def tiled(denoiser, windows: Windows):
    """Wrap a guided denoiser (x, t, copies) so that it runs over `windows` and blends their predictions."""
    boxes = windows.boxes()
    maps = weight_maps(windows)
    if len(boxes) == 1:
        return denoiser  # one window is the whole canvas: the untiled pass itself

    on_device = {}  # the weight maps and their sum on the latents' device, made on the first step, not every step

    def tiled_denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.device not in on_device:
            device_maps = [weights.to(x.device, torch.float32) for weights in maps]
            weight_sum = torch.zeros(x.shape[-2:], dtype=torch.float32, device=x.device)
            for (top, left, h, w), weights in zip(boxes, device_maps):
                weight_sum[top:top + h, left:left + w] += weights
            on_device[x.device] = device_maps, weight_sum
        device_maps, weight_sum = on_device[x.device]
        total = torch.zeros_like(x, dtype=torch.float32)
        for first in range(0, len(boxes), windows.batch):
            group = boxes[first:first + windows.batch]
            crops = torch.cat([x[:, :, top:top + h, left:left + w] for top, left, h, w in group])
            predictions = denoiser(crops, t, copies=len(group)).float().chunk(len(group))
            for (top, left, h, w), prediction, weights in zip(group, predictions,
                                                               device_maps[first:first + windows.batch]):
                total[:, :, top:top + h, left:left + w] += prediction * weights
        return (total / weight_sum).to(x.dtype)

    return tiled_denoiser
