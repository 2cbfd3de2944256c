"""The server side of federated training: client sampling, FedAvg aggregation and the server optimizer.

The server sees only what clients send back: their update of the trainable tensors and their
weight (number of training targets). It knows nothing of the model beyond tensor names.
"""
from __future__ import annotations

import numpy as np
import torch

from feddmmr.model.rows import take_rows


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
                delta = (local[k] - take_rows(self.global_params[k], r)) * weights.view(-1, *[1] * (local[k].dim() - 1))
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
        """The averaged weights, computed in the accumulator (no second copy of a large table); tensors outside
        ``names`` are the global tensors themselves. Call once."""
        return {k: self.acc.pop(k).div_(self.total_w).add_(v) if k in self.names else v
                for k, v in self.global_params.items()}


class PartialSum:
    """The weighted sum of a group of clients' updates, sum_i w_i (p_i - global), and their total weight:
    what an intermediate aggregator (a worker that trains a chunk of clients) hands to ``FedAvg``.

    Updates sent as rows are summed over the union of the clients' rows, so the sum is as large as the
    items the group touched, not the catalogue; the parts held meanwhile are summed into one whenever
    they outgrow the table. Clients are summed in the order they are added.
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
            delta = (local[k].detach() - take_rows(self.global_params[k], r)).mul_(weight)
            if k in self.dense:
                self.dense[k].index_add_(0, r, delta)
                continue
            parts = self.parts.setdefault(k, [])
            parts.append((r, delta))
            if sum(len(r) for r, _ in parts) >= len(self.global_params[k]):   # held rows as many as the table's:
                self.parts[k] = [self._sum_rows(parts)]                        # one part over their union
        self.total_w += weight

    @staticmethod
    def _sum_rows(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, sum) of row-wise updates over the union of their rows (sorted). Each row receives its
        clients' updates in order, so summing in steps gives the same numbers as summing once."""
        if len(parts) == 1:
            return parts[0]
        union, inverse = torch.unique(torch.cat([r for r, _ in parts]), return_inverse=True)
        total = parts[0][1].new_zeros((len(union),) + parts[0][1].shape[1:])
        for (_, values), target in zip(parts, inverse.split([len(r) for r, _ in parts])):
            total.index_add_(0, target, values)                  # no concatenated copy of the values
        return union, total

    def finish(self) -> "PartialSum":
        """Sum the row-wise updates; ``sums[k]`` is then (rows [U] or None for the whole tensor, sum)."""
        self.sums = {k: (None, v) for k, v in self.dense.items()}
        self.sums.update({k: self._sum_rows(parts) for k, parts in self.parts.items()})
        self.dense, self.parts, self.global_params = {}, {}, {}
        return self

    # ------------------------------------------------------------------ wire format (a Flower node's reply)
    def to_arrays(self) -> dict[str, torch.Tensor]:
        """A finished sum as named tensors, the wire format a Flower SuperNode sends back: ``sum:<name>`` the
        summed update of parameter ``<name>`` (its own shape, or [R, ...] over R rows) and, for a row-wise sum,
        ``rows:<name>`` its row indices [R] (int64, sorted). The total weight travels beside it (``total_w``)."""
        state = self.__getstate__()
        arrays = {f"sum:{k}": torch.from_numpy(v) for k, (_, v) in state["sums"].items()}
        arrays.update({f"rows:{k}": torch.from_numpy(r) for k, (r, _) in state["sums"].items() if r is not None})
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, torch.Tensor], names: list[str], total_w: float) -> "PartialSum":
        """The finished sum ``to_arrays`` sent, for ``FedAvg.add_partial``."""
        part = cls.__new__(cls)
        part.__setstate__({"names": names, "total_w": total_w,
                           "sums": {k: (arrays[f"rows:{k}"].numpy() if f"rows:{k}" in arrays else None,
                                        arrays[f"sum:{k}"].numpy()) for k in names}})
        return part

    def __getstate__(self) -> dict:
        """Pickled with the sums as NumPy arrays: one copy each way (a tensor pickles through torch.save,
        several times slower to load), as a worker's result crosses a pipe every chunk."""
        if self.dense or self.parts:
            raise RuntimeError("a PartialSum is pickled after finish()")
        sums = {k: (None if r is None else r.numpy(), v.detach().cpu().numpy()) for k, (r, v) in self.sums.items()}
        return {"names": self.names, "total_w": self.total_w, "sums": sums}

    def __setstate__(self, state: dict) -> None:
        self.names, self.total_w = state["names"], state["total_w"]
        self.global_params, self.dense, self.parts = {}, {}, {}
        self.sums = {k: (None if r is None else torch.from_numpy(r), torch.from_numpy(v))
                     for k, (r, v) in state["sums"].items()}


