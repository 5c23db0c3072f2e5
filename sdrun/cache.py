"""Where sdrun keeps what it computes once: `$SDRUN_CACHE`, by default ~/.cache/sdrun. It holds the compiled
attention kernel (kernels/), the file hashes (hashes.json) and, for installs whose own bytecode folders cannot be
written, Python's bytecode (pycache/); in the process, the scan of installed packages. No heavy import here: the
command reads it before torch loads."""

import importlib.util
import os
import sys
from pathlib import Path


def root() -> Path:
    return Path(os.environ["SDRUN_CACHE"]) if os.environ.get("SDRUN_CACHE") else Path.home() / ".cache" / "sdrun"


def keep_bytecode_of_read_only_installs() -> None:
    """Python caches each module's compiled bytecode beside its source. Where it cannot write there (a read-only
    install built without bytecode) it compiles the libraries from source in every process: on the H200 machine,
    whose diffusers and peft were installed without bytecode, 2,339 modules and 8.6 s of the start under the
    profiler. Then, if torch has no bytecode and its folder is read-only, all bytecode goes to sdrun's cache
    instead (sys.pycache_prefix), so only the first run pays. Not when torch has its bytecode: under a prefix
    Python reads bytecode only from there (`import torch` took 5.0-5.9 s with one, 2.2 s without, on that
    machine). PYTHONDONTWRITEBYTECODE and a prefix already set win."""
    if sys.dont_write_bytecode or sys.pycache_prefix is not None:
        return
    spec = importlib.util.find_spec("torch")  # finds the package without importing it
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return
    compiled = Path(importlib.util.cache_from_source(spec.origin))
    folder = compiled.parent if compiled.parent.is_dir() else compiled.parent.parent
    if compiled.exists() or os.access(folder, os.W_OK):
        return
    sys.pycache_prefix = str(root() / "pycache")


def scan_installed_packages_once() -> None:
    """diffusers and transformers each map import names to their distributions while they import
    (importlib.metadata.packages_distributions, which reads the file list of every installed distribution that
    lacks a top_level.txt, torch's among them). Nothing is installed while sdrun runs, so they share the first
    scan's answer (each caller gets its own copy): on the H200 machine, under the profiler, 2.7 s for the one
    scan against 4.3 s when each caller scanned."""
    import functools
    import importlib.metadata

    if getattr(importlib.metadata.packages_distributions, "sdrun_shared", False):
        return
    scan = functools.cache(importlib.metadata.packages_distributions)

    def shared() -> dict[str, list[str]]:
        return {name: list(distributions) for name, distributions in scan().items()}

    shared.sdrun_shared = True
    importlib.metadata.packages_distributions = shared
