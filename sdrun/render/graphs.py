"""CUDA graphs of the denoising loop: a whole denoise recorded once per shape and settings, then replayed.

At 512x512 the eager loop is bound by the host: each step launches hundreds of small kernels, and the GPU waits
for them. A replay launches the recorded kernels of every step at once. The recording holds the whole loop, as the
eager one runs it: every step's UNet calls, the guidance halves, the scheduler's step and the NaN watch, so nothing
runs on the host between steps.

A recording reads its inputs from tensors of its own (the starting latents and the conditioning: `Recording.run`
copies a chunk's into them; the timesteps); everything else it needs is fixed when it is recorded: the
scheduler's constants, the guidance scale, LoRA scales. The key (`key`) holds all of those, so a job that differs
in any of them records its own graph. The weights stay where they were recorded: resident, or, under
--model-offload, brought back to the same addresses in offload.py's arena before each replay.

A key is recorded the second time a run meets it, so a one-image run pays for no recording of its loop. The first
time, the loop runs on the host, but its model calls need not: `replayed_calls` records one denoiser call (the UNet
with its guidance) after a warm-up call, which also warms cuDNN and cuBLAS and loads the kernels lazily, and replays
it for every step; only the scheduler's step and the NaN watch run eagerly between replays. At 512x512 the eager
loop waited on the host for 30-40 ms a step against a replay's 8 ms. Every image of a scheduler that draws new
noise each step (`loop_unavailable`) runs so too: a recorded loop would repeat its noise. `unavailable` says when a
render stays eager and why, in a sentence the run prints once.
"""

import copy
from collections import OrderedDict
from dataclasses import dataclass

import torch

from sdrun.render.sampling import Conditioning, Timesteps

KEPT = 2  # recordings a run keeps (the least recently used goes): each holds the memory of a denoise's activations
KEPT_UNDER_MAX_VRAM = 1  # the planner counts one recording's memory in the stages after a denoise (plan.py)
MAX_PIXELS = 1536 * 1024  # above this the GPU's work, not kernel launches, sets the pace: a graph gains nothing
# they draw new noise each step, which a recorded loop would repeat: their images replay a recorded model call at
# every step instead (the scheduler's step, and its draw, eager between replays)
SCHEDULERS_DRAWING_NOISE = ("euler-a",)


def unavailable(plan, step, job) -> str | None:
    """Why this denoise runs eagerly, as a sentence; None when a CUDA graph can record it."""
    if "cpu_offload" in plan.flags:
        return "--cpu-offload moves weights while each step runs, which a graph cannot record"
    if plan.unet_resident_gib is not None:
        return "partial residency streams UNet weights while each step runs, which a graph cannot record"
    if plan.max_vram is not None and "model_offload" in plan.flags:
        return ("under --max-vram, --model-offload gives each model's memory to the next, and a graph needs the "
                "UNet's to stay reserved")
    if step.windows is not None or step.width * step.height > MAX_PIXELS:
        return (f"at {step.width}x{step.height} the GPU's work, not kernel launches, sets the pace, and a graph "
                "would only hold memory")
    return None


def loop_unavailable(job) -> str | None:
    """Why this denoise's loop cannot be recorded although its model calls can, as a sentence; None when it can.
    Its images then replay one recorded model call at every step, as a size's first image does."""
    if job.scheduler in SCHEDULERS_DRAWING_NOISE:
        return f"--scheduler {job.scheduler} draws new noise every step, which a recorded loop would repeat"
    return None


def availability(device: torch.device) -> str:
    """For `sdrun info`: whether runs here replay their denoise from CUDA graphs, and when not."""
    if device.type != "cuda":
        return "unavailable: no CUDA GPU is visible to torch"
    return (f"on from a size's second image (its first replays one recorded model call, as every image of "
            f"{', '.join(SCHEDULERS_DRAWING_NOISE)} does), up to {MAX_PIXELS // 1024}x1024 (not with --cpu-offload, "
            "partial residency or --model-offload under --max-vram; --no-cuda-graphs turns them off)")


def key(x: torch.Tensor, cond: Conditioning, *settings) -> tuple:
    """What a recording depends on: the shapes of its inputs and the settings it bakes in (hashable values)."""
    return (tuple(x.shape), x.dtype, str(x.device), cond.halves,
            tuple((tuple(t.shape), t.dtype) for t in _tensors(cond)), settings)


def _tensors(cond: Conditioning) -> list[torch.Tensor]:
    """The conditioning's tensors in a fixed order: embeds, then the added ones (IP-Adapter lists flattened)."""
    added = [] if not cond.added else [cond.added[name] for name in sorted(cond.added)]
    return [cond.embeds] + [t for value in added for t in (value if isinstance(value, list) else [value])]


@dataclass
class Recording:
    """A recorded denoise. It reads only tensors it owns (a chunk's inputs are copied into them): a tensor of the
    render that recorded it (its timesteps, say) would be freed and its memory reused by the next render."""

    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    cond: Conditioning
    timesteps: Timesteps  # the same for every chunk of a key; its device copy is the recording's own
    outputs: tuple[torch.Tensor, ...]  # what the loop returned while recording; each replay overwrites them
    # the scheduler copy the loop was recorded with: its tables can be GPU tensors that the steps read (img2img's
    # add_noise moves DDIM's alphas_cumprod to the latents' device), freed and reused if nothing kept them
    scheduler: object
    pool_bytes: int  # GPU memory the recording keeps reserved (its private pool), which peak statistics miss

    def run(self, x: torch.Tensor, cond: Conditioning) -> tuple[torch.Tensor, ...]:
        self.x.copy_(x)
        for mine, given in zip(_tensors(self.cond), _tensors(cond)):
            mine.copy_(given)
        self.graph.replay()
        return tuple(t.clone() for t in self.outputs)


