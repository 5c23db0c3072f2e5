"""Streaming weights on a GPU (issues 9 and 10): --cpu-offload keeps SD 1.5 at 512x512 under 0.75 GiB, and
--max-vram's partial residency keeps its budget with the image of the resident UNet, and --model-offload saves
the idle models' weights with the same image. The model is the SD 1.5
architecture with seeded random weights (memory does not depend on weight values), a few steps."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.cuda, pytest.mark.slow]


def run(folder: Path, out: Path, *flags) -> tuple[dict, np.ndarray]:
    command = [sys.executable, "-m", "sdrun", "a valley", "--model", str(folder), "--steps", "4", "--seed", "1",
               "--json", "-o", str(out), *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    with Image.open(record["path"]) as image:
        return record | {"stderr": done.stderr}, np.asarray(image).astype(np.float32)


def test_cpu_offload_stays_under_its_figure_with_the_resident_image(sd15_folder, tmp_path):
    _, plain = run(sd15_folder, tmp_path / "plain.png", "--fp16")
    streamed, image = run(sd15_folder, tmp_path / "streamed.png", "--fp16", "--cpu-offload")
    assert streamed["peak_gpu_memory_gb"] <= 0.75
    assert np.abs(image - plain).mean() <= 1.0  # the same weights, the same kernels: fp16 noise at most


def test_partial_residency_keeps_the_budget_and_the_image(sd15_folder, tmp_path):
    _, plain = run(sd15_folder, tmp_path / "plain.png", "--fp16", "--fp8")
    partial, image = run(sd15_folder, tmp_path / "partial.png", "--fp16", "--fp8", "--max-vram", "1.6")
    assert "GiB resident" in partial["stderr"] and "streamed from CPU memory" in partial["stderr"]
    assert partial["peak_gpu_memory_gb"] <= 1.6
    assert np.abs(image - plain).mean() <= 1.0


def test_model_offload_saves_the_idle_models_and_keeps_the_image(sd15_folder, tmp_path):
    resident, plain = run(sd15_folder, tmp_path / "plain.png", "--fp16")
    swapped, image = run(sd15_folder, tmp_path / "swapped.png", "--fp16", "--model-offload")
    assert swapped["peak_gpu_memory_gb"] < resident["peak_gpu_memory_gb"] - 0.2  # the text encoder's 0.23 GiB at least
    assert np.abs(image - plain).mean() <= 1.0
