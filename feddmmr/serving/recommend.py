"""Top-k recommendations from a stage checkpoint, for users of the training data or for new users.

A known user is scored from their whole history (every interaction, test item included) and, for a
multimodal checkpoint, their client memory. A new user is an item history in time order: the
sequential model needs no retraining for them, and they start with an empty memory. Known items are
excluded unless asked. Ids in and out are the dataset's original ids.

Results are one row per recommended item: ``request`` (the input row), ``user`` (original id, -1 for
a new user), ``rank`` (1 = best), ``item`` (original id), ``title`` ("" where the dataset has none),
``score`` (the model's logit).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from feddmmr.data.prepare import Prepared, left_pad, load_prepared
from feddmmr.errors import FeddmmrError
from feddmmr.io import atomic_path
from feddmmr.model import FedDMMR
from feddmmr.model.memory import MemoryBank
from feddmmr.training.checkpoint import load_checkpoint

COLUMNS = ["request", "user", "rank", "item", "title", "score"]
NEW_USER = -1


def exact_id(value, what: str) -> int:
    """An id as an exact int: 7, '7', 7.0 and '7.0' are 7; 1.5, '1e3', true, '' and lists are refused."""
    if isinstance(value, (bool, np.bool_)):
        raise FeddmmrError(f"{what} {value!r} is not an integer id")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+(?:\.0*)?\s*", value):
        return int(value.strip().split(".")[0])
    raise FeddmmrError(f"{what} {value!r} is not an integer id; ids are whole numbers, as in the training data")


class Recommender:
    def __init__(self, model: FedDMMR, data: Prepared, memory: MemoryBank | None, titles: dict[int, str],
                 stage: str = "", batch_size: int = 256):
        self.model, self.data, self.memory, self.stage = model.eval(), data, memory, stage
        self.titles = [""] + [titles.get(int(raw), "") for raw in data.item_raw]   # by item index
        self.user_index = {int(raw): u for u, raw in enumerate(data.user_raw)}
        self.item_index = {int(raw): i for i, raw in enumerate(data.item_raw, start=1)}
        self.batch_size = batch_size

    @classmethod
    def load(cls, checkpoint: str | Path, data_dir: str | Path, features_dir: str | Path,
             titles: dict[int, str] | None = None) -> Recommender:
        data = load_prepared(data_dir)
        model, config, memory = load_checkpoint(checkpoint, data, features_dir)
        return cls(model, data, memory, titles or {}, config["stage"])

    # ------------------------------------------------------------------ ids
    def users(self, raw_users) -> list[int]:
        raw_users = [exact_id(u, "user id") for u in raw_users]
        unknown = [u for u in raw_users if u not in self.user_index]
        if unknown:
            raise FeddmmrError(f"unknown user id {unknown[0]} ({len(unknown)} unknown in all); known users are the "
                               f"{len(self.user_index)} of the prepared data (e.g. {int(self.data.user_raw[0])}); "
                               f"recommend for a new user with --history")
        return [self.user_index[u] for u in raw_users]

    def history(self, raw_items) -> np.ndarray:
        raw_items = [exact_id(i, "item id") for i in raw_items]
        unknown = [i for i in raw_items if i not in self.item_index]
        if unknown:
            raise FeddmmrError(f"unknown item id {unknown[0]} in the history; the model knows the "
                               f"{len(self.item_index)} items of the prepared data (e.g. {int(self.data.item_raw[0])})")
        if not len(raw_items):
            raise FeddmmrError("an empty history: give at least one item id the user interacted with, oldest first")
        return np.array([self.item_index[i] for i in raw_items], dtype=np.int64)

    # ------------------------------------------------------------------ recommendations
    def for_users(self, raw_users, k: int = 10, include_known: bool = False) -> pd.DataFrame:
        """Top-k for users of the training data (original ids)."""
        users = self.users(raw_users)
        seqs = [self.data.sequence(u) for u in users]
        return self._recommend(seqs, users, [exact_id(r, "user id") for r in raw_users], k, include_known)

    def for_histories(self, histories, k: int = 10, include_known: bool = False) -> pd.DataFrame:
        """Top-k for new users, each an item history (original ids, oldest first) and an empty memory."""
        seqs = [self.history(h) for h in histories]
        return self._recommend(seqs, [None] * len(seqs), [NEW_USER] * len(seqs), k, include_known)

    def _recommend(self, seqs: list[np.ndarray], users: list[int | None], raw_users: list[int], k: int,
                   include_known: bool) -> pd.DataFrame:
        if k < 1:
            raise FeddmmrError(f"k must be at least 1, got {k}")
        rows = []
        for lo in range(0, len(seqs), self.batch_size):
            items, scores = self._top_k(seqs[lo:lo + self.batch_size], users[lo:lo + self.batch_size], k, include_known)
            for j in range(len(items)):
                for rank, (item, score) in enumerate(zip(items[j], scores[j]), start=1):
                    if np.isfinite(score):   # fewer than k candidates: excluded items are never padding
                        rows.append((lo + j, raw_users[lo + j], rank, int(self.data.item_raw[item - 1]),
                                     self.titles[item], float(score)))
        return pd.DataFrame(rows, columns=COLUMNS)

    @torch.no_grad()
    def _top_k(self, seqs: list[np.ndarray], users: list[int | None], k: int,
               include_known: bool) -> tuple[np.ndarray, np.ndarray]:
        """Item indices [n, k] and scores [n, k] of one batch; excluded items score -inf."""
        L = self.data.max_seq_len
        x = torch.from_numpy(np.stack([left_pad(s, L) for s in seqs]))             # [n, L]
        h = self.model.encode(x)[:, -1]                                             # [n, d]
        scores = self.model.score_all(h, **self._memory(users))                     # [n, I], column j = item j+1
        if not torch.isfinite(scores).all():
            raise FeddmmrError(f"the {self.stage or 'checkpoint'} model gives non-finite scores; its weights are "
                               f"unusable: retrain the stage (`dvc repro`)")
        if not include_known:
            for j, s in enumerate(seqs):
                scores[j, torch.from_numpy(s - 1)] = float("-inf")
        top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        return (top.indices + 1).numpy(), top.values.numpy()

    def _memory(self, users: list[int | None]) -> dict[str, torch.Tensor]:
        """Memory slots of known users; a new user's are all empty."""
        if not self.model.multimodal:
            return {}
        ids = torch.zeros(len(users), self.memory.slots, dtype=torch.long)            # [n, S + R]
        known = [j for j, u in enumerate(users) if u is not None]
        if known:
            ids[known] = self.memory.retrieve([users[j] for j in known])[0]
        return {"mem_ids": ids, "visible": ids > 0}


