"""A stage's model as MLflow serves it: the pyfunc ``FedDMMRModel`` (logged from code, never pickled; its file is
``mlflow_model.py``) and ``LoadedModel``, a logged model loaded back through MLflow.

The model's artifacts are the checkpoint (weights, config, client memories), the prepared data (id maps and the
users' histories), the feature files of a multimodal stage and the item titles (``tracking.registry`` logs them).

Input: a DataFrame with a ``user`` column (original user ids) or a ``history`` column (lists of
original item ids, oldest first: new users). Params: ``k`` (default 10), ``include_known``
(default false). Output: the rows of ``feddmmr.serving.recommend`` (request, user, rank, item, title, score).
"""
from __future__ import annotations

import csv
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from feddmmr.errors import FeddmmrError
from feddmmr.serving.recommend import Recommender
from feddmmr.tracking.registry import DEFAULTS, fluent_store
from feddmmr.tracking.store import tracking_uri


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
        bad = [h for h in histories if not isinstance(h, (list, tuple, np.ndarray))]
        if bad:
            raise FeddmmrError(f"a history is a list of original item ids, oldest first, e.g. [1, 2, 3]; got {bad[0]!r}")
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


class LoadedModel:
    """A logged FedDMMR model loaded through MLflow, answering like ``Recommender``."""

    def __init__(self, uri: str):
        from mlflow.exceptions import MlflowException
        store = tracking_uri()
        try:
            with fluent_store(store):
                self.pyfunc = mlflow.pyfunc.load_model(uri)
        except MlflowException as exc:
            raise FeddmmrError(f"MLflow model {uri} cannot be loaded from {store} ({_message(exc)}); "
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
