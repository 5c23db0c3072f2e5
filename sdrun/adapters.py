"""LoRA files and textual-inversion embeddings: the options, the run's set, the checks, loading, each job's weights.

    --lora FILE[:WEIGHT]      every image of the run, at WEIGHT (default 1); FILE may be a name in --lora-dir
    <lora:NAME:WEIGHT>        in a prompt, as A1111 users type it: that prompt's images only; NAME is found among the
                              --lora files (by file stem) or in --lora-dir; a prompt's tag overrides --lora's weight
    --embedding FILE          a textual inversion, triggered by its file stem in a prompt
    --embedding-dir DIR       the embeddings of DIR whose stem appears in a prompt or negative prompt

The run loads the union of what the options and the prompts name, once (the model loads once per run). When every
job uses the same weights, the LoRAs are fused into the model's weights and their layers dropped: the run then
denoises at the base model's speed. Otherwise they stay unfused and each job sets its own weights (0 for a LoRA it
does not name). Loading goes through diffusers (`load_lora_weights`, `load_textual_inversion`, on PEFT), which
reads both kohya/A1111 and diffusers layouts.

This module imports no torch at module level: cli.py takes its options from here.
"""

import re
from dataclasses import dataclass, replace
from pathlib import Path

import click

from sdrun import hashes, ip_adapter, lora_file
from sdrun.errors import ModelError, UsageError

LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")  # A1111's <lora:name:te-weight[:unet-weight]>
LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
# What diffusers raises for a file of the wrong layout or shapes (a size mismatch, no LoRA keys, a non-tensor)
LOAD_ERRORS = (ValueError, RuntimeError, KeyError, TypeError, AttributeError, IndexError)


@dataclass(frozen=True)
class LoraRef:
    """One LoRA file of the run."""

    name: str  # what a prompt calls it: <lora:name:...>; the file stem
    path: str
    weight: float | None  # --lora's weight for every job; None: only the jobs whose prompt names it


@dataclass(frozen=True)
class Adapters:
    """What the run loads (RunConfig.adapters), settled by `resolve` before any weights load."""

    loras: tuple[LoraRef, ...] = ()
    lora_dir: str | None = None
    embeddings: tuple[str, ...] = ()  # paths
    embedding_dir: str | None = None
    fused: tuple[float, ...] | None = None  # every job's weights, when they are one set: the LoRAs are fused
    ip_adapter: str | None = None  # ip_adapter.py: an IP-Adapter file, its image and scale for the whole run
    ip_image: str | None = None
    ip_scale: float = 1.0
    ip_image_encoder: str | None = None  # its CLIP image encoder folder (None: image_encoder/ beside the file)

    def __bool__(self) -> bool:
        return bool(self.loras or self.embeddings or self.ip_adapter)


# ---------------------------------------------------------------------------------------------- options

def options(fn):
    fn = ip_adapter.options(fn)  # listed after these
    for option in reversed([
        click.option("--lora", "loras", multiple=True, metavar="FILE[:WEIGHT]",
                     help="A LoRA (kohya/A1111 or diffusers layout) for every image, at WEIGHT (default 1); "
                     "repeatable. Prompts may also name LoRAs as <lora:NAME:WEIGHT>."),
        click.option("--lora-dir", type=click.Path(file_okay=False), help="Where <lora:NAME:...> finds NAME."),
        click.option("--embedding", "embeddings", multiple=True, metavar="FILE", help="A textual-inversion "
                     "embedding, triggered by its file name (without suffix) in a prompt; repeatable."),
        click.option("--embedding-dir", type=click.Path(file_okay=False),
                     help="Textual-inversion embeddings, each triggered by its file name in a prompt."),
    ]):
        fn = option(fn)
    return fn


def from_options(options: dict) -> Adapters:
    """Pop this module's options out of a command's options."""
    lora_dir = options.pop("lora_dir", None)
    return Adapters(tuple(parse_lora(text, lora_dir) for text in options.pop("loras", ())), lora_dir,
                    tuple(options.pop("embeddings", ())), options.pop("embedding_dir", None),
                    **ip_adapter.pop_options(options))


def parse_lora(text: str, lora_dir: str | None) -> LoraRef:
    path, sep, weight = text.rpartition(":")
    try:
        value = float(weight) if sep else 1.0
    except ValueError:
        path, value = text, 1.0
    return LoraRef(Path(path or text).stem, str(_find(path or text, lora_dir, LORA_SUFFIXES, "--lora")), value)


def _find(name: str, folder: str | None, suffixes: tuple[str, ...], option: str) -> Path:
    """A file as given, or NAME[.suffix] in the folder."""
    candidates = [Path(name)] + [Path(folder) / (name + suffix) for suffix in ("", *suffixes) if folder]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = f" or in {folder}" if folder else ""
    raise UsageError(f"{option} {name}: no such file{where}: give the path of a {'/'.join(suffixes)} file")


