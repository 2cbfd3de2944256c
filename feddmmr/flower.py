"""A stage on a Flower federation: the project's clients on SuperNodes, its server in a ServerApp.

Flower (``flwr``, the ``flower`` extra) runs a SuperLink that relays messages, SuperNodes that hold the
data, a ServerApp and a ClientApp. Here:

- the **ServerApp** (``server_app``) runs where the SuperLink runs, in the project folder. It trains the
  stage with the project's own round loop (``stages.train_stage``: client sampling, FedAvg, the server
  optimizer, validation, checkpoint, metrics, MLflow run, resume), with one change: the round's clients
  are trained by the SuperNodes that hold them (``FlowerRounds``), so the stage's outputs are those of the
  simulator and later stages, ``compare`` and ``recommend`` do not care which engine trained it;
- each **SuperNode** holds a partition of the users (``--node-config "data-dir=... partition-id=p
  num-partitions=n"``: user u belongs to node u % n). Its **ClientApp** (``client_app``) receives the
  global weights and the round's users it holds, trains them with the project's client update
  (``client.train_chunk_sequential``: the same loss, negatives and per-client seeds) and sends back only
  their summed update (``server.PartialSum``), its weight and loss: never an interaction.

``train_on_flower`` is what ``feddmmr train --engine flower`` runs: it writes the Flower app (a
``pyproject.toml`` naming these two apps), starts a SuperLink and ``federation.nodes`` SuperNodes on
127.0.0.1 unless ``federation.superlink`` names a running one, submits the run with ``flwr run`` and
reports the stage's metrics or its error.

The multimodal stages keep a memory per client, which lives with the client's data: each SuperNode keeps
its users' memories (``remote_memory.NodeMemories``, in the ``state-dir`` of its node config, beside its
``features-dir`` of item features), fills them at the start of a stage, updates them in every round and
ranks its users' validation and test targets with them (``evaluate_users``). The server holds only a
pointer to the nodes' snapshot (``remote_memory.RemoteMemory``), in its resume state and in the
checkpoint's ``memory.safetensors``; the next stage on the same federation continues from it. Stage 1
is validated on the server, which holds the prepared data as every node does.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from .client import (ClientPool, RoundResult, split_params, client_chunks, train_chunk_sequential, use_sparse,
                     warm_memories)
from .config import MemoryParams, MultimodalTrainParams, Params, TrainParams, load_params
from .data import Prepared, load_prepared
from .errors import FeddmmrError
from .features import load_modalities
from .io import read_json, write_json
from .memory import STATE_KEYS, MemoryBank, combined_features
from .metrics import Evaluator
from .model import FedDMMR, FedDMMRConfig
from .remote_memory import NodeMemories, RemoteMemory, keep_only, run_name, summary_of, summary_parts
from .server import FedAvg, PartialSum

log = logging.getLogger("feddmmr")

APP_TOML = """\
[build-system]
requires = ["setuptools>=65"]
build-backend = "setuptools.build_meta"

[project]
name = "feddmmr-flower"
version = "0.1.0"
description = "FedDMMR stages on a Flower federation (the apps live in the installed feddmmr package)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "feddmmr"

[tool.flwr.app.components]
serverapp = "feddmmr.flower:server_app"
clientapp = "feddmmr.flower:client_app"

[tool.flwr.app.config]
project = ""
job = ""
status = ""
"""
NODES_DIR = ".flower-nodes"    # beside the stage's output: the local SuperNodes' memories, which later stages continue
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def flower_env(**extra: str) -> dict[str, str]:
    """The environment of the Flower processes: telemetry off, and this interpreter's bin folder first on
    PATH, since the SuperLink and SuperNodes start flower-superexec, flwr-serverapp and flwr-clientapp by
    name (a virtual environment that was not activated still works)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, **FLOWER_ENV, "PATH": path, **extra}


# ---------------------------------------------------------------------------------------------- node side

