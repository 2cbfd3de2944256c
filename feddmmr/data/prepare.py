"""Data layer: ingest interaction files, subset users, build contiguous ids and leave-one-out splits.

Prepared data (one directory, written atomically):
    sequences.npz   items [sum n_u] int64, offsets [U+1] int64 (user u's chronological items are
                    items[offsets[u]:offsets[u+1]]), eval_negatives [U, N] int64
    user_map.csv    raw_user,user        (user index 0..U-1, most active first)
    item_map.csv    raw_item,item        (item index 1..I, 0 is padding)
    meta.json       source, hashes, counts, parameters

Leave-one-out split of a user's sequence s_1..s_n: test target s_n (input s_1..s_{n-1}), validation
target s_{n-1} (input s_1..s_{n-2}), training on s_1..s_{n-2}.
"""
from __future__ import annotations

import csv
import hashlib
import io
import zipfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from feddmmr.config import PrepareParams
from feddmmr.errors import FeddmmrError
from feddmmr.io import atomic_dir, exclusive, file_sha256, read_json, write_json

SOURCES = ("ml-1m", "ml-100k", "csv")
COLUMN_ALIASES = {
    "user": ("user", "user_id", "userid", "uid"),
    "item": ("item", "item_id", "itemid", "movie_id", "movieid", "iid"),
    "timestamp": ("timestamp", "time", "ts", "unix_time"),
    "rating": ("rating", "score"),
}


# ----------------------------------------------------------------------------------------------
# Ingest
# ----------------------------------------------------------------------------------------------

def check_text(path: Path, expected: str) -> None:
    """Refuse at once a file that is not text (NUL bytes in its first 64 KiB: a binary or sparse file), before
    reading what may be gigabytes of it."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    nul = head.find(b"\0")
    if nul >= 0:
        raise FeddmmrError(f"{path} is not a text file (NUL bytes at byte {nul}); expected {expected}")


def read_member(path: Path, member: str, encoding: str, setting: str = "prepare.path") -> tuple[str, Path]:
    """Text of ``member`` from a folder, a zip archive or the file itself; errors name ``setting`` as the fix."""
    if path.is_dir():
        f = path / member
        if not f.is_file():
            raise FeddmmrError(f"{f} not found; point {setting} at the folder or zip that holds {member}")
        check_text(f, member)
        return f.read_bytes().decode(encoding), f
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.split("/")[-1] == member]
            if not names:
                raise FeddmmrError(f"{path} has no {member}; point {setting} at the official archive (e.g. ml-1m.zip)")
            return zf.read(sorted(names, key=len)[0]).decode(encoding), path
    if path.is_file():
        check_text(path, member)
        return path.read_bytes().decode(encoding), path
    raise FeddmmrError(f"input not found: {path}; set {setting} to the dataset folder, zip or file")


ID_COLUMNS = ("user", "item")
INT64_RANGE = (-(1 << 63), (1 << 63) - 1)


def _parse_ids(frame: pd.DataFrame, source: Path) -> pd.DataFrame:
    """User and item ids as exact int64, read from their text (never through float: 2^53 + 1 stays itself).

    '42' and '42.0' are the id 42; anything else (1.5, 1e20, abc) or an integer outside int64 is refused,
    naming the data row."""
    for col in ID_COLUMNS:
        text = frame[col].astype(str).str.strip()
        whole = text.str.fullmatch(r"[+-]?\d+(?:\.0*)?")
        if not whole.all():
            row = int(np.flatnonzero(~whole.to_numpy())[0])
            raise FeddmmrError(f"{source}: {col} id {text.iloc[row]!r} in data row {row + 1} is not an integer; "
                               f"{col} ids must be whole numbers (map other ids to integers first)")
        digits = text.str.replace(r"\.0*$", "", regex=True)
        codes, uniq = pd.factorize(digits)                     # a few thousand distinct ids: exact Python ints
        exact = [int(v) for v in uniq]
        out = [v for v in exact if not INT64_RANGE[0] <= v <= INT64_RANGE[1]]
        if out:
            row = int(np.flatnonzero(digits.to_numpy() == uniq[exact.index(out[0])])[0])
            raise FeddmmrError(f"{source}: {col} id {out[0]} in data row {row + 1} does not fit a signed 64-bit "
                               f"integer (|id| < 2^63); map the ids to smaller integers first")
        frame[col] = np.asarray(exact, dtype=np.int64)[codes]
    return frame


def _parse_numeric(frame: pd.DataFrame, cols: list[str], source: Path, fmt: str) -> pd.DataFrame:
    for col in cols:
        values = pd.to_numeric(frame[col], errors="coerce")
        bad = values.isna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise FeddmmrError(
                f"{source}: non-numeric {col} {frame[col].iloc[row]!r} in data row {row + 1}; expected {fmt}"
            )
        frame[col] = values
    return frame


def _read_delimited(text: str, sep: str, names: list[str], source: Path, fmt: str) -> pd.DataFrame:
    if not text.strip():
        raise FeddmmrError(f"{source} is empty; expected {fmt}")
    first = text.split("\n", 1)[0]
    if first.count(sep) < len(names) - 1:
        raise FeddmmrError(
            f"{source}: first line {first[:60]!r} is not separated by {sep!r}; expected {fmt} "
            f"(wrong file or wrong prepare.source?)"
        )
    frame = _read_table(io.StringIO(text), source, fmt, sep=sep, header=None, names=names, usecols=range(len(names)))
    return _parse_numeric(_parse_ids(frame, source), [c for c in names if c not in ID_COLUMNS], source, fmt)


def _read_table(text: io.StringIO | Path, source: Path, fmt: str, **kwargs) -> pd.DataFrame:
    """pandas' CSV reader on text columns; a malformed line (too many fields, an open quote) is one line."""
    try:
        return pd.read_csv(text, dtype=str, engine="c", keep_default_na=False, **kwargs)
    except (pd.errors.ParserError, ValueError) as exc:
        raise FeddmmrError(f"{source}: {str(exc).strip().splitlines()[-1]}; expected {fmt}") from None


