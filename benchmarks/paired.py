"""Paired tests per test user between checkpoints, from the test ranks each one saved (test_ranks.safetensors).

    python benchmarks/paired.py runs/stage1 runs/stage3 [runs/other ...]

Each later checkpoint against the first: mean difference of per-user NDCG@10 (or --metric), its 95%
paired-bootstrap interval and the Wilcoxon signed-rank p, as `feddmmr compare` and `feddmmr sweep` print them
from MLflow; here for checkpoints trained outside a tracked pipeline (screens, one-off runs).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from feddmmr.errors import FeddmmrError
from feddmmr.evaluation.stats import TEST_RANKS, paired_test
from feddmmr.io import load_tensors


def ranks(path: Path, protocol: str):
    try:
        return load_tensors(path / TEST_RANKS, "test ranks", "give checkpoint folders a stage or a baseline "
                            "wrote")[protocol].numpy()
    except FeddmmrError as exc:
        raise SystemExit(f"paired: {exc}") from None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", type=Path, help="the reference first, then those tested against it")
    ap.add_argument("--metric", default="NDCG@10", help="per-user metric (default: NDCG@10)")
    ap.add_argument("--protocol", default="full", choices=("full", "sampled"))
    args = ap.parse_args(argv)
    reference = ranks(args.checkpoints[0], args.protocol)
    for path in args.checkpoints[1:]:
        test = paired_test(reference, ranks(path, args.protocol), args.metric)
        print(f"{path.name} vs {args.checkpoints[0].name} ({args.protocol}): {test.describe()}")


if __name__ == "__main__":
    main()
