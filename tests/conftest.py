import os
from pathlib import Path

import pytest

# No hub look-ups, no telemetry: tests never touch the network. The MLflow servers tests start skip MLflow's GenAI
# job runner, as the compose stack's does (eight processes of about 30 CPU-seconds at start).
for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "true",
                   "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "DVC_NO_ANALYTICS": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}.items():
    os.environ.setdefault(key, value)

from feddmmr.config import Params, PrepareParams
from feddmmr.data.prepare import prepare  # noqa: E402
from feddmmr.data.demo import write_demo  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEDDMMR_SHARED_DATA", REPO.parent / "shared" / "data"))


# The longest files first: `make test` hands whole files to its workers in this order (pytest-xdist --dist loadfile
# --no-loadscope-reorder), so that no long file is left to run alone at the end while the other workers idle.
LONGEST_FIRST = ("test_sweeps.py", "test_prefect_e2e.py", "test_docker.py", "test_flower.py", "test_flows.py",
                 "test_faults.py", "test_pipeline.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def shared(path: str) -> Path:
    """A file under ../shared/data, or skip the test saying what is missing."""
    p = SHARED_DATA / path
    if not p.exists():
        pytest.skip(f"real data not available: {p} is absent (set FEDDMMR_SHARED_DATA to the shared data folder)")
    return p


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "interactions.csv"
    write_demo(path, num_users=40, num_items=80, genres=4, seed=3)
    return path


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory, tiny_csv) -> Path:
    out = tmp_path_factory.mktemp("prep") / "prepared"
    prepare(PrepareParams(source="csv", path=str(tiny_csv), max_seq_len=10, eval_negatives=20), out)
    return out


def tiny_params(**train) -> Params:
    p = Params()
    p.model.hidden, p.model.heads, p.model.ffn_hidden, p.model.blocks = 16, 2, 16, 1
    p.evaluation.batch_size = 16
    t = p.pretrain_sasrec
    t.rounds, t.client_fraction, t.batch_size, t.num_negatives, t.patience = 2, 0.5, 2, 4, 5
    for k, v in train.items():
        setattr(t, k, v)
    return p


def write_tiny_project(root: Path, top_k_users: int = 40, eval_negatives: int = 30) -> Path:
    """A scratch project: the demo data and the project's params.yaml with a tiny model and 2 rounds."""
    import shutil

    import yaml
    shutil.copytree(REPO / "data" / "demo", root / "data" / "demo")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"].update(top_k_users=top_k_users, eval_negatives=eval_negatives)
    params["model"].update(hidden=16, heads=2, ffn_hidden=16, blocks=1)
    for stage in ("pretrain_sasrec", "align_projectors", "finetune_moe"):
        params[stage].update(rounds=2, client_fraction=0.5, num_negatives=4)
    params["centralized"].update(epochs=2, num_negatives=4)
    params["memory"].update(st_capacity=3, lt_capacity=8, retrieve_lt=4)
    # MLflow's model logging checks every installed package against the model's requirements (about 4 s a stage);
    # test_recommend and test_tracking cover it
    params["tracking"]["log_models"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def add_dvc_pipeline(root: Path) -> Path:
    """Copy the library and dvc.yaml into a scratch project so `dvc repro` runs the project's own stages."""
    import shutil
    shutil.copytree(REPO / "feddmmr", root / "feddmmr", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root)
    shutil.copy(REPO / ".dvcignore", root)
    return root


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc, what: str, timeout: float = 300) -> None:
    """Poll ``url`` until it answers; fail the test if ``proc`` exits or ``timeout`` passes."""
    import time
    import urllib.request
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                pytest.fail(f"{what} did not start within {timeout:.0f} s")
            time.sleep(1)


def write_tiny_features(root: Path, data, text_dim: int = 24, visual_dim: int = 16, seed: int = 0,
                        visual: bool = True) -> Path:
    """Random unit-norm feature files in the layout `feddmmr features` writes (root/<modality> for every modality
    of the registry), built for the prepared data ``data`` (a Prepared).

    Every fifth item has no text and every third no poster (every fourth lacks any other modality), so the masked
    paths are exercised.
    """
    import torch

    from feddmmr.io import save_tensors
    from feddmmr.modalities import NAMES
    g, num_items = torch.Generator().manual_seed(seed), data.num_items
    shapes = {"text": (text_dim, 5), "visual": (visual_dim, 3)}
    for modality in sorted(NAMES, key=lambda m: list(shapes).index(m) if m in shapes else len(shapes)):
        dim, every = shapes.get(modality, (8, 4))
        feats = torch.nn.functional.normalize(torch.randn(num_items + 1, dim, generator=g), dim=-1)
        mask = torch.ones(num_items + 1, dtype=torch.bool)
        mask[0] = False
        mask[::every] = False
        if modality == "visual" and not visual:
            mask[:] = False
        (root / modality).mkdir(parents=True, exist_ok=True)
        save_tensors(root / modality / "features.safetensors", {"features": feats * mask.unsqueeze(-1), "mask": mask},
                     metadata={"items_sha256": data.items_sha256})
    return root


def tiny_stage_params(**train) -> Params:
    """tiny_params with short multimodal stages."""
    p = tiny_params(**train)
    p.memory.st_capacity, p.memory.lt_capacity, p.memory.retrieve_lt = 3, 6, 4
    p.memory.surprise_threshold = 0.3
    for stage in (p.align_projectors, p.finetune_moe):
        stage.rounds, stage.client_fraction, stage.batch_size, stage.num_negatives, stage.patience = 2, 0.5, 2, 4, 5
        for k, v in train.items():
            setattr(stage, k, v)
    return p


def git_dvc_project(root: Path) -> Path:
    """write_tiny_project + add_dvc_pipeline as a committed git + DVC repository with a local DVC remote
    (``root/../<name>-storage``): what a flow run clones."""
    import shutil
    import subprocess
    import sys
    root.mkdir(parents=True, exist_ok=True)
    add_dvc_pipeline(write_tiny_project(root))
    shutil.copy(REPO / ".gitignore", root)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    storage = root.parent / f"{root.name}-storage"
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "remote", "add", "-d", "local", str(storage)],
                ["git", "add", "-A"], ["git", "-c", "user.email=t@localhost", "-c", "user.name=t", "commit", "-qm", "tiny"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    return root


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(size): a tmpfs of ``size`` (e.g. "64k") to fill up, a real ENOSPC; needs root and mount, as on CI
    (skipped elsewhere, saying why). Unmounted after the test."""
    import subprocess
    mounted = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"disk{len(mounted)}"
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                           text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a small tmpfs to fill ({r.stderr.strip()[:80]})")
        mounted.append(mnt)
        return mnt
    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
