"""Memory against speed, sdrun beside diffusers, in one GPU run: fp8 weight storage, --max-vram (partial residency)
and the offloads (issues 9 and 10).

Models: full-size architectures (configs/sd1, configs/sdxl) with seeded random weights, built by bench/flags.py's
`build` and saved as diffusers folders (speed and memory do not depend on weight values).

- sdrun rows go through the real CLI, as a user runs it: `python -m sdrun PROMPT --model FOLDER -n 3 --json ...`;
  the first image is the warm-up, the row is the best per-image `seconds` of the other two (batch.py: the render
  of the image, PNG writing excluded) and the highest `peak_gpu_memory_gb` among them (the render stages'
  torch.cuda.max_memory_allocated).
- diffusers rows run in this process: the pipeline's own __call__, one warm-up then the best of 2, peak of
  torch.cuda.max_memory_allocated over the timed images.
- group-offload candidates: diffusers' pipeline streamed with each of sdrun.offload.CANDIDATES, so the fastest
  configuration under 0.75 GiB can become --cpu-offload's (offload.STREAMED) from this one table.
- quality: the final latents (same seed, same loop: diffusers') with the UNet's weights in fp8, sdrun's storage
  (sdrun/fp8_storage.py) and diffusers' layerwise casting, relative to fp16.

Offload rows run fewer steps (--offload-steps) to keep the run short; compare them by it/s.

    python bench/memory.py --sd15-only         # SD 1.5 table, about 4 minutes on an H200 (each sdrun row is a
    python bench/memory.py --sdxl-only         # process: import, load, 3 images); SDXL, about 4-5 minutes
    python bench/memory.py                     # both, one after the other
    python bench/memory.py --quick             # fewer steps, one timed image: the script itself
    python bench/memory.py --only 'diffusers float16,sdrun --fp16 --fp8'   # just these rows (both tables)
    python bench/memory.py --sd15-only --only 'diffusers model offload,sdrun --fp16,sdrun --fp16 --model-offload'
                                               # issue 9's --model-offload <= 1.1x, beside diffusers' own
    python bench/memory.py --family tiny --xl-family tiny --size 64 --xl-size 64 --quick   # plumbing, any machine
"""

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import diffusers  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402
from flags import build, release, timed  # noqa: E402

from sdrun import offload  # noqa: E402
from sdrun.fp8_storage import store_in_fp8  # noqa: E402

PROMPT = "an astronaut riding a horse on mars, detailed, 8k"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
DTYPE = torch.float16 if CUDA else torch.float32
COMPUTE = str(DTYPE).removeprefix("torch.")
FP8 = torch.float8_e4m3fn


def sdrun_cli(folder: Path, flags: list[str], size: int, steps: int, images: int) -> tuple[float, float | None]:
    """Seconds per image (best after the first) and peak GiB, from the real CLI's --json lines."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "sdrun", PROMPT, "--model", str(folder), "--steps", str(steps), "-W",
                   str(size), "-H", str(size), "--seed", "0", "-n", str(images), "--json", "-q",
                   "-o", f"{out}/image.png", *flags]
        if not CUDA:
            command += ["--device", "cpu"]
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError((done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1])
        records = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
        timed = [r for r in records if r.get("status") == "ok"][1:]
        print_stages(Path(timed[-1]["path"]))
    peaks = [r["peak_gpu_memory_gb"] for r in timed if r.get("peak_gpu_memory_gb") is not None]
    return min(r["seconds"] for r in timed), max(peaks) if peaks else None


def print_stages(image: Path) -> None:
    """The plan's predicted peak of each stage beside the measured one (the image's metadata), before its row."""
    from PIL import Image

    with Image.open(image) as png:
        render = json.loads(png.text["sdrun"])["render"]
    stages = [f"{stage.split(',')[0]} measured {measured} GiB, predicted {predicted}" for stage, predicted, measured
              in zip(render["stages"], render["predicted_stage_peaks_gib"], render["measured_peak_gib"])
              if predicted is not None]
    if stages:  # CUDA only
        print("|   " + "; ".join(stages) + " | | | | |", flush=True)


def diffusers_row(folder: Path, prepare, size: int, steps: int, repeats: int) -> tuple[float, float | None]:
    """Seconds per image (best of `repeats` after a warm-up) and peak GiB of diffusers' own pipeline."""
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=DTYPE)
    pipe.set_progress_bar_config(disable=True)
    prepare(pipe)
    generator = torch.Generator("cpu")

    def make():
        pipe(PROMPT, num_inference_steps=steps, width=size, height=size, generator=generator.manual_seed(0))

    best, _first, peak = timed(make, repeats)
    return best, peak if CUDA else None


