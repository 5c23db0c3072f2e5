"""Read one checkpoint file into a flat {name: tensor} dict, in bounded time and memory, running none of its code.

- `.safetensors`: tensors are read one at a time with pread(2), each converted to the load dtype as it arrives,
  so the peak is the loaded weights plus one tensor. (Through a memory map, every page of the file stays resident
  beside the converted copies: an fp32 file loaded in fp16 peaked at 3x the loaded weights.)
- `.ckpt`/`.pt`/`.pth` are pickles. Before torch unpickles one, the pickle must fit in PICKLE_LIMIT bytes and
  parse as pickle opcodes, and a zip container must hold its members uncompressed as torch.save writes them (a
  compressed member can inflate to any size); torch then unpickles it weights-only, importing nothing but tensor
  types, with the file memory-mapped so that only the weights sdrun uses are read.
- The weights may sit under "state_dict", nested: the nesting is followed a few levels only, since a pickle can
  make a dict its own "state_dict" (diffusers' loader, `while "state_dict" in checkpoint`, then never returns).
"""

import io
import pickletools
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sdrun.errors import ModelError

# A Stable Diffusion .ckpt pickles about 150 bytes per tensor: SDXL with its EMA copy is under 1 MB. Unpickling
# 8 MiB takes seconds and, at worst (an empty list every two bytes), 280 MB (measured).
PICKLE_LIMIT = 8 << 20
STATE_DICT_NESTING = 4
# The prefixes of the original layout's text encoders in OpenAI CLIP (transformers) layout: SD 1.x's, SDXL's first.
CLIP_PREFIXES = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")
# What diffusers' single-file loader reads; a tensor anywhere else (EMA copies, noise schedules) is never used.
COMPONENT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.")


