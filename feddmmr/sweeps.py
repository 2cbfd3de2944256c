"""The pipeline over several seeds, as DVC experiments, summarised with intervals and paired tests.

``feddmmr sweep --seeds 42 43 44`` runs ``dvc exp run --temp -n seeds-<seed>-<tag>`` once per seed with
every training stage's seed set to it (the split and the evaluation negatives stay those of
``prepare.seed``, so every seed is tested on the same users and items). Each seed is its own DVC
experiment (``dvc exp show``) and its own MLflow pipeline run of the same name (``feddmmr compare --run``).
``<tag>`` hashes the commit, params.yaml and the overrides: a seed already finished under the same tag is
not run again, so a stopped sweep continues where it stopped, and changed code or parameters start new
experiments. The summary gives, per stage and the popularity floor, each test metric's mean with its 95%
Student-t interval over seeds, and per seed the paired test of every stage against pretrain_sasrec. The
floor does not depend on the seed: DVC restores it after the first seed, so it is recorded once.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from .errors import FeddmmrError
from .stats import paired_test, seed_interval
from .tracking import metric_name, pipeline_runs, test_ranks

SEEDED = ("pretrain_sasrec", "align_projectors", "finetune_moe")   # the stages whose seed a sweep sets
COLUMNS = SEEDED + ("popularity",)
METRICS = ("HR@10", "NDCG@10", "MRR")


def sweep_tag(project: Path, overrides: list[str]) -> str:
    """A short hash of the commit, params.yaml and the overrides: what makes two sweeps the same sweep."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    params = (project / "params.yaml").read_bytes() if (project / "params.yaml").is_file() else b""
    return hashlib.sha256(b"\0".join([head.encode(), params, *(o.encode() for o in overrides)])).hexdigest()[:8]


def _finished(name: str) -> bool:
    try:
        _, _, runs = pipeline_runs(name)
    except FeddmmrError:
        return False
    return all(s in runs and runs[s].info.status == "FINISHED" for s in SEEDED)


def _dvc_exp_run(project: Path, name: str, overrides: list[str]) -> None:
    dvc = Path(sys.executable).parent / "dvc"
    dvc = str(dvc) if dvc.exists() else "dvc"
    subprocess.run([dvc, "exp", "remove", name], cwd=project, capture_output=True)   # an unfinished attempt's
    cmd = [dvc, "exp", "run", "--temp", "-n", name]
    cmd += [arg for o in overrides for arg in ("-S", o)]
    proc = subprocess.run(cmd, cwd=project, env={**os.environ, "FEDDMMR_PIPELINE_RUN": name},
                          capture_output=True, text=True)
    if proc.returncode:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise FeddmmrError(f"experiment {name} failed (dvc exp run exited {proc.returncode}): {last}; finished "
                           f"seeds are kept: run the same sweep again after fixing it")


def run_seeds(project: str | Path, seeds: list[int], overrides: list[str],
              say: Callable[[str], None] = print) -> list[str]:
    """Run the pipeline once per seed (skipping seeds already finished); returns the experiment names."""
    project = Path(project).resolve()
    if len(set(seeds)) != len(seeds) or not seeds:
        raise FeddmmrError(f"--seeds needs distinct seeds, got {seeds}")
    tag = sweep_tag(project, overrides)
    names = []
    for seed in seeds:
        name = f"seeds-{seed}-{tag}"
        if _finished(name):
            say(f"seed {seed}: experiment {name} already finished")
        else:
            say(f"seed {seed}: running experiment {name} (dvc exp run --temp)")
            _dvc_exp_run(project, name, overrides + [f"{s}.seed={seed}" for s in SEEDED])
        names.append(name)
    return names


def summarize(names: list[str], seeds: list[int], protocol: str = "full") -> str:
    """Mean and 95% interval over the seeds' experiments of each stage's test metrics; paired tests per seed."""
    runs = {seed: pipeline_runs(name) for seed, name in zip(seeds, names)}
    floor = next((latest["popularity"] for _, _, latest in runs.values() if "popularity" in latest), None)
    for _, _, latest in runs.values():      # the floor does not depend on the seed: DVC restores it, no run
        if floor is not None:
            latest.setdefault("popularity", floor)
    stages = [s for s in COLUMNS if all(s in latest for _, _, latest in runs.values())]
    lines = [f"test ({protocol}), mean ± 95% Student-t interval over seeds {', '.join(map(str, seeds))}",
             "metric".ljust(10) + "".join(s.rjust(22) for s in stages)]
    for metric in METRICS:
        cells = []
        for s in stages:
            values = [latest[s].data.metrics.get(f"test.{protocol}.{metric_name(metric)}") for _, _, latest in runs.values()]
            mean, half = seed_interval([v for v in values if v is not None])
            cells.append((f"{mean:.4f} ± {half:.4f}" if half == half else f"{mean:.4f}").rjust(22))
        lines.append(metric.ljust(10) + "".join(cells))
    lines += ["", f"paired tests against pretrain_sasrec, per user on the test split ({protocol}), per seed: "
                  "mean difference [95% paired-bootstrap interval], Wilcoxon p"]
    for seed, (uri, _, latest) in runs.items():
        ranks = {s: test_ranks(uri, latest[s].info.run_id, protocol) for s in stages}
        for s in stages[1:]:
            if ranks[s] is not None and ranks[stages[0]] is not None:
                lines.append(f"  seed {seed} {s}: {paired_test(ranks[stages[0]], ranks[s], 'NDCG@10').describe()}")
    return "\n".join(lines)
