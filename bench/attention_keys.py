"""What an attention CTA costs beyond its key loop: time against the number of keys at a fixed grid.

    python bench/attention_keys.py [--variants 0,9]

For (2,10,4096,Nk,64) and (2,8,4096,Nk,40), Nk = 1024 .. 16384, it times sdrun's kernel (CUDA events, median of
15 calls after 3) and fits time = a + b * Nk / 128: b is one key tile's time over the whole grid, a / b the fixed
cost of a CTA in key tiles (the grid depends on the queries only, so it is the same for every Nk). Variants as in
bench/attention.py.
"""

import argparse
import statistics

import torch


def time_us(fwd, shape, variant):
    b, h, nq, nk, d = shape
    q = torch.randn(b, nq, h, d, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(b, nk, h, d, device="cuda", dtype=torch.float16) for _ in range(2))
    for _ in range(3):
        fwd(q, k, v, d ** -0.5, variant)
    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fwd(q, k, v, d ** -0.5, variant)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="0", help="kernel paths to fit, comma-separated")
    args = parser.parse_args()
    import sdrun.ops as ops
    from sdrun.ops import _ext

    ops.load()
    fwd = _ext.get().fwd
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | kernel {_ext.how_loaded()}")
    for variant in (int(v) for v in args.variants.split(",")):
        for b, h, nq, d in ((2, 10, 4096, 64), (2, 8, 4096, 40)):
            tiles, us = [], []
            for nk in (1024, 2048, 4096, 8192, 16384):
                tiles.append(nk / 128)
                us.append(time_us(fwd, (b, h, nq, nk, d), variant))
                print(f"v{variant} ({b}, {h}, {nq}, {nk}, {d}): {us[-1]:.1f} us, "
                      f"{4 * b * h * nq * nk * d / us[-1] / 1e6:.0f} TFLOP/s", flush=True)
            mean_t, mean_us = statistics.fmean(tiles), statistics.fmean(us)
            slope = (sum((t - mean_t) * (u - mean_us) for t, u in zip(tiles, us))
                     / sum((t - mean_t) ** 2 for t in tiles))
            fixed = mean_us - slope * mean_t
            print(f"v{variant} (2, {h}, {nq}, Nk, {d}): {fixed:.1f} us + {slope:.2f} us per key tile: a CTA's fixed "
                  f"cost is {fixed / slope:.1f} key tiles")


if __name__ == "__main__":
    main()
