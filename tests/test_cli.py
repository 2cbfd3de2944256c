"""The CLI as a user runs it: subprocesses, exit codes, one-line errors, artefacts on disk."""
import json
import os
import subprocess
import sys

import pytest

from feddmmr.data import load_prepared
from feddmmr.stages import load_checkpoint

TINY = ["-S", "model.hidden=16", "-S", "model.heads=2", "-S", "model.ffn_hidden=16", "-S", "model.blocks=1",
        "-S", "pretrain_sasrec.rounds=3", "-S", "pretrain_sasrec.client_fraction=0.5",
        "-S", "pretrain_sasrec.batch_size=2", "-S", "pretrain_sasrec.num_negatives=4"]


def feddmmr(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "feddmmr", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.mark.parametrize("command", [[], ["prepare"], ["train"], ["evaluate"], ["make-demo"]])
def test_help(command):
    r = feddmmr(*command, "--help")
    assert r.returncode == 0 and "usage: feddmmr" in r.stdout
    assert len(r.stdout.splitlines()) > 5


def test_prepare_train_evaluate_end_to_end(tmp_path, tiny_csv):
    data, ckpt, metrics = tmp_path / "prepared", tmp_path / "ckpt", tmp_path / "m.json"
    r = feddmmr("prepare", "--out", str(data),
                "-S", f"prepare.path={tiny_csv}", "-S", "prepare.eval_negatives=20", "-S", "prepare.max_seq_len=10",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "prepared" in r.stdout and (data / "sequences.npz").is_file()
    r = feddmmr("-q", "train", "--data", str(data), "--out", str(ckpt), "--metrics", str(metrics), *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    m = json.loads(metrics.read_text())
    assert set(m["test"]) == {"full", "sampled"} and 0 <= m["test"]["full"]["HR@10"] <= 1
    assert m["rounds_run"] == 3 and 0 <= m["best_round"] <= 3
    history = json.loads((ckpt / "train_history.json").read_text())
    assert history["round"] == [0, 1, 2, 3] and len(history["val"]) == 4
    model, config = load_checkpoint(ckpt, load_prepared(data))
    assert config["best_round"] == m["best_round"] and config["model"]["hidden"] == 16
    r = feddmmr("evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--split", "test", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["full"] == m["test"]["full"]  # the checkpoint is the best round


@pytest.mark.parametrize("args, message", [
    (["prepare", "-S", "prepare.path=/nonexistent/ratings.csv"], "input not found: /nonexistent/ratings.csv"),
    (["prepare", "-S", "prepare.source=parquet"], "prepare.source must be one of"),
    (["prepare", "-S", "prepare.bogus=1"], "unknown key prepare.bogus"),
    (["prepare", "-S", "prepare.top_k_users=many"], "prepare.top_k_users must be int"),
    (["train", "--data", "/nonexistent"], "prepared data not found: /nonexistent/sequences.npz"),
    (["evaluate", "--checkpoint", "/nonexistent"], "not found"),
    (["prepare", "--params", "/nonexistent.yaml"], "params file not found"),
])
def test_errors_are_one_line_without_traceback(tmp_path, args, message):
    r = feddmmr(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists()


def test_corrupt_checkpoint_is_reported_with_the_file(tmp_path, tiny_prepared):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"num_items": 3, "max_seq_len": 10}))
    r = feddmmr("evaluate", "--checkpoint", str(ckpt), "--data", str(tiny_prepared), cwd=tmp_path)
    assert r.returncode == 2 and str(ckpt) in r.stderr and "Traceback" not in r.stderr


def test_cuda_device_without_gpu_is_a_clear_error(tmp_path, tiny_prepared):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the error path cannot be exercised")
    r = feddmmr("train", "--data", str(tiny_prepared), "--out", str(tmp_path / "ck"), "-S", "pretrain_sasrec.device=cuda",
                cwd=tmp_path)
    assert r.returncode == 2 and "no CUDA device is available" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "ck").exists()
