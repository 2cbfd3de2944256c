"""User-facing errors: one line that names the file and the fix; secrets never printed."""
import re

_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]+):[^@/\s]*@", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the password of every URL in it masked: http://user:***@host (MLflow URIs with credentials)."""
    return _USERINFO.sub(r"\1:***@", str(text))


class FeddmmrError(Exception):
    """An error caused by input or configuration; the CLI prints it without a traceback."""

    exit_code = 2
    retryable = False      # the same command may pass when run again (the flow retries it)


class DivergedError(FeddmmrError):
    """Training produced a non-finite loss, weight or score: the run is stopped, never reported."""

    exit_code = 3


class TrackingIncomplete(FeddmmrError):
    """The stage's outputs are written, but the tracking store did not record all of it."""

    exit_code = 4


class ImpossibleMetric(FeddmmrError):
    """Evaluation produced a rank below 1 or a metric outside [0, 1]: a bug, never reported as a result."""

    exit_code = 3


class SystemFailure(FeddmmrError):
    """The machine failed the run, not its input: a worker killed or out of memory, the disk full, an I/O error.
    Running the command again may pass (a training stage resumes after its last finished round)."""

    exit_code = 5
    retryable = True
