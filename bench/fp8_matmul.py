"""fp8 matrix products against fp8 storage, for issue 10's "try real fp8 products on sm_89+, keep them only if
measured faster and close enough": the UNet's linear layers at their real shapes, three ways, in one run.

- fp16: the product in fp16 from fp16 weights (no --fp8);
- storage: what --fp8 does today (sdrun/fp8_storage.py): the e4m3 weight widened to fp16 (sdrun.ops.widen_fp8,
  sdrun's kernel on a GPU), then the fp16 product;
- scaled_mm: the product on fp8 tensor cores, torch._scaled_mm(x8, w8.T): the activations quantized to e4m3 each
  call with a per-tensor scale from their absolute maximum (an amax, a division and a cast), the weight as stored
  (sdrun stores it unscaled: scale 1), fp16 out.

Times: CUDA events, median of --reps after a warm-up, inputs drawn fresh (random normal activations, weights of
the layer's init scale) and rotated among sets so as not to time the L2 cache. Error: relative (norm of the
difference over the norm) against the float32 product of the same fp16 inputs; scaled_mm's error adds the
activations' rounding to e4m3 (3 mantissa bits) to the weights'. Shapes (tokens M, in K, out N), batch 2 for the
guidance halves: SD 1.5 at 512x512 (64x64 latents: 8192 tokens at width 320, 2048 at 640, 512 at 1280) and SDXL
at 1024x1024 (8192 tokens at 640, 2048 at 1280); per width the attention projection (KxK), the GEGLU input
(K -> 8K) and the feed-forward output (4K -> K).

    python bench/fp8_matmul.py            # GPU (sm_89+ for scaled_mm)
    python bench/fp8_matmul.py --quick    # the script itself, on any machine (errors; CPU times are not figures)
"""

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdrun import ops  # noqa: E402

FP8 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(FP8).max


def shapes(width: int, tokens: int) -> list[tuple[str, int, int, int]]:
    return [(f"{width} attention projection", tokens, width, width),
            (f"{width} GEGLU in", tokens, width, 8 * width),
            (f"{width} feed-forward out", tokens, 4 * width, width)]


CASES = {"SD 1.5 512x512": shapes(320, 8192) + shapes(640, 2048) + shapes(1280, 512),
         "SDXL 1024x1024": shapes(640, 8192) + shapes(1280, 2048)}


def fp16_product(x: torch.Tensor, w16: torch.Tensor, _w8: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, w16)


def storage_product(x: torch.Tensor, _w16: torch.Tensor, w8: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, ops.widen_fp8(w8, x.dtype))


def scaled_mm_product(x: torch.Tensor, _w16: torch.Tensor, w8: torch.Tensor) -> torch.Tensor:
    scale = (x.abs().amax().float() / E4M3_MAX).clamp(min=1e-12)
    x8 = (x / scale.to(x.dtype)).to(FP8)
    one = torch.ones((), device=x.device)
    return torch._scaled_mm(x8, w8.t(), scale_a=scale, scale_b=one, out_dtype=x.dtype)


METHODS = {"fp16": fp16_product, "storage": storage_product, "scaled_mm": scaled_mm_product}


def inputs(m: int, k: int, n: int, device: str, dtype: torch.dtype, seed: int):
    generator = torch.Generator(device).manual_seed(seed)
    x = torch.randn(m, k, device=device, generator=generator).to(dtype)
    w16 = (torch.randn(n, k, device=device, generator=generator) / k ** 0.5).to(dtype)
    return x, w16, w16.to(FP8)


def timed(fn, sets, reps: int, cuda: bool) -> float:
    """Median microseconds per call."""
    for args in sets[:2]:
        fn(*args)
    times = []
    for i in range(reps):
        args = sets[i % len(sets)]
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) * 1e3)
        else:
            begin = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - begin) * 1e6)
    return statistics.median(times)


def relative_error(out: torch.Tensor, x: torch.Tensor, w16: torch.Tensor) -> float:
    reference = x.float() @ w16.float().t()
    return ((out.float() - reference).norm() / reference.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats: the script itself")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.bfloat16)
    name = torch.cuda.get_device_name() if cuda else "CPU (times are not figures)"
    fp8_products = cuda and torch.cuda.get_device_capability() >= (8, 9) or not cuda
    print(f"# fp8 products, {datetime.date.today()}, {name}, torch {torch.__version__}, {str(dtype)[6:]}; "
          "µs per call and relative error against float32")
    print("| case | layer (M, K, N) | " + " | ".join(METHODS) + " | scaled_mm / storage | scaled_mm / fp16 |")
    print("|---|---|" + "---|" * (len(METHODS) + 2))
    for case, layers in CASES.items():
        totals = dict.fromkeys(METHODS, 0.0)
        for label, m, k, n in layers:
            if args.quick:
                m, k, n = (max(16, side // 256 * 16) for side in (m, k, n))  # fp8 products need multiples of 16
            sets = [inputs(m, k, n, device, dtype, seed) for seed in range(3)]
            micros, cells = {}, []
            for method, fn in METHODS.items():
                if method == "scaled_mm" and not fp8_products:
                    cells.append("no fp8 tensor cores")
                    continue
                micros[method] = timed(fn, sets, 3 if args.quick else args.reps, cuda)
                totals[method] += micros[method]
                cells.append(f"{micros[method]:.1f} ({relative_error(fn(*sets[0]), *sets[0][:2]):.4f})")
            ratios = ([f"{micros['scaled_mm'] / micros['storage']:.2f}x", f"{micros['scaled_mm'] / micros['fp16']:.2f}x"]
                      if "scaled_mm" in micros else ["", ""])
            print(f"| {case} | {label} ({m}, {k}, {n}) | " + " | ".join(cells + ratios) + " |", flush=True)
        print(f"| {case} | all of the above | " + " | ".join(f"{totals[m]:.1f}" for m in METHODS) + " | | |")


if __name__ == "__main__":
    main()
