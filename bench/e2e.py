"""End-to-end seconds per image: plain diffusers (eager, and with torch.compile), sdrun in-process, and sdrun
through its real command line, in one run on one GPU.

Models are the full-size architectures (configs/sd1, configs/sdxl) with seeded random weights (bench/flags.py's
`build`): speed and memory do not depend on weight values. Every row makes images of one prompt at one size:

- diffusers: `pipe(...)` in this process, fp16, SDPA; a warm-up image, then the best of --repeats.
- with --compile, diffusers and sdrun in-process again with the UNet compiled (whole, mode="reduce-overhead",
  CUDA graphs inside; and regional, `compile_repeated_blocks`); the first image carries the compile time,
  reported as its overhead.
- sdrun in-process: `render()` of the loaded engine, the best of images 2.. (the CUDA graph is recorded on image
  2 and replayed after); the first image's excess over it is the overhead.
- sdrun CLI: `python -m sdrun run ... -n N --json` in a subprocess: per-image `seconds` of images 3..N (the best
  and the median), the first-image overhead (process start to the first image's line, less one steady image:
  imports, loading, warm-up; the notes split it at the first render's start) and the peak GiB the JSON line
  reports.

    python bench/e2e.py                       # SD 1.5 512x512 50 steps, 1024x1024 20 steps, SDXL 1024x1024 30 steps
    python bench/e2e.py --cases sd1-512 --compile   # one case, with the torch.compile rows
    python bench/e2e.py --cases tiny-64 --images 3  # the script's plumbing on any machine (tiny model, 64x64)
    python bench/e2e.py --bytecode                   # CLI rows with the libraries' bytecode compiled first

--bytecode: `pip install` compiles every module's bytecode, so a user's first image does not compile diffusers and
transformers from source; a machine whose installs hold no bytecode and that sets PYTHONDONTWRITEBYTECODE (the
H200 machine does, for the wheels a run installs into /tmp/site) recompiles them in every process. With this
option the script first compiles, in place, every writable folder on sys.path (compileall, the step pip runs),
and says which of torch, diffusers and transformers still lack bytecode. Not into a PYTHONPYCACHEPREFIX folder:
under a prefix Python reads bytecode only from there, so it ignored the bytecode of the H200 machine's torch
install and compiled torch from source in every process (`import torch` 5.0-5.9 s against 2.2 s without it).
"""

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import diffusers  # noqa: E402
import transformers  # noqa: E402
from flags import DEVICE, PROMPT, build, release, timed  # noqa: E402

from sdrun import pipeline  # noqa: E402
from sdrun.config import Job, RunConfig  # noqa: E402
from sdrun.console import Reporter  # noqa: E402
from sdrun.render.stages import render  # noqa: E402

CASES = {  # name: (family, size, steps, goal)
    "sd1-512": ("sd1", 512, 50, "<= 0.35 s per image, <= 10 s first-image overhead"),
    "sd1-1024": ("sd1", 1024, 20, "<= 0.6 s per image"),
    "sdxl-1024": ("sdxl", 1024, 30, "<= 0.7x plain diffusers"),
    "tiny-64": ("tiny", 64, 4, "plumbing only"),
}
CLI_FLAGS = (("--fp16", "--xformers"), ("--fp16",), ("--fp16", "--xformers", "--no-cuda-graphs"))


COMPILES = {  # --compile: how the UNet is compiled, for diffusers' rows and sdrun's
    "whole UNet, reduce-overhead": lambda unet: torch.compile(unet, mode="reduce-overhead", fullgraph=True),
    "regional (compile_repeated_blocks)": lambda unet: unet.compile_repeated_blocks(fullgraph=True) or unet,
}


def diffusers_rows(folder: Path, family: str, size: int, steps: int, repeats: int, compile_too: bool):
    from diffusers import DiffusionPipeline

    for name, compiled in [("eager", None)] + (list(COMPILES.items()) if compile_too else []):
        pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float16 if DEVICE == "cuda" else None)
        pipe.to(DEVICE).set_progress_bar_config(disable=True)
        if compiled is not None:
            pipe.unet = compiled(pipe.unet)
        generator = torch.Generator("cpu")

        def make():
            pipe(PROMPT, num_inference_steps=steps, width=size, height=size, generator=generator.manual_seed(0))

        yield f"diffusers fp16 (SDPA), {name}", *timed(make, repeats)
        del pipe, make
        release()


def sdrun_in_process(folder: Path, size: int, steps: int, repeats: int, flags: tuple[str, ...], compiled=None):
    run = RunConfig(model=str(folder), flags=flags)
    job = Job(prompt=PROMPT, steps=steps, width=size, height=size, seed=0)
    planned = pipeline.plan_run(run, [job])
    engine = pipeline.load(planned.run, Reporter(quiet=True), planned.setup)
    planned.refit(engine)
    if compiled is not None:  # a trial of compiling under sdrun's own loop (and its CUDA graph), for --compile
        engine.pipe.unet = compiled(engine.pipe.unet)
    plan = planned[job]
    # the first image runs eagerly (and compiles, if asked); the CUDA graph is recorded on the second, replayed after:
    # with repeats >= 2 the best is a replay
    result = timed(lambda: render(engine, plan, job, [0]), max(2, repeats))
    del engine
    release()
    return result


