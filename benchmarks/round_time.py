"""Benchmark: wall time of one federated round (vectorized, the sequential reference in this process, and the
sequential executor on one worker process per CPU, as a CPU stage runs it) and of the
batched evaluation of all users, on the ML-1M top-1000 subset when ../shared/data is present
(else on the synthetic demo data). ``--stage align_projectors|finetune_moe`` times a multimodal
stage (text features extracted first, visual masked; client memories filled by the warm-up pass).

    python benchmarks/round_time.py [--stage pretrain_sasrec] [--clients 100] [--data-root ../shared/data]
                                    [--skip-sequential]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from feddmmr.config import load_params
from feddmmr.data.prepare import load_prepared, prepare
from feddmmr.federated.client import ClientPool, train_round_sequential, train_round_vectorized, warm_memories
from feddmmr.model.memory import MemoryBank
from feddmmr.evaluation.metrics import Evaluator
from feddmmr.model import group_of
from feddmmr.features.extract import extract
from feddmmr.features.store import load_modalities
from feddmmr.modalities import NAMES
from feddmmr.federated.server import select_clients
from feddmmr.federated.runtime import ThreadPool
from feddmmr.training.checkpoint import build_memory, build_model
from feddmmr.training.stages import STAGE_SPECS, STAGES
from feddmmr.federated.workers import round_executor

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default="pretrain_sasrec", choices=STAGES)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--skip-sequential", action="store_true")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()

    params = load_params(REPO / "params.yaml", args.overrides)
    ml1m = Path(args.data_root) / "ml-1m"
    if ml1m.is_dir():
        params.prepare.source, params.prepare.path, params.prepare.top_k_users = "ml-1m", str(ml1m), 1000
    else:
        params.prepare.path = str(REPO / params.prepare.path)
    tmp = Path(tempfile.mkdtemp())
    meta = prepare(params.prepare, tmp / "prepared")
    data = load_prepared(tmp / "prepared")
    tp = getattr(params, args.stage)

    print(f"machine: {platform.machine()} {platform.processor() or ''} cores={os.cpu_count()} "
          f"torch={torch.__version__} threads={torch.get_num_threads()} python={platform.python_version()}")
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"data: {params.prepare.source} {meta['num_users']} users, {meta['num_items']} items, "
          f"{meta['num_interactions']} interactions; model {params.model}")
    print(f"train: batch_size={tp.batch_size} local_epochs={tp.local_epochs} negatives={tp.num_negatives} loss={tp.loss}")

    torch.manual_seed(0)
    pool = ClientPool(data)
    spec = STAGE_SPECS[args.stage]
    memory: MemoryBank | None = None
    if spec.multimodal:
        t0 = time.perf_counter()
        for m in NAMES:
            extract(m, params, tmp / "prepared", tmp / "features" / m, progress=False)
        feats = load_modalities(tmp / "features", data)
        print("features: " + ", ".join(f"{m} {f.coverage:.1%}" for m, f in feats.items()) +
              f" ({time.perf_counter() - t0:.1f} s)")
        model = build_model(params, data, {m: f.dim for m, f in feats.items()})
        model.set_features({m: (f.table, f.mask) for m, f in feats.items()})
        memory = build_memory(params, data, feats)
        t0 = time.perf_counter()
        writes = warm_memories(model, pool, memory, tp)
        print(f"memory warm-up of {data.num_users} clients: {time.perf_counter() - t0:.2f} s, {writes} long-term writes")
    else:
        model = build_model(params, data)
    trainable = {k for k, _ in model.named_parameters() if group_of(k) not in tp.freeze}
    print(f"stage {args.stage}: {sum(p.numel() for k, p in model.named_parameters() if k in trainable):,} "
          f"trainable of {sum(p.numel() for p in model.parameters()):,} parameters")
    clients = select_clients(data.num_users, min(1.0, args.clients / data.num_users), 1, tp.seed)  # as in a round
    n_targets = int(pool.num_targets[clients].sum())
    evaluator = Evaluator(data, params.evaluation.ks, params.evaluation.batch_size)

    results = {}
    runs = [("vectorized", train_round_vectorized)] + ([] if args.skip_sequential else [("sequential", train_round_sequential)])
    stack = contextlib.ExitStack()
    chosen = round_executor(tp.executor, model, pool, ThreadPool(params.runtime.threads), stack)
    if chosen.workers:                                          # what a CPU stage runs: the workers of runtime.threads
        runs.append((f"sequential on {len(chosen.workers.procs)} worker processes", chosen.run))
    saved = memory.state_dict() if memory else None
    train_round_vectorized(model, clients[:4], pool, 0, tp, trainable, memory)  # warm-up (first-call dispatch costs)
    for name, fn in runs:
        if memory:
            memory.load_state_dict(saved)  # every executor starts from the same memories
        if fn is chosen.run:
            fn(model, clients, pool, 0, tp, trainable, memory)  # warm-up of every worker
            if memory:
                memory.load_state_dict(saved)
        t0 = time.perf_counter()
        r = fn(model, clients, pool, 1, tp, trainable, memory)
        dt = time.perf_counter() - t0
        results[name] = dt
        print(f"round ({name}): {len(clients)} clients, {r.steps} local steps, {n_targets} training targets: "
              f"{dt:.2f} s ({n_targets / dt:,.0f} targets/s)")
    t0 = time.perf_counter()
    evaluator.evaluate(model, "val", memory)
    print(f"evaluation of all {data.num_users} users (full ranking + sampled): {time.perf_counter() - t0:.2f} s")
    if "sequential" in results:
        print(f"speed-up vectorized vs sequential: {results['sequential'] / results['vectorized']:.1f}x")
    stack.close()


if __name__ == "__main__":
    main()
