"""CUDA graphs of the denoising loop (render/graphs.py), through the real CLI on the tiny model: replayed images
match eager ones (the first image's, made from one recorded model call replayed, too), a new size records again,
--no-cuda-graphs stays eager, every scheduler either records or says why not, and --model-offload replays too.
Skipped without CUDA."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, meta, pixels
from sdrun.render import graphs
from sdrun.schedulers import SAMPLERS

pytestmark = pytest.mark.cuda

GRAPHED = ("--steps", "6", "-W", "128", "-H", "128")


def run(sdrun, folder, *args, images=3, model=TINY):
    result = sdrun("a lighthouse at dusk", *model, *GRAPHED, "-n", images, "--seed", "5", "-o", f"{folder}/", *args)
    assert result.exit_code == 0, result
    made = sorted(Path(folder).glob("*.png"))
    assert len(made) == images
    return made, result


def assert_replays_match_eager(sdrun, *args, images=3, model=TINY, tolerance=1 / 255):
    graphed, _ = run(sdrun, "graphed", *args, images=images, model=model)
    eager, _ = run(sdrun, "eager", "--no-cuda-graphs", *args, images=images, model=model)
    assert any(meta(p)["render"]["cuda_graph"] for p in graphed)
    for mine, theirs in zip(graphed, eager):
        assert np.abs(pixels(mine) - pixels(theirs)).max() <= tolerance, mine.name
    return graphed


@pytest.fixture
def recorded_calls(monkeypatch):
    """A list that grows by one for each model call `graphs.replayed_calls` records (one per image replaying its
    calls)."""
    calls = []
    record_call = graphs._record_call
    monkeypatch.setattr(graphs, "_record_call", lambda *a: calls.append(1) or record_call(*a))
    return calls


def test_replayed_calls_run_the_model_twice_and_give_its_values():
    ran = []

    def model(x, t):
        ran.append(t.item() if not torch.cuda.is_current_stream_capturing() else "recorded")
        return x * 2 + t

    call = graphs.replayed_calls(model, torch.device("cuda"), torch.cuda.Stream())
    for step in range(4):
        x, t = torch.randn(2, 4, 8, 8, device="cuda"), torch.tensor(float(step), device="cuda")
        assert torch.equal(call(x, t), x * 2 + t)
    assert ran == [0.0, "recorded"]  # the warm-up and the recording; every call's value came from a replay
    x = torch.randn(1, 4, 8, 8, device="cuda")  # another shape (a copy into the recorded input would broadcast it)
    assert torch.equal(call(x, t), x * 2 + t) and ran[-1] == 3.0  # computed eagerly


@pytest.mark.parametrize("precision", [(), ("--fp16",)])
def test_replayed_images_match_eager_ones(sdrun, precision, recorded_calls):
    graphed, _ = run(sdrun, "graphed", *precision)
    assert recorded_calls == [1]  # the first image replayed one recorded call; the others the recorded loop
    eager, _ = run(sdrun, "eager", "--no-cuda-graphs", *precision)
    assert [meta(p)["render"]["cuda_graph"] for p in graphed] == [False, True, True]  # recorded on the 2nd image
    assert not any(meta(p)["render"]["cuda_graph"] for p in eager)
    for mine, theirs in zip(graphed, eager):
        difference = np.abs(pixels(mine) - pixels(theirs)).max()
        print(precision, mine.name, "max pixel difference replay vs eager", difference)
        assert difference <= (2 / 255 if precision else 1 / 255)
    # the seeds differ image to image, so a replay that repeated its recording's image would fail here
    assert np.abs(pixels(graphed[1]) - pixels(graphed[2])).mean() > 0.01


def test_a_new_size_records_again(sdrun, tmp_path):
    lines = "\n".join('{"prompt": "a lighthouse", "width": %d, "height": %d, "num_images": 2, "seed": 1}' % (s, s)
                      for s in (64, 128, 64))
    (tmp_path / "jobs.jsonl").write_text(lines)
    result = sdrun("--prompt-file", "jobs.jsonl", *TINY, "-o", "out/{index}.png", "--json")
    assert result.exit_code == 0, result
    paths = [record["path"] for record in result.records()]
    graphed = [meta(p)["render"]["cuda_graph"] for p in paths]
    assert graphed == [False, True, False, True, True, True]  # each size on its second image; 64 kept for later
    eager = sdrun("--prompt-file", "jobs.jsonl", *TINY, "-o", "eager/{index}.png", "--json", "--no-cuda-graphs")
    for mine, theirs in zip(paths, [record["path"] for record in eager.records()]):
        assert np.abs(pixels(mine) - pixels(theirs)).max() <= 1 / 255


@pytest.mark.parametrize("scheduler", sorted(SAMPLERS))
def test_every_scheduler_records_or_says_why(sdrun, scheduler, recorded_calls):
    graphed, result = run(sdrun, "graphed", "--scheduler", scheduler)
    eager, _ = run(sdrun, "eager", "--scheduler", scheduler, "--no-cuda-graphs")
    replayed = [meta(p)["render"]["cuda_graph"] for p in graphed]
    print(scheduler, replayed, len(recorded_calls), result.stderr.strip().splitlines()[-3:])
    if scheduler in graphs.SCHEDULERS_DRAWING_NOISE:  # every image replays one recorded model call, its loop eager
        assert not any(replayed) and len(recorded_calls) == len(graphed)
        assert "CUDA graphs replay this denoise's model calls, not its loop" in result.stderr
    elif not any(replayed):
        assert "CUDA graphs off for this denoise" in result.stderr
    for mine, theirs in zip(graphed, eager):
        assert np.abs(pixels(mine) - pixels(theirs)).max() <= 1 / 255


def test_sdxl_replays_match_eager(sdrun, tmp_path):
    """SDXL's added conditioning (pooled text, size ids) is a recording input too."""
    from sd_layout import tiny_sdxl

    tiny_sdxl().save_pretrained(tmp_path / "sdxl")
    assert_replays_match_eager(sdrun, model=("--model", str(tmp_path / "sdxl"), "--steps", "2"))


def test_img2img_replays_match_eager(sdrun, tmp_path):
    """From a strength below 1: a schedule that starts part-way, and latents made from an image."""
    from PIL import Image

    Image.effect_noise((128, 128), 60).convert("RGB").save(tmp_path / "init.png")
    assert_replays_match_eager(sdrun, "--init-image", str(tmp_path / "init.png"), "--strength", "0.6")


def test_a_smaller_last_chunk_records_its_own_graph(sdrun):
    """--batch-size 2 with 5 images: chunks of 2, 2 and 1; the batch of 2 replays, the batch of 1 runs eagerly."""
    graphed = assert_replays_match_eager(sdrun, "--batch-size", "2", images=5)
    assert [meta(p)["render"]["cuda_graph"] for p in graphed] == [False, False, True, True, False]


def test_model_offload_replays_with_the_unet_back_in_its_arena(sdrun):
    """--model-offload: between replays the text encoder and the VAE use the arena the UNet was recorded in, and the
    denoise copies the UNet back before each replay (offload.bring_in_fixed)."""
    graphed = assert_replays_match_eager(sdrun, "--model-offload")
    assert [meta(p)["render"]["cuda_graph"] for p in graphed] == [False, True, True]
