"""Reference points evaluated exactly as the stages are (same splits, same negatives, same evaluator).

- ``popularity``: every user gets the items ranked by their number of training interactions (the
  sequences without their validation and test items), the floor any recommender must clear;
- ``centralized`` (``training.centralized``, a trainer of its own): the stage-1 model trained on the same windows
  without federation.

A baseline writes what a stage writes (popularity: no weights): ``metrics/<name>.json``, the per-user test
ranks (``<out>/test_ranks.safetensors``) and an MLflow run under the pipeline run, so ``feddmmr compare``
shows it as one more column and tests the stages against it.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from feddmmr.config import Params
from feddmmr.data.prepare import Prepared, load_prepared
from feddmmr.errors import FeddmmrError
from feddmmr.evaluation.metrics import Evaluator, write_metrics
from feddmmr.evaluation.stats import TEST_RANKS, save_test_ranks
from feddmmr.io import atomic_dir, exclusive, write_json
from feddmmr.tracking.keys import flatten, prefixed
from feddmmr.tracking.run import StageRun

BASELINES = ("popularity",)   # `centralized` is a trainer of its own (training.centralized)


class Popularity(nn.Module):
    """Scores item i by its count in the training sequences (s[:-2] of every user), the same for every user."""

    def __init__(self, data: Prepared):
        super().__init__()
        train = [data.sequence(u)[:-2] for u in range(data.num_users)]
        counts = np.bincount(np.concatenate(train), minlength=data.num_items + 1) if train else np.zeros(1)
        self.register_buffer("counts", torch.from_numpy(counts.astype(np.float32)))   # [I+1]

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*seq.shape, 1, device=seq.device)                # [B, L, 1]: no user state

    def score_all(self, h: torch.Tensor) -> torch.Tensor:
        return self.counts[1:].expand(h.shape[0], -1).clone()               # [B, I], column j = item j+1

    def score(self, h: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.counts[items]                                           # [B, C]


def run_baseline(name: str, params: Params, data_dir: str | Path, out_dir: str | Path,
                 metrics_path: str | Path, progress: bool = False) -> dict:
    """Evaluate baseline ``name`` on validation and test; write its ranks, metrics and MLflow run."""
    if name not in BASELINES:
        raise FeddmmrError(f"unknown baseline {name!r}; available: {', '.join(BASELINES)}")
    data = load_prepared(data_dir)
    model = Popularity(data)
    evaluator = Evaluator(data, params.evaluation.ks, params.evaluation.batch_size)
    sections = {"evaluation": asdict(params.evaluation), "data": {"dir": str(data_dir)}, "baseline": {"name": name}}
    with exclusive(out_dir), exclusive(metrics_path):
        tracker = StageRun(name, flatten(sections), data.meta, params.tracking.enabled, out_dir)
        with tracker.recording():
            val = evaluator.evaluate(model, "val")
            ranks = evaluator.ranks(model, "test")
            test = evaluator.summarize(*ranks)
            metrics = {"stage": name, "val": val, "test": test}
            with atomic_dir(out_dir) as tmp:
                save_test_ranks(tmp, ranks, name)
                write_json(tmp / "config.json", {"baseline": name, **sections})
            write_metrics(metrics_path, metrics)
        tracker.finish(lambda step: prefixed(val), 0, {**prefixed(test, "test"), **prefixed(val, "best_val")},
                       [Path(out_dir) / "config.json", Path(out_dir) / TEST_RANKS, Path(metrics_path)], Path(out_dir))
    return metrics