def read_ml1m(path: Path) -> pd.DataFrame:
    fmt = "UserID::MovieID::Rating::Timestamp"
    text, source = read_member(path, "ratings.dat", "latin-1")
    return _read_delimited(text.replace("::", "\t"), "\t", ["user", "item", "rating", "timestamp"], source, fmt)


def read_ml100k(path: Path) -> pd.DataFrame:
    fmt = "tab-separated user item rating timestamp (u.data)"
    text, source = read_member(path, "u.data", "latin-1")
    return _read_delimited(text, "\t", ["user", "item", "rating", "timestamp"], source, fmt)


def read_csv_interactions(path: Path) -> pd.DataFrame:
    fmt = "a CSV with a header naming user,item,timestamp[,rating] columns"
    if not path.is_file():
        raise FeddmmrError(f"input not found: {path}; set prepare.path to your interaction file")
    check_text(path, fmt)
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        header = f.readline(1 << 16).rstrip("\r\n")
    if not header.strip():
        raise FeddmmrError(f"{path} is empty; expected {fmt}")
    try:
        sep = csv.Sniffer().sniff(header, delimiters=",;\t|").delimiter
    except csv.Error:
        raise FeddmmrError(f"{path}: cannot find the column separator in the header {header[:60]!r}; expected {fmt}") from None
    frame = _read_table(path, path, fmt, sep=sep, encoding="utf-8-sig", encoding_errors="replace")
    lower = {c.strip().lower(): c for c in frame.columns}
    rename = {}
    for canon, aliases in COLUMN_ALIASES.items():
        found = next((lower[a] for a in aliases if a in lower), None)
        if found is None and canon != "rating":
            raise FeddmmrError(f"{path}: no {canon!r} column in header {list(frame.columns)}; expected {fmt}")
        if found is not None:
            rename[found] = canon
    frame = frame.rename(columns=rename)[list(rename.values())]
    if "rating" not in frame:
        frame["rating"] = "1"
    return _parse_numeric(_parse_ids(frame, path), ["timestamp", "rating"], path, fmt)


def read_interactions(source: str, path: str | Path) -> pd.DataFrame:
    """Raw interactions in file order: columns user, item, rating, timestamp (numeric, raw ids)."""
    path = Path(path)
    if source == "ml-1m":
        frame = read_ml1m(path)
    elif source == "ml-100k":
        frame = read_ml100k(path)
    elif source == "csv":
        frame = read_csv_interactions(path)
    else:
        raise FeddmmrError(f"prepare.source must be one of {', '.join(SOURCES)}, got {source!r}")
    if len(frame) == 0:
        raise FeddmmrError(f"{path} holds no interactions")
    return frame.reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# Subset, ids, chronological sequences, evaluation negatives
