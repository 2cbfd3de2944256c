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
    m = _model()
    seq = torch.tensor([[0, 0, 0, 0, 0, 3, 4, 5]])
    h = m.encode(seq)
    assert torch.isfinite(h).all()
    # change nothing but padding-position embeddings: real positions must not move
    with torch.no_grad():
        m.pos_emb.weight[:5] += 10.0
    assert torch.allclose(m.encode(seq)[:, 5:], h[:, 5:], atol=1e-5)


def test_score_matches_score_all():
    m = _model()
    h = m.encode(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]]))[:, -1]
    items = torch.tensor([[1, 5, 30]])
    all_scores = m.score_all(h)
    assert torch.allclose(m.score(h, items), all_scores[:, items[0] - 1], atol=1e-5)
