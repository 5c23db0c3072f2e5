"""Many images from one loaded model: output planning, and a loop that survives failures.

    jobs, bad = read_prompt_file(path, defaults)   # prompt_file.py: every line checked before anything loads
    items = plan_items(jobs, run)                  # seeds S, S+1, ... and one output path per image
    summary = run_items(run, items, bad, reporter) # load once; a failed item is reported, the rest go on

Exit status, from the summary: 0 all done; 3 some items failed; 4 some failed for lack of GPU memory; 1 the disk
filled up (the batch stopped there: no later image could be written either).
"""

import json
import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from sdrun import adapters, backends, hashes, output, pipeline, targets
from sdrun.config import Job, RunConfig, job_record, with_seed
from sdrun.entry import unwind_on_interrupt
from sdrun.errors import OutOfMemory, OutputError, SdrunError, UsageError
from sdrun.prompt_file import BadLine
from sdrun.render.stages import DecodeOutOfMemory, Hooks, render
from sdrun.render.vae import DecodeNotes
from sdrun.schedulers import SAMPLERS

EXIT_SOME_FAILED = 3
EXIT_OUT_OF_MEMORY = OutOfMemory.exit_code


@dataclass(frozen=True)
class Item:
    """One image to make."""

    job: Job
    seed: int
    index: int  # position in the whole run, from 0: deterministic, so reruns map to the same files
    path: Path
    line: int | None = None  # prompt-file line it came from


# ---------------------------------------------------------------------------------------------- planning

def plan_items(jobs: list[tuple[int | None, Job]], run: RunConfig) -> list[Item]:
    """Give every image a seed and an output path; refuse, before the model is loaded, plans where two images
    share a path, where a prompt file's output leaves the -o folder, or where a file stands in the way. Creates
    no folder (the first image does), but removes temporaries that killed sdrun writers left in them."""
    jobs = [(line, with_seed(job)) for line, job in jobs]
    several = sum(job.num_images for _, job in jobs) > 1
    run_template = output.template_for(run.output, several)
    root = output.fixed_folder(run_template)  # where a prompt-file line's own output goes
    items, index = [], 0
    for line, job in jobs:
        template = run_template if job.output is None else targets.line_template(line, job, root, several)
        for k in range(job.num_images):
            seed = job.seed + k
            path = output.render(template, seed, index, job.prompt)
            if job.output is not None and not run.allow_outside_output:
                targets.check_inside(line, job, path, root)
            items.append(Item(job, seed, index, path, line))
            index += 1
    seen = {}
    for item in items:
        if item.path in seen:
            raise UsageError(f"two images would both be written to {item.path}: add {{index}} or {{seed}} to -o")
        seen[item.path] = item
    targets.refuse_files_in_the_way(items, run)
    for folder in sorted({item.path.parent for item in items}):
        output.check_writable(folder)
        output.remove_stale_temporaries(folder)
    return items


# ---------------------------------------------------------------------------------------------- running

@dataclass
class Summary:
    total: int = 0  # images planned, plus bad prompt-file lines
    done: int = 0
    skipped: int = 0
    failed: int = 0
    out_of_memory: int = 0
    disk_full: bool = False  # a write found no space left: the batch stopped, as every later image would fail too
    start: float = field(default_factory=time.perf_counter)

    def line(self) -> str:
        return (f"sdrun: {self.done} done, {self.skipped} skipped, {self.failed} failed of {self.total} "
                f"in {time.perf_counter() - self.start:.1f}s")

    @property
    def exit_code(self) -> int:
        if self.disk_full:
            return output.DiskFull.exit_code
        if self.out_of_memory:
            return EXIT_OUT_OF_MEMORY
        return EXIT_SOME_FAILED if self.failed else 0


def run_items(run: RunConfig, items: list[Item], bad_lines: list[BadLine], reporter, planned) -> Summary:
    """Load the model once, then make every item with its job's render plan (`planned[job]`). A failed item is
    reported and the run goes on, unless --fail-fast or the disk is full. Once generation has started, the summary
    is printed however the run ends, Ctrl-C included; a model that cannot load ends the run with that one error."""
    summary = Summary(total=len(items) + len(bad_lines))
    for bad in bad_lines:
        _fail(summary, reporter, {"line": bad.line}, f"line {bad.line}: {bad.message}")
    todo = []
    for item in items:
        if item.path.is_dir():
            _fail(summary, reporter, _describe(item), str(output.FolderInTheWay(item.path)))
        elif run.skip_existing and targets.differs(item, run) is None:
            _skip(summary, reporter, item)
        else:
            todo.append(item)
    engine = pipeline.load(run, reporter, planned.setup) if todo else None
    if engine is not None:
        planned.refit(engine)
    writer = Writer(run, summary, reporter)
    unwind_on_interrupt()
    try:
        for chunk in _chunks(todo, run.batch_size):
            if summary.disk_full or (run.fail_fast and summary.failed):
                break
            try:
                finished = _render(engine, run, planned[chunk[0].job], chunk, reporter)
            except Exception as error:  # whatever fails is this chunk's failure; KeyboardInterrupt is no Exception
                writer.report()  # the images before it are reported first
                oom = isinstance(error, (OutOfMemory, torch.OutOfMemoryError))
                message = _failure_message(error, engine, run)
                for item in chunk:
                    _fail(summary, reporter, _describe(item), message, oom)
                if oom and engine.device.type == "cuda":
                    if engine.graphs is not None:
                        engine.graphs.release()  # a recording's memory pool is not the cache's to empty
                    torch.cuda.empty_cache()
                continue
            writer.report()  # the previous chunk's files, written while this chunk rendered
            if not summary.disk_full:
                writer.write(finished)
    finally:
        writer.close()  # also on Ctrl-C: the images already made are written, complete
        reporter.summary(summary)
    return summary


