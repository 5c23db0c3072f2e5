"""The render stages, and `render`, which runs a plan's list of them for one chunk of seeds.

Every stage has one signature, `stage(engine, job, step, canvas) -> canvas`: the loaded model, the job (prompt,
guidance, ...), the stage's StagePlan (size, steps, strength, tiles) and the canvas that carries the work from
stage to stage (conditioning, scheduler, latents, pixels). Text-to-image, img2img and hires are different lists of
these stages (plan.py). Nothing here writes a file.
"""

import contextlib
import inspect
import time
from dataclasses import dataclass, field

import torch
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor

from sdrun import adapters, ip_adapter, offload
from sdrun.errors import OutOfMemory, SdrunError
from sdrun.render import graphs, images, prompts, sampling, shared_norm_tiles
from sdrun.render.plan import RenderPlan, StagePlan
from sdrun.render.tiling import tiled
from sdrun.schedulers import make_scheduler

FEED_FORWARD_CHUNK = 4096  # tokens per feed-forward call when chunked: at 4K, 1/32 of the full-resolution level


class RenderFailed(SdrunError):
    """This item could not be rendered (NaN latents, a VAE that gives NaN even in float32)."""


class DecodeOutOfMemory(OutOfMemory):
    """The decode ran out of memory even in tiles; the caller kept the latents (Hooks.on_decode_oom)."""


@dataclass
class DecodeNotes:
    """How the decodes went, for the image metadata."""

    vae_fp32: bool = False  # decoded in float32, wholly or some tiles, although the model is fp16 (SDXL, NaN retry)
    vae_dtype: str | None = None  # what the last decode computed in ("bfloat16": SDXL's own VAE on a bf16 GPU)
    nan_retry: bool = False  # a decode (or a tile of it) gave NaN, or an image came out black, and was redone in fp32
    tiled_retry: bool = False  # a decode ran out of memory and was redone in tiles

    def record(self) -> dict:
        """For the metadata's "decode" object."""
        return {"vae_fp32": self.vae_fp32, "vae_dtype": self.vae_dtype, "nan_retry": self.nan_retry,
                "tiled_retry": self.tiled_retry}


@dataclass(frozen=True)
class Hooks:
    """What the caller hears during a render."""

    on_step: object = None  # on_step(done): steps done so far over every denoise stage of the plan
    on_decode_oom: object = None  # on_decode_oom(latents): the first decode ran out of memory; keep the latents


@dataclass
class Canvas:
    """The work in progress of one chunk of images, handed from stage to stage."""

    plan: RenderPlan
    generators: list[torch.Generator]  # one CPU generator per image: image k is the same alone or in a batch
    device: torch.device
    hooks: Hooks
    cond: sampling.Conditioning | None = None
    scheduler: object = None
    timesteps: torch.Tensor | None = None
    latents: torch.Tensor | None = None  # what the UNet sees (scaled by the VAE's scaling factor)
    pixels: torch.Tensor | None = None  # (B, 3, H, W) in [-1, 1]
    steps_done: int = 0
    notes: DecodeNotes = field(default_factory=DecodeNotes)
    graphed: bool = False  # a denoise was replayed from a CUDA graph

    @property
    def count(self) -> int:
        return len(self.generators)


# ---------------------------------------------------------------------------------------------- the stages

