"""Broken and hostile model files through the real CLI (issue 12): each fails with one line naming the problem and
the fix, exit 1, in bounded time, running none of the file's code; what is only odd (stray non-text keys, the key
layout diffusers' conversion script writes under transformers 5) loads."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import TINY
from sd_layout import pipeline_to_original, tiny_folder
from sdrun import models
from sdrun.model_source import CONFIGS
from sdrun.models import build_tiny

TINY_CONFIG = ("--config", str(CONFIGS / "tiny"))
UNET_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.fixture(scope="module")
def state() -> dict:
    """The tiny pipeline in the original single-file layout (tests copy it before changing it)."""
    return pipeline_to_original(build_tiny())


def refused(result, *fragments) -> str:
    """The run failed with exit 1 and one error line holding every fragment; returns that line."""
    assert result.exit_code == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdrun: error: ") and "Traceback" not in result.stderr, result
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def generate(sdrun, model, *args):
    return sdrun("a fox", "--model", model, "--steps", "1", "-W", "64", "-H", "64", *args)


# --- .ckpt pickles -----------------------------------------------------------------------------------------------


def test_ckpt_with_non_text_keys_loads_its_weights(sdrun, state):
    torch.save({"state_dict": {**state, 1: torch.zeros(1), (2, 3): torch.zeros(1)}}, "odd.ckpt")
    result = generate(sdrun, "odd.ckpt", *TINY_CONFIG)
    assert result.exit_code == 0, result


def test_ckpt_in_the_legacy_format_loads(sdrun, state):
    """torch.save before torch 1.6 wrote pickles in a row, no zip: checked and unpickled like the zip format."""
    torch.save({"state_dict": state}, "legacy.ckpt", _use_new_zipfile_serialization=False)
    result = generate(sdrun, "legacy.ckpt", *TINY_CONFIG)
    assert result.exit_code == 0, result


def test_ckpt_with_only_non_text_keys_is_no_checkpoint(sdrun):
    torch.save({"state_dict": {1: torch.zeros(1), None: torch.zeros(2)}}, "keys.ckpt")
    refused(generate(sdrun, "keys.ckpt"), "is not a Stable Diffusion checkpoint", "original layout")


def test_self_referencing_pickle_fails_in_bounded_time(tmp_path):
    """A dict that is its own "state_dict" sent sdrun's and diffusers' `while "state_dict" in ...` round forever
    (torch.load itself returns it at once): a real process, so that a regression times out instead of hanging."""
    loop = {UNET_CONV_IN: torch.zeros(32, 4, 3, 3)}
    loop["state_dict"] = loop
    torch.save(loop, tmp_path / "loop.ckpt")
    run = subprocess.run([sys.executable, "-m", "sdrun", "a fox", "--model", "loop.ckpt", "--steps", "1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(Path(models.__file__).parents[1])})
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert "not a Stable Diffusion checkpoint" in run.stderr, run.stderr


class ShellCommand:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_ckpt_that_would_run_a_shell_command_is_refused_without_running_it(sdrun, state, isolated):
    marker = isolated / "ran"
    torch.save({"state_dict": state, "hook": ShellCommand(marker)}, "evil.ckpt")
    refused(generate(sdrun, "evil.ckpt"), "needs pickled code", "never runs", "convert it to .safetensors")
    assert not marker.exists()


def test_ckpt_pickling_megabytes_of_objects_is_refused_before_unpickling(sdrun):
    torch.save({"state_dict": {}, "junk": list(range(2_000_000))}, "huge.ckpt")  # a 10 MB pickle
    refused(generate(sdrun, "huge.ckpt"), "pickles more than 8 MiB")


def test_ckpt_with_compressed_members_is_refused(sdrun, state, tmp_path):
    """torch.save stores zip members uncompressed; a compressed one could inflate to any size."""
    torch.save({"state_dict": state}, tmp_path / "plain.ckpt")
    with zipfile.ZipFile(tmp_path / "plain.ckpt") as source, \
            zipfile.ZipFile("packed.ckpt", "w", zipfile.ZIP_DEFLATED) as packed:
        for member in source.infolist():
            packed.writestr(member.filename, source.read(member))
    refused(generate(sdrun, "packed.ckpt"), "corrupt or truncated")


# --- tensors of the wrong shape ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "tensor", "fragment"), [
    (UNET_CONV_IN, torch.tensor(1.0), "holds a single number where the weight tensor"),
    ("first_stage_model.decoder.conv_in.weight", torch.tensor(1.0), "holds a single number where the weight"),
    (UNET_CONV_IN, torch.zeros(5, 3), "in the shape [5, 3], where a 4-dimensional weight belongs"),
    ("model.diffusion_model.output_blocks.0.1.transformer_blocks.0.attn2.to_k.weight", torch.zeros(8),
     "where a 2-dimensional weight belongs"),
    (UNET_CONV_IN, torch.zeros(4, 4, 3, 3), "conv_in.weight expected shape"),  # right rank, wrong size
    ("first_stage_model.encoder.mid.attn_1.q.weight", torch.zeros(3), "pass --config"),
    ("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight", torch.zeros(2, 2, 2),
     "pass --config"),
])
def test_safetensors_with_a_wrongly_shaped_tensor(sdrun, state, key, tensor, fragment):
    save_file({**state, key: tensor}, "bad.safetensors")
    refused(generate(sdrun, "bad.safetensors", *TINY_CONFIG), fragment, "bad.safetensors")


def test_transformers_5_text_encoder_layout_loads(sdrun, state):
    """diffusers' conversion script writes CLIPTextModel's keys as transformers 5 names them, without `text_model.`"""
    prefix = "cond_stage_model.transformer."
    flat = {key.replace(prefix + "text_model.", prefix): value for key, value in state.items()}
    assert not any(key.startswith(prefix + "text_model.") for key in flat)
    save_file(flat, "flat.safetensors")
    save_file(state, "nested.safetensors")
    assert generate(sdrun, "nested.safetensors", *TINY_CONFIG, "--seed", "1", "-o", "a.png").exit_code == 0
    result = generate(sdrun, "flat.safetensors", *TINY_CONFIG, "--seed", "1", "-o", "b.png")
    assert result.exit_code == 0, result
    assert np.array_equal(np.asarray(Image.open("a.png")), np.asarray(Image.open("b.png")))


# --- diffusers folders and --config folders ----------------------------------------------------------------------


@pytest.mark.parametrize(("index", "fragment"), [
    ("{}", "names no class as its pipeline"),
    ("{not json", "model_index.json' is not valid JSON (Expecting property name"),
    ("[]", "holds a JSON list, not an object"),
    ('{"_class_name": "FooPipeline"}', "names 'FooPipeline' as its pipeline"),
    ('{"_class_name": "AutoencoderKL"}', "names 'AutoencoderKL' as its pipeline"),
    ('{"_class_name": "StableDiffusionInpaintPipeline"}', "not a Stable Diffusion text-to-image one"),
    ('{"_class_name": 5}', "names no class"),
])
def test_folder_with_a_broken_model_index(sdrun, isolated, index, fragment):
    folder = tiny_folder(isolated / "model")
    (folder / "model_index.json").write_text(index)
    refused(generate(sdrun, folder), fragment)


@pytest.mark.parametrize("part", ["unet/config.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json"])
def test_folder_with_a_broken_config_file(sdrun, isolated, part):
    folder = tiny_folder(isolated / "model")
    (folder / part).write_text('{"a": 1,')
    refused(generate(sdrun, folder), f"{part}' is not valid JSON", "save it again with save_pretrained")


def test_folder_whose_config_has_wrong_types(sdrun, isolated):
    folder = tiny_folder(isolated / "model")
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "block_out_channels": "wide"}))
    refused(generate(sdrun, folder), "could not load the diffusers folder", "save it again with save_pretrained")


@pytest.mark.parametrize(("part", "text", "fragment"), [
    ("unet/config.json", "{broken", "unet/config.json' is not valid JSON"),
    ("model_index.json", "{broken", "model_index.json' is not valid JSON"),
    ("scheduler/scheduler_config.json", "[1, 2]", "holds a JSON list"),
    ("model_index.json", '{"_class_name": "FluxPipeline"}', "names 'FluxPipeline'"),
])
def test_config_folder_that_is_broken(sdrun, state, isolated, part, text, fragment):
    save_file(state, "tiny.safetensors")
    shutil.copytree(CONFIGS / "tiny", "config")
    Path("config", part).write_text(text)
    line = refused(generate(sdrun, "tiny.safetensors", "--config", "config"), fragment)
    assert "pass --config with one of sd1" in line or "fix its _class_name" in line


def test_loading_notes_reach_stderr(sdrun, monkeypatch):
    real = models.load_pipeline

    def noting(source, torch_dtype, note, reads):
        note("judged: epsilon")
        return real(source, torch_dtype, reads=reads)

    monkeypatch.setattr(models, "load_pipeline", noting)
    assert "judged: epsilon" in sdrun("a fox", *TINY).stderr
    assert "judged" not in sdrun("a fox", *TINY, "-q").stderr
