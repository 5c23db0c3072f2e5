"""--model-offload: whole models (text encoder, UNet, VAE) on the GPU one at a time, as each is needed, copied in
from pinned CPU memory (sdrun/offload.py: ModelSwap)."""

from sdrun.backends.base import Backend


def apply(pipe, device):
    from sdrun.offload import swap_models

    return swap_models(pipe, device)


BACKEND = Backend(
    name="model_offload",
    brief="saves the weights of the models not running; costs one copy of each model per image (figures in "
    "docs/benchmarks.md)",
    help="Keep only the model in use on the GPU (UNet during denoising, VAE while decoding), each copied in from "
    "pinned CPU memory when it runs: the other models' weights are saved, for one copy of each model over PCIe "
    "per image (figures in docs/benchmarks.md).",
    apply=apply,
    lowers=("weights",),
    needs_cuda=True,
    conflicts=("cpu_offload",),
    places_pipeline=True,
)
