"""How feddmmr names its parameters and metrics in MLflow: nested sections flattened with dots, metric names
with the characters MLflow refuses replaced."""
from __future__ import annotations

from typing import Any


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def prefixed(metrics: dict, prefix: str = "val") -> dict[str, float]:
    """Nested evaluation metrics as flat MLflow-style names: ``{prefix}.full.NDCG@10``."""
    return {f"{prefix}.{k}": v for k, v in flatten(metrics).items()}


def metric_name(name: str) -> str:
    """MLflow metric names allow letters, digits, '_', '-', '.', ' ', '/': HR@10 -> HR_at_10."""
    return name.replace("@", "_at_")
