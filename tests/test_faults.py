"""Fault injection with real processes: kill -9 and resume, divergence, NaN features, two writers,
an MLflow server killed mid-stage, unusable stores, and parameters as people write them."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import save_file

from conftest import free_port, tiny_stage_params, wait_for_http, write_tiny_features
from feddmmr.data.prepare import load_prepared
from feddmmr.io import load_tensors
from feddmmr.training.stages import train_stage

TINY = ["-S", "model.hidden=16", "-S", "model.heads=2", "-S", "model.ffn_hidden=16", "-S", "model.blocks=1",
        "-S", "memory.st_capacity=3", "-S", "memory.lt_capacity=6", "-S", "memory.retrieve_lt=4"]


def stage_args(stage, rounds, **extra):
    kv = {"rounds": rounds, "client_fraction": 0.5, "batch_size": 2, "num_negatives": 4, "patience": 100, **extra}
    return [a for k, v in kv.items() for a in ("-S", f"{stage}.{k}={v}")]


class Proc:
    """A feddmmr process whose stderr lines are collected as they come."""

    def __init__(self, args, cwd, env=None):
        self.lines: list[str] = []
        self.p = subprocess.Popen([sys.executable, "-m", "feddmmr", *args], cwd=cwd, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.p.stderr.readline, "")), daemon=True)
        self.reader.start()

    def wait_for(self, pattern, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(re.search(pattern, line) for line in list(self.lines)):
                return
            if self.p.poll() is not None:
                break
            time.sleep(0.05)
        pytest.fail(f"never saw {pattern!r}; stderr:\n{''.join(self.lines[-20:])}")

    def finish(self, timeout=300):
        self.p.wait(timeout)
        self.reader.join(10)
        return self.p.returncode, "".join(self.lines)


def feddmmr(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "feddmmr", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def one_line(stderr):
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.strip().splitlines() if line.startswith("feddmmr: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.fixture(scope="module")
def chain(tiny_prepared, tmp_path_factory):
    """Stages 1-2 trained, with tiny features: the start of a finetune_moe run."""
    root = tmp_path_factory.mktemp("faults")
    feats = write_tiny_features(root / "features", load_prepared(tiny_prepared))
    p = tiny_stage_params(rounds=2)
    p.tracking.enabled = False
    for stage in ("pretrain_sasrec", "align_projectors"):
        train_stage(stage, p, tiny_prepared, root / "checkpoints" / stage, root / f"{stage}.json", progress=False,
                    features_dir=feats)
    return root


def finetune(root, data, out, rounds=14, extra=()):
    return ["train", "--stage", "finetune_moe", "--data", str(data), "--features", str(root / "features"),
            "--init", str(root / "checkpoints" / "align_projectors"), "--out", str(out),
            "--metrics", str(out) + ".json", *TINY, *stage_args("finetune_moe", rounds), *extra]


def test_kill9_mid_stage_then_resume_is_bit_identical(chain, tiny_prepared, tmp_path):
    """finetune_moe (dropout, FedAdam moments, client memories, every group training) killed with SIGKILL after a
    few rounds resumes from its last completed round and ends bit-identical to an uninterrupted run; the MLflow run
    of the killed attempt is continued and FINISHED."""
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store.db'}"}
    ref = feddmmr(*finetune(chain, tiny_prepared, tmp_path / "ref"), "-S", "tracking.enabled=false", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "run"
    proc = Proc(finetune(chain, tiny_prepared, out), cwd=tmp_path, env=env)
    proc.wait_for(r"finetune_moe round 4:")
    proc.p.send_signal(signal.SIGKILL)
    code, _ = proc.finish()
    assert code == -signal.SIGKILL
    state = json.loads((tmp_path / ".run.resume" / "state.json").read_text())
    assert 3 <= state["round"] < 14 and not out.exists()   # round 4 is logged just before it is saved
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(state["tracking_run"]).info.status == "RUNNING"

    r = feddmmr(*finetune(chain, tiny_prepared, out), cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert f"resuming after round {state['round']}" in r.stderr
    assert not re.search(rf"finetune_moe round {state['round']}:", r.stderr)   # no completed round is repeated
    for name in ("model.safetensors", "memory.safetensors"):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    mine, theirs = (json.loads(Path(f"{d}.json").read_text()) for d in (out, tmp_path / "ref"))
    assert (mine["best_round"], mine["val"], mine["test"]) == (theirs["best_round"], theirs["val"], theirs["test"])
    history = json.loads((out / "train_history.json").read_text())
    assert history["val"] == json.loads((tmp_path / "ref" / "train_history.json").read_text())["val"]
    assert not (tmp_path / ".run.resume").exists()                             # a finished stage leaves no state
    run = client.get_run(state["tracking_run"])
    assert run.info.status == "FINISHED"
    entries = [m.step for m in client.get_metric_history(run.info.run_id, "val.full.NDCG_at_10")]
    assert set(entries) == set(range(15))
    assert len(entries) <= 16      # resume re-sends at most the round logged just before the kill


def test_sigterm_marks_the_run_killed_and_kill9_leftovers_are_closed(chain, tiny_prepared, tmp_path):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'store.db'}"}
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    out = tmp_path / "run"
    proc = Proc(finetune(chain, tiny_prepared, out, rounds=40), cwd=tmp_path, env=env)
    proc.wait_for(r"finetune_moe round 2:")
    proc.p.send_signal(signal.SIGTERM)
    code, stderr = proc.finish()
    assert code == 130 and "resumes from its last completed round" in stderr
    (run,) = client.search_runs([client.get_experiment_by_name("feddmmr").experiment_id],
                                filter_string="tags.`feddmmr.kind` = 'stage'")
    assert run.info.status == "KILLED"

    proc = Proc(finetune(chain, tiny_prepared, out, rounds=40), cwd=tmp_path, env=env)
    proc.wait_for(r"finetune_moe round \d+:")
    proc.p.send_signal(signal.SIGKILL)
    proc.finish()
    killed = json.loads((tmp_path / ".run.resume" / "state.json").read_text())["tracking_run"]
    assert client.get_run(killed).info.status == "RUNNING"
    r = feddmmr(*finetune(chain, tiny_prepared, out, rounds=3), cwd=tmp_path, env=env)  # other params: fresh run
    assert r.returncode == 0, r.stderr
    assert client.get_run(killed).info.status == "KILLED"


def test_diverging_learning_rate_fails_and_keeps_the_best_finite_round(chain, tiny_prepared, tmp_path):
    args = ["train", "--data", str(tiny_prepared), "--out", str(tmp_path / "ck"), "--metrics", str(tmp_path / "m.json"),
            *TINY, *stage_args("pretrain_sasrec", 2), "-S", "pretrain_sasrec.lr=1.0e+30",
            "-S", "pretrain_sasrec.server_optimizer=sgd", "-S", "pretrain_sasrec.server_lr=1.0",
            "-S", "pretrain_sasrec.server_momentum=0.0", "-S", "tracking.enabled=false"]
    r = feddmmr(*args, cwd=tmp_path)
    assert r.returncode == 3
    line = one_line(r.stderr)
    assert "pretrain_sasrec round 1" in line and "lower pretrain_sasrec.lr (now 1e+30)" in line
    metrics = json.loads((tmp_path / "m.json").read_text())
    numbers = [v for part in ("val", "test") for proto in metrics[part].values() for v in proto.values()]
    assert numbers and all(math.isfinite(v) for v in numbers)
    assert metrics["best_round"] == 0 and "diverged" in metrics and metrics["test"]["full"]["HR@10"] < 1
    weights = load_tensors(tmp_path / "ck" / "model.safetensors", "w", "")
    assert all(torch.isfinite(v).all() for v in weights.values())
    r = feddmmr("train", "--stage", "align_projectors", "--data", str(tiny_prepared), "--init", str(tmp_path / "ck"),
                "--features", str(chain / "features"), "--out", str(tmp_path / "s2"), *TINY, cwd=tmp_path)
    assert r.returncode == 2 and "diverged run" in one_line(r.stderr)


def test_nan_feature_rows_are_refused_with_the_file(chain, tiny_prepared, tmp_path):
    feats = write_tiny_features(tmp_path / "features", load_prepared(tiny_prepared))
    t = load_tensors(feats / "text" / "features.safetensors", "f", "")
    t["features"][3] = float("nan")
    save_file(t, str(feats / "text" / "features.safetensors"),
              metadata={"items_sha256": load_prepared(tiny_prepared).items_sha256})
    r = feddmmr("train", "--stage", "align_projectors", "--data", str(tiny_prepared), "--features", str(feats),
                "--init", str(chain / "checkpoints" / "pretrain_sasrec"), "--out", str(tmp_path / "ck"), cwd=tmp_path)
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert str(feats / "text" / "features.safetensors") in line and "NaN" in line and "[3]" in line
    assert not (tmp_path / "ck").exists()


def test_second_trainer_into_the_same_output_refuses_naming_the_first(chain, tiny_prepared, tmp_path):
    out = tmp_path / "run"
    first = Proc(finetune(chain, tiny_prepared, out, rounds=200, extra=["-S", "tracking.enabled=false"]), cwd=tmp_path)
    try:
        first.wait_for(r"finetune_moe round 1:")
        r = feddmmr(*finetune(chain, tiny_prepared, out, extra=["-S", "tracking.enabled=false"]), cwd=tmp_path)
        assert r.returncode == 2
        line = one_line(r.stderr)
        assert f"{out} is being written by pid {first.p.pid}" in line
    finally:
        first.p.kill()
        first.finish()


def test_two_processes_initialise_a_fresh_store_together(tiny_prepared, tmp_path):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'fresh.db'}"}
    procs = [Proc(["-q", "train", "--data", str(tiny_prepared), "--out", str(tmp_path / f"ck{i}"), "--metrics",
                   str(tmp_path / f"m{i}.json"), *TINY, *stage_args("pretrain_sasrec", 1)], cwd=tmp_path, env=env)
             for i in range(2)]
    for p in procs:
        code, stderr = p.finish()
        assert code == 0, stderr
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("feddmmr").experiment_id],
                              filter_string="tags.`feddmmr.kind` = 'stage'")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    assert len({r.data.tags["checkpoint"] for r in runs}) == 2


def _mlflow_server(store, port):
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                             str(port), "--backend-store-uri", f"sqlite:///{store}", "--workers", "1",
                             "--artifacts-destination", str(store.parent / "artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_http(f"http://127.0.0.1:{port}/health", proc, "mlflow server")
    return proc


@pytest.mark.slow
def test_mlflow_server_killed_mid_stage_costs_no_training(tiny_prepared, tmp_path):
    if not (Path(sys.executable).parent / "mlflow").exists():
        pytest.skip("the mlflow command is not installed beside this interpreter")
    port, store = free_port(), tmp_path / "server.db"
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    server = _mlflow_server(store, port)
    args = ["train", "--data", str(tiny_prepared), "--out", str(tmp_path / "ck"), "--metrics", str(tmp_path / "m.json"),
            *TINY, *stage_args("pretrain_sasrec", 30)]
    try:
        proc = Proc(args, cwd=tmp_path, env=env)
        proc.wait_for(r"pretrain_sasrec round 3:")
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        code, stderr = proc.finish()
        assert code == 4, stderr
        line = one_line(stderr)
        assert "checkpoint and metrics are written" in line and "did not record rounds" in line
        assert "pretrain_sasrec round 30:" in stderr                       # training went on to the end
        weights = (tmp_path / "ck" / "model.safetensors").read_bytes()
        assert json.loads((tmp_path / "m.json").read_text())["rounds_run"] == 30

        server = _mlflow_server(store, port)
        r = feddmmr(*args, cwd=tmp_path, env=env)
        assert r.returncode == 0, r.stderr
        assert not re.search(r"pretrain_sasrec round \d+:", r.stderr)       # recorded without training again
        assert (tmp_path / "ck" / "model.safetensors").read_bytes() == weights
        client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
        (run,) = client.search_runs([client.get_experiment_by_name("feddmmr").experiment_id],
                                    filter_string="tags.`feddmmr.kind` = 'stage'")
        assert run.info.status == "FINISHED" and "test.full.HR_at_10" in run.data.metrics
        steps = {m.step for m in client.get_metric_history(run.info.run_id, "val.full.NDCG_at_10")}
        assert steps == set(range(31))
        assert not (tmp_path / ".ck.resume").exists()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)


@pytest.mark.parametrize("uri, message", [
    ("sqlite:///{tmp}/garbage.db", "cannot be used"),
    ("sqlite:///{tmp}/nowhere/store.db", "is missing or not writable"),
    ("sqlite:///{tmp}", "is not a readable and writable file"),
    ("bogus-scheme://x", "cannot be used"),
])
def test_unusable_tracking_store_is_one_line_before_training(tiny_prepared, tmp_path, uri, message):
    (tmp_path / "garbage.db").write_text("this is not a database\n" * 100)
    r = feddmmr("train", "--data", str(tiny_prepared), "--out", str(tmp_path / "ck"), *TINY,
                cwd=tmp_path, env={"MLFLOW_TRACKING_URI": uri.format(tmp=tmp_path)})
    assert r.returncode == 2
    assert message in one_line(r.stderr)
    assert not (tmp_path / "ck").exists() and "round 1" not in r.stderr


@pytest.mark.parametrize("override, message", [
    ("pretrain_sasrec.lr=-0.1", "pretrain_sasrec.lr must be > 0, got -0.1"),
    ("pretrain_sasrec.server_momentum=1.5", "pretrain_sasrec.server_momentum must be in [0, 1)"),
    ("finetune_moe.contrastive_temperature=0", "finetune_moe.contrastive_temperature must be > 0"),
    ("model.dropout=.nan", "model.dropout must be a finite number"),
    ("prepare.eval_negatives=-1", "prepare.eval_negatives must be >= 0"),
    ("pretrain_sasrec.lr=fast", "pretrain_sasrec.lr must be float, got 'fast'"),
    ("pretrain_sasrec.freeze=[item_embeddings, backbone]", "freeze lists every parameter group"),
    ("finetune_moe.init_from=x;touch${IFS}pwned", "finetune_moe.init_from must be align_projectors or pretrain_sasrec"),
])
def test_bad_parameters_are_one_line(tmp_path, tiny_prepared, override, message):
    r = feddmmr("train", "--data", str(tiny_prepared), "--out", str(tmp_path / "ck"), "-S", override, cwd=tmp_path)
    assert r.returncode == 2 and message in one_line(r.stderr)
    assert not (tmp_path / "ck").exists()


def test_a_key_that_may_be_null_takes_null_whatever_its_default(tmp_path):
    """gate_start is `float | None`: null (the previous stage's gate, or gating_init) is a value for every stage,
    whether its default is a number (align_projectors: 0.0) or null (finetune_moe); other keys still refuse it."""
    from feddmmr.config import load_params
    from feddmmr.errors import FeddmmrError
    (tmp_path / "params.yaml").write_text("align_projectors:\n  gate_start: null\nfinetune_moe:\n  gate_start: 0.1\n")
    p = load_params(tmp_path / "params.yaml")
    assert (p.align_projectors.gate_start, p.finetune_moe.gate_start) == (None, 0.1)
    assert load_params(None).align_projectors.gate_start == 0.0
    with pytest.raises(FeddmmrError, match="align_projectors.rounds must be int, got None"):
        load_params(tmp_path / "params.yaml", ["align_projectors.rounds=null"])


def test_floats_as_people_write_them(tmp_path, tiny_prepared):
    (tmp_path / "params.yaml").write_text("pretrain_sasrec:\n  lr: 1e-3\n  server_lr: 2E-2\n")
    from feddmmr.config import load_params
    p = load_params(tmp_path / "params.yaml", ["finetune_moe.lr=5e-4"])
    assert (p.pretrain_sasrec.lr, p.pretrain_sasrec.server_lr, p.finetune_moe.lr) == (1e-3, 2e-2, 5e-4)
    r = feddmmr("-q", "train", "--data", str(tiny_prepared), "--out", str(tmp_path / "ck"), *TINY,
                *stage_args("pretrain_sasrec", 1), "-S", "tracking.enabled=false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["train"]["lr"] == 1e-3


def test_top_k_users_beyond_the_data_says_so(tmp_path, tiny_csv):
    r = feddmmr("prepare", "--out", str(tmp_path / "p"), "-S", f"prepare.path={tiny_csv}",
                "-S", "prepare.top_k_users=5000", cwd=tmp_path)
    assert r.returncode == 2
    assert "prepare.top_k_users is 5000, but the data has only 40 users" in one_line(r.stderr)
    assert not (tmp_path / "p").exists()
