"""End to end: a real Prefect server on 127.0.0.1, the project's prefect.yaml deployed to a process
work pool, a run triggered through the API and executed by a worker, on tiny data."""
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, free_port, wait_for_http, write_tiny_project

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_deployment_run_through_the_api_completes_the_pipeline(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true", "FEDDMMR_PROJECT_DIR": str(REPO),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns.db'}"}
    env.pop("FEDDMMR_PIPELINE_RUN", None)
    project = tmp_path / "project"
    project.mkdir()
    write_tiny_project(project)

    def prefect(*args, timeout=180):
        r = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=timeout)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return r.stdout

    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/api/health", server, "prefect server")
        prefect("work-pool", "create", "feddmmr-process", "--type", "process")
        prefect("deploy", "--name", "process")
        out = prefect("deployment", "run", "feddmmr-pipeline/process", "-p", f"project_dir={project}")
        flow_run_id = next(line.split("UUID:")[1].strip() for line in out.splitlines() if "UUID:" in line)
        prefect("worker", "start", "--pool", "feddmmr-process", "--run-once", timeout=300)
        state = json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{port}/api/flow_runs/{flow_run_id}", timeout=10).read())["state"]["type"]
        assert state == "COMPLETED"
        metrics = json.loads((project / "metrics" / "pretrain_sasrec.json").read_text())
        assert metrics["rounds_run"] == 2
        assert (project / "features" / "text" / "features.safetensors").is_file()
        assert (project / "checkpoints" / "pretrain_sasrec" / "model.safetensors").is_file()
        assert json.loads((project / "metrics" / "finetune_moe.json").read_text())["rounds_run"] == 2

        # the GPU deployment for the Docker work pool is accepted as declared (running it needs the image and a GPU)
        prefect("work-pool", "create", "feddmmr-docker", "--type", "docker")
        prefect("deploy", "--name", "docker-gpu")
        deployments = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/api/deployments/filter", data=b"{}", method="POST",
            headers={"Content-Type": "application/json"}), timeout=10).read())
        gpu = next(d for d in deployments if d["name"] == "docker-gpu")
        assert gpu["work_pool_name"] == "feddmmr-docker"
        assert gpu["job_variables"]["container_create_kwargs"]["device_requests"][0]["Capabilities"] == [["gpu"]]
        assert gpu["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == "/opt/feddmmr"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