def resident(pipe) -> None:
    pipe.to(DEVICE)


def layerwise_fp8(pipe) -> None:
    pipe.unet.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=DTYPE)
    pipe.to(DEVICE)


def sequential_offload(pipe) -> None:
    pipe.enable_sequential_cpu_offload(device=DEVICE)


def model_offload(pipe) -> None:
    pipe.enable_model_cpu_offload(device=DEVICE)


def streamed(settings: dict):
    def prepare(pipe) -> None:
        offload.stream_pipeline(pipe, DEVICE, settings)

    return prepare


def latents_errors(folder: Path, size: int, steps: int) -> dict[str, float]:
    """Relative error of the final latents with the UNet stored in fp8 (sdrun's storage, diffusers' layerwise
    casting) against the same pipeline in the compute dtype, same seed."""
    def latents(store) -> torch.Tensor:
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=DTYPE)
        pipe.set_progress_bar_config(disable=True)
        store(pipe.unet)
        pipe.to(DEVICE)
        out = pipe(PROMPT, num_inference_steps=steps, width=size, height=size, output_type="latent",
                   generator=torch.Generator("cpu").manual_seed(0)).images.float().cpu()
        del pipe
        release()
        return out

    reference = latents(lambda unet: None)
    ours = latents(lambda unet: store_in_fp8(unet, "unet", DTYPE))
    theirs = latents(lambda unet: unet.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=DTYPE))
    return {name: ((out - reference).norm() / reference.norm()).item()
            for name, out in (("sdrun --fp8", ours), ("diffusers layerwise casting", theirs))}


def table(title: str, rows: list, only: set[str] | None) -> None:
    """rows: (label, steps, measure(steps) -> (seconds, peak)); a row that fails says why and the table goes on.
    `only`: the labels to run (None: all)."""
    print(f"\n## {title}\n| configuration | steps | s / image | it/s | peak GiB |\n|---|---|---|---|---|", flush=True)
    for label, steps, measure in rows:
        if only is not None and label not in only:
            continue
        try:
            seconds, peak = measure(steps)
            peak_text = f"{peak:.2f}" if peak is not None else "-"
            print(f"| {label} | {steps} | {seconds:.3f} | {steps / seconds:.1f} | {peak_text} |", flush=True)
        except Exception as error:  # noqa: BLE001 - a bench row reports any failure and the table goes on
            print(f"| {label} | {steps} | failed: {str(error).splitlines()[0][:160] if str(error) else error!r} "
                  "| | |", flush=True)
        release()


