"""Batched evaluation of all users: HR@k, NDCG@k and MRR under two protocols.

- full:    the target is ranked against every item the user has not interacted with before
           (the known history is excluded, except the target itself: a re-consumed item, as in
           re-watches or re-purchases, still competes with its own score; ties count against the target);
- sampled: the target is ranked against the fixed 100 negatives drawn once at prepare time from
           items the user never interacted with (parity with the original FedDMMR numbers).

A non-finite score (NaN, +-inf) ranks as the worst possible: a NaN target is last, never first. The
number of non-finite scores is reported (``nonfinite_scores``) so that training can stop on it. A rank
below 1 or a metric outside [0, 1] is a bug, never a result: ``rank_metrics`` raises ``ImpossibleMetric``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from feddmmr.data.prepare import Prepared, left_pad
from feddmmr.errors import ImpossibleMetric
from feddmmr.io import write_json


def eval_inputs(data: Prepared, split: str) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    """Inputs [U, L], targets [U] and each user's known history for ``split`` in {val, test}."""
    if split not in ("val", "test"):
        raise ValueError(split)
    cut = 2 if split == "val" else 1
    L = data.max_seq_len
    seqs, targets, hist = np.zeros((data.num_users, L), dtype=np.int64), np.zeros(data.num_users, dtype=np.int64), []
    for u in range(data.num_users):
        s = data.sequence(u)
        seqs[u] = left_pad(s[:-cut], L)
        targets[u] = s[-cut]
        hist.append(s[:-cut])
    return torch.from_numpy(seqs), torch.from_numpy(targets), hist


