"""Typed parameters, one dataclass per ``params.yaml`` section.

The dataclass defaults are the embedded defaults; ``params.yaml`` mirrors them and any key can be
overridden from the command line with ``-S section.key=value`` (the same syntax as ``dvc exp run -S``).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from feddmmr.errors import FeddmmrError
from feddmmr.modalities import MODALITIES, NAMES, TextFeatureParams, VisualFeatureParams

if TYPE_CHECKING:
    import torch


@dataclass
class PrepareParams:
    source: str = "csv"                      # ml-1m | ml-100k | csv
    path: str = "data/demo/interactions.csv"  # folder, zip or file
    top_k_users: int = 0                     # keep the K most active users (0 = all)
    min_user_interactions: int = 5           # users with fewer interactions are dropped
    max_seq_len: int = 50
    eval_negatives: int = 100                # sampled-protocol negatives per user, drawn once
    seed: int = 42


@dataclass
class ModelParams:
    hidden: int = 128
    blocks: int = 2
    heads: int = 4
    ffn_hidden: int = 128
    dropout: float = 0.2


@dataclass
class EvalParams:
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    batch_size: int = 512


@dataclass
class TrainParams:
    rounds: int = 100
    client_fraction: float = 0.1
    local_epochs: int = 1
    batch_size: int = 16             # training windows (of max_seq_len positions) per local step
    optimizer: str = "sgd"           # client optimizer: sgd | adam (fresh each round)
    lr: float = 0.05                 # client learning rate
    weight_decay: float = 0.0
    server_optimizer: str = "adam"   # adam (FedAdam) | sgd (FedAvg / FedAvgM) on the averaged client update
    server_lr: float = 0.01          # server step size (sgd with 1.0 and momentum 0 = plain FedAvg)
    server_momentum: float = 0.9     # sgd: FedAvgM momentum; adam: beta1
    server_eps: float = 1e-3         # adam: tau, its adaptivity; an element updated far below it moves in proportion
    server_bias_correction: bool = False  # adam: Kingma-Ba bias correction (first step lr * sign(delta) per element)
    num_negatives: int = 20          # sampled negatives per training position
    loss: str = "ce"                 # ce (sampled softmax) | bpr | full (softmax over every item; stage 1)
    patience: int = 15               # rounds without improvement before stopping
    selection_metric: str = "full/NDCG@10"
    keep: str = "best"               # checkpoint keeps the best validation round | the last round
    executor: str = "auto"           # auto (sequential on CPU, vectorized on GPU) | vectorized | sequential
    device: str = "auto"             # auto (cuda when available) | cpu | cuda
    clients_per_chunk: int = 8       # clients per vectorized call, or per task of a CPU worker; the server sums chunk by chunk
    seed: int = 42
    freeze: list[str] = field(default_factory=list)  # parameter groups that do not train in this stage


@dataclass
class MultimodalTrainParams(TrainParams):
    """A multimodal stage: TrainParams plus where it starts and its auxiliary losses."""
    init_from: str = ""                  # stage whose checkpoint this stage loads (explicit parameter groups)
    contrastive_weight: float = 0.1      # drift-adaptive contrastive loss weight (0 = off)
    contrastive_temperature: float = 0.1
    surprise_alpha: float = 1.0          # per-target weight 1 + alpha * surprise
    load_balance_weight: float = 0.0     # router load-balancing loss weight
    gate_start: float | None = None      # start the residual gate at this value instead of the loaded one
    modalities: list[str] = field(default_factory=lambda: list(NAMES))  # modalities the stage uses (others masked)
    long_term: bool = True               # retrieve long-term memory slots (false: short-term slots only)


def _pretrain_defaults() -> TrainParams:
    # training from scratch: Adam's per-element step (sign-like) on updates too small and diluted for FedAvg to move
    return TrainParams(patience=50, server_eps=1e-8, server_bias_correction=True)


def _align_defaults() -> MultimodalTrainParams:
    return MultimodalTrainParams(rounds=30, patience=10, init_from="pretrain_sasrec", contrastive_weight=0.5,
                                 gate_start=0.0, keep="last", freeze=["item_embeddings", "backbone", "experts", "router"])


def _finetune_defaults() -> MultimodalTrainParams:
    return MultimodalTrainParams(rounds=60, patience=20, init_from="align_projectors", contrastive_weight=0.1,
                                 load_balance_weight=0.01, server_lr=0.003, server_eps=1e-8,
                                 server_bias_correction=True, gate_start=0.1, freeze=["item_embeddings"])


@dataclass
class CentralizedParams:
    """The centralized counterpart of stage 1: the same model and windows, no federation."""
    epochs: int = 50
    batch_size: int = 128                # windows per step, mixed across users
    optimizer: str = "adam"              # sgd | adam
    lr: float = 0.001
    num_negatives: int = 20              # per target, from outside its user's training history
    loss: str = "ce"                     # ce | bpr | full
    patience: int = 10                   # epochs without improvement before stopping
    selection_metric: str = "full/NDCG@10"
    device: str = "auto"
    seed: int = 42


@dataclass
class MultimodalParams:
    gating_init: float = 0.1             # initial residual gate g (learnable)
    router_hidden: int = 64


@dataclass
class MemoryParams:
    st_capacity: int = 10                # short-term FIFO slots
    lt_capacity: int = 50                # long-term slots
    retrieve_lt: int = 20                # long-term slots retrieved (highest utility)
    surprise_threshold: float = 0.5      # surprise = 1 - p(positive); at or above it an item enters LT
    merge_threshold: float = 0.9         # cosine of combined features at which a new item merges into an LT slot
    half_life: float = 200.0             # recency half-life of the utility, in observed items
    warmup: bool = True                  # a stage starting with empty memories fills them first (one scoring pass)


@dataclass
class TrackingParams:
    enabled: bool = True             # MLflow runs (store: MLFLOW_TRACKING_URI or sqlite:///mlruns.db)
    log_models: bool = True          # each stage logs its model and registers it as a version of `feddmmr`


@dataclass
class RuntimeParams:
    threads: int = 0                 # CPUs: training worker processes and evaluation threads; 0 = every usable CPU
                                     # for training, the free ones for evaluation; env FEDDMMR_THREADS wins


@dataclass
class FederationParams:
    engine: str = "simulation"       # simulation (every client on this machine) | flower (a Flower SuperLink and SuperNodes)
    superlink: str = ""              # flower: control API address (host:port) of a running SuperLink; "" = start one
                                     # on 127.0.0.1 with `nodes` local SuperNodes
    nodes: int = 2                   # flower: SuperNodes, i.e. user partitions, a stage waits for
    timeout: float = 600.0           # flower: seconds to wait for the nodes to connect and for a round's replies


@dataclass
class FixedParams:
    """The sections every pipeline has; ``Params`` adds one ``features_<name>`` section per modality."""

    prepare: PrepareParams = field(default_factory=PrepareParams)
    model: ModelParams = field(default_factory=ModelParams)
    evaluation: EvalParams = field(default_factory=EvalParams)
    pretrain_sasrec: TrainParams = field(default_factory=_pretrain_defaults)
    multimodal: MultimodalParams = field(default_factory=MultimodalParams)
    memory: MemoryParams = field(default_factory=MemoryParams)
    align_projectors: MultimodalTrainParams = field(default_factory=_align_defaults)
    finetune_moe: MultimodalTrainParams = field(default_factory=_finetune_defaults)
    centralized: CentralizedParams = field(default_factory=CentralizedParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)
    runtime: RuntimeParams = field(default_factory=RuntimeParams)
    federation: FederationParams = field(default_factory=FederationParams)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


if TYPE_CHECKING:
    class Params(FixedParams):   # as type checkers see it
        features_text: TextFeatureParams
        features_visual: VisualFeatureParams
else:   # the params section features_<name> of every modality of the registry
    Params = dataclasses.make_dataclass(
        "Params", [(f"features_{m.name}", m.params, field(default_factory=m.params)) for m in MODALITIES],
        bases=(FixedParams,), namespace={"__module__": __name__,
                                         "__doc__": "Every params.yaml section: features_<name> per modality."})


def _is_device(name: Any) -> bool:
    return name in ("auto", "cpu", "cuda") or str(name).startswith("cuda:")


def resolve_device(name: str, section: str) -> torch.device:
    """auto -> cuda when available, else cpu; asking for cuda without a device is an error naming the setting."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not _is_device(name):
        raise FeddmmrError(f"{section}.device must be auto, cpu or cuda[:N], got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FeddmmrError(f"{section}.device is {name} but no CUDA device is available; set {section}.device: auto or cpu")
    return torch.device(name)


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    if (default is None or isinstance(default, float)) and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string; people write floats that way
            value = float(value)
        except ValueError:
            pass
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = True
    if not ok:
        raise FeddmmrError(
            f"params: {section}.{key} must be {type(default).__name__}, got {value!r}; fix it in params.yaml or the -S override"
        )
    return value


def _closest(name: str, valid: set[str]) -> str:
    """' (did you mean X?)' for a misspelt name, else ''."""
    match = difflib.get_close_matches(str(name), sorted(valid), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def update_section(obj: Any, section: str, values: dict[str, Any]) -> None:
    valid = {f.name: f for f in fields(obj)}
    for key, value in values.items():
        if key not in valid:
            raise FeddmmrError(f"params: unknown key {section}.{key}{_closest(key, valid)}; valid keys: "
                               f"{', '.join(sorted(valid))}")
        nullable = value is None and "None" in str(valid[key].type)        # e.g. gate_start: float | None
        setattr(obj, key, None if nullable else _coerce(section, key, value, getattr(obj, key)))


# Allowed ranges, by key (any section that has it) or by section.key. Every float must also be finite.
_POSITIVE, _NON_NEGATIVE, _AT_LEAST_1 = ("> 0", lambda v: v > 0), (">= 0", lambda v: v >= 0), (">= 1", lambda v: v >= 1)
_UNIT_OPEN_TOP, _UNIT_CLOSED = ("in [0, 1)", lambda v: 0 <= v < 1), ("in [0, 1]", lambda v: 0 <= v <= 1)
RANGES: dict[str, tuple[str, Any]] = {
    "lr": _POSITIVE, "server_lr": _POSITIVE, "weight_decay": _NON_NEGATIVE, "server_momentum": _UNIT_OPEN_TOP,
    "server_eps": _POSITIVE,
    "client_fraction": ("in (0, 1]", lambda v: 0 < v <= 1), "dropout": _UNIT_OPEN_TOP,
    "contrastive_weight": _NON_NEGATIVE, "contrastive_temperature": _POSITIVE, "surprise_alpha": _NON_NEGATIVE,
    "load_balance_weight": _NON_NEGATIVE, "surprise_threshold": _UNIT_CLOSED,
    "merge_threshold": ("in [-1, 1]", lambda v: -1 <= v <= 1), "half_life": _POSITIVE,
    "rounds": _AT_LEAST_1, "epochs": _AT_LEAST_1, "local_epochs": _AT_LEAST_1, "num_negatives": _AT_LEAST_1, "patience": _AT_LEAST_1,
    "clients_per_chunk": _AT_LEAST_1, "batch_size": _AT_LEAST_1, "hidden": _AT_LEAST_1, "blocks": _AT_LEAST_1,
    "heads": _AT_LEAST_1, "ffn_hidden": _AT_LEAST_1, "router_hidden": _AT_LEAST_1, "st_capacity": _AT_LEAST_1,
    "lt_capacity": _AT_LEAST_1,
    "retrieve_lt": (">= 0 (0: no long-term slots are read)", lambda v: v >= 0), "dim": _AT_LEAST_1,
    "gate_start": ("null or a number", lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))),
    "freeze": ("a list of parameter group names", lambda v: isinstance(v, list) and all(isinstance(g, str) for g in v)),
    "seed": (">= 0 and < 2^32", lambda v: 0 <= v < 2 ** 32),
    "prepare.top_k_users": (">= 0 (0 = all users)", lambda v: v >= 0),
    # init_from becomes part of the stage's command in dvc.yaml: a closed set of stage names, nothing else
    "align_projectors.init_from": ("pretrain_sasrec", lambda v: v == "pretrain_sasrec"),
    "finetune_moe.init_from": ("align_projectors or pretrain_sasrec", lambda v: v in ("align_projectors",
                                                                                     "pretrain_sasrec")),
    "federation.nodes": _AT_LEAST_1, "federation.timeout": _POSITIVE,
    "runtime.threads": (">= 0 (0 = follow the free CPUs)", lambda v: v >= 0),
    "prepare.min_user_interactions": (">= 3 (leave-one-out needs train, validation and test items)", lambda v: v >= 3),
    "prepare.max_seq_len": (">= 2 and <= 4096", lambda v: 2 <= v <= 4096),
    "prepare.eval_negatives": (">= 0 (negatives of the sampled protocol; 0 turns that protocol off)",
                               lambda v: v >= 0),
}


