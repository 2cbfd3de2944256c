"""The Prefect pipeline flow under prefect_test_harness: every flow run is a DVC experiment, on tiny data in a
scratch git + DVC project."""
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from conftest import git_dvc_project

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return git_dvc_project(tmp_path_factory.mktemp("flow") / "project")


def sh(*cmd, cwd):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def stage_runs(project):
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlruns.db'}")
    exp = client.get_experiment_by_name("feddmmr")
    return client, client.search_runs([exp.experiment_id], filter_string="tags.`feddmmr.kind` = 'stage'")


def test_a_flow_run_is_a_pushed_dvc_experiment_rerun_from_the_run_cache_and_reproduced_by_dvc_repro(harness, project, monkeypatch):
    from flows.pipeline import pipeline
    from flows.steps import STEPS
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("FEDDMMR_PIPELINE_RUN", raising=False)
    state = pipeline(overrides=["pretrain_sasrec.rounds=1"], project_dir=str(project), return_state=True)
    assert state.is_completed()
    result = state.result()
    name = result["experiment"]
    assert set(result["ran"]) == set(STEPS)   # prepare, a features step per modality, the stages, the baselines
    assert result["metrics"]["pretrain_sasrec"]["rounds_run"] == 1          # the override reached the stage

    # the user's checkout is untouched; the experiment is listed there, its outputs are on the DVC remote
    assert sh("git", "status", "--porcelain", cwd=project) == "" and not (project / "data" / "prepared").exists()
    assert not (project / ".dvc" / "tmp" / "runs" / name).exists()
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=project))
    exps = {e["name"]: e for row in shown for e in (row.get("experiments") or []) for e in e["revs"]}
    assert name in exps
    params = exps[name]["data"]["params"]["params.yaml"]["data"]
    assert params["pretrain_sasrec"]["rounds"] == 1
    assert any((project.parent / "project-storage").rglob("*")), "nothing pushed to the DVC remote"

    # MLflow: one parent run named after the experiment, its stages under it, compare picks it
    client, runs = stage_runs(project)
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.info.run_name == name and parent.data.tags["dvc_experiment"] == name
    assert parent.data.tags["git_commit"] == sh("git", "rev-parse", "HEAD", cwd=project).strip()
    assert {r.data.tags["feddmmr.stage"] for r in runs} == {"pretrain_sasrec", "align_projectors", "finetune_moe",
                                                            "popularity", "centralized"}
    assert client.get_experiment_by_name("feddmmr").tags["mlflow.experimentKind"] == "custom_model_development"
    assert f"pipeline {name} " in sh(str(BIN / "feddmmr"), "compare", "--run", name, cwd=project)

    # the same params again: a new experiment, every stage restored from the run-cache, nothing retrained
    rerun = pipeline(overrides=["pretrain_sasrec.rounds=1"], project_dir=str(project))
    assert rerun["ran"] == [] and rerun["metrics"] == result["metrics"] and rerun["experiment"] != name
    assert len(stage_runs(project)[1]) == len(runs)

    # dvc exp apply + dvc repro (forced: really retrained) gives the same metrics
    sh("dvc", "exp", "apply", name, cwd=project)
    sh("dvc", "repro", "--force", "--single-item", "pretrain_sasrec", cwd=project)
    again = json.loads((project / "metrics" / "pretrain_sasrec.json").read_text())
    assert (again["val"], again["test"]) == (result["metrics"]["pretrain_sasrec"]["val"],
                                             result["metrics"]["pretrain_sasrec"]["test"])
    sh("git", "checkout", "--", ".", cwd=project)


def test_a_bad_override_fails_the_flow_without_touching_anything(harness, project):
    from flows.pipeline import pipeline
    from feddmmr.errors import FeddmmrError
    status = sh("git", "status", "--porcelain", "--ignored", cwd=project)
    with pytest.raises(FeddmmrError, match="unknown key prepare.nope"):
        pipeline(overrides=["prepare.nope=1"], project_dir=str(project))
    assert sh("git", "status", "--porcelain", "--ignored", cwd=project) == status


def test_a_lock_committed_on_another_cpu_type_retrains_nothing_that_this_machine_has(harness, project, monkeypatch):
    """The committed dvc.lock lists other hashes for the text features and every checkpoint (float sums differ
    between CPU types), while this machine has run the same stages with the same inputs (`make repro`): a flow
    run of the committed commit restores this machine's outputs from DVC's run-cache and trains nothing."""
    import re
    from flows.pipeline import pipeline
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("FEDDMMR_PIPELINE_RUN", raising=False)
    sh("dvc", "repro", cwd=project)                                   # this machine's `make repro`
    lock = (project / "dvc.lock").read_text()
    ours = set(re.findall(r"md5: ([0-9a-f]{32})\.dir", lock))
    theirs = lock
    for md5 in ours:   # the other machine's outputs: other hashes, consistent between outs and later deps
        theirs = theirs.replace(md5, f"{int(md5, 16) ^ 1:032x}")
    (project / "dvc.lock").write_text(theirs)
    sh("git", "add", "dvc.lock", cwd=project)
    sh("git", "-c", "user.email=t@localhost", "-c", "user.name=t", "commit", "-qm", "dvc.lock from another CPU",
       cwd=project)
    result = pipeline(project_dir=str(project))
    assert result["ran"] == [], result["ran"]
