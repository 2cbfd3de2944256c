"""The house: the package's import graph has no cycle, counting every import, deferred ones too, and every
import goes down the layers that docs/architecture.md draws."""
import ast
import re
from pathlib import Path

import pytest
import yaml

PACKAGE = Path(__file__).resolve().parents[1] / "feddmmr"
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"


def import_graph() -> dict[str, set[str]]:
    """{module: the package's modules it imports}, from the source (every import statement, at any depth)."""
    modules = {".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): f
               for f in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(here.split(".")[:len(here.split(".")) - node.level + 1]) if node.level else ""
                target = ".".join(filter(None, [base, node.module]))
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {c for c in candidates if c in modules and c != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None
    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def layers() -> dict[str, tuple[int, int]]:
    """{subpackage or top-level module: (its row, its layer)}, from the table of docs/architecture.md: a row is a
    room, whose modules import each other freely; rows of the same layer are siblings, which never do."""
    table = ARCHITECTURE.read_text().split("<!-- layers -->")[1].split("<!-- /layers -->")[0]
    out = {}
    for row, line in enumerate(table.strip().splitlines()[2:]):
        layer, names = line.split("|")[1:3]
        for name in re.findall(r"`(\w+)/?`", names):
            out[name] = (row, int(layer))
    return out


def room_of(module: str, table: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(row, layer) of feddmmr.model.sasrec: model's; the package root itself is in the CLI's row."""
    name = module.split(".")[1] if "." in module else "cli"
    if name not in table:
        pytest.fail(f"{module} is in no layer of {ARCHITECTURE.name}: add its subpackage to the table")
    return table[name]


def upward_imports(graph: dict[str, set[str]], table: dict[str, tuple[int, int]]) -> list[str]:
    wrong = []
    for module, targets in sorted(graph.items()):
        row, level = room_of(module, table)
        for target in sorted(targets):
            other_row, other_level = room_of(target, table)
            if other_row != row and other_level >= level:
                wrong.append(f"{module} (layer {level}) imports {target} (layer {other_level})")
    return wrong


def test_every_import_goes_down_the_layers_the_docs_draw():
    wrong = upward_imports(import_graph(), layers())
    assert not wrong, "imports that do not go down a layer:\n" + "\n".join(wrong)


def test_an_upward_import_is_found():
    table = {"model": (0, 1), "features": (1, 3), "evaluation": (2, 3), "training": (3, 6), "serving": (4, 8)}
    graph = {"feddmmr.training.stages": {"feddmmr.serving.recommend", "feddmmr.model", "feddmmr.training.resume"},
             "feddmmr.training.resume": set(), "feddmmr.serving.recommend": {"feddmmr.training.stages"},
             "feddmmr.model": set(), "feddmmr.features.extract": {"feddmmr.evaluation.metrics"},
             "feddmmr.evaluation.metrics": set()}
    assert upward_imports(graph, table) == [
        "feddmmr.features.extract (layer 3) imports feddmmr.evaluation.metrics (layer 3)",
        "feddmmr.training.stages (layer 6) imports feddmmr.serving.recommend (layer 8)"]


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_choice_has_one_home_that_matches_what_the_trainers_run():
    """config.CHOICES is where choices are checked, for every trainer; the registries the trainers pick from
    must offer exactly those (a choice listed but not implemented, or implemented but refused, fails here)."""
    from feddmmr.federated.client import CLIENT_OPTIMIZERS, EXECUTORS
    from feddmmr.config import CHOICES
    from feddmmr.model.loss import LOSSES
    from feddmmr.federated.server import SERVER_OPTIMIZERS
    assert set(CHOICES["optimizer"]) == set(CLIENT_OPTIMIZERS)
    assert set(CHOICES["server_optimizer"]) == set(SERVER_OPTIMIZERS)
    assert set(CHOICES["loss"]) == set(LOSSES)
    assert set(CHOICES["executor"]) == {"auto", *EXECUTORS}


@pytest.mark.parametrize("override, message", [
    ("centralized.optimizer=adamw", "params: centralized.optimizer must be one of sgd, adam, got 'adamw'"),
    ("centralized.loss=hinge", "params: centralized.loss must be one of ce, bpr, full, got 'hinge'"),
    ("centralized.selection_metric=full/NDCG@50", "params: centralized.selection_metric must be full/ or sampled/"),
    ("pretrain_sasrec.keep=first", "params: pretrain_sasrec.keep must be one of best, last, got 'first'"),
    ("features_text.device=gpu", "params: features_text.device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
])
def test_a_choice_outside_its_set_is_refused_for_every_trainer(override, message):
    """`-S centralized.optimizer=adamw` used to be accepted and silently train Adam."""
    from feddmmr.config import load_params, validate
    from feddmmr.errors import FeddmmrError
    with pytest.raises(FeddmmrError) as err:
        validate(load_params(None, [override]))
    assert str(err.value).startswith(message), str(err.value)


def test_the_flower_federation_implements_the_declared_round_interface():
    """stages.train_stage takes a workers.Federation (was: attributes guessed with getattr and defaults)."""
    pytest.importorskip("flwr", reason="Flower is not installed (pip install -e '.[flower]')")
    from feddmmr.flower.server_app import FlowerRounds
    from feddmmr.federated.workers import Federation
    assert isinstance(FlowerRounds(grid=None, nodes=[1, 2], timeout=1.0), Federation)


def test_a_round_executor_without_the_interface_is_refused_before_anything_runs(tiny_prepared, tmp_path):
    from conftest import tiny_params
    from feddmmr.training.stages import train_stage
    with pytest.raises(TypeError, match="rounds must implement workers.Federation"):
        train_stage("pretrain_sasrec", tiny_params(rounds=1), tiny_prepared, tmp_path / "ck", tmp_path / "m.json",
                    rounds=lambda *a, **k: None)
    assert not (tmp_path / "ck").exists()


def test_dvc_yaml_and_prefect_yaml_follow_the_modality_registry():
    """Their features stages and step deployments are written from feddmmr/modalities.py
    (`python -m feddmmr.generate`); an entry added or changed without regenerating fails here."""
    from feddmmr.generate import stale
    assert stale() == [], f"{stale()} are stale: run `python -m feddmmr.generate`"


def test_a_new_registry_entry_gets_its_stage_and_step(monkeypatch):
    import feddmmr.generate as generate
    from feddmmr.modalities import MODALITIES, Modality, TextFeatureParams
    audio = Modality("audio", query="feature", params=TextFeatureParams, extractor="feddmmr.features.text:extract",
                     gpu=True, reads=("prepare.path",))
    monkeypatch.setattr(generate, "MODALITIES", (*MODALITIES, audio))
    assert generate.stale() == ["dvc.yaml", "prefect.yaml"]
    dvc_yaml = generate.rendered("dvc.yaml", (generate.ROOT / "dvc.yaml").read_text())
    stage = yaml.safe_load(dvc_yaml)["stages"]["features_audio"]
    assert stage["cmd"] == "feddmmr -q features audio --data data/prepared --out features/audio"
    assert stage["params"] == ["prepare.path", "features_audio"] and stage["outs"] == ["features/audio"]
    assert "feddmmr/features/text.py" in stage["deps"] and "feddmmr/features/visual.py" not in stage["deps"]
    prefect = yaml.safe_load(generate.rendered("prefect.yaml", (generate.ROOT / "prefect.yaml").read_text()))
    step = {d["name"]: d for d in prefect["deployments"]}["features-audio"]
    assert step["entrypoint"] == "flows/steps.py:step_flow" and "container_create_kwargs" in step["work_pool"]["job_variables"]
