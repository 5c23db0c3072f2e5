"""What one image request asks for (`Job`), what the whole run shares (`RunConfig`), and their validation.

A run loads one model with one set of memory flags; a prompt file gives it many jobs, each of which may override
the per-image settings below. Validation happens before any model is loaded, so bad input costs nothing.
"""

import random
from dataclasses import dataclass, field, fields, replace

from sdrun.errors import UsageError
from sdrun.output import check_metadata_text
from sdrun.schedulers import SAMPLERS

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_OUTPUT = "outputs/{seed}-{prompt}.png"
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Job:
    """One prompt and how to render it. None means "the model's default" (size, scheduler) or "random" (seed)."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 30
    guidance: float = 7.5  # classifier-free guidance scale; each step costs two UNet passes when > 1
    width: int | None = None  # None: the model's native size (512 for SD 1.x, 1024 for SDXL, 64 for tiny)
    height: int | None = None
    scheduler: str | None = None  # a key of schedulers.SAMPLERS; None keeps the model's own scheduler
    seed: int | None = None  # image k of this job gets seed + k; None draws one at random (and records it)
    num_images: int = 1
    output: str | None = None  # a file, a folder, or a template with {seed} {index} {prompt}; None: the run's -o


# The keys a .jsonl prompt file may set per line, with the type each must have.
OVERRIDABLE = {f.name: f.type for f in fields(Job)}


@dataclass(frozen=True)
class RunConfig:
    """Settings shared by every job of a run: the model is loaded once with these."""

    model: str = DEFAULT_MODEL
    config_dir: str | None = None  # a diffusers config folder for a single-file checkpoint (overrides detection)
    device: str = "auto"  # auto | cuda | cpu
    flags: tuple[str, ...] = ()  # backend names the user asked for (--vae-tiling → "vae_tiling")
    output: str = DEFAULT_OUTPUT
    batch_size: int = 1  # images per denoiser pass
    overwrite: bool = False
    skip_existing: bool = False
    fail_fast: bool = False
    quiet: bool = False
    json_lines: bool = False
    allow_outside_output: bool = False  # a prompt file's per-line output may leave the -o folder
    extra: dict = field(default_factory=dict)  # recorded into metadata as is (e.g. what replay changed)


def validate(job: Job) -> None:
    """Raise UsageError naming the first bad value of `job` and the fix."""
    if not job.prompt or not job.prompt.strip():
        raise UsageError("the prompt is empty: give the text to draw, e.g. sdrun \"a red fox in snow\"")
    check_metadata_text("prompt", job.prompt)
    check_metadata_text("negative prompt", job.negative_prompt or "")
    for name in ("width", "height"):
        value = getattr(job, name)
        if value is not None and (value <= 0 or value % 8):
            raise UsageError(f"{name} {value} is not a positive multiple of 8: use e.g. 512, 768 or 1024")
    if job.steps <= 0:
        raise UsageError(f"steps must be at least 1, got {job.steps}")
    if job.guidance < 0:
        raise UsageError(f"guidance must be 0 or more, got {job.guidance} (7.5 is usual; 1 or less turns it off)")
    if job.scheduler is not None and job.scheduler not in SAMPLERS:
        raise UsageError(f"unknown scheduler {job.scheduler!r}: choose one of {', '.join(SAMPLERS)}")
    if job.num_images <= 0:
        raise UsageError(f"num_images must be at least 1, got {job.num_images}")
    if job.seed is not None and not 0 <= job.seed <= MAX_SEED - (job.num_images - 1):
        raise UsageError(f"seed {job.seed} is out of range for {job.num_images} image(s) (seeds count up from it): "
                         f"use 0 to {MAX_SEED - (job.num_images - 1)}")


def with_seed(job: Job) -> Job:
    """The job with a concrete seed: the given one, or a fresh random one that the metadata will record."""
    if job.seed is not None:
        return job
    return replace(job, seed=random.SystemRandom().randrange(MAX_SEED - 1024))
