"""Loading RAM (issue 10): a single file or a folder loads with peak CPU RAM at most about 1.2x the weights it
loads, also when their dtype changes on the way (fp16 files loaded in fp32 on a CPU, fp32 files loaded in fp16).

Each load runs in a fresh process, after a warm-up load of the tiny model from the same kind of source, so that
lazy imports and first allocations (fixed costs of some 100 MB, whatever the model's size) are not counted as
weights. The peak is the kernel's high-water mark of resident memory (VmHWM, what ru_maxrss reports), restarted
after the warm-up: ru_maxrss itself would also hold pytest's own resident size, since Linux keeps a process's
peak from before its exec, and a child of pytest starts as a copy of pytest.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from sd_layout import pipeline_to_original, save_config_folder
from sdrun import models
from sdrun.models import build_tiny

RATIO = 1.2
MEASURE = """
import gc, json, sys
import torch
from sdrun.model_source import resolve_model
from sdrun.models import load_pipeline

def status(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

warmup, warmup_config, model, config = (argument or None for argument in sys.argv[1:5])
dtype = getattr(torch, sys.argv[5])
load_pipeline(resolve_model(warmup, warmup_config), dtype)
gc.collect()
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # restart VmHWM from the current resident size
baseline = status("VmRSS")
pipe = load_pipeline(resolve_model(model, config), dtype)
peak = status("VmHWM")
weights = sum(t.numel() * t.element_size() for name in ("unet", "vae", "text_encoder")
              for t in getattr(pipe, name).state_dict().values())
print(json.dumps({"peak_kib": peak - baseline, "weights_kib": weights / 1024}))
"""


def wide_pipeline():
    """The tiny pipeline with a UNet wide enough (200 M parameters) that loading it dwarfs fixed costs, and whose
    largest tensor is small beside the whole (one tensor at a time is read in the file's dtype)."""
    pipe = build_tiny()
    config = dict(pipe.unet.config) | dict(block_out_channels=(384, 768), layers_per_block=2, norm_num_groups=32)
    pipe.unet = UNet2DConditionModel.from_config(config)
    return pipe


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """(kind, stored dtype) -> the arguments of MEASURE but the dtype: single files and folders in fp16 and fp32,
    each with its tiny warm-up twin."""
    folder = tmp_path_factory.mktemp("memory")
    out = {}
    for model, name in ((wide_pipeline(), "wide"), (build_tiny(), "tiny")):
        config = save_config_folder(model, folder / f"{name}-config")
        state = pipeline_to_original(model)
        for stored, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
            save_file({k: v.to(dtype) for k, v in state.items()}, folder / f"{name}-{stored}.safetensors")
            model.to(dtype).save_pretrained(folder / f"{name}-{stored}")
            out.setdefault(("file", stored), []).extend([folder / f"{name}-{stored}.safetensors", config])
            out.setdefault(("folder", stored), []).extend([folder / f"{name}-{stored}", ""])
    return out  # wide model, its config, tiny model, its config


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["file", "folder"])
@pytest.mark.parametrize(("stored", "loaded"), [("fp16", "float32"), ("fp32", "float16")])
def test_loading_peaks_near_the_size_of_the_loaded_weights(sources, kind, stored, loaded):
    model, config, warmup, warmup_config = sources[kind, stored]
    run = subprocess.run([sys.executable, "-c", MEASURE, str(warmup), str(warmup_config), str(model), str(config),
                          loaded],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(models.__file__).parents[1])})
    assert run.returncode == 0, run.stderr
    measured = json.loads(run.stdout.splitlines()[-1])
    assert measured["weights_kib"] > 250 * 1024  # the wide model was loaded, not the tiny one
    assert measured["peak_kib"] <= RATIO * measured["weights_kib"], measured
