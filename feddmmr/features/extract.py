"""``feddmmr features <modality>``: run the modality's extractor, named by its registry entry
(``feddmmr.modalities``), holding the output folder's one-writer lock."""
from __future__ import annotations

import importlib
from pathlib import Path

from feddmmr.config import Params
from feddmmr.errors import FeddmmrError
from feddmmr.io import exclusive
from feddmmr.modalities import BY_NAME, NAMES


def extract(modality: str, params: Params, data_dir: str | Path, out_dir: str | Path, progress: bool = True) -> dict:
    """Write ``out_dir`` (``features/<modality>/``) with the extractor of ``modality``; its report."""
    if modality not in BY_NAME:
        raise FeddmmrError(f"unknown modality {modality!r}; the registry (feddmmr/modalities.py) has {', '.join(NAMES)}")
    module, function = BY_NAME[modality].extractor.split(":")
    extractor = getattr(importlib.import_module(module), function)
    with exclusive(out_dir):
        return extractor(params, data_dir, out_dir, progress)
