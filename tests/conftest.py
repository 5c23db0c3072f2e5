"""Shared test setup: markers, an isolated working folder and offline Hub for every test, and a CLI runner.

Markers: `cuda` tests need a CUDA GPU and are skipped without one; `slow` tests take more than a few seconds.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image


def pytest_configure(config):
    # The tiny model is far too small for two CPU threads to pay: with a busy second core, OpenMP's waiting
    # makes a UNet call 30x slower (2.2 s against 0.07 s, measured). Subprocesses inherit OMP_NUM_THREADS.
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    # huggingface_hub reads these once, when first imported: set them before any test imports diffusers
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped when torch sees none")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def isolated(tmp_path, tmp_path_factory, monkeypatch):
    """Each test runs in its own empty folder (the Hub is off for the whole session: pytest_configure), with
    its own cache of file hashes (not the user's)."""
    from sdrun import hashes

    monkeypatch.chdir(tmp_path)
    hash_cache = tmp_path_factory.mktemp("hash-cache") / "hashes.json"
    monkeypatch.setattr(hashes, "cache_file", lambda: hash_cache)
    monkeypatch.delenv("SDRUN_MODEL", raising=False)
    monkeypatch.delenv("SDRUN_DEBUG", raising=False)
    return tmp_path


class Result:
    """What one CLI call did: exit code, stdout, stderr, and stdout parsed as JSON lines when asked."""

    def __init__(self, result):
        self.exit_code = result.exit_code
        self.stdout = result.stdout
        self.stderr = result.stderr
        self.exception = result.exception

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]

    def __repr__(self):
        return f"<exit {self.exit_code}\nstdout: {self.stdout}\nstderr: {self.stderr}>"


@pytest.fixture
def sdrun():
    """Call the real CLI in-process: sdrun("a cat", "--model", "tiny") -> Result."""
    from sdrun.cli import cli

    def invoke(*args, input=None):
        return Result(CliRunner().invoke(cli, [str(a) for a in args], input=input))

    return invoke


TINY = ("--model", "tiny", "--steps", "2")


def _bench_model(tmp_path_factory, family: str) -> Path:
    """bench/flags.py's random-weight model of the full-size `family` architecture, saved as a diffusers folder
    (for the GPU tests: memory and speed do not depend on weight values)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from flags import build

    folder = tmp_path_factory.mktemp(family)
    build(family, folder)
    return folder


@pytest.fixture(scope="session")
def sd15_folder(tmp_path_factory) -> Path:
    """The SD 1.5 architecture with random weights, built once a session."""
    return _bench_model(tmp_path_factory, "sd1")


@pytest.fixture(scope="session")
def full_sdxl_folder(tmp_path_factory) -> Path:
    """The SDXL architecture with random weights, built once a session."""
    return _bench_model(tmp_path_factory, "sdxl")


def pixels(path) -> np.ndarray:
    """A written PNG as float RGB in 0..1."""
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.float32) / 255


def meta(path) -> dict:
    """The sdrun metadata chunk of a written PNG."""
    with Image.open(path) as image:
        return json.loads(image.text["sdrun"])