def node_partition(node_config: dict) -> tuple[Path, int, int]:
    """(prepared data folder, partition id, number of partitions) from a SuperNode's ``--node-config``."""
    missing = [k for k in ("data-dir", "partition-id", "num-partitions") if k not in node_config]
    if missing:
        raise FeddmmrError(f"SuperNode --node-config lacks {', '.join(missing)}; start it with --node-config "
                           "\"data-dir='<prepared data>' partition-id=<p> num-partitions=<n>\"")
    part, parts = int(node_config["partition-id"]), int(node_config["num-partitions"])
    if not 0 <= part < parts:
        raise FeddmmrError(f"SuperNode --node-config: partition-id {part} must be in [0, num-partitions={parts})")
    return Path(str(node_config["data-dir"])), part, parts


def _fingerprint(data: Prepared) -> dict:
    return json.loads(json.dumps({"source_sha256": data.meta["source_sha256"], "num_users": data.num_users,
                                  "num_items": data.num_items, "items_sha256": data.items_sha256}))


client_app = ClientApp()


@client_app.query()
def describe_node(msg: Message, context: Context) -> Message:
    """The node's partition and the fingerprint of its prepared data (the server checks they agree)."""
    data_dir, part, parts = node_partition(context.node_config)
    info = {"partition-id": part, "num-partitions": parts, **_fingerprint(load_prepared(data_dir))}
    return Message(RecordDict({"node": ConfigRecord({"info": json.dumps(info)})}), reply_to=msg)


def _process_age() -> float:
    """Seconds since this process started (Linux; 0 elsewhere): the start-up a message costs before its handler."""
    try:
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        return float(Path("/proc/uptime").read_text().split()[0]) - start
    except (OSError, ValueError, IndexError):
        return 0.0


class _Node:
    """What a SuperNode's handlers work on: its partition of the prepared data and, for a multimodal job, the
    item features (checked against the server's) and its snapshots of its users' memories."""

    def __init__(self, context: Context, job: dict):
        data_dir, self.part, self.parts = node_partition(context.node_config)
        self.data = load_prepared(data_dir)
        self.users = np.arange(self.part, self.data.num_users, self.parts)
        self.memory_job, self.features, self.memories = job.get("memory"), None, None
        if self.memory_job:
            from .checkpoint import stage_features
            features_dir, state_dir = node_memory_dirs(context.node_config)
            feats = load_modalities(features_dir, self.data)
            other = [m for m, sha in self.memory_job["features"].items() if feats[m].sha256 != sha]
            if other:
                raise FeddmmrError(f"this SuperNode's {', '.join(other)} features ({features_dir}) differ from the "
                                   f"server's; give every node the same `features` output")
            self.features = stage_features(feats, used=self.memory_job["modalities"])
            self.params = MemoryParams(**self.memory_job["params"])
            self.memories = NodeMemories(state_dir, self.users, self.data.num_users)

    def model(self, job: dict, msg: Message) -> FedDMMR:
        model = FedDMMR(FedDMMRConfig(**job["model"]))
        model.load_state_dict(msg.content["model"].to_torch_state_dict(), strict=True)
        if self.features is not None:
            model.set_features(self.features)
        return model

    def bank(self, rnd: int | None = None, run: str | None = None) -> MemoryBank:
        """The snapshot after round ``rnd`` of ``run`` (default: this job's run; ``rnd`` None: empty memories)."""
        comb = combined_features(self.features)
        if rnd is None:
            return self.memories.empty(self.params, comb)
        return self.memories.load(run or self.memory_job["run"], rnd, self.params, comb)


