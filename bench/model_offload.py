"""Issue 9's goal in one short GPU run: --model-offload at <= 1.1x the time without it (SD 1.5, 512x512, 50 steps,
fp16), through the real CLI as bench/memory.py runs it (`sdrun_cli`: -n 4, the best per-image seconds after the
first image, the highest peak among them). From the second image on both rows replay the denoise from a CUDA
graph: under --model-offload the UNet is copied back into the same GPU buffer each image (sdrun/offload.py).
Random weights (bench/flags.py's `build`, cached in /tmp/sdrun-bench-FAMILY).

    python bench/model_offload.py                                       # about a minute on an H200
    python bench/model_offload.py --family tiny --size 64 --steps 2     # plumbing; on a CPU the offload row fails
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import CUDA, model_folder, sdrun_cli  # noqa: E402

GOAL = 1.1  # issue 9: --model-offload's time at most this times the time without it
IMAGES = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd1", help="the architecture (tiny: plumbing)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    folder = model_folder(args.family)
    fp16 = ["--fp16"] if CUDA else []
    print(f"\n## --model-offload against resident, {args.family} {args.size}x{args.size}, {args.steps} steps\n"
          "| configuration | s / image | peak GiB |\n|---|---|---|", flush=True)
    seconds = {}
    for flags in (fp16, fp16 + ["--model-offload"]):
        label = f"sdrun {' '.join(flags) or '(no flags)'}"
        try:
            seconds[label], peak = sdrun_cli(folder, flags, args.size, args.steps, IMAGES)
        except RuntimeError as error:  # the row says why; the other row still counts
            print(f"| {label} | failed: {str(error)[:160]} | |", flush=True)
            continue
        print(f"| {label} | {seconds[label]:.3f} | {f'{peak:.2f}' if peak is not None else '-'} |", flush=True)
    if len(seconds) == 2:
        resident, offloaded = seconds.values()
        ratio = offloaded / resident
        print(f"\n--model-offload at {ratio:.2f}x the time without it: goal <= {GOAL}x "
              f"{'met' if ratio <= GOAL else 'not met'}", flush=True)


if __name__ == "__main__":
    main()
