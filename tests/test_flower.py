"""The Flower engine as a user runs it: `feddmmr train --engine flower` starts a real SuperLink and
SuperNodes on 127.0.0.1, and each of the three stages it writes is the simulator's."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import write_tiny_features, write_tiny_project
from safetensors.torch import load_file

from feddmmr.data.prepare import load_prepared
from feddmmr.errors import FeddmmrError
from feddmmr.model.memory import POINTER_KEYS

pytestmark = pytest.mark.skipif(importlib.util.find_spec("flwr") is None,
                                reason="Flower is not installed: pip install -e '.[flower]' (make test installs it)")

STAGES = ("pretrain_sasrec", "align_projectors", "finetune_moe")


def one_round(stage):
    return ["--stage", stage, "-S", f"{stage}.rounds=1", "-S", f"{stage}.keep=last", "-S", "model.dropout=0.0"]


def feddmmr(cwd, *args, timeout=600):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    return subprocess.run([sys.executable, "-m", "feddmmr", "-q", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = write_tiny_project(tmp_path_factory.mktemp("flower"))
    r = feddmmr(root, "prepare")
    assert r.returncode == 0, r.stderr
    write_tiny_features(root / "features", load_prepared(root / "data/prepared"))
    return root


def assert_same_stage(project, a, b):
    wa, wb = load_file(project / f"ck/{a}/model.safetensors"), load_file(project / f"ck/{b}/model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)
    ma, mb = (json.loads((project / f"m/{n}.json").read_text()) for n in (a, b))
    for split in ("val", "test"):
        for protocol in ("full", "sampled"):
            assert ma[split][protocol]["NDCG@10"] == pytest.approx(mb[split][protocol]["NDCG@10"], abs=1e-6)
    return ma


@pytest.mark.slow
def test_loopback_federation_trains_the_three_stages_the_simulator_trains(project):
    """Two SuperNodes train their partitions of each round's users and, in stages 2-3, keep their users'
    memories: after one round each stage equals the simulator's (dropout off), stage 3 continuing the
    memories the nodes kept from stage 2; checkpoints, metrics and MLflow runs are written as usual."""
    fed = ["--engine", "flower", "-S", "federation.nodes=2"]
    sim = ["-S", "tracking.enabled=false"]
    for stage, init in zip(STAGES, (None, "fl-pretrain_sasrec", "fl-align_projectors")):
        start = ["--init", f"ck/{init}"] if init else []
        fl = feddmmr(project, "train", *fed, *one_round(stage), *start, "--out", f"ck/fl-{stage}",
                     "--metrics", f"m/fl-{stage}.json")
        assert fl.returncode == 0, fl.stderr[-3000:]
        sim_start = ["--init", f"ck/sim-{STAGES[STAGES.index(stage) - 1]}"] if init else []
        r = feddmmr(project, "train", *sim, *one_round(stage), *sim_start, "--out", f"ck/sim-{stage}",
                    "--metrics", f"m/sim-{stage}.json")
        assert r.returncode == 0, r.stderr[-3000:]
        metrics = assert_same_stage(project, f"fl-{stage}", f"sim-{stage}")
        history = json.loads((project / f"ck/fl-{stage}/train_history.json").read_text())
        assert history["round"] == [0, 1] and history["clients"][1] == 20    # 0.5 of the 40 users trained
        if init:   # the nodes' memories: the same summary and writes as the simulator's, and only a pointer here
            simulated = json.loads((project / f"ck/sim-{stage}/train_history.json").read_text())
            assert history["memory"] == simulated["memory"] and history["memory_writes"] == simulated["memory_writes"]
            assert set(load_file(project / f"ck/fl-{stage}/memory.safetensors")) == set(POINTER_KEYS)

    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.`feddmmr.kind` = 'stage'")
    assert {r.data.tags["feddmmr.stage"] for r in runs} == set(STAGES) and len(runs) == 3
    assert all(r.info.status == "FINISHED" and r.data.params["federation.engine"] == "flower" for r in runs)
    last = next(r for r in runs if r.data.tags["feddmmr.stage"] == "finetune_moe")
    assert last.data.metrics["test.full.NDCG_at_10"] == pytest.approx(metrics["test"]["full"]["NDCG@10"])
    assert not list(project.glob(":flwr*")), "the SuperLink wrote its state into the project"
    kept = sorted(p.name for p in (project / "ck/.flower-nodes/node-0").glob("*/round-*.safetensors"))
    assert kept == ["round-1.safetensors"] * 2                   # per finished stage: the round its checkpoint names

    # the simulator cannot continue memories it does not hold, nor can evaluate read them: one line each
    r = feddmmr(project, "train", *sim, *one_round("finetune_moe"), "--init", "ck/fl-align_projectors",
                "--out", "ck/x", "--metrics", "m/x.json")
    assert r.returncode == 2 and "stay on the SuperNodes" in r.stderr and "--engine flower" in r.stderr
    r = feddmmr(project, "evaluate", "--checkpoint", "ck/fl-finetune_moe")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "stay on the SuperNodes" in r.stderr


def test_a_supernode_without_its_partition_says_how_to_start_it():
    from feddmmr.flower.client_app import node_partition
    from feddmmr.flower.client_app import node_memory_dirs
    with pytest.raises(FeddmmrError, match="lacks features-dir, state-dir: the multimodal stages need"):
        node_memory_dirs({"data-dir": "d", "partition-id": 0, "num-partitions": 1})
    with pytest.raises(FeddmmrError, match="lacks partition-id, num-partitions.*--node-config"):
        node_partition({"data-dir": "data/prepared"})
    with pytest.raises(FeddmmrError, match=r"partition-id 3 must be in \[0, num-partitions=3\)"):
        node_partition({"data-dir": "data/prepared", "partition-id": 3, "num-partitions": 3})
    assert node_partition({"data-dir": "d", "partition-id": 1, "num-partitions": 3})[1:] == (1, 3)