def rows_for(folder: Path, size: int, steps: int, offload_steps: int, repeats: int, sdrun_rows, diffusers_rows,
             candidates: bool) -> list:
    images = repeats + 1
    rows = [(f"diffusers {label}", steps if not slow else offload_steps,
             lambda n, prepare=prepare: diffusers_row(folder, prepare, size, n, repeats))
            for label, prepare, slow in diffusers_rows]
    rows += [(f"sdrun {' '.join(flags) or '(no flags)'}", steps if not slow else offload_steps,
              lambda n, flags=flags: sdrun_cli(folder, flags, size, n, images))
             for flags, slow in sdrun_rows]
    if candidates:
        rows += [(f"group offload: {name}", offload_steps,
                  lambda n, settings=settings: diffusers_row(folder, streamed(settings), size, n, repeats))
                 for name, settings in offload.CANDIDATES.items()]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    half = parser.add_mutually_exclusive_group()
    half.add_argument("--sd15-only", action="store_true")
    half.add_argument("--sdxl-only", action="store_true")
    parser.add_argument("--quick", action="store_true", help="5 steps (offload rows 3), one timed image")
    parser.add_argument("--family", default="sd1", help="the SD 1.5 table's architecture (tiny: plumbing)")
    parser.add_argument("--xl-family", default="sdxl", help="the SDXL table's architecture (tiny: plumbing)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--xl-size", type=int, default=1024)
    parser.add_argument("--offload-steps", type=int, default=10, help="steps of the offload rows")
    parser.add_argument("--only", help="comma-separated row labels to run, as the tables print them (e.g. "
                        "'diffusers float16,sdrun --fp16,sdrun --fp16 --fp8'); 'quality' for the fp8 error lines")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    repeats = 1 if args.quick else 2
    sd_steps, xl_steps, offload_steps = (5, 5, 3) if args.quick else (50, 30, args.offload_steps)
    device_name = torch.cuda.get_device_name() if CUDA else "CPU"
    print(f"# sdrun memory benchmark, {datetime.date.today()}, {device_name}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, diffusers {diffusers.__version__}; random weights, DDIM, guidance 7.5, "
          f"batch 1, best of {repeats} after a warm-up; sdrun through its CLI (--json), diffusers in-process")
    fp16 = ["--fp16"] if CUDA else []
    if not args.sdxl_only:
        folder = model_folder(args.family)
        size = args.size
        # --max-vram 1.6: partial residency (fp8, then part of the UNet streamed), between fitting and offloading
        sdrun_rows = [(fp16, False), (fp16 + ["--fp8"], False), (fp16 + ["--max-vram", "1.6"], False),
                      (fp16 + ["--model-offload"], False), (fp16 + ["--cpu-offload"], True)]
        diffusers_rows = [(COMPUTE, resident, False), ("layerwise fp8", layerwise_fp8, False),
                          ("model offload", model_offload, False), ("sequential offload", sequential_offload, True)]
        if not CUDA:  # sdrun's offloads and --max-vram need a GPU: the plumbing runs the rest (and the candidates'
            # hooks, without streams)
            sdrun_rows, diffusers_rows = sdrun_rows[:2], diffusers_rows[:2]
        table(f"{args.family} {size}x{size}",
              rows_for(folder, size, sd_steps, offload_steps, repeats, sdrun_rows, diffusers_rows, True), only)
        if only is None or "quality" in only:
            quality(folder, size, sd_steps)
    if not args.sd15_only:
        folder = model_folder(args.xl_family)
        size = args.xl_size
        # issue 10's --fp8 <= 6 GiB: SDXL's decode at 1024 holds ~2.4 GiB untiled in bf16 (the default), 4.8 in
        # float32 (--vae-fp32), 1.8 in bf16 with --channels-last
        sdrun_rows = [(fp16, False), (fp16 + ["--vae-fp32"], False), (fp16 + ["--fp8"], False),
                      (fp16 + ["--fp8", "--channels-last"], False), (fp16 + ["--fp8", "--vae-tiling"], False)]
        if CUDA:
            sdrun_rows += [(fp16 + ["--max-vram", str(budget)], False) for budget in (8, 6, 4)]  # 4: partial
        diffusers_rows = [(COMPUTE, resident, False), ("layerwise fp8", layerwise_fp8, False)]
        table(f"{args.xl_family} {size}x{size}",
              rows_for(folder, size, xl_steps, offload_steps, repeats, sdrun_rows, diffusers_rows, False), only)
        if only is None or "quality" in only:
            quality(folder, size, xl_steps)


def model_folder(family: str) -> Path:
    folder = Path(f"/tmp/sdrun-bench-{family}")
    if not (folder / "model_index.json").is_file():
        build(family, folder)
        release()
    return folder


def quality(folder: Path, size: int, steps: int) -> None:
    try:
        errors = latents_errors(folder, size, steps)
        print(f"\nfp8 quality, final latents' relative error against {COMPUTE} (same "
              f"seed, {steps} steps): " + ", ".join(f"{name} {value:.4f}" for name, value in errors.items()),
              flush=True)
    except Exception as error:  # noqa: BLE001 - reported, the benchmark goes on
        print(f"\nfp8 quality: failed: {str(error).splitlines()[0][:160]}", flush=True)
    release()


if __name__ == "__main__":
    main()
