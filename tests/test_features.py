import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared
from feddmmr.config import PrepareParams
from feddmmr.modalities import TextFeatureParams, VisualFeatureParams
from feddmmr.data.prepare import load_prepared, prepare
from feddmmr.errors import FeddmmrError
from feddmmr.features.text import extract_text
from feddmmr.features.visual import extract_visual, load_clip
from feddmmr.features.store import load_features
from feddmmr.data.items import read_descriptions

TINY_CLIP = Path(__file__).parent / "assets" / "feddmmr-tiny-clip.json"


@pytest.fixture(scope="module", autouse=True)
def tiny_clip_registered():
    import open_clip
    open_clip.add_model_config(TINY_CLIP)  # registers model name "feddmmr-tiny-clip"; random weights, no download


@pytest.fixture(scope="module")
def ml1m_like(tmp_path_factory):
    """Six movies in ML-1M format; movie 6 has no metadata line."""
    d = tmp_path_factory.mktemp("ml1m")
    rows = [f"{u}::{i}::4::{u * 100 + i}" for u in (1, 2, 3) for i in (1, 2, 3, 4, 5, 6)]
    (d / "ratings.dat").write_text("\n".join(rows) + "\n")
    movies = ["1::Toy Story (1995)::Animation|Children's|Comedy", "2::Jumanji (1995)::Adventure|Children's|Fantasy",
              "3::Heat (1995)::Action|Crime|Thriller", "4::Casino (1995)::Drama|Thriller",
              "5::Toy Story 2 (1999)::Animation|Children's|Comedy"]
    (d / "movies.dat").write_text("\n".join(movies) + "\n", encoding="latin-1")
    out = d / "prepared"
    prepare(PrepareParams(source="ml-1m", path=str(d), eval_negatives=0, min_user_interactions=3), out)
    return d, out


def test_text_features_real_minilm(ml1m_like, tmp_path):
    folder, prepared = ml1m_like
    report = extract_text(PrepareParams(source="ml-1m", path=str(folder)), TextFeatureParams(), prepared,
                          tmp_path / "text", progress=False)
    assert report["dim"] == 384 and report["covered"] == 5 and report["items"] == 6
    feats, mask = load_features(tmp_path / "text", load_prepared(prepared), 384)
    assert mask.tolist() == [False, True, True, True, True, True, False]
    assert torch.count_nonzero(feats[0]) == 0 and torch.count_nonzero(feats[6]) == 0  # padding, missing: zeros
    assert torch.allclose(feats[1:6].norm(dim=1), torch.ones(5), atol=1e-4)
    sim = feats @ feats.T
    assert sim[1, 5] > sim[1, 3] and sim[1, 5] > sim[1, 4]  # Toy Story is closer to Toy Story 2 than to Heat/Casino
    assert json.loads((tmp_path / "text" / "report.json").read_text())["source_sha256"]


def test_descriptions_formats(tmp_path):
    j = tmp_path / "d.json"
    j.write_text(json.dumps({"1": "A toy cowboy.", "2": {"description": "A board game."}, "x": "skip"}))
    assert read_descriptions(j) == {1: "A toy cowboy.", 2: "A board game."}
    e = tmp_path / "extras.dat"
    e.write_text("1::Toy Story::1995::G::22 Nov 1995::Animation::J::W::A::A boy's toys come alive.::http://x\r\n")
    assert read_descriptions(e) == {1: "A boy's toys come alive."}
    with pytest.raises(FeddmmrError, match="descriptions file not found"):
        read_descriptions(tmp_path / "missing.json")


def test_text_model_missing_fails_with_fix(ml1m_like, tmp_path):
    folder, prepared = ml1m_like
    with pytest.raises(FeddmmrError, match="cannot load text model"):
        extract_text(PrepareParams(source="ml-1m", path=str(folder)), TextFeatureParams(model=str(tmp_path / "nope")),
                     prepared, tmp_path / "t", progress=False)
    assert not (tmp_path / "t").exists()


def test_visual_features_tiny_clip_detects_real_type_and_masks_missing(ml1m_like, tmp_path):
    folder, prepared = ml1m_like
    posters = tmp_path / "posters"
    posters.mkdir()
    rng = np.random.default_rng(0)
    for i in (1, 2, 3):
        Image.fromarray(rng.integers(0, 255, (60, 40, 3), dtype=np.uint8)).save(posters / f"{i}.jpg", "JPEG")
    Image.fromarray(rng.integers(0, 255, (60, 40, 3), dtype=np.uint8)).save(posters / "4.jpg", "PNG")  # PNG named .jpg
    (posters / "5.jpg").write_bytes(b"not an image")
    report = extract_visual(VisualFeatureParams(model="feddmmr-tiny-clip", pretrained="none", images=str(posters),
                                                batch_size=2), prepared, tmp_path / "vis", progress=False)
    assert report["covered"] == 4 and report["unreadable"] == ["5.jpg"] and report["dim"] == 32
    feats, mask = load_features(tmp_path / "vis", load_prepared(prepared), 32)
    assert mask.tolist() == [False, True, True, True, True, False, False]
    assert torch.allclose(feats[mask].norm(dim=1), torch.ones(4), atol=1e-4)
    assert torch.count_nonzero(feats[~mask]) == 0


