"""The server side of federated training: client sampling, FedAvg aggregation and the server optimizer.

The server sees only what clients send back: their update of the trainable tensors and their
weight (number of training targets). It knows nothing of the model beyond tensor names.
"""
from __future__ import annotations

import numpy as np
import torch


def select_clients(num_users: int, fraction: float, rnd: int, seed: int) -> list[int]:
    """Uniform sample without replacement of max(1, round(fraction * U)) clients, seeded per round."""
    m = max(1, min(num_users, int(round(fraction * num_users))))
    rng = np.random.default_rng([seed, rnd])
    return sorted(rng.choice(num_users, size=m, replace=False).tolist())


class FedAvg:
    """Weighted mean of the clients' updates: global + sum_i w_i (p_i - global) / sum_i w_i.

    Averaging updates rather than weights keeps an untouched tensor exactly equal to the global one
    (a weighted mean of equal weights is off by rounding, which a server Adam would turn into a full
    step); tensors outside ``names`` (frozen) are returned bit-identical.

    A client may send some tensors as rows: ``rows[k]`` holds the row indices of ``local[k]`` in the
    global tensor (its local catalogue), and the update is added into those rows only.
    """

    def __init__(self, global_params: dict[str, torch.Tensor], names: list[str]):
        self.global_params, self.names = global_params, names
        self.acc = {k: torch.zeros_like(global_params[k]) for k in names}
        self.total_w = 0.0

    def add(self, local: dict[str, torch.Tensor], weight: float, rows: dict[str, torch.Tensor] | None = None) -> None:
        """One client's trained weights; ``rows[k]`` [R]: local[k] holds only those rows of the global tensor."""
        part = PartialSum(self.global_params, self.names)
        part.add(local, weight, rows)
        self.add_partial(part.finish())

    def add_stacked(self, local: dict[str, torch.Tensor], weights: torch.Tensor,
                    rows: dict[str, torch.Tensor] | None = None) -> None:
        """Several clients' trained weights stacked along dim 0 [a, ...], with weights [a];
        ``rows[k]`` [a, R]: each client's rows of the global tensor."""
        for k in self.names:
            r = (rows or {}).get(k)
            if r is None:
                self.acc[k].add_(torch.tensordot(weights, local[k] - self.global_params[k], dims=1))
            else:
                delta = (local[k] - self.global_params[k][r]) * weights.view(-1, *[1] * (local[k].dim() - 1))
                self.acc[k].index_add_(0, r.flatten(), delta.flatten(0, 1))
        self.total_w += float(weights.sum())

    def add_partial(self, part: "PartialSum") -> None:
        """A group of clients already summed (``PartialSum``); FedAvg of groups equals FedAvg of their clients."""
        for k in self.names:
            rows, total = part.sums[k]
            if rows is None:
                self.acc[k].add_(total)
            else:
                self.acc[k].index_add_(0, rows, total)
        self.total_w += part.total_w

    def result(self) -> dict[str, torch.Tensor]:
        return {k: v + self.acc[k] / self.total_w if k in self.names else v.clone()
                for k, v in self.global_params.items()}


