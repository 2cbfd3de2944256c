"""The client side of federated training: every user is a client that trains on its own windows.

A round's selected clients each start from the global weights, train locally and hand their update
and weight (the number of training targets) to the server's aggregator (``server.FedAvg``); the
server never sees a client's interactions. Two executors produce the same aggregate for the same seed:
- ``sequential``: the reference, one client at a time with ``torch.optim``;
- ``vectorized``: the clients of a round are stacked along a leading dimension and trained together with
  ``torch.func.vmap(grad(...))`` and a batched optimizer step; clients are sorted by their number of
  local steps so that the clients still training at step s are a prefix of the stack (no wasted compute).

Each client draws its batch order and training negatives from its own generator, seeded from
(seed, round, user), so the two executors see identical samples.

Item embeddings are updated sparsely: a client trains on its *local catalogue*, the rows of the items
its round touches (inputs, targets, negatives, memory slots), so its copy, gradient, optimizer state
and update are [R, d] rather than [I+1, d], and the server adds the update into those rows only. The
result equals the dense computation (an untouched row has zero gradient, so neither SGD nor Adam moves
it); only client weight decay, which shrinks every row, needs the whole table (``sparse=False``).
The loss is the model's (``model.loss.batch_loss``); this module knows nothing of its terms.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import grad, vmap

from feddmmr.config import TrainParams
from feddmmr.data.prepare import Prepared, left_pad
from feddmmr.errors import FeddmmrError
from feddmmr.federated.server import FedAvg, PartialSum
from feddmmr.model.loss import batch_loss
from feddmmr.model.memory import MemoryBank
from feddmmr.model.rows import take_rows

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
        self.catalogue = LocalCatalogue(data.num_items)

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


ITEM_TABLE = "sasrec.item_emb.weight"


class LocalCatalogue:
    """A client's local catalogue: the sorted global ids of the items its round touches (inputs, targets,
    negatives, memory slots), 0 (padding) first, and the map from global ids to rows of it.

    Built with two scratch tables of the catalogue's size shared by every client (cleared after use), so
    a client costs time in the items it touches, not in the catalogue."""

    def __init__(self, num_items: int):
        self.mark = torch.zeros(num_items + 1, dtype=torch.bool)
        self.index = torch.zeros(num_items + 1, dtype=torch.long)

    def build(self, batches: list[LocalBatch], mem_ids: torch.Tensor):
        """(rows [R], the batches and memory ids with item ids replaced by their row)."""
        ids = [t.reshape(-1) for b in batches for t in (b.x, b.y, b.neg)] + [mem_ids.reshape(-1)]
        for t in ids:
            self.mark[t] = True
        self.mark[0] = True
        rows = self.mark.nonzero().squeeze(1)                                  # sorted
        self.mark[rows] = False
        self.index[rows] = torch.arange(len(rows))
        local = [LocalBatch(self.index[b.x], self.index[b.y], b.pos, self.index[b.neg], b.last_epoch) for b in batches]
        return rows, local, self.index[mem_ids]


def local_tables(model: nn.Module, params: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The item table's rows and the model's item buffers for local catalogue(s) ``rows`` [R] or [a, R]."""
    return {ITEM_TABLE: take_rows(params[ITEM_TABLE], rows), **model.item_buffers(rows)}


def use_sparse(names: list[str], tp: TrainParams) -> bool:
    """Local catalogues unless a trained item table is touched in every row: by client weight decay, which
    shrinks every row, or by the full-softmax loss, which scores every item."""
    return not (ITEM_TABLE in names and (tp.weight_decay or tp.loss == "full"))


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
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = torch.sqrt(v, out=denom) if denom is not None else v.sqrt()
    denom.div_((1 - b2 ** t) ** 0.5).add_(ADAM_EPS)
    p.addcdiv_(m, denom, value=-tp.lr / (1 - b1 ** t))


