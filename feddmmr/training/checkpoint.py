"""Checkpoint I/O: a stage's model and memory built from params, the groups a stage loads from the previous
one, what every checkpoint's config.json says of its model and data, and a checkpoint read back.

A checkpoint is read back only after its config.json was checked against its schema, its bounds and the tensor
shapes in model.safetensors's header, and its data fingerprints (source files, user and item maps) against the
prepared data: a crafted or foreign checkpoint is one line, never a traceback or an allocation of terabytes.
Training (``stages``) writes checkpoints; inference (``recommend``, ``serving``) and evaluation read them here.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from feddmmr.config import (
    LIMITS,
    MemoryParams,
    Params,
    TrainParams,
    update_section,
    validate,
)
from feddmmr.data.prepare import Prepared
from feddmmr.errors import FeddmmrError
from feddmmr.features.store import ModalityFeatures, load_modalities
from feddmmr.io import load_tensors, read_json, safetensors_header
from feddmmr.modalities import NAMES
from feddmmr.model import FedDMMR, FedDMMRConfig, group_of
from feddmmr.model.memory import MemoryBank, combined_features

log = logging.getLogger("feddmmr")
REQUIRED_FROM_SOURCE = {"item_embeddings", "backbone"}  # a later stage never starts these from scratch
FIX = "re-run the stage that writes it (`dvc repro`)"


# ---------------------------------------------------------------------------------------------- building

def build_model(params: Params, data: Prepared, feature_dims: dict[str, int] | None = None) -> FedDMMR:
    """The stage's model: the plain backbone, or with ``feature_dims`` (modality -> size) the multimodal one."""
    return FedDMMR(FedDMMRConfig.from_params(params, data.num_items, data.max_seq_len, feature_dims))


def build_memory(params: Params, data: Prepared, feats: dict[str, ModalityFeatures],
                 tp: TrainParams | None = None) -> MemoryBank:
    """Every client's two-tier memory, merging near-duplicates by the modalities' combined features (those
    the stage ``tp`` uses)."""
    return MemoryBank(data.num_users, stage_memory(params.memory, tp), combined_features(stage_features(feats, tp)))


