"""MLflow tracking: one parent run per pipeline run, one child run per training stage.

The tracking store is ``MLFLOW_TRACKING_URI`` when set, else ``mlruns.db`` in the project folder (the
working directory, or the project that a ``.dvc/tmp`` copy belongs to), artifacts beside it in ``mlruns/``. A pipeline run groups the stages trained on the same prepared data at the same git
commit; ``FEDDMMR_PIPELINE_RUN`` (set by orchestrators) names it explicitly. The store is checked
before training starts, so an unreachable server fails in seconds, not after an hour of training.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

from .errors import FeddmmrError, TrackingIncomplete
from .interrupts import shielded
from .io import file_sha256, load_tensors

log = logging.getLogger("feddmmr")
EXPERIMENT = "feddmmr"


def project_root(cwd: str | Path | None = None) -> Path:
    """The project a command runs for: the working directory, or, inside a copy DVC or a flow run makes under
    ``<project>/.dvc/tmp/`` (``dvc exp run --temp``, queued experiments, flow-run workspaces), that project."""
    cwd = Path(cwd or os.getcwd()).resolve()
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 2] == (".dvc", "tmp"):
            return Path(*parts[:i])
    return cwd


def tracking_uri(cwd: str | Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI``, else ``sqlite:///<project>/mlruns.db`` of the project ``cwd`` (default: the working
    directory) belongs to: an absolute store, so runs made in a temporary copy of the project land in the project's.

    Credentials in an http(s) URI (http://user:password@host) move to MLflow's own variables
    (MLFLOW_TRACKING_USERNAME / _PASSWORD, unless set) and the URI is returned without them: MLflow prints run
    links with the URI it is given, and the password must never be printed."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root(cwd) / 'mlruns.db'}"
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme in ("http", "https") and parts.username is not None:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", urllib.parse.unquote(parts.username))
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", urllib.parse.unquote(parts.password or ""))
        uri = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return uri


def ui_url(exp_id: str, run_id: str | None = None, uri: str = "") -> str:
    """The MLflow UI's page of the experiment (or of one run) in its model-training view: MLflow 3 opens every
    experiment in its GenAI view unless the link asks (``workflowType``; the browser remembers the last choice).
    The UI's address is FEDDMMR_MLFLOW_UI, else the tracking server ``uri`` itself, else that of `mlflow ui`
    on a local store (http://127.0.0.1:5000)."""
    server = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    ui = (os.environ.get("FEDDMMR_MLFLOW_UI") or server).rstrip("/")
    page = f"experiments/{exp_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{ui}/#/{page}?workflowType=machine_learning"


def _health(uri: str, timeout: float) -> str | None:
    """None when the server at ``uri`` answers /health with 200, else what went wrong. Credentials
    (MLFLOW_TRACKING_USERNAME / _PASSWORD, see ``tracking_uri``) go as the Basic authorization MLflow sends."""
    request = urllib.request.Request(uri.rstrip("/") + "/health")
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user is not None:
        token = f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(token.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return None if resp.status == 200 else f"answered HTTP {resp.status} on /health"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"is unreachable ({getattr(exc, 'reason', exc)})"


def check_store(uri: str) -> None:
    """Fail fast, naming the URI and the fix, when the tracking store cannot be used."""
    fix = "start the server (see README: MLflow) or unset MLFLOW_TRACKING_URI to use sqlite:///mlruns.db"
    if uri.startswith(("http://", "https://")):
        problem = _health(uri, timeout=5)
        if problem:
            raise FeddmmrError(f"MLflow tracking server {uri} {problem}; {fix}")
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        parent = db.parent if str(db.parent) else Path(".")
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise FeddmmrError(f"MLflow store {uri}: folder {parent} is missing or not writable; "
                               f"create it or set MLFLOW_TRACKING_URI")
        if db.exists() and not (db.is_file() and os.access(db, os.R_OK | os.W_OK)):
            raise FeddmmrError(f"MLflow store {uri}: {db} is not a readable and writable file; fix its permissions "
                               f"or set MLFLOW_TRACKING_URI to another store")


def _short(exc: BaseException) -> str:
    """The first line of an exception, for one-line messages; a full disk anywhere in its chain is said first (SQLAlchemy
    often reports it as an 'autoflush' failure, the disk only in the cause)."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        chain.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    if any(needle in text for text in chain for needle in ("disk is full", "No space left on device")):
        return "the store's disk is full (database or disk is full)"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


@contextlib.contextmanager
def _store_lock(uri: str):
    """Serialise store initialisation: two processes creating the same sqlite store race in its migrations."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(uri[len("sqlite:///"):] + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def prefixed(metrics: dict, prefix: str = "val") -> dict[str, float]:
    """Nested evaluation metrics as flat MLflow-style names: ``{prefix}.full.NDCG@10``."""
    return {f"{prefix}.{k}": v for k, v in flatten(metrics).items()}


def metric_name(name: str) -> str:
    """MLflow metric names allow letters, digits, '_', '-', '.', ' ', '/': HR@10 -> HR_at_10."""
    return name.replace("@", "_at_")


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
            with _store_lock(self.uri), shielded():
                self._start(stage, params_flat, data_meta, output, resume_run, start_sha256)
        except FeddmmrError:
            raise
        except Exception as exc:  # any unusable store: one line before training starts
            raise FeddmmrError(f"MLflow store {self.uri} cannot be used ({_short(exc)}); fix it, point "
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
                            "when it answers again", self.uri, what, _short(exc))
                self.down = f"{what}: {_short(exc)}"
            return False

    def _answers(self) -> bool:
        return not self.uri.startswith(("http://", "https://")) or _health(self.uri, timeout=2) is None

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


def pipeline_runs(pipeline: str | None = None) -> tuple[str, Any, dict[str, Any]]:
    """(store URI, the pipeline's parent run, {stage: its run}) of pipeline run ``pipeline`` (see ``_find_pipeline``;
    default: the latest pipeline run): its stages by ``lineage``, and the popularity floor's run on the same prepared
    data when DVC restored that stage instead of running it."""
    import mlflow

    uri = tracking_uri()
    check_store(uri)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        raise FeddmmrError(f"no '{EXPERIMENT}' experiment in {uri}; train a stage first (dvc repro)")
    if pipeline is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,199}", pipeline):
        raise FeddmmrError(f"--run {pipeline!r}: a pipeline run is named by letters, digits and . _ : @ + - "
                           f"(its name in the MLflow UI, its DVC experiment, its run id or its pipeline key)")
    parent = _find_pipeline(client, exp.experiment_id, pipeline)
    if parent is None:
        raise FeddmmrError(f"no pipeline run {pipeline or ''} in {uri}; train a stage first (dvc repro), or name one "
                           f"by its run name in the MLflow UI, its DVC experiment, its run id or its pipeline key")
    runs = lineage(client, exp.experiment_id, parent.info.run_id)
    data = next((r.data.tags["prepared_sha256"] for r in runs.values() if "prepared_sha256" in r.data.tags), None)
    if "popularity" not in runs and data:   # DVC restored the floor (it depends on the data alone): no run of its own
        floor = latest_stage_run(uri, "popularity", data)
        if floor is not None:
            runs = {"popularity": floor, **runs}
    return uri, parent, runs


def _find_pipeline(client, exp_id: str, name: str | None):
    """The pipeline (parent) run a user names: its run name (as the MLflow UI shows it), DVC experiment, run id or
    pipeline key; the latest pipeline run when ``name`` is None."""
    kind = "tags.`feddmmr.kind` = 'pipeline'"
    filters = [kind] if name is None else [f"{kind} and {field} = '{name}'" for field in (
        "tags.`feddmmr.pipeline_key`", "attributes.run_name", "tags.dvc_experiment")]
    for filt in filters:
        found = client.search_runs([exp_id], filter_string=filt, order_by=["attributes.start_time DESC"], max_results=1)
        if found:
            return found[0]
    if name is not None and re.fullmatch(r"[0-9a-f]{32}", name):
        try:
            run = client.get_run(name)
        except Exception:
            return None
        return run if run.data.tags.get("feddmmr.kind") == "pipeline" else None
    return None


TRAINING_ORDER = ("pretrain_sasrec", "align_projectors", "finetune_moe")


def lineage(client, exp_id: str, parent_id: str) -> dict[str, Any]:
    """The stage runs that make one pipeline run, by lineage rather than by time: the latest run of the last
    training stage, then, one stage back at a time, the run that wrote the checkpoint it started from (tags
    ``feddmmr.start_sha256`` -> ``checkpoint_sha256``); an ad-hoc training at the same commit and data (another
    --out) is not part of it. Stages without a start (the baselines) are their latest run. In start order."""
    children = client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                  order_by=["attributes.start_time ASC"])
    latest: dict[str, Any] = {}
    wrote: dict[str, Any] = {}
    for run in children:          # later runs win
        latest[run.data.tags.get("feddmmr.stage", run.info.run_name)] = run
        if run.data.tags.get("checkpoint_sha256"):
            wrote[run.data.tags["checkpoint_sha256"]] = run
    chosen = {s: r for s, r in latest.items() if s not in TRAINING_ORDER}
    head = next((latest[s] for s in reversed(TRAINING_ORDER) if s in latest), None)
    while head is not None and head.data.tags.get("feddmmr.stage") not in chosen:
        chosen[head.data.tags.get("feddmmr.stage")] = head
        head = wrote.get(head.data.tags.get("feddmmr.start_sha256", ""))
    return dict(sorted(chosen.items(), key=lambda item: item[1].info.start_time))


