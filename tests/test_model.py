import torch

from feddmmr.model import SASRec


def _model(**kw):
    torch.manual_seed(0)
    return SASRec(num_items=30, max_seq_len=8, hidden=16, blocks=2, heads=2, ffn_hidden=16, dropout=0.0, **kw).eval()


def test_causal_position_t_ignores_later_items():
    m = _model()
    a = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8]])
    b = a.clone()
    b[0, 6:] = torch.tensor([20, 21])
    ha, hb = m.encode(a), m.encode(b)
    assert torch.allclose(ha[:, :6], hb[:, :6], atol=1e-6)
    assert not torch.allclose(ha[:, 6:], hb[:, 6:])


def test_padding_tokens_do_not_leak_into_real_positions():
    """Real positions of a left-padded window equal the blocks run on the real positions alone."""
    import math
    m = _model()
    seq = torch.tensor([[0, 0, 0, 0, 0, 3, 4, 5]])
    h = m.encode(seq)
    assert torch.isfinite(h).all()
    real, pos = seq[:, 5:], torch.arange(5, 8)                        # same absolute positions, no padding
    x = m.item_emb(real) * math.sqrt(m.hidden) + m.pos_emb(pos)
    causal = torch.ones(3, 3, dtype=torch.bool).tril().unsqueeze(0)
    for block in m.blocks:
        x = block(x, causal)
    torch.testing.assert_close(m.final_ln(x), h[:, 5:])


def test_score_matches_score_all():
    m = _model()
    h = m.encode(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]]))[:, -1]
    items = torch.tensor([[1, 5, 30]])
    all_scores = m.score_all(h)
    assert torch.allclose(m.score(h, items), all_scores[:, items[0] - 1], atol=1e-5)


def _mm(seed=0, visual=True, gating=0.5):
    from feddmmr.model import FedDMMR, FedDMMRConfig
    torch.manual_seed(seed)
    m = FedDMMR(FedDMMRConfig(num_items=30, max_seq_len=8, hidden=16, blocks=1, heads=2, ffn_hidden=16, dropout=0.0,
                              gating_init=gating, router_hidden=8, feature_dims={"visual": 10, "text": 12})).eval()
    g = torch.Generator().manual_seed(seed)
    vis, txt = torch.randn(31, 10, generator=g), torch.randn(31, 12, generator=g)
    vm, tm = torch.ones(31, dtype=torch.bool), torch.ones(31, dtype=torch.bool)
    vm[::3] = False
    tm[::5] = False
    if not visual:
        vm[:] = False
    m.set_features({"visual": (vis, vm), "text": (txt, tm)})
    return m


def _train_experts(m):
    """Give the zero-initialised value maps and router weights so that memory matters."""
    with torch.no_grad():
        for e in m.experts.values():
            e.value.weight.normal_(0, 0.5)
        m.router.mlp[-1].weight.normal_(0, 0.5)


def test_every_parameter_belongs_to_exactly_one_group():
    from feddmmr.model import group_of, GROUPS
    m = _mm()
    seen = {group_of(k) for k, _ in m.named_parameters()}
    assert seen == set(GROUPS)
    assert group_of("sasrec.item_emb.weight") == "item_embeddings" and group_of("sasrec.blocks.0.ln1.weight") == "backbone"
    assert group_of("gating_weight") == "gate" and group_of("projections.text.weight") == "projections"


def test_untrained_experts_pool_the_memory_and_an_empty_memory_adds_nothing():
    """Identity-initialised experts: one visible slot gives LN(that slot's feature); no slot gives zero."""
    m = _mm()
    h = m.encode(torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6]]))[:, -1]
    cands = torch.tensor([[7, 8, 9, 10]])
    base = (m.sasrec.item_emb.weight[cands] @ h.unsqueeze(-1)).squeeze(-1)
    empty = m.score(h, cands, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.bool))
    assert torch.allclose(empty, base, atol=1e-6)
    assert not torch.allclose(m.score(h, cands, torch.tensor([[1, 2, 4, 5]]), torch.ones(1, 4, dtype=torch.bool)), base)
    slot = m.project("text", torch.tensor(2))
    out = m.experts["text"].pooled(torch.randn(1, 3, 16), slot.view(1, 1, 16), torch.ones(1, 1, dtype=torch.bool))
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(slot, (16,)).expand(1, 3, 16))


def test_factorised_expert_score_equals_the_plain_layer_norm_dot():
    from feddmmr.model.experts import MemoryExpert
    torch.manual_seed(1)
    e = MemoryExpert(16)
    with torch.no_grad():
        for p in e.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    query, slots, target = torch.randn(4, 7, 16), torch.randn(4, 5, 16), torch.randn(4, 7, 16)
    visible = torch.rand(4, 5) > 0.4
    visible[0] = False                                      # a user with nothing visible: LN(0) = bias
    plain = (e.pooled(query, slots, visible) * target).sum(-1)
    torch.testing.assert_close(e(query, slots, visible, target), plain, rtol=1e-4, atol=1e-4)


