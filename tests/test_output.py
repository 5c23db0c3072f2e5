"""Output paths and files that never lose or replace finished work (issues 12 and 14): exclusive writes under
races, resumes that check what they keep, names that fit, full disks, folders in the way, prompt-file outputs."""

import errno
import json
import multiprocessing
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import TINY, meta
from sdrun import output
from sdrun.batch import save_latents

META = {"prompt": "p", "negative_prompt": "", "steps": 1, "sampler": "Euler", "guidance": 1.0, "seed": 1,
        "width": 8, "height": 8, "model_name": "m", "versions": {"sdrun": "0"}}


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------- exclusive writes

WRITERS, TRIALS = 8, 300


def _race(worker: int, folder: Path, barrier, results) -> None:
    """Write trial t's name at the same moment as every other writer; report what happened each time."""
    image = Image.new("RGB", (8, 8), (worker * 30, 0, 0))  # each writer's image is its own: the winner is visible
    outcomes = []
    for trial in range(TRIALS):
        barrier.wait(timeout=30)
        try:
            output.save_png(image, folder / f"{trial}.png", META, overwrite=False)
            outcomes.append("won")
        except output.TargetExists:
            outcomes.append("lost")
        except Exception as error:  # noqa: BLE001 - any other outcome is a failure of the test, reported as such
            outcomes.append(repr(error))
    results.put((worker, outcomes))


