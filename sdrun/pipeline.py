"""Loading: the model once per run, with its backends applied, into an Engine that the render stages use.

    planned = plan_run(run, jobs)          # source, device, backends checked; a render plan per job; no weights
    engine = load(planned.run, reporter, planned.setup)   # weights loaded, backends applied, on the device
    planned.refit(engine)                  # a model its configs did not describe (a Hub id, SD 2 v or epsilon)

The render itself (stages, denoising loop, decode) is in sdrun/render/; files and prompt lists in batch.py.
Planning reads configs only (sdrun/model_source.py); `load` imports the loaders, and with them diffusers and
transformers (seconds), so `sdrun plan` and `--dry-run` never do.
"""

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from sdrun import adapters, backends, checkpoint, lora_file, model_source
from sdrun.backends import vae_fp32
from sdrun.config import RunConfig
from sdrun.errors import UsageError
from sdrun.render.graphs import KEPT, KEPT_UNDER_MAX_VRAM, Graphs
from sdrun.render.images import image_size
from sdrun.render.plan import ESCALATION, ModelInfo, RenderPlan, make_plan


@dataclass
class Engine:
    """A loaded pipeline with its backends applied, plus what metadata needs to describe it."""

    pipe: object
    device: torch.device
    flags: tuple[str, ...]  # backend names in effect, in application order
    model: str  # as given to --model; a local file or folder as an absolute path
    model_name: str  # short name for the A1111 `Model:` field
    family: str
    config_dir: str | None
    base_scheduler: object = field(repr=False, default=None)
    adapters: object = None  # adapters.Loaded: the LoRAs and embeddings in pipe, or None
    note: object = field(repr=False, default=None)  # the reporter's note: a line to the user on stderr
    warned: set = field(repr=False, default_factory=set)
    graphs: object = field(repr=False, default=None)  # render/graphs.Graphs on CUDA unless --no-cuda-graphs
    # ((prompt, negative prompt, guidance), prompts.Encoded) of the last prompt encoded: the stage reuses it
    encoded_prompt: tuple | None = field(repr=False, default=None)

    def warn(self, message: str) -> None:
        """Tell the user once per run, however many chunks of images the same prompt renders in."""
        if self.note is not None and message not in self.warned:
            self.warned.add(message)
            self.note(message)

    @property
    def native_bf16(self) -> bool:
        return vae_fp32.native_bf16(self.device)

    @property
    def native_size(self) -> tuple[int, int]:
        side = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return side, side


@dataclass(frozen=True)
class RunSetup:
    """What check_run found: where the model is, where it runs, and the backends in application order."""

    source: model_source.ModelSource
    device: torch.device
    chosen: tuple  # Backend objects
    vae: Path | None = None  # --vae: a separate VAE, checked
    unet_resident_gib: float | None = None  # --max-vram's partial residency: UNet GiB kept on the GPU at load


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA GPU: use --device cpu (or auto)")
    # The current GPU by its index: cuda:LOCAL_RANK in a process of --gpus (offload takes a bare "cuda" for GPU 0)
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device(name)


def check_run(run: RunConfig, predict_only: bool = False) -> RunSetup:
    """Everything that can be checked before loading: the model source, the device, the backends. With
    `predict_only` (`sdrun plan --device cuda`) the device and flags are taken as given, for a plan of what a
    CUDA GPU would do, on any machine."""
    source = model_source.resolve_model(run.model, run.config_dir)
    vae = model_source.resolve_vae(run.vae)
    chosen = backends.select(run.flags)
    if predict_only:
        device = torch.device("cuda" if run.device == "cuda" else resolve_device(run.device))
        return RunSetup(source, device, chosen, vae)
    device = resolve_device(run.device)
    backends.check(chosen, device)
    if run.max_vram is not None and device.type != "cuda":
        raise UsageError("--max-vram limits GPU memory, but this run is on the CPU: drop --max-vram, or run where "
                         "torch sees a CUDA GPU (`sdrun plan --device cuda --max-vram GB` predicts it anywhere)")
    return RunSetup(source, device, chosen, vae)