def _chunks(items: list[Item], batch_size: int):
    """Consecutive images of the same job, at most batch_size at a time (one denoiser pass each)."""
    chunk = []
    for item in items:
        if chunk and (item.job is not chunk[0].job or len(chunk) == batch_size):
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk


@dataclass(frozen=True)
class Finished:
    """A rendered image ready to be written, with what its JSON line will say."""

    item: Item
    image: object  # PIL image
    meta: dict
    record: dict


def _render(engine, run: RunConfig, plan, chunk: list[Item], reporter) -> list[Finished]:
    """Render one chunk; render() knows nothing of files, so only the bookkeeping of a chunk is here."""
    job = chunk[0].job
    total_steps = sum(stage.calls for stage in plan.stages if stage.name == "denoise")

    def keep_latents(latents: torch.Tensor) -> None:
        for i, item in enumerate(chunk):
            save_latents(latents[i : i + 1], latents_path(item.path), metadata(engine, run, plan, item, DecodeNotes()))
        reporter.note(f"sdrun: out of memory while decoding; latents saved next to {chunk[0].path.name}, "
                      "retrying in VAE tiles")

    label = f"image {chunk[0].index + 1}" + (f"-{chunk[-1].index + 1}" if len(chunk) > 1 else "")
    with pipeline.Timer() as timer, reporter.steps(total_steps, label) as on_step:
        try:
            rendered = render(engine, plan, job, [item.seed for item in chunk], Hooks(on_step, keep_latents))
        except DecodeOutOfMemory:
            raise OutOfMemory(f"out of GPU memory decoding even in VAE tiles; the latents are saved: decode them "
                              f"later with `sdrun decode {latents_path(chunk[0].path)} --cpu-offload`") from None
    peak = max(rendered.stage_peaks) if rendered.stage_peaks else None
    finished = []
    for item, image in zip(chunk, rendered.images):
        meta = metadata(engine, run, plan, item, rendered.notes)
        meta["render"]["measured_peak_gib"] = rendered.stage_peaks
        meta["render"]["measured_seconds"] = rendered.stage_seconds
        meta["render"]["cuda_graph"] = rendered.cuda_graph
        if rendered.notes.tiled_retry:
            meta["latents_file"] = str(latents_path(item.path))
        record = {"status": "ok", "path": str(item.path), **_describe(item), "steps": job.steps,
                  "width": meta["width"], "height": meta["height"], "seconds": round(timer.seconds / len(chunk), 3),
                  "peak_gpu_memory_gb": peak, "flags": list(engine.flags)}
        finished.append(Finished(item, image, meta, record))
    return finished


class Writer:
    """Writes finished images on one background thread, so that PNG encoding (tens of milliseconds an image)
    overlaps the next chunk's render; each outcome is reported on the main thread, in order, exactly once."""

    NOT_WRITTEN = object()  # the disk filled up before this image's turn: not attempted, not reported

    def __init__(self, run: RunConfig, summary: Summary, reporter):
        self.run, self.summary, self.reporter = run, summary, reporter
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdrun-writer")
        self.pending = []  # (finished images, future of their outcomes)

    def write(self, finished: list[Finished]) -> None:
        self.pending.append((finished, self.pool.submit(self._write_all, finished)))

    def _write_all(self, finished: list[Finished]) -> list:
        """On the writer thread: the error of each write, or None. Never replaces a file without --overwrite."""
        outcomes = []
        for entry in finished:
            if any(isinstance(outcome, output.DiskFull) for outcome in outcomes):
                outcomes.append(self.NOT_WRITTEN)
                continue
            try:
                output.save_png(entry.image, entry.item.path, entry.meta, overwrite=self.run.overwrite)
                outcomes.append(None)
            except Exception as error:  # reported as this image's failure, on the main thread
                outcomes.append(error)
        return outcomes

    def report(self) -> None:
        """Wait for the queued writes and report each image: done, skipped (another run wrote this very image)
        or failed."""
        for finished, future in self.pending:
            for entry, outcome in zip(finished, future.result()):
                self._report(entry, outcome)
        self.pending = []

    def _report(self, entry: Finished, outcome) -> None:
        summary, reporter, item = self.summary, self.reporter, entry.item
        if outcome is None:
            summary.done += 1
            reporter.result(entry.record)
        elif outcome is self.NOT_WRITTEN:
            return
        elif isinstance(outcome, output.TargetExists) and self.run.skip_existing \
                and targets.differs(item, self.run) is None:
            _skip(summary, reporter, item)  # another run wrote this name since planning, and it is this very image
        elif isinstance(outcome, output.DiskFull):
            summary.disk_full = True
            _fail(summary, reporter, _describe(item), f"{outcome}; the batch stopped there: rerun it with "
                  "--skip-existing to finish it")
        else:
            message = str(outcome) if isinstance(outcome, OutputError) else _failure_message(outcome, None, self.run)
            _fail(summary, reporter, _describe(item), message)

    def close(self) -> None:
        self.report()
        self.pool.shutdown()


