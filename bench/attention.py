"""Attention speed, side by side: sdrun's kernel beside each PyTorch SDPA backend, measured in one run.

    python bench/attention.py [--dtype fp16] [--variants 0,1,2] [--shapes all|sd]

Prints one table of TFLOP/s (4 * B * H * Nq * Nk * d / time) and microseconds per call for each
(batch, heads, seqlen_q, seqlen_k, head_dim), with ours / best PyTorch backend. CUDA events, warm-up, median of
repeats, inputs drawn fresh (random, never zeros) and rotated among several sets so small shapes do not time the
L2 cache. --variants times other paths: 9 the portable kernel on Hopper, 10 / 14 the Hopper kernel with every /
no tile split along the keys (any build), and the alternative tile shapes of a tuning build (SDRUN_TUNE=1).
"""

from __future__ import annotations

import argparse
import datetime
import statistics

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [(2, 8, 4096, 4096, 40), (2, 8, 1024, 1024, 80), (2, 8, 256, 256, 160), (2, 8, 4096, 77, 40),
          (2, 8, 1024, 77, 80), (2, 5, 4096, 4096, 64), (2, 8, 16384, 16384, 40), (2, 8, 32400, 32400, 40),
          (2, 8, 9216, 9216, 40), (2, 5, 9216, 9216, 64),  # SD 1.x and 2.x at 768x768
          (2, 10, 4096, 4096, 64), (2, 20, 1024, 1024, 64), (2, 10, 4096, 77, 64), (2, 20, 1024, 77, 64)]  # SDXL 1024
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION}


def time_us(fn, sets, reps):
    """Median microseconds per call over `reps` timed calls (each on the next input set), after warm-up."""
    for i in range(3):
        fn(*sets[i % len(sets)])
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        x = sets[i % len(sets)]
        a.record()
        fn(*x)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--variants", default="0", help="kernel paths to time (see above)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--check", action="store_true", help="first print each variant's error vs the fp32 reference")
    args = ap.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]

    import sdrun.ops as ops
    from sdrun.ops import _ext

    ops.load()
    fwd = _ext.get().fwd
    variants = [int(v) for v in args.variants.split(",")]
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
          f"{args.dtype} | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | kernel {_ext.how_loaded()}")
    if args.check:  # error / PyTorch's same-precision error (the tests require <= 2)
        from sdrun.ops.reference import reference_attention

        for d in (40, 64, 80, 160):
            for nq, nk in ((1025, 1025), (4096, 77)):
                q, k, v = (torch.randn(2, n, 8, d, device="cuda", dtype=dtype) for n in (nq, nk, nk))
                ref = reference_attention(q, k, v)
                pt = (reference_attention(q, k, v, upcast=False, reorder_ops=True) - ref).abs().max().item()
                errs = [(fwd(q, k, v, d ** -0.5, var) - ref).abs().max().item() / pt for var in variants]
                print(f"# check d={d} {nq}x{nk}: err/err_pytorch " + " ".join(f"v{var}={e:.2f}" for var, e in zip(variants, errs)))
    ours = [f"sdrun v{v}" if len(variants) > 1 else "sdrun" for v in variants]
    cols = ours + list(BACKENDS)
    print("| (B, H, Nq, Nk, d) | " + " | ".join(cols) + " | best PyTorch | sdrun / best | sdrun µs | best µs |")
    print("|---" * (len(cols) + 5) + "|")
    for shape in SHAPES:
        b, h, nq, nk, d = shape
        flops = 4 * b * h * nq * nk * d
        nbytes = 2 * (2 * b * nq * h * d + 2 * b * nk * h * d)
        nsets = max(1, min(4, int(200e6 // nbytes)))  # rotate inputs when they fit in L2 several times over
        sets = [tuple(torch.randn(b, n, h, d, device="cuda", dtype=dtype) for n in (nq, nk, nk)) for _ in range(nsets)]
        reps = args.reps if flops > 1e11 else 4 * args.reps
        us = {}
        scale = d ** -0.5
        for v, name in zip(variants, ours):
            us[name] = time_us(lambda q, k, v_, var=v: fwd(q, k, v_, scale, var), sets, reps)
        tsets = [tuple(x.transpose(1, 2) for x in s) for s in sets]  # SDPA takes (B, H, N, D)
        for name, backend in BACKENDS.items():
            try:
                with sdpa_kernel(backend):
                    us[name] = time_us(torch.nn.functional.scaled_dot_product_attention, tsets, reps)
            except RuntimeError:
                us[name] = float("nan")
        best = min((us[n] for n in BACKENDS if us[n] == us[n]), default=float("nan"))
        mine = min(us[n] for n in ours)
        tf = {n: flops / us[n] / 1e6 for n in cols}
        print(f"| {shape} | " + " | ".join(f"{tf[n]:.1f}" for n in cols)
              + f" | {flops / best / 1e6:.1f} | {best / mine:.2f}x | {mine:.1f} | {best:.1f} |", flush=True)
        del sets, tsets
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
