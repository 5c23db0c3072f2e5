"""Where images go and what they carry: output paths from `-o`, PNG metadata, and crash-safe, exclusive writes.

Every PNG gets two text chunks:
- `parameters`: A1111's format, which A1111, CivitAI and metadata readers parse;
- `sdrun`: JSON with every setting, the memory flags and versions; `sdrun replay` reads it back.

A PNG is written under a temporary name `.NAME.sdrun-PID-RANDOM.tmp` beside its final name and linked into place
only when complete; without --overwrite the link is exclusive, so of two writers racing for one name exactly one
wins. The writer's pid in the temporary name lets a later run remove what a killed writer left, and only that.
"""

import errno
import hashlib
import json
import os
import re
import string
import tempfile
import unicodedata
from pathlib import Path

from PIL import Image, PngImagePlugin

from sdrun.errors import OutputError, UsageError

PLACEHOLDERS = {"seed", "index", "prompt"}
UMASK = os.umask(0o022)
os.umask(UMASK)
DEFAULT_NAME_MAX = 255  # bytes per file name on ext4, XFS, btrfs, APFS, NTFS: used where pathconf cannot tell
# The saved-latents file beside an image (batch.latents_path) is the longest name made from an image's name:
# an image's name leaves it room, so an out-of-memory decode can always save its latents.
LATENTS_SUFFIX = ".latents.safetensors"
# Every file system with long names allows at least this many bytes per name (eCryptfs 143, the others 255): a
# path whose names are all this short, latents name included, fits without asking the file system (a plan of
# 100000 images would spend seconds asking for each path)
SURELY_FITS = 143 - len(LATENTS_SUFFIX)
NOT_IN_NAMES = str.maketrans("", "", ":,")  # what A1111 strips from LoRA and embedding names in its hash fields
TEMPORARY = re.compile(r"\..*\.sdrun-(\d+)-[a-z0-9_]+\.tmp", re.S)
TEMPORARY_ROOM = len(".") + len(".sdrun-") + 10 + len("-") + 8 + len(".tmp")  # pid up to 10 digits, 8 random
METADATA_DAMAGED = "the metadata was edited or damaged; make the image again with sdrun PROMPT"  # the fix to say


class DiskFull(OutputError):
    """No space left where the images go: every later image would fail the same way, so the batch stops."""


class TargetExists(OutputError):
    """The image was finished, but another file took its name first; that file was kept."""


class FolderInTheWay(OutputError):
    """A folder stands where an image is to be written."""

    def __init__(self, path: Path):
        super().__init__(f"{path} is a folder, so the image cannot be written there: move it away or choose another -o")


def slug(prompt: str, limit: int = 60) -> str:
    """A file-name-safe short form of the prompt: 'A red fox, in snow!' -> 'a-red-fox-in-snow'."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return words[:limit].rstrip("-") or "image"


def check_metadata_text(name: str, text: str) -> None:
    """Refuse text that a PNG text chunk cannot carry: bytes that are not UTF-8 (Python passes them on from the
    command line as surrogates) and control characters other than tab and newline (NUL ends a chunk's text)."""
    for char in text:
        if 0xDC80 <= ord(char) <= 0xDCFF:
            raise UsageError(f"the {name} holds the byte 0x{ord(char) - 0xDC00:02x}, which is not UTF-8: "
                             "write it in UTF-8")
        if unicodedata.category(char) == "Cs":
            raise UsageError(f"the {name} holds U+{ord(char):04X}, half of a surrogate pair: write it in UTF-8")
    control = _control_character(text, allowed="\t\n")
    if control:
        raise UsageError(f"the {name} holds the control character U+{ord(control):04X}, which an image's metadata "
                         "cannot carry: remove it")


def _control_character(text: str, allowed: str = "") -> str | None:
    return next((char for char in text if unicodedata.category(char) == "Cc" and char not in allowed), None)


def _fields(template: str) -> set[str]:
    try:
        parsed = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as error:
        raise UsageError(f"output template {template!r} is malformed ({error}): use e.g. out/{{seed}}.png")
    names = {name for name, _, _ in parsed}
    unknown = names - PLACEHOLDERS
    if unknown:
        raise UsageError(
            f"output template {template!r} uses unknown placeholder {{{sorted(unknown)[0]}}}: "
            f"use {{seed}}, {{index}} or {{prompt}}"
        )
    for name, spec, conversion in parsed:
        if spec or conversion:
            written = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise UsageError(f"output template {template!r} formats a placeholder ({written}), which sdrun does "
                             f"not support: write plain {{{name}}}")
    return names


def template_for(output: str, several: bool) -> str:
    """Turn `-o` (a file, a folder, or a template) into a template. Several images into one plain file name
    get `-{index}` before the extension, so they never overwrite each other."""
    control = _control_character(output)
    if control:
        raise UsageError(f"output {output!r} holds the control character U+{ord(control):04X}: remove it")
    if output.endswith(("/", os.sep)) or os.path.isdir(output):
        output = str(Path(output) / "{seed}-{prompt}.png")
    elif Path(output).suffix.lower() != ".png":
        raise UsageError(f"output {output!r} is not a .png file or a folder: end it with .png, or with / for a folder")
    if several and not _fields(output) & {"seed", "index"}:
        path = Path(output)
        output = str(path.with_name(path.stem + "-{index}" + path.suffix))
    _fields(output)
    return output


def fixed_folder(template: str) -> Path:
    """The folder every path of `template` lies in: its leading folders without a placeholder."""
    fixed = []
    for part in Path(template).parent.parts:
        if "{" in part:
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def is_inside(path: Path, folder: Path) -> bool:
    """Whether `path` lies in `folder` once `..` and symbolic links are followed."""
    real, top = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, top]) == top


