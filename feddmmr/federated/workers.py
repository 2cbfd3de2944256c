"""A round's clients trained on several CPUs: forked worker processes with one torch thread each.

On CPU the chunks of a round (``clients_per_chunk`` clients each) are independent until the server sums
them, so each worker trains whole chunks with the sequential executor and sends back the chunk's summed
update (``server.PartialSum``); the server adds the chunks in their order. The result does not depend on
how many workers there are or which one trains what: every client draws its dropout from its own seed,
and the sum runs in chunk order.

Workers are forked once per stage, so they share the training data and the model without copies. The
model's parameters are moved into shared memory first: the server's in-place update of the global model
(``load_state_dict``) is what every worker trains from in the next round. One thread per process means
no OpenMP threads spin waiting for each other, so a process busy on another core slows a round by the
CPU time it takes, not by stalling every op (see ``runtime``).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import multiprocessing as mp
import os
import pickle
import signal
import threading
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Callable, Iterator, Protocol, runtime_checkable

import torch
from torch import nn

from feddmmr.config import TrainParams
from feddmmr.errors import FeddmmrError, SystemFailure
from feddmmr.federated.client import (
    EXECUTORS,
    ChunkResult,
    ClientPool,
    resolve_executor,
    train_chunk_sequential,
)
from feddmmr.federated.runtime import ThreadPool

PR_SET_PDEATHSIG = 1
PIPELINE = 2          # chunks handed to a worker ahead of its results
TAIL = 16             # the last chunks of a round go out largest first (results held back at most about this many)


def _share_parameters(model: nn.Module) -> None:
    """Move every CPU parameter into anonymous shared memory (inherited by forked children; no /dev/shm file)."""
    for p in model.parameters():
        if p.device.type != "cpu" or p.numel() == 0:
            continue
        buf = mmap.mmap(-1, p.numel() * p.element_size())
        shared = torch.frombuffer(buf, dtype=p.dtype).view(p.shape)
        shared.copy_(p.data)
        p.data = shared


def _unshare_parameters(model: nn.Module) -> None:
    for p in model.parameters():
        p.data = p.data.clone()


def _die_with_parent(parent: int, from_main_thread: bool) -> None:
    """Linux: the kernel kills this worker when the training process dies (a kill -9 leaves no orphans).
    The signal follows the thread that forked, so only a main thread's workers ask for it; the others end
    when their pipe closes."""
    if from_main_thread:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:            # the parent died before prctl took effect
        os._exit(1)


def _serve(conn, model: nn.Module, pool: ClientPool, parent: int, from_main_thread: bool) -> None:
    """A worker's loop: (chunk index, round, chunk, params) in, (index, ChunkResult or None, error) out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the training process's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent(parent, from_main_thread)
    torch.set_num_threads(1)
    model.train()
    while True:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):
            break
        task = pickle.loads(msg)
        if task is None:
            break
        idx, rnd, (users, mem_ids, mem_pos), tp, names, sparse = task
        try:
            out = (idx, train_chunk_sequential(model, users, mem_ids, mem_pos, pool, rnd, tp, names, sparse), None)
        except Exception as exc:  # noqa: BLE001 - handed to the training process, which raises it
            expected = isinstance(exc, FeddmmrError)
            out = (idx, None, (expected, str(exc) if expected else f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        conn.send_bytes(pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL))


class Workers:
    """``n`` forked processes that train chunks of clients for ``train_round_sequential(..., workers=...)``."""

    def __init__(self, model: nn.Module, pool: ClientPool, n: int):
        self.model, self.pool = model, pool
        _share_parameters(model)
        ctx = mp.get_context("fork")
        self.procs, self.conns = [], []
        for _ in range(n):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_serve, daemon=True, args=(there, model, pool, os.getpid(),
                                                                 threading.current_thread() is threading.main_thread()))
            proc.start()
            there.close()
            self.procs.append(proc)
            self.conns.append(here)

    def map(self, rnd: int, chunks: list, tp: TrainParams, names: list[str], sparse: bool) -> Iterator[ChunkResult]:
        """Train ``chunks`` (users, memory ids, memory positions) of round ``rnd``; yields their results in chunk
        order as they arrive, so the server adds each one at once and holds only the few that came early.

        Chunks go out to whichever worker is free, two per worker at a time so that a worker starts its next
        chunk while the last one's update travels back; in order, but the last ``TAIL`` chunks largest first
        (most training targets), so that no worker is left with a big chunk while the others idle."""
        if not self.conns:
            raise FeddmmrError("the training workers were stopped (a round was abandoned); start new ones")
        work = [int(self.pool.num_targets[torch.tensor(users)].sum()) for users, _, _ in chunks]
        head = max(0, len(chunks) - TAIL)
        order = list(range(head)) + sorted(range(head, len(chunks)), key=lambda i: -work[i])
        pending = order[::-1]
        early: dict[int, ChunkResult] = {}
        queued = {conn: 0 for conn in self.conns}
        nxt = 0
        try:
            for _ in range(PIPELINE):
                for conn in self.conns:
                    if pending:
                        self._send(conn, pending.pop(), rnd, chunks, tp, names, sparse)
                        queued[conn] += 1
            while nxt < len(chunks):
                for conn in wait([c for c, n in queued.items() if n]):
                    idx, result = self._receive(conn, rnd)
                    early[idx] = result
                    queued[conn] -= 1
                    if pending:
                        self._send(conn, pending.pop(), rnd, chunks, tp, names, sparse)
                        queued[conn] += 1
                while nxt in early:
                    yield early.pop(nxt)
                    nxt += 1
        finally:
            if nxt < len(chunks):       # abandoned mid-round: chunks still in the pipes would answer the next one
                self.close(abandon=True)

    def _send(self, conn, idx: int, rnd: int, chunks: list, tp, names, sparse) -> None:
        """Tasks are a few KB (``client_chunks``), far below a socket's buffer: this never waits for a worker
        that is itself waiting to send a result (a large task would deadlock the two)."""
        try:
            conn.send_bytes(pickle.dumps((idx, rnd, chunks[idx], tp, names, sparse), protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:
            raise self._stopped(conn, rnd) from None

    def _receive(self, conn, rnd: int) -> tuple[int, ChunkResult]:
        try:
            idx, result, error = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            raise self._stopped(conn, rnd) from None
        if error is not None:
            expected, message, trace = error
            if expected:
                raise FeddmmrError(message)
            raise RuntimeError(f"a training worker failed in round {rnd}: {message}\n\nin the worker:\n{trace}")
        return idx, result

    def _stopped(self, conn, rnd: int) -> SystemFailure:
        proc = self.procs[self.conns.index(conn)]
        proc.join(timeout=5)
        return SystemFailure(f"a training worker (pid {proc.pid}) stopped with exit code {proc.exitcode} in round {rnd} "
                            f"(killed, or out of memory?); the round is lost: run the stage again to resume after "
                            f"the last finished round")

    def close(self, abandon: bool = False) -> None:
        """Stop the workers; ``abandon``: kill them at once (a round given up, its chunks still training)."""
        for proc in self.procs if abandon else []:
            proc.kill()
        for conn in self.conns:
            try:
                conn.send_bytes(pickle.dumps(None))
            except OSError:
                pass
            conn.close()
        for proc in self.procs:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if self.procs:
            _unshare_parameters(self.model)
        self.procs, self.conns = [], []

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(abandon=exc_type is not None)


@runtime_checkable
class Federation(Protocol):
    """The rounds of a stage trained somewhere other than this machine's simulator, handed to
    ``training.stages.train_stage(rounds=...)``: the clients' updates (``__call__``, aggregated by FedAvg as
    ``client.train_round_sequential`` does), the clients' memories and the evaluation, which then live where the
    clients do. ``flower.FlowerRounds`` implements it; the simulator needs none of it (``round_executor``)."""

    description: str              # for the stage log

    def __call__(self, model: nn.Module, clients: list[int], pool: ClientPool, rnd: int, tp: TrainParams,
                 trainable: set[str] | None = None, memory=None):
        """Train round ``rnd``'s ``clients`` from ``model``'s weights: a ``client.RoundResult``."""

    def memory_bank(self, num_users: int, params, feature_sha: dict, modalities: list[str], key: str):
        """The clients' memories of a multimodal stage (a ``memory.MemoryBank`` stand-in)."""

    def warm_memories(self, model: nn.Module, pool: ClientPool, memory, tp: TrainParams) -> int:
        """Fill the memories before round 1 (``client.warm_memories``); the long-term writes."""

    def evaluator(self, data, ks: list[int], batch_size: int):
        """The evaluator of the stage's validation and test (a ``metrics.Evaluator`` stand-in)."""


@dataclass
class RoundExecutor:
    run: Callable                 # (model, clients, pool, rnd, tp, trainable, memory) -> RoundResult
    name: str                     # sequential | vectorized
    workers: Workers | None       # the worker processes the sequential executor trains on (CPU), if any
    description: str              # for the stage log


def round_executor(name: str, model: nn.Module, pool: ClientPool, threads: ThreadPool,
                   stack: contextlib.ExitStack) -> RoundExecutor:
    """The round executor for ``name`` (auto | sequential | vectorized) on the model's device. On CPU the
    sequential executor trains on ``threads.processes()`` worker processes, which live as long as ``stack``;
    evaluation stays in this process with ``threads``."""
    device = next(model.parameters()).device
    name = resolve_executor(name, device)
    processes = threads.processes()
    if name != "sequential" or device.type != "cpu" or processes < 2:
        return RoundExecutor(EXECUTORS[name], name, None, f"{name} executor, {threads.describe()}")
    workers = stack.enter_context(Workers(model, pool, processes))
    threads.count_as_own([proc.pid for proc in workers.procs])
    stack.callback(threads.count_as_own, [])
    return RoundExecutor(functools.partial(EXECUTORS[name], workers=workers), name, workers,
                         f"sequential executor on {processes} worker processes (one torch thread each); "
                         f"evaluation: {threads.describe()}")
