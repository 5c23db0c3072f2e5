"""LayerNorm at the SD UNet's transformer shapes, alone and after the residual addition: PyTorch (`x + residual`,
then nn.LayerNorm, as diffusers' BasicTransformerBlock runs them) beside sdrun's kernel (csrc/layer_norm.cu), fp16.

Each figure is µs per call, from a CUDA graph of 20 calls replayed (bench/group_norm.py's `replayed_us`), median of
10 replays; "GB/s" counts what the fused call must move (two reads, two writes; one of each alone). Also the
largest error of each against a float64 reference.

    python bench/layer_norm.py
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from group_norm import replayed_us  # noqa: E402

from sdrun import ops  # noqa: E402
from sdrun.ops import layer_norms  # noqa: E402

SHAPES = [  # (batch, tokens, width): SD 1.5 at 512x512 (batch 2), at 1024x1024, and SDXL's widths
    (2, 4096, 320), (2, 1024, 640), (2, 256, 1280), (2, 64, 1280), (2, 16384, 320), (2, 4096, 640),
    (2, 1024, 1280),
]


def main() -> None:
    ops.load()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; LayerNorm, fp16, µs per call")
    print("| shape | call | PyTorch µs | sdrun µs | speed-up | sdrun GB/s | PyTorch error | sdrun error |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        x = torch.randn(*shape, device="cuda", dtype=torch.float16) * 2 + 1
        residual = torch.randn(*shape, device="cuda", dtype=torch.float16)
        norm = torch.nn.LayerNorm(shape[-1], device="cuda", dtype=torch.float16)
        norm.weight.data.normal_(1, 0.3)
        norm.bias.data.normal_(0, 0.3)
        params = norm.weight.double(), norm.bias.double()
        cases = [
            ("norm", lambda: norm(x), lambda: layer_norms.layer_norm(x, norm), x, 2),
            ("add + norm", lambda: norm(x + residual), lambda: layer_norms.add_layer_norm(x, residual, norm)[1],
             x + residual, 4),
        ]
        for name, torch_fn, ours_fn, total, passes in cases:
            exact = F.layer_norm(total.double(), (shape[-1],), *params, norm.eps)
            errors = [(fn().double() - exact).abs().max().item() for fn in (torch_fn, ours_fn)]
            theirs, ours = replayed_us(torch_fn), replayed_us(ours_fn)
            gbps = passes * x.numel() * 2 / (ours * 1e-6) / 1e9
            print(f"| {shape} | {name} | {theirs:.1f} | {ours:.1f} | {theirs / ours:.2f}x | {gbps:.0f} | "
                  f"{errors[0]:.4f} | {errors[1]:.4f} |", flush=True)


if __name__ == "__main__":
    main()
