"""End to end: a real Prefect server on 127.0.0.1, the project's prefect.yaml deployed to a process work pool,
two runs triggered through the API at once and executed by a worker: each becomes a DVC experiment with its
outputs on the DVC remote, with named step tasks and metric artifacts read back through the Prefect API."""
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, free_port, git_dvc_project, wait_for_http

BIN = Path(sys.executable).parent


def api(port, path, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/{path}", method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_two_deployment_runs_at_once_become_two_dvc_experiments(tmp_path):
    port = free_port()
    project = git_dvc_project(tmp_path / "project")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true", "FEDDMMR_PROJECT_DIR": str(REPO),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for key in ("FEDDMMR_PIPELINE_RUN", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)

    def prefect(*args, timeout=180):
        r = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=timeout)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout

    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/api/health", server, "prefect server")
        prefect("work-pool", "create", "feddmmr-process", "--type", "process")
        prefect("deploy", "--name", "process", "--name", "nightly-ml1m")
        runs = []
        for rounds in (1, 2):
            out = prefect("deployment", "run", "feddmmr-pipeline/process", "-p", f"project_dir={project}",
                          "-p", f'overrides=["pretrain_sasrec.rounds={rounds}"]')
            runs.append(next(line.split("UUID:")[1].strip() for line in out.splitlines() if "UUID:" in line))
        prefect("worker", "start", "--pool", "feddmmr-process", "--run-once", "--limit", "2", timeout=1500)

        names = []
        for run_id in runs:
            run = api(port, f"flow_runs/{run_id}")
            assert run["state"]["type"] == "COMPLETED", run["state"]["message"]
            names.append(run["name"])
            tasks = api(port, "task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
            assert {t["name"] for t in tasks} >= {"workspace", "prepare", "features-text", "train-pretrain_sasrec",
                                                  "train-align_projectors", "train-finetune_moe", "save-experiment"}
            arts = api(port, "artifacts/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
            by_key = {a["key"]: a["data"] for a in arts}
            assert "| test | full |" in by_key["finetune-moe-metrics"] and "/#/experiments/" in by_key["finetune-moe-metrics"]
            assert "?workflowType=machine_learning)" in by_key["finetune-moe-metrics"]   # the training view
            assert "| test sampled NDCG@10 |" in by_key["stage-comparison"]
        experiments = subprocess.run([str(BIN / "dvc"), "exp", "list", "--name-only"], cwd=project, env=env,
                                     capture_output=True, text=True).stdout.split()
        assert sorted(experiments) == sorted(names)                    # both runs recorded, neither overwritten
        assert any((tmp_path / "project-storage").rglob("*"))           # outputs pushed to the DVC remote

        nightly = next(d for d in api(port, "deployments/filter", {}) if d["name"] == "nightly-ml1m")
        assert nightly["parameters"]["dataset"] == "ml-1m-top1000" and nightly["parameters"]["overrides"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
