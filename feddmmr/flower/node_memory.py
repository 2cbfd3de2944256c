"""Client memories kept by the clients: a multimodal stage trained on a federation (``feddmmr.flower``).

Each SuperNode keeps the memories of its users (``NodeMemories``): one snapshot per round of a stage run,
in a folder of its own (``state-dir`` of its node config). The server never holds them. What stands for
them in the round loop is a ``RemoteMemory``: its state is a pointer (``memory.pointer_state``) to the
snapshot the nodes keep, so the loop's round snapshots, its best round, its resume state and the
checkpoint's ``memory.safetensors`` all name node snapshots, and a later stage continues from the one
its start checkpoint names.

    <state-dir>/<run>/round-<r>.safetensors   the node's users (``users``) and their rows of every
                                              ``MemoryBank`` array after round r (round 0: the start)
"""
from __future__ import annotations

import secrets
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from feddmmr.config import MemoryParams
from feddmmr.errors import FeddmmrError
from feddmmr.io import load_tensors, save_tensors
from feddmmr.model.memory import STATE_KEYS, MemoryBank, pointer_state, read_pointer


def run_name(fingerprint: str) -> str:
    """A new stage run's name: its inputs' fingerprint (resume state), and a nonce that keeps two runs with
    the same inputs from writing each other's snapshots."""
    return f"{fingerprint[:16]}-{secrets.token_hex(4)}"


def same_stage_run(a: str, b: str) -> bool:
    """Runs of the same inputs: a resumed run continues the snapshots its saved pointers name."""
    return a.split("-")[0] == b.split("-")[0]


class RemoteMemory:
    """The server's stand-in for the memories of a stage run whose clients keep them (``run``: its name)."""

    def __init__(self, num_users: int, params: MemoryParams, feature_sha: dict[str, str], modalities: list[str],
                 run: str):
        self.num_users, self.params, self.run = num_users, params, run
        self.feature_sha, self.modalities = feature_sha, modalities
        self.round: int | None = None      # the snapshot the nodes use now (None: not started)
        self.start: tuple | None = None    # where the nodes start: None (empty), ("run", run, round), ("bank", bank)
        self.seen = False                  # any client has a memory (a stage that starts empty warms them)
        self.stats: dict[str, float] = {}  # the nodes' memory summary at the last evaluation

    @property
    def participations(self) -> np.ndarray:
        return np.array([int(self.seen)])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return pointer_state(self.run, self.round, self.seen)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """A pointer of this run (resume, best round), of another run (the start checkpoint's), or a
        ``MemoryBank``'s state (a start checkpoint the simulator trained: the nodes get their users' rows)."""
        pointer = read_pointer(state)
        if pointer is None:
            bank = MemoryBank(self.num_users, self.params)
            bank.load_state_dict(state)
            self.start, self.seen = ("bank", bank), bool(bank.participations.any())
        elif same_stage_run(pointer[0], self.run):                     # resume, or the best round
            self.run, self.round, self.seen = pointer[0], pointer[1], pointer[2]
        else:
            self.start, self.seen = ("run", pointer[0], pointer[1]), pointer[2]

    def job(self) -> dict:
        """What a node needs to rebuild its memories of this run."""
        return {"run": self.run, "params": asdict(self.params), "features": self.feature_sha,
                "modalities": self.modalities}

    def summary(self) -> dict[str, float]:
        return dict(self.stats)


def summary_parts(bank: MemoryBank, users: np.ndarray) -> list[float]:
    """What ``MemoryBank.summary`` adds up over ``users``: clients with a memory, their filled long-term
    slots, all filled slots and the frequencies summed over them."""
    seen = bank.participations[users] > 0
    filled = bank.lt_ids[users] > 0
    return [float(seen.sum()), float(filled[seen].sum()), float(filled.sum()), float(bank.lt_freq[users][filled].sum())]


def summary_of(parts: list[list[float]], lt_capacity: int) -> dict[str, float]:
    """``MemoryBank.summary`` of every client from the nodes' ``summary_parts``."""
    seen, filled_seen, filled, freq = (sum(p[i] for p in parts) for i in range(4))
    return {"clients_with_memory": int(seen), "lt_fill": filled_seen / (seen * lt_capacity) if seen else 0.0,
            "lt_mean_freq": freq / filled if filled else 0.0}


class NodeMemories:
    """A SuperNode's snapshots of its users' memories, one per round of each stage run."""

    def __init__(self, folder: str | Path, users: np.ndarray, num_users: int):
        self.folder, self.users, self.num_users = Path(folder), users, num_users

    def path(self, run: str, rnd: int) -> Path:
        return snapshot_path(self.folder, run, rnd)

    def empty(self, params: MemoryParams, comb: torch.Tensor | None) -> MemoryBank:
        return MemoryBank(self.num_users, params, comb)

    def load(self, run: str, rnd: int, params: MemoryParams, comb: torch.Tensor | None) -> MemoryBank:
        """The bank after round ``rnd`` of ``run`` (rows of other nodes' users stay empty)."""
        path = self.path(run, rnd)
        if not path.is_file():
            raise FeddmmrError(f"this SuperNode holds no memories of run {run} round {rnd} ({path}): the stage that "
                               f"wrote them ran on other SuperNodes or another state-dir; train it again here")
        state = load_tensors(path, "client memories of this node", "train the stage again on this federation")
        if not torch.equal(state["users"], torch.from_numpy(self.users)):
            raise FeddmmrError(f"{path} holds other users than this node's partition: keep each node's partition "
                               f"and state-dir together")
        bank = self.empty(params, comb)
        self.put_rows(bank, state)
        return bank

    def put_rows(self, bank: MemoryBank, rows: dict[str, torch.Tensor]) -> None:
        """Write this node's users' rows (``rows[k]``: [len(users), ...]) into ``bank``."""
        for k in STATE_KEYS:
            getattr(bank, k)[self.users] = rows[k].numpy()

    def rows(self, bank: MemoryBank) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(getattr(bank, k)[self.users].copy()) for k in STATE_KEYS}

    def save(self, bank: MemoryBank, run: str, rnd: int) -> None:
        path = self.path(run, rnd)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(path, {"users": torch.from_numpy(self.users), **self.rows(bank)})



def snapshot_path(folder: str | Path, run: str, rnd: int) -> Path:
    if not run.replace("-", "").isalnum():
        raise FeddmmrError(f"bad memory run name {run!r}")
    return Path(folder) / run / f"round-{rnd}.safetensors"


def keep_only(folder: str | Path, run: str, rnd: int) -> None:
    """Drop every snapshot of ``run`` in a node's ``folder`` but round ``rnd`` (the one its checkpoint names)."""
    keep = snapshot_path(folder, run, rnd)
    for f in keep.parent.glob("round-*.safetensors"):
        if f != keep:
            f.unlink()
