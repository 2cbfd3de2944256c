"""How checkpoints' validation scores moved, side by side, from their own train_history.json and config.json.

    python benchmarks/val_paths.py checkpoints/pretrain_sasrec checkpoints/align_projectors ...
    python benchmarks/val_paths.py --client-epochs 5 10 20 30 runs/stage1 runs/centralized

Per checkpoint: the selection metric at the start (round or epoch 0: the loaded or fresh model), the change of the
first round, the best round with its score, the last round run, and the score every ``--every`` rounds. With
``--client-epochs``, the score at those amounts of training instead, in passes over each user's data: a federated
round is ``client_fraction * local_epochs`` of one (every user trains that share of a pass on average), a
centralized epoch is one; the scores compared are the best so far, as early stopping would keep them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(path: Path, metric: str) -> tuple[list[float], float, dict]:
    """(score per round, passes over the data per round, the checkpoint's training params)."""
    history = json.loads((path / "train_history.json").read_text())
    train = json.loads((path / "config.json").read_text()).get("train", {})
    protocol, _, name = metric.partition("/")
    scores = [v[protocol][name] for v in history["val"]]
    per_round = train["client_fraction"] * train["local_epochs"] if "client_fraction" in train else 1.0
    return scores, per_round, train


def describe(path: Path, metric: str, every: int, client_epochs: list[float]) -> str:
    scores, per_round, _ = load(path, metric)
    best = max(range(len(scores)), key=scores.__getitem__)
    first = f"{scores[1] - scores[0]:+.4f}" if len(scores) > 1 else "-"
    line = (f"{path.name:28s} start {scores[0]:.4f}  round 1 {first}  best r{best} {scores[best]:.4f}  "
            f"last r{len(scores) - 1} {scores[-1]:.4f}")
    if client_epochs:
        marks = []
        for e in client_epochs:
            r = round(e / per_round)
            marks.append(f"{e:g}:{max(scores[:r + 1]):.4f}" if r < len(scores) else f"{e:g}:-")
        return line + "  | best by client-epochs " + " ".join(marks)
    return line + "  | " + " ".join(f"{i}:{scores[i]:.4f}" for i in range(0, len(scores), every))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint folders (train_history.json, config.json)")
    ap.add_argument("--metric", default="full/NDCG@10", help="protocol/metric (default: full/NDCG@10)")
    ap.add_argument("--every", type=int, default=20, help="print the score every N rounds (default: 20)")
    ap.add_argument("--client-epochs", type=float, nargs="*", default=[],
                    help="print the best score reached by these passes over each user's data instead")
    args = ap.parse_args(argv)
    for path in args.checkpoints:
        if not (path / "train_history.json").is_file():
            raise SystemExit(f"val_paths: {path}/train_history.json not found: give checkpoint folders a stage "
                             f"or `feddmmr baseline centralized` wrote")
        print(describe(path, args.metric, max(1, args.every), args.client_epochs))


if __name__ == "__main__":
    main()