def node_memory_dirs(node_config: dict) -> tuple[Path, Path]:
    """(item features folder, memory snapshots folder) of a SuperNode, which the multimodal stages need."""
    missing = [k for k in ("features-dir", "state-dir") if k not in node_config]
    if missing:
        raise FeddmmrError(f"SuperNode --node-config lacks {', '.join(missing)}: the multimodal stages need the item "
                           "features and a folder for the client memories; add \"features-dir='<features>' "
                           "state-dir='<folder of this node>'\"")
    return Path(str(node_config["features-dir"])), Path(str(node_config["state-dir"]))


def _job(msg: Message) -> dict:
    return json.loads(str(msg.content["config"]["job"]))


@client_app.train()
def train_users(msg: Message, context: Context) -> Message:
    """The round's users this node holds, trained from the global weights; their summed update goes back.
    A multimodal round starts from the node's memories after the previous round and saves them after this one."""
    started, t0 = _process_age(), time.perf_counter()
    job = _job(msg)
    node = _Node(context, job)
    foreign = [u for u in job["users"] if u % node.parts != node.part]
    if foreign:
        raise FeddmmrError(f"users {foreign[:5]} are not in this node's partition {node.part} of {node.parts}")
    torch.set_num_threads(max(1, int(context.node_config.get("threads", 1))))
    model = node.model(job, msg).train()
    tp = (MultimodalTrainParams if model.multimodal else TrainParams)(**job["train"])
    pool = ClientPool(node.data)                    # built per message: every message runs in a fresh process
    bank = node.bank(job["memory"]["from"]) if node.memories else None
    (users, mem_ids, mem_pos), = client_chunks(job["users"], bank, len(job["users"]))
    t1 = time.perf_counter()
    result = train_chunk_sequential(model, users, mem_ids, mem_pos, pool, job["round"], tp, job["names"], job["sparse"])
    writes, surprise_sum, surprise_n = result.observed.flush(bank)
    if bank is not None:
        node.memories.save(bank, job["memory"]["run"], job["memory"]["to"])
    arrays = result.update.to_arrays()
    stats = MetricRecord({"total_w": result.update.total_w, "loss_sum": result.loss_sum, "steps": result.steps,
                          "users": len(users), "writes": writes, "surprise_sum": surprise_sum,
                          "surprise_n": surprise_n, "seconds_start": started, "seconds_load": t1 - t0,
                          "seconds_train": time.perf_counter() - t1})
    return Message(RecordDict({"update": ArrayRecord(arrays), "stats": stats}), reply_to=msg)


@client_app.train("start")
def start_memories(msg: Message, context: Context) -> Message:
    """A stage run's memories before its first round (round 0): empty, the node's own snapshot of the start
    checkpoint's run, or its users' rows of a simulator's checkpoint; then filled once (warm-up) if asked."""
    job = _job(msg)
    node = _Node(context, job)
    start = job["start"]
    bank = node.bank(start[1], run=start[0]) if isinstance(start, list) else node.bank()
    if start == "rows":
        node.memories.put_rows(bank, msg.content["rows"].to_torch_state_dict())
    writes = 0
    if job["warm"]:
        tp = MultimodalTrainParams(**job["train"])
        writes = warm_memories(node.model(job, msg), ClientPool(node.data), bank, tp, users=node.users.tolist())
    node.memories.save(bank, job["memory"]["run"], 0)
    seen = bool(bank.participations[node.users].any())
    return Message(RecordDict({"stats": MetricRecord({"writes": writes, "seen": int(seen)})}), reply_to=msg)


@client_app.train("finish")
def finish_memories(msg: Message, context: Context) -> Message:
    """A finished stage run: only the snapshot its checkpoint names is kept."""
    job = _job(msg)
    keep_only(node_memory_dirs(context.node_config)[1], job["run"], job["round"])
    return Message(RecordDict({"stats": MetricRecord({"kept": job["round"]})}), reply_to=msg)


