"""Using the trained model: `feddmmr recommend`, the registered MLflow model, and `mlflow models serve`."""
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from conftest import free_port, tiny_stage_params, wait_for_http, write_tiny_features
from feddmmr.config import MemoryParams
from feddmmr.data.prepare import load_prepared
from feddmmr.errors import FeddmmrError
from feddmmr.model.memory import MemoryBank
from feddmmr.evaluation.metrics import Evaluator
from feddmmr.serving.recommend import Recommender
from feddmmr.tracking.registry import CHAMPION, REGISTERED_MODEL
from feddmmr.training.stages import train_stage

STAGES = ("pretrain_sasrec", "finetune_moe")   # the 2-stage path: one id-only and one multimodal model


@pytest.fixture(scope="module")
def trained(tiny_csv, tiny_prepared, tmp_path_factory):
    """Both stages trained with MLflow on (sqlite store), each logging and registering its model."""
    root = tmp_path_factory.mktemp("recommend")
    feats = write_tiny_features(root / "features", load_prepared(tiny_prepared))
    p = tiny_stage_params(rounds=3)
    p.prepare.path = str(tiny_csv)                 # items.csv beside it gives the titles
    p.finetune_moe.init_from = "pretrain_sasrec"
    uri = f"sqlite:///{root / 'store.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        metrics = {s: train_stage(s, p, tiny_prepared, root / "checkpoints" / s, root / f"{s}.json", progress=False,
                                  features_dir=feats) for s in STAGES}
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI") if old is None else os.environ.__setitem__("MLFLOW_TRACKING_URI", old)
    assert mlflow.get_tracking_uri() != uri, "logging a model left MLflow's process-wide tracking URI on its store"
    return {"root": root, "features": feats, "uri": uri, "metrics": metrics, "csv": tiny_csv}


def recommender(trained, tiny_prepared, stage):
    from feddmmr.data.items import item_titles
    from feddmmr.config import PrepareParams
    titles = item_titles(PrepareParams(source="csv", path=str(trained["csv"])))
    return Recommender.load(trained["root"] / "checkpoints" / stage, tiny_prepared, trained["features"], titles)


def with_next_item(data, nxt):
    """The prepared data with item nxt[u] appended to every user's sequence: its test split asks the evaluator
    to rank nxt[u] given the user's whole history, exactly what `recommend` scores."""
    seqs = [np.append(data.sequence(u), nxt[u]) for u in range(data.num_users)]
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
    return replace(data, items=np.concatenate(seqs), offsets=offsets)


@pytest.mark.parametrize("stage", STAGES)
def test_known_user_top_k_is_the_top_of_the_evaluators_full_ranking(trained, tiny_prepared, stage):
    rec = recommender(trained, tiny_prepared, stage)
    data, k = rec.data, 5
    top = rec.for_users([int(u) for u in data.user_raw], k=k)
    assert len(top) == k * data.num_users and top["title"].str.len().gt(0).all()
    index = {int(raw): i for i, raw in enumerate(data.item_raw, start=1)}
    for rank in range(1, k + 1):
        nxt = [index[i] for i in top[top["rank"] == rank].sort_values("request")["item"]]
        assert not any(n in data.sequence(u) for u, n in enumerate(nxt))       # known items are excluded
        evaluator = Evaluator(with_next_item(data, nxt), [k])
        full, _ = evaluator.ranks(rec.model, "test", rec.memory)
        assert full.tolist() == [rank] * data.num_users, rank


def test_a_new_users_history_is_a_known_user_with_an_empty_memory(trained, tiny_prepared):
    rec = recommender(trained, tiny_prepared, "finetune_moe")
    data = rec.data
    user = int(np.argmax([len(rec.memory.retrieve([u])[0].nonzero()) for u in range(data.num_users)]))
    history = [int(data.item_raw[i - 1]) for i in data.sequence(user)]
    new = rec.for_histories([history], k=8)
    remembered = rec.for_users([int(data.user_raw[user])], k=8)
    memory = json.loads((trained["root"] / "checkpoints" / "finetune_moe" / "config.json").read_text())["memory"]
    rec.memory = MemoryBank(data.num_users, MemoryParams(**memory))              # every client forgets
    forgotten = rec.for_users([int(data.user_raw[user])], k=8)
    assert new["item"].tolist() == forgotten["item"].tolist()
    assert np.allclose(new["score"], forgotten["score"], atol=1e-5)
    assert not np.allclose(remembered["score"], forgotten["score"], atol=1e-5)   # the memory is read
    assert (new["user"] == -1).all()


