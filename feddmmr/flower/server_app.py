"""The server side: the ServerApp that trains a stage with the project's round loop (``training.stages``),
its rounds trained by the SuperNodes (``FlowerRounds``, a ``federated.workers.Federation``)."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from feddmmr.config import TrainParams, load_params
from feddmmr.data.prepare import Prepared, load_prepared
from feddmmr.errors import FeddmmrError
from feddmmr.evaluation.metrics import Evaluator
from feddmmr.federated.client import RoundResult, split_params, use_sparse
from feddmmr.federated.server import FedAvg, PartialSum
from feddmmr.flower.client_app import data_fingerprint
from feddmmr.flower.node_memory import RemoteMemory, run_name, summary_of
from feddmmr.io import write_json
from feddmmr.model.memory import STATE_KEYS
from feddmmr.training.stages import STAGE_SPECS, train_stage

log = logging.getLogger("feddmmr")


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
        if {k: info[k] for k in data_fingerprint(data)} != data_fingerprint(data):
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