@client_app.evaluate()
def evaluate_users(msg: Message, context: Context) -> Message:
    """Ranks of this node's users' validation or test targets under the global model and their memories
    after round ``round``; with a summary of those memories (counts only)."""
    started, t0 = _process_age(), time.perf_counter()
    job = _job(msg)
    node = _Node(context, job)
    torch.set_num_threads(max(1, int(context.node_config.get("threads", 1))))
    model = node.model(job, msg)
    bank = node.bank(job["memory"]["round"])
    evaluator = Evaluator(node.data, [], job["batch_size"])
    t1 = time.perf_counter()
    full, sampled = evaluator.ranks(model, job["split"], bank, users=node.users)
    arrays = {"users": torch.from_numpy(node.users), "full": full, "sampled": sampled}
    stats = MetricRecord({"nonfinite": evaluator.nonfinite, "summary": summary_parts(bank, node.users),
                          "seconds_start": started, "seconds_load": t1 - t0, "seconds_rank": time.perf_counter() - t1})
    return Message(RecordDict({"ranks": ArrayRecord(arrays), "stats": stats}), reply_to=msg)


# ---------------------------------------------------------------------------------------------- server side

def _partial_sum(update: ArrayRecord, names: list[str], total_w: float) -> PartialSum:
    """A node's reply as the ``PartialSum`` it was made from (``PartialSum.to_arrays``' wire format)."""
    return PartialSum.from_arrays(update.to_torch_state_dict(), names, total_w)