# Upper bounds where a value sizes memory: far above any sensible setting, below what would take the machine down
# (num_negatives 10^7 OOM-killed a worker; hidden 10^6 asked for terabytes). Checked after RANGES.
LIMITS: dict[str, int] = {
    "hidden": 8192, "ffn_hidden": 32768, "blocks": 64, "heads": 128, "router_hidden": 8192, "dim": 8192,
    "num_negatives": 100_000, "eval_negatives": 100_000, "batch_size": 65_536, "clients_per_chunk": 100_000,
    "st_capacity": 10_000, "lt_capacity": 100_000, "retrieve_lt": 100_000, "local_epochs": 10_000,
}


# Every parameter with a closed set of values, for every section that has it (the trainers' registries,
# client.CLIENT_OPTIMIZERS, server.SERVER_OPTIMIZERS, model.loss.LOSSES and client.EXECUTORS, are checked
# against these by tests/test_house.py)
CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("sgd", "adam"),
    "server_optimizer": ("sgd", "adam"),
    "loss": ("ce", "bpr", "full"),
    "executor": ("auto", "sequential", "vectorized"),
    "keep": ("best", "last"),
    "engine": ("simulation", "flower"),
}


def _check_choices(params: Params) -> None:
    ks = params.evaluation.ks
    metrics = {f"{m}@{k}" for m in ("HR", "NDCG") for k in ks} | {"MRR"}
    for section in fields(params):
        obj = getattr(params, section.name)
        for f in fields(obj):
            value = getattr(obj, f.name)
            if f.name in CHOICES and value not in CHOICES[f.name]:
                raise _bad(section.name, f.name, f"one of {', '.join(CHOICES[f.name])}", value)
            if f.name == "selection_metric":
                protocol, _, metric = str(value).partition("/")
                if protocol not in ("full", "sampled") or metric not in metrics:
                    raise _bad(section.name, f.name, "full/ or sampled/ followed by one of "
                               f"{', '.join(sorted(metrics))}", value)
            if f.name == "device" and not _is_device(value):
                raise _bad(section.name, f.name, "auto, cpu, cuda or cuda:N", value)


