"""The render plan: everything a render will do, decided from the options before any weights load.

    plan = make_plan(run, job, model)     # frozen; what --dry-run and `sdrun plan` print, and the metadata records

A plan lists its stages (text-to-image, img2img and hires are different lists of the same stages), the settings
that shape memory (backends, VAE tiles, diffusion windows, chunked feed-forward, guidance halves one after the
other) and the predicted peak GPU memory of each stage (memory.py). With `--max-vram`, `make_plan` adds the
settings of ESCALATION one by one, cheapest first, until the predicted peak fits, and refuses the run (a usage
error, before loading) when even all of them do not.
"""

import math
from dataclasses import dataclass, replace

from sdrun import backends
from sdrun.config import RunConfig
from sdrun.errors import UsageError
from sdrun.render import graphs, memory
from sdrun.render.tiling import Windows

# What --max-vram may add, in this order: each step costs more speed or changes the image more than the one
# before. "exact" settings give the same image; the others change pixels slightly (tiles) or cost time.
ESCALATION = (
    ("exact", "feed-forward layers in chunks and the two guidance halves one after the other (same image)"),
    ("fp16", "half-precision weights"),
    ("vae_tiling", "VAE decode and encode in tiles"),
    ("fp8", "UNet weights stored in 8 bits (the image changes slightly)"),
    ("partial", "as many UNet blocks on the GPU as fit, the rest streamed from CPU memory"),
    ("model_offload", "only the model in use on the GPU"),
    ("cpu_offload", "each layer on the GPU only while it runs"),
)
# Where one image's UNet pass does not fill the GPU, the guidance halves one after the other cost time: on an H200,
# SDXL at 1024x1024 (128x128 latents) under --max-vram 8 took 1.75 s with them and VAE tiles, 1.50 s with fp8
# alone (1.41 s unconstrained). Up to this many latents "exact" comes after fp8, just before streaming; above it
# (4K: 480x270 latents, a pass that fills the GPU), first.
SMALL_DENOISE_LATENTS = 128 * 128
HEADROOM = 0.92  # plan to this share of the budget: the allocator's fragmentation and cuDNN workspaces need the rest
WINDOW_BATCHES = (16, 8, 4, 2, 1)


@dataclass(frozen=True)
class StagePlan:
    """One stage of a render, at one size."""

    name: str  # encode_prompt | load_image | encode_image | prepare_latents | denoise | decode | upscale
    width: int  # image pixels this stage works at
    height: int
    steps: int = 0  # prepare_latents / denoise: the schedule's length (--steps, or --hires-steps)
    strength: float = 1.0  # prepare_latents / denoise: 1 starts from noise, less from an image
    windows: Windows | None = None  # denoise: tiled diffusion
    tiled: bool = False  # decode / encode_image: in VAE tiles
    peak_gib: float | None = None  # predicted peak GPU memory while this stage runs (CUDA only)

    @property
    def calls(self) -> int:
        """Model calls of a denoise (sampling.kept_steps)."""
        from sdrun.render.sampling import kept_steps

        return kept_steps(self.steps, self.strength)

    def describe(self) -> str:
        text = f"{self.name} {self.width}x{self.height}"
        if self.name == "denoise":
            text += f", {self.calls} steps" + (f" of {self.steps} from strength {self.strength:g}"
                                                if self.strength < 1 else "")
            if self.windows is not None:
                w = self.windows
                text += f", {w.count} windows of {w.size} latents (overlap {w.overlap}, {w.batch} per call)"
        if self.tiled:
            text += ", in tiles"
        return text


@dataclass(frozen=True)
class ModelInfo:
    """What the plan needs to know of the model, read from its configs without loading weights."""

    family: str  # tiny | sd1 | sd2 | sd2-v | sdxl: picks the memory figures
    native: int  # native image side in pixels (the UNet's sample_size x vae_scale)
    vae_scale: int  # image pixels per latent pixel
    assumed: bool = False  # True when the configs could not be read (a Hub id not on disk): SD 1.x assumed

    @property
    def arch(self) -> memory.Architecture:
        return memory.ARCHITECTURES[self.family]

    @property
    def native_latents(self) -> int:
        return self.native // self.vae_scale


