"""Untrusted input through the real CLI on the tiny model (issue 12): image metadata for replay and decode, endless
and huge prompt files, prompts that are command names, and random options and prompt-file lines. Each fails with
one line naming the problem and the fix, in bounded time and memory, and leaves nothing half-written."""

import json
import os
import random
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, PngImagePlugin

from conftest import TINY, Result
from sdrun import output
from sdrun.backends import BACKENDS
from sdrun.batch import save_latents
from sdrun.schedulers import SAMPLERS


def meta(path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.text["sdrun"])


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.float32) / 255


def one_line_error(result: Result, code: int, *fragments: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, result
    assert isinstance(result.exception, (SystemExit, type(None))), result.exception  # no unhandled exception
    assert len(lines) == 1 and lines[0].startswith("sdrun: error: "), result
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> dict:
    """The sdrun metadata of a real tiny image: the cases below break one key of it."""
    path = tmp_path_factory.mktemp("recorded") / "orig.png"
    from sdrun.cli import cli

    result = CliRunner().invoke(cli, ["a fox", *TINY, "--seed", "5", "-o", str(path)])
    assert result.exit_code == 0, result.output
    return meta(path)


def png_with_metadata(path: str, text: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("sdrun", text)
    Image.new("RGB", (64, 64)).save(path, pnginfo=info)


# (name, the metadata text from the good record, what the one line says)
BROKEN_RECORDS = [
    ("not-json", lambda good: "{not json", "is not valid JSON"),
    ("nested", lambda good: "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("empty-object", lambda good: "{}", "has no 'prompt': replay with --set prompt=VALUE"),
    ("a-list", lambda good: "[1, 2]", "is a list, not an object"),
    ("a-string", lambda good: '"a fox"', "is a string, not an object"),
    ("null", lambda good: "null", "is null, not an object"),
    ("flags-null", lambda good: {**good, "flags": None}, "records flags None, not a list of flag names"),
    ("flags-unknown", lambda good: {**good, "flags": ["warp_drive"]}, "not a list of flag names"),
    ("flags-string", lambda good: {**good, "flags": "fp16"}, "records flags 'fp16'"),
    ("steps-text", lambda good: {**good, "steps": "x"}, "'steps' must be a number, got 'x'"),
    ("steps-bool", lambda good: {**good, "steps": True}, "'steps' must be a number"),
    ("steps-huge", lambda good: {**good, "steps": 10**30}, "is outside 1..1000: use 1 to 1000"),
    ("guidance-nan", lambda good: {**good, "guidance": float("nan")}, "guidance nan is not a finite number"),
    ("width-odd", lambda good: {**good, "width": 100}, "width 100 is not a multiple of 8"),
    ("seed-null", lambda good: {**good, "seed": None}, "has no 'seed': replay with --set seed=VALUE"),
    ("seed-negative", lambda good: {**good, "seed": -1}, "seed -1 is outside 0..4294967295"),
    ("prompt-list", lambda good: {**good, "prompt": ["a", "fox"]}, "'prompt' must be a string"),
    ("prompt-nul", lambda good: {**good, "prompt": "a\u0000fox"}, "control character U+0000"),
    ("scheduler-unknown", lambda good: {**good, "scheduler": "warp"}, "is not a known scheduler"),
    ("no-model", lambda good: {k: v for k, v in good.items() if k != "model"}, "has no 'model': replay with --set"),
    ("model-number", lambda good: {**good, "model": 5}, "records model 5, not a Hub id, folder or file"),
    ("model-empty", lambda good: {**good, "model": " "}, "records model ' '"),
    ("config-dir-number", lambda good: {**good, "config_dir": 3}, "records config_dir 3"),
    ("backend-options-list", lambda good: {**good, "backend_options": [1]}, "records backend_options [1]"),
    ("tile-size-tiny", lambda good: {**good, "backend_options": {"tile_size": 3}}, "records backend_options"),
    ("max-vram-negative", lambda good: {**good, "max_vram": -1}, "records max_vram -1, not a number of GiB"),
    ("max-vram-inf", lambda good: {**good, "max_vram": float("inf")}, "records max_vram inf"),
    ("batch-size-text", lambda good: {**good, "batch_size": "x"}, "records batch_size 'x', not a whole number"),
    ("batch-size-zero", lambda good: {**good, "batch_size": 0}, "records batch_size 0"),
]


@pytest.mark.parametrize("name, make, message", BROKEN_RECORDS, ids=[case[0] for case in BROKEN_RECORDS])
def test_replay_of_broken_metadata_is_one_line_naming_the_file(sdrun, isolated, recorded, name, make, message):
    text = make(recorded)
    png_with_metadata("broken.png", text if isinstance(text, str) else json.dumps(text))
    result = sdrun("replay", "broken.png")
    one_line_error(result, 2, "broken.png: ", message)
    assert sorted(p.name for p in isolated.iterdir()) == ["broken.png"]  # nothing written


def test_replay_set_repairs_a_bad_recorded_value(sdrun, recorded):
    png_with_metadata("broken.png", json.dumps({**recorded, "steps": "x", "model": None}))
    result = sdrun("replay", "broken.png", "--set", "steps=1", "--set", "model=tiny", "-o", "fixed.png")
    assert result.exit_code == 0, result
    assert meta("fixed.png")["steps"] == 1 and meta("fixed.png")["seed"] == recorded["seed"]


def test_replay_of_a_record_without_flags_or_unused_keys_runs(sdrun, recorded):
    """Memory flags do not change the picture and keys replay does not use are ignored: such a record replays."""
    kept = {k: v for k, v in recorded.items() if k not in ("flags", "backend_options", "max_vram", "batch_size")}
    png_with_metadata("lean.png", json.dumps({**kept, "made_by": "a script", "width": 64.0}))
    result = sdrun("replay", "lean.png", "-o", "again.png")
    assert result.exit_code == 0, result
    assert meta("again.png")["flags"] == [] and meta("again.png")["width"] == 64


def test_a_local_model_and_init_image_are_recorded_absolute_and_replay_from_another_folder(sdrun, isolated):
    from sdrun import models

    models.build_tiny().save_pretrained(isolated / "tiny-folder")
    Image.new("RGB", (64, 64), (200, 40, 40)).save("init.png")
    made = sdrun("a fox", "--model", "tiny-folder", "--steps", "2", "--seed", "4", "--init-image", "init.png",
                 "--strength", "0.5", "-o", "orig.png")
    assert made.exit_code == 0, made
    record = meta("orig.png")
    assert record["model"] == str(isolated / "tiny-folder") and record["init_image"] == str(isolated / "init.png")
    assert meta("orig.png")["model_name"] == "tiny-folder"
    # --skip-existing knows the image by its absolute paths too
    again = sdrun("a fox", "--model", "tiny-folder", "--steps", "2", "--seed", "4", "--init-image", "init.png",
                  "--strength", "0.5", "-o", "orig.png", "--skip-existing", "--json")
    assert again.exit_code == 0 and again.records()[0]["status"] == "skipped", again
    (isolated / "elsewhere").mkdir()
    os.chdir(isolated / "elsewhere")
    replayed = sdrun("replay", "../orig.png", "-o", "replayed.png")
    assert replayed.exit_code == 0, replayed
    assert np.array_equal(pixels("replayed.png"), pixels("../orig.png"))


def test_tiny_and_hub_ids_are_recorded_as_given(sdrun, recorded, isolated):
    Path("tiny").mkdir()  # a folder of that name does not make "tiny" a path
    assert sdrun("a fox", *TINY, "--seed", "1", "-o", "t.png").exit_code == 0
    assert meta("t.png")["model"] == "tiny" and recorded["model"] == "tiny"


@pytest.fixture
def latents_record(recorded) -> dict:
    return {**recorded, "seed": 3}


BROKEN_LATENTS = [
    ("no-model", lambda good: json.dumps({k: v for k, v in good.items() if k != "model"}), "has no 'model'"),
    ("model-null", lambda good: json.dumps({**good, "model": None}), "has no 'model'"),
    ("not-json", lambda good: "{oops", "is not valid JSON"),
    ("a-list", lambda good: "[]", "is a list, not an object"),
    ("steps-text", lambda good: json.dumps({**good, "steps": "many"}), "'steps' must be a number"),
    ("no-sampler", lambda good: json.dumps({**good, "sampler": None}), "records sampler None, not a name"),
    ("versions-list", lambda good: json.dumps({**good, "versions": []}), "records versions.sdrun None"),
]


@pytest.mark.parametrize("name, make, message", BROKEN_LATENTS, ids=[case[0] for case in BROKEN_LATENTS])
def test_decode_of_broken_metadata_is_one_line(sdrun, isolated, latents_record, name, make, message):
    from safetensors.torch import save_file

    save_file({"latents": torch.zeros(1, 4, 8, 8)}, "x.latents.safetensors", metadata={"sdrun": make(latents_record)})
    result = sdrun("decode", "x.latents.safetensors")
    one_line_error(result, 2, "x.latents.safetensors", message, "make the image again")
    assert sorted(p.name for p in isolated.iterdir()) == ["x.latents.safetensors"]


@pytest.mark.parametrize("shape, dtype", [((4, 8, 8), torch.float32), ((2, 4, 8, 8), torch.float32),
                                          ((1, 4, 8, 8), torch.int64), ((1, 4, 0, 8), torch.float32)])
def test_decode_refuses_a_tensor_that_is_not_one_image_of_latents(sdrun, latents_record, shape, dtype):
    save_latents(torch.zeros(shape, dtype=dtype), Path("x.latents.safetensors"), latents_record)
    one_line_error(sdrun("decode", "x.latents.safetensors"), 2, "not the latents of one image")


def test_decode_refuses_latents_made_for_another_model(sdrun, latents_record):
    save_latents(torch.zeros(1, 16, 8, 8), Path("x.latents.safetensors"), latents_record)
    one_line_error(sdrun("decode", "x.latents.safetensors"), 2, "latents of 16 channels", "decodes 4")
    assert not Path("x.png").exists()


def test_decode_of_a_complete_record_writes_its_image(sdrun, latents_record):
    save_latents(torch.zeros(1, 4, 8, 8), Path("x.latents.safetensors"), latents_record)
    result = sdrun("decode", "x.latents.safetensors")
    assert result.exit_code == 0, result
    assert meta("x.png")["seed"] == 3 and meta("x.png")["decoded_from"] == "x.latents.safetensors"


# ---------------------------------------------------------------------------------------------- prompt files

def run_bounded(args: list[str], **popen) -> subprocess.Popen:
    """sdrun in a process of its own, with a 4 GiB address space: a prompt file read without bound fails there
    with a MemoryError instead of filling this machine (sdrun with torch loaded needs about 1 GiB)."""
    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.Popen([sys.executable, "-m", "sdrun", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, preexec_fn=limit_memory, **popen)


@pytest.mark.slow
def test_endless_prompt_files_and_a_huge_count_end_in_bounded_time_and_memory(isolated):
    """/dev/zero as a prompt file and on stdin is refused after 64 MiB; a line asking for the most images one run
    makes, with random seeds, is planned in full (here up to a file standing at its last planned path)."""
    Path("many.jsonl").write_text(json.dumps({"prompt": "a fox", "num_images": 100_000}) + "\n")
    Path("out").mkdir()
    Path("out/99999.png").write_bytes(b"someone else's file")
    with open("/dev/zero", "rb") as zeros:
        runs = {
            "file": run_bounded(["--prompt-file", "/dev/zero", "--model", "tiny"]),
            "stdin": run_bounded(["--prompt-file", "-", "--model", "tiny"], stdin=zeros),
            "count": run_bounded(["--prompt-file", "many.jsonl", "--model", "tiny", "-o", "out/{index}.png"]),
        }
        results = {name: (process.communicate(timeout=120), process.returncode) for name, process in runs.items()}
    for name in ("file", "stdin"):
        (stdout, stderr), code = results[name]
        assert code == 2 and stdout == "", (name, stderr)
        assert stderr.strip().splitlines() == [f"sdrun: error: prompt file {'/dev/zero' if name == 'file' else '-'!r} "
                                               "is larger than 64 MiB (or endless): split it into several files"]
    (stdout, stderr), code = results["count"]
    assert code == 1 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines() == ["sdrun: error: out/99999.png already exists (1 planned file(s) do): pass "
                                           "--skip-existing to keep them or --overwrite to replace them"]
    assert sorted(os.listdir("out")) == ["99999.png"]


def test_stdin_beyond_the_limit_is_refused(sdrun, monkeypatch):
    monkeypatch.setattr("sdrun.prompt_file.MAX_PROMPT_FILE_BYTES", 1000)
    one_line_error(sdrun("--prompt-file", "-", *TINY, input="a fox\n" * 200), 2, "prompt file '-' is larger than")
    assert sdrun("--prompt-file", "-", *TINY, "--seed", "1", "-o", "s.png", input="a fox\n" * 10).exit_code == 0


def test_more_images_than_one_run_makes_are_refused_before_planning(sdrun, isolated):
    Path("p.jsonl").write_text("\n".join(json.dumps({"prompt": f"fox {i}", "num_images": 60_000}) for i in range(3)))
    one_line_error(sdrun("--prompt-file", "p.jsonl", *TINY), 2, "asks for more than 100000 images",
                   "(line 2 passes it): split it into several files")
    assert sorted(p.name for p in isolated.iterdir()) == ["p.jsonl"]


def test_a_million_blank_lines_are_refused(sdrun):
    Path("p.txt").write_text("a fox\n" + "\n" * 1_000_000)
    one_line_error(sdrun("--prompt-file", "p.txt", *TINY), 2, "has more than 1000000 lines")


def test_a_prompt_too_long_for_any_model_is_refused(sdrun):
    Path("p.txt").write_text("a fox\n" + "a red fox " * 2000 + "\n")
    result = sdrun("--prompt-file", "p.txt", *TINY, "--seed", "1", "-o", "o/", "--json")
    assert result.exit_code == 3, result
    by_line = {r["line"]: r for r in result.records()}
    assert by_line[1]["status"] == "ok" and by_line[2]["status"] == "failed"
    assert "is 19999 characters long, more than 10000" in by_line[2]["error"]  # stripped
    one_line_error(sdrun("a fox", *TINY, "--negative-prompt", "x" * 10_001), 2, "negative_prompt 'xxxx")


def test_line_endings_of_any_system_separate_prompts(sdrun):
    Path("p.txt").write_bytes(b"\xef\xbb\xbfa fox\r\na whale\ra cat\n")
    result = sdrun("--prompt-file", "p.txt", *TINY, "--seed", "1", "-o", "o/{index}.png", "--json")
    assert result.exit_code == 0, result
    assert [(r["line"], r["prompt"]) for r in result.records()] == [(1, "a fox"), (2, "a whale"), (3, "a cat")]


# ---------------------------------------------------------------------------------------------- the command line

@pytest.mark.parametrize("command, args, follows", [
    ("info", ("--model", "tiny"), '"info" --model ...'),
    ("info", ("a", "cat"), '"info" ...'),
    ("replay", ("--steps", "2"), '"replay" --steps ...'),
    ("decode", ("--seed", "1"), '"decode" --seed ...'),
])
def test_a_prompt_that_is_a_command_name_says_to_use_sdrun_run(sdrun, isolated, command, args, follows):
    result = sdrun(command, *args)
    one_line_error(result, 2, f'"{command}" is a command here, not a prompt',
                   f'to make an image of the prompt "{command}", write sdrun run {follows}')
    assert list(isolated.iterdir()) == []


def test_sdrun_run_makes_an_image_of_a_command_name(sdrun):
    result = sdrun("run", "info", *TINY, "--seed", "1")
    assert result.exit_code == 0, result
    assert meta("outputs/1-info.png")["prompt"] == "info"


def test_a_mistyped_option_of_a_command_gets_no_prompt_hint(sdrun):
    result = sdrun("replay", "x.png", "--sett", "steps=2")
    one_line_error(result, 2, "No such option '--sett'", "(see sdrun replay --help)")
    assert "not a prompt" not in result.stderr


def test_top_level_help_lists_every_memory_flag_with_what_it_saves_and_costs(sdrun):
    lines = sdrun("--help").stdout.splitlines()
    for backend in BACKENDS:
        line = next((line for line in lines if line.strip().startswith(backend.flag + " ")), None)
        assert line is not None and line.strip().removeprefix(backend.flag).strip() == backend.brief, backend.flag
        assert "saves" in backend.brief and "costs" in backend.brief, backend.flag
    assert any(line.strip().startswith("--max-vram GB") for line in lines)


# ---------------------------------------------------------------------------------------------- random input

VALUES = {  # option -> (values that run, values that are refused)
    "--steps": (["1", "2"], ["0", "-1", "1001", "2.5", "nan", "", "99999999999999999999"]),
    "--guidance": (["0", "1", "7.5"], ["nan", "inf", "-inf", "-1", "1e309", "x"]),
    "-W": (["8", "32", "64"], ["7", "0", "-64", "100000", "1180591620717411303424", "64.0"]),
    "-H": (["16", "64"], ["9", "abc", "16385"]),
    "--scheduler": (sorted(SAMPLERS), ["warp", "", "DDIM "]),
    "--seed": (["0", "1", "4294967295"], ["-1", "4294967296", "0x10", "1e3"]),
    "-n": (["1", "2"], ["0", "100001", "-5"]),
    "--negative-prompt": (["", "blurry", "é" * 30], ["a\x00b", "x" * 10_001]),
    "-o": (["{index}-{seed}.png", "sub/", "x.png"], ["x.jpg", "{name}.png", "{seed:d}.png", "{seed!z}.png"]),
    "--strength": (["0.5"], ["1.5", "nan"]),
    "--hires": (["64x64"], ["7x7", "abc", "99999x8"]),
    "--batch-size": (["1", "2"], ["0", "x"]),
}
PROMPTS = ["a fox", "A Fox, in SNOW!", "é" * 80, "{seed}", "../../etc/passwd", "a/b\\c", "x" * 300, "", "  ", "a\x1bb"]
JSON_VALUES = [0, 1, 2, 64, 64.0, 63.5, -1, 10**20, 1e309, float("nan"), True, None, "2", "", "64x64", [], {},
               [[[[1]]]], "euler", "warp"]
KEYS = ["prompt", "negative_prompt", "steps", "guidance", "width", "height", "scheduler", "seed", "num_images",
        "output", "strength", "hires", "colour", "Prompt"]


def random_line(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.1:
        return "[" * rng.choice([10, 100_000]) + "]" * 5  # nested, or broken, JSON
    if kind < 0.2:
        return rng.choice(["not json", "{", '{"prompt": "a", }', "\ufeff" + json.dumps({"prompt": "bom"}), "# note"])
    line = {"prompt": rng.choice(PROMPTS)} if rng.random() < 0.9 else {}
    for key in rng.sample(KEYS, rng.randint(0, 3)):
        line[key] = rng.choice(JSON_VALUES + ([rng.choice(PROMPTS)] if key in ("prompt", "output") else []))
    for key in ("steps", "num_images"):  # a count that runs stays small, so that the test stays fast
        if isinstance(line.get(key), (int, float)) and 2 < line[key] <= 100_000:
            line[key] = 2
    return json.dumps(line)


def random_case(rng: random.Random, folder: str) -> tuple[list[str], str | None]:
    """CLI arguments for one case, and the prompt file it uses (None: a PROMPT argument). With a prompt file, the
    options are mostly valid, so that its lines are what is tried."""
    prompt_file = f"{folder}-prompts" + rng.choice([".jsonl", ".txt", ""]) if rng.random() < 0.5 else None
    valid_only = rng.random() < (0.8 if prompt_file else 0.4)
    args = ["--steps", "1", "-W", "32", "-H", "32", "-o", f"{folder}/"]
    for option in rng.sample(sorted(VALUES), rng.randint(1, 4)):
        good, bad = VALUES[option]
        value = rng.choice(good if valid_only or rng.random() < 0.5 else bad)
        args += [option, f"{folder}/{value}" if option == "-o" else value]
    if rng.random() < 0.1:
        args.append(rng.choice(["--bogus", "--vae-slicing", "--skip-existing", "--fail-fast"]))
    return args, prompt_file


def no_partial_files(folder: Path) -> None:
    for path in folder.rglob("*") if folder.exists() else ():
        assert not output.TEMPORARY.fullmatch(path.name), path  # no temporary left
        if path.is_file():
            assert output.finished_metadata(path) is not None, path  # every file a complete image


def test_random_options_and_prompt_file_lines_end_as_documented(sdrun, isolated):
    rng = random.Random(12)
    documented = {0, 1, 2, 3, 4}
    for case in range(60):
        folder = f"case{case}"
        args, prompt_file = random_case(rng, folder)
        if prompt_file is None:
            result = sdrun(rng.choice(PROMPTS[:7]), "--model", "tiny", *args, "--json")
        else:
            lines = [random_line(rng) for _ in range(rng.randint(1, 4))]
            Path(prompt_file).write_text(("\ufeff" if rng.random() < 0.2 else "") + "\n".join(lines) + "\n")
            result = sdrun("--prompt-file", prompt_file, "--model", "tiny", *args, "--json")
        described = (case, args, prompt_file, result)
        assert result.exit_code in documented, described
        assert isinstance(result.exception, (SystemExit, type(None))), described  # nothing unhandled
        assert "Traceback" not in result.stderr, described
        assert all(isinstance(json.loads(line), dict) for line in result.stdout.splitlines()), described
        if result.exit_code == 2:
            assert not Path(folder).exists(), described  # a usage error writes nothing
        no_partial_files(isolated / folder)
