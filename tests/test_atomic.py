"""Crash-safe outputs: a writer killed at every point of a folder swap leaves the whole old or the whole new
output, and the next writer or reader recovers or cleans what it left (fault injection in a real process that
dies with os._exit, so no cleanup code runs)."""
import subprocess
import sys
import textwrap

import pytest

from feddmmr.io import atomic_dir, settle

WRITER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from feddmmr import io
    point, dest, exchange = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "exchange"
    io._step = lambda name: os._exit(9) if name == point else None
    if not exchange:
        io._exchange = lambda a, b: False          # a platform without renameat2: two renames
    with io.atomic_dir(dest, durable=True) as tmp:
        (tmp / "v").write_text("new")
        (tmp / "w").write_text("new")
        if point == "writing":
            os._exit(9)
""")


def killed_writer(dest, point, how):
    r = subprocess.run([sys.executable, "-c", WRITER, point, str(dest), how], capture_output=True, text=True)
    assert r.returncode == (9 if point != "never" else 0), r.stderr


def whole(dest):
    """The output's content: every file of one version, never a mix, never missing."""
    versions = {(dest / f).read_text() for f in ("v", "w")}
    assert len(versions) == 1, versions
    return versions.pop()


POINTS = {"exchange": ["writing", "written", "exchanged", "never"],
          "rename": ["writing", "written", "moved aside", "moved in", "never"]}


@pytest.mark.parametrize("how, point", [(how, p) for how, points in POINTS.items() for p in points])
def test_a_writer_killed_at_any_point_leaves_a_whole_output(tmp_path, how, point):
    dest = tmp_path / "checkpoint"
    dest.mkdir()
    for f in ("v", "w"):
        (dest / f).write_text("old")
    killed_writer(dest, point, how)
    settle(dest)                                   # what the next reader or writer does first
    expected = "old" if point in ("writing", "written", "moved aside") else "new"
    assert whole(dest) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]     # no .tmp or .old left behind
    with atomic_dir(dest) as tmp:                  # and the next write goes through
        for f in ("v", "w"):
            (tmp / f).write_text("next")
    assert whole(dest) == "next" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_the_leftovers_of_a_living_writer_are_left_alone(tmp_path):
    import os
    dest = tmp_path / "out"
    mine = tmp_path / f".out.{os.getpid()}.abcd1234.tmp"
    mine.mkdir()
    dead = tmp_path / ".out.4194304.abcd1234.tmp"         # above pid_max: no such process
    dead.mkdir()
    other = tmp_path / ".out.5.old.tmp"                  # not a leftover of "out"
    other.mkdir()
    settle(dest)
    assert mine.exists() and not dead.exists() and other.exists()


def test_a_resume_state_moved_aside_by_a_killed_swap_is_found_again(tmp_path):
    """Before, a kill between the two renames lost the resume state: the rerun started from round 0."""
    import torch

    from feddmmr.training.resume import Progress, ResumeState
    state = ResumeState(tmp_path / "ck", {"params": 1})
    state.save(Progress(round=7), {"model": {"w": torch.ones(2)}})
    state.dir.rename(state.dir.with_name(f".{state.dir.name}.4194304.old"))   # the writer died before moving in
    progress, parts = ResumeState(tmp_path / "ck", {"params": 1}).load()
    assert progress.round == 7 and torch.equal(parts["model"]["w"], torch.ones(2))
