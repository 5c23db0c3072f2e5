"""GroupNorm + SiLU at the SD 1.5 UNet's shapes: PyTorch (F.group_norm then F.silu, as diffusers' blocks run them)
beside sdrun's fused kernel (csrc/group_norm.cu), NCHW and channels-last, fp16.

Each figure is µs per call, from a CUDA graph of 20 calls replayed (so the host's launch cost, which graphs remove
from sdrun's denoise, is not counted), median of 10 replays; "GB/s" counts one read and one write of the tensor.
Also the largest error of each against a float64 reference.

    python bench/group_norm.py
"""

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdrun import ops  # noqa: E402
from sdrun.ops import norms  # noqa: E402

SHAPES = [  # (batch, channels, height, width): the UNet at 512x512 (batch 2), its windows (32), and 1024x1024
    (2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8), (2, 960, 64, 64),
    (32, 320, 64, 64), (32, 1280, 16, 16), (2, 320, 128, 128), (2, 640, 64, 64),
]


def replayed_us(fn, calls: int = 20, warmups: int = 1, replays: int = 12, dropped: int = 2) -> float:
    """µs per call of `fn`, from a CUDA graph of `calls` calls: the median of `replays` replays less the first
    `dropped`, after `warmups` eager calls on a side stream (as capture requires). bench/unet_profile.py times its
    forward with it too."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    del graph
    return statistics.median(times[dropped:])


def main() -> None:
    ops.load()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; GroupNorm(32) + SiLU, fp16, µs per call")
    print("| shape | layout | PyTorch µs | sdrun µs | speed-up | sdrun GB/s | PyTorch error | sdrun error |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        for channels_last in (False, True):
            x = torch.randn(*shape, device="cuda", dtype=torch.float16) * 2 + 1
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            weight = torch.randn(shape[1], device="cuda", dtype=torch.float16) + 1
            bias = torch.randn(shape[1], device="cuda", dtype=torch.float16)
            torch_fn = lambda: F.silu(F.group_norm(x, 32, weight, bias, 1e-5))  # noqa: E731
            ours_fn = lambda: norms.group_norm(x, 32, weight, bias, 1e-5, silu=True)  # noqa: E731
            exact = F.silu(F.group_norm(x.double(), 32, weight.double(), bias.double(), 1e-5))
            errors = [(fn().double() - exact).abs().max().item() for fn in (torch_fn, ours_fn)]
            theirs, ours = replayed_us(torch_fn), replayed_us(ours_fn)
            gbps = 2 * x.numel() * 2 / (ours * 1e-6) / 1e9
            print(f"| {shape} | {'NHWC' if channels_last else 'NCHW'} | {theirs:.1f} | {ours:.1f} | "
                  f"{theirs / ours:.2f}x | {gbps:.0f} | {errors[0]:.4f} | {errors[1]:.4f} |", flush=True)


if __name__ == "__main__":
    main()