def prepared_sha256(data_meta: dict) -> str:
    """The prepared data's identity: its meta.json (the sources' hashes and the prepare params)."""
    return hashlib.sha256(json.dumps(data_meta, sort_keys=True).encode()).hexdigest()


def latest_stage_run(uri: str, stage: str, prepared: str):
    """The latest FINISHED run of ``stage`` on the prepared data whose ``prepared_sha256`` is ``prepared``, or None."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    found = [] if exp is None else client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`feddmmr.stage` = '{stage}' and tags.prepared_sha256 = '{prepared}' "
                                           "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def compare(pipeline: str | None = None, protocol: str = "full") -> str:
    """Test and best-validation metrics of a pipeline run's stages, side by side, as a text table."""
    uri, parent, latest = pipeline_runs(pipeline)
    if not latest:
        raise FeddmmrError(f"pipeline run {parent.info.run_id} has no stage runs yet")
    stages = list(latest)
    rows = ["best_round"] + [f"{split}.{protocol}.{m}" for split in ("best_val", "test")
                             for m in ("HR_at_5", "HR_at_10", "HR_at_20", "NDCG_at_5", "NDCG_at_10", "NDCG_at_20", "MRR")]
    width = max(len(r) for r in rows) + 2
    lines = [f"pipeline {parent.data.tags.get('feddmmr.pipeline_key')} (run {parent.info.run_id}) in {uri}",
             "metric".ljust(width) + "".join(s.rjust(18) for s in stages)]
    for r in rows:
        vals = []
        for s in stages:
            v = latest[s].data.metrics.get(r)
            vals.append(("-" if v is None else (f"{int(v)}" if r == "best_round" else f"{v:.4f}")).rjust(18))
        lines.append(r.ljust(width) + "".join(vals))
    lines.append("status".ljust(width) + "".join(latest[s].info.status.rjust(18) for s in stages))
    return "\n".join(lines + _paired_lines(uri, latest, protocol))