class FlowerRounds:
    """The round executor of a stage trained on a federation: each SuperNode trains the round's users it
    holds; their partial sums are added in partition order (FedAvg), as ``client.train_round_sequential``
    adds its chunks. In a multimodal stage the nodes also keep their users' memories (``remote_memory``):
    they fill them at the start, update them in every round and rank their users' targets with them."""

    def __init__(self, grid: Grid, nodes: list[int], timeout: float):
        self.grid, self.nodes, self.timeout = grid, nodes, timeout          # nodes[p]: node id of partition p
        self.description = f"Flower federation of {len(nodes)} SuperNodes (user u on node u % {len(nodes)})"
        self.memory: RemoteMemory | None = None

    def __call__(self, model: torch.nn.Module, clients: list[int], pool, rnd: int, tp: TrainParams,
                 trainable: set[str] | None = None, memory: RemoteMemory | None = None) -> RoundResult:
        t0 = time.perf_counter()
        global_params, names = split_params(model, trainable)
        job = {"round": rnd, "names": names, "sparse": use_sparse(names, tp), "train": asdict(tp),
               "model": asdict(model.config)}
        if memory is not None:
            self._started(model, memory)
            job["memory"] = {**memory.job(), "from": memory.round, "to": rnd}
        messages, parts, state = [], len(self.nodes), _model_state(model)
        for p, node in enumerate(self.nodes):
            users = [u for u in clients if u % parts == p]
            if users:
                content = RecordDict({"model": state, "config": ConfigRecord({"job": json.dumps({**job, "users": users})})})
                messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(rnd)))
        agg, totals, spent = FedAvg(global_params, names), dict.fromkeys(("loss_sum", "steps", "writes", "surprise_sum",
                                                                           "surprise_n"), 0.0), []
        for reply in self._replies(messages, f"round {rnd}"):              # partition order
            stats = reply.content["stats"]
            agg.add_partial(_partial_sum(reply.content["update"], names, float(stats["total_w"])))
            for k in totals:
                totals[k] += float(stats[k])
            spent.append([float(stats[f"seconds_{k}"]) for k in ("start", "load", "train")])
        if memory is not None:
            memory.round, memory.seen = rnd, True
        log.info("round %d on %d SuperNodes in %.1fs; slowest node: process start %.1fs, data and model %.1fs, "
                 "training %.1fs", rnd, len(messages), time.perf_counter() - t0, *max(spent, key=sum))
        return RoundResult(agg.result(), totals["loss_sum"] / agg.total_w, len(clients), int(totals["steps"]),
                           int(totals["writes"]), totals["surprise_sum"] / max(totals["surprise_n"], 1))

    # ------------------------------------------------------------------ the client memories (multimodal stages)
    def memory_bank(self, num_users: int, params, feature_sha: dict, modalities: list[str], key: str) -> RemoteMemory:
        self.memory = RemoteMemory(num_users, params, feature_sha, modalities, run_name(key))
        return self.memory

    def warm_memories(self, model: torch.nn.Module, pool, memory: RemoteMemory, tp: TrainParams) -> int:
        return self._start(model, memory, tp)

    def _started(self, model: torch.nn.Module, memory: RemoteMemory) -> None:
        if memory.round is None:
            self._start(model, memory, None)

    def _start(self, model: torch.nn.Module, memory: RemoteMemory, tp: TrainParams | None) -> int:
        """Round 0 of the memories on every node: from the start checkpoint's (or empty), warmed up with ``tp``."""
        start = memory.start
        job = {"model": asdict(model.config), "memory": memory.job(), "warm": tp is not None,
               "train": asdict(tp) if tp is not None else None,
               "start": None if start is None else "rows" if start[0] == "bank" else list(start[1:])}
        rows = None
        if start is not None and start[0] == "bank":      # a simulator's checkpoint: each node gets its users' rows
            users = [np.arange(p, memory.num_users, len(self.nodes)) for p in range(len(self.nodes))]
            rows = [ArrayRecord({k: torch.from_numpy(getattr(start[1], k)[u]) for k in STATE_KEYS}) for u in users]
        replies = self._broadcast("train.start", job, model, rows, "starting the client memories")
        memory.round = 0
        memory.seen = memory.seen or any(int(r.content["stats"]["seen"]) for r in replies)
        return sum(int(r.content["stats"]["writes"]) for r in replies)

    def evaluator(self, data: Prepared, ks: list[int], batch_size: int) -> Evaluator:
        return FlowerEvaluator(self, data, ks, batch_size)

    def ranks(self, model: torch.nn.Module, split: str, memory: RemoteMemory, batch_size: int):
        """(full ranks [U], sampled ranks [U], non-finite scores) from the nodes, each ranking its users."""
        self._started(model, memory)
        t0 = time.perf_counter()
        job = {"model": asdict(model.config), "memory": {**memory.job(), "round": memory.round}, "split": split,
               "batch_size": batch_size}
        replies = self._broadcast(MessageType.EVALUATE, job, model, None, f"evaluating {split}")
        spent = max(([float(r.content["stats"][f"seconds_{k}"]) for k in ("start", "load", "rank")] for r in replies),
                    key=sum)
        log.info("evaluating %s on %d SuperNodes in %.1fs; slowest node: process start %.1fs, data, features and "
                 "memories %.1fs, ranking %.1fs", split, len(replies), time.perf_counter() - t0, *spent)
        parts = [r.content["ranks"].to_torch_state_dict() for r in replies]
        full = torch.zeros(memory.num_users, dtype=torch.long)
        sampled = torch.zeros(memory.num_users if len(parts[0]["sampled"]) else 0, dtype=torch.long)
        for ranks in parts:
            full[ranks["users"]] = ranks["full"]
            if len(sampled):
                sampled[ranks["users"]] = ranks["sampled"]
        memory.stats = summary_of([list(r.content["stats"]["summary"]) for r in replies], memory.params.lt_capacity)
        return full, sampled, sum(int(r.content["stats"]["nonfinite"]) for r in replies)

    def finish(self) -> None:
        """After the stage: the nodes keep only the snapshot its checkpoint names (the best round's)."""
        if self.memory is not None and self.memory.round is not None:
            self._broadcast("train.finish", {"run": self.memory.run, "round": self.memory.round}, None, None,
                            "finishing the client memories")

    # ------------------------------------------------------------------ messages
    def _broadcast(self, kind: str, job: dict, model: torch.nn.Module | None, rows: list | None,
                   what: str) -> list[Message]:
        """One message of type ``kind`` to every node (its ``rows`` if given); the replies in partition order."""
        state = _model_state(model) if model is not None else None
        messages = []
        for p, node in enumerate(self.nodes):
            content = RecordDict({"config": ConfigRecord({"job": json.dumps(job)}),
                                  **({"model": state} if state is not None else {}),
                                  **({"rows": rows[p]} if rows is not None else {})})
            messages.append(Message(content, dst_node_id=node, message_type=kind, group_id=what))
        return self._replies(messages, what)

    def _replies(self, messages: list[Message], what: str) -> list[Message]:
        replies = exchange(self.grid, messages, self.timeout)
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            p = self.nodes.index(node)
            if node not in replies:
                raise FeddmmrError(f"{what}: SuperNode {node} (partition {p}) sent no reply within "
                                   f"federation.timeout={self.timeout:g}s; check that it is running")
            if replies[node].has_error():
                raise FeddmmrError(f"{what}: SuperNode {node} (partition {p}) failed: {replies[node].error.reason}")
            out.append(replies[node])
        return out


