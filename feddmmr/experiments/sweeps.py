"""Sets of DVC experiments, summarised: the pipeline over several seeds, and the ablations of stage 3.

``feddmmr sweep --seeds 42 43 44`` runs ``dvc exp run --temp -n seeds-<seed>-<tag>`` once per seed with
every training stage's seed set to it (the split and the evaluation negatives stay those of
``prepare.seed``, so every seed is tested on the same users and items). Each seed is its own DVC
experiment (``dvc exp show``) and its own MLflow pipeline run of the same name (``feddmmr compare --run``);
a seed whose training stages DVC would restore from its cache (the params of ``dvc.lock``, or of an earlier
run) is trained again with ``--force``, so that its MLflow pipeline run holds every stage: its seeded stages
alone (``--single-item``) when git tracks dvc.lock and ``dvc status`` is clean, else the whole pipeline.
``<tag>`` hashes the commit, params.yaml and the overrides: a seed already finished under the same tag is
not run again, so a stopped sweep continues where it stopped, and changed code or parameters start new
experiments. The summary gives, per stage and the popularity floor, each test metric's mean with its 95%
Student-t interval over seeds, and per seed the paired test of every stage against pretrain_sasrec. The
floor does not depend on the seed: DVC restores it after the first seed, so it is recorded once.

``feddmmr ablate`` retrains finetune_moe (``dvc exp run --temp --force --single-item finetune_moe``, after
``dvc repro`` has cached the earlier stages and git tracks their dvc.lock) once per entry of ``ABLATIONS``, each a params change of that
stage, and prints their test metrics with the paired test of each against the full model.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from feddmmr.errors import FeddmmrError
from feddmmr.modalities import NAMES

# stats and tracking (torch, MLflow) are imported where they are used: `feddmmr ablate --help` reads ABLATIONS
# and should answer without loading torch

SEEDED = ("pretrain_sasrec", "align_projectors", "finetune_moe", "centralized")   # whose seed a sweep sets
COLUMNS = SEEDED + ("popularity",)
METRICS = ("HR@10", "NDCG@10", "MRR")
ABLATED = "finetune_moe"
ABLATIONS = {                              # name: the params change of finetune_moe (``dvc exp run -S``)
    "full": [],
    "backbone-only": ["finetune_moe.freeze=[item_embeddings,projections,gate,experts,router]",
                      "finetune_moe.gate_start=0.0"],
    **{f"{m}-only": [f"finetune_moe.modalities=[{m}]"] for m in reversed(NAMES)},   # one per modality
    "no-long-term-memory": ["finetune_moe.long_term=false"],
    "no-contrastive-loss": ["finetune_moe.contrastive_weight=0.0"],
}


def sweep_tag(project: Path, overrides: list[str]) -> str:
    """A short hash of the commit, params.yaml and the overrides: what makes two sweeps the same sweep."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    params = (project / "params.yaml").read_bytes() if (project / "params.yaml").is_file() else b""
    return hashlib.sha256(b"\0".join([head.encode(), params, *(o.encode() for o in overrides)])).hexdigest()[:8]


def _finished(name: str, stages: tuple[str, ...] = SEEDED) -> bool:
    from feddmmr.tracking.reports import pipeline_runs
    try:
        _, _, runs = pipeline_runs(name)
    except FeddmmrError:
        return False
    return all(s in runs and runs[s].info.status == "FINISHED" for s in stages)


def _dvc() -> str:
    dvc = Path(sys.executable).parent / "dvc"
    return str(dvc) if dvc.exists() else "dvc"


