"""The feature files: each modality is written, atomically, as one directory ``features/<name>/``:

    features.safetensors   features [I+1, D] float32 (L2-normalised rows; row 0 = padding = zeros),
                           mask [I+1] bool (True where the item has this modality)
    report.json            model, dims, coverage, source files' hashes (the seconds taken are returned, not
                           written: identical work gives identical outputs)

An item without the modality gets a zero row with mask False, never random noise. Every read checks the file
against the prepared data (item map, shapes) before any tensor is allocated.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from feddmmr.data.prepare import Prepared
from feddmmr.errors import FeddmmrError
from feddmmr.io import (
    atomic_dir,
    file_sha256,
    load_tensors,
    safetensors_header,
    save_tensors,
    write_json,
)
from feddmmr.modalities import NAMES

log = logging.getLogger("feddmmr")
BUNDLED_MINILM = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


WALL_CLOCK = ("seconds",)


def write_features(out_dir: str | Path, feats: torch.Tensor, mask: torch.Tensor, report: dict,
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


def load_modalities(features_dir: str | Path, data: Prepared,
                    names: tuple[str, ...] | list[str] | None = None) -> dict[str, ModalityFeatures]:
    """The features of the modalities ``names`` (``features_dir/<name>/``; default: every modality of the registry,
    in its order; a checkpoint passes those it was trained with)."""
    names = NAMES if names is None else names
    out = {}
    for name in names:
        d = Path(features_dir) / name
        table, mask = load_features(d, data)
        out[name] = ModalityFeatures(table, mask, file_sha256(d / "features.safetensors"), int(table.shape[1]),
                                     float(mask[1:].float().mean()))
    if not any(f.mask[1:].any() for f in out.values()):
        raise FeddmmrError(f"{features_dir}: no modality ({', '.join(names)}) covers any item; a multimodal stage "
                           f"needs at least one (check the features_* stages and re-run them)")
    return out
