"""Stages 2-3: explicit parameter groups, load reports, frozen tensors bit-identical, the 2-stage path."""
import json
import shutil

import pytest
import torch

from conftest import tiny_stage_params, write_tiny_features
from feddmmr.data.prepare import load_prepared
from feddmmr.errors import FeddmmrError
from feddmmr.features.store import load_modalities
from feddmmr.io import load_tensors, save_tensors
from feddmmr.model import group_of
from feddmmr.training.checkpoint import build_model, load_checkpoint
from feddmmr.training.stages import train_stage
from feddmmr.modalities import NAMES


def _params(**kw):
    p = tiny_stage_params(rounds=2, keep="last", **kw)  # "last": the checkpoint holds trained weights
    p.tracking.enabled = False
    return p


@pytest.fixture(scope="module")
def chain(tiny_prepared, tmp_path_factory):
    """All three stages on tiny data with both modalities (some items masked in each)."""
    root = tmp_path_factory.mktemp("chain")
    data = load_prepared(tiny_prepared)
    feats = write_tiny_features(root / "features", data)
    p = _params()
    for stage in ("pretrain_sasrec", "align_projectors", "finetune_moe"):
        train_stage(stage, p, tiny_prepared, root / "ck" / stage, root / f"{stage}.json", progress=False,
                    features_dir=feats)
    return root, p


def _weights(root, stage):
    return load_tensors(root / "ck" / stage / "model.safetensors", "w", "")


def _changed_groups(a, b):
    out = {}
    for k in b:
        if k in a:
            out.setdefault(group_of(k), False)
            out[group_of(k)] |= not torch.equal(a[k], b[k])
    return out


def test_align_projectors_trains_only_projections_and_gate(chain, tiny_prepared):
    root, p = chain
    s1, s2 = _weights(root, "pretrain_sasrec"), _weights(root, "align_projectors")
    assert set(s1) < set(s2)
    assert _changed_groups(s1, s2) == {"item_embeddings": False, "backbone": False}   # bit-identical to stage 1
    torch.manual_seed(p.align_projectors.seed)  # the stage's initialisation, rebuilt
    data = load_prepared(tiny_prepared)
    dims = {m: f.dim for m, f in load_modalities(root / "features", data).items()}   # every modality's
    fresh = build_model(p, data, dims).state_dict()
    changed = _changed_groups(fresh, {k: v for k, v in s2.items() if k not in s1})
    assert changed == {"projections": True, "gate": True, "experts": False, "router": False}
    report = json.loads((root / "ck" / "align_projectors" / "load_report.json").read_text())
    assert set(report["loaded"]) == {"item_embeddings", "backbone"} and report["source_stage"] == "pretrain_sasrec"
    assert set(report["initialized"]) == {"projections", "gate", "experts", "router"}
    assert report["missing"] == report["unexpected"] == report["mismatched"] == []
    config = json.loads((root / "ck" / "align_projectors" / "config.json").read_text())
    assert config["lineage"] == ["pretrain_sasrec"]
    assert config["groups"]["backbone"]["trained_in"] == ["pretrain_sasrec"]
    assert config["groups"]["projections"] == {"initialized_in": "align_projectors", "trained_in": ["align_projectors"]}


def test_finetune_moe_trains_all_but_item_embeddings(chain):
    root, _ = chain
    s1, s2, s3 = (_weights(root, s) for s in ("pretrain_sasrec", "align_projectors", "finetune_moe"))
    assert set(s3) == set(s2)
    changed = _changed_groups(s2, s3)
    assert changed.pop("item_embeddings") is False
    assert all(changed.values()), changed   # backbone, projections, gate, experts, router all moved
    assert torch.equal(s3["sasrec.item_emb.weight"], s1["sasrec.item_emb.weight"])
    for expert in (f"experts.{m}" for m in NAMES):
        assert not torch.equal(s3[f"{expert}.value.weight"], s2[f"{expert}.value.weight"])
    report = json.loads((root / "ck" / "finetune_moe" / "load_report.json").read_text())
    assert set(report["loaded"]) == {"item_embeddings", "backbone", "projections", "gate", "experts", "router"}
    assert report["initialized"] == []
    history = json.loads((root / "ck" / "finetune_moe" / "train_history.json").read_text())
    gates = [r["gating_weight"] for r in history["router"]]
    assert len(gates) == 3 and len(set(gates)) > 1                       # logged per round, and learning
    assert all(0 < r["router.w_visual"] < 1 and 0 < r["router.w_visual_all"] < 1 for r in history["router"])
    both = [r["router.w_visual_all"] for r in history["router"]]
    assert both[0] == pytest.approx(1 / len(NAMES)) and both[-1] != both[0]   # starts even; trains in stage 3


