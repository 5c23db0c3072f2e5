"""One SD 1.5 UNet forward (batch 2: both guidance halves), fp16, with PyTorch SDPA attention beside sdrun's kernel.

Separates the kernel's own speed from the per-call cost of torch.library's custom-op dispatch: the processor as
shipped calls the compiled op directly in eager mode; the last column forces every call through the custom op (the
path torch.compile traces). Random weights (configs/sd1); CUDA events, median of 20.

    python bench/unet.py
"""

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402

from sdrun import models, ops  # noqa: E402
from sdrun.ops import attention, processor  # noqa: E402


def forward_ms(unet, size: int) -> float:
    sample = torch.randn(2, 4, size // 8, size // 8, device="cuda", dtype=torch.float16)
    context = torch.randn(2, 77, 768, device="cuda", dtype=torch.float16)
    times = []
    with torch.no_grad():
        for i in range(25):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            unet(sample, 500, context)
            end.record()
            torch.cuda.synchronize()
            if i >= 5:
                times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(models.CONFIGS / "sd1" / "unet"))
    unet = unet.half().eval()
    ops.load()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; ms per UNet forward (median of 20)")
    print("| size | PyTorch SDPA | sdrun kernel (as shipped: direct call) | sdrun kernel (through the custom op) |")
    print("|---|---|---|---|")
    shipped = processor.memory_efficient_attention
    for size in (512, 1024):
        unet.set_attn_processor(AttnProcessor2_0())
        base = forward_ms(unet, size)
        processor.install(unet)
        direct = forward_ms(unet, size)
        processor.memory_efficient_attention = lambda q, k, v, scale: attention.mem_eff_attn(q, k, v, float(scale))
        custom = forward_ms(unet, size)
        processor.memory_efficient_attention = shipped
        print(f"| {size}x{size} | {base:.2f} | {direct:.2f} | {custom:.2f} |", flush=True)


if __name__ == "__main__":
    main()