def test_of_many_writers_racing_for_one_name_exactly_one_wins_every_time(isolated):
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(WRITERS), context.Queue()
    workers = [context.Process(target=_race, args=(w, isolated, barrier, results)) for w in range(WRITERS)]
    for worker in workers:
        worker.start()
    outcomes = dict(results.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
    for trial in range(TRIALS):
        per_writer = [outcomes[w][trial] for w in range(WRITERS)]
        assert sorted(per_writer) == ["lost"] * (WRITERS - 1) + ["won"], (trial, per_writer)
        winner = per_writer.index("won")
        with Image.open(isolated / f"{trial}.png") as image:
            assert image.getpixel((0, 0)) == (winner * 30, 0, 0)  # the winner's image, never replaced by a loser
    assert leftovers(isolated) == []


def test_without_hard_links_the_name_is_still_claimed_exclusively(isolated, monkeypatch):
    def no_links(*_args):
        raise PermissionError(errno.EPERM, "Operation not permitted")  # what FAT and exFAT answer

    monkeypatch.setattr(os, "link", no_links)
    output.save_png(Image.new("RGB", (8, 8), "red"), isolated / "a.png", META, overwrite=False)
    with pytest.raises(output.TargetExists):
        output.save_png(Image.new("RGB", (8, 8), "blue"), isolated / "a.png", META, overwrite=False)
    with Image.open(isolated / "a.png") as image:
        assert image.getpixel((0, 0)) == (255, 0, 0)
    assert leftovers(isolated) == []


# ---------------------------------------------------------------------------------------------- --skip-existing

def test_skip_existing_refuses_a_file_that_is_not_the_planned_image_before_generating(sdrun):
    Path("s").mkdir()
    Path("s/5.png").write_bytes(b"garbage named like an image")
    result = sdrun("a fox", *TINY, "--seed", "5", "-n", "2", "-o", "s/{seed}.png", "--skip-existing")
    assert result.exit_code == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "s/5.png is not the image planned for it" in lines[0] and "--overwrite" in lines[0]
    assert Path("s/5.png").read_bytes() == b"garbage named like an image" and not Path("s/6.png").exists()


def test_skip_existing_never_keeps_another_prompts_images_and_overwrite_replaces_them(sdrun):
    assert sdrun("a cat", *TINY, "--seed", "5", "-n", "2", "-o", "s/{index}.png").exit_code == 0
    before = Path("s/0.png").read_bytes()
    result = sdrun("a dog", *TINY, "--seed", "5", "-n", "2", "-o", "s/{index}.png", "--skip-existing")
    assert result.exit_code == 1 and "its prompt is 'a cat', not 'a dog'" in result.stderr, result
    assert Path("s/0.png").read_bytes() == before
    result = sdrun("a dog", *TINY, "--seed", "5", "-n", "2", "-o", "s/{index}.png", "--overwrite")
    assert result.exit_code == 0 and meta("s/0.png")["prompt"] == "a dog"


def test_skip_existing_does_not_count_a_truncated_image(sdrun):
    args = ("a fox", *TINY, "--seed", "5", "-o", "t.png")
    assert sdrun(*args).exit_code == 0
    Path("t.png").write_bytes(Path("t.png").read_bytes()[:-40])  # metadata intact, image data cut short
    result = sdrun(*args, "--skip-existing")
    assert result.exit_code == 1 and "not a complete PNG" in result.stderr


def test_temporaries_of_killed_writers_are_removed_and_never_count_as_done(sdrun):
    args = ("a fox", *TINY, "--seed", "5", "-n", "2", "-o", "t/{seed}.png")
    assert sdrun(*args).exit_code == 0
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = Path(f"t/.6.png.sdrun-{dead.pid}-abcd1234.tmp")  # a complete image whose writer was killed before
    os.replace("t/6.png", stale)                              # giving it its name
    live = Path(f"t/.6.png.sdrun-{os.getpid()}-abcd1234.tmp")  # a writer that is still running
    shutil.copy(stale, live)
    result = sdrun(*args, "--skip-existing", "--json")
    assert result.exit_code == 0, result
    assert sorted((r["seed"], r["status"]) for r in result.records()) == [(5, "skipped"), (6, "ok")]
    assert not stale.exists() and live.exists() and Path("t/6.png").is_file()


# ---------------------------------------------------------------------------------------------- odd targets

@pytest.mark.parametrize("mode", [(), ("--overwrite",), ("--skip-existing",)], ids=["plain", "overwrite", "skip"])
def test_a_folder_at_a_planned_name_fails_that_item_only(sdrun, mode):
    Path("d/6.png").mkdir(parents=True)
    result = sdrun("a fox", *TINY, "--seed", "5", "-n", "3", "-o", "d/{seed}.png", "--json", *mode)
    assert result.exit_code == 3, result
    records = {r["seed"]: r for r in result.records()}
    assert {seed: r["status"] for seed, r in records.items()} == {5: "ok", 6: "failed", 7: "ok"}
    assert "d/6.png is a folder" in records[6]["error"] and "Traceback" not in result.stderr
    assert Path("d/6.png").is_dir() and "2 done, 0 skipped, 1 failed of 3" in result.stderr


def test_a_full_disk_stops_the_batch_with_one_line_and_leaves_no_partial_file(sdrun, monkeypatch):
    def full(self, file, *_args, **_kwargs):
        file.write(b"\x89PNG\r\n\x1a\n half an image")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    result = sdrun("a fox", *TINY, "--seed", "1", "-n", "3", "-o", "full/{seed}.png", "--json")
    assert result.exit_code == 1, result
    records = result.records()
    assert len(records) == 1 and records[0]["status"] == "failed"  # later images were not attempted
    assert "no space left in 'full'" in records[0]["error"] and "--skip-existing" in records[0]["error"]
    assert "0 done, 0 skipped, 1 failed of 3" in result.stderr and "Traceback" not in result.stderr
    assert list(Path("full").iterdir()) == []


@pytest.mark.parametrize("target", ["a/b/c/", None], ids=["nested", "default"])
def test_a_model_that_fails_to_load_leaves_no_output_folder(sdrun, isolated, target):
    Path("bogus.safetensors").write_bytes(b"this is not a checkpoint")
    result = sdrun("a fox", "--model", "bogus.safetensors", "--steps", "1", *(("-o", target) if target else ()))
    assert result.exit_code == 1, result
    assert sorted(p.name for p in isolated.iterdir()) == ["bogus.safetensors"]


def test_decode_refuses_a_name_that_is_not_png_and_takes_a_folder_like_run(sdrun):
    save_latents(torch.zeros(1, 4, 8, 8), Path("x.latents.safetensors"), {**META, "model": "tiny", "seed": 3, "prompt": "a fox"})
    result = sdrun("decode", "x.latents.safetensors", "-o", "x.jpg")
    assert result.exit_code == 2 and "not a .png file" in result.stderr and not Path("x.jpg").exists()
    result = sdrun("decode", "x.latents.safetensors", "-o", "decoded/")
    assert result.exit_code == 0, result
    assert Path("decoded/3-a-fox.png").is_file()


# ---------------------------------------------------------------------------------------------- names

BAD_TEMPLATES = ["out/{prompt:d}.png", "out/{seed:99999999999}.png", "out/{seed!z}.png", "out/{index!r}.png"]


@pytest.mark.parametrize("template", BAD_TEMPLATES)
def test_a_formatted_placeholder_is_a_one_line_usage_error(sdrun, isolated, template):
    result = sdrun("a fox", *TINY, "-o", template)
    assert result.exit_code == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "formats a placeholder" in lines[0] and "write plain {" in lines[0]
    assert list(isolated.iterdir()) == []


def test_names_too_long_for_the_file_system_are_shortened_and_stay_distinct(sdrun):
    limit = os.pathconf(".", "PC_NAME_MAX")
    args = ("a very long prompt " * 20, *TINY, "--seed", "1", "-n", "2", "-o", "l/" + "{prompt}" * 6 + "-{seed}.png")
    result = sdrun(*args, "--json")
    assert result.exit_code == 0, result
    paths = [Path(r["path"]) for r in result.records()]
    assert len(set(paths)) == 2
    assert all(p.is_file() and p.suffix == ".png" and len(os.fsencode(p.name)) <= limit for p in paths)
    rerun = sdrun(*args, "--json", "--skip-existing")  # the same names again: a resumed batch finds its images
    assert [r["status"] for r in rerun.records()] == ["skipped", "skipped"], rerun
    result = sdrun("a fox", *TINY, "--seed", "1", "-o", "x" * 400 + "/" + "y" * 400 + ".png")
    assert result.exit_code == 0, result
    written = Path(result.stdout.strip())
    assert written.is_file() and all(len(os.fsencode(part)) <= limit for part in written.parts)


def test_a_shortened_name_is_cut_between_characters():
    name = output.fit_name_lengths(Path("é" * 300 + ".png")).name
    assert name.endswith(".png") and len(os.fsencode(name)) <= output.DEFAULT_NAME_MAX
    assert os.fsencode(name).decode("utf-8").startswith("é" * 50)  # strict UTF-8: no half character left


# ---------------------------------------------------------------------------------------------- prompt-file outputs

def _outside_targets(root: Path) -> dict:
    (root / "elsewhere").mkdir()
    (root / "out").mkdir()
    (root / "out" / "link").symlink_to(root / "elsewhere")
    return {"parent": "../x.png", "climb": "sub/../../x.png", "absolute": str(root / "elsewhere" / "x.png"),
            "symlink": "link/x.png"}


@pytest.mark.parametrize("kind", ["parent", "climb", "absolute", "symlink"])
def test_a_line_output_that_leaves_the_output_folder_is_refused(sdrun, isolated, kind):
    target = _outside_targets(isolated)[kind]
    Path("p.jsonl").write_text(json.dumps({"prompt": "a fox", "output": target}) + "\n")
    result = sdrun("--prompt-file", "p.jsonl", *TINY, "-o", "out/")
    assert result.exit_code == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "line 1: output" in lines[0] and "--allow-outside-output" in lines[0]
    assert not list(isolated.rglob("x.png"))
    allowed = sdrun("--prompt-file", "p.jsonl", *TINY, "-o", "out/", "--allow-outside-output")
    assert allowed.exit_code == 0, allowed
    assert len(list(isolated.rglob("x.png"))) == 1


def test_a_line_output_inside_the_output_folder_is_kept(sdrun, isolated):
    Path("p.jsonl").write_text("\n".join(json.dumps(line) for line in [
        {"prompt": "a fox", "output": "sub/fox.png"},
        {"prompt": "a cat", "output": str(isolated / "out" / "cat.png")},
    ]))
    result = sdrun("--prompt-file", "p.jsonl", *TINY, "-o", "out/")
    assert result.exit_code == 0, result
    assert Path("out/sub/fox-0.png").is_file() and Path("out/cat-1.png").is_file()