def test_fusion_is_residual_on_the_backbone_score():
    """score = <LN(seq), E_c> + g * (w_vis <LN(vis), E_c> + w_sem <LN(sem), E_c>): g = 0 gives the backbone."""
    m = _mm(gating=0.0)
    _train_experts(m)
    h = m.encode(torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6]]))[:, -1]
    cands = torch.tensor([[7, 8, 9, 10, 15]])
    mem, vis = torch.tensor([[1, 2, 4]]), torch.ones(1, 3, dtype=torch.bool)
    base = (m.sasrec.item_emb.weight[cands] @ h.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(m.score(h, cands, mem, vis), base, atol=1e-6)
    with torch.no_grad():
        m.gating_weight.fill_(0.7)
    scores = m.score(h, cands, mem, vis)
    assert not torch.allclose(scores, base)
    # item 15 has neither modality (15 % 3 == 0 and 15 % 5 == 0): its score stays the backbone's
    assert torch.allclose(scores[0, 4], base[0, 4], atol=1e-6)


def test_masked_feature_rows_never_enter_the_model():
    m = _mm()
    _train_experts(m)
    h = m.encode(torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6]]))[:, -1]
    cands, mem, vis = torch.tensor([[3, 5, 7, 10]]), torch.tensor([[3, 6, 9, 1]]), torch.ones(1, 4, dtype=torch.bool)
    before = m.score(h, cands, mem, vis)
    with torch.no_grad():  # rows of items without a poster (every third) or text (every fifth) are noise now
        m.features_visual[::3] = 100.0
        m.features_text[::5] = 100.0
    vm, tm = m.avail[:, 0].clone(), m.avail[:, 1].clone()
    m.set_features({"visual": (m.features_visual.clone(), vm), "text": (m.features_text.clone(), tm)})
    assert torch.allclose(m.score(h, cands, mem, vis), before, atol=1e-6)


def test_router_weights_follow_modality_availability():
    m = _mm()
    _train_experts(m)
    w = m.tables()["route"].detach()
    assert (w[1] > 0).all() and abs(float(w[1].sum()) - 1) < 1e-6  # both modalities
    assert w[3].tolist() == [0.0, 1.0]      # no poster -> semantic only
    assert w[5].tolist() == [1.0, 0.0]      # no text -> visual only
    assert w[15].tolist() == [0.0, 0.0]     # neither
    assert w[0].tolist() == [0.0, 0.0]      # padding


def test_training_and_evaluation_share_one_scoring_function():
    """forward (training) at the last position equals score / score_all (evaluation) when every slot is earlier."""
    m = _mm()
    _train_experts(m)
    seq = torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6]])
    cands = torch.tensor([[[7, 8, 9]] * 8])                    # [1, L, 3]
    target_pos = torch.full((1, 8), 100)
    mem_ids, mem_pos = torch.tensor([1, 2, 4, 0]), torch.tensor([1, 2, 4, -1])
    logits, _ = m(seq, cands, target_pos, mem_ids, mem_pos)
    h = m.encode(seq)[:, -1]
    ids, visible = mem_ids.unsqueeze(0), (mem_ids > 0).unsqueeze(0)
    torch.testing.assert_close(logits[:, -1], m.score(h, cands[:, -1], ids, visible))
    all_scores = m.score_all(h, ids, visible)
    torch.testing.assert_close(all_scores[:, cands[0, -1] - 1], logits[:, -1])


def test_memory_slots_from_the_future_are_invisible_in_training():
    m = _mm()
    _train_experts(m)
    seq = torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6]])
    cands = torch.tensor([[[7, 8, 9]] * 8])
    target_pos = torch.arange(8).unsqueeze(0) + 10             # targets at sequence index 10..17
    early = m(seq, cands, target_pos, torch.tensor([1, 2]), torch.tensor([3, 4]))[0]
    # a slot whose item comes at index 14 may only influence targets at index 15 and later
    later = m(seq, cands, target_pos, torch.tensor([1, 2, 11]), torch.tensor([3, 4, 14]))[0]
    assert torch.equal(early[:, :5], later[:, :5])
    assert not torch.allclose(early[:, 5:], later[:, 5:])


