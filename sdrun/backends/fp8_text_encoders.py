"""--fp8-text-encoders: the text encoders' linear weights stored in float8_e4m3fn, as --fp8 does for the UNet."""

from sdrun.backends.base import Backend
from sdrun.backends.fp8 import store, unavailable_reasons


def apply(pipe, device):
    return store(pipe, device, ("text_encoder", "text_encoder_2"), "text", BACKEND.flag)


BACKEND = Backend(
    name="fp8_text_encoders",
    brief="saves 40% of the text encoders' weights (SDXL 1.5 -> 0.86 GiB); costs how closely prompts are followed",
    help="Text encoder weights stored in 8-bit floats (e4m3), as --fp8 does for the UNet (SDXL: 1.5 -> 0.86 GiB "
    "at fp16). Token embeddings and the output projection stay in the model's dtype; prompts are followed slightly "
    "less exactly.",
    apply=apply,
    lowers=("weights",),
    restores_weights=True,
    extra_reasons=unavailable_reasons,
)