def test_include_known_and_one_line_errors(trained, tiny_prepared, tmp_path):
    rec = recommender(trained, tiny_prepared, "pretrain_sasrec")
    user = int(rec.data.user_raw[0])
    known = {int(rec.data.item_raw[i - 1]) for i in rec.data.sequence(0)}
    everything = rec.for_users([user], k=rec.data.num_items, include_known=True)
    assert len(everything) == rec.data.num_items and known <= set(everything["item"])
    assert len(rec.for_users([user], k=rec.data.num_items)) == rec.data.num_items - len(known)
    ckpt = trained["root"] / "checkpoints" / "pretrain_sasrec"
    base = ["recommend", "--checkpoint", str(ckpt), "--data", str(tiny_prepared)]
    for args, message in ((["--user", "987654"], "unknown user id 987654"),
                          (["--history", "3,987654"], "unknown item id 987654"),
                          (["--history", "3,x"], "--history '3,x'"),
                          (["--users", str(tmp_path / "none.txt")], "users file not found"),
                          (["--user", str(user), "-k", "0"], "k must be at least 1"),
                          (["--history", ""], "--history ''"),
                          (["--users", "users.json"], "users.json: not a list of user ids (user id 1.5 is not an "
                                                      "integer id"),
                          (["--users", "latin1.txt"], "latin1.txt is not UTF-8 text"),
                          (["--user", str(user), "--out", "."], "cannot use . as an output")):
        (tmp_path / "users.json").write_text(f"[{user}, 1.5]")
        (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
        r = cli(*base, *args, cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"feddmmr: error: {message}"), r.stderr
        assert "Traceback" not in r.stderr


def test_ids_that_are_not_integers_are_refused_never_truncated(trained, tiny_prepared):
    """A JSON user id 1.5 used to be served as user 1."""
    rec = recommender(trained, tiny_prepared, "pretrain_sasrec")
    user, item = int(rec.data.user_raw[0]), int(rec.data.item_raw[0])
    assert rec.for_users([float(user)], k=3)["item"].tolist() == rec.for_users([user], k=3)["item"].tolist()
    for bad in (user + 0.5, True, "1e3", [user]):
        with pytest.raises(FeddmmrError, match="is not an integer id"):
            rec.for_users([bad], k=3)
    with pytest.raises(FeddmmrError, match="item id 2.5 is not an integer id"):
        rec.for_histories([[item, 2.5]], k=3)


def cli(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "feddmmr", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def test_a_checkpoint_loads_with_the_modalities_it_was_trained_with(trained, tiny_prepared, monkeypatch):
    """A modality added to the registry after training (here "audio", whose features do not exist) leaves every
    existing checkpoint loadable: the model is rebuilt with the modalities of its own config, in their order,
    and only their features are read."""
    import feddmmr.features.store as store
    import feddmmr.training.checkpoint as checkpoint
    from feddmmr.modalities import NAMES, QUERY
    monkeypatch.setitem(QUERY, "audio", "feature")
    for module in (store, checkpoint):
        monkeypatch.setattr(module, "NAMES", (*NAMES, "audio"))
    before = recommender(trained, tiny_prepared, "finetune_moe")
    assert before.model.modalities == list(NAMES) and not (trained["features"] / "audio").exists()
    top = before.for_users([int(before.data.user_raw[0])], k=3)
    assert len(top) == 3


def test_each_stage_registers_a_version_and_the_champion_is_the_best_stage(trained):
    client = mlflow.MlflowClient(trained["uri"])
    versions = {v.tags["stage"]: v for v in client.search_model_versions(f"name='{REGISTERED_MODEL}'")}
    assert set(versions) == set(STAGES)
    for stage, v in versions.items():
        run = client.get_run(v.run_id)
        assert run.data.tags["feddmmr.stage"] == stage and run.info.status == "FINISHED"
        assert v.source.startswith("models:/m-")
        logged = client.get_logged_model(v.source.removeprefix("models:/"))
        assert logged.source_run_id == v.run_id and logged.name == stage
        outputs = [o.model_id for o in run.outputs.model_outputs]
        assert outputs == [logged.model_id]                # the run page's "Logged models" links it
        assert run.data.tags["mlflow.source.name"].startswith("feddmmr ")    # the UI's "Source"
    assert "`champion`" in client.get_registered_model(REGISTERED_MODEL).description
    best = max(STAGES, key=lambda s: (trained["metrics"][s]["val"]["full"]["NDCG@10"], STAGES.index(s)))
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    assert champion.version == versions[best].version


def test_the_registered_model_recommends_what_the_cli_does(trained, tiny_prepared, tmp_path):
    env = {"MLFLOW_TRACKING_URI": trained["uri"]}
    champion = mlflow.MlflowClient(trained["uri"]).get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    ckpt = trained["root"] / "checkpoints" / champion.tags["stage"]
    users = tmp_path / "users.txt"
    users.write_text("user\n" + "\n".join(str(u) for u in load_prepared(tiny_prepared).user_raw[:7]) + "\n")
    common = ["--users", str(users), "-k", "4", "-S", f"prepare.path={trained['csv']}"]
    a = cli("recommend", "--model", f"models:/{REGISTERED_MODEL}@{CHAMPION}", *common, "--out", "a.json",
            cwd=tmp_path, env=env)
    b = cli("recommend", "--checkpoint", str(ckpt), "--data", str(tiny_prepared), "--features",
            str(trained["features"]), *common, "--out", "b.json", cwd=tmp_path)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    from_registry, from_checkpoint = (pd.read_json(tmp_path / f) for f in ("a.json", "b.json"))
    assert len(from_registry) == 28 and from_registry["title"].str.len().gt(0).all()
    pd.testing.assert_frame_equal(from_registry, from_checkpoint, atol=1e-5)
    one = cli("recommend", "--model", f"models:/{REGISTERED_MODEL}@{CHAMPION}", "--history", "3,5,8", "-k", "3",
              cwd=tmp_path, env=env)
    assert one.returncode == 0 and "top 3 for a new user" in one.stdout and len(one.stdout.splitlines()) == 5
    missing = cli("recommend", "--model", f"models:/{REGISTERED_MODEL}@nope", "--user", "1", cwd=tmp_path, env=env)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "feddmmr: error: MLflow model models:/feddmmr@nope cannot be loaded" in missing.stderr


def test_mlflow_models_serve_answers_on_loopback(trained, tiny_prepared, tmp_path):
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)   # uvicorn, beside this interpreter
    env = {**os.environ, "MLFLOW_TRACKING_URI": trained["uri"], "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m",
                               f"models:/{REGISTERED_MODEL}@{CHAMPION}", "--env-manager", "local", "-h", "127.0.0.1",
                               "-p", str(port)], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, "mlflow models serve")
        users = [int(u) for u in load_prepared(tiny_prepared).user_raw[:3]]
        answer = post(port, {"dataframe_records": [{"user": u} for u in users], "params": {"k": 2}})
        champion = mlflow.MlflowClient(trained["uri"]).get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
        expected = recommender(trained, tiny_prepared, champion.tags["stage"]).for_users(users, k=2)
        got = pd.DataFrame(answer["predictions"])
        assert got[["user", "rank", "item", "title"]].equals(expected[["user", "rank", "item", "title"]])
        new = post(port, {"dataframe_records": [{"history": [3, 5, 8]}], "params": {"k": 3}})
        assert [r["rank"] for r in new["predictions"]] == [1, 2, 3]
        with pytest.raises(urllib.error.HTTPError) as bad:
            post(port, {"dataframe_records": [{"user": 987654}]})
        error = json.loads(bad.value.read())
        assert bad.value.code == 400 and "unknown user id 987654" in error["message"] and "stack_trace" not in error
        with pytest.raises(urllib.error.HTTPError) as bad:                  # was served as user 1
            post(port, {"dataframe_records": [{"user": users[0] + 0.5}]})
        assert bad.value.code == 400 and "stack_trace" not in json.loads(bad.value.read())
        for records, message in (([{"user": users[0]}, {"history": [3]}], "one request holds one kind"),
                                 ([{"history": "123"}], "a history is a list of original item ids"),
                                 ([{"history": [3, 5.5]}], "item id 5.5 is not an integer id")):
            with pytest.raises(urllib.error.HTTPError) as bad:
                post(port, {"dataframe_records": records})
            error = json.loads(bad.value.read())
            assert bad.value.code == 400 and message in error["message"] and "stack_trace" not in error, error
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)


def post(port, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())
