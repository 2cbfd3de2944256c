"""Statistics a reviewer asks for: per-user metrics, paired tests between two models on the same users,
and intervals over seeds.

A stage's test ranks (one per user and protocol) are kept with its checkpoint (``test_ranks.safetensors``)
and in MLflow, so any two stages, or a stage and a baseline, can be compared user by user:
- ``paired_test``: mean per-user difference of a metric, its 95% paired-bootstrap interval and the
  two-sided Wilcoxon signed-rank p-value (zero differences dropped, as ``scipy.stats.wilcoxon`` does);
- ``seed_interval``: mean and 95% Student-t half-width of a metric over runs with different seeds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from feddmmr.io import save_tensors

TEST_RANKS = "test_ranks.safetensors"   # beside a stage's checkpoint and in its MLflow run: {full, sampled} [U]
BOOTSTRAP_SAMPLES = 10_000
LEVEL = 0.95


def save_test_ranks(out_dir: Path, ranks: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
    """A stage's (or baseline's) test ranks (full, sampled) [U] as ``<out_dir>/test_ranks.safetensors``."""
    tensors = {p: r.to(torch.int32) for p, r in zip(("full", "sampled"), ranks) if len(r)}
    save_tensors(Path(out_dir) / TEST_RANKS, tensors, metadata={"stage": stage, "split": "test"})


def per_user(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Each user's value of ``metric`` (HR@k, NDCG@k or MRR) from its target's rank (1 = best) -> [U] float64."""
    r = np.asarray(ranks, dtype=np.float64)
    if metric == "MRR":
        return 1.0 / r
    name, _, k = metric.partition("@")
    if name not in ("HR", "NDCG") or not k.isdigit():
        raise ValueError(f"unknown metric {metric!r}: use HR@k, NDCG@k or MRR")
    hit = r <= int(k)
    return hit.astype(np.float64) if name == "HR" else np.where(hit, 1.0 / np.log2(r + 1.0), 0.0)


@dataclass
class PairedTest:
    metric: str
    mean_a: float           # mean over users of the first model
    mean_b: float
    diff: float             # mean of b - a per user
    low: float              # 95% paired-bootstrap interval of diff
    high: float
    p_value: float          # two-sided Wilcoxon signed-rank test of b - a
    users: int

    @property
    def significant(self) -> bool:
        return self.p_value < 1.0 - LEVEL

    def describe(self) -> str:
        return (f"{self.metric}: {self.mean_b:.4f} vs {self.mean_a:.4f}, difference {self.diff:+.4f} "
                f"[{self.low:+.4f}, {self.high:+.4f}], p = {self.p_value:.2g} over {self.users} users"
                f"{' (significant at 5%)' if self.significant else ' (not significant at 5%)'}")


def paired_test(ranks_a: np.ndarray, ranks_b: np.ndarray, metric: str, seed: int = 0,
                samples: int = BOOTSTRAP_SAMPLES) -> PairedTest:
    """Model b against model a on the same users (ranks [U] each, same user order)."""
    from scipy.stats import wilcoxon

    a, b = per_user(ranks_a, metric), per_user(ranks_b, metric)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired ranks must cover the same users: got {a.shape} and {b.shape}")
    d = b - a
    rng = np.random.default_rng(seed)
    means = np.concatenate([d[rng.integers(0, len(d), size=(min(1000, samples - lo), len(d)))].mean(1)
                            for lo in range(0, samples, 1000)])                 # resampled users, in blocks
    low, high = np.quantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    p = 1.0 if not d.any() else float(wilcoxon(d, zero_method="wilcox").pvalue)
    return PairedTest(metric, float(a.mean()), float(b.mean()), float(d.mean()), float(low), float(high), p, len(d))


def seed_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% Student-t interval) over seeds; the half-width is nan for one seed."""
    from scipy.stats import t

    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()) if len(x) else math.nan, math.nan
    return float(x.mean()), float(t.ppf((1 + LEVEL) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