def rank_metrics(ranks: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """ranks [U] (1 = best) -> {HR@k, NDCG@k, MRR} averaged over users; refuses impossible ranks."""
    r = ranks.to(torch.float64)
    if len(r) and not (bool(torch.isfinite(r).all()) and float(r.min()) >= 1):
        bad = int((~torch.isfinite(r) | (r < 1)).sum())
        raise ImpossibleMetric(f"evaluation produced {bad} ranks below 1 or non-finite (min {float(r.min()):g}): "
                               f"a rank counts the target itself; this is a bug in the evaluator, not a result")
    out: dict[str, float] = {}
    for k in ks:
        hit = r <= k
        out[f"HR@{k}"] = float(hit.double().mean())
        out[f"NDCG@{k}"] = float(torch.where(hit, 1.0 / torch.log2(r + 1.0), torch.zeros_like(r)).mean())
    out["MRR"] = float((1.0 / r).mean())
    bad = {name: v for name, v in out.items() if not 0.0 <= v <= 1.0}   # NaN fails this too
    if bad:
        raise ImpossibleMetric(f"evaluation produced metrics outside [0, 1]: {bad}; this is a bug, not a result")
    return out


class Evaluator:
    """Holds the fixed inputs of the validation and test splits; evaluates a model in one pass per batch."""

    def __init__(self, data: Prepared, ks: list[int], batch_size: int = 512):
        self.data, self.ks, self.batch_size = data, list(ks), batch_size
        self.splits = {}
        for split in ("val", "test"):
            x, target, hist = eval_inputs(data, split)
            indptr = np.concatenate([[0], np.cumsum([len(h) for h in hist])]).astype(np.int64)  # user u's history:
            cols = np.concatenate(hist) if hist else np.zeros(0, dtype=np.int64)              # cols[indptr[u]:indptr[u+1]]
            self.splits[split] = (x, target, indptr, cols)
        self.negatives = torch.from_numpy(data.eval_negatives)

    @torch.no_grad()
    def ranks(self, model: torch.nn.Module, split: str, memory=None,
              users: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank of each user's target under both protocols; ``memory`` (a MemoryBank) feeds multimodal models.
        ``users``: only these users (a SuperNode's), in this order (default: every user)."""
        x, target, indptr, cols = self.splits[split]
        device = next(model.parameters(), torch.empty(0)).device
        was_training = model.training
        model.eval()
        full, sampled = [], []
        self.nonfinite = 0
        order = np.arange(len(x)) if users is None else np.asarray(users, dtype=np.int64)
        for lo in range(0, len(order), self.batch_size):
            batch = order[lo: lo + self.batch_size]
            sel = slice(int(batch[0]), int(batch[-1]) + 1) if users is None else torch.from_numpy(batch)
            h = model.encode(x[sel].to(device))[:, -1]                 # [b, d] most recent position
            mem = {}
            if getattr(model, "multimodal", False):                    # every slot precedes val/test targets
                ids = (memory.retrieve(batch)[0] if memory is not None
                       else torch.zeros(len(batch), 1, dtype=torch.long)).to(device)
                mem = {"mem_ids": ids, "visible": ids > 0}
            scores = self._worst_if_nonfinite(model.score_all(h, **mem))  # [b, I], column j = item j+1
            column = (target[sel].to(device) - 1).unsqueeze(1)            # [b, 1] the target's column
            pos = scores.gather(1, column)                                  # [b, 1]
            h_rows, h_cols = _history(indptr, cols, batch, contiguous=users is None)
            scores[h_rows.to(device), (h_cols - 1).to(device)] = float("-inf")  # history never competes,
            scores.scatter_(1, column, pos)                                 # but a repeated target does
            full.append((scores >= pos).sum(1).cpu())                   # target counts itself: rank >= 1
            if self.negatives.shape[1]:
                neg = self._worst_if_nonfinite(model.score(h, self.negatives[sel].to(device), **mem))  # [b, N]
                sampled.append((1 + (neg >= pos).sum(1)).cpu())
        model.train(was_training)
        full_r = torch.cat(full) if full else torch.zeros(0, dtype=torch.long)
        sampled_r = torch.cat(sampled) if sampled else torch.zeros(0)
        return full_r, sampled_r

    def _worst_if_nonfinite(self, scores: torch.Tensor) -> torch.Tensor:
        finite = torch.isfinite(scores)
        self.nonfinite += int((~finite).sum())
        return torch.where(finite, scores, float("-inf"))  # -inf ties every other -inf: counted against

    def evaluate(self, model: torch.nn.Module, split: str, memory=None) -> dict:
        """{full: metrics, sampled: metrics}, plus ``nonfinite_scores`` when the model produced any."""
        return self.summarize(*self.ranks(model, split, memory))

    def summarize(self, full: torch.Tensor, sampled: torch.Tensor) -> dict:
        """``evaluate``'s metrics from the ranks of the last ``ranks`` call."""
        out: dict = {"full": rank_metrics(full, self.ks)}
        if len(sampled):
            out["sampled"] = rank_metrics(sampled, self.ks)
        if self.nonfinite:
            out["nonfinite_scores"] = self.nonfinite
        return out


def _history(indptr: np.ndarray, cols: np.ndarray, batch: np.ndarray, contiguous: bool) -> tuple[torch.Tensor, ...]:
    """The known history of a batch of users as (row in the batch, item id) pairs."""
    counts = indptr[batch + 1] - indptr[batch]
    rows = np.repeat(np.arange(len(batch)), counts)
    if contiguous:                                                     # users batch[0] .. batch[-1]
        items = cols[indptr[batch[0]]: indptr[batch[-1] + 1]]
    else:
        items = np.concatenate([cols[indptr[u]: indptr[u + 1]] for u in batch]) if len(batch) else cols[:0]
    return torch.from_numpy(rows), torch.from_numpy(items)


def pick(metrics: dict[str, dict[str, float]], name: str) -> float:
    """Look up 'protocol/metric', e.g. 'full/NDCG@10'."""
    protocol, _, metric = name.partition("/")
    try:
        return metrics[protocol][metric]
    except KeyError:
        raise KeyError(f"unknown selection metric {name!r}; use protocol/metric like full/NDCG@10 or sampled/HR@10") from None


SUMMARY = (("val", "full", "NDCG@10"), ("test", "full", "HR@10"), ("test", "full", "NDCG@10"),
           ("test", "sampled", "HR@10"), ("test", "sampled", "NDCG@10"))


def summary_path(metrics_path: str | Path) -> Path:
    """``metrics/<stage>.json`` -> ``metrics/<stage>.summary.json``."""
    path = Path(metrics_path)
    return path.with_name(f"{path.stem}.summary{path.suffix or '.json'}")


def write_metrics(metrics_path: str | Path, metrics: dict) -> None:
    """The stage's full metrics at ``metrics_path`` and, beside it, the few that ``dvc exp show`` lists
    (``summary_path``: best round, validation full NDCG@10, test HR@10 and NDCG@10 under both protocols)."""
    write_json(metrics_path, metrics)
    summary: dict = {"best_round": metrics.get("best_round", 0)}
    for split, protocol, name in SUMMARY:
        value = metrics.get(split, {}).get(protocol, {}).get(name)
        if value is not None:
            summary.setdefault(split, {}).setdefault(protocol, {})[name] = value
    write_json(summary_path(metrics_path), summary)
