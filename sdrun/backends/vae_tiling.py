"""--vae-tiling: decode (and encode) in overlapping tiles, blended at the seams."""

from sdrun.backends.base import Backend


def apply(pipe, _device):
    pipe.vae.enable_tiling()


BACKEND = Backend(
    name="vae_tiling",
    help="Decode in overlapping tiles: VAE memory stays flat at large sizes (4K fits in a few GB). "
    "Slower decode; faint seams are possible.",
    apply=apply,
)
