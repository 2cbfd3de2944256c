"""MLflow tracking against real stores: a sqlite file and a real `mlflow server` on 127.0.0.1."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from conftest import free_port, tiny_params, wait_for_http
from feddmmr.errors import FeddmmrError
from feddmmr.training.stages import train_stage
from feddmmr.tracking.reports import compare


def _runs(uri):
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("feddmmr")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("feddmmr.kind") == "pipeline"]
    children = [r for r in runs if r.data.tags.get("feddmmr.kind") == "stage"]
    return client, parents, children


def _check_stage_run(uri, rounds):
    client, parents, children = _runs(uri)
    assert len(parents) == 1 and len(children) == 1
    child = children[0]
    assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert child.data.tags["feddmmr.stage"] == "pretrain_sasrec" and child.info.status == "FINISHED"
    assert child.data.tags["data_sha256"] and "checkpoint_sha256" in child.data.tags
    assert child.data.params["pretrain_sasrec.rounds"] == str(rounds)
    history = client.get_metric_history(child.info.run_id, "val.full.NDCG_at_10")
    assert sorted(m.step for m in history) == list(range(rounds + 1))  # round 0 .. rounds
    assert "test.sampled.HR_at_10" in child.data.metrics
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"config.json", "train_history.json"} <= artifacts
    return child


def test_stage_run_in_sqlite_store_and_compare(tiny_prepared, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = tiny_params(rounds=2)
    metrics = train_stage("pretrain_sasrec", params, tiny_prepared, tmp_path / "ck", tmp_path / "m.json", progress=False)
    child = _check_stage_run(uri, 2)
    assert child.data.metrics["test.full.HR_at_10"] == pytest.approx(metrics["test"]["full"]["HR@10"])
    table = compare()
    assert "pretrain_sasrec" in table and f"{metrics['test']['full']['HR@10']:.4f}" in table


def test_unreachable_server_fails_before_training(tiny_prepared, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://ann:s3cret@127.0.0.1:{free_port()}")
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):   # absent, and absent again afterwards
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    start = time.perf_counter()
    with pytest.raises(FeddmmrError, match=r"http://127.0.0.1:\d+ is unreachable") as err:
        train_stage("pretrain_sasrec", tiny_params(), tiny_prepared, tmp_path / "ck", tmp_path / "m.json", progress=False)
    assert "s3cret" not in str(err.value)
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "ck").exists() and not (tmp_path / "m.json").exists()


def test_a_password_in_any_message_is_masked():
    from feddmmr.errors import redact
    assert redact("store http://ann:s3cret@host:5000/x and https://b:p%40ss@h/ stay") == \
        "store http://ann:***@host:5000/x and https://b:***@h/ stay"
    assert redact("sqlite:////tmp/mlruns.db, http://host:5000") == "sqlite:////tmp/mlruns.db, http://host:5000"


def test_tracking_can_be_disabled(tiny_prepared, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    params = tiny_params(rounds=1)
    params.tracking.enabled = False
    train_stage("pretrain_sasrec", params, tiny_prepared, tmp_path / "ck", tmp_path / "m.json", progress=False)
    assert (tmp_path / "m.json").is_file()


@pytest.mark.slow
def test_real_mlflow_server(tiny_prepared, tmp_path, monkeypatch):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        wait_for_http(f"{uri}/health", proc, "mlflow server")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.chdir(tmp_path)
        train_stage("pretrain_sasrec", tiny_params(rounds=2), tiny_prepared, tmp_path / "ck", tmp_path / "m.json",
                    progress=False)
        _check_stage_run(uri, 2)
        # a URI with credentials is accepted (it was refused as unreachable) and the password is never printed
        secret = f"http://ann:s3cret@127.0.0.1:{port}"
        r = subprocess.run([sys.executable, "-m", "feddmmr", "train", "--data", str(tiny_prepared), "--out",
                            str(tmp_path / "ck2"), "--metrics", str(tmp_path / "m2.json"), "-S", "model.hidden=16",
                            "-S", "model.heads=2", "-S", "model.ffn_hidden=16", "-S", "model.blocks=1",
                            "-S", "pretrain_sasrec.rounds=1", "-S", "tracking.log_models=false"],
                           cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": secret})
        assert r.returncode == 0, r.stderr
        assert "s3cret" not in r.stdout + r.stderr and f"127.0.0.1:{port}" in r.stdout + r.stderr
        assert len(_runs(uri)[2]) == 2
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_stage_diff_reports_config_changes_and_frozen_modules(tiny_prepared, tmp_path):
    import json

    from feddmmr.io import load_tensors, save_tensors
    from feddmmr.tracking.diff import format_diff, stage_diff

    params = tiny_params(rounds=1)
    params.tracking.enabled = False
    train_stage("pretrain_sasrec", params, tiny_prepared, tmp_path / "a", tmp_path / "ma.json", progress=False)
    # a "next stage" checkpoint: item embeddings frozen (identical), the rest moved, one config key changed
    (tmp_path / "b").mkdir()
    state = load_tensors(tmp_path / "a" / "model.safetensors", "w", "")
    moved = {k: (v if k.startswith("sasrec.item_emb") else v + 0.01) for k, v in state.items()}
    save_tensors(tmp_path / "b" / "model.safetensors", moved)
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["train"]["lr"] = 0.5
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    from feddmmr.model import group_of
    diff = stage_diff(tmp_path / "a", tmp_path / "b", group_of)
    assert diff["modules"]["sasrec.item_emb"]["group"] == group_of("sasrec.item_emb.weight") != "-"
    assert diff["config"] == {"train.lr": [params.pretrain_sasrec.lr, 0.5]}
    assert diff["modules"]["sasrec.item_emb"]["changed"] is False and diff["modules"]["sasrec.item_emb"]["l2_delta"] == 0.0
    assert diff["modules"]["sasrec.blocks.0.attn"]["changed"] is True and diff["modules"]["sasrec.blocks.0.attn"]["l2_delta"] > 0
    assert "sasrec.item_emb" in format_diff(diff)


def test_later_stages_log_load_report_param_diff_and_router_curves(tiny_prepared, tmp_path, monkeypatch):
    import json

    from conftest import tiny_stage_params, write_tiny_features
    from feddmmr.data.prepare import load_prepared
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    feats = write_tiny_features(tmp_path / "features", load_prepared(tiny_prepared))
    params = tiny_stage_params(rounds=2, keep="last")  # checkpoints hold trained weights, not round 0
    for stage in ("pretrain_sasrec", "align_projectors", "finetune_moe"):
        train_stage(stage, params, tiny_prepared, tmp_path / "ck" / stage, tmp_path / f"{stage}.json",
                    progress=False, features_dir=feats)
    client, parents, children = _runs(uri)
    assert len(parents) == 1 and len(children) == 3                 # one pipeline run, a child per stage
    run = {r.data.tags["feddmmr.stage"]: r for r in children}
    align = run["align_projectors"]
    artifacts = {a.path for a in client.list_artifacts(align.info.run_id)}
    assert {"param_diff.json", "param_diff.txt", "load_report.json"} <= artifacts
    diff = json.loads(open(client.download_artifacts(align.info.run_id, "param_diff.json", str(tmp_path))).read())
    assert diff["modules"]["sasrec.item_emb"]["changed"] is False and diff["modules"]["sasrec.item_emb"]["l2_delta"] == 0
    assert all(not m["changed"] for m in diff["modules"].values())  # stage 2 leaves every stage-1 tensor untouched
    assert any(k.startswith("projections.text") for k in diff["added"])
    assert "sasrec.item_emb" in align.data.tags["unchanged_modules"]
    final = json.loads(open(client.download_artifacts(run["finetune_moe"].info.run_id, "param_diff.json",
                                                      str(tmp_path / "f"))).read())
    assert final["modules"]["sasrec.item_emb"]["changed"] is False
    assert final["modules"]["projections.text"]["changed"] is True and final["modules"]["router.mlp"]["changed"] is True
    gates = client.get_metric_history(run["finetune_moe"].info.run_id, "gating_weight")
    assert sorted(m.step for m in gates) == [0, 1, 2]
    assert client.get_metric_history(run["finetune_moe"].info.run_id, "router.w_visual")
    table = compare()
    assert all(s in table for s in ("pretrain_sasrec", "align_projectors", "finetune_moe"))
    # per-user test ranks beside each checkpoint and in MLflow: compare tests each stage against the first
    from feddmmr.io import load_tensors
    from feddmmr.evaluation.stats import paired_test, per_user
    ranks = {s: load_tensors(tmp_path / "ck" / s / "test_ranks.safetensors", "ranks", "")["full"].numpy()
             for s in run}
    users = load_prepared(tiny_prepared).num_users
    assert all(r.shape == (users,) and r.min() >= 1 for r in ranks.values())
    written = json.loads((tmp_path / "finetune_moe.json").read_text())["test"]["full"]
    assert per_user(ranks["finetune_moe"], "NDCG@10").mean() == pytest.approx(written["NDCG@10"], abs=1e-12)
    for stage in ("align_projectors", "finetune_moe"):
        want = paired_test(ranks["pretrain_sasrec"], ranks[stage], "NDCG@10").describe()
        assert f"  {stage}: {want}" in table.splitlines()
    # an ad-hoc stage 1 beside the pipeline (same commit and data, another --out) is not the pipeline's stage 1
    from feddmmr.tracking.registry import CHAMPION, REGISTERED_MODEL
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION).version
    params.pretrain_sasrec.rounds = 1
    train_stage("pretrain_sasrec", params, tiny_prepared, tmp_path / "ck7" / "typo", tmp_path / "typo.json",
                progress=False)
    assert compare() == table
    assert client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION).version == champion
    parent = parents[0]
    for name in (parent.info.run_name, parent.info.run_id, parent.data.tags["feddmmr.pipeline_key"]):
        assert compare(name) == table                  # the names a user sees all find it
    with pytest.raises(FeddmmrError, match="a pipeline run is named by letters"):
        compare("x'y")


def test_a_signal_during_a_store_write_waits_for_the_write(tmp_path, monkeypatch):
    """SIGTERM/Ctrl-C inside an sqlite write could leave the store locked and the run RUNNING forever:
    the write finishes first, then the interrupt ends the run, which is marked KILLED."""
    from feddmmr import interrupts
    from feddmmr.tracking.run import StageRun
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")
    saved = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    interrupts.install()
    try:
        run = StageRun("pretrain_sasrec", {"a": 1}, {"source_sha256": {}}, output=tmp_path / "ck")
        real = run.client.log_batch

        def interrupted_write(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)   # the signal lands mid-write
            time.sleep(0.05)
            real(*args, **kwargs)

        monkeypatch.setattr(run.client, "log_batch", interrupted_write)
        with pytest.raises(KeyboardInterrupt):
            run.sync(lambda step: {"loss": 1.5}, upto=0)
        run.fail("KILLED")
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])
    assert run.tracked_round == 0
    assert [m.value for m in run.client.get_metric_history(run.run_id, "loss")] == [1.5]
    assert run.client.get_run(run.run_id).info.status == "KILLED"


def test_the_default_store_is_the_projects_even_from_a_dvc_temp_copy(tmp_path, monkeypatch):
    """`dvc exp run --temp`, queued experiments and flow-run workspaces run in copies under <project>/.dvc/tmp/:
    their MLflow runs land in the project's store, not in a folder that is deleted afterwards."""
    from feddmmr.tracking.store import project_root, tracking_uri
    copy = tmp_path / "project" / ".dvc" / "tmp" / "exps" / "run" / "abc123"
    copy.mkdir(parents=True)
    assert project_root(copy) == tmp_path / "project"
    assert project_root(tmp_path / "project") == tmp_path / "project"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(copy)
    assert tracking_uri() == f"sqlite:///{tmp_path / 'project' / 'mlruns.db'}"


