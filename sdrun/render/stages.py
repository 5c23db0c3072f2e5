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
from diffusers.utils.torch_utils import randn_tensor

from sdrun import adapters, ip_adapter, offload
from sdrun.errors import OutOfMemory
from sdrun.render import graphs, images, prompts, sampling, vae
from sdrun.render.forwards import forward_replaced
from sdrun.render.plan import RenderPlan, StagePlan
from sdrun.render.tiling import tiled
from sdrun.render.vae import DecodeNotes, RenderFailed
from sdrun.schedulers import make_scheduler

FEED_FORWARD_CHUNK = 4096  # tokens per feed-forward call when chunked: at 4K, 1/32 of the full-resolution level


class DecodeOutOfMemory(OutOfMemory):
    """The decode ran out of memory even in tiles; the caller kept the latents (Hooks.on_decode_oom)."""


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
    # what the text encoders compute depends on the prompts alone (a prompt's LoRA tags set its LoRA weights, the
    # run's LoRAs and embeddings are fixed): a batch's chunks, and a prompt file's repeats, encode once
    key = (job.prompt, job.negative_prompt, guidance)
    if engine.encoded_prompt is None or engine.encoded_prompt[0] != key:
        encoded = prompts.encode(pipe, engine.family, adapters.without_tags(job.prompt), job.negative_prompt, guidance)
        engine.encoded_prompt = (key, encoded)
    encoded = engine.encoded_prompt[1]
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
    """Pixels -> latents: the mean of the VAE's latent distribution, in the UNet's latent space."""
    latents = vae.encode_pixels(engine, canvas.pixels, canvas.plan if step.tiled else None, canvas.notes)
    canvas.latents = latents.to(canvas.device, engine.pipe.unet.dtype)
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

    def loop(x: torch.Tensor, cond: sampling.Conditioning, timesteps: sampling.Timesteps, scheduler, on_step=None,
             replayed_calls: bool = False):
        """The denoise as a function of its inputs: what a graph records. -> (latents, NanWatch.first_bad)
        `replayed_calls`: run eagerly, but with the denoiser's calls replayed from one recorded call."""
        watch = sampling.NanWatch(x.device)
        model = denoiser(cond)
        if replayed_calls:
            model = graphs.replayed_calls(model, x.device, engine.graphs.stream)

        def after_step(index: int, latents: torch.Tensor) -> None:
            watch(index, latents)
            if on_step is not None:
                on_step()

        return sampling.sample(model, x, scheduler, timesteps, step_kwargs, after_step), watch.first_bad

    def warm_up(x: torch.Tensor, cond: sampling.Conditioning, timesteps: sampling.Timesteps) -> None:
        denoiser(cond)(x, timesteps.device[0])

    def count_step() -> None:
        canvas.steps_done += 1
        if canvas.hooks.on_step is not None:
            canvas.hooks.on_step(canvas.steps_done)

    with torch.no_grad(), chunked_feed_forward(pipe.unet, plan.chunked_feed_forward):
        recording, first_sight = _graph_recording(engine, job, step, canvas, timesteps, loop, warm_up)
        if recording is not None:
            canvas.latents, first_bad = recording.run(canvas.latents, canvas.cond)
            canvas.graphed = True
            for _ in canvas.timesteps:
                count_step()
        else:
            canvas.latents, first_bad = loop(canvas.latents, canvas.cond, timesteps, canvas.scheduler, count_step,
                                             replayed_calls=first_sight)
    bad_step = sampling.first_bad_step(first_bad)
    if bad_step is not None:
        raise RenderFailed(f"the denoiser produced NaN/inf latents at step {bad_step} of {len(canvas.timesteps)}"
                           + sampling.nan_advice(engine))
    return canvas


def _graph_recording(engine, job, step: StagePlan, canvas: Canvas, timesteps: sampling.Timesteps, loop, warm_up):
    """(This denoise's CUDA graph recording (graphs.py), or None to run eagerly; whether the eager loop replays a
    recorded model call instead: the key's first sight, or a loop that cannot be recorded (euler-a), with every
    weight resident). Says once on stderr why a denoise runs eagerly, or replays only its calls."""
    if engine.graphs is None or not len(canvas.timesteps):
        return None, False
    reason = graphs.unavailable(canvas.plan, step, job)
    # under --model-offload a call's hooks move models, which a recording cannot; the loop's recording has the
    # arena (offload.py) for that
    calls_recordable = "model_offload" not in canvas.plan.flags
    if reason is None and (loop_reason := graphs.loop_unavailable(job)) is not None:
        if calls_recordable:
            engine.warn(f"sdrun: CUDA graphs replay this denoise's model calls, not its loop: {loop_reason}")
            return None, True
        reason = loop_reason
    if reason is None:
        weights = adapters.job_weights(engine.adapters.adapters, job) if engine.adapters is not None else ()
        recording_key = graphs.key(canvas.latents, canvas.cond, job.guidance, job.scheduler, step, canvas.plan,
                                   tuple(weights))
        first_sight = calls_recordable and engine.graphs.first_sight(recording_key)
        if recording_key in engine.graphs.seen:  # recorded now or before: the weights it reads stay where they are,
            offload.bring_in_fixed(engine.pipe.unet)  # and a replay runs no forward whose hook would bring them in
        try:
            return engine.graphs.recording(recording_key, loop, canvas.latents, canvas.cond, timesteps,
                                           canvas.scheduler, warm_up), first_sight
        except graphs.RecordingFailed as failed:
            reason = f"recording failed ({failed})"
    engine.warn(f"sdrun: CUDA graphs off for this denoise: {reason}; running eagerly (--no-cuda-graphs: never try)")
    return None, False


def decode(engine, job, step: StagePlan, canvas: Canvas) -> Canvas:
    """Latents -> pixels, with the fallbacks: out of memory -> the memory CUDA graph recordings hold, back for the
    rest of the run, then keep the latents (hook) and decode in tiles."""
    tiles = _tiles(canvas.plan) if step.tiled else None
    try:
        canvas.pixels = vae.decode_latents(engine, canvas.latents, tiles, canvas.notes)
        return canvas
    except torch.OutOfMemoryError:
        if not _graphs_given_up(engine):
            return _decode_on_less_memory(engine, step, canvas)
    try:  # the same decode, with the recordings' memory pools back
        canvas.pixels = vae.decode_latents(engine, canvas.latents, tiles, canvas.notes)
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
        canvas.pixels = vae.decode_latents(engine, canvas.latents, _tiles(canvas.plan), canvas.notes)
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