def _paired_lines(uri: str, runs: dict[str, Any], protocol: str) -> list[str]:
    """Each later stage against the first, user by user on the test split (``stats.paired_test``)."""
    from .stats import paired_test

    ranks = {s: test_ranks(uri, run.info.run_id, protocol) for s, run in runs.items()}
    have = [s for s, r in ranks.items() if r is not None]
    if len(have) < 2:
        return [] if len(runs) < 2 else ["paired tests: fewer than two stage runs hold their per-user test ranks "
                                         "(re-run the stages with this version: dvc repro -f)"]
    base = have[0]
    lines = ["", f"paired tests against {base}, per user on the test split ({protocol}): mean difference "
                 "[95% paired-bootstrap interval], two-sided Wilcoxon signed-rank p"]
    for s in have[1:]:
        for metric in ("NDCG@10", "HR@10"):
            lines.append(f"  {s}: {paired_test(ranks[base], ranks[s], metric).describe()}")
    return lines


def test_ranks(uri: str, run_id: str, protocol: str):
    """A stage run's per-user test ranks under ``protocol`` [U], or None when the run has none."""
    import tempfile

    import mlflow

    from .stats import TEST_RANKS
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")   # a table, not progress bars
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=TEST_RANKS, tracking_uri=uri,
                                                       dst_path=tmp)
        except Exception:  # an older run, or one whose artifacts were not recorded
            return None
        ranks = load_tensors(path, "test ranks", "re-run the stage")
    return ranks[protocol].numpy() if protocol in ranks else None