def compile_bytecode() -> float:
    """Compile, in place, the bytecode of every module under the writable folders of sys.path (site-packages, the
    repository), as pip does at install time; returns the seconds. Serially: with `-j 0` compileall wrote nothing
    on the H200 machine and said nothing (its output is discarded: a few files in these packages do not compile
    on purpose, tests of syntax errors, which pip ignores too), so the result is checked instead."""
    folders = [entry for entry in sys.path if entry and Path(entry).is_dir() and os.access(entry, os.W_OK)]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compileall", "-q", *folders], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    for module in (torch, diffusers, transformers):
        if not Path(importlib.util.cache_from_source(module.__file__)).exists():
            print(f"note: {module.__name__} has no bytecode after compiling ({module.__file__} cannot be written): "
                  "the CLI rows compile it in every process", flush=True)
    return seconds


def sdrun_cli(folder: Path, size: int, steps: int, images: int, flags: tuple[str, ...]):
    """(best, median seconds of images 3.., first-image overhead, peak GiB, stderr notes)."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "sdrun", "run", PROMPT, "--model", str(folder), "-W", str(size), "-H",
                   str(size), "--steps", str(steps), "-n", str(images), "--seed", "1", "--json", "-o", f"{out}/",
                   *flags]
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        records, arrivals = [], []
        for line in process.stdout:
            if line.strip().startswith("{"):
                records.append(json.loads(line))
                arrivals.append(time.perf_counter() - start)
        stderr = process.stderr.read()
        if process.wait() != 0 or len(records) < images:
            raise RuntimeError(f"sdrun exited {process.returncode}: {stderr.strip().splitlines()[-1:]}")
    steady = [r["seconds"] for r in records[2:]] or [records[-1]["seconds"]]
    # the overhead's two parts: until the first image's render began (imports, loading, the kernels' load), and
    # what the first render took beyond a steady one (warm-up, its recorded call)
    notes = [f"start {arrivals[0] - records[0]['seconds']:.1f} s, first image {records[0]['seconds']:.2f} s"]
    notes += [line for line in stderr.splitlines() if line.startswith("sdrun:")]
    peak = records[-1]["peak_gpu_memory_gb"]
    return min(steady), statistics.median(steady), arrivals[0] - min(steady), float("nan") if peak is None else peak, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="sd1-512,sd1-1024,sdxl-1024", help=f"comma-separated, of {list(CASES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=5, help="images per CLI run (the first two are not steady)")
    parser.add_argument("--compile", action="store_true",
                        help="add rows with the UNet compiled (COMPILES), for diffusers and sdrun in-process (minutes)")
    parser.add_argument("--rows", default="diffusers,in-process,cli", help="which of diffusers,in-process,cli")
    parser.add_argument("--cli-flags", help="the CLI rows' flag sets, ';'-separated (default: "
                        + "; ".join(" ".join(flags) for flags in CLI_FLAGS) + ")")
    parser.add_argument("--quick", action="store_true", help="4 steps, to check the script itself")
    parser.add_argument("--bytecode", action="store_true",
                        help="compile the libraries' bytecode first, in place, as an install does (see above)")
    args = parser.parse_args()
    if args.bytecode:
        print(f"bytecode compiled in {compile_bytecode():.0f} s", flush=True)
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"
    print(f"# sdrun end-to-end benchmark, {datetime.date.today()}, {device_name}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, diffusers {diffusers.__version__}; random weights, fp16, DDIM, guidance 7.5, "
          "batch 1")
    print("| case | configuration | s / image | first-image overhead s | peak GiB | notes |")
    print("|---|---|---|---|---|---|")
    for name in args.cases.split(","):
        family, size, steps, goal = CASES[name]
        steps = 4 if args.quick else steps
        folder = Path(f"/tmp/sdrun-bench-{family}")
        if not (folder / "model_index.json").is_file():
            build(family, folder)
        case = f"{family} {size}x{size} {steps} steps"
        print(f"| {case} | goal: {goal} | | | | |", flush=True)

        def row(label, seconds, overhead, peak, notes=""):
            print(f"| {case} | {label} | {seconds:.3f} | {overhead:.1f} | {peak:.2f} | {notes} |", flush=True)

        rows = args.rows.split(",")
        try:
            for label, seconds, overhead, peak in [] if "diffusers" not in rows else diffusers_rows(folder, family, size, steps, args.repeats,
                                                                 args.compile):
                row(label, seconds, overhead, peak)
        except Exception as error:  # a row that cannot run here says why; the table goes on
            print(f"| {case} | diffusers | failed: {str(error).splitlines()[0][:150]} | | | |", flush=True)
        flags = ("fp16", "xformers") if DEVICE == "cuda" else ()
        trials = [("", None)] + ([(f", UNet compiled: {name}", compiled) for name, compiled in COMPILES.items()]
                                 if args.compile else [])
        for trial, compiled in trials if "in-process" in rows else ():
            label = "sdrun in-process " + " ".join("--" + f for f in flags) + trial
            try:
                row(label, *sdrun_in_process(folder, size, steps, args.repeats, flags, compiled))
            except Exception as error:
                print(f"| {case} | {label} | failed: {str(error).splitlines()[0][:150]} | | | |", flush=True)
        flag_sets = tuple(tuple(f.split()) for f in args.cli_flags.split(";")) if args.cli_flags else CLI_FLAGS
        for cli_flags in () if "cli" not in rows else flag_sets if DEVICE == "cuda" else ((),):
            try:
                best, median, overhead, peak, notes = sdrun_cli(folder, size, steps, args.images, cli_flags)
                row(f"sdrun CLI {' '.join(cli_flags)} (median {median:.3f})", best, overhead, peak,
                    "; ".join(notes)[:200])
            except Exception as error:
                print(f"| {case} | sdrun CLI {' '.join(cli_flags)} | failed: {str(error)[:150]} | | | |", flush=True)


if __name__ == "__main__":
    main()