def test_a_store_whose_disk_fills_mid_stage_is_one_warning_and_records_the_rest_later(tiny_prepared, tmp_path,
                                                                                        small_disk):
    """Before: 997 lines and 22 tracebacks (MLflow's, one per retry), and a summary that never said 'disk full'."""
    disk = small_disk("8m")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{disk / 'store.db'}", "PYTHONWARNINGS": "ignore"}
    tiny = ["-S", "model.hidden=16", "-S", "model.heads=2", "-S", "model.ffn_hidden=16", "-S", "model.blocks=1",
            "-S", "pretrain_sasrec.patience=100", "-S", "tracking.log_models=false"]

    def train(out, rounds):
        return subprocess.run([sys.executable, "-m", "feddmmr", "train", "--data", str(tiny_prepared), "--out",
                               str(tmp_path / out), "--metrics", str(tmp_path / f"{out}.json"), *tiny,
                               "-S", f"pretrain_sasrec.rounds={rounds}"], cwd=tmp_path, capture_output=True,
                              text=True, env=env)
    full = train("first", 1)
    assert full.returncode == 0, full.stderr
    filler = disk / "filler"

    def fill():
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                pass
    fill()                                                        # full before the stage starts: one line, the cause
    full = train("ck", 6)
    assert full.returncode == 2 and "the store's disk is full" in full.stderr.splitlines()[-1], full.stderr
    filler.unlink()
    proc = subprocess.Popen([sys.executable, "-m", "feddmmr", "train", "--data", str(tiny_prepared), "--out",
                             str(tmp_path / "ck"), "--metrics", str(tmp_path / "ck.json"), *tiny,
                             "-S", "pretrain_sasrec.rounds=30"], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            env=env)
    lines = []
    for line in proc.stderr:                                      # the run is created: now the disk fills up
        lines.append(line)
        if line.startswith("MLflow: pretrain_sasrec run"):
            fill()
            break
    lines += proc.stderr.readlines()
    proc.wait(timeout=300)
    r = subprocess.CompletedProcess(proc.args, proc.returncode, "", "".join(lines))
    assert r.returncode == 4, r.stderr                            # trained and written, not fully recorded
    other = [line for line in r.stderr.splitlines() if not line.startswith("pretrain_sasrec round ")]
    assert "Traceback" not in r.stderr and len(other) < 8, r.stderr  # one line a round, and a few more
    warnings = [line for line in r.stderr.splitlines() if "did not record" in line]
    assert len(warnings) == 2 and all("disk is full" in line for line in warnings)   # one warning, one error line
    filler.unlink()
    again = train("ck", 30)                                       # the store has room again: the rest is recorded
    assert again.returncode == 0, again.stderr
    client, _, children = _runs(f"sqlite:///{disk / 'store.db'}")
    run = next(c for c in children if c.data.tags["feddmmr.output"].endswith("/ck"))
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val.full.NDCG_at_10")) == list(range(31))


