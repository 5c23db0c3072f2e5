"""--model-offload: whole models (text encoder, UNet, VAE) on the GPU one at a time, as each is needed, copied in
from pinned CPU memory into one buffer the size of the largest (sdrun/offload.py: ModelSwap)."""

from sdrun.backends.base import Backend


def apply(pipe, device):
    from sdrun.offload import swap_models

    return swap_models(pipe, device)


BACKEND = Backend(
    name="model_offload",
    brief="saves the weights of all but the largest model; costs one copy of each model over PCIe an image (the "
    "denoise still replays from CUDA graphs)",
    help="Keep only the model in use on the GPU (UNet during denoising, VAE while decoding), each copied in from "
    "pinned CPU memory when it runs, into one buffer the size of the largest model: the other models' weights "
    "are saved, for one copy of each model over PCIe per image. The UNet comes back to the same addresses every "
    "time, so its denoise replays from CUDA graphs as without the flag (times and memory in docs/benchmarks.md).",
    apply=apply,
    lowers=("weights",),
    needs_cuda=True,
    conflicts=("cpu_offload",),
    places_pipeline=True,
)