# ---------------------------------------------------------------------------------------------- the run's set

def prompt_loras(prompt: str) -> dict[str, float]:
    """The <lora:name:weight> tags of a prompt (weight 1 when omitted)."""
    found = {}
    for name, weight in LORA_TAG.findall(prompt):
        try:
            found[name] = float(weight) if weight else 1.0
        except ValueError:
            raise UsageError(f"<lora:{name}:{weight}>: the weight is not a number: write e.g. <lora:{name}:0.8>") \
                from None
    return found


def without_tags(prompt: str) -> str:
    """The prompt as the text encoder reads it: A1111 removes its extra-network tags."""
    return LORA_TAG.sub("", prompt)


def job_weights(adapters: Adapters, job) -> tuple[float, ...]:
    """One weight per LoRA of the run, in its order: the prompt's tag, else --lora's weight, else 0."""
    named = prompt_loras(job.prompt)
    return tuple(named.get(lora.name, lora.weight or 0.0) for lora in adapters.loras)


def resolve(adapters: Adapters, jobs: list, model: lora_file.Target | None = None) -> Adapters:
    """The run's set: --lora's files plus every LoRA a prompt names, --embedding's files plus the embeddings of
    --embedding-dir a prompt uses; every file checked (a LoRA against `model`, when known); fused when every job
    uses the same weights."""
    ip_adapter.check(adapters)
    loras = {lora.name: lora for lora in adapters.loras}
    for job in jobs:
        for name in prompt_loras(job.prompt):
            if name in loras:
                continue
            if not adapters.lora_dir:
                raise UsageError(f"the prompt names <lora:{name}>, which is not one of the --lora files: add "
                                 f"--lora-dir DIR (the folder of {name}.safetensors), or --lora FILE")
            loras[name] = LoraRef(name, str(_find(name, adapters.lora_dir, LORA_SUFFIXES, f"<lora:{name}>")), None)
    embeddings = list(dict.fromkeys(str(_find(path, None, EMBEDDING_SUFFIXES, "--embedding"))
                                    for path in adapters.embeddings))
    if adapters.embedding_dir:
        folder = Path(adapters.embedding_dir)
        if not folder.is_dir():
            raise UsageError(f"--embedding-dir {folder}: no such folder: give the folder of the embedding files")
        texts = [text for job in jobs for text in (job.prompt, job.negative_prompt)]
        embeddings += [str(path) for path in sorted(folder.iterdir())
                       if path.suffix.lower() in EMBEDDING_SUFFIXES and str(path) not in embeddings
                       and any(mentions(text, path.stem) for text in texts)]
    for lora in loras.values():
        lora_file.check(Path(lora.path), model)
    resolved = replace(adapters, loras=tuple(loras.values()), embeddings=tuple(embeddings))
    weights = {job_weights(resolved, job) for job in jobs}
    return replace(resolved, fused=weights.pop() if len(weights) == 1 and resolved.loras else None)


def mentions(text: str, token: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(token)}(?![\w-])", text) is not None


# ---------------------------------------------------------------------------------------------- loading

@dataclass
class Loaded:
    """The adapters in a loaded pipeline."""

    adapters: Adapters
    names: tuple[str, ...]  # PEFT adapter names, one per LoRA (empty once fused)


def load(pipe, adapters: Adapters) -> Loaded:
    """Load the LoRAs (fused, or left as adapters) and the embeddings into `pipe`; errors are one ModelError."""
    from diffusers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # diffusers logs what fails (and we raise it) and PEFT notes we do not need
    try:
        names = tuple(_load_lora(pipe, lora, f"lora{i}") for i, lora in enumerate(adapters.loras))
        for path in adapters.embeddings:
            _load_embedding(pipe, path)
        if adapters.ip_adapter:
            ip_adapter.load(pipe, adapters, LOAD_ERRORS)
    finally:
        logging.set_verbosity(verbosity)
    if names and adapters.fused is not None:
        pipe.set_adapters(list(names), list(adapters.fused))
        pipe.fuse_lora(adapter_names=list(names), lora_scale=1.0)
        pipe.unload_lora_weights()  # the weights hold them now: no LoRA layers left to slow each step
        names = ()
    return Loaded(adapters, names)


def _load_lora(pipe, lora: LoraRef, adapter: str) -> str:
    state = _read(Path(lora.path), pipe.unet.dtype)
    try:
        pipe.load_lora_weights(state, adapter_name=adapter)
    except LOAD_ERRORS as error:
        raise ModelError(f"{lora.path} is not a LoRA for this {pipe.sdrun_family} model ({_first_line(error)}): "
                         "give a LoRA trained for this model's family") from None
    if not any(adapter in names for names in pipe.get_list_adapters().values()):
        raise ModelError(f"{lora.path} changes no layer of this {pipe.sdrun_family} model (none of its keys match): "
                         "give a LoRA trained for this model's family")
    return adapter


