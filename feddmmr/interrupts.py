"""Ctrl-C and SIGTERM end a run as ``KeyboardInterrupt``, but never halfway through a call that must finish.

A ``KeyboardInterrupt`` raised inside a tracking-store write (an sqlite transaction, an HTTP request)
can leave the store locked, so the run could no longer be marked KILLED. Such calls run ``shielded()``:
a signal that arrives meanwhile is held and raised as soon as the call returns.
"""
from __future__ import annotations

import contextlib
import signal
import threading

_depth = 0      # how many shielded() blocks are open
_held = False   # a signal arrived inside one


def _handler(signum, frame):
    global _held
    if _depth:
        _held = True
        return
    raise KeyboardInterrupt


def install() -> None:
    """Route SIGINT and SIGTERM (docker stop, a Prefect cancellation, `dvc exp` cancel) through the handler."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _handler)
        signal.signal(signal.SIGTERM, _handler)


@contextlib.contextmanager
def shielded():
    """Run the block to its end; a signal that arrived during it is raised when it leaves."""
    global _depth, _held
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _held:
            _held = False
            raise KeyboardInterrupt
