"""Everything sdrun tells a person goes to stderr through one rich Console; stdout carries only results
(one written path per line, or one JSON object per line under --json), so scripts can read it.

Progress bars show only when stderr is a terminal and -q was not given.
"""

import contextlib
import json

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

stderr = Console(stderr=True, highlight=False)


class Reporter:
    def __init__(self, quiet: bool = False, json_lines: bool = False):
        self.quiet = quiet
        self.json_lines = json_lines
        self.live = not quiet and stderr.is_terminal

    @contextlib.contextmanager
    def status(self, message: str):
        """A spinner while something without steps runs (loading the model)."""
        if self.live:
            with stderr.status(message + "..."):
                yield
        else:
            yield

    @contextlib.contextmanager
    def steps(self, total: int, description: str):
        """A progress bar over denoising steps; yields a callback taking the number of steps done."""
        if not self.live:
            yield lambda done: None
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=stderr, transient=True) as progress:
            task = progress.add_task(description, total=total)
            yield lambda done: progress.update(task, completed=done)

    def note(self, message: str) -> None:
        if not self.quiet:
            stderr.print(message, markup=False, soft_wrap=True)

    def error(self, message: str) -> None:
        stderr.print(f"sdrun: error: {message}", style="red", markup=False, soft_wrap=True)

    def summary(self, summary) -> None:
        """The batch's last line (a batch.Summary)."""
        self.note(summary.line())

    def result(self, record: dict) -> None:
        """One finished, skipped or failed image: a JSON line, or the written path."""
        if self.json_lines:
            click.echo(json.dumps(record, sort_keys=True))
        elif record["status"] == "ok":
            click.echo(record["path"])
