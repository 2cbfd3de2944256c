"""The CLI as a user runs it: subprocesses, exit codes, one-line errors, artefacts on disk."""
import json
import os
import subprocess
import sys

import pytest

from feddmmr.data.prepare import load_prepared
from feddmmr.training.checkpoint import load_checkpoint

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
    r = feddmmr("-q", "train", "--data", str(data), "--out", str(ckpt), "--metrics", str(metrics), *TINY,
                "-S", "pretrain_sasrec.rounds=4", "-S", "pretrain_sasrec.lr=0.5", "-S", "pretrain_sasrec.server_lr=0.3",
                cwd=tmp_path)  # a large server step: validation peaks before the last round
    assert r.returncode == 0, r.stderr
    m = json.loads(metrics.read_text())
    assert set(m["test"]) == {"full", "sampled"} and 0 <= m["test"]["full"]["HR@10"] <= 1
    history = json.loads((ckpt / "train_history.json").read_text())
    assert history["round"] == [0, 1, 2, 3, 4] and len(history["val"]) == 5 and m["rounds_run"] == 4
    scores = [v["full"]["NDCG@10"] for v in history["val"]]
    assert m["best_round"] == scores.index(max(scores)) < 4    # the first round with the best selection metric
    assert m["val"] == history["val"][m["best_round"]]
    model, config, _ = load_checkpoint(ckpt, load_prepared(data))
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
    (["prepare", "--params", "typo.yaml"], "unknown section 'pretrain_sasrc' (did you mean pretrain_sasrec?)"),
    (["prepare", "--params", "latin1.yaml"], "latin1.yaml is not UTF-8 text"),
    (["prepare", "-S", "pretrain_sasrec.rounsd=3"], "unknown key pretrain_sasrec.rounsd (did you mean rounds?)"),
    (["prepare", "-S", "pretrain_sasrec.seed=-1"], "pretrain_sasrec.seed must be >= 0"),
    (["prepare", "-S", "pretrain_sasrec.rounds=[1"], "the value is not valid YAML"),
    (["prepare", "-S", "pretrain_sasrec.num_negatives=10000000"], "num_negatives must be at most 100,000"),
    (["prepare", "-S", "model.hidden=1000000"], "model.hidden must be at most 8,192"),
])
def test_errors_are_one_line_without_traceback(tmp_path, args, message):
    (tmp_path / "typo.yaml").write_text("pretrain_sasrc:\n  rounds: 29\n")
    (tmp_path / "latin1.yaml").write_bytes("prepare:\n  path: caf\xe9.csv\n".encode("latin-1"))
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


