"""The VAE decoder in less memory, the same pixels: its large convolutions in bands of rows, its SiLU in place.

An untiled decode peaks inside the convolutions at the full image size, not in what they keep. cuDNN's NCHW kernels
copy their input and output to NHWC and back, so a 3x3 convolution of a 256-channel 512x512 activation holds its
input, the input's copy, its output and the output's copy at once (SD 1.5 at 512x512 in fp16: 128 + 128 + 64 + 64
MiB, beside the block's input kept for its shortcut). In bands of BAND_BYTES of input rows, each with the rows its
kernel reaches above and below (zeros at the image's edges, as the convolution's own padding), one band is copied
at a time, into an output allocated once; every output pixel is computed from the same inputs and weights. With
that peak gone the next is ResnetBlock2D's `nonlinearity(norm(x))`, which holds the norm's output beside its SiLU:
done in place (the norm's output is fresh, read by nothing else).

Measured on an H200 (in-process, the decode's peak above the weights, docs/benchmarks.md, fourth session):
SD 1.5 at 512x512 in fp16 610 -> 418 MiB, 25.1 -> 26.4 ms; at 1024x1024 2,434 -> 1,536 MiB, 89 -> 104 ms (SDXL's VAE
in bfloat16 the same); SDXL's in float32 4,882 -> 3,072 MiB. Pixels: bit-identical at 1024x1024 in fp16/bf16, within
2e-3 elsewhere (cuDNN picks other algorithms for the bands' shapes). 32 MiB bands held 482 MiB at 512x512.
Left alone: a channels-last decoder (NHWC needs no copies; in bands it was slower and held as much: 448 -> 401 MiB
at 50 instead of 32 ms), and convolutions under offload hooks, which bring their weights in on their own forward.
"""

import contextlib
import math

import torch
import torch.nn.functional as F

from sdrun.render.forwards import forward_replaced

BAND_BYTES = 16 * 2**20  # input bytes of one band: an eighth of SD 1.5's largest decoder activation at 512x512


@contextlib.contextmanager
def banded(decoder: torch.nn.Module):
    """Within the block, `decoder`'s large stride-1 convolutions run in bands and its resnets' SiLU in place."""
    from diffusers.models.resnet import ResnetBlock2D

    if not decoder.conv_in.weight.is_contiguous():  # channels-last
        yield
        return
    with contextlib.ExitStack() as patched:
        for module in decoder.modules():
            if _hooked(module):
                continue
            if isinstance(module, torch.nn.Conv2d) and _bandable(module):
                patched.enter_context(forward_replaced(module, _in_bands(module)))
            elif isinstance(module, ResnetBlock2D) and type(module.nonlinearity) is torch.nn.SiLU:
                patched.enter_context(_attribute(module, "nonlinearity", torch.nn.SiLU(inplace=True)))
        yield


def _hooked(module) -> bool:
    return getattr(module, "_hf_hook", None) is not None or getattr(module, "_diffusers_hook", None) is not None


def _bandable(conv: torch.nn.Conv2d) -> bool:
    return (conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and conv.padding[0] == conv.kernel_size[0] // 2)


def _in_bands(conv: torch.nn.Conv2d):
    forward = conv.forward
    reach, width_padding = conv.padding

    def run(x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[-2]
        bands = math.ceil(x.numel() * x.element_size() / BAND_BYTES)
        if bands <= 1 or rows < 2 * bands or not x.is_contiguous():
            return forward(x)
        out, step = None, math.ceil(rows / bands)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            piece = x[..., max(0, start - reach):min(rows, stop + reach), :]
            piece = F.pad(piece, (0, 0, max(0, reach - start), max(0, stop + reach - rows)))
            band = F.conv2d(piece, conv.weight, conv.bias, padding=(0, width_padding))
            if out is None:
                out = band.new_empty((*band.shape[:-2], rows, band.shape[-1]))
            out[..., start:stop, :] = band
        return out

    return run


@contextlib.contextmanager
def _attribute(module, name: str, value):
    previous = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, previous)