def test_visual_without_weights_fails_fast_with_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FeddmmrError, match="features_visual.pretrained"):
        load_clip("ViT-B-32", "openai", "cpu")
    with pytest.raises(FeddmmrError, match="CLIP checkpoint not found"):
        load_clip("ViT-B-32", str(tmp_path / "weights.bin"), "cpu")


def test_visual_without_posters_is_explicitly_masked(ml1m_like, tmp_path):
    _, prepared = ml1m_like
    report = extract_visual(VisualFeatureParams(), prepared, tmp_path / "vis", progress=False)
    assert report["covered"] == 0 and "no posters configured" in report["note"]
    feats, mask = load_features(tmp_path / "vis", load_prepared(prepared), 512)
    assert not mask.any() and torch.count_nonzero(feats) == 0


def test_feature_file_mismatch_names_file(ml1m_like, tmp_path):
    _, prepared = ml1m_like
    extract_visual(VisualFeatureParams(dim=8), prepared, tmp_path / "vis", progress=False)
    with pytest.raises(FeddmmrError, match="features.safetensors is 8-d, expected 16"):
        load_features(tmp_path / "vis", load_prepared(prepared), 16)


def test_features_of_other_data_with_the_same_item_count_are_refused(ml1m_like, tmp_path):
    """Six items here, six items there, other movies: the row count matches, the item map does not."""
    folder, prepared = ml1m_like
    other = tmp_path / "other"
    other.mkdir()
    (other / "ratings.dat").write_text("\n".join(f"{u}::{i}::4::{u * 100 + i}" for u in (1, 2, 3)
                                                 for i in (11, 12, 13, 14, 15, 16)) + "\n")
    prepare(PrepareParams(source="ml-1m", path=str(other), eval_negatives=0), other / "prepared")
    extract_visual(VisualFeatureParams(dim=8), other / "prepared", tmp_path / "vis", progress=False)
    assert load_prepared(other / "prepared").num_items == load_prepared(prepared).num_items
    load_features(tmp_path / "vis", load_prepared(other / "prepared"))
    with pytest.raises(FeddmmrError, match="was built for other prepared data .item map"):
        load_features(tmp_path / "vis", load_prepared(prepared))


def test_a_file_that_is_not_safetensors_is_one_line(ml1m_like, tmp_path):
    _, prepared = ml1m_like
    (tmp_path / "vis").mkdir()
    (tmp_path / "vis" / "features.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(FeddmmrError, match="is not a safetensors file"):
        load_features(tmp_path / "vis", load_prepared(prepared))


@pytest.mark.realdata
def test_real_ml1m_posters_with_tiny_clip(tmp_path):
    ratings = shared("ml-1m/ratings.dat")
    posters = shared("posters/ml-1m")
    prepare(PrepareParams(source="ml-1m", path=str(ratings.parent), top_k_users=1000), tmp_path / "p")
    data = load_prepared(tmp_path / "p")
    report = extract_visual(VisualFeatureParams(model="feddmmr-tiny-clip", pretrained="none", images=str(posters),
                                                batch_size=256), tmp_path / "p", tmp_path / "vis", progress=False)
    assert report["covered"] >= 0.99 * data.num_items
    feats, mask = load_features(tmp_path / "vis", data, 32)
    assert torch.allclose(feats[mask].norm(dim=1), torch.ones(int(mask.sum())), atol=1e-4)


@pytest.mark.realdata
def test_real_ml1m_plots_and_dbpedia_abstracts_parse():
    plots = read_descriptions(shared("text/ml1m_movies_extrainfos_MeLU.dat"))
    assert len(plots) >= 3600 and "toys" in plots[1].lower()  # Toy Story's plot
    abstracts = read_descriptions(shared("text/ml1m_dbpedia_abstracts.json"))
    assert len(abstracts) >= 3300


def test_a_second_writer_of_a_feature_folder_is_refused_at_once(ml1m_like, tmp_path):
    from feddmmr.config import Params
    from feddmmr.features.extract import extract
    from feddmmr.io import exclusive
    _, prepared = ml1m_like
    with exclusive(tmp_path / "visual"):
        with pytest.raises(FeddmmrError, match="visual is being written by pid"):
            extract("visual", Params(), prepared, tmp_path / "visual", progress=False)
    assert not (tmp_path / "visual").exists()


def test_an_extractor_is_found_by_its_registry_entry_and_its_report_checked(ml1m_like, tmp_path, monkeypatch):
    """`feddmmr features <name>` runs the function the entry names; a report without the keys the CLI prints
    and records is one line naming the extractor (it was a KeyError in the CLI)."""
    import sys
    import types

    from feddmmr.config import Params
    from feddmmr.features.extract import extract
    from feddmmr.modalities import BY_NAME, Modality
    _, prepared = ml1m_like
    plugin = types.ModuleType("feddmmr_test_extractor")
    plugin.extract = lambda params, data_dir, out_dir, progress: {"modality": "visual", "model": "m", "dim": 4}
    monkeypatch.setitem(sys.modules, plugin.__name__, plugin)
    monkeypatch.setitem(BY_NAME, "visual", Modality("visual", "feature", BY_NAME["visual"].params,
                                                    f"{plugin.__name__}:extract"))
    with pytest.raises(FeddmmrError) as err:
        extract("visual", Params(), prepared, tmp_path / "visual", progress=False)
    assert str(err.value) == ("the visual extractor (feddmmr_test_extractor:extract) returned a report without "
                              "coverage_pct, covered, items, seconds; it must return coverage_pct, covered, dim, "
                              "items, modality, model, seconds")