def _dvc_exp_run(project: Path, name: str, overrides: list[str], stages: list[str] | None = None,
                 force: bool = False) -> None:
    """``dvc exp run --temp -n name`` (``stages``: those alone, in order, retrained; ``force``: every stage
    retrained), recorded as MLflow pipeline run name."""
    dvc = _dvc()
    subprocess.run([dvc, "exp", "remove", name], cwd=project, capture_output=True)   # an unfinished attempt's
    cmd = [dvc, "exp", "run", "--temp", "-n", name] + (["--force", "--single-item", *stages] if stages else
                                                        ["--force"] if force else [])
    cmd += [arg for o in overrides for arg in ("-S", o)]
    proc = subprocess.run(cmd, cwd=project, env={**os.environ, "FEDDMMR_PIPELINE_RUN": name},
                          capture_output=True, text=True)
    if proc.returncode:
        lines = (proc.stderr.strip() + "\n" + proc.stdout.strip()).strip().splitlines() or ["no output"]
        last = next((line for line in lines if line.startswith("feddmmr: error:")), lines[-1])   # the step's own
        raise FeddmmrError(f"experiment {name} failed (dvc exp run exited {proc.returncode}): {last}; finished "
                           f"experiments are kept: run the same command again after fixing it")


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
            _run_seed(project, seed, name, overrides, say)
        names.append(name)
    return names


def _run_seed(project: Path, seed: int, name: str, overrides: list[str], say: Callable[[str], None]) -> None:
    """One seed's experiment, whose training stages must be recorded under its name.

    DVC does not rerun a stage whose command, dependencies and params it has seen before (dvc.lock, the
    run-cache): it restores the outputs, and the MLflow record of that training stays with the pipeline run
    that trained it. A seed whose stages came back that way is trained again: its seeded stages alone when
    nothing else can differ from dvc.lock, else the whole pipeline (``--force``).
    """
    seeded = overrides + [f"{s}.seed={seed}" for s in SEEDED]
    _dvc_exp_run(project, name, seeded)
    if _finished(name):
        return
    stages = [] if overrides else _seeded_stages_alone(project)
    say(f"seed {seed}: DVC restored stages trained before under another pipeline run; training "
        f"{' '.join(stages) or 'the pipeline'} again under {name} (dvc exp run --temp --force"
        f"{' --single-item' if stages else ''}) so that the sweep records every seed")
    _dvc_exp_run(project, name, seeded, stages=stages, force=True)
    if not _finished(name):
        raise FeddmmrError(f"experiment {name} ran but recorded no finished MLflow run of every stage of "
                           f"{', '.join(SEEDED)} (feddmmr compare --run {name} shows what it has): check that the "
                           "tracking store (MLFLOW_TRACKING_URI) answers, then run the same command again")


def _seeded_stages_alone(project: Path) -> list[str]:
    """SEEDED, when retraining those alone is the whole pipeline retrained: git tracks dvc.lock (an experiment
    starts from it) and ``dvc status`` finds every stage as dvc.lock has it, outputs in place; else []."""
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "dvc.lock"], cwd=project, capture_output=True)
    status = subprocess.run([_dvc(), "status", "--json"], cwd=project, capture_output=True, text=True)
    clean = status.returncode == 0 and status.stdout.strip() in ("", "{}")
    return list(SEEDED) if tracked.returncode == 0 and clean else []


def summarize(names: list[str], seeds: list[int], protocol: str = "full") -> str:
    """Mean and 95% interval over the seeds' experiments of each stage's test metrics; paired tests per seed."""
    from feddmmr.evaluation.stats import paired_test, seed_interval
    from feddmmr.tracking.keys import metric_name
    from feddmmr.tracking.reports import pipeline_runs, test_ranks
    runs = {seed: pipeline_runs(name) for seed, name in zip(seeds, names)}   # each with the (restored) floor
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
    return "\n".join(lines + _validation_lines(runs) + _federation_price(runs, protocol))


def _validation_lines(runs: dict) -> list[str]:
    """Per seed and training stage, its validation selection score at the start (round 0: what it loaded), the
    change of its first round, its best round and that round's gain over the start."""
    lines = ["", "validation (selection metric) per seed: start, first-round change, best round, best - start"]
    for seed, (_, _, latest) in runs.items():
        for s in SEEDED:                     # the federated stages record their path (the centralized one not)
            m = latest[s].data.metrics if s in latest else {}
            if "selection.start" in m:
                lines.append(f"  seed {seed} {s}: start {m['selection.start']:.4f}, first round "
                             f"{m['selection.first_round_change']:+.4f}, best round {int(m['best_round'])}, "
                             f"best {m['selection.best_gain']:+.4f}")
    return lines


