"""End-to-end speed and memory of every sdrun memory flag, beside plain diffusers, in one run on one GPU.

The model is the full-size Stable Diffusion 1.5 architecture (configs/sd1) with seeded random weights: speed and
memory do not depend on weight values (no weights can be downloaded here). Weight matrices are scaled by 0.5 so
fp16 activations stay finite. The pipeline is saved once as a diffusers folder, and both sides load that folder:
sdrun through its real loader and backends, diffusers through from_pretrained with its defaults (SDPA attention).

Each row: load, one warm-up image, then the best of --repeats timed images (text encoder + denoising + VAE decode
to a PIL image), and the peak of torch.cuda.max_memory_allocated over the timed images.

    python bench/flags.py                      # 512x512, 50 steps, every flag and the useful combinations
    python bench/flags.py --quick              # 10 steps, to check the script itself
    python bench/flags.py --family tiny --size 64 --quick --skip-1024   # the script's plumbing, on any machine
"""

import argparse
import datetime
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from sdrun import models, pipeline  # noqa: E402
from sdrun.config import Job, RunConfig  # noqa: E402
from sdrun.console import Reporter  # noqa: E402
from sdrun.render.stages import render  # noqa: E402

PROMPT = "an astronaut riding a horse on mars, detailed, 8k"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (label, sdrun flags) at the default size; None = plain diffusers.
ROWS_512 = [
    ("diffusers fp32 (SDPA)", None, torch.float32),
    ("diffusers fp16 (SDPA)", None, torch.float16),
    ("sdrun (no flags, fp32)", (), None),
    ("sdrun --fp16", ("fp16",), None),
    ("sdrun --fp16 --xformers", ("fp16", "xformers"), None),
    ("sdrun --fp16 --channels-last", ("fp16", "channels_last"), None),
    ("sdrun --fp16 --vae-slicing", ("fp16", "vae_slicing"), None),
    ("sdrun --fp16 --vae-tiling", ("fp16", "vae_tiling"), None),
    ("sdrun --fp16 --model-offload", ("fp16", "model_offload"), None),
    ("sdrun --fp16 --cpu-offload", ("fp16", "cpu_offload"), None),
    ("sdrun --fp16 --xformers --vae-tiling --model-offload", ("fp16", "xformers", "vae_tiling", "model_offload"), None),
]
ROWS_1024 = [
    ("diffusers fp16 (SDPA)", None, torch.float16),
    ("sdrun --fp16", ("fp16",), None),
    ("sdrun --fp16 --xformers", ("fp16", "xformers"), None),
]


def build(family: str, folder: Path) -> None:
    """Save a pipeline of configs/<family>'s architecture (SD 1.x/2.x, SDXL) with seeded random weights as a
    diffusers folder."""
    torch.manual_seed(0)
    config = models.CONFIGS / family
    sdxl = (config / "text_encoder_2").is_dir()
    with torch.device(DEVICE):  # initialising 1-3 B parameters is seconds on the GPU, minutes on a CPU
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder"))
        text_encoder_2 = (CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config / "text_encoder_2"))
                          if sdxl else None)
    with torch.no_grad():
        for module in (unet, vae, text_encoder, text_encoder_2):
            for parameter in module.parameters() if module is not None else ():
                if parameter.dim() >= 2:
                    parameter.mul_(0.5)
    scheduler = DDIMScheduler.from_pretrained(config, subfolder="scheduler")
    if sdxl:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=models.tokenizer(), tokenizer_2=models.tokenizer("!"), unet=unet,
                                         scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=models.tokenizer(), unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.to(torch.float16 if DEVICE == "cuda" else torch.float32).save_pretrained(folder)


def timed(make_image, repeats: int) -> tuple[float, float, float]:
    """(best seconds of `repeats` images, the first image's excess over it, peak GiB over the timed images). The
    first image is the warm-up: cuDNN autotuning, allocator growth, kernel loading (and compiling, if any)."""
    start = time.perf_counter()
    make_image()
    sync()
    first = time.perf_counter() - start
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        make_image()
        sync()
        best = min(best, time.perf_counter() - start)
    return best, first - best, (torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan"))


def measure(make_image, repeats: int) -> tuple[float, float]:
    """(best seconds, peak GiB): `timed` without the warm-up's excess."""
    best, _first, peak = timed(make_image, repeats)
    return best, peak


def release() -> None:
    """Give back what the last row held, before the next row measures its peak."""
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def diffusers_row(folder: Path, dtype, size: int, steps: int, repeats: int):
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype).to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu")

    def make():
        pipe(PROMPT, num_inference_steps=steps, width=size, height=size, generator=generator.manual_seed(0))

    return measure(make, repeats)


def sdrun_row(folder: Path, flags, size: int, steps: int, repeats: int):
    run = RunConfig(model=str(folder), flags=flags)
    job = Job(prompt=PROMPT, steps=steps, width=size, height=size, seed=0)
    planned = pipeline.plan_run(run, [job])
    engine = pipeline.load(planned.run, Reporter(quiet=True), planned.setup)
    planned.refit(engine)

    def make():
        render(engine, planned[job], job, [0])

    return measure(make, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="10 steps, 1 repeat")
    parser.add_argument("--family", default="sd1", help="architecture from configs/ (sd1; tiny for a smoke test)")
    parser.add_argument("--folder", type=Path, help="where the random-weight model is saved [/tmp/sdrun-bench-FAMILY]")
    parser.add_argument("--size", type=int, default=512, help="the first table's image size")
    parser.add_argument("--skip-1024", action="store_true", help="leave out the 1024x1024 rows")
    parser.add_argument("--only", help="keep sdrun rows whose flags include this one, plus --fp16 and the peers")
    args = parser.parse_args()
    steps, repeats = (10, 1) if args.quick else (args.steps, args.repeats)
    folder = args.folder or Path(f"/tmp/sdrun-bench-{args.family}")
    if not (folder / "model_index.json").is_file():
        build(args.family, folder)
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"
    print(f"# sdrun flags benchmark, {datetime.date.today()}, {device_name}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, diffusers {diffusers.__version__}; {args.family} architecture, random weights, "
          f"DDIM, guidance 7.5, {steps} steps, batch 1, best of {repeats}")
    print("| size | configuration | s / image | it/s | peak GiB |")
    print("|---|---|---|---|---|")
    plan = [(args.size, row) for row in ROWS_512] + ([] if args.skip_1024 else [(1024, row) for row in ROWS_1024])
    for size, (label, flags, dtype) in plan:
        if args.only and flags not in (None, ("fp16",)) and args.only not in flags:
            continue
        if args.only and flags is None and dtype == torch.float32:
            continue
        try:
            if flags is None:
                seconds, peak = diffusers_row(folder, dtype, size, steps, repeats)
            else:
                seconds, peak = sdrun_row(folder, flags, size, steps, repeats)
            print(f"| {size}x{size} | {label} | {seconds:.3f} | {steps / seconds:.1f} | {peak:.2f} |", flush=True)
        except Exception as error:  # a row that cannot run here says why; the table goes on
            print(f"| {size}x{size} | {label} | failed: {str(error).splitlines()[0][:120]} | | |", flush=True)
        release()


if __name__ == "__main__":
    main()
