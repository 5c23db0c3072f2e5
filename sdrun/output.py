"""Where images go and what they carry: output paths from `-o`, PNG metadata, and crash-safe writes.

Every PNG gets two text chunks:
- `parameters`: A1111's format, which A1111, CivitAI and metadata readers parse;
- `sdrun`: JSON with every setting, the memory flags and versions; `sdrun replay` reads it back.
"""

import json
import os
import re
import string
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

from sdrun.errors import OutputError, UsageError

PLACEHOLDERS = {"seed", "index", "prompt"}
UMASK = os.umask(0o022)
os.umask(UMASK)


def slug(prompt: str, limit: int = 60) -> str:
    """A file-name-safe short form of the prompt: 'A red fox, in snow!' -> 'a-red-fox-in-snow'."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return words[:limit].rstrip("-") or "image"


def _fields(template: str) -> set[str]:
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise UsageError(f"output template {template!r} is malformed ({error}): use e.g. out/{{seed}}.png")
    unknown = names - PLACEHOLDERS
    if unknown:
        raise UsageError(
            f"output template {template!r} uses unknown placeholder {{{sorted(unknown)[0]}}}: "
            f"use {{seed}}, {{index}} or {{prompt}}"
        )
    return names


def template_for(output: str, several: bool) -> str:
    """Turn `-o` (a file, a folder, or a template) into a template. Several images into one plain file name
    get `-{index}` before the extension, so they never overwrite each other."""
    if output.endswith(("/", os.sep)) or Path(output).is_dir():
        output = str(Path(output) / "{seed}-{prompt}.png")
    elif Path(output).suffix.lower() != ".png":
        raise UsageError(f"output {output!r} is not a .png file or a folder: end it with .png, or with / for a folder")
    if several and not _fields(output) & {"seed", "index"}:
        path = Path(output)
        output = str(path.with_name(path.stem + "-{index}" + path.suffix))
    _fields(output)
    return output


def render(template: str, seed: int, index: int, prompt: str) -> Path:
    return Path(template.format(seed=seed, index=index, prompt=slug(prompt)))


def ensure_writable(folder: Path) -> None:
    """Create `folder` if needed and prove a file can be written in it, before any generation starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sdrun-probe-"):
            pass
    except OSError as error:
        raise OutputError(f"cannot write to output folder {str(folder)!r} ({error.strerror}): choose another -o")


def a1111_parameters(meta: dict) -> str:
    """The `parameters` text A1111 writes: prompt, negative prompt, then one line of 'Key: value' pairs."""
    lines = [meta["prompt"]]
    if meta["negative_prompt"]:
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    fields = (f"Steps: {meta['steps']}, Sampler: {meta['sampler']}, CFG scale: {meta['guidance']}, Seed: {meta['seed']}, "
              f"Size: {meta['width']}x{meta['height']}, Model: {meta['model_name']}")
    if meta.get("init_image") and meta.get("strength", 1) < 1:
        fields += f", Denoising strength: {meta['strength']}"
    if meta.get("hires"):
        fields += (f", Hires resize: {meta['hires']}, Hires steps: {meta.get('hires_steps') or meta['steps']}, "
                   f"Hires upscaler: Bicubic, Denoising strength: {meta['hires_strength']}")
    lines.append(f"{fields}, Version: sdrun {meta['versions']['sdrun']}")
    return "\n".join(lines)


def save_png(image: Image.Image, path: Path, meta: dict, overwrite: bool) -> None:
    """Write atomically: a hidden temporary file in the same folder, renamed into place only when complete,
    so an interrupted or crashed run never leaves a half-written PNG under the real name."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(meta))
    info.add_text("sdrun", json.dumps(meta, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes the file private; an image should get the usual permissions
    try:
        with os.fdopen(fd, "wb") as file:
            image.save(file, format="PNG", pnginfo=info)
        if not overwrite and path.exists():
            raise OutputError(f"{path} already exists: pass --overwrite to replace it or --skip-existing to keep it")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_metadata(path: Path) -> dict:
    """The `sdrun` chunk of a PNG written by sdrun."""
    try:
        with Image.open(path) as image:
            text = image.text.get("sdrun") if hasattr(image, "text") else None
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read {path} as a PNG image ({error}): give a PNG that sdrun wrote")
    if text is None:
        raise UsageError(f"{path} has no sdrun metadata (it was not made by sdrun, or the metadata was stripped)")
    return json.loads(text)
