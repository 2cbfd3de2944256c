"""The steps of a pipeline flow run, where they run, and the flow that runs one step in its own container.

A step is one DVC stage, run with `dvc repro --single-item <stage>` in the flow run's workspace
(``flows.workspace``). The pipeline flow runs its steps either
- ``process``: as subprocesses of the flow run (the embedded default, the process work pool), or
- ``docker``: each in its own container, as a run of the step's deployment ``feddmmr-step/<step>``
  (prefect.yaml) on the docker work pool, with that step's job variables: CPU for prepare, text features
  and popularity, a GPU request for visual features and the training steps. The containers mount the
  workspace volume and the DVC cache and remote at the paths the flow run sees, so each step finds
  its inputs where the previous one left them.

    prefect deployment run feddmmr-pipeline/docker            # see docker/README.md
"""
from __future__ import annotations

import os
import re
import time
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Cancelled, Completed, State

from feddmmr.errors import FeddmmrError
from feddmmr.modalities import NAMES
from flows.workspace import StepFailed, Workspace

TRAIN_STEPS = ("pretrain_sasrec", "align_projectors", "finetune_moe")
BASELINE_STEPS = ("popularity", "centralized")          # evaluated like the stages, shown beside them
STEPS = ("prepare", *(f"features_{m}" for m in NAMES)) + TRAIN_STEPS + BASELINE_STEPS
Step = Literal[STEPS]   # the choices the Prefect UI offers: a features step per modality of the registry
StepsOn = Literal["process", "docker"]
PROTOCOLS = ("full", "sampled")
STEP_FLOW = "feddmmr-step"
TRAINED, RESTORED = "trained", "restored from the DVC run-cache (same inputs, not run again)"


def task_name(step: str) -> str:
    """The step's task name in the pipeline flow, and its deployment's name: train-<stage> or e.g. features-text."""
    if step in TRAIN_STEPS:
        return f"train-{step}"
    return step.replace("_", "-")


def run_step(ws: Workspace, step: str) -> bool:
    """Run the step's DVC stage in the workspace, streaming its lines to the Prefect log; for a training
    stage leave its metrics table as an artifact. False when DVC skipped it or restored it from its run-cache."""
    ran = ws.repro(step, get_run_logger().info)
    if step in TRAIN_STEPS:
        stage_artifact(ws, step, ran)
    return ran


def stage_artifact(ws: Workspace, stage: str, ran: bool) -> None:
    """A markdown table of the stage's metrics in the Prefect UI, with a link to the MLflow run."""
    m = ws.read_json(f"metrics/{stage}.json")
    rows = ["| split | protocol | HR@10 | NDCG@10 | MRR |", "|---|---|---|---|---|"]
    for split in ("val", "test"):
        for protocol in PROTOCOLS:
            if protocol in m[split]:
                r = m[split][protocol]
                rows.append(f"| {split} | {protocol} | {r['HR@10']:.4f} | {r['NDCG@10']:.4f} | {r['MRR']:.4f} |")
    link = mlflow_link(ws, stage)
    how = "trained in this run" if ran else RESTORED
    create_markdown_artifact(key=f"{stage.replace('_', '-')}-metrics", description=f"{stage} of {ws.name}",
                             markdown=f"### {stage}\n\nBest round {m['best_round']} of {m['rounds_run']} rounds run; "
                                      f"{how}. MLflow: {link}\n\n" + "\n".join(rows))


def mlflow_link(ws: Workspace, stage: str) -> str:
    """The MLflow run that wrote this stage's checkpoint (found by its hash), as a link to the MLflow UI."""
    import mlflow

    from feddmmr.io import file_sha256
    from feddmmr.tracking.store import EXPERIMENT, tracking_uri, ui_url
    try:
        client = mlflow.MlflowClient(tracking_uri(ws.path))
        exp = client.get_experiment_by_name(EXPERIMENT)
        sha = file_sha256(ws.path / "checkpoints" / stage / "model.safetensors")
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.checkpoint_sha256 = '{sha}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
    except Exception as exc:   # the metrics are the artifact; a missing link is not a failed step
        return f"(no MLflow run found: {str(exc).splitlines()[0]})"
    if not runs:
        return "(no MLflow run records this checkpoint: tracking off?)"
    run_id = runs[0].info.run_id
    return f"[run {run_id[:8]}]({ui_url(exp.experiment_id, run_id, client.tracking_uri)})"


