"""One batch on 1 and on N GPUs through the real CLI (`sdrun --gpus N`): images per second, and whether both runs
wrote the same files with the same pixels.

The model is the full-size Stable Diffusion 1.5 architecture with seeded random weights, saved once as a
diffusers folder (bench/flags.py `build`). Each run is one `sdrun` process, timed from start to exit, so the
multi-GPU figure includes what a user waits for: starting the processes and loading the model on every GPU.

    python bench/multigpu.py                    # 64 images, 512x512, 30 steps, --fp16, 1 vs 2 GPUs
    python bench/multigpu.py --gpus 4 --images 128
    OMP_NUM_THREADS=1 python bench/multigpu.py --family tiny --size 64 --steps 2 --images 8 --device cpu

The last one checks the plumbing on any machine. On a CPU the pixels depend on the thread count (sums are split
differently), and `--gpus` gives each process its share of the cores: fix OMP_NUM_THREADS for both runs.
"""

import argparse
import datetime
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.flags import build  # noqa: E402


def run(model: Path, out: Path, processes: int, args) -> float:
    """Seconds for one `sdrun` batch of args.images images into `out`."""
    command = [sys.executable, "-m", "sdrun", "a lighthouse on a cliff at dusk", "--model", str(model),
               "-n", str(args.images), "--seed", "1", "--steps", str(args.steps), "-W", str(args.size),
               "-H", str(args.size), "--device", args.device, "-o", f"{out}/{{index}}.png", "-q"]
    if args.device != "cpu":
        command.append("--fp16")
    if processes > 1:
        command += ["--gpus", str(processes)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)  # the written paths
    return time.perf_counter() - start


def pixel_hashes(folder: Path) -> dict[str, str]:
    """File name -> hash of its pixels (the metadata differs: it records the measured seconds)."""
    hashes = {}
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as image:
            hashes[path.name] = hashlib.sha256(image.tobytes()).hexdigest()
    return hashes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2, help="the multi-GPU run's process count")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--family", default="sd1", help="architecture from configs/ (tiny for a smoke test)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--folder", type=Path, help="where the model and images go [/tmp/sdrun-multigpu-FAMILY]")
    args = parser.parse_args()
    folder = args.folder or Path(f"/tmp/sdrun-multigpu-{args.family}")
    model = folder / "model"
    if not (model / "model_index.json").is_file():
        build(args.family, model)
    seconds = {}
    for processes in (1, args.gpus):
        out = folder / f"out-{processes}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        seconds[processes] = run(model, out, processes, args)
    one, many = pixel_hashes(folder / "out-1"), pixel_hashes(folder / f"out-{args.gpus}")
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"# sdrun multi-GPU benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{device}, torch {torch.__version__}; {args.family} architecture, random weights, {args.images} images "
          f"{args.size}x{args.size}, {args.steps} steps{', --fp16' if args.device == 'cuda' else ''}; "
          "whole command timed (start-up and loading included)")
    print("| processes | seconds | images/s | speed-up |")
    print("|---|---|---|---|")
    for processes, taken in seconds.items():
        print(f"| {processes} | {taken:.1f} | {args.images / taken:.2f} | {seconds[1] / taken:.2f}x |")
    same = one == many and len(one) == args.images
    print(f"same files and pixels: {'yes' if same else 'NO'} ({len(one)} and {len(many)} files)")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
