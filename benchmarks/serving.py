"""Benchmark: latency and throughput of the served model (`mlflow models serve`) and of the model in process.

Starts `mlflow models serve -m <model> --env-manager local` on 127.0.0.1, then measures
- the latency of one request for one known user (median and p95 of --repeats requests, after a warm-up),
- the same for a new user given as a 20-item history,
- the throughput of one request for --batch known users,
and the same batch through the pyfunc loaded in this process (no HTTP, no JSON).

    MLFLOW_TRACKING_URI=sqlite:///$PWD/mlruns.db python benchmarks/serving.py \
        [--model models:/feddmmr@champion] [--batch 1000] [--repeats 50] [-k 10]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import torch

from feddmmr.tracking.store import tracking_uri


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def timed(fn, repeats: int) -> list[float]:
    fn()                                   # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def serve(model: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": tracking_uri()}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"mlflow models serve exited with {proc.returncode}")
            time.sleep(0.5)
    sys.exit("mlflow models serve did not answer in 300 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models:/feddmmr@champion")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("-k", type=int, default=10)
    args = ap.parse_args()

    mlflow.set_tracking_uri(tracking_uri())
    t0 = time.perf_counter()
    pyfunc = mlflow.pyfunc.load_model(args.model)
    load_s = time.perf_counter() - t0
    rec = pyfunc.unwrap_python_model().recommender
    users = [int(u) for u in rec.data.user_raw[:args.batch]]
    history = [int(i) for i in rec.data.item_raw[:20]]
    params = {"k": args.k}

    port = free_port()
    t0 = time.perf_counter()
    server = serve(args.model, port)
    start_s = time.perf_counter() - t0
    try:
        one = timed(lambda: post(port, {"dataframe_records": [{"user": users[0]}], "params": params}), args.repeats)
        new = timed(lambda: post(port, {"dataframe_records": [{"history": history}], "params": params}), args.repeats)
        batch = timed(lambda: post(port, {"dataframe_records": [{"user": u} for u in users], "params": params}), 3)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    local = timed(lambda: pyfunc.predict(pd.DataFrame({"user": users}), params=params), 3)

    ms = lambda xs: f"median {1000 * statistics.median(xs):.1f} ms, p95 {1000 * sorted(xs)[int(0.95 * (len(xs) - 1))]:.1f} ms"  # noqa: E731
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, python {platform.python_version()}")
    print(f"command: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
    print(f"model: {args.model} (stage {rec.stage}, {rec.data.num_users} users, {rec.data.num_items} items), k={args.k}")
    print(f"load in process: {load_s:.1f} s; server start to first /ping: {start_s:.1f} s")
    print(f"REST, one known user:            {ms(one)} ({args.repeats} requests)")
    print(f"REST, one new user (20 items):   {ms(new)} ({args.repeats} requests)")
    best = min(batch)
    print(f"REST, {len(users)} users in one request: {best:.2f} s, {len(users) / best:.0f} users/s (best of 3)")
    best = min(local)
    print(f"in process, {len(users)} users:        {best:.2f} s, {len(users) / best:.0f} users/s (best of 3)")


if __name__ == "__main__":
    main()
