"""The memory/speed backends, in the one order they apply in.

Order, and why:
1. fp16           a load-time dtype: it must be known before the weights are read.
2. channels_last  changes the weights' memory format; offload hooks must wrap the final tensors.
3. xformers       swaps attention processors on the modules; offload hooks must wrap the final modules.
4. fp8          the weights' storage dtype, after the layout (fp8 casts keep it) and the attention processors
5. fp8_text_encoders  (xformers reads the weights' dtype to pick its compute dtype), and before the offloads:
                 their hooks must wrap the final fp8 tensors, and sequential offload then moves 1 byte a weight.
6. vae_slicing    VAE settings: independent of placement.
7. vae_fp32       render settings only (the decode stage picks its dtype and tiles, the denoise stage windows):
8. vae_tiling     nothing on the pipeline, so their place in the order is free; they sit with the other render
9. tiled_diffusion  settings.
10. cpu_offload   placement: installs accelerate hooks and moves the model itself, instead of pipe.to(device);
11. model_offload so the offloads come last (diffusers: enable_model_cpu_offload moves the pipeline to CPU).

No torch import here: the CLI reads this registry to build its options before torch loads.
"""

from sdrun.backends import (
    channels_last,
    cpu_offload,
    fp8,
    fp8_text_encoders,
    fp16,
    model_offload,
    tiled_diffusion,
    vae_fp32,
    vae_slicing,
    vae_tiling,
    xformers,
)
from sdrun.backends.base import Backend
from sdrun.errors import BackendUnavailable, UsageError

BACKENDS: tuple[Backend, ...] = tuple(
    module.BACKEND for module in (fp16, channels_last, xformers, fp8, fp8_text_encoders, vae_slicing, vae_fp32,
                                   vae_tiling, tiled_diffusion, cpu_offload, model_offload)
)
BY_NAME = {backend.name: backend for backend in BACKENDS}


def select(names) -> tuple[Backend, ...]:
    """The requested backends, in application order, after rejecting conflicting pairs."""
    chosen = tuple(backend for backend in BACKENDS if backend.name in set(names))
    for backend in chosen:
        for other in backend.conflicts:
            if other in names:
                raise UsageError(
                    f"{backend.flag} and {BY_NAME[other].flag} cannot be combined: choose one "
                    f"({BY_NAME['cpu_offload'].flag} saves the most memory, {BY_NAME['model_offload'].flag} is faster)"
                )
    return chosen


def ordered(names) -> tuple[str, ...]:
    """Backend names in application order."""
    return tuple(backend.name for backend in BACKENDS if backend.name in set(names))


def check(chosen, device) -> None:
    """Raise one BackendUnavailable listing every reason any chosen backend cannot run on `device`."""
    reasons = [reason for backend in chosen for reason in backend.unavailable_reasons(device)]
    if reasons:
        raise BackendUnavailable("; ".join(reasons) + hint(chosen, device))


def hint(chosen, device) -> str:
    if device.type == "cpu" and any(backend.needs_cuda for backend in chosen):
        names = " ".join(b.flag for b in chosen if b.needs_cuda)
        return f" (drop {names} to run on the CPU, or run where torch sees a CUDA GPU; `sdrun info` shows what is usable)"
    return " (`sdrun info` shows what is usable here)"


def load_dtype(chosen):
    import torch

    names = [backend.load_dtype for backend in chosen if backend.load_dtype is not None]
    return getattr(torch, names[0]) if names else torch.float32


def vae_tiles(options: dict) -> tuple[int, int]:
    """(tile size, overlap) in image pixels: --tile-size and --tile-overlap, or their defaults."""
    return (options.get("tile_size") or vae_tiling.TILE_SIZE,
            options.get("tile_overlap") if options.get("tile_overlap") is not None else vae_tiling.TILE_OVERLAP)


def lowering(stage: str, exclude=()) -> list[Backend]:
    """The backends that lower `stage`'s memory ("weights", "denoise", "decode"), less those in `exclude`: the
    out-of-memory advice names them."""
    return [backend for backend in BACKENDS if stage in backend.lowers and backend.name not in exclude]
