"""The node side: the ClientApp that a SuperNode runs on the users it holds (``train_users``, ``start_memories``,
``finish_memories``, ``evaluate_users``); it sends back only summed updates, never an interaction."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from feddmmr.config import MemoryParams, MultimodalTrainParams, TrainParams
from feddmmr.data.prepare import Prepared, load_prepared
from feddmmr.errors import FeddmmrError
from feddmmr.evaluation.metrics import Evaluator
from feddmmr.features.store import load_modalities
from feddmmr.federated.client import (
    ClientPool,
    client_chunks,
    train_chunk_sequential,
    warm_memories,
)
from feddmmr.flower.node_memory import NodeMemories, keep_only, summary_parts
from feddmmr.model import FedDMMR, FedDMMRConfig
from feddmmr.model.memory import MemoryBank, combined_features
from feddmmr.training.checkpoint import stage_features

log = logging.getLogger("feddmmr")


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


def data_fingerprint(data: Prepared) -> dict:
    return json.loads(json.dumps({"source_sha256": data.meta["source_sha256"], "num_users": data.num_users,
                                  "num_items": data.num_items, "items_sha256": data.items_sha256}))


client_app = ClientApp()


@client_app.query()
def describe_node(msg: Message, context: Context) -> Message:
    """The node's partition and the fingerprint of its prepared data (the server checks they agree)."""
    data_dir, part, parts = node_partition(context.node_config)
    info = {"partition-id": part, "num-partitions": parts, **data_fingerprint(load_prepared(data_dir))}
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
