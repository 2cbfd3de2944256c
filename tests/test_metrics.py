import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_params
from feddmmr.config import PrepareParams
from feddmmr.data.prepare import load_prepared, prepare
from feddmmr.errors import ImpossibleMetric
from feddmmr.evaluation.metrics import Evaluator, rank_metrics
from feddmmr.training.checkpoint import build_model


def test_rank_metrics_by_hand():
    m = rank_metrics(torch.tensor([1, 3, 11]), [5, 10])
    assert m["HR@5"] == 2 / 3 and m["HR@10"] == 2 / 3
    assert math.isclose(m["NDCG@5"], (1 + 1 / math.log2(4)) / 3)
    assert math.isclose(m["MRR"], (1 + 1 / 3 + 1 / 11) / 3)


def test_impossible_ranks_are_refused_never_reported():
    """A rank of 0 used to read as HR 1.0 and NDCG inf (a repeated target masked as history)."""
    for ranks in ([1, 0, 3], [1, float("nan")], [2, float("inf")]):
        with pytest.raises(ImpossibleMetric, match="ranks below 1 or non-finite"):
            rank_metrics(torch.tensor(ranks), [5, 10])


@pytest.fixture(scope="module")
def repeated_prepared(tmp_path_factory, tiny_csv):
    """The tiny data with every interaction twice, as in re-watches: many targets are also in the history."""
    d = pd.read_csv(tiny_csv)
    path = tmp_path_factory.mktemp("repeats") / "interactions.csv"
    pd.concat([d, d]).sort_index(kind="stable").to_csv(path, index=False)
    out = path.parent / "prepared"
    prepare(PrepareParams(source="csv", path=str(path), max_seq_len=10, eval_negatives=20), out)
    return out


@pytest.mark.parametrize("prepared", ["tiny_prepared", "repeated_prepared"])
def test_batched_ranks_match_a_per_user_brute_force(prepared, request):
    """The oracle: the target competes with every item outside the history, and with itself when repeated."""
    data = load_prepared(request.getfixturevalue(prepared))
    repeats = sum(int(data.sequence(u)[-1] in set(data.sequence(u)[:-1].tolist())) for u in range(data.num_users))
    assert (repeats == data.num_users) == (prepared == "repeated_prepared")
    torch.manual_seed(0)
    model = build_model(tiny_params(), data).eval()
    evaluator = Evaluator(data, [10], batch_size=7)
    full, sampled = evaluator.ranks(model, "test")
    assert evaluator.summarize(full, sampled)["full"]["NDCG@10"] <= 1.0
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
