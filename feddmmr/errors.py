"""User-facing errors: one line that names the file and the fix."""


class FeddmmrError(Exception):
    """An error caused by input or configuration; the CLI prints it without a traceback."""
