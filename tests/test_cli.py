"""The command line on the tiny model: what users type, what they get, and every bad input (issue 2)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, pixels
from sdrun.backends import BACKENDS
from sdrun.model_source import CONFIGS
from sdrun.schedulers import SAMPLERS


def test_help_shows_examples_and_every_flag_with_its_cost(sdrun):
    result = sdrun("--help")
    assert result.exit_code == 0
    assert 'sdrun "astronaut on mars" --xformers' in result.stdout
    run_help = sdrun("run", "--help").stdout
    for backend in BACKENDS:
        assert backend.flag in run_help
    assert "--mem-efficient-attention" in run_help
    assert "SDRUN_MODEL" in run_help and "noise" in run_help


def test_default_command_writes_png_and_prints_only_its_path(sdrun, isolated):
    result = sdrun("a red fox", *TINY, "--seed", "7")
    assert result.exit_code == 0, result
    assert result.stdout.splitlines() == [str(Path("outputs/7-a-red-fox.png"))]
    assert "1 done, 0 skipped, 0 failed of 1" in result.stderr
    with Image.open(isolated / "outputs/7-a-red-fox.png") as image:
        assert image.size == (64, 64) and image.mode == "RGB"
    assert not [p for p in (isolated / "outputs").iterdir() if p.name.startswith(".")]  # no temporary left


def test_run_subcommand_and_default_command_agree(sdrun):
    assert sdrun("run", "a fox", *TINY, "--seed", "3", "-o", "a.png").exit_code == 0
    assert sdrun("a fox", *TINY, "--seed", "3", "-o", "b.png").exit_code == 0
    assert np.array_equal(pixels("a.png"), pixels("b.png"))


def test_same_seed_same_image_other_seed_other_image(sdrun):
    for name, seed in (("a.png", 5), ("b.png", 5), ("c.png", 6)):
        assert sdrun("a lighthouse", *TINY, "--seed", seed, "-o", name).exit_code == 0
    assert np.array_equal(pixels("a.png"), pixels("b.png"))
    assert np.abs(pixels("a.png") - pixels("c.png")).mean() > 0.01


def test_random_seed_is_recorded_and_reproduces(sdrun):
    result = sdrun("a boat", *TINY, "-o", "first.png")
    assert result.exit_code == 0, result
    with Image.open("first.png") as image:
        seed = json.loads(image.text["sdrun"])["seed"]
    assert sdrun("a boat", *TINY, "--seed", seed, "-o", "again.png").exit_code == 0
    assert np.array_equal(pixels("first.png"), pixels("again.png"))


@pytest.mark.parametrize("scheduler", sorted(SAMPLERS))
def test_every_scheduler_runs_and_is_recorded(sdrun, scheduler):
    result = sdrun("a tree", *TINY, "--seed", "1", "--scheduler", scheduler, "-o", "x.png")
    assert result.exit_code == 0, result
    with Image.open("x.png") as image:
        assert f"Sampler: {SAMPLERS[scheduler].a1111_name}," in image.text["parameters"]
        assert json.loads(image.text["sdrun"])["scheduler"] == scheduler
    assert np.isfinite(pixels("x.png")).all() and pixels("x.png").std() > 0.01


def test_metadata_round_trips_in_a1111_and_sdrun_chunks(sdrun):
    result = sdrun("a castle, at dusk", *TINY, "--seed", "11", "--negative-prompt", "blurry", "--guidance", "5",
                   "--scheduler", "euler-a", "-W", "72", "-H", "48", "-o", "c.png")
    assert result.exit_code == 0, result
    with Image.open("c.png") as image:
        assert image.size == (72, 48)
        assert image.text["parameters"] == (
            "a castle, at dusk\nNegative prompt: blurry\n"
            "Steps: 2, Sampler: Euler a, CFG scale: 5.0, Seed: 11, Size: 72x48, Model: tiny, Version: sdrun 0.1.0"
        )
        meta = json.loads(image.text["sdrun"])
    assert meta["prompt"] == "a castle, at dusk" and meta["negative_prompt"] == "blurry"
    assert (meta["seed"], meta["steps"], meta["guidance"], meta["width"], meta["height"]) == (11, 2, 5.0, 72, 48)
    assert meta["scheduler"] == "euler-a" and meta["model"] == "tiny" and meta["flags"] == []
    assert set(meta["versions"]) == {"sdrun", "torch", "diffusers", "transformers"}


@pytest.mark.parametrize("flag", ["--vae-slicing", "--vae-tiling", "--channels-last", "--vae-fp32"])
def test_cpu_flags_give_an_image_close_to_flag_off(sdrun, flag):
    # 128x128 so that tiling really splits the tiny VAE's 64-pixel tiles; batch 2 so that slicing really slices
    common = ("a river", *TINY, "--seed", "4", "-W", "128", "-H", "128", "-n", "2", "--batch-size", "2")
    assert sdrun(*common, "-o", "off-{index}.png").exit_code == 0
    tiles = ("--tile-size", "64", "--tile-overlap", "16") if flag == "--vae-tiling" else ()  # several tiles at 128
    result = sdrun(*common, flag, *tiles, "-o", "on-{index}.png")
    assert result.exit_code == 0, result
    for index in (0, 1):
        off, on = pixels(f"off-{index}.png"), pixels(f"on-{index}.png")
        assert np.abs(off - on).mean() < 0.02, (flag, np.abs(off - on).mean())
    with Image.open("on-0.png") as image:
        assert json.loads(image.text["sdrun"])["flags"] == [flag[2:].replace("-", "_")]


def test_vae_tiling_really_changes_the_decode(sdrun):
    """Guards the closeness test above against a flag that does nothing."""
    common = ("a river", *TINY, "--seed", "4", "-W", "128", "-H", "128")
    sdrun(*common, "-o", "off.png")
    sdrun(*common, "--vae-tiling", "--tile-size", "64", "--tile-overlap", "16", "-o", "on.png")
    assert not np.array_equal(pixels("off.png"), pixels("on.png"))


def test_batched_image_equals_the_same_seed_made_alone(sdrun):
    assert sdrun("a cat", *TINY, "--seed", "20", "-n", "3", "--batch-size", "3", "-o", "b-{seed}.png").exit_code == 0
    assert sdrun("a cat", *TINY, "--seed", "21", "-o", "alone.png").exit_code == 0
    assert np.abs(pixels("b-21.png") - pixels("alone.png")).max() <= 2 / 255


@pytest.mark.parametrize("output, expected", [
    ("out/", ["out/9-a-dog.png", "out/10-a-dog.png"]),
    ("shot.png", ["shot-0.png", "shot-1.png"]),
    ("x/{prompt}_{index}_{seed}.png", ["x/a-dog_0_9.png", "x/a-dog_1_10.png"]),
])
def test_output_file_folder_and_template(sdrun, isolated, output, expected):
    result = sdrun("A dog!", *TINY, "--seed", "9", "-n", "2", "-o", output)
    assert result.exit_code == 0, result
    assert result.stdout.splitlines() == [str(Path(p)) for p in expected]
    assert all((isolated / p).is_file() for p in expected)


def test_existing_file_is_never_overwritten_without_overwrite(sdrun):
    assert sdrun("a fox", *TINY, "--seed", "1", "-o", "f.png").exit_code == 0
    before = Path("f.png").read_bytes()
    result = sdrun("a fox", *TINY, "--seed", "2", "-o", "f.png")
    assert result.exit_code == 1 and "already exists" in result.stderr and "--overwrite" in result.stderr
    assert Path("f.png").read_bytes() == before
    assert sdrun("a fox", *TINY, "--seed", "2", "-o", "f.png", "--overwrite").exit_code == 0
    assert Path("f.png").read_bytes() != before


def test_loading_from_a_diffusers_folder_matches_tiny(sdrun, isolated):
    from sdrun import models

    models.build_tiny().save_pretrained(isolated / "tiny-folder")
    assert sdrun("a fox", *TINY, "--seed", "1", "-o", "a.png").exit_code == 0
    result = sdrun("a fox", "--model", isolated / "tiny-folder", "--steps", "2", "--seed", "1", "-o", "b.png")
    assert result.exit_code == 0, result
    assert np.array_equal(pixels("a.png"), pixels("b.png"))


def test_model_from_environment_variable(sdrun, monkeypatch):
    monkeypatch.setenv("SDRUN_MODEL", "tiny")
    assert sdrun("a fox", "--steps", "1", "--seed", "1").exit_code == 0


def test_info_lists_versions_and_why_flags_are_unavailable(sdrun):
    result = sdrun("info", "--no-selftest")
    assert result.exit_code == 0, result
    for key in ("sdrun", "torch", "diffusers", "--vae-tiling", "--xformers", "--fp16"):
        assert key in result.stdout
    if not __import__("torch").cuda.is_available():
        assert "--fp16" in result.stdout and "needs a CUDA GPU" in result.stdout


BAD_INPUTS = [
    (("-W", "100"), 2, "width 100 is not a multiple of 8"),
    (("-H", "0"), 2, "height 0 is not a multiple of 8"),
    (("-W", "-64"), 2, "width -64 is not a multiple of 8"),
    (("--steps", "0"), 2, "steps 0 is outside 1..1000"),
    (("--guidance", "-1"), 2, "guidance -1.0 is below 0"),
    (("--scheduler", "warp"), 2, "scheduler 'warp' is not a known scheduler"),
    (("--seed", "-3"), 2, "seed -3 is outside 0..4294967295"),
    (("--seed", "4294967295", "-n", "2"), 2, "use 0 to 4294967294"),
    (("-n", "0"), 2, "num_images 0 is outside 1..100000"),
    (("--batch-size", "0"), 2, "0 is not in the range x>=1"),
    (("--steps", "many"), 2, "'steps' must be a whole number, got 'many'"),
    (("--model", "no/such/dir/model.safetensors"), 1, "does not exist"),
    (("--cpu-offload", "--model-offload"), 2, "cannot be combined"),
    (("--fp16",), 2, "needs a CUDA GPU"),
    (("--xformers",), 2, "needs a CUDA GPU"),
    (("--model-offload",), 2, "needs a CUDA GPU"),
    (("--device", "cuda"), 2, "no CUDA GPU"),
    (("-o", "picture.jpg"), 2, "not a .png file or a folder"),
    (("-o", "out/{name}.png"), 2, "unknown placeholder {name}"),
    (("--overwrite", "--skip-existing"), 2, "contradict"),
]


@pytest.mark.parametrize("args, code, message", BAD_INPUTS, ids=[" ".join(a) for a, _, _ in BAD_INPUTS])
def test_bad_input_is_one_line_with_exit_code_and_writes_nothing(sdrun, isolated, args, code, message):
    if args[0] in ("--fp16", "--xformers", "--model-offload", "--device") and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = sdrun("a fox", *_with_tiny(args))
    assert result.exit_code == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdrun: error: "), result
    assert message in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert sorted(p.name for p in isolated.iterdir() if not p.name.startswith(".")) == []


def _with_tiny(args):
    return args if "--model" in args else ("--model", "tiny", *args)


def test_empty_prompt_is_refused(sdrun, isolated):
    result = sdrun("  ", *TINY)
    assert result.exit_code == 2 and "is empty: give the text to draw" in result.stderr
    assert not (isolated / "outputs").exists()


def test_unwritable_output_folder_is_refused_before_loading(sdrun, isolated):
    Path("blocker").write_text("a file where a folder should be")
    result = sdrun("a fox", *TINY, "-o", "blocker/sub/x.png")
    assert result.exit_code == 1 and "cannot write to output folder" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("content", [b"this is not a checkpoint", b""])
def test_file_that_is_not_a_checkpoint_is_refused(sdrun, content):
    Path("bogus.safetensors").write_bytes(content)
    result = sdrun("a fox", "--model", "bogus.safetensors", "--steps", "1")
    assert result.exit_code == 1 and "bogus.safetensors" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_hub_id_without_network_says_how_to_use_a_local_model(sdrun):
    result = sdrun("a fox", "--model", "someone/some-model", "--steps", "1")
    assert result.exit_code == 1
    assert "could not fetch" in result.stderr and "--model PATH" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_debug_env_shows_the_traceback(sdrun, monkeypatch):
    monkeypatch.setenv("SDRUN_DEBUG", "1")
    result = sdrun("a fox", *TINY, "--steps", "0")
    assert result.exit_code != 0 and result.exception is not None
    assert type(result.exception).__name__ == "UsageError"


ODD_PROMPTS = [
    (os.fsdecode(b"a \xff fox"), "holds the byte 0xff, which is not UTF-8"),  # what Python makes of such argv
    ("a\x00fox", "control character U+0000"),
    ("a fox\x1b[31m", "control character U+001B"),
]


@pytest.mark.parametrize("prompt, message", ODD_PROMPTS, ids=["not-utf8", "nul", "escape"])
def test_a_prompt_that_image_metadata_cannot_carry_is_refused(sdrun, isolated, prompt, message):
    result = sdrun(prompt, *TINY)
    assert result.exit_code == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert list(isolated.iterdir()) == []


def test_prompt_file_lines_with_control_characters_fail_their_line_only(sdrun):
    Path("p.jsonl").write_text("\n".join(json.dumps(line) for line in [
        {"prompt": "a fox"}, {"prompt": "\u0000\u0000"}, {"prompt": "a cat", "negative_prompt": "fog\u0007"},
        {"prompt": "a tab\tand\na newline are fine"},
    ]))
    result = sdrun("--prompt-file", "p.jsonl", *TINY, "--seed", "1", "--json")
    assert result.exit_code == 3, result
    assert {r["line"]: r["status"] for r in result.records()} == {1: "ok", 2: "failed", 3: "failed", 4: "ok"}
    assert "negative prompt holds the control character U+0007" in result.records()[1]["error"]


@pytest.mark.slow
def test_an_interrupt_at_any_moment_of_start_up_is_one_line_and_exit_130(isolated):
    """Ctrl-C and SIGTERM while torch and diffusers import (seconds), or while the model loads."""
    command = [sys.executable, "-m", "sdrun", "a fox", "--model", "tiny", "--steps", "500", "-n", "20",
               "-o", "i/{index}.png"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    moments = (0.0, 1.0, 3.0)  # after sdrun's first line of code has run: before it, the interpreter is not sdrun's
    cases = [(moment, stop) for moment in moments for stop in (signal.SIGINT, signal.SIGTERM)]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for _ in cases]
    installed = [_handlers_installed(process.pid) for process in processes]
    for (moment, stop), process, start in sorted(zip(cases, processes, installed), key=lambda c: c[2] + c[0][0]):
        time.sleep(max(0.0, start + moment - time.monotonic()))
        process.send_signal(stop)
    for (moment, stop), process in zip(cases, processes):
        _, stderr = process.communicate(timeout=60)
        lines = stderr.strip().splitlines()
        assert process.returncode == 130, (moment, stop, stderr)
        assert "Traceback" not in stderr and lines.count("sdrun: interrupted") == 1, (moment, stop, stderr)
        # where a slow moment already fell into generation, the batch summary comes first
        assert lines[-1] == "sdrun: interrupted" and all(" done, " in line for line in lines[:-1]), stderr


def _handlers_installed(pid: int, timeout: float = 60) -> float:
    """When process `pid` caught SIGTERM (sdrun/entry.py's first act; Python itself leaves SIGTERM at its default),
    read from /proc: the moment from which sdrun promises exit 130 on an interrupt."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status") as status:
            caught = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
        if caught >> (signal.SIGTERM - 1) & 1:
            return time.monotonic()
        time.sleep(0.002)
    raise AssertionError(f"process {pid} never installed its signal handlers")


