"""Training stages: what each stage builds, trains and writes.

Stage 1 ``pretrain_sasrec``: SASRec over item ids only, every parameter trainable, federated.

A stage writes, atomically, a checkpoint directory:
    model.safetensors   the best round's global weights (no pickle)
    config.json         model shape, data fingerprint and the stage's parameters
    train_history.json  per-round loss, validation metrics (both protocols), clients, seconds
and a DVC metrics file with the best round's validation and test metrics.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .config import Params, TrainParams, resolve_device
from .data import Prepared, load_prepared
from .errors import FeddmmrError
from .federated import EXECUTORS, ClientPool, ServerOptimizer, select_clients
from .io import atomic_dir, read_json, save_tensors, write_json
from .metrics import Evaluator, pick
from .model import SASRec
from .tracking import StageRun, flatten

log = logging.getLogger("feddmmr")
STAGES = ("pretrain_sasrec",)


def build_model(params: Params, data: Prepared) -> SASRec:
    mp = params.model
    return SASRec(num_items=data.num_items, max_seq_len=data.max_seq_len, hidden=mp.hidden, blocks=mp.blocks,
                  heads=mp.heads, ffn_hidden=mp.ffn_hidden, dropout=mp.dropout)


def _check_train_params(tp: TrainParams, stage: str, ks: list[int]) -> None:
    if tp.executor not in EXECUTORS:
        raise FeddmmrError(f"{stage}.executor must be one of {', '.join(EXECUTORS)}, got {tp.executor!r}")
    if not 0 < tp.client_fraction <= 1:
        raise FeddmmrError(f"{stage}.client_fraction must be in (0, 1], got {tp.client_fraction}")
    for key in ("rounds", "local_epochs", "batch_size", "num_negatives", "clients_per_chunk"):
        if getattr(tp, key) < 1:
            raise FeddmmrError(f"{stage}.{key} must be >= 1, got {getattr(tp, key)}")
    if tp.optimizer not in ("adam", "sgd"):
        raise FeddmmrError(f"{stage}.optimizer must be adam or sgd, got {tp.optimizer!r}")
    if tp.server_optimizer not in ("adam", "sgd"):
        raise FeddmmrError(f"{stage}.server_optimizer must be sgd or adam, got {tp.server_optimizer!r}")
    if tp.loss not in ("ce", "bpr"):
        raise FeddmmrError(f"{stage}.loss must be ce or bpr, got {tp.loss!r}")
    protocol, _, metric = tp.selection_metric.partition("/")
    names = {f"{m}@{k}" for m in ("HR", "NDCG") for k in ks} | {"MRR"}
    if protocol not in ("full", "sampled") or metric not in names:
        raise FeddmmrError(f"{stage}.selection_metric must be full/ or sampled/ followed by one of "
                           f"{', '.join(sorted(names))}; got {tp.selection_metric!r}")


def train_stage(stage: str, params: Params, data_dir: str | Path, out_dir: str | Path, metrics_path: str | Path,
                progress: bool = True) -> dict:
    """Train ``stage`` federatedly, keep the best validation round, write checkpoint and metrics."""
    if stage not in STAGES:
        raise FeddmmrError(f"unknown stage {stage!r}; available: {', '.join(STAGES)}")
    tp: TrainParams = getattr(params, stage)
    _check_train_params(tp, stage, params.evaluation.ks)
    data = load_prepared(data_dir)
    tracker = StageRun(stage, flatten({"model": asdict(params.model), stage: asdict(tp),
                                       "evaluation": asdict(params.evaluation), "data": {"dir": str(data_dir)}}),
                       data.meta, enabled=params.tracking.enabled)
    try:
        return _train(stage, params, tp, data, data_dir, out_dir, metrics_path, progress, tracker)
    except BaseException:
        tracker.fail()
        raise


def _round_metrics(val: dict, prefix: str = "val") -> dict[str, float]:
    return {f"{prefix}.{k}": v for k, v in flatten(val).items()}


def _train(stage: str, params: Params, tp: TrainParams, data: Prepared, data_dir, out_dir, metrics_path,
           progress: bool, tracker: StageRun) -> dict:
    torch.manual_seed(tp.seed)
    device = resolve_device(tp.device, stage)
    model = build_model(params, data).to(device)
    pool = ClientPool(data)
    evaluator = Evaluator(data, params.evaluation.ks, params.evaluation.batch_size)
    executor = EXECUTORS[tp.executor]
    server = ServerOptimizer(tp.server_optimizer, tp.server_lr, tp.server_momentum)

    val0 = evaluator.evaluate(model, "val")
    tracker.log_metrics(_round_metrics(val0), step=0)
    history = {"round": [0], "train_loss": [None], "val": [val0], "clients": [0], "seconds": [0.0]}
    best_score, best_round = pick(val0, tp.selection_metric), 0
    best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with logging_redirect_tqdm():
        bar = tqdm(range(1, tp.rounds + 1), desc=stage, unit="round", disable=not progress, dynamic_ncols=True)
        for rnd in bar:
            t0 = time.perf_counter()
            clients = select_clients(data.num_users, tp.client_fraction, rnd, tp.seed)
            model.train()
            result = executor(model, clients, pool, rnd, tp)
            model.load_state_dict(server.step({k: v.detach() for k, v in model.state_dict().items()}, result.state))
            val = evaluator.evaluate(model, "val")
            seconds = time.perf_counter() - t0
            score = pick(val, tp.selection_metric)
            for key, value in (("round", rnd), ("train_loss", result.train_loss), ("val", val),
                               ("clients", result.clients), ("seconds", seconds)):
                history[key].append(value)
            if score > best_score:
                best_score, best_round = score, rnd
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            tracker.log_metrics({"train_loss": result.train_loss, "round_seconds": seconds, **_round_metrics(val)}, rnd)
            bar.set_postfix(loss=f"{result.train_loss:.3f}", **{tp.selection_metric: f"{score:.4f}"}, best=best_round)
            log.info("%s round %d: loss %.4f val %s %.4f (%.1fs, %d clients)", stage, rnd, result.train_loss,
                     tp.selection_metric, score, seconds, result.clients)
            if rnd - best_round >= tp.patience:
                log.info("%s: early stop at round %d (best round %d)", stage, rnd, best_round)
                break
        bar.close()

    model.load_state_dict(best_state)
    test = evaluator.evaluate(model, "test")
    history["best_round"] = best_round
    history["test"] = test
    train_seconds = history["seconds"][1:]
    metrics = {
        "stage": stage,
        "best_round": best_round,
        "rounds_run": len(train_seconds),
        "seconds_per_round": sum(train_seconds) / max(1, len(train_seconds)),
        "val": history["val"][best_round],
        "test": test,
    }
    config = {
        "stage": stage,
        "model": asdict(params.model),
        "num_items": data.num_items,
        "max_seq_len": data.max_seq_len,
        "num_users": data.num_users,
        "train": asdict(tp),
        "data": {"dir": str(data_dir), "source_sha256": data.meta["source_sha256"],
                 "num_interactions": data.meta["num_interactions"]},
        "best_round": best_round,
        "torch": torch.__version__,
    }
    with atomic_dir(out_dir) as tmp:
        save_tensors(tmp / "model.safetensors", model.state_dict(), metadata={"stage": stage})
        write_json(tmp / "config.json", config)
        write_json(tmp / "train_history.json", history)
    write_json(metrics_path, metrics)
    tracker.finish({"best_round": best_round, **_round_metrics(test, "test"), **_round_metrics(metrics["val"], "best_val")},
                   [Path(out_dir) / "config.json", Path(out_dir) / "train_history.json", Path(metrics_path)], Path(out_dir))
    return metrics


def load_checkpoint(ckpt_dir: str | Path, data: Prepared | None = None) -> tuple[SASRec, dict]:
    """Rebuild the model of a stage checkpoint and load every tensor, failing on any mismatch."""
    ckpt_dir = Path(ckpt_dir)
    fix = "re-run the stage that writes it (`dvc repro`)"
    config = read_json(ckpt_dir / "config.json", "checkpoint config")
    if data is not None and (data.num_items != config["num_items"] or data.max_seq_len != config["max_seq_len"]):
        raise FeddmmrError(f"{ckpt_dir} was trained on {config['num_items']} items / L={config['max_seq_len']}, "
                           f"but the prepared data has {data.num_items} items / L={data.max_seq_len}; {fix}")
    from .io import load_tensors
    state = load_tensors(ckpt_dir / "model.safetensors", "checkpoint weights", fix)
    mp = config["model"]
    model = SASRec(num_items=config["num_items"], max_seq_len=config["max_seq_len"], hidden=mp["hidden"],
                   blocks=mp["blocks"], heads=mp["heads"], ffn_hidden=mp["ffn_hidden"], dropout=mp["dropout"])
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise FeddmmrError(f"{ckpt_dir / 'model.safetensors'} does not match its config: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}, shape mismatch {wrong[:5]}; {fix}")
    model.load_state_dict(state, strict=True)
    return model, config