class PartialSum:
    """The weighted sum of a group of clients' updates, sum_i w_i (p_i - global), and their total weight:
    what an intermediate aggregator (a worker that trains a chunk of clients) hands to ``FedAvg``.

    Updates sent as rows are summed over the union of the clients' rows, so the sum is as large as the
    items the group touched, not the catalogue. Clients are summed in the order they are added.
    """

    def __init__(self, global_params: dict[str, torch.Tensor], names: list[str]):
        self.global_params, self.names = global_params, names
        self.dense: dict[str, torch.Tensor] = {}
        self.parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.total_w = 0.0
        self.sums: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}

    def add(self, local: dict[str, torch.Tensor], weight: float, rows: dict[str, torch.Tensor] | None = None) -> None:
        """One client's trained weights, as ``FedAvg.add`` takes them."""
        for k in self.names:
            r = (rows or {}).get(k)
            if r is None:
                delta = local[k].detach() - self.global_params[k]
                self.dense[k] = delta.mul_(weight) if k not in self.dense else self.dense[k].add_(delta, alpha=weight)
                continue
            delta = (local[k].detach() - self.global_params[k][r]).mul_(weight)
            if k in self.dense:
                self.dense[k].index_add_(0, r, delta)
                continue
            self.parts.setdefault(k, []).append((r, delta))
            if sum(len(r) for r, _ in self.parts[k]) >= len(self.global_params[k]):   # as large as the table:
                self.dense[k] = self._sum_rows(self.parts.pop(k), len(self.global_params[k]))[1]  # sum it densely
        self.total_w += weight

    @staticmethod
    def _sum_rows(parts: list[tuple[torch.Tensor, torch.Tensor]], table_rows: int | None = None):
        """(rows, sum) of row-wise updates: over their union, or the whole table (rows None) if ``table_rows``.
        Either way each row receives its clients' updates in order, so both give the same numbers."""
        rows = torch.cat([r for r, _ in parts])
        values = torch.cat([v for _, v in parts])
        if table_rows is not None:
            return None, values.new_zeros((table_rows,) + values.shape[1:]).index_add_(0, rows, values)
        union, inverse = torch.unique(rows, return_inverse=True)                     # sorted rows
        return union, values.new_zeros((len(union),) + values.shape[1:]).index_add_(0, inverse, values)

    def finish(self) -> "PartialSum":
        """Sum the row-wise updates; ``sums[k]`` is then (rows [U] or None for the whole tensor, sum)."""
        self.sums = {k: (None, v) for k, v in self.dense.items()}
        self.sums.update({k: self._sum_rows(parts) for k, parts in self.parts.items()})
        self.dense, self.parts, self.global_params = {}, {}, {}
        return self


class ServerOptimizer:
    """A step on the FedAvg result with delta = avg - theta as the (negative) pseudo-gradient.

    Tensors whose delta is exactly zero and that have no optimizer state yet (frozen) stay bit-identical.
    """

    def __init__(self, lr: float, momentum: float):
        self.lr, self.momentum = lr, momentum
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.t = 0

    def identity(self) -> bool:
        return False

    def update(self, k: str, theta: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, current: dict[str, torch.Tensor], averaged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.identity():
            return averaged
        self.t += 1
        out = {}
        for k, theta in current.items():
            delta = averaged[k] - theta
            if not delta.any() and k not in self.m:
                out[k] = averaged[k]
                continue
            out[k] = self.update(k, theta, delta)
        return out

    def state_dict(self) -> tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Step count and moments (first, second), for resuming."""
        return self.t, {k: v.detach().cpu().clone() for k, v in self.m.items()}, \
            {k: v.detach().cpu().clone() for k, v in self.v.items()}

    def load_state_dict(self, t: int, m: dict[str, torch.Tensor], v: dict[str, torch.Tensor], device) -> None:
        self.t = t
        self.m = {k: x.to(device) for k, x in m.items()}
        self.v = {k: x.to(device) for k, x in v.items()}


class FedAvgM(ServerOptimizer):
    """sgd: buf <- momentum * buf + delta;  theta <- theta + lr * buf  (lr 1, momentum 0: plain FedAvg)."""

    def identity(self) -> bool:
        return self.lr == 1.0 and self.momentum == 0.0

    def update(self, k, theta, delta):
        m = self.m.get(k)
        self.m[k] = m = delta.clone() if m is None else m.mul_(self.momentum).add_(delta)
        return theta + self.lr * m


class FedAdam(ServerOptimizer):
    """adam: FedAdam (Reddi et al., 2021) with beta1 = momentum: m <- b1 m + (1-b1) delta;
    v <- b2 v + (1-b2) delta^2;  theta <- theta + lr * m_hat / (sqrt(v_hat) + eps), bias-corrected."""

    def __init__(self, lr: float, momentum: float, beta2: float = 0.999, eps: float = 1e-8):
        super().__init__(lr, momentum)
        self.beta2, self.eps = beta2, eps

    def update(self, k, theta, delta):
        b1 = self.momentum
        m = self.m.setdefault(k, torch.zeros_like(delta)).mul_(b1).add_(delta, alpha=1 - b1)
        v = self.v.setdefault(k, torch.zeros_like(delta)).mul_(self.beta2).addcmul_(delta, delta, value=1 - self.beta2)
        m_hat = m / (1 - b1 ** self.t)
        v_hat = v / (1 - self.beta2 ** self.t)
        return theta + self.lr * m_hat / (v_hat.sqrt() + self.eps)


SERVER_OPTIMIZERS = {"sgd": FedAvgM, "adam": FedAdam}   # params: <stage>.server_optimizer
