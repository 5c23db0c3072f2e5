"""What one image request asks for (`Job`), what the whole run shares (`RunConfig`), and the one table of job fields.

`FIELDS` is the only place that knows the per-image settings: the click options of `sdrun run`, the keys a
`.jsonl` prompt-file line may set, `sdrun replay --set KEY=VALUE` and the `sdrun` metadata chunk all read it.
A field parses a value from text (command line, `--set`) or from JSON (prompt files, metadata), and checks it;
every refusal is one UsageError naming the field, the bad value and the fix, before any model is loaded.

This module imports no torch: `sdrun --help` and usage errors answer before the heavy libraries load.
"""

import math
import random
import re
from dataclasses import dataclass, field, make_dataclass, replace
from typing import Any, Callable

from sdrun.adapters import Adapters
from sdrun.errors import UsageError
from sdrun.output import check_metadata_text
from sdrun.schedulers import SAMPLERS

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_OUTPUT = "outputs/{seed}-{prompt}.png"
MAX_SEED = 2**32 - 1
MAX_SIDE = 16384  # pixels per side; 16384x16384 is 4x what any SD model has been used at, and far past 8K
MAX_STEPS = 1000  # the schedulers' training timesteps (num_train_timesteps) of every SD 1.x/2.x/SDXL model
# characters of a prompt: the text encoder reads its first 77 tokens (about 300 characters); a longer text is a
# mistake (a whole file on one line), and would be tokenised and stored in every image's metadata
MAX_PROMPT = 10_000
MAX_IMAGES = 100_000  # per run: more is a typo or a week of GPU time, and planning them would take minutes


@dataclass(frozen=True)
class Field:
    """One per-image setting: its name, how text and JSON values become a value, and its check."""

    name: str
    kind: str  # "text" | "int" | "float" | "size" | "path" | "choice"
    default: Any
    help: str
    options: tuple[str, ...] = ()  # click option names; () = the prompt argument, not an option
    optional: bool = False  # None is allowed (means: the model's default, or random for the seed)
    check: Callable[[Any], str | None] = lambda _value: None  # the problem with a parsed value, or None
    fix: str = ""  # appended to a refusal: what to write instead

    def parse_text(self, text: str):
        """A value from the command line or `--set KEY=VALUE`."""
        if self.optional and text.strip().lower() in ("", "none", "null"):
            return None
        if self.kind == "int":
            value = _number(self, text, int)
        elif self.kind == "float":
            value = _number(self, text, float)
        elif self.kind == "size":
            value = _size(self, text)
        else:
            value = text
        return self.checked(value)

    def parse_json(self, value):
        """A value from a prompt-file line or metadata: JSON types, with unambiguous forms accepted (64.0 for 64)."""
        if value is None and self.optional:
            return None
        if self.kind in ("int", "float"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.refuse(value, "a number")
            if self.kind == "int":
                if not (isinstance(value, int) or (math.isfinite(value) and value == int(value))):
                    raise self.refuse(value, "a whole number")
                value = int(value)
            else:
                value = float(value)
        elif self.kind == "size":
            if not isinstance(value, str):
                raise self.refuse(value, 'a size written as "WIDTHxHEIGHT"')
            value = _size(self, value)
        elif not isinstance(value, str):
            raise self.refuse(value, "a string")
        return self.checked(value)

    def checked(self, value):
        if self.kind == "float" and not math.isfinite(value):
            raise UsageError(f"{self.name} {value} is not a finite number: give a plain number{self._fix()}")
        problem = self.check(value)
        if problem:
            shown = f"{value[0]}x{value[1]}" if self.kind == "size" else short_repr(value)
            raise UsageError(f"{self.name} {shown} {problem}{self._fix()}")
        return value

    def refuse(self, value, expected: str) -> UsageError:
        return UsageError(f"{self.name!r} must be {expected}, got {short_repr(value)}{self._fix()}")

    def _fix(self) -> str:
        return f": {self.fix}" if self.fix else ""

    @property
    def option_name(self) -> str:
        return self.options[-1] if self.options else self.name


def _number(field_: Field, text: str, kind: type):
    try:
        return kind(text.strip())
    except ValueError:
        raise field_.refuse(text, "a whole number" if kind is int else "a number") from None


SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX×]\s*(\d{1,6})\s*$")


