"""What an image's `sdrun` metadata records, checked like any other input before `sdrun replay` or `sdrun decode`
uses it.

Metadata comes from files anyone may have edited or damaged, so every key these commands use is checked: the
job's keys through the field table (config.FIELDS), the run's keys (model, flags, backend options, ...) here.
A bad one is one UsageError naming the file, the key and the fix. Keys these commands do not use are ignored.
"""

import math
from dataclasses import dataclass, replace
from pathlib import Path

from sdrun import backends
from sdrun.config import BY_NAME, REPLAY_KEYS, Job, job_from_mapping, short_repr, validate
from sdrun.errors import UsageError
from sdrun.output import METADATA_DAMAGED

# Keys that decide the image, which sdrun always records: without one, a default would silently make another
# image. (Memory flags do not change the picture: a record without them is replayed without them.)
REQUIRED = ("prompt", "seed", "steps", "guidance", "width", "height", "model")
SETTABLE = (*REPLAY_KEYS, "model")  # what replay's --set can give instead of the recorded value
OPTIONS = {option.name: option for backend in backends.BACKENDS for option in backend.options}


@dataclass(frozen=True)
class Recorded:
    """The job and the run settings an image's metadata records (with replay's --set changes applied)."""

    job: Job
    model: str
    config_dir: str | None
    vae: str | None  # --vae, a separate VAE file or folder
    flags: tuple[str, ...]
    backend_options: dict
    max_vram: float | None
    batch_size: int


def parse_changes(changes: tuple[str, ...]) -> dict[str, str]:
    """replay's `--set KEY=VALUE` options as KEY -> text."""
    parsed = {}
    for change in changes:
        key, sep, value = change.partition("=")
        if not sep or key not in SETTABLE:
            raise UsageError(f"--set {change!r}: use KEY=VALUE with KEY one of {', '.join(SETTABLE)}")
        parsed[key] = value
    return parsed


def read_record(meta, source: Path, changes: dict[str, str] | None = None) -> Recorded:
    """The settings `meta` (a parsed JSON value) records, checked. A key in `changes` (replay's --set) is taken
    from there instead, so --set also repairs a bad recorded value; None: nothing can be changed (decode)."""
    fixable = changes is not None
    changes = changes or {}

    def refuse(problem: str, key: str | None = None) -> UsageError:
        fix = f"replay with --set {key}=VALUE" if fixable and key in SETTABLE else METADATA_DAMAGED
        return UsageError(f"{source}: its sdrun metadata {problem}: {fix}")

    if not isinstance(meta, dict):
        raise refuse(f"is {_json_type(meta)}, not an object")
    missing = next((key for key in REQUIRED if meta.get(key) is None and key not in changes), None)
    if missing:
        raise refuse(f"has no {missing!r}", missing)
    job = Job(prompt="", num_images=1)
    for key in REPLAY_KEYS:
        if key in meta and key not in changes:
            try:
                job = job_from_mapping({key: meta[key]}, job)
            except UsageError as error:
                raise refuse(f"is not usable ({error})", key) from None
    job = replace(job, **{key: BY_NAME[key].parse_text(text) for key, text in changes.items() if key in BY_NAME})
    try:
        validate(job)  # what no single key shows: control characters in a text, settings that exclude each other
    except UsageError as error:
        raise UsageError(f"{source}: {error}") from None

    def take(key: str, default, valid, expected: str):
        value = meta.get(key, default)
        if not valid(value):
            raise refuse(f"records {key} {short_repr(value)}, not {expected}", key)
        return value

    model = changes["model"] if "model" in changes else take("model", None, _text, "a Hub id, folder or file")
    if not _text(model):
        raise UsageError(f"--set model={model!r} is empty: give a Hub id, a model folder or file, or tiny")
    return Recorded(
        job=job,
        model=model,
        config_dir=take("config_dir", None, lambda v: v is None or _text(v), "a config folder or null"),
        vae=take("vae", None, lambda v: v is None or _text(v), "a VAE file or folder, or null"),
        flags=tuple(take("flags", [], _flag_names, "a list of flag names (" + ", ".join(backends.BY_NAME) + ")")),
        backend_options=take("backend_options", {}, _backend_options,
                             "an object of whole-number backend options (" + ", ".join(OPTIONS) + ")"),
        max_vram=take("max_vram", None, lambda v: v is None or (_number(v) and math.isfinite(v) and v > 0),
                      "a number of GiB above 0, or null"),
        batch_size=take("batch_size", 1, lambda v: _whole(v) and v >= 1, "a whole number from 1"),
    )


def check_parameters_keys(meta: dict, source: Path) -> None:
    """The keys, beyond the job's, that a PNG's A1111 `parameters` text is made from (output.a1111_parameters):
    `sdrun decode` writes the recorded metadata into its image."""
    versions = meta.get("versions")
    for key, value in (("sampler", meta.get("sampler")), ("model_name", meta.get("model_name")),
                       ("versions.sdrun", versions.get("sdrun") if isinstance(versions, dict) else None)):
        if not _text(value):
            raise UsageError(f"{source}: its sdrun metadata records {key} {short_repr(value)}, not a name: "
                             f"{METADATA_DAMAGED}")


def _text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _flag_names(value) -> bool:
    return isinstance(value, list) and all(isinstance(name, str) and name in backends.BY_NAME for name in value)


def _backend_options(value) -> bool:
    return isinstance(value, dict) and all(
        name in OPTIONS and _whole(number) and number >= OPTIONS[name].minimum for name, number in value.items())


def _json_type(value) -> str:
    names = {list: "a list", str: "a string", bool: "true or false", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