class Graphs:
    """The recordings of one run, and the keys that failed to record (with why), so they are not tried again."""

    def __init__(self, device: torch.device, kept: int = KEPT):
        self.device, self.kept = device, kept
        self._stream = None  # warm-up and recording: the same side stream, as CUDA graphs need (made at the first)
        self.recordings: OrderedDict = OrderedDict()
        self.seen: set = set()
        self.failed: dict = {}

    def release(self) -> None:
        """Drop every recording, and with them their memory pools (after an out-of-memory error): keys met again
        are recorded again."""
        self.recordings.clear()

    @property
    def stream(self) -> torch.cuda.Stream:
        self._stream = self._stream or torch.cuda.Stream(self.device)
        return self._stream

    def first_sight(self, recording_key) -> bool:
        """Whether the loop of this key was never met before (its render replays recorded calls instead)."""
        return recording_key not in self.seen and recording_key not in self.failed

    @property
    def held_bytes(self) -> int:
        return sum(recording.pool_bytes for recording in self.recordings.values())

    def recording(self, recording_key, loop, x: torch.Tensor, cond: Conditioning, timesteps: Timesteps, scheduler,
                  warm_up):
        """The recording for `recording_key`, made now if the key was met before; None: run eagerly this time.

        `loop(x, cond, timesteps, scheduler)` is the denoise to record (it must not synchronise with the host);
        `warm_up(x, cond, timesteps)` runs one model call on the recording stream first. Raises RecordingFailed
        (the reason) when recording fails; the caller runs the loop eagerly, with its own scheduler untouched."""
        if recording_key in self.recordings:
            self.recordings.move_to_end(recording_key)
            return self.recordings[recording_key]
        if recording_key in self.failed or recording_key not in self.seen:
            self.seen.add(recording_key)
            return None
        while len(self.recordings) >= self.kept:
            self.recordings.popitem(last=False)
        try:
            made = self._record(loop, x, cond, timesteps, copy.deepcopy(scheduler), warm_up)
        except Exception as error:  # a loop that cannot be recorded (a host sync inside): eager from now on
            reason = next(iter(str(error).strip().splitlines()), type(error).__name__)
            self.failed[recording_key] = reason
            raise RecordingFailed(reason) from error
        self.recordings[recording_key] = made
        return made

    def _record(self, loop, x: torch.Tensor, cond: Conditioning, timesteps: Timesteps, scheduler,
                warm_up) -> Recording:
        static_x, static_cond = x.clone(), cond.map(torch.clone)
        static_timesteps = Timesteps(timesteps.host, timesteps.device.clone())
        graph, outputs, pool = _recorded(lambda: warm_up(static_x, static_cond, static_timesteps),
                                         lambda: loop(static_x, static_cond, static_timesteps, scheduler),
                                         self.device, self.stream)
        return Recording(graph, static_x, static_cond, static_timesteps, tuple(outputs), scheduler, pool)


def _recorded(warm_up, work, device: torch.device, stream: torch.cuda.Stream):
    """`work()` recorded in a CUDA graph on `stream`, after `warm_up()` there (per-stream state such as cuBLAS's
    workspace, and first-call work, come first) -> (graph, work's outputs, bytes of the graph's memory pool). A
    recording that fails raises, once its work has settled, so the caller can run eagerly."""
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        warm_up()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    reserved = torch.cuda.memory_reserved(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream):
            outputs = work()
    except Exception:
        torch.cuda.synchronize(device)  # the failed recording's work settles before the eager run
        raise
    return graph, outputs, max(0, torch.cuda.memory_reserved(device) - reserved)


def replayed_calls(model, device: torch.device, stream: torch.cuda.Stream):
    """`model` (x, t) -> prediction as a callable that records its first call in a CUDA graph (after a warm-up call
    on `stream`) and replays it for the calls after; the same values as `model`. If the recording fails, every call
    runs `model` eagerly (the loop's own recording, at the key's second sight, says why), and so does a call with
    inputs of other shapes than the recorded one's. The graph and its memory go with the callable."""
    recorded: dict = {}

    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not recorded:
            recorded.update(_record_call(model, x, t, device, stream))
        if recorded["graph"] is None or x.shape != recorded["x"].shape or t.shape != recorded["t"].shape:
            return model(x, t)
        recorded["x"].copy_(x)
        recorded["t"].copy_(t)
        recorded["graph"].replay()
        return recorded["out"].clone()  # multistep schedulers keep earlier predictions; the next replay overwrites

    return call


def _record_call(model, x: torch.Tensor, t: torch.Tensor, device: torch.device, stream) -> dict:
    static_x, static_t = x.clone(), t.clone()
    try:
        graph, out, _ = _recorded(lambda: model(static_x, static_t), lambda: model(static_x, static_t), device,
                                  stream)
    except Exception:  # a model that cannot be recorded: eager, as without graphs
        return {"graph": None}
    return {"graph": graph, "x": static_x, "t": static_t, "out": out}


class RecordingFailed(Exception):
    """The loop could not be recorded; the message says why (for the one-line note)."""
