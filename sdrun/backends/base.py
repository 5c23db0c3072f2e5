"""The shape every memory/speed backend shares: one flag, one file, one `apply` verb.

A backend declares what it needs (`needs_cuda`, `conflicts`) and says why it cannot run as sentences
(`unavailable_reasons`), so the CLI can refuse a flag before any model is loaded and `sdrun info` can show the same
sentences. `prepare` runs before the model loads (for work that can fail, such as building a kernel); `apply`
runs after, on the loaded pipeline.
"""

from dataclasses import dataclass
from typing import Callable

import torch


def _nothing(*_args) -> None:
    return None


def _no_extra_reasons(_device: torch.device) -> list[str]:
    return []


@dataclass(frozen=True)
class Backend:
    name: str  # registry key and module name; the flag is --name with dashes
    help: str  # for --help: what it does, what it saves, what it costs
    apply: Callable = _nothing  # apply(pipe, device) -> optional one-line note for the user
    prepare: Callable = _nothing  # prepare(device), before the model loads; raises SdrunError when it fails
    needs_cuda: bool = False
    conflicts: tuple[str, ...] = ()  # other backend names it cannot be combined with
    places_pipeline: bool = False  # it moves the model to the device itself (offload), instead of pipe.to(device)
    load_dtype: torch.dtype | None = None  # weights are loaded in this dtype (fp16)
    extra_reasons: Callable[[torch.device], list[str]] = _no_extra_reasons

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def unavailable_reasons(self, device: torch.device) -> list[str]:
        """Why this backend cannot run on `device`, as full sentences; empty when it can."""
        if self.needs_cuda and device.type != "cuda":
            why = "no CUDA GPU is visible to torch" if not torch.cuda.is_available() else "this run is on the CPU"
            return [f"{self.flag} needs a CUDA GPU, but {why}"]
        return list(self.extra_reasons(device))