def cli_in_fresh_python(commands: list[list[str]], libraries: tuple[str, ...]):
    """Runs each argument list through the CLI in one new interpreter; returns its stdout lines (an "exit N" line per
    command, then the sorted `libraries` it had imported) and the finished process."""
    code = ("import sys\nfrom sdrun.cli import cli\n"
            f"for args in {commands!r}:\n"
            "    try:\n        print('exit', cli.main(args) or 0)\n"
            "    except SystemExit as end:\n        print('exit', end.code)\n"
            f"print(sorted(m for m in {libraries!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return done.stdout.strip().splitlines(), done


def test_help_version_usage_and_prompt_file_errors_come_before_torch_is_imported(tmp_path):
    """Issue 9: the command line answers at once; torch, diffusers and transformers load only to do work. A
    prompt file that cannot be read, or (with --fail-fast) has a bad line, is such an error."""
    bad_line = tmp_path / "p.jsonl"
    bad_line.write_text('{"prompt": "a fox"}\n{"prompt": "a cat", "steps": 0}\n')
    lines, done = cli_in_fresh_python(
        [["--help"], ["--version"], ["run", "--help"], ["plan", "--help"], ["a fox", "-W", "63"],
         ["a fox", "--guidance", "nan"], ["a fox", "--hires", "4k"], ["--prompt-file", str(tmp_path / "missing.txt")],
         ["--prompt-file", str(bad_line), "--fail-fast"]], ("torch", "diffusers", "transformers"))
    assert lines[-1] == "[]", done.stdout + done.stderr
    assert [line for line in lines if line.startswith("exit")] == ["exit 0"] * 4 + ["exit 2"] * 5
    assert "cannot read prompt file" in done.stderr and "line 2: steps 0 is outside 1..1000" in done.stderr


HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft")


def test_info_imports_only_what_it_reports():
    """Issue 9: `sdrun info` reports the libraries' versions from their install records and asks torch about the
    GPU; it imports torch, not diffusers, transformers, accelerate or peft (2-core CPU machine: 6.3 -> 1.7 s)."""
    lines, done = cli_in_fresh_python([["info", "--no-selftest"]], HEAVY)
    assert lines[-2:] == ["exit 0", "['torch']"], done.stdout + done.stderr
    assert any(line.startswith("diffusers ") and line.split()[1][0].isdigit() for line in lines), done.stdout


def test_plan_and_dry_run_import_no_diffusers():
    """A plan reads configs only (sdrun/model_source.py): `sdrun plan`, `--dry-run` and the usage errors they find
    (an impossible --max-vram) import torch, not diffusers, transformers or peft (2-core CPU machine: 7.1 -> 1.7 s)."""
    sd1 = str(CONFIGS / "sd1")
    lines, done = cli_in_fresh_python(
        [["plan", "a fox", "--model", sd1, "--device", "cuda", "--max-vram", "4"],
         ["a fox", "--model", sd1, "--dry-run"],
         ["plan", "a fox", "--model", sd1, "--device", "cuda", "--max-vram", "0.2"]], HEAVY)
    assert lines[-1] == "['torch']", done.stdout + done.stderr
    exits = [line for line in lines if line.startswith("exit")]
    assert exits == ["exit 0", "exit 0", "exit 2"], done.stdout + done.stderr
    assert any(line.startswith("predicted peak") for line in lines) and "--max-vram" in done.stderr


def test_bench_measures_plain_diffusers_and_each_usable_flag(sdrun):
    result = sdrun("bench", "--model", "tiny", "--steps", "1", "--repeats", "1", "--size", "64")
    assert result.exit_code == 0, result
    rows = {line.split("  ")[0].strip(): line for line in result.stdout.splitlines()[2:]}
    assert {"diffusers fp32", "sdrun (no flags)", "sdrun --channels-last", "sdrun --vae-tiling"} <= set(rows)
    assert all(float(line.split()[-2]) > 0 for line in rows.values())


@pytest.mark.parametrize("case", ["read-only", "compiled", "writable", "no-bytecode"])
def test_bytecode_of_a_read_only_torch_install_goes_to_sdruns_cache(monkeypatch, tmp_path, case):
    """A torch whose __pycache__ cannot be written (and holds no bytecode) would be compiled from source in every
    process: sdrun points Python's bytecode at its cache then, and only then."""
    import importlib.machinery
    import importlib.util

    from sdrun import cache

    source = tmp_path / "site" / "torch" / "__init__.py"
    source.parent.mkdir(parents=True)
    source.write_text("")
    if case == "compiled":
        compiled = Path(importlib.util.cache_from_source(str(source)))
        compiled.parent.mkdir()
        compiled.write_bytes(b"")
    spec = importlib.machinery.ModuleSpec("torch", None, origin=str(source))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec if name == "torch" else None)
    monkeypatch.setattr(cache.os, "access", lambda path, mode: case == "writable")
    monkeypatch.setattr(sys, "pycache_prefix", None)
    monkeypatch.setattr(sys, "dont_write_bytecode", case == "no-bytecode")
    monkeypatch.setenv("SDRUN_CACHE", str(tmp_path / "cache"))
    cache.keep_bytecode_of_read_only_installs()
    expected = str(tmp_path / "cache" / "pycache") if case == "read-only" else None
    assert sys.pycache_prefix == expected


def test_the_installed_packages_are_scanned_once_per_process(monkeypatch):
    """diffusers and transformers each scan every installed distribution while they import: sdrun's entry makes
    the later scans reuse the first's answer, and every caller gets its own copy to change."""
    import importlib.metadata

    from sdrun import cache

    scans = []

    def scan():
        scans.append(1)
        return {"PIL": ["pillow"]}

    monkeypatch.setattr(importlib.metadata, "packages_distributions", scan)
    cache.scan_installed_packages_once()
    cache.scan_installed_packages_once()  # a second call keeps the shared one
    first = importlib.metadata.packages_distributions()
    first["PIL"].append("changed by a caller")
    assert importlib.metadata.packages_distributions() == {"PIL": ["pillow"]}
    assert len(scans) == 1