# ----------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    items: np.ndarray          # [sum n_u] contiguous item ids in chronological order per user
    offsets: np.ndarray        # [U+1]
    eval_negatives: np.ndarray  # [U, N]
    user_raw: np.ndarray       # [U] raw user id of user index u
    item_raw: np.ndarray       # [I] raw item id of item index i+1
    max_seq_len: int
    meta: dict                 # meta.json: source, hashes, counts, parameters

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_items(self) -> int:
        return len(self.item_raw)

    @cached_property
    def items_sha256(self) -> str:
        """What feature files are built for: the item map (raw id of each item index), by hash."""
        return ids_sha256(self.item_raw)

    @cached_property
    def users_sha256(self) -> str:
        """The user map by hash: with ``items_sha256``, what a checkpoint was trained on."""
        return ids_sha256(self.user_raw)

    def sequence(self, u: int) -> np.ndarray:
        return self.items[self.offsets[u]:self.offsets[u + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def ids_sha256(ids: np.ndarray) -> str:
    """sha256 of an id map (raw ids in index order, as little-endian int64)."""
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


def build_sequences(frame: pd.DataFrame, top_k_users: int, min_user_interactions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Filter users, keep the top-K most active, map ids, and order each user's items by time.

    Ties are resolved deterministically: users with equal counts keep the order of their first
    appearance in the file; interactions with equal timestamps keep file order.
    """
    if min_user_interactions < 3:
        raise FeddmmrError("prepare.min_user_interactions must be >= 3 (leave-one-out needs train, validation and test items)")
    user = frame["user"].to_numpy()
    uniq, first_idx, counts = np.unique(user, return_index=True, return_counts=True)
    keep = counts >= min_user_interactions
    uniq, first_idx, counts = uniq[keep], first_idx[keep], counts[keep]
    order = np.lexsort((first_idx, -counts))  # count desc, then first appearance
    if top_k_users > len(uniq):
        raise FeddmmrError(f"prepare.top_k_users is {top_k_users}, but the data has only {len(uniq)} users with >= "
                           f"{min_user_interactions} interactions; lower prepare.top_k_users (0 keeps all users)")
    if top_k_users > 0:
        order = order[:top_k_users]
    kept_users = uniq[order]
    if len(kept_users) == 0:
        raise FeddmmrError(
            f"no user has >= {min_user_interactions} interactions; lower prepare.min_user_interactions or check the input file"
        )
    user_index = pd.Series(np.arange(len(kept_users)), index=kept_users)
    mask = frame["user"].isin(kept_users).to_numpy()
    sub = frame.loc[mask]
    u = user_index.loc[sub["user"].to_numpy()].to_numpy()
    item_raw = np.unique(sub["item"].to_numpy())
    i = np.searchsorted(item_raw, sub["item"].to_numpy()) + 1  # 0 is padding
    ts = sub["timestamp"].to_numpy()
    row = np.flatnonzero(mask)
    order = np.lexsort((row, ts, u))  # user, then time, then file order
    items = i[order].astype(np.int64)
    counts_u = np.bincount(u, minlength=len(kept_users))
    offsets = np.concatenate([[0], np.cumsum(counts_u)]).astype(np.int64)
    return items, offsets, kept_users.astype(np.int64), item_raw.astype(np.int64)


def sample_eval_negatives(items: np.ndarray, offsets: np.ndarray, num_items: int, n: int, seed: int) -> np.ndarray:
    """``n`` distinct items per user that the user never interacted with, drawn once with ``seed``."""
    num_users = len(offsets) - 1
    lengths = np.diff(offsets)
    if n <= 0:
        return np.zeros((num_users, 0), dtype=np.int64)
    user_of = np.repeat(np.arange(num_users), lengths)
    distinct = np.bincount(np.unique(user_of * (num_items + 1) + items) // (num_items + 1), minlength=num_users)
    worst = int(distinct.max())                                        # repeated items count once
    unseen_min = num_items - worst
    if unseen_min < n:
        raise FeddmmrError(
            f"a user has interacted with {worst} of {num_items} items, leaving {unseen_min} < {n} items for the sampled "
            f"protocol; lower prepare.eval_negatives"
        )
    gen = torch.Generator().manual_seed(seed)
    out = np.empty((num_users, n), dtype=np.int64)
    chunk = 1024
    for start in range(0, num_users, chunk):
        stop = min(start + chunk, num_users)
        keys = torch.rand(stop - start, num_items + 1, generator=gen)
        keys[:, 0] = 2.0  # padding is never a candidate
        sel = (user_of >= start) & (user_of < stop)
        keys[torch.from_numpy(user_of[sel] - start), torch.from_numpy(items[sel])] = 2.0
        out[start:stop] = torch.topk(keys, n, dim=1, largest=False).indices.numpy()
    return out


def prepare(params: PrepareParams, out_dir: str | Path) -> dict:
    """Ingest ``params.path``, build the subset and write the prepared directory atomically; a second writer of
    ``out_dir`` is refused at once (the one-writer lock every output has)."""
    if params.max_seq_len < 2:
        raise FeddmmrError("prepare.max_seq_len must be >= 2")
    frame = read_interactions(params.source, params.path)   # bad input fails before anything is created
    with exclusive(out_dir):
        return _prepare(params, frame, out_dir)


def _prepare(params: PrepareParams, frame: pd.DataFrame, out_dir: str | Path) -> dict:
    items, offsets, user_raw, item_raw = build_sequences(frame, params.top_k_users, params.min_user_interactions)
    negatives = sample_eval_negatives(items, offsets, len(item_raw), params.eval_negatives, params.seed)
    src = Path(params.path)
    files = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src]
    wanted = {"ml-1m": {"ratings.dat", "movies.dat"}, "ml-100k": {"u.data", "u.item"}}.get(params.source)
    if wanted is not None and src.is_dir():
        files = [p for p in files if p.name in wanted]
    lengths = np.diff(offsets)
    meta = {
        "source": params.source,
        "path": str(params.path),
        "source_sha256": {str(p): file_sha256(p) for p in files},
        "num_users": int(len(user_raw)),
        "num_items": int(len(item_raw)),
        "num_interactions": int(len(items)),
        "raw_interactions": int(len(frame)),
        "sequence_length": {"min": int(lengths.min()), "mean": float(lengths.mean()), "max": int(lengths.max())},
        "params": {k: getattr(params, k) for k in params.__dataclass_fields__},
    }
    with atomic_dir(out_dir) as tmp:
        np.savez(tmp / "sequences.npz", items=items, offsets=offsets, eval_negatives=negatives)
        pd.DataFrame({"raw_user": user_raw, "user": np.arange(len(user_raw))}).to_csv(tmp / "user_map.csv", index=False)
        pd.DataFrame({"raw_item": item_raw, "item": np.arange(1, len(item_raw) + 1)}).to_csv(tmp / "item_map.csv", index=False)
        write_json(tmp / "meta.json", meta)
    return meta


def load_prepared(data_dir: str | Path) -> Prepared:
    data_dir = Path(data_dir)
    fix = "run `feddmmr prepare` (or `dvc repro prepare`) first"
    npz = data_dir / "sequences.npz"
    if not npz.is_file():
        raise FeddmmrError(f"prepared data not found: {npz} ({fix})")
    meta = read_json(data_dir / "meta.json", "prepared-data metadata")
    try:
        with np.load(npz, allow_pickle=False) as z:
            items, offsets, negatives = z["items"], z["offsets"], z["eval_negatives"]
    except Exception as exc:   # zipfile, numpy and KeyError variants of a damaged or foreign file
        raise FeddmmrError(f"{npz} could not be read ({type(exc).__name__}: {str(exc)[:120]}); {fix}") from None
    users, item_map = (_read_map(data_dir / name, column, fix) for name, column in
                       (("user_map.csv", "raw_user"), ("item_map.csv", "raw_item")))
    if (len(users) != len(offsets) - 1 or len(item_map) != meta.get("num_items") or offsets[0] != 0
            or offsets[-1] != len(items) or (np.diff(offsets) < 0).any()
            or (len(items) and not 1 <= items.min() <= items.max() <= len(item_map))):
        raise FeddmmrError(f"{data_dir}: id maps, offsets and items of sequences.npz do not agree; {fix}")
    return Prepared(items=items, offsets=offsets, eval_negatives=negatives,
                    user_raw=users["raw_user"].to_numpy(), item_raw=item_map["raw_item"].to_numpy(),
                    max_seq_len=int(meta["params"]["max_seq_len"]), meta=meta)


def _read_map(path: Path, column: str, fix: str) -> pd.DataFrame:
    """An id map of the prepared data (raw id, index), raw ids as int64."""
    if not path.is_file():
        raise FeddmmrError(f"prepared data incomplete: {path} is missing ({fix})")
    try:
        frame = pd.read_csv(path, dtype={column: np.int64})
    except (ValueError, pd.errors.ParserError, OverflowError) as exc:
        raise FeddmmrError(f"{path} could not be read ({str(exc)[:120]}); {fix}") from None
    if column not in frame:
        raise FeddmmrError(f"{path} has no {column} column; {fix}")
    return frame


# ----------------------------------------------------------------------------------------------
# Model inputs
# ----------------------------------------------------------------------------------------------

def left_pad(seq: np.ndarray, length: int) -> np.ndarray:
    """Last ``length`` items of ``seq``, left-padded with 0."""
    out = np.zeros(length, dtype=np.int64)
    tail = seq[-length:] if len(seq) else seq
    out[length - len(tail):] = tail
    return out
