import numpy as np
import pytest
import torch

from feddmmr.config import MemoryParams
from feddmmr.model.memory import MemoryBank, combined_features


def bank(comb=None, **kw):
    args = dict(st_capacity=3, lt_capacity=3, retrieve_lt=2, surprise_threshold=0.5, merge_threshold=0.9, half_life=4.0)
    args.update(kw)
    return MemoryBank(2, MemoryParams(**args), comb)


def test_short_term_is_fifo_of_the_stream_in_time_order():
    m = bank()
    # handed over shuffled; replayed by sequence index
    m.observe(0, items=np.array([5, 3, 9, 7]), pos=np.array([3, 1, 4, 2]), surprise=np.zeros(4))
    assert m.st_ids[0].tolist() == [7, 5, 9] and m.st_pos[0].tolist() == [2, 3, 4]
    assert (m.lt_ids[0] == 0).all()  # nothing surprising: long-term untouched
    assert m.clock[0] == 4


def test_long_term_threshold_refresh_and_utility_eviction():
    m = bank()
    m.observe(0, np.array([1, 2, 3]), np.array([1, 2, 3]), np.array([0.9, 0.2, 0.6]))
    assert sorted(m.lt_ids[0][m.lt_ids[0] > 0].tolist()) == [1, 3]
    m.observe(0, np.array([1, 4, 5]), np.array([1, 4, 5]), np.array([0.9, 0.7, 0.8]))
    # item 1 was refreshed (freq 2); LT full at item 5 -> the lowest-utility slot (item 3: freq 1, oldest) goes
    lt = dict(zip(m.lt_ids[0].tolist(), m.lt_freq[0].tolist()))
    assert lt == {1: 2, 4: 1, 5: 1}
    u = m.utility(0)
    assert np.isfinite(u).all() and u[m.lt_ids[0].tolist().index(1)] == u.max()


def test_near_duplicates_merge_into_one_slot():
    comb = torch.zeros(6, 2)
    comb[1] = torch.tensor([1.0, 0.0])
    comb[2] = torch.nn.functional.normalize(torch.tensor([1.0, 0.05]), dim=0)  # cos 0.999 with item 1
    comb[3] = torch.tensor([0.0, 1.0])
    m = bank(comb=comb)
    writes = m.observe(0, np.array([1, 2, 3]), np.array([1, 2, 3]), np.ones(3))
    assert writes == 2 and sorted(m.lt_ids[0][m.lt_ids[0] > 0].tolist()) == [1, 3]
    assert m.lt_freq[0][m.lt_ids[0].tolist().index(1)] == 2


def test_retrieval_is_batched_top_utility_without_duplicates():
    m = bank()
    m.observe(1, np.array([1, 2, 3, 4]), np.array([1, 2, 3, 4]), np.array([0.9, 0.9, 0.9, 0.1]))
    ids, pos = m.retrieve([0, 1])
    assert ids.shape == (2, m.slots) == pos.shape
    assert (ids[0] == 0).all() and (pos[0] == -1).all()           # client 0 never trained: empty
    st = ids[1, :3].tolist()
    assert st == [2, 3, 4]
    lt = [i for i in ids[1, 3:].tolist() if i]
    assert lt == [1]  # LT holds 1, 2, 3; 2 and 3 are already in ST, so only 1 is retrieved from LT
    m.observe(1, np.array([9]), np.array([5]), np.array([0.0]))
    ids, pos = m.retrieve([1])
    for i, p in zip(ids[0].tolist(), pos[0].tolist()):
        assert (i == 0) == (p == -1)


def test_state_round_trip_and_capacity_check():
    m = bank()
    m.observe(0, np.array([1, 2, 3]), np.array([1, 2, 3]), np.array([0.9, 0.9, 0.1]))
    other = bank()
    other.load_state_dict(m.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(m.retrieve([0, 1]), other.retrieve([0, 1])))
    with pytest.raises(ValueError, match="capacities differ"):
        bank(lt_capacity=4).load_state_dict(m.state_dict())


def test_combined_features_are_unit_or_zero():
    v = torch.randn(4, 3)
    t = torch.randn(4, 2)
    vm = torch.tensor([False, True, False, True])
    tm = torch.tensor([False, True, True, False])
    c = combined_features({"visual": (v, vm), "text": (t, tm)})
    norms = c.norm(dim=-1)
    assert norms[0] == 0 and torch.allclose(norms[1:], torch.ones(3))


def test_a_surprise_exactly_at_the_threshold_enters_long_term_memory_and_one_just_below_does_not():
    """The threshold is inclusive (SPEC: surprise reached the threshold), and so is the merge threshold."""
    below = np.nextafter(np.float64(0.5), 0.0)
    m = bank()
    writes = m.observe(0, np.array([1, 2]), np.array([1, 2]), np.array([0.5, below]))
    assert writes == 1 and m.lt_ids[0][m.lt_ids[0] > 0].tolist() == [1]
    comb = torch.zeros(4, 2, dtype=torch.float64)
    comb[1] = torch.tensor([1.0, 0.0])
    comb[2] = torch.tensor([0.6, 0.8])                         # cosine with item 1: 0.6
    at = bank(comb=comb.float(), merge_threshold=float(np.float32(0.6)))
    assert at.observe(0, np.array([1, 2]), np.array([1, 2]), np.ones(2)) == 1         # merged: 0.6 >= 0.6
    over = bank(comb=comb.float(), merge_threshold=0.61)
    assert over.observe(0, np.array([1, 2]), np.array([1, 2]), np.ones(2)) == 2       # kept apart
