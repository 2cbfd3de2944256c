import pytest
import torch

from conftest import tiny_params
from feddmmr.data.prepare import load_prepared
from feddmmr.federated.client import ClientPool, train_round_sequential, train_round_vectorized
from feddmmr.federated.server import SERVER_OPTIMIZERS, FedAdam, FedAvgM, select_clients
from feddmmr.training.checkpoint import build_model


@pytest.fixture(scope="module")
def setup(tiny_prepared):
    data = load_prepared(tiny_prepared)
    return data, ClientPool(data)


@pytest.mark.parametrize("epochs, optimizer, trainable", [
    (1, "adam", None), (2, "adam", None), (1, "sgd", None),
    (1, "adam", {"sasrec.blocks.0.attn.qkv.weight", "sasrec.final_ln.bias"}),
])
def test_vectorized_equals_sequential_reference(setup, epochs, optimizer, trainable):
    data, pool = setup
    params = tiny_params(local_epochs=epochs, weight_decay=1e-4, clients_per_chunk=7, optimizer=optimizer,
                         lr=0.1 if optimizer == "sgd" else 1e-3)
    params.model.dropout = 0.0  # dropout draws differ between vmap and a loop; everything else must match
    model = build_model(params, data)
    clients = select_clients(data.num_users, 0.5, rnd=1, seed=0)
    assert len(clients) == 20
    seq = train_round_sequential(model, clients, pool, 1, params.pretrain_sasrec, trainable)
    vec = train_round_vectorized(model, clients, pool, 1, params.pretrain_sasrec, trainable)
    assert seq.steps == vec.steps > len(clients)
    assert abs(seq.train_loss - vec.train_loss) < 1e-4
    before = dict(model.named_parameters())
    moved = 0
    for k in seq.state:
        torch.testing.assert_close(vec.state[k], seq.state[k], rtol=1e-4, atol=1e-5, msg=k)
        changed = not torch.equal(seq.state[k], before[k].detach())
        if trainable is not None and k not in trainable:
            assert not changed, f"frozen {k} moved"
        moved += changed
    assert moved >= (len(trainable) if trainable else 10)


