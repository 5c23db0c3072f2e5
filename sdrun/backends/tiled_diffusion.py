"""--tiled-diffusion: denoise in overlapping latent windows, blended every step (render/tiling.py).

The denoise stage wraps the denoiser in the plan's windows, so nothing is set on the pipeline here. Window size
and overlap default to the model's native size and a quarter of it; the window batch is the largest that fits the
memory budget (--max-vram, or the GPU).
"""

from sdrun.backends.base import Backend, Option

BACKEND = Backend(
    name="tiled_diffusion",
    brief="saves denoiser memory at big sizes; costs coherence: each window sees its part",
    help="Denoise big images in overlapping windows of the model's native size, blended each step "
    "(Mixture-of-Diffusers style): denoiser memory follows the window, not the image; each window sees only "
    "its part of the prompt's picture, so use it for textures, landscapes and --hires refining.",
    lowers=("denoise",),
    options=(Option("window_size", "--tiled-diffusion: window side in image pixels  [default: the model's, e.g. 512]",
                    minimum=8),
             Option("window_overlap", "--tiled-diffusion: pixels shared by neighbouring windows  [default: a quarter "
                    "of the window]", minimum=0),
             Option("window_batch", "--tiled-diffusion: windows per denoiser call  [default: the most that fit]")),
)
