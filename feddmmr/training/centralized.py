"""The centralized counterpart: the stage-1 model trained on the same windows without federation.

Every user's training windows are pooled and shuffled across users each epoch; each window keeps the
negatives its user would draw (items outside that user's training history, ``ClientPool.plan``), and the
loss is the clients' (``model.loss.batch_loss``). Validation after every epoch with the stages' evaluator
keeps the best epoch (early stopping after ``patience`` epochs); the test split is evaluated once on it.
The output is a stage checkpoint (``load_checkpoint`` reads it), metrics, per-user test ranks and an
MLflow run, so ``feddmmr compare`` shows the price of federation as one more column. Every epoch is saved
for resume: a killed run continues after its last finished epoch.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from feddmmr.config import Params, TrainParams, resolve_device, validate
from feddmmr.data.prepare import Prepared, load_prepared
from feddmmr.errors import FeddmmrError
from feddmmr.evaluation.metrics import Evaluator, pick, write_metrics
from feddmmr.evaluation.stats import TEST_RANKS, save_test_ranks
from feddmmr.federated.client import ClientPool, LocalOptimizer
from feddmmr.io import atomic_dir, exclusive, save_tensors, write_json
from feddmmr.model.loss import batch_loss
from feddmmr.tracking.keys import flatten, prefixed
from feddmmr.tracking.run import StageRun
from feddmmr.training.checkpoint import build_model, model_config
from feddmmr.training.resume import (
    Progress,
    ResumeState,
    code_sha256,
    rng_state,
    set_rng_state,
)

STAGE = "centralized"
log = logging.getLogger("feddmmr")


def _epoch_windows(pool: ClientPool, epoch: int, c, gen: torch.Generator) -> list[tuple[torch.Tensor, ...]]:
    """All users' windows with their negatives, shuffled across users, in batches of ``c.batch_size``."""
    plan_tp = TrainParams(seed=c.seed, local_epochs=1, batch_size=10 ** 9, num_negatives=c.num_negatives)
    batches = [b for u in range(pool.data.num_users) for b in pool.plan(u, epoch, plan_tp)]
    x, y, pos, neg = (torch.cat([getattr(b, f) for b in batches]) for f in ("x", "y", "pos", "neg"))
    order = torch.randperm(len(x), generator=gen)
    return [(x[i], y[i], pos[i], neg[i]) for i in order.split(c.batch_size)]


def _train_epoch(model, opt, pool: ClientPool, epoch: int, c, device) -> float:
    """One pass over every window; returns the mean loss (a non-finite one is an error)."""
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([c.seed, epoch, 7]).generate_state(1)[0]))
    empty = torch.zeros(1, dtype=torch.long, device=device)
    params = dict(model.named_parameters())
    model.train()
    total, n = 0.0, 0
    for x, y, pos, neg in _epoch_windows(pool, epoch, c, gen):
        loss, _ = batch_loss(model, params, x.to(device), y.to(device), pos.to(device), neg.to(device),
                             empty, empty, c)
        loss.backward()
        opt.step()
        total, n = total + loss.item(), n + 1
    if not np.isfinite(total):
        raise FeddmmrError(f"{STAGE}: the training loss of epoch {epoch} is not finite; lower centralized.lr")
    return total / max(n, 1)


def _fit(model, opt, pool, evaluator, c, state: Progress, resume: ResumeState, tracker, best, device, progress):
    """Epochs ``state.round + 1 .. c.epochs``, each saved for resume; returns the best state dict."""
    epochs = [] if state.stopped else range(state.round + 1, c.epochs + 1)
    bar = tqdm(epochs, desc=STAGE, unit="epoch", disable=not progress, initial=state.round, total=c.epochs,
               dynamic_ncols=True)
    with logging_redirect_tqdm():   # the per-epoch lines above the bar on a terminal
        for epoch in bar:
            start = time.perf_counter()
            loss = _train_epoch(model, opt, pool, epoch, c, device)
            val = evaluator.evaluate(model, "val")
            log.info("%s epoch %d: loss %.4f val %s %.4f (%.1fs)", STAGE, epoch, loss, c.selection_metric,
                     pick(val, c.selection_metric), time.perf_counter() - start)
            state.history["train_loss"].append(loss)
            state.history["val"].append(val)
            score = pick(val, c.selection_metric)
            if score > state.best_score:
                state.best_score, state.best_round, state.improved_round = score, epoch, epoch
                best = copy.deepcopy(model.state_dict())
            state.round = epoch
            state.stopped = epoch - state.improved_round >= c.patience or epoch == c.epochs
            tracker.sync(lambda i: _record(state.history, i), epoch)
            state.tracked_round = tracker.tracked_round
            resume.save(state, {"model": model.state_dict(), "best": best, "optimizer": opt.state_tensors(),
                                "rng": rng_state()})
            bar.set_postfix(loss=f"{loss:.3f}", best=state.best_round)
            if state.stopped:
                if epoch < c.epochs:
                    log.info("%s: early stop at epoch %d (best epoch %d)", STAGE, epoch, state.improved_round)
                break
    bar.close()
    return best


