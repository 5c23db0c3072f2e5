"""`sdrun info`: what this machine can do, as the aligned two-column table `python -m xformers.info` prints.

The flag lines use the same `unavailable_reasons` the CLI checks before a run, so the two never disagree.
"""

import importlib.metadata
import os
import platform

import torch
from rich.console import Console
from rich.table import Table

from sdrun import backends, ops
from sdrun.backends import vae_fp32
from sdrun.backends.xformers import COVERAGE, GEGLU_COVERAGE, LAYER_NORM_COVERAGE, NORM_COVERAGE
from sdrun.render import graphs


# Every environment variable sdrun reads; `sdrun info` shows those that are set (sdrun --help explains them).
ENVIRONMENT = ("SDRUN_MODEL", "SDRUN_DEBUG", "SDRUN_CACHE", "SDRUN_SKIP_CUDA_BUILD", "SDRUN_CUDA_ARCHS", "NVCC_THREADS",
               "SDRUN_TUNE")


def rows(selftest: bool) -> list[tuple[str, str]]:
    import sdrun

    table = [
        ("sdrun", sdrun.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("torch CUDA", torch.version.cuda or "none (CPU build)"),
        # their installed versions, read without importing them (seconds each): info imports what it asks
        *((name, importlib.metadata.version(name)) for name in ("diffusers", "transformers", "accelerate")),
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            table.append((f"gpu {index}", f"{props.name}, compute capability {props.major}.{props.minor}, "
                                          f"{props.total_memory / 2**30:.1f} GiB"))
    else:
        table.append(("gpu", "none visible to torch"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for key, value in ops.build_info().items():
        table.append((f"kernel {key}", str(value)))
    table.append(("kernel attention", COVERAGE))
    table.append(("kernel group norm", NORM_COVERAGE))
    table.append(("kernel GEGLU", GEGLU_COVERAGE))
    table.append(("kernel layer norm", LAYER_NORM_COVERAGE))
    if selftest:
        table.append(("kernel selftest", ops.selftest()))
    for name in ENVIRONMENT:
        if os.environ.get(name):
            table.append((name, os.environ[name]))
    table.append(("cuda graphs", graphs.availability(device)))
    table.append(("sdxl vae", _sdxl_vae(device)))
    for backend in backends.BACKENDS:
        reasons = backend.unavailable_reasons(device)
        table.append((backend.flag, "usable" if not reasons else "unavailable: " + "; ".join(reasons)))
    return table


def _sdxl_vae(device: torch.device) -> str:
    """The dtype SDXL's own VAE computes in with --fp16 (render/vae.vae_dtype), and why."""
    if vae_fp32.native_bf16(device):
        return "bfloat16 with --fp16 (this GPU computes it natively; --vae-fp32: float32)"
    why = "no CUDA GPU is visible to torch" if device.type != "cuda" else "this GPU has no native bfloat16 (sm_80+)"
    return f"float32 with --fp16: {why} (it overflows fp16; a fixed fp16 VAE given with --vae decodes in fp16)"


def report(selftest: bool = True) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for key, value in rows(selftest):
        grid.add_row(key, value)
    # info is the result of this command, so it goes to stdout (a script may want to parse it)
    Console(highlight=False, soft_wrap=True).print(grid)