class LocalOptimizer:
    """Adam or SGD over a client's local tensors (or the centralized model's): ``_step_``, which is torch.optim's
    single-tensor Adam / SGD bit for bit (tested), without a torch.optim optimizer, whose first construction in a
    process imports torch._dynamo (about 4 s in every training process and every worker on a small CPU)."""

    def __init__(self, tensors: list[torch.Tensor], tp: TrainParams):
        self.tensors, self.tp = tensors, tp
        adam = tp.optimizer != "sgd"
        self.state = [[0, torch.zeros_like(p) if adam else None, torch.zeros_like(p) if adam else None]
                      for p in tensors]

    @torch.no_grad()
    def step(self) -> None:
        """One step of every tensor with a gradient (the others keep their step count, as in torch.optim);
        the gradients are dropped."""
        for p, state in zip(self.tensors, self.state):
            if p.grad is None:
                continue
            state[0] += 1
            _step_(p, p.grad, state[1], state[2], state[0], self.tp)
            p.grad = None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The state as flat tensors for a resume file: ``<i>.step`` and, for Adam, ``<i>.exp_avg`` and
        ``<i>.exp_avg_sq`` of every tensor that has taken a step."""
        out = {}
        for i, (t, m, v) in enumerate(self.state):
            if t:
                out[f"{i}.step"] = torch.tensor(float(t))
                out.update({} if m is None else {f"{i}.exp_avg": m, f"{i}.exp_avg_sq": v})
        return out

    def load_state_tensors(self, flat: dict[str, torch.Tensor]) -> None:
        for i, state in enumerate(self.state):
            if f"{i}.step" in flat:
                state[0] = int(flat[f"{i}.step"])
                if state[1] is not None:
                    state[1].copy_(flat[f"{i}.exp_avg"])
                    state[2].copy_(flat[f"{i}.exp_avg_sq"])


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


def split_params(model: nn.Module, trainable: set[str] | None):
    """(every parameter detached, by name; the names that train: all, or those in ``trainable``)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = [k for k in params if trainable is None or k in trainable]
    return params, names


