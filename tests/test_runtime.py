import time

import pytest
import torch

from feddmmr.federated import runtime
from feddmmr.errors import FeddmmrError


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_the_thread_count_follows_the_cpus_other_processes_leave_free(monkeypatch):
    monkeypatch.delenv(runtime.ENV, raising=False)
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 4)
    clock = {"busy": 0.0}
    monkeypatch.setattr(runtime, "_busy_seconds", lambda cpus: clock["busy"])
    pool = runtime.ThreadPool(0)
    assert pool.threads == torch.get_num_threads() == 4

    def elapse(seconds: float, others_busy: float):
        t0 = pool._sample()
        time.sleep(seconds)
        own = pool._sample()[1] - t0[1]
        clock["busy"] += own + others_busy * seconds      # what /proc/stat would add: ours plus theirs

    elapse(0.2, 2.0)                                      # another process keeps two CPUs busy
    assert pool.update() == torch.get_num_threads() == 2
    elapse(0.2, 3.9)
    assert pool.update() == 1                             # never fewer than one
    elapse(0.2, 0.0)                                      # it finished
    assert pool.update() == 4
    assert "4 torch threads" in pool.describe()


def test_a_fixed_thread_count_wins_and_the_environment_wins_over_params(monkeypatch):
    monkeypatch.setattr(runtime, "_busy_seconds", lambda cpus: 1e9 * time.monotonic())  # "fully loaded"
    monkeypatch.delenv(runtime.ENV, raising=False)
    assert runtime.ThreadPool(2).update() == torch.get_num_threads() == 2
    monkeypatch.setenv(runtime.ENV, "1")
    pool = runtime.ThreadPool(2)
    time.sleep(0.06)
    assert pool.update() == torch.get_num_threads() == 1 and "fixed" in pool.describe()
    monkeypatch.setenv(runtime.ENV, "two")
    with pytest.raises(FeddmmrError, match="FEDDMMR_THREADS='two' must be a whole number"):
        runtime.ThreadPool(0)


def test_usable_cpus_is_the_affinity_mask_capped_by_the_cgroup_quota(tmp_path, monkeypatch):
    import os
    assert 1 <= runtime.usable_cpus() <= len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    cpu_max = tmp_path / "cpu.max"
    for quota, cpus in (("max 100000", 4), ("250000 100000", 2), ("800000 100000", 4), ("50000 100000", 1)):
        cpu_max.write_text(quota + "\n")
        assert runtime.usable_cpus(cpu_max) == cpus, quota
    assert runtime.usable_cpus(tmp_path / "no-cgroup-v2") == 4


def test_the_training_workers_cpu_time_is_not_taken_for_other_processes_load(monkeypatch):
    """Two busy worker processes of our own leave every CPU to this process's evaluation threads."""
    monkeypatch.delenv(runtime.ENV, raising=False)
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 2)
    clock = {"busy": 0.0, "workers": 0.0}
    monkeypatch.setattr(runtime, "_busy_seconds", lambda cpus: clock["busy"])
    monkeypatch.setattr(runtime, "_cpu_seconds", lambda pid: clock["workers"] / 2)
    pool = runtime.ThreadPool(0)
    pool.count_as_own([101, 102])
    assert pool.processes() == 2
    time.sleep(0.1)
    clock["workers"] += 0.2                 # both workers busy for the 0.1 s
    clock["busy"] += 0.2
    assert pool.update() == 2 and pool.others < 0.2
    pool.count_as_own([])                   # without them the same load is someone else's
    time.sleep(0.1)
    clock["busy"] += 0.2
    assert pool.update() == 1
