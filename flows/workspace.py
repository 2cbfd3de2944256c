"""A flow run's own working copy of the project, which ends as a DVC experiment.

The copy is a git clone of the deployed commit under ``<project>/.dvc/tmp/runs/<name>/`` that shares the
project's DVC cache and remotes, so that
- two flow runs never write the same files, and the user's checkout is never touched;
- a stage whose command, dependencies and parameters were run before is restored from DVC's run-cache
  instead of being trained again;
- the MLflow store resolves to the project's (``feddmmr.tracking.store.project_root``);
- the finished run is saved as the experiment ``<name>`` and pushed to the project (``dvc exp show``
  lists it there) and its outputs to the DVC remote.
A retried flow run continues in its workspace (a killed stage resumes from its last round); a finished
one removes it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import yaml

from feddmmr.config import load_params, validate
from feddmmr.errors import FeddmmrError
from feddmmr.io import atomic_path, read_json

BIN = Path(sys.executable).parent   # dvc and feddmmr of this environment


class StepFailed(Exception):
    """A pipeline step exited non-zero; ``exit_code`` is the feddmmr command's (2 bad input, 3 diverged)."""

    def __init__(self, step: str, exit_code: int | None, tail: str):
        self.step, self.exit_code = step, exit_code
        super().__init__(f"step {step} failed (exit {exit_code}): {tail}")


