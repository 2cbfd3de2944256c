"""Prefect flow of the FedDMMR pipeline: every flow run is a DVC experiment.

A flow run clones the deployed commit into its own workspace (``flows.workspace``), applies its
parameters (``section.key=value`` overrides and a dataset choice) to that copy's params.yaml, runs the
DVC stages one Prefect task each (`dvc repro --single-item <stage>`: a stage whose inputs did not
change is restored from DVC's run-cache, not retrained), then saves the result as the DVC experiment
named after the flow run and pushes it to the project and its outputs to the DVC remote. MLflow runs
are grouped under one parent run of the same name. The Prefect UI shows one task per step, a metrics
table per stage linking to its MLflow run, and a final comparison of the stages.

Steps run as subprocesses of the flow run (``steps_on=process``, the default) or each in its own
container through the step deployments of the docker work pool (``steps_on=docker``, ``flows.steps``).

    python -m flows.pipeline --help
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from feddmmr.config import load_params
from feddmmr.errors import FeddmmrError
from flows.steps import (
    BASELINE_STEPS,
    PROTOCOLS,
    STEPS,
    TRAIN_STEPS,
    StepsOn,
    run_in_container,
    run_step,
    task_name,
)
from flows.workspace import StepFailed, Workspace, experiment_name

Dataset = Literal["params", "demo", "ml-1m-top1000", "ml-100k"]


def dataset_overrides(dataset: str, data_root: str) -> list[str]:
    """The prepare overrides of a dataset choice; "params" keeps the committed params.yaml."""
    if dataset == "params":
        return []
    if dataset == "demo":
        return ["prepare.source=csv", "prepare.path=data/demo/interactions.csv", "prepare.top_k_users=0",
                "features_text.movies=''"]
    root = data_root or os.environ.get("FEDDMMR_DATA_ROOT", "")
    if not root:
        raise FeddmmrError(f"dataset {dataset} needs data_root (or FEDDMMR_DATA_ROOT): the folder holding ml-1m/ "
                           f"or ml-100k/")
    if dataset == "ml-1m-top1000":
        return ["prepare.source=ml-1m", f"prepare.path={Path(root) / 'ml-1m'}", "prepare.top_k_users=1000"]
    return ["prepare.source=ml-100k", f"prepare.path={Path(root) / 'ml-100k'}", "prepare.top_k_users=0"]


def transient(task_, task_run, state) -> bool:
    """Retry what may pass (I/O, a killed process, exit 5: the stage resumes); never a bad input (2) or divergence (3)."""
    exc = state.result(raise_on_failure=False)
    return not (isinstance(exc, FeddmmrError) and not exc.retryable
                or isinstance(exc, StepFailed) and exc.exit_code in (2, 3))


@task(name="workspace", task_run_name="workspace", cache_policy=NO_CACHE)
def open_workspace(project: str, name: str, rev: str, overrides: list[str]) -> Workspace:
    ws = Workspace.open(project, name, rev)
    try:
        ws.set_params(overrides)
    except FeddmmrError:   # nothing to resume: no workspace left behind
        ws.remove()
        raise
    get_run_logger().info("workspace %s: %s at %s, overrides %s", ws.path, ws.project, rev, overrides or "none")
    return ws


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=transient, cache_policy=NO_CACHE)
def step_task(ws: Workspace, step: str, steps_on: StepsOn, gpu: bool) -> bool:
    if steps_on == "docker":
        return run_in_container(ws, step, gpu)
    return run_step(ws, step)


@task(name="save-experiment", task_run_name="save-experiment", cache_policy=NO_CACHE)
def save_task(ws: Workspace, metrics: dict[str, dict]) -> str:
    """Save and push the experiment; the stages' metrics (``metrics/<stage>.json``) side by side in the UI."""
    pushed = ws.save()
    stages = list(metrics)
    rows = ["| metric | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]
    for split in ("val", "test"):
        for protocol in PROTOCOLS:
            for name in ("HR@10", "NDCG@10"):
                vals = [metrics[s][split].get(protocol, {}).get(name) for s in stages]
                rows.append(f"| {split} {protocol} {name} | " + " | ".join("-" if v is None else f"{v:.4f}"
                                                                           for v in vals) + " |")
    create_markdown_artifact(key="stage-comparison", description=f"stages of {ws.name}",
                             markdown=f"### DVC experiment `{ws.name}`\n\n`dvc exp show` lists it; `dvc exp apply "
                                      f"{ws.name} && dvc repro` reproduces it. Pushed: {pushed}.\n\n" + "\n".join(rows))
    ws.remove()
    return ws.name


@flow(name="feddmmr-pipeline", log_prints=True)
def pipeline(overrides: list[str] | None = None, dataset: Dataset = "params", data_root: str = "",
             project_dir: str = "", rev: str = "HEAD", steps_on: StepsOn = "process", gpu: bool = True) -> dict:
    """Run the pipeline as a DVC experiment named after this flow run.

    Args:
        overrides: `section.key=value` parameter overrides, as `dvc exp run -S`, e.g. ["pretrain_sasrec.rounds=20"].
        dataset: params (the committed params.yaml) | demo | ml-1m-top1000 | ml-100k.
        data_root: folder with ml-1m/ and ml-100k/ (default: FEDDMMR_DATA_ROOT).
        project_dir: the project's git + DVC checkout (default: FEDDMMR_PROJECT_DIR, else the working directory).
        rev: the commit to run (default: the project's HEAD).
        steps_on: process (subprocesses of this flow run) | docker (each step a run of its feddmmr-step
            deployment, in its own container, which must see the project at the same path as this flow run).
        gpu: with steps_on=docker, false drops the GPU request of the GPU steps (for hosts without a GPU).
    """
    project = Path(project_dir or os.environ.get("FEDDMMR_PROJECT_DIR") or ".").resolve()
    all_overrides = dataset_overrides(dataset, data_root) + list(overrides or [])
    name = experiment_name(project, flow_run.name or "run", str(flow_run.id or "local"))
    ws = open_workspace(project, name, rev, all_overrides)
    ran, previous = {}, []
    for step in STEPS:   # in DVC's order, one after the other; wait_for draws the chain in the UI's graph
        future = step_task.with_options(name=task_name(step), task_run_name=task_name(step)).submit(
            ws, step, steps_on, gpu, wait_for=previous)
        ran[step], previous = future.result(), [future]
    metrics = {s: ws.read_json(f"metrics/{s}.json") for s in TRAIN_STEPS + BASELINE_STEPS}
    save_task.submit(ws, metrics, wait_for=previous).result()
    print(f"DVC experiment {name}: " + ", ".join(f"{s} {'ran' if ran[s] else 'restored'}" for s in STEPS))
    return {"experiment": name, "ran": [s for s in STEPS if ran[s]], "metrics": metrics}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one parameter, as `dvc exp run -S` (repeatable)")
    ap.add_argument("--dataset", default="params", choices=["params", "demo", "ml-1m-top1000", "ml-100k"],
                    help="params: the committed params.yaml (default); the others set the prepare section")
    ap.add_argument("--data-root", default="", help="folder with ml-1m/ and ml-100k/ (default: FEDDMMR_DATA_ROOT)")
    ap.add_argument("--project-dir", default="",
                    help="the project's git + DVC checkout (default: FEDDMMR_PROJECT_DIR, else the working directory)")
    ap.add_argument("--rev", default="HEAD", help="commit to run (default: HEAD); uncommitted edits are not part of a run")
    ap.add_argument("--steps-on", default="process", choices=["process", "docker"],
                    help="process: steps as subprocesses (default); docker: each step in its own container through "
                         "the feddmmr-step deployments (needs PREFECT_API_URL and a docker worker, docker/README.md)")
    ap.add_argument("--no-gpu", dest="gpu", action="store_false",
                    help="with --steps-on docker: drop the GPU request of the GPU steps")
    args = ap.parse_args()
    try:   # bad parameters: one line at once, before Prefect starts a flow run (tens of seconds)
        project = Path(args.project_dir or os.environ.get("FEDDMMR_PROJECT_DIR") or ".").resolve()
        load_params(project / "params.yaml", dataset_overrides(args.dataset, args.data_root) + args.overrides)
        pipeline(args.overrides, args.dataset, args.data_root, args.project_dir, args.rev, args.steps_on, args.gpu)
    except (FeddmmrError, StepFailed) as exc:
        raise SystemExit(f"flows.pipeline: error: {exc}") from None


if __name__ == "__main__":
    main()
