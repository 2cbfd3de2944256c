"""Where the pipeline's steps run: the step deployments of prefect.yaml, a run's job variables (the GPU
request dropped by a job variable), a failed step container's state read back as the subprocess step's
failure, and the stack's project in the workspace volume. No Docker daemon needed (test_docker.py runs
the stack)."""
import subprocess

import pytest
import yaml
from prefect.states import Completed, Crashed, Failed

from conftest import REPO
from feddmmr.errors import DivergedError, FeddmmrError, SystemFailure
from flows.stack import sync_project
from flows.steps import STEP_FLOW, STEPS, TRAIN_STEPS, failure, step_job_variables, task_name
from flows.workspace import Workspace, run
from feddmmr.modalities import MODALITIES

GPU_STEPS = {*(f"features_{m.name}" for m in MODALITIES if m.gpu), *TRAIN_STEPS, "centralized"}


def deployments() -> dict:
    return {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}


def test_every_step_has_a_docker_deployment_with_its_own_resources():
    deployed = deployments()
    for step in STEPS:
        d = deployed[task_name(step)]
        assert d["entrypoint"] == "flows/steps.py:step_flow" and d["work_pool"]["name"] == "feddmmr-docker"
        jv = d["work_pool"]["job_variables"]
        requests = (jv.get("container_create_kwargs") or {}).get("device_requests")
        assert bool(requests) == (step in GPU_STEPS), step
        if requests:
            assert requests == [{"Driver": "nvidia", "Count": 1, "Capabilities": [["gpu"]]}]
        # the hand-off: every container sees the workspace, the DVC cache and remote at the same paths
        assert {v.split(":")[1] for v in jv["volumes"]} == {"/workspace", "/dvc/cache", "/dvc/remote", "/data"}
        assert jv["env"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    pipeline = deployed["docker"]
    assert pipeline["parameters"]["steps_on"] == "docker"
    assert "container_create_kwargs" not in pipeline["work_pool"]["job_variables"]   # the orchestrator: no GPU
    assert deployed["process"]["work_pool"]["name"] == "feddmmr-process"


def test_a_run_without_gpu_drops_only_the_device_request():
    deployed = {"container_create_kwargs": {"device_requests": [{"Driver": "nvidia"}], "shm_size": "1g"}}
    jv = step_job_variables(deployed, "exp-1", "pretrain_sasrec", gpu=False)
    assert jv["container_create_kwargs"] == {"shm_size": "1g"}
    assert jv["labels"] == {"io.feddmmr.experiment": "exp-1", "io.feddmmr.step": "pretrain_sasrec"}
    assert "container_create_kwargs" not in step_job_variables(deployed, "exp-1", "pretrain_sasrec", gpu=True)
    assert "container_create_kwargs" not in step_job_variables({}, "exp-1", "prepare", gpu=False)


def test_a_failed_step_container_keeps_the_exit_code_that_decides_retries():
    diverged = Failed(message="Flow run encountered an exception: StepFailed: step finetune_moe failed (exit 3): "
                              "feddmmr: error: non-finite loss")
    f = failure("finetune_moe", diverged)
    assert f.exit_code == 3 and str(f) == "step finetune_moe failed (exit 3): feddmmr: error: non-finite loss"
    bad = failure("prepare", Failed(message="Flow run encountered an exception: FeddmmrError: no workspace /x"))
    assert bad.exit_code == 2 and "no workspace /x" in str(bad)
    crashed = failure("prepare", Crashed(message="Flow run infrastructure exited with non-zero status code 137."))
    assert crashed.exit_code is None and "137" in str(crashed)                 # a killed container is retried
    no_gpu = failure("train", Crashed(message='could not select device driver "nvidia" with capabilities: [[gpu]]'))
    assert no_gpu.exit_code == 2 and "gpu=false" in str(no_gpu)
    assert Completed().is_completed() and STEP_FLOW == "feddmmr-step"


def test_the_flow_retries_crashes_never_bad_input_or_divergence():
    """A killed worker (exit 5, SystemFailure) is retried; it used to exit 2, the status never retried."""
    from flows.pipeline import transient
    from flows.workspace import StepFailed

    class Ended:
        def __init__(self, exc):
            self.exc = exc

        def result(self, raise_on_failure):
            return self.exc

    retried = [SystemFailure("a training worker stopped"), StepFailed("train", 5, "worker killed"),
               StepFailed("train", None, "container 137"), OSError("disk")]
    final = [FeddmmrError("bad key"), DivergedError("nan"), StepFailed("train", 2, "bad"), StepFailed("train", 3, "nan")]
    assert [transient(None, None, Ended(e)) for e in retried + final] == [True] * 4 + [False] * 4


def git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture()
def image_source(tmp_path):
    """A copy of what the task image installs under /opt/feddmmr (enough of it for git and DVC)."""
    src = tmp_path / "opt"
    src.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        (src / name).write_text((REPO / name).read_text())
    (src / ".dvc").mkdir()
    for name in ("config", ".gitignore"):
        (src / ".dvc" / name).write_text((REPO / ".dvc" / name).read_text())
    (src / "feddmmr").mkdir()
    (src / "feddmmr" / "__init__.py").write_text("")
    return src


def test_the_stack_project_follows_the_image_and_never_loses_edits(tmp_path, image_source):
    project, cache, remote = tmp_path / "ws" / "project", tmp_path / "cache", tmp_path / "remote"
    first = sync_project(image_source, project, cache, remote, "abc123")
    assert git("log", "--format=%s", cwd=project) == "feddmmr task image, source abc123"
    assert (project / "feddmmr" / "__init__.py").exists() and git("status", "--porcelain", cwd=project) == ""
    dvc = REPO / ".venv" / "bin" / "dvc"
    dvc = str(dvc) if dvc.exists() else "dvc"
    assert subprocess.run([dvc, "cache", "dir"], cwd=project, capture_output=True, text=True).stdout.strip() == str(cache)
    assert sync_project(image_source, project, cache, remote, "abc123") == first     # same image: no new commit

    (image_source / "feddmmr" / "__init__.py").unlink()                              # a new image without a file
    (image_source / "feddmmr" / "stages.py").write_text("x = 1\n")
    second = sync_project(image_source, project, cache, remote, "def456")
    assert second != first and git("rev-parse", "HEAD~1", cwd=project) == first
    assert not (project / "feddmmr" / "__init__.py").exists() and (project / "feddmmr" / "stages.py").exists()

    (project / "params.yaml").write_text("edited: true\n")                          # a user's edit in the volume
    with pytest.raises(FeddmmrError, match="uncommitted changes"):
        sync_project(image_source, project, cache, remote, "ghi789")
    assert (project / "params.yaml").read_text() == "edited: true\n"


def test_a_flow_run_workspace_shares_the_stack_projects_cache_and_default_remote(tmp_path, image_source):
    project, cache, remote = tmp_path / "project", tmp_path / "cache", tmp_path / "remote"
    sync_project(image_source, project, cache, remote, "abc123")                   # remote and cache: local config
    ws = Workspace.open(project, "run-1")
    assert Workspace.attach(project, "run-1").path == ws.path
    assert run(["dvc", "remote", "default"], ws.path, "") == "stack"
    assert run(["dvc", "config", "remote.stack.url"], ws.path, "") == str(remote)
    assert run(["dvc", "cache", "dir"], ws.path, "") == str(cache)
    with pytest.raises(FeddmmrError, match="no workspace"):
        Workspace.attach(project, "run-2")


def test_the_stack_setup_refuses_a_folder_without_the_project(tmp_path):
    with pytest.raises(FeddmmrError, match="no dvc.yaml"):
        sync_project(tmp_path, tmp_path / "project", tmp_path / "c", tmp_path / "r", "x")


def test_a_bad_override_through_the_flow_command_is_one_line_before_any_flow_run(tmp_path):
    """`python -m flows.pipeline -S prepare.nope=1` used to answer after 45 s and two Prefect tracebacks."""
    import os
    import sys
    import time
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "flows.pipeline", "--project-dir", str(REPO), "-S", "prepare.nope=1"],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"})   # nothing is contacted
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["flows.pipeline: error: params: unknown key prepare.nope; valid keys: "
                                             + r.stderr.split("valid keys: ")[1].strip()]
    assert time.perf_counter() - start < 30
