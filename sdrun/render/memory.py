"""Predicted peak GPU memory of each render stage, without loading any weights.

peak(stage) = weights resident on the GPU during the stage + the stage's activations, where activations are a
measured number of values per (latent or image) pixel times the pixels in flight. The per-pixel figures were
measured on an H200 with torch.cuda.max_memory_allocated around each stage (bench/render4k.py prints predicted
beside measured; tests/test_gpu_render.py keeps them within 15%). Weight sizes are the parameter counts of the
real architectures (configs/), counted on the meta device.
"""

from dataclasses import dataclass, field

GIB = 2**30


@dataclass(frozen=True)
class Architecture:
    """What memory depends on, per model family."""

    unet: float  # parameters, millions
    vae: float
    text: float  # all text encoders together
    unet_values: float  # activation values alive at the UNet's peak, per latent pixel and batch entry
    unet_values_chunked: float  # the same with feed-forward layers run in token chunks
    decode_values: float  # VAE decoder activation values at its peak, per image pixel
    encode_values: float  # VAE encoder, per image pixel


# Measured on an H200 (bench/render4k.py, 2026-12-01, SD 1.5, fp16, 3840x2160): the denoise stage peaked at
# 8,550-9,250 activation values per latent pixel and batch entry (whole canvas at batch 2; 64-latent windows at
# batches of 16 and 8), 5,600 with the feed-forward chunked; a tiled decode at 1,220 per pixel of one 512-pixel
# tile plus the float32 result. SD 2.x scales SD 1.x by its narrower heads; SDXL's figures are estimates (no
# attention at its full-resolution level: fewer values per latent pixel) that predicted its stages' peaks at
# 1024x1024 3-11% high (bench/memory.py, docs/benchmarks.md: fourth session).
ARCHITECTURES = {
    "tiny": Architecture(0.99, 0.66, 1.60, 600, 400, 300, 150),
    "sd1": Architecture(859.5, 83.7, 123.1, 8800, 5600, 1220, 600),
    "sd2": Architecture(865.9, 83.7, 340.4, 8000, 5300, 1220, 600),
    "sd2-v": Architecture(865.9, 83.7, 340.4, 8000, 5300, 1220, 600),
    "sdxl": Architecture(2567.5, 83.7, 817.7, 6300, 3800, 1220, 600),
}
# The share of each component's parameters that --fp8 (UNet) and --fp8-text-encoders store in 1 byte: the
# weights of their linear and convolution layers less those kept in higher precision (sdrun/fp8_storage.py),
# counted on the meta device from configs/ (tests/test_fp8.py counts them again). Norms and embedding tables are
# the rest: SD 1.x's CLIP keeps its 38M-entry token table, 31% of the encoder.
FP8_SHARES = {
    "tiny": {"unet": 0.9674, "text": 0.0102},
    "sd1": {"unet": 0.9971, "text": 0.6902},
    "sd2": {"unet": 0.9971, "text": 0.8502},
    "sd2-v": {"unet": 0.9971, "text": 0.8502},
    "sdxl": {"unet": 0.9965, "text": 0.8733},
}
FP8_BYTES = 1
# A VAE decode with --channels-last holds this share of the NCHW decode's activations: cuDNN's NCHW convolutions
# convert their tensors to NHWC and back in workspaces. Measured on an H200 (2026-12-01, max_memory_allocated above
# the weights): SD 1.5 at 512x512 512 against 612 MiB, at 1024x1024 2,048 against 2,439; SDXL's float32 decode at
# 1024x1024 4,108 against 4,888. The denoise's peak was the same in both layouts; the encoder is not measured.
CHANNELS_LAST_DECODE_SHARE = 0.84
# An untiled NCHW decode runs its large convolutions in bands (render/banded_decode.py) and holds this share of
# what it held whole. Measured on an H200 (fourth session, above the weights): SD 1.5 at 512x512 418 against 610 MiB,
# at 1024x1024 (and SDXL's VAE in bf16) 1,536 against 2,434; SDXL's in float32 3,072 against 4,882. The largest
# ratio, 0.685, rounded up; a channels-last decoder is left whole (its share is the one above).
BANDED_DECODE_SHARE = 0.69
TEXT_ACTIVATIONS_GIB = 0.05  # the text encoders' forward at 77 tokens: negligible beside everything else
OFFLOADED_LAYER_SHARE = 0.02  # streaming keeps about one layer's weights (and the next one's copy) on the GPU
# --cpu-offload streams the UNet a resnet or attention at a time (sdrun/offload.py): the one running and the next
# one's copy; SD 1.5's largest, 98 MB, is 6% of its UNet
OFFLOADED_UNET_PART_SHARE = 0.10


