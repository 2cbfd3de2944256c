"""The visual modality: open_clip (CLIP) embeddings of each item's poster."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from feddmmr.config import Params, resolve_device
from feddmmr.data.prepare import load_prepared
from feddmmr.errors import FeddmmrError
from feddmmr.features.store import write_features
from feddmmr.io import file_sha256
from feddmmr.modalities import VisualFeatureParams

log = logging.getLogger("feddmmr")
BUNDLED_MINILM = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


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
        write_features(out_dir, feats, mask, report, data)
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
    write_features(out_dir, feats, mask, report, data)
    return report


def extract(params: Params, data_dir: str | Path, out_dir: str | Path, progress: bool = True) -> dict:
    """The registry's extractor (``features_visual``)."""
    return extract_visual(params.features_visual, data_dir, out_dir, progress)
