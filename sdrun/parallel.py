"""One batch over several GPUs of one host: data parallel through accelerate, one process per GPU.

    sdrun --gpus 2 --prompt-file p.txt ...               # sdrun starts the processes (torch.distributed.run)
    accelerate launch -m sdrun --prompt-file p.txt ...   # the same processes, started by the user

Every process plans the whole batch the same way (the random seeds are drawn by process 0 and broadcast, so the
items, names, seeds and pixels are those of a one-process run), takes its share of consecutive chunks
(accelerate's split_between_processes), loads the model once on its own device and writes its images.

Each process appends one JSON record per item to its own file in a shared folder, flushed as it goes; process 0
reads them all as they come and alone prints the JSON lines, the errors, the progress count and the summary.
Records outlive a process that dies: the items of a process that left no summary record are reported as failed
by process 0 (or, if process 0 itself died, by `sdrun --gpus`). The processes talk through torch.distributed only
while starting (the broadcast, one barrier); never while rendering, so a dead process cannot hang the others.

Processes other than 0 always exit 0: torch's launcher stops every process as soon as one exits non-zero, which
would cut short the others' shares; their outcome is in their records. Under `sdrun --gpus` process 0 exits 0 as
well and leaves the batch's exit code in the folder, for `sdrun --gpus` to exit with (the launcher's own would be
1 for any failure).
"""

import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from sdrun.config import with_seed
from sdrun.console import Reporter
from sdrun.errors import EXIT_INTERRUPTED, UsageError
# sdrun.batch, and with the render it runs diffusers, is imported by the functions that run or merge a share:
# planning a run (`sdrun plan`, --dry-run) needs neither.
if TYPE_CHECKING:
    from sdrun.batch import Summary

FOLDER_ENV = "SDRUN_PROCESSES_DIR"  # set by `sdrun --gpus` for its processes: where their records meet
PLAN_FILE = "plan.json"
EXIT_CODE_FILE = "exit_code"
POLL_SECONDS = 0.2


@dataclass(frozen=True)
class Processes:
    """How many processes share a batch and which one this is: the two attributes of accelerate's PartialState
    that its split_between_processes reads."""

    num_processes: int
    process_index: int


def launched() -> bool:
    """Whether this process is one of several started by a launcher (torchrun, accelerate launch)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def share(chunks: list, processes) -> list:
    """The consecutive chunks that process `processes.process_index` of `processes.num_processes` makes:
    accelerate's split_between_processes (the first len(chunks) % n processes take one chunk more)."""
    from accelerate import PartialState

    with PartialState.split_between_processes(processes, chunks) as mine:
        return list(mine)


def owners(chunks: list[list], num_processes: int) -> dict[int, int]:
    """Item index -> the process that makes it."""
    return {item.index: k for k in range(num_processes)
            for chunk in share(chunks, Processes(num_processes, k)) for item in chunk}


# ---------------------------------------------------------------------------------------------- merging

def merge(plan: dict, files: dict[int, list[dict]]) -> tuple[list[dict], "Summary"]:
    """The failed records of items whose process died before reporting them, and the summary of the whole batch.

    `plan` is what process 0 wrote before rendering (every item described, its owner, the bad-line count);
    `files` maps each process to its records. A process that ended (even early: --fail-fast, a full disk) wrote a
    summary record last; the unreported items of one that did not were lost with it."""
    from sdrun.batch import Summary

    records = [record for process in files.values() for record in process if "status" in record]
    reported = {record["index"] for record in records if "index" in record}
    summaries = {k: record["summary"] for k, process in files.items() for record in process if "summary" in record}
    missing = [{**item, "status": "failed", "error": f"process {owner} ended before making this image (crashed or "
                "was killed): rerun with --skip-existing to make it"}
               for item, owner in zip(plan["items"], plan["owners"])
               if item["index"] not in reported and owner not in summaries]
    count = Counter(record["status"] for record in records + missing)
    summary = Summary(total=len(plan["items"]) + plan["bad_lines"], done=count["ok"], skipped=count["skipped"],
                      failed=count["failed"], out_of_memory=sum(s["out_of_memory"] for s in summaries.values()),
                      disk_full=any(s["disk_full"] for s in summaries.values()))
    return missing, summary