@dataclass(frozen=True)
class RenderPlan:
    model: str
    family: str
    device: str
    flags: tuple[str, ...]  # backends in effect, in application order
    stages: tuple[StagePlan, ...]
    vae_tile: int  # pixels, when a stage is tiled
    vae_overlap: int
    chunked_feed_forward: bool
    sequential_guidance: bool
    max_vram: float | None = None
    added: tuple[str, ...] = ()  # what --max-vram added to fit, ESCALATION names
    unet_resident_gib: float | None = None  # partial residency: UNet GiB kept on the GPU, the rest streamed
    vae_dtype: str = "float32"  # what the VAE decodes and encodes in (vae.vae_dtype decides the same at run time)

    @property
    def peak_gib(self) -> float | None:
        peaks = [stage.peak_gib for stage in self.stages if stage.peak_gib is not None]
        return max(peaks) if peaks else None

    def describe(self) -> list[str]:
        lines = [f"model {self.model} ({self.family}) on {self.device}; flags: "
                 + (" ".join("--" + f.replace("_", "-") for f in self.flags) or "none") + f"; VAE in {self.vae_dtype}"]
        if self.chunked_feed_forward or self.sequential_guidance:
            lines.append("feed-forward in chunks, guidance halves one after the other")
        if self.unet_resident_gib is not None:
            lines.append(f"UNet partly resident: {self.unet_resident_gib:.2f} GiB of its weights on the GPU, the rest "
                         "streamed from CPU memory")
        for stage in self.stages:
            peak = f"{stage.peak_gib:6.2f} GiB  " if stage.peak_gib is not None else ""
            lines.append(f"  {peak}{stage.describe()}")
        if self.peak_gib is not None:
            lines.append(f"predicted peak {self.peak_gib:.2f} GiB"
                         + (f" (budget --max-vram {self.max_vram:g})" if self.max_vram else ""))
        return lines

    def record(self) -> dict:
        """For the metadata chunk: enough to see, and for replay to rebuild, how the image was rendered."""
        return {"stages": [stage.describe() for stage in self.stages], "vae_tile": [self.vae_tile, self.vae_overlap],
                "chunked_feed_forward": self.chunked_feed_forward, "sequential_guidance": self.sequential_guidance,
                "predicted_peak_gib": None if self.peak_gib is None else round(self.peak_gib, 2),
                "predicted_stage_peaks_gib": [None if s.peak_gib is None else round(s.peak_gib, 2) for s in self.stages],
                "max_vram": self.max_vram, "added_for_max_vram": list(self.added),
                "unet_resident_gib": self.unet_resident_gib, "vae_dtype": self.vae_dtype}


@dataclass(frozen=True)
class Sizes:
    """The pixel sizes a job renders at."""

    base: tuple[int, int]  # text-to-image / img2img size
    hires: tuple[int, int] | None  # refining target


