"""The item modalities the multimodal stages read, as data.

Each modality has a feature extractor (``features.extract.EXTRACTORS``), a params section ``features_<name>``,
a DVC stage writing ``features/<name>/``, and in the model a projection and a memory expert. The
expert attends from a query per candidate item: its own projected feature (``query="feature"``, the
visual expert: what the poster looks like) or its item embedding (``query="item"``, the semantic
expert: what the sequence model thinks of the item).

The order is the order of the router's outputs, the availability columns and the concatenated
feature used to merge near-duplicate memories. Adding a modality (audio, a second text encoder)
means an entry here, an extractor, its params section and its feature stage.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Modality:
    name: str
    query: str   # "feature" | "item"


MODALITIES: tuple[Modality, ...] = (Modality("visual", query="feature"), Modality("text", query="item"))
NAMES: tuple[str, ...] = tuple(m.name for m in MODALITIES)
QUERY = {m.name: m.query for m in MODALITIES}
