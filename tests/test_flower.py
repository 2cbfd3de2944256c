"""The Flower engine as a user runs it: `feddmmr train --engine flower` starts a real SuperLink and
SuperNodes on 127.0.0.1, and the stage it writes is the simulator's."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import write_tiny_project
from safetensors.torch import load_file

from feddmmr.errors import FeddmmrError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("flwr") is None,
                                reason="Flower is not installed: pip install -e '.[flower]' (make test installs it)")

ONE_ROUND = ["-S", "pretrain_sasrec.rounds=1", "-S", "pretrain_sasrec.keep=last", "-S", "model.dropout=0.0"]


def feddmmr(cwd, *args, timeout=600):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    return subprocess.run([sys.executable, "-m", "feddmmr", "-q", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = write_tiny_project(tmp_path_factory.mktemp("flower"))
    r = feddmmr(root, "prepare")
    assert r.returncode == 0, r.stderr
    return root


@pytest.mark.slow
def test_loopback_federation_trains_the_stage_the_simulator_trains(project):
    """Three SuperNodes each train their partition of a round's users; the aggregate after one round
    equals the simulator's (dropout off), and checkpoint, metrics and MLflow run are written as usual."""
    fl = feddmmr(project, "train", "--engine", "flower", *ONE_ROUND, "-S", "federation.nodes=3",
                 "--out", "ck/flower", "--metrics", "m/flower.json")
    assert fl.returncode == 0, fl.stderr[-3000:]
    sim = feddmmr(project, "train", *ONE_ROUND, "-S", "tracking.enabled=false", "--out", "ck/sim",
                  "--metrics", "m/sim.json")
    assert sim.returncode == 0, sim.stderr[-3000:]
    a, b = load_file(project / "ck/flower/model.safetensors"), load_file(project / "ck/sim/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    history = json.loads((project / "ck/flower/train_history.json").read_text())
    assert history["round"] == [0, 1] and history["clients"][1] == 20      # 0.5 of the 40 users trained
    flower, simulated = (json.loads((project / f"m/{n}.json").read_text()) for n in ("flower", "sim"))
    assert flower["test"]["full"]["NDCG@10"] == pytest.approx(simulated["test"]["full"]["NDCG@10"], abs=1e-6)

    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.`feddmmr.stage` = 'pretrain_sasrec'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["federation.engine"] == "flower"
    assert runs[0].data.metrics["test.full.NDCG_at_10"] == pytest.approx(flower["test"]["full"]["NDCG@10"])
    assert not list(project.glob(":flwr*")), "the SuperLink wrote its state into the project"


def test_multimodal_stages_are_refused_in_one_line(project):
    r = feddmmr(project, "train", "--engine", "flower", "--stage", "align_projectors")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "feddmmr: error: the Flower engine trains pretrain_sasrec so far; train align_projectors with "
        "federation.engine=simulation (--engine simulation)"]


def test_a_supernode_without_its_partition_says_how_to_start_it():
    from feddmmr.flower import node_partition
    with pytest.raises(FeddmmrError, match="lacks partition-id, num-partitions.*--node-config"):
        node_partition({"data-dir": "data/prepared"})
    with pytest.raises(FeddmmrError, match=r"partition-id 3 must be in \[0, num-partitions=3\)"):
        node_partition({"data-dir": "data/prepared", "partition-id": 3, "num-partitions": 3})
    assert node_partition({"data-dir": "d", "partition-id": 1, "num-partitions": 3})[1:] == (1, 3)
