"""Batches from shell scripts and runs that survive failures, through the real CLI on the tiny model (issue 4)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from conftest import TINY, pixels, meta
from sdrun.render import sampling, stages, vae


def test_txt_prompt_file_skips_blanks_and_comments(sdrun):
    Path("p.txt").write_text("# tonight's set\na red fox\n\n  \na blue whale\n# done\n")
    result = sdrun("--prompt-file", "p.txt", *TINY, "--seed", "3", "--json")
    assert result.exit_code == 0, result
    records = result.records()
    assert [(r["prompt"], r["seed"], r["status"]) for r in records] == [("a red fox", 3, "ok"), ("a blue whale", 3, "ok")]
    assert [r["line"] for r in records] == [2, 5]
    assert "2 done, 0 skipped, 0 failed of 2" in result.stderr


def test_jsonl_overrides_per_item(sdrun):
    lines = [
        {"prompt": "a fox", "seed": 10, "num_images": 2, "width": 72, "output": "fox-{seed}.png"},
        {"prompt": "a whale", "steps": 3, "guidance": 2, "scheduler": "euler", "negative_prompt": "fog", "height": 48},
    ]
    Path("p.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    result = sdrun("--prompt-file", "p.jsonl", *TINY, "--seed", "1", "--json", "-o", "out/{prompt}-{seed}.png")
    assert result.exit_code == 0, result
    records = result.records()
    # a line's own output is taken inside the -o folder
    expected = ("out/fox-10.png", "out/fox-11.png", "out/a-whale-1.png")
    assert [r["path"] for r in records] == [str(Path(p)) for p in expected]
    fox = meta("out/fox-11.png")
    assert (fox["seed"], fox["width"], fox["steps"]) == (11, 72, 2)
    whale = meta("out/a-whale-1.png")
    assert (whale["steps"], whale["guidance"], whale["scheduler"], whale["negative_prompt"], whale["height"]) == (
        3, 2, "euler", "fog", 48)


def test_prompts_from_stdin(sdrun):
    result = sdrun("--prompt-file", "-", *TINY, "--seed", "2", input="a fox\na whale\n")
    assert result.exit_code == 0, result
    assert len(result.stdout.splitlines()) == 2


BAD_LINES = "\n".join([
    '{"prompt": "good one", "seed": 1}',
    '{"prompt": "bad key", "sead": 1}',
    '{"prompt": "bad size", "width": 100}',
    'not json at all',
    '{"prompt": "bad type", "steps": "ten"}',
    '{"prompt": "bad scheduler", "scheduler": "warp"}',
    '{"prompt": "good two", "seed": 2}',
])


def test_bad_lines_are_reported_with_line_numbers_before_generation_and_the_rest_goes_on(sdrun):
    Path("p.jsonl").write_text(BAD_LINES)
    result = sdrun("--prompt-file", "p.jsonl", *TINY, "--json")
    assert result.exit_code == 3, result
    records = result.records()
    failed = [r for r in records if r["status"] == "failed"]
    assert [r["line"] for r in failed] == [2, 3, 4, 5, 6]
    assert "unknown key 'sead'" in failed[0]["error"] and "multiple of 8" in failed[1]["error"]
    assert "not valid JSON" in failed[2]["error"] and "must be a number" in failed[3]["error"]
    assert "not a known scheduler" in failed[4]["error"]
    assert records.index(failed[-1]) < records.index(next(r for r in records if r["status"] == "ok"))
    assert sorted(r["prompt"] for r in records if r["status"] == "ok") == ["good one", "good two"]
    assert "2 done, 0 skipped, 5 failed of 7" in result.stderr
    assert "line 2:" in result.stderr  # humans see it on stderr too


def test_fail_fast_stops_on_a_bad_line_before_loading_anything(sdrun, isolated):
    Path("p.jsonl").write_text(BAD_LINES)
    result = sdrun("--prompt-file", "p.jsonl", *TINY, "--fail-fast")
    assert result.exit_code == 2 and "line 2" in result.stderr
    assert not (isolated / "outputs").exists()


def test_seeds_count_up_and_any_image_can_be_made_alone(sdrun):
    assert sdrun("a fox", *TINY, "--seed", "40", "-n", "4", "--batch-size", "2", "-o", "b/{seed}.png").exit_code == 0
    assert sorted(p.name for p in Path("b").iterdir()) == ["40.png", "41.png", "42.png", "43.png"]
    assert [meta(f"b/{s}.png")["seed"] for s in (40, 41, 42, 43)] == [40, 41, 42, 43]
    assert sdrun("a fox", *TINY, "--seed", "42", "-o", "alone.png").exit_code == 0
    assert np.abs(pixels("b/42.png") - pixels("alone.png")).max() <= 2 / 255


def test_skip_existing_finishes_only_the_missing_images(sdrun):
    args = ("a fox", *TINY, "--seed", "5", "-n", "3", "-o", "s/{seed}.png")
    assert sdrun(*args).exit_code == 0
    Path("s/6.png").unlink()
    kept = Path("s/5.png").stat().st_mtime_ns
    result = sdrun(*args, "--skip-existing", "--json")
    assert result.exit_code == 0, result
    assert sorted((r["seed"], r["status"]) for r in result.records()) == [(5, "skipped"), (6, "ok"), (7, "skipped")]
    assert Path("s/5.png").stat().st_mtime_ns == kept and Path("s/6.png").is_file()
    assert "1 done, 2 skipped, 0 failed of 3" in result.stderr


def test_json_lines_describe_each_finished_image(sdrun):
    result = sdrun("a fox", *TINY, "--seed", "8", "-n", "2", "--json", "--vae-slicing")
    assert result.exit_code == 0
    records = result.records()
    assert len(records) == 2
    for record, seed in zip(records, (8, 9)):
        assert record["status"] == "ok" and record["seed"] == seed and record["prompt"] == "a fox"
        assert record["steps"] == 2 and (record["width"], record["height"]) == (64, 64)
        assert record["seconds"] > 0 and record["flags"] == ["vae_slicing"] and Path(record["path"]).is_file()
        assert "peak_gpu_memory_gb" in record
    assert "done" not in result.stdout  # human messages stay on stderr


def inject_decode(monkeypatch, failures):
    """Make the VAE decode fail in the given ways, in order: 'oom' unless tiled, 'nan' once, 'nan' always."""
    real = vae._vae_decode

    def fake(vae, latents, dtype, tiles, notes):
        kind = failures[0] if failures else None
        if kind == "oom-untiled" and tiles is None:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        if kind == "nan-once":
            failures.pop(0)
            return torch.full_like(real(vae, latents, dtype, tiles, notes), float("nan"))
        if kind == "nan-always":
            return torch.full_like(real(vae, latents, dtype, tiles, notes), float("nan"))
        return real(vae, latents, dtype, tiles, notes)

    monkeypatch.setattr(vae, "_vae_decode", fake)
    return real


def test_out_of_memory_in_decode_saves_latents_and_retries_tiled(sdrun, monkeypatch):
    real = inject_decode(monkeypatch, ["oom-untiled"])
    result = sdrun("a fox", *TINY, "--seed", "3", "-W", "128", "-H", "128", "-o", "big.png", "--json")
    assert result.exit_code == 0, result
    assert "out of memory while decoding" in result.stderr
    assert Path("big.latents.safetensors").is_file()
    info = meta("big.png")
    assert info["decode"]["tiled_retry"] is True and info["latents_file"] == "big.latents.safetensors"
    monkeypatch.setattr(vae, "_vae_decode", real)
    # the saved latents decode later, with any memory flags, to the same picture
    result = sdrun("decode", "big.latents.safetensors", "--vae-tiling", "-o", "later.png")
    assert result.exit_code == 0, result
    assert np.abs(pixels("later.png") - pixels("big.png")).max() <= 2 / 255
    assert meta("later.png")["decode_flags"] == ["vae_tiling"] and meta("later.png")["seed"] == 3


def test_decode_refuses_a_file_that_is_not_latents(sdrun):
    Path("x.latents.safetensors").write_bytes(b"garbage")
    result = sdrun("decode", "x.latents.safetensors")
    assert result.exit_code == 2 and "not a latents file" in result.stderr


def test_out_of_memory_in_denoiser_names_the_flags_and_exits_4(sdrun, monkeypatch):
    def oom(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(sampling, "sample", oom)
    result = sdrun("a fox", *TINY, "--seed", "1", "-n", "2", "--batch-size", "2", "--vae-tiling", "--json")
    assert result.exit_code == 4, result
    errors = {r["error"] for r in result.records()}
    assert len(errors) == 1
    message = errors.pop()
    assert "out of GPU memory while denoising" in message
    for flag in ("--max-vram", "--fp16", "--tiled-diffusion", "--model-offload", "smaller --batch-size"):
        assert flag in message


def test_nan_decode_is_redone_in_fp32_and_marked(sdrun, monkeypatch):
    inject_decode(monkeypatch, ["nan-once"])
    result = sdrun("a fox", *TINY, "--seed", "1", "-o", "n.png")
    assert result.exit_code == 0, result
    assert meta("n.png")["decode"]["nan_retry"] is True
    assert np.isfinite(pixels("n.png")).all() and pixels("n.png").std() > 0.01


def test_nan_that_persists_fails_the_item_and_the_batch_goes_on(sdrun, monkeypatch):
    inject_decode(monkeypatch, ["nan-always"])
    Path("p.txt").write_text("a fox\na whale\n")
    result = sdrun("--prompt-file", "p.txt", *TINY, "--seed", "1", "--json")
    assert result.exit_code == 3
    assert [r["status"] for r in result.records()] == ["failed", "failed"]
    assert "NaN even in float32" in result.records()[0]["error"]
    assert not list(Path(".").glob("outputs/*.png"))


def test_fail_fast_stops_at_the_first_failed_item(sdrun, monkeypatch):
    inject_decode(monkeypatch, ["nan-always"])
    Path("p.txt").write_text("a fox\na whale\n")
    result = sdrun("--prompt-file", "p.txt", *TINY, "--fail-fast", "--json")
    assert result.exit_code == 3 and len(result.records()) == 1


def test_replay_makes_the_identical_image(sdrun):
    assert sdrun("a fox", *TINY, "--seed", "12", "--scheduler", "euler-a", "--vae-slicing", "-o", "orig.png").exit_code == 0
    result = sdrun("replay", "orig.png")
    assert result.exit_code == 0, result
    assert result.stdout.strip() == "orig-replay.png"
    assert np.array_equal(pixels("orig.png"), pixels("orig-replay.png"))
    replayed = meta("orig-replay.png")
    assert replayed["flags"] == ["vae_slicing"] and replayed["replayed_from"] == "orig.png"


def test_replay_with_a_changed_setting(sdrun):
    assert sdrun("a fox", *TINY, "--seed", "12", "-o", "orig.png").exit_code == 0
    result = sdrun("replay", "orig.png", "--set", "steps=3", "--set", "prompt=a wolf", "-o", "changed.png")
    assert result.exit_code == 0, result
    changed = meta("changed.png")
    assert (changed["steps"], changed["prompt"], changed["seed"]) == (3, "a wolf", 12)


def test_replay_of_a_gpu_image_on_the_cpu_leaves_out_cuda_flags_when_asked(sdrun):
    assert sdrun("a fox", *TINY, "--seed", "12", "--vae-tiling", "--tile-size", "256", "-o", "orig.png").exit_code == 0
    record = meta("orig.png") | {"flags": ["fp16", "xformers", "vae_tiling"], "device": "cuda"}  # as a GPU run wrote
    info = PngImagePlugin.PngInfo()
    info.add_text("sdrun", json.dumps(record))
    with Image.open("orig.png") as image:
        image.save("gpu.png", pnginfo=info)
    refused = sdrun("replay", "gpu.png", "--device", "cpu")
    assert refused.exit_code == 2 and "--without fp16 --without xformers" in refused.stderr, refused
    assert sdrun("replay", "gpu.png", "--device", "cpu", "--without", "vae-slicing").exit_code == 2  # not recorded
    result = sdrun("replay", "gpu.png", "--device", "cpu", "--without", "--xformers", "--without", "fp16")
    assert result.exit_code == 0, result
    replayed = meta("gpu-replay.png")
    assert replayed["flags"] == ["vae_tiling"] and replayed["left_out_flags"] == ["xformers", "fp16"]
    assert replayed["backend_options"] == {"tile_size": 256}  # the kept flag keeps its options
    assert np.array_equal(pixels("orig.png"), pixels("gpu-replay.png"))  # the CPU image it was made from
    untiled = sdrun("replay", "gpu.png", "--device", "cpu", "--without", "xformers", "--without", "fp16",
                    "--without", "vae-tiling", "-o", "untiled.png")
    assert untiled.exit_code == 0 and meta("untiled.png")["backend_options"] == {}  # its options went with it


def test_replay_refuses_an_image_without_sdrun_metadata(sdrun):
    Image.new("RGB", (8, 8)).save("plain.png")
    result = sdrun("replay", "plain.png")
    assert result.exit_code == 2 and "has no sdrun metadata" in result.stderr
    assert sdrun("replay", "plain.png", "--set", "nonsense").exit_code == 2


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_leaves_complete_files_only_and_a_rerun_finishes_the_set(isolated, stop):
    """Interrupt a real process mid-batch: exit 130, a summary, no partial file; --skip-existing completes it."""
    total = 12
    Path("p.txt").write_text("\n".join(f"prompt number {i}" for i in range(total)))
    command = [sys.executable, "-m", "sdrun", "--prompt-file", "p.txt", "--model", "tiny", "--steps", "20",
               "--seed", "1", "-o", "set/{index}.png"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = process.stdout.readline()  # the first finished image: generation is under way
    assert first.strip().endswith(".png"), process.stderr.read()
    process.send_signal(stop)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert f"done, 0 skipped, 0 failed of {total}" in stderr and "Traceback" not in stderr
    written = sorted(Path("set").iterdir())
    assert 1 <= len(written) < total
    assert all(p.suffix == ".png" and not p.name.startswith(".") for p in written)  # no temporary, no partial
    for path in written:
        pixels(path)  # every file there is a complete PNG
    rerun = subprocess.run(command + ["--skip-existing"], capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert len(list(Path("set").glob("*.png"))) == total
    assert f"{total - len(written)} done, {len(written)} skipped" in rerun.stderr


def test_out_of_memory_outside_a_batch_item_is_one_line_and_exit_4(sdrun, monkeypatch):
    real = inject_decode(monkeypatch, ["oom-untiled"])
    assert sdrun("a fox", *TINY, "--seed", "3", "-o", "big.png").exit_code == 0
    monkeypatch.setattr(vae, "_vae_decode", lambda *_: (_ for _ in ()).throw(torch.OutOfMemoryError("injected")))
    result = sdrun("decode", "big.latents.safetensors", "-o", "later.png")
    assert result.exit_code == 4 and "out of GPU memory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not Path("later.png").exists()
    monkeypatch.setattr(vae, "_vae_decode", real)


def test_the_model_loads_once_for_the_whole_batch(sdrun, monkeypatch):
    from sdrun import models

    loads = []
    real = models.load_pipeline
    monkeypatch.setattr(models, "load_pipeline", lambda *a, **k: loads.append(1) or real(*a, **k))
    Path("p.txt").write_text("a fox\na whale\na heron\n")
    result = sdrun("--prompt-file", "p.txt", *TINY, "--seed", "1", "-n", "2")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 6
    assert len(loads) == 1


# ---------------------------------------------------------------------------------------------- issue 14

def test_an_unexpected_error_fails_only_its_item(sdrun, monkeypatch):
    real = stages.denoise

    def flaky(engine, job, step, canvas):
        if job.prompt == "a whale":
            raise RuntimeError("something sdrun did not foresee\nand its second line")
        return real(engine, job, step, canvas)

    monkeypatch.setitem(stages.STAGES, "denoise", flaky)
    Path("p.txt").write_text("a fox\na whale\na heron\n")
    result = sdrun("--prompt-file", "p.txt", *TINY, "--seed", "1", "--json")
    assert result.exit_code == 3, result
    records = {r["line"]: r for r in result.records()}
    assert {line: r["status"] for line, r in records.items()} == {1: "ok", 2: "failed", 3: "ok"}
    assert records[2]["error"] == ("unexpected RuntimeError: something sdrun did not foresee "
                                   "(SDRUN_DEBUG=1 shows the traceback)")
    assert "2 done, 0 skipped, 1 failed of 3" in result.stderr and "Traceback" not in result.stderr


def test_steps_beyond_the_schedulers_limit_fail_their_line_only(sdrun):
    lines = [{"prompt": "a fox"}, {"prompt": "a whale", "steps": 1001}, {"prompt": "a heron"}]
    Path("p.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    result = sdrun("--prompt-file", "p.jsonl", *TINY, "--seed", "1", "--json")
    assert result.exit_code == 3, result
    assert {r["line"]: r["status"] for r in result.records()} == {1: "ok", 2: "failed", 3: "ok"}
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("source", ["-", "prompts", "p.jsonl"], ids=["stdin", "no-suffix", "jsonl"])
def test_json_lines_after_a_byte_order_mark_are_read_as_json(sdrun, source):
    text = '\ufeff{"prompt": "a fox", "seed": 7}\n{"prompt": "a whale", "seed": 9}\n'
    if source != "-":
        Path(source).write_text(text, encoding="utf-8")
    result = sdrun("--prompt-file", source, *TINY, "--json", input=text if source == "-" else None)
    assert result.exit_code == 0, result
    assert [(r["prompt"], r["seed"]) for r in result.records()] == [("a fox", 7), ("a whale", 9)]


def test_a_byte_order_mark_never_ends_up_in_a_prompt(sdrun):
    Path("p.txt").write_text("\ufeffa fox\n", encoding="utf-8")
    result = sdrun("--prompt-file", "p.txt", *TINY, "--seed", "1", "--json")
    assert result.exit_code == 0 and result.records()[0]["prompt"] == "a fox"


@pytest.mark.slow
def test_two_runs_on_one_folder_write_each_name_once_and_the_loser_reports_it(isolated):
    """A plain run and a --skip-existing run of one batch, started together: whichever writes a name first wins
    it; the other reports that name (failed "already exists", or skipped as done) and never replaces it."""
    names = [f"{index}.png" for index in range(10)]  # enough for both runs to be making images at once
    Path("p.txt").write_text("\n".join(f"prompt number {i}" for i in range(len(names))))
    command = [sys.executable, "-m", "sdrun", "--prompt-file", "p.txt", "--model", "tiny", "--steps", "2",
               "--seed", "1", "-o", "c/{index}.png", "--json"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    runs = {flag: subprocess.Popen(command + list(flag), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=env) for flag in ((), ("--skip-existing",))}
    outcomes = {}  # name -> {run: status}
    for flag, process in runs.items():
        stdout, stderr = process.communicate(timeout=300)
        assert "Traceback" not in stderr, stderr
        records = [json.loads(line) for line in stdout.splitlines()]
        if not records:  # refused while planning: every name was there already, written by the other run
            assert flag == () and process.returncode == 1 and "already exists" in stderr, stderr
            continue
        assert sorted(Path(r["path"]).name for r in records) == sorted(names)
        for record in records:
            outcomes.setdefault(Path(record["path"]).name, {})[flag] = record
        lost = [r for r in records if r["status"] != "ok"]
        if flag:
            assert all(r["status"] == "skipped" for r in lost) and process.returncode == 0
        else:
            assert all(r["status"] == "failed" and "already exists" in r["error"] for r in lost)
            assert process.returncode == (3 if lost else 0)
    for name in names:
        assert [r["status"] for r in outcomes[name].values()].count("ok") == 1, (name, outcomes[name])
        assert meta(f"c/{name}")["prompt"] == f"prompt number {names.index(name)}"
    assert sorted(p.name for p in Path("c").iterdir()) == sorted(names)  # and no temporary left


def test_png_writing_overlaps_the_next_render_and_lines_stay_in_order(sdrun, monkeypatch):
    """Issue 9: an image is encoded and written on the writer thread while the next one renders."""
    import threading
    import time as clock

    from sdrun import batch, output

    events = []
    real_save, real_render = output.save_png, batch.render

    def slow_save(image, path, meta, overwrite):
        events.append(("save-start", path.name, threading.current_thread().name, clock.perf_counter()))
        clock.sleep(0.3)
        real_save(image, path, meta, overwrite)
        events.append(("save-end", path.name, threading.current_thread().name, clock.perf_counter()))

    def timed_render(*args, **kwargs):
        events.append(("render-start", None, threading.current_thread().name, clock.perf_counter()))
        return real_render(*args, **kwargs)

    monkeypatch.setattr(output, "save_png", slow_save)
    monkeypatch.setattr(batch, "render", timed_render)
    result = sdrun("a fox", *TINY, "--seed", "1", "-n", "3", "-o", "w/{seed}.png", "--json")
    assert result.exit_code == 0, result
    assert [r["seed"] for r in result.records()] == [1, 2, 3]
    assert {thread for kind, _, thread, _ in events if kind.startswith("save")} == {"sdrun-writer_0"}
    first_save_end = next(t for kind, name, _, t in events if kind == "save-end" and name == "1.png")
    second_render = [t for kind, _, _, t in events if kind == "render-start"][1]
    assert second_render < first_save_end  # the second image rendered while the first was being written
    assert sorted(p.name for p in Path("w").iterdir()) == ["1.png", "2.png", "3.png"]
