"""One batch over several processes (issue 13): the split and the merging as functions, and a real two-process
run on the CPU giving the files and pixels of a one-process run. The two-GPU run is marked `cuda`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, meta, pixels
from sdrun import parallel
from sdrun.batch import Item
from sdrun.console import Reporter
from sdrun.errors import UsageError


def items(count: int) -> list[Item]:
    return [Item(job=None, seed=100 + i, index=i, path=Path(f"out/{i}.png")) for i in range(count)]


@pytest.mark.parametrize("num_processes", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("count", [0, 1, 2, 5, 9, 16])
def test_shares_cover_every_chunk_once_in_order_and_differ_by_at_most_one(count, num_processes):
    chunks = [[item] for item in items(count)]
    shares = [parallel.share(chunks, parallel.Processes(num_processes, k)) for k in range(num_processes)]
    assert [chunk for share in shares for chunk in share] == chunks
    sizes = [len(share) for share in shares]
    assert sizes == sorted(sizes, reverse=True) and max(sizes) - min(sizes) <= 1  # uneven: the first take more
    owners = parallel.owners(chunks, num_processes)
    assert all(chunk in shares[owners[chunk[0].index]] for chunk in chunks)


def plan(count: int, num_processes: int, bad_lines: int = 0) -> dict:
    owners = parallel.owners([[item] for item in items(count)], num_processes)
    return {"items": [{"index": i, "seed": 100 + i, "path": f"out/{i}.png", "prompt": "p"} for i in range(count)],
            "owners": [owners[i] for i in range(count)], "bad_lines": bad_lines}


def ok(index: int) -> dict:
    return {"status": "ok", "index": index, "path": f"out/{index}.png"}


ENDED = {"summary": {"out_of_memory": 0, "disk_full": False}}


def test_merge_of_processes_that_all_ended():
    missing, summary = parallel.merge(plan(5, 2, bad_lines=1), {
        0: [{"pid": 1}, {"status": "failed", "line": 4, "error": "bad"}, ok(0), ok(1), ok(2), ENDED],
        1: [{"pid": 2}, ok(3), {"status": "skipped", "index": 4}, ENDED]})
    assert missing == []
    assert (summary.total, summary.done, summary.skipped, summary.failed, summary.exit_code) == (6, 4, 1, 1, 3)


def test_merge_reports_the_unmade_items_of_a_process_that_died_as_failed():
    missing, summary = parallel.merge(plan(7, 3), {0: [ok(0), ok(1), ok(2), ENDED], 1: [ok(3)], 2: [ok(5), ENDED]})
    assert [record["index"] for record in missing] == [4]  # process 1 died after one of its two; 6 ended early
    assert missing[0]["status"] == "failed" and missing[0]["seed"] == 104 and missing[0]["path"] == "out/4.png"
    assert "process 1 ended before making this image" in missing[0]["error"]
    assert "--skip-existing" in missing[0]["error"]
    assert (summary.done, summary.failed, summary.total, summary.exit_code) == (5, 1, 7, 3)


def test_merge_keeps_the_worst_outcome_of_any_process():
    oom = {"summary": {"out_of_memory": 1, "disk_full": False}}
    full = {"summary": {"out_of_memory": 0, "disk_full": True}}
    failed = {"status": "failed", "index": 1, "error": "out of GPU memory"}
    assert parallel.merge(plan(2, 2), {0: [ok(0), ENDED], 1: [failed, oom]})[1].exit_code == 4
    assert parallel.merge(plan(2, 2), {0: [ok(0), full], 1: [failed, oom]})[1].exit_code == 1
    assert parallel.merge(plan(2, 2), {0: [ok(0), ENDED], 1: [ok(1), ENDED]})[1].exit_code == 0


def test_records_are_read_up_to_the_last_complete_line(tmp_path):
    path = tmp_path / "process-0.jsonl"
    path.write_text('{"pid": 1}\n{"status": "ok", "ind')
    records, offset = parallel.read_records(path)
    assert records == [{"pid": 1}] and offset == len('{"pid": 1}\n')
    with path.open("a") as file:
        file.write('ex": 0}\n')
    assert parallel.read_records(path, offset) == ([{"status": "ok", "index": 0}], path.stat().st_size)
    assert parallel.read_records(tmp_path / "absent.jsonl") == ([], 0)


def test_process_0_prints_every_process_record_once_and_the_lost_ones_of_a_dead_process(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / parallel.PLAN_FILE).write_text(json.dumps(plan(4, 2)))
    (tmp_path / "process-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"pid": os.getpid()}, ok(0)]))
    (tmp_path / "process-1.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                      for r in [{"pid": int(dead.stdout)}, ok(2)]))
    merger = parallel.Merger(tmp_path, 2, Reporter(json_lines=True))
    with (tmp_path / "process-0.jsonl").open("a") as file:  # process 0 ends after the merger started
        file.write(json.dumps(ok(1)) + "\n" + json.dumps(ENDED) + "\n")
    assert merger.finish() == 3
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in out.splitlines()]
    assert sorted((r["index"], r["status"]) for r in records) == [(0, "ok"), (1, "ok"), (2, "ok"), (3, "failed")]
    assert "process 1 ended before making this image" in err
    assert "3 done, 0 skipped, 1 failed of 4" in err


def test_without_gpus_keeps_every_other_argument():
    args = ["run", "a fox", "--gpus", "2", "-n", "4", "--gpus=all", "--seed", "1"]
    assert parallel.without_gpus(args) == ["run", "a fox", "-n", "4", "--seed", "1"]


NO_GPU = pytest.mark.skipif(torch.cuda.device_count() > 0, reason="checks the refusal on a machine without a GPU")


@pytest.mark.parametrize("gpus, message", [
    pytest.param("2", "--gpus 2 needs CUDA GPUs, but torch sees none", marks=NO_GPU),
    ("0", "--gpus '0' is not a number of GPUs"),
    ("two", "--gpus 'two' is not a number of GPUs"),
])
def test_gpus_that_are_not_there_is_a_one_line_usage_error_before_loading(sdrun, gpus, message):
    result = sdrun("a fox", *TINY, "--gpus", gpus)
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not Path("outputs").exists()


def test_gpus_all_on_the_cpu_asks_for_a_number(sdrun):
    result = sdrun("a fox", *TINY, "--device", "cpu", "--gpus", "all")
    assert result.exit_code == 2 and "give a number of CPU processes" in result.stderr


def test_process_count_refuses_more_gpus_than_torch_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parallel.process_count("all", "auto") == 2 and parallel.process_count("1", "cuda") == 1
    with pytest.raises(UsageError, match="asks for 4 GPUs, but torch sees 2: use --gpus 2 or --gpus all"):
        parallel.process_count("4", "auto")


def test_plan_with_gpus_says_the_figures_are_per_gpu(sdrun):
    result = sdrun("plan", "a fox", *TINY, "--gpus", "2")
    assert result.exit_code == 0, result
    assert "each GPU loads the model and runs this plan" in result.stdout and "per GPU" in result.stdout


def run_processes(count: int, device: str, args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sdrun", "--gpus", str(count), "--device", device, *args]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def same_as_one_process(sdrun, count: int, device: str) -> None:
    """`sdrun --gpus COUNT` and one process make the same files, seeds, records and pixels, and report alike
    (here with a failed item: a folder stands at one planned path, the last, which process COUNT-1 makes)."""
    Path("p.txt").write_text("a red fox\na blue whale\na green frog\n")
    args = ["--prompt-file", "p.txt", *TINY, "-n", "2", "--seed", "7", "--json"]
    for folder in ("one", "many"):
        Path(folder, "7-a-green-frog.png").mkdir(parents=True)  # index 4: the last process's share
    one = sdrun(*args, "--device", device, "-o", "one/")
    many = run_processes(count, device, [*args, "-o", "many/"])
    assert one.exit_code == 3 and many.returncode == 3, many.stderr
    assert "Traceback" not in many.stderr

    def records(stdout: str, folder: str) -> list[dict]:
        found = [json.loads(line.replace(folder + "/", "OUT/")) for line in stdout.splitlines()]
        return sorted(({k: v for k, v in r.items() if k != "seconds"} for r in found), key=lambda r: r["index"])

    assert records(many.stdout, "many") == records(one.stdout, "one")  # each record once, from process 0
    assert [r["status"] for r in records(many.stdout, "many")].count("failed") == 1
    assert many.stderr.count(" done, ") == 1 and "5 done, 0 skipped, 1 failed of 6" in many.stderr
    assert many.stderr.count("is a folder") == 1  # the failed item's error, once
    names = sorted(p.name for p in Path("one").iterdir())
    assert sorted(p.name for p in Path("many").iterdir()) == names and len(names) == 6
    for name in (name for name in names if not Path("one", name).is_dir()):
        assert (pixels(f"many/{name}") == pixels(f"one/{name}")).all(), name
        assert meta(f"many/{name}")["seed"] == meta(f"one/{name}")["seed"]


@pytest.mark.slow
def test_two_cpu_processes_make_the_files_and_pixels_of_one(sdrun):
    same_as_one_process(sdrun, 2, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_make_the_files_and_pixels_of_one(sdrun):
    same_as_one_process(sdrun, 2, "cuda")


@pytest.mark.slow
def test_processes_started_by_a_launcher_share_one_random_seed_and_report_once():
    """torch.distributed.run, what `accelerate launch` runs (its CPU launcher needs MPI): without --seed, process
    0 draws the seed and every process plans with it, so the images are seeds S, S+1, S+2 as in one process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "sdrun", "a fox", *TINY, "--device", "cpu", "-n", "3", "-o", "out/{index}.png", "--json"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert launched.returncode == 0, launched.stderr
    records = sorted((json.loads(line) for line in launched.stdout.splitlines()), key=lambda r: r["index"])
    seeds = [record["seed"] for record in records]
    assert seeds == [seeds[0], seeds[0] + 1, seeds[0] + 2]
    assert [meta(f"out/{i}.png")["seed"] for i in range(3)] == seeds
    assert launched.stderr.count(" done, ") == 1 and "3 done, 0 skipped, 0 failed of 3" in launched.stderr


def test_gpus_refuses_prompts_from_stdin_before_starting_processes(sdrun):
    result = sdrun("--prompt-file", "-", *TINY, "--device", "cpu", "--gpus", "2", input="a fox\n")
    assert result.exit_code == 2 and "write the prompts to a file" in result.stderr
