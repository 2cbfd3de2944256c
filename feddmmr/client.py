"""The client side of federated training: every user is a client that trains on its own windows.

A round's selected clients each start from the global weights, train locally and hand their update
and weight (the number of training targets) to the server's aggregator (``server.FedAvg``); the
server never sees a client's interactions. Two executors produce the same aggregate for the same seed:
- ``sequential``: the reference, one client at a time with ``torch.optim``;
- ``vectorized``: the clients of a round are stacked along a leading dimension and trained together with
  ``torch.func.vmap(grad(...))`` and a batched optimizer step; clients are sorted by their number of
  local steps so that the clients still training at step s are a prefix of the stack (no wasted compute).

Each client draws its batch order and training negatives from its own generator, seeded from
(seed, round, user), so the two executors see identical samples. The loss is the model's
(``model.loss.batch_loss``); this module knows nothing of its terms.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import grad, vmap

from .config import TrainParams
from .data import Prepared, left_pad
from .errors import FeddmmrError
from .memory import MemoryBank
from .model.loss import batch_loss
from .server import FedAvg

CLIENT_OPTIMIZERS = ("sgd", "adam")   # the local optimizer, fresh every round
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def train_windows(data: Prepared) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cut each user's training sequence into windows of ``max_seq_len`` next-item targets.

    Training sequence t = s[:-2]; inputs t[:-1], targets t[1:], cut from the most recent end so
    every training target appears exactly once. Returns inputs [W, L], targets [W, L] (0 = no
    target), the index of each target in the user's sequence [W, L] (0 where no target) and the
    user of each window [W], grouped by user.
    """
    L = data.max_seq_len
    xs, ys, ps, owners = [], [], [], []
    for u in range(data.num_users):
        t = data.sequence(u)[:-2]
        x, y = t[:-1], t[1:]
        idx = np.arange(1, len(t), dtype=np.int64)
        for end in range(len(x), 0, -L):
            start = max(0, end - L)
            xs.append(left_pad(x[start:end], L))
            ys.append(left_pad(y[start:end], L))
            ps.append(left_pad(idx[start:end], L))
            owners.append(u)
    if not xs:
        raise FeddmmrError("no training targets: every user needs at least 4 interactions")
    return np.stack(xs), np.stack(ys), np.stack(ps), np.asarray(owners, dtype=np.int64)


@dataclass
class LocalBatch:
    x: torch.Tensor    # [b, L] input windows
    y: torch.Tensor    # [b, L] next-item targets (0 = none)
    pos: torch.Tensor  # [b, L] index of each target in the client's sequence
    neg: torch.Tensor  # [b, L, N] negatives drawn from items outside the client's training history
    last_epoch: bool   # surprises of the last local epoch feed the client's memory


class ClientPool:
    """Every client's training windows and unseen-item table, built once from the prepared data."""

    def __init__(self, data: Prepared):
        self.data = data
        x, y, pos, owner = train_windows(data)
        self.win_x = torch.from_numpy(x)
        self.win_y = torch.from_numpy(y)
        self.win_pos = torch.from_numpy(pos)
        counts = np.bincount(owner, minlength=data.num_users)
        self.win_start = np.concatenate([[0], np.cumsum(counts)])
        self.num_targets = torch.from_numpy(np.bincount(owner, weights=(y > 0).sum(1), minlength=data.num_users)).long()

    def unseen_items(self, u: int) -> torch.Tensor:
        seen = np.zeros(self.data.num_items + 1, dtype=bool)
        seen[0] = True
        seen[self.data.sequence(u)[:-2]] = True
        return torch.from_numpy(np.flatnonzero(~seen))

    def plan(self, u: int, rnd: int, tp: TrainParams) -> list[LocalBatch]:
        """Client u's local batches for round ``rnd``: shuffled windows and sampled negatives."""
        seed = int(np.random.SeedSequence([tp.seed, rnd, u]).generate_state(1)[0])
        gen = torch.Generator().manual_seed(seed)
        lo, hi = int(self.win_start[u]), int(self.win_start[u + 1])
        unseen = self.unseen_items(u)
        batches = []
        for epoch in range(tp.local_epochs):
            order = torch.randperm(hi - lo, generator=gen) + lo
            for idx in order.split(tp.batch_size):
                x, y = self.win_x[idx], self.win_y[idx]
                pick = (torch.rand(*y.shape, tp.num_negatives, generator=gen) * len(unseen)).long()
                batches.append(LocalBatch(x, y, self.win_pos[idx], unseen[pick], epoch == tp.local_epochs - 1))
        return batches