@dataclass(frozen=True)
class Placement:
    """How weights sit on the GPU: all resident (the UNet perhaps in part), one model at a time (model offload: in
    the room of the largest once a CUDA graph replays the denoise), or streamed part by part (--cpu-offload)."""

    mode: str  # "resident" | "model" | "layer"
    weight_bytes: int  # bytes per parameter in the compute dtype: 2 for fp16, 4 for fp32
    fp8: dict = field(default_factory=dict)  # component ("unet", "text") -> the share of it stored in fp8
    unet_resident_gib: float | None = None  # partial residency: the UNet's weights kept on the GPU, the rest streamed
    fixed_addresses: bool = False  # model offload: every model in one arena, held throughout (sdrun/offload.py)


def weights_gib(arch: Architecture, placement: Placement, component: str) -> float:
    """Weights on the GPU while `component` ("text", "unet", "vae") runs."""
    sizes = {"text": arch.text, "unet": arch.unet, "vae": arch.vae}
    if placement.mode == "resident":
        return sum(_resident_gib(sizes, placement, name) for name in sizes)
    if placement.mode == "model" and placement.fixed_addresses:  # in the room of the largest: the arena
        return max(_component_gib(sizes, placement, name) for name in sizes)
    share = 1 if placement.mode == "model" else OFFLOADED_UNET_PART_SHARE if component == "unet" else \
        OFFLOADED_LAYER_SHARE
    return _component_gib(sizes, placement, component) * share


def _resident_gib(sizes: dict, placement: Placement, component: str) -> float:
    """A resident component's weights on the GPU; a partly resident UNet's resident part plus the layers in flight."""
    full = _component_gib(sizes, placement, component)
    if component != "unet" or placement.unet_resident_gib is None:
        return full
    return min(full, placement.unet_resident_gib + full * OFFLOADED_LAYER_SHARE)


def _component_gib(sizes: dict, placement: Placement, component: str) -> float:
    fp8 = placement.fp8.get(component, 0)
    return sizes[component] * 1e6 * (fp8 * FP8_BYTES + (1 - fp8) * placement.weight_bytes) / GIB


def denoise_gib(arch: Architecture, latent_pixels: int, batch: int, value_bytes: int, chunked: bool) -> float:
    """UNet activations for `batch` entries of `latent_pixels` each (windows x images x guidance halves)."""
    per_pixel = arch.unet_values_chunked if chunked else arch.unet_values
    return latent_pixels * batch * per_pixel * value_bytes / GIB


def vae_gib(arch: Architecture, work_pixels: int, output_pixels: int, images: int, value_bytes: int,
            encode: bool, channels_last: bool = False, tiled: bool = False) -> float:
    """VAE activations over `work_pixels` at a time (the image, or one tile of it) for `images` images at a time,
    plus the float32 result for the whole image (`output_pixels`)."""
    per_pixel = arch.encode_values if encode else arch.decode_values
    if channels_last and not encode:
        per_pixel *= CHANNELS_LAST_DECODE_SHARE
    elif not (encode or tiled):
        per_pixel *= BANDED_DECODE_SHARE
    result = output_pixels * images * (8 if encode else 3) * 4
    return (work_pixels * images * per_pixel * value_bytes + result) / GIB