def _skip(summary: Summary, reporter, item: Item) -> None:
    summary.skipped += 1
    reporter.result({"status": "skipped", **_describe(item)})


def _describe(item: Item) -> dict:
    described = {"prompt": item.job.prompt, "seed": item.seed, "index": item.index, "path": str(item.path)}
    if item.line is not None:
        described["line"] = item.line
    return described


def _fail(summary: Summary, reporter, record: dict, message: str, oom: bool = False) -> None:
    summary.failed += 1
    summary.out_of_memory += oom
    reporter.error(message)
    reporter.result({"status": "failed", **record, "error": message})


def _failure_message(error: Exception, engine, run: RunConfig) -> str:
    """One line for a failed item. An error sdrun did not foresee keeps its type, and with SDRUN_DEBUG=1 its
    traceback goes to stderr too (the batch still goes on)."""
    if isinstance(error, torch.OutOfMemoryError):
        return _denoise_oom(engine, run)
    if isinstance(error, SdrunError):
        return str(error)
    if os.environ.get("SDRUN_DEBUG") == "1":
        traceback.print_exception(error)
    first_line = next(iter(str(error).strip().splitlines()), "")
    return f"unexpected {type(error).__name__}: {first_line} (SDRUN_DEBUG=1 shows the traceback)"


def _denoise_oom(engine, run: RunConfig) -> str:
    """Name what would lower memory for this run, from the backends' declared effects, the ones not already on."""
    remedies = [b for b in backends.lowering("denoise", engine.flags) + backends.lowering("weights", engine.flags)]
    if "model_offload" in engine.flags:  # already offloading whole models; sequential offload conflicts with it
        remedies = [b for b in remedies if b.name != "cpu_offload"]
    advice = ", ".join(dict.fromkeys(b.flag for b in remedies))
    advice = "--max-vram GB (sdrun picks the settings)" + (f", {advice}" if advice else "")
    if run.batch_size > 1:
        advice += ", a smaller --batch-size"
    return f"out of GPU memory while denoising: try {advice}, or a smaller size"


# ---------------------------------------------------------------------------------------------- metadata

def metadata(engine, run: RunConfig, plan, item: Item, notes: DecodeNotes) -> dict:
    """Every setting needed to make this image again (`sdrun replay`), and how it was made."""
    import diffusers
    import transformers

    import sdrun

    job = item.job
    width, height = plan.stages[0].width, plan.stages[0].height  # the base size; --hires is recorded as asked
    scheduler = pipeline.scheduler_name(engine, job.scheduler)
    record = job_record(job)
    del record["output"], record["num_images"]
    if job.init_image is not None:  # absolute, like the model's path: replay works from any folder
        record["init_image"] = os.path.abspath(job.init_image)
    return {
        **record,
        "seed": item.seed,
        "width": width,
        "height": height,
        "scheduler": scheduler,
        "sampler": SAMPLERS[scheduler].a1111_name if scheduler in SAMPLERS else scheduler,
        "model": engine.model,
        "model_name": engine.model_name,
        "model_family": engine.family,
        "model_hash": hashes.model_hash(engine.model),
        **adapters.record(run.adapters, job),
        "config_dir": engine.config_dir,
        "vae": run.vae,
        "flags": list(engine.flags),
        "backend_options": dict(run.backend_options),
        "max_vram": run.max_vram,
        "device": engine.device.type,
        "batch_size": run.batch_size,
        "render": plan.record(),
        "decode": notes.record(),
        "versions": {"sdrun": sdrun.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
        **run.extra,
    }


def latents_path(image_path: Path) -> Path:
    return image_path.with_name(image_path.stem + output.LATENTS_SUFFIX)


def save_latents(latents: torch.Tensor, path: Path, meta: dict) -> None:
    """Latents plus the image's metadata, written like a PNG: temporary name, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = output.temporary_file(path)
    os.close(fd)  # safetensors writes by name
    save_file({"latents": latents.detach().to("cpu").contiguous()}, tmp, metadata={"sdrun": json.dumps(meta)})
    os.replace(tmp, path)
