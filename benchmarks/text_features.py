"""Benchmark: text feature extraction on the ML-1M top-1000 subset (CPU, offline MiniLM), with a
sanity check that movies sharing a genre are closer than random pairs.

    python benchmarks/text_features.py [--data-root ../shared/data] [--descriptions]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from feddmmr.config import PrepareParams
from feddmmr.modalities import TextFeatureParams
from feddmmr.data.prepare import load_prepared, prepare
from feddmmr.features.text import extract_text
from feddmmr.features.store import load_features

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--descriptions", action="store_true", help="add the MeLU plots to title + genres")
    args = ap.parse_args()
    root = Path(args.data_root)
    if not (root / "ml-1m" / "movies.dat").is_file():
        sys.exit(f"{root / 'ml-1m'} not found: this benchmark needs the real ML-1M files")
    print(f"machine: {platform.machine()} cores={os.cpu_count()} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    tmp = Path(tempfile.mkdtemp())
    prep = PrepareParams(source="ml-1m", path=str(root / "ml-1m"), top_k_users=1000)
    prepare(prep, tmp / "prepared")
    data = load_prepared(tmp / "prepared")
    tp = TextFeatureParams(descriptions=str(root / "text" / "ml1m_movies_extrainfos_MeLU.dat") if args.descriptions else "")
    report = extract_text(prep, tp, tmp / "prepared", tmp / "text", progress=False)
    print(f"items {report['items']}, covered {report['covered']} ({report['coverage_pct']:.1f}%), "
          f"with description {report['with_description']}, {report['dim']}-d, {report['seconds']:.1f} s")
    feats, mask = load_features(tmp / "text", data.num_items, 384)
    genres = {}
    for line in (root / "ml-1m" / "movies.dat").read_bytes().decode("latin-1").splitlines():
        mid, _, g = line.split("::")
        genres[int(mid)] = set(g.split("|"))
    item_genres = [genres.get(int(r), set()) for r in data.item_raw]
    rng = np.random.default_rng(0)
    a = rng.integers(1, data.num_items + 1, 200_000)
    b = rng.integers(1, data.num_items + 1, 200_000)
    keep = (a != b) & mask[a].numpy() & mask[b].numpy()
    a, b = a[keep], b[keep]
    cos = (feats[a] * feats[b]).sum(1).numpy()
    same = np.array([item_genres[i - 1] == item_genres[j - 1] for i, j in zip(a, b)])
    share = np.array([bool(item_genres[i - 1] & item_genres[j - 1]) for i, j in zip(a, b)])
    print(f"mean cosine: identical genre set {cos[same].mean():.3f} (n={same.sum()}), "
          f"sharing a genre {cos[share].mean():.3f} (n={share.sum()}), "
          f"no shared genre {cos[~share].mean():.3f} (n={(~share).sum()}), random pairs {cos.mean():.3f}")


if __name__ == "__main__":
    main()
