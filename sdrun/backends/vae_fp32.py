"""--vae-fp32: decode and encode in float32 whatever the weights' dtype: the most exact pixels, at twice the memory.

Without it an fp16 VAE computes in fp16 (a call that overflows is redone in float32), and SDXL's own VAE, which
overflows fp16 on real images, in bfloat16 (float32's range) on GPUs that compute it natively, as ComfyUI and
Forge do by default. The decode and encode stages read the flag (render/vae.vae_dtype): nothing is set on the
pipeline.
"""

from sdrun.backends.base import Backend

BACKEND = Backend(
    name="vae_fp32",
    brief="saves the decode's last bits of precision (SDXL: 0.5/255 a pixel on average); costs 2x its memory",
    help="Decode (and encode an init image) in float32 even when the model is fp16. By default SDXL's own VAE "
    "computes in bfloat16 on GPUs with native bf16 (decoding 1024x1024 on an H200: 2.4 GiB above the weights and "
    "88 ms, against 4.9 GiB and 117 ms in float32; pixels differ from float32's by 0.5/255 on average, at most "
    "8/255) and other VAEs in fp16 (0.07/255).",
)


def native_bf16(device) -> bool:
    """The GPU computes bfloat16 in hardware (compute capability 8.0 on): older GPUs and CPUs would emulate it."""
    import torch

    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
