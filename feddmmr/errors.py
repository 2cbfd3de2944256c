"""User-facing errors: one line that names the file and the fix."""


class FeddmmrError(Exception):
    """An error caused by input or configuration; the CLI prints it without a traceback."""

    exit_code = 2


class DivergedError(FeddmmrError):
    """Training produced a non-finite loss, weight or score: the run is stopped, never reported."""

    exit_code = 3


class TrackingIncomplete(FeddmmrError):
    """The stage's outputs are written, but the tracking store did not record all of it."""

    exit_code = 4
