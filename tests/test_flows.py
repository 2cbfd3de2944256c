"""The Prefect pipeline flow under prefect_test_harness, on tiny data in a scratch project."""
import json
import shutil

import pytest

from conftest import add_dvc_pipeline, write_tiny_project


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def project(tmp_path):
    return write_tiny_project(tmp_path)


def test_pipeline_flow_runs_every_step_and_tags_mlflow(harness, project, monkeypatch):
    import mlflow

    from flows.pipeline import pipeline
    monkeypatch.delenv("FEDDMMR_PIPELINE_RUN", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlruns.db'}")
    state = pipeline(str(project), overrides=["pretrain_sasrec.rounds=1"], return_state=True)
    assert state.is_completed()
    result = state.result()
    assert set(result) == {"prepare", "features_text", "features_visual", "pretrain_sasrec", "align_projectors",
                           "finetune_moe"}
    assert result["prepare"]["num_users"] == 40 and result["features_text"]["covered"] == result["prepare"]["num_items"]
    metrics = json.loads((project / "metrics" / "pretrain_sasrec.json").read_text())
    assert metrics["rounds_run"] == 1  # the override reached the stage
    assert (project / "checkpoints" / "pretrain_sasrec" / "model.safetensors").is_file()
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("feddmmr").experiment_id])
    flow_run_id = str(state.state_details.flow_run_id)
    assert runs and all(r.data.tags["feddmmr.pipeline_key"] == flow_run_id for r in runs)
    assert any(r.data.tags.get("prefect_flow_run_id") == flow_run_id for r in runs)


def test_bad_parameter_fails_the_flow_without_retries(harness, project):
    from flows.pipeline import pipeline
    from feddmmr.errors import FeddmmrError
    with pytest.raises(FeddmmrError, match="unknown key prepare.nope"):
        pipeline(str(project), overrides=["prepare.nope=1"])
    assert not (project / "data" / "prepared").exists()


def test_flow_and_dvc_repro_produce_the_same_results(harness, project, tmp_path, monkeypatch):
    """The same params through `dvc repro` and through the flow give identical metrics and features."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from flows.pipeline import pipeline
    twin = tmp_path / "dvc-twin"
    shutil.copytree(project, twin)
    add_dvc_pipeline(twin)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{twin / 'mlruns.db'}"}
    for args in (["init", "--no-scm", "-q"], ["repro", "-q"]):
        r = subprocess.run([str(bin_dir / "dvc"), *args], cwd=twin, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlruns.db'}")
    assert pipeline(str(project), return_state=True).is_completed()
    for stage in ("pretrain_sasrec", "align_projectors", "finetune_moe"):
        flow_metrics = json.loads((project / "metrics" / f"{stage}.json").read_text())
        dvc_metrics = json.loads((twin / "metrics" / f"{stage}.json").read_text())
        assert flow_metrics["test"] == dvc_metrics["test"] and flow_metrics["best_round"] == dvc_metrics["best_round"]
    import numpy as np
    from safetensors.torch import load_file
    a, b = load_file(project / "features/text/features.safetensors"), load_file(twin / "features/text/features.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # headers may order metadata differently
    with np.load(project / "data/prepared/sequences.npz") as x, np.load(twin / "data/prepared/sequences.npz") as y:
        assert all(np.array_equal(x[k], y[k]) for k in ("items", "offsets", "eval_negatives"))
