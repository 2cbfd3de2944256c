"""Training stages: what each stage builds, loads, trains and writes.

    pretrain_sasrec   SASRec over item ids only; every parameter trains.
    align_projectors  loads item_embeddings + backbone from pretrain_sasrec; only the modality
                      projections and the residual gate train (alignment to the frozen item space).
    finetune_moe      loads every group from align_projectors (or, on the 2-stage path,
                      item_embeddings + backbone from pretrain_sasrec); all groups but the item
                      embeddings train.
The groups a stage trains are its model's groups minus ``<stage>.freeze`` (the defaults above live
in ``config.py``), so an ablation is a params change.

Parameters are loaded, trained and frozen as explicit groups (``feddmmr.model.GROUPS``), never by
substring. Loading writes a report (loaded / initialised / missing / unexpected / mismatched tensors)
and fails when a group the source checkpoint holds cannot be loaded completely. Frozen groups come
out of a stage bit-identical (FedAvg and the server step leave them untouched).

A stage writes, atomically, a checkpoint directory:
    model.safetensors   the best round's global weights (no pickle)
    memory.safetensors  every client's local memory (multimodal stages)
    config.json         model shape, data and feature fingerprints, parameters, group provenance
    load_report.json    what was loaded from the previous stage (stages 2-3)
    train_history.json  per-round loss, validation metrics (both protocols), router weights and gate
    rounds.csv          the same per round as a table: what `dvc plots show` draws
and a DVC metrics file with the best round's validation and test metrics. Wall-clock times go to MLflow
only (and are returned), so identical work writes identical files.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from feddmmr.config import (
    MultimodalTrainParams,
    Params,
    TrainParams,
    resolve_device,
    validate,
)
from feddmmr.data.items import item_titles
from feddmmr.data.prepare import Prepared, load_prepared
from feddmmr.errors import DivergedError, FeddmmrError, TrackingIncomplete
from feddmmr.evaluation.metrics import Evaluator, pick, write_metrics
from feddmmr.evaluation.stats import TEST_RANKS, save_test_ranks
from feddmmr.features.store import load_modalities
from feddmmr.federated.client import ClientPool, warm_memories
from feddmmr.federated.runtime import ThreadPool
from feddmmr.federated.server import SERVER_OPTIMIZERS, ServerOptimizer, select_clients
from feddmmr.federated.workers import Federation, RoundExecutor, round_executor
from feddmmr.io import (
    atomic_dir,
    exclusive,
    file_sha256,
    load_tensors,
    nonfinite,
    save_tensors,
    write_json,
)
from feddmmr.model import GROUPS, FedDMMR, group_of
from feddmmr.model.loss import FULL_LOSS_STAGES
from feddmmr.model.memory import MemoryBank, read_pointer
from feddmmr.tracking.diff import stage_diff
from feddmmr.tracking.keys import flatten, prefixed
from feddmmr.tracking.registry import register_stage
from feddmmr.tracking.run import StageRun
from feddmmr.training.checkpoint import (
    FIX,
    build_memory,
    build_model,
    load_groups,
    model_config,
    stage_features,
    stage_memory,
)
from feddmmr.training.resume import (
    Progress,
    ResumeState,
    code_sha256,
    rng_state,
    set_rng_state,
)

log = logging.getLogger("feddmmr")


@dataclass(frozen=True)
class StageSpec:
    multimodal: bool
    init_from: tuple[str, ...] = ()        # stages this one may load


# Which groups a stage trains is a parameter: every group of its model but ``<stage>.freeze``.
STAGE_SPECS = {
    "pretrain_sasrec": StageSpec(False),
    "align_projectors": StageSpec(True, ("pretrain_sasrec",)),
    "finetune_moe": StageSpec(True, ("align_projectors", "pretrain_sasrec")),
}
STAGES = tuple(STAGE_SPECS)


# ---------------------------------------------------------------------------------------------- checks

def _check_train_params(tp: TrainParams, stage: str) -> None:
    """What only the stage knows: its parameter groups (choices and ranges are ``config.validate``'s)."""
    unknown = sorted(set(tp.freeze) - set(GROUPS))
    if unknown:
        raise FeddmmrError(f"{stage}.freeze names unknown groups {unknown}; groups: {', '.join(GROUPS)}")
    groups = set(GROUPS) if STAGE_SPECS[stage].multimodal else {"item_embeddings", "backbone"}
    if groups <= set(tp.freeze):
        raise FeddmmrError(f"{stage}.freeze lists every parameter group of the stage's model ({', '.join(sorted(groups))}): "
                           f"nothing would train; leave at least one out")
    if tp.loss == "full" and STAGE_SPECS[stage].multimodal:
        raise FeddmmrError(f"{stage}.loss: full (softmax over every item) applies to {FULL_LOSS_STAGES}; the "
                           f"multimodal stages score sampled candidates: set {stage}.loss to ce or bpr")
    if isinstance(tp, MultimodalTrainParams):
        allowed = STAGE_SPECS[stage].init_from
        if tp.init_from not in allowed:
            raise FeddmmrError(f"{stage}.init_from must be one of {', '.join(allowed)}, got {tp.init_from!r}")


def _check_finite(stage: str, rnd: int, tp: TrainParams, loss: float | None = None,
                  state: dict[str, torch.Tensor] | None = None, val: dict | None = None) -> None:
    """A non-finite loss, global weight or validation score stops the stage: it is never a result."""
    what = None
    if loss is not None and not math.isfinite(loss):
        what = f"the training loss is {loss}"
    elif state is not None and (bad := nonfinite(state)):
        what = f"the aggregated update left {len(bad)} tensors non-finite ({', '.join(bad[:3])})"
    elif val is not None and val.get("nonfinite_scores"):
        what = f"validation produced {val['nonfinite_scores']} non-finite scores"
    if what is not None:
        raise DivergedError(f"{stage} round {rnd}: {what}; training diverged: lower {stage}.lr (now {tp.lr:g}) or "
                            f"{stage}.server_lr (now {tp.server_lr:g}), or check the feature files for NaN rows")


# ---------------------------------------------------------------------------------------------- training

@dataclass
class Setup:
    """Everything the round loop works on, built the same way on a fresh start and on resume."""
    stage: str
    spec: StageSpec
    tp: TrainParams
    data: Prepared
    model: FedDMMR
    memory: MemoryBank | None
    pool: ClientPool
    evaluator: Evaluator
    server: ServerOptimizer
    trainable: set[str]
    report: dict | None        # load report (stages 2-3)
    config: dict               # written as config.json
    threads: ThreadPool        # torch's CPU threads, re-sized to the free CPUs each round


def train_stage(stage: str, params: Params, data_dir: str | Path, out_dir: str | Path, metrics_path: str | Path,
                progress: bool = True, features_dir: str | Path = "features", init_dir: str | Path | None = None,
                restart: bool = False, rounds: Federation | None = None) -> dict:
    """Train ``stage`` federatedly, keep the best validation round, write checkpoint and metrics.

    ``init_dir``: the checkpoint to start from (default: the ``<init_from>`` directory beside ``out_dir``).
    Every round is saved for resume (``feddmmr.training.resume``); a killed stage continues from its last completed
    round when run again with the same inputs, unless ``restart``.
    ``rounds``: a ``workers.Federation`` whose clients train, keep their memories and rank their targets
    elsewhere (``feddmmr.flower.server_app`` passes a Flower federation's); None: this machine's simulator
    (``workers.round_executor``).
    """
    if stage not in STAGE_SPECS:
        raise FeddmmrError(f"unknown stage {stage!r}; available: {', '.join(STAGES)}")
    if rounds is not None and not isinstance(rounds, Federation):
        raise TypeError(f"rounds must implement workers.Federation (a round call, description, memory_bank, "
                        f"warm_memories, evaluator); got {type(rounds).__name__}")
    spec, tp = STAGE_SPECS[stage], getattr(params, stage)
    validate(params)
    _check_train_params(tp, stage)
    data = load_prepared(data_dir)
    feats = load_modalities(features_dir, data) if spec.multimodal else None
    init_dir = _start_checkpoint(stage, spec, tp, out_dir, init_dir)
    sections = {"model": asdict(params.model), stage: asdict(tp), "evaluation": asdict(params.evaluation),
                "data": {"dir": str(data_dir)}, "federation": {"engine": params.federation.engine}}
    if spec.multimodal:
        sections.update(multimodal=asdict(params.multimodal), memory=asdict(params.memory),
                        features={m: {"sha256": f.sha256, "coverage": f.coverage} for m, f in feats.items()})
    with exclusive(out_dir), exclusive(metrics_path):
        resume = ResumeState(out_dir, _resume_inputs(stage, sections, data_dir, init_dir))
        if restart:
            resume.clear()
        saved = resume.load()
        state = saved[0] if saved else Progress()
        tracker = StageRun(stage, flatten(sections), data.meta, params.tracking.enabled, out_dir,
                           state.tracking_run, state.tracked_round,
                           file_sha256(init_dir / "model.safetensors") if init_dir else "")
        state.tracking_run, state.tracked_round = tracker.run_id, tracker.tracked_round
        with tracker.recording():
            setup = _initialise(stage, spec, params, tp, data, data_dir, feats, init_dir, saved, rounds,
                                resume.fingerprint)
            state = _fit(setup, state, saved[1] if saved else None, resume, tracker, progress, rounds)
            export = _model_export(params, spec, data, data_dir, features_dir)
            return _write(setup, state, resume, tracker, out_dir, metrics_path, init_dir, export)


def _model_export(params: Params, spec: StageSpec, data: Prepared, data_dir, features_dir) -> dict | None:
    """What the stage's MLflow model is made of besides the checkpoint (``tracking.registry.log_stage_model``)."""
    if not (params.tracking.enabled and params.tracking.log_models):
        return None
    return {"data": Path(data_dir), "features": Path(features_dir) if spec.multimodal else None,
            "titles": item_titles(params.prepare, params.features_text.movies), "example_user": int(data.user_raw[0])}


def _start_checkpoint(stage: str, spec: StageSpec, tp: TrainParams, out_dir, init_dir) -> Path | None:
    if not spec.init_from and init_dir is not None:
        raise FeddmmrError(f"{stage} trains from scratch and loads no checkpoint; drop --init {init_dir}")
    if not spec.init_from:
        return None
    init_dir = Path(init_dir) if init_dir is not None else Path(out_dir).parent / tp.init_from
    if not (init_dir / "model.safetensors").is_file():
        raise FeddmmrError(f"{stage} starts from {init_dir}, which holds no model.safetensors; train "
                           f"{tp.init_from} first (`dvc repro {tp.init_from}`) or pass --init")
    return init_dir


def _resume_inputs(stage: str, sections: dict, data_dir, init_dir: Path | None) -> dict:
    """Everything a saved round depends on: a state is resumed only when all of it is unchanged."""
    start = {f.name: file_sha256(f) for f in sorted(Path(init_dir).glob("*.safetensors"))} if init_dir else {}
    return {"stage": stage, "sections": sections, "data": file_sha256(Path(data_dir) / "sequences.npz"),
            "start": start, "code": code_sha256(), "torch": torch.__version__}


def selection_path(val: list[dict], best_round: int, metric: str) -> dict:
    """How the validation score moved: at the start (round 0: the loaded or fresh model), the change of the first
    round, and the best round's gain over the start; what says whether a stage helped or hurt its start."""
    start = pick(val[0], metric)
    first = pick(val[1], metric) - start if len(val) > 1 else 0.0
    return {"metric": metric, "start": start, "first_round_change": first,
            "best_gain": pick(val[best_round], metric) - start}


def _round_record(history: dict, i: int, with_memory: bool) -> dict[str, float]:
    """What MLflow records for round ``i`` (round 0: the starting model's validation)."""
    record = {**prefixed(history["val"][i]), **history["router"][i]}
    if i:
        record.update(train_loss=history["train_loss"][i], round_seconds=history["seconds"][i])
        if with_memory:
            record.update(memory_writes=history["memory_writes"][i], mean_surprise=history["mean_surprise"][i])
    return record


PLOTTED = ("full/NDCG@10", "full/HR@10", "sampled/NDCG@10", "sampled/HR@10")


def _rounds_csv(history: dict) -> str:
    """rounds.csv of the checkpoint, what `dvc plots` draws: per round the validation metrics of both protocols,
    the train loss and (stages 2-3) the gate and router weights."""
    router = sorted(history["router"][0])
    plotted = [m for m in PLOTTED if m.split("/")[0] in history["val"][0]]   # sampled: absent without negatives
    lines = [",".join(["round", "train_loss", *(f"val.{m.replace('/', '.')}" for m in plotted), *router])]
    for i, rnd in enumerate(history["round"]):
        loss = history["train_loss"][i]
        values = [pick(history["val"][i], m) for m in plotted] + [history["router"][i][k] for k in router]
        lines.append(",".join([str(rnd), "" if loss is None else f"{loss:.6g}", *(f"{v:.6g}" for v in values)]))
    return "\n".join(lines) + "\n"


def _initialise(stage: str, spec: StageSpec, params: Params, tp: TrainParams, data: Prepared, data_dir,
                feats: dict | None, init_dir: Path | None, saved, rounds: Federation | None = None,
                key: str = "") -> Setup:
    """Build the model, load the previous stage, set up the client memories; on resume, restore the saved round.
    ``rounds``, ``key``: the round executor and the run's fingerprint (see ``train_stage``)."""
    torch.manual_seed(tp.seed)
    device = resolve_device(tp.device, stage)
    model = build_model(params, data, {m: f.dim for m, f in feats.items()} if feats else None)
    feature_sha = {m: f.sha256 for m, f in feats.items()} if feats else None
    report = load_groups(model, init_dir, data, feature_sha) if init_dir is not None else None
    if getattr(tp, "gate_start", None) is not None:
        with torch.no_grad():
            model.gating_weight.fill_(tp.gate_start)
    memory = None
    if spec.multimodal:
        model.set_features(stage_features(feats, tp))
        memory = (build_memory(params, data, feats, tp) if rounds is None else
                  rounds.memory_bank(data.num_users, stage_memory(params.memory, tp), feature_sha,
                                     list(tp.modalities), key))
        if saved is None:      # on resume the saved round's memories replace them
            _continue_memories(stage, memory, init_dir)
    server = SERVER_OPTIMIZERS[tp.server_optimizer].from_params(tp)
    if saved is not None:
        _restore(model, memory, server, *saved, device)
    model = model.to(device)
    pool = ClientPool(data)
    if memory is not None and params.memory.warmup and not memory.participations.any():
        t0 = time.perf_counter()
        writes = (warm_memories if rounds is None else rounds.warm_memories)(model, pool, memory, tp)
        log.info("%s: filled %d client memories in %.1fs (%d long-term writes)", stage, data.num_users,
                 time.perf_counter() - t0, writes)
    config = _checkpoint_config(stage, spec, params, tp, data, data_dir, model, report, feature_sha)
    trainable = {k for k, _ in model.named_parameters() if group_of(k) not in tp.freeze}
    evaluator = (Evaluator if rounds is None else rounds.evaluator)(data, params.evaluation.ks,
                                                                    params.evaluation.batch_size)
    return Setup(stage, spec, tp, data, model, memory, pool, evaluator, server, trainable, report, config,
                 ThreadPool(params.runtime.threads))


def _continue_memories(stage: str, memory: MemoryBank, init_dir: Path | None) -> None:
    mem_file = Path(init_dir) / "memory.safetensors" if init_dir is not None else None
    if mem_file is None or not mem_file.is_file():
        return
    state = load_tensors(mem_file, "client memory of the previous stage", FIX)
    try:
        memory.load_state_dict(state)
    except ValueError as exc:
        fix = (f"train {stage} with --engine flower too, or the previous stage with --engine simulation"
               if read_pointer(state) else "keep the memory params of the previous stage or re-run it (`dvc repro`)")
        raise FeddmmrError(f"{mem_file}: {exc}; {fix}") from None
    where = (f"{int((memory.participations > 0).sum())} clients" if isinstance(memory, MemoryBank)
             else "kept by the clients")
    log.info("%s: continuing the client memories of %s (%s)", stage, init_dir, where)


def _restore(model: FedDMMR, memory: MemoryBank | None, server: ServerOptimizer, state: Progress, parts: dict,
             device) -> None:
    """Put the model, memories, server optimizer and RNG back as they were after the saved round."""
    model.load_state_dict(parts["model"])
    if memory is not None:
        memory.load_state_dict(parts["memory"])
    server.load_state_dict(state.server_t, parts.get("server_m", {}), parts.get("server_v", {}), device)
    set_rng_state(parts["rng"])


def _checkpoint_config(stage: str, spec: StageSpec, params: Params, tp: TrainParams, data: Prepared, data_dir,
                       model: FedDMMR, report: dict | None, feature_sha: dict | None) -> dict:
    """config.json of the checkpoint: shape, data, parameters, lineage and each group's provenance."""
    lineage, groups = [], {}
    if report is not None:
        lineage, source = report["lineage"], report["source_stage"]
        groups = {g: dict(report["groups"].get(g) or {"initialized_in": source, "trained_in": [source]})
                  for g in report["loaded"]}
        log.info("%s: loaded %s from %s; initialised %s", stage,
                 ", ".join(f"{g} ({n} tensors)" for g, n in report["loaded"].items()), report["source"],
                 ", ".join(report["initialized"]) or "nothing")
    for g in sorted({group_of(k) for k, _ in model.named_parameters()}):
        groups.setdefault(g, {"initialized_in": stage, "trained_in": []})
        if g not in tp.freeze:
            groups[g] = {**groups[g], "trained_in": groups[g]["trained_in"] + [stage]}
    config = {"stage": stage, "lineage": lineage, **model_config(params, data, data_dir, model), "train": asdict(tp),
              "groups": groups, "best_round": None}
    if spec.multimodal:
        config.update(multimodal=asdict(params.multimodal), memory=asdict(stage_memory(params.memory, tp)),
                      features=feature_sha)
    return config


def _snapshot(setup: Setup) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    return ({k: v.detach().cpu().clone() for k, v in setup.model.state_dict().items()},
            setup.memory.state_dict() if setup.memory else None)


def _save_round(setup: Setup, state: Progress, best: tuple, resume: ResumeState, tracker: StageRun) -> None:
    t, m, v = setup.server.state_dict()
    state.server_t, state.tracked_round = t, tracker.tracked_round
    model, memory = _snapshot(setup)
    resume.save(state, {"model": model, "memory": memory, "best": best[0], "best_memory": best[1],
                        "server_m": m, "server_v": v, "rng": rng_state()})


def _fit(setup: Setup, state: Progress, parts: dict | None, resume: ResumeState, tracker: StageRun,
         progress: bool, rounds: Federation | None = None) -> Progress:
    """The round loop: train, aggregate, validate, keep the best round; every round saved for resume."""
    stage, tp, model, memory = setup.stage, setup.tp, setup.model, setup.memory
    record = lambda i: _round_record(state.history, i, memory is not None)  # noqa: E731
    if parts is None:                                                       # fresh start: round 0
        val0 = setup.evaluator.evaluate(model, "val", memory)
        _check_finite(stage, 0, tp, val=val0)
        state.history = {"round": [0], "train_loss": [None], "val": [val0], "clients": [0], "seconds": [0.0],
                         "router": [model.router_stats()], "memory_writes": [0], "mean_surprise": [None]}
        state.best_score = pick(val0, tp.selection_metric)
        best = _snapshot(setup)
        tracker.sync(record, 0)
        _save_round(setup, state, best, resume, tracker)
    else:
        best = (parts["best"], parts.get("best_memory"))
        log.info("%s: resuming after round %d (best round so far %d) from %s", stage, state.round,
                 state.best_round, resume.dir)
        tracker.sync(record, state.round)
    if setup.report is not None:
        tracker.log_dict(setup.report, "load_report.json")
    with contextlib.ExitStack() as stack:
        executor = (round_executor(tp.executor, model, setup.pool, setup.threads, stack) if rounds is None
                    else RoundExecutor(rounds, "federation", None, rounds.description))
        log.info("%s: %s", stage, executor.description)
        with logging_redirect_tqdm():
            bar = tqdm(range(state.round + 1, tp.rounds + 1), desc=stage, unit="round", disable=not progress,
                       dynamic_ncols=True, initial=state.round, total=tp.rounds)
            for rnd in ([] if state.stopped else bar):
                try:
                    best = _round(setup, state, rnd, executor.run, best)
                except DivergedError as exc:   # the round is dropped; the best finite round is kept
                    state.diverged = str(exc)
                    break
                state.round = rnd
                tracker.sync(record, rnd)
                state.stopped = rnd - state.improved_round >= tp.patience or rnd == tp.rounds
                _save_round(setup, state, best, resume, tracker)
                bar.set_postfix(loss=f"{state.history['train_loss'][-1]:.3f}", best=state.best_round,
                                **{tp.selection_metric: f"{pick(state.history['val'][-1], tp.selection_metric):.4f}"})
                if state.stopped and rnd < tp.rounds:
                    log.info("%s: early stop at round %d (best round %d)", stage, rnd, state.improved_round)
                    break
            bar.close()
    state.stopped = True
    model.load_state_dict(best[0])
    if memory is not None:
        memory.load_state_dict(best[1])   # the memories as they were at the best round
    return state


def _round(setup: Setup, state: Progress, rnd: int, executor, best: tuple) -> tuple:
    """One federated round: selected clients train locally, the server aggregates, all users validate."""
    stage, tp, model, memory = setup.stage, setup.tp, setup.model, setup.memory
    t0 = time.perf_counter()
    setup.threads.update()
    clients = select_clients(setup.data.num_users, tp.client_fraction, rnd, tp.seed)
    model.train()
    result = executor(model, clients, setup.pool, rnd, tp, setup.trainable, memory)
    new_state = setup.server.step({k: v.detach() for k, v in model.state_dict().items()}, result.state)
    _check_finite(stage, rnd, tp, loss=result.train_loss, state=new_state)
    model.load_state_dict(new_state)
    val = setup.evaluator.evaluate(model, "val", memory)
    _check_finite(stage, rnd, tp, val=val)
    seconds = time.perf_counter() - t0
    score = pick(val, tp.selection_metric)
    gates = model.router_stats()
    for key, value in (("round", rnd), ("train_loss", result.train_loss), ("val", val), ("clients", result.clients),
                       ("seconds", seconds), ("router", gates), ("memory_writes", result.memory_writes),
                       ("mean_surprise", result.mean_surprise)):
        state.history[key].append(value)
    if score > state.best_score:
        state.best_score, state.improved_round = score, rnd
    if state.improved_round == rnd or tp.keep == "last":
        state.best_round = rnd
        best = _snapshot(setup)
    log.info("%s round %d: loss %.4f val %s %.4f (%.1fs, %d clients)%s", stage, rnd, result.train_loss,
             tp.selection_metric, score, seconds, result.clients, "".join(f" {k} {v:.3f}" for k, v in gates.items()))
    return best


def _write(setup: Setup, state: Progress, resume: ResumeState, tracker: StageRun, out_dir, metrics_path,
           init_dir: Path | None, export: dict | None) -> dict:
    """Test the best round; write checkpoint, metrics and the MLflow records; then drop the resume state."""
    stage, model, memory, history = setup.stage, setup.model, setup.memory, state.history
    ranks = setup.evaluator.ranks(model, "test", memory)
    test = setup.evaluator.summarize(*ranks)
    _check_finite(stage, state.best_round, setup.tp, val=test)
    history["best_round"], history["test"] = state.best_round, test
    if memory is not None:
        history["memory"] = memory.summary()
    metrics = {"stage": stage, "best_round": state.best_round, "rounds_run": len(history["round"]) - 1,
               "val": history["val"][state.best_round], "test": test,
               "selection": selection_path(history["val"], state.best_round, setup.tp.selection_metric)}
    if setup.spec.multimodal:
        metrics["gating_weight"] = history["router"][state.best_round]["gating_weight"]
    if state.diverged:
        metrics["diverged"] = history["diverged"] = state.diverged
    artifacts = ["config.json", "train_history.json", TEST_RANKS] + (["load_report.json"] if setup.report else [])
    with atomic_dir(out_dir) as tmp:
        save_tensors(tmp / "model.safetensors", model.state_dict(), metadata={"stage": stage})
        if memory is not None:
            save_tensors(tmp / "memory.safetensors", memory.state_dict(), metadata={"stage": stage})
        write_json(tmp / "config.json", {**setup.config, "best_round": state.best_round,
                                         **({"diverged": state.diverged} if state.diverged else {})})
        write_json(tmp / "train_history.json", {k: v for k, v in history.items() if k != "seconds"})
        (tmp / "rounds.csv").write_text(_rounds_csv(history))
        save_test_ranks(tmp, ranks, stage)                                  # per user: paired tests (compare)
        if setup.report:
            write_json(tmp / "load_report.json", setup.report)
    write_metrics(metrics_path, metrics)
    record = lambda i: _round_record(history, i, memory is not None)  # noqa: E731
    if state.diverged:
        tracker.sync(record, state.round)
        tracker.fail("FAILED")
        raise DivergedError(f"{state.diverged}. The best finite round ({state.best_round}) is written to {out_dir} "
                            f"and {metrics_path}, marked diverged")
    diff = stage_diff(init_dir, out_dir, group_of) if init_dir is not None else None
    train_seconds = history["seconds"][1:]   # wall clock goes to MLflow only: DVC outputs stay reproducible
    metrics["seconds_per_round"] = sum(train_seconds) / max(1, len(train_seconds))
    final = {"best_round": state.best_round, "seconds_per_round": metrics["seconds_per_round"],
             **prefixed(test, "test"), **prefixed(metrics["val"], "best_val"),
             **{f"selection.{k}": v for k, v in metrics["selection"].items() if k != "metric"}}
    try:
        tracker.finish(record, state.round, final, [Path(out_dir) / a for a in artifacts] + [Path(metrics_path)],
                       Path(out_dir), param_diff=diff,
                       register=register_stage({**export, "checkpoint": Path(out_dir)}) if export is not None else None)
    except TrackingIncomplete:
        state.tracked_round = tracker.tracked_round
        resume.save_progress(state)   # re-running records the rest without training again
        raise
    resume.clear()
    return metrics
