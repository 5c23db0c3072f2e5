"""The samplers `--scheduler` offers: each a diffusers scheduler class, its settings, and A1111's name for it.

A1111's names go into the PNG `parameters` chunk, so CivitAI and metadata readers show the sampler users know.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sampler:
    cls_name: str  # a class in the diffusers package
    a1111_name: str
    settings: dict = field(default_factory=dict)


SAMPLERS = {
    "ddim": Sampler("DDIMScheduler", "DDIM"),
    "pndm": Sampler("PNDMScheduler", "PLMS", {"skip_prk_steps": True}),  # PLMS proper, as SD 1.5 ships it
    "euler": Sampler("EulerDiscreteScheduler", "Euler"),
    "euler-a": Sampler("EulerAncestralDiscreteScheduler", "Euler a"),
    "dpm++2m": Sampler("DPMSolverMultistepScheduler", "DPM++ 2M"),
    "dpm++2m-karras": Sampler("DPMSolverMultistepScheduler", "DPM++ 2M Karras", {"use_karras_sigmas": True}),
    "unipc": Sampler("UniPCMultistepScheduler", "UniPC"),
    "lms": Sampler("LMSDiscreteScheduler", "LMS"),
}


def make_scheduler(name: str, model_scheduler_config: dict):
    """Build sampler `name` from the model's own scheduler config (keeps its betas and prediction type)."""
    import diffusers  # here, not at the top: `sdrun --help` and usage errors never import it

    sampler = SAMPLERS[name]
    cls = getattr(diffusers, sampler.cls_name)
    return cls.from_config(model_scheduler_config, **sampler.settings)


def name_of(scheduler) -> str:
    """The `--scheduler` name of a scheduler object, for a model's default one too."""
    karras = bool(getattr(scheduler.config, "use_karras_sigmas", False))
    for name, sampler in SAMPLERS.items():
        if type(scheduler).__name__ == sampler.cls_name and karras == bool(sampler.settings.get("use_karras_sigmas")):
            return name
    return type(scheduler).__name__
