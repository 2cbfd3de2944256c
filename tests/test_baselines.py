"""The popularity baseline: evaluated like a stage, recorded like one."""
import json

import mlflow
import numpy as np
import pytest

from conftest import tiny_params
from feddmmr.training.baselines import run_baseline
from feddmmr.cli import main
from feddmmr.data.prepare import load_prepared
from feddmmr.io import load_tensors


def _reference_full_ranks(data) -> np.ndarray:
    """Rank of each user's test item among the items outside its history, by training count (ties against)."""
    counts = np.bincount(np.concatenate([data.sequence(u)[:-2] for u in range(data.num_users)]),
                         minlength=data.num_items + 1)
    ranks = []
    for u in range(data.num_users):
        s = data.sequence(u)
        candidates = np.setdiff1d(np.arange(1, data.num_items + 1), s[:-1])
        ranks.append(int((counts[candidates] >= counts[s[-1]]).sum()))
    return np.asarray(ranks)


def test_popularity_ranks_items_by_training_count(tiny_prepared, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    metrics = run_baseline("popularity", tiny_params(), tiny_prepared, tmp_path / "pop", tmp_path / "pop.json")
    data = load_prepared(tiny_prepared)
    ranks = load_tensors(tmp_path / "pop" / "test_ranks.safetensors", "ranks", "")
    assert np.array_equal(ranks["full"].numpy(), _reference_full_ranks(data))
    assert ranks["sampled"].shape == (data.num_users,)
    assert json.loads((tmp_path / "pop.json").read_text()) == metrics
    want = float(np.mean(np.where(ranks["full"].numpy() <= 10, 1.0 / np.log2(ranks["full"].numpy() + 1.0), 0.0)))
    assert metrics["test"]["full"]["NDCG@10"] == pytest.approx(want)
    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("feddmmr").experiment_id])[0]
    assert run.data.tags["feddmmr.stage"] == "popularity" and run.info.status == "FINISHED"
    assert run.data.metrics["test.full.NDCG_at_10"] == pytest.approx(want)


def test_baseline_command(tiny_prepared, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("tracking:\n  enabled: false\n")
    assert main(["-q", "baseline", "popularity", "--data", str(tiny_prepared)]) == 0
    assert json.loads(capsys.readouterr().out)["stage"] == "popularity"
    assert (tmp_path / "metrics" / "popularity.json").is_file()
    assert (tmp_path / "checkpoints" / "popularity" / "test_ranks.safetensors").is_file()
