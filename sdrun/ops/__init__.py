"""sdrun's own CUDA kernels (C++ in csrc/): the memory-efficient attention behind `--xformers`, and the widening of
fp8 weights behind `--fp8` (widen_fp8).

Importing this package never compiles or loads anything and never raises; `load()` does the work.
"""

from __future__ import annotations

import math
import time

import torch

from sdrun.errors import KernelUnavailable
from sdrun.ops import _ext
from sdrun.ops.attention import memory_efficient_attention
from sdrun.ops.reference import reference_attention

__all__ = ["build_info", "load", "memory_efficient_attention", "reference_attention", "selftest", "supports",
           "unavailable_reasons", "widen_fp8"]

MIN_CAPABILITY = (7, 5)
MAX_HEAD_DIM = 256


def _capability(device: torch.device | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def unavailable_reasons(device: torch.device | None = None) -> list[str]:
    """Cheap check, no compiling: sentences saying why the kernel cannot run here. Empty = usable (maybe after a
    just-in-time build)."""
    if torch.version.cuda is None:
        return [f"this torch build ({torch.__version__}) has no CUDA support, and the sdrun attention kernel runs "
                "only on NVIDIA GPUs: install a CUDA build of torch, or run without --xformers."]
    if not torch.cuda.is_available():
        return [f"CUDA is not available: torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable "
                "NVIDIA GPU or driver; run without --xformers."]
    cap = _capability(device)
    if cap < MIN_CAPABILITY:
        return [f"the sdrun attention kernel needs compute capability >= 7.5 (Turing or newer), but "
                f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}; run without --xformers."]
    if _ext.loaded():
        return []
    reasons = []
    if _ext._import_prebuilt() is None:  # cheap: a dlopen; otherwise check what a just-in-time build needs
        if _ext.jit_cached(_ext.arch_of(device)):
            return []
        if _ext.source_dir() is None:
            reasons.append("there is no prebuilt attention kernel and the kernel sources are not installed: "
                           "reinstall sdrun (`pip install --no-build-isolation .` builds the kernel ahead of time).")
        if _ext.nvcc_path() is None:
            reasons.append(f"there is no prebuilt attention kernel and no CUDA compiler (nvcc) to build one: install "
                           f"the CUDA toolkit {torch.version.cuda} (or set CUDA_HOME), or reinstall sdrun with "
                           "`pip install --no-build-isolation .` on a machine that has it.")
        if not _ext.ninja_available():
            reasons.append("there is no prebuilt attention kernel and no ninja to build one: `pip install ninja`.")
    return reasons


def load(device: torch.device | None = None) -> None:
    """Make the kernel ready: import the prebuilt one or compile it just in time (a message on stderr).
    Raises KernelUnavailable with a one-line reason and fix."""
    reasons = unavailable_reasons(device)
    if reasons:
        raise KernelUnavailable(" ".join(reasons))
    _ext.get(device)


def widen_fp8(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float8_e4m3fn `weight` in `dtype`, the same values: sdrun's kernel (csrc/fp8_widen.cu; torch's fp8 cast runs
    at a third of the memory bandwidth) for a dense CUDA weight widened to float16 or bfloat16, after load();
    torch's cast for anything else."""
    if weight.is_cuda and dtype in (torch.float16, torch.bfloat16) and is_dense(weight):
        return _ext.get(weight.device).widen_fp8(weight, dtype)
    return weight.to(dtype)


def is_dense(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s elements fill one block of memory, each once, in any order of dimensions (contiguous,
    channels-last, transposed): the binding's is_non_overlapping_and_dense, which torch does not offer in Python."""
    expected = 1
    for size, stride in sorted(zip(tensor.shape, tensor.stride()), key=lambda pair: pair[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def supports(head_dim: int, dtype: torch.dtype, device: torch.device) -> str | None:
    """None if the kernel covers this case, else a sentence saying why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"device {device} is not a CUDA device"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} is not supported (float16 or bfloat16)"
    if head_dim > MAX_HEAD_DIM:
        return f"head_dim {head_dim} > {MAX_HEAD_DIM}"
    if head_dim % 8 != 0 or head_dim <= 0:
        return f"head_dim {head_dim} is not a multiple of 8"
    if torch.cuda.is_available():
        cap = _capability(device)
        if dtype == torch.bfloat16 and cap < (8, 0):
            return f"bfloat16 needs compute capability >= 8.0, this GPU is {cap[0]}.{cap[1]}"
        if cap < (8, 0) and head_dim > 192:  # 64 KB of shared memory per block is too little for 256
            return f"head_dim {head_dim} > 192 needs compute capability >= 8.0, this GPU is {cap[0]}.{cap[1]}"
    return None


def build_info() -> dict:
    """For `sdrun info`: how the kernel is (or would be) obtained, and what it was built for."""
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "status": _ext.how_loaded()}
    pre = _ext.prebuilt_info()
    if pre is not None:
        info["prebuilt"] = pre
    if torch.cuda.is_available():
        arch = _ext.arch_of()
        info["gpu_arch"] = f"sm_{arch}"
        if not _ext.loaded() and _ext.jit_cached(arch):
            info["status"] = "jit-cached (not loaded yet)"
        elif not _ext.loaded() and pre is not None:
            info["status"] = "prebuilt (not loaded yet)"
        info["jit_cache"] = str(_ext.cache_dir(arch))
        hopper = arch == "90" and (pre is None or "9.0a" in str(pre.get("archs", "")))  # the JIT build adds sm_90a
        info["path"] = ("wgmma + TMA (sm_90a) for head_dim 40, 64, 80 with more than 128 keys; mma.sync otherwise"
                        if hopper else "mma.sync")
    info["archs"] = pre.get("archs") if pre else (info.get("gpu_arch") if _ext.how_loaded().startswith("jit") else None)
    info["nvcc"] = _ext.nvcc_path()
    info["sources"] = str(_ext.source_dir()) if _ext.source_dir() else None
    info["load_errors"] = _ext.errors()
    return info


SELFTEST_SHAPES = ((2, 4096, 8, 40, 4096), (2, 4096, 8, 40, 77), (2, 1024, 8, 80, 1024), (2, 256, 8, 160, 77))


def selftest() -> str:
    """One line: max error against the fp32 reference and against PyTorch SDPA on SD shapes, or why not run."""
    reasons = unavailable_reasons()
    if reasons:
        return "not run: " + reasons[0]
    try:
        load()
    except KernelUnavailable as e:
        return f"not run: {e}"
    gen = torch.Generator(device="cuda").manual_seed(0)
    worst_ref = worst_sdpa = worst_pt = 0.0
    t0 = time.perf_counter()
    for b, n, h, d, nk in SELFTEST_SHAPES:
        q = torch.randn(b, n, h, d, device="cuda", dtype=torch.float16, generator=gen)
        k, v = (torch.randn(b, nk, h, d, device="cuda", dtype=torch.float16, generator=gen) for _ in range(2))
        out = memory_efficient_attention(q, k, v)
        ref = reference_attention(q, k, v)
        sdpa = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
        worst_ref = max(worst_ref, (out - ref).abs().max().item())
        worst_sdpa = max(worst_sdpa, (out - sdpa).abs().max().item())
        worst_pt = max(worst_pt, (sdpa - ref).abs().max().item())
    ok = math.isfinite(worst_ref) and worst_ref <= 2 * worst_pt + 1e-3
    return (f"{'passed' if ok else 'FAILED'}: max error {worst_ref:.2e} vs fp32 reference (PyTorch SDPA: "
            f"{worst_pt:.2e}), {worst_sdpa:.2e} vs SDPA, {len(SELFTEST_SHAPES)} SD shapes in fp16 on "
            f"{torch.cuda.get_device_name()} ({time.perf_counter() - t0:.1f} s)")
