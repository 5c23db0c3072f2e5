"""Peak CPU RAM while loading a model: sdrun's loader beside diffusers' own, for single files and folders.

The models are the full-size SD 1.5 and SDXL architectures (configs/sd1, configs/sdxl) with seeded random
weights, saved in fp16 as a diffusers folder and as a single .safetensors file in the original Stable Diffusion
key layout (tests/sd_layout.py writes it: no real weights can be downloaded). Every load runs in a fresh process,
on the CPU, to fp16 (or --dtype): first a warm-up load of the tiny model from the same kind of source (imports
and first allocations are fixed costs, not weights), then VmHWM is restarted and the model loaded. Peak = the
high-water mark of resident memory above the resident size before the load, after every weight has been read
once (as moving the model to a GPU does: a loader that memory-maps the file has its pages resident only then);
the ratio is to the weights loaded. "file" is how much of the resident memory at the end is the file's own pages
(the kernel can reclaim those; anonymous memory it cannot).

    python bench/load_ram.py                    # SD 1.5 and SDXL (needs ~2x the SDXL weights of free RAM: ~14 GB)
    python bench/load_ram.py --families sd1     # SD 1.5 only
    python bench/load_ram.py --families tiny    # the script's plumbing
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import diffusers  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from sdrun.models import build_tiny  # noqa: E402

MEASURE = """
import gc, json, sys
import torch

def status(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

loader, family, warmup, model, config = sys.argv[1:6]
dtype = getattr(torch, sys.argv[6])

def load(path, config_path):
    if loader == "sdrun":
        from sdrun.model_source import resolve_model
        from sdrun.models import load_pipeline
        return load_pipeline(resolve_model(path, config_path or None), dtype)
    import diffusers
    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    if path.endswith(".safetensors"):
        return cls.from_single_file(path, config=config_path, torch_dtype=dtype)
    return cls.from_pretrained(path, torch_dtype=dtype)

warm_config = warmup.replace(".safetensors", "") if warmup.endswith(".safetensors") else ""
load(warmup, warm_config)
gc.collect()
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # restart VmHWM from the current resident size
baseline = status("VmRSS")
pipe = load(model, config)
tensors = [t for module in pipe.components.values() if isinstance(module, torch.nn.Module)
           for t in module.state_dict().values()]
for t in tensors:  # read every weight once, as moving it to a GPU would: a memory-mapped one is paged in now
    t.float().sum()
peak = status("VmHWM")
weights = sum(t.numel() * t.element_size() for t in tensors)
print(json.dumps({"peak_gib": (peak - baseline) / 2**20, "weights_gib": weights / 2**30,
                  "anonymous_gib": status("RssAnon") / 2**20, "file_gib": status("RssFile") / 2**20}))
"""


def write_model(family: str, folder: Path) -> tuple[Path, Path]:
    """(fp16 diffusers folder, fp16 single file in the original layout) of `family` with random weights."""
    from sd_layout import pipeline_to_original

    model_folder, single = folder / family, folder / f"{family}.safetensors"
    if model_folder.is_dir() and single.is_file():
        return model_folder, single
    if family == "tiny":
        pipe = build_tiny()
    else:
        from flags import build

        build(family, folder / f"{family}-fp32")  # the benchmarks' random-weight model (fp32 on a CPU)
        pipe = diffusers.DiffusionPipeline.from_pretrained(folder / f"{family}-fp32", torch_dtype=torch.float16)
    pipe.to(torch.float16).save_pretrained(model_folder)
    state = {name: tensor.to(torch.float16).contiguous()
             for name, tensor in pipeline_to_original(pipe, open_clip=family == "sdxl").items()}
    save_file(state, single)
    return model_folder, single


def measure(loader: str, family: str, warmup: Path, model: Path, config: Path | None, dtype: str) -> dict:
    run = subprocess.run([sys.executable, "-c", MEASURE, loader, family, str(warmup), str(model), str(config or ""),
                          dtype],
                         capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    if run.returncode != 0:
        raise RuntimeError(run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}")
    return json.loads(run.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="sd1,sdxl")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/sdrun-load-ram"))
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                        help="what the fp16 weights load as (float32: a CPU run without --fp16)")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    tiny_folder, tiny_file = write_model("tiny", args.folder)
    tiny_file_config = tiny_file.with_suffix("")  # the warm-up's config: the tiny folder under the file's name
    if not tiny_file_config.exists():
        tiny_file_config.symlink_to(tiny_folder)
    print(f"# loading RAM, {datetime.date.today()}, CPU, torch {torch.__version__}, diffusers {diffusers.__version__}; "
          f"random weights stored in fp16, loaded as {args.dtype} on the CPU; peak RSS above the pre-load RSS")
    print("| model | source | loader | weights GiB | peak GiB | peak / weights | file pages at the end GiB |")
    print("|---|---|---|---|---|---|---|")
    for family in args.families.split(","):
        model_folder, single = write_model(family, args.folder)
        for source, model, config, warmup in (("single file", single, model_folder, tiny_file),
                                              ("folder", model_folder, None, tiny_folder)):
            for loader in ("diffusers", "sdrun"):
                label = ("from_single_file" if source == "single file" else "from_pretrained") \
                    if loader == "diffusers" else "sdrun"
                try:
                    # sdrun finds a single file's family from its keys; diffusers' from_single_file gets the folder
                    m = measure(loader, family, warmup, model,
                                config if loader == "diffusers" or family == "tiny" else None, args.dtype)
                    print(f"| {family} | {source} | {label} | {m['weights_gib']:.2f} | {m['peak_gib']:.2f} | "
                          f"{m['peak_gib'] / m['weights_gib']:.2f}x | {m['file_gib']:.2f} |", flush=True)
                except Exception as error:  # a row that cannot run says why; the table goes on
                    print(f"| {family} | {source} | {label} | failed: {str(error)[:150]} | | | |", flush=True)


if __name__ == "__main__":
    main()
