"""--fp8: the UNet's linear and convolution weights stored in float8_e4m3fn (1 byte a parameter), each cast to the
model's compute dtype while its layer runs (sdrun/fp8_storage.py says what stays in higher precision, and why).
--fp8-text-encoders does the same for the text encoders (its own file); the two are independent, as ComfyUI's."""

from sdrun.backends.base import Backend

STORAGE_DTYPE_NAME = "float8_e4m3fn"  # the dtype fp8_storage.py stores in


def storage_dtype():
    import torch

    return getattr(torch, STORAGE_DTYPE_NAME)


def unavailable_reasons(device) -> list[str]:
    """Why fp8 storage cannot work with this torch on `device`, as sentences. Here, not in fp8_storage.py, which
    imports diffusers' hooks: `sdrun info` asks every backend and imports no diffusers."""
    import torch

    if not hasattr(torch, STORAGE_DTYPE_NAME):
        return [f"--fp8 needs the {STORAGE_DTYPE_NAME} dtype, which torch {torch.__version__} lacks: install "
                "torch 2.1 or later"]
    try:
        torch.ones(2, device=device).to(storage_dtype()).to(torch.float32)
    except (RuntimeError, TypeError, NotImplementedError) as error:
        return [f"--fp8 needs {STORAGE_DTYPE_NAME} tensors on {device.type}, which torch does not support there "
                f"({str(error).splitlines()[0] if str(error) else type(error).__name__})"]
    return []


def store(pipe, device, names: tuple[str, ...], kind: str, flag: str) -> str:
    """Store the named components of `pipe` in fp8; the note says how much of each, in which dtypes, and how
    weights are widened when that is slower than it could be."""
    from sdrun.fp8_storage import covered_share, store_in_fp8, widener

    compute = pipe.unet.dtype
    widen, slower = widener(device)
    described = []
    for name in names:
        model = getattr(pipe, name, None)
        if model is not None:
            share = covered_share(model, kind)
            layers = store_in_fp8(model, kind, compute, widen)
            described.append(f"{name}: {layers} layers, {share:.0%} of its parameters")
    return (f"{flag}: weights stored in {STORAGE_DTYPE_NAME} ({'; '.join(described)}), computed in "
            f"{str(compute).removeprefix('torch.')}" + (f"; {slower}" if slower else ""))


def apply(pipe, device):
    return store(pipe, device, ("unet",), "unet", BACKEND.flag)


BACKEND = Backend(
    name="fp8",
    brief="saves half the UNet's weights (SDXL 4.8 -> 2.4 GiB); costs slightly changed images",
    help="UNet weights stored in 8-bit floats (e4m3): half the UNet's fp16 memory (SDXL: 4.8 -> 2.4 GiB). Computed "
    "in the model's dtype (fp16/fp32); norms, embeddings, biases and the first and last layers stay in it. Images "
    "change slightly (on random SD 1.5 weights, a UNet call's relative error is 0.14, diffusers' layerwise "
    "casting's 0.16). Storage only: fp8 matrix products measured 1.5-3.4x slower at the UNet's shapes (H200).",
    apply=apply,
    lowers=("weights",),
    restores_weights=True,
    extra_reasons=unavailable_reasons,
)