def _model_state(model: torch.nn.Module) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})


class FlowerEvaluator(Evaluator):
    """Ranks from the SuperNodes when the client memories are theirs (multimodal stages); here otherwise."""

    def __init__(self, rounds: FlowerRounds, data: Prepared, ks: list[int], batch_size: int):
        super().__init__(data, ks, batch_size)
        self.rounds = rounds

    def ranks(self, model: torch.nn.Module, split: str, memory=None, users=None) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(memory, RemoteMemory):
            return super().ranks(model, split, memory, users)
        full, sampled, self.nonfinite = self.rounds.ranks(model, split, memory, self.batch_size)
        return full, sampled


def exchange(grid: Grid, messages: list[Message], timeout: float, poll: float = 0.05) -> dict[int, Message]:
    """Send ``messages`` and wait up to ``timeout`` seconds for their replies; replies by destination node
    (an error reply from the SuperLink names no node). ``Grid.send_and_receive`` polls every 3 s; a round
    waits ``poll`` at most."""
    ids = list(grid.push_messages(messages))
    node_of = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages)}
    replies: dict[int, Message] = {}
    deadline = time.monotonic() + timeout
    while len(replies) < len(ids) and time.monotonic() < deadline:
        pending = [mid for mid in ids if node_of[mid] not in replies]
        for reply in grid.pull_messages(pending):
            replies[node_of[reply.metadata.reply_to_message_id]] = reply
        if len(replies) < len(ids):
            time.sleep(poll)
    return replies


def _describe(grid: Grid, ids: list[int], deadline: float) -> dict[int, dict]:
    """Each node's partition and data fingerprint (``describe_node``). A node the SuperLink does not yet
    count as online (it has just connected) is asked again until ``deadline``."""
    info: dict[int, dict] = {}
    while pending := [n for n in ids if n not in info]:
        queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in pending]
        for src, reply in exchange(grid, queries, max(0.0, deadline - time.monotonic())).items():
            if not reply.has_error():
                info[src] = json.loads(str(reply.content["node"]["info"]))
            elif reply.error.code != ErrorCode.NODE_UNAVAILABLE or time.monotonic() > deadline:
                raise FeddmmrError(f"SuperNode {src} could not describe its data: {reply.error.reason}")
        if len(info) < len(ids):
            if time.monotonic() > deadline:
                raise FeddmmrError(f"SuperNodes {sorted(set(ids) - set(info))} did not answer within "
                                   f"federation.timeout; check that they are running")
            time.sleep(0.5)
    return info


