"""``feddmmr features <modality>``: run the modality's extractor, named by its registry entry
(``feddmmr.modalities``), holding the output folder's one-writer lock."""
from __future__ import annotations

import importlib
from pathlib import Path

from feddmmr.config import Params
from feddmmr.errors import FeddmmrError
from feddmmr.io import exclusive
from feddmmr.modalities import BY_NAME, NAMES

REPORT = {"modality", "model", "dim", "items", "covered", "coverage_pct", "seconds"}   # an extractor's report


def extract(modality: str, params: Params, data_dir: str | Path, out_dir: str | Path, progress: bool = True) -> dict:
    """Write ``out_dir`` (``features/<modality>/``) with the extractor of ``modality``; its report."""
    if modality not in BY_NAME:
        raise FeddmmrError(f"unknown modality {modality!r}; the registry (feddmmr/modalities.py) has {', '.join(NAMES)}")
    module, function = BY_NAME[modality].extractor.split(":")
    extractor = getattr(importlib.import_module(module), function)
    with exclusive(out_dir):
        report = extractor(params, data_dir, out_dir, progress)
    missing = sorted(REPORT - set(report or {}))
    if missing:   # the extractor's contract (docs/extending.md): what `feddmmr features` prints and records
        raise FeddmmrError(f"the {modality} extractor ({BY_NAME[modality].extractor}) returned a report without "
                           f"{', '.join(missing)}; it must return {', '.join(sorted(REPORT))}")
    return report