def _load_embedding(pipe, path: str) -> None:
    token = Path(path).stem
    state = _read(Path(path), pipe.text_encoder.dtype)
    try:
        if pipe.sdrun_family == "sdxl" and {"clip_l", "clip_g"} <= state.keys():
            pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
        else:
            pipe.load_textual_inversion(state, token=token)
    except LOAD_ERRORS as error:
        raise ModelError(f"{path} is not a textual-inversion embedding for this {pipe.sdrun_family} model "
                         f"({_first_line(error)}): give an embedding trained for this model's family, or rename "
                         "the file if its name is already a word of the tokenizer") from None


def _read(path: Path, dtype) -> dict:
    """Every tensor of the file (LoRA alphas are single numbers; A1111's .pt embeddings nest dicts), without
    running a pickle's code (weights only)."""
    import pickle

    import torch
    from safetensors import SafetensorError

    from sdrun.checkpoint import read_safetensors

    try:
        if path.suffix.lower() == ".safetensors":
            return read_safetensors(path, dtype)
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        raise ModelError(f"{path} cannot be read ({_first_line(error)}): download it again") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def activate(pipe, loaded: Loaded | None, job) -> None:
    """Before a job's text encoding: its LoRA weights, when the LoRAs are not fused."""
    if loaded is not None and loaded.names:
        pipe.set_adapters(list(loaded.names), list(job_weights(loaded.adapters, job)))


# ---------------------------------------------------------------------------------------------- metadata

def record(adapters: Adapters, job) -> dict:
    """The job's LoRAs (weight not 0) and the embeddings its prompts use, with A1111's hashes: for the metadata
    (replay reloads them) and for --skip-existing (an image made with other adapters is not this one)."""
    loras = [{"name": lora.name, "path": lora.path, "weight": lora.weight, "applied": weight,
              "hash": hashes.lora_hash(lora.path)}
             for lora, weight in zip(adapters.loras, job_weights(adapters, job)) if weight != 0]
    tokens = {Path(path).stem: path for path in adapters.embeddings}
    embeddings = [{"token": token, "path": path, "hash": hashes.file_hash(path)} for token, path in tokens.items()
                  if mentions(job.prompt, token) or mentions(job.negative_prompt, token)]
    ip = adapters.ip_adapter and {"path": adapters.ip_adapter, "image": adapters.ip_image, "scale": adapters.ip_scale,
                                  "image_encoder": str(ip_adapter.encoder_folder(adapters)),
                                  "hash": hashes.file_hash(adapters.ip_adapter)}
    return {"loras": loras, "embeddings": embeddings, "ip_adapter": ip or None}


def from_record(meta: dict, source: Path) -> Adapters:
    """What `sdrun replay` loads: the recorded files (a prompt's <lora:...> tags find them by name). Metadata may
    have been edited: a damaged entry is one UsageError."""
    from sdrun.output import METADATA_DAMAGED

    number = (int, float)

    def valid(entry, fields: dict) -> bool:
        return isinstance(entry, dict) and all(isinstance(entry.get(name), kinds) for name, kinds in fields.items())

    def entries(key: str, fields: dict) -> list[dict]:
        value = meta.get(key) or []
        if not isinstance(value, list) or not all(valid(entry, fields) for entry in value):
            raise UsageError(f"{source}: its sdrun metadata has a damaged {key!r} entry: {METADATA_DAMAGED}")
        return value

    loras = tuple(LoraRef(entry["name"], entry["path"], entry["weight"])
                  for entry in entries("loras", {"name": str, "path": str, "weight": (*number, type(None))}))
    for lora in loras:
        if not Path(lora.path).is_file():
            raise UsageError(f"the image was made with the LoRA {lora.path}, which is not there now: put it back, "
                             "or replay on a machine that has it")
    embeddings = tuple(entry["path"] for entry in entries("embeddings", {"path": str}))
    ip = meta.get("ip_adapter")
    if ip is None:
        return Adapters(loras, embeddings=embeddings)
    if not valid(ip, {"path": str, "image": str, "scale": number, "image_encoder": str}):
        raise UsageError(f"{source}: its sdrun metadata has a damaged 'ip_adapter' entry: {METADATA_DAMAGED}")
    return Adapters(loras, embeddings=embeddings, ip_adapter=ip["path"], ip_image=ip["image"],
                    ip_scale=float(ip["scale"]), ip_image_encoder=ip["image_encoder"])
