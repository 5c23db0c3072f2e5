"""The paths a plan writes to, and what stands there already.

- a prompt-file line's own `output` is taken inside the -o folder and may not leave it (--allow-outside-output);
- a file at a planned path is replaced only with --overwrite, and kept only with --skip-existing when it is that
  very image (same prompt, negative prompt, seed, steps, guidance, size, scheduler, model, LoRAs and embeddings):
  else refused;
- a folder there fails only its own item.
"""

import os
from pathlib import Path

from sdrun import adapters, output
from sdrun.config import Job, RunConfig, job_record, short_repr
from sdrun.errors import OutputError, UsageError


def line_template(line: int, job: Job, folder: Path, several: bool) -> str:
    """A prompt-file line's own `output`, taken inside the -o folder."""
    try:
        return output.template_for(str(folder / job.output), several)
    except UsageError as error:
        raise UsageError(f"line {line}: {error}")


def check_inside(line: int, job: Job, path: Path, folder: Path) -> None:
    # Prompt files are often written by other programs: one line must not write anywhere the user did not choose
    if not output.is_inside(path, folder):
        raise UsageError(f"line {line}: output {job.output!r} leads outside the output folder {str(folder)!r} "
                         f"(to {path}): write a path inside it, or pass --allow-outside-output")


def refuse_files_in_the_way(items: list, run: RunConfig) -> None:
    """`items` (batch.Item): a file at a planned path is replaced only with --overwrite, and kept as done only with --skip-existing
    when it is that very image; anything else is refused here. A folder there fails only its own item."""
    present = [item for item in items if os.path.lexists(item.path) and not item.path.is_dir()]
    if not present or run.overwrite:
        return
    if not run.skip_existing:
        raise OutputError(
            f"{present[0].path} already exists ({len(present)} planned file(s) do): "
            "pass --skip-existing to keep them or --overwrite to replace them"
        )
    others = [(item, why) for item in present if (why := differs(item, run))]
    if others:
        item, why = others[0]
        raise OutputError(f"{item.path} is not the image planned for it ({why}; {len(others)} planned file(s) are "
                          "not): --skip-existing keeps only images made with the same settings; pass --overwrite "
                          "to replace them, or choose another -o")


def differs(item, run: RunConfig) -> str | None:
    """Why the file at the path of `item` (a batch.Item) is not its image, or None when it is (so a resumed batch keeps it)."""
    fields = {key: value for key, value in job_record(item.job).items() if key not in ("output", "num_images")}
    planned = {**fields, "seed": item.seed, "model": run.model, **adapters.record(run.adapters, item.job)}
    return _differs_from_file(item.path, planned)


def _differs_from_file(path: Path, planned: dict) -> str | None:
    """Why the file at `path` is not the image that `planned` (metadata keys and values) describes, or None when
    it is. A planned None (the model's own size or scheduler) accepts what the file records: the model decides
    it, and the model is compared too."""
    found = output.finished_metadata(path)
    if found is None:
        return "it is not a complete PNG with sdrun metadata"
    for key, wanted in planned.items():
        have = found.get(key)
        if wanted is None or have == wanted or (key in ("model", "init_image") and _same_file(have, wanted)):
            continue
        return f"its {key.replace('_', ' ')} is {short_repr(have)}, not {short_repr(wanted)}"
    return None


def _same_file(a, b) -> bool:
    """Two spellings of one file or folder ("./m.safetensors" and "m.safetensors", or the absolute path that
    the metadata records)."""
    return isinstance(a, str) and os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
