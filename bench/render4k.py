"""4K on a small GPU, side by side: plain diffusers, diffusers' MultiDiffusion, and sdrun through its real CLI.

The model is the full-size SD 1.5 architecture with seeded random weights (bench/flags.py builds and saves it);
fp16, DDIM, 20 steps, guidance 7.5, allocator capped at --cap GiB for every row (the peers through
torch.cuda.set_per_process_memory_fraction, sdrun through its own --max-vram). Peers: one warm-up, then one timed
image. sdrun: `sdrun ... -n 2 --json` in a subprocess; the row is the second image's `seconds` (denoise + decode,
model load and first-use warm-up excluded) and its peak. Each sdrun row also prints its plan's predicted peak per
stage beside the measured one (from the PNG's metadata), which is how memory.py's figures are calibrated.

    python bench/render4k.py                 # every row
    python bench/render4k.py --quick         # 4 steps, to check the script itself
    python bench/render4k.py --peers none --also=--channels-last --also=--fp8   # each sdrun row again with
                                             # these flags added (the peers' rows are the same for every variant)
    python bench/render4k.py --peers panorama --rows 3 --also=--channels-last --only-also   # one row, its peer
"""

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import diffusers  # noqa: E402
from diffusers import DDIMScheduler, StableDiffusionPanoramaPipeline, StableDiffusionPipeline  # noqa: E402
from flags import PROMPT, build  # noqa: E402
from PIL import Image  # noqa: E402

# The panorama pipeline's windows: 64 latents, stride 52 (45 windows at 3840x2176); sdrun's tiled row uses the
# same layout: window 512 px, overlap 12 latents = 96 px, which evenly spreads to stride 52 as well.
PANORAMA = dict(width=3840, height=2176, view_batch_size=16, circular_padding=False)
PANORAMA_WINDOW = dict(window_size=64, stride=52)


def peer_rows(folder: Path, steps: int, cap: float, which: str = "all"):
    torch.cuda.set_per_process_memory_fraction(cap * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_tiling()
    if which == "all":
        yield "diffusers 3840x2160, VAE tiling", timed(lambda: pipe(PROMPT, num_inference_steps=steps, width=3840,
                                                                       height=2160, output_type="pil"))
    panorama = StableDiffusionPanoramaPipeline(**{k: v for k, v in pipe.components.items()
                                                  if k in ("vae", "text_encoder", "tokenizer", "unet")},
                                               scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
                                               safety_checker=None, feature_extractor=None,
                                               requires_safety_checker=False)
    panorama.set_progress_bar_config(disable=True)
    panorama.vae.enable_tiling()
    original = panorama.get_views
    panorama.get_views = lambda h, w, **_: original(h, w, **PANORAMA_WINDOW)
    yield ("diffusers StableDiffusionPanoramaPipeline 3840x2176, 45 windows, view batch 16, VAE tiling",
           timed(lambda: panorama(PROMPT, num_inference_steps=steps, output_type="pil", **PANORAMA)))
    del pipe, panorama
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0)


def timed(make):
    make()  # warm-up: cuDNN autotuning, allocator growth
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    make()
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30, None


SDRUN_ROWS = [
    ("sdrun global 3840x2160 --fp16 --xformers --vae-tiling", ["-W", "3840", "-H", "2160", "--vae-tiling"], 8),
    ("sdrun global 3840x2160 --fp16 --xformers --max-vram 4", ["-W", "3840", "-H", "2160"], 4),
    ("sdrun --tiled-diffusion 3840x2176, the panorama's 45 windows", ["-W", "3840", "-H", "2176", "--vae-tiling",
     "--tiled-diffusion", "--window-size", "512", "--window-overlap", "96"], 8),
    ("sdrun --tiled-diffusion, the same, --max-vram 4", ["-W", "3840", "-H", "2176", "--tiled-diffusion",
     "--window-size", "512", "--window-overlap", "96"], 4),
    ("sdrun --hires 3840x2160 (base 680x384 included)", ["--hires", "3840x2160", "--vae-tiling"], 8),
    ("sdrun --hires 3840x2160, --max-vram 4", ["--hires", "3840x2160"], 4),
]


def sdrun_row(folder: Path, steps: int, args: list[str], cap: float):
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "sdrun", PROMPT, "--model", str(folder), "--steps", str(steps), "--seed", "1",
                   "-n", "2", "--fp16", "--xformers", "--max-vram", str(cap), "--json", "-q", "-o", out + "/",
                   "--scheduler", "ddim", *args]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
        record = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")][-1]
        with Image.open(record["path"]) as image:
            render = json.loads(image.text["sdrun"])["render"]
        return record["seconds"], record["peak_gpu_memory_gb"], render


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="4 steps")
    parser.add_argument("--cap", type=float, default=8.0, help="GiB the peers' allocator is capped at")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/sdrun-bench-sd1"))
    parser.add_argument("--peers", choices=("all", "panorama", "none"), default="all",
                        help="which peers' rows to run (panorama: diffusers' MultiDiffusion only, for the tiled rows)")
    parser.add_argument("--rows", help="comma-separated indexes of the sdrun rows to run [all]")
    parser.add_argument("--also", action="append", default=[],
                        help="flags to add to every sdrun row, as another row each (repeatable)")
    parser.add_argument("--only-also", action="store_true", help="run the sdrun rows only with the --also flags")
    args = parser.parse_args()
    steps = 4 if args.quick else args.steps
    if not (args.folder / "model_index.json").is_file():
        build("sd1", args.folder)
    print(f"# sdrun 4K benchmark, {datetime.date.today()}, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}; SD 1.5 architecture, random weights, fp16, DDIM, {steps} steps")
    print("| render | seconds | peak GiB | cap GiB |")
    print("|---|---|---|---|")
    rows = [] if args.peers == "none" else [(label, result, args.cap)
                                            for label, result in peer_rows(args.folder, steps, args.cap, args.peers)]
    for label, (seconds, peak, _), cap in rows:
        print(f"| {label} | {seconds:.2f} | {peak:.2f} | {cap:g} |", flush=True)
    chosen = [SDRUN_ROWS[int(i)] for i in args.rows.split(",")] if args.rows else SDRUN_ROWS
    chosen = [(f"{label} {also}".rstrip(), extra + also.split(), cap)
              for label, extra, cap in chosen for also in ([] if args.only_also else [""]) + args.also]
    for label, extra, cap in chosen:
        try:
            seconds, peak, render = sdrun_row(args.folder, steps, extra, cap)
        except RuntimeError as error:
            print(f"| {label} | failed: {error} | | {cap:g} |", flush=True)
            continue
        print(f"| {label} | {seconds:.2f} | {peak:.2f} | {cap:g} |", flush=True)
        for stage, predicted, measured, seconds in zip(render["stages"], render["predicted_stage_peaks_gib"],
                                                       render["measured_peak_gib"], render["measured_seconds"]):
            print(f"|   {stage} | {seconds:.2f} | measured {measured:.2f}, predicted {predicted} | |", flush=True)
        print(f"|   predicted peak {render['predicted_peak_gib']} | | | |", flush=True)


if __name__ == "__main__":
    main()
