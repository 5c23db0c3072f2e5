"""--fp16: load the weights in half precision (a load-time dtype, not a conversion after loading)."""

from sdrun.backends.base import Backend

BACKEND = Backend(
    name="fp16",
    brief="saves half the memory (5.2 -> 2.6 GiB), a third of the time; costs nothing visible",
    help="Half-precision weights: half the memory and faster (SD 1.5, 512x512, H200: 5.2 -> 2.6 GiB, "
    "2.0 -> 1.3 s). SDXL's own VAE decodes in bfloat16, or float32 without native bf16 (it overflows in fp16); "
    "its fp16-fix VAE (--vae) in fp16.",
    needs_cuda=True,  # CPU kernels for fp16 are slow or missing: no reason to use it there
    load_dtype="float16",
    lowers=("weights", "denoise", "decode"),
)
