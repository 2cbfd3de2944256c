"""Benchmark: seconds per round of a stage on a Flower loopback federation (a SuperLink and --nodes
SuperNodes on 127.0.0.1, started by `feddmmr train --engine flower`) against the simulator, for --clients
clients per round on the demo data, and where a Flower round's time goes (the ServerApp's per-round log:
process start of the slowest node's ClientApp, loading its data and model, training; for stages 2-3 also
the validation on the nodes).

    python benchmarks/flower_round.py [--stage pretrain_sasrec] [--clients 10] [--rounds 3] [--nodes 2]

Stage 1 is validated on the server in both engines. Stages 2-3 start from the same stage-1 checkpoint
(trained here by the simulator, 2 rounds) with the demo's text features; on Flower the SuperNodes keep the
client memories and validate their users with them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from feddmmr.modalities import NAMES

REPO = Path(__file__).resolve().parents[1]


def train(root: Path, stage: str, engine: str, overrides: list[str]) -> tuple[dict, float, list[str]]:
    """(metrics, wall seconds, the ServerApp's per-round lines) of one `feddmmr train` in ``root``."""
    start = [] if stage == "pretrain_sasrec" else ["--init", "ck/pretrain_sasrec"]
    args = [sys.executable, "-m", "feddmmr", "train", "--stage", stage, "--engine", engine, *start,
            "--out", f"ck/{engine}", "--metrics", f"m/{engine}.json"] + [a for o in overrides for a in ("-S", o)]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "DO_NOT_TRACK": "true",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=root, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{engine}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    lines = list(dict.fromkeys(m.group(0) for m in re.finditer(r"(round \d+|evaluating val) on \d+ SuperNodes.*",
                                                                proc.stdout)))
    summary = proc.stdout[proc.stdout.rfind('{\n  "stage"'):]          # what `feddmmr train` prints last
    return json.loads(summary), wall, lines


def feddmmr(root: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "feddmmr", "-q", *args], cwd=root, check=True, capture_output=True)


def start_checkpoint(root: Path) -> None:
    """What stages 2-3 start from: item features of the demo data and a stage-1 checkpoint (the simulator)."""
    for modality in NAMES:
        feddmmr(root, "features", modality)
    feddmmr(root, "train", "-S", "pretrain_sasrec.rounds=2", "-S", "tracking.enabled=false", "--out", "ck/pretrain_sasrec",
            "--metrics", "m/pretrain_sasrec.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=10, help="clients per round (default: 10)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=2, help="SuperNodes (user partitions) (default: 2)")
    ap.add_argument("--stage", default="pretrain_sasrec", choices=["pretrain_sasrec", "align_projectors", "finetune_moe"])
    args = ap.parse_args()
    stage = args.stage
    with tempfile.TemporaryDirectory(prefix="flower-bench-") as tmp:
        root = Path(tmp)
        shutil.copytree(REPO / "data" / "demo", root / "data" / "demo")
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        feddmmr(root, "prepare")
        users = json.loads((root / "data/prepared/meta.json").read_text())["num_users"]
        overrides = [f"{stage}.rounds={args.rounds}", f"{stage}.client_fraction={args.clients / users}",
                     f"{stage}.patience=1000", "tracking.enabled=false", f"federation.nodes={args.nodes}"]
        if stage != "pretrain_sasrec":
            start_checkpoint(root)
            overrides.append(f"{stage}.init_from=pretrain_sasrec")
        results = {engine: train(root, stage, engine, overrides) for engine in ("simulation", "flower")}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}")
    print(f"{stage} on the demo data ({users} users), {args.clients} clients per round, {args.rounds} rounds, "
          f"flower on {args.nodes} SuperNodes on 127.0.0.1")
    for engine, (metrics, wall, _) in results.items():
        print(f"  {engine:<10} {metrics['seconds_per_round']:6.2f} s per round (with validation); command wall "
              f"{wall:6.1f} s; test full NDCG@10 {metrics['test']['full']['NDCG@10']:.4f}")
    for line in results["flower"][2]:
        print("  " + line)


if __name__ == "__main__":
    main()