def stage_features(feats: dict[str, ModalityFeatures], tp: TrainParams | None = None,
                   used: list[str] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(table, mask) per modality; a modality the stage does not use (``modalities``) is masked everywhere."""
    used = list(used if used is not None else getattr(tp, "modalities", NAMES))
    return {m: (f.table, f.mask if m in used else torch.zeros_like(f.mask)) for m, f in feats.items()}


def stage_memory(memory: MemoryParams, tp: TrainParams | None = None) -> MemoryParams:
    """The memory parameters of a stage: no long-term slots are retrieved when its ``long_term`` is false."""
    return memory if getattr(tp, "long_term", True) else replace(memory, retrieve_lt=0)


# ---------------------------------------------------------------------------------------------- loading

def load_groups(model: FedDMMR, source_dir: str | Path, data: Prepared, feature_sha: dict | None) -> dict:
    """Load every group the source checkpoint holds into ``model``; fail on anything partial.

    Returns the load report: loaded groups (tensor counts), groups initialised here, and the
    missing / unexpected / mismatched tensor names (all empty on success).
    """
    source_dir = Path(source_dir)
    config = read_json(source_dir / "config.json", "checkpoint config of the previous stage")
    if config.get("diverged"):
        raise FeddmmrError(f"{source_dir} holds the best finite round of a diverged run ({config['diverged'][:120]}"
                           f"...); train {config.get('stage')} again with a lower learning rate first")
    _check_same_data(source_dir, config, data)
    state = load_tensors(source_dir / "model.safetensors", "checkpoint weights of the previous stage", FIX)
    expected = model.state_dict()
    source_groups = {group_of(k) for k in state if _known(k)}
    unexpected = sorted(k for k in state if k not in expected)
    missing = sorted(k for k in expected if group_of(k) in source_groups and k not in state)
    mismatched = sorted(k for k in state if k in expected and state[k].shape != expected[k].shape)
    absent = sorted(REQUIRED_FROM_SOURCE - source_groups)
    report = {"source": str(source_dir), "source_stage": config.get("stage"),
              "lineage": list(config.get("lineage", [])) + [config.get("stage")], "loaded": {}, "initialized": sorted({group_of(k) for k in expected} - source_groups),
              "missing": missing, "unexpected": unexpected, "mismatched": mismatched}
    if missing or unexpected or mismatched or absent:
        raise FeddmmrError(
            f"cannot load {source_dir / 'model.safetensors'} into {model.__class__.__name__}: required groups absent "
            f"{absent}, missing tensors {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {mismatched[:5]}; "
            f"the checkpoint does not belong to this model/data (re-run the previous stage: `dvc repro`)")
    if "projections" in source_groups and feature_sha is not None:
        was = config.get("features") or {}
        changed = [m for m in model.modalities if was.get(m) != feature_sha.get(m)]
        if changed:
            raise FeddmmrError(f"{source_dir} projections were trained on other {', '.join(changed)} features than "
                               f"features/{changed[0]}; re-run the previous stage on the current features (`dvc repro`)")
    with torch.no_grad():
        for k, v in state.items():
            expected[k].copy_(v)
    now = model.state_dict()
    for k, v in state.items():  # proof of the load: every loaded tensor equals the file, bit for bit
        if not torch.equal(now[k].cpu(), v):
            raise FeddmmrError(f"loading {k} from {source_dir} did not take effect")
        g = group_of(k)
        report["loaded"][g] = report["loaded"].get(g, 0) + 1
    report["groups"] = config.get("groups", {})
    return report


def _known(name: str) -> bool:
    try:
        group_of(name)
        return True
    except KeyError:
        return False


def _check_same_data(ckpt_dir: Path, config: dict, data: Prepared) -> None:
    """The checkpoint was trained on this prepared data: same sizes, source files, and user and item maps."""
    was = config.get("data") or {}
    same = (config.get("num_items") == data.num_items and config.get("max_seq_len") == data.max_seq_len and
            was.get("source_sha256") == data.meta["source_sha256"] and config.get("num_users") == data.num_users
            and was.get("items_sha256") == data.items_sha256 and was.get("users_sha256") == data.users_sha256)
    if not same:
        raise FeddmmrError(f"{ckpt_dir} was trained on other prepared data ({config.get('num_users')} users, "
                           f"{config.get('num_items')} items, L={config.get('max_seq_len')}, item map "
                           f"{str(was.get('items_sha256'))[:12]}) than the current ({data.num_users} users, "
                           f"{data.num_items} items, L={data.max_seq_len}, item map {data.items_sha256[:12]}); {FIX}")


def model_config(params: Params, data: Prepared, data_dir, model: FedDMMR) -> dict:
    """What every checkpoint's config.json says of its model and data (``load_checkpoint`` rebuilds from it)."""
    return {"model": asdict(params.model), "num_items": data.num_items, "max_seq_len": data.max_seq_len,
            "num_users": data.num_users, "data": {"dir": str(data_dir), "source_sha256": data.meta["source_sha256"],
                                                  "num_interactions": data.meta["num_interactions"],
                                                  "items_sha256": data.items_sha256,
                                                  "users_sha256": data.users_sha256},
            "model_config": asdict(model.config), "torch": torch.__version__}


_CONFIG_INTS = ("num_items", "max_seq_len", "hidden", "blocks", "heads", "ffn_hidden", "router_hidden")
_CONFIG_LIMITS = {"num_items": 100_000_000, "max_seq_len": 4096, **{k: v for k, v in LIMITS.items()
                                                                     if k in _CONFIG_INTS}}


def checked_model_config(ckpt_dir: Path, raw) -> FedDMMRConfig:
    """A checkpoint's ``model_config``, checked against its schema and bounds and then against the tensor shapes in
    ``model.safetensors``'s header (a model built on the meta device allocates nothing), before any weight is
    read or any memory allocated: a crafted config.json is one line, never a traceback or terabytes."""
    path = ckpt_dir / "config.json"
    names = [f.name for f in fields(FedDMMRConfig)]
    if not isinstance(raw, dict) or sorted(raw) != sorted(names):
        keys = sorted(raw) if isinstance(raw, dict) else raw
        raise FeddmmrError(f"{path}: model_config must hold exactly {', '.join(names)}; it holds {keys}; {FIX}")
    bad = [k for k in _CONFIG_INTS if not (type(raw[k]) is int and 1 <= raw[k] <= _CONFIG_LIMITS.get(k, 1 << 20))]
    bad += [k for k in ("dropout", "gating_init") if type(raw[k]) not in (int, float) or not math.isfinite(raw[k])]
    dims = raw["feature_dims"]
    if not isinstance(dims, dict) or not all(type(v) is int and 1 <= v <= LIMITS["dim"] for v in dims.values()) \
            or not set(dims) <= set(NAMES):   # a modality the registry no longer has cannot be built
        bad.append("feature_dims")
    if not bad and raw["hidden"] % raw["heads"]:
        bad.append("hidden (a multiple of heads)")
    if bad:
        raise FeddmmrError(f"{path}: model_config has invalid {', '.join(bad)} "
                           f"({', '.join(f'{k.split()[0]}={raw[k.split()[0]]!r}' for k in bad)}); {FIX}")
    config = FedDMMRConfig(**raw)
    header, _ = safetensors_header(ckpt_dir / "model.safetensors", "checkpoint weights", FIX)
    with torch.device("meta"):
        expected = {k: list(v.shape) for k, v in FedDMMR(config).state_dict().items()}
    stored = {k: shape for k, (_, shape) in header.items()}
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
    if missing or unexpected or wrong:
        raise FeddmmrError(f"{ckpt_dir / 'model.safetensors'} does not match its config: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}, shape mismatch {wrong[:5]}; {FIX}")
    return config


def _memory_params(ckpt_dir: Path, raw) -> MemoryParams:
    """A checkpoint's memory section, checked as params.yaml's is (keys, types, ranges, bounds)."""
    params = Params()
    try:
        update_section(params.memory, "memory", raw if isinstance(raw, dict) else {"": raw})
        validate(params)
    except FeddmmrError as exc:
        raise FeddmmrError(f"{ckpt_dir / 'config.json'}: {exc}; {FIX}") from None
    return params.memory


def load_checkpoint(ckpt_dir: str | Path, data: Prepared | None = None, features_dir: str | Path = "features",
                    diverged_ok: bool = False) -> tuple[FedDMMR, dict, MemoryBank | None]:
    """Rebuild a stage checkpoint's model (features and client memory included), failing on any mismatch.

    The best finite round of a diverged run is refused unless ``diverged_ok`` (``evaluate`` says so in one line)."""
    ckpt_dir = Path(ckpt_dir)
    config = read_json(ckpt_dir / "config.json", "checkpoint config")
    if "model_config" not in config:
        raise FeddmmrError(f"{ckpt_dir / 'config.json'} has no model_config (written by an older feddmmr); {FIX}")
    if config.get("diverged"):
        why = f"{ckpt_dir} holds the best finite round of a diverged {config.get('stage')} run ({config['diverged'][:100]}...)"
        if not diverged_ok:
            raise FeddmmrError(f"{why}; train the stage again with a lower learning rate first")
        log.warning("warning: %s", why)
    if data is not None:
        _check_same_data(ckpt_dir, config, data)
    model = FedDMMR(checked_model_config(ckpt_dir, config["model_config"]))
    model.load_state_dict(load_tensors(ckpt_dir / "model.safetensors", "checkpoint weights", FIX), strict=True)
    memory = None
    if model.multimodal:
        if data is None:
            raise FeddmmrError(f"{ckpt_dir} is a multimodal checkpoint: evaluating it needs the prepared data")
        feats = load_modalities(features_dir, data, model.modalities)   # those it was trained with
        stale = [m for m in model.modalities if (config.get("features") or {}).get(m) != feats[m].sha256]
        if stale:
            raise FeddmmrError(f"{ckpt_dir} was trained on other {', '.join(stale)} features than those in "
                               f"{features_dir}; pass --features with the stage's features or re-run it (`dvc repro`)")
        model.set_features(stage_features(feats, used=config["train"].get("modalities", model.modalities)))
        memory = MemoryBank(config["num_users"], _memory_params(ckpt_dir, config.get("memory")))
        try:
            memory.load_state_dict(load_tensors(ckpt_dir / "memory.safetensors", "client memory", FIX))
        except ValueError as exc:
            raise FeddmmrError(f"{ckpt_dir / 'memory.safetensors'}: {exc}") from None
    return model, config, memory
