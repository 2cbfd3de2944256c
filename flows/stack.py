"""Set up the docker stack (the `setup` service of docker/compose.yaml), idempotently:

1. the project in the workspace volume: a git + DVC repository whose HEAD is the task image's source
   (a new commit when the image changed), with the stack's DVC cache and remote as its local config;
   flow runs clone it and push their experiments back to it;
2. the work pools feddmmr-docker and feddmmr-process;
3. the deployments of prefect.yaml, with the stack's FEDDMMR_* variables (images, volumes, network).

    python -m flows.stack [--source /opt/feddmmr] [--project /workspace/project] [--no-deploy]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from feddmmr.errors import FeddmmrError
from flows.workspace import BIN, run

POOLS = {"feddmmr-docker": "docker", "feddmmr-process": "process"}
DEPLOY_ENV = ("FEDDMMR_IMAGE", "FEDDMMR_STACK", "FEDDMMR_DATA", "FEDDMMR_MLFLOW_UI", "FEDDMMR_PROJECT_DIR")
GIT_ID = ["-c", "user.name=feddmmr stack", "-c", "user.email=feddmmr@localhost"]


def sync_project(source: Path, project: Path, cache: Path, remote: Path, revision: str) -> str:
    """Make ``project``'s HEAD the content of ``source`` (committing only when it differs) and point its
    DVC cache and default remote at the stack's volumes. Returns the HEAD commit."""
    if not (source / "dvc.yaml").is_file():
        raise FeddmmrError(f"{source} holds no dvc.yaml: pass --source, the folder the task image installs the "
                           f"project in (/opt/feddmmr)")
    if not (project / ".git").is_dir():
        project.mkdir(parents=True, exist_ok=True)
        run(["git", "init", "-q", "-b", "main"], project, "git init")
    elif run(["git", "status", "--porcelain", "--untracked-files=no"], project, "git status"):
        raise FeddmmrError(f"{project} has uncommitted changes to tracked files; commit or discard them (git -C "
                           f"{project} status) before the stack updates it")
    commit = image_commit(source, project, revision)
    if commit:   # fast-forward: the working tree follows, files the image no longer has are removed
        run(["git", "merge", "--ff-only", "-q", commit] if head(project) else ["git", "reset", "-q", "--hard", commit],
            project, "git merge")
    run(["dvc", "cache", "dir", "--local", str(cache)], project, "dvc cache dir")
    run(["dvc", "remote", "add", "--local", "--force", "--default", "stack", str(remote)], project, "dvc remote add")
    return run(["git", "rev-parse", "HEAD"], project, "git rev-parse")


def head(project: Path) -> str | None:
    r = subprocess.run(["git", "rev-parse", "-q", "--verify", "HEAD"], cwd=project, capture_output=True, text=True)
    return r.stdout.strip() or None


def image_commit(source: Path, project: Path, revision: str) -> str | None:
    """A commit of ``source``'s files (its .gitignore applies) on top of HEAD, or None when HEAD holds them."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index")}   # the project's own index stays as it is

        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=project, env=env, check=True, capture_output=True,
                                  text=True).stdout.strip()
        git(f"--work-tree={source}", "add", "-A")
        tree, parent = git("write-tree"), head(project)
        if parent and git("rev-parse", f"{parent}^{{tree}}") == tree:
            return None
        return git(*GIT_ID, "commit-tree", tree, *(["-p", parent] if parent else []), "-m",
                   f"feddmmr task image, source {revision}")


def prefect(*args: str, cwd: Path) -> str:
    return run([str(BIN / "prefect"), "--no-prompt", *args], cwd, f"prefect {' '.join(args[:2])}")


def deploy(source: Path) -> list[str]:
    """Create (or reset) the work pools and deploy every deployment of ``source``/prefect.yaml."""
    if not os.environ.get("FEDDMMR_DATA") and os.environ.get("FEDDMMR_STACK"):
        os.environ["FEDDMMR_DATA"] = f"{os.environ['FEDDMMR_STACK']}-data"   # the stack's own data volume
    missing = [k for k in DEPLOY_ENV if not os.environ.get(k)]
    if missing:
        raise FeddmmrError(f"set {', '.join(missing)}: prefect.yaml's docker deployments are templated with them "
                           f"(docker/compose.yaml's setup service sets them all)")
    for pool, kind in POOLS.items():
        prefect("work-pool", "create", pool, "--type", kind, "--overwrite", cwd=source)
    prefect("deploy", "--all", cwd=source)
    listing = json.loads(prefect("deployment", "ls", "--output", "json", cwd=source))
    return sorted(d["name"] for d in listing)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="/opt/feddmmr", help="the project as installed in the task image")
    ap.add_argument("--project", default=os.environ.get("FEDDMMR_PROJECT_DIR", "/workspace/project"),
                    help="the stack's project, in the workspace volume (default: FEDDMMR_PROJECT_DIR)")
    ap.add_argument("--dvc-cache", default="/dvc/cache", help="DVC cache volume (default: /dvc/cache)")
    ap.add_argument("--dvc-remote", default="/dvc/remote", help="DVC remote volume (default: /dvc/remote)")
    ap.add_argument("--no-deploy", dest="deploy", action="store_false", help="only set up the project")
    args = ap.parse_args()
    try:
        source = Path(args.source)
        head = sync_project(source, Path(args.project), Path(args.dvc_cache), Path(args.dvc_remote),
                            os.environ.get("FEDDMMR_SOURCE", "unknown"))
        print(f"project {args.project} at {head[:12]} (DVC cache {args.dvc_cache}, remote {args.dvc_remote})")
        if args.deploy:
            print("deployed: " + ", ".join(deploy(source)))
    except FeddmmrError as exc:
        sys.exit(f"flows.stack: error: {exc}")


if __name__ == "__main__":
    main()
