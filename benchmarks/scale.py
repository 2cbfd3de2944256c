"""Benchmark: how a federated round scales with clients and catalogue, this code against a baseline revision.

For stage 1 (pretrain_sasrec) and stage 3 (finetune_moe) it prints seconds per round of 100 and of
1,000 clients and of the evaluation of all users (medians of ``--repeat`` after a warm-up), and the
peak memory of the training processes during the rounds above what they held before the warm-up, on
  top1000    ML-1M, the 1,000 most active users (3.6k items)            [../shared/data/ml-1m]
  ml1m       all 6,040 ML-1M users
  synthetic  100k items, 20k users, sequence lengths drawn from ML-1M's, Zipf item popularity
  synthetic3k  the same users and lengths over 3.6k items: the catalogue's own cost is synthetic / synthetic3k
Each measurement runs in a fresh process (so peak memory is its own), first for this checkout and then
for ``--baseline REV`` checked out with ``git worktree`` (default: the revision before the sparse /
thread-pool work), and the table shows both with their ratio. Stage 3 uses random text features
(384-d, every item) and masked visual ones, as the pipeline does without posters; memories are warmed
up as at the start of a stage. Executors: each revision's default for the device. ``--busy N`` keeps N
other single-threaded torch processes busy during every measurement (a shared machine).

    python benchmarks/scale.py [--device cpu|cuda] [--datasets top1000,ml1m,synthetic]
                               [--stages pretrain_sasrec,finetune_moe] [--clients 100,1000]
                               [--baseline REV | --no-baseline] [--no-eval] [--repeat 3] [--busy N]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = "2996b07"          # main before sparse item updates, the device round work and the thread pool
DATASETS = ("top1000", "ml1m", "synthetic", "synthetic3k")
CATALOGUE = {"synthetic": 100_000, "synthetic3k": 3_621}


# ------------------------------------------------------------------------------------------ data

def synthetic_csv(path: Path, data_root: Path, users: int = 20_000, items: int = 100_000, seed: int = 0) -> Path:
    """Interactions with ML-1M's per-user sequence lengths and a Zipf(1.1) item popularity."""
    import numpy as np
    import pandas as pd

    if path.exists():
        return path
    tmp = path.with_suffix(".tmp")
    lengths = pd.read_csv(data_root / "ml-1m" / "ratings.dat", sep="::", engine="python", header=None)[0].value_counts()
    rng = np.random.default_rng(seed)
    n = rng.choice(lengths.to_numpy(), size=users)
    popularity = 1.0 / np.arange(1, items + 1) ** 1.1
    rows = []
    for u, k in enumerate(n):
        chosen = rng.choice(items, size=min(int(k), items), replace=False, p=popularity / popularity.sum())
        rows.append(pd.DataFrame({"user": u, "item": chosen + 1, "timestamp": np.arange(len(chosen))}))
    pd.concat(rows).to_csv(tmp, index=False)
    tmp.rename(path)                          # complete or absent
    return path


def prepared_dir(name: str, cache: Path, data_root: Path) -> Path:
    from feddmmr.config import PrepareParams
    from feddmmr.data.prepare import prepare

    out = cache / f"{name}-prepared"
    if out.exists():
        return out
    if name in CATALOGUE:
        csv = synthetic_csv(cache / f"{name}.csv", data_root, items=CATALOGUE[name])
        pp = PrepareParams(source="csv", path=str(csv))
    else:
        pp = PrepareParams(source="ml-1m", path=str(data_root / "ml-1m"), top_k_users=1000 if name == "top1000" else 0)
    prepare(pp, out)
    return out


# ------------------------------------------------------------------------------------------ one measurement

class PeakMemory:
    """Highest memory of this process and its worker processes seen by a 20 ms sampler while the block runs,
    minus their memory when the object was made (before the warm-up round, so what a round's allocations
    keep cached counts too). Proportional set sizes (smaps_rollup), so pages a worker shares with this
    process count once. Reading them walks every mapping and slows a round by a third: the sampled round
    is an extra one, not a timed one."""

    def __init__(self, pids: list[int]):
        self.pids = [os.getpid(), *pids]
        self.start = self.peak = self._rss()

    def __enter__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        total = 0
        for pid in self.pids:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        return total

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.added_mb = (self.peak - self.start) / 2 ** 20