def _memory_slots(memory: MemoryBank | None, users: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory item ids and sequence indices [n, K] of ``users`` (one empty slot when there is no memory)."""
    if memory is None:
        z = torch.zeros(len(users), 1, dtype=torch.long)
        return z, z
    return memory.retrieve(users)


class _Client:
    """One client's round: its batches and memory slots, in global ids or in its local catalogue."""

    def __init__(self, u: int, plan: list[LocalBatch], mem_ids: torch.Tensor, mem_pos: torch.Tensor,
                 catalogue: LocalCatalogue | None):
        self.u, self.plan, self.mem_pos = u, plan, mem_pos
        self.rows = None                                                 # [R] global ids, or None: every item
        self.batches, self.local_mem = plan, mem_ids
        if catalogue is not None:
            self.rows, self.batches, self.local_mem = catalogue.build(plan, mem_ids)


class _Observations:
    """Targets and surprises of the last local epoch, handed to the memory after local training."""

    def __init__(self):
        self.items: dict[int, list] = {}

    def add(self, u: int, y: torch.Tensor, pos: torch.Tensor, surprise: torch.Tensor) -> None:
        real = y > 0
        self.items.setdefault(u, []).append((y[real].cpu(), pos[real].cpu(), surprise[real].detach().float().cpu()))

    def extend(self, other: "_Observations") -> None:
        for u, parts in other.items.items():
            self.items.setdefault(u, []).extend(parts)

    def flush(self, memory: MemoryBank | None) -> tuple[int, float, int]:
        writes, s_sum, n = 0, 0.0, 0
        for u, parts in self.items.items():
            y, pos, sur = (torch.cat(t).numpy() for t in zip(*parts))
            s_sum, n = s_sum + float(sur.sum()), n + len(sur)
            if memory is not None:
                writes += memory.observe(u, y, pos, sur)
        return writes, s_sum, n


def _clients(users: list[int], mem_ids: torch.Tensor, mem_pos: torch.Tensor, pool: ClientPool, rnd: int,
             tp: TrainParams, sparse: bool) -> list[_Client]:
    """A chunk's clients (``client_chunks``) with their round's plans, in local catalogues if ``sparse``."""
    catalogue = pool.catalogue if sparse else None
    return [_Client(u, pool.plan(u, rnd, tp), mem_ids[i], mem_pos[i], catalogue) for i, u in enumerate(users)]


@dataclass
class ChunkResult:
    """What a chunk of clients trained one after another sends back: their summed update and statistics."""
    update: PartialSum          # sum_i w_i (p_i - global), over the rows the clients touched
    loss_sum: float             # sum_i w_i * mean local loss of client i
    steps: int
    observed: _Observations     # last-epoch targets and surprises, for the memory


def dropout_seed(seed: int, rnd: int, u: int) -> int:
    """Client u's dropout stream in round ``rnd``: the same wherever (which process, which position) it trains."""
    return int(np.random.SeedSequence([seed, rnd, u, 1]).generate_state(1)[0])


def _train_client(model: nn.Module, global_params: dict[str, torch.Tensor], names: list[str], c: _Client,
                  rnd: int, tp: TrainParams, obs: _Observations) -> tuple[dict[str, torch.Tensor], list[float]]:
    """One client's local epochs; returns its trained tensors and per-step losses."""
    device = next(iter(global_params.values())).device
    rows = None if c.rows is None else c.rows.to(device)
    fixed = {**global_params, **({} if rows is None else local_tables(model, global_params, rows))}
    local = {k: fixed[k].clone().requires_grad_(True) for k in names}
    opt = LocalOptimizer([local[k] for k in names], tp)
    mem_ids, mem_pos = c.local_mem.to(device), c.mem_pos.to(device)
    losses = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        gen = torch.cuda.default_generators[device.index or 0] if device.type == "cuda" else torch.default_generator
        gen.manual_seed(dropout_seed(tp.seed, rnd, c.u))                # the generator dropout draws from
        for b, orig in zip(c.batches, c.plan):
            loss, surprise = batch_loss(model, {**fixed, **local}, b.x.to(device), b.y.to(device), b.pos.to(device),
                                        b.neg.to(device), mem_ids, mem_pos, tp)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if b.last_epoch:
                obs.add(c.u, orig.y, orig.pos, surprise)
    return local, losses


def train_chunk_sequential(model: nn.Module, users: list[int], mem_ids: torch.Tensor, mem_pos: torch.Tensor,
                           pool: ClientPool, rnd: int, tp: TrainParams, names: list[str], sparse: bool) -> ChunkResult:
    """Clients ``users`` (memory slots ``mem_ids`` / ``mem_pos`` [n, K]) trained one after another from the
    model's current weights; their updates summed in order."""
    global_params = {k: v.detach() for k, v in model.named_parameters()}
    device = next(iter(global_params.values())).device
    part, obs = PartialSum(global_params, names), _Observations()
    loss_sum, steps = 0.0, 0
    for c in _clients(users, mem_ids, mem_pos, pool, rnd, tp, sparse):
        local, losses = _train_client(model, global_params, names, c, rnd, tp, obs)
        w = float(pool.num_targets[c.u])
        part.add(local, w, None if c.rows is None else {ITEM_TABLE: c.rows.to(device)})
        loss_sum += w * float(np.mean(losses))
        steps += len(losses)
    return ChunkResult(part.finish(), loss_sum, steps, obs)


def client_chunks(clients: list[int], memory: MemoryBank | None, size: int) -> list[tuple]:
    """The round's clients in chunks of ``size``: (users, memory ids [n, K], memory positions [n, K]) each.
    Each chunk owns its tensors (no view of the whole round's slots), so a chunk sent to a worker is a few KB."""
    mem_ids, mem_pos = _memory_slots(memory, clients)
    return [(clients[lo: lo + size], mem_ids[lo: lo + size].clone(), mem_pos[lo: lo + size].clone())
            for lo in range(0, len(clients), size)]


def train_round_sequential(model: nn.Module, clients: list[int], pool: ClientPool, rnd: int, tp: TrainParams,
                           trainable: set[str] | None = None, memory: MemoryBank | None = None,
                           sparse: bool | None = None, workers=None) -> RoundResult:
    """Reference executor: one client at a time with torch.optim, in chunks of ``clients_per_chunk`` whose
    summed updates the server adds in order (FedAvg).

    ``sparse``: train on local catalogues (default: unless weight decay needs the whole item table).
    ``workers``: a ``workers.Workers`` pool that trains the chunks in parallel processes, with the same result.
    """
    global_params, names = split_params(model, trainable)
    sparse = use_sparse(names, tp) if sparse is None else sparse
    chunks = client_chunks(clients, memory, tp.clients_per_chunk)
    if workers is None:
        results = (train_chunk_sequential(model, *chunk, pool, rnd, tp, names, sparse) for chunk in chunks)
    else:
        results = workers.map(rnd, chunks, tp, names, sparse)
    agg, obs = FedAvg(global_params, names), _Observations()
    loss_sum, steps = 0.0, 0
    for r in results:                   # in chunk order, each added as it comes
        agg.add_partial(r.update)
        obs.extend(r.observed)
        loss_sum, steps = loss_sum + r.loss_sum, steps + r.steps
    writes, s_sum, n = obs.flush(memory)
    return RoundResult(agg.result(), loss_sum / agg.total_w, len(clients), steps, writes, s_sum / max(n, 1))


def _padded_rows(chunk: list[_Client]) -> torch.Tensor:
    """Local catalogues of a chunk padded to one size [a, R]; padding rows are item 0 and never referenced,
    so their update is zero."""
    return _pad_stack([c.rows.unsqueeze(-1) for c in chunk], max(len(c.rows) for c in chunk)).squeeze(-1)


def _train_chunk(grad_fn, model: nn.Module, global_params: dict[str, torch.Tensor], names: list[str],
                 chunk: list[_Client], rows: torch.Tensor | None, tp: TrainParams, obs: _Observations):
    """Train a chunk of clients together, stacked along dim 0 (``rows`` [a, R]: their local catalogues, or
    None: dense). Returns their trained tensors [a, ...], mean local loss [a] and local steps."""
    device = next(iter(global_params.values())).device
    a_all = len(chunk)
    cat = {} if rows is None else local_tables(model, global_params, rows)                  # [a, R, ...]
    P = {k: cat[k] if k in cat else global_params[k].unsqueeze(0).repeat((a_all,) + (1,) * global_params[k].dim())
         for k in names}
    fixed = {k: v for k, v in cat.items() if k not in names}
    mem_ids = torch.stack([c.local_mem for c in chunk]).to(device)
    mem_pos = torch.stack([c.mem_pos for c in chunk]).to(device)
    n_steps = torch.tensor([len(c.plan) for c in chunk])
    # Adam's moments and a scratch buffer for its denominator; SGD keeps no state
    slots = ({k: (torch.zeros_like(v), torch.zeros_like(v), torch.empty_like(v)) for k, v in P.items()}
             if tp.optimizer == "adam" else {})
    loss_tot = torch.zeros(a_all, device=device)
    steps = 0
    for s in range(int(n_steps.max())):
        a = int((n_steps > s).sum())  # clients still training: a prefix of the stack
        batches = [c.batches[s] for c in chunk[:a]]
        width = max(len(b.x) for b in batches)
        x, y, pos, neg = (_pad_stack([getattr(b, f) for b in batches], width).to(device)
                          for f in ("x", "y", "pos", "neg"))
        g, (loss, surprise) = grad_fn({k: P[k][:a] for k in names}, {k: v[:a] for k, v in fixed.items()},
                                      x, y, pos, neg, mem_ids[:a], mem_pos[:a])
        loss_tot[:a] += loss
        for i, c in enumerate(chunk[:a]):
            if c.plan[s].last_epoch:
                obs.add(c.u, c.plan[s].y, c.plan[s].pos, surprise[i, : len(c.plan[s].y)])
        with torch.no_grad():
            for k in names:  # every client still training is at step s + 1
                m1, v1, d1 = (t[:a] for t in slots[k]) if slots else (None, None, None)
                _step_(P[k][:a], g[k], m1, v1, s + 1, tp, d1)
        steps += a
    return P, loss_tot / n_steps.to(device), steps


def train_round_vectorized(model: nn.Module, clients: list[int], pool: ClientPool, rnd: int, tp: TrainParams,
                           trainable: set[str] | None = None, memory: MemoryBank | None = None,
                           sparse: bool | None = None) -> RoundResult:
    """All clients of the round trained together (in chunks of ``clients_per_chunk``), then FedAvg."""
    global_params, names = split_params(model, trainable)
    device = next(iter(global_params.values())).device
    sparse = use_sparse(names, tp) if sparse is None else sparse

    def client_loss(train_p, cat, x, y, pos, neg, mem_ids, mem_pos):
        loss, surprise = batch_loss(model, {**global_params, **cat, **train_p}, x, y, pos, neg, mem_ids, mem_pos, tp)
        return loss, (loss.detach(), surprise)

    grad_fn = vmap(grad(client_loss, has_aux=True), randomness="different")
    agg = FedAvg(global_params, names)
    loss_sum, steps = 0.0, 0
    obs = _Observations()
    for users, mem_ids, mem_pos in client_chunks(clients, memory, tp.clients_per_chunk):
        chunk = _clients(users, mem_ids, mem_pos, pool, rnd, tp, sparse)
        chunk.sort(key=lambda c: -len(c.plan))   # the clients still training at step s are a prefix
        w = pool.num_targets[torch.tensor([c.u for c in chunk])].to(device=device, dtype=torch.float32)
        rows = _padded_rows(chunk).to(device) if sparse else None
        P, mean_loss, n = _train_chunk(grad_fn, model, global_params, names, chunk, rows, tp, obs)
        agg.add_stacked(P, w, None if rows is None else {ITEM_TABLE: rows})
        loss_sum += float((w * mean_loss).sum())
        steps += n
    writes, s_sum, n = obs.flush(memory)
    return RoundResult(agg.result(), loss_sum / agg.total_w, len(clients), steps,
                       writes, s_sum / max(n, 1))


@torch.no_grad()
def warm_memories(model: nn.Module, pool: ClientPool, memory: MemoryBank, tp: TrainParams,
                  users: list[int] | None = None) -> int:
    """Every client (of ``users``, default all) observes its training targets once, with the surprise the
    current model gives them.

    Used when a stage starts with empty memories, so that every client (and the round-0 evaluation)
    has a memory before its first participation. Returns the long-term writes.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    obs = _Observations()
    users = range(pool.data.num_users) if users is None else users
    batches = [(u, b) for u in users for b in pool.plan(u, 0, tp) if b.last_epoch]
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


def resolve_executor(name: str, device: torch.device) -> str:
    """``auto``: the executor that is faster on the device. On the 2-core CPU the sequential loop trains a
    round of 100 ML-1M clients in less time than the stacked one (per-client weights turn every matmul into a
    batched one, and vmap adds dispatch); on a GPU, stacking clients is what fills the device."""
    if name == "auto":
        return "sequential" if device.type == "cpu" else "vectorized"
    return name