def _step_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor | None, v: torch.Tensor | None, t: int,
           tp: TrainParams, denom: torch.Tensor | None = None) -> None:
    """In-place client step on stacked clients [a, ...], with torch.optim.Adam's / SGD's arithmetic.

    ``t`` is the step count (the same for every client still training); ``g`` is overwritten;
    ``denom`` is an optional scratch buffer shaped like ``p``.
    """
    if tp.weight_decay:
        g.add_(p, alpha=tp.weight_decay)
    if tp.optimizer == "sgd":
        p.sub_(g, alpha=tp.lr)
        return
    b1, b2 = ADAM_BETAS
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = torch.sqrt(v, out=denom) if denom is not None else v.sqrt()
    denom.div_((1 - b2 ** t) ** 0.5).add_(ADAM_EPS)
    p.addcdiv_(m, denom, value=-tp.lr / (1 - b1 ** t))


def make_optimizer(tensors: list[torch.Tensor], tp: TrainParams) -> torch.optim.Optimizer:
    if tp.optimizer == "sgd":
        return torch.optim.SGD(tensors, lr=tp.lr, weight_decay=tp.weight_decay, foreach=False)
    return torch.optim.Adam(tensors, lr=tp.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=tp.weight_decay,
                            foreach=False)


def _pad_stack(tensors: list[torch.Tensor], rows: int) -> torch.Tensor:
    """Stack per-client batches [b_c, ...] into [a, rows, ...], padding with zeros (no targets)."""
    out = torch.zeros((len(tensors), rows) + tuple(tensors[0].shape[1:]), dtype=tensors[0].dtype)
    for i, t in enumerate(tensors):
        out[i, : len(t)] = t
    return out


@dataclass
class RoundResult:
    state: dict[str, torch.Tensor]  # aggregated global parameters
    train_loss: float               # sample-weighted mean local loss
    clients: int
    steps: int                      # local steps summed over clients
    memory_writes: int = 0          # long-term memory writes of the round's clients
    mean_surprise: float = 0.0      # mean surprise of the last local epoch's targets


def _split_params(model: nn.Module, trainable: set[str] | None):
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = [k for k in params if trainable is None or k in trainable]
    return params, names


