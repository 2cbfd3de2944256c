"""The read side: a pipeline run's stage runs (``lineage``), the stages side by side with paired per-user tests
(``feddmmr compare``), and a run's per-user test ranks.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Any

from feddmmr.errors import FeddmmrError
from feddmmr.evaluation.stats import TEST_RANKS, paired_test
from feddmmr.io import load_tensors
from feddmmr.tracking.store import EXPERIMENT, check_store, tracking_uri

log = logging.getLogger("feddmmr")


def pipeline_runs(pipeline: str | None = None) -> tuple[str, Any, dict[str, Any]]:
    """(store URI, the pipeline's parent run, {stage: its run}) of pipeline run ``pipeline`` (see ``_find_pipeline``;
    default: the latest pipeline run): its stages by ``lineage``, and the popularity floor's run on the same prepared
    data when DVC restored that stage instead of running it."""
    import mlflow

    uri = tracking_uri()
    check_store(uri)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        raise FeddmmrError(f"no '{EXPERIMENT}' experiment in {uri}; train a stage first (dvc repro)")
    if pipeline is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,199}", pipeline):
        raise FeddmmrError(f"--run {pipeline!r}: a pipeline run is named by letters, digits and . _ : @ + - "
                           f"(its name in the MLflow UI, its DVC experiment, its run id or its pipeline key)")
    parent = _find_pipeline(client, exp.experiment_id, pipeline)
    if parent is None:
        raise FeddmmrError(f"no pipeline run {pipeline or ''} in {uri}; train a stage first (dvc repro), or name one "
                           f"by its run name in the MLflow UI, its DVC experiment, its run id or its pipeline key")
    runs = lineage(client, exp.experiment_id, parent.info.run_id)
    data = next((r.data.tags["prepared_sha256"] for r in runs.values() if "prepared_sha256" in r.data.tags), None)
    if "popularity" not in runs and data:   # DVC restored the floor (it depends on the data alone): no run of its own
        floor = latest_stage_run(uri, "popularity", data)
        if floor is not None:
            runs = {"popularity": floor, **runs}
    return uri, parent, runs


def _find_pipeline(client, exp_id: str, name: str | None):
    """The pipeline (parent) run a user names: its run name (as the MLflow UI shows it), DVC experiment, run id or
    pipeline key; the latest pipeline run when ``name`` is None."""
    kind = "tags.`feddmmr.kind` = 'pipeline'"
    filters = [kind] if name is None else [f"{kind} and {field} = '{name}'" for field in (
        "tags.`feddmmr.pipeline_key`", "attributes.run_name", "tags.dvc_experiment")]
    for filt in filters:
        found = client.search_runs([exp_id], filter_string=filt, order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            return found[0]
    if name is not None and re.fullmatch(r"[0-9a-f]{32}", name):
        try:
            run = client.get_run(name)
        except Exception:
            return None
        return run if run.data.tags.get("feddmmr.kind") == "pipeline" else None
    return None


TRAINING_ORDER = ("pretrain_sasrec", "align_projectors", "finetune_moe")


def lineage(client, exp_id: str, parent_id: str) -> dict[str, Any]:
    """The stage runs that make one pipeline run, by lineage rather than by time: the latest run of the last
    training stage, then, one stage back at a time, the run that wrote the checkpoint it started from (tags
    ``feddmmr.start_sha256`` -> ``checkpoint_sha256``); an ad-hoc training at the same commit and data (another
    --out) is not part of it. Stages without a start (the baselines) are their latest run. In start order."""
    children = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                  order_by=["attributes.start_time ASC"])
    latest: dict[str, Any] = {}
    wrote: dict[str, Any] = {}
    for run in children:          # later runs win
        latest[run.data.tags.get("feddmmr.stage", run.info.run_name)] = run
        if run.data.tags.get("checkpoint_sha256"):
            wrote[run.data.tags["checkpoint_sha256"]] = run
    chosen = {s: r for s, r in latest.items() if s not in TRAINING_ORDER}
    head = next((latest[s] for s in reversed(TRAINING_ORDER) if s in latest), None)
    while head is not None and head.data.tags.get("feddmmr.stage") not in chosen:
        chosen[head.data.tags.get("feddmmr.stage")] = head
        head = wrote.get(head.data.tags.get("feddmmr.start_sha256", ""))
    return dict(sorted(chosen.items(), key=lambda item: item[1].info.start_time))


def prepared_sha256(data_meta: dict) -> str:
    """The prepared data's identity: its meta.json (the sources' hashes and the prepare params)."""
    return hashlib.sha256(json.dumps(data_meta, sort_keys=True).encode()).hexdigest()


def latest_stage_run(uri: str, stage: str, prepared: str):
    """The latest FINISHED run of ``stage`` on the prepared data whose ``prepared_sha256`` is ``prepared``, or None."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    found = [] if exp is None else client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`feddmmr.stage` = '{stage}' and tags.prepared_sha256 = '{prepared}' "
                                           "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def compare(pipeline: str | None = None, protocol: str = "full") -> str:
    """Test and best-validation metrics of a pipeline run's stages, side by side, as a text table."""
    uri, parent, latest = pipeline_runs(pipeline)
    if not latest:
        raise FeddmmrError(f"pipeline run {parent.info.run_id} has no stage runs yet")
    stages = list(latest)
    rows = ["best_round"] + [f"{split}.{protocol}.{m}" for split in ("best_val", "test")
                             for m in ("HR_at_5", "HR_at_10", "HR_at_20", "NDCG_at_5", "NDCG_at_10", "NDCG_at_20", "MRR")]
    width = max(len(r) for r in rows) + 2
    lines = [f"pipeline {parent.data.tags.get('feddmmr.pipeline_key')} (run {parent.info.run_id}) in {uri}",
             "metric".ljust(width) + "".join(s.rjust(18) for s in stages)]
    for r in rows:
        vals = []
        for s in stages:
            v = latest[s].data.metrics.get(r)
            vals.append(("-" if v is None else (f"{int(v)}" if r == "best_round" else f"{v:.4f}")).rjust(18))
        lines.append(r.ljust(width) + "".join(vals))
    lines.append("status".ljust(width) + "".join(latest[s].info.status.rjust(18) for s in stages))
    return "\n".join(lines + _paired_lines(uri, latest, protocol))


