"""--model-offload: whole models (text encoder, UNet, VAE) move to the GPU one at a time, as each is needed."""

from sdrun.backends.base import Backend


def apply(pipe, device):
    pipe.enable_model_cpu_offload(device=device)


BACKEND = Backend(
    name="model_offload",
    help="Keep only the model in use on the GPU (UNet during denoising, VAE while decoding): "
    "saves the text encoder's and VAE's memory for a small cost in speed.",
    apply=apply,
    needs_cuda=True,
    conflicts=("cpu_offload",),
    places_pipeline=True,
)
