"""Prefect flow of the FedDMMR pipeline: prepare -> features (text, visual) -> training stages.

Each task calls the same ``feddmmr`` library function as the matching DVC stage, with the same
``params.yaml`` (plus optional ``section.key=value`` overrides), and writes the same artefacts, so a
run from the Prefect UI and ``dvc repro`` agree. The flow run id tags the MLflow runs.

    python -m flows.pipeline --help
"""
from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from prefect import flow, task
from prefect.runtime import flow_run

from feddmmr.config import load_params
from feddmmr.errors import FeddmmrError
from feddmmr.modalities import NAMES

TRAIN_STEPS = ("pretrain_sasrec", "align_projectors", "finetune_moe")
STEPS = ("prepare", *(f"features_{m}" for m in NAMES)) + TRAIN_STEPS
DATA = "data/prepared"


def transient(task_, task_run, state) -> bool:
    """Retry only failures that may pass (I/O, resources); a bad input or parameter fails at once."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, (FeddmmrError, ValueError, KeyError))


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=transient)
def prepare_task(params_file: str, overrides: list[str]) -> dict:
    from feddmmr.data import prepare
    return prepare(load_params(params_file, overrides).prepare, DATA)


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=transient)
def features_task(modality: str, params_file: str, overrides: list[str]) -> dict:
    from feddmmr.features import extract
    return extract(modality, load_params(params_file, overrides), DATA, f"features/{modality}", progress=False)


@task(retries=1, retry_delay_seconds=30, retry_condition_fn=transient)
def train_task(stage: str, params_file: str, overrides: list[str]) -> dict:
    from feddmmr.stages import train_stage
    params = load_params(params_file, overrides)
    init_from = getattr(getattr(params, stage), "init_from", "")
    return train_stage(stage, params, DATA, f"checkpoints/{stage}", f"metrics/{stage}.json", progress=False,
                       features_dir="features", init_dir=f"checkpoints/{init_from}" if init_from else None)


@contextlib.contextmanager
def _run_env(flow_run_id: str | None):
    """Name the MLflow pipeline run after the flow run for the duration of the flow."""
    keys = ("FEDDMMR_PIPELINE_RUN", "PREFECT__FLOW_RUN_ID")
    saved = {k: os.environ.get(k) for k in keys}
    if flow_run_id:
        os.environ.update({k: flow_run_id for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@flow(name="feddmmr-pipeline", log_prints=True)
def pipeline(project_dir: str = ".", params_file: str = "params.yaml", overrides: list[str] | None = None,
             steps: list[str] | None = None) -> dict:
    """Run the pipeline steps in order.

    Args:
        project_dir: the project checkout (holds params.yaml, data/, checkpoints/).
        params_file: parameters file, relative to project_dir.
        overrides: `section.key=value` overrides, e.g. ["pretrain_sasrec.rounds=20"].
        steps: subset of prepare, features_text, features_visual, pretrain_sasrec, align_projectors,
            finetune_moe (default: all; with finetune_moe.init_from=pretrain_sasrec, align_projectors
            is skipped unless named).
    """
    overrides = list(overrides or [])
    unknown = [s for s in steps or [] if s not in STEPS]
    if unknown:
        raise FeddmmrError(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")
    params = load_params(Path(project_dir) / params_file, overrides)  # validate before any work
    if steps is None:  # the 2-stage path (finetune_moe from pretrain_sasrec) needs no align_projectors
        steps = [s for s in STEPS if not (s == "align_projectors" and params.finetune_moe.init_from == "pretrain_sasrec")]
    results: dict = {}
    with contextlib.chdir(project_dir), _run_env(str(flow_run.id) if flow_run.id else None):
        if "prepare" in steps:
            results["prepare"] = prepare_task(params_file, overrides)
            print(f"prepared: {results['prepare']['num_users']} users, {results['prepare']['num_items']} items")
        for modality in NAMES:
            if f"features_{modality}" in steps:
                results[f"features_{modality}"] = report = features_task(modality, params_file, overrides)
                print(f"{modality} features: {report['covered']}/{report['items']} items")
        for stage in TRAIN_STEPS:
            if stage in steps:
                results[stage] = m = train_task(stage, params_file, overrides)
                print(f"{stage}: best round {m['best_round']}, test full NDCG@10 {m['test']['full']['NDCG@10']:.4f}")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project-dir", default=".")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--steps", nargs="+", choices=STEPS, help="steps to run (default: all)")
    args = ap.parse_args()
    pipeline(args.project_dir, args.params, args.overrides, args.steps)


if __name__ == "__main__":
    main()