def encode_prompt(engine, job, step: StagePlan, canvas: Canvas) -> Canvas:
    """Text -> conditioning (prompts.py: any length, A1111 emphasis), the unconditional half first under guidance."""
    pipe, device, guidance, count = engine.pipe, canvas.device, job.guidance > 1, canvas.count
    adapters.activate(pipe, engine.adapters, job)
    encoded = prompts.encode(pipe, engine.family, adapters.without_tags(job.prompt), job.negative_prompt, guidance)
    if encoded.dropped:
        engine.warn(f"sdrun: warning: the prompt is longer than {prompts.MAX_CHUNKS * prompts.CHUNK} tokens; "
                    f"this part of it is ignored: {encoded.dropped!r}")
    embeds = encoded.embeds.repeat(count, 1, 1)
    if guidance:
        embeds = torch.cat([encoded.negative.repeat(count, 1, 1), embeds])
    added = None
    if engine.family == "sdxl":
        pooled = encoded.pooled.repeat(count, 1)
        if guidance:
            pooled = torch.cat([encoded.negative_pooled.repeat(count, 1), pooled])
        added = {"text_embeds": pooled.to(device)}  # prepare_latents adds the size conditioning of each pass
    if engine.adapters is not None and engine.adapters.adapters.ip_adapter:
        run_adapters = engine.adapters.adapters
        added = (added or {}) | {"image_embeds": ip_adapter.image_embeds(pipe, run_adapters, count, guidance, device)}
    canvas.cond = sampling.Conditioning(embeds.to(device), added, 2 if guidance else 1)
    return canvas


def _sdxl_time_ids(pipe, step: StagePlan, dtype: torch.dtype, entries: int) -> torch.Tensor:
    """SDXL's size conditioning (original size, crop, target size) for an image of the stage's size."""
    size = (step.height, step.width)
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    return time_ids.repeat(entries, 1)


def load_image(engine, job, step: StagePlan, canvas: Canvas) -> Canvas:
    """The init image at the stage's size, as pixels in [-1, 1], once per image of the chunk."""
    picture = images.open_image(job.init_image).resize((step.width, step.height))
    pixels = engine.pipe.image_processor.preprocess(picture, height=step.height, width=step.width)
    canvas.pixels = pixels.repeat(canvas.count, 1, 1, 1)
    return canvas


