"""sdrun's denoising loop, over a diffusers scheduler, and the wrappers that make up its denoiser.

The model k-diffusion uses: `sample(model, x, ...)` calls `model(x, t)` once a step, and everything the step
needs beyond the UNet (guidance, tiling, the NaN check) is a callable wrapped around it:

    model = unet_model(unet, cond)                     # x, t -> the UNet's prediction, for batch x conditioning
    model = guided(model, scale, sequential)           # classifier-free guidance: uncond + s * (cond - uncond)
    model = windows.tiled(model, windows)              # MultiDiffusion-style overlapping windows (tiling.py)
    x = sample(model, x, scheduler, timesteps, step_kwargs, callback)

The scheduler is diffusers' (`set_timesteps`, `scale_model_input`, `step`): sdrun writes no sampler maths. With
the same seed and settings, text-to-image images equal diffusers' own pipeline call (tests/test_render.py).
"""

from dataclasses import dataclass
from typing import Callable

import torch

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Conditioning:
    """Text conditioning of a batch, with the unconditional half first when guidance is on (diffusers' order)."""

    embeds: torch.Tensor  # (halves * batch, tokens, width)
    added: dict | None = None  # SDXL: {"text_embeds": pooled, "time_ids": size conditioning}, same layout;
    # with an IP-Adapter also "image_embeds": a list of tensors, one per adapter, same layout
    halves: int = 2  # 2 with classifier-free guidance (uncond, cond), 1 without

    def map(self, fn) -> "Conditioning":
        """`fn` over every tensor, the added ones too: `cond.map(torch.clone)` is a copy of its own."""
        return Conditioning(fn(self.embeds), _map_added(fn, self.added), self.halves)

    def half(self, index: int) -> "Conditioning":
        """The unconditional (0) or conditional (1) half alone."""
        pick = lambda t: t.chunk(self.halves)[index]  # noqa: E731
        return Conditioning(pick(self.embeds), _map_added(pick, self.added), 1)

    def repeat(self, times: int) -> "Conditioning":
        """Each half tiled `times` times: the conditioning of a batch made of `times` windows of every image,
        window-major (window 1 of every image, then window 2, ...)."""

        def tile(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([h.repeat(times, *[1] * (h.dim() - 1)) for h in t.chunk(self.halves)])

        return Conditioning(tile(self.embeds), _map_added(tile, self.added), self.halves)


def _map_added(fn, added: dict | None) -> dict | None:
    """`fn` over every tensor of the added conditioning (a list of IP-Adapter image embeddings included)."""
    if not added:
        return None
    return {key: [fn(t) for t in value] if isinstance(value, list) else fn(value) for key, value in added.items()}


def unet_model(unet, cond: Conditioning) -> Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]:
    """The UNet as a plain callable: (x, t, cond) -> prediction, with x already scaled for the scheduler."""

    def model(x: torch.Tensor, t: torch.Tensor, cond: Conditioning = cond) -> torch.Tensor:
        return unet(x, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=cond.added, return_dict=False)[0]

    return model


def guided(model, cond: Conditioning, scale: float, sequential: bool) -> Model:
    """Classifier-free guidance around `model`: pred = uncond + scale * (cond - uncond).

    Batched (one UNet call on [x, x], as diffusers does) or `sequential` (two calls of half the batch: the same
    result within rounding, at about half the activation memory, which is what 4K needs)."""

    def denoiser(x: torch.Tensor, t: torch.Tensor, copies: int = 1) -> torch.Tensor:
        """`copies` > 1: x holds that many windows of every image, window-major (tiling.py)."""
        conditioning = cond.repeat(copies) if copies > 1 else cond
        if conditioning.halves == 1:
            return model(x, t, conditioning)
        if sequential:
            uncond = model(x, t, conditioning.half(0))
            text = model(x, t, conditioning.half(1))
        else:
            uncond, text = model(torch.cat([x, x]), t, conditioning).chunk(2)
        return uncond + scale * (text - uncond)

    return denoiser


def sample(model: Model, x: torch.Tensor, scheduler, timesteps: "Timesteps", step_kwargs: dict,
           callback=None) -> torch.Tensor:
    """Denoise `x` over `timesteps` with `scheduler`; `callback(step_index, x)` after every step."""
    for index, t in enumerate(timesteps.host):
        prediction = model(scheduler.scale_model_input(x, t), timesteps.device[index])
        x = scheduler.step(prediction, t, x, **step_kwargs, return_dict=False)[0]
        if callback is not None:
            callback(index, x)
    return x


@dataclass(frozen=True)
class Timesteps:
    """A schedule twice: on the host for the scheduler (its tables are CPU tensors, so no step waits for the GPU,
    which a CUDA graph requires and an eager loop gains from) and on the model's device for the UNet (no copy per
    step). Both are made before the loop: a copy between them inside a CUDA graph recording fails."""

    host: torch.Tensor
    device: torch.Tensor

    @classmethod
    def of(cls, timesteps: torch.Tensor, device: torch.device) -> "Timesteps":
        return cls(timesteps.cpu(), timesteps.to(device))


def kept_steps(steps: int, strength: float) -> int:
    """Model calls of a denoise from `strength`: diffusers' img2img rule (the last int(steps * strength) steps of
    the schedule), but at least one when strength > 0, so a short --hires-steps still refines."""
    if strength >= 1:
        return steps
    return 0 if strength <= 0 else max(1, min(int(steps * strength), steps))


def kept_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
    """The last kept_steps() of the schedule (all of it at strength 1). The scheduler is told to start at the first
    of them, so it never searches its schedule for a timestep, a read of GPU memory that a CUDA graph forbids."""
    start = (steps - kept_steps(steps, strength)) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


class NanWatch:
    """A step callback that remembers the first step whose latents are not finite, on the device: no host sync per
    step (that would stall the launch queue at small sizes, and a CUDA graph cannot hold one); `first_bad_step`
    reads it once, after the loop."""

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def __call__(self, index: int, x: torch.Tensor) -> None:
        bad = ~torch.isfinite(x).all()
        self.first_bad = torch.where(bad & (self.first_bad < 0), index + 1, self.first_bad)


def first_bad_step(first_bad: torch.Tensor) -> int | None:
    """The 1-based step whose latents first became NaN/inf (NanWatch.first_bad), or None."""
    step = int(first_bad.item())
    return step if step >= 0 else None


def nan_advice(engine) -> str:
    """What to do about NaN latents: in half precision they are mostly overflow; in float32, broken weights."""
    if engine.pipe.unet.dtype == torch.float16:
        return " (often fp16 overflow): run again without --fp16"
    return " in float32, which points at broken model weights: check the model file (`sdrun info` shows versions)"
