"""The parameter diff between two stages' checkpoints: which tensors changed, by how much, grouped by module."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from feddmmr.io import load_tensors, read_json
from feddmmr.tracking.keys import flatten

log = logging.getLogger("feddmmr")


def module_of(name: str) -> str:
    """Module of a tensor: sasrec.blocks.0.attn.qkv.weight -> sasrec.blocks.0.attn, router.mlp.0.weight -> router.mlp."""
    parts = name.split(".")[:-1] or [name]
    return ".".join(parts[:4] if parts[:2] == ["sasrec", "blocks"] else parts[:2])


def stage_diff(prev_ckpt: str | Path, ckpt: str | Path, group_of: Callable[[str], str] | None = None) -> dict:
    """What a stage changed relative to the previous stage's checkpoint.

    config: every flattened config key whose value differs (old -> new);
    modules: per module, L2 norm of the weight change, change relative to the old norm, changed yes/no
    (exact comparison, so a frozen module reports changed = false), plus tensors added or dropped; ``group_of``
    names each tensor's parameter group (the model's ``group_of``, passed by the trainer: the records do not import
    the model), "-" where it has none.
    """

    fix = "re-run the stage that writes it (`dvc repro`)"
    old_cfg = flatten(read_json(Path(prev_ckpt) / "config.json", "checkpoint config"))
    new_cfg = flatten(read_json(Path(ckpt) / "config.json", "checkpoint config"))
    config = {k: [old_cfg.get(k), new_cfg.get(k)] for k in sorted(set(old_cfg) | set(new_cfg))
              if old_cfg.get(k) != new_cfg.get(k)}
    old = load_tensors(Path(prev_ckpt) / "model.safetensors", "checkpoint weights", fix)
    new = load_tensors(Path(ckpt) / "model.safetensors", "checkpoint weights", fix)
    modules: dict[str, dict[str, Any]] = {}
    for name in sorted(set(old) & set(new)):
        if old[name].shape != new[name].shape:
            continue
        m = modules.setdefault(module_of(name), {"group": _group(name, group_of), "tensors": 0, "sq_delta": 0.0, "sq_old": 0.0,
                                                 "changed": False})
        d = (new[name].double() - old[name].double())
        m["tensors"] += 1
        m["sq_delta"] += float((d * d).sum())
        m["sq_old"] += float((old[name].double() ** 2).sum())
        m["changed"] |= not bool((new[name] == old[name]).all())
    for m in modules.values():
        m["l2_delta"] = m.pop("sq_delta") ** 0.5
        old_norm = m.pop("sq_old") ** 0.5
        m["relative_delta"] = m["l2_delta"] / old_norm if old_norm else None
    return {"previous": str(prev_ckpt), "current": str(ckpt), "config": config, "modules": modules,
            "added": sorted(set(new) - set(old)), "dropped": sorted(set(old) - set(new)),
            "reshaped": sorted(k for k in set(old) & set(new) if old[k].shape != new[k].shape)}


def _group(name: str, group_of: Callable[[str], str] | None) -> str:
    try:
        return group_of(name) if group_of is not None else "-"
    except KeyError:
        return "-"


def format_diff(diff: dict) -> str:
    lines = [f"{'module':28s} {'group':16s} {'changed':>8s} {'L2 delta':>12s} {'relative':>10s}"]
    for name, m in diff["modules"].items():
        rel = "-" if m["relative_delta"] is None else f"{m['relative_delta']:.4f}"
        lines.append(f"{name:28s} {m.get('group', '-'):16s} {('yes' if m['changed'] else 'no'):>8s} "
                     f"{m['l2_delta']:12.4f} {rel:>10s}")
    if diff.get("added"):
        lines.append(f"added (initialised in this stage): {len(diff['added'])} tensors in "
                     f"{', '.join(sorted({module_of(k) for k in diff['added']}))}")
    for key, (a, b) in diff["config"].items():
        lines.append(f"config {key}: {a!r} -> {b!r}")
    return "\n".join(lines)