def _size(field_: Field, text: str) -> tuple[int, int]:
    match = SIZE.match(text)
    if not match:
        raise field_.refuse(text, 'a size written as WIDTHxHEIGHT, e.g. 3840x2160')
    return int(match.group(1)), int(match.group(2))


def short_repr(value) -> str:
    """repr(value), cut to 40 characters for a message."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _side(value: int) -> str | None:
    if not 8 <= value <= MAX_SIDE or value % 8:
        return f"is not a multiple of 8 from 8 to {MAX_SIDE}"
    return None


def _sides(value: tuple[int, int]) -> str | None:
    return next((problem for problem in map(_side, value) if problem), None)


def _fraction(value: float) -> str | None:
    return None if 0 <= value <= 1 else "is outside 0..1"


def _at_least(low: int, high: int | None = None) -> Callable[[int], str | None]:
    def check(value: int) -> str | None:
        if value < low or (high is not None and value > high):
            return f"is outside {low}..{high}" if high is not None else f"is below {low}"
        return None

    return check


def _prompt_text(value: str) -> str | None:
    if len(value) > MAX_PROMPT:
        return f"is {len(value)} characters long, more than {MAX_PROMPT} (the model reads about the first 300)"
    return None


def _nonempty(value: str) -> str | None:
    return "is empty" if not value.strip() else _prompt_text(value)


def _scheduler(value: str) -> str | None:
    return None if value in SAMPLERS else "is not a known scheduler"


FIELDS: tuple[Field, ...] = (
    Field("prompt", "text", "", "What to draw.", check=_nonempty, fix='give the text to draw, e.g. sdrun "a red fox"'),
    Field("negative_prompt", "text", "", "What to steer away from.", ("--negative-prompt",), check=_prompt_text,
          fix="shorten it"),
    Field("steps", "int", 30, "Denoising steps.", ("--steps",), check=_at_least(1, MAX_STEPS),
          fix=f"use 1 to {MAX_STEPS} (20-50 is usual)"),
    Field("guidance", "float", 7.5, "Classifier-free guidance scale (1 or less turns it off).", ("--guidance",),
          check=lambda v: "is below 0" if v < 0 else None, fix="7.5 is usual"),
    Field("width", "int", None, "Image width, a multiple of 8  [default: the model's, e.g. 512].", ("-W", "--width"),
          optional=True, check=_side, fix="use e.g. 512, 768 or 1024"),
    Field("height", "int", None, "Image height, a multiple of 8  [default: the model's].", ("-H", "--height"),
          optional=True, check=_side, fix="use e.g. 512, 768 or 1024"),
    Field("scheduler", "choice", None, "Sampler: " + ", ".join(SAMPLERS) + " [default: the model's own].",
          ("--scheduler",), optional=True, check=_scheduler, fix="choose one of " + ", ".join(SAMPLERS)),
    Field("seed", "int", None, "Seed of the first image; image k gets seed+k. Random (and recorded) if omitted.",
          ("--seed",), optional=True, check=_at_least(0, MAX_SEED), fix=f"use 0 to {MAX_SEED}"),
    Field("num_images", "int", 1, "Images per prompt.", ("-n", "--num-images"), check=_at_least(1, MAX_IMAGES),
          fix="split a bigger batch into several runs"),
    Field("output", "path", None, "A .png file, a folder (ending in /), or a template with {seed} {index} {prompt}.",
          optional=True),  # the run-wide -o is a RunConfig option; prompt-file lines may override it per item
    Field("init_image", "path", None, "Start from this image (img2img); --strength says how much to change it.",
          ("--init-image",), optional=True),
    Field("strength", "float", 0.75, "img2img: 0 keeps the init image, 1 ignores it (text-to-image).",
          ("--strength",), check=_fraction, fix="use 0 to 1 (0.5-0.8 is usual)"),
    Field("hires", "size", None, "Make the image at the model's size, then refine it at WxH in tiles "
          "(e.g. 3840x2160: a coherent 4K image in one command).", ("--hires",), optional=True, check=_sides,
          fix="give WIDTHxHEIGHT in multiples of 8, e.g. 3840x2160"),
    Field("hires_strength", "float", 0.35, "--hires: how much the refining pass changes the upscaled image.",
          ("--hires-strength",), check=_fraction, fix="use 0 to 1 (0.3-0.5 is usual)"),
    Field("hires_steps", "int", None, "--hires: steps of the refining pass, before --hires-strength scales them "
          "[default: --steps].", ("--hires-steps",), optional=True, check=_at_least(1, MAX_STEPS),
          fix=f"use 1 to {MAX_STEPS}"),
)
BY_NAME = {f.name: f for f in FIELDS}

Job = make_dataclass(
    "Job",
    [(f.name, Any, field(default=f.default)) for f in FIELDS],
    frozen=True,
    namespace={"__doc__": "One prompt and how to render it: one attribute per entry of FIELDS (None: the model's "
                          "default, or a random seed)."},
)

# A prompt-file line may set every field; `sdrun replay --set` may change all but the output (replay takes it from
# -o) and the image count (replay makes one image).
REPLAY_KEYS = tuple(f.name for f in FIELDS if f.name not in ("output", "num_images"))


def job_from_mapping(data: dict, defaults) -> "Job":
    """A Job from a prompt-file line or metadata: every key must be a field; values are checked."""
    unknown = sorted(set(data) - set(BY_NAME))
    if unknown:
        raise UsageError(f"unknown key {unknown[0]!r}: allowed keys are {', '.join(BY_NAME)}")
    return replace(defaults, **{key: BY_NAME[key].parse_json(value) for key, value in data.items()})


def job_record(job) -> dict:
    """The job's fields as JSON values, for the metadata chunk (sizes as "WxH")."""
    record = {}
    for f in FIELDS:
        value = getattr(job, f.name)
        record[f.name] = f"{value[0]}x{value[1]}" if f.kind == "size" and value is not None else value
    return record