def _memory_slots(memory: MemoryBank | None, users: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory item ids and sequence indices [n, K] of ``users`` (one empty slot when there is no memory)."""
    if memory is None:
        z = torch.zeros(len(users), 1, dtype=torch.long, device=device)
        return z, z
    ids, pos = memory.retrieve(users)
    return ids.to(device), pos.to(device)


class _Observations:
    """Targets and surprises of the last local epoch, handed to the memory after local training."""

    def __init__(self):
        self.items: dict[int, list] = {}

    def add(self, u: int, y: torch.Tensor, pos: torch.Tensor, surprise: torch.Tensor) -> None:
        real = y > 0
        self.items.setdefault(u, []).append((y[real].cpu(), pos[real].cpu(), surprise[real].detach().float().cpu()))

    def flush(self, memory: MemoryBank | None) -> tuple[int, float, int]:
        writes, s_sum, n = 0, 0.0, 0
        for u, parts in self.items.items():
            y, pos, sur = (torch.cat(t).numpy() for t in zip(*parts))
            s_sum, n = s_sum + float(sur.sum()), n + len(sur)
            if memory is not None:
                writes += memory.observe(u, y, pos, sur)
        return writes, s_sum, n


def train_round_sequential(model: nn.Module, clients: list[int], pool: ClientPool, rnd: int, tp: TrainParams,
                           trainable: set[str] | None = None, memory: MemoryBank | None = None) -> RoundResult:
    """Reference executor: one client at a time, nn.Module copy + torch.optim, then FedAvg."""
    global_params, names = _split_params(model, trainable)
    device = next(iter(global_params.values())).device
    agg = FedAvg(global_params, names)
    loss_sum, steps = 0.0, 0
    obs = _Observations()
    for u in clients:
        mem_ids, mem_pos = (t[0] for t in _memory_slots(memory, [u], device))
        local = {k: v.clone().requires_grad_(k in names) for k, v in global_params.items()}
        opt = make_optimizer([local[k] for k in names], tp)
        losses = []
        for b in pool.plan(u, rnd, tp):
            opt.zero_grad()
            loss, surprise = batch_loss(model, local, b.x.to(device), b.y.to(device), b.pos.to(device),
                                        b.neg.to(device), mem_ids, mem_pos, tp)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if b.last_epoch:
                obs.add(u, b.y, b.pos, surprise)
            steps += 1
        w = float(pool.num_targets[u])
        agg.add(local, w)
        loss_sum += w * float(np.mean(losses))
    writes, s_sum, n = obs.flush(memory)
    return RoundResult(agg.result(), loss_sum / agg.total_w, len(clients), steps,
                       writes, s_sum / max(n, 1))


def train_round_vectorized(model: nn.Module, clients: list[int], pool: ClientPool, rnd: int, tp: TrainParams,
                           trainable: set[str] | None = None, memory: MemoryBank | None = None) -> RoundResult:
    """All clients of the round trained together (in chunks of ``clients_per_chunk``), then FedAvg."""
    global_params, names = _split_params(model, trainable)
    device = next(iter(global_params.values())).device
    frozen = {k: v for k, v in global_params.items() if k not in names}

    def client_loss(train_p, x, y, pos, neg, mem_ids, mem_pos):
        loss, surprise = batch_loss(model, {**frozen, **train_p}, x, y, pos, neg, mem_ids, mem_pos, tp)
        return loss, (loss.detach(), surprise)

    grad_fn = vmap(grad(client_loss, has_aux=True), randomness="different")
    agg = FedAvg(global_params, names)
    loss_sum, steps = 0.0, 0
    obs = _Observations()
    for lo in range(0, len(clients), tp.clients_per_chunk):
        chunk = clients[lo: lo + tp.clients_per_chunk]
        plans = [pool.plan(u, rnd, tp) for u in chunk]
        order = sorted(range(len(chunk)), key=lambda i: -len(plans[i]))
        chunk, plans = [chunk[i] for i in order], [plans[i] for i in order]
        mem_ids, mem_pos = _memory_slots(memory, chunk, device)
        n_steps = torch.tensor([len(p) for p in plans])
        m = len(chunk)
        P = {k: global_params[k].unsqueeze(0).repeat((m,) + (1,) * global_params[k].dim()) for k in names}
        # Adam's moments and a scratch buffer for its denominator; SGD keeps no state
        slots = ({k: (torch.zeros_like(v), torch.zeros_like(v), torch.empty_like(v)) for k, v in P.items()}
                 if tp.optimizer == "adam" else {})
        loss_tot = torch.zeros(m, device=device)
        for s in range(int(n_steps.max())):
            a = int((n_steps > s).sum())  # clients still training: a prefix of the stack
            batches = [plans[i][s] for i in range(a)]
            rows = max(len(b.x) for b in batches)
            x, y, pos, neg = (_pad_stack([getattr(b, f) for b in batches], rows).to(device)
                              for f in ("x", "y", "pos", "neg"))
            active = {k: P[k][:a] for k in names}
            g, (loss, surprise) = grad_fn(active, x, y, pos, neg, mem_ids[:a], mem_pos[:a])
            loss_tot[:a] += loss
            for i, b in enumerate(batches):
                if b.last_epoch:
                    obs.add(chunk[i], b.y, b.pos, surprise[i, : len(b.y)])
            with torch.no_grad():
                for k in names:  # every client still training is at step s + 1
                    m1, v1, d1 = (t[:a] for t in slots[k]) if slots else (None, None, None)
                    _step_(P[k][:a], g[k], m1, v1, s + 1, tp, d1)
            steps += a
        w = pool.num_targets[torch.tensor(chunk)].to(device=device, dtype=torch.float32)
        agg.add_stacked(P, w)
        loss_sum += float((w * loss_tot / n_steps.to(device)).sum())
    writes, s_sum, n = obs.flush(memory)
    return RoundResult(agg.result(), loss_sum / agg.total_w, len(clients), steps,
                       writes, s_sum / max(n, 1))


@torch.no_grad()
def warm_memories(model: nn.Module, pool: ClientPool, memory: MemoryBank, tp: TrainParams,
                  windows_per_batch: int = 256) -> int:
    """Every client observes its training targets once, with the surprise the current model gives them.

    Used when a stage starts with empty memories, so that every client (and the round-0 evaluation)
    has a memory before its first participation. Returns the long-term writes.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    obs = _Observations()
    batches = [(u, b) for u in range(pool.data.num_users) for b in pool.plan(u, 0, tp) if b.last_epoch]
    empty = torch.zeros(0, dtype=torch.long, device=device)  # no slots: the experts add only their LN bias
    for lo in range(0, len(batches), 64):
        group = batches[lo: lo + 64]
        x, y, pos, neg = (torch.cat([getattr(b, f) for _, b in group]).to(device) for f in ("x", "y", "pos", "neg"))
        logits, _ = model(x, torch.cat([y.unsqueeze(-1), neg], -1), pos, empty, empty, align=False)
        surprise = 1.0 - torch.softmax(logits, -1)[..., 0]
        row = 0
        for u, b in group:
            obs.add(u, b.y, b.pos, surprise[row: row + len(b.y)])
            row += len(b.y)
    model.train(was_training)
    return obs.flush(memory)[0]


EXECUTORS = {"sequential": train_round_sequential, "vectorized": train_round_vectorized}