def render(template: str, seed: int, index: int, prompt: str) -> Path:
    return fit_name_lengths(Path(template.format(seed=seed, index=index, prompt=slug(prompt))))


def fit_name_lengths(path: Path) -> Path:
    """`path` with every component short enough for the file system (a long prompt through a template, or a
    long -o). A shortened component keeps its start and extension and gains a hash of the full name, so names
    that differed still differ and a rerun maps to the same files."""
    if all(len(os.fsencode(part)) <= SURELY_FITS for part in path.parts):
        return path
    limit = _name_max(path.parent)
    *folders, name = path.parts
    fitted = [_fit(part, limit, "") for part in folders]
    fitted.append(_fit(name, limit - (len(LATENTS_SUFFIX) - len(path.suffix)), path.suffix))
    return Path(*fitted)


def _fit(part: str, limit: int, suffix: str) -> str:
    if len(os.fsencode(part)) <= limit:
        return part
    digest = "-" + hashlib.sha1(os.fsencode(part)).hexdigest()[:8]
    return _cut(part[: len(part) - len(suffix)], limit - len(digest) - len(os.fsencode(suffix))) + digest + suffix


def _cut(text: str, limit: int) -> str:
    """`text` cut to at most `limit` bytes as the file system stores it, never inside a UTF-8 character."""
    encoded = os.fsencode(text)
    if len(encoded) <= limit:
        return text
    end = limit
    while end > 0 and encoded[end] & 0xC0 == 0x80:  # a UTF-8 continuation byte: the character started earlier
        end -= 1
    return os.fsdecode(encoded[:end])


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(_nearest_existing(folder), "PC_NAME_MAX")
    except (OSError, ValueError):
        return DEFAULT_NAME_MAX