def gemm_rate(d: int, rows: int = 800) -> float:
    """FLOP/s of one thread on a [rows, d] x [d, 3d] float32 product, the shape of a block's fused q/k/v
    projection over one batch (its largest product)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a, b = torch.randn(rows, d), torch.randn(d, 3 * d)
    for _ in range(10):
        a @ b
    t0, n = time.perf_counter(), 200
    for _ in range(n):
        a @ b
    rate = 2 * rows * d * 3 * d * n / (time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return rate


def matmul_flops(params, tp, positions: int) -> float:
    """Floating-point operations of the backbone's matrix products in a training round: per position and block
    the q/k/v, output and two feed-forward projections and the attention over the window (query x key and
    weights x value), and the 1 + N candidate scores; the backward pass costs twice the forward."""
    m, L = params.model, params.prepare.max_seq_len
    d, f = m.hidden, m.ffn_hidden
    per_block = 2 * d * 3 * d + 2 * d * d + 2 * 2 * d * f + 2 * 2 * L * d
    candidates = 2 * (1 + tp.num_negatives) * d
    return 3 * positions * (m.blocks * per_block + candidates)


def measure(args) -> dict:
    """Runs inside the revision's checkout: one dataset, one stage, one client count."""
    import torch

    from feddmmr.federated.client import EXECUTORS, ClientPool, warm_memories
    from feddmmr.config import load_params
    from feddmmr.data.prepare import load_prepared
    from feddmmr.model.memory import MemoryBank, combined_features
    from feddmmr.evaluation.metrics import Evaluator
    from feddmmr.model import group_of
    from feddmmr.federated.server import select_clients
    from feddmmr.training.checkpoint import build_model

    params = load_params(None)
    tp = getattr(params, args.stage)
    device = torch.device(args.device)
    data = load_prepared(args.prepared)
    torch.manual_seed(0)
    pool = ClientPool(data)
    memory = None
    if args.stage == "pretrain_sasrec":
        model = build_model(params, data)
    else:
        text = torch.nn.functional.normalize(torch.randn(data.num_items + 1, 384), dim=-1)
        have = torch.ones(data.num_items + 1, dtype=torch.bool)
        have[0] = False
        feats = {"visual": (torch.zeros(data.num_items + 1, 512), torch.zeros_like(have)), "text": (text, have)}
        model = build_model(params, data, {"visual": 512, "text": 384})
        model.set_features(feats)
        memory = MemoryBank(data.num_users, params.memory, combined_features(feats))
    model = model.to(device)
    if memory is not None:
        warm_memories(model, pool, memory, tp)
    stack = contextlib.ExitStack()
    try:                                   # this checkout's executor and CPU pool; a baseline may predate them
        from feddmmr.federated.runtime import ThreadPool
        threads = ThreadPool(params.runtime.threads)
    except (ImportError, AttributeError):
        threads = None
    try:
        from feddmmr.federated.workers import round_executor
        chosen = round_executor(tp.executor, model, pool, threads, stack)
        executor, name = chosen.run, chosen.name + (" on workers" if chosen.workers else "")
        pids = [proc.pid for proc in chosen.workers.procs] if chosen.workers else []
    except ImportError:
        try:
            from feddmmr.federated.client import resolve_executor
            name = resolve_executor(tp.executor, device)
        except ImportError:                # before `executor: auto` the default was explicit
            name = tp.executor
        executor, pids = EXECUTORS[name], []
    trainable = {k for k, _ in model.named_parameters() if group_of(k) not in tp.freeze}
    clients = select_clients(data.num_users, min(1.0, args.clients / data.num_users), 1, tp.seed)
    model.train()
    rss = PeakMemory(pids)
    executor(model, clients, pool, 0, tp, trainable, memory)    # warm-up: every worker's first allocations
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if threads is not None:
        threads.update()
    sync()
    times = []
    for _ in range(args.repeat):                   # the median of a few rounds: this VM's timings wander by 10%
        t0 = time.perf_counter()
        result = executor(model, clients, pool, 1, tp, trainable, memory)
        sync()
        times.append(time.perf_counter() - t0)
    with rss:                                      # one more round, for its memory only
        executor(model, clients, pool, 1, tp, trainable, memory)
        sync()
    import numpy as np

    from feddmmr.federated.client import train_windows
    windows = int(np.isin(train_windows(data)[3], clients).sum()) * tp.local_epochs
    flops = matmul_flops(params, tp, windows * data.max_seq_len)
    rate = gemm_rate(params.model.hidden) if device.type == "cpu" else 0.0
    workers = len(pids) or torch.get_num_threads()
    out = {"seconds": statistics.median(times), "targets": int(pool.num_targets[clients].sum()),
           "matmul_gflop": flops / 1e9, "gemm_gflops": rate / 1e9,
           "floor_seconds": flops / (rate * workers) if rate else None,
           "clients": len(clients), "steps": result.steps, "executor": name,
           "threads": workers,
           "round_mb": rss.added_mb if device.type == "cpu" else torch.cuda.max_memory_allocated() / 2 ** 20,
           "users": data.num_users, "items": data.num_items}
    if args.eval:
        model.eval()
        evaluator = Evaluator(data, params.evaluation.ks, params.evaluation.batch_size)
        times = []
        for _ in range(args.repeat + 1):           # the first is a warm-up, as every round after the first is not
            sync()
            t0 = time.perf_counter()
            evaluator.evaluate(model, "val", memory)
            sync()
            times.append(time.perf_counter() - t0)
            if times[-1] > 10:                     # a long evaluation is its own median
                break
        out["eval_seconds"] = statistics.median(times[1:] or times)
    stack.close()
    return out