def model_info(source: model_source.ModelSource) -> ModelInfo:
    """Family and geometry of the model behind `source`, from its configs or checkpoint header; no weights are
    loaded. A Hub id that is not on disk is assumed to be SD 1.x (the plan says so); loading corrects it."""
    if source.kind == "hub":
        return ModelInfo("sd1", *model_source.geometry(model_source.CONFIGS / "sd1"), assumed=True)
    if source.kind == "tiny":
        family = "tiny"
    elif source.kind == "file":
        family = model_source.file_family(source)
    else:
        family = model_source.folder_family(source.path)
    return ModelInfo(family, *model_source.geometry(config_folder(source, family)))


def config_folder(source: model_source.ModelSource, family: str) -> Path:
    """The diffusers folder whose configs describe a model on disk: its own, --config's, or sdrun's for its family."""
    return source.path if source.kind == "folder" else source.config_dir or model_source.CONFIGS / family


@dataclass
class RunPlans:
    """The checked setup of a run and the render plan of each of its jobs."""

    run: RunConfig  # with the backends --max-vram added, if any
    setup: RunSetup
    info: ModelInfo
    plans: dict  # Job -> RenderPlan
    added: tuple[str, ...] = ()  # ESCALATION names --max-vram added

    def __getitem__(self, job) -> RenderPlan:
        return self.plans[job]

    def refit(self, engine: Engine) -> None:
        """Plan again if the loaded model is not what its configs said (a Hub id, SD 2 v or epsilon)."""
        info = ModelInfo(engine.family, engine.native_size[0], engine.pipe.vae_scale_factor)
        if info != self.info:
            self.info = info
            self.plans = {job: replace(plan, added=self.added)
                          for job, plan in _plan_jobs(self.run, self.setup, info, list(self.plans)).items()}

    def describe(self) -> list[str]:
        lines = []
        for job, plan in self.plans.items():
            lines += [f"plan for {job.prompt!r}:"] + plan.describe()
        if self.info.assumed:
            lines.append(f"({self.run.model} is not on this machine: its family was assumed to be SD 1.x)")
        return lines

    def added_note(self) -> str:
        said = dict(ESCALATION)
        peak = max(plan.peak_gib for plan in self.plans.values())
        return (f"sdrun: --max-vram {self.run.max_vram:g} added " + "; ".join(
            (backends.BY_NAME[name].flag + ": " if name in backends.BY_NAME else "") + said[name]
            + (f" ({self.setup.unet_resident_gib:.2f} GiB resident)" if name == "partial" else "")
            for name in self.added)
            + f" (predicted peak {peak:.2f} GiB)")


def plan_run(run: RunConfig, jobs: list, predict_only: bool = False) -> RunPlans:
    """Check the run and plan every job, before any weights load. With --max-vram, the backends the plans add
    (fp16, tiling, offload) become the run's, since the model loads once with one set of them."""
    setup = check_run(run, predict_only)
    info = model_info(setup.source)
    lora_target = None if info.assumed else lora_file.target(info.family, config_folder(setup.source, info.family))
    run = replace(run, adapters=adapters.resolve(run.adapters, jobs, lora_target))
    jobs = list(dict.fromkeys(jobs))
    plans = _plan_jobs(run, setup, info, jobs)
    added_flags = [name for name in backends.ordered({f for plan in plans.values() for f in plan.flags})
                   if name not in run.flags]
    exact = any(plan.chunked_feed_forward for plan in plans.values())
    resident = _partial_residency(plans.values(), run.flags + tuple(added_flags))
    if added_flags or resident is not None:
        run = replace(run, flags=backends.ordered(run.flags + tuple(added_flags)))
        setup = replace(check_run(run, predict_only), unet_resident_gib=resident)
        plans = _plan_jobs(run, setup, info, jobs)
    chosen = {*added_flags, *(("exact",) if exact and run.max_vram is not None else ()),
              *(("partial",) if resident is not None else ())}
    added = tuple(name for name, _why in ESCALATION if name in chosen)
    plans = {job: replace(plan, added=added) for job, plan in plans.items()}  # what the run added, in the metadata
    return RunPlans(run, setup, info, plans, added)


def _partial_residency(plans, flags: tuple[str, ...]) -> float | None:
    """The UNet GiB the run keeps on the GPU: the least any job's plan needs (the model loads once), or None when no
    plan needs partial residency or an offload flag places the model anyway."""
    needed = [plan.unet_resident_gib for plan in plans if plan.unet_resident_gib is not None]
    if not needed or any(backends.BY_NAME[name].places_pipeline for name in flags):
        return None
    return min(needed)