@pytest.mark.parametrize("optimizer, weight_decay", [("adam", 0.0), ("adam", 1e-2), ("sgd", 0.0), ("sgd", 1e-2)])
def test_the_clients_optimizer_is_torch_optims_bit_for_bit(optimizer, weight_decay):
    from feddmmr.federated.client import ADAM_BETAS, ADAM_EPS, LocalOptimizer
    from feddmmr.config import TrainParams
    tp = TrainParams(optimizer=optimizer, lr=0.05, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(0)
    ours = [torch.randn(5, 3, generator=g).requires_grad_(True), torch.randn(4, generator=g).requires_grad_(True)]
    ref = [t.detach().clone().requires_grad_(True) for t in ours]
    opt = LocalOptimizer(ours, tp)
    ref_opt = torch.optim.SGD(ref, lr=tp.lr, weight_decay=weight_decay, foreach=False) if optimizer == "sgd" else \
        torch.optim.Adam(ref, lr=tp.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay, foreach=False)
    for step in range(5):
        x = torch.randn(3, generator=g)
        ref_opt.zero_grad()                                 # ours drops the gradients in its step
        for params, o in ((ours, opt), (ref, ref_opt)):
            loss = (params[0] @ x).square().sum() + (0 if step == 2 else params[1].exp().sum())  # step 2: no grad
            loss.backward()
            o.step()
        for a, b in zip(ours, ref):
            assert torch.equal(a, b), f"step {step}: max |diff| {(a - b).abs().max():.3g}"
        if step == 3:       # resumed from its saved state, it goes on as if never stopped
            saved = {k: v.clone() for k, v in opt.state_tensors().items()}
            opt = LocalOptimizer(ours, tp)
            opt.load_state_tensors(saved)


def test_fedavg_weights_clients_by_their_training_targets(setup):
    data, pool = setup
    params = tiny_params()
    params.model.dropout = 0.0
    model = build_model(params, data)
    a, b = 0, 1
    ra = train_round_sequential(model, [a], pool, 3, params.pretrain_sasrec)
    rb = train_round_sequential(model, [b], pool, 3, params.pretrain_sasrec)
    both = train_round_vectorized(model, [a, b], pool, 3, params.pretrain_sasrec)
    wa, wb = float(pool.num_targets[a]), float(pool.num_targets[b])
    assert wa == len(data.sequence(a)) - 3
    k = "sasrec.item_emb.weight"
    torch.testing.assert_close(both.state[k], (wa * ra.state[k] + wb * rb.state[k]) / (wa + wb), rtol=1e-4, atol=1e-5)


def test_training_negatives_exclude_history_and_are_seeded(setup):
    data, pool = setup
    tp = tiny_params(num_negatives=16).pretrain_sasrec
    for u in range(5):
        plan = pool.plan(u, 1, tp)
        again = pool.plan(u, 1, tp)
        history = set(data.sequence(u)[:-2].tolist())
        for b, c in zip(plan, again):
            assert torch.equal(b.neg, c.neg) and torch.equal(b.x, c.x)
            negs = set(b.neg.flatten().tolist())
            assert not negs & history and 0 not in negs
        targets = torch.cat([b.y.flatten() for b in plan])
        assert int((targets > 0).sum()) == len(data.sequence(u)) - 3  # each training target once per epoch


def test_client_selection_is_seeded_and_sized():
    a = select_clients(1000, 0.1, rnd=5, seed=42)
    assert a == select_clients(1000, 0.1, rnd=5, seed=42) and len(set(a)) == 100
    assert a != select_clients(1000, 0.1, rnd=6, seed=42)
    assert len(select_clients(3, 0.01, rnd=1, seed=0)) == 1


def test_server_momentum_keeps_frozen_tensors_and_defaults_to_fedavg():
    cur = {"a": torch.zeros(3), "b": torch.ones(2)}
    avg = {"a": torch.ones(3), "b": torch.ones(2)}
    assert FedAvgM(1.0, 0.0).step(cur, avg) is avg
    opt = FedAvgM(1.0, 0.5)
    first = opt.step(cur, avg)
    assert torch.equal(first["a"], torch.ones(3)) and torch.equal(first["b"], cur["b"])
    second = opt.step(first, {"a": torch.full((3,), 2.0), "b": torch.ones(2)})
    assert torch.allclose(second["a"], torch.full((3,), 1.0 + 0.5 * 1.0 + 1.0))


def test_fedadam_moves_an_element_the_clients_barely_moved_in_proportion_not_by_server_lr():
    """FedAdam with tau (``server_eps``): an element updated far below tau moves by a fixed fraction of its
    update, lr (1 - b1) / (2 tau) = 0.5 with the defaults, in every round; one updated far above tau by about
    lr (1 - b1) / sqrt(1 - b2) in its sign. Kingma-Ba's bias correction (``server_bias_correction``) is the
    sign step: lr on every element, 1e-6 or 2."""
    from feddmmr.config import TrainParams
    tp = TrainParams(server_optimizer="adam")
    cur = {"a": torch.zeros(5), "frozen": torch.ones(2)}
    delta = torch.tensor([1e-6, -2e-6, 1e-5, -2.0, 0.0])
    opt = SERVER_OPTIMIZERS["adam"].from_params(tp)
    assert (opt.eps, opt.bias_correction) == (tp.server_eps, tp.server_bias_correction) == (1e-3, False)
    out = opt.step(cur, {"a": delta.clone(), "frozen": torch.ones(2)})
    torch.testing.assert_close(out["a"][:3], 0.5 * delta[:3], rtol=1e-3, atol=0.0)   # 0.5x, never 0.01
    assert -0.035 < float(out["a"][3]) < -0.03 and float(out["a"][4]) == 0.0
    assert torch.equal(out["frozen"], cur["frozen"])
    second = opt.step(out, {"a": out["a"] + delta, "frozen": torch.ones(2)})["a"] - out["a"]
    assert torch.all(second[:3].abs() <= delta[:3].abs())                           # still in proportion
    sign = FedAdam(lr=0.01, momentum=0.9, eps=1e-8, bias_correction=True)
    out = sign.step(cur, {"a": delta.clone(), "frozen": torch.ones(2)})
    torch.testing.assert_close(out["a"], 0.01 * torch.sign(delta), rtol=0.02, atol=0.0)   # |d| / (|d| + 1e-8)


@pytest.mark.parametrize("trainable_groups", [None, {"projections", "gate"}])
def test_multimodal_executors_agree_on_weights_and_memories(setup, trainable_groups, tmp_path):
    """Stages 2-3: both executors give the same aggregate and the same client memories."""
    from conftest import tiny_stage_params, write_tiny_features
    from feddmmr.model import group_of
    from feddmmr.features.store import load_modalities
    from feddmmr.training.checkpoint import build_memory
    data, pool = setup
    params = tiny_stage_params(clients_per_chunk=3)
    params.model.dropout = 0.0
    tp = params.finetune_moe
    tp.load_balance_weight = 0.1
    feats = load_modalities(write_tiny_features(tmp_path, data), data)
    torch.manual_seed(0)
    model = build_model(params, data, {m: f.dim for m, f in feats.items()})   # every modality's
    model.set_features({m: (f.table, f.mask) for m, f in feats.items()})
    with torch.no_grad():  # as after some training: experts and router active, so every loss term has gradient
        for e in model.experts.values():
            e.value.weight.normal_(0, 0.3)
        model.router.mlp[-1].weight.normal_(0, 0.3)
    trainable = None if trainable_groups is None else {k for k, _ in model.named_parameters()
                                                        if group_of(k) in trainable_groups}
    clients = select_clients(data.num_users, 0.5, rnd=1, seed=0)
    mems = [build_memory(params, data, feats) for _ in range(2)]
    for mem in mems:  # a memory from an earlier round, so retrieval is non-empty
        train_round_sequential(model, clients[:6], pool, 0, tp, trainable, mem)
    seq = train_round_sequential(model, clients, pool, 1, tp, trainable, mems[0])
    vec = train_round_vectorized(model, clients, pool, 1, tp, trainable, mems[1])
    assert abs(seq.train_loss - vec.train_loss) < 1e-4 and seq.memory_writes == vec.memory_writes > 0
    before = dict(model.named_parameters())
    for k in seq.state:
        torch.testing.assert_close(vec.state[k], seq.state[k], rtol=1e-4, atol=1e-5, msg=k)
        moved = not torch.equal(seq.state[k], before[k].detach())
        if trainable is not None:
            assert moved == (k in trainable), k
    a, b = mems[0].state_dict(), mems[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trainable_tensor_without_gradient_stays_bit_identical_through_fedadam(setup, tmp_path):
    """No posters: the visual parameters train but get no gradient; FedAvg + FedAdam must not move them."""
    from conftest import tiny_stage_params, write_tiny_features
    from feddmmr.features.store import load_modalities
    from feddmmr.training.checkpoint import build_memory
    data, pool = setup
    params = tiny_stage_params()
    feats = load_modalities(write_tiny_features(tmp_path, data, visual=False), data)
    torch.manual_seed(0)
    model = build_model(params, data, {m: f.dim for m, f in feats.items()})   # every modality's
    model.set_features({m: (f.table, f.mask) for m, f in feats.items()})
    memory = build_memory(params, data, feats)
    server = FedAdam(0.01, 0.9)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    for rnd in (1, 2):
        result = train_round_vectorized(model, select_clients(data.num_users, 0.5, rnd, 0), pool, rnd,
                                        params.finetune_moe, None, memory)
        model.load_state_dict(server.step({k: v.detach() for k, v in model.state_dict().items()}, result.state))
    after = dict(model.named_parameters())
    for k in ("projections.visual.weight", "projections.visual.bias", "experts.visual.value.weight"):
        assert torch.equal(after[k], before[k]), k
    assert not torch.equal(after["projections.text.weight"], before["projections.text.weight"])


@pytest.mark.parametrize("executor", [train_round_sequential, train_round_vectorized])
@pytest.mark.parametrize("optimizer, epochs", [("sgd", 1), ("adam", 2)])
def test_local_catalogues_equal_the_dense_item_table(setup, executor, optimizer, epochs):
    """Sparse item updates (each client trains the rows its round touches) give the dense aggregate;
    rows no client touched come out bit-identical."""
    data, pool = setup
    params = tiny_params(local_epochs=epochs, optimizer=optimizer, lr=0.1 if optimizer == "sgd" else 1e-3,
                         num_negatives=2, clients_per_chunk=3)
    params.model.dropout = 0.0
    model = build_model(params, data)
    clients = select_clients(data.num_users, 0.2, rnd=1, seed=0)
    tp = params.pretrain_sasrec
    dense = executor(model, clients, pool, 1, tp, None, None, sparse=False)
    sparse = executor(model, clients, pool, 1, tp, None, None, sparse=True)
    assert abs(dense.train_loss - sparse.train_loss) < 1e-5 and dense.steps == sparse.steps
    for k in dense.state:
        torch.testing.assert_close(sparse.state[k], dense.state[k], rtol=1e-5, atol=1e-6, msg=k)
    table = "sasrec.item_emb.weight"
    before = model.state_dict()[table]
    untouched = (dense.state[table] == before).all(1)
    touched = torch.zeros(data.num_items + 1, dtype=torch.bool)
    for u in clients:
        for b in pool.plan(u, 1, tp):
            touched[torch.cat([b.x.flatten(), b.y.flatten(), b.neg.flatten()])] = True
    assert untouched.sum() > 0 and bool((~touched[1:] <= untouched[1:]).all())
    assert torch.equal(sparse.state[table][untouched], before[untouched])


def test_a_client_weight_decay_trains_the_whole_item_table(setup):
    """Weight decay shrinks every row, so a round with it uses the dense table by default."""
    from feddmmr.federated.client import use_sparse
    tp = tiny_params(weight_decay=1e-4).pretrain_sasrec
    assert not use_sparse(["sasrec.item_emb.weight"], tp)
    assert use_sparse(["sasrec.final_ln.bias"], tp)
    assert use_sparse(["sasrec.item_emb.weight"], tiny_params().pretrain_sasrec)


def test_full_softmax_trains_every_item_row_with_either_executor(setup):
    """loss: full scores every item, so the round trains the dense table (no local catalogues) and both
    executors agree; every real item's row moves."""
    data, pool = setup
    params = tiny_params(loss="full", clients_per_chunk=7, lr=0.1)
    params.model.dropout = 0.0
    model = build_model(params, data)
    clients = select_clients(data.num_users, 0.5, rnd=1, seed=0)
    tp = params.pretrain_sasrec
    seq = train_round_sequential(model, clients, pool, 1, tp)
    vec = train_round_vectorized(model, clients, pool, 1, tp)
    for k in seq.state:
        torch.testing.assert_close(vec.state[k], seq.state[k], rtol=1e-4, atol=1e-5, msg=k)
    table = "sasrec.item_emb.weight"
    before = model.state_dict()[table]
    moved = (seq.state[table] != before).any(1)
    assert moved[1:].all() and not moved[0]                        # every real item, never the padding row
    dense = train_round_sequential(model, clients, pool, 1, tp, sparse=False)
    assert all(torch.equal(dense.state[k], seq.state[k]) for k in seq.state)   # the default is the dense table


def test_auto_executor_is_the_sequential_loop_on_cpu_and_the_stacked_one_on_gpu():
    from feddmmr.federated.client import resolve_executor
    assert resolve_executor("auto", torch.device("cpu")) == "sequential"
    assert resolve_executor("auto", torch.device("cuda")) == "vectorized"
    assert resolve_executor("vectorized", torch.device("cpu")) == "vectorized"


@pytest.mark.parametrize("rows_per_client", [3, 40])   # a union of rows; and clients holding more rows than the table
def test_partial_sums_of_client_groups_equal_fedavg_of_the_clients(rows_per_client):
    """What a worker sends for a chunk of clients, added by the server, is FedAvg of those clients."""
    from feddmmr.federated.server import FedAvg, PartialSum
    g = torch.Generator().manual_seed(0)
    global_params = {"table": torch.randn(50, 4, generator=g), "dense": torch.randn(3, 2, generator=g),
                     "frozen": torch.randn(2, generator=g)}
    names = ["table", "dense"]
    clients = []
    for i in range(7):
        rows = torch.randperm(50, generator=g)[:rows_per_client].sort().values
        local = {"table": global_params["table"][rows] + torch.randn(len(rows), 4, generator=g),
                 "dense": global_params["dense"] + torch.randn(3, 2, generator=g)}
        clients.append((local, float(i + 1), {"table": rows}))
    flat, grouped = FedAvg(global_params, names), FedAvg(global_params, names)
    for c in clients:
        flat.add(*c)
    for lo in (0, 3, 5):
        part = PartialSum(global_params, names)
        group = clients[lo: {0: 3, 3: 5, 5: 7}[lo]]
        for c in group:
            part.add(*c)
        grouped.add_partial(part.finish())
        union = torch.unique(torch.cat([r["table"] for _, _, r in group]))
        assert torch.equal(part.sums["table"][0], union)        # the rows the group touched, never the catalogue
    a, b = flat.result(), grouped.result()
    assert grouped.total_w == flat.total_w == 28.0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6, msg=k)
    assert torch.equal(b["frozen"], global_params["frozen"])
    untouched = torch.ones(50, dtype=torch.bool)
    for _, _, r in clients:
        untouched[r["table"]] = False
    assert torch.equal(b["table"][untouched], global_params["table"][untouched])


@pytest.mark.parametrize("name", sorted(SERVER_OPTIMIZERS))
def test_every_server_optimizer_leaves_frozen_tensors_bit_identical_and_resumes_exactly(name):
    """The contract a new server optimizer must keep (docs: Extending): a tensor with a zero update and no
    state comes back unchanged; a resumed optimizer (state_dict) takes the same next step."""
    cur = {"a": torch.zeros(4), "frozen": torch.ones(2)}
    avg = {"a": torch.tensor([1e-3, -2.0, 0.5, 0.0]), "frozen": torch.ones(2)}
    opt = SERVER_OPTIMIZERS[name](0.01, 0.9)
    first = opt.step(cur, {k: v.clone() for k, v in avg.items()})
    assert torch.equal(first["frozen"], cur["frozen"])
    resumed = SERVER_OPTIMIZERS[name](0.01, 0.9)
    resumed.load_state_dict(*opt.state_dict(), device="cpu")
    nxt = {"a": torch.tensor([0.2, 0.1, -0.3, 0.05]), "frozen": torch.ones(2)}
    a = opt.step({k: v.clone() for k, v in first.items()}, {k: v.clone() for k, v in nxt.items()})
    b = resumed.step({k: v.clone() for k, v in first.items()}, {k: v.clone() for k, v in nxt.items()})
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_partial_sum_crosses_the_wire_format_unchanged():
    """PartialSum.to_arrays / from_arrays: what a Flower SuperNode sends and the server adds (dense tensors and
    row-wise sums over the union of the clients' rows), the same FedAvg result as adding the sum in process."""
    from feddmmr.federated.server import FedAvg, PartialSum
    g = {"table": torch.zeros(6, 2), "bias": torch.zeros(3)}
    part = PartialSum(g, ["table", "bias"])
    part.add({"table": torch.ones(2, 2), "bias": torch.ones(3)}, 2.0, rows={"table": torch.tensor([1, 4])})
    part.add({"table": torch.full((2, 2), 3.0), "bias": torch.full((3,), 2.0)}, 1.0, rows={"table": torch.tensor([4, 5])})
    part.finish()
    wire = part.to_arrays()
    assert set(wire) == {"sum:table", "rows:table", "sum:bias"} and wire["rows:table"].tolist() == [1, 4, 5]
    back = PartialSum.from_arrays(wire, ["table", "bias"], part.total_w)
    here, there = FedAvg(g, ["table", "bias"]), FedAvg(g, ["table", "bias"])
    here.add_partial(part)
    there.add_partial(back)
    a, b = here.result(), there.result()
    assert all(torch.equal(a[k], b[k]) for k in a) and back.total_w == 3.0
    assert torch.equal(a["table"][4], torch.full((2,), (2.0 * 1 + 1.0 * 3) / 3))
