"""The main path: load the model once with its backends, denoise a batch of seeds, decode, and check the result.

    engine = load(run, reporter)                          # resolve device, check flags, load, apply backends
    latents = denoise(engine, job, seeds, on_step)        # text -> latents, one CPU generator per seed
    images, notes = decode(engine, latents)               # latents -> PIL images, NaN-safe
Saving and batch bookkeeping live in batch.py; this file knows nothing about files or prompt lists.
"""

import time
from dataclasses import dataclass, field

import torch
from diffusers.utils.torch_utils import get_module_execution_device

from sdrun import backends, models
from sdrun.config import RunConfig
from sdrun.errors import SdrunError, UsageError
from sdrun.schedulers import make_scheduler, name_of


@dataclass
class Engine:
    """A loaded pipeline with its backends applied, plus what metadata needs to describe it."""

    pipe: object
    device: torch.device
    flags: tuple[str, ...]  # backend names in effect, in application order
    model: str  # as given to --model
    model_name: str  # short name for the A1111 `Model:` field
    family: str
    config_dir: str | None
    base_scheduler: object = field(repr=False, default=None)

    @property
    def native_size(self) -> tuple[int, int]:
        side = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return side, side


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA GPU: use --device cpu (or auto)")
    return torch.device(name)


def plan(run: RunConfig):
    """Everything that can be checked before loading: the model source, the device, the backends."""
    source = models.resolve_model(run.model, run.config_dir)
    device = resolve_device(run.device)
    chosen = backends.select(run.flags)
    backends.check(chosen, device)
    return source, device, chosen


def load(run: RunConfig, reporter, planned=None) -> Engine:
    """Load the model with its backends applied; `planned` is plan(run)'s result when the caller has it already."""
    source, device, chosen = planned or plan(run)
    for backend in chosen:
        backend.prepare(device)
    with reporter.status(f"Loading {run.model}"):
        pipe = models.load_pipeline(source, torch_dtype=backends.load_dtype(chosen), note=reporter.note)
        for backend in chosen:
            note = backend.apply(pipe, device)
            if note:
                reporter.note(note)
        if not any(backend.places_pipeline for backend in chosen):
            pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    name = source.path.name if source.path is not None else run.model
    return Engine(pipe, device, tuple(b.name for b in chosen), run.model, name, pipe.sdrun_family,
                  run.config_dir, base_scheduler=pipe.scheduler)


def scheduler_name(engine: Engine, requested: str | None) -> str:
    return requested or name_of(engine.base_scheduler)


def denoise(engine: Engine, job, seeds: list[int], on_step=None) -> torch.Tensor:
    """Run the text encoder and the denoising loop for one image per seed; return the final latents.

    Each image gets its own CPU generator, so image k is the same whether it is made alone or in a batch, and
    the same on any GPU (the starting noise is drawn on the CPU).
    """
    pipe = engine.pipe
    pipe.scheduler = make_scheduler(job.scheduler, engine.base_scheduler.config) if job.scheduler else engine.base_scheduler
    width, height = size_of(engine, job)

    def step_end(_pipe, step, _timestep, kwargs):
        if on_step is not None:
            on_step(step + 1)
        return kwargs

    return pipe(
        prompt=job.prompt,
        negative_prompt=job.negative_prompt or None,
        num_inference_steps=job.steps,
        guidance_scale=job.guidance,
        width=width,
        height=height,
        num_images_per_prompt=len(seeds),
        generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
        output_type="latent",
        callback_on_step_end=step_end,
    ).images


def size_of(engine: Engine, job) -> tuple[int, int]:
    native_w, native_h = engine.native_size
    return job.width or native_w, job.height or native_h


@dataclass
class DecodeNotes:
    """How a decode went, for the image metadata."""

    vae_fp32: bool = False  # decoded in float32 although the model is fp16 (SDXL's VAE, or a NaN retry)
    nan_retry: bool = False  # the first decode gave NaN or a black image and was redone in float32
    tiled_retry: bool = False  # the first decode ran out of memory and was redone with VAE tiling


class DecodeFailed(SdrunError):
    """The VAE gave NaN even in float32."""


def decode(engine: Engine, latents: torch.Tensor, notes: DecodeNotes | None = None):
    """Latents -> PIL images. NaN or all-black output (the SDXL fp16 VAE overflow) is decoded again in fp32."""
    notes = notes or DecodeNotes()
    if not torch.isfinite(latents).all():
        raise DecodeFailed("the denoiser produced NaN/inf latents (often fp16 overflow): run again without --fp16")
    vae = engine.pipe.vae
    # SDXL's VAE overflows in fp16 (its config says force_upcast); SD 1.x/2.x VAEs carry the same flag by default
    # but decode fine in fp16, and diffusers' own SD pipeline ignores it there: upcasting them cost 0.75 GiB of
    # peak memory at 512x512 and 2.5 GiB at 1024x1024 on an H200 (bench/flags.py). A NaN still triggers fp32 below.
    fp32 = vae.dtype == torch.float16 and engine.family == "sdxl" and bool(getattr(vae.config, "force_upcast", False))
    image = _vae_decode(vae, latents, fp32)
    if not torch.isfinite(image).all() or bool((image <= -1).all()):
        notes.nan_retry = True
        fp32 = True
        image = _vae_decode(vae, latents, fp32)
        if not torch.isfinite(image).all():
            raise DecodeFailed("the VAE produced NaN even in float32: the model's VAE weights are likely broken")
    notes.vae_fp32 = fp32 and vae.dtype != torch.float32
    return engine.pipe.image_processor.postprocess(image.float(), output_type="pil"), notes


def _vae_decode(vae, latents: torch.Tensor, fp32: bool) -> torch.Tensor:
    """Undo the latent scaling and decode, temporarily in float32 if asked."""
    dtype = vae.dtype
    if fp32:
        vae.to(dtype=torch.float32)
    try:
        config = vae.config
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            scaled = latents * std / config.scaling_factor + mean
        else:
            scaled = latents / config.scaling_factor
        scaled = scaled.to(get_module_execution_device(vae), torch.float32 if fp32 else dtype)
        with torch.no_grad():
            return vae.decode(scaled, return_dict=False)[0]
    finally:
        if fp32:
            vae.to(dtype=dtype)


def decode_tiled(engine: Engine, latents: torch.Tensor, notes: DecodeNotes):
    """Decode again with VAE tiling switched on for this call only (the out-of-memory retry)."""
    vae = engine.pipe.vae
    was_tiled = vae.use_tiling
    vae.enable_tiling()
    notes.tiled_retry = True
    try:
        return decode(engine, latents, notes)
    finally:
        if not was_tiled:
            vae.disable_tiling()


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *_):
        self.seconds = time.perf_counter() - self.start
