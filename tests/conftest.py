import os
from pathlib import Path

import pytest

# No hub look-ups, no telemetry: tests never touch the network.
for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "true",
                   "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "DVC_NO_ANALYTICS": "1"}.items():
    os.environ.setdefault(key, value)

from feddmmr.config import Params, PrepareParams  # noqa: E402
from feddmmr.data import prepare  # noqa: E402
from feddmmr.demo import write_demo  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEDDMMR_SHARED_DATA", REPO.parent / "shared" / "data"))


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
