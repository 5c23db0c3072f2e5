"""--model-offload: whole models (text encoder, UNet, VAE) on the GPU one at a time, as each is needed, copied in
from pinned CPU memory; into one buffer the size of the largest once the denoise replays from a CUDA graph
(sdrun/offload.py: ModelSwap)."""

from sdrun.backends.base import Backend


def apply(pipe, device):
    from sdrun.offload import swap_models

    return swap_models(pipe, device)


BACKEND = Backend(
    name="model_offload",
    brief="saves the idle models' weights; costs one copy of each model over PCIe an image",
    help="Keep only the model in use on the GPU (UNet during denoising, VAE while decoding), each copied in from "
    "pinned CPU memory when it runs: the other models' weights are saved, for one copy of each model over PCIe "
    "per image. Where the denoise replays from CUDA graphs (from a size's second image), the models share one "
    "buffer the size of the largest, so the UNet comes back to the addresses its graph reads: the decode then "
    "holds the UNet's room too. Under --max-vram or --no-cuda-graphs each model gives its memory back as it "
    "goes. Times and memory: docs/benchmarks.md.",
    apply=apply,
    lowers=("weights",),
    needs_cuda=True,
    conflicts=("cpu_offload",),
    places_pipeline=True,
)
