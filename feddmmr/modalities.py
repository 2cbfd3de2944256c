"""The item modalities: one entry each, and everything else follows from the entry.

An entry names the modality, how its expert queries the memory, its params section and its extractor:

- ``query``: the expert attends from a query per candidate item: its own projected feature (``"feature"``,
  the visual expert: what the poster looks like) or its item embedding (``"item"``, the semantic expert: what
  the sequence model thinks of the item);
- ``params``: the dataclass of its params section ``features_<name>`` (every default in one place; a section
  in params.yaml overrides them, and ``config.Params`` has one field per entry);
- ``extractor``: ``"module:function"`` of the function that writes ``features/<name>/`` from the prepared data,
  ``function(params, data_dir, out_dir, progress) -> report`` (the features layer; imported when it runs);
- ``gpu``: its feature step asks for a GPU when it runs in a container;
- ``reads``: other parameters its features depend on (its DVC stage lists them beside its own section).

The DVC stage ``features_<name>`` and the Prefect step of the same name follow from the entry (dvc.yaml and
prefect.yaml are written by ``python -m feddmmr.generate``; a test fails when they are stale). The model builds
an expert for each modality a checkpoint was trained with (its ``feature_dims``), in the order written there:
adding an entry leaves every existing checkpoint loadable.

Registry order is the order of the router's outputs, the availability columns and the concatenated feature
used to merge near-duplicate memories of new stages. Extending: docs/extending.md.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TextFeatureParams:
    model: str = "all-MiniLM-L6-v2"  # sentence-transformers name or local folder; default ships offline
    movies: str = ""                 # item metadata (movies.dat, u.item or CSV item,title[,genres]); '' = beside the data
    descriptions: str = ""           # optional JSON {item_id: text} or '::' extras file (plot field)
    batch_size: int = 64
    device: str = "auto"             # auto | cpu | cuda


@dataclass
class VisualFeatureParams:
    model: str = "ViT-B-32"          # open_clip model name
    pretrained: str = "openai"       # open_clip tag, a local weights file, or 'none' for random weights
    images: str = ""                 # folder of <raw_item_id>.jpg|png; '' = no posters (visual modality masked)
    dim: int = 512                   # feature size written when no posters are configured
    batch_size: int = 32
    device: str = "auto"


@dataclass(frozen=True)
class Modality:
    name: str
    query: str                       # "feature" | "item"
    params: type                     # dataclass of the params section features_<name>
    extractor: str                   # "module:function" writing features/<name>/
    gpu: bool = False                # its feature step asks for a GPU in a container
    reads: tuple[str, ...] = ()      # other parameters its features depend on


MODALITIES: tuple[Modality, ...] = (
    Modality("visual", query="feature", params=VisualFeatureParams, extractor="feddmmr.features.visual:extract",
             gpu=True),
    Modality("text", query="item", params=TextFeatureParams, extractor="feddmmr.features.text:extract",
             reads=("prepare.source", "prepare.path")),   # titles and genres come from the raw data's item file
)
NAMES: tuple[str, ...] = tuple(m.name for m in MODALITIES)
QUERY = {m.name: m.query for m in MODALITIES}
BY_NAME = {m.name: m for m in MODALITIES}