def test_memory_is_kept_with_the_checkpoint_and_used_in_evaluation(chain, tiny_prepared):
    root, p = chain
    model, config, memory = load_checkpoint(root / "ck" / "finetune_moe", load_prepared(tiny_prepared),
                                            root / "features")
    assert memory is not None and (memory.participations > 0).any() and (memory.lt_ids > 0).any()
    from feddmmr.evaluation.metrics import Evaluator
    ev = Evaluator(load_prepared(tiny_prepared), p.evaluation.ks, p.evaluation.batch_size)
    with_memory = ev.evaluate(model, "test", memory)
    assert with_memory["full"] == json.loads((root / "finetune_moe.json").read_text())["test"]["full"]
    state = memory.state_dict()
    s2 = load_tensors(root / "ck" / "align_projectors" / "memory.safetensors", "m", "")
    assert int(state["clock"].sum()) > int(s2["clock"].sum())           # stage 3 continued stage 2's memories


def test_two_stage_path_skips_align_projectors(chain, tiny_prepared, tmp_path):
    root, _ = chain
    p = _params()
    p.finetune_moe.init_from = "pretrain_sasrec"
    m = train_stage("finetune_moe", p, tiny_prepared, tmp_path / "finetune_moe", tmp_path / "m.json", progress=False,
                    features_dir=root / "features", init_dir=root / "ck" / "pretrain_sasrec")
    assert (m["best_round"], m["rounds_run"]) == (2, 2)                   # keep: last
    report = json.loads((tmp_path / "finetune_moe" / "load_report.json").read_text())
    assert set(report["loaded"]) == {"item_embeddings", "backbone"}
    assert set(report["initialized"]) == {"projections", "gate", "experts", "router"}
    s1, s3 = _weights(root, "pretrain_sasrec"), load_tensors(tmp_path / "finetune_moe" / "model.safetensors", "w", "")
    assert torch.equal(s3["sasrec.item_emb.weight"], s1["sasrec.item_emb.weight"])


def test_loading_fails_loudly_on_partial_or_mismatched_checkpoints(chain, tiny_prepared, tmp_path):
    root, _ = chain
    p = _params()

    def run(src):
        return train_stage("align_projectors", p, tiny_prepared, tmp_path / "out", tmp_path / "m.json",
                           progress=False, features_dir=root / "features", init_dir=src)

    bad = tmp_path / "partial"
    shutil.copytree(root / "ck" / "pretrain_sasrec", bad)
    state = load_tensors(bad / "model.safetensors", "w", "")
    save_tensors(bad / "model.safetensors", {k: v for k, v in state.items() if k != "sasrec.blocks.0.ffn.0.weight"})
    with pytest.raises(FeddmmrError, match=r"missing tensors \['sasrec.blocks.0.ffn.0.weight'\]"):
        run(bad)
    save_tensors(bad / "model.safetensors", {k: v for k, v in state.items() if not k.startswith("sasrec.item_emb")})
    with pytest.raises(FeddmmrError, match=r"required groups absent \['item_embeddings'\]"):
        run(bad)
    save_tensors(bad / "model.safetensors", {**state, "sasrec.pos_emb.weight": torch.zeros(3, 16)})
    with pytest.raises(FeddmmrError, match="shape mismatch.*sasrec.pos_emb.weight"):
        run(bad)
    save_tensors(bad / "model.safetensors", {**state, "head.weight": torch.zeros(3)})
    with pytest.raises(FeddmmrError, match=r"unexpected \['head.weight'\]"):
        run(bad)
    with pytest.raises(FeddmmrError, match="holds no model.safetensors.*train pretrain_sasrec first"):
        run(tmp_path / "nowhere")
    with pytest.raises(FeddmmrError, match="pretrain_sasrec trains from scratch"):
        train_stage("pretrain_sasrec", p, tiny_prepared, tmp_path / "out", tmp_path / "m.json", progress=False,
                    init_dir=root / "ck" / "align_projectors")
    assert not (tmp_path / "out").exists()


def test_stage3_refuses_projections_trained_on_other_features(chain, tiny_prepared, tmp_path):
    root, _ = chain
    other = write_tiny_features(tmp_path / "features", load_prepared(tiny_prepared), seed=5)
    with pytest.raises(FeddmmrError, match=f"projections were trained on other {', '.join(NAMES)} features"):
        train_stage("finetune_moe", _params(), tiny_prepared, tmp_path / "out", tmp_path / "m.json", progress=False,
                    features_dir=other, init_dir=root / "ck" / "align_projectors")


def test_multimodal_stage_needs_feature_files(chain, tiny_prepared, tmp_path):
    root, _ = chain
    with pytest.raises(FeddmmrError, match="feature file not found: .*visual/features.safetensors"):
        train_stage("align_projectors", _params(), tiny_prepared, tmp_path / "out", tmp_path / "m.json",
                    progress=False, features_dir=tmp_path / "none", init_dir=root / "ck" / "pretrain_sasrec")


