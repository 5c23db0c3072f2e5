"""The shape every memory/speed backend shares: one flag, one file, one `apply` verb, its options, its memory effect.

A backend declares what it needs (`needs_cuda`, `conflicts`) and says why it cannot run as sentences
(`unavailable_reasons`), so the CLI can refuse a flag before any model is loaded and `sdrun info` can show the same
sentences. It declares which stages' memory it lowers (`lowers`), which the render planner and the out-of-memory
advice read, and its own options (`--tile-size` for `--vae-tiling`). `prepare` runs before the model loads (for
work that can fail, such as building a kernel); `apply` runs after, on the loaded pipeline; `placed` runs once
the weights are on the device where they stay (not under the offloads, which move them), for work that needs the
weights' final memory.

No torch import at module level: the CLI builds its options from these before torch loads.
"""

from dataclasses import dataclass
from typing import Callable


def _nothing(*_args) -> None:
    return None


def _no_extra_reasons(_device) -> list[str]:
    return []


@dataclass(frozen=True)
class Option:
    """An option of one backend: `--tile-size 512` for `--vae-tiling`. None (the default) lets the planner choose."""

    name: str  # key in RunConfig.backend_options; the option is --name with dashes
    help: str
    minimum: int = 1

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Backend:
    name: str  # registry key and module name; the flag is --name with dashes
    brief: str  # one line for `sdrun --help`: what it saves and what it costs
    help: str  # for `sdrun run --help`: what it does, what it saves, what it costs
    apply: Callable = _nothing  # apply(pipe, device) -> optional one-line note for the user
    prepare: Callable = _nothing  # prepare(device), before the model loads; raises SdrunError when it fails
    placed: Callable = _nothing  # placed(pipe), after pipe.to(device) -> optional one-line note for the user
    needs_cuda: bool = False
    conflicts: tuple[str, ...] = ()  # other backend names it cannot be combined with
    places_pipeline: bool = False  # it moves the model to the device itself (offload), instead of pipe.to(device)
    restores_weights: bool = False  # its apply stores the weights anew (fp8): they load on the CPU, not the device
    load_dtype: str | None = None  # weights are loaded in this torch dtype (fp16: "float16")
    lowers: tuple[str, ...] = ()  # the memory it lowers: "weights", "denoise", "decode" (render/memory.py models it)
    options: tuple[Option, ...] = ()
    extra_reasons: Callable = _no_extra_reasons

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def unavailable_reasons(self, device) -> list[str]:
        """Why this backend cannot run on `device` (a torch.device), as full sentences; empty when it can."""
        if self.needs_cuda and device.type != "cuda":
            import torch

            why = "no CUDA GPU is visible to torch" if not torch.cuda.is_available() else "this run is on the CPU"
            return [f"{self.flag} needs a CUDA GPU, but {why}"]
        return list(self.extra_reasons(device))
