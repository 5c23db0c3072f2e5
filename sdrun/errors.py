"""Every error sdrun reports to a user, with the exit code each one ends the process with.

The CLI catches `SdrunError` in one place (cli.main) and prints `str(error)` as one line, plus the hint
"set SDRUN_DEBUG=1 for the traceback". Messages name the problem and the fix, in one sentence each.
"""

EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM, at any moment (sdrun.entry during start-up, then cli.SdrunGroup)


class SdrunError(Exception):
    """A problem sdrun can explain to the user. `exit_code` is the process exit status it causes."""

    exit_code = 1


class UsageError(SdrunError):
    """A bad option value or combination, found before any model is loaded."""

    exit_code = 2


class BackendUnavailable(UsageError):
    """A memory/speed flag the user asked for cannot run here; the message lists every reason."""


class ModelError(SdrunError):
    """The model could not be found, fetched or read."""


class OutputError(SdrunError):
    """The output path cannot be written."""


class OutOfMemory(SdrunError):
    """The GPU ran out of memory; the message names the flags that lower memory for this size."""

    exit_code = 4


class KernelUnavailable(SdrunError):
    """The bundled attention kernel could not be built or loaded; the message says why and what to do."""
