"""Where the records live: the MLflow tracking store (``MLFLOW_TRACKING_URI`` when set, else ``mlruns.db`` in the
project folder: the working directory, or the project that a ``.dvc/tmp`` copy belongs to; artifacts beside it in
``mlruns/``), its health check (an unreachable server fails in seconds, not after an hour of training), the UI's
links and the lock that serialises writers of one SQLite store.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from feddmmr.errors import FeddmmrError

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


def health(uri: str, timeout: float) -> str | None:
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
        problem = health(uri, timeout=5)
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


def short_error(exc: BaseException) -> str:
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
def store_lock(uri: str):
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