def run(cmd: list[str], cwd: Path, what: str) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_env())
    if r.returncode != 0:
        raise FeddmmrError(f"{what} failed in {cwd}: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return r.stdout.strip()


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1", **extra}


def check_project(project: str | Path) -> Path:
    project = Path(project).resolve()
    if not (project / "dvc.yaml").is_file() or not (project / ".git").exists():
        raise FeddmmrError(f"{project} is not a git + DVC project (dvc.yaml, .git); set project_dir or "
                           f"FEDDMMR_PROJECT_DIR to the project checkout")
    return project


def experiment_name(project: Path, wanted: str, unique: str) -> str:
    """``wanted`` (the flow run's name), or ``wanted-<unique>`` when an experiment of that name exists."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", wanted).strip("-.") or "run"
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], check_project(project),
               "listing experiments")
    taken = {ref.rsplit("/", 1)[-1] for ref in refs.splitlines()}
    return name if name not in taken else f"{name}-{unique[:8]}"


class Workspace:
    def __init__(self, project: str | Path, name: str):
        self.project = Path(project).resolve()
        self.name = name
        self.path = self.project / ".dvc" / "tmp" / "runs" / name

    @classmethod
    def open(cls, project: str | Path, name: str, rev: str = "HEAD") -> Workspace:
        """Clone ``rev`` of the project (or continue in the clone a retried run left)."""
        ws = cls(check_project(project), name)
        sha = run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], ws.project, f"resolving rev {rev!r}")
        if not (ws.path / ".git").is_dir():
            tmp = ws.path.with_name(f".{name}.partial")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            run(["git", "clone", "--quiet", "--no-checkout", str(ws.project), str(tmp)], ws.project, "git clone")
            run(["git", "checkout", "--quiet", "--detach", sha], tmp, "git checkout")
            os.replace(tmp, ws.path)
        ws._share_dvc()
        return ws

    @classmethod
    def attach(cls, project: str | Path, name: str) -> Workspace:
        """The workspace a pipeline flow run opened (a step running in its own container joins it)."""
        ws = cls(check_project(project), name)
        if not (ws.path / ".git").is_dir():
            raise FeddmmrError(f"no workspace {ws.path}: a step runs inside the workspace of a feddmmr-pipeline "
                               f"flow run, which must mount the project at the same path as its steps")
        return ws

    def _share_dvc(self) -> None:
        """The clone uses the project's DVC cache, remotes and default remote (from any of its config files)."""
        cache = run(["dvc", "cache", "dir"], self.project, "dvc cache dir")
        run(["dvc", "cache", "dir", "--local", cache], self.path, "dvc cache dir --local")
        listing = run(["dvc", "config", "--list", "--show-origin"], self.project, "dvc config --list")
        for origin, _, setting in (line.partition("\t") for line in listing.splitlines()):
            key, _, url = setting.partition("=")
            if not re.fullmatch(r"remote\.[^.]+\.url", key):
                continue
            if "://" not in url and not os.path.isabs(url):   # relative to the config file that names it
                url = str((self.project / Path(origin).parent / url).resolve())
            run(["dvc", "remote", "add", "--local", "--force", key.split(".")[1], url], self.path, "dvc remote add")
        default = run(["dvc", "remote", "default"], self.project, "dvc remote default")
        if default:   # the project's default remote, wherever it is set (the stack sets it in its local config)
            run(["dvc", "remote", "default", "--local", default], self.path, "dvc remote default")
        if subprocess.run(["git", "config", "user.email"], cwd=self.path, capture_output=True).returncode:
            run(["git", "config", "user.email", "feddmmr@localhost"], self.path, "git config")
            run(["git", "config", "user.name", "feddmmr flow"], self.path, "git config")

    def set_params(self, overrides: list[str]) -> None:
        """Apply ``section.key=value`` overrides to the workspace's params.yaml, as `dvc exp run -S` does."""
        validate(load_params(self.path / "params.yaml", list(overrides)))   # one-line errors naming the key
        if overrides:
            from dvc.utils.hydra import apply_overrides
            try:
                apply_overrides(self.path / "params.yaml", list(overrides))
            except Exception as exc:   # hydra's grammar or an unknown key
                raise FeddmmrError(f"override {overrides}: {str(exc).splitlines()[0]}; use section.key=value with "
                                   f"keys of params.yaml") from None
        validate(load_params(self.path / "params.yaml", []))

    def params(self):
        return load_params(self.path / "params.yaml", [])

    def repro(self, stage: str, on_line: Callable[[str], None]) -> bool:
        """`dvc repro --single-item <stage>`, streaming its output; False when DVC skipped or restored it.
        The stage runs the workspace's own library (the commit's code, which dvc.lock hashes), not the one
        installed beside this interpreter."""
        self.forget_outputs_not_in_cache(stage)
        code = os.pathsep.join([str(self.path), *filter(None, [os.environ.get("PYTHONPATH")])])
        proc = subprocess.Popen([str(BIN / "dvc"), "repro", "--single-item", stage], cwd=self.path,
                                env=_env(FEDDMMR_PIPELINE_RUN=self.name, PYTHONPATH=code), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip())
            on_line(line.rstrip())
        proc.wait()
        if proc.returncode:
            code = next((int(m.group(1)) for m in map(re.compile(r"exited with (-?\d+)").search, reversed(lines)) if m),
                        None)
            errors = [ln for ln in lines if ln.startswith(("feddmmr: error:", "ERROR:"))]
            raise StepFailed(stage, code, (errors or lines or ["no output"])[0])
        return not any(re.search(r"didn't change, skipping|restored from run-cache|is cached", ln) for ln in lines)

    def forget_outputs_not_in_cache(self, stage: str) -> list[str]:
        """Drop from the workspace's dvc.lock the output hashes of ``stage`` that the DVC cache does not hold; the
        outputs dropped.

        A lock committed on another CPU type lists other hashes for every float output (sums differ between CPU
        types), while this machine may have run the stage on the same inputs. DVC restores a stage from its
        run-cache only when the lock's dependencies changed or it lists no output hash: with the committed
        dependencies unchanged and outputs it cannot check out, it would train again. Without those hashes it
        looks up the run-cache and restores this machine's outputs, or runs the stage when it never ran here.
        """
        path = self.path / "dvc.lock"
        lock = (yaml.safe_load(path.read_text()) if path.is_file() else None) or {}
        entry = lock.get("stages", {}).get(stage) or {}
        cache = Path(run(["dvc", "cache", "dir"], self.path, "dvc cache dir").strip()) / "files" / "md5"
        missing = [out for out in entry.get("outs", []) if out.get("md5") and not
                   (cache / out["md5"][:2] / out["md5"][2:]).is_file()]
        for out in missing:
            for key in ("hash", "md5", "size", "nfiles"):
                out.pop(key, None)
        if missing:
            with atomic_path(path) as tmp:
                tmp.write_text(yaml.safe_dump(lock, sort_keys=False))
        return [out["path"] for out in missing]

    def read_json(self, relative: str) -> dict:
        return read_json(self.path / relative, relative)

    def save(self) -> str:
        """Save the workspace as experiment ``name`` and push it: the git ref to the project, the outputs to
        the default DVC remote. Returns what was pushed."""
        run(["dvc", "exp", "save", "--name", self.name], self.path, "dvc exp save")
        has_remote = bool(run(["dvc", "remote", "default"], self.path, "dvc remote default").strip())
        run(["dvc", "exp", "push", *([] if has_remote else ["--no-cache"]), "origin", self.name], self.path,
            "dvc exp push")
        return "experiment and outputs" if has_remote else "experiment (no DVC remote: outputs stay in the cache)"

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
