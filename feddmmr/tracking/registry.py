"""The model registry: every training stage's model logged with its MLflow run and registered as a version of
``feddmmr``; the alias ``champion`` moves to a pipeline run's best stage (validation full NDCG@10) only when it
beats the current champion on the same prepared data, and never to a candidate run (overrides, another output, a
sweep): ``feddmmr promote VERSION`` moves it on purpose.

The logged model is the serving code (``feddmmr/serving/mlflow_model.py``, models-from-code, named by its path and
shipped with the package as ``code_paths``: this module never imports serving) plus its artifacts.
"""
from __future__ import annotations

import contextlib
import csv
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import mlflow
import pandas as pd
from mlflow.entities import LoggedModelOutput

from feddmmr.errors import FeddmmrError
from feddmmr.tracking.reports import lineage
from feddmmr.tracking.store import check_store, tracking_uri

log = logging.getLogger("feddmmr")
PACKAGE = Path(__file__).resolve().parents[1]   # the feddmmr package, logged with every model
MODEL_CODE = PACKAGE / "serving" / "mlflow_model.py"
REGISTERED_MODEL = "feddmmr"
CHAMPION = "champion"
SELECTION = "best_val.full.NDCG_at_10"   # the MLflow metric the champion is chosen by
DEFAULTS = {"k": 10, "include_known": False}


def write_titles(path: Path, titles: dict[int, str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["item", "title"])
        w.writerows(sorted(titles.items()))


def signature():
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema
    # Any, checked here (recommend_frame, Recommender): as "long", MLflow's JSON parsing turned a user id of 1.5
    # into user 1, and a request mixing users and histories failed in MLflow's type conversion
    inputs = Schema([ColSpec(AnyType(), "user", required=False), ColSpec(AnyType(), "history", required=False)])
    outputs = Schema([ColSpec("long", "request"), ColSpec("long", "user"), ColSpec("long", "rank"),
                      ColSpec("long", "item"), ColSpec("string", "title"), ColSpec("double", "score")])
    params = ParamSchema([ParamSpec("k", "long", DEFAULTS["k"]),
                          ParamSpec("include_known", "boolean", DEFAULTS["include_known"])])
    return ModelSignature(inputs, outputs, params)


def requirements() -> list[str]:
    from importlib.metadata import version
    return [f"{name}=={version(name)}" for name in ("torch", "numpy", "pandas", "safetensors", "mlflow")]


@contextlib.contextmanager
def fluent_store(uri: str):
    """Point MLflow's fluent API (log_model, register_model, load_model) at ``uri`` for the block only.

    MLflow keeps the URI in a process global and in ``MLFLOW_TRACKING_URI``; left set, they would send every later
    MLflow call of the process (a Python user's, the next stage's) to this store.
    """
    from mlflow.tracking._tracking_service import utils
    old_global, old_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_global)
        if old_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


DESCRIPTION = (
    "FedDMMR recommenders: one version per training stage of every pipeline run (tag `stage`). The alias "
    "`champion` is the best model by validation full NDCG@10 on the same prepared data; it moves only to a model "
    "that beats it, never to a candidate run (overrides or an own output folder), or on purpose with "
    "`feddmmr promote VERSION --reason ...`; each champion version's tag `champion_reason` says why.")


def log_stage_model(uri: str, client, exp_id: str, run_id: str, stage: str, checkpoint: Path, data: Path,
                    features: Path | None, titles: dict[int, str], example_user: int) -> str:
    """Log the stage's model with its MLflow run and register it as a version of ``feddmmr``; its version.

    A run that already registered a version (a re-run that records what the store missed) is not logged twice.
    """
    done = client.search_model_versions(f"name='{REGISTERED_MODEL}' and run_id='{run_id}'")
    if done:
        return done[0].version
    with fluent_store(uri), tempfile.TemporaryDirectory() as tmp:
        write_titles(Path(tmp) / "titles.csv", titles)
        artifacts = {"checkpoint": str(checkpoint), "data": str(data), "titles": str(Path(tmp) / "titles.csv"),
                     **({"features": str(features)} if features is not None else {})}
        logged = client.create_logged_model(exp_id, name=stage, source_run_id=run_id, tags={"feddmmr.stage": stage})
        info = mlflow.pyfunc.log_model(
            name=stage, python_model=str(MODEL_CODE), artifacts=artifacts,
            code_paths=[str(PACKAGE)], signature=signature(), pip_requirements=requirements(),
            input_example=(pd.DataFrame({"user": [example_user]}), {"k": 10}), model_id=logged.model_id)
        # the run's output (MLflow's run page lists it under "Logged models", the model page links the run)
        client.log_outputs(run_id, [LoggedModelOutput(model_id=logged.model_id, step=0)])
        version = mlflow.register_model(info.model_uri, REGISTERED_MODEL, tags={"stage": stage})
    if not client.get_registered_model(REGISTERED_MODEL).description:
        client.update_registered_model(REGISTERED_MODEL, description=DESCRIPTION)
    return version.version


