"""CUDA graphs of the denoising loop (render/graphs.py), through the real CLI on the tiny model: replayed images
match eager ones, a new size records again, --no-cuda-graphs stays eager, and every scheduler either records or
says why not. Skipped without CUDA."""

from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, meta, pixels
from sdrun.schedulers import SAMPLERS

pytestmark = pytest.mark.cuda

GRAPHED = ("--steps", "6", "-W", "128", "-H", "128")


def run(sdrun, folder, *args):
    result = sdrun("a lighthouse at dusk", *TINY, *GRAPHED, "-n", "3", "--seed", "5", "-o", f"{folder}/", *args)
    assert result.exit_code == 0, result
    images = sorted(Path(folder).glob("*.png"))
    assert len(images) == 3
    return images, result


@pytest.mark.parametrize("precision", [(), ("--fp16",)])
def test_replayed_images_match_eager_ones(sdrun, precision):
    graphed, _ = run(sdrun, "graphed", *precision)
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
def test_every_scheduler_records_or_says_why(sdrun, scheduler):
    graphed, result = run(sdrun, "graphed", "--scheduler", scheduler)
    eager, _ = run(sdrun, "eager", "--scheduler", scheduler, "--no-cuda-graphs")
    replayed = [meta(p)["render"]["cuda_graph"] for p in graphed]
    print(scheduler, replayed, result.stderr.strip().splitlines()[-3:])
    if not any(replayed):
        assert "CUDA graphs off for this denoise" in result.stderr
    for mine, theirs in zip(graphed, eager):
        assert np.abs(pixels(mine) - pixels(theirs)).max() <= 1 / 255
