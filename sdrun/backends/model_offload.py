"""--model-offload: whole models (text encoder, UNet, VAE) move to the GPU one at a time, as each is needed."""

from sdrun.backends.base import Backend


def apply(pipe, device):
    pipe.enable_model_cpu_offload(device=device)


BACKEND = Backend(
    name="model_offload",
    brief="saves 2.6 -> 1.9 GiB (SD 1.5 at 512x512); costs 1.5-1.9x the time",
    help="Keep only the model in use on the GPU (UNet during denoising, VAE while decoding): "
    "SD 1.5 at 512x512 2.6 -> 1.9 GiB, 1.5-1.9x the time (weights cross PCIe every image).",
    apply=apply,
    lowers=("weights",),
    needs_cuda=True,
    conflicts=("cpu_offload",),
    places_pipeline=True,
)