def register_stage(model: dict) -> Callable[[Any], None]:
    """The "registered model" step of a stage's MLflow run (``StageRun.finish(register=...)``): log the stage's
    model (``log_stage_model``'s inputs in ``model``), register it, and move the champion if it earned it."""
    def register(run) -> None:
        version = log_stage_model(run.uri, run.client, run.exp_id, run.run_id, run.stage, **model)
        champion = crown_champion(run.client, run.exp_id, run.parent_id)
        log.info("MLflow: %s registered as %s version %s; %s is version %s", run.stage, REGISTERED_MODEL, version,
                 CHAMPION, champion)
    return register


def crown_champion(client, exp_id: str, parent_run_id: str) -> str | None:
    """Move ``champion`` to the best stage of a pipeline run (by validation NDCG@10, among its lineage) only when
    that beats the current champion on the same prepared data and evaluation protocol (tag ``prepared_sha256``: the
    split and the sampled negatives), or when there is no champion yet. A candidate run (parameter overrides, an
    output other than the pipeline's, a sweep or experiment: tag ``feddmmr.candidate``) never moves it: ``feddmmr
    promote`` does, on purpose. The reason is recorded on the version (tag ``champion_reason``). The champion's
    version, or None."""
    members = {run.info.run_id for run in lineage(client, exp_id, parent_run_id).values()}
    scored = []
    for v in client.search_model_versions(f"name='{REGISTERED_MODEL}'"):
        run = client.get_run(v.run_id) if v.run_id in members else None
        if (run is not None and run.info.status not in ("FAILED", "KILLED") and SELECTION in run.data.metrics):
            scored.append((run.data.metrics[SELECTION], int(v.version), run))
    current = _champion(client)
    if not scored:
        return current[0] if current else None
    score, version, run = max(scored, key=lambda item: item[:2])
    if run.data.tags.get("feddmmr.candidate") == "true":
        log.info("MLflow: version %s is a candidate (overrides or another output): %s stays version %s; "
                 "`feddmmr promote %s` makes it the champion", version, CHAMPION, current[0] if current else None,
                 version)
        return current[0] if current else None
    if current is None:
        reason = f"the first champion: validation full NDCG@10 {score:.4f}"
    elif current[0] == str(version):
        return current[0]
    elif current[1].data.tags.get("prepared_sha256") != run.data.tags.get("prepared_sha256"):
        log.info("MLflow: %s version %s was chosen on other prepared data; version %s is not compared with it "
                 "(`feddmmr promote %s` makes it the champion)", CHAMPION, current[0], version, version)
        return current[0]
    elif score > current[1].data.metrics.get(SELECTION, float("-inf")):
        reason = (f"validation full NDCG@10 {score:.4f} beat version {current[0]}'s "
                  f"{current[1].data.metrics.get(SELECTION, float('nan')):.4f} on the same prepared data")
    else:
        return current[0]
    return promote(client, str(version), reason)


def promote_version(version: str, reason: str) -> str:
    """``feddmmr promote``: the champion moved to ``version`` in the store ``tracking_uri()``; what to print."""
    uri = tracking_uri()
    check_store(uri)
    client = mlflow.MlflowClient(uri)
    try:
        v = client.get_model_version(REGISTERED_MODEL, str(version))
    except Exception:
        raise FeddmmrError(f"no version {version!r} of the registered model {REGISTERED_MODEL} in {uri}; the "
                           f"MLflow UI's Models page lists them (or set MLFLOW_TRACKING_URI to the right store)") from None
    before = _champion(client)
    promote(client, str(v.version), reason)
    return (f"{CHAMPION} is version {v.version} ({v.tags.get('stage', '?')}) of {REGISTERED_MODEL}"
            f"{f', was version {before[0]}' if before else ''}: {reason}")


def _champion(client):
    """(version, its run) of the current champion, or None."""
    try:
        v = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    except Exception:   # no alias yet (MLflow raises RESOURCE_DOES_NOT_EXIST)
        return None
    return str(v.version), client.get_run(v.run_id)


def promote(client, version: str, reason: str) -> str:
    """Point ``champion`` at ``version`` of the registered model, recording ``reason`` on the version."""
    client.set_model_version_tag(REGISTERED_MODEL, version, "champion_reason", reason)
    client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION, version)
    return version
