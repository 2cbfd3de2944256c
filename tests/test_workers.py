"""CPU training on worker processes gives the in-process round bit for bit, and fails loudly."""
import os
import signal

import pytest
import torch

from conftest import tiny_params, tiny_stage_params, write_tiny_features
from feddmmr.federated.client import ClientPool, train_round_sequential
from feddmmr.data.prepare import load_prepared
from feddmmr.errors import FeddmmrError, SystemFailure
from feddmmr.federated.server import select_clients
from feddmmr.training.checkpoint import build_memory, build_model
from feddmmr.federated.workers import Workers


@pytest.fixture(scope="module")
def setup(tiny_prepared):
    data = load_prepared(tiny_prepared)
    return data, ClientPool(data)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)        # workers train with one thread: the in-process reference does too
    yield
    torch.set_num_threads(n)


def _rounds(model, pool, tp, data, rounds, workers=None, memory=None):
    out = []
    for rnd in rounds:
        result = train_round_sequential(model, select_clients(data.num_users, 0.5, rnd, 0), pool, rnd, tp,
                                        memory=memory, workers=workers)
        model.load_state_dict(result.state)       # in place, as the stage does: workers must see it
        out.append(result)
    return out


def _same(a, b):
    assert [r.train_loss for r in a] == [r.train_loss for r in b]
    assert [(r.steps, r.memory_writes, r.mean_surprise) for r in a] == [(r.steps, r.memory_writes, r.mean_surprise)
                                                                         for r in b]
    for ra, rb in zip(a, b):
        for k in ra.state:
            assert torch.equal(ra.state[k], rb.state[k]), k


@pytest.mark.parametrize("processes", [2, 3])
def test_worker_processes_train_the_in_process_rounds_bit_for_bit(setup, processes):
    """Dropout on, sparse item rows, three rounds: the server's in-place update reaches the workers, each client
    draws its own dropout stream, and chunks are summed in order whichever worker trained them."""
    data, pool = setup
    params = tiny_params(clients_per_chunk=3)
    assert params.model.dropout > 0
    torch.manual_seed(0)
    model = build_model(params, data)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    alone = _rounds(model, pool, params.pretrain_sasrec, data, [1, 2, 3])
    model.load_state_dict(start)
    torch.rand(5)                 # another global random state: each client's dropout stream is its own
    with Workers(model, pool, processes) as workers:
        pooled = _rounds(model, pool, params.pretrain_sasrec, data, [1, 2, 3], workers)
    _same(alone, pooled)
    assert not any(torch.equal(alone[0].state[k], alone[2].state[k]) for k in ("sasrec.item_emb.weight",))


def test_worker_processes_feed_the_same_memories(setup, tmp_path):
    """Stages 2-3: memory slots go out with each chunk and the observed surprises come back to the memory."""
    from feddmmr.features.store import load_modalities
    data, pool = setup
    params = tiny_stage_params(clients_per_chunk=4)
    tp = params.finetune_moe
    feats = load_modalities(write_tiny_features(tmp_path, data), data)
    torch.manual_seed(0)
    model = build_model(params, data, {m: f.dim for m, f in feats.items()})   # every modality's
    model.set_features({m: (f.table, f.mask) for m, f in feats.items()})
    start = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    mems = [build_memory(params, data, feats) for _ in range(2)]
    alone = _rounds(model, pool, tp, data, [1, 2], memory=mems[0])
    model.load_state_dict(start)
    with Workers(model, pool, 2) as workers:
        pooled = _rounds(model, pool, tp, data, [1, 2], workers, memory=mems[1])
    _same(alone, pooled)
    assert alone[0].memory_writes > 0
    a, b = mems[0].state_dict(), mems[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failing_worker_raises_its_error_and_a_killed_one_names_itself(setup, monkeypatch):
    data, pool = setup
    params = tiny_params(clients_per_chunk=3)
    model = build_model(params, data)
    tp = params.pretrain_sasrec
    clients = select_clients(data.num_users, 0.5, 1, 0)
    bad = tiny_params(clients_per_chunk=3).pretrain_sasrec
    bad.loss = "nope"
    with Workers(model, pool, 2) as workers:
        with pytest.raises(RuntimeError, match="a training worker failed in round 1: ValueError: unknown loss 'nope'"):
            train_round_sequential(model, clients, pool, 1, bad, workers=workers)
    with Workers(model, pool, 2) as workers:
        procs = list(workers.procs)
        os.kill(procs[1].pid, signal.SIGKILL)
        with pytest.raises(SystemFailure, match=r"a training worker \(pid \d+\) stopped with exit code -9 in round 1") \
                as killed:
            train_round_sequential(model, clients, pool, 1, tp, workers=workers)
        assert killed.value.retryable and killed.value.exit_code == 5   # a crash, retried by the flow; not bad input
        with pytest.raises(FeddmmrError, match="the training workers were stopped"):   # never a stale answer
            train_round_sequential(model, clients, pool, 2, tp, workers=workers)
    assert not any(p.is_alive() for p in procs)
    assert train_round_sequential(model, clients[:2], pool, 1, tp).clients == 2    # the model trains on in-process


def test_a_chunk_sent_to_a_worker_is_small_whatever_the_round_size(setup, tmp_path):
    """A chunk holding a view of the whole round's memory slots pickled them all: with 1,000 clients a task
    outgrew the socket buffer and the pipe deadlocked against a worker sending its result."""
    import pickle
    from feddmmr.federated.client import client_chunks
    from feddmmr.features.store import load_modalities
    data, _ = setup
    params = tiny_stage_params()
    memory = build_memory(params, data, load_modalities(write_tiny_features(tmp_path, data), data))
    users = list(range(data.num_users))
    chunks = client_chunks(users, memory, 4)
    assert [u for c in chunks for u in c[0]] == users
    assert max(len(pickle.dumps(c)) for c in chunks) < 4 * len(pickle.dumps(client_chunks(users[:4], memory, 4)[0]))
    for _, ids, pos in chunks:
        assert ids.untyped_storage().nbytes() == ids.numel() * ids.element_size()