class ServerOptimizer:
    """A step on the FedAvg result with delta = avg - theta as the (negative) pseudo-gradient.

    Tensors whose delta is exactly zero and that have no optimizer state yet (frozen) stay bit-identical.
    """

    def __init__(self, lr: float, momentum: float):
        self.lr, self.momentum = lr, momentum
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.t = 0

    @classmethod
    def from_params(cls, tp) -> "ServerOptimizer":
        """The optimizer a stage's params ask for (``<stage>.server_*``)."""
        return cls(tp.server_lr, tp.server_momentum)

    def identity(self) -> bool:
        return False

    def update(self, k: str, theta: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, current: dict[str, torch.Tensor], averaged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The new global tensors from the current ones and FedAvg's ``averaged``, whose tensors it may overwrite
        (a server step over a large item table makes no copy of it beyond one scratch buffer)."""
        if self.identity():
            return averaged
        self.t += 1
        out = {}
        for k, theta in current.items():
            if k not in self.m and torch.equal(averaged[k], theta):
                out[k] = averaged[k]
                continue
            out[k] = self.update(k, theta, averaged[k].sub_(theta))
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
        return torch.mul(m, self.lr, out=delta).add_(theta)                   # theta + lr * m, in delta's buffer


class FedAdam(ServerOptimizer):
    """adam: FedAdam (Reddi et al., 2021, Algorithm 2) with beta1 = momentum and tau = eps:

        m <- b1 m + (1 - b1) delta;   v <- b2 v + (1 - b2) delta^2;   theta <- theta + lr * m / (sqrt(v) + tau)

    with v starting at tau^2 and no bias correction. tau sets how adaptive the step is: an element whose update
    is far below tau moves by about lr (1 - b1) / (2 tau) times its update (proportional to what the clients
    asked for; 0.5x with the defaults lr 0.01, b1 0.9, tau 1e-3), one far above it by lr (1 - b1) / sqrt(1 - b2)
    in its sign.

    ``bias_correction`` is Kingma and Ba's Adam instead (v starts at 0, m and v bias-corrected, eps added to
    sqrt(v_hat)): its first step is lr * delta / (|delta| + tau), i.e. lr * sign(delta) on every element the
    clients moved by more than tau, however little they moved it (with tau 1e-8, every element).
    """

    def __init__(self, lr: float, momentum: float, beta2: float = 0.999, eps: float = 1e-3,
                 bias_correction: bool = False):
        super().__init__(lr, momentum)
        self.beta2, self.eps, self.bias_correction = beta2, eps, bias_correction

    @classmethod
    def from_params(cls, tp) -> "FedAdam":
        return cls(tp.server_lr, tp.server_momentum, eps=tp.server_eps, bias_correction=tp.server_bias_correction)

    def update(self, k, theta, delta):
        b1, b2 = self.momentum, self.beta2
        v0 = 0.0 if self.bias_correction else self.eps ** 2
        m = self.m.setdefault(k, torch.zeros_like(delta)).mul_(b1).add_(delta, alpha=1 - b1)
        v = self.v.setdefault(k, torch.full_like(delta, v0)).mul_(b2).addcmul_(delta, delta, value=1 - b2)
        if self.bias_correction:
            denom = torch.div(v, 1 - b2 ** self.t).sqrt_().add_(self.eps)              # sqrt(v_hat) + eps
            step = torch.div(m, 1 - b1 ** self.t, out=delta).mul_(self.lr).div_(denom)  # lr * m_hat / denom
        else:
            step = torch.mul(m, self.lr, out=delta).div_(v.sqrt().add_(self.eps))       # lr * m / (sqrt(v) + tau)
        return step.add_(theta)


SERVER_OPTIMIZERS = {"sgd": FedAvgM, "adam": FedAdam}   # params: <stage>.server_optimizer