def connect_nodes(grid: Grid, expected: int, data: Prepared, timeout: float) -> list[int]:
    """Wait for ``expected`` SuperNodes, ask each its partition; node ids by partition. Fails when the
    partitions do not cover 0..expected-1 once, or a node's prepared data differ from the server's."""
    deadline = time.monotonic() + timeout
    while len(ids := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise FeddmmrError(f"{len(ids)} of federation.nodes={expected} SuperNodes connected within "
                               f"federation.timeout={timeout:g}s; start the missing ones or lower federation.nodes")
        time.sleep(0.5)
    nodes: dict[int, int] = {}
    for src, info in _describe(grid, ids, deadline).items():
        if {k: info[k] for k in _fingerprint(data)} != _fingerprint(data):
            raise FeddmmrError(f"SuperNode {src} holds other prepared data ({info['num_users']} users, "
                               f"{info['num_items']} items) than the server; give every node the same `prepare` output")
        if info["num-partitions"] != expected or info["partition-id"] in nodes:
            raise FeddmmrError(f"SuperNode {src} is partition {info['partition-id']} of {info['num-partitions']}; "
                               f"the federation needs partitions 0..{expected - 1} of {expected}, each once")
        nodes[int(info["partition-id"])] = src
    return [nodes[p] for p in range(expected)]


server_app = ServerApp()


@server_app.main()
def run_stage(grid: Grid, context: Context) -> None:
    """Train the stage of the job (``train_on_flower``) with its round executed by the SuperNodes; the
    outcome (metrics or error) goes to the job's status file."""
    config = context.run_config
    status = Path(str(config["status"]))
    if not log.handlers:                               # the stage's log, streamed by `flwr run --stream`
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        os.chdir(str(config["project"]))
        job = json.loads(str(config["job"]))
        params = load_params(job["params"], job["overrides"])
        from .stages import STAGE_SPECS, train_stage
        data = load_prepared(job["data"])
        nodes = connect_nodes(grid, params.federation.nodes, data, params.federation.timeout)
        rounds = FlowerRounds(grid, nodes, params.federation.timeout)
        if STAGE_SPECS[job["stage"]].multimodal and params.tracking.log_models:
            params.tracking.log_models = False
            log.info("%s: its client memories stay on the SuperNodes, so MLflow gets no servable model of it",
                     job["stage"])
        metrics = train_stage(job["stage"], params, job["data"], job["out"], job["metrics"], progress=False,
                              features_dir=job["features"], init_dir=job["init"], restart=job["restart"], rounds=rounds)
        rounds.finish()
        write_json(status, {"ok": True, "metrics": metrics})
    except FeddmmrError as exc:
        write_json(status, {"ok": False, "error": str(exc)})
    except BaseException as exc:
        write_json(status, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        raise


# ---------------------------------------------------------------------------------------------- launcher

def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_port(port: int, proc: subprocess.Popen, log_file: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FeddmmrError(f"the local SuperLink exited ({proc.returncode}): {_tail(log_file)}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise FeddmmrError(f"the local SuperLink did not open 127.0.0.1:{port} within {timeout:g}s: {_tail(log_file)}")


def _tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return " | ".join(text[-lines:]) or "no output"


def _bin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if not found:
        raise FeddmmrError(f"{name} not found: install the Flower extra (pip install -e '.[flower]')")
    return found


@contextlib.contextmanager
def local_federation(nodes: int, data_dir: Path, work: Path, project: Path, features_dir: Path,
                     state_dir: Path) -> Iterator[str]:
    """A SuperLink and ``nodes`` SuperNodes on 127.0.0.1 (SuperNode p holds partition p of ``data_dir``, and
    its users' memories in ``state_dir``/node-p), stopped on exit; yields the SuperLink's control API address."""
    serverappio, fleet, control, *appio = _free_ports(3 + nodes)
    procs = []
    try:
        link_log = work / "superlink.log"
        procs.append(subprocess.Popen(
            [_bin("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
             "--serverappio-api-address", f"127.0.0.1:{serverappio}", "--fleet-api-address", f"127.0.0.1:{fleet}",
             "--control-api-address", f"127.0.0.1:{control}"],   # state in memory
            cwd=project, env=flower_env(FLWR_HOME=str(work / "superlink")), stdout=link_log.open("w"),
            stderr=subprocess.STDOUT, start_new_session=True))
        _wait_port(control, procs[0], link_log)
        _wait_port(fleet, procs[0], link_log)
        for p in range(nodes):
            node_config = (f"data-dir='{data_dir}' partition-id={p} num-partitions={nodes} "
                           f"features-dir='{features_dir}' state-dir='{state_dir / f'node-{p}'}'")
            procs.append(subprocess.Popen(
                [_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{fleet}",
                 "--clientappio-api-address", f"127.0.0.1:{appio[p]}", "--node-config", node_config],
                cwd=project, env=flower_env(FLWR_HOME=str(work / f"supernode-{p}")),
                stdout=(work / f"supernode-{p}.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True))
        yield f"127.0.0.1:{control}"
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            with contextlib.suppress(ProcessLookupError):   # whatever of its group is left (a ServerApp, a ClientApp)
                os.killpg(proc.pid, signal.SIGKILL)


def write_app(folder: Path, address: str) -> tuple[Path, Path]:
    """The Flower app (its pyproject.toml) and a Flower config naming the SuperLink ``address``; (app, home)."""
    app, home = folder / "app", folder / "flwr-home"
    app.mkdir(parents=True)
    home.mkdir(parents=True)
    (app / "pyproject.toml").write_text(APP_TOML)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "feddmmr"\n\n[superlink.feddmmr]\n'
                                      f'address = "{address}"\ninsecure = true\n')
    return app, home


def train_on_flower(stage: str, params: Params, params_path: str | None, overrides: list[str], data_dir: str,
                    out_dir: str, metrics_path: str, features_dir: str = "features", init_dir: str | None = None,
                    restart: bool = False) -> dict:
    """Train ``stage`` on a Flower federation (``params.federation``); returns its metrics as ``train_stage`` does."""
    fed, project = params.federation, Path.cwd()
    job = {"stage": stage, "params": str(Path(params_path).resolve()) if params_path else None,
           "overrides": list(overrides) + ["federation.engine=flower"], "data": str(Path(data_dir).resolve()),
           "out": str(Path(out_dir).resolve()), "metrics": str(Path(metrics_path).resolve()),
           "features": str(Path(features_dir).resolve()), "init": init_dir and str(Path(init_dir).resolve()),
           "restart": restart}
    with tempfile.TemporaryDirectory(prefix="feddmmr-flower-") as tmp:
        work = Path(tmp)
        status = work / "status.json"
        run_config = work / "run-config.toml"
        run_config.write_text(f"project = {json.dumps(str(project))}\njob = {json.dumps(json.dumps(job))}\n"
                              f"status = {json.dumps(str(status))}\n")
        nodes_dir = Path(out_dir).resolve().parent / NODES_DIR      # outlives the command: later stages continue it
        with (local_federation(fed.nodes, Path(data_dir).resolve(), work, project, Path(features_dir).resolve(),
                               nodes_dir) if not fed.superlink
              else contextlib.nullcontext(fed.superlink)) as address:
            app, home = write_app(work, address)
            proc = subprocess.run([_bin("flwr"), "run", str(app), "feddmmr", "--stream", "--run-config", str(run_config)],
                                  env=flower_env(FLWR_HOME=str(home)))
        if not status.is_file():
            link = f"; the local SuperLink's log ends: {_tail(work / 'superlink.log')}" if not fed.superlink else ""
            raise FeddmmrError(f"the Flower run of {stage} ended (flwr run exited {proc.returncode}) without a result; "
                               f"see its output above{link}")
        outcome = read_json(status, "Flower run status")
    if not outcome["ok"]:
        raise FeddmmrError(f"{stage} on Flower: {outcome['error']}")
    return outcome["metrics"]
