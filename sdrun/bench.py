"""`sdrun bench`: what each memory/speed flag buys on this machine, beside plain diffusers on the same model.

Every row loads the model (sdrun's loader for both sides, so the weights are the same), makes one warm-up image,
then the best of `repeats` timed images (text encoder, denoising, VAE decode to a PIL image) and the peak of
torch.cuda.max_memory_allocated over them. The plain-diffusers row calls the pipeline's own `__call__` with its
defaults (PyTorch SDPA attention); sdrun rows go through the render plan and stages, as `sdrun PROMPT` does.
A flag combination that cannot run here is listed with the reason instead of a number.
"""

import gc
import time

import torch

from sdrun import backends, model_source, models, pipeline
from sdrun.config import Job, RunConfig
from sdrun.console import Reporter
from sdrun.render.stages import render

PROMPT = "an astronaut riding a horse on mars, detailed"
GPU_ROWS = ((), ("fp16",), ("fp16", "xformers"), ("fp16", "channels_last"), ("fp16", "fp8"), ("fp16", "vae_tiling"),
            ("fp16", "vae_fp32"), ("fp16", "model_offload"), ("fp16", "cpu_offload"))
CPU_ROWS = ((), ("channels_last",), ("vae_tiling",))


def rows(model: str, device: torch.device, size: int | None, steps: int, repeats: int, combos=None):
    """Yield (label, seconds per image or None, peak GiB or None, note) for plain diffusers and each combination."""
    combos = combos or (GPU_ROWS if device.type == "cuda" else CPU_ROWS)
    job = Job(prompt=PROMPT, steps=steps, width=size, height=size, seed=0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    yield ("diffusers " + ("fp16" if dtype == torch.float16 else "fp32"), *_plain(model, device, job, dtype, repeats))
    for flags in combos:
        label = "sdrun " + (" ".join(backends.BY_NAME[f].flag for f in flags) or "(no flags)")
        reasons = [r for f in flags for r in backends.BY_NAME[f].unavailable_reasons(device)]
        if reasons:
            yield label, None, None, "unavailable: " + "; ".join(reasons)
            continue
        yield (label, *_sdrun(model, device, job, flags, repeats))


def _plain(model: str, device: torch.device, job: Job, dtype: torch.dtype, repeats: int):
    pipe = models.load_pipeline(model_source.resolve_model(model), torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    size = {"width": job.width, "height": job.height} if job.width else {}

    def make():
        pipe(job.prompt, num_inference_steps=job.steps, generator=torch.Generator("cpu").manual_seed(0), **size)

    try:
        return _measure(make, device, repeats)
    finally:
        del pipe
        _release(device)


def _sdrun(model: str, device: torch.device, job: Job, flags: tuple, repeats: int):
    planned = pipeline.plan_run(RunConfig(model=model, device=device.type, flags=flags, quiet=True), [job])
    engine = pipeline.load(planned.run, Reporter(quiet=True), planned.setup)
    planned.refit(engine)
    try:
        return _measure(lambda: render(engine, planned[job], job, [0]), device, repeats)
    finally:
        del engine
        _release(device)


def _measure(make, device: torch.device, repeats: int):
    make()  # warm-up: cuDNN autotuning, allocator growth, kernel loading
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        make()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return best, peak, ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def report(model: str, device_name: str, size: int | None, steps: int, repeats: int, echo) -> None:
    """Print the table, one row as soon as it is measured."""
    device = pipeline.resolve_device(device_name)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    echo(f"sdrun bench: {model} on {where}, {steps} steps, {size or 'native'} px, best of {repeats}")
    echo(f"{'configuration':<44} {'s/image':>9} {'peak GiB':>9}")
    for label, seconds, peak, note in rows(model, device, size, steps, repeats):
        if seconds is None:
            echo(f"{label:<44} {note}")
        else:
            echo(f"{label:<44} {seconds:>9.3f} {'-' if peak is None else f'{peak:.2f}':>9}")
