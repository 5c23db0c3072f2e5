"""When the denoise is recorded in a CUDA graph and when it says why not (render/graphs.py); the recording itself
is tested on a GPU (tests/test_gpu_graphs.py)."""

import pytest
import torch

from sdrun.config import Job
from sdrun.render import graphs
from sdrun.render.plan import StagePlan
from sdrun.render.tiling import Windows


class Plan:
    def __init__(self, flags=(), max_vram=None, unet_resident_gib=None):
        self.flags, self.max_vram, self.unet_resident_gib = flags, max_vram, unet_resident_gib


SMALL = StagePlan("denoise", 512, 512, steps=20)


@pytest.mark.parametrize("flags, max_vram", [(("fp16", "xformers"), None), (("fp16", "model_offload"), None),
                                             (("fp16", "fp8"), 4.0)])
def test_a_plain_512_denoise_can_be_recorded(flags, max_vram):
    """--model-offload too: its UNet comes back to the addresses a recording reads (offload.py's arena); and under
    --max-vram, whose plan counts the recording's memory in the stages after it."""
    assert graphs.unavailable(Plan(flags, max_vram), SMALL, Job(prompt="x")) is None


@pytest.mark.parametrize("plan, step, job, says", [
    (Plan(("fp16", "cpu_offload")), SMALL, Job(prompt="x"), "--cpu-offload moves weights"),
    (Plan(("fp16", "model_offload"), max_vram=4.0), SMALL, Job(prompt="x"), "under --max-vram, --model-offload"),
    (Plan(max_vram=1.6, unet_resident_gib=1.1), SMALL, Job(prompt="x"), "partial residency streams"),
    (Plan(), StagePlan("denoise", 3840, 2160, steps=20), Job(prompt="x"), "at 3840x2160 the GPU's work"),
    (Plan(), StagePlan("denoise", 512, 512, windows=Windows(64, 96, 64, 16, 2)), Job(prompt="x"), "at 512x512"),
])
def test_why_a_denoise_stays_eager(plan, step, job, says):
    assert says in graphs.unavailable(plan, step, job)


def test_a_scheduler_drawing_noise_bars_the_loop_but_not_its_model_calls():
    job = Job(prompt="x", scheduler="euler-a")
    assert graphs.unavailable(Plan(("fp16",)), SMALL, job) is None
    assert "--scheduler euler-a draws new noise" in graphs.loop_unavailable(job)
    assert graphs.loop_unavailable(Job(prompt="x", scheduler="ddim")) is None


def test_cuda_graphs_flag_is_accepted_on_the_cpu_and_changes_nothing(sdrun, tmp_path):
    from conftest import TINY, pixels

    on = sdrun("a cat", *TINY, "--device", "cpu", "--seed", "1", "-o", "on.png")
    off = sdrun("a cat", *TINY, "--device", "cpu", "--seed", "1", "--no-cuda-graphs", "-o", "off.png")
    assert on.exit_code == off.exit_code == 0, (on, off)
    assert "CUDA graphs" not in on.stderr  # graphs are a CUDA matter: a CPU run has nothing to fall back from
    assert (pixels(tmp_path / "on.png") == pixels(tmp_path / "off.png")).all()


def test_info_says_why_cuda_graphs_are_unavailable_here(sdrun):
    result = sdrun("info", "--no-selftest")
    assert result.exit_code == 0, result
    line = next(line for line in result.stdout.splitlines() if line.startswith("cuda graphs"))
    assert "unavailable: no CUDA GPU is visible to torch" in line


def test_a_key_records_on_its_second_render_and_a_failed_one_is_not_tried_again(monkeypatch):
    made = []

    def record(self, loop, x, cond, timesteps, scheduler, warm_up):
        if loop == "fails":
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        made.append(loop)
        return f"recording of {loop}"

    monkeypatch.setattr(graphs.Graphs, "_record", record)
    run = graphs.Graphs(torch.device("cpu"))
    ask = lambda key, loop=None: run.recording(key, loop or key, None, None, None, None, None)  # noqa: E731
    assert ask("a") is None  # first render of a key: eager (the warm-up, and a one-image run records nothing)
    assert ask("a") == "recording of a" and ask("a") == "recording of a" and made == ["a"]  # recorded once
    assert ask("f", "fails") is None
    with pytest.raises(graphs.RecordingFailed, match="^operation not permitted when stream is capturing$"):
        ask("f", "fails")
    assert ask("f", "fails") is None  # eager from then on, not recorded again
    for key in ("b", "c"):
        ask(key), ask(key)
    assert list(run.recordings) == ["b", "c"]  # KEPT = 2: the least recently used ("a") went
    run.release()  # after an out-of-memory error: the pools go, and a key met again records again
    assert not run.recordings and ask("b") == "recording of b" and made == ["a", "b", "c", "b"]


def test_a_recordings_conditioning_is_a_copy_of_its_own_added_tensors_included():
    from sdrun.render.sampling import Conditioning

    cond = Conditioning(torch.randn(2, 3, 4), {"text_embeds": torch.randn(2, 5), "image_embeds": [torch.randn(2, 1, 6)]})
    own = cond.map(torch.clone)
    pairs = list(zip(graphs._tensors(own), graphs._tensors(cond)))
    assert len(pairs) == 3 and own.halves == cond.halves
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in pairs)
