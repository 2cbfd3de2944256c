"""Client memories kept by the clients (a multimodal stage on Flower): the nodes' snapshots, the server's
pointer to them, and the memory summary added up from the nodes'. No Flower needed (test_flower.py runs
the federation)."""
import numpy as np
import pytest
import torch

from feddmmr.config import MemoryParams
from feddmmr.errors import FeddmmrError
from feddmmr.model.memory import MemoryBank, read_pointer
from feddmmr.flower.node_memory import NodeMemories, RemoteMemory, keep_only, run_name, summary_of, summary_parts

PARAMS = MemoryParams(st_capacity=3, lt_capacity=4, retrieve_lt=2, surprise_threshold=0.3)


def filled_bank(users: int = 10, seed: int = 0) -> MemoryBank:
    rng = np.random.default_rng(seed)
    bank = MemoryBank(users, PARAMS)
    for u in range(0, users, 2):                       # every other user has observed something
        n = int(rng.integers(3, 9))
        bank.observe(u, rng.integers(1, 30, n), np.arange(1, n + 1), rng.random(n))
    return bank


def test_a_node_saves_and_loads_only_its_users_and_keeps_the_named_round(tmp_path):
    bank = filled_bank()
    node = NodeMemories(tmp_path, np.arange(1, 10, 3), 10)          # partition 1 of 3
    node.save(bank, "abc-01", 2)
    node.save(bank, "abc-01", 3)
    back = node.load("abc-01", 2, PARAMS, None)
    for k, v in bank.state_dict().items():
        got = back.state_dict()[k]
        assert torch.equal(got[node.users], v[node.users]), k
        assert not got[[0, 2, 3]].any() or k in ("st_pos", "lt_pos")      # other nodes' users stay empty
    keep_only(tmp_path, "abc-01", 3)
    assert [p.name for p in (tmp_path / "abc-01").iterdir()] == ["round-3.safetensors"]
    with pytest.raises(FeddmmrError, match="holds no memories of run abc-01 round 2"):
        node.load("abc-01", 2, PARAMS, None)
    with pytest.raises(FeddmmrError, match="other users than this node's partition"):
        NodeMemories(tmp_path, np.arange(0, 10, 3), 10).load("abc-01", 3, PARAMS, None)


def test_the_server_holds_a_pointer_that_resume_and_the_next_stage_follow():
    stage2 = RemoteMemory(10, PARAMS, {}, ["text"], run_name("f" * 64))
    stage2.round, stage2.seen = 7, True
    saved = stage2.state_dict()
    assert read_pointer(saved) == (stage2.run, 7, True)

    resumed = RemoteMemory(10, PARAMS, {}, ["text"], run_name("f" * 64))   # same inputs, a new nonce
    resumed.load_state_dict(saved)
    assert (resumed.run, resumed.round, resumed.start) == (stage2.run, 7, None)   # continues that run's snapshots

    stage3 = RemoteMemory(10, PARAMS, {}, ["text"], run_name("e" * 64))
    stage3.load_state_dict(saved)                                           # the start checkpoint's pointer
    assert stage3.round is None and stage3.start == ("run", stage2.run, 7) and stage3.participations.any()

    from_simulator = RemoteMemory(10, PARAMS, {}, ["text"], run_name("d" * 64))
    from_simulator.load_state_dict(filled_bank().state_dict())               # a MemoryBank: rows for the nodes
    assert from_simulator.start[0] == "bank" and from_simulator.participations.any()
    with pytest.raises(ValueError, match="stay on the SuperNodes"):
        MemoryBank(10, PARAMS).load_state_dict(saved)                          # the simulator cannot read a pointer


def test_the_summary_of_the_nodes_is_the_summary_of_the_whole_bank():
    bank = filled_bank(11, seed=3)
    bank.participations[4] = 0                       # slots but no participation: counted as the bank counts them
    parts = [summary_parts(bank, np.arange(p, 11, 3)) for p in range(3)]
    assert summary_of(parts, PARAMS.lt_capacity) == pytest.approx(bank.summary())
    assert summary_of([summary_parts(MemoryBank(4, PARAMS), np.arange(4))], 4) == MemoryBank(4, PARAMS).summary()