def read_state_dict(path: Path, dtype: torch.dtype | None,
                    prefixes: tuple[str, ...] = COMPONENT_PREFIXES) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under `prefixes` (by default its UNet, VAE and text encoders: COMPONENT_PREFIXES),
    floating-point ones in `dtype` (None: as stored).
    CLIP text encoder keys get the `text_model.` level they lack when written from transformers 5, whose
    CLIPTextModel has no such level (diffusers' own conversion script writes them so). Raises ModelError for
    files that cannot be read."""
    safetensors = path.suffix.lower() == ".safetensors"
    state = _read_safetensors(path, dtype, prefixes) if safetensors else _read_pickle(path, dtype, prefixes)
    for key, value in state.items():
        if value.dim() == 0:
            raise ModelError(f"'{path}' holds a single number where the weight tensor '{key}' belongs: the file "
                             "is damaged, download the checkpoint again")
    return {_with_text_model_level(key): value for key, value in state.items()}


def read_safetensors(path: Path, dtype: torch.dtype | None, prefixes: tuple[str, ...] = ("",),
                     device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file whose keys start with one of `prefixes`, read one by one, floating-point
    ones in `dtype` (None: as stored). Into CPU memory (device None) through pread, no memory map. To a GPU,
    each tensor is copied there from the file's memory map and converted there: CPU memory holds no copy (the
    map's pages are the page cache's), and torch's copy releases the GIL (BackgroundReads)."""
    if device is not None and device.type != "cpu":
        with safe_open(path, framework="pt") as file:
            return {key: _cast(file.get_tensor(key).to(device), dtype) for key in file.keys()
                    if key.startswith(prefixes)}
    with safe_open(path, framework="pt", backend="pread") as file:
        return {key: _cast(file.get_tensor(key), dtype) for key in file.keys() if key.startswith(prefixes)}


class BackgroundReads:
    """Weights files read (read_safetensors) on one background thread, in order, from the moment this is made:
    the model loads while diffusers and transformers still import (seconds), not after. `take(path)` waits for
    one file's tensors and raises what its read raised; a file not started here is read at once. `drop(path)`
    lets go of a file the caller will not use (its memory is freed once its read ends)."""

    def __init__(self, paths: list[Path], dtype: torch.dtype | None, device: torch.device | None = None):
        self.dtype, self.device = dtype, device
        pool = ThreadPoolExecutor(1, thread_name_prefix="sdrun-read")
        self._reads = {path: pool.submit(read_safetensors, path, dtype, ("",), device) for path in paths}
        pool.shutdown(wait=False)  # the thread ends after the last file

    def take(self, path: Path) -> dict[str, torch.Tensor]:
        read = self._reads.pop(path, None)
        if read is None:
            return read_safetensors(path, self.dtype, device=self.device)
        try:
            return read.result()
        except BaseException:  # the load fails: the files not yet started are not read for nothing
            for other in self._reads.values():
                other.cancel()
            raise

    def drop(self, path: Path) -> None:
        read = self._reads.pop(path, None)
        if read is not None:
            read.cancel()


def _read_safetensors(path: Path, dtype: torch.dtype, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    try:
        return read_safetensors(path, dtype, prefixes)
    except (SafetensorError, OSError) as error:
        raise _unreadable(path) from error


def _read_pickle(path: Path, dtype: torch.dtype, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    try:
        _check_pickle(path)
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    # Unpickling garbage fails in many ways (KeyError, EOFError, UnpicklingError, ...): all mean a bad file,
    # except torch's weights-only refusal to import what the pickle names, worded "Unsupported global: ..." for a
    # name off its allowlist and (torch 2.13) "unsupported GLOBAL posix.system whose module posix is blocked".
    except ModelError:
        raise
    except Exception as error:
        if "unsupported global" in str(error).lower():
            raise ModelError(f"'{path}' needs pickled code to load, and sdrun never runs a checkpoint's code: if "
                             "you trust its source, convert it to .safetensors (torch.load it with "
                             "weights_only=False, then safetensors.torch.save_file its state_dict)") from error
        raise _unreadable(path) from error
    return {key: _cast(value, dtype) for key, value in _weights(data, prefixes).items()}


def _check_pickle(path: Path) -> None:
    """Refuse, before unpickling, what could take unbounded time or memory: a pickle over PICKLE_LIMIT, a
    compressed zip member, bytes that are no pickle. A zip (torch.save since torch 1.6) holds one data.pkl; the
    legacy format starts with four pickles in a row (magic number, protocol, system info, the object)."""
    if _is_zip(path):
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            pickles = [m for m in members if m.filename.rpartition("/")[2] == "data.pkl"]
            if len(pickles) != 1 or any(m.compress_type != zipfile.ZIP_STORED for m in members):
                raise _unreadable(path)
            if pickles[0].file_size > PICKLE_LIMIT:
                raise _too_large(path)
            stream, count = io.BytesIO(archive.read(pickles[0])), 1
    else:
        with open(path, "rb") as file:
            stream, count = io.BytesIO(file.read(PICKLE_LIMIT)), 4
    for _ in range(count):
        try:
            for _op in pickletools.genops(stream):  # stops after the pickle's STOP opcode
                pass
        except ValueError as error:  # a bad opcode, or the stream ended inside the pickle
            raise (_too_large(path) if stream.tell() >= PICKLE_LIMIT else _unreadable(path)) from error


def _weights(data, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of a loaded pickle under string keys, following "state_dict" nesting a few levels down."""
    if not isinstance(data, dict):
        return {}
    for _ in range(STATE_DICT_NESTING):
        inner = data.get("state_dict")
        if not isinstance(inner, dict):
            break
        data = inner
    return {key: value for key, value in data.items()
            if isinstance(key, str) and key.startswith(prefixes) and isinstance(value, torch.Tensor)}


def _is_zip(path: Path) -> bool:
    """torch's own test (serialization._is_zipfile): zipfile.is_zipfile also finds a zip inside other data."""
    with open(path, "rb") as file:
        return file.read(4) == b"PK\x03\x04"


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _with_text_model_level(key: str) -> str:
    for prefix in CLIP_PREFIXES:
        if key.startswith(prefix) and not key.startswith(prefix + "text_model."):
            return prefix + "text_model." + key[len(prefix):]
    return key


def _unreadable(path: Path) -> ModelError:
    # The library's reason (in the chained traceback, SDRUN_DEBUG=1) is often a paragraph or a bare byte value.
    return ModelError(f"'{path}' is corrupt or truncated, or not a checkpoint: download the checkpoint again")


def _too_large(path: Path) -> ModelError:
    return ModelError(f"'{path}' pickles more than {PICKLE_LIMIT >> 20} MiB of objects besides its tensors, far more "
                      "than a Stable Diffusion checkpoint: convert it to .safetensors where you trust it")
