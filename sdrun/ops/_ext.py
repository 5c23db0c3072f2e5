"""The ONLY place that imports sdrun's compiled kernels, attention, fp8 widening and GroupNorm (style.md P5).

Order: the prebuilt extension `sdrun._C` (setup.py builds it when torch with CUDA and nvcc are present), else a
just-in-time build of the same sources with `torch.utils.cpp_extension.load`, cached per torch version, CUDA
version and GPU architecture under `$SDRUN_CACHE/kernels/` (default `~/.cache/sdrun/kernels/`). Nothing here
raises at import: a failed load is recorded and turned into a KernelUnavailable with the fix by `get()`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from sdrun import cache
from sdrun.errors import KernelUnavailable

JIT_NAME = "sdrun_attn_C"
SOURCES = ("bindings.cpp", "mem_eff_attn.cu", "fp8_widen.cu", "group_norm.cu", "geglu.cu", "layer_norm.cu")
JIT_SECONDS = 40  # measured: ~30 s for one architecture on a 16-core H200 machine (bench/gpu.sh)
CFLAGS = ["-O3"]  # no -std: torch picks the C++ standard its headers need
CUDA_CFLAGS = ["-O3", "-lineinfo"]

_module = None  # _Ops over the loaded extension
_how: str = "not built"  # "prebuilt", "jit-cached" or "jit-compiled"
_errors: list[str] = []  # why each attempt failed, recorded instead of raised


def _package_dir() -> Path:
    return Path(__file__).resolve().parent.parent


def prebuilt_info() -> dict | None:
    """Contents of sdrun/build_info.json, written by setup.py next to the prebuilt extension."""
    path = _package_dir() / "build_info.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def source_dir() -> Path | None:
    """The kernel sources: installed as package data `sdrun/csrc`, or the repository's `csrc/`."""
    for d in (_package_dir() / "csrc", _package_dir().parent / "csrc"):
        if all((d / s).is_file() for s in SOURCES):
            return d
    return None


def nvcc_path() -> str | None:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and Path(home, "bin", "nvcc").is_file():
        return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


def ninja_available() -> bool:
    from torch.utils import cpp_extension

    return cpp_extension.is_ninja_available()


def arch_of(device: torch.device | None = None) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"


def cache_dir(arch: str) -> Path:
    base = cache.root()
    tune = "-tune" if os.environ.get("SDRUN_TUNE") == "1" else ""
    key = re.sub(r"[^A-Za-z0-9._-]", "_", f"torch{torch.__version__}-cu{torch.version.cuda}-sm{arch}{tune}")
    return base / "kernels" / key


def jit_cached(arch: str) -> bool:
    return any(cache_dir(arch).glob(f"{JIT_NAME}*.so"))


def _import_prebuilt():
    try:
        from sdrun import _C  # the one import of the compiled module

        return _C
    except ImportError as e:
        info = prebuilt_info()
        if info is not None:  # it was built, so a failure means a mismatch: say what for
            _errors.append(
                f"the prebuilt kernel (built for torch {info.get('torch')}, CUDA {info.get('cuda')}) does not load "
                f"under torch {torch.__version__}, CUDA {torch.version.cuda}: {e}"
            )
        return None


def _jit_build(device: torch.device | None):
    from torch.utils import cpp_extension

    src = source_dir()
    if src is None:
        raise RuntimeError("the kernel sources (csrc/) are not installed with sdrun")
    arch = arch_of(device)
    build = cache_dir(arch)
    build.mkdir(parents=True, exist_ok=True)
    cached = jit_cached(arch)
    if not cached:
        print(
            f"sdrun: compiling its kernels for sm_{arch} (first --xformers or --fp8 run, about {JIT_SECONDS} s)...",
            file=sys.stderr,
            flush=True,
        )
    flags = CUDA_CFLAGS + (["-DSDRUN_TUNE"] if os.environ.get("SDRUN_TUNE") == "1" else [])
    arch_list = f"{arch[:-1]}.{arch[-1]}"
    if arch == "90":  # Hopper: the sm_90a target carries the wgmma kernel (csrc/mem_eff_attn_sm90.cuh)
        arch_list, flags = "9.0a", flags + ["-DSDRUN_SM90A"]
    old_arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    t0 = time.perf_counter()
    try:
        mod = cpp_extension.load(
            name=JIT_NAME,
            sources=[str(src / s) for s in SOURCES],
            extra_cflags=CFLAGS,
            extra_cuda_cflags=flags,
            extra_include_paths=[str(src)],
            build_directory=str(build),
            verbose=os.environ.get("SDRUN_DEBUG") == "1",
        )
    finally:
        if old_arch_list is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch_list
    if not cached:
        print(f"sdrun: kernels compiled in {time.perf_counter() - t0:.0f} s, cached in {build}", file=sys.stderr)
    return mod, ("jit-cached" if cached else "jit-compiled")


class _Ops:
    """The kernels' entry points: fwd(q, k, v, scale, variant=0), fwd_out(q, k, v, scale, out, variant=0),
    bucket(head_dim), widen_fp8(src, dtype), group_norm(x, groups, weight, bias, eps, silu, channel_add=None),
    geglu(x) and layer_norm(x, weight, bias, eps, residual=None): the last four None in a prebuilt extension from
    before they existed."""

    def __init__(self, module):
        self.module = module
        self.fwd = torch.ops.sdrun_C.fwd
        self.fwd_out = torch.ops.sdrun_C.fwd_out
        self.bucket = torch.ops.sdrun_C.bucket
        self.widen_fp8 = getattr(torch.ops.sdrun_C, "widen_fp8", None)
        self.group_norm = getattr(torch.ops.sdrun_C, "group_norm", None)
        self.geglu = getattr(torch.ops.sdrun_C, "geglu", None)
        self.layer_norm = getattr(torch.ops.sdrun_C, "layer_norm", None)


def get(device: torch.device | None = None) -> _Ops:
    """The kernel's ops, loading or compiling the extension on first use; raises KernelUnavailable (reason + fix)."""
    global _module, _how
    if _module is not None:
        return _module
    if not torch.cuda.is_available():
        raise KernelUnavailable(
            f"--xformers needs a CUDA GPU, and torch {torch.__version__} sees none: run without --xformers, "
            "or install a CUDA build of torch on a machine with an NVIDIA GPU"
        )
    if os.environ.get("SDRUN_TUNE") != "1":
        mod = _import_prebuilt()
        if mod is not None:
            _module, _how = _Ops(mod), "prebuilt"
            return _module
    try:
        mod, _how = _jit_build(device)
        _module = _Ops(mod)
        return _module
    except Exception as e:  # compiler errors, missing nvcc or ninja: record, then explain
        _errors.append(f"the just-in-time build failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e!r}")
        raise KernelUnavailable(
            "the sdrun attention kernel could not be built: "
            + "; ".join(_errors)
            + ". Install the CUDA toolkit (nvcc) matching torch's CUDA "
            f"{torch.version.cuda} and ninja, or reinstall sdrun with `pip install --no-build-isolation .`"
            " to build it ahead of time; set SDRUN_DEBUG=1 to see the compiler output"
        ) from e


def loaded() -> bool:
    return _module is not None


def how_loaded() -> str:
    return _how


def errors() -> list[str]:
    return list(_errors)
