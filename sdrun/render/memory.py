"""Predicted peak GPU memory of each render stage, without loading any weights.

peak(stage) = weights resident on the GPU during the stage + the stage's activations, where activations are a
measured number of values per (latent or image) pixel times the pixels in flight. The per-pixel figures were
measured on an H200 with torch.cuda.max_memory_allocated around each stage (bench/plan_check.py prints predicted
beside measured; tests/test_gpu_render.py keeps them within 15%). Weight sizes are the parameter counts of the
real architectures (configs/), counted on the meta device.
"""

from dataclasses import dataclass

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


# unet_values: SD 1.x at level 0 keeps ~1,700 skip values per latent pixel while a transformer block's GEGLU
# feed-forward holds 320 -> 2560 -> 1280 -> 320 (about 5,000 more); chunking the feed-forward leaves the skips,
# attention's q/k/v/out and the residual stream. SDXL has no attention at its full-resolution level.
ARCHITECTURES = {
    "tiny": Architecture(0.99, 0.66, 1.60, 600, 400, 300, 150),
    "sd1": Architecture(859.5, 83.7, 123.1, 7000, 4000, 1220, 600),
    "sd2": Architecture(865.9, 83.7, 340.4, 6400, 3800, 1220, 600),
    "sd2-v": Architecture(865.9, 83.7, 340.4, 6400, 3800, 1220, 600),
    "sdxl": Architecture(2567.5, 83.7, 817.7, 5000, 3000, 1220, 600),
}
TEXT_ACTIVATIONS_GIB = 0.05  # the text encoders' forward at 77 tokens: negligible beside everything else
OFFLOADED_LAYER_SHARE = 0.02  # sequential offload keeps about one layer's weights resident at a time


@dataclass(frozen=True)
class Placement:
    """How weights sit on the GPU: all resident, one model at a time (model offload), or one layer at a time."""

    mode: str  # "resident" | "model" | "layer"
    weight_bytes: int  # bytes per parameter: 2 for fp16, 4 for fp32


def weights_gib(arch: Architecture, placement: Placement, component: str) -> float:
    """Weights on the GPU while `component` ("text", "unet", "vae") runs."""
    sizes = {"text": arch.text, "unet": arch.unet, "vae": arch.vae}
    if placement.mode == "resident":
        params = sum(sizes.values())
    elif placement.mode == "model":
        params = sizes[component]
    else:
        params = sizes[component] * OFFLOADED_LAYER_SHARE
    return params * 1e6 * placement.weight_bytes / GIB


def denoise_gib(arch: Architecture, latent_pixels: int, batch: int, value_bytes: int, chunked: bool) -> float:
    """UNet activations for `batch` entries of `latent_pixels` each (windows x images x guidance halves)."""
    per_pixel = arch.unet_values_chunked if chunked else arch.unet_values
    return latent_pixels * batch * per_pixel * value_bytes / GIB


def vae_gib(arch: Architecture, work_pixels: int, output_pixels: int, images: int, value_bytes: int,
            encode: bool) -> float:
    """VAE activations over `work_pixels` at a time (the image, or one tile of it) for `images` images at a time,
    plus the float32 result for the whole image (`output_pixels`)."""
    per_pixel = arch.encode_values if encode else arch.decode_values
    result = output_pixels * images * (8 if encode else 3) * 4
    return (work_pixels * images * per_pixel * value_bytes + result) / GIB