def read_records(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """The complete records of a process's file from `offset` on, and the offset after them (a line still being
    written, or cut short by a crash, has no newline yet: it is left for later)."""
    try:
        with path.open("rb") as file:
            file.seek(offset)
            data = file.read()
    except FileNotFoundError:
        return [], offset
    complete = data[: data.rfind(b"\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()], offset + len(complete)


def _process_file(folder: Path, k: int) -> Path:
    return folder / f"process-{k}.jsonl"


# ---------------------------------------------------------------------------------------------- in each process

@dataclass(frozen=True)
class Group:
    """The processes of one launched batch: accelerate's state and the folder where their records meet."""

    state: object  # accelerate.PartialState
    folder: Path
    for_launcher: bool  # the folder came from `sdrun --gpus`, which removes it and exits with the batch's code

    @property
    def main(self) -> bool:
        return self.state.is_main_process


def join(run, jobs: list) -> tuple[Group | None, list]:
    """The jobs with concrete seeds, and the group this process belongs to (None in a one-process run). Process 0
    draws the random seeds and the folder, and broadcasts them: every process then plans the same items."""
    jobs = [(line, with_seed(job)) for line, job in jobs]
    if not launched():
        return None, jobs
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState(cpu=run.device == "cpu" or not torch.cuda.is_available())  # on GPU: cuda:LOCAL_RANK
    given = os.environ.get(FOLDER_ENV)
    folder = given or (tempfile.mkdtemp(prefix="sdrun-processes-") if state.is_main_process else None)
    folder, seeds = broadcast_object_list([folder, [job.seed for _, job in jobs]])
    jobs = [(line, replace(job, seed=seed)) for (line, job), seed in zip(jobs, seeds)]
    return Group(state, Path(folder), given is not None), jobs


class RecordWriter(Reporter):
    """A process's reporter: each result goes to its record file, flushed at once (process 0 prints them all,
    merged), and the summary is its last record; notes and the progress bar show on process 0 only, the bar
    prefixed with the whole batch's count."""

    def __init__(self, path: Path, reporter: Reporter, merger: "Merger | None"):
        super().__init__(reporter.quiet or merger is None, reporter.json_lines)
        self.file = path.open("a", encoding="utf-8")
        self.merger = merger
        self.write({"pid": os.getpid()})

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, sort_keys=True) + "\n")
        self.file.flush()

    def result(self, record: dict) -> None:
        self.write(record)
        if self.merger is not None:
            self.merger.poll()

    def error(self, message: str) -> None:
        pass  # the failed record carries the message; process 0 prints it

    def summary(self, summary) -> None:
        self.write({"summary": {"out_of_memory": summary.out_of_memory, "disk_full": summary.disk_full}})
        self.file.close()

    def steps(self, total: int, description: str):
        progress = f"[{self.merger.reported}/{self.merger.total}] " if self.merger is not None else ""
        return super().steps(total, progress + description)


def run_share(group: Group, run, items: list, bad_lines: list, reporter: Reporter, planned) -> int:
    """Make this process's share of `items` (all of them planned alike by every process); on process 0, print
    the whole batch's records and summary. Returns the exit code this process ends with."""
    from sdrun.batch import _chunks, _describe, run_items

    batch = list(_chunks(items, run.batch_size))
    index = group.state.process_index
    mine = [item for chunk in share(batch, group.state) for item in chunk]
    if group.main:
        owner = owners(batch, group.state.num_processes)
        plan = {"items": [_describe(item) for item in items], "bad_lines": len(bad_lines),
                "owners": [owner[item.index] for item in items]}
        (group.folder / PLAN_FILE).write_text(json.dumps(plan), encoding="utf-8")
    merger = Merger(group.folder, group.state.num_processes, reporter) if group.main else None
    writer = RecordWriter(_process_file(group.folder, index), reporter, merger)
    # No image is written before every process has checked the files at its planned paths and opened its record
    # file: else one process's fresh image would stand "in the way" of another's plan
    group.state.wait_for_everyone()
    group.state.destroy_process_group()  # the last collective: from here a dead process cannot hang the others
    interrupted = False
    try:
        run_items(run, mine, bad_lines if group.main else [], writer, planned)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if group.main:
            code = merger.finish()  # an interrupted batch too: what was made, and what was not
            code = EXIT_INTERRUPTED if interrupted else code
            if group.for_launcher:
                (group.folder / EXIT_CODE_FILE).write_text(str(code))
            else:
                shutil.rmtree(group.folder, ignore_errors=True)
    return 0 if group.for_launcher or not group.main else code


class Merger:
    """Process 0's view of every process's records: prints them as they arrive, and in the end the records of
    the items lost with a dead process, and the summary of the whole batch."""

    def __init__(self, folder: Path, num_processes: int, reporter: Reporter):
        self.folder = folder
        self.reporter = reporter
        self.plan = json.loads((folder / PLAN_FILE).read_text(encoding="utf-8"))
        self.total = len(self.plan["items"]) + self.plan["bad_lines"]
        self.files = {k: [] for k in range(num_processes)}
        self.offsets = dict.fromkeys(self.files, 0)
        self.reported = 0
        self.start = time.perf_counter()

    def poll(self) -> None:
        for k in self.files:
            records, self.offsets[k] = read_records(_process_file(self.folder, k), self.offsets[k])
            self.files[k] += records
            for record in records:
                if "status" in record:
                    self.print(record)

    def print(self, record: dict) -> None:
        self.reported += 1
        if record["status"] == "failed":
            self.reporter.error(record["error"])
        self.reporter.result(record)

    def running(self) -> list[int]:
        """The processes that have not ended (no summary record) and still run (each wrote its pid first)."""
        return [k for k, records in self.files.items()
                if not any("summary" in record for record in records) and records and _alive(records[0]["pid"])]

    def finish(self) -> int:
        """Wait for every process to end or die, print what is left and the summary; return the exit code."""
        self.poll()
        while self.running():
            time.sleep(POLL_SECONDS)
            self.poll()
        missing, summary = merge(self.plan, self.files)
        for record in missing:
            self.print(record)
        summary.start = self.start
        self.reporter.summary(summary)
        return summary.exit_code


def _alive(pid: int) -> bool:
    """Whether process `pid` of this host still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        pass  # no /proc (macOS): ask the kernel
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


# ---------------------------------------------------------------------------------------------- sdrun --gpus

def process_count(gpus: str, device: str) -> int:
    """How many processes `--gpus N|all` starts: one per GPU, refused when torch sees fewer; with --device cpu,
    N processes on the CPU (the same code path, for testing it anywhere)."""
    if device == "cpu":
        if gpus == "all":
            raise UsageError("--gpus all counts GPUs, but this run is on the CPU (--device cpu): give a number of "
                             "CPU processes, e.g. --gpus 2")
        return int(gpus)
    import torch

    seen = torch.cuda.device_count()
    wanted = seen if gpus == "all" else int(gpus)
    if seen == 0:
        raise UsageError(f"--gpus {gpus} needs CUDA GPUs, but torch sees none: drop --gpus (or add --device cpu "
                         "for CPU processes)")
    if wanted > seen:
        raise UsageError(f"--gpus {gpus} asks for {wanted} GPUs, but torch sees {seen}: use --gpus {seen} or "
                         "--gpus all")
    return wanted


def without_gpus(args: list[str]) -> list[str]:
    """The command line with its --gpus option taken out: what each process runs."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            kept.append(arg)
    return kept


def launch(count: int, args: list[str], reporter: Reporter) -> int:
    """Run `sdrun ARGS` in `count` processes with torch.distributed.run (what `accelerate launch` runs for several
    GPUs), here in this process, and return the batch's exit code. The launcher stops every process when one
    dies, and on Ctrl-C or SIGTERM sends each process one SIGTERM: each ends like a one-process run. Its own
    logging and its ChildFailedError traceback are kept quiet: process 0 (or _outcome) says what happened."""
    from torch.distributed import run as launcher
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    folder = Path(tempfile.mkdtemp(prefix="sdrun-processes-"))
    os.environ[FOLDER_ENV] = str(folder)  # inherited by the processes
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // count)))  # else it warns
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    code = None
    try:
        launcher.run(launcher.parse_args(["--standalone", f"--nproc-per-node={count}", "-m", "sdrun", *args]))
    except ChildFailedError:  # a process died, or exited non-zero (only process 0 may, having finished)
        code = 1
    except SignalException:
        code = EXIT_INTERRUPTED
    try:
        return _outcome(folder, count, code, reporter)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _outcome(folder: Path, count: int, launcher_code: int | None, reporter: Reporter) -> int:
    """The exit code process 0 left; if it died first, the records of the items lost and the summary, merged here."""
    from sdrun.batch import EXIT_SOME_FAILED

    code_file = folder / EXIT_CODE_FILE
    if code_file.is_file():
        code = int(code_file.read_text())
        # process 0 was stopped by the launcher because another process died: items failed, no one interrupted
        return EXIT_SOME_FAILED if code == EXIT_INTERRUPTED and launcher_code == 1 else code
    if not (folder / PLAN_FILE).is_file():  # the processes stopped before planning: they said why on stderr
        return launcher_code or 1
    plan = json.loads((folder / PLAN_FILE).read_text(encoding="utf-8"))
    missing, summary = merge(plan, {k: read_records(_process_file(folder, k))[0] for k in range(count)})
    for record in missing:
        reporter.error(record["error"])
        reporter.result(record)
    reporter.summary(summary)
    return summary.exit_code or launcher_code or 1