def _paired_lines(uri: str, runs: dict[str, Any], protocol: str) -> list[str]:
    """Each later stage against the first, user by user on the test split (``stats.paired_test``)."""

    ranks = {s: test_ranks(uri, run.info.run_id, protocol) for s, run in runs.items()}
    have = [s for s, r in ranks.items() if r is not None]
    if len(have) < 2:
        return [] if len(runs) < 2 else ["paired tests: fewer than two stage runs hold their per-user test ranks "
                                         "(re-run the stages with this version: dvc repro -f)"]
    base = have[0]
    lines = ["", f"paired tests against {base}, per user on the test split ({protocol}): mean difference "
                 "[95% paired-bootstrap interval], two-sided Wilcoxon signed-rank p"]
    for s in have[1:]:
        for metric in ("NDCG@10", "HR@10"):
            lines.append(f"  {s}: {paired_test(ranks[base], ranks[s], metric).describe()}")
    return lines


def test_ranks(uri: str, run_id: str, protocol: str):
    """A stage run's per-user test ranks under ``protocol`` [U], or None when the run has none."""
    import tempfile

    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")   # a table, not progress bars
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=TEST_RANKS, tracking_uri=uri,
                                                       dst_path=tmp)
        except Exception:  # an older run, or one whose artifacts were not recorded
            return None
        ranks = load_tensors(path, "test ranks", "re-run the stage")
    return ranks[protocol].numpy() if protocol in ranks else None