def validate(job) -> None:
    """Raise UsageError naming the first bad value of `job` and the fix (the checks across fields)."""
    for f in FIELDS:
        value = getattr(job, f.name)
        if value is not None or not f.optional:
            f.checked(value)
        if f.kind == "text":
            check_metadata_text(f.name.replace("_", " "), value)
    if job.seed is not None and job.seed > MAX_SEED - (job.num_images - 1):
        raise UsageError(f"seed {job.seed} is out of range for {job.num_images} image(s) (seeds count up from it): "
                         f"use 0 to {MAX_SEED - (job.num_images - 1)}")
    if job.hires is not None and job.init_image is not None:
        raise UsageError("--hires and --init-image cannot be combined yet: refine an existing image with "
                         "--init-image and -W/-H at the target size instead")


def with_seed(job) -> "Job":
    """The job with a concrete seed: the given one, or a fresh random one that the metadata will record."""
    if job.seed is not None:
        return job
    return replace(job, seed=random.SystemRandom().randrange(MAX_SEED - MAX_IMAGES))


@dataclass(frozen=True)
class RunConfig:
    """Settings shared by every job of a run: the model is loaded once with these."""

    model: str = DEFAULT_MODEL
    config_dir: str | None = None  # a diffusers config folder for a single-file checkpoint (overrides detection)
    vae: str | None = None  # --vae: a separate VAE file or folder in place of the model's
    device: str = "auto"  # auto | cuda | cpu
    flags: tuple[str, ...] = ()  # backend names the user asked for (--vae-tiling -> "vae_tiling")
    backend_options: dict = field(default_factory=dict)  # option name -> value, for the backends' own options
    max_vram: float | None = None  # GiB: the allocator's limit, and what the planner must fit
    cuda_graphs: bool = True  # replay the denoise from CUDA graphs where they are safe (render/graphs.py)
    output: str = DEFAULT_OUTPUT
    batch_size: int = 1  # images per denoiser pass
    overwrite: bool = False
    skip_existing: bool = False
    fail_fast: bool = False
    quiet: bool = False
    json_lines: bool = False
    allow_outside_output: bool = False  # a prompt file's per-line output may leave the -o folder
    extra: dict = field(default_factory=dict)  # recorded into metadata as is (e.g. what replay changed)
    adapters: Adapters = Adapters()  # LoRAs and embeddings (adapters.py); plan_run settles the run's whole set

