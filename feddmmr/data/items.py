"""Item metadata from the raw data: titles and genres (movies.dat, u.item or a CSV) and optional free-text
descriptions, by raw item id; the text features embed them and recommendations show the titles."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from feddmmr.config import PrepareParams
from feddmmr.data.prepare import read_member
from feddmmr.errors import FeddmmrError

log = logging.getLogger("feddmmr")
BUNDLED_MINILM = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def _read_text(path: Path, member: str, encoding: str) -> tuple[str, Path]:
    return read_member(path, member, encoding, setting="features_text.movies")


def read_item_metadata(prep: PrepareParams, movies: str = "") -> tuple[dict[int, tuple[str, str]], list[Path]]:
    """{raw item id: (title, 'genre, genre')} from the dataset's movie file or a CSV."""
    texts: dict[int, tuple[str, str]] = {}
    if movies and Path(movies).suffix.lower() == ".csv" or (not movies and prep.source == "csv"):
        path = Path(movies) if movies else Path(prep.path).with_name("items.csv")
        if not path.is_file():
            raise FeddmmrError(f"item metadata not found: {path}; set features_text.movies to a CSV with item,title[,genres]")
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        if "item" not in frame or "title" not in frame:
            raise FeddmmrError(f"{path}: needs item and title columns (optional genres), found {list(frame.columns)}")
        for row in frame.itertuples():
            genres = getattr(row, "genres", "")
            texts[int(row.item)] = (row.title, genres.replace("|", ", "))
        return texts, [path]
    source = Path(movies) if movies else Path(prep.path)
    if prep.source == "ml-1m":
        text, src = _read_text(source, "movies.dat", "latin-1")
        for line in text.splitlines():
            parts = line.split("::")
            if len(parts) >= 3 and parts[0].strip().isdigit():
                texts[int(parts[0])] = (parts[1], parts[2].replace("|", ", "))
        return texts, [src]
    if prep.source == "ml-100k":
        text, src = _read_text(source, "u.item", "latin-1")
        try:
            genre_text, _ = _read_text(source, "u.genre", "latin-1")
            names = [ln.split("|")[0] for ln in genre_text.splitlines() if "|" in ln]
        except FeddmmrError:
            names = []
        for line in text.splitlines():
            parts = line.split("|")
            if len(parts) >= 5 and parts[0].strip().isdigit():
                flags = parts[-len(names):] if names else []
                genres = ", ".join(n for n, f in zip(names, flags) if f.strip() == "1")
                texts[int(parts[0])] = (parts[1], genres)
        return texts, [src]
    raise FeddmmrError(f"no item metadata reader for prepare.source={prep.source!r}; set features_text.movies to a CSV")


def item_text(title: str, genres: str) -> str:
    """'Title (Year). Genres: a, b.': what the text model embeds for an item."""
    return f"{title}. Genres: {genres}." if genres else f"{title}."


def item_titles(prep: PrepareParams, movies: str = "") -> dict[int, str]:
    """{raw item id: title}, or {} when the dataset has no item metadata (titles are then left blank)."""
    try:
        return {raw: title for raw, (title, _) in read_item_metadata(prep, movies)[0].items()}
    except FeddmmrError as exc:
        log.info("no item titles: %s", exc)
        return {}


def read_descriptions(path: str | Path) -> dict[int, str]:
    """{raw item id: description} from JSON {id: text} or the '::' extras format (plot = 10th field)."""
    path = Path(path)
    if not path.is_file():
        raise FeddmmrError(f"descriptions file not found: {path}; fix features_text.descriptions or set it to ''")
    raw = path.read_bytes().decode("utf-8", errors="replace")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise FeddmmrError(f"{path} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise FeddmmrError(f"{path}: expected a JSON object {{item_id: text}}")
        out = {}
        for k, v in data.items():
            text = v if isinstance(v, str) else (v.get("description") or v.get("plot") or "") if isinstance(v, dict) else ""
            if str(k).strip().isdigit() and text.strip():
                out[int(k)] = text.strip()
        return out
    out = {}
    for line in raw.splitlines():
        parts = line.strip().split("::")
        if len(parts) >= 10 and parts[0].isdigit() and parts[9].strip():
            out[int(parts[0])] = parts[9].strip()
    if not out:
        raise FeddmmrError(f"{path}: no descriptions found; expected JSON {{id: text}} or 'id::title::...::plot::poster' lines")
    return out
