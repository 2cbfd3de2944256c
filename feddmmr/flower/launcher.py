"""``feddmmr train --engine flower``: write the Flower app, start a SuperLink and SuperNodes on 127.0.0.1 (or use
``federation.superlink``), submit the run with ``flwr run`` and report the stage's metrics or its error."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from feddmmr.config import Params
from feddmmr.errors import FeddmmrError
from feddmmr.io import read_json

log = logging.getLogger("feddmmr")


APP_TOML = """\
[build-system]
requires = ["setuptools>=65"]
build-backend = "setuptools.build_meta"

[project]
name = "feddmmr-flower"
version = "0.1.0"
description = "FedDMMR stages on a Flower federation (the apps live in the installed feddmmr package)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "feddmmr"

[tool.flwr.app.components]
serverapp = "feddmmr.flower.server_app:server_app"
clientapp = "feddmmr.flower.client_app:client_app"

[tool.flwr.app.config]
project = ""
job = ""
status = ""
"""
NODES_DIR = ".flower-nodes"    # beside the stage's output: the local SuperNodes' memories, which later stages continue
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def flower_env(**extra: str) -> dict[str, str]:
    """The environment of the Flower processes: telemetry off, and this interpreter's bin folder first on
    PATH, since the SuperLink and SuperNodes start flower-superexec, flwr-serverapp and flwr-clientapp by
    name (a virtual environment that was not activated still works)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, **FLOWER_ENV, "PATH": path, **extra}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_port(port: int, proc: subprocess.Popen, log_file: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FeddmmrError(f"the local SuperLink exited ({proc.returncode}): {_tail(log_file)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise FeddmmrError(f"the local SuperLink did not open 127.0.0.1:{port} within {timeout:g}s: {_tail(log_file)}")


def _tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return " | ".join(text[-lines:]) or "no output"


def _bin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if not found:
        raise FeddmmrError(f"{name} not found: install the Flower extra (pip install -e '.[flower]')")
    return found


@contextlib.contextmanager
def local_federation(nodes: int, data_dir: Path, work: Path, project: Path, features_dir: Path,
                     state_dir: Path) -> Iterator[str]:
    """A SuperLink and ``nodes`` SuperNodes on 127.0.0.1 (SuperNode p holds partition p of ``data_dir``, and
    its users' memories in ``state_dir``/node-p), stopped on exit; yields the SuperLink's control API address."""
    serverappio, fleet, control, *appio = _free_ports(3 + nodes)
    procs = []
    try:
        link_log = work / "superlink.log"
        procs.append(subprocess.Popen(
            [_bin("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
             "--serverappio-api-address", f"127.0.0.1:{serverappio}", "--fleet-api-address", f"127.0.0.1:{fleet}",
             "--control-api-address", f"127.0.0.1:{control}"],   # state in memory
            cwd=project, env=flower_env(FLWR_HOME=str(work / "superlink")), stdout=link_log.open("w"),
            stderr=subprocess.STDOUT, start_new_session=True))
        _wait_port(control, procs[0], link_log)
        _wait_port(fleet, procs[0], link_log)
        for p in range(nodes):
            node_config = (f"data-dir='{data_dir}' partition-id={p} num-partitions={nodes} "
                           f"features-dir='{features_dir}' state-dir='{state_dir / f'node-{p}'}'")
            procs.append(subprocess.Popen(
                [_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{fleet}",
                 "--clientappio-api-address", f"127.0.0.1:{appio[p]}", "--node-config", node_config],
                cwd=project, env=flower_env(FLWR_HOME=str(work / f"supernode-{p}")),
                stdout=(work / f"supernode-{p}.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True))
        yield f"127.0.0.1:{control}"
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            with contextlib.suppress(ProcessLookupError):   # whatever of its group is left (a ServerApp, a ClientApp)
                os.killpg(proc.pid, signal.SIGKILL)


def write_app(folder: Path, address: str) -> tuple[Path, Path]:
    """The Flower app (its pyproject.toml) and a Flower config naming the SuperLink ``address``; (app, home)."""
    app, home = folder / "app", folder / "flwr-home"
    app.mkdir(parents=True)
    home.mkdir(parents=True)
    (app / "pyproject.toml").write_text(APP_TOML)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "feddmmr"\n\n[superlink.feddmmr]\n'
                                      f'address = "{address}"\ninsecure = true\n')
    return app, home


def train_on_flower(stage: str, params: Params, params_path: str | None, overrides: list[str], data_dir: str,
                    out_dir: str, metrics_path: str, features_dir: str = "features", init_dir: str | None = None,
                    restart: bool = False) -> dict:
    """Train ``stage`` on a Flower federation (``params.federation``); returns its metrics as ``train_stage`` does."""
    if importlib.util.find_spec("flwr") is None:   # the apps it starts import Flower: say so before starting them
        raise FeddmmrError("--engine flower needs Flower (flwr is not installed): pip install -e '.[flower]'")
    fed, project = params.federation, Path.cwd()
    job = {"stage": stage, "params": str(Path(params_path).resolve()) if params_path else None,
           "overrides": list(overrides) + ["federation.engine=flower"], "data": str(Path(data_dir).resolve()),
           "out": str(Path(out_dir).resolve()), "metrics": str(Path(metrics_path).resolve()),
           "features": str(Path(features_dir).resolve()), "init": init_dir and str(Path(init_dir).resolve()),
           "restart": restart}
    with tempfile.TemporaryDirectory(prefix="feddmmr-flower-") as tmp:
        work = Path(tmp)
        status = work / "status.json"
        run_config = work / "run-config.toml"
        run_config.write_text(f"project = {json.dumps(str(project))}\njob = {json.dumps(json.dumps(job))}\n"
                              f"status = {json.dumps(str(status))}\n")
        nodes_dir = Path(out_dir).resolve().parent / NODES_DIR      # outlives the command: later stages continue it
        with (local_federation(fed.nodes, Path(data_dir).resolve(), work, project, Path(features_dir).resolve(),
                               nodes_dir) if not fed.superlink
              else contextlib.nullcontext(fed.superlink)) as address:
            app, home = write_app(work, address)
            proc = subprocess.run([_bin("flwr"), "run", str(app), "feddmmr", "--stream", "--run-config", str(run_config)],
                                  env=flower_env(FLWR_HOME=str(home)))
        if not status.is_file():
            link = f"; the local SuperLink's log ends: {_tail(work / 'superlink.log')}" if not fed.superlink else ""
            raise FeddmmrError(f"the Flower run of {stage} ended (flwr run exited {proc.returncode}) without a result; "
                               f"see its output above{link}")
        outcome = read_json(status, "Flower run status")
    if not outcome["ok"]:
        raise FeddmmrError(f"{stage} on Flower: {outcome['error']}")
    return outcome["metrics"]