def _record(history: dict, i: int) -> dict[str, float]:
    return {**prefixed(history["val"][i]), **({"train_loss": history["train_loss"][i]} if i else {})}


def _config(params: Params, data: Prepared, data_dir, model, state: Progress) -> dict:
    return {"stage": STAGE, "lineage": [], **model_config(params, data, data_dir, model),
            "train": asdict(params.centralized), "best_round": state.best_round}


def _write(params, data, data_dir, model, evaluator, state, out_dir, metrics_path, tracker) -> dict:
    ranks = evaluator.ranks(model, "test")
    test = evaluator.summarize(*ranks)
    metrics = {"stage": STAGE, "best_round": state.best_round, "rounds_run": state.round,
               "val": state.history["val"][state.best_round], "test": test}
    with atomic_dir(out_dir) as tmp:
        save_tensors(tmp / "model.safetensors", model.state_dict(), metadata={"stage": STAGE})
        write_json(tmp / "config.json", _config(params, data, data_dir, model, state))
        write_json(tmp / "train_history.json", {**state.history, "best_round": state.best_round, "test": test})
        save_test_ranks(tmp, ranks, STAGE)
    write_metrics(metrics_path, metrics)
    final = {"best_round": state.best_round, **prefixed(test, "test"), **prefixed(metrics["val"], "best_val")}
    tracker.finish(lambda i: _record(state.history, i), state.round, final,
                   [Path(out_dir) / "config.json", Path(out_dir) / TEST_RANKS, Path(metrics_path)], Path(out_dir))
    return metrics


def train_centralized(params: Params, data_dir: str | Path, out_dir: str | Path, metrics_path: str | Path,
                      progress: bool = True) -> dict:
    """Train the centralized counterpart (``params.centralized``); write checkpoint, metrics and MLflow run."""
    validate(params)
    c = params.centralized
    data = load_prepared(data_dir)
    device = resolve_device(c.device, STAGE)
    sections = {"model": asdict(params.model), STAGE: asdict(c), "evaluation": asdict(params.evaluation),
                "data": {"dir": str(data_dir)}}
    with exclusive(out_dir), exclusive(metrics_path):
        resume = ResumeState(out_dir, {"sections": sections, "data": data.meta["source_sha256"], "code": code_sha256(),
                                       "torch": torch.__version__})
        saved = resume.load()
        torch.manual_seed(c.seed)
        model = build_model(params, data).to(device)
        opt = LocalOptimizer(list(model.parameters()), TrainParams(optimizer=c.optimizer, lr=c.lr))
        evaluator, pool = Evaluator(data, params.evaluation.ks, params.evaluation.batch_size), ClientPool(data)
        if saved is None:
            state = Progress(history={"train_loss": [None], "val": [evaluator.evaluate(model, "val")]})
            state.best_score, best = pick(state.history["val"][0], c.selection_metric), copy.deepcopy(model.state_dict())
        else:
            state, parts = saved
            model.load_state_dict(parts["model"])
            opt.load_state_tensors(parts.get("optimizer", {}))
            set_rng_state(parts["rng"])
            best = parts["best"]
        tracker = StageRun(STAGE, flatten(sections), data.meta, params.tracking.enabled, out_dir,
                           state.tracking_run, state.tracked_round)
        state.tracking_run = tracker.run_id
        with tracker.recording():
            best = _fit(model, opt, pool, evaluator, c, state, resume, tracker, best, device, progress)
            model.load_state_dict(best)
            metrics = _write(params, data, data_dir, model, evaluator, state, out_dir, metrics_path, tracker)
        resume.clear()
    return metrics
