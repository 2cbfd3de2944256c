"""A small synthetic interaction file with sequential structure: the embedded default dataset.

Items form genres of consecutive ids; each user prefers a few genres and mostly moves forward
through a genre (item i is often followed by i+1..i+3), so a sequential model can learn something
a popularity baseline cannot. Deterministic for a given seed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from feddmmr.io import atomic_path


def make_demo(num_users: int = 300, num_items: int = 400, genres: int = 10, seed: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    per_genre = num_items // genres
    rows = []
    for u in range(1, num_users + 1):
        liked = rng.choice(genres, size=rng.integers(2, 4), replace=False)
        length = int(np.clip(rng.lognormal(4.0, 0.45), 12, min(160, num_items // 2)))
        seen: set[int] = set()
        item = int(liked[0] * per_genre + rng.integers(per_genre)) + 1
        t = 880_000_000 + int(rng.integers(0, 10_000_000))
        while len(seen) < length:
            if item not in seen:
                seen.add(item)
                rows.append((u, item, int(rng.integers(3, 6)), t))
                t += int(rng.choice([0, 30, 60, 3600]))  # same-second ties happen
            r = rng.random()
            g = (item - 1) // per_genre
            if r < 0.7:      # move forward within the genre
                item = g * per_genre + ((item - 1) % per_genre + int(rng.integers(1, 4))) % per_genre + 1
            elif r < 0.92:   # jump within a liked genre
                item = int(rng.choice(liked) * per_genre + rng.integers(per_genre)) + 1
            else:            # explore anything
                item = int(rng.integers(1, num_items + 1))
    return pd.DataFrame(rows, columns=["user", "item", "rating", "timestamp"])


GENRE_NAMES = ["Action", "Adventure", "Animation", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
               "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def make_demo_items(num_items: int = 400, genres: int = 10) -> pd.DataFrame:
    """Titles and genres of the demo items (for text features): consecutive ids share a genre."""
    per_genre = num_items // genres
    rows = []
    for i in range(1, num_items + 1):
        g = min((i - 1) // per_genre, genres - 1)
        name = GENRE_NAMES[g % len(GENRE_NAMES)]
        rows.append((i, f"{name} story part {(i - 1) % per_genre + 1}", name))
    return pd.DataFrame(rows, columns=["item", "title", "genres"])


def write_demo(path: str | Path, num_users: int = 300, num_items: int = 400, genres: int = 10,
               seed: int = 7) -> pd.DataFrame:
    """Write interactions to ``path`` and item titles to ``items.csv`` beside it."""
    frame = make_demo(num_users=num_users, num_items=num_items, genres=genres, seed=seed)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    with atomic_path(Path(path).with_name("items.csv")) as tmp:
        make_demo_items(num_items, genres).to_csv(tmp, index=False)
    return frame