def test_candidate_scores_and_their_gradients_equal_the_plain_gather():
    """GatherDot (embedding_bag backwards: WeightedBags, RowSums) equals autograd through gather + mat-vec, alone and
    under vmap(grad) with a per-client table and with one shared table."""
    import torch.nn.functional as F
    from torch.func import grad, vmap
    from feddmmr.model.sasrec import GatherDot
    torch.manual_seed(0)
    plain = lambda E, h, c: (F.embedding(c, E) @ h.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    E = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    h = torch.randn(4, 5, 8, dtype=torch.float64, requires_grad=True)
    c = torch.randint(0, 30, (4, 5, 6))
    assert torch.autograd.gradcheck(lambda E, h: GatherDot.apply(E, h, c), (E, h))
    Es, hs, cs = torch.randn(3, 30, 8), torch.randn(3, 4, 5, 8), torch.randint(0, 30, (3, 4, 5, 6))
    for fn, E_dim in ((GatherDot.apply, 0), (GatherDot.apply, None)):
        Ein = Es if E_dim == 0 else Es[0]
        got = vmap(grad(lambda E, h, c: (fn(E, h, c) ** 2).sum(), argnums=(0, 1)), in_dims=(E_dim, 0, 0))(Ein, hs, cs)
        want = vmap(grad(lambda E, h, c: (plain(E, h, c) ** 2).sum(), argnums=(0, 1)), in_dims=(E_dim, 0, 0))(Ein, hs, cs)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_row_sums_sort_pairs_stably_on_either_path():
    """RowSums groups (p, j) pairs by row with a stable sort: NumPy's 16-bit radix sort for small tables on CPU,
    torch's sort otherwise; both give torch's stable order, so a row sums its pairs in the same order."""
    from feddmmr.model.sasrec import _stable_argsort
    keys = torch.randint(0, 300, (5000,), generator=torch.Generator().manual_seed(0))
    want = torch.argsort(keys, stable=True)
    assert torch.equal(_stable_argsort(keys, 300), want)
    assert torch.equal(_stable_argsort(keys, 2 ** 20), want)


def test_dropout_zeroes_at_its_rate_and_keeps_the_expectation():
    from feddmmr.model.sasrec import Dropout
    drop = Dropout(0.2)
    x = torch.ones(400, 256)
    y = drop(x)
    assert abs(float((y == 0).float().mean()) - 0.2) < 0.005
    assert abs(float(y.mean()) - 1.0) < 0.01 and torch.allclose(y[y > 0], torch.tensor(1.25))
    assert not torch.equal(y, drop(x))                       # fresh draws every call
    drop.eval()
    assert torch.equal(drop(x), x)


def test_full_softmax_loss_is_cross_entropy_over_every_item():
    """loss: full scores every real item; it is the cross entropy of the target among all of them, padding
    targets excluded; the multimodal model refuses it (its experts score sampled candidates)."""
    import pytest
    import torch.nn.functional as F
    from torch.func import functional_call
    from feddmmr.config import TrainParams
    from feddmmr.model import FedDMMR, FedDMMRConfig
    from feddmmr.model.loss import batch_loss
    torch.manual_seed(0)
    m = FedDMMR(FedDMMRConfig(num_items=30, max_seq_len=8, hidden=16, blocks=1, heads=2, ffn_hidden=16,
                              dropout=0.0, gating_init=0.1, router_hidden=8)).eval()
    x = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 9]])
    y = torch.tensor([[0, 0, 4, 5, 6, 7, 8, 30], [2, 3, 4, 5, 6, 7, 9, 11]])
    neg = torch.randint(1, 31, (2, 8, 4))
    params = dict(m.named_parameters())
    z = torch.zeros(1, dtype=torch.long)
    loss, surprise = batch_loss(m, params, x, y, torch.zeros_like(y), neg, z, z, TrainParams(loss="full"))
    logits = m.encode(x) @ m.sasrec.item_emb.weight[1:].T                      # [2, 8, 30]
    real = y > 0
    torch.testing.assert_close(loss, F.cross_entropy(logits[real], y[real] - 1))
    p = torch.softmax(logits, -1).gather(-1, (y - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(surprise[real], 1 - p[real])
    sampled, _ = batch_loss(m, params, x, y, torch.zeros_like(y), neg, z, z, TrainParams(loss="ce"))
    assert not torch.allclose(sampled, loss)
    with pytest.raises(ValueError, match="backbone"):
        functional_call(_mm(), dict(_mm().named_parameters()), (x, None, torch.zeros_like(y), z, z))


def test_a_model_with_no_modality_left_scores_as_its_backbone():
    """Every modality masked (a visual-only ablation without posters): scores over all items keep their
    [B, I] shape in any chunking, equal the candidate scores and the backbone's own."""
    m = _mm()
    m.set_features({k: (getattr(m, f"features_{k}").clone(), torch.zeros(31, dtype=torch.bool))
                    for k in ("visual", "text")})
    h = m.encode(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 9, 8, 7, 6, 5]]))[:, -1]
    mem = torch.tensor([[1, 2, 3], [4, 5, 0]])
    scores = m.score_all(h, mem, mem > 0, chunk=1)
    assert scores.shape == (2, 30)
    torch.testing.assert_close(scores, h @ m.sasrec.item_emb.weight[1:].T)
    items = torch.tensor([[1, 5, 30], [2, 3, 4]])
    torch.testing.assert_close(m.score(h, items, mem, mem > 0), scores.gather(1, items - 1))