def test_three_stage_chain_through_the_cli(tmp_path, tiny_prepared):
    from conftest import write_tiny_features
    feats = write_tiny_features(tmp_path / "features", load_prepared(tiny_prepared))
    stage_args = [f"-S {s}.{k}={v}".split(" ", 1) for s in ("align_projectors", "finetune_moe")
                  for k, v in (("rounds", 2), ("client_fraction", 0.5), ("batch_size", 2), ("num_negatives", 4))]
    common = [*TINY, *[a for pair in stage_args for a in pair], "-S", "memory.st_capacity=3",
              "-S", "memory.lt_capacity=6", "-S", "memory.retrieve_lt=4", "-S", "tracking.enabled=false"]
    ck = tmp_path / "checkpoints"
    r = feddmmr("-q", "train", "--stage", "align_projectors", "--data", str(tiny_prepared), "--features", str(feats),
                "--out", str(ck / "align_projectors"), *common, cwd=tmp_path)
    assert r.returncode == 2 and "train pretrain_sasrec first" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    for stage in ("pretrain_sasrec", "align_projectors", "finetune_moe"):
        r = feddmmr("-q", "train", "--stage", stage, "--data", str(tiny_prepared), "--features", str(feats),
                    "--out", str(ck / stage), "--metrics", str(tmp_path / f"{stage}.json"), *common, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "finetune_moe.json").read_text())
    assert "gating_weight" in m
    r = feddmmr("evaluate", "--checkpoint", str(ck / "finetune_moe"), "--data", str(tiny_prepared),
                "--features", str(feats), *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["full"] == m["test"]["full"]
    r = feddmmr("evaluate", "--checkpoint", str(ck / "finetune_moe"), "--data", str(tiny_prepared),
                "--features", str(tmp_path / "elsewhere"), cwd=tmp_path)
    assert r.returncode == 2 and "feature file not found" in r.stderr and "Traceback" not in r.stderr


def test_flower_engine_without_flower_names_the_extra(tmp_path, tiny_prepared, monkeypatch, capsys):
    """Without the flower extra, --engine flower fails in one line naming the install command."""
    from feddmmr.cli import main
    hidden = {name for name in sys.modules if name.split(".")[0] == "flwr"} | {"flwr"}
    for name in hidden:                 # as if flwr were not installed, even after another test imported it
        monkeypatch.setitem(sys.modules, name, None)
    for name in [name for name in sys.modules if name.startswith("feddmmr.flower")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--engine", "flower", "--data", str(tiny_prepared)]) == 2
    assert capsys.readouterr().err.strip() == ("feddmmr: error: --engine flower needs Flower (flwr is not "
                                               "installed): pip install -e '.[flower]'")


def test_help_and_parameter_errors_answer_without_loading_torch_or_mlflow():
    """`feddmmr --help` and a bad -S override are answered by the parser and params.yaml alone."""
    probe = ("import sys; from feddmmr.cli import main; code = main(['train', '-S', 'pretrain_sasrec.lr=-1']); "
             "print(code, sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'mlflow', 'numpy'}))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert r.stdout.split() == ["2", "[]"], r.stdout + r.stderr
    assert "pretrain_sasrec.lr must be > 0" in r.stderr


@pytest.mark.parametrize("command", [["prepare"], ["features", "visual"], ["train"]])
def test_an_output_below_a_file_is_one_line(tmp_path, tiny_prepared, tiny_csv, command):
    """--out README.md/x used to end in a FileExistsError traceback."""
    (tmp_path / "README.md").write_text("a file\n")
    extra = ["-S", f"prepare.path={tiny_csv}", "-S", "prepare.eval_negatives=20"] if command == ["prepare"] \
        else ["--data", str(tiny_prepared)]
    r = feddmmr(*command, "--out", "README.md/x", *extra, *TINY, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("feddmmr: error: cannot use") and "README.md" in r.stderr and "--out" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and (tmp_path / "README.md").read_text() == "a file\n"


def test_a_full_disk_is_one_line_with_its_own_status_and_leaves_nothing(tmp_path, tiny_prepared, small_disk):
    full_disk = small_disk("64k")
    r = feddmmr("train", "--data", str(tiny_prepared), "--out", str(full_disk / "ck"), "--metrics",
                str(full_disk / "m.json"), *TINY, "-S", "pretrain_sasrec.rounds=1", "-S", "model.hidden=64",
                "-S", "model.heads=2", "-S", "model.ffn_hidden=64", cwd=tmp_path)
    assert r.returncode == 5, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("feddmmr: error: cannot write") and "No space left on device" in last
    assert "run the command again" in last and "Traceback" not in r.stderr and r.stderr.count("error") == 1
    assert not (full_disk / "ck").exists() and not list(full_disk.glob(".*.tmp"))


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, tiny_prepared):
    from conftest import tiny_params
    from feddmmr.training.stages import train_stage
    root = tmp_path_factory.mktemp("stage1")
    p = tiny_params(rounds=1)
    p.tracking.enabled = False
    train_stage("pretrain_sasrec", p, tiny_prepared, root / "ck", root / "m.json", progress=False)
    return root / "ck"


@pytest.mark.parametrize("change, message", [
    ({"extra": 1}, "model_config must hold exactly"),
    ({"hidden": None}, "model_config must hold exactly"),
    ({"hidden": "16"}, "invalid hidden"),
    ({"hidden": 1_000_000}, "invalid hidden"),          # used to try to allocate 12 TB
    ({"blocks": 100_000}, "invalid blocks"),            # used to grow past 8 GB in 12 s
    ({"hidden": 32, "heads": 2}, "does not match its config"),
    ({"feature_dims": {"audio": 8}}, "invalid feature_dims"),
])
def test_a_crafted_checkpoint_config_is_one_line_before_anything_is_allocated(tmp_path, tiny_prepared, stage1,
                                                                                change, message):
    import shutil
    ckpt = tmp_path / "ck"
    shutil.copytree(stage1, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    for key, value in change.items():
        if value is None:
            del config["model_config"][key]
        else:
            config["model_config"][key] = value
    (ckpt / "config.json").write_text(json.dumps(config))
    r = feddmmr("evaluate", "--checkpoint", str(ckpt), "--data", str(tiny_prepared), cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_diverged_checkpoint_is_refused_by_recommend_and_named_by_evaluate(tmp_path, tiny_prepared, stage1):
    import shutil
    ckpt = tmp_path / "ck"
    shutil.copytree(stage1, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "diverged": "round 3: the training loss is nan"}))
    r = feddmmr("recommend", "--checkpoint", str(ckpt), "--data", str(tiny_prepared), "--user",
                str(int(load_prepared(tiny_prepared).user_raw[0])), cwd=tmp_path)
    assert r.returncode == 2 and "holds the best finite round of a diverged pretrain_sasrec run" in r.stderr
    r = feddmmr("evaluate", "--checkpoint", str(ckpt), "--data", str(tiny_prepared), cwd=tmp_path)
    assert r.returncode == 0 and "warning:" in r.stderr and "diverged" in r.stderr and json.loads(r.stdout)["full"]


def test_logs_for_machines_one_line_a_round_and_the_metrics_as_one_record(tmp_path, tiny_prepared):
    """Under DVC or Prefect (no terminal) a 2-round stage sent 78 records: bar refreshes and the JSON line by line."""
    r = feddmmr("train", "--data", str(tiny_prepared), "--out", str(tmp_path / "ck"), "--metrics",
                str(tmp_path / "m.json"), *TINY, "-S", "pretrain_sasrec.rounds=2", "-S", "tracking.enabled=false",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1 and json.loads(r.stdout)["stage"] == "pretrain_sasrec"
    assert "\r" not in r.stderr and "%|" not in r.stderr                      # no progress bar
    rounds = [line for line in r.stderr.splitlines() if line.startswith("pretrain_sasrec round ")]
    assert len(rounds) == 2 and len(r.stderr.splitlines()) <= 4, r.stderr
