"""A stage's model as an MLflow model: logged with its run, registered, served.

The MLflow model is a pyfunc (``FedDMMRModel``, logged from code, never pickled) whose artifacts are the
checkpoint (weights, config, client memories), the prepared data (id maps and the users' histories),
the feature files of a multimodal stage and the item titles. Every training stage logs one and
registers it as a version of ``feddmmr``; the alias ``champion`` points at the stage with the best
validation full NDCG@10 of the latest pipeline run.

Input: a DataFrame with a ``user`` column (original user ids) or a ``history`` column (lists of
original item ids, oldest first: new users). Params: ``k`` (default 10), ``include_known``
(default false). Output: the rows of ``feddmmr.recommend`` (request, user, rank, item, title, score).
"""
from __future__ import annotations

import contextlib
import csv
import os
import tempfile
from pathlib import Path

import mlflow
import pandas as pd

from .errors import FeddmmrError, redact
from .recommend import Recommender
from .tracking import lineage, tracking_uri

REGISTERED_MODEL = "feddmmr"
CHAMPION = "champion"
SELECTION = "best_val.full.NDCG_at_10"   # the MLflow metric the champion is chosen by
DEFAULTS = {"k": 10, "include_known": False}


class FedDMMRModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        a = context.artifacts
        self.recommender = Recommender.load(a["checkpoint"], a["data"], a.get("features", a["checkpoint"]),
                                            read_titles(a["titles"]))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        p = {**DEFAULTS, **(params or {})}
        try:
            return recommend_frame(self.recommender, model_input, int(p["k"]), bool(p["include_known"]))
        except FeddmmrError as exc:   # the caller's error: HTTP 400 with the one-line message, no stack trace
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None


def recommend_frame(rec: Recommender, frame: pd.DataFrame, k: int, include_known: bool) -> pd.DataFrame:
    """Recommendations for a request frame: every row a ``user`` or every row a ``history``."""
    users = frame["user"] if "user" in frame else pd.Series(dtype=float)
    histories = frame["history"] if "history" in frame else pd.Series(dtype=object)
    has_user, has_history = users.notna(), histories.map(lambda h: h is not None and not _missing(h))
    if len(frame) and has_user.all() and not has_history.any():
        return rec.for_users(list(users), k, include_known)
    if len(frame) and has_history.all() and not has_user.any():
        return rec.for_histories([list(h) for h in histories], k, include_known)
    raise FeddmmrError("each request row needs a user id or a history, and one request holds one kind: "
                       "[{\"user\": 10}, ...] or [{\"history\": [1, 2, 3]}, ...]")


def _missing(value) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):   # a list
        return False


def read_titles(path: str | Path) -> dict[int, str]:
    with open(path, newline="", encoding="utf-8") as f:
        return {int(row["item"]): row["title"] for row in csv.DictReader(f)}


def write_titles(path: Path, titles: dict[int, str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["item", "title"])
        w.writerows(sorted(titles.items()))


def signature():
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, ParamSchema, ParamSpec, Schema
    # user: Any, checked by Recommender (an exact integer): as "long", MLflow's JSON parsing turned 1.5 into user 1
    inputs = Schema([ColSpec(AnyType(), "user", required=False), ColSpec(Array("long"), "history", required=False)])
    outputs = Schema([ColSpec("long", "request"), ColSpec("long", "user"), ColSpec("long", "rank"),
                      ColSpec("long", "item"), ColSpec("string", "title"), ColSpec("double", "score")])
    params = ParamSchema([ParamSpec("k", "long", DEFAULTS["k"]),
                          ParamSpec("include_known", "boolean", DEFAULTS["include_known"])])
    return ModelSignature(inputs, outputs, params)


def requirements() -> list[str]:
    from importlib.metadata import version
    return [f"{name}=={version(name)}" for name in ("torch", "numpy", "pandas", "safetensors", "mlflow")]


@contextlib.contextmanager
def _fluent_store(uri: str):
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


def log_stage_model(uri: str, client, exp_id: str, run_id: str, stage: str, checkpoint: Path, data: Path,
                    features: Path | None, titles: dict[int, str], example_user: int) -> str:
    """Log the stage's model with its MLflow run and register it as a version of ``feddmmr``; its version.

    A run that already registered a version (a re-run that records what the store missed) is not logged twice.
    """
    done = client.search_model_versions(f"name='{REGISTERED_MODEL}' and run_id='{run_id}'")
    if done:
        return done[0].version
    with _fluent_store(uri), tempfile.TemporaryDirectory() as tmp:
        write_titles(Path(tmp) / "titles.csv", titles)
        artifacts = {"checkpoint": str(checkpoint), "data": str(data), "titles": str(Path(tmp) / "titles.csv"),
                     **({"features": str(features)} if features is not None else {})}
        logged = client.create_logged_model(exp_id, name=stage, source_run_id=run_id, tags={"feddmmr.stage": stage})
        info = mlflow.pyfunc.log_model(
            name=stage, python_model=str(Path(__file__).with_name("mlflow_model.py")), artifacts=artifacts,
            code_paths=[str(Path(__file__).parent)], signature=signature(), pip_requirements=requirements(),
            input_example=(pd.DataFrame({"user": [example_user]}), {"k": 10}), model_id=logged.model_id)
        version = mlflow.register_model(info.model_uri, REGISTERED_MODEL, tags={"stage": stage})
    return version.version


def crown_champion(client, exp_id: str, parent_run_id: str) -> str | None:
    """Point ``champion`` at the version with the best validation NDCG@10 among the stages of a pipeline run (its
    lineage: an ad-hoc training beside the pipeline is not one of them)."""
    members = {run.info.run_id for run in lineage(client, exp_id, parent_run_id).values()}
    scored = []
    for v in client.search_model_versions(f"name='{REGISTERED_MODEL}'"):
        run = client.get_run(v.run_id) if v.run_id in members else None
        if (run is not None and run.info.status not in ("FAILED", "KILLED") and SELECTION in run.data.metrics):
            scored.append((run.data.metrics[SELECTION], int(v.version)))
    if not scored:
        return None
    best = str(max(scored)[1])
    client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION, best)
    return best


class LoadedModel:
    """A logged FedDMMR model loaded through MLflow, answering like ``Recommender``."""

    def __init__(self, uri: str):
        from mlflow.exceptions import MlflowException
        store = tracking_uri()
        try:
            with _fluent_store(store):
                self.pyfunc = mlflow.pyfunc.load_model(uri)
        except MlflowException as exc:
            raise FeddmmrError(f"MLflow model {uri} cannot be loaded from {redact(store)} ({redact(_message(exc))}); "
                               f"see the registered versions in the MLflow UI, or train a stage with "
                               f"tracking.log_models: true") from None

    def recommend(self, users: list[int] | None, history: list[int] | None, k: int, include_known: bool):
        from mlflow.exceptions import MlflowException
        frame = pd.DataFrame({"user": users}) if users is not None else pd.DataFrame({"history": [history]})
        try:
            return self.pyfunc.predict(frame, params={"k": k, "include_known": include_known})
        except MlflowException as exc:
            raise FeddmmrError(_message(exc)) from None


def _message(exc: BaseException) -> str:
    """The first line of an MLflow error: the message our own one-line errors carry through the pyfunc."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
