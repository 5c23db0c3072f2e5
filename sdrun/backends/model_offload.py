"""--model-offload: whole models (text encoder, UNet, VAE) on the GPU one at a time, as each is needed, copied in
from pinned CPU memory (sdrun/offload.py: ModelSwap)."""

from sdrun.backends.base import Backend


def apply(pipe, device):
    from sdrun.offload import swap_models

    return swap_models(pipe, device)


BACKEND = Backend(
    name="model_offload",
    brief="saves the idle models' weights (SD 1.5 at 512x512: 2.64 -> 1.77 GiB); costs time (2.4 s an image, 1.4 s "
    "eager without it)",
    help="Keep only the model in use on the GPU (UNet during denoising, VAE while decoding), each copied in from "
    "pinned CPU memory when it runs: the other models' weights are saved, for one copy of each model over PCIe "
    "per image. SD 1.5 at 512x512 on an H200: 1.77 GiB at 2.39 s an image, against 2.64 GiB at 1.36 s (eager) "
    "or 0.65 s (CUDA graphs) without it.",
    apply=apply,
    lowers=("weights",),
    needs_cuda=True,
    conflicts=("cpu_offload",),
    places_pipeline=True,
)