def _federation_price(runs: dict, protocol: str) -> list[str]:
    """Federated stage 1's test NDCG@10 as a fraction of the centralized counterpart's, per seed and overall."""
    key = f"test.{protocol}.NDCG_at_10"
    pairs = {seed: (latest["pretrain_sasrec"].data.metrics.get(key), latest["centralized"].data.metrics.get(key))
             for seed, (_, _, latest) in runs.items() if {"pretrain_sasrec", "centralized"} <= set(latest)}
    pairs = {seed: (f, c) for seed, (f, c) in pairs.items() if f is not None and c}
    if not pairs:
        return []
    mean = lambda i: sum(p[i] for p in pairs.values()) / len(pairs)   # noqa: E731
    per_seed = ", ".join(f"seed {seed} {f / c:.3f}" for seed, (f, c) in pairs.items())
    return ["", f"federated / centralized test {protocol} NDCG@10 (pretrain_sasrec / centralized): {per_seed}; "
                f"of the means {mean(0) / mean(1):.3f}"]


def run_ablations(project: str | Path, overrides: list[str], say: Callable[[str], None] = print,
                  only: list[str] | None = None) -> dict[str, str]:
    """Retrain finetune_moe once per ablation (``only``: those and "full", the reference; skipping those already
    finished); {ablation: experiment name}."""
    unknown = sorted(set(only or []) - set(ABLATIONS))
    if unknown:
        raise FeddmmrError(f"unknown ablation {', '.join(unknown)}: choose from {', '.join(ABLATIONS)}")
    project = Path(project).resolve()
    tag = sweep_tag(project, overrides)
    names = {}
    for ablation, change in ABLATIONS.items():
        if only and ablation not in only and ablation != "full":
            continue
        name = names[ablation] = f"ablation-{ablation}-{tag}"
        if _finished(name, (ABLATED,)):
            say(f"{ablation}: experiment {name} already finished")
            continue
        say(f"{ablation}: running experiment {name} ({' '.join(change) or 'the params as they are'})")
        _dvc_exp_run(project, name, overrides + change, stages=[ABLATED])
    return names


def summarize_ablations(names: dict[str, str], protocol: str = "full") -> str:
    """Each ablation's test metrics and its paired test (NDCG@10, per user) against the full model."""
    from feddmmr.evaluation.stats import paired_test
    from feddmmr.tracking.keys import metric_name
    from feddmmr.tracking.reports import pipeline_runs, test_ranks
    runs = {a: pipeline_runs(name) for a, name in names.items()}
    stage = {a: latest[ABLATED] for a, (_, _, latest) in runs.items()}
    ranks = {a: test_ranks(runs[a][0], run.info.run_id, protocol) for a, run in stage.items()}
    lines = [f"{ABLATED} ablations, test ({protocol}); paired test of NDCG@10 against the full model, per user: "
             "difference [95% paired-bootstrap interval], Wilcoxon p",
             "ablation".ljust(22) + "".join(m.rjust(10) for m in METRICS) + "   against full"]
    for a, run in stage.items():
        values = "".join(f"{run.data.metrics.get(f'test.{protocol}.{metric_name(m)}', float('nan')):10.4f}"
                         for m in METRICS)
        test = "" if a == "full" or ranks[a] is None else paired_test(ranks["full"], ranks[a], "NDCG@10")
        against = "" if not test else (f"   {test.diff:+.4f} [{test.low:+.4f}, {test.high:+.4f}] p = {test.p_value:.2g}"
                                       f"{' *' if test.significant else ''}")
        lines.append(a.ljust(22) + values + against)
    return "\n".join(lines + ["(* significant at 5%)"])