# ------------------------------------------------------------------------------------------ driver

BUSY = """
import torch
torch.set_num_threads(1)
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a.T / 512)
"""


@contextlib.contextmanager
def busy_processes(n: int):
    """``n`` other torch processes (one thread each, a matmul loop) running while the block runs."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(n)]
    try:
        time.sleep(1.0 if n else 0.0)                  # past their imports: really busy
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def run_one(checkout: Path, prepared: Path, stage: str, clients: int, args) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", "--prepared", str(prepared),
           "--stage", stage, "--clients", str(clients), "--device", args.device, "--repeat", str(args.repeat)]
    cmd += [] if args.eval else ["--no-eval"]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    with busy_processes(args.busy):
        proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    if proc.returncode:
        print(f"  ! {checkout.name} {stage} {clients}: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def baseline_checkout(rev: str, cache: Path) -> Path:
    path = cache / f"baseline-{rev}"
    if not path.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev], check=True,
                       capture_output=True)
    return path


def floor(new: dict) -> str:
    """The round's backbone matrix products at the measured one-thread GEMM rate on every training process: no
    CPU round of this model can be faster (stage 3 adds the experts' products on top)."""
    if not new.get("floor_seconds"):
        return "-"
    return f"{new['floor_seconds']:.2f} s ({new['matmul_gflop']:.0f} GFLOP at {new['gemm_gflops']:.0f} GFLOP/s a thread)"


def fmt(new: dict | None, old: dict | None, key: str, unit: str) -> str:
    if new is None or key not in new:
        return "-"
    text = f"{new[key]:.2f}{unit}" if unit == " s" else f"{new[key]:.0f}{unit}"
    if old is not None and key in old and new[key] > 0:
        text += f" (was {old[key]:.2f}, {old[key] / new[key]:.1f}x)" if unit == " s" else f" (was {old[key]:.0f})"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--stages", default="pretrain_sasrec,finetune_moe")
    ap.add_argument("--clients", default="100,1000")
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--no-eval", dest="eval", action="store_false")
    ap.add_argument("--busy", type=int, default=0, help="other torch processes (1 thread each) kept busy meanwhile")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (and evaluations) timed; the median is shown")
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "feddmmr-scale"))
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prepared", help=argparse.SUPPRESS)
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        args.clients = int(args.clients)
        print(json.dumps(measure(args)))
        return
    data_root, cache = Path(args.data_root), Path(args.cache)
    if not (data_root / "ml-1m").is_dir():
        sys.exit(f"{data_root / 'ml-1m'} not found: pass --data-root with the MovieLens-1M folder")
    cache.mkdir(parents=True, exist_ok=True)
    import torch
    print(f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} device={args.device} "
          f"torch={torch.__version__} load average {os.getloadavg()[0]:.2f}"
          + (f"; {args.busy} other busy torch process(es) during each measurement" if args.busy else ""))
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    base = None if args.no_baseline else baseline_checkout(args.baseline, cache)
    print(f"this checkout: {REPO} vs baseline {args.baseline if base else '(none)'}")
    print("| data | stage | clients | targets | round | round memory | evaluation | executor, threads | matmul floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.datasets.split(","):
        prepared = prepared_dir(name, cache, data_root)
        for stage in args.stages.split(","):
            for n in (int(c) for c in args.clients.split(",")):
                new = run_one(REPO, prepared, stage, n, args)
                old = run_one(base, prepared, stage, n, args) if base else None
                if new is None:
                    continue
                print(f"| {name} ({new['users']} users, {new['items']} items) | {stage} | {new['clients']} | "
                      f"{new['targets']} | {fmt(new, old, 'seconds', ' s')} | {fmt(new, old, 'round_mb', ' MB')} | "
                      f"{fmt(new, old, 'eval_seconds', ' s')} | {new['executor']}, {new['threads']} "
                      f"(was {old['executor'] + ', ' + str(old['threads']) if old else '-'}) | {floor(new)} |", flush=True)


if __name__ == "__main__":
    main()
