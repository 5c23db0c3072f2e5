"""A1111's short hashes of model, LoRA and embedding files, cached per path, size and mtime so a 7 GB file is
read once: `$SDRUN_CACHE/hashes.json` (default ~/.cache/sdrun/hashes.json).

A1111 (modules/hashes.py, extensions-builtin/Lora/network.py): `Model hash` and `TI hashes` are the first 10 hex
digits of the file's sha256 (CivitAI's AutoV2); `Lora hashes` are the first 12 of the sha256 of a .safetensors
file's tensor data, past its header (kohya's "addnet" hash, CivitAI's AutoV3), or of the whole file otherwise.
"""

import hashlib
import json
import os
from pathlib import Path

from sdrun import cache

BLOCK = 1 << 20


def cache_file() -> Path:
    return cache.root() / "hashes.json"


def file_hash(path: str | Path) -> str:
    """AutoV2: `Model hash:` and `TI hashes:`."""
    return _sha256(Path(path), past_header=False)[:10]


def model_hash(model: str) -> str | None:
    """`Model hash:` of a single-file checkpoint; None for a folder, a Hub id or the built-in tiny model."""
    return file_hash(model) if Path(model).is_file() else None


def lora_hash(path: str | Path) -> str:
    """`Lora hashes:` as A1111 writes them."""
    path = Path(path)
    return _sha256(path, past_header=path.suffix.lower() == ".safetensors")[:12]


def _sha256(path: Path, past_header: bool) -> str:
    stat = path.stat()
    key = f"{path.resolve()}|{'data' if past_header else 'file'}"
    stamp = [stat.st_size, stat.st_mtime_ns]
    cache = _read_cache()
    if cache.get(key, {}).get("stamp") == stamp:
        return cache[key]["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as file:
        if past_header:
            file.seek(8 + int.from_bytes(file.read(8), "little"))
        for block in iter(lambda: file.read(BLOCK), b""):
            digest.update(block)
    cache = {name: entry for name, entry in cache.items() if Path(name.rpartition("|")[0]).exists()}  # drop gone files
    cache[key] = {"stamp": stamp, "sha256": digest.hexdigest()}
    _write_cache(cache)
    return cache[key]["sha256"]


def _read_cache() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: hash again


def _write_cache(cache: dict) -> None:
    """Best effort, atomically: a read-only home only costs hashing again next time."""
    target = cache_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(cache))
        os.replace(temporary, target)
    except OSError:
        pass
