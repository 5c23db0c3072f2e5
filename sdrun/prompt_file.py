"""Prompt files (`--prompt-file`): every line read and checked before any work, in bounded time and memory.

A .txt file holds one prompt per line; a .jsonl file (or one whose first prompt line starts with "{") one JSON
object per line, with the job fields of config.py. Only the standard library and sdrun's config: a bad file is
reported before torch, diffusers or transformers are imported (issue 9: the command line answers at once).
"""

import io
import json
import sys
from dataclasses import dataclass, replace

from sdrun.config import MAX_IMAGES, Job, job_from_mapping, validate
from sdrun.errors import UsageError

# A prompt file's bounds, so that any file (or /dev/zero) is read in bounded time and memory; with one run's
# MAX_IMAGES images, they are far past any prompt file a person or a script writes for one run
MAX_PROMPT_FILE_BYTES = 64 * 2**20
MAX_PROMPT_FILE_LINES = 1_000_000


@dataclass(frozen=True)
class BadLine:
    line: int
    message: str


def read_prompt_file(source: str, defaults: Job) -> tuple[list[tuple[int, Job]], list[BadLine]]:
    """Read prompts from a .txt (one per line) or .jsonl (one object per line) file, or '-' for stdin.
    Returns the valid jobs with their line numbers, and every bad line with what is wrong with it."""
    text = _read_bounded(source)
    jsonl = source.endswith(".jsonl") or (not source.endswith(".txt")
                                          and next(_prompt_lines(source, text), (0, ""))[1].startswith("{"))
    jobs, bad, images = [], [], 0
    for number, line in _prompt_lines(source, text):
        try:
            job = _job_from_json(line, defaults) if jsonl else replace(defaults, prompt=line)
            validate(job)
        except UsageError as error:
            bad.append(BadLine(number, str(error)))
            images += 1
        else:
            jobs.append((number, job))
            images += job.num_images
        if images > MAX_IMAGES:
            raise UsageError(f"prompt file {source!r} asks for more than {MAX_IMAGES} images, the most one run makes "
                             f"(line {number} passes it): split it into several files")
    if not jobs and not bad:
        raise UsageError(f"prompt file {source!r} has no prompts: write one per line (# starts a comment)")
    return jobs, bad


def _prompt_lines(source: str, text: str):
    """(line number, stripped text) of each line that holds a prompt; blank lines and # comments are skipped."""
    for number, raw in enumerate(io.StringIO(text, newline=None), start=1):  # lines end in \n, \r\n or \r
        if number > MAX_PROMPT_FILE_LINES:
            raise UsageError(f"prompt file {source!r} has more than {MAX_PROMPT_FILE_LINES} lines: split it into "
                             "several files")
        # A byte-order mark (Windows editors write one) would hide the JSON format and end up in a prompt
        line = raw.removeprefix("\ufeff").strip()
        if line and not line.startswith("#"):
            yield number, line


def _read_bounded(source: str) -> str:
    """The text of a prompt file or stdin ('-'), refused beyond MAX_PROMPT_FILE_BYTES: /dev/zero or an endless
    pipe must not fill the memory."""
    try:
        if source == "-":
            stream = getattr(sys.stdin, "buffer", None)  # a test's or a caller's stdin may be text only
            data = stream.read(MAX_PROMPT_FILE_BYTES + 1) if stream else sys.stdin.read(MAX_PROMPT_FILE_BYTES + 1)
        else:
            with open(source, "rb") as file:
                data = file.read(MAX_PROMPT_FILE_BYTES + 1)
        if len(data) > MAX_PROMPT_FILE_BYTES:
            raise UsageError(f"prompt file {source!r} is larger than {MAX_PROMPT_FILE_BYTES // 2**20} MiB (or "
                             "endless): split it into several files")
        return data.decode("utf-8") if isinstance(data, bytes) else data
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read prompt file {source!r} ({error}): give a readable UTF-8 text file")


def _job_from_json(line: str, defaults: Job) -> Job:
    try:
        data = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as error:
        reason = error.msg if isinstance(error, json.JSONDecodeError) else "nested too deeply"
        raise UsageError(f"not valid JSON ({reason}): write one object per line, e.g. {{\"prompt\": \"a cat\"}}")
    if not isinstance(data, dict) or "prompt" not in data:
        raise UsageError('each line needs an object with a "prompt" key, e.g. {"prompt": "a cat", "seed": 1}')
    return job_from_mapping(data, defaults)