def encode_image(engine, job, step: StagePlan, canvas: Canvas) -> Canvas:
    """Pixels -> latents: the mean of the VAE's latent distribution, in the UNet's latent space, computed in
    `vae_dtype`'s dtype (SDXL's own VAE overflows fp16 encoding too), redone in float32 if not finite."""
    vae = engine.pipe.vae
    dtype = vae_dtype(engine)
    parameters = _vae_encode(vae, canvas.pixels, dtype, canvas.plan if step.tiled else None)
    if not torch.isfinite(parameters).all() and dtype != torch.float32:
        canvas.notes.nan_retry = canvas.notes.vae_fp32 = True
        parameters = _vae_encode(vae, canvas.pixels, torch.float32, canvas.plan if step.tiled else None)
    if not torch.isfinite(parameters).all():
        raise RenderFailed("the VAE's encoder produced NaN from the init image even in float32: the model's VAE "
                           "weights are likely broken")
    mean = parameters[:, : parameters.shape[1] // 2].float()
    canvas.latents = _latent_scaling(vae, mean, to_unet=True).to(canvas.device, engine.pipe.unet.dtype)
    canvas.pixels = None
    return canvas


def prepare_latents(engine, job, step: StagePlan, canvas: Canvas) -> Canvas:
    """A fresh scheduler and the starting latents: noise from the per-image generators (diffusers' randn_tensor,
    so the same seed gives diffusers' image), or, from strength < 1, that noise added to the encoded image at
    the first kept timestep. Strength 1 is exactly text-to-image, the image ignored."""
    unet, scale = engine.pipe.unet, engine.pipe.vae_scale_factor
    shape = (canvas.count, unet.config.in_channels, step.height // scale, step.width // scale)
    if engine.family == "sdxl":  # each pass is conditioned on its own size (a --hires refine, larger)
        time_ids = _sdxl_time_ids(engine.pipe, step, canvas.cond.embeds.dtype, len(canvas.cond.embeds))
        canvas.cond.added["time_ids"] = time_ids.to(canvas.device)
    noise = randn_tensor(shape, generator=canvas.generators, device=canvas.device, dtype=canvas.cond.embeds.dtype)
    scheduler = make_scheduler(job.scheduler, engine.base_scheduler.config) if job.scheduler \
        else type(engine.base_scheduler).from_config(engine.base_scheduler.config)
    scheduler.set_timesteps(step.steps, device=canvas.device)
    canvas.scheduler = scheduler
    canvas.timesteps = sampling.kept_timesteps(scheduler, step.steps, step.strength)
    if step.strength >= 1:
        canvas.latents = noise * scheduler.init_noise_sigma
    elif len(canvas.timesteps):
        canvas.latents = scheduler.add_noise(canvas.latents, noise, canvas.timesteps[:1].repeat(canvas.count))
    return canvas


def denoise(engine, job, step: StagePlan, canvas: Canvas) -> Canvas:
    """sdrun's denoising loop over the denoiser UNet -> guidance -> windows, with the NaN watch; replayed from a
    CUDA graph where one can record it (graphs.py)."""
    plan, pipe = canvas.plan, engine.pipe
    accepted = inspect.signature(canvas.scheduler.step).parameters  # DDIM takes eta, the ancestral ones a generator
    step_kwargs = {k: v for k, v in (("eta", 0.0), ("generator", canvas.generators)) if k in accepted}

    timesteps = sampling.Timesteps.of(canvas.timesteps, canvas.device)

    def denoiser(cond: sampling.Conditioning):
        model = sampling.guided(sampling.unet_model(pipe.unet, cond), cond, job.guidance, plan.sequential_guidance)
        return tiled(model, step.windows) if step.windows is not None else model

    def loop(x: torch.Tensor, cond: sampling.Conditioning, timesteps: sampling.Timesteps, scheduler, on_step=None):
        """The denoise as a function of its inputs: what a graph records. -> (latents, NanWatch.first_bad)"""
        watch = sampling.NanWatch(x.device)

        def after_step(index: int, latents: torch.Tensor) -> None:
            watch(index, latents)
            if on_step is not None:
                on_step()

        return sampling.sample(denoiser(cond), x, scheduler, timesteps, step_kwargs, after_step), watch.first_bad

    def warm_up(x: torch.Tensor, cond: sampling.Conditioning, timesteps: sampling.Timesteps) -> None:
        denoiser(cond)(x, timesteps.device[0])

    def count_step() -> None:
        canvas.steps_done += 1
        if canvas.hooks.on_step is not None:
            canvas.hooks.on_step(canvas.steps_done)

    with torch.no_grad(), chunked_feed_forward(pipe.unet, plan.chunked_feed_forward):
        recording = _graph_recording(engine, job, step, canvas, timesteps, loop, warm_up)
        if recording is not None:
            canvas.latents, first_bad = recording.run(canvas.latents, canvas.cond)
            canvas.graphed = True
            for _ in canvas.timesteps:
                count_step()
        else:
            canvas.latents, first_bad = loop(canvas.latents, canvas.cond, timesteps, canvas.scheduler, count_step)
    bad_step = sampling.first_bad_step(first_bad)
    if bad_step is not None:
        raise RenderFailed(f"the denoiser produced NaN/inf latents at step {bad_step} of {len(canvas.timesteps)}"
                           + _nan_advice(engine))
    return canvas


def _graph_recording(engine, job, step: StagePlan, canvas: Canvas, timesteps: sampling.Timesteps, loop, warm_up):
    """This denoise's CUDA graph recording (graphs.py), or None to run eagerly; says once on stderr why not."""
    if engine.graphs is None or not len(canvas.timesteps):
        return None
    reason = graphs.unavailable(canvas.plan, step, job)
    if reason is None:
        weights = adapters.job_weights(engine.adapters.adapters, job) if engine.adapters is not None else ()
        recording_key = graphs.key(canvas.latents, canvas.cond, job.guidance, job.scheduler, step, canvas.plan,
                                   tuple(weights))
        if recording_key in engine.graphs.seen:  # recorded now or before: the weights it reads stay where they are,
            offload.bring_in_fixed(engine.pipe.unet)  # and a replay runs no forward whose hook would bring them in
        try:
            return engine.graphs.recording(recording_key, loop, canvas.latents, canvas.cond, timesteps,
                                           canvas.scheduler, warm_up)
        except graphs.RecordingFailed as failed:
            reason = f"recording failed ({failed})"
    engine.warn(f"sdrun: CUDA graphs off for this denoise: {reason}; running eagerly (--no-cuda-graphs: never try)")
    return None


def decode(engine, job, step: StagePlan, canvas: Canvas) -> Canvas:
    """Latents -> pixels, with the fallbacks: out of memory -> the memory CUDA graph recordings hold, back for the
    rest of the run, then keep the latents (hook) and decode in tiles."""
    tiles = _tiles(canvas.plan) if step.tiled else None
    try:
        canvas.pixels = decode_latents(engine, canvas.latents, tiles, canvas.notes)
        return canvas
    except torch.OutOfMemoryError:
        if not _graphs_given_up(engine):
            return _decode_on_less_memory(engine, step, canvas)
    try:  # the same decode, with the recordings' memory pools back
        canvas.pixels = decode_latents(engine, canvas.latents, tiles, canvas.notes)
        return canvas
    except torch.OutOfMemoryError:
        return _decode_on_less_memory(engine, step, canvas)


def _graphs_given_up(engine) -> bool:
    """Drop the run's CUDA graph recordings, whose memory pools stay reserved between replays, and record no more
    (under a tight --max-vram the allocator's rounding of two pools can take the decode's last 100 MiB); False
    when none are held."""
    if engine.graphs is None or not engine.graphs.recordings:
        return False
    engine.graphs.release()
    engine.graphs = None
    torch.cuda.empty_cache()
    engine.warn("sdrun: CUDA graphs off for the rest of this run: the decode needed the memory their recording "
                "holds (a larger --max-vram keeps them)")
    return True


def _decode_on_less_memory(engine, step: StagePlan, canvas: Canvas) -> Canvas:
    """The decode ran out of memory: keep the latents (hook), then decode in tiles."""
    if step.tiled:
        raise DecodeOutOfMemory("out of GPU memory decoding even in VAE tiles") from None
    if canvas.hooks.on_decode_oom is not None:
        canvas.hooks.on_decode_oom(canvas.latents)
    if canvas.device.type == "cuda":
        torch.cuda.empty_cache()
    canvas.notes.tiled_retry = True
    try:
        canvas.pixels = decode_latents(engine, canvas.latents, _tiles(canvas.plan), canvas.notes)
    except torch.OutOfMemoryError:
        raise DecodeOutOfMemory("out of GPU memory decoding even in VAE tiles") from None
    return canvas


def upscale(engine, job, step: StagePlan, canvas: Canvas) -> Canvas:
    """Pixels -> the stage's size, bicubic: the refining pass that follows redraws the detail."""
    pixels = torch.nn.functional.interpolate(canvas.pixels.float(), size=(step.height, step.width), mode="bicubic")
    canvas.pixels = pixels.clamp(-1, 1)
    return canvas


STAGES = {stage.__name__: stage for stage in (encode_prompt, load_image, encode_image, prepare_latents, denoise,
                                              decode, upscale)}


# ---------------------------------------------------------------------------------------------- helpers

def _tiles(plan: RenderPlan) -> tuple[int, int]:
    return plan.vae_tile, plan.vae_overlap


def _vae_encode(vae, pixels: torch.Tensor, dtype: torch.dtype, tiled_plan: RenderPlan | None) -> torch.Tensor:
    """The encoder's latent-distribution parameters, in the plan's VAE tiles when given."""
    with _computing_in(vae, dtype), torch.no_grad():
        pixels = pixels.to(get_module_execution_device(vae), dtype)
        if tiled_plan is not None:
            return shared_norm_tiles.encode(vae, pixels, tiled_plan.vae_tile, tiled_plan.vae_overlap)
        return vae.encode(pixels).latent_dist.parameters


def decode_latents(engine, latents: torch.Tensor, tiles: tuple[int, int] | None, notes: DecodeNotes):
    """Latents -> pixels in [-1, 1], in VAE tiles of (size, overlap) image pixels when `tiles` is given, in
    `vae_dtype`'s dtype. A decoder call whose output is not finite (the whole image, or one tile of a tiled
    decode) is redone in float32, that call only; an all-black output is decoded again in float32."""
    if not torch.isfinite(latents).all():
        raise RenderFailed("the denoiser produced NaN/inf latents" + _nan_advice(engine))
    vae = engine.pipe.vae
    dtype = vae_dtype(engine)
    pixels = _vae_decode(vae, latents, dtype, tiles, notes)
    if not torch.isfinite(pixels).all() or bool((pixels <= -1).all()):
        notes.nan_retry, dtype = True, torch.float32
        pixels = _vae_decode(vae, latents, dtype, tiles, notes)
        if not torch.isfinite(pixels).all():
            raise RenderFailed("the VAE produced NaN even in float32: the model's VAE weights are likely broken")
    notes.vae_fp32 |= dtype == torch.float32 and vae.dtype != torch.float32
    notes.vae_dtype = str(dtype).removeprefix("torch.")
    return pixels


def vae_dtype(engine) -> torch.dtype:
    """What the VAE decodes and encodes in (plan._build predicts the same): float32 with --vae-fp32. SDXL's own VAE, whose
    config says force_upcast, gives NaN in fp16 on real images (the reason the fp16-fix VAE exists, whose config
    says force_upcast false): it decodes in bfloat16, which has float32's range at fp16's memory, where the GPU
    computes bf16 natively (on an H200 at 1024x1024: 2.4 against 4.9 GiB above the weights, 88 against 117 ms,
    0.5/255 from float32's pixels on average; ComfyUI and Forge do the same), else in float32. Any other VAE
    decodes in its own dtype: a --vae file has no config of its own, so it is tried in fp16 (vae_file.py), and SD
    1.x/2.x VAEs carry force_upcast too but decode fine in fp16, as diffusers' own SD pipeline does (upcasting them
    cost 0.75 GiB at 512x512 and 2.5 GiB at 1024x1024 on an H200)."""
    vae = engine.pipe.vae
    if "vae_fp32" in engine.flags:
        return torch.float32
    if vae.dtype == torch.float16 and engine.family == "sdxl" and bool(getattr(vae.config, "force_upcast", False)):
        return torch.bfloat16 if engine.native_bf16 else torch.float32
    return vae.dtype


def _nan_advice(engine) -> str:
    """What to do about NaN latents: in half precision they are mostly overflow; in float32, broken weights."""
    if engine.pipe.unet.dtype == torch.float16:
        return " (often fp16 overflow): run again without --fp16"
    return " in float32, which points at broken model weights: check the model file (`sdrun info` shows versions)"


def _vae_decode(vae, latents: torch.Tensor, dtype: torch.dtype, tiles: tuple[int, int] | None,
                notes: DecodeNotes) -> torch.Tensor:
    """Decode (in tiles when given) in `dtype`; below float32, a call that overflows is redone in float32."""
    with _computing_in(vae, dtype):
        scaled = _latent_scaling(vae, latents.float(), to_unet=False)
        scaled = scaled.to(get_module_execution_device(vae), dtype)
        guard = _upcast_overflowing(vae.decoder, notes) if dtype != torch.float32 else contextlib.nullcontext()
        with torch.no_grad(), guard:
            if tiles is not None:
                return shared_norm_tiles.decode(vae, scaled, *tiles)
            return vae.decode(scaled, return_dict=False)[0]


@contextlib.contextmanager
def _computing_in(vae, dtype: torch.dtype):
    """The VAE's weights in `dtype` for the block only: they stay stored as loaded (fp16 beside an fp16 UNet)."""
    stored = vae.dtype
    if dtype != stored:
        vae.to(dtype=dtype)
    try:
        yield
    finally:
        if dtype != stored:
            vae.to(dtype=stored)


@contextlib.contextmanager
def _upcast_overflowing(decoder, notes: DecodeNotes):
    """Redo a decoder call (a tiled decode makes one a tile, and one its statistics pass) whose output is not finite
    in float32, and hand back its result in the decoder's dtype: only the tiles that overflow pay for float32."""
    forward = decoder.forward

    def guarded(sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = forward(sample, *args, **kwargs)
        if torch.isfinite(out).all():
            return out
        notes.nan_retry = notes.vae_fp32 = True
        decoder.to(dtype=torch.float32)
        try:
            # pixels are clamped to [-1, 1] when they become an image: clamping to the dtype's range first loses
            # nothing, and keeps a float32 value past it from turning into inf again
            limit = torch.finfo(out.dtype).max
            return forward(sample.float(), *args, **kwargs).clamp(-limit, limit).to(out.dtype)
        finally:
            decoder.to(dtype=out.dtype)

    with forward_replaced(decoder, guarded):
        yield


@contextlib.contextmanager
def forward_replaced(module, forward):
    """`module.forward` is `forward` for the block, then what it was: the class's, or the wrapper an offload hook
    put on the module (accelerate's and diffusers' hooks are such wrappers; deleting ours would delete theirs)."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


def _latent_scaling(vae, latents: torch.Tensor, to_unet: bool) -> torch.Tensor:
    """Between the VAE's latent space and the UNet's: the scaling factor, and SDXL-style mean/std where given."""
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        return (latents - mean) * config.scaling_factor / std if to_unet else latents * std / config.scaling_factor + mean
    return latents * config.scaling_factor if to_unet else latents / config.scaling_factor


@contextlib.contextmanager
def chunked_feed_forward(unet, on: bool):
    """Run every transformer block's feed-forward over FEED_FORWARD_CHUNK tokens at a time: its GEGLU activations
    (8x the block's width per token) are the UNet's largest at big sizes; the result is the same (row-wise op)."""
    if not on:
        yield
        return
    from diffusers.models.attention import FeedForward

    with contextlib.ExitStack() as patched:
        for module in [m for m in unet.modules() if isinstance(m, FeedForward)]:
            patched.enter_context(forward_replaced(module, _chunked(module.forward)))
        yield


def _chunked(forward):
    def run(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if hidden_states.shape[1] <= FEED_FORWARD_CHUNK:
            return forward(hidden_states, *args, **kwargs)
        parts = [forward(part, *args, **kwargs) for part in hidden_states.split(FEED_FORWARD_CHUNK, dim=1)]
        return torch.cat(parts, dim=1)

    return run


# ---------------------------------------------------------------------------------------------- render

@dataclass
class Rendered:
    images: list  # PIL images, one per seed
    notes: DecodeNotes
    stage_peaks: list[float]  # measured peak GiB of each stage (CUDA only), in plan order
    stage_seconds: list[float]
    cuda_graph: bool  # the denoise was replayed from a CUDA graph


def render(engine, plan: RenderPlan, job, seeds: list[int], hooks: Hooks = Hooks()) -> Rendered:
    """Run `plan`'s stages for one image per seed and return PIL images."""
    device = engine.device
    canvas = Canvas(plan, [torch.Generator("cpu").manual_seed(seed) for seed in seeds], device, hooks)
    peaks, seconds = [], []
    for step in plan.stages:
        start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        canvas = STAGES[step.name](engine, job, step, canvas)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # once a stage: what each stage costs is part of the plan's record
            held = engine.graphs.held_bytes if engine.graphs is not None else 0  # graph pools: reserved throughout
            peaks.append(round((torch.cuda.max_memory_allocated(device) + held) / 2**30, 3))
        seconds.append(round(time.perf_counter() - start, 3))
    engine.pipe.maybe_free_model_hooks()
    return Rendered(engine.pipe.image_processor.postprocess(canvas.pixels.float(), output_type="pil"),
                    canvas.notes, peaks, seconds, canvas.graphed)