def _plan_jobs(run: RunConfig, setup: RunSetup, info: ModelInfo, jobs: list) -> dict:
    budget = run.max_vram if run.max_vram is not None else device_memory_gib(setup.device)
    bf16 = not torch.cuda.is_available() or vae_fp32.native_bf16(setup.device)  # no GPU here: plan for a recent one
    return {job: make_plan(run, job, info, setup.device.type,
                           image_size(job.init_image) if job.init_image else None, budget, setup.unet_resident_gib,
                           bf16)
            for job in jobs}


def load(run: RunConfig, reporter, setup: RunSetup) -> Engine:
    """Load the model with its backends applied."""
    source, device, chosen = setup.source, setup.device, setup.chosen
    limit_memory(device, run.max_vram)
    onto = weights_device(setup)
    reads = checkpoint.BackgroundReads(model_source.weights_files(source.path), backends.load_dtype(chosen),
                                       onto) if source.kind == "folder" and onto is not None else None
    from sdrun import models, vae_file  # diffusers and transformers (seconds), while `reads` reads the weights

    for backend in chosen:
        backend.prepare(device)
    with reporter.status(f"Loading {run.model}"):
        pipe = models.load_pipeline(source, torch_dtype=backends.load_dtype(chosen), note=reporter.note,
                                    reads=reads)
        reads = None  # a file it did not take (a component diffusers loaded itself) leaves the device now
        if setup.vae is not None:
            vae_file.replace_vae(pipe, setup.vae, backends.load_dtype(chosen))
        loaded = adapters.load(pipe, run.adapters) if run.adapters else None  # before backends touch the layers
        for backend in chosen:
            note = backend.apply(pipe, device)
            if note:
                reporter.note(note)
        if not any(backend.places_pipeline for backend in chosen):
            if setup.unet_resident_gib is not None:  # before pipe.to, which leaves a streaming UNet where it is
                from sdrun.offload import stream_unet_partly

                reporter.note(stream_unet_partly(pipe.unet, device, setup.unet_resident_gib))
            pipe.to(device)
            for backend in chosen:
                note = backend.placed(pipe)
                if note:
                    reporter.note(note)
    pipe.set_progress_bar_config(disable=True)
    name = source.path.name if source.path is not None else run.model
    return Engine(pipe, device, tuple(b.name for b in chosen), _recorded_path(run.model, source.path), name,
                  pipe.sdrun_family, _recorded_path(run.config_dir, source.config_dir), base_scheduler=pipe.scheduler,
                  adapters=loaded, note=reporter.note,
                  graphs=Graphs(device, KEPT_UNDER_MAX_VRAM if run.max_vram is not None else KEPT)
                  if run.cuda_graphs and device.type == "cuda" else None)


def weights_device(setup: RunSetup) -> torch.device | None:
    """The GPU that a folder's weights are read straight onto, on a thread of their own while the libraries import
    (checkpoint.BackgroundReads), or None: read into CPU memory after the imports, placed afterwards. Straight
    there when the whole pipeline goes there as loaded: not when an offload places it, --fp8 stores it anew on the
    CPU (so that the device never holds both), or part of the UNet streams from the CPU. Not into CPU memory on a
    thread: on a 2-core machine the cast to float32 and the imports share the cores, and the first render began
    1.4-2.4 s later, not sooner (two runs each; runs there vary by seconds)."""
    placed_whole = setup.unet_resident_gib is None and not any(
        backend.places_pipeline or backend.restores_weights for backend in setup.chosen)
    return setup.device if placed_whole and setup.device.type == "cuda" else None


def _recorded_path(spec: str | None, path: Path | None) -> str | None:
    """What the metadata records for --model or --config: a local file or folder as an absolute path, so that
    `sdrun replay` finds it from any folder; 'tiny', a Hub id or a bundled config name as given."""
    if spec is None or path is None or not Path(spec).expanduser().exists():
        return spec
    return os.path.abspath(path)


def scheduler_name(engine: Engine, requested: str | None) -> str:
    from sdrun.schedulers import name_of

    return requested or name_of(engine.base_scheduler)


def limit_memory(device: torch.device, gib: float | None) -> None:
    """--max-vram: make it the allocator's hard limit on this GPU, so the run cannot exceed it."""
    if gib is None or device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), device)


def device_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(device).total_memory / 2**30


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *_):
        self.seconds = time.perf_counter() - self.start