def test_the_champion_moves_only_to_a_better_model_on_the_same_data_and_never_to_a_candidate(tmp_path, monkeypatch):
    """A 2/1/1-round flow run with overrides (validation NDCG@10 0.137) used to replace a full run's (0.498)."""
    from feddmmr.tracking.registry import CHAMPION, crown_champion, REGISTERED_MODEL, SELECTION
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("feddmmr")
    client.create_registered_model(REGISTERED_MODEL)

    def pipeline(score, data="A", candidate=False):
        parent = client.create_run(exp, tags={"feddmmr.kind": "pipeline"}).info.run_id
        tags = {"mlflow.parentRunId": parent, "feddmmr.kind": "stage", "feddmmr.stage": "pretrain_sasrec",
                "prepared_sha256": data, **({"feddmmr.candidate": "true"} if candidate else {})}
        run = client.create_run(exp, tags=tags).info.run_id
        client.log_metric(run, SELECTION, score)
        version = client.create_model_version(REGISTERED_MODEL, f"file://{tmp_path}/m", run_id=run).version
        return str(version), crown_champion(client, exp, parent)

    def champion():
        v = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
        return str(v.version), v.tags.get("champion_reason", "")

    full, crowned = pipeline(0.498)
    assert crowned == full and champion() == (full, "the first champion: validation full NDCG@10 0.4980")
    quick, crowned = pipeline(0.137)                                       # worse: the champion stays
    assert crowned == full and champion()[0] == full
    override, crowned = pipeline(0.9, candidate=True)                     # better, but a candidate
    assert crowned == full and champion()[0] == full
    other, crowned = pipeline(0.9, data="B")                              # other data: not comparable
    assert crowned == full and champion()[0] == full
    better, crowned = pipeline(0.6)
    assert crowned == better and "0.6000 beat version" in champion()[1] and f"version {full}'s 0.4980" in champion()[1]
    r = subprocess.run([sys.executable, "-m", "feddmmr", "promote", override, "--reason", "ablation winner"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and champion() == (override, "ablation winner"), r.stderr
    r = subprocess.run([sys.executable, "-m", "feddmmr", "promote", "999"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "no version '999' of the registered model feddmmr" in r.stderr


def test_a_train_command_with_overrides_or_its_own_output_is_a_candidate(tmp_path, monkeypatch):
    from feddmmr.cli import build_parser
    from feddmmr.config import Params
    from feddmmr.tracking.run import CANDIDATE_ENV, is_candidate
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(CANDIDATE_ENV, "")     # absent now, and absent again afterwards: _train sets it below
    monkeypatch.delenv(CANDIDATE_ENV)
    assert not is_candidate()                                        # not a git work tree: nothing to compare with
    subprocess.run(["git", "init", "-q"], check=True)
    (tmp_path / "params.yaml").write_text("pretrain_sasrec:\n  rounds: 3\n")
    subprocess.run(["git", "add", "params.yaml"], check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "p"], check=True)
    assert not is_candidate()
    (tmp_path / "params.yaml").write_text("pretrain_sasrec:\n  rounds: 1\n")     # a DVC experiment's -S, an edit
    assert is_candidate()
    from feddmmr import cli
    seen = []
    monkeypatch.setattr("feddmmr.training.stages.train_stage", lambda *a, **k: seen.append(os.environ.get(CANDIDATE_ENV)) or dict.fromkeys(
        ("stage", "best_round", "seconds_per_round", "test")))
    for argv, expected in ((["train"], None), (["train", "--out", "checkpoints/pretrain_sasrec"], None),
                           (["train", "--out", "ck7/typo"], "1"), (["train", "-S", "pretrain_sasrec.rounds=2"], "1")):
        monkeypatch.delenv(CANDIDATE_ENV, raising=False)
        cli._train(build_parser().parse_args(argv), Params())
        assert seen.pop() == expected, argv


def test_compare_shows_the_popularity_floor_that_dvc_restored(tiny_prepared, tmp_path, monkeypatch):
    """A pipeline run whose popularity stage DVC restored (no run of its own) used to lose that column."""
    from feddmmr.training.baselines import run_baseline
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")
    params = tiny_params(rounds=1)
    params.tracking.log_models = False
    monkeypatch.setenv("FEDDMMR_PIPELINE_RUN", "first")
    floor = run_baseline("popularity", params, tiny_prepared, tmp_path / "pop", tmp_path / "pop.json")
    monkeypatch.setenv("FEDDMMR_PIPELINE_RUN", "second")             # the next run: popularity restored by DVC
    train_stage("pretrain_sasrec", params, tiny_prepared, tmp_path / "ck", tmp_path / "m.json", progress=False)
    table = compare("second").splitlines()
    assert table[1].split() == ["metric", "popularity", "pretrain_sasrec"]
    row = next(line for line in table if line.startswith("test.full.NDCG_at_10"))
    assert f"{floor['test']['full']['NDCG@10']:.4f}" in row


def test_mlflow_links_open_the_model_training_view(monkeypatch):
    """MLflow 3.17's UI opens an experiment in its GenAI view unless the link asks for the training view."""
    from feddmmr.tracking.store import ui_url
    monkeypatch.delenv("FEDDMMR_MLFLOW_UI", raising=False)
    assert ui_url("1", "abc", "sqlite:////p/mlruns.db") == \
        "http://127.0.0.1:5000/#/experiments/1/runs/abc?workflowType=machine_learning"
    assert ui_url("7", uri="http://mlflow.lab:8080/") == "http://mlflow.lab:8080/#/experiments/7?workflowType=machine_learning"
    monkeypatch.setenv("FEDDMMR_MLFLOW_UI", "http://127.0.0.1:5001/")
    assert ui_url("7", uri="http://mlflow:5000").startswith("http://127.0.0.1:5001/#/experiments/7?")