def job_sizes(job, info: ModelInfo, init_size: tuple[int, int] | None) -> Sizes:
    """-W/-H, else the init image's size (rounded down to 8), else the model's native size; with --hires and no
    -W/-H, the native area at the target's aspect ratio."""
    native = info.native
    if job.hires is not None and job.width is None and job.height is None:
        tw, th = job.hires
        scale = math.sqrt(native * native / (tw * th))
        base = (max(8, round(tw * scale / 8) * 8), max(8, round(th * scale / 8) * 8))
    elif init_size is not None and job.width is None and job.height is None:
        base = (max(8, init_size[0] // 8 * 8), max(8, init_size[1] // 8 * 8))
    else:
        base = (job.width or native, job.height or native)
    if job.hires is not None and (job.hires[0] < base[0] or job.hires[1] < base[1]):
        raise UsageError(f"--hires {job.hires[0]}x{job.hires[1]} is smaller than the base size {base[0]}x{base[1]}: "
                         "give a larger --hires, or smaller -W/-H")
    return Sizes(base, job.hires)


@dataclass(frozen=True)
class Settings:
    """The memory-shaping choices a plan is built from."""

    flags: tuple[str, ...]
    exact: bool  # chunked feed-forward + sequential guidance halves
    window_size: int | None  # latent pixels; None: the model's native latent size
    window_overlap: int | None
    window_batch: int | None  # None: the largest that fits
    vae_tile: int
    vae_overlap: int
    unet_resident_gib: float | None = None  # partial residency; None: the UNet is placed whole (or offloaded)
    native_bf16: bool = True  # the GPU computes bfloat16 in hardware (vae_fp32.native_bf16): SDXL's VAE uses it


def make_plan(run: RunConfig, job, info: ModelInfo, device: str, init_size=None,
              budget: float | None = None, unet_resident_gib: float | None = None,
              native_bf16: bool = True) -> RenderPlan:
    """The plan for one job. `budget` (GiB) is --max-vram, or the GPU's memory when none was given (then only
    exact settings and the window batch are chosen for it). `unet_resident_gib` fixes partial residency (the run
    loads the model once, with the smallest share any of its jobs needs). `native_bf16`: the GPU computes bfloat16
    in hardware (a plan for a GPU not present assumes so)."""
    options = run.backend_options
    settings = Settings(backends.ordered(run.flags), False, _latents(options.get("window_size"), info),
                        _latents(options.get("window_overlap"), info), options.get("window_batch"),
                        *backends.vae_tiles(options), unet_resident_gib, native_bf16)
    _check_tiles(settings, info)
    sizes = job_sizes(job, info, init_size)
    plan = _build(run, job, info, device, sizes, settings, budget)
    if device != "cuda" or budget is None or plan.peak_gib <= budget * HEADROOM:
        return plan
    steps = escalation(sizes, info) if run.max_vram is not None else ESCALATION[:1]
    added = []
    for name, _why in steps:
        if name == "exact":
            settings = replace(settings, exact=True)
        elif name == "partial":
            resident = _resident_that_fits(run, job, info, device, sizes, settings, budget)
            if resident is None:
                continue
            settings = replace(settings, unet_resident_gib=resident)
        elif name not in settings.flags:
            flags = [f for f in settings.flags if not (name == "cpu_offload" and f == "model_offload")]
            settings = replace(settings, flags=backends.ordered(flags + [name]))
        else:
            continue
        added.append(name)
        plan = _build(run, job, info, device, sizes, settings, budget)
        if plan.peak_gib <= budget * HEADROOM:
            plan, added = _without_the_unneeded(run, job, info, device, sizes, settings, budget, plan, added)
            return replace(plan, added=tuple(added) if run.max_vram is not None else ())
    if run.max_vram is None:
        return plan  # the GPU may still manage (the estimate is conservative); an OOM is reported per item
    raise UsageError(f"--max-vram {run.max_vram:g} is below what any setting reaches for {sizes.base[0]}x"
                     f"{sizes.base[1]}" + (f" -> {sizes.hires[0]}x{sizes.hires[1]}" if sizes.hires else "")
                     + f" (at least {plan.peak_gib / HEADROOM:.1f} GiB with every memory setting on): give a larger "
                     "--max-vram, or a smaller size")


def escalation(sizes: Sizes, info: ModelInfo) -> tuple[tuple[str, str], ...]:
    """ESCALATION in the order --max-vram tries it for these sizes (SMALL_DENOISE_LATENTS)."""
    largest = max(width * height for width, height in (sizes.base, sizes.hires or sizes.base)) // info.vae_scale ** 2
    if largest > SMALL_DENOISE_LATENTS:
        return ESCALATION
    exact, rest = ESCALATION[0], ESCALATION[1:]
    at = [name for name, _why in rest].index("partial")
    return rest[:at] + (exact,) + rest[at:]


def _without_the_unneeded(run: RunConfig, job, info: ModelInfo, device: str, sizes: Sizes, settings: Settings,
                          budget: float, plan: RenderPlan, added: list[str]) -> tuple[RenderPlan, list[str]]:
    """Drop the settings added before the last one that the later ones made unneeded, each tried in turn: SDXL
    at 1024x1024 under --max-vram 8 takes VAE tiles, which do not fit it alone, then --fp8, with which its
    untiled decode fits: the tiles go."""
    for name in added[:-1]:
        if name == "partial":  # its share was sized with the settings before it: keep them
            continue
        fewer = replace(settings, exact=False) if name == "exact" else \
            replace(settings, flags=tuple(f for f in settings.flags if f != name))
        candidate = _build(run, job, info, device, sizes, fewer, budget)
        if candidate.peak_gib <= budget * HEADROOM:
            settings, plan, added = fewer, candidate, [n for n in added if n != name]
    return plan, added


def _resident_that_fits(run: RunConfig, job, info: ModelInfo, device: str, sizes: Sizes, settings: Settings,
                        budget: float) -> float | None:
    """The GiB of UNet weights that can stay on the GPU within the budget, the rest streamed; None when partial
    residency does not apply (already chosen, or an offload places the model) or even streaming all does not fit.
    Every stage's peak holds the resident weights, so the room left at the highest peak with none resident is it."""
    if settings.unet_resident_gib is not None or {"model_offload", "cpu_offload"} & set(settings.flags):
        return None
    streamed = _build(run, job, info, device, sizes, replace(settings, unet_resident_gib=0.0), budget)
    room = budget * HEADROOM - streamed.peak_gib
    return math.floor(room * 100) / 100 if room > 0 else None


def _latents(pixels: int | None, info: ModelInfo) -> int | None:
    return None if pixels is None else max(1, pixels // info.vae_scale)


def _check_tiles(settings: Settings, info: ModelInfo) -> None:
    if settings.vae_overlap * 2 >= settings.vae_tile:
        raise UsageError(f"--tile-overlap {settings.vae_overlap} must be less than half of --tile-size "
                         f"{settings.vae_tile}: e.g. --tile-size 512 --tile-overlap 64")
    if settings.window_overlap is not None:
        size = settings.window_size or info.native_latents
        if settings.window_overlap >= size:
            raise UsageError(f"--window-overlap must be less than --window-size ({settings.window_overlap} >= "
                             f"{size} latents): e.g. --window-size 512 --window-overlap 128")


def _build(run: RunConfig, job, info: ModelInfo, device: str, sizes: Sizes, settings: Settings,
           budget: float | None, fixed_addresses: bool = False) -> RenderPlan:
    """The plan for these settings. Under --model-offload, a denoise replayed from a CUDA graph keeps the models
    at fixed addresses (sdrun/offload.py's arena): the plan is then built again with them."""
    arch = info.arch
    fp16 = "fp16" in settings.flags
    fp8 = {part: memory.FP8_SHARES[info.family][part]
           for part, flag in (("unet", "fp8"), ("text", "fp8_text_encoders")) if flag in settings.flags}
    placement = memory.Placement("layer" if "cpu_offload" in settings.flags else
                                 "model" if "model_offload" in settings.flags else "resident", 2 if fp16 else 4,
                                 fp8, settings.unet_resident_gib, fixed_addresses)
    value_bytes = 2 if fp16 else 4
    batch = min(run.batch_size, job.num_images)
    halves = 1 if (settings.exact or job.guidance <= 1) else 2
    tiled_vae = "vae_tiling" in settings.flags
    sliced = "vae_slicing" in settings.flags or tiled_vae
    cuda = device == "cuda"

    def peak(component: str, activations: float) -> float | None:
        return memory.weights_gib(arch, placement, component) + activations if cuda else None

    # the decode's dtype (vae.vae_dtype): float32 with --vae-fp32; SDXL's own VAE (it overflows fp16) in
    # bfloat16 on a GPU with native bf16, else float32. Cast from fp16 weights, its activations take that many bytes
    # a value, and its cast weights sit beside the fp16 ones being replaced
    sdxl_own_vae = fp16 and info.family == "sdxl" and run.vae is None
    vae_bytes = 4 if "vae_fp32" in settings.flags else (2 if settings.native_bf16 else 4) if sdxl_own_vae \
        else value_bytes
    vae_upcast_gib = arch.vae * 1e6 * vae_bytes / memory.GIB if vae_bytes != value_bytes or sdxl_own_vae else 0.0
    vae_dtype = "float32" if vae_bytes == 4 else "bfloat16" if sdxl_own_vae else "float16"

    def vae_stage(name: str, size: tuple[int, int], tiled: bool) -> StagePlan:
        # an image inside one tile is decoded whole: exact, and banded (memory.BANDED_DECODE_SHARE) where a lone
        # tile would not be
        tiled = tiled and (size[0] > settings.vae_tile or size[1] > settings.vae_tile)
        pixels = size[0] * size[1]
        work = min(pixels, settings.vae_tile ** 2) if tiled else pixels
        images = 1 if (sliced or tiled) else batch
        activations = memory.vae_gib(arch, work, pixels, images, vae_bytes, encode=name == "encode_image",
                                     channels_last="channels_last" in settings.flags, tiled=tiled)
        return StagePlan(name, *size, tiled=tiled, peak_gib=peak("vae", activations + vae_upcast_gib))

    def unet_peak(area: int, entries: int) -> float | None:
        return peak("unet", memory.denoise_gib(arch, area, entries, value_bytes, settings.exact))

    def denoise_stage(size: tuple[int, int], steps: int, strength: float, tiled: bool) -> StagePlan:
        latent_h, latent_w = size[1] // info.vae_scale, size[0] // info.vae_scale
        windows = _windows(latent_h, latent_w, settings, info.native_latents,
                           lambda w: unet_peak(w.area, w.batch * batch * halves), budget) if tiled else None
        if windows is not None and windows.count > 1:
            predicted = unet_peak(windows.area, windows.batch * batch * halves)
        else:
            windows, predicted = None, unet_peak(latent_h * latent_w, batch * halves)
        return StagePlan("denoise", *size, steps=steps, strength=strength, windows=windows, peak_gib=predicted)

    base, tiled_diffusion = sizes.base, "tiled_diffusion" in settings.flags
    stages = [StagePlan("encode_prompt", *base, peak_gib=peak("text", memory.TEXT_ACTIVATIONS_GIB))]
    strength = job.strength if job.init_image is not None else 1.0
    if strength < 1:
        stages += [StagePlan("load_image", *base), vae_stage("encode_image", base, tiled_vae)]
    stages += [StagePlan("prepare_latents", *base, steps=job.steps, strength=strength),
               denoise_stage(base, job.steps, strength, tiled_diffusion),
               vae_stage("decode", base, tiled_vae)]
    if sizes.hires is not None:
        steps = job.hires_steps or job.steps
        stages += [StagePlan("upscale", *sizes.hires), vae_stage("encode_image", sizes.hires, True),
                   StagePlan("prepare_latents", *sizes.hires, steps=steps, strength=job.hires_strength),
                   denoise_stage(sizes.hires, steps, job.hires_strength, True),
                   vae_stage("decode", sizes.hires, True)]
    resident = settings.unet_resident_gib if placement.mode == "resident" else None
    plan = RenderPlan(run.model, info.family, device, settings.flags, tuple(stages), settings.vae_tile,
                      settings.vae_overlap, settings.exact, settings.exact and job.guidance > 1, run.max_vram,
                      unet_resident_gib=resident, vae_dtype=vae_dtype)
    replayed = [stage for stage in plan.stages if stage.name == "denoise" and _replayed(plan, stage, job, run)]
    if not replayed:
        return plan
    if placement.mode == "model" and not fixed_addresses:
        return _build(run, job, info, device, sizes, settings, budget, fixed_addresses=True)
    return _with_graph_pools(plan, replayed, memory.weights_gib(arch, placement, "unet"))


def _replayed(plan: RenderPlan, stage: StagePlan, job, run: RunConfig) -> bool:
    return plan.device == "cuda" and run.cuda_graphs and graphs.unavailable(plan, stage, job) is None


def _with_graph_pools(plan: RenderPlan, replayed: list[StagePlan], unet_weights_gib: float) -> RenderPlan:
    """A denoise replayed from a CUDA graph keeps the memory of its activations (the graph's pool) reserved after
    it ends: every later stage's peak holds it (graphs.py; a run under --max-vram keeps one recording)."""
    held, stages = 0.0, []
    for stage in plan.stages:
        stages.append(replace(stage, peak_gib=stage.peak_gib + held) if held and stage.peak_gib is not None
                      else stage)
        if stage in replayed and stage.peak_gib is not None:
            held += stage.peak_gib - unet_weights_gib
    return replace(plan, stages=tuple(stages))


def _windows(latent_h: int, latent_w: int, settings: Settings, native_latents: int, peak_of,
             budget: float | None) -> Windows:
    """The window layout: the model's native latent size with a quarter overlap unless given, and the largest
    window batch whose predicted peak fits the budget (or the one given)."""
    size = settings.window_size or native_latents
    overlap = settings.window_overlap if settings.window_overlap is not None else size // 4
    layout = Windows(latent_h, latent_w, size, overlap, 1)
    batches = (settings.window_batch,) if settings.window_batch else WINDOW_BATCHES
    for batch in batches:
        candidate = replace(layout, batch=min(batch, layout.count))
        predicted = peak_of(candidate)
        if predicted is None or budget is None or predicted <= budget * HEADROOM:
            return candidate
    return replace(layout, batch=1)
