"""Ablation: how much of finetune_moe's gain over pretrain_sasrec comes from the multimodal memory term?

Runs finetune_moe again from the align_projectors checkpoint of a project where `dvc repro` has run,
with the gate started at 0 and frozen, and only the backbone training: the scores are then the
backbone's alone, on the same schedule, data and client sampling. It is a params change, so the same
run is a DVC experiment:

    dvc exp run -S 'finetune_moe.freeze=[item_embeddings,projections,gate,experts,router]' \
                -S finetune_moe.gate_start=0.0

This script runs it beside the project's outputs (nothing of the project is overwritten) and prints
the comparison with metrics/finetune_moe.json.

    python benchmarks/stage3_ablation.py --project /path/to/project [--out /tmp/stage3-ablation]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

from feddmmr.config import load_params
from feddmmr.stages import train_stage

ABLATION = ["finetune_moe.freeze=[item_embeddings,projections,gate,experts,router]", "finetune_moe.gate_start=0.0",
            "tracking.enabled=false"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", required=True, help="project folder after `dvc repro` (params.yaml, checkpoints/)")
    ap.add_argument("--out", default="/tmp/stage3-ablation")
    args = ap.parse_args()
    project, out = Path(args.project).resolve(), Path(args.out).resolve()
    print(f"machine: {platform.machine()} cores={os.cpu_count()} torch={torch.__version__} python={platform.python_version()}")
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    os.chdir(project)
    params = load_params("params.yaml", ABLATION)
    m = train_stage("finetune_moe", params, "data/prepared", out / "finetune_moe_gate0", out / "metrics.json",
                    progress=False, features_dir="features", init_dir="checkpoints/align_projectors")
    full = json.loads(Path("metrics/finetune_moe.json").read_text())
    print(f"{'finetune_moe':24s} {'best':>5s} {'val full NDCG@10':>17s} {'test full HR@10':>16s} "
          f"{'test full NDCG@10':>18s} {'test sampled HR@10':>19s}")
    for name, r in (("with memory term", full), ("gate 0, backbone only", m)):
        print(f"{name:24s} {r['best_round']:5d} {r['val']['full']['NDCG@10']:17.4f} {r['test']['full']['HR@10']:16.3f} "
              f"{r['test']['full']['NDCG@10']:18.4f} {r['test']['sampled']['HR@10']:19.3f}")


if __name__ == "__main__":
    main()