# ----------------------------------------------------------------------------------------------
# Files and tables
# ----------------------------------------------------------------------------------------------

def read_users(path: str | Path) -> list[int]:
    """User ids from a JSON list, or a text/CSV file with one id per line (an optional ``user`` header)."""
    path = Path(path)
    if not path.is_file():
        raise FeddmmrError(f"users file not found: {path}; give a JSON list or one user id per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FeddmmrError(f"{path} is not UTF-8 text (byte {exc.start}); give a JSON list or one user id per line") from None
    except IsADirectoryError:
        raise FeddmmrError(f"{path} is a directory; give a file with a JSON list or one user id per line") from None
    try:
        values = json.loads(text) if path.suffix.lower() == ".json" else \
            [line.split(",")[0].strip() for line in text.splitlines() if line.strip()]
        if values and not path.suffix.lower() == ".json" and values[0].lower() in ("user", "user_id"):
            values = values[1:]
        if not isinstance(values, list):
            raise TypeError(f"a JSON {type(values).__name__}")
        users = [exact_id(v, "user id") for v in values]
    except (ValueError, TypeError, FeddmmrError) as exc:
        raise FeddmmrError(f"{path}: not a list of user ids ({exc}); give a JSON list or one user id per line") from None
    if not users:
        raise FeddmmrError(f"{path} holds no user ids")
    return users


def parse_history(text: str) -> list[int]:
    """--history's item ids (comma or space separated, oldest first); at least one."""
    try:
        items = [exact_id(v, "item id") for v in text.replace(",", " ").split()]
    except FeddmmrError:
        items = []
    if not items:
        raise FeddmmrError(f"--history {text!r}: give original item ids, oldest first, e.g. --history 1193,661,914")
    return items


def write_recommendations(frame: pd.DataFrame, path: str | Path) -> None:
    """CSV, or JSON records when ``path`` ends in .json; written atomically."""
    with atomic_path(path) as tmp:
        if Path(path).suffix.lower() == ".json":
            tmp.write_text(frame.to_json(orient="records", indent=1, force_ascii=False), encoding="utf-8")
        else:
            frame.to_csv(tmp, index=False)


def format_table(frame: pd.DataFrame) -> str:
    """rank, item, score and title of one request's recommendations, as aligned text."""
    width = max([4] + [len(str(i)) for i in frame["item"]])
    lines = [f"{'rank':>4}  {'item':>{width}}  {'score':>8}  title"]
    lines += [f"{r.rank:>4}  {r.item:>{width}}  {r.score:>8.3f}  {r.title}" for r in frame.itertuples()]
    return "\n".join(lines)
