"""The centralized counterpart: the stage-1 model on the pooled windows, recorded like a stage, resumable."""
import json

import pytest
import torch

from conftest import tiny_params
from feddmmr.training.baselines import run_baseline
from feddmmr.training.centralized import train_centralized
from feddmmr.data.prepare import load_prepared
from feddmmr.evaluation.metrics import Evaluator
from feddmmr.training.checkpoint import load_checkpoint


def _params():
    p = tiny_params()
    p.tracking.enabled = False
    c = p.centralized
    c.epochs, c.batch_size, c.num_negatives, c.lr, c.patience = 4, 8, 4, 0.01, 10
    return p


def test_centralized_trains_evaluates_and_writes_a_loadable_checkpoint(tiny_prepared, tmp_path):
    p = _params()
    metrics = train_centralized(p, tiny_prepared, tmp_path / "ck", tmp_path / "m.json", progress=False)
    history = json.loads((tmp_path / "ck" / "train_history.json").read_text())
    assert metrics["rounds_run"] == 4 and len(history["train_loss"]) == 5
    assert history["train_loss"][4] < history["train_loss"][1]             # it learns
    assert metrics["val"] == history["val"][metrics["best_round"]]
    data = load_prepared(tiny_prepared)
    model, config, _ = load_checkpoint(tmp_path / "ck", data)
    assert config["stage"] == "centralized"
    assert Evaluator(data, p.evaluation.ks, p.evaluation.batch_size).evaluate(model, "test") == metrics["test"]
    assert (tmp_path / "ck" / "test_ranks.safetensors").is_file()


def test_centralized_says_each_epoch_and_its_early_stop_as_the_stages_do(tiny_prepared, tmp_path, caplog):
    p = _params()
    p.centralized.epochs, p.centralized.patience, p.centralized.lr = 30, 1, 0.5   # a large step: stops early
    with caplog.at_level("INFO", logger="feddmmr"):
        metrics = train_centralized(p, tiny_prepared, tmp_path / "ck", tmp_path / "m.json", progress=False)
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("centralized epoch ")]
    assert len(epochs) == metrics["rounds_run"] < 30 and "val full/NDCG@10" in epochs[0]
    assert f"centralized: early stop at epoch {metrics['rounds_run']} (best epoch {metrics['best_round']})" in \
        caplog.messages


def test_a_killed_centralized_run_resumes_after_its_last_epoch(tiny_prepared, tmp_path, monkeypatch):
    import feddmmr.training.centralized as central
    clean = train_centralized(_params(), tiny_prepared, tmp_path / "clean", tmp_path / "clean.json", progress=False)
    real, calls = central._train_epoch, []

    def dies_in_epoch_3(*args):
        calls.append(args[3])
        if args[3] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(central, "_train_epoch", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_centralized(_params(), tiny_prepared, tmp_path / "ck", tmp_path / "m.json", progress=False)
    assert not (tmp_path / "ck").exists() and calls == [1, 2, 3]
    monkeypatch.setattr(central, "_train_epoch", lambda *args: calls.append(args[3]) or real(*args))
    again = train_centralized(_params(), tiny_prepared, tmp_path / "ck", tmp_path / "m.json", progress=False)
    assert calls == [1, 2, 3, 3, 4]                                          # epochs 1-2 were not trained again
    assert again == clean
    a, b = (load_checkpoint(tmp_path / d, load_prepared(tiny_prepared))[0].state_dict() for d in ("ck", "clean"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_epoch_mixes_every_users_windows_once(tiny_prepared):
    from feddmmr.training.centralized import _epoch_windows
    from feddmmr.federated.client import ClientPool
    pool = ClientPool(load_prepared(tiny_prepared))
    c = _params().centralized
    batches = _epoch_windows(pool, 1, c, torch.Generator().manual_seed(0))
    x = torch.cat([b[0] for b in batches])
    assert sorted(map(tuple, x.tolist())) == sorted(map(tuple, pool.win_x.tolist()))   # each window once
    owner = {tuple(row): u for u in range(len(pool.win_start) - 1)
             for row in pool.win_x[pool.win_start[u]: pool.win_start[u + 1]].tolist()}
    first = {owner[tuple(row)] for row in batches[0][0].tolist()}
    assert len(first) > 2                                                   # not grouped by user
    assert all(len(b[0]) == c.batch_size for b in batches[:-1])


@pytest.mark.parametrize("trainer", ["centralized", "popularity", "pretrain_sasrec"])
def test_every_trainer_marks_an_interrupted_run_killed_and_a_failed_one_failed(trainer, tiny_prepared, tmp_path,
                                                                              monkeypatch):
    """One epilogue for the three trainers (StageRun.recording): centralized and the baselines marked a Ctrl-C
    FAILED where the federated stages marked it KILLED."""
    import mlflow

    import feddmmr.evaluation.metrics as metrics
    from feddmmr.training.stages import train_stage
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    p = _params()
    p.tracking.enabled, p.tracking.log_models, p.pretrain_sasrec.rounds = True, False, 1

    def run(out):
        if trainer == "pretrain_sasrec":
            return train_stage(trainer, p, tiny_prepared, tmp_path / out, tmp_path / f"{out}.json", progress=False)
        if trainer == "centralized":
            return train_centralized(p, tiny_prepared, tmp_path / out, tmp_path / f"{out}.json", progress=False)
        return run_baseline(trainer, p, tiny_prepared, tmp_path / out, tmp_path / f"{out}.json")

    for error, status in ((KeyboardInterrupt, "KILLED"), (RuntimeError, "FAILED")):
        def fails(*args, **kwargs):
            raise error()
        if trainer == "centralized":   # its epoch-0 validation runs before its MLflow run starts
            import feddmmr.training.centralized as central
            monkeypatch.setattr(central, "_train_epoch", fails)
        else:
            monkeypatch.setattr(metrics.Evaluator, "evaluate", fails)
        with pytest.raises(error):
            run(status)
        client = mlflow.MlflowClient(uri)
        exp = client.get_experiment_by_name("feddmmr")
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`feddmmr.output` = '{tmp_path / status}'")
        assert [r.info.status for r in runs] == [status]