def _nearest_existing(folder: Path) -> Path:
    folder = Path(os.path.abspath(folder))
    while not os.path.exists(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def check_writable(folder: Path) -> None:
    """Prove that images can be written into `folder` before any generation starts, creating nothing: the
    folder, or the nearest folder above it that exists, must be writable. Folders are made with the first image."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        reason = f"{existing} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        reason = f"{existing} is not writable"
    else:
        return
    raise OutputError(f"cannot write to output folder {str(folder)!r} ({reason}): choose another -o")


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files that sdrun writers killed mid-write (SIGKILL, power loss) left in `folder`.
    A file whose writer's pid is still running is left alone: it may be a concurrent run's image in progress."""
    try:
        names = os.listdir(folder)
    except OSError:
        return  # not there yet, or not listable: nothing of ours to clean
    for name in names:
        match = TEMPORARY.fullmatch(name)
        if match and not _running(int(match.group(1))):
            try:
                os.unlink(folder / name)
            except OSError:
                pass  # removed by another run meanwhile, or not removable: it is never counted as an image anyway


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        pass  # another user's process, or a number no pid can be: leave its file alone
    return True


def temporary_file(path: Path) -> tuple[int, str]:
    """An open file descriptor and the name of a fresh temporary file beside `path`, named so that
    remove_stale_temporaries recognises it."""
    name = _cut(path.name, _name_max(path.parent) - TEMPORARY_ROOM)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.sdrun-{os.getpid()}-", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes the file private; an image should get the usual permissions
    return fd, tmp


def a1111_parameters(meta: dict) -> str:
    """The `parameters` text A1111 writes: prompt, negative prompt, then one line of 'Key: value' pairs."""
    lines = [meta["prompt"]]
    if meta["negative_prompt"]:
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    model_hash = f"Model hash: {meta['model_hash']}, " if meta.get("model_hash") else ""
    fields = (f"Steps: {meta['steps']}, Sampler: {meta['sampler']}, CFG scale: {meta['guidance']}, Seed: {meta['seed']}, "
              f"Size: {meta['width']}x{meta['height']}, {model_hash}Model: {meta['model_name']}")
    if meta.get("init_image") and meta.get("strength", 1) < 1:
        fields += f", Denoising strength: {meta['strength']}"
    if meta.get("hires"):
        fields += (f", Hires resize: {meta['hires']}, Hires steps: {meta.get('hires_steps') or meta['steps']}, "
                   f"Hires upscaler: Bicubic, Denoising strength: {meta['hires_strength']}")
    for label, key, name in (("Lora hashes", "loras", "name"), ("TI hashes", "embeddings", "token")):
        if meta.get(key):  # A1111 quotes a value holding commas; names lose ':' and ',' (extra_networks_lora.py)
            pairs = ", ".join(f"{entry[name].translate(NOT_IN_NAMES)}: {entry['hash']}" for entry in meta[key])
            fields += f', {label}: "{pairs}"'
    lines.append(f"{fields}, Version: sdrun {meta['versions']['sdrun']}")
    return "\n".join(lines)


def save_png(image: Image.Image, path: Path, meta: dict, overwrite: bool) -> None:
    """Write the complete PNG under a temporary name, then give it its real name: an interrupted or crashed run
    never leaves a half-written PNG there. Without `overwrite` that last step is exclusive (TargetExists if the
    name is taken, even by a writer that got there a moment earlier); a full disk raises DiskFull."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(meta))
    info.add_text("sdrun", json.dumps(meta, sort_keys=True))
    if path.is_dir():
        raise FolderInTheWay(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temporary_file(path)
        with os.fdopen(fd, "wb") as file:
            image.save(file, format="PNG", pnginfo=info)
        if overwrite:
            os.replace(tmp, path)
        elif not _link_exclusive(tmp, path):
            raise TargetExists(f"{path} already exists (made while this image was): it was kept and this image was "
                               "not written; pass --overwrite to replace it, or choose another -o")
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"no space left in {str(path.parent)!r} (writing {path.name}): free some space there or "
                           "choose another -o")
        raise OutputError(f"cannot write {path} ({error.strerror}): choose another -o")
    finally:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)  # after a link the image has its real name too; after a failure it is incomplete


def _link_exclusive(tmp: str, path: Path) -> bool:
    """Give the finished file `tmp` the name `path` too, unless that name exists (then False)."""
    try:
        os.link(tmp, path)  # atomic and exclusive: of many writers racing for one name, exactly one succeeds
        return True
    except FileExistsError:
        return False
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
    # No hard links here (FAT and exFAT cards, some network shares): claim the name exclusively with an empty
    # file, then move the finished image over the claim.
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except FileExistsError:
        return False
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(path)  # the empty claim must not stay under the image's name
        raise
    return True


def read_metadata(path: Path):
    """The `sdrun` chunk of a PNG written by sdrun, as a JSON value."""
    try:
        with Image.open(path) as image:
            text = image.text.get("sdrun") if hasattr(image, "text") else None
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read {path} as a PNG image ({error}): give a PNG that sdrun wrote")
    if text is None:
        raise UsageError(f"{path} has no sdrun metadata (it was not made by sdrun, or the metadata was stripped)")
    return parse_metadata(text, path)


def parse_metadata(text: str, source: Path):
    """The JSON value of an `sdrun` metadata text (sdrun.recorded checks what it holds)."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        reason = error.msg if isinstance(error, json.JSONDecodeError) else "nested too deeply"
        raise UsageError(f"{source}: its sdrun metadata is not valid JSON ({reason}): {METADATA_DAMAGED}") from None


def finished_metadata(path: Path) -> dict | None:
    """The `sdrun` metadata of the complete PNG at `path`, or None when it is not one (unreadable, truncated,
    not a PNG, no sdrun chunk before the image data, metadata that is not a JSON object)."""
    try:
        with Image.open(path) as image:
            text = image.info.get("sdrun")
            image.verify()  # reads every chunk to the end and checks its CRC, without decoding the pixels
        found = json.loads(text) if isinstance(text, str) else None
    except Exception:  # any failure to read a file that anyone may have put there means "not a finished image"
        return None
    return found if isinstance(found, dict) else None