@flow(name=STEP_FLOW, log_prints=True)
def step_flow(step: Step, workspace: str, project_dir: str = "") -> State:
    """Run one pipeline step in the workspace of a pipeline flow run (started by feddmmr-pipeline with
    steps_on=docker, one container per step).

    Args:
        step: the DVC stage to run.
        workspace: the pipeline flow run's workspace (its DVC experiment's name).
        project_dir: the project checkout holding the workspace (default: FEDDMMR_PROJECT_DIR).
    """
    ws = Workspace.attach(project_dir or os.environ.get("FEDDMMR_PROJECT_DIR", ""), workspace)
    return Completed(message=TRAINED if run_step(ws, step) else RESTORED)


def run_in_container(ws: Workspace, step: str, gpu: bool, pickup_timeout: float = 600, poll: float = 1.0) -> bool:
    """Run the step as a run of its deployment ``feddmmr-step/<step>`` and wait for it: a subflow of this flow
    run, in a container of its own. ``gpu=False`` drops the deployment's GPU request (a job variable of this
    run only). Returns whether the step ran (False: restored from the DVC run-cache)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    name = f"{STEP_FLOW}/{task_name(step)}"
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise FeddmmrError(f"no deployment {name}: deploy the step deployments of prefect.yaml "
                               f"(prefect deploy --all, see docker/README.md)") from None
        job_variables = step_job_variables(deployment.job_variables, ws.name, step, gpu)
        run = run_deployment(name, parameters={"step": step, "workspace": ws.name, "project_dir": str(ws.project)},
                             flow_run_name=f"{ws.name}-{task_name(step)}", job_variables=job_variables, timeout=0)
        get_run_logger().info("step %s: flow run %s on work pool %s%s", step, run.name, deployment.work_pool_name,
                              "" if gpu or "container_create_kwargs" not in job_variables else ", GPU request dropped")
        state = wait_for(client, run.id, pickup_timeout, poll, f"{step} ({run.name})", deployment.work_pool_name)
    if state.is_completed():
        return state.message == TRAINED
    raise failure(step, state)


def step_job_variables(deployed: dict, workspace: str, step: str, gpu: bool) -> dict:
    """This run's job variables: labels naming the run and step on the container; without ``gpu``, the
    deployment's container_create_kwargs less its device_requests."""
    job_variables = {"labels": {"io.feddmmr.experiment": workspace, "io.feddmmr.step": step}}
    kwargs = dict(deployed.get("container_create_kwargs") or {})
    if not gpu and kwargs.pop("device_requests", None) is not None:
        job_variables["container_create_kwargs"] = kwargs
    return job_variables


def failure(step: str, state: State) -> StepFailed:
    """The step flow run's failure as the StepFailed a subprocess step raises: its exit code (2 bad input,
    3 diverged: not retried) and its one line; a crashed container has no exit code (retried)."""
    message = state.message or state.name
    failed = re.search(r"StepFailed: step \S+ failed \(exit (-?\d+|None)\): (.*)", message, re.S)
    if failed:
        code = failed.group(1)
        return StepFailed(step, None if code == "None" else int(code), failed.group(2).strip())
    bad_input = re.search(r"FeddmmrError: (.*)", message, re.S)
    if bad_input:
        return StepFailed(step, 2, bad_input.group(1).strip())
    if "device driver" in message:   # Docker: no NVIDIA runtime for the GPU request; retrying cannot help
        return StepFailed(step, 2, f"{message.strip()} (no GPU runtime on the Docker host: run the pipeline with "
                                   f"gpu=false)")
    return StepFailed(step, None, f"{state.name}: {message}")


def wait_for(client, flow_run_id, pickup_timeout: float, poll: float, what: str, pool: str) -> State:
    """The flow run's final state; cancels it and fails in one line when no worker picks it up in time."""
    start = time.monotonic()
    while True:
        state = client.read_flow_run(flow_run_id).state
        if state is not None and state.is_final():
            return state
        if (state is None or state.is_scheduled()) and time.monotonic() - start > pickup_timeout:
            client.set_flow_run_state(flow_run_id, Cancelled(message="no worker picked it up"), force=True)
            raise FeddmmrError(f"step {what} waited {pickup_timeout:.0f} s for a worker of work pool {pool}: start "
                               f"one (prefect worker start --pool {pool}) or the stack (docker/README.md)")
        time.sleep(poll)
