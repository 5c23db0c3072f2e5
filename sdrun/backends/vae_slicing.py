"""--vae-slicing: decode a batch of latents one image at a time."""

from sdrun.backends.base import Backend


def apply(pipe, _device):
    pipe.vae.enable_slicing()


BACKEND = Backend(
    name="vae_slicing",
    brief="saves the decode memory that grows with --batch-size; costs a slower decode",
    help="Decode batched images one at a time: VAE memory no longer grows with --batch-size. Slightly slower.",
    apply=apply,
    lowers=("decode",),
)