def test_which_groups_train_is_a_parameter(chain, tiny_prepared, tmp_path):
    """The backbone-only ablation as a params change: everything but the backbone frozen, the gate started at 0."""
    root, _ = chain
    p = _params()
    p.finetune_moe.freeze = ["item_embeddings", "projections", "gate", "experts", "router"]
    p.finetune_moe.gate_start = 0.0
    train_stage("finetune_moe", p, tiny_prepared, tmp_path / "ck", tmp_path / "m.json", progress=False,
                features_dir=root / "features", init_dir=root / "ck" / "align_projectors")
    s2, s3 = _weights(root, "align_projectors"), load_tensors(tmp_path / "ck" / "model.safetensors", "w", "")
    assert float(s3["gating_weight"]) == 0.0
    changed = _changed_groups(s2, s3)
    assert changed.pop("backbone") is True and changed.pop("gate") is True     # the gate was set to 0, then frozen
    assert not any(changed.values()), changed
    p.finetune_moe.freeze = ["item_embeddings", "decoder"]
    with pytest.raises(FeddmmrError, match=r"finetune_moe.freeze names unknown groups \['decoder'\]"):
        train_stage("finetune_moe", p, tiny_prepared, tmp_path / "ck2", tmp_path / "m2.json", progress=False,
                    features_dir=root / "features", init_dir=root / "ck" / "align_projectors")
    p.finetune_moe.freeze, p.finetune_moe.loss = [], "full"
    with pytest.raises(FeddmmrError, match="finetune_moe.loss: full .* set finetune_moe.loss to ce or bpr"):
        train_stage("finetune_moe", p, tiny_prepared, tmp_path / "ck3", tmp_path / "m3.json", progress=False,
                    features_dir=root / "features", init_dir=root / "ck" / "align_projectors")


def test_modalities_and_long_term_memory_are_stage_parameters(chain, tiny_prepared, tmp_path):
    """The text-only and no-long-term-memory ablations as params changes; the checkpoint keeps them, so its
    evaluation reproduces the stage's test metrics."""
    from feddmmr.evaluation.metrics import Evaluator
    root, _ = chain
    data = load_prepared(tiny_prepared)
    p = _params()
    p.finetune_moe.modalities, p.finetune_moe.long_term = ["text"], False
    metrics = train_stage("finetune_moe", p, tiny_prepared, tmp_path / "ck", tmp_path / "m.json", progress=False,
                          features_dir=root / "features", init_dir=root / "ck" / "align_projectors")
    model, config, memory = load_checkpoint(tmp_path / "ck", data, root / "features")
    assert not model.covered["visual"] and model.covered["text"] and model.router_stats()["router.w_visual"] == 0.0
    assert config["memory"]["retrieve_lt"] == 0 and memory.retrieve([0, 1])[0].shape[1] == p.memory.st_capacity
    assert (memory.lt_ids > 0).any()                                   # still written, never read
    ev = Evaluator(data, p.evaluation.ks, p.evaluation.batch_size)
    assert ev.evaluate(model, "test", memory)["full"] == metrics["test"]["full"]
    full, _, _ = load_checkpoint(root / "ck" / "finetune_moe", data, root / "features")
    assert full.covered["visual"]
    p.finetune_moe.modalities = ["text", "audio"]
    with pytest.raises(FeddmmrError, match="finetune_moe.modalities must be a non-empty list"):
        train_stage("finetune_moe", p, tiny_prepared, tmp_path / "ck2", tmp_path / "m2.json", progress=False,
                    features_dir=root / "features", init_dir=root / "ck" / "align_projectors")


def test_saved_tensors_are_byte_identical_whatever_the_metadata_order(tmp_path):
    """safetensors orders __metadata__ by hash, differently from call to call: equal content must still give equal
    bytes, or DVC sees a changed output (and every later stage reruns) after identical work."""
    import torch

    from feddmmr.io import load_tensors, save_tensors
    tensors = {"features": torch.arange(12.0).reshape(3, 4), "mask": torch.tensor([False, True, True])}
    meta = {f"key{i}": f"value {i} é" for i in range(8)}
    for i in range(6):
        save_tensors(tmp_path / f"{i}.safetensors", tensors, metadata=dict(reversed(meta.items())) if i % 2 else meta)
    files = {(tmp_path / f"{i}.safetensors").read_bytes() for i in range(6)}
    assert len(files) == 1
    from safetensors import safe_open
    with safe_open(tmp_path / "0.safetensors", "pt") as f:
        assert f.metadata() == meta
    assert all(load_tensors(tmp_path / "0.safetensors", "t", "")[k].equal(v) for k, v in tensors.items())
