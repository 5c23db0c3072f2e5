"""--fp16: load the weights in half precision (a load-time dtype, not a conversion after loading)."""

import torch

from sdrun.backends.base import Backend

BACKEND = Backend(
    name="fp16",
    help="Half-precision weights: about half the memory and faster on GPUs. "
    "The SDXL VAE still decodes in fp32 (it overflows in fp16).",
    needs_cuda=True,  # CPU kernels for fp16 are slow or missing: no reason to use it there
    load_dtype=torch.float16,
)
