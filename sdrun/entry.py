"""The `sdrun` command (and `python -m sdrun`): interrupts are handled from the first moment, then the CLI runs.

Importing torch, diffusers and transformers takes seconds. Ctrl-C or SIGTERM in that time must end sdrun like
any other interrupt, with the one line "sdrun: interrupted" and exit 130: not a KeyboardInterrupt traceback from
inside some library's import, nor a silent death by signal (exit 143). So this module imports nothing heavy.
"""

import os
import signal

from sdrun import cache
from sdrun.errors import EXIT_INTERRUPTED


def main() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _leave_at_once)
    cache.keep_bytecode_of_read_only_installs()
    cache.scan_installed_packages_once()
    from sdrun.cli import cli

    cli.main()


def unwind_on_interrupt() -> None:
    """Called when a batch starts writing images (the libraries are imported, the model is loaded): from here an
    interrupt unwinds as KeyboardInterrupt, so that the batch ends cleanly: finished images complete, the one in
    progress absent, the summary printed. Job schedulers and `timeout` stop a batch with SIGTERM. Before, an
    interrupt may land inside a library's import, which a KeyboardInterrupt can leave half-done (numpy then
    refuses to load again): leaving at once is the clean end there."""
    import threading

    if threading.current_thread() is threading.main_thread():  # signal handlers can be set only there
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _raise_interrupt)


def _leave_at_once(_signum, _frame) -> None:
    # Nothing is written while sdrun starts, so there is nothing to finish; and an exception raised inside a
    # library's import could be swallowed by it or leave a traceback.
    os.write(2, b"sdrun: interrupted\n")
    os._exit(EXIT_INTERRUPTED)


def _raise_interrupt(_signum, _frame) -> None:
    # A second interrupt while the first unwinds (Ctrl-C pressed again) ends sdrun at once, with no traceback;
    # a temporary file it leaves is removed by the next run in that folder.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _leave_at_once)
    raise KeyboardInterrupt