def _bad(section: str, key: str, rule: str, value: Any) -> FeddmmrError:
    return FeddmmrError(f"params: {section}.{key} must be {rule}, got {value!r}; fix it in params.yaml or the -S override")


def validate(params: Params) -> None:
    """Range-check every parameter (one line naming the key and the allowed range)."""
    for section in fields(params):
        obj = getattr(params, section.name)
        for f in fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise _bad(section.name, f.name, "a finite number", value)
            rule = RANGES.get(f"{section.name}.{f.name}") or RANGES.get(f.name)
            if rule is not None and not rule[1](value):
                raise _bad(section.name, f.name, rule[0], value)
            if f.name in LIMITS and isinstance(value, int) and value > LIMITS[f.name]:
                raise _bad(section.name, f.name, f"at most {LIMITS[f.name]:,} (it sizes memory)", value)
    m, mem, ks = params.model, params.memory, params.evaluation.ks
    if m.hidden % m.heads:
        raise _bad("model", "hidden", f"a multiple of model.heads ({m.heads})", m.hidden)
    if mem.retrieve_lt > mem.lt_capacity:
        raise _bad("memory", "retrieve_lt", f"<= memory.lt_capacity ({mem.lt_capacity})", mem.retrieve_lt)
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise _bad("evaluation", "ks", "a non-empty list of integers >= 1", ks)
    _check_choices(params)
    for section in fields(params):
        used = getattr(getattr(params, section.name), "modalities", None)
        if used is not None and (not used or not set(used) <= set(NAMES) or len(set(used)) != len(used)):
            raise _bad(section.name, "modalities", f"a non-empty list of distinct modalities out of {list(NAMES)}", used)


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Embedded defaults, updated by ``path`` (when it exists) and then by ``section.key=value`` overrides."""
    params = Params()
    sections = {f.name for f in fields(params)}
    if path is not None and Path(path).is_file():
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise FeddmmrError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
        except yaml.YAMLError as exc:
            raise FeddmmrError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
        if not isinstance(raw, dict):
            raise FeddmmrError(f"{path} must hold a mapping of sections ({', '.join(sorted(sections))})")
        for section, values in raw.items():
            if section not in sections:
                raise FeddmmrError(f"{path}: unknown section {section!r}{_closest(section, sections)}; valid: "
                                   f"{', '.join(sorted(sections))}")
            if not isinstance(values, dict):
                raise FeddmmrError(f"{path}: section {section!r} must be a mapping")
            update_section(getattr(params, section), section, values)
    elif path is not None and str(path) != "params.yaml":
        raise FeddmmrError(f"params file not found: {path} (pass an existing file or omit --params for the defaults)")
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise FeddmmrError(f"override {item!r} must look like section.key=value, e.g. pretrain_sasrec.rounds=5")
        dotted, raw_value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        if section not in sections:
            raise FeddmmrError(f"override {item!r}: unknown section {section!r}{_closest(section, sections)}; valid: "
                               f"{', '.join(sorted(sections))}")
        try:
            value = yaml.safe_load(raw_value)
        except yaml.YAMLError as exc:
            raise FeddmmrError(f"override {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]}); "
                               f"quote strings and close brackets, e.g. {dotted}=[1, 2]") from None
        update_section(getattr(params, section), section, {key: value})
    validate(params)
    return params
