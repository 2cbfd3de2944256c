"""Per-round training state, so that a stage killed at any point resumes from its last completed round.

The state lives beside the stage's output, in ``.<output name>.resume/`` (``checkpoints/.pretrain_sasrec.resume``),
outside the folder that DVC deletes before it re-runs a stage:

    state.safetensors  tensors, keyed ``<part>:<name>``: the global weights (model), the best round's
                       weights (best), the client memories now and at the best round (memory, best_memory),
                       the server optimizer's moments (server_m, server_v) and the RNG states (rng)
    state.json         the round reached, the training history, best-so-far bookkeeping, the tracking
                       progress, and the fingerprint of everything the state depends on

Both files are replaced together, atomically and fsynced, after every round. A state whose fingerprint
differs from the current run's (other parameters, data, features, start checkpoint or code) belongs to
another run: it is discarded, never mixed in. A finished stage removes its state.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from feddmmr.errors import FeddmmrError
from feddmmr.io import (
    atomic_dir,
    load_tensors,
    read_json,
    save_tensors,
    settle,
    write_json,
)

log = logging.getLogger("feddmmr")
PACKAGE = Path(__file__).resolve().parents[1]   # the feddmmr package


def resume_dir(out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.resume"


def code_sha256() -> str:
    """Hash of the library's source: a state written by other code is not resumed."""
    h = hashlib.sha256()
    for f in sorted(PACKAGE.rglob("*.py")):
        h.update(f.relative_to(PACKAGE).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def fingerprint(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def rng_state() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


@dataclass
class Progress:
    """What the round loop carries from round to round (besides the tensors)."""
    round: int = 0
    history: dict = field(default_factory=dict)
    best_score: float = float("-inf")
    best_round: int = 0
    improved_round: int = 0
    stopped: bool = False          # early stop or last round reached: only writing is left
    server_t: int = 0
    tracking_run: str | None = None
    tracked_round: int = -1        # the last round whose records reached the tracking store
    diverged: str = ""             # why the round after ``round`` was dropped (non-finite), if it was


class ResumeState:
    """Save and load the state of one stage's round loop."""

    def __init__(self, out_dir: str | Path, inputs: dict[str, Any]):
        self.dir = resume_dir(out_dir)
        self.fingerprint = fingerprint(inputs)

    def save(self, progress: Progress, parts: dict[str, dict[str, torch.Tensor]]) -> None:
        tensors = {f"{part}:{k}": v for part, d in parts.items() if d for k, v in d.items()}
        with atomic_dir(self.dir, durable=True) as tmp:
            save_tensors(tmp / "state.safetensors", tensors)
            self._write_meta(tmp, progress)

    def save_progress(self, progress: Progress) -> None:
        """Rewrite the bookkeeping only (the tensors are unchanged)."""
        self._write_meta(self.dir, progress)

    def _write_meta(self, folder: Path, progress: Progress) -> None:
        write_json(folder / "state.json", {"fingerprint": self.fingerprint, **progress.__dict__})

    def load(self) -> tuple[Progress, dict[str, dict[str, torch.Tensor]]] | None:
        """The saved state, or None when there is none or it belongs to another run (then it is discarded)."""
        settle(self.dir)              # a writer killed mid-swap: its whole old state comes back
        meta_file = self.dir / "state.json"
        if not meta_file.is_file():
            return None
        try:
            meta = read_json(meta_file, "resume state")
            flat = load_tensors(self.dir / "state.safetensors", "resume state", "")
        except FeddmmrError as exc:
            log.warning("discarding unreadable resume state %s (%s)", self.dir, exc)
            self.clear()
            return None
        if meta.pop("fingerprint", None) != self.fingerprint:
            log.info("discarding the resume state in %s: it was written with other parameters, data or code",
                     self.dir)
            self.clear()
            return None
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            part, _, name = key.partition(":")
            parts.setdefault(part, {})[name] = value
        return Progress(**meta), parts

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