def module_of(name: str) -> str:
    """Module of a tensor: sasrec.blocks.0.attn.qkv.weight -> sasrec.blocks.0.attn, router.mlp.0.weight -> router.mlp."""
    parts = name.split(".")[:-1] or [name]
    return ".".join(parts[:4] if parts[:2] == ["sasrec", "blocks"] else parts[:2])


def stage_diff(prev_ckpt: str | Path, ckpt: str | Path) -> dict:
    """What a stage changed relative to the previous stage's checkpoint.

    config: every flattened config key whose value differs (old -> new);
    modules: per module, L2 norm of the weight change, change relative to the old norm, changed yes/no
    (exact comparison, so a frozen module reports changed = false), plus tensors added or dropped.
    """
    from .io import load_tensors, read_json

    fix = "re-run the stage that writes it (`dvc repro`)"
    old_cfg = flatten(read_json(Path(prev_ckpt) / "config.json", "checkpoint config"))
    new_cfg = flatten(read_json(Path(ckpt) / "config.json", "checkpoint config"))
    config = {k: [old_cfg.get(k), new_cfg.get(k)] for k in sorted(set(old_cfg) | set(new_cfg))
              if old_cfg.get(k) != new_cfg.get(k)}
    old = load_tensors(Path(prev_ckpt) / "model.safetensors", "checkpoint weights", fix)
    new = load_tensors(Path(ckpt) / "model.safetensors", "checkpoint weights", fix)
    modules: dict[str, dict[str, Any]] = {}
    for name in sorted(set(old) & set(new)):
        if old[name].shape != new[name].shape:
            continue
        m = modules.setdefault(module_of(name), {"group": _group(name), "tensors": 0, "sq_delta": 0.0, "sq_old": 0.0,
                                                 "changed": False})
        d = (new[name].double() - old[name].double())
        m["tensors"] += 1
        m["sq_delta"] += float((d * d).sum())
        m["sq_old"] += float((old[name].double() ** 2).sum())
        m["changed"] |= not bool((new[name] == old[name]).all())
    for m in modules.values():
        m["l2_delta"] = m.pop("sq_delta") ** 0.5
        old_norm = m.pop("sq_old") ** 0.5
        m["relative_delta"] = m["l2_delta"] / old_norm if old_norm else None
    return {"previous": str(prev_ckpt), "current": str(ckpt), "config": config, "modules": modules,
            "added": sorted(set(new) - set(old)), "dropped": sorted(set(old) - set(new)),
            "reshaped": sorted(k for k in set(old) & set(new) if old[k].shape != new[k].shape)}


def _group(name: str) -> str:
    from .model import group_of
    try:
        return group_of(name)
    except KeyError:
        return "-"


def format_diff(diff: dict) -> str:
    lines = [f"{'module':28s} {'group':16s} {'changed':>8s} {'L2 delta':>12s} {'relative':>10s}"]
    for name, m in diff["modules"].items():
        rel = "-" if m["relative_delta"] is None else f"{m['relative_delta']:.4f}"
        lines.append(f"{name:28s} {m.get('group', '-'):16s} {('yes' if m['changed'] else 'no'):>8s} "
                     f"{m['l2_delta']:12.4f} {rel:>10s}")
    if diff.get("added"):
        lines.append(f"added (initialised in this stage): {len(diff['added'])} tensors in "
                     f"{', '.join(sorted({module_of(k) for k in diff['added']}))}")
    for key, (a, b) in diff["config"].items():
        lines.append(f"config {key}: {a!r} -> {b!r}")
    return "\n".join(lines)
