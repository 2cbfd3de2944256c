"""Per-user metrics, paired tests between models and intervals over seeds."""
import numpy as np
import pytest
import torch

from feddmmr.evaluation.metrics import rank_metrics
from feddmmr.evaluation.stats import paired_test, per_user, seed_interval


def test_per_user_metrics_average_to_the_evaluator_metrics():
    ranks = np.random.default_rng(0).integers(1, 300, size=500)
    want = rank_metrics(torch.from_numpy(ranks), [5, 10])
    for name in ("HR@5", "HR@10", "NDCG@10", "MRR"):
        assert per_user(ranks, name).mean() == pytest.approx(want[name], abs=1e-12)
    with pytest.raises(ValueError, match="HR@k, NDCG@k or MRR"):
        per_user(ranks, "recall@10")


def test_a_paired_test_finds_a_real_gain_and_not_a_null_one():
    rng = np.random.default_rng(1)
    base = rng.integers(1, 60, size=2000)
    better = np.maximum(1, base - rng.integers(0, 6, size=2000))       # every user ranks its target higher or equal
    same = rng.permutation(base)                                        # the same distribution, no real change
    gain = paired_test(base, better, "NDCG@10")
    assert gain.diff > 0 and gain.low > 0 and gain.p_value < 1e-6 and gain.significant
    assert gain.low <= gain.diff <= gain.high and gain.users == 2000
    null = paired_test(base, same, "NDCG@10")
    assert null.low < 0 < null.high and not null.significant
    assert paired_test(base, base, "HR@10").p_value == 1.0
    assert "not significant" in null.describe() and "significant at 5%" in gain.describe()
    with pytest.raises(ValueError, match="same users"):
        paired_test(base, better[:10], "NDCG@10")


def test_seed_interval_is_a_student_t_interval():
    mean, half = seed_interval([0.10, 0.12, 0.11])
    assert mean == pytest.approx(0.11)
    assert half == pytest.approx(4.302653 * 0.01 / np.sqrt(3), rel=1e-5)    # t(0.975, 2) * sd / sqrt(n)
    assert np.isnan(seed_interval([0.1])[1])
