import math

import numpy as np
import torch

from conftest import tiny_params
from feddmmr.data import load_prepared
from feddmmr.metrics import Evaluator, rank_metrics
from feddmmr.stages import build_model


def test_rank_metrics_by_hand():
    m = rank_metrics(torch.tensor([1, 3, 11]), [5, 10])
    assert m["HR@5"] == 2 / 3 and m["HR@10"] == 2 / 3
    assert math.isclose(m["NDCG@5"], (1 + 1 / math.log2(4)) / 3)
    assert math.isclose(m["MRR"], (1 + 1 / 3 + 1 / 11) / 3)


def test_batched_ranks_match_a_per_user_brute_force(tiny_prepared):
    data = load_prepared(tiny_prepared)
    torch.manual_seed(0)
    model = build_model(tiny_params(), data).eval()
    full, sampled = Evaluator(data, [10], batch_size=7).ranks(model, "test")
    for u in range(data.num_users):
        seq = data.sequence(u)
        inp = torch.zeros(1, data.max_seq_len, dtype=torch.long)
        tail = torch.from_numpy(seq[:-1][-data.max_seq_len:])
        inp[0, -len(tail):] = tail
        with torch.no_grad():
            scores = model.score_all(model.encode(inp)[:, -1])[0]  # item i at column i-1
        target = int(seq[-1])
        candidates = [i for i in range(1, data.num_items + 1) if i == target or i not in set(seq[:-1].tolist())]
        expected_full = sum(1 for i in candidates if scores[i - 1] >= scores[target - 1])
        expected_sampled = 1 + sum(1 for i in data.eval_negatives[u] if scores[i - 1] >= scores[target - 1])
        assert full[u] == expected_full and sampled[u] == expected_sampled, u


def test_a_subset_of_users_ranks_as_in_the_whole_pass(tiny_prepared):
    """A SuperNode ranks only its users (any order, any batch size): the ranks the whole pass gives them."""
    data = load_prepared(tiny_prepared)
    torch.manual_seed(0)
    model = build_model(tiny_params(), data).eval()
    full, sampled = Evaluator(data, [10], batch_size=7).ranks(model, "val")
    users = np.random.default_rng(0).permutation(data.num_users)[:data.num_users // 2]
    sub_full, sub_sampled = Evaluator(data, [10], batch_size=5).ranks(model, "val", users=users)
    assert torch.equal(sub_full, full[users]) and torch.equal(sub_sampled, sampled[users])


def test_constant_model_ties_count_against_target(tiny_prepared):
    data = load_prepared(tiny_prepared)

    class Constant(torch.nn.Module):
        def encode(self, x):
            return torch.zeros(len(x), x.shape[1], 4)

        def score_all(self, h):
            return torch.zeros(len(h), data.num_items)

        def score(self, h, items):
            return torch.zeros(items.shape)

    full, sampled = Evaluator(data, [10]).ranks(Constant(), "val")
    hist_len = np.array([len(data.sequence(u)) - 2 for u in range(data.num_users)])
    assert full.tolist() == (data.num_items - hist_len).tolist()
    assert (sampled == data.eval_negatives.shape[1] + 1).all()


def test_nonfinite_scores_rank_worst_never_first(tiny_prepared):
    """A NaN target score used to rank 0 (HR 1.0, NDCG inf); it must rank last and be counted."""
    data = load_prepared(tiny_prepared)

    class NaNTarget(torch.nn.Module):
        def encode(self, x):
            return torch.zeros(len(x), x.shape[1], 4)

        def score_all(self, h):
            s = torch.arange(data.num_items, dtype=torch.float32).repeat(len(h), 1)
            return s.masked_fill(torch.ones_like(s, dtype=torch.bool), float("nan"))

        def score(self, h, items):
            return torch.full(items.shape, float("nan"))

    ev = Evaluator(data, [10])
    full, sampled = ev.ranks(NaNTarget(), "val")
    assert (full == data.num_items).all() and (sampled == data.eval_negatives.shape[1] + 1).all()
    result = ev.evaluate(NaNTarget(), "val")
    assert result["full"]["HR@10"] == 0 and result["full"]["NDCG@10"] == 0
    assert result["nonfinite_scores"] == data.num_users * (data.num_items + data.eval_negatives.shape[1])
