"""The run writer: one parent run per pipeline run, one child run per training stage (``StageRun``).

A pipeline run groups the stages trained on the same prepared data at the same git commit;
``FEDDMMR_PIPELINE_RUN`` (set by orchestrators) names it explicitly.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from feddmmr.errors import FeddmmrError, TrackingIncomplete
from feddmmr.interrupts import shielded
from feddmmr.io import file_sha256
from feddmmr.tracking.diff import format_diff
from feddmmr.tracking.keys import metric_name
from feddmmr.tracking.reports import prepared_sha256
from feddmmr.tracking.store import (
    EXPERIMENT,
    check_store,
    health,
    short_error,
    store_lock,
    tracking_uri,
    ui_url,
)

log = logging.getLogger("feddmmr")


CANDIDATE_ENV = "FEDDMMR_CANDIDATE"


def is_candidate(cwd: str | Path | None = None) -> bool:
    """A run that may not move the champion by itself: the command said so (``FEDDMMR_CANDIDATE=1``: parameter
    overrides or an output of its own given to ``feddmmr train``), or params.yaml differs from the commit's (a
    DVC experiment with -S, a flow run or sweep with overrides, uncommitted edits)."""
    if os.environ.get(CANDIDATE_ENV) == "1":
        return True
    cwd = cwd or os.getcwd()
    try:
        if subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=cwd, capture_output=True,
                          timeout=10).returncode:
            return False               # not a git work tree, or no commit: nothing to compare with
        r = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "params.yaml"], cwd=cwd, capture_output=True,
                           timeout=10)
    except (OSError, subprocess.SubprocessError):   # no git here: nothing to compare with
        return False
    return r.returncode == 1


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _source_tags(commit: str, stage: str) -> dict[str, str]:
    """MLflow's own source tags: the UI's "Source", "Created by" and git columns of a run. (The UI shows a source
    name from its last "/" on, so it names the stage, not the command line with its paths.)"""
    import getpass
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": f"feddmmr {stage}"}
    with contextlib.suppress(Exception):   # no user name (a container with an arbitrary uid)
        tags["mlflow.user"] = getpass.getuser()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


class StageRun:
    """The MLflow child run of one stage; a no-op when tracking is disabled.

    An unusable store fails before training, in one line. Once the run has started, a tracking fault
    never stops training: the first failed call is reported in one warning, and each later round
    re-sends every round record the store is missing (records come from the training history, so
    nothing is buffered twice). ``finish`` raises ``TrackingIncomplete``, naming what was not recorded,
    when the store is still gone at the end; the caller keeps its resume state so that re-running the
    same command records the rest without training again. A run left RUNNING by a killed process
    that wrote the same output on this host is marked KILLED when the output is next trained.
    """

    def __init__(self, stage: str, params_flat: dict[str, Any], data_meta: dict, enabled: bool = True,
                 output: str | Path | None = None, resume_run: str | None = None, tracked_round: int = -1,
                 start_sha256: str = ""):
        self.enabled, self.stage, self.run_id = enabled, stage, None
        self.tracked_round = tracked_round     # the last round whose record the store holds
        self.down: str | None = None           # what failed first while the store is not answering
        if not enabled:
            return
        self.uri = tracking_uri()
        check_store(self.uri)
        for key, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"),
                           ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")):
            os.environ.setdefault(key, value)
        # MLflow's sqlite store logs each failed write with its traceback (a full disk: one per round and retry);
        # _send reports the first failure in one warning that names the cause
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        try:
            with store_lock(self.uri), shielded():
                self._start(stage, params_flat, data_meta, output, resume_run, start_sha256)
        except FeddmmrError:
            raise
        except Exception as exc:  # any unusable store: one line before training starts
            raise FeddmmrError(f"MLflow store {self.uri} cannot be used ({short_error(exc)}); fix it, point "
                               f"MLFLOW_TRACKING_URI at a working store, or set tracking.enabled: false") from None

    # ------------------------------------------------------------------ start
    def _start(self, stage: str, params_flat: dict[str, Any], data_meta: dict, output, resume_run,
               start_sha256: str) -> None:
        import mlflow

        self.client = mlflow.MlflowClient(self.uri)
        self.exp_id = self._experiment()
        commit = git_commit()
        data_sha = hashlib.sha256(json.dumps(data_meta["source_sha256"], sort_keys=True).encode()).hexdigest()
        key = os.environ.get("FEDDMMR_PIPELINE_RUN") or hashlib.sha256(f"{commit}:{data_sha}".encode()).hexdigest()[:16]
        tags = {"feddmmr.pipeline_key": key, "git_commit": commit, "data_sha256": data_sha,
                "prepared_sha256": prepared_sha256(data_meta), "data_source": str(data_meta.get("path", "")),
                **_source_tags(commit, stage)}
        flow_run, named = os.environ.get("PREFECT__FLOW_RUN_ID"), os.environ.get("FEDDMMR_PIPELINE_RUN")
        if flow_run:
            tags["prefect_flow_run_id"] = flow_run
        if named:   # a flow run: its DVC experiment has the same name
            tags["dvc_experiment"] = named
        if start_sha256:   # the weights this stage started from: its lineage (``lineage``)
            tags["feddmmr.start_sha256"] = start_sha256
        if is_candidate():
            tags["feddmmr.candidate"] = "true"
        output = str(Path(output).resolve()) if output is not None else ""
        self._end_stale_runs(output, keep=resume_run)
        if resume_run and self._reopen(resume_run):
            return
        self.tracked_round = -1
        self.parent_id = self._parent(key, tags)
        run = self.client.create_run(self.exp_id, run_name=stage, tags={
            **tags, "mlflow.parentRunId": self.parent_id, "feddmmr.kind": "stage", "feddmmr.stage": stage,
            "dvc_stage": stage, "feddmmr.output": output, "feddmmr.host": socket.gethostname()})
        self.run_id = run.info.run_id
        from mlflow.entities import Param
        items = [Param(k, str(v)[:6000]) for k, v in params_flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        log.info("MLflow: %s run %s (parent %s) in %s: %s", stage, self.run_id, self.parent_id, self.uri,
                 ui_url(self.exp_id, self.run_id, self.uri))

    def _experiment(self) -> str:
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        if exp is not None:
            if "mlflow.experimentKind" not in exp.tags:
                self.client.set_experiment_tag(exp.experiment_id, "mlflow.experimentKind", "custom_model_development")
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):   # artifacts beside the store, wherever the run's working copy is
            location = (Path(self.uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()
        try:   # a model-training experiment (MLflow's UI opens it in that view, not the GenAI one)
            return self.client.create_experiment(EXPERIMENT, artifact_location=location,
                                                 tags={"mlflow.experimentKind": "custom_model_development"})
        except Exception:  # created meanwhile by another process
            exp = self.client.get_experiment_by_name(EXPERIMENT)
            if exp is None:
                raise
            return exp.experiment_id

    def _parent(self, key: str, tags: dict[str, str]) -> str:
        found = self.client.search_runs([self.exp_id], filter_string=f"tags.`feddmmr.pipeline_key` = '{key}'"
                                        " and tags.`feddmmr.kind` = 'pipeline'", max_results=1)
        if found:
            return found[0].info.run_id
        return self.client.create_run(self.exp_id, run_name=tags.get("dvc_experiment") or f"pipeline-{key[:8]}",
                                      tags={**tags, "feddmmr.kind": "pipeline",
                                            "mlflow.source.name": "feddmmr pipeline"}).info.run_id

    def _end_stale_runs(self, output: str, keep: str | None) -> None:
        """Runs still RUNNING for this output on this host belong to dead processes (the caller holds the
        output's lock): mark them KILLED."""
        if not output or "'" in output:
            return
        stale = self.client.search_runs([self.exp_id], filter_string=f"tags.`feddmmr.output` = '{output}' and "
                                        "attributes.status = 'RUNNING'")
        for run in stale:
            if run.info.run_id != keep and run.data.tags.get("feddmmr.host") == socket.gethostname():
                self.client.set_terminated(run.info.run_id, "KILLED")
                log.info("MLflow: run %s of a killed %s marked KILLED", run.info.run_id, self.stage)

    def _reopen(self, run_id: str) -> bool:
        """Continue the run of an interrupted attempt (resume), if the store still has it."""
        try:
            run = self.client.get_run(run_id)
        except Exception:
            return False
        if run.info.experiment_id != self.exp_id:
            return False
        self.run_id, self.parent_id = run_id, run.data.tags.get("mlflow.parentRunId", "")
        self.client.update_run(run_id, status="RUNNING")
        log.info("MLflow: continuing %s run %s from round %d", self.stage, run_id, self.tracked_round + 1)
        return True

    # ------------------------------------------------------------------ sending, fault-tolerant
    def _send(self, what: str, fn, *args) -> bool:
        try:
            with shielded():   # a signal waits for the write to end: an interrupted sqlite write locks the store
                fn(*args)
            return True
        except Exception as exc:
            if self.down is None:
                log.warning("MLflow %s did not record %s (%s); training goes on, and the missing records are sent "
                            "when it answers again", self.uri, what, short_error(exc))
                self.down = f"{what}: {short_error(exc)}"
            return False

    def _answers(self) -> bool:
        return not self.uri.startswith(("http://", "https://")) or health(self.uri, timeout=2) is None

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        ts = int(time.time() * 1000)
        batch = [Metric(metric_name(k), float(v), ts, step) for k, v in metrics.items() if v is not None]
        self.client.log_batch(self.run_id, metrics=batch)

    def sync(self, record, upto: int) -> None:
        """Send the round records ``tracked_round + 1 .. upto``; ``record(step)`` gives one round's metrics."""
        if not self.enabled or (self.down is not None and not self._answers()):
            return
        while self.tracked_round < upto:
            step = self.tracked_round + 1
            with shielded():   # a record the store holds is always counted as sent
                if not self._send(f"round {step}", self._log_metrics, record(step), step):
                    return
                self.tracked_round = step
        if self.down is not None:
            log.warning("MLflow %s answers again; the missing rounds are recorded", self.uri)
            self.down = None

    def log_dict(self, obj: dict, name: str) -> None:
        if self.enabled:
            self._send(name, self.client.log_dict, self.run_id, obj, name)

    # ------------------------------------------------------------------ end
    def finish(self, record, upto: int, final_metrics: dict[str, float], artifacts: list[Path], checkpoint: Path,
               param_diff: dict | None = None, register: Callable[[StageRun], None] | None = None) -> None:
        """Every missing round, the final metrics, artifacts, checkpoint reference, (for a later stage) the diff
        to the previous stage and (``register(run)``, e.g. ``serving.register_stage``) the registered model; then
        the run is FINISHED. Raises TrackingIncomplete naming what is missing."""
        if not self.enabled:
            return
        self.sync(record, upto)
        steps = [("final metrics", self._log_metrics, final_metrics, 0),
                 *([("parameter diff", self._log_diff, param_diff)] if param_diff is not None else []),
                 ("artifacts", self._log_artifacts, artifacts),
                 ("checkpoint reference", self._tag_checkpoint, checkpoint),
                 *([("registered model", register, self)] if register is not None else []),
                 ("FINISHED status", self._terminate, "FINISHED")]
        missing = [f"rounds {self.tracked_round + 1}-{upto}"] if self.tracked_round < upto else []
        for i, (what, fn, *args) in enumerate(steps):
            if missing or not self._send(what, fn, *args):
                missing += [w for w, *_ in steps[i:] if w not in missing]
                break
        if missing:
            raise TrackingIncomplete(
                f"{self.stage}: checkpoint and metrics are written, but MLflow {self.uri} did not record "
                f"{', '.join(missing)} ({self.down}); re-run the same command (or `dvc repro`) when the store "
                f"answers: it records them without training again")

    def _log_diff(self, param_diff: dict) -> None:
        self.client.log_dict(self.run_id, param_diff, "param_diff.json")
        self.client.log_text(self.run_id, format_diff(param_diff), "param_diff.txt")
        frozen = sorted(m for m, v in param_diff["modules"].items() if not v["changed"])
        self.client.set_tag(self.run_id, "previous_stage_checkpoint", param_diff["previous"])
        self.client.set_tag(self.run_id, "unchanged_modules", ", ".join(frozen)[:5000] or "none")

    def _log_artifacts(self, artifacts: list[Path]) -> None:
        for path in artifacts:
            self.client.log_artifact(self.run_id, str(path))

    def _tag_checkpoint(self, checkpoint: Path) -> None:
        weights = checkpoint / "model.safetensors"
        if weights.is_file():
            self.client.set_tag(self.run_id, "checkpoint", str(checkpoint.resolve()))
            self.client.set_tag(self.run_id, "checkpoint_sha256", file_sha256(weights))

    def _terminate(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)
        if self.parent_id:
            self.client.set_terminated(self.parent_id, status)

    def fail(self, status: str = "FAILED") -> None:
        """Mark the run FAILED (or KILLED) when the store answers; never raises."""
        if self.enabled and self.run_id:
            self._send(f"{status} status", self.client.set_terminated, self.run_id, status)

    @contextlib.contextmanager
    def recording(self):
        """The one epilogue of every trainer (stages, centralized, baselines) around its work: an interrupt
        (Ctrl-C, or SIGTERM turned into one) marks the run KILLED, any other failure FAILED, and the error goes on
        to the CLI, which maps it to its exit status; ``TrackingIncomplete`` (the outputs are written, the store
        missed part of the record) leaves the run as it is."""
        try:
            yield self
        except KeyboardInterrupt:
            self.fail("KILLED")
            raise
        except TrackingIncomplete:
            raise
        except BaseException:
            self.fail("FAILED")
            raise
